//! Every pgwarden metric, defined once.
//!
//! Names follow `pgwarden_<name>_<unit>[_total]`; durations are in seconds;
//! labels come only from [`super::labels`]. All series are created against an
//! injected [`Registry`] (never the global one, so tests and embedders can
//! run many instances side by side) and every label combination exists from
//! start-up at zero. A request counter is not defined beside the request
//! histogram: its `_count` series is the counter.

use std::sync::Arc;
use std::time::Duration;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use super::labels::{
    Api, AttemptResult, ClientErrorKind, GuardCause, GuardOutcome, HealthResult, PoolState,
    PreparedEvent, ReconnectReason, Refusal, ReplayResult, RequestKind, RequestOutcome,
    WarmupPhase, WireClientState, WireConnection,
};

const NAMESPACE: &str = "pgwarden";

/// Bucket bounds in seconds: sub-millisecond fast paths up to multi-second
/// waits, dense around the default 3 s guard budget.
pub const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0,
    5.0, 8.0, 10.0, 15.0, 30.0,
];

/// Handles to every pgwarden series.
#[derive(Clone, Debug)]
pub struct Metrics {
    pool_state: IntGaugeVec,
    pool_ready: IntGauge,
    pool_generation: IntGauge,
    pool_connections: IntGaugeVec,
    pool_max_connections: IntGauge,
    reconnects: IntCounterVec,
    reconnect_attempts: IntCounterVec,
    reconnect_duration: Histogram,
    warmup_duration: HistogramVec,
    warmup_failures: IntCounterVec,
    health_checks: IntCounterVec,
    health_check_duration: Histogram,
    guard_wait: HistogramVec,
    stale_client_hits: IntCounter,
    replays: IntCounterVec,
    session_refusals: IntCounterVec,
    /// `wire_clients`, by [`WireClientState::index`]: resolved once, as a
    /// client changes state about three times per transaction.
    wire_clients: Arc<[IntGauge]>,
    wire_connections: IntCounterVec,
    /// `wire_prepared_statements_total`, by [`PreparedEvent::index`]:
    /// resolved once, as a hit is counted on every Bind.
    prepared_events: Arc<[IntCounter]>,
    /// The series of the two per-request metrics, resolved once, so a
    /// request costs no label hashing or lookup lock: indexed by
    /// [`request_slot`] and by [`ClientErrorKind::index`].
    request_series: Arc<[Histogram]>,
    error_series: Arc<[IntCounter]>,
}

impl Metrics {
    /// Registers every series in `registry`, with all label values at zero,
    /// plus the standard `process_*` metrics.
    pub fn new(registry: &Registry) -> prometheus::Result<Metrics> {
        let r = Registrar(registry);
        let build_info = r.gauge_vec("build_info", "Build identity; always 1.", &["version"])?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let requests_duration = r.histogram_vec(
            "requests_duration_seconds",
            "End-to-end request latency by front end, kind and outcome; _count counts requests.",
            &["api", "kind", "outcome"],
        )?;
        let errors = r.counter_vec(
            "errors_total",
            "Errors answered to clients, by kind.",
            &["kind"],
        )?;
        let metrics = Metrics {
            pool_state: r.gauge_vec("pool_state", "Lifecycle state of the pool: 1 for the current state, 0 for the others.", &["state"])?,
            pool_ready: r.gauge("pool_ready", "1 when requests are admitted at once (state ready), else 0.")?,
            pool_generation: r.gauge("pool_generation", "Id of the current generation of connections; 0 before the first.")?,
            pool_connections: r.gauge_vec("pool_connections", "Connections of the current generation, idle or lent to a request.", &["state"])?,
            pool_max_connections: r.gauge("pool_max_connections", "Configured maximum number of connections per generation.")?,
            reconnects: r.counter_vec("reconnects_total", "Reconnects started, by what detected the failure (the initial connect is not one).", &["reason"])?,
            reconnect_attempts: r.counter_vec("reconnect_attempts_total", "Attempts to build and warm up a generation, including the initial connect.", &["result"])?,
            reconnect_duration: r.histogram("reconnect_duration_seconds", "Time from detecting a failure to the new generation being ready.")?,
            warmup_duration: r.histogram_vec("warmup_duration_seconds", "Duration of a successful warm-up, per phase and in total.", &["phase"])?,
            warmup_failures: r.counter_vec("warmup_failures_total", "Warm-ups that failed, by the phase that failed.", &["phase"])?,
            health_checks: r.counter_vec("health_checks_total", "Periodic health checks run, by result.", &["result"])?,
            health_check_duration: r.histogram("health_check_duration_seconds", "Latency of periodic health checks, including failed ones.")?,
            guard_wait: r.histogram_vec("guard_wait_seconds", "Time requests waited in the guard, only for requests that had to wait, by cause and outcome.", &["cause", "outcome"])?,
            stale_client_hits: r.counter("stale_client_hits_total", "Requests that met a connection of a retired generation and were moved to the current one.")?,
            replays: r.counter_vec("replays_total", "Requests replayed on a new generation after their connection failed, by result.", &["result"])?,
            session_refusals: r.counter_vec("session_refusals_total", "New sessions the server refused (it answered, so this never starts a reconnect), by the SQLSTATE class of its answer.", &["reason"])?,
            wire_clients: {
                let clients = r.gauge_vec("wire_clients", "Clients connected to the PostgreSQL wire front end, by what they are doing.", &["state"])?;
                WireClientState::ALL.iter().map(|s| clients.with_label_values(&[s.as_str()])).collect()
            },
            wire_connections: r.counter_vec("wire_connections_total", "Connections to the PostgreSQL wire front end, by how their startup ended.", &["result"])?,
            prepared_events: {
                let events = r.counter_vec("wire_prepared_statements_total", "Named statements of wire clients looked up on a server session, by what it took: hit (prepared there), miss (prepared by pgwarden), eviction (closed to make room).", &["event"])?;
                PreparedEvent::ALL.iter().map(|e| events.with_label_values(&[e.as_str()])).collect()
            },
            request_series: request_labels()
                .map(|labels| requests_duration.with_label_values(&labels))
                .collect(),
            error_series: ClientErrorKind::ALL
                .iter()
                .map(|k| errors.with_label_values(&[k.as_str()]))
                .collect(),
        };
        metrics.precreate();
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(metrics)
    }

