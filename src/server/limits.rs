//! Server-wide caps and the shutdown gate: how many sessions and streams may be open
//! at once, and whether new streams are still taken.
//!
//! Caps are semaphores, so the numbers hold exactly under any interleaving. Together
//! with `--max-handshakes` (connections still authenticating) they bound the work a
//! flood of clients can cause: at most `max_handshakes + max_sessions` TLS connections
//! and `max_streams` outbound connections are held at once.
//!
//! [`HandshakeSlots`] shares `--max-handshakes` between source addresses, so that one
//! address holding silent connections cannot lock every other client out; after
//! authentication, each user holds at most its share of the sessions and of the streams
//! ([`Gate::user_share`]), so that one user at its share cannot refuse another user's
//! session or stream.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use super::users::UserCounters;
use crate::session::BufferBudget;
use crate::shutdown::{InFlight, InFlightGuard};

/// The default shares split the server's budget this many ways at most: one user holds at
/// most all of it alone, half with two users, a third with three, a quarter with more.
pub const USER_SHARE_PARTS: usize = 4;

/// Limits and shutdown behaviour; the binary's `--help` documents each.
#[derive(Debug, Clone)]
pub struct ServerLimits {
    /// Authenticated sessions at once. One more is sent an Alert and closed: the
    /// check comes after authentication, so only real clients learn of the cap, and
    /// connections that never authenticate are bounded by `max_handshakes` instead.
    pub max_sessions: usize,
    /// Streams across all sessions at once; more are refused with a SYNACK error.
    pub max_streams: usize,
    /// Sessions one user may have at once (`None`: its share, see [`Gate::user_share`]).
    pub max_sessions_per_user: Option<usize>,
    /// Streams one user may have at once, across its sessions (`None`: its share).
    pub max_streams_per_user: Option<usize>,
    /// A stream with no data either way for this long is ended (`None`: never).
    pub stream_idle_timeout: Option<Duration>,
    /// Once one direction of a stream has ended (FIN), the other is ended after this long
    /// with no data (`None`: only the stream idle timeout applies).
    pub half_close_timeout: Option<Duration>,
    /// A session with no stream that received nothing for this long is closed.
    pub idle_session_timeout: Option<Duration>,
    /// How long streams in flight may go on after a shutdown signal.
    pub drain_timeout: Duration,
    /// File descriptors shared by client connections (from accept on) and streams:
    /// the one bound that holds whatever the mix of the two.
    pub descriptors: usize,
    /// Stream data received from clients and not yet written to its destination.
    pub buffers: BufferBudget,
    /// One stream's data held in each direction (`SessionConfig::stream_buffer`).
    pub stream_buffer: usize,
}

impl Default for ServerLimits {
    fn default() -> ServerLimits {
        ServerLimits {
            max_sessions: 4096,
            max_streams: 65536,
            max_sessions_per_user: None,
            max_streams_per_user: None,
            stream_idle_timeout: Some(Duration::from_secs(300)),
            half_close_timeout: Some(Duration::from_secs(60)),
            idle_session_timeout: Some(Duration::from_secs(300)),
            drain_timeout: Duration::from_secs(10),
            buffers: BufferBudget::default(),
            stream_buffer: crate::session::DEFAULT_STREAM_BUFFER,
            descriptors: Semaphore::MAX_PERMITS,
        }
    }
}

/// Why a connection, session or stream got no place. The text is what the client is told
/// (SYNACK error or Alert) and what the log says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NoPlace {
    #[error("server is shutting down")]
    ShuttingDown,
    #[error("too many sessions on this server (limit {0}, --max-sessions)")]
    ServerSessions(usize),
    #[error("too many sessions for this user (limit {0}, --max-sessions-per-user)")]
    UserSessions(usize),
    #[error("too many streams on this server (limit {0}, --max-streams)")]
    ServerStreams(usize),
    #[error("too many streams for this user (limit {0}, --max-streams-per-user)")]
    UserStreams(usize),
    #[error("all {0} descriptors for connections and streams in use (raise the open-files limit)")]
    Descriptors(usize),
}

