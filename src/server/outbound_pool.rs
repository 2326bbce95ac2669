//! The server's outbound pool: warm TCP connections per target, dialed ahead of
//! demand, and a per-target limit with a fair wait queue.
//!
//! Safety rule: a connection that has carried one client's stream is never handed
//! to another (it holds that client's TLS or HTTP state); it is closed when its
//! stream ends. What the pool hands out are warm connections: dialed, never used.
//! For every target that saw traffic within the idle window, the pool keeps
//! `min_idle` warm ones ready, refilled in the background after each take.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::outbound::{DialError, Dialer};
use crate::pool::{Idle, IdlePool, KeyStats, PoolKey, PoolSettings, PoolStatsSnapshot, PoolType, new_pool};
use crate::proto::Address;

/// Limits of the outbound pool, from the command line.
#[derive(Debug, Clone)]
pub struct OutboundSettings {
    pub pool_type: PoolType,
    /// Connections (in use + warm) per target.
    pub max_per_target: usize,
    /// Warm connections kept per recently used target.
    pub min_idle: usize,
    /// Warm connections across all targets (bounds file descriptors).
    pub max_idle_total: usize,
    pub max_idle_time: Duration,
    pub max_lifetime: Duration,
    /// Streams allowed to wait for a full target; more fail at once.
    pub max_waiters_per_target: usize,
}

/// A connection handed to one stream. Dropping it closes the connection and frees
/// its slot for the target.
pub struct Outbound {
    pub tcp: TcpStream,
    /// Whether it came warm from the pool.
    pub reused: bool,
    _slot: Slot,
}

/// A target slot that also keeps the pool's and the target's Active gauges honest.
struct Slot {
    _permit: OwnedSemaphorePermit,
    pool: Option<Arc<Inner>>,
    target: Arc<Target>,
}

impl Slot {
    fn checked_out(permit: OwnedSemaphorePermit, pool: &Arc<Inner>, target: &Arc<Target>) -> Slot {
        pool.idle.counters().record_checkout();
        target.active.fetch_add(1, Ordering::Relaxed);
        Slot { _permit: permit, pool: Some(pool.clone()), target: target.clone() }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(pool) = &self.pool {
            pool.idle.counters().record_checkin();
            // The connection is closed with its stream (never reused).
            pool.ended.fetch_add(1, Ordering::Relaxed);
        }
        self.target.active.fetch_sub(1, Ordering::Relaxed);
    }
}

struct WarmConnection {
    tcp: TcpStream,
    permit: OwnedSemaphorePermit,
}

struct Target {
    address: Address,
    slots: Arc<Semaphore>,
    waiters: AtomicUsize,
    /// Milliseconds since the pool's epoch of the last stream to this target.
    last_demand_ms: AtomicU64,
    refilling: AtomicBool,
    /// For the API: connections dialed (on demand or warm), served warm, cleaned, in use.
    created: AtomicU64,
    reused: AtomicU64,
    cleaned: AtomicU64,
    active: AtomicU64,
}

struct Inner {
    settings: OutboundSettings,
    dialer: Dialer,
    idle: Arc<dyn IdlePool<WarmConnection>>,
    targets: Mutex<HashMap<PoolKey, Arc<Target>>>,
    epoch: Instant,
    /// Warm connections dialed ahead of demand (not part of New, which counts dials
    /// a stream had to wait for).
    warmed: AtomicU64,
    /// Used connections closed when their stream ended.
    ended: AtomicU64,
}

/// Cheap to clone; clones share the pool.
#[derive(Clone)]
pub struct OutboundPool {
    inner: Arc<Inner>,
}

#[derive(Debug, thiserror::Error)]
pub enum AcquireError {
    #[error(transparent)]
    Dial(#[from] DialError),
    #[error("outbound pool for {0} exhausted")]
    Exhausted(String),
}

impl OutboundPool {
    pub fn new(settings: OutboundSettings, dialer: Dialer) -> OutboundPool {
        let engine_settings = PoolSettings {
            max_idle_per_key: settings.min_idle.min(settings.max_per_target),
            max_idle_total: settings.max_idle_total,
            max_idle_time: settings.max_idle_time,
            max_lifetime: settings.max_lifetime,
        };
        let inner = Inner {
            idle: new_pool(settings.pool_type, engine_settings),
            settings,
            dialer,
            targets: Mutex::new(HashMap::new()),
            epoch: Instant::now(),
            warmed: AtomicU64::new(0),
            ended: AtomicU64::new(0),
        };
        OutboundPool { inner: Arc::new(inner) }
    }

