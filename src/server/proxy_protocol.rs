//! The PROXY protocol (HAProxy's, versions 1 and 2): the header a load balancer or a TLS
//! router (HAProxy `send-proxy`, nginx `proxy_protocol on`) puts in front of a connection
//! to say whose it is. Behind one, every client would otherwise be the balancer's own
//! address to the per-source handshake shares, the users' source addresses and the logs.
//!
//! Only connections from `--proxy-protocol-from` ranges are read for a header, and from
//! them one is required: anyone else could claim any address. The header is decoded by
//! [`decode`], pure code; [`read_header`] takes exactly its bytes off the socket (peeked
//! first, so the TLS bytes behind it stay where the TLS acceptor reads them).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Version 1's longest header, `\r\n` included (the specification's 107 bytes).
pub const MAX_V1: usize = 107;
/// The most a version 2 header may hold here: its addresses and a few TLVs (balancers
/// add a handful, well under this). A longer one is refused rather than buffered.
pub const MAX_V2: usize = 16 + 512;
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// What the header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// A relayed connection from `source` (to `destination`, the balancer's address).
    Proxied { source: SocketAddr, destination: SocketAddr },
    /// The balancer's own connection (a health check, version 2 `LOCAL`), or one whose
    /// addresses it does not say (`UNKNOWN`, an unspecified family): the socket's
    /// address stands.
    Local,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("no PROXY protocol header (the connection starts with {0:02x?})")]
    Missing(Vec<u8>),
    #[error("malformed PROXY protocol v1 header: {0}")]
    BadV1(&'static str),
    #[error("malformed PROXY protocol v2 header: {0}")]
    BadV2(&'static str),
    #[error("PROXY protocol v2 header of {0} bytes, over the {MAX_V2} accepted")]
    TooLong(usize),
    #[error("no complete PROXY protocol header within the handshake time")]
    TimedOut,
    #[error("the connection ended before its PROXY protocol header did")]
    Truncated,
    #[error("reading the PROXY protocol header: {0}")]
    Io(String),
}

/// The header at the start of `data` and its length; `Ok(None)`: more bytes needed.
pub fn decode(data: &[u8]) -> Result<Option<(Header, usize)>, HeaderError> {
    let signature_seen = data.len().min(V2_SIGNATURE.len());
    if data[..signature_seen] == V2_SIGNATURE[..signature_seen] {
        return if signature_seen < V2_SIGNATURE.len() { Ok(None) } else { decode_v2(data) };
    }
    let v1_seen = data.len().min(6);
    if data[..v1_seen] == b"PROXY "[..v1_seen] {
        return if v1_seen < 6 { Ok(None) } else { decode_v1(data) };
    }
    Err(HeaderError::Missing(data[..data.len().min(8)].to_vec()))
}

fn decode_v1(data: &[u8]) -> Result<Option<(Header, usize)>, HeaderError> {
    let bad = HeaderError::BadV1;
    let Some(end) = data.windows(2).take(MAX_V1 - 1).position(|pair| pair == b"\r\n") else {
        return if data.len() >= MAX_V1 { Err(bad("no CRLF within 107 bytes")) } else { Ok(None) };
    };
    let line = std::str::from_utf8(&data[..end]).map_err(|_| bad("not ASCII"))?;
    let mut words = line.split(' ').skip(1);
    let family = words.next().ok_or(bad("no protocol"))?;
    if family == "UNKNOWN" {
        return Ok(Some((Header::Local, end + 2)));
    }
    let v6 = match family {
        "TCP4" => false,
        "TCP6" => true,
        _ => return Err(bad("protocol is not TCP4, TCP6 or UNKNOWN")),
    };
    let mut address = || -> Result<IpAddr, HeaderError> {
        let text = words.next().ok_or(bad("missing address"))?;
        let ip: IpAddr = text.parse().map_err(|_| bad("bad address"))?;
        if ip.is_ipv6() != v6 {
            return Err(bad("address of the other family"));
        }
        Ok(ip)
    };
    let (source_ip, destination_ip) = (address()?, address()?);
    let mut port = || -> Result<u16, HeaderError> {
        let text = words.next().ok_or(bad("missing port"))?;
        // Decimal digits only, no sign or leading zeros (the specification's form).
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) || (text.len() > 1 && text.starts_with('0')) {
            return Err(bad("bad port"));
        }
        text.parse().map_err(|_| bad("bad port"))
    };
    let (source_port, destination_port) = (port()?, port()?);
    if words.next().is_some() {
        return Err(bad("extra fields"));
    }
    let source = SocketAddr::new(source_ip, source_port);
    let destination = SocketAddr::new(destination_ip, destination_port);
    Ok(Some((Header::Proxied { source, destination }, end + 2)))
}

