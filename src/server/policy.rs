//! The outbound policy: which destinations an authenticated client may not reach.
//!
//! Always refused: the server's own listen and API addresses (a loop back into the proxy,
//! or a client reading the monitoring API through the proxy). `--deny CIDR` adds ranges;
//! `--deny-private` adds loopback, "this host" (0.0.0.0/8, ::), RFC 1918, link-local
//! (including the cloud metadata address 169.254.169.254) and unique-local IPv6.
//!
//! Checks apply to addresses, never to names: a domain is resolved first and every address
//! it resolves to is checked (a name that points at 127.0.0.1 is loopback). Before a check
//! each address is normalised, because the kernel and the resolver accept many spellings
//! of one address: an IPv4-mapped or IPv4-compatible IPv6 address (`::ffff:127.0.0.1`) and
//! NAT64's `64:ff9b::/96` are their IPv4 address, and names that are numbers in the
//! `inet_aton` forms (`2130706433`, `0x7f000001`, `127.1`, `0177.0.0.1`) are IPv4 addresses.
//! `0.0.0.0` and `::` reach the host itself, so they count as loopback.
//!
//! Each server holds its own [`OutboundPolicy`] in its context; `Policy::default()`
//! refuses nothing (library users and in-process tests).
//!
//! A name is resolved once: with `--deny` or `--deny-private` the stream is dialed to the
//! address that was checked (so a resolver that answers differently a moment later, DNS
//! rebinding, cannot slip past), and the pool then knows the target by that address. With
//! only the default rule a name is resolved for the check only when its port is one of the
//! server's own, and is dialed by name. UDP always sends to the very address checked.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use arc_swap::ArcSwap;

use super::dial::{LookupOwner, NameCache};
use super::route::{Action, DEFAULT_RULE, Network, Query, RouteCounters, Routes, domains::canonical};
use super::upstream::Upstream;
use crate::proto::Address;
use crate::proto::address::Host;

/// A name lookup for a check must leave time for the dial within the SYNACK budget.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);

/// A range that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad CIDR {0:?} (expected e.g. 10.0.0.0/8, fd00::/8 or 192.0.2.7)")]
pub struct BadCidr(pub String);

/// A destination the rules refuse, and why: the text is the SYNACK's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("refused by outbound policy: {why}")]
pub struct PolicyRefusal {
    pub reason: Refusal,
    pub why: String,
}

/// An address range, `ADDR/PREFIX` (a bare address is a single host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Result<Cidr, BadCidr> {
        let bad = || BadCidr(text.to_string());
        let (ip, prefix) = match text.split_once('/') {
            Some((ip, prefix)) => (ip, Some(prefix.parse::<u8>().map_err(|_| bad())?)),
            None => (text, None),
        };
        let ip: IpAddr = ip.trim_matches(['[', ']']).parse().map_err(|_| bad())?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(bad());
        }
        // A mapped range is the IPv4 range it maps, as addresses are normalised the same way.
        if let IpAddr::V6(v6) = ip
            && let Some(v4) = v6.to_ipv4_mapped()
            && prefix >= 96
        {
            return Ok(Cidr { network: IpAddr::V4(v4), prefix: prefix - 96 }.masked());
        }
        Ok(Cidr { network: ip, prefix }.masked())
    }

    fn masked(self) -> Cidr {
        let network = match self.network {
            IpAddr::V4(ip) => IpAddr::V4(Ipv4Addr::from_bits(ip.to_bits() & mask32(self.prefix))),
            IpAddr::V6(ip) => IpAddr::V6(Ipv6Addr::from_bits(ip.to_bits() & mask128(self.prefix))),
        };
        Cidr { network, prefix: self.prefix }
    }

    /// The first and last address of the range.
    pub fn bounds(&self) -> (IpAddr, IpAddr) {
        let last = match self.network {
            IpAddr::V4(ip) => IpAddr::V4(Ipv4Addr::from_bits(ip.to_bits() | !mask32(self.prefix))),
            IpAddr::V6(ip) => IpAddr::V6(Ipv6Addr::from_bits(ip.to_bits() | !mask128(self.prefix))),
        };
        (self.network, last)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => ip.to_bits() & mask32(self.prefix) == net.to_bits(),
            (IpAddr::V6(net), IpAddr::V6(ip)) => ip.to_bits() & mask128(self.prefix) == net.to_bits(),
            _ => false,
        }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

fn mask32(prefix: u8) -> u32 {
    if prefix == 0 { 0 } else { u32::MAX << (32 - prefix as u32) }
}

