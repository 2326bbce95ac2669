//! The warm-demand model: when a target has earned warm connections (its demand is
//! repeated, not one burst) and how many (its warm set grows when a stream finds none
//! ready and shrinks when one is closed unused). Pure bookkeeping on atomics: no sockets,
//! no clock of its own (callers pass the time in milliseconds).

use std::sync::atomic::{AtomicU64, Ordering};

use super::{Inner, Target};

/// Streams started after an earlier one of the target had ended that count as repeated
/// demand however quickly they come: a client working through a sequence, not a burst
/// whose streams all start together.
const RETURNS: u64 = 2;

/// A target's demand and the size of the warm set it has earned. Public so that
/// `benches/pool.rs` times the server's own bookkeeping rather than a copy of it.
#[derive(Default)]
pub struct WarmDemand {
    /// Warm connections the target should have (its warm set's size).
    goal: AtomicU64,
    demand: Demand,
}

impl WarmDemand {
    /// Counts a stream starting at `now_ms` and sizes the warm set: one once the demand is
    /// repeated (`Demand::is_repeated`), one more when a stream found none ready
    /// (`served_warm` false) while the target was already warmed, at most `max`. (It
    /// shrinks in [`WarmDemand::shrink`].)
    pub fn record_stream(&self, now_ms: u64, window_ms: u64, warm_after_ms: u64, max: u64, served_warm: bool) {
        self.demand.record(now_ms, window_ms);
        let goal = self.goal.load(Ordering::Relaxed);
        let wanted = if goal == 0 {
            u64::from(self.demand.is_repeated(now_ms, window_ms, warm_after_ms))
        } else if !served_warm {
            goal + 1
        } else {
            goal
        };
        if wanted.min(max) > goal {
            let _ = self.goal.compare_exchange(goal, wanted.min(max), Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    /// Counts a stream's end.
    pub fn record_end(&self) {
        self.demand.record_end();
    }

    /// Counts one stream and asks for `size` warm connections at once (start-up warming).
    pub(super) fn warm_up(&self, now_ms: u64, window_ms: u64, size: u64) {
        self.demand.record(now_ms, window_ms);
        self.goal.store(size, Ordering::Relaxed);
    }

    /// One warm connection more than the target used: the warm set shrinks by one.
    pub(super) fn shrink(&self) {
        let _ = self.goal.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |g| g.checked_sub(1));
    }

    /// The warm set's size, at most `max`.
    pub(super) fn goal(&self, max: u64) -> u64 {
        self.goal.load(Ordering::Relaxed).min(max)
    }

    /// When the target's last stream started.
    pub(super) fn last_ms(&self) -> u64 {
        self.demand.last_ms()
    }
}

/// Streams per window (the idle window): the current one and the one before.
/// Races between threads rotating at the same moment may lose a count; the result
/// only sizes a warm set.
#[derive(Default)]
struct Demand {
    window_start_ms: AtomicU64,
    this_window: AtomicU64,
    last_window: AtomicU64,
    last_ms: AtomicU64,
    /// When the current run of demand began (its first stream after a quiet idle window),
    /// plus one: 0 means no stream yet.
    run_start_ms_plus_one: AtomicU64,
    /// Streams of the current run that ended.
    ended: AtomicU64,
    /// Streams of the current run that started after one of them had ended.
    returns: AtomicU64,
}

impl Demand {
    /// Counts a stream starting at `now_ms`.
    fn record(&self, now_ms: u64, window_ms: u64) {
        self.rotate(now_ms, window_ms);
        let run_start = self.run_start_ms_plus_one.load(Ordering::Relaxed);
        if run_start == 0 || now_ms.saturating_sub(self.last_ms.load(Ordering::Relaxed)) > window_ms {
            self.run_start_ms_plus_one.store(now_ms + 1, Ordering::Relaxed);
            self.ended.store(0, Ordering::Relaxed);
            self.returns.store(0, Ordering::Relaxed);
        }
        if self.ended.load(Ordering::Relaxed) > 0 {
            self.returns.fetch_add(1, Ordering::Relaxed);
        }
        self.this_window.fetch_add(1, Ordering::Relaxed);
        self.last_ms.store(now_ms, Ordering::Relaxed);
    }

    /// Counts a stream's end.
    fn record_end(&self) {
        self.ended.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether the current run is repeated demand: streams spread over `warm_after`, or
    /// [`RETURNS`] streams that came after an earlier one had ended.
    fn is_repeated(&self, now_ms: u64, window_ms: u64, warm_after_ms: u64) -> bool {
        self.rate(now_ms, window_ms) >= 2
            && (self.lasted_ms(now_ms) >= warm_after_ms || self.returns.load(Ordering::Relaxed) >= RETURNS)
    }

    /// How long the current run of demand has lasted.
    fn lasted_ms(&self, now_ms: u64) -> u64 {
        match self.run_start_ms_plus_one.load(Ordering::Relaxed) {
            0 => 0,
            start => now_ms.saturating_sub(start - 1),
        }
    }

    fn rotate(&self, now_ms: u64, window_ms: u64) {
        let start = self.window_start_ms.load(Ordering::Relaxed);
        let elapsed = now_ms.saturating_sub(start);
        if elapsed < window_ms.max(1) {
            return;
        }
        if self.window_start_ms.compare_exchange(start, now_ms, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            let finished = self.this_window.swap(0, Ordering::Relaxed);
            // A window with no stream in between means the rate is now zero.
            let previous = if elapsed < 2 * window_ms.max(1) { finished } else { 0 };
            self.last_window.store(previous, Ordering::Relaxed);
        }
    }

    /// Streams per window, as the busier of the current and the last window.
    fn rate(&self, now_ms: u64, window_ms: u64) -> u64 {
        self.rotate(now_ms, window_ms);
        self.this_window.load(Ordering::Relaxed).max(self.last_window.load(Ordering::Relaxed))
    }

    fn last_ms(&self) -> u64 {
        self.last_ms.load(Ordering::Relaxed)
    }
}

impl Inner {
    /// Counts a stream to `target` and sizes its warm set ([`WarmDemand::record_stream`]).
    pub(super) fn size_warm_set(&self, target: &Target, served_warm: bool) {
        let warm_after = self.settings.warm_after.as_millis() as u64;
        let max = self.settings.min_idle as u64;
        target.demand.record_stream(self.now_ms(), self.window_ms(), warm_after, max, served_warm);
    }

    /// How many warm connections `target` should have now.
    pub(super) fn warm_goal(&self, target: &Target) -> u64 {
        target.demand.goal(self.settings.min_idle as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{ENGINES, holding_target, pool, settings, wait_until};
    use super::*;
    use std::time::Duration;

    const WINDOW_MS: u64 = 60_000;
    const WARM_AFTER_MS: u64 = 1000;

    #[test]
    fn streams_that_start_together_earn_no_warm_set() {
        let demand = WarmDemand::default();
        for _ in 0..10 {
            demand.record_stream(5, WINDOW_MS, WARM_AFTER_MS, 5, false);
        }
        assert_eq!(demand.goal(5), 0);
    }

    #[test]
    fn demand_lasting_warm_after_earns_one_warm_connection() {
        let demand = WarmDemand::default();
        demand.record_stream(0, WINDOW_MS, WARM_AFTER_MS, 5, false);
        demand.record_stream(WARM_AFTER_MS - 1, WINDOW_MS, WARM_AFTER_MS, 5, false);
        assert_eq!(demand.goal(5), 0, "not yet lasting");
        demand.record_stream(WARM_AFTER_MS, WINDOW_MS, WARM_AFTER_MS, 5, false);
        assert_eq!(demand.goal(5), 1);
    }

    #[test]
    fn two_returns_after_an_end_are_repeated_demand_at_once() {
        let demand = WarmDemand::default();
        demand.record_stream(0, WINDOW_MS, WARM_AFTER_MS, 5, false);
        demand.record_end();
        demand.record_stream(0, WINDOW_MS, WARM_AFTER_MS, 5, false);
        assert_eq!(demand.goal(5), 0, "one return");
        demand.record_end();
        demand.record_stream(0, WINDOW_MS, WARM_AFTER_MS, 5, false);
        assert_eq!(demand.goal(5), 1, "two returns");
    }

    #[test]
    fn the_warm_set_grows_when_none_was_ready_up_to_max_and_shrinks_when_unused() {
        let demand = WarmDemand::default();
        demand.record_stream(0, WINDOW_MS, WARM_AFTER_MS, 3, false);
        demand.record_stream(WARM_AFTER_MS, WINDOW_MS, WARM_AFTER_MS, 3, false);
        assert_eq!(demand.goal(3), 1);
        demand.record_stream(WARM_AFTER_MS, WINDOW_MS, WARM_AFTER_MS, 3, true);
        assert_eq!(demand.goal(3), 1, "served warm: the set is big enough");
        for _ in 0..5 {
            demand.record_stream(WARM_AFTER_MS, WINDOW_MS, WARM_AFTER_MS, 3, false);
        }
        assert_eq!(demand.goal(3), 3, "grown to max, no further");
        assert_eq!(demand.goal(2), 2, "read at most max");
        demand.shrink();
        assert_eq!(demand.goal(3), 2);
        for _ in 0..5 {
            demand.shrink();
        }
        assert_eq!(demand.goal(3), 0, "never below none");
    }

    #[test]
    fn a_quiet_window_starts_a_new_run() {
        let demand = WarmDemand::default();
        demand.record_stream(0, WINDOW_MS, WARM_AFTER_MS, 5, false);
        demand.record_end();
        demand.record_stream(0, WINDOW_MS, WARM_AFTER_MS, 5, false);
        demand.record_end();
        // Long after: the returns of the earlier run no longer count, and the rate is one.
        let later = 3 * WINDOW_MS;
        demand.record_stream(later, WINDOW_MS, WARM_AFTER_MS, 5, false);
        assert_eq!((demand.goal(5), demand.last_ms()), (0, later));
    }

    #[tokio::test]
    async fn streams_that_come_at_once_are_one_visit_and_only_lasting_demand_is_warmed() {
        for engine in ENGINES {
            let (address, _held) = holding_target().await;
            let mut lasting = settings(engine, 10, 2);
            lasting.warm_after = Duration::from_millis(300);
            let pool = pool(lasting);
            // Two streams together, as a client fetching two things from one host at once:
            // no warm dial, which nobody would have taken.
            let together = futures_util::future::join(
                pool.acquire(&address, pool.names().own()),
                pool.acquire(&address, pool.names().own()),
            )
            .await;
            drop(together);
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert_eq!((pool.warmed(), pool.idle_count(&address)), (0, 0), "{engine}: a burst was warmed");
            // The target comes back after warm_after: now it is warmed, and the warm
            // connection serves the next stream.
            tokio::time::sleep(Duration::from_millis(250)).await;
            drop(pool.acquire(&address, pool.names().own()).await.unwrap());
            wait_until("a warm connection", || pool.idle_count(&address) == 1).await;
            assert!(pool.acquire(&address, pool.names().own()).await.unwrap().reused, "{engine}");
        }
    }

    #[tokio::test]
    async fn a_target_that_comes_back_twice_is_repeated_demand_however_quick() {
        for engine in ENGINES {
            let (address, _held) = holding_target().await;
            let mut slow = settings(engine, 10, 2);
            slow.warm_after = Duration::from_secs(60);
            let pool = pool(slow);
            drop(pool.acquire(&address, pool.names().own()).await.unwrap());
            drop(pool.acquire(&address, pool.names().own()).await.unwrap());
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert_eq!(pool.warmed(), 0, "{engine}: one return is not yet a sequence");
            drop(pool.acquire(&address, pool.names().own()).await.unwrap());
            wait_until("a warm connection", || pool.idle_count(&address) == 1).await;
            assert!(pool.acquire(&address, pool.names().own()).await.unwrap().reused, "{engine}");
        }
    }

    #[tokio::test]
    async fn a_burst_grows_the_warm_set_and_unused_connections_shrink_it() {
        for engine in ENGINES {
            let (address, _held) = holding_target().await;
            let mut short = settings(engine, 50, 4);
            short.max_idle_time = Duration::from_millis(300);
            let pool = pool(short);
            drop(pool.acquire(&address, pool.names().own()).await.unwrap());
            drop(pool.acquire(&address, pool.names().own()).await.unwrap());
            wait_until("one warm", || pool.idle_count(&address) == 1).await;
            // Eight at once: one is served warm, the others find none ready.
            let burst: Vec<_> =
                futures_util::future::join_all((0..8).map(|_| pool.acquire(&address, pool.names().own())))
                    .await
                    .into_iter()
                    .collect();
            drop(burst);
            wait_until("a bigger warm set", || pool.idle_count(&address) == 4).await;
            // Nobody comes: every warm connection expires unused and the set shrinks to none.
            tokio::time::sleep(Duration::from_millis(400)).await;
            pool.maintain();
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert_eq!((pool.idle_count(&address), pool.warm_now()), (0, 0), "{engine}: no refill after expiry");
            assert_eq!(pool.unused(), 4, "{engine}");
        }
    }

    #[tokio::test]
    async fn targets_named_once_are_never_warmed_and_are_forgotten_when_quiet() {
        for engine in ENGINES {
            let mut short = settings(engine, 10, 5);
            short.max_idle_time = Duration::from_millis(100);
            let pool = pool(short);
            let mut targets = Vec::new();
            for _ in 0..40 {
                let (address, held) = holding_target().await;
                drop(pool.acquire(&address, pool.names().own()).await.unwrap());
                targets.push((address, held));
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
            assert_eq!((pool.warmed(), pool.warm_now()), (0, 0), "{engine}: no warm dial for a target named once");
            assert_eq!(pool.key_count(), 40, "{engine}");
            pool.maintain();
            assert_eq!(pool.key_count(), 0, "{engine}: quiet targets are forgotten");
            let connections: usize = targets.iter().map(|(_, held)| held.lock().unwrap().len()).sum();
            assert_eq!(connections, 40, "{engine}: one connection per stream, nothing more");
        }
    }
}
