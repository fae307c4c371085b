//! A pool of backend connections, on `deadpool::managed`.
//!
//! The pool is deliberately unaware of generations and health: it keeps
//! connections that are provably reusable and discards the rest. A connection
//! is handed out again only if it is not broken (no connection-level failure,
//! no abandoned request), the server has not closed it while it sat idle,
//! it is outside any transaction block, and (when configured) its session
//! state has been reset. The lifecycle above builds one pool per generation
//! and closes the old one to drain it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool::managed::{self, Metrics, RecycleError, RecycleResult};
use tokio::task::JoinSet;

use crate::backend::{BackendError, Connection, Connector, ErrorKind, Scope, TransactionStatus};

/// Default upper bound on open connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10;
/// Default number of connections opened and checked before a pool is used.
pub const DEFAULT_MIN_CONNECTIONS: usize = 2;
/// Default bound on waiting for a free connection.
pub const DEFAULT_WAIT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default bound on opening a connection.
pub const DEFAULT_CREATE_TIMEOUT: Duration = Duration::from_secs(5);
/// Default bound on the reuse checks.
pub const DEFAULT_RECYCLE_TIMEOUT: Duration = Duration::from_secs(2);

/// Sizes and time limits of a pool.
#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// Upper bound on open connections.
    pub max_connections: usize,
    /// Connections opened together by [`Pool::warm`], so the first requests
    /// after a (re)connect do not pay for connection setup.
    pub min_connections: usize,
    /// Bound on waiting for a free connection when all are in use.
    pub wait_timeout: Duration,
    /// Bound on opening a new connection.
    pub create_timeout: Duration,
    /// Bound on checking a connection before reuse.
    pub recycle_timeout: Duration,
    /// Run `DISCARD ALL` before reusing a connection that ran caller
    /// statements, so one request's `SET`s, temp tables and advisory locks
    /// never leak into another's. It is sent in front of the next request,
    /// in the same write, so it adds no round trip.
    pub reset_on_reuse: bool,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            min_connections: DEFAULT_MIN_CONNECTIONS,
            wait_timeout: DEFAULT_WAIT_TIMEOUT,
            create_timeout: DEFAULT_CREATE_TIMEOUT,
            recycle_timeout: DEFAULT_RECYCLE_TIMEOUT,
            reset_on_reuse: true,
        }
    }
}

/// Failure to hand out a connection.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// Every connection stayed busy for the whole wait timeout.
    #[error("no connection became free within {0:?}")]
    WaitTimeout(Duration),
    /// Opening a connection took longer than the create timeout.
    #[error("opening a connection took longer than {0:?}")]
    CreateTimeout(Duration),
    /// The pool was closed (its generation was retired).
    #[error("the pool is closed")]
    Closed,
    /// Opening a connection failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The pool could not be built from its configuration.
    #[error("invalid pool configuration: {0}")]
    Config(String),
}

/// Bounded classification of a [`PoolError`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolErrorKind {
    /// See [`PoolError::WaitTimeout`].
    WaitTimeout,
    /// See [`PoolError::CreateTimeout`].
    CreateTimeout,
    /// See [`PoolError::Closed`].
    Closed,
    /// See [`PoolError::Config`].
    Config,
    /// A backend failure, with its own kind.
    Backend(ErrorKind),
}

impl PoolError {
    /// The bounded classification of this error.
    pub fn kind(&self) -> PoolErrorKind {
        match self {
            PoolError::WaitTimeout(_) => PoolErrorKind::WaitTimeout,
            PoolError::CreateTimeout(_) => PoolErrorKind::CreateTimeout,
            PoolError::Closed => PoolErrorKind::Closed,
            PoolError::Config(_) => PoolErrorKind::Config,
            PoolError::Backend(e) => PoolErrorKind::Backend(e.kind()),
        }
    }

    /// What this failure says about the server (see [`Scope`]): a busy or
    /// closed pool says nothing, a connection that could not be opened in
    /// time says the server may be unreachable.
    pub fn scope(&self) -> Scope {
        match self {
            PoolError::CreateTimeout(_) => Scope::Unreachable,
            PoolError::Backend(e) => e.scope(),
            PoolError::WaitTimeout(_) | PoolError::Closed | PoolError::Config(_) => {
                Scope::Statement
            }
        }
    }
}

