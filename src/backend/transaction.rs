//! Transaction choreography: a batch of statements as one transaction.
//!
//! `START TRANSACTION` (and, when asked, the transaction's identity) goes
//! out pipelined with the statements in one round trip, `COMMIT` in a
//! second. The split is what lets a caller tell, after a broken
//! connection, a batch that certainly did not commit (COMMIT not sent)
//! from one whose fate must be asked of the server, by the identity taken
//! inside it ([`TxIdentity`]). [`TransactionProgress`] records how far a
//! batch got as it goes, so even a caller that abandons it knows.

use super::connection::{Connection, Part, TransactionStatus};
use super::error::BackendError;
use super::result::QueryResult;
use super::statement::{Statement, TransactionOptions};

/// A transaction batch that failed, with whether its COMMIT had been sent.
///
/// `commit_sent` is what decides, after a connection-level failure, whether
/// the batch certainly did not commit (false) or its outcome must be asked of
/// the server (true).
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct TransactionError {
    /// What went wrong.
    pub error: BackendError,
    /// True once the COMMIT started to be written.
    pub commit_sent: bool,
    /// The transaction's identity, when it was asked for and received.
    pub identity: Option<TxIdentity>,
    /// The statements' results, received before COMMIT was sent (empty
    /// when it was not): the answer if the transaction turns out committed.
    pub results: Vec<QueryResult>,
}

/// Who a transaction was, so its fate can be asked after a broken connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxIdentity {
    /// `txid_current()`: the 64-bit, epoch-extended transaction id.
    pub xid: u64,
    /// `pg_postmaster_start_time()` as text: changes when the server restarts.
    pub server_started: String,
    /// The server's current timeline (from its WAL file name): changes when
    /// a standby is promoted, so a failover is never mistaken for a restart.
    pub timeline: String,
    /// When the server's shared statistics were last reset
    /// (`pg_stat_get_bgwriter_stat_reset_time()`). Crash recovery discards
    /// them, also when the postmaster recovers in place after one backend
    /// was killed and its start time does not change; a clean restart
    /// keeps them. `None` when the server reports none.
    pub stats_reset: Option<String>,
}

/// How far a transaction batch got (see [`Connection::transaction_tracked`]).
#[derive(Debug, Default)]
pub struct TransactionProgress {
    /// True once the COMMIT started to be written.
    pub commit_sent: bool,
    /// The transaction's identity, once asked for and received.
    pub identity: Option<TxIdentity>,
    /// The statements' results, once COMMIT was sent.
    pub results: Vec<QueryResult>,
}

/// The statement that identifies a transaction (see [`TxIdentity`]).
const IDENTIFY_SQL: &str = "SELECT txid_current(), pg_postmaster_start_time()::text, \
     substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8), \
     pg_stat_get_bgwriter_stat_reset_time()::text";

impl Connection {
    /// Runs statements as one transaction: `START TRANSACTION` with the
    /// options and the statements in one round trip, then `COMMIT` in a
    /// second. On an SQL error the transaction is rolled back.
    pub async fn transaction(
        &mut self,
        options: &TransactionOptions,
        statements: &[Statement],
    ) -> Result<Vec<QueryResult>, TransactionError> {
        let mut progress = TransactionProgress::default();
        self.transaction_tracked(options, statements, &mut progress)
            .await
    }

    /// [`Connection::transaction`], recording how far it got in `progress`
    /// as it goes, so a caller that gives up on it (a transaction timeout)
    /// still knows whether COMMIT was sent and who the transaction was.
    pub async fn transaction_tracked(
        &mut self,
        options: &TransactionOptions,
        statements: &[Statement],
        progress: &mut TransactionProgress,
    ) -> Result<Vec<QueryResult>, TransactionError> {
        let not_started = |error| TransactionError {
            error,
            commit_sent: false,
            identity: None,
            results: Vec::new(),
        };
        self.begin_caller_request().map_err(not_started)?;
        let result = self.transaction_inner(options, statements, progress).await;
        self.end_request(result).map_err(|error| TransactionError {
            error,
            commit_sent: progress.commit_sent,
            identity: progress.identity.take(),
            results: std::mem::take(&mut progress.results),
        })
    }

    async fn transaction_inner(
        &mut self,
        options: &TransactionOptions,
        statements: &[Statement],
        progress: &mut TransactionProgress,
    ) -> Result<Vec<QueryResult>, BackendError> {
        let start = options.start_sql();
        let identify = options.identify.then_some(Part::Sql(IDENTIFY_SQL));
        let prelude = 1 + usize::from(options.identify);
        let parts = std::iter::once(Part::Sql(&start))
            .chain(identify)
            .chain(statements.iter().map(Part::Statement));
        let mut results = match self.pipeline_inner(parts).await {
            Ok(results) => results,
            Err(error) => return Err(self.roll_back_after(error, prelude).await),
        };
        let mut prelude_results: Vec<QueryResult> = results.drain(..prelude).collect();
        if options.identify {
            progress.identity = Some(parse_identity(&prelude_results.pop())?);
        }
        progress.commit_sent = true;
        progress.results = results;
        let commit = self.simple_query_inner("COMMIT").await;
        match commit {
            Ok(tags) if tags.first().is_some_and(|r| r.command_tag == "COMMIT") => {
                Ok(std::mem::take(&mut progress.results))
            }
            Ok(_) => Err(BackendError::Protocol("COMMIT did not commit".into())),
            Err(BackendError::Sql { error, .. }) => Err(BackendError::Sql {
                error,
                statement: statements.len(),
            }),
            Err(error) => Err(error),
        }
    }

    /// After a failed batch statement: roll back, and report the statement's
    /// index among the caller's statements (the START is not one of them).
    pub(super) async fn roll_back_after(
        &mut self,
        error: BackendError,
        prelude: usize,
    ) -> BackendError {
        // Both leave the session in step, inside the failed transaction.
        let in_step = matches!(
            error,
            BackendError::Sql { .. } | BackendError::ResultTooLarge { .. }
        );
        if in_step
            && self.transaction_status() != TransactionStatus::Idle
            && let Err(rollback) = self.simple_query_inner("ROLLBACK").await
        {
            return rollback;
        }
        match error {
            BackendError::Sql { error, statement } => BackendError::Sql {
                error,
                statement: statement.saturating_sub(prelude),
            },
            other => other,
        }
    }
}

/// The identity in the answer to [`IDENTIFY_SQL`].
fn parse_identity(result: &Option<QueryResult>) -> Result<TxIdentity, BackendError> {
    let row = result.as_ref().and_then(|r| r.rows.first());
    let xid = row.and_then(|r| r.get(0)).and_then(|v| v.parse().ok());
    let text = |i: usize| row.and_then(|r| r.get(i)).map(|v| v.into_owned());
    match (xid, text(1), text(2)) {
        (Some(xid), Some(server_started), Some(timeline)) => Ok(TxIdentity {
            xid,
            server_started,
            timeline,
            stats_reset: text(3),
        }),
        _ => Err(BackendError::Protocol(
            "unexpected answer to the transaction identity query".into(),
        )),
    }
}
