//! Sessions to the server: opening them (TCP, TLS, authentication) and reusing
//! idle ones, newest first, as the reference client does.
//!
//! All of a client's servers share one pool engine keyed by server address
//! ([`SessionEngine`]); each server's counters live in its key's slot.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rustls::pki_types::ServerName;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::error::ConnectError;
use crate::pool::{
    Idle, IdlePool, KeyCounters, KeyStats, PoolKey, PoolSettings, PoolStatsSnapshot, PoolType, new_pool,
};
use crate::proto::auth::encode_auth_block;
use crate::proto::{Address, PasswordHash};
use crate::session::{ClientSession, ClientSessionOptions, SessionConfig};

/// Opens new authenticated sessions to one server.
pub struct Connector {
    pub server: Address,
    pub server_name: ServerName<'static>,
    pub tls: TlsConnector,
    pub password: PasswordHash,
    pub session_config: SessionConfig,
    pub client_options: ClientSessionOptions,
    pub connect_timeout: Duration,
    /// Keepalive and user timeout on the connection to the server.
    pub keepalive: crate::keepalive::Keepalive,
    /// Source address of the connection (`--bind`); none: the system's choice.
    pub bind: Option<std::net::IpAddr>,
}

/// A TCP connection to `server`, from `bind` when given (the first of the server's
/// addresses of the same family).
async fn dial(server: &str, bind: Option<std::net::IpAddr>) -> std::io::Result<TcpStream> {
    let Some(bind) = bind else { return TcpStream::connect(server).await };
    let mut last = None;
    for address in tokio::net::lookup_host(server).await?.filter(|a| a.is_ipv4() == bind.is_ipv4()) {
        let socket = if bind.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        socket.bind(std::net::SocketAddr::new(bind, 0))?;
        match socket.connect(address).await {
            Ok(tcp) => return Ok(tcp),
            Err(err) => last = Some(err),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other(format!("no address of {server} in the family of --bind {bind}"))))
}

impl Connector {
    pub async fn connect(&self) -> Result<ClientSession, ConnectError> {
        let server = self.server.to_string();
        let after = self.connect_timeout;
        let tcp = tokio::time::timeout(after, dial(server.as_str(), self.bind))
            .await
            .map_err(|_| ConnectError::TcpTimeout { server: server.clone(), after })?
            .map_err(|source| ConnectError::Tcp { server: server.clone(), source })?;
        let _ = tcp.set_nodelay(true);
        self.keepalive.apply(&tcp);
        let handshake = self.tls.connect(self.server_name.clone(), tcp);
        let mut tls = tokio::time::timeout(after, handshake)
            .await
            .map_err(|_| ConnectError::TlsTimeout { server: server.clone(), after })?
            .map_err(|err| ConnectError::Tls {
                server: server.clone(),
                explanation: super::tls::explain_handshake_error(&err),
            })?;
        // One write, one TLS record: reference servers read the block in one go.
        let scheme = self.session_config.padding.load_full();
        let mut block = BytesMut::new();
        encode_auth_block(&self.password, scheme.auth_padding_len(&mut rand::rng()), &mut block);
        let authenticate = async {
            tls.write_all(&block).await?;
            tls.flush().await
        };
        authenticate.await.map_err(|source| ConnectError::Authenticate { server, source })?;
        crate::session::limit_tls_buffer(tls.get_mut().1);
        Ok(ClientSession::start(tls, self.session_config.clone(), self.client_options.clone()))
    }
}

/// How the client keeps its sessions.
#[derive(Debug, Clone)]
pub struct SessionPoolSettings {
    pub pool_type: PoolType,
    pub idle_timeout: Duration,
    /// Idle sessions the sweep always leaves open (the newest ones).
    pub min_idle: usize,
    /// Streams carried by one session at once; 1 is the reference's behaviour.
    pub max_streams_per_session: usize,
    /// Idle sessions kept at most.
    pub max_idle: usize,
}

/// The engine all of a client's servers share: idle sessions keyed by server address,
/// with each server's counters in its slot.
pub type SessionEngine = Arc<dyn IdlePool<Address, KeyCounters, ClientSession>>;

/// An engine for `servers` servers with `settings`: `max_idle` per server, and in all.
pub fn new_session_engine(settings: &SessionPoolSettings, servers: usize) -> SessionEngine {
    let engine_settings = PoolSettings {
        max_idle_per_key: settings.max_idle,
        max_idle_total: settings.max_idle.saturating_mul(servers.max(1)),
        max_idle_time: settings.idle_timeout,
        // Sessions live as long as they are used and not idle too long.
        max_lifetime: Duration::from_secs(u64::from(u32::MAX)),
    };
    new_pool(settings.pool_type, engine_settings)
}

