//! A memory budget for stream data that has arrived but that its stream's consumer
//! has not taken yet: the only buffer a peer can grow by sending faster than a
//! destination reads.
//!
//! Each chunk the reader queues is charged to its session and, past a small reserve,
//! to one process-wide budget; the charge is returned when the consumer asks for the
//! next chunk (so the chunk it is still writing out counts too). When a charge does
//! not fit, the reader of that session waits, which stops reading its connection:
//! backpressure lands on the session that filled its share, never on the others. The
//! reserve is what keeps the others going when many sessions together have filled the
//! global budget: a session holding less than its reserve is charged nothing globally.
//!
//! So buffered stream data is bounded by `global + sessions × reserve`, and a session
//! never holds more than `per_session`.
//!
//! Each stream is held to its own bound as well ([`DEFAULT_STREAM_BUFFER`]), charged
//! first: one stalled stream stops its session's reader at a few frames, not at the
//! session's whole share. The same bound caps what a stream may hand the session's
//! writer (its send window, in `stream.rs`), so both directions of both binaries read a
//! socket only while the stream's queue is under it.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The process-wide budget and the per-session shares; clones share the budget.
#[derive(Debug, Clone)]
pub struct BufferBudget {
    global: Arc<Semaphore>,
    global_bytes: usize,
    per_session: usize,
    reserve: usize,
}

/// Per session: at most 4 MiB queued, eight streams' full queues.
pub const DEFAULT_PER_SESSION: usize = 4 << 20;
/// Four full frames per session never wait on the global budget.
pub const DEFAULT_RESERVE: usize = 256 << 10;
/// Per stream and direction: two TLS records' worth. Measured (docs/hardening.md): a bulk
/// stream moves as fast as with 128 KiB (the kernel's socket buffers, not this, keep a
/// link full), and a thousand stalled uploads stay within 100 MiB on each side, where
/// 64 KiB already passed it.
pub const DEFAULT_STREAM_BUFFER: usize = 32 << 10;

impl BufferBudget {
    /// `global_bytes` across all sessions, `per_session` for one; the reserve is the
    /// smaller of [`DEFAULT_RESERVE`] and `per_session`.
    pub fn new(global_bytes: usize, per_session: usize) -> BufferBudget {
        let global_bytes = global_bytes.clamp(1, Semaphore::MAX_PERMITS);
        let per_session = per_session.clamp(1, u32::MAX as usize);
        BufferBudget {
            global: Arc::new(Semaphore::new(global_bytes)),
            global_bytes,
            per_session,
            reserve: DEFAULT_RESERVE.min(per_session),
        }
    }

    /// Bytes charged to the global budget now.
    pub fn global_in_use(&self) -> usize {
        self.global_bytes - self.global.available_permits()
    }

    pub fn global_bytes(&self) -> usize {
        self.global_bytes
    }

    pub fn per_session(&self) -> usize {
        self.per_session
    }

    /// A session's share; each of its streams may hold at most `stream_bound` bytes.
    pub(super) fn for_session(&self, stream_bound: usize) -> SessionBudget {
        SessionBudget {
            budget: self.clone(),
            session: Arc::new(Semaphore::new(self.per_session)),
            stream_bound: stream_bound.clamp(1, u32::MAX as usize),
        }
    }
}

impl Default for BufferBudget {
    fn default() -> BufferBudget {
        BufferBudget::new(crate::resources::default_buffer_budget(), DEFAULT_PER_SESSION)
    }
}

/// One session's share of a [`BufferBudget`].
pub(super) struct SessionBudget {
    budget: BufferBudget,
    session: Arc<Semaphore>,
    /// Each stream's semaphore holds this many permits (`SessionConfig::stream_buffer`).
    stream_bound: usize,
}

/// Bytes charged for one queued chunk, returned when dropped.
#[derive(Debug)]
pub(super) struct Charge {
    _stream: OwnedSemaphorePermit,
    _session: OwnedSemaphorePermit,
    _global: Option<OwnedSemaphorePermit>,
}

impl SessionBudget {
    /// Charges `len` bytes to `stream` (its bound) and this session at once if they fit,
    /// without waiting.
    pub(super) fn try_charge(&self, len: usize, stream: &Arc<Semaphore>) -> Option<Charge> {
        let in_stream = stream.clone().try_acquire_many_owned(self.stream_chargeable(len)).ok()?;
        let len = self.chargeable(len);
        let session = self.session.clone().try_acquire_many_owned(len).ok()?;
        let global = if self.within_reserve() {
            None
        } else {
            Some(self.budget.global.clone().try_acquire_many_owned(len).ok()?)
        };
        Some(Charge { _stream: in_stream, _session: session, _global: global })
    }

    /// Charges `len` bytes, waiting until they fit (cancel-safe: nothing is held
    /// if the future is dropped).
    pub(super) async fn charge(&self, len: usize, stream: &Arc<Semaphore>) -> Charge {
        let in_stream =
            stream.clone().acquire_many_owned(self.stream_chargeable(len)).await.expect("the bound is never closed");
        let len = self.chargeable(len);
        let session = self.session.clone().acquire_many_owned(len).await.expect("the budget is never closed");
        let global = if self.within_reserve() {
            None
        } else {
            Some(self.budget.global.clone().acquire_many_owned(len).await.expect("the budget is never closed"))
        };
        Charge { _stream: in_stream, _session: session, _global: global }
    }

