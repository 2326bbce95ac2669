//! Where destination names are looked up: the system resolver (getaddrinfo, the default)
//! or DNS servers the operator names (`--dns-server`), over UDP, TCP, TLS or HTTPS.
//!
//! The system resolver stays the default because it follows the machine's own setup
//! (nsswitch, /etc/gai.conf, systemd-resolved, container DNS) and cost less CPU per lookup
//! when measured (docs/benchmarks.md, "Name resolution"). Named servers are asked through
//! hickory-resolver, whose lookups are asynchronous (no blocking thread each) and carry the
//! records' TTL, which [`super::dial::NameCache`] then honours up to its own 60 s.
//! [`ServerSpec::parse`] is pure; [`Resolver::servers`] is where sockets are set up.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;

use super::dial::{DnsStrategy, ResolveError};

/// How a named DNS server is spoken to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// UDP, and TCP for an answer too big for a datagram (a bare address).
    UdpThenTcp,
    Udp,
    Tcp,
    /// DNS over TLS (RFC 7858).
    Tls,
    /// DNS over HTTPS (RFC 8484), HTTP/2.
    Https,
}

impl Transport {
    fn default_port(self) -> u16 {
        match self {
            Transport::UdpThenTcp | Transport::Udp | Transport::Tcp => 53,
            Transport::Tls => 853,
            Transport::Https => 443,
        }
    }

    fn encrypted(self) -> bool {
        matches!(self, Transport::Tls | Transport::Https)
    }
}

/// One `--dns-server`: `ADDRESS[:PORT]` (UDP, then TCP for long answers), `udp://ADDRESS[:PORT]`,
/// `tcp://ADDRESS[:PORT]`, `tls://HOST[:PORT]` or `https://HOST[:PORT][/PATH]`. An encrypted
/// server's HOST is the name its certificate is checked against; a host name there is looked
/// up once, by the system resolver, when the server starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSpec {
    pub transport: Transport,
    pub host: String,
    pub port: u16,
    /// The DoH path (`/dns-query` unless given).
    pub path: Option<String>,
}

impl ServerSpec {
    pub fn parse(text: &str) -> Result<ServerSpec, String> {
        let bad = |why: &str| format!("--dns-server {text:?}: {why}");
        let (transport, rest) = match text.split_once("://") {
            None => (Transport::UdpThenTcp, text),
            Some(("udp", rest)) => (Transport::Udp, rest),
            Some(("tcp", rest)) => (Transport::Tcp, rest),
            Some(("tls", rest)) => (Transport::Tls, rest),
            Some(("https", rest)) => (Transport::Https, rest),
            Some((scheme, _)) => return Err(bad(&format!("unknown scheme {scheme:?} (udp, tcp, tls or https)"))),
        };
        let (authority, path) = match rest.find('/') {
            Some(slash) if transport == Transport::Https => (&rest[..slash], Some(rest[slash..].to_owned())),
            Some(_) => return Err(bad("only an https:// server has a path")),
            None if transport == Transport::Https => (rest, Some("/dns-query".to_owned())),
            None => (rest, None),
        };
        let (host, port) = split_host_port(authority).ok_or_else(|| bad("expected HOST or HOST:PORT"))?;
        let port = match port {
            Some(port) => port.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| bad("bad port"))?,
            None => transport.default_port(),
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        if !transport.encrypted() && host.parse::<IpAddr>().is_err() {
            return Err(bad("a plain DNS server is given by its address (a name would need DNS to find it)"));
        }
        Ok(ServerSpec { transport, host: host.to_owned(), port, path })
    }

    /// The hickory configuration for this server at `ip`.
    fn name_server(&self, ip: IpAddr) -> NameServerConfig {
        let name: Arc<str> = self.host.as_str().into();
        let connection = match self.transport {
            Transport::UdpThenTcp => return self.with_port(NameServerConfig::udp_and_tcp(ip)),
            Transport::Udp => ConnectionConfig::udp(),
            Transport::Tcp => ConnectionConfig::tcp(),
            Transport::Tls => ConnectionConfig::tls(name),
            Transport::Https => ConnectionConfig::https(name, self.path.as_deref().map(Arc::from)),
        };
        let mut server = NameServerConfig::new(ip, true, vec![connection]);
        server.connections.iter_mut().for_each(|c| c.port = self.port);
        server
    }

