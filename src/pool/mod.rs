//! Keyed store of idle resources and per-key state, with three interchangeable engines.
//!
//! The server keys by outbound target ([`crate::proto::Address`]) and keeps warm TCP
//! connections; the client keys by server and keeps idle TLS sessions. Each key has a
//! *slot* in the engine holding two things: the caller's per-key state `S` (limits, demand,
//! counters: atomics the caller updates) and the stack of idle entries. One lookup on the
//! acquire path finds both, with no global lock and no allocation once the key exists.
//!
//! Keys are created on first use and **forgotten** by [`IdlePool::forget_where`] once their
//! stack is empty and the caller says their state is quiet, so the key count follows the
//! live targets rather than every target ever seen.
//!
//! Every engine implements [`IdlePool`] with the same observable behaviour (the shared test
//! suite, stress test and model-based property test run them all); they differ in how they
//! deal with concurrent callers:
//!
//! - [`PoolType::Lock`]: one mutex over one map. The obviously correct baseline.
//! - [`PoolType::LockFree`]: lookups never lock: an `ArcSwap`ped bucket table whose buckets
//!   are copied on write (one small bucket per new key, amortised O(1)), and a Treiber stack
//!   per key reclaimed with crossbeam-epoch.
//! - [`PoolType::HighPerf`]: keys sharded over many small mutexes, and per key a lock-free
//!   hot slot holding the newest entry in front of a locked stack (after pingora-pool).
//!
//! Entries are handed out LIFO: the most recently used connection is the one most likely still
//! alive and warm, and the old ones at the bottom are left to expire.

mod highperf;
mod lock;
mod lockfree;
mod stats;
#[cfg(test)]
mod tests;

use std::fmt;
use std::hash::Hash;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub use highperf::HighPerfPool;
pub use lock::LockPool;
pub use lockfree::LockFreePool;
pub use stats::{
    Figure, KeyCounters, KeyStats, Measure, POOL_FIGURES, PoolCounters, PoolStatsSnapshot, TARGET_FIGURES, Value,
    hit_rate,
};

/// How every engine hashes keys: foldhash, seeded at random per pool. Keys are targets
/// that clients choose, so the seed keeps collisions out of their reach; foldhash hashes an
/// address in a few nanoseconds where SipHash took about fifteen, and an acquire hashes
/// twice (take, then the refill's give).
pub type KeyHasher = foldhash::fast::RandomState;

/// A key by name, for pools keyed by text (tests, benches) and for the status log line.
pub type PoolKey = Arc<str>;

/// What a pool may be keyed by: cheap to hash and compare; cloned only when a key is new.
pub trait Key: Hash + Eq + Clone + Send + Sync + 'static {}
impl<K: Hash + Eq + Clone + Send + Sync + 'static> Key for K {}

/// What a slot keeps beside its idle entries: the caller's per-key state, created with
/// `Default` when the key is first seen. Shared by `Arc`, so it is made of atomics.
pub trait KeyState: Default + Send + Sync + 'static {}
impl<S: Default + Send + Sync + 'static> KeyState for S {}

/// Which engine backs a pool. Chosen once at start-up with `--pool-type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum PoolType {
    /// One mutex over all keys: the obviously-correct baseline.
    Lock,
    /// Lock-free stack per key, copy-on-write key map.
    #[default]
    LockFree,
    /// Keys sharded over many small mutexes.
    HighPerf,
}

impl PoolType {
    /// Every engine, in the order help text, scripts and benches list them.
    pub const ALL: [PoolType; 3] = [PoolType::Lock, PoolType::LockFree, PoolType::HighPerf];

    /// The name used on the command line and in logs.
    pub fn name(self) -> &'static str {
        match self {
            PoolType::Lock => "lock",
            PoolType::LockFree => "lockfree",
            PoolType::HighPerf => "highperf",
        }
    }

    /// What the engine is made of, in a few words (the flag's one-line help).
    pub fn summary(self) -> &'static str {
        match self {
            PoolType::Lock => "a mutex",
            PoolType::LockFree => "arc-swap + epoch stacks",
            PoolType::HighPerf => "sharded",
        }
    }

    /// The engine in one sentence (the flag's full help, beside each name).
    pub fn description(self) -> &'static str {
        match self {
            PoolType::Lock => "One mutex over all keys: the obviously-correct baseline",
            PoolType::LockFree => "Lock-free stack per key, copy-on-write key map",
            PoolType::HighPerf => "Keys sharded over many small mutexes",
        }
    }

    /// The engines' names, comma-separated: what an error or help text lists.
    pub fn names() -> String {
        Self::ALL.map(PoolType::name).join(", ")
    }
}

