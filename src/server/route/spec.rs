//! `[[route]]` tables as written (JSON on the way from the config file) and their
//! compilation into [`Routes`], rule-set files read on the way.
//!
//! A rule-set file holds one entry a line, in the syntax of the community domain lists:
//! `full:NAME` (that name only), `domain:NAME` or a bare name (it and its subdomains),
//! `keyword:WORD`, `regexp:RE`, or an address range (`10.0.0.0/8`, `2001:db8::/32`, a bare
//! address). `#` starts a comment; blank lines are skipped.

use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::cidrs::CidrSet;
use super::domains::{DomainSet, canonical};
use super::{Action, Network, RouteCounters, Routes, Rule};
use crate::proto::Address;
use crate::server::dial::Bind;
use crate::server::policy::Cidr;
use crate::server::upstream::handshake::Credentials;
use crate::server::upstream::{Protocol, Upstream};

/// One `[[route]]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RuleSpec {
    pub name: Option<String>,
    #[serde(default)]
    pub domain: OneOrMany<String>,
    #[serde(default)]
    pub domain_suffix: OneOrMany<String>,
    #[serde(default)]
    pub domain_keyword: OneOrMany<String>,
    #[serde(default)]
    pub domain_regex: OneOrMany<String>,
    #[serde(default)]
    pub ip_cidr: OneOrMany<String>,
    #[serde(default)]
    pub port: OneOrMany<PortSpec>,
    pub network: Option<String>,
    #[serde(default)]
    pub user: OneOrMany<String>,
    #[serde(default)]
    pub rule_set: OneOrMany<PathBuf>,
    pub action: String,
}

/// The keys a `[[route]]` table may have, for error messages.
pub const RULE_KEYS: [&str; 11] = [
    "name",
    "domain",
    "domain-suffix",
    "domain-keyword",
    "domain-regex",
    "ip-cidr",
    "port",
    "network",
    "user",
    "rule-set",
    "action",
];

/// One `[[upstream]]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct UpstreamSpec {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// The proxy's `HOST:PORT` (`socks5`, `http`).
    pub address: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub connect_timeout_secs: Option<u64>,
    pub bind_address: Option<String>,
    pub bind_interface: Option<String>,
    pub fwmark: Option<u32>,
}

/// The keys an `[[upstream]]` table may have, for error messages.
pub const UPSTREAM_KEYS: [&str; 9] = [
    "name",
    "type",
    "address",
    "username",
    "password",
    "connect-timeout-secs",
    "bind-address",
    "bind-interface",
    "fwmark",
];

/// An upstream's dial and answer together, unless `connect-timeout-secs` says otherwise.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(10);

/// A value or a list of them (`port = 443` or `port = [80, 443]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> Default for OneOrMany<T> {
    fn default() -> Self {
        OneOrMany::Many(Vec::new())
    }
}

impl<T> OneOrMany<T> {
    fn items(&self) -> &[T] {
        match self {
            OneOrMany::One(one) => std::slice::from_ref(one),
            OneOrMany::Many(many) => many,
        }
    }
}

/// A port (`443`) or a range (`"8000-9000"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PortSpec {
    Port(u16),
    Range(String),
}

impl PortSpec {
    fn range(&self) -> Result<RangeInclusive<u16>, String> {
        match self {
            PortSpec::Port(port) => Ok(*port..=*port),
            PortSpec::Range(text) => {
                let bad = || format!("port {text:?}: expected a port or FIRST-LAST, e.g. 8000-9000");
                let (first, last) = text.split_once('-').unwrap_or((text, text));
                let first: u16 = first.trim().parse().map_err(|_| bad())?;
                let last: u16 = last.trim().parse().map_err(|_| bad())?;
                if first > last {
                    return Err(bad());
                }
                Ok(first..=last)
            }
        }
    }
}

/// What a rule's destination conditions gather, from the table and its rule sets.
#[derive(Default)]
struct Destinations {
    domains: DomainSet,
    keywords: Vec<String>,
    regexes: Vec<String>,
    cidrs: CidrSet,
}

impl Destinations {
    fn cidr(&mut self, text: &str) -> Result<(), String> {
        self.cidrs.insert(Cidr::parse(text).map_err(|e| e.to_string())?);
        Ok(())
    }

    /// One line of a rule-set file.
    fn line(&mut self, line: &str) -> Result<(), String> {
        if let Some(name) = line.strip_prefix("full:") {
            self.domains.insert_full(checked_name(name)?);
        } else if let Some(name) = line.strip_prefix("domain:") {
            self.domains.insert_suffix(checked_name(name)?);
        } else if let Some(word) = line.strip_prefix("keyword:") {
            self.keywords.push(canonical(word));
        } else if let Some(re) = line.strip_prefix("regexp:") {
            self.regexes.push(re.to_string());
        } else if line.contains('/') || line.parse::<std::net::IpAddr>().is_ok() {
            self.cidr(line)?;
        } else {
            self.domains.insert_suffix(checked_name(line)?);
        }
        Ok(())
    }

