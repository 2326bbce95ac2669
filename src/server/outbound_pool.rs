//! The server's outbound pool: warm TCP connections per target, dialed ahead of
//! demand once a target shows repeated demand.
//!
//! Safety rule: a connection that has carried one client's stream is never handed
//! to another (it holds that client's TLS or HTTP state); it is closed when its
//! stream ends. What the pool hands out are warm connections: dialed, never used.
//!
//! - **Never refuses.** `max_per_target` bounds what the pool *manages* for a target
//!   (connections in use that it dialed, warm ones, warm dials in flight). A stream
//!   beyond it is dialed unpooled: a plain connection, counted as `unpooled`. So no
//!   user can exhaust a target for the others; they all still get through.
//! - **Warming pays for itself.** A target is warmed only from its second stream within
//!   the idle window, and its warm set follows its observed rate (streams in the last
//!   window, minus one), never above `min_idle`. Warm connections closed unused are
//!   counted. All warm connections, idle or being dialed, stay within `max_idle_total`.
//! - **A warm connection whose peer has closed is never handed out**, even when a
//!   greeting is queued in front of the FIN (see [`is_alive`]).
//! - Names are resolved once per target name per [`super::dial::NAME_TTL`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use super::dial::{DialError, Dialer, NameCache};
use crate::pool::{Idle, IdlePool, KeyStats, PoolKey, PoolSettings, PoolStatsSnapshot, PoolType, new_pool};
use crate::proto::Address;

/// Limits of the outbound pool, from the command line.
#[derive(Debug, Clone)]
pub struct OutboundSettings {
    pub pool_type: PoolType,
    /// Connections the pool manages per target (in use + warm + warming); streams
    /// beyond it are dialed unpooled, never refused.
    pub max_per_target: usize,
    /// Warm connections kept at most per busy target.
    pub min_idle: usize,
    /// Warm connections across all targets, idle or being dialed: a hard cap (it bounds
    /// the file descriptors warming may spend).
    pub max_idle_total: usize,
    pub max_idle_time: Duration,
    pub max_lifetime: Duration,
}

/// A connection handed to one stream. Dropping it closes the connection and gives
/// back its place under the target's limit.
pub struct Outbound {
    pub tcp: TcpStream,
    /// Whether it came warm from the pool.
    pub reused: bool,
    /// Whether the pool manages it (false: dialed beyond the per-target limit).
    pub pooled: bool,
    _slot: Slot,
}

/// A stream's hold on its target: keeps the Active gauges and the managed count honest.
struct Slot {
    target: Arc<Target>,
    shared: Arc<Shared>,
    pooled: bool,
}

