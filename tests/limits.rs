//! Server-wide caps (`--max-sessions`, `--max-streams`) and the stream idle timeout
//! (`--stream-idle-timeout-secs`), through the real binaries on loopback.

mod common;

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::*;

async fn pair(server_args: &[&str], client_args: &[&str]) -> (Server, Client) {
    let server = start_server(PASSWORD, server_args).await;
    let pin = server.fingerprint.clone().unwrap();
    let mut trust = vec!["--pin-sha256", pin.as_str()];
    trust.extend_from_slice(client_args);
    let client = start_client(server.addr, PASSWORD, &trust).await;
    (server, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_over_max_sessions_gets_an_alert_and_the_first_keeps_working() {
    bounded(Duration::from_secs(60), "max sessions", async {
        let (server, client) = pair(&["--max-sessions", "1"], &[]).await;
        let echo = spawn_echo().await;
        // One stream per session on the client: the second concurrent stream needs a
        // second session, which the server refuses.
        let first = socks5_open(client.addr, echo).await;
        let (code, _second) = socks5_connect(client.addr, "127.0.0.1", echo.port()).await.unwrap();
        assert_ne!(code, SOCKS5_OK, "the second session was refused");
        assert!(server.process.log_shows("session refused: too many sessions", Duration::from_secs(5)).await);
        assert!(client.process.log_shows("server alert: too many sessions", Duration::from_secs(5)).await);
        echo_roundtrip(first, &payload(100_000, 1)).await;
    })
    .await;
}

/// The client's own cap: past `--max-connections` local connections it stops accepting,
/// so a new one waits in the listen queue (unanswered, not refused) and is served as soon
/// as one ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_connections_over_the_clients_cap_wait_and_are_served_when_one_ends() {
    bounded(Duration::from_secs(60), "client connection cap", async {
        let (_server, client) = pair(&[], &["--max-connections", "2"]).await;
        let echo = spawn_echo().await;
        let first = socks5_open(client.addr, echo).await;
        let second = socks5_open(client.addr, echo).await;
        let mut third = tokio::net::TcpStream::connect(client.addr).await.expect("queued by the kernel, not refused");
        third.write_all(&[5, 1, 0]).await.unwrap();
        let mut method = [0u8; 2];
        let early = tokio::time::timeout(Duration::from_millis(700), third.read_exact(&mut method)).await;
        assert!(early.is_err(), "a third connection was served beyond --max-connections 2");
        assert!(
            client.process.log_shows("(--max-connections)", Duration::from_secs(5)).await,
            "{}",
            client.process.log()
        );
        echo_roundtrip(second, b"the two admitted keep working").await;
        drop(first);
        tokio::time::timeout(Duration::from_secs(5), third.read_exact(&mut method))
            .await
            .expect("served once a place was freed")
            .unwrap();
        assert_eq!(method, [5, 0]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_over_max_streams_are_refused_and_a_place_frees_up_when_one_ends() {
    bounded(Duration::from_secs(60), "max streams", async {
        let (server, client) = pair(&["--max-streams", "2"], &["--max-streams-per-session", "8"]).await;
        let echo = spawn_echo().await;
        let a = socks5_open(client.addr, echo).await;
        let b = socks5_open(client.addr, echo).await;
        let (code, _c) = socks5_connect(client.addr, "127.0.0.1", echo.port()).await.unwrap();
        assert_eq!(code, SOCKS5_GENERAL, "third stream refused");
        assert!(
            server
                .process
                .log_shows("too many streams on this server (limit 2, --max-streams)", Duration::from_secs(5))
                .await
        );
        echo_roundtrip(b, b"still fine").await;
        drop(a);
        // The place comes back once the server's relay for `a` has ended.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (code, tcp) = socks5_connect(client.addr, "127.0.0.1", echo.port()).await.unwrap();
            if code == SOCKS5_OK {
                echo_roundtrip(tcp, b"again").await;
                break;
            }
            assert!(Instant::now() < deadline, "no place freed after a stream ended");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_stream_is_ended_after_the_idle_timeout_and_a_busy_one_is_not() {
    bounded(Duration::from_secs(60), "stream idle timeout", async {
        let (server, client) = pair(&["--stream-idle-timeout-secs", "1"], &["--stream-idle-timeout-secs", "0"]).await;
        let echo = spawn_echo().await;
        let mut busy = socks5_open(client.addr, echo).await;
        let mut quiet = socks5_open(client.addr, echo).await;
        let started = Instant::now();
        // The busy stream sends something every 300 ms for 2.5 s.
        let mut buf = [0u8; 4];
        while started.elapsed() < Duration::from_millis(2500) {
            busy.write_all(b"ping").await.unwrap();
            busy.read_exact(&mut buf).await.unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        // The quiet one was ended by the server (EOF or reset on the local side).
        let mut rest = Vec::new();
        let ended = tokio::time::timeout(Duration::from_secs(3), quiet.read_to_end(&mut rest)).await;
        assert!(ended.is_ok(), "the quiet stream is still open");
        assert!(server.process.log_shows("no data either way for 1s", Duration::from_secs(2)).await);
        busy.write_all(b"last").await.unwrap();
        busy.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"last");
    })
    .await;
}

/// The caps follow the descriptor limit: under a hard limit of 1,024 (`ulimit -n` sets
/// both), 64 reserved, 1/32 for warm connections, the rest shared by client connections
/// and streams, handshakes a sixteenth; the soft limit is raised to the hard one; an
/// explicit flag wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_caps_are_shares_of_the_descriptor_limit_and_flags_win() {
    bounded(Duration::from_secs(30), "derived caps", async {
        let server_bin = env!("CARGO_BIN_EXE_anytls-server");
        let launch = |limits: &str, flags: &str| {
            let mut command = std::process::Command::new("bash");
            command
                .args(["-c", &format!("{limits} && exec {server_bin} -l 127.0.0.1:0 -p {PASSWORD} {flags}")])
                .env("RUST_LOG", OUR_LOG_FILTER);
            Process::spawn("anytls-server (small fd limit)", command)
        };
        let mut derived = launch("ulimit -n 1024", "");
        let line = derived
            .wait_for(STARTUP_TIMEOUT, "fd line", |line| line.contains("file descriptors:").then(|| line.to_string()))
            .await;
        for expected in [
            "1024",
            "930 shared",
            "--max-handshakes 60",
            "--max-sessions 930",
            "--max-streams 930",
            "--max-idle-total 30",
        ] {
            assert!(line.contains(expected), "{expected:?} missing from {line:?}");
        }
        let mut raised = launch("ulimit -Sn 256 && ulimit -Hn 2048", "--max-sessions 7");
        let line = raised
            .wait_for(STARTUP_TIMEOUT, "fd line", |line| line.contains("file descriptors:").then(|| line.to_string()))
            .await;
        assert!(line.contains("2048 (soft limit raised from 256"), "{line}");
        assert!(line.contains("--max-sessions 7,") && line.contains("--max-streams 1922"), "{line}");
    })
    .await;
}

/// The caps' defaults in `--help` are the ones start-up uses: both under `ulimit -n 512`
/// (448 usable: 28 handshakes, 14 warm, 434 shared), read from each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_help_states_the_cap_defaults_start_up_uses() {
    bounded(Duration::from_secs(60), "help defaults", async {
        let server_bin = env!("CARGO_BIN_EXE_anytls-server");
        let help = std::process::Command::new("bash")
            .args(["-c", &format!("ulimit -n 512 && exec {server_bin} --help")])
            .output()
            .expect("--help");
        let help = String::from_utf8_lossy(&help.stdout).into_owned();
        // Each flag's help ends in "[here: N]"; clap may wrap it onto the next lines.
        let here = |flag: &str| -> u64 {
            let from = help.find(&format!("--{flag} ")).unwrap_or_else(|| panic!("--{flag} in help:\n{help}"));
            let rest = &help[from..];
            let at = rest.find("[here: ").expect("a [here: N] default") + "[here: ".len();
            rest[at..].split(']').next().unwrap().trim().parse().unwrap()
        };
        let mut command = std::process::Command::new("bash");
        command.args(["-c", &format!("ulimit -n 512 && exec {server_bin} -l 127.0.0.1:0 -p {PASSWORD}")]);
        let mut process = Process::spawn("anytls-server (ulimit -n 512)", command);
        let line = process
            .wait_for(STARTUP_TIMEOUT, "the descriptors line", |line| {
                line.contains("(defaults derived from the limit)").then(|| line.to_string())
            })
            .await;
        let logged = |flag: &str| -> u64 {
            line.split(&format!("--{flag} ")).nth(1).and_then(|r| r.split([',', ' ']).next()?.parse().ok()).unwrap()
        };
        for flag in ["max-handshakes", "max-sessions", "max-streams", "max-idle-total"] {
            assert_eq!(here(flag), logged(flag), "--{flag}: help says {}, start-up {line}", here(flag));
        }
        assert_eq!((here("max-handshakes"), here("max-idle-total"), here("max-sessions")), (28, 14, 434));
        assert!(!help.contains("7/16"), "no stale fraction in the help");
    })
    .await;
}

/// Client connections and streams share the descriptors left after the reserve and the
/// warm share: under `ulimit -n 128` (64 usable, 2 warm, 62 shared), 40 sessions with
/// one stream each need 80 and the last ones are refused, each with a clear reason in
/// the log, while those admitted keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_and_streams_share_the_descriptor_budget() {
    bounded(Duration::from_secs(60), "descriptor budget", async {
        let server_bin = env!("CARGO_BIN_EXE_anytls-server");
        let mut command = std::process::Command::new("bash");
        command
            .args(["-c", &format!("ulimit -n 128 && exec {server_bin} -l 127.0.0.1:0 -p {PASSWORD}")])
            .env("RUST_LOG", OUR_LOG_FILTER);
        let mut process = Process::spawn("anytls-server (ulimit -n 128)", command);
        let addr = process
            .wait_for(STARTUP_TIMEOUT, "`listening on`", |line| {
                line.split("listening on ").nth(1)?.split(' ').next()?.parse::<std::net::SocketAddr>().ok()
            })
            .await;
        assert!(process.log().contains("62 shared by client connections and streams"), "{}", process.log());
        let pin = process
            .log()
            .lines()
            .find_map(|l| Some(l.split("SHA-256 fingerprint ").nth(1)?.trim().to_string()))
            .unwrap();
        let client = start_client(addr, PASSWORD, &["--pin-sha256", &pin]).await;
        let echo = spawn_echo().await;
        let mut open = Vec::new();
        let mut refused = 0;
        for _ in 0..40 {
            match socks5_connect(client.addr, "127.0.0.1", echo.port()).await {
                Ok((SOCKS5_OK, tcp)) => open.push(tcp),
                _ => refused += 1,
            }
        }
        assert!((25..=31).contains(&open.len()) && refused >= 9, "{} open, {refused} refused", open.len());
        assert!(process.log_shows("descriptors for connections and streams in use", Duration::from_secs(2)).await);
        for tcp in open.drain(..3) {
            echo_roundtrip(tcp, b"still served").await;
        }
        drop(process);
    })
    .await;
}
