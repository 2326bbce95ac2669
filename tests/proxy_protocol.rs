//! `--proxy-protocol-from`: behind a balancer the server sees the client the PROXY
//! protocol header names. Our server trusts 127.0.0.5 (and, for the real balancers,
//! 127.0.0.9, the address they connect from); connections from 127.0.0.1 are untrusted.
//! Checked: a header's client is the one the logs, shares and sessions see; an untrusted
//! source is read as TLS (a header from it is not believed); a trusted source without a
//! header, with a malformed one or with none in time is closed and counted while other
//! clients go on; and the real thing: HAProxy (`send-proxy-v2`) and nginx
//! (`proxy_protocol on`) in front, each connecting from 127.0.0.9.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use common::*;

const LIMIT: Duration = Duration::from_secs(90);
const TRUSTED: &str = "127.0.0.5";

async fn server_trusting(ranges: &[&str]) -> (Server, SocketAddr) {
    let mut args = vec!["--user", "alice:proxied-pw", "--handshake-timeout-secs", "2"];
    for range in ranges {
        args.extend(["--proxy-protocol-from", range]);
    }
    start_server_with_api(&args).await
}

/// A connection to `server` from `source`.
async fn connect_from(source: &str, server: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source.parse().unwrap(), 0)).unwrap();
    socket.connect(server).await.unwrap()
}

fn v2_header(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (SocketAddr::V4(source), SocketAddr::V4(destination)) = (source, destination) else { panic!("IPv4 only") };
    let mut out = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    out.extend_from_slice(&source.ip().octets());
    out.extend_from_slice(&destination.ip().octets());
    out.extend_from_slice(&source.port().to_be_bytes());
    out.extend_from_slice(&destination.port().to_be_bytes());
    out
}

