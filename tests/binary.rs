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
