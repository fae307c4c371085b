//! The `pgwarden` binary itself: it reports bad configuration naming the
//! keys, logs as JSON on request, exits 0 on SIGTERM after draining, and a
//! second signal exits at once.

mod support;

use std::process::Stdio;
use std::time::Duration;

use support::Cluster;
use support::binary::{command, spawn};

#[test]
fn bad_configuration_is_reported_all_at_once_naming_each_key() {
    let output = command()
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
    let mut pgwarden = spawn(&cluster, |_| {});
    std::thread::sleep(Duration::from_millis(500));
    pgwarden.terminate();
    assert_eq!(pgwarden.exit_code(Duration::from_secs(20)), Some(0));
}

/// Sends `SELECT pg_sleep(30)` over a raw HTTP connection and waits for the answer.
fn slow_request(address: String) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut stream = std::net::TcpStream::connect(&address).unwrap();
        let body = r#"{"query":"SELECT pg_sleep(30)"}"#;
        let request = format!(
            "POST /sql HTTP/1.1\r\nHost: x\r\nNeon-Connection-String: postgresql://postgres@x/postgres\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        std::io::Write::write_all(&mut stream, request.as_bytes()).unwrap();
        let mut answer = String::new();
        let _ = std::io::Read::read_to_string(&mut stream, &mut answer);
    })
}

#[test]
fn json_logs_and_a_second_signal_exits_at_once() {
    let cluster = Cluster::start();
    let mut pgwarden = spawn(&cluster, |command| {
        command
            .args(["--log-format", "json"])
            .env("PGWARDEN_SHUTDOWN_GRACE_MS", "60000")
            .stderr(Stdio::piped());
    });
    let mut logs = pgwarden.stderr.take().unwrap();
    let first_log = logs.next().unwrap().unwrap();
    let parsed: serde_json::Value = serde_json::from_str(&first_log).expect("a JSON log line");
    assert_eq!(parsed["level"], "INFO", "{first_log}");
    std::thread::spawn(move || logs.for_each(drop));

    // A request that keeps the drain busy far longer than the test waits.
    let _slow = slow_request(pgwarden.data.clone());
    let running = "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(30)%' AND state = 'active' AND pid <> pg_backend_pid()";
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while cluster.psql(running).trim() == "0" {
        assert!(
            std::time::Instant::now() < deadline,
            "the slow request never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    pgwarden.terminate();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        pgwarden.child.try_wait().unwrap().is_none(),
        "the first signal drains, it does not exit"
    );
    pgwarden.terminate();
    assert_eq!(
        pgwarden.exit_code(Duration::from_secs(10)),
        Some(130),
        "the second signal exits at once"
    );
}
