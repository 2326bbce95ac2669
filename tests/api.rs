//! The monitoring API (`--api`) end to end: both binaries serve every endpoint, the
//! numbers move as traffic flows, the token is enforced, and an exposed API without a token
//! is warned about. The live page is checked in a real browser by `tests/browser/` (see
//! `live_page_renders_and_updates_in_headless_chromium` below).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LIMIT: Duration = Duration::from_secs(60);

async fn get_json(api: SocketAddr, path: &str) -> Value {
    let (status, body) = api_get(api, path, None).await;
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|err| panic!("GET {path}: not JSON ({err}): {body}"))
}

/// Polls `path` until `ok` holds for its JSON, at most 15 s.
async fn wait_json(api: SocketAddr, path: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let json = get_json(api, path).await;
        if ok(&json) {
            return json;
        }
        assert!(tokio::time::Instant::now() < deadline, "{path}: no {what} within 15 s; last: {json}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn n(json: &Value, field: &str) -> u64 {
    json[field].as_u64().unwrap_or_else(|| panic!("{field} is not a number in {json}"))
}

/// The value of the sample `name{labels}` in a Prometheus text body.
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {series} in:\n{metrics}"))
}

/// The first `snapshot` event of `/api/events`.
async fn first_event(api: SocketAddr) -> Value {
    let mut tcp = TcpStream::connect(api).await.unwrap();
    let request = format!("GET /api/events HTTP/1.1\r\nHost: {api}\r\nAccept: text/event-stream\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let read = tcp.read(&mut chunk).await.unwrap();
        assert!(read > 0, "event stream closed: {}", String::from_utf8_lossy(&raw));
        raw.extend_from_slice(&chunk[..read]);
        let text = String::from_utf8_lossy(&raw);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        if let Some(data) = text.lines().find_map(|line| line.strip_prefix("data: "))
            && let Ok(json) = serde_json::from_str::<Value>(data)
        {
            return json;
        }
    }
}

const POOL_FIELDS: [&str; 9] = [
    "total_created",
    "total_reused",
    "total_closed",
    "current_active",
    "current_idle",
    "cache_hits",
    "cache_misses",
    "hit_rate",
    "pool_type",
];

/// `count` echo round trips through the client, one after another.
async fn echo_traffic(client: &Client, target: SocketAddr, count: usize, already_done: usize) {
    for i in 0..count {
        let tcp = socks5_open(client.addr, target).await;
        echo_roundtrip(tcp, &payload(200_000, i as u64)).await;
        client.wait_done(already_done + i + 1).await;
    }
}

async fn start_watched_pair(server_args: &[&str], client_args: &[&str]) -> (Server, SocketAddr, Client, SocketAddr) {
    let mut args = vec!["--api", "127.0.0.1:0", "--min-idle-connections", "2"];
    args.extend_from_slice(server_args);
    let mut server = start_server(PASSWORD, &args).await;
    let server_api = api_address(&mut server.process).await;
    let pin = server.fingerprint.clone().expect("self-signed fingerprint");
    let mut args = vec!["--pin-sha256", &pin, "--api", "127.0.0.1:0"];
    args.extend_from_slice(client_args);
    let mut client = start_client(server.addr, PASSWORD, &args).await;
    let client_api = api_address(&mut client.process).await;
    (server, server_api, client, client_api)
}

