//! What the lifecycle manages, as two small traits.
//!
//! The lifecycle only needs to open a pool per generation, lend connections,
//! ping them (learning the server's role) and run warm-up statements. Keeping
//! that behind traits lets the same state machine manage pgwarden's own
//! backend pool, another kind of connection later, or a scripted fake in
//! unit tests under a paused clock.

use std::future::Future;

use crate::backend::{BackendError, Connection, Scope};
use crate::pool::{IdleSweep, LossHook, Pool, PoolError, PoolStatus, PooledConnection};

/// Whether a server accepts writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerRole {
    /// Not in recovery: accepts writes.
    Primary,
    /// In recovery (a standby): read-only.
    Standby,
}

/// What a ping learns of the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerStatus {
    /// Whether it accepts writes.
    pub role: ServerRole,
    /// Which run of the server answered: it changes when the server
    /// restarts or recovers from a crash (see
    /// [`ServerProbe`](crate::backend::ServerProbe)). A generation keeps
    /// the run it was built on, so a check can tell that every session of
    /// it was ended since, even after its own session was replaced.
    pub run: String,
}

/// A failure reported by a [`ConnectionSource`] or [`GenerationPool`].
#[derive(Clone, Debug, thiserror::Error)]
#[error("{message}")]
pub struct SourceError {
    /// What the failure says about the server (see the module doc of
    /// [`crate::lifecycle`] for what each scope leads to).
    pub scope: Scope,
    /// What happened, without secrets.
    pub message: String,
}

impl SourceError {
    /// A failure that says nothing about the server or its sessions.
    pub fn statement(message: impl Into<String>) -> Self {
        SourceError {
            scope: Scope::Statement,
            message: message.into(),
        }
    }
}

impl From<PoolError> for SourceError {
    fn from(error: PoolError) -> Self {
        SourceError {
            scope: error.scope(),
            message: error.to_string(),
        }
    }
}

impl From<BackendError> for SourceError {
    fn from(error: BackendError) -> Self {
        SourceError {
            scope: error.scope(),
            message: error.to_string(),
        }
    }
}

/// Opens a fresh pool for each generation.
pub trait ConnectionSource: std::fmt::Debug + Send + Sync + 'static {
    /// The pool type of one generation.
    type Pool: GenerationPool;

    /// Builds an empty pool; connections are opened by the warm-up.
    /// `on_loss` is to be called when the pool finds a connection closed by
    /// the server (passive detection without a request in flight).
    fn open(&self, on_loss: LossHook) -> Result<Self::Pool, SourceError>;
}

/// The pool of one generation.
pub trait GenerationPool: std::fmt::Debug + Send + Sync + 'static {
    /// A lent connection; it returns to the pool when dropped.
    type Conn: std::fmt::Debug + Send + 'static;

    /// The pool's own failure. Converted only when one happens, so lending
    /// a connection needs no wrapper around the pool's future.
    type Error: Into<SourceError> + Send + 'static;

    /// Lends a connection.
    fn get(&self) -> impl Future<Output = Result<Self::Conn, Self::Error>> + Send;

    /// Opens the configured minimum of connections together and lends them all.
    fn warm(&self) -> impl Future<Output = Result<Vec<Self::Conn>, Self::Error>> + Send;

    /// `SELECT 1`-grade round trip that also reports the server's role
    /// and run.
    fn ping(
        conn: &mut Self::Conn,
    ) -> impl Future<Output = Result<ServerStatus, Self::Error>> + Send;

    /// A session of the health check's own, outside the pool, so that a
    /// check never waits for (or takes) a session a request could use.
    type Probe: std::fmt::Debug + Send + Sync + 'static;

    /// Opens a [`Self::Probe`] session.
    fn open_probe(&self) -> impl Future<Output = Result<Self::Probe, Self::Error>> + Send;

    /// [`GenerationPool::ping`] on the probe session.
    fn ping_probe(
        probe: &mut Self::Probe,
    ) -> impl Future<Output = Result<ServerStatus, Self::Error>> + Send;

    /// Runs one warm-up statement, discarding its rows.
    fn run(
        conn: &mut Self::Conn,
        sql: &str,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Looks at every idle session without waiting: how many of those
    /// opened before `opened_before` are alive, and how many the server
    /// ended the way it ends every session when it goes away (those are
    /// discarded; see [`Pool::sweep_idle`]).
    fn sweep_idle(&self, opened_before: tokio::time::Instant) -> IdleSweep;

    /// Current sizes.
    fn status(&self) -> PoolStatus;

    /// Closes the pool: idle connections now, lent ones when returned.
    fn close(&self);
}

/// Opens pgwarden backend pools.
#[derive(Clone, Debug)]
pub struct BackendSource {
    /// Where to connect.
    pub connector: crate::backend::Connector,
    /// Sizes and time limits of each generation's pool.
    pub pool: crate::pool::PoolConfig,
}

impl ConnectionSource for BackendSource {
    type Pool = Pool;

    fn open(&self, on_loss: LossHook) -> Result<Pool, SourceError> {
        let (connector, config) = (self.connector.clone(), self.pool.clone());
        Ok(Pool::with_loss_hook(connector, config, Some(on_loss))?)
    }
}

impl GenerationPool for Pool {
    type Conn = PooledConnection;
    type Error = PoolError;

    fn get(&self) -> impl Future<Output = Result<PooledConnection, PoolError>> + Send {
        Pool::get(self)
    }

    fn warm(&self) -> impl Future<Output = Result<Vec<PooledConnection>, PoolError>> + Send {
        Pool::warm(self)
    }

    async fn ping(conn: &mut PooledConnection) -> Result<ServerStatus, PoolError> {
        status_of(conn).await
    }

    type Probe = Connection;

    fn open_probe(&self) -> impl Future<Output = Result<Connection, PoolError>> + Send {
        self.open_unpooled()
    }

    async fn ping_probe(probe: &mut Connection) -> Result<ServerStatus, PoolError> {
        status_of(probe).await
    }

    async fn run(conn: &mut PooledConnection, sql: &str) -> Result<(), PoolError> {
        conn.simple_query(sql).await?;
        Ok(())
    }

    fn sweep_idle(&self, opened_before: tokio::time::Instant) -> IdleSweep {
        Pool::sweep_idle(self, opened_before.into_std())
    }

    fn status(&self) -> PoolStatus {
        Pool::status(self)
    }

    fn close(&self) {
        Pool::close(self)
    }
}

async fn status_of(conn: &mut Connection) -> Result<ServerStatus, PoolError> {
    let probe = conn.probe_server().await?;
    let role = match probe.in_recovery {
        false => ServerRole::Primary,
        true => ServerRole::Standby,
    };
    Ok(ServerStatus {
        role,
        run: probe.run,
    })
}
