//! Failures of the guard.

use std::time::Duration;

use crate::lifecycle::SourceError;
use crate::telemetry::labels::{ClientErrorKind, GuardCause};

/// Why the guard could not serve a request.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    /// No ready generation within the request's budget.
    #[error("no database connection became available within {waited:?} ({cause})")]
    Timeout {
        /// What the request waited for.
        cause: GuardCause,
        /// How long it waited.
        waited: Duration,
    },
    /// The pool is ready, but no session was free and no new one could be
    /// opened (the server refused it, e.g. too many connections) within the budget.
    #[error("no database session could be had within {waited:?}: {reason}")]
    NoSession {
        /// How long the request waited.
        waited: Duration,
        /// The last refusal, as the server said it (no secrets).
        reason: String,
    },
    /// Every connection of the ready generation stayed busy for the whole budget.
    #[error("all database connections stayed busy for the whole wait budget")]
    PoolExhausted,
    /// The daemon is shutting down.
    #[error("the server is shutting down")]
    Stopping,
    /// The pool failed in a way that is not a connection failure.
    #[error("{0}")]
    Pool(SourceError),
}

impl GuardError {
    /// The client-facing kind (metric label of `pgwarden_errors_total`).
    pub fn kind(&self) -> ClientErrorKind {
        match self {
            GuardError::Timeout { .. }
            | GuardError::NoSession { .. }
            | GuardError::PoolExhausted
            | GuardError::Stopping => ClientErrorKind::GuardTimeout,
            GuardError::Pool(_) => ClientErrorKind::Internal,
        }
    }
}