    fn precreate(&self) {
        for state in PoolState::ALL {
            self.pool_state.with_label_values(&[state.as_str()]);
        }
        self.set_state(PoolState::Starting);
        for state in ["idle", "in_use"] {
            self.pool_connections.with_label_values(&[state]);
        }
        each(&self.reconnects, ReconnectReason::ALL, |r| r.as_str());
        each(&self.reconnect_attempts, AttemptResult::ALL, |r| r.as_str());
        for phase in WarmupPhase::ALL {
            self.warmup_duration.with_label_values(&[phase.as_str()]);
        }
        let failable = [WarmupPhase::Ping, WarmupPhase::Queries];
        each(&self.warmup_failures, &failable, |p| p.as_str());
        each(&self.health_checks, HealthResult::ALL, |r| r.as_str());
        for cause in GuardCause::ALL {
            for outcome in GuardOutcome::ALL {
                self.guard_wait
                    .with_label_values(&[cause.as_str(), outcome.as_str()]);
            }
        }
        each(&self.replays, ReplayResult::ALL, |r| r.as_str());
        each(&self.session_refusals, Refusal::ALL, |r| r.as_str());
        each(&self.wire_connections, WireConnection::ALL, |r| r.as_str());
    }

    /// Publishes the lifecycle state (one-hot) and readiness.
    pub fn set_state(&self, state: PoolState) {
        for candidate in PoolState::ALL {
            let value = i64::from(*candidate == state);
            self.pool_state
                .with_label_values(&[candidate.as_str()])
                .set(value);
        }
        self.pool_ready.set(i64::from(state == PoolState::Ready));
    }

    /// Publishes the current generation id.
    pub fn set_generation(&self, generation: u64) {
        self.pool_generation
            .set(i64::try_from(generation).unwrap_or(i64::MAX));
    }

    /// Publishes the current generation's connection counts and the configured maximum.
    pub fn set_pool_connections(&self, idle: usize, in_use: usize, max: usize) {
        let gauge = |state: &str, value: usize| {
            let value = i64::try_from(value).unwrap_or(i64::MAX);
            self.pool_connections.with_label_values(&[state]).set(value);
        };
        gauge("idle", idle);
        gauge("in_use", in_use);
        self.pool_max_connections
            .set(i64::try_from(max).unwrap_or(i64::MAX));
    }

    /// Counts a reconnect that started.
    pub fn reconnect_started(&self, reason: ReconnectReason) {
        self.reconnects.with_label_values(&[reason.as_str()]).inc();
    }

    /// Counts an attempt to build a generation.
    pub fn reconnect_attempt(&self, result: AttemptResult) {
        self.reconnect_attempts
            .with_label_values(&[result.as_str()])
            .inc();
    }

    /// Records how long a reconnect took, detection to ready.
    pub fn reconnect_finished(&self, took: Duration) {
        self.reconnect_duration.observe(took.as_secs_f64());
    }

    /// Records a successful warm-up phase (or the total).
    pub fn warmup_phase(&self, phase: WarmupPhase, took: Duration) {
        self.warmup_duration
            .with_label_values(&[phase.as_str()])
            .observe(took.as_secs_f64());
    }

    /// Counts a warm-up that failed in `phase`.
    pub fn warmup_failed(&self, phase: WarmupPhase) {
        self.warmup_failures
            .with_label_values(&[phase.as_str()])
            .inc();
    }

    /// Records a health check.
    pub fn health_check(&self, result: HealthResult, took: Duration) {
        self.health_checks
            .with_label_values(&[result.as_str()])
            .inc();
        self.health_check_duration.observe(took.as_secs_f64());
    }

