//! pgwarden: a PostgreSQL connection-lifecycle daemon.
//!
//! Applications lose queries while their database connection is rebuilt.
//! pgwarden owns the pool's whole lifecycle (health checks, reconnects, a
//! two-phase warm-up, an atomic swap of connection generations) and puts a
//! guard in front of it, so a reconnect makes a request wait briefly instead
//! of failing.
//!
//! # Layout
//! Bottom up; nothing imports a layer above it.
//! - [`backend`]: pgwarden's own PostgreSQL sessions (TLS, authentication,
//!   pipelined extended queries in text format, transaction batches, cancel).
//! - [`pool`]: a `deadpool` pool of backend sessions that only reuses
//!   sessions that are provably clean.
//!
//! A request will travel: front end (HTTP `/sql`) → guard (admission, replay)
//! → lifecycle (current generation) → pool → backend session → PostgreSQL.

pub mod backend;
pub mod guard;
pub mod lifecycle;
pub mod pool;
pub mod telemetry;
