//! Traces: the binary exports spans over OTLP (HTTP/protobuf and gRPC) to a
//! receiver the test runs, in the clear or over TLS with a private CA; a
//! request's `traceparent` makes its span a child; a collector that is down
//! changes nothing for clients.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;
use support::Cluster;
use support::binary::{Running, spawn};
use support::cluster::certs::{self, TlsFiles};

/// One received span: name, trace id, span id, parent span id (hex).
#[derive(Clone, Debug)]
struct Received {
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
}

const TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";
const PARENT_ID: &str = "b7ad6b7169203331";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Records every span of an export request.
fn collect(sink: &Mutex<Vec<Received>>, request: ExportTraceServiceRequest) {
    let mut sink = sink.lock().unwrap();
    for scope in request.resource_spans.iter().flat_map(|r| &r.scope_spans) {
        for span in &scope.spans {
            sink.push(Received {
                name: span.name.clone(),
                trace_id: hex(&span.trace_id),
                span_id: hex(&span.span_id),
                parent: hex(&span.parent_span_id),
            });
        }
    }
}

/// The OTLP/HTTP trace endpoint, recording into `sink`.
fn otlp_http_routes(sink: Arc<Mutex<Vec<Received>>>) -> axum::Router {
    axum::Router::new().route(
        "/v1/traces",
        post(move |body: Bytes| {
            let sink = sink.clone();
            async move {
                let request = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                collect(&sink, request);
                ""
            }
        }),
    )
}

/// An OTLP/HTTP receiver on a free port; returns its address and the spans it got.
async fn receiver() -> (std::net::SocketAddr, Arc<Mutex<Vec<Received>>>) {
    let spans = Arc::new(Mutex::new(Vec::new()));
    let app = otlp_http_routes(spans.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (address, spans)
}

/// An OTLP/gRPC receiver on a free port; returns its address and the spans it got.
async fn grpc_receiver(
    tls: Option<&TlsFiles>,
) -> (std::net::SocketAddr, Arc<Mutex<Vec<Received>>>) {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
        TraceService, TraceServiceServer,
    };

    struct Sink(Arc<Mutex<Vec<Received>>>);

    #[tonic::async_trait]
    impl TraceService for Sink {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            collect(&self.0, request.into_inner());
            Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
        }
    }

    let spans = Arc::new(Mutex::new(Vec::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let service = TraceServiceServer::new(Sink(spans.clone()));
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        let identity = tonic::transport::Identity::from_pem(&tls.cert_pem, &tls.key_pem);
        server = server
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .unwrap();
    }
    tokio::spawn(server.add_service(service).serve_with_incoming(incoming));
    (address, spans)
}

