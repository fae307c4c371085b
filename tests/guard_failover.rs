//! Failover under load: the primary crashes and its synchronous standby is
//! promoted behind the same address, while 16 clients run point reads and
//! single-row UPDATEs through the executor. The guard holds the requests
//! while the lifecycle refuses the standby until it is promoted; the write
//! ledger, read on the new primary, proves that no acknowledged write was
//! lost or doubled. Writes whose COMMIT was in flight at the crash may be
//! answered 08007 (on a new timeline a "committed" cannot be trusted); the
//! ledger counts them apart, and nothing else may fail.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::load::{Load, assert_no_failures, check_ledger, purchase_order_sql};
use support::pg::superuser;
use support::stack::{Stack, quick_settings};
use support::{Cluster, FaultProxy, wait};

const CLIENTS: usize = 16;
/// Generous: a failover is a crash, a promotion and a warm-up.
const BUDGET: Duration = Duration::from_secs(10);

fn addr(cluster: &Cluster) -> SocketAddr {
    format!("127.0.0.1:{}", cluster.port()).parse().unwrap()
}

/// Makes every commit on `primary` wait until its standby has flushed it,
/// so an acknowledged write survives the primary's crash.
fn make_synchronous(primary: &Cluster) {
    primary.psql("ALTER SYSTEM SET synchronous_standby_names = '*'");
    primary.psql("SELECT pg_reload_conf()");
    let synchronous = wait::eventually(Duration::from_secs(30), || {
        primary.psql_rows("SELECT sync_state FROM pg_stat_replication")
            == [[Some("sync".to_string())]]
    });
    assert!(synchronous, "the standby never became synchronous");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_to_a_synchronous_standby_loses_no_acknowledged_write_and_doubles_none() {
    let primary = Arc::new(Cluster::start());
    primary.psql(&purchase_order_sql(CLIENTS));
    let standby = Arc::new(primary.start_standby());
    make_synchronous(&primary);
    let proxy = Arc::new(FaultProxy::start(addr(&primary)).await);
    let mut options = superuser(&primary);
    options.port = proxy.port();
    let mut settings = quick_settings();
    settings.backoff_max = Duration::from_millis(500);
    settings.warmup_queries = vec!["SELECT 1 FROM purchase_order LIMIT 1".into()];
    let stack = Stack::start(options, settings, BUDGET);
    stack.ready(1).await;

    let load = Load::start(&stack.executor, CLIENTS);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let failed_over = Instant::now();
    let (old, new, switch) = (primary.clone(), standby.clone(), proxy.clone());
    tokio::task::spawn_blocking(move || {
        old.crash();
        switch.set_target(addr(&new));
        switch.cut_all();
        new.promote();
    })
    .await
    .unwrap();
    stack.ready(2).await;
    let recovered = failed_over.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let reports = load.stop().await;

    assert_no_failures(&reports);
    check_ledger(&standby, &reports);
    assert_eq!(
        stack.metric("pgwarden_reconnects_total", &[]),
        1.0,
        "one reconnect for the failover"
    );
    let refused = stack.metric("pgwarden_reconnect_attempts_total", &[("result", "failed")]);
    let acknowledged: u64 = reports.iter().map(|r| r.acknowledged).sum();
    let unknown: u64 = reports.iter().map(|r| r.unknown).sum();
    println!(
        "new primary ready {recovered:?} after the crash; failed attempts {refused}; \
         acknowledged writes {acknowledged}; answered 08007 {unknown}; rules {:?}",
        stack.executor.rule_counts()
    );
}
