//! The lock-free engine (the default): lookups, takes and gives never wait for a lock.
//!
//! Choose it when many threads take and give on the same few keys (a client with one server,
//! a server with one hot upstream): no caller ever waits for another to leave a critical
//! section, so a descheduled thread cannot stall the rest. The price is an allocation per
//! `give` and subtler code; the shared test suite and the stress test are what keep it honest.
//!
//! # Why it is correct
//!
//! - **Key table.** An `ArcSwap<Table>` of buckets; each bucket is a crossbeam-epoch
//!   pointer to a small vector of slots, replaced whole (copy-on-write) when it changes, the
//!   old vector freed once no pinned reader can still see it. A reader loads the table, pins,
//!   loads the bucket and scans a couple of slots: no lock, no write to shared memory.
//!   Changes to the key set (insert, forget, grow) are serialised by one `writer` mutex
//!   that readers never touch, and always re-read the *current* table under it. A new key
//!   copies one bucket (about two slots); when the keys outnumber twice the buckets, the
//!   table grows fourfold, copying each slot pointer (with its stored hash) once — so
//!   inserting n keys costs O(n) in all: amortised O(1) per key, never a whole-map copy
//!   per key.
//! - **Stale tables are harmless.** A reader holding an older table either finds the same
//!   slot (slots are shared between tables, not copied) or misses and takes the writer path,
//!   which looks again in the current table.
//! - **Forgetting a key.** A slot's `len` counts its reserved idle places. Forgetting swaps
//!   it from 0 to `RETIRED` with one compare-and-swap, then drops the slot from its bucket. A
//!   `give` reserves a place on the same word, so exactly one of the two wins: either the give
//!   lands before (the key is not forgotten) or it sees `RETIRED` and starts over on the
//!   current table, where it creates a fresh slot. A retired slot is empty for ever, so a
//!   take on a stale one finds nothing. Lookups skip retired slots.
//! - **Stack.** Push and pop are single compare-and-swaps on `head`. A popped node is freed
//!   through crossbeam-epoch only once no pinned thread can still see it, which also rules out
//!   ABA: while a popper holds a pointer to the head node, that node cannot be freed and
//!   reused, so a successful compare-and-swap really did unlink the node it read.
//! - **Values move out exactly once.** The value sits in `ManuallyDrop`; only the thread whose
//!   compare-and-swap unlinked the node reads it out (`ptr::read`), and the node's deferred
//!   destruction never drops it. Values still linked when the stack is dropped are dropped
//!   there.
//! - **Caps.** A `give` first reserves a place on the key's count and on the global count
//!   (compare-exchange loops that never exceed the cap), pushes only if both succeed, and
//!   releases what it reserved if not. A `take` releases its places after the pop. So each
//!   count is always at least the number of entries really stored, and never above its cap.
//!   (`idle_count` and `idle_total` read these counts, so they may include a give about to
//!   land.)
//! - **Sweep.** Pops a key's whole stack, keeps the live entries and pushes them back oldest
//!   first, so their order survives. Their places stay reserved throughout, so a concurrent
//!   `give` cannot take their place and the key cannot be forgotten meanwhile. A concurrent
//!   `take` may miss (the entries are briefly in the sweeper's hands) and a concurrent `give`
//!   may end up below the pushed-back entries: both only cost a fresh connection, never a
//!   lost or duplicated one.

use std::hash::BuildHasher;
use std::mem::ManuallyDrop;
use std::ptr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use arc_swap::ArcSwap;
use crossbeam_epoch::{self as epoch, Atomic, Owned, Shared};
use crossbeam_utils::CachePadded;

use super::{Idle, IdlePool, Key, KeyHasher, KeyState, PoolCounters, PoolSettings, reserve_slot};

/// `len` of a forgotten slot: above any cap, so no give can reserve a place on it.
const RETIRED: u64 = u64::MAX;
/// Buckets of a new pool; the table grows `GROW_BY` times when keys exceed `GROW_AT` per
/// bucket. Growing fourfold copies each slot pointer a third of a time on average (n/4 +
/// n/16 + …), against one time for doubling: growth touches memory spread over every slot.
const INITIAL_BUCKETS: usize = 64;
const GROW_AT: usize = 2;
const GROW_BY: usize = 4;

