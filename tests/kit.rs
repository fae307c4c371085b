//! Scenarios proving the test kit itself works.
//!
//! pgwarden's integration tests trust the kit to produce real faults: if a
//! "crash" did not crash or a "paused" server still answered, those tests
//! would pass for the wrong reason. Each scenario here breaks something
//! through the kit and checks the effect from the outside, with psql as an
//! independent client.

mod support;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{Cluster, FaultProxy, PgBin, ProxyMode, process, users, wait};

/// Longest a single client command may run before the test gives up on it.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------- helpers

/// A psql client connecting over TCP to 127.0.0.1:`port` as `user`, the way
/// an application would: plain TCP unless a test sets `PGSSLMODE`, never
/// prompting for a password, giving up on connecting after 5 s.
fn psql_tcp(cluster: &Cluster, port: u16, user: &str) -> Command {
    let mut cmd = cluster.bin().command("psql");
    cmd.args([
        "-X",
        "-q",
        "-w",
        "-A",
        "-t",
        "-v",
        "ON_ERROR_STOP=1",
        "-d",
        "postgres",
    ])
    .args(["-h", "127.0.0.1", "-U", user, "-p", &port.to_string()])
    .env("PGSSLMODE", "disable")
    .env("PGCONNECT_TIMEOUT", "5");
    cmd
}

/// Runs `sql` with `client`: `Ok(stdout)` on success, `Err(stderr)` otherwise.
fn run_sql(mut client: Command, sql: &str) -> Result<String, String> {
    client.arg("-c").arg(sql);
    let output = process::run(&mut client, None, CLIENT_TIMEOUT).expect("psql finishes in time");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    if output.status.success() {
        Ok(stdout)
    } else {
        Err(stderr)
    }
}

/// Starts `sql` with `client` in the background.
fn spawn_sql(mut client: Command, sql: &str) -> Child {
    client
        .arg("-c")
        .arg(sql)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn psql")
}

/// Logs in as `user` over TCP with `sslmode` and returns `current_user`.
fn login(
    cluster: &Cluster,
    user: &str,
    password: Option<&str>,
    sslmode: &str,
) -> Result<String, String> {
    let mut client = psql_tcp(cluster, cluster.port(), user);
    client.env("PGSSLMODE", sslmode);
    if let Some(password) = password {
        client.env("PGPASSWORD", password);
    }
    run_sql(client, "SELECT current_user")
}

/// Whether `SELECT 1` works over TCP as the superuser.
fn answers(cluster: &Cluster) -> bool {
    run_sql(
        psql_tcp(cluster, cluster.port(), users::SUPERUSER),
        "SELECT 1",
    )
    .as_deref()
        == Ok("1\n")
}

/// Waits until a connection with `application_name` = `name` is running a query.
fn wait_for_running_query(cluster: &Cluster, name: &str) {
    let query = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = '{name}' AND state = 'active'"
    );
    let active = wait::eventually(CLIENT_TIMEOUT, || cluster.psql(&query) == "1\n");
    assert!(active, "no running query from {name}");
}

/// Waits for a background client to exit and returns its stderr; panics if it is still running.
fn finish(mut child: Child, timeout: Duration) -> (bool, String) {
    let status = process::wait_timeout(&mut child, timeout).expect("client exits in time");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("piped stderr"), &mut stderr)
        .expect("read stderr");
    (status.success(), stderr)
}

/// Runs blocking work (psql, cluster faults) off the async runtime's workers.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

/// A started cluster, shareable with blocking tasks.
async fn shared_cluster() -> Arc<Cluster> {
    Arc::new(blocking(Cluster::start).await)
}

/// TCP address of `cluster`, for pointing a proxy at it.
fn tcp_address(cluster: &Cluster) -> SocketAddr {
    SocketAddr::new(cluster.host().parse().expect("IP address"), cluster.port())
}

/// Server processes of `cluster`: the postmaster and everything listed in `pg_stat_activity`.
fn server_pids(cluster: &Cluster) -> Vec<i32> {
    let pid_file =
        std::fs::read_to_string(cluster.data_dir().join("postmaster.pid")).expect("postmaster.pid");
    let postmaster = pid_file
        .lines()
        .next()
        .expect("pid line")
        .trim()
        .parse()
        .expect("pid");
    let mut pids: Vec<i32> = cluster
        .psql("SELECT pid FROM pg_stat_activity")
        .lines()
        .map(|l| l.parse().expect("pid"))
        .collect();
    pids.push(postmaster);
    pids
}

