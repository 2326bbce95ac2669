//! Opening outbound TCP connections, with a small name cache.
//!
//! The outbound pool dials through here; [`super::outbound`] serves streams on top of the
//! pool. Keeping the dialer apart lets both depend on it without depending on each other.
//!
//! Names are resolved once per [`NAME_TTL`] and the answers reused: a proxy carrying
//! browsing traffic dials the same few names over and over, and each lookup is a round trip
//! to the system resolver (and a UDP socket) that an answer a few seconds old saves.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use crate::proto::Address;
use crate::proto::address::Host;

/// How long a resolved name is reused. Short enough that a moved service is followed
/// within a minute, long enough that a busy name costs one lookup a minute.
pub const NAME_TTL: Duration = Duration::from_secs(60);
/// Names kept at most; past it, expired answers are dropped first, then all.
const MAX_NAMES: usize = 10_000;

/// Why an outbound dial failed, worded so clients can map it to SOCKS codes
/// ("refused", "timed out", "unreachable").
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("dial {0}: connection refused")]
    Refused(String),
    #[error("dial {0}: timed out")]
    TimedOut(String),
    #[error("dial {0}: host unreachable ({1})")]
    Unreachable(String, String),
    #[error("dial {0}: {1}")]
    Other(String, io::Error),
}

/// Opens outbound TCP connections.
#[derive(Debug, Clone)]
pub struct Dialer {
    pub connect_timeout: Duration,
}

impl Dialer {
    /// Connects to `destination`, resolving a name through the system resolver each time.
    pub async fn connect(&self, destination: &Address) -> Result<TcpStream, DialError> {
        self.connect_with(destination, None).await
    }

    /// As [`Dialer::connect`], with names answered from `names` when it has them.
    pub async fn connect_with(&self, destination: &Address, names: Option<&NameCache>) -> Result<TcpStream, DialError> {
        let target = destination.to_string();
        let attempt = async {
            let stream = match (&destination.host, names) {
                (Host::Ip(ip), _) => TcpStream::connect((*ip, destination.port)).await,
                (Host::Domain(name), Some(names)) => match names.resolve(name, destination.port).await {
                    Ok(addrs) => connect_first(&addrs).await,
                    Err(err) => Err(err),
                },
                (Host::Domain(name), None) => TcpStream::connect((name.as_str(), destination.port)).await,
            };
            stream.map_err(|err| classify(&target, err))
        };
        let stream = tokio::time::timeout(self.connect_timeout, attempt)
            .await
            .map_err(|_| DialError::TimedOut(target.clone()))??;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}

/// Tries the addresses in the resolver's order, as `TcpStream::connect` does.
async fn connect_first(addrs: &[SocketAddr]) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "lookup: no addresses");
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(stream) => return Ok(stream),
            Err(err) => last = err,
        }
    }
    Err(last)
}

fn classify(target: &str, err: io::Error) -> DialError {
    use io::ErrorKind::*;
    match err.kind() {
        ConnectionRefused => DialError::Refused(target.to_string()),
        TimedOut => DialError::TimedOut(target.to_string()),
        HostUnreachable | NetworkUnreachable | AddrNotAvailable => {
            DialError::Unreachable(target.to_string(), err.to_string())
        }
        // Name resolution failures come back as uncategorised errors.
        _ if err.to_string().contains("lookup") || err.to_string().contains("resolve") => {
            DialError::Unreachable(target.to_string(), err.to_string())
        }
        _ => DialError::Other(target.to_string(), err),
    }
}

/// A name's addresses (port 0) and when they were looked up.
type Answers = HashMap<String, (Arc<[SocketAddr]>, Instant)>;

/// Resolved names, each reused for [`NAME_TTL`]. Failures are not cached (the next dial
/// asks again). Two dials that miss at the same moment may both look the name up; that is
/// rare and costs one extra lookup.
#[derive(Debug, Default)]
pub struct NameCache {
    answers: Mutex<Answers>,
    lookups: AtomicU64,
}

impl NameCache {
    /// Lookups sent to the system resolver so far.
    pub fn lookups(&self) -> u64 {
        self.lookups.load(Ordering::Relaxed)
    }

    /// The addresses of `name`, with `port`.
    pub async fn resolve(&self, name: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        let now = Instant::now();
        let cached =
            self.answers().get(name).filter(|(_, at)| now.duration_since(*at) < NAME_TTL).map(|(a, _)| a.clone());
        let ips = match cached {
            Some(ips) => ips,
            None => {
                self.lookups.fetch_add(1, Ordering::Relaxed);
                let found: Arc<[SocketAddr]> = tokio::net::lookup_host((name, 0)).await?.collect();
                self.remember(name, found.clone(), now);
                found
            }
        };
        Ok(ips.iter().map(|addr| SocketAddr::new(addr.ip(), port)).collect())
    }

    fn remember(&self, name: &str, ips: Arc<[SocketAddr]>, now: Instant) {
        let mut answers = self.answers();
        if answers.len() >= MAX_NAMES && !answers.contains_key(name) {
            answers.retain(|_, (_, at)| now.duration_since(*at) < NAME_TTL);
            if answers.len() >= MAX_NAMES {
                answers.clear();
            }
        }
        answers.insert(name.to_owned(), (ips, now));
    }

    fn answers(&self) -> std::sync::MutexGuard<'_, Answers> {
        // Inserts and removals leave the map whole; a panic elsewhere cannot corrupt it.
        self.answers.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_name_is_looked_up_once_per_ttl() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let names = NameCache::default();
        let dialer = Dialer { connect_timeout: Duration::from_secs(2) };
        let target = Address::domain("localhost", port);
        for _ in 0..3 {
            let tcp = dialer.connect_with(&target, Some(&names)).await;
            // localhost may resolve to ::1 first; what matters is that it was looked up once.
            drop(tcp);
        }
        assert_eq!(names.lookups(), 1);
        let addrs = names.resolve("localhost", 7).await.unwrap();
        assert!(addrs.iter().all(|a| a.port() == 7 && a.ip().is_loopback()), "{addrs:?}");
        assert_eq!(names.lookups(), 1);
    }
}
