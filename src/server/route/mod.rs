//! Outbound routing: which rule a stream's destination meets, and what happens to it.
//!
//! Rules come from `[[route]]` tables (see docs/routing.md), in order; the first that
//! matches decides, and a destination no rule matches goes direct. Within a rule the
//! destination conditions (`domain`, `domain-suffix`, `domain-keyword`, `domain-regex`,
//! `ip-cidr`, `rule-set`) are alternatives: any one matching is enough; `port`, `network`
//! and `user`, when given, must each match too. A rule with no condition matches all.
//!
//! Domain conditions see the name the client asked for; `ip-cidr` sees the addresses it
//! resolves to (any one in range matches) or the address the client gave. Names are
//! resolved only when some rule has address conditions.
//!
//! A rule's action is `direct`, `block`, or `upstream:NAME`: one of the `[[upstream]]`
//! tables ([`super::upstream`]), compiled with the rules so a rule cannot name a missing one.
//!
//! Rules are pure data: [`Routes::decide`] does no I/O, the caller resolves names and
//! answers the client. Each rule counts its decisions in a counter that lives as long as
//! a rule of that name does, so a reload that keeps a rule keeps its count.

pub mod cidrs;
pub mod domains;
pub mod spec;

use std::collections::HashMap;
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use cidrs::CidrSet;
use domains::DomainSet;

use super::upstream::{Upstream, UpstreamCounters};

/// What a matching rule does with the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Dial the destination from this server.
    Direct,
    /// Refuse it: the stream's SYNACK carries the rule's name.
    Block,
    /// Send it through the upstream at this index of [`Routes::upstreams`].
    Upstream(usize),
}

/// Which transport the stream asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Network {
    Tcp,
    Udp,
}

/// One compiled rule.
#[derive(Debug)]
pub struct Rule {
    pub name: String,
    pub action: Action,
    domains: DomainSet,
    keywords: Vec<String>,
    regexes: Option<regex::RegexSet>,
    cidrs: CidrSet,
    ports: Vec<RangeInclusive<u16>>,
    network: Option<Network>,
    users: Vec<String>,
    decisions: Arc<AtomicU64>,
}

impl Rule {
    fn has_destination_conditions(&self) -> bool {
        !self.domains.is_empty() || !self.keywords.is_empty() || self.regexes.is_some() || !self.cidrs.is_empty()
    }

    fn matches(&self, query: &Query) -> bool {
        if !self.ports.is_empty() && !self.ports.iter().any(|range| range.contains(&query.port)) {
            return false;
        }
        if self.network.is_some_and(|network| network != query.network) {
            return false;
        }
        if !self.users.is_empty() && !self.users.iter().any(|user| user == query.user) {
            return false;
        }
        if !self.has_destination_conditions() {
            return true;
        }
        if let Some(name) = query.name
            && (self.domains.matches(name)
                || self.keywords.iter().any(|keyword| name.contains(keyword.as_str()))
                || self.regexes.as_ref().is_some_and(|set| set.is_match(name)))
        {
            return true;
        }
        !self.cidrs.is_empty() && query.addresses.iter().any(|ip| self.cidrs.contains(*ip))
    }

    /// How many destinations this rule decided (kept across reloads for the same name).
    pub fn decisions(&self) -> u64 {
        self.decisions.load(Ordering::Relaxed)
    }
}

/// What a decision is taken on.
#[derive(Debug, Clone, Copy)]
pub struct Query<'a> {
    /// The name asked for, canonical ([`domains::canonical`]); none for an address.
    pub name: Option<&'a str>,
    /// The address asked for, or those the name resolved to (empty when not resolved).
    pub addresses: &'a [IpAddr],
    pub port: u16,
    pub network: Network,
    pub user: &'a str,
}

/// The rules, in order, the upstreams they name, and the count of destinations none matched.
#[derive(Debug, Default)]
pub struct Routes {
    rules: Vec<Rule>,
    upstreams: Vec<Arc<Upstream>>,
    unmatched: Arc<AtomicU64>,
}

/// The rule that decided, or none (direct, counted as `default`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision<'a> {
    pub rule: Option<&'a str>,
    pub action: Action,
}

/// The name under which destinations no rule matched are counted.
pub const DEFAULT_RULE: &str = "default";

impl Routes {
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Every `[[upstream]]`, named by a rule or not.
    pub fn upstreams(&self) -> &[Arc<Upstream>] {
        &self.upstreams
    }

    /// The upstream an [`Action::Upstream`] names.
    pub fn upstream(&self, index: usize) -> &Arc<Upstream> {
        &self.upstreams[index]
    }

    /// `direct`, `block` or `upstream:NAME`, as the config file writes it.
    pub fn action_name(&self, action: Action) -> String {
        match action {
            Action::Direct => "direct".into(),
            Action::Block => "block".into(),
            Action::Upstream(index) => format!("upstream:{}", self.upstreams[index].name),
        }
    }

    /// Whether deciding on a name needs its addresses: some rule has `ip-cidr`.
    pub fn needs_addresses(&self) -> bool {
        self.rules.iter().any(|rule| !rule.cidrs.is_empty())
    }

    /// The first matching rule's action, counted.
    pub fn decide(&self, query: &Query) -> Decision<'_> {
        match self.rules.iter().find(|rule| rule.matches(query)) {
            Some(rule) => {
                rule.decisions.fetch_add(1, Ordering::Relaxed);
                Decision { rule: Some(&rule.name), action: rule.action }
            }
            None => {
                self.unmatched.fetch_add(1, Ordering::Relaxed);
                Decision { rule: None, action: Action::Direct }
            }
        }
    }

    /// Decisions per rule name with its action, `default` (direct) included.
    pub fn counts(&self) -> Vec<(String, String, u64)> {
        let mut counts: Vec<_> =
            self.rules.iter().map(|r| (r.name.clone(), self.action_name(r.action), r.decisions())).collect();
        counts.push((DEFAULT_RULE.to_string(), "direct".into(), self.unmatched.load(Ordering::Relaxed)));
        counts
    }
}

