//! The local proxy port: SOCKS5, SOCKS4/4a and HTTP proxy on one port; the first
//! byte decides (5, 4, or anything else for HTTP).
//!
//! Each protocol lives in a file of its own behind [`Inbound`]: reading its request
//! (with whatever negotiation it needs on the way) and answering success or failure.
//! Every read goes through `crate::framed` with a bound, so a local client can neither
//! make the buffer grow nor hold a half-sent request past `within`.

mod http;
mod socks4;
mod socks5;

use std::io;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::net::TcpStream;

pub use self::http::{AuthorityError, HeadError};
use super::error::OpenFailure;
use crate::framed::{Framed, ReadError};
use crate::proto::{Address, Decoder};

/// Optional SOCKS5 username/password required of local clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Socks5,
    /// SOCKS5 UDP ASSOCIATE: `destination` is where the app will send from (often 0.0.0.0:0).
    Socks5UdpAssociate,
    Socks4,
    HttpConnect,
    /// A plain `GET http://…` request: forwarded with the head rewritten.
    HttpForward,
}

/// A local client's request, read and ready to be answered.
#[derive(Debug)]
pub struct Request {
    protocol: Protocol,
    pub destination: Address,
    /// Bytes for the destination that arrived with the request (for a forwarded
    /// HTTP request: its rewritten head and any body bytes).
    pub early_data: BytesMut,
}