#[tokio::test]
async fn every_endpoint_answers_and_the_numbers_follow_the_traffic() {
    bounded(LIMIT, "api endpoints", async {
        let target = spawn_echo().await;
        // Warming from the second stream whenever it comes, so the counts below are exact
        // (by default demand must be repeated first: see server::outbound_pool's tests).
        let (server, server_api, client, client_api) = start_watched_pair(&["--warm-after-ms", "0"], &[]).await;

        for (api, pool) in [(server_api, "outbound"), (client_api, "sessions")] {
            let stats = get_json(api, "/api/connection-pool-stats").await;
            for field in POOL_FIELDS {
                assert!(stats.get(field).is_some(), "{pool}: {field} missing: {stats}");
            }
            assert_eq!(stats["pool"], pool);
            assert_eq!(stats["pool_type"], "lockfree");
            assert_eq!((n(&stats, "total_reused"), n(&stats, "cache_misses")), (0, 0), "{pool}: before traffic");
            let memory = get_json(api, "/api/memory-pool-stats").await;
            let sizes: Vec<u64> = memory["tiers"].as_array().unwrap().iter().map(|t| n(t, "buffer_size")).collect();
            assert_eq!(sizes, [4096, 65536, 131072]);
            for field in ["current_size", "peak_size", "total_allocated", "total_returned"] {
                assert!(memory["tiers"][1].get(field).is_some(), "{field} missing: {memory}");
            }
            let (status, page) = api_get(api, "/", None).await;
            assert_eq!(status, 200);
            assert!(page.contains("<canvas") && page.contains("/api/events"), "the live page: {page}");
            assert!(!page.contains("https://"), "the page loads nothing from elsewhere");
        }

        echo_traffic(&client, target, 6, 0).await;
        let target_name = target.to_string();

        // Server: the first two streams dialed (a target is warmed from its second stream),
        // the later ones were served warm.
        let server_stats =
            wait_json(server_api, "/api/connection-pool-stats", "reuse", |s| n(s, "cache_hits") >= 4).await;
        assert_eq!(n(&server_stats, "cache_misses"), 2, "{server_stats}");
        assert_eq!(n(&server_stats, "total_reused"), n(&server_stats, "cache_hits"));
        let warmed = n(&server_stats, "warmed");
        assert!(warmed >= 4, "each warm hit was refilled: {server_stats}");
        assert_eq!(n(&server_stats, "total_created"), n(&server_stats, "cache_misses") + warmed);
        assert!(n(&server_stats, "total_closed") >= 5, "five used connections closed: {server_stats}");
        assert!(server_stats["hit_rate"].as_f64().unwrap() >= 66.0, "{server_stats}");
        let targets = server_stats["targets"].as_array().unwrap();
        let entry = targets.iter().find(|t| t["target"] == target_name.as_str()).expect("the echo target");
        assert!(n(entry, "reused") >= 4 && n(entry, "created") >= 1, "{entry}");
        for field in ["idle", "active", "cleaned", "waiters"] {
            assert!(entry.get(field).is_some(), "{field} missing: {entry}");
        }

        // Client: one session, reused by the four later connections.
        let client_stats =
            wait_json(client_api, "/api/connection-pool-stats", "reuse", |s| n(s, "cache_hits") >= 4).await;
        assert_eq!((n(&client_stats, "total_created"), n(&client_stats, "cache_misses")), (1, 1), "{client_stats}");
        assert_eq!(n(&client_stats, "current_active"), 0, "{client_stats}");
        assert_eq!(n(&client_stats, "current_idle"), 1, "{client_stats}");
        assert_eq!(client_stats["targets"][0]["target"], server.addr.to_string(), "per server: {client_stats}");
        assert_eq!(n(&client_stats["targets"][0], "reused"), n(&client_stats, "total_reused"));

        // Relay reads were counted (the pool is off by default: fresh buffers).
        for api in [server_api, client_api] {
            let memory = get_json(api, "/api/memory-pool-stats").await;
            assert_eq!(memory["enabled"], false);
            assert!(n(&memory["tiers"][1], "total_allocated") >= 5, "{memory}");
        }

        // The metrics say the same as the JSON.
        let (status, metrics) = api_get(server_api, "/metrics", None).await;
        assert_eq!(status, 200);
        assert!(metrics.contains("# TYPE anytls_pool_connections_reused_total counter"));
        let reused = sample(&metrics, "anytls_pool_connections_reused_total{pool=\"outbound\"}");
        assert!(reused >= n(&server_stats, "total_reused") as f64, "{metrics}");
        let series = format!("anytls_pool_target_reused_total{{pool=\"outbound\",target=\"{target_name}\"}}");
        assert!(sample(&metrics, &series) >= 4.0);
        let (_, metrics) = api_get(client_api, "/metrics", None).await;
        assert!(sample(&metrics, "anytls_pool_cache_hits_total{pool=\"sessions\"}") >= 4.0, "{metrics}");
        assert!(sample(&metrics, "anytls_buffer_pool_allocated_total{size=\"65536\"}") >= 5.0, "{metrics}");

        // The page's feed carries the same snapshot.
        let event = first_event(client_api).await;
        assert!(n(&event["connections"], "cache_hits") >= 4, "{event}");
        assert!(event["memory"]["tiers"].is_array(), "{event}");
    })
    .await;
}

