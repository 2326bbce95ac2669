//! The users the server accepts, their plans and their counters, changed live: by a reload
//! (SIGHUP re-reads the config file) and by the admin API.
//!
//! A user is a name, a password and a [`Plan`] (a bare `-p` password is an unnamed user,
//! shown as `-p#1`, `-p#2`, …). Users are found by their password's hash in a hash map,
//! so authentication costs the same with one user or 100,000.
//!
//! Who owns a user (see docs/users.md): the config file seeds users; a user the admin API
//! added, changed or removed is the API's from then on, and a reload leaves it (and a
//! removal) as the API made it. Changing a user never touches another user's sessions;
//! removing or disabling one, a changed password, expiry and a reached quota close its
//! sessions at once.
//!
//! Counters are kept per name across reloads and removals, so `/metrics` counters never go
//! backwards; the admin API reads them relative to its last `?clear=true`.

pub mod admin;
pub mod io;
pub mod online;
pub mod plan;
pub mod rate;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Serialize;

pub use io::CountedIo;
pub use online::{Cut, Seat};
use online::{Full, Online};
pub use plan::{Plan, PlanChange};
use rate::RateLimit;

use crate::metrics::snapshot::UserReport;
use crate::proto::PasswordHash;
use crate::proto::auth::AUTH_HASH_LEN;

/// A user as configured: a name, its password (kept so the admin API can show it and the
/// state directory can restore it; unnamed `-p` users and the auth callback's need only
/// the hash) and its plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserEntry {
    pub name: String,
    pub hash: PasswordHash,
    pub password: Option<String>,
    pub plan: Plan,
}

impl UserEntry {
    pub fn new(name: &str, password: &str, plan: Plan) -> UserEntry {
        UserEntry { name: name.to_string(), hash: PasswordHash::of(password), password: Some(password.into()), plan }
    }

    /// `NAME:PASSWORD` (`--user`); the password may itself contain `:`.
    pub fn parse(text: &str) -> Result<UserEntry, UsersError> {
        match text.split_once(':') {
            Some((name, password)) if !name.is_empty() && !password.is_empty() => {
                Ok(UserEntry::new(name, password, Plan::default()))
            }
            _ => Err(UsersError::NotNamePassword),
        }
    }

    /// Bare passwords (`-p`) as unnamed users `-p#1`, `-p#2`, ….
    pub fn unnamed(hashes: impl IntoIterator<Item = PasswordHash>) -> Vec<UserEntry> {
        hashes
            .into_iter()
            .enumerate()
            .map(|(i, hash)| UserEntry { name: format!("-p#{}", i + 1), hash, password: None, plan: Plan::default() })
            .collect()
    }
}

/// What one user did; shared by all its sessions, kept across reloads.
#[derive(Debug, Default)]
pub struct UserCounters {
    /// Sessions open now (counted by the session's place, `limits::SessionPlace`).
    pub sessions: AtomicU64,
    /// Streams opened so far.
    pub streams: AtomicU64,
    /// Of those, UDP-over-TCP streams.
    pub udp_streams: AtomicU64,
    /// Streams open now: from their SYN until their relay has ended.
    pub open_streams: AtomicU64,
    /// Bytes of the user's sessions, client to server (frames, as received after TLS).
    pub bytes_up: AtomicU64,
    /// Bytes of the user's sessions, server to client.
    pub bytes_down: AtomicU64,
    /// Bytes up plus down counted against the quota; kept in the state directory, so it
    /// survives restarts (the others start again from 0, as Prometheus counters may).
    pub used: AtomicU64,
    /// The counters at the admin API's last `?clear=true`.
    cleared: Mutex<Baseline>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Baseline {
    bytes_up: u64,
    bytes_down: u64,
    streams: u64,
    udp_streams: u64,
}

/// Why an authenticated user was refused a session. On the wire it is a wrong password.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Quota,
    Expired,
    Ips,
    Sessions,
    Disabled,
}

impl Refusal {
    pub const ALL: [Refusal; 5] =
        [Refusal::Quota, Refusal::Expired, Refusal::Ips, Refusal::Sessions, Refusal::Disabled];

