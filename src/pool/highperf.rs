//! The sharded engine: keys spread over many small mutexes.
//!
//! Choose it for a busy server with many outbound targets: two targets contend only when they
//! hash to the same shard, and each critical section is a few pointer moves. Under a single hot
//! key it behaves like the lock engine (all callers meet on one shard).
//!
//! Each shard is the lock engine's [`IdleMap`] behind its own `std::sync::Mutex`, padded to a
//! cache line so that neighbouring shards do not bounce one line between cores. The only state
//! shared across shards is the global idle count in [`PoolCounters`], a single atomic.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::Instant;

use crossbeam_utils::CachePadded;

use super::lock::IdleMap;
use super::{Idle, IdlePool, PoolCounters, PoolKey, PoolSettings};

pub struct HighPerfPool<T> {
    settings: PoolSettings,
    shards: Box<[CachePadded<Mutex<IdleMap<T>>>]>,
    hasher: RandomState,
    counters: PoolCounters,
}

impl<T> HighPerfPool<T> {
    /// Four shards per core, rounded up to a power of two and at least eight: enough that
    /// threads on different cores rarely pick the same shard, few enough that a sweep (which
    /// visits every shard) stays cheap.
    pub fn new(settings: PoolSettings) -> Self {
        let cores = thread::available_parallelism().map_or(1, |n| n.get());
        let shards = (4 * cores).next_power_of_two().max(8);
        HighPerfPool {
            settings,
            shards: (0..shards).map(|_| CachePadded::new(Mutex::new(IdleMap::new()))).collect(),
            hasher: RandomState::new(),
            counters: PoolCounters::default(),
        }
    }

    fn shard(&self, key: &PoolKey) -> MutexGuard<'_, IdleMap<T>> {
        // The shard count is a power of two, so masking the hash picks a shard uniformly.
        let index = self.hasher.hash_one(key) as usize & (self.shards.len() - 1);
        lock(&self.shards[index])
    }

    fn each_shard(&self) -> impl Iterator<Item = MutexGuard<'_, IdleMap<T>>> {
        // One shard at a time: never two locks held, so no lock order to get wrong.
        self.shards.iter().map(|shard| lock(shard))
    }
}

fn lock<T>(shard: &Mutex<IdleMap<T>>) -> MutexGuard<'_, IdleMap<T>> {
    // As in the lock engine: IdleMap stays consistent across a panic, so poison is ignored.
    shard.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<T: Send> IdlePool<T> for HighPerfPool<T> {
    fn take_at(&self, key: &PoolKey, now: Instant) -> Option<Idle<T>> {
        let (found, expired) = self.shard(key).take_at(key, now, &self.settings, &self.counters);
        // Closed outside the shard lock.
        drop(expired);
        found
    }

    fn give(&self, key: &PoolKey, entry: Idle<T>) -> Result<(), Idle<T>> {
        self.shard(key).give(key, entry, &self.settings, &self.counters)
    }

    fn sweep(&self, now: Instant) -> Vec<(PoolKey, Idle<T>)> {
        let mut expired = Vec::new();
        for mut shard in self.each_shard() {
            shard.sweep_into(now, &self.settings, &self.counters, &mut expired);
        }
        expired
    }

    fn drain(&self) -> Vec<(PoolKey, Idle<T>)> {
        let mut all = Vec::new();
        for mut shard in self.each_shard() {
            shard.drain_into(&self.counters, &mut all);
        }
        all
    }

    fn idle_count(&self, key: &PoolKey) -> usize {
        self.shard(key).len_of(key)
    }

    fn idle_total(&self) -> usize {
        self.counters.idle_total()
    }

    fn idle_by_key(&self) -> Vec<(PoolKey, usize)> {
        let mut lens = Vec::new();
        for shard in self.each_shard() {
            shard.lens_into(&mut lens);
        }
        lens.sort_unstable();
        lens
    }

    fn counters(&self) -> &PoolCounters {
        &self.counters
    }
}
