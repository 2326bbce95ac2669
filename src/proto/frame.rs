//! Frames: `cmd:u8 · stream id:u32 BE · length:u16 BE · data`.
//!
//! Frames are not aligned with TLS records, so the decoder is incremental: it is fed
//! whatever bytes arrived and yields complete frames, keeping partial ones buffered.
//! It never reserves more than one frame's declared length, so hostile input cannot
//! make it allocate more than 7 + 65,535 bytes beyond what was actually received.

use std::convert::Infallible;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::Decoder;

/// Size of the frame header: command, stream id, length.
pub const HEADER_LEN: usize = 7;
/// Largest data a frame can carry (the length field is a u16).
pub const MAX_FRAME_DATA: usize = u16::MAX as usize;

/// Frame commands. Unknown numbers are kept so they can be skipped, not fatal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    Waste,
    Syn,
    Push,
    Fin,
    Settings,
    Alert,
    UpdatePaddingScheme,
    SynAck,
    HeartRequest,
    HeartResponse,
    ServerSettings,
    Unknown(u8),
}

impl Command {
    pub fn from_byte(byte: u8) -> Command {
        match byte {
            0 => Command::Waste,
            1 => Command::Syn,
            2 => Command::Push,
            3 => Command::Fin,
            4 => Command::Settings,
            5 => Command::Alert,
            6 => Command::UpdatePaddingScheme,
            7 => Command::SynAck,
            8 => Command::HeartRequest,
            9 => Command::HeartResponse,
            10 => Command::ServerSettings,
            other => Command::Unknown(other),
        }
    }

    pub fn to_byte(self) -> u8 {
        match self {
            Command::Waste => 0,
            Command::Syn => 1,
            Command::Push => 2,
            Command::Fin => 3,
            Command::Settings => 4,
            Command::Alert => 5,
            Command::UpdatePaddingScheme => 6,
            Command::SynAck => 7,
            Command::HeartRequest => 8,
            Command::HeartResponse => 9,
            Command::ServerSettings => 10,
            Command::Unknown(other) => other,
        }
    }
}

/// One decoded frame. `data` shares the decoder's buffer (no copy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub command: Command,
    pub stream_id: u32,
    pub data: Bytes,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame data of {0} bytes exceeds the 65535-byte limit")]
    TooLong(usize),
}

impl Frame {
    pub fn new(command: Command, stream_id: u32, data: impl Into<Bytes>) -> Frame {
        Frame { command, stream_id, data: data.into() }
    }

    /// A frame without data.
    pub fn control(command: Command, stream_id: u32) -> Frame {
        Frame { command, stream_id, data: Bytes::new() }
    }

    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.data.len()
    }

    /// Appends the encoded frame to `out`.
    pub fn encode(&self, out: &mut impl BufMut) -> Result<(), FrameError> {
        encode_header(self.command, self.stream_id, self.data.len(), out)?;
        out.put_slice(&self.data);
        Ok(())
    }
}

/// Appends just a header; the caller appends `len` bytes of data after it.
pub fn encode_header(command: Command, stream_id: u32, len: usize, out: &mut impl BufMut) -> Result<(), FrameError> {
    if len > MAX_FRAME_DATA {
        return Err(FrameError::TooLong(len));
    }
    out.put_u8(command.to_byte());
    out.put_u32(stream_id);
    out.put_u16(len as u16);
    Ok(())
}

/// Incremental frame decoder over a caller-owned buffer.
///
/// Any byte sequence is a valid frame stream (every length fits the u16 field), so
/// decoding itself cannot fail: semantic checks (unknown commands, stream ids) are the
/// session's business.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    _private: (),
}

impl FrameDecoder {
    pub fn new() -> FrameDecoder {
        FrameDecoder::default()
    }
}

impl Decoder for FrameDecoder {
    type Item = Frame;
    type Error = Infallible;

