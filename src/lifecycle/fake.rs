//! A scripted fake server for state-machine tests under a paused clock.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::Registry;

use super::*;
use crate::pool::PoolStatus;
use crate::telemetry::Metrics;
use crate::telemetry::labels::PoolState;
use crate::telemetry::scrape::value;

/// What the fake server does right now; tests change it mid-run.
#[derive(Debug)]
pub(crate) struct Script {
    pub up: bool,
    pub role: ServerRole,
    pub ping_delay: Duration,
    pub query_delay: Duration,
    /// New sessions are refused (a server at `max_connections`) while
    /// established ones keep working.
    pub full: bool,
    /// How often every session was ended at once (a restart, a crash,
    /// every backend terminated): a session opened before the latest
    /// time is gone, while new ones work.
    pub ended_all: u64,
    /// Idle sessions of the pool that hold the server's goodbye; the next
    /// look at them discards them.
    pub idle_ended: usize,
    /// Idle sessions of the pool the server still serves.
    pub idle_alive: usize,
    /// Which run of the server answers; a restart starts the next.
    pub run: u64,
}

#[derive(Clone, Debug)]
pub(crate) struct FakeSource {
    script: Arc<Mutex<Script>>,
    pools: Arc<Mutex<Vec<Arc<FakeState>>>>,
    /// The loss hook of each pool, as the real pool calls it.
    hooks: Arc<Mutex<Vec<crate::pool::LossHook>>>,
}

#[derive(Debug, Default)]
struct FakeState {
    closed: AtomicBool,
    lent: AtomicUsize,
    /// Every `get`, lent or refused.
    asked: AtomicUsize,
    /// Every look at the idle sessions.
    sweeps: AtomicUsize,
}

#[derive(Debug)]
pub(crate) struct FakePool {
    script: Arc<Mutex<Script>>,
    state: Arc<FakeState>,
}

#[derive(Debug)]
pub(crate) struct FakeConn {
    script: Arc<Mutex<Script>>,
    /// [`Script::ended_all`] when it was opened.
    born: u64,
}

impl FakeConn {
    fn new(script: &Arc<Mutex<Script>>) -> Self {
        let born = script.lock().unwrap().ended_all;
        FakeConn {
            script: script.clone(),
            born,
        }
    }

    /// Whether the server still serves this session.
    fn alive(&self, script: &Script) -> bool {
        script.up && self.born == script.ended_all
    }
}

impl FakeSource {
    pub fn new() -> Self {
        let script = Script {
            up: true,
            role: ServerRole::Primary,
            ping_delay: Duration::from_millis(5),
            query_delay: Duration::from_millis(5),
            full: false,
            ended_all: 0,
            idle_ended: 0,
            idle_alive: 2,
            run: 1,
        };
        Self {
            script: Arc::new(Mutex::new(script)),
            pools: Arc::default(),
            hooks: Arc::default(),
        }
    }

    pub fn set(&self, change: impl FnOnce(&mut Script)) {
        change(&mut self.script.lock().unwrap());
    }

    /// How many sessions the pool of generation `index + 1` was asked for.
    pub fn asked(&self, index: usize) -> usize {
        self.pools.lock().unwrap()[index]
            .asked
            .load(Ordering::SeqCst)
    }

    /// How often the idle sessions of generation `index + 1` were looked at.
    pub fn sweeps(&self, index: usize) -> usize {
        self.pools.lock().unwrap()[index]
            .sweeps
            .load(Ordering::SeqCst)
    }

    /// Ends every established session at once, as a restart, a crash or
    /// the termination of every backend does; the server takes new ones.
    pub fn end_every_session(&self) {
        self.set(|s| {
            s.ended_all += 1;
            s.idle_ended = s.idle_alive;
            s.idle_alive = 0;
        });
    }

    /// The pool of generation `index + 1` finds an idle session closed.
    pub fn idle_session_found_closed(&self, index: usize) {
        let hook = self.hooks.lock().unwrap()[index].clone();
        hook.call();
    }

    /// Restarts the server: every session ends, and the server that
    /// answers new ones is another run.
    pub fn restart(&self) {
        self.end_every_session();
        self.set(|s| s.run += 1);
    }

    pub fn pool_closed(&self, index: usize) -> bool {
        self.pools.lock().unwrap()[index]
            .closed
            .load(Ordering::SeqCst)
    }
}

/// An established session found the server gone.
fn down() -> SourceError {
    SourceError {
        scope: crate::backend::Scope::Server,
        message: "server closed the connection unexpectedly".into(),
    }
}

/// A new session could not be opened: unreachable, or refused when full.
fn cannot_open(script: &Script) -> Option<SourceError> {
    if !script.up {
        return Some(SourceError {
            scope: crate::backend::Scope::Unreachable,
            message: "connection refused".into(),
        });
    }
    script.full.then(|| SourceError {
        scope: crate::backend::Scope::Refused(crate::telemetry::labels::Refusal::Resources),
        message: "FATAL: sorry, too many clients already (SQLSTATE 53300)".into(),
    })
}