impl fmt::Display for PoolType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A pool type name that is not one of the engines.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown pool type {0:?}: expected one of {names}", names = PoolType::names())]
pub struct UnknownPoolType(pub String);

impl FromStr for PoolType {
    type Err = UnknownPoolType;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|kind| kind.name() == s).ok_or_else(|| UnknownPoolType(s.to_owned()))
    }
}

/// Limits that decide how much a pool keeps and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSettings {
    /// Idle entries kept per key; a `give` beyond it is refused.
    pub max_idle_per_key: usize,
    /// Idle entries kept across all keys; bounds the file descriptors parked in the pool.
    pub max_idle_total: usize,
    /// An entry idle for longer than this is expired (peers and middleboxes drop quiet
    /// connections, so an old idle one is likely dead).
    pub max_idle_time: Duration,
    /// An entry older than this since creation is expired, however busy it has been.
    pub max_lifetime: Duration,
}

impl Default for PoolSettings {
    /// Conservative defaults: a handful per target, a few hundred in all, recycled well before
    /// the typical NAT or load-balancer idle timeout of a few minutes.
    fn default() -> Self {
        PoolSettings {
            max_idle_per_key: 8,
            max_idle_total: 256,
            max_idle_time: Duration::from_secs(60),
            max_lifetime: Duration::from_secs(600),
        }
    }
}

/// A resource parked in a pool, with the timestamps that decide when it expires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Idle<T> {
    pub value: T,
    /// When the resource was created (dialed, handshaken).
    pub created: Instant,
    /// When the resource was last given back.
    pub idle_since: Instant,
}

impl<T> Idle<T> {
    /// A resource created just now.
    pub fn new(value: T) -> Self {
        let now = Instant::now();
        Idle { value, created: now, idle_since: now }
    }

    /// The same resource, given back at `now` after use; its creation time is kept.
    pub fn returned_at(self, now: Instant) -> Self {
        Idle { idle_since: now, ..self }
    }

    pub fn idle_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.idle_since)
    }

    pub fn age(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.created)
    }

    /// Idle for longer than `max_idle_time`, or older than `max_lifetime`, as of `now`.
    pub fn is_expired(&self, settings: &PoolSettings, now: Instant) -> bool {
        self.idle_for(now) > settings.max_idle_time || self.age(now) > settings.max_lifetime
    }
}

/// The one interface the server and client use, whichever engine is behind it.
///
/// Counting: the engine keeps the idle count and counts as cleaned the expired entries a
/// take drops on its way; everything else (new, reused, active, what a sweep returned and
/// the caller closed) is counted by the caller, who alone knows what happened.
pub trait IdlePool<K, S, T>: Send + Sync {
    /// The key's state (created if the key is new) and its newest unexpired idle entry, in
    /// one lookup: the acquire path.
    fn checkout(&self, key: &K, now: Instant) -> (Arc<S>, Option<Idle<T>>);

    /// The key's state, created if the key is new.
    fn state(&self, key: &K) -> Arc<S>;

    /// The most recently given-back unexpired entry for `key` (LIFO); expired ones met on the
    /// way are dropped and counted as cleaned. Never creates the key.
    fn take(&self, key: &K) -> Option<Idle<T>> {
        self.take_at(key, Instant::now())
    }

    /// [`IdlePool::take`] with expiry judged as of `now`.
    fn take_at(&self, key: &K, now: Instant) -> Option<Idle<T>>;

    /// Puts an entry back (creating the key if new); returns it in `Err` when the per-key or
    /// global idle cap is reached, so the caller can close it.
    fn give(&self, key: &K, entry: Idle<T>) -> Result<(), Idle<T>>;

    /// Removes every entry expired as of `now` and returns them for the caller to close (and
    /// count).
    fn sweep(&self, now: Instant) -> Vec<(K, Idle<T>)>;

    /// Removes every idle entry, for shutdown.
    fn drain(&self) -> Vec<(K, Idle<T>)>;

