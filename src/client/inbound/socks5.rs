//! SOCKS5 (RFC 1928) with optional username/password (RFC 1929): CONNECT and UDP
//! ASSOCIATE; BIND is refused.

use std::io;

use bytes::{Buf, BytesMut};
use subtle::ConstantTimeEq;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::{Credentials, Inbound, InboundError, Protocol, Request, read_item};
use crate::client::error::OpenFailure;
use crate::framed::ReadError;
use crate::proto::Decoder;
use crate::proto::address::{Address, AddressError};

/// Greeting: version, method count, up to 255 methods.
const MAX_GREETING: usize = 2 + 255;
/// Username/password: version, two length-prefixed fields of up to 255 bytes.
const MAX_USER_PASS: usize = 3 + 255 + 255;
/// Request: version, command, reserved, then the longest address.
const MAX_REQUEST: usize = 3 + 1 + 1 + 255 + 2;

pub(super) struct Socks5;

impl Inbound for Socks5 {
    async fn read_request(
        tcp: &mut TcpStream,
        buf: BytesMut,
        credentials: Option<&Credentials>,
    ) -> Result<Request, InboundError> {
        let (methods, buf) = read_item(tcp, buf, Greeting, MAX_GREETING).await?;
        let Some(method) = choose_method(&methods, credentials.is_some()) else {
            tcp.write_all(&[5, 0xff]).await?;
            return Err(InboundError::Malformed("no acceptable SOCKS5 authentication method".into()));
        };
        tcp.write_all(&[5, method]).await?;
        let buf = if method == 2 {
            let ((user, pass), buf) = read_item(tcp, buf, UserPass, MAX_USER_PASS).await?;
            let accepted = credentials.is_none_or(|c| c.matches(&user, &pass));
            tcp.write_all(&[1, if accepted { 0 } else { 1 }]).await?;
            if !accepted {
                return Err(InboundError::AuthFailed);
            }
            buf
        } else {
            buf
        };
        match read_item(tcp, buf, RequestHead, MAX_REQUEST).await {
            Ok(((protocol, destination), early_data)) => Ok(Request { protocol, destination, early_data }),
            Err(ReadError::Decode(RequestError::Version(version))) => {
                Err(InboundError::Malformed(format!("SOCKS5 request with version {version}")))
            }
            Err(ReadError::Decode(RequestError::Command(command))) => {
                // BIND is not offered: "command not supported".
                tcp.write_all(&[5, 0x07, 0, 1, 0, 0, 0, 0, 0, 0]).await?;
                Err(InboundError::Unsupported(command))
            }
            Err(ReadError::Decode(RequestError::Address(err))) => {
                tcp.write_all(&[5, 0x08, 0, 1, 0, 0, 0, 0, 0, 0]).await?;
                Err(InboundError::Malformed(err.to_string()))
            }
            Err(err) => Err(err.into()),
        }
    }

    async fn reply_success(tcp: &mut TcpStream, _request: &Request) -> io::Result<()> {
        tcp.write_all(&[5, 0, 0, 1, 0, 0, 0, 0, 0, 0]).await
    }

    async fn reply_failure(tcp: &mut TcpStream, _request: &Request, failure: &OpenFailure) -> io::Result<()> {
        tcp.write_all(&[5, failure.reply().socks5, 0, 1, 0, 0, 0, 0, 0, 0]).await
    }
}

/// With credentials configured only username/password is acceptable; without,
/// no-auth is preferred but a client that only offers username/password is let in.
fn choose_method(methods: &[u8], credentials_required: bool) -> Option<u8> {
    if credentials_required {
        methods.contains(&2).then_some(2)
    } else if methods.contains(&0) {
        Some(0)
    } else {
        methods.contains(&2).then_some(2)
    }
}

impl Credentials {
    /// Compares both fields without stopping at the first difference (and always both).
    fn matches(&self, user: &str, pass: &str) -> bool {
        let user_ok = self.username.as_bytes().ct_eq(user.as_bytes());
        let pass_ok = self.password.as_bytes().ct_eq(pass.as_bytes());
        (user_ok & pass_ok).into()
    }
}

/// `VER NMETHODS METHODS…`: the methods offered. The version byte was checked by the dispatch.
struct Greeting;

