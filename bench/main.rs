//! `pgwarden-bench`: load, one fault, and a write ledger, against pgwarden's
//! HTTP API or any PostgreSQL DSN. See `driver.rs` for what is measured.
//!
//! ```sh
//! cargo run --release --example pgwarden-bench -- \
//!   --target http://127.0.0.1:4444/sql --admin-dsn postgresql://postgres@127.0.0.1:5432/postgres \
//!   --clients 16 --duration-s 10 --fault restart --fault-at-s 3 \
//!   --fault-cmd 'pg_ctl -D /path/to/data restart -m fast' --json report.json --svg timeline.svg
//! ```

mod driver;

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use driver::{Fault, Mix, Plan, Target};

/// Load and fault driver with a write ledger.
#[derive(Debug, Parser)]
struct Args {
    /// `http://…/sql` (pgwarden) or `postgresql://…` (direct or through a pooler).
    #[arg(long)]
    target: String,
    /// Connection string clients present to pgwarden (HTTP targets only).
    #[arg(long, default_value = "postgresql://postgres@localhost/postgres")]
    connection_string: String,
    /// Direct DSN used to prepare `purchase_order` and read the ledger.
    #[arg(long)]
    admin_dsn: String,
    /// Concurrent clients.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Length of the run in seconds.
    #[arg(long, default_value_t = 10.0)]
    duration_s: f64,
    /// Name of the fault for the report.
    #[arg(long)]
    fault: Option<String>,
    /// Shell command that causes the fault.
    #[arg(long)]
    fault_cmd: Option<String>,
    /// When the fault starts, in seconds.
    #[arg(long, default_value_t = 3.0)]
    fault_at_s: f64,
    /// Length of the window after the fault, in seconds.
    #[arg(long, default_value_t = 5.0)]
    window_s: f64,
    /// What the clients send: orders (reads and UPDATEs), reads, or select1.
    #[arg(long, default_value = "orders")]
    mix: String,
    /// Write the JSON report here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the timeline plot (SVG) here.
    #[arg(long)]
    svg: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let target = if args.target.starts_with("http") {
        Target::Http {
            url: args.target.clone(),
            connection_string: args.connection_string.clone(),
        }
    } else {
        Target::Postgres {
            dsn: args.target.clone(),
        }
    };
    let fault = args.fault_cmd.as_ref().map(|command| Fault {
        name: args.fault.clone().unwrap_or_else(|| "fault".into()),
        at: Duration::from_secs_f64(args.fault_at_s),
        command: command.clone(),
    });
    let mix = match args.mix.as_str() {
        "orders" => Mix::Orders,
        "reads" => Mix::Reads,
        "select1" => Mix::Select1,
        other => anyhow::bail!("--mix {other:?}: use orders, reads or select1"),
    };
    let plan = Plan {
        mix,
        target,
        clients: args.clients,
        duration: Duration::from_secs_f64(args.duration_s),
        fault,
        window: Duration::from_secs_f64(args.window_s),
        admin_dsn: args.admin_dsn.clone(),
    };
    let report = driver::run(&plan).await.map_err(anyhow::Error::msg)?;
    print!("{}", driver::table(&report));
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    if let Some(path) = &args.svg {
        std::fs::write(path, driver::svg(&report))?;
    }
    Ok(())
}
