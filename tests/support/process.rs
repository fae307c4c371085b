//! Child processes with bounded waits.
//!
//! Every external program the kit runs (PostgreSQL tools, psql) goes through
//! here so that a wedged server can never hang a test: output is drained on
//! helper threads (a chatty child cannot block on a full pipe) and the child
//! is killed once its deadline passes.

use std::io::{Read, Write};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How often a bounded wait checks whether the child has exited.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Runs `cmd` to completion, feeding it `stdin`, and returns its output.
///
/// A non-zero exit status is not an error here; callers decide what it means.
/// Errors are: the program cannot be spawned, or it is still running after
/// `timeout` (it is then killed).
pub fn run(cmd: &mut Command, stdin: Option<&[u8]>, timeout: Duration) -> Result<Output, String> {
    let stdin_mode = if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    };
    cmd.stdin(stdin_mode)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", describe(cmd)))?;
    let feeder = stdin.map(|data| feed(&mut child, data));
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let Some(status) = wait_timeout(&mut child, timeout) else {
        return Err(format!(
            "{} still running after {timeout:?}; killed",
            describe(cmd)
        ));
    };
    if let Some(feeder) = feeder {
        let _ = feeder.join();
    }
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// Waits up to `timeout` for `child` to exit.
///
/// On timeout the child is killed and reaped, and `None` is returned.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(POLL_INTERVAL),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

/// Program and arguments of `cmd`, for error messages.
pub fn describe(cmd: &Command) -> String {
    let mut text = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    text
}

/// Writes `data` to the child's stdin on a helper thread, then closes it.
fn feed(child: &mut Child, data: &[u8]) -> JoinHandle<()> {
    let mut pipe = child.stdin.take().expect("stdin was requested as a pipe");
    let data = data.to_vec();
    thread::spawn(move || {
        // The child may exit without reading everything; that is its business.
        let _ = pipe.write_all(&data);
    })
}

/// Collects everything from a child's output pipe on a helper thread.
fn drain(pipe: Option<impl Read + Send + 'static>) -> JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        bytes
    })
}
