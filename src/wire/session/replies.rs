//! Server → client: every message the server sends is matched with the
//! client message (or pgwarden's own) it answers, in order.
//!
//! The queue holds one [`Expect`] per message sent that gets a reply,
//! and the replies pgwarden gives itself ([`Fake`]) in their turn, so a
//! ParseComplete pgwarden made up never overtakes the server's answer to
//! an earlier message. Replies to pgwarden's own Parse, Close and
//! settings are not the client's to see. An error to an extended-protocol
//! message makes the server skip everything up to the next Sync; the
//! queue skips the same entries, undoing what they assumed (a statement
//! that was to be prepared is not).

use std::time::Instant;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::warn;

use super::{Session, non_fatal_error};
use crate::wire::messages;

/// What the server owes for one message sent, or what pgwarden answers
/// itself in its turn.
#[derive(Debug)]
pub(super) enum Expect {
    /// A client message whose replies pass through, up to the one that
    /// ends them.
    Reply(Ends),
    /// A client's Sync: its ReadyForQuery ends a unit.
    Sync(Instant),
    /// A client's Query or FunctionCall: everything up to its
    /// ReadyForQuery passes.
    Query(Instant),
    /// A client's Bind of pgwarden's statement `id`.
    Bind(u64),
    /// A Parse of statement `id`: the client's (its name; the reply
    /// passes) or pgwarden's in front of a Bind (the reply is swallowed).
    Parse { id: u64, client: Option<Bytes> },
    /// pgwarden's Close of statement `id`, to make room on the session.
    Close(u64),
    /// pgwarden's own Query (a client's settings): all swallowed, but the
    /// server's reports of the values when `shown` (they replace those a
    /// reset sent the client).
    Own { shown: bool },
    /// pgwarden's question whether a setting differs (see
    /// [`super::pins`]): swallowed; `changed` until it says none does.
    Probe { changed: bool },
    /// pgwarden's question who the transaction is, in front of its COMMIT
    /// (see [`super::lost`]): swallowed but for what it says.
    Identify,
    /// The same question at the end of a unit outside a transaction (see
    /// [`super::replay`]), an Execute: swallowed up to its
    /// CommandComplete but for what it says.
    IdentifyRow,
    /// A message pgwarden sent for the client whose reply the client
    /// must not see (the Parse and Bind a simple Query is sent as, the
    /// Bind of pgwarden's question).
    Hidden(Ends),
    /// The Describe a simple Query is sent with: its RowDescription is the
    /// Query's, its NoData is not.
    Described,
    /// A reply pgwarden gives itself.
    Fake(Fake),
}

/// A reply pgwarden gives in the server's stead.
#[derive(Debug)]
pub(super) enum Fake {
    /// The client's Parse of a statement the session held already.
    ParseComplete { id: u64, client: Bytes },
    /// The client's Close of its statement (the session keeps it).
    CloseComplete,
    /// A `DEALLOCATE` or `DISCARD ALL` answered without the server.
    CommandComplete(&'static str),
    /// The ReadyForQuery of a unit answered without the server.
    Ready(Instant),
}

/// The reply that ends what a client message gets.
#[derive(Clone, Copy, Debug)]
pub(super) enum Ends {
    /// Parse: ParseComplete.
    ParseComplete,
    /// Bind: BindComplete.
    BindComplete,
    /// Describe: RowDescription or NoData.
    Description,
    /// Execute: CommandComplete, EmptyQueryResponse or PortalSuspended.
    Execution,
    /// Close: CloseComplete.
    CloseComplete,
}

impl Expect {
    /// True when a server message of type `tag` is the last this entry
    /// gets (ReadyForQuery and errors are handled apart).
    fn ends_at(&self, tag: u8) -> bool {
        let ends = match self {
            Expect::Reply(ends) | Expect::Hidden(ends) => *ends,
            Expect::Described => Ends::Description,
            Expect::Bind(_) => Ends::BindComplete,
            Expect::Parse { .. } => Ends::ParseComplete,
            Expect::Close(_) => Ends::CloseComplete,
            Expect::Sync(_)
            | Expect::Query(_)
            | Expect::Own { .. }
            | Expect::Probe { .. }
            | Expect::Identify
            | Expect::IdentifyRow
            | Expect::Fake(_) => return false,
        };
        match ends {
            Ends::ParseComplete => tag == b'1',
            Ends::BindComplete => tag == b'2',
            Ends::Description => matches!(tag, b'T' | b'n'),
            Ends::Execution => matches!(tag, b'C' | b'I' | b's'),
            Ends::CloseComplete => tag == b'3',
        }
    }

