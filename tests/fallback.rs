//! `--fallback`: whatever reaches the server's port and does not authenticate — `curl -k`,
//! a real browser, random bytes after TLS, a short request, a wrong password — is handed
//! to a web site, bytes and all, while AnyTLS clients keep working on the same port. A
//! site that is down means the silent close of old; without `--fallback`, a wrong password
//! is not closed right after its 34th byte. See `docs/probe-resistance.md`.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use anytls_rs::client::tls::{Trust, client_config};
use anytls_rs::proto::PasswordHash;
use anytls_rs::proto::auth::encode_auth_block;

use common::*;

/// What the site's page says, so a test knows it reached the site.
const MARKER: &str = "fallback-site-page-5e1c";

// ---------------------------------------------------------------------------------------
// The site behind the server

/// One connection the site received: when it arrived, when its first byte came, and
/// every byte until the request's end (or EOF).
#[derive(Debug, Clone)]
struct Visit {
    first_byte_at: Option<Instant>,
    bytes: Vec<u8>,
}

/// A small web site: every HTTP request gets an HTML page with [`MARKER`] (and closes);
/// bytes that cannot be HTTP get a 400 at once, as nginx answers them.
struct Site {
    addr: SocketAddr,
    visits: Arc<Mutex<Vec<Visit>>>,
    connections: Arc<AtomicU64>,
}

impl Site {
    async fn start() -> Site {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let visits = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicU64::new(0));
        let (log, count) = (visits.clone(), connections.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(serve_visit(tcp, log.clone()));
            }
        });
        Site { addr, visits, connections }
    }

    fn visits(&self) -> Vec<Visit> {
        self.visits.lock().unwrap().clone()
    }

    /// Waits (at most 5 s) until the site has logged a visit with exactly `bytes`: a
    /// visit is logged when its connection ends, which can be after the client's ends.
    async fn saw(&self, bytes: &[u8]) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.visits().iter().any(|visit| visit.bytes == bytes) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }
}

fn page() -> String {
    format!(
        "<!doctype html><html><head><title>Example</title></head><body><h1 id=\"marker\">{MARKER}</h1></body></html>"
    )
}

async fn serve_visit(mut tcp: TcpStream, log: Arc<Mutex<Vec<Visit>>>) {
    const BAD_REQUEST: &[u8] = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    let mut visit = Visit { first_byte_at: None, bytes: Vec::new() };
    let mut buf = [0u8; 4096];
    let mut rejected = false;
    let complete = loop {
        if !rejected && visit.bytes.windows(4).any(|w| w == b"\r\n\r\n") {
            break true;
        }
        match tcp.read(&mut buf).await {
            Ok(0) | Err(_) => break false,
            Ok(n) => {
                visit.first_byte_at.get_or_insert_with(Instant::now);
                visit.bytes.extend_from_slice(&buf[..n]);
                // Like nginx: a request line that cannot be HTTP gets a 400 at once,
                // then the rest is read (and kept here) until the client closes.
                if !rejected && !could_be_http(&visit.bytes) {
                    let _ = tcp.write_all(BAD_REQUEST).await;
                    let _ = tcp.shutdown().await;
                    rejected = true;
                }
            }
        }
    };
    let is_http = complete && visit.bytes.starts_with(b"GET ");
    log.lock().unwrap().push(visit);
    if rejected {
        return;
    }
    let response = if is_http {
        let body = page();
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    } else {
        String::from_utf8_lossy(BAD_REQUEST).into_owned()
    };
    let _ = tcp.write_all(response.as_bytes()).await;
    let _ = tcp.shutdown().await;
}

/// Whether `bytes` can still be the start of an HTTP request: a method of capital
/// letters, then a space.
fn could_be_http(bytes: &[u8]) -> bool {
    let method_end = bytes.iter().position(|&b| b == b' ').unwrap_or(bytes.len());
    method_end <= 10 && bytes[..method_end].iter().all(u8::is_ascii_uppercase)
}

// ---------------------------------------------------------------------------------------
// Raw clients

