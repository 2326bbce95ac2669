//! The two edges a stranger can reach, end to end with real processes on loopback: the
//! client's local proxy port (handshake deadline, credentials in proxy URLs, strict
//! CONNECT parsing, proxy authentication, the exposure warning) and the monitoring API's
//! HTTP port (header timeout, connection cap, the token check).

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const LIMIT: Duration = Duration::from_secs(90);

/// Waits until `ok(fd_count)` holds, at most `limit`; returns the last count.
async fn wait_fds(pid: u32, limit: Duration, ok: impl Fn(usize) -> bool) -> usize {
    let deadline = Instant::now() + limit;
    loop {
        let count = fd_count(pid);
        if ok(count) || Instant::now() >= deadline {
            return count;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads until EOF (or a reset), at most `limit`; `None` if the peer kept it open.
async fn read_until_closed(tcp: &mut TcpStream, limit: Duration) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(limit, read).await.ok().map(|()| out)
}

/// Our pair, the client started with `client_args` on top of its pin.
async fn pair_with(server_args: &[&str], client_args: &[&str]) -> (Server, Client) {
    let server = start_server(PASSWORD, server_args).await;
    let pin = server.fingerprint.clone().expect("the self-signed server logs its fingerprint");
    let mut args = vec!["--pin-sha256", pin.as_str()];
    args.extend_from_slice(client_args);
    let client = start_client(server.addr, PASSWORD, &args).await;
    (server, client)
}

/// One request on its own connection; the whole answer (the API closes after it).
async fn request(addr: SocketAddr, head: &str) -> String {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(head.as_bytes()).await.unwrap();
    let raw = read_until_closed(&mut tcp, Duration::from_secs(10)).await.expect("answer and close within 10 s");
    String::from_utf8_lossy(&raw).into_owned()
}

/// An HTTP target that records each request head it gets and answers `200 ok`.
async fn spawn_recording_http() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = Arc::new(Mutex::new(Vec::new()));
    let recorded = heads.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let recorded = recorded.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    match tcp.read_u8().await {
                        Ok(byte) => head.push(byte),
                        Err(_) => return,
                    }
                }
                recorded.lock().unwrap().push(String::from_utf8_lossy(&head).into_owned());
                let _ = tcp.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok").await;
            });
        }
    });
    (addr, heads)
}

