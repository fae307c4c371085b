//! Units outside a transaction whose session breaks: replayed when that
//! is provably safe, answered when they provably committed, 08007 only
//! when the database cannot tell (the rules of DESIGN §4, on the wire).
//!
//! A unit is kept until its ReadyForQuery, and its replies are held (the
//! outbox is written at the ReadyForQuery, or past 16 KiB), so a unit cut
//! off before its end can be sent again as if the first attempt had never
//! been. What makes its fate decidable rides in the same write, in front
//! of the client's messages, inside the implicit transaction the Sync
//! commits:
//! - a **read** (the HTTP path's conservative keyword check) goes behind
//!   pgwarden's prepared `SET TRANSACTION READ ONLY`: PostgreSQL then
//!   guarantees it changed nothing, so it is replayed whatever point it
//!   reached. A hidden write (a volatile function, `nextval`) is refused
//!   with 25006; that answer is dropped and the unit runs again as a write;
//! - a **write** goes behind pgwarden's question, its transaction's id
//!   (`txid_current()`) and what tells a crash or a failover (see
//!   [`crate::guard::replay`]), with a Flush, so the answer leaves while
//!   the client's statements run; the Sync that commits them is sent only
//!   once the answer is in. So a write broken before the answer never
//!   committed: replayed. After, the server is asked what became of that
//!   id, as for a broken HTTP write: committed → the replies in hand and a
//!   ReadyForQuery (a COMMIT waiting for a synchronous standby is durable
//!   already); provably not → replayed; otherwise 08007. The Sync's wait
//!   costs a write about half a round trip when its statements finish
//!   before the answer arrives, and no round trip of its own.
//!
//! With `write_safety = "fast"` nothing is asked, and a write is still
//! replayed when the server said goodbye (a FATAL; a
//! crash's WARNING) before its last Execute completed: PostgreSQL commits
//! an extended-protocol unit at its Sync, after its last CommandComplete,
//! and a goodbye goes through the same buffer after whatever was in it.
//! Otherwise (a cut network, a backend killed outright) 08007. A unit
//! whose statement failed was rolled back, and its error is the answer.
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
//! still waiting. Replays count against the guard budget from the first
//! break.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{info, warn};

use super::Session;
use super::replies::{Ends, Expect};
use crate::backend::statements::Held;
use crate::backend::{Connection, TxIdentity};
use crate::guard::WriteSafety;
use crate::guard::exec::OldSession;
use crate::guard::replay::{Decision, Rule, is_read, single_statement};
use crate::telemetry::labels::{ClientErrorKind, ReplayResult};
use crate::wire::messages;
use crate::wire::prepared::{self, Registry, Statement};

/// Statements kept: they run inside the unit's implicit transaction, so
/// its Sync commits them.
const KEPT: [&str; 8] = [
    "SELECT", "INSERT", "UPDATE", "DELETE", "MERGE", "WITH", "VALUES", "TABLE",
];

/// pgwarden's question in front of a write (see [`TxIdentity`]).
const IDENTIFY_SQL: &str = "SELECT pg_catalog.txid_current(), \
     pg_catalog.pg_postmaster_start_time()::text, \
     pg_catalog.substr(pg_catalog.pg_walfile_name(pg_catalog.pg_current_wal_lsn()), 1, 8), \
     pg_catalog.pg_stat_get_bgwriter_stat_reset_time()::text";

/// What makes a read provably read-only.
const READ_ONLY_SQL: &str = "SET TRANSACTION READ ONLY";

/// The statements pgwarden puts in front of kept units, prepared once
/// per server session.
#[derive(Debug)]
pub(crate) struct OwnStatements {
    identify: Arc<Statement>,
    read_only: Arc<Statement>,
}

impl OwnStatements {
    /// pgwarden's statements, held in `registry` for as long as they live.
    pub(crate) fn new(registry: &Registry) -> Self {
        let parse_body = |sql: &str| {
            let mut body = sql.as_bytes().to_vec();
            body.extend_from_slice(b"\0\0\0");
            registry.statement(&body)
        };
        OwnStatements {
            identify: parse_body(IDENTIFY_SQL),
            read_only: parse_body(READ_ONLY_SQL),
        }
    }
}

/// How a kept unit's fate is made decidable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Guard {
    /// It executes nothing.
    Quiet,
    /// Behind `SET TRANSACTION READ ONLY`.
    ReadOnly,
    /// Behind the question.
    Identified,
    /// Nothing in front (`write_safety = "fast"`).
    Bare,
}

/// How a kept unit is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Shape {
    guard: Guard,
    /// A simple Query sent as its extended-protocol equivalent.
    simple: bool,
    /// The client's Executes.
    executes: usize,
}