/// TCP from `source` (any address in 127.0.0.0/8 stands for another client).
async fn connect_from(source: IpAddr, server: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    let tcp = socket.connect(server).await?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

async fn tls_from(source: IpAddr, server: SocketAddr) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = connect_from(source, server).await?;
    let connector = TlsConnector::from(client_config(&Trust::Insecure).expect("TLS config"));
    connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await
}

fn loopback(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

/// A GET over TLS from `source`; returns the whole response.
async fn get_page(source: IpAddr, server: SocketAddr) -> std::io::Result<Vec<u8>> {
    let mut tls = tls_from(source, server).await?;
    tls.write_all(b"GET / HTTP/1.1\r\nHost: www.example.test\r\nUser-Agent: probe-test\r\n\r\n").await?;
    let (response, closed) = read_until_closed(&mut tls, Duration::from_secs(10)).await;
    if !closed {
        return Err(std::io::Error::other("response not finished in 10 s"));
    }
    Ok(response)
}

fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {series} in:\n{metrics}"))
}

async fn server_with_fallback(site: SocketAddr, extra: &[&str]) -> Server {
    let target = site.to_string();
    let mut args = vec!["--fallback", target.as_str(), "--self-signed-name", "www.example.test"];
    args.extend_from_slice(extra);
    start_server(PASSWORD, &args).await
}

// ---------------------------------------------------------------------------------------
// The site is what a visitor sees

/// `curl -k` gets the site's page over HTTP/1.1 (curl offers h2 too), from a certificate
/// named after `--self-signed-name`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_sees_the_site_over_http1_with_the_named_certificate() {
    if !have_curl() {
        announce("SKIP fallback curl check: curl not found");
        return;
    }
    bounded(Duration::from_secs(60), "curl through the fallback", async {
        let site = Site::start().await;
        let server = server_with_fallback(site.addr, &[]).await;
        let port = server.addr.port();
        let output = tokio::process::Command::new("curl")
            .args(["-k", "-sS", "-v", "--max-time", "15", "-w", "\nhttp_version=%{http_version}"])
            .args(["--resolve", &format!("www.example.test:{port}:127.0.0.1")])
            .arg(format!("https://www.example.test:{port}/"))
            .env_remove("https_proxy")
            .env_remove("HTTPS_PROXY")
            .env_remove("all_proxy")
            .env_remove("ALL_PROXY")
            .output()
            .await
            .expect("run curl");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "curl failed: {stderr}");
        assert!(stdout.contains(MARKER), "curl did not get the site's page: {stdout}");
        assert!(stdout.contains("http_version=1.1"), "not HTTP/1.1: {stdout}");
        assert!(stderr.contains("CN=www.example.test"), "certificate subject:\n{stderr}");
        assert!(!stderr.contains("localhost"), "the certificate still names localhost:\n{stderr}");
        assert_eq!(site.visits().len(), 1);
    })
    .await;
}

