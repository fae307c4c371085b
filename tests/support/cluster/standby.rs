//! Streaming replicas, for failover scenarios.
//!
//! A standby is a `pg_basebackup` of its primary, so it has the same roles,
//! configuration and TLS certificate; it differs only in port, socket
//! directory and `cluster_name`.

use std::fs;
use std::time::Duration;

use super::{Cluster, FAULT_TIMEOUT, HOST, PG_CTL_WAIT_SECS, config, os, users, wait};

impl Cluster {
    /// Creates a streaming standby of this cluster and returns once it is in
    /// recovery and the primary reports it as streaming.
    #[track_caller]
    pub fn start_standby(&self) -> Cluster {
        let mut standby = Cluster::empty(self.bin.clone());
        standby.base_backup_of(self);
        fs::copy(&self.ca_cert, &standby.ca_cert)
            .unwrap_or_else(|e| standby.fail(&format!("cannot copy the CA certificate: {e}")));
        standby.launch();
        if !wait::eventually(FAULT_TIMEOUT, || standby.in_recovery()) {
            standby.fail("start_standby(): the standby is not in recovery");
        }
        if !wait::eventually(FAULT_TIMEOUT, || self.streams_to(&standby)) {
            self.fail("start_standby(): the standby does not appear as streaming");
        }
        standby
    }

    /// Promotes this standby to a primary; returns once it accepts writes.
    #[track_caller]
    pub fn promote(&self) {
        self.pg_ctl_or_fail("promote", &["promote", "-w", "-t", PG_CTL_WAIT_SECS]);
        if !wait::eventually(FAULT_TIMEOUT, || !self.in_recovery()) {
            self.fail("promote(): the server is still in recovery");
        }
    }

    /// Makes every commit on this primary wait until `standby` (named by its
    /// `application_name`) has flushed it; returns once the primary reports
    /// the standby as synchronous. While the standby is paused or stopped,
    /// commits are durable here but their COMMIT gets no answer.
    #[track_caller]
    pub fn require_synchronous(&self, standby: &Cluster) {
        let name = config::cluster_name(standby.port);
        self.psql(&format!(
            "ALTER SYSTEM SET synchronous_standby_names = '\"{name}\"'"
        ));
        self.psql("SELECT pg_reload_conf()");
        let query =
            format!("SELECT sync_state FROM pg_stat_replication WHERE application_name = '{name}'");
        if !wait::eventually(FAULT_TIMEOUT, || {
            self.psql_rows(&query) == [[Some("sync".to_string())]]
        }) {
            self.fail("require_synchronous(): the standby never became synchronous");
        }
    }

    /// Whether `pg_is_in_recovery()` is true, i.e. the server is a standby.
    #[track_caller]
    pub fn in_recovery(&self) -> bool {
        self.psql_rows("SELECT pg_is_in_recovery()") == [[Some("t".to_string())]]
    }

    /// Copies `primary` into this cluster's data directory, configured to follow it.
    #[track_caller]
    fn base_backup_of(&self, primary: &Cluster) {
        let mut cmd = os::server_command(&self.bin, "pg_basebackup");
        cmd.arg("-D")
            .arg(&self.data_dir)
            .args(["-R", "-X", "stream", "-c", "fast", "--no-sync", "-h", HOST])
            .args(["-U", users::SUPERUSER, "-p"])
            .arg(primary.port.to_string())
            // Replication needs no TLS; -R also records this in primary_conninfo.
            .env("PGSSLMODE", "disable");
        self.run_or_fail(&mut cmd, Duration::from_secs(120));
    }

    /// Whether this primary lists `standby` as streaming in `pg_stat_replication`.
    fn streams_to(&self, standby: &Cluster) -> bool {
        let query = format!(
            "SELECT count(*) FROM pg_stat_replication \
             WHERE application_name = '{}' AND state = 'streaming'",
            config::cluster_name(standby.port)
        );
        self.psql_rows(&query) == [[Some("1".to_string())]]
    }
}