/// Whether a process with this pid exists (zombies count as gone).
fn process_exists(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| !stat.contains(") Z "))
}

/// Creates an executable stand-in for each server tool in `dir`.
fn fake_server_bin(dir: &Path) -> PathBuf {
    fake_tools(dir, &["initdb", "pg_ctl", "postgres"])
}

/// Creates executable empty files named `tools` in `dir`.
fn fake_tools(dir: &Path, tools: &[&str]) -> PathBuf {
    std::fs::create_dir_all(dir).expect("create fake bin dir");
    for tool in tools {
        let path = dir.join(tool);
        std::fs::write(&path, "#!/bin/sh\n").expect("write fake tool");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    dir.to_path_buf()
}

// ---------------------------------------------------------------- PgBin

#[test]
fn pg_bin_missing_everywhere_says_what_to_install() {
    let empty = tempfile::tempdir().unwrap();
    let error = PgBin::locate_from(None, None, &empty.path().join("absent")).unwrap_err();
    assert!(error.contains("apt-get install postgresql"), "{error}");
    assert!(error.contains("PG_BIN"), "{error}");
}

#[test]
fn pg_bin_env_naming_an_empty_dir_is_an_error_even_if_others_exist() {
    let root = tempfile::tempdir().unwrap();
    let empty = root.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    fake_server_bin(&root.path().join("lib/15/bin"));
    let pg_config = fake_server_bin(&root.path().join("pg_config_bin"));
    let error = PgBin::locate_from(
        Some(empty.clone()),
        Some(pg_config),
        &root.path().join("lib"),
    )
    .unwrap_err();
    assert!(
        error.contains(&format!("PG_BIN={}", empty.display())),
        "{error}"
    );
    assert!(error.contains("apt-get install postgresql"), "{error}");
}

#[test]
fn pg_bin_env_wins_over_pg_config_and_lib_root() {
    let root = tempfile::tempdir().unwrap();
    let chosen = fake_server_bin(&root.path().join("chosen"));
    let pg_config = fake_server_bin(&root.path().join("pg_config_bin"));
    fake_server_bin(&root.path().join("lib/16/bin"));
    let found = PgBin::locate_from(
        Some(chosen.clone()),
        Some(pg_config),
        &root.path().join("lib"),
    )
    .unwrap();
    assert_eq!(found.dir(), chosen);
    assert_eq!(found.path("initdb"), chosen.join("initdb"));
}

#[test]
fn pg_config_bindir_is_used_when_pg_bin_is_unset() {
    let root = tempfile::tempdir().unwrap();
    let pg_config = fake_server_bin(&root.path().join("pg_config_bin"));
    fake_server_bin(&root.path().join("lib/16/bin"));
    let found =
        PgBin::locate_from(None, Some(pg_config.clone()), &root.path().join("lib")).unwrap();
    assert_eq!(found.dir(), pg_config);
}

#[test]
fn client_only_pg_config_bindir_falls_back_to_lib_root() {
    let root = tempfile::tempdir().unwrap();
    let client_only = fake_tools(&root.path().join("client"), &["psql", "pg_config"]);
    fake_server_bin(&root.path().join("lib/14/bin"));
    let found = PgBin::locate_from(None, Some(client_only), &root.path().join("lib")).unwrap();
    assert_eq!(found.dir(), root.path().join("lib/14/bin"));
}

#[test]
fn newest_complete_lib_version_wins_numerically() {
    let root = tempfile::tempdir().unwrap();
    let lib = root.path().join("lib");
    for version in ["9.6", "10", "13", "15"] {
        fake_server_bin(&lib.join(version).join("bin"));
    }
    fake_tools(&lib.join("16/bin"), &["psql"]); // newer but incomplete
    std::fs::create_dir_all(lib.join("not-a-version/bin")).unwrap();
    let found = PgBin::locate_from(None, None, &lib).unwrap();
    assert_eq!(found.dir(), lib.join("15/bin"));
}

#[test]
fn locate_finds_the_installed_server() {
    let bin = PgBin::locate();
    for tool in ["initdb", "pg_ctl", "postgres", "pg_basebackup", "psql"] {
        assert!(
            bin.path(tool).is_file(),
            "{} missing",
            bin.path(tool).display()
        );
    }
    assert!(bin.major_version() >= 10);
}

// ---------------------------------------------------------------- cluster basics

#[test]
fn cluster_can_be_shared_with_blocking_tasks() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Cluster>();
    assert_send_sync::<Arc<Cluster>>();
    assert_send_sync::<FaultProxy>();
}

