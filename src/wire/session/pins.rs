//! What keeps a wire client on its server session, and what lets it go.
//!
//! State the server keeps per session and pgwarden cannot carry to
//! another one pins the client to its session: `LISTEN`, SQL `PREPARE`, a
//! cursor, a temporary table, a session advisory lock. Those are read off
//! the statements' first words and calls, without a parser.
//!
//! Session settings are different: they can be undone, and drivers undo
//! them. asyncpg turns `jit` off around its type lookups and back on after,
//! and resets every setting (`RESET ALL`) when its pool takes a connection
//! back. So a `SET`, `RESET` or `set_config` of a setting the client's
//! startup did not name holds the client only while it lasts: after the
//! unit, with the client outside a transaction, pgwarden asks the server
//! whether any setting of the session differs from its default but those
//! of the client's startup; if none does, the session is shared again. A
//! `RESET` also undoes the client's startup settings, so they are set
//! again. Changing a setting of the client's startup pins for good (its
//! new value is the client's now, and only this session has it).

use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use super::Session;
use super::replies::Expect;
use crate::wire::messages::WireError;

/// Why a client stays on its session, from one of its messages.
pub(super) struct Pin {
    reason: &'static str,
    /// The message resets settings, the client's startup ones included.
    reset: bool,
}

/// The pin of a session setting, which the probe may lift.
pub(super) const SESSION_SETTING: &str = "a session setting";

/// The pin of a setting the client's startup named, changed since.
const STARTUP_SETTING: &str = "a changed startup setting";

impl<S> Session<'_, S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// What a client message leaves on the session that keeps the client
    /// there, if anything (nothing new once a lasting pin holds it).
    pub(super) fn pin_of(&self, tag: u8, body: &[u8]) -> Option<Pin> {
        if self.pinned.is_some_and(|reason| reason != SESSION_SETTING) {
            return None;
        }
        let reason = pin_reason(tag, body)?;
        if reason != SESSION_SETTING {
            return Some(Pin {
                reason,
                reset: false,
            });
        }
        let text = statement_text(tag, body).unwrap_or_default();
        let startup = self
            .client
            .settings
            .iter()
            .any(|(name, _)| contains_ignoring_case(text, name));
        if startup {
            return Some(Pin {
                reason: STARTUP_SETTING,
                reset: false,
            });
        }
        let reset = contains_ignoring_case(text, "RESET");
        Some(Pin { reason, reset })
    }

    /// Keeps the client on its session for `pin`.
    pub(super) fn pin(&mut self, pin: Pin) {
        self.pinned = Some(pin.reason);
        if pin.reason == SESSION_SETTING {
            self.settings_touched = true;
            self.reapply_settings |= pin.reset;
        }
    }

    /// Asks the server, after a unit that touched settings, whether the
    /// session may be shared again (see the module doc); the answer comes
    /// as a reply like any other.
    pub(super) async fn probe_settings(&mut self) -> Result<(), WireError> {
        if !std::mem::take(&mut self.probe_due) {
            return Ok(());
        }
        let Some(mut lease) = self.lease.take() else {
            return Ok(());
        };
        self.settings_touched = false;
        let conn = lease.conn();
        if std::mem::take(&mut self.reapply_settings) {
            conn.set_client_settings(Vec::new());
            self.carry_settings(conn, true);
        }
        let sql = probe_sql(&self.client.settings);
        if frontend::query(&sql, conn.passthrough_buf()).is_ok() {
            self.expect(Expect::Probe { changed: true });
        }
        self.lease = Some(lease);
        self.send().await
    }

    /// The probe's answer: the session is shared again when no setting
    /// differs.
    pub(super) fn probe_answered(&mut self, changed: bool) {
        if changed {
            self.span.in_scope(|| {
                debug!(
                    "A wire client keeps its session: a setting of its differs from the default."
                );
            });
            return;
        }
        if self.pinned == Some(SESSION_SETTING) {
            self.pinned = None;
        }
    }
}

/// The probe: how many settings of the session differ from their
/// defaults, but those the client's startup set (names are checked at
/// startup: letters, digits, `_` and `.` only).
fn probe_sql(startup: &[(String, String)]) -> String {
    let names: Vec<String> = startup
        .iter()
        .map(|(name, _)| format!("'{}'", name.replace('\'', "''")))
        .collect();
    let mut sql = String::from(
        "SELECT count(*) FROM pg_catalog.pg_settings \
         WHERE source = 'session' AND setting IS DISTINCT FROM reset_val",
    );
    if !names.is_empty() {
        sql.push_str(&format!(
            " AND lower(name) <> ALL (ARRAY[{}])",
            names.join(", ")
        ));
    }
    sql
}

