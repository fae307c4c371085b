//! The lifecycle task: health checks, passive detection, reconnects with
//! backoff, warm-up, atomic swap, drain, and the admin operations.
//!
//! One task owns every transition, so there is never more than one
//! reconnect at a time: failures reported by many requests arrive as
//! commands tagged with the generation they saw, and only a report about the
//! *current, ready* generation is considered. A lost connection is a
//! suspicion, judged by one check within a few milliseconds (see
//! `LOSS_SETTLE`); another lost before then is evidence enough for a
//! reconnect, and one lost after that check started is judged anew, so a
//! check made too early is corrected. Everything the guard needs
//! is published on a `watch` channel, so waiters are woken by the change
//! itself, never by polling. Waiters are also counted: while any wait, the
//! pauses between failed attempts are capped lower, so a database that
//! returns is noticed quickly by those who need it, and a database nobody
//! asks for is spared.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use super::backoff::{Backoff, jittered};
use super::generation::Generation;
use super::settings::LifecycleSettings;
use super::source::{ConnectionSource, GenerationPool, ServerStatus, SourceError};
use super::warmup::{Warmed, WarmupError, WarmupTimings, warm_up};
use crate::backend::Scope;
use crate::pool::{LossHook, PoolStatus};
use crate::telemetry::Metrics;
use crate::telemetry::labels::{
    AttemptResult, HealthResult, PoolState, ReconnectReason, WarmupPhase,
};

/// A suspicion (a new session could not reach the server) runs a health
/// check at once, unless one ran this recently.
const SUSPICION_CHECK_SPACING: Duration = Duration::from_millis(250);

/// How long after a lost connection is reported it is checked. A server
/// that goes away, or an operator who terminates every session, signals
/// its sessions within microseconds to milliseconds of each other: by
/// then the health check's own session and the pool's idle ones have
/// heard it too, and the rest of a burst of reports has arrived.
const LOSS_SETTLE: Duration = Duration::from_millis(10);

/// A lost connection of the current generation waiting for its check.
#[derive(Clone, Copy, Debug)]
struct Suspicion {
    /// When it was reported: an idle session opened before and still
    /// served shows that the server did not end every session then.
    since: Instant,
    /// When it is checked.
    due: Instant,
}

/// What the lifecycle publishes: the state and the current generation.
#[derive(Debug)]
pub struct Snapshot<P> {
    /// Lifecycle state.
    pub state: PoolState,
    /// The generation that serves (or, while reconnecting, last served) requests.
    pub generation: Option<Arc<Generation<P>>>,
    /// Reports of lost connections answered for the current generation: a
    /// check made after each report up to this one found that the lost
    /// sessions had ended alone (see [`Loss`]).
    pub cleared: u64,
}

impl<P> Clone for Snapshot<P> {
    fn clone(&self) -> Self {
        Self {
            state: self.state,
            generation: self.generation.clone(),
            cleared: self.cleared,
        }
    }
}

impl<P: GenerationPool> Snapshot<P> {
    /// The generation a request may be admitted to now, if one is ready.
    /// After a break reported as `after`, the broken session's siblings
    /// are suspect until the lifecycle has judged the report: then a newer
    /// generation serves, or the same one once the lost session was found
    /// to have ended alone.
    pub fn ready_for(&self, after: Option<Loss>) -> Option<&Arc<Generation<P>>> {
        let generation = self.generation.as_ref()?;
        let judged = after.is_none_or(|loss| {
            generation.id() > loss.generation
                || (generation.id() == loss.generation && self.cleared >= loss.report)
        });
        let ready = self.state == PoolState::Ready && !generation.is_retired();
        (ready && judged).then_some(generation)
    }
}

/// The receipt of one report of a lost connection
/// ([`Lifecycle::report_connection_lost`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loss {
    /// The generation the lost connection belonged to.
    pub generation: u64,
    /// Its place among all reports: a check that starts later judges it.
    report: u64,
}

