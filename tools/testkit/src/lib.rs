//! What the end-to-end tests and the load generator both need to drive a proxy over
//! loopback: a small SOCKS5/SOCKS4a client ([`socks`]), local targets to send the
//! traffic to ([`target`]) and deterministic payloads with their digests ([`payload`]).
//!
//! It knows nothing of anytls itself, so the proxies it drives can be ours or anyone's.

pub mod payload;
pub mod socks;
pub mod target;
