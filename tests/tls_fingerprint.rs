//! The TLS handshake as the network sees it: what our client's ClientHello offers
//! (captured by a raw TCP listener standing in for the server), and which key exchange
//! our server settles on with clients that offer the X25519MLKEM768 hybrid or not.

mod common;

use std::time::Duration;

use rustls::NamedGroup;
use rustls::crypto::{CryptoProvider, SupportedKxGroup, aws_lc_rs};
use rustls::pki_types::ServerName;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

use common::*;

/// X25519MLKEM768 public key share: ML-KEM-768 encapsulation key + X25519 key.
const HYBRID_SHARE_LEN: usize = 1184 + 32;

/// The parts of a ClientHello this test checks.
#[derive(Debug)]
struct Hello {
    record_len: usize,
    cipher_suites: Vec<u16>,
    /// Extension types in the order sent.
    extensions: Vec<u16>,
    supported_groups: Vec<u16>,
    key_shares: Vec<(u16, usize)>,
    alpn: Vec<String>,
}

/// Reads the first TLS record from `tcp` and parses the ClientHello in it.
async fn read_client_hello(tcp: &mut TcpStream) -> Hello {
    let mut header = [0u8; 5];
    tcp.read_exact(&mut header).await.expect("record header");
    assert_eq!(header[0], 22, "the first record is a handshake record");
    let record_len = u16::from_be_bytes([header[3], header[4]]) as usize;
    let mut body = vec![0u8; record_len];
    tcp.read_exact(&mut body).await.expect("record body");
    assert_eq!(body[0], 1, "the first handshake message is a ClientHello");
    let hello_len = u32::from_be_bytes([0, body[1], body[2], body[3]]) as usize;
    assert!(hello_len + 4 <= body.len(), "the ClientHello fits one record ({hello_len} bytes)");
    let mut at = 4 + 2 + 32; // type and length, legacy version, random
    let skip = |at: &mut usize, len_bytes: usize| {
        let len = body[*at..*at + len_bytes].iter().fold(0usize, |n, b| n << 8 | *b as usize);
        *at += len_bytes + len;
    };
    skip(&mut at, 1); // session id
    let suites_len = u16::from_be_bytes([body[at], body[at + 1]]) as usize;
    let cipher_suites = body[at + 2..at + 2 + suites_len].chunks(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect();
    skip(&mut at, 2); // cipher suites
    skip(&mut at, 1); // compression methods
    let extensions_end = at + 2 + u16::from_be_bytes([body[at], body[at + 1]]) as usize;
    at += 2;
    let (mut supported_groups, mut key_shares, mut extensions, mut alpn) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    while at < extensions_end {
        let kind = u16::from_be_bytes([body[at], body[at + 1]]);
        let len = u16::from_be_bytes([body[at + 2], body[at + 3]]) as usize;
        let data = &body[at + 4..at + 4 + len];
        extensions.push(kind);
        match kind {
            0x0010 => {
                let mut i = 2;
                while i < data.len() {
                    let n = data[i] as usize;
                    alpn.push(String::from_utf8_lossy(&data[i + 1..i + 1 + n]).into_owned());
                    i += 1 + n;
                }
            }
            0x000a => supported_groups = data[2..].chunks(2).map(|g| u16::from_be_bytes([g[0], g[1]])).collect(),
            0x0033 => {
                let mut i = 2;
                while i < data.len() {
                    let group = u16::from_be_bytes([data[i], data[i + 1]]);
                    let share = u16::from_be_bytes([data[i + 2], data[i + 3]]) as usize;
                    key_shares.push((group, share));
                    i += 4 + share;
                }
            }
            _ => {}
        }
        at += 4 + len;
    }
    Hello { record_len, cipher_suites, extensions, supported_groups, key_shares, alpn }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_hello_offers_x25519mlkem768_first_with_an_x25519_share() {
    bounded(Duration::from_secs(60), "ClientHello capture", async {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let fake_server = listener.local_addr().expect("addr");
        let client = start_client(fake_server, PASSWORD, &["--insecure"]).await;
        // A local connection makes the client dial the "server"; its SOCKS answer
        // never comes (the listener only reads), so it runs in the background.
        let proxy = client.addr;
        let socks = tokio::spawn(async move { socks5_connect(proxy, "127.0.0.1", 9).await });
        let (mut tcp, _) = listener.accept().await.expect("the client dials");
        let hello = read_client_hello(&mut tcp).await;
        eprintln!("ClientHello: {hello:?}");
        let (hybrid, x25519) = (u16::from(NamedGroup::X25519MLKEM768), u16::from(NamedGroup::X25519));
        assert_eq!(hello.supported_groups[..2], [hybrid, x25519], "groups: {:x?}", hello.supported_groups);
        assert_eq!(hello.key_shares, [(hybrid, HYBRID_SHARE_LEN), (x25519, 32)]);
        assert!(hello.record_len > HYBRID_SHARE_LEN, "record of {} bytes", hello.record_len);
        // Chrome's and Go's order (with AES instructions): AES-128-GCM first, then AES-256,
        // then ChaCha20; the TLS 1.2 suites ECDSA before RSA. Chrome adds GREASE and CBC
        // suites in front of and after these; rustls sends neither, and ends the list with
        // the renegotiation SCSV (00ff) where Chrome and Go send the renegotiation_info extension.
        let expected = [0x1301, 0x1302, 0x1303, 0xc02b, 0xc02f, 0xc02c, 0xc030, 0xcca9, 0xcca8, 0x00ff];
        assert_eq!(hello.cipher_suites, expected, "suites: {:04x?}", hello.cipher_suites);
        assert_eq!(hello.alpn, ["h2", "http/1.1"], "a browser's ALPN list");
        announce(&format!("NOTE ClientHello extensions, in order: {:04x?}", hello.extensions));
        socks.abort();
    })
    .await;
}

/// A TLS client of our own that offers exactly `groups` and trusts the test CA.
fn client_offering(groups: &[&'static dyn SupportedKxGroup], ca: &std::path::Path) -> tokio_rustls::TlsConnector {
    tls_client_trusting(ca, CryptoProvider { kx_groups: groups.to_vec(), ..aws_lc_rs::default_provider() })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_agrees_on_the_hybrid_and_still_serves_classical_clients() {
    bounded(Duration::from_secs(60), "server key exchange", async {
        let dir = TempDir::new("tls-groups");
        let pki = TestPki::write_to(dir.path());
        let cert = pki.server_cert.to_str().expect("utf-8 path");
        let key = pki.server_key.to_str().expect("utf-8 path");
        let server = start_server(PASSWORD, &["--cert", cert, "--key", key]).await;
        use aws_lc_rs::kx_group::{SECP256R1, X25519, X25519MLKEM768};
        // A client sends shares for its first group (and X25519 alongside a hybrid); the
        // server takes the first of its own groups it has a share for, so a client that
        // puts X25519 first gets X25519 without a second round trip.
        let cases: [(&[&'static dyn SupportedKxGroup], NamedGroup); 5] = [
            (&[X25519MLKEM768, X25519], NamedGroup::X25519MLKEM768),
            (&[X25519MLKEM768], NamedGroup::X25519MLKEM768),
            (&[X25519, X25519MLKEM768], NamedGroup::X25519),
            (&[X25519], NamedGroup::X25519),
            (&[SECP256R1], NamedGroup::secp256r1),
        ];
        for (offered, expected) in cases {
            let connector = client_offering(offered, &pki.ca_cert);
            let tcp = TcpStream::connect(server.addr).await.expect("connect");
            let name = ServerName::try_from("localhost").expect("name");
            let tls = connector.connect(name, tcp).await.expect("handshake with our server");
            let (_, connection) = tls.get_ref();
            let agreed = connection.negotiated_key_exchange_group().map(|group| group.name());
            let names: Vec<NamedGroup> = offered.iter().map(|group| group.name()).collect();
            assert_eq!(agreed, Some(expected), "client offering {names:?}");
        }
    })
    .await;
}