/// The admission state shared by the accept loop, sessions and streams.
pub struct Gate {
    limits: ServerLimits,
    sessions: Arc<Semaphore>,
    streams: Arc<Semaphore>,
    descriptors: Arc<Semaphore>,
    in_flight: InFlight,
    draining: AtomicBool,
    /// Set once the drain is over: every session closes.
    closing: watch::Sender<bool>,
}

/// A stream's place under the caps and in its user's share; dropping it frees the place.
pub struct StreamTicket {
    _permit: OwnedSemaphorePermit,
    _descriptor: OwnedSemaphorePermit,
    _held: Held,
    _in_flight: InFlightGuard,
}

impl StreamTicket {
    /// The counters of the user whose stream this is.
    pub fn user_counters(&self) -> &UserCounters {
        &self._held.counters
    }
}

/// A session's place under the cap and in its user's share.
pub struct SessionPlace {
    _permit: OwnedSemaphorePermit,
    _held: Held,
}

/// What one user may hold at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserShare {
    pub sessions: usize,
    pub streams: usize,
}

/// One session or stream counted in its user's live count, until dropped.
struct Held {
    counters: Arc<UserCounters>,
    kind: HeldKind,
}

#[derive(Clone, Copy)]
enum HeldKind {
    Session,
    Stream,
}

impl HeldKind {
    fn count(self, counters: &UserCounters) -> &std::sync::atomic::AtomicU64 {
        match self {
            HeldKind::Session => &counters.sessions,
            HeldKind::Stream => &counters.open_streams,
        }
    }
}

impl Held {
    /// Counts one more for the user, unless it already holds `share`.
    fn take(counters: &Arc<UserCounters>, kind: HeldKind, share: usize) -> Option<Held> {
        let count = kind.count(counters);
        if count.fetch_add(1, Ordering::AcqRel) >= share as u64 {
            count.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Held { counters: counters.clone(), kind })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.kind.count(&self.counters).fetch_sub(1, Ordering::AcqRel);
    }
}

impl Gate {
    pub fn new(limits: ServerLimits) -> Gate {
        Gate {
            sessions: Arc::new(Semaphore::new(limits.max_sessions.max(1))),
            streams: Arc::new(Semaphore::new(limits.max_streams.max(1))),
            descriptors: Arc::new(Semaphore::new(limits.descriptors.clamp(1, Semaphore::MAX_PERMITS))),
            limits,
            in_flight: InFlight::default(),
            draining: AtomicBool::new(false),
            closing: watch::Sender::new(false),
        }
    }

    pub fn limits(&self) -> &ServerLimits {
        &self.limits
    }

    /// A descriptor for a client connection just accepted (held from the handshake to
    /// the session's end), or the reason there is none: it is closed at once.
    pub fn admit_connection(&self) -> Result<OwnedSemaphorePermit, NoPlace> {
        self.descriptors.clone().try_acquire_owned().map_err(|_| self.out_of_descriptors())
    }

    fn out_of_descriptors(&self) -> NoPlace {
        NoPlace::Descriptors(self.limits.descriptors)
    }

    /// What one user may hold while `users` users are configured: the flags, or else the
    /// server's sessions and streams (each within the descriptors) split
    /// `min(users, USER_SHARE_PARTS)` ways.
    pub fn user_share(&self, users: usize) -> UserShare {
        let parts = users.clamp(1, USER_SHARE_PARTS);
        let limits = &self.limits;
        let split = |budget: usize| (budget.min(limits.descriptors) / parts).max(1);
        UserShare {
            sessions: limits.max_sessions_per_user.unwrap_or_else(|| split(limits.max_sessions)),
            streams: limits.max_streams_per_user.unwrap_or_else(|| split(limits.max_streams)),
        }
    }

    /// A place for a new authenticated session of the user with `counters` (one of
    /// `users`), or the reason there is none.
    pub fn admit_session(&self, counters: &Arc<UserCounters>, users: usize) -> Result<SessionPlace, NoPlace> {
        let permit =
            self.sessions.clone().try_acquire_owned().map_err(|_| NoPlace::ServerSessions(self.limits.max_sessions))?;
        let share = self.user_share(users).sessions;
        let held = Held::take(counters, HeldKind::Session, share).ok_or(NoPlace::UserSessions(share))?;
        Ok(SessionPlace { _permit: permit, _held: held })
    }