impl ConnectionSource for FakeSource {
    type Pool = FakePool;

    fn open(&self, on_loss: crate::pool::LossHook) -> Result<FakePool, SourceError> {
        self.hooks.lock().unwrap().push(on_loss);
        // A new pool's sessions are new: none heard an old goodbye.
        self.set(|s| {
            s.idle_alive = 2;
            s.idle_ended = 0;
        });
        let state = Arc::new(FakeState::default());
        self.pools.lock().unwrap().push(state.clone());
        Ok(FakePool {
            script: self.script.clone(),
            state,
        })
    }
}

impl GenerationPool for FakePool {
    type Conn = FakeConn;
    type Error = SourceError;

    async fn get(&self) -> Result<FakeConn, SourceError> {
        self.state.asked.fetch_add(1, Ordering::SeqCst);
        if let Some(error) = cannot_open(&self.script.lock().unwrap()) {
            return Err(error);
        }
        if self.state.closed.load(Ordering::SeqCst) {
            return Err(down());
        }
        self.state.lent.fetch_add(1, Ordering::SeqCst);
        Ok(FakeConn::new(&self.script))
    }

    async fn warm(&self) -> Result<Vec<FakeConn>, SourceError> {
        Ok(vec![self.get().await?, self.get().await?])
    }

    async fn ping(conn: &mut FakeConn) -> Result<ServerStatus, SourceError> {
        let (delay, alive, role, run) = {
            let s = conn.script.lock().unwrap();
            (s.ping_delay, conn.alive(&s), s.role, s.run)
        };
        tokio::time::sleep(delay).await;
        match alive {
            true => Ok(ServerStatus {
                role,
                run: format!("run {run}"),
            }),
            false => Err(down()),
        }
    }

    type Probe = FakeConn;

    async fn open_probe(&self) -> Result<FakeConn, SourceError> {
        if let Some(error) = cannot_open(&self.script.lock().unwrap()) {
            return Err(error);
        }
        Ok(FakeConn::new(&self.script))
    }

    async fn ping_probe(probe: &mut FakeConn) -> Result<ServerStatus, SourceError> {
        Self::ping(probe).await
    }

    async fn run(conn: &mut FakeConn, _sql: &str) -> Result<(), SourceError> {
        let (delay, alive) = {
            let s = conn.script.lock().unwrap();
            (s.query_delay, conn.alive(&s))
        };
        tokio::time::sleep(delay).await;
        if alive { Ok(()) } else { Err(down()) }
    }

    fn sweep_idle(&self, _opened_before: tokio::time::Instant) -> crate::pool::IdleSweep {
        self.state.sweeps.fetch_add(1, Ordering::SeqCst);
        let mut script = self.script.lock().unwrap();
        crate::pool::IdleSweep {
            alive: script.idle_alive,
            ended: std::mem::take(&mut script.idle_ended),
        }
    }

    fn status(&self) -> PoolStatus {
        PoolStatus::default()
    }

    fn close(&self) {
        self.state.closed.store(true, Ordering::SeqCst);
    }
}

pub(crate) struct Harness {
    pub source: FakeSource,
    pub lifecycle: Lifecycle<FakeSource>,
    pub registry: Registry,
    pub metrics: Metrics,
}

impl Harness {
    pub fn start(settings: LifecycleSettings) -> Self {
        Self::start_with(FakeSource::new(), settings)
    }

    pub fn start_with(source: FakeSource, settings: LifecycleSettings) -> Self {
        let registry = Registry::new();
        let metrics = Metrics::new(&registry).unwrap();
        let lifecycle = Lifecycle::start(source.clone(), settings, metrics.clone());
        Self {
            source,
            lifecycle,
            registry,
            metrics,
        }
    }

    /// Waits (on the paused clock) until the lifecycle publishes `state` with `generation`.
    pub async fn reach(&self, state: PoolState, generation: u64) {
        let mut rx = self.lifecycle.subscribe();
        let reached = rx.wait_for(|s| {
            s.state == state && s.generation.as_ref().map_or(0, |g| g.id()) == generation
        });
        tokio::time::timeout(Duration::from_secs(600), reached)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "never reached {state} of generation {generation}: {:?}",
                    self.lifecycle.status()
                )
            })
            .unwrap();
    }

    /// Waits until `generation` is retired (the reconnect started); the
    /// transient `reconnecting` state itself may be coalesced away.
    pub async fn retired(&self, generation: u64) {
        let mut rx = self.lifecycle.subscribe();
        let retired = rx.wait_for(|s| {
            s.generation
                .as_ref()
                .is_some_and(|g| g.id() == generation && g.is_retired())
        });
        tokio::time::timeout(Duration::from_secs(600), retired)
            .await
            .unwrap_or_else(|_| panic!("generation {generation} never retired"))
            .unwrap();
    }

    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        value(&self.registry, name, labels).unwrap()
    }
}
