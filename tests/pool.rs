//! The pool hands out only clean, live connections: it discards those whose
//! server died, that were left in a transaction or abandoned mid-request,
//! resets session state between users, and recovers when the server returns.

mod support;

use std::time::Duration;

use pgwarden::backend::{Connector, ErrorKind, Scope, SslMode, Statement};
use pgwarden::pool::{Pool, PoolConfig, PoolError, PoolErrorKind, PoolStatus};
use support::pg::{options, scalar, superuser, wait_until_none, wait_until_sessions_gone};
use support::{Cluster, FaultProxy, ProxyMode};

fn pool(options: pgwarden::backend::ConnectOptions, max: usize) -> Pool {
    let config = PoolConfig {
        max_connections: max,
        min_connections: max.min(2),
        ..PoolConfig::default()
    };
    Pool::new(Connector::new(options).unwrap(), config).unwrap()
}

async fn backend_pid(pool: &Pool) -> String {
    let mut conn = pool.get().await.expect("a connection");
    scalar(&mut conn, "SELECT pg_backend_pid()").await.unwrap()
}

#[tokio::test]
async fn warm_opens_the_minimum_and_status_counts_idle_and_in_use() {
    let cluster = Cluster::start();
    let pool = pool(superuser(&cluster), 4);
    let warm = pool.warm().await.unwrap();
    assert_eq!(warm.len(), 2);
    assert_eq!(
        pool.status(),
        PoolStatus {
            max_size: 4,
            size: 2,
            idle: 0,
            in_use: 2,
            waiting: 0
        }
    );
    drop(warm);
    assert_eq!(pool.status().idle, 2);
    let count =
        cluster.psql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgwarden'");
    assert_eq!(count.trim(), "2");
}

#[tokio::test]
async fn a_connection_whose_server_restarted_is_discarded_and_the_pool_recovers() {
    let cluster = Cluster::start();
    let pool = pool(superuser(&cluster), 2);
    drop(pool.warm().await.unwrap());
    let before = backend_pid(&pool).await;

    cluster.restart_fast();
    let after = backend_pid(&pool).await;
    assert_ne!(before, after, "a dead connection was handed out");
    assert!(pool.status().size <= 2);
}

#[tokio::test]
async fn terminated_idle_connections_are_never_handed_out() {
    let cluster = Cluster::start();
    let pool = pool(superuser(&cluster), 2);
    drop(pool.warm().await.unwrap());
    cluster.terminate_backends();
    wait_until_sessions_gone(&cluster);
    for _ in 0..4 {
        let mut conn = pool.get().await.unwrap();
        let result = conn.query(&Statement::new("SELECT 1")).await;
        assert!(
            result.is_ok(),
            "a terminated connection was reused: {result:?}"
        );
    }
}

#[tokio::test]
async fn a_connection_left_in_a_transaction_is_discarded() {
    let cluster = Cluster::start();
    let pool = pool(superuser(&cluster), 1);
    let first = {
        let mut conn = pool.get().await.unwrap();
        conn.simple_query("BEGIN").await.unwrap();
        scalar(&mut conn, "SELECT pg_backend_pid()").await.unwrap()
    };
    assert_ne!(backend_pid(&pool).await, first);
}

/// Uses a connection of `pool` to set `statement_timeout` to 1234 ms (and
/// run `also`, through the extended protocol), then returns it; gives its
/// backend pid.
async fn leave_session_state(pool: &Pool, also: Option<&str>) -> String {
    let mut conn = pool.get().await.unwrap();
    conn.simple_query("SET statement_timeout = '1234ms'")
        .await
        .unwrap();
    if let Some(sql) = also {
        conn.query(&Statement::new(sql)).await.unwrap();
    }
    scalar(&mut conn, "SELECT pg_backend_pid()").await.unwrap()
}

