//! SOCKS5 UDP ASSOCIATE on the local proxy port, carried as UDP over TCP (docs/protocol.md §5).
//!
//! Each association gets its own UDP socket on the IP its control connection arrived at,
//! and one stream to `sp.v2.udp-over-tcp.arpa` with per-packet addresses, so one
//! association may talk to many peers (DNS servers, game servers) over a single stream.
//! The UoT request travels in the stream's first data: servers read it before they send
//! SYNACK, so waiting for SYNACK first would deadlock. The association ends when its TCP
//! control connection closes (RFC 1928), or when the server ends the stream.
//!
//! Only the app that asked may use the socket: datagrams must come from the control
//! connection's IP (or the address the request named), and the first sender's port is
//! then the only one accepted. Anyone else on the network is ignored.

use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use super::error::OpenFailure;
use super::inbound::Request;
use super::{ClientConfig, ServeError, open_stream};
use crate::framed::{Framed, ReadError};
use crate::proto::Address;
use crate::proto::address::Host;
use crate::proto::udp::{self, Framing, PacketDecoder, magic_destination, packet_bytes};
use crate::session::{StreamReader, StreamWriter};

/// Room for the largest datagram plus a SOCKS5 UDP header with a 255-byte name.
const DATAGRAM_BUFFER: usize = udp::MAX_PAYLOAD + 3 + 1 + 1 + 255 + 2;

/// Why a datagram from the app was not forwarded.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DatagramError {
    #[error("SOCKS5 UDP header too short")]
    Truncated,
    #[error("fragmented SOCKS5 datagram (FRAG {0}) is not supported")]
    Fragmented(u8),
    #[error("SOCKS5 UDP header: {0}")]
    BadAddress(crate::proto::AddressError),
}

/// Splits an app's datagram `RSV RSV FRAG ATYP ADDR PORT DATA` into its destination
/// and payload. Fragments are refused: RFC 1928 lets a server drop them, and no common
/// client sends them.
pub fn parse_socks5_datagram(data: &[u8]) -> Result<(Address, &[u8]), DatagramError> {
    let Some(header) = data.get(..3) else {
        return Err(DatagramError::Truncated);
    };
    if header[2] != 0 {
        return Err(DatagramError::Fragmented(header[2]));
    }
    match Address::decode_prefix(&data[3..]).map_err(DatagramError::BadAddress)? {
        Some((destination, used)) => Ok((destination, &data[3 + used..])),
        None => Err(DatagramError::Truncated),
    }
}

/// Wraps a reply for the app: `0 0 0 ATYP ADDR PORT DATA`.
pub fn socks5_datagram(from: &Address, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(3 + from.encoded_len() + payload.len());
    out.put_slice(&[0, 0, 0]);
    from.encode(&mut out);
    out.put_slice(payload);
    out.freeze()
}

/// Serves one UDP ASSOCIATE until its control connection closes.
pub async fn serve_associate(mut tcp: TcpStream, request: Request, config: &ClientConfig) -> Result<(), ServeError> {
    let (local, app) = (tcp.local_addr()?, tcp.peer_addr()?);
    let socket = match UdpSocket::bind(SocketAddr::new(local.ip(), 0)).await {
        Ok(socket) => socket,
        Err(err) => {
            let failure = OpenFailure::Local(format!("cannot bind a UDP socket on {}: {err}", local.ip()));
            log::warn!("{app}: {failure}");
            return Ok(request.reply_failure(&mut tcp, &failure).await?);
        }
    };
    let bound = socket.local_addr()?;
    let label = format!("UDP for {app}");
    let (lease, stream) = match open_stream(config, uot_first_data(), &label).await {
        Ok(opened) => opened,
        Err(failure) => return Ok(request.reply_failure(&mut tcp, &failure).await?),
    };
    reply_bound(&mut tcp, bound).await?;
    log::debug!("{label}: associated on {bound}, stream {}", stream.id());

    let sender = AppFilter::new(&request.destination, app.ip());
    let (mut reader, mut writer) = stream.split();
    let why = tokio::select! {
        why = control_closed(&mut tcp) => why,
        why = app_to_stream(&socket, &sender, &mut writer) => why,
        why = stream_to_app(&mut reader, &socket, &sender) => why,
    };
    drop((reader, writer)); // FIN, so the server frees its socket now rather than at idle timeout
    super::release(config, lease);
    log::debug!("{label}: association ended: {why}");
    Ok(())
}

/// The stream's first data: the magic destination, then a UoT request for per-packet
/// addresses (its destination is unused in that mode).
fn uot_first_data() -> Bytes {
    let request = udp::Request { framing: Framing::Addressed, destination: Address::socket(([0, 0, 0, 0], 0).into()) };
    let mut out = BytesMut::new();
    magic_destination().encode(&mut out);
    request.encode(&mut out);
    out.freeze()
}

/// The SOCKS5 success reply naming the relay socket.
async fn reply_bound(tcp: &mut TcpStream, bound: SocketAddr) -> std::io::Result<()> {
    let mut reply = BytesMut::with_capacity(22);
    reply.put_slice(&[5, 0, 0]);
    Address::socket(bound).encode(&mut reply);
    tcp.write_all(&reply).await
}

/// Resolves when the control connection closes; anything the app sends on it is ignored.
async fn control_closed(tcp: &mut TcpStream) -> String {
    let mut sink = [0u8; 512];
    loop {
        match tcp.read(&mut sink).await {
            Ok(0) => return "control connection closed".into(),
            Ok(_) => continue,
            Err(err) => return format!("control connection: {err}"),
        }
    }
}

