//! Upstreams: the ways out that `[[route]]` rules can send a stream by name
//! (`action = "upstream:NAME"`, docs/routing.md), from `[[upstream]]` tables.
//!
//! - `socks5` and `http`: a proxy asked for the destination (SOCKS5 CONNECT, with
//!   username/password when given; HTTP CONNECT, with `Proxy-Authorization: Basic`). The
//!   proxy resolves names itself, so a name is sent as a name.
//! - `direct`: dialed from this server, from a socket bound to a source address, an
//!   interface or a firewall mark ([`Bind`]).
//!
//! Connections through an upstream are not pooled: a warm connection to a proxy is not yet
//! a connection to any destination, and one that has been asked for one is that stream's.
//! Each stream dials the upstream (its name resolved through the server's name cache) and
//! asks; the whole of it is bounded by the upstream's `connect-timeout-secs`. The bytes of
//! the asking are built and decoded in [`handshake`]; this file sends and reads them.

pub mod handshake;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::dial::{Bind, DialError, Dialer, LookupOwner, NameCache};
use crate::framed::{Framed, ReadError};
use crate::proto::Address;
use crate::proto::decode::Decoder;
use handshake::{ConnectReply, Credentials, HandshakeError, HttpConnectReply, Method, MethodChoice, PasswordStatus};

/// The most an upstream's answer may hold before its end (an HTTP head, with headers).
const MAX_ANSWER: usize = 16 * 1024;

/// How an upstream carries a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Protocol {
    Socks5 { proxy: Address, credentials: Option<Credentials> },
    Http { proxy: Address, credentials: Option<Credentials> },
    Direct,
}

impl Protocol {
    pub fn label(&self) -> &'static str {
        match self {
            Protocol::Socks5 { .. } => "socks5",
            Protocol::Http { .. } => "http",
            Protocol::Direct => "direct",
        }
    }
}

/// What an upstream did so far, kept across reloads for the same name (metrics counters
/// never go backwards).
#[derive(Debug, Default)]
pub struct UpstreamCounters {
    /// Streams that asked it for a connection.
    pub streams: AtomicU64,
    /// Of those, the ones it did not give one (unreachable, refused, timed out, bad answer).
    pub failures: AtomicU64,
}

/// One `[[upstream]]`.
#[derive(Debug)]
pub struct Upstream {
    pub name: String,
    pub protocol: Protocol,
    /// How its sockets are bound (any protocol: the socket to the proxy, or to the destination).
    pub bind: Option<Bind>,
    /// Dialing it and its answer, together.
    pub timeout: Duration,
    pub counters: Arc<UpstreamCounters>,
}

/// A connection through an upstream, and what the upstream sent past its answer (the
/// destination's first bytes, when they came in the same read): the client's, first.
pub struct Connected {
    pub tcp: TcpStream,
    pub early: BytesMut,
}

impl Upstream {
    /// Where this upstream's proxy listens (none for `direct`).
    pub fn proxy(&self) -> Option<&Address> {
        match &self.protocol {
            Protocol::Socks5 { proxy, .. } | Protocol::Http { proxy, .. } => Some(proxy),
            Protocol::Direct => None,
        }
    }

    /// A connection to `destination` through this upstream, counted.
    pub async fn connect(
        &self,
        destination: &Address,
        dialer: &Dialer,
        names: &NameCache,
        owner: &LookupOwner,
    ) -> Result<Connected, DialError> {
        self.counters.streams.fetch_add(1, Ordering::Relaxed);
        let shown = format!("{destination} via upstream {}", self.name);
        let attempt = self.connect_uncounted(destination, dialer, names, owner, &shown);
        let connected = match tokio::time::timeout(self.timeout, attempt).await {
            Ok(connected) => connected,
            Err(_) => Err(DialError::TimedOut(shown)),
        };
        if connected.is_err() {
            self.counters.failures.fetch_add(1, Ordering::Relaxed);
        }
        connected
    }

