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

mod forward;
mod lost;
mod pins;
mod replay;
mod replies;

pub(crate) use replay::OwnStatements;

use std::collections::VecDeque;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::{Span, debug, info, warn};

use super::messages::{self, WireError};
use super::prepared::ClientStatements;
use super::startup::Client;
use super::{PoolMode, Wire};
use crate::backend::{BackendError, DbError};
use crate::guard::Lease;
use crate::guard::exec::OldSession;
use crate::lifecycle::BackendSource;
use crate::telemetry::labels::{
    Api, ClientErrorKind, RequestKind, RequestOutcome, WireClientState,
};
use postgres_protocol::message::backend::Message;
use replies::Expect;

/// Buffer capacity an idle client keeps; a larger one (a long pipeline, a
/// big result) is given back when the client goes idle, so ten thousand
/// idle clients cost little memory.
const IDLE_BUFFER_BYTES: usize = 1024;

/// Room kept free in the inbox before each read.
const MIN_READ_ROOM: usize = 512;

/// Buffers above this are given back when their client is idle.
const SHED_BUFFER_BYTES: usize = 64 * 1024;

/// Bytes of server messages gathered before they are written to the
/// client, unless a ReadyForQuery (or a message the client must see at
/// once) comes first.
const OUTBOX_FLUSH_BYTES: usize = 16 * 1024;

/// Runs a client until it leaves, its connection fails, or the daemon
/// stops (an idle client is then told so and closed).
pub(crate) async fn run<S>(
    wire: &Wire,
    stream: S,
    client: Client,
    stop: CancellationToken,
    span: Span,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let process_id = client.registration.process_id;
    let mut session = Session {
        wire,
        span,
        stream,
        client,
        inbox: BytesMut::with_capacity(IDLE_BUFFER_BYTES),
        outbox: BytesMut::new(),
        lease: None,
        owed: VecDeque::new(),
        units: 0,
        statements: ClientStatements::default(),
        unsynced: false,
        flush_mode: false,
        failed: false,
        status: b'I',
        pinned: None,
        lost: None,
        commit: None,
        pin_lost: None,
        inflight: None,
        resend: false,
        skipping_to_sync: false,
        sending: false,
        settings_touched: false,
        reapply_settings: false,
        probe_due: false,
        scan: Unit::default(),
        state: WireClientState::Idle,
    };
    wire.metrics.wire_client(None, Some(WireClientState::Idle));
    let served = session.serve(&stop).await;
    session.span.in_scope(|| match served {
        Ok(()) => debug!(client = process_id, "Wire client left."),
        Err(error) => debug!(client = process_id, error = %error, "Wire client connection ended."),
    });
    session.leave();
    wire.metrics.wire_client(Some(session.state), None);
}

struct Session<'w, S> {
    wire: &'w Wire,
    /// The client's span, around the session's log lines.
    span: Span,
    stream: S,
    client: Client,
    /// Bytes from the client not yet forwarded.
    inbox: BytesMut,
    /// Bytes for the client not yet written.
    outbox: BytesMut,
    /// The server session, while attached.
    lease: Option<Lease<BackendSource>>,
    /// What the server owes for each message sent, in order, and the
    /// replies pgwarden gives itself in their turn (see [`replies`]).
    owed: VecDeque<Expect>,
    /// Units (Sync, Query, FunctionCall) among them: ReadyForQuery due.
    units: usize,
    /// The client's named prepared statements (see
    /// [`crate::wire::prepared`]).
    statements: ClientStatements,
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
    /// The client's session broke inside its transaction: its units are
    /// answered as in a failed transaction until it ends it (see [`lost`]).
    lost: Option<lost::Lost>,
    /// A COMMIT of the client's is in flight behind pgwarden's question
    /// (see [`lost`]).
    commit: Option<lost::Commit>,
    /// The session the client was pinned to broke while the client was
    /// idle: its next unit is told what was lost (see [`lost`]).
    pin_lost: Option<String>,
    /// The unit outside a transaction being sent, kept until its
    /// ReadyForQuery for a replay (see [`replay`]).
    inflight: Option<replay::InFlight>,
    /// A replay put a unit on a fresh session, still to be sent.
    resend: bool,
    /// A unit without a Sync was answered with an error locally: what the
    /// client sends up to its Sync is skipped, as PostgreSQL skips after an
    /// error, and the Sync gets the ReadyForQuery.
    skipping_to_sync: bool,
    /// A unit is being sent: the session stays attached until it is out.
    sending: bool,
    /// A unit changed session settings since the last probe (see
    /// [`pins`]).
    settings_touched: bool,
    /// A unit reset settings: the client's startup ones are set again.
    reapply_settings: bool,
    /// The client is done but for its settings: the probe goes out next.
    probe_due: bool,
    /// The unit at the front of the inbox, as far as it was scanned (so a
    /// long one is not scanned again from its start at every read).
    scan: Unit,
    /// What the client is doing, as `pgwarden_wire_clients` counts it.
    state: WireClientState,
}

