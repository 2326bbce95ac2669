//! Choosing among several servers, as a pure state machine: success and failure events
//! and the time go in, the server to use and the servers to probe come out. No I/O, so
//! every rule below is tested without sockets (the I/O lives in `client::servers`).
//!
//! A server is *down* after `threshold` consecutive failures (one failure may be a
//! blip; waiting for several avoids flapping). A failure is "no session" (connect, TLS,
//! authentication) or "the session died while opening a stream"; a server refusing a
//! stream in its SYNACK is the target's fault and counts as a success for the server.
//! Down servers are probed every `probe_interval`; a successful probe (or any success)
//! brings one back.
//! - `Failover`: always the first server in the list that is up, so traffic returns to
//!   the primary as soon as a probe finds it healthy again.
//! - `RoundRobin`: each new connection takes the next server that is up.
//!
//! When every server is down, connections rotate over all of them instead of failing
//! outright: whichever comes back first is found by real traffic as well as by probes.

use std::time::{Duration, Instant};

/// How new connections pick a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// The first healthy server in the order given; the others are standbys.
    #[default]
    Failover,
    /// Rotate over the healthy servers, one new connection each.
    RoundRobin,
}

impl Policy {
    /// Every policy, in the order help text lists them.
    pub const ALL: [Policy; 2] = [Policy::Failover, Policy::RoundRobin];

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Policy::Failover => "failover",
            Policy::RoundRobin => "round-robin",
        }
    }

    /// The names, comma-separated: what an error lists.
    pub fn names() -> String {
        Self::ALL.map(Self::name).join(", ")
    }

    /// The policy in one sentence (the flag's full help, beside each name).
    pub fn description(self) -> &'static str {
        match self {
            Policy::Failover => "The first healthy server in the order given; the others are standbys",
            Policy::RoundRobin => "Rotate over the healthy servers, one new connection each",
        }
    }
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A `--policy` value that names no policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown policy {0:?}: expected one of {names}", names = Policy::names())]
pub struct UnknownPolicy(pub String);

impl std::str::FromStr for Policy {
    type Err = UnknownPolicy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|policy| policy.name() == s).ok_or_else(|| UnknownPolicy(s.to_owned()))
    }
}

#[derive(Debug, Clone, Default)]
struct Health {
    consecutive_failures: u32,
    down: bool,
    /// When a down server is next probed; `None` while a probe is running.
    next_probe: Option<Instant>,
}

/// The health of the client's servers and the policy over them.
#[derive(Debug, Clone)]
pub struct ServerSet {
    policy: Policy,
    threshold: u32,
    probe_interval: Duration,
    servers: Vec<Health>,
    /// Round-robin cursor (also used when every server is down).
    cursor: usize,
}

