//! Client → server: the client's messages, cut into units, go through
//! the guard to a server session, as they came except for the names of
//! prepared statements (see [`crate::wire::prepared`]).

use std::time::Instant;

use bytes::{Bytes, BytesMut};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, warn};

use super::replies::{Ends, Expect, Fake};
use super::{Session, Unit};
use crate::backend::Connection;
use crate::backend::statements::Held;
use crate::guard::exec::OldSession;
use crate::guard::{Guard, GuardError, Lease};
use crate::lifecycle::BackendSource;
use crate::telemetry::labels::{
    Api, ClientErrorKind, PreparedEvent, RequestKind, RequestOutcome, WireClientState,
};
use crate::wire::messages::{self, WireError};
use crate::wire::prepared::{self, LocalQuery, Statement};

/// Bytes of complete messages after which a unit without its end yet is
/// sent as far as it goes.
const UNIT_CHUNK_BYTES: usize = 256 * 1024;

impl<S> Session<'_, S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// Finds the next complete unit in the inbox, scanning on from where
    /// the last call stopped.
    pub(super) fn next_unit(&mut self) -> Result<Option<Unit>, WireError> {
        let limit = self.wire.limits.max_message_bytes;
        loop {
            let at = self.scan.len;
            let Some((tag, len)) = messages::peek_header(&self.inbox[at..]) else {
                return Ok(None);
            };
            if len < 5 || len > limit {
                return Err(WireError::TooLong { len, limit });
            }
            if self.inbox.len() < at + len {
                return Ok(None);
            }
            if let Some(pin) = self.pin_of(tag, &self.inbox[at + 5..at + len]) {
                self.pin(pin);
            }
            let unit = &mut self.scan;
            unit.len = at + len;
            let ends = match tag {
                b'X' if at == 0 => {
                    unit.terminate = true;
                    true
                }
                b'S' | b'Q' | b'F' => {
                    unit.answers += 1;
                    unit.unsynced = false;
                    true
                }
                b'H' | b'd' | b'c' | b'f' => {
                    unit.flush = tag == b'H';
                    true
                }
                _ => {
                    unit.unsynced = true;
                    // A long pipeline goes on in pieces: memory stays
                    // bounded, and the server starts on it while the
                    // client still sends.
                    unit.len >= UNIT_CHUNK_BYTES
                }
            };
            if ends {
                return Ok(Some(std::mem::take(&mut self.scan)));
            }
        }
    }

    /// Sends a unit to the server session, attaching one first, or
    /// answers it without one when nothing in it needs the server.
    pub(super) async fn forward(&mut self, unit: Unit) -> Result<(), WireError> {
        let bytes = self.inbox.split_to(unit.len).freeze();
        if self.skipping_to_sync {
            if unit.answers > 0 {
                self.skipping_to_sync = false;
                messages::ready_for_query(&mut self.outbox, b'I');
            }
            return Ok(());
        }
        let started = Instant::now();
        if self.lost.is_some() {
            self.answer_lost(&bytes, started);
            return Ok(());
        }
        if self.refuse_after_lost_pin(unit.answers) {
            return Ok(());
        }
        if self.lease.is_none() {
            if self.local_unit(&bytes) {
                self.answer_unit(&bytes, started);
                return Ok(());
            }
            if let Err(refused) = self.attach().await {
                return self.refuse_unit(unit, &refused);
            }
        }
        let Some(mut lease) = self.lease.take() else {
            return Ok(());
        };
        if self.status == b'T' && self.units == 0 && self.commits(&bytes) {
            self.ask_identity(lease.conn());
        }
        if !self.write_kept(lease.conn(), &bytes, started) {
            self.write_unit(lease.conn(), &bytes, started);
        }
        self.lease = Some(lease);
        self.answer_fakes();
        self.unsynced = unit.unsynced || (self.unsynced && unit.answers == 0);
        self.flush_mode = unit.flush || (self.flush_mode && unit.answers == 0);
        self.send().await
    }

    /// Sends the unit written into the session's buffer, forwarding what
    /// the server answers meanwhile (see [`Connection::passthrough_exchange`]).
    /// The session stays attached until the last byte is out.
    pub(super) async fn send(&mut self) -> Result<(), WireError> {
        let limit = self.wire.limits.max_message_bytes;
        self.sending = true;
        let result = loop {
            // A replay after a break puts the unit on a fresh session,
            // which this loop sends on.
            self.resend = false;
            let Some(lease) = self.lease.as_mut() else {
                break Ok(());
            };
            let step = match lease.conn().passthrough_exchange(limit).await {
                Ok(None) => break Ok(()),
                Ok(Some(frame)) => self.on_server_frame(frame).await,
                Err(error) => self.server_broke(error).await,
            };
            if let Err(error) = step {
                break Err(error);
            }
        };
        self.sending = false;
        self.detach_if_done();
        result
    }

    /// Writes a unit's messages into the session's send buffer, queueing
    /// what each is owed.
    pub(super) fn write_unit(&mut self, conn: &mut Connection, bytes: &Bytes, started: Instant) {
        let mut at = 0;
        while let Some((tag, len)) = messages::peek_header(&bytes[at..]) {
            let message = &bytes[at..at + len];
            let body = &message[5..];
            at += len;
            match tag {
                b'P' => self.client_parse(conn, message, body),
                b'B' => self.client_bind(conn, message, body),
                b'D' => self.client_describe(conn, message, body),
                b'C' => self.client_close(conn, message, body),
                b'E' => self.pass(conn, message, Expect::Reply(Ends::Execution)),
                b'S' => self.pass(conn, message, Expect::Sync(started)),
                b'F' => self.pass(conn, message, Expect::Query(started)),
                b'Q' => self.client_query(conn, message, body, started),
                _ => conn.passthrough_buf().extend_from_slice(message),
            }
        }
    }

    /// Sends a message as it is.
    fn pass(&mut self, conn: &mut Connection, message: &[u8], owed: Expect) {
        conn.passthrough_buf().extend_from_slice(message);
        self.expect(owed);
    }

    /// Parse: an unnamed statement goes as it is; a named one becomes
    /// pgwarden's statement of the same text, prepared on the session
    /// unless it holds it already.
    fn client_parse(&mut self, conn: &mut Connection, message: &[u8], body: &[u8]) {
        let Some((name, rest)) = prepared::split_cstr(body).filter(|(n, _)| !n.is_empty()) else {
            return self.pass(conn, message, Expect::Reply(Ends::ParseComplete));
        };
        if let Some(existing) = self.statements.get(name).cloned() {
            // PostgreSQL refuses a name in use; the server does the refusing.
            self.prepare_on(conn, &existing);
            existing.encode_parse_of(rest, conn.passthrough_buf());
            return self.expect(Expect::Reply(Ends::ParseComplete));
        }
        let statement = self.wire.statements.statement(rest);
        self.statements.insert(name, statement.clone());
        self.kept_parse(name);
        let client = Bytes::copy_from_slice(name);
        match conn.prepared().lookup(statement.id) {
            Held::Ready => {
                self.wire.metrics.prepared_statement(PreparedEvent::Hit);
                let id = statement.id;
                self.expect(Expect::Fake(Fake::ParseComplete { id, client }));
            }
            held => {
                self.wire.metrics.prepared_statement(PreparedEvent::Miss);
                self.send_parse(conn, &statement, held, Some(client));
            }
        }
    }

    /// Makes sure the session holds `statement` before a Bind or Describe
    /// of it.
    fn prepare_on(&mut self, conn: &mut Connection, statement: &Statement) {
        match conn.prepared().lookup(statement.id) {
            Held::Ready => self.wire.metrics.prepared_statement(PreparedEvent::Hit),
            held => {
                self.wire.metrics.prepared_statement(PreparedEvent::Miss);
                self.send_parse(conn, statement, held, None);
            }
        }
    }

    /// Prepares `statement` on the session (closing a stale copy first,
    /// and the least recently used ones when the session is full).
    pub(super) fn send_parse(
        &mut self,
        conn: &mut Connection,
        statement: &Statement,
        held: Held,
        client: Option<Bytes>,
    ) {
        if held == Held::Stale {
            statement.encode_close(conn.passthrough_buf());
            self.expect(Expect::Close(statement.id));
        }
        conn.prepared()
            .set_capacity(self.wire.limits.max_prepared_per_session);
        for evicted in conn.prepared().insert(statement.id) {
            self.wire
                .metrics
                .prepared_statement(PreparedEvent::Eviction);
            prepared::encode_close_id(evicted, conn.passthrough_buf());
            self.expect(Expect::Close(evicted));
        }
        statement.encode_parse(conn.passthrough_buf());
        let id = statement.id;
        self.expect(Expect::Parse { id, client });
    }

    /// Bind: of a client's named statement, rewritten to pgwarden's.
    fn client_bind(&mut self, conn: &mut Connection, message: &[u8], body: &[u8]) {
        let named = prepared::split_cstr(body).and_then(|(portal, rest)| {
            let (name, rest) = prepared::split_cstr(rest)?;
            let portal = &body[..portal.len() + 1];
            (!name.is_empty()).then_some((portal, name, rest))
        });
        let Some((portal, name, rest)) = named else {
            return self.pass(conn, message, Expect::Reply(Ends::BindComplete));
        };
        match self.statements.get(name).cloned() {
            Some(statement) => {
                self.prepare_on(conn, &statement);
                statement.encode_bind(portal, rest, conn.passthrough_buf());
                self.expect(Expect::Bind(statement.id));
            }
            None => {
                prepared::encode_unknown_bind(portal, name, rest, conn.passthrough_buf());
                self.expect(Expect::Reply(Ends::BindComplete));
            }
        }
    }

    /// Describe: of a client's named statement, rewritten to pgwarden's.
    fn client_describe(&mut self, conn: &mut Connection, message: &[u8], body: &[u8]) {
        let Some(name) = statement_name(body) else {
            return self.pass(conn, message, Expect::Reply(Ends::Description));
        };
        match self.statements.get(name).cloned() {
            Some(statement) => {
                self.prepare_on(conn, &statement);
                statement.encode_describe(conn.passthrough_buf());
            }
            None => prepared::encode_unknown_describe(name, conn.passthrough_buf()),
        }
        self.expect(Expect::Reply(Ends::Description));
    }

    /// Close: of a client's named statement, answered by pgwarden (the
    /// session keeps the statement for its other users).
    fn client_close(&mut self, conn: &mut Connection, message: &[u8], body: &[u8]) {
        let Some(name) = statement_name(body) else {
            return self.pass(conn, message, Expect::Reply(Ends::CloseComplete));
        };
        self.statements.remove(name);
        self.expect(Expect::Fake(Fake::CloseComplete));
    }

    /// Query: `DEALLOCATE` and `DISCARD ALL` of the client's statements
    /// are answered by pgwarden; anything else goes as it is.
    fn client_query(
        &mut self,
        conn: &mut Connection,
        message: &[u8],
        body: &[u8],
        started: Instant,
    ) {
        if let Some(local) = prepared::local_query(body) {
            if self.answers_itself(&local) {
                self.expect(Expect::Fake(Fake::CommandComplete(local.tag())));
                return self.expect(Expect::Fake(Fake::Ready(started)));
            }
            if !matches!(local, LocalQuery::Deallocate(_)) {
                // The server may drop pgwarden's statements with the client's.
                conn.prepared().mark_all_stale();
                self.statements.clear();
            }
            if local == LocalQuery::DiscardAll {
                // And every setting: the client's startup ones are set
                // again, and the session may be shared again after it.
                conn.set_client_settings(Vec::new());
                self.reapply_settings = true;
                self.settings_touched = true;
            }
        }
        self.pass(conn, message, Expect::Query(started));
    }

    /// True when pgwarden answers `query` itself (and has done what it
    /// says): always, but for a pinned client's `DEALLOCATE ALL` or
    /// `DISCARD ALL` (which must reach its SQL-level state too), a
    /// `DISCARD ALL` inside a transaction (the server refuses it) and
    /// the `DEALLOCATE` of a name the client never prepared by protocol.
    fn answers_itself(&mut self, query: &LocalQuery) -> bool {
        match query {
            LocalQuery::Deallocate(name) => self.statements.remove(name).is_some(),
            LocalQuery::DeallocateAll if self.pinned.is_none() => {
                self.statements.clear();
                true
            }
            LocalQuery::DiscardAll if self.pinned.is_none() && self.status == b'I' => {
                self.statements.clear();
                true
            }
            _ => false,
        }
    }

    /// True when a unit needs no server at all: only Closes of named
    /// statements, `DEALLOCATE`s pgwarden answers, Flushes and Syncs.
    fn local_unit(&self, bytes: &[u8]) -> bool {
        let mut at = 0;
        while let Some((tag, len)) = messages::peek_header(&bytes[at..]) {
            let body = &bytes[at + 5..at + len];
            at += len;
            let local = match tag {
                b'C' => statement_name(body).is_some(),
                b'S' | b'H' => true,
                b'Q' => match prepared::local_query(body) {
                    Some(LocalQuery::Deallocate(name)) => self.statements.get(&name).is_some(),
                    Some(_) => true,
                    None => false,
                },
                _ => false,
            };
            if !local {
                return false;
            }
        }
        true
    }

    /// Answers a unit [`Session::local_unit`] found needs no server.
    fn answer_unit(&mut self, bytes: &[u8], started: Instant) {
        let mut at = 0;
        while let Some((tag, len)) = messages::peek_header(&bytes[at..]) {
            let body = &bytes[at + 5..at + len];
            at += len;
            match tag {
                b'C' => {
                    if let Some(name) = statement_name(body) {
                        self.statements.remove(name);
                    }
                    self.expect(Expect::Fake(Fake::CloseComplete));
                }
                b'S' => self.expect(Expect::Fake(Fake::Ready(started))),
                b'Q' => {
                    if let Some(local) = prepared::local_query(body)
                        && self.answers_itself(&local)
                    {
                        self.expect(Expect::Fake(Fake::CommandComplete(local.tag())));
                    }
                    self.expect(Expect::Fake(Fake::Ready(started)));
                }
                _ => {}
            }
        }
        self.answer_fakes();
    }

    /// Takes a server session through the guard (which waits, bounded,
    /// during a reconnect) and lends it to the client; a cancel request
    /// from the client ends the wait.
    async fn attach(&mut self) -> Result<(), NoSession> {
        self.move_to(WireClientState::Waiting);
        let slot = self.client.registration.slot.clone();
        let cancelled = slot.wait();
        // Boxed: the guard's state (kilobytes) would otherwise be moved
        // with every unit's future, attached or not.
        let admitted = tokio::select! {
            biased;
            admitted = Box::pin(lend(&self.wire.guard)) => admitted.map_err(NoSession::Guard),
            () = cancelled.notified() => Err(NoSession::Cancelled),
        };
        let mut lease = match admitted {
            Ok(lease) => lease,
            Err(refused) => {
                slot.set(None);
                return Err(refused);
            }
        };
        slot.set(lease.conn().cancel_token());
        self.carry_settings(lease.conn(), false);
        self.lease = Some(lease);
        Ok(())
    }

    /// Puts what makes the session hold this client's settings in front
    /// of the unit (see [`crate::wire::settings`]); the server's reports of
    /// the values reach the client when they replace a reset's.
    pub(super) fn carry_settings(&mut self, conn: &mut Connection, shown: bool) {
        let wanted = &self.client.settings;
        let Some(sql) = crate::wire::settings::changes(conn.client_settings(), wanted) else {
            return;
        };
        let mut prefix = BytesMut::new();
        if frontend::query(&sql, &mut prefix).is_err() {
            return;
        }
        conn.set_client_settings(wanted.clone());
        conn.passthrough_buf().extend_from_slice(&prefix);
        self.expect(Expect::Own { shown });
    }

    /// No session for the unit: the budget ran out (57P03) or the client
    /// cancelled the wait (57014). The unit is answered so, and the client
    /// stays connected.
    fn refuse_unit(&mut self, unit: Unit, refused: &NoSession) -> Result<(), WireError> {
        let (code, text, kind) = match refused {
            NoSession::Guard(error) => {
                self.span.in_scope(|| {
                    warn!(error = %error, "A wire unit got no database session within the budget.");
                });
                ("57P03", format!("pgwarden: {error}"), error.kind())
            }
            NoSession::Cancelled => (
                "57014",
                "canceling statement due to user request".to_owned(),
                ClientErrorKind::Sql,
            ),
        };
        if unit.answers == 0 {
            // Answered at its Sync, as PostgreSQL answers after an error.
            messages::error_response(&mut self.outbox, "ERROR", code, &text);
            self.wire.metrics.client_error(kind);
            self.skipping_to_sync = true;
            return Ok(());
        }
        self.answer_locally(unit.answers, code, &text, kind)
    }

    /// Answers `answers` units without a server: an error and a
    /// ReadyForQuery each (outside any transaction now).
    pub(super) fn answer_locally(
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
                ClientErrorKind::Sql => RequestOutcome::SqlError,
                ClientErrorKind::ResolutionUnknown => RequestOutcome::ResolutionUnknown,
                _ => RequestOutcome::ConnectionLost,
            };
            self.wire
                .metrics
                .request(Api::Pgwire, RequestKind::Query, outcome, Default::default());
        }
        self.status = b'I';
        Ok(())
    }
}

