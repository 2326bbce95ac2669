//! End to end: our `anytls-client` ↔ our `anytls-server` as real processes on loopback,
//! driven through the client's local proxy port (SOCKS5, SOCKS4a, HTTP).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::*;

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

/// Uploads through the half-close target and downloads from a bulk target, for sizes
/// around the frame limit (65,535) and up to 16 MiB; digests must match both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_arrive_intact_both_directions() {
    bounded(Duration::from_secs(180), "payload sizes", async {
        let (_server, client) = start_pair().await;
        let upload_target = spawn_half_close().await;
        for (i, size) in [0, 1, 64 * KIB - 1, 64 * KIB, 64 * KIB + 1, MIB, 16 * MIB].into_iter().enumerate() {
            let data = payload(size, 100 + i as u64);

            let started = Instant::now();
            let tcp = socks5_open(client.addr, upload_target).await;
            let answer = exchange(tcp, &data).await;
            assert_eq!(String::from_utf8_lossy(&answer), half_close_answer(&data), "upload of {size} bytes");
            let up = started.elapsed();

            let started = Instant::now();
            let download_target = spawn_bulk(Arc::new(data.clone())).await;
            let mut tcp = socks5_open(client.addr, download_target).await;
            let received = read_all(&mut tcp).await;
            assert_eq!(received.len(), size, "download of {size} bytes: length");
            assert_eq!(sha256_hex(&received), sha256_hex(&data), "download of {size} bytes: digest");
            eprintln!("{size:>9} bytes: up {up:?}, down {:?}", started.elapsed());
        }
    })
    .await;
}

/// 200 streams at once, each echoing its own payload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_streams_echo_distinct_payloads() {
    bounded(Duration::from_secs(120), "200 concurrent streams", async {
        let (server, client) = start_pair().await;
        let echo = spawn_echo().await;
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..200u64 {
            let proxy = client.addr;
            tasks.spawn(async move {
                let data = payload(1000 + (i as usize * 97) % (20 * KIB), i);
                let tcp = socks5_open(proxy, echo).await;
                echo_roundtrip(tcp, &data).await;
            });
        }
        let mut done = 0;
        while let Some(result) = tasks.join_next().await {
            result.expect("stream task");
            done += 1;
        }
        assert_eq!(done, 200);
        // The server relayed them all.
        assert!(server.process.wait_lines(&[" -> "], 200, Duration::from_secs(10)).await, "server saw < 200 streams");
    })
    .await;
}

/// The client shuts its write side; the target sees EOF, and its answer still comes
/// back over the half-open stream, followed by EOF.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_reaches_the_target_and_the_answer_still_arrives() {
    bounded(Duration::from_secs(60), "half-close", async {
        let (_server, client) = start_pair().await;
        let target = spawn_half_close().await;
        let data = payload(300 * KIB + 7, 7);
        let tcp = socks5_open(client.addr, target).await;
        let (mut reader, mut writer) = tcp.into_split();
        writer.write_all(&data).await.unwrap();
        writer.shutdown().await.unwrap();
        // The target answers only after EOF; reading to EOF proves both directions.
        let mut answer = Vec::new();
        reader.read_to_end(&mut answer).await.unwrap();
        assert_eq!(String::from_utf8_lossy(&answer), half_close_answer(&data));
        drop(writer);
    })
    .await;
}

