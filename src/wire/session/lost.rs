//! What a client gets when its server session breaks inside a
//! transaction, or under the COMMIT that ends one. The client stays
//! connected in every case.
//!
//! **A transaction lost while open.** The server rolled it back when the
//! session ended. The client is told once, with SQLSTATE 40001
//! (serialization_failure: the code retrying drivers and frameworks take
//! as "run the transaction again") and a ReadyForQuery `E`, as if its
//! transaction had failed. Then, as PostgreSQL does in a failed
//! transaction, pgwarden answers its statements with 25P02, and its
//! ROLLBACK (or COMMIT, tagged ROLLBACK) with the end of the transaction,
//! all without a server session; its next transaction runs on a fresh
//! one (of a new generation when the server went away). A COMMIT that comes
//! before the client was told gets the 40001 itself: a COMMIT answered
//! ROLLBACK is too easy to miss.
//!
//! **A COMMIT in flight.** A COMMIT sent while nothing else of the
//! client's is waiting goes behind a question, in the same write: the
//! transaction's id (NULL when it wrote nothing) and what tells a crash
//! or a failover from a session that failed alone (see
//! [`crate::guard::replay`]). When the session breaks before the COMMIT
//! is answered, the server is asked what became of that id, as for a
//! broken HTTP write: committed → `COMMIT`; provably not → 40001; a
//! transaction that wrote nothing → `COMMIT` (there was nothing to keep);
//! no answer to the question, or a database that cannot tell → 08007.
//!
//! **A pinned session lost.** What pinned the client (a LISTEN, a session
//! advisory lock, a temporary table, a setting of its own...) went with
//! the session. The client is warned at once (a NoticeResponse, which a
//! client idle in LISTEN sees too), and its next unit fails with 08006
//! saying what was lost, so it is never carried on as if it were there.

use std::time::Instant;

use bytes::Bytes;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{info, warn};

use super::Session;
use super::replies::{Ends, Expect, Fake};
use crate::backend::{Connection, TxIdentity};
use crate::guard::exec::OldSession;
use crate::guard::replay::Decision;
use crate::telemetry::labels::{Api, ClientErrorKind, RequestKind, RequestOutcome};
use crate::wire::messages;
use crate::wire::prepared;

/// pgwarden's question in front of a COMMIT (see [`TxIdentity`]). Nothing
/// in it can fail, even on a standby: an error would abort the client's
/// transaction.
pub(super) const IDENTIFY_SQL: &str = "SELECT pg_catalog.txid_current_if_assigned(), \
     pg_catalog.pg_postmaster_start_time()::text, \
     CASE WHEN pg_catalog.pg_is_in_recovery() THEN '' \
     ELSE pg_catalog.substr(pg_catalog.pg_walfile_name(pg_catalog.pg_current_wal_lsn()), 1, 8) END, \
     pg_catalog.pg_stat_get_bgwriter_stat_reset_time()::text";

/// serialization_failure: what retrying clients run again.
const RETRY: &str = "40001";
const LOST_OPEN: &str = "pgwarden: the connection to the database was lost inside the transaction, \
     which was rolled back; run the transaction again";
const LOST_AT_COMMIT: &str = "pgwarden: the connection to the database was lost during COMMIT, \
     and the transaction did not commit; run the transaction again";
const ABORTED: &str = "25P02";
const ABORTED_TEXT: &str =
    "current transaction is aborted, commands ignored until end of transaction block";
/// connection_failure: the session, and the state pinned to it, are gone.
const PIN_LOST: &str = "08006";
/// transaction_resolution_unknown.
const UNKNOWN: &str = "08007";
const UNKNOWN_TEXT: &str = "pgwarden: the connection to the database was lost during COMMIT; \
     the transaction may or may not have committed";

/// How a statement ends a transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum End {
    /// `COMMIT` or `END`.
    Commit,
    /// `ROLLBACK` or `ABORT`.
    Rollback,
}

/// How `sql` ends the transaction, when it is a bare `COMMIT`/`END` or
/// `ROLLBACK`/`ABORT` (with `WORK` or `TRANSACTION`, `AND NO CHAIN`, a
/// semicolon). Anything else (`ROLLBACK TO`, `COMMIT AND CHAIN`,
/// `COMMIT PREPARED`, comments) is not recognised.
pub(super) fn transaction_end(sql: &[u8]) -> Option<End> {
    let text = std::str::from_utf8(sql).ok()?.trim();
    let text = text.strip_suffix(';').unwrap_or(text);
    let words: Vec<String> = text
        .split_ascii_whitespace()
        .map(str::to_ascii_uppercase)
        .collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    let (end, rest) = match words.as_slice() {
        ["COMMIT" | "END", rest @ ..] => (End::Commit, rest),
        ["ROLLBACK" | "ABORT", rest @ ..] => (End::Rollback, rest),
        _ => return None,
    };
    let rest = match rest {
        ["WORK" | "TRANSACTION", rest @ ..] => rest,
        rest => rest,
    };
    matches!(rest, [] | ["AND", "NO", "CHAIN"]).then_some(end)
}

