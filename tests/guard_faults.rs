//! Faults under load: 16 clients run point reads and single-row UPDATEs
//! through the executor while the database is restarted, crashed, has its
//! backends terminated, stalls, or loses its network. No request may fail,
//! and a write ledger proves no acknowledged write was lost or doubled.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use pgwarden::guard::Executor;
use support::load::{Load, assert_no_failures, check_ledger, purchase_order_sql};
use support::pg::superuser;
use support::stack::{Stack, quick_settings};
use support::{Cluster, FaultProxy};

const CLIENTS: usize = 16;
const BUDGET: Duration = Duration::from_secs(3);

/// Starts the ledger load of `CLIENTS` clients.
fn start_load(executor: &Executor) -> Load {
    Load::start(executor, CLIENTS)
}

/// Stops the clients and checks: no failure (not even 08007), and every row
/// holds exactly the writes acknowledged for it. Returns the acknowledged total.
async fn finish(load: Load, cluster: &Cluster) -> u64 {
    let reports = load.stop().await;
    assert_no_failures(&reports);
    let unknown: u64 = reports.iter().map(|r| r.unknown).sum();
    assert_eq!(unknown, 0, "writes answered 08007");
    check_ledger(cluster, &reports);
    reports.iter().map(|r| r.acknowledged).sum()
}

/// Runs the load, applies `fault` after a second, and checks the outcome.
async fn survives(cluster: Arc<Cluster>, stack: Stack, fault: impl FnOnce() + Send + 'static) {
    stack.ready(1).await;
    let load = start_load(&stack.executor);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let faulted = Instant::now();
    tokio::task::spawn_blocking(fault).await.unwrap();
    stack.ready(2).await;
    let recovered = faulted.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let writes = finish(load, &cluster).await;
    assert_eq!(
        stack.metric("pgwarden_reconnects_total", &[]),
        1.0,
        "one reconnect per fault"
    );
    report(&stack, recovered, writes);
}

fn report(stack: &Stack, recovered: Duration, writes: u64) {
    let reconnect = stack
        .lifecycle
        .status()
        .last_reconnect
        .and_then(|r| r.duration);
    let waits = stack.metric("pgwarden_guard_wait_seconds", &[]);
    let bounds = stack.histogram_bounds("pgwarden_guard_wait_seconds");
    let rules = stack.executor.rule_counts();
    println!(
        "recovered in {recovered:?}; last reconnect {reconnect:?}; guard waits {waits} (median, max <= {bounds:?} s); acknowledged writes {writes}; rules {rules:?}"
    );
}

fn prepared_cluster() -> Arc<Cluster> {
    let cluster = Cluster::start();
    cluster.psql(&purchase_order_sql(CLIENTS));
    Arc::new(cluster)
}

fn stack_for(cluster: &Cluster) -> Stack {
    let mut settings = quick_settings();
    settings.backoff_max = Duration::from_millis(500);
    settings.warmup_queries = vec!["SELECT 1 FROM purchase_order LIMIT 1".into()];
    Stack::start(superuser(cluster), settings, BUDGET)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_fails_across_a_fast_restart() {
    let cluster = prepared_cluster();
    let stack = stack_for(&cluster);
    let kit = cluster.clone();
    survives(cluster, stack, move || kit.restart_fast()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_fails_across_a_crash() {
    let cluster = prepared_cluster();
    let stack = stack_for(&cluster);
    let kit = cluster.clone();
    survives(cluster, stack, move || kit.crash_and_restart()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_fails_when_every_backend_is_terminated() {
    let cluster = prepared_cluster();
    let stack = stack_for(&cluster);
    let kit = cluster.clone();
    survives(cluster, stack, move || {
        kit.terminate_backends();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_fails_across_a_two_second_stall() {
    let cluster = prepared_cluster();
    let stack = stack_for(&cluster);
    let kit = cluster.clone();
    survives(cluster, stack, move || kit.stall(Duration::from_secs(2))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_fails_when_the_network_is_cut() {
    let cluster = prepared_cluster();
    let proxy =
        Arc::new(FaultProxy::start(format!("127.0.0.1:{}", cluster.port()).parse().unwrap()).await);
    let mut options = superuser(&cluster);
    options.port = proxy.port();
    let mut settings = quick_settings();
    settings.backoff_max = Duration::from_millis(500);
    let stack = Stack::start(options, settings, BUDGET);
    let cut = proxy.clone();
    survives(cluster, stack, move || {
        cut.cut_all();
    })
    .await;
}

/// Runs the ledger load through `faults` rounds of `fault`, each one a
/// real failure of the server that must cost exactly one reconnect.
async fn survives_repeated(faults: u64, fault: fn(&Cluster)) {
    let cluster = prepared_cluster();
    let stack = stack_for(&cluster);
    stack.ready(1).await;
    let load = start_load(&stack.executor);
    let started = Instant::now();
    for round in 1..=faults {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let kit = cluster.clone();
        tokio::task::spawn_blocking(move || fault(&kit))
            .await
            .unwrap();
        stack.ready(round + 1).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let writes = finish(load, &cluster).await;
    assert_eq!(
        stack.metric("pgwarden_reconnects_total", &[]),
        faults as f64,
        "one reconnect per fault"
    );
    report(&stack, started.elapsed(), writes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_crashes_under_load_lose_no_write_and_double_none() {
    survives_repeated(20, Cluster::crash_and_restart).await;
}

/// What the OOM killer does: one backend SIGKILLed. The postmaster ends
/// every session and recovers in place (same postmaster, same start time),
/// and transaction ids that never reached the WAL are handed out again, so
/// a write broken after its COMMIT must not be judged by `txid_status`
/// alone. Twenty kills under load: no write lost or doubled, no failure,
/// and one reconnect each, since the server really crashed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_killed_backends_under_load_lose_no_write_and_double_none() {
    survives_repeated(20, Cluster::kill_one_backend).await;
}
