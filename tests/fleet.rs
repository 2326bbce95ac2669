//! Three nodes and one panel, end to end: users from the panel's UniProxy node API work on
//! every node within one interval and are cut off on every node when the panel drops them
//! (removed, or over their transfer quota); the traffic the panel is told equals the bytes
//! moved, across a panel outage, a panel answering garbage, a node restart and a node
//! killed with `kill -9`.
//!
//! The panel is a stand-in (Xboard cannot be installed here) written from Xboard's own
//! `UniProxyController`, `ServerService` and `Server` middleware: the `token`, `node_id`
//! and `node_type` query parameters, `config` and `user` with a quoted ETag and `304` for a
//! matching `If-None-Match`, the user list leaving out users whose `u + d` reached their
//! `transfer_enable`, `push` taking `{"ID": [u, d]}` and answering
//! `{"status": "success", …, "data": true}`, `alive` taking `{"ID": [IPs]}`.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use common::*;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const NODE_TOKEN: &str = "panel-node-token";
const INTERVAL: &str = "2";

#[derive(Clone, Default)]
struct PanelUser {
    uuid: String,
    /// Bytes the panel has been told about (u: upload, d: download).
    u: u64,
    d: u64,
    transfer_enable: u64,
}

/// How the stand-in answers right now.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
enum Mood {
    #[default]
    Fine,
    /// 503 to everything, like a panel behind a proxy whose PHP is down.
    Down,
    /// 200 with an HTML error page.
    Garbage,
}

#[derive(Default)]
struct PanelState {
    users: BTreeMap<u64, PanelUser>,
    mood: Mood,
    pushes: u64,
    /// The last IPs each node said were online, per user.
    alive: BTreeMap<String, Value>,
    not_modified: u64,
}

type Shared = Arc<Mutex<PanelState>>;

/// What the panel's `Server` middleware checks: the token, a node id, the node type.
fn node_of(query: &Option<String>) -> Result<String, (StatusCode, &'static str)> {
    let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
    let pairs: BTreeMap<String, String> = query
        .as_deref()
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect();
    if pairs.get("token").map(String::as_str) != Some(NODE_TOKEN) {
        return Err((StatusCode::UNPROCESSABLE_ENTITY, "{\"message\":\"Invalid token\"}"));
    }
    if pairs.get("node_type").map(String::as_str) != Some("anytls") {
        return Err((StatusCode::UNPROCESSABLE_ENTITY, "{\"message\":\"Invalid node type specified\"}"));
    }
    pairs.get("node_id").cloned().ok_or((StatusCode::UNPROCESSABLE_ENTITY, "{\"message\":\"node_id is required\"}"))
}

fn moody(state: &PanelState) -> Option<Response> {
    match state.mood {
        Mood::Fine => None,
        Mood::Down => Some((StatusCode::SERVICE_UNAVAILABLE, "").into_response()),
        Mood::Garbage => {
            Some((StatusCode::OK, "<html><body>Whoops, looks like something went wrong.</body></html>").into_response())
        }
    }
}

/// A JSON answer with Xboard's ETag rule: `"sha1(json)"` (SHA-256 here), 304 on a match.
fn with_etag(json: Value, headers: &HeaderMap, state: &mut PanelState) -> Response {
    let body = json.to_string();
    let etag: String = Sha256::digest(body.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
    let asked = headers.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()).unwrap_or_default();
    if asked.contains(&etag) {
        state.not_modified += 1;
        return StatusCode::NOT_MODIFIED.into_response();
    }
    ([(header::ETAG, format!("\"{etag}\"")), (header::CONTENT_TYPE, "application/json".into())], body).into_response()
}

async fn config(State(shared): State<Shared>, RawQuery(query): RawQuery, headers: HeaderMap) -> Response {
    if let Err(refused) = node_of(&query) {
        return refused.into_response();
    }
    let mut state = shared.lock().unwrap();
    if let Some(answer) = moody(&state) {
        return answer;
    }
    let config = json!({
        "protocol": "anytls", "listen_ip": "0.0.0.0", "server_port": 1, "network": null, "networkSettings": null,
        "server_name": "localhost", "tls_settings": {},
        "padding_scheme": ["stop=8", "0=30-30", "1=100-400", "2=400-500,c,500-1000,c,500-1000,c,500-1000,c,500-1000",
                           "3=9-9,500-1000", "4=500-1000", "5=500-1000", "6=500-1000", "7=500-1000"],
        "base_config": {"push_interval": 60, "pull_interval": 60}
    });
    with_etag(config, &headers, &mut state)
}

