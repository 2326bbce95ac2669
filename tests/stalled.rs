//! Stalled uploads: a thousand local connections push data through our pair at a target
//! that never reads, and what each process holds is measured against the per-stream
//! buffer bound. A file of its own, so that no other test's processes run beside it:
//! the figure is memory the two processes hold, and parallel tests on a 2-core machine
//! change how much data is in flight when the streams stall.

mod common;

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use common::*;

/// A thousand local connections each push 1 MiB through our client at a target that
/// never reads. Each stream holds at most its buffer each way in either process, so both
/// stay within 100 MiB of where they started (before, at 4 MiB each: server +404 MiB,
/// client +762 MiB); a healthy stream goes on. `ANYTLS_STALLED=N` changes the count,
/// `ANYTLS_STALLED_MIB` the push, `ANYTLS_STREAM_BUFFER_KIB` both sides' buffer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_stalled_uploads_hold_each_side_within_100_mib() {
    const BOUND_MIB: u64 = 100;
    let streams: usize = std::env::var("ANYTLS_STALLED").ok().and_then(|n| n.parse().ok()).unwrap_or(1000);
    // 1 MiB each by default: 4 MiB x 1,000 (the hardening pass's shape) is more than this
    // machine's kernel lets TCP buffer in all (tcp_mem), and past that the kernel resets
    // connections, the healthy one among them (docs/hardening.md).
    let push_mib: usize = std::env::var("ANYTLS_STALLED_MIB").ok().and_then(|n| n.parse().ok()).unwrap_or(1);
    bounded(Duration::from_secs(240), "stalled uploads", async {
        // ANYTLS_STREAM_BUFFER_KIB sets --stream-buffer-kib on both sides (to measure others).
        let buffer = std::env::var("ANYTLS_STREAM_BUFFER_KIB").ok();
        let mut server_args = vec!["--max-outbound-connections", "2000"];
        server_args.extend(buffer.as_deref().map(|kib| ["--stream-buffer-kib", kib]).into_iter().flatten());
        let server = start_server(PASSWORD, &server_args).await;
        let pin = server.fingerprint.clone().unwrap();
        let mut client_args = vec!["--pin-sha256", pin.as_str()];
        client_args.extend(buffer.as_deref().map(|kib| ["--stream-buffer-kib", kib]).into_iter().flatten());
        let client = start_client(server.addr, PASSWORD, &client_args).await;
        let (server_pid, client_pid) = (server.process.pid(), client.process.pid());
        let (sink, echo) = (spawn_sink_that_never_reads().await, spawn_echo().await);
        let healthy = Healthy::start(client.addr, echo, Duration::from_millis(20)).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = (rss_kib(server_pid), rss_kib(client_pid));
        let data = Arc::new(payload(push_mib << 20, 11));
        let mut uploads = tokio::task::JoinSet::new();
        let opening = Arc::new(tokio::sync::Semaphore::new(64));
        for _ in 0..streams {
            let (data, opening, proxy) = (data.clone(), opening.clone(), client.addr);
            uploads.spawn(async move {
                let permit = opening.acquire_owned().await.unwrap();
                let mut tcp = socks5_open(proxy, sink).await;
                drop(permit);
                // The local hop holds little in the kernel: the pushes land in the proxy.
                let _ = socket2::SockRef::from(&tcp).set_send_buffer_size(64 * 1024);
                // Push until the stream stalls; the connection stays open until the end.
                let _ = tokio::time::timeout(Duration::from_secs(20), tcp.write_all(&data)).await;
                tcp
            });
        }
        let (mut peak_server, mut peak_client) = before;
        let mut held = Vec::new();
        let sampling = async {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                peak_server = peak_server.max(rss_kib(server_pid));
                peak_client = peak_client.max(rss_kib(client_pid));
            }
        };
        let collecting = async {
            while let Some(upload) = uploads.join_next().await {
                held.push(upload.unwrap());
            }
        };
        tokio::select! {
            () = collecting => {}
            () = sampling => unreachable!(),
        }
        peak_server = peak_server.max(rss_kib(server_pid));
        peak_client = peak_client.max(rss_kib(client_pid));
        // Every upload has stalled: what is held now, once the allocator has handed back
        // what the rush through the buffers left behind (jemalloc's decay is 1 s).
        tokio::time::sleep(Duration::from_secs(3)).await;
        let held_now = (rss_kib(server_pid), rss_kib(client_pid));
        let grown = |peak: u64, start: u64| peak.saturating_sub(start) / 1024;
        let (server_mib, client_mib) = (grown(held_now.0, before.0), grown(held_now.1, before.1));
        announce(&format!(
            "NOTE {streams} stalled {push_mib} MiB uploads: server RSS {} MiB -> peak {} -> held {} MiB (+{server_mib}), \
             client {} -> peak {} -> held {} MiB (+{client_mib})",
            before.0 / 1024,
            peak_server / 1024,
            held_now.0 / 1024,
            before.1 / 1024,
            peak_client / 1024,
            held_now.1 / 1024,
        ));
        let rounds = healthy.rounds();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(healthy.rounds() > rounds, "the healthy stream stalled along with the uploads");
        assert!(server_mib < BOUND_MIB, "server grew {server_mib} MiB for {streams} stalled uploads");
        assert!(client_mib < BOUND_MIB, "client grew {client_mib} MiB for {streams} stalled uploads");
        drop(held);
        healthy.finish().await;
    })
    .await;
}