/// The name in a Describe or Close of a named statement (`S`), if it is
/// one.
pub(super) fn statement_name(body: &[u8]) -> Option<&[u8]> {
    let (&kind, rest) = body.split_first()?;
    let (name, _) = prepared::split_cstr(rest)?;
    (kind == b'S' && !name.is_empty()).then_some(name)
}

/// Why a unit got no server session.
enum NoSession {
    /// The guard's budget ran out, or the daemon stops.
    Guard(GuardError),
    /// The client cancelled the unit while it waited.
    Cancelled,
}

/// A session from the guard that is ready to be lent to a client (one
/// whose reset was refused, or that broke while idle, is exchanged for
/// another within the same budget).
async fn lend(guard: &Guard<BackendSource>) -> Result<Lease<BackendSource>, GuardError> {
    let lease = guard.admit().await?;
    lend_checked(guard, lease).await
}

/// [`lend`] after `old` broke, once the lifecycle has judged the loss
/// (see [`OldSession::readmit`]), within `deadline`.
pub(super) async fn lend_after(
    guard: &Guard<BackendSource>,
    old: &OldSession,
    deadline: tokio::time::Instant,
) -> Result<Lease<BackendSource>, GuardError> {
    let lease = old.readmit(guard, deadline).await?;
    lend_checked(guard, lease).await
}

async fn lend_checked(
    guard: &Guard<BackendSource>,
    mut lease: Lease<BackendSource>,
) -> Result<Lease<BackendSource>, GuardError> {
    loop {
        match lease.conn().passthrough_begin().await {
            Ok(()) => return Ok(lease),
            Err(error) => {
                debug!(error = %error, "A pooled session could not be lent; taking another.");
                let deadline = lease.deadline();
                drop(lease);
                lease = guard.admit_until(deadline).await?;
            }
        }
    }
}
