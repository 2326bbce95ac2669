//! Loopback targets for traffic through a proxy: an echo, a half-close checker, a bulk
//! source and a small HTTP/1.1 origin, plus the pieces a target is built from (the
//! accept loop, the echo service, reading a request head, draining to EOF).
//!
//! The `spawn_*` targets run as tasks on the caller's runtime and end with it; they
//! bind `127.0.0.1:0` and return the address, so there is no port race.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::payload::{hex, payload, sha256_hex};

/// Read buffer for draining: big, so a target stays cheap under a bulk upload.
const DRAIN_BUFFER: usize = 256 * 1024;
/// Largest HTTP request head [`spawn_http`] reads.
const HTTP_HEAD_LIMIT: usize = 64 * 1024;

/// Serves every connection `listener` accepts with `serve`, each on its own task, until
/// the runtime ends. A failed accept (usually EMFILE under many streams) waits a little
/// rather than spin or give up; a connection's error is only logged, at DEBUG.
pub async fn accept_forever<F, Fut>(listener: TcpListener, serve: F)
where
    F: Fn(TcpStream) -> Fut,
    Fut: Future<Output = io::Result<()>> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                // Small request/response rounds must not wait for Nagle.
                let _ = tcp.set_nodelay(true);
                let task = serve(tcp);
                tokio::spawn(async move {
                    if let Err(err) = task.await {
                        log::debug!("target connection from {peer}: {err}");
                    }
                });
            }
            Err(err) => {
                log::warn!("target accept failed: {err}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Echoes every byte back; shuts its write side when the client does.
pub async fn echo(mut tcp: TcpStream) -> io::Result<()> {
    let (mut reader, mut writer) = tcp.split();
    tokio::io::copy(&mut reader, &mut writer).await?;
    writer.shutdown().await
}

/// Reads and drops everything until EOF; returns how many bytes came.
pub async fn discard_until_eof<R: AsyncReadExt + Unpin>(reader: &mut R) -> io::Result<u64> {
    let mut buf = vec![0u8; DRAIN_BUFFER];
    let mut total = 0u64;
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
    }
}

/// What came of reading an HTTP request head.
#[derive(Debug, PartialEq, Eq)]
pub enum RequestHead {
    /// Everything read up to and including the blank line (a body may follow it).
    Complete(Vec<u8>),
    /// The client closed before the head was complete.
    Closed,
    /// More than the limit arrived without the blank line.
    TooLarge,
}

/// Reads an HTTP request head of at most about `limit` bytes.
pub async fn read_request_head<R: AsyncReadExt + Unpin>(reader: &mut R, limit: usize) -> io::Result<RequestHead> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > limit {
            return Ok(RequestHead::TooLarge);
        }
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            return Ok(RequestHead::Closed);
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(RequestHead::Complete(head))
}

async fn bind_loopback() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind target");
    let addr = listener.local_addr().expect("target addr");
    (listener, addr)
}

/// An [`echo`] target.
pub async fn spawn_echo() -> SocketAddr {
    let (listener, addr) = bind_loopback().await;
    tokio::spawn(accept_forever(listener, echo));
    addr
}

/// Reads until EOF, then answers `"<byte count> <sha256 hex>\n"` and closes: the answer
/// only arrives if the client's half-close got through and the way back stayed open.
pub async fn spawn_half_close() -> SocketAddr {
    let (listener, addr) = bind_loopback().await;
    tokio::spawn(accept_forever(listener, answer_count_and_digest));
    addr
}

async fn answer_count_and_digest(mut tcp: TcpStream) -> io::Result<()> {
    let mut hasher = Sha256::new();
    let mut count = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match tcp.read(&mut buf).await? {
            0 => break,
            n => {
                count += n;
                hasher.update(&buf[..n]);
            }
        }
    }
    let digest = hex(&hasher.finalize());
    tcp.write_all(format!("{count} {digest}\n").as_bytes()).await?;
    tcp.shutdown().await
}

/// The answer [`spawn_half_close`] gives for `data`.
pub fn half_close_answer(data: &[u8]) -> String {
    format!("{} {}\n", data.len(), sha256_hex(data))
}

/// Sends `data` on every connection, then closes (ignores what the client sends).
pub async fn spawn_bulk(data: Arc<Vec<u8>>) -> SocketAddr {
    let (listener, addr) = bind_loopback().await;
    tokio::spawn(accept_forever(listener, move |mut tcp| {
        let data = data.clone();
        async move {
            if tcp.write_all(&data).await.is_ok() {
                let _ = tcp.shutdown().await;
            }
            // Drain until the client closes, so no RST cuts the data short.
            discard_until_eof(&mut tcp).await.map(drop)
        }
    }));
    addr
}