/// A refused dial gives SOCKS5 code 5 quickly, on the same session, which keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_dial_is_socks_code_5_and_the_session_keeps_working() {
    bounded(Duration::from_secs(60), "refused dial", async {
        let (server, client) = start_pair().await;
        let echo = spawn_echo().await;

        echo_roundtrip(socks5_open(client.addr, echo).await, b"before").await;
        client.wait_done(1).await;

        let closed = closed_port_addr();
        let started = Instant::now();
        let (code, _tcp) = socks5_connect(client.addr, "127.0.0.1", closed.port()).await.unwrap();
        assert_eq!(code, SOCKS5_REFUSED, "reply code for a refused dial");
        assert!(started.elapsed() < Duration::from_secs(5), "refusal took {:?}", started.elapsed());
        client.wait_done(2).await;

        echo_roundtrip(socks5_open(client.addr, echo).await, b"after").await;
        client.wait_done(3).await;

        // The server's log is read from its pipe by a thread: wait for the lines, not once.
        let logged = server.process.wait_lines(&["connection refused", "stream 3 ->"], 2, Duration::from_secs(5)).await;
        let server_log = server.process.log();
        assert!(server_log.contains("connection refused"), "server should log the refused dial:\n{server_log}");
        assert!(logged && server_log.contains("stream 3 ->"), "third stream on the same session:\n{server_log}");
        assert_eq!(count_lines(&server_log, "session open"), 1, "all three requests on one session:\n{server_log}");
    })
    .await;
}

/// A wrong password: the request fails with SOCKS general failure within 5 s and the
/// client says why (the server itself stays silent on the wire).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_fails_fast_with_a_clear_message() {
    bounded(Duration::from_secs(60), "wrong password", async {
        let server = start_server(PASSWORD, &[]).await;
        let pin = server.fingerprint.clone().unwrap();
        let client = start_client(server.addr, "not-the-password", &["--pin-sha256", &pin]).await;
        let echo = spawn_echo().await;

        let started = Instant::now();
        let (code, mut tcp) = socks5_connect(client.addr, "127.0.0.1", echo.port()).await.unwrap();
        assert_eq!(code, SOCKS5_GENERAL, "reply code for a wrong password");
        assert!(started.elapsed() < Duration::from_secs(5), "failure took {:?}", started.elapsed());
        assert!(read_all(&mut tcp).await.is_empty(), "no data after a failure reply");

        assert!(
            client.process.log_shows("password", Duration::from_secs(5)).await,
            "client log should mention the password:\n{}",
            client.process.log()
        );
        assert!(
            server.process.log_shows("wrong password", Duration::from_secs(5)).await,
            "server log should say why it closed:\n{}",
            server.process.log()
        );
        // A second attempt fails the same way (no hang, no stale session).
        let (code, _tcp) = bounded(Duration::from_secs(5), "second attempt", async {
            socks5_connect(client.addr, "127.0.0.1", echo.port()).await.unwrap()
        })
        .await;
        assert_eq!(code, SOCKS5_GENERAL);
    })
    .await;
}

/// Sequential requests share one session: the server sees stream ids 1..=4 on one
/// session, the client logs opening stream 2 and later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_requests_reuse_the_session() {
    bounded(Duration::from_secs(60), "session reuse", async {
        let (server, client) = start_pair().await;
        let (http, served) = spawn_http().await;
        for i in 1..=4 {
            let mut tcp = socks5_open(client.addr, http).await;
            let path = format!("/request-{i}");
            let request = format!("GET {path} HTTP/1.1\r\nHost: {http}\r\nConnection: close\r\n\r\n");
            tcp.write_all(request.as_bytes()).await.unwrap();
            let (head, body) = split_http_response(&read_all(&mut tcp).await);
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            assert_eq!(body, http_body_for(&path));
            drop(tcp);
            client.wait_done(i).await;
        }
        assert_eq!(served.load(std::sync::atomic::Ordering::Relaxed), 4);
        let client_log = client.process.log();
        for id in 1..=4 {
            assert!(client_log.contains(&format!("stream {id} open")), "client stream {id}:\n{client_log}");
        }
        let logged = server.process.wait_lines(&["stream 2 ->", "stream 4 ->"], 2, Duration::from_secs(5)).await;
        let server_log = server.process.log();
        assert!(logged && server_log.contains("stream 2 ->") && server_log.contains("stream 4 ->"), "{server_log}");
        assert_eq!(count_lines(&server_log, "session open"), 1, "one session for all:\n{server_log}");
    })
    .await;
}

