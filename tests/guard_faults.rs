//! Faults under load: 16 clients run point reads and single-row UPDATEs
//! through the executor while the database is restarted, crashed, has its
//! backends terminated, stalls, or loses its network. No request may fail,
//! and a write ledger proves no acknowledged write was lost or doubled.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pgwarden::backend::Statement;
use pgwarden::guard::Executor;
use support::pg::superuser;
use support::stack::{Stack, quick_settings};
use support::{Cluster, FaultProxy};

const CLIENTS: usize = 16;
const BUDGET: Duration = Duration::from_secs(3);

/// What one client saw.
#[derive(Debug, Default)]
struct ClientReport {
    reads: u64,
    /// UPDATEs acknowledged to the client: each added 1 to its row.
    acknowledged: u64,
    failures: Vec<String>,
}

async fn client(executor: Executor, row: usize, stop: Arc<AtomicBool>) -> ClientReport {
    let read = Statement::new(format!("SELECT n FROM purchase_order WHERE id = {row}"));
    let write = Statement::new(format!(
        "UPDATE purchase_order SET n = n + 1 WHERE id = {row}"
    ));
    let mut report = ClientReport::default();
    let mut turn = 0u64;
    while !stop.load(Ordering::Relaxed) {
        turn += 1;
        let reading = turn.is_multiple_of(2);
        let statement = if reading { &read } else { &write };
        match executor.query(statement).await {
            Ok(result) if reading => {
                assert_eq!(result.rows.len(), 1);
                report.reads += 1;
            }
            Ok(result) => {
                assert_eq!(result.command_tag, "UPDATE 1");
                report.acknowledged += 1;
            }
            Err(error) => {
                report.failures.push(format!("{error} ({})", error.kind()));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    report
}

/// The clients of a load run.
struct Load {
    stop: Arc<AtomicBool>,
    clients: Vec<tokio::task::JoinHandle<ClientReport>>,
}

impl Load {
    fn start(executor: &Executor) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let clients = (1..=CLIENTS)
            .map(|row| tokio::spawn(client(executor.clone(), row, stop.clone())))
            .collect();
        Load { stop, clients }
    }

    /// Stops the clients and checks: no failure, and every row holds
    /// exactly the writes acknowledged for it. Returns the acknowledged total.
    async fn finish(self, cluster: &Cluster) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let mut reports = Vec::new();
        for handle in self.clients {
            reports.push(handle.await.unwrap());
        }
        let failures: Vec<_> = reports.iter().flat_map(|r| r.failures.iter()).collect();
        assert!(
            failures.is_empty(),
            "{} requests failed: {failures:?}",
            failures.len()
        );
        let stored = cluster.psql_rows("SELECT n FROM purchase_order ORDER BY id");
        for (index, report) in reports.iter().enumerate() {
            let row = index + 1;
            let value = stored[index][0].as_deref().unwrap();
            assert_eq!(
                value,
                report.acknowledged.to_string(),
                "row {row}: stored vs acknowledged writes"
            );
            assert!(
                report.reads > 0 && report.acknowledged > 0,
                "client {row} made progress"
            );
        }
        reports.iter().map(|r| r.acknowledged).sum()
    }
}

/// Runs the load, applies `fault` after a second, and checks the outcome.
async fn survives(cluster: Arc<Cluster>, stack: Stack, fault: impl FnOnce() + Send + 'static) {
    stack.ready(1).await;
    let load = Load::start(&stack.executor);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let faulted = Instant::now();
    tokio::task::spawn_blocking(fault).await.unwrap();
    stack.ready(2).await;
    let recovered = faulted.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let writes = load.finish(&cluster).await;
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
    cluster.psql(&format!(
        "CREATE TABLE purchase_order (id int PRIMARY KEY, n int NOT NULL);
         INSERT INTO purchase_order SELECT g, 0 FROM generate_series(1, {CLIENTS}) g"
    ));
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_crashes_under_load_lose_no_write_and_double_none() {
    const CRASHES: u64 = 20;
    let cluster = prepared_cluster();
    let stack = stack_for(&cluster);
    stack.ready(1).await;
    let load = Load::start(&stack.executor);
    let started = Instant::now();
    for crash in 1..=CRASHES {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let kit = cluster.clone();
        tokio::task::spawn_blocking(move || kit.crash_and_restart())
            .await
            .unwrap();
        stack.ready(crash + 1).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let writes = load.finish(&cluster).await;
    assert_eq!(
        stack.metric("pgwarden_reconnects_total", &[]),
        CRASHES as f64,
        "one reconnect per crash"
    );
    report(&stack, started.elapsed(), writes);
}
