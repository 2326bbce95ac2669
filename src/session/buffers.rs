//! Reusable byte buffers in three size tiers (4 KiB, 64 KiB, 128 KiB).
//!
//! A buffer is handed out as a [`PooledBuf`] guard and goes back to its tier when the guard
//! is dropped, so a caller cannot forget to return it. Each tier keeps at most
//! `max_retained` free buffers: beyond that a returned buffer is freed, which bounds what
//! the pool can hold on to after a burst (e.g. 256 × 64 KiB = 16 MiB).
//!
//! The relay reads TCP data into one of these and passes it on as [`Bytes`] without a copy
//! ([`PooledBuf::into_bytes`]); the buffer comes back once the session writer has sent the
//! frame. Whether that beats a fresh `BytesMut` per read is measured, not assumed: see
//! `docs/observability.md`. Each service owns one [`RelayBuffers`] (switched on or off at
//! start-up with `--buffer-pool`) and hands it to its relays.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// The tier sizes of the seed design.
pub const TIER_SIZES: [usize; 3] = [4 * 1024, 64 * 1024, 128 * 1024];

/// Whether the relay reads into pooled buffers (`--buffer-pool`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BufferPoolMode {
    /// Reuse 64 KiB read buffers from the pool.
    On,
    /// Each relay reads into its own reused buffer (measured to be as fast; see docs/observability.md).
    #[default]
    Off,
}

impl BufferPoolMode {
    /// Both modes, in the order help text lists them.
    pub const ALL: [BufferPoolMode; 2] = [BufferPoolMode::On, BufferPoolMode::Off];

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            BufferPoolMode::On => "on",
            BufferPoolMode::Off => "off",
        }
    }

    /// The names, comma-separated: what an error lists.
    pub fn names() -> String {
        Self::ALL.map(Self::name).join(", ")
    }

    /// The mode in one sentence (the flag's full help, beside each name).
    pub fn description(self) -> &'static str {
        match self {
            BufferPoolMode::On => "Reuse 64 KiB read buffers from the pool",
            BufferPoolMode::Off => {
                "Each relay reads into its own reused buffer (measured to be as fast; see docs/observability.md)"
            }
        }
    }
}

impl std::fmt::Display for BufferPoolMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A `--buffer-pool` value that is neither `on` nor `off`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown buffer pool mode {0:?}: expected one of {names}", names = BufferPoolMode::names())]
pub struct UnknownBufferPoolMode(pub String);

impl std::str::FromStr for BufferPoolMode {
    type Err = UnknownBufferPoolMode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|mode| mode.name() == s).ok_or_else(|| UnknownBufferPoolMode(s.to_owned()))
    }
}

/// Counters of one tier, as shown by `/api/memory-pool-stats`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct TierStats {
    pub buffer_size: usize,
    /// Free buffers held by the tier now.
    pub current_size: u64,
    /// The most free buffers the tier ever held at once.
    pub peak_size: u64,
    /// Buffers handed out now.
    pub in_use: u64,
    /// Buffers newly allocated (a get that found the tier empty, or any read with the pool
    /// off).
    pub total_allocated: u64,
    /// Gets served from a free buffer.
    pub total_reused: u64,
    /// Buffers given back and kept.
    pub total_returned: u64,
    /// Buffers given back to a full tier, and freed.
    pub total_dropped: u64,
}

struct Tier {
    size: usize,
    max_retained: usize,
    free: Mutex<Vec<Vec<u8>>>,
    peak: AtomicU64,
    in_use: AtomicU64,
    allocated: AtomicU64,
    reused: AtomicU64,
    returned: AtomicU64,
    dropped: AtomicU64,
}

