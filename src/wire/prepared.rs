//! Named prepared statements in transaction pooling.
//!
//! Drivers prepare statements by name (Parse `s1`, then Bind `s1` for
//! each use) and expect them to live as long as their connection. Under
//! transaction pooling the next Bind may go to another server session, or
//! to a session of a new generation after a restart, where `s1` was never
//! prepared. So a client's names never reach the server:
//!
//! - a statement is known by its text and parameter types; every distinct
//!   one gets a pgwarden-wide name (`pgwarden_<id>`), shared by all the
//!   clients that prepare the same text ([`Registry`]);
//! - each client maps its own names to those statements
//!   ([`ClientStatements`]); a Bind or Describe of `s1` is rewritten to the
//!   statement's name;
//! - each server session remembers which statements it holds (a bounded
//!   [`PreparedSet`](crate::backend::statements::PreparedSet), least
//!   recently used out with a Close); a statement the session lacks is
//!   prepared there by a Parse pgwarden sends in front of the client's
//!   Bind, whose ParseComplete the client never sees;
//! - a client's Parse of a statement the session already holds is not
//!   sent; its ParseComplete is pgwarden's, as is the CloseComplete of a
//!   client's Close (the statement stays for the session's other users),
//!   and `DEALLOCATE` / `DISCARD ALL` outside a pinned session are
//!   answered the same way.
//!
//! This is PgBouncer's model (since 1.21) and PgDog's, with one thing
//! neither has: a session of a new generation is just a session that
//! lacks the statement, so a restart costs the client nothing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use bytes::{BufMut, Bytes, BytesMut};

/// Every statement name pgwarden gives starts so; a client's own name
/// with this prefix is never sent as it is (it could name another
/// client's statement).
pub const NAME_PREFIX: &str = "pgwarden_";

/// One distinct statement: its text and parameter types, and the name it
/// has on every server session.
#[derive(Debug)]
pub struct Statement {
    /// pgwarden-wide, never reused for another text.
    pub id: u64,
    /// `pgwarden_<id>` and its terminating NUL, as a message carries it.
    name: Bytes,
    /// The Parse message after its name: the query, its NUL, and the
    /// parameter types.
    body: Bytes,
}

impl Statement {
    /// The statement's query text.
    pub fn text(&self) -> &[u8] {
        split_cstr(&self.body).map_or(&[], |(text, _)| text)
    }

    /// Appends a Parse message that prepares this statement.
    pub fn encode_parse(&self, buf: &mut BytesMut) {
        message(buf, b'P', &[&self.name, &self.body]);
    }

    /// Appends a Parse message that tries to prepare `body` under this
    /// statement's name (which the session holds: the server refuses it
    /// as PostgreSQL refuses a name in use).
    pub fn encode_parse_of(&self, body: &[u8], buf: &mut BytesMut) {
        message(buf, b'P', &[&self.name, body]);
    }

    /// Appends a Close message for this statement.
    pub fn encode_close(&self, buf: &mut BytesMut) {
        encode_close_named(&self.name, buf);
    }

    /// Appends the client's Bind (`portal`, then what follows the
    /// statement's name) with this statement's name.
    pub fn encode_bind(&self, portal: &[u8], rest: &[u8], buf: &mut BytesMut) {
        message(buf, b'B', &[portal, &self.name, rest]);
    }

    /// Appends a Describe of this statement.
    pub fn encode_describe(&self, buf: &mut BytesMut) {
        message(buf, b'D', &[b"S", &self.name]);
    }
}

/// Appends a Close of pgwarden's statement `id`.
pub fn encode_close_id(id: u64, buf: &mut BytesMut) {
    encode_close_named(format!("{NAME_PREFIX}{id}\0").as_bytes(), buf);
}

/// Appends a Close of the statement named `name` (NUL included).
fn encode_close_named(name: &[u8], buf: &mut BytesMut) {
    message(buf, b'C', &[b"S", name]);
}

/// Appends a message of `tag` whose body is `parts` in a row.
pub fn message(buf: &mut BytesMut, tag: u8, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    buf.reserve(5 + len);
    buf.put_u8(tag);
    buf.put_u32((len + 4) as u32);
    for part in parts {
        buf.put_slice(part);
    }
}

/// The statements of every client, by text and parameter types. Entries
/// live while a client maps a name to them.
#[derive(Debug, Default)]
pub struct Registry {
    inner: Mutex<RegistryInner>,
}

#[derive(Debug, Default)]
struct RegistryInner {
    by_body: HashMap<Bytes, Weak<Statement>>,
    next_id: u64,
    /// Entries at the last sweep of dead ones; the next sweep runs when
    /// the map has doubled.
    swept_at: usize,
}

/// Entries below which the registry is never swept.
const MIN_SWEEP: usize = 1024;

