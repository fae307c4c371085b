//! One wire client after startup: its units go through the guard to a
//! server session, whose answers come back as they are (see the module doc
//! of [`crate::wire`] for the pooling rules).
//!
//! One task owns the client stream and, while attached, the server
//! session: idle, it awaits the client; attached, it forwards both ways
//! (server first) without any task or channel in between. Messages are
//! framed by their header alone; only a handful are looked into: the unit
//! boundaries (Sync, Query, Flush, FunctionCall, Terminate), Parse and
//! Query for state that pins a client, ErrorResponse and ReadyForQuery.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::Wire;
use super::messages::{self, WireError};
use super::startup::Client;
use crate::backend::{BackendError, DbError, Scope};
use crate::guard::{GuardError, Lease};
use crate::lifecycle::BackendSource;
use crate::telemetry::labels::{
    Api, ClientErrorKind, RequestKind, RequestOutcome, WireClientState,
};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;

/// Bytes of server messages gathered before they are written to the
/// client, unless a ReadyForQuery (or a message the client must see at
/// once) comes first.
const OUTBOX_FLUSH_BYTES: usize = 16 * 1024;

/// Runs a client until it leaves, its connection fails, or the daemon
/// stops (an idle client is then told so and closed).
pub(crate) async fn run<S>(wire: &Wire, stream: S, client: Client, stop: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let process_id = client.registration.process_id;
    let mut session = Session {
        wire,
        stream,
        client,
        inbox: BytesMut::with_capacity(8 * 1024),
        outbox: BytesMut::with_capacity(8 * 1024),
        lease: None,
        waiting: VecDeque::new(),
        unsynced: false,
        flush_mode: false,
        failed: false,
        status: b'I',
        pinned: None,
        lost_transaction: false,
        skipping_to_sync: false,
        skip: 0,
        prefix: None,
        state: WireClientState::Idle,
    };
    wire.metrics.wire_client(None, Some(WireClientState::Idle));
    match session.serve(&stop).await {
        Ok(()) => debug!(client = process_id, "Wire client left."),
        Err(error) => debug!(client = process_id, error = %error, "Wire client connection ended."),
    }
    session.leave();
    wire.metrics.wire_client(Some(session.state), None);
}

struct Session<'w, S> {
    wire: &'w Wire,
    stream: S,
    client: Client,
    /// Bytes from the client not yet forwarded.
    inbox: BytesMut,
    /// Bytes for the client not yet written.
    outbox: BytesMut,
    /// The server session, while attached.
    lease: Option<Lease<BackendSource>>,
    /// When each unit sent (one per Sync, Query or FunctionCall) started;
    /// its ReadyForQuery is still due.
    waiting: VecDeque<Instant>,
    /// Extended-protocol messages were sent after the last Sync: the
    /// server holds protocol state for this client.
    unsynced: bool,
    /// The client sent a Flush: what the server sends is written at once.
    flush_mode: bool,
    /// An ErrorResponse came within the current unit's answer.
    failed: bool,
    /// The transaction status of the last ReadyForQuery the client got.
    status: u8,
    /// Why the client keeps its session until it leaves, if it does.
    pinned: Option<&'static str>,
    /// The client's session broke inside its transaction: its next unit is
    /// told that the transaction is gone.
    lost_transaction: bool,
    /// A unit without a Sync was answered with an error locally: what the
    /// client sends up to its Sync is skipped, as PostgreSQL skips after an
    /// error, and the Sync gets the ReadyForQuery.
    skipping_to_sync: bool,
    /// Replies of pgwarden's own statements still to swallow (one per
    /// ReadyForQuery).
    skip: usize,
    /// pgwarden's own statement to send in front of the next unit: the
    /// client's settings on a freshly attached session.
    prefix: Option<BytesMut>,
    /// What the client is doing, as `pgwarden_wire_clients` counts it.
    state: WireClientState,
}

/// Where a unit of client messages ends, and what it holds.
struct Unit {
    /// Its length in the inbox.
    len: usize,
    /// ReadyForQuery answers it will get (Sync, Query, FunctionCall).
    answers: usize,
    /// It ends with a Flush.
    flush: bool,
    /// It holds extended-protocol messages after its last Sync.
    unsynced: bool,
    /// It starts with Terminate.
    terminate: bool,
}

