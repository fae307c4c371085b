//! The two-phase warm-up that a generation must pass before it is published.
//!
//! Phase `ping` opens the minimum number of connections together and sends
//! each a round trip that also reports the server's role, so a standby (or a
//! primary demoted behind our back) is never accepted as a primary, and
//! which run of the server they met, which the generation keeps. Phase
//! `queries` runs the configured warm-up queries on every one of those
//! connections, so the first real requests find warm caches and plans.
//! Each phase has its own timeout; any failure fails the attempt.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;

use tracing::{Instrument, info_span};

use super::settings::{LifecycleSettings, RequiredRole};
use super::source::{GenerationPool, ServerRole, SourceError};
use crate::telemetry::labels::WarmupPhase;

/// How long each phase of a successful warm-up took.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WarmupTimings {
    /// Opening, pinging and role-checking the connections.
    pub ping: Duration,
    /// Running the warm-up queries.
    pub queries: Duration,
    /// Both phases.
    pub total: Duration,
}

/// What a successful warm-up found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warmed {
    /// How long each phase took.
    pub timings: WarmupTimings,
    /// The run of the server its sessions met (see
    /// [`ServerStatus::run`](super::ServerStatus::run)); `None` without a
    /// session.
    pub run: Option<String>,
}

/// Why a warm-up failed, and in which phase.
#[derive(Clone, Debug, thiserror::Error)]
#[error("warm-up phase {phase} failed: {message}")]
pub struct WarmupError {
    /// The phase that failed.
    pub phase: WarmupPhase,
    /// What happened, without secrets.
    pub message: String,
}

impl WarmupError {
    fn new(phase: WarmupPhase, message: impl Into<String>) -> Self {
        Self {
            phase,
            message: message.into(),
        }
    }
}

/// Runs both phases on `pool`; the warm connections return to it afterwards.
pub async fn warm_up<P: GenerationPool>(
    pool: &P,
    settings: &LifecycleSettings,
) -> Result<Warmed, WarmupError> {
    let started = Instant::now();
    let ping_phase = ping(pool, settings).instrument(info_span!("db_warmup_phase", phase = "ping"));
    let (connections, run) = ping_phase.await?;
    let ping_took = started.elapsed();

    let queries_started = Instant::now();
    let queries_phase = run_queries::<P>(connections, settings)
        .instrument(info_span!("db_warmup_phase", phase = "queries"));
    drop(queries_phase.await?);
    let timings = WarmupTimings {
        ping: ping_took,
        queries: queries_started.elapsed(),
        total: started.elapsed(),
    };
    Ok(Warmed { timings, run })
}

async fn ping<P: GenerationPool>(
    pool: &P,
    settings: &LifecycleSettings,
) -> Result<(Vec<P::Conn>, Option<String>), WarmupError> {
    let phase = async {
        let mut connections = pool.warm().await.map_err(Into::into)?;
        let mut run: Option<String> = None;
        for conn in &mut connections {
            let status = P::ping(conn).await.map_err(Into::into)?;
            if settings.role == RequiredRole::Primary && status.role == ServerRole::Standby {
                return Err(SourceError::statement(
                    "the server is in recovery (a standby), but the role must be primary",
                ));
            }
            if run.get_or_insert_with(|| status.run.clone()) != &status.run {
                return Err(SourceError::statement(
                    "the server restarted while its sessions were opened",
                ));
            }
        }
        Ok((connections, run))
    };
    within(settings.ping_timeout, WarmupPhase::Ping, phase).await
}

/// Runs every warm-up query on every connection, the connections side by
/// side, so the phase takes as long as the slowest connection, not the sum.
async fn run_queries<P: GenerationPool>(
    connections: Vec<P::Conn>,
    settings: &LifecycleSettings,
) -> Result<Vec<P::Conn>, WarmupError> {
    let queries: Arc<[String]> = settings.warmup_queries.clone().into();
    let phase = async move {
        let mut tasks = JoinSet::new();
        for mut conn in connections {
            let queries = queries.clone();
            tasks.spawn(async move {
                for sql in queries.iter() {
                    P::run(&mut conn, sql).await.map_err(Into::into)?;
                }
                Ok::<_, SourceError>(conn)
            });
        }
        let mut warm = Vec::with_capacity(tasks.len());
        while let Some(joined) = tasks.join_next().await {
            let conn =
                joined.map_err(|e| SourceError::statement(format!("warm-up task failed: {e}")))?;
            warm.push(conn?);
        }
        Ok(warm)
    };
    within(settings.queries_timeout, WarmupPhase::Queries, phase).await
}

async fn within<T>(
    limit: Duration,
    phase: WarmupPhase,
    work: impl Future<Output = Result<T, SourceError>>,
) -> Result<T, WarmupError> {
    match tokio::time::timeout(limit, work).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(WarmupError::new(phase, error.message)),
        Err(_) => Err(WarmupError::new(
            phase,
            format!("timed out after {limit:?}"),
        )),
    }
}
