//! Run-time settings of the lifecycle, with their defaults.

use std::time::Duration;

/// Default interval between health checks.
pub const DEFAULT_HEALTH_CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// Default bound on one health check.
pub const DEFAULT_HEALTH_CHECK_TIMEOUT: Duration = Duration::from_secs(1);
/// Default pause after the first failed attempt.
pub const DEFAULT_BACKOFF_INITIAL: Duration = Duration::from_millis(100);
/// Default cap of the exponential backoff.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Default cap of the pause while requests are waiting for the reconnect.
pub const DEFAULT_BACKOFF_MAX_WITH_WAITERS: Duration = Duration::from_millis(500);
/// Default bound on the warm-up's ping phase.
pub const DEFAULT_PING_TIMEOUT: Duration = Duration::from_secs(5);
/// Default bound on the warm-up's queries phase.
pub const DEFAULT_QUERIES_TIMEOUT: Duration = Duration::from_secs(10);

/// Which servers a generation may be built on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RequiredRole {
    /// Only a server that accepts writes; a standby (or a demoted primary) is refused.
    #[default]
    Primary,
    /// Any server, primary or standby (for read-only deployments).
    Any,
}

/// How the lifecycle checks, rebuilds and warms up the pool.
#[derive(Clone, Debug)]
pub struct LifecycleSettings {
    /// Interval between periodic health checks.
    pub health_check_interval: Duration,
    /// Bound on one health check; running over counts as a failure (`timeout`).
    pub health_check_timeout: Duration,
    /// Pause after the first failed attempt; doubles after each further one.
    pub backoff_initial: Duration,
    /// Cap of the pause between attempts.
    pub backoff_max: Duration,
    /// Cap of the pause while requests are waiting in the guard. The long
    /// cap spares a database nobody is asking for; with requests waiting, a
    /// connection attempt or two per second is cheap, and the database's
    /// return is noticed within this bound instead of `backoff_max`.
    pub backoff_max_with_waiters: Duration,
    /// Bound on the ping phase (open `min_connections`, `SELECT 1`, role check).
    pub ping_timeout: Duration,
    /// Bound on the queries phase (every warm-up query on every connection).
    pub queries_timeout: Duration,
    /// The warm-up queries, run on each warm connection in order.
    pub warmup_queries: Vec<String>,
    /// Which servers are acceptable.
    pub role: RequiredRole,
}

impl Default for LifecycleSettings {
    fn default() -> Self {
        Self {
            health_check_interval: DEFAULT_HEALTH_CHECK_INTERVAL,
            health_check_timeout: DEFAULT_HEALTH_CHECK_TIMEOUT,
            backoff_initial: DEFAULT_BACKOFF_INITIAL,
            backoff_max: DEFAULT_BACKOFF_MAX,
            backoff_max_with_waiters: DEFAULT_BACKOFF_MAX_WITH_WAITERS,
            ping_timeout: DEFAULT_PING_TIMEOUT,
            queries_timeout: DEFAULT_QUERIES_TIMEOUT,
            warmup_queries: Vec::new(),
            role: RequiredRole::Primary,
        }
    }
}
