//! Opening outbound TCP connections, with a small name cache.
//!
//! The outbound pool dials through here; [`super::outbound`] serves streams on top of the
//! pool. Keeping the dialer apart lets both depend on it without depending on each other.
//!
//! Names are resolved by the system resolver (getaddrinfo, on tokio's blocking pool) or the
//! DNS servers `--dns-server` names ([`super::dns::Resolver`]) once per [`NAME_TTL`] (or the
//! records' TTL where the servers tell it, if shorter) and the answers reused: a proxy carrying browsing traffic dials the same few
//! names over and over, and each lookup is a round trip to the resolver that an answer a few
//! seconds old saves. Dials that miss on a name already being looked up wait for that lookup
//! instead of sending their own (single-flight), so a burst of streams to one new name costs
//! one lookup. getaddrinfo does not tell the records' TTL, hence the fixed [`NAME_TTL`];
//! hickory-resolver, which does, was measured against it and not taken (docs/benchmarks.md,
//! "Name resolution").
//!
//! Each getaddrinfo call holds one of tokio's blocking threads until the resolver answers
//! or gives up (10 s and more for a resolver that never answers), so lookups are bounded:
//! [`MAX_LOOKUPS`] in flight in all, half of them for one user and
//! [`MAX_LOOKUPS_PER_SESSION`] for one session ([`LookupOwner`]). Their places are taken
//! in order (tokio's semaphores are fair) and held by the lookup itself until getaddrinfo
//! returns, even when the dial that wanted it gave up. So one user resolving names that
//! never answer holds at most 32 blocking threads (half the places), everyone else's
//! lookups go straight to a free place, and cached names take no place at all.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use socket2::SockRef;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use super::dns::Resolver;
use crate::proto::Address;
use crate::proto::address::Host;

/// How long a resolved name is reused. Short enough that a moved service is followed
/// within a minute, long enough that a busy name costs one lookup a minute.
pub const NAME_TTL: Duration = Duration::from_secs(60);
/// Names kept at most; past it, expired answers are dropped first, then all.
const MAX_NAMES: usize = 10_000;
/// Lookups in flight at once, in all: far below tokio's blocking pool (512 threads).
pub const MAX_LOOKUPS: usize = 64;
/// Lookups in flight at once for one user: the other half is always left to the others.
pub const MAX_LOOKUPS_PER_USER: usize = MAX_LOOKUPS / 2;
/// Lookups in flight at once for one session.
pub const MAX_LOOKUPS_PER_SESSION: usize = 8;

/// Whose lookups these are: one session of one user, each with its bound on lookups in
/// flight. Clones share the bounds.
#[derive(Debug, Clone)]
pub struct LookupOwner {
    session: Arc<Semaphore>,
    user: Arc<Semaphore>,
}

impl LookupOwner {
    /// A user's bound, shared by all its sessions.
    pub fn user_bound() -> Arc<Semaphore> {
        Arc::new(Semaphore::new(MAX_LOOKUPS_PER_USER))
    }

    /// A new session of the user whose bound is `user`.
    pub fn session_of(user: &Arc<Semaphore>) -> LookupOwner {
        LookupOwner { session: Arc::new(Semaphore::new(MAX_LOOKUPS_PER_SESSION)), user: user.clone() }
    }

    /// Places for one lookup: the session's, then the user's, waiting in order.
    async fn admit(&self) -> [OwnedSemaphorePermit; 2] {
        let session = self.session.clone().acquire_owned().await.expect("never closed");
        let user = self.user.clone().acquire_owned().await.expect("never closed");
        [session, user]
    }
}

/// Why an outbound dial failed, worded so clients can map it to SOCKS codes
/// ("refused", "timed out", "unreachable").
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("dial {0}: connection refused")]
    Refused(String),
    #[error("dial {0}: timed out")]
    TimedOut(String),
    #[error("dial {0}: host unreachable ({1})")]
    Unreachable(String, String),
    /// The name did not resolve. Worded as "host unreachable", which clients map to SOCKS
    /// code 4, as they do for Go servers' "no such host".
    #[error("dial {0}: host unreachable ({1})")]
    Unresolved(String, ResolveError),
    #[error("dial {0}: {1}")]
    Other(String, io::Error),
    /// An upstream proxy could not be reached, or answered other than with a connection
    /// (the text names it and what it said).
    #[error("dial {0}: {1}")]
    Upstream(String, String),
}

