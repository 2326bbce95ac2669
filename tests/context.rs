//! Two servers in one process share nothing: each has its own context (users, pool,
//! outbound policy, counters). Server A refuses loopback destinations and is sent a wrong
//! password; server B allows everything and sees neither. Real client processes, both
//! servers in-process on loopback; every wait is bounded.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

use anytls_rs::client::tls::{Trust, client_config};
use anytls_rs::proto::PasswordHash;
use anytls_rs::server::limits::ServerLimits;
use anytls_rs::server::policy::{Cidr, Policy, Refusal};
use anytls_rs::server::users::{UserEntry, Users};
use anytls_rs::server::{self, ServerContext};
use common::{SOCKS5_OK, bounded, in_process_server_config, socks5_connect, spawn_echo, start_client};

const PASSWORD: &str = "context-secret";

/// Starts a server with its own context and `rules`; returns its address and context.
async fn start(rules: Policy) -> (std::net::SocketAddr, Arc<ServerContext>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = in_process_server_config(Vec::new());
    let users = Users::new(UserEntry::unnamed(vec![PasswordHash::of(PASSWORD)])).unwrap();
    let context = Arc::new(ServerContext::from_config(&config, Arc::new(users)).with_policy(rules));
    let limits = ServerLimits::default();
    tokio::spawn(server::serve(vec![listener], config, context.clone(), limits, std::future::pending()));
    (addr, context)
}

/// TLS to `server`, then a block that is not an authentication, then close.
async fn send_wrong_password(server: std::net::SocketAddr) {
    let tls = TlsConnector::from(client_config(&Trust::Insecure).unwrap());
    let tcp = TcpStream::connect(server).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tls.connect(name, tcp).await.unwrap();
    tls.write_all(&[0x5a; 64]).await.unwrap();
    let _ = tls.shutdown().await;
}

fn metric(page: &str, series: &str) -> u64 {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{series}:\n{page}"))
}

#[tokio::test]
async fn two_servers_in_one_process_keep_their_own_policy_and_counters() {
    bounded(Duration::from_secs(60), "two servers", async {
        let echo = spawn_echo().await;
        let strict = Policy { deny: vec![Cidr::parse("127.0.0.0/8").unwrap()], ..Policy::default() };
        let (a, context_a) = start(strict).await;
        let (b, context_b) = start(Policy::default()).await;
        let client_a = start_client(a, PASSWORD, &["--insecure"]).await;
        let client_b = start_client(b, PASSWORD, &["--insecure"]).await;

        let (code_a, _) = socks5_connect(client_a.addr, "127.0.0.1", echo.port()).await.unwrap();
        let (code_b, _) = socks5_connect(client_b.addr, "127.0.0.1", echo.port()).await.unwrap();
        assert_ne!(code_a, SOCKS5_OK, "A's policy refuses loopback");
        assert_eq!(code_b, SOCKS5_OK, "B's policy is its own: nothing refused");
        assert_eq!((context_a.policy.refused(Refusal::Deny), context_b.policy.refused(Refusal::Deny)), (1, 0));

        send_wrong_password(a).await;
        let failures = |c: &ServerContext| c.handshakes.auth_failures.load(Ordering::Relaxed);
        let counted = async {
            while failures(&context_a) == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), counted).await.expect("A counts the wrong password");
        assert_eq!(failures(&context_b), 0, "B never saw it");

        let page_a = anytls_rs::metrics::render_prometheus(context_a.as_ref(), 50);
        let page_b = anytls_rs::metrics::render_prometheus(context_b.as_ref(), 50);
        assert_eq!(metric(&page_a, "anytls_policy_refused_total{reason=\"deny\"}"), 1);
        assert_eq!(metric(&page_b, "anytls_policy_refused_total{reason=\"deny\"}"), 0);
        assert_eq!(metric(&page_a, "anytls_auth_failures_total{reason=\"invalid\"}"), 1);
        assert_eq!(metric(&page_b, "anytls_auth_failures_total{reason=\"invalid\"}"), 0);
        assert_eq!(metric(&page_b, "anytls_user_streams_total{user=\"-p#1\"}"), 1, "{page_b}");
    })
    .await;
}
