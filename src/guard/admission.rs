//! Admission: the only way to get a connection.
//!
//! In state `ready` a request takes a connection of the current generation
//! at once: one read of the watch channel (no lock held across `.await`) and
//! the pool's own `get`. In any other state it waits on the watch channel —
//! woken by the transition itself — until `ready` or until its budget runs
//! out. A request whose connection belongs to a retired generation (a
//! *stale-client hit*) gives it back and is admitted again from the current
//! generation, within the same budget.

use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{Instrument, Span, field, info_span};

use super::error::GuardError;
use super::refusals::RefusalGate;
use crate::backend::Scope;
use crate::lifecycle::{
    ConnectionSource, Generation, GenerationPool, Lifecycle, Loss, Snapshot, SourceError,
};
use crate::telemetry::Metrics;
use crate::telemetry::labels::{GuardCause, GuardOutcome, PoolState};

/// Default budget a request may spend waiting for a usable generation.
pub const DEFAULT_GUARD_TIMEOUT: Duration = Duration::from_millis(3000);
/// First pause before asking a ready pool again for a session it could not
/// open; it doubles up to [`NO_SESSION_PAUSE_MAX`]. A session given back by
/// another request ends the wait at once only through the pool's own
/// waiting, so the pauses stay short.
const NO_SESSION_PAUSE: Duration = Duration::from_millis(10);
/// Cap of the pause between two asks for a session.
const NO_SESSION_PAUSE_MAX: Duration = Duration::from_millis(200);

/// What one try of the fast path found.
enum Fast<S: ConnectionSource> {
    /// A connection of the ready, current generation.
    Admitted(Lease<S>),
    /// No ready generation (that may serve after the loss, if one was
    /// reported): wait for the next state.
    NotReady,
    /// The generation is ready, but no session could be had right now: the
    /// server refused a new one or did not answer. Ask again shortly.
    NoSession(SourceError),
}

type Pool<S> = <S as ConnectionSource>::Pool;
type Conn<S> = <Pool<S> as GenerationPool>::Conn;

/// Hands out connections only from the current, ready generation.
#[derive(Debug)]
pub struct Guard<S: ConnectionSource> {
    lifecycle: Lifecycle<S>,
    snapshot: watch::Receiver<Snapshot<Pool<S>>>,
    budget: Duration,
    metrics: Metrics,
    /// Holds back asks for new sessions after the server refused one.
    refusals: Arc<RefusalGate>,
}

impl<S: ConnectionSource> Clone for Guard<S> {
    fn clone(&self) -> Self {
        Self {
            lifecycle: self.lifecycle.clone(),
            snapshot: self.snapshot.clone(),
            budget: self.budget,
            metrics: self.metrics.clone(),
            refusals: self.refusals.clone(),
        }
    }
}

/// A connection lent by the guard, with the generation it belongs to.
#[derive(Debug)]
pub struct Lease<S: ConnectionSource> {
    conn: Conn<S>,
    generation: Arc<Generation<Pool<S>>>,
    deadline: Instant,
}

impl<S: ConnectionSource> Lease<S> {
    /// The lent connection.
    pub fn conn(&mut self) -> &mut Conn<S> {
        &mut self.conn
    }

    /// The generation the connection belongs to.
    pub fn generation(&self) -> &Arc<Generation<Pool<S>>> {
        &self.generation
    }

    /// The end of this request's guard budget.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }
}

impl<S: ConnectionSource> Guard<S> {
    /// A guard in front of `lifecycle` with a waiting budget per request.
    pub fn new(lifecycle: Lifecycle<S>, budget: Duration, metrics: Metrics) -> Self {
        Self {
            snapshot: lifecycle.subscribe(),
            lifecycle,
            budget,
            metrics,
            refusals: Arc::new(RefusalGate::new()),
        }
    }

    /// The generation requests are admitted to now, if there is one.
    pub fn generation_id(&self) -> Option<u64> {
        self.snapshot.borrow().generation.as_ref().map(|g| g.id())
    }

    /// The waiting budget each request gets.
    pub fn budget(&self) -> Duration {
        self.budget
    }

