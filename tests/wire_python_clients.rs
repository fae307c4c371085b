//! Real Python clients through the wire front end: psycopg 3 and asyncpg
//! (tests/clients/python, pinned in its requirements.txt) connect to
//! pgwarden as to PostgreSQL, with fewer server sessions than
//! connections, so that every scenario runs under transaction pooling:
//! typed parameters, transactions, named prepared statements, pipelines,
//! cancels, COPY, LISTEN/NOTIFY, session settings, a pool of sixteen on
//! four sessions, and connections that outlive a database restart.
//!
//! The scenarios are pytest modules; each test here starts a cluster and
//! a pgwarden with the pool size its module is written for, and checks
//! that all of its tests passed, so many of them.

mod support;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use pgwarden::config::Config;
use support::Cluster;
use support::daemon::{TestDaemon, config_for};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::task::JoinHandle;

/// How long one pytest module may run; they take seconds.
const PYTEST_TIMEOUT: Duration = Duration::from_secs(300);

/// How long the restart driver may take to answer one command.
const DRIVER_TIMEOUT: Duration = Duration::from_secs(60);

/// pytest, quiet, without a cache in the source tree, with a summary of
/// each failure and error.
const PYTEST: [&str; 6] = ["-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfE"];

const INSTALL: &str = "python3 -m pip install -r tests/clients/python/requirements.txt";

/// tests/clients/python, once its clients are known to be installed.
fn python_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/clients/python");
    let mut check = std::process::Command::new("python3");
    check.args(["-c", "import psycopg, asyncpg, pytest"]);
    let output = support::process::run(&mut check, None, Duration::from_secs(60));
    match output {
        Ok(output) if output.status.success() => dir,
        Ok(output) => panic!(
            "the Python clients are not installed: run `{INSTALL}`\n{}",
            String::from_utf8_lossy(&output.stderr)
        ),
        Err(error) => panic!("python3 is needed, then `{INSTALL}`: {error}"),
    }
}

/// A pgwarden in front of `cluster` with exactly `sessions` server sessions.
fn pool_of(cluster: &Cluster, sessions: usize) -> Config {
    Config {
        max_connections: sessions,
        min_connections: 1,
        ..config_for(cluster)
    }
}

fn pgwarden_url(daemon: &TestDaemon) -> String {
    let address = daemon.pg_addr();
    format!(
        "postgresql://postgres@127.0.0.1:{}/postgres?sslmode=disable",
        address.port()
    )
}

fn python(daemon: &TestDaemon, cluster: &Cluster) -> Command {
    let mut command = Command::new("python3");
    command
        .current_dir(python_dir())
        .env("PGWARDEN_URL", pgwarden_url(daemon))
        .env(
            "DIRECT_URL",
            format!("{}?sslmode=disable", cluster.url("postgres", None)),
        )
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .kill_on_drop(true);
    command
}

/// Runs the pytest `module` against a pgwarden with `sessions` server
/// sessions in front of a fresh cluster, and checks that its `passes`
/// tests all passed. Returns both for the checks that follow.
async fn run_pytest(module: &str, sessions: usize, passes: usize) -> (Cluster, TestDaemon) {
    let cluster = Cluster::start();
    let daemon = TestDaemon::start(pool_of(&cluster, sessions)).await;
    let mut command = python(&daemon, &cluster);
    command
        .args(PYTEST)
        .arg(module)
        .env("PGWARDEN_SERVER_SESSIONS", sessions.to_string());
    let output = tokio::time::timeout(PYTEST_TIMEOUT, command.output())
        .await
        .unwrap_or_else(|_| panic!("{module} still ran after {PYTEST_TIMEOUT:?}"))
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{module} failed against pgwarden:\n{stdout}\n{stderr}"
    );
    let summary = format!("{passes} passed in ");
    assert!(
        stdout.lines().any(|line| line.starts_with(&summary)),
        "{module}: expected {passes} passed tests:\n{stdout}"
    );
    (cluster, daemon)
}

