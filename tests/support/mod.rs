//! Integration-test kit for pgwarden.
//!
//! pgwarden exists to survive misbehaving databases, so its tests need real
//! PostgreSQL servers that can be restarted, crashed, frozen, failed over and
//! cut off from the network on demand. This kit provides:
//!
//! * [`Cluster`]: a private, disposable PostgreSQL cluster with known users,
//!   TLS, and fault helpers that return only once the fault is observable;
//! * [`FaultProxy`]: a TCP proxy that can refuse, blackhole, delay or cut
//!   connections between a client and a server;
//! * [`process`] and [`wait`]: bounded process runs and polling, so that no
//!   test can hang forever on a wedged server;
//! * [`node`]: the Node.js clients of tests/clients, run with a deadline.
//!
//! Every integration test file includes this module with `mod support;` and
//! uses only part of it, hence the module-wide allowances: unused items and
//! unused re-exports are expected there.
#![allow(dead_code, unused_imports)]

pub mod binary;
pub mod cluster;
pub mod daemon;
pub mod load;
pub mod memory;
pub mod node;
pub mod pg;
pub mod process;
pub mod proxy;
pub mod repo;
pub mod stack;
pub mod types;
pub mod wait;
pub mod wire;

pub use cluster::{Cluster, PgBin, users};
pub use proxy::{FaultProxy, ProxyMode};
