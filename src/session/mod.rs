//! A session: one authenticated connection carrying many streams as frames.
//!
//! The session owns two tasks over the split connection. The reader decodes frames
//! and hands stream data to bounded per-stream queues; when a queue is full the
//! reader waits, which stops reading the connection: that is the protocol's only
//! backpressure (AnyTLS has no flow-control window). The writer drains a small
//! control queue first, then the data queue, and batches whatever is queued into one
//! large write so TLS records are filled.
//!
//! Both ends share this code; only the frames each receives, and what each may ask of
//! its session, differ. The end is a type parameter, [`ClientSession`] being
//! `Session<Client>` and [`ServerSession`] `Session<Server>`, rather than two handle
//! types around a shared inner one: what both ends do (close, `closed()`, the
//! counters) is written once for any `Session<End>`, what only one end does (opening
//! a stream, pool membership) exists only on that end's type, and the reader is built
//! for one end, so neither ever asks at run time which end it is. The settings split
//! the same way: [`SessionConfig`] for both, [`ClientSessionOptions`] and
//! [`ServerSessionOptions`] for one.

mod budget;
pub mod buffers;
mod heartbeat;
mod idle;
mod reader;
mod relay;
mod stream;
mod writer;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};

use crate::proto::frame::Command;
use crate::proto::{Frame, PaddingScheme, Settings};

pub use budget::{BufferBudget, DEFAULT_STREAM_BUFFER};
pub use relay::{RelayError, RelayStats, relay, relay_to_end};
use stream::OpenWait;
pub use stream::{OpenError, SendRoom, Stream, StreamReader, StreamWriter};

/// Frames waiting for the writer. Bounded, so a peer that does not read stops our
/// senders instead of growing memory: 16 frames of at most 64 KiB is 1 MiB per
/// session (64 measured 4.5 MiB per stalled session), and still four full writer
/// batches deep, so a fast stream never waits on it.
const DATA_QUEUE: usize = 16;
/// Reader-originated replies (heartbeats, settings answers). Never awaited by the
/// reader, so a peer that floods requests without reading cannot deadlock us; when
/// full, replies are dropped.
const CONTROL_QUEUE: usize = 64;

/// Settings key by which our client and server agree that FIN ends only the
/// sender's direction (half-close). Other implementations ignore the key and treat
/// FIN as the end of the whole stream, which is then what we do with them.
pub const HALF_CLOSE_KEY: &str = "half-close";

/// TLS records rustls may hold for a connection whose peer is not reading: one record.
/// The kernel's socket buffer keeps a fast connection full; what rustls buffers on top
/// is memory per stalled session (64 KiB by default), nothing more.
const TLS_BUFFER: usize = 16 * 1024 + 256;

/// Caps the TLS records a session's connection buffers in user space (see [`TLS_BUFFER`]).
pub fn limit_tls_buffer<Side>(connection: &mut rustls::ConnectionCommon<Side>) {
    connection.set_buffer_limit(Some(TLS_BUFFER));
}

/// A new stream accepted by a server session.
pub type StreamHandler = Arc<dyn Fn(Stream) + Send + Sync>;

/// Settings both ends use; what only one end uses is in [`ClientSessionOptions`] or
/// [`ServerSessionOptions`].
#[derive(Clone)]
pub struct SessionConfig {
    /// The padding scheme. A client pads with it, announces its md5 and stores a
    /// server's UpdatePaddingScheme in it for later sessions; a server hands it to any
    /// client that announced another.
    pub padding: Arc<ArcSwap<PaddingScheme>>,
    /// Data chunks queued per stream before the reader waits (backpressure).
    pub stream_queue: usize,
    /// Bytes of one stream's data held in each direction: received and not yet taken by
    /// its consumer, or given to the writer and not yet written out. Past it the stream's
    /// sender waits, so a relay stops reading its socket (see `budget.rs`).
    pub stream_buffer: usize,
    /// A relayed stream with no data either way for this long is ended (`None`: never).
    pub stream_idle_timeout: Option<Duration>,
    /// Once one direction of a relayed stream has ended, it is ended after this long
    /// with no data (`None`: only `stream_idle_timeout`).
    pub half_close_timeout: Option<Duration>,
    /// Bounds stream data received but not yet consumed (see `budget.rs`).
    pub buffers: BufferBudget,
}

