//! The price of never doubting a write: single-row UPDATE latency with
//! `write_safety = "resolve"` (statement, then COMMIT: two round trips)
//! against `"fast"` (one round trip), and a point read for reference, all
//! through the executor against one private PostgreSQL in the same run.
//!
//! Run with `cargo bench --bench write_safety`; results are ratios against
//! the `fast` baseline measured in the same run.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use pgwarden::backend::Statement;
use pgwarden::guard::{ExecSettings, Executor, Guard, WriteSafety};
use support::Cluster;
use support::pg::superuser;
use support::stack::{Stack, quick_settings};

const WARMUP: usize = 200;
const SAMPLES: usize = 3000;

fn executor(stack: &Stack, write_safety: WriteSafety) -> Executor {
    let registry = prometheus::Registry::new();
    let metrics = pgwarden::telemetry::Metrics::new(&registry).unwrap();
    let guard = Guard::new(
        stack.lifecycle.clone(),
        Duration::from_secs(3),
        metrics.clone(),
    );
    let settings = ExecSettings {
        write_safety,
        ..ExecSettings::default()
    };
    Executor::new(guard, settings, metrics)
}

async fn measure(executor: &Executor, statement: &Statement) -> Vec<Duration> {
    for _ in 0..WARMUP {
        executor.query(statement).await.unwrap();
    }
    let mut samples = Vec::with_capacity(SAMPLES);
    for _ in 0..SAMPLES {
        let started = Instant::now();
        executor.query(statement).await.unwrap();
        samples.push(started.elapsed());
    }
    samples.sort();
    samples
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let cluster = Cluster::start();
    cluster.psql("CREATE TABLE purchase_order (id int PRIMARY KEY, n int); INSERT INTO purchase_order VALUES (1, 0)");
    runtime.block_on(async {
        let stack = Stack::start(
            superuser(&cluster),
            quick_settings(),
            Duration::from_secs(3),
        );
        stack.ready(1).await;
        let update = Statement::new("UPDATE purchase_order SET n = n + 1 WHERE id = 1");
        let read = Statement::new("SELECT n FROM purchase_order WHERE id = 1");
        let fast = measure(&executor(&stack, WriteSafety::Fast), &update).await;
        let resolve = measure(&executor(&stack, WriteSafety::Resolve), &update).await;
        let reads = measure(&executor(&stack, WriteSafety::Resolve), &read).await;
        println!("{SAMPLES} sequential requests each, one client, after {WARMUP} warm-up requests");
        println!(
            "{:<26} {:>10} {:>10} {:>14}",
            "case", "p50", "p99", "p50 vs fast"
        );
        let base = percentile(&fast, 0.5).as_secs_f64();
        for (name, samples) in [
            ("UPDATE, fast", &fast),
            ("UPDATE, resolve", &resolve),
            ("point read (read-only tx)", &reads),
        ] {
            let p50 = percentile(samples, 0.5);
            let p99 = percentile(samples, 0.99);
            println!(
                "{name:<26} {:>10?} {:>10?} {:>13.2}x",
                p50,
                p99,
                p50.as_secs_f64() / base
            );
        }
    });
}
