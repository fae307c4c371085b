//! The monitoring plan against a real Prometheus: it scrapes pgwarden every
//! second with the shipped rules loaded; traffic and forced reconnects (the
//! admin endpoint and a real database restart) then have to show up in every
//! dashboard expression and recording rule, and "too many reconnects" must
//! fire after the sixth reconnect and not after the fifth.

mod support;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use support::Cluster;
use support::daemon::{TestDaemon, config_for};
use support::repo::{dashboards, repo};

/// A private Prometheus, stopped when dropped.
struct Prometheus {
    child: Child,
    url: String,
    _data: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Prometheus {
    /// Starts Prometheus scraping `target` (host:port) every second with the shipped rules.
    async fn start(target: &str) -> Prometheus {
        let data = tempfile::tempdir().unwrap();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: pgwarden\n    static_configs:\n      - targets: ['{target}']\n",
            repo("alerts/pgwarden.rules.yml").display()
        );
        let config_path = data.path().join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                data.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus not found: install the Debian package `prometheus`");
        let prometheus = Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _data: data,
        };
        prometheus.wait_for_first_scrape().await;
        prometheus
    }

    /// Waits until Prometheus answers and has scraped pgwarden once (it
    /// applies new targets only every few seconds after start).
    async fn wait_for_first_scrape(&self) {
        let client = reqwest::Client::new();
        for _ in 0..600 {
            let up = client
                .get(format!("{}/api/v1/query", self.url))
                .query(&[("query", "up{job=\"pgwarden\"} == 1")])
                .send()
                .await;
            if let Ok(response) = up
                && let Ok(body) = response.json::<Value>().await
                && body["data"]["result"]
                    .as_array()
                    .is_some_and(|r| !r.is_empty())
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("prometheus never scraped pgwarden");
    }

    async fn api(&self, path: &str, params: &[(&str, String)]) -> Value {
        let response = reqwest::Client::new()
            .get(format!("{}{path}", self.url))
            .query(params)
            .send()
            .await
            .unwrap();
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["status"], "success", "{path} {params:?}: {body}");
        body["data"].clone()
    }

    /// The series an expression returns at any second of the last `window`.
    async fn range(&self, expr: &str, window: Duration) -> Vec<Value> {
        let end = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let params = [
            ("query", expr.to_owned()),
            ("start", (end - window.as_secs_f64()).to_string()),
            ("end", end.to_string()),
            ("step", "1".to_owned()),
        ];
        self.api("/api/v1/query_range", &params).await["result"]
            .as_array()
            .unwrap()
            .clone()
    }

    /// Alert states (`pending`, `firing`) of `name` right now.
    async fn alert_states(&self, name: &str) -> Vec<String> {
        let alerts = self.api("/api/v1/alerts", &[]).await;
        alerts["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["labels"]["alertname"] == name)
            .map(|a| a["state"].as_str().unwrap().to_owned())
            .collect()
    }

    /// Waits (30 s at most) until `expr` evaluates to `value`.
    async fn wait_for_value(&self, expr: &str, value: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let data = self
                .api("/api/v1/query", &[("query", expr.to_owned())])
                .await;
            if data["result"][0]["value"][1] == value {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{expr} never became {value}: {data}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits (30 s at most) until the rule groups have been evaluated twice
    /// more after now, so alerts reflect what the recording rules show.
    async fn two_more_evaluations(&self) {
        let last = |data: &Value| {
            data["groups"][1]["lastEvaluation"]
                .as_str()
                .unwrap_or("")
                .to_owned()
        };
        let mut seen = last(&self.api("/api/v1/rules", &[]).await);
        for _ in 0..2 {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            loop {
                let now = last(&self.api("/api/v1/rules", &[]).await);
                if now != seen {
                    seen = now;
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the rules are not evaluated"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Every PromQL expression of every panel, and the annotation, with Grafana's variables filled in.
fn dashboard_expressions() -> Vec<(String, String)> {
    let mut expressions = Vec::new();
    for (_, dashboard) in dashboards() {
        for panel in dashboard["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().unwrap() {
                let title = format!("{} / {}", panel["title"].as_str().unwrap(), target["refId"]);
                expressions.push((title, target["expr"].as_str().unwrap().to_owned()));
            }
        }
        for annotation in dashboard["annotations"]["list"].as_array().unwrap() {
            expressions.push((
                "annotation".into(),
                annotation["expr"].as_str().unwrap().to_owned(),
            ));
        }
    }
    expressions
        .into_iter()
        .map(|(title, expr)| {
            let filled = expr
                .replace("$__rate_interval", "10s")
                .replace("$__range", "5m")
                .replace("$job", "pgwarden")
                .replace("$instance", ".*");
            (title, filled)
        })
        .collect()
}

async fn traffic(daemon: &TestDaemon, rounds: usize) {
    for round in 0..rounds {
        daemon.query("SELECT 1", json!([])).await;
        if round % 5 == 0 {
            let _ = daemon.sql(r#"{"query":"SELECT 1/0"}"#, &[]).await;
        }
    }
}

async fn reconnect(daemon: &TestDaemon, generation: u64) {
    let accepted = daemon
        .client
        .post(format!("{}/admin/reconnect", daemon.ops))
        .send()
        .await
        .unwrap();
    assert_eq!(accepted.status(), reqwest::StatusCode::ACCEPTED);
    wait_generation(daemon, generation).await;
}

async fn wait_generation(daemon: &TestDaemon, generation: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while daemon.ops_get("/status").await.body["generation"] != generation {
        assert!(
            tokio::time::Instant::now() < deadline,
            "generation {generation} never came"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboards_recording_rules_and_the_reconnect_alert_work_on_real_data() {
    let cluster = Arc::new(Cluster::start());
    let mut config = config_for(&cluster);
    config.warmup_queries = vec!["SELECT pg_sleep(0.2)".into()];
    // Reconnects here are made on purpose; a health check timing out on a
    // loaded machine must not add one of its own.
    config.health_check_interval_ms = 2_000;
    config.health_check_timeout_ms = 10_000;
    let daemon = Arc::new(TestDaemon::start(config).await);
    let prometheus = Prometheus::start(daemon.ops.trim_start_matches("http://")).await;

    // Normal traffic first, so "normal window" expressions have data.
    traffic(&daemon, 200).await;
    prometheus
        .wait_for_value(
            "sum(pgwarden_requests_duration_seconds_count{outcome=\"ok\"}) >= bool 200",
            "1",
        )
        .await;
    traffic(&daemon, 50).await;

    // Twenty seconds of history first: increase() extrapolates a series only
    // a few samples old by up to a whole scrape interval, which would round
    // five reconnects up to six.
    prometheus
        .wait_for_value("count_over_time(pgwarden_build_info[1m]) >= bool 20", "1")
        .await;

    // Five admin reconnects with traffic running, so requests wait in the guard.
    let busy = daemon.clone();
    let load = tokio::spawn(async move { traffic(&busy, 400).await });
    for generation in 2..=6 {
        reconnect(&daemon, generation).await;
    }
    load.await.unwrap();
    let made = daemon.metrics().await;
    let reconnects: f64 = made
        .lines()
        .filter(|l| l.starts_with("pgwarden_reconnects_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(
        reconnects, 5.0,
        "exactly the five admin reconnects happened"
    );
    prometheus
        .wait_for_value("pgwarden:reconnects:increase24h", "5")
        .await;
    prometheus.two_more_evaluations().await;
    assert_eq!(
        prometheus.alert_states("PgwardenTooManyReconnects").await,
        Vec::<String>::new(),
        "5 reconnects must not page"
    );

    // The sixth: a real database restart.
    let kit = cluster.clone();
    tokio::task::spawn_blocking(move || kit.restart_fast())
        .await
        .unwrap();
    traffic(&daemon, 50).await;
    wait_generation(&daemon, 7).await;
    prometheus
        .wait_for_value("pgwarden:reconnects:increase24h", "6")
        .await;
    prometheus.two_more_evaluations().await;
    let states = prometheus.alert_states("PgwardenTooManyReconnects").await;
    assert!(
        states.iter().any(|s| s == "firing" || s == "pending"),
        "6 reconnects must page: {states:?}"
    );

    let window = Duration::from_secs(120);
    for (title, expr) in dashboard_expressions() {
        let series = prometheus.range(&expr, window).await;
        assert!(!series.is_empty(), "panel {title} returns no data: {expr}");
    }
    let rules = std::fs::read_to_string(repo("alerts/pgwarden.rules.yml")).unwrap();
    for record in rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- record: "))
    {
        let series = prometheus.range(record, window).await;
        assert!(
            !series.is_empty(),
            "recording rule {record} produces no series"
        );
    }
    let reconnects = prometheus
        .api(
            "/api/v1/query",
            &[("query", "pgwarden:reconnects:increase24h".to_owned())],
        )
        .await;
    assert_eq!(reconnects["result"][0]["value"][1], "6", "{reconnects}");
}
