//! The `pgwarden` binary: for now it checks that a database is reachable
//! through pgwarden's own backend connections and pool.

use anyhow::Context;
use pgwarden::backend::{ConnectOptions, Connector};
use pgwarden::pool::{Pool, PoolConfig};

const DEFAULT_DATABASE_URL: &str = "postgresql://postgres@127.0.0.1:5432/postgres";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("DATABASE_URL").ok())
        .unwrap_or_else(|| DEFAULT_DATABASE_URL.to_owned());
    let options = ConnectOptions::from_url(&url)?;
    let target = options.describe_target();
    let pool = Pool::new(Connector::new(options)?, PoolConfig::default())?;
    let connections = pool
        .warm()
        .await
        .with_context(|| format!("connecting to {target}"))?;
    let version = connections[0]
        .parameter("server_version")
        .unwrap_or("unknown")
        .to_owned();
    drop(connections);
    let status = pool.status();
    println!(
        "Connected to {target}: PostgreSQL {version}, {} warm connection(s).",
        status.idle
    );
    Ok(())
}
