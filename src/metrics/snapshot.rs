//! The snapshots the API shows, and their two renderings: JSON (serde) and the Prometheus
//! text exposition format. Pure: a snapshot in, text out; the services fill the snapshot.
//!
//! What each pool figure means, and its JSON and Prometheus names, is one row of
//! [`POOL_FIGURES`] or [`TARGET_FIGURES`] (in `pool/stats.rs`, beside the counters they are
//! computed from); both renderings here walk those rows.
//!
//! `/metrics` keeps per-target series only for the top targets by activity
//! (`--metrics-top-targets`, default 50): one series per
//! destination ever seen would be a cardinality blow-up for any scrape server.

use serde::Serialize;
use serde::ser::{SerializeMap, Serializer};

use super::exposition::{Exposition, Kind, label};
use crate::pool::{Figure, KeyStats, Measure, POOL_FIGURES, PoolStatsSnapshot, TARGET_FIGURES, Value};
use crate::session::buffers::{BufferPoolMode, RelayBuffers, TierStats};

/// Per-target series `/metrics` keeps by default (`--metrics-top-targets`).
pub const DEFAULT_METRICS_TOP_TARGETS: usize = 50;

/// The connection pool of one binary at one moment. Serialized (and rendered to `/metrics`)
/// through [`POOL_FIGURES`] and [`TARGET_FIGURES`], the one list of what is shown.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectionPoolStats {
    /// `outbound` (the server's warm connections) or `sessions` (the client's TLS sessions).
    pub pool: &'static str,
    /// The engine (`--pool-type`).
    pub pool_type: String,
    pub counts: PoolStatsSnapshot,
    /// Per target (server, sorted by name) or per server (client, in `-s` order).
    pub targets: Vec<KeyStats>,
}

impl ConnectionPoolStats {
    pub fn new(pool: &'static str, pool_type: String, counts: PoolStatsSnapshot, targets: Vec<KeyStats>) -> Self {
        ConnectionPoolStats { pool, pool_type, counts, targets }
    }

    /// The figure shown as `json` (tests, and readers that want one number).
    pub fn figure(&self, json: &str) -> Option<f64> {
        POOL_FIGURES.iter().find(|f| f.json == json).map(|f| number(&f.value, &self.counts))
    }
}

fn number<S>(value: &Value<S>, of: &S) -> f64 {
    match value {
        Value::Count(count) => count(of) as f64,
        Value::Percent(percent) => percent(of),
    }
}

/// One snapshot's figures as JSON fields, after `leading` ones.
fn serialize_figures<S, M: SerializeMap>(map: &mut M, figures: &[Figure<S>], of: &S) -> Result<(), M::Error> {
    for figure in figures {
        match figure.value {
            Value::Count(count) => map.serialize_entry(figure.json, &count(of))?,
            Value::Percent(percent) => map.serialize_entry(figure.json, &percent(of))?,
        }
    }
    Ok(())
}

impl Serialize for ConnectionPoolStats {
    fn serialize<Z: Serializer>(&self, serializer: Z) -> Result<Z::Ok, Z::Error> {
        struct Target<'a>(&'a KeyStats);
        impl Serialize for Target<'_> {
            fn serialize<Z: Serializer>(&self, serializer: Z) -> Result<Z::Ok, Z::Error> {
                let mut map = serializer.serialize_map(Some(1 + TARGET_FIGURES.len()))?;
                map.serialize_entry("target", &self.0.key)?;
                serialize_figures(&mut map, TARGET_FIGURES, self.0)?;
                map.end()
            }
        }
        let mut map = serializer.serialize_map(Some(3 + POOL_FIGURES.len()))?;
        map.serialize_entry("pool", self.pool)?;
        map.serialize_entry("pool_type", &self.pool_type)?;
        serialize_figures(&mut map, POOL_FIGURES, &self.counts)?;
        map.serialize_entry("targets", &self.targets.iter().map(Target).collect::<Vec<_>>())?;
        map.end()
    }
}

