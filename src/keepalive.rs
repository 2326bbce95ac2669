//! TCP keepalive and `TCP_USER_TIMEOUT` for every connection either binary accepts or
//! dials: how a peer that vanished without a FIN or a RST (its link cut, its host gone,
//! a NAT entry expired) is noticed, instead of its socket staying ESTABLISHED until a
//! restart (an idle connection has no TCP timer at all) or until the kernel's
//! retransmission limit (about 15 minutes with data unacknowledged).
//!
//! The defaults notice a silent peer in 90 s (30 s idle, then 4 probes 15 s apart) and
//! give up on data unacknowledged for 90 s: well past a phone's short loss of signal, and
//! far shorter than the kernel's own limits.

use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

/// How a connection's silence is detected; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Quiet time before the first probe (`None`: keepalive off).
    pub idle: Option<Duration>,
    /// Time between probes.
    pub interval: Duration,
    /// Unanswered probes before the connection is dropped.
    pub probes: u32,
    /// Data unacknowledged this long drops the connection (`None`: the kernel's default).
    pub user_timeout: Option<Duration>,
}

impl Default for Keepalive {
    fn default() -> Keepalive {
        Keepalive {
            idle: Some(Duration::from_secs(30)),
            interval: Duration::from_secs(15),
            probes: 4,
            user_timeout: Some(Duration::from_secs(90)),
        }
    }
}

impl Keepalive {
    /// Keepalive and user timeout off: the kernel's defaults.
    pub const OFF: Keepalive =
        Keepalive { idle: None, interval: Duration::from_secs(15), probes: 4, user_timeout: None };

    /// Sets the options on `tcp`. A failure is logged at DEBUG and otherwise ignored: the
    /// connection still works, it is only watched less closely.
    pub fn apply(&self, tcp: &TcpStream) {
        if let Err(err) = self.try_apply(tcp) {
            log::debug!("TCP keepalive options not set: {err}");
        }
    }

    fn try_apply(&self, tcp: &TcpStream) -> std::io::Result<()> {
        let socket = SockRef::from(tcp);
        if let Some(idle) = self.idle {
            let params = TcpKeepalive::new().with_time(idle).with_interval(self.interval).with_retries(self.probes);
            socket.set_tcp_keepalive(&params)?;
        }
        if let Some(timeout) = self.user_timeout {
            socket.set_tcp_user_timeout(Some(timeout))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_options_land_on_the_socket() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let keepalive = Keepalive {
            idle: Some(Duration::from_secs(7)),
            interval: Duration::from_secs(3),
            probes: 5,
            user_timeout: Some(Duration::from_millis(22_000)),
        };
        keepalive.apply(&tcp);
        let socket = SockRef::from(&tcp);
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap(), Duration::from_secs(7));
        assert_eq!(socket.tcp_keepalive_interval().unwrap(), Duration::from_secs(3));
        assert_eq!(socket.tcp_keepalive_retries().unwrap(), 5);
        assert_eq!(socket.tcp_user_timeout().unwrap(), Some(Duration::from_millis(22_000)));
    }

    #[tokio::test]
    async fn off_leaves_the_kernel_defaults() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        Keepalive::OFF.apply(&tcp);
        let socket = SockRef::from(&tcp);
        assert!(!socket.keepalive().unwrap());
        assert_eq!(socket.tcp_user_timeout().unwrap(), None);
    }
}