/// Random bytes after TLS reach the site unchanged (and its answer comes back); so do a
/// wrong password's bytes and a request shorter than the authentication block. A
/// request's first byte reaches the site within milliseconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whatever_does_not_authenticate_reaches_the_site_bytes_and_all() {
    bounded(Duration::from_secs(60), "bytes to the site", async {
        let site = Site::start().await;
        let mut server = server_with_fallback(site.addr, &["--api", "0"]).await;
        let api = api_address(&mut server.process).await;
        let source = loopback(1);

        // Random bytes, then a half-close: the site gets exactly them and answers 400.
        let noise = payload(1000, 99);
        let mut tls = tls_from(source, server.addr).await.unwrap();
        tls.write_all(&noise).await.unwrap();
        tls.shutdown().await.unwrap();
        let (answer, closed) = read_until_closed(&mut tls, Duration::from_secs(5)).await;
        assert!(
            closed && answer.starts_with(b"HTTP/1.1 400"),
            "answer to noise: {:?}",
            String::from_utf8_lossy(&answer)
        );
        assert!(site.saw(&noise).await, "the site did not get exactly the random bytes");

        // A wrong password's block and what follows it: all of it reaches the site.
        let mut block = BytesMut::new();
        encode_auth_block(&PasswordHash::of("not-the-password"), 30, &mut block);
        block.extend_from_slice(b"\x04\0\0\0\0\0\x03v=2");
        let mut tls = tls_from(source, server.addr).await.unwrap();
        tls.write_all(&block).await.unwrap();
        tls.shutdown().await.unwrap();
        let (answer, _) = read_until_closed(&mut tls, Duration::from_secs(5)).await;
        assert!(answer.starts_with(b"HTTP/1.1 400"), "answer to a wrong password: {answer:?}");
        assert!(site.saw(&block).await, "the site did not get exactly the wrong password's bytes");

        // Shorter than the 34-byte block, and the client then waits: it still gets the page.
        let short = b"GET / HTTP/1.0\r\n\r\n";
        assert!(short.len() < 34);
        let mut tls = tls_from(source, server.addr).await.unwrap();
        let started = Instant::now();
        tls.write_all(short).await.unwrap();
        let (answer, _) = read_until_closed(&mut tls, Duration::from_secs(5)).await;
        let short_took = started.elapsed();
        assert!(String::from_utf8_lossy(&answer).contains(MARKER), "short request: {answer:?}");
        assert!(short_took < Duration::from_secs(1), "a short request waited {short_took:?}");

        // Time from a full request leaving the client to its first byte at the site.
        let mut delays = Vec::new();
        for _ in 0..20 {
            let mut tls = tls_from(source, server.addr).await.unwrap();
            let sent = Instant::now();
            tls.write_all(b"GET / HTTP/1.1\r\nHost: www.example.test\r\nAccept: */*\r\n\r\n").await.unwrap();
            let (answer, _) = read_until_closed(&mut tls, Duration::from_secs(5)).await;
            assert!(String::from_utf8_lossy(&answer).contains(MARKER));
            let arrived = site.visits().iter().filter_map(|visit| visit.first_byte_at).filter(|&at| at >= sent).min();
            delays.push(arrived.expect("the request reached the site").duration_since(sent));
        }
        delays.sort();
        let median = delays[delays.len() / 2];
        announce(&format!(
            "NOTE fallback: first byte at the site {:.2} ms after the client sent it (median of 20, max {:.2} ms); \
             a {}-byte request answered in {:.1} ms",
            median.as_secs_f64() * 1e3,
            delays.last().unwrap().as_secs_f64() * 1e3,
            short.len(),
            short_took.as_secs_f64() * 1e3
        ));
        assert!(median < Duration::from_millis(50), "median delay to the site {median:?}");

        // Counted in /metrics, and no per-connection line above DEBUG: the 23 failed logins
        // from this one source make one INFO line (at most one per source a minute).
        let metrics = api_get(api, "/metrics", None).await.1;
        assert!(sample(&metrics, "anytls_fallback_connections_total{result=\"relayed\"}") >= 23.0, "{metrics}");
        assert!(sample(&metrics, "anytls_auth_failures_total{reason=\"invalid\"}") >= 23.0, "{metrics}");
        let log = server.process.log();
        let above_debug: Vec<_> =
            log.lines().filter(|l| l.contains("[INFO] 127.0.0.1:") || l.contains("[WARN] 127.0.0.1:")).collect();
        let (failed_logins, noisy): (Vec<_>, Vec<_>) =
            above_debug.into_iter().partition(|l| l.contains(": authentication failed"));
        assert!(noisy.is_empty(), "per-connection lines above DEBUG:\n{}", noisy.join("\n"));
        assert!(
            failed_logins.len() <= 1,
            "failed logins from one source, more than one line:\n{}",
            failed_logins.join("\n")
        );
    })
    .await;
}