/// Why a name gave no addresses. Cloned to every dial that waited on the same lookup.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ResolveError {
    /// The resolver failed (no such name, no answer, a malformed name).
    #[error("{0}")]
    Lookup(Arc<io::Error>),
    /// The resolver answered with no addresses.
    #[error("no addresses")]
    NoAddresses,
    /// The resolver answered with addresses of the other family only.
    #[error("no {0} address (--dns-strategy {1})")]
    NoneOfFamily(&'static str, &'static str),
    /// The lookup task ended without an answer (the runtime is shutting down).
    #[error("lookup abandoned")]
    Abandoned,
}

/// Opens outbound TCP connections.
#[derive(Debug, Clone)]
pub struct Dialer {
    pub connect_timeout: Duration,
    pub keepalive: crate::keepalive::Keepalive,
    /// Which of a name's addresses are dialed, in which order.
    pub strategy: DnsStrategy,
    /// Where names are looked up.
    pub resolver: Resolver,
}

/// Which addresses of a name are used, in which order (`--dns-strategy`). Addresses a
/// client gives as addresses are dialed as given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DnsStrategy {
    /// The resolver's order, tried one after another; where one address is used (a
    /// checked dial, a UDP peer), IPv4 first.
    #[default]
    System,
    /// Both families, IPv4 first, raced as RFC 8305 (Happy Eyeballs) says.
    PreferIpv4,
    /// Both families, IPv6 first, raced.
    PreferIpv6,
    Ipv4Only,
    Ipv6Only,
}

impl DnsStrategy {
    pub const NAMES: [&'static str; 5] = ["system", "prefer-ipv4", "prefer-ipv6", "ipv4-only", "ipv6-only"];

    pub fn name(self) -> &'static str {
        match self {
            DnsStrategy::System => "system",
            DnsStrategy::PreferIpv4 => "prefer-ipv4",
            DnsStrategy::PreferIpv6 => "prefer-ipv6",
            DnsStrategy::Ipv4Only => "ipv4-only",
            DnsStrategy::Ipv6Only => "ipv6-only",
        }
    }

    pub fn parse(text: &str) -> Option<DnsStrategy> {
        [Self::System, Self::PreferIpv4, Self::PreferIpv6, Self::Ipv4Only, Self::Ipv6Only]
            .into_iter()
            .find(|strategy| strategy.name() == text)
    }

    /// The addresses to try, in order: the other family dropped (`*-only`), or the
    /// families interleaved from the preferred one (`prefer-*`, RFC 8305 §4), each in the
    /// resolver's order.
    pub fn arrange(self, addrs: &[SocketAddr]) -> Vec<SocketAddr> {
        let (v4, v6): (Vec<SocketAddr>, Vec<SocketAddr>) = addrs.iter().partition(|addr| addr.is_ipv4());
        let (first, second) = match self {
            DnsStrategy::System => return addrs.to_vec(),
            DnsStrategy::Ipv4Only => return v4,
            DnsStrategy::Ipv6Only => return v6,
            DnsStrategy::PreferIpv4 => (v4, v6),
            DnsStrategy::PreferIpv6 => (v6, v4),
        };
        let mut out = Vec::with_capacity(addrs.len());
        let (mut first, mut second) = (first.into_iter(), second.into_iter());
        loop {
            match (first.next(), second.next()) {
                (None, None) => return out,
                (a, b) => out.extend(a.into_iter().chain(b)),
            }
        }
    }

    /// The one address to use where one is (a checked dial, a UDP peer).
    pub fn pick(self, addrs: &[SocketAddr]) -> Option<SocketAddr> {
        match self {
            DnsStrategy::System => ipv4_first(addrs),
            _ => self.arrange(addrs).first().copied(),
        }
    }

    /// Whether dials race the families (Happy Eyeballs).
    fn races(self) -> bool {
        matches!(self, DnsStrategy::PreferIpv4 | DnsStrategy::PreferIpv6)
    }

