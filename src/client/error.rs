//! Why a local connection's stream could not be opened, and what its local client is told.
//!
//! Every failure between "request read" and "stream open" is an [`OpenFailure`]; the
//! SOCKS5 reply code and HTTP status for it are chosen in one place,
//! [`OpenFailure::reply`]. The only text that is ever interpreted is the server's SYNACK
//! refusal, because the wire carries nothing else: [`RefusalKind::of_server_text`] is
//! the one function that reads it.

use std::time::Duration;

use crate::session::{OpenError, SessionClosed};

/// Why no session to the server could be had.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("no server configured")]
    NoServer,
    #[error("connect to server {server}: timed out after {after:?}")]
    TcpTimeout { server: String, after: Duration },
    #[error("connect to server {server}: {source}")]
    Tcp { server: String, source: std::io::Error },
    #[error("TLS handshake with {server}: timed out after {after:?}")]
    TlsTimeout { server: String, after: Duration },
    /// `explanation` is [`super::tls::explain_handshake_error`]'s advice for the user.
    #[error("{server}: {explanation}")]
    Tls { server: String, explanation: String },
    #[error("{server}: send authentication: {source}")]
    Authenticate { server: String, source: std::io::Error },
}

impl ConnectError {
    fn timed_out(&self) -> bool {
        matches!(self, ConnectError::TcpTimeout { .. } | ConnectError::TlsTimeout { .. })
    }
}

/// What kind of refusal the server's SYNACK text describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    /// The target refused the connection (nothing listens there).
    TargetRefused,
    /// Dialling the target (or resolving its name) took too long.
    TargetTimedOut,
    /// The target's network cannot be reached.
    NetworkUnreachable,
    /// The target host cannot be reached or its name does not resolve.
    HostUnreachable,
    /// The server is at one of its own limits (streams, per-target connections).
    ServerBusy,
    /// Anything else: a malformed request, an unknown error.
    Other,
}

impl RefusalKind {
    /// Classifies the text a server put in a refusing SYNACK. The protocol carries only
    /// text, so this is the one place where error text is read. It knows our server's
    /// wording (`dial HOST:PORT: connection refused | timed out | host unreachable (…)`,
    /// `outbound pool for HOST:PORT exhausted`, `too many streams on this server …`), the
    /// anytls crate's (`session stream limit reached`) and Go's, which the reference
    /// server and sing-box send (`dial tcp …: connect: connection refused`, `i/o timeout`,
    /// `no such host`, `no route to host`).
    ///
    /// Words holding a `.` or `:` are host names, addresses or numbers and are skipped,
    /// so that a target named `refused.example.com` cannot steer the answer.
    pub fn of_server_text(text: &str) -> RefusalKind {
        let words: Vec<String> = text
            .split_whitespace()
            .map(|word| word.trim_matches(|c: char| matches!(c, '(' | ')' | ',' | ';' | '"' | '\'')))
            .map(|word| word.strip_suffix(':').unwrap_or(word))
            .filter(|word| !word.is_empty() && !word.contains(['.', ':']))
            .map(str::to_ascii_lowercase)
            .collect();
        let text = format!(" {} ", words.join(" "));
        let has = |phrase: &str| text.contains(&format!(" {phrase} "));
        if has("refused") {
            RefusalKind::TargetRefused
        } else if has("timed out") || has("timeout") || has("i/o timeout") || has("deadline exceeded") {
            RefusalKind::TargetTimedOut
        } else if has("network is unreachable") || has("network unreachable") {
            RefusalKind::NetworkUnreachable
        } else if has("unreachable")
            || has("no route to host")
            || has("no such host")
            || has("lookup")
            || has("resolve")
            || has("name or service not known")
            || has("no address")
        {
            RefusalKind::HostUnreachable
        } else if has("exhausted") || has("too many streams") || has("too many sessions") || has("limit reached") {
            RefusalKind::ServerBusy
        } else {
            RefusalKind::Other
        }
    }
}

