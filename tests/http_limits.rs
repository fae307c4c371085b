//! The data listener against clients that misbehave at the HTTP level,
//! spoken to over raw TCP: clients that stop sending half-way are cut off
//! within a bounded time, an oversized head is answered 431, and input the
//! PostgreSQL protocol cannot carry is a clear 400 before anything runs.

mod support;

use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::HeaderValue;
use serde_json::{Value, json};
use support::Cluster;
use support::daemon::{TestDaemon, config_for};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a test waits for the daemon to close a connection whose limit
/// is one second: generous, so a loaded machine does not fail the test.
const CLOSED_WITHIN: Duration = Duration::from_secs(10);

/// The start of every raw request: the Neon headers of the test daemon.
const HEAD: &str = "POST /sql HTTP/1.1\r\nHost: pgwarden\r\nNeon-Connection-String: postgresql://postgres@pgwarden.invalid/postgres\r\nContent-Type: text/plain;charset=UTF-8\r\n";

/// A daemon whose header and body timeouts are one second.
async fn impatient_daemon(cluster: &Cluster) -> TestDaemon {
    let mut config = config_for(cluster);
    config.header_read_timeout_ms = 1000;
    config.body_read_timeout_ms = 1000;
    TestDaemon::start(config).await
}

async fn connect(daemon: &TestDaemon) -> TcpStream {
    let address = daemon.data.trim_start_matches("http://");
    TcpStream::connect(address).await.expect("connects")
}

/// Everything the daemon sends until it closes the connection; fails the
/// test when the connection is still open after [`CLOSED_WITHIN`].
async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut received = Vec::new();
    let read = tokio::time::timeout(CLOSED_WITHIN, async {
        let mut buffer = [0u8; 8192];
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buffer[..n]),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "the connection is still open {CLOSED_WITHIN:?} after the client stopped; received {:?}",
        String::from_utf8_lossy(&received)
    );
    received
}

