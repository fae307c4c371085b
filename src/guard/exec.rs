//! Running requests through the guard: admission, stale-client refresh,
//! the replay rules of [`super::replay`], and the strict transaction timeout.
//!
//! This is the in-process API the front ends use: [`Executor::query`] for
//! one statement and [`Executor::batch`] for a transaction batch. Both return
//! results, or an [`ExecError`] whose `kind()` is the client-facing error
//! kind and the metric label.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use tracing::{Instrument, field, info, info_span, warn};

use super::admission::{Guard, Lease};
use super::error::GuardError;
use super::replay::{BreakPoint, Class, Decision, Rule, TxOutcome, decide, is_read};
use crate::backend::{
    BackendError, CancelToken, Connection, DbError, QueryResult, Scope, Statement,
    TransactionError, TransactionOptions, TransactionProgress, TxIdentity,
};
use crate::lifecycle::{BackendSource, Loss};
use crate::telemetry::Metrics;
use crate::telemetry::labels::{ClientErrorKind, ReplayResult, RequestOutcome};

/// Default strict timeout of a transaction batch once it has a connection.
pub const DEFAULT_TRANSACTION_TIMEOUT: Duration = Duration::from_millis(8000);
/// Pause between two questions about a transaction still in progress.
const ASK_AGAIN_AFTER: Duration = Duration::from_millis(50);

/// How writes are run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WriteSafety {
    /// Two round trips (statement, then COMMIT) so that every outcome can be resolved.
    #[default]
    Resolve,
    /// One round trip; a connection broken after sending answers 08007.
    Fast,
}

/// Settings of the executor.
#[derive(Clone, Copy, Debug)]
pub struct ExecSettings {
    /// How writes are run.
    pub write_safety: WriteSafety,
    /// Strict bound on a transaction batch once it has a connection.
    pub transaction_timeout: Duration,
    /// Largest result, in wire bytes of rows, a request may return.
    pub result_limit: Option<usize>,
}

impl Default for ExecSettings {
    fn default() -> Self {
        Self {
            write_safety: WriteSafety::Resolve,
            transaction_timeout: DEFAULT_TRANSACTION_TIMEOUT,
            result_limit: None,
        }
    }
}

/// Why a request could not be answered with results.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The database rejected a statement.
    #[error("{error}")]
    Sql {
        /// The server's report.
        error: Box<DbError>,
        /// Index of the failing statement within a batch.
        statement: usize,
    },
    /// No usable generation within the guard budget.
    #[error(transparent)]
    Guard(#[from] GuardError),
    /// The connection failed and the request could not be replayed in time.
    #[error("the database connection was lost: {0}")]
    ConnectionLost(String),
    /// The write may or may not have been applied (SQLSTATE 08007).
    #[error("the connection was lost while committing; the write may or may not have been applied")]
    ResolutionUnknown,
    /// A batch ran past the transaction timeout and was cancelled.
    #[error("the transaction exceeded its timeout of {0:?} and was cancelled")]
    TransactionTimeout(Duration),
    /// The result exceeded the size limit.
    #[error("the result exceeds the limit of {0} bytes")]
    TooLarge(usize),
    /// Anything else (a bug, or the server misbehaving).
    #[error("internal error: {0}")]
    Internal(String),
}

impl ExecError {
    /// The client-facing kind, also the `pgwarden_errors_total` label.
    pub fn kind(&self) -> ClientErrorKind {
        match self {
            ExecError::Sql { .. } => ClientErrorKind::Sql,
            ExecError::Guard(e) => e.kind(),
            ExecError::ConnectionLost(_) => ClientErrorKind::ConnectionLost,
            ExecError::ResolutionUnknown => ClientErrorKind::ResolutionUnknown,
            ExecError::TransactionTimeout(_) => ClientErrorKind::TransactionTimeout,
            ExecError::TooLarge(_) => ClientErrorKind::TooLarge,
            ExecError::Internal(_) => ClientErrorKind::Internal,
        }
    }

    /// The request outcome label of `pgwarden_requests_duration_seconds`.
    pub fn outcome(&self) -> RequestOutcome {
        match self.kind() {
            ClientErrorKind::Sql => RequestOutcome::SqlError,
            ClientErrorKind::GuardTimeout => RequestOutcome::GuardTimeout,
            ClientErrorKind::ConnectionLost | ClientErrorKind::Internal => {
                RequestOutcome::ConnectionLost
            }
            ClientErrorKind::ResolutionUnknown => RequestOutcome::ResolutionUnknown,
            ClientErrorKind::TransactionTimeout => RequestOutcome::TransactionTimeout,
            _ => RequestOutcome::Rejected,
        }
    }

