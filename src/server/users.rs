//! The users the server accepts, by name, with their counters; replaced as a whole on
//! reload (SIGHUP).
//!
//! A user is a name and a password (a bare `-p` password is an unnamed user, shown as
//! `-p#1`, `-p#2`, …). A reload keeps the `User` of every name whose password is
//! unchanged, so its sessions go on; a user removed (or whose password changed) is
//! revoked, and the server closes its sessions. Counters are kept per name across
//! reloads, so `/metrics` counters never go backwards.

use std::collections::{BTreeMap, HashSet};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;

use crate::metrics::snapshot::UserReport;
use crate::proto::PasswordHash;

/// A user as configured: a name and its password's hash.
#[derive(Debug, Clone)]
pub struct UserEntry {
    pub name: String,
    pub hash: PasswordHash,
}

impl UserEntry {
    /// `NAME:PASSWORD` (`--user`); the password may itself contain `:`.
    pub fn parse(text: &str) -> Result<UserEntry, UsersError> {
        match text.split_once(':') {
            Some((name, password)) if !name.is_empty() && !password.is_empty() => {
                Ok(UserEntry { name: name.to_string(), hash: PasswordHash::of(password) })
            }
            _ => Err(UsersError::NotNamePassword),
        }
    }

    /// Bare passwords (`-p`) as unnamed users `-p#1`, `-p#2`, ….
    pub fn unnamed(hashes: impl IntoIterator<Item = PasswordHash>) -> Vec<UserEntry> {
        hashes.into_iter().enumerate().map(|(i, hash)| UserEntry { name: format!("-p#{}", i + 1), hash }).collect()
    }
}

/// What one user did; shared by all its sessions, kept across reloads.
#[derive(Debug, Default)]
pub struct UserCounters {
    /// Sessions open now (counted by the session's place, `limits::SessionPlace`).
    pub sessions: AtomicU64,
    /// Streams opened so far.
    pub streams: AtomicU64,
    /// Streams open now: from their SYN until their relay has ended.
    pub open_streams: AtomicU64,
    /// Bytes of the user's sessions, client to server (frames, as received after TLS).
    pub bytes_up: AtomicU64,
    /// Bytes of the user's sessions, server to client.
    pub bytes_down: AtomicU64,
}

/// An accepted user.
#[derive(Debug)]
pub struct User {
    pub name: String,
    hash: PasswordHash,
    pub counters: Arc<UserCounters>,
    /// The user's bound on name lookups in flight, shared by its sessions.
    pub lookups: Arc<tokio::sync::Semaphore>,
    revoked: watch::Sender<bool>,
}

impl User {
    /// Resolves once the user is removed by a reload.
    pub async fn revoked(&self) {
        let mut watch = self.revoked.subscribe();
        let _ = watch.wait_for(|revoked| *revoked).await;
    }
}

#[derive(Debug, Default)]
struct Accepted {
    users: Vec<Arc<User>>,
    hashes: Vec<PasswordHash>,
}

/// A snapshot of the accepted users (see [`Users::current`]).
pub struct CurrentUsers(Arc<Accepted>);

impl CurrentUsers {
    /// Their password hashes, in the order [`CurrentUsers::user`] takes.
    pub fn hashes(&self) -> &[PasswordHash] {
        &self.0.hashes
    }

    pub fn user(&self, index: usize) -> Arc<User> {
        self.0.users[index].clone()
    }
}

/// What a reload changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReloadSummary {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub kept: usize,
}

/// The accepted users and everyone's counters.
#[derive(Debug, Default)]
pub struct Users {
    accepted: ArcSwap<Accepted>,
    counters: Mutex<BTreeMap<String, Arc<UserCounters>>>,
}

impl Users {
    pub fn new(entries: Vec<UserEntry>) -> Result<Users, UsersError> {
        let users = Users::default();
        users.replace(entries)?;
        Ok(users)
    }

