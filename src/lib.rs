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
//! - [`lifecycle`]: generations, health checks, reconnects, two-phase warm-up.
//! - [`guard`]: admission (bounded waits, stale-client hits), the replay
//!   rules, and the [`guard::Executor`] the front ends call.
//! - [`api`]: the Neon-compatible SQL-over-HTTP front end.
//! - [`wire`]: the PostgreSQL wire front end, with transaction pooling.
//! - [`ops`]: metrics, health, status and admin endpoints.
//! - [`app`]: wires all of it from a [`config::Config`].
//! - [`telemetry`] and [`config`] sit at the base and import nothing of ours.
//!
//! A request travels: `POST /sql` ([`api::http`]) → executor (replay rules)
//! → guard (admission) → lifecycle (current generation) → pool → backend
//! session → PostgreSQL.

pub mod api;
pub mod app;
pub mod backend;
pub mod config;
pub mod guard;
pub mod lifecycle;
pub mod ops;
pub mod pool;
pub mod telemetry;
pub mod wire;