/// A client whose transaction was lost with its session.
#[derive(Debug, Default)]
pub(super) struct Lost {
    /// The client was told (40001).
    told: bool,
    /// Extended-protocol messages are skipped to the Sync after an error.
    skipping: bool,
    /// How the unnamed statement parsed last ends the transaction.
    parsed: Option<End>,
    /// How the portal bound last ends it.
    bound: Option<End>,
    /// The transaction ended: the Sync gets `I`, and the client is done
    /// with its loss.
    ended: bool,
    /// The current unit got an error, and which.
    error: Option<ClientErrorKind>,
}

/// What became of a COMMIT whose session broke.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CommitOutcome {
    Committed,
    RolledBack,
    Unknown,
}

/// A COMMIT sent behind pgwarden's question.
#[derive(Debug)]
pub(super) enum Commit {
    /// The question is not answered yet.
    Asked,
    /// Who the transaction is; `None` when it wrote nothing.
    Known(Option<TxIdentity>),
}

impl<S> Session<'_, S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// True when the unit is a COMMIT of the client's transaction, in
    /// the simple or the extended protocol.
    pub(super) fn commits(&self, bytes: &[u8]) -> bool {
        let mut at = 0;
        let mut executes = false;
        while let Some((tag, len)) = messages::peek_header(&bytes[at..]) {
            let body = &bytes[at + 5..at + len];
            at += len;
            let commits = match tag {
                b'Q' => return at == bytes.len() && query_end(body) == Some(End::Commit),
                b'P' => parse_end(body).is_some_and(|(_, end)| end == Some(End::Commit)),
                b'B' => self.bind_end(body, Some(End::Commit)) == Some(End::Commit),
                b'E' => {
                    executes = true;
                    true
                }
                b'D' | b'S' | b'H' => true,
                _ => false,
            };
            if !commits {
                return false;
            }
        }
        executes
    }

    /// Puts pgwarden's question in front of the client's COMMIT.
    pub(super) fn ask_identity(&mut self, conn: &mut Connection) {
        if frontend::query(IDENTIFY_SQL, conn.passthrough_buf()).is_ok() {
            self.expect(Expect::Identify);
            self.commit = Some(Commit::Asked);
        }
    }

    /// A reply to pgwarden's question: swallowed, but for the row, which
    /// says who the transaction is.
    pub(super) fn identify_reply(&mut self, tag: u8, frame: &[u8]) {
        match tag {
            b'D' => match identity_of(frame) {
                Some(identity) => self.commit = Some(Commit::Known(identity)),
                None => warn!("pgwarden's question before a COMMIT got an unreadable answer."),
            },
            b'E' => {
                let report = super::non_fatal_error(&Bytes::copy_from_slice(frame));
                warn!(
                    error = report.as_deref().unwrap_or("unreadable"),
                    "pgwarden's question before a COMMIT failed; the transaction was rolled back."
                );
            }
            b'N' | b'A' | b'S' => self.outbox.extend_from_slice(frame),
            b'Z' => {
                self.pop();
                self.answer_fakes();
            }
            _ => {}
        }
    }

    /// The session broke with a COMMIT of the client's waiting: the unit
    /// at the head of `owed` gets what became of it, once the server has
    /// said; the units behind it get 08007.
    pub(super) async fn answer_commit(
        &mut self,
        commit: Commit,
        old: &OldSession,
        owed: Vec<Expect>,
        waiting: usize,
    ) {
        let outcome = match commit {
            Commit::Asked => CommitOutcome::Unknown,
            Commit::Known(None) => CommitOutcome::Committed,
            Commit::Known(Some(identity)) => {
                match self.wire.executor.resolve_commit(&identity, old).await {
                    Decision::Answer => CommitOutcome::Committed,
                    Decision::Replay => CommitOutcome::RolledBack,
                    Decision::AskAgain | Decision::Unknown => CommitOutcome::Unknown,
                }
            }
        };
        info!(outcome = ?outcome, "A client's COMMIT in flight when its session broke was resolved.");
        let started = owed.iter().find_map(|entry| match entry {
            Expect::Sync(started) | Expect::Query(started) => Some(*started),
            _ => None,
        });
        let (result, kind) = match outcome {
            CommitOutcome::Committed => {
                self.answer_committed(owed);
                (RequestOutcome::Ok, None)
            }
            CommitOutcome::RolledBack => {
                let out = &mut self.outbox;
                messages::error_response(out, "ERROR", RETRY, LOST_AT_COMMIT);
                messages::ready_for_query(out, b'I');
                (
                    RequestOutcome::ConnectionLost,
                    Some(ClientErrorKind::ConnectionLost),
                )
            }
            CommitOutcome::Unknown => {
                let out = &mut self.outbox;
                messages::error_response(out, "ERROR", UNKNOWN, UNKNOWN_TEXT);
                messages::ready_for_query(out, b'I');
                (
                    RequestOutcome::ResolutionUnknown,
                    Some(ClientErrorKind::ResolutionUnknown),
                )
            }
        };
        self.status = b'I';
        if let Some(kind) = kind {
            self.wire.metrics.client_error(kind);
        }
        let took = started.map(|s| s.elapsed()).unwrap_or_default();
        self.wire
            .metrics
            .request(Api::Pgwire, RequestKind::Query, result, took);
        if waiting > 1 {
            let kind = ClientErrorKind::ResolutionUnknown;
            let text = "pgwarden: the connection to the database was lost while the statement ran; it may or may not have been applied";
            let _ = self.answer_locally(waiting - 1, UNKNOWN, text, kind);
        }
    }

    /// The replies of a COMMIT unit that committed, as the server would
    /// have sent what it had not yet.
    fn answer_committed(&mut self, owed: Vec<Expect>) {
        let out = &mut self.outbox;
        for entry in owed {
            match entry {
                Expect::Reply(Ends::ParseComplete)
                | Expect::Parse {
                    client: Some(_), ..
                }
                | Expect::Fake(Fake::ParseComplete { .. }) => messages::parse_complete(out),
                Expect::Reply(Ends::BindComplete) | Expect::Bind(_) => messages::bind_complete(out),
                Expect::Reply(Ends::Description) => messages::no_data(out),
                Expect::Reply(Ends::Execution) => messages::command_complete(out, "COMMIT"),
                Expect::Reply(Ends::CloseComplete) | Expect::Fake(Fake::CloseComplete) => {
                    messages::close_complete(out)
                }
                Expect::Fake(Fake::CommandComplete(tag)) => messages::command_complete(out, tag),
                Expect::Query(_) => {
                    messages::command_complete(out, "COMMIT");
                    messages::ready_for_query(out, b'I');
                    return;
                }
                Expect::Sync(_) | Expect::Fake(Fake::Ready(_)) => {
                    messages::ready_for_query(out, b'I');
                    return;
                }
                Expect::Parse { client: None, .. }
                | Expect::Close(_)
                | Expect::Own { .. }
                | Expect::Probe { .. }
                | Expect::Identify
                | Expect::IdentifyRow
                | Expect::Hidden(_) => {}
                Expect::Described => messages::no_data(out),
            }
        }
    }

    /// The session the client was pinned to (for `reason`) broke outside a
    /// transaction: the client is warned now, and its next unit is refused
    /// unless a unit of its was waiting and got the error already.
    pub(super) fn lose_pin(&mut self, reason: &str, waiting: usize) {
        let again = if reason == "LISTEN" {
            "; LISTEN again to receive notifications"
        } else {
            ""
        };
        let text = format!(
            "pgwarden: the database session this connection was pinned to ({reason}) was lost, \
             and that state with it{again}"
        );
        messages::notice_response(&mut self.outbox, "WARNING", PIN_LOST, &text);
        if waiting == 0 {
            self.pin_lost = Some(text);
        }
    }

    /// Refuses the first unit after a pinned session was lost (see
    /// [`Session::lose_pin`]); true when it did.
    pub(super) fn refuse_after_lost_pin(&mut self, answers: usize) -> bool {
        let Some(text) = self.pin_lost.take() else {
            return false;
        };
        messages::error_response(&mut self.outbox, "ERROR", PIN_LOST, &text);
        self.wire
            .metrics
            .client_error(ClientErrorKind::ConnectionLost);
        if answers == 0 {
            // Answered at its Sync, as PostgreSQL answers after an error.
            self.skipping_to_sync = true;
        } else {
            messages::ready_for_query(&mut self.outbox, b'I');
            let took = std::time::Duration::ZERO;
            let outcome = RequestOutcome::ConnectionLost;
            self.wire
                .metrics
                .request(Api::Pgwire, RequestKind::Query, outcome, took);
        }
        true
    }

    /// The session broke inside the client's transaction: each unit still
    /// waiting is refused (the first with 40001), and what the client
    /// sends next is answered as in a failed transaction.
    pub(super) fn lose_transaction(&mut self, waiting: usize) {
        let mut lost = Lost::default();
        for _ in 0..waiting {
            self.refuse(&mut lost);
            messages::ready_for_query(&mut self.outbox, b'E');
            self.count_lost_unit(&mut lost, None);
            self.status = b'E';
        }
        self.lost = Some(lost);
    }

    /// Answers a unit of a client whose transaction was lost, without a
    /// server session (see the module doc).
    pub(super) fn answer_lost(&mut self, bytes: &[u8], started: Instant) {
        let Some(mut lost) = self.lost.take() else {
            return;
        };
        let mut at = 0;
        while let Some((tag, len)) = messages::peek_header(&bytes[at..]) {
            let body = &bytes[at + 5..at + len];
            at += len;
            if lost.skipping && tag != b'S' {
                continue;
            }
            match tag {
                b'Q' => {
                    self.end_with(&mut lost, query_end(body));
                    self.ready_lost(&mut lost, started);
                }
                b'P' => match parse_end(body) {
                    Some((name, Some(end))) => {
                        if !name.is_empty() {
                            let statement = self.wire.statements.statement(&body[name.len() + 1..]);
                            self.statements.insert(name, statement);
                        }
                        lost.parsed = Some(end);
                        messages::parse_complete(&mut self.outbox);
                    }
                    _ => self.refuse(&mut lost),
                },
                b'B' => match self.bind_end(body, lost.parsed) {
                    Some(end) => {
                        lost.bound = Some(end);
                        messages::bind_complete(&mut self.outbox);
                    }
                    None => self.refuse(&mut lost),
                },
                b'D' => {
                    if body.first() == Some(&b'S') {
                        messages::no_parameters(&mut self.outbox);
                    }
                    messages::no_data(&mut self.outbox);
                }
                b'E' => match lost.bound.take() {
                    Some(end) => self.end_with(&mut lost, Some(end)),
                    None => self.refuse(&mut lost),
                },
                b'C' => {
                    if let Some(name) = super::forward::statement_name(body) {
                        self.statements.remove(name);
                    }
                    messages::close_complete(&mut self.outbox);
                }
                b'S' => self.ready_lost(&mut lost, started),
                b'F' => {
                    self.refuse(&mut lost);
                    self.ready_lost(&mut lost, started);
                }
                _ => {}
            }
        }
        // Over once a ReadyForQuery said the transaction ended.
        if !(lost.ended && self.status == b'I') {
            self.lost = Some(lost);
        }
    }

    /// A statement that ends the transaction (or not) in the lost state.
    fn end_with(&mut self, lost: &mut Lost, end: Option<End>) {
        match end {
            Some(End::Rollback) => {
                messages::command_complete(&mut self.outbox, "ROLLBACK");
                lost.ended = true;
            }
            // As PostgreSQL answers a COMMIT of a failed transaction; one
            // the client was never told of gets the error instead.
            Some(End::Commit) if lost.told => {
                messages::command_complete(&mut self.outbox, "ROLLBACK");
                lost.ended = true;
            }
            Some(End::Commit) => {
                self.refuse(lost);
                lost.ended = true;
            }
            None => self.refuse(lost),
        }
    }

    /// The error of a statement in the lost state: the loss itself the
    /// first time, 25P02 after.
    fn refuse(&mut self, lost: &mut Lost) {
        let (code, text, kind) = if lost.told {
            (ABORTED, ABORTED_TEXT, ClientErrorKind::Sql)
        } else {
            (RETRY, LOST_OPEN, ClientErrorKind::ConnectionLost)
        };
        messages::error_response(&mut self.outbox, "ERROR", code, text);
        self.wire.metrics.client_error(kind);
        lost.told = true;
        lost.skipping = true;
        lost.error = Some(kind);
    }

    /// The ReadyForQuery of a unit in the lost state.
    fn ready_lost(&mut self, lost: &mut Lost, started: Instant) {
        self.status = if lost.ended { b'I' } else { b'E' };
        messages::ready_for_query(&mut self.outbox, self.status);
        lost.skipping = false;
        lost.parsed = None;
        lost.bound = None;
        self.count_lost_unit(lost, Some(started));
    }

    fn count_lost_unit(&mut self, lost: &mut Lost, started: Option<Instant>) {
        let outcome = match lost.error.take() {
            None => RequestOutcome::Ok,
            Some(ClientErrorKind::ConnectionLost) => RequestOutcome::ConnectionLost,
            Some(_) => RequestOutcome::SqlError,
        };
        let took = started.map(|s| s.elapsed()).unwrap_or_default();
        self.wire
            .metrics
            .request(Api::Pgwire, RequestKind::Query, outcome, took);
    }

    /// How the statement a Bind names ends the transaction: a client's
    /// named statement by its text, the unnamed one as `unnamed` says.
    fn bind_end(&self, body: &[u8], unnamed: Option<End>) -> Option<End> {
        let (_, rest) = prepared::split_cstr(body)?;
        let (name, _) = prepared::split_cstr(rest)?;
        if name.is_empty() {
            return unnamed;
        }
        transaction_end(self.statements.get(name)?.text())
    }
}

