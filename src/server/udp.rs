//! Serving a UDP-over-TCP stream (docs/protocol.md §5, sing-box UoT v2).
//!
//! The stream's request is read before SYNACK, as reference clients send it without
//! waiting (answering first would deadlock them); a malformed request is refused in the
//! SYNACK. The reference client may also send the request only with the first datagram
//! (sing's lazy UDP-over-TCP connection), seconds later: a request not there within the
//! SYNACK budget is answered "ok" (reference clients drop a session whose SYN goes
//! unanswered for 3 s) and still waited for, up to the UDP idle timeout; if it then
//! turns out bad, the stream ends with FIN. Each stream gets its own UDP socket, so replies reach exactly the stream that
//! asked and one client cannot see another's datagrams. A v4 socket is bound at once; a
//! v6 one only when a packet is for an IPv6 peer (hosts without IPv6 still serve v4).
//! The stream ends on FIN, on a malformed packet, or after an idle time with no
//! datagram either way: UDP has no close, so idleness is the only end a silent peer has.
//!
//! Memory per stream is bounded: the stream-side buffer never holds more than one
//! packet plus one frame, received datagrams wait in a short queue, and when that queue
//! is full the socket is simply not read (the kernel drops, as UDP may).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::ServerContext;
use super::access_log::{Network, Outcome, StreamClient, Traffic};
use super::dial::LookupOwner;
use crate::framed::{Framed, ReadError};
use crate::proto::Address;
use crate::proto::address::Host;
use crate::proto::udp::{Framing, MAX_HEADER_LEN, MAX_PAYLOAD, PacketDecoder, Request, RequestDecoder, packet_bytes};
use crate::session::{Stream, StreamReader, StreamWriter};

/// Same reason as the TCP path's SYNACK budget: reference clients drop a reused session
/// whose SYN is not answered within 3 s.
const SETUP_BUDGET: Duration = Duration::from_millis(2500);
/// Longest request: flag, SOCKS address (type, length, 255-byte name), port.
const MAX_REQUEST_LEN: usize = 1 + 1 + 1 + 255 + 2;
/// Received datagrams waiting for the stream.
const PACKET_QUEUE: usize = 64;
/// Resolved domain names remembered per stream (DNS-like traffic repeats names).
const RESOLVE_CACHE: usize = 256;
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// UDP limits, from the command line.
#[derive(Debug, Clone, Copy)]
pub struct UdpSettings {
    /// A stream with no datagram either way for this long is closed.
    pub idle_timeout: Duration,
}

impl Default for UdpSettings {
    fn default() -> UdpSettings {
        UdpSettings { idle_timeout: Duration::from_secs(60) }
    }
}

/// Serves one UoT stream to the end, then writes its access log record. `early` holds
/// bytes that followed the stream's destination (normally the request itself). Names are
/// resolved through the server's shared cache (its pool's), as `lookups`'s; each
/// datagram's target passes its policy.
pub async fn serve_udp(
    stream: Stream,
    early: BytesMut,
    settings: UdpSettings,
    client: StreamClient,
    context: Arc<ServerContext>,
    lookups: LookupOwner,
) {
    let started = std::time::Instant::now();
    let access_log = context.clone();
    let (destination, outcome, traffic) = relay_udp(stream, early, settings, &client, context, lookups).await;
    access_log.access_log.record(&client, Network::Udp, destination.as_deref(), traffic, started, outcome);
}

