//! Interop with third-party AnyTLS implementations (docs/interop-peers.md): sing-box,
//! mihomo and the crates.io `anytls` crate, each as client against our server and as
//! server for our client, started through `scripts/peers/*.sh`.
//!
//! The peers come from `scripts/install-peers.sh` (`$ANYTLS_PEERS_DIR/peers.env`, default
//! `~/.cache/anytls-rs/peers/peers.env`; variables already in the environment win). A
//! missing peer prints `SKIP interop <peer>: <reason>` and the test passes, unless
//! `ANYTLS_REQUIRE_PEERS=1`.
//!
//! Every pairing runs the same checks through the client's local port: three sequential
//! HTTP requests with curl (session reuse, checked in our side's log), a 4 MiB download
//! (curl) and a 4 MiB echo (SOCKS5), both digest-checked, and a dial to a closed port.
//! Known deviations of the crate peer are expected outcomes, printed as `NOTE` lines.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::*;

const BIG: usize = 4 * 1024 * 1024;
/// Bound for one check (a curl run, an echo, a refused dial).
const STEP_LIMIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------
// Finding the peers

fn peers_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("ANYTLS_PEERS_DIR") {
        return PathBuf::from(dir);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache"));
    cache.join("anytls-rs").join("peers")
}

fn peers_required() -> bool {
    std::env::var("ANYTLS_REQUIRE_PEERS").is_ok_and(|v| v == "1")
}

/// Reports a missing peer: a failure with `ANYTLS_REQUIRE_PEERS=1`, a SKIP line otherwise.
fn skip(peer: &str, reason: &str) {
    if peers_required() {
        panic!("interop {peer}: required (ANYTLS_REQUIRE_PEERS=1) but {reason}");
    }
    announce(&format!("SKIP interop {peer}: {reason}"));
}

/// The peer's binaries (`KEY=path`, for the helper scripts), from the environment or
/// peers.env; `None` (after a SKIP line) when one is missing.
fn peer_binaries(peer: &str, keys: &[&str]) -> Option<Vec<(String, PathBuf)>> {
    let env_file = peers_dir().join("peers.env");
    let listed: HashMap<String, String> = std::fs::read_to_string(&env_file)
        .unwrap_or_default()
        .lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .filter_map(|line| line.split_once('=').map(|(k, v)| (k.trim().to_string(), v.trim().to_string())))
        .collect();
    let mut found = Vec::new();
    for key in keys {
        let Some(path) = std::env::var(key).ok().filter(|v| !v.is_empty()).or_else(|| listed.get(*key).cloned()) else {
            let why = if env_file.exists() {
                format!("{key} is not in {} (run scripts/install-peers.sh)", env_file.display())
            } else {
                format!("{} not found (run scripts/install-peers.sh)", env_file.display())
            };
            skip(peer, &why);
            return None;
        };
        let path = PathBuf::from(path);
        if !is_executable(&path) {
            skip(peer, &format!("{key}={} is not an executable file", path.display()));
            return None;
        }
        found.push((key.to_string(), path));
    }
    if !have_bash() {
        skip(peer, "bash is needed for scripts/peers/*.sh");
        return None;
    }
    Some(found)
}

