//! Logs an operator can ship, against the real binaries over loopback: `--log-format
//! json` (every line one JSON object, from a flag or the config file), the access log
//! (one record per stream with bytes each way, the SYN's payload included, and how it
//! ended, TCP and UDP; reopened on SIGHUP; never blocking streams when its writer
//! cannot keep up), and failed authentications at INFO, once a minute per source.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_rustls::TlsConnector;

use anytls_rs::client::tls::{Trust, client_config};
use anytls_rs::proto::auth::encode_auth_block;
use anytls_rs::proto::udp::{Framing, MAGIC_DOMAIN, Request, packet_bytes};
use anytls_rs::proto::{Address, PasswordHash};
use anytls_rs::session::{ClientSession, SessionConfig, Stream};

use common::*;

const WAIT: Duration = Duration::from_secs(10);

/// A session of our own to `server`, so a test chooses each stream's first data.
async fn session(server: SocketAddr, password: &str) -> ClientSession {
    let tcp = TcpStream::connect(server).await.unwrap();
    let connector = TlsConnector::from(client_config(&Trust::Insecure).unwrap());
    let mut tls = connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await.unwrap();
    let mut block = BytesMut::new();
    encode_auth_block(&PasswordHash::of(password), 0, &mut block);
    tls.write_all(&block).await.unwrap();
    ClientSession::start(tls, SessionConfig::default(), Default::default())
}

/// Opens a stream to `target` whose SYN carries `early` after the destination.
async fn open(session: &ClientSession, target: &Address, early: &[u8]) -> Stream {
    let mut first = BytesMut::new();
    target.encode(&mut first);
    first.extend_from_slice(early);
    let mut stream = session.open_stream(first.freeze()).await.unwrap();
    stream.wait_open().await.expect("stream opened");
    stream
}

/// A target that reads `take` bytes, answers `give` bytes, and closes.
async fn take_then_give(take: usize, give: usize) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut got = vec![0u8; take];
                if tcp.read_exact(&mut got).await.is_ok() {
                    let _ = tcp.write_all(&vec![7u8; give]).await;
                }
                let _ = tcp.shutdown().await;
            });
        }
    });
    addr
}

/// Sends `up` bytes (the first `early` in the SYN) to a take-then-give target and reads
/// `down` back to the end. The session is returned: closing it at once could end the
/// stream on the server before our FIN is read (a `session_closed` outcome).
async fn exchange_counted(server: SocketAddr, early: usize, up: usize, down: usize) -> (SocketAddr, ClientSession) {
    let target = take_then_give(up, down).await;
    let session = session(server, PASSWORD).await;
    let mut stream = open(&session, &Address::socket(target), &vec![1u8; early]).await;
    stream.write(Bytes::from(vec![2u8; up - early])).await.unwrap();
    let mut got = 0;
    while let Some(data) = tokio::time::timeout(WAIT, stream.read()).await.expect("data in time").unwrap() {
        got += data.len();
    }
    assert_eq!(got, down);
    let _ = stream.finish().await;
    (target, session)
}