    fn load(&mut self, path: &Path) -> Result<(), String> {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("rule-set {}: cannot read: {e}", path.display()))?;
        for (number, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or_default().trim();
            if !line.is_empty() {
                self.line(line).map_err(|why| format!("rule-set {}:{}: {why}", path.display(), number + 1))?;
            }
        }
        Ok(())
    }
}

/// A domain as a rule names it: letters, digits, `-`, `_`, `.` and `*`-free.
fn checked_name(name: &str) -> Result<&str, String> {
    let ok = !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok { Ok(name) } else { Err(format!("{name:?} is not a domain name")) }
}

/// The rules `specs` describe, with no upstreams.
pub fn compile(specs: &[RuleSpec], counters: &RouteCounters) -> Result<Routes, String> {
    compile_with_upstreams(specs, &[], counters)
}

/// The rules `specs` describe and the `upstreams` they may name, their counters taken
/// from `counters` by name.
pub fn compile_with_upstreams(
    specs: &[RuleSpec],
    upstreams: &[UpstreamSpec],
    counters: &RouteCounters,
) -> Result<Routes, String> {
    let mut compiled: Vec<Arc<Upstream>> = Vec::with_capacity(upstreams.len());
    for spec in upstreams {
        let upstream = compile_upstream(spec, counters).map_err(|why| format!("[[upstream]] {}: {why}", spec.name))?;
        if compiled.iter().any(|known| known.name == upstream.name) {
            return Err(format!("[[upstream]] {}: the name is taken (each upstream needs its own)", spec.name));
        }
        compiled.push(Arc::new(upstream));
    }
    let mut rules = Vec::with_capacity(specs.len());
    for (i, spec) in specs.iter().enumerate() {
        let name = spec.name.clone().unwrap_or_else(|| format!("route#{}", i + 1));
        let rule =
            compile_rule(spec, name.clone(), &compiled, counters).map_err(|why| format!("[[route]] {name}: {why}"))?;
        if rules.iter().any(|r: &Rule| r.name == name) || name == super::DEFAULT_RULE {
            return Err(format!("[[route]] {name}: the name is taken (each rule needs its own, and not `default`)"));
        }
        rules.push(rule);
    }
    Ok(Routes { rules, upstreams: compiled, unmatched: counters.counter(super::DEFAULT_RULE) })
}

fn compile_upstream(spec: &UpstreamSpec, counters: &RouteCounters) -> Result<Upstream, String> {
    if spec.name.is_empty() || spec.name.contains(char::is_whitespace) {
        return Err("name: expected a word, e.g. \"warp\"".into());
    }
    let credentials = match (&spec.username, &spec.password) {
        (None, None) => None,
        (Some(username), Some(password)) => {
            Some(Credentials { username: username.clone(), password: password.clone() })
        }
        _ => return Err("username and password go together".into()),
    };
    let proxy = || -> Result<Address, String> {
        let text = spec.address.as_deref().ok_or("address: required (the proxy's HOST:PORT)")?;
        Address::parse_host_port(text).ok_or_else(|| format!("address {text:?}: expected HOST:PORT"))
    };
    let protocol = match spec.kind.as_str() {
        "socks5" => Protocol::Socks5 { proxy: proxy()?, credentials },
        "http" => Protocol::Http { proxy: proxy()?, credentials },
        "direct" => {
            if spec.address.is_some() || credentials.is_some() {
                return Err("type \"direct\" dials the destination itself: no address, username or password".into());
            }
            Protocol::Direct
        }
        other => return Err(format!("type {other:?}: expected \"socks5\", \"http\" or \"direct\"")),
    };
    if let Some(Credentials { username, password }) = match &protocol {
        Protocol::Socks5 { credentials, .. } => credentials.as_ref(),
        _ => None,
    } && (username.len() > 255 || password.len() > 255)
    {
        return Err("SOCKS5 carries a username and password of at most 255 bytes each".into());
    }
    let address = match &spec.bind_address {
        None => None,
        Some(text) => Some(text.parse().map_err(|_| format!("bind-address {text:?}: expected an IP address"))?),
    };
    if spec.bind_interface.as_ref().is_some_and(|name| name.is_empty() || name.len() > 15) {
        return Err("bind-interface: expected an interface name (at most 15 bytes), e.g. \"eth1\"".into());
    }
    let bind = Bind { address, interface: spec.bind_interface.clone(), fwmark: spec.fwmark };
    let timeout = match spec.connect_timeout_secs {
        Some(0) => return Err("connect-timeout-secs: expected at least 1".into()),
        Some(secs) => Duration::from_secs(secs),
        None => UPSTREAM_TIMEOUT,
    };
    Ok(Upstream {
        name: spec.name.clone(),
        protocol,
        bind: (bind != Bind::default()).then_some(bind),
        timeout,
        counters: counters.upstream(&spec.name),
    })
}

