//! What the API shows, and its two renderings: JSON (serde) and the Prometheus text
//! exposition format. Pure: a snapshot in, text out; the service modules fill the snapshot.
//!
//! Definitions (the same for both binaries):
//! - `cache_hits` = `total_reused`: checkouts served by a warm (server) or idle (client)
//!   connection; `cache_misses`: checkouts that had to create one while the caller waited.
//! - `total_created`: every connection the pool created, including the server's warm
//!   connections dialed ahead of demand (`warmed`), so it can exceed `cache_misses`.
//! - `total_closed`: connections the pool closed (expired or found dead, `cleaned`) plus,
//!   on the server, used connections closed when their stream ended (they are never reused).
//! - `hit_rate`: `cache_hits / (cache_hits + cache_misses)` in percent, 0 before any checkout.

use std::fmt::Write;

use serde::Serialize;

use crate::pool::KeyStats;
use crate::pool::buffers::TierStats;

/// The connection pool of one binary at one moment.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConnectionPoolStats {
    /// `outbound` (the server's warm connections) or `sessions` (the client's TLS sessions).
    pub pool: &'static str,
    /// The engine (`--pool-type`).
    pub pool_type: String,
    pub total_created: u64,
    pub total_reused: u64,
    pub total_closed: u64,
    pub current_active: u64,
    pub current_idle: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub hit_rate: f64,
    /// Server: connections dialed ahead of demand; client: always 0.
    pub warmed: u64,
    /// Per target (server, sorted by name) or per server (client, in `-s` order).
    pub targets: Vec<TargetStats>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TargetStats {
    pub target: String,
    pub idle: u64,
    pub active: u64,
    pub created: u64,
    pub reused: u64,
    pub cleaned: u64,
    pub waiters: u64,
}

impl From<KeyStats> for TargetStats {
    fn from(k: KeyStats) -> Self {
        TargetStats {
            target: k.key.to_string(),
            idle: k.idle,
            active: k.active,
            created: k.created,
            reused: k.reused,
            cleaned: k.cleaned,
            waiters: k.waiters,
        }
    }
}

/// The relay's buffer pool at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemoryPoolStats {
    /// Whether the relay reads into pooled buffers (`--buffer-pool on`).
    pub enabled: bool,
    pub tiers: Vec<TierStats>,
}

/// Everything at one moment: what the live page receives every second.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Snapshot {
    /// Milliseconds since the Unix epoch.
    pub unix_ms: u64,
    pub connections: ConnectionPoolStats,
    pub memory: MemoryPoolStats,
}

/// `part / (part + rest)` in percent, rounded to 0.1; 0 when both are 0.
pub fn hit_rate(hits: u64, misses: u64) -> f64 {
    let all = hits + misses;
    if all == 0 { 0.0 } else { (hits as f64 * 1000.0 / all as f64).round() / 10.0 }
}

