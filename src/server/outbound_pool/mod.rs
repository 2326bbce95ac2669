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
//! - **Warming pays for itself.** A target is warmed only once its demand is repeated:
//!   a second stream within the idle window at least `warm_after` (1 s) after its first,
//!   or two streams that started after an earlier one had ended (the target came back). The
//!   connection refilled after a target's last stream is never used, so warming a target
//!   that came once for a burst (a page load's parallel connections, two requests sent
//!   together) would waste every connection it dials; a target that comes back, or keeps
//!   coming, wastes one per run. Its warm set follows its observed rate: it starts at
//!   one, grows by one each time a stream finds no warm connection ready (demand outpaced the set),
//!   and shrinks by one each time a warm connection is closed unused (expired, or found
//!   dead), never above `min_idle`. Sequential traffic thus keeps one warm connection,
//!   bursts get as many as they use. Warm connections closed unused are counted. All warm
//!   connections, idle or being dialed, stay within `max_idle_total`.
//! - **A warm connection whose peer has closed is never handed out**, even when a
//!   greeting is queued in front of the FIN (see [`is_alive`]).
//! - Names are resolved once per target name per [`super::dial::NAME_TTL`], in the one
//!   [`NameCache`] the outbound policy and UDP streams share ([`OutboundPool::names`]).
//!
//! Each target's state ([`Target`]: its limit count, demand and counters) lives in the
//! engine's slot for that target, keyed by [`Address`]: an acquire is one engine lookup,
//! with no lock of this module's own and no allocation once the target is known. Targets
//! quiet for the idle window with nothing in use are forgotten by [`OutboundPool::maintain`].
//!
//! This file is the pool itself: acquire, the warm connections' tickets, start-up warming
//! and maintenance. Beside it: `demand` decides when a target is warmed and how many warm
//! connections it keeps, `refill` dials them, and `stats` holds the counters, snapshots and
//! per-target statistics the log lines and the metrics room read.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use super::dial::{DialError, Dialer, LookupOwner, NameCache};
use crate::pool::{IdlePool, KeyCounters, PoolCounters, PoolSettings, PoolType, new_pool, reserve_slot};
use crate::proto::Address;

mod demand;
mod refill;
mod stats;

pub use demand::WarmDemand;

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
    /// How long a target's demand must have lasted (from its first stream) before it is
    /// warmed, unless it came back sooner (see `Demand::is_repeated`): streams that all
    /// come at once are one visit, not repeated demand.
    pub warm_after: Duration,
}

/// Default of [`OutboundSettings::warm_after`]: longer than a burst of parallel
/// connections, shorter than the gap between two visits of a returning client.
pub const DEFAULT_WARM_AFTER: Duration = Duration::from_secs(1);

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

impl Outbound {
    /// The connection, and its place under the target's limit and in the Active gauges:
    /// keep the place for as long as the connection is in use.
    pub fn into_parts(self) -> (TcpStream, PoolPlace) {
        (self.tcp, PoolPlace { _slot: self._slot })
    }
}

/// A stream's place in its target's counts, apart from its connection (see
/// [`Outbound::into_parts`]); dropping it gives the place back.
pub struct PoolPlace {
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
        shared.counters.record_checkout();
        KeyCounters::bump(&target.counters.active);
        Slot { target: target.clone(), shared: shared.clone(), pooled }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.shared.counters.record_checkin();
        KeyCounters::drop_one(&self.target.counters.active);
        self.target.demand.record_end();
        // The connection is closed with its stream (never reused).
        self.shared.counters.record_ended();
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
        target.warm.fetch_add(1, Ordering::Relaxed);
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
        self.target.warm.fetch_sub(1, Ordering::Relaxed);
        if self.handed_over {
            return;
        }
        self.target.managed.fetch_sub(1, Ordering::Relaxed);
        if self.dialed {
            // One warm connection more than the target used: the warm set shrinks.
            self.target.demand.shrink();
            self.shared.counters.record_unused();
            KeyCounters::bump(&self.target.counters.unused);
            KeyCounters::bump(&self.target.counters.cleaned);
        }
    }
}