impl Default for SessionConfig {
    fn default() -> SessionConfig {
        SessionConfig {
            padding: Arc::new(ArcSwap::from_pointee(PaddingScheme::default())),
            stream_queue: 8,
            stream_buffer: DEFAULT_STREAM_BUFFER,
            stream_idle_timeout: None,
            half_close_timeout: None,
            buffers: BufferBudget::default(),
        }
    }
}

/// What only a client session uses: how it introduces itself, waits for its streams to
/// open, and probes a silent server.
#[derive(Debug, Clone)]
pub struct ClientSessionOptions {
    /// The `client=` value of its Settings.
    pub client_name: String,
    /// How long a stream on a session of unknown version waits for the server's
    /// SYNACK before assuming a v1 server (which never sends one).
    pub v1_grace: Duration,
    /// How long to wait for a v2 server's SYNACK before giving up.
    pub open_timeout: Duration,
    /// A session with open streams that received nothing for this long sends a
    /// heartbeat (v2 servers only; `None`: never). See `heartbeat.rs`.
    pub heartbeat_interval: Option<Duration>,
    /// Nothing received this long after a heartbeat closes the session.
    pub heartbeat_timeout: Duration,
}

impl Default for ClientSessionOptions {
    fn default() -> ClientSessionOptions {
        ClientSessionOptions {
            client_name: format!("anytls-rs/{}", env!("CARGO_PKG_VERSION")),
            v1_grace: Duration::from_secs(2),
            open_timeout: Duration::from_secs(10),
            heartbeat_interval: None,
            heartbeat_timeout: Duration::from_secs(10),
        }
    }
}

/// What only a server session uses: the bounds it keeps on what a client may hold.
#[derive(Debug, Clone)]
pub struct ServerSessionOptions {
    /// Streams a session may have open at once; SYNs beyond it are refused. A stream
    /// counts from its SYN until its relay has ended, whatever frames arrive.
    pub max_streams: usize,
    /// A session with no open stream that received nothing for this long is closed
    /// (`None`: never). Clients send heartbeats only while streams are open, and close
    /// their own idle sessions long before this; what it reaps are sessions whose
    /// client vanished or keeps a connection open doing nothing.
    pub idle_session_timeout: Option<Duration>,
    /// Pads the server's own first writes by this scheme (`None`: not padded). Clients
    /// discard the Waste frames, so this needs nothing of them.
    pub downlink_padding: Option<Arc<PaddingScheme>>,
}

impl Default for ServerSessionOptions {
    fn default() -> ServerSessionOptions {
        ServerSessionOptions { max_streams: 1024, idle_session_timeout: None, downlink_padding: None }
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("session closed: {0}")]
pub struct SessionClosed(pub Arc<str>);

/// Why a client's session closed when its server closed the connection without sending
/// a frame: what AnyTLS servers do with a wrong password.
pub const SERVER_CLOSED_WITHOUT_ANSWER: &str =
    "the server closed without answering (wrong password, or not an AnyTLS server?)";

impl SessionClosed {
    /// The server closed without a word: most likely a wrong password.
    pub fn looks_like_wrong_password(&self) -> bool {
        // The reader puts what it saw first (`read failed: …; ` and this).
        self.0.ends_with(SERVER_CLOSED_WITHOUT_ANSWER)
    }
}

/// What the writer is asked to send.
#[derive(Debug)]
enum Outgoing {
    Frame(Frame),
    /// A stream's data, holding its share of the stream's send window until written out.
    Data(Frame, OwnedSemaphorePermit),
    /// Already-encoded frames that must go out in one write (the client's first
    /// Settings + SYN + destination).
    Raw(Bytes),
}

/// Events for one stream, in wire order.
#[derive(Debug)]
enum StreamEvent {
    /// Data, and its charge against the memory budget.
    Data(Bytes, budget::Charge),
    Fin,
    SynAck(Result<(), String>),
}

struct Shared {
    /// "Client" or "Server", for the log.
    end: &'static str,
    config: SessionConfig,
    data_tx: mpsc::Sender<Outgoing>,
    control_tx: mpsc::Sender<Outgoing>,
    /// Streams that can still receive: FIN or a close removes them.
    streams: Mutex<HashMap<u32, Inbox>>,
    /// Streams alive (see [`StreamSlot`]): the per-session cap counts these, not
    /// `streams`, so a FIN cannot free a place whose dial or relay is still going.
    live_streams: AtomicUsize,
    /// The peer's protocol version: 0 until known.
    peer_version: watch::Sender<u8>,
    /// Both ends announced one-way FIN (see [`HALF_CLOSE_KEY`]).
    half_close: AtomicBool,
    /// Whether the peer ever sent a frame (see `silent_peer`).
    peer_spoke: AtomicBool,
    /// What it most likely means when the peer closes without ever sending a frame: a
    /// client's server that said nothing most likely refused its password.
    silent_peer: Option<&'static str>,
    /// When the reader last received bytes (see `heartbeat.rs`).
    last_received: heartbeat::LastReceived,
    /// This session's share of the buffer budget.
    budget: budget::SessionBudget,
    closed: watch::Sender<Option<Arc<str>>>,
}

impl Shared {
    /// Closes the session for a reason of our own.
    fn close(&self, reason: &str) {
        self.close_with(reason.into());
    }

