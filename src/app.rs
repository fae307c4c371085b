//! Wiring: builds the lifecycle, the guard, the executor and both listeners
//! from a [`Config`], and takes them down in order.
//!
//! Start-up never waits for the database: both listeners serve at once
//! (`/readyz` answers 503 until the first generation is warm) and the
//! lifecycle keeps connecting in the background. Shutdown stops accepting
//! data requests, lets in-flight ones finish within the grace period, drains
//! the pool, and only then closes the ops listener.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus::Registry;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::api::http::{Credentials, DataState};
use crate::api::server::{ServerLimits, serve};
use crate::backend::{BackendError, ConnectOptions, Connector};
use crate::config::{Config, ConfigError};
use crate::guard::{ExecSettings, Executor, Guard, WriteSafety};
use crate::lifecycle::{BackendSource, Lifecycle, LifecycleSettings, RequiredRole};
use crate::ops::OpsState;
use crate::pool::PoolConfig;
use crate::telemetry::Metrics;
use crate::wire::scram::ScramVerifier;
use crate::wire::{ClientAuth, PoolMode, Wire, WireLimits};

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The database URL or TLS settings are unusable.
    #[error("database_url: {0}")]
    Database(#[from] BackendError),
    /// A listener could not bind its address.
    #[error("cannot listen on {address}: {source}")]
    Bind {
        /// The address.
        address: String,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// The metrics could not be registered.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The wire front end's certificate or key is unusable.
    #[error(transparent)]
    WireTls(#[from] crate::wire::tls::TlsConfigError),
}

/// A running daemon.
#[derive(Debug)]
pub struct Daemon {
    data_addr: SocketAddr,
    ops_addr: SocketAddr,
    /// Where the wire front end listens, and its task, when it is on.
    wire: Option<(SocketAddr, JoinHandle<()>)>,
    lifecycle: Lifecycle<BackendSource>,
    stop_data: CancellationToken,
    stop_ops: CancellationToken,
    data_server: JoinHandle<()>,
    ops_server: JoinHandle<()>,
    grace: Duration,
}

fn ms(value: u64) -> Duration {
    Duration::from_millis(value)
}

/// Starts the lifecycle and both listeners.
pub async fn start(config: &Config) -> Result<Daemon, AppError> {
    let mut options = ConnectOptions::from_url(&config.database_url)?;
    options.connect_timeout = ms(config.connect_timeout_ms);
    let credentials = Credentials {
        user: config
            .client_user
            .clone()
            .unwrap_or_else(|| options.user.clone()),
        password: config
            .client_password
            .clone()
            .or_else(|| options.password.as_ref().map(|p| p.expose().to_owned()))
            .unwrap_or_default(),
        database: options.database.clone(),
    };
    let registry = Registry::new();
    let metrics = Metrics::new(&registry)?;
    metrics.set_pool_connections(0, 0, config.max_connections);
    let source = BackendSource {
        connector: Connector::new(options)?,
        pool: pool_config(config),
    };
    let lifecycle = Lifecycle::start(source, lifecycle_settings(config), metrics.clone());
    let guard = Guard::new(
        lifecycle.clone(),
        ms(config.guard_timeout_ms),
        metrics.clone(),
    );
    let executor = Executor::new(guard.clone(), exec_settings(config), metrics.clone());
    let stop_data = CancellationToken::new();
    let wire = start_wire(config, &credentials, &executor, guard, &metrics, &stop_data).await?;

    let data_state = DataState {
        executor: executor.clone(),
        metrics: metrics.clone(),
        credentials,
        max_request_bytes: config.max_request_bytes,
        max_response_bytes: config.max_response_bytes,
        max_header_bytes: config.max_header_bytes,
        body_read_timeout: ms(config.body_read_timeout_ms),
    };
    let ops_state = OpsState {
        lifecycle: lifecycle.clone(),
        executor,
        registry,
        metrics,
        admin_token: config.admin_token.clone().map(crate::backend::Secret::new),
        settings: public_settings(config),
        wire: wire
            .as_ref()
            .map(|(address, wire, _)| (*address, wire.clone())),
    };
    let data_listener = bind(&config.listen).await?;
    let ops_listener = bind(&config.ops_listen).await?;
    let (data_addr, ops_addr) = (local(&data_listener), local(&ops_listener));
    let stop_ops = CancellationToken::new();
    let data_router = crate::api::http::router(Arc::new(data_state));
    let limits = server_limits(config);
    let data_server = tokio::spawn(serve(data_listener, data_router, limits, stop_data.clone()));
    let ops_router = crate::ops::router(Arc::new(ops_state));
    let ops_server = tokio::spawn(serve(ops_listener, ops_router, limits, stop_ops.clone()));
    let wire = wire.map(|(address, _, task)| (address, task));
    let pg = wire.as_ref().map(|(address, _)| address.to_string());
    info!(data = %data_addr, ops = %ops_addr, pg = pg.as_deref().unwrap_or("off"), "Listening.");
    Ok(Daemon {
        data_addr,
        ops_addr,
        wire,
        lifecycle,
        stop_data,
        stop_ops,
        data_server,
        ops_server,
        grace: ms(config.shutdown_grace_ms),
    })
}

impl Daemon {
    /// Where the data API listens.
    pub fn data_addr(&self) -> SocketAddr {
        self.data_addr
    }

    /// Where the ops listener listens.
    pub fn ops_addr(&self) -> SocketAddr {
        self.ops_addr
    }

    /// Where the PostgreSQL wire front end listens, when it is on.
    pub fn pg_addr(&self) -> Option<SocketAddr> {
        self.wire.as_ref().map(|(address, _)| *address)
    }

    /// The lifecycle, for status and tests.
    pub fn lifecycle(&self) -> &Lifecycle<BackendSource> {
        &self.lifecycle
    }

    /// Stops accepting, lets in-flight requests finish within the grace
    /// period, drains the pool and closes the ops listener. Returns false
    /// when the grace period ran out with requests still in flight.
    pub async fn shutdown(self) -> bool {
        info!(
            grace_ms = self.grace.as_millis() as u64,
            "Shutting down: no new requests, finishing those in flight."
        );
        self.stop_data.cancel();
        let wire = self.wire.map(|(_, task)| task);
        let data = async {
            let _ = self.data_server.await;
            if let Some(wire) = wire {
                let _ = wire.await;
            }
        };
        let drained = tokio::time::timeout(self.grace, data).await.is_ok();
        if !drained {
            warn!("The grace period ran out with requests still in flight.");
        }
        self.lifecycle.stop().await;
        self.stop_ops.cancel();
        let _ = self.ops_server.await;
        info!(drained, "Shutdown complete.");
        drained
    }
}

/// The wire front end's listener and task, unless `pg_listen` is empty.
async fn start_wire(
    config: &Config,
    credentials: &Credentials,
    executor: &Executor,
    guard: Guard<BackendSource>,
    metrics: &Metrics,
    stop: &CancellationToken,
) -> Result<Option<(SocketAddr, Arc<Wire>, JoinHandle<()>)>, AppError> {
    if config.pg_listen.is_empty() {
        return Ok(None);
    }
    let listener = bind(&config.pg_listen).await?;
    let address = local(&listener);
    let auth = ClientAuth {
        user: credentials.user.clone(),
        database: credentials.database.clone(),
        verifier: (!credentials.password.is_empty())
            .then(|| Arc::new(ScramVerifier::new(&credentials.password))),
        cleartext: config.pg_auth == "password",
    };
    let limits = WireLimits {
        max_clients: config.pg_max_clients,
        startup_timeout: ms(config.pg_startup_timeout_ms),
        max_message_bytes: config.pg_max_message_bytes,
        max_prepared_per_session: config.pg_max_prepared_statements,
        pool_mode: if config.pool_mode == "session" {
            PoolMode::Session
        } else {
            PoolMode::Transaction
        },
    };
    let tls = match (&config.pg_tls_cert, &config.pg_tls_key) {
        (Some(cert), Some(key)) => Some(crate::wire::tls::acceptor(cert, key)?),
        _ => None,
    };
    let executor = executor.clone();
    let wire = Arc::new(Wire::new(
        guard,
        executor,
        metrics.clone(),
        auth,
        limits,
        tls,
    ));
    let task = tokio::spawn(crate::wire::serve(listener, wire.clone(), stop.clone()));
    Ok(Some((address, wire, task)))
}

async fn bind(address: &str) -> Result<TcpListener, AppError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| AppError::Bind {
            address: address.to_owned(),
            source,
        })
}