    /// Makes `entries` the accepted users. Refuses (changing nothing) an empty list, a
    /// name given twice, or two users with one password (the server could not tell them
    /// apart).
    pub fn replace(&self, entries: Vec<UserEntry>) -> Result<ReloadSummary, UsersError> {
        check_entries(&entries)?;
        let old = self.accepted.load_full();
        let mut summary = ReloadSummary::default();
        let mut next = Accepted::default();
        for entry in entries {
            let same = old.users.iter().find(|u| u.name == entry.name && u.hash == entry.hash);
            let user = match same {
                Some(user) => {
                    summary.kept += 1;
                    user.clone()
                }
                None => {
                    summary.added.push(entry.name.clone());
                    Arc::new(User {
                        counters: self.counters_of(&entry.name),
                        lookups: super::dial::LookupOwner::user_bound(),
                        name: entry.name,
                        hash: entry.hash.clone(),
                        revoked: watch::Sender::new(false),
                    })
                }
            };
            next.hashes.push(entry.hash);
            next.users.push(user);
        }
        self.accepted.store(Arc::new(next));
        let now = self.accepted.load();
        for user in old.users.iter().filter(|old| !now.users.iter().any(|new| Arc::ptr_eq(old, new))) {
            if !now.users.iter().any(|new| new.name == user.name) {
                summary.removed.push(user.name.clone());
            }
            user.revoked.send_replace(true);
        }
        Ok(summary)
    }

    fn counters_of(&self, name: &str) -> Arc<UserCounters> {
        let mut counters = self.counters.lock().expect("counters lock");
        counters.entry(name.to_string()).or_default().clone()
    }

    /// The users accepted now, for one authentication: a reload during it does not
    /// change the list its answer indexes into.
    pub fn current(&self) -> CurrentUsers {
        CurrentUsers(self.accepted.load_full())
    }

    pub fn len(&self) -> usize {
        self.accepted.load().users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Names of the current users, in configuration order.
    pub fn names(&self) -> Vec<String> {
        self.accepted.load().users.iter().map(|u| u.name.clone()).collect()
    }

    /// Every user seen since start-up, by name.
    pub fn report(&self) -> Vec<UserReport> {
        let current: HashSet<String> = self.names().into_iter().collect();
        let counters = self.counters.lock().expect("counters lock");
        counters
            .iter()
            .map(|(name, c)| UserReport {
                user: name.clone(),
                active: current.contains(name),
                sessions: c.sessions.load(Ordering::Relaxed),
                streams: c.streams.load(Ordering::Relaxed),
                bytes_up: c.bytes_up.load(Ordering::Relaxed),
                bytes_down: c.bytes_down.load(Ordering::Relaxed),
            })
            .collect()
    }
}

/// Why a list of users cannot be served.
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
}

fn check_entries(entries: &[UserEntry]) -> Result<(), UsersError> {
    if entries.is_empty() {
        return Err(UsersError::None);
    }
    for (i, entry) in entries.iter().enumerate() {
        if let Some(other) = entries[..i].iter().find(|e| e.name == entry.name) {
            return Err(UsersError::NameTwice(other.name.clone()));
        }
        if let Some(other) = entries[..i].iter().find(|e| e.hash == entry.hash) {
            return Err(UsersError::SamePassword(other.name.clone(), entry.name.clone()));
        }
    }
    Ok(())
}

/// A session's connection, counting its bytes into its user's counters as they pass
/// (so the live page moves while a long transfer runs).
pub struct CountedIo<IO> {
    io: IO,
    counters: Arc<UserCounters>,
}

