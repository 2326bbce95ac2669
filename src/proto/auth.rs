//! The authentication block: `sha256(password) · padding0_len:u16 BE · zeros`.
//!
//! The block is the client's first application data and must travel in one TLS
//! record, because reference servers parse it from a single read.

use bytes::{Buf, BufMut, BytesMut};
use sha2::{Digest, Sha256};
use subtle::{Choice, ConditionallySelectable, ConstantTimeEq};

use super::Decoder;

pub const AUTH_HASH_LEN: usize = 32;
/// Hash plus the padding length field.
pub const AUTH_FIXED_LEN: usize = AUTH_HASH_LEN + 2;

/// A password as the server compares it: its SHA-256.
///
/// Hashable, so the server finds a user in a map whatever the number of users; the map's
/// hasher is seeded at random, so a client cannot aim at a bucket to learn from timing.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PasswordHash([u8; AUTH_HASH_LEN]);

impl std::fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the hash: it is as good as the password to a client.
        f.write_str("PasswordHash(..)")
    }
}

impl PasswordHash {
    pub fn of(password: &str) -> PasswordHash {
        PasswordHash(Sha256::digest(password.as_bytes()).into())
    }

    pub fn from_bytes(hash: [u8; AUTH_HASH_LEN]) -> PasswordHash {
        PasswordHash(hash)
    }

    pub fn as_bytes(&self) -> &[u8; AUTH_HASH_LEN] {
        &self.0
    }

    /// Compares in constant time so a timing side channel cannot reveal a prefix.
    pub fn matches(&self, candidate: &[u8]) -> bool {
        // A length mismatch is answered at once: the length is not secret.
        self.0[..].ct_eq(candidate).into()
    }
}

/// Builds the client's authentication block with `padding_len` zero bytes.
pub fn encode_auth_block(hash: &PasswordHash, padding_len: u16, out: &mut BytesMut) {
    out.reserve(AUTH_FIXED_LEN + padding_len as usize);
    out.put_slice(hash.as_bytes());
    out.put_u16(padding_len);
    out.put_bytes(0, padding_len as usize);
}

/// A client whose first bytes are not one of the accepted passwords' hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("wrong password")]
    WrongPassword,
}

/// Takes the authentication block off the front of the client's data; the item is what
/// `accept` made of the hash (the server: its user and a session place; a list: an index).
///
/// The hash is checked as soon as its 32 bytes are there, before the padding length,
/// so a wrong password is rejected without waiting for (or buffering) the rest; on
/// that error `buf` is left untouched (the bytes go to the fallback site). `accept` is
/// called once, and its answer kept while the padding arrives. Fewer than 32 bytes are
/// never compared: a partial hash must not be judged (see `server::fallback`).
pub struct AuthBlockDecoder<F, U> {
    accept: F,
    matched: Option<U>,
}

impl<F: FnMut(&[u8; AUTH_HASH_LEN]) -> Option<U>, U> AuthBlockDecoder<F, U> {
    pub fn new(accept: F) -> AuthBlockDecoder<F, U> {
        AuthBlockDecoder { accept, matched: None }
    }
}

/// An `accept` for [`AuthBlockDecoder`] over a list: the index of the password.
pub fn in_list(accepted: &[PasswordHash]) -> impl FnMut(&[u8; AUTH_HASH_LEN]) -> Option<usize> + '_ {
    move |hash| matching_password(hash, accepted)
}

impl<F: FnMut(&[u8; AUTH_HASH_LEN]) -> Option<U>, U> Decoder for AuthBlockDecoder<F, U> {
    type Item = U;
    type Error = AuthError;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<U>, AuthError> {
        if self.matched.is_none() {
            let Some(hash) = buf.get(..AUTH_HASH_LEN) else {
                return Ok(None);
            };
            let hash: &[u8; AUTH_HASH_LEN] = hash.try_into().expect("32 bytes");
            self.matched = Some((self.accept)(hash).ok_or(AuthError::WrongPassword)?);
        }
        let Some(padding_len) = buf.get(AUTH_HASH_LEN..AUTH_FIXED_LEN) else {
            return Ok(None);
        };
        let block_len = AUTH_FIXED_LEN + u16::from_be_bytes([padding_len[0], padding_len[1]]) as usize;
        if buf.len() < block_len {
            // At most one block's worth: bounded by the u16 padding length.
            buf.reserve(block_len - buf.len());
            return Ok(None);
        }
        buf.advance(block_len);
        Ok(self.matched.take())
    }
}

