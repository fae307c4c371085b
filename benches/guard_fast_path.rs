//! The guard's fast path (admit and release in state ready) against taking
//! a connection from the bare pool: once over pgwarden's real backend pool
//! against a private PostgreSQL (the ratio that matters; the target is
//! within 5 %), and once over an in-memory pool, which isolates the guard's
//! own cost in nanoseconds.
//!
//! Run with `cargo bench --bench guard_fast_path`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use pgwarden::guard::Guard;
use pgwarden::lifecycle::{
    ConnectionSource, GenerationPool, Lifecycle, LifecycleSettings, ServerRole, ServerStatus,
    SourceError,
};
use pgwarden::pool::{IdleSweep, LossHook, PoolStatus};
use pgwarden::telemetry::Metrics;
use pgwarden::telemetry::labels::PoolState;

/// A pool that lends connections from memory: a counter, nothing more.
#[derive(Debug, Default, Clone)]
struct MemoryPool {
    lent: Arc<AtomicUsize>,
}

/// A connection of [`MemoryPool`]; returning it is dropping it.
#[derive(Debug)]
struct MemoryConn(Arc<AtomicUsize>);

impl Drop for MemoryConn {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What the in-memory server answers a ping.
fn primary() -> ServerStatus {
    ServerStatus {
        role: ServerRole::Primary,
        run: "1".into(),
    }
}

impl GenerationPool for MemoryPool {
    type Conn = MemoryConn;
    type Error = SourceError;

    async fn get(&self) -> Result<MemoryConn, SourceError> {
        self.lent.fetch_add(1, Ordering::Relaxed);
        Ok(MemoryConn(self.lent.clone()))
    }

    async fn warm(&self) -> Result<Vec<MemoryConn>, SourceError> {
        Ok(vec![self.get().await?])
    }

    async fn ping(_conn: &mut MemoryConn) -> Result<ServerStatus, SourceError> {
        Ok(primary())
    }

    type Probe = ();

    async fn open_probe(&self) -> Result<(), SourceError> {
        Ok(())
    }

    async fn ping_probe(_probe: &mut ()) -> Result<ServerStatus, SourceError> {
        Ok(primary())
    }

    async fn run(_conn: &mut MemoryConn, _sql: &str) -> Result<(), SourceError> {
        Ok(())
    }

    fn sweep_idle(&self, _opened_before: tokio::time::Instant) -> IdleSweep {
        IdleSweep::default()
    }

    fn status(&self) -> PoolStatus {
        PoolStatus::default()
    }

    fn close(&self) {}
}

#[derive(Debug, Clone, Default)]
struct MemorySource {
    pool: MemoryPool,
}

impl ConnectionSource for MemorySource {
    type Pool = MemoryPool;

    fn open(&self, _on_loss: LossHook) -> Result<MemoryPool, SourceError> {
        Ok(self.pool.clone())
    }
}

fn memory_pool(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let source = MemorySource::default();
    let pool = source.pool.clone();
    let guard = runtime.block_on(async {
        let metrics = Metrics::new(&prometheus::Registry::new()).unwrap();
        let settings = LifecycleSettings {
            health_check_interval: Duration::from_secs(3600),
            ..LifecycleSettings::default()
        };
        let lifecycle = Lifecycle::start(source, settings, metrics.clone());
        let mut ready = lifecycle.subscribe();
        ready
            .wait_for(|s| s.state == PoolState::Ready)
            .await
            .unwrap();
        Guard::new(lifecycle, Duration::from_secs(3), metrics)
    });

    let mut group = c.benchmark_group("in-memory pool: get and release");
    group.bench_function("bare pool", |b| {
        b.to_async(&runtime)
            .iter(|| async { drop(pool.get().await.unwrap()) })
    });
    group.bench_function("guard fast path", |b| {
        b.to_async(&runtime)
            .iter(|| async { drop(guard.admit().await.unwrap()) })
    });
    // One of the guard's steps, alone: benchmarks build tokio with its
    // test clock, whose reads take a lock that release builds do not have.
    group.bench_function("clock read", |b| {
        b.to_async(&runtime)
            .iter(|| async { tokio::time::Instant::now() })
    });
    group.finish();
}

fn backend_pool(c: &mut Criterion) {
    use support::stack::{Stack, quick_settings};

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let cluster = support::Cluster::start();
    let options = support::pg::superuser(&cluster);
    let settings = LifecycleSettings {
        health_check_interval: Duration::from_secs(3600),
        ..quick_settings()
    };
    let stack = runtime.block_on(async {
        let stack = Stack::start(options, settings, Duration::from_secs(3));
        stack.ready(1).await;
        stack
    });
    // The very pool the guard lends from (the current generation's), through
    // the same interface the guard uses.
    let generation = stack.lifecycle.snapshot().generation.unwrap();
    let pool = generation.pool();
    let mut group = c.benchmark_group("backend pool: get and release");
    group.bench_function("bare pool", |b| {
        b.to_async(&runtime)
            .iter(|| async { drop(GenerationPool::get(pool).await.unwrap()) })
    });
    group.bench_function("guard fast path", |b| {
        b.to_async(&runtime)
            .iter(|| async { drop(stack.guard.admit().await.unwrap()) })
    });
    group.finish();
}

criterion_group!(benches, memory_pool, backend_pool);
criterion_main!(benches);