fn decode_v2(data: &[u8]) -> Result<Option<(Header, usize)>, HeaderError> {
    let bad = HeaderError::BadV2;
    if data.len() < 16 {
        return Ok(None);
    }
    let (version, command) = (data[12] >> 4, data[12] & 0x0F);
    if version != 2 {
        return Err(bad("version is not 2"));
    }
    let length = u16::from_be_bytes([data[14], data[15]]) as usize;
    if 16 + length > MAX_V2 {
        return Err(HeaderError::TooLong(16 + length));
    }
    if data.len() < 16 + length {
        return Ok(None);
    }
    let body = &data[16..16 + length];
    let total = 16 + length;
    match command {
        0x0 => return Ok(Some((Header::Local, total))),
        0x1 => {}
        _ => return Err(bad("command is neither LOCAL nor PROXY")),
    }
    let port = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
    // The family's high nibble; the low one (stream, datagram) does not change the layout.
    let header = match data[13] >> 4 {
        0x0 => Header::Local,
        0x1 => {
            if body.len() < 12 {
                return Err(bad("IPv4 addresses cut short"));
            }
            let ip = |at: usize| IpAddr::V4(Ipv4Addr::new(body[at], body[at + 1], body[at + 2], body[at + 3]));
            Header::Proxied { source: SocketAddr::new(ip(0), port(8)), destination: SocketAddr::new(ip(4), port(10)) }
        }
        0x2 => {
            if body.len() < 36 {
                return Err(bad("IPv6 addresses cut short"));
            }
            let ip = |at: usize| {
                let octets: [u8; 16] = body[at..at + 16].try_into().expect("16 bytes");
                IpAddr::V6(Ipv6Addr::from(octets))
            };
            Header::Proxied { source: SocketAddr::new(ip(0), port(32)), destination: SocketAddr::new(ip(16), port(34)) }
        }
        // Unix sockets: no address this server can use.
        0x3 => Header::Local,
        _ => return Err(bad("unknown address family")),
    };
    Ok(Some((header, total)))
}

/// How long to wait before looking again at a header that has not all arrived (balancers
/// send it in one write, so this is rare).
const PEEK_AGAIN: Duration = Duration::from_millis(5);

