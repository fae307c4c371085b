//! One server session ended by an operator (`pg_terminate_backend`) is an
//! everyday event, not a failure of the database. The session says goodbye
//! with the same SQLSTATE (57P01) a shutting-down server sends to every
//! session, so pgwarden checks the server and the pool's other sessions
//! before it decides: the terminated session is discarded, the pool is not
//! rebuilt (`pgwarden_reconnects_total` stays 0), and a request that was
//! running on it is replayed or resolved on another session of the same
//! generation, well within its budget. Terminating every session at once
//! is a different matter and still costs exactly one reconnect.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::Cluster;
use support::daemon::{TestDaemon, config_for};
use support::pg::wait_for_session;

/// What a request broken by the termination may take at most: a replay
/// waits a few milliseconds for the verdict, then runs again.
const ANSWERED_WITHIN: Duration = Duration::from_secs(10);

/// The daemon in front of `cluster`, once a health check has opened the
/// session it keeps, as it has in production.
async fn daemon_for(cluster: &Cluster) -> TestDaemon {
    let daemon = TestDaemon::start(config_for(cluster)).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    daemon
}

/// Ends one backend as an operator does, and waits until it is gone.
fn terminate(cluster: &Cluster, pid: i32) {
    let done = cluster.psql(&format!("SELECT pg_terminate_backend({pid})"));
    assert_eq!(done.trim(), "t", "backend {pid} was terminated");
    support::pg::wait_until_none(
        cluster,
        &format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}"),
        Duration::from_secs(10),
        "the terminated backend never exited",
    );
}

/// The server process that served a request, as pgwarden's pool lent it.
async fn pooled_backend(daemon: &TestDaemon) -> i32 {
    let answer = daemon.query("SELECT pg_backend_pid()", json!([])).await;
    first_value(&answer).parse().unwrap()
}

fn first_value(answer: &Value) -> String {
    answer["rows"][0][0]
        .as_str()
        .unwrap_or_else(|| panic!("one value: {answer}"))
        .to_owned()
}

/// Runs `sql` over HTTP and terminates its session once the server runs
/// `running` on it; returns the answer and how long it took.
async fn under_termination(
    daemon: &TestDaemon,
    cluster: &Arc<Cluster>,
    sql: &str,
    running: &'static str,
) -> (Value, Duration) {
    let kit = cluster.clone();
    let killer = tokio::task::spawn_blocking(move || {
        let pid = wait_for_session(&kit, "active", running);
        terminate(&kit, pid);
    });
    let started = Instant::now();
    let answer = tokio::time::timeout(ANSWERED_WITHIN, daemon.query(sql, json!([])))
        .await
        .expect("the request was answered within its bound");
    killer.await.unwrap();
    (answer, started.elapsed())
}

