//! The AnyTLS server: accepts TLS, authenticates, and serves each session's
//! streams by dialing their destinations.

pub mod access_log;
pub mod auth_callback;
pub mod auth_failures;
pub mod context;
pub mod dial;
pub mod dns;
pub mod fallback;
pub mod limits;
pub mod outbound;
pub mod outbound_pool;
pub mod policy;
pub mod proxy_protocol;
pub mod route;
pub mod state;
pub mod tls;
pub mod udp;
pub mod upstream;
pub mod users;

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use crate::metrics::HandshakeCounters;
use crate::proto::Frame;
use crate::proto::PaddingScheme;
use crate::proto::PasswordHash;
use crate::proto::auth::AUTH_HASH_LEN;
use crate::proto::frame::Command;
use crate::session::{ServerSession, ServerSessionOptions, SessionConfig, Stream, StreamHandler};
pub use context::ServerContext;
use fallback::{Fallback, FirstData, ProbeSettings, TlsFront};
use limits::{Gate, HandshakeRefusal, HandshakeSlot, HandshakeSlots, NoPlace, ServerLimits};
use outbound_pool::OutboundSettings;
use users::{CountedIo, Seat, User, UserEntry, Users};

/// Everything the server needs to run.
pub struct ServerConfig {
    pub tls: Arc<rustls::ServerConfig>,
    pub passwords: Vec<PasswordHash>,
    pub padding: PaddingScheme,
    /// Pads the server's first writes of each session (see [`ServerContext::downlink_padding`]).
    pub downlink_padding: Option<PaddingScheme>,
    pub connect_timeout: Duration,
    /// Which of a destination name's addresses are dialed, in which order.
    pub dns_strategy: dial::DnsStrategy,
    /// Where destination names are looked up.
    pub resolver: dns::Resolver,
    /// Time a new connection has to finish TLS and send its authentication block.
    pub handshake_timeout: Duration,
    /// Connections allowed to be in the handshake/authentication phase at once.
    pub max_handshakes: usize,
    /// What meets connections that do not authenticate, and their share per source.
    pub probe: ProbeSettings,
    pub max_streams_per_session: usize,
    pub outbound: OutboundSettings,
    /// Targets to warm up at start-up.
    pub warmup: Vec<crate::proto::Address>,
    /// How often the pool statistics are logged (zero: never).
    pub stats_interval: Duration,
    /// UDP-over-TCP streams.
    pub udp: udp::UdpSettings,
    /// Keepalive and user timeout on client connections and outbound connections.
    pub keepalive: crate::keepalive::Keepalive,
    /// Sources whose connections start with a PROXY protocol header naming the client
    /// (a load balancer, a TLS router): `--proxy-protocol-from`.
    pub proxy_protocol_from: Vec<policy::Cidr>,
}

/// Why a server could not start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServerError {
    /// The passwords or users given cannot be served (none at all, one given twice).
    #[error("users: {0}")]
    Users(#[from] users::UsersError),
}

/// Accepts connections until the task is dropped, with the default [`ServerLimits`] and
/// a context of its own. `config.passwords` are the users (unnamed); with none, or one
/// given twice, it returns [`ServerError::Users`] at once.
pub async fn run(listener: TcpListener, config: ServerConfig) -> Result<(), ServerError> {
    let users = Users::new(UserEntry::unnamed(config.passwords.clone()))?;
    let context = Arc::new(ServerContext::from_config(&config, Arc::new(users)));
    serve(vec![listener], config, context, ServerLimits::default(), std::future::pending()).await;
    Ok(())
}