#[test]
fn cluster_answers_over_tcp_and_unix_socket() {
    let cluster = Cluster::start();
    assert_eq!(cluster.psql("SELECT 1"), "1\n");
    // Over the socket there is no server address; over TCP it is 127.0.0.1.
    assert_eq!(cluster.psql_rows("SELECT inet_server_addr()"), [[None]]);
    let tcp = psql_tcp(&cluster, cluster.port(), users::SUPERUSER);
    assert_eq!(
        run_sql(tcp, "SELECT inet_server_addr(), inet_server_port()"),
        Ok(format!("127.0.0.1|{}\n", cluster.port()))
    );
    assert!(
        cluster
            .socket_dir()
            .join(format!(".s.PGSQL.{}", cluster.port()))
            .exists()
    );
    let settings = cluster.psql(
        "SELECT string_agg(name || '=' || setting, ',' ORDER BY name) FROM pg_settings \
         WHERE name IN ('synchronous_commit', 'ssl', 'max_connections', 'wal_level', 'hot_standby')",
    );
    assert_eq!(
        settings,
        "hot_standby=on,max_connections=100,ssl=on,synchronous_commit=on,wal_level=replica\n"
    );
    assert!(
        std::fs::read_to_string(cluster.log_path())
            .unwrap()
            .contains("ready to accept connections")
    );
}

#[test]
fn psql_rows_returns_values_byte_for_byte() {
    let cluster = Cluster::start();
    let rows = cluster.psql_rows(
        "SELECT * FROM (VALUES \
           (1, E'two\\nlines', E'tab\\there', 'pipe|comma,\"double\" ''single'''), \
           (2, '', NULL, E'trailing newline\\n'), \
           (3, ' padded ', E'back\\\\slash', E'crlf\\r\\n'), \
           (4, E'\\n', 'ünïcødé ✓', 'NULL')) AS t(n, a, b, c) ORDER BY n",
    );
    let text = |value: &str| Some(value.to_string());
    let expected = vec![
        vec![
            text("1"),
            text("two\nlines"),
            text("tab\there"),
            text("pipe|comma,\"double\" 'single'"),
        ],
        vec![text("2"), text(""), None, text("trailing newline\n")],
        vec![
            text("3"),
            text(" padded "),
            text("back\\slash"),
            text("crlf\r\n"),
        ],
        vec![text("4"), text("\n"), text("ünïcødé ✓"), text("NULL")],
    ];
    assert_eq!(rows, expected);
    assert_eq!(
        cluster.psql_rows("SELECT 1 WHERE false"),
        Vec::<Vec<Option<String>>>::new()
    );
    assert_eq!(cluster.psql_rows("SELECT ''"), [[text("")]]);
    assert_eq!(cluster.psql_rows("SELECT NULL"), [[None]]);
}

#[test]
fn psql_failure_panics_with_the_server_error() {
    let cluster = Cluster::start();
    let failure = std::panic::catch_unwind(|| cluster.psql("SELECT * FROM no_such_table"));
    let payload = failure.expect_err("psql on a missing table must panic");
    let message = payload
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_default();
    assert!(
        message.contains("relation \"no_such_table\" does not exist"),
        "{message}"
    );
}

// ---------------------------------------------------------------- authentication

#[test]
fn password_users_need_their_own_password() {
    let cluster = Cluster::start();
    for (user, password) in [
        (users::MD5_USER, users::MD5_PASSWORD),
        (users::SCRAM_USER, users::SCRAM_PASSWORD),
        (users::CLEARTEXT_USER, users::CLEARTEXT_PASSWORD),
    ] {
        assert_eq!(
            login(&cluster, user, Some(password), "disable"),
            Ok(format!("{user}\n"))
        );
        let error = login(&cluster, user, Some("wrong"), "disable").unwrap_err();
        assert!(
            error.contains("password authentication failed"),
            "{user}: {error}"
        );
    }
    assert_eq!(
        login(&cluster, users::TRUST_USER, None, "disable"),
        Ok("trust_user\n".to_string())
    );
    let methods = cluster.psql(
        "SELECT string_agg(user_name[1] || '=' || auth_method, ',' ORDER BY line_number) \
         FROM pg_hba_file_rules WHERE type = 'host' AND user_name[1] LIKE '%_user'",
    );
    assert_eq!(
        methods,
        "trust_user=trust,md5_user=md5,scram_user=scram-sha-256,cleartext_user=password\n"
    );
    let stored = cluster.psql(
        "SELECT rolname || '=' || CASE WHEN rolpassword LIKE 'md5%' THEN 'md5' \
           WHEN rolpassword LIKE 'SCRAM-SHA-256$%' THEN 'scram' END \
         FROM pg_authid WHERE rolname IN ('md5_user', 'scram_user') ORDER BY 1",
    );
    assert_eq!(stored, "md5_user=md5\nscram_user=scram\n");
}