async fn user(State(shared): State<Shared>, RawQuery(query): RawQuery, headers: HeaderMap) -> Response {
    if let Err(refused) = node_of(&query) {
        return refused.into_response();
    }
    let mut state = shared.lock().unwrap();
    if let Some(answer) = moody(&state) {
        return answer;
    }
    // getAvailableUsers: u + d < transfer_enable (and not expired, not banned).
    let users: Vec<Value> = state
        .users
        .iter()
        .filter(|(_, u)| u.u + u.d < u.transfer_enable)
        .map(|(id, u)| json!({"id": id, "uuid": u.uuid, "speed_limit": null, "device_limit": null}))
        .collect();
    with_etag(json!({ "users": users }), &headers, &mut state)
}

async fn push(State(shared): State<Shared>, RawQuery(query): RawQuery, body: Bytes) -> Response {
    if let Err(refused) = node_of(&query) {
        return refused.into_response();
    }
    let mut state = shared.lock().unwrap();
    if let Some(answer) = moody(&state) {
        return answer;
    }
    let Ok(Value::Object(traffic)) = serde_json::from_slice::<Value>(&body) else {
        return (StatusCode::UNPROCESSABLE_ENTITY, "{\"status\":\"fail\",\"message\":\"Invalid data format\"}")
            .into_response();
    };
    state.pushes += 1;
    for (id, pair) in traffic {
        let (Ok(id), Some(u), Some(d)) = (id.parse::<u64>(), pair[0].as_u64(), pair[1].as_u64()) else { continue };
        if let Some(user) = state.users.get_mut(&id) {
            user.u += u;
            user.d += d;
        }
    }
    axum::Json(json!({"status": "success", "message": "操作成功", "data": true, "error": null})).into_response()
}

async fn alive(State(shared): State<Shared>, RawQuery(query): RawQuery, body: Bytes) -> Response {
    let node = match node_of(&query) {
        Ok(node) => node,
        Err(refused) => return refused.into_response(),
    };
    let mut state = shared.lock().unwrap();
    if let Some(answer) = moody(&state) {
        return answer;
    }
    let Ok(online) = serde_json::from_slice::<Value>(&body) else {
        return (StatusCode::BAD_REQUEST, "{\"error\":\"Invalid online data\"}").into_response();
    };
    state.alive.insert(node, online);
    axum::Json(json!({"data": true})).into_response()
}

async fn spawn_panel(shared: Shared) -> SocketAddr {
    let app = Router::new()
        .route("/api/v1/server/UniProxy/config", get(config))
        .route("/api/v1/server/UniProxy/user", get(user))
        .route("/api/v1/server/UniProxy/push", post(push))
        .route("/api/v1/server/UniProxy/alive", post(alive))
        .with_state(shared);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    address
}

/// A node of the panel at `panel`, with its own state directory.
async fn node(panel: SocketAddr, id: usize, state: &TempDir) -> Server {
    let url = format!("http://{panel}");
    let node_id = id.to_string();
    let dir = state.path().display().to_string();
    let args = [
        "--panel",
        url.as_str(),
        "--panel-token",
        NODE_TOKEN,
        "--panel-node-id",
        node_id.as_str(),
        "--panel-interval-secs",
        INTERVAL,
        "--state-dir",
        dir.as_str(),
        "--api",
        "127.0.0.1:0",
    ];
    start_server(PASSWORD, &args).await
}

/// A client of `servers` (round-robin) with `password`.
async fn client_of(servers: &[SocketAddr], password: &str) -> Client {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_anytls-client"));
    command.args(["-l", "127.0.0.1:0", "-p", password, "--insecure", "--policy", "round-robin"]);
    for server in servers {
        command.args(["-s", &server.to_string()]);
    }
    command.env("RUST_LOG", OUR_LOG_FILTER);
    let mut process = Process::spawn("anytls-client", command);
    let addr = process
        .wait_for(Duration::from_secs(20), "`proxy on` line", |line| {
            let rest = line.split("proxy on ").nth(1)?;
            rest.split([' ', ',']).next()?.parse().ok()
        })
        .await;
    Client { process, addr }
}

