//! The snapshots the API shows, and their two renderings: JSON (serde) and the Prometheus
//! text exposition format. Pure: a snapshot in, text out; the services fill the snapshot.
//!
//! Definitions (the same for both binaries):
//! - `cache_hits` = `total_reused`: checkouts served by a warm (server) or idle (client)
//!   connection; `cache_misses`: checkouts that had to create one while the caller waited.
//! - `total_created`: every connection the pool created, including the server's warm
//!   connections dialed ahead of demand (`warmed`), so it can exceed `cache_misses`.
//! - `total_closed`: connections the pool closed (expired or found dead, `cleaned`) plus,
//!   on the server, used connections closed when their stream ended (they are never reused).
//! - `hit_rate`: `cache_hits / (cache_hits + cache_misses)` in percent, 0 before any checkout.
//! - `unused`, `unpooled`, `lookups`, `keys`: as in [`PoolStatsSnapshot`], the one
//!   vocabulary the log line, this JSON and `/metrics` all come from
//!   ([`ConnectionPoolStats::from_snapshot`] is the only translation).
//!
//! `/metrics` keeps per-target series only for the top targets by activity
//! (`--metrics-top-targets`, default 50): one series per
//! destination ever seen would be a cardinality blow-up for any scrape server.

use serde::Serialize;

use super::exposition::{Exposition, Kind, label};
use crate::pool::{KeyStats, PoolStatsSnapshot};
use crate::session::buffers::{BufferPoolMode, RelayBuffers, TierStats};

/// Per-target series `/metrics` keeps by default (`--metrics-top-targets`).
pub const DEFAULT_METRICS_TOP_TARGETS: usize = 50;

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
    /// Server: warm connections closed without carrying a stream.
    pub unused: u64,
    /// Server: streams dialed outside the pool, beyond `--max-outbound-connections`.
    pub unpooled: u64,
    /// Server: name lookups sent to the system resolver.
    pub lookups: u64,
    /// Keys (targets or servers) the pool holds now.
    pub keys: u64,
    /// Per target (server, sorted by name) or per server (client, in `-s` order).
    pub targets: Vec<TargetStats>,
}