/// One target's state, kept in the engine's slot for the target.
#[derive(Default)]
struct Target {
    /// Connections the pool manages for this target: in use (pooled), warm, warming.
    managed: AtomicU64,
    /// Warm connections of this target, idle or being dialed.
    warm: AtomicU64,
    /// Its demand and the warm set that earns.
    demand: WarmDemand,
    refilling: AtomicBool,
    /// Per target, `cleaned` counts warm connections closed unused (expired, dead).
    counters: KeyCounters,
}

/// What the pool counts beside the engine (which counts idle entries and the expired ones
/// a take drops): shared with every connection handed out, so a connection can count its
/// own end without reaching back into the pool.
#[derive(Default)]
struct Shared {
    counters: PoolCounters,
    /// Warm connections idle or being dialed: the number `max_idle_total` caps.
    warm: AtomicU64,
}

struct Inner {
    settings: OutboundSettings,
    dialer: Dialer,
    names: Arc<NameCache>,
    idle: Arc<dyn IdlePool<Address, Target, WarmConnection>>,
    shared: Arc<Shared>,
    epoch: Instant,
}

/// Cheap to clone; clones share the pool.
#[derive(Clone)]
pub struct OutboundPool {
    inner: Arc<Inner>,
}

impl OutboundPool {
    pub fn new(settings: OutboundSettings, dialer: Dialer) -> OutboundPool {
        let engine_settings = PoolSettings {
            max_idle_per_key: settings.min_idle.min(settings.max_per_target),
            max_idle_total: settings.max_idle_total,
            max_idle_time: settings.max_idle_time,
            max_lifetime: settings.max_lifetime,
        };
        let names = Arc::new(NameCache::for_dialer(&dialer));
        let inner = Inner {
            idle: new_pool(settings.pool_type, engine_settings),
            settings,
            dialer,
            names,
            shared: Arc::default(),
            epoch: Instant::now(),
        };
        OutboundPool { inner: Arc::new(inner) }
    }

    pub fn settings(&self) -> &OutboundSettings {
        &self.inner.settings
    }

    /// A connection to `address` for one stream: a live warm one if there is one, else
    /// a new dial — pooled while the target is under its limit, unpooled beyond it; a name
    /// it must look up is one of `owner`'s lookups. Only the dial itself can fail.
    pub async fn acquire(&self, address: &Address, owner: &LookupOwner) -> Result<Outbound, DialError> {
        let inner = &self.inner;
        let (target, mut found) = inner.idle.checkout(address, Instant::now());
        inner.size_warm_set(&target, found.is_some());
        while let Some(entry) = found {
            let WarmConnection { tcp, ticket } = entry.value;
            if is_alive(&tcp) {
                inner.shared.counters.record_reused();
                KeyCounters::bump(&target.counters.reused);
                let slot = ticket.into_slot();
                inner.refill_soon(address, &target);
                return Ok(Outbound { tcp, reused: true, pooled: true, _slot: slot });
            }
            // Dropping the ticket counts it closed unused.
            inner.shared.counters.record_cleaned(1);
            found = inner.idle.take(address);
        }
        let pooled = reserve_slot(&target.managed, inner.settings.max_per_target as u64);
        let tcp = match inner.dialer.connect_with(address, Some((&inner.names, owner))).await {
            Ok(tcp) => tcp,
            Err(err) => {
                if pooled {
                    target.managed.fetch_sub(1, Ordering::Relaxed);
                }
                return Err(err);
            }
        };
        if pooled {
            inner.shared.counters.record_new();
            KeyCounters::bump(&target.counters.created);
        } else {
            inner.shared.counters.record_unpooled();
            KeyCounters::bump(&target.counters.unpooled);
            log::debug!("{address}: over {} pooled connections: dialed unpooled", inner.settings.max_per_target);
        }
        let slot = Slot::checked_out(&target, &inner.shared, pooled);
        inner.refill_soon(address, &target);
        Ok(Outbound { tcp, reused: false, pooled, _slot: slot })
    }

