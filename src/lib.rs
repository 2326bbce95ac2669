//! anytls-rs: an AnyTLS proxy server and client with selectable connection-pool engines.
//!
//! `proto` is the wire format (pure), `session` multiplexes streams over one
//! connection, `pool` holds the pool engines; `server` and `client` are the two services;
//! `framed` is the one read-until-decoded loop between sockets or streams and `proto`.

pub mod accept;
pub mod api;
pub mod cli;
pub mod client;
pub mod crypto;
pub mod fleet;
pub mod framed;
pub mod http_call;
pub mod keepalive;
pub mod logging;
pub mod metrics;
pub mod pool;
pub mod proto;
pub mod resources;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod store;
pub mod tcp_state;
