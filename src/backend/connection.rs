//! One session with the server and its requests: simple query, pipelined
//! extended query, read-only statement, reset and idle check.
//!
//! A [`Connection`] sits on a `Framer`, which does the message I/O; what
//! it adds is the session's state (transaction status, an owed reset,
//! whether it is broken, retired or dirty) and the requests, encoded here
//! and read back by `collect`. Transaction batches are in
//! [`transaction`](super::transaction).
//!
//! Requests follow one discipline: `begin_request` marks the connection busy,
//! `end_request` clears the mark and records connection-level failures. If a
//! request's future is dropped halfway (a timeout, a client that went away),
//! the mark stays, the protocol state is unknown, and the connection refuses
//! further use with [`BackendError::Broken`]; the pool then discards it.

use std::fmt;
use std::time::{Duration, Instant};

use postgres_protocol::IsNull;
use postgres_protocol::message::frontend;

use super::cancel::CancelToken;
use super::collect::{self, Protocol, copy_in_refused, may_copy_in};
use super::connect::Connector;
use super::error::{BackendError, Stage};
use super::framing::{Duplex, Framer};
use super::result::QueryResult;
use super::statement::Statement;
use super::statements::PreparedSet;
use super::stream::Socket;

/// How recently the server must have answered for the idle check to trust
/// that answer instead of asking the kernel. A session that answered this
/// short a time ago is as alive as one probed a moment before use (the
/// server may fail right after either); busy pools lend such sessions all
/// the time, and the probe is a system call per request.
const RECENT_ANSWER: Duration = Duration::from_millis(1);

/// The server probe of [`Connection::probe_server`]. The start time and
/// the reset time of the shared statistics, in microseconds since the
/// epoch (free of the session's date and float settings), together tell
/// one run of the server from the next: a restart moves the first, a crash
/// recovery in place (one backend killed) the second.
const PROBE_SQL: &str = "SELECT pg_catalog.pg_is_in_recovery(), \
     (extract(epoch FROM pg_catalog.pg_postmaster_start_time()) * 1000000)::bigint, \
     coalesce((extract(epoch FROM pg_catalog.pg_stat_get_bgwriter_stat_reset_time()) * 1000000)::bigint, 0)";

/// What [`Connection::probe_server`] learned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerProbe {
    /// `pg_is_in_recovery()`: the server is a standby.
    pub in_recovery: bool,
    /// Which run of the server answered: it changes when the server
    /// restarts or recovers from a crash, in place or not. (An operator's
    /// reset of the shared statistics changes it too.)
    pub run: String,
}

/// Transaction status reported by the last ReadyForQuery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransactionStatus {
    /// Not in a transaction block (`I`).
    Idle,
    /// In a transaction block (`T`).
    InTransaction,
    /// In a failed transaction block, only ROLLBACK will be accepted (`E`).
    Failed,
}

/// An authenticated session with a PostgreSQL server.
pub struct Connection {
    /// Message I/O with the server.
    pub(super) framer: Framer,
    /// How this connection was opened; cancel requests reuse it.
    connector: Connector,
    /// BackendKeyData: the process id and secret that cancel requests need.
    backend_key: Option<(i32, i32)>,
    /// From the last ReadyForQuery.
    transaction_status: TransactionStatus,
    /// A request started and has not finished (see the module doc).
    in_flight: bool,
    /// A connection-level failure was seen; the session is over.
    closed: bool,
    /// Caller statements ran since the last reset, so session state may linger.
    dirty: bool,
    /// A `DISCARD ALL` is owed: it goes out in front of the next request.
    reset_owed: bool,
    /// Session settings a wire client's startup asked for, as set on this
    /// session (see [`Connection::client_settings`]); a reset clears them.
    client_settings: Vec<(String, String)>,
    /// Named statements wire clients prepared on this session; a reset
    /// empties it.
    prepared: PreparedSet,
    /// The session is alive but must not be lent again (its reset was refused).
    retired: bool,
    /// Largest result, in wire bytes of rows, a request may return.
    result_limit: Option<usize>,
    /// When the session was established.
    created_at: Instant,
    /// When the last ReadyForQuery arrived.
    answered_at: Instant,
}

