//! A response over the limit costs the daemon about the limit in memory, not
//! the size of what the database would have sent. The daemon runs in this
//! test process, so the process's own resident set is the daemon's.
//!
//! This file holds a single test, so no other test's allocations share the
//! process while the peak is measured.

mod support;

use reqwest::StatusCode;
use serde_json::json;
use support::Cluster;
use support::daemon::{TestDaemon, config_for};
use support::memory::{peak_growth, reset_peak};

const MIB: u64 = 1024 * 1024;

#[tokio::test]
async fn a_row_far_over_the_response_limit_answers_507_without_being_held() {
    let cluster = Cluster::start();
    let config = config_for(&cluster);
    let limit = config.max_response_bytes as u64;
    assert_eq!(limit, 10 * MIB, "the default response limit");
    let daemon = TestDaemon::start(config).await;
    // One request first, so connections and buffers of the normal path exist.
    let warm = daemon.query("SELECT repeat('w', 1000000)", json!([])).await;
    assert_eq!(warm["rowCount"], 1);

    let before = reset_peak();
    let huge = json!({"query": "SELECT repeat('x', 200000000)"}).to_string();
    let reply = daemon.sql(huge, &[]).await;
    let growth = peak_growth(before);
    assert_eq!(
        reply.status,
        StatusCode::INSUFFICIENT_STORAGE,
        "{}",
        reply.body
    );

    eprintln!(
        "resident before {} MiB, peak growth {} KiB, limit {} MiB",
        before / MIB,
        growth / 1024,
        limit / MIB
    );
    assert!(
        growth < 3 * limit,
        "peak resident set grew by {growth} bytes for a {limit}-byte limit"
    );

    let next = daemon.query("SELECT 'after'", json!([])).await;
    assert_eq!(next["rows"], json!([["after"]]));
}