/// A balancer of our own for the test: listens on loopback, connects to `server` from
/// 127.0.0.5, sends a v2 header naming `claimed` as the client, then pipes both ways.
async fn spawn_header_relay(server: SocketAddr, claimed: SocketAddr) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut outbound = connect_from(TRUSTED, server).await;
                outbound.write_all(&v2_header(claimed, server)).await?;
                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await.map(drop)
            });
        }
    });
    addr
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_sources_header_names_the_client_and_a_bad_one_is_closed_alone() {
    bounded(LIMIT, "proxy protocol", async {
        let (server, api) = server_trusting(&["127.0.0.5/32"]).await;
        let pin = server.fingerprint.clone().expect("a self-signed pin");
        let trust = ["--pin-sha256", pin.as_str()];
        assert!(server.process.log().contains("connections from 127.0.0.5/32 start with a PROXY protocol header"));
        let echo = spawn_echo().await;

        // Through a balancer that says the client is 198.51.100.9:5555: the session is hers.
        let claimed: SocketAddr = "198.51.100.9:5555".parse().unwrap();
        let relay = spawn_header_relay(server.addr, claimed).await;
        let behind = start_client(relay, "proxied-pw", &trust).await;
        assert!(echoes_via(behind.addr, "127.0.0.1", echo.port()).await, "{}", server.process.log());
        let line = "198.51.100.9:5555: session open (user alice)";
        assert!(server.process.log_shows(line, Duration::from_secs(5)).await, "{}", server.process.log());

        // An untrusted source (127.0.0.1) is served as usual; a header from it is not believed.
        let direct = start_client(server.addr, "proxied-pw", &trust).await;
        assert!(echoes_via(direct.addr, "127.0.0.1", echo.port()).await);
        let mut liar = TcpStream::connect(server.addr).await.unwrap();
        liar.write_all(b"PROXY TCP4 203.0.113.66 127.0.0.1 4444 443\r\n").await.unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(5), liar.read(&mut [0u8; 64])).await;
        assert!(!server.process.log().contains("203.0.113.66"), "{}", server.process.log());

        // A v1 header from the trusted source, then not TLS: the failure is the named client's.
        let mut named = connect_from(TRUSTED, server.addr).await;
        named.write_all(b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 443\r\nnot TLS at all\r\n").await.unwrap();
        let line = "PROXY protocol header: the client is 203.0.113.7:40000";
        assert!(server.process.log_shows(line, Duration::from_secs(5)).await, "{}", server.process.log());
        assert!(server.process.log_shows("203.0.113.7:40000: TLS handshake failed", Duration::from_secs(5)).await);

        // The trusted source without a header, with a malformed one, with none in time: closed.
        let mut bare = connect_from(TRUSTED, server.addr).await;
        bare.write_all(b"\x16\x03\x01\x00\x05hello").await.unwrap();
        let mut malformed = connect_from(TRUSTED, server.addr).await;
        malformed.write_all(b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 1\r\n").await.unwrap();
        let mut silent = connect_from(TRUSTED, server.addr).await;
        for (name, tcp) in [("bare", &mut bare), ("malformed", &mut malformed), ("silent", &mut silent)] {
            let read = tokio::time::timeout(Duration::from_secs(6), tcp.read(&mut [0u8; 64])).await;
            assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{name}: closed by the server, got {read:?}");
        }
        // The close can reach us before the server's line reaches its log reader: wait for each.
        for line in [
            "no PROXY protocol header (the connection starts with",
            "malformed PROXY protocol v1 header: bad port",
            "no complete PROXY protocol header within the handshake time",
        ] {
            assert!(server.process.log_shows(line, Duration::from_secs(5)).await, "{line}:\n{}", server.process.log());
        }
        let (_, metrics) = api_get(api, "/metrics", None).await;
        assert_eq!(counter_sample(&metrics, "anytls_proxy_protocol_errors_total"), Some(3), "{metrics}");
        // Meanwhile the sessions of others went on.
        assert!(echoes_via(behind.addr, "127.0.0.1", echo.port()).await);
        assert!(echoes_via(direct.addr, "127.0.0.1", echo.port()).await);
    })
    .await
}

fn find_binary(candidates: &[&str]) -> Option<String> {
    candidates.iter().find(|path| Path::new(path).exists()).map(|path| path.to_string())
}

/// HAProxy (`send-proxy-v2`) and nginx (`proxy_protocol on`, v1) in front of our server,
/// each connecting to it from 127.0.0.9 while the client is at 127.0.0.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_and_nginx_in_front_hand_over_the_real_client() {
    bounded(LIMIT, "proxy protocol balancers", async {
        let (server, _api) = server_trusting(&["127.0.0.9/32"]).await;
        let pin = server.fingerprint.clone().expect("a self-signed pin");
        let echo = spawn_echo().await;
        let dir = TempDir::new("proxy-protocol-balancers");
        let mut ran = 0;

        if let Some(haproxy) = find_binary(&["/usr/sbin/haproxy", "/usr/bin/haproxy"]) {
            let port = free_port();
            let conf = dir.path().join("haproxy.cfg");
            std::fs::write(
                &conf,
                format!(
                    "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
                     frontend front\n  bind 127.0.0.1:{port}\n  default_backend anytls\n\
                     backend anytls\n  server one {server} send-proxy-v2 source 127.0.0.9\n",
                    server = server.addr
                ),
            )
            .unwrap();
            let mut command = Command::new(&haproxy);
            command.args(["-db", "-f", conf.to_str().unwrap()]);
            let _haproxy = Process::spawn("haproxy", command);
            wait_listening(port).await;
            let client =
                start_client(SocketAddr::from(([127, 0, 0, 1], port)), "proxied-pw", &["--pin-sha256", pin.as_str()])
                    .await;
            assert!(echoes_via(client.addr, "127.0.0.1", echo.port()).await, "{}", server.process.log());
            let parts = ["127.0.0.9:", "the client is 127.0.0.1:"];
            assert!(line_with_all(&server.process, &parts).await, "{}", server.process.log());
            ran += 1;
        } else {
            announce("SKIP proxy protocol: haproxy is not installed (apt-get install haproxy)");
        }

        if let Some(nginx) = find_binary(&["/usr/sbin/nginx", "/usr/bin/nginx"]) {
            let port = free_port();
            let conf = dir.path().join("nginx.conf");
            // Debian builds the stream module as a module of its own (libnginx-mod-stream).
            let module = ["/usr/lib/nginx/modules/ngx_stream_module.so"]
                .into_iter()
                .find(|path| Path::new(path).exists())
                .map(|path| format!("load_module {path};\n"))
                .unwrap_or_default();
            std::fs::write(
                &conf,
                format!(
                    "{module}daemon off; pid {dir}/nginx.pid; error_log {dir}/error.log; events {{}}\n\
                     stream {{ server {{ listen 127.0.0.1:{port}; proxy_pass {server}; proxy_protocol on;\n\
                     proxy_bind 127.0.0.9; }} }}\n",
                    dir = dir.path().display(),
                    server = server.addr
                ),
            )
            .unwrap();
            let mut command = Command::new(&nginx);
            command.args(["-c", conf.to_str().unwrap(), "-p", dir.path().to_str().unwrap(), "-e", "stderr"]);
            let nginx = Process::spawn("nginx", command);
            let proxied = || server.process.log().lines().filter(|l| l.contains("the client is 127.0.0.1:")).count();
            let before = proxied();
            if wait_listening_or_exit(port, &nginx).await {
                let client = start_client(
                    SocketAddr::from(([127, 0, 0, 1], port)),
                    "proxied-pw",
                    &["--pin-sha256", pin.as_str()],
                )
                .await;
                assert!(echoes_via(client.addr, "127.0.0.1", echo.port()).await, "{}", server.process.log());
                let read = server.process.wait_lines(&["the client is 127.0.0.1:"], before + 1, Duration::from_secs(5));
                assert!(read.await, "nginx's header was read: {}", server.process.log());
                ran += 1;
            } else {
                announce(&format!("SKIP proxy protocol: nginx has no stream module here: {}", nginx.log()));
            }
        } else {
            announce("SKIP proxy protocol: nginx is not installed (apt-get install nginx)");
        }
        if ran == 0 {
            announce("SKIP proxy protocol: no real balancer ran");
        }
    })
    .await
}

/// Whether a line of `process`'s log holds every one of `parts` within 5 s (the log is
/// read from its pipe by a thread, so a line can trail what it reports).
async fn line_with_all(process: &Process, parts: &[&str]) -> bool {
    for _ in 0..200 {
        if process.log().lines().any(|line| parts.iter().all(|part| line.contains(part))) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}

async fn wait_listening(port: u16) {
    for _ in 0..200 {
        if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("nothing listens on port {port} after 10 s");
}

/// Whether `port` is listened on before `process` exits (nginx refusing its config exits).
async fn wait_listening_or_exit(port: u16, process: &Process) -> bool {
    for _ in 0..200 {
        if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return true;
        }
        if process.log().contains("emerg") {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}
