//! What a wire client gets when its server session breaks under it, and
//! that it stays connected in every case: a statement outside a
//! transaction is replayed when that is provably safe and answered when it
//! provably committed, never applied twice; a transaction that was open
//! fails once with a retryable error (40001), in a failed transaction that
//! its ROLLBACK ends; a COMMIT in flight is answered with what really
//! became of it; a client pinned to its session (LISTEN) is told what it
//! lost. Real clients, a real server broken on purpose.

mod support;

use std::time::Duration;

use pgwarden::config::Config;
use support::Cluster;
use support::daemon::{TestDaemon, config_for};
use support::load::{Load, assert_no_failures, check_ledger, purchase_order_sql};
use support::pg::wait_until_none;
use support::wire::{Raw, error_code, first_value, tags};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

const APP: &str = "wire-tx";

fn config(cluster: &Cluster) -> Config {
    Config {
        max_connections: 2,
        min_connections: 2,
        ..config_for(cluster)
    }
}

async fn client(daemon: &TestDaemon) -> Client {
    let dsn = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=disable application_name={APP}",
        daemon.pg_addr().port()
    );
    let (client, connection) = tokio_postgres::connect(&dsn, NoTls)
        .await
        .expect("connects");
    tokio::spawn(connection);
    client
}

/// The SQLSTATE of a failed statement.
async fn code_of(client: &Client, sql: &str) -> Option<SqlState> {
    let error = client.batch_execute(sql).await.expect_err(sql);
    error.code().cloned()
}

/// The server process of the client's session, once it is `state` after
/// (or while) running a statement that starts with `query`.
fn backend_of(cluster: &Cluster, state: &str, query: &str) -> i32 {
    let probe = format!(
        "SELECT pid FROM pg_stat_activity WHERE application_name = '{APP}' \
         AND state = '{state}' AND query LIKE '{query}%' ORDER BY backend_start DESC LIMIT 1"
    );
    for _ in 0..400 {
        if let Ok(pid) = cluster.psql(&probe).trim().parse() {
            return pid;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("no session of the client is {state} after {query}");
}

/// Ends a server process the way an operator does, and returns once it
/// is gone (its goodbye is out before it exits), so that what the client
/// sends next meets a session that has ended.
fn terminate(cluster: &Cluster, pid: i32) {
    let done = cluster.psql(&format!("SELECT pg_terminate_backend({pid})"));
    assert_eq!(done.trim(), "t", "the backend was terminated");
    let gone = format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}");
    wait_until_none(
        cluster,
        &gone,
        Duration::from_secs(10),
        "the backend stayed",
    );
}

/// How often the replay rule `rule` decided, from `/status`.
async fn decisions(daemon: &TestDaemon, rule: &str) -> u64 {
    let status = daemon.ops_get("/status").await.body;
    status["replay_decisions"][rule].as_u64().unwrap_or(0)
}

/// A client inside a transaction that wrote row 1 of `ledger`, whose
/// server session was then terminated.
async fn transaction_whose_session_ended() -> (Cluster, TestDaemon, Client) {
    let cluster = Cluster::start();
    cluster.psql("CREATE TABLE ledger (id int PRIMARY KEY)");
    let daemon = TestDaemon::start(config(&cluster)).await;
    let db = client(&daemon).await;
    db.batch_execute("BEGIN; INSERT INTO ledger VALUES (1)")
        .await
        .unwrap();
    terminate(
        &cluster,
        backend_of(&cluster, "idle in transaction", "BEGIN"),
    );
    (cluster, daemon, db)
}

/// What a statement running in the background got, within 20 s.
async fn answered<T>(running: tokio::task::JoinHandle<T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), running)
        .await
        .expect("answered")
        .expect("the client task ran")
}