    /// Closes the session because the connection failed or the peer closed it; a peer
    /// that never said anything gets the likely cause added (see `silent_peer`).
    fn close_by_peer(&self, reason: &str) {
        match self.silent_peer {
            Some(likely_cause) if !self.peer_spoke.load(Ordering::Relaxed) => {
                self.close_with(format!("{reason}; {likely_cause}").into());
            }
            _ => self.close_with(reason.into()),
        }
    }

    fn close_with(&self, reason: Arc<str>) {
        self.closed.send_if_modified(|state| {
            if state.is_some() {
                return false;
            }
            log::debug!("{} session closing: {reason}", self.end);
            *state = Some(reason);
            true
        });
        // Dropping every stream's sender ends their reads with an error.
        self.streams.lock().expect("streams lock").clear();
    }

    fn close_reason(&self) -> Option<Arc<str>> {
        self.closed.borrow().clone()
    }

    fn closed_error(&self) -> SessionClosed {
        SessionClosed(self.close_reason().unwrap_or_else(|| "closed".into()))
    }

    fn send_control(&self, frame: Frame) {
        if self.control_tx.try_send(Outgoing::Frame(frame)).is_err() {
            log::debug!("control queue full or closed: reply dropped");
        }
    }

    fn remove_stream(&self, id: u32) {
        self.streams.lock().expect("streams lock").remove(&id);
    }

