//! The one TLS crypto provider both ends use: rustls on aws-lc-rs, with the key
//! exchange groups and cipher suites in the order current browsers and Go clients offer
//! them (the ClientHello's lists come from here).
//!
//! aws-lc-rs rather than ring because it has the X25519MLKEM768 hybrid: a client
//! offering only classical groups stands out among today's ClientHellos, and AnyTLS
//! exists to look ordinary. Record encryption costs the same with either provider on
//! x86-64 (measurements in docs/crypto-provider.md).

use rustls::SupportedCipherSuite;
use rustls::crypto::CryptoProvider;
use rustls::crypto::SupportedKxGroup;
use rustls::crypto::aws_lc_rs::{self, cipher_suite, kx_group};

/// Key exchange groups, most preferred first. The client sends a key share for the
/// first one and, as Chrome and Go do, for X25519 alone (the hybrid's classical half,
/// so a server without ML-KEM needs no second round trip). The server picks the first
/// of these that the client offered a share for.
pub const KX_GROUPS: &[&dyn SupportedKxGroup] =
    &[kx_group::X25519MLKEM768, kx_group::X25519, kx_group::SECP256R1, kx_group::SECP384R1];

/// Cipher suites, most preferred first, as Chrome and Go (on CPUs with AES instructions)
/// order them: AES-128-GCM before AES-256-GCM before ChaCha20, ECDSA before RSA. aws-lc-rs
/// puts AES-256 first, which no common client does, and it costs more per byte. A server
/// follows the client's order, so this is also what our pair agrees on.
pub const CIPHER_SUITES: &[SupportedCipherSuite] = &[
    cipher_suite::TLS13_AES_128_GCM_SHA256,
    cipher_suite::TLS13_AES_256_GCM_SHA384,
    cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    cipher_suite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    cipher_suite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    cipher_suite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    cipher_suite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
];

/// The ALPN list the client offers: a browser's. No AnyTLS server needs one; a client
/// that offers none stands out among browsers (Go clients send none unless told).
pub const CLIENT_ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];

/// The provider for every client and server configuration.
pub fn provider() -> CryptoProvider {
    CryptoProvider {
        kx_groups: KX_GROUPS.to_vec(),
        cipher_suites: CIPHER_SUITES.to_vec(),
        ..aws_lc_rs::default_provider()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::NamedGroup;

    #[test]
    fn every_suite_of_the_default_provider_is_kept_only_reordered() {
        let mut ours: Vec<_> = provider().cipher_suites.iter().map(|s| s.suite()).collect();
        let mut theirs: Vec<_> = aws_lc_rs::default_provider().cipher_suites.iter().map(|s| s.suite()).collect();
        assert_eq!(ours[0], rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        ours.sort_by_key(|s| u16::from(*s));
        theirs.sort_by_key(|s| u16::from(*s));
        assert_eq!(ours, theirs);
    }

    #[test]
    fn the_hybrid_comes_first_and_x25519_second() {
        let groups: Vec<NamedGroup> = provider().kx_groups.iter().map(|g| g.name()).collect();
        assert_eq!(groups[..2], [NamedGroup::X25519MLKEM768, NamedGroup::X25519]);
    }
}
