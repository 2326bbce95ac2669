//! Ending streams that carry nothing: a relay touches its watch on every chunk either
//! way, and [`IdleWatch::expired`] resolves once no chunk passed for the timeout.
//!
//! The timestamp is one relaxed atomic store per chunk, so the hot path pays almost
//! nothing; the timer wakes at most once per timeout period, not per chunk.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::time::Instant;

pub(crate) struct IdleWatch {
    timeout: Option<Duration>,
    start: Instant,
    /// Milliseconds from `start` to the last chunk.
    last_ms: AtomicU64,
}

impl IdleWatch {
    /// `None`: never expires.
    pub(crate) fn new(timeout: Option<Duration>) -> IdleWatch {
        IdleWatch { timeout, start: Instant::now(), last_ms: AtomicU64::new(0) }
    }

    /// A chunk went through.
    pub(crate) fn touch(&self) {
        if self.timeout.is_some() {
            self.last_ms.store(self.start.elapsed().as_millis() as u64, Relaxed);
        }
    }

    /// Resolves with a reason once nothing went through for the timeout.
    pub(crate) async fn expired(&self) -> String {
        let Some(timeout) = self.timeout else { return std::future::pending().await };
        loop {
            let deadline = self.start + Duration::from_millis(self.last_ms.load(Relaxed)) + timeout;
            if Instant::now() >= deadline {
                return format!("no data either way for {timeout:?}");
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn expires_only_after_a_quiet_timeout() {
        let watch = IdleWatch::new(Some(Duration::from_millis(200)));
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
        let watch = IdleWatch::new(None);
        assert!(tokio::time::timeout(Duration::from_millis(300), watch.expired()).await.is_err());
    }
}
