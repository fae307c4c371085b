//! The `pgwarden` binary itself: it reports bad configuration naming the
//! keys, serves with its flags, and exits 0 on SIGTERM after draining.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use support::Cluster;

fn pgwarden() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_pgwarden"));
    command.env_remove("DATABASE_URL").env("RUST_LOG", "info");
    command
}

#[test]
fn bad_configuration_is_reported_all_at_once_naming_each_key() {
    let output = pgwarden()
        .args(["--listen", "nowhere", "--log-format", "xml"])
        .env("PGWARDEN_GUARD_TIMEOUT_MS", "0")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    for key in ["listen", "log_format", "guard_timeout_ms"] {
        assert!(
            stderr.contains(&format!("{key}:")),
            "{key} not named in: {stderr}"
        );
    }
}

#[test]
fn sigterm_drains_and_exits_zero() {
    let cluster = Cluster::start();
    let url = format!("{}?sslmode=disable", cluster.url("postgres", None));
    let mut child = pgwarden()
        .args([
            "--database-url",
            &url,
            "--listen",
            "127.0.0.1:0",
            "--ops-listen",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let mut lines = stdout.lines();
    let banner = lines.next().unwrap().unwrap();
    assert!(banner.starts_with("pgwarden "), "{banner}");
    let data = lines.next().unwrap().unwrap();
    assert!(data.contains("POST http://127.0.0.1:"), "{data}");

    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: kill only sends a signal to the child we spawned.
    let sent = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(sent, 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "pgwarden did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0));
}

#[test]
fn json_logs_and_a_second_signal_exits_at_once() {
    let cluster = Cluster::start();
    let url = format!("{}?sslmode=disable", cluster.url("postgres", None));
    let mut child = pgwarden()
        .args([
            "--database-url",
            &url,
            "--listen",
            "127.0.0.1:0",
            "--ops-listen",
            "127.0.0.1:0",
        ])
        .args(["--log-format", "json"])
        .env("PGWARDEN_SHUTDOWN_GRACE_MS", "60000")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let _banner = stdout.next();
    let data = stdout.next().unwrap().unwrap();
    let address = data
        .split("POST http://")
        .nth(1)
        .unwrap()
        .trim_end_matches("/sql")
        .to_owned();
    std::thread::spawn(move || stdout.for_each(drop));
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let first_log = stderr.next().unwrap().unwrap();
    let parsed: serde_json::Value = serde_json::from_str(&first_log).expect("a JSON log line");
    assert_eq!(parsed["level"], "INFO", "{first_log}");
    std::thread::spawn(move || stderr.for_each(drop));

    // A request that keeps the drain busy far longer than the test waits.
    let slow = std::thread::spawn(move || {
        let mut stream = std::net::TcpStream::connect(&address).unwrap();
        let body = r#"{"query":"SELECT pg_sleep(30)"}"#;
        let request = format!(
            "POST /sql HTTP/1.1\r\nHost: x\r\nNeon-Connection-String: postgresql://postgres@x/postgres\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        std::io::Write::write_all(&mut stream, request.as_bytes()).unwrap();
        let mut answer = String::new();
        let _ = std::io::Read::read_to_string(&mut stream, &mut answer);
    });
    let running = "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(30)%' AND state = 'active' AND pid <> pg_backend_pid()";
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while cluster.psql(running).trim() == "0" {
        assert!(
            std::time::Instant::now() < deadline,
            "the slow request never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = child.id() as libc::pid_t;
    // SAFETY (both calls): kill only sends a signal to the child we spawned.
    let signal = || unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(signal(), 0);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the first signal drains, it does not exit"
    );
    assert_eq!(signal(), 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the second signal did not exit at once"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(130));
    drop(slow);
}
