//! The load and fault driver: W clients run point reads and single-row
//! UPDATEs against pgwarden's HTTP API or a PostgreSQL DSN (direct or
//! through a pooler) while one fault is injected, and a write ledger
//! compares acknowledged UPDATEs with what the database holds at the end.
//!
//! Every client owns one row of `purchase_order`, so the ledger is exact:
//! each acknowledged UPDATE added 1 to that row. Writes answered with
//! SQLSTATE 08007 may or may not have been applied and are counted apart.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pgwarden::backend::{ConnectOptions, Connector, Scope, Statement};
use pgwarden::pool::{Pool, PoolConfig};
use serde::Serialize;
use serde_json::json;

/// Where the clients send their queries.
#[derive(Clone, Debug)]
pub enum Target {
    /// pgwarden's `POST /sql`, with the connection string clients present.
    Http {
        url: String,
        connection_string: String,
    },
    /// A PostgreSQL server or pooler, over the Postgres protocol, through a client-side pool.
    Postgres { dsn: String },
}

/// A fault: a shell command run once, `at` after the start.
#[derive(Clone, Debug)]
pub struct Fault {
    /// Short name for the report (restart, crash, terminate, stall, outage).
    pub name: String,
    /// When to run it.
    pub at: Duration,
    /// The shell command that causes it (and, for an outage, ends it).
    pub command: String,
}

/// One benchmark run.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Where the load goes.
    pub target: Target,
    /// Concurrent clients.
    pub clients: usize,
    /// How long the load runs.
    pub duration: Duration,
    /// The fault, if any.
    pub fault: Option<Fault>,
    /// Length of the window after the fault that the "in window" numbers describe.
    pub window: Duration,
    /// Direct DSN for setting up the table and reading the ledger.
    pub admin_dsn: String,
    /// What the clients send.
    pub mix: Mix,
}

/// What the clients send.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mix {
    /// Point reads and single-row UPDATEs, alternately (with the write ledger).
    #[default]
    Orders,
    /// Point reads only.
    Reads,
    /// `SELECT 1` only: the cost of the path itself.
    Select1,
}

impl Mix {
    /// The statement for a client's `turn`, and whether it is a write.
    fn statement(self, turn: u64) -> (&'static str, bool) {
        const READ: &str = "SELECT n, note FROM purchase_order WHERE id = $1";
        const WRITE: &str = "UPDATE purchase_order SET n = n + 1 WHERE id = $1";
        match self {
            Mix::Orders if turn.is_multiple_of(2) => (WRITE, true),
            Mix::Orders | Mix::Reads => (READ, false),
            Mix::Select1 => ("SELECT 1 WHERE $1::int IS NOT NULL", false),
        }
    }
}

/// How a request ended, from the client's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Answered with a result.
    Ok,
    /// The database rejected the statement.
    SqlError,
    /// The service said it is unavailable (HTTP 503, SQLSTATE 57P03).
    Unavailable,
    /// The connection failed under the request.
    ConnectionLost,
    /// SQLSTATE 08007: a write may or may not have been applied.
    ResolutionUnknown,
    /// Anything else.
    Other,
}

#[derive(Clone, Copy, Debug)]
struct Sample {
    started_ms: u64,
    latency_us: u64,
    outcome: Outcome,
}

struct Client {
    row: usize,
    samples: Vec<Sample>,
    acknowledged: u64,
    /// Writes answered 08007.
    unknown: u64,
    /// Writes whose connection failed under them: applied or not, nobody said.
    ambiguous: u64,
}

/// Prepares `purchase_order` with one zeroed row per client.
async fn prepare(admin_dsn: &str, rows: usize) -> Result<(), String> {
    let mut conn = connect(admin_dsn).await?;
    let setup = format!(
        "CREATE TABLE IF NOT EXISTS purchase_order (id int PRIMARY KEY, n bigint NOT NULL DEFAULT 0, note text);\
         TRUNCATE purchase_order;\
         INSERT INTO purchase_order (id, n, note) SELECT g, 0, 'order ' || g FROM generate_series(1, {rows}) g"
    );
    conn.simple_query(&setup).await.map_err(|e| e.to_string())?;
    Ok(())
}

async fn connect(dsn: &str) -> Result<pgwarden::backend::Connection, String> {
    let options = ConnectOptions::from_url(dsn).map_err(|e| e.to_string())?;
    Connector::new(options)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| e.to_string())
}

