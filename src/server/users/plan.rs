//! A user's plan: the limits the server enforces on it, and the padding scheme its clients
//! are given, with the same names in the config file's `[[users]]` tables and in the admin
//! API's JSON (`quota-bytes`, `expires`, `speed-up`, `speed-down`, `max-ips`,
//! `max-sessions`, `enabled`, `padding-scheme`). Absent means no limit (and the node's
//! scheme).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::proto::PaddingScheme;

/// Limits of one user. Bytes and bytes per second are plain integers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Plan {
    /// Bytes up plus down the user may move; at the quota its sessions close and new ones
    /// are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_bytes: Option<u64>,
    /// From this time on the user is refused and its sessions closed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<jiff::Timestamp>,
    /// Bytes per second from the user's clients, across all its sessions and streams.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speed_up: Option<u64>,
    /// Bytes per second to the user's clients, across all its sessions and streams.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speed_down: Option<u64>,
    /// Distinct source IPs with a session open at once (the "device limit").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ips: Option<u32>,
    /// Sessions open at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_sessions: Option<u32>,
    /// `false`: refused, and its sessions closed, until enabled again.
    #[serde(default = "enabled_by_default")]
    pub enabled: bool,
    /// The scheme this user's clients pad by, instead of the node's: sent to a client
    /// whose scheme differs when its next session starts (UpdatePaddingScheme).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub padding_scheme: Option<UserPadding>,
}

/// A user's own padding scheme, written as its text; refused when it would not load
/// (see [`PaddingScheme::load`]), so a typo is an error where the user is defined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserPadding(Arc<PaddingScheme>);

impl UserPadding {
    pub fn load(text: &str) -> Result<UserPadding, crate::proto::padding::SchemeError> {
        PaddingScheme::load(text.as_bytes()).map(|scheme| UserPadding(Arc::new(scheme)))
    }

    pub fn shared(&self) -> Arc<PaddingScheme> {
        self.0.clone()
    }
}

impl Serialize for UserPadding {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // `load` took it from a string, so it is UTF-8.
        serializer.serialize_str(&String::from_utf8_lossy(self.0.raw()))
    }
}

impl<'de> Deserialize<'de> for UserPadding {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<UserPadding, D::Error> {
        let text = String::deserialize(deserializer)?;
        UserPadding::load(&text).map_err(serde::de::Error::custom)
    }
}

fn enabled_by_default() -> bool {
    true
}

impl Default for Plan {
    fn default() -> Plan {
        Plan {
            quota_bytes: None,
            expires: None,
            speed_up: None,
            speed_down: None,
            max_ips: None,
            max_sessions: None,
            enabled: true,
            padding_scheme: None,
        }
    }
}

/// A change to a plan (the admin API's `PATCH`): each key present replaces the value,
/// `null` removes the limit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PlanChange {
    #[serde(default, deserialize_with = "present")]
    pub quota_bytes: Option<Option<u64>>,
    #[serde(default, deserialize_with = "present")]
    pub expires: Option<Option<jiff::Timestamp>>,
    #[serde(default, deserialize_with = "present")]
    pub speed_up: Option<Option<u64>>,
    #[serde(default, deserialize_with = "present")]
    pub speed_down: Option<Option<u64>>,
    #[serde(default, deserialize_with = "present")]
    pub max_ips: Option<Option<u32>>,
    #[serde(default, deserialize_with = "present")]
    pub max_sessions: Option<Option<u32>>,
    pub enabled: Option<bool>,
    #[serde(default, deserialize_with = "present")]
    pub padding_scheme: Option<Option<UserPadding>>,
}

/// A key that is present, even as `null`, is `Some`: absent keys stay `None` (default).
fn present<'de, T: Deserialize<'de>, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

impl PlanChange {
    pub fn apply(&self, plan: &Plan) -> Plan {
        fn set<T: Clone>(slot: &mut T, change: &Option<T>) {
            if let Some(value) = change {
                *slot = value.clone();
            }
        }
        let mut next = plan.clone();
        set(&mut next.quota_bytes, &self.quota_bytes);
        set(&mut next.expires, &self.expires);
        set(&mut next.speed_up, &self.speed_up);
        set(&mut next.speed_down, &self.speed_down);
        set(&mut next.max_ips, &self.max_ips);
        set(&mut next.max_sessions, &self.max_sessions);
        set(&mut next.enabled, &self.enabled);
        set(&mut next.padding_scheme, &self.padding_scheme);
        next
    }
}

impl Plan {
    /// Whether the user is past its expiry at `now`.
    pub fn expired_at(&self, now: jiff::Timestamp) -> bool {
        self.expires.is_some_and(|expires| now >= expires)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_reads_and_writes_the_documented_names() {
        let plan: Plan = serde_json::from_str(
            r#"{"quota-bytes": 1000, "expires": "2030-01-02T03:04:05Z", "speed-up": 10, "speed-down": 20,
                "max-ips": 2, "max-sessions": 3, "enabled": false}"#,
        )
        .unwrap();
        assert_eq!(plan.quota_bytes, Some(1000));
        assert_eq!(plan.expires.unwrap().to_string(), "2030-01-02T03:04:05Z");
        assert_eq!(
            (plan.speed_up, plan.speed_down, plan.max_ips, plan.max_sessions),
            (Some(10), Some(20), Some(2), Some(3))
        );
        assert!(!plan.enabled);
        let back: Plan = serde_json::from_value(serde_json::to_value(&plan).unwrap()).unwrap();
        assert_eq!(back, plan);
        assert_eq!(serde_json::to_string(&Plan::default()).unwrap(), r#"{"enabled":true}"#);
    }

    #[test]
    fn bad_limits_are_refused_with_their_reason() {
        let err = |json: &str| serde_json::from_str::<Plan>(json).unwrap_err().to_string();
        assert!(err(r#"{"quota-bytes": -1}"#).contains("invalid value: integer `-1`"));
        assert!(err(r#"{"speed": 1}"#).contains("unknown field `speed`"));
        assert!(
            err(r#"{"expires": "tomorrow"}"#).contains("expires")
                || err(r#"{"expires": "tomorrow"}"#).contains("parse")
        );
        assert!(err(r#"{"max-ips": 1.5}"#).contains("invalid type"));
    }

    #[test]
    fn a_change_sets_clears_and_keeps() {
        let plan = Plan { quota_bytes: Some(5), speed_up: Some(7), ..Plan::default() };
        let change: PlanChange = serde_json::from_str(r#"{"quota-bytes": null, "max-ips": 2}"#).unwrap();
        let next = change.apply(&plan);
        assert_eq!((next.quota_bytes, next.speed_up, next.max_ips), (None, Some(7), Some(2)));
    }

    #[test]
    fn expiry_is_at_the_second() {
        let at = |s: &str| s.parse::<jiff::Timestamp>().unwrap();
        let plan = Plan { expires: Some(at("2030-01-01T00:00:00Z")), ..Plan::default() };
        assert!(!plan.expired_at(at("2029-12-31T23:59:59Z")));
        assert!(plan.expired_at(at("2030-01-01T00:00:00Z")));
    }
}