    /// A place for a new stream of the user with `counters` (one of `users`), or the
    /// reason (sent to the client as SYNACK error).
    pub fn admit_stream(&self, counters: &Arc<UserCounters>, users: usize) -> Result<StreamTicket, NoPlace> {
        if self.draining.load(Ordering::Acquire) {
            return Err(NoPlace::ShuttingDown);
        }
        let permit =
            self.streams.clone().try_acquire_owned().map_err(|_| NoPlace::ServerStreams(self.limits.max_streams))?;
        let descriptor = self.descriptors.clone().try_acquire_owned().map_err(|_| self.out_of_descriptors())?;
        // Within the server's caps, the user's share decides (a refusal gives both back).
        let share = self.user_share(users).streams;
        let held = Held::take(counters, HeldKind::Stream, share).ok_or(NoPlace::UserStreams(share))?;
        Ok(StreamTicket { _permit: permit, _descriptor: descriptor, _held: held, _in_flight: self.in_flight.start() })
    }

    /// Stops taking streams and waits for those in flight, at most the drain time;
    /// then tells every session to close. Returns the streams cut off.
    pub async fn drain(&self) -> usize {
        self.draining.store(true, Ordering::Release);
        let left = self.in_flight.drain(self.limits.drain_timeout).await;
        self.closing.send_replace(true);
        left
    }

    pub fn streams_in_flight(&self) -> usize {
        self.in_flight.count()
    }

    /// Resolves once the drain is over.
    pub async fn closing(&self) {
        let mut rx = self.closing.subscribe();
        let _ = rx.wait_for(|closing| *closing).await;
    }
}

/// Places for connections in the TLS/authentication phase: `total` in all, at most
/// `per_source` of them for one source (an IPv4 address, or an IPv6 /64, which one
/// host can fill with addresses at will).
///
/// A connection that finds no place waits for one (in order, per source and then in
/// all) until its handshake deadline, in a waiting room of three times `total`: a burst
/// of real clients, even thousands behind one address, is served as places free up, as
/// the reference serves it, while a flood of silent connections from one address holds
/// its share and a bounded number of waiting descriptors, and the rest is dropped.
pub struct HandshakeSlots {
    total: Arc<Semaphore>,
    per_source: usize,
    waiting: Arc<Semaphore>,
    max_waiting: usize,
    /// Each source's places; an entry lives while a connection of that source holds
    /// or waits for a place.
    sources: Mutex<HashMap<SourceKey, Arc<Semaphore>>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum SourceKey {
    V4([u8; 4]),
    V6Prefix([u8; 8]),
}

impl SourceKey {
    fn of(ip: IpAddr) -> SourceKey {
        match ip {
            IpAddr::V4(v4) => SourceKey::V4(v4.octets()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => SourceKey::V4(v4.octets()),
                None => SourceKey::V6Prefix(v6.octets()[..8].try_into().expect("8 of 16 bytes")),
            },
        }
    }
}

/// Why a connection got no handshake place.
#[derive(Debug, PartialEq, Eq)]
pub enum HandshakeRefusal {
    /// The waiting room is full (this many wait), or the deadline passed while every
    /// place was taken.
    Full(usize),
    /// The deadline passed while this connection's source held its whole share.
    SourceFull(usize),
    /// No file descriptor left for another connection.
    NoDescriptor(NoPlace),
    /// A `--proxy-protocol-from` source sent no valid PROXY protocol header in time.
    ProxyHeader(super::proxy_protocol::HeaderError),
}

impl std::fmt::Display for HandshakeRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandshakeRefusal::Full(n) => {
                write!(f, "{n} connections already wait for a handshake place (--max-handshakes)")
            }
            HandshakeRefusal::SourceFull(n) => {
                write!(f, "{n} handshakes from this source already in progress (--max-handshakes-per-source)")
            }
            HandshakeRefusal::NoDescriptor(why) => why.fmt(f),
            HandshakeRefusal::ProxyHeader(why) => write!(f, "{why} (--proxy-protocol-from)"),
        }
    }
}

