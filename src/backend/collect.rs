//! Result collection: a request's response, read up to its ReadyForQuery.
//!
//! A [`Collector`] turns the messages of one response into one result per
//! statement, keeps the first SQL error until the server is ready again (so
//! the session stays in step), and holds a result limit: rows beyond it are
//! let go and messages beyond it are never buffered. COPY is refused here,
//! because no request carries COPY data and no response returns it: a
//! COPY FROM STDIN is recognised before anything is sent when it can be
//! (see [`may_copy_in`]), and is otherwise ended with CopyFail once it starts.

use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;

use super::connection::invalid_sql;
use super::error::{BackendError, DbError, Stage};
use super::framing::{Allowance, Framer, Incoming, message_name, protocol};
use super::result::{QueryResult, Row, parse_fields};

/// A response read up to its ReadyForQuery.
pub(super) struct Response {
    /// The transaction status byte of the ReadyForQuery.
    pub(super) status: u8,
    /// One result per statement, or the request's first failure.
    pub(super) results: Result<Vec<QueryResult>, BackendError>,
}

/// Reads every message up to ReadyForQuery, building one result per
/// statement. The first SQL error is kept and returned once the server
/// is ready again, so the session stays in step. Under a result limit no
/// message larger than the collector allows is ever held: it is skipped
/// as it arrives (see [`Collector::allowance`]). An `Err` is a failure
/// of the connection itself: the response was not read to its end.
pub(super) async fn read_response(
    framer: &mut Framer,
    limit: Option<usize>,
    protocol: Protocol,
) -> Result<Response, BackendError> {
    let mut collector = Collector::new(limit);
    loop {
        let allowance = collector.allowance();
        let message = match framer.read_within(Stage::Receiving, allowance).await? {
            Incoming::Message(message) => message,
            Incoming::Skipped(tag) => {
                collector.skipped(tag);
                continue;
            }
        };
        match message {
            Message::ReadyForQuery(body) => {
                return Ok(Response {
                    status: body.status(),
                    results: collector.finish(),
                });
            }
            Message::CopyInResponse(_) => refuse_copy_in(framer, protocol, &mut collector).await?,
            other => collector.accept(other)?,
        }
    }
}

/// COPY FROM STDIN would wait for data no request carries: it is refused
/// with a clear error, and the session is brought back in step. How
/// depends on what the server does next:
/// - simple protocol: CopyFail ends the copy, the rest of the query
///   string is abandoned, one ReadyForQuery follows;
/// - extended, COPY last in the pipeline: copy-in mode ignored the
///   pipeline's Sync, so CopyFail is followed by a Sync of our own, and
///   its ReadyForQuery is the only one;
/// - extended, more statements behind the COPY: only when the check
///   before sending missed it (see `Connection::encode_pipeline`). The
///   server reads the next Parse in copy-in mode and ends the session
///   with a FATAL error, which the collector then reports; a Sync sent
///   now could only leave a reply unread, so nothing is sent.
async fn refuse_copy_in(
    framer: &mut Framer,
    protocol: Protocol,
    collector: &mut Collector,
) -> Result<(), BackendError> {
    collector.refuse_copy(copy_refusal(COPY_IN_REFUSED));
    let sync = match protocol {
        Protocol::Simple => false,
        Protocol::Extended { statements } if collector.position() + 1 >= statements => true,
        Protocol::Extended { .. } => return Ok(()),
    };
    frontend::copy_fail(COPY_IN_REFUSED, framer.write_buf()).map_err(invalid_sql)?;
    if sync {
        frontend::sync(framer.write_buf());
    }
    framer.flush(Stage::Receiving).await
}

/// Which query protocol a request used; COPY handling differs between them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Protocol {
    Simple,
    /// A pipeline of `statements` Executes and one Sync: whether a COPY is
    /// the last of them decides how it is refused.
    Extended {
        statements: usize,
    },
}

/// The error a refused COPY FROM STDIN reports, to the client and in CopyFail.
const COPY_IN_REFUSED: &str = "COPY FROM STDIN is not supported";

/// The error a refused COPY TO STDOUT reports.
const COPY_OUT_REFUSED: &str = "COPY TO STDOUT is not supported";

/// A refused COPY, as the client sees it: SQLSTATE 0A000, feature_not_supported.
fn copy_refusal(message: &str) -> DbError {
    DbError {
        severity: "ERROR".into(),
        code: "0A000".into(),
        message: message.into(),
        ..DbError::default()
    }
}

/// A pipeline refused before sending, for a COPY FROM STDIN at `statement`.
pub(super) fn copy_in_refused(statement: usize) -> BackendError {
    BackendError::Sql {
        error: Box::new(copy_refusal(COPY_IN_REFUSED)),
        statement,
    }
}

/// Whether a statement may start COPY FROM STDIN: its first word is COPY
/// and the word STDIN appears in it. Only a top-level COPY can (PL/pgSQL
/// refuses COPY to or from the client), and one extended-protocol statement
/// holds one command. Conservative: a server-side COPY that merely mentions
/// a `stdin` name or string is also caught.
pub(super) fn may_copy_in(sql: &str) -> bool {
    let mut words = sql_words(sql);
    words.next().is_some_and(|w| w.eq_ignore_ascii_case("copy"))
        && words.any(|w| w.eq_ignore_ascii_case("stdin"))
}

/// The words of a statement, after its leading comments.
fn sql_words(sql: &str) -> impl Iterator<Item = &str> {
    skip_leading_comments(sql)
        .split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .filter(|w| !w.is_empty())
}

