//! Several servers behind one client, as real processes on loopback: a server killed
//! under load (traffic moves to the next after at most the threshold's worth of
//! failures), the same server restarted on its port (traffic returns to it), and
//! round-robin spreading connections.
//!
//! Every wait is bounded, and processes are killed when their handle drops (also when
//! a test panics).

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::{OUR_LOG_FILTER, Process, spawn_echo};

const PASSWORD: &str = "failover-secret";
const STARTUP: Duration = Duration::from_secs(20);
const THRESHOLD: usize = 3;

/// The address in a `listening on ADDR (…)` line.
fn listening_address(line: &str) -> Option<SocketAddr> {
    line.split("listening on ").nth(1)?.split(' ').next()?.parse().ok()
}

/// Starts a server on `listen`; `None` when it exits first (e.g. the port is not free yet).
async fn start_server(listen: &str) -> Option<(Process, SocketAddr)> {
    let mut command = Command::new(env!("CARGO_BIN_EXE_anytls-server"));
    command.args(["-l", listen, "-p", PASSWORD]).env("RUST_LOG", OUR_LOG_FILTER);
    let mut process = Process::spawn("anytls-server", command);
    let deadline = Instant::now() + STARTUP;
    loop {
        if let Some(addr) = process.log().lines().find_map(listening_address) {
            return Some((process, addr));
        }
        if !process.is_running() {
            return None;
        }
        assert!(Instant::now() < deadline, "anytls-server did not start in {STARTUP:?}:\n{}", process.log());
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Restarts a server on the port it had; the port may take a moment to be free again.
async fn restart_server(addr: SocketAddr) -> Process {
    let deadline = Instant::now() + STARTUP;
    loop {
        if let Some((process, _)) = start_server(&addr.to_string()).await {
            return process;
        }
        assert!(Instant::now() < deadline, "cannot restart the server on {addr}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn start_client(servers: &[SocketAddr], extra: &[&str]) -> (Process, SocketAddr) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_anytls-client"));
    command.args(["-l", "127.0.0.1:0", "-p", PASSWORD, "--insecure"]).env("RUST_LOG", OUR_LOG_FILTER);
    for server in servers {
        command.args(["-s", &server.to_string()]);
    }
    command.args(extra);
    let mut process = Process::spawn("anytls-client", command);
    let addr = process
        .wait_for(STARTUP, "`proxy on` line", |line| line.split("proxy on ").nth(1)?.split(',').next()?.parse().ok())
        .await;
    (process, addr)
}

/// One request through the proxy: SOCKS5 CONNECT to the echo target, a message and its
/// echo, all within a few seconds.
async fn request(proxy: SocketAddr, target: SocketAddr, n: usize) -> Result<(), String> {
    let attempt = async {
        let mut tcp = TcpStream::connect(proxy).await.map_err(|e| e.to_string())?;
        tcp.write_all(&[5, 1, 0]).await.map_err(|e| e.to_string())?;
        let mut method = [0u8; 2];
        tcp.read_exact(&mut method).await.map_err(|e| e.to_string())?;
        let mut connect = vec![5, 1, 0, 1];
        connect.extend_from_slice(&[127, 0, 0, 1]);
        connect.extend_from_slice(&target.port().to_be_bytes());
        tcp.write_all(&connect).await.map_err(|e| e.to_string())?;
        let mut reply = [0u8; 10];
        tcp.read_exact(&mut reply).await.map_err(|e| e.to_string())?;
        if reply[1] != 0 {
            return Err(format!("SOCKS5 reply code {}", reply[1]));
        }
        let message = format!("request {n}");
        tcp.write_all(message.as_bytes()).await.map_err(|e| e.to_string())?;
        let mut echo = vec![0u8; message.len()];
        tcp.read_exact(&mut echo).await.map_err(|e| e.to_string())?;
        if echo != message.as_bytes() {
            return Err("echo differs".into());
        }
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(8), attempt).await.map_err(|_| "timed out".to_string())?
}

/// Streams a server served to `target` (its DEBUG line `stream N -> TARGET`).
fn streams_to(server: &Process, target: SocketAddr) -> usize {
    let needle = format!("-> {target} (");
    server.log().lines().filter(|line| line.contains(&needle)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_survives_a_killed_server_and_returns_when_it_is_back() {
    let echo = spawn_echo().await;
    let (primary, primary_addr) = start_server("127.0.0.1:0").await.unwrap();
    let (standby, standby_addr) = start_server("127.0.0.1:0").await.unwrap();
    let threshold = THRESHOLD.to_string();
    let (client, proxy) = start_client(
        &[primary_addr, standby_addr],
        &["--fallback-threshold", &threshold, "--probe-interval-secs", "1"],
    )
    .await;

    for n in 0..5 {
        request(proxy, echo, n).await.unwrap_or_else(|why| panic!("request {n}: {why}\n{}", client.log()));
    }
    assert_eq!(streams_to(&primary, echo), 5, "failover uses the first server while it works");
    assert_eq!(streams_to(&standby, echo), 0);

    // Load: requests one after another while the primary is killed.
    let load = tokio::spawn(async move {
        let mut results = Vec::new();
        for n in 0..60 {
            results.push(request(proxy, echo, 100 + n).await);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        results
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(primary);
    let results = load.await.unwrap();
    let failures: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    eprintln!("{} of {} requests failed around the kill: {failures:?}", failures.len(), results.len());
    // The threshold's worth of failed connects, plus at most the one request in flight
    // when the process died.
    assert!(
        failures.len() <= THRESHOLD + 1,
        "{} failures: {failures:?}\nclient log:\n{}",
        failures.len(),
        client.log()
    );
    assert!(results.iter().rev().take(20).all(Result::is_ok), "the last requests all succeed: {results:?}");
    assert!(streams_to(&standby, echo) > 0, "the standby took over");

    // The primary comes back on its port: probes find it and traffic returns.
    let primary = restart_server(primary_addr).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut n = 1000;
    while streams_to(&primary, echo) == 0 {
        assert!(Instant::now() < deadline, "traffic did not return to the primary\nclient log:\n{}", client.log());
        request(proxy, echo, n).await.unwrap_or_else(|why| panic!("request {n}: {why}"));
        n += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let standby_before = streams_to(&standby, echo);
    for n in 2000..2005 {
        request(proxy, echo, n).await.unwrap_or_else(|why| panic!("request {n}: {why}"));
    }
    assert_eq!(streams_to(&standby, echo), standby_before, "back on the primary, the standby is idle again");
    drop(standby);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_new_connections_over_the_servers() {
    let echo = spawn_echo().await;
    let (one, one_addr) = start_server("127.0.0.1:0").await.unwrap();
    let (two, two_addr) = start_server("127.0.0.1:0").await.unwrap();
    let (_client, proxy) = start_client(&[one_addr, two_addr], &["--policy", "round-robin"]).await;
    for n in 0..10 {
        request(proxy, echo, n).await.unwrap_or_else(|why| panic!("request {n}: {why}"));
    }
    assert_eq!((streams_to(&one, echo), streams_to(&two, echo)), (5, 5));
}
