//! Helpers for the end-to-end tests: starting our binaries (and third-party peers) as
//! real processes on loopback, and, from the shared test kit (`tools/testkit`), a small
//! SOCKS5/SOCKS4a client, local targets (echo, half-close, bulk, HTTP) and digests.
//!
//! Every wait is bounded. Processes are killed when their handle is dropped, which also
//! happens when a test panics or its timeout fires; a failing test prints the logs of
//! the processes it started.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Longest wait for a process to say it is ready.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// The password our own pairs use.
pub const PASSWORD: &str = "e2e-secret";

/// Runs `test` with an upper bound, so that no test can hang the suite.
pub async fn bounded<T>(limit: Duration, what: &str, test: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, test).await {
        Ok(value) => value,
        Err(_) => panic!("{what}: did not finish within {limit:?}"),
    }
}

/// Prints a line to the real stderr, past the test harness's output capture, so that
/// SKIP and NOTE lines show up even for passing tests.
pub fn announce(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

// ---------------------------------------------------------------------------------------
// Processes

/// A child process whose stdout and stderr are collected line by line. Killed on drop.
pub struct Process {
    name: String,
    child: Child,
    log: Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
    _state: Option<TempDir>,
}

impl Process {
    /// Starts `command` with stdin closed and both output streams captured.
    pub fn spawn(name: &str, mut command: Command) -> Process {
        command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        // Our server keeps state (its self-signed certificate, users) in STATE_DIRECTORY
        // unless told otherwise: one of its own per process, so tests never share one.
        let state = if command.get_envs().any(|(key, _)| key == "STATE_DIRECTORY") {
            None
        } else {
            let dir = TempDir::new(&format!("state-{}", name.replace(['/', ' ', '(', ')'], "-")));
            command.env("STATE_DIRECTORY", dir.path());
            Some(dir)
        };
        let mut child = command.spawn().unwrap_or_else(|err| panic!("cannot start {name}: {err}"));
        let log = Arc::new(Mutex::new(String::new()));
        let stdout: Box<dyn Read + Send> = Box::new(child.stdout.take().expect("piped stdout"));
        let stderr: Box<dyn Read + Send> = Box::new(child.stderr.take().expect("piped stderr"));
        let mut readers = Vec::new();
        for pipe in [stdout, stderr] {
            let log = log.clone();
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    let mut log = log.lock().expect("log lock");
                    log.push_str(&line);
                    log.push('\n');
                }
            }));
        }
        Process { name: name.to_string(), child, log, readers, _state: state }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process printed so far.
    pub fn log(&self) -> String {
        self.log.lock().expect("log lock").clone()
    }

    /// Waits until `find` returns something for some printed line. Fails if the process
    /// exits first or nothing matches within `limit`.
    pub async fn wait_for<T>(&mut self, limit: Duration, what: &str, find: impl Fn(&str) -> Option<T>) -> T {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(found) = self.log().lines().find_map(&find) {
                return found;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                self.readers_done().await;
                if let Some(found) = self.log().lines().find_map(&find) {
                    return found;
                }
                panic!("{}: exited ({status}) before {what}; log:\n{}", self.name, self.log());
            }
            if Instant::now() >= deadline {
                panic!("{}: no {what} within {limit:?}; log:\n{}", self.name, self.log());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits until the log contains `needle`; true if it did within `limit`.
    pub async fn log_shows(&self, needle: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if self.log().contains(needle) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits until at least `n` lines contain any of `needles`; true if they did.
    pub async fn wait_lines(&self, needles: &[&str], n: usize, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            let log = self.log();
            if log.lines().filter(|line| needles.iter().any(|needle| line.contains(needle))).count() >= n {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits for the process to exit by itself, at most `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.readers_done().await;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// After an exit: lets the reader threads take in the last lines, so that `log` holds
    /// everything printed (bounded, in case a grandchild still holds a pipe open).
    async fn readers_done(&self) {
        let deadline = Instant::now() + Duration::from_secs(2);
        while !self.readers.iter().all(|reader| reader.is_finished()) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Sends signal `name` (`HUP`, `TERM`, …) with kill(1), which must succeed.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill").args([&format!("-{name}"), &self.pid().to_string()]).status();
        assert!(status.is_ok_and(|s| s.success()), "kill -{name} {}", self.name);
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "----- log of {} (pid {}) -----\n{}----- end of {} -----",
                self.name,
                self.child.id(),
                self.log(),
                self.name
            );
        }
    }
}

/// A unique, empty directory under the system temp dir; removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let unique = format!(
            "anytls-rs-{label}-{}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
        );
        let path = std::env::temp_dir().join(unique);
        std::fs::create_dir_all(&path).unwrap_or_else(|err| panic!("cannot create {}: {err}", path.display()));
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------
// Our binaries

/// Log filter for our binaries: our own DEBUG lines (stream ids, relay ends), INFO for
/// everything else (rustls at DEBUG is noisy).
pub const OUR_LOG_FILTER: &str = "info,anytls_rs=debug";

/// A running `anytls-server`.
pub struct Server {
    pub process: Process,
    pub addr: SocketAddr,
    /// The SHA-256 fingerprint it logged (self-signed certificate only).
    pub fingerprint: Option<String>,
}

/// Starts `anytls-server -l 127.0.0.1:0 -p PASSWORD ARGS…` and waits for its
/// `listening on ADDR` line: the real port comes from the log, so there is no port race.
pub async fn start_server(password: &str, extra_args: &[&str]) -> Server {
    let mut command = Command::new(env!("CARGO_BIN_EXE_anytls-server"));
    command.args(["-l", "127.0.0.1:0", "-p", password]).args(extra_args).env("RUST_LOG", OUR_LOG_FILTER);
    let mut process = Process::spawn("anytls-server", command);
    let addr = process.wait_for(STARTUP_TIMEOUT, "`listening on` line", |line| after_word(line, "listening on ")).await;
    let fingerprint = process.log().lines().find_map(|line| {
        let hex = line.split("SHA-256 fingerprint ").nth(1)?.trim();
        (hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit())).then(|| hex.to_string())
    });
    Server { process, addr, fingerprint }
}

/// A running `anytls-client`.
pub struct Client {
    pub process: Process,
    /// The local SOCKS5/SOCKS4/HTTP proxy port.
    pub addr: SocketAddr,
}

/// Starts `anytls-client -l 127.0.0.1:0 -s SERVER -p PASSWORD TRUST…` and waits for its
/// `proxy on ADDR` line.
pub async fn start_client(server: SocketAddr, password: &str, trust_args: &[&str]) -> Client {
    let mut command = Command::new(env!("CARGO_BIN_EXE_anytls-client"));
    command
        .args(["-l", "127.0.0.1:0", "-s", &server.to_string(), "-p", password])
        .args(trust_args)
        .env("RUST_LOG", OUR_LOG_FILTER);
    let mut process = Process::spawn("anytls-client", command);
    let addr = process.wait_for(STARTUP_TIMEOUT, "`proxy on` line", |line| after_word(line, "proxy on ")).await;
    Client { process, addr }
}

/// Lines our client logs (at DEBUG) once a local connection is fully done and its
/// session is back in the pool.
pub const CLIENT_DONE_LINES: &[&str] = &[" bytes up, ", "relay ended", "refused by the server"];

impl Client {
    /// Waits until `n` local connections have finished (sessions released), so that the
    /// next request finds the session idle and reuses it.
    pub async fn wait_done(&self, n: usize) {
        let done = self.process.wait_lines(CLIENT_DONE_LINES, n, Duration::from_secs(10)).await;
        assert!(done, "anytls-client did not finish {n} connections in 10 s; log:\n{}", self.process.log());
    }
}

/// Our server with a self-signed certificate and our client pinned to it.
pub async fn start_pair() -> (Server, Client) {
    let server = start_server(PASSWORD, &[]).await;
    let pin = server.fingerprint.clone().expect("the self-signed server logs its fingerprint");
    let client = start_client(server.addr, PASSWORD, &["--pin-sha256", &pin]).await;
    (server, client)
}

/// The socket address right after `marker` in `line` (up to a space or comma).
fn after_word(line: &str, marker: &str) -> Option<SocketAddr> {
    let rest = line.split(marker).nth(1)?;
    let end = rest.find([' ', ',']).unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Counts lines of `log` that contain `needle`.
pub fn count_lines(log: &str, needle: &str) -> usize {
    log.lines().filter(|line| line.contains(needle)).count()
}

// ---------------------------------------------------------------------------------------
// Certificates

/// A private CA and a `localhost`/`127.0.0.1` server certificate it signed, as PEM files.
pub struct TestPki {
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl TestPki {
    pub fn write_to(dir: &Path) -> TestPki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.distinguished_name.push(DnType::CommonName, "anytls-rs e2e test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().expect("CA key");
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
        let issuer = Issuer::new(ca_params, ca_key);

        let mut leaf_params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).expect("leaf params");
        leaf_params.distinguished_name.push(DnType::CommonName, "localhost");
        let leaf_key = KeyPair::generate().expect("leaf key");
        let leaf_cert = leaf_params.signed_by(&leaf_key, &issuer).expect("leaf certificate");

        let pki = TestPki {
            ca_cert: dir.join("ca.pem"),
            server_cert: dir.join("server-cert.pem"),
            server_key: dir.join("server-key.pem"),
        };
        std::fs::write(&pki.ca_cert, ca_cert.pem()).expect("write CA");
        std::fs::write(&pki.server_cert, leaf_cert.pem()).expect("write cert");
        std::fs::write(&pki.server_key, leaf_key.serialize_pem()).expect("write key");
        pki
    }
}

// ---------------------------------------------------------------------------------------
// Ports

/// A loopback port that was free a moment ago (for peers that cannot report their
/// own port). Small race; use the logged address of our binaries instead where possible.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

/// A loopback address where nothing listens: connecting to it is refused.
pub fn closed_port_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local addr");
    drop(listener);
    addr
}

/// True when something listens on TCP `port`. Reads /proc/net/tcp{,6}, so no connection
/// is made (a probe connection would count as a failed handshake on a peer).
pub fn port_listening(port: u16) -> bool {
    let needle = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|file| {
        std::fs::read_to_string(file).unwrap_or_default().lines().skip(1).any(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.len() > 3 && fields[1].ends_with(&needle) && fields[3] == "0A"
        })
    })
}

/// Waits until `port` listens; fails if `process` exits or the wait exceeds `limit`.
pub async fn wait_port(process: &mut Process, port: u16, limit: Duration) {
    let deadline = Instant::now() + limit;
    while !port_listening(port) {
        if !process.is_running() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            panic!("{} exited before listening on {port}; log:\n{}", process.name(), process.log());
        }
        if Instant::now() >= deadline {
            panic!("{}: nothing listens on 127.0.0.1:{port} after {limit:?}; log:\n{}", process.name(), process.log());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Proxy clients, payloads and local targets: the test kit the load generator shares.
// Every test file includes this module and uses only part of it, hence the allows.

#[allow(unused_imports)]
pub use anytls_testkit::payload::{payload, sha256_hex};
#[allow(unused_imports)]
pub use anytls_testkit::socks::{
    SOCKS5_GENERAL, SOCKS5_HOST_UNREACHABLE, SOCKS5_OK, SOCKS5_REFUSED, SOCKS5_TIMED_OUT, socks4a_connect,
    socks5_connect, socks5_open,
};
#[allow(unused_imports)]
pub use anytls_testkit::target::{
    half_close_answer, http_body_for, spawn_bulk, spawn_echo, spawn_half_close, spawn_http,
};

/// Reads until EOF.
pub async fn read_all(tcp: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    tcp.read_to_end(&mut out).await.expect("read to EOF");
    out
}

/// Writes `data` and shuts the write side while reading everything the other side
/// sends until EOF (both at once, so neither side can block the other).
pub async fn exchange(tcp: TcpStream, data: &[u8]) -> Vec<u8> {
    let (mut reader, mut writer) = tcp.into_split();
    let send = async {
        writer.write_all(data).await?;
        writer.shutdown().await
    };
    let receive = async {
        let mut out = Vec::new();
        reader.read_to_end(&mut out).await.map(|_| out)
    };
    let (sent, received) = tokio::join!(send, receive);
    sent.expect("send payload");
    received.expect("receive until EOF")
}

/// Echoes `data` through `tcp` (an echo target behind it) and checks the digest: writes
/// and reads concurrently, then reads exactly `data.len()` bytes; no half-close needed.
pub async fn echo_roundtrip(tcp: TcpStream, data: &[u8]) {
    let (mut reader, mut writer) = tcp.into_split();
    let send = writer.write_all(data);
    let receive = async {
        let mut out = vec![0u8; data.len()];
        reader.read_exact(&mut out).await.map(|_| out)
    };
    let (sent, received) = tokio::join!(send, receive);
    sent.expect("send to echo");
    let received = received.expect("read the echo");
    assert_eq!(sha256_hex(&received), sha256_hex(data), "echo of {} bytes differs", data.len());
}

/// Splits an HTTP response into its head (as text) and body.
pub fn split_http_response(raw: &[u8]) -> (String, Vec<u8>) {
    match raw.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(pos) => (String::from_utf8_lossy(&raw[..pos]).into_owned(), raw[pos + 4..].to_vec()),
        None => (String::from_utf8_lossy(raw).into_owned(), Vec::new()),
    }
}

// ---------------------------------------------------------------------------------------
// curl

/// True when `curl` can be run.
pub fn have_curl() -> bool {
    Command::new("curl")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `curl -sS --max-time 15 --socks5-hostname PROXY URL` (blocking, in a worker thread):
/// (exit code, body, stderr).
pub async fn curl_socks5(proxy: SocketAddr, url: &str) -> (i32, Vec<u8>, String) {
    let proxy = proxy.to_string();
    let url = url.to_string();
    tokio::task::spawn_blocking(move || {
        let output = Command::new("curl")
            .args(["-sS", "--max-time", "15", "--socks5-hostname", &proxy, &url])
            .env_remove("http_proxy")
            .env_remove("HTTP_PROXY")
            .env_remove("all_proxy")
            .env_remove("ALL_PROXY")
            .stdin(Stdio::null())
            .output()
            .expect("run curl");
        (output.status.code().unwrap_or(-1), output.stdout, String::from_utf8_lossy(&output.stderr).into_owned())
    })
    .await
    .expect("curl thread")
}

/// Reads until EOF, error or `limit`; returns the bytes and whether the peer closed.
pub async fn read_until_closed<R: tokio::io::AsyncRead + Unpin>(io: &mut R, limit: Duration) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, io.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (out, true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (out, false),
        }
    }
}

/// Why the browser check cannot run here, if it cannot: no chromium, no node, or
/// playwright-core neither installed nor installable in `dir` (tests/browser).
pub fn browser_missing(dir: &std::path::Path) -> Option<String> {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !std::path::Path::new(&chromium).exists() {
        return Some(format!("{chromium} not found (apt-get install -y chromium, or scripts/install-browser.sh)"));
    }
    let runs = |program: &str, args: &[&str]| {
        std::process::Command::new(program)
            .args(args)
            .current_dir(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    };
    if !runs("node", &["--version"]) {
        return Some("node not found".into());
    }
    if !dir.join("node_modules/playwright-core").exists() && !runs("npm", &["ci", "--no-audit", "--no-fund"]) {
        return Some("playwright-core is not installed and `npm ci` in tests/browser failed".into());
    }
    None
}

/// The address a binary logged as `api on ADDR`.
pub async fn api_address(process: &mut Process) -> SocketAddr {
    process
        .wait_for(STARTUP_TIMEOUT, "`api on` line", |line| {
            let rest = line.split("api on ").nth(1)?;
            rest.split(' ').next()?.parse().ok()
        })
        .await
}

/// A bare-bones HTTP/1.1 GET (one request per connection); the status code and the body.
pub async fn api_get(api: SocketAddr, path: &str, bearer: Option<&str>) -> (u16, String) {
    let mut tcp = TcpStream::connect(api).await.unwrap_or_else(|err| panic!("connect to api {api}: {err}"));
    let auth = bearer.map(|token| format!("Authorization: Bearer {token}\r\n")).unwrap_or_default();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {api}\r\n{auth}Connection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw).await.unwrap();
    let (head, body) = split_http_response(&raw);
    let status = head.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Our server on loopback with an API, started with `args` after `-l 127.0.0.1:0 --api
/// 127.0.0.1:0`; the API's address beside it.
pub async fn start_server_with_api(args: &[&str]) -> (Server, SocketAddr) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_anytls-server"));
    command.args(["-l", "127.0.0.1:0", "--api", "127.0.0.1:0"]).args(args).env("RUST_LOG", OUR_LOG_FILTER);
    let mut process = Process::spawn("anytls-server", command);
    let api = api_address(&mut process).await;
    let addr = process.wait_for(STARTUP_TIMEOUT, "`listening on` line", |line| after_word(line, "listening on ")).await;
    let fingerprint = process.log().lines().find_map(|line| {
        let hex = line.split("SHA-256 fingerprint ").nth(1)?.trim();
        (hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit())).then(|| hex.to_string())
    });
    (Server { process, addr, fingerprint }, api)
}

/// Runs `anytls-server ARGS` (a command such as `check` or `link`) to its end with
/// `STATE_DIRECTORY=state`: exit status and output.
pub async fn server_command(args: &[&str], state: &Path) -> (std::process::ExitStatus, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_anytls-server"));
    command.args(args).env("STATE_DIRECTORY", state).env_remove("ANYTLS_PASSWORD");
    let mut process = Process::spawn("anytls-server command", command);
    let status = process.wait_exit(Duration::from_secs(20)).await.expect("the command ends by itself");
    (status, process.log())
}

/// A counter's value on a `/metrics` page: the line that starts with `series`.
pub fn counter_sample(metrics: &str, series: &str) -> Option<u64> {
    metrics.lines().find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

/// Whether 4 KiB sent through the SOCKS5 proxy `proxy` to `host:port` (an echo target)
/// come back, the same, within 5 s.
pub async fn echoes_via(proxy: SocketAddr, host: &str, port: u16) -> bool {
    let Ok((SOCKS5_OK, mut tcp)) = socks5_connect(proxy, host, port).await else { return false };
    let sent = payload(4096, port as u64);
    if tcp.write_all(&sent).await.is_err() {
        return false;
    }
    let mut back = vec![0u8; sent.len()];
    matches!(tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut back)).await, Ok(Ok(_))) && back == sent
}

/// Whether one echo round trip (a byte out, the byte back) through the SOCKS5 proxy `proxy`
/// to the echo target `echo` works within `within`.
pub async fn echo_works(proxy: SocketAddr, echo: SocketAddr, within: Duration) -> bool {
    let round = tokio::time::timeout(within, async {
        let (code, mut tcp) = socks5_connect(proxy, "127.0.0.1", echo.port()).await?;
        if code != SOCKS5_OK {
            return Err(std::io::Error::other(format!("SOCKS5 reply {code}")));
        }
        tcp.write_all(b"p").await?;
        let mut one = [0u8; 1];
        tcp.read_exact(&mut one).await
    })
    .await;
    matches!(round, Ok(Ok(_)))
}

/// One HTTP/1.1 request with an optional bearer token and JSON body; the status and the body.
pub async fn api_request(
    api: SocketAddr,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    // Status 0: the connection failed or was cut (a test may kill the server mid-request).
    let Ok(mut tcp) = TcpStream::connect(api).await else { return (0, String::new()) };
    let auth = bearer.map(|token| format!("Authorization: Bearer {token}\r\n")).unwrap_or_default();
    let body = body.unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {api}\r\n{auth}Content-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut raw = Vec::new();
    if tcp.write_all(request.as_bytes()).await.is_err() || tcp.read_to_end(&mut raw).await.is_err() {
        return (0, String::new());
    }
    let (head, body) = split_http_response(&raw);
    let status = head.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
    (status, String::from_utf8_lossy(&body).into_owned())
}

// ---------------------------------------------------------------------------------------
// Watching a process under load, and a healthy stream beside the load

/// A healthy client: one stream through our client, echoing 64 KiB rounds until
/// stopped. Every round must come back intact.
pub struct Healthy {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Healthy {
    pub async fn start(proxy: SocketAddr, echo: SocketAddr, pause: Duration) -> Healthy {
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let tcp = socks5_open(proxy, echo).await;
        let task = tokio::spawn({
            let (stop, rounds) = (stop.clone(), rounds.clone());
            async move {
                let (mut reader, mut writer) = tcp.into_split();
                let data = payload(64 * 1024, 42);
                let mut back = vec![0u8; data.len()];
                while !stop.load(Ordering::Relaxed) {
                    let (sent, received) = tokio::join!(writer.write_all(&data), reader.read_exact(&mut back));
                    sent.expect("healthy stream: send");
                    received.expect("healthy stream: receive");
                    assert!(back == data, "healthy stream: echo differs");
                    rounds.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(pause).await;
                }
            }
        });
        Healthy { stop, rounds, task }
    }

    /// Stops it and checks it kept going the whole time; returns its round count.
    pub async fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("healthy stream stuck")
            .expect("healthy stream failed");
        self.rounds.load(Ordering::Relaxed)
    }

    pub fn rounds(&self) -> u64 {
        self.rounds.load(Ordering::Relaxed)
    }
}

/// CPU time (user + system) of a process so far, from /proc/PID/stat.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    // Fields after the command name (which is in parentheses and may hold spaces).
    let fields: Vec<&str> = stat.rsplit_once(") ").expect("stat format").1.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0 // USER_HZ is 100 on Linux
}

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:")?.trim().strip_suffix(" kB")?.trim().parse().ok())
        .expect("VmRSS")
}