/// Why a local connection got no stream.
#[derive(Debug, thiserror::Error)]
pub enum OpenFailure {
    #[error("no session to the server: {0}")]
    Connect(#[from] ConnectError),
    #[error("session to the server closed: {0}")]
    SessionClosed(#[from] SessionClosed),
    #[error("server did not answer the stream in time")]
    OpenTimeout,
    /// The server answered the SYN with an error; `text` is what it said.
    #[error("server refused the stream: {text}")]
    Refused { kind: RefusalKind, text: String },
    #[error("{0}")]
    Local(String),
}

impl From<OpenError> for OpenFailure {
    fn from(err: OpenError) -> OpenFailure {
        match err {
            OpenError::Refused(text) => OpenFailure::Refused { kind: RefusalKind::of_server_text(&text), text },
            OpenError::Timeout => OpenFailure::OpenTimeout,
            OpenError::Session(closed) => OpenFailure::SessionClosed(closed),
        }
    }
}

/// What a local client is told about a failure, per protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    /// The SOCKS5 `REP` byte (RFC 1928 §6). SOCKS4 has only "rejected" (0x5b).
    pub socks5: u8,
    /// The HTTP status line's code and reason.
    pub http: &'static str,
}

impl Reply {
    pub const GENERAL: Reply = Reply { socks5: 0x01, http: "502 Bad Gateway" };
    pub const BUSY: Reply = Reply { socks5: 0x01, http: "503 Service Unavailable" };
    pub const NETWORK_UNREACHABLE: Reply = Reply { socks5: 0x03, http: "502 Bad Gateway" };
    pub const HOST_UNREACHABLE: Reply = Reply { socks5: 0x04, http: "502 Bad Gateway" };
    pub const REFUSED: Reply = Reply { socks5: 0x05, http: "502 Bad Gateway" };
    pub const TIMED_OUT: Reply = Reply { socks5: 0x06, http: "504 Gateway Timeout" };
}

impl OpenFailure {
    /// The one mapping from failures to SOCKS5 codes and HTTP statuses. A failure of our
    /// own link to the server is a "general failure" / 502 (or a timeout when it timed
    /// out); only the server's refusal speaks about the target.
    pub fn reply(&self) -> Reply {
        match self {
            OpenFailure::Connect(err) if err.timed_out() => Reply::TIMED_OUT,
            OpenFailure::Connect(_) | OpenFailure::SessionClosed(_) | OpenFailure::Local(_) => Reply::GENERAL,
            OpenFailure::OpenTimeout => Reply::TIMED_OUT,
            OpenFailure::Refused { kind, .. } => match kind {
                RefusalKind::TargetRefused => Reply::REFUSED,
                RefusalKind::TargetTimedOut => Reply::TIMED_OUT,
                RefusalKind::NetworkUnreachable => Reply::NETWORK_UNREACHABLE,
                RefusalKind::HostUnreachable => Reply::HOST_UNREACHABLE,
                RefusalKind::ServerBusy => Reply::BUSY,
                RefusalKind::Other => Reply::GENERAL,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(text: &str) -> RefusalKind {
        RefusalKind::of_server_text(text)
    }

    #[test]
    fn our_servers_refusals_are_classified() {
        // The texts src/server/ sends (DialError, AcquireError, the stream limits).
        assert_eq!(kind("dial 127.0.0.1:9: connection refused"), RefusalKind::TargetRefused);
        assert_eq!(kind("dial example.com:443: timed out"), RefusalKind::TargetTimedOut);
        assert_eq!(
            kind(
                "dial nowhere.invalid:80: host unreachable (failed to lookup address information: Name or service not known)"
            ),
            RefusalKind::HostUnreachable
        );
        assert_eq!(
            kind("dial [2001:db8::1]:80: host unreachable (Network is unreachable (os error 101))"),
            RefusalKind::NetworkUnreachable
        );
        assert_eq!(
            kind("dial 10.0.0.1:80: host unreachable (No route to host (os error 113))"),
            RefusalKind::HostUnreachable
        );
        assert_eq!(kind("outbound pool for example.com:443 exhausted"), RefusalKind::ServerBusy);
        assert_eq!(kind("too many streams on this server (limit 4096)"), RefusalKind::ServerBusy);
        // The anytls crate's server (0.5.3) at its per-session stream limit.
        assert_eq!(kind("session stream limit reached"), RefusalKind::ServerBusy);
        assert_eq!(kind("invalid destination address: unknown address type 0x09"), RefusalKind::Other);
        assert_eq!(kind("dial 127.0.0.1:9: Address family not supported (os error 97)"), RefusalKind::Other);
        assert_eq!(kind("resolve dns.example: timed out"), RefusalKind::TargetTimedOut);
        assert_eq!(kind("resolve dns.example: no address"), RefusalKind::HostUnreachable);
    }

    #[test]
    fn go_servers_refusals_are_classified() {
        assert_eq!(kind("dial tcp 127.0.0.1:9: connect: connection refused"), RefusalKind::TargetRefused);
        assert_eq!(kind("dial tcp 203.0.113.1:80: i/o timeout"), RefusalKind::TargetTimedOut);
        assert_eq!(
            kind("dial tcp: lookup nowhere.invalid on 127.0.0.53:53: no such host"),
            RefusalKind::HostUnreachable
        );
        assert_eq!(kind("dial tcp [2001:db8::1]:80: connect: network is unreachable"), RefusalKind::NetworkUnreachable);
        assert_eq!(kind("dial tcp 10.0.0.1:80: connect: no route to host"), RefusalKind::HostUnreachable);
        assert_eq!(kind("context deadline exceeded"), RefusalKind::TargetTimedOut);
    }

    #[test]
    fn the_target_name_cannot_steer_the_answer() {
        assert_eq!(kind("dial refused.example.com:443: timed out"), RefusalKind::TargetTimedOut);
        assert_eq!(kind("dial timeout.example:80: connection refused"), RefusalKind::TargetRefused);
        assert_eq!(kind("outbound pool for unreachable.test:80 exhausted"), RefusalKind::ServerBusy);
        assert_eq!(kind(""), RefusalKind::Other);
    }

    #[test]
    fn each_failure_has_one_reply() {
        let refused = |text: &str| OpenFailure::from(OpenError::Refused(text.into())).reply();
        assert_eq!(refused("dial 127.0.0.1:9: connection refused"), Reply::REFUSED);
        assert_eq!(refused("dial h:1: timed out").socks5, 0x06);
        assert_eq!(refused("dial h:1: timed out").http, "504 Gateway Timeout");
        assert_eq!(refused("dial h:1: host unreachable (lookup failed)").socks5, 0x04);
        assert_eq!(refused("outbound pool for h:1 exhausted").http, "503 Service Unavailable");
        assert_eq!(refused("something else").socks5, 0x01);
        assert_eq!(OpenFailure::from(OpenError::Timeout).reply(), Reply::TIMED_OUT);
        assert_eq!(OpenFailure::from(OpenError::Session(SessionClosed("gone".into()))).reply(), Reply::GENERAL);
        // Our own link failing says nothing about the target: not "refused".
        let tcp = ConnectError::Tcp {
            server: "s:443".into(),
            source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        };
        assert_eq!(OpenFailure::from(tcp).reply(), Reply::GENERAL);
        let slow = ConnectError::TlsTimeout { server: "s:443".into(), after: Duration::from_secs(1) };
        assert_eq!(OpenFailure::from(slow).reply(), Reply::TIMED_OUT);
    }
}