impl<S> Session<'_, S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    async fn serve(&mut self, stop: &CancellationToken) -> Result<(), WireError> {
        loop {
            while let Some(unit) = self.next_unit()? {
                if unit.terminate {
                    return Ok(());
                }
                self.forward(unit).await?;
                self.count_state();
            }
            self.flush_outbox().await?;
            if !self.wait_for_input(stop).await? {
                return Ok(());
            }
            self.count_state();
        }
    }

    /// Moves the client to the state its session says, for the gauge.
    fn count_state(&mut self) {
        let state = match (&self.lease, self.pinned) {
            (None, _) => WireClientState::Idle,
            (Some(_), None) => WireClientState::Active,
            (Some(_), Some(_)) => WireClientState::Pinned,
        };
        self.move_to(state);
    }

    fn move_to(&mut self, state: WireClientState) {
        if state != self.state {
            self.wire.metrics.wire_client(Some(self.state), Some(state));
            self.state = state;
        }
    }

    /// Waits for bytes from the client, or, while attached, the server
    /// (server first, so answers are never held up by a chatty client).
    /// False when the client left or the daemon stops with the client idle.
    async fn wait_for_input(&mut self, stop: &CancellationToken) -> Result<bool, WireError> {
        let limit = self.wire.limits.max_message_bytes;
        let Some(lease) = self.lease.as_mut() else {
            tokio::select! {
                read = self.stream.read_buf(&mut self.inbox) => return Ok(read? > 0),
                _ = stop.cancelled() => {
                    self.say_goodbye().await?;
                    return Ok(false);
                }
            }
        };
        // A pinned client between transactions is idle too.
        let idle = self.waiting.is_empty() && !self.unsynced && self.status == b'I';
        tokio::select! {
            biased;
            frame = lease.conn().passthrough_frame(limit) => {
                match frame {
                    Ok(frame) => self.on_server_frame(frame).await?,
                    Err(error) => self.server_broke(error).await?,
                }
                Ok(true)
            }
            read = self.stream.read_buf(&mut self.inbox) => Ok(read? > 0),
            _ = stop.cancelled(), if idle => {
                self.say_goodbye().await?;
                Ok(false)
            }
        }
    }

    /// Tells an idle client that pgwarden is shutting down (57P01, as
    /// PostgreSQL's fast shutdown does).
    async fn say_goodbye(&mut self) -> Result<(), WireError> {
        let text = "terminating connection: pgwarden is shutting down";
        messages::error_response(&mut self.outbox, "FATAL", "57P01", text);
        self.flush_outbox().await
    }

    /// Finds the next complete unit in the inbox.
    fn next_unit(&mut self) -> Result<Option<Unit>, WireError> {
        let limit = self.wire.limits.max_message_bytes;
        let mut unit = Unit {
            len: 0,
            answers: 0,
            flush: false,
            unsynced: false,
            terminate: false,
        };
        let mut at = 0;
        while let Some((tag, len)) = messages::peek_header(&self.inbox[at..]) {
            if len < 5 || len > limit {
                return Err(WireError::TooLong { len, limit });
            }
            if self.inbox.len() < at + len {
                break;
            }
            let body = &self.inbox[at + 5..at + len];
            if self.pinned.is_none() {
                self.pinned = pin_reason(tag, body);
            }
            at += len;
            match tag {
                b'X' if at == len => {
                    unit.terminate = true;
                    return Ok(Some(unit));
                }
                b'S' | b'Q' | b'F' => {
                    unit.answers += 1;
                    unit.unsynced = false;
                    unit.len = at;
                    return Ok(Some(unit));
                }
                b'H' | b'd' | b'c' | b'f' => {
                    unit.flush = tag == b'H';
                    unit.len = at;
                    return Ok(Some(unit));
                }
                _ => unit.unsynced = true,
            }
        }
        Ok(None)
    }

    /// Sends a unit to the server session, attaching one first.
    async fn forward(&mut self, unit: Unit) -> Result<(), WireError> {
        let bytes = self.inbox.split_to(unit.len).freeze();
        if self.skipping_to_sync {
            if unit.answers > 0 {
                self.skipping_to_sync = false;
                messages::ready_for_query(&mut self.outbox, b'I');
            }
            return Ok(());
        }
        if self.lost_transaction && unit.answers > 0 {
            self.lost_transaction = false;
            let text = "the connection to the database was lost inside the transaction, which was rolled back";
            return self.answer_locally(
                unit.answers,
                "08006",
                text,
                ClientErrorKind::ConnectionLost,
            );
        }
        if self.lease.is_none() {
            match self.attach().await {
                Ok(()) => {}
                Err(error) => return self.refuse_unit(unit, &error),
            }
        }
        let Some(lease) = self.lease.as_mut() else {
            return Ok(());
        };
        let sent = match self.prefix.take() {
            Some(mut prefix) => {
                prefix.extend_from_slice(&bytes);
                lease.conn().passthrough_send(&prefix).await
            }
            None => lease.conn().passthrough_send(&bytes).await,
        };
        if let Err(error) = sent {
            self.waiting
                .extend((0..unit.answers).map(|_| Instant::now()));
            return self.server_broke(error).await;
        }
        let now = Instant::now();
        self.waiting.extend((0..unit.answers).map(|_| now));
        self.unsynced = unit.unsynced || (self.unsynced && unit.answers == 0);
        self.flush_mode = unit.flush || (self.flush_mode && unit.answers == 0);
        Ok(())
    }

    /// Takes a server session through the guard (which waits, bounded,
    /// during a reconnect) and lends it to the client.
    async fn attach(&mut self) -> Result<(), GuardError> {
        self.move_to(WireClientState::Waiting);
        let mut lease = self.wire.guard.admit().await?;
        loop {
            match lease.conn().passthrough_begin().await {
                Ok(()) => break,
                // A session whose reset was refused or that broke while
                // idle: another one, within the same budget.
                Err(error) => {
                    debug!(error = %error, "A pooled session could not be lent; taking another.");
                    let deadline = lease.deadline();
                    drop(lease);
                    lease = self.wire.guard.admit_until(deadline).await?;
                }
            }
        }
        self.client
            .registration
            .slot
            .set(lease.conn().cancel_token());
        self.carry_settings(lease.conn());
        self.lease = Some(lease);
        Ok(())
    }

    /// Queues what makes the session hold this client's settings, to ride
    /// in front of the unit (see [`super::settings`]).
    fn carry_settings(&mut self, conn: &mut crate::backend::Connection) {
        let wanted = &self.client.settings;
        let Some(sql) = super::settings::changes(conn.client_settings(), wanted) else {
            return;
        };
        let mut prefix = BytesMut::new();
        if frontend::query(&sql, &mut prefix).is_err() {
            return;
        }
        conn.set_client_settings(wanted.clone());
        self.prefix = Some(prefix);
        self.skip += 1;
    }

    /// No session could be had within the budget: the unit is answered
    /// with 57P03 and the client stays connected.
    fn refuse_unit(&mut self, unit: Unit, error: &GuardError) -> Result<(), WireError> {
        warn!(error = %error, "A wire unit got no database session within the budget.");
        let text = format!("pgwarden: {error}");
        if unit.answers == 0 {
            // Answered at its Sync, as PostgreSQL answers after an error.
            messages::error_response(&mut self.outbox, "ERROR", "57P03", &text);
            self.wire.metrics.client_error(error.kind());
            self.skipping_to_sync = true;
            return Ok(());
        }
        self.answer_locally(unit.answers, "57P03", &text, error.kind())
    }

    /// Answers `answers` units without a server: an error and a
    /// ReadyForQuery each (outside any transaction now).
    fn answer_locally(
        &mut self,
        answers: usize,
        code: &str,
        text: &str,
        kind: ClientErrorKind,
    ) -> Result<(), WireError> {
        for _ in 0..answers {
            messages::error_response(&mut self.outbox, "ERROR", code, text);
            messages::ready_for_query(&mut self.outbox, b'I');
            self.wire.metrics.client_error(kind);
            let outcome = match kind {
                ClientErrorKind::GuardTimeout => RequestOutcome::GuardTimeout,
                _ => RequestOutcome::ConnectionLost,
            };
            self.wire
                .metrics
                .request(Api::Pgwire, RequestKind::Query, outcome, Default::default());
        }
        self.status = b'I';
        Ok(())
    }

    /// A message from the server: forwarded; a ReadyForQuery ends a unit,
    /// and the last one outside a transaction gives the session back.
    async fn on_server_frame(&mut self, frame: Bytes) -> Result<(), WireError> {
        let tag = frame[0];
        // A FATAL error ends the server session, not the client's: it is
        // answered like any other broken session.
        if tag == b'E'
            && let Some(fatal) = fatal_error(&frame)
        {
            return self
                .server_broke(BackendError::Fatal(Box::new(fatal)))
                .await;
        }
        if self.skip > 0 {
            self.swallow(tag, &frame);
            return Ok(());
        }
        self.outbox.extend_from_slice(&frame);
        match tag {
            b'E' => self.failed = true,
            b'Z' => self.unit_answered(frame.get(5).copied().unwrap_or(b'I')),
            _ => {}
        }
        let at_once = matches!(tag, b'Z' | b'G' | b'W' | b'A') || self.flush_mode;
        if at_once || self.outbox.len() >= OUTBOX_FLUSH_BYTES {
            self.flush_outbox().await?;
        }
        Ok(())
    }

    /// A reply to pgwarden's own statement: not the client's to see.
    fn swallow(&mut self, tag: u8, frame: &[u8]) {
        match tag {
            b'Z' => self.skip -= 1,
            b'E' => {
                let report = non_fatal_error(frame);
                warn!(
                    error = report.as_deref().unwrap_or("unreadable"),
                    "A client's session settings were refused on a server session."
                );
                if let Some(lease) = self.lease.as_mut() {
                    // Unknown now: a reset clears them before the next user.
                    lease.conn().set_client_settings(Vec::new());
                    self.pinned
                        .get_or_insert("session settings that could not be applied");
                }
            }
            _ => {}
        }
    }

    fn unit_answered(&mut self, status: u8) {
        self.status = status;
        if let Some(started) = self.waiting.pop_front() {
            let outcome = if std::mem::take(&mut self.failed) {
                RequestOutcome::SqlError
            } else {
                RequestOutcome::Ok
            };
            let took = started.elapsed();
            self.wire
                .metrics
                .request(Api::Pgwire, RequestKind::Query, outcome, took);
        }
        let done = self.waiting.is_empty() && !self.unsynced && status == b'I';
        if done && self.pinned.is_none() {
            self.detach();
        }
    }

    /// Gives the server session back to the pool.
    fn detach(&mut self) {
        if let Some(mut lease) = self.lease.take() {
            // Only an unpinned client detaches: it left no session state.
            lease.conn().passthrough_end(false);
            self.client.registration.slot.set(None);
        }
    }

    /// The server session failed under the client. Each unit still
    /// waiting gets an honest error and a ReadyForQuery; the client stays
    /// connected, and its next unit gets a fresh session.
    async fn server_broke(&mut self, error: BackendError) -> Result<(), WireError> {
        let Some(lease) = self.lease.take() else {
            return Ok(());
        };
        self.client.registration.slot.set(None);
        let generation = lease.generation().id();
        if error.scope() == Scope::Server {
            self.wire.guard.report_connection_lost(generation);
        }
        warn!(generation, error = %error, "A wire client's server session failed.");
        drop(lease);
        let in_transaction = self.status != b'I';
        let waiting = std::mem::take(&mut self.waiting).len();
        self.unsynced = false;
        self.failed = false;
        self.skip = 0;
        self.prefix = None;
        if let Some(reason) = self.pinned.take() {
            info!(reason, "The pinned session is gone with its state.");
        }
        if waiting == 0 {
            self.lost_transaction = in_transaction;
            return Ok(());
        }
        let (code, text) = if in_transaction {
            (
                "08006",
                "the connection to the database was lost; the transaction was rolled back",
            )
        } else {
            (
                "08007",
                "the connection to the database was lost while the statement ran; it may or may not have been applied",
            )
        };
        self.answer_locally(waiting, code, text, ClientErrorKind::ConnectionLost)?;
        self.flush_outbox().await
    }

    async fn flush_outbox(&mut self) -> Result<(), WireError> {
        if !self.outbox.is_empty() {
            self.stream.write_all(&self.outbox).await?;
            self.outbox.clear();
        }
        Ok(())
    }

    /// The client left: a statement it was running is cancelled, and a
    /// session lent mid-unit is discarded by the pool (never reused).
    fn leave(&mut self) {
        if let Some(lease) = self.lease.as_mut() {
            if !self.waiting.is_empty()
                && let Some(token) = lease.conn().cancel_token()
            {
                token.cancel_abandoned();
            } else if self.status == b'I' && !self.unsynced {
                // A pinned client's state goes with a reset, before the
                // session's next user.
                lease.conn().passthrough_end(true);
            }
        }
        self.lease = None;
    }
}

