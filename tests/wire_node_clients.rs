//! Real Node.js PostgreSQL clients, unchanged, through the wire front end
//! with one server session behind it (two where a client pins one):
//! node-postgres (tests/clients/pg.test.mjs, pg.listen.test.mjs),
//! postgres.js, which pipelines and prepares every statement
//! (postgres-js.test.mjs), and Prisma ORM 7 over `@prisma/adapter-pg`
//! (prisma-pg.test.mts). Both drivers stay connected, their named
//! statements working, across a restart, a crash and a database that is
//! down when they send (wire.restart.mjs, driven a command at a time).

mod support;

use std::sync::Arc;
use std::time::Duration;

use pgwarden::config::Config;
use serde_json::{Value, json};
use support::Cluster;
use support::daemon::{TestDaemon, config_for};
use support::node;

/// Longest a whole node test file may run before it counts as hung.
const NODE_DEADLINE: Duration = Duration::from_secs(180);

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
                daemon.pg_addr().port()
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
    let summary = format!("# pass {passes}");
    assert!(run.stdout.lines().any(|line| line == summary), "{run}");
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

/// How long a command of wire.restart.mjs may take: the first after a
/// restart waits in the guard while pgwarden reconnects.
const COMMAND_DEADLINE: Duration = Duration::from_secs(60);

/// One server session, and health checks too rare to notice a restart
/// before the clients do: the first statement after it is the first to
/// meet the server sessions it ended.
fn clients_notice_first(cluster: &Cluster) -> Config {
    Config {
        health_check_interval_ms: 60_000,
        ..sessions(cluster, 1)
    }
}

/// node-postgres and postgres.js clients (wire.restart.mjs) connected to
/// pgwarden, and what they reported after their first work.
struct Clients {
    cluster: Arc<Cluster>,
    daemon: TestDaemon,
    script: node::Conversation,
    connected: Value,
}

impl Clients {
    async fn connect(config: fn(&Cluster) -> Config) -> Clients {
        let cluster = Arc::new(Cluster::start());
        cluster.psql(
            "CREATE TABLE restart_item (id int PRIMARY KEY, name text, uses int NOT NULL DEFAULT 0);
             INSERT INTO restart_item (id, name) VALUES (1, 'one'), (2, 'two')",
        );
        let daemon = TestDaemon::start(config(&cluster)).await;
        let mut command = node(&cluster, &daemon, "postgres");
        command.arg("wire.restart.mjs");
        let mut script = node::Conversation::start(command);
        let connected = script.ask("connect", COMMAND_DEADLINE).await;
        assert_eq!(connected["failed"], json!([]), "{connected}");
        assert_eq!(connected["events"]["poolConnections"], 2, "{connected}");
        Clients {
            cluster,
            daemon,
            script,
            connected,
        }
    }

    /// Runs `fault` on the cluster, off the async runtime.
    async fn break_database(&self, fault: fn(&Cluster)) {
        let cluster = self.cluster.clone();
        tokio::task::spawn_blocking(move || fault(&cluster))
            .await
            .unwrap();
    }

    /// Checks that every step of `answer` succeeded, named and prepared
    /// statements included, and that the clients noticed nothing: no
    /// error, no end, no new connection, pgwarden's cancel key unchanged.
    fn assert_unnoticed(&self, answer: &Value, after: &str) {
        assert_eq!(answer["failed"], json!([]), "after {after}: {answer}");
        let connected = &self.connected;
        assert_eq!(
            answer["events"], connected["events"],
            "after {after}: {answer}"
        );
        assert_eq!(answer["pgProcessId"], connected["pgProcessId"], "{answer}");
    }

    /// Ends the clients; each run committed one transaction, `runs` of them.
    async fn exit(mut self, runs: usize) {
        let exited = self.script.ask("exit", COMMAND_DEADLINE).await;
        assert_eq!(exited["exited"], true);
        let uses = self
            .cluster
            .psql("SELECT uses FROM restart_item WHERE id = 1");
        assert_eq!(uses.trim(), runs.to_string(), "one commit per run");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_clients_stay_connected_and_keep_their_statements_across_restarts() {
    let mut clients = Clients::connect(clients_notice_first).await;
    for round in 1..=2 {
        clients.break_database(Cluster::restart_fast).await;
        let answer = clients.script.ask("run", COMMAND_DEADLINE).await;
        clients.assert_unnoticed(&answer, &format!("restart {round}"));
        assert_eq!(clients.daemon.reconnects().await, round as f64);
    }
    clients.exit(3).await;
}

/// An immediate shutdown, as a crash, ends each backend with a WARNING
/// rather than a FATAL error: the statement that meets such a session
/// must not be the one to pay for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_clients_stay_connected_and_keep_their_statements_across_a_crash() {
    let mut clients = Clients::connect(clients_notice_first).await;
    clients.break_database(Cluster::crash_and_restart).await;
    let answer = clients.script.ask("run", COMMAND_DEADLINE).await;
    clients.assert_unnoticed(&answer, "a crash");
    clients.exit(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_statements_sent_while_the_database_is_down_wait_for_it() {
    let mut clients = Clients::connect(|cluster| Config {
        guard_timeout_ms: 30_000,
        ..clients_notice_first(cluster)
    })
    .await;
    clients.break_database(Cluster::stop).await;
    clients.script.send("run").await;
    let early = clients.script.answer_within(Duration::from_secs(1)).await;
    assert_eq!(early, None, "answered while the database was down");
    clients.break_database(Cluster::start_again).await;
    let answer = clients
        .script
        .answer_within(COMMAND_DEADLINE)
        .await
        .expect("answered once the database was back");
    clients.assert_unnoticed(&answer, "a stop and a start");
    clients.exit(2).await;
}
