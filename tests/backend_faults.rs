//! Connections that die under a request report a connection-level kind,
//! never an SQL error; a cancel request stops a running statement.

mod support;

use std::sync::Arc;
use std::time::Duration;

use pgwarden::backend::{BackendError, Connection, ErrorKind, Statement};
use support::pg::{connect, scalar, superuser, wait_until_running};
use support::{Cluster, FaultProxy};

const SLEEP: &str = "SELECT pg_sleep(30)";

/// Starts `SELECT pg_sleep(30)` on `conn` and hands back the connection with the outcome.
fn sleep_on(
    mut conn: Connection,
) -> tokio::task::JoinHandle<(Connection, Result<(), BackendError>)> {
    tokio::spawn(async move {
        let result = conn.query(&Statement::new(SLEEP)).await.map(drop);
        (conn, result)
    })
}

fn assert_connection_level(error: &BackendError) {
    assert!(error.is_connection_level(), "{error} ({})", error.kind());
    assert_ne!(error.kind(), ErrorKind::Sql);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_backend_reports_fatal_and_the_connection_refuses_reuse() {
    let cluster = Arc::new(Cluster::start());
    let running = sleep_on(connect(superuser(&cluster)).await);
    let kit = cluster.clone();
    tokio::task::spawn_blocking(move || {
        wait_until_running(&kit, "SELECT pg_sleep(30)%");
        assert!(kit.terminate_backends() >= 1);
    })
    .await
    .unwrap();

    let (mut conn, result) = running.await.unwrap();
    let error = result.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Fatal, "{error}");
    assert_eq!(error.db_error().unwrap().code, "57P01");
    assert!(conn.is_broken());
    let reuse = conn.query(&Statement::new("SELECT 1")).await.unwrap_err();
    assert_eq!(reuse.kind(), ErrorKind::Broken);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_crash_mid_query_is_a_connection_failure() {
    let cluster = Arc::new(Cluster::start());
    let running = sleep_on(connect(superuser(&cluster)).await);
    let kit = cluster.clone();
    tokio::task::spawn_blocking(move || {
        wait_until_running(&kit, "SELECT pg_sleep(30)%");
        kit.crash();
    })
    .await
    .unwrap();
    let (conn, result) = running.await.unwrap();
    assert_connection_level(&result.unwrap_err());
    assert!(conn.is_broken());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_cut_mid_query_is_a_connection_failure() {
    let cluster = Arc::new(Cluster::start());
    let proxy = FaultProxy::start(format!("127.0.0.1:{}", cluster.port()).parse().unwrap()).await;
    let mut options = superuser(&cluster);
    options.port = proxy.port();
    let running = sleep_on(connect(options).await);
    let kit = cluster.clone();
    tokio::task::spawn_blocking(move || wait_until_running(&kit, "SELECT pg_sleep(30)%"))
        .await
        .unwrap();
    assert_eq!(proxy.cut_all(), 1);
    let (_, result) = running.await.unwrap();
    let error = result.unwrap_err();
    assert_connection_level(&error);
    assert!(
        matches!(error.kind(), ErrorKind::Closed | ErrorKind::Io),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_request_stops_pg_sleep_and_the_connection_stays_usable() {
    let cluster = Arc::new(Cluster::start());
    let conn = connect(superuser(&cluster)).await;
    let token = conn.cancel_token().expect("the server sent BackendKeyData");
    let started = std::time::Instant::now();
    let running = sleep_on(conn);
    let kit = cluster.clone();
    tokio::task::spawn_blocking(move || wait_until_running(&kit, "SELECT pg_sleep(30)%"))
        .await
        .unwrap();
    token.cancel().await.unwrap();

    let (mut conn, result) = running.await.unwrap();
    let error = result.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Sql, "{error}");
    assert_eq!(error.db_error().unwrap().code, "57014");
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "the sleep ran to its end"
    );
    assert_eq!(
        scalar(&mut conn, "SELECT 'alive'").await.as_deref(),
        Some("alive")
    );
}

#[tokio::test]
async fn an_abandoned_request_leaves_the_connection_marked_broken() {
    let cluster = Cluster::start();
    let mut conn = connect(superuser(&cluster)).await;
    let abandoned = tokio::time::timeout(
        Duration::from_millis(200),
        conn.query(&Statement::new("SELECT pg_sleep(5)")),
    )
    .await;
    assert!(abandoned.is_err(), "the timeout fired");
    assert!(conn.is_broken());
    let error = conn.query(&Statement::new("SELECT 1")).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Broken);
}

#[tokio::test]
async fn an_idle_connection_notices_that_the_server_terminated_it() {
    let cluster = Cluster::start();
    let mut conn = connect(superuser(&cluster)).await;
    assert!(conn.check_idle().is_ok());
    cluster.terminate_backends();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while conn.check_idle().is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "termination never noticed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(conn.is_broken());
}

#[tokio::test]
async fn an_idle_connection_keeps_a_notification_and_notices_a_warning_goodbye() {
    let cluster = Cluster::start();
    // Connected first, so it is the backend the kit kills below (the
    // lowest pid of the idle ones): the listener only hears the warning.
    let mut notifier = connect(superuser(&cluster)).await;
    let mut listener = connect(superuser(&cluster)).await;
    listener
        .query(&Statement::new("LISTEN jobs"))
        .await
        .unwrap();
    notifier
        .query(&Statement::new("NOTIFY jobs, 'one'"))
        .await
        .unwrap();
    // A notification arrives on the idle session: it is no goodbye.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(listener.check_idle().is_ok());
    assert_eq!(
        scalar(&mut listener, "SELECT 'still here'")
            .await
            .as_deref(),
        Some("still here")
    );

    // Another backend killed: the server ends every session with a
    // WARNING (57P02) and then closes it; the idle check sees the close.
    // The kit returns once the server recovered, so both have arrived: one
    // look must see the close behind the warning (the pool looks once
    // before lending a session).
    cluster.kill_one_backend();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        listener.check_idle().is_err(),
        "the close behind the warning was missed"
    );
    assert!(listener.is_broken());
}