    pub fn settings(&self) -> &OutboundSettings {
        &self.inner.settings
    }

    /// A connection to `address` for one stream: a live warm one if there is one,
    /// else a new dial, waiting for a slot when the target is at its limit (at most
    /// the connect timeout).
    pub async fn acquire(&self, address: &Address) -> Result<Outbound, AcquireError> {
        let slot_deadline = tokio::time::Instant::now() + self.inner.dialer.connect_timeout;
        self.acquire_waiting_until(address, slot_deadline).await
    }

    /// As [`OutboundPool::acquire`], but a wait for a free slot ends at `slot_deadline`
    /// (or the connect timeout, if sooner): the server must answer the SYN within the
    /// client's 3 s rule, so an exhausted target is reported while it still can be.
    pub async fn acquire_waiting_until(
        &self,
        address: &Address,
        slot_deadline: tokio::time::Instant,
    ) -> Result<Outbound, AcquireError> {
        let inner = &self.inner;
        let (key, target) = inner.target(address);
        target.last_demand_ms.store(inner.now_ms(), Ordering::Relaxed);
        while let Some(entry) = inner.idle.take(&key) {
            if is_alive(&entry.value.tcp) {
                inner.refill_soon(&key, &target);
                target.reused.fetch_add(1, Ordering::Relaxed);
                let WarmConnection { tcp, permit } = entry.value;
                return Ok(Outbound { tcp, reused: true, _slot: Slot::checked_out(permit, inner, &target) });
            }
            inner.idle.counters().record_cleaned(1);
            target.cleaned.fetch_add(1, Ordering::Relaxed);
        }
        let permit = inner.wait_for_slot(&key, &target, slot_deadline).await?;
        let tcp = inner.dialer.connect(address).await?;
        inner.idle.counters().record_new();
        target.created.fetch_add(1, Ordering::Relaxed);
        let slot = Slot::checked_out(permit, inner, &target);
        inner.refill_soon(&key, &target);
        Ok(Outbound { tcp, reused: false, _slot: slot })
    }

    /// Dials warm connections for `address` now (start-up `--warmup`).
    pub fn warm_up(&self, address: &Address) {
        let (key, target) = self.inner.target(address);
        target.last_demand_ms.store(self.inner.now_ms(), Ordering::Relaxed);
        self.inner.refill_soon(&key, &target);
    }

    /// Closes expired warm connections, lets quiet targets go, and tops up the
    /// targets still in use. Call periodically.
    pub fn maintain(&self) {
        let inner = &self.inner;
        let expired = inner.idle.sweep(Instant::now());
        let quiet_after = inner.settings.max_idle_time.as_millis() as u64;
        let now = inner.now_ms();
        let mut targets = inner.targets.lock().expect("targets lock");
        for (key, _) in &expired {
            if let Some(target) = targets.get(key) {
                target.cleaned.fetch_add(1, Ordering::Relaxed);
            }
        }
        drop(expired);
        targets.retain(|key, target| {
            let quiet = now.saturating_sub(target.last_demand_ms.load(Ordering::Relaxed)) > quiet_after;
            let unused = target.slots.available_permits() == inner.settings.max_per_target;
            if !quiet {
                inner.refill_soon(key, target);
            }
            // Forget a target only when nothing of it is left, so its limit holds.
            !(quiet && unused)
        });
    }

    /// Closes every warm connection (shutdown).
    pub fn close_idle(&self) -> usize {
        self.inner.idle.drain().len()
    }

    pub fn stats(&self) -> PoolStatsSnapshot {
        self.inner.idle.counters().snapshot()
    }

    pub fn warmed(&self) -> u64 {
        self.inner.warmed.load(Ordering::Relaxed)
    }

    /// Warm connections per target.
    pub fn idle_by_target(&self) -> Vec<(PoolKey, usize)> {
        self.inner.idle.idle_by_key()
    }

