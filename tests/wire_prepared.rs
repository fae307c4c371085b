//! Named prepared statements through the wire front end, with real
//! clients against a real server: a statement a client prepared works on
//! whichever server session serves it, a session of a new generation
//! included; clients share sessions (and the statements on them) without
//! pinning; Close, `DEALLOCATE` and `DISCARD ALL` do what PostgreSQL does;
//! the server keeps a bounded number per session.

mod support;

use std::time::Duration;

use pgwarden::config::Config;
use support::Cluster;
use support::daemon::{TestDaemon, config_for};
use support::wire::{Raw, error_code, first_value, tags};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

async fn client(daemon: &TestDaemon) -> Client {
    let dsn = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=disable",
        daemon.pg_addr().port()
    );
    let (client, connection) = tokio_postgres::connect(&dsn, NoTls)
        .await
        .expect("connects");
    tokio::spawn(connection);
    client
}

/// One server session for all clients, so every statement of every
/// client meets the others' on it.
fn one_session(cluster: &Cluster) -> Config {
    Config {
        max_connections: 1,
        min_connections: 1,
        ..config_for(cluster)
    }
}

/// The first column of the first row of a simple query.
async fn simple_scalar(client: &Client, sql: &str) -> String {
    let messages = client.simple_query(sql).await.unwrap();
    messages
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        })
        .expect("a row")
}

