//! Everyday events that are not failures of the database must never
//! rebuild the pool: a reconnect costs a warm-up and counts towards the
//! "more than 5 reconnects a day" alert, the very symptom pgwarden exists to
//! remove. A server full of other applications' sessions, clients that give
//! up mid-query, a transaction that runs past its timeout and a pool kept
//! busy past a health-check interval each leave `pgwarden_reconnects_total`
//! at 0, and the next request succeeds.

mod support;

use std::time::Duration;

use futures_util::future::join_all;
use pgwarden::backend::{Connection, Connector};
use reqwest::StatusCode;
use serde_json::json;
use support::Cluster;
use support::daemon::{TestDaemon, config_for};
use support::pg::{superuser, wait_until_none};

fn daemon_config(cluster: &Cluster) -> pgwarden::config::Config {
    pgwarden::config::Config {
        max_connections: 4,
        transaction_timeout_ms: 1000,
        ..config_for(cluster)
    }
}

/// Runs `count` requests of `sql` at once; returns their statuses.
async fn at_once(daemon: &TestDaemon, sql: &str, count: usize) -> Vec<StatusCode> {
    let body = json!({ "query": sql, "params": [] }).to_string();
    let requests = (0..count).map(|_| daemon.sql(body.clone(), &[]));
    join_all(requests)
        .await
        .into_iter()
        .map(|r| r.status)
        .collect()
}

/// Opens sessions as another application would until the server refuses
/// one (`max_connections`), and keeps them.
async fn fill_the_server(cluster: &Cluster) -> Vec<Connection> {
    let connector = Connector::new(superuser(cluster)).unwrap();
    let mut held = Vec::new();
    while let Ok(conn) = connector.connect().await {
        held.push(conn);
        assert!(held.len() < 200, "the server never refused a session");
    }
    held
}

async fn assert_healthy(daemon: &TestDaemon, after: &str) {
    assert_eq!(daemon.reconnects().await, 0.0, "a reconnect after {after}");
    let answer = daemon.query("SELECT 41 + 1", json!([])).await;
    assert_eq!(answer["rows"][0][0], "42", "the next request after {after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everyday_events_never_rebuild_the_pool() {
    let cluster = Cluster::start();
    let daemon = TestDaemon::start(daemon_config(&cluster)).await;
    // Let a health check open its own session first, as it does in production.
    tokio::time::sleep(Duration::from_millis(600)).await;

    // A server at max_connections while pgwarden needs to grow: the requests
    // that cannot get a new session wait for one that is given back.
    let held = fill_the_server(&cluster).await;
    let statuses = at_once(&daemon, "SELECT pg_sleep(0.3)", 6).await;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    let refused = daemon
        .metric("pgwarden_session_refusals_total{reason=\"resources\"}")
        .await;
    assert!(refused >= 1.0, "the refusals are counted: {refused}");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        daemon.reconnects().await,
        0.0,
        "a reconnect on a full server"
    );
    drop(held);
    assert_healthy(&daemon, "a full server").await;

    // Twenty clients that give up half a second into a ten-second query:
    // their statements are cancelled on the server.
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let body = json!({ "query": "SELECT pg_sleep(10)", "params": [] }).to_string();
    let abandoned = (0..20).map(|_| {
        impatient
            .post(format!("{}/sql", daemon.data))
            .header("Neon-Connection-String", &daemon.connection_string)
            .body(body.clone())
            .send()
    });
    let gave_up = join_all(abandoned).await;
    assert!(gave_up.iter().all(|r| r.is_err()), "every client gave up");
    wait_until_none(
        &cluster,
        "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(10)' AND state = 'active'",
        Duration::from_secs(5),
        "the abandoned statements were not cancelled",
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_healthy(&daemon, "clients gave up").await;

    // A transaction that runs past its timeout is cancelled: 57014.
    let batch = json!({ "queries": [{ "query": "SELECT pg_sleep(3)", "params": [] }] });
    let reply = daemon.sql(batch.to_string(), &[]).await;
    assert_eq!(reply.body["code"], "57014", "{}", reply.body);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_healthy(&daemon, "a transaction timeout").await;

    // Every pooled session busy for several health-check intervals.
    let checks_before = daemon
        .metric("pgwarden_health_checks_total{result=\"ok\"}")
        .await;
    let statuses = at_once(&daemon, "SELECT pg_sleep(1.5)", 4).await;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    let checks = daemon
        .metric("pgwarden_health_checks_total{result=\"ok\"}")
        .await
        - checks_before;
    assert!(
        checks >= 2.0,
        "health checks ran while the pool was busy: {checks}"
    );
    assert_eq!(
        daemon
            .metric("pgwarden_health_checks_total{result=\"timeout\"}")
            .await,
        0.0
    );
    assert_healthy(&daemon, "a busy pool").await;
}

/// A client's LISTEN leaves its session listening until the session is
/// reset at its next use; a NOTIFY meanwhile arrives on the idle session.
/// That is a message, not a goodbye, over TLS as over plain TCP.
async fn a_notification_on_an_idle_session_is_not_a_lost_connection(ssl_mode: &str) {
    let cluster = Cluster::start();
    let config = pgwarden::config::Config {
        database_url: format!("{}?sslmode={ssl_mode}", cluster.url("postgres", None)),
        ..config_for(&cluster)
    };
    let daemon = TestDaemon::start(config).await;
    daemon.query("LISTEN pgwarden_channel", json!([])).await;
    for n in 0..3 {
        let notify = format!("NOTIFY pgwarden_channel, 'through pgwarden {n}'");
        daemon.query(&notify, json!([])).await;
    }
    cluster.psql("NOTIFY pgwarden_channel, 'from another application'");
    tokio::time::sleep(Duration::from_millis(600)).await;
    for _ in 0..4 {
        assert_healthy(&daemon, &format!("a NOTIFY over sslmode={ssl_mode}")).await;
    }
    let hits = daemon.metric("pgwarden_stale_client_hits_total").await;
    assert_eq!(hits, 0.0, "no generation was retired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_on_an_idle_plain_session_is_not_a_lost_connection() {
    a_notification_on_an_idle_session_is_not_a_lost_connection("disable").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_on_an_idle_tls_session_is_not_a_lost_connection() {
    a_notification_on_an_idle_session_is_not_a_lost_connection("require").await;
}
