//! Destination addresses in SOCKS5 form: `0x01` IPv4 · `0x03` len domain · `0x04` IPv6, then port u16 BE.
//!
//! The server reads this from the start of a stream's data, which may arrive split
//! over frames, so [`AddressDecoder`] reports "incomplete" instead of failing on short
//! input. A whole datagram is parsed in place with [`Address::decode_prefix`].

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::{Buf, BufMut, BytesMut};

use super::Decoder;

/// The type bytes that mark each host kind. SOCKS5 and UDP-over-TCP's per-packet
/// addresses share the layout (type, host, port) but number the types differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressTypes {
    pub ipv4: u8,
    pub ipv6: u8,
    pub domain: u8,
}

/// SOCKS5: `0x01` IPv4, `0x03` domain, `0x04` IPv6.
pub const SOCKS_TYPES: AddressTypes = AddressTypes { ipv4: 0x01, ipv6: 0x04, domain: 0x03 };

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    Ip(IpAddr),
    Domain(String),
}

/// A destination: host and port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Address {
    pub host: Host,
    pub port: u16,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AddressError {
    #[error("unknown address type {0:#04x}")]
    UnknownType(u8),
    #[error("empty domain name")]
    EmptyDomain,
    #[error("domain name is not valid text")]
    InvalidDomain,
}

impl Address {
    pub fn domain(name: &str, port: u16) -> Address {
        // A domain that is really an IP literal is sent as an IP, as SOCKS clients do.
        match name.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
            Ok(ip) => Address { host: Host::Ip(ip), port },
            Err(_) => Address { host: Host::Domain(name.to_string()), port },
        }
    }

    pub fn socket(addr: SocketAddr) -> Address {
        Address { host: Host::Ip(addr.ip()), port: addr.port() }
    }

    /// Parses `host:port`, `[v6]:port`.
    pub fn parse_host_port(text: &str) -> Option<Address> {
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return Some(Address::socket(addr));
        }
        let (host, port) = text.rsplit_once(':')?;
        let port = port.parse().ok()?;
        if host.is_empty() || host.len() > 255 || host.contains(':') {
            return None;
        }
        Some(Address::domain(host, port))
    }

    pub fn encoded_len(&self) -> usize {
        match &self.host {
            Host::Ip(IpAddr::V4(_)) => 1 + 4 + 2,
            Host::Ip(IpAddr::V6(_)) => 1 + 16 + 2,
            Host::Domain(name) => 1 + 1 + name.len() + 2,
        }
    }

    /// Appends the SOCKS5 form. Domains longer than 255 bytes are cut (they cannot
    /// resolve anyway; callers validate earlier).
    pub fn encode(&self, out: &mut impl BufMut) {
        self.encode_with(SOCKS_TYPES, out);
    }

    /// Appends type, host and port, with `types` numbering the host kinds.
    pub fn encode_with(&self, types: AddressTypes, out: &mut impl BufMut) {
        match &self.host {
            Host::Ip(IpAddr::V4(ip)) => {
                out.put_u8(types.ipv4);
                out.put_slice(&ip.octets());
            }
            Host::Ip(IpAddr::V6(ip)) => {
                out.put_u8(types.ipv6);
                out.put_slice(&ip.octets());
            }
            Host::Domain(name) => {
                let name = &name.as_bytes()[..name.len().min(255)];
                out.put_u8(types.domain);
                out.put_u8(name.len() as u8);
                out.put_slice(name);
            }
        }
        out.put_u16(self.port);
    }

    /// Decodes from the start of `data` in place (for a whole datagram; a stream uses
    /// [`AddressDecoder`]): `Ok(None)` when `data` is too short, otherwise the address
    /// and how many bytes it used.
    pub fn decode_prefix(data: &[u8]) -> Result<Option<(Address, usize)>, AddressError> {
        Address::decode_prefix_with(SOCKS_TYPES, data)
    }

    /// As [`Address::decode_prefix`], with `types` numbering the host kinds.
    pub fn decode_prefix_with(types: AddressTypes, data: &[u8]) -> Result<Option<(Address, usize)>, AddressError> {
        let Some(&atyp) = data.first() else {
            return Ok(None);
        };
        let (host, host_end) = match atyp {
            t if t == types.ipv4 => {
                let Some(octets) = data.get(1..5) else {
                    return Ok(None);
                };
                let octets: [u8; 4] = octets.try_into().expect("four bytes");
                (Host::Ip(IpAddr::V4(Ipv4Addr::from(octets))), 5)
            }
            t if t == types.ipv6 => {
                let Some(octets) = data.get(1..17) else {
                    return Ok(None);
                };
                let octets: [u8; 16] = octets.try_into().expect("sixteen bytes");
                (Host::Ip(IpAddr::V6(Ipv6Addr::from(octets))), 17)
            }
            t if t == types.domain => {
                let Some(&len) = data.get(1) else {
                    return Ok(None);
                };
                if len == 0 {
                    return Err(AddressError::EmptyDomain);
                }
                let end = 2 + len as usize;
                let Some(name) = data.get(2..end) else {
                    return Ok(None);
                };
                let name = std::str::from_utf8(name).map_err(|_| AddressError::InvalidDomain)?;
                if name.chars().any(|c| c.is_control() || c.is_whitespace()) {
                    return Err(AddressError::InvalidDomain);
                }
                (Host::Domain(name.to_string()), end)
            }
            other => return Err(AddressError::UnknownType(other)),
        };
        let Some(port) = data.get(host_end..host_end + 2) else {
            return Ok(None);
        };
        let port = u16::from_be_bytes([port[0], port[1]]);
        Ok(Some((Address { host, port }, host_end + 2)))
    }
}