impl Slot {
    fn checked_out(target: &Arc<Target>, shared: &Arc<Shared>, pooled: bool) -> Slot {
        shared.active.fetch_add(1, Ordering::Relaxed);
        target.active.fetch_add(1, Ordering::Relaxed);
        Slot { target: target.clone(), shared: shared.clone(), pooled }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.shared.active.fetch_sub(1, Ordering::Relaxed);
        self.target.active.fetch_sub(1, Ordering::Relaxed);
        // The connection is closed with its stream (never reused).
        self.shared.ended.fetch_add(1, Ordering::Relaxed);
        if self.pooled {
            self.target.managed.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A warm connection, parked in the engine. It holds a place under its target's limit
/// and under the global warm cap; dropping it unused (expired, dead, refused by a full
/// pool, shutdown) gives both back and counts it as closed unused.
struct WarmConnection {
    tcp: TcpStream,
    ticket: WarmTicket,
}

struct WarmTicket {
    target: Arc<Target>,
    shared: Arc<Shared>,
    /// Set once a connection exists: only then is dropping the ticket "closed unused".
    dialed: bool,
    /// Set when a stream took the connection and, with it, the place under the limit.
    handed_over: bool,
}

impl WarmTicket {
    fn new(target: &Arc<Target>, shared: &Arc<Shared>) -> WarmTicket {
        WarmTicket { target: target.clone(), shared: shared.clone(), dialed: false, handed_over: false }
    }

    /// The warm connection goes to a stream: its place under the global warm cap is
    /// freed (on drop), its place under the target's limit passes to the stream's slot.
    fn into_slot(mut self) -> Slot {
        self.handed_over = true;
        Slot::checked_out(&self.target, &self.shared, true)
    }
}

impl Drop for WarmTicket {
    fn drop(&mut self) {
        self.shared.warm.fetch_sub(1, Ordering::Relaxed);
        if self.handed_over {
            return;
        }
        self.target.managed.fetch_sub(1, Ordering::Relaxed);
        if self.dialed {
            self.shared.unused.fetch_add(1, Ordering::Relaxed);
            self.target.unused.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One target's state: its limit, its demand and its counters.
struct Target {
    address: Address,
    /// Connections the pool manages for this target: in use (pooled), warm, warming.
    managed: AtomicU64,
    demand: Demand,
    refilling: AtomicBool,
    /// For the API: dialed on demand, served warm, cleaned, in use, dialed unpooled,
    /// dialed warm, warm ones closed unused.
    created: AtomicU64,
    reused: AtomicU64,
    cleaned: AtomicU64,
    active: AtomicU64,
    unpooled: AtomicU64,
    warmed: AtomicU64,
    unused: AtomicU64,
}

/// Streams per window (the idle window): the current one and the one before.
/// Races between threads rotating at the same moment may lose a count; the result
/// only sizes a warm set.
#[derive(Default)]
struct Demand {
    window_start_ms: AtomicU64,
    this_window: AtomicU64,
    last_window: AtomicU64,
    last_ms: AtomicU64,
}

impl Demand {
    fn record(&self, now_ms: u64, window_ms: u64) {
        self.rotate(now_ms, window_ms);
        self.this_window.fetch_add(1, Ordering::Relaxed);
        self.last_ms.store(now_ms, Ordering::Relaxed);
    }

    fn rotate(&self, now_ms: u64, window_ms: u64) {
        let start = self.window_start_ms.load(Ordering::Relaxed);
        let elapsed = now_ms.saturating_sub(start);
        if elapsed < window_ms.max(1) {
            return;
        }
        if self.window_start_ms.compare_exchange(start, now_ms, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            let finished = self.this_window.swap(0, Ordering::Relaxed);
            // A window with no stream in between means the rate is now zero.
            let previous = if elapsed < 2 * window_ms.max(1) { finished } else { 0 };
            self.last_window.store(previous, Ordering::Relaxed);
        }
    }

    /// Streams per window, as the busier of the current and the last window.
    fn rate(&self, now_ms: u64, window_ms: u64) -> u64 {
        self.rotate(now_ms, window_ms);
        self.this_window.load(Ordering::Relaxed).max(self.last_window.load(Ordering::Relaxed))
    }

    fn last_ms(&self) -> u64 {
        self.last_ms.load(Ordering::Relaxed)
    }
}

/// Counters shared by the pool and the connections it hands out.
#[derive(Default)]
struct Shared {
    active: AtomicU64,
    /// Warm connections idle or being dialed: the number `max_idle_total` caps.
    warm: AtomicU64,
    warmed: AtomicU64,
    unused: AtomicU64,
    unpooled: AtomicU64,
    ended: AtomicU64,
}

struct Inner {
    settings: OutboundSettings,
    dialer: Dialer,
    names: NameCache,
    idle: Arc<dyn IdlePool<WarmConnection>>,
    targets: Mutex<HashMap<PoolKey, Arc<Target>>>,
    shared: Arc<Shared>,
    epoch: Instant,
}

/// Cheap to clone; clones share the pool.
#[derive(Clone)]
pub struct OutboundPool {
    inner: Arc<Inner>,
}

/// Claims one of `max` places on `count`; never overshoots, even for a moment.
fn reserve(count: &AtomicU64, max: usize) -> bool {
    count.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n < max as u64).then_some(n + 1)).is_ok()
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
            names: NameCache::default(),
            targets: Mutex::new(HashMap::new()),
            shared: Arc::default(),
            epoch: Instant::now(),
        };
        OutboundPool { inner: Arc::new(inner) }
    }

    pub fn settings(&self) -> &OutboundSettings {
        &self.inner.settings
    }

    /// A connection to `address` for one stream: a live warm one if there is one, else
    /// a new dial — pooled while the target is under its limit, unpooled beyond it.
    /// Only the dial itself can fail.
    pub async fn acquire(&self, address: &Address) -> Result<Outbound, DialError> {
        let inner = &self.inner;
        let (key, target) = inner.target(address);
        target.demand.record(inner.now_ms(), inner.window_ms());
        while let Some(entry) = inner.idle.take(&key) {
            let WarmConnection { tcp, ticket } = entry.value;
            if is_alive(&tcp) {
                target.reused.fetch_add(1, Ordering::Relaxed);
                let slot = ticket.into_slot();
                inner.refill_soon(&key, &target);
                return Ok(Outbound { tcp, reused: true, pooled: true, _slot: slot });
            }
            inner.idle.counters().record_cleaned(1);
            target.cleaned.fetch_add(1, Ordering::Relaxed);
        }
        let pooled = reserve(&target.managed, inner.settings.max_per_target);
        let tcp = match inner.dialer.connect_with(address, Some(&inner.names)).await {
            Ok(tcp) => tcp,
            Err(err) => {
                if pooled {
                    target.managed.fetch_sub(1, Ordering::Relaxed);
                }
                return Err(err);
            }
        };
        if pooled {
            inner.idle.counters().record_new();
            target.created.fetch_add(1, Ordering::Relaxed);
        } else {
            inner.shared.unpooled.fetch_add(1, Ordering::Relaxed);
            target.unpooled.fetch_add(1, Ordering::Relaxed);
            log::debug!("{key}: over {} pooled connections: dialed unpooled", inner.settings.max_per_target);
        }
        let slot = Slot::checked_out(&target, &inner.shared, pooled);
        inner.refill_soon(&key, &target);
        Ok(Outbound { tcp, reused: false, pooled, _slot: slot })
    }

    /// Dials warm connections for `address` now (start-up `--warmup`): the target counts
    /// as busy enough for `min_idle` of them.
    pub fn warm_up(&self, address: &Address) {
        let (key, target) = self.inner.target(address);
        let now = self.inner.now_ms();
        for _ in 0..=self.inner.settings.min_idle {
            target.demand.record(now, self.inner.window_ms());
        }
        self.inner.refill_soon(&key, &target);
    }

    /// Closes expired warm connections, lets quiet targets go, and tops up the
    /// targets still in use. Call periodically.
    pub fn maintain(&self) {
        let inner = &self.inner;
        let expired = inner.idle.sweep(Instant::now());
        let quiet_after = inner.window_ms();
        let now = inner.now_ms();
        let mut targets = inner.targets.lock().expect("targets lock");
        for (key, _) in &expired {
            if let Some(target) = targets.get(key) {
                target.cleaned.fetch_add(1, Ordering::Relaxed);
            }
        }
        drop(expired);
        targets.retain(|key, target| {
            let quiet = now.saturating_sub(target.demand.last_ms()) > quiet_after;
            let unused = target.managed.load(Ordering::Relaxed) == 0;
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
        let mut s = self.inner.idle.counters().snapshot();
        s.active = self.inner.shared.active.load(Ordering::Relaxed);
        s
    }

    /// Warm connections dialed ahead of demand.
    pub fn warmed(&self) -> u64 {
        self.inner.shared.warmed.load(Ordering::Relaxed)
    }

    /// Warm connections closed without ever carrying a stream.
    pub fn unused(&self) -> u64 {
        self.inner.shared.unused.load(Ordering::Relaxed)
    }

    /// Streams dialed beyond the per-target limit, outside the pool.
    pub fn unpooled(&self) -> u64 {
        self.inner.shared.unpooled.load(Ordering::Relaxed)
    }

    /// Name lookups sent to the system resolver.
    pub fn lookups(&self) -> u64 {
        self.inner.names.lookups()
    }

    /// Warm connections idle or being dialed now (what `max_idle_total` caps).
    pub fn warm_now(&self) -> u64 {
        self.inner.shared.warm.load(Ordering::Relaxed)
    }

    /// What the `[Pool Stats]` line appends after its standard fields.
    pub fn stats_line_extra(&self) -> String {
        format!(
            ", Warmed: {}, Unused: {}, Unpooled: {}, Lookups: {}",
            self.warmed(),
            self.unused(),
            self.unpooled(),
            self.lookups()
        )
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
        self.inner.shared.ended.load(Ordering::Relaxed)
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
                waiters: 0,
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

    /// The idle window: how long a target's demand is remembered.
    fn window_ms(&self) -> u64 {
        self.settings.max_idle_time.as_millis() as u64
    }

    fn target(&self, address: &Address) -> (PoolKey, Arc<Target>) {
        let key: PoolKey = address.to_string().into();
        let mut targets = self.targets.lock().expect("targets lock");
        let target = targets.entry(key.clone()).or_insert_with(|| {
            Arc::new(Target {
                address: address.clone(),
                managed: AtomicU64::new(0),
                demand: Demand::default(),
                refilling: AtomicBool::new(false),
                created: AtomicU64::new(0),
                reused: AtomicU64::new(0),
                cleaned: AtomicU64::new(0),
                active: AtomicU64::new(0),
                unpooled: AtomicU64::new(0),
                warmed: AtomicU64::new(0),
                unused: AtomicU64::new(0),
            })
        });
        (key, target.clone())
    }

    /// How many warm connections `target` deserves now: one less than its streams per
    /// window (so a target seen once gets none), at most `min_idle`.
    fn warm_goal(&self, target: &Target) -> usize {
        let rate = target.demand.rate(self.now_ms(), self.window_ms());
        (rate.saturating_sub(1) as usize).min(self.settings.min_idle)
    }

    /// Starts a background refill of `key`'s warm connections unless one is running.
    fn refill_soon(self: &Arc<Self>, key: &PoolKey, target: &Arc<Target>) {
        if self.idle.idle_count(key) >= self.warm_goal(target) {
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

    async fn refill(&self, key: &PoolKey, target: &Arc<Target>) {
        while self.idle.idle_count(key) < self.warm_goal(target) {
            // A warm dial takes a place under the target's limit and under the global cap
            // before it starts, so dials in flight count against both.
            if !reserve(&target.managed, self.settings.max_per_target) {
                return;
            }
            if !reserve(&self.shared.warm, self.settings.max_idle_total) {
                target.managed.fetch_sub(1, Ordering::Relaxed);
                return;
            }
            let mut ticket = WarmTicket::new(target, &self.shared);
            match self.dialer.connect_with(&target.address, Some(&self.names)).await {
                Ok(tcp) => {
                    ticket.dialed = true;
                    self.shared.warmed.fetch_add(1, Ordering::Relaxed);
                    target.warmed.fetch_add(1, Ordering::Relaxed);
                    target.created.fetch_add(1, Ordering::Relaxed);
                    if self.idle.give(key, Idle::new(WarmConnection { tcp, ticket })).is_err() {
                        return; // the per-target idle cap is reached
                    }
                }
                Err(err) => {
                    drop(ticket); // gives back both places; nothing was dialed
                    log::debug!("warming {key}: {err}");
                    return;
                }
            }
        }
    }
}

/// Whether an idle connection is still usable, without waiting. The TCP state comes
/// first: a peer that sent FIN moves the socket to CLOSE_WAIT even when a greeting it
/// sent before is still queued, which a peek would mistake for life. Then a peek: closed
/// or reset means dead; bytes waiting (a greeting) are fine and stay queued for the client.
fn is_alive(tcp: &TcpStream) -> bool {
    if peer_has_closed(tcp) {
        return false;
    }
    let mut probe = [0u8; 1];
    let mut buf = tokio::io::ReadBuf::new(&mut probe);
    let mut cx = Context::from_waker(Waker::noop());
    match tcp.poll_peek(&mut cx, &mut buf) {
        Poll::Pending => true,
        Poll::Ready(Ok(n)) => n > 0,
        Poll::Ready(Err(_)) => false,
    }
}

/// Whether the socket has left ESTABLISHED (CLOSE_WAIT after the peer's FIN, CLOSE after
/// a reset), read with `getsockopt(TCP_INFO)`.
#[cfg(target_os = "linux")]
fn peer_has_closed(tcp: &TcpStream) -> bool {
    use std::os::fd::AsRawFd;
    /// `TCP_ESTABLISHED` from the kernel's `include/net/tcp_states.h`.
    const TCP_ESTABLISHED: u8 = 1;
    // SAFETY: tcp_info is plain old data, so all-zero is a valid value; getsockopt writes
    // at most `len` bytes into it and reports how many.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            tcp.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    rc == 0 && info.tcpi_state != TCP_ESTABLISHED
}

/// Elsewhere only the peek is available.
#[cfg(not(target_os = "linux"))]
fn peer_has_closed(_tcp: &TcpStream) -> bool {
    false
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
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert_eq!(pool.idle_count(&address), 0, "{engine}: a target seen once is not warmed");
            drop(pool.acquire(&address).await.unwrap());
            for _ in 0..5 {
                wait_until("warm connections", || pool.idle_count(&address) >= 1).await;
                let outbound = pool.acquire(&address).await.unwrap();
                assert!(outbound.reused, "{engine}: served warm");
            }
            let stats = pool.stats();
            assert_eq!((stats.new, stats.reused), (2, 5), "{engine}");
            wait_until("refill to the minimum", || pool.idle_count(&address) == 2).await;
            let [target] = pool.per_target_stats().try_into().expect("one target");
            assert_eq!(target.key.as_ref(), address.to_string(), "{engine}");
            assert_eq!((target.reused, target.active, target.idle), (5, 0, 2), "{engine}");
            assert_eq!(target.created, 2 + pool.warmed(), "{engine}: on demand + warm");
            assert_eq!(pool.ended(), 7, "{engine}: every used connection was closed");
            assert_eq!(pool.unused(), 0, "{engine}");
        }
    }

    #[tokio::test]
    async fn streams_beyond_the_per_target_limit_are_dialed_unpooled_never_refused() {
        for engine in ENGINES {
            let (address, held) = holding_target().await;
            let pool = pool(settings(engine, 2, 0));
            let dials = (0..10).map(|_| pool.acquire(&address));
            let streams: Vec<Outbound> =
                futures_util::future::join_all(dials).await.into_iter().map(|r| r.expect("never refused")).collect();
            assert_eq!(streams.iter().filter(|s| s.pooled).count(), 2, "{engine}");
            assert_eq!(pool.unpooled(), 8, "{engine}");
            assert_eq!(pool.stats().active, 10, "{engine}");
            wait_until("all connected", || held.lock().unwrap().len() == 10).await;
            drop(streams);
            assert_eq!(pool.stats().active, 0, "{engine}");
            // The places came back: the next stream is pooled again.
            assert!(pool.acquire(&address).await.unwrap().pooled, "{engine}");
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
        assert_eq!((pool.stats().cleaned, pool.unused()), (1, 1));
        drop(server);
    }

    #[tokio::test]
    async fn a_warm_connection_closed_after_a_greeting_is_not_handed_out() {
        for engine in ENGINES {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let address = Address::socket(listener.local_addr().unwrap());
            let pool = pool(settings(engine, 10, 1));
            pool.warm_up(&address);
            let (mut accepted, _) = listener.accept().await.unwrap();
            wait_until("warm connection", || pool.idle_count(&address) == 1).await;
            // SMTP-style: a greeting, then the idle connection is closed. The FIN sits
            // behind the greeting in the receive queue.
            accepted.write_all(b"220 hello\r\n").await.unwrap();
            drop(accepted);
            tokio::time::sleep(Duration::from_millis(50)).await;
            let server = tokio::spawn(async move { listener.accept().await.unwrap() });
            let outbound = pool.acquire(&address).await.unwrap();
            assert!(!outbound.reused, "{engine}: a closed connection was handed out");
            assert_eq!(pool.stats().cleaned, 1, "{engine}");
            drop(server);
        }
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
    async fn warm_connections_in_all_never_exceed_the_total_cap_even_while_dialing() {
        let mut capped = settings(PoolType::HighPerf, 10, 5);
        capped.max_idle_total = 3;
        let pool = pool(capped);
        let mut targets = Vec::new();
        for _ in 0..4 {
            let (address, held) = holding_target().await;
            // Six streams each: every target would like five warm connections.
            for _ in 0..6 {
                drop(pool.acquire(&address).await.unwrap());
                assert!(pool.warm_now() <= 3, "warm connections (idle or dialing) over the cap");
            }
            targets.push((address, held));
        }
        let deadline = Instant::now() + Duration::from_millis(300);
        while Instant::now() < deadline {
            assert!(pool.warm_now() <= 3, "warm connections (idle or dialing) over the cap");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let idle: usize = targets.iter().map(|(address, _)| pool.idle_count(address)).sum();
        assert_eq!((idle, pool.warm_now()), (3, 3));
    }

    #[tokio::test]
    async fn idle_connections_expire_are_counted_unused_and_quiet_targets_are_let_go() {
        let (address, held) = holding_target().await;
        let mut short = settings(PoolType::LockFree, 10, 3);
        short.max_idle_time = Duration::from_millis(200);
        let pool = pool(short);
        for _ in 0..4 {
            drop(pool.acquire(&address).await.unwrap());
        }
        wait_until("warm connections", || pool.idle_count(&address) == 3).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        pool.maintain();
        assert_eq!(pool.idle_count(&address), 0);
        assert_eq!((pool.stats().cleaned, pool.unused()), (3, 3));
        // The target went quiet: no refill, and it is forgotten.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(pool.idle_count(&address), 0);
        assert!(pool.per_target_stats().is_empty());
        assert_eq!(held.lock().unwrap().len(), 4 + 3);
    }

    #[tokio::test]
    async fn a_name_is_looked_up_once_for_many_streams() {
        let (address, _held) = holding_target().await;
        let by_name = Address::domain("localhost", address.port);
        let pool = pool(settings(PoolType::Lock, 10, 0));
        for _ in 0..5 {
            // localhost may resolve to ::1 first, where nothing listens; the lookup is
            // what is counted here.
            let _ = pool.acquire(&by_name).await;
        }
        assert_eq!(pool.lookups(), 1);
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