    fn with_port(&self, mut server: NameServerConfig) -> NameServerConfig {
        server.connections.iter_mut().for_each(|c| c.port = self.port);
        server
    }
}

impl fmt::Display for ServerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match self.transport {
            Transport::UdpThenTcp => "",
            Transport::Udp => "udp://",
            Transport::Tcp => "tcp://",
            Transport::Tls => "tls://",
            Transport::Https => "https://",
        };
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        write!(f, "{scheme}{host}:{}{}", self.port, self.path.as_deref().unwrap_or(""))
    }
}

/// `host`, `host:port`, `[v6]`, `[v6]:port` or a bare IPv6 address.
fn split_host_port(authority: &str) -> Option<(&str, Option<&str>)> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        return match after {
            "" => Some((host, None)),
            _ => Some((host, Some(after.strip_prefix(':')?))),
        };
    }
    if authority.parse::<std::net::Ipv6Addr>().is_ok() {
        return Some((authority, None));
    }
    match authority.split_once(':') {
        Some((host, port)) if !port.contains(':') => Some((host, Some(port))),
        Some(_) => None,
        None => Some((authority, None)),
    }
}

/// Where names are looked up. Cheap to clone.
#[derive(Clone, Default)]
pub enum Resolver {
    /// getaddrinfo, on tokio's blocking pool.
    #[default]
    System,
    /// The named servers, through hickory.
    Servers { resolver: Arc<TokioResolver>, described: Arc<str> },
}

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Resolver::System => f.write_str("System"),
            Resolver::Servers { described, .. } => write!(f, "Servers({described})"),
        }
    }
}

/// Addresses (port 0) and until when they may be reused (`None`: the cache's own TTL).
pub type Answer = (Arc<[SocketAddr]>, Option<Instant>);

