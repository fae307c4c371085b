//! Faults a test can inject into a running cluster.
//!
//! Each helper returns only once its outcome is observable (the server is
//! down, back up, frozen, the backends are gone), so a test can assert on
//! the client's reaction right away instead of guessing how long to sleep.

use std::thread;
use std::time::Duration;

use super::{Cluster, FAULT_TIMEOUT, PG_CTL_WAIT_SECS, procs, wait};

impl Cluster {
    /// Whether the server (postmaster) process is alive; a paused server counts as running.
    pub fn is_running(&self) -> bool {
        procs::postmaster_pid(&self.data_dir).is_some()
    }

    /// Restarts the server with a fast shutdown (clients are disconnected,
    /// nothing is lost); returns once it accepts connections again.
    #[track_caller]
    pub fn restart_fast(&self) {
        self.resume();
        let log = self.log_path();
        let log = log.to_str().expect("temp dir paths are UTF-8");
        let args = [
            "restart",
            "-m",
            "fast",
            "-w",
            "-t",
            PG_CTL_WAIT_SECS,
            "-l",
            log,
        ];
        self.pg_ctl_or_fail("restart_fast", &args);
        self.wait_ready("restart_fast");
    }

    /// Shuts the server down cleanly (fast mode); returns once it is gone.
    #[track_caller]
    pub fn stop(&self) {
        self.resume();
        self.pg_ctl_or_fail(
            "stop",
            &["stop", "-m", "fast", "-w", "-t", PG_CTL_WAIT_SECS],
        );
        self.wait_stopped("stop");
    }

    /// Starts a stopped (or crashed) server again; returns once it accepts
    /// connections. (Named apart from the constructor [`Cluster::start`],
    /// because Rust cannot have both under one name.)
    #[track_caller]
    pub fn start_again(&self) {
        if self.is_running() {
            self.fail("start_again(): the server is already running");
        }
        if let Err(e) = self.pg_ctl_start() {
            self.fail(&format!("start_again(): {e}"));
        }
        self.wait_ready("start_again");
    }

    /// Kills the server the way a crash would (immediate shutdown: no
    /// checkpoint, crash recovery on next start). It stays down until [`Cluster::start_again`].
    #[track_caller]
    pub fn crash(&self) {
        self.resume();
        self.pg_ctl_or_fail(
            "crash",
            &["stop", "-m", "immediate", "-w", "-t", PG_CTL_WAIT_SECS],
        );
        self.wait_stopped("crash");
    }

    /// [`Cluster::crash`] followed by [`Cluster::start_again`].
    #[track_caller]
    pub fn crash_and_restart(&self) {
        self.crash();
        self.start_again();
    }

    /// Kills one client backend with SIGKILL, as the OOM killer does,
    /// preferring one that is running a statement. The postmaster then ends
    /// every other session and recovers **in place**: the same postmaster,
    /// the same start time, a new end-of-recovery checkpoint. Returns once
    /// the recovery is over (the shared statistics were reset, which crash
    /// recovery always does) and the server accepts connections again.
    #[track_caller]
    pub fn kill_one_backend(&self) {
        self.resume();
        let postmaster = procs::postmaster_pid(&self.data_dir);
        let marker = "SELECT pg_stat_get_bgwriter_stat_reset_time()";
        let before = self.psql(marker);
        let rows = self.psql_rows(
            "SELECT pid FROM pg_stat_activity \
             WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() \
             ORDER BY state = 'active' DESC, pid LIMIT 1",
        );
        let Some(pid) = rows
            .first()
            .and_then(|row| row.first().cloned().flatten())
            .and_then(|pid| pid.parse::<procs::Pid>().ok())
        else {
            self.fail("kill_one_backend(): no client backend to kill");
        };
        procs::send(pid, libc::SIGKILL);
        let recovered = || self.try_psql(marker).is_ok_and(|after| after != before);
        if !wait::eventually(FAULT_TIMEOUT, recovered) {
            self.fail("kill_one_backend(): the server did not recover from the killed backend");
        }
        if procs::postmaster_pid(&self.data_dir) != postmaster {
            self.fail(
                "kill_one_backend(): the postmaster restarted instead of recovering in place",
            );
        }
    }

