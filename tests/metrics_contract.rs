//! The metrics contract that dashboards and alert rules depend on: every
//! series of the design's table exists from start-up with the right type
//! and labels, and `promtool check metrics` accepts the exposition.

mod support;

use std::io::Write;
use std::process::{Command, Stdio};

use support::Cluster;
use support::daemon::{TestDaemon, config_for};

/// (name, type, label names) of every series in the design's metrics table.
const CONTRACT: &[(&str, &str, &[&str])] = &[
    ("pgwarden_build_info", "gauge", &["version"]),
    ("pgwarden_pool_state", "gauge", &["state"]),
    ("pgwarden_pool_ready", "gauge", &[]),
    ("pgwarden_pool_generation", "gauge", &[]),
    ("pgwarden_pool_connections", "gauge", &["state"]),
    ("pgwarden_pool_max_connections", "gauge", &[]),
    ("pgwarden_reconnects_total", "counter", &["reason"]),
    ("pgwarden_reconnect_attempts_total", "counter", &["result"]),
    ("pgwarden_reconnect_duration_seconds", "histogram", &[]),
    ("pgwarden_warmup_duration_seconds", "histogram", &["phase"]),
    ("pgwarden_warmup_failures_total", "counter", &["phase"]),
    ("pgwarden_health_checks_total", "counter", &["result"]),
    ("pgwarden_health_check_duration_seconds", "histogram", &[]),
    (
        "pgwarden_guard_wait_seconds",
        "histogram",
        &["cause", "outcome"],
    ),
    ("pgwarden_stale_client_hits_total", "counter", &[]),
    ("pgwarden_replays_total", "counter", &["result"]),
    (
        "pgwarden_requests_duration_seconds",
        "histogram",
        &["api", "kind", "outcome"],
    ),
    ("pgwarden_errors_total", "counter", &["kind"]),
    ("pgwarden_session_refusals_total", "counter", &["reason"]),
    ("pgwarden_wire_clients", "gauge", &["state"]),
    ("pgwarden_wire_connections_total", "counter", &["result"]),
    (
        "pgwarden_wire_prepared_statements_total",
        "counter",
        &["event"],
    ),
];

/// Every label value the contract names, which must all exist at zero.
const LABEL_VALUES: &[(&str, &str, &[&str])] = &[
    (
        "pgwarden_pool_state",
        "state",
        &[
            "starting",
            "warming",
            "ready",
            "reconnecting",
            "paused",
            "stopping",
        ],
    ),
    (
        "pgwarden_reconnects_total",
        "reason",
        &["health_check", "connection_lost", "admin"],
    ),
    (
        "pgwarden_health_checks_total",
        "result",
        &["ok", "failed", "timeout"],
    ),
    (
        "pgwarden_guard_wait_seconds_count",
        "cause",
        &["warming", "reconnecting", "paused", "stale", "busy"],
    ),
    (
        "pgwarden_session_refusals_total",
        "reason",
        &["auth", "resources", "database", "privilege", "other"],
    ),
    (
        "pgwarden_wire_clients",
        "state",
        &["idle", "waiting", "active", "pinned"],
    ),
    (
        "pgwarden_wire_connections_total",
        "result",
        &[
            "accepted", "cancel", "auth", "database", "too_many", "refused", "failed",
        ],
    ),
    (
        "pgwarden_wire_prepared_statements_total",
        "event",
        &["hit", "miss", "eviction"],
    ),
    (
        "pgwarden_requests_duration_seconds_count",
        "outcome",
        &[
            "ok",
            "sql_error",
            "guard_timeout",
            "connection_lost",
            "resolution_unknown",
            "transaction_timeout",
            "rejected",
        ],
    ),
    (
        "pgwarden_errors_total",
        "kind",
        &[
            "bad_request",
            "auth",
            "sql",
            "guard_timeout",
            "connection_lost",
            "resolution_unknown",
            "transaction_timeout",
            "too_large",
            "internal",
        ],
    ),
];

#[tokio::test]
async fn every_contract_series_exists_with_its_type_and_labels() {
    let cluster = Cluster::start();
    let daemon = TestDaemon::start(config_for(&cluster)).await;
    let text = daemon.metrics().await;
    for (name, kind, labels) in CONTRACT {
        assert!(
            text.contains(&format!("# TYPE {name} {kind}\n")),
            "{name} is not a {kind}"
        );
        let sample = if *kind == "histogram" {
            format!("{name}_count")
        } else {
            name.to_string()
        };
        let line = text
            .lines()
            .find(|l| {
                l.starts_with(&sample)
                    && matches!(l.as_bytes().get(sample.len()), Some(b' ' | b'{'))
            })
            .unwrap_or_else(|| panic!("no sample of {name}"));
        for label in *labels {
            assert!(
                line.contains(&format!("{label}=\"")),
                "{name} lacks label {label}: {line}"
            );
        }
    }
    for (series, label, values) in LABEL_VALUES {
        for value in *values {
            let needle = format!("{label}=\"{value}\"");
            let present = text
                .lines()
                .any(|l| l.starts_with(series) && l.contains(&needle));
            assert!(present, "{series} has no series with {needle} at start-up");
        }
    }
}

#[tokio::test]
async fn promtool_accepts_the_exposition() {
    let cluster = Cluster::start();
    let daemon = TestDaemon::start(config_for(&cluster)).await;
    let text = daemon.metrics().await;
    let promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut promtool =
        promtool.expect("promtool not found: install the Debian package `prometheus`");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = promtool.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
