//! UDP through the pair: a local app speaks SOCKS5 UDP ASSOCIATE to our client, which
//! carries the datagrams as UDP over TCP to our server, which sends them to local UDP
//! targets (an echo and a DNS-style responder). Both services run in-process on
//! loopback; every wait is bounded.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_rustls::TlsConnector;

use anytls_rs::client::servers::Servers;
use anytls_rs::client::sessions::{Connector, SessionPool, SessionPoolSettings};
use anytls_rs::client::tls::{Trust, client_config};
use anytls_rs::client::{self, ClientConfig};
use anytls_rs::pool::PoolType;
use anytls_rs::proto::{Address, PasswordHash};
use anytls_rs::server;
use anytls_rs::session::{ClientSessionOptions, SessionConfig};

mod common;

use common::in_process_server_config;

const WAIT: Duration = Duration::from_secs(5);

async fn start_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(server::run(listener, in_process_server_config(vec![PasswordHash::of("pw")])));
    addr
}

/// A library caller that passes no password gets an error, not a panic in its task.
#[tokio::test]
async fn a_server_without_passwords_returns_an_error() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let started = tokio::time::timeout(WAIT, server::run(listener, in_process_server_config(Vec::new()))).await;
    match started {
        Ok(Err(server::ServerError::Users(why))) => assert_eq!(why, anytls_rs::server::users::UsersError::None),
        other => panic!("expected a users error at once, got {other:?}"),
    }
}

/// Our client's proxy port, on IPv6 loopback where it exists: a SOCKS5 datagram carrying
/// a 65,507-byte payload (the IPv4 maximum) is 10 bytes larger, which only IPv6 fits.
async fn start_client(server: SocketAddr) -> SocketAddr {
    let listener = match TcpListener::bind("[::1]:0").await {
        Ok(listener) => listener,
        Err(_) => TcpListener::bind("127.0.0.1:0").await.unwrap(),
    };
    let addr = listener.local_addr().unwrap();
    let connector = Connector {
        server: Address::socket(server),
        server_name: ServerName::try_from("localhost").unwrap(),
        tls: TlsConnector::from(client_config(&Trust::Insecure).unwrap()),
        password: PasswordHash::of("pw"),
        session_config: SessionConfig::default(),
        client_options: ClientSessionOptions::default(),
        connect_timeout: Duration::from_secs(2),
        keepalive: Default::default(),
        bind: None,
    };
    let settings = SessionPoolSettings {
        pool_type: PoolType::LockFree,
        idle_timeout: Duration::from_secs(60),
        min_idle: 0,
        max_streams_per_session: 1,
        max_idle: 8,
    };
    let config = ClientConfig {
        servers: Arc::new(Servers::single(SessionPool::new(connector, settings))),
        credentials: None,
        idle_check_interval: Duration::from_secs(30),
        stats_interval: Duration::from_secs(600),
        local_handshake_timeout: Duration::from_secs(10),
        max_connections: 64,
        relay_buffers: Default::default(),
    };
    tokio::spawn(client::run(listener, config));
    addr
}

/// A SOCKS5 UDP association: the control connection (keep it open) and the relay address.
async fn associate(proxy: SocketAddr) -> (TcpStream, SocketAddr) {
    let mut tcp = TcpStream::connect(proxy).await.unwrap();
    tcp.write_all(&[5, 1, 0]).await.unwrap();
    let mut method = [0u8; 2];
    tcp.read_exact(&mut method).await.unwrap();
    assert_eq!(method, [5, 0]);
    tcp.write_all(&[5, 3, 0, 1, 0, 0, 0, 0, 0, 0]).await.unwrap();
    let mut head = [0u8; 4];
    tokio::time::timeout(WAIT, tcp.read_exact(&mut head)).await.expect("ASSOCIATE answered").unwrap();
    assert_eq!(head[1], 0, "SOCKS5 reply code");
    let ip: IpAddr = match head[3] {
        1 => {
            let mut octets = [0u8; 4];
            tcp.read_exact(&mut octets).await.unwrap();
            octets.into()
        }
        4 => {
            let mut octets = [0u8; 16];
            tcp.read_exact(&mut octets).await.unwrap();
            octets.into()
        }
        other => panic!("unexpected address type {other} in the ASSOCIATE reply"),
    };
    let port = tcp.read_u16().await.unwrap();
    (tcp, SocketAddr::new(ip, port))
}

/// The app's socket, on the relay's family.
async fn app_socket(relay: SocketAddr) -> UdpSocket {
    let any: SocketAddr = if relay.is_ipv6() { "[::1]:0".parse().unwrap() } else { "127.0.0.1:0".parse().unwrap() };
    UdpSocket::bind(any).await.unwrap()
}

fn socks5_datagram(host: &str, port: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 0];
    Address::domain(host, port).encode(&mut out);
    out.extend_from_slice(payload);
    out
}