/// Why a client message makes its session impossible to share, if it
/// does: state the server keeps per session and pgwarden cannot move.
/// Of several statements, one whose state stays wins over a setting,
/// whose state may be undone.
pub(super) fn pin_reason(tag: u8, body: &[u8]) -> Option<&'static str> {
    let sql = statement_text(tag, body)?;
    sql.split(';')
        .filter_map(statement_pins)
        .max_by_key(|reason| *reason != SESSION_SETTING)
}

/// The SQL of a Query or Parse.
fn statement_text(tag: u8, body: &[u8]) -> Option<&str> {
    let sql = match tag {
        b'P' => crate::wire::prepared::split_cstr(body)?.1,
        b'Q' => body,
        _ => return None,
    };
    std::str::from_utf8(sql.split(|&b| b == 0).next()?).ok()
}

/// Statements whose first word leaves session state behind.
const PINNING_STATEMENTS: [(&str, &str); 6] = [
    ("SET", SESSION_SETTING),
    ("RESET", SESSION_SETTING),
    ("LISTEN", "LISTEN"),
    ("PREPARE", "an SQL prepared statement"),
    ("DECLARE", "a cursor"),
    ("LOAD", "a loaded library"),
];

/// Calls anywhere in a statement that leave session state behind.
const PINNING_CALLS: [(&str, &str); 2] = [
    ("pg_advisory_lock", "a session advisory lock"),
    ("set_config", SESSION_SETTING),
];

/// The session state one statement leaves behind, if any. Runs on every
/// Query and Parse, so it allocates nothing and reads the statement once
/// at most (not at all past its first two words when it calls nothing).
fn statement_pins(statement: &str) -> Option<&'static str> {
    let (first, rest) = word(statement.as_bytes());
    let (second, _) = word(rest);
    let is = |word: &[u8], keyword: &str| word.eq_ignore_ascii_case(keyword.as_bytes());
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
        let calls = statement.as_bytes().contains(&b'(');
        PINNING_CALLS
            .iter()
            .find(|(call, _)| calls && contains_call(statement, call))
    };
    by_statement.or_else(by_call).map(|(_, reason)| *reason)
}

/// The first word of `text` (letters, digits, `_`) and what follows it.
fn word(text: &[u8]) -> (&[u8], &[u8]) {
    let in_word = |b: &u8| b.is_ascii_alphanumeric() || *b == b'_';
    let start = text.iter().position(in_word).unwrap_or(text.len());
    let text = &text[start..];
    let end = text.iter().position(|b| !in_word(b)).unwrap_or(text.len());
    text.split_at(end)
}

/// True when `statement` holds the function name `call` (which has an
/// underscore), in any case. Only the underscores of the statement are
/// tried, as a pgbench query holds none, so the check costs one pass.
fn contains_call(statement: &str, call: &str) -> bool {
    let (text, name) = (statement.as_bytes(), call.as_bytes());
    let Some(offset) = name.iter().position(|&b| b == b'_') else {
        return contains_ignoring_case(statement, call);
    };
    text.iter()
        .enumerate()
        .filter(|&(_, &b)| b == b'_')
        .filter_map(|(at, _)| at.checked_sub(offset))
        .any(|start| {
            text.get(start..start + name.len())
                .is_some_and(|window| window.eq_ignore_ascii_case(name))
        })
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
    fn the_probe_leaves_out_the_startup_settings() {
        let sql = probe_sql(&[("timezone".into(), "UTC".into())]);
        assert!(
            sql.ends_with("AND lower(name) <> ALL (ARRAY['timezone'])"),
            "{sql}"
        );
        assert!(!probe_sql(&[]).contains("ARRAY"));
    }

    #[test]
    fn a_lasting_pin_wins_over_a_setting() {
        let query = |sql: &str| pin_reason(b'Q', format!("{sql}\0").as_bytes());
        assert_eq!(query("SET jit = off"), Some(SESSION_SETTING));
        assert_eq!(query("SET jit = off; LISTEN jobs"), Some("LISTEN"));
        assert_eq!(query("LISTEN jobs; RESET ALL"), Some("LISTEN"));
    }

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
            "select PG_Advisory_Lock(1), x_y FROM a_b",
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
        // Named statements follow the client (see `crate::wire::prepared`).
        assert_eq!(pin_reason(b'P', b"s1\0SELECT 1\0\0\0"), None);
        assert_eq!(pin_reason(b'P', b"\0SELECT 1\0\0\0"), None);
        assert!(pin_reason(b'P', b"s2\0LISTEN jobs\0\0\0").is_some());
    }
}
