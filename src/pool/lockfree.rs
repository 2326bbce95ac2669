//! The lock-free engine (the default): a copy-on-write key map and a Treiber stack per key.
//!
//! Choose it when many threads take and give on the same few keys (a client with one server,
//! a server with one hot upstream): no caller ever waits for another to leave a critical
//! section, so a descheduled thread cannot stall the rest. The price is an allocation per
//! `give` and subtler code; the shared test suite and the stress test are what keep it honest.
//!
//! # Why it is correct
//!
//! - **Key map.** Readers load an `ArcSwap` snapshot of `HashMap<PoolKey, Arc<KeyStack>>`. A
//!   new key is added with `rcu` (clone, insert, compare-and-swap, retry on conflict), so a
//!   key, once present, stays in every later snapshot and all callers agree on its stack.
//!   Keys are never removed: removing one would race with a `give` still holding the old
//!   stack, losing its entry. The map is therefore bounded by the number of distinct keys ever
//!   seen, which for a proxy is its set of targets; empty stacks cost a few words each.
//! - **Stack.** Push and pop are single compare-and-swaps on `head`. A popped node is freed
//!   through crossbeam-epoch only once no pinned thread can still see it, which also rules out
//!   ABA: while a popper holds a pointer to the head node, that node cannot be freed and
//!   reused, so a successful compare-and-swap really did unlink the node it read.
//! - **Values move out exactly once.** The value sits in `ManuallyDrop`; only the thread whose
//!   compare-and-swap unlinked the node reads it out (`ptr::read`), and the node's deferred
//!   destruction never drops it. Values still linked when the stack is dropped are dropped
//!   there.
//! - **Caps.** A `give` first reserves a slot on the key's count and on the global count
//!   (compare-exchange loops that never exceed the cap), pushes only if both succeed, and
//!   releases what it reserved if not. A `take` releases its slots after the pop. So each
//!   count is always at least the number of entries really stored, and never above its cap.
//!   (`idle_count` and `idle_total` read these counts, so they may include a give about to
//!   land.)
//! - **Sweep.** Pops a key's whole stack, keeps the live entries and pushes them back oldest
//!   first, so their order survives. Their slots stay reserved throughout, so a concurrent
//!   `give` cannot take their place and make the push-back fail. Meanwhile a concurrent
//!   `take` may miss (the entries are briefly in the sweeper's hands) and a concurrent `give`
//!   may end up below the pushed-back entries: both only cost a fresh connection, never a
//!   lost or duplicated one.

use std::collections::HashMap;
use std::mem::ManuallyDrop;
use std::ptr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use arc_swap::ArcSwap;
use crossbeam_epoch::{self as epoch, Atomic, Owned};
use crossbeam_utils::CachePadded;

use super::{Idle, IdlePool, PoolCounters, PoolKey, PoolSettings, reserve_slot};

pub struct LockFreePool<T> {
    settings: PoolSettings,
    keys: ArcSwap<HashMap<PoolKey, Arc<KeyStack<T>>>>,
    counters: PoolCounters,
}

impl<T> LockFreePool<T> {
    pub fn new(settings: PoolSettings) -> Self {
        LockFreePool { settings, keys: ArcSwap::from_pointee(HashMap::new()), counters: PoolCounters::default() }
    }

    /// The stack for a key not seen before. New keys are rare (one per target), so copying
    /// the map here keeps every other lookup a plain read.
    fn add_key(&self, key: &PoolKey) -> Arc<KeyStack<T>> {
        self.keys.rcu(|keys| {
            if keys.contains_key(key) {
                // Another thread added it meanwhile: keep its stack.
                Arc::clone(keys)
            } else {
                let mut keys = HashMap::clone(keys);
                keys.insert(key.clone(), Arc::new(KeyStack::new()));
                Arc::new(keys)
            }
        });
        Arc::clone(&self.keys.load()[key])
    }
}

impl<T: Send> IdlePool<T> for LockFreePool<T> {
    fn take_at(&self, key: &PoolKey, now: Instant) -> Option<Idle<T>> {
        let keys = self.keys.load();
        keys.get(key)?.take_at(now, &self.settings, &self.counters)
    }

    fn give(&self, key: &PoolKey, entry: Idle<T>) -> Result<(), Idle<T>> {
        let keys = self.keys.load();
        match keys.get(key) {
            Some(stack) => stack.give(entry, &self.settings, &self.counters),
            None => {
                drop(keys);
                self.add_key(key).give(entry, &self.settings, &self.counters)
            }
        }
    }

    fn sweep(&self, now: Instant) -> Vec<(PoolKey, Idle<T>)> {
        let mut expired = Vec::new();
        for (key, stack) in self.keys.load().iter() {
            stack.sweep_into(key, now, &self.settings, &self.counters, &mut expired);
        }
        expired
    }

    fn drain(&self) -> Vec<(PoolKey, Idle<T>)> {
        let mut all = Vec::new();
        for (key, stack) in self.keys.load().iter() {
            stack.drain_into(key, &self.counters, &mut all);
        }
        all
    }

    fn idle_count(&self, key: &PoolKey) -> usize {
        self.keys.load().get(key).map_or(0, |stack| stack.len())
    }

    fn idle_total(&self) -> usize {
        self.counters.idle_total()
    }

    fn idle_by_key(&self) -> Vec<(PoolKey, usize)> {
        let mut lens: Vec<_> = self
            .keys
            .load()
            .iter()
            .map(|(key, stack)| (key.clone(), stack.len()))
            .filter(|&(_, len)| len > 0)
            .collect();
        lens.sort_unstable();
        lens
    }