/// Sends one datagram through the relay and returns the reply's source and payload.
async fn round_trip(app: &UdpSocket, relay: SocketAddr, host: &str, port: u16, payload: &[u8]) -> (Address, Vec<u8>) {
    app.send_to(&socks5_datagram(host, port, payload), relay).await.unwrap();
    let mut buf = vec![0u8; 70_000];
    let (len, from) = tokio::time::timeout(WAIT, app.recv_from(&mut buf)).await.expect("a reply in time").unwrap();
    assert_eq!(from, relay, "replies come from the relay socket");
    assert_eq!(&buf[..3], &[0, 0, 0]);
    let (source, used) = Address::decode_prefix(&buf[3..len]).unwrap().unwrap();
    (source, buf[3 + used..len].to_vec())
}

async fn udp_echo() -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok((len, from)) = socket.recv_from(&mut buf).await {
            let _ = socket.send_to(&buf[..len], from).await;
        }
    });
    addr
}

/// A DNS-style responder: answers any query with a fixed A record for `example.test`,
/// copying the query's id (as a real resolver would).
async fn dns_responder() -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 512];
        while let Ok((len, from)) = socket.recv_from(&mut buf).await {
            if len < 12 {
                continue;
            }
            let _ = socket.send_to(&dns_answer([buf[0], buf[1]]), from).await;
        }
    });
    addr
}

fn dns_query(id: u16) -> Vec<u8> {
    let mut query = id.to_be_bytes().to_vec();
    query.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    query.extend_from_slice(b"\x07example\x04test\x00\x00\x01\x00\x01");
    query
}

fn dns_answer(id: [u8; 2]) -> Vec<u8> {
    let mut answer = id.to_vec();
    answer.extend_from_slice(&[0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0]);
    answer.extend_from_slice(b"\x07example\x04test\x00\x00\x01\x00\x01");
    answer.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, 1]);
    answer
}

fn pattern(len: usize, seed: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + seed) as u8).collect()
}

#[tokio::test]
async fn datagrams_of_every_size_echo_through_the_pair() {
    let proxy = start_client(start_server().await).await;
    let echo = udp_echo().await;
    let (_control, relay) = associate(proxy).await;
    let app = app_socket(relay).await;
    // The largest payload the app can send depends on its family's datagram limit.
    let largest = if relay.is_ipv6() { 65_507 } else { 65_507 - 10 };
    let mut sizes: Vec<usize> = (0..150).map(|i| (i * 397) % 1500).collect();
    sizes.extend([8192, 32_768, 60_000, largest]);
    for (i, size) in sizes.into_iter().enumerate() {
        let payload = pattern(size, i);
        let (source, echoed) = round_trip(&app, relay, "127.0.0.1", echo.port(), &payload).await;
        assert_eq!(source, Address::socket(echo));
        assert_eq!(echoed.len(), size);
        assert!(echoed == payload, "datagram {i} of {size} bytes differs");
    }
}

#[tokio::test]
async fn a_domain_destination_is_resolved_by_the_server() {
    let proxy = start_client(start_server().await).await;
    let echo = udp_echo().await;
    let (_control, relay) = associate(proxy).await;
    let app = app_socket(relay).await;
    for i in 0..20 {
        let payload = pattern(100 + i, i);
        let (source, echoed) = round_trip(&app, relay, "localhost", echo.port(), &payload).await;
        assert_eq!(source.port, echo.port());
        assert_eq!(echoed, payload);
    }
}

#[tokio::test]
async fn a_dns_style_query_gets_its_answer() {
    let proxy = start_client(start_server().await).await;
    let dns = dns_responder().await;
    let (_control, relay) = associate(proxy).await;
    let app = app_socket(relay).await;
    for id in [0x1234u16, 0xbeef] {
        let (source, answer) = round_trip(&app, relay, "127.0.0.1", dns.port(), &dns_query(id)).await;
        assert_eq!(source, Address::socket(dns));
        assert_eq!(answer, dns_answer(id.to_be_bytes()));
    }
}

#[tokio::test]
async fn the_association_ends_with_its_control_connection() {
    let proxy = start_client(start_server().await).await;
    let echo = udp_echo().await;
    let (control, relay) = associate(proxy).await;
    let app = app_socket(relay).await;
    round_trip(&app, relay, "127.0.0.1", echo.port(), b"before").await;
    drop(control);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = app.send_to(&socks5_datagram("127.0.0.1", echo.port(), b"after"), relay).await;
    let mut buf = [0u8; 64];
    let late = tokio::time::timeout(Duration::from_millis(500), app.recv_from(&mut buf)).await;
    assert!(!matches!(late, Ok(Ok(_))), "no reply once the association is over");
}

#[tokio::test]
async fn datagrams_from_another_sender_are_ignored() {
    let proxy = start_client(start_server().await).await;
    let echo = udp_echo().await;
    let (_control, relay) = associate(proxy).await;
    let app = app_socket(relay).await;
    round_trip(&app, relay, "127.0.0.1", echo.port(), b"mine").await;
    let intruder = Arc::new(app_socket(relay).await);
    intruder.send_to(&socks5_datagram("127.0.0.1", echo.port(), b"theirs"), relay).await.unwrap();
    let mut buf = [0u8; 64];
    let stolen = tokio::time::timeout(Duration::from_millis(500), intruder.recv_from(&mut buf)).await;
    assert!(stolen.is_err(), "the intruder gets nothing back");
    let (_, echoed) = round_trip(&app, relay, "127.0.0.1", echo.port(), b"still mine").await;
    assert_eq!(echoed, b"still mine");
}
