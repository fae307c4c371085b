//! Replay without doubt: what to do when a request's connection breaks.
//!
//! Every request runs so that its outcome is decidable:
//! - a **read** (a conservative keyword check says it modifies nothing) runs
//!   as `BEGIN READ ONLY` + statement + `COMMIT` in one round trip. Postgres
//!   guarantees such a transaction changed nothing (a hidden write fails with
//!   25006 and the statement is rerun as a write), so a broken read is
//!   replayed, whatever point it reached;
//! - a **write** runs as `BEGIN` + `SELECT txid_current()` + statement, then
//!   `COMMIT` in a second round trip, keeping the result in hand. Broken
//!   before COMMIT was sent: Postgres rolled it back, so it is replayed.
//!   Broken after: another session (of a new generation when the server
//!   went away, else of the same one) is asked what became of the xid;
//! - a statement that **cannot run in a transaction block** (25001) runs
//!   bare, and a break after sending it cannot be resolved.
//!
//! # Why `txid_status` can be trusted, and when it cannot
//! While the server keeps running (a terminated backend, a cut network), an
//! xid is never handed out twice, so `txid_status` is authoritative. After a
//! clean restart the shutdown checkpoint recorded the next xid, so again no
//! xid is reused. After a **crash**, the server recovers its next xid from
//! the WAL: an xid that left no trace in flushed WAL can be handed out again
//! to a new transaction (pgwarden's own replay, say), and `txid_status`
//! would then describe *that* transaction.
//!
//! A crash does not always restart the postmaster: when one backend is
//! killed (the OOM killer's SIGKILL), the postmaster ends every session and
//! recovers **in place**, and `pg_postmaster_start_time()` does not change.
//! What changes on every crash recovery, in place or not, is the shared
//! statistics: recovery discards them, so their reset time
//! (`pg_stat_get_bgwriter_stat_reset_time()`) moves, while a clean restart
//! keeps it. A write records it with its xid, in the same round trip.
//!
//! Every crash recovery ends with a checkpoint taken before any session is
//! accepted, whose next xid is above every xid the WAL holds. So, when the
//! statistics were reset since the write was identified:
//! - an xid at or above the latest checkpoint's next xid was never logged
//!   before the crash, so it never committed: replay;
//! - below it, `txid_status` is authoritative only when that checkpoint is
//!   the one that ended the recovery: a shutdown-type checkpoint (its redo
//!   point is its own record), taken after the reset, and the only one
//!   counted since. A later checkpoint hides where the recovery ended: 08007.
//!
//! After a **failover** (the server's timeline changed) the new primary's
//! history may lack the write and reuse its xid: "aborted" still means the
//! write is absent, but "committed" cannot be told from someone else's
//! commit. When the answer cannot be established (a failover reporting
//! "committed", a crash seen by a role without permission to read
//! `pg_control_checkpoint()`, statistics reset by hand, or an xid too old to
//! have a status), the answer is 08007, never a guess. The judgement is
//! `outcome::judge`, tested as a table; the twenty-kill and twenty-crash
//! ledger tests prove it end to end.

/// How a statement was run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Inside `BEGIN READ ONLY … COMMIT`.
    Read,
    /// `BEGIN` + `txid_current()` + statement, then `COMMIT`.
    Write,
    /// Alone, outside a transaction block (also every write in `fast` mode).
    Bare,
}

/// How far the request had got when its connection broke.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakPoint {
    /// Nothing of the request reached the server.
    BeforeSend,
    /// The statement(s) were sent; COMMIT was not.
    BeforeCommit,
    /// COMMIT was sent and no answer came.
    AfterCommit,
}

/// What the server, asked on another session, says about the broken
/// write's transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxOutcome {
    /// `txid_status` = committed, and the xid cannot have been reused.
    Committed,
    /// `txid_status` = aborted, and the xid cannot have been reused.
    Aborted,
    /// Still in progress (the old backend has not finished yet).
    InProgress,
    /// The xid was never logged before a crash, so it never committed.
    NeverLogged,
    /// The database cannot tell.
    Unknown,
}

/// What the guard does about a broken request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Run it again on another session.
    Replay,
    /// It committed: answer with the result already in hand.
    Answer,
    /// Ask again shortly, within the budget.
    AskAgain,
    /// Answer SQLSTATE 08007: it may or may not have been applied.
    Unknown,
}

/// Which replay rule decides a broken request: the one table of this
/// module. [`Rule::of`] picks the rule, [`Rule::decision`] says what it
/// decides and [`Rule::as_str`] names it (for `/status` and the logs), so
/// the decision and its label can never disagree.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rule {
    /// Nothing had been sent: replayed.
    NeverSent,
    /// A read in a read-only transaction: replayed.
    Read,
    /// A write broken before COMMIT was sent: replayed.
    BeforeCommit,
    /// A write broken after COMMIT, found committed: answered from the result in hand.
    Committed,
    /// A write broken after COMMIT, found aborted: replayed.
    Aborted,
    /// A write broken after COMMIT whose xid was never logged before a crash: replayed.
    NeverLogged,
    /// A write still in progress: asked again, 08007 when the budget runs out.
    InProgress,
    /// The database could not tell, or a bare statement broke after sending: 08007.
    Unknown,
}