/// HTTP CONNECT and a plain `GET http://…` through the same local port (and a refused
/// CONNECT as 502).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_connect_and_plain_get_share_the_port() {
    bounded(Duration::from_secs(60), "HTTP proxy", async {
        let (_server, client) = start_pair().await;
        let echo = spawn_echo().await;
        let (http, _) = spawn_http().await;

        let mut tcp = TcpStream::connect(client.addr).await.unwrap();
        tcp.write_all(format!("CONNECT {echo} HTTP/1.1\r\nHost: {echo}\r\n\r\n").as_bytes()).await.unwrap();
        let head = read_http_head(&mut tcp).await;
        assert!(head.starts_with("HTTP/1.1 200"), "CONNECT answer: {head}");
        echo_roundtrip(tcp, &payload(100 * KIB, 3)).await;

        let mut tcp = TcpStream::connect(client.addr).await.unwrap();
        let request = format!(
            "GET http://{http}/plain?x=1 HTTP/1.1\r\nHost: {http}\r\nProxy-Connection: keep-alive\r\nAccept: */*\r\n\r\n"
        );
        tcp.write_all(request.as_bytes()).await.unwrap();
        let (head, body) = split_http_response(&read_all(&mut tcp).await);
        assert!(head.starts_with("HTTP/1.1 200"), "GET answer: {head}");
        assert_eq!(body, http_body_for("/plain?x=1"));

        let closed = closed_port_addr();
        let mut tcp = TcpStream::connect(client.addr).await.unwrap();
        tcp.write_all(format!("CONNECT {closed} HTTP/1.1\r\nHost: {closed}\r\n\r\n").as_bytes()).await.unwrap();
        let head = read_http_head(&mut tcp).await;
        assert!(head.starts_with("HTTP/1.1 502"), "refused CONNECT answer: {head}");
    })
    .await;
}

/// Reads an HTTP response head (up to the blank line), leaving the rest unread.
async fn read_http_head(tcp: &mut TcpStream) -> String {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let byte = tcp.read_u8().await.expect("HTTP head");
        head.push(byte);
        assert!(head.len() < 16 * KIB, "HTTP head too long");
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// SOCKS4a with a host name (resolved by the server), and SOCKS5 with a domain too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks4a_and_socks5_domain_names() {
    bounded(Duration::from_secs(60), "SOCKS4a", async {
        let (_server, client) = start_pair().await;
        let echo = spawn_echo().await;

        let (code, tcp) = socks4a_connect(client.addr, "localhost", echo.port()).await.unwrap();
        assert_eq!(code, 0x5a, "SOCKS4a reply");
        echo_roundtrip(tcp, &payload(10 * KIB, 4)).await;

        let (code, tcp) = socks5_connect(client.addr, "localhost", echo.port()).await.unwrap();
        assert_eq!(code, SOCKS5_OK, "SOCKS5 domain reply");
        echo_roundtrip(tcp, &payload(10 * KIB, 5)).await;

        let closed = closed_port_addr();
        let (code, _tcp) = socks4a_connect(client.addr, "127.0.0.1", closed.port()).await.unwrap();
        assert_eq!(code, 0x5b, "SOCKS4a reply for a refused dial");
    })
    .await;
}

/// A pin that does not match: the request fails, and the client names --pin-sha256 and
/// --insecure in its message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_pin_fails_and_names_the_flags() {
    bounded(Duration::from_secs(60), "wrong pin", async {
        let server = start_server(PASSWORD, &[]).await;
        let wrong_pin = "00".repeat(32);
        let client = start_client(server.addr, PASSWORD, &["--pin-sha256", &wrong_pin]).await;
        let echo = spawn_echo().await;
        let started = Instant::now();
        let (code, _tcp) = socks5_connect(client.addr, "127.0.0.1", echo.port()).await.unwrap();
        assert_eq!(code, SOCKS5_GENERAL);
        assert!(started.elapsed() < Duration::from_secs(5), "failure took {:?}", started.elapsed());
        assert!(client.process.log_shows("--pin-sha256", Duration::from_secs(5)).await, "{}", client.process.log());
        assert!(client.process.log().contains("--insecure"), "{}", client.process.log());
    })
    .await;
}