impl Tier {
    fn new(size: usize, max_retained: usize) -> Tier {
        Tier {
            size,
            max_retained,
            free: Mutex::new(Vec::new()),
            peak: AtomicU64::new(0),
            in_use: AtomicU64::new(0),
            allocated: AtomicU64::new(0),
            reused: AtomicU64::new(0),
            returned: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    fn free_list(&self) -> std::sync::MutexGuard<'_, Vec<Vec<u8>>> {
        // Pushes and pops cannot panic half-way: a poisoned list is still consistent.
        self.free.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn take(&self) -> Vec<u8> {
        self.in_use.fetch_add(1, Ordering::Relaxed);
        if let Some(buf) = self.free_list().pop() {
            self.reused.fetch_add(1, Ordering::Relaxed);
            return buf;
        }
        self.allocated.fetch_add(1, Ordering::Relaxed);
        // Zeroed once, here; a reused buffer keeps its old bytes, which every reader
        // overwrites before the length it reports.
        vec![0; self.size]
    }

    fn give_back(&self, buf: Vec<u8>) {
        self.in_use.fetch_sub(1, Ordering::Relaxed);
        let mut free = self.free_list();
        if free.len() >= self.max_retained {
            drop(free);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        free.push(buf);
        let held = free.len() as u64;
        drop(free);
        self.returned.fetch_add(1, Ordering::Relaxed);
        self.peak.fetch_max(held, Ordering::Relaxed);
    }

    fn stats(&self) -> TierStats {
        TierStats {
            buffer_size: self.size,
            current_size: self.free_list().len() as u64,
            peak_size: self.peak.load(Ordering::Relaxed),
            in_use: self.in_use.load(Ordering::Relaxed),
            total_allocated: self.allocated.load(Ordering::Relaxed),
            total_reused: self.reused.load(Ordering::Relaxed),
            total_returned: self.returned.load(Ordering::Relaxed),
            total_dropped: self.dropped.load(Ordering::Relaxed),
        }
    }
}

/// Three tiers of reusable buffers. Cheap to clone; clones share the tiers.
#[derive(Clone)]
pub struct BufferPool {
    tiers: Arc<[Tier; 3]>,
}

impl BufferPool {
    /// Tiers of [`TIER_SIZES`], each keeping at most the matching `max_retained` free buffers.
    pub fn new(max_retained: [usize; 3]) -> BufferPool {
        let tiers = [0, 1, 2].map(|i| Tier::new(TIER_SIZES[i], max_retained[i]));
        BufferPool { tiers: Arc::new(tiers) }
    }

    /// A buffer of at least `len` bytes from the smallest tier that fits, or `None` when
    /// `len` is beyond the largest tier.
    pub fn get(&self, len: usize) -> Option<PooledBuf> {
        let tier = self.tiers.iter().position(|tier| tier.size >= len)?;
        Some(PooledBuf { buf: self.tiers[tier].take(), tier, pool: self.clone() })
    }

    pub fn stats(&self) -> Vec<TierStats> {
        self.tiers.iter().map(Tier::stats).collect()
    }
}

impl Default for BufferPool {
    /// 4 MiB of 4 KiB buffers, 16 MiB of 64 KiB ones, 8 MiB of 128 KiB ones at most.
    fn default() -> Self {
        BufferPool::new([1024, 256, 64])
    }
}

/// A buffer on loan from a [`BufferPool`]; its full tier size is usable. Goes back to its
/// tier on drop.
pub struct PooledBuf {
    buf: Vec<u8>,
    tier: usize,
    pool: BufferPool,
}

impl PooledBuf {
    /// The first `len` bytes as [`Bytes`], without copying; the buffer returns to the pool
    /// when the last clone of those bytes is dropped.
    pub fn into_bytes(self, len: usize) -> Bytes {
        assert!(len <= self.buf.len(), "{len} bytes do not fit a {} byte buffer", self.buf.len());
        Bytes::from_owner(Filled { buf: self, len })
    }
}

impl Deref for PooledBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf
    }
}

impl DerefMut for PooledBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        self.pool.tiers[self.tier].give_back(std::mem::take(&mut self.buf));
    }
}

/// A pooled buffer of which the first `len` bytes hold data.
struct Filled {
    buf: PooledBuf,
    len: usize,
}

