//! The lifecycle, guard and executor assembled over a kit cluster, as the
//! daemon will assemble them.

use std::time::Duration;

use pgwarden::backend::{ConnectOptions, Connector};
use pgwarden::guard::{ExecSettings, Executor, Guard};
use pgwarden::lifecycle::{BackendSource, Lifecycle, LifecycleSettings};
use pgwarden::pool::PoolConfig;
use pgwarden::telemetry::Metrics;
use pgwarden::telemetry::labels::PoolState;
use prometheus::Registry;

/// A running lifecycle with its guard, executor and metrics.
pub struct Stack {
    /// The lifecycle task's handle.
    pub lifecycle: Lifecycle<BackendSource>,
    /// The guard in front of it.
    pub guard: Guard<BackendSource>,
    /// Runs requests through the guard.
    pub executor: Executor,
    /// Where every metric is registered.
    pub registry: Registry,
    /// The metrics every part of the stack reports to.
    pub metrics: Metrics,
}

/// Lifecycle settings that detect failures quickly, for tests.
pub fn quick_settings() -> LifecycleSettings {
    LifecycleSettings {
        health_check_interval: Duration::from_millis(250),
        health_check_timeout: Duration::from_secs(1),
        ..LifecycleSettings::default()
    }
}

impl Stack {
    /// Starts a stack connecting with `options`.
    pub fn start(options: ConnectOptions, settings: LifecycleSettings, budget: Duration) -> Stack {
        let registry = Registry::new();
        let metrics = Metrics::new(&registry).unwrap();
        let pool = PoolConfig {
            max_connections: 20,
            create_timeout: Duration::from_secs(3),
            ..PoolConfig::default()
        };
        let source = BackendSource {
            connector: Connector::new(options).unwrap(),
            pool,
        };
        let lifecycle = Lifecycle::start(source, settings, metrics.clone());
        let guard = Guard::new(lifecycle.clone(), budget, metrics.clone());
        let executor = Executor::new(guard.clone(), ExecSettings::default(), metrics.clone());
        Stack {
            lifecycle,
            guard,
            executor,
            registry,
            metrics,
        }
    }

    /// Another executor over the same guard and metrics, with `settings`
    /// (e.g. a short transaction timeout).
    pub fn executor_with(&self, settings: ExecSettings) -> Executor {
        Executor::new(self.guard.clone(), settings, self.metrics.clone())
    }

    /// Waits until `generation` is ready (generous bound: 30 s).
    pub async fn ready(&self, generation: u64) {
        let mut rx = self.lifecycle.subscribe();
        let ready = rx.wait_for(|s| {
            s.state == PoolState::Ready
                && s.generation.as_ref().is_some_and(|g| g.id() == generation)
        });
        tokio::time::timeout(Duration::from_secs(30), ready)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "generation {generation} never became ready: {:?}",
                    self.lifecycle.status()
                )
            })
            .unwrap();
    }

    /// Waits until `generation` is retired, i.e. a reconnect started.
    pub async fn retired(&self, generation: u64) {
        let mut rx = self.lifecycle.subscribe();
        let retired = rx.wait_for(|s| {
            s.generation
                .as_ref()
                .is_some_and(|g| g.id() > generation || g.is_retired())
        });
        tokio::time::timeout(Duration::from_secs(30), retired)
            .await
            .unwrap_or_else(|_| panic!("generation {generation} was never retired"))
            .unwrap();
    }

    /// Upper bucket bounds holding the median and the largest observation of
    /// histogram `name` (all series together), in seconds; `None` if empty.
    pub fn histogram_bounds(&self, name: &str) -> Option<(f64, f64)> {
        let family = self
            .registry
            .gather()
            .into_iter()
            .find(|f| f.name() == name)?;
        let mut cumulative: Vec<(f64, u64)> = Vec::new();
        let mut count = 0;
        for metric in family.get_metric() {
            let histogram = metric.get_histogram();
            count += histogram.get_sample_count();
            for (i, bucket) in histogram.get_bucket().iter().enumerate() {
                if cumulative.len() <= i {
                    cumulative.push((bucket.upper_bound(), 0));
                }
                cumulative[i].1 += bucket.cumulative_count();
            }
        }
        let bound = |target: u64| {
            cumulative
                .iter()
                .find(|(_, c)| *c >= target)
                .map_or(f64::INFINITY, |(b, _)| *b)
        };
        (count > 0).then(|| (bound(count.div_ceil(2)), bound(count)))
    }

    /// A metric's value (summed over series matching `labels`).
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        pgwarden::telemetry::scrape::value(&self.registry, name, labels)
            .unwrap_or_else(|| panic!("no metric {name}"))
    }
}
