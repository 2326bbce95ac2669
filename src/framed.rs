//! Reading until a decoder has a complete item: the one loop between a byte source
//! (a socket, a mux stream's data) and a `proto` decoder.
//!
//! [`Framed`] owns the read buffer and the decoder, not the source: callers keep using
//! their socket or stream between items (to answer, to relay the rest). Every buffer is
//! bounded: a peer that sends `max_buffered` bytes without completing an item gets
//! [`ReadError::TooLong`], and one that ends its data inside an item gets
//! [`ReadError::Truncated`], never a hang or an unbounded buffer.

use std::future::Future;
use std::io;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;

use crate::proto::Decoder;

/// Room made in the buffer before a read, unless [`Framed::read_room`] says otherwise:
/// enough for a SOCKS request or an authentication block in one read.
const DEFAULT_READ_ROOM: usize = 1024;

/// Somewhere bytes come from.
pub trait ReadInto {
    type Error;

    /// Appends what arrives next to `buf`; `Ok(0)` means the data has ended.
    fn read_into<'a>(
        &'a mut self,
        buf: &'a mut BytesMut,
    ) -> impl Future<Output = Result<usize, Self::Error>> + Send + 'a;
}

impl<T: AsyncRead + Unpin + Send> ReadInto for T {
    type Error = io::Error;

    fn read_into<'a>(&'a mut self, buf: &'a mut BytesMut) -> impl Future<Output = io::Result<usize>> + Send + 'a {
        self.read_buf(buf)
    }
}

/// Why no item could be read. `D` is the decoder's error, `S` the source's.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReadError<D, S> {
    #[error("{0}")]
    Decode(D),
    #[error("{0}")]
    Read(S),
    #[error("the data ended inside an item ({buffered} bytes left)")]
    Truncated { buffered: usize },
    #[error("{limit} bytes without a complete item")]
    TooLong { limit: usize },
    #[error("no complete item in time")]
    TimedOut,
}

/// A decoder with its read buffer.
pub struct Framed<D: Decoder> {
    decoder: D,
    buf: BytesMut,
    /// The next item, decoded early to answer [`Framed::is_drained`].
    ahead: Option<Result<D::Item, D::Error>>,
    max_buffered: usize,
    read_room: usize,
}

impl<D: Decoder> Framed<D> {
    /// An empty buffer; at most `max_buffered` bytes may wait for one item.
    pub fn new(decoder: D, max_buffered: usize) -> Framed<D> {
        Framed::with_buffer(decoder, BytesMut::new(), max_buffered)
    }

    /// Starts from bytes already read (what followed an earlier item).
    pub fn with_buffer(decoder: D, buf: BytesMut, max_buffered: usize) -> Framed<D> {
        Framed { decoder, buf, ahead: None, max_buffered, read_room: DEFAULT_READ_ROOM }
    }

    /// Before a read, if less than a quarter of `room` is free, `room` more is reserved
    /// (the size of the reads a socket gets).
    pub fn read_room(mut self, room: usize) -> Framed<D> {
        self.read_room = room;
        self
    }

    /// The next item, reading only when the buffer holds no complete one. `Ok(None)`:
    /// the data ended at an item boundary.
    pub async fn next<S: ReadInto>(
        &mut self,
        source: &mut S,
    ) -> Result<Option<D::Item>, ReadError<D::Error, S::Error>> {
        self.next_by(source, |_| None).await
    }

    /// As [`Framed::next`], each read given until the deadline `deadline_for` returns
    /// for the bytes buffered so far (`None`: no deadline); past it, [`ReadError::TimedOut`].
    pub async fn next_by<S: ReadInto>(
        &mut self,
        source: &mut S,
        mut deadline_for: impl FnMut(&BytesMut) -> Option<Instant>,
    ) -> Result<Option<D::Item>, ReadError<D::Error, S::Error>> {
        loop {
            if let Some(item) = self.buffered_item().map_err(ReadError::Decode)? {
                return Ok(Some(item));
            }
            if self.buf.len() >= self.max_buffered {
                return Err(ReadError::TooLong { limit: self.max_buffered });
            }
            if self.buf.capacity() - self.buf.len() < self.read_room / 4 {
                self.buf.reserve(self.read_room);
            }
            let read = match deadline_for(&self.buf) {
                None => source.read_into(&mut self.buf).await,
                Some(deadline) => tokio::time::timeout_at(deadline, source.read_into(&mut self.buf))
                    .await
                    .map_err(|_| ReadError::TimedOut)?,
            };
            match read.map_err(ReadError::Read)? {
                0 if self.buf.is_empty() => return Ok(None),
                0 => return Err(ReadError::Truncated { buffered: self.buf.len() }),
                _ => {}
            }
        }
    }

    /// The next item if the buffer already holds it; never reads.
    pub fn buffered_item(&mut self) -> Result<Option<D::Item>, D::Error> {
        match self.ahead.take() {
            Some(decoded) => decoded.map(Some),
            None => self.decoder.decode(&mut self.buf),
        }
    }

    /// Whether every complete item read so far has been handed out (the next
    /// [`Framed::next`] will read). Decodes the next item early to know; no copy.
    pub fn is_drained(&mut self) -> bool {
        if self.ahead.is_none() {
            self.ahead = self.decoder.decode(&mut self.buf).transpose();
        }
        self.ahead.is_none()
    }