/// The last reconnect, for `/status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReconnectRecord {
    /// What detected the failure.
    pub reason: ReconnectReason,
    /// When it was detected.
    pub started_at: SystemTime,
    /// Detection to ready; `None` while still reconnecting.
    pub duration: Option<Duration>,
    /// Attempts made so far.
    pub attempts: u32,
}

/// A point-in-time view of the lifecycle, for `/status` and tests.
#[derive(Clone, Debug)]
pub struct LifecycleStatus {
    /// Lifecycle state.
    pub state: PoolState,
    /// Current generation id, 0 before the first.
    pub generation: u64,
    /// Sizes of the current generation's pool.
    pub pool: PoolStatus,
    /// The last reconnect.
    pub last_reconnect: Option<ReconnectRecord>,
    /// Timings of the last successful warm-up.
    pub last_warmup: Option<WarmupTimings>,
    /// The last failed attempt's reason.
    pub last_failure: Option<String>,
}

#[derive(Debug, Default)]
struct History {
    last_reconnect: Option<ReconnectRecord>,
    last_warmup: Option<WarmupTimings>,
    last_failure: Option<String>,
}

/// Requests waiting in the guard for a ready generation. While there are
/// any, the pause between failed attempts is capped lower, so they are
/// served soon after the database returns.
#[derive(Debug, Default)]
struct Demand {
    waiting: AtomicUsize,
    arrived: Notify,
}

impl Demand {
    fn is_waiting(&self) -> bool {
        self.waiting.load(Ordering::Acquire) > 0
    }
}

/// Held by a request while it waits for a ready generation; see
/// [`Lifecycle::wait_begins`].
#[derive(Debug)]
pub struct Waiting {
    demand: Arc<Demand>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.demand.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Debug)]
enum Command {
    /// The server ended a connection of `generation`: a check decides
    /// whether it ended alone. `found_idle`: the pool found it closed as it
    /// sat idle, rather than a request seeing it end.
    ConnectionLost {
        generation: u64,
        found_idle: bool,
    },
    /// A new session for `generation` could not reach the server: the
    /// health check decides at once whether the server is down.
    Suspect {
        generation: u64,
    },
    /// An operator asked for a reconnect of `generation`.
    Reconnect {
        generation: u64,
    },
    Pause,
    Resume,
}

/// What a command leads to.
enum Action {
    /// Retire the current generation and build the next.
    Reconnect(ReconnectReason),
    /// Run a health check now; reconnect if it fails.
    Check,
    /// Nothing more.
    None,
}

/// Handle to a running lifecycle; cheap to clone.
#[derive(Debug)]
pub struct Lifecycle<S: ConnectionSource> {
    inner: Arc<Inner<S::Pool>>,
}

impl<S: ConnectionSource> Clone for Lifecycle<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

#[derive(Debug)]
struct Inner<P> {
    snapshot: watch::Receiver<Snapshot<P>>,
    commands: mpsc::UnboundedSender<Command>,
    history: Arc<Mutex<History>>,
    stop: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
    demand: Arc<Demand>,
    /// Reports of lost connections so far; numbers their receipts.
    losses: Arc<AtomicU64>,
}

impl<S: ConnectionSource> Lifecycle<S> {
    /// Starts the lifecycle task: it connects (retrying until it succeeds),
    /// then keeps the pool healthy until [`Lifecycle::stop`].
    pub fn start(source: S, settings: LifecycleSettings, metrics: Metrics) -> Self {
        let (snapshot_tx, snapshot) = watch::channel(Snapshot {
            state: PoolState::Starting,
            generation: None,
            cleared: 0,
        });
        let (commands, command_rx) = mpsc::unbounded_channel();
        let history = Arc::new(Mutex::new(History::default()));
        let stop = CancellationToken::new();
        let demand = Arc::new(Demand::default());
        let losses = Arc::new(AtomicU64::new(0));
        metrics.set_state(PoolState::Starting);
        let driver = Driver {
            source,
            settings,
            metrics,
            snapshot: snapshot_tx,
            commands: command_rx,
            command_tx: commands.clone(),
            history: history.clone(),
            stop: stop.clone(),
            current: None,
            probe: None,
            last_check: None,
            suspicion: None,
            cleared: 0,
            losses: losses.clone(),
            paused: false,
            demand: demand.clone(),
        };
        let task = tokio::spawn(driver.run());
        let inner = Inner {
            snapshot,
            commands,
            history,
            stop,
            task: Mutex::new(Some(task)),
            demand,
            losses,
        };
        Self {
            inner: Arc::new(inner),
        }
    }