/// [`serve_udp`] but for the record: the requested destination (once read), how the
/// stream ended, and the datagram bytes each way.
async fn relay_udp(
    stream: Stream,
    early: BytesMut,
    settings: UdpSettings,
    client: &StreamClient,
    context: Arc<ServerContext>,
    lookups: LookupOwner,
) -> (Option<String>, Outcome, Traffic) {
    let peer = client.peer.as_str();
    let id = stream.id();
    let nothing = Traffic::default();
    let (mut reader, mut writer) = stream.split();
    // The setup borrows the reader only until it is done.
    let (mut outbound, buf) = {
        let setup = set_up(&mut reader, early, context, lookups, client.user.clone());
        tokio::pin!(setup);
        let in_budget = tokio::select! {
            ready = &mut setup => Some(ready),
            () = tokio::time::sleep(SETUP_BUDGET) => None,
        };
        match in_budget {
            Some(Ok(ready)) => {
                if let Err(closed) = writer.send_synack(Ok(())).await {
                    return (Some(ready.0.requested.clone()), Outcome::SessionClosed(closed.to_string()), nothing);
                }
                ready
            }
            Some(Err(why)) => {
                log::warn!("{peer}: stream {id}: {why}");
                let _ = writer.send_synack(Err(why.to_string())).await;
                return (None, why.outcome(), nothing);
            }
            None => {
                // Keep the client's session: say yes now, and go on waiting for the request.
                if let Err(closed) = writer.send_synack(Ok(())).await {
                    return (None, Outcome::SessionClosed(closed.to_string()), nothing);
                }
                log::debug!("{peer}: stream {id}: no UDP request within {SETUP_BUDGET:?}: answered, still waiting");
                match tokio::time::timeout(settings.idle_timeout, &mut setup).await {
                    Ok(Ok(ready)) => ready,
                    Ok(Err(why)) => {
                        log::warn!("{peer}: stream {id}: {why}");
                        return (None, why.outcome(), nothing); // dropping the writer sends FIN
                    }
                    Err(_) => {
                        let why = format!("UDP request not received within {:?}", settings.idle_timeout);
                        log::warn!("{peer}: stream {id}: {why}");
                        return (None, Outcome::IdleTimeout(why), nothing);
                    }
                }
            }
        }
    };
    log::debug!("{peer}: stream {id}: UDP ({}) open", outbound.describe());
    let mut queue = outbound.queue.take().expect("queue taken once");
    let activity = outbound.idle.clone();
    let outcome = tokio::select! {
        ended = upstream(&mut reader, buf, &mut outbound) => ended.map_or_else(|e| Outcome::Error(e.to_string()), |()| Outcome::Ok),
        ended = downstream(&mut queue, &mut writer) => ended.map_or_else(|e| Outcome::SessionClosed(e.to_string()), |()| Outcome::Ok),
        () = activity.expired(settings.idle_timeout) => Outcome::IdleTimeout(format!("idle for {:?}", settings.idle_timeout)),
    };
    let _ = writer.finish().await;
    let why = outcome.reason().unwrap_or("finished");
    log::debug!(
        "{peer}: stream {id}: UDP ended ({why}): {} datagrams up, {} down",
        outbound.up,
        outbound.idle.down.load(Ordering::Relaxed)
    );
    let traffic = Traffic { up: outbound.up_bytes, down: outbound.idle.down_bytes.load(Ordering::Relaxed) };
    (Some(std::mem::take(&mut outbound.requested)), outcome, traffic)
}

