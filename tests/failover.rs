//! Several servers behind one client, as real processes on loopback: a server killed
//! under load (traffic moves to the next after at most the threshold's worth of
//! failures), the same server restarted on its port (traffic returns to it), and
//! round-robin spreading connections.
//!
//! The process helpers are a trimmed copy of `tests/common/mod.rs` from the e2e-tests
//! branch; they move there when the branches merge. Every wait is bounded, and
//! processes are killed when their handle drops (also when a test panics).

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const PASSWORD: &str = "failover-secret";
const STARTUP: Duration = Duration::from_secs(20);
const THRESHOLD: usize = 3;

/// A child process with its output collected; killed on drop.
struct Process {
    name: String,
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Process {
    fn spawn(name: &str, mut command: Command) -> Process {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("RUST_LOG", "info,anytls_rs=debug");
        let mut child = command.spawn().unwrap_or_else(|err| panic!("cannot start {name}: {err}"));
        let log = Arc::new(Mutex::new(String::new()));
        let stdout: Box<dyn Read + Send> = Box::new(child.stdout.take().expect("piped stdout"));
        let stderr: Box<dyn Read + Send> = Box::new(child.stderr.take().expect("piped stderr"));
        for pipe in [stdout, stderr] {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let mut log = log.lock().expect("log lock");
                    log.push_str(&line);
                    log.push('\n');
                }
            });
        }
        Process { name: name.to_string(), child, log }
    }

    fn log(&self) -> String {
        self.log.lock().expect("log lock").clone()
    }

    /// The socket address after `marker` in the first line that has one.
    async fn wait_for_address(&mut self, marker: &str) -> Result<SocketAddr, String> {
        let deadline = Instant::now() + STARTUP;
        loop {
            if let Some(addr) = self.log().lines().find_map(|line| after_word(line, marker)) {
                return Ok(addr);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                tokio::time::sleep(Duration::from_millis(100)).await;
                return Err(format!("{} exited ({status}); log:\n{}", self.name, self.log()));
            }
            if Instant::now() >= deadline {
                return Err(format!("{}: no `{marker}` line; log:\n{}", self.name, self.log()));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("----- log of {} -----\n{}----- end -----", self.name, self.log());
        }
    }
}

fn after_word(line: &str, marker: &str) -> Option<SocketAddr> {
    let rest = line.split(marker).nth(1)?;
    let end = rest.find([' ', ',']).unwrap_or(rest.len());
    rest[..end].parse().ok()
}

async fn start_server(listen: &str) -> Result<(Process, SocketAddr), String> {
    let mut command = Command::new(env!("CARGO_BIN_EXE_anytls-server"));
    command.args(["-l", listen, "-p", PASSWORD]);
    let mut process = Process::spawn("anytls-server", command);
    let addr = process.wait_for_address("listening on ").await?;
    Ok((process, addr))
}

/// Restarts a server on the port it had; the port may take a moment to be free again.
async fn restart_server(addr: SocketAddr) -> Process {
    let deadline = Instant::now() + STARTUP;
    loop {
        match start_server(&addr.to_string()).await {
            Ok((process, _)) => return process,
            Err(why) if Instant::now() >= deadline => panic!("cannot restart the server on {addr}: {why}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

async fn start_client(servers: &[SocketAddr], extra: &[&str]) -> (Process, SocketAddr) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_anytls-client"));
    command.args(["-l", "127.0.0.1:0", "-p", PASSWORD, "--insecure"]);
    for server in servers {
        command.args(["-s", &server.to_string()]);
    }
    command.args(extra);
    let mut process = Process::spawn("anytls-client", command);
    let addr = process.wait_for_address("proxy on ").await.unwrap_or_else(|why| panic!("{why}"));
    (process, addr)
}

async fn spawn_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut reader, mut writer) = tcp.split();
                let _ = tokio::io::copy(&mut reader, &mut writer).await;
            });
        }
    });
    addr
}

