//! Failures of a backend connection, and the server's own error reports.
//!
//! The one distinction everything above depends on: did the *connection* fail
//! (I/O error, end of stream, a FATAL report, a protocol violation), or did a
//! *statement* fail while the connection stays usable? [`ErrorKind`] answers it
//! with a bounded set of values that also serve as metric labels, and
//! [`ErrorKind::is_connection_level`] is the single place that decides it.

use std::fmt;
use std::io;

use fallible_iterator::FallibleIterator;
use postgres_protocol::message::backend::ErrorFields;

pub use crate::telemetry::labels::Refusal;

/// Bounded classification of a [`BackendError`]; `as_str` is its metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The connection settings are unusable.
    Config,
    /// The socket could not be opened, or opening it timed out.
    Connect,
    /// TLS negotiation or certificate verification failed.
    Tls,
    /// The server rejected our credentials, or asked for a method we lack.
    Auth,
    /// Reading or writing the socket failed.
    Io,
    /// The server closed the connection.
    Closed,
    /// The server reported a FATAL or PANIC error; the session is over.
    Fatal,
    /// The server sent something the protocol does not allow here.
    Protocol,
    /// The connection was abandoned mid-exchange earlier and cannot be trusted.
    Broken,
    /// A statement failed; the connection is still usable.
    Sql,
    /// The result exceeded the configured size limit; the connection is still usable.
    ResultTooLarge,
    /// The server refused to reset the session before the request, which
    /// therefore did not run; the session is retired, the server is fine.
    ResetRefused,
}

impl ErrorKind {
    /// Every kind, for pre-creating metric label values.
    pub const ALL: [ErrorKind; 12] = [
        ErrorKind::Config,
        ErrorKind::Connect,
        ErrorKind::Tls,
        ErrorKind::Auth,
        ErrorKind::Io,
        ErrorKind::Closed,
        ErrorKind::Fatal,
        ErrorKind::Protocol,
        ErrorKind::Broken,
        ErrorKind::Sql,
        ErrorKind::ResultTooLarge,
        ErrorKind::ResetRefused,
    ];

    /// The snake_case label of this kind.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Config => "config",
            ErrorKind::Connect => "connect",
            ErrorKind::Tls => "tls",
            ErrorKind::Auth => "auth",
            ErrorKind::Io => "io",
            ErrorKind::Closed => "closed",
            ErrorKind::Fatal => "fatal",
            ErrorKind::Protocol => "protocol",
            ErrorKind::Broken => "broken",
            ErrorKind::Sql => "sql",
            ErrorKind::ResultTooLarge => "result_too_large",
            ErrorKind::ResetRefused => "reset_refused",
        }
    }

    /// True when the connection itself is gone or untrustworthy, so it must be
    /// discarded and (for the lifecycle) the server may be down.
    pub fn is_connection_level(self) -> bool {
        !matches!(
            self,
            ErrorKind::Sql
                | ErrorKind::Config
                | ErrorKind::ResultTooLarge
                | ErrorKind::ResetRefused
        )
    }
}

/// What a failure says about the server: the input to the one rule that
/// decides whether pgwarden rebuilds its pool (written out in the
/// lifecycle's module doc). A false reconnect costs a warm-up and pages an
/// operator, so only [`Scope::Server`] and [`Scope::Unreachable`] may
/// retire a generation, and each only through a check that confirms it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    /// A statement failed, or the request did (its result was too large,
    /// the pool was busy); neither the session nor the server is at fault.
    Statement,
    /// This one session is unusable (abandoned mid-request by pgwarden, a
    /// refused reset, a protocol surprise, ended by an idle timeout); the
    /// server is fine. Discard the session, never reconnect.
    Session,
    /// The server answered but refused a new session: too many connections,
    /// authentication, an unknown database, a missing privilege. Count it,
    /// never reconnect: a new generation would be refused the same way.
    Refused(Refusal),
    /// A new session could not reach the server (refused, timed out, TLS
    /// failed, the server is starting up or shutting down). Not proof of a
    /// failure by itself: the health check decides.
    Unreachable,
    /// The server ended an established session the way it does when it
    /// goes away or crashes (end of stream, I/O error, 57P01/57P02, PANIC).
    /// An operator ending this one session looks the same, so the
    /// lifecycle checks the server and the other sessions before it
    /// reconnects.
    Server,
}

impl Refusal {
    fn of_class(code: &str) -> Refusal {
        match code.get(..2) {
            Some("28") => Refusal::Auth,
            Some("53") => Refusal::Resources,
            Some("3D") => Refusal::Database,
            Some("42") => Refusal::Privilege,
            _ => Refusal::Other,
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How far a request had got when its connection failed; replay decisions need it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Opening the connection: no statement of the caller's was involved.
    Connecting,
    /// Writing the request: the server may have received a prefix of it.
    Sending,
    /// Waiting for the answer: the server received the whole request.
    Receiving,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Connecting => "while connecting",
            Stage::Sending => "while sending",
            Stage::Receiving => "while receiving",
        })
    }
}

