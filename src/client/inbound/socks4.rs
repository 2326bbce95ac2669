//! SOCKS4 and SOCKS4a: CONNECT only, and only without credentials (it carries none).

use std::io;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::{Credentials, Exactly, Inbound, InboundError, NulTerminated, Protocol, Request, read_item};
use crate::client::error::OpenFailure;
use crate::framed::ReadError;
use crate::proto::Address;

/// `VN CD DSTPORT DSTIP`.
const HEADER_LEN: usize = 8;
/// Longest user id or host name: 512 bytes and its NUL.
const MAX_FIELD: usize = 512 + 1;

const REFUSED: [u8; 8] = [0, 0x5b, 0, 0, 0, 0, 0, 0];

pub(super) struct Socks4;

impl Inbound for Socks4 {
    async fn read_request(
        tcp: &mut TcpStream,
        buf: BytesMut,
        credentials: Option<&Credentials>,
    ) -> Result<Request, InboundError> {
        let (header, buf) = read_item(tcp, buf, Exactly(HEADER_LEN), HEADER_LEN).await?;
        // SOCKS4 carries no password: with credentials configured it is refused outright.
        if credentials.is_some() {
            tcp.write_all(&REFUSED).await?;
            return Err(InboundError::AuthFailed);
        }
        if header[1] != 1 {
            tcp.write_all(&REFUSED).await?;
            return Err(InboundError::Unsupported(header[1]));
        }
        let port = u16::from_be_bytes([header[2], header[3]]);
        let ip = [header[4], header[5], header[6], header[7]];
        let (_user_id, buf) = read_field(tcp, buf).await?;
        // SOCKS4a: 0.0.0.x (x ≠ 0) means a domain name follows the user id.
        let (destination, early_data) = if ip[..3] == [0, 0, 0] && ip[3] != 0 {
            let (name, buf) = read_field(tcp, buf).await?;
            (Address::domain(&String::from_utf8_lossy(&name), port), buf)
        } else {
            (Address::socket((ip, port).into()), buf)
        };
        Ok(Request { protocol: Protocol::Socks4, destination, early_data })
    }

    async fn reply_success(tcp: &mut TcpStream, _request: &Request) -> io::Result<()> {
        tcp.write_all(&[0, 0x5a, 0, 0, 0, 0, 0, 0]).await
    }

    async fn reply_failure(tcp: &mut TcpStream, _request: &Request, _failure: &OpenFailure) -> io::Result<()> {
        tcp.write_all(&REFUSED).await
    }
}

/// A NUL-terminated field, bounded.
async fn read_field(tcp: &mut TcpStream, buf: BytesMut) -> Result<(BytesMut, BytesMut), InboundError> {
    match read_item(tcp, buf, NulTerminated, MAX_FIELD).await {
        Err(ReadError::TooLong { .. }) => Err(InboundError::Malformed("SOCKS4 field too long".into())),
        read => Ok(read?),
    }
}
