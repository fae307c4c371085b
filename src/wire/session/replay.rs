//! Units outside a transaction whose session breaks: replayed when that
//! is provably safe, answered when they provably committed, 08007 only
//! when the database cannot tell (the rules of DESIGN §4, on the wire).
//!
//! A unit is kept until its ReadyForQuery, and its replies are held (the
//! outbox is written at the ReadyForQuery, or past 16 KiB), so a unit cut
//! off before its end can be sent again as if the first attempt had never
//! been. What makes its fate decidable is a question that rides in the
//! same write: behind the client's statements and before the Sync that
//! commits them, pgwarden's prepared statement asks the transaction's id
//! (NULL when the statements wrote nothing) and what tells a crash or a
//! failover (see [`crate::guard::replay`]), then a Flush makes the server
//! send the answer *before* it reaches the Sync. So, when the session
//! breaks:
//! - the answer said the unit wrote nothing: replayed;
//! - no answer came, but the server's own goodbye did (a FATAL, or the
//!   WARNING a crash sends): the server ended the session before the
//!   Flush, which it reaches before the Sync, so nothing committed:
//!   replayed. (A stream is ordered: what the server sent before its
//!   goodbye arrived before it.)
//! - the answer named a transaction: its fate is asked of the server as
//!   for a broken HTTP write: committed → the replies in hand and a
//!   ReadyForQuery; provably not → replayed; otherwise 08007;
//! - no answer and no goodbye (a cut network, a proxy that closed): 08007.
//!
//! A unit without an Execute (a Parse, a Describe) runs nothing and is
//! always replayed. A simple Query of one statement is sent as its
//! extended-protocol equivalent (Parse, Bind, Describe, Execute of the
//! unnamed statement, text results), whose replies are those of the
//! Query once ParseComplete, BindComplete and NoData are left out.
//!
//! Only statements that run inside the unit's implicit transaction are
//! asked about: `SELECT`, `INSERT`, `UPDATE`, `DELETE`, `MERGE`, `WITH`,
//! `VALUES`, `TABLE`. Anything else (`VACUUM`, `CREATE DATABASE` and
//! `CALL` commit on their own; `COPY` streams; `BEGIN` opens a
//! transaction) is sent as it is and gets 08007 when broken, as do
//! units of pinned clients (their state does not move), units behind
//! others still waiting, and every unit with `write_safety = "fast"`.
//! Replays count against the guard budget from the first break.

use std::time::Instant;

use bytes::Bytes;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{info, warn};

use super::Session;
use super::lost::IDENTIFY_SQL;
use super::replies::{Ends, Expect};
use crate::backend::statements::Held;
use crate::backend::{Connection, TxIdentity};
use crate::guard::WriteSafety;
use crate::guard::exec::OldSession;
use crate::guard::replay::{Decision, Rule, single_statement};
use crate::telemetry::labels::{ClientErrorKind, ReplayResult};
use crate::wire::messages;
use crate::wire::prepared::{self, Registry, Statement};

/// Statements asked about: they run inside the unit's implicit
/// transaction, so its Sync commits them.
const ASKED: [&str; 8] = [
    "SELECT", "INSERT", "UPDATE", "DELETE", "MERGE", "WITH", "VALUES", "TABLE",
];

/// pgwarden's question, as a statement every session prepares once.
pub(crate) fn identify_statement(registry: &Registry) -> std::sync::Arc<Statement> {
    let mut body = IDENTIFY_SQL.as_bytes().to_vec();
    body.extend_from_slice(b"\0\0\0");
    registry.statement(&body)
}

/// How a kept unit is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    /// Extended-protocol messages up to a Sync, none of which executes.
    Quiet,
    /// Extended-protocol messages up to a Sync, with the question before it.
    Extended,
    /// A Query of one statement, sent as its extended-protocol equivalent.
    Simple,
}