/// How a Query message's text ends the transaction.
fn query_end(body: &[u8]) -> Option<End> {
    prepared::split_cstr(body).and_then(|(text, _)| transaction_end(text))
}

/// A Parse message's statement name and how its text ends the
/// transaction.
fn parse_end(body: &[u8]) -> Option<(&[u8], Option<End>)> {
    let (name, rest) = prepared::split_cstr(body)?;
    let (text, _) = prepared::split_cstr(rest)?;
    Some((name, transaction_end(text)))
}

/// The transaction's identity from the DataRow answering
/// [`IDENTIFY_SQL`]; `Some(None)` when it wrote nothing.
pub(super) fn identity_of(frame: &[u8]) -> Option<Option<TxIdentity>> {
    let mut body = frame.get(5..)?;
    let count = i16::from_be_bytes(body.get(..2)?.try_into().ok()?);
    body = &body[2..];
    let mut columns = Vec::with_capacity(4);
    for _ in 0..count {
        let len = i32::from_be_bytes(body.get(..4)?.try_into().ok()?);
        body = &body[4..];
        if len < 0 {
            columns.push(None);
            continue;
        }
        let value = body.get(..len as usize)?;
        columns.push(Some(std::str::from_utf8(value).ok()?.to_owned()));
        body = &body[len as usize..];
    }
    let [xid, started, timeline, stats_reset] = <[Option<String>; 4]>::try_from(columns).ok()?;
    let Some(xid) = xid else {
        return Some(None);
    };
    Some(Some(TxIdentity {
        xid: xid.parse().ok()?,
        server_started: started?,
        timeline: timeline?,
        stats_reset,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ends_of_a_transaction_are_recognised_as_clients_write_them() {
        let cases: &[(&str, Option<End>)] = &[
            ("COMMIT", Some(End::Commit)),
            ("commit;", Some(End::Commit)),
            ("  End Transaction ; ", Some(End::Commit)),
            ("COMMIT WORK AND NO CHAIN", Some(End::Commit)),
            ("ROLLBACK", Some(End::Rollback)),
            ("abort work", Some(End::Rollback)),
            ("ROLLBACK TO SAVEPOINT a", None),
            ("ROLLBACK TO a", None),
            ("COMMIT AND CHAIN", None),
            ("COMMIT PREPARED 'x'", None),
            ("SELECT 1", None),
            ("", None),
        ];
        for (sql, end) in cases {
            assert_eq!(transaction_end(sql.as_bytes()), *end, "{sql:?}");
        }
    }

    fn data_row(columns: &[Option<&str>]) -> Vec<u8> {
        let mut body = (columns.len() as i16).to_be_bytes().to_vec();
        for column in columns {
            match column {
                Some(value) => {
                    body.extend((value.len() as i32).to_be_bytes());
                    body.extend(value.as_bytes());
                }
                None => body.extend((-1i32).to_be_bytes()),
            }
        }
        let mut frame = vec![b'D'];
        frame.extend(((body.len() + 4) as i32).to_be_bytes());
        frame.extend(body);
        frame
    }

    #[test]
    fn the_answer_to_the_question_says_who_the_transaction_is() {
        let row = data_row(&[Some("742"), Some("2026-01-01"), Some("00000001"), None]);
        let identity = identity_of(&row).unwrap().unwrap();
        assert_eq!(identity.xid, 742);
        assert_eq!(identity.timeline, "00000001");
        assert_eq!(identity.stats_reset, None);
        let read_only = data_row(&[None, Some("2026-01-01"), Some("00000001"), Some("t")]);
        assert_eq!(identity_of(&read_only), Some(None));
        assert_eq!(identity_of(&data_row(&[Some("1")])), None);
        assert_eq!(identity_of(b"D\0\0\0\x06\0\x04"), None);
    }
}
