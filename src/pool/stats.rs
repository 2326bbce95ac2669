//! A pool's counters and what is shown of them, defined once.
//!
//! Each counter is one line in a [`counter_set!`] list, which makes both the atomics the
//! pool bumps and the plain copy a snapshot reads. Each figure shown is one row of
//! [`POOL_FIGURES`] or [`TARGET_FIGURES`]: its JSON field, its Prometheus family, its help
//! text and how it is computed from a snapshot. The metrics room renders the JSON API and
//! `/metrics` from those rows and nothing else, so adding a metric is a counter line, the
//! code that bumps it, and its row here (plus, if it should be on the live page, its line
//! there).

use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_utils::CachePadded;

use super::reserve_slot;

/// One set of counters: `$storage` holds an atomic per counter, `$copy` the plain values of
/// one moment (with the owner-filled fields after them), and `$storage::snapshot` copies.
macro_rules! counter_set {
    (
        $(#[$storage_meta:meta])*
        $storage:ident of $cell:ty, $field_vis:vis fields;
        $(#[$copy_meta:meta])*
        $copy:ident {
            $( $(#[doc = $doc:literal])+ $field:ident, )+
        }
        filled by the owner {
            $( $(#[doc = $owner_doc:literal])+ $owner_field:ident: $owner_ty:ty, )*
        }
    ) => {
        $(#[$storage_meta])*
        #[derive(Debug, Default)]
        pub struct $storage {
            $( $(#[doc = $doc])+ $field_vis $field: $cell, )+
        }

        $(#[$copy_meta])*
        pub struct $copy {
            $( $(#[doc = $owner_doc])+ pub $owner_field: $owner_ty, )*
            $( $(#[doc = $doc])+ pub $field: u64, )+
        }

        impl $storage {
            /// The counters now; the owner-filled fields are left at their default.
            pub fn snapshot(&self) -> $copy {
                $copy {
                    $( $field: self.$field.load(Ordering::Relaxed), )+
                    ..Default::default()
                }
            }
        }
    };
}

counter_set! {
    /// A pool's counters. Each sits on its own cache line: they are bumped from every thread
    /// on every checkout, and packed together unrelated updates would fight over one line.
    PoolCounters of CachePadded<AtomicU64>, fields;
    /// A point-in-time copy of [`PoolCounters`]: what the log line, the API and `/metrics` show.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
    PoolStatsSnapshot {
        /// Checkouts that created a resource while the caller waited.
        new,
        /// Checkouts served by an idle (warm) entry.
        reused,
        /// Idle entries closed by the pool: expired, or found dead.
        cleaned,
        /// Resources in use now (server: pooled and unpooled connections).
        active,
        /// Idle entries now. The engines reserve a slot here before storing an entry, which
        /// is how the global cap is enforced without a global lock.
        idle,
        /// Server: connections dialed ahead of demand.
        warmed,
        /// Server: warm connections closed without ever carrying a stream.
        unused,
        /// Server: streams dialed outside the pool, beyond `--max-outbound-connections`.
        unpooled,
        /// Server: used connections closed when their stream ended (never reused).
        ended,
    }
    filled by the owner {
        /// Server: name lookups sent to the resolver (the system one or --dns-server).
        lookups: u64,
        /// Keys (targets, servers) the pool holds now.
        keys: u64,
    }
}

counter_set! {
    /// Per-key counters, kept in each key's state (the same words as [`PoolCounters`]).
    KeyCounters of AtomicU64, pub fields;
    /// One key's share of a pool (a target of the server's outbound pool, a server of the
    /// client's session pool), for the API.
    #[derive(Debug, Clone, PartialEq, Eq, Default)]
    KeyStats {
        /// Entries created for this key, on demand or ahead of it.
        created,
        /// Checkouts served from the pool for this key.
        reused,
        /// Expired or dead entries closed for this key.
        cleaned,
        /// Entries in use now for this key.
        active,
        /// Entries created ahead of demand for this key (server).
        warmed,
        /// Warm entries closed without carrying a stream for this key (server).
        unused,
        /// Streams served outside the pool for this key (server).
        unpooled,
    }
    filled by the owner {
        /// The key by name (a target's `host:port`, a server's address).
        key: String,
        /// Idle entries for this key now.
        idle: u64,
    }
}

impl PoolCounters {
    /// The caller created a resource because the pool had none to offer.
    pub fn record_new(&self) {
        self.new.fetch_add(1, Ordering::Relaxed);
    }

    /// The caller was served an idle entry and uses it.
    pub fn record_reused(&self) {
        self.reused.fetch_add(1, Ordering::Relaxed);
    }

    /// The caller closed `n` idle entries: swept as expired, or found dead.
    pub fn record_cleaned(&self, n: u64) {
        self.cleaned.fetch_add(n, Ordering::Relaxed);
    }

    /// A resource went into use.
    pub fn record_checkout(&self) {
        self.active.fetch_add(1, Ordering::Relaxed);
    }

    /// A resource came out of use. Saturates at zero so that a stray check-in cannot wrap the
    /// gauge into nonsense.
    pub fn record_checkin(&self) {
        let _ = self.active.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// A resource was created ahead of demand (server: a warm dial).
    pub fn record_warmed(&self) {
        self.warmed.fetch_add(1, Ordering::Relaxed);
    }

    /// A resource created ahead of demand was closed without ever being used.
    pub fn record_unused(&self) {
        self.unused.fetch_add(1, Ordering::Relaxed);
    }

    /// A caller was served outside the pool, beyond its per-key limit.
    pub fn record_unpooled(&self) {
        self.unpooled.fetch_add(1, Ordering::Relaxed);
    }

    /// A used resource was closed when its user was done (server: never reused).
    pub fn record_ended(&self) {
        self.ended.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn idle_total(&self) -> usize {
        self.idle.load(Ordering::Relaxed) as usize
    }

    /// Claims one global idle slot unless `max` are already taken.
    pub(super) fn try_reserve_idle(&self, max: usize) -> bool {
        reserve_slot(&self.idle, max as u64)
    }

    pub(super) fn release_idle(&self, n: usize) {
        self.idle.fetch_sub(n as u64, Ordering::Relaxed);
    }
}

impl PoolStatsSnapshot {
    /// Checkouts served by the pool: `reused + new` (unpooled ones are not among them).
    pub fn total(&self) -> u64 {
        self.reused + self.new
    }
}

impl KeyCounters {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Saturating decrement, for gauges.
    pub fn drop_one(counter: &AtomicU64) {
        let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// This key's counters now, under its name, with `idle` entries.
    pub fn stats(&self, key: String, idle: usize) -> KeyStats {
        KeyStats { key, idle: idle as u64, ..self.snapshot() }
    }
}

/// Whether a figure only grows (a Prometheus counter) or goes up and down (a gauge).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Measure {
    Counter,
    Gauge,
}

/// How a figure is computed from a snapshot `S`.
#[derive(Clone, Copy)]
pub enum Value<S> {
    /// A count: an integer in JSON and in `/metrics`.
    Count(fn(&S) -> u64),
    /// A percentage, 0 to 100: so in JSON, and a ratio 0 to 1 in `/metrics` (the Prometheus
    /// convention).
    Percent(fn(&S) -> f64),
}

/// One figure shown of a snapshot `S`: the JSON API and `/metrics` both read it from here.
pub struct Figure<S> {
    /// The field in the JSON API.
    pub json: &'static str,
    /// The Prometheus family, its kind and help text; `None` for a JSON-only field.
    pub metric: Option<(&'static str, Measure, &'static str)>,
    pub value: Value<S>,
}

use Measure::{Counter, Gauge};
use Value::{Count, Percent};

/// The figures of a whole pool, in the order the JSON API lists them.
pub const POOL_FIGURES: &[Figure<PoolStatsSnapshot>] = &[
    Figure {
        json: "total_created",
        metric: Some((
            "anytls_pool_connections_created_total",
            Counter,
            "Connections the pool created (on demand or warmed ahead).",
        )),
        value: Count(|s| s.new + s.warmed),
    },
    Figure {
        json: "total_reused",
        metric: Some((
            "anytls_pool_connections_reused_total",
            Counter,
            "Checkouts served by a warm or idle connection.",
        )),
        value: Count(|s| s.reused),
    },
    Figure {
        json: "total_closed",
        metric: Some((
            "anytls_pool_connections_closed_total",
            Counter,
            "Connections closed: expired or dead ones, and (server) used ones when their stream ended.",
        )),
        value: Count(|s| s.cleaned + s.ended),
    },
    Figure {
        json: "current_active",
        metric: Some(("anytls_pool_connections_active", Gauge, "Connections in use now.")),
        value: Count(|s| s.active),
    },
    Figure {
        json: "current_idle",
        metric: Some(("anytls_pool_connections_idle", Gauge, "Idle (warm) connections now.")),
        value: Count(|s| s.idle),
    },
    Figure {
        json: "cache_hits",
        metric: Some(("anytls_pool_cache_hits_total", Counter, "Checkouts served from the pool.")),
        value: Count(|s| s.reused),
    },
    Figure {
        json: "cache_misses",
        metric: Some((
            "anytls_pool_cache_misses_total",
            Counter,
            "Checkouts that created a connection while the caller waited.",
        )),
        value: Count(|s| s.new),
    },
    Figure {
        json: "hit_rate",
        metric: Some(("anytls_pool_hit_ratio", Gauge, "cache_hits / (cache_hits + cache_misses), 0 to 1.")),
        value: Percent(|s| hit_rate(s.reused, s.new)),
    },
    Figure {
        json: "warmed",
        metric: Some(("anytls_pool_warmed_total", Counter, "Connections dialed ahead of demand (server).")),
        value: Count(|s| s.warmed),
    },
    Figure {
        json: "unused",
        metric: Some((
            "anytls_pool_unused_total",
            Counter,
            "Warm connections closed without carrying a stream (server).",
        )),
        value: Count(|s| s.unused),
    },
    Figure {
        json: "unpooled",
        metric: Some((
            "anytls_pool_unpooled_total",
            Counter,
            "Streams dialed outside the pool, beyond the per-target limit (server).",
        )),
        value: Count(|s| s.unpooled),
    },
    Figure {
        json: "lookups",
        metric: Some(("anytls_pool_name_lookups_total", Counter, "Name lookups sent to the resolver (server).")),
        value: Count(|s| s.lookups),
    },
    Figure {
        json: "keys",
        metric: Some(("anytls_pool_keys", Gauge, "Keys (targets or servers) the pool holds now.")),
        value: Count(|s| s.keys),
    },
];

/// The figures of one key (target or server), in the order the JSON API lists them after
/// its `target` name.
pub const TARGET_FIGURES: &[Figure<KeyStats>] = &[
    Figure {
        json: "idle",
        metric: Some(("anytls_pool_target_idle", Gauge, "Idle (warm) connections per target.")),
        value: Count(|t| t.idle),
    },
    Figure {
        json: "active",
        metric: Some(("anytls_pool_target_active", Gauge, "Connections in use per target.")),
        value: Count(|t| t.active),
    },
    Figure {
        json: "created",
        metric: Some(("anytls_pool_target_created_total", Counter, "Connections created per target.")),
        value: Count(|t| t.created),
    },
    Figure {
        json: "reused",
        metric: Some(("anytls_pool_target_reused_total", Counter, "Checkouts served from the pool per target.")),
        value: Count(|t| t.reused),
    },
    Figure {
        json: "cleaned",
        metric: Some(("anytls_pool_target_cleaned_total", Counter, "Expired or dead connections closed per target.")),
        value: Count(|t| t.cleaned),
    },
    Figure {
        json: "warmed",
        metric: Some(("anytls_pool_target_warmed_total", Counter, "Connections dialed ahead of demand per target.")),
        value: Count(|t| t.warmed),
    },
    Figure { json: "unused", metric: None, value: Count(|t| t.unused) },
    Figure {
        json: "unpooled",
        metric: Some(("anytls_pool_target_unpooled_total", Counter, "Streams dialed unpooled per target.")),
        value: Count(|t| t.unpooled),
    },
    // Always 0: the pool never queues a stream (beyond the limit it dials unpooled). Kept so
    // that readers of the earlier format keep working.
    Figure { json: "waiters", metric: None, value: Count(|_| 0) },
];

/// `hits / (hits + misses)` in percent, rounded to 0.1; 0 when both are 0.
pub fn hit_rate(hits: u64, misses: u64) -> f64 {
    let all = hits + misses;
    if all == 0 { 0.0 } else { (hits as f64 * 1000.0 / all as f64).round() / 10.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_figure_has_its_own_json_field_and_metric_family() {
        for figures in [POOL_FIGURES.iter().map(|f| (f.json, f.metric)).collect::<Vec<_>>()]
            .into_iter()
            .chain([TARGET_FIGURES.iter().map(|f| (f.json, f.metric)).collect()])
        {
            let mut json: Vec<&str> = figures.iter().map(|f| f.0).collect();
            let mut metrics: Vec<&str> = figures.iter().filter_map(|f| f.1.map(|m| m.0)).collect();
            let (fields, families) = (json.len(), metrics.len());
            json.sort_unstable();
            json.dedup();
            metrics.sort_unstable();
            metrics.dedup();
            assert_eq!((json.len(), metrics.len()), (fields, families), "a name is used twice");
            for (_, metric) in &figures {
                if let Some((name, kind, _)) = metric {
                    assert_eq!(
                        name.ends_with("_total"),
                        *kind == Counter,
                        "{name}: counters and only counters end in _total"
                    );
                }
            }
        }
    }

    #[test]
    fn a_snapshot_copies_every_counter() {
        let c = KeyCounters::default();
        KeyCounters::bump(&c.warmed);
        KeyCounters::bump(&c.created);
        KeyCounters::bump(&c.active);
        KeyCounters::drop_one(&c.active);
        KeyCounters::drop_one(&c.active); // saturates
        let s = c.stats("t:80".into(), 2);
        assert_eq!(s, KeyStats { key: "t:80".into(), idle: 2, warmed: 1, created: 1, ..KeyStats::default() });
    }

    #[test]
    fn hit_rate_is_a_rounded_percentage() {
        assert_eq!(hit_rate(0, 0), 0.0);
        assert_eq!(hit_rate(8, 4), 66.7);
        assert_eq!(hit_rate(1, 0), 100.0);
    }
}
