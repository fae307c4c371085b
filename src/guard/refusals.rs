//! Holding back after the server refused a new session.
//!
//! A server at `max_connections` refuses every new session until one of
//! its clients leaves. If every request waiting in the guard asked it again
//! on each try, a full server would get a storm of connection attempts
//! (each one a forked backend that is turned away) exactly when it has the
//! least room. So for a short while after a refusal, requests take only
//! sessions given back to the pool, and at most one ask goes to the server
//! per hold.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::lifecycle::SourceError;

/// How long a refusal holds back new asks for a session.
pub const REFUSAL_HOLD: Duration = Duration::from_millis(250);

/// Shared by every clone of a guard.
#[derive(Debug)]
pub(crate) struct RefusalGate {
    /// The clock's origin for [`RefusalGate::until_ms`].
    base: Instant,
    /// Milliseconds after `base` until which asks are held; 0 when open.
    until_ms: AtomicU64,
    /// The refusal that started the hold, as the server worded it.
    last: Mutex<Option<SourceError>>,
}

impl RefusalGate {
    pub(crate) fn new() -> Self {
        Self {
            base: Instant::now(),
            until_ms: AtomicU64::new(0),
            last: Mutex::new(None),
        }
    }

    /// Records a refusal: new sessions are not asked for during the hold.
    pub(crate) fn refused(&self, error: &SourceError) {
        let until = self.now_ms() + REFUSAL_HOLD.as_millis() as u64;
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(error.clone());
        self.until_ms.store(until, Ordering::Release);
    }

    /// The refusal whose hold still runs, if any. One atomic load when
    /// there is none, so the fast path pays nothing for it.
    pub(crate) fn holding(&self) -> Option<SourceError> {
        let until = self.until_ms.load(Ordering::Acquire);
        if until == 0 || self.now_ms() >= until {
            return None;
        }
        self.last.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn now_ms(&self) -> u64 {
        // Never 0, so a stored deadline is never mistaken for "open".
        self.base.elapsed().as_millis() as u64 + 1
    }
}
