//! One stream of a session: a two-way byte channel with one-way FIN.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{Semaphore, mpsc};

use super::{Outgoing, SessionClosed, Shared, StreamEvent, StreamSlot};
use crate::proto::frame::Command;
use crate::proto::{Frame, MAX_FRAME_DATA};

/// Why a client's stream did not open.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum OpenError {
    /// The server answered the SYN with an error (its text, e.g. a dial failure).
    #[error("server refused the stream: {0}")]
    Refused(String),
    #[error("server did not answer the stream in time")]
    Timeout,
    #[error(transparent)]
    Session(#[from] SessionClosed),
}

/// How a stream we opened waits for the server's answer (see [`Stream::wait_open`]).
#[derive(Debug, Clone, Copy)]
pub(super) struct OpenWait {
    /// While the session's version is unknown: how long until we assume a v1 server.
    pub(super) v1_grace: Duration,
    /// How long a v2 server has to answer.
    pub(super) timeout: Duration,
}

/// A stream; split it to read and write from two tasks.
pub struct Stream {
    reader: StreamReader,
    writer: StreamWriter,
    /// Set on a stream we opened; one the peer opened has no answer to wait for.
    open_wait: Option<OpenWait>,
}

impl Stream {
    pub(super) fn new(
        id: u32,
        shared: Arc<Shared>,
        events: mpsc::Receiver<StreamEvent>,
        slot: Arc<StreamSlot>,
    ) -> Stream {
        let window = Arc::new(Semaphore::new(shared.config.stream_buffer.max(1)));
        Stream {
            reader: StreamReader {
                id,
                shared: shared.clone(),
                events,
                pending: None,
                consumed: None,
                fin_received: false,
                _slot: slot.clone(),
            },
            writer: StreamWriter { id, shared, fin_sent: false, window, _slot: slot },
            open_wait: None,
        }
    }

    /// Marks this as a stream we opened, whose answer [`Stream::wait_open`] waits for.
    pub(super) fn opened_by_us(mut self, wait: OpenWait) -> Stream {
        self.open_wait = Some(wait);
        self
    }

    pub fn id(&self) -> u32 {
        self.writer.id
    }

    /// Whether FIN ends only one direction (both ends are ours); otherwise FIN
    /// either way ends the whole stream, as in the reference.
    pub fn half_close(&self) -> bool {
        self.writer.shared.half_close.load(std::sync::atomic::Ordering::Acquire)
    }

    /// How long the relay lets this stream sit without data (the session's setting).
    pub fn idle_timeout(&self) -> Option<std::time::Duration> {
        self.writer.shared.config.stream_idle_timeout
    }

    /// The same, once one direction has ended.
    pub fn half_close_timeout(&self) -> Option<std::time::Duration> {
        self.writer.shared.config.half_close_timeout
    }