fn compile_rule(
    spec: &RuleSpec,
    name: String,
    upstreams: &[Arc<Upstream>],
    counters: &RouteCounters,
) -> Result<Rule, String> {
    let action = match spec.action.as_str() {
        "direct" => Action::Direct,
        "block" => Action::Block,
        other if other.starts_with("upstream:") => {
            let wanted = &other["upstream:".len()..];
            match upstreams.iter().position(|upstream| upstream.name == wanted) {
                Some(index) => Action::Upstream(index),
                None => {
                    let known: Vec<&str> = upstreams.iter().map(|upstream| upstream.name.as_str()).collect();
                    let known = if known.is_empty() { "none".to_string() } else { known.join(", ") };
                    return Err(format!("action {other:?}: no [[upstream]] is named {wanted:?} (there are: {known})"));
                }
            }
        }
        other => return Err(format!("action {other:?}: expected \"direct\", \"block\" or \"upstream:NAME\"")),
    };
    let network = match spec.network.as_deref() {
        None => None,
        Some("tcp") => Some(Network::Tcp),
        Some("udp") => Some(Network::Udp),
        Some(other) => return Err(format!("network {other:?}: expected \"tcp\" or \"udp\"")),
    };
    let mut found = Destinations::default();
    for domain in spec.domain.items() {
        found.domains.insert_full(checked_name(domain)?);
    }
    for suffix in spec.domain_suffix.items() {
        found.domains.insert_suffix(checked_name(suffix.trim_start_matches('.'))?);
    }
    found.keywords.extend(spec.domain_keyword.items().iter().map(|k| canonical(k)));
    found.regexes.extend(spec.domain_regex.items().iter().cloned());
    for range in spec.ip_cidr.items() {
        found.cidr(range)?;
    }
    for path in spec.rule_set.items() {
        found.load(path)?;
    }
    found.cidrs.seal();
    let regexes = match found.regexes.is_empty() {
        true => None,
        false => Some(regex::RegexSet::new(&found.regexes).map_err(|e| format!("domain-regex: {e}"))?),
    };
    let ports = spec.port.items().iter().map(PortSpec::range).collect::<Result<_, _>>()?;
    Ok(Rule {
        decisions: counters.counter(&name),
        name,
        action,
        domains: found.domains,
        keywords: found.keywords,
        regexes,
        cidrs: found.cidrs,
        ports,
        network,
        users: spec.user.items().to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::super::Query;
    use super::*;

    fn spec(json: &str) -> RuleSpec {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn rule_set_lines_in_each_form_load_and_match() {
        let dir = std::env::temp_dir().join(format!("anytls-rule-set-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("list.txt");
        std::fs::write(
            &file,
            "# trackers\nfull:exact.example\ndomain:suffix.example\nbare.example   # a comment\n\nkeyword:torrent\n\
             regexp:^ad[0-9]+\\.\n203.0.113.0/24\n2001:db8::1\n",
        )
        .unwrap();
        let rule = format!(r#"{{"name": "list", "rule-set": {:?}, "action": "block"}}"#, file.display().to_string());
        let routes = compile(&[spec(&rule)], &RouteCounters::default()).unwrap();
        let blocked = |name: Option<&str>, ip: Option<&str>| {
            let addresses: Vec<std::net::IpAddr> = ip.iter().map(|ip| ip.parse().unwrap()).collect();
            let query = Query { name, addresses: &addresses, port: 443, network: Network::Tcp, user: "u" };
            routes.decide(&query).action == Action::Block
        };
        assert!(blocked(Some("exact.example"), None));
        assert!(!blocked(Some("a.exact.example"), None));
        assert!(blocked(Some("a.suffix.example"), None));
        assert!(blocked(Some("x.bare.example"), None));
        assert!(blocked(Some("mytorrents.example"), None));
        assert!(blocked(Some("ad12.example"), None));
        assert!(!blocked(Some("bad12.example"), None));
        assert!(blocked(None, Some("203.0.113.77")));
        assert!(blocked(None, Some("2001:db8::1")));
        assert!(!blocked(Some("example.org"), Some("198.51.100.1")));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn mistakes_are_named_with_their_rule_file_and_line() {
        let counters = RouteCounters::default();
        let err = |json: &str| compile(&[spec(json)], &counters).unwrap_err();
        assert!(err(r#"{"name": "x", "action": "drop"}"#).contains("[[route]] x: action \"drop\""));
        assert!(err(r#"{"action": "upstream:warp"}"#).contains("no [[upstream]] is named \"warp\" (there are: none)"));
        assert!(err(r#"{"port": "9000-8000", "action": "block"}"#).contains("port \"9000-8000\""));
        assert!(err(r#"{"ip-cidr": "10.0.0.0/33", "action": "block"}"#).contains("bad CIDR"));
        assert!(err(r#"{"domain-regex": "(", "action": "block"}"#).contains("domain-regex"));
        assert!(err(r#"{"network": "sctp", "action": "block"}"#).contains("network \"sctp\""));
        assert!(err(r#"{"domain": "a b", "action": "block"}"#).contains("not a domain name"));
        assert!(err(r#"{"rule-set": "/nonexistent/list", "action": "block"}"#).contains("cannot read"));
        let file = std::env::temp_dir().join(format!("anytls-bad-rule-set-{}", std::process::id()));
        std::fs::write(&file, "good.example\nbad name\n").unwrap();
        let bad = format!(r#"{{"rule-set": {:?}, "action": "block"}}"#, file.display().to_string());
        assert!(err(&bad).ends_with(&format!("rule-set {}:2: \"bad name\" is not a domain name", file.display())));
        std::fs::remove_file(&file).unwrap();
        let twice = [spec(r#"{"name": "a", "action": "block"}"#), spec(r#"{"name": "a", "action": "direct"}"#)];
        assert!(compile(&twice, &counters).unwrap_err().contains("the name is taken"));
        assert!(serde_json::from_str::<RuleSpec>(r#"{"domian": "x", "action": "block"}"#).is_err());
    }

    fn upstream(json: &str) -> UpstreamSpec {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn rules_name_upstreams_and_their_mistakes_are_named() {
        let counters = RouteCounters::default();
        let upstreams = [
            upstream(
                r#"{"name": "warp", "type": "socks5", "address": "127.0.0.1:40000", "username": "u", "password": "p"}"#,
            ),
            upstream(r#"{"name": "corp", "type": "http", "address": "proxy.example:3128", "connect-timeout-secs": 3}"#),
            upstream(r#"{"name": "second-ip", "type": "direct", "bind-address": "127.0.0.2"}"#),
        ];
        let rules = [spec(r#"{"name": "via-warp", "domain-suffix": "example.com", "action": "upstream:corp"}"#)];
        let routes = compile_with_upstreams(&rules, &upstreams, &counters).unwrap();
        assert_eq!(routes.rules()[0].action, Action::Upstream(1));
        assert_eq!(routes.action_name(routes.rules()[0].action), "upstream:corp");
        assert_eq!(routes.upstream(1).timeout, Duration::from_secs(3));
        assert_eq!(routes.upstream(0).timeout, UPSTREAM_TIMEOUT);
        assert_eq!(routes.upstream(2).bind.as_ref().unwrap().address, Some("127.0.0.2".parse().unwrap()));
        assert!(
            matches!(&routes.upstream(0).protocol, Protocol::Socks5 { credentials: Some(c), .. } if c.username == "u")
        );

        let err = |json: &str| compile_with_upstreams(&[], &[upstream(json)], &counters).unwrap_err();
        assert!(err(r#"{"name": "a", "type": "socks4", "address": "h:1"}"#).contains("type \"socks4\""));
        assert!(err(r#"{"name": "a", "type": "socks5"}"#).contains("address: required"));
        assert!(err(r#"{"name": "a", "type": "http", "address": "nowhere"}"#).contains("expected HOST:PORT"));
        assert!(err(r#"{"name": "a", "type": "http", "address": "h:1", "username": "u"}"#).contains("go together"));
        assert!(err(r#"{"name": "a", "type": "direct", "address": "h:1"}"#).contains("no address"));
        assert!(err(r#"{"name": "a", "type": "direct", "bind-address": "eth0"}"#).contains("bind-address"));
        assert!(err(r#"{"name": "a", "type": "direct", "connect-timeout-secs": 0}"#).contains("at least 1"));
        let twice = [upstream(r#"{"name": "a", "type": "direct"}"#), upstream(r#"{"name": "a", "type": "direct"}"#)];
        assert!(compile_with_upstreams(&[], &twice, &counters).unwrap_err().contains("the name is taken"));
        assert!(serde_json::from_str::<UpstreamSpec>(r#"{"name": "a", "type": "direct", "adress": "x"}"#).is_err());
    }
}
