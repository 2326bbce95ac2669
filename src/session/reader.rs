//! The reader task: decodes frames and dispatches them.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, ReadHalf};
use tokio::sync::mpsc;

use super::{HALF_CLOSE_KEY, Inbox, Shared, StreamEvent, StreamHandler};
use crate::framed::{Framed, ReadError, ReadInto};
use crate::proto::frame::Command;
use crate::proto::{Frame, FrameDecoder, PaddingScheme, Settings};

/// Bytes requested per read: one TLS record's worth. A session whose stream is behind
/// holds its read buffer until the stream catches up, so this is memory per stalled
/// session: 64 KiB reads held a thousand stalled uploads at +141 MiB, 16 KiB at +87 MiB
/// (docs/hardening.md), for about 5% more CPU per byte in bulk.
const READ_CHUNK: usize = 16 * 1024 + 512;
/// Payloads smaller than this are copied out of the read buffer, so a stalled
/// stream holding a few small chunks does not pin whole read buffers.
const COPY_BELOW: usize = 4096;
/// Small pushes are joined up to this size (one frame's worth).
const JOIN_LIMIT: usize = crate::proto::MAX_FRAME_DATA;

/// Most a peer may have buffered without completing a frame: one whole frame (the
/// decoder never waits for more than that, so this is only a guard).
const MAX_BUFFERED: usize = crate::proto::HEADER_LEN + crate::proto::MAX_FRAME_DATA;

pub(super) async fn run<IO: AsyncRead + Send>(
    io: ReadHalf<IO>,
    buf: BytesMut,
    handler: impl PeerFrames,
    shared: Arc<Shared>,
) {
    let mut frames = Framed::with_buffer(FrameDecoder::new(), buf, MAX_BUFFERED).read_room(READ_CHUNK);
    let mut io = HeardFrom { io, shared: &shared };
    let mut closed = shared.closed.subscribe();
    let mut small = SmallPushes::default();
    let reason = loop {
        // Everything read so far is handled: hand on what was joined before waiting.
        if frames.is_drained() {
            if let Err(reason) = small.flush(&shared).await {
                break reason;
            }
            if let Some(reason) = shared.close_reason() {
                break PeerEnded::Closing(reason);
            }
        }
        // A frame already buffered is taken without a select: that is most frames in bulk.
        let next = match frames.buffered_item() {
            Ok(Some(frame)) => Ok(Some(frame)),
            Ok(None) => tokio::select! {
                biased;
                next = frames.next(&mut io) => next,
                _ = closed.wait_for(|state| state.is_some()) => continue,
            },
            Err(never) => match never {},
        };
        let frame = match next {
            Ok(Some(frame)) => frame,
            Ok(None) => break PeerEnded::Closed,
            Err(ReadError::Truncated { buffered }) => break PeerEnded::InsideFrame(buffered),
            Err(ReadError::Read(err)) => break PeerEnded::Read(err),
            Err(err) => break PeerEnded::Framing(err.to_string()),
        };
        shared.peer_spoke.store(true, Ordering::Relaxed);
        // Small pushes to one stream in a row are joined into one chunk: a peer
        // sending one-byte frames then costs one queue entry and one write to the
        // destination per read, not per frame.
        let is_small_push = frame.command == Command::Push && frame.data.len() < COPY_BELOW;
        if is_small_push && small.join(&frame) {
            continue;
        }
        if let Err(reason) = small.flush(&shared).await {
            break reason;
        }
        let handled = if is_small_push {
            small.start(&frame);
            Ok(())
        } else {
            dispatch(frame, &shared, &handler).await
        };
        if let Err(reason) = handled {
            break reason;
        }
    };
    shared.close_by_peer(&reason.to_string());
}

/// Why the reader stopped: the peer went, broke the protocol, or told us why; the text
/// becomes the session's close reason.
#[derive(Debug, thiserror::Error)]
pub(super) enum PeerEnded {
    #[error("peer closed the connection")]
    Closed,
    #[error("peer closed the connection inside a frame ({0} bytes left)")]
    InsideFrame(usize),
    #[error("read failed: {0}")]
    Read(std::io::Error),
    #[error("{0}")]
    Framing(String),
    #[error("SYN before Settings")]
    SynBeforeSettings,
    /// The server's Alert text, from the wire.
    #[error("server alert: {0}")]
    Alert(String),
    /// The session was closed on our side meanwhile.
    #[error("{0}")]
    Closing(Arc<str>),
}

/// The connection, marking the session as heard from on every read that brought bytes
/// (heartbeats count reads, not frames).
struct HeardFrom<'a, IO> {
    io: ReadHalf<IO>,
    shared: &'a Shared,
}

impl<IO: AsyncRead + Send> ReadInto for HeardFrom<'_, IO> {
    type Error = std::io::Error;

    async fn read_into(&mut self, buf: &mut BytesMut) -> std::io::Result<usize> {
        let read = self.io.read_buf(buf).await?;
        if read > 0 {
            self.shared.last_received.touch();
        }
        Ok(read)
    }
}

