//! Front ends: how applications reach PostgreSQL through pgwarden.
//!
//! - [`http`]: the Neon-compatible SQL-over-HTTP API (`POST /sql`);
//! - [`neon`]: its request and response shapes.

pub mod http;
pub mod neon;
