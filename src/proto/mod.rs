//! The AnyTLS wire format as pure code over bytes: no sockets, no tokio.
//!
//! Everything here follows `docs/protocol.md`; the session layer
//! (`crate::session`) and the two services compose it with I/O.

pub mod address;
pub mod auth;
pub mod decode;
pub mod frame;
pub mod padding;
pub mod settings;
pub mod udp;

pub use address::{Address, AddressError};
pub use auth::{AUTH_HASH_LEN, PasswordHash};
pub use decode::Decoder;
pub use frame::{Command, Frame, FrameDecoder, FrameError, HEADER_LEN, MAX_FRAME_DATA};
pub use padding::{PaddingScheme, RecordPlan, SchemeError};
pub use settings::Settings;