impl ConnectionPoolStats {
    /// The API's view of a pool's counters: the only place the two vocabularies meet.
    pub fn from_snapshot(pool: &'static str, pool_type: String, s: &PoolStatsSnapshot, targets: Vec<KeyStats>) -> Self {
        ConnectionPoolStats {
            pool,
            pool_type,
            total_created: s.new + s.warmed,
            total_reused: s.reused,
            total_closed: s.cleaned + s.ended,
            current_active: s.active,
            current_idle: s.idle,
            cache_hits: s.reused,
            cache_misses: s.new,
            hit_rate: hit_rate(s.reused, s.new),
            warmed: s.warmed,
            unused: s.unused,
            unpooled: s.unpooled,
            lookups: s.lookups,
            keys: s.keys,
            targets: targets.into_iter().map(Into::into).collect(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TargetStats {
    pub target: String,
    pub idle: u64,
    pub active: u64,
    pub created: u64,
    pub reused: u64,
    pub cleaned: u64,
    pub warmed: u64,
    pub unused: u64,
    pub unpooled: u64,
    /// Always 0: the pool never queues a stream (beyond the limit it dials unpooled). Kept
    /// so that readers of the earlier format keep working.
    pub waiters: u64,
}

impl From<KeyStats> for TargetStats {
    fn from(k: KeyStats) -> Self {
        TargetStats {
            target: k.key,
            idle: k.idle,
            active: k.active,
            created: k.created,
            reused: k.reused,
            cleaned: k.cleaned,
            warmed: k.warmed,
            unused: k.unused,
            unpooled: k.unpooled,
            waiters: 0,
        }
    }
}

impl TargetStats {
    /// Streams served: what "top targets by activity" ranks by.
    fn activity(&self) -> u64 {
        self.reused + self.created + self.unpooled + self.active
    }
}

/// The relay's buffer pool at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemoryPoolStats {
    /// Whether the relay reads into pooled buffers (`--buffer-pool on`).
    pub enabled: bool,
    pub tiers: Vec<TierStats>,
}

impl MemoryPoolStats {
    /// The relay buffers of one service, now.
    pub fn of(buffers: &RelayBuffers) -> MemoryPoolStats {
        MemoryPoolStats { enabled: buffers.mode() == BufferPoolMode::On, tiers: buffers.stats() }
    }
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

/// The pool and buffer sections of `/metrics`; per-target series for the `top_targets`
/// most active targets only.
pub fn render_prometheus(s: &Snapshot, top_targets: usize, page: &mut Exposition) {
    let c = &s.connections;
    let pool = label("pool", c.pool);
    let one = |v: u64| [(pool.clone(), v)];
    page.gauge(
        "anytls_pool_info",
        "The connection pool and its engine (always 1).",
        [(format!("{pool},{}", label("pool_type", &c.pool_type)), 1)],
    );
    page.counter(
        "anytls_pool_connections_created_total",
        "Connections the pool created (on demand or warmed ahead).",
        one(c.total_created),
    );
    page.counter(
        "anytls_pool_connections_reused_total",
        "Checkouts served by a warm or idle connection.",
        one(c.total_reused),
    );
    page.counter(
        "anytls_pool_connections_closed_total",
        "Connections closed: expired or dead ones, and (server) used ones when their stream ended.",
        one(c.total_closed),
    );
    page.gauge("anytls_pool_connections_active", "Connections in use now.", one(c.current_active));
    page.gauge("anytls_pool_connections_idle", "Idle (warm) connections now.", one(c.current_idle));
    page.counter("anytls_pool_cache_hits_total", "Checkouts served from the pool.", one(c.cache_hits));
    page.counter(
        "anytls_pool_cache_misses_total",
        "Checkouts that created a connection while the caller waited.",
        one(c.cache_misses),
    );
    page.family(
        "anytls_pool_hit_ratio",
        Kind::Gauge,
        "cache_hits / (cache_hits + cache_misses), 0 to 1.",
        [(pool.clone(), c.hit_rate / 100.0)],
    );
    page.counter("anytls_pool_warmed_total", "Connections dialed ahead of demand (server).", one(c.warmed));
    page.counter(
        "anytls_pool_unused_total",
        "Warm connections closed without carrying a stream (server).",
        one(c.unused),
    );
    page.counter(
        "anytls_pool_unpooled_total",
        "Streams dialed outside the pool, beyond the per-target limit (server).",
        one(c.unpooled),
    );
    page.counter("anytls_pool_name_lookups_total", "Name lookups sent to the resolver (server).", one(c.lookups));
    page.gauge("anytls_pool_keys", "Keys (targets or servers) the pool holds now.", one(c.keys));

    // Only the most active targets get series of their own (bounded cardinality).
    let mut top: Vec<&TargetStats> = c.targets.iter().collect();
    top.sort_by(|a, b| b.activity().cmp(&a.activity()).then_with(|| a.target.cmp(&b.target)));
    top.truncate(top_targets);
    type Field = fn(&TargetStats) -> u64;
    let per_target: [(&str, Kind, &str, Field); 7] = [
        ("anytls_pool_target_idle", Kind::Gauge, "Idle (warm) connections per target.", |t| t.idle),
        ("anytls_pool_target_active", Kind::Gauge, "Connections in use per target.", |t| t.active),
        ("anytls_pool_target_created_total", Kind::Counter, "Connections created per target.", |t| t.created),
        ("anytls_pool_target_reused_total", Kind::Counter, "Checkouts served from the pool per target.", |t| t.reused),
        ("anytls_pool_target_cleaned_total", Kind::Counter, "Expired or dead connections closed per target.", |t| {
            t.cleaned
        }),
        ("anytls_pool_target_warmed_total", Kind::Counter, "Connections dialed ahead of demand per target.", |t| {
            t.warmed
        }),
        ("anytls_pool_target_unpooled_total", Kind::Counter, "Streams dialed unpooled per target.", |t| t.unpooled),
    ];
    for (name, kind, help, field) in per_target {
        let samples = top.iter().map(|t| (format!("{pool},{}", label("target", &t.target)), field(t) as f64));
        page.family(name, kind, help, samples);
    }

    let m = &s.memory;
    page.gauge(
        "anytls_buffer_pool_enabled",
        "1 when relay reads use pooled buffers (--buffer-pool on).",
        [(String::new(), m.enabled as u64)],
    );
    type TierField = fn(&TierStats) -> u64;
    let per_tier: [(&str, Kind, &str, TierField); 7] = [
        ("anytls_buffer_pool_free_buffers", Kind::Gauge, "Free buffers held per tier.", |t| t.current_size),
        ("anytls_buffer_pool_peak_free_buffers", Kind::Gauge, "Most free buffers held at once per tier.", |t| {
            t.peak_size
        }),
        ("anytls_buffer_pool_in_use_buffers", Kind::Gauge, "Buffers handed out now per tier.", |t| t.in_use),
        ("anytls_buffer_pool_allocated_total", Kind::Counter, "Buffers newly allocated per tier.", |t| {
            t.total_allocated
        }),
        ("anytls_buffer_pool_reused_total", Kind::Counter, "Gets served by a free buffer per tier.", |t| {
            t.total_reused
        }),
        ("anytls_buffer_pool_returned_total", Kind::Counter, "Buffers given back and kept per tier.", |t| {
            t.total_returned
        }),
        ("anytls_buffer_pool_dropped_total", Kind::Counter, "Buffers given back to a full tier and freed.", |t| {
            t.total_dropped
        }),
    ];
    for (name, kind, help, field) in per_tier {
        let samples = m.tiers.iter().map(|t| (label("size", &t.buffer_size.to_string()), field(t) as f64));
        page.family(name, kind, help, samples);
    }
}

// ---------------------------------------------------------------------------------------
// Users and the outbound policy (server only): `/api/users` and the `user="NAME"` metrics.

/// One user's counters, as the API shows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UserReport {
    pub user: String,
    /// Whether the user is in the current configuration (false: removed by a reload).
    pub active: bool,
    pub sessions: u64,
    pub streams: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

/// The server's users at one moment, with what the outbound policy refused.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UsersStats {
    /// Every user seen since start-up, by name (`active: false` once removed by a reload).
    pub users: Vec<UserReport>,
    /// Wrong passwords: they match no user, so they are counted for the server as a whole.
    pub auth_failures: u64,
    /// Streams and UDP datagrams refused by the outbound policy, per reason.
    pub policy_refused: std::collections::BTreeMap<&'static str, u64>,
}

/// The users section of `/metrics`.
pub fn render_user_metrics(s: &UsersStats, page: &mut Exposition) {
    type Field = fn(&UserReport) -> u64;
    let per_user: [(&str, Kind, &str, Field); 5] = [
        ("anytls_user_active", Kind::Gauge, "1 while the user is configured, 0 once removed by a reload.", |u| {
            u.active as u64
        }),
        ("anytls_user_sessions", Kind::Gauge, "Sessions of the user open now.", |u| u.sessions),
        ("anytls_user_streams_total", Kind::Counter, "Streams the user opened.", |u| u.streams),
        ("anytls_user_bytes_up_total", Kind::Counter, "Bytes from the user's sessions (client to server).", |u| {
            u.bytes_up
        }),
        ("anytls_user_bytes_down_total", Kind::Counter, "Bytes to the user's sessions (server to client).", |u| {
            u.bytes_down
        }),
    ];
    for (name, kind, help, field) in per_user {
        page.family(name, kind, help, s.users.iter().map(|u| (label("user", &u.user), field(u) as f64)));
    }
    page.counter(
        "anytls_policy_refused_total",
        "Streams and UDP datagrams refused by the outbound policy.",
        s.policy_refused.iter().map(|(reason, count)| (label("reason", reason), *count)),
    );
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
                unused: 1,
                unpooled: 0,
                lookups: 2,
                keys: 1,
                targets: vec![TargetStats {
                    target: "a\"b:80".into(),
                    idle: 3,
                    active: 2,
                    created: 12,
                    reused: 8,
                    cleaned: 1,
                    warmed: 8,
                    unused: 1,
                    unpooled: 0,
                    waiters: 0,
                }],
            },
            memory: MemoryPoolStats {
                enabled: true,
                tiers: vec![TierStats { buffer_size: 65536, current_size: 4, peak_size: 6, ..TierStats::default() }],
            },
        }
    }