/// The server's report in an ErrorResponse frame, when it is FATAL or
/// PANIC (the server ends the session after it).
fn fatal_error(frame: &[u8]) -> Option<DbError> {
    let mut copy = BytesMut::from(frame);
    match Message::parse(&mut copy) {
        Ok(Some(Message::ErrorResponse(body))) => {
            DbError::parse(body.fields()).ok().filter(DbError::is_fatal)
        }
        _ => None,
    }
}

/// The message of an ErrorResponse frame, for a log line.
fn non_fatal_error(frame: &[u8]) -> Option<String> {
    let mut copy = BytesMut::from(frame);
    match Message::parse(&mut copy) {
        Ok(Some(Message::ErrorResponse(body))) => {
            DbError::parse(body.fields()).ok().map(|e| e.to_string())
        }
        _ => None,
    }
}

/// Why a client message makes its session impossible to share, if it
/// does: state the server keeps per session and pgwarden cannot move.
fn pin_reason(tag: u8, body: &[u8]) -> Option<&'static str> {
    let sql = match tag {
        b'P' => {
            let name_end = body.iter().position(|&b| b == 0)?;
            if name_end > 0 {
                return Some("a named prepared statement");
            }
            &body[name_end + 1..]
        }
        b'Q' => body,
        _ => return None,
    };
    let sql = std::str::from_utf8(sql.split(|&b| b == 0).next()?).ok()?;
    sql.split(';').find_map(statement_pins)
}

