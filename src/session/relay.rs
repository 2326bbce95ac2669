//! Copies bytes both ways between a stream and a TCP connection.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use bytes::BytesMut;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::buffers::RelayBuffers;
use super::idle::IdleWatch;
use super::{SessionClosed, Stream};

/// Bytes read per TCP read: one full frame.
const TCP_READ_CHUNK: usize = crate::proto::MAX_FRAME_DATA;

/// What one relay carried.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RelayStats {
    /// From the TCP side into the stream.
    pub sent: u64,
    /// From the stream to the TCP side.
    pub received: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Session(#[from] SessionClosed),
    #[error("tcp: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Idle(String),
}

/// Which side's end of data ended a relay.
enum FirstEnd {
    /// TCP EOF: we sent FIN.
    Ours,
    /// The peer's FIN.
    Peers,
}

/// Relays until the stream is over; an error on either side ends both.
///
/// When both ends are ours (half-close negotiated), each side's end of data is
/// passed on and the other direction keeps going: TCP EOF becomes FIN, FIN becomes
/// a TCP write shutdown. With other implementations FIN ends the whole stream, as in
/// the reference: the first end of data either way ends the relay, and a FIN
/// received is not answered with one.
pub async fn relay(stream: Stream, tcp: TcpStream, buffers: &RelayBuffers) -> (RelayStats, Option<String>) {
    let (stats, error) = relay_to_end(stream, tcp, buffers).await;
    (stats, error.map(|err| err.to_string()))
}

/// As [`relay`], with the error as its kind (idle, session gone, socket), for callers
/// that tell outcomes apart (the server's access log).
pub async fn relay_to_end(stream: Stream, tcp: TcpStream, buffers: &RelayBuffers) -> (RelayStats, Option<RelayError>) {
    let half_close = stream.half_close();
    let idle = IdleWatch::new(stream.idle_timeout(), stream.half_close_timeout());
    let session_closed = stream.session_closed();
    let (mut stream_reader, mut stream_writer) = stream.split();
    let (mut tcp_reader, mut tcp_writer) = tcp.into_split();
    // Counted outside the two directions so an error still reports what went through.
    let (sent, received) = (AtomicU64::new(0), AtomicU64::new(0));

    let upstream = async {
        let mut own_buffer = BytesMut::new();
        loop {
            // Room first: a stream whose session cannot send stops reading its socket.
            let room = stream_writer.reserve(TCP_READ_CHUNK).await;
            // No read buffer is taken while the socket is quiet: a direction that carries
            // nothing (the target of an upload) would otherwise hold one for its whole life.
            tcp_reader.readable().await?;
            let buf = buffers.read_chunk(&mut tcp_reader, &mut own_buffer, room.len()).await?;
            if buf.is_empty() {
                drop(room);
                stream_writer.finish().await?;
                idle.half_closed();
                return Ok::<FirstEnd, RelayError>(FirstEnd::Ours);
            }
            sent.fetch_add(buf.len() as u64, Relaxed);
            idle.touch();
            stream_writer.write_reserved(buf, room).await?;
        }
    };
    let downstream = async {
        while let Some(data) = stream_reader.read().await? {
            received.fetch_add(data.len() as u64, Relaxed);
            idle.touch();
            tcp_writer.write_all(&data).await?;
        }
        idle.half_closed();
        tcp_writer.shutdown().await?;
        Ok::<FirstEnd, RelayError>(FirstEnd::Peers)
    };
    let expired = async { RelayError::Idle(idle.expired().await) };
    let session_closed = async { RelayError::Session(session_closed.await) };
    let outcome = if half_close {
        tokio::select! {
            both = async { tokio::try_join!(upstream, downstream) } => both.map(|_| ()),
            idle = expired => Err(idle),
            closed = session_closed => Err(closed),
        }
    } else {
        let first = tokio::select! {
            ended = upstream => ended,
            ended = downstream => ended,
            idle = expired => Err(idle),
            closed = session_closed => Err(closed),
        };
        first.map(|end| {
            if let FirstEnd::Peers = end {
                stream_writer.forget_fin();
            }
        })
    };
    let stats = RelayStats { sent: sent.into_inner(), received: received.into_inner() };
    (stats, outcome.err())
}