/// A connection's place in the handshake phase; dropping it frees the place.
pub struct HandshakeSlot {
    // Fields drop in order: the permits first, so the source's semaphore is referenced
    // by the map only when the guard looks at it.
    _source: OwnedSemaphorePermit,
    _total: OwnedSemaphorePermit,
    _forget: ForgetSource,
}

impl HandshakeSlots {
    /// `per_source` of `None` takes the default share: a quarter of `total`, but at
    /// least 16 (a few NATed users can start sessions together), never more than `total`.
    pub fn new(total: usize, per_source: Option<usize>) -> HandshakeSlots {
        let total = total.max(1);
        let per_source = per_source.unwrap_or((total / 4).max(16)).clamp(1, total);
        let max_waiting = total.saturating_mul(3);
        HandshakeSlots {
            total: Arc::new(Semaphore::new(total)),
            per_source,
            waiting: Arc::new(Semaphore::new(max_waiting)),
            max_waiting,
            sources: Mutex::new(HashMap::new()),
        }
    }

    pub fn per_source(&self) -> usize {
        self.per_source
    }

    /// A place for a connection from `source`, waiting for one until `deadline` if
    /// none is free; or why there is none.
    pub async fn admit(
        self: &Arc<Self>,
        source: IpAddr,
        deadline: tokio::time::Instant,
    ) -> Result<HandshakeSlot, HandshakeRefusal> {
        let key = SourceKey::of(source);
        let mine = {
            let mut sources = self.sources.lock().expect("handshake slots lock");
            sources.entry(key).or_insert_with(|| Arc::new(Semaphore::new(self.per_source))).clone()
        };
        if let Ok(source_place) = mine.clone().try_acquire_owned()
            && let Ok(total) = self.total.clone().try_acquire_owned()
        {
            let _forget = ForgetSource { slots: self.clone(), key };
            return Ok(HandshakeSlot { _source: source_place, _total: total, _forget });
        }
        self.wait_for_place(key, mine, deadline).await
    }

    async fn wait_for_place(
        self: &Arc<Self>,
        key: SourceKey,
        mine: Arc<Semaphore>,
        deadline: tokio::time::Instant,
    ) -> Result<HandshakeSlot, HandshakeRefusal> {
        let forget = ForgetSource { slots: self.clone(), key };
        let Ok(_waiting) = self.waiting.clone().try_acquire_owned() else {
            return Err(HandshakeRefusal::Full(self.max_waiting));
        };
        let source = tokio::time::timeout_at(deadline, mine.acquire_owned())
            .await
            .map_err(|_| HandshakeRefusal::SourceFull(self.per_source))?
            .expect("never closed");
        let total = tokio::time::timeout_at(deadline, self.total.clone().acquire_owned())
            .await
            .map_err(|_| HandshakeRefusal::Full(self.max_waiting))?
            .expect("never closed");
        // The guard goes into the slot, which forgets the source when it is dropped.
        Ok(HandshakeSlot { _source: source, _total: total, _forget: forget })
    }

    /// Drops the source's entry once nothing holds or waits for its places.
    fn forget_if_unused(&self, key: SourceKey) {
        let mut sources = self.sources.lock().expect("handshake slots lock");
        if sources.get(&key).is_some_and(|mine| Arc::strong_count(mine) == 1) {
            sources.remove(&key);
        }
    }
}

/// Forgets a source's entry when a wait for its place ends without one.
struct ForgetSource {
    slots: Arc<HandshakeSlots>,
    key: SourceKey,
}

