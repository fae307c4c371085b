//! Cleanup of clusters abandoned by killed test processes.
//!
//! `Drop` cleans up after passing and panicking tests, but not after a test
//! process that was killed (Ctrl-C, a CI timeout). Its servers would keep
//! running forever, so the first cluster a process starts looks for kit
//! temp dirs whose owning process is gone, kills and deletes them, and
//! releases the ports they held.

use std::fs;
use std::path::Path;
use std::sync::Once;

use super::{os, ports, procs, wait};

/// Prefix of every kit temp dir (clusters and template builds).
const PREFIX: &str = "pgw-kit-";

/// Reaps abandoned clusters, once per process.
pub fn reap_abandoned_once() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let mut roots = vec![os::scratch_root(), std::env::temp_dir()];
        roots.dedup();
        for entry in roots
            .iter()
            .filter_map(|root| fs::read_dir(root).ok())
            .flatten()
            .flatten()
        {
            let is_kit_dir = entry.file_name().to_string_lossy().starts_with(PREFIX);
            if is_kit_dir && owner_is_gone(&entry.path()) {
                reap(&entry.path());
            }
        }
        ports::clear_abandoned();
    });
}

/// Whether the process recorded as owner of `dir` has exited. A dir without
/// an owner file is still being set up, so it is left alone.
fn owner_is_gone(dir: &Path) -> bool {
    let Ok(text) = fs::read_to_string(dir.join(os::OWNER_FILE)) else {
        return false;
    };
    text.trim().parse().is_ok_and(|pid| !procs::is_alive(pid))
}

/// Kills the server running in `dir`, if any, then deletes `dir`.
fn reap(dir: &Path) {
    let data_dir = dir.join("data");
    if let Some(postmaster) = procs::postmaster_pid(&data_dir) {
        // SIGQUIT is an immediate shutdown; SIGCONT in case it was paused.
        procs::send(postmaster, libc::SIGQUIT);
        procs::send(postmaster, libc::SIGCONT);
        for child in procs::children(postmaster) {
            procs::send(child, libc::SIGCONT);
        }
        wait::eventually(std::time::Duration::from_secs(10), || {
            !procs::is_alive(postmaster)
        });
    }
    let _ = fs::remove_dir_all(dir);
}