    /// The SQLSTATE a client should see (08007 for an unresolved write).
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            ExecError::Sql { error, .. } => Some(&error.code),
            ExecError::ResolutionUnknown => Some("08007"),
            ExecError::Guard(_) => Some("57P03"),
            ExecError::ConnectionLost(_) => Some("08006"),
            ExecError::TransactionTimeout(_) => Some("57014"),
            _ => None,
        }
    }
}

/// A write's results, kept when its COMMIT was sent, with the identity
/// that lets its outcome be asked.
type Done = Option<(Vec<QueryResult>, TxIdentity)>;

/// One attempt's failure, before the replay rules are applied.
enum Broken {
    /// An SQL error: final (or a reclassification, see `run`).
    Sql(Box<DbError>, usize),
    /// The connection failed at `point`; `scope` says whether the server
    /// failed or only this session.
    Connection {
        point: BreakPoint,
        scope: Scope,
        message: String,
        done: Done,
    },
    /// A transaction ran past its timeout and was abandoned (its statement
    /// is cancelled on the server); `commit_sent` says whether it may have
    /// committed.
    TimedOut { commit_sent: bool, done: Done },
    /// Not a connection failure and not replayable.
    Final(ExecError),
    /// The request did not run (its connection's session could not be
    /// reset, and is retired): run it on another connection.
    Elsewhere,
}

/// One counter per [`Rule`].
#[derive(Debug, Default)]
struct RuleCounts([AtomicU64; 8]);

impl RuleCounts {
    fn count(&self, rule: Rule) {
        let index = Rule::ALL.iter().position(|r| *r == rule).unwrap_or(0);
        self.0[index].fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> Vec<(Rule, u64)> {
        Rule::ALL
            .iter()
            .zip(&self.0)
            .map(|(rule, n)| (*rule, n.load(Ordering::Relaxed)))
            .collect()
    }
}

/// Cancels the statement on the server if the request is abandoned while
/// it runs: a client that went away, or a transaction timeout, drops the
/// request's future, and with it this guard.
struct CancelOnDrop(Option<CancelToken>);

impl CancelOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        let Some(token) = self.0.take() else { return };
        info!(
            pid = token.process_id(),
            "Request abandoned: cancelling its statement on the server."
        );
        token.cancel_abandoned();
    }
}

/// Where and how an attempt broke.
struct Break {
    old: OldSession,
    class: Class,
    point: BreakPoint,
    message: String,
}

/// The session a request was on when it broke.
#[derive(Clone, Copy, Debug)]
pub(crate) struct OldSession {
    /// Its generation.
    generation: u64,
    /// When the server ended it ([`Scope::Server`]): the receipt of the
    /// report to the lifecycle. What follows the break waits for the
    /// lifecycle's verdict on it; a session that failed for a reason of its
    /// own leaves its siblings good, and nothing waits.
    loss: Option<Loss>,
    /// Its server process, and pgwarden's port of it (`client_port`).
    backend: Option<(i32, Option<u16>)>,
    /// When pgwarden opened it: its server process is at least this old,
    /// a later process that reused its pid is younger (see [`TERMINATE_SQL`]).
    opened: std::time::Instant,
}

impl OldSession {
    /// The session under `lease`, before it is given up.
    pub(crate) fn of(lease: &mut Lease<BackendSource>) -> Self {
        let generation = lease.generation().id();
        let conn = lease.conn();
        let backend = conn.process_id().map(|pid| (pid, conn.local_port()));
        OldSession {
            generation,
            loss: None,
            backend,
            opened: conn.created_at(),
        }
    }

    /// Marks it broken by `scope` (see [`Scope`]). A session the server
    /// ended is reported to the lifecycle, which decides at once whether
    /// the server is going away or the session ended alone.
    pub(crate) fn broken_by(self, scope: Scope, guard: &Guard<BackendSource>) -> Self {
        let loss = (scope == Scope::Server).then(|| guard.report_connection_lost(self.generation));
        OldSession { loss, ..self }
    }

