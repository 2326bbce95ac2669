//! Name lookups under a resolver that never answers: one user's lookups must not take the
//! server's threads or another user's lookups with them (`src/server/dial.rs`,
//! `LookupOwner`: 64 lookups in flight in all, 32 per user, 8 per session).
//!
//! The server runs in a mount namespace of its own whose /etc/resolv.conf names a black
//! hole on loopback (a UDP and TCP socket here that takes queries and never answers) and
//! whose /etc/hosts holds the victim's names. The attacker, a raw AnyTLS session driven
//! frame by frame, opens 2,000 streams to distinct names under the black hole; the
//! victim, through our client, opens streams to names from /etc/hosts before and during
//! the attack. Needs root (unshare --mount, mount --bind, UDP port 53): SKIP otherwise.
//!
//! `ANYTLS_RESOLVER_SERVER=/path/to/anytls-server` runs the same check against another
//! server binary (e.g. a build of the commit before the fix, to see it fail).

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command as Cmd, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt, WriteHalf};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use anytls_rs::client::tls::{Trust, client_config};
use anytls_rs::proto::auth::encode_auth_block;
use anytls_rs::proto::frame::Command;
use anytls_rs::proto::{Address, Frame, PasswordHash};
use anytls_rs::server::dial::MAX_LOOKUPS;

use common::*;

/// Where the black hole listens: a loopback address nothing else uses (not
/// systemd-resolved's 127.0.0.53).
const BLACK_HOLE: &str = "127.53.0.53:53";
/// The server's private resolv.conf: only the black hole, 2 tries of 5 s (each
/// getaddrinfo for a name under it holds a blocking thread ~10 s).
const RESOLV_CONF: &str = "nameserver 127.53.0.53\noptions timeout:5 attempts:2\n";
const ATTACKER_PASSWORD: &str = "resolver-attacker";
const VICTIM_PASSWORD: &str = "resolver-victim";
/// The attack: sessions x streams per session, each stream to a name of its own. 8
/// sessions so that their per-session bounds (8 each) add up to all 64 places: only the
/// per-user bound keeps half of them for the others.
const ATTACK_SESSIONS: usize = 8;
const ATTACK_STREAMS_PER_SESSION: usize = 250;
/// Streams sent per write, and the pause between writes.
const ATTACK_BATCH: usize = 50;
const ATTACK_BATCH_PAUSE: Duration = Duration::from_millis(5);
/// Victim opens per phase, one started every `VICTIM_SPACING` whatever the earlier ones
/// do (so a slow open does not hide the next), each to a name not looked up before.
const VICTIM_OPENS: usize = 40;
const VICTIM_SPACING: Duration = Duration::from_millis(50);
/// Longest wait for one victim open (SOCKS5 reply and echo).
const VICTIM_OPEN_LIMIT: Duration = Duration::from_secs(15);
/// Names the victim has in /etc/hosts: a warm-up, then a fresh one per open.
const VICTIM_NAMES: usize = 1 + 2 * VICTIM_OPENS;

fn victim_name(i: usize) -> String {
    format!("v{i}.victim.test")
}

// ---------------------------------------------------------------------------------------
// Skips

