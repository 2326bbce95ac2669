//! UDP over TCP (sing-box UoT v2) as pure code over bytes: the request that opens a
//! UDP stream and the packets that follow it.
//!
//! A stream whose destination is the magic domain `sp.v2.udp-over-tcp.arpa` starts with
//! a request, `isConnect:u8 · SOCKS5 address · port`, then carries packets:
//! - connected (`isConnect = 1`): `length:u16 BE · payload`, all to/from the request's
//!   destination;
//! - per-packet address (`isConnect = 0`): `address · port:u16 · length:u16 · payload`,
//!   where the address uses UoT's own family bytes (`0x00` IPv4, `0x01` IPv6,
//!   `0x02` length-prefixed domain), not SOCKS5's.
//!
//! Packets arrive as a byte stream cut anywhere by frames, so decoding is incremental
//! ([`RequestDecoder`], [`PacketDecoder`]): `Ok(None)` means "feed me more" and leaves
//! the buffer untouched. A packet is at most
//! 2 + 255 + 2 + 2 + 65,535 bytes, which bounds what a decoder ever has to buffer.

use std::net::{IpAddr, Ipv4Addr};

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::Decoder;
use super::address::{Address, AddressError, AddressTypes, Host};

/// The domain sing-box and the reference clients use for UoT v2 streams.
pub const MAGIC_DOMAIN: &str = "sp.v2.udp-over-tcp.arpa";
/// Any destination containing this is treated as UoT (v1 used another prefix).
const MAGIC_SUFFIX: &str = "udp-over-tcp.arpa";
/// Largest payload one packet can carry (the length field is a u16).
pub const MAX_PAYLOAD: usize = u16::MAX as usize;
/// Largest packet header: family, length, 255-byte name, port, length.
pub const MAX_HEADER_LEN: usize = 1 + 1 + 255 + 2 + 2;

/// Per-packet addresses: the SOCKS layout with `0x00` IPv4, `0x01` IPv6, `0x02` domain.
const PEER_TYPES: AddressTypes = AddressTypes { ipv4: 0x00, ipv6: 0x01, domain: 0x02 };

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UdpError {
    #[error("UDP request: isConnect must be 0 or 1, not {0}")]
    BadConnectFlag(u8),
    #[error("UDP request: {0}")]
    BadRequestAddress(AddressError),
    #[error("UDP packet: unknown address family {0:#04x}")]
    UnknownFamily(u8),
    #[error("UDP packet: empty domain name")]
    EmptyDomain,
    #[error("UDP packet: domain name is not valid text")]
    InvalidDomain,
    #[error("UDP packet: domain name of {0} bytes is longer than 255")]
    DomainTooLong(usize),
    #[error("UDP packet: payload of {0} bytes exceeds 65535")]
    PayloadTooLong(usize),
}

/// Whether a stream's destination asks for UDP over TCP.
pub fn is_udp_over_tcp(destination: &Address) -> bool {
    matches!(&destination.host, Host::Domain(name) if name.to_ascii_lowercase().contains(MAGIC_SUFFIX))
}

/// The stream's destination a client sends for UoT v2.
pub fn magic_destination() -> Address {
    Address { host: Host::Domain(MAGIC_DOMAIN.to_string()), port: 0 }
}

/// How the packets of a UDP stream are framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `isConnect = 1`: length and payload; the peer is the request's destination.
    Connected,
    /// `isConnect = 0`: every packet names its own peer.
    Addressed,
}

/// The request at the start of a UoT stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub framing: Framing,
    /// The peer of a connected stream; ignored (but still sent) for addressed streams.
    pub destination: Address,
}

impl Request {
    pub fn encode(&self, out: &mut impl BufMut) {
        out.put_u8(u8::from(self.framing == Framing::Connected));
        self.destination.encode(out);
    }
}

/// Takes the request off the front of a UoT stream's buffer.
#[derive(Debug, Default, Clone, Copy)]
pub struct RequestDecoder;

impl Decoder for RequestDecoder {
    type Item = Request;
    type Error = UdpError;

    /// On an error `buf` is left untouched.
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Request>, UdpError> {
        let Some(&flag) = buf.first() else {
            return Ok(None);
        };
        let framing = match flag {
            0 => Framing::Addressed,
            1 => Framing::Connected,
            other => return Err(UdpError::BadConnectFlag(other)),
        };
        let Some((destination, used)) = Address::decode_prefix(&buf[1..]).map_err(UdpError::BadRequestAddress)? else {
            return Ok(None);
        };
        buf.advance(1 + used);
        Ok(Some(Request { framing, destination }))
    }
}