    /// Admits what follows the break: after the lifecycle's verdict on a
    /// session the server ended (a newer generation, or this one found
    /// healthy), at once otherwise.
    pub(crate) async fn readmit(
        &self,
        guard: &Guard<BackendSource>,
        deadline: Instant,
    ) -> Result<Lease<BackendSource>, GuardError> {
        match self.loss {
            None => guard.admit_until(deadline).await,
            Some(loss) => guard.admit_after(loss, deadline).await,
        }
    }
}

/// Ends the old session's server process if it still runs (a network
/// break leaves it holding its transaction's row locks until the server
/// notices), so a replay or an outcome question need not wait behind it.
/// The role may end its own sessions without any special privilege.
///
/// Two checks keep a process that reused the pid from being hit. Its age:
/// the old process started before pgwarden opened the session (`$2`, its
/// age in milliseconds less [`AGE_SLACK`]), a reuser only after the old one
/// ended, so it is younger. Its port (`$3`, pgwarden's port of the old
/// session), only where the server sees pgwarden's own ports, which it
/// tells by this session's (`$4`): behind a proxy or a NAT `client_port`
/// is someone else's.
const TERMINATE_SQL: &str = "SELECT pg_catalog.pg_terminate_backend(pid) \
     FROM pg_catalog.pg_stat_activity \
     WHERE pid = $1::int \
     AND backend_start <= statement_timestamp() - $2::bigint * interval '1 millisecond' \
     AND ($3::int IS NULL OR client_port = $3::int \
          OR pg_catalog.inet_client_port() IS DISTINCT FROM $4::int)";

/// Allowance in the age check of [`TERMINATE_SQL`]: without TLS the server
/// may start the process a little after pgwarden's socket connected. A pid
/// reused within this much of the old session's start gets through, which
/// would take the old process to end and its pid to come round again
/// within it.
const AGE_SLACK: Duration = Duration::from_secs(1);

/// How to rerun a request Postgres refused as run: a hidden write in a
/// read (25006) runs as a write, unless the client asked for a read-only
/// transaction itself; a statement that cannot run in a transaction block
/// (25001) runs bare. A write refused at its first statement as read-only
/// (25006) may have been refused for the identify step, which a server in
/// recovery does not run (`txid_current()`): such a server cannot commit a
/// write, so there is no outcome to resolve, and the request runs again
/// without the step, to get its own statements' answer or error.
fn rerun_as(
    class: Class,
    options: &TransactionOptions,
    error: &DbError,
    statement: usize,
    statements: usize,
) -> Option<(Class, TransactionOptions)> {
    match (class, error.code.as_str()) {
        (Class::Read, "25006") if !options.read_only => Some((Class::Write, *options)),
        (Class::Write, "25001") if statements == 1 => Some((Class::Bare, *options)),
        (Class::Write, "25006") if options.identify && statement == 0 => {
            let unidentified = TransactionOptions {
                identify: false,
                ..*options
            };
            Some((Class::Write, unidentified))
        }
        _ => None,
    }
}

/// Runs requests through a guard over pgwarden's backend pool.
#[derive(Clone, Debug)]
pub struct Executor {
    guard: Guard<BackendSource>,
    settings: ExecSettings,
    metrics: Metrics,
    rules: Arc<RuleCounts>,
}

impl Executor {
    /// An executor in front of `guard`.
    pub fn new(guard: Guard<BackendSource>, settings: ExecSettings, metrics: Metrics) -> Self {
        Self {
            guard,
            settings,
            metrics,
            rules: Arc::default(),
        }
    }

    /// How often each replay rule fired since start.
    pub fn rule_counts(&self) -> Vec<(Rule, u64)> {
        self.rules.snapshot()
    }

    /// Counts a replay rule that fired for a request of another front end
    /// (the wire's), so `/status` shows every decision.
    pub(crate) fn count_rule(&self, rule: Rule) {
        self.rules.count(rule);
    }

    /// How writes are run.
    pub fn write_safety(&self) -> WriteSafety {
        self.settings.write_safety
    }