impl Rule {
    /// Every rule, in declaration order.
    pub const ALL: [Rule; 8] = [
        Rule::NeverSent,
        Rule::Read,
        Rule::BeforeCommit,
        Rule::Committed,
        Rule::Aborted,
        Rule::NeverLogged,
        Rule::InProgress,
        Rule::Unknown,
    ];

    /// The rule for a request run as `class` and broken at `point`;
    /// `outcome` is what the database said of a write broken after its
    /// COMMIT was sent (it matters for nothing else).
    pub fn of(class: Class, point: BreakPoint, outcome: Option<TxOutcome>) -> Rule {
        match (class, point) {
            (_, BreakPoint::BeforeSend) => Rule::NeverSent,
            (Class::Read, _) => Rule::Read,
            (Class::Write, BreakPoint::BeforeCommit) => Rule::BeforeCommit,
            (Class::Write, BreakPoint::AfterCommit) => match outcome {
                Some(TxOutcome::Committed) => Rule::Committed,
                Some(TxOutcome::Aborted) => Rule::Aborted,
                Some(TxOutcome::NeverLogged) => Rule::NeverLogged,
                Some(TxOutcome::InProgress) => Rule::InProgress,
                Some(TxOutcome::Unknown) | None => Rule::Unknown,
            },
            (Class::Bare, _) => Rule::Unknown,
        }
    }

    /// What the rule decides.
    pub fn decision(self) -> Decision {
        match self {
            Rule::NeverSent
            | Rule::Read
            | Rule::BeforeCommit
            | Rule::Aborted
            | Rule::NeverLogged => Decision::Replay,
            Rule::Committed => Decision::Answer,
            Rule::InProgress => Decision::AskAgain,
            Rule::Unknown => Decision::Unknown,
        }
    }

    /// The rule's snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::NeverSent => "never_sent",
            Rule::Read => "read",
            Rule::BeforeCommit => "before_commit",
            Rule::Committed => "committed",
            Rule::Aborted => "aborted",
            Rule::NeverLogged => "never_logged",
            Rule::InProgress => "in_progress",
            Rule::Unknown => "unknown",
        }
    }
}

/// The replay decision: [`Rule::of`] then [`Rule::decision`].
pub fn decide(class: Class, point: BreakPoint, outcome: Option<TxOutcome>) -> Decision {
    Rule::of(class, point, outcome).decision()
}

/// Classifies a statement for [`Class::Read`] by a conservative keyword
/// check: it must start with `SELECT`, `SHOW`, `VALUES`, `TABLE` or `WITH`
/// and contain no data-modifying keyword outside literals and comments.
/// Mistakes in the permissive direction are caught by Postgres (25006).
pub fn is_read(sql: &str) -> bool {
    const READ_STARTS: [&str; 5] = ["SELECT", "SHOW", "VALUES", "TABLE", "WITH"];
    const MODIFYING: [&str; 8] = [
        "INSERT", "UPDATE", "DELETE", "MERGE", "INTO", "CALL", "COPY", "LOCK",
    ];
    let is = |word: &str, set: &[&str]| set.iter().any(|k| k.eq_ignore_ascii_case(word));
    let mut words = Keywords { rest: sql };
    match words.next() {
        Some(first) if is(first, &READ_STARTS) => !words.any(|w| is(w, &MODIFYING)),
        _ => false,
    }
}

/// The first keyword of `sql`, upper-cased as written or not, when `sql`
/// holds exactly one statement (semicolons inside literals, quoted
/// identifiers, dollar-quoted bodies and comments do not count; a
/// trailing one does not either).
pub fn single_statement(sql: &str) -> Option<&str> {
    let mut words = Keywords { rest: sql };
    let first = words.next().filter(|w| *w != ";")?;
    let mut ended = false;
    for word in words {
        if word == ";" {
            ended = true;
        } else if ended {
            return None;
        }
    }
    Some(first)
}

/// The bare words of `sql`, as slices of it, skipping string literals,
/// quoted identifiers, dollar-quoted bodies and comments; each `;` that
/// ends a statement is a word of its own.
struct Keywords<'a> {
    rest: &'a str,
}

