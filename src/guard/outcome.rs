//! Asking the database what became of a write whose connection broke after
//! its COMMIT was sent, and judging whether the answer can be trusted.
//!
//! The argument for when `txid_status` is authoritative is in the module doc
//! of [`super::replay`]; this module turns it into one query and one
//! decision function, `judge`, tested as a table.

use tracing::warn;

use super::replay::TxOutcome;
use crate::backend::{BackendError, Connection, QueryResult, Statement, TxIdentity};

/// Asks `conn` (of a generation newer than the broken one, or of the same
/// one when the server did not fail) about `identity`. An error is `conn`
/// failing at the connection level: that is not the database saying it
/// cannot tell, so the question may be asked again on another session.
pub async fn ask(conn: &mut Connection, identity: &TxIdentity) -> Result<TxOutcome, BackendError> {
    let xid = vec![Some(identity.xid.to_string())];
    let probe = Statement::with_params(outcome_sql(conn), xid.clone());
    let answer = match conn.query(&probe).await {
        Err(BackendError::Sql { error, .. }) if error.code == INSUFFICIENT_PRIVILEGE => {
            // Without pg_control_checkpoint() only an answer from a server
            // that did not crash since the write can be trusted.
            let fallback = Statement::with_params(NO_CHECKPOINT_SQL, xid);
            conn.query(&fallback)
                .await
                .map(|r| read_outcome(&r, identity, false))
        }
        other => other.map(|r| read_outcome(&r, identity, true)),
    };
    match answer {
        Ok(outcome) => Ok(outcome),
        // An xid in the future was never logged: not even a crash can have committed it.
        Err(BackendError::Sql { error, .. }) if error.code == XID_IN_FUTURE => {
            Ok(TxOutcome::NeverLogged)
        }
        Err(error) if error.is_connection_level() => Err(error),
        Err(error) => {
            warn!(xid = identity.xid, error = %error, "Cannot ask the outcome of a broken write.");
            Ok(TxOutcome::Unknown)
        }
    }
}

/// The status of a transaction, what tells a crash, and the checkpoint
/// evidence (see the module doc of `replay`): whether the latest checkpoint
/// is the one that ended a crash recovery (a shutdown-type checkpoint, redo
/// at its own record, taken after the statistics were reset, and the only
/// one since), and whether the xid is at or above its next xid.
/// `txid_status` fails with 22023 for an xid in the future, which also
/// means it was never logged. `{checkpoints}` counts the checkpoints since
/// the statistics reset; PostgreSQL 17 moved those counters.
macro_rules! outcome_sql {
    ($checkpoints:literal) => {
        concat!(
            "SELECT txid_status($1::bigint), pg_postmaster_start_time()::text, ",
            "substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8), ",
            "pg_stat_get_bgwriter_stat_reset_time()::text, ",
            "c.redo_lsn = c.checkpoint_lsn ",
            "AND c.checkpoint_time >= date_trunc('second', pg_stat_get_bgwriter_stat_reset_time()) ",
            "AND ",
            $checkpoints,
            " <= 1, ",
            "$1::bigint >= (split_part(c.next_xid, ':', 1)::bigint << 32) ",
            "+ split_part(c.next_xid, ':', 2)::bigint ",
            "FROM pg_control_checkpoint() c"
        )
    };
}

/// [`outcome_sql!`] up to PostgreSQL 16.
const OUTCOME_SQL: &str = outcome_sql!(
    "pg_stat_get_bgwriter_timed_checkpoints() + pg_stat_get_bgwriter_requested_checkpoints()"
);
/// [`outcome_sql!`] from PostgreSQL 17 on.
const OUTCOME_SQL_17: &str =
    outcome_sql!("pg_stat_get_checkpointer_num_timed() + pg_stat_get_checkpointer_num_requested()");

/// The fallback of [`OUTCOME_SQL`] for roles that may not read the checkpoint.
const NO_CHECKPOINT_SQL: &str = "SELECT txid_status($1::bigint), pg_postmaster_start_time()::text, \
     substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8), \
     pg_stat_get_bgwriter_stat_reset_time()::text";
/// SQLSTATE of `txid_status` for an xid that was never handed out.
const XID_IN_FUTURE: &str = "22023";
/// SQLSTATE of a missing privilege (here: EXECUTE on `pg_control_checkpoint()`).
const INSUFFICIENT_PRIVILEGE: &str = "42501";

/// The outcome query for the server `conn` speaks to.
fn outcome_sql(conn: &Connection) -> &'static str {
    let major = conn
        .parameter("server_version")
        .and_then(|v| v.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|v| v.parse::<u32>().ok());
    match major {
        Some(major) if major >= 17 => OUTCOME_SQL_17,
        _ => OUTCOME_SQL,
    }
}

