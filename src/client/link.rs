//! `anytls://[password@]host[:port]/?sni=NAME&insecure=0|1&pin-sha256=HEX#NAME` links.
//! `pin-sha256` (this project's addition, printed by `anytls-server` for a self-signed
//! certificate) accepts exactly the certificate with that SHA-256; other clients ignore it.
//!
//! Links are shared between clients, so the spellings other clients write are read too:
//! `allowInsecure=1`, `pinSHA256=` and a hex `fingerprint=` for the pin. What a link asks
//! and this client does not do is said: `fp=` (a uTLS browser imitation) and `alpn=` are
//! read and ignored with a note, and a link this client cannot honour (`security=reality`,
//! another scheme) is refused with the reason, rather than failing later at TLS.

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
    #[error("the link asks for {0}, which anytls-client cannot honour")]
    Unsupported(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub password: Option<String>,
    pub server: Address,
    pub sni: Option<String>,
    pub insecure: bool,
    pub pin_sha256: Option<String>,
    /// The link's `#name`, percent-decoded.
    pub name: Option<String>,
    /// What the link asks that is read but not done, one note each, for the log.
    pub ignored: Vec<String>,
}

/// Parses a link; the password is percent-decoded, the port defaults to 443.
pub fn parse_link(text: &str) -> Result<Link, LinkError> {
    let Some(rest) = text.strip_prefix("anytls://") else {
        return Err(match text.split_once("://") {
            Some((scheme, _)) => {
                LinkError::NotALink(format!("{scheme}:// is another protocol; this client speaks AnyTLS"))
            }
            None => LinkError::NotALink(text.to_string()),
        });
    };
    let (rest, name) = match rest.split_once('#') {
        Some((rest, name)) if !name.is_empty() => (rest, Some(percent_decode(name)?)),
        Some((rest, _)) => (rest, None),
        None => (rest, None),
    };
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
    let mut link = Link { password, server, sni: None, insecure: false, pin_sha256: None, name, ignored: Vec::new() };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_decode(value)?;
        match key {
            "sni" | "peer" if !value.is_empty() => link.sni = Some(value),
            "insecure" | "allowInsecure" => link.insecure = value == "1" || value == "true",
            "pin-sha256" | "pinSHA256" if !value.is_empty() => link.pin_sha256 = Some(value),
            // Some clients write the pin as `fingerprint`, others a uTLS name there.
            "fingerprint" if crate::client::tls::parse_pin(&value).is_ok() => link.pin_sha256 = Some(value),
            "fingerprint" | "fp" => link.ignored.push(format!(
                "{key}={value}: browser imitation (uTLS) is not done; the ClientHello is this client's own, \
                 modelled on a browser's"
            )),
            "alpn" => link.ignored.push(format!("alpn={value}: this client offers h2 and http/1.1, as a browser does")),
            "security" if value.is_empty() || value == "tls" => {}
            "security" => return Err(LinkError::Unsupported(format!("security={value}"))),
            "sni" | "pin-sha256" | "pinSHA256" | "peer" => {}
            _ => link.ignored.push(format!("{key}: not a key anytls-client knows")),
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
    fn the_spellings_of_other_clients_are_read() {
        let pin = "ab".repeat(32);
        let link = parse_link(&format!("anytls://pw@h:1/?allowInsecure=1&pinSHA256={pin}#my%20server")).unwrap();
        assert!(link.insecure);
        assert_eq!(link.pin_sha256.as_deref(), Some(pin.as_str()));
        assert_eq!(link.name.as_deref(), Some("my server"));
        assert!(link.ignored.is_empty(), "{:?}", link.ignored);
        let by_fingerprint = parse_link(&format!("anytls://pw@h:1?fingerprint={pin}&peer=front.example")).unwrap();
        assert_eq!(by_fingerprint.pin_sha256.as_deref(), Some(pin.as_str()));
        assert_eq!(by_fingerprint.sni.as_deref(), Some("front.example"));
    }

    #[test]
    fn what_is_asked_and_not_done_is_noted_and_what_cannot_be_honoured_is_refused() {
        let link = parse_link("anytls://pw@h:1/?fp=chrome&alpn=h2&fingerprint=firefox&udp=1&security=tls").unwrap();
        let notes = link.ignored.join("\n");
        assert_eq!(link.ignored.len(), 4, "{notes}");
        for part in ["fp=chrome", "alpn=h2", "fingerprint=firefox", "udp: not a key"] {
            assert!(notes.contains(part), "{part} in {notes}");
        }
        let reality = parse_link("anytls://pw@h:1/?security=reality&pbk=x").unwrap_err();
        assert_eq!(reality, LinkError::Unsupported("security=reality".into()));
        assert!(reality.to_string().contains("cannot honour"));
        let vless = parse_link("vless://uuid@h:443?security=reality").unwrap_err().to_string();
        assert!(vless.contains("vless:// is another protocol"), "{vless}");
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