impl Decoder for Greeting {
    type Item = Vec<u8>;
    type Error = std::convert::Infallible;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Vec<u8>>, Self::Error> {
        let Some(&count) = buf.get(1) else { return Ok(None) };
        let Some(methods) = buf.get(2..2 + count as usize) else { return Ok(None) };
        let methods = methods.to_vec();
        buf.advance(2 + count as usize);
        Ok(Some(methods))
    }
}

/// `VER ULEN USER PLEN PASS` (RFC 1929); the version byte is not checked, as before.
struct UserPass;

impl Decoder for UserPass {
    type Item = (String, String);
    type Error = std::convert::Infallible;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<(String, String)>, Self::Error> {
        let Some(&user_len) = buf.get(1) else { return Ok(None) };
        let user_end = 2 + user_len as usize;
        let Some(&pass_len) = buf.get(user_end) else { return Ok(None) };
        let pass_end = user_end + 1 + pass_len as usize;
        if buf.len() < pass_end {
            return Ok(None);
        }
        let user = String::from_utf8_lossy(&buf[2..user_end]).into_owned();
        let pass = String::from_utf8_lossy(&buf[user_end + 1..pass_end]).into_owned();
        buf.advance(pass_end);
        Ok(Some((user, pass)))
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
enum RequestError {
    #[error("SOCKS5 request with version {0}")]
    Version(u8),
    #[error("unsupported command {0}")]
    Command(u8),
    #[error("{0}")]
    Address(AddressError),
}

/// `VER CMD RSV` and the destination. Version and command are judged once the first
/// four bytes are in, before the address is waited for.
struct RequestHead;

impl Decoder for RequestHead {
    type Item = (Protocol, Address);
    type Error = RequestError;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<(Protocol, Address)>, RequestError> {
        if buf.len() < 4 {
            return Ok(None);
        }
        if buf[0] != 5 {
            return Err(RequestError::Version(buf[0]));
        }
        let protocol = match buf[1] {
            1 => Protocol::Socks5,
            3 => Protocol::Socks5UdpAssociate,
            other => return Err(RequestError::Command(other)),
        };
        let Some((destination, used)) = Address::decode_prefix(&buf[3..]).map_err(RequestError::Address)? else {
            return Ok(None);
        };
        buf.advance(3 + used);
        Ok(Some((protocol, destination)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::decode::checks::{decode_bytewise, decode_whole};

    #[test]
    fn the_method_follows_the_credentials() {
        assert_eq!(choose_method(&[0, 2], false), Some(0));
        assert_eq!(choose_method(&[2], false), Some(2));
        assert_eq!(choose_method(&[0, 2], true), Some(2));
        assert_eq!(choose_method(&[0], true), None);
        assert_eq!(choose_method(&[], false), None);
    }

    #[test]
    fn greeting_and_credentials_decode_in_pieces() {
        assert_eq!(decode_bytewise(&mut Greeting, &[5, 2, 0, 2, 9]), (vec![vec![0, 2]], Ok(1)));
        let user_pass = [1, 3, b'b', b'o', b'b', 2, b'p', b'w'];
        assert_eq!(decode_bytewise(&mut UserPass, &user_pass), (vec![("bob".into(), "pw".into())], Ok(0)));
        let credentials = Credentials { username: "bob".into(), password: "pw".into() };
        assert!(credentials.matches("bob", "pw"));
        assert!(!credentials.matches("bob", "pW"));
        assert!(!credentials.matches("bo", "pw"));
    }

    #[test]
    fn requests_are_judged_before_their_address_arrives() {
        let connect = [5, 1, 0, 1, 127, 0, 0, 1, 0, 80, b'x'];
        let (requests, left) = decode_bytewise(&mut RequestHead, &connect);
        assert_eq!(requests, vec![(Protocol::Socks5, Address::socket("127.0.0.1:80".parse().unwrap()))]);
        assert_eq!(left, Ok(1));
        assert_eq!(decode_whole(&mut RequestHead, &[5, 2, 0, 1]).1, Err(RequestError::Command(2)));
        assert_eq!(decode_whole(&mut RequestHead, &[4, 1, 0, 1]).1, Err(RequestError::Version(4)));
        assert_eq!(
            decode_whole(&mut RequestHead, &[5, 3, 0, 9]).1,
            Err(RequestError::Address(AddressError::UnknownType(9)))
        );
        assert_eq!(decode_whole(&mut RequestHead, &[5, 1, 0]).1, Ok(3));
    }
}
