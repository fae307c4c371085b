//! Real Node.js PostgreSQL clients, unchanged, through the wire front end
//! with one server session behind it (two where a client pins one):
//! node-postgres (tests/clients/pg.test.mjs, pg.listen.test.mjs),
//! postgres.js, which pipelines and prepares every statement
//! (postgres-js.test.mjs), and Prisma ORM 7 over `@prisma/adapter-pg`
//! (prisma-pg.test.mts). Both drivers stay connected across a database
//! restart, their named statements included (wire.restart.mjs).

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use pgwarden::config::Config;
use support::Cluster;
use support::daemon::{TestDaemon, config_for};
use support::node;

/// Longest a whole node test file may run before it counts as hung.
const NODE_DEADLINE: Duration = Duration::from_secs(180);

fn pg_addr(daemon: &TestDaemon) -> SocketAddr {
    daemon
        .daemon
        .as_ref()
        .and_then(|d| d.pg_addr())
        .expect("the wire front end is on")
}

/// pgwarden with `sessions` server sessions, never more, never fewer.
fn sessions(cluster: &Cluster, sessions: usize) -> Config {
    Config {
        max_connections: sessions,
        min_connections: sessions,
        ..config_for(cluster)
    }
}

/// node in tests/clients, told where pgwarden and the server are.
fn node(cluster: &Cluster, daemon: &TestDaemon, package: &str) -> tokio::process::Command {
    let mut command = node::command(package);
    command
        .env(
            "PGWARDEN_WIRE_URL",
            format!(
                "postgresql://postgres@127.0.0.1:{}/postgres",
                pg_addr(daemon).port()
            ),
        )
        .env("PGWARDEN_DIRECT_URL", cluster.url("postgres", None));
    command
}

/// Runs the node test file `args` names, and checks that its tests all
/// passed, `passes` of them.
async fn run_node_tests(
    cluster: &Cluster,
    daemon: &TestDaemon,
    package: &str,
    args: &[&str],
    passes: usize,
) {
    let mut command = node(cluster, daemon, package);
    command.args(["--test-reporter=tap"]).args(args);
    let run = node::run(command, NODE_DEADLINE).await;
    assert!(
        run.succeeded(),
        "{args:?} failed:\n{run}\n--- server log\n{}",
        cluster.log_tail(20)
    );
    assert!(run.stdout.contains(&format!("# pass {passes}")), "{run}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_postgres_clients_and_pools_take_turns_on_one_server_session() {
    let cluster = Cluster::start();
    let daemon = TestDaemon::start(sessions(&cluster, 1)).await;
    run_node_tests(&cluster, &daemon, "pg", &["--test", "pg.test.mjs"], 10).await;
    let named = daemon
        .metric(r#"pgwarden_wire_prepared_statements_total{event="miss"}"#)
        .await;
    assert!(named >= 3.0, "the named queries were prepared by pgwarden");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_postgres_listens_on_a_pinned_session_and_hears_notifications() {
    let cluster = Cluster::start();
    let daemon = TestDaemon::start(sessions(&cluster, 2)).await;
    run_node_tests(
        &cluster,
        &daemon,
        "pg",
        &["--test", "pg.listen.test.mjs"],
        2,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_js_pipelines_prepares_cancels_and_copies_on_one_server_session() {
    let cluster = Cluster::start();
    let daemon = TestDaemon::start(sessions(&cluster, 1)).await;
    let args = ["--test", "postgres-js.test.mjs"];
    run_node_tests(&cluster, &daemon, "postgres", &args, 8).await;
    let named = daemon
        .metric(r#"pgwarden_wire_prepared_statements_total{event="hit"}"#)
        .await;
    assert!(
        named >= 10.0,
        "postgres.js's statements were prepared by name"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prisma_with_its_pg_adapter_runs_transactions_on_one_server_session() {
    node::generate_prisma_client().await;
    let cluster = Cluster::start();
    let daemon = TestDaemon::start(sessions(&cluster, 1)).await;
    let args = [
        "node_modules/tsx/dist/cli.mjs",
        "--test",
        "prisma-pg.test.mts",
    ];
    run_node_tests(&cluster, &daemon, "@prisma/adapter-pg", &args, 4).await;
}
