//! The Node.js clients in tests/clients: where they are, Prisma's
//! generated client, and node runs that cannot hang a test.
//!
//! A client that hangs is a finding, not a reason to hang the suite: every
//! run here has a deadline, after which node and every process it started
//! (the test runner's children, tsx's) are killed as one process group,
//! and the output so far is kept for the failure message.

use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::task::JoinHandle;

/// tests/clients, after checking that `package` is installed there.
pub fn clients_dir(package: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/clients");
    assert!(
        dir.join("node_modules").join(package).exists(),
        "{package} is not installed: run `npm ci --prefix tests/clients` (needs Node.js 20 and npm)"
    );
    dir
}

/// `node` in tests/clients, in a process group of its own.
pub fn command(package: &str) -> Command {
    let mut command = Command::new("node");
    command
        .current_dir(clients_dir(package))
        .process_group(0)
        .kill_on_drop(true);
    command
}

/// Generates the Prisma client for tests/clients/prisma/schema.prisma.
/// `prisma generate` needs no schema engine, but the CLI insists on having
/// one and would download it from outside the package registry; pointing it
/// at `true` lets generation run offline.
pub async fn generate_prisma_client() {
    let mut generate = command("prisma");
    generate
        .args(["node_modules/prisma/build/index.js", "generate"])
        .env("PRISMA_SCHEMA_ENGINE_BINARY", "/bin/true")
        .env("PRISMA_HIDE_UPDATE_MESSAGE", "1");
    let run = run(generate, Duration::from_secs(120)).await;
    assert!(run.succeeded(), "prisma generate failed:\n{run}");
}

/// What a bounded node run left.
pub struct Run {
    /// The exit status; `None` when the deadline passed first.
    pub status: Option<ExitStatus>,
    /// Everything node printed to stdout.
    pub stdout: String,
    /// Everything node printed to stderr.
    pub stderr: String,
}

impl Run {
    /// Exited, with status 0, in time.
    pub fn succeeded(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.status {
            Some(status) => writeln!(f, "node exited: {status}")?,
            None => writeln!(f, "node was still running at its deadline; killed")?,
        }
        write!(
            f,
            "--- stdout\n{}\n--- stderr\n{}",
            self.stdout, self.stderr
        )
    }
}

/// Runs `command` to its end or to `deadline`, whichever comes first.
pub async fn run(mut command: Command, deadline: Duration) -> Run {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("node runs (is Node.js installed?)");
    let group = child.id().expect("a running child has a pid");
    let stdout = collect(child.stdout.take());
    let stderr = collect(child.stderr.take());
    let status = match tokio::time::timeout(deadline, child.wait()).await {
        Ok(status) => Some(status.expect("node is waited for")),
        Err(_) => {
            kill_group(group);
            let _ = child.wait().await;
            None
        }
    };
    Run {
        status,
        stdout: output_of(stdout, group).await,
        stderr: output_of(stderr, group).await,
    }
}

/// What `reader` collected. A process node left behind may still hold the
/// pipe open after node exited; it is given a few seconds, then killed.
async fn output_of(mut reader: JoinHandle<String>, group: u32) -> String {
    if let Ok(text) = tokio::time::timeout(Duration::from_secs(5), &mut reader).await {
        return text.unwrap_or_default();
    }
    kill_group(group);
    reader.await.unwrap_or_default()
}

/// A node script that reads one command per line on stdin and answers
/// each with one JSON line on stdout; it lives as long as this value.
pub struct Conversation {
    child: Child,
    group: u32,
    stdin: ChildStdin,
    answers: Lines<BufReader<ChildStdout>>,
    stderr: JoinHandle<String>,
}

impl Conversation {
    /// Starts `command` with pipes for the conversation.
    pub fn start(mut command: Command) -> Conversation {
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("node runs (is Node.js installed?)");
        let group = child.id().expect("a running child has a pid");
        let stdin = child.stdin.take().unwrap();
        let answers = BufReader::new(child.stdout.take().unwrap()).lines();
        let stderr = collect(child.stderr.take());
        Conversation {
            child,
            group,
            stdin,
            answers,
            stderr,
        }
    }

    /// Sends `line` and returns the JSON answer, which must come within
    /// `deadline`; panics with node's stderr otherwise.
    pub async fn ask(&mut self, line: &str, deadline: Duration) -> serde_json::Value {
        self.send(line).await;
        match self.answer_within(deadline).await {
            Some(answer) => answer,
            None => panic!(
                "`{line}` got no answer within {deadline:?}:\n{}",
                self.end().await
            ),
        }
    }

    /// Sends `line`, without waiting for its answer.
    pub async fn send(&mut self, line: &str) {
        self.stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .expect("node reads its commands");
    }

    /// The next JSON answer, or `None` if none came within `deadline`
    /// (it may still come later); panics if node ended.
    pub async fn answer_within(&mut self, deadline: Duration) -> Option<serde_json::Value> {
        let answer = tokio::time::timeout(deadline, self.answers.next_line()).await;
        match answer {
            Ok(Ok(Some(text))) => Some(
                serde_json::from_str(&text)
                    .unwrap_or_else(|e| panic!("node answered {text:?}, not JSON: {e}")),
            ),
            Ok(_) => panic!("node ended without an answer:\n{}", self.end().await),
            Err(_) => None,
        }
    }

    /// Ends node (killing it if it is still running) and returns its stderr.
    pub async fn end(&mut self) -> String {
        kill_group(self.group);
        let _ = self.child.wait().await;
        (&mut self.stderr).await.unwrap_or_default()
    }
}

impl Drop for Conversation {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            kill_group(self.group);
        }
    }
}

fn collect(stream: Option<impl AsyncRead + Unpin + Send + 'static>) -> JoinHandle<String> {
    tokio::spawn(async move {
        let mut bytes = Vec::new();
        if let Some(mut stream) = stream {
            let _ = stream.read_to_end(&mut bytes).await;
        }
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// Kills the process group node leads: node and whatever it started.
fn kill_group(group: u32) {
    // SAFETY: kill(2) with a negative pid signals the process group made
    // for this node (process_group(0)), and nothing else.
    unsafe {
        libc::kill(-(group as libc::pid_t), libc::SIGKILL);
    }
}