/// Accepts connections on every one of `listeners` until `shutdown` resolves, then stops accepting, lets streams
/// in flight finish (at most `limits.drain_timeout`), closes every session and the
/// outbound pool's warm connections, and logs the final pool statistics. The users are
/// `context`'s, which a reload may change while it runs: the sessions of a user removed
/// are closed (`config.passwords` is unused).
pub async fn serve(
    listeners: Vec<TcpListener>,
    config: ServerConfig,
    context: Arc<ServerContext>,
    limits: ServerLimits,
    shutdown: impl Future<Output = ()>,
) {
    let (users, pool) = (&context.users, &context.pool);
    let door = Arc::new(Door {
        tls: TlsFront::new(config.tls.clone(), config.probe.fallback.as_ref()),
        fallback: config.probe.fallback.clone().map(Fallback::new),
    });
    let config = Arc::new(config);
    let session_config = SessionConfig {
        padding: context.padding.clone(),
        stream_idle_timeout: limits.stream_idle_timeout,
        half_close_timeout: limits.half_close_timeout,
        stream_buffer: limits.stream_buffer,
        buffers: limits.buffers.clone(),
        ..SessionConfig::default()
    };
    let session_options = ServerSessionOptions {
        max_streams: config.max_streams_per_session,
        idle_session_timeout: limits.idle_session_timeout,
        downlink_padding: None,
    };
    let gate = Arc::new(Gate::new(limits));
    let share = gate.user_share(users.len());
    log::info!(
        "per user ({} users): at most {} sessions (--max-sessions-per-user), {} streams (--max-streams-per-user)",
        users.len(),
        share.sessions,
        share.streams
    );
    let slots = Arc::new(HandshakeSlots::new(config.max_handshakes, config.probe.max_handshakes_per_source));
    log_pool_configuration(&config);
    log_probe_configuration(&config, &slots);
    for target in &config.warmup {
        pool.warm_up(target);
    }
    let maintenance = tokio::spawn(maintain_pool(pool.clone(), config.stats_interval));
    let expiry = tokio::spawn(expire_users(context.clone()));
    let refusals = Arc::new(std::sync::Mutex::new(RefusalLog::default()));
    tokio::pin!(shutdown);
    let mut next_listener = 0;
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = crate::accept::accept_any(&listeners, &mut next_listener) => accepted,
            () = &mut shutdown => break,
        };
        let descriptor = match gate.admit_connection() {
            Ok(descriptor) => descriptor,
            Err(why) => {
                refusals.lock().expect("refusal log lock").note(
                    peer,
                    &HandshakeRefusal::NoDescriptor(why),
                    &context.handshakes,
                );
                continue;
            }
        };
        let slots = slots.clone();
        let refusals = refusals.clone();
        let door = door.clone();
        let config = config.clone();
        let session_config = session_config.clone();
        let session_options = session_options.clone();
        let gate = gate.clone();
        let context = context.clone();
        tokio::spawn(async move {
            let users = &context.users;
            let _descriptor = descriptor;
            let deadline = Instant::now() + config.handshake_timeout;
            let (mut tcp, mut peer) = (tcp, peer);
            if config.proxy_protocol_from.iter().any(|range| range.contains(policy::normalise(peer.ip()))) {
                peer = match proxy_protocol::read_header(&mut tcp, deadline).await {
                    Ok(proxy_protocol::Header::Proxied { source, .. }) => {
                        log::debug!("{peer}: PROXY protocol header: the client is {source}");
                        SocketAddr::new(policy::normalise(source.ip()), source.port())
                    }
                    Ok(proxy_protocol::Header::Local) => peer,
                    Err(why) => {
                        let why = HandshakeRefusal::ProxyHeader(why);
                        return refusals.lock().expect("refusal log lock").note(peer, &why, &context.handshakes);
                    }
                };
            }
            let slot = match slots.admit(peer.ip(), deadline).await {
                Ok(slot) => slot,
                Err(why) => return refusals.lock().expect("refusal log lock").note(peer, &why, &context.handshakes),
            };
            let Some((tls, leftover, user, mut seat)) =
                authenticate(tcp, peer, &door, &config, &context, deadline, slot).await
            else {
                return;
            };
            let _session_place = match gate.admit_session(&user.counters, users.len()) {
                Ok(place) => place,
                Err(why) => return refuse_session(tls, peer, &why).await,
            };
            let handler = count_streams(&user, stream_handler(&gate, &user, &context, config.udp, peer));
            let client_socket = tls.get_ref().0.as_raw_fd();
            let mut tls = tls;
            crate::session::limit_tls_buffer(tls.get_mut().1);
            let tls = CountedIo::new(tls, user.clone());
            let (session_config, session_options) = padded_for(&user, &context, session_config, session_options);
            let session = ServerSession::start(tls, session_config, session_options, leftover, handler);
            log::debug!("{peer}: session open (user {})", user.name);
            let reason = tokio::select! {
                reason = session.closed() => reason,
                () = gate.closing() => {
                    session.close("server shutting down");
                    "server shutting down".into()
                }
                why = seat.cut() => {
                    session.close(why.describe());
                    log::info!("{peer}: session of user {} closed: {}", user.name, why.describe());
                    why.describe().into()
                }
                () = client_gone(client_socket) => {
                    session.close("the client closed the connection");
                    "the client closed the connection".into()
                }
            };
            log::debug!("{peer}: session closed: {reason}");
        });
    }
    drop(listeners);
    log::info!(
        "shutting down: no longer accepting; {} streams in flight get up to {:?} to finish",
        gate.streams_in_flight(),
        gate.limits().drain_timeout
    );
    let cut_off = gate.drain().await;
    if cut_off > 0 {
        log::warn!("{cut_off} streams still open after the drain time: closed");
    }
    maintenance.abort();
    expiry.abort();
    let closed = pool.close_idle();
    pool.log_stats();
    log::info!("shut down: sessions closed, {closed} warm outbound connections closed");
}