/// The index of the first password whose hash `hash` is. Every password is compared,
/// in constant time, so the time taken does not depend on which one matched.
fn matching_password(hash: &[u8], accepted: &[PasswordHash]) -> Option<usize> {
    let mut found = Choice::from(0);
    let mut user = 0u64;
    for (index, candidate) in accepted.iter().enumerate() {
        let matches = candidate.0[..].ct_eq(hash);
        user.conditional_assign(&(index as u64), matches & !found);
        found |= matches;
    }
    bool::from(found).then_some(user as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn password_hash_matches_the_contract_vector() {
        assert_eq!(
            hex(PasswordHash::of("password").as_bytes()),
            "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"
        );
        assert_eq!(
            hex(PasswordHash::of("p@ss:w/rd").as_bytes()),
            "5a239cf77d67ce4b0a28de5b58565f8de0ed642094656427eb759445e577ebb4"
        );
    }

    #[test]
    fn block_layout_is_hash_length_zeros() {
        let hash = PasswordHash::of("password");
        let mut out = BytesMut::new();
        encode_auth_block(&hash, 30, &mut out);
        assert_eq!(out.len(), 32 + 2 + 30);
        assert_eq!(&out[..32], hash.as_bytes());
        assert_eq!(&out[32..34], &[0, 30]);
        assert!(out[34..].iter().all(|&b| b == 0));
    }

    fn decode(data: &[u8], users: &[PasswordHash]) -> (Result<Option<usize>, AuthError>, BytesMut) {
        let mut buf = BytesMut::from(data);
        (AuthBlockDecoder::new(in_list(users)).decode(&mut buf), buf)
    }

    #[test]
    fn accepted_block_reports_user_and_length_and_keeps_the_rest() {
        let users = [PasswordHash::of("alice"), PasswordHash::of("bob")];
        let mut data = BytesMut::new();
        encode_auth_block(&users[1], 30, &mut data);
        data.extend_from_slice(b"\x04\0\0\0\0\0\0");
        let (user, rest) = decode(&data, &users);
        assert_eq!(user, Ok(Some(1)));
        assert_eq!(&rest[..], b"\x04\0\0\0\0\0\0", "exactly the 64-byte block was consumed");
    }

    #[test]
    fn the_first_matching_password_wins() {
        let users = [PasswordHash::of("x"), PasswordHash::of("bob"), PasswordHash::of("bob")];
        let mut data = BytesMut::new();
        encode_auth_block(&users[1], 0, &mut data);
        assert_eq!(decode(&data, &users).0, Ok(Some(1)));
    }

    #[test]
    fn wrong_password_is_rejected_before_the_padding_arrives() {
        let users = [PasswordHash::of("alice")];
        let mut data = BytesMut::new();
        encode_auth_block(&PasswordHash::of("mallory"), 30, &mut data);
        assert_eq!(decode(&data[..34], &users).0, Err(AuthError::WrongPassword));
        // The hash alone decides: a client may send it in a record of its own.
        let (rejected, kept) = decode(&data[..32], &users);
        assert_eq!(rejected, Err(AuthError::WrongPassword));
        assert_eq!(&kept[..], &data[..32], "the rejected bytes are kept for the fallback");
    }

    #[test]
    fn short_input_asks_for_more() {
        let users = [PasswordHash::of("alice")];
        let mut data = BytesMut::new();
        encode_auth_block(&users[0], 30, &mut data);
        for cut in [0, 10, 31, 32, 33, 34, 40, 63] {
            let (result, kept) = decode(&data[..cut], &users);
            assert_eq!(result, Ok(None), "cut at {cut}");
            assert_eq!(kept.len(), cut);
        }
        // Fewer than 32 bytes are never judged, however wrong they look.
        assert_eq!(decode(&[0xff; 31], &users).0, Ok(None));
    }

    fn arb_block() -> impl proptest::strategy::Strategy<Value = (usize, u16, Vec<u8>)> {
        use proptest::prelude::*;
        (0usize..3, 0u16..600, proptest::collection::vec(any::<u8>(), 0..64))
    }

    proptest::proptest! {
        #[test]
        fn blocks_decode_the_same_whole_or_bytewise((user, padding, rest) in arb_block()) {
            use crate::proto::decode::checks::{decode_bytewise, decode_whole};
            let users = [PasswordHash::of("a"), PasswordHash::of("b"), PasswordHash::of("c")];
            let mut data = BytesMut::new();
            encode_auth_block(&users[user], padding, &mut data);
            let block_len = data.len();
            data.extend_from_slice(&rest);
            // One block, then the session's bytes: decode only the block's worth.
            let mut buf = data.clone();
            proptest::prop_assert_eq!(AuthBlockDecoder::new(in_list(&users)).decode(&mut buf), Ok(Some(user)));
            proptest::prop_assert_eq!(&buf[..], &rest[..]);
            let block = &data[..block_len];
            proptest::prop_assert_eq!(decode_whole(&mut AuthBlockDecoder::new(in_list(&users[user..=user])), block), (vec![0], Ok(0)));
            proptest::prop_assert_eq!(decode_bytewise(&mut AuthBlockDecoder::new(in_list(&users[user..=user])), block), (vec![0], Ok(0)));
        }

        #[test]
        fn arbitrary_bytes_are_an_error_or_need_more_never_a_panic(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
        ) {
            use crate::proto::decode::checks::{decode_bytewise, decode_whole};
            let users = [PasswordHash::of("alice")];
            let whole = decode_whole(&mut AuthBlockDecoder::new(in_list(&users)), &bytes);
            proptest::prop_assert_eq!(&whole, &decode_bytewise(&mut AuthBlockDecoder::new(in_list(&users)), &bytes));
            let expected = if bytes.len() < AUTH_HASH_LEN { Ok(bytes.len()) } else { Err(AuthError::WrongPassword) };
            proptest::prop_assert_eq!(whole, (vec![], expected));
        }
    }

    #[test]
    fn constant_time_compare_rejects_other_lengths() {
        let hash = PasswordHash::of("x");
        assert!(!hash.matches(&hash.as_bytes()[..31]));
        assert!(hash.matches(hash.as_bytes()));
    }
}