/// The statement without the whitespace and comments in front of it.
fn skip_leading_comments(mut sql: &str) -> &str {
    loop {
        sql = sql.trim_start();
        if let Some(rest) = sql.strip_prefix("--") {
            sql = rest.split_once('\n').map_or("", |(_, after)| after);
        } else if let Some(rest) = sql.strip_prefix("/*") {
            sql = rest.split_once("*/").map_or("", |(_, after)| after);
        } else {
            return sql;
        }
    }
}

/// Smallest allowance for a message other than a row, whatever the result
/// limit: row descriptions of wide tables and ordinary errors must pass.
const MIN_MESSAGE_ALLOWANCE: usize = 1024 * 1024;

/// Bytes of a DataRow message besides its values (type, length and column
/// count), which [`Row::wire_size`] leaves out. A row counts against the
/// limit with them, so even rows without columns add up.
const DATA_ROW_OVERHEAD: usize = 7;

/// Builds results from the messages of one request.
struct Collector {
    results: Vec<QueryResult>,
    current: QueryResult,
    failure: Option<BackendError>,
    limit: Option<usize>,
    bytes: usize,
}

impl Collector {
    fn new(limit: Option<usize>) -> Self {
        Self {
            results: Vec::new(),
            current: QueryResult::default(),
            failure: None,
            limit,
            bytes: 0,
        }
    }

    /// The largest messages the request may still buffer, under a limit:
    /// a row only as large as what is left of it, so a row that would take
    /// the result over is never held; anything else up to the limit itself
    /// (at least [`MIN_MESSAGE_ALLOWANCE`]). Rows held plus the message
    /// being read thus stay within about twice the limit.
    fn allowance(&self) -> Option<Allowance> {
        let limit = self.limit?;
        Some(Allowance {
            row: limit.saturating_sub(self.bytes),
            other: limit.max(MIN_MESSAGE_ALLOWANCE),
        })
    }

    /// Index of the statement whose messages arrive now: earlier ones have
    /// completed (after an error the server runs none).
    fn position(&self) -> usize {
        self.results.len()
    }

    /// A message over the allowance went by unread. Notices, notifications
    /// and parameter reports are skipped without consequence (only the
    /// parameter's new value is lost); anything else made the result too large.
    fn skipped(&mut self, tag: u8) {
        match tag {
            b'N' | b'A' | b'S' => {}
            _ => self.overflow(),
        }
    }

    fn accept(&mut self, message: Message) -> Result<(), BackendError> {
        match message {
            Message::ParseComplete | Message::BindComplete | Message::NoData => {}
            Message::RowDescription(body) => {
                self.current.fields = parse_fields(&body).map_err(protocol)?
            }
            Message::DataRow(body) => self.push_row(Row::parse(&body).map_err(protocol)?),
            Message::CommandComplete(body) => {
                self.current.command_tag = body.tag().map_err(protocol)?.to_owned();
                self.results.push(std::mem::take(&mut self.current));
            }
            Message::EmptyQueryResponse => self.results.push(std::mem::take(&mut self.current)),
            Message::ErrorResponse(body) => {
                self.fail(DbError::parse(body.fields()).map_err(protocol)?)?
            }
            Message::CopyOutResponse(_) | Message::CopyData(_) | Message::CopyDone => {
                self.refuse_copy(copy_refusal(COPY_OUT_REFUSED))
            }
            other => {
                return Err(BackendError::Protocol(format!(
                    "unexpected {} in a query response",
                    message_name(&other)
                )));
            }
        }
        Ok(())
    }

    fn push_row(&mut self, row: Row) {
        let cost = row.wire_size().saturating_add(DATA_ROW_OVERHEAD);
        self.bytes = self.bytes.saturating_add(cost);
        match self.limit {
            Some(limit) if self.bytes > limit => self.overflow(),
            _ => self.current.rows.push(row),
        }
    }

    /// The result went over the limit: the request fails, and the rows held
    /// so far are let go at once, since none of them will be returned.
    /// Counting continues at the limit, so later rows are skipped unread.
    fn overflow(&mut self) {
        let Some(limit) = self.limit else { return };
        self.bytes = self.bytes.max(limit.saturating_add(1));
        self.current.rows = Vec::new();
        for result in &mut self.results {
            result.rows = Vec::new();
        }
        self.failure
            .get_or_insert(BackendError::ResultTooLarge { limit });
    }

    fn fail(&mut self, error: DbError) -> Result<(), BackendError> {
        if error.is_fatal() {
            return Err(BackendError::Fatal(Box::new(error)));
        }
        let statement = self.results.len();
        if !matches!(self.failure, Some(BackendError::Sql { .. })) {
            self.failure = Some(BackendError::Sql {
                error: Box::new(error),
                statement,
            });
        }
        Ok(())
    }

    /// Records a COPY the request cannot take part in; the server's own
    /// error about the aborted copy that follows is then not the one reported.
    fn refuse_copy(&mut self, error: DbError) {
        let statement = self.results.len();
        if !matches!(self.failure, Some(BackendError::Sql { .. })) {
            self.failure = Some(BackendError::Sql {
                error: Box::new(error),
                statement,
            });
        }
    }

    fn finish(self) -> Result<Vec<QueryResult>, BackendError> {
        match self.failure {
            Some(error) => Err(error),
            None => Ok(self.results),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_from_stdin_is_recognised_before_sending() {
        let cases = [
            ("COPY c FROM STDIN", true),
            ("  copy c (a, b) from stdin with (format csv)", true),
            ("-- load\n/* rows */ COPY c FROM stdin", true),
            ("COPY c TO STDOUT", false),
            ("COPY c FROM '/tmp/c.csv'", false),
            ("SELECT 'COPY c FROM STDIN'", false),
            ("INSERT INTO c VALUES (1)", false),
        ];
        for (sql, expected) in cases {
            assert_eq!(may_copy_in(sql), expected, "{sql}");
        }
    }
}