#[test]
fn url_carries_percent_encoded_credentials() {
    let cluster = Cluster::start();
    let port = cluster.port();
    assert_eq!(
        cluster.url("us er", Some("p@ss:w/rd")),
        format!("postgresql://us%20er:p%40ss%3Aw%2Frd@127.0.0.1:{port}/postgres")
    );
    assert_eq!(
        cluster.url(users::TRUST_USER, None),
        format!("postgresql://trust_user@127.0.0.1:{port}/postgres")
    );
    let mut client = cluster.bin().command("psql");
    client
        .args(["-X", "-A", "-t", "-w"])
        .arg(cluster.url(users::SCRAM_USER, Some(users::SCRAM_PASSWORD)));
    assert_eq!(
        run_sql(client, "SELECT current_user"),
        Ok("scram_user\n".to_string())
    );
}

#[test]
fn ssl_only_user_needs_tls_and_the_certificate_verifies() {
    let cluster = Cluster::start();
    let (user, password) = (users::SSL_ONLY_USER, Some(users::SSL_ONLY_PASSWORD));
    let error = login(&cluster, user, password, "disable").unwrap_err();
    assert!(error.contains("pg_hba.conf rejects connection"), "{error}");
    let mut client = psql_tcp(&cluster, cluster.port(), user);
    client
        .env("PGSSLMODE", "require")
        .env("PGPASSWORD", users::SSL_ONLY_PASSWORD);
    assert_eq!(
        run_sql(
            client,
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        ),
        Ok("t\n".to_string())
    );
    for host in ["localhost", "127.0.0.1"] {
        let mut client = psql_tcp(&cluster, cluster.port(), user);
        client
            .args(["-h", host])
            .env("PGSSLMODE", "verify-full")
            .env("PGSSLROOTCERT", cluster.ca_cert_path())
            .env("PGPASSWORD", users::SSL_ONLY_PASSWORD);
        assert_eq!(
            run_sql(client, "SELECT current_user"),
            Ok("ssl_only_user\n".to_string()),
            "host {host}"
        );
    }
    let mut untrusting = psql_tcp(&cluster, cluster.port(), user);
    let not_a_ca = cluster.data_dir().join("server.crt");
    untrusting
        .env("PGSSLMODE", "verify-full")
        .env("PGSSLROOTCERT", not_a_ca)
        .env("PGPASSWORD", users::SSL_ONLY_PASSWORD);
    let error = run_sql(untrusting, "SELECT 1").unwrap_err();
    assert!(error.contains("certificate verify failed"), "{error}");
}

// ---------------------------------------------------------------- lifecycle faults

#[test]
fn restart_fast_leaves_a_working_server() {
    let cluster = Cluster::start();
    let started = cluster.psql("SELECT pg_postmaster_start_time()");
    cluster.restart_fast();
    assert!(cluster.is_running());
    assert!(answers(&cluster));
    assert_ne!(cluster.psql("SELECT pg_postmaster_start_time()"), started);
}

#[test]
fn crash_keeps_the_server_down_until_started_and_loses_no_commit() {
    let cluster = Cluster::start();
    cluster.psql("CREATE TABLE acknowledged (n int); INSERT INTO acknowledged VALUES (1), (2)");
    cluster.crash();
    assert!(!cluster.is_running());
    let error = run_sql(
        psql_tcp(&cluster, cluster.port(), users::SUPERUSER),
        "SELECT 1",
    )
    .unwrap_err();
    assert!(error.contains("Connection refused"), "{error}");
    cluster.start_again();
    assert_eq!(cluster.psql("SELECT count(*) FROM acknowledged"), "2\n");
    assert!(
        std::fs::read_to_string(cluster.log_path())
            .unwrap()
            .contains("automatic recovery in progress")
    );
    cluster.crash_and_restart();
    assert!(answers(&cluster));
}