#[tokio::test]
async fn session_state_is_reset_between_users_of_the_same_connection() {
    let cluster = Cluster::start();
    let pool = pool(superuser(&cluster), 1);
    let pid = leave_session_state(&pool, Some("CREATE TEMP TABLE scratch (x int)")).await;
    let mut conn = pool.get().await.unwrap();
    // The first request after reuse carries the reset in its own pipeline.
    let timeout = conn
        .query(&Statement::new(
            "SELECT current_setting('statement_timeout')",
        ))
        .await
        .unwrap();
    assert_eq!(timeout.rows[0].get(0).as_deref(), Some("0"));
    assert_eq!(
        scalar(&mut conn, "SELECT pg_backend_pid()").await.unwrap(),
        pid
    );
    let temp = scalar(
        &mut conn,
        "SELECT count(*) FROM pg_class WHERE relname = 'scratch'",
    )
    .await;
    assert_eq!(temp.as_deref(), Some("0"));
}

/// Leaves session state that `DISCARD ALL` cannot clear in time: a
/// thousand temp tables to drop, a 1 ms statement timeout, and a search
/// path that must not reach the next user.
async fn leave_state_that_resists_reset(pool: &Pool) -> String {
    let mut conn = pool.get().await.unwrap();
    conn.simple_query(
        "CREATE SCHEMA IF NOT EXISTS leaked;
         DO $$ BEGIN FOR i IN 1..1000 LOOP EXECUTE format('CREATE TEMP TABLE t%s (x int)', i); END LOOP; END $$;
         SET search_path = leaked, public;
         SET statement_timeout = '1ms'",
    )
    .await
    .unwrap();
    conn.process_id().unwrap().to_string()
}

#[tokio::test]
async fn a_refused_reset_fails_closed_and_retires_the_session() {
    let cluster = Cluster::start();
    let pool = pool(superuser(&cluster), 1);
    let first = leave_state_that_resists_reset(&pool).await;

    let mut conn = pool.get().await.unwrap();
    let refused = conn
        .query(&Statement::new("SELECT current_setting('search_path')"))
        .await
        .unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::ResetRefused, "{refused}");
    assert!(conn.is_retired());
    drop(conn);

    let mut next = pool.get().await.unwrap();
    let path = scalar(&mut next, "SELECT current_setting('search_path')").await;
    assert_eq!(
        path.as_deref(),
        Some("\"$user\", public"),
        "a fresh session"
    );
    assert_ne!(next.process_id().unwrap().to_string(), first);
}

#[tokio::test]
async fn a_health_check_probe_leaves_an_owed_reset_to_the_next_user() {
    let cluster = Cluster::start();
    let pool = pool(superuser(&cluster), 1);
    leave_state_that_resists_reset(&pool).await;
    let mut conn = pool.get().await.unwrap();
    // The probe runs as the session is: it answers, or, on a busy machine,
    // meets the leftover 1 ms statement timeout; either way it did not pay
    // the reset, which the server would have refused (ResetRefused).
    match conn.probe_server().await {
        Ok(probe) => assert!(!probe.in_recovery, "the probe answers"),
        Err(error) => assert_eq!(
            error.db_error().map(|e| e.code.as_str()),
            Some("57014"),
            "{error}"
        ),
    }
    let refused = conn.query(&Statement::new("SELECT 1")).await.unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::ResetRefused, "{refused}");
    assert!(!refused.is_connection_level(), "the server is fine");
}

#[tokio::test]
async fn a_statement_that_cannot_be_sent_sends_nothing_and_the_owed_reset_still_happens() {
    let cluster = Cluster::start();
    let pool = pool(superuser(&cluster), 1);
    let pid = leave_session_state(&pool, None).await;
    let mut conn = pool.get().await.unwrap();
    let refused = conn
        .query(&Statement::new("SELECT 'nul \0 inside'"))
        .await
        .unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::Config, "{refused}");
    let refused = conn
        .simple_query("SELECT 'nul \0 inside'")
        .await
        .unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::Config, "{refused}");

    assert_eq!(
        scalar(&mut conn, "SELECT pg_backend_pid()").await.unwrap(),
        pid,
        "the session is still usable"
    );
    assert_eq!(
        scalar(&mut conn, "SHOW statement_timeout").await.as_deref(),
        Some("0"),
        "the reset owed by the previous user ran first"
    );
}