/// Why this test cannot run here, if it cannot.
fn missing_privileges(hosts: &Path, resolv: &Path) -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (unshare --mount, mount --bind and UDP port 53 need it)".into());
    }
    let output = Cmd::new("unshare")
        .args(["--mount", "sh", "-c", r#"mount --bind "$0" /etc/hosts && mount --bind "$1" /etc/resolv.conf"#])
        .arg(hosts)
        .arg(resolv)
        .stdin(Stdio::null())
        .output();
    match output {
        Err(err) => Some(format!("cannot run unshare: {err}")),
        Ok(out) if !out.status.success() => Some(format!(
            "unshare --mount with bind mounts failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Ok(_) => None,
    }
}

// ---------------------------------------------------------------------------------------
// The black hole

/// A DNS server that reads every query and never answers, on UDP and TCP (accepted
/// connections are held open, silent). Counts the UDP queries.
struct BlackHole {
    queries: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl BlackHole {
    async fn bind() -> std::io::Result<BlackHole> {
        let udp = UdpSocket::bind(BLACK_HOLE).await?;
        let tcp = TcpListener::bind(BLACK_HOLE).await?;
        let queries = Arc::new(AtomicUsize::new(0));
        let counter = queries.clone();
        let udp_task = tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while udp.recv_from(&mut buf).await.is_ok() {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        });
        let tcp_task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = tcp.accept().await {
                held.push(stream);
            }
        });
        Ok(BlackHole { queries, tasks: vec![udp_task, tcp_task] })
    }

    fn queries(&self) -> usize {
        self.queries.load(Ordering::Relaxed)
    }
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

// ---------------------------------------------------------------------------------------
// The server, in its own mount namespace

/// Starts `SERVER -l 127.0.0.1:0 ARGS…` under `unshare --mount` with `hosts` and
/// `resolv` bind-mounted over /etc/hosts and /etc/resolv.conf. unshare and sh exec, so
/// the process's PID is the server's. Waits for `listening on ADDR` as
/// [`common::start_server`] does.
async fn start_server_with_files(binary: &Path, hosts: &Path, resolv: &Path, args: &[&str]) -> Server {
    let mut command = Cmd::new("unshare");
    command
        .args([
            "--mount",
            "sh",
            "-c",
            r#"mount --bind "$0" /etc/hosts && mount --bind "$1" /etc/resolv.conf && shift && exec "$@""#,
        ])
        .arg(hosts)
        .arg(resolv)
        .arg(binary)
        .args(["-l", "127.0.0.1:0"])
        .args(args)
        .env("RUST_LOG", OUR_LOG_FILTER);
    let mut process = Process::spawn("anytls-server", command);
    let addr = process
        .wait_for(STARTUP_TIMEOUT, "`listening on` line", |line| {
            let rest = line.split("listening on ").nth(1)?;
            rest[..rest.find([' ', ',']).unwrap_or(rest.len())].parse::<SocketAddr>().ok()
        })
        .await;
    let fingerprint = process.log().lines().find_map(|line| {
        let hex = line.split("SHA-256 fingerprint ").nth(1)?.trim();
        (hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit())).then(|| hex.to_string())
    });
    Server { process, addr, fingerprint }
}

/// `Threads:` of /proc/PID/status (0 once the process is gone).
fn threads(pid: u32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("Threads:")?.trim().parse().ok())
        .unwrap_or(0)
}

/// Samples the server's thread count every 20 ms until stopped; the peak seen.
struct ThreadWatch {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<usize>,
}

impl ThreadWatch {
    fn start(pid: u32) -> ThreadWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                let mut peak = threads(pid);
                while !stop.load(Ordering::Relaxed) {
                    peak = peak.max(threads(pid));
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                peak.max(threads(pid))
            }
        });
        ThreadWatch { stop, task }
    }

    async fn peak(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("thread watch")
    }
}

// ---------------------------------------------------------------------------------------
// The attacker

/// Authenticated raw AnyTLS sessions that send SYN + PSH(destination) for streams to
/// names under the black hole and never wait for an answer; what the server sends back
/// is read and dropped by a task per session, so its writes never block.
struct Attacker {
    writers: Vec<WriteHalf<TlsStream<TcpStream>>>,
    readers: Vec<tokio::task::JoinHandle<()>>,
    received: Arc<AtomicUsize>,
}

impl Attacker {
    async fn connect(server: SocketAddr, sessions: usize) -> Attacker {
        let connector = TlsConnector::from(client_config(&Trust::Insecure).expect("TLS config"));
        let received = Arc::new(AtomicUsize::new(0));
        let (mut writers, mut readers) = (Vec::new(), Vec::new());
        for _ in 0..sessions {
            let tcp = TcpStream::connect(server).await.expect("attacker: connect");
            let tls = connector
                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                .await
                .expect("attacker: TLS handshake");
            let (mut reader, mut writer) = tokio::io::split(tls);
            let mut hello = BytesMut::new();
            encode_auth_block(&PasswordHash::of(ATTACKER_PASSWORD), 30, &mut hello);
            Frame::new(Command::Settings, 0, &b"v=2\nclient=resolver-test\npadding-md5=x"[..])
                .encode(&mut hello)
                .unwrap();
            writer.write_all(&hello).await.expect("attacker: auth");
            writer.flush().await.expect("attacker: auth");
            let received = received.clone();
            readers.push(tokio::spawn(async move {
                let mut sink = vec![0u8; 64 * 1024];
                while let Ok(n) = reader.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                    received.fetch_add(n, Ordering::Relaxed);
                }
            }));
            writers.push(writer);
        }
        Attacker { writers, readers, received }
    }

    /// Opens `per_session` streams on every session, round robin in batches; stream `sid`
    /// of session `s` goes to `x{s}-{sid}.hole.test:80`.
    async fn flood(&mut self, per_session: usize) {
        for first in (1..=per_session).step_by(ATTACK_BATCH) {
            let last = (first + ATTACK_BATCH - 1).min(per_session);
            for (s, writer) in self.writers.iter_mut().enumerate() {
                let mut out = BytesMut::new();
                for sid in first..=last {
                    let mut destination = BytesMut::new();
                    Address::domain(&format!("x{s}-{sid}.hole.test"), 80).encode(&mut destination);
                    Frame::control(Command::Syn, sid as u32).encode(&mut out).unwrap();
                    Frame::new(Command::Push, sid as u32, destination.freeze()).encode(&mut out).unwrap();
                }
                writer.write_all(&out).await.expect("attacker: send streams");
                writer.flush().await.expect("attacker: send streams");
            }
            tokio::time::sleep(ATTACK_BATCH_PAUSE).await;
        }
    }
}