#[tokio::test]
async fn with_the_buffer_pool_on_relay_reads_reuse_buffers() {
    bounded(LIMIT, "buffer pool", async {
        let target = spawn_echo().await;
        let on = ["--buffer-pool", "on"];
        let (_server, server_api, client, client_api) = start_watched_pair(&on, &on).await;
        echo_traffic(&client, target, 3, 0).await;
        for api in [server_api, client_api] {
            let memory = wait_json(api, "/api/memory-pool-stats", "returned buffers", |m| {
                n(&m["tiers"][1], "in_use") == 0 && n(&m["tiers"][1], "total_returned") > 0
            })
            .await;
            assert_eq!(memory["enabled"], true);
            let tier = &memory["tiers"][1];
            assert_eq!(n(tier, "buffer_size"), 65536);
            assert!(n(tier, "total_reused") > n(tier, "total_allocated"), "reads reuse buffers: {memory}");
            assert!(n(tier, "peak_size") >= n(tier, "current_size") && n(tier, "current_size") >= 1, "{memory}");
            let (_, metrics) = api_get(api, "/metrics", None).await;
            assert_eq!(sample(&metrics, "anytls_buffer_pool_enabled"), 1.0);
        }
    })
    .await;
}

#[tokio::test]
async fn with_a_token_every_endpoint_refuses_requests_without_it() {
    bounded(LIMIT, "api token", async {
        let mut server = start_server(PASSWORD, &["--api", "127.0.0.1:0", "--api-token", "s3cret/+"]).await;
        let api = api_address(&mut server.process).await;
        for path in ["/", "/api/connection-pool-stats", "/api/memory-pool-stats", "/metrics", "/api/events"] {
            assert_eq!(api_get(api, path, None).await.0, 401, "{path} without a token");
            assert_eq!(api_get(api, path, Some("wrong")).await.0, 401, "{path} with a wrong token");
            if path != "/api/events" {
                assert_eq!(api_get(api, path, Some("s3cret/+")).await.0, 200, "{path} with the bearer token");
                let query = format!("{path}?token=s3cret%2F%2B");
                assert_eq!(api_get(api, &query, None).await.0, 200, "{path} with ?token=");
            }
        }
        assert!(!server.process.log().contains("no --api-token"), "loopback: no warning");
    })
    .await;
}

#[tokio::test]
async fn an_api_open_to_other_machines_without_a_token_is_warned_about() {
    bounded(LIMIT, "api warning", async {
        // Binding 0.0.0.0 sends nothing anywhere; the test only reads the log.
        let mut open = start_server(PASSWORD, &["--api", "0.0.0.0:0"]).await;
        let api = api_address(&mut open.process).await;
        assert!(api.ip().is_unspecified());
        assert!(open.process.log_shows("has no --api-token", Duration::from_secs(5)).await, "{}", open.process.log());
        let mut guarded = start_server(PASSWORD, &["--api", "0.0.0.0:0", "--api-token", "t"]).await;
        api_address(&mut guarded.process).await;
        assert!(!guarded.process.log().contains("no --api-token"), "{}", guarded.process.log());
        // A bare port means loopback.
        let mut bare = start_server(PASSWORD, &["--api", "0"]).await;
        assert!(api_address(&mut bare.process).await.ip().is_loopback());
    })
    .await;
}

#[tokio::test]
async fn live_page_renders_and_updates_in_headless_chromium() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    if let Some(why) = browser_missing(&dir) {
        assert!(std::env::var("ANYTLS_REQUIRE_BROWSER").as_deref() != Ok("1"), "browser check required: {why}");
        announce(&format!("SKIP browser check: {why}"));
        return;
    }
    bounded(Duration::from_secs(120), "browser check", async {
        let target = spawn_echo().await;
        let (_server, _server_api, client, client_api) = start_watched_pair(&[], &[]).await;
        echo_traffic(&client, target, 1, 0).await;
        // Traffic keeps flowing while the browser watches.
        let proxy = client.addr;
        let traffic = tokio::spawn(async move {
            for i in 0.. {
                let tcp = socks5_open(proxy, target).await;
                echo_roundtrip(tcp, &payload(50_000, i)).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        });
        let screenshot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("live-page.png");
        let output = tokio::process::Command::new("node")
            .arg(dir.join("check-page.mjs"))
            .arg(format!("http://{client_api}/"))
            .arg(&screenshot)
            .current_dir(&dir)
            .kill_on_drop(true)
            .output()
            .await
            .expect("run node");
        traffic.abort();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "browser check failed:\n{stdout}\n{stderr}");
        announce(&format!("browser check: {}", stdout.lines().last().unwrap_or_default()));
    })
    .await;
}