/// A fallback site that is down: the same silent close as without `--fallback`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fallback_site_that_is_down_means_a_silent_close() {
    bounded(Duration::from_secs(60), "fallback down", async {
        let down = closed_port_addr();
        let server = server_with_fallback(down, &["--handshake-timeout-secs", "4"]).await;
        let mut tls = tls_from(loopback(1), server.addr).await.unwrap();
        let started = Instant::now();
        tls.write_all(b"GET / HTTP/1.1\r\nHost: www.example.test\r\n\r\n").await.unwrap();
        let (got, closed) = read_until_closed(&mut tls, Duration::from_secs(6)).await;
        let took = started.elapsed();
        assert!(closed && got.is_empty(), "closed {closed}, answered {got:?}");
        assert!(took < Duration::from_secs(5), "closed after {took:?}");
        assert!(server.process.log_shows("unreachable", Duration::from_secs(2)).await, "{}", server.process.log());
    })
    .await;
}

/// Our client with a wrong password, against a server with `--fallback`: its
/// authentication goes to the site like any probe's, and the user still gets a quick
/// failure that names the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_with_a_wrong_password_still_fails_fast_and_says_why() {
    bounded(Duration::from_secs(60), "wrong password with --fallback", async {
        let site = Site::start().await;
        let server = server_with_fallback(site.addr, &[]).await;
        let pin = server.fingerprint.clone().unwrap();
        let client = start_client(server.addr, "not-the-password", &["--pin-sha256", &pin]).await;
        let echo = spawn_echo().await;
        let started = Instant::now();
        let (code, _tcp) = socks5_connect(client.addr, "127.0.0.1", echo.port()).await.unwrap();
        assert_eq!(code, SOCKS5_GENERAL, "reply code for a wrong password");
        assert!(started.elapsed() < Duration::from_secs(5), "failure took {:?}", started.elapsed());
        assert!(
            client.process.log_shows("wrong password", Duration::from_secs(5)).await,
            "client log should mention the password:\n{}",
            client.process.log()
        );
        assert!(site.connections() >= 1, "the wrong password did not reach the site");
    })
    .await;
}

/// Relays to the site are capped (`--max-fallback-connections`): one more gets the
/// silent close, and a place freed is taken again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_relays_are_capped() {
    bounded(Duration::from_secs(60), "fallback cap", async {
        let site = Site::start().await;
        let server = server_with_fallback(site.addr, &["--max-fallback-connections", "2"]).await;
        // Two relays held open: requests the site waits to see the end of.
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut tls = tls_from(loopback(1), server.addr).await.unwrap();
            tls.write_all(b"GET / HTTP/1.1\r\nHost: www.example.test\r\n").await.unwrap();
            held.push(tls);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while site.connections() < 2 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(site.connections(), 2);
        let mut third = tls_from(loopback(1), server.addr).await.unwrap();
        third.write_all(b"GET / HTTP/1.1\r\nHost: www.example.test\r\n\r\n").await.unwrap();
        let (got, closed) = read_until_closed(&mut third, Duration::from_secs(5)).await;
        assert!(closed && got.is_empty(), "over the cap: closed {closed}, answered {got:?}");
        assert_eq!(site.connections(), 2, "the third reached the site");
        // Finishing one request frees its place.
        let mut first = held.remove(0);
        first.write_all(b"\r\n").await.unwrap();
        let (page, closed) = read_until_closed(&mut first, Duration::from_secs(5)).await;
        assert!(closed && String::from_utf8_lossy(&page).contains(MARKER), "the site's close ends the relay");
        let page = get_page(loopback(1), server.addr).await.unwrap();
        assert!(String::from_utf8_lossy(&page).contains(MARKER), "a freed place was not taken again");
    })
    .await;
}

