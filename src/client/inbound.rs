//! The local proxy port: SOCKS5, SOCKS4/4a and HTTP proxy on one port; the first
//! byte decides (5, 4, or anything else for HTTP).

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use super::error::OpenFailure;
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
    #[error("local client sent a bad HTTP proxy request: {0}")]
    BadHttp(#[from] HeadError),
    #[error("local client sent no proxy authorization, or a wrong one")]
    ProxyAuthRequired,
    #[error("local client sent no complete request within {0:?}")]
    TimedOut(Duration),
}

/// Why an HTTP proxy request head was refused. The texts never quote the request: its
/// URL may carry credentials (`http://user:pw@host/`), and these texts are logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("the head is not text")]
    NotText,
    #[error("malformed request line")]
    BadRequestLine,
    #[error("not a proxy request (origin-form target); use CONNECT for https")]
    NotProxyRequest,
    #[error("CONNECT target: {0}")]
    BadConnectTarget(AuthorityError),
    #[error("URL authority: {0}")]
    BadUrlAuthority(AuthorityError),
}

/// What is wrong with a `[userinfo@]host[:port]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthorityError {
    #[error("no host")]
    NoHost,
    #[error("no port (CONNECT needs host:port)")]
    NoPort,
    #[error("the port is not a number from 1 to 65535")]
    BadPort,
    #[error("the host is neither an IP address nor a valid domain name")]
    BadHost,
}