impl<IO> CountedIo<IO> {
    pub fn new(io: IO, counters: Arc<UserCounters>) -> CountedIo<IO> {
        CountedIo { io, counters }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for CountedIo<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        self.counters.bytes_up.fetch_add(read as u64, Ordering::Relaxed);
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for CountedIo<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(written)) = &polled {
            self.counters.bytes_down.fetch_add(*written as u64, Ordering::Relaxed);
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(written)) = &polled {
            self.counters.bytes_down.fetch_add(*written as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Decoder;
    use crate::proto::auth::{AuthBlockDecoder, encode_auth_block};
    use bytes::BytesMut;

    fn entry(name: &str, password: &str) -> UserEntry {
        UserEntry { name: name.into(), hash: PasswordHash::of(password) }
    }

    /// The user whose password starts `data`, as the server's authentication finds it.
    fn authenticate(users: &Users, data: &[u8]) -> Option<Arc<User>> {
        let current = users.current();
        match AuthBlockDecoder::new(current.hashes()).decode(&mut BytesMut::from(data)) {
            Ok(Some(user)) => Some(current.user(user)),
            _ => None,
        }
    }

    fn block(password: &str) -> BytesMut {
        let mut out = BytesMut::new();
        encode_auth_block(&PasswordHash::of(password), 4, &mut out);
        out
    }

    #[test]
    fn users_parse_from_name_colon_password() {
        let user = UserEntry::parse("alice:pw:x").unwrap();
        assert_eq!((user.name.as_str(), user.hash), ("alice", PasswordHash::of("pw:x")));
        assert!(UserEntry::parse("alice").is_err());
        assert!(UserEntry::parse(":pw").is_err());
        assert!(UserEntry::parse("alice:").is_err());
    }

    #[test]
    fn a_password_authenticates_its_user() {
        let users = Users::new(vec![entry("alice", "a"), entry("bob", "b")]).unwrap();
        assert_eq!(authenticate(&users, &block("b")).expect("bob").name, "bob");
        assert!(authenticate(&users, &block("x")).is_none());
    }

    #[tokio::test]
    async fn a_reload_keeps_unchanged_users_and_revokes_the_others() {
        let users = Users::new(vec![entry("alice", "a"), entry("bob", "b"), entry("carol", "c")]).unwrap();
        let [alice, bob, carol] = ["a", "b", "c"].map(|password| authenticate(&users, &block(password)).unwrap());
        alice.counters.streams.fetch_add(3, Ordering::Relaxed);
        let summary = users.replace(vec![entry("alice", "a"), entry("carol", "c2"), entry("dave", "d")]).unwrap();
        assert_eq!(
            summary,
            ReloadSummary { added: vec!["carol".into(), "dave".into()], removed: vec!["bob".into()], kept: 1 }
        );
        let quick = std::time::Duration::from_millis(100);
        assert!(tokio::time::timeout(quick, bob.revoked()).await.is_ok(), "bob removed");
        assert!(tokio::time::timeout(quick, carol.revoked()).await.is_ok(), "carol's password changed");
        assert!(tokio::time::timeout(quick, alice.revoked()).await.is_err(), "alice stays");
        assert!(authenticate(&users, &block("b")).is_none());
        let report = users.report();
        let alice = report.iter().find(|r| r.user == "alice").unwrap();
        assert_eq!((alice.active, alice.streams), (true, 3));
        assert!(!report.iter().find(|r| r.user == "bob").unwrap().active);
    }

    #[test]
    fn broken_user_lists_are_refused_and_change_nothing() {
        let users = Users::new(vec![entry("alice", "a")]).unwrap();
        assert_eq!(users.replace(vec![]).unwrap_err(), UsersError::None);
        assert!(UsersError::None.to_string().starts_with("no users"));
        let twice = users.replace(vec![entry("x", "1"), entry("x", "2")]).unwrap_err();
        assert_eq!(twice.to_string(), "user \"x\" is given twice");
        let same = users.replace(vec![entry("x", "1"), entry("y", "1")]).unwrap_err();
        assert_eq!(same.to_string(), "users \"x\" and \"y\" have the same password");
        assert_eq!(users.names(), ["alice"]);
    }
}