/// Why a UDP-over-TCP stream could not be set up, or why it ended; the setup's text is
/// the SYNACK's.
#[derive(Debug, thiserror::Error)]
pub enum UdpError {
    #[error("stream closed before its UDP request")]
    NoRequest,
    #[error("UDP request too long")]
    RequestTooLong,
    #[error("{0}")]
    BadStream(String),
    #[error("UDP socket: {0}")]
    Socket(io::Error),
    #[error("send to {0}: {1}")]
    Send(SocketAddr, io::Error),
    #[error("addressed packet without a peer")]
    NoPeer,
    #[error("resolve {0}: timed out")]
    ResolveTimedOut(String),
    #[error("resolve {0}: {1}")]
    Resolve(String, super::dial::ResolveError),
    #[error("resolve {0}: no address")]
    NoAddress(String),
    #[error(transparent)]
    Refused(#[from] super::policy::PolicyRefusal),
}

impl UdpError {
    /// A setup failure as the access log tells it.
    fn outcome(&self) -> Outcome {
        match self {
            UdpError::Refused(_) => Outcome::Refused(self.to_string()),
            UdpError::NoRequest | UdpError::RequestTooLong | UdpError::BadStream(_) | UdpError::NoPeer => {
                Outcome::BadRequest(self.to_string())
            }
            UdpError::ResolveTimedOut(_) | UdpError::Resolve(..) | UdpError::NoAddress(_) => {
                Outcome::DialFailed(self.to_string())
            }
            UdpError::Socket(_) | UdpError::Send(..) => Outcome::Error(self.to_string()),
        }
    }
}

/// Reads the request (it may be split over frames or share them with packets) and
/// prepares the sockets; returns them with the bytes after the request.
async fn set_up(
    stream: &mut StreamReader,
    buf: BytesMut,
    context: Arc<ServerContext>,
    lookups: LookupOwner,
    user: Arc<str>,
) -> Result<(Outbound, BytesMut), UdpError> {
    let mut framed = Framed::with_buffer(RequestDecoder, buf, MAX_REQUEST_LEN);
    let request = match framed.next(stream).await {
        Ok(Some(request)) => request,
        Ok(None) | Err(ReadError::Truncated { .. }) => return Err(UdpError::NoRequest),
        Err(ReadError::TooLong { .. }) => return Err(UdpError::RequestTooLong),
        Err(err) => return Err(UdpError::BadStream(err.to_string())),
    };
    let buf = framed.into_buffer();
    let outbound = Outbound::open(request, context, lookups, user).await?;
    Ok((outbound, buf))
}

/// Client → target: decodes packets and sends each as a datagram.
async fn upstream(reader: &mut StreamReader, buf: BytesMut, outbound: &mut Outbound) -> Result<(), UdpError> {
    let mut packets = Framed::with_buffer(PacketDecoder::new(outbound.framing), buf, MAX_HEADER_LEN + MAX_PAYLOAD);
    loop {
        let packet = match packets.next(reader).await {
            Ok(Some(packet)) => packet,
            // FIN, even inside a packet: the client is done, which is no error of ours.
            Ok(None) | Err(ReadError::Truncated { .. }) => return Ok(()),
            Err(err) => return Err(UdpError::BadStream(err.to_string())),
        };
        outbound.idle.touch();
        outbound.up += 1;
        outbound.up_bytes += packet.payload.len() as u64;
        if let Err(why) = outbound.send(packet.peer.as_ref(), &packet.payload).await {
            // One undeliverable datagram is not the stream's end: UDP loses packets.
            log::debug!("UDP datagram dropped: {why}");
        }
    }
}

/// Target → client: encoded replies from the sockets' receive tasks.
async fn downstream(queue: &mut mpsc::Receiver<Bytes>, writer: &mut StreamWriter) -> Result<(), UdpError> {
    while let Some(packet) = queue.recv().await {
        writer.write(packet).await.map_err(|err| UdpError::BadStream(err.to_string()))?;
    }
    Ok(())
}

/// The time of the last datagram either way, shared with the receive tasks.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    down: AtomicU64,
    /// Payload bytes of the datagrams counted in `down`.
    down_bytes: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            down: AtomicU64::new(0),
            down_bytes: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        self.last_ms.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Resolves once nothing happened for `idle`.
    async fn expired(&self, idle: Duration) {
        loop {
            let deadline = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)) + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// Aborts a receive task when the stream ends (it would otherwise wait forever).
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The stream's UDP side: its sockets, where connected packets go, and the queue of
/// replies for the stream.
struct Outbound {
    framing: Framing,
    /// The peer of a connected stream.
    target: Option<SocketAddr>,
    v4: Option<Arc<UdpSocket>>,
    v6: Option<Arc<UdpSocket>>,
    receivers: Vec<AbortOnDrop>,
    replies: mpsc::Sender<Bytes>,
    queue: Option<mpsc::Receiver<Bytes>>,
    /// This stream's names: each keeps the address it first resolved to for the stream's
    /// life (a peer does not move mid-conversation); misses go to the server's name cache.
    resolved: HashMap<String, IpAddr>,
    /// The server's: its name cache and its outbound policy.
    context: Arc<ServerContext>,
    lookups: LookupOwner,
    /// The stream's user, for route rules that name users.
    user: Arc<str>,
    idle: Arc<Activity>,
    up: u64,
    /// Payload bytes of the datagrams counted in `up`.
    up_bytes: u64,
    /// The request's destination, as the client gave it.
    requested: String,
}

impl Outbound {
    /// Binds the socket the stream needs first, so a failure can still be refused.
    async fn open(
        request: Request,
        context: Arc<ServerContext>,
        lookups: LookupOwner,
        user: Arc<str>,
    ) -> Result<Outbound, UdpError> {
        let (replies, queue) = mpsc::channel(PACKET_QUEUE);
        let mut outbound = Outbound {
            framing: request.framing,
            target: None,
            v4: None,
            v6: None,
            receivers: Vec::new(),
            replies,
            queue: Some(queue),
            resolved: HashMap::new(),
            context,
            lookups,
            user,
            idle: Arc::new(Activity::new()),
            up: 0,
            up_bytes: 0,
            requested: request.destination.to_string(),
        };
        let first_ip = match request.framing {
            Framing::Connected => {
                let ip = outbound.resolve(&request.destination).await?;
                let target = SocketAddr::new(ip, request.destination.port);
                outbound.target = Some(target);
                ip
            }
            Framing::Addressed => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        };
        outbound.socket_for(first_ip).map_err(UdpError::Socket)?;
        Ok(outbound)
    }

