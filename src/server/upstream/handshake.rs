//! The bytes of asking an upstream proxy for a connection, as its client: SOCKS5
//! (RFC 1928, with RFC 1929 username/password) and HTTP CONNECT (RFC 9110 §9.3.6).
//! Pure code over bytes: requests are built here, answers decoded here; the socket is
//! [`super`]'s.

use base64::Engine;
use bytes::{Buf, BufMut, BytesMut};

use crate::proto::Address;
use crate::proto::address::SOCKS_TYPES;
use crate::proto::decode::Decoder;

const SOCKS_VERSION: u8 = 0x05;
const NO_AUTH: u8 = 0x00;
const USERNAME_PASSWORD: u8 = 0x02;
const NO_ACCEPTABLE_METHOD: u8 = 0xFF;
const CONNECT: u8 = 0x01;

/// Why the upstream did not give the connection. The wording keeps the words clients
/// map to SOCKS codes ("refused", "unreachable", "timed out").
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("it is not a SOCKS5 proxy (version byte {0:#04x})")]
    NotSocks5(u8),
    #[error("it accepts none of the offered authentication methods")]
    NoAcceptableMethod,
    #[error("it chose authentication method {0:#04x}, which was not offered")]
    UnofferedMethod(u8),
    #[error("it refused the username and password")]
    BadCredentials,
    #[error("{0}")]
    Reply(SocksReply),
    #[error("it answered HTTP {0}")]
    HttpStatus(u16),
    #[error("its answer is not HTTP: {0:?}")]
    NotHttp(String),
    #[error("its answer has a malformed address")]
    BadAddress,
    #[error("a username or password longer than 255 bytes cannot be sent over SOCKS5")]
    CredentialsTooLong,
}

/// A SOCKS5 reply code other than success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocksReply(pub u8);

impl std::fmt::Display for SocksReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = match self.0 {
            0x01 => "general failure",
            0x02 => "connection not allowed by its rules",
            0x03 => "network unreachable",
            0x04 => "host unreachable",
            0x05 => "connection refused",
            0x06 => "TTL expired (timed out)",
            0x07 => "command not supported",
            0x08 => "address type not supported",
            _ => return write!(f, "SOCKS5 reply code {:#04x}", self.0),
        };
        f.write_str(text)
    }
}

/// A username and password for the upstream.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({:?}, <hidden>)", self.username)
    }
}

/// The SOCKS5 greeting: the methods we can do (username/password only when we have one).
pub fn socks5_greeting(credentials: Option<&Credentials>) -> Vec<u8> {
    match credentials {
        Some(_) => vec![SOCKS_VERSION, 2, NO_AUTH, USERNAME_PASSWORD],
        None => vec![SOCKS_VERSION, 1, NO_AUTH],
    }
}

/// The RFC 1929 request: version 1, then each field with its length.
pub fn socks5_password_request(credentials: &Credentials) -> Result<Vec<u8>, HandshakeError> {
    let (user, pass) = (credentials.username.as_bytes(), credentials.password.as_bytes());
    if user.len() > 255 || pass.len() > 255 {
        return Err(HandshakeError::CredentialsTooLong);
    }
    let mut out = Vec::with_capacity(3 + user.len() + pass.len());
    out.extend_from_slice(&[0x01, user.len() as u8]);
    out.extend_from_slice(user);
    out.push(pass.len() as u8);
    out.extend_from_slice(pass);
    Ok(out)
}

/// CONNECT to `destination`, its address in SOCKS form.
pub fn socks5_connect_request(destination: &Address) -> Vec<u8> {
    let mut out = Vec::with_capacity(3 + destination.encoded_len());
    out.extend_from_slice(&[SOCKS_VERSION, CONNECT, 0x00]);
    destination.encode_with(SOCKS_TYPES, &mut out);
    out
}

/// Whether the method the proxy chose needs the password step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    NoAuth,
    Password,
}

/// The proxy's choice of method (2 bytes), checked against what we offered.
pub struct MethodChoice {
    pub offered_password: bool,
}