/// Which source address may use the association. The port is set once (by the
/// request, or by the first datagram) and shared by both directions.
struct AppFilter {
    ip: IpAddr,
    port: OnceLock<u16>,
}

impl AppFilter {
    /// The request's address when it names one, else the control connection's IP and
    /// whichever port sends first.
    fn new(requested: &Address, control_ip: IpAddr) -> AppFilter {
        let ip = match requested.host {
            Host::Ip(ip) if !ip.is_unspecified() => ip.to_canonical(),
            _ => control_ip.to_canonical(),
        };
        let port = OnceLock::new();
        if requested.port != 0 {
            let _ = port.set(requested.port);
        }
        AppFilter { ip, port }
    }

    /// Whether `from` is the app; the first accepted datagram fixes the port.
    fn admit(&self, from: SocketAddr) -> bool {
        if from.ip().to_canonical() != self.ip {
            return false;
        }
        *self.port.get_or_init(|| from.port()) == from.port()
    }

    fn address(&self) -> Option<SocketAddr> {
        self.port.get().map(|port| SocketAddr::new(self.ip, *port))
    }
}

async fn app_to_stream(socket: &UdpSocket, sender: &AppFilter, writer: &mut StreamWriter) -> String {
    let mut buf = vec![0u8; DATAGRAM_BUFFER];
    loop {
        let (len, from) = match socket.recv_from(&mut buf).await {
            Ok(received) => received,
            // An ICMP error for an earlier reply to the app: the socket itself is fine.
            Err(err) if err.kind() == std::io::ErrorKind::ConnectionRefused => continue,
            Err(err) => return format!("local UDP socket: {err}"),
        };
        if !sender.admit(from) {
            log::debug!("UDP datagram from {from} ignored: not the associated app");
            continue;
        }
        let packet = parse_socks5_datagram(&buf[..len])
            .map_err(|err| err.to_string())
            .and_then(|(to, payload)| packet_bytes(Framing::Addressed, Some(&to), payload).map_err(|e| e.to_string()));
        match packet {
            Ok(packet) => {
                if let Err(err) = writer.write(packet).await {
                    return err.to_string();
                }
            }
            Err(why) => log::debug!("UDP datagram from {from} dropped: {why}"),
        }
    }
}

async fn stream_to_app(reader: &mut StreamReader, socket: &UdpSocket, sender: &AppFilter) -> String {
    let mut packets = Framed::new(PacketDecoder::new(Framing::Addressed), udp::MAX_HEADER_LEN + udp::MAX_PAYLOAD);
    loop {
        let packet = match packets.next(reader).await {
            Ok(Some(packet)) => packet,
            Ok(None) | Err(ReadError::Truncated { .. }) => return "server ended the stream".into(),
            Err(ReadError::Decode(err)) => return format!("server sent a bad UDP packet: {err}"),
            Err(err) => return err.to_string(),
        };
        let (Some(app), Some(from)) = (sender.address(), packet.peer) else { continue };
        if let Err(err) = socket.send_to(&socks5_datagram(&from, &packet.payload), app).await {
            log::debug!("UDP reply to {app} dropped: {err}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Decoder;
    use crate::proto::address::AddressDecoder;

    #[test]
    fn socks5_datagrams_round_trip() {
        let to = Address::domain("example.com", 53);
        let wire = socks5_datagram(&to, b"query");
        assert_eq!(&wire[..3], &[0, 0, 0]);
        assert_eq!(parse_socks5_datagram(&wire), Ok((to, &b"query"[..])));
    }

    #[test]
    fn fragments_and_short_headers_are_refused() {
        assert_eq!(parse_socks5_datagram(&[0, 0, 1, 1, 127, 0, 0, 1, 0, 53]), Err(DatagramError::Fragmented(1)));
        assert_eq!(parse_socks5_datagram(&[0, 0]), Err(DatagramError::Truncated));
        assert_eq!(parse_socks5_datagram(&[0, 0, 0, 1, 127, 0]), Err(DatagramError::Truncated));
        assert!(matches!(parse_socks5_datagram(&[0, 0, 0, 9, 1]), Err(DatagramError::BadAddress(_))));
    }

    #[test]
    fn only_the_app_may_send_and_its_first_port_sticks() {
        let any = Address::socket(([0, 0, 0, 0], 0).into());
        let filter = AppFilter::new(&any, "127.0.0.1".parse().unwrap());
        assert!(!filter.admit("10.0.0.1:5000".parse().unwrap()), "another host");
        assert_eq!(filter.address(), None);
        assert!(filter.admit("127.0.0.1:5000".parse().unwrap()));
        assert!(!filter.admit("127.0.0.1:5001".parse().unwrap()), "another port of the same host");
        assert_eq!(filter.address(), Some("127.0.0.1:5000".parse().unwrap()));

        let named = Address::socket("127.0.0.2:7000".parse().unwrap());
        let filter = AppFilter::new(&named, "127.0.0.1".parse().unwrap());
        assert!(!filter.admit("127.0.0.1:7000".parse().unwrap()));
        assert!(filter.admit("127.0.0.2:7000".parse().unwrap()));
    }

    #[test]
    fn first_data_is_the_magic_destination_then_an_addressed_request() {
        let data = uot_first_data();
        let mut data = BytesMut::from(&data[..]);
        let destination = AddressDecoder::socks().decode(&mut data).unwrap().unwrap();
        assert!(udp::is_udp_over_tcp(&destination));
        let request = udp::RequestDecoder.decode(&mut data).unwrap().unwrap();
        assert_eq!(request.framing, Framing::Addressed);
        assert!(data.is_empty(), "nothing after the request");
    }
}
