//! The PostgreSQL wire front end: any PostgreSQL client (psql, pgbench,
//! drivers) connects to pgwarden as if to PostgreSQL, and its work runs
//! through the same guard, lifecycle and generations as the HTTP API's.
//!
//! # Layout
//! - [`messages`]: the packets before startup, the messages pgwarden
//!   writes to clients, and the 5-byte header that frames the rest.
//! - [`scram`]: SCRAM-SHA-256 as a server, against the configured password.
//! - [`startup`]: one client's startup: TLS refusal, protocol version,
//!   authentication, the server's parameters, pgwarden's own cancel key.
//! - [`session`]: one client's life after startup: transaction pooling
//!   through the guard.
//! - [`prepared`]: named prepared statements that follow a client from
//!   session to session.
//! - [`settings`]: a client's startup settings, on every session it uses.
//! - [`cancel`]: cancel requests, routed by pgwarden's own keys.
//! - [`tls`]: TLS to clients, with pgwarden's certificate.
//!
//! # Transaction pooling
//! A client holds no server session while idle. Its first complete unit
//! (messages up to Sync, Query, Flush or FunctionCall) is admitted by the
//! guard, which waits (bounded) during a reconnect, and the unit's bytes
//! go to a session of the current generation as they came, but for the
//! names of prepared statements (see [`prepared`]). The session goes back
//! to the pool at the ReadyForQuery `I` that answers the last unit sent,
//! unless something the client did cannot move to another session: a
//! session-level `SET`, `LISTEN`, SQL `PREPARE`, a cursor, a temporary
//! table or a session advisory lock *pin* the client to its session until
//! it leaves; that session is reset (`DISCARD ALL`) before its next user,
//! so nothing leaks. A session given back by an unpinned client holds no
//! state of its but prepared statements, which are pgwarden's to share,
//! and goes to the next client without a reset (as PgBouncer's
//! transaction mode does), which saves a round trip per transaction.
//!
//! Not yet: replay of a unit whose session broke (the client gets
//! 08006/08007 and stays connected).

pub mod cancel;
pub mod messages;
pub mod prepared;
pub mod scram;
pub mod session;
pub mod settings;
pub mod startup;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::guard::{Executor, Guard};
use crate::lifecycle::BackendSource;
use crate::telemetry::Metrics;
use crate::telemetry::labels::WireConnection;

use cancel::CancelRegistry;
use scram::ScramVerifier;

/// Who may connect, and how.
#[derive(Clone)]
pub struct ClientAuth {
    /// The user clients must name.
    pub user: String,
    /// The database clients must name.
    pub database: String,
    /// The password clients must prove with SCRAM-SHA-256; `None` admits
    /// the configured user without a password (as `trust` would).
    pub verifier: Option<Arc<ScramVerifier>>,
    /// Clients on a private stream (TLS, loopback) send the password
    /// itself (PostgreSQL's `password` method), which clients without
    /// SCRAM need; elsewhere they prove it with SCRAM all the same.
    pub cleartext: bool,
}

impl std::fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientAuth")
            .field("user", &self.user)
            .field("database", &self.database)
            .field("password", &self.verifier.as_ref().map(|_| "***"))
            .finish()
    }
}

/// Limits and modes of the wire front end.
#[derive(Clone, Copy, Debug)]
pub struct WireLimits {
    /// Connected clients at most; one more is refused with 53300.
    pub max_clients: usize,
    /// A client that has not finished startup by then is dropped.
    pub startup_timeout: Duration,
    /// Largest message accepted from a client or forwarded from a server.
    pub max_message_bytes: usize,
    /// Named statements of clients a server session keeps prepared; the
    /// least recently used is closed to make room.
    pub max_prepared_per_session: usize,
    /// How clients hold server sessions.
    pub pool_mode: PoolMode,
}

/// How wire clients hold server sessions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PoolMode {
    /// A session per transaction (per unit outside one), given back at
    /// the ReadyForQuery that ends it unless state pins the client.
    #[default]
    Transaction,
    /// A session from the client's first unit until it leaves, as
    /// PgBouncer's session mode: for applications that rely on session
    /// state throughout. The guard still holds units during a reconnect,
    /// and a client whose session broke gets a new one at its next unit.
    Session,
}

/// What every client task shares.
#[derive(Debug)]
pub struct Wire {
    /// The only way to a server session.
    pub guard: Guard<BackendSource>,
    /// The HTTP API's executor, whose replay rules resolve a COMMIT in
    /// flight when a session breaks.
    pub executor: Executor,
    /// The metrics (`api="pgwire"` on the request series).
    pub metrics: Metrics,
    /// Who may connect.
    pub auth: ClientAuth,
    /// Limits.
    pub limits: WireLimits,
    /// TLS to clients, when a certificate is configured.
    pub tls: Option<tls::ClientTls>,
    /// Cancel keys of connected clients.
    cancels: Arc<CancelRegistry>,
    /// Every client's named statements, by text.
    statements: prepared::Registry,
    /// pgwarden's own statements in front of units (see
    /// `session::replay`), prepared once per server session.
    own: session::OwnStatements,
    /// Connected clients.
    clients: AtomicUsize,
    /// The server's ParameterStatus values, learned from a pooled session,
    /// and those each set of client settings was answered with.
    server_parameters: std::sync::Mutex<startup::Answers>,
}

