//! A generation: one pool of connections with an id that only grows.
//!
//! Requests remember the generation their connection came from. When the
//! lifecycle detects a failure it *retires* the current generation at once,
//! so anything still holding one of its connections can tell, before it
//! sends a single byte, that the connection is stale.

use std::sync::atomic::{AtomicBool, Ordering};
use tokio::time::Instant;

use super::source::GenerationPool;

/// One pool of connections and its identity.
#[derive(Debug)]
pub struct Generation<P> {
    /// Starts at 1; each successful (re)connect adds one.
    id: u64,
    /// The connections of this generation.
    pool: P,
    /// Set once a failure was detected or a newer generation replaced it.
    retired: AtomicBool,
    /// When it was published.
    published_at: Instant,
    /// The run of the server its warm-up met (see
    /// [`ServerStatus::run`](super::ServerStatus::run)).
    run: Option<String>,
}

impl<P: GenerationPool> Generation<P> {
    pub(crate) fn new(id: u64, pool: P, run: Option<String>) -> Self {
        Self {
            id,
            pool,
            retired: AtomicBool::new(false),
            published_at: Instant::now(),
            run,
        }
    }

    /// The generation id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The pool of this generation.
    pub fn pool(&self) -> &P {
        &self.pool
    }

    /// True once this generation must not serve requests any more.
    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    /// When it was published.
    pub fn published_at(&self) -> Instant {
        self.published_at
    }

    /// The run of the server it was built on, when known: a server that
    /// answers with another has restarted or recovered from a crash since,
    /// and ended every session of this generation.
    pub fn run(&self) -> Option<&str> {
        self.run.as_deref()
    }

    /// Retires the generation and drains its pool: idle connections close
    /// now, lent ones when returned. Returns false if it was already retired.
    pub(crate) fn retire(&self) -> bool {
        let first = !self.retired.swap(true, Ordering::AcqRel);
        if first {
            self.pool.close();
        }
        first
    }
}
