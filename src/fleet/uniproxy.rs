//! The panel's UniProxy node API (Xboard, V2board) as data: what its answers hold and
//! what we send it. Pure: bytes in, values out (the calls are in [`super::http`]).
//!
//! Every call carries `token`, `node_id` and `node_type=anytls` in its query string:
//! - `GET  …/config` → `server_port`, `padding_scheme` (a list of lines), and
//!   `base_config.{pull_interval,push_interval}` in seconds; with an `ETag`.
//! - `GET  …/user` → `{"users": [{"id", "uuid", "speed_limit", "device_limit"}]}`: only the
//!   users allowed now (the panel leaves out the expired, the banned and those over their
//!   transfer quota); with an `ETag`, and `304` for an unchanged `If-None-Match`.
//! - `POST …/push` ← `{"ID": [upload_bytes, download_bytes], …}`: traffic since the last
//!   push, which the panel adds to the user's account.
//! - `POST …/alive` ← `{"ID": ["IP", …], …}`: the IPs online now, for its device limits.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Deserialize;

use crate::server::users::{Plan, UserEntry};

/// The panel's path for the node API, below its base URL.
pub const BASE_PATH: &str = "/api/v1/server/UniProxy";

/// What we use of `GET …/config`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeConfig {
    pub server_port: Option<u16>,
    /// The padding scheme's lines, joined with newlines (our `--padding-scheme` syntax).
    pub padding_scheme: Option<String>,
    pub pull_interval: Option<u64>,
    pub push_interval: Option<u64>,
}

#[derive(Deserialize)]
struct RawConfig {
    server_port: Option<serde_json::Value>,
    padding_scheme: Option<Vec<String>>,
    base_config: Option<BaseConfig>,
}

#[derive(Deserialize)]
struct BaseConfig {
    pull_interval: Option<serde_json::Value>,
    push_interval: Option<serde_json::Value>,
}

