//! The AnyTLS server: accepts TLS, authenticates, and serves each session's
//! streams by dialing their destinations.

pub mod dial;
pub mod limits;
pub mod outbound;
pub mod outbound_pool;
pub mod tls;
pub mod udp;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use crate::proto::Frame;
use crate::proto::PaddingScheme;
use crate::proto::PasswordHash;
use crate::proto::auth::{AuthParse, parse_auth_block};
use crate::proto::frame::Command;
use crate::session::{Session, SessionConfig, Stream, StreamHandler};
use limits::{Gate, ServerLimits};
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

/// Accepts connections until the task is dropped, with the default [`ServerLimits`].
pub async fn run(listener: TcpListener, config: ServerConfig) {
    let pool = new_outbound_pool(&config);
    run_until(listener, config, pool, ServerLimits::default(), std::future::pending()).await
}

/// The outbound pool `config` asks for, for a caller that wants to watch it (`--api`)
/// before handing it to [`run_until`].
pub fn new_outbound_pool(config: &ServerConfig) -> OutboundPool {
    OutboundPool::new(config.outbound.clone(), Dialer { connect_timeout: config.connect_timeout })
}

/// Accepts connections until `shutdown` resolves, then stops accepting, lets streams
/// in flight finish (at most `limits.drain_timeout`), closes every session and the
/// outbound pool's warm connections, and logs the final pool statistics.
pub async fn run_until(
    listener: TcpListener,
    config: ServerConfig,
    pool: OutboundPool,
    limits: ServerLimits,
    shutdown: impl Future<Output = ()>,
) {
    let acceptor = TlsAcceptor::from(config.tls.clone());
    let config = Arc::new(config);
    let session_config = SessionConfig {
        padding: Arc::new(ArcSwap::from_pointee(config.padding.clone())),
        max_streams: config.max_streams_per_session,
        stream_idle_timeout: limits.stream_idle_timeout,
        ..SessionConfig::default()
    };
    let gate = Arc::new(Gate::new(limits));
    let handshakes = Arc::new(Semaphore::new(config.max_handshakes));
    log_pool_configuration(&config);
    for target in &config.warmup {
        pool.warm_up(target);
    }
    let maintenance = tokio::spawn(maintain_pool(pool.clone(), config.stats_interval));
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = crate::accept::accept_with_backoff(&listener) => accepted,
            () = &mut shutdown => break,
        };
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            log::warn!("{peer}: dropped, {} handshakes already in progress", config.max_handshakes);
            continue;
        };
        let acceptor = acceptor.clone();
        let config = config.clone();
        let session_config = session_config.clone();
        let pool = pool.clone();
        let gate = gate.clone();
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
            let _session_place = match gate.admit_session() {
                Ok(place) => place,
                Err(why) => return refuse_session(tls, peer, &why).await,
            };
            let handler = stream_handler(gate.clone(), pool, config.udp, peer.to_string());
            let session = Session::server(tls, session_config, leftover, handler);
            log::debug!("{peer}: session open");
            let reason = tokio::select! {
                reason = session.closed() => reason,
                () = gate.closing() => {
                    session.close("server shutting down");
                    "server shutting down".into()
                }
            };
            log::debug!("{peer}: session closed: {reason}");
        });
    }
    drop(listener);
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
    let closed = pool.close_idle();
    crate::pool::log_stats(&pool.stats(), &pool.idle_by_target(), &pool.stats_line_extra());
    log::info!("shut down: sessions closed, {closed} warm outbound connections closed");
}

/// Each new stream gets a place under the server-wide caps, or a SYNACK error.
fn stream_handler(gate: Arc<Gate>, pool: OutboundPool, udp: udp::UdpSettings, peer: String) -> StreamHandler {
    Arc::new(move |mut stream: Stream| match gate.admit_stream() {
        Ok(ticket) => {
            tokio::spawn(outbound::serve_stream(stream, pool.clone(), udp, peer.clone(), ticket));
        }
        Err(why) => {
            log::warn!("{peer}: stream {} refused: {why}", stream.id());
            tokio::spawn(async move {
                let _ = stream.send_synack(Err(why)).await;
            });
        }
    })
}

/// An authenticated client over the session cap: told why (Alert), then closed.
async fn refuse_session(mut tls: TlsStream, peer: SocketAddr, why: &str) {
    log::warn!("{peer}: session refused: {why}");
    let mut alert = BytesMut::new();
    Frame::new(Command::Alert, 0, why.as_bytes().to_vec()).encode(&mut alert).expect("short alert");
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        tls.write_all(&alert).await?;
        tls.shutdown().await
    })
    .await;
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
                crate::pool::log_stats(&pool.stats(), &pool.idle_by_target(), &pool.stats_line_extra());
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
