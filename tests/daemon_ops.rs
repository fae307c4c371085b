//! The daemon as operators see it: the ops endpoints, admin operations,
//! start-up with the database down, guard timeouts as 503, abandoned
//! requests cancelled on the server, and a graceful shutdown.

mod support;

use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;
use support::Cluster;
use support::daemon::{TestDaemon, config_for};

#[tokio::test]
async fn health_status_and_metrics_tell_the_truth_without_secrets() {
    let cluster = Cluster::start();
    let mut config = config_for(&cluster);
    config.database_url = format!(
        "{}?sslmode=disable",
        cluster.url(
            support::users::SCRAM_USER,
            Some(support::users::SCRAM_PASSWORD)
        )
    );
    config.admin_token = Some("admin-token-value".into());
    let mut daemon = TestDaemon::start(config).await;
    daemon.connection_string = format!(
        "postgresql://{}:{}@x/postgres",
        support::users::SCRAM_USER,
        support::users::SCRAM_PASSWORD
    );

    assert_eq!(daemon.ops_get("/livez").await.status, StatusCode::OK);
    assert_eq!(daemon.ops_get("/readyz").await.status, StatusCode::OK);
    let status = daemon.ops_get("/status").await;
    assert_eq!(status.body["state"], "ready");
    assert_eq!(status.body["generation"], 1);
    assert_eq!(status.body["pool"]["max"], 10);
    assert!(status.body["last_warmup"]["total_ms"].is_number());
    let text = status.body.to_string();
    for secret in [support::users::SCRAM_PASSWORD, "admin-token-value"] {
        assert!(!text.contains(secret), "/status leaks a secret: {text}");
    }
    let decisions = &status.body["replay_decisions"];
    for rule in ["never_sent", "before_commit", "in_progress", "unknown"] {
        assert_eq!(decisions[rule], 0, "{decisions}");
    }
    assert_snake_case_keys(&status.body, "/status");

    daemon.query("SELECT 1", json!([])).await;
    let metrics = daemon.metrics().await;
    for series in [
        "pgwarden_build_info{version=",
        "pgwarden_pool_ready 1",
        "pgwarden_pool_generation 1",
        "pgwarden_pool_max_connections 10",
        "pgwarden_requests_duration_seconds_count{api=\"http\",kind=\"query\",outcome=\"ok\"} 1",
        "pgwarden_errors_total{kind=\"internal\"} 0",
        "process_resident_memory_bytes",
    ] {
        assert!(metrics.contains(series), "missing {series}");
    }
    assert!(!metrics.contains(support::users::SCRAM_PASSWORD));
}

/// Every object key in `value`, at any depth, is snake_case.
fn assert_snake_case_keys(value: &serde_json::Value, path: &str) {
    match value {
        serde_json::Value::Object(object) => {
            for (key, inner) in object {
                let snake = !key.is_empty()
                    && key
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
                assert!(snake, "{path}.{key} is not snake_case");
                assert_snake_case_keys(inner, &format!("{path}.{key}"));
            }
        }
        serde_json::Value::Array(items) => {
            for item in items {
                assert_snake_case_keys(item, path);
            }
        }
        _ => {}
    }
}

