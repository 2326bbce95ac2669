//! A small SOCKS5 (no authentication, CONNECT) and SOCKS4a client.
//!
//! [`socks5_dial`] is the one SOCKS5 handshake: the tests read its reply code (a refusal
//! is often what they check), the load generator turns a non-zero code into an error.

use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// SOCKS5 reply codes (RFC 1928, section 6) that callers look at.
pub const SOCKS5_OK: u8 = 0;
pub const SOCKS5_GENERAL: u8 = 1;
pub const SOCKS5_HOST_UNREACHABLE: u8 = 4;
pub const SOCKS5_REFUSED: u8 = 5;
pub const SOCKS5_TIMED_OUT: u8 = 6;

/// Where a CONNECT goes: an address, or a name for the proxy to resolve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    Addr(SocketAddr),
    /// A host name (1 to 255 bytes, the SOCKS5 limit) and a port.
    Name(String, u16),
}

impl Destination {
    /// `host:port` as a test writes it: an IPv4 literal is sent as an address, anything
    /// else (IPv6 and odd spellings of loopback included) as a name, so that the proxy,
    /// not this client, decides what the text means.
    pub fn from_host(host: &str, port: u16) -> Destination {
        match host.parse::<Ipv4Addr>() {
            Ok(ip) => Destination::Addr(SocketAddr::from((ip, port))),
            Err(_) => Destination::Name(host.to_string(), port),
        }
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Destination::Addr(addr) => write!(f, "{addr}"),
            Destination::Name(name, port) => write!(f, "{name}:{port}"),
        }
    }
}

/// The CONNECT request for `target`: an IPv4, IPv6 or domain address, then the port.
pub fn connect_request(target: &Destination) -> io::Result<Vec<u8>> {
    let mut out = vec![5, 1, 0];
    let port = match target {
        Destination::Addr(SocketAddr::V4(a)) => {
            out.push(1);
            out.extend_from_slice(&a.ip().octets());
            a.port()
        }
        Destination::Addr(SocketAddr::V6(a)) => {
            out.push(4);
            out.extend_from_slice(&a.ip().octets());
            a.port()
        }
        Destination::Name(name, port) => {
            let len = u8::try_from(name.len()).ok().filter(|&n| n > 0).ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, format!("SOCKS5 names are 1-255 bytes: {name:?}"))
            })?;
            out.push(3);
            out.push(len);
            out.extend_from_slice(name.as_bytes());
            *port
        }
    };
    out.extend_from_slice(&port.to_be_bytes());
    Ok(out)
}

/// Connects to `proxy` and asks it for `target`. Returns the reply code and the
/// connection (a tunnel to `target` when the code is [`SOCKS5_OK`]).
pub async fn socks5_dial(proxy: SocketAddr, target: &Destination) -> io::Result<(u8, TcpStream)> {
    let request = connect_request(target)?;
    let mut tcp = TcpStream::connect(proxy).await?;
    tcp.set_nodelay(true)?;
    let code = socks5_handshake(&mut tcp, &request).await?;
    Ok((code, tcp))
}

/// Greeting, `request`, and the whole reply (bound address included, so the tunnel
/// starts clean). The greeting waits for its answer before the request goes out, as
/// curl does: some proxies read the greeting with a buffer and would lose a pipelined
/// request.
async fn socks5_handshake(tcp: &mut TcpStream, request: &[u8]) -> io::Result<u8> {
    tcp.write_all(&[5, 1, 0]).await?;
    let mut method = [0u8; 2];
    tcp.read_exact(&mut method).await?;
    if method != [5, 0] {
        return Err(protocol_error(format!("SOCKS5 proxy refused no-auth: {method:?}")));
    }
    tcp.write_all(request).await?;
    let mut head = [0u8; 4];
    tcp.read_exact(&mut head).await?;
    if head[0] != 5 {
        return Err(protocol_error(format!("SOCKS5 reply of version {}", head[0])));
    }
    let address_len = match head[3] {
        1 => 4,
        4 => 16,
        3 => tcp.read_u8().await? as usize,
        other => return Err(protocol_error(format!("SOCKS5 reply with address type {other}"))),
    };
    let mut bound = [0u8; 255 + 2];
    tcp.read_exact(&mut bound[..address_len + 2]).await?;
    Ok(head[1])
}

/// SOCKS5 CONNECT to `host:port` (see [`Destination::from_host`]) through `proxy`.
/// Returns the reply code and the connection (usable when the code is 0).
pub async fn socks5_connect(proxy: SocketAddr, host: &str, port: u16) -> io::Result<(u8, TcpStream)> {
    socks5_dial(proxy, &Destination::from_host(host, port)).await
}

