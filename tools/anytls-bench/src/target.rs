//! The loopback targets the load is sent to: an echo port, a minimal HTTP/1.1
//! responder and a bulk sink/source port.
//!
//! They are deliberately cheap (static zero buffers, no parsing beyond what is
//! needed) so that the proxy, not the target, is what a run measures.
//!
//! Bulk protocol (one request per connection): the client sends 9 bytes, a mode
//! byte and a big-endian u64 `n`.
//! - `D` (download): the target sends `n` bytes, then closes.
//! - `U` (upload): the client sends `n` bytes and shuts down its write side; the
//!   target answers with the big-endian u64 count it received, then closes.

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Size of the static buffers the bulk and HTTP targets write from and read into.
pub const CHUNK: usize = 256 * 1024;
/// Largest HTTP request head the responder accepts.
const MAX_REQUEST_HEAD: usize = 8 * 1024;

pub const MODE_DOWNLOAD: u8 = b'D';
pub const MODE_UPLOAD: u8 = b'U';

/// Where the running targets listen.
#[derive(Debug, Clone, Copy)]
pub struct Targets {
    pub echo: SocketAddr,
    pub http: SocketAddr,
    pub bulk: SocketAddr,
}

impl Targets {
    /// One JSON line, as `anytls-bench target` prints it.
    pub fn to_json(self) -> String {
        format!(r#"{{"echo":"{}","http":"{}","bulk":"{}"}}"#, self.echo, self.http, self.bulk)
    }
}

/// Binds the three targets on `listen`'s IP (each on its own port; port 0 picks
/// free ones, port P uses P, P+1, P+2) and serves them on background tasks.
pub async fn start(listen: SocketAddr) -> io::Result<Targets> {
    let port = |i: u16| if listen.port() == 0 { 0 } else { listen.port() + i };
    // The proxies' backlog, so a burst measures them rather than the targets' queue.
    let bind =
        |i: u16| async move { anytls_rs::accept::listen(&SocketAddr::new(listen.ip(), port(i)).to_string()).await };
    let (echo, http, bulk) = (bind(0).await?, bind(1).await?, bind(2).await?);
    let targets = Targets { echo: echo.local_addr()?, http: http.local_addr()?, bulk: bulk.local_addr()? };
    tokio::spawn(accept_forever(echo, serve_echo));
    tokio::spawn(accept_forever(http, serve_http));
    tokio::spawn(accept_forever(bulk, serve_bulk));
    Ok(targets)
}

async fn accept_forever<F, Fut>(listener: TcpListener, serve: F)
where
    F: Fn(TcpStream) -> Fut,
    Fut: Future<Output = io::Result<()>> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                let _ = tcp.set_nodelay(true);
                let task = serve(tcp);
                tokio::spawn(async move {
                    if let Err(err) = task.await {
                        log::debug!("target connection from {peer}: {err}");
                    }
                });
            }
            Err(err) => {
                // Usually EMFILE under a big `hold`: wait a little rather than spin.
                log::warn!("target accept failed: {err}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_echo(mut tcp: TcpStream) -> io::Result<()> {
    let (mut r, mut w) = tcp.split();
    tokio::io::copy(&mut r, &mut w).await?;
    w.shutdown().await
}

async fn serve_http(mut tcp: TcpStream) -> io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > MAX_REQUEST_HEAD {
            return tcp.write_all(b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\n\r\n").await;
        }
        let n = tcp.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    match requested_bytes(&head) {
        Some(n) => {
            let header = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n"
            );
            tcp.write_all(header.as_bytes()).await?;
            write_zeros(&mut tcp, n).await?;
        }
        None => {
            tcp.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await?;
        }
    }
    tcp.shutdown().await
}

/// `N` of a `GET /bytes/N` request head.
pub fn requested_bytes(head: &[u8]) -> Option<u64> {
    let line = head.split(|&b| b == b'\r').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split(' ');
    let (method, path) = (parts.next()?, parts.next()?);
    if method != "GET" {
        return None;
    }
    path.strip_prefix("/bytes/")?.parse().ok()
}

async fn serve_bulk(mut tcp: TcpStream) -> io::Result<()> {
    let mut request = [0u8; 9];
    tcp.read_exact(&mut request).await?;
    let n = u64::from_be_bytes(request[1..].try_into().expect("8 bytes"));
    match request[0] {
        MODE_DOWNLOAD => write_zeros(&mut tcp, n).await?,
        MODE_UPLOAD => {
            let received = discard_until_eof(&mut tcp).await?;
            tcp.write_all(&received.to_be_bytes()).await?;
        }
        other => return Err(io::Error::new(io::ErrorKind::InvalidData, format!("unknown bulk mode {other}"))),
    }
    tcp.shutdown().await
}

/// Writes `n` zero bytes from a static buffer.
pub async fn write_zeros<W: AsyncWriteExt + Unpin>(w: &mut W, mut n: u64) -> io::Result<()> {
    static ZEROS: [u8; CHUNK] = [0; CHUNK];
    while n > 0 {
        let len = n.min(CHUNK as u64) as usize;
        w.write_all(&ZEROS[..len]).await?;
        n -= len as u64;
    }
    Ok(())
}

/// Reads and drops everything until EOF; returns how many bytes came.
pub async fn discard_until_eof<R: AsyncReadExt + Unpin>(r: &mut R) -> io::Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bytes_requests() {
        assert_eq!(requested_bytes(b"GET /bytes/1024 HTTP/1.1\r\nHost: x\r\n\r\n"), Some(1024));
        assert_eq!(requested_bytes(b"GET /bytes/0 HTTP/1.1\r\n\r\n"), Some(0));
        assert_eq!(requested_bytes(b"POST /bytes/5 HTTP/1.1\r\n\r\n"), None);
        assert_eq!(requested_bytes(b"GET /other HTTP/1.1\r\n\r\n"), None);
        assert_eq!(requested_bytes(b"GET /bytes/x HTTP/1.1\r\n\r\n"), None);
    }
}
