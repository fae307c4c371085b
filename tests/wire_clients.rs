//! The PostgreSQL wire front end with real clients against a real server:
//! psql, pgbench and tokio-postgres connect to pgwarden as they would to
//! PostgreSQL; transaction pooling shares few server sessions among more
//! clients; refusals, hostile input and a broken server session each get a
//! clear answer, and the client stays connected where PostgreSQL's would.

mod support;

use std::process::Command;
use std::time::Duration;

use pgwarden::config::Config;
use support::Cluster;
use support::daemon::{TestDaemon, config_for};
use support::process;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::NoTls;

/// A psql client of pgwarden's wire port, unaligned and quiet.
fn psql(cluster: &Cluster, daemon: &TestDaemon, database: &str) -> Command {
    let address = daemon.pg_addr();
    let mut cmd = cluster.bin().command("psql");
    cmd.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=0", "-w"])
        .args(["-h", "127.0.0.1", "-U", "postgres", "-d", database])
        .args(["-p", &address.port().to_string()])
        .env("PGSSLMODE", "prefer")
        .env("PGCONNECT_TIMEOUT", "10");
    cmd
}

/// Runs `sql` (psql `-c` each) and returns (stdout, stderr).
fn run_psql(mut cmd: Command, statements: &[&str], stdin: Option<&str>) -> (String, String) {
    for statement in statements {
        cmd.arg("-c").arg(statement);
    }
    let output = process::run(&mut cmd, stdin.map(str::as_bytes), Duration::from_secs(60))
        .expect("psql finishes");
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

async fn client(daemon: &TestDaemon) -> tokio_postgres::Client {
    client_with(daemon, "").await
}

fn one_session(cluster: &Cluster) -> Config {
    Config {
        max_connections: 1,
        min_connections: 1,
        ..config_for(cluster)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_queries_errors_and_copy_work_as_against_postgres() {
    let cluster = Cluster::start();
    cluster.psql("CREATE TABLE item (id int PRIMARY KEY, name text)");
    let daemon = TestDaemon::start(config_for(&cluster)).await;

    let (out, err) = run_psql(
        psql(&cluster, &daemon, "postgres"),
        &[
            "SELECT 1 AS one, 'two'",
            "SELECT 1; SELECT 1/0; SELECT 2",
            "SELECT current_setting('server_version_num')::int >= 150000",
        ],
        None,
    );
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["1|two", "1", "t"],
        "{err}"
    );
    assert!(err.contains("division by zero"), "{err}");

    let (_, err) = run_psql(
        psql(&cluster, &daemon, "postgres"),
        &["\\copy item FROM STDIN WITH (FORMAT csv)"],
        Some("1,pen\n2,ink\n"),
    );
    assert!(err.is_empty(), "{err}");
    let (out, err) = run_psql(
        psql(&cluster, &daemon, "postgres"),
        &["\\copy (SELECT id, name FROM item ORDER BY id) TO STDOUT WITH (FORMAT csv)"],
        None,
    );
    assert_eq!(out, "1,pen\n2,ink\n", "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_share_one_server_session_between_their_transactions() {
    let cluster = Cluster::start();
    let daemon = TestDaemon::start(one_session(&cluster)).await;
    let first = client(&daemon).await;
    let second = client(&daemon).await;
    for round in 0..5 {
        for (name, client) in [("first", &first), ("second", &second)] {
            let sql = format!("SELECT '{name} {round}', pg_backend_pid()");
            let rows = client.simple_query(&sql).await.expect("runs");
            assert!(!rows.is_empty());
        }
    }
    // A transaction keeps its session; the other client waits for it.
    let transaction = first.simple_query("BEGIN; SELECT 1").await.unwrap();
    assert!(!transaction.is_empty());
    let waiting = tokio::spawn(async move {
        second
            .simple_query("SELECT 'after the commit'")
            .await
            .map(|_| second)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "the session was lent inside a transaction"
    );
    first.simple_query("COMMIT").await.unwrap();
    let second = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the waiting client got the session")
        .unwrap()
        .unwrap();
    assert!(!second.simple_query("SELECT 1").await.unwrap().is_empty());
    let units = daemon
        .metric(
            r#"pgwarden_requests_duration_seconds_count{api="pgwire",kind="query",outcome="ok"}"#,
        )
        .await;
    assert!(
        units >= 12.0,
        "each unit is a request of the wire API: {units}"
    );
    // The pool's one session and the health check's own.
    let sessions =
        cluster.psql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgwarden'");
    assert!(sessions.trim().parse::<u32>().unwrap() <= 2, "{sessions}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_with_typed_parameters_round_trip() {
    let cluster = Cluster::start();
    let daemon = TestDaemon::start(one_session(&cluster)).await;
    let client = client(&daemon).await;
    let statement = client
        .prepare("SELECT $1::int8 + 1, $2::text || '!', $3::float8 * 2, $4::bool")
        .await
        .unwrap();
    for n in 0..3i64 {
        let row = client
            .query_one(&statement, &[&n, &"hi", &1.5f64, &true])
            .await
            .unwrap();
        assert_eq!(row.get::<_, i64>(0), n + 1);
        assert_eq!(row.get::<_, String>(1), "hi!");
        assert_eq!(row.get::<_, f64>(2), 3.0);
        assert!(row.get::<_, bool>(3));
    }
    let error = client.query_one("SELECT 1/0", &[]).await.unwrap_err();
    assert_eq!(
        error.code(),
        Some(&tokio_postgres::error::SqlState::DIVISION_BY_ZERO)
    );
    let pinned = daemon
        .metric(r#"pgwarden_wire_clients{state="pinned"}"#)
        .await;
    assert_eq!(pinned, 0.0, "named statements follow the client");
    let row = client
        .query_one("SELECT 'still connected'", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, &str>(0), "still connected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_runs_without_a_failed_transaction_in_every_query_mode() {
    let cluster = Cluster::start();
    let daemon = TestDaemon::start(Config {
        max_connections: 4,
        ..config_for(&cluster)
    })
    .await;
    let port = daemon.pg_addr().port().to_string();
    let pgbench = |args: &[&str]| {
        let mut cmd = cluster.bin().command("pgbench");
        cmd.args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres"])
            .args(args)
            .arg("postgres")
            .env("PGSSLMODE", "disable");
        let output = process::run(&mut cmd, None, Duration::from_secs(120)).expect("pgbench runs");
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let err = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(output.status.success(), "pgbench {args:?}: {text}\n{err}");
        text
    };
    pgbench(&["-i", "-s", "1", "-q"]);
    // Four server sessions for sixteen clients, in every query mode;
    // prepared mode's named statements follow each client across them.
    // pgbench 15 prepares each statement at its first use with a blocking
    // call, which stalls every client of its thread: a thread per client,
    // so that clients holding a session inside a transaction are never
    // stalled behind one that waits for a session.
    for (mode, script, threads) in [
        ("simple", "-S", "2"),
        ("extended", "-S", "2"),
        ("prepared", "-S", "2"),
        ("prepared", "-N", "16"),
    ] {
        let clients = 16;
        let count = clients.to_string();
        let report = pgbench(&[script, "-M", mode, "-c", &count, "-j", threads, "-t", "200"]);
        assert!(
            report.contains("number of failed transactions: 0 (0.000%)"),
            "{mode}: {report}"
        );
        let all = clients * 200;
        let processed = format!("number of transactions actually processed: {all}/{all}");
        assert!(report.contains(&processed), "{mode}: {report}");
    }
    // A connection per transaction, as serverless functions do.
    let report = pgbench(&["-S", "-C", "-c", "4", "-j", "2", "-t", "50"]);
    assert!(
        report.contains("actually processed: 200/200"),
        "-C: {report}"
    );
    // Pipeline mode: several queries in flight before one Sync.
    let script = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        script.path(),
        "\\startpipeline\nSELECT 1;\nSELECT abalance FROM pgbench_accounts WHERE aid = 1;\nSELECT 2;\n\\endpipeline\n",
    )
    .unwrap();
    let path = script.path().to_str().unwrap();
    let report = pgbench(&[
        "-M", "extended", "-f", path, "-c", "4", "-j", "2", "-t", "50",
    ]);
    assert!(
        report.contains("actually processed: 200/200"),
        "pipeline: {report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_and_databases_are_refused_before_any_server_session_is_used() {
    let cluster = Cluster::start();
    let daemon = TestDaemon::start(Config {
        client_password: Some("right-password".into()),
        ..config_for(&cluster)
    })
    .await;
    let mut good = psql(&cluster, &daemon, "postgres");
    good.env("PGPASSWORD", "right-password");
    let (out, err) = run_psql(good, &["SELECT 'in'"], None);
    assert_eq!(out.trim(), "in", "{err}");

    let mut wrong = psql(&cluster, &daemon, "postgres");
    wrong.env("PGPASSWORD", "wrong-password");
    let (_, err) = run_psql(wrong, &["SELECT 'in'"], None);
    assert!(
        err.contains("password authentication failed for user \"postgres\""),
        "{err}"
    );

    let mut elsewhere = psql(&cluster, &daemon, "other");
    elsewhere.env("PGPASSWORD", "right-password");
    let (_, err) = run_psql(elsewhere, &["SELECT 'in'"], None);
    assert!(err.contains("database \"other\" does not exist"), "{err}");

    let connections =
        |result: &str| format!("pgwarden_wire_connections_total{{result=\"{result}\"}}");
    assert!(daemon.metric(&connections("accepted")).await >= 1.0);
    assert!(daemon.metric(&connections("auth")).await >= 1.0);
    assert!(daemon.metric(&connections("database")).await >= 1.0);
    assert_eq!(
        daemon
            .metric(r#"pgwarden_wire_clients{state="idle"}"#)
            .await,
        0.0,
        "every client left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_session_killed_under_a_client_is_an_honest_error_and_the_client_stays() {
    let cluster = Cluster::start();
    let daemon = TestDaemon::start(config_for(&cluster)).await;
    let client = std::sync::Arc::new(client(&daemon).await);
    // A DO block may commit on its own: its fate cannot be asked, so it
    // is never replayed.
    let block = "DO $$ BEGIN PERFORM pg_sleep(30); END $$";
    let running = tokio::spawn({
        let client = client.clone();
        async move { client.simple_query(block).await }
    });
    support::pg::wait_for_session(&cluster, "active", block);
    cluster.terminate_backends();
    let error = tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("answered")
        .unwrap()
        .unwrap_err();
    let code = error.code().map(|c| c.code().to_owned());
    assert_eq!(code.as_deref(), Some("08007"), "{error}");
    let rows = tokio::time::timeout(
        Duration::from_secs(10),
        client.simple_query("SELECT 'next'"),
    )
    .await
    .expect("answered")
    .expect("the client is still connected");
    assert!(!rows.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_is_closed_and_disturbs_nobody() {
    let cluster = Cluster::start();
    let daemon = TestDaemon::start(Config {
        pg_startup_timeout_ms: 1000,
        ..config_for(&cluster)
    })
    .await;
    let address = daemon.pg_addr();
    let closed_within = |mut stream: TcpStream| async move {
        let mut sink = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut sink))
            .await
            .expect("closed within the limit")
            .ok();
        sink
    };
    // Garbage instead of a startup packet.
    let mut garbage = TcpStream::connect(address).await.unwrap();
    garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    closed_within(garbage).await;
    // A startup packet announcing a gigabyte.
    let mut huge = TcpStream::connect(address).await.unwrap();
    huge.write_all(&[0x40, 0, 0, 0, 0, 3, 0, 0]).await.unwrap();
    closed_within(huge).await;
    // A client that never finishes its startup.
    let mut silent = TcpStream::connect(address).await.unwrap();
    silent.write_all(&[0, 0, 0, 40, 0, 3]).await.unwrap();
    closed_within(silent).await;
    // Everyone else is served as before.
    let client = client(&daemon).await;
    assert!(client.simple_query("SELECT 1").await.is_ok());
    let (out, err) = run_psql(
        psql(&cluster, &daemon, "postgres"),
        &["SELECT 'unharmed'"],
        None,
    );
    assert_eq!(out.trim(), "unharmed", "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_require_tls_get_it_with_pgwardens_certificate() {
    let cluster = Cluster::start();
    let daemon = TestDaemon::start(Config {
        pg_tls_cert: Some(cluster.data_dir().join("server.crt")),
        pg_tls_key: Some(cluster.data_dir().join("server.key")),
        ..config_for(&cluster)
    })
    .await;
    let mut verified = psql(&cluster, &daemon, "postgres");
    verified
        .env("PGSSLMODE", "verify-full")
        .env("PGSSLROOTCERT", cluster.ca_cert_path());
    let (out, err) = run_psql(verified, &["SELECT 'over tls'", "\\conninfo"], None);
    assert!(out.starts_with("over tls\n"), "{out}{err}");
    assert!(out.contains("SSL connection"), "{out}");

    let mut plain = psql(&cluster, &daemon, "postgres");
    plain.env("PGSSLMODE", "disable");
    let (out, err) = run_psql(plain, &["SELECT 'in the clear'"], None);
    assert_eq!(out.trim(), "in the clear", "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_certificate_tls_is_declined_and_required_tls_fails_clearly() {
    let cluster = Cluster::start();
    let daemon = TestDaemon::start(config_for(&cluster)).await;
    let mut required = psql(&cluster, &daemon, "postgres");
    required.env("PGSSLMODE", "require");
    let (_, err) = run_psql(required, &["SELECT 1"], None);
    assert!(err.contains("server does not support SSL"), "{err}");
}

async fn client_with(daemon: &TestDaemon, extra: &str) -> tokio_postgres::Client {
    let address = daemon.pg_addr();
    let dsn = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=disable {extra}",
        address.port()
    );
    let (client, connection) = tokio_postgres::connect(&dsn, NoTls)
        .await
        .expect("connects");
    tokio::spawn(connection);
    client
}

/// A setting as the client's session has it.
async fn setting(client: &tokio_postgres::Client, name: &str) -> String {
    let sql = format!("SELECT pg_catalog.current_setting('{name}')");
    setting_of(client, &sql).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_settings_follow_each_client_onto_a_shared_session() {
    let cluster = Cluster::start();
    let daemon = TestDaemon::start(one_session(&cluster)).await;
    let tokyo = client_with(
        &daemon,
        "application_name=tokyo options='-c TimeZone=Asia/Tokyo -c search_path=pg_catalog'",
    )
    .await;
    let plain = client_with(&daemon, "").await;
    for _ in 0..3 {
        assert_eq!(setting(&tokyo, "TimeZone").await, "Asia/Tokyo");
        assert_eq!(setting(&tokyo, "application_name").await, "tokyo");
        assert_eq!(setting(&tokyo, "search_path").await, "pg_catalog");
        assert_ne!(setting(&plain, "TimeZone").await, "Asia/Tokyo");
        assert_ne!(setting(&plain, "search_path").await, "pg_catalog");
    }
    // The HTTP API on the same session never sees a wire client's settings.
    let _ = setting(&tokyo, "TimeZone").await;
    let body = daemon
        .query("SELECT current_setting('TimeZone')", serde_json::json!([]))
        .await;
    assert_ne!(body["rows"][0][0], "Asia/Tokyo", "{body}");
    // A setting the server refuses refuses the client, as PostgreSQL would.
    let address = daemon.pg_addr();
    let dsn = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=disable options='-c DateStyle=nonsense'",
        address.port()
    );
    let refused = tokio_postgres::connect(&dsn, NoTls)
        .await
        .err()
        .expect("refused");
    let message = refused.as_db_error().map(|e| e.message().to_owned());
    assert!(
        message.as_deref().is_some_and(|m| m.contains("DateStyle")),
        "{refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_that_gets_no_session_within_the_budget_is_57p03_and_the_client_stays() {
    let cluster = Cluster::start();
    let mut daemon = TestDaemon::start(Config {
        guard_timeout_ms: 500,
        ..config_for(&cluster)
    })
    .await;
    let client = client(&daemon).await;
    assert!(client.simple_query("SELECT 1").await.is_ok());
    let admin = |operation: &str| {
        daemon
            .client
            .post(format!("{}/admin/{operation}", daemon.ops))
            .send()
    };
    assert!(admin("pause").await.unwrap().status().is_success());
    let error = client.simple_query("SELECT 'held'").await.unwrap_err();
    let code = error.as_db_error().map(|e| e.code().code().to_owned());
    assert_eq!(code.as_deref(), Some("57P03"), "{error:?}");
    assert!(admin("resume").await.unwrap().status().is_success());
    let rows = client.simple_query("SELECT 'served again'").await.unwrap();
    assert!(!rows.is_empty());

    // At shutdown an idle client is told so and let go.
    let waiting = tokio::spawn(async move { client.simple_query("SELECT 1").await.map(|_| ()) });
    assert!(
        daemon.shutdown().await,
        "the idle client did not hold the shutdown up"
    );
    let _ = waiting.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_while_the_unit_waits_for_a_session_is_57014_and_the_client_stays() {
    let cluster = Cluster::start();
    let daemon = TestDaemon::start(Config {
        guard_timeout_ms: 30_000,
        ..one_session(&cluster)
    })
    .await;
    // The one session is held by another client's open transaction.
    let holder = client(&daemon).await;
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let waiter = std::sync::Arc::new(client(&daemon).await);
    let waiting = {
        let waiter = waiter.clone();
        tokio::spawn(async move { waiter.simple_query("SELECT 'waited'").await })
    };
    let waiting_clients = r#"pgwarden_wire_clients{state="waiting"}"#;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while daemon.metric(waiting_clients).await < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the unit never waited"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    waiter.cancel_token().cancel_query(NoTls).await.unwrap();
    let error = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the cancel ends the wait long before the guard's budget")
        .unwrap()
        .unwrap_err();
    let code = error.as_db_error().map(|e| e.code().code().to_owned());
    assert_eq!(code.as_deref(), Some("57014"), "{error:?}");

    // Nothing else was touched: the holder's transaction goes on, and the
    // cancelled client gets the session once it is free.
    holder.batch_execute("COMMIT").await.unwrap();
    let rows = waiter.simple_query("SELECT 'served'").await.unwrap();
    assert!(!rows.is_empty());
    // A cancel with nothing running is ignored, as PostgreSQL ignores it.
    waiter.cancel_token().cancel_query(NoTls).await.unwrap();
    assert!(waiter.simple_query("SELECT 1").await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_session_mode_a_client_keeps_its_session_and_its_state() {
    let cluster = Cluster::start();
    let daemon = TestDaemon::start(Config {
        pool_mode: "session".into(),
        max_connections: 2,
        guard_timeout_ms: 500,
        ..config_for(&cluster)
    })
    .await;
    let first = client(&daemon).await;
    let pid = setting_of(&first, PID).await;
    // State no transaction pooler could keep, kept between transactions.
    first
        .batch_execute("CREATE TEMP TABLE scratch (x int); INSERT INTO scratch VALUES (7)")
        .await
        .unwrap();
    for _ in 0..3 {
        assert_eq!(setting_of(&first, PID).await, pid);
    }
    assert_eq!(setting_of(&first, "SELECT x::text FROM scratch").await, "7");
    let second = client(&daemon).await;
    assert_ne!(setting_of(&second, PID).await, pid);
    // Every session is taken: a third client waits, then gets 57P03, and
    // stays connected for when one is free.
    let third = client(&daemon).await;
    let error = third.simple_query("SELECT 1").await.unwrap_err();
    let code = error.as_db_error().map(|e| e.code().code().to_owned());
    assert_eq!(code.as_deref(), Some("57P03"), "{error:?}");
    drop(first);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let served = loop {
        match third
            .simple_query("SELECT to_regclass('pg_temp.scratch')::text")
            .await
        {
            Ok(rows) => break rows,
            Err(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(error) => panic!("the freed session never came: {error}"),
        }
    };
    // The session came reset: the first client's temporary table is gone.
    let value = served.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(row) => Some(row.get(0).map(str::to_owned)),
        _ => None,
    });
    assert_eq!(value, Some(None), "{served:?}");
}

const PID: &str = "SELECT pg_backend_pid()::text";

/// The first column of the first row of a simple query.
async fn setting_of(client: &tokio_postgres::Client, sql: &str) -> String {
    let messages = client.simple_query(sql).await.unwrap();
    messages
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        })
        .expect("a row")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_longer_than_any_socket_buffer_flows_through() {
    let cluster = Cluster::start();
    let daemon = TestDaemon::start(one_session(&cluster)).await;
    let raw = support::wire::Raw::connect(daemon.pg_addr()).await;
    let (mut from_server, mut to_server) = raw.into_stream().into_split();
    // One unit (a single Sync) of 100,000 executions whose replies, about
    // 25 MB, outgrow every buffer between the server and the client long
    // before the client has sent it all: the server answers while it reads.
    const EXECUTIONS: usize = 100_000;
    let sender = tokio::spawn(async move {
        let mut buf = bytes::BytesMut::new();
        let sql = "SELECT repeat('x', 200)";
        postgres_protocol::message::frontend::parse("", sql, std::iter::empty(), &mut buf).unwrap();
        let bind_execute = {
            let mut one = bytes::BytesMut::new();
            one.extend_from_slice(b"B\0\0\0\x0c\0\0\0\0\0\0\0\0");
            postgres_protocol::message::frontend::execute("", 0, &mut one).unwrap();
            one
        };
        for _ in 0..EXECUTIONS {
            buf.extend_from_slice(&bind_execute);
        }
        postgres_protocol::message::frontend::sync(&mut buf);
        to_server.write_all(&buf).await.unwrap();
        to_server
    });
    let mut rows = 0;
    let mut read = bytes::BytesMut::new();
    let received = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            while read.len() >= 5 {
                let len = u32::from_be_bytes(read[1..5].try_into().unwrap()) as usize;
                if read.len() < len + 1 {
                    break;
                }
                let message = read.split_to(len + 1);
                match message[0] {
                    b'D' => rows += 1,
                    b'E' => panic!("an error: {message:?}"),
                    b'Z' => return,
                    _ => {}
                }
            }
            assert!(from_server.read_buf(&mut read).await.unwrap() > 0, "closed");
        }
    })
    .await;
    assert!(
        received.is_ok(),
        "stuck after {rows} rows (all sent: {})",
        sender.is_finished()
    );
    assert_eq!(rows, EXECUTIONS);
    let to_server = sender.await.unwrap();
    // The client is still served.
    let mut raw = from_server.reunite(to_server).unwrap();
    let mut buf = bytes::BytesMut::new();
    postgres_protocol::message::frontend::query("SELECT 'after'", &mut buf).unwrap();
    raw.write_all(&buf).await.unwrap();
    let mut reply = vec![0; 256];
    let n = tokio::time::timeout(Duration::from_secs(10), raw.read(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert!(reply[..n].windows(5).any(|w| w == b"after"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_setting_changed_and_undone_gives_the_session_back() {
    let cluster = Cluster::start();
    let daemon = TestDaemon::start(Config {
        guard_timeout_ms: 500,
        ..one_session(&cluster)
    })
    .await;
    let (a, b) = (client(&daemon).await, client(&daemon).await);
    let pinned = || daemon.metric(r#"pgwarden_wire_clients{state="pinned"}"#);
    // The probe answers after the client's own reply: the gauge follows.
    let settles_at = |expected: f64| async move {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let now = pinned().await;
            if now == expected || std::time::Instant::now() > deadline {
                return now;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    // As asyncpg does around its type lookups: jit off, then back.
    let before = setting_of(&a, "SELECT current_setting('jit')").await;
    a.batch_execute("SELECT set_config('jit', 'off', false)")
        .await
        .unwrap();
    assert_eq!(
        settles_at(1.0).await,
        1.0,
        "a changed setting holds the session"
    );
    let error = b.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(error.as_db_error().map(|e| e.code().code()), Some("57P03"));
    assert_eq!(setting_of(&a, "SELECT current_setting('jit')").await, "off");
    a.batch_execute(&format!("SELECT set_config('jit', '{before}', false)"))
        .await
        .unwrap();
    assert_eq!(settles_at(0.0).await, 0.0, "undone, it holds nothing");
    assert_eq!(setting_of(&b, "SELECT 'b served'").await, "b served");

    // As asyncpg's pool does when it takes a connection back: RESET ALL
    // undoes a setting, and the client's own startup settings stay.
    let named = client_with(&daemon, "application_name=reporting").await;
    named.batch_execute("SET work_mem = '77MB'").await.unwrap();
    assert_eq!(
        settles_at(1.0).await,
        1.0,
        "work_mem differs from its default"
    );
    named.batch_execute("RESET ALL").await.unwrap();
    assert_eq!(settles_at(0.0).await, 0.0);
    assert_eq!(setting_of(&b, "SHOW work_mem").await, "4MB");
    assert_eq!(
        setting_of(&named, "SELECT current_setting('application_name')").await,
        "reporting"
    );
    assert_ne!(
        setting_of(&b, "SELECT current_setting('application_name')").await,
        "reporting"
    );

    // A setting of the client's startup, changed: it is the client's now,
    // and only this session has it.
    named
        .batch_execute("SET application_name = 'other'")
        .await
        .unwrap();
    assert_eq!(pinned().await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadpool_postgres_pool_of_sixteen_shares_four_server_sessions() {
    use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
    let cluster = Cluster::start();
    cluster.psql("CREATE TABLE ledger (worker int PRIMARY KEY, n bigint NOT NULL)");
    let daemon = TestDaemon::start(Config {
        max_connections: 4,
        ..config_for(&cluster)
    })
    .await;
    let dsn = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        daemon.pg_addr().port()
    );
    let manager = Manager::from_config(
        dsn.parse().unwrap(),
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let pool = Pool::builder(manager).max_size(16).build().unwrap();
    // Each worker increments its own row and reads it back, with the
    // statements its pooled connection prepared and cached.
    let workers: Vec<_> = (0..16i32)
        .map(|worker| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut acknowledged = 0i64;
                for _ in 0..50 {
                    let client = pool.get().await.unwrap();
                    let increment = client
                        .prepare_cached(
                            "INSERT INTO ledger VALUES ($1, 1) \
                             ON CONFLICT (worker) DO UPDATE SET n = ledger.n + 1",
                        )
                        .await
                        .unwrap();
                    client.execute(&increment, &[&worker]).await.unwrap();
                    acknowledged += 1;
                    let read = client
                        .prepare_cached("SELECT n FROM ledger WHERE worker = $1")
                        .await
                        .unwrap();
                    let n: i64 = client.query_one(&read, &[&worker]).await.unwrap().get(0);
                    assert_eq!(n, acknowledged, "worker {worker} reads its own writes");
                }
                acknowledged
            })
        })
        .collect();
    let mut total = 0;
    for worker in workers {
        total += tokio::time::timeout(Duration::from_secs(60), worker)
            .await
            .expect("the workers finish")
            .unwrap();
    }
    assert_eq!(total, 800);
    assert_eq!(cluster.psql("SELECT sum(n) FROM ledger").trim(), "800");
    let pinned = daemon
        .metric(r#"pgwarden_wire_clients{state="pinned"}"#)
        .await;
    assert_eq!(pinned, 0.0);
    let hits = daemon
        .metric(r#"pgwarden_wire_prepared_statements_total{event="hit"}"#)
        .await;
    assert!(hits > 0.0, "the cached statements are shared: {hits}");
    let sessions =
        cluster.psql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgwarden'");
    assert!(sessions.trim().parse::<u32>().unwrap() <= 5, "{sessions}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_pg_auth_password_a_loopback_client_sends_the_password_itself() {
    let cluster = Cluster::start();
    let daemon = TestDaemon::start(Config {
        client_password: Some("right-password".into()),
        pg_auth: "password".into(),
        ..config_for(&cluster)
    })
    .await;
    // The exchange by hand: the server asks for the password itself
    // (AuthenticationCleartextPassword, code 3).
    let login = |password: &'static str| {
        let address = daemon.pg_addr();
        async move {
            let mut stream = TcpStream::connect(address).await.unwrap();
            let mut buf = bytes::BytesMut::new();
            let params = [("user", "postgres"), ("database", "postgres")];
            postgres_protocol::message::frontend::startup_message(params.iter().copied(), &mut buf)
                .unwrap();
            stream.write_all(&buf).await.unwrap();
            let mut request = [0u8; 9];
            stream.read_exact(&mut request).await.unwrap();
            assert_eq!(request, [b'R', 0, 0, 0, 8, 0, 0, 0, 3], "cleartext asked");
            buf.clear();
            postgres_protocol::message::frontend::password_message(password.as_bytes(), &mut buf)
                .unwrap();
            stream.write_all(&buf).await.unwrap();
            let mut answer = vec![0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut answer))
                .await
                .unwrap()
                .unwrap();
            answer.truncate(n);
            answer
        }
    };
    let accepted = login("right-password").await;
    assert!(
        accepted.starts_with(&[b'R', 0, 0, 0, 8, 0, 0, 0, 0]),
        "{accepted:?}"
    );
    let refused = login("wrong-password").await;
    assert_eq!(refused.first(), Some(&b'E'));
    assert!(refused.windows(5).any(|w| w == b"28P01"), "{refused:?}");
    // libpq answers the same request unchanged.
    let mut good = psql(&cluster, &daemon, "postgres");
    good.env("PGPASSWORD", "right-password");
    let (out, err) = run_psql(good, &["SELECT 'in'"], None);
    assert_eq!(out.trim(), "in", "{err}");
}