/// The lines of `path` once it has at least `n` (bounded wait).
async fn lines_of(path: &Path, n: usize) -> Vec<String> {
    let deadline = Instant::now() + WAIT;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        if lines.len() >= n || Instant::now() >= deadline {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Lines of a log that a log shipper would read: all but the printed client command.
fn log_lines(log: &str) -> Vec<&str> {
    log.lines().filter(|line| !line.starts_with("client command: ") && !line.starts_with("client link: ")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_a_line_from_the_flag_or_the_config_file() {
    bounded(Duration::from_secs(60), "json logs", async {
        let server = start_server(PASSWORD, &["--log-format", "json"]).await;
        let dir = TempDir::new("logs-json");
        let config = dir.path().join("client.toml");
        std::fs::write(&config, "log-format = \"json\"\ninsecure = true\n").unwrap();
        let client = start_client(server.addr, PASSWORD, &["--config", config.to_str().unwrap()]).await;
        let echo = spawn_echo().await;
        assert!(echo_works(client.addr, echo, WAIT).await);
        // RUST_LOG still filters: our DEBUG lines are there, as JSON.
        assert!(server.process.log_shows("\"level\":\"DEBUG\"", WAIT).await, "{}", server.process.log());
        assert!(client.process.log_shows("\"level\":\"DEBUG\"", WAIT).await, "{}", client.process.log());
        for process in [&server.process, &client.process] {
            let log = process.log();
            for line in log_lines(&log) {
                let object: serde_json::Value =
                    serde_json::from_str(line).unwrap_or_else(|e| panic!("{}: not JSON ({e}): {line}", process.name()));
                for field in ["ts", "level", "target", "msg"] {
                    assert!(object[field].is_string(), "{}: no {field}: {line}", process.name());
                }
                let ts = object["ts"].as_str().unwrap();
                assert!(ts.parse::<jiff::Timestamp>().is_ok() && ts.ends_with('Z'), "RFC 3339 UTC: {ts}");
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_counts_bytes_each_way_with_the_syn_payload_and_the_debug_line_agrees() {
    bounded(Duration::from_secs(60), "access log bytes", async {
        let dir = TempDir::new("logs-bytes");
        let path = dir.path().join("access.log");
        let server = start_server(PASSWORD, &["--access-log", path.to_str().unwrap()]).await;
        // 100 bytes ride in the SYN, 1,100 more follow; 3,000 come back.
        let (target, _session) = exchange_counted(server.addr, 100, 1200, 3000).await;
        let lines = lines_of(&path, 1).await;
        assert_eq!(lines.len(), 1, "{lines:?}");
        let record = &lines[0];
        for field in [
            "network=tcp".to_string(),
            format!("destination={target}"),
            "bytes_up=1200 bytes_down=3000".to_string(),
            "outcome=ok".to_string(),
            "client=127.0.0.1:".to_string(),
        ] {
            assert!(record.contains(&field), "no {field} in {record}");
        }
        assert!(record.starts_with("ts=20") && record.contains(" duration_ms="), "{record}");
        let debug = format!("{target}: 1200 bytes up, 3000 down");
        assert!(server.process.log_shows(&debug, WAIT).await, "no `{debug}`:\n{}", server.process.log());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_access_records_tell_outcomes_apart_for_tcp_and_udp() {
    bounded(Duration::from_secs(60), "access log outcomes", async {
        let dir = TempDir::new("logs-outcomes");
        let path = dir.path().join("access.log");
        let args = ["--access-log", path.to_str().unwrap(), "--log-format", "json", "--deny", "192.0.2.0/24"];
        let server = start_server(PASSWORD, &args).await;
        let session = session(server.addr, PASSWORD).await;
        // Refused by the policy, and a dial to a closed port.
        let mut refused = Vec::new();
        Address::parse_host_port("192.0.2.1:80").unwrap().encode(&mut refused);
        let mut stream = session.open_stream(Bytes::from(refused)).await.unwrap();
        assert!(stream.wait_open().await.is_err());
        let mut closed = Vec::new();
        Address::socket(closed_port_addr()).encode(&mut closed);
        let mut stream = session.open_stream(Bytes::from(closed)).await.unwrap();
        assert!(stream.wait_open().await.is_err());
        // UDP over TCP: one 5-byte datagram each way to an echo.
        let echo = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            while let Ok((len, from)) = echo.recv_from(&mut buf).await {
                let _ = echo.send_to(&buf[..len], from).await;
            }
        });
        let mut request = BytesMut::new();
        Request { framing: Framing::Connected, destination: Address::socket(echo_addr) }.encode(&mut request);
        let magic = Address::parse_host_port(&format!("{MAGIC_DOMAIN}:0")).unwrap();
        let mut udp = open(&session, &magic, &request).await;
        udp.write(packet_bytes(Framing::Connected, None, b"hello").unwrap()).await.unwrap();
        let answer = tokio::time::timeout(WAIT, udp.read()).await.unwrap().unwrap().unwrap();
        assert!(answer.ends_with(b"hello"), "{answer:?}");
        udp.finish().await.unwrap();

        let lines = lines_of(&path, 3).await;
        let records: Vec<serde_json::Value> = lines.iter().map(|l| serde_json::from_str(l).unwrap()).collect();
        let find = |outcome: &str| {
            records.iter().find(|r| r["outcome"] == outcome).unwrap_or_else(|| panic!("no {outcome}: {lines:?}"))
        };
        let policy = find("refused");
        assert_eq!((policy["destination"].as_str(), policy["network"].as_str()), (Some("192.0.2.1:80"), Some("tcp")));
        assert!(policy["reason"].as_str().unwrap().contains("192.0.2.1"), "{policy}");
        let dial = find("dial_failed");
        assert!(dial["reason"].as_str().unwrap().contains("refused"), "{dial}");
        let udp = records.iter().find(|r| r["network"] == "udp").unwrap_or_else(|| panic!("no udp: {lines:?}"));
        assert_eq!(udp["destination"].as_str(), Some(echo_addr.to_string().as_str()));
        assert_eq!(
            (udp["bytes_up"].as_u64(), udp["bytes_down"].as_u64(), udp["outcome"].as_str()),
            (Some(5), Some(5), Some("ok"))
        );
        for record in &records {
            assert!(record["user"].is_string() && record["client"].as_str().unwrap().starts_with("127.0.0.1:"));
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reopens_the_access_log_for_logrotate() {
    bounded(Duration::from_secs(60), "access log reopen", async {
        let dir = TempDir::new("logs-rotate");
        let path = dir.path().join("access.log");
        let server = start_server(PASSWORD, &["--access-log", path.to_str().unwrap()]).await;
        let (first, _first_session) = exchange_counted(server.addr, 0, 10, 10).await;
        assert_eq!(lines_of(&path, 1).await.len(), 1);
        let rotated = dir.path().join("access.log.1");
        std::fs::rename(&path, &rotated).unwrap();
        server.process.signal("HUP");
        assert!(server.process.log_shows("access log: reopened", WAIT).await, "{}", server.process.log());
        let (second, _second_session) = exchange_counted(server.addr, 0, 20, 20).await;
        let new = lines_of(&path, 1).await;
        assert_eq!(new.len(), 1, "{new:?}");
        assert!(new[0].contains(&format!("destination={second}")), "{new:?}");
        let old = std::fs::read_to_string(&rotated).unwrap();
        assert_eq!(old.lines().count(), 1, "{old}");
        assert!(old.contains(&format!("destination={first}")), "{old}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_that_cannot_keep_up_drops_records_and_streams_go_on() {
    bounded(Duration::from_secs(90), "access log drops", async {
        let dir = TempDir::new("logs-fifo");
        let fifo = dir.path().join("access.fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if !made.is_ok_and(|status| status.success()) {
            announce("SKIP a_writer_that_cannot_keep_up_drops_records_and_streams_go_on: no mkfifo");
            return;
        }
        // Nobody reads the FIFO: the writer blocks in open, the queue of 4 fills.
        let args = ["--access-log", fifo.to_str().unwrap(), "--access-log-queue", "4", "--api", "127.0.0.1:0"];
        let mut server = start_server(PASSWORD, &args).await;
        let api = api_address(&mut server.process).await;
        let pin = server.fingerprint.clone().unwrap();
        let client = start_client(server.addr, PASSWORD, &["--pin-sha256", &pin]).await;
        let echo = spawn_echo().await;
        let started = Instant::now();
        for round in 0..30 {
            assert!(echo_works(client.addr, echo, WAIT).await, "stream {round} failed");
        }
        announce(&format!("NOTE 30 streams with a blocked access log took {:?}", started.elapsed()));
        let dropped = |page: &str| {
            page.lines()
                .find_map(|line| line.strip_prefix("anytls_access_log_dropped_total "))
                .and_then(|n| n.trim().parse::<u64>().ok())
        };
        let deadline = Instant::now() + WAIT;
        let mut page = String::new();
        while Instant::now() < deadline {
            page = api_get(api, "/metrics", None).await.1;
            if dropped(&page).is_some_and(|n| n >= 20) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(dropped(&page).is_some_and(|n| n >= 20), "30 streams, 4 queued:\n{page}");
        assert!(page.contains("anytls_access_log_records_total 0\n"), "{page}");
        assert!(server.process.log_shows("records dropped", WAIT).await, "{}", server.process.log());
        let warnings = count_lines(&server.process.log(), "records dropped");
        assert_eq!(warnings, 1, "one WARN per 10 s:\n{}", server.process.log());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_access_log_is_a_clear_start_up_error() {
    bounded(Duration::from_secs(30), "unwritable access log", async {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_anytls-server"));
        command.args(["-l", "127.0.0.1:0", "-p", PASSWORD, "--access-log", "/nonexistent-dir/access.log"]);
        let mut process = Process::spawn("anytls-server", command);
        let status = process.wait_exit(WAIT).await.expect("exits");
        assert!(!status.success());
        let log = process.log();
        assert!(log.contains("anytls-server: --access-log /nonexistent-dir/access.log: cannot open: "), "{log}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_passwords_are_logged_at_info_once_a_minute_per_source_and_the_client_says_why_first() {
    bounded(Duration::from_secs(60), "auth failures at INFO", async {
        let server = start_server(PASSWORD, &[]).await;
        for _ in 0..3 {
            let session = session(server.addr, "not-the-password").await;
            let mut first = BytesMut::new();
            Address::socket(closed_port_addr()).encode(&mut first);
            let mut stream = session.open_stream(first.freeze()).await.unwrap();
            assert!(tokio::time::timeout(WAIT, stream.wait_open()).await.unwrap().is_err());
        }
        let info = "[INFO] 127.0.0.1:";
        let line = "authentication failed (wrong password): a client with a wrong password";
        assert!(server.process.log_shows(line, WAIT).await, "{}", server.process.log());
        // The three failures were counted; only the first made an INFO line.
        assert!(server.process.wait_lines(&["authentication failed (wrong password) after"], 3, WAIT).await);
        let log = server.process.log();
        let infos = log.lines().filter(|l| l.contains(info) && l.contains(line)).count();
        assert_eq!(infos, 1, "{log}");

        let pin = server.fingerprint.clone().unwrap();
        let client = start_client(server.addr, "not-the-password", &["--pin-sha256", &pin]).await;
        let echo = spawn_echo().await;
        // A loaded machine can fail a first attempt another way (a reset): a few tries.
        let said = "] wrong password? the server closed";
        for _ in 0..3 {
            assert!(!echo_works(client.addr, echo, WAIT).await);
            if client.process.log_shows(said, Duration::from_secs(2)).await {
                break;
            }
        }
        assert!(client.process.log().contains(said), "{}", client.process.log());
    })
    .await;
}
