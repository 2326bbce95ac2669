//! Liveness: client heartbeats notice a connection that went silent without closing,
//! and the server reaps sessions left idle ([`reap_when_idle`]).
//!
//! A TLS connection can vanish without a FIN (a NAT entry expires, a middlebox drops
//! the flow, the server's host loses power). TCP then tells nobody until its own
//! retransmission timeout, which takes many minutes; meanwhile the streams on the
//! session hang. So a client session with open streams that has received nothing for
//! the heartbeat interval sends HeartRequest (v2 servers answer it with
//! HeartResponse); if still nothing at all arrives within the heartbeat timeout, the
//! session is closed. Closing it fails its streams (their local connections end) and
//! the pool no longer hands it out, so the next request gets a new session.
//!
//! Idle sessions (no streams) are not probed: nobody waits on them, and the pool's
//! idle timeout retires them. Sessions to v1 servers are not probed either: v1
//! servers do not answer heartbeats.

use std::sync::Weak;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::time::Instant;

use super::Shared;
use crate::proto::Frame;
use crate::proto::frame::Command;

/// What the reader received: when it last did (to notice silence) and how many reads
/// it has made (to notice an answer). The answer check counts reads rather than
/// comparing times, so an answer that lands within the same clock tick as its request
/// (loopback, a LAN) still counts; a truncated timestamp once made it count as none.
pub(super) struct LastReceived {
    start: Instant,
    nanos: AtomicU64,
    reads: AtomicU64,
}

impl Default for LastReceived {
    fn default() -> LastReceived {
        LastReceived { start: Instant::now(), nanos: AtomicU64::new(0), reads: AtomicU64::new(0) }
    }
}

impl LastReceived {
    /// One read went through: a relaxed store and a relaxed add.
    pub(super) fn touch(&self) {
        self.nanos.store(self.start.elapsed().as_nanos() as u64, Relaxed);
        self.reads.fetch_add(1, Relaxed);
    }

    fn at(&self) -> Instant {
        self.start + Duration::from_nanos(self.nanos.load(Relaxed))
    }

    pub(super) fn reads(&self) -> u64 {
        self.reads.load(Relaxed)
    }
}

/// Sends a server silent for `interval` a heartbeat and gives it `timeout` to answer.
/// Runs until the session closes (it holds no strong reference between checks, so
/// it never keeps a session alive).
pub(super) async fn run(weak: Weak<Shared>, interval: Duration, timeout: Duration) {
    // Checked often enough to notice silence soon after `interval`, and cheap.
    let period = (interval / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(shared) = weak.upgrade() else { return };
        if shared.close_reason().is_some() {
            return;
        }
        let quiet_for = shared.last_received.at().elapsed();
        let busy = shared.live_streams.load(std::sync::atomic::Ordering::Acquire) > 0;
        if !busy || *shared.peer_version.borrow() < 2 || quiet_for < interval {
            continue;
        }
        log::debug!("nothing from the server for {quiet_for:?}: heartbeat");
        // Read before the request is queued: any read after this point is an answer
        // (or other traffic, which proves the connection alive just as well).
        let reads_before = shared.last_received.reads();
        shared.send_control(Frame::control(Command::HeartRequest, 0));
        drop(shared);
        tokio::time::sleep(timeout).await;
        let Some(shared) = weak.upgrade() else { return };
        if shared.last_received.reads() == reads_before {
            log::warn!("server silent for {:?} and no answer to a heartbeat: session closed", interval + timeout);
            shared.close(&format!("no answer to a heartbeat within {timeout:?} (connection silently dropped?)"));
            return;
        }
    }
}

/// Server: closes the session once it has had no stream alive and received nothing for
/// `timeout`. Without it a client that vanished (its link cut, no FIN, no RST) or that
/// keeps a connection doing nothing holds a descriptor and a session place until TCP
/// keepalive notices, if it is on at all. Checked a few times per timeout; holds no
/// strong reference between checks.
pub(super) async fn reap_when_idle(weak: Weak<Shared>, timeout: Duration) {
    let period = (timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(15));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Idle since when: the later of the last bytes received and the last stream seen.
    let mut last_busy = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        let Some(shared) = weak.upgrade() else { return };
        if shared.close_reason().is_some() {
            return;
        }
        if shared.live_streams.load(std::sync::atomic::Ordering::Acquire) > 0 {
            last_busy = tokio::time::Instant::now();
            continue;
        }
        let idle_since = last_busy.max(shared.last_received.at());
        if idle_since.elapsed() >= timeout {
            log::debug!("no stream and nothing received for {timeout:?}: idle session closed");
            shared.close(&format!("idle: no stream and nothing received for {timeout:?}"));
            return;
        }
    }
}