    /// Takes one complete frame off the front of `buf`, or returns `Ok(None)` (leaving
    /// `buf` untouched) when more bytes are needed.
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, Infallible> {
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let len = u16::from_be_bytes([buf[5], buf[6]]) as usize;
        if buf.len() < HEADER_LEN + len {
            // Reserve at most what this frame still needs: bounded by its declared length.
            buf.reserve(HEADER_LEN + len - buf.len());
            return Ok(None);
        }
        let command = Command::from_byte(buf[0]);
        let stream_id = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
        buf.advance(HEADER_LEN);
        let data = buf.split_to(len).freeze();
        Ok(Some(Frame { command, stream_id, data }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encode_all(frames: &[Frame]) -> BytesMut {
        let mut out = BytesMut::new();
        for frame in frames {
            frame.encode(&mut out).unwrap();
        }
        out
    }

    fn decode_all(buf: &mut BytesMut) -> Vec<Frame> {
        let mut decoder = FrameDecoder::new();
        std::iter::from_fn(|| decode(&mut decoder, buf)).collect()
    }

    /// One frame, or `None` for "more bytes needed" (decoding cannot fail).
    fn decode(decoder: &mut FrameDecoder, buf: &mut BytesMut) -> Option<Frame> {
        let Ok(frame) = decoder.decode(buf);
        frame
    }

    #[test]
    fn header_layout_is_cmd_sid_len_big_endian() {
        let mut out = BytesMut::new();
        Frame::new(Command::Push, 0x0102_0304, &b"hi"[..]).encode(&mut out).unwrap();
        assert_eq!(&out[..], &[2, 1, 2, 3, 4, 0, 2, b'h', b'i']);
    }

    #[test]
    fn command_numbers_match_the_contract() {
        let expected = [
            (Command::Waste, 0),
            (Command::Syn, 1),
            (Command::Push, 2),
            (Command::Fin, 3),
            (Command::Settings, 4),
            (Command::Alert, 5),
            (Command::UpdatePaddingScheme, 6),
            (Command::SynAck, 7),
            (Command::HeartRequest, 8),
            (Command::HeartResponse, 9),
            (Command::ServerSettings, 10),
        ];
        for (command, byte) in expected {
            assert_eq!(command.to_byte(), byte);
            assert_eq!(Command::from_byte(byte), command);
        }
        assert_eq!(Command::from_byte(200), Command::Unknown(200));
    }

    #[test]
    fn oversized_data_is_refused_by_the_encoder() {
        let frame = Frame::new(Command::Push, 1, vec![0u8; MAX_FRAME_DATA + 1]);
        assert_eq!(frame.encode(&mut BytesMut::new()), Err(FrameError::TooLong(65536)));
        let frame = Frame::new(Command::Push, 1, vec![0u8; MAX_FRAME_DATA]);
        assert!(frame.encode(&mut BytesMut::new()).is_ok());
    }

    #[test]
    fn partial_frame_waits_and_keeps_the_buffer() {
        let mut buf = encode_all(&[Frame::new(Command::Push, 7, &b"hello"[..])]);
        let mut partial = buf.split_to(9);
        let mut decoder = FrameDecoder::new();
        assert_eq!(decode(&mut decoder, &mut partial), None);
        assert_eq!(partial.len(), 9);
        partial.unsplit(buf);
        assert_eq!(decode(&mut decoder, &mut partial).unwrap().data, &b"hello"[..]);
        assert!(partial.is_empty());
    }

    #[test]
    fn a_declared_length_bounds_the_reservation() {
        let mut buf = BytesMut::from(&[2u8, 0, 0, 0, 1, 0xff, 0xff][..]);
        assert_eq!(decode(&mut FrameDecoder::new(), &mut buf), None);
        assert!(buf.capacity() <= 2 * (HEADER_LEN + MAX_FRAME_DATA));
    }

    fn arb_command() -> impl Strategy<Value = Command> {
        any::<u8>().prop_map(Command::from_byte)
    }

    fn arb_frame() -> impl Strategy<Value = Frame> {
        (arb_command(), any::<u32>(), proptest::collection::vec(any::<u8>(), 0..600))
            .prop_map(|(command, sid, data)| Frame::new(command, sid, data))
    }

    proptest! {
        #[test]
        fn frames_round_trip(frames in proptest::collection::vec(arb_frame(), 0..20)) {
            let mut buf = encode_all(&frames);
            prop_assert_eq!(decode_all(&mut buf), frames);
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn any_split_point_gives_the_same_frames(
            frames in proptest::collection::vec(arb_frame(), 1..6),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
        ) {
            let whole = encode_all(&frames).freeze();
            let mut points: Vec<usize> = cuts.iter().map(|i| i.index(whole.len() + 1)).collect();
            points.sort_unstable();
            let mut decoder = FrameDecoder::new();
            let mut buf = BytesMut::new();
            let mut decoded = Vec::new();
            let mut start = 0;
            for end in points.into_iter().chain([whole.len()]) {
                buf.extend_from_slice(&whole[start..end]);
                start = end;
                while let Some(frame) = decode(&mut decoder, &mut buf) {
                    decoded.push(frame);
                }
            }
            prop_assert_eq!(decoded, frames);
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_stay_bounded(
            bytes in proptest::collection::vec(any::<u8>(), 0..4096),
        ) {
            let mut buf = BytesMut::from(&bytes[..]);
            let mut decoder = FrameDecoder::new();
            let mut consumed = 0;
            while let Some(frame) = decode(&mut decoder, &mut buf) {
                consumed += HEADER_LEN + frame.data.len();
            }
            prop_assert_eq!(consumed + buf.len(), bytes.len());
            // Growth may double, but only up to what the bytes received plus one
            // declared frame need.
            prop_assert!(buf.capacity() <= 2 * (bytes.len() + HEADER_LEN + MAX_FRAME_DATA));
        }
    }

    proptest! {
        #[test]
        fn fed_one_byte_at_a_time_gives_the_same_frames(frames in proptest::collection::vec(arb_frame(), 0..6)) {
            use crate::proto::decode::checks::{decode_bytewise, decode_whole};
            let whole = encode_all(&frames);
            let (at_once, left) = decode_whole(&mut FrameDecoder::new(), &whole);
            prop_assert_eq!(&at_once, &frames);
            prop_assert_eq!(left, Ok(0));
            let (bytewise, left) = decode_bytewise(&mut FrameDecoder::new(), &whole);
            prop_assert_eq!(bytewise, frames);
            prop_assert_eq!(left, Ok(0));
        }

        #[test]
        fn arbitrary_bytes_whole_or_bytewise_agree(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            use crate::proto::decode::checks::{decode_bytewise, decode_whole};
            // No input is malformed for frames: both ways end with the same frames and leftover.
            prop_assert_eq!(decode_whole(&mut FrameDecoder::new(), &bytes), decode_bytewise(&mut FrameDecoder::new(), &bytes));
        }
    }

    #[test]
    fn every_single_byte_split_of_a_stream_decodes_identically() {
        let frames = vec![
            Frame::new(Command::Settings, 0, &b"v=2\nclient=x"[..]),
            Frame::control(Command::Syn, 1),
            Frame::new(Command::Push, 1, &b"\x01\x7f\x00\x00\x01\x00\x50GET /"[..]),
            Frame::control(Command::Fin, 1),
        ];
        let whole = encode_all(&frames);
        for cut in 0..=whole.len() {
            let mut decoder = FrameDecoder::new();
            let mut buf = BytesMut::from(&whole[..cut]);
            let mut decoded: Vec<Frame> = std::iter::from_fn(|| decode(&mut decoder, &mut buf)).collect();
            buf.extend_from_slice(&whole[cut..]);
            decoded.extend(std::iter::from_fn(|| decode(&mut decoder, &mut buf)));
            assert_eq!(decoded, frames, "cut at {cut}");
        }
    }
}
