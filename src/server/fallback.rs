//! Probe resistance: what a connection that does not authenticate meets.
//!
//! AnyTLS should look like an ordinary TLS web server. So whatever completes TLS but does
//! not send a valid authentication block (a browser, `curl -k`, an active prober, random
//! bytes) is, with `--fallback HOST:PORT`, handed to a real web server: the bytes already
//! read first, then both directions (see [`relay`] for the closes). Without `--fallback`, or
//! when the site cannot be reached, the connection is closed silently, but not at a
//! moment that depends on what or how much it sent (see [`linger_then_close`]).
//!
//! The decision ([`read_first_data`]) never waits on anything secret:
//! - 34 bytes or more (the hash and the padding length): the hash is compared in constant
//!   time against every password; a mismatch is decided at once.
//! - 32 or 33 bytes: the hash alone is compared (the crates.io `anytls` client sends the
//!   hash, its length and its padding as three records, which arrive up to a round trip
//!   apart when Nagle holds the small ones back); a mismatch is decided at once, a match
//!   waits for the rest.
//! - Fewer than 32: AnyTLS clients send at least the hash in their first TLS record (the
//!   reference server reads the block in one read), so a short first record is a short
//!   request, e.g. `GET / HTTP/1.0\r\n\r\n`. It gets [`SHORT_REQUEST_WAIT`] from its
//!   first byte for more to arrive, then goes to the site. A partial hash is deliberately
//!   not compared with the passwords: an early answer for "cannot be a prefix" would let
//!   a prober learn the hash (which is the credential) a byte at a time from the timing.
//! - Nothing before the handshake deadline: a silent connection, handed to the site too
//!   (with no bytes), so that the site's own idle timeout decides when it closes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rand::RngExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::framed::{Framed, ReadError};
use crate::metrics::HandshakeCounters;
use crate::proto::auth::{AUTH_FIXED_LEN, AUTH_HASH_LEN, AuthBlockDecoder, AuthError};

/// How long a first request shorter than a password hash (32 bytes) waits for more bytes
/// before it goes to the fallback site. Real clients never need it (their first record
/// holds at least the hash); it only tolerates a client that splits the hash into records
/// sent back to back. Short enough that no browser or person notices.
pub const SHORT_REQUEST_WAIT: Duration = Duration::from_millis(25);

/// Without a fallback, a connection that sent something invalid is read (and the bytes
/// dropped) for a random time in this range, capped by the handshake deadline, then
/// closed: never right after byte 34. A silent connection is closed at the deadline.
/// It stays under the 2 s after which clients (ours included) take a server that has
/// not answered their Settings for a v1 server and report the stream open: a user with
/// a wrong password still gets a clear failure.
pub const LINGER: std::ops::Range<Duration> = Duration::from_millis(300)..Duration::from_millis(1500);

/// How the server meets connections that do not authenticate.
#[derive(Debug, Clone, Default)]
pub struct ProbeSettings {
    /// Where they go (`--fallback`); `None`: they are closed silently.
    pub fallback: Option<FallbackSettings>,
    /// Handshake places one source may hold (`None`: the default share, see
    /// [`super::limits::HandshakeSlots::new`]).
    pub max_handshakes_per_source: Option<usize>,
}

/// `--fallback HOST:PORT` and the ALPN protocols the site speaks.
#[derive(Debug, Clone)]
pub struct FallbackSettings {
    pub target: String,
    /// In order of preference; the first one a client offers is selected, none if it
    /// offers none of them (as nginx does), so an AnyTLS client offering anything still
    /// connects. `http/1.1` unless the site also speaks h2c.
    pub alpn: Vec<Vec<u8>>,
    pub connect_timeout: Duration,
    /// Relays to the site at once. Past the handshake phase a relay counts under no
    /// other cap, so without this one a prober could hold file descriptors at will;
    /// one more is closed silently.
    pub max_connections: usize,
}

impl FallbackSettings {
    pub fn new(target: &str) -> FallbackSettings {
        FallbackSettings {
            target: target.to_string(),
            alpn: vec![b"http/1.1".to_vec()],
            connect_timeout: Duration::from_secs(3),
            max_connections: 1024,
        }
    }
}

