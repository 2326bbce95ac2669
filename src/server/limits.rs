//! Server-wide caps and the shutdown gate: how many sessions and streams may be open
//! at once, and whether new streams are still taken.
//!
//! Caps are semaphores, so the numbers hold exactly under any interleaving. Together
//! with `--max-handshakes` (connections still authenticating) they bound the work a
//! flood of clients can cause: at most `max_handshakes + max_sessions` TLS connections
//! and `max_streams` outbound connections are held at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::session::BufferBudget;
use crate::shutdown::{InFlight, InFlightGuard};

/// Limits and shutdown behaviour; the binary's `--help` documents each.
#[derive(Debug, Clone)]
pub struct ServerLimits {
    /// Authenticated sessions at once. One more is sent an Alert and closed: the
    /// check comes after authentication, so only real clients learn of the cap, and
    /// connections that never authenticate are bounded by `max_handshakes` instead.
    pub max_sessions: usize,
    /// Streams across all sessions at once; more are refused with a SYNACK error.
    pub max_streams: usize,
    /// A stream with no data either way for this long is ended (`None`: never).
    pub stream_idle_timeout: Option<Duration>,
    /// How long streams in flight may go on after a shutdown signal.
    pub drain_timeout: Duration,
    /// Stream data received from clients and not yet written to its destination.
    pub buffers: BufferBudget,
}

impl Default for ServerLimits {
    fn default() -> ServerLimits {
        ServerLimits {
            max_sessions: 4096,
            max_streams: 65536,
            stream_idle_timeout: Some(Duration::from_secs(300)),
            drain_timeout: Duration::from_secs(10),
            buffers: BufferBudget::default(),
        }
    }
}

/// The admission state shared by the accept loop, sessions and streams.
pub struct Gate {
    limits: ServerLimits,
    sessions: Arc<Semaphore>,
    streams: Arc<Semaphore>,
    in_flight: InFlight,
    draining: AtomicBool,
    /// Set once the drain is over: every session closes.
    closing: watch::Sender<bool>,
}

/// A stream's place under the caps; dropping it frees the place.
pub struct StreamTicket {
    _permit: OwnedSemaphorePermit,
    _in_flight: InFlightGuard,
}

impl Gate {
    pub fn new(limits: ServerLimits) -> Gate {
        Gate {
            sessions: Arc::new(Semaphore::new(limits.max_sessions.max(1))),
            streams: Arc::new(Semaphore::new(limits.max_streams.max(1))),
            limits,
            in_flight: InFlight::default(),
            draining: AtomicBool::new(false),
            closing: watch::Sender::new(false),
        }
    }

    pub fn limits(&self) -> &ServerLimits {
        &self.limits
    }

    /// A place for a new authenticated session, or the reason there is none.
    pub fn admit_session(&self) -> Result<OwnedSemaphorePermit, String> {
        self.sessions.clone().try_acquire_owned().map_err(|_| {
            format!("too many sessions on this server (limit {}, --max-sessions)", self.limits.max_sessions)
        })
    }

    /// A place for a new stream, or the reason (sent to the client as SYNACK error).
    pub fn admit_stream(&self) -> Result<StreamTicket, String> {
        if self.draining.load(Ordering::Acquire) {
            return Err("server is shutting down".into());
        }
        let permit = self.streams.clone().try_acquire_owned().map_err(|_| {
            format!("too many streams on this server (limit {}, --max-streams)", self.limits.max_streams)
        })?;
        Ok(StreamTicket { _permit: permit, _in_flight: self.in_flight.start() })
    }

    /// Stops taking streams and waits for those in flight, at most the drain time;
    /// then tells every session to close. Returns the streams cut off.
    pub async fn drain(&self) -> usize {
        self.draining.store(true, Ordering::Release);
        let left = self.in_flight.drain(self.limits.drain_timeout).await;
        self.closing.send_replace(true);
        left
    }

    pub fn streams_in_flight(&self) -> usize {
        self.in_flight.count()
    }

    /// Resolves once the drain is over.
    pub async fn closing(&self) {
        let mut rx = self.closing.subscribe();
        let _ = rx.wait_for(|closing| *closing).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(max_sessions: usize, max_streams: usize) -> Gate {
        Gate::new(ServerLimits { max_sessions, max_streams, ..ServerLimits::default() })
    }

    #[test]
    fn caps_hold_and_places_come_back_when_dropped() {
        let gate = gate(1, 2);
        let session = gate.admit_session().unwrap();
        assert!(gate.admit_session().unwrap_err().contains("too many sessions"));
        drop(session);
        assert!(gate.admit_session().is_ok());
        let (a, _b) = (gate.admit_stream().unwrap(), gate.admit_stream().unwrap());
        assert!(gate.admit_stream().err().unwrap().contains("too many streams on this server"));
        drop(a);
        assert!(gate.admit_stream().is_ok());
    }

    #[tokio::test]
    async fn draining_refuses_new_streams_and_waits_for_old_ones() {
        let gate = Arc::new(gate(1, 8));
        let ticket = gate.admit_stream().unwrap();
        let drained = tokio::spawn({
            let gate = gate.clone();
            async move { gate.drain().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(gate.admit_stream().err().unwrap(), "server is shutting down");
        assert!(!*gate.closing.borrow(), "sessions stay open while streams drain");
        drop(ticket);
        assert_eq!(drained.await.unwrap(), 0);
        tokio::time::timeout(Duration::from_secs(1), gate.closing()).await.unwrap();
    }
}