    /// The family a `*-only` strategy keeps, for its error.
    fn family(self) -> &'static str {
        match self {
            DnsStrategy::Ipv4Only => "IPv4",
            DnsStrategy::Ipv6Only => "IPv6",
            _ => "usable",
        }
    }
}

/// RFC 8305's Connection Attempt Delay: the next address is tried this long after the
/// one before it started, or at once when that one failed.
pub const ATTEMPT_DELAY: Duration = Duration::from_millis(250);

impl Dialer {
    /// Connects to `destination`, looking a name up each time.
    pub async fn connect(&self, destination: &Address) -> Result<TcpStream, DialError> {
        self.connect_with(destination, None).await
    }

    /// As [`Dialer::connect`], with names answered from `names` (as `owner`'s lookups)
    /// when it has them.
    pub async fn connect_with(
        &self,
        destination: &Address,
        names: Option<(&NameCache, &LookupOwner)>,
    ) -> Result<TcpStream, DialError> {
        self.connect_bound(destination, names, None).await
    }

    /// As [`Dialer::connect_with`], from a socket bound as `bind` says.
    pub async fn connect_bound(
        &self,
        destination: &Address,
        names: Option<(&NameCache, &LookupOwner)>,
        bind: Option<&Bind>,
    ) -> Result<TcpStream, DialError> {
        let target = destination.to_string();
        let unresolved = |err| DialError::Unresolved(target.clone(), err);
        let attempt = async {
            let resolved = match (&destination.host, names) {
                (Host::Ip(ip), _) => {
                    let addr = SocketAddr::new(*ip, destination.port);
                    return connect_first(&[addr], bind).await.map_err(|err| classify(&target, err));
                }
                (Host::Domain(name), Some((names, owner))) => names.resolve(name, destination.port, owner).await,
                (Host::Domain(name), None) => {
                    self.resolver.lookup(name).await.map(|(ips, _)| with_port(&ips, destination.port))
                }
            };
            let addrs = self.strategy.arrange(&resolved.map_err(unresolved)?);
            if addrs.is_empty() {
                return Err(unresolved(ResolveError::NoneOfFamily(self.strategy.family(), self.strategy.name())));
            }
            let both_families = addrs.iter().any(SocketAddr::is_ipv4) && addrs.iter().any(SocketAddr::is_ipv6);
            let connected = if self.strategy.races() && both_families {
                connect_racing(&addrs, bind, ATTEMPT_DELAY).await
            } else {
                connect_first(&addrs, bind).await
            };
            connected.map_err(|err| classify(&target, err))
        };
        let stream = tokio::time::timeout(self.connect_timeout, attempt)
            .await
            .map_err(|_| DialError::TimedOut(target.clone()))??;
        let _ = stream.set_nodelay(true);
        self.keepalive.apply(&stream);
        Ok(stream)
    }
}

/// How an outbound socket is bound before it connects (an `[[upstream]]` of type
/// `direct`): a source address, an interface (`SO_BINDTODEVICE`), a firewall mark
/// (`SO_MARK`, for policy routing). The last two need `CAP_NET_ADMIN` (or root).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bind {
    pub address: Option<IpAddr>,
    pub interface: Option<String>,
    pub fwmark: Option<u32>,
}

impl Bind {
    /// A socket for `target`, bound; `None` when the source address is of the other family.
    fn socket_for(&self, target: SocketAddr) -> Option<io::Result<TcpSocket>> {
        if self.address.is_some_and(|source| source.is_ipv4() != target.is_ipv4()) {
            return None;
        }
        let bound = || -> io::Result<TcpSocket> {
            let socket = if target.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
            if let Some(interface) = &self.interface {
                socket
                    .bind_device(Some(interface.as_bytes()))
                    .map_err(|e| with_context(e, "bind-interface", interface))?;
            }
            if let Some(mark) = self.fwmark {
                SockRef::from(&socket).set_mark(mark).map_err(|e| with_context(e, "fwmark", &mark.to_string()))?;
            }
            if let Some(source) = self.address {
                socket
                    .bind(SocketAddr::new(source, 0))
                    .map_err(|e| with_context(e, "bind-address", &source.to_string()))?;
            }
            Ok(socket)
        };
        Some(bound())
    }
}