/// What the client's first data after TLS turned out to be.
#[derive(Debug)]
pub enum FirstData<U> {
    /// A valid block: what the accept function made of it, and the bytes after the block.
    Authenticated { user: U, leftover: BytesMut },
    /// Not a valid authentication: everything read so far (it goes to the site).
    Invalid { read: BytesMut, why: &'static str },
    /// Nothing, or an incomplete block, by the deadline.
    TimedOut { read: BytesMut },
    /// The client closed (or the read failed) before sending anything.
    Gone(String),
}

/// Reads the client's first data until it authenticates, or is known not to (see the
/// module doc for the rule), or `deadline` passes.
/// `accept` turns a hash into its user, or refuses it (see [`AuthBlockDecoder`]).
pub async fn read_first_data<S, F, U>(io: &mut S, accept: F, deadline: Instant) -> FirstData<U>
where
    S: AsyncRead + Unpin + Send,
    F: FnMut(&[u8; AUTH_HASH_LEN]) -> Option<U>,
{
    read_first_data_after(io, accept, deadline, BytesMut::with_capacity(1024)).await
}

/// As [`read_first_data`], with `buf` already read (a second look at a block, once an
/// auth callback has named its user).
pub async fn read_first_data_after<S, F, U>(io: &mut S, accept: F, deadline: Instant, buf: BytesMut) -> FirstData<U>
where
    S: AsyncRead + Unpin + Send,
    F: FnMut(&[u8; AUTH_HASH_LEN]) -> Option<U>,
{
    let mut block = Framed::with_buffer(AuthBlockDecoder::new(accept), buf, AUTH_FIXED_LEN + u16::MAX as usize);
    // The short wait starts at the first bytes and no longer applies once a whole hash is in.
    let mut short_until = None;
    let read = block
        .next_by(io, |read| {
            if read.is_empty() {
                return Some(deadline);
            }
            let until = *short_until.get_or_insert_with(|| Instant::now() + SHORT_REQUEST_WAIT);
            Some(if read.len() < AUTH_HASH_LEN { deadline.min(until) } else { deadline })
        })
        .await;
    let short_wait_over = block.buffered().len() < AUTH_HASH_LEN && short_until.is_some_and(|until| until < deadline);
    match read {
        Ok(Some(user)) => FirstData::Authenticated { user, leftover: block.into_buffer() },
        Err(ReadError::Decode(AuthError::WrongPassword)) => {
            FirstData::Invalid { read: block.into_buffer(), why: "wrong password" }
        }
        Err(ReadError::TimedOut) if short_wait_over => {
            FirstData::Invalid { read: block.into_buffer(), why: "shorter than an authentication block" }
        }
        Err(ReadError::TimedOut) => FirstData::TimedOut { read: block.into_buffer() },
        Ok(None) => FirstData::Gone("closed before sending anything".into()),
        Err(ReadError::Truncated { .. }) => {
            FirstData::Invalid { read: block.into_buffer(), why: "closed before authenticating" }
        }
        // Cannot happen (a block's declared length is within the bound), but is no block either.
        Err(ReadError::TooLong { .. }) => {
            FirstData::Invalid { read: block.into_buffer(), why: "longer than an authentication block" }
        }
        Err(ReadError::Read(err)) => FirstData::Gone(format!("read failed: {err}")),
    }
}

/// The fallback site and the places for relays to it.
pub struct Fallback {
    settings: FallbackSettings,
    places: Arc<Semaphore>,
}

/// A relay's place under [`FallbackSettings::max_connections`] and its connection to the site.
pub struct SiteConnection {
    _place: OwnedSemaphorePermit,
    site: TcpStream,
}

impl Fallback {
    pub fn new(settings: FallbackSettings) -> Fallback {
        let places = Arc::new(Semaphore::new(settings.max_connections.max(1)));
        Fallback { settings, places }
    }

    pub fn settings(&self) -> &FallbackSettings {
        &self.settings
    }