/// Where a unit of client messages ends, and what it holds.
#[derive(Debug, Default)]
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
                self.probe_settings().await?;
                self.count_state();
            }
            // A kept unit's replies wait for its ReadyForQuery (see
            // `replay`), unless they grow large.
            if self.inflight.is_none() || self.outbox.len() >= OUTBOX_FLUSH_BYTES {
                self.flush_outbox().await?;
            }
            if !self.wait_for_input(stop).await? {
                return Ok(());
            }
            self.probe_settings().await?;
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
        self.make_room();
        let Some(lease) = self.lease.as_mut() else {
            self.shed_buffers();
            tokio::select! {
                read = self.stream.read_buf(&mut self.inbox) => return Ok(read? > 0),
                _ = stop.cancelled() => {
                    self.say_goodbye().await?;
                    return Ok(false);
                }
            }
        };
        // A pinned client between transactions is idle too.
        let idle = self.owed.is_empty() && !self.unsynced && self.status == b'I';
        let read = tokio::select! {
            biased;
            frame = lease.conn().passthrough_frame(limit) => {
                match frame {
                    Ok(frame) => {
                        self.on_server_frame(frame).await?;
                        self.take_buffered_frames().await?;
                    }
                    Err(error) => self.server_broke(error).await?,
                }
                true
            }
            read = self.stream.read_buf(&mut self.inbox) => read? > 0,
            _ = stop.cancelled(), if idle => {
                self.say_goodbye().await?;
                false
            }
        };
        if std::mem::take(&mut self.resend) {
            // A replay put the unit on a fresh session.
            self.send().await?;
        }
        Ok(read)
    }

    /// Handles the server's messages that arrived with the last one, so
    /// that they reach the client in one write, not one each.
    async fn take_buffered_frames(&mut self) -> Result<(), WireError> {
        let limit = self.wire.limits.max_message_bytes;
        while let Some(lease) = self.lease.as_mut() {
            match lease.conn().passthrough_buffered(limit) {
                Ok(Some(frame)) => self.on_server_frame(frame).await?,
                Ok(None) => break,
                Err(error) => return self.server_broke(error).await,
            }
        }
        Ok(())
    }

    /// Keeps room in the inbox for a whole message of the usual size: each
    /// unit taken off its front takes that much room with it, and a read
    /// into a few bytes of room costs a second read for the rest.
    fn make_room(&mut self) {
        if self.inbox.capacity() - self.inbox.len() < MIN_READ_ROOM {
            self.inbox.reserve(IDLE_BUFFER_BYTES);
        }
    }

    /// Gives back buffers grown large, now that the client is idle.
    fn shed_buffers(&mut self) {
        if self.inbox.is_empty() && self.inbox.capacity() > SHED_BUFFER_BYTES {
            self.inbox = BytesMut::with_capacity(IDLE_BUFFER_BYTES);
        }
        if self.outbox.is_empty() && self.outbox.capacity() > SHED_BUFFER_BYTES {
            self.outbox = BytesMut::new();
        }
    }

    /// Tells an idle client that pgwarden is shutting down (57P01, as
    /// PostgreSQL's fast shutdown does).
    async fn say_goodbye(&mut self) -> Result<(), WireError> {
        let text = "terminating connection: pgwarden is shutting down";
        messages::error_response(&mut self.outbox, "FATAL", "57P01", text);
        self.flush_outbox().await
    }

    /// A message from the server: to the client, in its turn (see
    /// [`replies`]); a ReadyForQuery ends a unit, and the last one outside
    /// a transaction gives the session back.
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
        self.route(tag, &frame);
        let at_once = matches!(tag, b'Z' | b'G' | b'W' | b'A') || self.flush_mode;
        if at_once || self.outbox.len() >= OUTBOX_FLUSH_BYTES {
            self.flush_outbox().await?;
        }
        Ok(())
    }

    /// A unit got its ReadyForQuery (the server's or pgwarden's).
    fn unit_answered(&mut self, status: u8, started: Option<Instant>) {
        self.status = status;
        // A COMMIT goes behind the question, and a unit is kept, only with
        // nothing else waiting: the first unit answered is theirs.
        self.commit = None;
        self.kept_answered();
        if let Some(started) = started {
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
        self.detach_if_done();
    }

    /// Gives the session back when the client is done with it: every unit
    /// answered, outside a transaction, nothing pinning it, nothing still
    /// being sent, and transaction pooling.
    fn detach_if_done(&mut self) {
        let done = self.owed.is_empty() && !self.unsynced && self.status == b'I';
        let shared = self.wire.limits.pool_mode == PoolMode::Transaction;
        if !(done && shared && !self.sending) {
            return;
        }
        match self.pinned {
            None => self.detach(),
            Some(pins::SESSION_SETTING) if self.settings_touched => self.probe_due = true,
            Some(_) => {}
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
        let Some(mut lease) = self.lease.take() else {
            return Ok(());
        };
        self.client.registration.slot.set(None);
        let generation = lease.generation().id();
        self.span.in_scope(|| {
            warn!(generation, error = %error, "A wire client's server session failed.");
        });
        let old = OldSession::of(&mut lease).broken_by(error.scope(), &self.wire.guard);
        let fatal = matches!(error, BackendError::Fatal(_));
        drop(lease);
        let in_transaction = self.status != b'I';
        let waiting = std::mem::take(&mut self.units);
        let owed: Vec<_> = std::mem::take(&mut self.owed).into();
        let commit = self.commit.take();
        let kept = self.inflight.take();
        self.unsynced = false;
        self.failed = false;
        self.settings_touched = false;
        self.reapply_settings = false;
        self.probe_due = false;
        if let Some(reason) = self.pinned.take() {
            self.span
                .in_scope(|| info!(reason, "The pinned session is gone with its state."));
            if !in_transaction {
                self.lose_pin(reason, waiting);
            }
        }
        match (commit, kept) {
            (Some(commit), _) if waiting > 0 => {
                self.answer_commit(commit, &old, owed, waiting).await;
            }
            (_, Some(kept)) if waiting == 1 && !in_transaction => {
                self.resend = self.settle_kept(kept, &old, fatal).await;
            }
            _ if in_transaction => self.lose_transaction(waiting),
            _ if waiting == 0 => {}
            _ => {
                let text = "pgwarden: the connection to the database was lost while the statement ran; it may or may not have been applied";
                let kind = ClientErrorKind::ResolutionUnknown;
                self.answer_locally(waiting, "08007", text, kind)?;
            }
        }
        self.flush_outbox().await
    }

    async fn flush_outbox(&mut self) -> Result<(), WireError> {
        if !self.outbox.is_empty() {
            self.outbox_leaves();
            self.stream.write_all(&self.outbox).await?;
            self.outbox.clear();
        }
        Ok(())
    }

    /// The client left: a statement it was running is cancelled, and a
    /// session lent mid-unit is discarded by the pool (never reused).
    fn leave(&mut self) {
        if let Some(lease) = self.lease.as_mut() {
            if !self.owed.is_empty()
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