fn mask128(prefix: u8) -> u128 {
    if prefix == 0 { 0 } else { u128::MAX << (128 - prefix as u32) }
}

/// The ranges `--deny-private` refuses.
pub const PRIVATE_RANGES: &[&str] = &[
    "0.0.0.0/8",
    "127.0.0.0/8",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "169.254.0.0/16",
    "::/128",
    "::1/128",
    "fc00::/7",
    "fe80::/10",
    "fec0::/10",
];

/// Why a destination is refused; also the `reason` label in `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Own,
    Deny,
    Private,
    /// A `[[route]]` rule: `action = "block"`, or an upstream for a UDP datagram
    /// (upstreams carry TCP streams only).
    Route,
}

impl Refusal {
    pub const ALL: [Refusal; 4] = [Refusal::Own, Refusal::Deny, Refusal::Private, Refusal::Route];

    pub fn label(self) -> &'static str {
        match self {
            Refusal::Own => "own_address",
            Refusal::Deny => "deny",
            Refusal::Private => "private",
            Refusal::Route => "route",
        }
    }
}

/// Where a checked TCP stream goes: the destination to ask for (a name pinned to the
/// address that was checked, where rules look at addresses), directly or through an upstream.
#[derive(Debug, Clone)]
pub struct Checked {
    pub destination: Address,
    pub upstream: Option<Arc<Upstream>>,
}

/// The rules. `Policy::default()` refuses nothing.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// The server's own listening sockets (proxy port, API).
    pub own: Vec<SocketAddr>,
    pub deny: Vec<Cidr>,
    pub deny_private: bool,
    /// The `[[route]]` rules, applied after the checks above (see [`super::route`]).
    pub routes: Arc<Routes>,
}

impl Policy {
    fn is_empty(&self) -> bool {
        self.own.is_empty() && self.deny.is_empty() && !self.deny_private && self.routes.is_empty()
    }

    /// The route rules' decision on a destination that passed the checks above: direct
    /// (`None`) or the upstream to go through. `shown` names the destination in a
    /// refusal (built only for one).
    fn route(&self, query: Query, shown: impl FnOnce() -> String) -> Result<Option<Arc<Upstream>>, (Refusal, String)> {
        if self.routes.is_empty() {
            return Ok(None);
        }
        let decision = self.routes.decide(&query);
        let rule = || decision.rule.unwrap_or(DEFAULT_RULE);
        match decision.action {
            Action::Direct => Ok(None),
            Action::Block => Err((Refusal::Route, format!("{} is blocked by route {}", shown(), rule()))),
            Action::Upstream(index) => Ok(Some(self.routes.upstream(index).clone())),
        }
    }

    /// Whether a name with this port must be resolved to be checked.
    fn needs_addresses(&self, port: u16) -> bool {
        self.deny_private || !self.deny.is_empty() || self.own.iter().any(|own| own.port() == port)
    }

    /// Checks one resolved address.
    pub fn check(&self, target: SocketAddr) -> Result<(), (Refusal, String)> {
        let ip = normalise(target.ip());
        if let Some(own) = self.own.iter().find(|own| reaches_own(ip, target.port(), own)) {
            return Err((Refusal::Own, format!("{} is the server's own address ({own})", show(target))));
        }
        if let Some(range) = self.deny.iter().find(|range| range.contains(ip)) {
            return Err((Refusal::Deny, format!("{} is in --deny {range}", show(target))));
        }
        if self.deny_private && private_ranges().iter().any(|range| range.contains(ip)) {
            return Err((Refusal::Private, format!("{} is a private address (--deny-private)", show(target))));
        }
        Ok(())
    }