/// The snapshot in the Prometheus text exposition format (version 0.0.4).
pub fn render_prometheus(s: &Snapshot) -> String {
    let c = &s.connections;
    let pool = format!("pool=\"{}\"", label_value(c.pool));
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            if labels.is_empty() {
                let _ = writeln!(out, "{name} {value}");
            } else {
                let _ = writeln!(out, "{name}{{{labels}}} {value}");
            }
        }
    };
    let one = |v: u64| vec![(pool.clone(), v as f64)];
    metric(
        "anytls_pool_info",
        "gauge",
        "The connection pool and its engine (always 1).",
        &[(format!("{pool},pool_type=\"{}\"", label_value(&c.pool_type)), 1.0)],
    );
    metric(
        "anytls_pool_connections_created_total",
        "counter",
        "Connections the pool created (on demand or warmed ahead).",
        &one(c.total_created),
    );
    metric(
        "anytls_pool_connections_reused_total",
        "counter",
        "Checkouts served by a warm or idle connection.",
        &one(c.total_reused),
    );
    metric(
        "anytls_pool_connections_closed_total",
        "counter",
        "Connections closed: expired or dead ones, and (server) used ones when their stream ended.",
        &one(c.total_closed),
    );
    metric("anytls_pool_connections_active", "gauge", "Connections in use now.", &one(c.current_active));
    metric("anytls_pool_connections_idle", "gauge", "Idle (warm) connections now.", &one(c.current_idle));
    metric("anytls_pool_cache_hits_total", "counter", "Checkouts served from the pool.", &one(c.cache_hits));
    metric(
        "anytls_pool_cache_misses_total",
        "counter",
        "Checkouts that created a connection while the caller waited.",
        &one(c.cache_misses),
    );
    metric(
        "anytls_pool_hit_ratio",
        "gauge",
        "cache_hits / (cache_hits + cache_misses), 0 to 1.",
        &[(pool.clone(), c.hit_rate / 100.0)],
    );
    metric("anytls_pool_warmed_total", "counter", "Connections dialed ahead of demand (server).", &one(c.warmed));

    type Field = fn(&TargetStats) -> u64;
    let per_target: [(&str, &str, &str, Field); 6] = [
        ("anytls_pool_target_idle", "gauge", "Idle (warm) connections per target.", |t| t.idle),
        ("anytls_pool_target_active", "gauge", "Connections in use per target.", |t| t.active),
        ("anytls_pool_target_created_total", "counter", "Connections created per target.", |t| t.created),
        ("anytls_pool_target_reused_total", "counter", "Checkouts served from the pool per target.", |t| t.reused),
        ("anytls_pool_target_cleaned_total", "counter", "Expired or dead connections closed per target.", |t| {
            t.cleaned
        }),
        ("anytls_pool_target_waiters", "gauge", "Callers waiting for a slot per target.", |t| t.waiters),
    ];
    for (name, kind, help, field) in per_target {
        let samples: Vec<(String, f64)> = c
            .targets
            .iter()
            .map(|t| (format!("{pool},target=\"{}\"", label_value(&t.target)), field(t) as f64))
            .collect();
        metric(name, kind, help, &samples);
    }

    let m = &s.memory;
    metric(
        "anytls_buffer_pool_enabled",
        "gauge",
        "1 when relay reads use pooled buffers (--buffer-pool on).",
        &[(String::new(), if m.enabled { 1.0 } else { 0.0 })],
    );
    type TierField = fn(&TierStats) -> u64;
    let per_tier: [(&str, &str, &str, TierField); 7] = [
        ("anytls_buffer_pool_free_buffers", "gauge", "Free buffers held per tier.", |t| t.current_size),
        ("anytls_buffer_pool_peak_free_buffers", "gauge", "Most free buffers held at once per tier.", |t| t.peak_size),
        ("anytls_buffer_pool_in_use_buffers", "gauge", "Buffers handed out now per tier.", |t| t.in_use),
        ("anytls_buffer_pool_allocated_total", "counter", "Buffers newly allocated per tier.", |t| t.total_allocated),
        ("anytls_buffer_pool_reused_total", "counter", "Gets served by a free buffer per tier.", |t| t.total_reused),
        ("anytls_buffer_pool_returned_total", "counter", "Buffers given back and kept per tier.", |t| t.total_returned),
        ("anytls_buffer_pool_dropped_total", "counter", "Buffers given back to a full tier and freed.", |t| {
            t.total_dropped
        }),
    ];
    for (name, kind, help, field) in per_tier {
        let samples: Vec<(String, f64)> =
            m.tiers.iter().map(|t| (format!("size=\"{}\"", t.buffer_size), field(t) as f64)).collect();
        metric(name, kind, help, &samples);
    }
    out
}

// ---------------------------------------------------------------------------------------
// Users and the outbound policy (server only): `/api/users` and the `user="NAME"` metrics.

/// The server's users at one moment, with what the outbound policy refused.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UsersStats {
    /// Every user seen since start-up, by name (`active: false` once removed by a reload).
    pub users: Vec<crate::server::users::UserReport>,
    /// Wrong passwords: they match no user, so they are counted for the server as a whole.
    pub auth_failures: u64,
    /// Streams and UDP datagrams refused by the outbound policy, per reason.
    pub policy_refused: std::collections::BTreeMap<&'static str, u64>,
}

/// The users section of `/metrics`.
pub fn render_user_metrics(s: &UsersStats) -> String {
    use crate::server::users::UserReport;
    let mut out = String::new();
    type Field = fn(&UserReport) -> u64;
    let per_user: [(&str, &str, &str, Field); 5] = [
        ("anytls_user_active", "gauge", "1 while the user is configured, 0 once removed by a reload.", |u| {
            u.active as u64
        }),
        ("anytls_user_sessions", "gauge", "Sessions of the user open now.", |u| u.sessions),
        ("anytls_user_streams_total", "counter", "Streams the user opened.", |u| u.streams),
        ("anytls_user_bytes_up_total", "counter", "Bytes from the user's sessions (client to server).", |u| u.bytes_up),
        ("anytls_user_bytes_down_total", "counter", "Bytes to the user's sessions (server to client).", |u| {
            u.bytes_down
        }),
    ];
    for (name, kind, help, field) in per_user {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for user in &s.users {
            let _ = writeln!(out, "{name}{{user=\"{}\"}} {}", label_value(&user.user), field(user));
        }
    }
    let name = "anytls_policy_refused_total";
    let _ =
        writeln!(out, "# HELP {name} Streams and UDP datagrams refused by the outbound policy.\n# TYPE {name} counter");
    for (reason, count) in &s.policy_refused {
        let _ = writeln!(out, "{name}{{reason=\"{reason}\"}} {count}");
    }
    out
}

