//! The real clients: `@neondatabase/serverless`, unchanged, talks to
//! pgwarden (tests/clients/neon.test.mjs), and keeps working across a
//! database restart (tests/clients/neon.load.mjs); Drizzle ORM's
//! `neon-http` driver (tests/clients/drizzle.test.mjs) and Prisma ORM with
//! its Neon HTTP adapter (tests/clients/prisma.test.mts) work on top of it.

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::Cluster;
use support::daemon::{TestDaemon, config_for};
use support::node;

fn node(daemon: &TestDaemon, script: &str) -> tokio::process::Command {
    let mut command = node::command("@neondatabase/serverless");
    command
        .arg(script)
        .env("PGWARDEN_FETCH_ENDPOINT", format!("{}/sql", daemon.data))
        .env(
            "PGWARDEN_CONNECTION_STRING",
            "postgresql://postgres@db.example/postgres",
        )
        .kill_on_drop(true);
    command
}

/// Runs node with `args` in tests/clients against a fresh pgwarden, and
/// checks that the `what` tests all passed, `passes` of them.
async fn run_node_tests(args: &[&str], what: &str, passes: usize) {
    let cluster = Cluster::start();
    let daemon = TestDaemon::start(config_for(&cluster)).await;
    let mut command = node(&daemon, args[0]);
    command.args(&args[1..]);
    let output = command.output().await.expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the {what} tests failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains(&format!("# pass {passes}")), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_neon_serverless_driver_works_unchanged() {
    run_node_tests(&["--test", "neon.test.mjs"], "Neon driver", 5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drizzle_orm_over_the_neon_driver_works_unchanged() {
    run_node_tests(&["--test", "drizzle.test.mjs"], "Drizzle", 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prisma_with_its_neon_http_adapter_works_unchanged() {
    node::generate_prisma_client().await;
    run_node_tests(
        &["node_modules/tsx/dist/cli.mjs", "--test", "prisma.test.mts"],
        "Prisma",
        4,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_neon_driver_sees_no_failure_across_a_database_restart() {
    let cluster = Arc::new(Cluster::start());
    cluster.psql("CREATE TABLE client_load (id int PRIMARY KEY, n int); INSERT INTO client_load SELECT g, 0 FROM generate_series(1, 4) g");
    let daemon = TestDaemon::start(config_for(&cluster)).await;
    let mut command = node(&daemon, "neon.load.mjs");
    command.env("PGWARDEN_LOAD_MS", "5000");
    let load = command.output();
    let kit = cluster.clone();
    let restart = async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        tokio::task::spawn_blocking(move || kit.restart_fast())
            .await
            .unwrap();
    };
    let (output, ()) = tokio::join!(load, restart);
    let output = output.expect("node runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("one JSON report line");
    assert_eq!(
        report["failed"], 0,
        "queries failed across the restart: {report}"
    );
    assert!(report["ok"].as_u64().unwrap() > 20, "{report}");
    let stored = cluster.psql("SELECT sum(n) FROM client_load");
    assert_eq!(
        stored.trim(),
        report["writes"].to_string(),
        "acknowledged writes vs stored"
    );
    assert_eq!(
        daemon
            .metric("pgwarden_reconnects_total{reason=\"connection_lost\"}")
            .await
            + daemon
                .metric("pgwarden_reconnects_total{reason=\"health_check\"}")
                .await,
        1.0
    );
}