/// Reads the request of whichever protocol the client speaks, answering the
/// protocol's own negotiation (SOCKS5 methods and authentication) on the way. A client
/// that has not finished its request `within` this time is given up on: an idle local
/// connection would otherwise hold a file descriptor for as long as it likes.
pub async fn read_request(
    tcp: &mut TcpStream,
    credentials: Option<&Credentials>,
    within: Duration,
) -> Result<Request, InboundError> {
    let read = async {
        let mut buf = BytesMut::with_capacity(1024);
        fill(tcp, &mut buf, 1).await?;
        match buf[0] {
            5 => socks5(tcp, buf, credentials).await,
            4 => socks4(tcp, buf, credentials).await,
            _ => http(tcp, buf, credentials).await,
        }
    };
    tokio::time::timeout(within, read).await.unwrap_or(Err(InboundError::TimedOut(within)))
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
    pub async fn reply_failure(&self, tcp: &mut TcpStream, failure: &OpenFailure) -> std::io::Result<()> {
        let reply = failure.reply();
        match self.protocol {
            Protocol::Socks5 | Protocol::Socks5UdpAssociate => {
                tcp.write_all(&[5, reply.socks5, 0, 1, 0, 0, 0, 0, 0, 0]).await
            }
            Protocol::Socks4 => tcp.write_all(&[0, 0x5b, 0, 0, 0, 0, 0, 0]).await,
            Protocol::HttpConnect | Protocol::HttpForward => {
                let body = format!("{failure}\n");
                let response = format!(
                    "HTTP/1.1 {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    reply.http,
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
        let accepted = credentials.is_none_or(|c| {
            same_bytes(c.username.as_bytes(), user.as_bytes()) & same_bytes(c.password.as_bytes(), pass.as_bytes())
        });
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

async fn socks4(
    tcp: &mut TcpStream,
    mut buf: BytesMut,
    credentials: Option<&Credentials>,
) -> Result<Request, InboundError> {
    fill(tcp, &mut buf, 8).await?;
    // SOCKS4 carries no password: with credentials configured it is refused outright.
    if credentials.is_some() {
        tcp.write_all(&[0, 0x5b, 0, 0, 0, 0, 0, 0]).await?;
        return Err(InboundError::AuthFailed);
    }
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

async fn http(
    tcp: &mut TcpStream,
    mut buf: BytesMut,
    credentials: Option<&Credentials>,
) -> Result<Request, InboundError> {
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
    let parsed = match parse_http_head(&head) {
        Ok(parsed) => parsed,
        Err(why) => {
            tcp.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await?;
            return Err(why.into());
        }
    };
    if let Some(credentials) = credentials
        && !parsed.proxy_authorization.as_deref().is_some_and(|given| basic_matches(given, credentials))
    {
        tcp.write_all(
            b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"anytls\"\r\n\
              Content-Length: 0\r\nConnection: close\r\n\r\n",
        )
        .await?;
        return Err(InboundError::ProxyAuthRequired);
    }
    let mut early_data = parsed.early_data;
    early_data.extend_from_slice(&buf);
    Ok(Request { protocol: parsed.protocol, destination: parsed.destination, early_data })
}

/// A parsed proxy request head.
#[derive(Debug)]
struct HttpHead {
    protocol: Protocol,
    destination: Address,
    /// For a forwarded request: the head rewritten to origin form.
    early_data: BytesMut,
    /// The `Proxy-Authorization` value, checked when the port has credentials.
    proxy_authorization: Option<String>,
}

/// Parses a proxy request head: `CONNECT host:port`, or an absolute-form request
/// rewritten to origin form with `Connection: close` (one request per connection,
/// since the next one may be for another host). Credentials in the URL
/// (`http://user:pw@host/`, RFC 9110 §4.2.4 forbids sending them) are dropped: they
/// are neither part of the destination nor forwarded.
fn parse_http_head(head: &[u8]) -> Result<HttpHead, HeadError> {
    let text = std::str::from_utf8(head).map_err(|_| HeadError::NotText)?;
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HeadError::BadRequestLine);
    };
    if method.is_empty() || !version.starts_with("HTTP/") {
        return Err(HeadError::BadRequestLine);
    }
    let header_lines: Vec<&str> = lines.filter(|line| !line.is_empty()).collect();
    let header_name = |line: &str| line.split(':').next().unwrap_or_default().trim().to_ascii_lowercase();
    let proxy_authorization = header_lines
        .iter()
        .find(|line| header_name(line) == "proxy-authorization")
        .and_then(|line| line.split_once(':'))
        .map(|(_, value)| value.trim().to_string());
    if method.eq_ignore_ascii_case("CONNECT") {
        let destination = parse_authority(target, None).map_err(HeadError::BadConnectTarget)?;
        return Ok(HttpHead {
            protocol: Protocol::HttpConnect,
            destination,
            early_data: BytesMut::new(),
            proxy_authorization,
        });
    }
    let rest = target
        .get(..7)
        .filter(|scheme| scheme.eq_ignore_ascii_case("http://"))
        .map(|_| &target[7..])
        .ok_or(HeadError::NotProxyRequest)?;
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let path = path.split('#').next().unwrap_or_default();
    let path = if path.starts_with('/') { path.to_string() } else { format!("/{path}") };
    let destination = parse_authority(authority, Some(80)).map_err(HeadError::BadUrlAuthority)?;
    let mut out = BytesMut::with_capacity(head.len());
    out.put_slice(format!("{method} {path} {version}\r\n").as_bytes());
    for line in header_lines {
        let name = header_name(line);
        if name.starts_with("proxy-") || name == "connection" || name == "keep-alive" {
            continue;
        }
        out.put_slice(line.as_bytes());
        out.put_slice(b"\r\n");
    }
    out.put_slice(b"Connection: close\r\n\r\n");
    Ok(HttpHead { protocol: Protocol::HttpForward, destination, early_data: out, proxy_authorization })
}

/// Parses `[userinfo@]host[:port]` strictly: userinfo is dropped, the host is an IPv4
/// address, a bracketed IPv6 address or a syntactically valid domain name, and the port
/// is 1–65535 (required when there is no `default_port`, as for CONNECT).
fn parse_authority(authority: &str, default_port: Option<u16>) -> Result<Address, AuthorityError> {
    let host_port = authority.rsplit_once('@').map_or(authority, |(_userinfo, host_port)| host_port);
    let (host, port) = split_host_port(host_port)?;
    let port = match port {
        None | Some("") => default_port.ok_or(AuthorityError::NoPort)?,
        Some(digits) => parse_port(digits)?,
    };
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        let ip: Ipv6Addr = v6.parse().map_err(|_| AuthorityError::BadHost)?;
        return Ok(Address::socket((ip, port).into()));
    }
    if host.is_empty() {
        return Err(AuthorityError::NoHost);
    }
    if let Ok(ip) = host.parse::<Ipv4Addr>() {
        return Ok(Address::socket((ip, port).into()));
    }
    if !is_domain_name(host) {
        return Err(AuthorityError::BadHost);
    }
    Ok(Address::domain(host, port))
}

/// `host`, `host:port`, `[v6]` or `[v6]:port` into the host (brackets kept) and the port text.
fn split_host_port(text: &str) -> Result<(&str, Option<&str>), AuthorityError> {
    if text.starts_with('[') {
        let close = text.find(']').ok_or(AuthorityError::BadHost)?;
        let (host, after) = text.split_at(close + 1);
        return match after {
            "" => Ok((host, None)),
            _ => Ok((host, Some(after.strip_prefix(':').ok_or(AuthorityError::BadHost)?))),
        };
    }
    match text.rsplit_once(':') {
        Some((host, _)) if host.contains(':') => Err(AuthorityError::BadHost),
        Some((host, port)) => Ok((host, Some(port))),
        None => Ok((text, None)),
    }
}

/// A port as decimal digits, 1–65535.
fn parse_port(digits: &str) -> Result<u16, AuthorityError> {
    if digits.is_empty() || digits.len() > 5 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(AuthorityError::BadPort);
    }
    match digits.parse::<u32>() {
        Ok(port @ 1..=65535) => Ok(port as u16),
        _ => Err(AuthorityError::BadPort),
    }
}

/// LDH labels (plus `_`, which real names use) of 1–63 characters, 253 in all, an
/// optional final dot.
fn is_domain_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Whether a `Proxy-Authorization` value is `Basic base64(user:pass)` for `credentials`
/// (the scheme is case-insensitive, RFC 9110 §11.1).
fn basic_matches(value: &str, credentials: &Credentials) -> bool {
    let Some((scheme, encoded)) = value.trim().split_once(' ') else { return false };
    let expected = base64(format!("{}:{}", credentials.username, credentials.password).as_bytes());
    scheme.eq_ignore_ascii_case("basic") && same_bytes(encoded.trim().as_bytes(), expected.as_bytes())
}

/// Compares without stopping at the first difference.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

/// Standard base64 with padding (RFC 4648 §4), for the one Basic credential we expect.
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_head_gives_the_target() {
        let head = parse_http_head(b"CONNECT example.com:443 HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert_eq!(head.protocol, Protocol::HttpConnect);
        assert_eq!(head.destination.to_string(), "example.com:443");
        assert!(head.early_data.is_empty());
        let v6 = parse_http_head(b"CONNECT [::1]:8443 HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(v6.destination.to_string(), "[::1]:8443");
    }

    #[test]
    fn absolute_request_is_rewritten_to_origin_form() {
        let head = b"GET http://127.0.0.1:8080/a?b=c HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nProxy-Connection: keep-alive\r\nAccept: */*\r\n\r\n";
        let parsed = parse_http_head(head).unwrap();
        assert_eq!(parsed.protocol, Protocol::HttpForward);
        assert_eq!(parsed.destination.to_string(), "127.0.0.1:8080");
        assert_eq!(
            &parsed.early_data[..],
            b"GET /a?b=c HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        );
        let query_only = parse_http_head(b"GET HTTP://example.com?q=1 HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(query_only.destination.to_string(), "example.com:80");
        assert!(query_only.early_data.starts_with(b"GET /?q=1 HTTP/1.1\r\n"));
    }

    #[test]
    fn origin_form_requests_are_refused() {
        assert_eq!(parse_http_head(b"GET / HTTP/1.1\r\n\r\n").unwrap_err(), HeadError::NotProxyRequest);
        assert_eq!(parse_http_head(b"garbage\r\n\r\n").unwrap_err(), HeadError::BadRequestLine);
        assert_eq!(parse_http_head(b"GET http://a/ HTTP/1.1 extra\r\n\r\n").unwrap_err(), HeadError::BadRequestLine);
    }

    #[test]
    fn credentials_in_the_url_are_dropped_and_never_quoted() {
        let parsed =
            parse_http_head(b"GET http://alice:s3cret@example.com:8080/x HTTP/1.1\r\nHost: example.com\r\n\r\n")
                .unwrap();
        assert_eq!(parsed.destination.to_string(), "example.com:8080");
        assert!(!String::from_utf8_lossy(&parsed.early_data).contains("s3cret"));
        let connect = parse_http_head(b"CONNECT alice:s3cret@example.com:443 HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(connect.destination.to_string(), "example.com:443");
        // A refused request's error text does not carry the URL either.
        let err = parse_http_head(b"GET http://alice:s3cret@bad_host!/ HTTP/1.1\r\n\r\n").unwrap_err();
        assert!(!InboundError::from(err).to_string().contains("s3cret"));
        let err = parse_http_head(b"CONNECT alice:s3cret HTTP/1.1\r\n\r\n").unwrap_err();
        assert!(!InboundError::from(err).to_string().contains("s3cret"), "{err}");
    }

    #[test]
    fn connect_targets_are_parsed_strictly() {
        let target = |t: &str| parse_authority(t, None);
        assert_eq!(target("127.0.0.1:99999"), Err(AuthorityError::BadPort));
        assert_eq!(target("127.0.0.1:0"), Err(AuthorityError::BadPort));
        assert_eq!(target("example.com:+443"), Err(AuthorityError::BadPort));
        assert_eq!(target("example.com:0443x"), Err(AuthorityError::BadPort));
        assert_eq!(target("example.com"), Err(AuthorityError::NoPort));
        assert_eq!(target(":443"), Err(AuthorityError::NoHost));
        assert_eq!(target("exa mple.com:443"), Err(AuthorityError::BadHost));
        assert_eq!(target("-bad.example:443"), Err(AuthorityError::BadHost));
        assert_eq!(target("a..b:443"), Err(AuthorityError::BadHost));
        assert_eq!(target("::1:443"), Err(AuthorityError::BadHost));
        assert_eq!(target("[::1:443"), Err(AuthorityError::BadHost));
        assert_eq!(target("[not-v6]:443"), Err(AuthorityError::BadHost));
        assert_eq!(target(&format!("{}:443", "a".repeat(64))), Err(AuthorityError::BadHost));
        assert_eq!(target("example.com:65535").unwrap().to_string(), "example.com:65535");
        assert_eq!(target("_srv.example.com.:1").unwrap().to_string(), "_srv.example.com.:1");
        assert_eq!(target("10.0.0.1:22").unwrap(), Address::socket("10.0.0.1:22".parse().unwrap()));
        assert_eq!(parse_authority("example.com:", Some(80)).unwrap().to_string(), "example.com:80");
        assert!(matches!(
            parse_http_head(b"CONNECT 127.0.0.1:99999 HTTP/1.1\r\n\r\n"),
            Err(HeadError::BadConnectTarget(AuthorityError::BadPort))
        ));
    }

    #[test]
    fn basic_proxy_credentials_are_checked() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"Aladdin:open sesame"), "QWxhZGRpbjpvcGVuIHNlc2FtZQ==");
        let credentials = Credentials { username: "Aladdin".into(), password: "open sesame".into() };
        assert!(basic_matches("Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==", &credentials));
        assert!(basic_matches("basic  QWxhZGRpbjpvcGVuIHNlc2FtZQ==", &credentials));
        assert!(!basic_matches("Basic QWxhZGRpbjpvcGVuIHNlc2FtZR==", &credentials));
        assert!(!basic_matches("Bearer QWxhZGRpbjpvcGVuIHNlc2FtZQ==", &credentials));
        assert!(!basic_matches("", &credentials));
    }

    #[tokio::test]
    async fn a_silent_local_client_is_given_up_on_at_the_deadline() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _silent = TcpStream::connect(addr).await.unwrap();
        let (mut accepted, _) = listener.accept().await.unwrap();
        let started = std::time::Instant::now();
        let result = read_request(&mut accepted, None, Duration::from_millis(200)).await;
        assert!(matches!(result, Err(InboundError::TimedOut(_))), "{result:?}");
        assert!(started.elapsed() < Duration::from_secs(2));

        // Half a SOCKS5 greeting is no better than none.
        let mut partial = TcpStream::connect(addr).await.unwrap();
        partial.write_all(&[5, 1]).await.unwrap();
        let (mut accepted, _) = listener.accept().await.unwrap();
        let result = read_request(&mut accepted, None, Duration::from_millis(200)).await;
        assert!(matches!(result, Err(InboundError::TimedOut(_))), "{result:?}");
    }
}
