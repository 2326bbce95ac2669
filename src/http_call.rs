//! The few HTTP/1.1 calls the server makes (to its panel, to an auth callback): one
//! connection per call, over TLS for `https://`, with a deadline on the whole exchange and a
//! bound on the answer's size. hyper speaks the protocol; this file only dials and asks.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::Request;
use hyper::header::{CONTENT_TYPE, ETAG, HOST, IF_NONE_MATCH, USER_AGENT};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// A panel's (or callback's) base URL: `http[s]://HOST[:PORT][/PATH]`.
#[derive(Clone)]
pub struct Endpoint {
    host: String,
    port: u16,
    /// The path below the host, without a trailing slash (may be empty).
    base: String,
    tls: Option<(tokio_rustls::TlsConnector, rustls::pki_types::ServerName<'static>)>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        write!(f, "{scheme}://{}:{}{}", self.host, self.port, self.base)
    }
}

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    #[error("bad URL {0:?}: expected http://HOST[:PORT][/PATH] or https://…")]
    BadUrl(String),
    #[error("TLS settings: {0}")]
    Tls(String),
    #[error("connect: {0}")]
    Connect(String),
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
    #[error("HTTP: {0}")]
    Http(String),
    #[error("the answer is over {0} bytes")]
    TooLarge(usize),
}

/// An answer: its status, its `ETag` and its body.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub etag: Option<String>,
    pub body: Bytes,
}

