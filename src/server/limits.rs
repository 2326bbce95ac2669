//! Server-wide caps and the shutdown gate: how many sessions and streams may be open
//! at once, and whether new streams are still taken.
//!
//! Caps are semaphores, so the numbers hold exactly under any interleaving. Together
//! with `--max-handshakes` (connections still authenticating) they bound the work a
//! flood of clients can cause: at most `max_handshakes + max_sessions` TLS connections
//! and `max_streams` outbound connections are held at once.
//!
//! [`HandshakeSlots`] shares `--max-handshakes` between source addresses, so that one
//! address holding silent connections cannot lock every other client out.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::shutdown::{InFlight, InFlightGuard};

/// Limits and shutdown behaviour; the binary's `--help` documents each.
#[derive(Debug, Clone)]
pub struct ServerLimits {
    /// Authenticated sessions at once. One more is sent an Alert and closed: the
    /// check comes after authentication, so only real clients learn of the cap, and
    /// connections that never authenticate are bounded by `max_handshakes` instead.
    pub max_sessions: usize,
    /// Streams across all sessions at once; more are refused with a SYNACK error.
    pub max_streams: usize,
    /// A stream with no data either way for this long is ended (`None`: never).
    pub stream_idle_timeout: Option<Duration>,
    /// How long streams in flight may go on after a shutdown signal.
    pub drain_timeout: Duration,
}