/// Happy Eyeballs (RFC 8305 §5): the addresses in order, each started [`ATTEMPT_DELAY`]
/// after the one before it or as soon as it failed, the first to connect kept and the
/// others dropped (closed). So an address that swallows SYNs (a broken IPv6 route) costs
/// a quarter second, not the connect timeout.
async fn connect_racing(addrs: &[SocketAddr], bind: Option<&Bind>, delay: Duration) -> io::Result<TcpStream> {
    let mut attempts = tokio::task::JoinSet::new();
    let mut started = 0;
    let mut last = io::Error::new(io::ErrorKind::InvalidInput, "no addresses to dial");
    // Each turn starts the next address: the first, then after a failure or the delay.
    loop {
        if let Some(&addr) = addrs.get(started) {
            started += 1;
            let bind = bind.cloned();
            attempts.spawn(async move { connect_first(&[addr], bind.as_ref()).await });
        }
        if attempts.is_empty() {
            return Err(last);
        }
        let more = started < addrs.len();
        tokio::select! {
            joined = attempts.join_next() => match joined.expect("attempts is not empty") {
                // Dropping the set aborts the attempts still going.
                Ok(Ok(stream)) => return Ok(stream),
                Ok(Err(err)) => last = err,
                Err(join) => last = io::Error::other(join.to_string()),
            },
            () = tokio::time::sleep(delay), if more => {}
        }
    }
}

fn with_context(err: io::Error, key: &str, value: &str) -> io::Error {
    io::Error::new(err.kind(), format!("{key} {value}: {err}"))
}

/// Tries the addresses in the resolver's order, as `TcpStream::connect` does (from a
/// socket bound as `bind` says, skipping addresses of the other family than its source).
/// `addrs` is never empty: an empty answer is a [`ResolveError::NoAddresses`].
async fn connect_first(addrs: &[SocketAddr], bind: Option<&Bind>) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::InvalidInput, "no addresses to dial");
    for addr in addrs {
        let attempt = match bind.map(|bind| bind.socket_for(*addr)) {
            None => TcpStream::connect(addr).await,
            Some(None) => {
                last = io::Error::new(io::ErrorKind::AddrNotAvailable, format!("{addr}: not of bind-address's family"));
                continue;
            }
            Some(Some(Err(err))) => Err(err),
            Some(Some(Ok(socket))) => socket.connect(*addr).await,
        };
        match attempt {
            Ok(stream) => return Ok(stream),
            Err(err) => last = err,
        }
    }
    Err(last)
}

/// Sorts a connect error by its kind; name resolution failed earlier, as
/// [`DialError::Unresolved`], so nothing here reads the error's text.
fn classify(target: &str, err: io::Error) -> DialError {
    use io::ErrorKind::*;
    match err.kind() {
        ConnectionRefused => DialError::Refused(target.to_string()),
        TimedOut => DialError::TimedOut(target.to_string()),
        HostUnreachable | NetworkUnreachable | AddrNotAvailable => {
            DialError::Unreachable(target.to_string(), err.to_string())
        }
        _ => DialError::Other(target.to_string(), err),
    }
}

/// The one address to use of a name's answers when only one is used (a checked dial, a
/// UDP peer): IPv4 first, as services often listen on one family only.
pub fn ipv4_first(addrs: &[SocketAddr]) -> Option<SocketAddr> {
    addrs.iter().find(|addr| addr.is_ipv4()).or(addrs.first()).copied()
}

fn with_port(ips: &[SocketAddr], port: u16) -> Vec<SocketAddr> {
    ips.iter().map(|addr| SocketAddr::new(addr.ip(), port)).collect()
}

/// What the lookup in flight will send its waiters: `None` until it ends.
type Outcome = Option<Result<Arc<[SocketAddr]>, ResolveError>>;

/// A name's state in the cache.
#[derive(Debug)]
enum Slot {
    /// Addresses (port 0), reused until `expires`.
    Ready { ips: Arc<[SocketAddr]>, expires: Instant },
    /// Being looked up; `id` tells this lookup from a later one for the same name.
    Pending { id: u64, answer: watch::Receiver<Outcome> },
}

type Slots = HashMap<String, Slot>;