impl Connection {
    pub(crate) fn new(socket: Socket, connector: Connector) -> Self {
        Self {
            framer: Framer::new(socket),
            connector,
            backend_key: None,
            transaction_status: TransactionStatus::Idle,
            // Until the startup exchange completes (see `connect`).
            in_flight: true,
            closed: false,
            dirty: false,
            reset_owed: false,
            client_settings: Vec::new(),
            prepared: PreparedSet::default(),
            retired: false,
            result_limit: None,
            created_at: Instant::now(),
            answered_at: Instant::now(),
        }
    }

    /// A ParameterStatus value the server reported, e.g. `server_version`.
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.framer.parameter(name)
    }

    /// The server process serving this session.
    pub fn process_id(&self) -> Option<i32> {
        self.backend_key.map(|(pid, _)| pid)
    }

    /// The session's port on pgwarden's side (`client_port` on the server's);
    /// `None` over a Unix socket.
    pub fn local_port(&self) -> Option<u16> {
        self.framer.local_port()
    }

    /// Transaction status from the last ReadyForQuery.
    pub fn transaction_status(&self) -> TransactionStatus {
        self.transaction_status
    }

    /// True when the session must not be used again: a connection-level
    /// failure happened, or a request was abandoned halfway.
    pub fn is_broken(&self) -> bool {
        self.closed || self.in_flight
    }

    /// True when the session is alive but must not be lent again: the
    /// server refused to reset it, so it may hold a previous user's state.
    pub fn is_retired(&self) -> bool {
        self.retired
    }

    /// True when caller statements ran since the last reset (done with
    /// [`Connection::reset`] or scheduled with [`Connection::reset_before_next_use`]).
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// Schedules a reset of a dirty session: `DISCARD ALL` goes out in front
    /// of the next request, in the same write, and the server runs it before
    /// anything the next user sent. Reusing a connection thus costs no round
    /// trip of its own. Only for a session outside any transaction block.
    pub fn reset_before_next_use(&mut self) {
        if self.dirty {
            self.reset_owed = true;
            self.dirty = false;
        }
    }

    /// When the session was established.
    pub fn created_at(&self) -> Instant {
        self.created_at
    }

    /// Limits the bytes of rows one request may return; beyond it the request
    /// fails with [`BackendError::ResultTooLarge`] and the connection stays usable.
    pub fn set_result_limit(&mut self, limit: Option<usize>) {
        self.result_limit = limit;
    }

    /// A token that can cancel the statement running on this session.
    pub fn cancel_token(&self) -> Option<CancelToken> {
        let (process_id, secret_key) = self.backend_key?;
        Some(CancelToken::new(
            self.connector.clone(),
            process_id,
            secret_key,
        ))
    }

    /// Runs one or more `;`-separated statements with the simple query
    /// protocol (results in text). Meant for health checks and warm-up.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<QueryResult>, BackendError> {
        self.begin_caller_request()?;
        let result = self.simple_query_inner(sql).await;
        self.end_request(result)
    }

    /// A liveness probe in one round trip, which also tells a primary from
    /// a standby and which run of the server answers (see [`ServerProbe`]).
    /// It leaves no session state behind and does not pay an owed reset
    /// (which stays owed to the next user), so a slow or refused reset
    /// never fails a health check; the functions are schema-qualified, so a
    /// leftover `search_path` cannot stand in for them.
    pub async fn probe_server(&mut self) -> Result<ServerProbe, BackendError> {
        self.begin_request()?;
        let result = self.send_simple(PROBE_SQL).await;
        let answer = result.and_then(|mut results| {
            let row = results.pop().and_then(|r| r.rows.into_iter().next());
            let value = |i: usize| row.as_ref().and_then(|r| r.get(i).map(|v| v.into_owned()));
            match (value(0).as_deref(), value(1), value(2)) {
                (Some(recovery @ ("t" | "f")), Some(started), Some(reset)) => Ok(ServerProbe {
                    in_recovery: recovery == "t",
                    run: format!("{started}/{reset}"),
                }),
                other => Err(BackendError::Protocol(format!(
                    "unexpected answer to the server probe: {other:?}"
                ))),
            }
        });
        self.end_request(answer)
    }

    /// Runs one statement with text parameters through the extended protocol,
    /// in one round trip. Results are in text format.
    pub async fn query(&mut self, statement: &Statement) -> Result<QueryResult, BackendError> {
        let mut results = self.pipeline(std::slice::from_ref(statement)).await?;
        results
            .pop()
            .ok_or_else(|| BackendError::Protocol("no result for the statement".into()))
    }

    /// Runs statements back to back in one round trip: Parse, Bind, Describe
    /// and Execute for each, then one Sync.
    ///
    /// Outside an explicit transaction the statements share one implicit
    /// transaction, so a failure rolls all of them back. The first failing
    /// statement's error is returned with its index; later ones are skipped.
    pub async fn pipeline(
        &mut self,
        statements: &[Statement],
    ) -> Result<Vec<QueryResult>, BackendError> {
        self.begin_caller_request()?;
        let result = self
            .pipeline_inner(statements.iter().map(Part::Statement))
            .await;
        self.end_request(result)
    }

    /// Runs one statement inside `BEGIN READ ONLY` … `COMMIT`, pipelined in
    /// one round trip, and returns its result. Postgres guarantees such a
    /// transaction changed nothing; a statement that writes fails with 25006.
    /// On an SQL error the transaction is rolled back.
    pub async fn read_only(&mut self, statement: &Statement) -> Result<QueryResult, BackendError> {
        self.begin_caller_request()?;
        let parts = [
            Part::Sql("BEGIN READ ONLY"),
            Part::Statement(statement),
            Part::Sql("COMMIT"),
        ];
        let result = match self.pipeline_inner(parts).await {
            Ok(mut results) if results.len() == 3 => Ok(results.swap_remove(1)),
            Ok(_) => Err(BackendError::Protocol(
                "missing result in a read-only pipeline".into(),
            )),
            Err(error) => Err(self.roll_back_after(error, 1).await),
        };
        self.end_request(result)
    }

    /// Makes the session as good as new for the next user: rolls back an
    /// open transaction and runs `DISCARD ALL`.
    pub async fn reset(&mut self) -> Result<(), BackendError> {
        self.begin_request()?;
        let result = self.reset_inner().await;
        self.end_request(result)?;
        self.dirty = false;
        self.reset_owed = false;
        self.forget_client_state();
        Ok(())
    }

    async fn reset_inner(&mut self) -> Result<(), BackendError> {
        if self.transaction_status != TransactionStatus::Idle {
            self.simple_query_inner("ROLLBACK").await?;
        }
        self.simple_query_inner("DISCARD ALL").await?;
        Ok(())
    }

    /// Drops a request that could not be encoded (nothing was sent), so no
    /// half-written message precedes the next one; a queued reset stays owed.
    fn unsend(&mut self, reset_queued: bool, error: BackendError) -> BackendError {
        self.framer.write_buf().clear();
        self.reset_owed |= reset_queued;
        error
    }

    /// Pays an owed reset with a round trip of its own, before a simple-
    /// protocol request (warm-up statements; never the request path).
    async fn pay_owed_reset(&mut self) -> Result<(), BackendError> {
        if !std::mem::take(&mut self.reset_owed) {
            return Ok(());
        }
        self.forget_client_state();
        frontend::query("DISCARD ALL", self.framer.write_buf()).map_err(invalid_sql)?;
        self.framer.flush(Stage::Sending).await?;
        let result = self.collect_results(Protocol::Simple).await;
        self.reset_outcome(result.map(|_| ()))
    }

    /// A refused reset fails closed: the request behind it does not run,
    /// and the session, alive but with a previous user's state, is retired.
    fn reset_outcome<T>(&mut self, result: Result<T, BackendError>) -> Result<T, BackendError> {
        match result {
            Err(BackendError::Sql { error, .. }) => {
                tracing::warn!(code = %error.code, "The server refused to reset a session; it is retired.");
                self.retired = true;
                Err(BackendError::ResetRefused(error))
            }
            other => other,
        }
    }

    /// Checks, without waiting, whether the server has closed this idle
    /// session (e.g. it was terminated or the server restarted): anything but
    /// asynchronous notices arriving on an idle session means it is gone.
    /// A session whose server answered within [`RECENT_ANSWER`] is taken
    /// as alive without asking the kernel.
    pub fn check_idle(&mut self) -> Result<(), BackendError> {
        if !self.is_broken() && self.answered_at.elapsed() < RECENT_ANSWER {
            return Ok(());
        }
        self.check_idle_now()
    }

    /// [`Connection::check_idle`] that always asks the kernel, for a caller
    /// that must know whether the server ended the session a moment ago:
    /// the lifecycle judging whether a lost session ended alone.
    pub fn check_idle_now(&mut self) -> Result<(), BackendError> {
        if self.is_broken() {
            return Err(BackendError::Broken);
        }
        let result = self.framer.poll_unsolicited();
        if result.is_err() {
            self.closed = true;
        }
        result
    }

    /// True when nothing arrived on this idle session: the kernel holds no
    /// byte for it and nothing is left unread. Looks without reading, so
    /// it needs no exclusive access; a session that is not quiet may hold
    /// a goodbye or only a notice, which [`Connection::check_idle_now`] tells.
    pub fn is_quiet(&self) -> bool {
        !self.is_broken() && self.framer.is_quiet()
    }

    /// Ends the session politely (Terminate), ignoring errors.
    pub async fn close(mut self) {
        // Marked first, so `Drop` adds nothing even if this is cancelled.
        self.closed = true;
        self.framer.terminate().await;
    }

    /// The startup exchange is over: the session may take requests (until
    /// then, `Drop` sends nothing into a half-finished handshake).
    pub(crate) fn startup_done(&mut self) {
        self.in_flight = false;
    }

    /// Starts a request that runs caller statements: from here on the
    /// session may hold state they left (see [`Connection::is_dirty`]).
    /// Lends the session to a client speaking the protocol itself (the
    /// wire front end): pays an owed reset first, in a round trip of its
    /// own, then marks the session busy until [`Connection::passthrough_end`].
    /// Dropped before that (the client left mid-transaction), the session
    /// is discarded by the pool, never reused.
    pub async fn passthrough_begin(&mut self) -> Result<(), BackendError> {
        self.begin_request()?;
        self.dirty = true;
        let reset = self.pay_owed_reset().await;
        if reset.is_err() {
            return self.end_request(reset);
        }
        Ok(())
    }

    /// Where a client's messages (as they are or rewritten) are gathered
    /// before [`Connection::passthrough_exchange`] sends them.
    pub fn passthrough_buf(&mut self) -> &mut bytes::BytesMut {
        self.framer.write_buf()
    }

    /// Sends what was gathered in [`Connection::passthrough_buf`] while
    /// reading: `Some` message from the server as soon as one arrived
    /// (call again to send on), `None` once everything went out. The
    /// server may answer the start of a long pipeline before it has read
    /// the end; its answers are read meanwhile, so it never blocks on
    /// them. A ReadyForQuery updates [`Connection::transaction_status`].
    pub async fn passthrough_exchange(
        &mut self,
        max_len: usize,
    ) -> Result<Option<bytes::Bytes>, BackendError> {
        let step = self.framer.send_or_read(max_len).await;
        match self.fail_on_connection_level(step)? {
            Duplex::Sent => Ok(None),
            Duplex::Frame(frame) => {
                self.track_ready(&frame)?;
                Ok(Some(frame))
            }
        }
    }

    /// The next message from the server if it has arrived whole already
    /// (no I/O), as [`Connection::passthrough_frame`] would return it.
    pub fn passthrough_buffered(
        &mut self,
        max_len: usize,
    ) -> Result<Option<bytes::Bytes>, BackendError> {
        let frame = self.framer.take_frame(max_len);
        let frame = self.fail_on_connection_level(frame)?;
        if let Some(frame) = &frame {
            self.track_ready(frame)?;
        }
        Ok(frame)
    }

    /// Keeps the transaction status of a raw ReadyForQuery.
    fn track_ready(&mut self, frame: &[u8]) -> Result<(), BackendError> {
        if frame.first() == Some(&b'Z')
            && let Some(&status) = frame.get(5)
        {
            self.set_transaction_status(status)?;
        }
        Ok(())
    }

    /// The next message from the server, raw, for the client; a
    /// ReadyForQuery also updates [`Connection::transaction_status`].
    /// Cancel-safe.
    pub async fn passthrough_frame(
        &mut self,
        max_len: usize,
    ) -> Result<bytes::Bytes, BackendError> {
        let frame = self.framer.read_frame(Stage::Receiving, max_len).await;
        let frame = self.fail_on_connection_level(frame)?;
        self.track_ready(&frame)?;
        Ok(frame)
    }

    /// The client is done with the session: the server answered every
    /// message sent (its last ReadyForQuery is in), so it may be pooled.
    /// `left_state` says whether the client may have left session state
    /// behind (a setting, a prepared statement, ...): then the session is
    /// reset before its next user; otherwise it needs no reset, as after a
    /// transaction that only ran statements.
    pub fn passthrough_end(&mut self, left_state: bool) {
        self.in_flight = false;
        self.dirty = left_state;
        self.framer.shrink_read_buf();
    }

    /// The session settings a wire client's startup asked for that are set
    /// on this session now; a wire client whose settings differ changes
    /// them (see `wire::settings`), and a reset clears them.
    pub fn client_settings(&self) -> &[(String, String)] {
        &self.client_settings
    }

    /// Records the wire client settings now set on this session.
    pub fn set_client_settings(&mut self, settings: Vec<(String, String)>) {
        self.client_settings = settings;
    }

    /// The named statements wire clients prepared on this session.
    pub fn prepared(&mut self) -> &mut PreparedSet {
        &mut self.prepared
    }

    /// A reset went out: the session holds no wire client's settings or
    /// statements any more.
    fn forget_client_state(&mut self) {
        self.client_settings.clear();
        self.prepared.clear();
    }

    /// Every ParameterStatus value the server reported.
    pub fn parameters(&self) -> impl Iterator<Item = (&str, &str)> {
        self.framer.parameters()
    }

    /// Marks the session closed on a connection-level failure.
    fn fail_on_connection_level<T>(
        &mut self,
        result: Result<T, BackendError>,
    ) -> Result<T, BackendError> {
        if let Err(e) = &result
            && e.is_connection_level()
        {
            self.closed = true;
        }
        result
    }

    /// Begins a request of pgwarden's own making (not a wire client's):
    /// settings a wire client left must not reach it, so they make a reset owed.
    pub(super) fn begin_caller_request(&mut self) -> Result<(), BackendError> {
        self.begin_request()?;
        self.dirty = true;
        if !self.client_settings.is_empty() {
            self.reset_owed = true;
        }
        Ok(())
    }

    fn begin_request(&mut self) -> Result<(), BackendError> {
        if self.is_broken() {
            return Err(BackendError::Broken);
        }
        self.in_flight = true;
        Ok(())
    }

    /// Ends a request: a connection-level failure closes the session for
    /// good, anything else leaves it ready for the next request.
    pub(super) fn end_request<T>(
        &mut self,
        result: Result<T, BackendError>,
    ) -> Result<T, BackendError> {
        let result = self.fail_on_connection_level(result);
        self.in_flight = false;
        result
    }

    /// A simple-protocol request inside a larger one, an owed reset paid first.
    pub(super) async fn simple_query_inner(
        &mut self,
        sql: &str,
    ) -> Result<Vec<QueryResult>, BackendError> {
        self.pay_owed_reset().await?;
        self.send_simple(sql).await
    }

    /// One simple-protocol exchange, as is: an owed reset stays owed.
    async fn send_simple(&mut self, sql: &str) -> Result<Vec<QueryResult>, BackendError> {
        if let Err(e) = frontend::query(sql, self.framer.write_buf()) {
            return Err(self.unsend(false, invalid_sql(e)));
        }
        self.framer.flush(Stage::Sending).await?;
        self.collect_results(Protocol::Simple).await
    }

    /// Sends `parts` as one pipeline (one Sync, one round trip) and
    /// collects one result per part; an owed reset is paid in front.
    pub(super) async fn pipeline_inner<'a>(
        &mut self,
        parts: impl IntoIterator<Item = Part<'a>>,
    ) -> Result<Vec<QueryResult>, BackendError> {
        // An owed reset goes first in the same Sync group: should the server
        // refuse it, it skips the rest of the group, so nothing runs on a
        // session that still holds a previous user's state.
        let reset = std::mem::take(&mut self.reset_owed);
        if reset {
            self.forget_client_state();
        }
        let owed = reset.then_some(Part::Sql("DISCARD ALL"));
        let statements = match self.encode_pipeline(owed.into_iter().chain(parts), reset) {
            Ok(statements) => statements,
            Err(error) => return Err(self.unsend(reset, error)),
        };
        frontend::sync(self.framer.write_buf());
        self.framer.flush(Stage::Sending).await?;
        let results = self
            .collect_results(Protocol::Extended { statements })
            .await;
        if !reset {
            return results;
        }
        match results {
            Ok(mut results) => {
                results.remove(0);
                Ok(results)
            }
            Err(BackendError::Sql { error, statement }) if statement > 0 => {
                Err(BackendError::Sql {
                    error,
                    statement: statement - 1,
                })
            }
            other => self.reset_outcome(other),
        }
    }

    /// Encodes the statements of a pipeline and returns how many there are.
    ///
    /// A COPY FROM STDIN is refused here, before anything is sent, unless it
    /// is the last statement: the server would read the next statement's
    /// Parse while in copy-in mode, and it answers that by terminating the
    /// session ("protocol synchronization was lost"). A COPY that is last
    /// is refused once it starts (see `collect::refuse_copy_in`). The
    /// error's index counts the caller's statements, not an owed reset.
    fn encode_pipeline<'a>(
        &mut self,
        parts: impl IntoIterator<Item = Part<'a>>,
        reset: bool,
    ) -> Result<usize, BackendError> {
        let mut copy_in = None;
        let mut statements = 0;
        for part in parts {
            if let Some(index) = copy_in {
                return Err(copy_in_refused(index - usize::from(reset)));
            }
            if may_copy_in(part.sql()) {
                copy_in = Some(statements);
            }
            self.encode(part)?;
            statements += 1;
        }
        Ok(statements)
    }

    fn encode(&mut self, part: Part<'_>) -> Result<(), BackendError> {
        let (sql, params) = match part {
            Part::Sql(sql) => (sql, &[][..]),
            Part::Statement(statement) => (statement.sql.as_str(), statement.params.as_slice()),
        };
        let buf = self.framer.write_buf();
        frontend::parse("", sql, std::iter::empty(), buf).map_err(invalid_sql)?;
        frontend::bind(
            "",
            "",
            std::iter::empty(),
            params.iter(),
            |param, buf| match param {
                Some(text) => {
                    buf.extend_from_slice(text.as_bytes());
                    Ok(IsNull::No)
                }
                None => Ok(IsNull::Yes),
            },
            std::iter::empty(),
            buf,
        )
        .map_err(|_| BackendError::Config("too many parameters for one statement".into()))?;
        frontend::describe(b'P', "", buf).map_err(invalid_sql)?;
        frontend::execute("", 0, buf).map_err(invalid_sql)?;
        Ok(())
    }

    /// Reads the request's response (see [`collect::read_response`]) and
    /// takes the transaction status of its ReadyForQuery.
    async fn collect_results(
        &mut self,
        protocol: Protocol,
    ) -> Result<Vec<QueryResult>, BackendError> {
        let limit = self.result_limit;
        let response = collect::read_response(&mut self.framer, limit, protocol).await?;
        self.set_transaction_status(response.status)?;
        self.framer.shrink_read_buf();
        response.results
    }

    pub(crate) fn connector(&self) -> &Connector {
        &self.connector
    }

    pub(crate) fn set_backend_key(&mut self, process_id: i32, secret_key: i32) {
        self.backend_key = Some((process_id, secret_key));
    }

    pub(crate) fn set_transaction_status(&mut self, status: u8) -> Result<(), BackendError> {
        self.answered_at = Instant::now();
        self.transaction_status = match status {
            b'I' => TransactionStatus::Idle,
            b'T' => TransactionStatus::InTransaction,
            b'E' => TransactionStatus::Failed,
            other => {
                return Err(BackendError::Protocol(format!(
                    "unknown transaction status {other:#04x}"
                )));
            }
        };
        Ok(())
    }
}

