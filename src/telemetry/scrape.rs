//! Rendering a registry in the Prometheus text format, and reading single
//! values back (for `/metrics`, `/status` and tests).

use prometheus::proto::MetricType;
use prometheus::{Encoder, Registry, TextEncoder};

/// The registry in the Prometheus text exposition format.
pub fn render(registry: &Registry) -> String {
    let mut buffer = Vec::new();
    let encoder = TextEncoder::new();
    // Encoding into a Vec cannot fail for well-formed metric families.
    let _ = encoder.encode(&registry.gather(), &mut buffer);
    String::from_utf8(buffer).unwrap_or_default()
}

/// The value of the series `name` whose labels include all of `labels`:
/// a counter's or gauge's value, or a histogram's sample count. Summed over
/// the matching series; `None` when the metric does not exist.
pub fn value(registry: &Registry, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let family = registry.gather().into_iter().find(|f| f.name() == name)?;
    let kind = family.get_field_type();
    let total = family
        .get_metric()
        .iter()
        .filter(|m| {
            labels.iter().all(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == *k && l.value() == *v)
            })
        })
        .map(|m| match kind {
            MetricType::COUNTER => m.get_counter().get_value(),
            MetricType::GAUGE => m.get_gauge().get_value(),
            MetricType::HISTOGRAM => m.get_histogram().get_sample_count() as f64,
            _ => 0.0,
        })
        .sum();
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::Metrics;
    use crate::telemetry::labels::{GuardCause, GuardOutcome, PoolState, ReconnectReason};
    use std::time::Duration;

    #[test]
    fn every_contract_series_exists_at_zero_from_the_start() {
        let registry = Registry::new();
        let _metrics = Metrics::new(&registry).unwrap();
        let text = render(&registry);
        for series in [
            "pgwarden_build_info{version=",
            "pgwarden_pool_state{state=\"starting\"} 1",
            "pgwarden_pool_state{state=\"ready\"} 0",
            "pgwarden_pool_ready 0",
            "pgwarden_pool_generation 0",
            "pgwarden_pool_connections{state=\"in_use\"} 0",
            "pgwarden_pool_max_connections 0",
            "pgwarden_reconnects_total{reason=\"admin\"} 0",
            "pgwarden_reconnect_attempts_total{result=\"failed\"} 0",
            "pgwarden_reconnect_duration_seconds_count 0",
            "pgwarden_warmup_duration_seconds_count{phase=\"queries\"} 0",
            "pgwarden_warmup_failures_total{phase=\"ping\"} 0",
            "pgwarden_health_checks_total{result=\"timeout\"} 0",
            "pgwarden_health_check_duration_seconds_count 0",
            "pgwarden_guard_wait_seconds_count{cause=\"stale\",outcome=\"timeout\"} 0",
            "pgwarden_stale_client_hits_total 0",
            "pgwarden_replays_total{result=\"ok\"} 0",
            "pgwarden_requests_duration_seconds_count{api=\"pgwire\",kind=\"batch\",outcome=\"rejected\"} 0",
            "pgwarden_errors_total{kind=\"too_large\"} 0",
            "pgwarden_session_refusals_total{reason=\"auth\"} 0",
            "pgwarden_wire_clients{state=\"pinned\"} 0",
            "pgwarden_wire_connections_total{result=\"too_many\"} 0",
            "pgwarden_wire_prepared_statements_total{event=\"eviction\"} 0",
            "pgwarden_guard_wait_seconds_count{cause=\"busy\",outcome=\"timeout\"} 0",
            "pgwarden_guard_wait_seconds_bucket{cause=\"paused\",outcome=\"admitted\",le=\"0.0005\"} 0",
        ] {
            assert!(text.contains(series), "missing {series}");
        }
    }

    #[test]
    fn recorded_values_can_be_read_back() {
        let registry = Registry::new();
        let metrics = Metrics::new(&registry).unwrap();
        metrics.set_state(PoolState::Ready);
        metrics.reconnect_started(ReconnectReason::Admin);
        metrics.guard_wait(
            GuardCause::Stale,
            GuardOutcome::Admitted,
            Duration::from_millis(5),
        );
        let read = |name, labels: &[(&str, &str)]| value(&registry, name, labels).unwrap();
        assert_eq!(read("pgwarden_pool_ready", &[]), 1.0);
        assert_eq!(read("pgwarden_pool_state", &[("state", "starting")]), 0.0);
        assert_eq!(
            read("pgwarden_reconnects_total", &[("reason", "admin")]),
            1.0
        );
        assert_eq!(read("pgwarden_reconnects_total", &[]), 1.0);
        assert_eq!(
            read("pgwarden_guard_wait_seconds", &[("cause", "stale")]),
            1.0
        );
        assert_eq!(value(&registry, "pgwarden_no_such_metric", &[]), None);
    }
}
