//! State-machine tests of the lifecycle against a scripted fake server,
//! under a paused clock: every timeout and backoff runs instantly and
//! deterministically.

use std::time::Duration;

use super::fake::{FakeSource, Harness};
use super::settings::DEFAULT_HEALTH_CHECK_INTERVAL;
use super::*;
use crate::telemetry::labels::PoolState;

fn settings() -> LifecycleSettings {
    LifecycleSettings {
        warmup_queries: vec!["SELECT 1 FROM purchase_order LIMIT 1".into()],
        ..LifecycleSettings::default()
    }
}

#[tokio::test(start_paused = true)]
async fn cold_start_warms_up_and_publishes_generation_one() {
    let h = Harness::start(settings());
    assert_eq!(h.lifecycle.snapshot().state, PoolState::Starting);
    h.reach(PoolState::Ready, 1).await;
    assert_eq!(
        h.metric("pgwarden_reconnect_attempts_total", &[("result", "ok")]),
        1.0
    );
    assert_eq!(h.metric("pgwarden_reconnects_total", &[]), 0.0);
    assert_eq!(h.metric("pgwarden_pool_generation", &[]), 1.0);
    assert_eq!(h.metric("pgwarden_pool_ready", &[]), 1.0);
    assert_eq!(
        h.metric("pgwarden_warmup_duration_seconds", &[("phase", "total")]),
        1.0
    );
    assert!(h.lifecycle.status().last_warmup.is_some());
}

