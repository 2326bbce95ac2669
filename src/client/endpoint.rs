//! One server as the user named it (`HOST:PORT` or an `anytls://` link), resolved into
//! what the client dials and how it trusts the certificate.
//!
//! The precedence rules live here, beside the client, so that every front end applies the
//! same ones: what the command line gives for all servers wins over what one link says,
//! and a link fills in only what the command line leaves out.

use std::path::PathBuf;

use rustls::pki_types::{InvalidDnsNameError, ServerName};

use crate::client::link::{LinkError, parse_link, parse_server};
use crate::client::tls::{Trust, TrustError, parse_pin};
use crate::proto::Address;
use crate::proto::address::Host;

/// What the command line says for every server; each field, when given, beats the link's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerOverrides {
    pub password: Option<String>,
    pub sni: Option<String>,
    pub insecure: bool,
    /// Extra CA files, used when neither a pin nor `insecure` applies.
    pub extra_ca: Vec<PathBuf>,
    pub pin_sha256: Option<String>,
}

/// One server, ready to dial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerEndpoint {
    pub server: Address,
    pub password: String,
    pub trust: Trust,
    /// The TLS name sent and verified: the SNI if given, else the server's host.
    pub server_name: ServerName<'static>,
    /// What the link asked that is not done (see [`crate::client::link`]), for the log.
    pub ignored: Vec<String>,
}

/// Why a server could not be resolved; the texts name what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("bad server address {0:?}")]
    BadAddress(String),
    #[error("no password for {0}: give -p or put it in the anytls:// link")]
    NoPassword(Address),
    #[error(transparent)]
    BadPin(TrustError),
    #[error("bad TLS server name: {0}")]
    BadServerName(InvalidDnsNameError),
}

/// Resolves `spec` (`HOST[:PORT]`, port 443 by default, or an `anytls://` link). A pin
/// (the command line's, else the link's) beats `insecure` (either's), which beats the
/// web PKI roots plus `extra_ca`.
pub fn resolve_server(spec: &str, overrides: &ServerOverrides) -> Result<ServerEndpoint, EndpointError> {
    let (server, link_password, link_sni, link_insecure, link_pin, ignored) = if spec.contains("://") {
        let link = parse_link(spec)?;
        (link.server, link.password, link.sni, link.insecure, link.pin_sha256, link.ignored)
    } else {
        let address = parse_server(spec, 443).ok_or_else(|| EndpointError::BadAddress(spec.to_string()))?;
        (address, None, None, false, None, Vec::new())
    };
    let Some(password) = overrides.password.clone().or(link_password) else {
        return Err(EndpointError::NoPassword(server));
    };
    let trust = if let Some(pin) = overrides.pin_sha256.as_ref().or(link_pin.as_ref()) {
        Trust::Pin(parse_pin(pin).map_err(EndpointError::BadPin)?)
    } else if overrides.insecure || link_insecure {
        Trust::Insecure
    } else {
        Trust::Roots { extra_ca: overrides.extra_ca.clone() }
    };
    let server_name = match (overrides.sni.clone().or(link_sni), &server.host) {
        (Some(name), _) => ServerName::try_from(name),
        (None, Host::Domain(name)) => ServerName::try_from(name.clone()),
        (None, Host::Ip(ip)) => Ok(ServerName::IpAddress((*ip).into())),
    }
    .map_err(EndpointError::BadServerName)?;
    Ok(ServerEndpoint { server, password, trust, server_name, ignored })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PIN: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    fn with_password() -> ServerOverrides {
        ServerOverrides { password: Some("cli".into()), ..ServerOverrides::default() }
    }

    fn name(text: &str) -> ServerName<'static> {
        ServerName::try_from(text.to_string()).unwrap()
    }

    #[test]
    fn a_plain_address_takes_port_443_the_roots_and_its_host_as_name() {
        let overrides = ServerOverrides { extra_ca: vec!["/ca.pem".into()], ..with_password() };
        let endpoint = resolve_server("proxy.example", &overrides).unwrap();
        assert_eq!(endpoint.server, Address::domain("proxy.example", 443));
        assert_eq!(endpoint.password, "cli");
        assert_eq!(endpoint.trust, Trust::Roots { extra_ca: vec!["/ca.pem".into()] });
        assert_eq!(endpoint.server_name, name("proxy.example"));
        let by_ip = resolve_server("192.0.2.7:8443", &with_password()).unwrap();
        assert_eq!(by_ip.server_name, ServerName::IpAddress(std::net::Ipv4Addr::new(192, 0, 2, 7).into()));
    }

    #[test]
    fn a_link_fills_in_what_the_command_line_leaves_out() {
        let link = format!("anytls://linkpw@proxy.example:9443/?sni=front.example&pin-sha256={PIN}");
        let endpoint = resolve_server(&link, &ServerOverrides::default()).unwrap();
        assert_eq!(endpoint.server, Address::domain("proxy.example", 9443));
        assert_eq!(endpoint.password, "linkpw");
        assert_eq!(endpoint.server_name, name("front.example"));
        assert!(matches!(endpoint.trust, Trust::Pin(pin) if pin[0] == 0x00 && pin[31] == 0xff));
        let insecure = resolve_server("anytls://pw@proxy.example/?insecure=1", &ServerOverrides::default()).unwrap();
        assert_eq!(insecure.trust, Trust::Insecure);
    }

    #[test]
    fn the_command_line_wins_over_the_link() {
        let overrides = ServerOverrides { sni: Some("cli.example".into()), ..with_password() };
        let endpoint = resolve_server("anytls://linkpw@proxy.example/?sni=link.example", &overrides).unwrap();
        assert_eq!((endpoint.password.as_str(), endpoint.server_name), ("cli", name("cli.example")));
        let insecure = ServerOverrides { insecure: true, ..with_password() };
        assert_eq!(resolve_server("proxy.example", &insecure).unwrap().trust, Trust::Insecure);
    }

    #[test]
    fn a_pin_from_either_side_beats_insecure_from_either_side() {
        let pinned = ServerOverrides { pin_sha256: Some(PIN.into()), ..with_password() };
        let endpoint = resolve_server("anytls://pw@proxy.example/?insecure=1", &pinned).unwrap();
        assert!(matches!(endpoint.trust, Trust::Pin(_)));
        let insecure = ServerOverrides { insecure: true, ..with_password() };
        let endpoint = resolve_server(&format!("anytls://pw@proxy.example/?pin-sha256={PIN}"), &insecure).unwrap();
        assert!(matches!(endpoint.trust, Trust::Pin(_)));
    }

    #[test]
    fn mistakes_are_named() {
        let none = ServerOverrides::default();
        let err = resolve_server("proxy.example:1", &none).unwrap_err().to_string();
        assert_eq!(err, "no password for proxy.example:1: give -p or put it in the anytls:// link");
        let err = resolve_server("", &with_password()).unwrap_err().to_string();
        assert_eq!(err, "bad server address \"\"");
        let bad_pin = ServerOverrides { pin_sha256: Some("abc".into()), ..with_password() };
        assert!(resolve_server("proxy.example", &bad_pin).unwrap_err().to_string().contains("64 hex digits"));
        let bad_sni = ServerOverrides { sni: Some("not a name".into()), ..with_password() };
        let err = resolve_server("proxy.example", &bad_sni).unwrap_err().to_string();
        assert!(err.starts_with("bad TLS server name: "), "{err}");
    }
}