    /// A receiver of every published snapshot.
    pub fn subscribe(&self) -> watch::Receiver<Snapshot<S::Pool>> {
        self.inner.snapshot.clone()
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Snapshot<S::Pool> {
        self.inner.snapshot.borrow().clone()
    }

    /// Passive detection: the server ended a connection of `generation`.
    /// If that is the current, ready generation, a check decides at once
    /// whether the server is going away (a reconnect) or the session ended
    /// alone (nothing more); reports about a retired generation are
    /// absorbed. The receipt tells when the report was judged (see
    /// [`Snapshot::ready_for`]).
    pub fn report_connection_lost(&self, generation: u64) -> Loss {
        // Numbered before it is sent: a check that reads the count at its
        // start has every report up to it behind it.
        let report = self.inner.losses.fetch_add(1, Ordering::AcqRel) + 1;
        let _ = self.inner.commands.send(Command::ConnectionLost {
            generation,
            found_idle: false,
        });
        Loss { generation, report }
    }

    /// A new session for `generation` could not reach the server. Not proof
    /// of a failure (see the module doc): a health check runs at once and
    /// decides.
    pub fn report_unreachable(&self, generation: u64) {
        let _ = self.inner.commands.send(Command::Suspect { generation });
    }

    /// A request starts waiting for a ready generation; until the returned
    /// handle is dropped, reconnect attempts are at most
    /// `backoff_max_with_waiters` apart.
    pub fn wait_begins(&self) -> Waiting {
        let demand = &self.inner.demand;
        if demand.waiting.fetch_add(1, Ordering::AcqRel) == 0 {
            demand.arrived.notify_one();
        }
        Waiting {
            demand: demand.clone(),
        }
    }

    /// Forces a reconnect of the current generation (reason `admin`).
    pub fn reconnect(&self) {
        let generation = self.snapshot().generation.map_or(0, |g| g.id());
        let _ = self.inner.commands.send(Command::Reconnect { generation });
    }

    /// Holds all new work until [`Lifecycle::resume`].
    pub fn pause(&self) {
        let _ = self.inner.commands.send(Command::Pause);
    }

    /// Admits work again after [`Lifecycle::pause`].
    pub fn resume(&self) {
        let _ = self.inner.commands.send(Command::Resume);
    }

    /// Stops the task, publishes `stopping` and drains the current generation.
    pub async fn stop(&self) {
        self.inner.stop.cancel();
        let task = self.inner.task.lock().map(|mut t| t.take()).unwrap_or(None);
        if let Some(task) = task {
            let _ = task.await;
        }
    }

    /// A point-in-time view for `/status`.
    pub fn status(&self) -> LifecycleStatus {
        let snapshot = self.snapshot();
        let history = self.inner.history.lock().unwrap_or_else(|e| e.into_inner());
        LifecycleStatus {
            state: snapshot.state,
            generation: snapshot.generation.as_ref().map_or(0, |g| g.id()),
            pool: snapshot
                .generation
                .as_ref()
                .map(|g| g.pool().status())
                .unwrap_or_default(),
            last_reconnect: history.last_reconnect.clone(),
            last_warmup: history.last_warmup,
            last_failure: history.last_failure.clone(),
        }
    }
}

/// The task that owns every transition.
struct Driver<S: ConnectionSource> {
    source: S,
    settings: LifecycleSettings,
    metrics: Metrics,
    snapshot: watch::Sender<Snapshot<S::Pool>>,
    commands: mpsc::UnboundedReceiver<Command>,
    /// For the pools' loss hooks: they report like requests do.
    command_tx: mpsc::UnboundedSender<Command>,
    history: Arc<Mutex<History>>,
    stop: CancellationToken,
    current: Option<Arc<Generation<S::Pool>>>,
    /// The health check's own session with the current generation's server.
    probe: Option<<S::Pool as GenerationPool>::Probe>,
    /// When the last health check ended, to space suspicion checks.
    last_check: Option<Instant>,
    /// The lost connection of the current generation waiting for its check.
    suspicion: Option<Suspicion>,
    /// Published as [`Snapshot::cleared`].
    cleared: u64,
    /// Shared with [`Lifecycle::report_connection_lost`], which counts.
    losses: Arc<AtomicU64>,
    paused: bool,
    demand: Arc<Demand>,
}

/// The task was asked to stop.
struct Stopped;

impl<S: ConnectionSource> Driver<S> {
    async fn run(mut self) {
        if self.build_generation(None).await.is_ok() {
            let _ = self.serve().await;
        }
        self.publish(PoolState::Stopping);
        if let Some(generation) = &self.current {
            generation.retire();
        }
        info!("Lifecycle stopped.");
    }