/// Starts the binary exporting to `endpoint` over `protocol`.
fn start_pgwarden(cluster: &Cluster, endpoint: &str, protocol: &str) -> Running {
    spawn(cluster, |command| {
        command
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
            .env("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
            .env("OTEL_BSP_SCHEDULE_DELAY", "100");
    })
}

/// A TLS server configuration with the certificate of `tls`.
fn server_tls(tls: &TlsFiles) -> Arc<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let certs = CertificateDer::pem_slice_iter(tls.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(tls.key_pem.as_bytes()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(config)
}

/// Accepts TLS connections for `axum::serve`; failed handshakes are skipped.
struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((stream, peer)) = self.tcp.accept().await else {
                continue;
            };
            if let Ok(tls) = self.acceptor.accept(stream).await {
                return (tls, peer);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// An OTLP/HTTP receiver behind TLS, with a certificate of a private CA.
async fn https_receiver(tls: &TlsFiles) -> (u16, Arc<Mutex<Vec<Received>>>) {
    let spans = Arc::new(Mutex::new(Vec::new()));
    let app = otlp_http_routes(spans.clone());
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = tcp.local_addr().unwrap().port();
    let listener = TlsListener {
        tcp,
        acceptor: tokio_rustls::TlsAcceptor::from(server_tls(tls)),
    };
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (port, spans)
}

/// Starts the binary exporting to an `https://localhost` collector on
/// `port` over `protocol`, trusting the CA of `tls`.
fn start_pgwarden_tls(
    cluster: &Cluster,
    port: u16,
    protocol: &str,
    tls: &TlsFiles,
) -> (Running, tempfile::NamedTempFile) {
    let ca = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ca.path(), &tls.ca_pem).unwrap();
    let pgwarden = spawn(cluster, |command| {
        command
            .env(
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("https://localhost:{port}"),
            )
            .env("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
            .env("OTEL_EXPORTER_OTLP_CERTIFICATE", ca.path())
            .env("OTEL_BSP_SCHEDULE_DELAY", "100");
    });
    (pgwarden, ca)
}

async fn traced_query(client: &reqwest::Client, url: &str) -> reqwest::StatusCode {
    client
        .post(url)
        .header("Neon-Connection-String", "postgresql://postgres@x/postgres")
        .header("traceparent", format!("00-{TRACE_ID}-{PARENT_ID}-01"))
        .body(r#"{"query":"SELECT 1"}"#)
        .send()
        .await
        .unwrap()
        .status()
}

fn terminate(mut pgwarden: Running) -> Option<i32> {
    pgwarden.terminate();
    pgwarden.exit_code(Duration::from_secs(20))
}

async fn eventually_ready(client: &reqwest::Client, url: &str) {
    for _ in 0..200 {
        if traced_query(client, url).await == reqwest::StatusCode::OK {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("pgwarden never answered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_is_traced_as_a_child_of_its_traceparent() {
    let cluster = Cluster::start();
    let (address, spans) = receiver().await;
    let pgwarden = start_pgwarden(&cluster, &format!("http://{address}"), "http/protobuf");
    assert_traced(pgwarden, spans).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_are_exported_over_grpc_too() {
    let cluster = Cluster::start();
    let (address, spans) = grpc_receiver(None).await;
    let pgwarden = start_pgwarden(&cluster, &format!("http://{address}"), "grpc");
    assert_traced(pgwarden, spans).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_reach_an_https_collector_with_a_private_ca() {
    let cluster = Cluster::start();
    let tls = certs::generate();
    let (port, spans) = https_receiver(&tls).await;
    let (pgwarden, _ca) = start_pgwarden_tls(&cluster, port, "http/protobuf", &tls);
    assert_traced(pgwarden, spans).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_reach_a_grpc_collector_over_tls_with_a_private_ca() {
    let cluster = Cluster::start();
    let tls = certs::generate();
    let (address, spans) = grpc_receiver(Some(&tls)).await;
    let (pgwarden, _ca) = start_pgwarden_tls(&cluster, address.port(), "grpc", &tls);
    assert_traced(pgwarden, spans).await;
}

/// Sends a traced request and checks the spans `spans` receives.
async fn assert_traced(pgwarden: Running, spans: Arc<Mutex<Vec<Received>>>) {
    let url = format!("http://{}/sql", pgwarden.data);
    let client = reqwest::Client::new();
    eventually_ready(&client, &url).await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let ours = loop {
        let ours: Vec<Received> = spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace_id == TRACE_ID)
            .cloned()
            .collect();
        let names: Vec<&str> = ours.iter().map(|s| s.name.as_str()).collect();
        if ["http_request", "guard_admit", "db_query"]
            .iter()
            .all(|n| names.contains(n))
        {
            break ours;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "spans never arrived: {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let request = ours.iter().find(|s| s.name == "http_request").unwrap();
    assert_eq!(
        request.parent, PARENT_ID,
        "the request span is a child of the caller's span"
    );
    for name in ["guard_admit", "db_query"] {
        let inner = ours
            .iter()
            .find(|s| s.name == name && s.parent == request.span_id);
        assert!(
            inner.is_some(),
            "{name} is not a child of http_request: {ours:?}"
        );
    }
    let lifecycle = spans.lock().unwrap().iter().any(|s| s.name == "db_warmup");
    assert!(lifecycle, "the warm-up was traced too");
    assert_eq!(terminate(pgwarden), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_down_changes_nothing_for_clients() {
    let cluster = Cluster::start();
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let pgwarden = start_pgwarden(&cluster, &format!("http://{closed}"), "http/protobuf");
    let url = format!("http://{}/sql", pgwarden.data);
    let client = reqwest::Client::new();
    eventually_ready(&client, &url).await;
    let started = std::time::Instant::now();
    for _ in 0..50 {
        assert_eq!(traced_query(&client, &url).await, reqwest::StatusCode::OK);
    }
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "requests slowed down: {:?}",
        started.elapsed()
    );
    assert_eq!(
        terminate(pgwarden),
        Some(0),
        "exits cleanly although the flush fails"
    );
}