async fn prepared_events(daemon: &TestDaemon, event: &str) -> f64 {
    let series = format!("pgwarden_wire_prepared_statements_total{{event=\"{event}\"}}");
    daemon.metric(&series).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_alternate_their_own_statements_on_one_session_without_pinning() {
    let cluster = Cluster::start();
    let daemon = TestDaemon::start(one_session(&cluster)).await;
    let (a, b) = (client(&daemon).await, client(&daemon).await);
    let a_add = a.prepare("SELECT $1::int8 + 1").await.unwrap();
    let b_text = b.prepare("SELECT $1::text || ' from b'").await.unwrap();
    let b_add = b.prepare("SELECT $1::int8 + 1").await.unwrap();
    for n in 0..5i64 {
        let row = a.query_one(&a_add, &[&n]).await.unwrap();
        assert_eq!(row.get::<_, i64>(0), n + 1);
        let row = b.query_one(&b_text, &[&n.to_string()]).await.unwrap();
        assert_eq!(row.get::<_, String>(0), format!("{n} from b"));
        let row = b.query_one(&b_add, &[&(n * 10)]).await.unwrap();
        assert_eq!(row.get::<_, i64>(0), n * 10 + 1);
    }
    let pinned = daemon
        .metric(r#"pgwarden_wire_clients{state="pinned"}"#)
        .await;
    assert_eq!(
        pinned, 0.0,
        "named statements follow the client, they do not pin it"
    );
    // Fifteen Binds and b's Parse of the text a prepared first.
    let hits = prepared_events(&daemon, "hit").await;
    assert!(
        hits >= 16.0,
        "statements the session holds cost no Parse: {hits} hits"
    );
    // The same text is one statement on the server, whoever prepared it.
    let on_server = simple_scalar(
        &a,
        "SELECT count(*) FROM pg_prepared_statements WHERE statement = 'SELECT $1::int8 + 1'",
    )
    .await;
    assert_eq!(on_server, "1");
    // An error in one client does not disturb the other's statements.
    let error = a.query_one("SELECT 1/0", &[]).await.unwrap_err();
    assert_eq!(error.code(), Some(&SqlState::DIVISION_BY_ZERO));
    let row = b.query_one(&b_add, &[&41i64]).await.unwrap();
    assert_eq!(row.get::<_, i64>(0), 42);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_survive_a_database_restart_a_crash_and_a_killed_session() {
    let cluster = Cluster::start();
    cluster.psql(
        "CREATE TABLE item (id int PRIMARY KEY, name text); INSERT INTO item VALUES (1, 'one')",
    );
    let daemon = TestDaemon::start(Config {
        max_connections: 2,
        // The client, not the health check, meets the ended sessions first.
        health_check_interval_ms: 60_000,
        ..config_for(&cluster)
    })
    .await;
    let client = client(&daemon).await;
    let read = client
        .prepare("SELECT name FROM item WHERE id = $1")
        .await
        .unwrap();
    let row = client.query_one(&read, &[&1i32]).await.unwrap();
    assert_eq!(row.get::<_, &str>(0), "one");

    cluster.restart_fast();
    // Idle across the restart: the next Bind goes to a session of the new
    // generation, which never saw the statement.
    let row = tokio::time::timeout(Duration::from_secs(30), client.query_one(&read, &[&1i32]))
        .await
        .expect("answered within the budget")
        .expect("the statement works on the new generation (no 26000)");
    assert_eq!(row.get::<_, &str>(0), "one");
    assert!(daemon.reconnects().await >= 1.0);

    // An immediate shutdown ends the pooled sessions with a WARNING and
    // the end of the stream, not an error: seen when the pool lends them,
    // so the client's next statement is answered, not 08007.
    cluster.crash_and_restart();
    let row = tokio::time::timeout(Duration::from_secs(30), client.query_one(&read, &[&1i32]))
        .await
        .expect("answered within the budget")
        .expect("the first statement after a crash is answered");
    assert_eq!(row.get::<_, &str>(0), "one");

    cluster.kill_one_backend();
    let mut answered = false;
    for _ in 0..3 {
        // A session killed while idle in the pool may cost one honest
        // error to a unit that met it; the statement itself survives.
        match client.query_one(&read, &[&1i32]).await {
            Ok(row) => {
                assert_eq!(row.get::<_, &str>(0), "one");
                answered = true;
                break;
            }
            Err(error) => assert_ne!(
                error.code(),
                Some(&SqlState::INVALID_SQL_STATEMENT_NAME),
                "{error}"
            ),
        }
    }
    assert!(answered, "the statement works after a backend was killed");
    assert!(prepared_events(&daemon, "miss").await >= 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_deallocate_and_discard_all_do_what_postgres_does() {
    let cluster = Cluster::start();
    let daemon = TestDaemon::start(one_session(&cluster)).await;
    let client = client(&daemon).await;
    let gone = |result: Result<tokio_postgres::Row, tokio_postgres::Error>| {
        let error = result.expect_err("the statement is gone");
        assert_eq!(
            error.code(),
            Some(&SqlState::INVALID_SQL_STATEMENT_NAME),
            "{error}"
        );
    };

    // DEALLOCATE ALL: every statement of this client is gone, answered
    // with the tag PostgreSQL gives.
    let first = client.prepare("SELECT 1::int4").await.unwrap();
    assert_eq!(
        client
            .query_one(&first, &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        1
    );
    let answer = client.simple_query("DEALLOCATE ALL").await.unwrap();
    assert!(matches!(
        answer.last(),
        Some(SimpleQueryMessage::CommandComplete(0))
    ));
    gone(client.query_one(&first, &[]).await);

    // DISCARD ALL likewise.
    let second = client.prepare("SELECT 2::int4").await.unwrap();
    assert_eq!(
        client
            .query_one(&second, &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        2
    );
    client.batch_execute("DISCARD ALL").await.unwrap();
    gone(client.query_one(&second, &[]).await);

    let fourth = client.prepare("SELECT 4::int4").await.unwrap();
    // Close (a dropped Statement): the client's name goes; the session
    // keeps the statement for its other users, and preparing the same
    // text again costs no Parse.
    let hits = prepared_events(&daemon, "hit").await;
    drop(fourth);
    let again = client.prepare("SELECT 4::int4").await.unwrap();
    assert_eq!(
        client
            .query_one(&again, &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        4
    );
    assert!(prepared_events(&daemon, "hit").await > hits);

    // A Parse the server refuses leaves no name behind.
    let error = client.prepare("SELEC 1").await.unwrap_err();
    assert_eq!(error.code(), Some(&SqlState::SYNTAX_ERROR));
    let fine = client.prepare("SELECT 5::int4").await.unwrap();
    assert_eq!(
        client.query_one(&fine, &[]).await.unwrap().get::<_, i32>(0),
        5
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_keeps_a_bounded_number_of_statements() {
    let cluster = Cluster::start();
    let daemon = TestDaemon::start(Config {
        pg_max_prepared_statements: 2,
        ..one_session(&cluster)
    })
    .await;
    let client = client(&daemon).await;
    let mut statements = Vec::new();
    for n in 0..5i32 {
        let sql = format!("SELECT {n}::int4 + $1::int4");
        statements.push(client.prepare(&sql).await.unwrap());
    }
    for round in 0..3i32 {
        for (n, statement) in statements.iter().enumerate() {
            let row = client.query_one(statement, &[&round]).await.unwrap();
            assert_eq!(row.get::<_, i32>(0), n as i32 + round);
        }
    }
    assert!(prepared_events(&daemon, "eviction").await >= 10.0);
    let held = simple_scalar(&client, "SELECT count(*) FROM pg_prepared_statements").await;
    assert!(
        held.parse::<u32>().unwrap() <= 2,
        "evicted statements are closed on the server: {held}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_whose_result_type_changed_is_prepared_afresh() {
    let cluster = Cluster::start();
    cluster.psql("CREATE TABLE item (id int PRIMARY KEY); INSERT INTO item VALUES (1)");
    let daemon = TestDaemon::start(one_session(&cluster)).await;
    let (client, other) = (client(&daemon).await, client(&daemon).await);
    let all = client.prepare("SELECT * FROM item").await.unwrap();
    assert_eq!(client.query(&all, &[]).await.unwrap().len(), 1);

    other
        .batch_execute("ALTER TABLE item ADD COLUMN name text DEFAULT 'x'")
        .await
        .unwrap();
    // As against PostgreSQL: the old statement fails once with 0A000 ...
    let error = client.query(&all, &[]).await.unwrap_err();
    assert_eq!(
        error.code(),
        Some(&SqlState::FEATURE_NOT_SUPPORTED),
        "{error}"
    );
    // ... and the driver's fresh Parse of the same text gets the new
    // shape, though the session held a statement of that text.
    let fresh = client.prepare("SELECT * FROM item").await.unwrap();
    assert_eq!(fresh.columns().len(), 2);
    let row = client.query_one(&fresh, &[]).await.unwrap();
    assert_eq!(row.get::<_, &str>(1), "x");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_name_in_two_clients_is_two_statements_on_one_session() {
    let cluster = Cluster::start();
    let daemon = TestDaemon::start(one_session(&cluster)).await;
    let (mut a, mut b) = (
        Raw::connect(daemon.pg_addr()).await,
        Raw::connect(daemon.pg_addr()).await,
    );
    assert_eq!(
        tags(&a.parse("s", "SELECT 'a'").sync().exchange().await),
        "1Z"
    );
    assert_eq!(
        tags(&b.parse("s", "SELECT 'b'").sync().exchange().await),
        "1Z"
    );
    for _ in 0..3 {
        assert_eq!(first_value(&a.run("s").sync().exchange().await), "a");
        assert_eq!(first_value(&b.run("s").sync().exchange().await), "b");
    }
    // A name in use is refused, as PostgreSQL refuses it; the pipeline
    // behind the error is skipped up to its Sync.
    let replies = a
        .parse("s", "SELECT 'other'")
        .run("s")
        .sync()
        .exchange()
        .await;
    assert_eq!(tags(&replies), "EZ");
    assert_eq!(error_code(&replies), "42P05");
    assert_eq!(first_value(&a.run("s").sync().exchange().await), "a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deallocate_by_name_and_errors_inside_a_pipeline_keep_the_names_right() {
    let cluster = Cluster::start();
    let daemon = TestDaemon::start(one_session(&cluster)).await;
    let mut raw = Raw::connect(daemon.pg_addr()).await;
    raw.parse("Stmt_A", "SELECT 1").sync().exchange().await;
    assert_eq!(first_value(&raw.run("Stmt_A").sync().exchange().await), "1");
    // Unquoted, the name folds to lower case, as the server reads it.
    let replies = raw.query("DEALLOCATE Stmt_A").exchange().await;
    assert_eq!(error_code(&replies), "26000", "{replies:?}");
    let replies = raw.query("DEALLOCATE \"Stmt_A\"").exchange().await;
    assert_eq!(tags(&replies), "CZ");
    assert!(replies[0].1.starts_with(b"DEALLOCATE\0"));
    let replies = raw.run("Stmt_A").sync().exchange().await;
    assert_eq!(error_code(&replies), "26000");

    // A failed Parse inside a pipeline, and a Parse the error skipped,
    // leave no name behind.
    let replies = raw
        .parse("bad", "SELEC 1")
        .parse("skipped", "SELECT 2")
        .run("bad")
        .sync()
        .exchange()
        .await;
    assert_eq!(tags(&replies), "EZ");
    assert_eq!(error_code(&replies), "42601");
    for name in ["bad", "skipped"] {
        let replies = raw.run(name).sync().exchange().await;
        assert_eq!(error_code(&replies), "26000", "{name}");
        raw.parse(name, "SELECT 3").sync().exchange().await;
        assert_eq!(first_value(&raw.run(name).sync().exchange().await), "3");
    }
    // A statement another pipeline left prepared on the session, then an
    // error before its ParseComplete was due: the skipped fake reply
    // leaves no name either.
    let mut other = Raw::connect(daemon.pg_addr()).await;
    other.parse("held", "SELECT 4").sync().exchange().await;
    let replies = raw.query("SELECT 1/0").exchange().await;
    assert_eq!(error_code(&replies), "22012");
    let replies = raw
        .parse("x", "SELECT 1/0")
        .run("x")
        .parse("held_too", "SELECT 4")
        .sync()
        .exchange()
        .await;
    assert_eq!(tags(&replies), "1EZ");
    let replies = raw.run("held_too").sync().exchange().await;
    assert_eq!(error_code(&replies), "26000");
    // A client's own name that looks like pgwarden's reaches nothing.
    let replies = raw.run("pgwarden_1").sync().exchange().await;
    assert_eq!(error_code(&replies), "26000");
}