impl Endpoint {
    /// `extra_ca`: CA files trusted beside the web PKI (a panel with its own CA).
    pub fn parse(url: &str, extra_ca: &[std::path::PathBuf]) -> Result<Endpoint, CallError> {
        let bad = || CallError::BadUrl(url.to_string());
        let (tls, rest) = if let Some(rest) = url.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("http://") {
            (false, rest)
        } else {
            return Err(bad());
        };
        let (authority, base) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        if authority.is_empty() || authority.contains('@') || base.contains(['?', '#']) {
            return Err(bad());
        }
        let default_port = if tls { 443 } else { 80 };
        let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
            let (host, after) = bracketed.split_once(']').ok_or_else(bad)?;
            let port = match after {
                "" => default_port,
                _ => after.strip_prefix(':').and_then(|p| p.parse().ok()).ok_or_else(bad)?,
            };
            (host.to_string(), port)
        } else {
            match authority.split_once(':') {
                Some((host, port)) => (host.to_string(), port.parse().map_err(|_| bad())?),
                None => (authority.to_string(), default_port),
            }
        };
        if host.is_empty() {
            return Err(bad());
        }
        let tls = if tls {
            let trust = crate::client::tls::Trust::Roots { extra_ca: extra_ca.to_vec() };
            let config = crate::client::tls::client_config(&trust).map_err(|e| CallError::Tls(e.to_string()))?;
            let name = rustls::pki_types::ServerName::try_from(host.clone()).map_err(|_| bad())?;
            Some((tokio_rustls::TlsConnector::from(Arc::<rustls::ClientConfig>::clone(&config)), name))
        } else {
            None
        };
        Ok(Endpoint { host, port, base: base.trim_end_matches('/').to_string(), tls })
    }

    /// `METHOD BASE+PATH_AND_QUERY`, with `body` as JSON when given and `If-None-Match`
    /// when `etag` is; the whole exchange within `deadline`, an answer of at most `limit` bytes.
    pub async fn call(
        &self,
        method: hyper::Method,
        path_and_query: &str,
        body: Option<Vec<u8>>,
        etag: Option<&str>,
        deadline: Duration,
        limit: usize,
    ) -> Result<Answer, CallError> {
        tokio::time::timeout(deadline, self.exchange(method, path_and_query, body, etag, limit))
            .await
            .map_err(|_| CallError::TimedOut(deadline))?
    }

    async fn exchange(
        &self,
        method: hyper::Method,
        path_and_query: &str,
        body: Option<Vec<u8>>,
        etag: Option<&str>,
        limit: usize,
    ) -> Result<Answer, CallError> {
        let tcp =
            TcpStream::connect((self.host.as_str(), self.port)).await.map_err(|e| CallError::Connect(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{path_and_query}", self.base))
            .header(HOST, self.authority())
            .header(USER_AGENT, concat!("anytls-rs/", env!("CARGO_PKG_VERSION")));
        if let Some(etag) = etag {
            request = request.header(IF_NONE_MATCH, etag);
        }
        if body.is_some() {
            request = request.header(CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| CallError::Http(e.to_string()))?;
        match &self.tls {
            Some((connector, name)) => {
                let tls = connector.connect(name.clone(), tcp).await.map_err(|e| CallError::Connect(e.to_string()))?;
                send(TokioIo::new(tls), request, limit).await
            }
            None => send(TokioIo::new(tcp), request, limit).await,
        }
    }

    fn authority(&self) -> String {
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        let default = if self.tls.is_some() { 443 } else { 80 };
        if self.port == default { host } else { format!("{host}:{}", self.port) }
    }
}

async fn send<IO>(io: IO, request: Request<Full<Bytes>>, limit: usize) -> Result<Answer, CallError>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(io).await.map_err(|e| CallError::Http(e.to_string()))?;
    // The connection is driven beside the request and ends with it (no keep-alive).
    let driver = tokio::spawn(connection);
    let response = sender.send_request(request).await.map_err(|e| CallError::Http(e.to_string()));
    let answer = async {
        let response = response?;
        let status = response.status().as_u16();
        let etag = response.headers().get(ETAG).and_then(|v| v.to_str().ok()).map(str::to_string);
        let body = Limited::new(response.into_body(), limit)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    CallError::TooLarge(limit)
                } else {
                    CallError::Http(e.to_string())
                }
            })?
            .to_bytes();
        Ok(Answer { status, etag, body })
    }
    .await;
    driver.abort();
    answer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_to_host_port_and_base() {
        let e = Endpoint::parse("http://127.0.0.1:8080/panel/", &[]).unwrap();
        assert_eq!(format!("{e:?}"), "http://127.0.0.1:8080/panel");
        let e = Endpoint::parse("https://panel.example", &[]).unwrap();
        assert_eq!(format!("{e:?}"), "https://panel.example:443");
        assert_eq!(e.authority(), "panel.example");
        let e = Endpoint::parse("http://[::1]:9/", &[]).unwrap();
        assert_eq!((e.host.as_str(), e.port, e.authority()), ("::1", 9, "[::1]:9".to_string()));
        for bad in ["ftp://x", "http://", "http://user@host/", "http://h:port/", "http://h/?q", "panel.example"] {
            assert!(Endpoint::parse(bad, &[]).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_call_gets_status_etag_and_body_and_is_bounded() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let mut head = vec![0u8; 4096];
                let n = tcp.read(&mut head).await.unwrap_or(0);
                let text = String::from_utf8_lossy(&head[..n]).to_string();
                let answer = if text.contains("If-None-Match: \"v1\"") || text.contains("if-none-match: \"v1\"") {
                    "HTTP/1.1 304 Not Modified\r\nContent-Length: 0\r\n\r\n".to_string()
                } else if text.starts_with("GET /base/big") {
                    format!("HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n{}", "x".repeat(5000))
                } else {
                    "HTTP/1.1 200 OK\r\nETag: \"v1\"\r\nContent-Length: 2\r\n\r\n{}".to_string()
                };
                let _ = tcp.write_all(answer.as_bytes()).await;
            }
        });
        let endpoint = Endpoint::parse(&format!("http://{address}/base"), &[]).unwrap();
        let second = Duration::from_secs(2);
        let answer = endpoint.call(hyper::Method::GET, "/x?a=1", None, None, second, 1024).await.unwrap();
        assert_eq!((answer.status, answer.etag.as_deref(), &answer.body[..]), (200, Some("\"v1\""), &b"{}"[..]));
        let again = endpoint.call(hyper::Method::GET, "/x", None, Some("\"v1\""), second, 1024).await.unwrap();
        assert_eq!(again.status, 304);
        let big = endpoint.call(hyper::Method::GET, "/big", None, None, second, 1024).await.unwrap_err();
        assert_eq!(big, CallError::TooLarge(1024));
        let closed = Endpoint::parse(&format!("http://{}", closed_port()), &[]).unwrap();
        assert!(matches!(
            closed.call(hyper::Method::GET, "/", None, None, second, 1024).await,
            Err(CallError::Connect(_))
        ));
    }

    fn closed_port() -> std::net::SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    }
}