    /// Health checks, checks after lost connections and commands while a
    /// generation serves.
    async fn serve(&mut self) -> Result<(), Stopped> {
        let mut ticks = tokio::time::interval(self.settings.health_check_interval);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        ticks.reset();
        loop {
            let suspicion = self.suspicion;
            let loss_check_due =
                tokio::time::sleep_until(suspicion.map_or_else(Instant::now, |s| s.due));
            let reason = tokio::select! {
                _ = self.stop.cancelled() => return Err(Stopped),
                _ = ticks.tick() => {
                    (!self.health_check().await).then_some(ReconnectReason::HealthCheck)
                }
                _ = loss_check_due, if suspicion.is_some() => self.judge_loss().await,
                command = self.commands.recv() => {
                    let Some(command) = command else { return Err(Stopped) };
                    match self.handle(command) {
                        Action::Reconnect(reason) => Some(reason),
                        Action::Check if !self.health_check().await => {
                            Some(ReconnectReason::HealthCheck)
                        }
                        Action::Check | Action::None => None,
                    }
                }
            };
            if let Some(reason) = reason {
                self.reconnect(reason).await?;
                ticks.reset();
            }
        }
    }

    /// Applies a command; says what must happen next.
    fn handle(&mut self, command: Command) -> Action {
        let current = self
            .current
            .as_ref()
            .filter(|g| !g.is_retired())
            .map(|g| g.id());
        match command {
            Command::ConnectionLost {
                generation,
                found_idle,
            } if Some(generation) == current => self.suspect_loss(generation, found_idle),
            Command::Reconnect { generation } if Some(generation) == current => {
                Action::Reconnect(ReconnectReason::Admin)
            }
            Command::Suspect { generation } if Some(generation) == current => {
                let recent = self
                    .last_check
                    .is_some_and(|at| at.elapsed() < SUSPICION_CHECK_SPACING);
                if recent { Action::None } else { Action::Check }
            }
            Command::ConnectionLost { .. }
            | Command::Reconnect { .. }
            | Command::Suspect { .. } => Action::None,
            Command::Pause | Command::Resume => {
                self.set_paused(matches!(command, Command::Pause));
                Action::None
            }
        }
    }

    /// A session of the current generation was lost. It is checked
    /// ([`Driver::judge_loss`]) a few moments later when a request saw it
    /// end, as the others of a server going away may be hearing the news
    /// just now; at once when the pool found it closed while it sat idle,
    /// since it heard the news some time ago, and the request that found
    /// it is opening a new session meanwhile, which should belong to the
    /// next generation if the server restarted. A second report before the
    /// check is another session lost at once (each is reported once, when
    /// it is found ended, and then discarded): a server restarted between
    /// two requests, whose next one finds every pooled session closed, or
    /// every session terminated. No check could say more: reconnect.
    fn suspect_loss(&mut self, generation: u64, found_idle: bool) -> Action {
        if self.suspicion.take().is_none() {
            let since = Instant::now();
            let settle = if found_idle {
                Duration::ZERO
            } else {
                LOSS_SETTLE
            };
            let due = since + settle;
            self.suspicion = Some(Suspicion { since, due });
            return Action::None;
        }
        let evidence = NotAlone::Several;
        warn!(generation, evidence = %evidence, "A lost connection was not alone.");
        Action::Reconnect(ReconnectReason::ConnectionLost)
    }

