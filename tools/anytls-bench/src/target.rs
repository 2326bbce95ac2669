//! The loopback targets the load is sent to: an echo port, a minimal HTTP/1.1
//! responder and a bulk sink/source port.
//!
//! They are deliberately cheap (static zero buffers, no parsing beyond what is
//! needed) so that the proxy, not the target, is what a run measures; the accept loop,
//! the echo and the request-head reading are the test kit's, as the tests use them.
//!
//! Bulk protocol (one request per connection): the client sends 9 bytes, a mode
//! byte and a big-endian u64 `n`.
//! - `D` (download): the target sends `n` bytes, then closes.
//! - `U` (upload): the client sends `n` bytes; once it has them (or at EOF, if fewer
//!   come) the target answers with the big-endian u64 count it received, then closes.
//!   The answer does not wait for the client's FIN: the Go pairs end a stream at the
//!   first FIN, so an answer sent after it never arrived and their uploads measured 0.

use std::io;
use std::net::SocketAddr;

use anytls_testkit::target::{RequestHead, accept_forever, echo, read_request_head};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Size of the static buffer the bulk and HTTP targets write from, and of the bench's read buffers.
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
    let (echo_listener, http, bulk) = (bind(0).await?, bind(1).await?, bind(2).await?);
    let targets = Targets { echo: echo_listener.local_addr()?, http: http.local_addr()?, bulk: bulk.local_addr()? };
    tokio::spawn(accept_forever(echo_listener, echo));
    tokio::spawn(accept_forever(http, serve_http));
    tokio::spawn(accept_forever(bulk, serve_bulk));
    Ok(targets)
}

async fn serve_http(mut tcp: TcpStream) -> io::Result<()> {
    let head = match read_request_head(&mut tcp, MAX_REQUEST_HEAD).await? {
        RequestHead::Complete(head) => head,
        RequestHead::Closed => return Ok(()),
        RequestHead::TooLarge => {
            return tcp.write_all(b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\n\r\n").await;
        }
    };
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
            let received = discard_up_to(&mut tcp, n).await?;
            tcp.write_all(&received.to_be_bytes()).await?;
        }
        other => return Err(io::Error::new(io::ErrorKind::InvalidData, format!("unknown bulk mode {other}"))),
    }
    tcp.shutdown().await
}

/// Reads and drops `n` bytes, or fewer if the peer ends first; the count read.
async fn discard_up_to(tcp: &mut TcpStream, n: u64) -> io::Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut received = 0u64;
    while received < n {
        let want = (n - received).min(CHUNK as u64) as usize;
        match tcp.read(&mut buf[..want]).await? {
            0 => break,
            got => received += got as u64,
        }
    }
    Ok(received)
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

    #[tokio::test]
    async fn an_upload_is_answered_once_its_bytes_are_in_without_waiting_for_a_fin() {
        let targets = start("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let mut tcp = TcpStream::connect(targets.bulk).await.unwrap();
        let mut request = vec![MODE_UPLOAD];
        request.extend_from_slice(&300_000u64.to_be_bytes());
        tcp.write_all(&request).await.unwrap();
        write_zeros(&mut tcp, 300_000).await.unwrap();
        let mut reply = [0u8; 8];
        let answered = tokio::time::timeout(std::time::Duration::from_secs(5), tcp.read_exact(&mut reply)).await;
        assert!(matches!(answered, Ok(Ok(_))), "no answer while the write side is still open");
        assert_eq!(u64::from_be_bytes(reply), 300_000);
    }
}