/// Without `--fallback`, a wrong password is not closed right after its 34th byte: the
/// server reads on for a random time (0.3 to 1.5 s) and then closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_fallback_a_wrong_password_is_not_closed_at_byte_34() {
    bounded(Duration::from_secs(60), "no byte-34 close", async {
        let server = start_server(PASSWORD, &["--handshake-timeout-secs", "10"]).await;
        let mut closes = Vec::new();
        for attempt in 0..3 {
            let mut tls = tls_from(loopback(1), server.addr).await.unwrap();
            let mut block = BytesMut::new();
            encode_auth_block(&PasswordHash::of(&format!("guess-{attempt}")), 0, &mut block);
            let started = Instant::now();
            tls.write_all(&block).await.unwrap();
            // It keeps reading: more bytes go in without a reset.
            tokio::time::sleep(Duration::from_millis(100)).await;
            tls.write_all(&payload(8 * 1024, attempt)).await.unwrap();
            let (got, closed) = read_until_closed(&mut tls, Duration::from_secs(5)).await;
            let took = started.elapsed();
            assert!(closed && got.is_empty(), "closed {closed}, answered {got:?}");
            assert!(took >= Duration::from_millis(250), "closed after {took:?}, right after the block");
            closes.push(took);
        }
        announce(&format!("NOTE wrong password without --fallback: closed after {closes:.2?}"));
        assert!(server.process.log_shows("wrong password", Duration::from_secs(1)).await);
    })
    .await;
}

