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

pub use anytls_testkit::socks::Destination;
use anytls_testkit::socks::{SOCKS5_OK, socks5_dial};
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
        self.connect_to(&Destination::Addr(target)).await
    }

    /// As [`Route::connect`], to an address or (through SOCKS only) a name.
    pub async fn connect_to(self, target: &Destination) -> io::Result<TcpStream> {
        match (self, target) {
            (Route::Direct, Destination::Addr(addr)) => {
                let tcp = TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                Ok(tcp)
            }
            (Route::Direct, Destination::Name(..)) => {
                Err(io::Error::new(io::ErrorKind::InvalidInput, "a name needs a SOCKS proxy to resolve it"))
            }
            (Route::Socks(proxy), _) => match socks5_dial(proxy, target).await? {
                (SOCKS5_OK, tcp) => Ok(tcp),
                (code, _) => Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("SOCKS5 CONNECT to {target} failed: reply code {code}"),
                )),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn direct_routes_refuse_names() {
        let err = Route::Direct.connect_to(&Destination::Name("t0.bench.test".into(), 80)).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
    }

    #[tokio::test]
    async fn a_refused_socks_connect_is_an_error_naming_the_code() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut greeting = [0u8; 3];
            tcp.read_exact(&mut greeting).await.unwrap();
            tcp.write_all(&[5, 0]).await.unwrap();
            let mut request = [0u8; 10];
            tcp.read_exact(&mut request).await.unwrap();
            tcp.write_all(&[5, 5, 0, 1, 0, 0, 0, 0, 0, 0]).await.unwrap();
        });
        let err = Route::Socks(proxy).connect("127.0.0.1:9".parse().unwrap()).await.unwrap_err();
        assert!(err.to_string().contains("127.0.0.1:9 failed: reply code 5"), "{err}");
    }
}