/// A unit kept until its ReadyForQuery.
#[derive(Debug)]
pub(super) struct InFlight {
    bytes: Bytes,
    shape: Shape,
    started: Instant,
    /// The answer to the question: `None` until it comes, then the
    /// transaction, `None` when it wrote nothing.
    identity: Option<Option<TxIdentity>>,
    /// The server said goodbye (FATAL, or a crash's WARNING).
    goodbye: bool,
    /// Outbox bytes that were there before the unit's replies.
    mark: usize,
    /// Some of its replies reached the client already.
    forwarded: bool,
    /// Names of statements the client prepared in it, undone before a
    /// replay.
    parsed: Vec<Bytes>,
    /// Times it was replayed.
    replays: u32,
    /// The end of the budget, from the first break.
    deadline: Option<tokio::time::Instant>,
}

/// What a broken unit gets.
enum Fate {
    /// Sent again; the rule that decided it, unless the resolution
    /// counted it already.
    Replay(Option<Rule>),
    Answer,
    Fail(&'static str, &'static str, ClientErrorKind),
}

const UNKNOWN_TEXT: &str = "pgwarden: the connection to the database was lost while the statement ran; it may or may not have been applied";
const LOST_TEXT: &str = "pgwarden: the connection to the database was lost after part of the result was sent; nothing was applied";