impl<'a> Iterator for Keywords<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        while let Some(c) = self.rest.chars().next() {
            let rest = self.rest;
            self.rest = match c {
                '\'' => skip_quoted(&rest[1..], '\''),
                '"' => skip_quoted(&rest[1..], '"'),
                '-' if rest.starts_with("--") => rest.find('\n').map_or("", |i| &rest[i..]),
                '/' if rest.starts_with("/*") => rest.find("*/").map_or("", |i| &rest[i + 2..]),
                '$' => skip_dollar(rest),
                ';' => {
                    self.rest = &rest[1..];
                    return Some(&rest[..1]);
                }
                c if c.is_ascii_alphabetic() || c == '_' => {
                    let end = rest
                        .find(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_'))
                        .unwrap_or(rest.len());
                    self.rest = &rest[end..];
                    return Some(&rest[..end]);
                }
                c => &rest[c.len_utf8()..],
            };
        }
        None
    }
}

fn skip_quoted(rest: &str, quote: char) -> &str {
    rest.find(quote).map_or("", |i| &rest[i + 1..])
}

fn skip_dollar(rest: &str) -> &str {
    let tag_end = rest[1..].find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'));
    match tag_end.map(|i| i + 1) {
        Some(i) if rest[i..].starts_with('$') => {
            let tag = &rest[..=i];
            let body = &rest[tag.len()..];
            body.find(tag).map_or("", |j| &body[j + tag.len()..])
        }
        _ => &rest[1..],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use BreakPoint::*;
    use Class::*;
    use Decision::*;
    use TxOutcome::*;

    /// Every (class, break point, outcome) a request can meet.
    fn every_case() -> impl Iterator<Item = (Class, BreakPoint, Option<TxOutcome>)> {
        let outcomes = [
            None,
            Some(Committed),
            Some(Aborted),
            Some(InProgress),
            Some(NeverLogged),
            Some(TxOutcome::Unknown),
        ];
        [Read, Write, Bare].into_iter().flat_map(move |class| {
            [BeforeSend, BeforeCommit, AfterCommit]
                .into_iter()
                .flat_map(move |point| outcomes.map(|outcome| (class, point, outcome)))
        })
    }

    #[test]
    fn one_statement_is_told_from_several() {
        assert_eq!(single_statement("select 1"), Some("select"));
        assert_eq!(
            single_statement("  UPDATE t SET a = ';' ; "),
            Some("UPDATE")
        );
        assert_eq!(single_statement("SELECT $$a;b$$ -- c; d"), Some("SELECT"));
        assert_eq!(single_statement("SELECT 1; SELECT 2"), None);
        assert_eq!(
            single_statement("BEGIN; INSERT INTO t VALUES (1); COMMIT"),
            None
        );
        assert_eq!(single_statement("; SELECT 1"), None);
        assert_eq!(single_statement("   "), None);
    }

    #[test]
    fn the_decision_table_is_pinned() {
        let expected = |class, point, outcome| match (class, point, outcome) {
            (_, BeforeSend, _) => Replay,
            (Read, _, _) => Replay,
            (Write, BeforeCommit, _) => Replay,
            (Write, AfterCommit, Some(Committed)) => Answer,
            (Write, AfterCommit, Some(Aborted)) => Replay,
            (Write, AfterCommit, Some(NeverLogged)) => Replay,
            (Write, AfterCommit, Some(InProgress)) => AskAgain,
            (Write, AfterCommit, _) => Decision::Unknown,
            (Bare, _, _) => Decision::Unknown,
        };
        let mut cases = 0;
        for (class, point, outcome) in every_case() {
            assert_eq!(
                decide(class, point, outcome),
                expected(class, point, outcome),
                "{class:?} {point:?} {outcome:?}"
            );
            cases += 1;
        }
        assert_eq!(cases, 54);
    }

    #[test]
    fn every_rule_is_reachable_and_named_once() {
        let reached: std::collections::HashSet<Rule> = every_case()
            .map(|(class, point, outcome)| Rule::of(class, point, outcome))
            .collect();
        assert_eq!(reached.len(), Rule::ALL.len());
        let names: std::collections::HashSet<_> = Rule::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), Rule::ALL.len());
    }

    #[test]
    fn only_plain_reads_are_classified_as_reads() {
        let reads = [
            "SELECT * FROM purchase_order WHERE id = $1",
            "  select 1",
            "WITH t AS (SELECT 1) SELECT * FROM t",
            "SHOW search_path",
            "VALUES (1), (2)",
            "TABLE purchase_order",
            "SELECT 'INSERT INTO x' AS text, \"update\" FROM t -- delete\n",
            "SELECT $$ DELETE FROM t $$",
            "SELECT nextval('seq')", // a hidden write: Postgres answers 25006, then it runs as a write
        ];
        for sql in reads {
            assert!(is_read(sql), "{sql}");
        }
        let writes = [
            "UPDATE purchase_order SET n = n + 1",
            "INSERT INTO t VALUES (1)",
            "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
            "SELECT * INTO new_table FROM t",
            "DELETE FROM t",
            "VACUUM t",
            "CALL do_things()",
            "/* SELECT */ UPDATE t SET x = 1",
            "",
        ];
        for sql in writes {
            assert!(!is_read(sql), "{sql}");
        }
    }
}
