//! The metrics room: the snapshots of what the proxy counts and every rendering of them,
//! the stats log lines, JSON (serde) and the Prometheus page, from one set of definitions.
//!
//! Counters stay with what moves them (the pools' [`crate::pool::PoolCounters`], a
//! user's counters, a server's [`HandshakeCounters`]); a service hands this room
//! snapshots through [`MetricsSource`], and the monitoring API only serves what this room
//! renders. The data path never imports the API.

pub mod access_log;
pub mod exposition;
pub mod handshakes;
pub mod log_lines;
pub mod panel;
pub mod snapshot;

use std::time::{SystemTime, UNIX_EPOCH};

pub use access_log::AccessLogCounters;
pub use exposition::Exposition;
pub use handshakes::HandshakeCounters;
pub use log_lines::StatsTicker;
pub use snapshot::{ConnectionPoolStats, MemoryPoolStats, Snapshot, UsersStats};

/// What a running service (a server or a client) shows: the API asks it, this room
/// renders it.
pub trait MetricsSource: Send + Sync + 'static {
    fn connection_pool_stats(&self) -> ConnectionPoolStats;
    fn memory_pool_stats(&self) -> MemoryPoolStats;
    /// The server's users (`None` on the client, which has none).
    fn users_stats(&self) -> Option<UsersStats> {
        None
    }
    /// The server's handshake counters (`None` on the client, which never moves them).
    fn handshakes(&self) -> Option<&HandshakeCounters> {
        None
    }
    /// The server's access log counters (`None` on the client, which has no access log).
    fn access_log(&self) -> Option<&AccessLogCounters> {
        None
    }
    /// The server's link to its panel (`None` on the client).
    fn panel(&self) -> Option<&panel::PanelHealth> {
        None
    }
}

/// Everything at this moment, as the live page receives it.
pub fn snapshot(source: &dyn MetricsSource) -> Snapshot {
    let unix_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    Snapshot { unix_ms, connections: source.connection_pool_stats(), memory: source.memory_pool_stats() }
}

/// The whole `/metrics` page, with per-target series for the `top_targets` most active.
pub fn render_prometheus(source: &dyn MetricsSource, top_targets: usize) -> String {
    let mut page = Exposition::default();
    snapshot::render_prometheus(&snapshot(source), top_targets, &mut page);
    if let Some(handshakes) = source.handshakes() {
        handshakes.render(&mut page);
    }
    if let Some(users) = source.users_stats() {
        snapshot::render_user_metrics(&users, &mut page);
    }
    if let Some(access_log) = source.access_log() {
        access_log.render(&mut page);
    }
    if let Some(panel) = source.panel() {
        panel.render(&mut page);
    }
    page.into_text()
}