    /// Records a request that had to wait in the guard.
    pub fn guard_wait(&self, cause: GuardCause, outcome: GuardOutcome, waited: Duration) {
        let labels = [cause.as_str(), outcome.as_str()];
        self.guard_wait
            .with_label_values(&labels)
            .observe(waited.as_secs_f64());
    }

    /// Counts a request that met a retired generation.
    pub fn stale_client_hit(&self) {
        self.stale_client_hits.inc();
    }

    /// Counts a replay.
    pub fn replay(&self, result: ReplayResult) {
        self.replays.with_label_values(&[result.as_str()]).inc();
    }

    /// Counts a new session the server refused.
    pub fn session_refused(&self, reason: Refusal) {
        self.session_refusals
            .with_label_values(&[reason.as_str()])
            .inc();
    }

    /// A wire client moves from `from` (none when it just connected) to
    /// `to` (none when it left).
    pub fn wire_client(&self, from: Option<WireClientState>, to: Option<WireClientState>) {
        if let Some(from) = from {
            self.wire_clients[from.index()].dec();
        }
        if let Some(to) = to {
            self.wire_clients[to.index()].inc();
        }
    }

    /// Counts a connection to the wire front end by how its startup ended.
    pub fn wire_connection(&self, result: WireConnection) {
        self.wire_connections
            .with_label_values(&[result.as_str()])
            .inc();
    }

    /// Counts what a wire client's named statement took on a session.
    pub fn prepared_statement(&self, event: PreparedEvent) {
        self.prepared_events[event.index()].inc();
    }

    /// Records a finished request.
    pub fn request(&self, api: Api, kind: RequestKind, outcome: RequestOutcome, took: Duration) {
        self.request_series[request_slot(api, kind, outcome)].observe(took.as_secs_f64());
    }

    /// Counts an error answered to a client.
    pub fn client_error(&self, kind: ClientErrorKind) {
        self.error_series[kind.index()].inc();
    }
}

/// Every label set of `requests_duration_seconds`, in [`request_slot`] order.
fn request_labels() -> impl Iterator<Item = [&'static str; 3]> {
    Api::ALL.iter().flat_map(|api| {
        RequestKind::ALL.iter().flat_map(move |kind| {
            RequestOutcome::ALL
                .iter()
                .map(move |outcome| [api.as_str(), kind.as_str(), outcome.as_str()])
        })
    })
}

/// The position of a label set in [`request_labels`].
fn request_slot(api: Api, kind: RequestKind, outcome: RequestOutcome) -> usize {
    (api.index() * RequestKind::ALL.len() + kind.index()) * RequestOutcome::ALL.len()
        + outcome.index()
}

fn each<T: Copy>(counter: &IntCounterVec, values: &[T], label: impl Fn(T) -> &'static str) {
    for value in values {
        counter.with_label_values(&[label(*value)]);
    }
}

/// Creates and registers series under the `pgwarden` namespace.
struct Registrar<'a>(&'a Registry);

impl Registrar<'_> {
    fn register<T: prometheus::core::Collector + Clone + 'static>(
        &self,
        metric: T,
    ) -> prometheus::Result<T> {
        self.0.register(Box::new(metric.clone()))?;
        Ok(metric)
    }

    fn gauge(&self, name: &str, help: &str) -> prometheus::Result<IntGauge> {
        self.register(IntGauge::with_opts(
            Opts::new(name, help).namespace(NAMESPACE),
        )?)
    }

    fn gauge_vec(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> prometheus::Result<IntGaugeVec> {
        self.register(IntGaugeVec::new(
            Opts::new(name, help).namespace(NAMESPACE),
            labels,
        )?)
    }

    fn counter(&self, name: &str, help: &str) -> prometheus::Result<IntCounter> {
        self.register(IntCounter::with_opts(
            Opts::new(name, help).namespace(NAMESPACE),
        )?)
    }

    fn counter_vec(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> prometheus::Result<IntCounterVec> {
        self.register(IntCounterVec::new(
            Opts::new(name, help).namespace(NAMESPACE),
            labels,
        )?)
    }

    fn histogram(&self, name: &str, help: &str) -> prometheus::Result<Histogram> {
        let opts = HistogramOpts::new(name, help)
            .namespace(NAMESPACE)
            .buckets(DURATION_BUCKETS.to_vec());
        self.register(Histogram::with_opts(opts)?)
    }

    fn histogram_vec(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> prometheus::Result<HistogramVec> {
        let opts = HistogramOpts::new(name, help)
            .namespace(NAMESPACE)
            .buckets(DURATION_BUCKETS.to_vec());
        self.register(HistogramVec::new(opts, labels)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_request_label_set_has_its_own_slot() {
        let labels: Vec<[&str; 3]> = request_labels().collect();
        for &api in Api::ALL {
            for &kind in RequestKind::ALL {
                for &outcome in RequestOutcome::ALL {
                    assert_eq!(
                        labels[request_slot(api, kind, outcome)],
                        [api.as_str(), kind.as_str(), outcome.as_str()]
                    );
                }
            }
        }
    }
}