    fn describe(&self) -> String {
        match self.target {
            Some(target) => format!("connected to {target}"),
            None => "per-packet addresses".to_string(),
        }
    }

    /// Sends one datagram: to the connected target, or to the packet's own peer.
    async fn send(&mut self, peer: Option<&Address>, payload: &[u8]) -> Result<(), UdpError> {
        let target = match (self.target, peer) {
            (Some(target), _) => target,
            (None, Some(peer)) => SocketAddr::new(self.resolve(peer).await?, peer.port),
            (None, None) => return Err(UdpError::NoPeer),
        };
        let socket = self.socket_for(target.ip()).map_err(UdpError::Socket)?;
        socket.send_to(payload, target).await.map_err(|err| UdpError::Send(target, err))?;
        Ok(())
    }

    /// The socket of `ip`'s family, bound (with its receive task) on first use.
    fn socket_for(&mut self, ip: IpAddr) -> io::Result<Arc<UdpSocket>> {
        let slot = if ip.is_ipv4() { &mut self.v4 } else { &mut self.v6 };
        if let Some(socket) = slot {
            return Ok(socket.clone());
        }
        let any = if ip.is_ipv4() { IpAddr::V4(Ipv4Addr::UNSPECIFIED) } else { IpAddr::V6(Ipv6Addr::UNSPECIFIED) };
        let std_socket = std::net::UdpSocket::bind(SocketAddr::new(any, 0))?;
        std_socket.set_nonblocking(true)?;
        let socket = Arc::new(UdpSocket::from_std(std_socket)?);
        *slot = Some(socket.clone());
        let task =
            tokio::spawn(receive(socket.clone(), self.framing, self.target, self.replies.clone(), self.idle.clone()));
        self.receivers.push(AbortOnDrop(task));
        Ok(socket)
    }

    /// An IP for `address`; names are looked up once per stream, IPv4 preferred (the
    /// common case for services that listen on one family only).
    async fn resolve(&mut self, address: &Address) -> Result<IpAddr, UdpError> {
        let ip = self.lookup(address).await?;
        let name = match &address.host {
            Host::Domain(name) => Some(name.as_str()),
            Host::Ip(_) => None,
        };
        self.context.policy.check_udp(SocketAddr::new(ip, address.port), name, &self.user)?;
        Ok(ip)
    }

    async fn lookup(&mut self, address: &Address) -> Result<IpAddr, UdpError> {
        let name = match &address.host {
            Host::Ip(ip) => return Ok(*ip),
            Host::Domain(name) => name,
        };
        if let Some(ip) = self.resolved.get(name) {
            return Ok(*ip);
        }
        let lookup = self.context.pool.names().resolve(name, address.port, &self.lookups);
        let found: Vec<SocketAddr> = tokio::time::timeout(RESOLVE_TIMEOUT, lookup)
            .await
            .map_err(|_| UdpError::ResolveTimedOut(name.clone()))?
            .map_err(|err| UdpError::Resolve(name.clone(), err))?;
        let ip = self
            .context
            .pool
            .names()
            .strategy()
            .pick(&found)
            .map(|addr| addr.ip())
            .ok_or_else(|| UdpError::NoAddress(name.clone()))?;
        if self.resolved.len() >= RESOLVE_CACHE {
            self.resolved.clear();
        }
        self.resolved.insert(name.clone(), ip);
        Ok(ip)
    }
}

/// Reads one socket's datagrams and queues them, encoded, for the stream. A connected
/// stream only takes datagrams from its target.
async fn receive(
    socket: Arc<UdpSocket>,
    framing: Framing,
    only_from: Option<SocketAddr>,
    replies: mpsc::Sender<Bytes>,
    activity: Arc<Activity>,
) {
    let mut buf = vec![0u8; MAX_PAYLOAD];
    loop {
        let (len, from) = match socket.recv_from(&mut buf).await {
            Ok(received) => received,
            // An ICMP error for an earlier datagram: that one was lost, the socket is fine.
            Err(err) if matches!(err.kind(), io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset) => {
                continue;
            }
            Err(err) => {
                log::debug!("UDP receive failed: {err}");
                return;
            }
        };
        let from = SocketAddr::new(from.ip().to_canonical(), from.port());
        if only_from.is_some_and(|target| target != from) {
            continue;
        }
        let Ok(packet) = packet_bytes(framing, Some(&Address::socket(from)), &buf[..len]) else {
            continue;
        };
        activity.touch();
        activity.down.fetch_add(1, Ordering::Relaxed);
        activity.down_bytes.fetch_add(len as u64, Ordering::Relaxed);
        if replies.send(packet).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::udp::magic_destination;
    use crate::session::{ClientSession, OpenError, ServerSession};

    fn pair(udp: UdpSettings) -> (ClientSession, ServerSession) {
        crate::server::outbound::test_support::session_pair(udp)
    }

    /// A UDP echo target on loopback.
    async fn udp_echo() -> SocketAddr {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            while let Ok((len, from)) = socket.recv_from(&mut buf).await {
                let _ = socket.send_to(&buf[..len], from).await;
            }
        });
        addr
    }

