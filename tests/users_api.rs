//! The admin API end to end, with the real server and the real client: users added,
//! changed, kicked and removed live while other users' streams go on; bad requests
//! refused with a JSON error and nothing changed; the Shadowsocks Server Management API v1
//! shape exercised with curl as its spec shows; the state directory across a restart and
//! across `kill -9`; and ten thousand users added through the API.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "admin-secret";
const LIMIT: Duration = Duration::from_secs(90);

/// A server with `-p PASSWORD`, the API on an ephemeral port and `extra` flags.
async fn server_with_api(extra: &[&str]) -> (Server, SocketAddr) {
    let mut args = vec!["--api", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let mut server = start_server(PASSWORD, &args).await;
    let api = api_address(&mut server.process).await;
    (server, api)
}

async fn admin(api: SocketAddr, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let body = body.map(|b| b.to_string());
    let (status, text) = api_request(api, method, path, Some(TOKEN), body.as_deref()).await;
    let json = if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) };
    (status, json)
}

async fn client_for(server: &Server, password: &str, extra: &[&str]) -> Client {
    let pin = server.fingerprint.clone().expect("self-signed");
    let mut args = vec!["--pin-sha256", pin.as_str()];
    args.extend_from_slice(extra);
    start_client(server.addr, password, &args).await
}

/// One echo round trip through `client`, or the error.
async fn echo_once(client: &Client, echo: SocketAddr) -> std::io::Result<()> {
    let (code, mut tcp) = socks5_connect(client.addr, "127.0.0.1", echo.port()).await?;
    if code != SOCKS5_OK {
        return Err(std::io::Error::other(format!("SOCKS5 reply {code}")));
    }
    tcp.write_all(b"ping").await?;
    let mut back = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut back)).await??;
    Ok(())
}

#[tokio::test]
async fn the_admin_api_is_off_without_its_token_and_closed_to_every_other_token() {
    bounded(LIMIT, "admin token", async {
        let (_server, api) = server_with_api(&["--api-token", "reader"]).await;
        let (status, body) = api_request(api, "GET", "/api/admin/users", Some("reader"), None).await;
        assert_eq!(status, 404, "off without --admin-token: {body}");
        assert!(serde_json::from_str::<Value>(&body).unwrap()["error"].as_str().unwrap().contains("--admin-token"));
        let (status, _) = api_request(api, "GET", "/ssm/v1/users", Some("reader"), None).await;
        assert_eq!(status, 404);

        let (_server, api) =
            server_with_api(&["--api-token", "reader", "--admin-token", TOKEN, "--state-dir", "off"]).await;
        for token in [None, Some("reader"), Some("admin-secreT"), Some("admin-secret-and-more")] {
            let (status, body) = api_request(api, "GET", "/api/admin/users", token, None).await;
            assert_eq!(status, 401, "{token:?}: {body}");
            assert!(serde_json::from_str::<Value>(&body).unwrap()["error"].is_string(), "{body}");
        }
        let (status, _) = api_request(api, "GET", &format!("/api/admin/users?token={TOKEN}"), None, None).await;
        assert_eq!(status, 401, "the admin token is a bearer token only, never in a URL");
        assert_eq!(admin(api, "GET", "/api/admin/users", None).await.0, 200);
        let (status, _) = api_request(api, "GET", "/api/users", Some(TOKEN), None).await;
        assert_eq!(status, 200, "the admin token opens the read-only routes too");
    })
    .await;
}

