//! The incident that started pgwarden, replayed against a real server:
//! request A holds a connection, a health check fails, a reconnect with a
//! slow (2 s) warm-up starts, and A then runs its UPDATE. It must succeed on
//! the new generation, counted as one stale-client hit.

mod support;

use std::time::Duration;

use pgwarden::backend::Statement;
use support::pg::superuser;
use support::stack::{Stack, quick_settings};
use support::{Cluster, FaultProxy, ProxyMode};

const BUDGET: Duration = Duration::from_secs(8);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_holding_an_old_connection_succeeds_on_the_new_generation() {
    let cluster = Cluster::start();
    cluster.psql("CREATE TABLE purchase_order (id int PRIMARY KEY, n int); INSERT INTO purchase_order VALUES (1, 0)");
    let proxy = FaultProxy::start(format!("127.0.0.1:{}", cluster.port()).parse().unwrap()).await;
    let mut options = superuser(&cluster);
    options.port = proxy.port();
    let mut settings = quick_settings();
    settings.warmup_queries = vec![
        "SELECT pg_sleep(2)".into(),
        "SELECT 1 FROM purchase_order LIMIT 1".into(),
    ];
    let stack = Stack::start(options, settings, BUDGET);
    stack.ready(1).await;

    // Request A gets its connection while all is well.
    let held = stack.guard.admit().await.unwrap();
    assert_eq!(held.generation().id(), 1);

    // The database becomes unreachable: the next health check fails.
    proxy.set_mode(ProxyMode::Refuse);
    proxy.cut_all();
    stack.retired(1).await;
    proxy.set_mode(ProxyMode::PassThrough);

    // Request A now runs its UPDATE on the connection it still holds.
    let update = Statement::new("UPDATE purchase_order SET n = n + 1 WHERE id = 1");
    let result = stack.executor.query_with(held, &update).await.unwrap();
    assert_eq!(result.command_tag, "UPDATE 1");
    assert_eq!(
        cluster.psql("SELECT n FROM purchase_order").trim(),
        "1",
        "applied exactly once"
    );

    assert_eq!(stack.lifecycle.snapshot().generation.unwrap().id(), 2);
    assert_eq!(stack.metric("pgwarden_stale_client_hits_total", &[]), 1.0);
    assert_eq!(
        stack.metric(
            "pgwarden_guard_wait_seconds",
            &[("cause", "stale"), ("outcome", "admitted")]
        ),
        1.0
    );
    assert_eq!(
        stack.metric("pgwarden_reconnects_total", &[("reason", "health_check")]),
        1.0
    );
    assert_eq!(stack.metric("pgwarden_reconnects_total", &[]), 1.0);
    let warmup = stack.lifecycle.status().last_warmup.unwrap();
    assert!(warmup.queries >= Duration::from_secs(2), "{warmup:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_arriving_during_the_reconnect_waits_and_succeeds() {
    let cluster = Cluster::start();
    cluster.psql("CREATE TABLE purchase_order (id int PRIMARY KEY, n int); INSERT INTO purchase_order VALUES (1, 0)");
    let mut settings = quick_settings();
    settings.warmup_queries = vec!["SELECT pg_sleep(1)".into()];
    let stack = Stack::start(superuser(&cluster), settings, BUDGET);
    stack.ready(1).await;

    stack.lifecycle.reconnect();
    stack.retired(1).await;
    let read = Statement::new("SELECT n FROM purchase_order WHERE id = 1");
    let result = stack.executor.query(&read).await.unwrap();
    assert_eq!(result.rows_as_strings(), [[Some("0".to_owned())]]);
    assert_eq!(stack.metric("pgwarden_stale_client_hits_total", &[]), 0.0);
    let waited = stack.metric("pgwarden_guard_wait_seconds", &[("outcome", "admitted")]);
    assert_eq!(waited, 1.0);
    assert_eq!(
        stack.metric("pgwarden_reconnects_total", &[("reason", "admin")]),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn normal_operation_never_waits() {
    let cluster = Cluster::start();
    let stack = Stack::start(superuser(&cluster), quick_settings(), BUDGET);
    stack.ready(1).await;
    for _ in 0..20 {
        stack
            .executor
            .query(&Statement::new("SELECT 1"))
            .await
            .unwrap();
    }
    assert_eq!(stack.metric("pgwarden_guard_wait_seconds", &[]), 0.0);
    assert_eq!(stack.metric("pgwarden_reconnects_total", &[]), 0.0);
}