    /// The `reason` label in `/metrics` and the word in the log.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Quota => "quota",
            Refusal::Expired => "expired",
            Refusal::Ips => "ips",
            Refusal::Sessions => "sessions",
            Refusal::Disabled => "disabled",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Refusals by reason.
#[derive(Debug, Default)]
pub struct RefusalCounts([AtomicU64; 5]);

impl RefusalCounts {
    fn count(&self, why: Refusal) {
        self.0[why.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, why: Refusal) -> u64 {
        self.0[why.index()].load(Ordering::Relaxed)
    }
}

/// How often a user's refusal is logged, per reason: a client retrying in a loop must
/// not fill the log.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(60);

/// An accepted user.
#[derive(Debug)]
pub struct User {
    pub name: String,
    hash: PasswordHash,
    password: Option<String>,
    pub counters: Arc<UserCounters>,
    /// The user's bound on name lookups in flight, shared by its sessions.
    pub lookups: Arc<tokio::sync::Semaphore>,
    plan: ArcSwap<Plan>,
    /// The plan's quota, or `u64::MAX`: read on every read and write of every session.
    quota: AtomicU64,
    pub speed_up: RateLimit,
    pub speed_down: RateLimit,
    online: Arc<Online>,
    /// Who changes it (see the module doc): a reload changes the file's only.
    owner: AtomicU8,
    refused: RefusalCounts,
    refusal_logged: Mutex<[Option<tokio::time::Instant>; 5]>,
    /// When it joined (the callback's users are asked about again after a while).
    joined: Mutex<tokio::time::Instant>,
}

impl User {
    fn new(entry: UserEntry, counters: Arc<UserCounters>, owner: Owner) -> User {
        let user = User {
            name: entry.name,
            hash: entry.hash,
            password: entry.password,
            counters,
            lookups: super::dial::LookupOwner::user_bound(),
            plan: ArcSwap::from_pointee(Plan::default()),
            quota: AtomicU64::new(u64::MAX),
            speed_up: RateLimit::new(None),
            speed_down: RateLimit::new(None),
            online: Arc::default(),
            owner: AtomicU8::new(owner as u8),
            refused: RefusalCounts::default(),
            refusal_logged: Mutex::default(),
            joined: Mutex::new(tokio::time::Instant::now()),
        };
        user.set_plan(entry.plan);
        user
    }

    pub fn owner(&self) -> Owner {
        match self.owner.load(Ordering::Relaxed) {
            0 => Owner::File,
            1 => Owner::Api,
            2 => Owner::Panel,
            _ => Owner::Callback,
        }
    }

    /// The user's id at the panel, for a user the panel gave.
    pub fn panel_id(&self) -> Option<u64> {
        (self.owner() == Owner::Panel).then(|| self.name.parse().ok()).flatten()
    }

    pub fn plan(&self) -> Arc<Plan> {
        self.plan.load_full()
    }

    /// Applies a plan live: speeds and quota from the next read or write on, and what the
    /// plan now forbids (disabled, expired, over quota) closes the user's sessions.
    fn set_plan(&self, plan: Plan) {
        self.quota.store(plan.quota_bytes.unwrap_or(u64::MAX), Ordering::Relaxed);
        self.speed_up.set(plan.speed_up);
        self.speed_down.set(plan.speed_down);
        self.plan.store(Arc::new(plan));
        if let Some(why) = self.forbidden(jiff::Timestamp::now()) {
            self.online.cut(cut_for(why), None);
        }
    }

    /// What the plan forbids at `now`, whatever the sessions open.
    fn forbidden(&self, now: jiff::Timestamp) -> Option<Refusal> {
        let plan = self.plan.load();
        if !plan.enabled {
            Some(Refusal::Disabled)
        } else if plan.expired_at(now) {
            Some(Refusal::Expired)
        } else if self.over_quota() {
            Some(Refusal::Quota)
        } else {
            None
        }
    }