    /// Terminates every client backend except the one issuing the command and
    /// returns how many; returns once they have all exited.
    #[track_caller]
    pub fn terminate_backends(&self) -> usize {
        // MATERIALIZED makes the filter run before pg_terminate_backend, which
        // must never be called on walsenders or other server processes.
        let rows = self.psql_rows(
            "WITH targets AS MATERIALIZED (SELECT pid FROM pg_stat_activity \
               WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()) \
             SELECT pid FROM targets WHERE pg_terminate_backend(pid)",
        );
        let pids: Vec<String> = rows
            .into_iter()
            .filter_map(|mut row| row.remove(0))
            .collect();
        if !pids.is_empty() {
            self.wait_backends_gone(&pids);
        }
        pids.len()
    }

    /// Freezes the postmaster and all its children with SIGSTOP, as a stalled
    /// host or a long GC-like pause would: connections are accepted by the
    /// kernel but nothing answers. Returns once every process is stopped.
    ///
    /// While paused, the kit's own SQL helpers hang too (until their timeout);
    /// every other fault helper resumes the server first.
    #[track_caller]
    pub fn pause(&self) {
        let Some(postmaster) = procs::postmaster_pid(&self.data_dir) else {
            self.fail("pause(): the server is not running");
        };
        // The postmaster first, so it forks nothing new while its children are collected.
        self.freeze(&[postmaster]);
        self.freeze(&procs::children(postmaster));
    }

    /// Thaws everything [`Cluster::pause`] froze; returns once the server
    /// accepts connections again. Does nothing if the cluster is not paused.
    #[track_caller]
    pub fn resume(&self) {
        let frozen = self.take_paused();
        if frozen.is_empty() {
            return;
        }
        // Children first, so the postmaster wakes up to a working set of backends.
        for &pid in frozen.iter().rev() {
            procs::send(pid, libc::SIGCONT);
        }
        let thawed = || {
            frozen
                .iter()
                .all(|&pid| !procs::is_alive(pid) || procs::state(pid) != Some('T'))
        };
        if !wait::eventually(FAULT_TIMEOUT, thawed) {
            self.fail("resume(): server processes are still stopped");
        }
        self.wait_ready("resume");
    }

    /// Pauses the server for `duration`, then resumes it.
    #[track_caller]
    pub fn stall(&self, duration: Duration) {
        self.pause();
        thread::sleep(duration);
        self.resume();
    }

    /// Sends SIGCONT to every paused process without waiting; used on drop.
    pub(super) fn resume_quietly(&self) {
        for pid in self.take_paused() {
            procs::send(pid, libc::SIGCONT);
        }
    }

    /// SIGSTOPs `pids`, records them for `resume`, and waits until they are all stopped.
    #[track_caller]
    fn freeze(&self, pids: &[procs::Pid]) {
        self.paused_pids()
            .extend(pids.iter().filter(|&&pid| procs::send(pid, libc::SIGSTOP)));
        if !wait::eventually(FAULT_TIMEOUT, || {
            pids.iter().all(|&pid| procs::is_stopped_or_gone(pid))
        }) {
            self.fail("pause(): server processes did not stop");
        }
    }

    /// Removes and returns the list of paused processes.
    fn take_paused(&self) -> Vec<procs::Pid> {
        std::mem::take(&mut *self.paused_pids())
    }

    /// The paused-process list, usable even after a panic poisoned its lock.
    fn paused_pids(&self) -> std::sync::MutexGuard<'_, Vec<procs::Pid>> {
        self.paused
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits until no server process remains.
    #[track_caller]
    fn wait_stopped(&self, what: &str) {
        if !wait::eventually(FAULT_TIMEOUT, || !self.is_running()) {
            self.fail(&format!("{what}: the server is still running"));
        }
    }

    /// Waits until none of `pids` is listed in `pg_stat_activity`.
    #[track_caller]
    fn wait_backends_gone(&self, pids: &[String]) {
        let query = format!(
            "SELECT count(*) FROM pg_stat_activity WHERE pid IN ({})",
            pids.join(", ")
        );
        let gone = || self.psql_rows(&query) == [[Some("0".to_string())]];
        if !wait::eventually(FAULT_TIMEOUT, gone) {
            self.fail("terminate_backends(): backends are still running");
        }
    }
}
