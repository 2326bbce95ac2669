//! Serving one stream: read its destination, dial it, answer SYNACK, relay.

use std::io;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::outbound_pool::OutboundPool;
use super::udp::{UdpSettings, serve_udp};
use crate::proto::Address;
use crate::proto::address::Host;
use crate::proto::udp::is_udp_over_tcp;
use crate::session::{Stream, relay};

/// The reference client closes a reused session whose SYN gets no SYNACK within
/// 3 s; answer by this time even if the dial is still going (a later failure then
/// ends the stream with FIN).
const SYNACK_BUDGET: Duration = Duration::from_millis(2500);
/// Longest destination in SOCKS form: type, length, 255-byte name, port.
const MAX_ADDRESS_LEN: usize = 1 + 1 + 255 + 2;

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
    #[error("dial {0}: {1}")]
    Other(String, io::Error),
}

/// Opens outbound TCP connections.
#[derive(Debug, Clone)]
pub struct Dialer {
    pub connect_timeout: Duration,
}

impl Dialer {
    pub async fn connect(&self, destination: &Address) -> Result<TcpStream, DialError> {
        let target = destination.to_string();
        let attempt = async {
            let stream = match &destination.host {
                Host::Ip(ip) => TcpStream::connect((*ip, destination.port)).await,
                Host::Domain(name) => TcpStream::connect((name.as_str(), destination.port)).await,
            };
            stream.map_err(|err| classify(&target, err))
        };
        let stream = tokio::time::timeout(self.connect_timeout, attempt)
            .await
            .map_err(|_| DialError::TimedOut(target.clone()))??;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}

fn classify(target: &str, err: io::Error) -> DialError {
    use io::ErrorKind::*;
    match err.kind() {
        ConnectionRefused => DialError::Refused(target.to_string()),
        TimedOut => DialError::TimedOut(target.to_string()),
        HostUnreachable | NetworkUnreachable | AddrNotAvailable => {
            DialError::Unreachable(target.to_string(), err.to_string())
        }
        // Name resolution failures come back as uncategorised errors.
        _ if err.to_string().contains("lookup") || err.to_string().contains("resolve") => {
            DialError::Unreachable(target.to_string(), err.to_string())
        }
        _ => DialError::Other(target.to_string(), err),
    }
}

/// Reads the destination from the stream's first data; returns it with whatever
/// payload followed it in the same frames.
async fn read_destination(stream: &mut Stream) -> Result<(Address, BytesMut), String> {
    let mut buf = BytesMut::new();
    loop {
        match Address::decode(&buf) {
            Ok(Some((address, used))) => {
                let _ = buf.split_to(used);
                return Ok((address, buf));
            }
            Ok(None) if buf.len() >= MAX_ADDRESS_LEN => {
                return Err("destination address too long".into());
            }
            Ok(None) => {}
            Err(err) => return Err(format!("invalid destination address: {err}")),
        }
        match stream.read().await {
            Ok(Some(data)) => buf.extend_from_slice(&data),
            Ok(None) => return Err("stream closed before its destination".into()),
            Err(err) => return Err(err.to_string()),
        }
    }
}

/// Serves one stream to the end. `peer` names the client in logs.
pub async fn serve_stream(mut stream: Stream, pool: OutboundPool, udp: UdpSettings, peer: String) {
    let (destination, early_payload) = match read_destination(&mut stream).await {
        Ok(found) => found,
        Err(why) => {
            log::warn!("{peer}: stream {}: {why}", stream.id());
            let _ = stream.send_synack(Err(why)).await;
            return;
        }
    };
    if is_udp_over_tcp(&destination) {
        // UDP over TCP has its own sockets; the outbound TCP pool is not involved.
        return serve_udp(stream, early_payload, udp, peer).await;
    }
    let dial = pool.acquire(&destination);
    tokio::pin!(dial);
    let answered_early;
    let dialed = tokio::select! {
        dialed = &mut dial => { answered_early = false; dialed }
        _ = tokio::time::sleep(SYNACK_BUDGET) => {
            // Keep the client's session alive: say yes now, FIN later if the dial fails.
            answered_early = true;
            if stream.send_synack(Ok(())).await.is_err() { return; }
            dial.await
        }
    };
    let mut outbound = match dialed {
        Ok(outbound) => outbound,
        Err(err) => {
            log::warn!("{peer}: {err}");
            if !answered_early {
                let _ = stream.send_synack(Err(err.to_string())).await;
            }
            return; // dropping the stream sends FIN where one is owed
        }
    };
    if !answered_early && stream.send_synack(Ok(())).await.is_err() {
        return;
    }
    if !early_payload.is_empty() && outbound.tcp.write_all(&early_payload).await.is_err() {
        return;
    }
    let how = if outbound.reused { "warm" } else { "new" };
    log::debug!("{peer}: stream {} -> {destination} ({how} connection)", stream.id());
    // The stream owns the connection until it ends; it is then closed, never pooled.
    let (stats, error) = relay(stream, outbound.tcp).await;
    match error {
        Some(error) => log::debug!("{peer}: {destination}: relay ended: {error}"),
        None => log::debug!("{peer}: {destination}: {} bytes up, {} down", stats.sent, stats.received),
    }
}
