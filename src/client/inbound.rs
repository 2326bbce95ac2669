//! The local proxy port: SOCKS5, SOCKS4/4a and HTTP proxy on one port; the first
//! byte decides (5, 4, or anything else for HTTP).

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::proto::Address;

/// Largest HTTP request head we accept.
const MAX_HTTP_HEAD: usize = 16 * 1024;

/// Optional SOCKS5 username/password required of local clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Socks5,
    /// SOCKS5 UDP ASSOCIATE: `destination` is where the app will send from (often 0.0.0.0:0).
    Socks5UdpAssociate,
    Socks4,
    HttpConnect,
    /// A plain `GET http://…` request: forwarded with the head rewritten.
    HttpForward,
}

/// A local client's request, read and ready to be answered.
#[derive(Debug)]
pub struct Request {
    protocol: Protocol,
    pub destination: Address,
    /// Bytes for the destination that arrived with the request (for a forwarded
    /// HTTP request: its rewritten head and any body bytes).
    pub early_data: BytesMut,
}

/// Why a stream could not be opened, as proxy protocols can say it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    General,
    NetworkUnreachable,
    HostUnreachable,
    Refused,
    TimedOut,
}

impl Failure {
    /// Maps a server's SYNACK error text (or our own error text) to a reply code.
    pub fn from_error_text(text: &str) -> Failure {
        let text = text.to_ascii_lowercase();
        if text.contains("refused") {
            Failure::Refused
        } else if text.contains("timed out") || text.contains("timeout") || text.contains("deadline") {
            Failure::TimedOut
        } else if text.contains("network unreachable") || text.contains("network is unreachable") {
            Failure::NetworkUnreachable
        } else if text.contains("unreachable")
            || text.contains("resolve")
            || text.contains("lookup")
            || text.contains("no such host")
        {
            Failure::HostUnreachable
        } else {
            Failure::General
        }
    }

    fn socks5_code(self) -> u8 {
        match self {
            Failure::General => 0x01,
            Failure::NetworkUnreachable => 0x03,
            Failure::HostUnreachable => 0x04,
            Failure::Refused => 0x05,
            Failure::TimedOut => 0x06,
        }
    }