/// Escapes a label value as the exposition format requires: backslash, quote, newline.
fn label_value(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> Snapshot {
        Snapshot {
            unix_ms: 1_700_000_000_000,
            connections: ConnectionPoolStats {
                pool: "outbound",
                pool_type: "lockfree".into(),
                total_created: 12,
                total_reused: 8,
                total_closed: 9,
                current_active: 2,
                current_idle: 3,
                cache_hits: 8,
                cache_misses: 4,
                hit_rate: hit_rate(8, 4),
                warmed: 8,
                targets: vec![TargetStats {
                    target: "a\"b:80".into(),
                    idle: 3,
                    active: 2,
                    created: 12,
                    reused: 8,
                    cleaned: 1,
                    waiters: 0,
                }],
            },
            memory: MemoryPoolStats {
                enabled: true,
                tiers: vec![TierStats { buffer_size: 65536, current_size: 4, peak_size: 6, ..TierStats::default() }],
            },
        }
    }

    #[test]
    fn hit_rate_is_a_rounded_percentage() {
        assert_eq!(hit_rate(0, 0), 0.0);
        assert_eq!(hit_rate(8, 4), 66.7);
        assert_eq!(hit_rate(1, 0), 100.0);
    }

    #[test]
    fn json_has_the_documented_fields() {
        let json: serde_json::Value = serde_json::to_value(snapshot().connections).unwrap();
        for field in [
            "total_created",
            "total_reused",
            "total_closed",
            "current_active",
            "current_idle",
            "cache_hits",
            "cache_misses",
            "hit_rate",
            "pool_type",
        ] {
            assert!(json.get(field).is_some(), "{field} missing from {json}");
        }
        assert_eq!(json["hit_rate"], 66.7);
        let target = &json["targets"][0];
        assert_eq!(target["target"], "a\"b:80");
        for field in ["idle", "active", "created", "reused", "cleaned", "waiters"] {
            assert!(target.get(field).is_some(), "{field} missing from {target}");
        }
        let memory: serde_json::Value = serde_json::to_value(snapshot().memory).unwrap();
        let tier = &memory["tiers"][0];
        for field in ["buffer_size", "current_size", "peak_size", "total_allocated", "total_returned"] {
            assert!(tier.get(field).is_some(), "{field} missing from {tier}");
        }
    }

    #[test]
    fn prometheus_text_has_help_type_and_labelled_samples() {
        let text = render_prometheus(&snapshot());
        assert!(text.contains("# HELP anytls_pool_connections_reused_total "));
        assert!(text.contains("# TYPE anytls_pool_connections_reused_total counter\n"));
        assert!(text.contains("anytls_pool_connections_reused_total{pool=\"outbound\"} 8\n"));
        assert!(text.contains("anytls_pool_hit_ratio{pool=\"outbound\"} 0.667\n"));
        assert!(text.contains("anytls_pool_info{pool=\"outbound\",pool_type=\"lockfree\"} 1\n"));
        assert!(text.contains("anytls_pool_target_idle{pool=\"outbound\",target=\"a\\\"b:80\"} 3\n"));
        assert!(text.contains("anytls_buffer_pool_free_buffers{size=\"65536\"} 4\n"));
        assert!(text.contains("anytls_buffer_pool_enabled 1\n"));
    }

    #[test]
    fn user_metrics_are_labelled_by_name() {
        use crate::server::users::UserReport;
        let stats = UsersStats {
            users: vec![UserReport {
                user: "al\"ice".into(),
                active: true,
                sessions: 1,
                streams: 4,
                bytes_up: 10,
                bytes_down: 20,
            }],
            auth_failures: 3,
            policy_refused: [("own_address", 2)].into_iter().collect(),
        };
        let text = render_user_metrics(&stats);
        assert!(text.contains("anytls_user_streams_total{user=\"al\\\"ice\"} 4\n"), "{text}");
        assert!(text.contains("anytls_user_bytes_down_total{user=\"al\\\"ice\"} 20\n"), "{text}");
        assert!(text.contains("anytls_policy_refused_total{reason=\"own_address\"} 2\n"), "{text}");
    }

    #[test]
    fn every_sample_line_belongs_to_a_declared_metric() {
        let text = render_prometheus(&snapshot());
        let mut declared = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split(' ');
                declared.insert(parts.next().unwrap().to_string());
                assert!(matches!(parts.next(), Some("counter" | "gauge")), "{line}");
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                assert!(declared.contains(name), "{line}: no # TYPE before it");
                let value = line.rsplit(' ').next().unwrap();
                assert!(value.parse::<f64>().is_ok(), "{line}: bad value");
            }
        }
    }
}