/// The status code and JSON body of a raw HTTP/1.1 response.
fn parse_response(raw: &[u8]) -> (u16, Value) {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no complete response in {text:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {head:?}"));
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

fn assert_error_shape(body: &Value) {
    let object = body.as_object().expect("a JSON object");
    assert_eq!(object.len(), 17, "{body}");
    for key in ["message", "code", "detail", "position", "severity"] {
        assert!(object.contains_key(key), "missing {key} in {body}");
    }
}

#[tokio::test]
async fn a_client_that_stops_in_the_middle_of_its_headers_is_disconnected() {
    let cluster = Cluster::start();
    let daemon = impatient_daemon(&cluster).await;

    let mut stalled = connect(&daemon).await;
    stalled
        .write_all(b"POST /sql HTTP/1.1\r\nHost: pgwarden\r\nNeon-Conn")
        .await
        .unwrap();
    read_until_closed(&mut stalled).await;

    let mut silent = connect(&daemon).await;
    read_until_closed(&mut silent).await;

    daemon.query("SELECT 1", json!([])).await;
}

#[tokio::test]
async fn a_body_that_stops_half_way_is_answered_408_and_the_connection_closed() {
    let cluster = Cluster::start();
    let daemon = impatient_daemon(&cluster).await;
    let body = r#"{"query":"SELECT 1"}"#;

    let mut sized = connect(&daemon).await;
    let request = format!("{HEAD}Content-Length: {}\r\n\r\n", body.len() + 50);
    sized.write_all(request.as_bytes()).await.unwrap();
    sized.write_all(&body.as_bytes()[..10]).await.unwrap();
    let (status, reply) = parse_response(&read_until_closed(&mut sized).await);
    assert_eq!(status, 408, "{reply}");
    assert_error_shape(&reply);
    assert!(
        reply["message"].as_str().unwrap().contains("1000 ms"),
        "{reply}"
    );

    let mut chunked = connect(&daemon).await;
    let request = format!("{HEAD}Transfer-Encoding: chunked\r\n\r\n5\r\n{{\"que\r\n");
    chunked.write_all(request.as_bytes()).await.unwrap();
    let (status, reply) = parse_response(&read_until_closed(&mut chunked).await);
    assert_eq!(status, 408, "{reply}");
    assert_error_shape(&reply);

    assert_eq!(
        daemon
            .metric("pgwarden_errors_total{kind=\"bad_request\"}")
            .await,
        2.0
    );
    daemon.query("SELECT 1", json!([])).await;
}

#[tokio::test]
async fn an_oversized_head_is_answered_431_and_a_large_one_within_the_limit_is_served() {
    let cluster = Cluster::start();
    let daemon = TestDaemon::start(config_for(&cluster)).await;
    let body = r#"{"query":"SELECT 1"}"#;
    let request_with = |padding: usize| {
        format!(
            "{HEAD}X-Padding: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            "p".repeat(padding),
            body.len()
        )
    };

    let mut within = connect(&daemon).await;
    within
        .write_all(request_with(24 * 1024).as_bytes())
        .await
        .unwrap();
    let (status, reply) = parse_response(&read_until_closed(&mut within).await);
    assert_eq!(status, 200, "{reply}");

    let mut over = connect(&daemon).await;
    over.write_all(request_with(64 * 1024).as_bytes())
        .await
        .unwrap();
    let (status, reply) = parse_response(&read_until_closed(&mut over).await);
    assert_eq!(status, 431, "{reply}");
    assert_error_shape(&reply);
    assert!(
        reply["message"].as_str().unwrap().contains("32768"),
        "{reply}"
    );

    let long_target =
        request_with(0).replacen("/sql", &format!("/sql?{}", "q".repeat(40 * 1024)), 1);
    let mut over = connect(&daemon).await;
    over.write_all(long_target.as_bytes()).await.unwrap();
    let (status, reply) = parse_response(&read_until_closed(&mut over).await);
    assert_eq!(status, 431, "the request line counts too: {reply}");

    assert_eq!(
        daemon
            .metric("pgwarden_errors_total{kind=\"too_large\"}")
            .await,
        2.0
    );

    // Far beyond the limit, hyper stops buffering: 431 or a closed
    // connection, never a connection held open.
    let mut huge = connect(&daemon).await;
    let _ = huge.write_all(request_with(1024 * 1024).as_bytes()).await;
    let raw = read_until_closed(&mut huge).await;
    if !raw.is_empty() {
        assert_eq!(parse_response(&raw).0, 431);
    }
    daemon.query("SELECT 1", json!([])).await;
}

#[tokio::test]
async fn input_the_protocol_cannot_carry_is_a_400_that_says_why_and_nothing_runs() {
    let cluster = Cluster::start();
    cluster.psql("CREATE TABLE ledger (n int)");
    let daemon = TestDaemon::start(config_for(&cluster)).await;
    let insert = json!({"query": "INSERT INTO ledger VALUES (1)"});
    let many = vec!["1"; 70_000];
    let cases = [
        (json!({"query": "SELECT 1\u{0}"}), "NUL byte", "22021"),
        (
            json!({"queries": [insert, {"query": "SELECT $1::text", "params": ["a\u{0}b"]}]}),
            "parameter $1 of query 2",
            "22021",
        ),
        (
            json!({"query": "SELECT 1", "params": many}),
            "65535",
            "54000",
        ),
    ];
    for (body, needle, code) in cases {
        let reply = daemon.sql(body.to_string(), &[]).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{needle}");
        assert_error_shape(&reply.body);
        assert_eq!(reply.body["code"], code, "{}", reply.body);
        let message = reply.body["message"].as_str().unwrap();
        assert!(message.contains(needle), "{message}");
    }

    let batch = json!({"queries": [insert]}).to_string();
    let single = json!({"query": "SELECT 1"}).to_string();
    for (body, level) in [
        (&batch, HeaderValue::from_static("Whatever")),
        (
            &batch,
            HeaderValue::from_bytes(b"Serializable\xff").unwrap(),
        ),
        (&single, HeaderValue::from_static("serializable")),
    ] {
        let reply = daemon
            .client
            .post(format!("{}/sql", daemon.data))
            .header("Neon-Connection-String", &daemon.connection_string)
            .header("Neon-Batch-Isolation-Level", level.clone())
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(reply.status(), StatusCode::BAD_REQUEST, "{level:?}");
        let reply: Value = reply.json().await.unwrap();
        assert_error_shape(&reply);
        let message = reply["message"].as_str().unwrap();
        assert!(
            message.contains("Neon-Batch-Isolation-Level") && message.contains("RepeatableRead"),
            "{message}"
        );
    }

    assert_eq!(
        cluster.psql("SELECT count(*) FROM ledger").trim(),
        "0",
        "nothing ran"
    );
    assert_eq!(
        daemon
            .metric("pgwarden_errors_total{kind=\"bad_request\"}")
            .await,
        6.0
    );
    assert_eq!(
        daemon
            .metric("pgwarden_errors_total{kind=\"internal\"}")
            .await,
        0.0
    );
}
