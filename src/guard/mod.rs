//! The guard: admission to the pool, stale-client detection and, above it,
//! the execution of requests.
//!
//! The guard is the only way to run work. It makes a request that arrives
//! during a reconnect wait (bounded by the guard budget) instead of failing,
//! and moves a request that holds a connection of a retired generation to
//! the current one.

pub mod admission;
pub mod error;
pub mod exec;
pub mod outcome;
mod refusals;
pub mod replay;

pub use admission::{DEFAULT_GUARD_TIMEOUT, Guard, Lease};
pub use error::GuardError;
pub use exec::{ExecError, ExecSettings, Executor, WriteSafety};
pub use replay::Rule;

#[cfg(test)]
mod tests;