    fn set_paused(&mut self, paused: bool) {
        if self.paused != paused {
            self.paused = paused;
            info!(
                paused,
                "Pool {}.",
                if paused { "paused" } else { "resumed" }
            );
            let ready = self.current.as_ref().is_some_and(|g| !g.is_retired());
            if ready {
                self.publish(PoolState::Ready);
            }
        }
    }

    /// One health check; true when the generation is healthy. It asks on
    /// a session of its own, never one a request could use, so a busy pool
    /// cannot fail it.
    async fn health_check(&mut self) -> bool {
        let Some(generation) = self.current.clone() else {
            return true;
        };
        self.update_pool_gauges(&generation);
        let started = Instant::now();
        let span = info_span!("db_health_check", "pool.generation" = generation.id());
        let check = check_server(generation.pool(), self.probe.take(), &self.metrics);
        let outcome = tokio::time::timeout(self.settings.health_check_timeout, check)
            .instrument(span)
            .await;
        let (result, healthy) = match outcome {
            Ok(Ok(probe)) => {
                self.probe = probe;
                (HealthResult::Ok, true)
            }
            Ok(Err(error)) => {
                warn!(generation = generation.id(), error = %error, "Health check failed.");
                (HealthResult::Failed, false)
            }
            Err(_) => {
                warn!(generation = generation.id(), timeout = ?self.settings.health_check_timeout, "Health check timed out.");
                (HealthResult::Timeout, false)
            }
        };
        self.metrics.health_check(result, started.elapsed());
        self.last_check = Some(Instant::now());
        healthy
    }

    /// Checks whether the lost connection of the current generation ended
    /// alone (see the lifecycle's module doc): `None` when it did, which is
    /// then published so that a request broken on it is served again by the
    /// same generation; else the reason to reconnect.
    async fn judge_loss(&mut self) -> Option<ReconnectReason> {
        let suspicion = self.suspicion.take()?;
        let generation = self.current.clone().filter(|g| !g.is_retired())?;
        // Every report numbered up to here was made before this check began.
        let judged = self.losses.load(Ordering::Acquire);
        let id = generation.id();
        let span = info_span!("db_loss_check", "pool.generation" = id);
        let probe = self.probe.take();
        let check = check_after_loss(generation.as_ref(), suspicion.since, probe, &self.metrics);
        let timeout = self.settings.health_check_timeout;
        let verdict = match tokio::time::timeout(timeout, check).instrument(span).await {
            Ok(verdict) => verdict,
            Err(_) => Err(NotAlone::Silent(timeout)),
        };
        match verdict {
            Ok(probe) => {
                self.probe = probe;
                self.last_check = Some(Instant::now());
                self.cleared = judged;
                self.publish(PoolState::Ready);
                info!(
                    generation = id,
                    "A server session ended alone; the server and the pool's other sessions are fine."
                );
                None
            }
            Err(evidence) => {
                warn!(generation = id, evidence = %evidence, "A lost connection was not alone.");
                Some(ReconnectReason::ConnectionLost)
            }
        }
    }

    /// Retires the current generation and builds the next one.
    async fn reconnect(&mut self, reason: ReconnectReason) -> Result<(), Stopped> {
        let detected = Instant::now();
        let old = self.current.as_ref().map_or(0, |g| g.id());
        warn!(generation = old, reason = %reason, "Reconnect started.");
        self.metrics.reconnect_started(reason);
        self.record(|h| {
            h.last_reconnect = Some(ReconnectRecord {
                reason,
                started_at: SystemTime::now(),
                duration: None,
                attempts: 0,
            })
        });
        if let Some(generation) = &self.current {
            generation.retire();
        }
        self.publish(PoolState::Reconnecting);
        let span = info_span!("db_reconnect", reason = %reason, generation = old + 1);
        let result = self.build_generation(Some(detected)).instrument(span).await;
        if result.is_ok() {
            let took = detected.elapsed();
            self.metrics.reconnect_finished(took);
            self.record(|h| {
                if let Some(r) = h.last_reconnect.as_mut() {
                    r.duration = Some(took);
                }
            });
            info!(
                generation = old + 1,
                took_ms = took.as_millis() as u64,
                "Reconnect finished."
            );
        }
        result
    }