// ---------------------------------------------------------------------------------------
// The client's local port

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_local_connections_are_closed_at_the_deadline_and_their_fds_return() {
    bounded(LIMIT, "silent local connections", async {
        const SILENT: usize = 200;
        let deadline = Duration::from_secs(2);
        let (_server, client) = pair_with(&[], &["--local-handshake-timeout-secs", "2"]).await;
        let echo = spawn_echo().await;
        echo_roundtrip(socks5_open(client.addr, echo).await, b"warm-up").await;
        let pid = client.process.pid();
        let before = wait_fds(pid, Duration::from_secs(2), |_| false).await;

        // Silent ones, and ones that stop half-way through a greeting or request.
        let partials: [&[u8]; 4] = [b"", &[5, 1], &[4, 1, 0, 80], b"CONNECT 127.0.0.1:80 HTTP/1.1\r\n"];
        let opened = Instant::now();
        let mut idle = Vec::new();
        for i in 0..SILENT {
            let mut tcp = TcpStream::connect(client.addr).await.unwrap();
            tcp.write_all(partials[i % partials.len()]).await.unwrap();
            idle.push(tcp);
        }
        let during = wait_fds(pid, Duration::from_secs(5), |n| n >= before + SILENT).await;
        assert!(during >= before + SILENT, "the client accepted them all: {before} -> {during} fds");

        // A well-behaved client is still served while they wait.
        echo_roundtrip(socks5_open(client.addr, echo).await, b"during the flood").await;

        for tcp in &mut idle {
            let closed = read_until_closed(tcp, deadline + Duration::from_secs(5)).await;
            assert!(closed.is_some(), "a silent connection is still open {:?} after opening", opened.elapsed());
        }
        let all_closed = opened.elapsed();
        assert!(all_closed >= deadline - Duration::from_millis(300), "closed before the deadline: {all_closed:?}");
        let after = wait_fds(pid, Duration::from_secs(5), |n| n <= before + 2).await;
        announce(&format!(
            "NOTE local handshake deadline {deadline:?}: {SILENT} silent connections, client fds {before} -> \
             {during} -> {after}, all closed {all_closed:?} after opening"
        ));
        assert!(after <= before + 2, "fds did not come back: {before} -> {during} -> {after}");
        echo_roundtrip(socks5_open(client.addr, echo).await, b"after").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_in_proxy_urls_are_stripped_and_never_leave_the_client() {
    bounded(LIMIT, "credentials in proxy URLs", async {
        let (mut server, client) = pair_with(&["--api", "127.0.0.1:0"], &[]).await;
        let api = api_address(&mut server.process).await;
        let (target, heads) = spawn_recording_http().await;
        let port = target.port();

        let answer = request(
            client.addr,
            &format!("GET http://alice:s3cret@127.0.0.1:{port}/page HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n"),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok"), "GET answer: {answer}");

        let mut tcp = TcpStream::connect(client.addr).await.unwrap();
        tcp.write_all(format!("CONNECT alice:s3cret@127.0.0.1:{port} HTTP/1.1\r\n\r\n").as_bytes()).await.unwrap();
        let mut established = vec![0u8; b"HTTP/1.1 200 Connection established\r\n\r\n".len()];
        tcp.read_exact(&mut established).await.unwrap();
        assert!(established.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&established));
        tcp.write_all(b"GET /tunnelled HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let tunnelled = read_until_closed(&mut tcp, Duration::from_secs(10)).await.unwrap();
        assert!(tunnelled.ends_with(b"ok"));

        let heads = heads.lock().unwrap().clone();
        assert_eq!(heads.len(), 2, "both requests reached the target: {heads:?}");
        assert!(heads[0].starts_with("GET /page HTTP/1.1\r\n"), "origin-form head: {}", heads[0]);
        let stats =
            request(api, "GET /api/connection-pool-stats HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n").await;
        assert!(stats.contains(&format!("127.0.0.1:{port}")), "the target is in the stats: {stats}");
        tokio::time::sleep(Duration::from_millis(300)).await; // the last log lines
        for (place, text) in [
            ("the client's log", client.process.log()),
            ("the server's log", server.process.log()),
            ("/api/connection-pool-stats", stats),
            ("the target's request heads", heads.join("")),
        ] {
            assert!(!text.contains("s3cret") && !text.contains("alice"), "credentials leaked into {place}:\n{text}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_with_a_bad_target_gets_a_local_400() {
    bounded(LIMIT, "bad CONNECT targets", async {
        let (server, client) = pair_with(&[], &[]).await;
        for target in ["127.0.0.1:99999", "127.0.0.1:0", "127.0.0.1", "exa mple.com:443", "::1:443", ":443"] {
            let answer = request(client.addr, &format!("CONNECT {target} HTTP/1.1\r\nHost: x\r\n\r\n")).await;
            assert!(answer.starts_with("HTTP/1.1 400 Bad Request"), "CONNECT {target}: {answer}");
        }
        // Our binaries log a stream as `stream ID -> DESTINATION` (server) and
        // `DESTINATION: stream ID open` (client).
        assert_eq!(count_lines(&server.process.log(), ": stream "), 0, "nothing reached the server");
        assert_eq!(count_lines(&client.process.log(), ": stream "), 0, "no stream was opened");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_credentials_every_protocol_on_the_port_asks_for_them() {
    bounded(LIMIT, "proxy authentication", async {
        let (_server, client) = pair_with(&[], &["--socks-user", "Aladdin", "--socks-pass", "open sesame"]).await;
        let echo = spawn_echo().await;

        let answer = request(client.addr, &format!("CONNECT {echo} HTTP/1.1\r\n\r\n")).await;
        assert!(answer.starts_with("HTTP/1.1 407"), "CONNECT without credentials: {answer}");
        assert!(answer.contains("Proxy-Authenticate: Basic"), "{answer}");
        let wrong = format!("CONNECT {echo} HTTP/1.1\r\nProxy-Authorization: Basic QWxhZGRpbjpvcGVu\r\n\r\n");
        assert!(request(client.addr, &wrong).await.starts_with("HTTP/1.1 407"));

        let mut tcp = TcpStream::connect(client.addr).await.unwrap();
        let right =
            format!("CONNECT {echo} HTTP/1.1\r\nproxy-authorization: basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==\r\n\r\n");
        tcp.write_all(right.as_bytes()).await.unwrap();
        let mut established = vec![0u8; b"HTTP/1.1 200 Connection established\r\n\r\n".len()];
        tcp.read_exact(&mut established).await.unwrap();
        assert!(established.starts_with(b"HTTP/1.1 200"));
        echo_roundtrip(tcp, b"authorised").await;

        // SOCKS4 has no password: refused.
        let (code, _) = socks4a_connect(client.addr, "127.0.0.1", echo.port()).await.unwrap();
        assert_eq!(code, 0x5b, "SOCKS4 with credentials configured");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_port_open_to_other_machines_without_credentials_is_warned_about() {
    bounded(LIMIT, "exposure warning", async {
        let server = start_server(PASSWORD, &[]).await;
        let pin = server.fingerprint.clone().expect("fingerprint");
        let start = |extra: &[&str]| {
            let mut command = Command::new(env!("CARGO_BIN_EXE_anytls-client"));
            command
                .args(["-l", "0.0.0.0:0", "-s", &server.addr.to_string(), "-p", PASSWORD, "--pin-sha256", &pin])
                .args(extra)
                .env("RUST_LOG", OUR_LOG_FILTER);
            Process::spawn("anytls-client", command)
        };
        let warning = "has no --socks-user";
        let mut open = start(&[]);
        open.wait_for(STARTUP_TIMEOUT, "`proxy on` line", |line| line.contains("proxy on ").then_some(())).await;
        assert!(open.log_shows(warning, Duration::from_secs(5)).await, "no warning:\n{}", open.log());
        let mut guarded = start(&["--socks-user", "u", "--socks-pass", "p"]);
        guarded.wait_for(STARTUP_TIMEOUT, "`proxy on` line", |line| line.contains("proxy on ").then_some(())).await;
        assert!(!guarded.log_shows(warning, Duration::from_millis(500)).await, "{}", guarded.log());
        let (_server, loopback) = pair_with(&[], &[]).await;
        assert!(!loopback.process.log_shows(warning, Duration::from_millis(500)).await);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_codes_say_whose_fault_it_was() {
    bounded(LIMIT, "reply codes", async {
        // Our own link to the server fails: a general failure / 502, not "target refused".
        let no_server = closed_port_addr();
        let client = start_client(no_server, PASSWORD, &["--insecure", "--connect-timeout-secs", "2"]).await;
        let echo = spawn_echo().await;
        let (code, _) = socks5_connect(client.addr, "127.0.0.1", echo.port()).await.unwrap();
        assert_eq!(code, SOCKS5_GENERAL, "server down: SOCKS5 code");
        let answer = request(client.addr, &format!("CONNECT {echo} HTTP/1.1\r\n\r\n")).await;
        assert!(answer.starts_with("HTTP/1.1 502"), "server down: {answer}");

        // The server at its own stream limit: 503; the target refusing: SOCKS5 0x05 / 502.
        let (_server, client) = pair_with(&["--max-streams", "1"], &["--max-streams-per-session", "4"]).await;
        let held = socks5_open(client.addr, echo).await;
        let answer = request(client.addr, &format!("CONNECT {echo} HTTP/1.1\r\n\r\n")).await;
        assert!(answer.starts_with("HTTP/1.1 503"), "server busy: {answer}");
        drop(held);
        let closed = closed_port_addr();
        let deadline = Instant::now() + Duration::from_secs(10);
        let code = loop {
            let (code, _) = socks5_connect(client.addr, "127.0.0.1", closed.port()).await.unwrap();
            // The held stream's place comes back once the server's relay for it ends.
            if code != SOCKS5_GENERAL || Instant::now() >= deadline {
                break code;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(code, SOCKS5_REFUSED, "target refused: SOCKS5 code");
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// The API's port

const TOKEN: &str = "tok3n";

async fn guarded_api(extra: &[&str]) -> (Server, SocketAddr) {
    let mut args = vec!["--api", "127.0.0.1:0", "--api-token", TOKEN];
    args.extend_from_slice(extra);
    let mut server = start_server(PASSWORD, &args).await;
    let api = api_address(&mut server.process).await;
    (server, api)
}

fn status(answer: &str) -> u16 {
    answer.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_api_header_is_cut_off_at_the_header_timeout() {
    bounded(LIMIT, "slow API header", async {
        let (_server, api) = guarded_api(&["--api-header-timeout-secs", "1"]).await;
        // Silent after the request line.
        let mut silent = TcpStream::connect(api).await.unwrap();
        silent.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
        let started = Instant::now();
        assert!(read_until_closed(&mut silent, Duration::from_secs(5)).await.is_some(), "silent header kept open");
        let silent_closed = started.elapsed();

        // Trickling a header line every 200 ms does not keep it open either.
        let mut trickle = TcpStream::connect(api).await.unwrap();
        trickle.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
        let started = Instant::now();
        let mut cut_off = None;
        for i in 0..40 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if trickle.write_all(format!("X-Slow-{i}: 1\r\n").as_bytes()).await.is_err() {
                cut_off = Some(started.elapsed());
                break;
            }
            let mut byte = [0u8; 1];
            if let Ok(Ok(0) | Err(_)) = tokio::time::timeout(Duration::from_millis(1), trickle.read(&mut byte)).await {
                cut_off = Some(started.elapsed());
                break;
            }
        }
        let cut_off = cut_off.expect("a trickled header was still open after 8 s");
        announce(&format!(
            "NOTE api header timeout 1 s: silent header closed after {silent_closed:?}, trickle after {cut_off:?}"
        ));
        assert!(silent_closed >= Duration::from_millis(800) && silent_closed < Duration::from_secs(4));
        assert!(cut_off < Duration::from_secs(4));

        // A prompt request is unaffected.
        let answer = request(
            api,
            &format!("GET /metrics HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert_eq!(status(&answer), 200, "{answer}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_connections_over_the_cap_are_refused() {
    bounded(LIMIT, "API connection cap", async {
        const CAP: usize = 4;
        let (server, api) = guarded_api(&["--api-max-connections", "4"]).await;
        let mut feeds = Vec::new();
        for _ in 0..CAP {
            let mut tcp = TcpStream::connect(api).await.unwrap();
            tcp.write_all(format!("GET /api/events?token={TOKEN} HTTP/1.1\r\nHost: api\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut seen = Vec::new();
            while !String::from_utf8_lossy(&seen).contains("event: snapshot") {
                let mut buf = [0u8; 4096];
                let n = tcp.read(&mut buf).await.unwrap();
                assert!(n > 0, "event feed closed");
                seen.extend_from_slice(&buf[..n]);
            }
            feeds.push(tcp);
        }
        let mut over = TcpStream::connect(api).await.unwrap();
        let answer = read_until_closed(&mut over, Duration::from_secs(5)).await.expect("over-cap connection closed");
        let answer = String::from_utf8_lossy(&answer).into_owned();
        assert_eq!(status(&answer), 503, "over the cap: {answer:?}");
        assert!(server.process.log_shows("refused at the cap of 4", Duration::from_secs(5)).await);

        // A freed slot is usable again.
        drop(feeds.pop());
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let answer =
                request(api, &format!("GET /metrics?token={TOKEN} HTTP/1.1\r\nConnection: close\r\n\r\n")).await;
            if status(&answer) == 200 {
                break;
            }
            assert!(Instant::now() < deadline, "no slot came free: {answer}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_token_scheme_is_case_insensitive_and_only_the_exact_token_passes() {
    bounded(LIMIT, "API token check", async {
        let (_server, api) = guarded_api(&[]).await;
        let with = |authorization: &str| {
            format!(
                "GET /api/memory-pool-stats HTTP/1.1\r\nauthorization: {authorization}\r\nConnection: close\r\n\r\n"
            )
        };
        for accepted in [format!("Bearer {TOKEN}"), format!("bearer {TOKEN}"), format!("BEARER {TOKEN}")] {
            assert_eq!(status(&request(api, &with(&accepted)).await), 200, "{accepted}");
        }
        let prefix = &TOKEN[..TOKEN.len() - 1];
        for refused in
            [format!("Bearer {prefix}"), format!("Bearer {TOKEN}x"), "Bearer TOK3N".into(), format!("Basic {TOKEN}")]
        {
            assert_eq!(status(&request(api, &with(&refused)).await), 401, "{refused}");
        }
    })
    .await;
}
