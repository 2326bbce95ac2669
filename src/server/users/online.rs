//! Who is online: one user's open sessions and the source IPs they come from, which the
//! device limit (`max-ips`), `max-sessions` and kicks work on.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// Why a session was closed by the server on its user's account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// Removed (by the admin API or a reload).
    Removed,
    /// Its password changed: the old one no longer opens sessions.
    PasswordChanged,
    Disabled,
    Expired,
    Quota,
    /// Closed by the admin API's kick.
    Kicked,
}

impl Cut {
    pub fn describe(self) -> &'static str {
        match self {
            Cut::Removed => "user removed",
            Cut::PasswordChanged => "user's password changed",
            Cut::Disabled => "user disabled",
            Cut::Expired => "user expired",
            Cut::Quota => "user's quota reached",
            Cut::Kicked => "kicked",
        }
    }
}

/// The sessions of one user open now.
#[derive(Debug, Default)]
pub struct Online {
    inner: Mutex<Sessions>,
}

#[derive(Debug, Default)]
struct Sessions {
    next_id: u64,
    open: HashMap<u64, Open>,
    /// Sessions per source IP.
    ips: HashMap<IpAddr, u32>,
}

#[derive(Debug)]
struct Open {
    ip: IpAddr,
    cut: watch::Sender<Option<Cut>>,
}

/// Why a session could not join: the limit it met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    Sessions,
    Ips,
}

/// A session's place among its user's; leaving (drop) frees it.
#[derive(Debug)]
pub struct Seat {
    online: Arc<Online>,
    id: u64,
    cut: watch::Receiver<Option<Cut>>,
}

impl Online {
    /// A place for a session from `ip`, unless it would be over `max_sessions` or bring a
    /// new IP over `max_ips`. One lock for the check and the join, so racing sessions
    /// cannot both take the last place.
    pub fn join(self: &Arc<Self>, ip: IpAddr, max_sessions: Option<u32>, max_ips: Option<u32>) -> Result<Seat, Full> {
        let mut sessions = self.lock();
        if max_sessions.is_some_and(|max| sessions.open.len() >= max as usize) {
            return Err(Full::Sessions);
        }
        if !sessions.ips.contains_key(&ip) && max_ips.is_some_and(|max| sessions.ips.len() >= max as usize) {
            return Err(Full::Ips);
        }
        let id = sessions.next_id;
        sessions.next_id += 1;
        let (cut, receiver) = watch::channel(None);
        sessions.open.insert(id, Open { ip, cut });
        *sessions.ips.entry(ip).or_default() += 1;
        Ok(Seat { online: self.clone(), id, cut: receiver })
    }

    /// Closes the sessions from `ip` (all with `None`); returns how many.
    pub fn cut(&self, why: Cut, ip: Option<IpAddr>) -> usize {
        let sessions = self.lock();
        let mut cut = 0;
        for open in sessions.open.values().filter(|open| ip.is_none_or(|ip| open.ip == ip)) {
            open.cut.send_replace(Some(why));
            cut += 1;
        }
        cut
    }

    pub fn sessions(&self) -> usize {
        self.lock().open.len()
    }

    /// The source IPs with a session open, sorted.
    pub fn ips(&self) -> Vec<IpAddr> {
        let mut ips: Vec<IpAddr> = self.lock().ips.keys().copied().collect();
        ips.sort_unstable();
        ips
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Sessions> {
        // The map is consistent between statements, so a panic elsewhere leaves it usable.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Seat {
    /// Resolves when the server cuts this session, with why.
    pub async fn cut(&mut self) -> Cut {
        let why = match self.cut.wait_for(Option::is_some).await {
            Ok(why) => *why,
            Err(_) => None,
        };
        match why {
            Some(why) => why,
            // The sender lives in the map until this seat leaves: cannot happen.
            None => std::future::pending().await,
        }
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        let mut sessions = self.online.lock();
        if let Some(open) = sessions.open.remove(&self.id)
            && let Some(count) = sessions.ips.get_mut(&open.ip)
        {
            *count -= 1;
            if *count == 0 {
                sessions.ips.remove(&open.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn the_device_limit_counts_distinct_ips_and_frees_on_leave() {
        let online = Arc::new(Online::default());
        let a1 = online.join(ip(2), None, Some(1)).unwrap();
        let a2 = online.join(ip(2), None, Some(1)).expect("the same IP again is the same device");
        assert_eq!(online.join(ip(3), None, Some(1)).unwrap_err(), Full::Ips);
        drop(a1);
        assert_eq!(online.join(ip(3), None, Some(1)).unwrap_err(), Full::Ips, "one session from .2 is still open");
        drop(a2);
        let _b = online.join(ip(3), None, Some(1)).expect("free again");
        assert_eq!(online.ips(), [ip(3)]);
    }

    #[test]
    fn the_session_limit_counts_sessions() {
        let online = Arc::new(Online::default());
        let _a = online.join(ip(2), Some(2), None).unwrap();
        let _b = online.join(ip(3), Some(2), None).unwrap();
        assert_eq!(online.join(ip(2), Some(2), None).unwrap_err(), Full::Sessions);
        assert_eq!(online.sessions(), 2);
    }

    #[tokio::test]
    async fn a_cut_reaches_the_sessions_it_names_only() {
        let online = Arc::new(Online::default());
        let mut from_2 = online.join(ip(2), None, None).unwrap();
        let mut from_3 = online.join(ip(3), None, None).unwrap();
        assert_eq!(online.cut(Cut::Kicked, Some(ip(2))), 1);
        assert_eq!(from_2.cut().await, Cut::Kicked);
        let quick = std::time::Duration::from_millis(50);
        assert!(tokio::time::timeout(quick, from_3.cut()).await.is_err(), "the other IP stays");
        assert_eq!(online.cut(Cut::Removed, None), 2);
        assert_eq!(from_3.cut().await, Cut::Removed);
    }
}