/// One datagram: its peer (always set for addressed framing, `None` for connected)
/// and its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub peer: Option<Address>,
    pub payload: Bytes,
}

/// Appends a packet in the given framing. Addressed framing needs `peer`.
pub fn encode_packet(
    framing: Framing,
    peer: Option<&Address>,
    payload: &[u8],
    out: &mut BytesMut,
) -> Result<(), UdpError> {
    if payload.len() > MAX_PAYLOAD {
        return Err(UdpError::PayloadTooLong(payload.len()));
    }
    if framing == Framing::Addressed {
        // A missing peer is a caller bug; an unspecified address keeps the stream in step.
        let unspecified = Address { host: Host::Ip(IpAddr::V4(Ipv4Addr::UNSPECIFIED)), port: 0 };
        encode_peer(peer.unwrap_or(&unspecified), out)?;
    }
    out.reserve(2 + payload.len());
    out.put_u16(payload.len() as u16);
    out.put_slice(payload);
    Ok(())
}

/// The bytes [`encode_packet`] would append, as one buffer.
pub fn packet_bytes(framing: Framing, peer: Option<&Address>, payload: &[u8]) -> Result<Bytes, UdpError> {
    let mut out = BytesMut::with_capacity(MAX_HEADER_LEN + payload.len());
    encode_packet(framing, peer, payload, &mut out)?;
    Ok(out.freeze())
}

fn encode_peer(peer: &Address, out: &mut BytesMut) -> Result<(), UdpError> {
    // Unlike a SOCKS request, a datagram to a nameless or over-long domain is refused,
    // not cut.
    if let Host::Domain(name) = &peer.host {
        if name.is_empty() {
            return Err(UdpError::EmptyDomain);
        }
        if name.len() > 255 {
            return Err(UdpError::DomainTooLong(name.len()));
        }
    }
    peer.encode_with(PEER_TYPES, out);
    Ok(())
}

/// Takes packets of one framing off the front of a UoT stream's buffer.
#[derive(Debug, Clone, Copy)]
pub struct PacketDecoder {
    framing: Framing,
}

impl PacketDecoder {
    pub fn new(framing: Framing) -> PacketDecoder {
        PacketDecoder { framing }
    }
}

impl Decoder for PacketDecoder {
    type Item = Packet;
    type Error = UdpError;

