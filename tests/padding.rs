//! Padding as the network sees it: per-user and per-node schemes reach clients at their next
//! session (and again after a reload), a scheme with a mistake is refused where it is
//! written, and the server's downlink padding shapes the TLS records it sends, next to the
//! records of a real HTTPS site (nginx, when installed).

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anytls_rs::proto::PaddingScheme;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use common::*;

const LIMIT: Duration = Duration::from_secs(90);
const ALICE_A: &str = "stop=3\n0=40-40\n1=200-300\n2=300-400";
const ALICE_B: &str = "stop=4\n0=50-50\n1=300-400\n2=400-500\n3=100-200";
const NODE_1: &str = "stop=2\n0=35-35\n1=150-250";
const NODE_2: &str = "stop=2\n0=45-45\n1=250-350";

fn md5_of(scheme: &str) -> String {
    PaddingScheme::load(scheme.as_bytes()).expect("the test's schemes load").md5_hex().to_string()
}

fn config_with(alice_scheme: &str) -> String {
    format!(
        "[[users]]\nname = \"alice\"\npassword = \"pa\"\npadding-scheme = '''\n{alice_scheme}'''\n\n\
         [[users]]\nname = \"bob\"\npassword = \"pb\"\n"
    )
}

/// A new client of `server` as `password`, after one echo through it: the md5 of the
/// scheme the server sent it, if it sent one.
async fn scheme_given_to(server: &Server, password: &str, echo: SocketAddr) -> Option<String> {
    let pin = server.fingerprint.clone().expect("self-signed");
    let client = start_client(server.addr, password, &["--pin-sha256", &pin]).await;
    echo_roundtrip(socks5_open(client.addr, echo).await, b"padding").await;
    // The update comes before the SYNACK, so it is logged before the connection's end.
    client.wait_done(1).await;
    let log = client.process.log();
    log.lines().find_map(|line| Some(line.split("server updated the padding scheme (md5 ").nth(1)?[..32].to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_user_gets_its_own_scheme_or_the_nodes_and_a_reload_changes_both() {
    bounded(LIMIT, "per-user padding", async {
        let dir = TempDir::new("padding-users");
        let (config, node) = (dir.path().join("server.toml"), dir.path().join("node.scheme"));
        std::fs::write(&config, config_with(ALICE_A)).unwrap();
        std::fs::write(&node, NODE_1).unwrap();
        let args = ["--config", config.to_str().unwrap(), "--padding-scheme", node.to_str().unwrap()];
        let server = start_server(PASSWORD, &args).await;
        let echo = spawn_echo().await;
        assert_eq!(scheme_given_to(&server, "pa", echo).await, Some(md5_of(ALICE_A)), "alice: her own");
        assert_eq!(scheme_given_to(&server, "pb", echo).await, Some(md5_of(NODE_1)), "bob: the node's");

        std::fs::write(&config, config_with(ALICE_B)).unwrap();
        std::fs::write(&node, NODE_2).unwrap();
        server.process.signal("HUP");
        let reloaded = server.process.log_shows("SIGHUP: reloaded", Duration::from_secs(5)).await;
        assert!(reloaded, "{}", server.process.log());
        assert!(server.process.log().contains(&format!("padding scheme md5 {}", md5_of(NODE_2))));
        assert_eq!(scheme_given_to(&server, "pa", echo).await, Some(md5_of(ALICE_B)), "alice after the reload");
        assert_eq!(scheme_given_to(&server, "pb", echo).await, Some(md5_of(NODE_2)), "bob after the reload");

        // A scheme with a mistake is refused; what runs stays.
        std::fs::write(&config, config_with("stop=3\n0=40-40\n1=200_300")).unwrap();
        server.process.signal("HUP");
        let refused = server.process.log_shows("reload refused", Duration::from_secs(5)).await;
        assert!(refused && server.process.log().contains("padding scheme line 3"), "{}", server.process.log());
        assert_eq!(scheme_given_to(&server, "pa", echo).await, Some(md5_of(ALICE_B)), "alice keeps B");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheme_with_a_mistake_stops_start_up_naming_where_it_is() {
    bounded(LIMIT, "bad schemes", async {
        let dir = TempDir::new("padding-bad");
        let cases = [
            ("--config", "server.toml", config_with("stop=2\n1=100-x"), "server.toml"),
            ("--padding-scheme", "node.scheme", "stop=2\n2=100-200".to_string(), "write 2 is at or past stop=2"),
            ("--downlink-padding-scheme", "down.scheme", "stop=2\n0=1-2\n0=3-4".to_string(), "appears twice"),
        ];
        for (flag, file, text, expected) in cases {
            let path = dir.path().join(file);
            std::fs::write(&path, text).unwrap();
            let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_anytls-server"));
            command.args(["-l", "127.0.0.1:0", "-p", PASSWORD, flag, path.to_str().unwrap()]);
            let mut process = Process::spawn("anytls-server", command);
            let status = process.wait_exit(Duration::from_secs(20)).await.expect("the server stops");
            let log = process.log();
            assert!(!status.success(), "{flag}: started anyway:\n{log}");
            assert!(log.contains(expected) && log.contains("padding scheme"), "{flag}: {log}");
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// What an observer sees

/// A TCP relay in front of `upstream` that notes the length of each TLS record coming
/// back (the 5-byte record headers are in the clear), for one connection at a time.
async fn record_watcher(upstream: SocketAddr) -> (SocketAddr, Arc<Mutex<Vec<Vec<usize>>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(Mutex::new(Vec::new()));
    let seen = connections.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(upstream).await else { continue };
            let index = {
                let mut seen = seen.lock().unwrap();
                seen.push(Vec::new());
                seen.len() - 1
            };
            let seen = seen.clone();
            tokio::spawn(async move {
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                tokio::spawn(async move { tokio::io::copy(&mut client_read, &mut server_write).await });
                let mut header = [0u8; 5];
                while server_read.read_exact(&mut header).await.is_ok() {
                    let len = u16::from_be_bytes([header[3], header[4]]) as usize;
                    let mut body = vec![0u8; len];
                    if server_read.read_exact(&mut body).await.is_err() {
                        break;
                    }
                    seen.lock().unwrap()[index].push(len);
                    if client_write.write_all(&header).await.is_err() || client_write.write_all(&body).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, connections)
}

/// Records our server sends before any of its own writes: ServerHello, ChangeCipherSpec,
/// one record with the encrypted extensions, certificate, CertificateVerify and Finished,
/// and one with its two session tickets.
const HANDSHAKE_RECORDS: usize = 4;

/// TLS 1.3 adds the content type byte and a 16-byte AEAD tag to each record's plaintext.
const RECORD_OVERHEAD: usize = 1 + 16;

/// The lengths of the first 16 records the server sent our client for one echo.
async fn server_records(extra: &[&str]) -> Vec<usize> {
    let server = start_server(PASSWORD, extra).await;
    let (watched, records) = record_watcher(server.addr).await;
    let pin = server.fingerprint.clone().expect("self-signed");
    let client = start_client(watched, PASSWORD, &["--pin-sha256", &pin]).await;
    let echo = spawn_echo().await;
    echo_roundtrip(socks5_open(client.addr, echo).await, b"GET / HTTP/1.1").await;
    client.wait_done(1).await;
    echo_roundtrip(socks5_open(client.addr, echo).await, &payload(3000, 1)).await;
    client.wait_done(2).await;
    let records = records.lock().unwrap();
    assert_eq!(records.len(), 1, "one session");
    records[0].iter().take(16).copied().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downlink_padding_shapes_the_records_the_server_sends() {
    bounded(LIMIT, "downlink records", async {
        let dir = TempDir::new("padding-downlink");
        let scheme = dir.path().join("down.scheme");
        std::fs::write(&scheme, "stop=3\n0=600-600\n1=900-900,400-400\n2=1200-1200").unwrap();
        let plain = server_records(&["--downlink-padding-scheme", "off"]).await;
        let padded = server_records(&["--downlink-padding-scheme", scheme.to_str().unwrap()]).await;
        let built_in = server_records(&[]).await;
        announce(&format!("NOTE downlink: first server records without padding: {plain:?}"));
        announce(&format!("NOTE downlink: with the test's scheme: {padded:?}"));
        announce(&format!("NOTE downlink: with the built-in scheme (the default): {built_in:?}"));
        // Write 0 (the Settings answer) is one 600-byte record; write 1 (a SYNACK, perhaps
        // with data) 900 bytes, then a Waste frame of 400 bytes of data (407 with its header).
        let shaped = [600 + RECORD_OVERHEAD, 900 + RECORD_OVERHEAD, 407 + RECORD_OVERHEAD];
        assert!(padded.windows(1).any(|w| w[0] == shaped[0]), "no 600-byte record: {padded:?}");
        assert!(padded.windows(2).any(|w| w == &shaped[1..]), "no 900+407 pair: {padded:?}");
        assert!(!plain.contains(&shaped[0]), "unpadded records happen to match: {plain:?}");
        // Unpadded, the server's first write after the handshake (its Settings answer and
        // the SYNACK) is a record of a few dozen bytes; the built-in scheme makes it 300 or more.
        let first_written = |records: &[usize]| records.get(HANDSHAKE_RECORDS).copied().unwrap_or(0);
        assert!(first_written(&plain) < 100, "{plain:?}");
        assert!(first_written(&built_in) >= 300 + RECORD_OVERHEAD, "{built_in:?}");
        if let Some(site) = nginx_records(dir.path()).await {
            announce(&format!("NOTE downlink: first records of nginx serving a 20 KB page over TLS 1.3: {site:?}"));
        }
    })
    .await;
}

/// The record lengths nginx sends for one GET of a 20 KB page, or `None` (and a SKIP line)
/// when nginx is not installed.
async fn nginx_records(dir: &Path) -> Option<Vec<usize>> {
    let Some(nginx) = ["/usr/sbin/nginx", "/usr/bin/nginx"].into_iter().find(|p| Path::new(p).exists()) else {
        announce("SKIP downlink: nginx is not installed (apt-get install nginx), so no site to compare with");
        return None;
    };
    let pki = TestPki::write_to(dir);
    let root = dir.join("www");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("index.html"), payload(20_000, 3)).unwrap();
    let port = free_port();
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off; pid {dir}/nginx.pid; error_log {dir}/error.log; events {{}}\n\
             http {{ access_log off; client_body_temp_path {dir}; proxy_temp_path {dir}; fastcgi_temp_path {dir};\n\
             uwsgi_temp_path {dir}; scgi_temp_path {dir};\n\
             server {{ listen 127.0.0.1:{port} ssl; ssl_protocols TLSv1.3; ssl_certificate {cert};\n\
             ssl_certificate_key {key}; root {root}; }} }}\n",
            dir = dir.display(),
            cert = pki.server_cert.display(),
            key = pki.server_key.display(),
            root = root.display()
        ),
    )
    .unwrap();
    let mut command = std::process::Command::new(nginx);
    command.args(["-c", conf.to_str().unwrap(), "-p", dir.to_str().unwrap(), "-e", "stderr"]);
    let mut process = Process::spawn("nginx", command);
    wait_port(&mut process, port, Duration::from_secs(10)).await;
    let (watched, records) = record_watcher(SocketAddr::from(([127, 0, 0, 1], port))).await;
    let connector = tls_client_trusting(&pki.ca_cert, rustls::crypto::aws_lc_rs::default_provider());
    let tcp = TcpStream::connect(watched).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.expect("TLS to nginx");
    tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.unwrap();
    let (answer, _) = read_until_closed(&mut tls, Duration::from_secs(10)).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "nginx answered {:?}",
        String::from_utf8_lossy(&answer[..60.min(answer.len())])
    );
    let records = records.lock().unwrap();
    Some(records[0].iter().take(16).copied().collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_sets_a_users_scheme_and_refuses_a_broken_one() {
    bounded(LIMIT, "padding through the admin API", async {
        const TOKEN: &str = "padding-admin";
        let args = ["--api", "127.0.0.1:0", "--admin-token", TOKEN, "--state-dir", "off"];
        let mut server = start_server(PASSWORD, &args).await;
        let api = api_address(&mut server.process).await;
        let echo = spawn_echo().await;
        let new_user = serde_json::json!({"name": "carol", "password": "pc", "padding-scheme": ALICE_A}).to_string();
        let (status, body) = api_request(api, "POST", "/api/admin/users", Some(TOKEN), Some(&new_user)).await;
        assert_eq!(status, 201, "{body}");
        let view: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(view["padding-scheme"], ALICE_A, "{view}");
        assert_eq!(scheme_given_to(&server, "pc", echo).await, Some(md5_of(ALICE_A)));

        let broken = serde_json::json!({"padding-scheme": "stop=2\n1=100-400,x"}).to_string();
        let (status, body) = api_request(api, "PATCH", "/api/admin/users/carol", Some(TOKEN), Some(&broken)).await;
        assert_eq!(status, 400, "{body}");
        assert!(body.contains("padding scheme line 2"), "{body}");

        let changed = serde_json::json!({"padding-scheme": ALICE_B}).to_string();
        let (status, body) = api_request(api, "PATCH", "/api/admin/users/carol", Some(TOKEN), Some(&changed)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(scheme_given_to(&server, "pc", echo).await, Some(md5_of(ALICE_B)), "the next session gets B");

        // `null` gives the user the node's scheme again (the default here: no update).
        let back = serde_json::json!({"padding-scheme": null}).to_string();
        let (status, body) = api_request(api, "PATCH", "/api/admin/users/carol", Some(TOKEN), Some(&back)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(scheme_given_to(&server, "pc", echo).await, None, "the node's (default) scheme");
    })
    .await;
}
