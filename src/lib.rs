//! anytls-rs: an AnyTLS proxy server and client with selectable connection-pool engines.
pub mod pool;