fn ids(cluster: &Cluster) -> String {
    cluster.psql("SELECT coalesce(string_agg(id::text, ',' ORDER BY id), '') FROM ledger")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_whose_session_ended_fails_once_with_a_retryable_error() {
    let (cluster, daemon, db) = transaction_whose_session_ended().await;

    assert_eq!(
        code_of(&db, "INSERT INTO ledger VALUES (2)").await,
        Some(SqlState::T_R_SERIALIZATION_FAILURE),
        "the next statement learns that the transaction is gone, with the code clients retry"
    );
    assert_eq!(
        code_of(&db, "SELECT 1").await,
        Some(SqlState::IN_FAILED_SQL_TRANSACTION),
        "then, as in any failed transaction, statements are refused until its end"
    );
    db.batch_execute("ROLLBACK")
        .await
        .expect("ROLLBACK ends it");

    db.batch_execute("BEGIN; INSERT INTO ledger VALUES (3); COMMIT")
        .await
        .expect("the retried transaction runs on a fresh session");
    assert_eq!(
        ids(&cluster).trim(),
        "3",
        "only the retried transaction's row"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        daemon.reconnects().await,
        0.0,
        "one terminated session is not a failure of the database"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_after_the_session_ended_unseen_gets_the_error_not_a_rollback_tag() {
    let (cluster, _daemon, db) = transaction_whose_session_ended().await;
    assert_eq!(
        code_of(&db, "COMMIT").await,
        Some(SqlState::T_R_SERIALIZATION_FAILURE),
        "a COMMIT of a transaction lost unseen fails: a ROLLBACK tag is too easy to miss"
    );
    db.batch_execute("INSERT INTO ledger VALUES (2)")
        .await
        .expect("the COMMIT ended the transaction; the client goes on outside one");
    assert_eq!(ids(&cluster).trim(), "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_transaction_is_ended_in_the_extended_protocol_too() {
    let cluster = Cluster::start();
    let daemon = TestDaemon::start(config(&cluster)).await;
    let mut raw = Raw::connect(daemon.pg_addr()).await;
    raw.query("SET application_name = 'wire-tx'")
        .exchange()
        .await;
    let begun = raw.query("BEGIN").exchange().await;
    assert_eq!(status(&begun), b'T');
    terminate(
        &cluster,
        backend_of(&cluster, "idle in transaction", "BEGIN"),
    );

    let refused = raw.parse("", "SELECT 1").run("").sync().exchange().await;
    assert_eq!(error_code(&refused), "40001");
    assert_eq!((tags(&refused).as_str(), status(&refused)), ("EZ", b'E'));
    let refused = raw.parse("", "SELECT 2").run("").sync().exchange().await;
    assert_eq!(error_code(&refused), "25P02");
    assert_eq!(status(&refused), b'E');

    let ended = raw.parse("", "ROLLBACK").run("").sync().exchange().await;
    assert_eq!(
        (tags(&ended).as_str(), status(&ended)),
        ("12CZ", b'I'),
        "Parse, Bind and Execute of ROLLBACK answered as PostgreSQL answers them"
    );
    let again = raw.query("SELECT 40 + 2").exchange().await;
    assert_eq!(first_value(&again), "42");
    assert_eq!(status(&again), b'I');
}

/// The transaction status of the ReadyForQuery that ends `replies`.
fn status(replies: &[(u8, Vec<u8>)]) -> u8 {
    let (tag, body) = replies.last().expect("replies");
    assert_eq!(*tag, b'Z');
    body[0]
}

/// A server whose COMMITs wait for a synchronous standby that never
/// comes: a COMMIT is durable here and then waits, so a session ended
/// then ends under a COMMIT that did commit.
fn waiting_for_a_standby(cluster: &Cluster) {
    cluster.psql("ALTER SYSTEM SET synchronous_standby_names = 'nobody'");
    cluster.psql("SELECT pg_reload_conf()");
    // The reload is asynchronous: once a new session sees the setting, the
    // postmaster has passed it on to the sessions already open, which
    // take it before their next statement.
    for _ in 0..400 {
        if cluster.psql("SHOW synchronous_standby_names").trim() == "nobody" {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("the server never took the new setting");
}

fn no_standby_wait(cluster: &Cluster) {
    cluster.psql("ALTER SYSTEM RESET synchronous_standby_names");
    cluster.psql("SELECT pg_reload_conf()");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_in_flight_that_committed_is_answered_commit() {
    let cluster = Cluster::start();
    cluster.psql("CREATE TABLE ledger (id int PRIMARY KEY)");
    let daemon = TestDaemon::start(config(&cluster)).await;
    let db = client(&daemon).await;
    db.batch_execute("BEGIN; INSERT INTO ledger VALUES (1)")
        .await
        .unwrap();
    waiting_for_a_standby(&cluster);

    let commit = tokio::spawn(async move {
        let result = db.batch_execute("COMMIT").await;
        (db, result)
    });
    let pid = backend_of(&cluster, "active", "COMMIT");
    terminate(&cluster, pid);
    no_standby_wait(&cluster);

    let (db, result) = answered(commit).await;
    result.expect("the transaction committed, and the client is told so");
    assert_eq!(ids(&cluster).trim(), "1");
    assert_eq!(
        decisions(&daemon, "committed").await,
        1,
        "asked, and found committed"
    );
    db.batch_execute("INSERT INTO ledger VALUES (2)")
        .await
        .expect("the client goes on");
    assert_eq!(ids(&cluster).trim(), "1,2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_in_flight_that_did_not_commit_fails_with_the_retryable_error() {
    let cluster = Cluster::start();
    // A deferred trigger that sleeps: the COMMIT runs it, and a session
    // ended then ends under a COMMIT that never committed.
    cluster.psql(
        "CREATE TABLE ledger (id int PRIMARY KEY);
         CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN PERFORM pg_sleep(30); RETURN NULL; END $$;
         CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON ledger
           DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow();",
    );
    let daemon = TestDaemon::start(config(&cluster)).await;
    let db = client(&daemon).await;
    db.batch_execute("BEGIN; INSERT INTO ledger VALUES (1)")
        .await
        .unwrap();

    let commit = tokio::spawn(async move {
        let result = db.batch_execute("COMMIT").await;
        (db, result)
    });
    let pid = backend_of(&cluster, "active", "COMMIT");
    terminate(&cluster, pid);

    let (db, result) = answered(commit).await;
    let error = result.expect_err("the transaction did not commit");
    assert_eq!(
        error.code(),
        Some(&SqlState::T_R_SERIALIZATION_FAILURE),
        "{error}"
    );
    assert_eq!(ids(&cluster).trim(), "");
    assert_eq!(
        decisions(&daemon, "aborted").await,
        1,
        "asked, and found rolled back"
    );
    cluster.psql("DROP TRIGGER slow_commit ON ledger");
    db.batch_execute("BEGIN; INSERT INTO ledger VALUES (2); COMMIT")
        .await
        .expect("the retried transaction commits");
    assert_eq!(ids(&cluster).trim(), "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listening_client_whose_session_ended_is_told_to_listen_again() {
    let cluster = Cluster::start();
    let daemon = TestDaemon::start(config(&cluster)).await;
    let mut raw = Raw::connect(daemon.pg_addr()).await;
    raw.query("SET application_name = 'wire-tx'")
        .exchange()
        .await;
    raw.query("LISTEN jobs").exchange().await;
    let pinned = r#"pgwarden_wire_clients{state="pinned"}"#;
    assert_eq!(daemon.metric(pinned).await, 1.0, "LISTEN pins the client");
    terminate(&cluster, backend_of(&cluster, "idle", "LISTEN"));

    let told = raw.query("SELECT 1").exchange().await;
    assert_eq!(
        tags(&told),
        "NEZ",
        "a warning as soon as the session ended, then the next statement fails"
    );
    assert_eq!(error_code(&told), "08006");
    let text = String::from_utf8_lossy(&told[1].1).into_owned();
    assert!(text.contains("LISTEN again"), "{text}");
    assert_eq!(
        daemon.metric(pinned).await,
        0.0,
        "the pin went with the session"
    );

    let again = raw.query("SELECT 42").exchange().await;
    assert_eq!(first_value(&again), "42", "the client goes on");
    raw.query("LISTEN jobs").exchange().await;
    cluster.psql("NOTIFY jobs, 'after'");
    let notified = raw.query("SELECT 1").exchange().await;
    assert!(
        tags(&notified).contains('A'),
        "listening again receives notifications: {}",
        tags(&notified)
    );
}

fn count(cluster: &Cluster) -> String {
    cluster
        .psql("SELECT count(*) FROM ledger")
        .trim()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_whose_session_ended_under_it_is_replayed() {
    let cluster = Cluster::start();
    let daemon = TestDaemon::start(config(&cluster)).await;
    let db = client(&daemon).await;
    let read = "SELECT pg_sleep(1)::text || 'slept'";
    let running = tokio::spawn(async move { db.simple_query(read).await });
    terminate(&cluster, backend_of(&cluster, "active", "SELECT pg_sleep"));

    let rows = answered(running)
        .await
        .expect("replayed on a fresh session, not failed");
    let value = rows.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
        _ => None,
    });
    assert_eq!(value.as_deref(), Some("slept"));
    assert_eq!(
        decisions(&daemon, "read").await,
        1,
        "a read in a read-only transaction is replayed whatever point it reached"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_session_ended_before_it_committed_is_applied_once() {
    let cluster = Cluster::start();
    cluster.psql("CREATE TABLE ledger (id serial PRIMARY KEY, note text)");
    let daemon = TestDaemon::start(config(&cluster)).await;
    let db = client(&daemon).await;
    // Extended protocol, a parameter: what drivers send.
    let write = "INSERT INTO ledger (note) SELECT $1::text FROM pg_sleep(1)";
    let running = tokio::spawn(async move { db.execute(write, &[&"once"]).await });
    terminate(
        &cluster,
        backend_of(&cluster, "active", "INSERT INTO ledger"),
    );

    let inserted = answered(running).await.expect("replayed, not failed");
    assert_eq!(inserted, 1);
    assert_eq!(count(&cluster), "1", "applied once, never twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_committed_before_its_session_ended_is_answered_not_replayed() {
    let cluster = Cluster::start();
    cluster.psql("CREATE TABLE ledger (id serial PRIMARY KEY, note text)");
    let daemon = TestDaemon::start(config(&cluster)).await;
    let db = client(&daemon).await;
    waiting_for_a_standby(&cluster);
    let running = tokio::spawn(async move {
        db.simple_query("INSERT INTO ledger (note) VALUES ('committed')")
            .await
    });
    // Durable here, waiting for the standby: the session ends now.
    let pid = backend_of(&cluster, "active", "INSERT INTO ledger");
    terminate(&cluster, pid);
    no_standby_wait(&cluster);

    let answered = answered(running)
        .await
        .expect("it committed: the client is answered with its own result");
    assert!(matches!(
        answered.last(),
        Some(SimpleQueryMessage::CommandComplete(1))
    ));
    assert_eq!(
        count(&cluster),
        "1",
        "answered from the result in hand, not replayed"
    );
    assert_eq!(decisions(&daemon, "committed").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_and_writes_in_flight_across_a_restart_are_replayed_once() {
    let cluster = Cluster::start();
    cluster.psql("CREATE TABLE ledger (id serial PRIMARY KEY, note text)");
    let daemon = TestDaemon::start(config(&cluster)).await;
    let (reader, writer) = (client(&daemon).await, client(&daemon).await);
    let read = tokio::spawn(async move {
        reader
            .query_one("SELECT $1::int + 1 FROM pg_sleep(1)", &[&41])
            .await
            .map(|row| row.get::<_, i32>(0))
    });
    let write = tokio::spawn(async move {
        writer
            .simple_query("INSERT INTO ledger (note) SELECT 'w' FROM pg_sleep(1)")
            .await
            .map(|_| ())
    });
    let probe = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = '{APP}' AND state = 'active'"
    );
    for _ in 0..400 {
        if cluster.psql(&probe).trim() == "2" {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    cluster.restart_fast();

    let within = Duration::from_secs(20);
    let read = tokio::time::timeout(within, read).await.expect("answered");
    assert_eq!(read.unwrap().expect("the read is replayed"), 42);
    let write = tokio::time::timeout(within, write).await.expect("answered");
    write.unwrap().expect("the write is replayed");
    assert_eq!(count(&cluster), "1", "applied once");
    assert!(
        daemon.reconnects().await >= 1.0,
        "a new generation served the replays"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wire_clients_ride_out_a_restart_a_crash_and_a_mass_termination_with_no_write_lost_or_doubled()
 {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("pgwarden=info")
        .with_test_writer()
        .try_init();
    let clients = 16;
    let cluster = Cluster::start();
    cluster.psql(&purchase_order_sql(clients));
    let daemon = TestDaemon::start(Config {
        max_connections: 4,
        min_connections: 4,
        ..config_for(&cluster)
    })
    .await;
    let load = Load::start_wire(daemon.pg_addr(), clients);
    let pause = || tokio::time::sleep(Duration::from_millis(1500));
    pause().await;
    cluster.restart_fast();
    pause().await;
    cluster.crash_and_restart();
    pause().await;
    cluster.terminate_backends();
    pause().await;
    let reports = load.stop().await;

    assert_no_failures(&reports);
    check_ledger(&cluster, &reports);
    let unknown: u64 = reports.iter().map(|r| r.unknown).sum();
    assert_eq!(unknown, 0, "no write was left in doubt (08007)");
    assert_eq!(daemon.reconnects().await, 3.0, "one reconnect per fault");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_that_writes_runs_again_as_a_write_and_the_client_never_sees_the_refusal() {
    let cluster = Cluster::start();
    cluster.psql("CREATE SEQUENCE ticket");
    let daemon = TestDaemon::start(config(&cluster)).await;
    let db = client(&daemon).await;
    for expected in 1..=3i64 {
        // Looks like a read; nextval() writes, so the read-only run is
        // refused (25006) and the statement runs as a write.
        let row = db.query_one("SELECT nextval('ticket')", &[]).await.unwrap();
        assert_eq!(row.get::<_, i64>(0), expected);
    }
    let simple = db.simple_query("SELECT nextval('ticket')").await.unwrap();
    let value = simple.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
        _ => None,
    });
    assert_eq!(value.as_deref(), Some("4"), "each call applied once");
}
