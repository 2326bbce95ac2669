//! The sharded engine: keys spread over many small mutexes, and per key a lock-free hot
//! slot in front of a locked stack (after cloudflare's pingora-pool).
//!
//! Choose it for a busy server with many outbound targets: two targets contend only when they
//! hash to the same shard, and the shard lock is held only to find a key's slot. The idle
//! entries live in the slot itself: the newest one in `hot`, taken and given with a single
//! atomic swap; older ones in `cold`, a small per-key mutex touched only when the hot slot is
//! empty on a take or occupied on a give.
//!
//! # Why it is correct
//!
//! - **Order.** A give swaps its entry into `hot` and pushes whatever it displaced onto the
//!   back of `cold`; a take swaps `hot` out, else pops the back of `cold`. One at a time, that
//!   is exactly a stack. Under concurrency a displaced entry is in the giver's hands for a
//!   moment (a take may miss it, which costs a fresh connection), and a sweep that runs in
//!   that moment may leave it above a newer one: order is then approximate, never lossy.
//! - **Ownership.** `hot` holds a `Box` turned into a raw pointer; whoever swaps a non-null
//!   pointer out owns it alone, so each entry is moved out exactly once and no reclamation
//!   scheme is needed. Whatever is left in `hot` is freed when the slot is dropped.
//! - **Caps and forgetting** work as in the lock-free engine: `len` counts reserved places,
//!   a give reserves before it stores, and forgetting swaps `len` from 0 to `RETIRED` (under
//!   the shard lock, which also removes the slot), so a give holding a stale slot sees
//!   `RETIRED` and starts over with a fresh one.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::ptr;
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::Instant;

use crossbeam_utils::CachePadded;

use super::{Idle, IdlePool, Key, KeyHasher, KeyState, PoolCounters, PoolSettings, reserve_slot};

/// `len` of a forgotten slot: above any cap, so no give can reserve a place on it.
const RETIRED: u64 = u64::MAX;

/// One shard: the slots of the keys that hash to it, by their (seeded) hash, so a
/// key is hashed once per operation: for the shard and for the map. Keys whose hashes
/// collide share an entry and are told apart by comparison.
type Shard<K, S, T> = CachePadded<Mutex<ShardMap<K, S, T>>>;
type ShardMap<K, S, T> = HashMap<u64, Vec<(K, Arc<Slot<S, T>>)>, BuildHasherDefault<PreHashed>>;

/// Hashes a `u64` that already is a hash to itself.
#[derive(Default)]
struct PreHashed(u64);