/// Any failure of a backend connection.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The connection settings are unusable.
    #[error("{0}")]
    Config(String),
    /// The socket could not be opened.
    #[error("could not connect to {target}: {source}")]
    Connect {
        /// `host:port` or socket path (no credentials).
        target: String,
        /// The operating system's reason.
        source: io::Error,
    },
    /// Connecting, TLS and authentication together took longer than allowed.
    #[error("connecting to {target} timed out")]
    ConnectTimeout {
        /// `host:port` or socket path (no credentials).
        target: String,
    },
    /// TLS could not be negotiated or the certificate was not trusted.
    #[error("TLS: {0}")]
    Tls(String),
    /// Authentication failed on our side (e.g. a method we do not support).
    #[error("authentication: {0}")]
    AuthMethod(String),
    /// The server rejected the credentials (SQLSTATE class 28).
    #[error("authentication: {0}")]
    AuthRejected(Box<DbError>),
    /// Reading or writing the socket failed.
    #[error("I/O error {stage}: {source}")]
    Io {
        /// How far the request had got.
        stage: Stage,
        /// The operating system's reason.
        source: io::Error,
    },
    /// The server closed the connection.
    #[error("server closed the connection unexpectedly {stage}")]
    Closed {
        /// How far the request had got.
        stage: Stage,
    },
    /// The server ended the session with a FATAL or PANIC report.
    #[error("{0}")]
    Fatal(Box<DbError>),
    /// The server sent something the protocol does not allow.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// An earlier exchange on this connection was abandoned halfway.
    #[error("connection was abandoned mid-request and cannot be reused")]
    Broken,
    /// A statement failed; `statement` is its index within the request.
    #[error("{error}")]
    Sql {
        /// The server's report.
        error: Box<DbError>,
        /// Index of the failing statement in a pipeline or batch (0 for a single one).
        statement: usize,
    },
    /// The result grew beyond the configured limit and was discarded.
    #[error("result exceeds the limit of {limit} bytes")]
    ResultTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The server refused the session reset owed before this request, so
    /// the request did not run; the session may not be lent again.
    #[error("the server refused to reset the session ({0}); the request did not run")]
    ResetRefused(Box<DbError>),
}

impl BackendError {
    /// The bounded classification of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            BackendError::Config(_) => ErrorKind::Config,
            BackendError::Connect { .. } | BackendError::ConnectTimeout { .. } => {
                ErrorKind::Connect
            }
            BackendError::Tls(_) => ErrorKind::Tls,
            BackendError::AuthMethod(_) | BackendError::AuthRejected(_) => ErrorKind::Auth,
            BackendError::Io { .. } => ErrorKind::Io,
            BackendError::Closed { .. } => ErrorKind::Closed,
            BackendError::Fatal(_) => ErrorKind::Fatal,
            BackendError::Protocol(_) => ErrorKind::Protocol,
            BackendError::Broken => ErrorKind::Broken,
            BackendError::Sql { .. } => ErrorKind::Sql,
            BackendError::ResultTooLarge { .. } => ErrorKind::ResultTooLarge,
            BackendError::ResetRefused(_) => ErrorKind::ResetRefused,
        }
    }

    /// Shorthand for `self.kind().is_connection_level()`.
    pub fn is_connection_level(&self) -> bool {
        self.kind().is_connection_level()
    }

    /// What this failure says about the server (see [`Scope`]).
    pub fn scope(&self) -> Scope {
        match self {
            BackendError::Sql { .. } | BackendError::ResultTooLarge { .. } => Scope::Statement,
            BackendError::Config(_) => Scope::Statement,
            BackendError::Broken | BackendError::ResetRefused(_) | BackendError::Protocol(_) => {
                Scope::Session
            }
            BackendError::AuthMethod(_) => Scope::Refused(Refusal::Auth),
            BackendError::AuthRejected(error) => Scope::Refused(Refusal::of_class(&error.code)),
            BackendError::Connect { .. }
            | BackendError::ConnectTimeout { .. }
            | BackendError::Tls(_) => Scope::Unreachable,
            BackendError::Io { stage, .. } | BackendError::Closed { stage } => match stage {
                Stage::Connecting => Scope::Unreachable,
                Stage::Sending | Stage::Receiving => Scope::Server,
            },
            BackendError::Fatal(error) => fatal_scope(error),
        }
    }

    /// The server's report, when the server made one.
    pub fn db_error(&self) -> Option<&DbError> {
        match self {
            BackendError::AuthRejected(e) | BackendError::Fatal(e) => Some(e),
            BackendError::Sql { error, .. } => Some(error),
            _ => None,
        }
    }

    /// How far the request had got, for connection-level failures mid-request.
    pub fn stage(&self) -> Option<Stage> {
        match self {
            BackendError::Io { stage, .. } | BackendError::Closed { stage } => Some(*stage),
            BackendError::Fatal(_) => Some(Stage::Receiving),
            _ => None,
        }
    }

    pub(crate) fn io(stage: Stage) -> impl FnOnce(io::Error) -> BackendError {
        move |source| BackendError::Io { stage, source }
    }
}