    /// What became of a client's transaction whose session broke after
    /// its COMMIT was sent (the wire front end's explicit transactions):
    /// asked of the server as for a broken write (see [`super::replay`]),
    /// within the guard budget. [`Decision::Answer`]: it committed;
    /// [`Decision::Replay`]: it provably did not; otherwise the database
    /// cannot tell.
    pub(crate) async fn resolve_commit(&self, identity: &TxIdentity, old: &OldSession) -> Decision {
        let deadline = Instant::now() + self.guard.budget();
        let (class, point) = (Class::Write, BreakPoint::AfterCommit);
        let (decision, outcome) = self
            .resolve(class, point, Some(identity), old, deadline)
            .await;
        self.rules.count(Rule::of(class, point, outcome));
        decision
    }

    /// Runs one statement, replaying it across reconnects when that is safe.
    pub async fn query(&self, statement: &Statement) -> Result<QueryResult, ExecError> {
        let lease = self.guard.admit().await?;
        self.query_with(lease, statement).await
    }

    /// Runs one statement on a connection the caller already holds (it may
    /// have gone stale meanwhile: it is then refreshed first).
    pub async fn query_with(
        &self,
        lease: Lease<BackendSource>,
        statement: &Statement,
    ) -> Result<QueryResult, ExecError> {
        let class = if is_read(&statement.sql) {
            Class::Read
        } else if self.settings.write_safety == WriteSafety::Fast {
            Class::Bare
        } else {
            Class::Write
        };
        let statements = std::slice::from_ref(statement);
        let options = TransactionOptions::default();
        let mut results = self.run(lease, class, &options, statements, None).await?;
        results
            .pop()
            .ok_or_else(|| ExecError::Internal("no result for the statement".into()))
    }

    /// Runs a transaction batch under the strict transaction timeout. A
    /// read-only batch is replayed like a read; a write batch like a write.
    pub async fn batch(
        &self,
        options: &TransactionOptions,
        statements: &[Statement],
    ) -> Result<Vec<QueryResult>, ExecError> {
        let lease = self.guard.admit().await?;
        let limit = Instant::now() + self.settings.transaction_timeout;
        let class = if options.read_only {
            Class::Read
        } else {
            Class::Write
        };
        self.run(lease, class, options, statements, Some(limit))
            .await
    }

    /// The replay loop: one attempt per generation until an answer, an
    /// unresolvable break, or the end of the budget. A batch's attempts end
    /// at `transaction_deadline`.
    async fn run(
        &self,
        lease: Lease<BackendSource>,
        mut class: Class,
        options: &TransactionOptions,
        statements: &[Statement],
        transaction_deadline: Option<Instant>,
    ) -> Result<Vec<QueryResult>, ExecError> {
        let deadline = lease.deadline();
        let mut lease = self.guard.refresh(lease).await?;
        let mut replays = 0u32;
        // Writes identify their transaction, so that every outcome can be
        // resolved; `rerun_as` may drop the step.
        let mut options = TransactionOptions {
            identify: self.settings.write_safety == WriteSafety::Resolve,
            ..*options
        };
        loop {
            let abandon = CancelOnDrop(lease.conn().cancel_token());
            let attempt = self
                .attempt(
                    &mut lease,
                    class,
                    &options,
                    statements,
                    transaction_deadline,
                )
                .await;
            match &attempt {
                // Cancelled now, before its outcome is asked: a COMMIT held
                // by a synchronous standby is committed here but stays
                // invisible to others until its backend leaves the wait.
                Err(Broken::TimedOut { .. }) => drop(abandon),
                _ => abandon.disarm(),
            }
            let broken = match attempt {
                Ok(results) => return self.replayed(replays, Ok(results)),
                Err(broken) => broken,
            };
            // Read off the session only now: the success path pays nothing.
            let mut old = OldSession::of(&mut lease);
            match broken {
                Broken::Sql(error, statement) => {
                    match rerun_as(class, &options, &error, statement, statements.len()) {
                        Some(next) => (class, options) = next,
                        None => {
                            return self
                                .replayed(replays, Err(ExecError::Sql { error, statement }));
                        }
                    }
                }
                Broken::Final(error) => return self.replayed(replays, Err(error)),
                Broken::TimedOut { commit_sent, done } => {
                    drop(lease);
                    let answer = self.after_timeout(commit_sent, done, old).await;
                    return self.replayed(replays, answer);
                }
                Broken::Elsewhere => {
                    drop(lease);
                    lease = match self.guard.admit_until(deadline).await {
                        Ok(lease) => lease,
                        Err(e) => return self.replayed(replays, Err(e.into())),
                    };
                }
                Broken::Connection {
                    point,
                    scope,
                    message,
                    done,
                } => {
                    drop(lease);
                    old = old.broken_by(scope, &self.guard);
                    let broke = Break {
                        old,
                        class,
                        point,
                        message,
                    };
                    match self.after_break(broke, done, deadline).await {
                        Ok(Some(results)) => return self.replayed(replays, Ok(results)),
                        Ok(None) => replays += 1,
                        Err(error) => return self.replayed(replays, Err(error)),
                    }
                    lease = match self.readmit(&old, deadline).await {
                        Ok(lease) => lease,
                        Err(e) => return self.replayed(replays, Err(e.into())),
                    };
                    if class == Class::Write {
                        end_old_backend(lease.conn(), &old, deadline).await;
                    }
                }
            }
        }
    }