/// What the database holds per row at the end.
async fn stored(admin_dsn: &str) -> Result<BTreeMap<usize, u64>, String> {
    let mut conn = connect(admin_dsn).await?;
    let result = conn
        .simple_query("SELECT id, n FROM purchase_order")
        .await
        .map_err(|e| e.to_string())?;
    let mut rows = BTreeMap::new();
    for row in &result[0].rows {
        let id = row.get(0).and_then(|v| v.parse().ok()).unwrap_or(0);
        let n = row.get(1).and_then(|v| v.parse().ok()).unwrap_or(0);
        rows.insert(id, n);
    }
    Ok(rows)
}

/// Sends one statement to the target and classifies the answer.
enum Sender {
    Http {
        client: reqwest::Client,
        url: String,
        connection_string: String,
    },
    Postgres {
        pool: Pool,
    },
}

impl Sender {
    fn new(target: &Target, clients: usize) -> Result<Sender, String> {
        Ok(match target {
            Target::Http {
                url,
                connection_string,
            } => Sender::Http {
                client: reqwest::Client::builder()
                    .timeout(Duration::from_secs(30))
                    .build()
                    .map_err(|e| e.to_string())?,
                url: url.clone(),
                connection_string: connection_string.clone(),
            },
            Target::Postgres { dsn } => {
                let options = ConnectOptions::from_url(dsn).map_err(|e| e.to_string())?;
                let connector = Connector::new(options).map_err(|e| e.to_string())?;
                // Like an application's pool: no session reset between uses.
                let config = PoolConfig {
                    max_connections: clients,
                    min_connections: 1,
                    reset_on_reuse: false,
                    ..PoolConfig::default()
                };
                Sender::Postgres {
                    pool: Pool::new(connector, config).map_err(|e| e.to_string())?,
                }
            }
        })
    }

    async fn send(&self, sql: &str, param: String) -> Outcome {
        match self {
            Sender::Http {
                client,
                url,
                connection_string,
            } => {
                let body = json!({ "query": sql, "params": [param] }).to_string();
                let response = client
                    .post(url)
                    .header("Neon-Connection-String", connection_string)
                    .header("Neon-Array-Mode", "true")
                    .body(body)
                    .send()
                    .await;
                let Ok(response) = response else {
                    return Outcome::ConnectionLost;
                };
                let status = response.status().as_u16();
                let body: serde_json::Value = response.json().await.unwrap_or_default();
                classify_http(status, body["code"].as_str())
            }
            Sender::Postgres { pool } => {
                let statement = Statement::with_params(sql, vec![Some(param)]);
                let mut conn = match pool.get().await {
                    Ok(conn) => conn,
                    Err(e) if e.scope() != Scope::Statement => return Outcome::ConnectionLost,
                    Err(_) => return Outcome::Unavailable,
                };
                match conn.query(&statement).await {
                    Ok(_) => Outcome::Ok,
                    Err(e) if e.db_error().is_some_and(|d| d.code == "08007") => {
                        Outcome::ResolutionUnknown
                    }
                    Err(e) if e.is_connection_level() => Outcome::ConnectionLost,
                    Err(_) => Outcome::SqlError,
                }
            }
        }
    }
}

fn classify_http(status: u16, code: Option<&str>) -> Outcome {
    match (status, code) {
        (200, _) => Outcome::Ok,
        (_, Some("08007")) => Outcome::ResolutionUnknown,
        (503, _) | (_, Some("57P03")) => Outcome::Unavailable,
        (_, Some(c)) if c.starts_with("08") || c.starts_with("57P") => Outcome::ConnectionLost,
        (400, _) => Outcome::SqlError,
        _ => Outcome::Other,
    }
}

