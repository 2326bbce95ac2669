//! What happened to connections before they authenticated (server only): authentication
//! failures, connections handed to the `--fallback` site, refused handshakes, and streams
//! the outbound policy refused. The server counts, `/metrics` shows the totals. Each
//! connection is logged at DEBUG; failed authentications also at INFO, at most once a
//! minute per source (`server::auth_failures`), so a probe storm cannot flood the log.

use std::sync::atomic::{AtomicU64, Ordering};

use super::exposition::{Exposition, label};

/// One server's totals since it started (each server in a process has its own).
#[derive(Debug, Default)]
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
    /// Passwords the auth callback (`--auth-url`) could not judge: a timeout, an error,
    /// garbage, or too many calls in flight (each refused).
    pub auth_callback_failures: AtomicU64,
    /// Connections from a `--proxy-protocol-from` source without a valid PROXY protocol
    /// header in time (closed).
    pub proxy_header_errors: AtomicU64,
}

impl HandshakeCounters {
    pub fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Appends the counters to `/metrics`.
    pub fn render(&self, page: &mut Exposition) {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        page.counter(
            "anytls_auth_failures_total",
            "Connections whose first data after TLS was not a valid authentication, or that sent none in time.",
            [
                (label("reason", "invalid"), load(&self.auth_failures)),
                (label("reason", "timeout"), load(&self.auth_timeouts)),
            ],
        );
        page.counter(
            "anytls_fallback_connections_total",
            "Unauthenticated connections for the --fallback site: relayed, or closed silently (unreachable, full).",
            [
                (label("result", "relayed"), load(&self.fallback_relayed)),
                (label("result", "unreachable"), load(&self.fallback_unreachable)),
                (label("result", "full"), load(&self.fallback_full)),
            ],
        );
        page.counter(
            "anytls_handshakes_refused_total",
            "Connections dropped at accept: --max-handshakes reached, or their source held its share.",
            [
                (label("limit", "total"), load(&self.refused_full)),
                (label("limit", "per_source"), load(&self.refused_source_full)),
            ],
        );
        page.counter(
            "anytls_auth_callback_failures_total",
            "Passwords the --auth-url callback could not judge (timeout, error, garbage, busy): refused.",
            [(String::new(), load(&self.auth_callback_failures))],
        );
        page.counter(
            "anytls_proxy_protocol_errors_total",
            "Connections from a --proxy-protocol-from source without a valid PROXY protocol header in time: closed.",
            [(String::new(), load(&self.proxy_header_errors))],
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_render_with_their_labels() {
        let counters = HandshakeCounters::default();
        HandshakeCounters::count(&counters.fallback_relayed);
        let mut page = Exposition::default();
        counters.render(&mut page);
        let out = page.into_text();
        assert!(out.contains("# TYPE anytls_fallback_connections_total counter"), "{out}");
        assert!(out.contains("anytls_fallback_connections_total{result=\"relayed\"} 1\n"), "{out}");
        assert!(out.contains("anytls_handshakes_refused_total{limit=\"per_source\"} 0\n"), "{out}");
    }

    #[test]
    fn two_servers_count_apart() {
        let (a, b) = (HandshakeCounters::default(), HandshakeCounters::default());
        HandshakeCounters::count(&a.auth_failures);
        assert_eq!((a.auth_failures.load(Ordering::Relaxed), b.auth_failures.load(Ordering::Relaxed)), (1, 0));
    }
}
