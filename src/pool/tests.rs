//! What every engine must do, checked the same way for all three: a behaviour suite, a
//! multi-threaded stress test that accounts for every entry, and a property test against a
//! plain single-threaded model.
//!
//! Time is passed explicitly (`take_at`, `sweep(now)`) from a base `Instant`, so expiry is
//! tested without sleeping.

use std::time::{Duration, Instant};

use super::*;

/// Runs each named test function (taking a [`PoolType`]) once per engine, as
/// `pool::tests::<engine>::<name>`.
macro_rules! for_every_engine {
    ($($test:ident),* $(,)?) => {
        mod lock {
            $(#[test] fn $test() { super::$test(super::PoolType::Lock) })*
        }
        mod lockfree {
            $(#[test] fn $test() { super::$test(super::PoolType::LockFree) })*
        }
        mod highperf {
            $(#[test] fn $test() { super::$test(super::PoolType::HighPerf) })*
        }
    };
}

for_every_engine!(
    takes_newest_first,
    keys_are_isolated,
    per_key_cap_refuses_and_hands_the_entry_back,
    global_cap_refuses_across_keys,
    take_drops_entries_idle_too_long,
    take_drops_entries_past_their_lifetime,
    take_judges_expiry_by_the_clock,
    sweep_removes_expired_and_keeps_order,
    drain_empties_every_key,
    idle_by_key_lists_non_empty_keys_sorted,
    counters_follow_takes_gives_and_cleaning,
    stress_on_one_key,
    stress_on_64_keys,
    checkout_creates_the_key_and_shares_its_state,
    quiet_empty_keys_are_forgotten_and_come_back_fresh,
    many_keys_come_and_go,
);

/// The engine under test, keyed by name, with no per-key state of its own.
fn new_pool<T: Send + 'static>(kind: PoolType, settings: PoolSettings) -> Arc<dyn IdlePool<PoolKey, (), T>> {
    super::new_pool(kind, settings)
}

/// Idle counts by key, sorted (the engines list them in no particular order).
fn idle_by_key<T>(pool: &Arc<dyn IdlePool<PoolKey, (), T>>) -> Vec<(PoolKey, usize)> {
    let mut lens = pool.idle_by_key();
    lens.sort_unstable();
    lens
}

/// A sweep whose entries the caller closes, and counts as cleaned, as the server does.
fn sweep<T>(pool: &Arc<dyn IdlePool<PoolKey, (), T>>, now: Instant) -> Vec<(PoolKey, Idle<T>)> {
    let expired = pool.sweep(now);
    pool.counters().record_cleaned(expired.len() as u64);
    expired
}

fn settings() -> PoolSettings {
    PoolSettings {
        max_idle_per_key: 4,
        max_idle_time: Duration::from_secs(10),
        max_idle_total: 6,
        max_lifetime: Duration::from_secs(100),
    }
}

fn key(name: &str) -> PoolKey {
    PoolKey::from(name)
}

fn secs(t0: Instant, s: u64) -> Instant {
    t0 + Duration::from_secs(s)
}

/// Entry `id`, created and given back at `t`.
fn entry(id: u32, t: Instant) -> Idle<u32> {
    Idle { value: id, created: t, idle_since: t }
}

fn ids(entries: Vec<(PoolKey, Idle<u32>)>) -> Vec<(PoolKey, u32)> {
    let mut ids: Vec<_> = entries.into_iter().map(|(k, e)| (k, e.value)).collect();
    ids.sort_unstable();
    ids
}

fn takes_newest_first(kind: PoolType) {
    let pool = new_pool(kind, settings());
    let (a, t0) = (key("a:1"), Instant::now());
    for id in 1..=3 {
        pool.give(&a, entry(id, t0)).unwrap();
    }
    let taken: Vec<_> = (0..4).map(|_| pool.take_at(&a, t0).map(|e| e.value)).collect();
    assert_eq!(taken, [Some(3), Some(2), Some(1), None]);
}

fn keys_are_isolated(kind: PoolType) {
    let pool = new_pool(kind, settings());
    let (a, b, t0) = (key("a:1"), key("b:1"), Instant::now());
    pool.give(&a, entry(1, t0)).unwrap();
    assert!(pool.take_at(&b, t0).is_none());
    assert!(pool.take_at(&key("never-seen:1"), t0).is_none());
    pool.give(&b, entry(2, t0)).unwrap();
    assert_eq!(pool.take_at(&a, t0).unwrap().value, 1);
    assert_eq!(pool.idle_count(&a), 0);
    assert_eq!(pool.idle_count(&b), 1);
}

fn per_key_cap_refuses_and_hands_the_entry_back(kind: PoolType) {
    let pool = new_pool(kind, settings());
    let (a, t0) = (key("a:1"), Instant::now());
    for id in 0..4 {
        pool.give(&a, entry(id, t0)).unwrap();
    }
    assert_eq!(pool.give(&a, entry(99, t0)).unwrap_err().value, 99);
    assert_eq!(pool.idle_count(&a), 4);
    // Another key still has room, and a take frees a slot on this one.
    pool.give(&key("b:1"), entry(5, t0)).unwrap();
    pool.take_at(&a, t0).unwrap();
    pool.give(&a, entry(6, t0)).unwrap();
}

fn global_cap_refuses_across_keys(kind: PoolType) {
    let pool = new_pool(kind, settings());
    let t0 = Instant::now();
    let keys: Vec<_> = (0..6).map(|i| key(&format!("k{i}:1"))).collect();
    for (id, k) in keys.iter().enumerate() {
        pool.give(k, entry(id as u32, t0)).unwrap();
    }
    assert_eq!(pool.give(&keys[0], entry(99, t0)).unwrap_err().value, 99);
    assert_eq!(pool.give(&key("new:1"), entry(98, t0)).unwrap_err().value, 98);
    assert_eq!(pool.idle_total(), 6);
    pool.take_at(&keys[3], t0).unwrap();
    pool.give(&keys[0], entry(7, t0)).unwrap();
    assert_eq!(pool.idle_total(), 6);
}

fn take_drops_entries_idle_too_long(kind: PoolType) {
    let pool = new_pool(kind, settings());
    let (a, t0) = (key("a:1"), Instant::now());
    pool.give(&a, entry(1, t0)).unwrap();
    pool.give(&a, entry(2, secs(t0, 5))).unwrap();
    pool.give(&a, entry(3, t0)).unwrap();
    // At t0+12, entries 1 and 3 have been idle 12s (> 10s); entry 2 only 7s.
    assert_eq!(pool.take_at(&a, secs(t0, 12)).unwrap().value, 2);
    assert_eq!(pool.counters().snapshot().cleaned, 1);
    assert_eq!(pool.idle_count(&a), 1);
    assert!(pool.take_at(&a, secs(t0, 12)).is_none());
    assert_eq!(pool.counters().snapshot().cleaned, 2);
    assert_eq!(pool.idle_total(), 0);
}

fn take_drops_entries_past_their_lifetime(kind: PoolType) {
    let pool = new_pool(kind, settings());
    let (a, t0) = (key("a:1"), Instant::now());
    let old = entry(1, t0).returned_at(secs(t0, 95));
    pool.give(&a, entry(2, secs(t0, 95))).unwrap();
    pool.give(&a, old).unwrap();
    // Both idle 6s, but entry 1 is 101s old (> 100s).
    assert_eq!(pool.take_at(&a, secs(t0, 101)).unwrap().value, 2);
    assert_eq!(pool.counters().snapshot().cleaned, 1);
}

fn take_judges_expiry_by_the_clock(kind: PoolType) {
    let pool = new_pool(kind, settings());
    let (a, now) = (key("a:1"), Instant::now());
    let Some(long_ago) = now.checked_sub(Duration::from_secs(11)) else {
        return; // the monotonic clock started less than 11s ago: nothing to backdate to
    };
    pool.give(&a, entry(1, long_ago)).unwrap();
    pool.give(&a, entry(2, now)).unwrap();
    pool.give(&a, entry(3, long_ago)).unwrap();
    assert_eq!(pool.take(&a).unwrap().value, 2);
    assert!(pool.take(&a).is_none());
    assert_eq!(pool.counters().snapshot().cleaned, 2);
}

fn sweep_removes_expired_and_keeps_order(kind: PoolType) {
    let pool = new_pool(kind, settings());
    let (a, b, t0) = (key("a:1"), key("b:1"), Instant::now());
    pool.give(&a, entry(1, t0)).unwrap(); // idle too long at t0+12
    pool.give(&a, entry(2, secs(t0, 5))).unwrap();
    pool.give(&a, entry(3, t0)).unwrap(); // idle too long
    pool.give(&a, entry(4, secs(t0, 6))).unwrap();
    pool.give(&b, entry(5, t0).returned_at(secs(t0, 101))).unwrap(); // past its lifetime
    pool.give(&b, entry(6, secs(t0, 101))).unwrap();

    let swept = ids(sweep(&pool, secs(t0, 101)));
    // At t0+101 everything on `a` has idled too long.
    assert_eq!(swept, [(a.clone(), 1), (a.clone(), 2), (a.clone(), 3), (a.clone(), 4), (b.clone(), 5)]);
    assert_eq!(idle_by_key(&pool), [(b.clone(), 1)]);

    pool.give(&a, entry(7, t0)).unwrap();
    pool.give(&a, entry(8, secs(t0, 5))).unwrap();
    pool.give(&a, entry(9, t0)).unwrap();
    pool.give(&a, entry(10, secs(t0, 6))).unwrap();
    assert_eq!(ids(sweep(&pool, secs(t0, 12))), [(a.clone(), 7), (a.clone(), 9)]);
    assert!(sweep(&pool, secs(t0, 12)).is_empty());
    let left: Vec<_> = (0..2).map(|_| pool.take_at(&a, secs(t0, 12)).unwrap().value).collect();
    assert_eq!(left, [10, 8]);
    assert_eq!(pool.counters().snapshot().cleaned, 7);
    assert_eq!(pool.idle_total(), 1);
}

fn drain_empties_every_key(kind: PoolType) {
    let pool = new_pool(kind, settings());
    let (a, b, t0) = (key("a:1"), key("b:1"), Instant::now());
    pool.give(&a, entry(1, t0)).unwrap();
    pool.give(&a, entry(2, t0)).unwrap();
    pool.give(&b, entry(3, t0)).unwrap();
    assert_eq!(ids(pool.drain()), [(a.clone(), 1), (a.clone(), 2), (b.clone(), 3)]);
    assert_eq!(pool.idle_total(), 0);
    assert!(idle_by_key(&pool).is_empty());
    assert!(pool.take_at(&a, t0).is_none());
    // Draining is not cleaning: nothing expired.
    assert_eq!(pool.counters().snapshot().cleaned, 0);
    // The pool is still usable, with its caps intact.
    for id in 0..4 {
        pool.give(&a, entry(id, t0)).unwrap();
    }
    assert!(pool.give(&a, entry(4, t0)).is_err());
}

fn idle_by_key_lists_non_empty_keys_sorted(kind: PoolType) {
    let pool = new_pool(kind, settings());
    let t0 = Instant::now();
    for (id, name) in ["b:2", "a:1", "c:3", "b:2"].into_iter().enumerate() {
        pool.give(&key(name), entry(id as u32, t0)).unwrap();
    }
    pool.take_at(&key("c:3"), t0).unwrap();
    assert_eq!(idle_by_key(&pool), [(key("a:1"), 1), (key("b:2"), 2)]);
    assert_eq!(
        crate::metrics::log_lines::format_status_line(&idle_by_key(&pool)),
        r#"[Pool Status] {"a:1": 1, "b:2": 2}"#
    );
}

fn counters_follow_takes_gives_and_cleaning(kind: PoolType) {
    let pool = new_pool(kind, settings());
    let (a, t0) = (key("a:1"), Instant::now());
    let counters = pool.counters();
    for id in 0..3 {
        counters.record_new();
        counters.record_checkout();
        counters.record_checkin();
        pool.give(&a, entry(id, t0)).unwrap();
    }
    pool.give(&a, entry(3, secs(t0, 20))).unwrap();
    assert_eq!(pool.take_at(&a, secs(t0, 20)).unwrap().value, 3);
    counters.record_reused();
    counters.record_checkout();
    assert!(pool.take_at(&a, secs(t0, 20)).is_none()); // the other three idled 20s
    counters.record_cleaned(1); // the caller found a dead one of its own
    assert_eq!(
        counters.snapshot(),
        PoolStatsSnapshot { active: 1, reused: 1, new: 3, cleaned: 4, idle: 0, ..Default::default() }
    );
}

fn checkout_creates_the_key_and_shares_its_state(kind: PoolType) {
    use std::sync::atomic::{AtomicU64, Ordering};
    let pool: Arc<dyn IdlePool<PoolKey, AtomicU64, u32>> = super::new_pool(kind, settings());
    let (a, t0) = (key("a:1"), Instant::now());
    assert_eq!(pool.key_count(), 0);
    let (state, found) = pool.checkout(&a, t0);
    assert!(found.is_none());
    state.fetch_add(5, Ordering::Relaxed);
    assert_eq!(pool.key_count(), 1);
    pool.give(&a, entry(1, t0)).unwrap();
    let (again, found) = pool.checkout(&a, t0);
    assert_eq!((again.load(Ordering::Relaxed), found.map(|e| e.value)), (5, Some(1)));
    assert_eq!(pool.state(&a).load(Ordering::Relaxed), 5);
    let keys = pool.keys();
    assert_eq!(keys.len(), 1);
    assert_eq!((&keys[0].0, keys[0].1.load(Ordering::Relaxed), keys[0].2), (&a, 5, 0));
}

fn quiet_empty_keys_are_forgotten_and_come_back_fresh(kind: PoolType) {
    use std::sync::atomic::{AtomicU64, Ordering};
    let pool: Arc<dyn IdlePool<PoolKey, AtomicU64, u32>> = super::new_pool(kind, settings());
    let (busy, idle, quiet, t0) = (key("busy:1"), key("idle:1"), key("quiet:1"), Instant::now());
    pool.state(&busy).store(1, Ordering::Relaxed); // in use: not quiet
    pool.give(&idle, entry(1, t0)).unwrap(); // holds an idle entry
    pool.state(&quiet);
    assert_eq!(pool.forget_where(&|s| s.load(Ordering::Relaxed) == 0), 1);
    assert_eq!(pool.key_count(), 2);
    let mut left: Vec<_> = pool.keys().into_iter().map(|(k, _, _)| k).collect();
    left.sort_unstable();
    assert_eq!(left, [busy.clone(), idle.clone()]);
    // A forgotten key comes back with fresh state and works as before.
    assert_eq!(pool.state(&quiet).load(Ordering::Relaxed), 0);
    pool.give(&quiet, entry(2, t0)).unwrap();
    assert_eq!(pool.take_at(&quiet, t0).unwrap().value, 2);
    assert_eq!(pool.take_at(&idle, t0).unwrap().value, 1);
    assert_eq!(pool.forget_where(&|s| s.load(Ordering::Relaxed) == 0), 2); // `busy` is in use
    assert_eq!(pool.key_count(), 1);
    assert_eq!(pool.forget_where(&|_| true), 1);
    assert_eq!((pool.key_count(), pool.idle_total()), (0, 0));
}

/// Ten thousand keys in and out: the table grows, lookups keep finding every key, and
/// forgetting them all leaves nothing behind.
fn many_keys_come_and_go(kind: PoolType) {
    let wide = PoolSettings { max_idle_total: 100_000, ..settings() };
    let pool = new_pool::<u32>(kind, wide);
    let t0 = Instant::now();
    let keys: Vec<PoolKey> = (0..10_000).map(|i| key(&format!("10.{}.{}.1:443", i / 256, i % 256))).collect();
    for (id, k) in keys.iter().enumerate() {
        pool.give(k, entry(id as u32, t0)).unwrap();
    }
    assert_eq!((pool.key_count(), pool.idle_total()), (10_000, 10_000));
    for (id, k) in keys.iter().enumerate() {
        assert_eq!(pool.take_at(k, t0).map(|e| e.value), Some(id as u32), "{k}");
    }
    assert_eq!(pool.forget_where(&|_| true), 10_000);
    assert_eq!(pool.key_count(), 0);
    assert!(pool.keys().is_empty());
}

mod stress {
    //! Eight threads hammer one pool with takes, gives, sweeps and drops. Every entry carries
    //! a unique id whose state (held by a thread, idle in the pool, dropped) is tracked in a
    //! shared ledger, so a lost, duplicated or twice-dropped entry shows up, and at the end the
    //! pool's counters must reconcile exactly with what the threads saw.

    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering::SeqCst};
    use std::thread;

    use super::*;

    const THREADS: usize = 8;
    const OPS_PER_THREAD: usize = 20_000;
    /// More ids than can possibly be created: at most one per op.
    const MAX_IDS: usize = THREADS * OPS_PER_THREAD;

    /// Caps small enough to be hit all the time; a one-second idle limit that backdated
    /// entries exceed.
    const SETTINGS: PoolSettings = PoolSettings {
        max_idle_per_key: 16,
        max_idle_total: 64,
        max_idle_time: Duration::from_secs(1),
        max_lifetime: Duration::from_secs(3600),
    };

    const HELD: u8 = 0;
    const IDLE: u8 = 1;
    const DROPPED: u8 = 2;
    const UNUSED: u8 = 3;

    struct Ledger {
        states: Vec<AtomicU8>,
        next_id: AtomicUsize,
        dropped_while_idle: AtomicU64,
        violations: Mutex<Vec<String>>,
    }

    impl Ledger {
        fn new() -> Self {
            Ledger {
                states: (0..MAX_IDS).map(|_| AtomicU8::new(UNUSED)).collect(),
                next_id: AtomicUsize::new(0),
                dropped_while_idle: AtomicU64::new(0),
                violations: Mutex::new(Vec::new()),
            }
        }

        /// Moves `id` from one state to another; anything else is recorded as a violation
        /// (not panicked on: this also runs inside `Drop`).
        fn moved(&self, id: usize, from: u8, to: u8, during: &str) {
            if let Err(actual) = self.states[id].compare_exchange(from, to, SeqCst, SeqCst) {
                self.violation(format!("{during}: entry {id} was in state {actual}, not {from}"));
            }
        }

        fn violation(&self, what: String) {
            self.violations.lock().unwrap().push(what);
        }

        fn count(&self, state: u8) -> usize {
            self.states.iter().filter(|s| s.load(SeqCst) == state).count()
        }
    }

    struct Tracked {
        id: usize,
        ledger: Arc<Ledger>,
    }

    impl Tracked {
        fn new(ledger: &Arc<Ledger>) -> Self {
            let id = ledger.next_id.fetch_add(1, SeqCst);
            ledger.moved(id, UNUSED, HELD, "create");
            Tracked { id, ledger: Arc::clone(ledger) }
        }
    }

    impl Drop for Tracked {
        fn drop(&mut self) {
            // Dropped by a thread that held it, or by the pool when take() found it expired.
            match self.ledger.states[self.id].swap(DROPPED, SeqCst) {
                HELD => {}
                IDLE => {
                    self.ledger.dropped_while_idle.fetch_add(1, SeqCst);
                }
                _ => self.ledger.violation(format!("entry {} dropped twice", self.id)),
            }
        }
    }

    /// What one thread saw.
    #[derive(Default)]
    struct Tally {
        taken: u64,
        accepted: u64,
        swept: u64,
    }

    struct XorShift(u64);

    impl XorShift {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }
    }

    pub(super) fn run(kind: PoolType, key_count: usize) {
        let pool = super::new_pool::<Tracked>(kind, SETTINGS);
        let ledger = Arc::new(Ledger::new());
        let keys: Vec<PoolKey> = (0..key_count).map(|i| key(&format!("10.0.0.{i}:443"))).collect();

        let tallies: Vec<Tally> = thread::scope(|s| {
            let workers: Vec<_> = (0..THREADS)
                .map(|t| {
                    let (pool, ledger, keys) = (&pool, &ledger, &keys);
                    s.spawn(move || worker(&**pool, ledger, keys, t as u64))
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).collect()
        });

        let violations = ledger.violations.lock().unwrap().clone();
        assert!(violations.is_empty(), "{kind}: {violations:#?}");

        let taken: u64 = tallies.iter().map(|t| t.taken).sum();
        let accepted: u64 = tallies.iter().map(|t| t.accepted).sum();
        let swept: u64 = tallies.iter().map(|t| t.swept).sum();
        let stats = pool.counters().snapshot();
        let idle = pool.idle_total();

        assert_eq!(stats.new, ledger.next_id.load(SeqCst) as u64, "{kind}: created");
        assert_eq!(stats.reused, taken, "{kind}: reused");
        assert_eq!(stats.cleaned, swept + ledger.dropped_while_idle.load(SeqCst), "{kind}: cleaned");
        assert_eq!(accepted, taken + stats.cleaned + idle as u64, "{kind}: accepted entries");
        assert_eq!(ledger.count(IDLE), idle, "{kind}: idle");
        assert_eq!(ledger.count(HELD), 0, "{kind}: threads drop what they hold");
        assert_eq!(stats.active, 0, "{kind}: active");
        let by_key: usize = pool.idle_by_key().iter().map(|(_, n)| n).sum();
        assert_eq!(by_key, idle, "{kind}: idle_by_key");
        assert!(taken > 1000 && stats.cleaned > 0, "{kind}: the stress test exercised little");

        let drained = pool.drain();
        assert_eq!(drained.len(), idle, "{kind}: drained");
        for (_, entry) in drained {
            ledger.moved(entry.value.id, IDLE, HELD, "drain");
        }
        assert_eq!(ledger.count(DROPPED), ledger.next_id.load(SeqCst), "{kind}: every entry dropped once");
        assert_eq!((pool.idle_total(), pool.counters().snapshot().idle), (0, 0));
        let violations = ledger.violations.lock().unwrap().clone();
        assert!(violations.is_empty(), "{kind}: {violations:#?}");
    }

    fn worker(pool: &dyn IdlePool<PoolKey, (), Tracked>, ledger: &Arc<Ledger>, keys: &[PoolKey], seed: u64) -> Tally {
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15 ^ (seed + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9));
        let mut tally = Tally::default();
        let mut held: Vec<Idle<Tracked>> = Vec::new();
        let counters = pool.counters();
        for _ in 0..OPS_PER_THREAD {
            let key = &keys[rng.below(keys.len())];
            let now = Instant::now();
            match rng.below(100) {
                0..45 => {
                    if let Some(entry) = pool.take(key) {
                        ledger.moved(entry.value.id, IDLE, HELD, "take");
                        counters.record_reused();
                        counters.record_checkout();
                        tally.taken += 1;
                        held.push(entry);
                    }
                }
                45..90 => {
                    // Usually give back something held, sometimes a newly created entry.
                    let entry = match held.pop() {
                        Some(entry) if rng.below(4) != 0 => entry.returned_at(now),
                        Some(entry) => {
                            held.push(entry);
                            fresh_entry(ledger, now, &mut rng, counters)
                        }
                        None => fresh_entry(ledger, now, &mut rng, counters),
                    };
                    counters.record_checkin();
                    // Marked idle before the give: once given, another thread may take it.
                    ledger.moved(entry.value.id, HELD, IDLE, "give");
                    match pool.give(key, entry) {
                        Ok(()) => tally.accepted += 1,
                        Err(refused) => ledger.moved(refused.value.id, IDLE, HELD, "refused give"),
                    }
                    // The counts include gives in flight, and still never pass the caps.
                    let (on_key, total) = (pool.idle_count(key), pool.idle_total());
                    if on_key > SETTINGS.max_idle_per_key || total > SETTINGS.max_idle_total {
                        ledger.violation(format!("caps exceeded: {on_key} on {key}, {total} in all"));
                    }
                }
                90..93 => {
                    let swept = pool.sweep(now);
                    counters.record_cleaned(swept.len() as u64);
                    for (_, entry) in swept {
                        ledger.moved(entry.value.id, IDLE, HELD, "sweep");
                        tally.swept += 1;
                    }
                }
                93..94 => {
                    // Keys with nothing idle are forgotten; gives racing this recreate them.
                    pool.forget_where(&|_| true);
                }
                _ => {
                    // The caller found a connection dead and closed it.
                    if held.pop().is_some() {
                        counters.record_checkin();
                    }
                }
            }
        }
        for _ in held.drain(..) {
            counters.record_checkin();
        }
        tally
    }

    /// A newly created entry; one in sixteen is backdated so that it is already expired.
    fn fresh_entry(ledger: &Arc<Ledger>, now: Instant, rng: &mut XorShift, counters: &PoolCounters) -> Idle<Tracked> {
        counters.record_new();
        counters.record_checkout();
        let mut entry = Idle { value: Tracked::new(ledger), created: now, idle_since: now };
        if rng.below(16) == 0 {
            entry.idle_since = now.checked_sub(Duration::from_secs(2)).unwrap_or(now);
        }
        entry
    }
}

