//! Per-source fairness in the handshake phase: one source address holding silent
//! connections gets at most its share of `--max-handshakes`; clients from other addresses
//! still start sessions. Addresses in 127.0.0.0/8 stand for different clients.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;

use anytls_rs::client::tls::{Trust, client_config};
use anytls_rs::proto::auth::encode_auth_block;
use anytls_rs::proto::frame::Command;
use anytls_rs::proto::{Decoder, Frame, FrameDecoder, PasswordHash};

use common::*;

async fn connect_from(source: IpAddr, server: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(server).await
}

/// From `source`: TLS, authentication, Settings; true once the server answers with its
/// ServerSettings (a session is open) within `limit`.
async fn session_starts_from(source: IpAddr, server: SocketAddr, limit: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    let attempt = async {
        let tcp = connect_from(source, server).await.map_err(|e| format!("connect: {e}"))?;
        let connector = TlsConnector::from(client_config(&Trust::Insecure).expect("TLS config"));
        let mut tls = connector
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let mut hello = BytesMut::new();
        encode_auth_block(&PasswordHash::of(PASSWORD), 30, &mut hello);
        Frame::new(Command::Settings, 0, &b"v=2\nclient=flood-test\npadding-md5=x"[..]).encode(&mut hello).unwrap();
        tls.write_all(&hello).await.map_err(|e| format!("write: {e}"))?;
        let (mut buf, mut decoder) = (BytesMut::new(), FrameDecoder::new());
        loop {
            while let Ok(Some(frame)) = decoder.decode(&mut buf) {
                if frame.command == Command::ServerSettings {
                    return Ok(started.elapsed());
                }
            }
            if tls.read_buf(&mut buf).await.map_err(|e| format!("read: {e}"))? == 0 {
                return Err("closed before ServerSettings".to_string());
            }
        }
    };
    tokio::time::timeout(limit, attempt).await.map_err(|_| format!("no session within {limit:?}"))?
}

/// True if the server closed `tcp` within `limit`.
async fn closed_within(mut tcp: TcpStream, limit: Duration) -> (bool, TcpStream) {
    let mut buf = [0u8; 64];
    let closed = matches!(tokio::time::timeout(limit, tcp.read(&mut buf)).await, Ok(Ok(0) | Err(_)));
    (closed, tcp)
}

/// The attack from the hardening pass, scaled to a small cap: 512 silent connections
/// from one address against --max-handshakes 64. The source holds its share (a quarter,
/// at least 16) of places, the waiting room (three times the cap) takes more, the rest
/// are dropped at once; sessions from three other addresses and our client still start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_flood_from_one_source_leaves_room_for_others() {
    bounded(Duration::from_secs(120), "handshake flood", async {
        const FLOOD: usize = 512;
        const MAX_HANDSHAKES: usize = 64;
        let max = MAX_HANDSHAKES.to_string();
        let server = start_server(PASSWORD, &["--handshake-timeout-secs", "30", "--max-handshakes", &max]).await;
        let pin = server.fingerprint.clone().unwrap();
        let client = start_client(server.addr, PASSWORD, &["--pin-sha256", &pin]).await;
        let echo = spawn_echo().await;
        let attacker = IpAddr::from([127, 0, 0, 2]);
        let mut flood = Vec::new();
        for _ in 0..FLOOD {
            flood.push(connect_from(attacker, server.addr).await.expect("flood connect"));
        }
        let checks = flood.into_iter().map(|tcp| closed_within(tcp, Duration::from_secs(2)));
        let outcomes = futures_util::future::join_all(checks).await;
        let dropped = outcomes.iter().filter(|(closed, _)| *closed).count();
        let held: Vec<TcpStream> = outcomes.into_iter().filter(|(closed, _)| !closed).map(|(_, tcp)| tcp).collect();
        announce(&format!(
            "NOTE handshake flood: {FLOOD} silent connections from {attacker}: {} held, {dropped} dropped",
            held.len()
        ));
        assert_eq!(held.len(), 16 + 3 * MAX_HANDSHAKES, "its share of places plus the waiting room");

        for last in 3..=5u8 {
            let source = IpAddr::from([127, 0, 0, last]);
            let took = session_starts_from(source, server.addr, Duration::from_secs(5))
                .await
                .unwrap_or_else(|why| panic!("a session from {source} during the flood: {why}"));
            announce(&format!("NOTE handshake flood: a session from {source} started in {took:.1?}"));
        }
        echo_roundtrip(socks5_open(client.addr, echo).await, b"during the flood").await;
        assert!(
            server.process.log_shows("connections already wait for a handshake place", Duration::from_secs(1)).await
        );
        // One WARN line for the whole flood, not one per dropped connection.
        // (The test password is short: its start-up warning is not the flood's.)
        let log = server.process.log();
        let warnings = log.lines().filter(|l| l.contains("[WARN]") && !l.contains("weak password")).count();
        assert!(warnings <= 2, "{warnings} WARN lines for one flood:\n{}", server.process.log());
        drop(held);
    })
    .await;
}