/// Checks that, once the Python clients have gone, the server has at most
/// `sessions` client sessions: pgwarden's pool and its health check's.
/// Backends of closed connections take a moment to go.
fn server_sessions_settle_at_most(cluster: &Cluster, sessions: u32) {
    let sql = "SELECT count(*) FROM pg_stat_activity \
        WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()";
    let mut count = 0;
    let settled = tokio::task::block_in_place(|| {
        support::wait::eventually(Duration::from_secs(10), || {
            count = cluster.psql(sql).trim().parse().unwrap();
            count <= sessions
        })
    });
    assert!(
        settled,
        "{count} server sessions, expected at most {sessions}"
    );
}

/// Waits (10 s at most) until no wire client is connected.
async fn all_clients_left(daemon: &TestDaemon) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = daemon.metrics().await;
        let connected: f64 = text
            .lines()
            .filter(|l| l.starts_with("pgwarden_wire_clients{"))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum();
        if connected == 0.0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{connected} wire clients are still connected after the Python process exited"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_on_one_server_session_works_as_against_postgres() {
    // Typed parameters (text and binary) in autocommit and in transactions,
    // compared with the same queries on the database itself; savepoints;
    // prepare_threshold=0 on two connections; statements psycopg
    // deallocates; pipelines with an error in the middle; cancels from
    // another thread; COPY in and out of megabytes, and one abandoned;
    // a pinned connection's settings reset before the next client.
    let (cluster, daemon) = run_pytest("test_psycopg.py", 1, 17).await;
    let hits = daemon
        .metric(r#"pgwarden_wire_prepared_statements_total{event="hit"}"#)
        .await;
    assert!(
        hits >= 30.0,
        "psycopg's named statements were shared: {hits} hits"
    );
    all_clients_left(&daemon).await;
    server_sessions_settle_at_most(&cluster, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_listen_notify_and_session_settings_on_two_server_sessions() {
    // A LISTEN or a session SET pins its connection to one session; the
    // notifications reach it while it waits, and the other connections
    // share the second session without seeing its settings.
    let (cluster, daemon) = run_pytest("test_psycopg_sessions.py", 2, 2).await;
    all_clients_left(&daemon).await;
    server_sessions_settle_at_most(&cluster, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg_on_one_server_session_works_as_against_postgres() {
    // Two connections' statement caches on one session, typed parameters
    // compared with the database itself, an enum and a domain asyncpg
    // must ask the server about, transactions committed, rolled back and
    // failed, savepoints, COPY of records and from a query, a timeout that
    // cancels, and a cancel from outside.
    let (cluster, daemon) = run_pytest("test_asyncpg.py", 1, 8).await;
    let hits = daemon
        .metric(r#"pgwarden_wire_prepared_statements_total{event="hit"}"#)
        .await;
    assert!(
        hits >= 20.0,
        "asyncpg's named statements were shared: {hits} hits"
    );
    all_clients_left(&daemon).await;
    server_sessions_settle_at_most(&cluster, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_asyncpg_pool_of_sixteen_shares_four_server_sessions() {
    // 500 reads and single-row UPDATEs, twice: with asyncpg's own reset
    // query at each release, and with one the pool is given.
    let (cluster, daemon) = run_pytest("test_asyncpg_pool.py", 4, 2).await;
    let units = daemon
        .metric(
            r#"pgwarden_requests_duration_seconds_count{api="pgwire",kind="query",outcome="ok"}"#,
        )
        .await;
    assert!(units >= 1000.0, "each operation was a unit: {units}");
    let timed_out = r#"pgwarden_requests_duration_seconds_count{api="pgwire",kind="query",outcome="guard_timeout"}"#;
    let timeouts = daemon.metric(timed_out).await;
    assert_eq!(timeouts, 0.0, "no connection waited out the guard's budget");
    all_clients_left(&daemon).await;
    server_sessions_settle_at_most(&cluster, 5);
}

/// tests/clients/python/restart_driver.py: a psycopg and an asyncpg
/// connection kept open across commands.
struct Driver {
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
    stderr: JoinHandle<String>,
}

/// What one `round` of the driver reports.
#[derive(Debug)]
struct Round {
    psycopg_backend: u32,
    asyncpg_backend: u32,
    /// Copies of the shared statement text on the server session.
    prepared: u32,
}

impl Driver {
    async fn start(daemon: &TestDaemon, cluster: &Cluster) -> Driver {
        let mut child = python(daemon, cluster)
            .arg("restart_driver.py")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3 runs");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut pipe = child.stderr.take().unwrap();
        let stderr = tokio::spawn(async move {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text).await;
            text
        });
        let mut driver = Driver {
            child,
            stdin,
            stdout,
            stderr,
        };
        assert_eq!(driver.line().await, "ready");
        driver
    }

    /// The driver's next line; if there is none, what it wrote to stderr.
    async fn line(&mut self) -> String {
        let silence = match tokio::time::timeout(DRIVER_TIMEOUT, self.stdout.next_line()).await {
            Ok(Ok(Some(line))) => return line,
            Ok(Ok(None)) => "exited".to_owned(),
            Ok(Err(error)) => format!("could not be read: {error}"),
            Err(_) => format!("said nothing for {DRIVER_TIMEOUT:?}"),
        };
        let _ = self.child.start_kill();
        let stderr = (&mut self.stderr).await.unwrap_or_default();
        panic!("the restart driver {silence}:\n{stderr}");
    }

    async fn round(&mut self) -> Round {
        self.stdin.write_all(b"round\n").await.unwrap();
        let line = self.line().await;
        let field = |name: &str| -> u32 {
            line.split(' ')
                .find_map(|word| word.strip_prefix(name)?.strip_prefix('='))
                .and_then(|value| value.parse().ok())
                .unwrap_or_else(|| panic!("the round failed: {line}"))
        };
        Round {
            psycopg_backend: field("psycopg_backend"),
            asyncpg_backend: field("asyncpg_backend"),
            prepared: field("prepared"),
        }
    }

    async fn quit(mut self) {
        self.stdin.write_all(b"quit\n").await.unwrap();
        let status = tokio::time::timeout(DRIVER_TIMEOUT, self.child.wait())
            .await
            .expect("the driver exits")
            .unwrap();
        let stderr = self.stderr.await.unwrap_or_default();
        assert!(status.success(), "{stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_psycopg_and_asyncpg_connections_survive_a_database_restart() {
    let cluster = Cluster::start();
    cluster.psql(
        "CREATE TABLE restart_probe (id int PRIMARY KEY, n int); INSERT INTO restart_probe VALUES (1, 0), (2, 0)",
    );
    let daemon = TestDaemon::start(pool_of(&cluster, 1)).await;
    let mut driver = Driver::start(&daemon, &cluster).await;
    let before = driver.round().await;
    assert_eq!(
        before.psycopg_backend, before.asyncpg_backend,
        "both clients share the one server session"
    );
    driver.round().await;

    tokio::task::block_in_place(|| cluster.restart_fast());
    // The very next statements, prepared ones included, on a session of
    // the restarted server, by the same client connections.
    let after = driver.round().await;
    assert_ne!(after.psycopg_backend, before.psycopg_backend, "{after:?}");
    assert_eq!(after.psycopg_backend, after.asyncpg_backend);
    assert!(after.prepared >= 1, "prepared again on the new session");
    driver.round().await;
    driver.quit().await;

    assert_eq!(
        cluster.psql("SELECT n FROM restart_probe ORDER BY id"),
        "4\n4\n"
    );
    assert!(daemon.reconnects().await >= 1.0);
}