    /// Checks a destination: its address, or every address its name resolves to, then
    /// routes it for `user`. Returns the destination to dial: as given, or (with deny rules
    /// or address routes) the checked address of a name. Names are resolved through
    /// `names`, the server's shared cache.
    pub async fn check_destination(
        &self,
        destination: Address,
        user: &str,
        names: &NameCache,
        lookups: &LookupOwner,
    ) -> Result<Checked, (Refusal, String)> {
        let port = destination.port;
        let query = |name, addresses| Query { name, addresses, port, network: Network::Tcp, user };
        let checked = |destination, upstream| Checked { destination, upstream };
        let name = match &destination.host {
            Host::Ip(ip) => {
                let target = SocketAddr::new(*ip, port);
                self.check(target)?;
                let upstream = self.route(query(None, &[normalise(*ip)]), || show(target))?;
                return Ok(checked(destination, upstream));
            }
            Host::Domain(name) => name,
        };
        if let Some(ip) = numeric_host(name) {
            let target = SocketAddr::new(ip, port);
            self.check(target)?;
            let upstream = self.route(query(None, &[ip]), || show(target))?;
            return Ok(checked(Address::socket(target), upstream));
        }
        // Only routes look at the name: without them a stream allocates nothing here.
        let routed = !self.routes.is_empty();
        let canonical_name = routed.then(|| canonical(name));
        let canonical_name = canonical_name.as_deref();
        let shown = || format!("{name}:{port}");
        let by_address = self.routes.needs_addresses();
        if !self.needs_addresses(port) && !by_address {
            let upstream = self.route(query(canonical_name, &[]), shown)?;
            return Ok(checked(destination, upstream));
        }
        let lookup = names.resolve(name, port, lookups);
        // A name that does not resolve is left to the dial, which reports it as usual.
        let Ok(Ok(found)) = tokio::time::timeout(RESOLVE_TIMEOUT, lookup).await else {
            let upstream = self.route(query(canonical_name, &[]), shown)?;
            return Ok(checked(destination, upstream));
        };
        for address in &found {
            self.check(*address).map_err(|(why, text)| (why, format!("{name}: {text}")))?;
        }
        let mut upstream = None;
        if routed {
            let addresses: Vec<IpAddr> = found.iter().map(|a| normalise(a.ip())).collect();
            upstream = self.route(query(canonical_name, &addresses), shown)?;
        }
        // Dial what was checked, so a resolver answering otherwise a moment later
        // (DNS rebinding) cannot slip past a rule on addresses.
        let pin = self.deny_private || !self.deny.is_empty() || by_address;
        match names.strategy().pick(&found) {
            Some(address) if pin => {
                Ok(checked(Address::socket(SocketAddr::new(normalise(address.ip()), port)), upstream))
            }
            _ => Ok(checked(destination, upstream)),
        }
    }

    /// Checks and routes a UDP datagram's resolved `target` (`name`: the one it was sent to).
    pub fn check_datagram(&self, target: SocketAddr, name: Option<&str>, user: &str) -> Result<(), (Refusal, String)> {
        self.check(target)?;
        if self.routes.is_empty() {
            return Ok(());
        }
        let canonical_name = name.map(canonical);
        let addresses = [normalise(target.ip())];
        let query = Query {
            name: canonical_name.as_deref(),
            addresses: &addresses,
            port: target.port(),
            network: Network::Udp,
            user,
        };
        let shown = || match name {
            Some(name) => format!("{name}:{}", target.port()),
            None => show(target),
        };
        match self.route(query, shown)? {
            None => Ok(()),
            // Upstreams carry TCP streams only (no SOCKS5 UDP ASSOCIATE yet).
            Some(upstream) => {
                Err((Refusal::Route, format!("{}: upstream {} carries TCP streams only", shown(), upstream.name)))
            }
        }
    }
}

fn show(target: SocketAddr) -> String {
    SocketAddr::new(normalise(target.ip()), target.port()).to_string()
}

fn private_ranges() -> &'static [Cidr] {
    static RANGES: LazyLock<Vec<Cidr>> =
        LazyLock::new(|| PRIVATE_RANGES.iter().map(|r| Cidr::parse(r).expect("valid built-in range")).collect());
    &RANGES
}

/// Whether connecting to `ip:port` could reach the socket bound at `own`.
fn reaches_own(ip: IpAddr, port: u16, own: &SocketAddr) -> bool {
    if port != own.port() {
        return false;
    }
    let bound = normalise(own.ip());
    // Connecting to 0.0.0.0 or :: reaches the host's loopback.
    let this_host = ip.is_unspecified() || ip.is_loopback();
    ip == bound
        || (this_host && (bound.is_unspecified() || bound.is_loopback()))
        || (bound.is_unspecified() && is_local(ip))
}