/// One request through the proxy: SOCKS5 CONNECT to the echo target, a message and its
/// echo, all within a few seconds.
async fn request(proxy: SocketAddr, target: SocketAddr, n: usize) -> Result<(), String> {
    let attempt = async {
        let mut tcp = TcpStream::connect(proxy).await.map_err(|e| e.to_string())?;
        tcp.write_all(&[5, 1, 0]).await.map_err(|e| e.to_string())?;
        let mut method = [0u8; 2];
        tcp.read_exact(&mut method).await.map_err(|e| e.to_string())?;
        let mut connect = vec![5, 1, 0, 1];
        connect.extend_from_slice(&[127, 0, 0, 1]);
        connect.extend_from_slice(&target.port().to_be_bytes());
        tcp.write_all(&connect).await.map_err(|e| e.to_string())?;
        let mut reply = [0u8; 10];
        tcp.read_exact(&mut reply).await.map_err(|e| e.to_string())?;
        if reply[1] != 0 {
            return Err(format!("SOCKS5 reply code {}", reply[1]));
        }
        let message = format!("request {n}");
        tcp.write_all(message.as_bytes()).await.map_err(|e| e.to_string())?;
        let mut echo = vec![0u8; message.len()];
        tcp.read_exact(&mut echo).await.map_err(|e| e.to_string())?;
        if echo != message.as_bytes() {
            return Err("echo differs".into());
        }
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(8), attempt).await.map_err(|_| "timed out".to_string())?
}

/// Streams a server served to `target` (its DEBUG line `stream N -> TARGET`).
fn streams_to(server: &Process, target: SocketAddr) -> usize {
    let needle = format!("-> {target} (");
    server.log().lines().filter(|line| line.contains(&needle)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_survives_a_killed_server_and_returns_when_it_is_back() {
    let echo = spawn_echo().await;
    let (primary, primary_addr) = start_server("127.0.0.1:0").await.unwrap();
    let (standby, standby_addr) = start_server("127.0.0.1:0").await.unwrap();
    let threshold = THRESHOLD.to_string();
    let (client, proxy) = start_client(
        &[primary_addr, standby_addr],
        &["--fallback-threshold", &threshold, "--probe-interval-secs", "1"],
    )
    .await;

    for n in 0..5 {
        request(proxy, echo, n).await.unwrap_or_else(|why| panic!("request {n}: {why}\n{}", client.log()));
    }
    assert_eq!(streams_to(&primary, echo), 5, "failover uses the first server while it works");
    assert_eq!(streams_to(&standby, echo), 0);

    // Load: requests one after another while the primary is killed.
    let load = tokio::spawn(async move {
        let mut results = Vec::new();
        for n in 0..60 {
            results.push(request(proxy, echo, 100 + n).await);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        results
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(primary);
    let results = load.await.unwrap();
    let failures: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    eprintln!("{} of {} requests failed around the kill: {failures:?}", failures.len(), results.len());
    // The threshold's worth of failed connects, plus at most the one request in flight
    // when the process died.
    assert!(
        failures.len() <= THRESHOLD + 1,
        "{} failures: {failures:?}\nclient log:\n{}",
        failures.len(),
        client.log()
    );
    assert!(results.iter().rev().take(20).all(Result::is_ok), "the last requests all succeed: {results:?}");
    assert!(streams_to(&standby, echo) > 0, "the standby took over");

    // The primary comes back on its port: probes find it and traffic returns.
    let primary = restart_server(primary_addr).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut n = 1000;
    while streams_to(&primary, echo) == 0 {
        assert!(Instant::now() < deadline, "traffic did not return to the primary\nclient log:\n{}", client.log());
        request(proxy, echo, n).await.unwrap_or_else(|why| panic!("request {n}: {why}"));
        n += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let standby_before = streams_to(&standby, echo);
    for n in 2000..2005 {
        request(proxy, echo, n).await.unwrap_or_else(|why| panic!("request {n}: {why}"));
    }
    assert_eq!(streams_to(&standby, echo), standby_before, "back on the primary, the standby is idle again");
    drop(standby);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_new_connections_over_the_servers() {
    let echo = spawn_echo().await;
    let (one, one_addr) = start_server("127.0.0.1:0").await.unwrap();
    let (two, two_addr) = start_server("127.0.0.1:0").await.unwrap();
    let (_client, proxy) = start_client(&[one_addr, two_addr], &["--policy", "round-robin"]).await;
    for n in 0..10 {
        request(proxy, echo, n).await.unwrap_or_else(|why| panic!("request {n}: {why}"));
    }
    assert_eq!((streams_to(&one, echo), streams_to(&two, echo)), (5, 5));
}