    /// Resolves once the stream's session has closed, so a relay blocked on its TCP
    /// side (a target that neither reads nor writes) still ends with the session.
    pub fn session_closed(&self) -> impl Future<Output = SessionClosed> + Send + 'static {
        let shared = self.writer.shared.clone();
        let mut closed = shared.closed.subscribe();
        async move {
            let _ = closed.wait_for(|state| state.is_some()).await;
            shared.closed_error()
        }
    }

    pub fn split(self) -> (StreamReader, StreamWriter) {
        (self.reader, self.writer)
    }

    pub async fn read(&mut self) -> Result<Option<Bytes>, SessionClosed> {
        self.reader.read().await
    }

    pub async fn write(&mut self, data: Bytes) -> Result<(), SessionClosed> {
        self.writer.write(data).await
    }

    pub async fn finish(&mut self) -> Result<(), SessionClosed> {
        self.writer.finish().await
    }

    /// Waits for the server's answer to the SYN of a stream we opened; a stream the
    /// peer opened is open already.
    ///
    /// A v2 server answers with SYNACK. A v1 server never does: while the session's
    /// version is unknown, data or FIN from the server also counts as "open", and
    /// after the configured grace period we assume v1 and go ahead.
    pub async fn wait_open(&mut self) -> Result<(), OpenError> {
        let Some(wait) = self.open_wait else { return Ok(()) };
        let shared = self.writer.shared.clone();
        let mut version = shared.peer_version.subscribe();
        let grace = tokio::time::sleep(wait.v1_grace);
        let deadline = tokio::time::sleep(wait.timeout);
        tokio::pin!(grace, deadline);
        loop {
            let peer_version = *version.borrow_and_update();
            if peer_version == 1 {
                return Ok(()); // v1 servers send no SYNACK
            }
            let event = tokio::select! {
                event = self.reader.events.recv() => event,
                changed = version.changed(), if peer_version == 0 => {
                    if changed.is_err() { return Err(shared.closed_error().into()) }
                    continue;
                }
                _ = &mut grace, if peer_version == 0 => {
                    // No ServerSettings in time: a v1 server. Later streams skip the wait.
                    shared.peer_version.send_if_modified(|v| {
                        let unknown = *v == 0;
                        if unknown {
                            *v = 1;
                        }
                        unknown
                    });
                    continue;
                }
                _ = &mut deadline => return Err(OpenError::Timeout),
            };
            match event {
                Some(StreamEvent::SynAck(Ok(()))) => return Ok(()),
                Some(StreamEvent::SynAck(Err(text))) => {
                    // The server closed the stream with its refusal; nothing to FIN.
                    self.writer.fin_sent = true;
                    return Err(OpenError::Refused(text));
                }
                Some(StreamEvent::Data(data, charge)) => {
                    self.reader.pending = Some(data);
                    self.reader.consumed = Some(charge);
                    return Ok(());
                }
                Some(StreamEvent::Fin) => {
                    self.reader.fin_received = true;
                    return Ok(());
                }
                None => return Err(shared.closed_error().into()),
            }
        }
    }

    /// Server: answers the SYN (see [`StreamWriter::send_synack`]).
    pub async fn send_synack(&mut self, result: Result<(), String>) -> Result<(), SessionClosed> {
        self.writer.send_synack(result).await
    }
}

/// The receiving half. Dropping it stops delivery for this stream.
pub struct StreamReader {
    id: u32,
    shared: Arc<Shared>,
    events: mpsc::Receiver<StreamEvent>,
    pending: Option<Bytes>,
    /// The budget charge of the chunk last handed out: returned when the consumer
    /// asks for the next one, so a chunk still being written out counts too.
    consumed: Option<super::budget::Charge>,
    fin_received: bool,
    _slot: Arc<StreamSlot>,
}

impl StreamReader {
    /// The next data chunk; `Ok(None)` once the peer sent FIN.
    pub async fn read(&mut self) -> Result<Option<Bytes>, SessionClosed> {
        if let Some(data) = self.pending.take() {
            return Ok(Some(data));
        }
        self.consumed = None;
        if self.fin_received {
            return Ok(None);
        }
        loop {
            match self.events.recv().await {
                Some(StreamEvent::Data(data, charge)) => {
                    self.consumed = Some(charge);
                    return Ok(Some(data));
                }
                Some(StreamEvent::Fin) => {
                    self.fin_received = true;
                    return Ok(None);
                }
                // A late or duplicate SYNACK: the stream is already open.
                Some(StreamEvent::SynAck(_)) => continue,
                None => return Err(self.shared.closed_error()),
            }
        }
    }
}

impl Drop for StreamReader {
    fn drop(&mut self) {
        self.shared.remove_stream(self.id);
    }
}

/// Room held in a stream's send window ([`StreamWriter::reserve`]).
pub struct SendRoom(tokio::sync::OwnedSemaphorePermit);

impl SendRoom {
    /// Bytes of room held.
    pub fn len(&self) -> usize {
        self.0.num_permits()
    }

    pub fn is_empty(&self) -> bool {
        self.0.num_permits() == 0
    }
}

/// The sending half. Dropping it without [`StreamWriter::finish`] still sends FIN.
pub struct StreamWriter {
    id: u32,
    shared: Arc<Shared>,
    fin_sent: bool,
    /// Bytes this stream may have queued for the session's writer and not yet written
    /// out (`SessionConfig::stream_buffer`): the sender waits past it, so a relay stops
    /// reading its socket when the session cannot send.
    window: Arc<Semaphore>,
    _slot: Arc<StreamSlot>,
}

impl StreamWriter {
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Sends data, split into frames of at most 65,535 bytes (no copy), each waiting
    /// for room in the stream's send window.
    pub async fn write(&mut self, mut data: Bytes) -> Result<(), SessionClosed> {
        while !data.is_empty() {
            let chunk = data.split_to(data.len().min(MAX_FRAME_DATA));
            let room = self.reserve(chunk.len()).await;
            self.write_reserved(chunk, room).await?;
        }
        Ok(())
    }