/// Small pushes to one stream in a row, copied together until another frame comes or
/// the bytes read so far are all decoded.
#[derive(Default)]
struct SmallPushes {
    joined: Option<(u32, BytesMut)>,
}

impl SmallPushes {
    /// Adds a small push to the chunk being joined, if it is for the same stream and fits.
    fn join(&mut self, frame: &Frame) -> bool {
        match &mut self.joined {
            Some((sid, data)) if *sid == frame.stream_id && data.len() + frame.data.len() <= JOIN_LIMIT => {
                data.extend_from_slice(&frame.data);
                true
            }
            _ => false,
        }
    }

    fn start(&mut self, frame: &Frame) {
        let mut data = BytesMut::with_capacity(frame.data.len().max(256));
        data.extend_from_slice(&frame.data);
        self.joined = Some((frame.stream_id, data));
    }

    /// Queues the joined chunk, if any, for its stream.
    async fn flush(&mut self, shared: &Arc<Shared>) -> Result<(), PeerEnded> {
        match self.joined.take() {
            Some((sid, data)) => push(sid, data.freeze(), shared).await,
            None => Ok(()),
        }
    }
}

/// Handles one frame. An `Err` closes the session with that reason.
async fn dispatch(frame: Frame, shared: &Arc<Shared>, handler: &impl PeerFrames) -> Result<(), PeerEnded> {
    let sid = frame.stream_id;
    match frame.command {
        Command::Push => push(sid, detach(frame.data), shared).await?,
        Command::Fin => {
            let inbox = shared.streams.lock().expect("streams lock").remove(&sid);
            if let Some(inbox) = inbox {
                deliver(shared, sid, &inbox.events, StreamEvent::Fin).await;
            }
        }
        Command::Waste | Command::HeartResponse => {}
        Command::HeartRequest => shared.send_control(Frame::control(Command::HeartResponse, sid)),
        Command::Unknown(byte) => log::debug!("skipping unknown command {byte} ({} bytes)", frame.data.len()),
        _ => handler.handle(frame, shared).await?,
    }
    Ok(())
}

/// Queues stream data, charged to the stream's bound and the session's budget; over
/// either, this session stops reading until the stream's consumer catches up. Data for
/// an unknown (or already finished) stream is dropped.
async fn push(sid: u32, data: Bytes, shared: &Arc<Shared>) -> Result<(), PeerEnded> {
    let inbox = shared.streams.lock().expect("streams lock").get(&sid).cloned();
    let Some(inbox) = inbox else { return Ok(()) };
    let (data, charge) = match shared.budget.try_charge(data.len(), &inbox.received) {
        Some(charge) => (data, charge),
        None => {
            // The stream is behind: this chunk may wait long, so it must not pin the
            // read buffer it was cut from (a whole allocation per stalled stream).
            let data = if data.is_unique() { data } else { Bytes::copy_from_slice(&data) };
            match until_closed(shared, shared.budget.charge(data.len(), &inbox.received)).await {
                Some(charge) => (data, charge),
                None => return Ok(()),
            }
        }
    };
    deliver(shared, sid, &inbox.events, StreamEvent::Data(data, charge)).await;
    Ok(())
}

/// Waits for room in the stream's queue (backpressure); a stream whose reader is
/// gone is forgotten. A close ends the wait: a stream that stopped reading must not
/// keep a closed session's reader (and its connection) alive.
async fn deliver(shared: &Shared, sid: u32, sender: &mpsc::Sender<StreamEvent>, event: StreamEvent) {
    let event = match sender.try_send(event) {
        Ok(()) => return,
        Err(mpsc::error::TrySendError::Closed(_)) => return shared.remove_stream(sid),
        Err(mpsc::error::TrySendError::Full(event)) => event,
    };
    if let Some(Err(_)) = until_closed(shared, sender.send(event)).await {
        shared.remove_stream(sid);
    }
}

/// Runs `wait` unless the session closes first (`None`).
async fn until_closed<T>(shared: &Shared, wait: impl Future<Output = T>) -> Option<T> {
    let mut closed = shared.closed.subscribe();
    tokio::select! {
        done = wait => Some(done),
        _ = closed.wait_for(|state| state.is_some()) => None,
    }
}

fn detach(data: Bytes) -> Bytes {
    if data.len() < COPY_BELOW { Bytes::copy_from_slice(&data) } else { data }
}

/// What only one end receives, and how it handles it: a reader is built for one end
/// ([`FromServer`] for a client, [`FromClient`] for a server), so it never asks which.
pub(super) trait PeerFrames: Send + Sync + 'static {
    /// Which end reads these frames, for the log.
    const END: &'static str;
    /// What a peer that closes without ever sending a frame most likely means.
    const SILENT_PEER: Option<&'static str>;

    /// Handles a frame the common dispatch does not. An `Err` closes the session.
    fn handle(&self, frame: Frame, shared: &Arc<Shared>) -> impl Future<Output = Result<(), PeerEnded>> + Send;
}

/// A client's reader: frames from a server.
pub(super) struct FromServer;