impl Decoder for MethodChoice {
    type Item = Method;
    type Error = HandshakeError;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Method>, HandshakeError> {
        if buf.len() < 2 {
            return Ok(None);
        }
        let (version, method) = (buf[0], buf[1]);
        buf.advance(2);
        match (version, method) {
            (SOCKS_VERSION, NO_AUTH) => Ok(Some(Method::NoAuth)),
            (SOCKS_VERSION, USERNAME_PASSWORD) if self.offered_password => Ok(Some(Method::Password)),
            (SOCKS_VERSION, NO_ACCEPTABLE_METHOD) => Err(HandshakeError::NoAcceptableMethod),
            (SOCKS_VERSION, other) => Err(HandshakeError::UnofferedMethod(other)),
            (other, _) => Err(HandshakeError::NotSocks5(other)),
        }
    }
}

/// The RFC 1929 status (2 bytes): 0 is success.
pub struct PasswordStatus;

impl Decoder for PasswordStatus {
    type Item = ();
    type Error = HandshakeError;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<()>, HandshakeError> {
        if buf.len() < 2 {
            return Ok(None);
        }
        let status = buf[1];
        buf.advance(2);
        if status == 0 { Ok(Some(())) } else { Err(HandshakeError::BadCredentials) }
    }
}

/// The reply to CONNECT: version, code, reserved, then the bound address (read past,
/// not used).
pub struct ConnectReply;

impl Decoder for ConnectReply {
    type Item = ();
    type Error = HandshakeError;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<()>, HandshakeError> {
        if buf.len() < 3 {
            return Ok(None);
        }
        if buf[0] != SOCKS_VERSION {
            return Err(HandshakeError::NotSocks5(buf[0]));
        }
        if buf[1] != 0x00 {
            return Err(HandshakeError::Reply(SocksReply(buf[1])));
        }
        match Address::decode_prefix_with(SOCKS_TYPES, &buf[3..]) {
            Ok(None) => Ok(None),
            Ok(Some((_bound, len))) => {
                buf.advance(3 + len);
                Ok(Some(()))
            }
            Err(_) => Err(HandshakeError::BadAddress),
        }
    }
}

/// The CONNECT request head, with `Proxy-Authorization: Basic` when there are credentials.
pub fn http_connect_request(destination: &Address, credentials: Option<&Credentials>) -> Vec<u8> {
    let mut out = BytesMut::with_capacity(128).writer();
    use std::io::Write;
    let _ = write!(out, "CONNECT {destination} HTTP/1.1\r\nHost: {destination}\r\n");
    if let Some(Credentials { username, password }) = credentials {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"));
        let _ = write!(out, "Proxy-Authorization: Basic {token}\r\n");
    }
    let _ = write!(out, "\r\n");
    out.into_inner().to_vec()
}

/// The answer's head, up to its blank line: `Ok` for any 2xx status.
pub struct HttpConnectReply;