impl<S> Session<'_, S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// Writes a unit to the session, kept for a replay when its shape
    /// allows it; true when it was (otherwise the caller writes it as it is).
    pub(super) fn write_kept(
        &mut self,
        conn: &mut Connection,
        bytes: &Bytes,
        started: Instant,
    ) -> bool {
        let Some(shape) = self.shape_of(bytes) else {
            return false;
        };
        self.inflight = Some(InFlight {
            bytes: bytes.clone(),
            shape,
            started,
            identity: None,
            goodbye: false,
            mark: self.outbox.len(),
            forwarded: false,
            parsed: Vec::new(),
            replays: 0,
            deadline: None,
        });
        self.write_shape(conn, bytes, shape, started);
        true
    }

    fn write_shape(
        &mut self,
        conn: &mut Connection,
        bytes: &Bytes,
        shape: Shape,
        started: Instant,
    ) {
        let (body, sync) = bytes.split_at(bytes.len() - 5);
        match shape {
            Shape::Quiet => self.write_unit(conn, bytes, started),
            Shape::Extended => {
                self.write_unit(conn, &bytes.slice(..body.len()), started);
                self.ask(conn);
                conn.passthrough_buf().extend_from_slice(sync);
                self.expect(Expect::Sync(started));
            }
            Shape::Simple => {
                let text = prepared::split_cstr(&bytes[5..]).map_or(&[][..], |(t, _)| t);
                let buf = conn.passthrough_buf();
                prepared::message(buf, b'P', &[b"\0", text, b"\0\0\0"]);
                prepared::message(buf, b'B', &[b"\0\0\0\0\0\0\0\0"]);
                prepared::message(buf, b'D', &[b"P\0"]);
                prepared::message(buf, b'E', &[b"\0\0\0\0\0"]);
                self.expect(Expect::Hidden(Ends::ParseComplete));
                self.expect(Expect::Hidden(Ends::BindComplete));
                self.expect(Expect::Described);
                self.expect(Expect::Reply(Ends::Execution));
                self.ask(conn);
                frontend::sync(conn.passthrough_buf());
                self.expect(Expect::Sync(started));
            }
        }
    }

    /// The question, then a Flush so its answer leaves before the Sync.
    fn ask(&mut self, conn: &mut Connection) {
        let statement = self.wire.identify.clone();
        let held = conn.prepared().lookup(statement.id);
        if held != Held::Ready {
            self.send_parse(conn, &statement, held, None);
        }
        statement.encode_bind(b"\0", b"\0\0\0\0\0\0", conn.passthrough_buf());
        self.expect(Expect::Hidden(Ends::BindComplete));
        frontend::execute("", 0, conn.passthrough_buf()).ok();
        self.expect(Expect::IdentifyRow);
        frontend::flush(conn.passthrough_buf());
    }

    /// How a unit can be kept, if it can: outside a transaction, nothing
    /// else waiting, the client not pinned, and its statements asked
    /// about (see the module doc).
    fn shape_of(&self, bytes: &[u8]) -> Option<Shape> {
        let free = self.status == b'I'
            && self.units == 0
            && !self.unsynced
            && self.pinned.is_none()
            && self.lost.is_none();
        if !free || bytes.len() < 5 {
            return None;
        }
        let asks = self.wire.executor.write_safety() == WriteSafety::Resolve;
        if bytes[bytes.len() - 5..][0] != b'S' && bytes[0] != b'Q' {
            return None;
        }
        let mut at = 0;
        let mut executes = false;
        let mut unnamed: Option<bool> = None;
        let mut bound: Option<bool> = None;
        let mut named: Vec<(&[u8], bool)> = Vec::new();
        while let Some((tag, len)) = messages::peek_header(&bytes[at..]) {
            let body = &bytes[at + 5..at + len];
            at += len;
            let last = at == bytes.len();
            match tag {
                b'Q' if last && at == len && asks => {
                    let text = prepared::split_cstr(body)?.0;
                    return asked(text).then_some(Shape::Simple);
                }
                b'P' => {
                    let (name, rest) = prepared::split_cstr(body)?;
                    let ok = asked(prepared::split_cstr(rest)?.0);
                    if name.is_empty() {
                        unnamed = Some(ok);
                    } else {
                        named.push((name, ok));
                    }
                }
                b'B' => {
                    let (_, rest) = prepared::split_cstr(body)?;
                    let (name, _) = prepared::split_cstr(rest)?;
                    bound = if name.is_empty() {
                        unnamed
                    } else if let Some((_, ok)) = named.iter().rev().find(|(n, _)| *n == name) {
                        Some(*ok)
                    } else {
                        self.statements.get(name).map(|s| asked(s.text()))
                    };
                }
                b'E' => {
                    executes = true;
                    if !(asks && bound == Some(true)) {
                        return None;
                    }
                }
                b'D' | b'C' => {}
                b'S' if last => {}
                _ => return None,
            }
        }
        Some(if executes {
            Shape::Extended
        } else {
            Shape::Quiet
        })
    }

    /// A client's Parse of a new name in a kept unit: undone before a
    /// replay, which parses it again.
    pub(super) fn kept_parse(&mut self, name: &[u8]) {
        if let Some(kept) = self.inflight.as_mut() {
            kept.parsed.push(Bytes::copy_from_slice(name));
        }
    }

    /// The answer to the question in a kept unit.
    pub(super) fn identify_row_reply(&mut self, tag: u8, frame: &[u8]) {
        match tag {
            b'D' => {
                let identity = super::lost::identity_of(frame);
                if identity.is_none() {
                    warn!("pgwarden's question in a unit got an unreadable answer.");
                }
                if let (Some(kept), Some(identity)) = (self.inflight.as_mut(), identity) {
                    kept.identity = Some(identity);
                }
            }
            b'C' => {
                self.pop();
                self.answer_fakes();
            }
            _ => {}
        }
    }

    /// A notice from the server: a crash's goodbye is one (a WARNING with
    /// 57P01 or 57P02, then the end of the stream).
    pub(super) fn notice_seen(&mut self, frame: &[u8]) {
        if let Some(kept) = self.inflight.as_mut()
            && matches!(super::replies::error_code(frame), Some(b"57P01" | b"57P02"))
        {
            kept.goodbye = true;
        }
    }

    /// The outbox is about to be written: replies of a kept unit in it
    /// reach the client, which makes it unfit for a replay.
    pub(super) fn outbox_leaves(&mut self) {
        if let Some(kept) = self.inflight.as_mut() {
            if self.outbox.len() > kept.mark {
                kept.forwarded = true;
            }
            kept.mark = 0;
        }
    }

    /// The session broke under a kept unit (the only one waiting):
    /// replayed on a fresh session, answered, or failed, as the module
    /// doc says. True when it was replayed: the new session holds it,
    /// to be sent.
    pub(super) async fn settle_kept(
        &mut self,
        mut kept: InFlight,
        old: &OldSession,
        fatal: bool,
    ) -> bool {
        kept.goodbye |= fatal;
        let fate = self.fate_of(&kept, old).await;
        match fate {
            Fate::Replay(rule) => {
                if let Some(rule) = rule {
                    self.wire.executor.count_rule(rule);
                }
                info!(
                    replays = kept.replays,
                    "Replaying a wire unit on a fresh session."
                );
                self.replay(kept, old).await
            }
            Fate::Answer => {
                messages::ready_for_query(&mut self.outbox, b'I');
                self.unit_answered(b'I', Some(kept.started));
                if kept.replays > 0 {
                    self.wire.metrics.replay(ReplayResult::Ok);
                }
                false
            }
            Fate::Fail(code, text, kind) => {
                if !kept.forwarded {
                    self.outbox.truncate(kept.mark);
                }
                if kept.replays > 0 {
                    self.wire.metrics.replay(ReplayResult::Failed);
                }
                let _ = self.answer_locally(1, code, text, kind);
                false
            }
        }
    }

    async fn fate_of(&mut self, kept: &InFlight, old: &OldSession) -> Fate {
        let unknown = Fate::Fail("08007", UNKNOWN_TEXT, ClientErrorKind::ResolutionUnknown);
        if kept.forwarded {
            return match kept.identity {
                Some(None) => Fate::Fail("08006", LOST_TEXT, ClientErrorKind::ConnectionLost),
                _ => unknown,
            };
        }
        match (&kept.shape, &kept.identity, kept.goodbye) {
            (Shape::Quiet, _, _) => Fate::Replay(Some(Rule::NeverSent)),
            (_, Some(None), _) => Fate::Replay(Some(Rule::Read)),
            (_, None, true) => Fate::Replay(Some(Rule::BeforeCommit)),
            (_, None, false) => {
                self.wire.executor.count_rule(Rule::Unknown);
                unknown
            }
            // The resolution counts its own rule.
            (_, Some(Some(identity)), _) => {
                match self.wire.executor.resolve_commit(identity, old).await {
                    Decision::Answer => Fate::Answer,
                    Decision::Replay => Fate::Replay(None),
                    Decision::AskAgain | Decision::Unknown => unknown,
                }
            }
        }
    }

    /// Sends the unit again on a session of a healthy generation, within
    /// the budget that started at its first break.
    async fn replay(&mut self, mut kept: InFlight, old: &OldSession) -> bool {
        let budget = self.wire.guard.budget();
        let deadline = *kept
            .deadline
            .get_or_insert_with(|| tokio::time::Instant::now() + budget);
        self.outbox.truncate(kept.mark);
        for name in kept.parsed.drain(..) {
            self.statements.remove(&name);
        }
        let lent = super::forward::lend_after(&self.wire.guard, old, deadline).await;
        let mut lease = match lent {
            Ok(lease) => lease,
            Err(error) => {
                warn!(error = %error, "A wire unit could not be replayed within the budget.");
                self.wire.metrics.replay(ReplayResult::Failed);
                let text = format!("pgwarden: {error}");
                let _ = self.answer_locally(1, "57P03", &text, error.kind());
                return false;
            }
        };
        self.client
            .registration
            .slot
            .set(lease.conn().cancel_token());
        self.carry_settings(lease.conn(), false);
        kept.replays += 1;
        kept.identity = None;
        kept.goodbye = false;
        kept.forwarded = false;
        kept.mark = self.outbox.len();
        let (bytes, shape, started) = (kept.bytes.clone(), kept.shape, kept.started);
        self.inflight = Some(kept);
        self.write_shape(lease.conn(), &bytes, shape, started);
        self.lease = Some(lease);
        true
    }

    /// A kept unit got its ReadyForQuery.
    pub(super) fn kept_answered(&mut self) {
        if let Some(kept) = self.inflight.take()
            && kept.replays > 0
        {
            self.wire.metrics.replay(ReplayResult::Ok);
        }
    }
}

/// True for a statement asked about (see [`ASKED`]).
fn asked(text: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(text) else {
        return false;
    };
    single_statement(text).is_some_and(|word| ASKED.iter().any(|a| a.eq_ignore_ascii_case(word)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_statements_inside_the_units_transaction_are_asked_about() {
        for sql in [
            "SELECT 1",
            "insert into t values (1)",
            "WITH a AS (SELECT 1) SELECT * FROM a",
            "update t set x = 1;",
        ] {
            assert!(asked(sql.as_bytes()), "{sql}");
        }
        for sql in [
            "VACUUM",
            "CALL p()",
            "BEGIN",
            "COPY t FROM STDIN",
            "SELECT 1; SELECT 2",
            "CREATE DATABASE d",
            "",
        ] {
            assert!(!asked(sql.as_bytes()), "{sql}");
        }
    }
}