#[test]
fn stop_then_start_again_leaves_a_working_server() {
    let cluster = Cluster::start();
    cluster.stop();
    assert!(!cluster.is_running());
    assert!(!answers(&cluster));
    cluster.start_again();
    assert!(cluster.is_running());
    assert!(answers(&cluster));
}

#[test]
fn terminate_backends_kills_a_running_query() {
    let cluster = Cluster::start();
    let mut client = psql_tcp(&cluster, cluster.port(), users::TRUST_USER);
    client.env("PGAPPNAME", "kit-victim");
    let victim = spawn_sql(client, "SELECT pg_sleep(30)");
    wait_for_running_query(&cluster, "kit-victim");
    assert!(cluster.terminate_backends() >= 1);
    let (succeeded, stderr) = finish(victim, Duration::from_secs(10));
    assert!(!succeeded);
    assert!(
        stderr.contains("terminating connection due to administrator command"),
        "{stderr}"
    );
    assert_eq!(
        cluster.psql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'kit-victim'"),
        "0\n"
    );
}

#[test]
fn pause_freezes_the_server_until_resume() {
    let cluster = Cluster::start();
    cluster.pause();
    assert!(cluster.is_running());
    let mut client = psql_tcp(&cluster, cluster.port(), users::SUPERUSER);
    client.env("PGCONNECT_TIMEOUT", "2");
    let attempt = Instant::now();
    let error = run_sql(client, "SELECT 1").unwrap_err();
    assert!(error.contains("timeout expired"), "{error}");
    assert!(attempt.elapsed() >= Duration::from_millis(1500));
    cluster.resume();
    assert!(answers(&cluster));
    let stall = Instant::now();
    cluster.stall(Duration::from_millis(300));
    assert!(stall.elapsed() >= Duration::from_millis(300));
    assert!(answers(&cluster));
}

#[test]
fn a_cluster_dropped_by_a_panicking_test_leaves_nothing_behind() {
    let left_behind: Mutex<Option<(Vec<i32>, PathBuf)>> = Mutex::default();
    let outcome = std::panic::catch_unwind(|| {
        let cluster = Cluster::start();
        *left_behind.lock().unwrap() =
            Some((server_pids(&cluster), cluster.data_dir().to_path_buf()));
        cluster.pause();
        panic!("deliberate panic while the cluster is paused");
    });
    assert!(outcome.is_err());
    let (pids, data_dir) = left_behind.into_inner().unwrap().expect("cluster started");
    assert!(
        pids.len() >= 4,
        "postmaster plus background processes: {pids:?}"
    );
    assert!(
        wait::eventually(Duration::from_secs(10), || !pids
            .iter()
            .any(|&pid| process_exists(pid))),
        "{pids:?} survived"
    );
    assert!(!data_dir.exists());
}

// ---------------------------------------------------------------- replication

#[test]
fn standby_follows_the_primary_and_takes_writes_after_promotion() {
    let primary = Cluster::start();
    primary.psql("CREATE TABLE t (v text); INSERT INTO t VALUES ('before backup')");
    let standby = primary.start_standby();
    assert_ne!(standby.port(), primary.port());
    assert_eq!(standby.psql("SELECT pg_is_in_recovery()"), "t\n");
    primary.psql("INSERT INTO t VALUES ('streamed')");
    let caught_up = wait::eventually(CLIENT_TIMEOUT, || {
        standby.psql("SELECT string_agg(v, ',' ORDER BY v) FROM t") == "before backup,streamed\n"
    });
    assert!(caught_up, "the standby never saw the streamed row");
    let refused = run_sql(
        psql_tcp(&standby, standby.port(), users::SUPERUSER),
        "INSERT INTO t VALUES ('x')",
    );
    assert!(refused.unwrap_err().contains("read-only transaction"));
    standby.promote();
    assert_eq!(standby.psql("SELECT pg_is_in_recovery()"), "f\n");
    standby.psql("INSERT INTO t VALUES ('after promotion')");
    assert_eq!(standby.psql("SELECT count(*) FROM t"), "3\n");
    assert!(
        login(
            &standby,
            users::SCRAM_USER,
            Some(users::SCRAM_PASSWORD),
            "require"
        )
        .is_ok()
    );
}

