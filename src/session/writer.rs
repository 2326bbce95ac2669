//! The writer task: batches queued frames into large writes.
//!
//! Headers and small frames are copied into a batch buffer; large payloads are not:
//! they go into the same vectored write as their own slices, and TLS copies each byte
//! once, as it encrypts. So many small frames become one write and full 16 KiB TLS
//! records, without a second copy of bulk data. A client pads its first `stop` writes
//! as the padding scheme plans, and so does a server given a downlink scheme: each
//! piece is its own write, which TLS turns into its own record.

use std::io::IoSlice;
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::io::{AsyncWrite, AsyncWriteExt, WriteHalf};
use tokio::sync::{OwnedSemaphorePermit, mpsc};

use super::{Outgoing, Shared};
use crate::proto::frame::{Command, HEADER_LEN, encode_header};
use crate::proto::padding::Piece;
use crate::proto::{Frame, PaddingScheme};

/// Stop adding queued frames to a batch past this size: large enough for few
/// syscalls, small enough to keep latency and memory low.
const BATCH_LIMIT: usize = 256 * 1024;
/// Payloads at least this large are written from their own buffer, not copied.
const COPY_BELOW: usize = 4096;
/// Slices per vectored write (the kernel's IOV_MAX is 1024; TLS takes any number).
const MAX_SLICES: usize = 64;

pub(super) async fn run<IO: AsyncWrite>(
    mut io: WriteHalf<IO>,
    mut control_rx: mpsc::Receiver<Outgoing>,
    mut data_rx: mpsc::Receiver<Outgoing>,
    padding: Option<WritePadding>,
    shared: Arc<Shared>,
) {
    let mut batch = Batch { small: BytesMut::with_capacity(16 * 1024), parts: Vec::new(), len: 0, windows: Vec::new() };
    let mut closed = shared.closed.subscribe();
    let mut write_index: u32 = padding.as_ref().map_or(0, |padding| padding.first_write);
    let mut rng = StdRng::from_rng(&mut rand::rng());
    loop {
        let first = tokio::select! {
            biased;
            Some(item) = control_rx.recv() => item,
            Some(item) = data_rx.recv() => item,
            _ = closed.wait_for(|state| state.is_some()) => break,
        };
        batch.append(first);
        while batch.len < BATCH_LIMIT {
            match control_rx.try_recv().or_else(|_| data_rx.try_recv()) {
                Ok(item) => batch.append(item),
                Err(_) => break,
            }
        }
        batch.seal();
        let written = async {
            match padding.as_ref().map(|padding| &padding.scheme) {
                Some(scheme) if write_index < scheme.stop() => {
                    let whole: Vec<u8> = batch.parts.iter().flat_map(|part| part.iter().copied()).collect();
                    batch.parts.clear();
                    write_padded(&mut io, &whole, scheme, write_index, &mut rng).await?
                }
                _ => write_parts(&mut io, &mut batch.parts).await?,
            }
            io.flush().await
        };
        // A peer that stops reading blocks the write; a close must still end it. A
        // write that can go out at once does (an Alert queued just before the close).
        let result = tokio::select! {
            biased;
            result = written => result,
            _ = closed.wait_for(|state| state.is_some()) => break,
        };
        batch.len = 0;
        // Written out: the streams may queue that much again.
        batch.windows.clear();
        write_index = write_index.saturating_add(1);
        if let Err(err) = result {
            shared.close_by_peer(&format!("write failed: {err}"));
            break;
        }
    }
    // Senders blocked on a full queue fail now rather than after the shutdown below.
    drop((control_rx, data_rx));
    // Best effort: a TLS close_notify, then FIN.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), io.shutdown()).await;
}

/// How a session's writer pads: by `scheme`, its writes numbered from `first_write`
/// (a client's authentication block was its write 0, so its frames start at 1; a
/// server's first write is its 0).
pub(super) struct WritePadding {
    pub scheme: Arc<PaddingScheme>,
    pub first_write: u32,
}

/// One write's worth of frames, in order: runs of copied bytes and large payloads.
struct Batch {
    /// Headers and small frames since the last large payload.
    small: BytesMut,
    /// What to write, in order (`small` is split off in front of each large payload).
    parts: Vec<Bytes>,
    /// Bytes in the batch.
    len: usize,
    /// The send-window shares of the stream data in the batch, given back once it is written.
    windows: Vec<OwnedSemaphorePermit>,
}

