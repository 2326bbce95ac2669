//! How the load reaches a target: directly (the baseline) or through a SOCKS5 proxy.
//!
//! Every call opens a NEW connection, so a SOCKS run measures the proxy's cost of
//! a new stream, which is what connection pooling is meant to make cheap.
//!
//! Through SOCKS the destination may also be a name ([`Destination::Name`]), sent as a
//! SOCKS5 domain for the proxy's server to resolve; directly, only addresses are dialed
//! (the bench does not resolve names itself, see `rr --target-names`).

use std::fmt;
use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Direct,
    Socks(SocketAddr),
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Route::Direct => write!(f, "direct"),
            Route::Socks(addr) => write!(f, "socks {addr}"),
        }
    }
}

/// Where one connection goes: an address, or a name for the SOCKS proxy to resolve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    Addr(SocketAddr),
    /// A host name (at most 255 bytes, the SOCKS5 limit) and a port.
    Name(String, u16),
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Destination::Addr(addr) => write!(f, "{addr}"),
            Destination::Name(name, port) => write!(f, "{name}:{port}"),
        }
    }
}

impl Route {
    /// A connected stream to `target` (for SOCKS: after the CONNECT succeeded).
    pub async fn connect(self, target: SocketAddr) -> io::Result<TcpStream> {
        self.connect_to(&Destination::Addr(target)).await
    }

    /// As [`Route::connect`], to an address or (through SOCKS only) a name.
    pub async fn connect_to(self, target: &Destination) -> io::Result<TcpStream> {
        let addr = match (self, target) {
            (Route::Direct, Destination::Addr(addr)) => *addr,
            (Route::Direct, Destination::Name(..)) => {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, "a name needs a SOCKS proxy to resolve it"));
            }
            (Route::Socks(proxy), _) => proxy,
        };
        let mut tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        if let Route::Socks(_) = self {
            socks5_connect(&mut tcp, target).await?;
        }
        Ok(tcp)
    }
}

/// The CONNECT request for `target`: an IPv4, IPv6 or domain address, then the port.
fn socks5_request(target: &Destination) -> io::Result<Vec<u8>> {
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

/// SOCKS5 without authentication, CONNECT to `target`. The greeting waits for
/// its answer before the request goes out, as curl does: some proxies read the
/// greeting with a buffer and would lose a pipelined request.
async fn socks5_connect(tcp: &mut TcpStream, target: &Destination) -> io::Result<()> {
    let out = socks5_request(target)?;
    tcp.write_all(&[5, 1, 0]).await?;
    let mut greeting = [0u8; 2];
    tcp.read_exact(&mut greeting).await?;
    if greeting != [5, 0] {
        return Err(protocol_error(format!("SOCKS5 proxy refused no-auth: {greeting:?}")));
    }
    tcp.write_all(&out).await?;
    let mut head = [0u8; 4];
    tcp.read_exact(&mut head).await?;
    if head[0] != 5 || head[1] != 0 {
        return Err(protocol_error(format!("SOCKS5 CONNECT to {target} failed: reply code {}", head[1])));
    }
    let bound_len = match head[3] {
        1 => 4 + 2,
        4 => 16 + 2,
        3 => {
            let mut len = [0u8; 1];
            tcp.read_exact(&mut len).await?;
            len[0] as usize + 2
        }
        other => return Err(protocol_error(format!("SOCKS5 reply with address type {other}"))),
    };
    let mut bound = [0u8; 258];
    tcp.read_exact(&mut bound[..bound_len]).await?;
    Ok(())
}

fn protocol_error(text: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_requests_carry_addresses_and_names() {
        let v4 = Destination::Addr("127.0.1.2:80".parse().unwrap());
        assert_eq!(socks5_request(&v4).unwrap(), [5, 1, 0, 1, 127, 0, 1, 2, 0, 80]);
        let v6 = socks5_request(&Destination::Addr("[::1]:443".parse().unwrap())).unwrap();
        assert_eq!((v6[3], v6.len(), &v6[20..]), (4, 22, &[1, 187][..]));
        let name = Destination::Name("t7.bench.test".into(), 8080);
        let mut want = vec![5, 1, 0, 3, 13];
        want.extend_from_slice(b"t7.bench.test");
        want.extend_from_slice(&8080u16.to_be_bytes());
        assert_eq!(socks5_request(&name).unwrap(), want);
        assert_eq!(name.to_string(), "t7.bench.test:8080");
        assert!(socks5_request(&Destination::Name("a".repeat(256), 1)).is_err());
        assert!(socks5_request(&Destination::Name(String::new(), 1)).is_err());
    }
}