/// A minimal HTTP/1.1 origin server. `GET /bytes/N` answers N bytes of
/// `payload(N, N)`; any other path answers `hello <path>\n`. Every response closes the
/// connection. The counter counts requests served.
pub async fn spawn_http() -> (SocketAddr, Arc<AtomicUsize>) {
    let (listener, addr) = bind_loopback().await;
    let served = Arc::new(AtomicUsize::new(0));
    let counter = served.clone();
    tokio::spawn(accept_forever(listener, move |tcp| answer_http(tcp, counter.clone())));
    (addr, served)
}

async fn answer_http(mut tcp: TcpStream, served: Arc<AtomicUsize>) -> io::Result<()> {
    let RequestHead::Complete(head) = read_request_head(&mut tcp, HTTP_HEAD_LIMIT).await? else {
        return Ok(());
    };
    let text = String::from_utf8_lossy(&head);
    let path = text.split(' ').nth(1).unwrap_or("/").to_string();
    let body = http_body_for(&path);
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    served.fetch_add(1, Ordering::Relaxed);
    if tcp.write_all(response.as_bytes()).await.is_ok() && tcp.write_all(&body).await.is_ok() {
        let _ = tcp.shutdown().await;
    }
    // Drain until the client closes, so no RST cuts the response short.
    discard_until_eof(&mut tcp).await.map(drop)
}

/// The body [`spawn_http`] answers for `path`.
pub fn http_body_for(path: &str) -> Vec<u8> {
    match path.strip_prefix("/bytes/").and_then(|n| n.parse::<usize>().ok()) {
        Some(len) => payload(len, len as u64),
        None => format!("hello {path}\n").into_bytes(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes `data`, half-closes, reads to EOF.
    async fn exchange(addr: SocketAddr, data: &[u8]) -> Vec<u8> {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(data).await.unwrap();
        tcp.shutdown().await.unwrap();
        let mut out = Vec::new();
        tcp.read_to_end(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn echo_returns_every_byte_then_closes() {
        let data = payload(300_000, 1);
        assert_eq!(exchange(spawn_echo().await, &data).await, data);
    }

    #[tokio::test]
    async fn half_close_answers_count_and_digest() {
        let data = payload(100_000, 2);
        let answer = exchange(spawn_half_close().await, &data).await;
        assert_eq!(String::from_utf8(answer).unwrap(), half_close_answer(&data));
        assert_eq!(half_close_answer(b""), format!("0 {}\n", sha256_hex(b"")));
    }

    #[tokio::test]
    async fn bulk_sends_its_data_whatever_comes() {
        let data = Arc::new(payload(500_000, 3));
        assert_eq!(exchange(spawn_bulk(data.clone()).await, b"ignored").await, *data);
    }

    #[tokio::test]
    async fn http_answers_bytes_and_hello_and_counts() {
        let (addr, served) = spawn_http().await;
        let raw = exchange(addr, b"GET /bytes/5000 HTTP/1.1\r\nHost: t\r\n\r\n").await;
        let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        assert!(raw.starts_with(b"HTTP/1.1 200 OK\r\n"));
        assert_eq!(raw[split..], payload(5000, 5000));
        let raw = exchange(addr, b"GET /other HTTP/1.1\r\n\r\n").await;
        assert!(raw.ends_with(b"\r\n\r\nhello /other\n"), "{}", String::from_utf8_lossy(&raw));
        assert_eq!(served.load(Ordering::Relaxed), 2);
        assert_eq!(http_body_for("/bytes/x"), b"hello /bytes/x\n");
    }

    #[tokio::test]
    async fn request_heads_end_at_the_blank_line_or_the_limit() {
        let mut complete: &[u8] = b"GET / HTTP/1.1\r\n\r\nbody";
        let head = read_request_head(&mut complete, 1024).await.unwrap();
        assert_eq!(head, RequestHead::Complete(b"GET / HTTP/1.1\r\n\r\nbody".to_vec()));
        let mut cut: &[u8] = b"GET / HTTP/1.1\r\n";
        assert_eq!(read_request_head(&mut cut, 1024).await.unwrap(), RequestHead::Closed);
        let endless = vec![b'a'; 10_000];
        assert_eq!(read_request_head(&mut endless.as_slice(), 1024).await.unwrap(), RequestHead::TooLarge);
    }

    #[tokio::test]
    async fn discard_counts_what_it_drops() {
        let data = payload(700_000, 4);
        assert_eq!(discard_until_eof(&mut data.as_slice()).await.unwrap(), 700_000);
    }
}