fn stress_on_one_key(kind: PoolType) {
    stress::run(kind, 1);
}

fn stress_on_64_keys(kind: PoolType) {
    stress::run(kind, 64);
}

mod model {
    //! A property test: random sequences of take, give, sweep and clock advances give the same
    //! results on every engine as on a plain model of the specification.

    use std::collections::BTreeMap;

    use proptest::prelude::*;
    use proptest::sample::Index;

    use super::*;

    const KEYS: [&str; 3] = ["a:1", "b:2", "c:3"];

    fn settings() -> PoolSettings {
        PoolSettings {
            max_idle_per_key: 3,
            max_idle_total: 5,
            max_idle_time: Duration::from_secs(15),
            max_lifetime: Duration::from_secs(40),
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        GiveNew(usize),
        /// Gives back one of the entries taken earlier, to the key it came from.
        GiveBack(Index),
        Take(usize),
        Sweep,
        Forget,
        Advance(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0..KEYS.len()).prop_map(Op::GiveNew),
            2 => any::<Index>().prop_map(Op::GiveBack),
            3 => (0..KEYS.len()).prop_map(Op::Take),
            1 => Just(Op::Sweep),
            1 => Just(Op::Forget),
            2 => (1..20u64).prop_map(Op::Advance),
        ]
    }

