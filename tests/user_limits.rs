//! Users' plans enforced end to end, through the real client: speed limits within 10% over
//! 10 s for one stream and for 20 (other users unaffected), the quota's overshoot bounded,
//! expiry at the second, and the device limit with clients from 127.0.0.2 and 127.0.0.3.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const TOKEN: &str = "limits-admin";
const RATE: u64 = 1_000_000;
const WINDOW: Duration = Duration::from_secs(10);

/// A server whose users are `[[users]]` tables of a config file, with the admin API on.
async fn server_with_users(users_toml: &str) -> (Server, SocketAddr, TempDir) {
    let dir = TempDir::new("limits");
    let config = dir.path().join("server.toml");
    std::fs::write(&config, users_toml).unwrap();
    let config = config.display().to_string();
    let state = dir.path().join("state").display().to_string();
    let args =
        ["--config", config.as_str(), "--api", "127.0.0.1:0", "--admin-token", TOKEN, "--state-dir", state.as_str()];
    let mut server = start_server(PASSWORD, &args).await;
    let api = api_address(&mut server.process).await;
    (server, api, dir)
}

async fn client_for(server: &Server, password: &str, extra: &[&str]) -> Client {
    let pin = server.fingerprint.clone().expect("self-signed");
    let mut args = vec!["--pin-sha256", pin.as_str()];
    args.extend_from_slice(extra);
    start_client(server.addr, password, &args).await
}

async fn user_view(api: SocketAddr, name: &str) -> Value {
    let (status, body) = api_request(api, "GET", &format!("/api/admin/users/{name}"), Some(TOKEN), None).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Reads from `streams` streams of `bulk` through `proxy` for `window`; the bytes received.
async fn download(proxy: SocketAddr, bulk: SocketAddr, streams: usize, window: Duration) -> u64 {
    let total = Arc::new(AtomicU64::new(0));
    let deadline = tokio::time::Instant::now() + window;
    let tasks: Vec<_> = (0..streams)
        .map(|_| {
            let total = total.clone();
            tokio::spawn(async move {
                let mut tcp = socks5_open(proxy, bulk).await;
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
                    if n == 0 {
                        break;
                    }
                    total.fetch_add(n as u64, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    total.load(Ordering::Relaxed)
}

/// A target that counts what it receives.
async fn spawn_sink() -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Arc::new(AtomicU64::new(0));
    let counted = received.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = tcp.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    counted.fetch_add(n as u64, Ordering::Relaxed);
                }
            });
        }
    });
    (addr, received)
}

/// Writes to `sink` through `proxy` for `window`; what the sink received in that window.
async fn upload(proxy: SocketAddr, sink: SocketAddr, received: &AtomicU64, window: Duration) -> u64 {
    let mut tcp = socks5_open(proxy, sink).await;
    let chunk = vec![7u8; 64 * 1024];
    let start = received.load(Ordering::Relaxed);
    let _ = tokio::time::timeout(window, async {
        loop {
            if tcp.write_all(&chunk).await.is_err() {
                return;
            }
        }
    })
    .await;
    received.load(Ordering::Relaxed) - start
}

