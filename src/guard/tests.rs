//! The guard's admission rules, on the scripted fake under a paused clock:
//! the incident report's four scenarios, the budget, pause and shutdown.

use std::time::Duration;

use tokio::time::Instant;

use super::*;
use crate::lifecycle::LifecycleSettings;
use crate::lifecycle::fake::Harness;
use crate::telemetry::labels::{ClientErrorKind, GuardCause, PoolState};

fn guard(h: &Harness) -> Guard<crate::lifecycle::fake::FakeSource> {
    Guard::new(
        h.lifecycle.clone(),
        DEFAULT_GUARD_TIMEOUT,
        h.metrics.clone(),
    )
}

fn slow_warmup() -> LifecycleSettings {
    LifecycleSettings {
        warmup_queries: vec!["SELECT 1 FROM purchase_order LIMIT 1".into()],
        ..LifecycleSettings::default()
    }
}

fn waits(h: &Harness, cause: GuardCause, outcome: &str) -> f64 {
    h.metric(
        "pgwarden_guard_wait_seconds",
        &[("cause", cause.as_str()), ("outcome", outcome)],
    )
}

#[tokio::test(start_paused = true)]
async fn normal_operation_admits_at_once_without_a_guard_observation() {
    let h = Harness::start(slow_warmup());
    h.reach(PoolState::Ready, 1).await;
    let guard = guard(&h);
    let started = Instant::now();
    let lease = guard.admit().await.unwrap();
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert_eq!(lease.generation().id(), 1);
    assert_eq!(h.metric("pgwarden_guard_wait_seconds", &[]), 0.0);
}

#[tokio::test(start_paused = true)]
async fn cold_start_requests_wait_for_the_first_warm_up() {
    let h = Harness::start(slow_warmup());
    h.source
        .set(|s| s.query_delay = Duration::from_millis(1200));
    let guard = guard(&h);
    let started = Instant::now();
    let lease = guard.admit().await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(1200),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(lease.generation().id(), 1);
    assert_eq!(waits(&h, GuardCause::Warming, "admitted"), 1.0);
}

#[tokio::test(start_paused = true)]
async fn reconnection_with_an_old_reference_is_a_stale_hit_served_by_the_new_generation() {
    let h = Harness::start(slow_warmup());
    h.reach(PoolState::Ready, 1).await;
    let guard = guard(&h);
    let held = guard.admit().await.unwrap();

    h.source
        .set(|s| s.query_delay = Duration::from_millis(1000));
    h.lifecycle.reconnect();
    h.retired(1).await;
    let refreshed = guard.refresh(held).await.unwrap();
    assert_eq!(refreshed.generation().id(), 2);
    assert_eq!(h.metric("pgwarden_stale_client_hits_total", &[]), 1.0);
    assert_eq!(waits(&h, GuardCause::Stale, "admitted"), 1.0);
}

#[tokio::test(start_paused = true)]
async fn reconnection_with_a_new_reference_waits_for_the_new_generation() {
    let h = Harness::start(slow_warmup());
    h.reach(PoolState::Ready, 1).await;
    let guard = guard(&h);
    h.source
        .set(|s| s.query_delay = Duration::from_millis(1000));
    h.lifecycle.reconnect();
    h.retired(1).await;
    let lease = guard.admit().await.unwrap();
    assert_eq!(lease.generation().id(), 2);
    assert_eq!(h.metric("pgwarden_stale_client_hits_total", &[]), 0.0);
    let waited = waits(&h, GuardCause::Reconnecting, "admitted")
        + waits(&h, GuardCause::Warming, "admitted");
    assert_eq!(waited, 1.0);
}