/// Each new stream gets a place under the server-wide caps and in its user's share, or
/// a SYNACK error.
fn stream_handler(
    gate: &Arc<Gate>,
    user: &User,
    context: &Arc<ServerContext>,
    udp: udp::UdpSettings,
    peer: SocketAddr,
) -> StreamHandler {
    let (gate, counters, context) = (gate.clone(), user.counters.clone(), context.clone());
    let client = access_log::StreamClient { peer: peer.to_string(), user: user.name.as_str().into() };
    let lookups = outbound::LookupOwner::session_of(&user.lookups);
    Arc::new(move |mut stream: Stream| match gate.admit_stream(&counters, context.users.len()) {
        Ok(ticket) => {
            let serve = outbound::serve_stream(stream, context.clone(), udp, client.clone(), ticket, lookups.clone());
            tokio::spawn(serve);
        }
        Err(why) => {
            log::warn!("{}: stream {} refused: {why}", client.peer, stream.id());
            let (access_log, outcome) = (&context.access_log, access_log::Outcome::OverLimit(why.to_string()));
            access_log.record(
                &client,
                access_log::Network::Tcp,
                None,
                Default::default(),
                std::time::Instant::now(),
                outcome,
            );
            tokio::spawn(async move {
                let _ = stream.send_synack(Err(why.to_string())).await;
            });
        }
    })
}

/// Counts each stream the session opens for its user, then hands it on.
fn count_streams(user: &User, handler: StreamHandler) -> StreamHandler {
    let counters = user.counters.clone();
    Arc::new(move |stream: Stream| {
        counters.streams.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        handler(stream)
    })
}

/// An authenticated client over the session cap: told why (Alert), then closed.
async fn refuse_session(mut tls: TlsStream, peer: SocketAddr, why: &NoPlace) {
    log::warn!("{peer}: session refused: {why}");
    let mut alert = BytesMut::new();
    Frame::new(Command::Alert, 0, why.to_string().into_bytes()).encode(&mut alert).expect("short alert");
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        tls.write_all(&alert).await?;
        tls.shutdown().await
    })
    .await;
}

/// The session settings for `user`: the padding scheme its clients are given (the user's
/// own, else the node's, both as they are now: a changed one reaches each client at its
/// next session) and the downlink scheme the server pads its own first writes by.
fn padded_for(
    user: &User,
    context: &ServerContext,
    mut config: SessionConfig,
    mut options: ServerSessionOptions,
) -> (SessionConfig, ServerSessionOptions) {
    if let Some(scheme) = &user.plan().padding_scheme {
        config.padding = Arc::new(ArcSwap::new(scheme.shared()));
    }
    options.downlink_padding = context.downlink_padding.load_full();
    (config, options)
}

fn log_pool_configuration(config: &ServerConfig) {
    let outbound = &config.outbound;
    log::info!(
        "outbound pool: type {}, max {} connections per target, max idle time {}s, min idle {} per target, \
         max lifetime {}s, max idle in all {}",
        outbound.pool_type,
        outbound.max_per_target,
        outbound.max_idle_time.as_secs(),
        outbound.min_idle,
        outbound.max_lifetime.as_secs(),
        outbound.max_idle_total,
    );
}

