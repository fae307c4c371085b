//! Finding and signalling a cluster's server processes through `/proc`.
//!
//! Freezing a server means stopping the postmaster and every backend it
//! forked; `/proc` tells who is a child of whom and whether a process has
//! really stopped.

use std::fs;
use std::path::Path;

/// A process id.
pub type Pid = libc::pid_t;

/// Postmaster pid of the server running in `data_dir`, if one is alive.
///
/// Read from the first line of `postmaster.pid` and confirmed through the
/// process' working directory (every server process runs inside its data
/// directory), so a stale pid file never leads to signalling a stranger.
pub fn postmaster_pid(data_dir: &Path) -> Option<Pid> {
    let text = fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    let pid: Pid = text.lines().next()?.trim().parse().ok()?;
    let cwd = fs::read_link(format!("/proc/{pid}/cwd")).ok()?;
    let expected = fs::canonicalize(data_dir).ok()?;
    (cwd == expected && is_alive(pid)).then_some(pid)
}

/// Direct children of `parent`.
pub fn children(parent: Pid) -> Vec<Pid> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<Pid>().ok())
        .filter(|&pid| parent_of(pid) == Some(parent))
        .collect()
}

/// Scheduler state of `pid` (`R`, `S`, `T` when stopped, `Z` for a zombie...), `None` if gone.
pub fn state(pid: Pid) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_fields(&stat).next()?.chars().next()
}

/// Whether `pid` exists and is not a zombie.
pub fn is_alive(pid: Pid) -> bool {
    state(pid).is_some_and(|state| state != 'Z')
}

/// Whether `pid` is stopped by a signal (or already gone, which is as good for a freeze).
pub fn is_stopped_or_gone(pid: Pid) -> bool {
    state(pid).is_none_or(|state| matches!(state, 'T' | 't' | 'Z'))
}

/// Sends `signal` to `pid`; returns whether it was delivered.
pub fn send(pid: Pid, signal: libc::c_int) -> bool {
    // SAFETY: kill has no memory-safety preconditions; a wrong pid only fails.
    unsafe { libc::kill(pid, signal) == 0 }
}

/// Parent pid of `pid`.
fn parent_of(pid: Pid) -> Option<Pid> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_fields(&stat).nth(1)?.parse().ok()
}

/// Fields of a `/proc/<pid>/stat` line after the command name, which is in
/// parentheses and may itself contain spaces and parentheses.
fn stat_fields(stat: &str) -> std::str::SplitWhitespace<'_> {
    stat.rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
}