    /// The specification, as plainly as it can be written.
    #[derive(Default)]
    struct Model {
        stacks: BTreeMap<PoolKey, Vec<Idle<u32>>>,
        /// Keys the pool holds: created by a give, forgotten once empty.
        keys: std::collections::BTreeSet<PoolKey>,
        reused: u64,
        cleaned: u64,
    }

    impl Model {
        fn total(&self) -> usize {
            self.stacks.values().map(Vec::len).sum()
        }

        fn give(&mut self, key: &PoolKey, entry: Idle<u32>) -> Result<(), Idle<u32>> {
            let s = settings();
            self.keys.insert(key.clone());
            let len = self.stacks.get(key).map_or(0, Vec::len);
            if len >= s.max_idle_per_key || self.total() >= s.max_idle_total {
                return Err(entry);
            }
            self.stacks.entry(key.clone()).or_default().push(entry);
            Ok(())
        }

        fn take(&mut self, key: &PoolKey, now: Instant) -> Option<Idle<u32>> {
            let stack = self.stacks.entry(key.clone()).or_default();
            while let Some(entry) = stack.pop() {
                if entry.is_expired(&settings(), now) {
                    self.cleaned += 1;
                } else {
                    self.reused += 1;
                    return Some(entry);
                }
            }
            None
        }