    /// Registers a new stream `id` able to receive, and the slot that counts it alive.
    fn new_stream(self: &Arc<Self>, id: u32) -> Stream {
        let (events_tx, events_rx) = mpsc::channel(self.config.stream_queue);
        let received = Arc::new(Semaphore::new(self.config.stream_buffer.max(1)));
        self.streams.lock().expect("streams lock").insert(id, Inbox { events: events_tx, received });
        self.live_streams.fetch_add(1, Ordering::AcqRel);
        let slot = Arc::new(StreamSlot(self.clone()));
        Stream::new(id, self.clone(), events_rx, slot)
    }
}

/// Where the reader delivers one stream's events, and the bound on its received bytes.
#[derive(Clone)]
struct Inbox {
    events: mpsc::Sender<StreamEvent>,
    received: Arc<Semaphore>,
}

/// Held by both halves of a stream: the stream counts as alive until both are gone,
/// that is until its relay (and any dial before it) has ended.
struct StreamSlot(Arc<Shared>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.live_streams.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A handle to a running session; clones share it. When the last handle is
/// dropped the session closes (its tasks would otherwise keep it open unseen).
///
/// `End` says which end of the connection we are, [`Client`] or [`Server`]: what only
/// one end may do is a method of that end's session alone, so there is nothing to check
/// at run time. Callers name the two as [`ClientSession`] and [`ServerSession`].
#[derive(Clone)]
pub struct Session<End> {
    shared: Arc<Shared>,
    _last_handle: Arc<CloseOnDrop>,
    end: End,
}

/// A session we opened to a server: it opens streams.
pub type ClientSession = Session<Client>;

/// A session a client opened to us: its streams arrive at the handler it was started
/// with. It cannot open one; there is no such method:
///
/// ```compile_fail,E0599
/// async fn open(session: &anytls_rs::session::ServerSession) {
///     let _ = session.open_stream(bytes::Bytes::new()).await;
/// }
/// ```
///
/// The same call on a client session compiles, so what fails above is only the missing
/// method (E0599: no method named `open_stream` found for `Session<Server>`):
///
/// ```no_run
/// async fn open(session: &anytls_rs::session::ClientSession) {
///     let _ = session.open_stream(bytes::Bytes::new()).await;
/// }
/// ```
pub type ServerSession = Session<Server>;

/// The client end of a session, and what only it keeps; clones share it.
#[derive(Clone)]
pub struct Client(Arc<ClientEnd>);

struct ClientEnd {
    options: ClientSessionOptions,
    next_stream_id: AtomicU32,
    settings_sent: AtomicBool,
    /// Held from choosing a stream id until its SYN is queued, so concurrent opens on
    /// a new session can't queue a SYN ahead of the Settings frame (the server would
    /// answer with an Alert and close), and SYNs go out in id order.
    open_order: tokio::sync::Mutex<()>,
    /// Set while the session sits in the client's pool, so it is never pooled twice.
    pooled: AtomicBool,
}

/// The server end of a session. It keeps nothing of its own: its stream handler and
/// stream limit live with its reader.
#[derive(Clone, Copy)]
pub struct Server(());

struct CloseOnDrop(Arc<Shared>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close("session no longer used");
    }
}

impl Session<Client> {
    /// Starts a client session on an authenticated connection (the authentication
    /// block has already been written). Stream ids start at 1.
    pub fn start<IO>(io: IO, config: SessionConfig, options: ClientSessionOptions) -> ClientSession
    where
        IO: AsyncRead + AsyncWrite + Send + 'static,
    {
        // A client pads with the scheme current when the session starts.
        let padding = Some(writer::WritePadding { scheme: config.padding.load_full(), first_write: 1 });
        let heartbeat = options.heartbeat_interval.map(|interval| (interval, options.heartbeat_timeout));
        let end = Client(Arc::new(ClientEnd {
            options,
            next_stream_id: AtomicU32::new(1),
            settings_sent: AtomicBool::new(false),
            open_order: tokio::sync::Mutex::new(()),
            pooled: AtomicBool::new(false),
        }));
        let session = Session::launch(io, end, config, BytesMut::new(), reader::FromServer, padding);
        if let Some((interval, timeout)) = heartbeat {
            tokio::spawn(heartbeat::run(Arc::downgrade(&session.shared), interval, timeout));
        }
        session
    }

    /// Opens a stream to `destination` (SOCKS address form, plus any request bytes that
    /// must not wait for SYNACK, e.g. a UDP-over-TCP request). The SYN and this first
    /// data go out in one write; on a new session the Settings frame leads them. Call
    /// [`Stream::wait_open`] for the server's answer.
    pub async fn open_stream(&self, first_data: Bytes) -> Result<Stream, SessionClosed> {
        if self.is_closed() {
            return Err(self.shared.closed_error());
        }
        let client = &self.end.0;
        let _in_order = client.open_order.lock().await;
        let id = client.next_stream_id.fetch_add(1, Ordering::Relaxed);
        let wait = OpenWait { v1_grace: client.options.v1_grace, timeout: client.options.open_timeout };
        let stream = self.shared.new_stream(id).opened_by_us(wait);

        let mut raw = BytesMut::with_capacity(64 + first_data.len());
        if !client.settings_sent.swap(true, Ordering::AcqRel) {
            let scheme = self.shared.config.padding.load();
            let settings = Settings::new()
                .with("v", "2")
                .with("client", &client.options.client_name)
                .with("padding-md5", scheme.md5_hex())
                .with(HALF_CLOSE_KEY, "1");
            Frame::new(Command::Settings, 0, settings.encode()).encode(&mut raw).expect("small frame");
        }
        Frame::control(Command::Syn, id).encode(&mut raw).expect("empty frame");
        let mut first_data = first_data;
        while !first_data.is_empty() {
            let chunk = first_data.split_to(first_data.len().min(crate::proto::MAX_FRAME_DATA));
            Frame::new(Command::Push, id, chunk).encode(&mut raw).expect("bounded chunk");
        }
        if self.shared.data_tx.send(Outgoing::Raw(raw.freeze())).await.is_err() {
            return Err(self.shared.closed_error());
        }
        Ok(stream)
    }