/// Statements whose first word leaves session state behind.
const PINNING_STATEMENTS: [(&str, &str); 6] = [
    ("SET", "a session setting"),
    ("RESET", "a session setting"),
    ("LISTEN", "LISTEN"),
    ("PREPARE", "an SQL prepared statement"),
    ("DECLARE", "a cursor"),
    ("LOAD", "a loaded library"),
];

/// Calls anywhere in a statement that leave session state behind.
const PINNING_CALLS: [(&str, &str); 2] = [
    ("pg_advisory_lock", "a session advisory lock"),
    ("set_config", "a session setting"),
];

/// The session state one statement leaves behind, if any. Runs on every
/// Query and Parse of an unpinned client, so it allocates nothing.
fn statement_pins(statement: &str) -> Option<&'static str> {
    let mut words = statement
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| !w.is_empty());
    let first = words.next()?;
    let second = words.next().unwrap_or("");
    let is = |word: &str, keyword: &str| word.eq_ignore_ascii_case(keyword);
    if is(first, "SET") && (is(second, "LOCAL") || is(second, "TRANSACTION")) {
        return None;
    }
    if is(first, "CREATE") && (is(second, "TEMP") || is(second, "TEMPORARY")) {
        return Some("a temporary table");
    }
    let by_statement = PINNING_STATEMENTS
        .iter()
        .find(|(keyword, _)| is(first, keyword));
    let by_call = || {
        PINNING_CALLS
            .iter()
            .find(|(call, _)| contains_ignoring_case(statement, call))
    };
    by_statement.or_else(by_call).map(|(_, reason)| *reason)
}

