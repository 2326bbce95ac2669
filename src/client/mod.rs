//! The AnyTLS client: a local proxy port whose connections travel as streams over
//! pooled TLS sessions to the server.

pub mod endpoint;
pub mod error;
pub mod failover;
pub mod inbound;
pub mod link;
pub mod servers;
pub mod sessions;
pub mod tls;
pub mod udp;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::metrics::{ConnectionPoolStats, MemoryPoolStats, MetricsSource};
use crate::session::buffers::RelayBuffers;
use crate::session::{OpenError, Stream, relay};
use crate::shutdown::InFlight;
use error::OpenFailure;
use inbound::{Credentials, InboundError};
use servers::{ServerLease, Servers};

/// How often the "connections full" warning may be repeated while the cap is reached.
const FULL_WARNING_EVERY: Duration = Duration::from_secs(60);

pub struct ClientConfig {
    /// The servers and the policy choosing among them (one server: no choice).
    pub servers: Arc<Servers>,
    pub credentials: Option<Credentials>,
    /// How often idle sessions are checked for expiry.
    pub idle_check_interval: Duration,
    /// How often the pool statistics are logged.
    pub stats_interval: Duration,
    /// How long a local client has to finish its greeting and request.
    pub local_handshake_timeout: Duration,
    /// Local connections served at once. Beyond it the client stops accepting: new
    /// connections wait in the listen queue until one ends, none is refused.
    pub max_connections: usize,
    /// The read buffers of this client's relays (`--buffer-pool`).
    pub relay_buffers: Arc<RelayBuffers>,
}

impl ClientConfig {
    /// What the monitoring API shows of this client.
    pub fn metrics(&self) -> Arc<dyn MetricsSource> {
        Arc::new(ClientMetrics { servers: self.servers.clone(), relay_buffers: self.relay_buffers.clone() })
    }
}

/// The client as the metrics room sees it: its session pools and its relay buffers.
struct ClientMetrics {
    servers: Arc<Servers>,
    relay_buffers: Arc<RelayBuffers>,
}

impl MetricsSource for ClientMetrics {
    fn connection_pool_stats(&self) -> ConnectionPoolStats {
        self.servers.connection_pool_stats()
    }

    fn memory_pool_stats(&self) -> MemoryPoolStats {
        MemoryPoolStats::of(&self.relay_buffers)
    }
}

/// The warning owed when the proxy port can be reached from other machines and asks no
/// password: anyone who reaches it uses the server (and its user's quota) through it.
pub fn exposure_warning(local: std::net::SocketAddr, credentials: Option<&Credentials>) -> Option<String> {
    (credentials.is_none() && !local.ip().is_loopback()).then(|| {
        format!(
            "proxy on {local} is reachable from other machines and has no --socks-user/--socks-pass: anyone \
             who can reach it can use the server through it"
        )
    })
}

/// Serves the local port until the task is dropped.
pub async fn run(listener: TcpListener, config: ClientConfig) {
    run_until(listener, config, Duration::from_secs(10), std::future::pending()).await
}

/// Serves the local port until `shutdown` resolves, then stops accepting, lets local
/// connections in flight finish (at most `drain_timeout`), closes every idle session
/// and logs the final pool statistics.
pub async fn run_until(
    listener: TcpListener,
    config: ClientConfig,
    drain_timeout: Duration,
    shutdown: impl Future<Output = ()>,
) {
    if let Ok(local) = listener.local_addr()
        && let Some(warning) = exposure_warning(local, config.credentials.as_ref())
    {
        log::warn!("{warning}");
    }
    let config = Arc::new(config);
    let maintenance = tokio::spawn(maintain_pool(config.clone()));
    let probes = tokio::spawn(config.servers.clone().probe_forever());
    let in_flight = InFlight::default();
    let places = Arc::new(Semaphore::new(config.max_connections.max(1)));
    let mut last_full_warning: Option<Instant> = None;
    tokio::pin!(shutdown);
    loop {
        let place = match places.clone().try_acquire_owned() {
            Ok(place) => place,
            Err(_) => {
                if last_full_warning.is_none_or(|at| at.elapsed() >= FULL_WARNING_EVERY) {
                    last_full_warning = Some(Instant::now());
                    log::warn!(
                        "{} local connections open (--max-connections): new ones wait in the listen queue until \
                         one ends",
                        config.max_connections
                    );
                }
                tokio::select! {
                    place = places.clone().acquire_owned() => place.expect("the semaphore is never closed"),
                    () = &mut shutdown => break,
                }
            }
        };
        let (tcp, peer) = tokio::select! {
            accepted = crate::accept::accept_with_backoff(&listener) => accepted,
            () = &mut shutdown => break,
        };
        let config = config.clone();
        let connection = in_flight.start();
        tokio::spawn(async move {
            if let Err(err) = serve_connection(tcp, &config).await {
                log::debug!("{peer}: {err}");
            }
            drop((connection, place));
        });
    }
    drop(listener);
    log::info!(
        "shutting down: no longer accepting; {} connections in flight get up to {drain_timeout:?} to finish",
        in_flight.count()
    );
    let cut_off = in_flight.drain(drain_timeout).await;
    if cut_off > 0 {
        log::warn!("{cut_off} connections still open after the drain time: closed");
    }
    maintenance.abort();
    probes.abort();
    let closed = config.servers.close_idle();
    config.servers.log_stats();
    log::info!("shut down: {closed} idle sessions closed");
}

