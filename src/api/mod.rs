//! Front ends: how applications reach PostgreSQL through pgwarden.
//!
//! - [`http`]: the Neon-compatible SQL-over-HTTP API (`POST /sql`);
//! - [`neon`]: its request and response shapes;
//! - [`server`]: the connection loop both listeners share, with the header
//!   timeout and size cap hyper applies before a request reaches a router.

pub mod http;
pub mod neon;
pub mod server;