    /// Takes one complete packet off the front of `buf`, or returns `Ok(None)` (leaving
    /// `buf` untouched) when more bytes are needed. An error means the stream is out of
    /// step and must be closed.
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Packet>, UdpError> {
        let (peer, header_len) = match self.framing {
            Framing::Connected => (None, 0),
            Framing::Addressed => match decode_peer(buf)? {
                Some((peer, used)) => (Some(peer), used),
                None => return Ok(None),
            },
        };
        let Some(len) = buf.get(header_len..header_len + 2) else {
            return Ok(None);
        };
        let len = u16::from_be_bytes([len[0], len[1]]) as usize;
        let total = header_len + 2 + len;
        if buf.len() < total {
            // At most one packet's worth: bounded by the u16 length.
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        buf.advance(header_len + 2);
        let payload = buf.split_to(len).freeze();
        Ok(Some(Packet { peer, payload }))
    }
}

fn decode_peer(data: &[u8]) -> Result<Option<(Address, usize)>, UdpError> {
    Address::decode_prefix_with(PEER_TYPES, data).map_err(|err| match err {
        AddressError::UnknownType(family) => UdpError::UnknownFamily(family),
        AddressError::EmptyDomain => UdpError::EmptyDomain,
        AddressError::InvalidDomain => UdpError::InvalidDomain,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode_packet(framing: Framing, buf: &mut BytesMut) -> Result<Option<Packet>, UdpError> {
        PacketDecoder::new(framing).decode(buf)
    }

    /// The request at the start of `data`, with how many bytes it used.
    fn decode_request(data: &[u8]) -> Result<Option<(Request, usize)>, UdpError> {
        let mut buf = BytesMut::from(data);
        let request = RequestDecoder.decode(&mut buf)?;
        Ok(request.map(|request| (request, data.len() - buf.len())))
    }

    fn decode_all(framing: Framing, buf: &mut BytesMut) -> Vec<Packet> {
        std::iter::from_fn(|| decode_packet(framing, buf).unwrap()).collect()
    }

    #[test]
    fn magic_destination_is_recognised() {
        assert!(is_udp_over_tcp(&magic_destination()));
        assert!(is_udp_over_tcp(&Address::domain("sp.udp-over-tcp.arpa", 0)));
        assert!(is_udp_over_tcp(&Address::domain("SP.V2.UDP-OVER-TCP.ARPA", 0)));
        assert!(!is_udp_over_tcp(&Address::domain("example.com", 443)));
        assert!(!is_udp_over_tcp(&Address::parse_host_port("127.0.0.1:53").unwrap()));
    }

    #[test]
    fn request_wire_form_is_flag_then_socks_address() {
        let request =
            Request { framing: Framing::Connected, destination: Address::parse_host_port("1.2.3.4:53").unwrap() };
        let mut out = BytesMut::new();
        request.encode(&mut out);
        assert_eq!(&out[..], &[1, 1, 1, 2, 3, 4, 0, 53]);
        assert_eq!(decode_request(&out), Ok(Some((request, 8))));
        for cut in 0..out.len() {
            assert_eq!(decode_request(&out[..cut]), Ok(None));
        }
    }

    #[test]
    fn malformed_requests_are_errors() {
        assert_eq!(decode_request(&[2, 1, 0, 0, 0, 0, 0, 0]), Err(UdpError::BadConnectFlag(2)));
        assert_eq!(decode_request(&[0, 9, 0, 0]), Err(UdpError::BadRequestAddress(AddressError::UnknownType(9))));
    }

    #[test]
    fn addressed_packet_wire_forms_use_uot_family_bytes() {
        let v4 =
            packet_bytes(Framing::Addressed, Some(&Address::parse_host_port("10.0.0.1:53").unwrap()), b"q").unwrap();
        assert_eq!(&v4[..], &[0, 10, 0, 0, 1, 0, 53, 0, 1, b'q']);
        let name = packet_bytes(Framing::Addressed, Some(&Address::domain("ab", 7)), b"").unwrap();
        assert_eq!(&name[..], &[2, 2, b'a', b'b', 0, 7, 0, 0]);
        let v6 = packet_bytes(Framing::Addressed, Some(&Address::parse_host_port("[::1]:1").unwrap()), b"").unwrap();
        assert_eq!((v6[0], v6.len()), (1, 1 + 16 + 2 + 2));
        let connected = packet_bytes(Framing::Connected, None, b"xyz").unwrap();
        assert_eq!(&connected[..], &[0, 3, b'x', b'y', b'z']);
    }

    #[test]
    fn bad_packets_are_errors_not_panics() {
        let mut unknown = BytesMut::from(&[3u8, 0, 0][..]);
        assert_eq!(decode_packet(Framing::Addressed, &mut unknown), Err(UdpError::UnknownFamily(3)));
        let mut empty = BytesMut::from(&[2u8, 0, 0, 1][..]);
        assert_eq!(decode_packet(Framing::Addressed, &mut empty), Err(UdpError::EmptyDomain));
        let mut control = BytesMut::from(&[2u8, 1, b'\n', 0, 1, 0, 0][..]);
        assert_eq!(decode_packet(Framing::Addressed, &mut control), Err(UdpError::InvalidDomain));
        let long = Address { host: Host::Domain("a".repeat(256)), port: 1 };
        assert_eq!(packet_bytes(Framing::Addressed, Some(&long), b""), Err(UdpError::DomainTooLong(256)));
        assert_eq!(packet_bytes(Framing::Connected, None, &vec![0; 65_536]), Err(UdpError::PayloadTooLong(65_536)));
    }

    #[test]
    fn largest_packet_fits_and_a_declared_length_bounds_the_reservation() {
        let whole = packet_bytes(Framing::Connected, None, &vec![7; MAX_PAYLOAD]).unwrap();
        let mut buf = BytesMut::from(&whole[..2]);
        assert_eq!(decode_packet(Framing::Connected, &mut buf), Ok(None));
        assert!(buf.capacity() <= 2 * (2 + MAX_PAYLOAD));
        buf.extend_from_slice(&whole[2..]);
        assert_eq!(decode_packet(Framing::Connected, &mut buf).unwrap().unwrap().payload.len(), MAX_PAYLOAD);
        assert!(buf.is_empty());
    }

    fn arb_peer() -> impl Strategy<Value = Address> {
        let host = prop_oneof![
            any::<[u8; 4]>().prop_map(|o| Host::Ip(IpAddr::V4(o.into()))),
            any::<[u8; 16]>().prop_map(|o| Host::Ip(IpAddr::V6(o.into()))),
            "[a-z0-9.-]{1,255}".prop_map(Host::Domain),
        ];
        (host, any::<u16>()).prop_map(|(host, port)| Address { host, port })
    }

    fn arb_framing() -> impl Strategy<Value = Framing> {
        prop_oneof![Just(Framing::Connected), Just(Framing::Addressed)]
    }

    fn arb_packets(framing: Framing) -> impl Strategy<Value = Vec<Packet>> {
        let packet = (arb_peer(), proptest::collection::vec(any::<u8>(), 0..700)).prop_map(move |(peer, payload)| {
            Packet { peer: (framing == Framing::Addressed).then_some(peer), payload: payload.into() }
        });
        proptest::collection::vec(packet, 0..12)
    }

    fn encode_all(framing: Framing, packets: &[Packet]) -> BytesMut {
        let mut out = BytesMut::new();
        for packet in packets {
            encode_packet(framing, packet.peer.as_ref(), &packet.payload, &mut out).unwrap();
        }
        out
    }

    proptest! {
        #[test]
        fn packets_round_trip((framing, packets) in arb_framing().prop_flat_map(|f| (Just(f), arb_packets(f)))) {
            let mut buf = encode_all(framing, &packets);
            prop_assert_eq!(decode_all(framing, &mut buf), packets);
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn any_split_point_gives_the_same_packets(
            (framing, packets) in arb_framing().prop_flat_map(|f| (Just(f), arb_packets(f))),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
        ) {
            let whole = encode_all(framing, &packets).freeze();
            let mut points: Vec<usize> = cuts.iter().map(|i| i.index(whole.len() + 1)).collect();
            points.sort_unstable();
            let mut buf = BytesMut::new();
            let mut decoded = Vec::new();
            let mut start = 0;
            for end in points.into_iter().chain([whole.len()]) {
                buf.extend_from_slice(&whole[start..end]);
                start = end;
                decoded.extend(decode_all(framing, &mut buf));
            }
            prop_assert_eq!(decoded, packets);
        }

        #[test]
        fn requests_round_trip_at_every_prefix(peer in arb_peer(), framing in arb_framing()) {
            let request = Request { framing, destination: peer };
            let mut out = BytesMut::new();
            request.encode(&mut out);
            for cut in 0..out.len() {
                prop_assert_eq!(decode_request(&out[..cut]), Ok(None));
            }
            prop_assert_eq!(decode_request(&out), Ok(Some((request, out.len()))));
        }

        #[test]
        fn fed_one_byte_at_a_time_gives_the_same_packets(
            (framing, packets) in arb_framing().prop_flat_map(|f| (Just(f), arb_packets(f))),
        ) {
            use crate::proto::decode::checks::decode_bytewise;
            let whole = encode_all(framing, &packets);
            prop_assert_eq!(decode_bytewise(&mut PacketDecoder::new(framing), &whole), (packets, Ok(0)));
        }

        #[test]
        fn a_request_fed_one_byte_at_a_time_is_the_same(peer in arb_peer(), framing in arb_framing()) {
            use crate::proto::decode::checks::{decode_bytewise, decode_whole};
            let request = Request { framing, destination: peer };
            let mut out = BytesMut::new();
            request.encode(&mut out);
            prop_assert_eq!(decode_whole(&mut RequestDecoder, &out), (vec![request.clone()], Ok(0)));
            prop_assert_eq!(decode_bytewise(&mut RequestDecoder, &out), (vec![request], Ok(0)));
        }

        #[test]
        fn malformed_input_is_the_same_error_whole_or_bytewise(
            bytes in proptest::collection::vec(any::<u8>(), 0..600),
            framing in arb_framing(),
        ) {
            use crate::proto::decode::checks::{decode_bytewise, decode_whole};
            prop_assert_eq!(
                decode_whole(&mut PacketDecoder::new(framing), &bytes),
                decode_bytewise(&mut PacketDecoder::new(framing), &bytes)
            );
            prop_assert_eq!(decode_whole(&mut RequestDecoder, &bytes), decode_bytewise(&mut RequestDecoder, &bytes));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048), framing in arb_framing()) {
            let mut buf = BytesMut::from(&bytes[..]);
            let mut consumed = 0;
            while let Ok(Some(packet)) = decode_packet(framing, &mut buf) {
                consumed += packet.payload.len();
            }
            prop_assert!(consumed <= bytes.len());
            let _ = decode_request(&bytes);
        }
    }
}