/// What [`Pool::sweep_idle`] found among the idle sessions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IdleSweep {
    /// Sessions opened before the given moment that the server still
    /// serves: it did not end every session then.
    pub alive: usize,
    /// Sessions the server ended as it ends every session when it goes
    /// away; they were discarded.
    pub ended: usize,
}

/// Sizes of a pool at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStatus {
    /// Configured upper bound.
    pub max_size: usize,
    /// Open connections (idle plus in use).
    pub size: usize,
    /// Open connections waiting in the pool.
    pub idle: usize,
    /// Connections handed out.
    pub in_use: usize,
    /// Callers waiting for a connection.
    pub waiting: usize,
}

/// Called when the pool finds that the server ended one of its idle
/// connections the way a server that goes away does ([`Scope::Server`]):
/// possibly the first sign of a restart, a crash, a failover or a mass
/// termination, often before any request notices, and possibly one session
/// terminated by an operator, which the lifecycle tells apart. Sessions
/// that failed alone for a reason of their own (abandoned mid-request,
/// ended by an idle timeout) are discarded without a call.
#[derive(Clone)]
pub struct LossHook(Arc<dyn Fn() + Send + Sync>);

impl LossHook {
    /// Wraps the function to call.
    pub fn new(hook: impl Fn() + Send + Sync + 'static) -> Self {
        Self(Arc::new(hook))
    }

    /// Calls the wrapped function.
    pub(crate) fn call(&self) {
        (self.0)()
    }
}

impl std::fmt::Debug for LossHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LossHook")
    }
}

/// Opens and vets connections for deadpool.
#[derive(Debug)]
pub struct Manager {
    connector: Connector,
    reset_on_reuse: bool,
    on_loss: Option<LossHook>,
}

impl Manager {
    fn report(&self, error: &BackendError) {
        if let Some(hook) = &self.on_loss
            && error.scope() == Scope::Server
        {
            hook.call();
        }
    }
}

impl managed::Manager for Manager {
    type Type = Connection;
    type Error = BackendError;

    async fn create(&self) -> Result<Connection, BackendError> {
        // Boxed: the handshake's state stays out of every `get`, which the
        // fast path pays for by size even when nothing is opened.
        Box::pin(self.connector.connect()).await
    }

    async fn recycle(&self, conn: &mut Connection, _: &Metrics) -> RecycleResult<BackendError> {
        if conn.is_retired() {
            // Alive, but its reset was refused: not a sign of a server problem.
            return Err(RecycleError::message("its session reset was refused"));
        }
        if let Err(error) = conn.check_idle() {
            self.report(&error);
            return Err(RecycleError::Backend(error));
        }
        if conn.transaction_status() != TransactionStatus::Idle {
            return Err(RecycleError::message("left inside a transaction block"));
        }
        if self.reset_on_reuse {
            conn.reset_before_next_use();
        }
        Ok(())
    }
}

/// A connection lent by the pool; it goes back when dropped.
pub type PooledConnection = managed::Object<Manager>;

/// A pool of backend connections to one server.
#[derive(Clone, Debug)]
pub struct Pool {
    inner: managed::Pool<Manager>,
    config: PoolConfig,
}

impl Pool {
    /// Builds an empty pool; connections open on demand or with [`Pool::warm`].
    pub fn new(connector: Connector, config: PoolConfig) -> Result<Pool, PoolError> {
        Self::with_loss_hook(connector, config, None)
    }

    /// Like [`Pool::new`], calling `on_loss` whenever an idle connection
    /// turns out to have been closed by the server.
    pub fn with_loss_hook(
        connector: Connector,
        config: PoolConfig,
        on_loss: Option<LossHook>,
    ) -> Result<Pool, PoolError> {
        let manager = Manager {
            connector,
            reset_on_reuse: config.reset_on_reuse,
            on_loss,
        };
        let inner = managed::Pool::builder(manager)
            .max_size(config.max_connections)
            .wait_timeout(Some(config.wait_timeout))
            .create_timeout(Some(config.create_timeout))
            .recycle_timeout(Some(config.recycle_timeout))
            .queue_mode(managed::QueueMode::Lifo)
            .runtime(deadpool::Runtime::Tokio1)
            .build()
            .map_err(|e| PoolError::Config(e.to_string()))?;
        Ok(Pool { inner, config })
    }