    fn render(s: &Snapshot) -> String {
        let mut page = Exposition::default();
        render_prometheus(s, DEFAULT_METRICS_TOP_TARGETS, &mut page);
        page.into_text()
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
        let text = render(&snapshot());
        assert!(text.contains("# HELP anytls_pool_connections_reused_total "));
        assert!(text.contains("# TYPE anytls_pool_connections_reused_total counter\n"));
        assert!(text.contains("anytls_pool_connections_reused_total{pool=\"outbound\"} 8\n"));
        assert!(text.contains("anytls_pool_hit_ratio{pool=\"outbound\"} 0.667\n"));
        assert!(text.contains("anytls_pool_info{pool=\"outbound\",pool_type=\"lockfree\"} 1\n"));
        assert!(text.contains("anytls_pool_target_idle{pool=\"outbound\",target=\"a\\\"b:80\"} 3\n"));
        assert!(text.contains("anytls_buffer_pool_free_buffers{size=\"65536\"} 4\n"));
        assert!(text.contains("anytls_buffer_pool_enabled 1\n"));
        assert!(text.contains("anytls_pool_keys{pool=\"outbound\"} 1\n"));
        assert!(text.contains("anytls_pool_unused_total{pool=\"outbound\"} 1\n"));
    }

    #[test]
    fn per_target_series_are_kept_for_the_most_active_targets_only() {
        let mut s = snapshot();
        let target = s.connections.targets[0].clone();
        s.connections.targets =
            (0..200u64).map(|i| TargetStats { target: format!("t{i}:80"), reused: i, ..target.clone() }).collect();
        let text = render(&s);
        let series = |t: &str| {
            text.lines().filter(|l| l.starts_with("anytls_pool_target_reused_total") && l.contains(t)).count()
        };
        let kept = text.lines().filter(|l| l.starts_with("anytls_pool_target_reused_total{")).count();
        assert_eq!(kept, DEFAULT_METRICS_TOP_TARGETS);
        assert_eq!(series("target=\"t199:80\""), 1, "the busiest is kept");
        assert_eq!(series("target=\"t0:80\""), 0, "the quietest is dropped");
    }