    /// Waits until the stream's send window has room for `max` bytes (at most one frame;
    /// a window smaller than that is taken whole) and holds it. A relay reserves before it
    /// reads its socket, so it never holds a chunk it cannot queue.
    pub async fn reserve(&self, max: usize) -> SendRoom {
        let bound = self.shared.config.stream_buffer.clamp(1, u32::MAX as usize);
        let wanted = max.clamp(1, MAX_FRAME_DATA).min(bound) as u32;
        SendRoom(self.window.clone().acquire_many_owned(wanted).await.expect("the window is never closed"))
    }

    /// Sends `data` (at most one frame) in room reserved for it; room it does not use is
    /// given back at once.
    pub async fn write_reserved(&mut self, data: Bytes, mut room: SendRoom) -> Result<(), SessionClosed> {
        debug_assert!(data.len() <= MAX_FRAME_DATA);
        let used = (data.len().max(1) as u32).min(room.0.num_permits() as u32);
        if let Some(unused) = room.0.split(room.0.num_permits() - used as usize) {
            drop(unused);
        }
        if data.is_empty() {
            return Ok(());
        }
        let frame = Frame::new(Command::Push, self.id, data);
        if self.shared.data_tx.send(Outgoing::Data(frame, room.0)).await.is_err() {
            return Err(self.shared.closed_error());
        }
        Ok(())
    }

    /// Server: answers the SYN (v2 peers only; a v1 client is not sent SYNACK).
    /// On failure the stream is closed with the error text and nothing else is sent.
    pub async fn send_synack(&mut self, result: Result<(), String>) -> Result<(), SessionClosed> {
        let shared = &self.shared;
        let failed = result.is_err();
        if *shared.peer_version.borrow() >= 2 {
            let data = result.err().unwrap_or_default();
            let mut data = Bytes::from(data.into_bytes());
            data.truncate(MAX_FRAME_DATA);
            let frame = Frame::new(Command::SynAck, self.id, data);
            shared.data_tx.send(Outgoing::Frame(frame)).await.map_err(|_| shared.closed_error())?;
            if failed {
                // The error SYNACK closes the stream for the client: no FIN follows.
                self.fin_sent = true;
            }
        }
        Ok(())
    }

    /// The peer ended the whole stream: no FIN is owed (docs/protocol.md §2: FIN is never
    /// answered with FIN).
    pub fn forget_fin(&mut self) {
        self.fin_sent = true;
    }

    /// Sends FIN once: we have nothing more to send. The peer may still send to us.
    pub async fn finish(&mut self) -> Result<(), SessionClosed> {
        if self.fin_sent {
            return Ok(());
        }
        self.fin_sent = true;
        let frame = Frame::control(Command::Fin, self.id);
        self.shared.data_tx.send(Outgoing::Frame(frame)).await.map_err(|_| self.shared.closed_error())
    }
}

impl Drop for StreamWriter {
    fn drop(&mut self) {
        if self.fin_sent || self.shared.close_reason().is_some() {
            return;
        }
        // Keep FIN behind this stream's queued data when there is room; otherwise
        // the control queue still gets it out.
        let fin = || Outgoing::Frame(Frame::control(Command::Fin, self.id));
        if self.shared.data_tx.try_send(fin()).is_err() {
            let _ = self.shared.control_tx.try_send(fin());
        }
    }
}

/// A stream's data as a source for [`crate::framed::Framed`]: chunks copied into its
/// buffer (they arrive as separate `Bytes`).
macro_rules! stream_source {
    ($stream:ty) => {
        impl crate::framed::ReadInto for $stream {
            type Error = SessionClosed;

            async fn read_into(&mut self, buf: &mut bytes::BytesMut) -> Result<usize, SessionClosed> {
                loop {
                    match self.read().await? {
                        // An empty PUSH is data, not the end: only FIN ends a stream.
                        Some(chunk) if chunk.is_empty() => continue,
                        Some(chunk) => {
                            buf.extend_from_slice(&chunk);
                            return Ok(chunk.len());
                        }
                        None => return Ok(0),
                    }
                }
            }
        }
    };
}

stream_source!(Stream);
stream_source!(StreamReader);
