//! Backend connections: pgwarden's own PostgreSQL client sessions.
//!
//! # Why not a client library
//! The data API must return every value exactly as PostgreSQL prints it, so
//! results are requested in **text** format; statements are pipelined
//! (Parse, Bind, Describe, Execute for each, one Sync) so a request costs one
//! round trip; the transaction status of every ReadyForQuery is tracked so the
//! guard knows what a broken request may have left behind; and cancel
//! requests need the session's BackendKeyData. `tokio-postgres` always asks
//! for binary results and hides the rest, so the protocol is spoken here.
//!
//! # Why `postgres-protocol` as the codec
//! It is the codec under `tokio-postgres`, maintained with it, and gives
//! exactly what a client needs: encoders for every frontend message,
//! zero-copy parsing of backend messages (a `DataRow` stays one buffer of
//! bytes, which [`Row`] keeps as is), and tested implementations of MD5 and
//! SCRAM-SHA-256. The wire front end will use it too: backend messages are
//! framed by [`Message::parse`](postgres_protocol::message::backend::Message)
//! and can be forwarded to a client byte for byte, without decoding and
//! re-encoding rows, which is what a pass-through proxy wants. pgwire's
//! message types were the alternative; they decode every row into owned
//! values, the wrong trade for a pass-through.
//!
//! # Layout
//! - [`options`]: where and how to connect (from a `postgresql://` URL);
//! - [`connect`]: socket, TLS (`sslmode`), startup and authentication;
//! - `framing`: message I/O on a session's socket: whole messages in
//!   and out, within a size allowance (the part a wire front end shares);
//! - [`connection`]: a session and its requests (simple query, pipelined
//!   extended query, reset, idle check);
//! - [`transaction`]: a batch of statements as one transaction, and what
//!   is known of it when it fails;
//! - `collect`: a response read into results, and the refusal of COPY;
//! - [`cancel`]: cancel requests;
//! - [`result`] and [`statement`]: what goes in and comes out;
//! - [`statements`]: the named statements wire clients left on a session;
//! - [`error`]: every failure, classified by [`ErrorKind`].

pub mod cancel;
mod collect;
pub mod connect;
pub mod connection;
pub mod error;
pub(crate) mod framing;
pub mod options;
pub mod result;
pub mod statement;
pub mod statements;
mod stream;
mod tls;
pub mod transaction;

pub use cancel::CancelToken;
pub use connect::Connector;
pub use connection::{Connection, ServerProbe, TransactionStatus};
pub use error::{BackendError, DbError, ErrorKind, Refusal, Scope, Stage};
pub use options::{ConnectOptions, Host, Secret, SslMode};
pub use result::{Field, QueryResult, Row};
pub use statement::{IsolationLevel, Statement, TransactionOptions};
pub use transaction::{TransactionError, TransactionProgress, TxIdentity};