async fn assert_pool_kept(daemon: &TestDaemon, after: &str) {
    // The check runs some milliseconds after the loss: give it ample time.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(daemon.reconnects().await, 0.0, "a reconnect after {after}");
    assert_eq!(
        daemon.metric("pgwarden_pool_generation").await,
        1.0,
        "the same generation serves after {after}"
    );
    let answer = daemon.query("SELECT 41 + 1", json!([])).await;
    assert_eq!(first_value(&answer), "42", "the next request after {after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_pooled_session_terminated_by_an_operator_costs_no_reconnect() {
    let cluster = Cluster::start();
    let daemon = daemon_for(&cluster).await;
    let terminated = pooled_backend(&daemon).await;
    terminate(&cluster, terminated);

    // The pool lends its most recently used session first: the terminated
    // one is found closed and discarded, and another serves.
    for _ in 0..5 {
        let served = pooled_backend(&daemon).await;
        assert_ne!(served, terminated, "a terminated session was lent");
    }
    assert_pool_kept(&daemon, "one idle session was terminated").await;
}

/// An operator who ends sessions one by one may end the health check's
/// own session first: the next check would notice and replace it, but a
/// pooled session terminated before then must not be taken for the whole
/// server going away, since the pool's other idle sessions are still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_check_session_and_then_a_pooled_one_terminated_cost_no_reconnect() {
    let cluster = Cluster::start();
    let daemon = TestDaemon::start(pgwarden::config::Config {
        health_check_interval_ms: 3000,
        ..config_for(&cluster)
    })
    .await;
    // Four pooled sessions serve a request each, so only the check's own
    // session, opened by the first check, has a health probe as its last
    // statement.
    let body = json!({ "query": "SELECT pg_sleep(0.2)", "params": [] }).to_string();
    let requests = (0..4).map(|_| daemon.sql(body.clone(), &[]));
    let replies = futures_util::future::join_all(requests).await;
    assert!(replies.iter().all(|r| r.status.is_success()));
    tokio::time::sleep(Duration::from_millis(3300)).await;
    let probe = cluster.psql(
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'pgwarden' \
         AND query LIKE 'SELECT pg_catalog.pg_is_in_recovery()%'",
    );
    terminate(
        &cluster,
        probe.trim().parse().expect("the check's own session"),
    );

    let pooled = pooled_backend(&daemon).await;
    terminate(&cluster, pooled);
    let served = pooled_backend(&daemon).await;
    assert_ne!(served, pooled, "a terminated session was lent");
    assert_pool_kept(&daemon, "two sessions were terminated one by one").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_whose_session_is_terminated_is_replayed_without_a_reconnect() {
    let cluster = Arc::new(Cluster::start());
    let daemon = daemon_for(&cluster).await;
    let sql = "SELECT pg_sleep(1)::text || 'read'";
    let (answer, took) = under_termination(&daemon, &cluster, sql, sql).await;
    assert_eq!(first_value(&answer), "read");
    println!("the read was answered after {took:?}");
    assert_pool_kept(&daemon, "a read's session was terminated").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_session_is_terminated_before_its_commit_is_applied_once() {
    let cluster = Arc::new(Cluster::start());
    cluster.psql("CREATE TABLE ledger (n int)");
    let daemon = daemon_for(&cluster).await;
    let sql = "INSERT INTO ledger SELECT 7 FROM pg_sleep(1) RETURNING n";
    let (answer, took) = under_termination(&daemon, &cluster, sql, sql).await;
    assert_eq!(first_value(&answer), "7");
    println!("the write was answered after {took:?}");
    assert_eq!(
        cluster.psql("SELECT count(*) FROM ledger").trim(),
        "1",
        "applied exactly once"
    );
    assert_pool_kept(&daemon, "a write's session was terminated").await;
}

/// A deferred trigger makes COMMIT take a second, so the session can be
/// terminated after the COMMIT was sent: the outcome is asked on another
/// session of the same generation (the server that answers is the one that
/// ran the write), and the write that was rolled back is replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_session_is_terminated_during_its_commit_is_resolved_on_the_same_generation()
{
    let cluster = Arc::new(Cluster::start());
    cluster.psql(
        "CREATE TABLE ledger (n int); \
         CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS \
           $$ BEGIN PERFORM pg_sleep(1); RETURN NULL; END $$; \
         CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON ledger \
           DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit();",
    );
    let daemon = daemon_for(&cluster).await;
    let sql = "INSERT INTO ledger VALUES (7) RETURNING n";
    let (answer, took) = under_termination(&daemon, &cluster, sql, "COMMIT").await;
    assert_eq!(first_value(&answer), "7");
    println!("the write was answered after {took:?}");
    assert_eq!(
        cluster.psql("SELECT count(*) FROM ledger").trim(),
        "1",
        "applied exactly once"
    );
    let status = daemon.ops_get("/status").await.body;
    assert_eq!(
        status["replay_decisions"]["aborted"].as_u64(),
        Some(1),
        "resolved as rolled back, then replayed: {status}"
    );
    assert_pool_kept(
        &daemon,
        "a write's session was terminated during its COMMIT",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_session_terminated_at_once_costs_exactly_one_reconnect() {
    let cluster = Cluster::start();
    let daemon = daemon_for(&cluster).await;
    pooled_backend(&daemon).await;
    assert!(
        cluster.terminate_backends() >= 2,
        "the pool and the check's session"
    );

    // The next request finds the pool's sessions closed: a reconnect, and it
    // is served by the new generation.
    let answer = daemon.query("SELECT 41 + 1", json!([])).await;
    assert_eq!(first_value(&answer), "42");
    let deadline = Instant::now() + Duration::from_secs(10);
    while daemon.metric("pgwarden_pool_generation").await < 2.0 {
        assert!(Instant::now() < deadline, "the pool was never rebuilt");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(daemon.reconnects().await, 1.0, "one reconnect");
    assert_eq!(
        daemon
            .metric("pgwarden_reconnects_total{reason=\"connection_lost\"}")
            .await,
        1.0
    );
}
