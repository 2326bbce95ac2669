//! `anytls-server health`: is the server on this machine answering? One TCP connection to
//! its own listen address and a TLS handshake, then a close before any data, which the
//! server takes as a visitor that left (a DEBUG line; no counter, no fallback relay), so a
//! container's HEALTHCHECK every 30 s neither fills the log nor skews the metrics.
//!
//! The certificate is not checked: what is asked is whether the listener serves TLS, not
//! who it is (the self-signed certificate of a new container is as good as any).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;

use crate::client::tls::{Trust, client_config};

/// How long a probe may take; a container HEALTHCHECK's own timeout should be longer.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// The address to probe for a listen address: a wildcard listen is reached on loopback.
pub fn probe_address(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// One TLS handshake with `addr` within `timeout`: how long it took, or why it failed.
pub fn probe(addr: SocketAddr, timeout: Duration) -> Result<Duration, String> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let started = Instant::now();
        match tokio::time::timeout(timeout, handshake(addr)).await {
            Ok(Ok(())) => Ok(started.elapsed()),
            Ok(Err(why)) => Err(why),
            Err(_) => Err(format!("no TLS handshake within {timeout:?}")),
        }
    })
}

async fn handshake(addr: SocketAddr) -> Result<(), String> {
    let config = client_config(&Trust::Insecure).map_err(|e| e.to_string())?;
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("cannot connect: {e}"))?;
    let name = ServerName::IpAddress(addr.ip().into());
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS handshake failed: {e}"))?;
    // close_notify, so the server sees a clean close and not a reset.
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut tls).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_listen_is_probed_on_loopback_of_its_family() {
        let probe = |listen: &str| probe_address(listen.parse().unwrap()).to_string();
        assert_eq!(probe("0.0.0.0:8443"), "127.0.0.1:8443");
        assert_eq!(probe("[::]:443"), "[::1]:443");
        assert_eq!(probe("192.0.2.7:8443"), "192.0.2.7:8443");
    }

    #[test]
    fn a_port_nobody_listens_on_is_unhealthy_with_the_reason() {
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let why = probe(free, PROBE_TIMEOUT).unwrap_err();
        assert!(why.starts_with("cannot connect:"), "{why}");
    }

    #[test]
    fn a_listener_that_never_speaks_tls_is_unhealthy_at_the_timeout() {
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let why = probe(silent.local_addr().unwrap(), Duration::from_millis(200)).unwrap_err();
        assert!(why.contains("no TLS handshake within"), "{why}");
    }
}