    fn http_status(self) -> &'static str {
        match self {
            Failure::TimedOut => "504 Gateway Timeout",
            _ => "502 Bad Gateway",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InboundError {
    #[error("local client: {0}")]
    Io(#[from] std::io::Error),
    #[error("local client sent a malformed request: {0}")]
    Malformed(String),
    #[error("local client failed SOCKS5 authentication")]
    AuthFailed,
    #[error("local client asked for an unsupported command {0}")]
    Unsupported(u8),
}

/// Reads the request of whichever protocol the client speaks, answering the
/// protocol's own negotiation (SOCKS5 methods and authentication) on the way.
pub async fn read_request(tcp: &mut TcpStream, credentials: Option<&Credentials>) -> Result<Request, InboundError> {
    let mut buf = BytesMut::with_capacity(1024);
    fill(tcp, &mut buf, 1).await?;
    match buf[0] {
        5 => socks5(tcp, buf, credentials).await,
        4 => socks4(tcp, buf).await,
        _ => http(tcp, buf).await,
    }
}

impl Request {
    /// Whether this is a SOCKS5 UDP ASSOCIATE (served by `client::udp`).
    pub fn is_udp_associate(&self) -> bool {
        self.protocol == Protocol::Socks5UdpAssociate
    }

    /// Tells the local client the stream is open.
    pub async fn reply_success(&self, tcp: &mut TcpStream) -> std::io::Result<()> {
        match self.protocol {
            Protocol::Socks5 | Protocol::Socks5UdpAssociate => tcp.write_all(&[5, 0, 0, 1, 0, 0, 0, 0, 0, 0]).await,
            Protocol::Socks4 => tcp.write_all(&[0, 0x5a, 0, 0, 0, 0, 0, 0]).await,
            Protocol::HttpConnect => tcp.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").await,
            Protocol::HttpForward => Ok(()),
        }
    }

    /// Tells the local client why the stream could not be opened.
    pub async fn reply_failure(&self, tcp: &mut TcpStream, failure: Failure, detail: &str) -> std::io::Result<()> {
        match self.protocol {
            Protocol::Socks5 | Protocol::Socks5UdpAssociate => {
                tcp.write_all(&[5, failure.socks5_code(), 0, 1, 0, 0, 0, 0, 0, 0]).await
            }
            Protocol::Socks4 => tcp.write_all(&[0, 0x5b, 0, 0, 0, 0, 0, 0]).await,
            Protocol::HttpConnect | Protocol::HttpForward => {
                let body = format!("{detail}\n");
                let response = format!(
                    "HTTP/1.1 {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    failure.http_status(),
                    body.len()
                );
                tcp.write_all(response.as_bytes()).await
            }
        }
    }
}

/// Reads until `buf` holds at least `len` bytes.
async fn fill(tcp: &mut TcpStream, buf: &mut BytesMut, len: usize) -> Result<(), InboundError> {
    while buf.len() < len {
        if tcp.read_buf(buf).await? == 0 {
            return Err(InboundError::Malformed("connection closed mid-request".into()));
        }
    }
    Ok(())
}

async fn socks5(
    tcp: &mut TcpStream,
    mut buf: BytesMut,
    credentials: Option<&Credentials>,
) -> Result<Request, InboundError> {
    fill(tcp, &mut buf, 2).await?;
    let methods_len = buf[1] as usize;
    fill(tcp, &mut buf, 2 + methods_len).await?;
    let methods = buf[2..2 + methods_len].to_vec();
    buf.advance(2 + methods_len);
    // With credentials configured only username/password is acceptable; without,
    // no-auth is preferred but a client that only offers username/password is let in.
    let method = if credentials.is_some() {
        methods.contains(&2).then_some(2)
    } else if methods.contains(&0) {
        Some(0)
    } else {
        methods.contains(&2).then_some(2)
    };
    let Some(method) = method else {
        tcp.write_all(&[5, 0xff]).await?;
        return Err(InboundError::Malformed("no acceptable SOCKS5 authentication method".into()));
    };
    tcp.write_all(&[5, method]).await?;
    if method == 2 {
        fill(tcp, &mut buf, 2).await?;
        let user_len = buf[1] as usize;
        fill(tcp, &mut buf, 2 + user_len + 1).await?;
        let pass_len = buf[2 + user_len] as usize;
        fill(tcp, &mut buf, 3 + user_len + pass_len).await?;
        let user = String::from_utf8_lossy(&buf[2..2 + user_len]).into_owned();
        let pass = String::from_utf8_lossy(&buf[3 + user_len..3 + user_len + pass_len]).into_owned();
        buf.advance(3 + user_len + pass_len);
        let accepted = credentials.is_none_or(|c| c.username == user && c.password == pass);
        tcp.write_all(&[1, if accepted { 0 } else { 1 }]).await?;
        if !accepted {
            return Err(InboundError::AuthFailed);
        }
    }
    fill(tcp, &mut buf, 4).await?;
    let (version, command) = (buf[0], buf[1]);
    if version != 5 {
        return Err(InboundError::Malformed(format!("SOCKS5 request with version {version}")));
    }
    let protocol = match command {
        1 => Protocol::Socks5,
        3 => Protocol::Socks5UdpAssociate,
        // BIND is not offered: "command not supported".
        _ => {
            tcp.write_all(&[5, 0x07, 0, 1, 0, 0, 0, 0, 0, 0]).await?;
            return Err(InboundError::Unsupported(command));
        }
    };
    buf.advance(3);
    loop {
        match Address::decode(&buf) {
            Ok(Some((destination, used))) => {
                buf.advance(used);
                return Ok(Request { protocol, destination, early_data: buf });
            }
            Ok(None) => {
                let want = buf.len() + 1;
                fill(tcp, &mut buf, want).await?;
            }
            Err(err) => {
                tcp.write_all(&[5, 0x08, 0, 1, 0, 0, 0, 0, 0, 0]).await?;
                return Err(InboundError::Malformed(err.to_string()));
            }
        }
    }
}

async fn socks4(tcp: &mut TcpStream, mut buf: BytesMut) -> Result<Request, InboundError> {
    fill(tcp, &mut buf, 8).await?;
    if buf[1] != 1 {
        tcp.write_all(&[0, 0x5b, 0, 0, 0, 0, 0, 0]).await?;
        return Err(InboundError::Unsupported(buf[1]));
    }
    let port = u16::from_be_bytes([buf[2], buf[3]]);
    let ip = [buf[4], buf[5], buf[6], buf[7]];
    let user_end = read_until_nul(tcp, &mut buf, 8).await?;
    // SOCKS4a: 0.0.0.x (x ≠ 0) means a domain name follows the user id.
    let (destination, end) = if ip[..3] == [0, 0, 0] && ip[3] != 0 {
        let name_end = read_until_nul(tcp, &mut buf, user_end + 1).await?;
        let name = String::from_utf8_lossy(&buf[user_end + 1..name_end]).into_owned();
        (Address::domain(&name, port), name_end + 1)
    } else {
        (Address::socket((ip, port).into()), user_end + 1)
    };
    buf.advance(end);
    Ok(Request { protocol: Protocol::Socks4, destination, early_data: buf })
}

/// Index of the first NUL at or after `from`, reading more as needed (bounded).
async fn read_until_nul(tcp: &mut TcpStream, buf: &mut BytesMut, from: usize) -> Result<usize, InboundError> {
    loop {
        if let Some(pos) = buf.get(from..).and_then(|rest| rest.iter().position(|&b| b == 0)) {
            return Ok(from + pos);
        }
        if buf.len() > from + 512 {
            return Err(InboundError::Malformed("SOCKS4 field too long".into()));
        }
        let want = buf.len() + 1;
        fill(tcp, buf, want).await?;
    }
}

async fn http(tcp: &mut TcpStream, mut buf: BytesMut) -> Result<Request, InboundError> {
    let head_end = loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos + 4;
        }
        if buf.len() > MAX_HTTP_HEAD {
            tcp.write_all(b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\n\r\n").await?;
            return Err(InboundError::Malformed("HTTP request head too large".into()));
        }
        let want = buf.len() + 1;
        fill(tcp, &mut buf, want).await?;
    };
    let head = buf.split_to(head_end);
    match parse_http_head(&head) {
        Ok(request) => {
            let (protocol, destination, mut early_data) = request;
            early_data.extend_from_slice(&buf);
            Ok(Request { protocol, destination, early_data })
        }
        Err(why) => {
            tcp.write_all(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n").await?;
            Err(InboundError::Malformed(why))
        }
    }
}

/// Parses a proxy request head: `CONNECT host:port`, or an absolute-form request
/// rewritten to origin form with `Connection: close` (one request per connection,
/// since the next one may be for another host).
fn parse_http_head(head: &[u8]) -> Result<(Protocol, Address, BytesMut), String> {
    let text = std::str::from_utf8(head).map_err(|_| "HTTP head is not text".to_string())?;
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(format!("bad request line {request_line:?}"));
    };
    if method.eq_ignore_ascii_case("CONNECT") {
        let destination =
            crate::client::link::parse_server(target, 443).ok_or_else(|| format!("bad CONNECT target {target:?}"))?;
        return Ok((Protocol::HttpConnect, destination, BytesMut::new()));
    }
    let rest = target
        .strip_prefix("http://")
        .ok_or_else(|| format!("not a proxy request (target {target:?}); use CONNECT for https"))?;
    let (authority, path) = match rest.find('/') {
        Some(slash) => (&rest[..slash], &rest[slash..]),
        None => (rest, "/"),
    };
    let destination =
        crate::client::link::parse_server(authority, 80).ok_or_else(|| format!("bad host {authority:?}"))?;
    let mut out = BytesMut::with_capacity(head.len());
    out.put_slice(format!("{method} {path} {version}\r\n").as_bytes());
    for line in lines.filter(|l| !l.is_empty()) {
        let name = line.split(':').next().unwrap_or_default().trim().to_ascii_lowercase();
        if name.starts_with("proxy-") || name == "connection" || name == "keep-alive" {
            continue;
        }
        out.put_slice(line.as_bytes());
        out.put_slice(b"\r\n");
    }
    out.put_slice(b"Connection: close\r\n\r\n");
    Ok((Protocol::HttpForward, destination, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_head_gives_the_target() {
        let (protocol, destination, early) =
            parse_http_head(b"CONNECT example.com:443 HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert_eq!(protocol, Protocol::HttpConnect);
        assert_eq!(destination.to_string(), "example.com:443");
        assert!(early.is_empty());
    }

    #[test]
    fn absolute_request_is_rewritten_to_origin_form() {
        let head = b"GET http://127.0.0.1:8080/a?b=c HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nProxy-Connection: keep-alive\r\nAccept: */*\r\n\r\n";
        let (protocol, destination, early) = parse_http_head(head).unwrap();
        assert_eq!(protocol, Protocol::HttpForward);
        assert_eq!(destination.to_string(), "127.0.0.1:8080");
        assert_eq!(
            &early[..],
            b"GET /a?b=c HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn origin_form_requests_are_refused() {
        assert!(parse_http_head(b"GET / HTTP/1.1\r\n\r\n").is_err());
        assert!(parse_http_head(b"garbage\r\n\r\n").is_err());
    }

    #[test]
    fn server_error_texts_map_to_socks_codes() {
        assert_eq!(Failure::from_error_text("dial 1.2.3.4:1: connection refused").socks5_code(), 5);
        assert_eq!(Failure::from_error_text("dial x: timed out").socks5_code(), 6);
        assert_eq!(Failure::from_error_text("dial x: host unreachable (lookup failed)").socks5_code(), 4);
        assert_eq!(Failure::from_error_text("outbound pool exhausted").socks5_code(), 1);
    }
}