    /// A place for a new session from `ip`, or why not.
    pub fn admit(&self, ip: IpAddr, now: jiff::Timestamp) -> Result<Seat, Refusal> {
        if let Some(why) = self.forbidden(now) {
            return Err(why);
        }
        let plan = self.plan.load();
        self.online.join(ip, plan.max_sessions, plan.max_ips).map_err(|full| match full {
            Full::Sessions => Refusal::Sessions,
            Full::Ips => Refusal::Ips,
        })
    }

    /// Counts a refusal, and logs it at INFO unless this reason was logged for this user
    /// within the last [`REFUSAL_LOG_EVERY`].
    fn note_refusal(&self, why: Refusal, peer: IpAddr) {
        self.refused.count(why);
        let now = tokio::time::Instant::now();
        let mut logged = self.refusal_logged.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let last = &mut logged[why.index()];
        if last.is_none_or(|at| now.duration_since(at) >= REFUSAL_LOG_EVERY) {
            *last = Some(now);
            log::info!("{peer}: user {} refused: {} (logged once a minute per reason)", self.name, why.label());
        }
    }

    pub fn over_quota(&self) -> bool {
        self.counters.used.load(Ordering::Relaxed) >= self.quota.load(Ordering::Relaxed)
    }

    /// Charges `bytes` to the quota; the charge that reaches it closes the user's sessions.
    pub fn charge(&self, bytes: u64) {
        let quota = self.quota.load(Ordering::Relaxed);
        let before = self.counters.used.fetch_add(bytes, Ordering::Relaxed);
        if before < quota && before + bytes >= quota {
            log::info!("user {}: quota of {quota} bytes reached: sessions closed", self.name);
            self.online.cut(Cut::Quota, None);
        }
    }

    /// Closes the user's sessions (from `ip` only, if given); returns how many.
    pub fn cut(&self, why: Cut, ip: Option<IpAddr>) -> usize {
        self.online.cut(why, ip)
    }

    pub fn refused(&self, why: Refusal) -> u64 {
        self.refused.get(why)
    }

    /// The user as the admin API shows it.
    pub fn view(&self) -> UserView {
        let c = &self.counters;
        UserView {
            name: self.name.clone(),
            password: self.password.clone(),
            owner: self.owner().label(),
            plan: (*self.plan()).clone(),
            used_bytes: c.used.load(Ordering::Relaxed),
            sessions: self.online.sessions() as u64,
            ips: self.online.ips(),
            bytes_up: c.bytes_up.load(Ordering::Relaxed),
            bytes_down: c.bytes_down.load(Ordering::Relaxed),
            streams: c.streams.load(Ordering::Relaxed),
        }
    }

    /// What the admin API's stats show of this user, since the last clear; `clear` starts
    /// them again from now.
    pub fn usage(&self, clear: bool) -> UserUsage {
        let c = &self.counters;
        let now = Baseline {
            bytes_up: c.bytes_up.load(Ordering::Relaxed),
            bytes_down: c.bytes_down.load(Ordering::Relaxed),
            streams: c.streams.load(Ordering::Relaxed),
            udp_streams: c.udp_streams.load(Ordering::Relaxed),
        };
        let mut cleared = c.cleared.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let since = *cleared;
        if clear {
            *cleared = now;
        }
        UserUsage {
            name: self.name.clone(),
            bytes_up: now.bytes_up - since.bytes_up,
            bytes_down: now.bytes_down - since.bytes_down,
            streams: now.streams - since.streams,
            udp_streams: now.udp_streams - since.udp_streams,
            sessions: self.online.sessions() as u64,
            ips: self.online.ips(),
            used_bytes: c.used.load(Ordering::Relaxed),
        }
    }
}

fn cut_for(why: Refusal) -> Cut {
    match why {
        Refusal::Disabled => Cut::Disabled,
        Refusal::Expired => Cut::Expired,
        Refusal::Quota => Cut::Quota,
        // Lowered session and IP limits apply to new sessions only.
        Refusal::Ips | Refusal::Sessions => Cut::Kicked,
    }
}

/// A user as the admin API lists it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct UserView {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// `file` (seeded by the config file), `api` (the admin API's since it changed it) or
    /// `panel` (pulled from the panel).
    pub owner: &'static str,
    #[serde(flatten)]
    pub plan: Plan,
    pub used_bytes: u64,
    pub sessions: u64,
    pub ips: Vec<IpAddr>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub streams: u64,
}

/// A user's counters since the admin API last cleared them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct UserUsage {
    pub name: String,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub streams: u64,
    /// Of `streams`, UDP-over-TCP ones.
    pub udp_streams: u64,
    pub sessions: u64,
    pub ips: Vec<IpAddr>,
    /// Counted against the quota (never cleared by the stats).
    pub used_bytes: u64,
}