/// Takes addresses off the front of a stream's buffer.
#[derive(Debug, Clone, Copy)]
pub struct AddressDecoder {
    types: AddressTypes,
}

impl AddressDecoder {
    /// SOCKS5 numbering of the host kinds.
    pub fn socks() -> AddressDecoder {
        AddressDecoder { types: SOCKS_TYPES }
    }

    /// `types` numbering the host kinds.
    pub fn with_types(types: AddressTypes) -> AddressDecoder {
        AddressDecoder { types }
    }
}

impl Decoder for AddressDecoder {
    type Item = Address;
    type Error = AddressError;

    /// On an error `buf` is left untouched.
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Address>, AddressError> {
        let Some((address, used)) = Address::decode_prefix_with(self.types, buf)? else {
            return Ok(None);
        };
        buf.advance(used);
        Ok(Some(address))
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            Host::Ip(ip) => write!(f, "{ip}:{}", self.port),
            Host::Domain(name) => write!(f, "{name}:{}", self.port),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encoded(address: &Address) -> Vec<u8> {
        let mut out = Vec::new();
        address.encode(&mut out);
        out
    }

    #[test]
    fn wire_forms_match_socks5() {
        assert_eq!(encoded(&Address::parse_host_port("127.0.0.1:80").unwrap()), [1, 127, 0, 0, 1, 0, 80]);
        assert_eq!(encoded(&Address::parse_host_port("example.com:443").unwrap()), b"\x03\x0bexample.com\x01\xbb");
        let v6 = encoded(&Address::parse_host_port("[::1]:8080").unwrap());
        assert_eq!(v6.len(), 19);
        assert_eq!(v6[0], 4);
        assert_eq!(&v6[17..], &[0x1f, 0x90]);
    }

    #[test]
    fn display_brackets_ipv6() {
        assert_eq!(Address::parse_host_port("[::1]:53").unwrap().to_string(), "[::1]:53");
        assert_eq!(Address::domain("[::1]", 53).to_string(), "[::1]:53");
    }

    #[test]
    fn bad_input_is_a_clear_error() {
        assert_eq!(Address::decode_prefix(&[9, 0, 0]), Err(AddressError::UnknownType(9)));
        assert_eq!(Address::decode_prefix(&[3, 0, 0, 80]), Err(AddressError::EmptyDomain));
        assert_eq!(Address::decode_prefix(&[3, 2, 0xff, 0xfe, 0, 80]), Err(AddressError::InvalidDomain));
        assert_eq!(Address::decode_prefix(&[3, 3, b'a', b'\n', b'b', 0, 80]), Err(AddressError::InvalidDomain));
    }

    #[test]
    fn the_stream_decoder_consumes_the_address_only_and_keeps_bad_input() {
        let mut buf = BytesMut::from(&encoded(&Address::parse_host_port("10.0.0.1:22").unwrap())[..]);
        buf.extend_from_slice(b"SSH");
        let address = AddressDecoder::socks().decode(&mut buf).unwrap().unwrap();
        assert_eq!((address.to_string(), &buf[..]), ("10.0.0.1:22".to_string(), &b"SSH"[..]));
        let mut bad = BytesMut::from(&[9u8, 1, 2][..]);
        assert_eq!(AddressDecoder::socks().decode(&mut bad), Err(AddressError::UnknownType(9)));
        assert_eq!(&bad[..], &[9, 1, 2]);
        let mut short = BytesMut::from(&[1u8, 127, 0][..]);
        assert_eq!(AddressDecoder::socks().decode(&mut short), Ok(None));
        assert_eq!(short.len(), 3);
    }

    #[test]
    fn trailing_payload_is_left_for_the_stream() {
        let mut data = encoded(&Address::parse_host_port("10.0.0.1:22").unwrap());
        data.extend_from_slice(b"SSH-2.0");
        let (address, used) = Address::decode_prefix(&data).unwrap().unwrap();
        assert_eq!(address.to_string(), "10.0.0.1:22");
        assert_eq!(&data[used..], b"SSH-2.0");
    }

    fn arb_address() -> impl Strategy<Value = Address> {
        let host = prop_oneof![
            any::<[u8; 4]>().prop_map(|o| Host::Ip(IpAddr::V4(o.into()))),
            any::<[u8; 16]>().prop_map(|o| Host::Ip(IpAddr::V6(o.into()))),
            "[a-z0-9.-]{1,255}".prop_map(Host::Domain),
        ];
        (host, any::<u16>()).prop_map(|(host, port)| Address { host, port })
    }

    proptest! {
        #[test]
        fn addresses_round_trip_at_every_prefix(address in arb_address()) {
            let bytes = encoded(&address);
            prop_assert_eq!(bytes.len(), address.encoded_len());
            for cut in 0..bytes.len() {
                prop_assert_eq!(Address::decode_prefix(&bytes[..cut]), Ok(None));
            }
            prop_assert_eq!(Address::decode_prefix(&bytes), Ok(Some((address, bytes.len()))));
        }

        #[test]
        fn a_stream_of_addresses_decodes_the_same_whole_or_bytewise(
            addresses in proptest::collection::vec(arb_address(), 0..6),
        ) {
            use crate::proto::decode::checks::{decode_bytewise, decode_whole};
            let bytes: Vec<u8> = addresses.iter().flat_map(encoded).collect();
            prop_assert_eq!(decode_whole(&mut AddressDecoder::socks(), &bytes), (addresses.clone(), Ok(0)));
            prop_assert_eq!(decode_bytewise(&mut AddressDecoder::socks(), &bytes), (addresses, Ok(0)));
        }

        #[test]
        fn malformed_streams_are_errors_whole_or_bytewise(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            use crate::proto::decode::checks::{decode_bytewise, decode_whole};
            // An error needs only the bytes before it, so both ways find the same one.
            prop_assert_eq!(
                decode_whole(&mut AddressDecoder::socks(), &bytes),
                decode_bytewise(&mut AddressDecoder::socks(), &bytes)
            );
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(Some((_, used))) = Address::decode_prefix(&bytes) {
                prop_assert!(used <= bytes.len());
            }
        }
    }
}