    /// A chunk larger than the stream's whole bound goes through alone.
    fn stream_chargeable(&self, len: usize) -> u32 {
        len.clamp(1, self.stream_bound) as u32
    }

    /// A chunk larger than the whole share still goes through, alone.
    fn chargeable(&self, len: usize) -> u32 {
        len.clamp(1, self.budget.per_session) as u32
    }

    /// Whether what this session holds (the new charge included) is within its reserve.
    fn within_reserve(&self) -> bool {
        self.budget.per_session - self.session.available_permits() <= self.budget.reserve
    }

    /// Bytes this session holds now.
    #[cfg(test)]
    pub(super) fn in_use(&self) -> usize {
        self.budget.per_session - self.session.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const KIB: usize = 1024;
    /// A stream bound that never binds, for the session-level cases.
    const BIG: usize = 1 << 30;

    fn roomy() -> Arc<Semaphore> {
        Arc::new(Semaphore::new(BIG))
    }

    #[test]
    fn a_session_is_held_to_its_share() {
        let budget = BufferBudget::new(1 << 30, 128 * KIB);
        let session = budget.for_session(BIG);
        let first = session.try_charge(64 * KIB, &roomy()).unwrap();
        let _second = session.try_charge(64 * KIB, &roomy()).unwrap();
        assert!(session.try_charge(1, &roomy()).is_none(), "the share is full");
        drop(first);
        assert!(session.try_charge(64 * KIB, &roomy()).is_some(), "a consumed chunk frees its bytes");
    }

    #[test]
    fn within_the_reserve_nothing_is_charged_globally() {
        let budget = BufferBudget::new(64 * KIB, 4 << 20);
        let session = budget.for_session(BIG);
        let held: Vec<_> = (0..4).map(|_| session.try_charge(64 * KIB, &roomy()).unwrap()).collect();
        assert_eq!((budget.global_in_use(), session.in_use()), (0, 256 * KIB));
        let beyond = session.try_charge(64 * KIB, &roomy()).unwrap();
        assert_eq!(budget.global_in_use(), 64 * KIB);
        assert!(session.try_charge(1, &roomy()).is_none(), "the global budget is full");
        drop((held, beyond));
        assert_eq!((budget.global_in_use(), session.in_use()), (0, 0));
    }

    #[tokio::test]
    async fn a_full_global_budget_stalls_the_greedy_session_not_a_small_one() {
        let budget = BufferBudget::new(512 * KIB, 4 << 20);
        let greedy = budget.for_session(BIG);
        let mut held = Vec::new();
        while let Some(charge) = greedy.try_charge(64 * KIB, &roomy()) {
            held.push(charge);
        }
        assert_eq!(greedy.in_use(), 768 * KIB, "its reserve plus the whole global budget");
        let waiting = tokio::time::timeout(Duration::from_millis(100), greedy.charge(64 * KIB, &roomy())).await;
        assert!(waiting.is_err(), "the greedy session waits");
        let small = budget.for_session(BIG);
        let _fits = small.try_charge(64 * KIB, &roomy()).expect("another session still gets its reserve");
        held.pop();
        let freed = tokio::time::timeout(Duration::from_secs(1), greedy.charge(64 * KIB, &roomy())).await;
        assert!(freed.is_ok(), "a consumed chunk lets the greedy session go on");
    }

    #[test]
    fn an_oversized_chunk_goes_through_alone() {
        let budget = BufferBudget::new(1 << 30, 16 * KIB);
        let session = budget.for_session(BIG);
        let charge = session.try_charge(64 * KIB, &roomy()).expect("clamped to the whole share");
        assert!(session.try_charge(1, &roomy()).is_none());
        drop(charge);
    }

    #[tokio::test]
    async fn one_stream_is_held_to_its_bound_and_its_neighbours_are_not() {
        let budget = BufferBudget::new(1 << 30, 4 << 20);
        let session = budget.for_session(128 * KIB);
        let (stalled, other) = (Arc::new(Semaphore::new(128 * KIB)), Arc::new(Semaphore::new(128 * KIB)));
        let held: Vec<_> = (0..2).map(|_| session.try_charge(64 * KIB, &stalled).unwrap()).collect();
        assert!(session.try_charge(1, &stalled).is_none(), "the stream's bound is full");
        let waiting = tokio::time::timeout(Duration::from_millis(50), session.charge(1, &stalled)).await;
        assert!(waiting.is_err(), "its next chunk waits");
        assert!(session.try_charge(64 * KIB, &other).is_some(), "another stream of the session still fits");
        drop(held);
        assert!(session.try_charge(128 * KIB, &stalled).is_some(), "consumed chunks free the stream's bytes");
        let big = Arc::new(Semaphore::new(128 * KIB));
        assert!(session.try_charge(1 << 20, &big).is_some(), "a chunk over the bound goes through alone");
    }
}