/// Who changes a user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// The config file and the command line (a reload).
    File = 0,
    /// The admin API, since it added, changed or removed the user.
    Api = 1,
    /// The panel's user list (`--panel`).
    Panel = 2,
    /// Named by the auth callback (`--auth-url`), until its answer is stale.
    Callback = 3,
}

impl Owner {
    pub fn label(self) -> &'static str {
        match self {
            Owner::File => "file",
            Owner::Api => "api",
            Owner::Panel => "panel",
            Owner::Callback => "callback",
        }
    }
}

/// What a list does with a user it may not have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Clash {
    Refuse,
    Skip,
}

/// What a reload changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReloadSummary {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub kept: usize,
    /// Users of other owners (the admin API, the panel, the file), left as they are.
    pub left_alone: usize,
}

type ByHash = HashMap<PasswordHash, Arc<User>, foldhash::fast::RandomState>;

#[derive(Debug, Default)]
struct Registry {
    by_hash: ByHash,
    by_name: BTreeMap<String, Arc<User>>,
    /// Names the admin API removed: a reload does not bring them back from the file.
    removed_by_api: BTreeSet<String>,
}

impl Registry {
    /// Adds `user`, in place of the user of its name if there is one.
    fn insert(&mut self, user: Arc<User>) {
        if let Some(old) = self.by_name.insert(user.name.clone(), user.clone())
            && self.by_hash.get(&old.hash).is_some_and(|found| Arc::ptr_eq(found, &old))
        {
            self.by_hash.remove(&old.hash);
        }
        self.by_hash.insert(user.hash.clone(), user);
    }

    fn remove(&mut self, name: &str) -> Option<Arc<User>> {
        let user = self.by_name.remove(name)?;
        self.by_hash.remove(&user.hash);
        Some(user)
    }

    /// The user other than `name` who has the password `hash`, if any.
    fn password_taken(&self, hash: &PasswordHash, name: &str) -> Option<&Arc<User>> {
        self.by_hash.get(hash).filter(|user| user.name != name)
    }
}

/// The accepted users and everyone's counters.
#[derive(Debug, Default)]
pub struct Users {
    registry: RwLock<Registry>,
    /// Held by every change from its check to its end: changes never interleave.
    edits: Mutex<()>,
    counters: Mutex<BTreeMap<String, Arc<UserCounters>>>,
    refused: RefusalCounts,
}

impl Users {
    /// The users of `entries`; none at all is an error (see [`Users::managed`]).
    pub fn new(entries: Vec<UserEntry>) -> Result<Users, UsersError> {
        if entries.is_empty() {
            return Err(UsersError::None);
        }
        Users::managed(entries)
    }