/// `sessions` and `sessions_abandoned` of database `name`: a session that
/// ends without a Terminate message counts as abandoned.
fn session_counts(cluster: &Cluster, name: &str) -> (u64, u64) {
    let row = cluster.psql_rows(&format!(
        "SELECT sessions, sessions_abandoned FROM pg_stat_database WHERE datname = '{name}'"
    ));
    let number = |i: usize| row[0][i].as_deref().unwrap().parse().unwrap();
    (number(0), number(1))
}

/// Lets a pool open, use, discard and close sessions over `ssl_mode`, and
/// checks that the server saw every one of them end with a Terminate.
async fn sessions_end_politely(ssl_mode: SslMode) {
    let cluster = Cluster::start();
    cluster.psql("CREATE DATABASE pool_sessions");
    let mut options = superuser(&cluster);
    options.database = "pool_sessions".into();
    options.ssl_mode = ssl_mode;
    let pool = pool(options, 3);
    drop(pool.warm().await.unwrap());
    let mut conn = pool.get().await.unwrap();
    scalar(&mut conn, "SELECT 1").await.unwrap();
    drop(Pool::discard(conn));
    pool.close();
    drop(pool);

    // Wait for the sessions to end, then give their statistics time to land.
    wait_until_none(
        &cluster,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = 'pool_sessions'",
        Duration::from_secs(20),
        "the sessions never ended",
    );
    for _ in 0..10 {
        let (sessions, abandoned) = session_counts(&cluster, "pool_sessions");
        assert_eq!(sessions, 2, "the pool opened two sessions");
        assert_eq!(abandoned, 0, "sessions ended without a Terminate message");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test]
async fn sessions_the_pool_lets_go_of_end_politely() {
    sessions_end_politely(SslMode::Disable).await;
}

#[tokio::test]
async fn tls_sessions_the_pool_lets_go_of_end_politely_too() {
    sessions_end_politely(SslMode::Require).await;
}

#[tokio::test]
async fn a_connection_abandoned_mid_request_is_discarded() {
    let cluster = Cluster::start();
    let pool = pool(superuser(&cluster), 1);
    let pid = {
        let mut conn = pool.get().await.unwrap();
        let pid = scalar(&mut conn, "SELECT pg_backend_pid()").await.unwrap();
        let statement = Statement::new("SELECT pg_sleep(3)");
        let slow = conn.query(&statement);
        assert!(
            tokio::time::timeout(Duration::from_millis(100), slow)
                .await
                .is_err()
        );
        pid
    };
    assert_ne!(backend_pid(&pool).await, pid);
}

#[tokio::test]
async fn a_server_that_is_down_fails_fast_with_a_connection_level_error_and_is_picked_up_again() {
    let cluster = Cluster::start();
    let pool = pool(superuser(&cluster), 2);
    cluster.stop();
    let error = pool.get().await.unwrap_err();
    assert_eq!(error.scope(), Scope::Unreachable, "{error}");
    assert_eq!(error.kind(), PoolErrorKind::Backend(ErrorKind::Connect));
    cluster.start_again();
    assert!(pool.get().await.is_ok());
}

#[tokio::test]
async fn a_blackholed_server_hits_the_create_timeout() {
    let cluster = Cluster::start();
    let proxy = FaultProxy::start(format!("127.0.0.1:{}", cluster.port()).parse().unwrap()).await;
    proxy.set_mode(ProxyMode::Blackhole);
    let mut opts = options(&cluster, "postgres", None);
    opts.port = proxy.port();
    let config = PoolConfig {
        create_timeout: Duration::from_millis(500),
        ..PoolConfig::default()
    };
    let pool = Pool::new(Connector::new(opts).unwrap(), config).unwrap();
    let error = pool.get().await.unwrap_err();
    assert!(matches!(error, PoolError::CreateTimeout(_)), "{error}");
    assert_eq!(error.scope(), Scope::Unreachable);
}

#[tokio::test]
async fn waiting_for_a_busy_pool_is_bounded() {
    let cluster = Cluster::start();
    let config = PoolConfig {
        max_connections: 1,
        wait_timeout: Duration::from_millis(200),
        ..PoolConfig::default()
    };
    let pool = Pool::new(Connector::new(superuser(&cluster)).unwrap(), config).unwrap();
    let _held = pool.get().await.unwrap();
    let error = pool.get().await.unwrap_err();
    assert_eq!(error.kind(), PoolErrorKind::WaitTimeout);
    assert_eq!(
        error.scope(),
        Scope::Statement,
        "a busy pool says nothing about the server"
    );
}

#[tokio::test]
async fn a_closed_pool_hands_out_nothing_and_drops_returned_connections() {
    let cluster = Cluster::start();
    let pool = pool(superuser(&cluster), 2);
    let lent = pool.get().await.unwrap();
    pool.close();
    assert_eq!(pool.get().await.unwrap_err().kind(), PoolErrorKind::Closed);
    drop(lent);
    assert_eq!(pool.status().size, 0);
}

#[tokio::test]
async fn finding_an_idle_connection_closed_by_the_server_calls_the_loss_hook() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let cluster = Cluster::start();
    let losses = Arc::new(AtomicUsize::new(0));
    let counter = losses.clone();
    let hook = pgwarden::pool::LossHook::new(move || {
        counter.fetch_add(1, Ordering::SeqCst);
    });
    let connector = Connector::new(superuser(&cluster)).unwrap();
    let pool = Pool::with_loss_hook(connector, PoolConfig::default(), Some(hook)).unwrap();
    drop(pool.warm().await.unwrap());
    assert_eq!(losses.load(Ordering::SeqCst), 0);

    cluster.terminate_backends();
    wait_until_sessions_gone(&cluster);
    let mut conn = pool.get().await.unwrap();
    assert!(conn.query(&Statement::new("SELECT 1")).await.is_ok());
    assert!(
        losses.load(Ordering::SeqCst) >= 1,
        "the dead idle connections were reported"
    );
}