async fn client_loop(
    sender: Arc<Sender>,
    row: usize,
    mix: Mix,
    start: Instant,
    stop: Arc<AtomicBool>,
) -> Client {
    let mut client = Client {
        row,
        samples: Vec::new(),
        acknowledged: 0,
        unknown: 0,
        ambiguous: 0,
    };
    let mut turn = 0u64;
    while !stop.load(Ordering::Relaxed) {
        turn += 1;
        let (sql, is_write) = mix.statement(turn);
        let began = Instant::now();
        let outcome = sender.send(sql, row.to_string()).await;
        let sample = Sample {
            started_ms: began.duration_since(start).as_millis() as u64,
            latency_us: began.elapsed().as_micros() as u64,
            outcome,
        };
        client.samples.push(sample);
        match (is_write, outcome) {
            (true, Outcome::Ok) => client.acknowledged += 1,
            (true, Outcome::ResolutionUnknown) => client.unknown += 1,
            (true, Outcome::ConnectionLost | Outcome::Other) => client.ambiguous += 1,
            _ => {}
        }
        if outcome != Outcome::Ok && outcome != Outcome::SqlError {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    client
}

/// Runs the plan and returns its report.
pub async fn run(plan: &Plan) -> Result<Report, String> {
    prepare(&plan.admin_dsn, plan.clients).await?;
    let sender = Arc::new(Sender::new(&plan.target, plan.clients)?);
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let clients: Vec<_> = (1..=plan.clients)
        .map(|row| {
            tokio::spawn(client_loop(
                sender.clone(),
                row,
                plan.mix,
                start,
                stop.clone(),
            ))
        })
        .collect();
    let fault = match &plan.fault {
        Some(fault) => Some(inject(fault, start).await?),
        None => None,
    };
    let elapsed = start.elapsed();
    if elapsed < plan.duration {
        tokio::time::sleep(plan.duration - elapsed).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut finished = Vec::new();
    for client in clients {
        finished.push(client.await.map_err(|e| e.to_string())?);
    }
    let stored = stored(&plan.admin_dsn).await?;
    Ok(Report::build(
        plan,
        &finished,
        fault,
        &stored,
        start.elapsed(),
    ))
}

/// When the fault ran: (started, finished) in ms since the start.
async fn inject(fault: &Fault, start: Instant) -> Result<(u64, u64), String> {
    tokio::time::sleep(fault.at.saturating_sub(start.elapsed())).await;
    let began = start.elapsed().as_millis() as u64;
    let command = fault.command.clone();
    let status = tokio::task::spawn_blocking(move || {
        std::process::Command::new("sh")
            .arg("-c")
            .arg(command)
            .status()
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("fault command: {e}"))?;
    if !status.success() {
        return Err(format!("fault command failed: {status}"));
    }
    Ok((began, start.elapsed().as_millis() as u64))
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Default, Serialize)]
pub struct Latency {
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    fn of(samples: &[&Sample]) -> Latency {
        let mut us: Vec<u64> = samples.iter().map(|s| s.latency_us).collect();
        us.sort_unstable();
        let at = |q: f64| {
            us.get(((us.len().max(1) - 1) as f64 * q).round() as usize)
                .map_or(0.0, |v| *v as f64 / 1000.0)
        };
        Latency {
            p50_ms: at(0.5),
            p95_ms: at(0.95),
            p99_ms: at(0.99),
            max_ms: at(1.0),
        }
    }
}

/// The write ledger's verdict.
#[derive(Debug, Default, Serialize)]
pub struct Ledger {
    /// UPDATEs answered with success.
    pub acknowledged: u64,
    /// The increments the database holds.
    pub stored: u64,
    /// UPDATEs answered 08007 (may or may not be applied).
    pub unknown_08007: u64,
    /// UPDATEs whose connection failed under them without an answer.
    pub ambiguous: u64,
    /// Acknowledged but not stored.
    pub lost: u64,
    /// Stored beyond every write that could have been applied.
    pub doubled: u64,
}

/// Counts in one slice of time.
#[derive(Debug, Serialize)]
pub struct Slice {
    pub t_ms: u64,
    pub ok: u64,
    pub errors: u64,
    pub p99_ms: f64,
}

/// Everything one run measured.
#[derive(Debug, Serialize)]
pub struct Report {
    pub target: String,
    pub clients: usize,
    pub duration_s: f64,
    pub fault: Option<serde_json::Value>,
    pub ops: u64,
    pub success_rate: f64,
    pub errors: BTreeMap<String, u64>,
    pub latency: Latency,
    pub throughput_before_fault: f64,
    pub window: serde_json::Value,
    pub first_success_after_fault_ms: Option<u64>,
    pub last_error_after_fault_ms: Option<u64>,
    /// From the end of the fault command (the database is back) to the
    /// first success that completed after it: the recovery time.
    pub first_success_after_fault_end_ms: Option<u64>,
    pub ledger: Ledger,
    pub timeline: Vec<Slice>,
}

impl Report {
    fn build(
        plan: &Plan,
        clients: &[Client],
        fault: Option<(u64, u64)>,
        stored: &BTreeMap<usize, u64>,
        took: Duration,
    ) -> Report {
        let samples: Vec<&Sample> = clients.iter().flat_map(|c| &c.samples).collect();
        let mut errors = BTreeMap::new();
        for s in samples.iter().filter(|s| !answered(s)) {
            *errors.entry(format!("{:?}", s.outcome)).or_insert(0) += 1;
        }
        let fault_at = fault.map_or(u64::MAX, |f| f.0);
        let window_end = fault_at.saturating_add(plan.window.as_millis() as u64);
        let in_window: Vec<&Sample> = samples
            .iter()
            .copied()
            .filter(|s| s.started_ms >= fault_at && s.started_ms < window_end)
            .collect();
        let before: Vec<&&Sample> = samples.iter().filter(|s| s.started_ms < fault_at).collect();
        let rate = |set: &[&Sample]| {
            if set.is_empty() {
                1.0
            } else {
                set.iter().filter(|s| answered(s)).count() as f64 / set.len() as f64
            }
        };
        let after = |want_ok: bool| {
            samples
                .iter()
                .filter(|s| s.started_ms >= fault_at && answered(s) == want_ok)
                .map(|s| s.started_ms + s.latency_us / 1000 - fault_at)
                .reduce(if want_ok { u64::min } else { u64::max })
        };
        let window = json!({
            "start_ms": fault.map(|f| f.0), "length_ms": plan.window.as_millis() as u64,
            "ops": in_window.len(), "success_rate": rate(&in_window), "latency": Latency::of(&in_window),
        });
        Report {
            target: describe(&plan.target),
            clients: plan.clients,
            duration_s: took.as_secs_f64(),
            fault: plan
                .fault
                .as_ref()
                .zip(fault)
                .map(|(f, (a, b))| json!({"name": f.name, "at_ms": a, "took_ms": b - a})),
            ops: samples.len() as u64,
            success_rate: rate(&samples),
            errors,
            latency: Latency::of(&samples),
            throughput_before_fault: before.len() as f64
                / (fault_at.min(took.as_millis() as u64).max(1) as f64 / 1000.0),
            window,
            first_success_after_fault_ms: fault.and(after(true)),
            last_error_after_fault_ms: fault.and(after(false)),
            first_success_after_fault_end_ms: fault.and_then(|(_, end)| {
                samples
                    .iter()
                    .map(|s| s.started_ms + s.latency_us / 1000)
                    .zip(samples.iter().map(|s| answered(s)))
                    .filter(|&(done, ok)| ok && done >= end)
                    .map(|(done, _)| done - end)
                    .min()
            }),
            ledger: ledger(clients, stored),
            timeline: timeline(&samples),
        }
    }
}

/// The service answered (an SQL error is an answer, not an outage).
fn answered(sample: &Sample) -> bool {
    matches!(sample.outcome, Outcome::Ok | Outcome::SqlError)
}

fn describe(target: &Target) -> String {
    match target {
        Target::Http { url, .. } => format!("http {url}"),
        Target::Postgres { dsn } => {
            let options = ConnectOptions::from_url(dsn)
                .map(|o| o.describe_target())
                .unwrap_or_default();
            format!("postgres {options}")
        }
    }
}

fn ledger(clients: &[Client], stored: &BTreeMap<usize, u64>) -> Ledger {
    let mut ledger = Ledger::default();
    for client in clients {
        let have = stored.get(&client.row).copied().unwrap_or(0);
        ledger.acknowledged += client.acknowledged;
        ledger.unknown_08007 += client.unknown;
        ledger.ambiguous += client.ambiguous;
        ledger.stored += have;
        ledger.lost += client.acknowledged.saturating_sub(have);
        ledger.doubled +=
            have.saturating_sub(client.acknowledged + client.unknown + client.ambiguous);
    }
    ledger
}

fn timeline(samples: &[&Sample]) -> Vec<Slice> {
    let end = samples.iter().map(|s| s.started_ms).max().unwrap_or(0);
    (0..=end / 100)
        .map(|slice| {
            let here: Vec<&Sample> = samples
                .iter()
                .copied()
                .filter(|s| s.started_ms / 100 == slice)
                .collect();
            let ok = here
                .iter()
                .filter(|s| matches!(s.outcome, Outcome::Ok | Outcome::SqlError))
                .count() as u64;
            Slice {
                t_ms: slice * 100,
                ok,
                errors: here.len() as u64 - ok,
                p99_ms: Latency::of(&here).p99_ms,
            }
        })
        .collect()
}

/// A human-readable summary.
pub fn table(report: &Report) -> String {
    let w = &report.window;
    let fault = report.fault.as_ref().map_or("none".to_owned(), |f| {
        format!(
            "{} at {} ms (took {} ms)",
            f["name"].as_str().unwrap_or(""),
            f["at_ms"],
            f["took_ms"]
        )
    });
    let lines = [
        ("target", report.target.clone()),
        (
            "clients / duration",
            format!("{} / {:.1} s", report.clients, report.duration_s),
        ),
        ("fault", fault),
        (
            "ops / success rate",
            format!("{} / {:.4}", report.ops, report.success_rate),
        ),
        ("errors", format!("{:?}", report.errors)),
        (
            "latency p50/p95/p99/max",
            format!(
                "{:.2} / {:.2} / {:.2} / {:.2} ms",
                report.latency.p50_ms,
                report.latency.p95_ms,
                report.latency.p99_ms,
                report.latency.max_ms
            ),
        ),
        (
            "throughput before fault",
            format!("{:.0} ops/s", report.throughput_before_fault),
        ),
        (
            "window ops / success rate",
            format!("{} / {}", w["ops"], w["success_rate"]),
        ),
        (
            "window p99 / max",
            format!("{} / {} ms", w["latency"]["p99_ms"], w["latency"]["max_ms"]),
        ),
        (
            "fault → first success / last error",
            format!(
                "{:?} / {:?} ms",
                report.first_success_after_fault_ms, report.last_error_after_fault_ms
            ),
        ),
        (
            "fault end → first success",
            format!("{:?} ms", report.first_success_after_fault_end_ms),
        ),
        (
            "writes acknowledged / stored",
            format!("{} / {}", report.ledger.acknowledged, report.ledger.stored),
        ),
        (
            "lost / doubled / 08007 / no answer",
            format!(
                "{} / {} / {} / {}",
                report.ledger.lost,
                report.ledger.doubled,
                report.ledger.unknown_08007,
                report.ledger.ambiguous
            ),
        ),
    ];
    lines
        .iter()
        .map(|(k, v)| format!("{k:<36} {v}\n"))
        .collect()
}

/// The per-100 ms timeline as an SVG plot: successes (green), errors (red)
/// and p99 latency (blue, own scale), with the fault marked.
pub fn svg(report: &Report) -> String {
    let (width, height) = (900.0, 300.0);
    let slices = &report.timeline;
    let n = slices.len().max(2) as f64 - 1.0;
    let max_count = slices
        .iter()
        .map(|s| s.ok.max(s.errors))
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let max_p99 = slices.iter().map(|s| s.p99_ms).fold(1.0, f64::max);
    let x = |i: usize| 40.0 + i as f64 / n * (width - 60.0);
    let y = |v: f64, max: f64| height - 30.0 - v / max * (height - 75.0);
    let line = |f: &dyn Fn(&Slice) -> f64, max: f64| {
        slices
            .iter()
            .enumerate()
            .map(|(i, s)| format!("{:.1},{:.1}", x(i), y(f(s), max)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let marker = |at_ms: u64, label: &str, row: f64| {
        let fx = x((at_ms / 100) as usize);
        format!(
            "<line x1=\"{fx:.1}\" y1=\"{:.1}\" x2=\"{fx:.1}\" y2=\"{:.1}\" stroke=\"black\" stroke-dasharray=\"4\"/><text x=\"{:.1}\" y=\"{row:.1}\" font-size=\"11\">{label}</text>",
            row - 9.0,
            height - 30.0,
            fx + 3.0
        )
    };
    let fault = report.fault.as_ref().map(|f| {
        let at = f["at_ms"].as_u64().unwrap_or(0);
        let end = at + f["took_ms"].as_u64().unwrap_or(0);
        let mut marks = marker(at, "fault", 32.0);
        if end / 100 > at / 100 {
            marks.push_str(&marker(end, "fault ends", 44.0));
        }
        marks
    });
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\">\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\
         <text x=\"40\" y=\"15\" font-size=\"12\">{}: ok (green) and errors (red) per 100 ms, max {max_count}; p99 (blue), max {max_p99:.1} ms</text>\
         <polyline fill=\"none\" stroke=\"green\" points=\"{}\"/>\
         <polyline fill=\"none\" stroke=\"red\" points=\"{}\"/>\
         <polyline fill=\"none\" stroke=\"blue\" points=\"{}\"/>{}\
         <text x=\"40\" y=\"{:.0}\" font-size=\"11\">0 s</text><text x=\"{:.0}\" y=\"{:.0}\" font-size=\"11\">{:.1} s</text></svg>\n",
        report.target,
        line(&|s| s.ok as f64, max_count),
        line(&|s| s.errors as f64, max_count),
        line(&|s| s.p99_ms, max_p99),
        fault.unwrap_or_default(),
        height - 10.0,
        width - 60.0,
        height - 10.0,
        n / 10.0,
    )
}