impl Batch {
    fn append(&mut self, item: Outgoing) {
        match item {
            Outgoing::Data(frame, window) => {
                self.windows.push(window);
                self.append_frame(frame);
            }
            Outgoing::Frame(frame) => self.append_frame(frame),
            Outgoing::Raw(bytes) => {
                self.len += bytes.len();
                self.small.extend_from_slice(&bytes);
            }
        }
    }

    fn append_frame(&mut self, frame: Frame) {
        if frame.data.len() >= COPY_BELOW {
            encode_header(frame.command, frame.stream_id, frame.data.len(), &mut self.small)
                .expect("frames are built within limits");
            self.len += HEADER_LEN + frame.data.len();
            self.parts.push(self.small.split().freeze());
            self.parts.push(frame.data);
        } else {
            self.len += frame.encoded_len();
            frame.encode(&mut self.small).expect("frames are built within limits");
        }
    }

    /// Moves the copied bytes still pending into `parts`.
    fn seal(&mut self) {
        if !self.small.is_empty() {
            self.parts.push(self.small.split().freeze());
        }
    }
}

/// Writes `parts` in order with vectored writes; leaves `parts` empty.
async fn write_parts<IO: AsyncWrite>(io: &mut WriteHalf<IO>, parts: &mut Vec<Bytes>) -> std::io::Result<()> {
    let mut first = 0;
    while first < parts.len() {
        let mut written = {
            let slices: Vec<IoSlice<'_>> = parts[first..].iter().take(MAX_SLICES).map(|p| IoSlice::new(p)).collect();
            io.write_vectored(&slices).await?
        };
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while written > 0 {
            let part = &mut parts[first];
            let n = written.min(part.len());
            part.advance(n);
            written -= n;
            if part.is_empty() {
                first += 1;
            }
        }
        while first < parts.len() && parts[first].is_empty() {
            first += 1;
        }
    }
    parts.clear();
    Ok(())
}

async fn write_padded<IO: AsyncWrite>(
    io: &mut WriteHalf<IO>,
    payload: &[u8],
    scheme: &PaddingScheme,
    write_index: u32,
    rng: &mut StdRng,
) -> std::io::Result<()> {
    let mut offset = 0;
    let mut record = Vec::new();
    for piece in scheme.plan(write_index, payload.len(), rng) {
        record.clear();
        match piece {
            Piece::Payload(n) => {
                record.extend_from_slice(&payload[offset..offset + n]);
                offset += n;
            }
            Piece::PayloadThenWaste { payload: n, waste } => {
                record.extend_from_slice(&payload[offset..offset + n]);
                offset += n;
                if let Some(waste) = waste {
                    append_waste(&mut record, waste);
                }
            }
            Piece::Waste(n) => append_waste(&mut record, n),
        }
        io.write_all(&record).await?;
    }
    Ok(())
}

fn append_waste(record: &mut Vec<u8>, len: usize) {
    encode_header(Command::Waste, 0, len, record).expect("planned waste fits a frame");
    record.resize(record.len() + len, 0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Frame;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// Takes at most 5 bytes per write, so every write is partial.
    #[derive(Default)]
    struct Trickle(Vec<u8>);

    impl AsyncWrite for Trickle {
        fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
            let n = data.len().min(5);
            self.0.extend_from_slice(&data[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl tokio::io::AsyncRead for Trickle {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_batch_of_small_and_large_frames_is_written_in_order_despite_partial_writes() {
        let frames = [
            Frame::new(Command::Push, 1, vec![1u8; 10]),
            Frame::new(Command::Push, 1, vec![2u8; COPY_BELOW + 3]),
            Frame::new(Command::Push, 3, vec![3u8; COPY_BELOW]),
            Frame::new(Command::Fin, 1, Bytes::new()),
        ];
        let mut expected = BytesMut::new();
        let mut batch = Batch { small: BytesMut::new(), parts: Vec::new(), len: 0, windows: Vec::new() };
        batch.append(Outgoing::Raw(Bytes::from_static(b"raw")));
        expected.extend_from_slice(b"raw");
        for frame in frames {
            frame.encode(&mut expected).unwrap();
            batch.append(Outgoing::Frame(frame));
        }
        batch.seal();
        assert_eq!(batch.len, expected.len());
        assert!(batch.parts.len() >= 4, "large payloads are parts of their own");
        let (reader, mut writer) = tokio::io::split(Trickle::default());
        write_parts(&mut writer, &mut batch.parts).await.unwrap();
        assert!(batch.parts.is_empty());
        let written = reader.unsplit(writer).0;
        assert_eq!(written, expected.to_vec());
    }
}