    fn first_data(request: &Request) -> Bytes {
        let mut out = BytesMut::new();
        magic_destination().encode(&mut out);
        request.encode(&mut out);
        out.freeze()
    }

    fn packets(framing: Framing) -> Framed<PacketDecoder> {
        Framed::new(PacketDecoder::new(framing), MAX_HEADER_LEN + MAX_PAYLOAD)
    }

    async fn next_packet(stream: &mut Stream, packets: &mut Framed<PacketDecoder>) -> crate::proto::udp::Packet {
        let next = tokio::time::timeout(Duration::from_secs(5), packets.next(stream)).await.expect("a packet in time");
        next.unwrap().expect("stream still open")
    }

    #[tokio::test]
    async fn connected_mode_echoes_datagrams_of_every_size() {
        let (client, _server) = pair(UdpSettings::default());
        let echo = udp_echo().await;
        let request = Request { framing: Framing::Connected, destination: Address::socket(echo) };
        let mut stream = client.open_stream(first_data(&request)).await.unwrap();
        stream.wait_open().await.unwrap();
        let mut replies = packets(Framing::Connected);
        for (i, size) in [0usize, 1, 100, 1400, 9000, 40_000, 65_507].into_iter().enumerate() {
            let payload: Vec<u8> = (0..size).map(|b| (b + i) as u8).collect();
            stream.write(packet_bytes(Framing::Connected, None, &payload).unwrap()).await.unwrap();
            let packet = next_packet(&mut stream, &mut replies).await;
            assert_eq!((packet.peer, packet.payload.len()), (None, size));
            assert_eq!(&packet.payload[..], &payload[..]);
        }
    }

    #[tokio::test]
    async fn connected_request_and_first_packet_may_share_a_frame() {
        let (client, _server) = pair(UdpSettings::default());
        let echo = udp_echo().await;
        let request = Request { framing: Framing::Connected, destination: Address::domain("localhost", echo.port()) };
        let mut first = BytesMut::from(&first_data(&request)[..]);
        first.extend_from_slice(&packet_bytes(Framing::Connected, None, b"early").unwrap());
        let mut stream = client.open_stream(first.freeze()).await.unwrap();
        stream.wait_open().await.unwrap();
        let packet = next_packet(&mut stream, &mut packets(Framing::Connected)).await;
        assert_eq!(&packet.payload[..], b"early");
    }

    #[tokio::test]
    async fn addressed_mode_names_each_reply_by_its_sender() {
        let (client, _server) = pair(UdpSettings::default());
        let (one, two) = (udp_echo().await, udp_echo().await);
        let request = Request { framing: Framing::Addressed, destination: Address::socket(one) };
        let mut stream = client.open_stream(first_data(&request)).await.unwrap();
        stream.wait_open().await.unwrap();
        let mut replies = packets(Framing::Addressed);
        for (target, text) in [(one, "to one"), (two, "to two"), (one, "one again")] {
            let peer = Address::socket(target);
            stream.write(packet_bytes(Framing::Addressed, Some(&peer), text.as_bytes()).unwrap()).await.unwrap();
            let packet = next_packet(&mut stream, &mut replies).await;
            assert_eq!(packet.peer, Some(peer));
            assert_eq!(&packet.payload[..], text.as_bytes());
        }
    }