#[tokio::test(start_paused = true)]
async fn an_outage_longer_than_the_budget_fails_with_guard_timeout_after_the_budget() {
    let h = Harness::start(slow_warmup());
    h.reach(PoolState::Ready, 1).await;
    h.source.set(|s| s.up = false);
    h.retired(1).await;
    let guard = guard(&h);
    let started = Instant::now();
    let error = guard.admit().await.unwrap_err();
    assert_eq!(started.elapsed(), DEFAULT_GUARD_TIMEOUT);
    assert_eq!(error.kind(), ClientErrorKind::GuardTimeout);
    assert!(matches!(error, GuardError::Timeout { .. }), "{error}");
    let timeouts = h.metric("pgwarden_guard_wait_seconds", &[("outcome", "timeout")]);
    assert_eq!(timeouts, 1.0);

    h.source.set(|s| s.up = true);
    h.reach(PoolState::Ready, 2).await;
    assert!(guard.admit().await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_waiting_request_is_served_soon_after_a_long_outage_ends() {
    let h = Harness::start(slow_warmup());
    h.reach(PoolState::Ready, 1).await;
    h.source.set(|s| s.up = false);
    h.retired(1).await;
    // Long enough for the pauses between attempts to reach their 5 s cap.
    tokio::time::sleep(Duration::from_secs(30)).await;

    let source = h.source.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        source.set(|s| s.up = true);
    });
    let started = Instant::now();
    guard(&h).admit().await.unwrap();
    // 1 s, then at most the 500 ms cap, plus the fake warm-up.
    assert!(
        started.elapsed() <= Duration::from_millis(1600),
        "admitted {:?} after the request arrived, 1 s after the database returned",
        started.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn a_paused_pool_holds_requests_until_resumed() {
    let h = Harness::start(slow_warmup());
    h.reach(PoolState::Ready, 1).await;
    h.lifecycle.pause();
    h.reach(PoolState::Paused, 1).await;
    let guard = guard(&h);
    let lifecycle = h.lifecycle.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        lifecycle.resume();
    });
    let started = Instant::now();
    guard.admit().await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(500));
    assert_eq!(waits(&h, GuardCause::Paused, "admitted"), 1.0);
}

#[tokio::test(start_paused = true)]
async fn a_stopping_daemon_refuses_at_once() {
    let h = Harness::start(slow_warmup());
    h.reach(PoolState::Ready, 1).await;
    h.lifecycle.stop().await;
    let error = guard(&h).admit().await.unwrap_err();
    assert!(matches!(error, GuardError::Stopping), "{error}");
}

#[tokio::test(start_paused = true)]
async fn a_server_that_refuses_new_sessions_is_not_hammered_by_waiting_requests() {
    let h = Harness::start(slow_warmup());
    h.reach(PoolState::Ready, 1).await;
    h.source.set(|s| s.full = true);
    let asked_before = h.source.asked(0);
    let guard = guard(&h);
    let started = Instant::now();
    let requests = (0..20).map(|_| guard.admit());
    let results = futures_util::future::join_all(requests).await;
    assert!(started.elapsed() >= DEFAULT_GUARD_TIMEOUT);
    for result in results {
        let error = result.unwrap_err();
        assert!(matches!(error, GuardError::NoSession { .. }), "{error}");
        assert!(error.to_string().contains("too many clients"), "{error}");
        assert_eq!(error.kind(), ClientErrorKind::GuardTimeout);
    }
    // Twenty first asks, then about one per hold while the budget lasts;
    // without the hold each waiter would ask every 10 to 200 ms (~360).
    let asked = h.source.asked(0) - asked_before;
    assert!(asked <= 20 + 2 * 12 + 5, "{asked} asks for a session");
    assert_eq!(waits(&h, GuardCause::Busy, "timeout"), 20.0);
    assert_eq!(h.metric("pgwarden_reconnects_total", &[]), 0.0);
}

#[tokio::test(start_paused = true)]
async fn a_request_whose_session_ended_alone_is_served_again_by_the_same_generation() {
    let h = Harness::start(slow_warmup());
    h.reach(PoolState::Ready, 1).await;
    let guard = guard(&h);
    let loss = guard.report_connection_lost(1);
    let started = Instant::now();
    let lease = guard
        .admit_after(loss, started + DEFAULT_GUARD_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(lease.generation().id(), 1, "no new generation comes");
    assert!(
        started.elapsed() <= Duration::from_millis(20),
        "admitted {:?} after the break",
        started.elapsed()
    );
    assert_eq!(h.metric("pgwarden_reconnects_total", &[]), 0.0);
}

#[tokio::test(start_paused = true)]
async fn a_request_whose_session_ended_with_every_other_waits_for_the_new_generation() {
    let h = Harness::start(slow_warmup());
    h.reach(PoolState::Ready, 1).await;
    let guard = guard(&h);
    h.source.end_every_session();
    let loss = guard.report_connection_lost(1);
    let lease = guard
        .admit_after(loss, Instant::now() + DEFAULT_GUARD_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(lease.generation().id(), 2);
    assert_eq!(h.metric("pgwarden_reconnects_total", &[]), 1.0);
}
