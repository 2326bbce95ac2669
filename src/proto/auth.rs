//! The authentication block: `sha256(password) · padding0_len:u16 BE · zeros`.
//!
//! The block is the client's first application data and must travel in one TLS
//! record, because reference servers parse it from a single read.

use bytes::{BufMut, BytesMut};
use sha2::{Digest, Sha256};

pub const AUTH_HASH_LEN: usize = 32;
/// Hash plus the padding length field.
pub const AUTH_FIXED_LEN: usize = AUTH_HASH_LEN + 2;

/// A password as the server compares it: its SHA-256.
#[derive(Clone, PartialEq, Eq)]
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

    pub fn as_bytes(&self) -> &[u8; AUTH_HASH_LEN] {
        &self.0
    }

    /// Compares in constant time so a timing side channel cannot reveal a prefix.
    pub fn matches(&self, candidate: &[u8]) -> bool {
        if candidate.len() != AUTH_HASH_LEN {
            return false;
        }
        let diff = self.0.iter().zip(candidate).fold(0u8, |acc, (a, b)| acc | (a ^ b));
        diff == 0
    }
}

/// Builds the client's authentication block with `padding_len` zero bytes.
pub fn encode_auth_block(hash: &PasswordHash, padding_len: u16, out: &mut BytesMut) {
    out.reserve(AUTH_FIXED_LEN + padding_len as usize);
    out.put_slice(hash.as_bytes());
    out.put_u16(padding_len);
    out.put_bytes(0, padding_len as usize);
}

/// What the server learned from the start of the client's data.
#[derive(Debug, PartialEq, Eq)]
pub enum AuthParse {
    /// More bytes are needed; `needed` is the total block length known so far.
    Incomplete { needed: usize },
    /// The block is complete: the index of the matching password and the block's length
    /// (bytes after it belong to the session).
    Accepted { user: usize, block_len: usize },
    /// The hash matched no password.
    Rejected,
}

/// Checks the start of the client's data against the accepted passwords.
///
/// The hash is checked as soon as it is complete, so a wrong password is rejected
/// without waiting for (or buffering) its padding.
pub fn parse_auth_block(data: &[u8], accepted: &[PasswordHash]) -> AuthParse {
    if data.len() < AUTH_FIXED_LEN {
        return AuthParse::Incomplete { needed: AUTH_FIXED_LEN };
    }
    let hash = &data[..AUTH_HASH_LEN];
    // Check every password so the time taken does not depend on which one matched.
    let mut user = None;
    for (index, candidate) in accepted.iter().enumerate() {
        if candidate.matches(hash) && user.is_none() {
            user = Some(index);
        }
    }
    let Some(user) = user else {
        return AuthParse::Rejected;
    };
    let padding_len = u16::from_be_bytes([data[AUTH_HASH_LEN], data[AUTH_HASH_LEN + 1]]) as usize;
    let block_len = AUTH_FIXED_LEN + padding_len;
    if data.len() < block_len {
        AuthParse::Incomplete { needed: block_len }
    } else {
        AuthParse::Accepted { user, block_len }
    }
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

    #[test]
    fn accepted_block_reports_user_and_length_and_keeps_the_rest() {
        let users = [PasswordHash::of("alice"), PasswordHash::of("bob")];
        let mut data = BytesMut::new();
        encode_auth_block(&users[1], 30, &mut data);
        data.extend_from_slice(b"\x04\0\0\0\0\0\0");
        assert_eq!(parse_auth_block(&data, &users), AuthParse::Accepted { user: 1, block_len: 64 });
    }

    #[test]
    fn wrong_password_is_rejected_before_the_padding_arrives() {
        let users = [PasswordHash::of("alice")];
        let mut data = BytesMut::new();
        encode_auth_block(&PasswordHash::of("mallory"), 30, &mut data);
        assert_eq!(parse_auth_block(&data[..34], &users), AuthParse::Rejected);
    }

    #[test]
    fn short_input_asks_for_more() {
        let users = [PasswordHash::of("alice")];
        let mut data = BytesMut::new();
        encode_auth_block(&users[0], 30, &mut data);
        assert_eq!(parse_auth_block(&data[..10], &users), AuthParse::Incomplete { needed: 34 });
        assert_eq!(parse_auth_block(&data[..40], &users), AuthParse::Incomplete { needed: 64 });
    }

    #[test]
    fn constant_time_compare_rejects_other_lengths() {
        let hash = PasswordHash::of("x");
        assert!(!hash.matches(&hash.as_bytes()[..31]));
        assert!(hash.matches(hash.as_bytes()));
    }
}
