//! What the outbound pool reports: its counters in the pool vocabulary, per-target
//! statistics, the extra fields of the `[Pool Stats]` log line and the view the metrics
//! room shows. Read-only: nothing here changes the pool.

use std::sync::atomic::Ordering;

use super::OutboundPool;
use crate::metrics::log_lines::named_idle_by_key;
use crate::pool::{KeyStats, PoolKey, PoolStatsSnapshot};
use crate::proto::Address;

impl OutboundPool {
    /// The pool's counters in the one vocabulary (see [`PoolStatsSnapshot`]).
    pub fn stats(&self) -> PoolStatsSnapshot {
        let engine = self.inner.idle.counters().snapshot();
        let mut s = self.inner.shared.counters.snapshot();
        s.idle = engine.idle;
        s.cleaned += engine.cleaned; // expired entries a take dropped
        s.lookups = self.inner.names.lookups();
        s.keys = self.inner.idle.key_count() as u64;
        s
    }

    /// Warm connections dialed ahead of demand.
    pub fn warmed(&self) -> u64 {
        self.stats().warmed
    }

    /// Warm connections closed without ever carrying a stream.
    pub fn unused(&self) -> u64 {
        self.stats().unused
    }

    /// Streams dialed beyond the per-target limit, outside the pool.
    pub fn unpooled(&self) -> u64 {
        self.stats().unpooled
    }

    /// Name lookups sent to the resolver.
    pub fn lookups(&self) -> u64 {
        self.inner.names.lookups()
    }

    /// Warm connections idle or being dialed now (what `max_idle_total` caps).
    pub fn warm_now(&self) -> u64 {
        self.inner.shared.warm.load(Ordering::Relaxed)
    }

    /// Targets the pool holds now.
    pub fn key_count(&self) -> usize {
        self.inner.idle.key_count()
    }

    /// Logs the `[Pool Stats]` and `[Pool Status]` lines, from one snapshot.
    pub fn log_stats(&self) {
        let stats = self.stats();
        let extra = crate::metrics::log_lines::format_stats_extra(&stats, true);
        crate::metrics::log_lines::log_stats(&stats, &self.idle_by_target(), &extra);
    }

    /// Warm connections per target, sorted by target.
    pub fn idle_by_target(&self) -> Vec<(PoolKey, usize)> {
        named_idle_by_key(self.inner.idle.idle_by_key())
    }

    pub fn idle_count(&self, address: &Address) -> usize {
        self.inner.idle.idle_count(address)
    }

    /// Used connections closed when their stream ended.
    pub fn ended(&self) -> u64 {
        self.stats().ended
    }

    /// Counters of every target the pool holds (those used within the idle window, or
    /// with connections in use), sorted by target.
    pub fn per_target_stats(&self) -> Vec<KeyStats> {
        let mut stats: Vec<KeyStats> = self
            .inner
            .idle
            .keys()
            .into_iter()
            .map(|(address, target, idle)| target.counters.stats(address.to_string(), idle))
            .collect();
        stats.sort_by(|a, b| a.key.cmp(&b.key));
        stats
    }

    /// The pool as the metrics room shows it.
    pub fn connection_pool_stats(&self) -> crate::metrics::ConnectionPoolStats {
        crate::metrics::ConnectionPoolStats::new(
            "outbound",
            self.settings().pool_type.to_string(),
            self.stats(),
            self.per_target_stats(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{holding_target, pool, settings, wait_until};
    use crate::pool::PoolType;

    #[tokio::test]
    async fn the_metrics_room_and_the_log_line_show_the_pools_counters() {
        let (address, _held) = holding_target().await;
        let pool = pool(settings(PoolType::HighPerf, 10, 1));
        for _ in 0..2 {
            drop(pool.acquire(&address, pool.names().own()).await.unwrap());
        }
        wait_until("a warm connection", || pool.idle_count(&address) == 1).await;
        let view = pool.connection_pool_stats();
        assert_eq!((view.pool, view.pool_type.as_str()), ("outbound", "highperf"));
        let shown = |json| view.figure(json).unwrap_or_else(|| panic!("no figure {json}"));
        assert_eq!(
            (shown("total_created"), shown("current_idle"), shown("warmed"), shown("keys")),
            (3.0, 1.0, 1.0, 1.0)
        );
        assert_eq!(view.targets.len(), 1);
        assert_eq!(pool.idle_by_target().len(), 1);
        let extra = crate::metrics::log_lines::format_stats_extra(&pool.stats(), true);
        assert_eq!(extra, ", Warmed: 1, Unused: 0, Unpooled: 0, Lookups: 0, Keys: 1");
    }
}
