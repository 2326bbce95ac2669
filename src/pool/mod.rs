//! Keyed store of idle resources, with three interchangeable concurrency engines.
//!
//! The server keys by outbound target (`"host:port"`) and keeps warm TCP connections; the
//! client keys by server address and keeps idle TLS sessions. Both only need somewhere to park
//! a resource between uses and get the freshest one back. Dialing, liveness checks, waiters and
//! per-target limits sit on top of this module and are not its business.
//!
//! Every engine implements [`IdlePool`] with the same observable behaviour (the shared test
//! suite runs them all); they differ only in how they deal with concurrent callers:
//!
//! - [`PoolType::Lock`]: one mutex over everything. Simplest; fine at modest rates.
//! - [`PoolType::LockFree`]: copy-on-write key map plus a lock-free stack per key.
//! - [`PoolType::HighPerf`]: keys sharded over many small mutexes, so unrelated targets never
//!   contend.
//!
//! Entries are handed out LIFO: the most recently used connection is the one most likely still
//! alive and warm, and the old ones at the bottom are left to expire.

pub mod buffers;
mod highperf;
mod lock;
mod lockfree;
#[cfg(test)]
mod tests;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;

pub use highperf::HighPerfPool;
pub use lock::LockPool;
pub use lockfree::LockFreePool;

/// What a pool is keyed by: a target or server address such as `"example.com:443"`.
/// An `Arc<str>` so that cloning and hashing stay cheap on the hot path.
pub type PoolKey = Arc<str>;

/// Which engine backs a pool. Chosen once at start-up with `--pool-type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, clap::ValueEnum)]
pub enum PoolType {
    /// One mutex over all keys: the obviously-correct baseline.
    Lock,
    /// Lock-free stack per key, copy-on-write key map.
    #[default]
    #[value(name = "lockfree")]
    LockFree,
    /// Keys sharded over many small mutexes.
    #[value(name = "highperf")]
    HighPerf,
}

impl PoolType {
    /// The name used on the command line and in logs.
    pub fn name(self) -> &'static str {
        match self {
            PoolType::Lock => "lock",
            PoolType::LockFree => "lockfree",
            PoolType::HighPerf => "highperf",
        }
    }
}

impl fmt::Display for PoolType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A pool type name that is not one of the three engines.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown pool type {0:?}: expected one of lock, lockfree, highperf")]
pub struct UnknownPoolType(pub String);

impl FromStr for PoolType {
    type Err = UnknownPoolType;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "lock" => Ok(PoolType::Lock),
            "lockfree" => Ok(PoolType::LockFree),
            "highperf" => Ok(PoolType::HighPerf),
            other => Err(UnknownPoolType(other.to_owned())),
        }
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
pub trait IdlePool<T>: Send + Sync {
    /// The most recently given-back unexpired entry for `key` (LIFO); expired ones met on the
    /// way are dropped and counted as cleaned.
    fn take(&self, key: &PoolKey) -> Option<Idle<T>> {
        self.take_at(key, Instant::now())
    }

    /// [`IdlePool::take`] with expiry judged as of `now`, for callers (and tests) that already
    /// hold a timestamp.
    fn take_at(&self, key: &PoolKey, now: Instant) -> Option<Idle<T>>;

    /// Puts an entry back; returns it in `Err` when the per-key or global idle cap is reached,
    /// so the caller can close it.
    fn give(&self, key: &PoolKey, entry: Idle<T>) -> Result<(), Idle<T>>;

    /// Removes every entry expired as of `now` and returns them for the caller to close
    /// (counted as cleaned).
    fn sweep(&self, now: Instant) -> Vec<(PoolKey, Idle<T>)>;

    /// Removes everything, for shutdown.
    fn drain(&self) -> Vec<(PoolKey, Idle<T>)>;

    fn idle_count(&self, key: &PoolKey) -> usize;

    fn idle_total(&self) -> usize;

    /// Idle counts of the keys that have any, sorted by key.
    fn idle_by_key(&self) -> Vec<(PoolKey, usize)>;

    fn counters(&self) -> &PoolCounters;
}