    #[test]
    fn the_api_view_follows_the_snapshot() {
        let s = PoolStatsSnapshot {
            total: 10,
            active: 1,
            reused: 7,
            new: 3,
            cleaned: 2,
            idle: 4,
            warmed: 6,
            unused: 2,
            unpooled: 5,
            ended: 9,
            lookups: 3,
            keys: 2,
        };
        let c = ConnectionPoolStats::from_snapshot("outbound", "lock".into(), &s, Vec::new());
        assert_eq!((c.total_created, c.total_reused, c.total_closed), (9, 7, 11));
        assert_eq!((c.cache_hits, c.cache_misses, c.current_idle, c.current_active), (7, 3, 4, 1));
        assert_eq!((c.warmed, c.unused, c.unpooled, c.lookups, c.keys), (6, 2, 5, 3, 2));
        assert_eq!(c.hit_rate, 70.0);
    }

    #[test]
    fn user_metrics_are_labelled_by_name() {
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
        let mut page = Exposition::default();
        render_user_metrics(&stats, &mut page);
        let text = page.into_text();
        assert!(text.contains("anytls_user_streams_total{user=\"al\\\"ice\"} 4\n"), "{text}");
        assert!(text.contains("anytls_user_bytes_down_total{user=\"al\\\"ice\"} 20\n"), "{text}");
        assert!(text.contains("anytls_policy_refused_total{reason=\"own_address\"} 2\n"), "{text}");
    }

    #[test]
    fn every_sample_line_belongs_to_a_declared_metric() {
        let text = render(&snapshot());
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