/// Resolved names, each reused for [`NAME_TTL`] (less where the DNS servers' answer says
/// so), at most [`MAX_NAMES`] of them.
///
/// A miss starts one lookup, in a task of its own so that a dial giving up (its connect
/// timeout) does not cancel the lookup others wait on; every dial for that name meanwhile
/// waits for it. A failure reaches every waiter and is not cached: the next dial asks again,
/// as a failure may be passing (a resolver timeout). Single-flight already keeps a name that
/// keeps failing at one lookup in flight at a time.
#[derive(Debug)]
pub struct NameCache {
    slots: Arc<Mutex<Slots>>,
    lookups: AtomicU64,
    ttl: Duration,
    max_names: usize,
    /// Places for lookups in flight, in all ([`MAX_LOOKUPS`]).
    in_flight: Arc<Semaphore>,
    /// The server's own lookups (warm connections), bounded as one user's session.
    own: LookupOwner,
    /// Which address of a name is used where one is (see [`DnsStrategy::pick`]).
    strategy: DnsStrategy,
    /// Where lookups go.
    resolver: Resolver,
}

impl Default for NameCache {
    fn default() -> Self {
        Self::new(NAME_TTL, MAX_NAMES)
    }
}

impl NameCache {
    fn new(ttl: Duration, max_names: usize) -> Self {
        NameCache {
            slots: Arc::default(),
            lookups: AtomicU64::new(0),
            ttl,
            max_names,
            in_flight: Arc::new(Semaphore::new(MAX_LOOKUPS)),
            own: LookupOwner::session_of(&LookupOwner::user_bound()),
            strategy: DnsStrategy::System,
            resolver: Resolver::System,
        }
    }

    /// A cache for `dialer`'s dials: its resolver, its strategy.
    pub fn for_dialer(dialer: &Dialer) -> Self {
        NameCache { strategy: dialer.strategy, resolver: dialer.resolver.clone(), ..Self::default() }
    }

    pub fn strategy(&self) -> DnsStrategy {
        self.strategy
    }

    /// The owner of the server's own lookups (warm-up and refills, tests).
    pub fn own(&self) -> &LookupOwner {
        &self.own
    }

    /// Lookups sent to the resolver so far.
    pub fn lookups(&self) -> u64 {
        self.lookups.load(Ordering::Relaxed)
    }

    /// The addresses of `name`, with `port`; a lookup it needs is one of `owner`'s.
    pub async fn resolve(&self, name: &str, port: u16, owner: &LookupOwner) -> Result<Vec<SocketAddr>, ResolveError> {
        let mut places = None;
        let mut answer = loop {
            {
                let mut slots = lock(&self.slots);
                match slots.get(name) {
                    Some(Slot::Ready { ips, expires }) if Instant::now() < *expires => {
                        return Ok(with_port(ips, port));
                    }
                    // A lookup whose task is gone (has_changed fails) cannot answer: start another.
                    Some(Slot::Pending { answer, .. }) if answer.has_changed().is_ok() => break answer.clone(),
                    _ => {}
                }
                if let Some(places) = places.take() {
                    break self.start_lookup(&mut slots, name, places);
                }
            }
            // A miss: wait for the owner's places outside the lock, then look again (another
            // dial may have started the same lookup meanwhile).
            places = Some(owner.admit().await);
        };
        let outcome = match answer.wait_for(Option::is_some).await {
            Ok(outcome) => outcome.clone(),
            Err(_) => None,
        };
        let ips = outcome.unwrap_or(Err(ResolveError::Abandoned))?;
        Ok(with_port(&ips, port))
    }