impl Drop for Attacker {
    fn drop(&mut self) {
        for reader in &self.readers {
            reader.abort();
        }
    }
}

// ---------------------------------------------------------------------------------------
// The victim

/// One open through the victim's client: SOCKS5 CONNECT to `name:port`, 64 bytes echoed.
/// The time it took (to success or to failure) and why it failed, if it did. The echo is
/// what counts: our client may grant the SOCKS5 request before the server's SYNACK, so a
/// dial the server gave up on can show as an echo cut short.
async fn victim_open(proxy: SocketAddr, name: String, port: u16) -> (Duration, Result<(), String>) {
    let started = Instant::now();
    let data = payload(64, port as u64);
    let attempt = async {
        let (code, mut tcp) = socks5_connect(proxy, &name, port).await.map_err(|err| format!("SOCKS5: {err}"))?;
        if code != SOCKS5_OK {
            return Err(format!("SOCKS5 reply code {code}"));
        }
        tcp.write_all(&data).await.map_err(|err| format!("send: {err}"))?;
        let mut back = vec![0u8; data.len()];
        tcp.read_exact(&mut back).await.map_err(|err| format!("echo: {err}"))?;
        if back != data {
            return Err("echo differs".into());
        }
        Ok(())
    };
    let outcome = match tokio::time::timeout(VICTIM_OPEN_LIMIT, attempt).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(why)) => Err(format!("{name}: {why} after {:?}", started.elapsed())),
        Err(_) => Err(format!("{name}: no answer within {VICTIM_OPEN_LIMIT:?}")),
    };
    (started.elapsed(), outcome)
}

/// The times of one phase's opens, sorted (failed ones included, at the time they
/// failed), and the failures.
struct Phase {
    times: Vec<Duration>,
    failures: Vec<String>,
}

impl Phase {
    /// `VICTIM_OPENS` opens to the names from `first_name` on, one started every
    /// `VICTIM_SPACING`.
    async fn run(proxy: SocketAddr, port: u16, first_name: usize) -> Phase {
        let mut opens = Vec::new();
        for i in 0..VICTIM_OPENS {
            opens.push(tokio::spawn(victim_open(proxy, victim_name(first_name + i), port)));
            tokio::time::sleep(VICTIM_SPACING).await;
        }
        let mut phase = Phase { times: Vec::new(), failures: Vec::new() };
        for open in opens {
            let (took, outcome) = open.await.expect("victim open task");
            phase.times.push(took);
            if let Err(why) = outcome {
                phase.failures.push(why);
            }
        }
        phase.times.sort();
        phase
    }