    /// Dials warm connections for `address` now (start-up `--warmup`): the target counts
    /// as busy enough for `min_idle` of them.
    pub fn warm_up(&self, address: &Address) {
        let target = self.inner.idle.state(address);
        target.demand.warm_up(self.inner.now_ms(), self.inner.window_ms(), self.inner.settings.min_idle as u64);
        self.inner.refill_soon(address, &target);
    }

    /// Closes expired warm connections, forgets quiet targets with nothing in use, and
    /// tops up the targets still in use. Call periodically.
    pub fn maintain(&self) {
        let inner = &self.inner;
        let expired = inner.idle.sweep(Instant::now());
        inner.shared.counters.record_cleaned(expired.len() as u64);
        drop(expired); // each counts itself closed unused
        let (now, window) = (inner.now_ms(), inner.window_ms());
        let quiet = |target: &Target| now.saturating_sub(target.demand.last_ms()) > window;
        // Forget a target only when nothing of it is left, so its limit holds.
        inner.idle.forget_where(&|target| quiet(target) && target.managed.load(Ordering::Relaxed) == 0);
        for (address, target, _) in inner.idle.keys() {
            if !quiet(&target) {
                inner.refill_soon(&address, &target);
            }
        }
    }

    /// Closes every warm connection (shutdown).
    pub fn close_idle(&self) -> usize {
        self.inner.idle.drain().len()
    }

    /// The server's one name cache: the pool's dials, the outbound policy's checks and UDP
    /// streams all resolve through it, so every lookup is shared and counted.
    /// How the pool dials (timeouts, keepalive), for dials made beside it.
    pub fn dialer(&self) -> &Dialer {
        &self.inner.dialer
    }

    pub fn names(&self) -> &Arc<NameCache> {
        &self.inner.names
    }
}

impl Inner {
    pub(super) fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The idle window: how long a target's demand is remembered.
    pub(super) fn window_ms(&self) -> u64 {
        self.settings.max_idle_time.as_millis() as u64
    }
}