/// Waits until `ok` holds for every client, at most `limit`; how long it took.
async fn until_all(clients: &[Client], echo: SocketAddr, want: bool, limit: Duration, what: &str) -> Duration {
    let started = Instant::now();
    for client in clients {
        loop {
            if echo_works(client.addr, echo, Duration::from_secs(5)).await == want {
                break;
            }
            assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    started.elapsed()
}

/// Moves `bytes` down and `bytes` up through `client` in 1 MiB streams; the payload moved.
async fn traffic(client: &Client, echo: SocketAddr, bytes: usize) -> u64 {
    let chunk = payload(1 << 20, 9);
    let mut moved = 0u64;
    for _ in 0..bytes.div_ceil(chunk.len()) {
        let tcp = socks5_open(client.addr, echo).await;
        echo_roundtrip(tcp, &chunk).await;
        moved += 2 * chunk.len() as u64;
    }
    moved
}

fn told(shared: &Shared, id: u64) -> u64 {
    let state = shared.lock().unwrap();
    state.users.get(&id).map_or(0, |u| u.u + u.d)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_follow_one_panel_and_report_every_byte() {
    bounded(Duration::from_secs(240), "fleet", async {
        let shared: Shared = Arc::default();
        shared
            .lock()
            .unwrap()
            .users
            .insert(1, PanelUser { uuid: "uuid-one".into(), transfer_enable: u64::MAX / 4, ..Default::default() });
        let panel = spawn_panel(shared.clone()).await;
        let echo = spawn_echo().await;
        let dirs = [TempDir::new("node1"), TempDir::new("node2"), TempDir::new("node3")];
        let mut nodes = Vec::new();
        for (i, dir) in dirs.iter().enumerate() {
            nodes.push(node(panel, i + 1, dir).await);
        }
        let addresses: Vec<SocketAddr> = nodes.iter().map(|n| n.addr).collect();
        let one = client_of(&addresses, "uuid-one").await;
        assert!(echo_works(one.addr, echo, Duration::from_secs(5)).await, "the panel's user works from the first pull");

        // A user added at the panel works on every node within one interval.
        shared
            .lock()
            .unwrap()
            .users
            .insert(2, PanelUser { uuid: "uuid-two".into(), transfer_enable: u64::MAX / 4, ..Default::default() });
        let added_at = Instant::now();
        let mut per_node = Vec::new();
        for address in &addresses {
            per_node.push(client_of(&[*address], "uuid-two").await);
        }
        let took = until_all(&per_node, echo, true, Duration::from_secs(10), "user 2 on every node").await;
        announce(&format!(
            "NOTE fleet: a user added at the panel worked on all 3 nodes {:?} after",
            added_at.elapsed().max(took)
        ));

        // Traffic across a panel outage, a panel answering garbage and a node restart.
        let mut moved = traffic(&one, echo, 8 << 20).await;
        shared.lock().unwrap().mood = Mood::Down;
        moved += traffic(&one, echo, 8 << 20).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(
            echo_works(one.addr, echo, Duration::from_secs(5)).await,
            "the panel down: the nodes serve the last good list"
        );
        shared.lock().unwrap().mood = Mood::Garbage;
        moved += traffic(&one, echo, 8 << 20).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let metrics = api_get(api_address(&mut nodes[0].process).await, "/metrics", None).await.1;
        assert!(metrics.contains("anytls_panel_up 0\n"), "{metrics}");
        assert!(!metrics.contains("anytls_panel_outbox_bytes 0\n"), "traffic waits in the outbox: {metrics}");
        shared.lock().unwrap().mood = Mood::Fine;
        // Node 2 restarts (a clean stop), with its outbox in its state directory; meanwhile
        // user 1 goes on through node 1 alone.
        let on_node_1 = client_of(&addresses[..1], "uuid-one").await;
        let pid = nodes[1].process.pid();
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        nodes[1].process.wait_exit(Duration::from_secs(20)).await.expect("node 2 stops");
        moved += traffic(&on_node_1, echo, 4 << 20).await;
        nodes[1] = node(panel, 2, &dirs[1]).await;
        // Node 3 is killed (kill -9) with traffic in its outbox: the panel is down, the
        // traffic has had time to be collected (every 2 s), then the node dies. Its outbox,
        // in the state directory, goes out after the restart.
        let on_node_3 = client_of(&addresses[2..], "uuid-one").await;
        shared.lock().unwrap().mood = Mood::Down;
        moved += traffic(&on_node_3, echo, 4 << 20).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let pid = nodes[2].process.pid();
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        nodes[2].process.wait_exit(Duration::from_secs(10)).await.expect("node 3 killed");
        shared.lock().unwrap().mood = Mood::Fine;
        nodes[2] = node(panel, 3, &dirs[2]).await;
        let addresses: Vec<SocketAddr> = nodes.iter().map(|n| n.addr).collect();
        // The panel's count converges on what moved.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let seen = told(&shared, 1);
            let ratio = seen as f64 / moved as f64;
            if (0.99..=1.01).contains(&ratio) {
                announce(&format!("NOTE fleet: {moved} payload bytes moved, the panel was told {seen} ({ratio:.4})"));
                break;
            }
            assert!(Instant::now() < deadline, "the panel was told {seen} bytes of {moved} ({ratio:.4})");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        assert!(shared.lock().unwrap().not_modified > 0, "unchanged lists cost a 304");
        assert!(!shared.lock().unwrap().alive.is_empty(), "online IPs are reported");

        // Removed at the panel: cut off on every node (node 2's address is new).
        let mut per_node = vec![per_node.swap_remove(0), per_node.swap_remove(1)];
        per_node.push(client_of(&addresses[1..2], "uuid-two").await);
        until_all(&per_node[2..], echo, true, Duration::from_secs(10), "user 2 on the restarted node").await;
        shared.lock().unwrap().users.remove(&2);
        until_all(&per_node, echo, false, Duration::from_secs(10), "user 2 removed on every node").await;

        // Over its transfer quota at the panel: dropped from the list, so refused fleet-wide.
        shared
            .lock()
            .unwrap()
            .users
            .insert(3, PanelUser { uuid: "uuid-three".into(), transfer_enable: 3 << 20, ..Default::default() });
        let mut on_each = Vec::new();
        for address in &addresses {
            on_each.push(client_of(&[*address], "uuid-three").await);
        }
        until_all(&on_each, echo, true, Duration::from_secs(10), "user 3 on every node").await;
        traffic(&on_each[0], echo, 2 << 20).await;
        let dropped =
            until_all(&on_each, echo, false, Duration::from_secs(15), "user 3 over quota on every node").await;
        announce(&format!(
            "NOTE fleet: over its quota at the panel, user 3 was refused on all 3 nodes within {dropped:?}"
        ));
    })
    .await;
}

/// `GET /api/v1/query?query=Q` on the Prometheus at `prometheus`: each series' labels and value.
async fn promql(prometheus: SocketAddr, query: &str) -> Vec<(Value, f64)> {
    let encoded = percent_encoding::utf8_percent_encode(query, percent_encoding::NON_ALPHANUMERIC).to_string();
    let (status, body) = api_get(prometheus, &format!("/api/v1/query?query={encoded}"), None).await;
    assert_eq!(status, 200, "{query}: {body}");
    let json: Value = serde_json::from_str(&body).unwrap();
    json["data"]["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|series| (series["metric"].clone(), series["value"][1].as_str().unwrap().parse().unwrap()))
        .collect()
}

/// The sum of `series` lines (`name{…} value`) on one node's `/metrics`.
fn summed(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .filter(|line| line.starts_with(series))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_fleet_and_the_documented_queries_answer() {
    let Ok(prometheus_binary) = which_prometheus() else {
        return announce(
            "SKIP a_real_prometheus_scrapes_the_fleet: `prometheus` is not installed (apt-get install prometheus)",
        );
    };
    bounded(Duration::from_secs(180), "prometheus", async {
        let shared: Shared = Arc::default();
        for (id, uuid) in [(1, "uuid-one"), (2, "uuid-two")] {
            shared.lock().unwrap().users.insert(id, PanelUser { uuid: uuid.into(), transfer_enable: u64::MAX / 4, ..Default::default() });
        }
        let panel = spawn_panel(shared.clone()).await;
        let echo = spawn_echo().await;
        let dirs = [TempDir::new("prom1"), TempDir::new("prom2"), TempDir::new("prom3")];
        let mut nodes = Vec::new();
        let mut apis = Vec::new();
        for (i, dir) in dirs.iter().enumerate() {
            let mut node = node(panel, i + 1, dir).await;
            apis.push(api_address(&mut node.process).await);
            nodes.push(node);
        }
        let addresses: Vec<SocketAddr> = nodes.iter().map(|n| n.addr).collect();
        let one = client_of(&addresses, "uuid-one").await;
        let moved = traffic(&one, echo, 6 << 20).await;
        let two = client_of(&addresses[2..], "uuid-two").await;
        assert!(echo_works(two.addr, echo, Duration::from_secs(5)).await);

        let home = TempDir::new("prometheus");
        let targets: Vec<String> = apis.iter().map(|a| format!("'{a}'")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: anytls\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        );
        let config_file = home.path().join("prometheus.yml");
        std::fs::write(&config_file, config).unwrap();
        let listen = format!("127.0.0.1:{}", free_port());
        let mut command = std::process::Command::new(prometheus_binary);
        command.args([
            &format!("--config.file={}", config_file.display()),
            &format!("--storage.tsdb.path={}", home.path().join("data").display()),
            &format!("--web.listen-address={listen}"),
        ]);
        let _prometheus = Process::spawn("prometheus", command);
        let prometheus: SocketAddr = listen.parse().unwrap();

        // Wait until every node has been scraped since the traffic ended.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let up = if port_listening(prometheus.port()) { promql(prometheus, "sum(up)").await } else { Vec::new() };
            if up.first().is_some_and(|(_, v)| *v == 3.0) {
                break;
            }
            assert!(Instant::now() < deadline, "prometheus never saw the three nodes up");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;

        // Bytes per user across the fleet: what the nodes show, and what moved.
        let mut expected = 0.0;
        let mut sessions_by_node = BTreeMap::new();
        for api in &apis {
            let metrics = api_get(*api, "/metrics", None).await.1;
            expected += summed(&metrics, "anytls_user_bytes_up_total{user=\"1\"}") + summed(&metrics, "anytls_user_bytes_down_total{user=\"1\"}");
            sessions_by_node.insert(api.to_string(), summed(&metrics, "anytls_user_sessions{"));
        }
        let per_user = promql(prometheus, "sum by (user) (anytls_user_bytes_up_total + anytls_user_bytes_down_total)").await;
        let user_one = per_user.iter().find(|(m, _)| m["user"] == "1").map(|(_, v)| *v).expect("user 1 in the answer");
        announce(&format!("NOTE prometheus: user 1 across the fleet {user_one} bytes (nodes say {expected}, payload moved {moved})"));
        assert_eq!(user_one, expected, "Prometheus adds up what the nodes show");
        assert!((user_one / moved as f64 - 1.0).abs() < 0.01, "{user_one} bytes for {moved} moved");

        let per_node = promql(prometheus, "sum by (instance) (anytls_user_sessions)").await;
        assert_eq!(per_node.len(), 3, "{per_node:?}");
        for (labels, value) in &per_node {
            let instance = labels["instance"].as_str().unwrap();
            assert_eq!(Some(value), sessions_by_node.get(instance), "sessions of {instance}");
        }
        assert!(per_node.iter().map(|(_, v)| v).sum::<f64>() >= 2.0, "users 1 and 2 have sessions: {per_node:?}");

        assert_eq!(promql(prometheus, "min(anytls_panel_up)").await[0].1, 1.0);
        shared.lock().unwrap().mood = Mood::Down;
        let deadline = Instant::now() + Duration::from_secs(30);
        while promql(prometheus, "max(anytls_panel_up)").await[0].1 != 0.0 {
            assert!(Instant::now() < deadline, "panel health never went down in Prometheus");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let stale = promql(prometheus, "time() - min(anytls_panel_last_success_timestamp_seconds)").await[0].1;
        assert!(stale >= 1.0, "the last success ages while the panel is down: {stale}");
    })
    .await;
}

fn which_prometheus() -> Result<std::path::PathBuf, ()> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .map(|dir| dir.join("prometheus"))
        .find(|candidate| candidate.is_file())
        .ok_or(())
}