    /// Nearest-rank percentile of the opens' times.
    fn percentile(&self, p: f64) -> Duration {
        let rank = ((p * self.times.len() as f64).ceil() as usize).clamp(1, self.times.len());
        self.times[rank - 1]
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

// ---------------------------------------------------------------------------------------
// The test

/// 2,000 streams to names that never resolve, from one user over 8 sessions, next to a
/// victim opening streams to names in /etc/hosts: the victim's opens all succeed and
/// stay near their baseline latency, and the server's threads stay within the lookup
/// bound. Before the bound the attack grew the server from 6 to 519 threads (tokio's
/// blocking pool) and the victim's p99 from 4.65 ms to 2,734 ms, with a dial timed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_that_never_answer_do_not_hold_other_users_names_or_the_servers_threads() {
    bounded(Duration::from_secs(120), "resolver", async {
        let dir = TempDir::new("resolver");
        let hosts = dir.path().join("hosts");
        let resolv = dir.path().join("resolv.conf");
        let mut hosts_text = String::from("127.0.0.1 localhost\n");
        for i in 0..VICTIM_NAMES {
            hosts_text.push_str(&format!("127.0.0.1 {}\n", victim_name(i)));
        }
        std::fs::write(&hosts, &hosts_text).expect("write hosts");
        std::fs::write(&resolv, RESOLV_CONF).expect("write resolv.conf");
        if let Some(why) = missing_privileges(&hosts, &resolv) {
            announce(&format!("SKIP resolver: {why}"));
            return;
        }
        let black_hole = match BlackHole::bind().await {
            Ok(black_hole) => black_hole,
            Err(err) => {
                announce(&format!("SKIP resolver: cannot bind the black hole on {BLACK_HOLE}: {err}"));
                return;
            }
        };

        let binary = std::env::var_os("ANYTLS_RESOLVER_SERVER")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_anytls-server")));
        let attacker_user = format!("attacker:{ATTACKER_PASSWORD}");
        let victim_user = format!("victim:{VICTIM_PASSWORD}");
        let server =
            start_server_with_files(&binary, &hosts, &resolv, &["--user", &attacker_user, "--user", &victim_user])
                .await;
        let pid = server.process.pid();
        // The process is the server itself (unshare and sh exec'd), and it sees only the
        // private files: no lookup of its can reach the machine's real resolver.
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).expect("server exe");
        assert_eq!(exe, binary.canonicalize().expect("server binary"), "PID {pid} is not the server");
        let seen = |file: &str| std::fs::read_to_string(format!("/proc/{pid}/root/etc/{file}")).unwrap_or_default();
        assert_eq!(seen("resolv.conf"), RESOLV_CONF, "the server's /etc/resolv.conf is not the private one");
        assert_eq!(seen("hosts"), hosts_text, "the server's /etc/hosts is not the private one");

        let pin = server.fingerprint.clone().expect("the self-signed server logs its fingerprint");
        let client = start_client(server.addr, VICTIM_PASSWORD, &["--pin-sha256", &pin]).await;
        let echo = spawn_echo().await;

        // Warm-up (the client's first session, TLS included), then the baseline.
        victim_open(client.addr, victim_name(0), echo.port()).await.1.expect("victim warm-up open");
        let baseline = Phase::run(client.addr, echo.port(), 1).await;
        assert!(baseline.failures.is_empty(), "victim opens failed before the attack: {:?}", baseline.failures);
        let threads_before = threads(pid);

        // The attack: all streams sent, then the victim's opens while its lookups hang.
        let watch = ThreadWatch::start(pid);
        let attack_started = Instant::now();
        let mut attacker = Attacker::connect(server.addr, ATTACK_SESSIONS).await;
        attacker.flood(ATTACK_STREAMS_PER_SESSION).await;
        let sent_in = attack_started.elapsed();
        // The lookups have reached the black hole (A and AAAA per name).
        let deadline = Instant::now() + Duration::from_secs(5);
        while black_hole.queries() < 32 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let queries_at_start = black_hole.queries();
        assert!(
            queries_at_start >= 32,
            "the attack's lookups did not reach the black hole: {queries_at_start} queries"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        let attack = Phase::run(client.addr, echo.port(), 1 + VICTIM_OPENS).await;
        let measured_in = attack_started.elapsed();
        let threads_peak = watch.peak().await;

        let (base_p50, base_p99) = (baseline.percentile(0.50), baseline.percentile(0.99));
        let (attack_p50, attack_p99) = (attack.percentile(0.50), attack.percentile(0.99));
        announce(&format!(
            "NOTE resolver ({}): victim opens by name, baseline p50 {} p99 {}; under {} streams to names that \
             never resolve ({ATTACK_SESSIONS} sessions, sent in {sent_in:.2?}, {} queries at the black hole, \
             attacker received {} bytes): p50 {} p99 {}, {} of {VICTIM_OPENS} failed (measured within \
             {measured_in:.2?} of the attack's start); server threads {threads_before} before, peak {threads_peak}",
            binary.display(),
            ms(base_p50),
            ms(base_p99),
            ATTACK_SESSIONS * ATTACK_STREAMS_PER_SESSION,
            black_hole.queries(),
            attacker.received.load(Ordering::Relaxed),
            ms(attack_p50),
            ms(attack_p99),
            attack.failures.len(),
        ));

        assert!(attack.failures.is_empty(), "victim opens failed during the attack: {:#?}", attack.failures);
        // "Baseline latency": the victim's p99 during the attack within twice its
        // baseline p99 plus 20 ms (scheduling noise of a 2-core machine under the
        // attack's load). Without the bound it was 2,734 ms with a dial timed out.
        let limit = base_p99 * 2 + Duration::from_millis(20);
        assert!(
            attack_p99 <= limit,
            "victim p99 {} during the attack, over 2 x baseline p99 {} + 20 ms",
            ms(attack_p99),
            ms(base_p99)
        );
        // Lookups hold at most MAX_LOOKUPS blocking threads (the attacker alone half of
        // them); 16 more for anything else the blocking pool does meanwhile. Without the
        // bound: 6 -> 519.
        let thread_limit = threads_before + MAX_LOOKUPS + 16;
        assert!(
            threads_peak <= thread_limit,
            "server threads peaked at {threads_peak} (before: {threads_before}), over {thread_limit}"
        );
        drop(attacker);
        drop(client);
        drop(server);
    })
    .await;
}