/// The counters of rules by name, shared by successive [`Routes`] of one server so that a
/// reload keeps the counts of the rules it keeps (metrics counters never go backwards).
/// Upstreams' counters are kept the same way, by upstream name.
#[derive(Debug, Default)]
pub struct RouteCounters {
    by_name: std::sync::Mutex<HashMap<String, Arc<AtomicU64>>>,
    upstreams: std::sync::Mutex<HashMap<String, Arc<UpstreamCounters>>>,
}

impl RouteCounters {
    fn counter(&self, name: &str) -> Arc<AtomicU64> {
        let mut by_name = self.by_name.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        by_name.entry(name.to_string()).or_default().clone()
    }

    fn upstream(&self, name: &str) -> Arc<UpstreamCounters> {
        let mut by_name = self.upstreams.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        by_name.entry(name.to_string()).or_default().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::spec::{RuleSpec, compile};
    use super::*;

    fn routes(json: &str) -> Routes {
        let specs: Vec<RuleSpec> = serde_json::from_str(json).unwrap();
        compile(&specs, &RouteCounters::default()).unwrap()
    }

    fn query<'a>(name: Option<&'a str>, addresses: &'a [IpAddr], port: u16, user: &'a str) -> Query<'a> {
        Query { name, addresses, port, network: Network::Tcp, user }
    }

    #[test]
    fn the_first_matching_rule_decides_and_no_match_is_direct() {
        let routes = routes(
            r#"[{"name": "ads", "domain-suffix": ["ads.example"], "action": "block"},
                {"name": "all-ads-ok", "domain-keyword": "ads", "action": "direct"},
                {"name": "tracker", "domain-regex": "^tracker[0-9]+\\.", "action": "block"}]"#,
        );
        let decide = |name: &str| routes.decide(&query(Some(name), &[], 443, "amy"));
        assert_eq!(decide("x.ads.example"), Decision { rule: Some("ads"), action: Action::Block });
        assert_eq!(decide("myads.example"), Decision { rule: Some("all-ads-ok"), action: Action::Direct });
        assert_eq!(decide("tracker12.example.org").rule, Some("tracker"));
        assert_eq!(decide("example.org"), Decision { rule: None, action: Action::Direct });
        let counts = routes.counts();
        assert_eq!(counts[0], ("ads".to_string(), "block".to_string(), 1));
        assert_eq!(counts.last().unwrap(), &("default".to_string(), "direct".to_string(), 1));
    }

    #[test]
    fn port_network_and_user_must_all_match_besides_the_destination() {
        let routes = routes(
            r#"[{"name": "bob-smtp", "port": [25, "465-587"], "network": "tcp", "user": "bob", "action": "block"}]"#,
        );
        let ip: [IpAddr; 1] = ["192.0.2.1".parse().unwrap()];
        assert_eq!(routes.decide(&query(None, &ip, 25, "bob")).action, Action::Block);
        assert_eq!(routes.decide(&query(None, &ip, 500, "bob")).action, Action::Block);
        assert_eq!(routes.decide(&query(None, &ip, 588, "bob")).action, Action::Direct);
        assert_eq!(routes.decide(&query(None, &ip, 25, "amy")).action, Action::Direct);
        let udp = Query { network: Network::Udp, ..query(None, &ip, 25, "bob") };
        assert_eq!(routes.decide(&udp).action, Action::Direct);
    }

    #[test]
    fn address_conditions_see_resolved_addresses_and_given_ones() {
        let routes = routes(r#"[{"name": "docs", "ip-cidr": ["192.0.2.0/24", "2001:db8::/32"], "action": "block"}]"#);
        assert!(routes.needs_addresses());
        let inside: [IpAddr; 2] = ["198.51.100.1".parse().unwrap(), "192.0.2.9".parse().unwrap()];
        assert_eq!(routes.decide(&query(Some("example.org"), &inside, 80, "a")).action, Action::Block);
        assert_eq!(routes.decide(&query(Some("example.org"), &inside[..1], 80, "a")).action, Action::Direct);
        let v6: [IpAddr; 1] = ["2001:db8::1".parse().unwrap()];
        assert_eq!(routes.decide(&query(None, &v6, 80, "a")).action, Action::Block);
    }

    #[test]
    fn a_rule_without_conditions_matches_everything_after_it() {
        let routes = routes(r#"[{"name": "only-web", "port": [80, 443], "action": "direct"}, {"action": "block"}]"#);
        assert_eq!(routes.decide(&query(Some("a.example"), &[], 443, "a")).action, Action::Direct);
        let other = routes.decide(&query(Some("a.example"), &[], 22, "a"));
        assert_eq!(other, Decision { rule: Some("route#2"), action: Action::Block });
    }

    #[test]
    fn a_reload_keeps_the_count_of_a_rule_it_keeps() {
        let counters = RouteCounters::default();
        let json = r#"[{"name": "ads", "domain-suffix": "ads.example", "action": "block"}]"#;
        let specs: Vec<RuleSpec> = serde_json::from_str(json).unwrap();
        let first = compile(&specs, &counters).unwrap();
        first.decide(&query(Some("ads.example"), &[], 443, "a"));
        let again = compile(&specs, &counters).unwrap();
        again.decide(&query(Some("x.ads.example"), &[], 443, "a"));
        assert_eq!(again.rules()[0].decisions(), 2);
    }
}