impl Default for ServerLimits {
    fn default() -> ServerLimits {
        ServerLimits {
            max_sessions: 4096,
            max_streams: 65536,
            stream_idle_timeout: Some(Duration::from_secs(300)),
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// The admission state shared by the accept loop, sessions and streams.
pub struct Gate {
    limits: ServerLimits,
    sessions: Arc<Semaphore>,
    streams: Arc<Semaphore>,
    in_flight: InFlight,
    draining: AtomicBool,
    /// Set once the drain is over: every session closes.
    closing: watch::Sender<bool>,
}

/// A stream's place under the caps; dropping it frees the place.
pub struct StreamTicket {
    _permit: OwnedSemaphorePermit,
    _in_flight: InFlightGuard,
}

impl Gate {
    pub fn new(limits: ServerLimits) -> Gate {
        Gate {
            sessions: Arc::new(Semaphore::new(limits.max_sessions.max(1))),
            streams: Arc::new(Semaphore::new(limits.max_streams.max(1))),
            limits,
            in_flight: InFlight::default(),
            draining: AtomicBool::new(false),
            closing: watch::Sender::new(false),
        }
    }

    pub fn limits(&self) -> &ServerLimits {
        &self.limits
    }

    /// A place for a new authenticated session, or the reason there is none.
    pub fn admit_session(&self) -> Result<OwnedSemaphorePermit, String> {
        self.sessions
            .clone()
            .try_acquire_owned()
            .map_err(|_| format!("too many sessions on this server (limit {})", self.limits.max_sessions))
    }

    /// A place for a new stream, or the reason (sent to the client as SYNACK error).
    pub fn admit_stream(&self) -> Result<StreamTicket, String> {
        if self.draining.load(Ordering::Acquire) {
            return Err("server is shutting down".into());
        }
        let permit = self
            .streams
            .clone()
            .try_acquire_owned()
            .map_err(|_| format!("too many streams on this server (limit {})", self.limits.max_streams))?;
        Ok(StreamTicket { _permit: permit, _in_flight: self.in_flight.start() })
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

/// Places for connections in the TLS/authentication phase: `total` in all, and for one
/// source (an IPv4 address, or an IPv6 /64, which one host can fill with addresses at
/// will) `per_source` of them, or more only while at least half of all places stay
/// free. So one client's burst of new sessions fits an idle server, one source alone
/// never holds more than half, and once places run short each source keeps to its share.
pub struct HandshakeSlots {
    total: Arc<Semaphore>,
    max_total: usize,
    per_source: usize,
    held: Mutex<HashMap<SourceKey, usize>>,
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
    /// `--max-handshakes` connections are authenticating.
    Full(usize),
    /// This source already holds its share.
    SourceFull(usize),
}

impl std::fmt::Display for HandshakeRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandshakeRefusal::Full(n) => write!(f, "{n} handshakes already in progress"),
            HandshakeRefusal::SourceFull(n) => write!(f, "{n} handshakes from this source already in progress"),
        }
    }
}

/// A connection's place in the handshake phase; dropping it frees the place.
pub struct HandshakeSlot {
    slots: Arc<HandshakeSlots>,
    key: SourceKey,
    _permit: OwnedSemaphorePermit,
}

impl HandshakeSlots {
    /// `per_source` of `None` takes the default share: a quarter of `total`, but at
    /// least 16 (a few NATed users can start sessions together), never more than `total`.
    pub fn new(total: usize, per_source: Option<usize>) -> HandshakeSlots {
        let total = total.max(1);
        let per_source = per_source.unwrap_or((total / 4).max(16)).clamp(1, total);
        HandshakeSlots {
            total: Arc::new(Semaphore::new(total)),
            max_total: total,
            per_source,
            held: Mutex::new(HashMap::new()),
        }
    }

    pub fn per_source(&self) -> usize {
        self.per_source
    }

    /// A place for a connection from `source`, or why there is none.
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Result<HandshakeSlot, HandshakeRefusal> {
        let key = SourceKey::of(source);
        let Ok(permit) = self.total.clone().try_acquire_owned() else {
            return Err(HandshakeRefusal::Full(self.max_total));
        };
        let mut held = self.held.lock().expect("handshake slots lock");
        let mine = held.get(&key).copied().unwrap_or(0);
        let plenty_free = self.total.available_permits() >= self.max_total / 2;
        if mine >= self.per_source && !plenty_free {
            return Err(HandshakeRefusal::SourceFull(self.per_source));
        }
        held.insert(key, mine + 1);
        Ok(HandshakeSlot { slots: self.clone(), key, _permit: permit })
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut held = self.slots.held.lock().expect("handshake slots lock");
        if let Some(count) = held.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(max_sessions: usize, max_streams: usize) -> Gate {
        Gate::new(ServerLimits { max_sessions, max_streams, ..ServerLimits::default() })
    }

    #[test]
    fn caps_hold_and_places_come_back_when_dropped() {
        let gate = gate(1, 2);
        let session = gate.admit_session().unwrap();
        assert!(gate.admit_session().unwrap_err().contains("too many sessions"));
        drop(session);
        assert!(gate.admit_session().is_ok());
        let (a, _b) = (gate.admit_stream().unwrap(), gate.admit_stream().unwrap());
        assert!(gate.admit_stream().err().unwrap().contains("too many streams on this server"));
        drop(a);
        assert!(gate.admit_stream().is_ok());
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn one_source_holds_at_most_its_share_and_others_still_get_in() {
        let slots = Arc::new(HandshakeSlots::new(8, Some(2)));
        // Past its share of 2, a source borrows only while half the places stay free.
        let flood: Vec<_> = (0..4).map(|_| slots.admit(ip("127.0.0.2")).unwrap()).collect();
        assert_eq!(slots.admit(ip("127.0.0.2")).err(), Some(HandshakeRefusal::SourceFull(2)));
        // Places are short now: every other source gets its share, and no more.
        let mut others: Vec<_> = (0..2).map(|_| slots.admit(ip("127.0.0.3")).unwrap()).collect();
        assert_eq!(slots.admit(ip("127.0.0.3")).err(), Some(HandshakeRefusal::SourceFull(2)));
        others.extend((0..2).map(|_| slots.admit(ip("127.0.0.4")).unwrap()));
        assert_eq!(slots.admit(ip("127.0.0.5")).err(), Some(HandshakeRefusal::Full(8)));
        drop(flood);
        assert!(slots.admit(ip("127.0.0.2")).is_ok(), "places come back when connections finish");
        drop(others);
        assert!(slots.held.lock().unwrap().len() <= 1, "no entry left for sources with no connection");
    }

    #[test]
    fn a_burst_from_one_source_fits_an_idle_server() {
        let slots = Arc::new(HandshakeSlots::new(16, Some(2)));
        let burst: Vec<_> = (0..8).map(|_| slots.admit(ip("127.0.0.1")).unwrap()).collect();
        assert!(slots.admit(ip("127.0.0.1")).is_err(), "never more than half for one source");
        assert!(slots.admit(ip("127.0.0.2")).is_ok());
        drop(burst);
    }

    #[test]
    fn ipv6_sources_are_grouped_by_their_64_prefix_and_mapped_v4_is_v4() {
        let key = |text: &str| SourceKey::of(ip(text));
        assert_eq!(key("2001:db8:1:2::1"), key("2001:db8:1:2:ffff::9"), "same /64");
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_eq!(key("::ffff:192.0.2.7"), key("192.0.2.7"), "mapped form is the same source");
        assert_ne!(key("192.0.2.7"), key("192.0.2.8"));
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
        let gate = Arc::new(gate(1, 8));
        let ticket = gate.admit_stream().unwrap();
        let drained = tokio::spawn({
            let gate = gate.clone();
            async move { gate.drain().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(gate.admit_stream().err().unwrap(), "server is shutting down");
        assert!(!*gate.closing.borrow(), "sessions stay open while streams drain");
        drop(ticket);
        assert_eq!(drained.await.unwrap(), 0);
        tokio::time::timeout(Duration::from_secs(1), gate.closing()).await.unwrap();
    }
}