    /// Forgets every key with no idle entry whose state `quiet` approves; returns how many.
    /// A caller still holding such a key's state keeps a detached copy: its updates no
    /// longer reach the pool (`quiet` should only approve states nobody is using).
    fn forget_where(&self, quiet: &dyn Fn(&S) -> bool) -> usize;

    fn idle_count(&self, key: &K) -> usize;

    fn idle_total(&self) -> usize;

    /// Keys held now.
    fn key_count(&self) -> usize;

    /// Every key with its state and idle count, in no particular order.
    fn keys(&self) -> Vec<(K, Arc<S>, usize)>;

    /// Idle counts of the keys that have any, in no particular order.
    fn idle_by_key(&self) -> Vec<(K, usize)> {
        self.keys().into_iter().filter(|(_, _, n)| *n > 0).map(|(k, _, n)| (k, n)).collect()
    }

    fn counters(&self) -> &PoolCounters;
}

/// Builds a pool of the chosen engine.
pub fn new_pool<K: Key, S: KeyState, T: Send + 'static>(
    kind: PoolType,
    settings: PoolSettings,
) -> Arc<dyn IdlePool<K, S, T>> {
    match kind {
        PoolType::Lock => Arc::new(LockPool::new(settings)),
        PoolType::LockFree => Arc::new(LockFreePool::new(settings)),
        PoolType::HighPerf => Arc::new(HighPerfPool::new(settings)),
    }
}

/// Increments `slots` unless it has reached `max`. A compare-exchange loop rather than
/// fetch_add-then-undo, so the count never overshoots the cap even for a moment. Relaxed is
/// enough: the count guards no other memory, and atomicity alone keeps it within `max`.
pub fn reserve_slot(slots: &AtomicU64, max: u64) -> bool {
    slots.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n < max).then(|| n + 1)).is_ok()
}

#[cfg(test)]
mod format_tests {
    use super::*;

    #[test]
    fn snapshot_totals_reused_and_new() {
        let c = PoolCounters::default();
        c.record_new();
        c.record_new();
        c.record_reused();
        c.record_warmed();
        c.record_unused();
        c.record_unpooled();
        c.record_checkout();
        c.record_checkout();
        c.record_checkin();
        c.record_checkin();
        c.record_checkin(); // one too many: saturates instead of wrapping
        c.record_cleaned(4);
        let s = c.snapshot();
        assert_eq!((s.total(), s.new, s.reused), (3, 2, 1));
        assert_eq!((s.active, s.cleaned, s.idle), (0, 4, 0));
        assert_eq!((s.warmed, s.unused, s.unpooled, s.ended), (1, 1, 1, 0));
        let line = format!(
            "{}{}",
            crate::metrics::log_lines::format_stats_line(&s),
            crate::metrics::log_lines::format_stats_extra(&s, true)
        );
        assert!(line.starts_with("[Pool Stats] Total: 3, Active: 0, Reused: 1, New: 2, Cleaned: 4, "), "{line}");
        assert!(line.ends_with(", Warmed: 1, Unused: 1, Unpooled: 1, Lookups: 0, Keys: 0"), "{line}");
    }

    #[test]
    fn pool_type_parses_and_prints_its_three_names() {
        for kind in PoolType::ALL {
            assert_eq!(kind.to_string().parse::<PoolType>(), Ok(kind));
        }
        let err = "mutex".parse::<PoolType>().unwrap_err().to_string();
        assert!(err.contains("lock, lockfree, highperf"), "{err}");
        assert_eq!(PoolType::default(), PoolType::LockFree);
    }

    #[test]
    fn expiry_by_idle_time_and_by_lifetime() {
        let settings = PoolSettings {
            max_idle_time: Duration::from_secs(10),
            max_lifetime: Duration::from_secs(100),
            ..PoolSettings::default()
        };
        let t0 = Instant::now();
        let fresh = Idle::new(()).returned_at(t0);
        let at = |secs| t0 + Duration::from_secs(secs);
        assert!(!fresh.is_expired(&settings, at(10)));
        assert!(fresh.is_expired(&settings, at(11)));

        let busy = Idle { value: (), created: t0, idle_since: at(95) };
        assert!(!busy.is_expired(&settings, at(100)));
        assert!(busy.is_expired(&settings, at(101)));
    }
}
