//! The server's access log's own health: records written, and records dropped because
//! its writer could not keep up (the data path never waits for the log).

use std::sync::atomic::{AtomicU64, Ordering};

use super::exposition::Exposition;

#[derive(Debug, Default)]
pub struct AccessLogCounters {
    /// Records the writer wrote out.
    pub records: AtomicU64,
    /// Records dropped: the queue to the writer was full (or the writer had stopped).
    pub dropped: AtomicU64,
}

impl AccessLogCounters {
    pub fn render(&self, page: &mut Exposition) {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        page.counter(
            "anytls_access_log_records_total",
            "Access log records written (one per stream, --access-log).",
            [(String::new(), load(&self.records))],
        );
        page.counter(
            "anytls_access_log_dropped_total",
            "Access log records dropped because the writer could not keep up (its queue was full).",
            [(String::new(), load(&self.dropped))],
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_counters_render() {
        let counters = AccessLogCounters::default();
        counters.dropped.fetch_add(2, Ordering::Relaxed);
        let mut page = Exposition::default();
        counters.render(&mut page);
        let out = page.into_text();
        assert!(out.contains("anytls_access_log_records_total 0\n"), "{out}");
        assert!(out.contains("anytls_access_log_dropped_total 2\n"), "{out}");
    }
}