fn contains_ignoring_case(haystack: &str, needle: &str) -> bool {
    haystack
        .as_bytes()
        .windows(needle.len())
        .any(|window| window.eq_ignore_ascii_case(needle.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_that_cannot_move_pins_the_client() {
        let pins = [
            "SET search_path = app",
            "set TimeZone to 'UTC'",
            "RESET ALL",
            "LISTEN jobs",
            "PREPARE q AS SELECT 1",
            "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
            "CREATE TEMP TABLE t (x int)",
            "SELECT pg_advisory_lock(1)",
            "SELECT 1; SET work_mem = '64MB'",
        ];
        let query = |sql: &str| pin_reason(b'Q', format!("{sql}\0").as_bytes());
        for sql in pins {
            assert!(query(sql).is_some(), "{sql}");
        }
        let free = [
            "SELECT 1",
            "BEGIN; SET LOCAL work_mem = '64MB'; SELECT 1; COMMIT",
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "UPDATE t SET x = 1",
            "CREATE TABLE t (x int)",
        ];
        for sql in free {
            assert_eq!(query(sql), None, "{sql}");
        }
        assert!(pin_reason(b'P', b"s1\0SELECT 1\0\0\0").is_some());
        assert_eq!(pin_reason(b'P', b"\0SELECT 1\0\0\0"), None);
    }
}