impl AsRef<[u8]> for Filled {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// A relay's own read buffer holds this many reads before it is reserved again: one, so
/// it holds no more than the stream's send window lets through (a larger buffer stays
/// resident per stalled stream however little of it is in use).
const OWN_BUFFER_READS: usize = 1;

/// The read buffers of one service's relays: pooled (`--buffer-pool on`) or each relay's
/// own, with the counters of both modes.
#[derive(Default)]
pub struct RelayBuffers {
    mode: BufferPoolMode,
    pool: BufferPool,
    /// With the pool off: how often a relay's own read buffer ran out of room and was
    /// reserved again (at most one allocation each; none when its chunks were all gone),
    /// counted so that both modes report their allocations.
    unpooled_reserves: AtomicU64,
}

impl RelayBuffers {
    pub fn new(mode: BufferPoolMode) -> RelayBuffers {
        RelayBuffers { mode, ..RelayBuffers::default() }
    }

    pub fn mode(&self) -> BufferPoolMode {
        self.mode
    }

    /// The buffer statistics, per tier. With the pool off its tiers stay empty, and the
    /// 64 KiB tier's `total_allocated` counts the relays' own buffer reservations instead.
    pub fn stats(&self) -> Vec<TierStats> {
        let mut stats = self.pool.stats();
        let unpooled = self.unpooled_reserves.load(Ordering::Relaxed);
        if let Some(tier) = stats.iter_mut().find(|tier| tier.buffer_size >= crate::proto::MAX_FRAME_DATA) {
            tier.total_allocated += unpooled;
        }
        stats
    }