    /// The bytes buffered and not yet decoded.
    pub fn buffered(&self) -> &BytesMut {
        &self.buf
    }

    /// The bytes after the last item handed out (for what follows the items: a
    /// payload, another protocol). Call it only when drained or after an error.
    pub fn into_buffer(self) -> BytesMut {
        debug_assert!(!matches!(self.ahead, Some(Ok(_))), "an item decoded ahead would be lost");
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::{Buf, BufMut};
    use tokio::io::AsyncWriteExt;

    use super::*;

    /// A line decoder, for tests: items end at `\n`; `!` is malformed.
    struct Lines;

    impl Decoder for Lines {
        type Item = String;
        type Error = &'static str;

        fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<String>, &'static str> {
            let end = buf.iter().position(|&b| b == b'\n');
            if buf[..end.unwrap_or(buf.len())].contains(&b'!') {
                return Err("bang");
            }
            let Some(end) = end else { return Ok(None) };
            let line = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.advance(end + 1);
            Ok(Some(line))
        }
    }

    async fn items_of(
        chunks: &[&[u8]],
        max: usize,
    ) -> (Vec<String>, Result<(), ReadError<&'static str, io::ErrorKind>>) {
        let (mut ours, mut theirs) = tokio::io::duplex(1024);
        let chunks: Vec<Vec<u8>> = chunks.iter().map(|c| c.to_vec()).collect();
        tokio::spawn(async move {
            for chunk in chunks {
                theirs.write_all(&chunk).await.unwrap();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        let mut framed = Framed::new(Lines, max);
        let mut items = Vec::new();
        loop {
            match framed.next(&mut ours).await {
                Ok(Some(item)) => items.push(item),
                Ok(None) => return (items, Ok(())),
                Err(err) => return (items, Err(map_io(err))),
            }
        }
    }

    fn map_io(err: ReadError<&'static str, io::Error>) -> ReadError<&'static str, io::ErrorKind> {
        match err {
            ReadError::Decode(d) => ReadError::Decode(d),
            ReadError::Read(e) => ReadError::Read(e.kind()),
            ReadError::Truncated { buffered } => ReadError::Truncated { buffered },
            ReadError::TooLong { limit } => ReadError::TooLong { limit },
            ReadError::TimedOut => ReadError::TimedOut,
        }
    }

    #[tokio::test]
    async fn items_split_anywhere_come_out_whole_and_the_end_is_clean() {
        let (items, end) = items_of(&[b"o", b"ne\ntw", b"o\n", b"three\nfour\n"], 64).await;
        assert_eq!(items, ["one", "two", "three", "four"]);
        assert_eq!(end, Ok(()));
    }

    #[tokio::test]
    async fn an_end_inside_an_item_is_truncated() {
        let (items, end) = items_of(&[b"one\npart"], 64).await;
        assert_eq!(items, ["one"]);
        assert_eq!(end, Err(ReadError::Truncated { buffered: 4 }));
    }

    #[tokio::test]
    async fn a_peer_past_the_bound_gets_too_long() {
        let (items, end) = items_of(&[b"ok\n", &[b'x'; 100]], 16).await;
        assert_eq!(items, ["ok"]);
        assert_eq!(end, Err(ReadError::TooLong { limit: 16 }));
    }

    #[tokio::test]
    async fn malformed_input_is_the_decoders_error() {
        let (items, end) = items_of(&[b"a\nb!"], 64).await;
        assert_eq!(items, ["a"]);
        assert_eq!(end, Err(ReadError::Decode("bang")));
    }

    #[tokio::test]
    async fn drained_tells_whether_the_next_item_needs_a_read() {
        let mut source: &[u8] = b"";
        let mut buf = BytesMut::new();
        buf.put_slice(b"a\nb\nc");
        let mut framed = Framed::with_buffer(Lines, buf, 64);
        assert!(!framed.is_drained());
        assert_eq!(framed.next(&mut source).await.map_err(map_io), Ok(Some("a".into())));
        assert!(!framed.is_drained(), "b is buffered");
        assert_eq!(framed.buffered_item(), Ok(Some("b".into())));
        assert!(framed.is_drained(), "only part of c is buffered");
        assert_eq!(framed.buffered_item(), Ok(None));
        assert_eq!(&framed.into_buffer()[..], b"c");
    }

    #[tokio::test]
    async fn a_deadline_per_read_times_out() {
        let (mut ours, mut theirs) = tokio::io::duplex(64);
        theirs.write_all(b"slow").await.unwrap();
        let mut framed = Framed::new(Lines, 64);
        let deadline = Instant::now() + Duration::from_millis(50);
        let mut seen = Vec::new();
        let result = framed
            .next_by(&mut ours, |buf| {
                seen.push(buf.len());
                Some(deadline)
            })
            .await;
        assert!(matches!(result, Err(ReadError::TimedOut)), "{result:?}");
        assert!(Instant::now() >= deadline);
        assert_eq!(seen, [0, 4], "asked before each read, with what was buffered");
        assert_eq!(&framed.into_buffer()[..], b"slow");
    }
}