    /// Admits a request with a fresh budget.
    pub fn admit(&self) -> impl Future<Output = Result<Lease<S>, GuardError>> + Send + '_ {
        let now = Instant::now();
        self.admit_between(now, now + self.budget)
    }

    /// Admits a request that must be served by `deadline`.
    pub fn admit_until(
        &self,
        deadline: Instant,
    ) -> impl Future<Output = Result<Lease<S>, GuardError>> + Send + '_ {
        self.admit_between(Instant::now(), deadline)
    }

    async fn admit_between(
        &self,
        started: Instant,
        deadline: Instant,
    ) -> Result<Lease<S>, GuardError> {
        let span = info_span!(
            "guard_admit",
            "pool.generation" = field::Empty,
            "guard.wait_ms" = field::Empty,
            "guard.cause" = field::Empty,
        );
        if span.is_disabled() {
            return self.admit_in_span(deadline).await;
        }
        let admitted = self.admit_in_span(deadline).instrument(span.clone()).await;
        if let Ok(lease) = &admitted {
            span.record("pool.generation", lease.generation.id());
            span.record("guard.wait_ms", started.elapsed().as_millis() as u64);
        }
        admitted
    }

    async fn admit_in_span(&self, deadline: Instant) -> Result<Lease<S>, GuardError> {
        let pending = match self.try_fast(deadline, None).await? {
            Fast::Admitted(lease) => return Ok(lease),
            Fast::NotReady => None,
            Fast::NoSession(error) => Some(error),
        };
        // The request waits either way; a state still `ready` means its
        // generation was just retired and the reconnect not yet published.
        let cause = match pending {
            Some(_) => GuardCause::Busy,
            None => wait_cause(self.snapshot.borrow().state).unwrap_or(GuardCause::Reconnecting),
        };
        Span::current().record("guard.cause", cause.as_str());
        // Boxed: the waiting machinery stays out of the fast path's future.
        Box::pin(self.wait_and_admit(Some(cause), deadline, None, pending)).await
    }

    /// Checks a held lease before use: if its generation was retired, counts
    /// a stale-client hit and re-admits from the current generation within
    /// the lease's remaining budget.
    pub async fn refresh(&self, lease: Lease<S>) -> Result<Lease<S>, GuardError> {
        if !lease.generation.is_retired() {
            return Ok(lease);
        }
        let deadline = lease.deadline;
        drop(lease);
        self.metrics.stale_client_hit();
        tracing::info!(
            "Stale-client hit: the request's connection belongs to a retired generation."
        );
        self.wait_and_admit(Some(GuardCause::Stale), deadline, None, None)
            .await
    }

    /// Admits after the server ended a connection, reported as `loss`: its
    /// siblings are suspect until the lifecycle has judged the report, so
    /// this waits for the verdict. A newer generation serves when the
    /// server was going away; the same one when the lost session had
    /// ended alone (see [`Snapshot::ready_for`]).
    pub async fn admit_after(&self, loss: Loss, deadline: Instant) -> Result<Lease<S>, GuardError> {
        let pending = match self.try_fast(deadline, Some(loss)).await? {
            Fast::Admitted(lease) => return Ok(lease),
            Fast::NotReady => None,
            Fast::NoSession(error) => Some(error),
        };
        let cause = pending
            .as_ref()
            .map_or(GuardCause::Reconnecting, |_| GuardCause::Busy);
        self.wait_and_admit(Some(cause), deadline, Some(loss), pending)
            .await
    }

    /// Reports that the server ended a connection of `generation`; the
    /// receipt is what [`Guard::admit_after`] waits on.
    pub fn report_connection_lost(&self, generation: u64) -> Loss {
        self.lifecycle.report_connection_lost(generation)
    }

    /// The fast path: a lease when the pool is ready with a generation
    /// that may serve (after `after`, if given) and a connection was had.
    async fn try_fast(
        &self,
        deadline: Instant,
        after: Option<Loss>,
    ) -> Result<Fast<S>, GuardError> {
        let generation = match self.snapshot.borrow().ready_for(after) {
            Some(generation) => generation.clone(),
            None => return Ok(Fast::NotReady),
        };
        // Shortly after a refusal, only a session given back will do.
        if let Some(refusal) = self.refusals.holding()
            && generation.pool().status().idle == 0
        {
            return Ok(Fast::NoSession(refusal));
        }
        // A ready pool usually has a connection at hand: try once before
        // arming the budget's timer, which costs more than the rest.
        let got = {
            let mut get = pin!(generation.pool().get());
            match poll_once(get.as_mut()).await {
                Some(got) => Ok(got),
                None => tokio::time::timeout_at(deadline, get).await,
            }
        };
        match got {
            Err(_) => Err(GuardError::PoolExhausted),
            Ok(Ok(conn)) if !generation.is_retired() => Ok(Fast::Admitted(Lease {
                conn,
                generation,
                deadline,
            })),
            Ok(Ok(_stale)) => Ok(Fast::NotReady),
            // Retired between the snapshot and `get`: its pool is closed; wait.
            Ok(Err(_)) if generation.is_retired() => Ok(Fast::NotReady),
            Ok(Err(error)) => self.no_session(&generation, error.into()),
        }
    }

    /// A ready pool could not lend a session because a new one could not
    /// be opened. That is not a failure of the server (see the lifecycle's
    /// module doc): a refusal is counted, a server that could not be reached
    /// is left to the health check to judge, and the request asks again.
    fn no_session(
        &self,
        generation: &Generation<Pool<S>>,
        error: SourceError,
    ) -> Result<Fast<S>, GuardError> {
        match error.scope {
            Scope::Statement => return Err(GuardError::Pool(error)),
            Scope::Refused(reason) => {
                self.metrics.session_refused(reason);
                self.refusals.refused(&error);
            }
            Scope::Unreachable | Scope::Server => {
                self.lifecycle.report_unreachable(generation.id())
            }
            Scope::Session => {}
        }
        tracing::debug!(generation = generation.id(), error = %error, "No session could be opened for a request.");
        Ok(Fast::NoSession(error))
    }

    /// The slow path: wait for `ready`, then admit; records the wait.
    /// `pending` is a session that could not be had just now.
    async fn wait_and_admit(
        &self,
        cause: Option<GuardCause>,
        deadline: Instant,
        after: Option<Loss>,
        pending: Option<SourceError>,
    ) -> Result<Lease<S>, GuardError> {
        let started = Instant::now();
        let _waiting = self.lifecycle.wait_begins();
        let mut wait = Wait {
            cause,
            started,
            no_session: pending,
            pause: NO_SESSION_PAUSE,
        };
        let mut rx = self.snapshot.clone();
        loop {
            if wait.no_session.is_some() {
                wait.pause_before_asking_again(&mut rx, deadline).await;
                if Instant::now() >= deadline {
                    return Err(self.timed_out(wait));
                }
            }
            let waited =
                rx.wait_for(|s| s.state == PoolState::Stopping || s.ready_for(after).is_some());
            let state = match tokio::time::timeout_at(deadline, waited).await {
                Ok(Ok(snapshot)) => snapshot.state,
                Ok(Err(_)) => PoolState::Stopping,
                Err(_) => return Err(self.timed_out(wait)),
            };
            if state == PoolState::Stopping {
                return Err(GuardError::Stopping);
            }
            match self.try_fast(deadline, after).await? {
                Fast::Admitted(lease) => {
                    if let Some(cause) = wait.cause {
                        self.metrics
                            .guard_wait(cause, GuardOutcome::Admitted, started.elapsed());
                    }
                    return Ok(lease);
                }
                Fast::NotReady => wait.no_session = None,
                Fast::NoSession(error) => {
                    wait.cause = wait.cause.or(Some(GuardCause::Busy));
                    wait.no_session = Some(error);
                }
            }
            wait.cause = wait
                .cause
                .or_else(|| wait_cause(rx.borrow().state))
                .or(Some(GuardCause::Reconnecting));
        }
    }

    /// The budget ran out: records the wait and says why.
    fn timed_out(&self, wait: Wait) -> GuardError {
        let cause = wait.cause.unwrap_or(GuardCause::Reconnecting);
        let waited = wait.started.elapsed();
        self.metrics
            .guard_wait(cause, GuardOutcome::Timeout, waited);
        tracing::warn!(cause = %cause, waited_ms = waited.as_millis() as u64, "Guard timeout: no usable connection within the budget.");
        match wait.no_session {
            Some(error) => GuardError::NoSession {
                waited,
                reason: error.message,
            },
            None => GuardError::Timeout { cause, waited },
        }
    }
}