    /// One read of up to `max` bytes from `reader`, as [`Bytes`]; empty at end of data.
    /// With the pool on the bytes live in a pooled buffer. Otherwise they are split off
    /// `own`, the relay's long-lived buffer: once earlier chunks are dropped, `reserve`
    /// reuses its allocation instead of asking the allocator (and the kernel) for pages.
    pub async fn read_chunk<R: AsyncRead + Unpin>(
        &self,
        reader: &mut R,
        own: &mut BytesMut,
        max: usize,
    ) -> std::io::Result<Bytes> {
        if self.mode == BufferPoolMode::On
            && let Some(mut buf) = self.pool.get(max)
        {
            let n = reader.read(&mut buf[..max]).await?;
            return Ok(buf.into_bytes(n));
        }
        if own.capacity() < max {
            self.unpooled_reserves.fetch_add(1, Ordering::Relaxed);
            own.reserve(OWN_BUFFER_READS * max);
        }
        reader.read_buf(&mut bytes::BufMut::limit(&mut *own, max)).await?;
        Ok(own.split().freeze())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_pool_modes_parse_and_print_their_names() {
        for mode in BufferPoolMode::ALL {
            assert_eq!(mode.to_string().parse::<BufferPoolMode>(), Ok(mode));
        }
        assert_eq!(BufferPoolMode::ALL.map(BufferPoolMode::name), ["on", "off"]);
        let err = "yes".parse::<BufferPoolMode>().unwrap_err().to_string();
        assert!(err.contains("\"yes\"") && err.contains("on, off"), "{err}");
        assert_eq!(BufferPoolMode::default(), BufferPoolMode::Off);
    }

    fn tier(pool: &BufferPool, size: usize) -> TierStats {
        pool.stats().into_iter().find(|t| t.buffer_size == size).unwrap()
    }

    #[test]
    fn a_request_gets_the_smallest_tier_that_fits() {
        let pool = BufferPool::default();
        assert_eq!(pool.get(1).unwrap().len(), 4096);
        assert_eq!(pool.get(4097).unwrap().len(), 65536);
        assert_eq!(pool.get(65535).unwrap().len(), 65536);
        assert_eq!(pool.get(131072).unwrap().len(), 131072);
        assert!(pool.get(131073).is_none());
    }

    #[test]
    fn a_dropped_guard_returns_its_buffer_for_the_next_get() {
        let pool = BufferPool::default();
        let mut first = pool.get(100).unwrap();
        first[0] = 7;
        let address = first.as_ptr();
        assert_eq!(tier(&pool, 4096).in_use, 1);
        drop(first);
        let s = tier(&pool, 4096);
        assert_eq!((s.current_size, s.peak_size, s.in_use, s.total_returned), (1, 1, 0, 1));
        let again = pool.get(100).unwrap();
        assert_eq!(again.as_ptr(), address, "the same buffer");
        let s = tier(&pool, 4096);
        assert_eq!((s.total_allocated, s.total_reused, s.current_size), (1, 1, 0));
    }

    #[test]
    fn a_full_tier_frees_what_comes_back() {
        let pool = BufferPool::new([2, 2, 2]);
        let held: Vec<PooledBuf> = (0..5).map(|_| pool.get(10).unwrap()).collect();
        drop(held);
        let s = tier(&pool, 4096);
        assert_eq!((s.total_allocated, s.current_size, s.peak_size), (5, 2, 2));
        assert_eq!((s.total_returned, s.total_dropped, s.in_use), (2, 3, 0));
    }

    #[test]
    fn bytes_made_from_a_buffer_return_it_when_the_last_clone_drops() {
        let pool = BufferPool::default();
        let mut buf = pool.get(65535).unwrap();
        buf[..5].copy_from_slice(b"hello");
        let bytes = buf.into_bytes(5);
        let clone = bytes.slice(1..);
        assert_eq!(&bytes[..], b"hello");
        drop(bytes);
        assert_eq!(tier(&pool, 65536).in_use, 1, "a clone still holds it");
        assert_eq!(&clone[..], b"ello");
        drop(clone);
        let s = tier(&pool, 65536);
        assert_eq!((s.in_use, s.current_size), (0, 1));
    }

    #[test]
    fn buffers_move_between_threads_and_all_come_back() {
        let pool = BufferPool::new([64, 64, 64]);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let pool = pool.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        let buf = pool.get(60_000).unwrap();
                        drop(buf.into_bytes(10));
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        let s = tier(&pool, 65536);
        assert_eq!(s.in_use, 0);
        assert_eq!(s.total_allocated + s.total_reused, 4000);
        assert!(s.total_allocated <= 4, "at most one buffer per thread at a time: {s:?}");
    }

    #[tokio::test]
    async fn read_chunk_reads_the_same_bytes_with_the_pool_on_or_off() {
        for mode in [BufferPoolMode::Off, BufferPoolMode::On] {
            let buffers = RelayBuffers::new(mode);
            let mut input: &[u8] = b"some data";
            let mut own = BytesMut::new();
            let chunk = buffers.read_chunk(&mut input, &mut own, 65535).await.unwrap();
            assert_eq!(&chunk[..], b"some data", "{mode:?}");
            assert!(buffers.read_chunk(&mut input, &mut own, 65535).await.unwrap().is_empty(), "{mode:?}: end of data");
            let tier = buffers.stats().into_iter().find(|t| t.buffer_size == 65536).unwrap();
            assert!(tier.total_allocated >= 1, "{mode:?}: its own counters saw the read");
        }
    }

    #[tokio::test]
    async fn with_the_pool_off_a_relay_reuses_its_own_buffer() {
        let data = vec![5u8; 1 << 20];
        let mut input: &[u8] = &data;
        let mut own = BytesMut::new();
        let buffers = RelayBuffers::new(BufferPoolMode::Off);
        let first = buffers.read_chunk(&mut input, &mut own, 65535).await.unwrap();
        let first_start = first.as_ptr();
        drop(first);
        // The chunks read since were dropped too: a reserve reclaims the same allocation.
        let mut reused = false;
        for _ in 0..8 {
            let chunk = buffers.read_chunk(&mut input, &mut own, 65535).await.unwrap();
            reused |= chunk.as_ptr() == first_start;
        }
        assert!(reused, "the first chunk's memory is read into again");
    }
}
