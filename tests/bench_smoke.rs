//! A short run of the benchmark driver (bench/driver.rs) against pgwarden:
//! a few seconds of load, every backend terminated in the middle, and the
//! write ledger must balance with no request failed.

#[allow(dead_code)]
#[path = "../bench/driver.rs"]
mod driver;
mod support;

use std::time::Duration;

use driver::{Fault, Mix, Plan, Target};
use support::Cluster;
use support::daemon::{TestDaemon, config_for};

fn terminate_all(cluster: &Cluster) -> String {
    format!(
        "{} -X -q -h {} -p {} -U postgres -d postgres -c \"SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()\"",
        cluster.bin().path("psql").display(),
        cluster.socket_dir().display(),
        cluster.port(),
    )
}

/// [`terminate_all`] five times, 100 ms apart: a client that happened to
/// be between requests at one round is caught at another, so the fault
/// reaches direct clients for certain, not by chance.
fn terminate_all_repeatedly(cluster: &Cluster) -> String {
    format!(
        "for round in 1 2 3 4 5; do {}; sleep 0.1; done",
        terminate_all(cluster)
    )
}

fn admin_dsn(cluster: &Cluster) -> String {
    format!("{}?sslmode=disable", cluster.url("postgres", None))
}

/// Runs 8 clients against `target` for `seconds`, with `terminate` run
/// 1 s into the run, and prints the report.
async fn run_with_termination(
    cluster: &Cluster,
    target: Target,
    seconds: u64,
    terminate: String,
) -> driver::Report {
    let plan = Plan {
        target,
        clients: 8,
        duration: Duration::from_secs(seconds),
        fault: Some(Fault {
            name: "terminate".into(),
            at: Duration::from_millis(1000),
            command: terminate,
        }),
        window: Duration::from_secs(2),
        admin_dsn: admin_dsn(cluster),
        mix: Mix::Orders,
    };
    let report = driver::run(&plan).await.expect("the run completes");
    println!("{}", driver::table(&report));
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_driver_sees_no_failure_and_no_lost_write_across_a_mass_termination() {
    let cluster = Cluster::start();
    let daemon = TestDaemon::start(config_for(&cluster)).await;
    let target = Target::Http {
        url: format!("{}/sql", daemon.data),
        connection_string: "postgresql://postgres@bench/postgres".into(),
    };
    let report = run_with_termination(&cluster, target, 4, terminate_all(&cluster)).await;

    assert!(
        report.errors.is_empty(),
        "requests failed: {:?}",
        report.errors
    );
    assert_eq!(report.success_rate, 1.0);
    assert!(report.ops > 100, "too little load: {}", report.ops);
    assert!(report.ledger.acknowledged > 0);
    assert_eq!(
        (report.ledger.lost, report.ledger.doubled),
        (0, 0),
        "{:?}",
        report.ledger
    );
    assert_eq!(report.ledger.stored, report.ledger.acknowledged);
    assert!(report.fault.is_some() && report.window["ops"].as_u64().unwrap() > 0);
    assert!(!report.timeline.is_empty());
    assert!(driver::svg(&report).contains("<polyline"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn against_postgres_directly_the_same_fault_reaches_the_clients_and_the_ledger_still_balances()
 {
    let cluster = Cluster::start();
    let target = Target::Postgres {
        dsn: admin_dsn(&cluster),
    };
    let report =
        run_with_termination(&cluster, target, 3, terminate_all_repeatedly(&cluster)).await;
    assert!(
        report.errors.get("ConnectionLost").copied().unwrap_or(0) > 0,
        "{:?}",
        report.errors
    );
    assert!(report.success_rate < 1.0);
    assert_eq!(
        (report.ledger.lost, report.ledger.doubled),
        (0, 0),
        "{:?}",
        report.ledger
    );
}
