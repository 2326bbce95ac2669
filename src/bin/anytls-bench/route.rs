//! How the load reaches a target: directly (the baseline) or through a SOCKS5 proxy.
//!
//! Every call opens a NEW connection, so a SOCKS run measures the proxy's cost of
//! a new stream, which is what connection pooling is meant to make cheap.

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

impl Route {
    /// A connected stream to `target` (for SOCKS: after the CONNECT succeeded).
    pub async fn connect(self, target: SocketAddr) -> io::Result<TcpStream> {
        let addr = match self {
            Route::Direct => target,
            Route::Socks(proxy) => proxy,
        };
        let mut tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        if let Route::Socks(_) = self {
            socks5_connect(&mut tcp, target).await?;
        }
        Ok(tcp)
    }
}

/// SOCKS5 without authentication, CONNECT to an IP address. The greeting waits for
/// its answer before the request goes out, as curl does: some proxies read the
/// greeting with a buffer and would lose a pipelined request.
async fn socks5_connect(tcp: &mut TcpStream, target: SocketAddr) -> io::Result<()> {
    tcp.write_all(&[5, 1, 0]).await?;
    let mut greeting = [0u8; 2];
    tcp.read_exact(&mut greeting).await?;
    if greeting != [5, 0] {
        return Err(protocol_error(format!("SOCKS5 proxy refused no-auth: {greeting:?}")));
    }
    let mut out = vec![5, 1, 0];
    match target {
        SocketAddr::V4(a) => {
            out.push(1);
            out.extend_from_slice(&a.ip().octets());
        }
        SocketAddr::V6(a) => {
            out.push(4);
            out.extend_from_slice(&a.ip().octets());
        }
    }
    out.extend_from_slice(&target.port().to_be_bytes());
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
