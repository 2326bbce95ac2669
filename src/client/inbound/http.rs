//! HTTP proxy: `CONNECT host:port`, and plain absolute-form requests forwarded with
//! the head rewritten; optional Basic proxy authorization.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::{BufMut, BytesMut};
use subtle::ConstantTimeEq;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::{Credentials, Inbound, InboundError, Protocol, Request, read_item};
use crate::client::error::OpenFailure;
use crate::framed::ReadError;
use crate::proto::{Address, Decoder};

/// Largest HTTP request head we accept.
const MAX_HTTP_HEAD: usize = 16 * 1024;

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

pub(super) struct Http;

impl Inbound for Http {
    async fn read_request(
        tcp: &mut TcpStream,
        buf: BytesMut,
        credentials: Option<&Credentials>,
    ) -> Result<Request, InboundError> {
        // A head of exactly the limit is still read whole; one byte more is refused.
        let (head, rest) = match read_item(tcp, buf, HeadEnd, MAX_HTTP_HEAD + 1).await {
            Ok(read) => read,
            Err(ReadError::TooLong { .. }) => {
                tcp.write_all(b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\n\r\n").await?;
                return Err(InboundError::Malformed("HTTP request head too large".into()));
            }
            Err(err) => return Err(err.into()),
        };
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
        early_data.extend_from_slice(&rest);
        Ok(Request { protocol: parsed.protocol, destination: parsed.destination, early_data })
    }

    async fn reply_success(tcp: &mut TcpStream, request: &Request) -> io::Result<()> {
        match request.protocol {
            Protocol::HttpConnect => tcp.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").await,
            // A forwarded request is answered by the destination itself.
            _ => Ok(()),
        }
    }

    async fn reply_failure(tcp: &mut TcpStream, _request: &Request, failure: &OpenFailure) -> io::Result<()> {
        let body = format!("{failure}\n");
        let response = format!(
            "HTTP/1.1 {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            failure.reply().http,
            body.len()
        );
        tcp.write_all(response.as_bytes()).await
    }
}

/// The request head, up to and with its blank line.
struct HeadEnd;

impl Decoder for HeadEnd {
    type Item = BytesMut;
    type Error = std::convert::Infallible;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<BytesMut>, Self::Error> {
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else { return Ok(None) };
        Ok(Some(buf.split_to(end + 4)))
    }
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
/// (the scheme is case-insensitive, RFC 9110 §11.1). Only canonical padded base64 is
/// taken (RFC 4648 §4): no missing padding, no stray bits in the last character.
fn basic_matches(value: &str, credentials: &Credentials) -> bool {
    let Some((scheme, encoded)) = value.trim().split_once(' ') else { return false };
    let Ok(given) = STANDARD.decode(encoded.trim()) else { return false };
    let expected = format!("{}:{}", credentials.username, credentials.password);
    scheme.eq_ignore_ascii_case("basic") && bool::from(given.ct_eq(expected.as_bytes()))
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
        assert_eq!(STANDARD.encode(b""), "");
        assert_eq!(STANDARD.encode(b"f"), "Zg==");
        assert_eq!(STANDARD.encode(b"fo"), "Zm8=");
        assert_eq!(STANDARD.encode(b"foo"), "Zm9v");
        assert_eq!(STANDARD.encode(b"Aladdin:open sesame"), "QWxhZGRpbjpvcGVuIHNlc2FtZQ==");
        let credentials = Credentials { username: "Aladdin".into(), password: "open sesame".into() };
        assert!(basic_matches("Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==", &credentials));
        assert!(basic_matches("basic  QWxhZGRpbjpvcGVuIHNlc2FtZQ==", &credentials));
        assert!(!basic_matches("Basic QWxhZGRpbjpvcGVuIHNlc2FtZR==", &credentials));
        assert!(!basic_matches("Bearer QWxhZGRpbjpvcGVuIHNlc2FtZQ==", &credentials));
        assert!(!basic_matches("", &credentials));
    }

    #[test]
    fn only_canonical_padded_base64_is_taken() {
        let credentials = Credentials { username: "a".into(), password: "b".into() };
        // "a:b" is three bytes: no padding at all.
        assert!(basic_matches("Basic YTpi", &credentials));
        let short = Credentials { username: "a".into(), password: "".into() };
        assert!(basic_matches("Basic YTo=", &short));
        assert!(!basic_matches("Basic YTo", &short), "padding may not be left out");
        assert!(!basic_matches("Basic YTp=", &short), "stray bits in the last character");
        assert!(!basic_matches("Basic YTo==", &short));
        assert!(!basic_matches("Basic YT o=", &short));
        assert!(!basic_matches("BasicYTo=", &short));
    }

    #[test]
    fn the_head_ends_at_its_blank_line() {
        use crate::proto::decode::checks::decode_bytewise;
        let (heads, left) = decode_bytewise(&mut HeadEnd, b"GET http://a/ HTTP/1.1\r\n\r\nbody");
        assert_eq!(heads, vec![BytesMut::from("GET http://a/ HTTP/1.1\r\n\r\n")]);
        assert_eq!(left, Ok(4));
    }
}
