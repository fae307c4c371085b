//! A Rust service that keeps its deadpool-postgres pool and points it at
//! pgwarden's wire port: the only change is the address. Its statements
//! are prepared and cached per connection (`prepare_cached`), as services
//! do, and pgwarden carries them from server session to server session.
//!
//! Each worker takes a pooled client, increments its own counter and reads
//! it back, in a loop; once a second the service prints how many calls
//! succeeded and failed. Restart the database while it runs
//! (`pg_ctl restart -m fast`): calls made during the restart wait for it,
//! the pool's connections stay open and their prepared statements keep
//! working; only a statement in flight at the very moment the server goes
//! down gets an error (08006/08007, which says whether it may have run).
//!
//! ```sh
//! cargo run --release --example deadpool_service -- \
//!     "host=127.0.0.1 port=6432 user=postgres dbname=postgres" 16 30
//! ```
//!
//! Arguments: a libpq-style connection string (default as above), the pool
//! size (16), the seconds to run (30).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

type Error = Box<dyn std::error::Error + Send + Sync>;

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let dsn = args
        .next()
        .unwrap_or_else(|| "host=127.0.0.1 port=6432 user=postgres dbname=postgres".into());
    let size: usize = args.next().map_or(Ok(16), |a| a.parse())?;
    let seconds: u64 = args.next().map_or(Ok(30), |a| a.parse())?;

    let config: tokio_postgres::Config = dsn.parse()?;
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let pool = Pool::builder(manager).max_size(size).build()?;
    pool.get()
        .await?
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS deadpool_counter (worker int PRIMARY KEY, n bigint NOT NULL)",
        )
        .await?;

    let tally = Arc::new(Tally::default());
    let until = Instant::now() + Duration::from_secs(seconds);
    let workers: Vec<_> = (0..size as i32)
        .map(|worker| tokio::spawn(work(pool.clone(), worker, until, tally.clone())))
        .collect();
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_secs(1)).await;
        println!(
            "ok {:>8}   failed {:>4}",
            tally.ok.load(Ordering::Relaxed),
            tally.failed.load(Ordering::Relaxed)
        );
    }
    for worker in workers {
        worker.await?;
    }
    Ok(())
}

/// One worker: increments its counter and reads it back until `until`.
async fn work(pool: Pool, worker: i32, until: Instant, tally: Arc<Tally>) {
    while Instant::now() < until {
        match call(&pool, worker).await {
            Ok(()) => tally.ok.fetch_add(1, Ordering::Relaxed),
            Err(error) => {
                eprintln!("worker {worker}: {error}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                tally.failed.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

async fn call(pool: &Pool, worker: i32) -> Result<(), Error> {
    let client = pool.get().await?;
    let increment = client
        .prepare_cached(
            "INSERT INTO deadpool_counter VALUES ($1, 1) \
             ON CONFLICT (worker) DO UPDATE SET n = deadpool_counter.n + 1",
        )
        .await?;
    client.execute(&increment, &[&worker]).await?;
    let read = client
        .prepare_cached("SELECT n FROM deadpool_counter WHERE worker = $1")
        .await?;
    let n: i64 = client.query_one(&read, &[&worker]).await?.get(0);
    debug_assert!(n > 0);
    Ok(())
}
