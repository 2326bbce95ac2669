//! The pools end to end, for each `--pool-type`: repeated requests to one target are
//! served from warm connections (server) and idle sessions (client), and idle warm
//! connections are cleaned after a short `--max-idle-time-secs`. Everything is read off
//! the `[Pool Stats]` / `[Pool Status]` lines the binaries log.

mod common;

use std::time::Duration;

use common::*;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct PoolStats {
    total: u64,
    active: u64,
    reused: u64,
    new: u64,
    cleaned: u64,
}

/// Parses the numbers of a `[Pool Stats] Total: 15, Active: 3, …` line.
fn parse_stats(line: &str) -> Option<PoolStats> {
    let fields = line.split("[Pool Stats] ").nth(1)?;
    let value = |name: &str| -> Option<u64> {
        let rest = fields.split(&format!("{name}: ")).nth(1)?;
        rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
    };
    Some(PoolStats {
        total: value("Total")?,
        active: value("Active")?,
        reused: value("Reused")?,
        new: value("New")?,
        cleaned: value("Cleaned")?,
    })
}

fn last_stats(log: &str) -> Option<PoolStats> {
    log.lines().rev().find_map(parse_stats)
}

fn last_status(log: &str) -> Option<String> {
    log.lines().rev().find_map(|line| line.split("[Pool Status] ").nth(1).map(str::to_string))
}

