//! Client heartbeats: noticing a connection that went silent without closing.
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

/// When the session last received bytes: one relaxed store per read.
pub(super) struct LastReceived {
    start: Instant,
    ms: AtomicU64,
}

impl Default for LastReceived {
    fn default() -> LastReceived {
        LastReceived { start: Instant::now(), ms: AtomicU64::new(0) }
    }
}

impl LastReceived {
    pub(super) fn touch(&self) {
        self.ms.store(self.start.elapsed().as_millis() as u64, Relaxed);
    }

    fn at(&self) -> Instant {
        self.start + Duration::from_millis(self.ms.load(Relaxed))
    }
}

/// Runs until the session closes (it holds no strong reference between checks, so
/// it never keeps a session alive).
pub(super) async fn run(weak: Weak<Shared>, interval: Duration) {
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
        let busy = !shared.streams.lock().expect("streams lock").is_empty();
        if !busy || *shared.peer_version.borrow() < 2 || quiet_for < interval {
            continue;
        }
        let timeout = shared.config.heartbeat_timeout;
        log::debug!("nothing from the server for {quiet_for:?}: heartbeat");
        shared.send_control(Frame::control(Command::HeartRequest, 0));
        let sent_at = Instant::now();
        drop(shared);
        tokio::time::sleep(timeout).await;
        let Some(shared) = weak.upgrade() else { return };
        if shared.last_received.at() < sent_at {
            log::warn!("server silent for {:?} and no answer to a heartbeat: session closed", interval + timeout);
            shared.close(&format!("no answer to a heartbeat within {timeout:?} (connection silently dropped?)"));
            return;
        }
    }
}
