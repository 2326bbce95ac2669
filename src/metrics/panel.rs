//! The panel link's health (`--panel`): moved by the fleet room, shown in `/metrics` as
//! `anytls_panel_up`, the time of the last success and the outbox of traffic not yet
//! acknowledged.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::exposition::Exposition;

#[derive(Debug, Default)]
pub struct PanelHealth {
    /// Whether this server talks to a panel at all (nothing is shown otherwise).
    pub enabled: AtomicBool,
    /// Whether the last exchange with the panel succeeded.
    pub up: AtomicBool,
    /// Unix seconds of the last success; 0 before the first.
    pub last_success: AtomicU64,
    /// Users with traffic waiting to be acknowledged by the panel, and its bytes.
    pub outbox_users: AtomicU64,
    pub outbox_bytes: AtomicU64,
    /// Exchanges that failed (a pull or a push), since start-up.
    pub failures: AtomicU64,
}

impl PanelHealth {
    pub fn render(&self, page: &mut Exposition) {
        if !self.enabled.load(Ordering::Relaxed) {
            return;
        }
        let one = |v: &AtomicU64| [(String::new(), v.load(Ordering::Relaxed))];
        page.gauge(
            "anytls_panel_up",
            "1 when the last exchange with the panel succeeded.",
            [(String::new(), self.up.load(Ordering::Relaxed) as u64)],
        );
        page.gauge(
            "anytls_panel_last_success_timestamp_seconds",
            "Unix time of the last successful exchange with the panel (0: none yet).",
            one(&self.last_success),
        );
        page.gauge(
            "anytls_panel_outbox_users",
            "Users with traffic the panel has not acknowledged yet.",
            one(&self.outbox_users),
        );
        page.gauge(
            "anytls_panel_outbox_bytes",
            "Bytes of traffic the panel has not acknowledged yet.",
            one(&self.outbox_bytes),
        );
        page.counter("anytls_panel_failures_total", "Pulls and pushes to the panel that failed.", one(&self.failures));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_shown_without_a_panel_and_every_figure_with_one() {
        let health = PanelHealth::default();
        let mut page = Exposition::default();
        health.render(&mut page);
        assert_eq!(page.into_text(), "");
        health.enabled.store(true, Ordering::Relaxed);
        health.up.store(true, Ordering::Relaxed);
        health.outbox_bytes.store(42, Ordering::Relaxed);
        let mut page = Exposition::default();
        health.render(&mut page);
        let text = page.into_text();
        assert!(text.contains("anytls_panel_up 1\n"), "{text}");
        assert!(text.contains("anytls_panel_outbox_bytes 42\n"), "{text}");
        assert!(text.contains("# TYPE anytls_panel_failures_total counter\n"), "{text}");
    }
}