/// Sweeps the pool often enough for its idle time, and logs its statistics.
async fn maintain_pool(pool: outbound_pool::OutboundPool, stats_interval: Duration) {
    let sweep_every = (pool.settings().max_idle_time / 4).clamp(Duration::from_millis(250), Duration::from_secs(30));
    let mut sweep = tokio::time::interval(sweep_every);
    let mut stats = crate::metrics::StatsTicker::every(stats_interval);
    loop {
        tokio::select! {
            _ = sweep.tick() => pool.maintain(),
            () = stats.tick() => pool.log_stats(),
        }
    }
}

/// Closes the sessions of users whose plan has expired, checked every second (so expiry
/// is at the second: the check runs just after each whole second of the clock).
/// The auth callback's users without a session are forgotten once their answer is stale,
/// so the callback is asked again.
async fn expire_users(context: Arc<ServerContext>) {
    loop {
        let now = jiff::Timestamp::now();
        let to_next_second = Duration::from_nanos(1_000_000_000 - u64::from(now.subsec_nanosecond().unsigned_abs()));
        tokio::time::sleep(to_next_second + Duration::from_millis(5)).await;
        context.users.expire(jiff::Timestamp::now());
        if let Some(callback) = &context.auth_callback {
            context.users.forget_callback_users(callback.positive_ttl());
        }
    }
}

type TlsStream = tokio_rustls::server::TlsStream<TcpStream>;

/// Resolves once the client's socket shows that it closed or reset the connection.
/// A session whose streams' destinations stopped reading stops reading its client
/// (backpressure), so it would not see the close itself: without this, a client
/// that filled its buffers and left would hold them, and their outbound connections,
/// until the stream idle timeout. `socket` stays open while the session runs, and
/// this is polled only until the session ends.
async fn client_gone(socket: std::os::fd::RawFd) {
    let mut check = tokio::time::interval(Duration::from_secs(2));
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        check.tick().await;
        if crate::tcp_state::peer_closed_fd(socket) {
            return;
        }
    }
}

/// What meets a new connection: TLS, then the fallback site for those that do not
/// authenticate.
struct Door {
    tls: TlsFront,
    fallback: Option<Fallback>,
}

/// TLS, then the authentication block, all before `deadline`. An authenticated client
/// whose user's plan lets it in gets its session and seat; anything else goes to the
/// fallback site or is closed silently (see [`fallback`]), counted, and logged at INFO at
/// most once a minute per source (a refused user, as a wrong password on the wire, is
/// counted by its reason instead).
async fn authenticate(
    tcp: TcpStream,
    peer: SocketAddr,
    door: &Door,
    config: &ServerConfig,
    context: &ServerContext,
    deadline: Instant,
    slot: HandshakeSlot,
) -> Option<(TlsStream, BytesMut, Arc<User>, Seat)> {
    let handshakes = &context.handshakes;
    let _ = tcp.set_nodelay(true);
    config.keepalive.apply(&tcp);
    let mut tls = match tokio::time::timeout_at(deadline, door.tls.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(err)) => {
            log::debug!("{peer}: TLS handshake failed: {err}");
            return None;
        }
        Err(_) => {
            HandshakeCounters::count(&handshakes.auth_timeouts);
            log::debug!("{peer}: no authentication within {:?} (TLS unfinished)", config.handshake_timeout);
            return None;
        }
    };
    let mut refused = None;
    let now = jiff::Timestamp::now();
    let users = &context.users;
    let mut first = fallback::read_first_data(&mut tls, admitting(users, peer.ip(), now, &mut refused), deadline).await;
    // A password no local user has: the auth callback may know it, and then it is read again.
    if let (Some(callback), FirstData::Invalid { read, .. }) = (&context.auth_callback, &first)
        && refused.is_none()
        && let Some(hash) = read.get(..AUTH_HASH_LEN)
        && ask_callback(callback, context, peer, hash.try_into().expect("32 bytes")).await
        && let FirstData::Invalid { read, .. } = first
    {
        let accept = admitting(users, peer.ip(), now, &mut refused);
        first = fallback::read_first_data_after(&mut tls, accept, deadline, read).await;
    }
    let read = match first {
        FirstData::Authenticated { user: (user, seat), leftover } => {
            log::debug!("{peer}: authenticated as user {}", user.name);
            return Some((tls, leftover, user, seat));
        }
        FirstData::Invalid { read, why } => {
            if refused.is_none() {
                HandshakeCounters::count(&handshakes.auth_failures);
                context.auth_failure_log.note(peer, why);
            }
            log::debug!("{peer}: authentication failed ({why}) after {} bytes", read.len());
            read
        }
        FirstData::TimedOut { read } => {
            HandshakeCounters::count(&handshakes.auth_timeouts);
            log::debug!("{peer}: no authentication within {:?}", config.handshake_timeout);
            read
        }
        FirstData::Gone(why) => {
            log::debug!("{peer}: {why}");
            return None;
        }
    };
    if let Some(fallback) = &door.fallback
        && let Some(site) = fallback.open(peer, handshakes).await
    {
        // Out of the handshake phase: the site's own limits apply from here.
        drop(slot);
        fallback::relay(tls, site, read, peer, handshakes).await;
        return None;
    }
    let silent = read.is_empty();
    fallback::linger_then_close(tls, deadline, silent).await;
    None
}

