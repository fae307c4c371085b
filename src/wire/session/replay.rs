//! Units outside a transaction whose session breaks: replayed when that
//! is provably safe, answered when they provably committed, 08007 only
//! when the database cannot tell (the rules of DESIGN §4, on the wire).
//!
//! A unit is kept until its ReadyForQuery, and its replies are held (the
//! outbox is written at the ReadyForQuery, or past 16 KiB), so a unit cut
//! off before its end can be sent again as if the first attempt had never
//! been. Its fate is decidable because of where PostgreSQL commits an
//! extended-protocol unit: at its Sync, after every Execute has completed
//! and its CommandComplete is in the output buffer; and because a server
//! that ends a session says goodbye (a FATAL; a crash's WARNING) through
//! the same buffer, after whatever was already in it. So, when the
//! session breaks:
//! - the server said goodbye before the unit's last Execute completed: it
//!   never reached the Sync, so nothing committed: replayed;
//! - a statement failed: its implicit transaction was rolled back, and
//!   the error in hand is the answer;
//! - a unit that may write also carries a question, an Execute of
//!   pgwarden's prepared statement behind the client's and before the
//!   Sync, in the same write: the transaction's id (NULL when nothing was
//!   written) and what tells a crash or a failover (see
//!   [`crate::guard::replay`]). NULL: replayed. An id: asked of the server
//!   as for a broken HTTP write: committed → the replies in hand and a
//!   ReadyForQuery (a COMMIT waiting for a synchronous standby is durable
//!   already); provably not → replayed; otherwise 08007;
//! - no goodbye and no answer (a cut network, a proxy that closed, a
//!   backend killed outright): 08007.
//!
//! Reads (by the HTTP path's conservative keyword check) go without the
//! question, so they cost nothing more; a read cut off after its last
//! statement completed but before its ReadyForQuery gets 08007.
//!
//! A unit without an Execute (a Parse, a Describe) runs nothing and is
//! always replayed. A simple Query of one statement commits before its
//! CommandComplete, so it is sent as its extended-protocol equivalent
//! (Parse, Bind, Describe, Execute of the unnamed statement, text
//! results), whose replies are the Query's once ParseComplete,
//! BindComplete and NoData are left out.
//!
//! Only statements that run inside the unit's implicit transaction are
//! kept: `SELECT`, `INSERT`, `UPDATE`, `DELETE`, `MERGE`, `WITH`,
//! `VALUES`, `TABLE`. Anything else (`VACUUM`, `CREATE DATABASE` and
//! `CALL` commit on their own; `COPY` streams; `BEGIN` opens a
//! transaction) is sent as it is and gets 08007 when broken, as do units
//! of pinned clients (their state does not move) and units behind others
//! still waiting. With `write_safety = "fast"` no question is asked.
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
use crate::guard::replay::{Decision, Rule, is_read, single_statement};
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
    /// Extended-protocol messages up to a Sync; `ask` puts the question
    /// before the Sync.
    Extended { ask: bool },
    /// A Query of one statement, sent as its extended-protocol
    /// equivalent; `ask` as above.
    Simple { ask: bool },
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
    /// Executes (the client's, and the question) not yet complete: the
    /// server reaches the Sync that commits only after the last.
    pending: usize,
    /// A statement of it failed: its implicit transaction is rolled back.
    failed: bool,
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
        let Some((shape, executes)) = self.shape_of(bytes) else {
            return false;
        };
        self.inflight = Some(InFlight {
            bytes: bytes.clone(),
            shape,
            started,
            identity: None,
            goodbye: false,
            pending: executes,
            failed: false,
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
            Shape::Extended { ask } => {
                self.write_unit(conn, &bytes.slice(..body.len()), started);
                if ask {
                    self.ask(conn);
                }
                conn.passthrough_buf().extend_from_slice(sync);
                self.expect(Expect::Sync(started));
            }
            Shape::Simple { ask } => {
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
                if ask {
                    self.ask(conn);
                }
                frontend::sync(conn.passthrough_buf());
                self.expect(Expect::Sync(started));
            }
        }
    }

    /// The question, an Execute of pgwarden's statement.
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
    }

    /// How a unit can be kept, if it can, and the Executes it sends:
    /// outside a transaction, nothing else waiting, the client not pinned,
    /// and only statements that run in its implicit transaction (see the
    /// module doc). The question goes with units that may write, unless
    /// `write_safety = "fast"`.
    fn shape_of(&self, bytes: &[u8]) -> Option<(Shape, usize)> {
        let free = self.status == b'I'
            && self.units == 0
            && !self.unsynced
            && self.pinned.is_none()
            && self.lost.is_none();
        let synced = bytes.len() >= 5 && bytes[bytes.len() - 5] == b'S';
        if !free || !(synced || bytes.first() == Some(&b'Q')) {
            return None;
        }
        let resolve = self.wire.executor.write_safety() == WriteSafety::Resolve;
        let mut at = 0;
        let mut executes = 0;
        let mut writes = false;
        let mut unnamed: Option<Kind> = None;
        let mut bound: Option<Kind> = None;
        let mut named: Vec<(&[u8], Option<Kind>)> = Vec::new();
        while let Some((tag, len)) = messages::peek_header(&bytes[at..]) {
            let body = &bytes[at + 5..at + len];
            at += len;
            let last = at == bytes.len();
            match tag {
                b'Q' if last && at == len => {
                    let kind = kind_of(prepared::split_cstr(body)?.0)?;
                    let ask = resolve && kind == Kind::Write;
                    return Some((Shape::Simple { ask }, 1 + usize::from(ask)));
                }
                b'P' => {
                    let (name, rest) = prepared::split_cstr(body)?;
                    let kind = kind_of(prepared::split_cstr(rest)?.0);
                    if name.is_empty() {
                        unnamed = kind;
                    } else {
                        named.push((name, kind));
                    }
                }
                b'B' => {
                    let (_, rest) = prepared::split_cstr(body)?;
                    let (name, _) = prepared::split_cstr(rest)?;
                    bound = if name.is_empty() {
                        unnamed
                    } else if let Some((_, kind)) = named.iter().rev().find(|(n, _)| *n == name) {
                        *kind
                    } else {
                        self.statements.get(name).and_then(|s| kind_of(s.text()))
                    };
                }
                b'E' => {
                    executes += 1;
                    writes |= bound? == Kind::Write;
                }
                b'D' | b'C' => {}
                b'S' if last => {}
                _ => return None,
            }
        }
        let ask = resolve && writes;
        let shape = match executes {
            0 => Shape::Quiet,
            _ => Shape::Extended { ask },
        };
        Some((shape, executes + usize::from(ask)))
    }

    /// An Execute of a kept unit completed (or the question was answered).
    pub(super) fn kept_executed(&mut self) {
        if let Some(kept) = self.inflight.as_mut() {
            kept.pending = kept.pending.saturating_sub(1);
        }
    }

    /// A statement of a kept unit failed.
    pub(super) fn kept_failed(&mut self) {
        if let Some(kept) = self.inflight.as_mut() {
            kept.failed = true;
        }
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
                self.kept_executed();
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
        if kept.shape == Shape::Quiet {
            return Fate::Replay(Some(Rule::NeverSent));
        }
        if kept.failed {
            // Rolled back by its error, which is in hand.
            return Fate::Answer;
        }
        match &kept.identity {
            Some(None) => Fate::Replay(Some(Rule::Read)),
            // The resolution counts its own rule.
            Some(Some(identity)) => match self.wire.executor.resolve_commit(identity, old).await {
                Decision::Answer => Fate::Answer,
                Decision::Replay => Fate::Replay(None),
                Decision::AskAgain | Decision::Unknown => unknown,
            },
            // The server ended the session before the Sync that commits.
            None if kept.goodbye && kept.pending > 0 => Fate::Replay(Some(Rule::BeforeCommit)),
            None => {
                self.wire.executor.count_rule(Rule::Unknown);
                unknown
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

/// What a statement of a kept unit does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Reads, by the conservative keyword check of the HTTP path.
    Read,
    /// May write.
    Write,
}

/// How a statement runs, when it runs inside the unit's implicit
/// transaction (see [`ASKED`]); `None` otherwise.
fn kind_of(text: &[u8]) -> Option<Kind> {
    let text = std::str::from_utf8(text).ok()?;
    let word = single_statement(text)?;
    if !ASKED.iter().any(|a| a.eq_ignore_ascii_case(word)) {
        return None;
    }
    Some(if is_read(text) {
        Kind::Read
    } else {
        Kind::Write
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_statements_inside_the_units_transaction_are_kept() {
        let kind = |sql: &str| kind_of(sql.as_bytes());
        assert_eq!(kind("SELECT 1"), Some(Kind::Read));
        assert_eq!(
            kind("WITH a AS (SELECT 1) SELECT * FROM a"),
            Some(Kind::Read)
        );
        assert_eq!(kind("insert into t values (1)"), Some(Kind::Write));
        assert_eq!(kind("update t set x = 1;"), Some(Kind::Write));
        assert_eq!(kind("SELECT * FROM t FOR UPDATE"), Some(Kind::Write));
        for sql in [
            "VACUUM",
            "CALL p()",
            "BEGIN",
            "COPY t FROM STDIN",
            "SELECT 1; SELECT 2",
            "CREATE DATABASE d",
            "",
        ] {
            assert_eq!(kind(sql), None, "{sql}");
        }
    }
}