    pub fn idle_count(&self, address: &Address) -> usize {
        self.inner.idle.idle_count(&address.to_string().into())
    }

    /// Used connections closed when their stream ended.
    pub fn ended(&self) -> u64 {
        self.inner.ended.load(Ordering::Relaxed)
    }

    /// Counters of every target the pool tracks (those used within the idle window),
    /// sorted by target.
    pub fn per_target_stats(&self) -> Vec<KeyStats> {
        let targets: Vec<(PoolKey, Arc<Target>)> = {
            let targets = self.inner.targets.lock().expect("targets lock");
            targets.iter().map(|(key, target)| (key.clone(), target.clone())).collect()
        };
        let mut stats: Vec<KeyStats> = targets
            .into_iter()
            .map(|(key, target)| KeyStats {
                idle: self.inner.idle.idle_count(&key) as u64,
                active: target.active.load(Ordering::Relaxed),
                created: target.created.load(Ordering::Relaxed),
                reused: target.reused.load(Ordering::Relaxed),
                cleaned: target.cleaned.load(Ordering::Relaxed),
                waiters: target.waiters.load(Ordering::Relaxed) as u64,
                key,
            })
            .collect();
        stats.sort_by(|a, b| a.key.cmp(&b.key));
        stats
    }
}

impl crate::api::PoolSource for OutboundPool {
    fn connection_pool_stats(&self) -> crate::api::stats::ConnectionPoolStats {
        let s = self.stats();
        let warmed = self.warmed();
        crate::api::stats::ConnectionPoolStats {
            pool: "outbound",
            pool_type: self.settings().pool_type.to_string(),
            total_created: s.new + warmed,
            total_reused: s.reused,
            total_closed: s.cleaned + self.ended(),
            current_active: s.active,
            current_idle: s.idle,
            cache_hits: s.reused,
            cache_misses: s.new,
            hit_rate: crate::api::stats::hit_rate(s.reused, s.new),
            warmed,
            targets: self.per_target_stats().into_iter().map(Into::into).collect(),
        }
    }
}

impl Inner {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn target(&self, address: &Address) -> (PoolKey, Arc<Target>) {
        let key: PoolKey = address.to_string().into();
        let mut targets = self.targets.lock().expect("targets lock");
        let target = targets.entry(key.clone()).or_insert_with(|| {
            Arc::new(Target {
                address: address.clone(),
                slots: Arc::new(Semaphore::new(self.settings.max_per_target)),
                waiters: AtomicUsize::new(0),
                last_demand_ms: AtomicU64::new(0),
                refilling: AtomicBool::new(false),
                created: AtomicU64::new(0),
                reused: AtomicU64::new(0),
                cleaned: AtomicU64::new(0),
                active: AtomicU64::new(0),
            })
        });
        (key, target.clone())
    }

    /// A slot for a new connection; waits in FIFO order until `deadline` when the
    /// target is full, and refuses at once when too many already wait.
    async fn wait_for_slot(
        &self,
        key: &PoolKey,
        target: &Target,
        deadline: tokio::time::Instant,
    ) -> Result<OwnedSemaphorePermit, AcquireError> {
        if let Ok(permit) = target.slots.clone().try_acquire_owned() {
            return Ok(permit);
        }
        let exhausted = || AcquireError::Exhausted(key.to_string());
        if target.waiters.fetch_add(1, Ordering::AcqRel) >= self.settings.max_waiters_per_target {
            target.waiters.fetch_sub(1, Ordering::AcqRel);
            return Err(exhausted());
        }
        let deadline = deadline.min(tokio::time::Instant::now() + self.dialer.connect_timeout);
        let waited = tokio::time::timeout_at(deadline, target.slots.clone().acquire_owned()).await;
        target.waiters.fetch_sub(1, Ordering::AcqRel);
        match waited {
            Ok(Ok(permit)) => Ok(permit),
            _ => {
                log::warn!("outbound pool for {key} exhausted ({} connections)", self.settings.max_per_target);
                Err(exhausted())
            }
        }
    }