    #[tokio::test]
    async fn names_resolve_through_the_servers_shared_cache() {
        let (client, _server, pool) =
            crate::server::outbound::test_support::session_pair_with(4, Duration::from_secs(2), UdpSettings::default());
        let echo = udp_echo().await;
        let request = Request { framing: Framing::Connected, destination: Address::domain("localhost", echo.port()) };
        for _ in 0..3 {
            let mut stream = client.open_stream(first_data(&request)).await.unwrap();
            stream.wait_open().await.unwrap();
        }
        assert_eq!(pool.lookups(), 1, "three UDP streams to one name, one lookup, counted by the server");
    }

    #[tokio::test]
    async fn a_malformed_request_is_refused_in_the_synack() {
        let (client, _server) = pair(UdpSettings::default());
        let mut first = BytesMut::new();
        magic_destination().encode(&mut first);
        first.extend_from_slice(&[7, 1, 127, 0, 0, 1, 0, 53]);
        let mut stream = client.open_stream(first.freeze()).await.unwrap();
        match stream.wait_open().await {
            Err(OpenError::Refused(text)) => assert!(text.contains("isConnect"), "{text}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn an_idle_stream_is_closed() {
        let (client, _server) = pair(UdpSettings { idle_timeout: Duration::from_millis(200) });
        let echo = udp_echo().await;
        let request = Request { framing: Framing::Connected, destination: Address::socket(echo) };
        let mut stream = client.open_stream(first_data(&request)).await.unwrap();
        stream.wait_open().await.unwrap();
        let end = tokio::time::timeout(Duration::from_secs(5), stream.read()).await.expect("closed in time");
        assert_eq!(end.unwrap(), None, "FIN after the idle timeout");
    }

    /// The reference client's lazy UoT connection: SYN and the magic destination first,
    /// the request only with the first datagram, here 4 s later (past the 2.5 s SYNACK
    /// budget). The stream is answered in time and then served.
    #[tokio::test]
    async fn a_request_that_comes_with_a_late_first_datagram_is_served() {
        let (client, _server) = pair(UdpSettings::default());
        let echo = udp_echo().await;
        let mut destination = BytesMut::new();
        magic_destination().encode(&mut destination);
        let mut stream = client.open_stream(destination.freeze()).await.unwrap();
        let started = tokio::time::Instant::now();
        stream.wait_open().await.expect("answered ok while the request is still to come");
        assert!(started.elapsed() < Duration::from_secs(3), "answered within the reference's 3 s");
        tokio::time::sleep_until(started + Duration::from_secs(4)).await;
        let request = Request { framing: Framing::Connected, destination: Address::socket(echo) };
        let mut late = BytesMut::new();
        request.encode(&mut late);
        late.extend_from_slice(&packet_bytes(Framing::Connected, None, b"four seconds late").unwrap());
        stream.write(late.freeze()).await.unwrap();
        let packet = next_packet(&mut stream, &mut packets(Framing::Connected)).await;
        assert_eq!(&packet.payload[..], b"four seconds late");
    }

    #[tokio::test]
    async fn a_late_request_that_is_malformed_ends_the_stream_with_fin() {
        let (client, _server) = pair(UdpSettings::default());
        let mut destination = BytesMut::new();
        magic_destination().encode(&mut destination);
        let mut stream = client.open_stream(destination.freeze()).await.unwrap();
        stream.wait_open().await.unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        stream.write(Bytes::from_static(&[7, 1, 127, 0, 0, 1, 0, 53])).await.unwrap();
        let end = tokio::time::timeout(Duration::from_secs(5), stream.read()).await.expect("ended in time");
        assert_eq!(end.unwrap(), None, "FIN: the SYNACK was already sent");
    }

    #[tokio::test]
    async fn a_request_that_never_comes_ends_at_the_idle_timeout() {
        let (client, _server) = pair(UdpSettings { idle_timeout: Duration::from_millis(500) });
        let mut destination = BytesMut::new();
        magic_destination().encode(&mut destination);
        let mut stream = client.open_stream(destination.freeze()).await.unwrap();
        stream.wait_open().await.unwrap();
        let end = tokio::time::timeout(Duration::from_secs(5), stream.read()).await.expect("ended in time");
        assert_eq!(end.unwrap(), None);
    }
}