/// Whether an idle connection is still usable, without waiting. The TCP state comes
/// first: a peer that sent FIN moves the socket to CLOSE_WAIT even when a greeting it
/// sent before is still queued, which a peek would mistake for life. Then a peek: closed
/// or reset means dead; bytes waiting (a greeting) are fine and stay queued for the client.
fn is_alive(tcp: &TcpStream) -> bool {
    if crate::tcp_state::peer_closed(tcp) {
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

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use std::sync::Mutex;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    pub(super) fn settings(pool_type: PoolType, max_per_target: usize, min_idle: usize) -> OutboundSettings {
        OutboundSettings {
            pool_type,
            max_per_target,
            min_idle,
            max_idle_total: 64,
            max_idle_time: Duration::from_secs(60),
            max_lifetime: Duration::from_secs(600),
            warm_after: Duration::ZERO,
        }
    }

    pub(super) fn pool(settings: OutboundSettings) -> OutboundPool {
        OutboundPool::new(
            settings,
            Dialer {
                connect_timeout: Duration::from_millis(500),
                keepalive: Default::default(),
                strategy: Default::default(),
                resolver: Default::default(),
            },
        )
    }

    /// A target that accepts and keeps every connection, counting them.
    pub(super) async fn holding_target() -> (Address, Arc<Mutex<Vec<TcpStream>>>) {
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

    pub(super) async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub(super) const ENGINES: [PoolType; 3] = [PoolType::Lock, PoolType::LockFree, PoolType::HighPerf];

    #[tokio::test]
    async fn repeated_streams_are_served_warm_and_never_reuse_a_used_connection() {
        for engine in ENGINES {
            let (address, _held) = holding_target().await;
            let pool = pool(settings(engine, 10, 2));
            let first = pool.acquire(&address, pool.names().own()).await.unwrap();
            assert!(!first.reused);
            drop(first); // closed, never pooled
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert_eq!(pool.idle_count(&address), 0, "{engine}: a target seen once is not warmed");
            drop(pool.acquire(&address, pool.names().own()).await.unwrap());
            for _ in 0..5 {
                wait_until("warm connections", || pool.idle_count(&address) >= 1).await;
                let outbound = pool.acquire(&address, pool.names().own()).await.unwrap();
                assert!(outbound.reused, "{engine}: served warm");
            }
            let stats = pool.stats();
            assert_eq!((stats.new, stats.reused), (2, 5), "{engine}");
            wait_until("refill", || pool.idle_count(&address) == 1).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert_eq!(pool.idle_count(&address), 1, "{engine}: sequential streams keep one warm");
            let [target] = pool.per_target_stats().try_into().expect("one target");
            assert_eq!(target.key.as_ref(), address.to_string(), "{engine}");
            assert_eq!((target.reused, target.active, target.idle), (5, 0, 1), "{engine}");
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
            let dials = (0..10).map(|_| pool.acquire(&address, pool.names().own()));
            let streams: Vec<Outbound> =
                futures_util::future::join_all(dials).await.into_iter().map(|r| r.expect("never refused")).collect();
            assert_eq!(streams.iter().filter(|s| s.pooled).count(), 2, "{engine}");
            assert_eq!(pool.unpooled(), 8, "{engine}");
            assert_eq!(pool.stats().active, 10, "{engine}");
            wait_until("all connected", || held.lock().unwrap().len() == 10).await;
            drop(streams);
            assert_eq!(pool.stats().active, 0, "{engine}");
            // The places came back: the next stream is pooled again.
            assert!(pool.acquire(&address, pool.names().own()).await.unwrap().pooled, "{engine}");
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
        let outbound = pool.acquire(&address, pool.names().own()).await.unwrap();
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
            let outbound = pool.acquire(&address, pool.names().own()).await.unwrap();
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
        let mut outbound = pool.acquire(&address, pool.names().own()).await.unwrap();
        assert!(outbound.reused);
        let mut greeting = [0u8; 11];
        outbound.tcp.read_exact(&mut greeting).await.unwrap();
        assert_eq!(&greeting, b"220 hello\r\n");
    }

    #[tokio::test]
    async fn idle_connections_expire_are_counted_unused_and_quiet_targets_are_let_go() {
        let (address, held) = holding_target().await;
        let mut short = settings(PoolType::LockFree, 10, 3);
        short.max_idle_time = Duration::from_millis(200);
        let pool = pool(short);
        pool.warm_up(&address);
        wait_until("warm connections", || pool.idle_count(&address) == 3).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        pool.maintain();
        assert_eq!(pool.idle_count(&address), 0);
        assert_eq!((pool.stats().cleaned, pool.unused()), (3, 3));
        // The target went quiet: no refill, and it is forgotten.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(pool.idle_count(&address), 0);
        assert!(pool.per_target_stats().is_empty());
        assert_eq!(held.lock().unwrap().len(), 3);
    }

    #[tokio::test]
    async fn a_name_is_looked_up_once_for_many_streams() {
        let (address, _held) = holding_target().await;
        let by_name = Address::domain("localhost", address.port);
        let pool = pool(settings(PoolType::Lock, 10, 0));
        for _ in 0..5 {
            // localhost may resolve to ::1 first, where nothing listens; the lookup is
            // what is counted here.
            let _ = pool.acquire(&by_name, pool.names().own()).await;
        }
        assert_eq!(pool.lookups(), 1);
    }

    #[tokio::test]
    async fn a_dead_target_reports_the_dial_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = Address::socket(listener.local_addr().unwrap());
        drop(listener);
        let pool = pool(settings(PoolType::Lock, 10, 2));
        let err = pool.acquire(&address, pool.names().own()).await.err().unwrap();
        assert!(err.to_string().contains("connection refused"), "{err}");
        assert_eq!(pool.stats().active, 0);
    }
}