/// A unit kept until its ReadyForQuery.
#[derive(Debug)]
pub(super) struct InFlight {
    bytes: Bytes,
    shape: Shape,
    started: Instant,
    /// The answer to the question, once it came.
    identity: Option<TxIdentity>,
    /// The server said goodbye (FATAL, or a crash's WARNING).
    goodbye: bool,
    /// The client's Executes not yet complete: the server reaches the
    /// Sync that commits only after the last.
    pending: usize,
    /// A statement of it failed: its implicit transaction is rolled back.
    failed: bool,
    /// A read was refused as read-only (25006): it runs again as a write.
    refused: bool,
    /// A write's Sync went out (after the answer to the question).
    sync_sent: bool,
    /// Outbox bytes that were there before the unit's replies.
    mark: usize,
    /// Some of its replies reached the client already.
    forwarded: bool,
    /// Names of statements the client prepared in it, undone before it
    /// is sent again.
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
    /// Answered with the replies in hand.
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
            pending: shape.executes,
            failed: false,
            refused: false,
            sync_sent: false,
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
        match shape.guard {
            Guard::ReadOnly => {
                let statement = self.wire.own.read_only.clone();
                self.run_own(conn, &statement, Expect::Hidden(Ends::Execution));
            }
            Guard::Identified => {
                let statement = self.wire.own.identify.clone();
                self.run_own(conn, &statement, Expect::IdentifyRow);
                frontend::flush(conn.passthrough_buf());
            }
            Guard::Quiet | Guard::Bare => {}
        }
        if shape.simple {
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
        } else {
            // Everything but its Sync, which is written below.
            self.write_unit(conn, &bytes.slice(..bytes.len() - 5), started);
        }
        self.expect(Expect::Sync(started));
        // A write's Sync, which commits it, waits for the answer to the
        // question: without the answer, the write provably did not commit.
        if shape.guard != Guard::Identified {
            frontend::sync(conn.passthrough_buf());
        }
    }

    /// Sends the Sync a write held back (see [`Session::write_shape`]).
    pub(super) fn release_sync(&mut self) {
        let Some(kept) = self.inflight.as_mut() else {
            return;
        };
        if kept.shape.guard != Guard::Identified || kept.sync_sent {
            return;
        }
        if let Some(lease) = self.lease.as_mut() {
            kept.sync_sent = true;
            frontend::sync(lease.conn().passthrough_buf());
            self.resend = true;
        }
    }

    /// Runs one of pgwarden's statements (prepared first where the
    /// session lacks it), its replies owed as `owed` says.
    fn run_own(&mut self, conn: &mut Connection, statement: &Statement, owed: Expect) {
        let held = conn.prepared().lookup(statement.id);
        if held != Held::Ready {
            self.send_parse(conn, statement, held, None);
        }
        statement.encode_bind(b"\0", b"\0\0\0\0\0\0", conn.passthrough_buf());
        self.expect(Expect::Hidden(Ends::BindComplete));
        frontend::execute("", 0, conn.passthrough_buf()).ok();
        self.expect(owed);
    }

    /// How a unit can be kept, if it can: outside a transaction, nothing
    /// else waiting, the client not pinned, and only statements that run
    /// in its implicit transaction (see the module doc).
    fn shape_of(&self, bytes: &[u8]) -> Option<Shape> {
        let free = self.status == b'I'
            && self.units == 0
            && !self.unsynced
            && self.pinned.is_none()
            && self.lost.is_none();
        let synced = bytes.len() >= 5 && bytes[bytes.len() - 5] == b'S';
        if !free || !(synced || bytes.first() == Some(&b'Q')) {
            return None;
        }
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
                    return Some(self.guarded(kind == Kind::Write, true, 1));
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
        if executes == 0 {
            let guard = Guard::Quiet;
            return Some(Shape {
                guard,
                simple: false,
                executes,
            });
        }
        Some(self.guarded(writes, false, executes))
    }

    fn guarded(&self, writes: bool, simple: bool, executes: usize) -> Shape {
        let resolve = self.wire.executor.write_safety() == WriteSafety::Resolve;
        let guard = match (writes, resolve) {
            (false, _) => Guard::ReadOnly,
            (true, true) => Guard::Identified,
            (true, false) => Guard::Bare,
        };
        Shape {
            guard,
            simple,
            executes,
        }
    }

    /// A client's Parse of a new name in a kept unit: undone before a
    /// replay, which parses it again.
    pub(super) fn kept_parse(&mut self, name: &[u8]) {
        if let Some(kept) = self.inflight.as_mut() {
            kept.parsed.push(Bytes::copy_from_slice(name));
        }
    }

    /// An Execute of the client's in a kept unit completed.
    pub(super) fn kept_executed(&mut self) {
        if let Some(kept) = self.inflight.as_mut() {
            kept.pending = kept.pending.saturating_sub(1);
        }
    }

    /// A statement of a kept unit failed: a read refused as read-only
    /// runs again as a write (see [`Session::rerun_refused`]).
    pub(super) fn kept_failed(&mut self, frame: &[u8]) {
        if let Some(kept) = self.inflight.as_mut() {
            kept.failed = true;
            kept.refused |= kept.shape.guard == Guard::ReadOnly
                && super::replies::error_code(frame) == Some(b"25006".as_slice());
        }
    }

    /// At the ReadyForQuery of a read refused as read-only: its replies
    /// are dropped and it goes again, as a write, on the same session.
    /// True when it did (the ReadyForQuery is not the client's).
    pub(super) fn rerun_refused(&mut self) -> bool {
        let Some(old) = self
            .inflight
            .as_ref()
            .filter(|k| k.refused)
            .map(|k| k.shape)
        else {
            return false;
        };
        let Some(mut lease) = self.lease.take() else {
            return false;
        };
        let shape = self.guarded(true, old.simple, old.executes);
        let kept = self.inflight.as_mut().expect("kept above");
        kept.shape = shape;
        kept.refused = false;
        kept.failed = false;
        kept.sync_sent = false;
        kept.pending = shape.executes;
        let (mark, bytes, started) = (kept.mark, kept.bytes.clone(), kept.started);
        let parsed = std::mem::take(&mut kept.parsed);
        self.outbox.truncate(mark);
        for name in parsed {
            self.statements.remove(&name);
        }
        // The Sync the error skipped to.
        self.pop();
        self.failed = false;
        self.write_shape(lease.conn(), &bytes, shape, started);
        self.lease = Some(lease);
        self.answer_fakes();
        self.resend = true;
        true
    }

    /// The answer to the question in a kept unit.
    pub(super) fn identify_row_reply(&mut self, tag: u8, frame: &[u8]) {
        match tag {
            b'D' => {
                let identity = super::lost::identity_of(frame).flatten();
                if identity.is_none() {
                    warn!("pgwarden's question in a unit got an unreadable answer.");
                }
                if let Some(kept) = self.inflight.as_mut() {
                    kept.identity = identity;
                }
                self.release_sync();
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
    /// doc says. True when it was replayed: the new session holds it, to
    /// be sent.
    pub(super) async fn settle_kept(
        &mut self,
        mut kept: InFlight,
        old: &OldSession,
        fatal: bool,
    ) -> bool {
        kept.goodbye |= fatal;
        match self.fate_of(&kept, old).await {
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
        let guard = kept.shape.guard;
        if kept.forwarded {
            return match guard {
                Guard::ReadOnly => Fate::Fail("08006", LOST_TEXT, ClientErrorKind::ConnectionLost),
                _ => unknown,
            };
        }
        if guard == Guard::Quiet {
            return Fate::Replay(Some(Rule::NeverSent));
        }
        if kept.failed && !kept.refused {
            // Rolled back by its error, which is in hand.
            return Fate::Answer;
        }
        // The server ended the session before the Sync that commits.
        let before_sync = kept.goodbye && kept.pending > 0;
        match (guard, &kept.identity) {
            (Guard::ReadOnly, _) => Fate::Replay(Some(Rule::Read)),
            // The resolution counts its own rule.
            (Guard::Identified, Some(identity)) => {
                match self.wire.executor.resolve_commit(identity, old).await {
                    // Committed, but the replies are not all in hand.
                    Decision::Answer if kept.pending > 0 => unknown,
                    Decision::Answer => Fate::Answer,
                    Decision::Replay => Fate::Replay(None),
                    Decision::AskAgain | Decision::Unknown => unknown,
                }
            }
            // Its Sync never went out.
            (Guard::Identified, None) if !kept.sync_sent => Fate::Replay(Some(Rule::BeforeCommit)),
            _ if before_sync => Fate::Replay(Some(Rule::BeforeCommit)),
            _ => {
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
        kept.failed = false;
        kept.sync_sent = false;
        kept.pending = kept.shape.executes;
        kept.mark = self.outbox.len();
        self.failed = false;
        let (bytes, shape, started) = (kept.bytes.clone(), kept.shape, kept.started);
        self.inflight = Some(kept);
        self.write_shape(lease.conn(), &bytes, shape, started);
        self.lease = Some(lease);
        // Replies pgwarden gives itself (a ParseComplete of a statement
        // the new session holds) go in their turn, as on the first send.
        self.answer_fakes();
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
/// transaction (see [`KEPT`]); `None` otherwise.
fn kind_of(text: &[u8]) -> Option<Kind> {
    let text = std::str::from_utf8(text).ok()?;
    let word = single_statement(text)?;
    if !KEPT.iter().any(|a| a.eq_ignore_ascii_case(word)) {
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