pub struct LockFreePool<K, S, T> {
    settings: PoolSettings,
    table: ArcSwap<Table<K, S, T>>,
    /// Serialises changes to the key set; lookups, takes and gives never take it.
    writer: Mutex<()>,
    keys: AtomicUsize,
    hasher: KeyHasher,
    counters: PoolCounters,
}

/// A bucket: the slots of the keys that hash to it, replaced whole when it changes (under
/// the writer lock); readers see the old or the new vector, never a half-changed one.
struct Bucket<K, S, T> {
    slots: Atomic<Vec<Entry<K, S, T>>>,
}

/// A slot with its key's hash, kept beside the pointer so that a lookup compares hashes
/// before touching the slot, and growth rehashes without touching it at all.
type Entry<K, S, T> = (u64, Arc<Slot<K, S, T>>);

impl<K, S, T> Bucket<K, S, T> {
    fn empty() -> Self {
        Bucket { slots: Atomic::null() }
    }

    /// Runs `f` on the bucket's slots as they are now.
    fn with<R>(&self, f: impl FnOnce(&[Entry<K, S, T>]) -> R) -> R {
        let guard = epoch::pin();
        // SAFETY: pinned, so a vector reachable from `slots` is not freed while `f` runs.
        let slots = unsafe { self.slots.load(Ordering::Acquire, &guard).as_ref() };
        f(slots.map_or(&[], Vec::as_slice))
    }

    fn to_vec(&self) -> Vec<Entry<K, S, T>> {
        self.with(<[_]>::to_vec)
    }

    /// Publishes `slots` in place of the current vector (writer lock held).
    fn store(&self, slots: Vec<Entry<K, S, T>>) {
        let guard = epoch::pin();
        let new = if slots.is_empty() { Shared::null() } else { Owned::new(slots).into_shared(&guard) };
        let old = self.slots.swap(new, Ordering::AcqRel, &guard);
        if !old.is_null() {
            // SAFETY: unlinked by the swap above; freed once no pinned reader can see it.
            unsafe { guard.defer_destroy(old) };
        }
    }
}

impl<K, S, T> Drop for Bucket<K, S, T> {
    fn drop(&mut self) {
        // SAFETY: `&mut self`: no reader can reach this bucket any more (readers hold the
        // table, and the table is being dropped).
        unsafe {
            let slots = self.slots.load(Ordering::Relaxed, epoch::unprotected());
            if !slots.is_null() {
                drop(slots.into_owned());
            }
        }
    }
}

struct Table<K, S, T> {
    buckets: Box<[Bucket<K, S, T>]>,
}

impl<K: Key, S, T> Table<K, S, T> {
    fn with_buckets(n: usize) -> Self {
        Table { buckets: (0..n).map(|_| Bucket::empty()).collect() }
    }

    fn bucket(&self, hash: u64) -> &Bucket<K, S, T> {
        // The bucket count is a power of two.
        &self.buckets[hash as usize & (self.buckets.len() - 1)]
    }

    /// Runs `f` on the live slot for `key`, if there is one, without cloning anything.
    fn with_slot<R>(&self, key: &K, hash: u64, f: impl FnOnce(&Arc<Slot<K, S, T>>) -> R) -> Option<R> {
        self.bucket(hash).with(|slots| {
            slots.iter().find(|(h, slot)| *h == hash && slot.key == *key && !slot.is_retired()).map(|(_, slot)| f(slot))
        })
    }

    fn slots(&self) -> impl Iterator<Item = Arc<Slot<K, S, T>>> + '_ {
        self.buckets.iter().flat_map(Bucket::to_vec).map(|(_, slot)| slot)
    }
}

/// One key: the caller's state, the idle stack and the count its cap is enforced on.
struct Slot<K, S, T> {
    key: K,
    state: Arc<S>,
    /// Reserved places: entries on the stack plus gives about to push; or `RETIRED`.
    /// Padded because it is the hottest word of a hot key, next to `stack.head`.
    len: CachePadded<AtomicU64>,
    stack: TreiberStack<Idle<T>>,
}

/// Why a slot refused an entry.
enum Refused<T> {
    Full(Idle<T>),
    Retired(Idle<T>),
}

