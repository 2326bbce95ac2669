//! A user's speed limit in one direction: a token bucket shared by all the user's sessions.
//!
//! The bucket may go into debt: a read or write is never split to fit the tokens left,
//! it is let through and charged, and the next one waits until the debt is paid. So the
//! long-run rate is exact whatever the size of reads, a burst is at most one read per
//! session beyond [`BURST`], and no byte is held back in a buffer of ours.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Tokens a quiet bucket saves up, as a time at the full rate: enough to absorb the jitter
/// of timers without letting an idle user burst far past its rate.
pub const BURST: Duration = Duration::from_millis(50);

/// The shortest wait: tokio's timers tick in milliseconds, and a shorter one would only spin
/// (a debt of a few bytes would round to a wait of nothing).
const MIN_WAIT: Duration = Duration::from_millis(1);

/// Bytes per second in one direction; `0` means unlimited.
#[derive(Debug)]
pub struct RateLimit {
    rate: AtomicU64,
    bucket: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    /// Bytes that may pass now; negative is debt.
    tokens: f64,
    at: Instant,
}

impl RateLimit {
    pub fn new(rate: Option<u64>) -> RateLimit {
        RateLimit {
            rate: AtomicU64::new(rate.unwrap_or(0)),
            bucket: Mutex::new(Bucket { tokens: 0.0, at: Instant::now() }),
        }
    }

    /// Changes the rate live; sessions waiting pick it up at their next check.
    pub fn set(&self, rate: Option<u64>) {
        self.rate.store(rate.unwrap_or(0), Ordering::Relaxed);
    }

    pub fn rate(&self) -> Option<u64> {
        Some(self.rate.load(Ordering::Relaxed)).filter(|rate| *rate > 0)
    }

    /// How long to wait before moving more bytes; `None`: go now.
    pub fn wait(&self, now: Instant) -> Option<Duration> {
        let rate = self.rate()? as f64;
        let mut bucket = self.bucket.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        bucket.refill(rate, now);
        (bucket.tokens < 0.0).then(|| Duration::from_secs_f64(-bucket.tokens / rate).max(MIN_WAIT))
    }

    /// Charges `bytes` that have just moved.
    pub fn spend(&self, bytes: usize, now: Instant) {
        let Some(rate) = self.rate() else { return };
        let mut bucket = self.bucket.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        bucket.refill(rate as f64, now);
        bucket.tokens -= bytes as f64;
    }
}

impl Bucket {
    fn refill(&mut self, rate: f64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(rate * BURST.as_secs_f64());
        self.at = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Moves `chunk`-byte pieces through `limit` from `movers` movers taking turns for
    /// `span` of virtual time, waiting as told; returns the bytes moved.
    fn moved(limit: &RateLimit, chunk: usize, movers: usize, span: Duration) -> u64 {
        let start = Instant::now();
        let mut clocks = vec![start; movers];
        let mut total = 0u64;
        for _ in 0..10_000_000 {
            // The mover whose clock is earliest goes next, as the runtime would wake it.
            let (i, now) = clocks.iter().copied().enumerate().min_by_key(|(_, at)| *at).unwrap();
            if now >= start + span {
                return total;
            }
            match limit.wait(now) {
                Some(wait) => clocks[i] = now + wait,
                None => {
                    limit.spend(chunk, now);
                    total += chunk as u64;
                    clocks[i] = now + Duration::from_micros(10);
                }
            }
        }
        panic!("no end to {span:?} of moving: the limiter never lets time pass");
    }

    #[test]
    fn one_mover_and_twenty_stay_within_a_percent_of_the_rate_over_ten_seconds() {
        let rate = 1_000_000u64;
        for (movers, chunk) in [(1, 16 * 1024), (20, 16 * 1024), (20, 1500)] {
            let limit = RateLimit::new(Some(rate));
            let bytes = moved(&limit, chunk, movers, Duration::from_secs(10));
            let ratio = bytes as f64 / (rate * 10) as f64;
            assert!(
                (0.99..=1.01 + (chunk * movers) as f64 / (rate * 10) as f64).contains(&ratio),
                "{movers} movers: {ratio}"
            );
        }
    }

    #[test]
    fn unlimited_never_waits_and_a_new_rate_applies_at_once() {
        let limit = RateLimit::new(None);
        let now = Instant::now();
        limit.spend(1 << 30, now);
        assert_eq!(limit.wait(now), None);
        limit.set(Some(1000));
        limit.spend(2000, now);
        let wait = limit.wait(now).expect("in debt");
        assert!((1.9..=2.0).contains(&wait.as_secs_f64()), "{wait:?}");
        limit.spend(0, now + wait - Duration::from_micros(1));
        assert_eq!(limit.wait(now + wait - Duration::from_micros(1)), Some(MIN_WAIT), "a tiny debt still waits");
        limit.set(None);
        assert_eq!(limit.wait(now), None);
    }

    #[test]
    fn a_quiet_bucket_saves_up_only_the_burst() {
        let limit = RateLimit::new(Some(1_000_000));
        let now = Instant::now() + Duration::from_secs(60);
        limit.spend(50_000, now); // the whole burst
        assert_eq!(limit.wait(now), None);
        limit.spend(1, now);
        assert!(limit.wait(now).is_some(), "a minute of quiet buys no more than the burst");
    }
}
