//! The two pool lines logged every `--stats-interval-secs` and at shutdown:
//! `[Pool Stats] …` (the counters, by name, which scripts parse) and `[Pool Status] {…}`
//! (idle connections per key, as a JSON object).

use std::fmt;

use crate::pool::{PoolKey, PoolStatsSnapshot};

/// When the pool lines are logged: every `interval`, the first after one interval, or
/// never for a zero interval (`--stats-interval-secs 0`, as 0 means "never" for the other
/// interval flags).
pub struct StatsTicker(Option<tokio::time::Interval>);

impl StatsTicker {
    pub fn every(interval: std::time::Duration) -> StatsTicker {
        let start = tokio::time::Instant::now() + interval;
        StatsTicker((!interval.is_zero()).then(|| tokio::time::interval_at(start, interval)))
    }

    /// Resolves at the next tick; never, for a zero interval.
    pub async fn tick(&mut self) {
        match &mut self.0 {
            Some(interval) => {
                interval.tick().await;
            }
            None => std::future::pending().await,
        }
    }
}

/// `[Pool Stats] Total: 15, Active: 3, Reused: 8, New: 7, Cleaned: 2, Reuse rate: 53.3%, Utilisation: 20.0%`
pub fn format_stats_line(s: &PoolStatsSnapshot) -> String {
    format!(
        "[Pool Stats] Total: {}, Active: {}, Reused: {}, New: {}, Cleaned: {}, \
         Reuse rate: {:.1}%, Utilisation: {:.1}%",
        s.total(),
        s.active,
        s.reused,
        s.new,
        s.cleaned,
        percent(s.reused, s.reused + s.new),
        percent(s.active, s.total()),
    )
}

/// The fields appended to the stats line after its standard ones (scripts parse the
/// standard ones by name, so new ones only ever go at the end). The client has no warming
/// and no unpooled path, so only `Keys` is shown for it.
pub fn format_stats_extra(s: &PoolStatsSnapshot, server: bool) -> String {
    if server {
        format!(
            ", Warmed: {}, Unused: {}, Unpooled: {}, Lookups: {}, Keys: {}",
            s.warmed, s.unused, s.unpooled, s.lookups, s.keys
        )
    } else {
        format!(", Keys: {}", s.keys)
    }
}

/// Logs the two stats lines at INFO; `extra` is appended to the first. The status line
/// lists keys by name.
pub fn log_stats(snapshot: &PoolStatsSnapshot, idle_by_key: &[(PoolKey, usize)], extra: &str) {
    log::info!("{}{extra}", format_stats_line(snapshot));
    log::info!("{}", format_status_line(idle_by_key));
}

/// Idle counts by key name, sorted, for the status line.
pub fn named_idle_by_key<K: fmt::Display>(idle_by_key: Vec<(K, usize)>) -> Vec<(PoolKey, usize)> {
    let mut named: Vec<(PoolKey, usize)> = idle_by_key.into_iter().map(|(k, n)| (k.to_string().into(), n)).collect();
    named.sort_unstable();
    named
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 { 0.0 } else { part as f64 * 100.0 / whole as f64 }
}

/// `[Pool Status] {"example.com:80": 5, "127.0.0.1:8080": 3}`, in the order given.
pub fn format_status_line(idle_by_key: &[(PoolKey, usize)]) -> String {
    let entries: Vec<String> = idle_by_key.iter().map(|(key, n)| format!("{}: {n}", json_string(key))).collect();
    format!("[Pool Status] {{{}}}", entries.join(", "))
}

/// Quotes `s` as a JSON string (serde_json), so that a hostile host name cannot break the
/// log line.
fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_zero_interval_never_ticks_and_another_ticks_after_one_interval() {
        let mut never = StatsTicker::every(std::time::Duration::ZERO);
        let waited = tokio::time::timeout(std::time::Duration::from_millis(300), never.tick()).await;
        assert!(waited.is_err(), "a zero interval ticked");
        let started = tokio::time::Instant::now();
        let mut every = StatsTicker::every(std::time::Duration::from_millis(50));
        every.tick().await;
        assert!(started.elapsed() >= std::time::Duration::from_millis(50), "ticked at once");
    }

    #[test]
    fn stats_line_matches_the_documented_format() {
        let s = PoolStatsSnapshot { active: 3, reused: 8, new: 7, cleaned: 2, idle: 4, ..Default::default() };
        assert_eq!(
            format_stats_line(&s),
            "[Pool Stats] Total: 15, Active: 3, Reused: 8, New: 7, Cleaned: 2, \
             Reuse rate: 53.3%, Utilisation: 20.0%"
        );
    }

    #[test]
    fn stats_line_with_nothing_served_shows_zero_rates() {
        assert_eq!(
            format_stats_line(&PoolStatsSnapshot::default()),
            "[Pool Stats] Total: 0, Active: 0, Reused: 0, New: 0, Cleaned: 0, \
             Reuse rate: 0.0%, Utilisation: 0.0%"
        );
    }

    #[test]
    fn status_line_matches_the_documented_format() {
        let status = [(PoolKey::from("example.com:80"), 5), (PoolKey::from("127.0.0.1:8080"), 3)];
        assert_eq!(format_status_line(&status), r#"[Pool Status] {"example.com:80": 5, "127.0.0.1:8080": 3}"#);
        let named = named_idle_by_key(vec![("b:1", 1), ("a:1", 2)]);
        assert_eq!(format_status_line(&named), r#"[Pool Status] {"a:1": 2, "b:1": 1}"#);
        assert_eq!(format_status_line(&[]), "[Pool Status] {}");
    }

    #[test]
    fn status_line_escapes_quotes_backslashes_and_controls() {
        let status = [(PoolKey::from("a\"b\\c\nd"), 1)];
        let line = format_status_line(&status);
        assert_eq!(line, r#"[Pool Status] {"a\"b\\c\nd": 1}"#);
        let object: serde_json::Value = serde_json::from_str(line.strip_prefix("[Pool Status] ").unwrap()).unwrap();
        assert_eq!(object["a\"b\\c\nd"], 1, "the key reads back as the name");
    }
}