/// SOCKS5 CONNECT to `target` that must succeed (panics otherwise: for tests).
pub async fn socks5_open(proxy: SocketAddr, target: SocketAddr) -> TcpStream {
    let (code, tcp) = socks5_connect(proxy, &target.ip().to_string(), target.port())
        .await
        .unwrap_or_else(|err| panic!("SOCKS5 to {target} through {proxy}: {err}"));
    assert_eq!(code, SOCKS5_OK, "SOCKS5 reply code for {target}");
    tcp
}

/// SOCKS4a CONNECT to `host:port` (the host always sent as a name). Returns the SOCKS4
/// reply code (0x5a = granted) and the connection.
pub async fn socks4a_connect(proxy: SocketAddr, host: &str, port: u16) -> io::Result<(u8, TcpStream)> {
    let mut tcp = TcpStream::connect(proxy).await?;
    let mut request = vec![4, 1];
    request.extend_from_slice(&port.to_be_bytes());
    request.extend_from_slice(&[0, 0, 0, 1]);
    request.extend_from_slice(b"e2e\0");
    request.extend_from_slice(host.as_bytes());
    request.push(0);
    tcp.write_all(&request).await?;
    let mut reply = [0u8; 8];
    tcp.read_exact(&mut reply).await?;
    Ok((reply[1], tcp))
}

fn protocol_error(text: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn connect_requests_carry_addresses_and_names() {
        let v4 = Destination::Addr("127.0.1.2:80".parse().unwrap());
        assert_eq!(connect_request(&v4).unwrap(), [5, 1, 0, 1, 127, 0, 1, 2, 0, 80]);
        let v6 = connect_request(&Destination::Addr("[::1]:443".parse().unwrap())).unwrap();
        assert_eq!((v6[3], v6.len(), &v6[20..]), (4, 22, &[1, 187][..]));
        let name = Destination::Name("t7.bench.test".into(), 8080);
        let mut want = vec![5, 1, 0, 3, 13];
        want.extend_from_slice(b"t7.bench.test");
        want.extend_from_slice(&8080u16.to_be_bytes());
        assert_eq!(connect_request(&name).unwrap(), want);
        assert_eq!(name.to_string(), "t7.bench.test:8080");
        assert!(connect_request(&Destination::Name("a".repeat(256), 1)).is_err());
        assert!(connect_request(&Destination::Name(String::new(), 1)).is_err());
    }

    #[test]
    fn only_ipv4_literals_are_sent_as_addresses() {
        assert_eq!(Destination::from_host("127.0.0.1", 80), Destination::Addr("127.0.0.1:80".parse().unwrap()));
        assert_eq!(Destination::from_host("localhost", 80), Destination::Name("localhost".into(), 80));
        let mapped = Destination::from_host("::ffff:127.0.0.1", 80);
        assert_eq!(mapped, Destination::Name("::ffff:127.0.0.1".into(), 80));
    }

    /// A one-shot SOCKS5 server: checks the greeting and request, answers `reply`.
    async fn proxy_answering(reply: &'static [u8]) -> (SocketAddr, tokio::task::JoinHandle<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut greeting = [0u8; 3];
            tcp.read_exact(&mut greeting).await.unwrap();
            assert_eq!(greeting, [5, 1, 0]);
            tcp.write_all(&[5, 0]).await.unwrap();
            let mut request = [0u8; 10];
            tcp.read_exact(&mut request).await.unwrap();
            tcp.write_all(reply).await.unwrap();
            tcp.write_all(b"tunnel").await.unwrap();
            request.to_vec()
        });
        (addr, task)
    }

    #[tokio::test]
    async fn dial_reads_the_whole_reply_and_returns_its_code() {
        // Refused, with a domain as the bound address: the code comes back, and the
        // tunnel's first bytes are not mistaken for the reply.
        let (proxy, request) = proxy_answering(&[5, SOCKS5_REFUSED, 0, 3, 4, b'h', b'o', b's', b't', 0, 1]).await;
        let (code, mut tcp) = socks5_connect(proxy, "10.1.2.3", 258).await.unwrap();
        assert_eq!(code, SOCKS5_REFUSED);
        assert_eq!(request.await.unwrap(), [5, 1, 0, 1, 10, 1, 2, 3, 1, 2]);
        let mut rest = Vec::new();
        tcp.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"tunnel");
    }

    #[tokio::test]
    async fn dial_refuses_a_reply_of_another_version() {
        let (proxy, _request) = proxy_answering(&[4, 0, 0, 1, 0, 0, 0, 0, 0, 0]).await;
        let err = socks5_connect(proxy, "10.1.2.3", 80).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    }
}