#[tokio::test]
async fn admin_operations_need_the_token_when_one_is_configured() {
    let cluster = Cluster::start();
    let mut config = config_for(&cluster);
    config.admin_token = Some("t0ken".into());
    let daemon = TestDaemon::start(config).await;
    let url = format!("{}/admin/reconnect", daemon.ops);

    let anonymous = daemon.client.post(&url).send().await.unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    let wrong = daemon
        .client
        .post(&url)
        .bearer_auth("guess")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let right = daemon
        .client
        .post(&url)
        .bearer_auth("t0ken")
        .send()
        .await
        .unwrap();
    assert_eq!(right.status(), StatusCode::ACCEPTED);

    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while daemon.ops_get("/status").await.body["generation"] != 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no reconnect happened"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        daemon
            .metric("pgwarden_reconnects_total{reason=\"admin\"}")
            .await,
        1.0
    );

    let pause = daemon
        .client
        .post(format!("{}/admin/pause", daemon.ops))
        .bearer_auth("t0ken")
        .send()
        .await
        .unwrap();
    assert_eq!(pause.status(), StatusCode::ACCEPTED);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while daemon.ops_get("/readyz").await.status != StatusCode::SERVICE_UNAVAILABLE {
        assert!(
            tokio::time::Instant::now() < deadline,
            "pause never showed in /readyz"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let resume = daemon
        .client
        .post(format!("{}/admin/resume", daemon.ops))
        .bearer_auth("t0ken")
        .send()
        .await
        .unwrap();
    assert_eq!(resume.status(), StatusCode::ACCEPTED);
    let daemon = daemon.ready().await;
    daemon.query("SELECT 1", json!([])).await;
}

#[tokio::test]
async fn without_a_token_admin_operations_are_open_to_loopback_peers() {
    let cluster = Cluster::start();
    let daemon = TestDaemon::start(config_for(&cluster)).await;
    let reply = daemon
        .client
        .post(format!("{}/admin/reconnect", daemon.ops))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), StatusCode::ACCEPTED);
    let unknown = daemon
        .client
        .post(format!("{}/admin/explode", daemon.ops))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starting_with_the_database_down_serves_503s_then_connects_when_it_comes_up() {
    let cluster = Arc::new(Cluster::start());
    cluster.stop();
    let mut config = config_for(&cluster);
    config.guard_timeout_ms = 500;
    let daemon = TestDaemon::start_unready(config).await;
    assert_eq!(daemon.ops_get("/livez").await.status, StatusCode::OK);
    assert_eq!(
        daemon.ops_get("/readyz").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(daemon.metric("pgwarden_pool_ready").await, 0.0);

    let reply = daemon.sql(r#"{"query":"SELECT 1"}"#, &[]).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.headers["retry-after"], "1");
    assert_eq!(reply.body["code"], "57P03");
    assert_eq!(
        daemon
            .metric("pgwarden_errors_total{kind=\"guard_timeout\"}")
            .await,
        1.0
    );

    let kit = cluster.clone();
    tokio::task::spawn_blocking(move || kit.start_again())
        .await
        .unwrap();
    let daemon = daemon.ready().await;
    daemon.query("SELECT 1", json!([])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_has_its_query_cancelled_on_the_server() {
    let cluster = Arc::new(Cluster::start());
    let daemon = TestDaemon::start(config_for(&cluster)).await;
    let impatient = daemon
        .client
        .post(format!("{}/sql", daemon.data))
        .header("Neon-Connection-String", &daemon.connection_string)
        .body(r#"{"query":"SELECT pg_sleep(30)"}"#)
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(impatient.is_err(), "the client gave up");
    let running = "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(30)%' AND state = 'active' AND pid <> pg_backend_pid()";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while cluster.psql(running).trim() != "0" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the abandoned query still runs"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    daemon.query("SELECT 1", json!([])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_requests_in_flight_finish() {
    let cluster = Cluster::start();
    let mut daemon = TestDaemon::start(config_for(&cluster)).await;
    let client = daemon.client.clone();
    let url = format!("{}/sql", daemon.data);
    let connection_string = daemon.connection_string.clone();
    let in_flight = tokio::spawn(async move {
        client
            .post(url)
            .header("Neon-Connection-String", connection_string)
            .body(r#"{"query":"SELECT pg_sleep(1), 'done'"}"#)
            .send()
            .await
    });
    let running = "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(1)%' AND state = 'active' AND pid <> pg_backend_pid()";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while cluster.psql(running).trim() == "0" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the request never reached the server"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(daemon.shutdown().await, "drained within the grace period");
    let response = in_flight
        .await
        .unwrap()
        .expect("the in-flight request was answered");
    assert_eq!(response.status(), StatusCode::OK);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["rows"][0]["?column?"], "done");
}