// ---------------------------------------------------------------- fault proxy

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_passes_traffic_through() {
    let cluster = shared_cluster().await;
    let proxy = FaultProxy::start(tcp_address(&cluster)).await;
    assert_eq!(proxy.target(), tcp_address(&cluster));
    let (db, port) = (Arc::clone(&cluster), proxy.port());
    let answer = blocking(move || {
        run_sql(
            psql_tcp(&db, port, users::SUPERUSER),
            "SELECT inet_server_port()",
        )
    })
    .await;
    assert_eq!(answer, Ok(format!("{}\n", cluster.port())));
    let mut client = psql_tcp(&cluster, proxy.port(), users::SCRAM_USER);
    client
        .env("PGSSLMODE", "require")
        .env("PGPASSWORD", users::SCRAM_PASSWORD);
    let over_tls = blocking(move || {
        run_sql(
            client,
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        )
    })
    .await;
    assert_eq!(over_tls, Ok("t\n".to_string()));
    assert!(
        blocking(move || wait::eventually(CLIENT_TIMEOUT, || proxy.live_connections() == 0)).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_cut_all_kills_a_live_connection() {
    let cluster = shared_cluster().await;
    let proxy = FaultProxy::start(tcp_address(&cluster)).await;
    let mut client = psql_tcp(&cluster, proxy.port(), users::SUPERUSER);
    client.env("PGAPPNAME", "kit-cut");
    let victim = spawn_sql(client, "SELECT pg_sleep(30)");
    let db = Arc::clone(&cluster);
    blocking(move || wait_for_running_query(&db, "kit-cut")).await;
    assert_eq!(proxy.live_connections(), 1);
    let cut_at = Instant::now();
    assert_eq!(proxy.cut_all(), 1);
    assert_eq!(proxy.live_connections(), 0);
    let (succeeded, stderr) = blocking(move || finish(victim, Duration::from_secs(10))).await;
    assert!(!succeeded, "the connection survived the cut");
    assert!(cut_at.elapsed() < Duration::from_secs(10), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_refuse_and_blackhole_make_connections_fail() {
    let cluster = shared_cluster().await;
    let proxy = Arc::new(FaultProxy::start(tcp_address(&cluster)).await);
    let connect = |timeout_secs: &'static str| {
        let (db, port) = (Arc::clone(&cluster), proxy.port());
        blocking(move || {
            let mut client = psql_tcp(&db, port, users::SUPERUSER);
            client.env("PGCONNECT_TIMEOUT", timeout_secs);
            let started = Instant::now();
            (run_sql(client, "SELECT 1"), started.elapsed())
        })
    };
    proxy.set_mode(ProxyMode::Refuse);
    let (refused, _) = connect("2").await;
    assert!(refused.is_err());
    assert_eq!(proxy.live_connections(), 0);

    proxy.set_mode(ProxyMode::Blackhole);
    let (blackholed, waited) = connect("2").await;
    assert!(blackholed.unwrap_err().contains("timeout expired"));
    assert!(
        waited >= Duration::from_millis(1500),
        "gave up after {waited:?}"
    );
    let hanging = spawn_sql(
        psql_tcp(&cluster, proxy.port(), users::SUPERUSER),
        "SELECT 1",
    );
    let held = Arc::clone(&proxy);
    assert!(
        blocking(move || wait::eventually(CLIENT_TIMEOUT, || held.live_connections() == 1)).await
    );
    assert_eq!(proxy.cut_all(), 1);
    let (succeeded, _) = blocking(move || finish(hanging, Duration::from_secs(10))).await;
    assert!(!succeeded);

    proxy.set_mode(ProxyMode::PassThrough);
    let (passed, _) = connect("5").await;
    assert_eq!(passed, Ok("1\n".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_latency_delays_every_exchange() {
    let cluster = shared_cluster().await;
    let proxy = FaultProxy::start(tcp_address(&cluster)).await;
    proxy.set_latency(Duration::from_millis(250));
    let (db, port) = (Arc::clone(&cluster), proxy.port());
    let started = Instant::now();
    let answer = blocking(move || run_sql(psql_tcp(&db, port, users::SUPERUSER), "SELECT 1")).await;
    let elapsed = started.elapsed();
    assert_eq!(answer, Ok("1\n".to_string()));
    // At least the query and its answer were each held back once.
    assert!(
        elapsed >= Duration::from_millis(500),
        "took only {elapsed:?}"
    );
}