/// Sweeps idle sessions and logs the pool statistics.
async fn maintain_pool(config: Arc<ClientConfig>) {
    let mut sweep = tokio::time::interval(config.idle_check_interval);
    let mut stats = crate::metrics::StatsTicker::every(config.stats_interval);
    loop {
        tokio::select! {
            _ = sweep.tick() => config.servers.sweep(),
            () = stats.tick() => config.servers.log_stats(),
        }
    }
}

/// Why serving one local connection ended early. Logged at DEBUG: what went wrong is
/// the local client's business, and the open failures that matter are logged where
/// they happen.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Request(#[from] InboundError),
    #[error("local connection: {0}")]
    Local(#[from] std::io::Error),
    #[error("{destination}: relay ended: {error}")]
    Relay { destination: String, error: String },
}

async fn serve_connection(mut tcp: TcpStream, config: &ClientConfig) -> Result<(), ServeError> {
    let _ = tcp.set_nodelay(true);
    let request = inbound::read_request(&mut tcp, config.credentials.as_ref(), config.local_handshake_timeout).await?;
    if request.is_udp_associate() {
        return udp::serve_associate(tcp, request, config).await;
    }
    let destination = request.destination.to_string();
    let mut first_data = BytesMut::with_capacity(request.destination.encoded_len() + request.early_data.len());
    request.destination.encode(&mut first_data);
    first_data.extend_from_slice(&request.early_data);
    let (lease, stream) = match open_stream(config, first_data.freeze(), &destination).await {
        Ok(opened) => opened,
        Err(failure) => return Ok(request.reply_failure(&mut tcp, &failure).await?),
    };
    request.reply_success(&mut tcp).await?;
    log::debug!("{destination}: stream {} open", stream.id());
    let (stats, error) = relay(stream, tcp, &config.relay_buffers).await;
    release(config, lease);
    match error {
        Some(error) => Err(ServeError::Relay { destination, error }),
        None => {
            log::debug!("{destination}: {} bytes up, {} down", stats.sent, stats.received);
            Ok(())
        }
    }
}

/// Gives a session back once its stream has ended.
fn release(config: &ClientConfig, lease: ServerLease) {
    config.servers.release(lease);
}

/// Opens a stream whose first data is `first_data` (destination and any request that
/// must not wait for SYNACK) and waits for the server's answer. A reused session may
/// have died while idle; then one fresh session is tried.
async fn open_stream(
    config: &ClientConfig,
    first_data: Bytes,
    destination: &str,
) -> Result<(ServerLease, Stream), OpenFailure> {
    let servers = &config.servers;
    let mut attempts = 0;
    loop {
        attempts += 1;
        let lease = match servers.acquire().await {
            Ok(lease) => lease,
            Err(why) => {
                log::warn!("{destination}: no session to the server: {why}");
                return Err(why.into());
            }
        };
        let opened = match lease.lease.session.open_stream(first_data.clone()).await {
            Ok(mut stream) => stream.wait_open().await.map(|()| stream),
            Err(closed) => Err(OpenError::Session(closed)),
        };
        match opened {
            Ok(stream) => {
                servers.opened(lease.server);
                return Ok((lease, stream));
            }
            Err(OpenError::Refused(text)) => {
                // The target's fault, not the server's: the server did answer.
                servers.opened(lease.server);
                servers.release(lease);
                log::info!("{destination}: refused by the server: {text}");
                return Err(OpenError::Refused(text).into());
            }
            Err(OpenError::Session(closed)) if lease.lease.reused && attempts < 2 => {
                log::debug!("{destination}: reused session was dead ({closed}); retrying on a new one");
                servers.failed(lease.server);
                servers.release(lease);
            }
            Err(err) => {
                lease.lease.session.close("stream failed to open");
                servers.failed(lease.server);
                servers.release(lease);
                match &err {
                    // The likely cause first: this is what a user with a wrong password sees.
                    OpenError::Session(closed) if closed.looks_like_wrong_password() => log::warn!(
                        "wrong password? the server closed the connection without answering, as an AnyTLS \
                         server does for a wrong password: check -p/--password (or that the server is AnyTLS); \
                         while opening {destination} ({closed})"
                    ),
                    _ => log::warn!("{destination}: {err}"),
                }
                return Err(err.into());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proxy_port_open_beyond_loopback_without_a_password_is_warned_about() {
        let credentials = Credentials { username: "u".into(), password: "p".into() };
        for open in ["0.0.0.0:1080", "192.0.2.7:1080", "[::]:1080", "[2001:db8::1]:1080"] {
            let warning = exposure_warning(open.parse().unwrap(), None);
            assert!(warning.is_some_and(|w| w.contains("--socks-user")), "{open}");
            assert_eq!(exposure_warning(open.parse().unwrap(), Some(&credentials)), None, "{open} with a password");
        }
        for private in ["127.0.0.1:1080", "127.0.0.2:1080", "[::1]:1080"] {
            assert_eq!(exposure_warning(private.parse().unwrap(), None), None, "{private}");
        }
    }
}
