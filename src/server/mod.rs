//! The AnyTLS server: accepts TLS, authenticates, and serves each session's
//! streams by dialing their destinations.

pub mod outbound;
pub mod outbound_pool;
pub mod tls;
pub mod udp;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use crate::proto::PaddingScheme;
use crate::proto::PasswordHash;
use crate::proto::auth::{AuthParse, parse_auth_block};
use crate::session::{Session, SessionConfig, Stream, StreamHandler};
use outbound::Dialer;
use outbound_pool::{OutboundPool, OutboundSettings};

/// Everything the server needs to run.
pub struct ServerConfig {
    pub tls: Arc<rustls::ServerConfig>,
    pub passwords: Vec<PasswordHash>,
    pub padding: PaddingScheme,
    pub connect_timeout: Duration,
    /// Time a new connection has to finish TLS and send its authentication block.
    pub handshake_timeout: Duration,
    /// Connections allowed to be in the handshake/authentication phase at once.
    pub max_handshakes: usize,
    pub max_streams_per_session: usize,
    pub outbound: OutboundSettings,
    /// Targets to warm up at start-up.
    pub warmup: Vec<crate::proto::Address>,
    /// How often the pool statistics are logged.
    pub stats_interval: Duration,
    /// UDP-over-TCP streams.
    pub udp: udp::UdpSettings,
}

/// Accepts connections until the task is dropped.
pub async fn run(listener: TcpListener, config: ServerConfig) {
    let pool = new_outbound_pool(&config);
    run_with_pool(listener, config, pool).await
}

/// The outbound pool `config` asks for, for a caller that wants to watch it (`--api`)
/// before handing it to [`run_with_pool`].
pub fn new_outbound_pool(config: &ServerConfig) -> OutboundPool {
    OutboundPool::new(config.outbound.clone(), Dialer { connect_timeout: config.connect_timeout })
}

/// [`run`] with a pool made by [`new_outbound_pool`].
pub async fn run_with_pool(listener: TcpListener, config: ServerConfig, pool: OutboundPool) {
    let acceptor = TlsAcceptor::from(config.tls.clone());
    let config = Arc::new(config);
    let session_config = SessionConfig {
        padding: Arc::new(ArcSwap::from_pointee(config.padding.clone())),
        max_streams: config.max_streams_per_session,
        ..SessionConfig::default()
    };
    let handshakes = Arc::new(Semaphore::new(config.max_handshakes));
    log_pool_configuration(&config);
    for target in &config.warmup {
        pool.warm_up(target);
    }
    tokio::spawn(maintain_pool(pool.clone(), config.stats_interval));
    loop {
        let (tcp, peer) = crate::accept::accept_with_backoff(&listener).await;
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            log::warn!("{peer}: dropped, {} handshakes already in progress", config.max_handshakes);
            continue;
        };
        let acceptor = acceptor.clone();
        let config = config.clone();
        let session_config = session_config.clone();
        let pool = pool.clone();
        tokio::spawn(async move {
            let authenticated =
                tokio::time::timeout(config.handshake_timeout, handshake(tcp, peer, &acceptor, &config)).await;
            drop(permit);
            let (tls, leftover) = match authenticated {
                Ok(Ok(done)) => done,
                Ok(Err(why)) => {
                    log::warn!("{peer}: {why}");
                    return;
                }
                Err(_) => {
                    log::warn!("{peer}: no authentication within {:?}", config.handshake_timeout);
                    return;
                }
            };
            let peer_name = peer.to_string();
            let handler: StreamHandler = Arc::new(move |stream: Stream| {
                tokio::spawn(outbound::serve_stream(stream, pool.clone(), config.udp, peer_name.clone()));
            });
            let session = Session::server(tls, session_config, leftover, handler);
            log::debug!("{peer}: session open");
            let reason = session.closed().await;
            log::debug!("{peer}: session closed: {reason}");
        });
    }
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
async fn maintain_pool(pool: OutboundPool, stats_interval: Duration) {
    let sweep_every = (pool.settings().max_idle_time / 4).clamp(Duration::from_millis(250), Duration::from_secs(30));
    let mut sweep = tokio::time::interval(sweep_every);
    let mut stats = tokio::time::interval_at(tokio::time::Instant::now() + stats_interval, stats_interval);
    loop {
        tokio::select! {
            _ = sweep.tick() => pool.maintain(),
            _ = stats.tick() => {
                crate::pool::log_stats(&pool.stats(), &pool.idle_by_target(), &format!(", Warmed: {}", pool.warmed()));
            }
        }
    }
}

type TlsStream = tokio_rustls::server::TlsStream<TcpStream>;

/// TLS, then the authentication block. A wrong password gets no answer at all.
async fn handshake(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: &TlsAcceptor,
    config: &ServerConfig,
) -> Result<(TlsStream, BytesMut), String> {
    let _ = tcp.set_nodelay(true);
    let mut tls = acceptor.accept(tcp).await.map_err(|err| format!("TLS handshake failed: {err}"))?;
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        match parse_auth_block(&buf, &config.passwords) {
            AuthParse::Accepted { user, block_len } => {
                log::debug!("{peer}: authenticated as user {user}");
                let _ = buf.split_to(block_len);
                return Ok((tls, buf));
            }
            AuthParse::Rejected => return Err("authentication failed (wrong password)".into()),
            AuthParse::Incomplete { needed } => {
                buf.reserve(needed.saturating_sub(buf.len()));
                let read = tls.read_buf(&mut buf).await.map_err(|err| format!("read failed: {err}"))?;
                if read == 0 {
                    return Err("closed before authenticating".into());
                }
            }
        }
    }
}