    /// A connection for what follows a break: once the lifecycle judged
    /// the loss when the server ended the session, else any current one.
    async fn readmit(
        &self,
        old: &OldSession,
        deadline: Instant,
    ) -> Result<Lease<BackendSource>, GuardError> {
        old.readmit(&self.guard, deadline).await
    }

    /// A transaction ran past its timeout. Before its COMMIT was sent it
    /// cannot have committed: 57014. After, it may have (a COMMIT waiting
    /// for a synchronous standby is already durable here), so it is
    /// resolved like a write whose connection broke after COMMIT, within a
    /// fresh guard budget: the result in hand if it committed, 57014 if it
    /// provably did not, 08007 if the database cannot tell.
    async fn after_timeout(
        &self,
        commit_sent: bool,
        done: Done,
        old: OldSession,
    ) -> Result<Vec<QueryResult>, ExecError> {
        let limit = self.settings.transaction_timeout;
        let timed_out = ExecError::TransactionTimeout(limit);
        warn!(
            timeout_ms = limit.as_millis() as u64,
            commit_sent, "Transaction timeout: the batch was cancelled."
        );
        if !commit_sent {
            return Err(timed_out);
        }
        let deadline = Instant::now() + self.guard.budget();
        let identity = done.as_ref().map(|(_, id)| id);
        let (decision, outcome) = self
            .resolve(
                Class::Write,
                BreakPoint::AfterCommit,
                identity,
                &old,
                deadline,
            )
            .await;
        self.rules
            .count(Rule::of(Class::Write, BreakPoint::AfterCommit, outcome));
        match decision {
            Decision::Answer => Ok(done.map(|(results, _)| results).unwrap_or_default()),
            Decision::Replay => Err(timed_out),
            Decision::AskAgain | Decision::Unknown => Err(ExecError::ResolutionUnknown),
        }
    }

    /// Applies the replay rules to a broken attempt: `Some(results)` to
    /// answer, `None` to replay, or the error to answer with.
    async fn after_break(
        &self,
        broke: Break,
        done: Done,
        deadline: Instant,
    ) -> Result<Option<Vec<QueryResult>>, ExecError> {
        let Break {
            old,
            class,
            point,
            message,
        } = broke;
        let generation = old.generation;
        if old.loss.is_some() {
            warn!(generation, error = %message, "Connection lost under a request.");
        } else {
            info!(generation, error = %message, "A session failed under a request; the server is fine.");
        }
        let identity = done.as_ref().map(|(_, id)| id);
        let (decision, outcome) = self.resolve(class, point, identity, &old, deadline).await;
        self.rules.count(Rule::of(class, point, outcome));
        match decision {
            Decision::Answer => Ok(Some(done.map(|(results, _)| results).unwrap_or_default())),
            Decision::Replay => {
                info!(generation, class = ?class, "Replaying the request on a fresh connection.");
                Ok(None)
            }
            Decision::AskAgain | Decision::Unknown => Err(ExecError::ResolutionUnknown),
        }
    }

    fn replayed<T>(&self, replays: u32, result: Result<T, ExecError>) -> Result<T, ExecError> {
        if replays > 0 {
            let label = if result.is_ok() {
                ReplayResult::Ok
            } else {
                ReplayResult::Failed
            };
            self.metrics.replay(label);
        }
        result
    }