fn is_executable(path: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn have_bash() -> bool {
    Command::new("bash").arg("-c").arg("true").status().is_ok_and(|s| s.success())
}

/// `bash scripts/peers/<script> ARGS…` with the peer's binaries in its environment.
fn peer_command(script: &str, binaries: &[(String, PathBuf)], args: &[String]) -> Command {
    let mut command = Command::new("bash");
    command.arg(format!("{}/scripts/peers/{script}", env!("CARGO_MANIFEST_DIR"))).args(args);
    for (key, path) in binaries {
        command.env(key, path);
    }
    command
}

/// Starts a peer through its helper script and waits until `port` listens.
async fn start_peer(name: &str, script: &str, binaries: &[(String, PathBuf)], args: &[String], port: u16) -> Process {
    let mut process = Process::spawn(name, peer_command(script, binaries, args));
    wait_port(&mut process, port, STARTUP_TIMEOUT).await;
    process
}

// ---------------------------------------------------------------------------------------
// The checks

/// Outcome of each check, in order: (name, Ok(detail) | Err(why)).
#[derive(Default)]
struct Report(Vec<(&'static str, Result<String, String>)>);

impl Report {
    fn record(&mut self, check: &'static str, outcome: Result<String, String>) {
        match &outcome {
            Ok(detail) => eprintln!("  ok   {check}: {detail}"),
            Err(why) => eprintln!("  FAIL {check}: {why}"),
        }
        self.0.push((check, outcome));
    }

    /// Every check passed, except known deviations: (check, texts one of which its failure
    /// must contain, why). A known deviation may also pass (several are races); either way a
    /// NOTE line says what happened. A failure not matching the expected text fails.
    fn assert_passed(&self, pairing: &str, known: &[(&str, &[&str], &str)]) {
        let mut unexpected = Vec::new();
        for (check, outcome) in &self.0 {
            let deviation = known.iter().find(|(name, _, _)| name == check);
            match (outcome, deviation) {
                (Ok(_), Some((_, _, why))) => announce(&format!(
                    "NOTE interop {pairing}: {check}: passed this time (known deviation, racy: {why})"
                )),
                (Err(err), Some((_, expected, why))) if expected.iter().any(|text| err.contains(text)) => announce(
                    &format!("NOTE interop {pairing}: {check}: failed as expected (known deviation: {why}): {err}"),
                ),
                (Err(err), _) => unexpected.push(format!("{check}: {err}")),
                (Ok(_), None) => {}
            }
        }
        assert!(unexpected.is_empty(), "interop {pairing}: {}", unexpected.join("; "));
    }
}

/// Which side is ours, for the session-reuse check and for waiting between requests.
enum Ours<'a> {
    /// Our server: stream ids ≥ 2 in its log show reuse.
    Server(&'a Server),
    /// Our client: waits for each connection to finish (so the session is idle again),
    /// and stream ids ≥ 2 in its log show reuse.
    Client(&'a Client),
}

/// Runs the standard checks through the local proxy port `proxy`.
async fn run_checks(proxy: SocketAddr, ours: Ours<'_>) -> Report {
    let mut report = Report::default();
    let (http, _) = spawn_http().await;
    let echo = spawn_echo().await;

    // 1. Three sequential requests, on one session if the client reuses it.
    let mut sequential = Ok(String::new());
    for i in 1..=3 {
        let path = format!("/sequential-{i}");
        if let Err(why) = http_get(proxy, http, &path).await {
            sequential = Err(format!("request {i}: {why}"));
            break;
        }
        match &ours {
            Ours::Client(client) => {
                if !client.process.wait_lines(CLIENT_DONE_LINES, i, Duration::from_secs(10)).await {
                    sequential = Err(format!("request {i}: our client did not finish the connection"));
                    break;
                }
            }
            // The peer closes its stream on its own time; give it a moment so it can
            // put the session back before the next request.
            Ours::Server(_) => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    }
    report.record("3 sequential requests", sequential.map(|_| "bodies match".into()));

    let reuse = match &ours {
        Ours::Server(server) => {
            // Logged as the stream opens, but read from the pipe by a thread: allow a moment.
            let reused = server.process.wait_lines(&["stream 2 ->"], 1, Duration::from_secs(5)).await;
            let log = server.process.log();
            let sessions = count_lines(&log, "session open");
            if reused {
                Ok(format!("our server saw stream ids up to {}, {sessions} session(s)", highest_stream(&log, " ->")))
            } else {
                Err(format!("our server never saw stream 2 ({sessions} session(s))"))
            }
        }
        Ours::Client(client) => {
            let reused = client.process.wait_lines(&["stream 2 open"], 1, Duration::from_secs(5)).await;
            let log = client.process.log();
            if reused {
                Ok(format!("our client opened stream ids up to {}", highest_stream(&log, " open")))
            } else {
                Err("our client never opened stream 2 on a session".into())
            }
        }
    };
    report.record("session reuse", reuse);

    // 2. 4 MiB each way.
    let path = format!("/bytes/{BIG}");
    let download = http_get(proxy, http, &path).await.and_then(|body| {
        let expected = http_body_for(&path);
        if sha256_hex(&body) == sha256_hex(&expected) {
            Ok(format!("{} bytes, digest ok", body.len()))
        } else {
            Err(format!("{} bytes received, digest differs", body.len()))
        }
    });
    report.record("4 MiB download", download);
    report.record("4 MiB echo", try_echo(proxy, echo, &payload(BIG, 44)).await);

    // 3. A dial to a closed port, then a request that must still work.
    let refused = match (try_refused(proxy).await, &ours) {
        // Our client must map the server's refusal to SOCKS5 code 5.
        (Ok(code), Ours::Client(_)) if code != SOCKS5_REFUSED => {
            Err(format!("our client answered SOCKS5 code {code}, expected {SOCKS5_REFUSED} (connection refused)"))
        }
        (Ok(SOCKS5_OK), _) => Ok("SOCKS5 success, then EOF without data".to_string()),
        (Ok(code), _) => Ok(format!("SOCKS5 reply code {code}")),
        (Err(why), _) => Err(why),
    };
    report.record("refused dial", refused);
    report.record("request after refusal", http_get(proxy, http, "/after").await.map(|_| "body matches".into()));
    report
}

/// The highest `stream N<suffix>` id in `log`.
fn highest_stream(log: &str, suffix: &str) -> u32 {
    log.lines()
        .filter_map(|line| {
            let rest = line.split("stream ").nth(1)?;
            let (id, after) = rest.split_once(' ')?;
            format!(" {after}").starts_with(suffix).then(|| id.parse().ok()).flatten()
        })
        .max()
        .unwrap_or(0)
}

/// GET `http://TARGET/path` through the proxy (curl with --socks5-hostname, or our own
/// SOCKS5 client when curl is missing); the body, checked against the target's.
async fn http_get(proxy: SocketAddr, target: SocketAddr, path: &str) -> Result<Vec<u8>, String> {
    let url = format!("http://{target}{path}");
    let body = if have_curl() {
        let fetched = tokio::time::timeout(STEP_LIMIT, curl_socks5(proxy, &url)).await;
        let (code, body, stderr) = fetched.map_err(|_| format!("curl {url}: no answer in {STEP_LIMIT:?}"))?;
        if code != 0 {
            return Err(format!("curl {url} exited {code}: {}", stderr.trim()));
        }
        body
    } else {
        let fetched = tokio::time::timeout(STEP_LIMIT, async {
            let (code, mut tcp) = socks5_connect(proxy, &target.ip().to_string(), target.port())
                .await
                .map_err(|err| format!("SOCKS5: {err}"))?;
            if code != SOCKS5_OK {
                return Err(format!("SOCKS5 reply code {code}"));
            }
            let request = format!("GET {path} HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n");
            tcp.write_all(request.as_bytes()).await.map_err(|err| err.to_string())?;
            let mut raw = Vec::new();
            tcp.read_to_end(&mut raw).await.map_err(|err| err.to_string())?;
            Ok(split_http_response(&raw).1)
        });
        fetched.await.map_err(|_| format!("GET {url}: no answer in {STEP_LIMIT:?}"))??
    };
    if body != http_body_for(path) {
        return Err(format!("GET {url}: body of {} bytes is not what the target sent", body.len()));
    }
    Ok(body)
}

/// Echoes `data` through the proxy; Ok when the same bytes come back.
async fn try_echo(proxy: SocketAddr, echo: SocketAddr, data: &[u8]) -> Result<String, String> {
    let attempt = async {
        let (code, tcp) =
            socks5_connect(proxy, &echo.ip().to_string(), echo.port()).await.map_err(|err| format!("SOCKS5: {err}"))?;
        if code != SOCKS5_OK {
            return Err(format!("SOCKS5 reply code {code}"));
        }
        let (mut reader, mut writer) = tcp.into_split();
        let send = writer.write_all(data);
        let receive = async {
            let mut out = vec![0u8; data.len()];
            reader.read_exact(&mut out).await.map(|_| out)
        };
        let (sent, received) = tokio::join!(send, receive);
        sent.map_err(|err| format!("send: {err}"))?;
        let received = received.map_err(|err| format!("receive: {err}"))?;
        if sha256_hex(&received) != sha256_hex(data) {
            return Err("echoed bytes differ".into());
        }
        Ok(format!("{} bytes, digest ok", data.len()))
    };
    tokio::time::timeout(STEP_LIMIT, attempt).await.unwrap_or_else(|_| Err(format!("no echo in {STEP_LIMIT:?}")))
}

/// SOCKS5 CONNECT to a closed loopback port: the reply code, where 0 means the proxy
/// answered success and then closed without data (clients that answer before the
/// server does). Data from a closed port, or no answer, is an error.
async fn try_refused(proxy: SocketAddr) -> Result<u8, String> {
    let closed = closed_port_addr();
    let attempt = async {
        let (code, mut tcp) =
            socks5_connect(proxy, "127.0.0.1", closed.port()).await.map_err(|err| format!("SOCKS5: {err}"))?;
        if code != SOCKS5_OK {
            return Ok(code);
        }
        let mut buf = [0u8; 64];
        match tcp.read(&mut buf).await {
            Ok(0) | Err(_) => Ok(SOCKS5_OK),
            Ok(n) => Err(format!("reply 0 and {n} bytes from a closed port")),
        }
    };
    tokio::time::timeout(STEP_LIMIT, attempt).await.unwrap_or_else(|_| Err(format!("no answer in {STEP_LIMIT:?}")))
}

// ---------------------------------------------------------------------------------------
// Pairings

/// A peer's client (mixed port) against our server (self-signed; peers do not verify).
async fn peer_client_to_our_server(
    pairing: &str,
    script: &str,
    binaries: &[(String, PathBuf)],
    workdir: bool,
    server_args: &[&str],
) -> Report {
    let server = start_server(PASSWORD, server_args).await;
    let dir = TempDir::new(script.trim_end_matches(".sh"));
    let socks_port = free_port();
    let mut args = vec![socks_port.to_string(), server.addr.port().to_string(), PASSWORD.to_string()];
    if workdir {
        args.push(dir.path().display().to_string());
    }
    let _peer = start_peer(pairing, script, binaries, &args, socks_port).await;
    eprintln!("interop {pairing}:");
    run_checks(SocketAddr::from(([127, 0, 0, 1], socks_port)), Ours::Server(&server)).await
}

/// Our client (trusting a private CA) against a peer's server with a certificate that CA
/// signed.
async fn our_client_to_peer_server(
    pairing: &str,
    script: &str,
    binaries: &[(String, PathBuf)],
    workdir: bool,
) -> Report {
    let dir = TempDir::new(script.trim_end_matches(".sh"));
    let pki = TestPki::write_to(dir.path());
    let port = free_port();
    let mut args = vec![
        port.to_string(),
        PASSWORD.to_string(),
        pki.server_cert.display().to_string(),
        pki.server_key.display().to_string(),
    ];
    if workdir {
        args.push(dir.path().join("home").display().to_string());
    }
    let _peer = start_peer(pairing, script, binaries, &args, port).await;
    let client = start_our_client_for_peer(port, &pki).await;
    eprintln!("interop {pairing}:");
    run_checks(client.addr, Ours::Client(&client)).await
}

async fn start_our_client_for_peer(port: u16, pki: &TestPki) -> Client {
    let ca = pki.ca_cert.display().to_string();
    start_client(SocketAddr::from(([127, 0, 0, 1], port)), PASSWORD, &["--ca", &ca, "--sni", "localhost"]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn singbox_client_to_our_server() {
    let Some(binaries) = peer_binaries("sing-box", &["SING_BOX"]) else { return };
    let pairing = "sing-box client -> our server";
    bounded(Duration::from_secs(180), pairing, async {
        let report = peer_client_to_our_server(pairing, "singbox-client.sh", &binaries, true, &[]).await;
        report.assert_passed(pairing, &[]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mihomo_client_to_our_server() {
    let Some(binaries) = peer_binaries("mihomo", &["MIHOMO"]) else { return };
    let pairing = "mihomo client -> our server";
    bounded(Duration::from_secs(180), pairing, async {
        let report = peer_client_to_our_server(pairing, "mihomo-client.sh", &binaries, true, &[]).await;
        report.assert_passed(pairing, &[]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_to_singbox_server() {
    let Some(binaries) = peer_binaries("sing-box", &["SING_BOX"]) else { return };
    let pairing = "our client -> sing-box server";
    bounded(Duration::from_secs(180), pairing, async {
        let report = our_client_to_peer_server(pairing, "singbox-server.sh", &binaries, true).await;
        report.assert_passed(pairing, &[]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_to_mihomo_server() {
    let Some(binaries) = peer_binaries("mihomo", &["MIHOMO"]) else { return };
    let pairing = "our client -> mihomo server";
    bounded(Duration::from_secs(180), pairing, async {
        let report = our_client_to_peer_server(pairing, "mihomo-server.sh", &binaries, true).await;
        report.assert_passed(
            pairing,
            &[(
                "refused dial",
                &["answered SOCKS5 code 0"],
                "mihomo's server answers SYNACK before its dial has finished, so a refused dial reaches our \
                 client as an opened stream that ends (FIN, a few seconds later) without data: SOCKS5 success, then EOF",
            )],
        );
    })
    .await;
}

/// How the crates.io client (0.5.3) departs from the contract, seen against our server.
const CRATE_CLIENT_DEVIATIONS: &[(&str, &[&str], &str)] = &[
    (
        "4 MiB download",
        &["curl: (18)"],
        "the crate client (0.5.3) cuts large responses short (curl (18) 'transfer closed with N bytes \
                     remaining'); crate client -> crate server does the same, probably the PUSH limit below",
    ),
    (
        "4 MiB echo",
        &["receive:", "send:"],
        "the crate client (0.5.3) closes a stream whose inbound PUSH queue fills ('inbound PUSH limit \
                     reached; closing stream' in its debug log) instead of applying backpressure, so a fast download \
                     is cut off (early EOF or reset)",
    ),
    (
        "refused dial",
        &["SOCKS5: early eof"],
        "the crate client (0.5.3) answers SOCKS5 only once it has opened its stream, and closes the \
                     connection without a reply when the session it took from its pool cannot open one (seen once \
                     in CI, after the echo above was cut off; not in 12 runs here); the request after it must still work",
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crate_client_to_our_server() {
    let Some(binaries) = peer_binaries("anytls (crates.io)", &["ANYTLS_PEER_CLIENT"]) else { return };
    let pairing = "crate anytls client -> our server";
    bounded(Duration::from_secs(180), pairing, async {
        let report = peer_client_to_our_server(pairing, "anytls-crate-client.sh", &binaries, false, &[]).await;
        announce(&format!(
            "NOTE interop {pairing}: the crate client splits its authentication block over 3 TLS records \
             (docs/protocol.md §1, rejected by sing-box and mihomo servers); our server reassembles it, so requests work"
        ));
        report.assert_passed(pairing, CRATE_CLIENT_DEVIATIONS);
    })
    .await;
}

/// A downlink scheme meant to break frame reassembly: records of 1 byte (frame headers
/// cut apart), pure-padding records and full-size ones, for ten writes.
const AGGRESSIVE_DOWNLINK: &str = "stop=10
0=1-1,1-1,1-1,2-2,3-3,1000-2000,c,1000-2000
1=1-1,5-5,3000-8000,c,8000-16000
2=16000-16000,16000-16000,c,200-300
3=7-7,7-7,7-7,c,100-200
4=500-1000
5=1-1,c,50-100
6=300-400,300-400
7=16000-16000
8=1-1
9=2-2,c,3-3";

/// The peer's client against our server padding its downlink, with the built-in scheme and
/// with [`AGGRESSIVE_DOWNLINK`]: every check passes as it does without.
async fn peer_client_with_downlink_padding(
    pairing: &str,
    script: &str,
    binaries: &[(String, PathBuf)],
    workdir: bool,
    known: &[(&str, &[&str], &str)],
) {
    let dir = TempDir::new("downlink-scheme");
    let aggressive = dir.path().join("aggressive.scheme");
    std::fs::write(&aggressive, AGGRESSIVE_DOWNLINK).unwrap();
    for (label, scheme) in [("built-in", "default"), ("aggressive", aggressive.to_str().unwrap())] {
        let pairing = format!("{pairing}, downlink padding {label}");
        let args = ["--downlink-padding-scheme", scheme];
        let report = peer_client_to_our_server(&pairing, script, binaries, workdir, &args).await;
        report.assert_passed(&pairing, known);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn singbox_client_to_our_server_padding_its_downlink() {
    let Some(binaries) = peer_binaries("sing-box", &["SING_BOX"]) else { return };
    let pairing = "sing-box client -> our server";
    bounded(Duration::from_secs(300), pairing, async {
        peer_client_with_downlink_padding(pairing, "singbox-client.sh", &binaries, true, &[]).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mihomo_client_to_our_server_padding_its_downlink() {
    let Some(binaries) = peer_binaries("mihomo", &["MIHOMO"]) else { return };
    let pairing = "mihomo client -> our server";
    bounded(Duration::from_secs(300), pairing, async {
        peer_client_with_downlink_padding(pairing, "mihomo-client.sh", &binaries, true, &[]).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crate_client_to_our_server_padding_its_downlink() {
    let Some(binaries) = peer_binaries("anytls (crates.io)", &["ANYTLS_PEER_CLIENT"]) else { return };
    let pairing = "crate anytls client -> our server";
    bounded(Duration::from_secs(300), pairing, async {
        let script = "anytls-crate-client.sh";
        peer_client_with_downlink_padding(pairing, script, &binaries, false, CRATE_CLIENT_DEVIATIONS).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_to_our_server_padding_its_downlink_aggressively() {
    bounded(Duration::from_secs(120), "our client -> our server, aggressive downlink", async {
        let dir = TempDir::new("downlink-ours");
        let aggressive = dir.path().join("aggressive.scheme");
        std::fs::write(&aggressive, AGGRESSIVE_DOWNLINK).unwrap();
        let server = start_server(PASSWORD, &["--downlink-padding-scheme", aggressive.to_str().unwrap()]).await;
        let pin = server.fingerprint.clone().expect("self-signed");
        let client = start_client(server.addr, PASSWORD, &["--pin-sha256", &pin]).await;
        let echo = spawn_echo().await;
        for round in 0..3 {
            echo_roundtrip(socks5_open(client.addr, echo).await, &payload(BIG, round)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_to_crate_server() {
    let Some(binaries) = peer_binaries("anytls (crates.io)", &["ANYTLS_PEER_SERVER"]) else { return };
    let pairing = "our client -> crate anytls server";
    bounded(Duration::from_secs(180), pairing, async {
        let report = our_client_to_peer_server(pairing, "anytls-crate-server.sh", &binaries, false).await;
        announce(&format!(
            "NOTE interop {pairing}: the crate server allows one stream per session until the client FINs it \
             (docs/protocol.md §9, pitfall 6); like the reference client, ours does not answer the server's FIN with a FIN \
             (docs/protocol.md §2), so the crate server refuses the next stream on that session"
        ));
        let one_stream = "the crate server (0.5.3) frees a session's single stream slot only on the client's FIN, \
             which docs/protocol.md §2 says a FIN is not answered with; it refuses the next stream ('session stream \
             limit reached'), so our client answers that request with SOCKS5 code 1";
        let refused: &[&str] = &["Can't complete SOCKS5 connection", "code 1", "never opened stream 2"];
        report.assert_passed(
            pairing,
            &[
                ("3 sequential requests", refused, one_stream),
                ("session reuse", refused, one_stream),
                ("4 MiB download", refused, one_stream),
                ("4 MiB echo", &["receive:", "send:", "code 1"], one_stream),
                ("refused dial", refused, one_stream),
                ("request after refusal", refused, one_stream),
            ],
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// FIN semantics with reference peers: FIN ends the whole stream and is not answered

/// Reference clients do not answer the server's FIN with a FIN (docs/protocol.md §2). Our server
/// must retire such a stream at its own FIN; otherwise it would stay open until the
/// session ends and count against --max-streams-per-session, and once the limit is
/// reached every new stream on that session would be refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_retires_streams_that_reference_clients_never_fin() {
    let Some(binaries) = peer_binaries("sing-box", &["SING_BOX"]) else { return };
    bounded(Duration::from_secs(120), "stream limit with sing-box client", async {
        let server = start_server(PASSWORD, &["--max-streams-per-session", "4"]).await;
        let dir = TempDir::new("singbox-client-limit");
        let socks_port = free_port();
        let args = [
            socks_port.to_string(),
            server.addr.port().to_string(),
            PASSWORD.to_string(),
            dir.path().display().to_string(),
        ];
        let _peer = start_peer("sing-box client", "singbox-client.sh", &binaries, &args, socks_port).await;
        let proxy = SocketAddr::from(([127, 0, 0, 1], socks_port));
        let (http, _) = spawn_http().await;
        for i in 1..=8 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if let Err(why) = http_get(proxy, http, &format!("/limit-{i}")).await {
                panic!(
                    "request {i} of 8 (limit 4 streams per session) failed: {why}\nserver log:\n{}",
                    server.process.log()
                );
            }
        }
    })
    .await;
}

/// The mirror image in our client: when the local side closes first, our client sends
/// FIN; reference servers do not answer it, so the relay must end at our FIN and the
/// session go back to the pool, instead of being held until the server drops it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_releases_the_session_when_the_server_never_fins() {
    let Some(binaries) = peer_binaries("sing-box", &["SING_BOX"]) else { return };
    bounded(Duration::from_secs(120), "session release with sing-box server", async {
        let dir = TempDir::new("singbox-server-release");
        let pki = TestPki::write_to(dir.path());
        let port = free_port();
        let args = [
            port.to_string(),
            PASSWORD.to_string(),
            pki.server_cert.display().to_string(),
            pki.server_key.display().to_string(),
            dir.path().join("home").display().to_string(),
        ];
        let _peer = start_peer("sing-box server", "singbox-server.sh", &binaries, &args, port).await;
        let client = start_our_client_for_peer(port, &pki).await;
        let echo = spawn_echo().await;
        // We close first: read the echo, then drop the connection.
        echo_roundtrip(socks5_open(client.addr, echo).await, b"first").await;
        let released = client.process.wait_lines(CLIENT_DONE_LINES, 1, Duration::from_secs(10)).await;
        echo_roundtrip(socks5_open(client.addr, echo).await, b"second").await;
        // The log is read by a thread, so the line may trail the echo by a moment; a new
        // session would number its stream 1 again, so "stream 2" only ever means reuse.
        let reused = client.process.wait_lines(&["stream 2 open"], 1, Duration::from_secs(5)).await;
        let log = client.process.log();
        assert!(released, "the first connection never finished (session not released) in 10 s:\n{log}");
        assert!(reused, "the second request did not reuse the session:\n{log}");
    })
    .await;
}