fn within_ten_percent(bytes: u64, what: &str) {
    let expected = RATE * WINDOW.as_secs();
    let ratio = bytes as f64 / expected as f64;
    announce(&format!("NOTE speed {what}: {bytes} bytes in {WINDOW:?} at {RATE} B/s: {ratio:.3} of the rate"));
    assert!((0.9..=1.1).contains(&ratio), "{what}: {bytes} bytes, {ratio:.3} of {expected}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speed_limits_hold_for_one_stream_and_twenty_and_spare_other_users() {
    bounded(Duration::from_secs(120), "speed limits", async {
        let users = format!(
            "[[users]]\nname = \"one\"\npassword = \"one-pw\"\nspeed-down = {RATE}\n\
             [[users]]\nname = \"twenty\"\npassword = \"twenty-pw\"\nspeed-down = {RATE}\n\
             [[users]]\nname = \"up\"\npassword = \"up-pw\"\nspeed-up = {RATE}\n\
             [[users]]\nname = \"free\"\npassword = \"free-pw\"\n"
        );
        let (server, _api, _dir) = server_with_users(&users).await;
        let bulk = spawn_bulk(Arc::new(payload(32 << 20, 1))).await;
        let (sink, received) = spawn_sink().await;
        let one = client_for(&server, "one-pw", &[]).await;
        let twenty = client_for(&server, "twenty-pw", &["--max-streams-per-session", "4"]).await;
        let up = client_for(&server, "up-pw", &[]).await;
        let free = client_for(&server, "free-pw", &[]).await;
        let started = Instant::now();
        let (one, twenty, up, free) = tokio::join!(
            download(one.addr, bulk, 1, WINDOW),
            download(twenty.addr, bulk, 20, WINDOW),
            upload(up.addr, sink, &received, WINDOW),
            download(free.addr, bulk, 1, Duration::from_secs(3)),
        );
        assert!(started.elapsed() < WINDOW + Duration::from_secs(5));
        within_ten_percent(one, "down, one stream");
        within_ten_percent(twenty, "down, 20 streams");
        within_ten_percent(up, "up, one stream");
        announce(&format!("NOTE speed: an unlimited user beside them moved {free} bytes in 3 s"));
        assert!(free > 3 * RATE * 3, "the unlimited user is not held to the others' rate: {free} bytes in 3 s");
    })
    .await;
}

#[tokio::test]
async fn the_quota_cuts_the_user_off_within_its_slack_and_refuses_it_after() {
    bounded(Duration::from_secs(60), "quota", async {
        let quota: u64 = 5_000_000;
        let users = format!("[[users]]\nname = \"q\"\npassword = \"q-pw\"\nquota-bytes = {quota}\n");
        let (server, api, _dir) = server_with_users(&users).await;
        let bulk = spawn_bulk(Arc::new(payload(20 << 20, 2))).await;
        let client = client_for(&server, "q-pw", &[]).await;
        let got = download(client.addr, bulk, 4, Duration::from_secs(20)).await;
        let slack = (quota / 100).max(1 << 20);
        let used = user_view(api, "q").await["used-bytes"].as_u64().unwrap();
        announce(&format!("NOTE quota {quota}: {got} payload bytes received, {used} bytes counted (slack {slack})"));
        assert!(got <= quota + slack, "received {got}, quota {quota} + slack {slack}");
        assert!(used >= quota && used <= quota + slack, "counted {used}");
        assert!(got >= quota / 2, "the user could use its quota: {got}");
        let refused =
            tokio::time::timeout(Duration::from_secs(15), socks5_connect(client.addr, "127.0.0.1", bulk.port())).await;
        let worked = matches!(&refused, Ok(Ok((code, _))) if *code == SOCKS5_OK);
        let more = if worked {
            let (_, mut tcp) = refused.unwrap().unwrap();
            let mut buf = [0u8; 1024];
            matches!(tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await, Ok(Ok(n)) if n > 0)
        } else {
            false
        };
        assert!(!more, "no data once over quota");
        let metrics = api_get(api, "/metrics", None).await.1;
        assert!(metrics.contains("anytls_user_refused_total{reason=\"quota\"} "), "{metrics}");
        assert!(!metrics.contains("anytls_user_refused_total{reason=\"quota\"} 0\n"), "refusals counted: {metrics}");
        let logged = count_lines(&server.process.log(), "user q refused: quota");
        assert_eq!(logged, 1, "logged once a minute, not per handshake:\n{}", server.process.log());
    })
    .await;
}

#[tokio::test]
async fn expiry_closes_sessions_at_the_second() {
    bounded(Duration::from_secs(60), "expiry", async {
        // The next whole second at least 3 s away.
        let now = jiff::Timestamp::now();
        let expires = jiff::Timestamp::from_second(now.as_second() + 4).unwrap();
        let users = format!("[[users]]\nname = \"e\"\npassword = \"e-pw\"\nexpires = \"{expires}\"\n");
        let (server, _api, _dir) = server_with_users(&users).await;
        let echo = spawn_echo().await;
        let client = client_for(&server, "e-pw", &[]).await;
        let mut held = socks5_open(client.addr, echo).await;
        held.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        held.read_exact(&mut one).await.expect("works before its expiry");
        let (_, closed) = read_until_closed(&mut held, Duration::from_secs(10)).await;
        let at = jiff::Timestamp::now();
        assert!(closed, "closed by the expiry");
        let late = at.duration_since(expires);
        announce(&format!("NOTE expiry: the stream closed {late:?} after the expiry time"));
        assert!(
            late >= jiff::SignedDuration::ZERO && late < jiff::SignedDuration::from_secs(1),
            "closed {late:?} after"
        );
        let again = tokio::time::timeout(Duration::from_secs(15), async {
            let (code, mut tcp) = socks5_connect(client.addr, "127.0.0.1", echo.port()).await?;
            if code != SOCKS5_OK {
                return Err(std::io::Error::other("refused"));
            }
            tcp.write_all(b"y").await?;
            tcp.read_exact(&mut one).await
        })
        .await;
        assert!(!matches!(again, Ok(Ok(_))), "refused after its expiry: {again:?}");
    })
    .await;
}

#[tokio::test]
async fn the_device_limit_counts_source_ips() {
    bounded(Duration::from_secs(90), "device limit", async {
        let users = "[[users]]\nname = \"d\"\npassword = \"d-pw\"\nmax-ips = 1\n";
        let (server, api, _dir) = server_with_users(users).await;
        let echo = spawn_echo().await;
        let first = client_for(&server, "d-pw", &["--bind", "127.0.0.2"]).await;
        assert!(echo_works(first.addr, echo, Duration::from_secs(10)).await, "the first device works");
        let second = client_for(&server, "d-pw", &["--bind", "127.0.0.3"]).await;
        assert!(
            !echo_works(second.addr, echo, Duration::from_secs(10)).await,
            "a second IP is refused while the first is online"
        );
        assert_eq!(user_view(api, "d").await["ips"], json!(["127.0.0.2"]));
        let again = client_for(&server, "d-pw", &["--bind", "127.0.0.2"]).await;
        assert!(echo_works(again.addr, echo, Duration::from_secs(10)).await, "the same IP again is the same device");
        drop((first, again));
        // Once the first device's sessions are gone, the second gets in.
        let deadline = Instant::now() + Duration::from_secs(20);
        while user_view(api, "d").await["sessions"].as_u64() != Some(0) {
            assert!(Instant::now() < deadline, "sessions of 127.0.0.2 still open: {}", user_view(api, "d").await);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            echo_works(second.addr, echo, Duration::from_secs(10)).await,
            "the second device works once the first left"
        );
        let metrics = api_get(api, "/metrics", None).await.1;
        assert!(!metrics.contains("anytls_user_refused_total{reason=\"ips\"} 0\n"), "{metrics}");
    })
    .await;
}