impl Drop for ForgetSource {
    fn drop(&mut self) {
        self.slots.forget_if_unused(self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(max_sessions: usize, max_streams: usize) -> Gate {
        Gate::new(ServerLimits { max_sessions, max_streams, ..ServerLimits::default() })
    }

    fn user() -> Arc<UserCounters> {
        Arc::new(UserCounters::default())
    }

    #[test]
    fn caps_hold_and_places_come_back_when_dropped() {
        let (gate, alice) = (gate(1, 2), user());
        let session = gate.admit_session(&alice, 1).unwrap();
        assert_eq!(gate.admit_session(&alice, 1).err(), Some(NoPlace::ServerSessions(1)));
        drop(session);
        assert!(gate.admit_session(&alice, 1).is_ok());
        let (a, _b) = (gate.admit_stream(&alice, 1).unwrap(), gate.admit_stream(&alice, 1).unwrap());
        assert_eq!(gate.admit_stream(&alice, 1).err(), Some(NoPlace::ServerStreams(2)));
        drop(a);
        assert!(gate.admit_stream(&alice, 1).is_ok());
    }

    #[test]
    fn connections_and_streams_share_the_descriptors() {
        let (gate, alice) = (Gate::new(ServerLimits { descriptors: 3, ..ServerLimits::default() }), user());
        let connection = gate.admit_connection().unwrap();
        let (stream, _other) = (gate.admit_stream(&alice, 1).unwrap(), gate.admit_stream(&alice, 1).unwrap());
        assert_eq!(gate.admit_connection().unwrap_err(), NoPlace::Descriptors(3));
        assert_eq!(gate.admit_stream(&alice, 1).err(), Some(NoPlace::Descriptors(3)));
        assert!(NoPlace::Descriptors(3).to_string().starts_with("all 3 descriptors"), "the text the client sees");
        drop((connection, stream));
        assert!(gate.admit_connection().is_ok() && gate.admit_stream(&alice, 1).is_ok());
    }

    #[test]
    fn one_user_at_its_share_leaves_the_others_their_places() {
        let gate =
            Gate::new(ServerLimits { max_sessions: 8, max_streams: 100, descriptors: 40, ..ServerLimits::default() });
        assert_eq!(gate.user_share(1), UserShare { sessions: 8, streams: 40 }, "alone: everything");
        assert_eq!(gate.user_share(2), UserShare { sessions: 4, streams: 20 });
        assert_eq!(gate.user_share(9), UserShare { sessions: 2, streams: 10 }, "never less than a quarter");
        let (greedy, other) = (user(), user());
        let held: Vec<_> = (0..20).map(|_| gate.admit_stream(&greedy, 2).unwrap()).collect();
        assert_eq!(gate.admit_stream(&greedy, 2).err(), Some(NoPlace::UserStreams(20)));
        assert_eq!(greedy.open_streams.load(Ordering::Relaxed), 20, "a refusal takes nothing");
        let others: Vec<_> = (0..20).map(|_| gate.admit_stream(&other, 2).unwrap()).collect();
        drop(held);
        assert_eq!(greedy.open_streams.load(Ordering::Relaxed), 0);
        drop(others);
        let sessions: Vec<_> = (0..4).map(|_| gate.admit_session(&greedy, 2).unwrap()).collect();
        assert!(matches!(gate.admit_session(&greedy, 2).err(), Some(NoPlace::UserSessions(_))));
        assert!(gate.admit_session(&other, 2).is_ok());
        assert_eq!(greedy.sessions.load(Ordering::Relaxed), 4);
        drop(sessions);
    }

    #[test]
    fn the_share_flags_override_the_split() {
        let limits =
            ServerLimits { max_sessions_per_user: Some(3), max_streams_per_user: Some(7), ..ServerLimits::default() };
        assert_eq!(Gate::new(limits).user_share(1), UserShare { sessions: 3, streams: 7 });
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    /// Admits or refuses within 50 ms.
    async fn admit(slots: &Arc<HandshakeSlots>, source: &str) -> Result<HandshakeSlot, HandshakeRefusal> {
        slots.admit(ip(source), tokio::time::Instant::now() + Duration::from_millis(50)).await
    }

    #[tokio::test]
    async fn one_source_holds_at_most_its_share_and_others_still_get_in() {
        let slots = Arc::new(HandshakeSlots::new(8, Some(3)));
        let mut flood = Vec::new();
        for _ in 0..3 {
            flood.push(admit(&slots, "127.0.0.2").await.unwrap());
        }
        assert_eq!(admit(&slots, "127.0.0.2").await.err(), Some(HandshakeRefusal::SourceFull(3)));
        let mut others = Vec::new();
        for i in 3..8 {
            others.push(admit(&slots, &format!("127.0.0.{i}")).await.unwrap());
        }
        assert_eq!(admit(&slots, "127.0.0.9").await.err(), Some(HandshakeRefusal::Full(24)));
        drop(flood);
        assert!(admit(&slots, "127.0.0.2").await.is_ok(), "places come back when connections finish");
        drop(others);
        assert!(slots.sources.lock().unwrap().is_empty(), "no entry left for sources with no connection");
    }

    #[tokio::test]
    async fn a_slot_won_by_waiting_leaves_no_reference_behind() {
        let slots = Arc::new(HandshakeSlots::new(4, Some(1)));
        let first = admit(&slots, "127.0.0.2").await.unwrap();
        let waiter = tokio::spawn({
            let slots = slots.clone();
            async move { slots.admit(ip("127.0.0.2"), tokio::time::Instant::now() + Duration::from_secs(5)).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(first);
        let second = waiter.await.unwrap().expect("the waiter gets the freed place");
        drop(second);
        assert_eq!(Arc::strong_count(&slots), 1, "every slot and guard gave its reference back");
        assert!(slots.sources.lock().unwrap().is_empty(), "no entry left for the source");
    }

    #[tokio::test]
    async fn a_burst_from_one_source_waits_for_places_instead_of_being_dropped() {
        let slots = Arc::new(HandshakeSlots::new(4, Some(2)));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let mut burst = tokio::task::JoinSet::new();
        for _ in 0..12 {
            let slots = slots.clone();
            burst.spawn(async move {
                let slot = slots.admit(ip("127.0.0.2"), deadline).await?;
                tokio::time::sleep(Duration::from_millis(20)).await; // the handshake
                drop(slot);
                Ok::<(), HandshakeRefusal>(())
            });
        }
        while let Some(done) = burst.join_next().await {
            assert_eq!(done.unwrap(), Ok(()), "every connection of the burst got a place in turn");
        }
        assert!(slots.sources.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn past_the_waiting_room_connections_are_dropped_at_once() {
        let slots = Arc::new(HandshakeSlots::new(1, Some(1)));
        let _held = admit(&slots, "127.0.0.2").await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let waiting: Vec<_> = (0..3)
            .map(|_| {
                let slots = slots.clone();
                tokio::spawn(async move { slots.admit(ip("127.0.0.3"), deadline).await.map(drop) })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = std::time::Instant::now();
        assert_eq!(admit(&slots, "127.0.0.4").await.err(), Some(HandshakeRefusal::Full(3)));
        assert!(started.elapsed() < Duration::from_millis(40), "dropped without waiting");
        for wait in waiting {
            wait.abort();
        }
    }

    #[tokio::test]
    async fn ipv6_sources_are_grouped_by_their_64_prefix_and_mapped_v4_is_v4() {
        let slots = Arc::new(HandshakeSlots::new(8, Some(1)));
        let _a = admit(&slots, "2001:db8:1:2::1").await.unwrap();
        assert!(admit(&slots, "2001:db8:1:2:ffff::9").await.is_err(), "same /64");
        let _b = admit(&slots, "2001:db8:1:3::1").await.unwrap();
        let _c = admit(&slots, "192.0.2.7").await.unwrap();
        assert!(admit(&slots, "::ffff:192.0.2.7").await.is_err(), "mapped form is the same source");
    }

    #[test]
    fn the_default_share_is_a_quarter_but_at_least_sixteen() {
        assert_eq!(HandshakeSlots::new(512, None).per_source(), 128);
        assert_eq!(HandshakeSlots::new(40, None).per_source(), 16);
        assert_eq!(HandshakeSlots::new(4, None).per_source(), 4);
        assert_eq!(HandshakeSlots::new(4, Some(9)).per_source(), 4);
    }

    #[tokio::test]
    async fn draining_refuses_new_streams_and_waits_for_old_ones() {
        let (gate, alice) = (Arc::new(gate(1, 8)), user());
        let ticket = gate.admit_stream(&alice, 1).unwrap();
        let drained = tokio::spawn({
            let gate = gate.clone();
            async move { gate.drain().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(gate.admit_stream(&alice, 1).err().unwrap().to_string(), "server is shutting down");
        assert!(!*gate.closing.borrow(), "sessions stay open while streams drain");
        drop(ticket);
        assert_eq!(drained.await.unwrap(), 0);
        tokio::time::timeout(Duration::from_secs(1), gate.closing()).await.unwrap();
    }
}
