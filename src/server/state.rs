//! What the server keeps in its state directory (`--state-dir`), on the embedded store
//! ([`crate::store`]): the admin API's users and removals, and everyone's quota usage.
//!
//! Keys: `user/NAME` → `{"password": …, "plan": {…}}` (a user the API added or changed),
//! `removed/NAME` → `true` (a file user the API removed), `usage/NAME` → bytes counted
//! against the quota, `outbox/ID` → `[up, down]` (traffic the panel has not acknowledged
//! yet, see `fleet`). A user change is durable before the API answers; usage is written
//! every [`USAGE_EVERY`] and at shutdown, so `kill -9` loses at most that much of it.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::users::{Plan, UserEntry, Users};
use crate::store::{Change, Store, StoreError};

/// How often quota usage is written to the state directory.
pub const USAGE_EVERY: Duration = Duration::from_secs(2);

#[derive(Debug, Serialize, Deserialize)]
struct StoredUser {
    password: String,
    #[serde(default)]
    plan: Plan,
}

/// The server's state directory, open.
pub struct UserState {
    store: Store,
    /// The panel's outbox as found at start-up.
    outbox: std::collections::BTreeMap<u64, (u64, u64)>,
    /// Usage as last written, to write only what changed.
    written: std::sync::Mutex<std::collections::HashMap<String, u64>>,
}

impl UserState {
    /// Opens `dir` and restores what it holds into `users` (over the file's users: the
    /// API's version of a user wins, and the names it removed stay removed).
    pub fn open(dir: &Path, users: &Users) -> Result<UserState, StoreError> {
        let (store, contents) = Store::open(dir)?;
        let (mut api_users, mut removed, mut used) = (Vec::new(), Vec::new(), Vec::new());
        let mut outbox = std::collections::BTreeMap::new();
        for (key, value) in contents {
            if let Some(name) = key.strip_prefix("user/") {
                match serde_json::from_value::<StoredUser>(value) {
                    Ok(user) => api_users.push(UserEntry::new(name, &user.password, user.plan)),
                    Err(why) => log::error!("state: {key}: unreadable, skipped: {why}"),
                }
            } else if let Some(name) = key.strip_prefix("removed/") {
                removed.push(name.to_string());
            } else if let Some(name) = key.strip_prefix("usage/") {
                used.push((name.to_string(), value.as_u64().unwrap_or(0)));
            } else if let Some(id) = key.strip_prefix("outbox/").and_then(|id| id.parse::<u64>().ok()) {
                let pair = |i: usize| value.get(i).and_then(serde_json::Value::as_u64).unwrap_or(0);
                outbox.insert(id, (pair(0), pair(1)));
            }
        }
        log::info!(
            "state directory {}: {} users of the admin API, {} removed by it, usage of {}",
            dir.display(),
            api_users.len(),
            removed.len(),
            used.len()
        );
        let written = used.iter().cloned().collect();
        users.restore(api_users, removed, used);
        Ok(UserState { store, outbox, written: std::sync::Mutex::new(written) })
    }

    /// The panel's outbox as the state directory kept it: traffic per panel id not yet
    /// acknowledged (`outbox/ID` → `[up, down]`).
    pub fn outbox(&self) -> std::collections::BTreeMap<u64, (u64, u64)> {
        self.outbox.clone()
    }

    /// Makes durable the outbox entries of `ids`, as `outbox` now has them (absent: sent).
    pub async fn save_outbox(
        &self,
        outbox: &std::collections::BTreeMap<u64, (u64, u64)>,
        ids: impl IntoIterator<Item = u64>,
    ) -> Result<(), StoreError> {
        let changes: Vec<Change> = ids
            .into_iter()
            .map(|id| match outbox.get(&id) {
                Some((up, down)) => Change::Put(format!("outbox/{id}"), serde_json::json!([up, down])),
                None => Change::Delete(format!("outbox/{id}")),
            })
            .collect();
        if changes.is_empty() {
            return Ok(());
        }
        self.store.apply(changes).await
    }

    /// Makes `entry` durable as the API's user.
    pub async fn save_user(&self, entry: &UserEntry) -> Result<(), StoreError> {
        let stored = StoredUser { password: entry.password.clone().unwrap_or_default(), plan: entry.plan.clone() };
        let value = serde_json::to_value(stored).expect("plain data");
        self.store
            .apply(vec![
                Change::Put(format!("user/{}", entry.name), value),
                Change::Delete(format!("removed/{}", entry.name)),
            ])
            .await
    }

    /// Makes the removal of `name` durable.
    pub async fn save_removal(&self, name: &str) -> Result<(), StoreError> {
        self.store
            .apply(vec![Change::Delete(format!("user/{name}")), Change::Put(format!("removed/{name}"), true.into())])
            .await
    }

    /// Writes the usage that changed since the last time.
    pub async fn save_usage(&self, users: &Users) -> Result<usize, StoreError> {
        let changes: Vec<(String, u64)> = {
            let written = self.written.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            users.usage_by_name().into_iter().filter(|(name, used)| written.get(name) != Some(used)).collect()
        };
        if changes.is_empty() {
            return Ok(0);
        }
        let batch = changes.iter().map(|(name, used)| Change::Put(format!("usage/{name}"), (*used).into())).collect();
        self.store.apply(batch).await?;
        let mut written = self.written.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        written.extend(changes.iter().cloned());
        Ok(changes.len())
    }
}

/// Writes usage every [`USAGE_EVERY`] until the task is dropped.
pub async fn keep_usage(state: Arc<UserState>, users: Arc<Users>) {
    let mut every = tokio::time::interval(USAGE_EVERY);
    let mut failing = false;
    loop {
        every.tick().await;
        match state.save_usage(&users).await {
            Ok(_) if failing => {
                log::info!("state: usage written again");
                failing = false;
            }
            Ok(_) => {}
            Err(why) if !failing => {
                log::error!("state: cannot write usage (retrying every {USAGE_EVERY:?}): {why}");
                failing = true;
            }
            Err(_) => {}
        }
    }
}
