//! The writer task: batches queued frames into large writes.
//!
//! Frames are copied once into a batch buffer (TLS copies again to encrypt), so
//! many small frames become one write and full 16 KiB TLS records. A client pads
//! its first `stop` writes as the padding scheme plans: each piece is its own write,
//! which TLS turns into its own record.

use std::sync::Arc;

use bytes::BytesMut;
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::io::{AsyncWrite, AsyncWriteExt, WriteHalf};
use tokio::sync::mpsc;

use super::{Outgoing, Shared};
use crate::proto::PaddingScheme;
use crate::proto::frame::{Command, encode_header};
use crate::proto::padding::Piece;

/// Stop adding queued frames to a batch past this size: large enough for few
/// syscalls, small enough to keep latency and memory low.
const BATCH_LIMIT: usize = 256 * 1024;

pub(super) async fn run<IO: AsyncWrite>(
    mut io: WriteHalf<IO>,
    mut control_rx: mpsc::Receiver<Outgoing>,
    mut data_rx: mpsc::Receiver<Outgoing>,
    padding: Option<Arc<PaddingScheme>>,
    shared: Arc<Shared>,
) {
    let mut batch = BytesMut::with_capacity(BATCH_LIMIT + 70 * 1024);
    let mut closed = shared.closed.subscribe();
    // The authentication block was write 0.
    let mut write_index: u32 = 1;
    let mut rng = StdRng::from_rng(&mut rand::rng());
    loop {
        let first = tokio::select! {
            biased;
            Some(item) = control_rx.recv() => item,
            Some(item) = data_rx.recv() => item,
            _ = closed.wait_for(|state| state.is_some()) => break,
        };
        batch.clear();
        append(&mut batch, first);
        while batch.len() < BATCH_LIMIT {
            match control_rx.try_recv().or_else(|_| data_rx.try_recv()) {
                Ok(item) => append(&mut batch, item),
                Err(_) => break,
            }
        }
        let written = async {
            match &padding {
                Some(scheme) if write_index < scheme.stop() => {
                    write_padded(&mut io, &batch, scheme, write_index, &mut rng).await?
                }
                _ => io.write_all(&batch).await?,
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

fn append(batch: &mut BytesMut, item: Outgoing) {
    match item {
        Outgoing::Frame(frame) => frame.encode(batch).expect("frames are built within limits"),
        Outgoing::Raw(bytes) => batch.extend_from_slice(&bytes),
    }
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