/// Idle sessions to one server, reused newest first: this server's view of the shared
/// engine.
pub struct SessionPool {
    key: Address,
    idle: SessionEngine,
    /// This server's counters, in its slot of the engine.
    counters: Arc<KeyCounters>,
    settings: SessionPoolSettings,
    pub connector: Connector,
}

/// A session taken from the pool, and whether it was reused.
pub struct Lease {
    pub session: ClientSession,
    pub reused: bool,
}

impl SessionPool {
    /// A pool with an engine of its own; [`SessionPool::share_engine`] moves it onto the
    /// engine of a set of servers.
    pub fn new(connector: Connector, settings: SessionPoolSettings) -> SessionPool {
        let idle = new_session_engine(&settings, 1);
        let key = connector.server.clone();
        SessionPool { counters: idle.state(&key), key, idle, settings, connector }
    }

    /// Uses `engine` from now on (call before any session is pooled).
    pub fn share_engine(&mut self, engine: &SessionEngine) {
        self.idle = engine.clone();
        self.counters = engine.state(&self.key);
    }

    /// The newest idle session still alive and with room for a stream, or a new one.
    pub async fn acquire(&self) -> Result<Lease, ConnectError> {
        let counters = self.idle.counters();
        while let Some(entry) = self.idle.take(&self.key) {
            let session = entry.value;
            session.pooled().store(false, Ordering::Release);
            if session.is_closed() {
                counters.record_cleaned(1);
                KeyCounters::bump(&self.counters.cleaned);
                continue;
            }
            if session.open_streams() >= self.settings.max_streams_per_session {
                continue; // full: it comes back when one of its streams ends
            }
            counters.record_reused();
            KeyCounters::bump(&self.counters.reused);
            self.checked_out();
            self.share_if_room(&session);
            return Ok(Lease { session, reused: true });
        }
        let session = self.connector.connect().await?;
        counters.record_new();
        KeyCounters::bump(&self.counters.created);
        self.checked_out();
        self.share_if_room(&session);
        Ok(Lease { session, reused: false })
    }

    fn checked_out(&self) {
        self.idle.counters().record_checkout();
        KeyCounters::bump(&self.counters.active);
    }

    /// With several streams per session allowed, a session in use stays available
    /// to others while it has room.
    /// A full idle pool just doesn't take it: the caller is about to open a stream on it
    /// (closing it here, as a release does, would fail that stream).
    fn share_if_room(&self, session: &ClientSession) {
        if session.open_streams() + 1 < self.settings.max_streams_per_session {
            let _ = self.give_back(session.clone());
        }
    }

    /// Takes back a session whose stream has ended.
    pub fn release(&self, session: ClientSession) {
        self.idle.counters().record_checkin();
        KeyCounters::drop_one(&self.counters.active);
        if !session.is_closed()
            && let Some(refused) = self.give_back(session)
            && refused.open_streams() == 0
        {
            refused.close("idle pool full");
        }
    }

    /// Pools the session; returns it when the pool is full.
    fn give_back(&self, session: ClientSession) -> Option<ClientSession> {
        if session.pooled().swap(true, Ordering::AcqRel) {
            return None; // already in the pool
        }
        let refused = self.idle.give(&self.key, Idle::new(session)).err()?;
        refused.value.pooled().store(false, Ordering::Release);
        Some(refused.value)
    }

    /// Closes sessions idle longer than the idle timeout, except the newest
    /// `min_idle`, and forgets dead ones.
    pub fn sweep(&self) {
        sweep_all(std::slice::from_ref(self));
    }

    /// Settles this server's expired sessions: the newest live ones, up to `min_idle` in
    /// the pool, go back for another idle period; the rest are closed and counted.
    fn settle_expired(&self, mut expired: Vec<Idle<ClientSession>>) {
        let still_idle = self.idle.idle_count(&self.key);
        // Newest first, so the sessions kept are the most recently used.
        expired.sort_by_key(|entry| std::cmp::Reverse(entry.idle_since));
        let mut keep = self.settings.min_idle.saturating_sub(still_idle);
        let now = Instant::now();
        for entry in expired {
            let entry = if keep > 0 && !entry.value.is_closed() {
                // Kept sessions start a new idle period, so `take` does not drop them as expired.
                match self.idle.give(&self.key, Idle { idle_since: now, ..entry }) {
                    Ok(()) => {
                        keep -= 1;
                        continue;
                    }
                    Err(entry) => entry,
                }
            } else {
                entry
            };
            self.idle.counters().record_cleaned(1);
            KeyCounters::bump(&self.counters.cleaned);
            entry.value.pooled().store(false, Ordering::Release);
            if entry.value.open_streams() == 0 {
                entry.value.close("idle timeout");
            }
        }
    }