        fn sweep(&mut self, now: Instant) -> Vec<(PoolKey, Idle<u32>)> {
            let mut expired = Vec::new();
            for (key, stack) in &mut self.stacks {
                let (gone, kept) = stack.drain(..).partition(|e| e.is_expired(&settings(), now));
                *stack = kept;
                expired.extend(gone.into_iter().map(|e: Idle<u32>| (key.clone(), e)));
            }
            self.cleaned += expired.len() as u64;
            expired
        }

        fn forget(&mut self) {
            let stacks = &self.stacks;
            self.keys.retain(|key| stacks.get(key).is_some_and(|stack| !stack.is_empty()));
        }

        fn idle_by_key(&self) -> Vec<(PoolKey, usize)> {
            self.stacks
                .iter()
                .filter(|(_, stack)| !stack.is_empty())
                .map(|(key, stack)| (key.clone(), stack.len()))
                .collect()
        }
    }

    fn sorted(mut entries: Vec<(PoolKey, Idle<u32>)>) -> Vec<(PoolKey, u32, Instant, Instant)> {
        entries.sort_by_key(|(k, e)| (k.clone(), e.value));
        entries.into_iter().map(|(k, e)| (k, e.value, e.created, e.idle_since)).collect()
    }

    proptest! {
        #[test]
        fn engines_behave_like_the_model(ops in proptest::collection::vec(op(), 0..80)) {
            let t0 = Instant::now();
            let keys: Vec<PoolKey> = KEYS.iter().map(|k| key(k)).collect();
            let engines: Vec<_> = [PoolType::Lock, PoolType::LockFree, PoolType::HighPerf]
                .into_iter()
                .map(|kind| (kind, super::new_pool::<u32>(kind, settings())))
                .collect();
            let mut model = Model::default();
            let mut held: Vec<(PoolKey, Idle<u32>)> = Vec::new();
            let (mut now, mut next_id) = (t0, 0);

            for op in ops {
                match op {
                    Op::GiveNew(k) => {
                        next_id += 1;
                        let expected = model.give(&keys[k], entry(next_id, now)).map_err(|e| e.value);
                        for (kind, pool) in &engines {
                            let got = pool.give(&keys[k], entry(next_id, now)).map_err(|e| e.value);
                            prop_assert_eq!(&got, &expected, "{} give", kind);
                        }
                    }
                    Op::GiveBack(i) if !held.is_empty() => {
                        let (k, e) = held.swap_remove(i.index(held.len()));
                        let e = e.returned_at(now);
                        let expected = model.give(&k, e.clone()).map_err(|e| e.value);
                        for (kind, pool) in &engines {
                            let got = pool.give(&k, e.clone()).map_err(|e| e.value);
                            prop_assert_eq!(&got, &expected, "{} give back", kind);
                        }
                    }
                    Op::GiveBack(_) => {}
                    Op::Take(k) => {
                        let expected = model.take(&keys[k], now);
                        for (kind, pool) in &engines {
                            let got = pool.take_at(&keys[k], now);
                            if got.is_some() {
                                pool.counters().record_reused();
                            }
                            prop_assert_eq!(&got, &expected, "{} take", kind);
                        }
                        held.extend(expected.map(|e| (keys[k].clone(), e)));
                    }
                    Op::Sweep => {
                        let expected = sorted(model.sweep(now));
                        for (kind, pool) in &engines {
                            prop_assert_eq!(&sorted(sweep(pool, now)), &expected, "{} sweep", kind);
                        }
                    }
                    Op::Forget => {
                        model.forget();
                        for (_, pool) in &engines {
                            pool.forget_where(&|_| true);
                        }
                    }
                    Op::Advance(s) => now += Duration::from_secs(s),
                }
                for (kind, pool) in &engines {
                    let stats = pool.counters().snapshot();
                    prop_assert_eq!(idle_by_key(pool), model.idle_by_key(), "{} idle_by_key", kind);
                    prop_assert_eq!(pool.key_count(), model.keys.len(), "{} key_count", kind);
                    prop_assert_eq!(pool.idle_total(), model.total(), "{} idle_total", kind);
                    prop_assert_eq!(
                        (stats.reused, stats.cleaned, stats.idle),
                        (model.reused, model.cleaned, model.total() as u64),
                        "{} counters", kind
                    );
                    for k in &keys {
                        let expected = model.stacks.get(k).map_or(0, Vec::len);
                        prop_assert_eq!(pool.idle_count(k), expected, "{} idle_count", kind);
                    }
                }
            }
        }
    }
}
