//! Graceful shutdown: the signals that start it, and a count of work in flight to
//! drain before the process exits.
//!
//! Shutdown runs in three steps in both binaries: stop accepting (the listener is
//! dropped, so new connections are refused by the kernel), let what is in flight
//! finish for at most the drain time, then close the pools and log the final
//! statistics. Work still running after the drain time is cut off when the runtime
//! ends; the drain time bounds how long a stop can take.

use std::time::Duration;

use tokio::sync::watch;

/// Resolves on SIGINT or SIGTERM, with the signal's name. Without signal support
/// (not a Unix system, or the handler cannot be installed) only Ctrl-C is watched.
pub async fn signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            return tokio::select! {
                _ = tokio::signal::ctrl_c() => "SIGINT",
                _ = term.recv() => "SIGTERM",
            };
        }
    }
    let _ = tokio::signal::ctrl_c().await;
    "SIGINT"
}

/// Counts work in flight (connections, streams); clones share the count.
#[derive(Clone)]
pub struct InFlight(watch::Sender<usize>);

/// One unit of work in flight; dropping it ends it.
pub struct InFlightGuard(watch::Sender<usize>);

impl Default for InFlight {
    fn default() -> InFlight {
        InFlight(watch::Sender::new(0))
    }
}

impl InFlight {
    pub fn start(&self) -> InFlightGuard {
        self.0.send_modify(|n| *n += 1);
        InFlightGuard(self.0.clone())
    }

    pub fn count(&self) -> usize {
        *self.0.borrow()
    }

    /// Waits until nothing is in flight, at most `limit`; returns what is left.
    pub async fn drain(&self, limit: Duration) -> usize {
        let mut rx = self.0.subscribe();
        let _ = tokio::time::timeout(limit, rx.wait_for(|n| *n == 0)).await;
        self.count()
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_waits_for_the_last_guard_but_not_longer_than_the_limit() {
        let in_flight = InFlight::default();
        let guard = in_flight.start();
        assert_eq!(in_flight.drain(Duration::from_millis(20)).await, 1, "limit reached");
        let ends = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(guard);
        });
        assert_eq!(in_flight.drain(Duration::from_secs(5)).await, 0);
        ends.await.unwrap();
    }
}