    /// The configuration the pool was built with.
    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    /// Lends a connection, waiting (bounded) when all are in use.
    pub async fn get(&self) -> Result<PooledConnection, PoolError> {
        self.inner.get().await.map_err(|e| self.convert(e))
    }

    /// Opens `min_connections` connections concurrently and lends them all,
    /// so the caller can check them before the pool serves anyone; they
    /// return to the pool as idle connections when dropped.
    pub async fn warm(&self) -> Result<Vec<PooledConnection>, PoolError> {
        let wanted = self.config.min_connections.min(self.config.max_connections);
        let mut tasks = JoinSet::new();
        for _ in 0..wanted {
            let pool = self.clone();
            tasks.spawn(async move { pool.get().await });
        }
        let mut connections = Vec::with_capacity(wanted);
        while let Some(joined) = tasks.join_next().await {
            let connection =
                joined.map_err(|e| PoolError::Config(format!("warm-up task failed: {e}")))?;
            connections.push(connection?);
        }
        Ok(connections)
    }

    /// Opens a session outside the pool, for a caller that must never wait
    /// for (or take) a session a request could use: the health check.
    pub async fn open_unpooled(&self) -> Result<Connection, PoolError> {
        let connect = self.inner.manager().connector.connect();
        match tokio::time::timeout(self.config.create_timeout, connect).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(PoolError::CreateTimeout(self.config.create_timeout)),
        }
    }

    /// Looks at every idle session at once, asking the kernel (never
    /// trusting a recent answer): how many of those opened before
    /// `opened_before` are alive, and how many the server had ended the way
    /// it ends every session when it goes away ([`Scope::Server`]).
    ///
    /// A quiet session stays. One with anything waiting is taken out to be
    /// read, since reading needs it whole, and is not put back: deadpool
    /// cannot take a session back once it left. So a session that only
    /// received a notice or a notification is closed too (and counted
    /// alive); the pool opens a new one when it needs it. The pool is
    /// locked while it is looked at, which costs one non-blocking system
    /// call per idle session.
    pub fn sweep_idle(&self, opened_before: Instant) -> IdleSweep {
        let mut sweep = IdleSweep::default();
        let older = |conn: &Connection| conn.created_at() < opened_before;
        let looked = self.inner.retain(|conn, _| {
            let quiet = conn.is_quiet();
            sweep.alive += usize::from(quiet && older(conn));
            quiet
        });
        for mut conn in looked.removed {
            match conn.check_idle_now() {
                Ok(()) => sweep.alive += usize::from(older(&conn)),
                Err(error) if error.scope() == Scope::Server => sweep.ended += 1,
                Err(_) => {}
            }
        }
        sweep
    }

    /// Removes a connection from the pool for good; it closes when dropped.
    pub fn discard(connection: PooledConnection) -> Connection {
        managed::Object::take(connection)
    }

    /// Sizes right now.
    pub fn status(&self) -> PoolStatus {
        let status = self.inner.status();
        PoolStatus {
            max_size: status.max_size,
            size: status.size,
            idle: status.available,
            in_use: status.size.saturating_sub(status.available),
            waiting: status.waiting,
        }
    }

    /// Closes the pool: idle connections close now, lent ones when they are
    /// returned, and nothing is handed out again.
    pub fn close(&self) {
        self.inner.close();
    }

    /// True once [`Pool::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.inner.is_closed()
    }

    fn convert(&self, error: managed::PoolError<BackendError>) -> PoolError {
        match error {
            managed::PoolError::Timeout(managed::TimeoutType::Create) => {
                PoolError::CreateTimeout(self.config.create_timeout)
            }
            managed::PoolError::Timeout(_) => PoolError::WaitTimeout(self.config.wait_timeout),
            managed::PoolError::Backend(e) => PoolError::Backend(e),
            managed::PoolError::Closed => PoolError::Closed,
            other => PoolError::Config(other.to_string()),
        }
    }
}
