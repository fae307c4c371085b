//! The `pgwarden` binary: parses the command line, loads the configuration,
//! starts the daemon and shuts it down on SIGTERM or Ctrl-C (a second signal
//! exits at once).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use pgwarden::config::{Config, Sources};
use tokio::signal::unix::{SignalKind, signal};

/// A PostgreSQL connection-lifecycle daemon with a Neon-compatible HTTP API.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// TOML configuration file (see pgwarden.example.toml); also PGWARDEN_CONFIG.
    #[arg(long)]
    config: Option<PathBuf>,
    /// PostgreSQL to connect to (overrides DATABASE_URL and the file).
    #[arg(long)]
    database_url: Option<String>,
    /// Address of the data API, e.g. 127.0.0.1:4444.
    #[arg(long)]
    listen: Option<String>,
    /// Address of the ops listener (metrics, health, status, admin).
    #[arg(long)]
    ops_listen: Option<String>,
    /// Address of the PostgreSQL wire front end, e.g. 127.0.0.1:6432 ("" turns it off).
    #[arg(long)]
    pg_listen: Option<String>,
    /// Log format: text or json.
    #[arg(long)]
    log_format: Option<String>,
}

impl Cli {
    fn sources(self) -> Sources {
        let mut env: BTreeMap<String, String> = std::env::vars().collect();
        let file = self
            .config
            .or_else(|| env.remove("PGWARDEN_CONFIG").map(PathBuf::from));
        let mut flags = BTreeMap::new();
        let pairs = [
            ("database_url", self.database_url),
            ("listen", self.listen),
            ("ops_listen", self.ops_listen),
            ("pg_listen", self.pg_listen),
            ("log_format", self.log_format),
        ];
        for (key, value) in pairs {
            if let Some(value) = value {
                flags.insert(key.to_owned(), value);
            }
        }
        Sources { file, env, flags }
    }
}

/// Prints where pgwarden serves. Best effort: a closed stdout must not
/// take the daemon down.
fn announce(daemon: &pgwarden::app::Daemon) {
    let wire = match daemon.pg_addr() {
        Some(address) => format!("  postgres   postgresql://{address}/\n"),
        None => String::new(),
    };
    let text = format!(
        "pgwarden {} is serving:\n  data API   POST http://{}/sql\n{wire}  metrics    http://{}/metrics\n  status     http://{}/status\n",
        env!("CARGO_PKG_VERSION"),
        daemon.data_addr(),
        daemon.ops_addr(),
        daemon.ops_addr(),
    );
    let mut stdout = std::io::stdout();
    let _ = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush());
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Before anything else, so a signal during start-up is not fatal.
    let mut terminate = signal(SignalKind::terminate())?;
    let config = Config::load(&Cli::parse().sources())?;
    let telemetry = pgwarden::telemetry::logging::init(&config.log_format);
    let daemon = pgwarden::app::start(&config)
        .await
        .context("starting pgwarden")?;
    announce(&daemon);
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tokio::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        eprintln!("Second signal: exiting at once.");
        std::process::exit(130);
    });
    daemon.shutdown().await;
    telemetry.shutdown();
    Ok(())
}
