//! What the lifecycle manages, as two small traits.
//!
//! The lifecycle only needs to open a pool per generation, lend connections,
//! ping them (learning the server's role) and run warm-up statements. Keeping
//! that behind traits lets the same state machine manage pgwarden's own
//! backend pool, another kind of connection later, or a scripted fake in
//! unit tests under a paused clock.

use std::future::Future;

use crate::backend::BackendError;
use crate::pool::{LossHook, Pool, PoolError, PoolStatus, PooledConnection};

/// Whether a server accepts writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerRole {
    /// Not in recovery: accepts writes.
    Primary,
    /// In recovery (a standby): read-only.
    Standby,
}

/// A failure reported by a [`ConnectionSource`] or [`GenerationPool`].
#[derive(Clone, Debug, thiserror::Error)]
#[error("{message}")]
pub struct SourceError {
    /// True when the server looks unreachable or the connection is gone.
    pub connection_level: bool,
    /// What happened, without secrets.
    pub message: String,
}

impl From<PoolError> for SourceError {
    fn from(error: PoolError) -> Self {
        SourceError {
            connection_level: error.is_connection_level(),
            message: error.to_string(),
        }
    }
}

impl From<BackendError> for SourceError {
    fn from(error: BackendError) -> Self {
        SourceError {
            connection_level: error.is_connection_level(),
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

    /// `SELECT 1`-grade round trip that also reports the server's role.
    fn ping(conn: &mut Self::Conn) -> impl Future<Output = Result<ServerRole, Self::Error>> + Send;

    /// Runs one warm-up statement, discarding its rows.
    fn run(
        conn: &mut Self::Conn,
        sql: &str,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

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

    async fn ping(conn: &mut PooledConnection) -> Result<ServerRole, PoolError> {
        match conn.is_in_recovery().await? {
            false => Ok(ServerRole::Primary),
            true => Ok(ServerRole::Standby),
        }
    }

    async fn run(conn: &mut PooledConnection, sql: &str) -> Result<(), PoolError> {
        conn.simple_query(sql).await?;
        Ok(())
    }

    fn status(&self) -> PoolStatus {
        Pool::status(self)
    }

    fn close(&self) {
        Pool::close(self)
    }
}