    /// Starts a background refill of `key`'s warm connections unless one is running.
    fn refill_soon(self: &Arc<Self>, key: &PoolKey, target: &Arc<Target>) {
        if self.settings.min_idle == 0 || self.idle.idle_count(key) >= self.settings.min_idle {
            return;
        }
        if target.refilling.swap(true, Ordering::AcqRel) {
            return;
        }
        let (pool, key, target) = (self.clone(), key.clone(), target.clone());
        tokio::spawn(async move {
            pool.refill(&key, &target).await;
            target.refilling.store(false, Ordering::Release);
        });
    }

    async fn refill(&self, key: &PoolKey, target: &Target) {
        while self.idle.idle_count(key) < self.settings.min_idle {
            // Warm connections never take the slot a waiting stream needs.
            if target.waiters.load(Ordering::Acquire) > 0 {
                return;
            }
            let Ok(permit) = target.slots.clone().try_acquire_owned() else { return };
            match self.dialer.connect(&target.address).await {
                Ok(tcp) => {
                    self.warmed.fetch_add(1, Ordering::Relaxed);
                    target.created.fetch_add(1, Ordering::Relaxed);
                    if self.idle.give(key, Idle::new(WarmConnection { tcp, permit })).is_err() {
                        return; // the global idle cap is reached
                    }
                }
                Err(err) => {
                    log::debug!("warming {key}: {err}");
                    return;
                }
            }
        }
    }
}

/// Whether an idle connection is still usable, without waiting: closed or reset by
/// the peer means dead; bytes already waiting (a greeting) are fine and stay queued
/// for the client.
fn is_alive(tcp: &TcpStream) -> bool {
    let mut probe = [0u8; 1];
    let mut buf = tokio::io::ReadBuf::new(&mut probe);
    let mut cx = Context::from_waker(Waker::noop());
    match tcp.poll_peek(&mut cx, &mut buf) {
        Poll::Pending => true,
        Poll::Ready(Ok(n)) => n > 0,
        Poll::Ready(Err(_)) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn settings(pool_type: PoolType, max_per_target: usize, min_idle: usize) -> OutboundSettings {
        OutboundSettings {
            pool_type,
            max_per_target,
            min_idle,
            max_idle_total: 64,
            max_idle_time: Duration::from_secs(60),
            max_lifetime: Duration::from_secs(600),
            max_waiters_per_target: 4,
        }
    }

    fn pool(settings: OutboundSettings) -> OutboundPool {
        OutboundPool::new(settings, Dialer { connect_timeout: Duration::from_millis(500) })
    }

    /// A target that accepts and keeps every connection, counting them.
    async fn holding_target() -> (Address, Arc<Mutex<Vec<TcpStream>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = Address::socket(listener.local_addr().unwrap());
        let held = Arc::new(Mutex::new(Vec::new()));
        let sink = held.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                sink.lock().unwrap().push(tcp);
            }
        });
        (address, held)
    }

    async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    const ENGINES: [PoolType; 3] = [PoolType::Lock, PoolType::LockFree, PoolType::HighPerf];

    #[tokio::test]
    async fn repeated_streams_are_served_warm_and_never_reuse_a_used_connection() {
        for engine in ENGINES {
            let (address, _held) = holding_target().await;
            let pool = pool(settings(engine, 10, 2));
            let first = pool.acquire(&address).await.unwrap();
            assert!(!first.reused);
            drop(first); // closed, never pooled
            for _ in 0..5 {
                wait_until("warm connections", || pool.idle_count(&address) >= 1).await;
                let outbound = pool.acquire(&address).await.unwrap();
                assert!(outbound.reused, "{engine}: served warm");
            }
            let stats = pool.stats();
            assert_eq!((stats.new, stats.reused), (1, 5), "{engine}");
            wait_until("refill to the minimum", || pool.idle_count(&address) == 2).await;
            let [target] = pool.per_target_stats().try_into().expect("one target");
            assert_eq!(target.key.as_ref(), address.to_string(), "{engine}");
            assert_eq!((target.reused, target.active, target.idle, target.waiters), (5, 0, 2, 0), "{engine}");
            assert_eq!(target.created, 1 + pool.warmed(), "{engine}: on demand + warm");
            assert_eq!(pool.ended(), 6, "{engine}: every used connection was closed");
        }
    }

    #[tokio::test]
    async fn a_closed_warm_connection_is_cleaned_not_handed_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = Address::socket(listener.local_addr().unwrap());
        let pool = pool(settings(PoolType::LockFree, 10, 1));
        pool.warm_up(&address);
        let (accepted, _) = listener.accept().await.unwrap();
        wait_until("warm connection", || pool.idle_count(&address) == 1).await;
        drop(accepted); // the target closes it while idle
        tokio::time::sleep(Duration::from_millis(50)).await;
        let server = tokio::spawn(async move { listener.accept().await.unwrap() });
        let outbound = pool.acquire(&address).await.unwrap();
        assert!(!outbound.reused);
        assert_eq!(pool.stats().cleaned, 1);
        drop(server);
    }

    #[tokio::test]
    async fn a_greeting_waiting_on_a_warm_connection_reaches_the_stream() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = Address::socket(listener.local_addr().unwrap());
        let pool = pool(settings(PoolType::Lock, 10, 1));
        pool.warm_up(&address);
        let (mut accepted, _) = listener.accept().await.unwrap();
        accepted.write_all(b"220 hello\r\n").await.unwrap();
        wait_until("warm connection", || pool.idle_count(&address) == 1).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut outbound = pool.acquire(&address).await.unwrap();
        assert!(outbound.reused);
        let mut greeting = [0u8; 11];
        outbound.tcp.read_exact(&mut greeting).await.unwrap();
        assert_eq!(&greeting, b"220 hello\r\n");
    }

    #[tokio::test]
    async fn a_full_target_makes_streams_wait_then_fail_with_a_clear_error() {
        let (address, _held) = holding_target().await;
        let pool = pool(settings(PoolType::HighPerf, 2, 0));
        let a = pool.acquire(&address).await.unwrap();
        let _b = pool.acquire(&address).await.unwrap();
        // A waiter gets the slot as soon as one frees.
        let waiter = {
            let (pool, address) = (pool.clone(), address.clone());
            tokio::spawn(async move { pool.acquire(&address).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(a);
        let _c = waiter.await.unwrap().unwrap();
        // With nothing freed, the wait ends at the connect timeout.
        let started = Instant::now();
        let err = pool.acquire(&address).await.err().unwrap();
        assert_eq!(err.to_string(), format!("outbound pool for {address} exhausted"));
        assert!(started.elapsed() >= Duration::from_millis(400));
    }

    #[tokio::test]
    async fn waiters_beyond_the_cap_fail_at_once() {
        let (address, _held) = holding_target().await;
        let pool = pool(settings(PoolType::Lock, 1, 0));
        let _only = pool.acquire(&address).await.unwrap();
        let mut waiting = Vec::new();
        for _ in 0..4 {
            let (pool, address) = (pool.clone(), address.clone());
            waiting.push(tokio::spawn(async move { pool.acquire(&address).await.is_ok() }));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = Instant::now();
        assert!(pool.acquire(&address).await.is_err());
        assert!(started.elapsed() < Duration::from_millis(100), "refused without waiting");
        for waiter in waiting {
            assert!(!waiter.await.unwrap());
        }
    }

    #[tokio::test]
    async fn idle_connections_expire_and_quiet_targets_are_let_go() {
        let (address, held) = holding_target().await;
        let mut short = settings(PoolType::LockFree, 10, 3);
        short.max_idle_time = Duration::from_millis(200);
        let pool = pool(short);
        drop(pool.acquire(&address).await.unwrap());
        wait_until("warm connections", || pool.idle_count(&address) == 3).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        pool.maintain();
        assert_eq!(pool.idle_count(&address), 0);
        assert_eq!(pool.stats().cleaned, 3);
        // The target went quiet: no refill.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(pool.idle_count(&address), 0);
        assert_eq!(held.lock().unwrap().len(), 4);
    }

    #[tokio::test]
    async fn a_dead_target_reports_the_dial_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = Address::socket(listener.local_addr().unwrap());
        drop(listener);
        let pool = pool(settings(PoolType::Lock, 10, 2));
        let err = pool.acquire(&address).await.err().unwrap();
        assert!(err.to_string().contains("connection refused"), "{err}");
        assert_eq!(pool.stats().active, 0);
    }
}