/// No trust flags against a self-signed server: a clear failure that says what to pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_signed_server_without_trust_flags_fails_clearly() {
    bounded(Duration::from_secs(60), "untrusted certificate", async {
        let server = start_server(PASSWORD, &[]).await;
        let client = start_client(server.addr, PASSWORD, &[]).await;
        let echo = spawn_echo().await;
        let (code, _tcp) = socks5_connect(client.addr, "127.0.0.1", echo.port()).await.unwrap();
        assert_eq!(code, SOCKS5_GENERAL);
        assert!(
            client.process.log_shows("certificate was not accepted", Duration::from_secs(5)).await,
            "{}",
            client.process.log()
        );
        let log = client.process.log();
        for flag in ["--ca", "--pin-sha256", "--insecure"] {
            assert!(log.contains(flag), "message should name {flag}:\n{log}");
        }
    })
    .await;
}

/// The other trust modes work: --insecure, and --ca with a private CA (server given
/// --cert/--key), with and without --sni.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insecure_and_private_ca_trust_modes_work() {
    bounded(Duration::from_secs(60), "trust modes", async {
        let echo = spawn_echo().await;

        let server = start_server(PASSWORD, &[]).await;
        let client = start_client(server.addr, PASSWORD, &["--insecure"]).await;
        echo_roundtrip(socks5_open(client.addr, echo).await, b"insecure").await;

        let dir = TempDir::new("e2e-ca");
        let pki = TestPki::write_to(dir.path());
        let cert = pki.server_cert.to_str().unwrap();
        let key = pki.server_key.to_str().unwrap();
        let ca = pki.ca_cert.to_str().unwrap();
        let server = start_server(PASSWORD, &["--cert", cert, "--key", key]).await;
        assert!(server.fingerprint.is_none(), "no self-signed certificate when --cert is given");
        for sni in [&["--sni", "localhost"][..], &[][..]] {
            let mut args = vec!["--ca", ca];
            args.extend_from_slice(sni);
            let client = start_client(server.addr, PASSWORD, &args).await;
            echo_roundtrip(socks5_open(client.addr, echo).await, b"private CA").await;
        }
        // The CA does not vouch for another name.
        let client = start_client(server.addr, PASSWORD, &["--ca", ca, "--sni", "other.example"]).await;
        let (code, _tcp) = socks5_connect(client.addr, "127.0.0.1", echo.port()).await.unwrap();
        assert_eq!(code, SOCKS5_GENERAL, "a name the certificate does not cover");
    })
    .await;
}

/// An SSH-like stream that carries nothing for several heartbeat intervals survives on
/// loopback, where each heartbeat's answer arrives within the same millisecond.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_stream_survives_several_heartbeats_on_loopback() {
    bounded(Duration::from_secs(60), "quiet stream", async {
        let server = start_server(PASSWORD, &[]).await;
        let pin = server.fingerprint.clone().unwrap();
        let heartbeat = ["--heartbeat-interval-secs", "1", "--heartbeat-timeout-secs", "1"];
        let client = start_client(server.addr, PASSWORD, &[&["--pin-sha256", &pin][..], &heartbeat].concat()).await;
        let echo = spawn_echo().await;
        let mut tcp = socks5_open(client.addr, echo).await;
        let mut back = [0u8; 5];
        tcp.write_all(b"hello").await.unwrap();
        tcp.read_exact(&mut back).await.unwrap();
        tokio::time::sleep(Duration::from_secs(8)).await;
        tcp.write_all(b"again").await.unwrap();
        let answered = tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut back)).await;
        let log = client.process.log();
        assert!(matches!(answered, Ok(Ok(_))), "the quiet stream was dropped; client log:\n{log}");
        assert_eq!(&back, b"again");
        assert_eq!(count_lines(&log, "no answer to a heartbeat"), 0, "{log}");
        assert!(count_lines(&log, "heartbeat") >= 3, "fewer than 3 heartbeats in 8 s of quiet:\n{log}");
    })
    .await;
}