/// A request's wait in the slow path.
struct Wait {
    /// What it waits for (the metric label), once known.
    cause: Option<GuardCause>,
    /// When it started waiting.
    started: Instant,
    /// Why the last ask for a session found none, if it did.
    no_session: Option<SourceError>,
    /// The next pause before asking again.
    pause: Duration,
}

impl Wait {
    /// Pauses before asking a ready pool again for a session; a new state
    /// (a reconnect started, a new generation) ends the pause early.
    async fn pause_before_asking_again<P>(
        &mut self,
        rx: &mut watch::Receiver<Snapshot<P>>,
        deadline: Instant,
    ) {
        let until = (Instant::now() + self.pause).min(deadline);
        self.pause = (self.pause * 2).min(NO_SESSION_PAUSE_MAX);
        rx.mark_unchanged();
        let _ = tokio::time::timeout_at(until, rx.changed()).await;
    }
}

/// Polls `future` once: its output if it is ready at once, else `None`
/// (the future stays registered with the task's waker and can be polled on).
async fn poll_once<F: Future>(mut future: Pin<&mut F>) -> Option<F::Output> {
    std::future::poll_fn(|cx| {
        Poll::Ready(match future.as_mut().poll(cx) {
            Poll::Ready(output) => Some(output),
            Poll::Pending => None,
        })
    })
    .await
}

/// Why a request in `state` has to wait; `None` when it need not.
fn wait_cause(state: PoolState) -> Option<GuardCause> {
    match state {
        PoolState::Ready => None,
        PoolState::Starting | PoolState::Warming => Some(GuardCause::Warming),
        PoolState::Reconnecting => Some(GuardCause::Reconnecting),
        PoolState::Paused => Some(GuardCause::Paused),
        PoolState::Stopping => Some(GuardCause::Reconnecting),
    }
}