    /// Attempts to build, warm up and publish a generation until one
    /// succeeds or the task is stopped. `detected` is set for reconnects.
    async fn build_generation(&mut self, detected: Option<Instant>) -> Result<(), Stopped> {
        let mut backoff = Backoff::new(self.settings.backoff_initial, self.settings.backoff_max);
        let between = if detected.is_some() {
            PoolState::Reconnecting
        } else {
            PoolState::Starting
        };
        loop {
            self.publish(PoolState::Warming);
            self.record(|h| {
                if let Some(r) = h.last_reconnect.as_mut().filter(|_| detected.is_some()) {
                    r.attempts += 1;
                }
            });
            let id = self.current.as_ref().map_or(0, |g| g.id()) + 1;
            // Commands keep being read during the warm-up, so a pause sent
            // now holds the new generation from its first moment.
            let warmed = {
                let warming = warm_generation(&self.source, &self.settings, &self.command_tx, id);
                tokio::pin!(warming);
                loop {
                    tokio::select! {
                        _ = self.stop.cancelled() => return Err(Stopped),
                        warmed = &mut warming => break warmed,
                        command = self.commands.recv() => absorb(&mut self.paused, command)?,
                    }
                }
            };
            match self.attempt_finished(id, warmed) {
                Ok(generation) => {
                    self.swap(generation);
                    return Ok(());
                }
                Err(error) => {
                    self.publish(between);
                    let pause = backoff.next_pause();
                    warn!(phase = %error.phase, error = %error.message, retry_in_ms = pause.as_millis() as u64, "Connection attempt failed.");
                    self.pause_between_attempts(pause).await?;
                }
            }
        }
    }

    /// Records the end of an attempt to build generation `id`.
    fn attempt_finished(
        &self,
        id: u64,
        result: Result<(S::Pool, Warmed), WarmupError>,
    ) -> Result<Generation<S::Pool>, WarmupError> {
        match result {
            Ok((pool, Warmed { timings, run })) => {
                self.record_success(timings);
                info!(
                    generation = id,
                    ping_ms = timings.ping.as_millis() as u64,
                    queries_ms = timings.queries.as_millis() as u64,
                    "Warm-up finished."
                );
                Ok(Generation::new(id, pool, run))
            }
            Err(error) => {
                self.metrics.reconnect_attempt(AttemptResult::Failed);
                self.metrics.warmup_failed(error.phase);
                self.record(|h| h.last_failure = Some(error.to_string()));
                Err(error)
            }
        }
    }

    fn record_success(&self, timings: WarmupTimings) {
        self.metrics.reconnect_attempt(AttemptResult::Ok);
        self.metrics.warmup_phase(WarmupPhase::Ping, timings.ping);
        self.metrics
            .warmup_phase(WarmupPhase::Queries, timings.queries);
        self.metrics.warmup_phase(WarmupPhase::Total, timings.total);
        self.record(|h| h.last_warmup = Some(timings));
    }

    /// Publishes the new generation atomically and drains the old one.
    fn swap(&mut self, generation: Generation<S::Pool>) {
        let generation = Arc::new(generation);
        let old = self.current.replace(generation.clone());
        self.probe = None;
        self.suspicion = None;
        self.cleared = 0;
        self.publish(PoolState::Ready);
        if let Some(old) = old {
            old.retire();
        }
        self.update_pool_gauges(&generation);
        info!(generation = generation.id(), "Generation published.");
    }