impl Decoder for HttpConnectReply {
    type Item = ();
    type Error = HandshakeError;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<()>, HandshakeError> {
        // The status line is checked as soon as it is whole, so a non-HTTP answer fails at once.
        if let Some(line_end) = buf.windows(2).position(|w| w == b"\r\n") {
            let line = String::from_utf8_lossy(&buf[..line_end]);
            let mut words = line.split(' ');
            let version = words.next().unwrap_or_default();
            let status = words.next().and_then(|code| code.parse::<u16>().ok());
            let Some(status) = status.filter(|_| version.starts_with("HTTP/1.")) else {
                return Err(HandshakeError::NotHttp(line.chars().take(80).collect()));
            };
            if !(200..300).contains(&status) {
                return Err(HandshakeError::HttpStatus(status));
            }
        } else if buf.len() >= 5 && !buf.starts_with(b"HTTP/") {
            return Err(HandshakeError::NotHttp(String::from_utf8_lossy(&buf[..buf.len().min(80)]).into_owned()));
        }
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else { return Ok(None) };
        buf.advance(end + 4);
        Ok(Some(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first item of `bytes` given whole, with how many bytes it left; `Ok(None)`: incomplete.
    fn first<D: Decoder>(decoder: &mut D, bytes: &[u8]) -> Result<Option<(D::Item, usize)>, D::Error> {
        let mut buf = BytesMut::from(bytes);
        Ok(decoder.decode(&mut buf)?.map(|item| (item, buf.len())))
    }

    /// As [`first`], the bytes fed one at a time until the item is whole.
    fn first_bytewise<D: Decoder>(decoder: &mut D, bytes: &[u8]) -> Result<Option<(D::Item, usize)>, D::Error> {
        let mut buf = BytesMut::new();
        for (i, &byte) in bytes.iter().enumerate() {
            buf.put_u8(byte);
            if let Some(item) = decoder.decode(&mut buf)? {
                return Ok(Some((item, bytes.len() - i - 1 + buf.len())));
            }
        }
        Ok(None)
    }

    fn alice() -> Credentials {
        Credentials { username: "alice".into(), password: "pw".into() }
    }

    #[test]
    fn the_greeting_offers_the_password_method_only_with_credentials() {
        assert_eq!(socks5_greeting(None), [5, 1, 0]);
        assert_eq!(socks5_greeting(Some(&alice())), [5, 2, 0, 2]);
    }

    #[test]
    fn the_password_request_carries_each_field_with_its_length() {
        assert_eq!(socks5_password_request(&alice()).unwrap(), b"\x01\x05alice\x02pw");
        let long = Credentials { username: "u".repeat(256), password: String::new() };
        assert_eq!(socks5_password_request(&long), Err(HandshakeError::CredentialsTooLong));
    }

    #[test]
    fn connect_requests_name_the_destination_in_socks_form() {
        assert_eq!(socks5_connect_request(&Address::domain("a.b", 443)), b"\x05\x01\x00\x03\x03a.b\x01\xbb");
        let v4 = Address::socket("10.0.0.1:80".parse().unwrap());
        assert_eq!(socks5_connect_request(&v4), b"\x05\x01\x00\x01\x0a\x00\x00\x01\x00\x50");
    }

    #[test]
    fn a_method_not_offered_or_refused_is_an_error() {
        let mut with = MethodChoice { offered_password: true };
        let mut without = MethodChoice { offered_password: false };
        assert_eq!(first(&mut with, &[5, 2]), Ok(Some((Method::Password, 0))));
        assert_eq!(first(&mut without, &[5, 0]), Ok(Some((Method::NoAuth, 0))));
        assert_eq!(first(&mut without, &[5, 2]), Err(HandshakeError::UnofferedMethod(2)));
        assert_eq!(first(&mut with, &[5, 0xff]), Err(HandshakeError::NoAcceptableMethod));
        assert_eq!(first(&mut with, b"HT"), Err(HandshakeError::NotSocks5(b'H')));
        assert_eq!(first(&mut with, &[5]), Ok(None));
    }

    #[test]
    fn the_password_status_is_success_only_at_zero() {
        assert_eq!(first(&mut PasswordStatus, &[1, 0]), Ok(Some(((), 0))));
        assert_eq!(first(&mut PasswordStatus, &[1, 1]), Err(HandshakeError::BadCredentials));
    }

    #[test]
    fn a_connect_reply_is_read_past_its_bound_address_and_leaves_what_follows() {
        let ipv4 = b"\x05\x00\x00\x01\x7f\x00\x00\x01\x04\x38banner";
        assert_eq!(first(&mut ConnectReply, ipv4), Ok(Some(((), 6))));
        assert_eq!(first_bytewise(&mut ConnectReply, ipv4), Ok(Some(((), 6))));
        let domain = b"\x05\x00\x00\x03\x04host\x00\x50";
        assert_eq!(first_bytewise(&mut ConnectReply, domain), Ok(Some(((), 0))));
        let ipv6 = [&[5u8, 0, 0, 4][..], &[0; 16], &[0, 80]].concat();
        assert_eq!(first_bytewise(&mut ConnectReply, &ipv6), Ok(Some(((), 0))));
        assert_eq!(first(&mut ConnectReply, &ipv6[..20]), Ok(None));
    }

    #[test]
    fn a_failed_connect_reply_keeps_its_code_in_words_clients_understand() {
        let refused = first(&mut ConnectReply, b"\x05\x05\x00\x01\0\0\0\0\0\0").unwrap_err();
        assert_eq!(refused.to_string(), "connection refused");
        let unreachable = first(&mut ConnectReply, b"\x05\x04\x00").unwrap_err();
        assert_eq!(unreachable.to_string(), "host unreachable");
        assert_eq!(SocksReply(0x42).to_string(), "SOCKS5 reply code 0x42");
        assert_eq!(first(&mut ConnectReply, b"\x05\x00\x00\x09"), Err(HandshakeError::BadAddress));
    }

    #[test]
    fn the_http_request_names_the_destination_and_its_credentials() {
        let plain = http_connect_request(&Address::domain("a.b", 443), None);
        assert_eq!(plain, b"CONNECT a.b:443 HTTP/1.1\r\nHost: a.b:443\r\n\r\n");
        let v6 = http_connect_request(&Address::socket("[::1]:80".parse().unwrap()), Some(&alice()));
        let text = String::from_utf8(v6).unwrap();
        assert!(text.starts_with("CONNECT [::1]:80 HTTP/1.1\r\nHost: [::1]:80\r\n"), "{text}");
        assert!(text.contains("Proxy-Authorization: Basic YWxpY2U6cHc=\r\n"), "{text}");
    }

    #[test]
    fn an_http_answer_is_accepted_at_2xx_and_what_follows_its_head_stays() {
        let ok = b"HTTP/1.1 200 Connection established\r\nVia: x\r\n\r\nSSH-2.0";
        assert_eq!(first(&mut HttpConnectReply, ok), Ok(Some(((), 7))));
        assert_eq!(first_bytewise(&mut HttpConnectReply, ok), Ok(Some(((), 7))));
        let denied = b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n";
        assert_eq!(first_bytewise(&mut HttpConnectReply, denied), Err(HandshakeError::HttpStatus(407)));
        assert!(matches!(first(&mut HttpConnectReply, b"\x05\x00\x00\x01\0"), Err(HandshakeError::NotHttp(_))));
        assert!(matches!(first(&mut HttpConnectReply, b"SSH-2.0-x\r\n"), Err(HandshakeError::NotHttp(_))));
        assert_eq!(first(&mut HttpConnectReply, b"HTTP/1.1 200 OK\r\n"), Ok(None));
    }

    proptest::proptest! {
        #[test]
        fn no_input_makes_a_decoder_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let _ = first_bytewise(&mut ConnectReply, &bytes);
            let _ = first_bytewise(&mut HttpConnectReply, &bytes);
            let _ = first_bytewise(&mut MethodChoice { offered_password: true }, &bytes);
            let _ = first(&mut PasswordStatus, &bytes);
        }

        #[test]
        fn a_reply_decodes_the_same_whole_or_bytewise_whatever_follows(
            tail in proptest::collection::vec(proptest::num::u8::ANY, 0..24),
        ) {
            let socks = [&b"\x05\x00\x00\x03\x04host\x00\x50"[..], &tail].concat();
            proptest::prop_assert_eq!(first(&mut ConnectReply, &socks), Ok(Some(((), tail.len()))));
            proptest::prop_assert_eq!(first_bytewise(&mut ConnectReply, &socks), Ok(Some(((), tail.len()))));
            let http = [&b"HTTP/1.0 200 OK\r\n\r\n"[..], &tail].concat();
            proptest::prop_assert_eq!(first(&mut HttpConnectReply, &http), Ok(Some(((), tail.len()))));
        }
    }
}