    /// As [`Users::new`], and an empty list is allowed: users come from the admin API.
    pub fn managed(entries: Vec<UserEntry>) -> Result<Users, UsersError> {
        let users = Users::default();
        users.replace(entries)?;
        Ok(users)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Registry> {
        // Every change is made whole under the write lock, so a panic cannot leave it half done.
        self.registry.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Registry> {
        self.registry.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Makes `entries` the users of the config file (a reload). The admin API's users, the
    /// panel's, and the names the API removed, stay as they are. Refuses (changing nothing)
    /// a name given twice, or a password another user has (the server could not tell them
    /// apart).
    pub fn replace(&self, entries: Vec<UserEntry>) -> Result<ReloadSummary, UsersError> {
        check_entries(&entries)?;
        self.replace_as(Owner::File, entries, Clash::Refuse)
    }

    /// Makes `entries` the panel's users (one pull): as [`Users::replace`] for the panel's
    /// share, except that a user the panel cannot have (a name or password another owner
    /// holds, or given twice) is left out with a warning instead of refusing the whole list.
    pub fn replace_from_panel(&self, entries: Vec<UserEntry>) -> ReloadSummary {
        let mut names = BTreeSet::new();
        let mut hashes = std::collections::HashSet::new();
        let entries: Vec<UserEntry> = entries
            .into_iter()
            .filter(|e| {
                let fresh = names.insert(e.name.clone()) && hashes.insert(e.hash.clone());
                if !fresh {
                    log::warn!("panel: user {} is listed twice (by id or by password): left out", e.name);
                }
                fresh
            })
            .collect();
        self.replace_as(Owner::Panel, entries, Clash::Skip).expect("skipping never refuses")
    }

    /// Makes `entries` the users of `owner`. Worked out under the read lock, so
    /// authentication goes on meanwhile, and applied under the write lock in one go.
    fn replace_as(&self, owner: Owner, entries: Vec<UserEntry>, clash: Clash) -> Result<ReloadSummary, UsersError> {
        let _one_change_at_a_time = self.edits.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut summary = ReloadSummary::default();
        let (mut kept, mut changed, mut added, mut gone) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        {
            let registry = self.read();
            let others = |name: &str| {
                registry.removed_by_api.contains(name) || registry.by_name.get(name).is_some_and(|u| u.owner() != owner)
            };
            summary.left_alone = registry.by_name.values().filter(|u| u.owner() != owner).count();
            let mut named = BTreeSet::new();
            for entry in entries {
                if others(&entry.name) {
                    if clash == Clash::Skip {
                        log::warn!("panel: user {} is the admin API's or the file's: left out", entry.name);
                    }
                    continue;
                }
                if let Some(other) = registry.password_taken(&entry.hash, &entry.name)
                    && other.owner() != owner
                {
                    match clash {
                        Clash::Refuse => return Err(UsersError::SamePassword(other.name.clone(), entry.name)),
                        Clash::Skip => {
                            log::warn!("panel: user {} has the password of user {}: left out", entry.name, other.name);
                            continue;
                        }
                    }
                }
                named.insert(entry.name.clone());
                match registry.by_name.get(&entry.name) {
                    Some(user) if user.hash == entry.hash => kept.push((user.clone(), entry.plan)),
                    Some(_) => changed.push(entry),
                    None => added.push(entry),
                }
            }
            for user in registry.by_name.values().filter(|u| u.owner() == owner && !named.contains(&u.name)) {
                gone.push(user.name.clone());
            }
        }
        let mut registry = self.write();
        for name in gone {
            if let Some(user) = registry.remove(&name) {
                user.cut(Cut::Removed, None);
                summary.removed.push(name);
            }
        }
        // A changed password: out first, so that two users swapping passwords never meet
        // in the map; back in below as a new user, same counters.
        for entry in &changed {
            if let Some(old) = registry.remove(&entry.name) {
                old.cut(Cut::PasswordChanged, None);
            }
        }
        summary.kept = kept.len();
        summary.added = added.iter().map(|e| e.name.clone()).collect();
        for entry in changed.into_iter().chain(added) {
            let counters = self.counters_of(&entry.name);
            registry.insert(Arc::new(User::new(entry, counters, owner)));
        }
        drop(registry);
        for (user, plan) in kept {
            if *user.plan() != plan {
                user.set_plan(plan);
            }
        }
        Ok(summary)
    }

    fn counters_of(&self, name: &str) -> Arc<UserCounters> {
        let mut counters = self.counters.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        counters.entry(name.to_string()).or_default().clone()
    }

    /// The user whose password has `hash`: one hash-map lookup, whatever the number of users.
    pub fn find(&self, hash: &[u8; AUTH_HASH_LEN]) -> Option<Arc<User>> {
        self.read().by_hash.get(&PasswordHash::from_bytes(*hash)).cloned()
    }

    /// The user whose password has `hash` and a session place for it from `ip`. `Err(None)`:
    /// no such password; `Err(Some(why))`: the user is refused, counted and logged.
    pub fn admit(
        &self,
        hash: &[u8; AUTH_HASH_LEN],
        ip: IpAddr,
        now: jiff::Timestamp,
    ) -> Result<(Arc<User>, Seat), Option<Refusal>> {
        let user = self.find(hash).ok_or(None)?;
        match user.admit(ip, now) {
            Ok(seat) => Ok((user, seat)),
            Err(why) => {
                user.note_refusal(why, ip);
                self.refused.count(why);
                Err(Some(why))
            }
        }
    }

    pub fn get(&self, name: &str) -> Option<Arc<User>> {
        self.read().by_name.get(name).cloned()
    }

    pub fn len(&self) -> usize {
        self.read().by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Names of the current users, sorted.
    pub fn names(&self) -> Vec<String> {
        self.read().by_name.keys().cloned().collect()
    }

    /// Up to `limit` users, by name, starting after `after` (pagination by name holds still
    /// while users are added and removed, where an offset would skip or repeat).
    pub fn page(&self, after: Option<&str>, limit: usize) -> Vec<Arc<User>> {
        use std::ops::Bound;
        let registry = self.read();
        let start = after.map_or(Bound::Unbounded, |name| Bound::Excluded(name.to_string()));
        registry.by_name.range((start, Bound::Unbounded)).take(limit).map(|(_, u)| u.clone()).collect()
    }

    /// Refusals of authenticated users, by reason, server-wide.
    pub fn refused(&self, why: Refusal) -> u64 {
        self.refused.get(why)
    }

    /// Adds a user owned by the admin API.
    pub fn add(&self, entry: UserEntry) -> Result<Arc<User>, UsersError> {
        let _one_change_at_a_time = self.edits.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        check_name(&entry.name)?;
        let mut registry = self.write();
        if registry.by_name.contains_key(&entry.name) {
            return Err(UsersError::NameTaken(entry.name));
        }
        if let Some(other) = registry.password_taken(&entry.hash, &entry.name) {
            return Err(UsersError::SamePassword(other.name.clone(), entry.name));
        }
        registry.removed_by_api.remove(&entry.name);
        let user = Arc::new(User::new(entry.clone(), self.counters_of(&entry.name), Owner::Api));
        registry.insert(user.clone());
        Ok(user)
    }

    /// The user `name` with `change` applied, checked but not made: what [`Users::update`]
    /// would store.
    pub fn updated(&self, name: &str, password: Option<&str>, change: &PlanChange) -> Result<UserEntry, UsersError> {
        let registry = self.read();
        let user = registry.by_name.get(name).ok_or_else(|| UsersError::NoSuchUser(name.to_string()))?;
        let (hash, password) = match password {
            Some("") => return Err(UsersError::EmptyPassword),
            Some(password) => (PasswordHash::of(password), Some(password.to_string())),
            None => (user.hash.clone(), user.password.clone()),
        };
        if let Some(other) = registry.password_taken(&hash, name) {
            return Err(UsersError::SamePassword(other.name.clone(), name.to_string()));
        }
        Ok(UserEntry { name: name.to_string(), hash, password, plan: change.apply(&user.plan()) })
    }

    /// Makes `entry` (from [`Users::updated`]) the user of its name, owned by the admin API
    /// from now on. A changed password closes the sessions opened with the old one; a plan
    /// applies to the open sessions at once.
    pub fn update(&self, entry: UserEntry) -> Result<Arc<User>, UsersError> {
        let _one_change_at_a_time = self.edits.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut registry = self.write();
        let user =
            registry.by_name.get(&entry.name).cloned().ok_or_else(|| UsersError::NoSuchUser(entry.name.clone()))?;
        if let Some(other) = registry.password_taken(&entry.hash, &entry.name) {
            return Err(UsersError::SamePassword(other.name.clone(), entry.name));
        }
        user.owner.store(Owner::Api as u8, Ordering::Relaxed);
        if user.hash == entry.hash {
            user.set_plan(entry.plan);
            return Ok(user);
        }
        user.cut(Cut::PasswordChanged, None);
        let counters = user.counters.clone();
        let next = Arc::new(User::new(entry, counters, Owner::Api));
        registry.insert(next.clone());
        Ok(next)
    }

    /// Makes `entry` (named by the auth callback) one of the users, or refreshes it. A name
    /// or password another owner has is refused: the callback cannot take over a user.
    pub fn add_from_callback(&self, entry: UserEntry) -> Result<Arc<User>, UsersError> {
        let _one_change_at_a_time = self.edits.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut registry = self.write();
        if let Some(other) = registry.password_taken(&entry.hash, &entry.name) {
            return Err(UsersError::SamePassword(other.name.clone(), entry.name));
        }
        match registry.by_name.get(&entry.name).cloned() {
            Some(user) if user.owner() != Owner::Callback => Err(UsersError::NameTaken(entry.name)),
            Some(user) if user.hash == entry.hash => {
                *user.joined.lock().unwrap_or_else(|p| p.into_inner()) = tokio::time::Instant::now();
                drop(registry);
                if *user.plan() != entry.plan {
                    user.set_plan(entry.plan);
                }
                Ok(user)
            }
            old => {
                if let Some(old) = old {
                    old.cut(Cut::PasswordChanged, None);
                }
                let counters = self.counters_of(&entry.name);
                let user = Arc::new(User::new(entry, counters, Owner::Callback));
                registry.insert(user.clone());
                Ok(user)
            }
        }
    }

    /// Forgets the callback's users without a session whose answer is older than `ttl`.
    pub fn forget_callback_users(&self, ttl: Duration) -> usize {
        let stale: Vec<String> = self
            .read()
            .by_name
            .values()
            .filter(|u| u.owner() == Owner::Callback && u.online.sessions() == 0)
            .filter(|u| u.joined.lock().unwrap_or_else(|p| p.into_inner()).elapsed() >= ttl)
            .map(|u| u.name.clone())
            .collect();
        if stale.is_empty() {
            return 0;
        }
        let _one_change_at_a_time = self.edits.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut registry = self.write();
        for name in &stale {
            registry.remove(name);
        }
        stale.len()
    }

    /// Removes `name` and closes its sessions; a reload will not bring it back.
    pub fn remove(&self, name: &str) -> Result<Arc<User>, UsersError> {
        let _one_change_at_a_time = self.edits.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut registry = self.write();
        let user = registry.remove(name).ok_or_else(|| UsersError::NoSuchUser(name.to_string()))?;
        registry.removed_by_api.insert(name.to_string());
        user.cut(Cut::Removed, None);
        Ok(user)
    }

    /// The names the admin API removed (kept in the state directory).
    pub fn removed_by_api(&self) -> Vec<String> {
        self.read().removed_by_api.iter().cloned().collect()
    }

    /// Restores what the state directory kept: the admin API's users and removals, and
    /// everyone's quota usage. Called once at start-up, after the file's users.
    pub fn restore(&self, api_users: Vec<UserEntry>, removed: Vec<String>, used: Vec<(String, u64)>) {
        let _one_change_at_a_time = self.edits.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for (name, bytes) in used {
            self.counters_of(&name).used.store(bytes, Ordering::Relaxed);
        }
        let mut registry = self.write();
        for name in removed {
            if let Some(user) = registry.remove(&name) {
                user.cut(Cut::Removed, None);
            }
            registry.removed_by_api.insert(name);
        }
        for entry in api_users {
            // The API's version wins over the file's; a password clash drops the file's user.
            if let Some(other) = registry.password_taken(&entry.hash, &entry.name).map(|u| u.name.clone()) {
                log::warn!("user {other}: dropped, user {} of the state directory has the same password", entry.name);
                registry.remove(&other);
            }
            registry.removed_by_api.remove(&entry.name);
            let counters = self.counters_of(&entry.name);
            registry.insert(Arc::new(User::new(entry, counters, Owner::Api)));
        }
    }

    /// Every user's counters ever seen, by name (removed users' too).
    pub fn counters_by_name(&self) -> Vec<(String, Arc<UserCounters>)> {
        let counters = self.counters.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        counters.iter().map(|(name, c)| (name.clone(), c.clone())).collect()
    }

    /// The panel's users online now: their panel id and source IPs.
    pub fn panel_online(&self) -> BTreeMap<u64, Vec<IpAddr>> {
        let registry = self.read();
        registry
            .by_name
            .values()
            .filter_map(|user| Some((user.panel_id()?, user.online.ips())).filter(|(_, ips)| !ips.is_empty()))
            .collect()
    }

    /// Every user's quota usage now, by name (what the state directory keeps).
    pub fn usage_by_name(&self) -> Vec<(String, u64)> {
        let counters = self.counters.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        counters.iter().map(|(name, c)| (name.clone(), c.used.load(Ordering::Relaxed))).collect()
    }

    /// Closes the sessions of users whose plan expired by `now` (run every second).
    pub fn expire(&self, now: jiff::Timestamp) -> usize {
        let expired: Vec<Arc<User>> = self
            .read()
            .by_name
            .values()
            .filter(|user| user.plan.load().expires.is_some_and(|at| now >= at) && user.online.sessions() > 0)
            .cloned()
            .collect();
        for user in &expired {
            let closed = user.cut(Cut::Expired, None);
            log::info!("user {}: expired: {closed} sessions closed", user.name);
        }
        expired.len()
    }

    /// Every user seen since start-up, by name.
    pub fn report(&self) -> Vec<UserReport> {
        let registry = self.read();
        let counters = self.counters.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        counters
            .iter()
            .map(|(name, c)| UserReport {
                user: name.clone(),
                active: registry.by_name.contains_key(name),
                sessions: c.sessions.load(Ordering::Relaxed),
                streams: c.streams.load(Ordering::Relaxed),
                bytes_up: c.bytes_up.load(Ordering::Relaxed),
                bytes_down: c.bytes_down.load(Ordering::Relaxed),
            })
            .collect()
    }
}

/// Why a list of users, or a change to one, cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UsersError {
    #[error(
        "no users: give -p PASSWORD, --user NAME:PASSWORD, --password-file, ANYTLS_PASSWORD or [[users]] in --config"
    )]
    None,
    #[error("--user: expected NAME:PASSWORD")]
    NotNamePassword,
    #[error("user {0:?} is given twice")]
    NameTwice(String),
    /// The server could not tell them apart.
    #[error("users {0:?} and {1:?} have the same password")]
    SamePassword(String, String),
    #[error("user {0:?} exists")]
    NameTaken(String),
    #[error("no user {0:?}")]
    NoSuchUser(String),
    #[error("a user's name must be 1 to 128 characters, none of them `:`, `/` or a control character")]
    BadName,
    #[error("the password is empty")]
    EmptyPassword,
}

/// Names go into URLs, log lines and `NAME:PASSWORD`, so they are kept plain.
pub fn check_name(name: &str) -> Result<(), UsersError> {
    let plain = |c: char| c != ':' && c != '/' && !c.is_control();
    if name.is_empty() || name.len() > 128 || !name.chars().all(plain) {
        return Err(UsersError::BadName);
    }
    Ok(())
}

fn check_entries(entries: &[UserEntry]) -> Result<(), UsersError> {
    let mut names = BTreeSet::new();
    let mut hashes: HashMap<&PasswordHash, &str> = HashMap::new();
    for entry in entries {
        if !names.insert(entry.name.as_str()) {
            return Err(UsersError::NameTwice(entry.name.clone()));
        }
        if let Some(other) = hashes.insert(&entry.hash, &entry.name) {
            return Err(UsersError::SamePassword(other.to_string(), entry.name.clone()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