impl<K, S: Default, T> Slot<K, S, T> {
    fn new(key: K) -> Self {
        Slot { key, state: Arc::default(), len: CachePadded::new(AtomicU64::new(0)), stack: TreiberStack::new() }
    }
}

impl<K, S, T> Slot<K, S, T> {
    fn is_retired(&self) -> bool {
        self.len.load(Ordering::Relaxed) == RETIRED
    }

    fn len(&self) -> usize {
        match self.len.load(Ordering::Relaxed) {
            RETIRED => 0,
            n => n as usize,
        }
    }

    /// Forgets the slot if it holds nothing: afterwards no give can land on it.
    fn retire_if_empty(&self) -> bool {
        self.len.compare_exchange(0, RETIRED, Ordering::Relaxed, Ordering::Relaxed).is_ok()
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
            return Some(entry);
        }
        None
    }

    fn give(&self, entry: Idle<T>, settings: &PoolSettings, counters: &PoolCounters) -> Result<(), Refused<T>> {
        if !reserve_slot(&self.len, settings.max_idle_per_key as u64) {
            return Err(if self.is_retired() { Refused::Retired(entry) } else { Refused::Full(entry) });
        }
        if !counters.try_reserve_idle(settings.max_idle_total) {
            self.len.fetch_sub(1, Ordering::Relaxed);
            return Err(Refused::Full(entry));
        }
        self.stack.push(entry);
        Ok(())
    }

    fn sweep_into(&self, now: Instant, settings: &PoolSettings, counters: &PoolCounters, out: &mut Vec<(K, Idle<T>)>)
    where
        K: Clone,
    {
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
                out.push((self.key.clone(), entry));
                removed += 1;
            } else {
                self.stack.push(entry);
            }
        }
        self.release(removed, counters);
    }

    fn drain_into(&self, counters: &PoolCounters, out: &mut Vec<(K, Idle<T>)>)
    where
        K: Clone,
    {
        while let Some(entry) = self.stack.pop() {
            self.release(1, counters);
            out.push((self.key.clone(), entry));
        }
    }
}

impl<K: Key, S: KeyState, T> LockFreePool<K, S, T> {
    pub fn new(settings: PoolSettings) -> Self {
        LockFreePool {
            settings,
            table: ArcSwap::from_pointee(Table::with_buckets(INITIAL_BUCKETS)),
            writer: Mutex::new(()),
            keys: AtomicUsize::new(0),
            hasher: KeyHasher::default(),
            counters: PoolCounters::default(),
        }
    }

    fn writer(&self) -> std::sync::MutexGuard<'_, ()> {
        // The mutex guards no data of its own; poison carries no meaning here.
        self.writer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The live slot for `key`, created if there is none (the slow path, once per key).
    fn slot(&self, key: &K, hash: u64) -> Arc<Slot<K, S, T>> {
        if let Some(slot) = self.table.load().with_slot(key, hash, Arc::clone) {
            return slot;
        }
        let _writer = self.writer();
        let table = self.table.load_full();
        if let Some(slot) = table.with_slot(key, hash, Arc::clone) {
            return slot; // another thread added it meanwhile
        }
        let slot = Arc::new(Slot::new(key.clone()));
        let bucket = table.bucket(hash);
        let mut slots = bucket.to_vec();
        slots.push((hash, slot.clone()));
        bucket.store(slots);
        let keys = self.keys.fetch_add(1, Ordering::Relaxed) + 1;
        if keys > GROW_AT * table.buckets.len() {
            self.grow(&table);
        }
        slot
    }

    /// Grows the table `GROW_BY` times (called with the writer lock held). Readers of the
    /// old table go on undisturbed: slots are shared, not copied.
    fn grow(&self, table: &Table<K, S, T>) {
        let bigger = Table::with_buckets(table.buckets.len() * GROW_BY);
        let mask = bigger.buckets.len() - 1;
        let mut moved: Vec<Vec<Entry<K, S, T>>> = (0..bigger.buckets.len()).map(|_| Vec::new()).collect();
        for bucket in table.buckets.iter() {
            bucket.with(|entries| {
                for (hash, slot) in entries {
                    moved[*hash as usize & mask].push((*hash, slot.clone()));
                }
            });
        }
        for (bucket, slots) in bigger.buckets.iter().zip(moved) {
            if !slots.is_empty() {
                bucket.store(slots);
            }
        }
        self.table.store(Arc::new(bigger));
    }
}

