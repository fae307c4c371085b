//! The `pgwarden` binary as a child process, as an operator runs it.

use std::io::{BufRead, BufReader, Lines};
use std::process::{Child, ChildStderr, Command, Stdio};
use std::time::Duration;

use super::cluster::Cluster;
use super::process::wait_timeout;

/// A running `pgwarden` process.
pub struct Running {
    /// The process.
    pub child: Child,
    /// The data API's address, `127.0.0.1:PORT`.
    pub data: String,
    /// Its log output, when captured.
    pub stderr: Option<Lines<BufReader<ChildStderr>>>,
}

/// `pgwarden` with a clean environment: no inherited `DATABASE_URL`, info logs.
pub fn command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_pgwarden"));
    command.env_remove("DATABASE_URL").env("RUST_LOG", "info");
    command
}

/// Starts `pgwarden` in front of `cluster` on free ports, configured further
/// by `configure`; waits for its banner and keeps draining its stdout.
pub fn spawn(cluster: &Cluster, configure: impl FnOnce(&mut Command)) -> Running {
    let url = format!("{}?sslmode=disable", cluster.url("postgres", None));
    let mut command = command();
    command
        .args([
            "--database-url",
            &url,
            "--listen",
            "127.0.0.1:0",
            "--ops-listen",
            "127.0.0.1:0",
            "--pg-listen",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    configure(&mut command);
    let mut child = command.spawn().expect("pgwarden starts");
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let banner = stdout.next().expect("a banner").unwrap();
    assert!(banner.starts_with("pgwarden "), "{banner}");
    let data_line = stdout.next().expect("the data API line").unwrap();
    let data = data_line
        .split("POST http://")
        .nth(1)
        .expect("an address")
        .trim_end_matches("/sql")
        .to_owned();
    std::thread::spawn(move || stdout.for_each(drop));
    let stderr = child.stderr.take().map(|e| BufReader::new(e).lines());
    Running {
        child,
        data,
        stderr,
    }
}

impl Running {
    /// Sends SIGTERM.
    pub fn terminate(&self) {
        // SAFETY: kill only sends a signal to the child this test spawned.
        let sent = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(sent, 0, "SIGTERM could not be sent");
    }

    /// Waits (bounded) for the exit and returns its code (`None`: killed by a signal).
    pub fn exit_code(&mut self, within: Duration) -> Option<i32> {
        let status = wait_timeout(&mut self.child, within).expect("pgwarden exited in time");
        status.code()
    }
}