/// Reads the header off `tcp` by `deadline`, taking exactly its bytes.
pub async fn read_header(tcp: &mut TcpStream, deadline: Instant) -> Result<Header, HeaderError> {
    let mut buf = [0u8; MAX_V2];
    let mut seen = 0;
    loop {
        let peeked = tokio::time::timeout_at(deadline, tcp.peek(&mut buf))
            .await
            .map_err(|_| HeaderError::TimedOut)?
            .map_err(|err| HeaderError::Io(err.to_string()))?;
        if peeked == 0 {
            return Err(HeaderError::Truncated);
        }
        if let Some((header, len)) = decode(&buf[..peeked])? {
            tcp.read_exact(&mut buf[..len]).await.map_err(|err| HeaderError::Io(err.to_string()))?;
            return Ok(header);
        }
        if peeked == seen && Instant::now() + PEEK_AGAIN > deadline {
            return Err(HeaderError::TimedOut);
        }
        if peeked == seen {
            // Nothing new since the last look: peek would return at once again.
            tokio::time::sleep(PEEK_AGAIN).await;
        }
        seen = peeked;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.extend_from_slice(&[0x20 | command, family]);
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    fn proxied(source: &str, destination: &str) -> Header {
        Header::Proxied { source: source.parse().unwrap(), destination: destination.parse().unwrap() }
    }

    #[test]
    fn version_1_headers_of_each_family_decode_with_their_length() {
        let line = b"PROXY TCP4 203.0.113.7 192.0.2.1 56324 443\r\n\x16\x03\x01";
        assert_eq!(decode(line), Ok(Some((proxied("203.0.113.7:56324", "192.0.2.1:443"), line.len() - 3))));
        let line = b"PROXY TCP6 2001:db8::7 2001:db8::1 1 65535\r\n";
        assert_eq!(decode(line), Ok(Some((proxied("[2001:db8::7]:1", "[2001:db8::1]:65535"), line.len()))));
        let line = b"PROXY UNKNOWN ffff:f::1 ffff:f::2 1 2\r\n";
        assert_eq!(decode(line), Ok(Some((Header::Local, line.len()))));
        assert_eq!(decode(b"PROXY UNKNOWN\r\n"), Ok(Some((Header::Local, 15))));
    }

    #[test]
    fn malformed_version_1_headers_say_what_is_wrong() {
        let cases: [(&[u8], &str); 8] = [
            (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "protocol is not TCP4"),
            (b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n", "other family"),
            (b"PROXY TCP4 1.2.3.400 5.6.7.8 1 2\r\n", "bad address"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "missing port"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "bad port"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", "bad port"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "extra fields"),
            (b"PROXY TCP4 \xff\r\n", "not ASCII"),
        ];
        for (line, why) in cases {
            let err = decode(line).unwrap_err().to_string();
            assert!(err.contains(why), "{:?}: {err}", String::from_utf8_lossy(line));
        }
        let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 120]].concat();
        assert_eq!(decode(&long), Err(HeaderError::BadV1("no CRLF within 107 bytes")));
    }

    #[test]
    fn version_2_headers_decode_and_skip_their_tlvs() {
        let mut body = vec![203, 0, 113, 7, 192, 0, 2, 1, 0xdc, 0x04, 0x01, 0xbb];
        body.extend_from_slice(&[0x01, 0x00, 0x02, b'h', b'2']); // a TLV (ALPN), skipped
        let header = v2(1, 0x11, &body);
        let with_tls = [header.as_slice(), b"\x16\x03\x01"].concat();
        assert_eq!(decode(&with_tls), Ok(Some((proxied("203.0.113.7:56324", "192.0.2.1:443"), header.len()))));
        let mut v6 = [0u8; 36];
        v6[15] = 7;
        v6[31] = 1;
        v6[32..36].copy_from_slice(&[0, 80, 1, 187]);
        assert_eq!(decode(&v2(1, 0x21, &v6)), Ok(Some((proxied("[::7]:80", "[::1]:443"), 52))));
        assert_eq!(decode(&v2(0, 0x00, &[])), Ok(Some((Header::Local, 16))), "LOCAL: a health check");
        assert_eq!(decode(&v2(1, 0x00, &[])), Ok(Some((Header::Local, 16))), "UNSPEC family");
        assert_eq!(decode(&v2(1, 0x31, &[0; 216])), Ok(Some((Header::Local, 232))), "a Unix socket");
    }

    #[test]
    fn malformed_version_2_headers_are_refused_and_long_ones_are_not_buffered() {
        assert_eq!(decode(&v2(1, 0x11, &[1, 2, 3])), Err(HeaderError::BadV2("IPv4 addresses cut short")));
        assert_eq!(decode(&v2(1, 0x21, &[0; 12])), Err(HeaderError::BadV2("IPv6 addresses cut short")));
        assert_eq!(decode(&v2(2, 0x11, &[0; 12])), Err(HeaderError::BadV2("command is neither LOCAL nor PROXY")));
        assert_eq!(decode(&v2(1, 0x41, &[0; 12])), Err(HeaderError::BadV2("unknown address family")));
        let mut version_1 = v2(1, 0x11, &[0; 12]);
        version_1[12] = 0x11;
        assert_eq!(decode(&version_1), Err(HeaderError::BadV2("version is not 2")));
        let mut huge = v2(1, 0x11, &[0; 12]);
        huge[14..16].copy_from_slice(&60000u16.to_be_bytes());
        assert_eq!(decode(&huge), Err(HeaderError::TooLong(60016)));
    }

    #[test]
    fn anything_else_is_a_missing_header_and_prefixes_need_more() {
        assert!(matches!(decode(b"\x16\x03\x01\x02\x00"), Err(HeaderError::Missing(_))));
        assert!(matches!(decode(b"GET / HTTP/1.1\r\n"), Err(HeaderError::Missing(_))));
        let line = b"PROXY TCP4 203.0.113.7 192.0.2.1 56324 443\r\n";
        let header = v2(1, 0x11, &[1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 0, 2]);
        for whole in [line.as_slice(), header.as_slice()] {
            for cut in 0..whole.len() {
                assert_eq!(decode(&whole[..cut]), Ok(None), "{cut} of {}", whole.len());
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn no_input_makes_decode_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..160)) {
            let _ = decode(&bytes);
            let _ = decode(&[&V2_SIGNATURE[..], &bytes].concat());
            let _ = decode(&[b"PROXY ".as_slice(), &bytes].concat());
        }

        #[test]
        fn any_version_1_address_pair_round_trips(
            a in proptest::num::u32::ANY, b in proptest::num::u32::ANY,
            p in proptest::num::u16::ANY, q in proptest::num::u16::ANY,
        ) {
            let (a, b) = (Ipv4Addr::from(a), Ipv4Addr::from(b));
            let line = format!("PROXY TCP4 {a} {b} {p} {q}\r\n");
            let expected = Header::Proxied { source: (a, p).into(), destination: (b, q).into() };
            proptest::prop_assert_eq!(decode(line.as_bytes()), Ok(Some((expected, line.len()))));
        }
    }

    #[tokio::test]
    async fn read_header_takes_exactly_the_header_even_when_it_arrives_in_pieces() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sender = tokio::spawn(async move {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            tcp.write_all(b"PROXY TCP4 203.0.113.7 ").await.unwrap();
            tokio::time::sleep(Duration::from_millis(30)).await;
            tcp.write_all(b"192.0.2.1 56324 443\r\nhello").await.unwrap();
            tcp
        });
        let (mut tcp, _) = listener.accept().await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let header = read_header(&mut tcp, deadline).await.unwrap();
        assert_eq!(header, proxied("203.0.113.7:56324", "192.0.2.1:443"));
        let mut rest = [0u8; 5];
        tcp.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"hello", "what follows the header stays for the next reader");
        let _kept_open = sender.await.unwrap();
        // A header that never completes ends at the deadline.
        let silent = tokio::spawn(async move {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            tcp.write_all(b"PROXY TCP4").await.unwrap();
            tokio::time::sleep(Duration::from_secs(2)).await;
        });
        let (mut tcp, _) = listener.accept().await.unwrap();
        let started = Instant::now();
        let result = read_header(&mut tcp, Instant::now() + Duration::from_millis(200)).await;
        assert_eq!(result, Err(HeaderError::TimedOut));
        assert!(started.elapsed() < Duration::from_secs(1));
        silent.abort();
    }
}
