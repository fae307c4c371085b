//! The whole daemon, started in-process on free ports against a kit cluster,
//! and an HTTP client speaking to it as the Neon driver does.

use std::time::Duration;

use pgwarden::app::Daemon;
use pgwarden::config::Config;
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde_json::Value;

use super::cluster::Cluster;

/// A running daemon and a client for it.
pub struct TestDaemon {
    /// The daemon (taken by [`TestDaemon::shutdown`]).
    pub daemon: Option<Daemon>,
    /// `http://127.0.0.1:PORT` of the data API.
    pub data: String,
    /// `http://127.0.0.1:PORT` of the ops listener.
    pub ops: String,
    /// The HTTP client.
    pub client: reqwest::Client,
    /// The connection string clients present.
    pub connection_string: String,
}

/// A response: status, headers and JSON body (`Value::Null` if not JSON).
pub struct Reply {
    /// HTTP status.
    pub status: StatusCode,
    /// Response headers.
    pub headers: HeaderMap,
    /// Parsed JSON body.
    pub body: Value,
}

/// A configuration for the daemon in front of `cluster`, connecting as the superuser.
pub fn config_for(cluster: &Cluster) -> Config {
    Config {
        database_url: format!("{}?sslmode=disable", cluster.url("postgres", None)),
        listen: "127.0.0.1:0".into(),
        ops_listen: "127.0.0.1:0".into(),
        pg_listen: "127.0.0.1:0".into(),
        health_check_interval_ms: 250,
        backoff_max_ms: 500,
        ..Config::default()
    }
}

impl TestDaemon {
    /// The address of the wire front end (tests start it on a free port).
    pub fn pg_addr(&self) -> std::net::SocketAddr {
        self.daemon
            .as_ref()
            .and_then(|d| d.pg_addr())
            .expect("the wire front end is on")
    }

    /// Starts the daemon with `config` and waits until it is ready.
    pub async fn start(config: Config) -> TestDaemon {
        Self::start_unready(config).await.ready().await
    }

    /// Starts the daemon without waiting for the database.
    pub async fn start_unready(config: Config) -> TestDaemon {
        config.validate().expect("valid test configuration");
        let daemon = pgwarden::app::start(&config).await.expect("daemon starts");
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        TestDaemon {
            data: format!("http://{}", daemon.data_addr()),
            ops: format!("http://{}", daemon.ops_addr()),
            daemon: Some(daemon),
            client,
            connection_string: "postgresql://postgres@pgwarden.invalid/postgres".into(),
        }
    }

    /// Waits (30 s at most) until `/readyz` answers 200.
    pub async fn ready(self) -> TestDaemon {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let ready = self.client.get(format!("{}/readyz", self.ops)).send().await;
            if ready.is_ok_and(|r| r.status() == StatusCode::OK) {
                return self;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the daemon never became ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `POST /sql` with the Neon headers plus `extra`.
    pub async fn sql(&self, body: impl Into<reqwest::Body>, extra: &[(&str, &str)]) -> Reply {
        let mut request = self
            .client
            .post(format!("{}/sql", self.data))
            .header("Neon-Connection-String", &self.connection_string)
            .header("Neon-Raw-Text-Output", "true")
            .header("Content-Type", "text/plain;charset=UTF-8")
            .body(body);
        for (name, value) in extra {
            request = request.header(*name, *value);
        }
        reply(request.send().await.expect("the daemon answers")).await
    }

    /// `POST /sql` of one query in array mode; panics unless it succeeds.
    pub async fn query(&self, sql: &str, params: Value) -> Value {
        let body = serde_json::json!({ "query": sql, "params": params }).to_string();
        let reply = self.sql(body, &[("Neon-Array-Mode", "true")]).await;
        assert_eq!(reply.status, StatusCode::OK, "{sql}: {}", reply.body);
        reply.body
    }

    /// `GET` on the ops listener.
    pub async fn ops_get(&self, path: &str) -> Reply {
        reply(
            self.client
                .get(format!("{}{path}", self.ops))
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    /// The text of `/metrics`.
    pub async fn metrics(&self) -> String {
        self.client
            .get(format!("{}/metrics", self.ops))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// One sample's value from `/metrics` (exact series text, e.g. `name{a="b"}`).
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.metrics().await;
        let line = text
            .lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .unwrap_or_else(|| panic!("no series {series}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }

    /// Reconnects of every reason, from `/metrics`.
    pub async fn reconnects(&self) -> f64 {
        let text = self.metrics().await;
        text.lines()
            .filter(|l| l.starts_with("pgwarden_reconnects_total{"))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum()
    }

    /// Shuts the daemon down; true when in-flight requests finished in time.
    pub async fn shutdown(&mut self) -> bool {
        self.daemon.take().expect("running").shutdown().await
    }
}

async fn reply(response: reqwest::Response) -> Reply {
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.bytes().await.unwrap();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Reply {
        status,
        headers,
        body,
    }
}