impl Registry {
    /// The statement for a Parse `body` (query, NUL, parameter types),
    /// the same one for every client that prepares the same.
    pub fn statement(&self, body: &[u8]) -> Arc<Statement> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(live) = inner.by_body.get(body).and_then(Weak::upgrade) {
            return live;
        }
        inner.next_id += 1;
        let id = inner.next_id;
        let body = Bytes::copy_from_slice(body);
        let statement = Arc::new(Statement {
            id,
            name: Bytes::from(format!("{NAME_PREFIX}{id}\0")),
            body: body.clone(),
        });
        inner.by_body.insert(body, Arc::downgrade(&statement));
        if inner.by_body.len() >= (2 * inner.swept_at).max(MIN_SWEEP) {
            inner.by_body.retain(|_, s| s.strong_count() > 0);
            inner.swept_at = inner.by_body.len();
        }
        statement
    }

    /// Distinct statements some client holds now.
    #[cfg(test)]
    fn live(&self) -> usize {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner
            .by_body
            .values()
            .filter(|s| s.strong_count() > 0)
            .count()
    }
}

/// One client's statement names.
#[derive(Debug, Default)]
pub struct ClientStatements {
    by_name: HashMap<Bytes, Arc<Statement>>,
}

impl ClientStatements {
    /// The statement the client named `name` (without NUL).
    pub fn get(&self, name: &[u8]) -> Option<&Arc<Statement>> {
        self.by_name.get(name)
    }

    /// Names `statement` `name` for the client.
    pub fn insert(&mut self, name: &[u8], statement: Arc<Statement>) {
        self.by_name.insert(Bytes::copy_from_slice(name), statement);
    }

    /// Drops the client's name `name`.
    pub fn remove(&mut self, name: &[u8]) -> Option<Arc<Statement>> {
        self.by_name.remove(name)
    }

    /// Drops `name` if it still names statement `id` (a Parse that failed
    /// or never ran).
    pub fn forget(&mut self, name: &[u8], id: u64) {
        if self.by_name.get(name).is_some_and(|s| s.id == id) {
            self.by_name.remove(name);
        }
    }

    /// Drops every name.
    pub fn clear(&mut self) {
        self.by_name.clear();
    }
}

/// The first NUL-terminated string of `body` and what follows its NUL.
pub fn split_cstr(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = body.iter().position(|&b| b == 0)?;
    Some((&body[..end], &body[end + 1..]))
}

/// Appends the client's Bind as it is except for a statement name no
/// session may resolve to another client's statement: a name pgwarden's
/// own could be is changed to one no statement has, so the server
/// answers 26000 as it would have.
pub fn encode_unknown_bind(portal: &[u8], name: &[u8], rest: &[u8], buf: &mut BytesMut) {
    let safe: &[u8] = if name.starts_with(NAME_PREFIX.as_bytes()) {
        b"pgwarden_unknown_statement\0"
    } else {
        &[]
    };
    if safe.is_empty() {
        message(buf, b'B', &[portal, name, b"\0", rest]);
    } else {
        message(buf, b'B', &[portal, safe, rest]);
    }
}

/// Appends the client's Describe of a statement it never prepared, made
/// safe as in [`encode_unknown_bind`].
pub fn encode_unknown_describe(name: &[u8], buf: &mut BytesMut) {
    if name.starts_with(NAME_PREFIX.as_bytes()) {
        message(buf, b'D', &[b"S", b"pgwarden_unknown_statement\0"]);
    } else {
        message(buf, b'D', &[b"S", name, b"\0"]);
    }
}

/// A simple Query pgwarden may answer itself.
#[derive(Debug, PartialEq, Eq)]
pub enum LocalQuery {
    /// `DEALLOCATE [PREPARE] ALL`.
    DeallocateAll,
    /// `DEALLOCATE [PREPARE] name`, the name as the server would read it.
    Deallocate(Vec<u8>),
    /// `DISCARD ALL`.
    DiscardAll,
}

impl LocalQuery {
    /// The CommandComplete tag PostgreSQL answers it with.
    pub fn tag(&self) -> &'static str {
        match self {
            LocalQuery::DeallocateAll => "DEALLOCATE ALL",
            LocalQuery::Deallocate(_) => "DEALLOCATE",
            LocalQuery::DiscardAll => "DISCARD ALL",
        }
    }
}

/// Reads a Query body (SQL and its NUL) as one of the statements
/// pgwarden may answer itself: a single statement, no comments.
pub fn local_query(body: &[u8]) -> Option<LocalQuery> {
    let first = *body.iter().find(|b| !b.is_ascii_whitespace())?;
    if !matches!(first, b'd' | b'D') {
        return None;
    }
    let sql = std::str::from_utf8(split_cstr(body)?.0).ok()?;
    let sql = sql.trim().trim_end_matches(';').trim_end();
    let (word, rest) = next_word(sql);
    if word.eq_ignore_ascii_case("DISCARD") {
        let (what, rest) = next_word(rest);
        return (what.eq_ignore_ascii_case("ALL") && rest.is_empty())
            .then_some(LocalQuery::DiscardAll);
    }
    if !word.eq_ignore_ascii_case("DEALLOCATE") {
        return None;
    }
    let (mut name, mut rest) = next_word(rest);
    if name.eq_ignore_ascii_case("PREPARE") && !rest.is_empty() {
        (name, rest) = next_word(rest);
    }
    if !rest.is_empty() || name.is_empty() {
        return None;
    }
    if name.eq_ignore_ascii_case("ALL") {
        return Some(LocalQuery::DeallocateAll);
    }
    identifier(name).map(LocalQuery::Deallocate)
}

