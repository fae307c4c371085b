//! Helpers that connect pgwarden's own backend to a kit cluster.

use std::time::{Duration, Instant};

use pgwarden::backend::{ConnectOptions, Connection, Connector, Secret, SslMode};

use super::cluster::Cluster;

/// Options for `user` (with `password`) over TCP, TLS disabled unless changed.
pub fn options(cluster: &Cluster, user: &str, password: Option<&str>) -> ConnectOptions {
    let mut options = ConnectOptions::tcp(cluster.host(), cluster.port(), user, "postgres");
    options.password = password.map(Secret::new);
    options.ssl_mode = SslMode::Disable;
    options.connect_timeout = Duration::from_secs(10);
    options
}

/// Options for the superuser over TCP without TLS.
pub fn superuser(cluster: &Cluster) -> ConnectOptions {
    options(cluster, "postgres", None)
}

/// Opens a connection with `options`, panicking with the reason on failure.
pub async fn connect(options: ConnectOptions) -> Connection {
    let connector = Connector::new(options).expect("valid connector");
    connector.connect().await.expect("connect")
}

/// Runs one statement and returns its rows as strings.
pub async fn rows(conn: &mut Connection, sql: &str) -> Vec<Vec<Option<String>>> {
    conn.simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .pop()
        .expect("one result")
        .rows_as_strings()
}

/// The single value of a one-row, one-column query.
pub async fn scalar(conn: &mut Connection, sql: &str) -> Option<String> {
    rows(conn, sql).await.remove(0).remove(0)
}

/// Waits until a statement matching `like` is running on the server, so a
/// fault or cancel arrives while it executes rather than before.
pub fn wait_until_running(cluster: &Cluster, like: &str) {
    let probe = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE '{like}'"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while cluster.psql(&probe).trim() == "0" {
        assert!(
            Instant::now() < deadline,
            "no statement like {like:?} started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until no session of pgwarden's (application_name `pgwarden`) is
/// left on the server: a terminated backend sends its FATAL before it exits,
/// so afterwards every idle socket of the pool holds its goodbye.
pub fn wait_until_sessions_gone(cluster: &Cluster) {
    wait_until_none(
        cluster,
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgwarden'",
        Duration::from_secs(20),
        "terminated sessions never went away",
    );
}

/// Waits up to `within` until the `count(*)` query `probe` says 0,
/// panicking with `failure` otherwise.
pub fn wait_until_none(cluster: &Cluster, probe: &str, within: Duration, failure: &str) {
    let deadline = Instant::now() + within;
    while cluster.psql(probe).trim() != "0" {
        assert!(Instant::now() < deadline, "{failure}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits (20 s at most) until a session of pgwarden's (application_name
/// `pgwarden`) sits in `state` after running `query`, and returns its
/// server process id. With latency on a proxy in between, the session's
/// answer is then still on its way: a fault injected now hits the request
/// at exactly that point (e.g. `idle in transaction` after the first round
/// trip of a write: its row locks held, COMMIT not yet sent).
pub fn wait_for_session(cluster: &Cluster, state: &str, query: &str) -> i32 {
    let probe = format!(
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'pgwarden' \
         AND state = '{state}' AND query = '{}'",
        query.replace('\'', "''")
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let found = cluster.psql(&probe);
        if let Ok(pid) = found.trim().parse() {
            return pid;
        }
        assert!(
            Instant::now() < deadline,
            "no session {state} after {query}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
