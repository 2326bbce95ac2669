//! Several `--listen` addresses: one server on IPv4 and IPv6 loopback serves clients on
//! each, refuses streams to every one of its own addresses, and `check` refuses an
//! address given twice.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(60);
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_server_serves_every_address_it_listens_on() {
    bounded(LIMIT, "several listeners", async {
        if std::net::TcpListener::bind("[::1]:0").is_err() {
            announce("SKIP several listeners: no IPv6 loopback here");
            return;
        }
        let mut server = start_server("two-doors-pw", &["-l", "[::1]:0"]).await;
        let ipv6: SocketAddr = server
            .process
            .wait_for(STARTUP_TIMEOUT, "`also listening on` line", |line| {
                line.split("also listening on ").nth(1)?.trim().parse().ok()
            })
            .await;
        assert!(server.addr.is_ipv4() && ipv6.is_ipv6(), "{} and {ipv6}", server.addr);
        let pin = server.fingerprint.clone().expect("a self-signed pin");
        let trust = ["--pin-sha256", pin.as_str()];
        let echo = spawn_echo().await;
        let on_ipv4 = start_client(server.addr, "two-doors-pw", &trust).await;
        let on_ipv6 = start_client(ipv6, "two-doors-pw", &trust).await;
        assert!(echoes_via(on_ipv4.addr, "127.0.0.1", echo.port()).await, "{}", server.process.log());
        assert!(echoes_via(on_ipv6.addr, "127.0.0.1", echo.port()).await, "{}", server.process.log());
        // Both are the server's own: a stream to either is refused (no loop through itself).
        for own in [server.addr, ipv6] {
            let (code, _) = socks5_connect(on_ipv4.addr, &own.ip().to_string(), own.port()).await.unwrap();
            assert_ne!(code, SOCKS5_OK, "{own}");
        }
        assert!(server.process.log_shows("is the server's own address", Duration::from_secs(5)).await);
    })
    .await
}

#[tokio::test]
async fn check_refuses_an_address_given_twice() {
    bounded(LIMIT, "listen twice", async {
        let state = TempDir::new("listeners-check");
        let args = ["check", "-p", "twice-pw", "-l", "127.0.0.1:9443", "-l", "127.0.0.1:9443"];
        let (status, out) = server_command(&args, state.path()).await;
        let expected = "--listen is given 127.0.0.1:9443 twice";
        assert!(!status.success() && out.contains(expected), "{out}");
    })
    .await
}
