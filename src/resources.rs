//! Process resources — file descriptors and memory — and the default caps derived
//! from them.
//!
//! Fixed defaults were wrong both ways: 4,096 sessions refused the 4,097th user on a
//! machine that could carry ten times that, while under `ulimit -n 1024` warm
//! connections alone could take every descriptor and stop `accept`. So the binaries
//! raise the soft descriptor limit to the hard one (as servers do) and split what
//! they get: a fixed reserve, a small share warm connections can never exceed, and the
//! rest shared by client connections and streams (one descriptor each, whatever the mix:
//! one stream per session needs two per stream, a multiplexing client far fewer), so
//! that together they never exceed the limit. A flag given explicitly wins over its
//! derived default.

/// Descriptors kept out of every share: standard streams, listeners, the API,
/// name lookups, log files.
const RESERVED_FDS: u64 = 64;

/// The process's descriptor limit after [`raise_fd_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimit {
    /// The soft limit now in force.
    pub limit: u64,
    /// The soft limit before, when it was raised.
    pub raised_from: Option<u64>,
}

impl std::fmt::Display for FdLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.raised_from {
            Some(before) => write!(f, "{} (soft limit raised from {before} to the hard limit)", self.limit),
            None => write!(f, "{}", self.limit),
        }
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard limit and returns what is in force.
pub fn raise_fd_limit() -> FdLimit {
    let mut current = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut current) } != 0 {
        return FdLimit { limit: 1024, raised_from: None };
    }
    if current.rlim_cur >= current.rlim_max {
        return FdLimit { limit: current.rlim_cur, raised_from: None };
    }
    let raised = libc::rlimit { rlim_cur: current.rlim_max, rlim_max: current.rlim_max };
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        FdLimit { limit: raised.rlim_cur, raised_from: Some(current.rlim_cur) }
    } else {
        FdLimit { limit: current.rlim_cur, raised_from: None }
    }
}

/// The server's caps derived from the descriptor limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerCaps {
    /// Descriptors shared by client connections (authenticating or in session) and
    /// streams (each holds one outbound socket): all the usable ones but the warm share.
    pub descriptors: usize,
    /// Connections in TLS/authentication at once (a bound on work, 1/16 of the usable
    /// descriptors; they hold shared descriptors too).
    pub handshakes: usize,
    /// Warm outbound connections across all targets: 1/32, and never more than 1,024
    /// (warm connections are a convenience, not a service).
    pub warm: usize,
}

impl ServerCaps {
    /// How each default follows the limit, in words: what `--help` and the README say.
    pub const HANDSHAKES_RULE: &str = "1/16 of the usable file descriptors (the limit less 64)";
    pub const WARM_RULE: &str = "1/32 of the usable file descriptors, at most 1024";
    pub const SHARED_RULE: &str = "the usable file descriptors less the warm share";

    pub fn for_fd_limit(limit: u64) -> ServerCaps {
        let usable = usable_fds(limit) as usize;
        let warm = (usable / 32).clamp(1, 1024);
        ServerCaps { descriptors: usable - warm, handshakes: (usable / 16).max(1), warm }
    }
}

/// Local connections the client serves at once: each holds its own descriptor and, at
/// worst, a session of its own (the client opens a session per concurrent stream, as the
/// reference does), so half the usable descriptors.
pub fn client_connections_for_fd_limit(limit: u64) -> usize {
    (usable_fds(limit) / 2) as usize
}

/// Descriptors left for connections under `limit` after the reserve (never below 64).
fn usable_fds(limit: u64) -> u64 {
    limit.saturating_sub(RESERVED_FDS).max(64)
}

/// Physical memory in bytes, if the system says.
pub fn physical_memory() -> Option<u64> {
    // SAFETY: sysconf has no memory-safety preconditions.
    let (pages, page_size) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
    (pages > 0 && page_size > 0).then(|| pages as u64 * page_size as u64)
}

/// Default for buffered stream data across all sessions: 1/16 of physical memory,
/// between 64 MiB and 1 GiB (see `session::budget`).
pub fn default_buffer_budget() -> usize {
    const MIB: u64 = 1 << 20;
    let memory = physical_memory().unwrap_or(1024 * MIB);
    (memory / 16).clamp(64 * MIB, 1024 * MIB) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_serves_half_the_usable_descriptors_as_local_connections() {
        assert_eq!(client_connections_for_fd_limit(20_000), 9_968);
        assert_eq!(client_connections_for_fd_limit(1024), 480);
        assert_eq!(client_connections_for_fd_limit(10), 32, "never below 32");
    }

    #[test]
    fn shares_never_exceed_the_limit_together() {
        for limit in [256, 1024, 20_000, 1 << 20] {
            let caps = ServerCaps::for_fd_limit(limit);
            assert!((caps.descriptors + caps.warm) as u64 <= limit, "{limit}: {caps:?}");
        }
    }

    #[test]
    fn a_common_hard_limit_carries_nine_thousand_streams_at_one_session_each() {
        let caps = ServerCaps::for_fd_limit(20_000);
        assert_eq!(caps, ServerCaps { descriptors: 19_313, handshakes: 1246, warm: 623 });
        assert!(caps.descriptors >= 2 * 9_500);
    }

    #[test]
    fn a_small_limit_keeps_warm_connections_small() {
        let caps = ServerCaps::for_fd_limit(1024);
        assert_eq!((caps.warm, caps.descriptors), (30, 930));
    }

    #[test]
    fn raising_is_idempotent_and_reports_what_is_in_force() {
        let first = raise_fd_limit();
        let second = raise_fd_limit();
        assert_eq!(second, FdLimit { limit: first.limit, raised_from: None });
        assert!(first.limit >= 64);
    }

    #[test]
    fn the_fd_limit_is_raised_to_the_hard_limit() {
        let fds = raise_fd_limit();
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit writes the struct we pass.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) }, 0);
        assert_eq!((fds.limit, limit.rlim_cur), (limit.rlim_max, limit.rlim_max));
    }

    #[test]
    fn the_buffer_budget_stays_in_its_bounds() {
        let budget = default_buffer_budget();
        assert!((64 << 20..=1 << 30).contains(&budget), "{budget}");
    }
}