impl ServerSet {
    /// `count` servers, in order of preference. A threshold of 0 is taken as 1.
    pub fn new(count: usize, policy: Policy, threshold: u32, probe_interval: Duration) -> ServerSet {
        ServerSet {
            policy,
            threshold: threshold.max(1),
            probe_interval,
            servers: vec![Health::default(); count],
            cursor: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.servers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    pub fn is_up(&self, server: usize) -> bool {
        self.servers.get(server).is_some_and(|health| !health.down)
    }

    /// The server for a new connection; `None` only for an empty set.
    pub fn pick(&mut self) -> Option<usize> {
        let count = self.servers.len();
        if count == 0 {
            return None;
        }
        if self.policy == Policy::Failover
            && let Some(first_up) = (0..count).find(|&i| self.is_up(i))
        {
            return Some(first_up);
        }
        // Round robin over the servers that are up, or over all when none is.
        let any_up = (0..count).any(|i| self.is_up(i));
        for step in 0..count {
            let candidate = (self.cursor + step) % count;
            if !any_up || self.is_up(candidate) {
                self.cursor = (candidate + 1) % count;
                return Some(candidate);
            }
        }
        None
    }

    /// A stream opened (or was refused by the server itself): the server works.
    pub fn record_success(&mut self, server: usize) {
        if let Some(health) = self.servers.get_mut(server) {
            if health.down {
                log::info!("server #{server} is back");
            }
            *health = Health::default();
        }
    }

    /// No session, or the session died while opening a stream.
    pub fn record_failure(&mut self, server: usize, now: Instant) {
        let (threshold, interval) = (self.threshold, self.probe_interval);
        let Some(health) = self.servers.get_mut(server) else { return };
        health.consecutive_failures = health.consecutive_failures.saturating_add(1);
        if !health.down && health.consecutive_failures >= threshold {
            log::warn!(
                "server #{server} is down after {threshold} consecutive failures; probing it every {interval:?}"
            );
            health.down = true;
            health.next_probe = Some(now + interval);
        }
    }

    /// Down servers whose probe is due; each is marked as being probed until
    /// [`ServerSet::probe_result`] is called for it.
    pub fn due_probes(&mut self, now: Instant) -> Vec<usize> {
        let mut due = Vec::new();
        for (server, health) in self.servers.iter_mut().enumerate() {
            if health.down && health.next_probe.is_some_and(|at| at <= now) {
                health.next_probe = None;
                due.push(server);
            }
        }
        due
    }

    /// The outcome of a probe started by [`ServerSet::due_probes`].
    pub fn probe_result(&mut self, server: usize, healthy: bool, now: Instant) {
        if healthy {
            self.record_success(server);
        } else if let Some(health) = self.servers.get_mut(server)
            && health.down
        {
            health.next_probe = Some(now + self.probe_interval);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_parse_and_print_their_names() {
        for policy in Policy::ALL {
            assert_eq!(policy.to_string().parse::<Policy>(), Ok(policy));
        }
        assert_eq!(Policy::ALL.map(Policy::name), ["failover", "round-robin"]);
        let err = "random".parse::<Policy>().unwrap_err().to_string();
        assert!(err.contains("\"random\"") && err.contains("failover, round-robin"), "{err}");
        assert_eq!(Policy::default(), Policy::Failover);
    }

    const PROBE: Duration = Duration::from_secs(5);

    fn fail(set: &mut ServerSet, server: usize, times: u32, now: Instant) {
        for _ in 0..times {
            set.record_failure(server, now);
        }
    }

    #[test]
    fn failover_stays_on_the_first_server_while_it_works() {
        let mut set = ServerSet::new(3, Policy::Failover, 3, PROBE);
        for _ in 0..10 {
            assert_eq!(set.pick(), Some(0));
            set.record_success(0);
        }
    }

    #[test]
    fn failover_switches_after_the_threshold_and_not_before() {
        let now = Instant::now();
        let mut set = ServerSet::new(2, Policy::Failover, 3, PROBE);
        fail(&mut set, 0, 2, now);
        assert_eq!(set.pick(), Some(0), "two failures are not enough");
        fail(&mut set, 0, 1, now);
        assert!(!set.is_up(0));
        assert_eq!(set.pick(), Some(1));
    }

    #[test]
    fn a_success_resets_the_count_of_consecutive_failures() {
        let now = Instant::now();
        let mut set = ServerSet::new(2, Policy::Failover, 3, PROBE);
        fail(&mut set, 0, 2, now);
        set.record_success(0);
        fail(&mut set, 0, 2, now);
        assert_eq!(set.pick(), Some(0));
    }

    #[test]
    fn a_down_server_is_probed_on_schedule_and_traffic_returns_after_a_good_probe() {
        let start = Instant::now();
        let mut set = ServerSet::new(2, Policy::Failover, 1, PROBE);
        set.record_failure(0, start);
        assert_eq!(set.pick(), Some(1));
        assert!(set.due_probes(start + Duration::from_secs(4)).is_empty(), "not yet due");
        assert_eq!(set.due_probes(start + PROBE), vec![0]);
        assert!(set.due_probes(start + PROBE * 2).is_empty(), "one probe at a time");
        set.probe_result(0, false, start + PROBE);
        assert_eq!(set.pick(), Some(1), "a failed probe keeps it down");
        assert!(set.due_probes(start + PROBE + Duration::from_secs(4)).is_empty());
        assert_eq!(set.due_probes(start + PROBE * 2), vec![0]);
        set.probe_result(0, true, start + PROBE * 2);
        assert_eq!(set.pick(), Some(0), "back to the primary");
    }

    #[test]
    fn round_robin_rotates_over_the_servers_that_are_up() {
        let now = Instant::now();
        let mut set = ServerSet::new(3, Policy::RoundRobin, 2, PROBE);
        let picks: Vec<_> = (0..6).filter_map(|_| set.pick()).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        fail(&mut set, 1, 2, now);
        let picks: Vec<_> = (0..4).filter_map(|_| set.pick()).collect();
        assert_eq!(picks, [0, 2, 0, 2]);
        set.record_success(1);
        let picks: Vec<_> = (0..3).filter_map(|_| set.pick()).collect();
        assert_eq!(picks.iter().filter(|&&s| s == 1).count(), 1);
    }

    #[test]
    fn with_every_server_down_connections_still_rotate_over_all() {
        let now = Instant::now();
        let mut set = ServerSet::new(2, Policy::Failover, 1, PROBE);
        fail(&mut set, 0, 1, now);
        fail(&mut set, 1, 1, now);
        let picks: Vec<_> = (0..4).filter_map(|_| set.pick()).collect();
        assert_eq!(picks, [0, 1, 0, 1]);
        set.record_success(1);
        assert_eq!(set.pick(), Some(1));
    }

    #[test]
    fn edge_cases_do_not_panic() {
        let mut empty = ServerSet::new(0, Policy::Failover, 0, PROBE);
        assert_eq!(empty.pick(), None);
        empty.record_failure(3, Instant::now());
        empty.record_success(3);
        empty.probe_result(3, true, Instant::now());
        let mut zero_threshold = ServerSet::new(1, Policy::RoundRobin, 0, PROBE);
        zero_threshold.record_failure(0, Instant::now());
        assert!(!zero_threshold.is_up(0), "a threshold of 0 acts as 1");
    }
}