    /// True when the entry's successful reply, of type `tag`, is
    /// pgwarden's, not the client's.
    fn swallows(&self, tag: u8) -> bool {
        match self {
            Expect::Parse { client: None, .. } | Expect::Close(_) | Expect::Hidden(_) => true,
            Expect::Described => tag == b'n',
            _ => false,
        }
    }

    /// True for the entries that end a unit with a ReadyForQuery.
    pub(super) fn is_unit(&self) -> bool {
        matches!(
            self,
            Expect::Sync(_) | Expect::Query(_) | Expect::Fake(Fake::Ready(_))
        )
    }
}

impl<S> Session<'_, S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// Queues what a message sent (or answered locally) is owed.
    pub(super) fn expect(&mut self, entry: Expect) {
        if entry.is_unit() {
            self.units += 1;
        }
        self.owed.push_back(entry);
    }

    /// Takes the entry at the head of the queue.
    pub(super) fn pop(&mut self) -> Option<Expect> {
        let entry = self.owed.pop_front()?;
        if entry.is_unit() {
            self.units -= 1;
        }
        Some(entry)
    }

    /// Puts a server message where it belongs: in the outbox for the
    /// client, or nowhere (a reply to pgwarden's own message).
    pub(super) fn route(&mut self, tag: u8, frame: &Bytes) {
        let Some(head) = self.owed.front() else {
            self.outbox.extend_from_slice(frame);
            return;
        };
        match *head {
            Expect::Own { shown } => {
                if shown && tag == b'S' {
                    self.outbox.extend_from_slice(frame);
                }
                return self.own_reply(tag, frame);
            }
            Expect::Probe { .. } => return self.probe_reply(tag, frame),
            Expect::Identify => return self.identify_reply(tag, frame),
            Expect::IdentifyRow if tag != b'E' => return self.identify_row_reply(tag, frame),
            _ => {}
        }
        match tag {
            // Asynchronous: a notice, a notification, a parameter change.
            // pgwarden's `SET TRANSACTION READ ONLY` warns that it is not in
            // a transaction block; it applies to the implicit one all the
            // same, and the warning is not the client's.
            b'N' if matches!(head, Expect::Hidden(Ends::Execution)) => {}
            b'N' | b'A' | b'S' => {
                if tag == b'N' {
                    self.notice_seen(frame);
                }
                self.outbox.extend_from_slice(frame);
            }
            b'E' => {
                self.outbox.extend_from_slice(frame);
                self.failed = true;
                self.kept_failed(frame);
                // The server skips to the Sync: one held back goes now.
                self.release_sync();
                self.on_error(frame);
            }
            b'Z' => {
                if self.rerun_refused() {
                    return;
                }
                self.outbox.extend_from_slice(frame);
                self.on_ready(frame.get(5).copied().unwrap_or(b'I'));
            }
            _ => {
                let ends = head.ends_at(tag);
                if !(ends && head.swallows(tag)) {
                    self.outbox.extend_from_slice(frame);
                }
                if ends {
                    if matches!(head, Expect::Reply(Ends::Execution)) {
                        self.kept_executed();
                    }
                    // What it prepared was recorded when sent, so that a
                    // Bind right behind it finds it.
                    self.pop();
                    self.answer_fakes();
                }
            }
        }
    }

    /// A ReadyForQuery ends the unit at the head (entries before it, which
    /// should not be there, are dropped so the queue follows the server).
    fn on_ready(&mut self, status: u8) {
        while let Some(entry) = self.pop() {
            if let Expect::Sync(started) | Expect::Query(started) = entry {
                self.unit_answered(status, Some(started));
                break;
            }
        }
        self.answer_fakes();
    }

    /// An ErrorResponse. Inside a Query or at a Sync it is one of the
    /// replies; to an extended-protocol message it makes the server skip
    /// to the next Sync, and the queue skips along.
    fn on_error(&mut self, frame: &Bytes) {
        let Some(head) = self.owed.front() else {
            return;
        };
        if matches!(head, Expect::Sync(_) | Expect::Query(_)) {
            return;
        }
        if let Expect::Bind(id) = *head
            && error_code(frame) == Some(b"0A000".as_slice())
        {
            // "cached plan must not change result type": the statement is
            // closed and prepared afresh at its next use.
            if let Some(lease) = self.lease.as_mut() {
                lease.conn().prepared().mark_stale(id);
            }
        }
        while let Some(entry) = self.owed.front() {
            if matches!(entry, Expect::Sync(_)) {
                break;
            }
            if let Some(skipped) = self.pop() {
                self.undo(skipped);
            }
        }
    }