    /// Marks `name` pending and spawns its lookup, which holds the owner's `places` and one
    /// of [`MAX_LOOKUPS`] until the resolver answers; returns where its answer will come.
    fn start_lookup(
        &self,
        slots: &mut Slots,
        name: &str,
        places: [OwnedSemaphorePermit; 2],
    ) -> watch::Receiver<Outcome> {
        let id = self.lookups.fetch_add(1, Ordering::Relaxed);
        self.make_room(slots, name);
        let (tell, answer) = watch::channel(None);
        slots.insert(name.to_owned(), Slot::Pending { id, answer: answer.clone() });
        let (slots, ttl, name, in_flight) = (self.slots.clone(), self.ttl, name.to_owned(), self.in_flight.clone());
        let resolver = self.resolver.clone();
        tokio::spawn(async move {
            let _in_flight = in_flight.acquire_owned().await.expect("never closed");
            let answered = resolver.lookup(&name).await;
            drop(places);
            let ours = Instant::now() + ttl;
            let (outcome, expires) = match answered {
                Ok((ips, valid_until)) => (Ok(ips), valid_until.map_or(ours, |until| until.min(ours))),
                Err(err) => (Err(err), ours),
            };
            let mut slots = lock(&slots);
            // Only this lookup's own slot is settled: it may have been evicted meanwhile.
            if let Some(slot) = slots.get_mut(&name)
                && matches!(slot, Slot::Pending { id: pending, .. } if *pending == id)
            {
                match &outcome {
                    Ok(ips) => *slot = Slot::Ready { ips: ips.clone(), expires },
                    Err(_) => {
                        slots.remove(&name);
                    }
                }
            }
            drop(slots);
            let _ = tell.send(Some(outcome));
        });
        answer
    }

    /// Keeps the map under `max_names` before `name` goes in: expired answers go first, then
    /// everything (dials waiting on an evicted lookup still get its answer).
    fn make_room(&self, slots: &mut Slots, name: &str) {
        if slots.len() < self.max_names || slots.contains_key(name) {
            return;
        }
        let now = Instant::now();
        slots.retain(|_, slot| !matches!(slot, Slot::Ready { expires, .. } if *expires <= now));
        if slots.len() >= self.max_names {
            slots.clear();
        }
    }
}

