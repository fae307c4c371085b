//! `role = "any"` in front of a hot standby, the way read replicas are
//! served: reads and read-only batches run (a read-only batch skips the
//! identify step, whose `txid_current()` a standby refuses), a write is
//! answered with the server's refusal of the write itself (25006, "cannot
//! execute INSERT in a read-only transaction") as any SQL error is, and
//! none of it is taken for a database failure.

mod support;

use reqwest::StatusCode;
use serde_json::{Value, json};
use support::Cluster;
use support::daemon::{TestDaemon, config_for};

/// The daemon in front of `standby`, accepting a server in recovery.
async fn daemon_on_standby(standby: &Cluster) -> TestDaemon {
    let config = pgwarden::config::Config {
        role: "any".into(),
        ..config_for(standby)
    };
    TestDaemon::start(config).await
}

/// A batch of `queries` (no parameters), with `headers`.
async fn batch(
    daemon: &TestDaemon,
    queries: &[&str],
    headers: &[(&str, &str)],
) -> (StatusCode, Value) {
    let queries: Vec<Value> = queries
        .iter()
        .map(|q| json!({ "query": q, "params": [] }))
        .collect();
    let body = json!({ "queries": queries }).to_string();
    let mut headers = headers.to_vec();
    headers.push(("Neon-Array-Mode", "true"));
    let reply = daemon.sql(body, &headers).await;
    (reply.status, reply.body)
}

/// Asserts that `body` is the JSON error of a read-only transaction.
fn assert_read_only_error(status: StatusCode, body: &Value, what: &str) {
    assert_eq!(status, StatusCode::BAD_REQUEST, "{what}: {body}");
    assert_eq!(body["code"], "25006", "{what}: {body}");
    // The refusal of the client's own statement, not of a step of pgwarden's.
    let message = body["message"].as_str().unwrap_or_default();
    assert!(message.contains("INSERT"), "{what}: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_role_any_a_standby_serves_reads_and_read_only_batches_and_refuses_writes_plainly() {
    let primary = Cluster::start();
    primary.psql("CREATE TABLE replicated (x int); INSERT INTO replicated VALUES (7), (35)");
    let standby = primary.start_standby();
    let daemon = daemon_on_standby(&standby).await;

    let read = daemon
        .query("SELECT sum(x) FROM replicated", json!([]))
        .await;
    assert_eq!(read["rows"][0][0], "42");
    let in_recovery = daemon.query("SELECT pg_is_in_recovery()", json!([])).await;
    assert_eq!(
        in_recovery["rows"][0][0], "t",
        "the daemon is in front of the standby"
    );

    let reads = [
        "SELECT count(*) FROM replicated",
        "SELECT max(x) FROM replicated",
    ];
    let (status, body) = batch(&daemon, &reads, &[("Neon-Batch-Read-Only", "true")]).await;
    assert_eq!(status, StatusCode::OK, "read-only batch: {body}");
    assert_eq!(body["results"][0]["rows"][0][0], "2");
    assert_eq!(body["results"][1]["rows"][0][0], "35");

    let insert = json!({ "query": "INSERT INTO replicated VALUES (8)", "params": [] });
    let reply = daemon.sql(insert.to_string(), &[]).await;
    assert_read_only_error(reply.status, &reply.body, "a write");
    let (status, body) = batch(&daemon, &["INSERT INTO replicated VALUES (9)"], &[]).await;
    assert_read_only_error(status, &body, "a write batch");

    assert_eq!(
        daemon.reconnects().await,
        0.0,
        "a standby's refusal is not a failure"
    );
    let after = daemon
        .query("SELECT count(*) FROM replicated", json!([]))
        .await;
    assert_eq!(
        after["rows"][0][0], "2",
        "nothing was written, reads still run"
    );
}