/// What the latest checkpoint says, when the role may read it: (it ended
/// the crash recovery that reset the statistics, the xid is at or above
/// its next xid).
type CheckpointEvidence = Option<(bool, bool)>;

/// What the server said, as the judgement needs it.
#[derive(Clone, Copy, Debug)]
struct Evidence {
    /// `txid_status` of the write's xid.
    status: TxOutcome,
    /// The same timeline as when the write was identified (no failover).
    same_timeline: bool,
    /// A crash recovery happened since the write was identified: the
    /// statistics were reset (or their reset time is unknown).
    crashed: bool,
    /// See [`CheckpointEvidence`].
    checkpoint: CheckpointEvidence,
}

fn read_outcome(result: &QueryResult, identity: &TxIdentity, with_checkpoint: bool) -> TxOutcome {
    let Some(row) = result.rows.first() else {
        return TxOutcome::Unknown;
    };
    let stats_reset = row.get(3);
    let evidence = Evidence {
        status: status_outcome(row.get(0).as_deref()),
        same_timeline: row.get(2).as_deref() == Some(identity.timeline.as_str()),
        crashed: stats_reset.is_none() || stats_reset.as_deref() != identity.stats_reset.as_deref(),
        checkpoint: with_checkpoint.then(|| {
            (
                row.get(4).as_deref() == Some("t"),
                row.get(5).as_deref() == Some("t"),
            )
        }),
    };
    judge(evidence)
}

/// Whether `txid_status`'s answer can be trusted, and what it means.
fn judge(evidence: Evidence) -> TxOutcome {
    let Evidence {
        status,
        same_timeline,
        crashed,
        checkpoint,
    } = evidence;
    if !same_timeline {
        // Another history (a promoted standby): a "committed" may be a reused
        // xid of someone else's, but "aborted" means our write is absent either way.
        return if status == TxOutcome::Aborted {
            status
        } else {
            TxOutcome::Unknown
        };
    }
    if !crashed {
        // The same server run, or a clean restart whose shutdown checkpoint
        // recorded every xid handed out: no xid was handed out twice.
        return status;
    }
    match checkpoint {
        // At or above the next xid of a checkpoint after the crash: never
        // logged before it, so never committed.
        Some((_, true)) => TxOutcome::NeverLogged,
        // Below the next xid of the end-of-recovery checkpoint: logged
        // before the crash, so `txid_status` describes our transaction.
        Some((true, false)) => status,
        // A later checkpoint hides where the recovery ended, or the role may
        // not read the checkpoint: the database cannot tell.
        Some((false, false)) | None => TxOutcome::Unknown,
    }
}

fn status_outcome(status: Option<&str>) -> TxOutcome {
    match status {
        Some("committed") => TxOutcome::Committed,
        Some("aborted") => TxOutcome::Aborted,
        Some("in progress") => TxOutcome::InProgress,
        _ => TxOutcome::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use TxOutcome::*;

    #[test]
    fn txid_status_is_trusted_only_where_no_xid_can_have_been_reused() {
        let cases = [
            // status, same timeline, crashed, checkpoint evidence => outcome
            (Committed, true, false, None, Committed),
            (Aborted, true, false, None, Aborted),
            (InProgress, true, false, None, InProgress),
            (Committed, true, false, Some((false, false)), Committed),
            // A crash, in place or followed by a restart.
            (Committed, true, true, None, TxOutcome::Unknown),
            (Aborted, true, true, None, TxOutcome::Unknown),
            (Committed, true, true, Some((true, false)), Committed),
            (Aborted, true, true, Some((true, false)), Aborted),
            (Committed, true, true, Some((true, true)), NeverLogged),
            (InProgress, true, true, Some((true, true)), NeverLogged),
            (Committed, true, true, Some((false, true)), NeverLogged),
            (
                Committed,
                true,
                true,
                Some((false, false)),
                TxOutcome::Unknown,
            ),
            (
                Aborted,
                true,
                true,
                Some((false, false)),
                TxOutcome::Unknown,
            ),
            // A failover.
            (
                Committed,
                false,
                true,
                Some((true, false)),
                TxOutcome::Unknown,
            ),
            (Committed, false, false, None, TxOutcome::Unknown),
            (Aborted, false, true, Some((true, true)), Aborted),
            (TxOutcome::Unknown, true, false, None, TxOutcome::Unknown),
        ];
        for (status, same_timeline, crashed, checkpoint, expected) in cases {
            let evidence = Evidence {
                status,
                same_timeline,
                crashed,
                checkpoint,
            };
            assert_eq!(judge(evidence), expected, "{evidence:?}");
        }
    }
}