/// The accept function of an authentication: the user of the hash and a seat for it from
/// `ip`, or none (a plan's refusal is left in `refused`).
fn admitting<'a>(
    users: &'a Users,
    ip: std::net::IpAddr,
    now: jiff::Timestamp,
    refused: &'a mut Option<users::Refusal>,
) -> impl FnMut(&[u8; AUTH_HASH_LEN]) -> Option<(Arc<User>, Seat)> + 'a {
    move |hash| match users.admit(hash, ip, now) {
        Ok(admitted) => Some(admitted),
        Err(why) => {
            *refused = why;
            None
        }
    }
}

/// Asks the auth callback about `hash`; true when it named a user, now one of the users.
async fn ask_callback(
    callback: &auth_callback::AuthCallback,
    context: &ServerContext,
    peer: SocketAddr,
    hash: [u8; AUTH_HASH_LEN],
) -> bool {
    match callback.check(&hash, peer).await {
        Ok(auth_callback::Verdict::Accepted(entry)) => match context.users.add_from_callback(entry) {
            Ok(user) => {
                log::debug!("{peer}: the auth callback names user {}", user.name);
                true
            }
            Err(why) => {
                log::warn!("{peer}: the auth callback's user is refused: {why}");
                false
            }
        },
        Ok(auth_callback::Verdict::Refused) => {
            log::debug!("{peer}: the auth callback refuses the password");
            false
        }
        Err(why) => {
            HandshakeCounters::count(&context.handshakes.auth_callback_failures);
            log::debug!("{peer}: the auth callback failed, refused: {why}");
            false
        }
    }
}

/// Connections dropped at accept are logged at WARN at most once per [`RefusalLog::EVERY`]
/// (with the number dropped since), so a flood cannot flood the log.
#[derive(Default)]
struct RefusalLog {
    last: Option<Instant>,
    since: u64,
}

impl RefusalLog {
    const EVERY: Duration = Duration::from_secs(10);

    fn note(&mut self, peer: SocketAddr, why: &HandshakeRefusal, handshakes: &HandshakeCounters) {
        HandshakeCounters::count(match why {
            HandshakeRefusal::Full(_) | HandshakeRefusal::NoDescriptor(_) => &handshakes.refused_full,
            HandshakeRefusal::SourceFull(_) => &handshakes.refused_source_full,
            HandshakeRefusal::ProxyHeader(_) => &handshakes.proxy_header_errors,
        });
        self.since += 1;
        if self.last.is_some_and(|last| last.elapsed() < Self::EVERY) {
            log::debug!("{peer}: dropped, {why}");
            return;
        }
        let more = self.since - 1;
        let more = if more > 0 { format!(" ({more} more dropped since the last warning)") } else { String::new() };
        log::warn!("{peer}: dropped, {why}{more}");
        self.last = Some(Instant::now());
        self.since = 0;
    }
}

fn log_probe_configuration(config: &ServerConfig, slots: &HandshakeSlots) {
    let unauthenticated = match &config.probe.fallback {
        Some(fallback) => {
            format!("relayed to the fallback site {} (at most {} at once)", fallback.target, fallback.max_connections)
        }
        None => "closed silently".to_string(),
    };
    log::info!(
        "unauthenticated connections are {unauthenticated}; at most {} handshakes at once, {} per source \
         when places run short",
        config.max_handshakes,
        slots.per_source()
    );
}