/// Builds a pool of the chosen engine.
pub fn new_pool<T: Send + 'static>(kind: PoolType, settings: PoolSettings) -> Arc<dyn IdlePool<T>> {
    match kind {
        PoolType::Lock => Arc::new(LockPool::new(settings)),
        PoolType::LockFree => Arc::new(LockFreePool::new(settings)),
        PoolType::HighPerf => Arc::new(HighPerfPool::new(settings)),
    }
}

/// Activity counters shared by the pool and its caller.
///
/// Each counter sits on its own cache line: they are bumped from every thread on every
/// checkout, and packing them together would make unrelated updates fight over one line.
#[derive(Debug, Default)]
pub struct PoolCounters {
    created: CachePadded<AtomicU64>,
    reused: CachePadded<AtomicU64>,
    cleaned: CachePadded<AtomicU64>,
    active: CachePadded<AtomicU64>,
    /// Idle entries across all keys. The engines reserve a slot here before storing an entry,
    /// which is how the global cap is enforced without a global lock.
    idle: CachePadded<AtomicU64>,
}

impl PoolCounters {
    /// The caller created a new resource because the pool had none to offer.
    pub fn record_new(&self) {
        self.created.fetch_add(1, Ordering::Relaxed);
    }

    /// The caller found `n` resources dead (e.g. a failed liveness check) and closed them.
    pub fn record_cleaned(&self, n: u64) {
        self.cleaned.fetch_add(n, Ordering::Relaxed);
    }

    /// The caller kept `n` entries that a sweep returned (e.g. to honour a minimum of idle
    /// sessions), so they no longer count as cleaned.
    pub fn record_kept_after_sweep(&self, n: u64) {
        let _ = self.cleaned.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| Some(c.saturating_sub(n)));
    }

    /// A resource went into use.
    pub fn record_checkout(&self) {
        self.active.fetch_add(1, Ordering::Relaxed);
    }

    /// A resource came out of use. Saturates at zero so that a stray check-in cannot wrap the
    /// gauge into nonsense.
    pub fn record_checkin(&self) {
        let _ = self.active.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    pub fn snapshot(&self) -> PoolStatsSnapshot {
        let reused = self.reused.load(Ordering::Relaxed);
        let new = self.created.load(Ordering::Relaxed);
        PoolStatsSnapshot {
            total: reused + new,
            active: self.active.load(Ordering::Relaxed),
            reused,
            new,
            cleaned: self.cleaned.load(Ordering::Relaxed),
            idle: self.idle.load(Ordering::Relaxed),
        }
    }

    fn record_reused(&self) {
        self.reused.fetch_add(1, Ordering::Relaxed);
    }

    fn idle_total(&self) -> usize {
        self.idle.load(Ordering::Relaxed) as usize
    }

    /// Claims one global idle slot unless `max` are already taken.
    fn try_reserve_idle(&self, max: usize) -> bool {
        reserve_slot(&self.idle, max as u64)
    }

    fn release_idle(&self, n: usize) {
        self.idle.fetch_sub(n as u64, Ordering::Relaxed);
    }
}

/// Increments `slots` unless it has reached `max`. A compare-exchange loop rather than
/// fetch_add-then-undo, so the count never overshoots the cap even for a moment. Relaxed is
/// enough: the count guards no other memory, and atomicity alone keeps it within `max`.
fn reserve_slot(slots: &AtomicU64, max: u64) -> bool {
    slots.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n < max).then_some(n + 1)).is_ok()
}

/// A point-in-time copy of [`PoolCounters`] for logging and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolStatsSnapshot {
    /// Checkouts served: `reused + new`.
    pub total: u64,
    pub active: u64,
    pub reused: u64,
    pub new: u64,
    pub cleaned: u64,
    pub idle: u64,
}

/// One key's share of a pool (a target of the server's outbound pool, a server of the
/// client's session pool), for the API.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyStats {
    pub key: PoolKey,
    /// Idle (warm) entries now.
    pub idle: u64,
    /// Entries in use now.
    pub active: u64,
    /// Entries created (dialed or handshaken) for this key.
    pub created: u64,
    /// Checkouts served by an idle entry.
    pub reused: u64,
    /// Entries closed by the pool (expired or found dead).
    pub cleaned: u64,
    /// Callers waiting for a free slot now.
    pub waiters: u64,
}

