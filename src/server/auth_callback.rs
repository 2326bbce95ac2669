//! `--auth-url`: an operator's own user database, asked over HTTP about passwords that
//! match no local user (the shape of Hysteria 2's `auth.type: http`).
//!
//! AnyTLS carries only the SHA-256 of the password, so the callback gets that hash:
//! `POST URL` with `{"addr": "IP:PORT", "auth": "<64 hex digits>"}`. It answers
//! `{"ok": true, "id": "NAME"}`, optionally with plan keys beside (`"speed-down": 1000000`,
//! …, as in docs/users.md), or `{"ok": false}`. The user it names joins the server's users
//! (owner `callback`), so its plan, counters and limits work as for any other.
//!
//! Answers are cached by hash: positive ones for `positive_ttl`, negative ones for
//! `negative_ttl`. Anything but a clear yes refuses: a timeout, an error status, garbage, or
//! every place toward the callback taken (at most `max_in_flight` calls at once). So a slow
//! or dead callback costs each handshake at most `timeout`, and never holds up handshakes
//! of users the server already knows.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::users::{Plan, UserEntry};
use crate::http_call::{CallError, Endpoint};
use crate::proto::PasswordHash;
use crate::proto::auth::AUTH_HASH_LEN;

/// `--auth-url` and its settings.
#[derive(Debug, Clone)]
pub struct CallbackSettings {
    pub url: String,
    pub timeout: Duration,
    pub positive_ttl: Duration,
    pub negative_ttl: Duration,
    pub max_in_flight: usize,
    /// Hashes remembered at most (a flood of random passwords must not grow it forever).
    pub max_cached: usize,
}

impl CallbackSettings {
    pub fn new(url: &str) -> CallbackSettings {
        CallbackSettings {
            url: url.to_string(),
            timeout: Duration::from_secs(3),
            positive_ttl: Duration::from_secs(300),
            negative_ttl: Duration::from_secs(30),
            max_in_flight: 64,
            max_cached: 100_000,
        }
    }
}

/// The callback's answer, as this server keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Accepted: the user's entry (name, hash, plan).
    Accepted(UserEntry),
    Refused,
}

/// Why a verdict is a refusal without an answer (logged at DEBUG, counted).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallbackFailure {
    #[error("{0}")]
    Call(#[from] CallError),
    #[error("HTTP status {0}")]
    Status(u16),
    #[error("answer not understood: {0}")]
    Garbage(String),
    #[error("{0} calls already in flight")]
    Busy(usize),
}

pub struct AuthCallback {
    endpoint: Endpoint,
    settings: CallbackSettings,
    places: Semaphore,
    cache: Mutex<HashMap<[u8; AUTH_HASH_LEN], (Verdict, Instant)>>,
}

impl AuthCallback {
    pub fn new(settings: CallbackSettings) -> Result<AuthCallback, CallError> {
        let endpoint = Endpoint::parse(&settings.url, &[])?;
        Ok(AuthCallback {
            endpoint,
            places: Semaphore::new(settings.max_in_flight.max(1)),
            settings,
            cache: Mutex::default(),
        })
    }

    /// How long a yes is trusted.
    pub fn positive_ttl(&self) -> Duration {
        self.settings.positive_ttl
    }

    fn cached(&self, hash: &[u8; AUTH_HASH_LEN], now: Instant) -> Option<Verdict> {
        let cache = self.cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        cache.get(hash).filter(|(_, until)| now < *until).map(|(verdict, _)| verdict.clone())
    }

    fn remember(&self, hash: [u8; AUTH_HASH_LEN], verdict: &Verdict, now: Instant) {
        let ttl = match verdict {
            Verdict::Accepted(_) => self.settings.positive_ttl,
            Verdict::Refused => self.settings.negative_ttl,
        };
        let mut cache = self.cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if cache.len() >= self.settings.max_cached {
            cache.retain(|_, (_, until)| now < *until);
            if cache.len() >= self.settings.max_cached {
                cache.clear();
            }
        }
        cache.insert(hash, (verdict.clone(), now + ttl));
    }

    /// What the callback says of `hash` from `peer` (cached, or asked now).
    pub async fn check(&self, hash: &[u8; AUTH_HASH_LEN], peer: SocketAddr) -> Result<Verdict, CallbackFailure> {
        if let Some(verdict) = self.cached(hash, Instant::now()) {
            return Ok(verdict);
        }
        let Ok(_place) = self.places.try_acquire() else {
            return Err(CallbackFailure::Busy(self.settings.max_in_flight));
        };
        let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
        let body =
            serde_json::to_vec(&serde_json::json!({ "addr": peer.to_string(), "auth": hex })).expect("plain data");
        let answer =
            self.endpoint.call(hyper::Method::POST, "", Some(body), None, self.settings.timeout, 64 << 10).await?;
        if answer.status != 200 {
            return Err(CallbackFailure::Status(answer.status));
        }
        let verdict = parse_answer(&answer.body, hash)?;
        self.remember(*hash, &verdict, Instant::now());
        Ok(verdict)
    }
}

/// `{"ok": true, "id": "NAME", …plan keys}` or `{"ok": false}`.
pub fn parse_answer(body: &[u8], hash: &[u8; AUTH_HASH_LEN]) -> Result<Verdict, CallbackFailure> {
    let garbage = |why: String| CallbackFailure::Garbage(why);
    let serde_json::Value::Object(mut fields) = serde_json::from_slice(body).map_err(|e| garbage(e.to_string()))?
    else {
        return Err(garbage("not a JSON object".into()));
    };
    match fields.remove("ok") {
        Some(serde_json::Value::Bool(true)) => {}
        Some(serde_json::Value::Bool(false)) => return Ok(Verdict::Refused),
        _ => return Err(garbage("`ok` must be true or false".into())),
    }
    let name = match fields.remove("id") {
        Some(serde_json::Value::String(name)) => name,
        _ => return Err(garbage("`id` (a string) is required with ok: true".into())),
    };
    super::users::check_name(&name).map_err(|e| garbage(e.to_string()))?;
    let plan: Plan = serde_json::from_value(serde_json::Value::Object(fields)).map_err(|e| garbage(e.to_string()))?;
    Ok(Verdict::Accepted(UserEntry { name, hash: PasswordHash::from_bytes(*hash), password: None, plan }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_strictly() {
        let hash = [7u8; 32];
        let yes = parse_answer(br#"{"ok": true, "id": "alice", "speed-down": 1000}"#, &hash).unwrap();
        let Verdict::Accepted(entry) = yes else { panic!("accepted") };
        assert_eq!((entry.name.as_str(), entry.plan.speed_down, entry.hash.as_bytes()), ("alice", Some(1000), &hash));
        assert_eq!(parse_answer(br#"{"ok": false}"#, &hash).unwrap(), Verdict::Refused);
        for bad in [
            &br#"{"ok": "yes"}"#[..],
            br#"{"ok": true}"#,
            br#"{"ok": true, "id": "a:b"}"#,
            br#"{"ok": true, "id": "a", "speed": 1}"#,
            b"<html>",
            b"[]",
        ] {
            assert!(parse_answer(bad, &hash).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