    /// One attempt of `statements` as `class` on the lease's connection.
    async fn attempt(
        &self,
        lease: &mut Lease<BackendSource>,
        class: Class,
        options: &TransactionOptions,
        statements: &[Statement],
        transaction_deadline: Option<Instant>,
    ) -> Result<Vec<QueryResult>, Broken> {
        let operation = statements.first().map_or("", |s| operation(&s.sql));
        let span = info_span!(
            "db_query",
            "db.system" = "postgresql",
            "db.operation" = operation,
            "pool.generation" = lease.generation().id(),
            "db.response.rows" = field::Empty,
        );
        let result = self
            .attempt_inner(lease, class, options, statements, transaction_deadline)
            .instrument(span.clone())
            .await;
        if let Ok(results) = &result {
            let rows: usize = results.iter().map(|r| r.rows.len()).sum();
            span.record("db.response.rows", rows as u64);
        }
        result
    }

    async fn attempt_inner(
        &self,
        lease: &mut Lease<BackendSource>,
        class: Class,
        options: &TransactionOptions,
        statements: &[Statement],
        transaction_deadline: Option<Instant>,
    ) -> Result<Vec<QueryResult>, Broken> {
        let conn = lease.conn();
        conn.set_result_limit(self.settings.result_limit);
        match (class, statements) {
            (Class::Read, [statement]) if !options.read_only => {
                match conn.read_only(statement).await {
                    Ok(result) => Ok(vec![result]),
                    Err(error) => Err(classify(error, 0, BreakPoint::BeforeCommit)),
                }
            }
            (Class::Bare, [statement]) => match conn.query(statement).await {
                Ok(result) => Ok(vec![result]),
                Err(error) => Err(classify(error, 0, BreakPoint::AfterCommit)),
            },
            (Class::Bare, _) => Err(Broken::Final(ExecError::Internal(
                "only single statements run bare".into(),
            ))),
            (Class::Read | Class::Write, _) => {
                // Only a write's outcome may need resolving: a read-only
                // transaction changed nothing, whatever became of it.
                let identified = TransactionOptions {
                    identify: class == Class::Write && options.identify,
                    ..*options
                };
                transaction(conn, &identified, statements, transaction_deadline).await
            }
        }
    }

    /// Decides what a broken request gets; for a write broken after its
    /// COMMIT was sent, asks the server what became of it, on one session,
    /// every question within `deadline`. A transaction still in progress
    /// means the old session's process still runs: it is ended, so the
    /// answer settles instead of waiting for the server to notice.
    async fn resolve(
        &self,
        class: Class,
        point: BreakPoint,
        identity: Option<&TxIdentity>,
        old: &OldSession,
        deadline: Instant,
    ) -> (Decision, Option<TxOutcome>) {
        if (class, point) != (Class::Write, BreakPoint::AfterCommit) {
            return (decide(class, point, None), None);
        }
        let Some(identity) = identity else {
            return (Decision::Unknown, None);
        };
        let Ok(mut lease) = self.readmit(old, deadline).await else {
            return (Decision::Unknown, Some(TxOutcome::Unknown));
        };
        let mut ended = false;
        loop {
            let asked =
                tokio::time::timeout_at(deadline, super::outcome::ask(lease.conn(), identity));
            let outcome = match asked.await {
                Ok(Ok(outcome)) => outcome,
                // The asking session broke (the server failed again): the
                // database has not said it cannot tell; ask a new session.
                Ok(Err(error)) => {
                    let asker = OldSession {
                        generation: lease.generation().id(),
                        loss: None,
                        backend: None,
                        opened: std::time::Instant::now(),
                    }
                    .broken_by(error.scope(), &self.guard);
                    drop(lease);
                    match self.readmit(&asker, deadline).await {
                        Ok(next) => lease = next,
                        Err(_) => return (Decision::Unknown, Some(TxOutcome::Unknown)),
                    }
                    continue;
                }
                Err(_) => TxOutcome::Unknown,
            };
            let decision = decide(class, point, Some(outcome));
            info!(xid = identity.xid, outcome = ?outcome, decision = ?decision, "Resolved a write broken after COMMIT was sent.");
            if decision != Decision::AskAgain || Instant::now() + ASK_AGAIN_AFTER >= deadline {
                return (decision, Some(outcome));
            }
            if !std::mem::replace(&mut ended, true) {
                end_old_backend(lease.conn(), old, deadline).await;
            }
            tokio::time::sleep(ASK_AGAIN_AFTER).await;
        }
    }
}