impl Resolver {
    /// A resolver asking `specs` (tried in order, two at a time, as hickory does), with
    /// `extra_roots` trusted for the encrypted ones besides the public web's roots. Only the
    /// families `strategy` dials are asked for.
    pub async fn servers(
        specs: &[ServerSpec],
        extra_roots: &[rustls::pki_types::CertificateDer<'static>],
        strategy: DnsStrategy,
    ) -> Result<Resolver, String> {
        let mut servers = Vec::new();
        for spec in specs {
            for ip in bootstrap(spec).await? {
                servers.push(spec.name_server(ip));
            }
        }
        let mut options = ResolverOpts::default();
        options.ip_strategy = match strategy {
            DnsStrategy::Ipv4Only => LookupIpStrategy::Ipv4Only,
            DnsStrategy::Ipv6Only => LookupIpStrategy::Ipv6Only,
            // Both families; DnsStrategy::arrange orders them.
            _ => LookupIpStrategy::Ipv4AndIpv6,
        };
        // /etc/hosts still answers first, as it does for getaddrinfo ("localhost").
        options.use_hosts_file = ResolveHosts::Always;
        // NameCache keeps the answers; hickory's own cache would keep them twice.
        options.cache_size = 0;
        let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
        for root in extra_roots {
            roots.add(root.clone()).map_err(|e| format!("--dns-ca: {e}"))?;
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let config = ResolverConfig::from_parts(None, Vec::new(), servers);
        let resolver = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
            .with_options(options)
            .with_tls_config(tls)
            .build()
            .map_err(|e| format!("--dns-server: {e}"))?;
        let described = specs.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
        Ok(Resolver::Servers { resolver: Arc::new(resolver), described: described.into() })
    }

    /// What the log says names are resolved by.
    pub fn describe(&self) -> String {
        match self {
            Resolver::System => "the system resolver".to_owned(),
            Resolver::Servers { described, .. } => format!("DNS servers {described}"),
        }
    }

    /// The addresses of `name`.
    pub async fn lookup(&self, name: &str) -> Result<Answer, ResolveError> {
        let found: Arc<[SocketAddr]> = match self {
            Resolver::System => {
                tokio::net::lookup_host((name, 0)).await.map_err(|err| ResolveError::Lookup(Arc::new(err)))?.collect()
            }
            Resolver::Servers { resolver, .. } => {
                // A trailing dot: the name is absolute, never tried under a search domain.
                let absolute = if name.ends_with('.') { name.to_owned() } else { format!("{name}.") };
                let answer = resolver
                    .lookup_ip(absolute.as_str())
                    .await
                    .map_err(|err| ResolveError::Lookup(Arc::new(io::Error::other(err.to_string()))))?;
                let found: Arc<[SocketAddr]> = answer.iter().map(|ip| SocketAddr::new(ip, 0)).collect();
                if found.is_empty() {
                    return Err(ResolveError::NoAddresses);
                }
                return Ok((found, Some(answer.valid_until())));
            }
        };
        if found.is_empty() {
            return Err(ResolveError::NoAddresses);
        }
        Ok((found, None))
    }
}

/// The addresses of an encrypted server given by name, from the system resolver.
async fn bootstrap(spec: &ServerSpec) -> Result<Vec<IpAddr>, String> {
    if let Ok(ip) = spec.host.parse::<IpAddr>() {
        return Ok(vec![ip]);
    }
    let found = tokio::net::lookup_host((spec.host.as_str(), spec.port))
        .await
        .map_err(|e| format!("--dns-server {spec}: looking up {}: {e}", spec.host))?;
    let mut ips: Vec<IpAddr> = found.map(|addr| addr.ip()).collect();
    ips.dedup();
    if ips.is_empty() {
        return Err(format!("--dns-server {spec}: {} has no addresses", spec.host));
    }
    Ok(ips)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(transport: Transport, host: &str, port: u16, path: Option<&str>) -> ServerSpec {
        ServerSpec { transport, host: host.into(), port, path: path.map(Into::into) }
    }

    #[test]
    fn server_specs_name_the_transport_host_port_and_path() {
        let cases = [
            ("1.1.1.1", spec(Transport::UdpThenTcp, "1.1.1.1", 53, None)),
            ("127.0.0.1:5353", spec(Transport::UdpThenTcp, "127.0.0.1", 5353, None)),
            ("2606:4700::1111", spec(Transport::UdpThenTcp, "2606:4700::1111", 53, None)),
            ("[::1]:5353", spec(Transport::UdpThenTcp, "::1", 5353, None)),
            ("udp://9.9.9.9", spec(Transport::Udp, "9.9.9.9", 53, None)),
            ("tcp://[::1]:54", spec(Transport::Tcp, "::1", 54, None)),
            ("tls://1.1.1.1", spec(Transport::Tls, "1.1.1.1", 853, None)),
            ("tls://dns.google:8853", spec(Transport::Tls, "dns.google", 8853, None)),
            ("https://dns.google", spec(Transport::Https, "dns.google", 443, Some("/dns-query"))),
            ("https://127.0.0.1:8443/q", spec(Transport::Https, "127.0.0.1", 8443, Some("/q"))),
        ];
        for (text, expected) in cases {
            let parsed = ServerSpec::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(parsed, expected, "{text}");
            assert_eq!(ServerSpec::parse(&parsed.to_string()), Ok(parsed), "{text} survives its Display");
        }
    }

    #[test]
    fn bad_server_specs_say_what_is_wrong() {
        let cases = [
            ("quic://1.1.1.1", "unknown scheme \"quic\""),
            ("dns.google", "given by its address"),
            ("udp://resolver.local", "given by its address"),
            ("tls://1.1.1.1/path", "only an https:// server has a path"),
            ("1.1.1.1:0", "bad port"),
            ("1.1.1.1:99999", "bad port"),
            ("tls://:853", "no host"),
            ("[::1", "expected HOST or HOST:PORT"),
        ];
        for (text, why) in cases {
            let err = ServerSpec::parse(text).unwrap_err();
            assert!(err.contains(why) && err.contains(text), "{text}: {err}");
        }
    }

    #[test]
    fn each_transport_becomes_its_hickory_connection_at_the_given_port() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let plain = ServerSpec::parse("127.0.0.1:5300").unwrap().name_server(ip);
        let ports: Vec<u16> = plain.connections.iter().map(|c| c.port).collect();
        assert_eq!(ports, [5300, 5300], "UDP and TCP");
        let doh = ServerSpec::parse("https://127.0.0.1:8443").unwrap().name_server(ip);
        assert_eq!(doh.connections.len(), 1);
        assert_eq!(doh.connections[0].port, 8443);
        assert_eq!(doh.connections[0].protocol.to_protocol(), hickory_resolver::net::xfer::Protocol::Https);
    }
}
