//! Logs and traces.
//!
//! Logs go to stderr as text or one JSON object per line, filtered by
//! `RUST_LOG` (default: `info` for pgwarden, `warn` for libraries). Spans go
//! to an OTLP collector when the standard variables name one
//! (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`),
//! over HTTP/protobuf (default) or gRPC (`OTEL_EXPORTER_OTLP_PROTOCOL=grpc`);
//! `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER*`
//! and `OTEL_BSP_*` apply as the specification says. An `https://`
//! collector is verified against the bundled web PKI roots (HTTP also
//! against the system's), plus the PEM file that
//! `OTEL_EXPORTER_OTLP_CERTIFICATE` (or `…_TRACES_CERTIFICATE`) names, for
//! a collector with a private CA. Export runs on the
//! batch processor, off the request path, so a collector that is down only
//! loses spans: it never slows or crashes the daemon.

use std::io::IsTerminal;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, SpanExporter, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::{FilterExt, LevelFilter, filter_fn};
use tracing_subscriber::layer::Identity;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Spans opened for every request below its own: in traces, not in logs.
const PER_REQUEST_SPANS: [&str; 2] = ["guard_admit", "db_query"];

/// Keeps the trace pipeline alive; [`Telemetry::shutdown`] flushes it.
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Flushes the spans not yet exported (bounded: a dead collector cannot hold up the exit).
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(error) = provider.shutdown_with_timeout(Duration::from_secs(5))
        {
            eprintln!("flushing traces failed: {error}");
        }
    }
}

/// Installs the global subscriber: logs in `format` (`text` or `json`),
/// plus OTLP traces when configured by the environment.
pub fn init(format: &str) -> Telemetry {
    let logs = tracing_subscriber::fmt::layer()
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let logs = if format == "json" {
        logs.json().flatten_event(true).boxed()
    } else {
        logs.boxed()
    };
    // The logs format the fields of every span they see, when it starts:
    // spans made per request, which log lines need not name, are for
    // traces only. Without a trace exporter nobody wants them, so they are
    // never made (a wire unit would pay about a fifth of its CPU time).
    let per_request =
        filter_fn(|meta| !(meta.is_span() && PER_REQUEST_SPANS.contains(&meta.name())));
    let logs = logs.with_filter(env_filter().and(per_request));
    let provider = otlp_provider();
    // No exporter: a layer that wants nothing (an absent layer would count
    // as wanting everything, and every span would be made).
    let traces = match &provider {
        Some(provider) => tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("pgwarden"))
            .with_filter(env_filter())
            .boxed(),
        None => Identity::new().with_filter(LevelFilter::OFF).boxed(),
    };
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let installed = tracing_subscriber::registry()
        .with(traces)
        .with(logs)
        .try_init();
    if let Err(error) = installed {
        eprintln!("logging was already initialised: {error}");
    }
    Telemetry { provider }
}

/// `RUST_LOG`, or pgwarden's default: `info` for pgwarden, `warn` for
/// libraries.
fn env_filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn,pgwarden=info"))
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn otlp_provider() -> Option<SdkTracerProvider> {
    let endpoint =
        env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"))?;
    if env("OTEL_TRACES_EXPORTER").as_deref() == Some("none") {
        return None;
    }
    let protocol =
        env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL").or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"));
    let exporter = collector_ca().and_then(|ca| match protocol.as_deref() {
        Some("grpc") => grpc_exporter(&endpoint, ca),
        _ => http_exporter(ca),
    });
    let exporter = match exporter {
        Ok(exporter) => exporter,
        Err(error) => {
            eprintln!("traces disabled: cannot export to {endpoint}: {error}");
            return None;
        }
    };
    let mut resource = Resource::builder();
    if env("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name("pgwarden");
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    Some(provider)
}

/// The collector's private CA, as PEM, when the environment names one.
fn collector_ca() -> Result<Option<Vec<u8>>, String> {
    let Some(path) = env("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE")
        .or_else(|| env("OTEL_EXPORTER_OTLP_CERTIFICATE"))
    else {
        return Ok(None);
    };
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;

    let pem = std::fs::read(&path)
        .map_err(|e| format!("cannot read the collector's CA certificate {path}: {e}"))?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{path} is not valid PEM: {e}"))?;
    if certificates.is_empty() {
        return Err(format!("{path} holds no certificate"));
    }
    Ok(Some(pem))
}

/// OTLP over HTTP/protobuf. With a private CA the HTTP client is built
/// here (on its own thread: a blocking client must not be built inside the
/// runtime), trusting that CA on top of the usual roots.
fn http_exporter(ca: Option<Vec<u8>>) -> Result<SpanExporter, String> {
    let builder = SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary);
    let Some(pem) = ca else {
        return builder.build().map_err(|e| e.to_string());
    };
    let timeout = export_timeout();
    let client = std::thread::spawn(move || {
        let roots = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| format!("the collector's CA certificate is not valid PEM: {e}"))?;
        reqwest::blocking::Client::builder()
            .timeout(timeout)
            .tls_certs_merge(roots)
            .build()
            .map_err(|e| format!("cannot build the OTLP HTTP client: {e}"))
    })
    .join()
    .map_err(|_| "building the OTLP HTTP client panicked".to_string())??;
    builder
        .with_http_client(client)
        .build()
        .map_err(|e| e.to_string())
}

/// OTLP over gRPC; `https://` endpoints use TLS with the web PKI roots and
/// the private CA, if any.
fn grpc_exporter(endpoint: &str, ca: Option<Vec<u8>>) -> Result<SpanExporter, String> {
    use opentelemetry_otlp::WithTonicConfig;

    use opentelemetry_otlp::tonic_types::transport::{Certificate, ClientTlsConfig};

    let mut builder = SpanExporter::builder().with_tonic();
    if endpoint.starts_with("https://") || ca.is_some() {
        let mut tls = ClientTlsConfig::new().with_webpki_roots();
        if let Some(pem) = ca {
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        builder = builder.with_tls_config(tls);
    }
    builder.build().map_err(|e| e.to_string())
}

/// The export timeout of the specification's variables (default 10 s).
fn export_timeout() -> Duration {
    env("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT")
        .or_else(|| env("OTEL_EXPORTER_OTLP_TIMEOUT"))
        .and_then(|ms| ms.parse().ok())
        .map_or(Duration::from_secs(10), Duration::from_millis)
}
