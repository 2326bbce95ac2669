//! `anytls://[password@]host[:port]/?sni=NAME&insecure=0|1&pin-sha256=HEX` links.
//! `pin-sha256` (this project's addition, printed by `anytls-server` for a self-signed
//! certificate) accepts exactly the certificate with that SHA-256; other clients ignore it.

use crate::proto::Address;

/// Why a link was not understood; the texts name the part that is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("not an anytls:// link: {0}")]
    NotALink(String),
    #[error("bad server address in link: {0}")]
    BadServer(String),
    #[error("bad percent-encoding in {0:?}")]
    BadPercentEncoding(String),
    #[error("percent-decoded text is not UTF-8: {0:?}")]
    NotUtf8(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub password: Option<String>,
    pub server: Address,
    pub sni: Option<String>,
    pub insecure: bool,
    pub pin_sha256: Option<String>,
}

/// Parses a link; the password is percent-decoded, the port defaults to 443.
pub fn parse_link(text: &str) -> Result<Link, LinkError> {
    let rest = text.strip_prefix("anytls://").ok_or_else(|| LinkError::NotALink(text.to_string()))?;
    let (authority, query) = match rest.split_once('?') {
        Some((authority, query)) => (authority, query),
        None => (rest, ""),
    };
    let authority = authority.split('#').next().unwrap_or_default().trim_end_matches('/');
    let (password, host_port) = match authority.rsplit_once('@') {
        Some((password, host_port)) => (Some(percent_decode(password)?), host_port),
        None => (None, authority),
    };
    let server = parse_server(host_port, 443).ok_or_else(|| LinkError::BadServer(host_port.to_string()))?;
    let mut link = Link { password, server, sni: None, insecure: false, pin_sha256: None };
    for pair in query.split('#').next().unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_decode(value)?;
        match key {
            "sni" if !value.is_empty() => link.sni = Some(value),
            "insecure" => link.insecure = value == "1" || value == "true",
            "pin-sha256" if !value.is_empty() => link.pin_sha256 = Some(value),
            _ => {}
        }
    }
    Ok(link)
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`, with a default port.
pub fn parse_server(text: &str, default_port: u16) -> Option<Address> {
    if let Some(address) = Address::parse_host_port(text) {
        return Some(address);
    }
    let host = text.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return None;
    }
    Some(Address::domain(host, default_port))
}

/// Strict decoding: every `%` must start an escape of two hex digits, and the result
/// must be UTF-8.
fn percent_decode(text: &str) -> Result<String, LinkError> {
    let bytes = text.as_bytes();
    let escapes_are_whole = bytes
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b'%')
        .all(|(i, _)| bytes.get(i + 1..i + 3).is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit)));
    if !escapes_are_whole {
        return Err(LinkError::BadPercentEncoding(text.to_string()));
    }
    match percent_encoding::percent_decode_str(text).decode_utf8() {
        Ok(decoded) => Ok(decoded.into_owned()),
        Err(_) => Err(LinkError::NotUtf8(text.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::PasswordHash;

    #[test]
    fn full_link_parses_and_the_password_is_decoded() {
        let link = parse_link("anytls://p%40ss%3Aw%2Frd@example.com:8443/?sni=cdn.example&insecure=1").unwrap();
        assert_eq!(link.password.as_deref(), Some("p@ss:w/rd"));
        let hash: String =
            PasswordHash::of(link.password.as_deref().unwrap()).as_bytes().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hash, "5a239cf77d67ce4b0a28de5b58565f8de0ed642094656427eb759445e577ebb4");
        assert_eq!(link.server.to_string(), "example.com:8443");
        assert_eq!(link.sni.as_deref(), Some("cdn.example"));
        assert!(link.insecure);
        let pinned = parse_link("anytls://pw@127.0.0.1:8443/?pin-sha256=ab12").unwrap();
        assert_eq!(pinned.pin_sha256.as_deref(), Some("ab12"));
    }

    #[test]
    fn port_defaults_to_443_and_ipv6_works() {
        assert_eq!(parse_link("anytls://pw@example.com").unwrap().server.to_string(), "example.com:443");
        assert_eq!(parse_link("anytls://pw@[::1]:9/").unwrap().server.to_string(), "[::1]:9");
        assert_eq!(parse_link("anytls://[::1]").unwrap().server.to_string(), "[::1]:443");
        assert!(!parse_link("anytls://pw@h:1/?insecure=0").unwrap().insecure);
    }

    #[test]
    fn bad_links_are_clear_errors() {
        assert!(matches!(parse_link("http://x"), Err(LinkError::NotALink(_))));
        assert!(matches!(parse_link("anytls://%zz@h:1"), Err(LinkError::BadPercentEncoding(_))));
        assert!(matches!(parse_link("anytls://%FF@h:1"), Err(LinkError::NotUtf8(_))));
    }

    #[test]
    fn percent_escapes_are_checked_strictly() {
        assert_eq!(percent_decode("p%40ss").unwrap(), "p@ss");
        assert_eq!(percent_decode("%e2%82%AC+").unwrap(), "€+", "a plus is a plus in a link");
        for bad in ["%", "%4", "50%", "%zz", "%4g", "%+f", "%-1", "%%41"] {
            assert!(matches!(percent_decode(bad), Err(LinkError::BadPercentEncoding(_))), "{bad}");
        }
        assert!(matches!(percent_decode("%C3%28"), Err(LinkError::NotUtf8(_))));
        assert!(parse_link("http://x").unwrap_err().to_string().contains("not an anytls"));
    }
}
