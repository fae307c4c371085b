//! Explicit transactions over the wire when their server session breaks:
//! one that was open fails once with a retryable error (40001) and the
//! client stays connected, in a failed transaction that its ROLLBACK ends;
//! a COMMIT in flight is answered with what really became of it.
//! Real clients, a real server broken on purpose.

mod support;

use std::time::Duration;

use pgwarden::config::Config;
use support::Cluster;
use support::daemon::{TestDaemon, config_for};
use support::wire::{Raw, error_code, first_value, tags};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

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

/// The server process of the client's session, once it is `state`.
fn backend_of(cluster: &Cluster, state: &str) -> i32 {
    let probe = format!(
        "SELECT pid FROM pg_stat_activity WHERE application_name = '{APP}' AND state = '{state}'"
    );
    for _ in 0..400 {
        if let Ok(pid) = cluster.psql(&probe).trim().parse() {
            return pid;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("no session of the client is {state}");
}

fn terminate(cluster: &Cluster, pid: i32) {
    let done = cluster.psql(&format!("SELECT pg_terminate_backend({pid})"));
    assert_eq!(done.trim(), "t", "the backend was terminated");
}

/// How often the replay rule `rule` decided, from `/status`.
async fn decisions(daemon: &TestDaemon, rule: &str) -> u64 {
    let status = daemon.ops_get("/status").await.body;
    status["replay_decisions"][rule].as_u64().unwrap_or(0)
}

fn ids(cluster: &Cluster) -> String {
    cluster.psql("SELECT coalesce(string_agg(id::text, ',' ORDER BY id), '') FROM ledger")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_whose_session_ended_fails_once_with_a_retryable_error() {
    let cluster = Cluster::start();
    cluster.psql("CREATE TABLE ledger (id int PRIMARY KEY)");
    let daemon = TestDaemon::start(config(&cluster)).await;
    let db = client(&daemon).await;

    db.batch_execute("BEGIN; INSERT INTO ledger VALUES (1)")
        .await
        .unwrap();
    terminate(&cluster, backend_of(&cluster, "idle in transaction"));

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
    let cluster = Cluster::start();
    cluster.psql("CREATE TABLE ledger (id int PRIMARY KEY)");
    let daemon = TestDaemon::start(config(&cluster)).await;
    let db = client(&daemon).await;

    db.batch_execute("BEGIN; INSERT INTO ledger VALUES (1)")
        .await
        .unwrap();
    terminate(&cluster, backend_of(&cluster, "idle in transaction"));
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
    terminate(&cluster, backend_of(&cluster, "idle in transaction"));

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
    let pid = backend_of(&cluster, "active");
    terminate(&cluster, pid);
    no_standby_wait(&cluster);

    let (db, result) = tokio::time::timeout(Duration::from_secs(20), commit)
        .await
        .expect("the COMMIT is answered")
        .unwrap();
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
    let pid = backend_of(&cluster, "active");
    terminate(&cluster, pid);

    let (db, result) = tokio::time::timeout(Duration::from_secs(20), commit)
        .await
        .expect("the COMMIT is answered")
        .unwrap();
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
