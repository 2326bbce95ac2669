//! Copies bytes both ways between a stream and a TCP connection.

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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
}

/// Relays until both directions have ended. Each side's end of data is passed on:
/// TCP EOF becomes FIN, FIN becomes a TCP write shutdown, so half-closed
/// connections keep working. An error on either side ends both.
pub async fn relay(stream: Stream, tcp: TcpStream) -> (RelayStats, Option<String>) {
    let (mut stream_reader, mut stream_writer) = stream.split();
    let (mut tcp_reader, mut tcp_writer) = tcp.into_split();
    let mut stats = RelayStats::default();

    let upstream = async {
        let mut sent = 0u64;
        loop {
            let mut buf = BytesMut::with_capacity(TCP_READ_CHUNK);
            if tcp_reader.read_buf(&mut buf).await? == 0 {
                stream_writer.finish().await?;
                return Ok::<u64, RelayError>(sent);
            }
            sent += buf.len() as u64;
            stream_writer.write(buf.freeze()).await?;
        }
    };
    let downstream = async {
        let mut received = 0u64;
        while let Some(data) = stream_reader.read().await? {
            received += data.len() as u64;
            tcp_writer.write_all(&data).await?;
        }
        tcp_writer.shutdown().await?;
        Ok::<u64, RelayError>(received)
    };
    match tokio::try_join!(upstream, downstream) {
        Ok((sent, received)) => {
            stats.sent = sent;
            stats.received = received;
            (stats, None)
        }
        Err(err) => (stats, Some(err.to_string())),
    }
}