    /// Waits out a backoff pause, cut short to the lower cap as soon as
    /// requests are waiting; pause/resume still apply, reconnect requests
    /// are absorbed (a reconnect is already under way).
    async fn pause_between_attempts(&mut self, pause: Duration) -> Result<(), Stopped> {
        let started = Instant::now();
        let with_waiters = started + pause.min(jittered(self.settings.backoff_max_with_waiters));
        let mut deadline = started + pause;
        loop {
            if self.demand.is_waiting() {
                deadline = deadline.min(with_waiters);
            }
            tokio::select! {
                _ = self.stop.cancelled() => return Err(Stopped),
                _ = tokio::time::sleep_until(deadline) => return Ok(()),
                _ = self.demand.arrived.notified() => {}
                command = self.commands.recv() => absorb(&mut self.paused, command)?,
            }
        }
    }

    /// Publishes `state` (shown as `paused` while paused and otherwise ready).
    fn publish(&self, state: PoolState) {
        let state = if self.paused && state == PoolState::Ready {
            PoolState::Paused
        } else {
            state
        };
        let generation = self.current.clone();
        self.metrics.set_state(state);
        self.metrics
            .set_generation(generation.as_ref().map_or(0, |g| g.id()));
        self.snapshot.send_replace(Snapshot {
            state,
            generation,
            cleared: self.cleared,
        });
    }

    fn update_pool_gauges(&self, generation: &Generation<S::Pool>) {
        let status = generation.pool().status();
        self.metrics
            .set_pool_connections(status.idle, status.in_use, status.max_size);
    }