/// A pool whose loss hook counts its calls.
fn pool_counting_losses(
    cluster: &Cluster,
) -> (Pool, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let losses = Arc::new(AtomicUsize::new(0));
    let counter = losses.clone();
    let hook = pgwarden::pool::LossHook::new(move || {
        counter.fetch_add(1, Ordering::SeqCst);
    });
    let connector = Connector::new(superuser(cluster)).unwrap();
    let config = PoolConfig {
        max_connections: 1,
        ..PoolConfig::default()
    };
    let pool = Pool::with_loss_hook(connector, config, Some(hook)).unwrap();
    (pool, losses)
}

#[tokio::test]
async fn sessions_that_failed_alone_are_discarded_without_reporting_a_loss() {
    use std::sync::atomic::Ordering;

    let cluster = Cluster::start();
    let (pool, losses) = pool_counting_losses(&cluster);

    // A request abandoned mid-statement (a client that gave up).
    {
        let mut conn = pool.get().await.unwrap();
        let slow = Statement::new("SELECT pg_sleep(2)");
        let gave_up = tokio::time::timeout(Duration::from_millis(100), conn.query(&slow)).await;
        assert!(gave_up.is_err());
    }
    assert_eq!(
        scalar(&mut pool.get().await.unwrap(), "SELECT 1")
            .await
            .unwrap(),
        "1"
    );

    // A session the server ended for idling (idle_session_timeout, 57P05).
    {
        let mut conn = pool.get().await.unwrap();
        conn.simple_query("SET idle_session_timeout = '100ms'")
            .await
            .unwrap();
        // Keep the setting: a reset would undo it before the timeout fires.
        conn.reset_before_next_use();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        scalar(&mut pool.get().await.unwrap(), "SELECT 1")
            .await
            .unwrap(),
        "1"
    );

    assert_eq!(
        losses.load(Ordering::SeqCst),
        0,
        "neither is a sign that the server failed"
    );
}
