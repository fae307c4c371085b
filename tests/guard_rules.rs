//! The guard's rules against a real server: an outage longer than the
//! budget, the role check, hidden writes and statements that cannot run in
//! a transaction block, and the strict transaction timeout.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use pgwarden::backend::{Statement, TransactionOptions};
use pgwarden::guard::{ExecError, ExecSettings, Executor, Guard, Rule};
use pgwarden::telemetry::labels::ClientErrorKind;
use support::Cluster;
use support::pg::{superuser, wait_until_none};
use support::stack::{Stack, quick_settings};

const BUDGET: Duration = Duration::from_secs(3);

fn stack(cluster: &Cluster) -> Stack {
    let mut settings = quick_settings();
    settings.backoff_max = Duration::from_millis(500);
    Stack::start(superuser(cluster), settings, BUDGET)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_longer_than_the_budget_fails_fast_and_service_returns_by_itself() {
    let cluster = Arc::new(Cluster::start());
    let stack = stack(&cluster);
    stack.ready(1).await;
    cluster.stop();

    let started = Instant::now();
    let error = stack
        .executor
        .query(&Statement::new("SELECT 1"))
        .await
        .unwrap_err();
    let waited = started.elapsed();
    assert_eq!(error.kind(), ClientErrorKind::GuardTimeout, "{error}");
    assert!(
        waited >= BUDGET - Duration::from_millis(50),
        "failed too early: {waited:?}"
    );
    assert!(
        waited < BUDGET + Duration::from_secs(2),
        "hung past the budget: {waited:?}"
    );
    assert_eq!(
        stack.metric("pgwarden_guard_wait_seconds", &[("outcome", "timeout")]),
        1.0
    );

    let kit = cluster.clone();
    tokio::task::spawn_blocking(move || kit.start_again())
        .await
        .unwrap();
    let returned = Instant::now();
    stack.ready(2).await;
    assert!(
        returned.elapsed() < Duration::from_secs(5),
        "slow recovery: {:?}",
        returned.elapsed()
    );
    assert!(
        stack
            .executor
            .query(&Statement::new("SELECT 1"))
            .await
            .is_ok()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_is_refused_as_primary_until_it_is_promoted() {
    let primary = Cluster::start();
    let standby = Arc::new(primary.start_standby());
    let stack = stack(&standby);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let status = stack.lifecycle.status();
    assert_eq!(status.generation, 0, "a standby must not be published");
    let failure = status.last_failure.expect("the failed attempt says why");
    assert!(failure.contains("in recovery"), "{failure}");
    assert!(stack.metric("pgwarden_reconnect_attempts_total", &[("result", "failed")]) >= 1.0);
    assert!(stack.metric("pgwarden_warmup_failures_total", &[("phase", "ping")]) >= 1.0);

    let kit = standby.clone();
    tokio::task::spawn_blocking(move || kit.promote())
        .await
        .unwrap();
    stack.ready(1).await;
    stack
        .executor
        .query(&Statement::new("CREATE TABLE promoted (x int)"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hidden_write_in_a_read_runs_as_a_write_and_vacuum_runs_bare() {
    let cluster = Cluster::start();
    cluster.psql("CREATE SEQUENCE ticket; CREATE TABLE t (x int)");
    let stack = stack(&cluster);
    stack.ready(1).await;
    let next = stack
        .executor
        .query(&Statement::new("SELECT nextval('ticket')"))
        .await
        .unwrap();
    assert_eq!(next.rows_as_strings(), [[Some("1".to_owned())]]);
    assert_eq!(
        cluster.psql("SELECT last_value FROM ticket").trim(),
        "1",
        "applied once"
    );

    let vacuum = stack
        .executor
        .query(&Statement::new("VACUUM t"))
        .await
        .unwrap();
    assert_eq!(vacuum.command_tag, "VACUUM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_over_the_transaction_timeout_is_cancelled_with_its_own_error() {
    let cluster = Cluster::start();
    cluster.psql("CREATE TABLE t (x int)");
    let stack = stack(&cluster);
    stack.ready(1).await;
    let settings = ExecSettings {
        transaction_timeout: Duration::from_millis(500),
        ..ExecSettings::default()
    };
    let registry = prometheus::Registry::new();
    let metrics = pgwarden::telemetry::Metrics::new(&registry).unwrap();
    let guard = Guard::new(stack.lifecycle.clone(), BUDGET, metrics.clone());
    let strict = Executor::new(guard, settings, metrics);

    let statements = [
        Statement::new("INSERT INTO t VALUES (1)"),
        Statement::new("SELECT pg_sleep(30)"),
    ];
    let started = Instant::now();
    let error = strict
        .batch(&TransactionOptions::default(), &statements)
        .await
        .unwrap_err();
    assert!(matches!(error, ExecError::TransactionTimeout(_)), "{error}");
    assert_eq!(error.kind(), ClientErrorKind::TransactionTimeout);
    assert!(started.elapsed() < Duration::from_secs(10));

    wait_until_none(
        &cluster,
        "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'",
        Duration::from_secs(10),
        "the statement was not cancelled on the server",
    );
    assert_eq!(
        cluster.psql("SELECT count(*) FROM t").trim(),
        "0",
        "the batch did not commit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_broken_before_commit_is_replayed_and_commits_once() {
    let cluster = Arc::new(Cluster::start());
    cluster.psql("CREATE TABLE ledger (n int)");
    let stack = stack(&cluster);
    stack.ready(1).await;
    let statements = [
        Statement::new("INSERT INTO ledger VALUES (1)"),
        Statement::new("SELECT pg_sleep(1)"),
    ];
    let kit = cluster.clone();
    let killer = tokio::task::spawn_blocking(move || {
        support::pg::wait_until_running(&kit, "SELECT pg_sleep(1)%");
        kit.terminate_backends()
    });
    let results = stack
        .executor
        .batch(&TransactionOptions::default(), &statements)
        .await
        .unwrap();
    assert!(killer.await.unwrap() >= 1);
    assert_eq!(results.len(), 2);
    assert_eq!(
        cluster.psql("SELECT count(*) FROM ledger").trim(),
        "1",
        "committed exactly once"
    );
    // Only the before-COMMIT rule may have decided (more than once if the
    // replay met another connection the termination had not reached yet).
    let rules = stack.executor.rule_counts();
    let decided: Vec<_> = rules.iter().filter(|(_, n)| *n > 0).collect();
    assert!(
        matches!(decided[..], [(Rule::BeforeCommit, _)]),
        "{rules:?}"
    );
    assert_eq!(
        stack.metric("pgwarden_replays_total", &[("result", "ok")]),
        1.0
    );
}

/// An executor of `stack`'s guard with `write_safety = fast`.
fn fast_executor(stack: &Stack) -> Executor {
    Executor::new(
        stack.guard.clone(),
        ExecSettings {
            write_safety: pgwarden::guard::WriteSafety::Fast,
            ..ExecSettings::default()
        },
        pgwarden::telemetry::Metrics::new(&prometheus::Registry::new()).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_fast_writes_a_batch_is_still_one_transaction_with_its_options() {
    let cluster = Cluster::start();
    cluster.psql("CREATE TABLE t (x int)");
    let stack = stack(&cluster);
    stack.ready(1).await;
    let fast = fast_executor(&stack);

    let results = fast
        .batch(
            &TransactionOptions::default(),
            &[
                Statement::new("INSERT INTO t VALUES (1)"),
                Statement::new("SELECT count(*), current_setting('transaction_isolation') FROM t"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(results[1].rows[0].get(0).as_deref(), Some("1"));

    let read_only = TransactionOptions {
        read_only: true,
        ..TransactionOptions::default()
    };
    let error = fast
        .batch(&read_only, &[Statement::new("INSERT INTO t VALUES (2)")])
        .await
        .unwrap_err();
    let ExecError::Sql { error, .. } = &error else {
        panic!("{error}");
    };
    assert_eq!(error.code, "25006", "the read-only option applies");
    assert_eq!(cluster.psql("SELECT count(*) FROM t").trim(), "1");
}

/// Through a one-statement executor (no transaction around it), leaves
/// session state that `DISCARD ALL` cannot clear in time: a thousand temp
/// tables, a 1 ms statement timeout and a search path for nobody else.
async fn leave_state_that_resists_reset(stack: &Stack) {
    fast_executor(stack)
        .query(&Statement::new(
            "DO $$ BEGIN
           CREATE SCHEMA IF NOT EXISTS leaked;
           FOR i IN 1..1000 LOOP EXECUTE format('CREATE TEMP TABLE t%s (x int)', i); END LOOP;
           PERFORM set_config('search_path', 'leaked, public', false);
           PERFORM set_config('statement_timeout', '1ms', false);
         END $$",
        ))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_refuses_its_reset_is_retired_and_requests_run_elsewhere() {
    let cluster = Cluster::start();
    let mut settings = quick_settings();
    settings.health_check_interval = Duration::from_secs(3600);
    let stack = Stack::start(superuser(&cluster), settings, BUDGET);
    stack.ready(1).await;
    leave_state_that_resists_reset(&stack).await;

    for _ in 0..6 {
        let path = stack
            .executor
            .query(&Statement::new("SELECT current_setting('search_path')"))
            .await
            .unwrap();
        assert_eq!(path.rows[0].get(0).as_deref(), Some("\"$user\", public"));
    }
    assert_eq!(stack.metric("pgwarden_reconnects_total", &[]), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_refuses_its_reset_does_not_fail_a_health_check() {
    let cluster = Cluster::start();
    let stack = Stack::start(superuser(&cluster), quick_settings(), BUDGET);
    stack.ready(1).await;
    leave_state_that_resists_reset(&stack).await;
    let checked = stack.metric("pgwarden_health_checks_total", &[("result", "ok")]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while stack.metric("pgwarden_health_checks_total", &[("result", "ok")]) < checked + 8.0 {
        assert!(Instant::now() < deadline, "health checks stopped");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        stack.metric("pgwarden_health_checks_total", &[("result", "failed")]),
        0.0
    );
    assert_eq!(stack.metric("pgwarden_reconnects_total", &[]), 0.0);
}