    fn record(&self, update: impl FnOnce(&mut History)) {
        let mut history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        update(&mut history);
    }
}

/// One attempt: opens the pool of generation `id` and warms it up; on
/// failure the pool is closed.
async fn warm_generation<S: ConnectionSource>(
    source: &S,
    settings: &LifecycleSettings,
    command_tx: &mpsc::UnboundedSender<Command>,
    id: u64,
) -> Result<(S::Pool, Warmed), WarmupError> {
    let commands = command_tx.clone();
    let on_loss = LossHook::new(move || {
        let _ = commands.send(Command::ConnectionLost {
            generation: id,
            found_idle: true,
        });
    });
    let open = async {
        let pool = source.open(on_loss).map_err(|e| WarmupError {
            phase: WarmupPhase::Ping,
            message: e.message,
        })?;
        match warm_up(&pool, settings).await {
            Ok(warm) => Ok((pool, warm)),
            Err(error) => {
                pool.close();
                Err(error)
            }
        }
    };
    open.instrument(info_span!("db_warmup", "pool.generation" = id))
        .await
}

/// A command received while a generation is being built: pause and resume
/// apply at once; reconnect requests and reports are absorbed, since a
/// reconnect is already under way.
fn absorb(paused: &mut bool, command: Option<Command>) -> Result<(), Stopped> {
    match command {
        None => return Err(Stopped),
        Some(Command::Pause) => *paused = true,
        Some(Command::Resume) => *paused = false,
        Some(_) => {}
    }
    Ok(())
}

/// What showed that a lost connection did not end alone.
#[derive(Debug, thiserror::Error)]
enum NotAlone {
    /// Another session was lost before the first was checked.
    #[error("another session was lost before the first was checked")]
    Several,
    /// The server did not answer the check in time.
    #[error("the server did not answer within {0:?}")]
    Silent(Duration),
    /// The health check's own session, which no request uses, was ended too.
    #[error("the health check's own session was ended too: {0}")]
    ProbeEnded(SourceError),
    /// A fresh session could not reach the server, or it did not answer.
    #[error("the server failed its health check: {0}")]
    ServerDown(SourceError),
    /// The server answered as another run than the one the generation was
    /// built on: it restarted or recovered from a crash since.
    #[error("the server restarted or recovered from a crash since the generation was built")]
    Restarted,
    /// Idle sessions of the pool had heard the same goodbye.
    #[error("{0} idle sessions of the pool were ended too")]
    IdleEnded(usize),
}

/// Decides whether a lost connection of `generation`, reported at `since`,
/// ended alone (an operator terminated a session, the server runs on) or
/// the server is going away, crashed, or ended every session: the check
/// the lifecycle's module doc describes. Only the second is worth a
/// reconnect. Returns the probe session to keep.
///
/// The health check's own session (`probe`) is asked first, and its round
/// trip gives the pool's idle sessions time to hear what it heard; then
/// every idle session is looked at. One of them ended too: not alone. The
/// probe ended too: not alone either, unless an idle session opened before
/// the loss and still served vouches that the server did not end them all,
/// since an idle probe may have been terminated alone some seconds before.
/// Last, unless the probe answered, a fresh session must reach the server;
/// a server shutting down or recovering refuses it (57P03). A server that
/// answers as another run than the generation's restarted or recovered
/// since: not alone.
async fn check_after_loss<P: GenerationPool>(
    generation: &Generation<P>,
    since: Instant,
    probe: Option<P::Probe>,
    metrics: &Metrics,
) -> Result<Option<P::Probe>, NotAlone> {
    let restarted = |status: &ServerStatus| generation.run().is_some_and(|run| run != status.run);
    let (kept, probe_ended) = match probe {
        Some(mut probe) => match P::ping_probe(&mut probe).await.map_err(Into::into) {
            Ok(status) if restarted(&status) => return Err(NotAlone::Restarted),
            Ok(_) => (Some(probe), None),
            Err(error) if error.scope == Scope::Server => (None, Some(error)),
            // Ended for a reason of its own (an idle timeout): ask anew.
            Err(_) => (None, None),
        },
        None => (None, None),
    };
    let idle = generation.pool().sweep_idle(since);
    if idle.ended > 0 {
        return Err(NotAlone::IdleEnded(idle.ended));
    }
    if let Some(error) = probe_ended
        && idle.alive == 0
    {
        return Err(NotAlone::ProbeEnded(error));
    }
    if kept.is_some() {
        return Ok(kept);
    }
    let opened = open_probe(generation.pool(), metrics).await;
    match opened.map_err(NotAlone::ServerDown)? {
        Some((_, status)) if restarted(&status) => Err(NotAlone::Restarted),
        Some((probe, _)) => Ok(Some(probe)),
        None => Ok(None),
    }
}

/// Asks the server whether it is up, on the health check's own session.
///
/// A probe session that failed is replaced once, because one session can
/// end alone (terminated, timed out) while the server runs on; the check
/// fails only when a fresh session cannot reach the server either, or the
/// server does not answer in time. A server that refuses the fresh session
/// (too many connections, authentication) answered: it is up, the refusal
/// is counted, and the next check tries again. Returns the session to keep.
async fn check_server<P: GenerationPool>(
    pool: &P,
    probe: Option<P::Probe>,
    metrics: &Metrics,
) -> Result<Option<P::Probe>, SourceError> {
    if let Some(mut probe) = probe {
        match P::ping_probe(&mut probe).await.map_err(Into::into) {
            Ok(_) => return Ok(Some(probe)),
            Err(error) => {
                info!(error = %error, "The health check's session failed; asking on a new one.");
            }
        }
    }
    Ok(open_probe(pool, metrics).await?.map(|(probe, _)| probe))
}

/// Opens a session for the health check and asks the server on it. `None`
/// when the server refused the session: it answered, so it is up, and the
/// refusal is counted.
async fn open_probe<P: GenerationPool>(
    pool: &P,
    metrics: &Metrics,
) -> Result<Option<(P::Probe, ServerStatus)>, SourceError> {
    let opened: Result<P::Probe, SourceError> = pool.open_probe().await.map_err(Into::into);
    let mut probe = match opened {
        Ok(probe) => probe,
        Err(SourceError {
            scope: Scope::Refused(reason),
            message,
        }) => {
            metrics.session_refused(reason);
            warn!(reason = %reason, error = %message, "The server refused the health check's session; it answered, so it is up.");
            return Ok(None);
        }
        Err(error) => return Err(error),
    };
    let status = P::ping_probe(&mut probe).await.map_err(Into::into)?;
    Ok(Some((probe, status)))
}
