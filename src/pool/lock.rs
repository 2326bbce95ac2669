//! The baseline engine: every key behind one mutex.
//!
//! Choose it when pool traffic is modest or when chasing a bug: there is nothing clever in it
//! to go wrong, and the other engines are tested against the same suite. Its cost is that every
//! take and give, for any target, queues on the same lock.
//!
//! [`IdleMap`] is the single-threaded store underneath; the high-performance engine keeps one
//! per shard, so the two engines share every line of pool logic and differ only in locking.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use super::{Idle, IdlePool, PoolCounters, PoolKey, PoolSettings};

pub struct LockPool<T> {
    settings: PoolSettings,
    map: Mutex<IdleMap<T>>,
    counters: PoolCounters,
}

impl<T> LockPool<T> {
    pub fn new(settings: PoolSettings) -> Self {
        LockPool { settings, map: Mutex::new(IdleMap::new()), counters: PoolCounters::default() }
    }

    fn map(&self) -> MutexGuard<'_, IdleMap<T>> {
        // Every IdleMap method leaves the map consistent before it can panic, so a poisoned
        // lock still guards a usable map; refusing it would only turn one panic into many.
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<T: Send> IdlePool<T> for LockPool<T> {
    fn take_at(&self, key: &PoolKey, now: Instant) -> Option<Idle<T>> {
        let (found, expired) = self.map().take_at(key, now, &self.settings, &self.counters);
        // The lock is released by now: closing sockets is a syscall best kept out of it.
        drop(expired);
        found
    }

    fn give(&self, key: &PoolKey, entry: Idle<T>) -> Result<(), Idle<T>> {
        self.map().give(key, entry, &self.settings, &self.counters)
    }

    fn sweep(&self, now: Instant) -> Vec<(PoolKey, Idle<T>)> {
        let mut expired = Vec::new();
        self.map().sweep_into(now, &self.settings, &self.counters, &mut expired);
        expired
    }

    fn drain(&self) -> Vec<(PoolKey, Idle<T>)> {
        let mut all = Vec::new();
        self.map().drain_into(&self.counters, &mut all);
        all
    }

    fn idle_count(&self, key: &PoolKey) -> usize {
        self.map().len_of(key)
    }

    fn idle_total(&self) -> usize {
        self.counters.idle_total()
    }

    fn idle_by_key(&self) -> Vec<(PoolKey, usize)> {
        let mut lens = Vec::new();
        self.map().lens_into(&mut lens);
        lens.sort_unstable();
        lens
    }

    fn counters(&self) -> &PoolCounters {
        &self.counters
    }
}

/// Idle stacks by key, for use under a lock. Newest entries sit at the back.
///
/// Keys whose stack empties are removed, so the map holds only targets with idle entries.
/// The global idle count lives in [`PoolCounters`] so that it can be shared between shards.
pub(super) struct IdleMap<T> {
    stacks: HashMap<PoolKey, VecDeque<Idle<T>>>,
}

impl<T> IdleMap<T> {
    pub(super) fn new() -> Self {
        IdleMap { stacks: HashMap::new() }
    }

    /// Pops the newest unexpired entry for `key`. Expired entries found above it are removed
    /// and returned, so the caller can drop them after releasing its lock.
    pub(super) fn take_at(
        &mut self,
        key: &PoolKey,
        now: Instant,
        settings: &PoolSettings,
        counters: &PoolCounters,
    ) -> (Option<Idle<T>>, Vec<Idle<T>>) {
        let Some(stack) = self.stacks.get_mut(key) else {
            return (None, Vec::new());
        };
        let mut expired = Vec::new();
        let mut found = None;
        while let Some(entry) = stack.pop_back() {
            if entry.is_expired(settings, now) {
                expired.push(entry);
            } else {
                found = Some(entry);
                break;
            }
        }
        if stack.is_empty() {
            self.stacks.remove(key);
        }
        counters.release_idle(expired.len() + usize::from(found.is_some()));
        counters.record_cleaned(expired.len() as u64);
        if found.is_some() {
            counters.record_reused();
        }
        (found, expired)
    }

    pub(super) fn give(
        &mut self,
        key: &PoolKey,
        entry: Idle<T>,
        settings: &PoolSettings,
        counters: &PoolCounters,
    ) -> Result<(), Idle<T>> {
        // Per-key cap first: it needs no shared state, so a full key never touches the global
        // counter that every other key is also updating.
        if self.len_of(key) >= settings.max_idle_per_key || !counters.try_reserve_idle(settings.max_idle_total) {
            return Err(entry);
        }
        self.stacks.entry(key.clone()).or_default().push_back(entry);
        Ok(())
    }

    /// Moves every entry expired as of `now` into `out`, keeping the rest in order.
    pub(super) fn sweep_into(
        &mut self,
        now: Instant,
        settings: &PoolSettings,
        counters: &PoolCounters,
        out: &mut Vec<(PoolKey, Idle<T>)>,
    ) {
        let before = out.len();
        for (key, stack) in &mut self.stacks {
            if !stack.iter().any(|e| e.is_expired(settings, now)) {
                continue;
            }
            let mut kept = VecDeque::with_capacity(stack.len());
            for entry in stack.drain(..) {
                if entry.is_expired(settings, now) {
                    out.push((key.clone(), entry));
                } else {
                    kept.push_back(entry);
                }
            }
            *stack = kept;
        }
        self.stacks.retain(|_, stack| !stack.is_empty());
        let removed = out.len() - before;
        counters.release_idle(removed);
        counters.record_cleaned(removed as u64);
    }

    pub(super) fn drain_into(&mut self, counters: &PoolCounters, out: &mut Vec<(PoolKey, Idle<T>)>) {
        let before = out.len();
        for (key, stack) in self.stacks.drain() {
            out.extend(stack.into_iter().map(|entry| (key.clone(), entry)));
        }
        counters.release_idle(out.len() - before);
    }

    pub(super) fn len_of(&self, key: &PoolKey) -> usize {
        self.stacks.get(key).map_or(0, VecDeque::len)
    }

    pub(super) fn lens_into(&self, out: &mut Vec<(PoolKey, usize)>) {
        out.extend(self.stacks.iter().map(|(key, stack)| (key.clone(), stack.len())));
    }
}