#[tokio::test]
async fn users_change_live_through_the_real_client_and_others_are_untouched() {
    bounded(LIMIT, "live users", async {
        let (server, api) = server_with_api(&["--admin-token", TOKEN, "--state-dir", "off"]).await;
        let echo = spawn_echo().await;
        // The -p user streams all along; nothing below may disturb it.
        let base = client_for(&server, PASSWORD, &[]).await;
        let healthy = Healthy::start(base.addr, echo, Duration::from_millis(20)).await;

        let (status, view) =
            admin(api, "POST", "/api/admin/users", Some(json!({"name": "alice", "password": "alice-pw"}))).await;
        assert_eq!(status, 201, "{view}");
        assert_eq!((view["name"].as_str(), view["owner"].as_str()), (Some("alice"), Some("api")));
        let alice = client_for(&server, "alice-pw", &[]).await;
        echo_once(&alice, echo).await.expect("alice works at once");

        // A long stream of alice's, then a kick from another IP (none) and from hers.
        let mut held = socks5_open(alice.addr, echo).await;
        held.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        held.read_exact(&mut one).await.unwrap();
        let (status, kicked) =
            admin(api, "POST", "/api/admin/users/alice/kick", Some(json!({"ip": "127.0.0.9"}))).await;
        assert_eq!((status, kicked["closed"].as_u64()), (200, Some(0)), "{kicked}");
        let (_, view) = admin(api, "GET", "/api/admin/users/alice", None).await;
        assert_eq!(view["ips"], json!(["127.0.0.1"]), "{view}");
        assert!(view["sessions"].as_u64().unwrap() >= 1, "{view}");

        let (status, view) =
            admin(api, "PATCH", "/api/admin/users/alice", Some(json!({"speed-down": 1_000_000}))).await;
        assert_eq!((status, view["speed-down"].as_u64()), (200, Some(1_000_000)), "{view}");
        held.write_all(b"y").await.unwrap();
        held.read_exact(&mut one).await.expect("a plan change leaves the user's sessions open");

        let removed_at = Instant::now();
        assert_eq!(admin(api, "DELETE", "/api/admin/users/alice", None).await.0, 204);
        let (_, closed) = read_until_closed(&mut held, Duration::from_secs(3)).await;
        let took = removed_at.elapsed();
        assert!(closed && took < Duration::from_secs(1), "alice's stream closed {took:?} after her removal");
        assert!(echo_once(&alice, echo).await.is_err(), "a removed user is refused");
        assert_eq!(admin(api, "GET", "/api/admin/users/alice", None).await.0, 404);

        let rounds = healthy.rounds();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(healthy.rounds() > rounds, "the -p user's stream goes on");
        let done = healthy.finish().await;
        announce(&format!(
            "NOTE live users: the -p user's stream made {done} rounds through add, kick, change, removal"
        ));
        drop(server);
    })
    .await;
}