/// A number the panel may send as a number or as a string (PHP is loose about it).
fn number(value: &serde_json::Value) -> Option<u64> {
    match value {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Why an answer of the panel is not what the API says.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Garbage {
    #[error("not the JSON expected: {0}")]
    Json(String),
    #[error("server_port {0} is not a port")]
    Port(u64),
}

pub fn parse_config(body: &[u8]) -> Result<NodeConfig, Garbage> {
    let raw: RawConfig = serde_json::from_slice(body).map_err(|e| Garbage::Json(e.to_string()))?;
    let server_port = match raw.server_port.as_ref().and_then(number) {
        Some(port) => Some(u16::try_from(port).ok().filter(|p| *p > 0).ok_or(Garbage::Port(port))?),
        None => None,
    };
    let (pull_interval, push_interval) = match &raw.base_config {
        Some(base) => (base.pull_interval.as_ref().and_then(number), base.push_interval.as_ref().and_then(number)),
        None => (None, None),
    };
    Ok(NodeConfig {
        server_port,
        padding_scheme: raw.padding_scheme.filter(|lines| !lines.is_empty()).map(|lines| lines.join("\n")),
        pull_interval: pull_interval.filter(|s| *s > 0),
        push_interval: push_interval.filter(|s| *s > 0),
    })
}

/// One user of `GET …/user`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PanelUser {
    pub id: u64,
    /// The user's password on every node.
    pub uuid: String,
    /// Mbit/s, both ways; 0 or absent: no limit.
    #[serde(default)]
    pub speed_limit: Option<u64>,
    /// Devices (IPs) online at once; 0 or absent: no limit.
    #[serde(default)]
    pub device_limit: Option<u64>,
}

#[derive(Deserialize)]
struct RawUsers {
    users: Vec<PanelUser>,
}

pub fn parse_users(body: &[u8]) -> Result<Vec<PanelUser>, Garbage> {
    let raw: RawUsers = serde_json::from_slice(body).map_err(|e| Garbage::Json(e.to_string()))?;
    Ok(raw.users)
}

impl PanelUser {
    /// The user as this server keeps it: named by its panel id (what `push` reports by),
    /// `speed_limit` in Mbit/s as bytes per second both ways, `device_limit` as `max-ips`.
    pub fn entry(&self) -> UserEntry {
        let speed = self.speed_limit.filter(|mbps| *mbps > 0).map(|mbps| mbps.saturating_mul(1_000_000 / 8));
        let plan = Plan {
            speed_up: speed,
            speed_down: speed,
            max_ips: self.device_limit.filter(|n| *n > 0).map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
            ..Plan::default()
        };
        UserEntry::new(&self.id.to_string(), &self.uuid, plan)
    }
}

/// The body of `POST …/push`: `{"ID": [up, down]}`.
pub fn push_body(traffic: &BTreeMap<u64, (u64, u64)>) -> Vec<u8> {
    let map: serde_json::Map<String, serde_json::Value> =
        traffic.iter().map(|(id, (up, down))| (id.to_string(), serde_json::json!([up, down]))).collect();
    serde_json::to_vec(&map).expect("plain data")
}

/// The body of `POST …/alive`: `{"ID": ["IP", …]}`.
pub fn alive_body(online: &BTreeMap<u64, Vec<IpAddr>>) -> Vec<u8> {
    let map: serde_json::Map<String, serde_json::Value> =
        online.iter().map(|(id, ips)| (id.to_string(), serde_json::json!(ips))).collect();
    serde_json::to_vec(&map).expect("plain data")
}

/// Whether a push or alive answer says the panel took it: Xboard answers
/// `{"data": true}` (with `status`/`message` beside it in some versions).
pub fn accepted(body: &[u8]) -> bool {
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(body) else { return false };
    json["data"] == serde_json::Value::Bool(true) || json["status"] == "success"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_of_an_anytls_node_as_xboard_builds_it() {
        let body = br#"{"protocol":"anytls","listen_ip":"0.0.0.0","server_port":8443,"network":null,
            "networkSettings":null,"server_name":"example.com","tls_settings":{},
            "padding_scheme":["stop=8","0=30-30","1=100-400"],
            "base_config":{"push_interval":60,"pull_interval":"30"}}"#;
        let config = parse_config(body).unwrap();
        assert_eq!(config.server_port, Some(8443));
        assert_eq!(config.padding_scheme.as_deref(), Some("stop=8\n0=30-30\n1=100-400"));
        assert_eq!((config.pull_interval, config.push_interval), (Some(30), Some(60)));
        assert_eq!(parse_config(br#"{"server_port": 70000}"#), Err(Garbage::Port(70000)));
        assert!(matches!(parse_config(b"<html>"), Err(Garbage::Json(_))));
        assert_eq!(parse_config(b"{}").unwrap(), NodeConfig::default());
    }

    #[test]
    fn users_become_entries_with_their_limits() {
        let users = parse_users(
            br#"{"users":[{"id":7,"uuid":"a-b-c","speed_limit":100,"device_limit":2},
                          {"id":8,"uuid":"d","speed_limit":null,"device_limit":0}]}"#,
        )
        .unwrap();
        let seven = users[0].entry();
        assert_eq!(seven.name, "7");
        assert_eq!(seven.hash, crate::proto::PasswordHash::of("a-b-c"));
        assert_eq!(
            (seven.plan.speed_up, seven.plan.speed_down, seven.plan.max_ips),
            (Some(12_500_000), Some(12_500_000), Some(2))
        );
        let eight = users[1].entry();
        assert_eq!((eight.plan.speed_up, eight.plan.max_ips), (None, None));
        assert!(parse_users(br#"{"users":[{"id":"x"}]}"#).is_err());
    }

    #[test]
    fn push_and_alive_bodies_are_keyed_by_id() {
        let traffic = BTreeMap::from([(7, (10, 20)), (8, (0, 5))]);
        assert_eq!(push_body(&traffic), br#"{"7":[10,20],"8":[0,5]}"#);
        let online = BTreeMap::from([(7, vec![IpAddr::from([127, 0, 0, 2])])]);
        assert_eq!(alive_body(&online), br#"{"7":["127.0.0.2"]}"#);
        assert!(accepted(br#"{"data":true}"#));
        assert!(accepted(br#"{"status":"success","message":"ok","data":true}"#));
        assert!(!accepted(br#"{"data":false}"#));
        assert!(!accepted(b"oops"));
    }
}