impl PeerFrames for FromServer {
    const END: &'static str = "Client";
    const SILENT_PEER: Option<&'static str> = Some(super::SERVER_CLOSED_WITHOUT_ANSWER);

    async fn handle(&self, frame: Frame, shared: &Arc<Shared>) -> Result<(), PeerEnded> {
        on_client_frame(frame, shared).await
    }
}

/// A server's reader: frames from a client, where its streams go, and how many it may
/// have open at once.
pub(super) struct FromClient {
    pub(super) handler: StreamHandler,
    pub(super) max_streams: usize,
}

impl PeerFrames for FromClient {
    const END: &'static str = "Server";
    const SILENT_PEER: Option<&'static str> = None;

    async fn handle(&self, frame: Frame, shared: &Arc<Shared>) -> Result<(), PeerEnded> {
        on_server_frame(frame, shared, self)
    }
}

fn on_server_frame(frame: Frame, shared: &Arc<Shared>, client: &FromClient) -> Result<(), PeerEnded> {
    match frame.command {
        Command::Settings => {
            let settings = Settings::parse(&frame.data);
            let version = settings.version();
            shared.peer_version.send_replace(version);
            let scheme = shared.config.padding.load();
            if settings.get("padding-md5") != Some(scheme.md5_hex()) {
                let update = Frame::new(Command::UpdatePaddingScheme, 0, Bytes::copy_from_slice(scheme.raw()));
                shared.send_control(update);
            }
            if version >= 2 {
                let mut reply = Settings::new().with("v", "2");
                if settings.get(HALF_CLOSE_KEY) == Some("1") {
                    shared.half_close.store(true, Ordering::Release);
                    reply = reply.with(HALF_CLOSE_KEY, "1");
                }
                shared.send_control(Frame::new(Command::ServerSettings, 0, reply.encode()));
            }
            log::debug!("client settings: {}", String::from_utf8_lossy(&frame.data));
        }
        Command::Syn => {
            if *shared.peer_version.borrow() == 0 {
                shared.send_control(Frame::new(Command::Alert, 0, &b"client did not send its settings"[..]));
                return Err(PeerEnded::SynBeforeSettings);
            }
            let sid = frame.stream_id;
            if sid == 0 {
                // Id 0 is the session's own (Settings, heartbeats): never a stream.
                refuse_stream(shared, sid, "stream id 0 is reserved");
                return Ok(());
            }
            if shared.streams.lock().expect("streams lock").contains_key(&sid) {
                return Ok(()); // a SYN for an open stream is ignored
            }
            // Counted alive, not by inbox: a FIN'd stream still dialing or relaying holds
            // its place (only this reader adds streams, so the check cannot race).
            if shared.live_streams.load(Ordering::Acquire) >= client.max_streams {
                log::warn!(
                    "stream {sid} refused: session already has {} streams (--max-streams-per-session)",
                    client.max_streams
                );
                refuse_stream(shared, sid, "too many streams on this session");
                return Ok(());
            }
            (client.handler)(shared.new_stream(sid));
        }
        _ => log::debug!("ignoring {:?} from a client", frame.command),
    }
    Ok(())
}

fn refuse_stream(shared: &Shared, sid: u32, why: &str) {
    if *shared.peer_version.borrow() >= 2 {
        shared.send_control(Frame::new(Command::SynAck, sid, why.as_bytes().to_vec()));
    } else {
        shared.send_control(Frame::control(Command::Fin, sid));
    }
}

async fn on_client_frame(frame: Frame, shared: &Arc<Shared>) -> Result<(), PeerEnded> {
    match frame.command {
        Command::SynAck => {
            let inbox = shared.streams.lock().expect("streams lock").get(&frame.stream_id).cloned();
            if let Some(Inbox { events: sender, .. }) = inbox {
                let result = if frame.data.is_empty() {
                    Ok(())
                } else {
                    // An error SYNACK ends the stream on the server's side.
                    shared.remove_stream(frame.stream_id);
                    Err(String::from_utf8_lossy(&frame.data).into_owned())
                };
                deliver(shared, frame.stream_id, &sender, StreamEvent::SynAck(result)).await;
            }
        }
        Command::ServerSettings => {
            let settings = Settings::parse(&frame.data);
            // Before the version: streams waiting on it read the flag next.
            shared.half_close.store(settings.get(HALF_CLOSE_KEY) == Some("1"), Ordering::Release);
            shared.peer_version.send_replace(settings.version().max(1));
        }
        Command::UpdatePaddingScheme => match PaddingScheme::parse(&frame.data) {
            Ok(scheme) => {
                log::info!("server updated the padding scheme (md5 {})", scheme.md5_hex());
                shared.config.padding.store(Arc::new(scheme));
            }
            Err(err) => log::warn!("server sent an unusable padding scheme: {err}"),
        },
        Command::Alert => {
            let text = String::from_utf8_lossy(&frame.data).into_owned();
            log::warn!("server alert: {text}");
            return Err(PeerEnded::Alert(text));
        }
        _ => log::debug!("ignoring {:?} from a server", frame.command),
    }
    Ok(())
}