#[tokio::test]
async fn bad_requests_get_a_json_4xx_and_change_nothing() {
    bounded(LIMIT, "bad requests", async {
        let (_server, api) = server_with_api(&["--admin-token", TOKEN, "--state-dir", "off"]).await;
        assert_eq!(
            admin(api, "POST", "/api/admin/users", Some(json!({"name": "bob", "password": "bob-pw"}))).await.0,
            201
        );
        let before = admin(api, "GET", "/api/admin/users", None).await.1;
        let raw = |body: &'static str| async move {
            let (status, text) = api_request(api, "POST", "/api/admin/users", Some(TOKEN), Some(body)).await;
            (status, serde_json::from_str::<Value>(&text).unwrap_or_else(|_| panic!("not JSON: {text}")))
        };
        for (body, status, says) in [
            ("{\"name\": \"x\", ", 400, "bad JSON"),
            ("[1]", 400, "object"),
            (r#"{"name": "x", "password": "p", "speed": 1}"#, 400, "unknown field `speed`"),
            (r#"{"name": "x", "password": "p", "quota-bytes": -1}"#, 400, "invalid value"),
            (r#"{"name": "x", "password": "p", "expires": "next week"}"#, 400, ""),
            (r#"{"name": "x"}"#, 400, "password"),
            (r#"{"name": "a:b", "password": "p"}"#, 400, "name"),
            (r#"{"name": "x", "password": "bob-pw"}"#, 409, "same password"),
            (r#"{"name": "bob", "password": "other"}"#, 409, "exists"),
        ] {
            let (got, json) = raw(body).await;
            assert_eq!(got, status, "{body} → {json}");
            assert!(json["error"].as_str().is_some_and(|e| e.contains(says)), "{body} → {json}");
        }
        let (status, json) = admin(api, "PATCH", "/api/admin/users/nobody", Some(json!({"max-ips": 1}))).await;
        assert_eq!(status, 404, "{json}");
        let (status, json) = admin(api, "PATCH", "/api/admin/users/bob", Some(json!({"max-ips": -2}))).await;
        assert_eq!(status, 400, "{json}");
        let (status, json) = admin(api, "GET", "/api/admin/users?limit=many", None).await;
        assert_eq!(status, 400, "{json}");
        assert_eq!(admin(api, "PUT", "/api/admin/users/bob", None).await.0, 405);
        assert_eq!(admin(api, "GET", "/api/admin/users", None).await.1, before, "nothing changed");
    })
    .await;
}

/// `curl -s -X METHOD [-d BODY] URL` with the admin token; the status and the body.
fn curl(method: &str, url: &str, body: Option<&str>) -> (u16, String) {
    let mut command = std::process::Command::new("curl");
    command.args(["-s", "-X", method, "-H", &format!("Authorization: Bearer {TOKEN}"), "-w", "\n%{http_code}"]);
    if let Some(body) = body {
        command.args(["-H", "Content-Type: application/json", "-d", body]);
    }
    let out = command.arg(url).output().expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    (status.trim().parse().unwrap_or(0), body.to_string())
}

#[tokio::test]
async fn the_ssm_v1_endpoints_answer_as_the_spec_shows_to_curl() {
    if !have_curl() {
        return announce("SKIP the_ssm_v1_endpoints_answer_as_the_spec_shows_to_curl: curl is not installed");
    }
    bounded(LIMIT, "ssm v1", async {
        let (server, api) = server_with_api(&["--admin-token", TOKEN, "--state-dir", "off"]).await;
        let base = format!("http://{api}/ssm/v1");
        let json = |text: &str| serde_json::from_str::<Value>(text).unwrap_or_else(|_| panic!("not JSON: {text}"));
        let (status, info) = curl("GET", &format!("{base}/"), None);
        assert_eq!(status, 200);
        assert_eq!(json(&info)["apiVersion"], "v1");
        assert!(json(&info)["server"].as_str().unwrap().starts_with("anytls-rs"));

        let add = r#"{"username": "database64128", "uPSK": "oE/s2z9Q8EWORAB8B3UCxw=="}"#;
        let (status, _) = curl("POST", &format!("{base}/users"), Some(add));
        assert_eq!(status, 201);
        let (status, body) = curl("POST", &format!("{base}/users"), Some(add));
        assert_eq!(status, 400, "an existing user is a 400, as the spec says: {body}");
        assert!(json(&body)["error"].is_string());
        let alias = r#"{"username": "second", "password": "pw-2"}"#;
        assert_eq!(curl("POST", &format!("{base}/users"), Some(alias)).0, 201);

        let (_, list) = curl("GET", &format!("{base}/users"), None);
        let list = json(&list);
        let names: Vec<&str> =
            list["users"].as_array().unwrap().iter().filter_map(|u| u["username"].as_str()).collect();
        assert!(names.contains(&"database64128") && names.contains(&"second"), "{list}");
        assert!(list["users"].as_array().unwrap().iter().any(|u| u["uPSK"] == "oE/s2z9Q8EWORAB8B3UCxw=="));

        // Traffic as that user, through the real client: the stats count it.
        let echo = spawn_echo().await;
        let client = client_for(&server, "oE/s2z9Q8EWORAB8B3UCxw==", &[]).await;
        echo_once(&client, echo).await.unwrap();
        client.wait_done(1).await;
        let (status, user) = curl("GET", &format!("{base}/users/database64128"), None);
        assert_eq!(status, 200);
        let user = json(&user);
        assert_eq!(user["uPSK"], "oE/s2z9Q8EWORAB8B3UCxw==");
        assert!(user["uplinkBytes"].as_u64().unwrap() > 0 && user["downlinkBytes"].as_u64().unwrap() > 0, "{user}");
        assert_eq!(user["tcpSessions"], 1, "{user}");

        let (_, stats) = curl("GET", &format!("{base}/stats?clear=true"), None);
        let stats = json(&stats);
        assert!(stats["uplinkBytes"].as_u64().unwrap() > 0, "{stats}");
        let (_, again) = curl("GET", &format!("{base}/stats"), None);
        assert_eq!(json(&again)["uplinkBytes"], 0, "cleared: {again}");
        let metrics = api_get(api, "/metrics", None).await.1;
        let up = metrics
            .lines()
            .find_map(|l| l.strip_prefix("anytls_user_bytes_up_total{user=\"database64128\"} "))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        assert!(up > 0.0, "/metrics never goes backwards:\n{metrics}");

        let patch = r#"{"uPSK": "oE/s2z9Q8EWORAB8B3UCxw=="}"#;
        let url = format!("{base}/users/database64128");
        assert_eq!(curl("PATCH", &url, Some(patch)).0, 400, "the same uPSK");
        let patch = r#"{"uPSK": "DL7Vrnv7sOdPPDghtxyxgg=="}"#;
        assert_eq!(curl("PATCH", &url, Some(patch)).0, 204);
        assert!(echo_once(&client, echo).await.is_err(), "the old uPSK no longer works");
        assert_eq!(curl("DELETE", &url, None).0, 204);
        assert_eq!(curl("GET", &url, None).0, 404);
        assert_eq!(curl("DELETE", &url, None).0, 404);
    })
    .await;
}

/// The names `GET /api/admin/users` lists (all pages).
async fn listed(api: SocketAddr) -> Vec<String> {
    let mut names = Vec::new();
    let mut after = String::new();
    loop {
        let path = if after.is_empty() {
            "/api/admin/users?limit=5000".into()
        } else {
            format!("/api/admin/users?limit=5000&after={after}")
        };
        let (status, page) = admin(api, "GET", &path, None).await;
        assert_eq!(status, 200, "{page}");
        names.extend(page["users"].as_array().unwrap().iter().map(|u| u["name"].as_str().unwrap().to_string()));
        match page["next"].as_str() {
            Some(next) => after = next.to_string(),
            None => return names,
        }
    }
}

fn state_args(dir: &Path) -> Vec<String> {
    vec!["--admin-token".into(), TOKEN.into(), "--state-dir".into(), dir.display().to_string()]
}

async fn server_in(dir: &Path) -> (Server, SocketAddr) {
    let args = state_args(dir);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    server_with_api(&args).await
}

#[tokio::test]
async fn users_and_usage_survive_a_restart_and_kill_9_loses_no_acknowledged_user() {
    bounded(Duration::from_secs(180), "persistence", async {
        let dir = TempDir::new("state");
        let echo = spawn_echo().await;
        let (mut server, api) = server_in(dir.path()).await;
        let (status, _) = admin(
            api,
            "POST",
            "/api/admin/users",
            Some(json!({"name": "carol", "password": "carol-pw", "quota-bytes": 1_000_000_000u64})),
        )
        .await;
        assert_eq!(status, 201);
        let client = client_for(&server, "carol-pw", &[]).await;
        echo_once(&client, echo).await.unwrap();
        client.wait_done(1).await;
        drop(client);
        let used = admin(api, "GET", "/api/admin/users/carol", None).await.1["used-bytes"].as_u64().unwrap();
        assert!(used > 0);
        // A clean stop writes the usage; the restart reads it back.
        unsafe { libc::kill(server.process.pid() as i32, libc::SIGTERM) };
        server.process.wait_exit(Duration::from_secs(15)).await.expect("stops on SIGTERM");
        let (server, api) = server_in(dir.path()).await;
        let (status, view) = admin(api, "GET", "/api/admin/users/carol", None).await;
        assert_eq!(status, 200, "{view}");
        assert_eq!((view["quota-bytes"].as_u64(), view["used-bytes"].as_u64()), (Some(1_000_000_000), Some(used)));
        echo_once(&client_for(&server, "carol-pw", &[]).await, echo).await.expect("carol works after the restart");
        drop(server);

        // kill -9 right after acknowledged adds, five times: every acknowledged user is back.
        let mut acknowledged = vec!["carol".to_string()];
        for round in 0..5 {
            let (server, api) = server_in(dir.path()).await;
            // Every acknowledged user is there; one the kill cut off before its answer may be too.
            let present = listed(api).await;
            let lost: Vec<&String> = acknowledged.iter().filter(|name| !present.contains(name)).collect();
            assert!(lost.is_empty(), "round {round}: acknowledged users lost by kill -9: {lost:?}");
            acknowledged = present;
            let adds = (0..20).map(|i| {
                let name = format!("r{round}-u{i:02}");
                let body = json!({"name": name, "password": format!("pw-{name}")});
                async move { (admin(api, "POST", "/api/admin/users", Some(body)).await.0, name) }
            });
            let killer = async {
                tokio::time::sleep(Duration::from_millis(15)).await;
                unsafe { libc::kill(server.process.pid() as i32, libc::SIGKILL) };
            };
            let (results, ()) = tokio::join!(futures_util::future::join_all(adds), killer);
            for (status, name) in results {
                if status == 201 {
                    acknowledged.push(name);
                }
            }
            acknowledged.sort();
            drop(server);
        }
        let (_server, api) = server_in(dir.path()).await;
        let present = listed(api).await;
        let lost: Vec<&String> = acknowledged.iter().filter(|name| !present.contains(name)).collect();
        assert!(lost.is_empty(), "acknowledged users lost by the last kill -9: {lost:?}");
        announce(&format!("NOTE kill -9: {} users acknowledged over 5 rounds, all back", acknowledged.len() - 1));
    })
    .await;
}

#[tokio::test]
async fn ten_thousand_users_added_through_the_api_all_authenticate() {
    bounded(Duration::from_secs(180), "10,000 users", async {
        let dir = TempDir::new("state-10k");
        let (server, api) = server_in(dir.path()).await;
        let started = Instant::now();
        let workers = (0..16).map(|worker| async move {
            for i in (worker..10_000).step_by(16) {
                let body = json!({"name": format!("user{i:05}"), "password": format!("password-{i}")});
                let (status, json) = admin(api, "POST", "/api/admin/users", Some(body)).await;
                assert_eq!(status, 201, "{json}");
            }
        });
        futures_util::future::join_all(workers).await;
        let took = started.elapsed();
        let names = listed(api).await;
        assert_eq!(names.iter().filter(|name| name.starts_with("user")).count(), 10_000);
        assert_eq!(names.len(), 10_001, "and the -p user");
        let echo = spawn_echo().await;
        for i in [0, 4_999, 9_999] {
            echo_once(&client_for(&server, &format!("password-{i}"), &[]).await, echo).await.unwrap();
        }
        announce(&format!(
            "NOTE 10,000 users added through the admin API (16 at a time, durable each) in {:.2} s",
            took.as_secs_f64()
        ));
    })
    .await;
}