    /// A place and a connection to the site; `None` (counted, logged at DEBUG) if all
    /// places are taken or the site cannot be reached.
    pub async fn open(&self, peer: SocketAddr, handshakes: &HandshakeCounters) -> Option<SiteConnection> {
        let Ok(place) = self.places.clone().try_acquire_owned() else {
            HandshakeCounters::count(&handshakes.fallback_full);
            log::debug!("{peer}: {} fallback relays open already: closing silently", self.settings.max_connections);
            return None;
        };
        let timeout = self.settings.connect_timeout;
        match tokio::time::timeout(timeout, TcpStream::connect(&self.settings.target)).await {
            Ok(Ok(site)) => {
                let _ = site.set_nodelay(true);
                Some(SiteConnection { _place: place, site })
            }
            outcome => {
                let why = match outcome {
                    Ok(Err(err)) => err.to_string(),
                    _ => format!("no answer within {timeout:?}"),
                };
                HandshakeCounters::count(&handshakes.fallback_unreachable);
                log::debug!("{peer}: fallback {} unreachable ({why}): closing silently", self.settings.target);
                None
            }
        }
    }
}

/// Relays `client` to `site`: `already_read` first, then both ways. The client's close
/// is passed on as a half-close (a request can still be answered); the site's close ends
/// the relay, since nothing the client sends after it can reach the site.
pub async fn relay<C>(
    client: C,
    site: SiteConnection,
    already_read: BytesMut,
    peer: SocketAddr,
    handshakes: &HandshakeCounters,
) where
    C: AsyncRead + AsyncWrite + Unpin,
{
    HandshakeCounters::count(&handshakes.fallback_relayed);
    let SiteConnection { _place, mut site } = site;
    if !already_read.is_empty() && site.write_all(&already_read).await.is_err() {
        return;
    }
    let (mut from_client, mut to_client) = tokio::io::split(client);
    let (mut from_site, mut to_site) = site.into_split();
    let up = async {
        let copied = tokio::io::copy(&mut from_client, &mut to_site).await;
        let _ = to_site.shutdown().await;
        copied
    };
    let down = async {
        let copied = tokio::io::copy(&mut from_site, &mut to_client).await;
        let _ = to_client.shutdown().await;
        copied
    };
    tokio::pin!(up, down);
    let (up, down) = tokio::select! {
        down_done = &mut down => (None, down_done),
        up_done = &mut up => (Some(up_done), (&mut down).await),
    };
    let up = match up {
        Some(Ok(n)) => format!("{} bytes", n + already_read.len() as u64),
        Some(Err(err)) => format!("until {err}"),
        None => "until the site closed".to_string(),
    };
    let down = down.map_or_else(|err| format!("until {err}"), |n| format!("{n} bytes"));
    log::debug!("{peer}: fallback relay done, up {up}, down {down}");
}

/// The silent close: keeps reading (and dropping) what the client sends for a random
/// [`LINGER`] time, or until `deadline` if `silent` (the client never sent anything),
/// then drops the connection. Reading on, rather than leaving bytes unread, makes the
/// close a FIN like any other, not a reset.
pub async fn linger_then_close<S: AsyncRead + Unpin>(mut io: S, deadline: Instant, silent: bool) {
    let until = if silent {
        deadline
    } else {
        let linger = rand::rng().random_range(LINGER);
        deadline.min(Instant::now() + linger)
    };
    let mut sink = vec![0u8; 4096];
    let _ = tokio::time::timeout_at(until, async {
        while let Ok(n) = io.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// The TLS side: as configured, or with `--fallback`, the ALPN protocol chosen per client
/// (see [`FallbackSettings::alpn`]), so that a browser speaks to the site what it speaks.
pub struct TlsFront {
    acceptor: tokio_rustls::TlsAcceptor,
    plain: Arc<rustls::ServerConfig>,
    by_alpn: Vec<(Vec<u8>, Arc<rustls::ServerConfig>)>,
}

impl TlsFront {
    pub fn new(plain: Arc<rustls::ServerConfig>, fallback: Option<&FallbackSettings>) -> TlsFront {
        let by_alpn = fallback.map(|f| alpn_configs(&plain, &f.alpn)).unwrap_or_default();
        TlsFront { acceptor: tokio_rustls::TlsAcceptor::from(plain.clone()), plain, by_alpn }
    }

    pub async fn accept(&self, tcp: TcpStream) -> std::io::Result<tokio_rustls::server::TlsStream<TcpStream>> {
        if self.by_alpn.is_empty() {
            return self.acceptor.accept(tcp).await;
        }
        let start = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp).await?;
        let config = {
            let hello = start.client_hello();
            config_for_alpn(hello.alpn().map(|protocols| protocols.collect()), &self.by_alpn, &self.plain)
        };
        start.into_stream(config).await
    }
}

/// Chooses the TLS configuration for a client by the ALPN protocols it offers: the
/// first of `by_alpn` (the site's protocols, in order) it offers, else `plain` (no ALPN).
fn config_for_alpn(
    offered: Option<Vec<&[u8]>>,
    by_alpn: &[(Vec<u8>, Arc<rustls::ServerConfig>)],
    plain: &Arc<rustls::ServerConfig>,
) -> Arc<rustls::ServerConfig> {
    let offered = offered.unwrap_or_default();
    by_alpn
        .iter()
        .find(|(protocol, _)| offered.contains(&protocol.as_slice()))
        .map(|(_, config)| config.clone())
        .unwrap_or_else(|| plain.clone())
}

/// One configuration per protocol the site speaks, each selecting exactly that one.
fn alpn_configs(plain: &Arc<rustls::ServerConfig>, protocols: &[Vec<u8>]) -> Vec<(Vec<u8>, Arc<rustls::ServerConfig>)> {
    protocols
        .iter()
        .map(|protocol| {
            let mut config = (**plain).clone();
            config.alpn_protocols = vec![protocol.clone()];
            (protocol.clone(), Arc::new(config))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::PasswordHash;
    use crate::proto::auth::{encode_auth_block, in_list};
    use tokio::io::AsyncWriteExt;

    fn users() -> Vec<PasswordHash> {
        vec![PasswordHash::of("alice"), PasswordHash::of("bob")]
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    async fn first_data_of(chunks: Vec<(Vec<u8>, Duration)>, close: bool) -> (FirstData<usize>, Duration) {
        let (mut ours, mut theirs) = tokio::io::duplex(64 * 1024);
        let writer = tokio::spawn(async move {
            for (chunk, pause) in chunks {
                tokio::time::sleep(pause).await;
                theirs.write_all(&chunk).await.unwrap();
            }
            if close {
                drop(theirs);
            } else {
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
        });
        let started = Instant::now();
        let outcome = read_first_data(&mut ours, in_list(&users()), far()).await;
        writer.abort();
        (outcome, started.elapsed())
    }

    fn block(password: &str, padding: u16) -> Vec<u8> {
        let mut out = BytesMut::new();
        encode_auth_block(&PasswordHash::of(password), padding, &mut out);
        out.to_vec()
    }

    #[tokio::test]
    async fn a_valid_block_authenticates_and_keeps_what_follows() {
        let mut data = block("bob", 30);
        data.extend_from_slice(b"frames");
        let (outcome, _) = first_data_of(vec![(data, Duration::ZERO)], false).await;
        match outcome {
            FirstData::Authenticated { user, leftover } => {
                assert_eq!(user, 1);
                assert_eq!(&leftover[..], b"frames");
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_block_split_into_quick_pieces_still_authenticates() {
        let data = block("alice", 30);
        let chunks = vec![(data[..10].to_vec(), Duration::ZERO), (data[10..].to_vec(), Duration::from_millis(2))];
        let (outcome, _) = first_data_of(chunks, false).await;
        assert!(matches!(outcome, FirstData::Authenticated { user: 0, .. }), "{outcome:?}");
    }

    #[tokio::test]
    async fn a_wrong_password_is_decided_at_once_with_every_byte_kept() {
        let mut data = block("mallory", 30);
        data.extend_from_slice(b"more");
        let (outcome, took) = first_data_of(vec![(data.clone(), Duration::ZERO)], false).await;
        match outcome {
            FirstData::Invalid { read, why } => {
                assert_eq!(why, "wrong password");
                assert_eq!(&read[..], &data[..]);
            }
            other => panic!("{other:?}"),
        }
        assert!(took < SHORT_REQUEST_WAIT, "took {took:?}");
    }

    #[tokio::test]
    async fn a_long_http_request_is_decided_at_once() {
        let request = b"GET / HTTP/1.1\r\nHost: example.com\r\nUser-Agent: curl/8\r\n\r\n".to_vec();
        let (outcome, took) = first_data_of(vec![(request.clone(), Duration::ZERO)], false).await;
        assert!(matches!(&outcome, FirstData::Invalid { read, .. } if read[..] == request[..]), "{outcome:?}");
        assert!(took < SHORT_REQUEST_WAIT, "took {took:?}");
    }

    #[tokio::test]
    async fn a_short_request_goes_on_after_the_short_wait() {
        let request = b"GET / HTTP/1.0\r\n\r\n".to_vec();
        let (outcome, took) = first_data_of(vec![(request.clone(), Duration::ZERO)], false).await;
        match outcome {
            FirstData::Invalid { read, why } => {
                assert_eq!(&read[..], &request[..]);
                assert_eq!(why, "shorter than an authentication block");
            }
            other => panic!("{other:?}"),
        }
        assert!(took >= SHORT_REQUEST_WAIT && took < SHORT_REQUEST_WAIT * 8, "took {took:?}");
    }

    #[tokio::test]
    async fn a_short_request_that_half_closes_goes_on_at_once() {
        let (outcome, took) = first_data_of(vec![(b"HEAD /\r\n\r\n".to_vec(), Duration::ZERO)], true).await;
        assert!(matches!(outcome, FirstData::Invalid { why: "closed before authenticating", .. }), "{outcome:?}");
        assert!(took < SHORT_REQUEST_WAIT, "took {took:?}");
    }

    #[tokio::test]
    async fn silence_waits_for_the_deadline_and_a_close_is_gone() {
        let (mut ours, _theirs) = tokio::io::duplex(1024);
        let deadline = Instant::now() + Duration::from_millis(100);
        let outcome = read_first_data(&mut ours, in_list(&users()), deadline).await;
        assert!(matches!(&outcome, FirstData::TimedOut { read } if read.is_empty()), "{outcome:?}");
        assert!(Instant::now() >= deadline);
        let (outcome, _) = first_data_of(vec![], true).await;
        assert!(matches!(outcome, FirstData::Gone(_)), "{outcome:?}");
    }

    #[tokio::test]
    async fn the_right_hash_waits_for_its_padding_past_the_short_wait() {
        let data = block("alice", 30);
        let chunks = vec![(data[..40].to_vec(), Duration::ZERO), (data[40..].to_vec(), SHORT_REQUEST_WAIT * 3)];
        let (outcome, _) = first_data_of(chunks, false).await;
        assert!(matches!(outcome, FirstData::Authenticated { user: 0, .. }), "{outcome:?}");
    }

    #[tokio::test]
    async fn a_hash_in_a_record_of_its_own_is_decided_by_the_hash() {
        // The crates.io client's split: the right hash waits for the rest, however late.
        let data = block("alice", 30);
        let late = SHORT_REQUEST_WAIT * 3;
        let chunks =
            vec![(data[..32].to_vec(), Duration::ZERO), (data[32..34].to_vec(), late), (data[34..].to_vec(), late)];
        let (outcome, _) = first_data_of(chunks, false).await;
        assert!(matches!(outcome, FirstData::Authenticated { user: 0, .. }), "{outcome:?}");
        // A wrong one goes on at once.
        let wrong = block("mallory", 30)[..32].to_vec();
        let (outcome, took) = first_data_of(vec![(wrong, Duration::ZERO)], false).await;
        assert!(matches!(outcome, FirstData::Invalid { why: "wrong password", .. }), "{outcome:?}");
        assert!(took < SHORT_REQUEST_WAIT, "took {took:?}");
    }

    #[tokio::test]
    async fn lingering_reads_on_and_closes_within_the_range() {
        let (ours, mut theirs) = tokio::io::duplex(1024);
        let started = Instant::now();
        let closer = tokio::spawn(linger_then_close(ours, Instant::now() + Duration::from_secs(10), false));
        // The peer can keep writing more than the pipe holds: the server reads on.
        theirs.write_all(&vec![7u8; 16 * 1024]).await.unwrap();
        closer.await.unwrap();
        let took = started.elapsed();
        assert!(took >= LINGER.start && took < LINGER.end + Duration::from_millis(200), "closed after {took:?}");
    }

    #[test]
    fn alpn_selects_the_sites_protocol_or_none() {
        let identity = crate::server::tls::Identity::self_signed().unwrap();
        let plain = identity.server_config().unwrap();
        let by_alpn = alpn_configs(&plain, &[b"http/1.1".to_vec()]);
        let browser = config_for_alpn(Some(vec![b"h2", b"http/1.1"]), &by_alpn, &plain);
        assert_eq!(browser.alpn_protocols, vec![b"http/1.1".to_vec()]);
        let only_h2 = config_for_alpn(Some(vec![b"h2"]), &by_alpn, &plain);
        assert!(only_h2.alpn_protocols.is_empty(), "no overlap: no ALPN, not a failed handshake");
        assert!(config_for_alpn(None, &by_alpn, &plain).alpn_protocols.is_empty());
    }
}