    /// The pool-membership flag, owned by whichever pool holds the session.
    pub fn pooled(&self) -> &AtomicBool {
        &self.end.0.pooled
    }
}

impl Session<Server> {
    /// Starts a server session; `leftover` holds bytes that arrived after the
    /// authentication block. Each accepted stream is passed to `handler`.
    pub fn start<IO>(
        io: IO,
        config: SessionConfig,
        options: ServerSessionOptions,
        leftover: BytesMut,
        handler: StreamHandler,
    ) -> ServerSession
    where
        IO: AsyncRead + AsyncWrite + Send + 'static,
    {
        let from_client = reader::FromClient { handler, max_streams: options.max_streams };
        let padding = options.downlink_padding.map(|scheme| writer::WritePadding { scheme, first_write: 0 });
        let session = Session::launch(io, Server(()), config, leftover, from_client, padding);
        if let Some(timeout) = options.idle_session_timeout {
            tokio::spawn(heartbeat::reap_when_idle(Arc::downgrade(&session.shared), timeout));
        }
        session
    }
}

impl<End> Session<End> {
    /// Runs the reader and the writer over `io`: `peer` handles the frames only this
    /// end receives, and the writer pads with `padding`, if any.
    fn launch<IO, Peer>(
        io: IO,
        end: End,
        config: SessionConfig,
        leftover: BytesMut,
        peer: Peer,
        padding: Option<writer::WritePadding>,
    ) -> Session<End>
    where
        IO: AsyncRead + AsyncWrite + Send + 'static,
        Peer: reader::PeerFrames,
    {
        let (data_tx, data_rx) = mpsc::channel(DATA_QUEUE);
        let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
        let budget = config.buffers.for_session(config.stream_buffer);
        let shared = Arc::new(Shared {
            end: Peer::END,
            config,
            data_tx,
            control_tx,
            streams: Mutex::new(HashMap::new()),
            live_streams: AtomicUsize::new(0),
            peer_version: watch::Sender::new(0),
            half_close: AtomicBool::new(false),
            peer_spoke: AtomicBool::new(false),
            silent_peer: Peer::SILENT_PEER,
            last_received: heartbeat::LastReceived::default(),
            budget,
            closed: watch::Sender::new(None),
        });
        let (read_half, write_half) = tokio::io::split(io);
        tokio::spawn(writer::run(write_half, control_rx, data_rx, padding, shared.clone()));
        tokio::spawn(reader::run(read_half, leftover, peer, shared.clone()));
        Session { _last_handle: Arc::new(CloseOnDrop(shared.clone())), shared, end }
    }

    pub fn is_closed(&self) -> bool {
        self.shared.close_reason().is_some()
    }

    /// Resolves when the session has closed, with the reason.
    pub async fn closed(&self) -> Arc<str> {
        let mut rx = self.shared.closed.subscribe();
        match rx.wait_for(|state| state.is_some()).await {
            Ok(state) => state.clone().expect("checked"),
            Err(_) => "closed".into(),
        }
    }

    pub fn close(&self, reason: &str) {
        self.shared.close(reason);
    }

    /// Streams alive on this session: from their SYN until their relay has ended.
    pub fn open_streams(&self) -> usize {
        self.shared.live_streams.load(Ordering::Acquire)
    }

    /// Whether FIN ends only one direction on this session (both ends are ours).
    pub fn half_close(&self) -> bool {
        self.shared.half_close.load(Ordering::Acquire)
    }

    /// The peer's protocol version, 0 while unknown.
    pub fn peer_version(&self) -> u8 {
        *self.shared.peer_version.borrow()
    }

    /// Whether two handles are the same session.
    pub fn same_as(&self, other: &Session<End>) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    /// Sends a heartbeat request (v2 peers answer it).
    pub fn send_heartbeat(&self) {
        self.shared.send_control(Frame::control(Command::HeartRequest, 0));
    }
}

#[cfg(test)]
mod tests;