/// SQLSTATEs a server ends sessions with when it is going away or crashed.
const SERVER_GOING_AWAY: [&str; 2] = [
    "57P01", // admin_shutdown: a shutdown, or pg_terminate_backend()
    "57P02", // crash_shutdown: another backend crashed
];
/// The server is starting up, shutting down or recovering: it cannot be used yet.
const CANNOT_CONNECT_NOW: &str = "57P03";
/// SQLSTATE classes a server refuses a *new* session with, while it runs well.
const REFUSAL_CLASSES: [&str; 4] = ["28", "53", "3D", "42"];

/// The scope of a FATAL or PANIC report: a server that is going away or
/// crashed (or an operator who ended this session: the lifecycle tells
/// them apart) may retire a generation; a refusal is counted; anything
/// else (an idle-session or idle-in-transaction timeout, a recovery
/// conflict on a standby) ended this one session.
fn fatal_scope(error: &DbError) -> Scope {
    let code = error.code.as_str();
    let panic = error
        .severity_nonlocalized
        .as_deref()
        .unwrap_or(&error.severity)
        == "PANIC";
    if panic || SERVER_GOING_AWAY.contains(&code) {
        Scope::Server
    } else if code == CANNOT_CONNECT_NOW {
        Scope::Unreachable
    } else if REFUSAL_CLASSES.iter().any(|class| code.starts_with(class)) {
        Scope::Refused(Refusal::of_class(code))
    } else {
        Scope::Session
    }
}

/// Every field of a server ErrorResponse or NoticeResponse.
///
/// Field codes follow the protocol's "Error and Notice Message Fields".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DbError {
    /// `S`: localized severity (ERROR, FATAL, ...).
    pub severity: String,
    /// `V`: severity, never localized.
    pub severity_nonlocalized: Option<String>,
    /// `C`: SQLSTATE code.
    pub code: String,
    /// `M`: primary message.
    pub message: String,
    /// `D`: detail.
    pub detail: Option<String>,
    /// `H`: hint.
    pub hint: Option<String>,
    /// `P`: cursor position in the statement (1-based characters).
    pub position: Option<String>,
    /// `p`: position in an internally generated statement.
    pub internal_position: Option<String>,
    /// `q`: the internally generated statement.
    pub internal_query: Option<String>,
    /// `W`: context (call stack).
    pub where_: Option<String>,
    /// `s`: schema name.
    pub schema: Option<String>,
    /// `t`: table name.
    pub table: Option<String>,
    /// `c`: column name.
    pub column: Option<String>,
    /// `d`: data type name.
    pub data_type: Option<String>,
    /// `n`: constraint name.
    pub constraint: Option<String>,
    /// `F`: source file of the server.
    pub file: Option<String>,
    /// `L`: source line of the server.
    pub line: Option<String>,
    /// `R`: source routine of the server.
    pub routine: Option<String>,
}

impl DbError {
    /// Builds the error from the protocol's field list; unknown codes are ignored.
    pub fn parse(mut fields: ErrorFields<'_>) -> std::io::Result<DbError> {
        let mut error = DbError::default();
        while let Some(field) = fields.next()? {
            let value = String::from_utf8_lossy(field.value_bytes()).into_owned();
            let slot = match field.type_() {
                b'S' => {
                    error.severity = value;
                    continue;
                }
                b'C' => {
                    error.code = value;
                    continue;
                }
                b'M' => {
                    error.message = value;
                    continue;
                }
                b'V' => &mut error.severity_nonlocalized,
                b'D' => &mut error.detail,
                b'H' => &mut error.hint,
                b'P' => &mut error.position,
                b'p' => &mut error.internal_position,
                b'q' => &mut error.internal_query,
                b'W' => &mut error.where_,
                b's' => &mut error.schema,
                b't' => &mut error.table,
                b'c' => &mut error.column,
                b'd' => &mut error.data_type,
                b'n' => &mut error.constraint,
                b'F' => &mut error.file,
                b'L' => &mut error.line,
                b'R' => &mut error.routine,
                _ => continue,
            };
            *slot = Some(value);
        }
        Ok(error)
    }

    /// True for FATAL and PANIC: the server ends the session after sending it.
    pub fn is_fatal(&self) -> bool {
        let severity = self
            .severity_nonlocalized
            .as_deref()
            .unwrap_or(&self.severity);
        matches!(severity, "FATAL" | "PANIC")
    }
}

impl fmt::Display for DbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} (SQLSTATE {})",
            self.severity, self.message, self.code
        )
    }
}

impl std::error::Error for DbError {}