impl Hasher for PreHashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64`s are hashed here; fold anything else in rather than fail.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

pub struct HighPerfPool<K, S, T> {
    settings: PoolSettings,
    shards: Box<[Shard<K, S, T>]>,
    hasher: KeyHasher,
    counters: PoolCounters,
}

struct Slot<S, T> {
    state: Arc<S>,
    /// Reserved places: entries in `hot` and `cold` plus gives in flight; or `RETIRED`.
    len: CachePadded<AtomicU64>,
    /// The newest idle entry, or null.
    hot: CachePadded<AtomicPtr<Idle<T>>>,
    /// Older idle entries, newest at the back.
    cold: Mutex<Vec<Idle<T>>>,
}

impl<S: Default, T> Slot<S, T> {
    fn new() -> Self {
        Slot {
            state: Arc::default(),
            len: CachePadded::new(AtomicU64::new(0)),
            hot: CachePadded::new(AtomicPtr::new(ptr::null_mut())),
            cold: Mutex::new(Vec::new()),
        }
    }
}

impl<S, T> Slot<S, T> {
    fn len(&self) -> usize {
        match self.len.load(Ordering::Relaxed) {
            RETIRED => 0,
            n => n as usize,
        }
    }

    fn cold(&self) -> MutexGuard<'_, Vec<Idle<T>>> {
        // Pushes and pops leave the vector whole; poison carries no meaning here.
        self.cold.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The hot entry, if any, now owned by the caller.
    fn take_hot(&self) -> Option<Idle<T>> {
        let hot = self.hot.swap(ptr::null_mut(), Ordering::AcqRel);
        // SAFETY: a non-null `hot` came from `Box::into_raw` in `give`, and the swap gave
        // this thread the only copy of the pointer.
        (!hot.is_null()).then(|| *unsafe { Box::from_raw(hot) })
    }

    fn take_at(&self, now: Instant, settings: &PoolSettings, counters: &PoolCounters) -> Option<Idle<T>> {
        loop {
            let entry = self.take_hot().or_else(|| self.cold().pop())?;
            self.len.fetch_sub(1, Ordering::Relaxed);
            counters.release_idle(1);
            if entry.is_expired(settings, now) {
                counters.record_cleaned(1);
                continue; // dropping it closes it
            }
            return Some(entry);
        }
    }

    /// `Err(Ok(entry))`: full; `Err(Err(entry))`: retired.
    #[allow(clippy::type_complexity)]
    fn give(
        &self,
        entry: Idle<T>,
        settings: &PoolSettings,
        counters: &PoolCounters,
    ) -> Result<(), Result<Idle<T>, Idle<T>>> {
        if !reserve_slot(&self.len, settings.max_idle_per_key as u64) {
            let retired = self.len.load(Ordering::Relaxed) == RETIRED;
            return Err(if retired { Err(entry) } else { Ok(entry) });
        }
        if !counters.try_reserve_idle(settings.max_idle_total) {
            self.len.fetch_sub(1, Ordering::Relaxed);
            return Err(Ok(entry));
        }
        let displaced = self.hot.swap(Box::into_raw(Box::new(entry)), Ordering::AcqRel);
        if !displaced.is_null() {
            // SAFETY: as in `take_hot`: the swap handed this thread the only copy.
            self.cold().push(*unsafe { Box::from_raw(displaced) });
        }
        Ok(())
    }

    /// Every entry, oldest first, out of the slot (places still reserved).
    fn take_all(&self, cold: &mut Vec<Idle<T>>) -> Vec<Idle<T>> {
        let mut all = std::mem::take(cold);
        all.extend(self.take_hot());
        all
    }
}

impl<S, T> Drop for Slot<S, T> {
    fn drop(&mut self) {
        drop(self.take_hot());
    }
}

impl<K: Key, S: KeyState, T> HighPerfPool<K, S, T> {
    /// Four shards per core, rounded up to a power of two and at least eight: enough that
    /// threads on different cores rarely pick the same shard, few enough that a sweep (which
    /// visits every shard) stays cheap.
    pub fn new(settings: PoolSettings) -> Self {
        let cores = thread::available_parallelism().map_or(1, |n| n.get());
        let shards = (4 * cores).next_power_of_two().max(8);
        HighPerfPool {
            settings,
            shards: (0..shards).map(|_| CachePadded::new(Mutex::new(HashMap::default()))).collect(),
            hasher: KeyHasher::default(),
            counters: PoolCounters::default(),
        }
    }

    /// The key's hash and its shard, locked.
    fn shard(&self, key: &K) -> (u64, MutexGuard<'_, ShardMap<K, S, T>>) {
        let hash = self.hasher.hash_one(key);
        // The shard count is a power of two. High bits pick the shard: the map's buckets
        // use the low ones.
        let index = (hash >> 32) as usize & (self.shards.len() - 1);
        (hash, lock(&self.shards[index]))
    }

    /// The key's slot, if it has one.
    fn find(&self, key: &K) -> Option<Arc<Slot<S, T>>> {
        let (hash, shard) = self.shard(key);
        shard.get(&hash)?.iter().find(|(k, _)| k == key).map(|(_, slot)| slot.clone())
    }

    /// The key's slot, created if new. The shard lock is held only for the lookup.
    fn slot(&self, key: &K) -> Arc<Slot<S, T>> {
        let (hash, mut shard) = self.shard(key);
        let same_hash = shard.entry(hash).or_default();
        if let Some((_, slot)) = same_hash.iter().find(|(k, _)| k == key) {
            return slot.clone();
        }
        let slot = Arc::new(Slot::new());
        same_hash.push((key.clone(), slot.clone()));
        slot
    }

    fn each_slot(&self) -> Vec<(K, Arc<Slot<S, T>>)> {
        // One shard at a time: never two locks held, so no lock order to get wrong.
        let mut all = Vec::new();
        for shard in self.shards.iter() {
            all.extend(lock(shard).values().flatten().map(|(key, slot)| (key.clone(), slot.clone())));
        }
        all
    }
}

fn lock<M>(shard: &Mutex<M>) -> MutexGuard<'_, M> {
    // Shard maps are only inserted into and retained over; poison carries no meaning.
    shard.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<K: Key, S: KeyState, T: Send> IdlePool<K, S, T> for HighPerfPool<K, S, T> {
    fn checkout(&self, key: &K, now: Instant) -> (Arc<S>, Option<Idle<T>>) {
        let slot = self.slot(key);
        (slot.state.clone(), slot.take_at(now, &self.settings, &self.counters))
    }

    fn state(&self, key: &K) -> Arc<S> {
        self.slot(key).state.clone()
    }

    fn take_at(&self, key: &K, now: Instant) -> Option<Idle<T>> {
        self.find(key)?.take_at(now, &self.settings, &self.counters)
    }

    fn give(&self, key: &K, entry: Idle<T>) -> Result<(), Idle<T>> {
        let mut entry = entry;
        loop {
            match self.slot(key).give(entry, &self.settings, &self.counters) {
                Ok(()) => return Ok(()),
                Err(Ok(full)) => return Err(full),
                Err(Err(retired)) => entry = retired, // forgotten meanwhile: start over
            }
        }
    }

    fn sweep(&self, now: Instant) -> Vec<(K, Idle<T>)> {
        let mut expired = Vec::new();
        for (key, slot) in self.each_slot() {
            if slot.len() == 0 {
                continue;
            }
            let mut cold = slot.cold();
            let mut removed = 0;
            let all = slot.take_all(&mut cold);
            for entry in all {
                if entry.is_expired(&self.settings, now) {
                    expired.push((key.clone(), entry));
                    removed += 1;
                } else {
                    cold.push(entry);
                }
            }
            slot.len.fetch_sub(removed as u64, Ordering::Relaxed);
            self.counters.release_idle(removed);
        }
        expired
    }

    fn drain(&self) -> Vec<(K, Idle<T>)> {
        let mut all = Vec::new();
        for (key, slot) in self.each_slot() {
            let entries = slot.take_all(&mut slot.cold());
            slot.len.fetch_sub(entries.len() as u64, Ordering::Relaxed);
            self.counters.release_idle(entries.len());
            all.extend(entries.into_iter().map(|entry| (key.clone(), entry)));
        }
        all
    }

    fn forget_where(&self, quiet: &dyn Fn(&S) -> bool) -> usize {
        let mut forgotten = 0;
        for shard in self.shards.iter() {
            lock(shard).retain(|_, same_hash| {
                same_hash.retain(|(_, slot)| {
                    let forget = quiet(&slot.state)
                        && slot.len.compare_exchange(0, RETIRED, Ordering::Relaxed, Ordering::Relaxed).is_ok();
                    forgotten += usize::from(forget);
                    !forget
                });
                !same_hash.is_empty()
            });
        }
        forgotten
    }

    fn idle_count(&self, key: &K) -> usize {
        self.find(key).map_or(0, |slot| slot.len())
    }

    fn idle_total(&self) -> usize {
        self.counters.idle_total()
    }

    fn key_count(&self) -> usize {
        self.shards.iter().map(|shard| lock(shard).values().map(Vec::len).sum::<usize>()).sum()
    }

    fn keys(&self) -> Vec<(K, Arc<S>, usize)> {
        self.each_slot().into_iter().map(|(key, slot)| (key, slot.state.clone(), slot.len())).collect()
    }

    fn counters(&self) -> &PoolCounters {
        &self.counters
    }
}