/// Streams served by a target: what "top targets by activity" ranks by.
fn activity(t: &KeyStats) -> u64 {
    t.reused + t.created + t.unpooled + t.active
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

fn kind(measure: Measure) -> Kind {
    match measure {
        Measure::Counter => Kind::Counter,
        Measure::Gauge => Kind::Gauge,
    }
}

/// A figure as `/metrics` shows it: percentages as ratios.
fn metric_number<S>(value: &Value<S>, of: &S) -> f64 {
    match value {
        Value::Count(count) => count(of) as f64,
        Value::Percent(percent) => percent(of) / 100.0,
    }
}

/// The pool and buffer sections of `/metrics`; per-target series for the `top_targets`
/// most active targets only.
pub fn render_prometheus(s: &Snapshot, top_targets: usize, page: &mut Exposition) {
    let c = &s.connections;
    let pool = label("pool", c.pool);
    page.gauge(
        "anytls_pool_info",
        "The connection pool and its engine (always 1).",
        [(format!("{pool},{}", label("pool_type", &c.pool_type)), 1)],
    );
    for figure in POOL_FIGURES {
        if let Some((name, measure, help)) = figure.metric {
            page.family(name, kind(measure), help, [(pool.clone(), metric_number(&figure.value, &c.counts))]);
        }
    }

    // Only the most active targets get series of their own (bounded cardinality).
    let mut top: Vec<&KeyStats> = c.targets.iter().collect();
    top.sort_by(|a, b| activity(b).cmp(&activity(a)).then_with(|| a.key.cmp(&b.key)));
    top.truncate(top_targets);
    for figure in TARGET_FIGURES {
        if let Some((name, measure, help)) = figure.metric {
            let samples =
                top.iter().map(|t| (format!("{pool},{}", label("target", &t.key)), metric_number(&figure.value, t)));
            page.family(name, kind(measure), help, samples);
        }
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
    /// Destinations each `[[route]]` rule decided (`default`: those none matched).
    pub route_decisions: Vec<RouteDecisions>,
    /// Streams each `[[upstream]]` was asked for, and its failures.
    pub upstreams: Vec<UpstreamStats>,
    /// Sessions of users their plan refused (`quota`, `expired`, `ips`, `sessions`,
    /// `disabled`): on the wire a wrong password, counted here by reason.
    pub plan_refused: std::collections::BTreeMap<&'static str, u64>,
}

/// One route rule's decisions so far.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RouteDecisions {
    pub rule: String,
    pub action: String,
    pub count: u64,
}

/// One upstream's streams so far.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UpstreamStats {
    pub name: String,
    pub streams: u64,
    pub failures: u64,
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
    page.counter(
        "anytls_route_decisions_total",
        "Stream and datagram destinations decided by each [[route]] rule (default: none matched, direct).",
        s.route_decisions
            .iter()
            .map(|d| (format!("{},{}", label("rule", &d.rule), label("action", &d.action)), d.count)),
    );
    page.counter(
        "anytls_upstream_streams_total",
        "Streams sent through each [[upstream]].",
        s.upstreams.iter().map(|u| (label("upstream", &u.name), u.streams)),
    );
    page.counter(
        "anytls_upstream_failures_total",
        "Streams an [[upstream]] did not connect (unreachable, refused, timed out, a bad answer).",
        s.upstreams.iter().map(|u| (label("upstream", &u.name), u.failures)),
    );
    page.counter(
        "anytls_user_refused_total",
        "Sessions refused by their user's plan (a wrong password on the wire), by reason.",
        s.plan_refused.iter().map(|(reason, count)| (label("reason", reason), *count)),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> Snapshot {
        Snapshot {
            unix_ms: 1_700_000_000_000,
            connections: ConnectionPoolStats::new(
                "outbound",
                "lockfree".into(),
                PoolStatsSnapshot {
                    new: 4,
                    reused: 8,
                    cleaned: 1,
                    ended: 8,
                    active: 2,
                    idle: 3,
                    warmed: 8,
                    unused: 1,
                    lookups: 2,
                    keys: 1,
                    ..PoolStatsSnapshot::default()
                },
                vec![KeyStats {
                    key: "a\"b:80".into(),
                    idle: 3,
                    active: 2,
                    created: 12,
                    reused: 8,
                    cleaned: 1,
                    warmed: 8,
                    unused: 1,
                    unpooled: 0,
                }],
            ),
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
            (0..200u64).map(|i| KeyStats { key: format!("t{i}:80"), reused: i, ..target.clone() }).collect();
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
        let json = serde_json::to_value(ConnectionPoolStats::new("outbound", "lock".into(), s, Vec::new())).unwrap();
        let shown = |fields: &[&str]| fields.iter().map(|f| json[f].as_u64().unwrap()).collect::<Vec<_>>();
        assert_eq!(shown(&["total_created", "total_reused", "total_closed"]), [9, 7, 11]);
        assert_eq!(shown(&["cache_hits", "cache_misses", "current_idle", "current_active"]), [7, 3, 4, 1]);
        assert_eq!(shown(&["warmed", "unused", "unpooled", "lookups", "keys"]), [6, 2, 5, 3, 2]);
        assert_eq!(json["hit_rate"], 70.0);
        let text = render(&Snapshot {
            connections: ConnectionPoolStats::new("outbound", "lock".into(), s, Vec::new()),
            ..snapshot()
        });
        assert!(text.contains("anytls_pool_connections_closed_total{pool=\"outbound\"} 11\n"), "{text}");
        assert!(text.contains("anytls_pool_hit_ratio{pool=\"outbound\"} 0.7\n"), "{text}");
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
            route_decisions: vec![RouteDecisions { rule: "ads".into(), action: "block".into(), count: 3 }],
            upstreams: vec![UpstreamStats { name: "warp".into(), streams: 7, failures: 1 }],
            plan_refused: [("quota", 5)].into_iter().collect(),
        };
        let mut page = Exposition::default();
        render_user_metrics(&stats, &mut page);
        let text = page.into_text();
        assert!(text.contains("anytls_user_streams_total{user=\"al\\\"ice\"} 4\n"), "{text}");
        assert!(text.contains("anytls_user_bytes_down_total{user=\"al\\\"ice\"} 20\n"), "{text}");
        assert!(text.contains("anytls_policy_refused_total{reason=\"own_address\"} 2\n"), "{text}");
        assert!(text.contains("anytls_route_decisions_total{rule=\"ads\",action=\"block\"} 3\n"), "{text}");
        assert!(text.contains("anytls_upstream_streams_total{upstream=\"warp\"} 7\n"), "{text}");
        assert!(text.contains("anytls_upstream_failures_total{upstream=\"warp\"} 1\n"), "{text}");
        assert!(text.contains("anytls_user_refused_total{reason=\"quota\"} 5\n"), "{text}");
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