#[derive(Debug, thiserror::Error)]
pub enum InboundError {
    #[error("local client: {0}")]
    Io(#[from] std::io::Error),
    #[error("local client sent a malformed request: {0}")]
    Malformed(String),
    #[error("local client failed SOCKS5 authentication")]
    AuthFailed,
    #[error("local client asked for an unsupported command {0}")]
    Unsupported(u8),
    #[error("local client sent a bad HTTP proxy request: {0}")]
    BadHttp(#[from] HeadError),
    #[error("local client sent no proxy authorization, or a wrong one")]
    ProxyAuthRequired,
    #[error("local client sent no complete request within {0:?}")]
    TimedOut(Duration),
}

/// One protocol of the local port.
trait Inbound {
    /// Reads the request; `buf` holds what was read so far (at least the first byte).
    async fn read_request(
        tcp: &mut TcpStream,
        buf: BytesMut,
        credentials: Option<&Credentials>,
    ) -> Result<Request, InboundError>;

    /// Tells the local client the stream is open.
    async fn reply_success(tcp: &mut TcpStream, request: &Request) -> io::Result<()>;

    /// Tells the local client why the stream could not be opened.
    async fn reply_failure(tcp: &mut TcpStream, request: &Request, failure: &OpenFailure) -> io::Result<()>;
}

/// Reads the request of whichever protocol the client speaks, answering the
/// protocol's own negotiation (SOCKS5 methods and authentication) on the way. A client
/// that has not finished its request `within` this time is given up on: an idle local
/// connection would otherwise hold a file descriptor for as long as it likes.
pub async fn read_request(
    tcp: &mut TcpStream,
    credentials: Option<&Credentials>,
    within: Duration,
) -> Result<Request, InboundError> {
    let read = async {
        let (first, buf) = read_item(tcp, BytesMut::with_capacity(1024), FirstByte, 1).await?;
        match first {
            5 => socks5::Socks5::read_request(tcp, buf, credentials).await,
            4 => socks4::Socks4::read_request(tcp, buf, credentials).await,
            _ => http::Http::read_request(tcp, buf, credentials).await,
        }
    };
    tokio::time::timeout(within, read).await.unwrap_or(Err(InboundError::TimedOut(within)))
}

impl Request {
    /// Whether this is a SOCKS5 UDP ASSOCIATE (served by `client::udp`).
    pub fn is_udp_associate(&self) -> bool {
        self.protocol == Protocol::Socks5UdpAssociate
    }

    /// Tells the local client the stream is open.
    pub async fn reply_success(&self, tcp: &mut TcpStream) -> io::Result<()> {
        match self.protocol {
            Protocol::Socks5 | Protocol::Socks5UdpAssociate => socks5::Socks5::reply_success(tcp, self).await,
            Protocol::Socks4 => socks4::Socks4::reply_success(tcp, self).await,
            Protocol::HttpConnect | Protocol::HttpForward => http::Http::reply_success(tcp, self).await,
        }
    }

    /// Tells the local client why the stream could not be opened.
    pub async fn reply_failure(&self, tcp: &mut TcpStream, failure: &OpenFailure) -> io::Result<()> {
        match self.protocol {
            Protocol::Socks5 | Protocol::Socks5UdpAssociate => socks5::Socks5::reply_failure(tcp, self, failure).await,
            Protocol::Socks4 => socks4::Socks4::reply_failure(tcp, self, failure).await,
            Protocol::HttpConnect | Protocol::HttpForward => http::Http::reply_failure(tcp, self, failure).await,
        }
    }
}

/// Reads one `decoder` item from the local client, starting from `buf`, with at most
/// `max_buffered` bytes waiting for it; returns the item and the bytes after it.
async fn read_item<D: Decoder>(
    tcp: &mut TcpStream,
    buf: BytesMut,
    decoder: D,
    max_buffered: usize,
) -> Result<(D::Item, BytesMut), ReadError<D::Error, io::Error>>
where
    D::Item: Send,
    D::Error: Send,
{
    let mut framed = Framed::with_buffer(decoder, buf, max_buffered);
    match framed.next(tcp).await? {
        Some(item) => Ok((item, framed.into_buffer())),
        None => Err(ReadError::Truncated { buffered: 0 }),
    }
}

/// The errors every protocol answers alike: the client went away or sent too much.
impl<D: std::fmt::Display> From<ReadError<D, io::Error>> for InboundError {
    fn from(err: ReadError<D, io::Error>) -> InboundError {
        match err {
            ReadError::Read(err) => InboundError::Io(err),
            ReadError::Truncated { .. } => InboundError::Malformed("connection closed mid-request".into()),
            other => InboundError::Malformed(other.to_string()),
        }
    }
}

/// The first byte, left in the buffer: it only says which protocol reads the request.
struct FirstByte;

impl Decoder for FirstByte {
    type Item = u8;
    type Error = std::convert::Infallible;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<u8>, Self::Error> {
        Ok(buf.first().copied())
    }
}

/// Exactly `len` bytes, taken off the buffer.
struct Exactly(usize);

impl Decoder for Exactly {
    type Item = BytesMut;
    type Error = std::convert::Infallible;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<BytesMut>, Self::Error> {
        Ok((buf.len() >= self.0).then(|| buf.split_to(self.0)))
    }
}

/// Bytes up to a NUL (taken off with it), as SOCKS4 ends its user id and host name.
struct NulTerminated;

impl Decoder for NulTerminated {
    type Item = BytesMut;
    type Error = std::convert::Infallible;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<BytesMut>, Self::Error> {
        let Some(end) = buf.iter().position(|&b| b == 0) else { return Ok(None) };
        let field = buf.split_to(end);
        buf.advance(1);
        Ok(Some(field))
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;
    use crate::proto::decode::checks::{decode_bytewise, decode_whole};

    #[test]
    fn the_small_decoders_take_what_they_say() {
        assert_eq!(decode_whole(&mut Exactly(2), b"abc"), (vec![BytesMut::from("ab")], Ok(1)));
        assert_eq!(
            decode_bytewise(&mut NulTerminated, b"user\0host\0x"),
            (vec![BytesMut::from("user"), BytesMut::from("host")], Ok(1))
        );
        let mut buf = BytesMut::from("\x05rest");
        assert_eq!(FirstByte.decode(&mut buf), Ok(Some(5)));
        assert_eq!(buf.len(), 5, "the first byte stays for the protocol");
    }

    #[tokio::test]
    async fn a_silent_local_client_is_given_up_on_at_the_deadline() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _silent = TcpStream::connect(addr).await.unwrap();
        let (mut accepted, _) = listener.accept().await.unwrap();
        let started = std::time::Instant::now();
        let result = read_request(&mut accepted, None, Duration::from_millis(200)).await;
        assert!(matches!(result, Err(InboundError::TimedOut(_))), "{result:?}");
        assert!(started.elapsed() < Duration::from_secs(2));

        // Half a SOCKS5 greeting is no better than none.
        let mut partial = TcpStream::connect(addr).await.unwrap();
        partial.write_all(&[5, 1]).await.unwrap();
        let (mut accepted, _) = listener.accept().await.unwrap();
        let result = read_request(&mut accepted, None, Duration::from_millis(200)).await;
        assert!(matches!(result, Err(InboundError::TimedOut(_))), "{result:?}");
    }

    #[tokio::test]
    async fn a_client_that_leaves_mid_request_is_malformed() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        client.write_all(&[4, 1, 0]).await.unwrap();
        drop(client);
        let (mut accepted, _) = listener.accept().await.unwrap();
        let result = read_request(&mut accepted, None, Duration::from_secs(2)).await;
        assert!(
            matches!(&result, Err(InboundError::Malformed(why)) if why == "connection closed mid-request"),
            "{result:?}"
        );
    }
}
