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
//!
//! # What is a failure of the database
//! A reconnect costs a warm-up, makes every request wait, and counts
//! towards the "more than 5 reconnects a day" alert; a false one is the
//! symptom pgwarden exists to remove. So one rule decides, from the
//! [`Scope`](crate::backend::Scope) every failure carries
//! ([`BackendError::scope`](crate::backend::BackendError::scope) is the
//! single place that assigns it):
//!
//! | scope | examples | what happens |
//! |---|---|---|
//! | `Statement` | an SQL error, a result over the limit, a busy pool | answered to the client; nothing else |
//! | `Session` | a request abandoned by its client or by the transaction timeout (cancelled on the server, the session discarded), a refused session reset, an idle-session or idle-in-transaction timeout, a protocol surprise | that session is discarded; a request on it is replayed on another session of the **same** generation |
//! | `Refused` | a new session refused with SQLSTATE class 28 (authentication), 53 (too many connections), 3D, 42 | counted in `pgwarden_session_refusals_total{reason}` and logged; the request waits (within its budget) for a session to be given back; never a reconnect, since a new generation would be refused the same way |
//! | `Unreachable` | a new session that cannot connect, times out, fails TLS, or meets 57P03 (starting up, shutting down) | a suspicion: a health check runs at once and decides |
//! | `Server` | an established session ended by the server: end of stream, I/O error, 57P01, 57P02, PANIC | a suspicion, judged by one check a few milliseconds later (below): the generation is retired and the next one built (reason `connection_lost`) only when the server is going away |
//!
//! # One session, or the server?
//! A server that shuts down ends every session with 57P01, and so does
//! `pg_terminate_backend()`, which operators run on one session every day;
//! a crash ends them with 57P02 or a bare end of stream, and so does a
//! network fault on one connection. The session's goodbye cannot tell them
//! apart, but its siblings and the server itself can. So a report about
//! the current generation is a suspicion, checked 10 ms after a request saw
//! its session end (every session of a server going away has heard by
//! then), and at once when the pool found a session closed while it sat
//! idle (old news). A report that arrives after the check started is
//! checked anew, so a check that came too early is corrected. A session is
//! reported once, when it is found ended, and then discarded, so:
//!
//! 1. a second report before the first was checked is another session
//!    lost at once (a server restarted between two requests: the next one
//!    finds every pooled session closed) → reconnect, at once;
//! 2. otherwise the health check's own session, which no request uses, is
//!    pinged (no answer within the check's timeout → reconnect), and its
//!    round trip gives the pool's other sessions time to hear the news;
//! 3. every idle session of the pool is looked at without waiting, asking
//!    the kernel: any that heard the server's goodbye too → reconnect;
//! 4. the check's own session ended too (a `Server`-scope failure) and no
//!    idle session opened before the loss is still served to vouch that
//!    the server did not end them all → reconnect. With one, the check's
//!    idle session may have been terminated alone some seconds before, by
//!    an operator ending sessions one by one;
//! 5. unless the check's own session answered, a fresh one must reach the
//!    server: during a shutdown or a crash recovery it is refused (57P03)
//!    or cannot connect → reconnect;
//! 6. the server that answered is another run than the one the generation
//!    was built on (its start time or, after a crash recovery in place,
//!    the reset time of its shared statistics moved) → reconnect: it
//!    restarted, even if the check's own session was since replaced;
//! 7. otherwise the lost session ended alone: it is discarded, nothing
//!    else happens, and the verdict is published ([`Snapshot::cleared`])
//!    so that a request that broke on it is replayed or resolved on the
//!    same generation.
//!
//! A fast restart, an immediate shutdown, a crash (one backend killed: the
//! server ends every other session and recovers in place) and the
//! termination of every session each cost exactly one reconnect, as
//! before; one terminated session costs none. Some cases stay ambiguous. An
//! operator who terminates several sessions at once (every idle one, say)
//! costs a reconnect, as a mass termination does. A pool whose only
//! session was terminated together with every other, while the check had
//! no session of its own open yet, is judged alone; the pool goes on with
//! fresh sessions. And an operator's reset of the shared statistics reads
//! as a new run: the next lost session costs one reconnect.
//!
//! Asynchronous messages on an idle session (NOTIFY, NOTICE,
//! ParameterStatus) are read and kept in step, over TLS as over plain TCP;
//! they are not goodbyes. The health check asks on a session of its own,
//! outside the pool, so a pool kept busy by requests can never fail it; its
//! session failing alone is replaced once, and the check fails (reason
//! `health_check`) only when a fresh session cannot reach the server or the
//! server does not answer within the check's timeout. A server that refuses
//! the fresh session answered, so it is up.

pub mod backoff;
pub mod generation;
pub mod manager;
pub mod settings;
pub mod source;
pub mod warmup;

pub use generation::Generation;
pub use manager::{Lifecycle, LifecycleStatus, Loss, ReconnectRecord, Snapshot, Waiting};
pub use settings::{LifecycleSettings, RequiredRole};
pub use source::{
    BackendSource, ConnectionSource, GenerationPool, ServerRole, ServerStatus, SourceError,
};
pub use warmup::{Warmed, WarmupError, WarmupTimings};

#[cfg(test)]
pub(crate) mod fake;
#[cfg(test)]
mod tests;
