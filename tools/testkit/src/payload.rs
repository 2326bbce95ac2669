//! Deterministic test data and the digests that check it arrived intact.

use sha2::{Digest, Sha256};

/// `len` bytes of a deterministic, incompressible pattern; `seed` makes them distinct.
pub fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_deterministic_sized_and_seeded() {
        assert_eq!(payload(1000, 7), payload(1000, 7));
        assert_eq!(payload(1000, 7).len(), 1000);
        assert_eq!(payload(3, 7), payload(1000, 7)[..3]);
        assert_ne!(payload(64, 1), payload(64, 2));
        assert!(payload(0, 1).is_empty());
    }

    #[test]
    fn digests_are_lowercase_hex_sha256() {
        assert_eq!(sha256_hex(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(hex(&[0x00, 0xab, 0x7f]), "00ab7f");
    }
}
