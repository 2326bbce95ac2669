//! The one shape every incremental decoder in the wire format has.
//!
//! Bytes arrive cut anywhere (TLS records, frames, datagrams of a stream), so each
//! decoder is handed the bytes received so far and either takes one complete item off
//! the front, asks for more, or says the input can never become valid. Reading is not
//! its business: `crate::framed` pairs a decoder with a buffer and a source.

use bytes::BytesMut;

/// An incremental decoder over a caller-owned buffer.
pub trait Decoder {
    type Item;
    type Error;

    /// Takes one complete item off the front of `buf`, consuming exactly its bytes.
    /// `Ok(None)` means more bytes are needed; `buf` then still holds everything it
    /// held (a decoder may reserve room for the rest of the item). An error means the
    /// input is malformed; what `buf` holds is then unspecified unless the decoder says.
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Self::Item>, Self::Error>;
}

/// Checks shared by every decoder's property tests: the same items whole or fed in
/// pieces, and no panic on any input.
#[cfg(test)]
pub(crate) mod checks {
    use super::*;

    /// Everything `decoder` gets out of `bytes` given at once, and the bytes left.
    pub(crate) fn decode_whole<D: Decoder>(decoder: &mut D, bytes: &[u8]) -> (Vec<D::Item>, Result<usize, D::Error>) {
        let mut buf = BytesMut::from(bytes);
        let mut items = Vec::new();
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(item)) => items.push(item),
                Ok(None) => return (items, Ok(buf.len())),
                Err(err) => return (items, Err(err)),
            }
        }
    }

    /// As [`decode_whole`], with the bytes fed one at a time.
    pub(crate) fn decode_bytewise<D: Decoder>(
        decoder: &mut D,
        bytes: &[u8],
    ) -> (Vec<D::Item>, Result<usize, D::Error>) {
        let mut buf = BytesMut::new();
        let mut items = Vec::new();
        for &byte in bytes {
            buf.extend_from_slice(&[byte]);
            loop {
                match decoder.decode(&mut buf) {
                    Ok(Some(item)) => items.push(item),
                    Ok(None) => break,
                    Err(err) => return (items, Err(err)),
                }
            }
        }
        (items, Ok(buf.len()))
    }
}