/// A real browser opening the server's port sees the site's page, over HTTP/1.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_browser_sees_the_site() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    if let Some(why) = browser_missing(&dir) {
        assert!(std::env::var("ANYTLS_REQUIRE_BROWSER").as_deref() != Ok("1"), "browser check required: {why}");
        announce(&format!("SKIP fallback browser check: {why}"));
        return;
    }
    bounded(Duration::from_secs(120), "browser through the fallback", async {
        let site = Site::start().await;
        let server = server_with_fallback(site.addr, &[]).await;
        let output = tokio::process::Command::new("node")
            .arg(dir.join("check-fallback.mjs"))
            .arg(format!("https://127.0.0.1:{}/", server.addr.port()))
            .arg(MARKER)
            .current_dir(&dir)
            .kill_on_drop(true)
            .output()
            .await
            .expect("run node");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "browser check failed:\n{stdout}\n{stderr}");
        assert!(site.visits().iter().any(|v| v.bytes.starts_with(b"GET / HTTP/1.1")), "the site saw no GET /");
        announce(&format!("fallback browser check: {}", stdout.lines().last().unwrap_or_default()));
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// AnyTLS clients during a probe storm

/// sing-box's, mihomo's or the crates.io client (scripts/peers/) with its proxy on
/// `port`, if scripts/install-peers.sh installed it; `None` after a SKIP line otherwise.
async fn start_peer_client_on(
    name: &str,
    key: &str,
    script: &str,
    server: SocketAddr,
    dir: &TempDir,
    port: u16,
) -> Option<Process> {
    let peers = std::env::var_os("ANYTLS_PEERS_DIR").map(std::path::PathBuf::from).unwrap_or_else(|| {
        std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/anytls-rs/peers")
    });
    let listed = std::fs::read_to_string(peers.join("peers.env")).unwrap_or_default();
    let binary = std::env::var(key).ok().filter(|v| !v.is_empty()).or_else(|| {
        listed.lines().find_map(|line| line.strip_prefix(&format!("{key}=")).map(|v| v.trim().to_string()))
    });
    let Some(binary) = binary.filter(|path| std::path::Path::new(path).is_file()) else {
        assert!(
            std::env::var("ANYTLS_REQUIRE_PEERS").as_deref() != Ok("1"),
            "{name} required but not installed (scripts/install-peers.sh)"
        );
        announce(&format!("SKIP probe storm with {name}: not installed (scripts/install-peers.sh)"));
        return None;
    };
    let mut command = std::process::Command::new("bash");
    command
        .arg(format!("{}/scripts/peers/{script}", env!("CARGO_MANIFEST_DIR")))
        .args([port.to_string(), server.port().to_string(), PASSWORD.to_string()])
        .env(key, binary);
    if script != "anytls-crate-client.sh" {
        command.arg(dir.path().join(name));
    }
    let mut process = Process::spawn(name, command);
    wait_port(&mut process, port, STARTUP_TIMEOUT).await;
    Some(process)
}

/// Our client, sing-box's, mihomo's and the crates.io one keep working on the server's port while 1,000
/// fallback connections (from eight other source addresses) come and go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_keep_working_during_a_storm_of_fallback_connections() {
    bounded(Duration::from_secs(300), "probe storm", async {
        let site = Site::start().await;
        let server = server_with_fallback(site.addr, &[]).await;
        let pin = server.fingerprint.clone().expect("self-signed fingerprint");
        let ours = start_client(server.addr, PASSWORD, &["--pin-sha256", &pin]).await;
        let dir = TempDir::new("probe-storm");
        let mut proxies = vec![("our client".to_string(), ours.addr)];
        let mut peers = Vec::new();
        for (name, key, script) in [
            ("sing-box", "SING_BOX", "singbox-client.sh"),
            ("mihomo", "MIHOMO", "mihomo-client.sh"),
            // Sends its authentication as three TLS records (see src/server/fallback.rs).
            ("anytls-crate", "ANYTLS_PEER_CLIENT", "anytls-crate-client.sh"),
        ] {
            let port = free_port();
            if let Some(process) = start_peer_client_on(name, key, script, server.addr, &dir, port).await {
                peers.push(process);
                proxies.push((name.to_string(), SocketAddr::from(([127, 0, 0, 1], port))));
            }
        }
        let echo = spawn_echo().await;
        for (name, proxy) in &proxies {
            let tcp = bounded(Duration::from_secs(20), name, socks5_open(*proxy, echo)).await;
            echo_roundtrip(tcp, format!("before the storm via {name}").as_bytes()).await;
        }

        // Each client echoes in a loop while the storm runs; every round must succeed.
        let storm_over = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut users = tokio::task::JoinSet::new();
        for (index, (name, proxy)) in proxies.iter().cloned().enumerate() {
            let storm_over = storm_over.clone();
            users.spawn(async move {
                let mut rounds = 0u64;
                while !storm_over.load(Ordering::Relaxed) {
                    let tcp = socks5_open(proxy, echo).await;
                    echo_roundtrip(tcp, &payload(16 * 1024, index as u64 * 1000 + rounds)).await;
                    rounds += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                (name, rounds)
            });
        }

        const STORM: u64 = 1000;
        let cpu_before = cpu_seconds(server.process.pid());
        let started = Instant::now();
        let next = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let mut storm = tokio::task::JoinSet::new();
        for worker in 0..32u8 {
            let (next, failures) = (next.clone(), failures.clone());
            let server = server.addr;
            storm.spawn(async move {
                let source = loopback(2 + worker % 8);
                while next.fetch_add(1, Ordering::Relaxed) < STORM {
                    match get_page(source, server).await {
                        Ok(page) if String::from_utf8_lossy(&page).contains(MARKER) => {}
                        Ok(page) => failures.lock().unwrap().push(format!("{source}: {page:?}")),
                        Err(err) => failures.lock().unwrap().push(format!("{source}: {err}")),
                    }
                }
            });
        }
        while let Some(done) = storm.join_next().await {
            done.unwrap();
        }
        let wall = started.elapsed();
        let cpu = cpu_seconds(server.process.pid()) - cpu_before;
        storm_over.store(true, Ordering::Relaxed);
        let mut rounds = Vec::new();
        while let Some(done) = users.join_next().await {
            rounds.push(done.expect("a client's echo failed during the storm"));
        }
        let failures = failures.lock().unwrap().clone();
        assert!(
            failures.is_empty(),
            "{} of {STORM} probes did not get the page: {:?}",
            failures.len(),
            &failures[..failures.len().min(5)]
        );
        assert!(site.connections() >= STORM, "the site saw {} connections", site.connections());
        for (name, n) in &rounds {
            assert!(*n >= 1, "{name} made no echo round during the storm");
        }
        announce(&format!(
            "NOTE probe storm: {STORM} fallback page loads in {:.2} s ({:.0}/s), server CPU {cpu:.2} s ({:.2} ms per \
             probe, echo traffic included); echo rounds meanwhile: {rounds:?}",
            wall.as_secs_f64(),
            STORM as f64 / wall.as_secs_f64(),
            cpu * 1e3 / STORM as f64
        ));
        for (name, proxy) in &proxies {
            echo_roundtrip(socks5_open(*proxy, echo).await, format!("after the storm via {name}").as_bytes()).await;
        }
        drop(peers);
    })
    .await;
}