#[tokio::test(start_paused = true)]
async fn a_database_down_at_start_is_retried_with_backoff_until_it_comes_up() {
    let source = FakeSource::new();
    source.set(|s| s.up = false);
    let h = Harness::start_with(source, settings());
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(h.lifecycle.snapshot().state, PoolState::Starting);
    let failed = h.metric("pgwarden_reconnect_attempts_total", &[("result", "failed")]);
    // 100 ms doubling to a 5 s cap, halved by jitter at worst: 4 to 10 attempts in 10 s.
    assert!((4.0..=10.0).contains(&failed), "{failed} attempts");
    assert_eq!(
        h.metric("pgwarden_warmup_failures_total", &[("phase", "ping")]),
        failed
    );

    h.source.set(|s| s.up = true);
    h.reach(PoolState::Ready, 1).await;
    assert_eq!(
        h.metric("pgwarden_reconnects_total", &[]),
        0.0,
        "the initial connect is not a reconnect"
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_health_check_starts_one_reconnect_and_drains_the_old_generation() {
    let h = Harness::start(settings());
    h.reach(PoolState::Ready, 1).await;
    let first = h.lifecycle.snapshot().generation.unwrap();

    h.source.set(|s| s.up = false);
    h.retired(1).await;
    assert!(first.is_retired());
    assert!(h.source.pool_closed(0), "the old pool is drained");
    assert_eq!(
        h.metric("pgwarden_health_checks_total", &[("result", "failed")]),
        1.0
    );

    tokio::time::sleep(Duration::from_secs(3)).await;
    h.source.set(|s| s.up = true);
    h.reach(PoolState::Ready, 2).await;
    assert_eq!(
        h.metric("pgwarden_reconnects_total", &[("reason", "health_check")]),
        1.0
    );
    assert_eq!(h.metric("pgwarden_reconnect_duration_seconds", &[]), 1.0);
    let record = h.lifecycle.status().last_reconnect.unwrap();
    assert!(record.duration.unwrap() >= Duration::from_secs(3));
    assert!(record.attempts >= 2);
}

#[tokio::test(start_paused = true)]
async fn a_slow_health_check_counts_as_a_timeout() {
    let h = Harness::start(settings());
    h.reach(PoolState::Ready, 1).await;
    h.source.set(|s| s.ping_delay = Duration::from_secs(2));
    h.retired(1).await;
    assert_eq!(
        h.metric("pgwarden_health_checks_total", &[("result", "timeout")]),
        1.0
    );
    h.source.set(|s| s.ping_delay = Duration::from_millis(5));
    h.reach(PoolState::Ready, 2).await;
}

#[tokio::test(start_paused = true)]
async fn many_connection_failures_of_one_generation_start_a_single_reconnect() {
    let h = Harness::start(settings());
    h.reach(PoolState::Ready, 1).await;
    h.source.end_every_session();
    for _ in 0..50 {
        h.lifecycle.report_connection_lost(1);
    }
    h.reach(PoolState::Ready, 2).await;
    h.lifecycle.report_connection_lost(1); // late report about the retired generation
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(h.lifecycle.snapshot().generation.unwrap().id(), 2);
    assert_eq!(
        h.metric(
            "pgwarden_reconnects_total",
            &[("reason", "connection_lost")]
        ),
        1.0
    );
    assert_eq!(h.metric("pgwarden_reconnects_total", &[]), 1.0);
}

#[tokio::test(start_paused = true)]
async fn an_admin_reconnect_builds_a_new_generation_even_when_healthy() {
    let h = Harness::start(settings());
    h.reach(PoolState::Ready, 1).await;
    h.lifecycle.reconnect();
    h.reach(PoolState::Ready, 2).await;
    assert_eq!(
        h.metric("pgwarden_reconnects_total", &[("reason", "admin")]),
        1.0
    );
}

#[tokio::test(start_paused = true)]
async fn pause_holds_and_resume_readmits() {
    let h = Harness::start(settings());
    h.reach(PoolState::Ready, 1).await;
    h.lifecycle.pause();
    h.reach(PoolState::Paused, 1).await;
    assert_eq!(h.metric("pgwarden_pool_ready", &[]), 0.0);
    assert_eq!(h.metric("pgwarden_pool_state", &[("state", "paused")]), 1.0);
    h.lifecycle.resume();
    h.reach(PoolState::Ready, 1).await;
}

#[tokio::test(start_paused = true)]
async fn a_standby_is_refused_when_the_role_must_be_primary_until_it_is_promoted() {
    let source = FakeSource::new();
    source.set(|s| s.role = ServerRole::Standby);
    let h = Harness::start_with(source, settings());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(h.lifecycle.snapshot().state, PoolState::Starting);
    let failure = h.lifecycle.status().last_failure.unwrap();
    assert!(failure.contains("in recovery"), "{failure}");
    assert!(h.metric("pgwarden_warmup_failures_total", &[("phase", "ping")]) >= 1.0);

    h.source.set(|s| s.role = ServerRole::Primary);
    h.reach(PoolState::Ready, 1).await;
}

#[tokio::test(start_paused = true)]
async fn a_slow_warm_up_is_measured_per_phase_and_one_over_its_timeout_fails() {
    let mut slow = settings();
    slow.queries_timeout = Duration::from_secs(10);
    let h = Harness::start(slow);
    h.source
        .set(|s| s.query_delay = Duration::from_millis(2500));
    h.reach(PoolState::Ready, 1).await;
    let timings = h.lifecycle.status().last_warmup.unwrap();
    assert!(
        timings.queries >= Duration::from_millis(2500),
        "{timings:?}"
    );
    assert!(
        timings.queries < Duration::from_secs(5),
        "connections warm up side by side: {timings:?}"
    );
    assert!(timings.total >= timings.ping + timings.queries);

    h.source.set(|s| s.query_delay = Duration::from_secs(20));
    h.lifecycle.reconnect();
    h.retired(1).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(h.metric("pgwarden_warmup_failures_total", &[("phase", "queries")]) >= 1.0);
    assert!(
        h.lifecycle
            .status()
            .last_failure
            .unwrap()
            .contains("timed out")
    );
}

#[tokio::test(start_paused = true)]
async fn stop_publishes_stopping_and_drains_the_pool() {
    let h = Harness::start(settings());
    h.reach(PoolState::Ready, 1).await;
    h.lifecycle.stop().await;
    assert_eq!(h.lifecycle.snapshot().state, PoolState::Stopping);
    assert!(h.source.pool_closed(0));
    assert_eq!(
        h.metric("pgwarden_pool_state", &[("state", "stopping")]),
        1.0
    );
}

#[tokio::test(start_paused = true)]
async fn with_requests_waiting_a_long_outage_is_retried_at_the_lower_cap() {
    let h = Harness::start(settings());
    h.reach(PoolState::Ready, 1).await;
    h.source.set(|s| s.up = false);
    h.retired(1).await;
    // Nobody waits: the pauses grow to the 5 s cap.
    tokio::time::sleep(Duration::from_secs(20)).await;
    let failed = || h.metric("pgwarden_reconnect_attempts_total", &[("result", "failed")]);
    let before = failed();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let idle_attempts = failed() - before;
    assert!(idle_attempts <= 2.0, "{idle_attempts} attempts in 5 s");

    // A request waits: the current long pause is cut short, and the next
    // ones are at most 500 ms.
    let waiting = h.lifecycle.wait_begins();
    let before = failed();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let busy_attempts = failed() - before;
    assert!(busy_attempts >= 10.0, "{busy_attempts} attempts in 5 s");

    h.source.set(|s| s.up = true);
    let returned = tokio::time::Instant::now();
    h.reach(PoolState::Ready, 2).await;
    // At most the 500 ms cap, plus the fake warm-up.
    assert!(
        returned.elapsed() <= Duration::from_millis(600),
        "ready {:?} after the database returned",
        returned.elapsed()
    );
    drop(waiting);

    // Without waiters the long cap applies again.
    h.source.set(|s| s.up = false);
    h.retired(2).await;
    tokio::time::sleep(Duration::from_secs(20)).await;
    let before = failed();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(failed() - before <= 2.0);
}

#[tokio::test(start_paused = true)]
async fn a_server_that_refuses_new_sessions_passes_its_health_checks() {
    let h = Harness::start(settings());
    h.reach(PoolState::Ready, 1).await;
    // Full before the first check: the check's own session is refused.
    h.source.set(|s| s.full = true);
    tokio::time::sleep(DEFAULT_HEALTH_CHECK_INTERVAL * 3).await;
    assert_eq!(h.metric("pgwarden_reconnects_total", &[]), 0.0);
    assert!(h.metric("pgwarden_health_checks_total", &[("result", "ok")]) >= 2.0);
    assert_eq!(
        h.metric("pgwarden_health_checks_total", &[("result", "failed")]),
        0.0
    );
    let refused = h.metric(
        "pgwarden_session_refusals_total",
        &[("reason", "resources")],
    );
    assert!(
        refused >= 2.0,
        "each check that needed a session counts one: {refused}"
    );

    // Once a session could be had, the check keeps it and asks on it.
    h.source.set(|s| s.full = false);
    tokio::time::sleep(DEFAULT_HEALTH_CHECK_INTERVAL * 2).await;
    h.source.set(|s| s.full = true);
    tokio::time::sleep(DEFAULT_HEALTH_CHECK_INTERVAL * 2).await;
    let later = h.metric(
        "pgwarden_session_refusals_total",
        &[("reason", "resources")],
    );
    assert_eq!(later, refused, "the check's session is kept, not reopened");
    assert_eq!(h.metric("pgwarden_reconnects_total", &[]), 0.0);
}

#[tokio::test(start_paused = true)]
async fn a_server_that_cannot_be_reached_by_a_new_session_is_judged_by_an_immediate_check() {
    let h = Harness::start(settings());
    h.reach(PoolState::Ready, 1).await;
    let checks = || h.metric("pgwarden_health_checks_total", &[]);

    // A suspicion against a healthy server: one check at once, no reconnect.
    let before = checks();
    h.lifecycle.report_unreachable(1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        checks(),
        before + 1.0,
        "checked at once, not at the next tick"
    );
    assert_eq!(h.metric("pgwarden_reconnects_total", &[]), 0.0);

    // A suspicion against a server that is down: the check fails and decides.
    h.source.set(|s| s.up = false);
    h.lifecycle.report_unreachable(1);
    h.retired(1).await;
    assert_eq!(
        h.metric("pgwarden_reconnects_total", &[("reason", "health_check")]),
        1.0
    );
    h.source.set(|s| s.up = true);
    h.reach(PoolState::Ready, 2).await;
}

/// Waits until the lifecycle has judged `loss`: the same generation may
/// serve again, or it was retired. Returns how long that took.
async fn judged(h: &Harness, loss: Loss) -> Duration {
    let started = tokio::time::Instant::now();
    let mut rx = h.lifecycle.subscribe();
    let judged = rx.wait_for(|s| {
        s.ready_for(Some(loss)).is_some()
            || s.generation
                .as_ref()
                .is_some_and(|g| g.id() != loss.generation || g.is_retired())
    });
    tokio::time::timeout(Duration::from_secs(60), judged)
        .await
        .expect("the loss was judged")
        .unwrap();
    started.elapsed()
}

#[tokio::test(start_paused = true)]
async fn a_session_that_ended_alone_costs_no_reconnect_and_is_judged_at_once() {
    let h = Harness::start(settings());
    h.reach(PoolState::Ready, 1).await;

    // An operator terminated one session; the request that used it reports.
    let loss = h.lifecycle.report_connection_lost(1);
    assert!(
        h.lifecycle.snapshot().ready_for(Some(loss)).is_none(),
        "its siblings are suspect until judged"
    );
    let took = judged(&h, loss).await;
    assert!(
        took <= Duration::from_millis(20),
        "judged {took:?} after the report"
    );
    let snapshot = h.lifecycle.snapshot();
    assert!(
        snapshot.ready_for(Some(loss)).is_some(),
        "the request may be served by generation 1 again"
    );
    assert_eq!(h.source.sweeps(0), 1, "the idle sessions were looked at");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(h.metric("pgwarden_reconnects_total", &[]), 0.0);
    assert!(!snapshot.generation.unwrap().is_retired());

    // A later loss is judged by a check of its own.
    let later = h.lifecycle.report_connection_lost(1);
    assert!(h.lifecycle.snapshot().ready_for(Some(later)).is_none());
    judged(&h, later).await;
    assert_eq!(h.source.sweeps(0), 2);
    assert_eq!(h.metric("pgwarden_reconnects_total", &[]), 0.0);
}

#[tokio::test(start_paused = true)]
async fn several_sessions_lost_at_once_are_not_alone_even_when_the_server_answers() {
    let h = Harness::start(settings());
    h.reach(PoolState::Ready, 1).await;
    // A server restarted between two requests: the next one finds both
    // pooled sessions closed, and a fresh session reaches the new server.
    let first = h.lifecycle.report_connection_lost(1);
    let second = h.lifecycle.report_connection_lost(1);
    let took = judged(&h, second).await;
    assert!(took <= Duration::from_millis(20), "retired after {took:?}");
    h.reach(PoolState::Ready, 2).await;
    assert!(h.lifecycle.snapshot().ready_for(Some(first)).is_some());
    assert_eq!(h.source.sweeps(0), 0, "nothing needed asking");
    assert_eq!(
        h.metric(
            "pgwarden_reconnects_total",
            &[("reason", "connection_lost")]
        ),
        1.0
    );
}

#[tokio::test(start_paused = true)]
async fn every_session_ended_at_once_is_one_prompt_reconnect_judged_by_the_idle_sessions() {
    let h = Harness::start(settings());
    h.reach(PoolState::Ready, 1).await;
    // Before the first periodic check there is no session of the check's
    // own: a fresh one reaches the server, the idle sessions tell.
    h.source.end_every_session();
    let loss = h.lifecycle.report_connection_lost(1);
    let took = judged(&h, loss).await;
    assert!(took <= Duration::from_millis(20), "retired after {took:?}");
    h.reach(PoolState::Ready, 2).await;
    assert!(h.lifecycle.snapshot().ready_for(Some(loss)).is_some());
    assert_eq!(
        h.metric(
            "pgwarden_reconnects_total",
            &[("reason", "connection_lost")]
        ),
        1.0
    );
}

#[tokio::test(start_paused = true)]
async fn the_health_check_session_ended_too_and_no_idle_one_alive_means_every_session_ended() {
    let h = Harness::start(settings());
    h.reach(PoolState::Ready, 1).await;
    // A periodic check opens the session it keeps.
    tokio::time::sleep(DEFAULT_HEALTH_CHECK_INTERVAL + Duration::from_secs(1)).await;
    // Every pooled session is busy, and every session is terminated.
    h.source.set(|s| s.idle_alive = 0);
    h.source.set(|s| s.ended_all += 1);
    let loss = h.lifecycle.report_connection_lost(1);
    let took = judged(&h, loss).await;
    assert!(took <= Duration::from_millis(20), "retired after {took:?}");
    h.reach(PoolState::Ready, 2).await;
    assert_eq!(h.metric("pgwarden_reconnects_total", &[]), 1.0);
}

#[tokio::test(start_paused = true)]
async fn a_health_check_session_terminated_alone_earlier_costs_no_reconnect() {
    let h = Harness::start(settings());
    h.reach(PoolState::Ready, 1).await;
    tokio::time::sleep(DEFAULT_HEALTH_CHECK_INTERVAL + Duration::from_secs(1)).await;
    // The check's own session was terminated a moment ago, then one pooled
    // session; the pool's idle sessions are served as before.
    h.source.set(|s| s.ended_all += 1);
    let loss = h.lifecycle.report_connection_lost(1);
    judged(&h, loss).await;
    assert!(h.lifecycle.snapshot().ready_for(Some(loss)).is_some());
    tokio::time::sleep(DEFAULT_HEALTH_CHECK_INTERVAL * 2).await;
    assert_eq!(h.metric("pgwarden_reconnects_total", &[]), 0.0);
    assert_eq!(
        h.metric("pgwarden_health_checks_total", &[("result", "failed")]),
        0.0,
        "the check's new session serves the next checks"
    );
}

#[tokio::test(start_paused = true)]
async fn an_idle_session_that_heard_the_same_goodbye_means_the_loss_was_not_alone() {
    let h = Harness::start(settings());
    h.reach(PoolState::Ready, 1).await;
    tokio::time::sleep(DEFAULT_HEALTH_CHECK_INTERVAL + Duration::from_secs(1)).await;
    h.source.set(|s| s.idle_ended = 1);
    h.lifecycle.report_connection_lost(1);
    h.retired(1).await;
    h.reach(PoolState::Ready, 2).await;
    assert_eq!(h.metric("pgwarden_reconnects_total", &[]), 1.0);
}

#[tokio::test(start_paused = true)]
async fn a_check_that_came_too_early_is_corrected_by_the_next_report() {
    let h = Harness::start(settings());
    h.reach(PoolState::Ready, 1).await;
    // The first session heard the server's goodbye before the others did.
    let first = h.lifecycle.report_connection_lost(1);
    judged(&h, first).await;
    assert_eq!(h.metric("pgwarden_reconnects_total", &[]), 0.0);
    h.source.end_every_session();
    let next = h.lifecycle.report_connection_lost(1);
    judged(&h, next).await;
    h.reach(PoolState::Ready, 2).await;
    assert_eq!(h.metric("pgwarden_reconnects_total", &[]), 1.0);
}

#[tokio::test(start_paused = true)]
async fn a_lost_connection_to_a_server_that_went_away_is_a_reconnect() {
    let h = Harness::start(settings());
    h.reach(PoolState::Ready, 1).await;
    h.source.set(|s| s.up = false);
    h.lifecycle.report_connection_lost(1);
    h.retired(1).await;
    h.source.set(|s| s.up = true);
    h.reach(PoolState::Ready, 2).await;
    assert_eq!(
        h.metric(
            "pgwarden_reconnects_total",
            &[("reason", "connection_lost")]
        ),
        1.0
    );
}

#[tokio::test(start_paused = true)]
async fn a_restart_noticed_late_is_told_by_the_run_of_the_server() {
    let h = Harness::start(settings());
    h.reach(PoolState::Ready, 1).await;
    tokio::time::sleep(DEFAULT_HEALTH_CHECK_INTERVAL + Duration::from_secs(1)).await;
    h.source.restart();
    // The next periodic check replaces its own session, which the restart
    // ended, and finds the server up: no reconnect by itself.
    tokio::time::sleep(DEFAULT_HEALTH_CHECK_INTERVAL).await;
    assert_eq!(h.metric("pgwarden_reconnects_total", &[]), 0.0);
    // Then a request finds the pool's one session closed, and a fresh
    // session of the restarted server serves it and waits idle.
    h.source.set(|s| {
        s.idle_ended = 0;
        s.idle_alive = 1;
    });
    let loss = h.lifecycle.report_connection_lost(1);
    judged(&h, loss).await;
    h.reach(PoolState::Ready, 2).await;
    assert_eq!(
        h.metric(
            "pgwarden_reconnects_total",
            &[("reason", "connection_lost")]
        ),
        1.0
    );
}

#[tokio::test(start_paused = true)]
async fn an_idle_session_found_closed_is_checked_at_once() {
    let h = Harness::start(settings());
    h.reach(PoolState::Ready, 1).await;
    tokio::time::sleep(DEFAULT_HEALTH_CHECK_INTERVAL + Duration::from_secs(1)).await;
    let checked = h.source.sweeps(0);
    // A request found its session closed as it sat in the pool: the
    // goodbye is old news, and the request waits for a new session.
    h.source.idle_session_found_closed(0);
    tokio::time::sleep(Duration::from_millis(6)).await;
    assert_eq!(h.source.sweeps(0), checked + 1, "checked without a pause");
    assert_eq!(h.metric("pgwarden_reconnects_total", &[]), 0.0);

    // Found after a restart: the server that answers is another run.
    h.source.restart();
    h.source.idle_session_found_closed(0);
    h.retired(1).await;
    h.reach(PoolState::Ready, 2).await;
}