/// Open file descriptors of a process.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|dir| dir.count()).unwrap_or(0)
}

/// Waits (at most `limit`) until `pid` has at most `bound` descriptors open; returns the
/// count then and how long it took.
pub async fn fds_down_to(pid: u32, bound: usize, limit: Duration) -> (usize, Duration) {
    let started = Instant::now();
    while fd_count(pid) > bound && started.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (fd_count(pid), started.elapsed())
}

/// A target that accepts connections, with a small receive buffer, and never reads.
pub async fn spawn_sink_that_never_reads() -> SocketAddr {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1024).unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            held.push(tcp);
        }
    });
    addr
}

/// The settings of a server started in the test process (`server::run` or `server::serve`)
/// on loopback: short timeouts, the lock engine, no warming.
pub fn in_process_server_config(passwords: Vec<anytls_rs::proto::PasswordHash>) -> anytls_rs::server::ServerConfig {
    anytls_rs::server::ServerConfig {
        tls: anytls_rs::server::tls::Identity::self_signed().unwrap().server_config().unwrap(),
        passwords,
        padding: anytls_rs::proto::PaddingScheme::default(),
        downlink_padding: None,
        connect_timeout: Duration::from_secs(2),
        dns_strategy: Default::default(),
        resolver: Default::default(),
        keepalive: Default::default(),
        handshake_timeout: Duration::from_secs(5),
        max_handshakes: 16,
        probe: Default::default(),
        max_streams_per_session: 64,
        outbound: anytls_rs::server::outbound_pool::OutboundSettings {
            pool_type: anytls_rs::pool::PoolType::Lock,
            max_per_target: 10,
            min_idle: 0,
            max_idle_total: 10,
            max_idle_time: Duration::from_secs(60),
            max_lifetime: Duration::from_secs(60),
            warm_after: Duration::ZERO,
        },
        warmup: vec![],
        stats_interval: Duration::from_secs(600),
        udp: anytls_rs::server::udp::UdpSettings::default(),
        proxy_protocol_from: vec![],
    }
}

/// A TLS client of the tests' own (not our client's settings) that trusts only `ca`, with
/// `provider`'s key exchange groups and suites.
pub fn tls_client_trusting(ca: &Path, provider: rustls::crypto::CryptoProvider) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_file(ca).expect("CA file")).expect("CA");
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}
