//! Asking the database what became of a write whose connection broke after
//! its COMMIT was sent, and judging whether the answer can be trusted.
//!
//! The argument for when `txid_status` is authoritative is in the module doc
//! of [`super::replay`]; this module turns it into one query and one
//! decision function, [`judge`], tested as a table.

use tracing::warn;

use super::replay::TxOutcome;
use crate::backend::{BackendError, Connection, QueryResult, Statement, TxIdentity};

/// Asks `conn` (of a generation newer than the broken one) about `identity`.
pub async fn ask(conn: &mut Connection, identity: &TxIdentity) -> TxOutcome {
    let xid = vec![Some(identity.xid.to_string())];
    let probe = Statement::with_params(OUTCOME_SQL, xid.clone());
    let answer = match conn.query(&probe).await {
        Err(BackendError::Sql { error, .. }) if error.code == INSUFFICIENT_PRIVILEGE => {
            // Without pg_control_checkpoint() only an answer from the same
            // server run can be trusted.
            let fallback = Statement::with_params(SAME_RUN_SQL, xid);
            conn.query(&fallback)
                .await
                .map(|r| read_outcome(&r, identity, false))
        }
        other => other.map(|r| read_outcome(&r, identity, true)),
    };
    match answer {
        Ok(outcome) => outcome,
        // An xid in the future was never logged: not even a crash can have committed it.
        Err(BackendError::Sql { error, .. }) if error.code == XID_IN_FUTURE => {
            TxOutcome::NeverLogged
        }
        Err(error) => {
            warn!(xid = identity.xid, error = %error, "Cannot ask the outcome of a broken write.");
            TxOutcome::Unknown
        }
    }
}

/// The status of a transaction, the server's start time and timeline, and
/// whether the xid is at or above the next xid of a checkpoint taken since
/// that start (see the module doc of `replay`). `txid_status` fails with
/// 22023 for an xid in the future, which also means it was never logged.
const OUTCOME_SQL: &str = "SELECT txid_status($1::bigint), pg_postmaster_start_time()::text, \
     substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8), \
     c.checkpoint_time >= date_trunc('second', pg_postmaster_start_time()), \
     $1::bigint >= (split_part(c.next_xid, ':', 1)::bigint << 32) + split_part(c.next_xid, ':', 2)::bigint \
     FROM pg_control_checkpoint() c";

/// The fallback of [`OUTCOME_SQL`] for roles that may not read the checkpoint.
const SAME_RUN_SQL: &str = "SELECT txid_status($1::bigint), pg_postmaster_start_time()::text, \
     substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)";
/// SQLSTATE of `txid_status` for an xid that was never handed out.
const XID_IN_FUTURE: &str = "22023";
/// SQLSTATE of a missing privilege (here: EXECUTE on `pg_control_checkpoint()`).
const INSUFFICIENT_PRIVILEGE: &str = "42501";

/// What the checkpoint says, when the role may read it: (a checkpoint was
/// taken since the server started, the xid is at or above its next xid).
type CheckpointEvidence = Option<(bool, bool)>;

fn read_outcome(result: &QueryResult, identity: &TxIdentity, with_checkpoint: bool) -> TxOutcome {
    let Some(row) = result.rows.first() else {
        return TxOutcome::Unknown;
    };
    let evidence = with_checkpoint.then(|| {
        (
            row.get(3).as_deref() == Some("t"),
            row.get(4).as_deref() == Some("t"),
        )
    });
    judge(
        status_outcome(row.get(0).as_deref()),
        row.get(1).as_deref() == Some(identity.server_started.as_str()),
        row.get(2).as_deref() == Some(identity.timeline.as_str()),
        evidence,
    )
}

/// Whether `txid_status`'s answer can be trusted, and what it means.
fn judge(
    status: TxOutcome,
    same_run: bool,
    same_timeline: bool,
    checkpoint: CheckpointEvidence,
) -> TxOutcome {
    if !same_timeline {
        // Another history (a promoted standby): a "committed" may be a reused
        // xid of someone else's, but "aborted" means our write is absent either way.
        return if status == TxOutcome::Aborted {
            status
        } else {
            TxOutcome::Unknown
        };
    }
    if same_run {
        return status; // xids are never reused while the server runs
    }
    match checkpoint {
        // Crash recovery ended with a checkpoint: above its next xid, never logged.
        Some((true, true)) => TxOutcome::NeverLogged,
        // Below it, or a clean restart whose shutdown checkpoint recorded every xid.
        Some(_) => status,
        None => TxOutcome::Unknown,
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
            // status, same run, same timeline, checkpoint evidence => outcome
            (Committed, true, true, None, Committed),
            (Aborted, true, true, None, Aborted),
            (InProgress, true, true, None, InProgress),
            (Committed, false, true, None, TxOutcome::Unknown),
            (Committed, false, true, Some((false, false)), Committed),
            (Aborted, false, true, Some((true, false)), Aborted),
            (Committed, false, true, Some((true, false)), Committed),
            (Committed, false, true, Some((true, true)), NeverLogged),
            (InProgress, false, true, Some((true, true)), NeverLogged),
            (
                Committed,
                false,
                false,
                Some((true, false)),
                TxOutcome::Unknown,
            ),
            (Committed, true, false, None, TxOutcome::Unknown),
            (Aborted, false, false, Some((true, true)), Aborted),
            (TxOutcome::Unknown, true, true, None, TxOutcome::Unknown),
        ];
        for (status, same_run, same_timeline, checkpoint, expected) in cases {
            let got = judge(status, same_run, same_timeline, checkpoint);
            assert_eq!(
                got, expected,
                "{status:?} run={same_run} timeline={same_timeline} {checkpoint:?}"
            );
        }
    }
}