    /// A message the server refused or skipped: what it was to leave
    /// behind is not there.
    fn undo(&mut self, entry: Expect) {
        let conn = self.lease.as_mut().map(|lease| lease.conn());
        match entry {
            Expect::Parse { id, client } => {
                if let Some(conn) = conn {
                    conn.prepared().remove(id);
                }
                if let Some(name) = client {
                    self.statements.forget(&name, id);
                }
            }
            Expect::Fake(Fake::ParseComplete { id, client }) => {
                self.statements.forget(&client, id);
            }
            Expect::Close(id) => {
                // Skipped, so still on the server: closed before reuse.
                if let Some(conn) = conn {
                    conn.prepared().mark_stale(id);
                }
            }
            _ => {}
        }
    }

    /// Gives the replies pgwarden makes itself that are due now (those at
    /// the head of the queue).
    pub(super) fn answer_fakes(&mut self) {
        while let Some(Expect::Fake(_)) = self.owed.front() {
            let Some(Expect::Fake(fake)) = self.pop() else {
                break;
            };
            match fake {
                Fake::ParseComplete { .. } => messages::parse_complete(&mut self.outbox),
                Fake::CloseComplete => messages::close_complete(&mut self.outbox),
                Fake::CommandComplete(tag) => messages::command_complete(&mut self.outbox, tag),
                Fake::Ready(started) => {
                    messages::ready_for_query(&mut self.outbox, self.status);
                    self.unit_answered(self.status, Some(started));
                }
            }
        }
    }

    /// A reply to the settings probe: a count of settings that differ.
    fn probe_reply(&mut self, tag: u8, frame: &[u8]) {
        match tag {
            b'D' => {
                let none = frame
                    .get(5..)
                    .is_some_and(|row| row.ends_with(b"\0\0\0\x010"));
                if let Some(Expect::Probe { changed }) = self.owed.front_mut() {
                    *changed = !none;
                }
            }
            b'Z' => {
                if let Some(Expect::Probe { changed }) = self.pop() {
                    self.probe_answered(changed);
                }
                self.detach_if_done();
                self.answer_fakes();
            }
            _ => {}
        }
    }

    /// A reply to pgwarden's own settings statement.
    fn own_reply(&mut self, tag: u8, frame: &[u8]) {
        match tag {
            b'Z' => {
                self.pop();
                self.answer_fakes();
            }
            b'E' => {
                let report = non_fatal_error(frame);
                self.span.in_scope(|| {
                    warn!(
                        error = report.as_deref().unwrap_or("unreadable"),
                        "A client's session settings were refused on a server session."
                    );
                });
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
}

/// The SQLSTATE of an ErrorResponse frame, read in place.
pub(super) fn error_code(frame: &[u8]) -> Option<&[u8]> {
    let mut fields = frame.get(5..)?;
    while let Some((&kind, rest)) = fields.split_first() {
        if kind == 0 {
            return None;
        }
        let end = rest.iter().position(|&b| b == 0)?;
        if kind == b'C' {
            return Some(&rest[..end]);
        }
        fields = &rest[end + 1..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sqlstate_is_read_from_an_error_frame() {
        let mut buf = bytes::BytesMut::new();
        messages::error_response(
            &mut buf,
            "ERROR",
            "0A000",
            "cached plan must not change result type",
        );
        assert_eq!(error_code(&buf), Some(b"0A000".as_slice()));
        assert_eq!(error_code(b"E\0\0\0\x04"), None);
    }

    #[test]
    fn each_entry_ends_at_its_own_reply() {
        assert!(Expect::Reply(Ends::Execution).ends_at(b'C'));
        assert!(!Expect::Reply(Ends::Execution).ends_at(b'D'));
        assert!(Expect::Reply(Ends::Description).ends_at(b'n'));
        assert!(!Expect::Reply(Ends::Description).ends_at(b't'));
        assert!(Expect::Bind(1).ends_at(b'2'));
        assert!(Expect::Close(1).swallows(b'3'));
        assert!(
            !Expect::Parse {
                id: 1,
                client: Some(Bytes::from_static(b"s"))
            }
            .swallows(b'1')
        );
        assert!(Expect::Described.swallows(b'n'));
        assert!(!Expect::Described.swallows(b'T'));
        assert!(!Expect::Sync(Instant::now()).ends_at(b'Z'));
    }
}