/// `[Pool Stats] Total: 15, Active: 3, Reused: 8, New: 7, Cleaned: 2, Reuse rate: 53.3%, Utilisation: 20.0%`
pub fn format_stats_line(s: &PoolStatsSnapshot) -> String {
    format!(
        "[Pool Stats] Total: {}, Active: {}, Reused: {}, New: {}, Cleaned: {}, \
         Reuse rate: {:.1}%, Utilisation: {:.1}%",
        s.total,
        s.active,
        s.reused,
        s.new,
        s.cleaned,
        percent(s.reused, s.reused + s.new),
        percent(s.active, s.total),
    )
}

/// Logs the two stats lines at INFO; `extra` is appended to the first.
pub fn log_stats(snapshot: &PoolStatsSnapshot, idle_by_key: &[(PoolKey, usize)], extra: &str) {
    log::info!("{}{extra}", format_stats_line(snapshot));
    log::info!("{}", format_status_line(idle_by_key));
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 { 0.0 } else { part as f64 * 100.0 / whole as f64 }
}

/// `[Pool Status] {"example.com:80": 5, "127.0.0.1:8080": 3}`, in the order given.
pub fn format_status_line(idle_by_key: &[(PoolKey, usize)]) -> String {
    let entries: Vec<String> = idle_by_key.iter().map(|(key, n)| format!("{}: {n}", json_string(key))).collect();
    format!("[Pool Status] {{{}}}", entries.join(", "))
}

/// Quotes `s` as a JSON string, so that a hostile host name cannot break the log line.
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod format_tests {
    use super::*;

    #[test]
    fn stats_line_matches_the_documented_format() {
        let s = PoolStatsSnapshot { total: 15, active: 3, reused: 8, new: 7, cleaned: 2, idle: 4 };
        assert_eq!(
            format_stats_line(&s),
            "[Pool Stats] Total: 15, Active: 3, Reused: 8, New: 7, Cleaned: 2, \
             Reuse rate: 53.3%, Utilisation: 20.0%"
        );
    }

    #[test]
    fn stats_line_with_nothing_served_shows_zero_rates() {
        assert_eq!(
            format_stats_line(&PoolStatsSnapshot::default()),
            "[Pool Stats] Total: 0, Active: 0, Reused: 0, New: 0, Cleaned: 0, \
             Reuse rate: 0.0%, Utilisation: 0.0%"
        );
    }

    #[test]
    fn status_line_matches_the_documented_format() {
        let status = [(PoolKey::from("example.com:80"), 5), (PoolKey::from("127.0.0.1:8080"), 3)];
        assert_eq!(format_status_line(&status), r#"[Pool Status] {"example.com:80": 5, "127.0.0.1:8080": 3}"#);
        assert_eq!(format_status_line(&[]), "[Pool Status] {}");
    }

    #[test]
    fn status_line_escapes_quotes_backslashes_and_controls() {
        let status = [(PoolKey::from("a\"b\\c\nd"), 1)];
        assert_eq!(format_status_line(&status), r#"[Pool Status] {"a\"b\\c\u000ad": 1}"#);
    }

    #[test]
    fn snapshot_totals_reused_and_new() {
        let c = PoolCounters::default();
        c.record_new();
        c.record_new();
        c.record_reused();
        c.record_checkout();
        c.record_checkout();
        c.record_checkin();
        c.record_checkin();
        c.record_checkin(); // one too many: saturates instead of wrapping
        c.record_cleaned(4);
        let s = c.snapshot();
        assert_eq!((s.total, s.new, s.reused), (3, 2, 1));
        assert_eq!((s.active, s.cleaned, s.idle), (0, 4, 0));
    }

    #[test]
    fn pool_type_parses_and_prints_its_three_names() {
        for kind in [PoolType::Lock, PoolType::LockFree, PoolType::HighPerf] {
            assert_eq!(kind.to_string().parse::<PoolType>(), Ok(kind));
            let value = clap::ValueEnum::to_possible_value(&kind).unwrap();
            assert_eq!(value.get_name(), kind.name());
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
