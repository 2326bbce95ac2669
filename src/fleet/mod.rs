//! A server as one node of a fleet: users pulled from a panel's UniProxy node API, traffic
//! and online IPs pushed back (see docs/fleet.md).
//!
//! The panel's users are a third owner beside the file and the admin API
//! ([`crate::server::users::Owner::Panel`]): each pull replaces them through the same path
//! as a reload, so added users work at once, removed ones are cut off, others are not
//! touched. The panel filters out users that are expired, banned or over their transfer
//! quota, so "over quota at the panel" arrives as "removed".
//!
//! Traffic is counted per user on the node; every [`COLLECT_EVERY`] the growth of each
//! panel user's counters is added to an **outbox** kept in the state directory, and every
//! push interval the outbox is sent. What the panel acknowledges is taken out of the outbox;
//! what it does not (down, slow, garbage) stays and goes with the next push. So a panel
//! outage, a node restart or `kill -9` loses at most the last [`COLLECT_EVERY`] of traffic.
//! UniProxy has no idempotency key: if the node dies between the panel's acknowledgement
//! and the outbox's write, that one push is sent again.

pub mod uniproxy;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hyper::Method;

use crate::http_call::{self as http, CallError, Endpoint};
use crate::metrics::panel::PanelHealth;
use crate::proto::PaddingScheme;
use crate::server::ServerContext;
use crate::server::state::UserState;
use crate::server::users::Users;
use uniproxy::{BASE_PATH, Garbage, NodeConfig};

/// How often the growth of counters goes into the outbox.
pub const COLLECT_EVERY: Duration = Duration::from_secs(2);
/// The panel's own default for both intervals.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);
/// A call to the panel that takes longer is abandoned (and retried later).
const CALL_DEADLINE: Duration = Duration::from_secs(15);
/// The largest answer read: a list of 100,000 users is about 10 MB.
const MAX_ANSWER: usize = 64 << 20;

/// `--panel` and its companions.
#[derive(Debug, Clone)]
pub struct PanelSettings {
    pub url: String,
    pub token: String,
    pub node_id: String,
    /// Overrides the panel's `pull_interval` and `push_interval`.
    pub interval: Option<Duration>,
    /// CA files trusted for an `https://` panel beside the web PKI.
    pub extra_ca: Vec<std::path::PathBuf>,
}