fn lock(slots: &Mutex<Slots>) -> MutexGuard<'_, Slots> {
    // Inserts and removals leave the map whole; a panic elsewhere cannot corrupt it.
    slots.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A name the system resolver fails on without asking the network: getaddrinfo is never
    /// reached (the name cannot be a C string), but the failure comes back through the same
    /// lookup path as "no such host" does.
    const UNRESOLVABLE: &str = "no\0such.host";

    fn held(names: &NameCache) -> usize {
        lock(&names.slots).len()
    }

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn strategies_filter_and_interleave_the_families() {
        let found = addrs(&["[2001:db8::1]:80", "[2001:db8::2]:80", "192.0.2.1:80", "192.0.2.2:80", "192.0.2.3:80"]);
        assert_eq!(DnsStrategy::System.arrange(&found), found);
        assert_eq!(DnsStrategy::Ipv4Only.arrange(&found), addrs(&["192.0.2.1:80", "192.0.2.2:80", "192.0.2.3:80"]));
        assert_eq!(DnsStrategy::Ipv6Only.arrange(&found), addrs(&["[2001:db8::1]:80", "[2001:db8::2]:80"]));
        let v4_first = addrs(&["192.0.2.1:80", "[2001:db8::1]:80", "192.0.2.2:80", "[2001:db8::2]:80", "192.0.2.3:80"]);
        assert_eq!(DnsStrategy::PreferIpv4.arrange(&found), v4_first);
        let v6_first = addrs(&["[2001:db8::1]:80", "192.0.2.1:80", "[2001:db8::2]:80", "192.0.2.2:80", "192.0.2.3:80"]);
        assert_eq!(DnsStrategy::PreferIpv6.arrange(&found), v6_first);
        assert_eq!(DnsStrategy::System.pick(&found), Some("192.0.2.1:80".parse().unwrap()), "IPv4 first, as before");
        assert_eq!(DnsStrategy::PreferIpv6.pick(&found), Some("[2001:db8::1]:80".parse().unwrap()));
        assert_eq!(DnsStrategy::Ipv6Only.pick(&addrs(&["192.0.2.1:80"])), None);
        for name in DnsStrategy::NAMES {
            assert_eq!(DnsStrategy::parse(name).map(DnsStrategy::name), Some(name));
        }
        assert_eq!(DnsStrategy::parse("ipv6_first"), None);
    }

    /// A listener on `[::1]` whose accept queue is full and never drained: further SYNs
    /// are dropped, as on a route that swallows them.
    async fn swallowing_ipv6() -> Option<(SocketAddr, Vec<TcpStream>)> {
        let socket = TcpSocket::new_v6().ok()?;
        socket.bind("[::1]:0".parse().unwrap()).ok()?;
        let listener = socket.listen(0).ok()?;
        let addr = listener.local_addr().ok()?;
        let mut filling = Vec::new();
        while let Ok(Ok(tcp)) = tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await {
            filling.push(tcp);
            assert!(filling.len() < 64, "the queue never filled");
        }
        std::mem::forget(listener); // kept open, never accepting
        Some((addr, filling))
    }

    #[tokio::test]
    async fn happy_eyeballs_moves_on_from_an_address_that_swallows_syns() {
        let Some((swallowing, _filling)) = swallowing_ipv6().await else { return }; // no IPv6 loopback
        let sequential = tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(swallowing)).await;
        assert!(sequential.is_err(), "the IPv6 address swallows SYNs: {sequential:?}");
        let good = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let v4 = SocketAddr::new("127.0.0.1".parse().unwrap(), good.local_addr().unwrap().port());
        let started = Instant::now();
        let tcp = connect_racing(&[swallowing, v4], None, ATTEMPT_DELAY).await.unwrap();
        let took = started.elapsed();
        assert_eq!(tcp.peer_addr().unwrap(), v4);
        assert!(took >= ATTEMPT_DELAY && took < Duration::from_secs(1), "{took:?}");
        // An address that refuses at once hands over at once, without the delay.
        let refused = SocketAddr::new("::1".parse().unwrap(), free_port_v6());
        let started = Instant::now();
        connect_racing(&[refused, v4], None, Duration::from_secs(5)).await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
        let all_bad = connect_racing(&[refused], None, ATTEMPT_DELAY).await.unwrap_err();
        assert_eq!(all_bad.kind(), io::ErrorKind::ConnectionRefused);
    }

    fn free_port_v6() -> u16 {
        std::net::TcpListener::bind("[::1]:0").unwrap().local_addr().unwrap().port()
    }

    #[tokio::test]
    async fn a_name_is_looked_up_once_per_ttl() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let names = NameCache::default();
        let dialer = Dialer {
            connect_timeout: Duration::from_secs(2),
            keepalive: Default::default(),
            strategy: DnsStrategy::System,
            resolver: Resolver::System,
        };
        let target = Address::domain("localhost", port);
        for _ in 0..3 {
            let tcp = dialer.connect_with(&target, Some((&names, names.own()))).await;
            // localhost may resolve to ::1 first; what matters is that it was looked up once.
            drop(tcp);
        }
        assert_eq!(names.lookups(), 1);
        let addrs = names.resolve("localhost", 7, names.own()).await.unwrap();
        assert!(addrs.iter().all(|a| a.port() == 7 && a.ip().is_loopback()), "{addrs:?}");
        assert_eq!(names.lookups(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_on_one_new_name_sends_one_lookup() {
        let names = Arc::new(NameCache::default());
        let burst: Vec<_> = (0..1000u16)
            .map(|i| {
                let names = names.clone();
                tokio::spawn(async move { names.resolve("localhost", i, names.own()).await })
            })
            .collect();
        for (i, dial) in burst.into_iter().enumerate() {
            let addrs = dial.await.unwrap().unwrap();
            assert!(addrs.iter().all(|a| a.port() == i as u16 && a.ip().is_loopback()), "{addrs:?}");
        }
        assert_eq!(names.lookups(), 1);
    }

    // current_thread: the waiters all run before the lookup's task can finish, so every one
    // of them joins the one lookup (a failure is not cached, so a late one would ask again).
    #[tokio::test]
    async fn a_failed_lookup_reaches_every_waiter_and_is_not_cached() {
        let names = Arc::new(NameCache::default());
        let burst: Vec<_> = (0..100)
            .map(|_| {
                let names = names.clone();
                tokio::spawn(async move { names.resolve(UNRESOLVABLE, 80, names.own()).await })
            })
            .collect();
        for dial in burst {
            let outcome = dial.await.unwrap();
            assert!(matches!(outcome, Err(ResolveError::Lookup(_))), "{outcome:?}");
        }
        assert_eq!(names.lookups(), 1);
        assert_eq!(held(&names), 0, "a failure is not kept");
        assert!(names.resolve(UNRESOLVABLE, 80, names.own()).await.is_err());
        assert_eq!(names.lookups(), 2, "the next dial asks again");
    }

    #[tokio::test]
    async fn a_name_that_does_not_resolve_is_a_typed_dial_error() {
        let dialer = Dialer {
            connect_timeout: Duration::from_secs(2),
            keepalive: Default::default(),
            strategy: DnsStrategy::System,
            resolver: Resolver::System,
        };
        let target = Address::domain(UNRESOLVABLE, 80);
        let names = NameCache::default();
        for cache in [None, Some((&names, names.own()))] {
            let err = dialer.connect_with(&target, cache).await.unwrap_err();
            assert!(matches!(err, DialError::Unresolved(_, ResolveError::Lookup(_))), "{err:?}");
            // The wire text clients map to SOCKS code 4 ("host unreachable").
            assert!(err.to_string().contains("host unreachable"), "{err}");
        }
    }

    #[tokio::test]
    async fn a_dial_that_gives_up_does_not_cancel_the_lookup() {
        let names = NameCache::default();
        {
            // Polled once (the lookup starts), then dropped, as a dial's connect timeout does.
            let mut dial = std::pin::pin!(names.resolve("localhost", 80, names.own()));
            let first = std::future::poll_fn(|cx| std::task::Poll::Ready(dial.as_mut().poll(cx))).await;
            assert!(first.is_pending(), "no lookup ends within its first poll");
        }
        let addrs = names.resolve("localhost", 80, names.own()).await.unwrap();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()), "{addrs:?}");
        assert_eq!(names.lookups(), 1, "the second dial waited on the first one's lookup");
    }

    #[tokio::test]
    async fn an_answer_is_looked_up_again_after_its_ttl() {
        let ttl = Duration::from_millis(300);
        let names = NameCache::new(ttl, MAX_NAMES);
        names.resolve("localhost", 80, names.own()).await.unwrap();
        names.resolve("localhost", 80, names.own()).await.unwrap();
        assert_eq!(names.lookups(), 1);
        tokio::time::sleep(ttl + Duration::from_millis(100)).await;
        names.resolve("localhost", 80, names.own()).await.unwrap();
        assert_eq!(names.lookups(), 2);
    }

    #[tokio::test]
    async fn the_cache_holds_at_most_max_names() {
        let max = 8;
        let names = NameCache::new(NAME_TTL, max);
        // IP literals resolve without the network and are kept like names.
        for i in 0..100 {
            names.resolve(&format!("127.0.1.{i}"), 80, names.own()).await.unwrap();
            assert!(held(&names) <= max, "{} names held", held(&names));
        }
        assert_eq!(names.lookups(), 100);
        names.resolve("127.0.1.99", 80, names.own()).await.unwrap();
        assert_eq!(names.lookups(), 100, "the newest name is still held");
    }

    #[tokio::test]
    async fn expired_answers_are_dropped_first_when_full() {
        let ttl = Duration::from_millis(200);
        let names = NameCache::new(ttl, 4);
        for i in 0..3 {
            names.resolve(&format!("127.0.2.{i}"), 80, names.own()).await.unwrap();
        }
        tokio::time::sleep(ttl + Duration::from_millis(100)).await;
        names.resolve("127.0.2.3", 80, names.own()).await.unwrap();
        names.resolve("127.0.2.4", 80, names.own()).await.unwrap(); // full: the three expired ones go
        assert_eq!(held(&names), 2);
        names.resolve("127.0.2.3", 80, names.own()).await.unwrap();
        assert_eq!(names.lookups(), 5, "the live answer survived the eviction");
    }

    #[test]
    fn one_address_is_picked_ipv4_first() {
        let v6: SocketAddr = "[::1]:80".parse().unwrap();
        let v4: SocketAddr = "127.0.0.1:80".parse().unwrap();
        assert_eq!(ipv4_first(&[v6, v4]), Some(v4));
        assert_eq!(ipv4_first(&[v6]), Some(v6));
        assert_eq!(ipv4_first(&[]), None);
    }
}