impl Wire {
    /// The shared state of a wire front end.
    pub fn new(
        guard: Guard<BackendSource>,
        executor: Executor,
        metrics: Metrics,
        auth: ClientAuth,
        limits: WireLimits,
        tls: Option<tls::ClientTls>,
    ) -> Self {
        let statements = prepared::Registry::default();
        let own = session::OwnStatements::new(&statements);
        Self {
            guard,
            executor,
            metrics,
            auth,
            limits,
            tls,
            cancels: Arc::default(),
            statements,
            own,
            clients: AtomicUsize::new(0),
            server_parameters: std::sync::Mutex::default(),
        }
    }

    /// Connected clients right now.
    pub fn clients(&self) -> usize {
        self.clients.load(Ordering::Relaxed)
    }
}

/// Counts a client as connected while it lives.
struct Connected<'a>(&'a Wire);

impl Drop for Connected<'_> {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Accepts clients until `stop`, then waits for the connected ones, which
/// leave at their next idle moment.
pub async fn serve(listener: TcpListener, wire: Arc<Wire>, stop: CancellationToken) {
    let mut clients = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let (wire, stop) = (wire.clone(), stop.clone());
                    clients.spawn(serve_client(wire, stream, peer, stop));
                }
                Err(error) => {
                    warn!(error = %error, "Accepting a wire client failed.");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = clients.join_next(), if !clients.is_empty() => {}
        }
    }
    drop(listener);
    info!(
        clients = clients.len(),
        "Wire listener closed; waiting for connected clients."
    );
    while clients.join_next().await.is_some() {}
}

async fn serve_client(
    wire: Arc<Wire>,
    mut stream: TcpStream,
    peer: SocketAddr,
    stop: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let count = wire.clients.fetch_add(1, Ordering::Relaxed) + 1;
    let _connected = Connected(&wire);
    let limit = wire.limits.startup_timeout;
    let first = tokio::time::timeout(
        limit,
        messages::read_initial(&mut stream, startup::MAX_STARTUP_PACKET),
    )
    .await;
    let first = match first {
        Ok(Ok(first)) => first,
        Ok(Err(error)) => {
            return debug!(peer = %peer, error = %error, "Wire client startup failed.");
        }
        Err(_) => return debug!(peer = %peer, "Wire client did not finish startup in time."),
    };
    match (first, &wire.tls) {
        (messages::Initial::SslRequest, Some(tls::ClientTls(acceptor))) => {
            if stream.write_all(b"S").await.is_err() {
                return;
            }
            let handshake = tokio::time::timeout(limit, acceptor.accept(stream)).await;
            match handshake {
                Ok(Ok(tls)) => serve_stream(&wire, tls, None, count, peer, true, stop).await,
                Ok(Err(error)) => {
                    debug!(peer = %peer, error = %error, "TLS handshake with a wire client failed.")
                }
                Err(_) => debug!(peer = %peer, "TLS handshake with a wire client timed out."),
            }
        }
        (first, _) => {
            let loopback = peer.ip().is_loopback();
            serve_stream(&wire, stream, Some(first), count, peer, loopback, stop).await
        }
    }
}

/// Startup, then the session, on a plain or TLS stream; `private` when
/// no one can read the stream on its way (TLS, or loopback).
async fn serve_stream<S>(
    wire: &Wire,
    mut stream: S,
    first: Option<messages::Initial>,
    count: usize,
    peer: SocketAddr,
    private: bool,
    stop: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let limit = wire.limits.startup_timeout;
    // The client's span is entered while it starts up and around the
    // session's log lines, not at every poll of the session: that would
    // cost a tenth of the CPU a unit takes.
    let span = info_span!("pg_client", "client.address" = %peer);
    let startup = startup::run(wire, &mut stream, first, count, private).instrument(span.clone());
    let started = tokio::time::timeout(limit, startup).await;
    let client = match started {
        Ok(Ok(Some(client))) => client,
        Ok(Ok(None)) => return,
        Ok(Err(error)) => return failed(wire, peer, &error.to_string()),
        Err(_) => return failed(wire, peer, "startup did not finish in time"),
    };
    session::run(wire, stream, client, stop, span).await;
}

/// A connection broken off before it became a client.
fn failed(wire: &Wire, peer: SocketAddr, why: &str) {
    debug!(peer = %peer, reason = why, "Wire client startup failed.");
    wire.metrics.wire_connection(WireConnection::Failed);
}
