//! Latency percentiles and rates: pure arithmetic, so it can be unit-tested.

use std::time::Duration;

/// Latency summary of one run, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Latency {
    /// Summarises samples (any order). All zero when there are none.
    pub fn of(samples: &mut [Duration]) -> Latency {
        samples.sort_unstable();
        let ms = |d: Option<Duration>| d.map_or(0.0, |d| d.as_secs_f64() * 1000.0);
        Latency {
            p50: ms(percentile(samples, 50.0)),
            p90: ms(percentile(samples, 90.0)),
            p99: ms(percentile(samples, 99.0)),
            max: ms(samples.last().copied()),
        }
    }
}

/// Nearest-rank percentile of sorted samples: the smallest sample that at least
/// `p` percent of the samples are less than or equal to. `None` when empty.
///
/// Nearest-rank (rather than interpolation) always answers with a latency that
/// was really measured, and p100 is the maximum.
pub fn percentile<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let p = p.clamp(0.0, 100.0);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Bytes over a duration as Gbit/s (10^9 bits per second).
pub fn gbit_per_sec(bytes: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs <= 0.0 { 0.0 } else { bytes as f64 * 8.0 / secs / 1e9 }
}

/// Events over a duration, per second.
pub fn per_sec(count: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs <= 0.0 { 0.0 } else { count as f64 / secs }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_of_nothing_is_none() {
        assert_eq!(percentile::<u32>(&[], 50.0), None);
    }

    #[test]
    fn percentile_of_one_sample_is_that_sample() {
        for p in [0.0, 1.0, 50.0, 99.0, 100.0] {
            assert_eq!(percentile(&[7], p), Some(7));
        }
    }

    #[test]
    fn nearest_rank_on_one_to_hundred() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 90.0), Some(90));
        assert_eq!(percentile(&v, 99.0), Some(99));
        assert_eq!(percentile(&v, 100.0), Some(100));
        assert_eq!(percentile(&v, 0.0), Some(1));
        assert_eq!(percentile(&v, 99.5), Some(100));
    }

    #[test]
    fn nearest_rank_on_small_sets() {
        // Wikipedia's nearest-rank example.
        let v = [15, 20, 35, 40, 50];
        assert_eq!(percentile(&v, 5.0), Some(15));
        assert_eq!(percentile(&v, 30.0), Some(20));
        assert_eq!(percentile(&v, 40.0), Some(20));
        assert_eq!(percentile(&v, 50.0), Some(35));
        assert_eq!(percentile(&v, 100.0), Some(50));
        // p99 of ten samples is the maximum.
        let ten: Vec<u32> = (1..=10).collect();
        assert_eq!(percentile(&ten, 99.0), Some(10));
        assert_eq!(percentile(&ten, 90.0), Some(9));
    }

    #[test]
    fn out_of_range_p_is_clamped() {
        let v = [1, 2, 3];
        assert_eq!(percentile(&v, -5.0), Some(1));
        assert_eq!(percentile(&v, 500.0), Some(3));
    }

    #[test]
    fn latency_sorts_and_converts_to_ms() {
        let mut samples: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
        let l = Latency::of(&mut samples);
        assert_eq!(l, Latency { p50: 50.0, p90: 90.0, p99: 99.0, max: 100.0 });
        assert_eq!(Latency::of(&mut []), Latency::default());
    }

    #[test]
    fn rates() {
        assert_eq!(gbit_per_sec(125_000_000, Duration::from_secs(1)), 1.0);
        assert_eq!(gbit_per_sec(1, Duration::ZERO), 0.0);
        assert_eq!(per_sec(500, Duration::from_millis(250)), 2000.0);
    }
}
