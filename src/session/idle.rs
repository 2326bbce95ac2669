//! Ending streams that carry nothing: a relay touches its watch on every chunk either
//! way, and [`IdleWatch::expired`] resolves once no chunk passed for the timeout.
//!
//! The timestamp is one relaxed atomic store per chunk, so the hot path pays almost
//! nothing; the timer wakes at most once per timeout period, not per chunk.
//!
//! Once one direction has ended ([`IdleWatch::half_closed`]), the shorter half-close
//! timeout applies: a stream whose client said FIN while its target keeps its side open
//! and silent would otherwise hold its outbound connection for the whole idle timeout.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

pub(crate) struct IdleWatch {
    timeout: Option<Duration>,
    half_close_timeout: Option<Duration>,
    half_closed: AtomicBool,
    /// Wakes a waiting [`IdleWatch::expired`] to take the shorter timeout.
    shortened: Notify,
    start: Instant,
    /// Milliseconds from `start` to the last chunk.
    last_ms: AtomicU64,
}

impl IdleWatch {
    /// `None`: never expires (once half-closed, `half_close_timeout` still applies).
    pub(crate) fn new(timeout: Option<Duration>, half_close_timeout: Option<Duration>) -> IdleWatch {
        IdleWatch {
            timeout,
            half_close_timeout,
            half_closed: AtomicBool::new(false),
            shortened: Notify::new(),
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    /// One direction has ended: from now on the half-close timeout applies.
    pub(crate) fn half_closed(&self) {
        if self.half_close_timeout.is_some() && !self.half_closed.swap(true, Relaxed) {
            self.shortened.notify_one();
        }
    }

    fn current_timeout(&self) -> Option<Duration> {
        let half = self.half_closed.load(Relaxed).then_some(self.half_close_timeout).flatten();
        match (self.timeout, half) {
            (Some(full), Some(half)) => Some(full.min(half)),
            (full, half) => full.or(half),
        }
    }

    /// A chunk went through.
    pub(crate) fn touch(&self) {
        if self.timeout.is_some() || self.half_close_timeout.is_some() {
            self.last_ms.store(self.start.elapsed().as_millis() as u64, Relaxed);
        }
    }

    /// Resolves with a reason once nothing went through for the timeout.
    pub(crate) async fn expired(&self) -> String {
        loop {
            let Some(timeout) = self.current_timeout() else {
                self.shortened.notified().await;
                continue;
            };
            let deadline = self.start + Duration::from_millis(self.last_ms.load(Relaxed)) + timeout;
            if Instant::now() >= deadline {
                return match self.half_closed.load(Relaxed) {
                    true => format!("half-closed and no data for {timeout:?}"),
                    false => format!("no data either way for {timeout:?}"),
                };
            }
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => {}
                () = self.shortened.notified() => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn expires_only_after_a_quiet_timeout() {
        let watch = IdleWatch::new(Some(Duration::from_millis(200)), None);
        let expired = watch.expired();
        tokio::pin!(expired);
        for _ in 0..5 {
            tokio::select! {
                _ = &mut expired => panic!("expired while busy"),
                _ = tokio::time::sleep(Duration::from_millis(100)) => watch.touch(),
            }
        }
        let quiet_from = Instant::now();
        expired.await;
        assert!(quiet_from.elapsed() >= Duration::from_millis(190));
    }

    #[tokio::test]
    async fn without_a_timeout_it_never_expires() {
        let watch = IdleWatch::new(None, None);
        assert!(tokio::time::timeout(Duration::from_millis(300), watch.expired()).await.is_err());
    }

    #[tokio::test]
    async fn once_half_closed_the_shorter_timeout_applies() {
        let watch = IdleWatch::new(Some(Duration::from_secs(300)), Some(Duration::from_millis(150)));
        let expired = watch.expired();
        tokio::pin!(expired);
        let before = tokio::time::timeout(Duration::from_millis(300), &mut expired).await;
        assert!(before.is_err(), "the half-close timeout applies only once half-closed");
        let since = Instant::now();
        watch.half_closed(); // wakes the waiting watch, which was sleeping for 300 s
        let reason = tokio::time::timeout(Duration::from_secs(2), &mut expired).await.expect("expired");
        assert!(reason.starts_with("half-closed"), "{reason}");
        assert!(since.elapsed() < Duration::from_secs(1));
    }
}