fn local(listener: &TcpListener) -> SocketAddr {
    listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
}

fn server_limits(config: &Config) -> ServerLimits {
    ServerLimits {
        header_read_timeout: ms(config.header_read_timeout_ms),
        max_header_bytes: config.max_header_bytes,
    }
}

fn pool_config(config: &Config) -> PoolConfig {
    PoolConfig {
        max_connections: config.max_connections,
        min_connections: config.min_connections,
        wait_timeout: ms(config.pool_wait_timeout_ms),
        create_timeout: ms(config.connect_timeout_ms),
        reset_on_reuse: config.reset_sessions,
        ..PoolConfig::default()
    }
}

fn lifecycle_settings(config: &Config) -> LifecycleSettings {
    LifecycleSettings {
        health_check_interval: ms(config.health_check_interval_ms),
        health_check_timeout: ms(config.health_check_timeout_ms),
        backoff_initial: ms(config.backoff_initial_ms),
        backoff_max: ms(config.backoff_max_ms),
        backoff_max_with_waiters: ms(config.backoff_max_with_waiters_ms),
        ping_timeout: ms(config.warmup_ping_timeout_ms),
        queries_timeout: ms(config.warmup_queries_timeout_ms),
        warmup_queries: config.warmup_queries.clone(),
        role: if config.role == "any" {
            RequiredRole::Any
        } else {
            RequiredRole::Primary
        },
    }
}

fn exec_settings(config: &Config) -> ExecSettings {
    ExecSettings {
        write_safety: if config.write_safety == "fast" {
            WriteSafety::Fast
        } else {
            WriteSafety::Resolve
        },
        transaction_timeout: ms(config.transaction_timeout_ms),
        result_limit: Some(config.max_response_bytes),
    }
}

/// The settings `/status` shows: never a URL, password or token.
fn public_settings(config: &Config) -> serde_json::Value {
    serde_json::json!({
        "guard_timeout_ms": config.guard_timeout_ms,
        "transaction_timeout_ms": config.transaction_timeout_ms,
        "write_safety": config.write_safety,
        "max_connections": config.max_connections,
        "min_connections": config.min_connections,
        "health_check_interval_ms": config.health_check_interval_ms,
        "health_check_timeout_ms": config.health_check_timeout_ms,
        "role": config.role,
        "pg_listen": config.pg_listen,
        "pool_mode": config.pool_mode,
        "pg_max_prepared_statements": config.pg_max_prepared_statements,
        "warmup_queries": config.warmup_queries.len(),
        "admin_token_configured": config.admin_token.is_some(),
    })
}
