//! Bounded polling.
//!
//! Faults take effect asynchronously (a server needs time to crash, a standby
//! to catch up), so tests wait for an observable outcome instead of sleeping
//! for a guessed duration. Every wait has a deadline so a broken scenario
//! fails with a message instead of hanging the test run.

use std::thread;
use std::time::{Duration, Instant};

/// Pause between two checks of a polled condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(25);

/// Calls `condition` until it returns `true` or `timeout` has elapsed.
///
/// Returns whether the condition became true. The condition is always
/// checked at least once, and once more right at the deadline.
pub fn eventually(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        thread::sleep(POLL_INTERVAL.min(deadline - now));
    }
}
