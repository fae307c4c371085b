//! Telemetry: the metrics contract and helpers to read it.
//!
//! This module sits at the base of the crate and imports nothing of
//! pgwarden's; the other modules speak its label vocabulary.

pub mod labels;
pub mod logging;
pub mod metrics;
pub mod scrape;

pub use metrics::Metrics;
