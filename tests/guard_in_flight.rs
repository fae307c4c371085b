//! Writes whose server side lives on after pgwarden stopped waiting for
//! them: a COMMIT held by a synchronous standby past the transaction
//! timeout, and a write whose network was partitioned while its backend
//! kept its row locks. Each gets one true answer, the table shows the
//! write exactly once, and neither is mistaken for a database failure.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgwarden::backend::{Statement, TransactionOptions};
use pgwarden::guard::{ExecError, ExecSettings, Rule};
use support::pg::{superuser, wait_for_session, wait_until_none};
use support::stack::{Stack, quick_settings};
use support::{Cluster, FaultProxy, wait};

/// The guard budget (DESIGN §4 default).
const BUDGET: Duration = Duration::from_secs(3);
/// Generous bound on anything the tests wait for.
const GENEROUS: Duration = Duration::from_secs(10);

/// A stack on `cluster`, as the superuser, optionally through `proxy`.
async fn stack_on(cluster: &Cluster, proxy: Option<&FaultProxy>) -> Stack {
    let mut options = superuser(cluster);
    if let Some(proxy) = proxy {
        options.port = proxy.port();
    }
    let stack = Stack::start(options, quick_settings(), BUDGET);
    stack.ready(1).await;
    stack
}

fn addr(cluster: &Cluster) -> SocketAddr {
    format!("127.0.0.1:{}", cluster.port()).parse().unwrap()
}

fn count(cluster: &Cluster, sql: &str) -> String {
    cluster.psql(sql).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_held_by_a_synchronous_standby_past_the_timeout_is_answered_with_what_happened() {
    let primary = Cluster::start();
    primary.psql("CREATE TABLE ledger (n int)");
    let standby = primary.start_standby();
    primary.require_synchronous(&standby);
    let stack = stack_on(&primary, None).await;
    let executor = stack.executor_with(ExecSettings {
        transaction_timeout: Duration::from_secs(1),
        ..ExecSettings::default()
    });

    // The standby stops acknowledging: every COMMIT now waits for it.
    standby.pause();
    let insert = Statement::new("INSERT INTO ledger VALUES (7) RETURNING n");
    let started = Instant::now();
    let answer = tokio::time::timeout(
        GENEROUS,
        executor.batch(&TransactionOptions::default(), &[insert]),
    )
    .await
    .expect("an answer within 10 s");
    let answered_after = started.elapsed();
    let in_ledger = || count(&primary, "SELECT count(*) FROM ledger");
    match &answer {
        Ok(results) => {
            assert_eq!(results[0].rows_as_strings(), [[Some("7".to_owned())]]);
            // Visible once the cancelled backend has left its wait.
            assert!(
                wait::eventually(GENEROUS, || in_ledger() == "1"),
                "answered as committed, but the ledger holds {}",
                in_ledger()
            );
        }
        Err(error) => assert!(
            matches!(error, ExecError::ResolutionUnknown),
            "a COMMIT in flight is answered with its outcome or 08007, got {error} ({:?})",
            error.sqlstate()
        ),
    }
    standby.resume();
    let after = in_ledger();
    assert!(after == "1" || answer.is_err(), "the ledger holds {after}");
    assert_eq!(
        stack.metric("pgwarden_reconnects_total", &[]),
        0.0,
        "a transaction timeout is not a database failure"
    );
    println!(
        "timed-out COMMIT answered {:?} after {answered_after:?}; ledger {after}; rules {:?}",
        answer.as_ref().map(|r| r[0].rows_as_strings()),
        executor.rule_counts()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_blocked_by_the_old_backends_row_lock_ends_it_and_completes_in_the_budget() {
    let cluster = Arc::new(Cluster::start());
    cluster.psql(
        "CREATE TABLE counter (id int PRIMARY KEY, n int); INSERT INTO counter VALUES (1, 0)",
    );
    let proxy = Arc::new(FaultProxy::start(addr(&cluster)).await);
    let stack = stack_on(&cluster, Some(&proxy)).await;

    // The answer to the write's first round trip is held back, so the
    // partition comes after the UPDATE ran and before COMMIT was sent.
    proxy.set_latency(Duration::from_millis(300));
    let update = "UPDATE counter SET n = n + 1 WHERE id = 1";
    let (kit, net) = (cluster.clone(), proxy.clone());
    let partition = tokio::task::spawn_blocking(move || {
        let pid = wait_for_session(&kit, "idle in transaction", update);
        net.partition_all();
        net.set_latency(Duration::ZERO);
        pid
    });

    let started = Instant::now();
    let answer = tokio::time::timeout(GENEROUS, stack.executor.query(&Statement::new(update)))
        .await
        .expect("the replay was not left waiting behind the old backend's row lock");
    let took = started.elapsed();
    let old_pid = partition.await.unwrap();
    assert_eq!(answer.unwrap().row_count(), Some(1));
    assert!(
        took < BUDGET,
        "answered after {took:?}, beyond the guard budget"
    );
    assert_eq!(
        count(&cluster, "SELECT n FROM counter WHERE id = 1"),
        "1",
        "updated exactly once"
    );
    let probe = format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {old_pid}");
    wait_until_none(&cluster, &probe, GENEROUS, "the old backend still runs");
    let rules = stack.executor.rule_counts();
    assert!(rules.contains(&(Rule::BeforeCommit, 1)), "{rules:?}");
    println!(
        "blocked replay answered after {took:?} (budget {BUDGET:?}); reconnects {}; rules {rules:?}",
        stack.metric("pgwarden_reconnects_total", &[])
    );
}