    async fn connect_uncounted(
        &self,
        destination: &Address,
        dialer: &Dialer,
        names: &NameCache,
        owner: &LookupOwner,
        shown: &str,
    ) -> Result<Connected, DialError> {
        let bind = self.bind.as_ref();
        let Some(proxy) = self.proxy() else {
            let tcp = dialer.connect_bound(destination, Some((names, owner)), bind).await.map_err(|err| match err {
                DialError::Other(_, io) => DialError::Other(shown.to_string(), io),
                other => other,
            })?;
            return Ok(Connected { tcp, early: BytesMut::new() });
        };
        let mut tcp = dialer
            .connect_bound(proxy, Some((names, owner)), bind)
            .await
            .map_err(|err| DialError::Upstream(shown.to_string(), format!("upstream {proxy}: {err}")))?;
        let asked = match &self.protocol {
            Protocol::Socks5 { credentials, .. } => ask_socks5(&mut tcp, destination, credentials.as_ref()).await,
            Protocol::Http { credentials, .. } => ask_http(&mut tcp, destination, credentials.as_ref()).await,
            Protocol::Direct => unreachable!("direct has no proxy"),
        };
        let early = asked.map_err(|why| why.into_dial_error(shown, proxy))?;
        Ok(Connected { tcp, early })
    }
}

/// Why asking the proxy failed: its answer, or the connection to it.
enum AskError {
    Answer(HandshakeError),
    Io(String),
}

impl AskError {
    /// The stream's error: a refusal the proxy reports for the destination keeps its kind
    /// (clients map "refused" and "unreachable" to SOCKS codes); the rest names the proxy.
    fn into_dial_error(self, shown: &str, proxy: &Address) -> DialError {
        use handshake::SocksReply;
        match self {
            AskError::Answer(HandshakeError::Reply(SocksReply(0x05))) => DialError::Refused(shown.to_string()),
            AskError::Answer(HandshakeError::Reply(SocksReply(0x06))) => DialError::TimedOut(shown.to_string()),
            AskError::Answer(HandshakeError::Reply(reply @ SocksReply(0x03 | 0x04))) => {
                DialError::Unreachable(shown.to_string(), format!("upstream {proxy}: {reply}"))
            }
            AskError::Answer(why) => DialError::Upstream(shown.to_string(), format!("upstream {proxy}: {why}")),
            AskError::Io(why) => DialError::Upstream(shown.to_string(), format!("upstream {proxy}: {why}")),
        }
    }
}

impl From<ReadError<HandshakeError, std::io::Error>> for AskError {
    fn from(err: ReadError<HandshakeError, std::io::Error>) -> AskError {
        match err {
            ReadError::Decode(why) => AskError::Answer(why),
            ReadError::Read(io) => AskError::Io(io.to_string()),
            ReadError::Truncated { .. } => AskError::Io("closed in the middle of its answer".into()),
            ReadError::TooLong { limit } => AskError::Io(format!("an answer longer than {limit} bytes")),
            ReadError::TimedOut => AskError::Io("no answer in time".into()),
        }
    }
}

/// Sends `request`, then reads one `D` answer from `tcp`, starting from `buffered`.
async fn exchange<D: Decoder<Error = HandshakeError>>(
    tcp: &mut TcpStream,
    request: &[u8],
    decoder: D,
    buffered: BytesMut,
) -> Result<(D::Item, BytesMut), AskError> {
    tcp.write_all(request).await.map_err(|err| AskError::Io(err.to_string()))?;
    let mut framed = Framed::with_buffer(decoder, buffered, MAX_ANSWER);
    match framed.next(tcp).await? {
        Some(item) => Ok((item, framed.into_buffer())),
        None => Err(AskError::Io("closed without answering".into())),
    }
}

async fn ask_socks5(
    tcp: &mut TcpStream,
    destination: &Address,
    credentials: Option<&Credentials>,
) -> Result<BytesMut, AskError> {
    let greeting = handshake::socks5_greeting(credentials);
    let choice = MethodChoice { offered_password: credentials.is_some() };
    let (method, mut buffered) = exchange(tcp, &greeting, choice, BytesMut::new()).await?;
    if let (Method::Password, Some(credentials)) = (method, credentials) {
        let request = handshake::socks5_password_request(credentials).map_err(AskError::Answer)?;
        ((), buffered) = exchange(tcp, &request, PasswordStatus, buffered).await?;
    }
    let request = handshake::socks5_connect_request(destination);
    let ((), early) = exchange(tcp, &request, ConnectReply, buffered).await?;
    Ok(early)
}

async fn ask_http(
    tcp: &mut TcpStream,
    destination: &Address,
    credentials: Option<&Credentials>,
) -> Result<BytesMut, AskError> {
    let request = handshake::http_connect_request(destination, credentials);
    let ((), early) = exchange(tcp, &request, HttpConnectReply, BytesMut::new()).await?;
    Ok(early)
}