    /// Closes every idle session of the engine (shutdown); returns how many. With a
    /// shared engine, the first pool's call closes them all.
    pub fn close_idle(&self) -> usize {
        let idle = self.idle.drain();
        for (_, entry) in &idle {
            entry.value.pooled().store(false, Ordering::Release);
            entry.value.close("client shutting down");
        }
        idle.len()
    }

    /// The engine's counters: with a shared engine, those of all servers together.
    pub fn stats(&self) -> PoolStatsSnapshot {
        let mut s = self.idle.counters().snapshot();
        s.keys = self.idle.key_count() as u64;
        s
    }

    /// This server's idle sessions, by name (empty when none).
    pub fn idle_by_server(&self) -> Vec<(PoolKey, usize)> {
        let n = self.idle.idle_count(&self.key);
        if n == 0 { Vec::new() } else { vec![(self.key.to_string().into(), n)] }
    }

    pub fn pool_type(&self) -> PoolType {
        self.settings.pool_type
    }

    pub fn settings(&self) -> &SessionPoolSettings {
        &self.settings
    }

    /// This server's counters.
    pub fn key_stats(&self) -> KeyStats {
        self.counters.stats(self.key.to_string(), self.idle.idle_count(&self.key))
    }
}

/// One sweep of the engine `pools` share, each pool settling its own server's expired
/// sessions. Sessions of a server no pool here owns are closed.
pub fn sweep_all(pools: &[SessionPool]) {
    let Some(first) = pools.first() else { return };
    let mut expired = first.idle.sweep(Instant::now());
    for pool in pools {
        let (mine, rest): (Vec<_>, Vec<_>) = expired.into_iter().partition(|(key, _)| *key == pool.key);
        expired = rest;
        pool.settle_expired(mine.into_iter().map(|(_, entry)| entry).collect());
    }
    for (_, entry) in expired {
        first.idle.counters().record_cleaned(1);
        entry.value.pooled().store(false, Ordering::Release);
        if entry.value.open_streams() == 0 {
            entry.value.close("idle timeout");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::tls::{Trust, client_config};
    use crate::proto::PaddingScheme;
    use crate::server::outbound_pool::OutboundSettings;
    use crate::server::tls::Identity;
    use crate::server::{ServerConfig, run};

    async fn server() -> Address {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = Address::socket(listener.local_addr().unwrap());
        let config = ServerConfig {
            tls: Identity::self_signed().unwrap().server_config().unwrap(),
            passwords: vec![PasswordHash::of("pw")],
            padding: PaddingScheme::default(),
            downlink_padding: None,
            connect_timeout: Duration::from_secs(2),
            dns_strategy: Default::default(),
            resolver: Default::default(),
            keepalive: Default::default(),
            proxy_protocol_from: vec![],
            handshake_timeout: Duration::from_secs(5),
            max_handshakes: 16,
            probe: Default::default(),
            max_streams_per_session: 64,
            outbound: OutboundSettings {
                pool_type: PoolType::Lock,
                max_per_target: 10,
                min_idle: 0,
                max_idle_total: 10,
                max_idle_time: Duration::from_secs(60),
                max_lifetime: Duration::from_secs(60),
                warm_after: Duration::ZERO,
            },
            warmup: vec![],
            stats_interval: Duration::from_secs(60),
            udp: crate::server::udp::UdpSettings::default(),
        };
        tokio::spawn(run(listener, config));
        address
    }

    fn pool(server: Address, settings: SessionPoolSettings) -> SessionPool {
        let connector = Connector {
            server,
            server_name: ServerName::try_from("localhost").unwrap(),
            tls: TlsConnector::from(client_config(&Trust::Insecure).unwrap()),
            password: PasswordHash::of("pw"),
            session_config: SessionConfig::default(),
            client_options: ClientSessionOptions::default(),
            connect_timeout: Duration::from_secs(2),
            keepalive: Default::default(),
            bind: None,
        };
        SessionPool::new(connector, settings)
    }

    fn settings(pool_type: PoolType) -> SessionPoolSettings {
        SessionPoolSettings {
            pool_type,
            idle_timeout: Duration::from_secs(60),
            min_idle: 0,
            max_streams_per_session: 1,
            max_idle: 16,
        }
    }

    const ENGINES: [PoolType; 3] = [PoolType::Lock, PoolType::LockFree, PoolType::HighPerf];

    #[tokio::test]
    async fn newest_idle_session_is_reused_and_busy_ones_are_not_shared() {
        let server = server().await;
        for engine in ENGINES {
            let pool = pool(server.clone(), settings(engine));
            let a = pool.acquire().await.unwrap();
            let b = pool.acquire().await.unwrap();
            assert!(!a.reused && !b.reused, "one stream per session: a busy session is not shared");
            let (a, b) = (a.session, b.session);
            pool.release(a.clone());
            pool.release(b.clone());
            let again = pool.acquire().await.unwrap();
            assert!(again.reused);
            assert!(again.session.same_as(&b), "{engine}: newest first");
            let stats = pool.stats();
            assert_eq!((stats.new, stats.reused, stats.active), (2, 1, 1), "{engine}");
        }
    }

    #[tokio::test]
    async fn a_dead_idle_session_is_skipped_and_replaced() {
        let server = server().await;
        let pool = pool(server, settings(PoolType::LockFree));
        let lease = pool.acquire().await.unwrap();
        pool.release(lease.session.clone());
        lease.session.close("server went away");
        let next = pool.acquire().await.unwrap();
        assert!(!next.reused);
        assert_eq!(pool.stats().cleaned, 1);
    }

    #[tokio::test]
    async fn sweep_closes_idle_sessions_but_keeps_the_newest_minimum() {
        let server = server().await;
        let mut short = settings(PoolType::HighPerf);
        short.idle_timeout = Duration::from_millis(50);
        short.min_idle = 1;
        let pool = pool(server, short);
        let leases = [pool.acquire().await.unwrap(), pool.acquire().await.unwrap(), pool.acquire().await.unwrap()];
        let sessions: Vec<ClientSession> = leases.iter().map(|l| l.session.clone()).collect();
        for lease in leases {
            pool.release(lease.session);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        pool.sweep();
        assert_eq!(pool.idle_by_server().iter().map(|(_, n)| n).sum::<usize>(), 1);
        assert_eq!(pool.stats().cleaned, 2);
        assert!(sessions[0].is_closed() && sessions[1].is_closed());
        assert!(!sessions[2].is_closed(), "the newest stays open");
        assert!(pool.acquire().await.unwrap().reused);
    }

    #[tokio::test]
    async fn a_new_session_the_full_idle_pool_cannot_share_is_still_handed_out_open() {
        let server = server().await;
        let mut shared = settings(PoolType::Lock);
        shared.max_streams_per_session = 4;
        shared.max_idle = 1;
        let pool = pool(server, shared);
        // Both find the pool empty and connect; the second finds it full when sharing.
        let (a, b) = tokio::join!(pool.acquire(), pool.acquire());
        let (a, b) = (a.unwrap(), b.unwrap());
        assert!(!a.reused && !b.reused);
        assert!(!a.session.is_closed() && !b.session.is_closed(), "a session in use was closed");
    }

    #[tokio::test]
    async fn servers_share_one_engine_keyed_by_server() {
        let (one, two) = (server().await, server().await);
        for engine in ENGINES {
            let mut pools = [pool(one.clone(), settings(engine)), pool(two.clone(), settings(engine))];
            let shared = new_session_engine(&settings(engine), pools.len());
            for pool in &mut pools {
                pool.share_engine(&shared);
            }
            let (a, b) = (pools[0].acquire().await.unwrap(), pools[1].acquire().await.unwrap());
            pools[0].release(a.session);
            pools[1].release(b.session);
            assert_eq!(shared.key_count(), 2, "{engine}: one key per server");
            assert_eq!(pools[0].idle_by_server(), [(PoolKey::from(one.to_string()), 1)], "{engine}");
            assert!(pools[1].acquire().await.unwrap().reused, "{engine}: each server reuses its own");
            let (s0, s1) = (pools[0].key_stats(), pools[1].key_stats());
            assert_eq!((s0.created, s0.reused, s1.created, s1.reused), (1, 0, 1, 1), "{engine}");
            let total = pools[0].stats();
            assert_eq!((total.new, total.reused, total.keys), (2, 1, 2), "{engine}: the engine counts both");
        }
    }

    #[tokio::test]
    async fn several_streams_per_session_share_one_connection() {
        let server = server().await;
        let mut shared = settings(PoolType::Lock);
        shared.max_streams_per_session = 4;
        let pool = pool(server, shared);
        let first = pool.acquire().await.unwrap();
        let _stream = first.session.open_stream(bytes::Bytes::new()).await.unwrap();
        let second = pool.acquire().await.unwrap();
        assert!(second.reused, "a session with room is shared");
        assert_eq!(pool.stats().new, 1);
    }
}