impl<K: Key, S: KeyState, T: Send> IdlePool<K, S, T> for LockFreePool<K, S, T> {
    fn checkout(&self, key: &K, now: Instant) -> (Arc<S>, Option<Idle<T>>) {
        let hash = self.hasher.hash_one(key);
        let found = self
            .table
            .load()
            .with_slot(key, hash, |slot| (slot.state.clone(), slot.take_at(now, &self.settings, &self.counters)));
        found.unwrap_or_else(|| {
            let slot = self.slot(key, hash);
            (slot.state.clone(), slot.take_at(now, &self.settings, &self.counters))
        })
    }

    fn state(&self, key: &K) -> Arc<S> {
        let hash = self.hasher.hash_one(key);
        self.table
            .load()
            .with_slot(key, hash, |slot| slot.state.clone())
            .unwrap_or_else(|| self.slot(key, hash).state.clone())
    }

    fn take_at(&self, key: &K, now: Instant) -> Option<Idle<T>> {
        let hash = self.hasher.hash_one(key);
        self.table.load().with_slot(key, hash, |slot| slot.take_at(now, &self.settings, &self.counters)).flatten()
    }

    fn give(&self, key: &K, entry: Idle<T>) -> Result<(), Idle<T>> {
        let hash = self.hasher.hash_one(key);
        // Fast path: the key exists; the slot is used in place, not cloned.
        let mut entry = Some(entry);
        let given = self
            .table
            .load()
            .with_slot(key, hash, |slot| slot.give(entry.take().expect("given once"), &self.settings, &self.counters));
        let mut entry = match given {
            Some(Ok(())) => return Ok(()),
            Some(Err(Refused::Full(refused))) => return Err(refused),
            Some(Err(Refused::Retired(back))) => back,
            None => entry.take().expect("not given"),
        };
        loop {
            match self.slot(key, hash).give(entry, &self.settings, &self.counters) {
                Ok(()) => return Ok(()),
                Err(Refused::Full(refused)) => return Err(refused),
                // Forgotten meanwhile: start over on the current table.
                Err(Refused::Retired(back)) => entry = back,
            }
        }
    }

    fn sweep(&self, now: Instant) -> Vec<(K, Idle<T>)> {
        let mut expired = Vec::new();
        for slot in self.table.load().slots() {
            slot.sweep_into(now, &self.settings, &self.counters, &mut expired);
        }
        expired
    }

    fn drain(&self) -> Vec<(K, Idle<T>)> {
        let mut all = Vec::new();
        for slot in self.table.load().slots() {
            slot.drain_into(&self.counters, &mut all);
        }
        all
    }

    fn forget_where(&self, quiet: &dyn Fn(&S) -> bool) -> usize {
        let _writer = self.writer();
        let table = self.table.load_full();
        let mut forgotten = 0;
        for bucket in table.buckets.iter() {
            let slots = bucket.to_vec();
            let before = forgotten;
            let kept: Vec<_> = slots
                .iter()
                .filter(|(_, slot)| {
                    let forget = quiet(&slot.state) && slot.retire_if_empty();
                    forgotten += usize::from(forget);
                    !forget && !slot.is_retired()
                })
                .cloned()
                .collect();
            if forgotten > before {
                bucket.store(kept);
            }
        }
        self.keys.fetch_sub(forgotten, Ordering::Relaxed);
        forgotten
    }

    fn idle_count(&self, key: &K) -> usize {
        let hash = self.hasher.hash_one(key);
        self.table.load().with_slot(key, hash, |slot| slot.len()).unwrap_or(0)
    }

    fn idle_total(&self) -> usize {
        self.counters.idle_total()
    }

    fn key_count(&self) -> usize {
        self.keys.load(Ordering::Relaxed)
    }

    fn keys(&self) -> Vec<(K, Arc<S>, usize)> {
        let table = self.table.load();
        table
            .slots()
            .filter(|slot| !slot.is_retired())
            .map(|slot| (slot.key.clone(), slot.state.clone(), slot.len()))
            .collect()
    }

    fn counters(&self) -> &PoolCounters {
        &self.counters
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