/// Waits until the last stats line in `process`'s log satisfies `ok`.
async fn wait_stats(process: &Process, what: &str, ok: impl Fn(&PoolStats) -> bool) -> PoolStats {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(stats) = last_stats(&process.log()).filter(|s| ok(s)) {
            return stats;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}: no stats line with {what} in 15 s; last: {:?}\nlog:\n{}",
            process.name(),
            last_stats(&process.log()),
            process.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn warm_reuse_then_idle_cleanup(pool_type: &str) {
    let target = spawn_echo().await;
    let server = start_server(
        PASSWORD,
        &[
            "--pool-type",
            pool_type,
            "--min-idle-connections",
            "2",
            // Demand must last 300 ms before the target is warmed: the third stream below
            // comes at least that long after the first.
            "--warm-after-ms",
            "300",
            "--max-idle-time-secs",
            "2",
            "--stats-interval-secs",
            "1",
        ],
    )
    .await;
    let pin = server.fingerprint.clone().expect("self-signed fingerprint");
    let client = start_client(
        server.addr,
        PASSWORD,
        &["--pin-sha256", &pin, "--pool-type", pool_type, "--stats-interval-secs", "1"],
    )
    .await;
    // Logged as serving starts, just after the `listening on` line start_server waits for.
    let configuration = format!("outbound pool: type {pool_type}, max 100 connections per target");
    assert!(
        server.process.log_shows(&configuration, Duration::from_secs(5)).await,
        "start-up line names the pool configuration:\n{}",
        server.process.log()
    );

    const REQUESTS: u64 = 10;
    for i in 0..REQUESTS {
        let tcp = socks5_open(client.addr, target).await;
        echo_roundtrip(tcp, &payload(2000, i)).await;
        client.wait_done(i as usize + 1).await;
        // Room for the background refill, as between a user's clicks.
        tokio::time::sleep(Duration::from_millis(150)).await;
    }

    // Server: dials until the demand has lasted 300 ms (at most the first three streams,
    // 150 ms or more apart), every later stream served warm.
    let server_stats = wait_stats(&server.process, "Total >= 10", |s| s.total >= REQUESTS).await;
    assert_eq!(server_stats.total, REQUESTS, "{pool_type}: {server_stats:?}");
    assert!(server_stats.new <= 3, "{pool_type}: New stays near the minimum: {server_stats:?}");
    assert!(server_stats.reused >= REQUESTS - 3, "{pool_type}: Reused grows: {server_stats:?}");
    assert!(server.process.log().contains("Reuse rate: "), "reuse rate is logged");
    // Client: sequential requests ride one session.
    let client_stats = wait_stats(&client.process, "Total >= 10", |s| s.total >= REQUESTS).await;
    assert_eq!(client_stats.new, 1, "{pool_type}: one session for sequential requests: {client_stats:?}");
    assert_eq!(client_stats.reused, REQUESTS - 1, "{pool_type}: {client_stats:?}");

    // Quiet for longer than --max-idle-time-secs: the warm one (sequential requests keep one)
    // is cleaned, none refilled.
    let cleaned =
        wait_stats(&server.process, "Cleaned >= 1 and nothing active", |s| s.cleaned >= 1 && s.active == 0).await;
    assert!(
        server.process.log().contains(&format!("Unused: {}", cleaned.cleaned)),
        "{pool_type}: the cleaned warm connections were closed unused:\n{}",
        server.process.log()
    );
    assert_eq!(cleaned.total, REQUESTS, "{pool_type}: no traffic meanwhile: {cleaned:?}");
    // A warm connection refilled just before the target went quiet lives one more idle
    // period (2 s); after that none is left and none is made.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while last_status(&server.process.log()).as_deref() != Some("{}") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{pool_type}: warm connections left:\n{}",
            server.process.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let settled = last_stats(&server.process.log()).unwrap();
    assert_eq!(settled.total, REQUESTS, "{pool_type}: {settled:?}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        last_status(&server.process.log()).as_deref(),
        Some("{}"),
        "{pool_type}: a quiet target is not refilled"
    );
}

#[tokio::test]
async fn lock_pool_serves_warm_connections_and_cleans_idle_ones() {
    bounded(Duration::from_secs(60), "lock pool", warm_reuse_then_idle_cleanup("lock")).await;
}

#[tokio::test]
async fn lockfree_pool_serves_warm_connections_and_cleans_idle_ones() {
    bounded(Duration::from_secs(60), "lockfree pool", warm_reuse_then_idle_cleanup("lockfree")).await;
}

#[tokio::test]
async fn highperf_pool_serves_warm_connections_and_cleans_idle_ones() {
    bounded(Duration::from_secs(60), "highperf pool", warm_reuse_then_idle_cleanup("highperf")).await;
}

#[tokio::test]
async fn an_invalid_pool_type_is_refused_with_the_three_names() {
    let server_args: &[&str] = &["-p", "x"];
    let client_args: &[&str] = &["-p", "x", "-s", "127.0.0.1:1"];
    for (binary, args) in
        [(env!("CARGO_BIN_EXE_anytls-server"), server_args), (env!("CARGO_BIN_EXE_anytls-client"), client_args)]
    {
        let output = std::process::Command::new(binary)
            .args(args)
            .args(["--pool-type", "fastest"])
            .output()
            .expect("binary runs");
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("lock") && stderr.contains("lockfree") && stderr.contains("highperf"), "{stderr}");
    }
}

#[tokio::test]
async fn streams_beyond_the_per_target_limit_are_dialed_unpooled_not_refused() {
    bounded(Duration::from_secs(60), "unpooled streams", async {
        let target = spawn_echo().await;
        let server = start_server(
            PASSWORD,
            &["--max-outbound-connections", "1", "--min-idle-connections", "0", "--stats-interval-secs", "1"],
        )
        .await;
        let pin = server.fingerprint.clone().unwrap();
        let client = start_client(server.addr, PASSWORD, &["--pin-sha256", &pin]).await;
        // The one pooled place is held by a live stream; three more streams still open.
        let _held = socks5_open(client.addr, target).await;
        let more: Vec<_> = futures_util::future::join_all((0..3).map(|_| socks5_open(client.addr, target))).await;
        for (i, tcp) in more.into_iter().enumerate() {
            echo_roundtrip(tcp, &payload(100, i as u64)).await;
        }
        assert!(
            server.process.log_shows("Unpooled: 3", Duration::from_secs(5)).await,
            "the stats line counts streams dialed beyond the limit:\n{}",
            server.process.log()
        );
        assert!(!server.process.log().contains("exhausted"));
    })
    .await;
}