    fn counters(&self) -> &PoolCounters {
        &self.counters
    }
}

/// One key's idle entries and the count its cap is enforced on.
struct KeyStack<T> {
    stack: TreiberStack<Idle<T>>,
    /// Reserved slots: entries on the stack plus gives about to push. Padded because it is
    /// the hottest word of a hot key, next to `stack.head`.
    len: CachePadded<AtomicU64>,
}

impl<T> KeyStack<T> {
    fn new() -> Self {
        KeyStack { stack: TreiberStack::new(), len: CachePadded::new(AtomicU64::new(0)) }
    }

    fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed) as usize
    }

    fn release(&self, n: usize, counters: &PoolCounters) {
        self.len.fetch_sub(n as u64, Ordering::Relaxed);
        counters.release_idle(n);
    }

    fn take_at(&self, now: Instant, settings: &PoolSettings, counters: &PoolCounters) -> Option<Idle<T>> {
        while let Some(entry) = self.stack.pop() {
            self.release(1, counters);
            if entry.is_expired(settings, now) {
                counters.record_cleaned(1);
                continue; // dropping it closes it
            }
            counters.record_reused();
            return Some(entry);
        }
        None
    }

    fn give(&self, entry: Idle<T>, settings: &PoolSettings, counters: &PoolCounters) -> Result<(), Idle<T>> {
        if !reserve_slot(&self.len, settings.max_idle_per_key as u64) {
            return Err(entry);
        }
        if !counters.try_reserve_idle(settings.max_idle_total) {
            self.len.fetch_sub(1, Ordering::Relaxed);
            return Err(entry);
        }
        self.stack.push(entry);
        Ok(())
    }

    fn sweep_into(
        &self,
        key: &PoolKey,
        now: Instant,
        settings: &PoolSettings,
        counters: &PoolCounters,
        out: &mut Vec<(PoolKey, Idle<T>)>,
    ) {
        if self.len() == 0 {
            return;
        }
        let mut newest_first = Vec::new();
        while let Some(entry) = self.stack.pop() {
            newest_first.push(entry);
        }
        let mut removed = 0;
        for entry in newest_first.into_iter().rev() {
            if entry.is_expired(settings, now) {
                out.push((key.clone(), entry));
                removed += 1;
            } else {
                self.stack.push(entry);
            }
        }
        self.release(removed, counters);
        counters.record_cleaned(removed as u64);
    }

    fn drain_into(&self, key: &PoolKey, counters: &PoolCounters, out: &mut Vec<(PoolKey, Idle<T>)>) {
        while let Some(entry) = self.stack.pop() {
            self.release(1, counters);
            out.push((key.clone(), entry));
        }
    }
}

/// A Treiber stack: a linked list whose head is swapped with compare-and-swap.
struct TreiberStack<T> {
    head: Atomic<Node<T>>,
}

struct Node<T> {
    /// Moved out by the popper; never dropped with the node (see the module docs).
    value: ManuallyDrop<T>,
    next: Atomic<Node<T>>,
}

// SAFETY: values only ever move through the stack whole: written by the pusher before the
// node is published, read out by the one popper that unlinked it. No `&T` is shared between
// threads, so, as for `Mutex<T>`, `T: Send` is enough. (crossbeam's `Atomic` asks for
// `Send + Sync` because in general it hands out shared references.)
unsafe impl<T: Send> Send for TreiberStack<T> {}
unsafe impl<T: Send> Sync for TreiberStack<T> {}

impl<T> TreiberStack<T> {
    fn new() -> Self {
        TreiberStack { head: Atomic::null() }
    }

    fn push(&self, value: T) {
        let mut node = Owned::new(Node { value: ManuallyDrop::new(value), next: Atomic::null() });
        let guard = epoch::pin();
        loop {
            let head = self.head.load(Ordering::Relaxed, &guard);
            node.next.store(head, Ordering::Relaxed);
            // Release publishes the node's contents to the popper that acquires it.
            match self.head.compare_exchange(head, node, Ordering::Release, Ordering::Relaxed, &guard) {
                Ok(_) => return,
                Err(lost) => node = lost.new,
            }
        }
    }

    fn pop(&self) -> Option<T> {
        let guard = epoch::pin();
        loop {
            let head = self.head.load(Ordering::Acquire, &guard);
            // SAFETY: we are pinned, so a node reachable from `head` is not freed under us.
            let node = unsafe { head.as_ref() }?;
            let next = node.next.load(Ordering::Relaxed, &guard);
            if self.head.compare_exchange(head, next, Ordering::AcqRel, Ordering::Acquire, &guard).is_ok() {
                // SAFETY: our compare-and-swap unlinked `node`, so no other thread will read
                // its value: this is the one move out of it. Its memory is freed only when no
                // pinned thread can still see it, and freeing it does not drop the value.
                unsafe {
                    guard.defer_destroy(head);
                    return Some(ManuallyDrop::into_inner(ptr::read(&node.value)));
                }
            }
        }
    }
}

impl<T> Drop for TreiberStack<T> {
    fn drop(&mut self) {
        // SAFETY: `&mut self` means no other thread can reach these nodes; those popped
        // earlier are already unlinked and owned by the epoch collector.
        unsafe {
            let guard = epoch::unprotected();
            let mut head = self.head.load(Ordering::Relaxed, guard);
            while !head.is_null() {
                let mut node = head.into_owned();
                head = node.next.load(Ordering::Relaxed, guard);
                ManuallyDrop::drop(&mut node.value);
            }
        }
    }
}
