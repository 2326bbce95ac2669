//! The one TLS crypto provider both ends use: rustls on aws-lc-rs, with the key
//! exchange groups in the order current browsers and Go clients offer them.
//!
//! aws-lc-rs rather than ring because it has the X25519MLKEM768 hybrid: a client
//! offering only classical groups stands out among today's ClientHellos, and AnyTLS
//! exists to look ordinary. Record encryption costs the same with either provider on
//! x86-64 (measurements in docs/crypto-provider.md).

use rustls::crypto::CryptoProvider;
use rustls::crypto::SupportedKxGroup;
use rustls::crypto::aws_lc_rs::{self, kx_group};

/// Key exchange groups, most preferred first. The client sends a key share for the
/// first one and, as Chrome and Go do, for X25519 alone (the hybrid's classical half,
/// so a server without ML-KEM needs no second round trip). The server picks the first
/// of these that the client offered a share for.
pub const KX_GROUPS: &[&dyn SupportedKxGroup] =
    &[kx_group::X25519MLKEM768, kx_group::X25519, kx_group::SECP256R1, kx_group::SECP384R1];

/// The provider for every client and server configuration.
pub fn provider() -> CryptoProvider {
    CryptoProvider { kx_groups: KX_GROUPS.to_vec(), ..aws_lc_rs::default_provider() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::NamedGroup;

    #[test]
    fn the_hybrid_comes_first_and_x25519_second() {
        let groups: Vec<NamedGroup> = provider().kx_groups.iter().map(|g| g.name()).collect();
        assert_eq!(groups[..2], [NamedGroup::X25519MLKEM768, NamedGroup::X25519]);
    }
}
