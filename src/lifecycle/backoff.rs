//! Exponential backoff with jitter between failed attempts.
//!
//! Full doubling from `initial` up to `max`, then each pause is drawn
//! uniformly from its upper half, so many daemons restarted together do not
//! knock on the database in lockstep while no pause collapses to zero.

use std::time::Duration;

use rand::Rng;

/// The pauses between consecutive failed attempts.
#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    /// A backoff starting at `initial` and capped at `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max: max.max(initial),
            failures: 0,
        }
    }

    /// The ceiling of the next pause, before jitter.
    pub fn ceiling(&self) -> Duration {
        let factor = 2u32.saturating_pow(self.failures.min(30));
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// Records a failure and returns how long to wait before the next attempt.
    pub fn next_pause(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        jittered(ceiling)
    }
}

/// A pause drawn uniformly from the upper half of `ceiling`.
pub fn jittered(ceiling: Duration) -> Duration {
    let half = ceiling / 2;
    half + rand::rng().random_range(Duration::ZERO..=half)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_the_cap_and_stay_in_the_upper_half() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let ceilings = [100, 200, 400, 800, 1600, 3200, 5000, 5000];
        for ms in ceilings {
            let ceiling = Duration::from_millis(ms);
            assert_eq!(backoff.ceiling(), ceiling);
            let pause = backoff.next_pause();
            assert!(
                pause >= ceiling / 2 && pause <= ceiling,
                "{pause:?} vs {ceiling:?}"
            );
        }
    }
}
