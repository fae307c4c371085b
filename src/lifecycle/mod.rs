//! The lifecycle of the pool: generations of connections, health checks,
//! passive failure detection, reconnects with backoff, a two-phase warm-up,
//! an atomic swap and the drain of the old generation.
//!
//! State machine (published on a `watch` channel, see [`Snapshot`]):
//! `starting → warming → ready → reconnecting → warming → ready …`, plus
//! `paused` (an operator holds new work) and `stopping`. A failed attempt
//! falls back to `starting` (before the first generation) or `reconnecting`
//! and is retried with exponential backoff until it succeeds or the daemon
//! stops. Generation ids start at 1 and only grow.

pub mod backoff;
pub mod generation;
pub mod manager;
pub mod settings;
pub mod source;
pub mod warmup;

pub use generation::Generation;
pub use manager::{Lifecycle, LifecycleStatus, ReconnectRecord, Snapshot, Waiting};
pub use settings::{LifecycleSettings, RequiredRole};
pub use source::{BackendSource, ConnectionSource, GenerationPool, ServerRole, SourceError};
pub use warmup::{WarmupError, WarmupTimings};

#[cfg(test)]
pub(crate) mod fake;
#[cfg(test)]
mod tests;