/// Runs a transaction, abandoning it at `deadline`: then it tells whether
/// its COMMIT had been sent, and what is needed to resolve it.
async fn transaction(
    conn: &mut Connection,
    options: &TransactionOptions,
    statements: &[Statement],
    deadline: Option<Instant>,
) -> Result<Vec<QueryResult>, Broken> {
    let mut progress = TransactionProgress::default();
    let run = conn.transaction_tracked(options, statements, &mut progress);
    let result = match deadline {
        None => run.await,
        Some(deadline) => match tokio::time::timeout_at(deadline, run).await {
            Ok(result) => result,
            Err(_) => {
                let done = progress.identity.take().map(|id| (progress.results, id));
                let commit_sent = progress.commit_sent;
                return Err(Broken::TimedOut { commit_sent, done });
            }
        },
    };
    result.map_err(from_transaction)
}

/// Ends the old session's server process if it still runs; see
/// [`TERMINATE_SQL`]. Best effort within `deadline`: a failure only means
/// the caller may wait for the server to notice by itself.
async fn end_old_backend(conn: &mut Connection, old: &OldSession, deadline: Instant) {
    let Some((pid, port)) = old.backend else {
        return;
    };
    let age = old.opened.elapsed().saturating_sub(AGE_SLACK);
    let params = vec![
        Some(pid.to_string()),
        Some(age.as_millis().to_string()),
        port.map(|p| p.to_string()),
        conn.local_port().map(|p| p.to_string()),
    ];
    let statement = Statement::with_params(TERMINATE_SQL, params);
    match tokio::time::timeout_at(deadline, conn.query(&statement)).await {
        Ok(Ok(result)) if result.rows.first().and_then(|r| r.get(0)).as_deref() == Some("t") => {
            info!(
                pid,
                "Ended the broken session's server process, which still ran."
            );
        }
        Ok(Ok(_)) => {}
        Ok(Err(error)) => {
            warn!(pid, error = %error, "Could not end the broken session's server process.")
        }
        Err(_) => warn!(
            pid,
            "Ending the broken session's server process took the whole budget."
        ),
    }
}

/// The statement's leading keyword, upper-cased, for the `db.operation`
/// span field (never the statement itself, which may hold values).
fn operation(sql: &str) -> &'static str {
    let word = sql
        .trim_start()
        .split(|c: char| !c.is_ascii_alphabetic())
        .next()
        .unwrap_or("");
    const KNOWN: [&str; 14] = [
        "SELECT", "INSERT", "UPDATE", "DELETE", "WITH", "VALUES", "SHOW", "TABLE", "MERGE",
        "CREATE", "ALTER", "DROP", "VACUUM", "CALL",
    ];
    KNOWN
        .iter()
        .find(|k| k.eq_ignore_ascii_case(word))
        .copied()
        .unwrap_or("OTHER")
}

/// Turns a statement failure into a [`Broken`]. `prelude` is how many
/// statements the executor added in front of the caller's; `sent` is the
/// break point when the request was (possibly) received.
fn classify(error: BackendError, prelude: usize, sent: BreakPoint) -> Broken {
    match error {
        BackendError::Sql { error, statement } => {
            Broken::Sql(error, statement.saturating_sub(prelude))
        }
        BackendError::ResultTooLarge { limit } => Broken::Final(ExecError::TooLarge(limit)),
        BackendError::ResetRefused(_) => Broken::Elsewhere,
        BackendError::Broken => connection(
            BreakPoint::BeforeSend,
            Scope::Session,
            "connection unusable",
            None,
        ),
        error if error.is_connection_level() => {
            connection(sent, error.scope(), &error.to_string(), None)
        }
        error => Broken::Final(ExecError::Internal(error.to_string())),
    }
}

fn from_transaction(failure: TransactionError) -> Broken {
    let TransactionError {
        error,
        commit_sent,
        identity,
        results,
    } = failure;
    if !commit_sent || !error.is_connection_level() {
        return classify(error, 0, BreakPoint::BeforeCommit);
    }
    let done = identity.map(|id| (results, id));
    connection(
        BreakPoint::AfterCommit,
        error.scope(),
        &error.to_string(),
        done,
    )
}

fn connection(point: BreakPoint, scope: Scope, message: &str, done: Done) -> Broken {
    Broken::Connection {
        point,
        scope,
        message: message.to_owned(),
        done,
    }
}
