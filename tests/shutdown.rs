//! Graceful shutdown of both binaries: on SIGTERM/SIGINT they stop accepting, let
//! streams in flight finish within `--shutdown-timeout-secs`, close their pools, log
//! the final `[Pool Stats]` line and exit 0.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use common::*;

/// Answers every connection after `delay` with `late answer`, then closes.
async fn spawn_slow_target(delay: Duration) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = tcp.write_all(b"late answer").await;
                let _ = tcp.shutdown().await;
                let mut sink = [0u8; 256];
                while matches!(tcp.read(&mut sink).await, Ok(n) if n > 0) {}
            });
        }
    });
    addr
}

async fn read_to_end(mut tcp: TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = tcp.read_to_end(&mut out).await;
    out
}

/// Waits for a clean exit (code 0) within `limit` and returns how long it took.
async fn expect_clean_exit(process: &mut Process, limit: Duration) -> Duration {
    let started = Instant::now();
    let status = process.wait_exit(limit).await;
    let status = status.unwrap_or_else(|| panic!("{} still running {limit:?} after the signal", process.name()));
    assert!(status.success(), "{} exited with {status}; log:\n{}", process.name(), process.log());
    started.elapsed()
}

fn assert_final_stats_after(log: &str, marker: &str) {
    let after = log.split(marker).nth(1).unwrap_or_else(|| panic!("no `{marker}` in log:\n{log}"));
    assert!(after.contains("[Pool Stats]"), "no final [Pool Stats] line after `{marker}`; log:\n{log}");
    assert!(after.contains("shut down:"), "no `shut down:` line; log:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_drains_a_stream_in_flight_then_exits_zero_on_sigterm() {
    bounded(Duration::from_secs(60), "server SIGTERM", async {
        let mut server = start_server(PASSWORD, &["--shutdown-timeout-secs", "5"]).await;
        let pin = server.fingerprint.clone().unwrap();
        let client = start_client(server.addr, PASSWORD, &["--pin-sha256", &pin]).await;
        let target = spawn_slow_target(Duration::from_millis(1500)).await;
        let in_flight = socks5_open(client.addr, target).await;
        assert!(server.process.log_shows(" -> ", Duration::from_secs(5)).await, "stream reached the server");

        server.process.signal("TERM");
        let answer = read_to_end(in_flight).await;
        assert_eq!(answer, b"late answer", "the stream in flight finished during the drain");
        let took = expect_clean_exit(&mut server.process, Duration::from_secs(8)).await;
        eprintln!("server exited {took:?} after the stream ended");
        let log = server.process.log();
        assert_final_stats_after(&log, "SIGTERM received");
        // The port is closed.
        assert!(TcpStream::connect(server.addr).await.is_err(), "still accepting after shutdown");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_cuts_off_streams_at_the_shutdown_timeout() {
    bounded(Duration::from_secs(60), "server drain timeout", async {
        let mut server = start_server(PASSWORD, &["--shutdown-timeout-secs", "1"]).await;
        let pin = server.fingerprint.clone().unwrap();
        let client = start_client(server.addr, PASSWORD, &["--pin-sha256", &pin]).await;
        let target = spawn_slow_target(Duration::from_secs(3600)).await;
        let stuck = socks5_open(client.addr, target).await;
        assert!(server.process.log_shows(" -> ", Duration::from_secs(5)).await);
        let started = Instant::now();
        server.process.signal("INT");
        expect_clean_exit(&mut server.process, Duration::from_secs(5)).await;
        assert!(started.elapsed() >= Duration::from_millis(900), "waited for the drain time");
        assert_final_stats_after(&server.process.log(), "SIGINT received");
        assert!(server.process.log().contains("1 streams still open after the drain time"));
        // The client's side of the stream ends too (its session was closed).
        let ended = tokio::time::timeout(Duration::from_secs(5), read_to_end(stuck)).await;
        assert!(ended.is_ok(), "the local connection ended when the server went away");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_drains_a_connection_in_flight_closes_idle_sessions_and_exits_zero() {
    bounded(Duration::from_secs(60), "client SIGTERM", async {
        let server = start_server(PASSWORD, &[]).await;
        let pin = server.fingerprint.clone().unwrap();
        let mut client =
            start_client(server.addr, PASSWORD, &["--pin-sha256", &pin, "--shutdown-timeout-secs", "5"]).await;
        // One finished request leaves an idle session in the pool.
        let echo = spawn_echo().await;
        echo_roundtrip(socks5_open(client.addr, echo).await, b"warm").await;
        client.wait_done(1).await;
        let target = spawn_slow_target(Duration::from_millis(1500)).await;
        let in_flight = socks5_open(client.addr, target).await;

        client.process.signal("TERM");
        let answer = read_to_end(in_flight).await;
        assert_eq!(answer, b"late answer");
        expect_clean_exit(&mut client.process, Duration::from_secs(8)).await;
        let log = client.process.log();
        assert_final_stats_after(&log, "SIGTERM received");
        let closed: usize = log
            .lines()
            .find_map(|line| line.split("shut down: ").nth(1)?.split(' ').next()?.parse().ok())
            .expect("count of closed sessions");
        assert!(closed >= 1, "the idle sessions were closed; log:\n{log}");
        assert!(TcpStream::connect(client.addr).await.is_err(), "still accepting after shutdown");
    })
    .await;
}
