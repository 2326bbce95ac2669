//! Failed authentications at INFO, so that a user who cannot connect leaves a trace,
//! without letting a scanner fill the log: at most one line per source address per
//! [`AuthFailureLog::EVERY`], the next one saying how many were left out. The map of
//! sources is capped; when full, sources not heard from within the period go first,
//! then the one heard from longest ago.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct AuthFailureLog {
    sources: Mutex<HashMap<IpAddr, Source>>,
    cap: usize,
}

struct Source {
    logged_at: Instant,
    suppressed: u64,
}

impl Default for AuthFailureLog {
    fn default() -> AuthFailureLog {
        AuthFailureLog::with_cap(AuthFailureLog::CAP)
    }
}

impl AuthFailureLog {
    pub const EVERY: Duration = Duration::from_secs(60);
    /// Sources remembered at once: a few hundred KiB at most.
    const CAP: usize = 4096;

    pub fn with_cap(cap: usize) -> AuthFailureLog {
        AuthFailureLog { sources: Mutex::new(HashMap::new()), cap: cap.max(1) }
    }

    /// Logs `peer`'s failure (`why`) at INFO unless its source had a line within the
    /// period; returns the line's suppressed count when it logged.
    pub fn note(&self, peer: SocketAddr, why: &str) -> Option<u64> {
        let suppressed = self.admit(peer.ip(), Instant::now())?;
        let more = match suppressed {
            0 => String::new(),
            n => format!(" ({n} more from this source not logged since the last line)"),
        };
        log::info!(
            peer = peer.to_string(), suppressed = suppressed;
            "{peer}: authentication failed ({why}): a client with a wrong password, or not an AnyTLS client{more}"
        );
        Some(suppressed)
    }

    /// `Some(failures suppressed since the last line)` when `ip` may have a line now.
    fn admit(&self, ip: IpAddr, now: Instant) -> Option<u64> {
        let mut sources = self.sources.lock().expect("auth failure log lock");
        if let Some(source) = sources.get_mut(&ip) {
            if now.duration_since(source.logged_at) < Self::EVERY {
                source.suppressed += 1;
                return None;
            }
            let suppressed = std::mem::take(&mut source.suppressed);
            source.logged_at = now;
            return Some(suppressed);
        }
        if sources.len() >= self.cap {
            sources.retain(|_, source| now.duration_since(source.logged_at) < Self::EVERY);
        }
        if sources.len() >= self.cap
            && let Some(oldest) = sources.iter().min_by_key(|(_, source)| source.logged_at).map(|(ip, _)| *ip)
        {
            sources.remove(&oldest);
        }
        sources.insert(ip, Source { logged_at: now, suppressed: 0 });
        Some(0)
    }

    #[cfg(test)]
    fn remembered(&self) -> usize {
        self.sources.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(std::net::Ipv4Addr::from(0xc000_0200 + n))
    }

    #[test]
    fn one_line_per_source_per_period_then_the_count_left_out() {
        let log = AuthFailureLog::default();
        let start = Instant::now();
        assert_eq!(log.admit(ip(1), start), Some(0));
        for second in 1..=5 {
            assert_eq!(log.admit(ip(1), start + Duration::from_secs(second)), None);
        }
        assert_eq!(log.admit(ip(2), start + Duration::from_secs(5)), Some(0), "another source has its own line");
        assert_eq!(log.admit(ip(1), start + AuthFailureLog::EVERY), Some(5));
        assert_eq!(log.admit(ip(1), start + AuthFailureLog::EVERY + Duration::from_secs(1)), None);
    }

    #[test]
    fn the_map_of_sources_stays_within_its_cap() {
        let log = AuthFailureLog::with_cap(8);
        let start = Instant::now();
        for n in 0..100 {
            assert_eq!(log.admit(ip(n), start + Duration::from_millis(n.into())), Some(0));
            assert!(log.remembered() <= 8);
        }
        // The newest are the ones kept: a recent source is still held to its period.
        assert_eq!(log.admit(ip(99), start + Duration::from_secs(1)), None);
    }

    #[test]
    fn note_says_when_it_logged() {
        let log = AuthFailureLog::default();
        let peer: SocketAddr = "192.0.2.9:4000".parse().unwrap();
        assert_eq!(log.note(peer, "wrong password"), Some(0));
        assert_eq!(log.note("192.0.2.9:4001".parse().unwrap(), "wrong password"), None, "same source, other port");
    }
}