/// One statement of a pipeline, borrowed: the caller's, or one the
/// connection adds around it (transaction control), so that wrapping a
/// request never copies it.
#[derive(Clone, Copy, Debug)]
pub(super) enum Part<'a> {
    /// SQL without parameters.
    Sql(&'a str),
    /// A caller's statement.
    Statement(&'a Statement),
}

impl Part<'_> {
    /// The statement's text.
    fn sql(&self) -> &str {
        match self {
            Part::Sql(sql) => sql,
            Part::Statement(statement) => &statement.sql,
        }
    }
}

/// A session the pool lets go of says goodbye: a Terminate message, sent
/// if the socket takes it at once, so the server ends the session as a
/// normal disconnect instead of counting it abandoned. A broken session
/// (mid-request, or already failed) is simply closed.
impl Drop for Connection {
    fn drop(&mut self) {
        if self.closed || self.in_flight {
            return;
        }
        self.framer.terminate_now();
    }
}

/// The session's state, without what must not reach a log: the cancel
/// key's secret (it authorizes cancelling this session's statements) and
/// the buffers' contents, which the framer's `Debug` leaves out.
impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("framer", &self.framer)
            .field("connector", &self.connector)
            .field("process_id", &self.process_id())
            .field("transaction_status", &self.transaction_status)
            .field("in_flight", &self.in_flight)
            .field("closed", &self.closed)
            .field("dirty", &self.dirty)
            .field("reset_owed", &self.reset_owed)
            .field("retired", &self.retired)
            .field("result_limit", &self.result_limit)
            .field("created_at", &self.created_at)
            .finish_non_exhaustive()
    }
}

pub(super) fn invalid_sql(e: std::io::Error) -> BackendError {
    BackendError::Config(format!("statement cannot be sent: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{ConnectOptions, SslMode};

    #[tokio::test]
    async fn debug_shows_the_process_id_but_never_the_cancel_key_or_buffers() {
        let mut options = ConnectOptions::tcp("localhost", 5432, "app", "db");
        options.ssl_mode = SslMode::Disable;
        let connector = Connector::new(options).unwrap();
        let (ours, _server) = tokio::net::UnixStream::pair().unwrap();
        let mut conn = Connection::new(Socket::Unix(ours), connector);
        conn.set_backend_key(4242, 918_273_645);
        conn.framer.write_buf().extend_from_slice(b"row-secret");
        let shown = format!("{conn:?}");
        assert!(shown.contains("process_id: Some(4242)"), "{shown}");
        assert!(!shown.contains("918273645"), "{shown}");
        assert!(!shown.contains("row-secret"), "{shown}");
    }
}
