//! `--dns-server`: destination names looked up at the DNS servers the operator names, over
//! UDP, TCP, TLS and HTTPS, against a real resolver on loopback (Debian's `unbound`,
//! serving a `test.` zone the system resolver does not know, so a name that resolves was
//! answered by it). Checked: each transport resolves through our server and client; an
//! encrypted server's certificate is checked (`--dns-ca`); a name the zone lacks fails the
//! stream with "host unreachable"; the records' TTL is honoured (a 1 s record is asked
//! again, a 30 s one is not); and a server that never answers stalls only the names it
//! holds, while a silent server listed first does not stall the names the next one answers.

mod common;

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const LIMIT: Duration = Duration::from_secs(120);
const PASSWORD: &str = "dns-pw";

/// A running unbound with its ports and the certificate its TLS and HTTPS ports show.
struct Unbound {
    process: Process,
    plain: u16,
    tls: u16,
    https: u16,
    cert: PathBuf,
    _dir: TempDir,
}

fn unbound_binary() -> Option<PathBuf> {
    ["/usr/sbin/unbound", "/usr/bin/unbound"].iter().map(PathBuf::from).find(|path| path.exists())
}

/// A certificate for 127.0.0.1 (unbound's TLS and HTTPS ports), self-signed: it is its own CA.
fn write_certificate(dir: &Path) -> (PathBuf, PathBuf) {
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    let (cert_path, key_path) = (dir.join("dns-cert.pem"), dir.join("dns-key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (cert_path, key_path)
}

/// unbound on 127.0.0.1 answering the `test.` zone itself and sending `silent.example.`
/// to `silent` (a server that never answers). None (and a SKIP line) without unbound.
async fn start_unbound(silent: u16) -> Option<Unbound> {
    let Some(binary) = unbound_binary() else {
        announce("SKIP dns: unbound is not installed (apt-get install unbound)");
        return None;
    };
    let dir = TempDir::new("unbound");
    let (cert, key) = write_certificate(dir.path());
    let (plain, tls, https) = (free_port(), free_port(), free_port());
    let conf = dir.path().join("unbound.conf");
    std::fs::write(
        &conf,
        format!(
            r#"server:
  interface: 127.0.0.1@{plain}
  interface: 127.0.0.1@{tls}
  interface: 127.0.0.1@{https}
  tls-port: {tls}
  https-port: {https}
  tls-service-key: "{key}"
  tls-service-pem: "{cert}"
  do-daemonize: no
  username: ""
  chroot: ""
  directory: "{dir}"
  pidfile: ""
  use-syslog: no
  logfile: ""
  verbosity: 1
  log-queries: yes
  do-ip6: no
  access-control: 127.0.0.0/8 allow
  module-config: "iterator"
  do-not-query-localhost: no
  local-zone: "test." static
  local-data: "ok.test. 30 IN A 127.0.0.1"
  local-data: "short.test. 1 IN A 127.0.0.1"
forward-zone:
  name: "silent.example."
  forward-addr: 127.0.0.1@{silent}
"#,
            key = key.display(),
            cert = cert.display(),
            dir = dir.path().display(),
        ),
    )
    .unwrap();
    let mut command = Command::new(binary);
    command.args(["-d", "-c", conf.to_str().unwrap()]);
    let mut process = Process::spawn("unbound", command);
    process
        .wait_for(Duration::from_secs(10), "unbound's `start of service`", |line| {
            line.contains("start of service").then_some(())
        })
        .await;
    Some(Unbound { process, plain, tls, https, cert, _dir: dir })
}

/// A DNS server that reads every query and answers none, on UDP and TCP at one port.
fn spawn_silent_dns() -> (u16, UdpSocket, std::net::TcpListener) {
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = udp.local_addr().unwrap().port();
    // TCP connections are accepted by the kernel into the backlog and never read.
    let tcp = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    (port, udp, tcp)
}

async fn pair_asking(servers: &[&str], extra: &[&str]) -> (Server, Client) {
    let mut args: Vec<&str> = Vec::new();
    for server in servers {
        args.extend(["--dns-server", server]);
    }
    args.extend(extra);
    let server = start_server(PASSWORD, &args).await;
    let pin = server.fingerprint.clone().expect("a self-signed pin");
    let client = start_client(server.addr, PASSWORD, &["--pin-sha256", pin.as_str()]).await;
    (server, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_are_looked_up_at_the_named_servers_over_udp_tcp_tls_and_https() {
    bounded(LIMIT, "dns transports", async {
        let (silent, _udp, _tcp) = spawn_silent_dns();
        let Some(unbound) = start_unbound(silent).await else { return };
        let echo = spawn_echo().await;
        let ca = unbound.cert.to_str().unwrap().to_owned();
        let specs = [
            format!("127.0.0.1:{}", unbound.plain),
            format!("udp://127.0.0.1:{}", unbound.plain),
            format!("tcp://127.0.0.1:{}", unbound.plain),
            format!("tls://127.0.0.1:{}", unbound.tls),
            format!("https://127.0.0.1:{}/dns-query", unbound.https),
        ];
        for spec in &specs {
            let (server, client) = pair_asking(&[spec], &["--dns-ca", &ca]).await;
            assert!(server.process.log().contains("destination names are looked up at DNS servers"), "{spec}");
            assert!(
                echoes_via(client.addr, "ok.test", echo.port()).await,
                "{spec}: ok.test\n{}\nunbound:\n{}",
                server.process.log(),
                unbound.process.log()
            );
            // Not in the zone: the stream fails, worded as clients map to "host unreachable".
            assert!(!echoes_via(client.addr, "missing.test", echo.port()).await, "{spec}");
            let failed = "missing.test:";
            assert!(server.process.wait_lines(&[failed], 1, Duration::from_secs(5)).await, "{}", server.process.log());
            assert!(server.process.log().contains("host unreachable"), "{spec}: {}", server.process.log());
        }
        // The queries reached unbound (log-queries), the system resolver never knew `test.`.
        assert!(count_lines(&unbound.process.log(), "ok.test. A IN") >= specs.len(), "{}", unbound.process.log());

        // An encrypted server's certificate is checked: without --dns-ca it is not trusted.
        for spec in &specs[3..] {
            let (server, client) = pair_asking(&[spec], &[]).await;
            assert!(!echoes_via(client.addr, "ok.test", echo.port()).await, "{spec}: trusted a self-signed server");
            assert!(
                server.process.wait_lines(&["ok.test:"], 1, Duration::from_secs(15)).await,
                "{}",
                server.process.log()
            );
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_records_ttl_decides_when_a_name_is_asked_again() {
    bounded(LIMIT, "dns ttl", async {
        let (silent, _udp, _tcp) = spawn_silent_dns();
        let Some(unbound) = start_unbound(silent).await else { return };
        let echo = spawn_echo().await;
        let spec = format!("127.0.0.1:{}", unbound.plain);
        let (server, api) = start_server_with_api(&["-p", PASSWORD, "--dns-server", &spec]).await;
        let pin = server.fingerprint.clone().expect("a self-signed pin");
        let client = start_client(server.addr, PASSWORD, &["--pin-sha256", pin.as_str()]).await;
        let lookups = || async {
            let (_, metrics) = api_get(api, "/metrics", None).await;
            counter_sample(&metrics, "anytls_pool_name_lookups_total{pool=\"outbound\"}").expect("the lookups counter")
        };
        let before = lookups().await;
        for host in ["ok.test", "short.test"] {
            assert!(echoes_via(client.addr, host, echo.port()).await, "{host}: {}", server.process.log());
        }
        assert_eq!(lookups().await, before + 2);
        // Past short.test's 1 s TTL, within ok.test's 30 s.
        tokio::time::sleep(Duration::from_millis(2100)).await;
        for host in ["ok.test", "short.test"] {
            assert!(echoes_via(client.addr, host, echo.port()).await, "{host}");
        }
        assert_eq!(lookups().await, before + 3, "short.test asked again, ok.test not");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_answers_stalls_only_what_it_holds() {
    bounded(LIMIT, "dns silent", async {
        let (silent, _udp, _tcp) = spawn_silent_dns();
        let Some(unbound) = start_unbound(silent).await else { return };
        let echo = spawn_echo().await;

        // Names unbound forwards to the silent server hang; names it holds do not wait on them.
        let (server, client) = pair_asking(&[&format!("127.0.0.1:{}", unbound.plain)], &[]).await;
        let hanging: Vec<_> = (0..6)
            .map(|i| tokio::spawn(async move { echoes_via(client.addr, &format!("n{i}.silent.example"), 80).await }))
            .collect();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let started = Instant::now();
        assert!(echoes_via(client.addr, "ok.test", echo.port()).await, "{}", server.process.log());
        let took = started.elapsed();
        assert!(took < Duration::from_secs(2), "ok.test waited {took:?} behind the silent names");
        assert!(hanging.iter().all(|h| !h.is_finished()), "the silent names are still being looked up");
        for dial in hanging {
            assert!(!dial.await.unwrap(), "a silent name never resolves");
        }

        // A silent server listed first: the names still resolve, from the one after it.
        let silent_spec = format!("127.0.0.1:{silent}");
        let (server, client) = pair_asking(&[&silent_spec, &format!("127.0.0.1:{}", unbound.plain)], &[]).await;
        let started = Instant::now();
        assert!(echoes_via(client.addr, "ok.test", echo.port()).await, "{}", server.process.log());
        let took = started.elapsed();
        assert!(took < Duration::from_secs(3), "a silent first server cost {took:?}");
    })
    .await
}

#[tokio::test]
async fn check_names_a_bad_dns_server() {
    let state = TempDir::new("dns-check");
    let (status, out) =
        server_command(&["check", "-p", PASSWORD, "--dns-server", "quic://1.1.1.1"], state.path()).await;
    assert!(!status.success(), "{out}");
    assert!(out.contains("--dns-server \"quic://1.1.1.1\": unknown scheme"), "{out}");
    let missing = state.path().join("none.pem");
    let (status, out) = server_command(
        &["check", "-p", PASSWORD, "--dns-server", "tls://1.1.1.1", "--dns-ca", missing.to_str().unwrap()],
        state.path(),
    )
    .await;
    assert!(!status.success() && out.contains("--dns-ca"), "{out}");
}