/// The next word (up to whitespace; a quoted identifier whole) and the
/// rest, trimmed.
fn next_word(text: &str) -> (&str, &str) {
    let text = text.trim_start();
    let end = if text.starts_with('"') {
        quoted_end(text).unwrap_or(text.len())
    } else {
        text.find(|c: char| c.is_whitespace()).unwrap_or(text.len())
    };
    (&text[..end], text[end..].trim_start())
}

/// Where a quoted identifier at the start of `text` ends.
fn quoted_end(text: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    let mut at = 1;
    while at < bytes.len() {
        if bytes[at] == b'"' {
            if bytes.get(at + 1) == Some(&b'"') {
                at += 2;
                continue;
            }
            return Some(at + 1);
        }
        at += 1;
    }
    None
}

/// A statement name as the server reads it: a quoted identifier as
/// written (doubled quotes halved), anything else folded to lower case;
/// `None` for what is not a plain identifier.
fn identifier(word: &str) -> Option<Vec<u8>> {
    if let Some(inner) = word.strip_prefix('"') {
        let inner = inner.strip_suffix('"')?;
        return Some(inner.replace("\"\"", "\"").into_bytes());
    }
    let plain = word
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$');
    plain.then(|| word.to_ascii_lowercase().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(sql: &str) -> Vec<u8> {
        format!("{sql}\0").into_bytes()
    }

    #[test]
    fn the_same_text_is_the_same_statement_for_every_client() {
        let registry = Registry::default();
        let a = registry.statement(b"SELECT 1\0\0\0");
        let b = registry.statement(b"SELECT 1\0\0\0");
        let other_types = registry.statement(b"SELECT 1\0\0\x01\0\0\0\x17");
        assert_eq!(a.id, b.id);
        assert_ne!(a.id, other_types.id);
        assert_eq!(&a.name[..], format!("pgwarden_{}\0", a.id).as_bytes());
        drop((a, b));
        let again = registry.statement(b"SELECT 1\0\0\0");
        assert_ne!(again.id, other_types.id, "a new id, never a reused one");
        assert_eq!(registry.live(), 2);
    }

    #[test]
    fn a_bind_is_rewritten_to_the_statement_name() {
        let registry = Registry::default();
        let statement = registry.statement(b"SELECT $1\0\0\0");
        let mut buf = BytesMut::new();
        statement.encode_bind(b"\0", b"\0\0\0\0\0\0", &mut buf);
        let name = format!("pgwarden_{}\0", statement.id);
        let mut expected = vec![b'B'];
        let len = 4 + 1 + name.len() + 6;
        expected.extend_from_slice(&(len as u32).to_be_bytes());
        expected.push(0);
        expected.extend_from_slice(name.as_bytes());
        expected.extend_from_slice(&[0; 6]);
        assert_eq!(&buf[..], &expected[..]);
    }

    #[test]
    fn a_client_name_like_pgwardens_never_reaches_another_clients_statement() {
        let mut buf = BytesMut::new();
        encode_unknown_bind(b"\0", b"pgwarden_1", b"\0\0\0\0\0\0", &mut buf);
        assert!(buf.windows(26).any(|w| w == b"pgwarden_unknown_statement"));
        buf.clear();
        encode_unknown_bind(b"\0", b"s1", b"\0\0\0\0\0\0", &mut buf);
        assert!(buf.windows(3).any(|w| w == b"s1\0"));
    }

    #[test]
    fn deallocate_and_discard_all_are_recognised_as_the_server_reads_them() {
        let read = |sql: &str| local_query(&body(sql));
        assert_eq!(read("DEALLOCATE ALL"), Some(LocalQuery::DeallocateAll));
        assert_eq!(
            read("deallocate prepare all;"),
            Some(LocalQuery::DeallocateAll)
        );
        assert_eq!(read(" DISCARD ALL "), Some(LocalQuery::DiscardAll));
        assert_eq!(
            read("DEALLOCATE pdo_stmt_00000001"),
            Some(LocalQuery::Deallocate(b"pdo_stmt_00000001".to_vec()))
        );
        assert_eq!(
            read("DEALLOCATE S_1"),
            Some(LocalQuery::Deallocate(b"s_1".to_vec()))
        );
        assert_eq!(
            read("DEALLOCATE PREPARE \"S \"\"1\""),
            Some(LocalQuery::Deallocate(b"S \"1".to_vec()))
        );
        assert_eq!(
            read("DEALLOCATE prepare"),
            Some(LocalQuery::Deallocate(b"prepare".to_vec()))
        );
        for other in [
            "DISCARD PLANS",
            "DEALLOCATE a; SELECT 1",
            "DELETE FROM t",
            "SELECT 1",
            "DEALLOCATE",
        ] {
            assert_eq!(read(other), None, "{other}");
        }
    }
}