/// Whether `ip` is one of this host's addresses: binding to it works only then.
fn is_local(ip: IpAddr) -> bool {
    ip.is_unspecified() || ip.is_loopback() || std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// One spelling per address: IPv4 inside IPv6 (mapped, compatible, NAT64) becomes IPv4.
pub fn normalise(ip: IpAddr) -> IpAddr {
    let IpAddr::V6(v6) = ip else { return ip };
    if let Some(v4) = v6.to_ipv4_mapped() {
        return IpAddr::V4(v4);
    }
    let bits = v6.to_bits();
    let low32 = Ipv4Addr::from_bits(bits as u32);
    // IPv4-compatible (::a.b.c.d, deprecated but still accepted), leaving :: and ::1 alone.
    if bits >> 32 == 0 && bits > 1 {
        return IpAddr::V4(low32);
    }
    // NAT64's well-known prefix 64:ff9b::/96 reaches the embedded IPv4 address.
    if bits >> 32 == 0x0064_ff9b_0000_0000_0000_0000 {
        return IpAddr::V4(low32);
    }
    ip
}

/// A host name that is really an address: an IPv6 literal, or IPv4 in any `inet_aton`
/// form (1 to 4 parts, each decimal, octal with a leading 0, or hex with 0x).
pub fn numeric_host(name: &str) -> Option<IpAddr> {
    let name = name.trim_end_matches('.');
    if let Ok(ip) = name.trim_matches(['[', ']']).parse::<IpAddr>() {
        return Some(normalise(ip));
    }
    let parts: Vec<u64> = name.split('.').map(inet_aton_part).collect::<Option<_>>()?;
    let (last, leading) = parts.split_last()?;
    if parts.len() > 4 || leading.iter().any(|&p| p > 255) {
        return None;
    }
    let room = 8 * (4 - leading.len() as u32);
    if room < 64 && *last >= 1u64 << room {
        return None;
    }
    let mut bits: u64 = 0;
    for (i, part) in leading.iter().enumerate() {
        bits |= part << (24 - 8 * i);
    }
    Some(IpAddr::V4(Ipv4Addr::from_bits((bits | last) as u32)))
}

fn inet_aton_part(part: &str) -> Option<u64> {
    if part.is_empty() {
        return None;
    }
    let lower = part.to_ascii_lowercase();
    if let Some(hex) = lower.strip_prefix("0x") {
        return if hex.is_empty() {
            Some(0)
        } else {
            u64::from_str_radix(hex, 16).ok().filter(|v| *v <= u32::MAX as u64)
        };
    }
    if lower.len() > 1 && lower.starts_with('0') {
        return u64::from_str_radix(&lower[1..], 8).ok().filter(|v| *v <= u32::MAX as u64);
    }
    lower.parse::<u64>().ok().filter(|v| *v <= u32::MAX as u64)
}

// ---------------------------------------------------------------------------------------
// One server's policy

/// A server's rules, replaceable while it runs, with what they refused. Each server has
/// its own (in its [`super::ServerContext`]); it decides and counts, and its callers
/// answer the client.
#[derive(Default)]
pub struct OutboundPolicy {
    rules: ArcSwap<Policy>,
    refused: [AtomicU64; Refusal::ALL.len()],
    route_counters: RouteCounters,
}

impl OutboundPolicy {
    pub fn new(rules: Policy) -> OutboundPolicy {
        OutboundPolicy { rules: ArcSwap::from_pointee(rules), ..OutboundPolicy::default() }
    }

    pub fn rules(&self) -> Arc<Policy> {
        self.rules.load_full()
    }

    /// Makes `rules` the ones applied to streams opened from now on.
    pub fn replace(&self, rules: Policy) {
        self.rules.store(Arc::new(rules));
    }

    /// Streams (and UDP datagrams) refused so far for `reason`.
    pub fn refused(&self, reason: Refusal) -> u64 {
        self.refused[reason as usize].load(Ordering::Relaxed)
    }

    fn counted_refusal(&self, reason: Refusal, why: String) -> PolicyRefusal {
        self.refused[reason as usize].fetch_add(1, Ordering::Relaxed);
        PolicyRefusal { reason, why }
    }

    /// The destination a TCP stream may dial (see [`Policy::check_destination`]), or why
    /// not, as the SYNACK's text.
    pub async fn check_destination(
        &self,
        destination: Address,
        user: &str,
        names: &NameCache,
        lookups: &LookupOwner,
    ) -> Result<Checked, PolicyRefusal> {
        let rules = self.rules();
        if rules.is_empty() {
            return Ok(Checked { destination, upstream: None });
        }
        rules
            .check_destination(destination, user, names, lookups)
            .await
            .map_err(|(reason, why)| self.counted_refusal(reason, why))
    }

    /// Whether a UDP datagram of `user` may go to `target`, an address already resolved
    /// (from `name`, when it was sent to one).
    pub fn check_udp(&self, target: SocketAddr, name: Option<&str>, user: &str) -> Result<(), PolicyRefusal> {
        let rules = self.rules();
        if rules.is_empty() {
            return Ok(());
        }
        rules.check_datagram(target, name, user).map_err(|(reason, why)| self.counted_refusal(reason, why))
    }

    /// The counters route rules keep across reloads (see [`RouteCounters`]).
    pub fn route_counters(&self) -> &RouteCounters {
        &self.route_counters
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn numeric_names_in_every_inet_aton_form_are_addresses() {
        for name in [
            "127.0.0.1",
            "2130706433",
            "0x7f000001",
            "0X7F000001",
            "017700000001",
            "127.1",
            "127.0.1",
            "0177.0.0.1",
            "0x7f.1",
            "127.0.0.1.",
        ] {
            assert_eq!(numeric_host(name), Some(v4("127.0.0.1")), "{name}");
        }
        assert_eq!(numeric_host("::ffff:127.0.0.1"), Some(v4("127.0.0.1")));
        assert_eq!(numeric_host("[::1]"), Some(v4("::1")));
        assert_eq!(numeric_host("0"), Some(v4("0.0.0.0")));
        for name in
            ["example.com", "1.2.3.4.5", "256.0.0.1", "1.2.3.256", "0x1g", "4294967296", "", "1..2", "127.0.0.1x"]
        {
            assert_eq!(numeric_host(name), None, "{name}");
        }
    }

    #[test]
    fn ipv4_inside_ipv6_is_ipv4() {
        assert_eq!(normalise(v4("::ffff:10.1.2.3")), v4("10.1.2.3"));
        assert_eq!(normalise(v4("::127.0.0.1")), v4("127.0.0.1"));
        assert_eq!(normalise(v4("64:ff9b::a9fe:a9fe")), v4("169.254.169.254"));
        assert_eq!(normalise(v4("::1")), v4("::1"));
        assert_eq!(normalise(v4("::")), v4("::"));
        assert_eq!(normalise(v4("2001:db8::1")), v4("2001:db8::1"));
    }

    #[test]
    fn cidrs_parse_mask_and_match() {
        let range = Cidr::parse("10.1.2.3/8").unwrap();
        assert_eq!(range.to_string(), "10.0.0.0/8");
        assert!(range.contains(v4("10.200.0.1")));
        assert!(!range.contains(v4("11.0.0.1")));
        assert!(Cidr::parse("192.0.2.7").unwrap().contains(v4("192.0.2.7")));
        assert!(Cidr::parse("::ffff:10.0.0.0/104").unwrap().contains(v4("10.9.9.9")));
        assert!(Cidr::parse("fd00::/8").unwrap().contains(v4("fd12::1")));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(v4("8.8.8.8")));
        for bad in ["10.0.0.0/33", "x/8", "10.0.0.0/", "::/129"] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn private_means_loopback_rfc1918_link_local_and_ula_in_any_spelling() {
        let policy = Policy { deny_private: true, ..Policy::default() };
        for ip in [
            "127.0.0.1",
            "127.9.9.9",
            "0.0.0.0",
            "10.0.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
        ] {
            let refused = policy.check(SocketAddr::new(v4(ip), 80));
            assert!(matches!(refused, Err((Refusal::Private, _))), "{ip}: {refused:?}");
        }
        for ip in ["8.8.8.8", "172.32.0.1", "2001:db8::1", "100.64.0.1"] {
            assert!(policy.check(SocketAddr::new(v4(ip), 80)).is_ok(), "{ip}");
        }
    }

    #[test]
    fn the_servers_own_sockets_are_refused_however_they_are_named() {
        let policy = Policy {
            own: vec!["0.0.0.0:8443".parse().unwrap(), "127.0.0.1:9090".parse().unwrap()],
            ..Policy::default()
        };
        for target in [
            "127.0.0.1:8443",
            "0.0.0.0:8443",
            "127.0.0.1:9090",
            "0.0.0.0:9090",
            "[::ffff:127.0.0.1]:9090",
            "[::1]:8443",
        ] {
            let refused = policy.check(target.parse().unwrap());
            assert!(matches!(refused, Err((Refusal::Own, _))), "{target}: {refused:?}");
        }
        // Other ports, and the API port on an address it does not listen on.
        for target in ["127.0.0.1:8444", "8.8.8.8:8443", "192.0.2.1:9090"] {
            assert!(policy.check(target.parse().unwrap()).is_ok(), "{target}");
        }
    }

    #[tokio::test]
    async fn names_are_checked_by_what_they_resolve_to() {
        let policy = Policy { own: vec!["127.0.0.1:9090".parse().unwrap()], ..Policy::default() };
        let names = NameCache::default();
        for name in ["localhost", "2130706433", "0x7f000001", "::ffff:127.0.0.1"] {
            let refused = policy.check_destination(Address::domain(name, 9090), "u", &names, names.own()).await;
            assert!(matches!(refused, Err((Refusal::Own, _))), "{name}: {refused:?}");
        }
        // Other ports: names are dialed as names, numeric ones as the address they spell.
        let localhost = Address::domain("localhost", 9091);
        let checked = policy.check_destination(localhost.clone(), "u", &names, names.own()).await;
        assert_eq!(checked.map(|c| c.destination), Ok(localhost));
        let numeric = policy.check_destination(Address::domain("0x7f000001", 9091), "u", &names, names.own()).await;
        assert_eq!(numeric.map(|c| c.destination), Ok(Address::socket("127.0.0.1:9091".parse().unwrap())));
        let deny = Policy { deny: vec![Cidr::parse("127.0.0.0/8").unwrap()], ..Policy::default() };
        assert!(matches!(
            deny.check_destination(Address::domain("localhost", 1), "u", &names, names.own()).await,
            Err((Refusal::Deny, _))
        ));
    }

    #[tokio::test]
    async fn with_deny_rules_a_name_is_dialed_at_the_address_that_was_checked() {
        let deny = Policy { deny: vec![Cidr::parse("192.0.2.0/24").unwrap()], ..Policy::default() };
        let names = NameCache::default();
        let checked = deny.check_destination(Address::domain("localhost", 80), "u", &names, names.own()).await;
        let pinned = checked.unwrap().destination;
        assert!(matches!(pinned.host, Host::Ip(ip) if ip.is_loopback()), "{pinned:?}");
        assert_eq!(pinned.port, 80);
    }

    #[tokio::test]
    async fn checks_resolve_through_the_shared_cache_once_per_name() {
        let deny = Policy { deny: vec![Cidr::parse("192.0.2.0/24").unwrap()], ..Policy::default() };
        let names = NameCache::default();
        let checks =
            (0..50).map(|_| deny.check_destination(Address::domain("localhost", 80), "u", &names, names.own()));
        for checked in futures_util::future::join_all(checks).await {
            let destination = checked.map(|c| c.destination);
            assert!(
                matches!(destination, Ok(Address { host: Host::Ip(ip), .. }) if ip.is_loopback()),
                "{destination:?}"
            );
        }
        deny.check_destination(Address::domain("localhost", 443), "u", &names, names.own()).await.unwrap();
        assert_eq!(names.lookups(), 1, "50 concurrent checks and one later, one lookup");
    }

    #[tokio::test]
    async fn a_rule_naming_an_upstream_hands_it_over_for_streams_and_refuses_datagrams() {
        use crate::server::route::spec::{RuleSpec, UpstreamSpec, compile_with_upstreams};
        let upstream: UpstreamSpec =
            serde_json::from_str(r#"{"name": "warp", "type": "socks5", "address": "127.0.0.1:40000"}"#).unwrap();
        let rule: RuleSpec =
            serde_json::from_str(r#"{"domain-suffix": "example.com", "action": "upstream:warp"}"#).unwrap();
        let routes = compile_with_upstreams(&[rule], &[upstream], &RouteCounters::default()).unwrap();
        let policy = Policy { routes: Arc::new(routes), ..Policy::default() };
        let names = NameCache::default();
        let via = policy.check_destination(Address::domain("www.example.com", 443), "u", &names, names.own()).await;
        let via = via.unwrap();
        assert_eq!(via.upstream.map(|u| u.name.clone()).as_deref(), Some("warp"));
        assert_eq!(via.destination, Address::domain("www.example.com", 443), "the upstream resolves the name");
        let direct = policy.check_destination(Address::domain("example.org", 443), "u", &names, names.own()).await;
        assert!(direct.unwrap().upstream.is_none());
        let datagram = policy.check_datagram("192.0.2.1:443".parse().unwrap(), Some("a.example.com"), "u");
        assert!(
            matches!(&datagram, Err((Refusal::Route, why)) if why.contains("upstream warp carries TCP streams only")),
            "{datagram:?}"
        );
        assert_eq!(names.lookups(), 0, "no rule looks at addresses: nothing resolved");
    }
}
