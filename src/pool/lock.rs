//! The baseline engine: every key behind one mutex.
//!
//! Choose it when pool traffic is modest or when chasing a bug: there is nothing clever in it
//! to go wrong, and the other engines are tested against the same suite. Its cost is that every
//! lookup, take and give, for any target, queues on the same lock.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use super::{Idle, IdlePool, Key, KeyHasher, KeyState, PoolCounters, PoolSettings};

pub struct LockPool<K, S, T> {
    settings: PoolSettings,
    slots: Mutex<HashMap<K, Slot<S, T>, KeyHasher>>,
    counters: PoolCounters,
}

/// One key: the caller's state and the idle entries, newest at the back.
struct Slot<S, T> {
    state: Arc<S>,
    idle: VecDeque<Idle<T>>,
}

impl<S: Default, T> Slot<S, T> {
    fn new() -> Self {
        Slot { state: Arc::default(), idle: VecDeque::new() }
    }
}

impl<K: Key, S: KeyState, T> LockPool<K, S, T> {
    pub fn new(settings: PoolSettings) -> Self {
        LockPool { settings, slots: Mutex::new(HashMap::default()), counters: PoolCounters::default() }
    }

    fn slots(&self) -> MutexGuard<'_, HashMap<K, Slot<S, T>, KeyHasher>> {
        // Every method leaves the map consistent before it can panic, so a poisoned lock
        // still guards a usable map; refusing it would only turn one panic into many.
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Pops the newest unexpired entry; expired ones above it go to `expired`, to be
    /// dropped once the lock is released (closing sockets is a syscall best kept out of it).
    fn pop_live(&self, slot: &mut Slot<S, T>, now: Instant, expired: &mut Vec<Idle<T>>) -> Option<Idle<T>> {
        let mut found = None;
        while let Some(entry) = slot.idle.pop_back() {
            if entry.is_expired(&self.settings, now) {
                expired.push(entry);
            } else {
                found = Some(entry);
                break;
            }
        }
        self.counters.release_idle(expired.len() + usize::from(found.is_some()));
        self.counters.record_cleaned(expired.len() as u64);
        found
    }
}

impl<K: Key, S: KeyState, T: Send> IdlePool<K, S, T> for LockPool<K, S, T> {
    fn checkout(&self, key: &K, now: Instant) -> (Arc<S>, Option<Idle<T>>) {
        let mut expired = Vec::new();
        let mut slots = self.slots();
        // Look up by reference first: the key is cloned only when it is new.
        let slot = match slots.get_mut(key) {
            Some(slot) => slot,
            None => slots.entry(key.clone()).or_insert_with(Slot::new),
        };
        let found = self.pop_live(slot, now, &mut expired);
        let state = slot.state.clone();
        drop(slots);
        drop(expired);
        (state, found)
    }

    fn state(&self, key: &K) -> Arc<S> {
        let mut slots = self.slots();
        match slots.get(key) {
            Some(slot) => slot.state.clone(),
            None => slots.entry(key.clone()).or_insert_with(Slot::new).state.clone(),
        }
    }

    fn take_at(&self, key: &K, now: Instant) -> Option<Idle<T>> {
        let mut expired = Vec::new();
        let found = self.slots().get_mut(key).and_then(|slot| self.pop_live(slot, now, &mut expired));
        drop(expired);
        found
    }

    fn give(&self, key: &K, entry: Idle<T>) -> Result<(), Idle<T>> {
        let mut slots = self.slots();
        let slot = match slots.get_mut(key) {
            Some(slot) => slot,
            None => slots.entry(key.clone()).or_insert_with(Slot::new),
        };
        // Per-key cap first: it needs no shared state.
        if slot.idle.len() >= self.settings.max_idle_per_key
            || !self.counters.try_reserve_idle(self.settings.max_idle_total)
        {
            return Err(entry);
        }
        slot.idle.push_back(entry);
        Ok(())
    }

    fn sweep(&self, now: Instant) -> Vec<(K, Idle<T>)> {
        let mut expired = Vec::new();
        for (key, slot) in self.slots().iter_mut() {
            if !slot.idle.iter().any(|e| e.is_expired(&self.settings, now)) {
                continue;
            }
            let mut kept = VecDeque::with_capacity(slot.idle.len());
            for entry in slot.idle.drain(..) {
                if entry.is_expired(&self.settings, now) {
                    expired.push((key.clone(), entry));
                } else {
                    kept.push_back(entry);
                }
            }
            slot.idle = kept;
        }
        self.counters.release_idle(expired.len());
        expired
    }

    fn drain(&self) -> Vec<(K, Idle<T>)> {
        let mut all = Vec::new();
        for (key, slot) in self.slots().iter_mut() {
            all.extend(slot.idle.drain(..).map(|entry| (key.clone(), entry)));
        }
        self.counters.release_idle(all.len());
        all
    }

    fn forget_where(&self, quiet: &dyn Fn(&S) -> bool) -> usize {
        let mut slots = self.slots();
        let before = slots.len();
        slots.retain(|_, slot| !(slot.idle.is_empty() && quiet(&slot.state)));
        before - slots.len()
    }

    fn idle_count(&self, key: &K) -> usize {
        self.slots().get(key).map_or(0, |slot| slot.idle.len())
    }

    fn idle_total(&self) -> usize {
        self.counters.idle_total()
    }

    fn key_count(&self) -> usize {
        self.slots().len()
    }

    fn keys(&self) -> Vec<(K, Arc<S>, usize)> {
        self.slots().iter().map(|(key, slot)| (key.clone(), slot.state.clone(), slot.idle.len())).collect()
    }

    fn counters(&self) -> &PoolCounters {
        &self.counters
    }
}