/// Why the panel link could not start.
#[derive(Debug, thiserror::Error)]
pub enum PanelError {
    #[error("--panel: {0}")]
    Url(#[from] CallError),
    #[error("--panel: the first pull of the node config failed: {0}")]
    FirstPull(String),
}

/// One exchange that went wrong, in words for the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum Failure {
    #[error("{0}")]
    Call(#[from] CallError),
    #[error("HTTP status {0}")]
    Status(u16),
    #[error("{0}")]
    Garbage(#[from] Garbage),
    #[error("the push was not acknowledged")]
    NotAcknowledged,
}

/// The node's side of the panel.
pub struct Panel {
    endpoint: Endpoint,
    query: String,
    settings: PanelSettings,
    context: Arc<ServerContext>,
    state: Option<Arc<UserState>>,
    config_etag: Option<String>,
    users_etag: Option<String>,
    config: NodeConfig,
    outbox: BTreeMap<u64, (u64, u64)>,
    /// Each panel user's counters (up, down) when last collected.
    collected: HashMap<String, (u64, u64)>,
    /// `--padding-scheme` was given: it wins over the panel's.
    keep_padding: bool,
    /// Names the panel has given (removed users' traffic still goes out).
    panel_names: std::collections::HashSet<String>,
    failing: bool,
}

impl Panel {
    /// `state` keeps the outbox across restarts (without one it lives in memory only).
    pub fn new(
        settings: PanelSettings,
        context: Arc<ServerContext>,
        state: Option<Arc<UserState>>,
    ) -> Result<Panel, PanelError> {
        let endpoint = Endpoint::parse(&settings.url, &settings.extra_ca)?;
        // Everything but RFC 3986's unreserved characters is escaped.
        const QUERY_VALUE: &percent_encoding::AsciiSet =
            &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');
        let encode = |s: &str| percent_encoding::utf8_percent_encode(s, QUERY_VALUE).to_string();
        let query = format!("token={}&node_id={}&node_type=anytls", encode(&settings.token), encode(&settings.node_id));
        context.panel.enabled.store(true, Ordering::Relaxed);
        let outbox = state.as_ref().map(|s| s.outbox()).unwrap_or_default();
        let panel = Panel {
            endpoint,
            query,
            settings,
            context,
            state,
            config_etag: None,
            users_etag: None,
            config: NodeConfig::default(),
            outbox,
            collected: HashMap::new(),
            panel_names: std::collections::HashSet::new(),
            keep_padding: false,
            failing: false,
        };
        panel.show_outbox();
        Ok(panel)
    }

    /// Keeps the padding scheme the server has (`--padding-scheme`) whatever the panel says.
    pub fn keep_padding(&mut self, keep: bool) {
        self.keep_padding = keep;
    }

    fn health(&self) -> &PanelHealth {
        &self.context.panel
    }

    fn users(&self) -> &Users {
        &self.context.users
    }

    /// The node config now (after [`Panel::start`]: the first pull's).
    pub fn node_config(&self) -> &NodeConfig {
        &self.config
    }

    async fn get(&self, what: &str, etag: Option<&str>) -> Result<http::Answer, Failure> {
        let path = format!("{BASE_PATH}/{what}?{}", self.query);
        let answer = self.endpoint.call(Method::GET, &path, None, etag, CALL_DEADLINE, MAX_ANSWER).await?;
        match answer.status {
            200 | 304 => Ok(answer),
            other => Err(Failure::Status(other)),
        }
    }

    async fn post(&self, what: &str, body: Vec<u8>) -> Result<(), Failure> {
        let path = format!("{BASE_PATH}/{what}?{}", self.query);
        let answer = self.endpoint.call(Method::POST, &path, Some(body), None, CALL_DEADLINE, 1 << 20).await?;
        if answer.status != 200 {
            return Err(Failure::Status(answer.status));
        }
        if !uniproxy::accepted(&answer.body) {
            return Err(Failure::NotAcknowledged);
        }
        Ok(())
    }

    /// Pulls the node config (honouring its ETag) and applies its padding scheme.
    async fn pull_config(&mut self) -> Result<(), Failure> {
        let answer = self.get("config", self.config_etag.clone().as_deref()).await?;
        if answer.status == 304 {
            return Ok(());
        }
        let config = uniproxy::parse_config(&answer.body)?;
        if let Some(lines) = &config.padding_scheme
            && !self.keep_padding
            && config.padding_scheme != self.config.padding_scheme
        {
            match PaddingScheme::load(lines.as_bytes()) {
                Ok(scheme) => {
                    self.context.padding.store(Arc::new(scheme));
                    log::info!("panel: padding scheme from the panel in use (new sessions get it)");
                }
                Err(why) => log::warn!("panel: its padding scheme is refused, the current one stays: {why}"),
            }
        }
        self.config = config;
        self.config_etag = answer.etag;
        Ok(())
    }

    /// Pulls the user list (honouring its ETag) and applies the difference.
    async fn pull_users(&mut self) -> Result<(), Failure> {
        let answer = self.get("user", self.users_etag.clone().as_deref()).await?;
        if answer.status == 304 {
            return Ok(());
        }
        let users = uniproxy::parse_users(&answer.body)?;
        let count = users.len();
        let entries: Vec<_> = users.iter().map(uniproxy::PanelUser::entry).collect();
        self.panel_names.extend(entries.iter().map(|e| e.name.clone()));
        let summary = self.users().replace_from_panel(entries);
        if !summary.added.is_empty() || !summary.removed.is_empty() || self.users_etag.is_none() {
            log::info!(
                "panel: {count} users ({} added, {} removed, {} kept)",
                summary.added.len(),
                summary.removed.len(),
                summary.kept
            );
        }
        self.users_etag = answer.etag;
        Ok(())
    }

    /// Moves the growth of every panel user's counters into the outbox (and the state
    /// directory).
    pub async fn collect(&mut self) {
        let mut touched = Vec::new();
        for (name, counters) in self.users().counters_by_name() {
            if !self.panel_names.contains(&name) {
                continue;
            }
            let Ok(id) = name.parse::<u64>() else { continue };
            let now = (counters.bytes_up.load(Ordering::Relaxed), counters.bytes_down.load(Ordering::Relaxed));
            let before = self.collected.insert(name, now).unwrap_or((0, 0));
            let grown = (now.0.saturating_sub(before.0), now.1.saturating_sub(before.1));
            if grown != (0, 0) {
                let slot = self.outbox.entry(id).or_default();
                slot.0 += grown.0;
                slot.1 += grown.1;
                touched.push(id);
            }
        }
        self.save(touched).await;
    }

    async fn save(&self, ids: Vec<u64>) {
        if let Some(state) = &self.state
            && let Err(why) = state.save_outbox(&self.outbox, ids).await
        {
            log::error!("panel: cannot keep the outbox in the state directory: {why}");
        }
        self.show_outbox();
    }

    fn show_outbox(&self) {
        let bytes: u64 = self.outbox.values().map(|(up, down)| up + down).sum();
        self.health().outbox_users.store(self.outbox.len() as u64, Ordering::Relaxed);
        self.health().outbox_bytes.store(bytes, Ordering::Relaxed);
    }

    /// Sends the outbox; what the panel acknowledged leaves it.
    async fn push(&mut self) -> Result<(), Failure> {
        self.collect().await;
        if !self.outbox.is_empty() {
            let sent = self.outbox.clone();
            self.post("push", uniproxy::push_body(&sent)).await?;
            for (id, (up, down)) in &sent {
                if let Some(slot) = self.outbox.get_mut(id) {
                    slot.0 = slot.0.saturating_sub(*up);
                    slot.1 = slot.1.saturating_sub(*down);
                    if *slot == (0, 0) {
                        self.outbox.remove(id);
                    }
                }
            }
            self.save(sent.keys().copied().collect()).await;
        }
        let online = self.users().panel_online();
        self.post("alive", uniproxy::alive_body(&online)).await
    }

    /// Marks one round's outcome: health, and one log line per change of state.
    fn outcome(&mut self, what: &str, result: Result<(), Failure>) -> bool {
        let health = &self.context.panel;
        match result {
            Ok(()) => {
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
                health.last_success.store(now, Ordering::Relaxed);
                health.up.store(true, Ordering::Relaxed);
                if self.failing {
                    log::info!("panel: reachable again ({what} succeeded)");
                    self.failing = false;
                }
                true
            }
            Err(why) => {
                health.up.store(false, Ordering::Relaxed);
                health.failures.fetch_add(1, Ordering::Relaxed);
                if !self.failing {
                    log::warn!("panel: {what} failed, the last good user list stays, retrying with backoff: {why}");
                    self.failing = true;
                } else {
                    log::debug!("panel: {what} failed again: {why}");
                }
                false
            }
        }
    }

    /// The first pull, before the server listens: the node config (its port may be the
    /// listen port) and the users. Tries `attempts` times, with backoff.
    pub async fn start(&mut self, attempts: u32) -> Result<(), PanelError> {
        let mut backoff = Backoff::default();
        for attempt in 1..=attempts {
            let pulled = match self.pull_config().await {
                Ok(()) => self.pull_users().await,
                Err(why) => Err(why),
            };
            match pulled {
                Ok(()) => {
                    self.outcome("the first pull", Ok(()));
                    return Ok(());
                }
                Err(why) if attempt == attempts => return Err(PanelError::FirstPull(why.to_string())),
                Err(why) => {
                    self.outcome("the first pull", Err(why));
                    tokio::time::sleep(backoff.next()).await;
                }
            }
        }
        Ok(())
    }

    fn pull_every(&self) -> Duration {
        self.settings
            .interval
            .unwrap_or_else(|| self.config.pull_interval.map_or(DEFAULT_INTERVAL, Duration::from_secs))
    }

    fn push_every(&self) -> Duration {
        self.settings
            .interval
            .unwrap_or_else(|| self.config.push_interval.map_or(DEFAULT_INTERVAL, Duration::from_secs))
    }

    /// Pulls, collects and pushes until the task is dropped. A failed round is retried
    /// sooner, with exponential backoff and jitter, never later than the interval.
    async fn rounds(&mut self) {
        let mut collect = tokio::time::interval(COLLECT_EVERY);
        let mut next_pull = tokio::time::Instant::now() + self.pull_every();
        let mut next_push = tokio::time::Instant::now() + self.push_every();
        let (mut pull_backoff, mut push_backoff) = (Backoff::default(), Backoff::default());
        loop {
            tokio::select! {
                _ = collect.tick() => self.collect().await,
                () = tokio::time::sleep_until(next_pull) => {
                    let pulled = match self.pull_config().await {
                        Ok(()) => self.pull_users().await,
                        Err(why) => Err(why),
                    };
                    next_pull = tokio::time::Instant::now() + if self.outcome("pull", pulled) {
                        pull_backoff = Backoff::default();
                        self.pull_every()
                    } else {
                        pull_backoff.next().min(self.pull_every())
                    };
                }
                () = tokio::time::sleep_until(next_push) => {
                    let pushed = self.push().await;
                    next_push = tokio::time::Instant::now() + if self.outcome("push", pushed) {
                        push_backoff = Backoff::default();
                        self.push_every()
                    } else {
                        push_backoff.next().min(self.push_every())
                    };
                }
            }
        }
    }

    /// A last push at shutdown (what is not acknowledged stays in the outbox).
    pub async fn last_push(&mut self) {
        let pushed = self.push().await;
        self.outcome("the last push", pushed);
    }

    /// Runs the link in the background until [`PanelLink::stop`].
    pub fn spawn(self) -> PanelLink {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let mut panel = self;
            tokio::select! {
                () = panel.rounds() => {}
                _ = stopped => panel.last_push().await,
            }
        });
        PanelLink { stop, task }
    }
}

/// The panel link running in the background.
pub struct PanelLink {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl PanelLink {
    /// Stops the link after a last push (bounded by one call's deadline).
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// Exponential backoff from 1 s to 60 s, each wait jittered by up to a quarter, so a fleet
/// that lost its panel does not come back in step.
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff { next: Duration::from_secs(1) }
    }
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(Duration::from_secs(60));
        let jitter = rand::random_range(0.0..0.25);
        wait.mul_f64(1.0 + jitter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_minute_with_jitter() {
        let mut backoff = Backoff::default();
        let waits: Vec<Duration> = (0..9).map(|_| backoff.next()).collect();
        assert!(waits[0] >= Duration::from_secs(1) && waits[0] <= Duration::from_millis(1250));
        assert!(waits[3] >= Duration::from_secs(8) && waits[3] <= Duration::from_secs(10));
        assert!(waits[8] >= Duration::from_secs(60) && waits[8] <= Duration::from_secs(75));
    }
}
