//! What happened to connections before they authenticated (server only): authentication
//! failures, connections handed to the `--fallback` site, refused handshakes. The server
//! counts, `/metrics` shows the totals. Each connection is logged only at DEBUG, so a probe
//! storm cannot flood the log.

use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Totals since start-up.
pub struct HandshakeCounters {
    /// TLS completed, then data that is not a valid authentication (wrong password,
    /// too short, not AnyTLS at all).
    pub auth_failures: AtomicU64,
    /// TLS completed, then nothing (or no complete block) before the handshake deadline.
    pub auth_timeouts: AtomicU64,
    /// Connections relayed to the fallback site.
    pub fallback_relayed: AtomicU64,
    /// Connections meant for the fallback site that could not reach it (closed silently).
    pub fallback_unreachable: AtomicU64,
    /// Connections meant for the fallback site over its relay cap (closed silently).
    pub fallback_full: AtomicU64,
    /// Connections dropped at accept: `--max-handshakes` in progress.
    pub refused_full: AtomicU64,
    /// Connections dropped at accept: their source already held its share.
    pub refused_source_full: AtomicU64,
}

pub static HANDSHAKES: HandshakeCounters = HandshakeCounters {
    auth_failures: AtomicU64::new(0),
    auth_timeouts: AtomicU64::new(0),
    fallback_relayed: AtomicU64::new(0),
    fallback_unreachable: AtomicU64::new(0),
    fallback_full: AtomicU64::new(0),
    refused_full: AtomicU64::new(0),
    refused_source_full: AtomicU64::new(0),
};

/// Set by the server, so the client's `/metrics` does not show counters it never moves.
static SHOWN: AtomicBool = AtomicBool::new(false);

impl HandshakeCounters {
    pub fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// The server calls this once: its `/metrics` then carries these counters.
pub fn show_in_metrics() {
    SHOWN.store(true, Ordering::Relaxed);
}

/// Appends the counters in the Prometheus text format (nothing on the client).
pub fn render_prometheus(out: &mut String) {
    if !SHOWN.load(Ordering::Relaxed) {
        return;
    }
    let h = &HANDSHAKES;
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let mut counter = |name: &str, help: &str, samples: &[(&str, u64)]| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} counter");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    counter(
        "anytls_auth_failures_total",
        "Connections whose first data after TLS was not a valid authentication, or that sent none in time.",
        &[("{reason=\"invalid\"}", load(&h.auth_failures)), ("{reason=\"timeout\"}", load(&h.auth_timeouts))],
    );
    counter(
        "anytls_fallback_connections_total",
        "Unauthenticated connections for the --fallback site: relayed, or closed silently (unreachable, full).",
        &[
            ("{result=\"relayed\"}", load(&h.fallback_relayed)),
            ("{result=\"unreachable\"}", load(&h.fallback_unreachable)),
            ("{result=\"full\"}", load(&h.fallback_full)),
        ],
    );
    counter(
        "anytls_handshakes_refused_total",
        "Connections dropped at accept: --max-handshakes reached, or their source held its share.",
        &[("{limit=\"total\"}", load(&h.refused_full)), ("{limit=\"per_source\"}", load(&h.refused_source_full))],
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_render_once_the_server_shows_them() {
        HandshakeCounters::count(&HANDSHAKES.fallback_relayed);
        show_in_metrics();
        let mut out = String::new();
        render_prometheus(&mut out);
        assert!(out.contains("# TYPE anytls_fallback_connections_total counter"), "{out}");
        let relayed = out
            .lines()
            .find_map(|l| l.strip_prefix("anytls_fallback_connections_total{result=\"relayed\"} "))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap();
        assert!(relayed >= 1, "{out}");
        assert!(out.contains("anytls_handshakes_refused_total{limit=\"per_source\"} "), "{out}");
    }
}
