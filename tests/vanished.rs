//! Clients that vanish without a FIN or a RST (their link cut, then the process killed):
//! the server's TCP keepalive and TCP_USER_TIMEOUT must notice, and every session,
//! socket, descriptor and outbound connection they held must be let go.
//!
//! The clients run in a network namespace this test creates, joined to the host by a
//! veth pair on a documentation /30 that nothing on the host uses (TEST-NET-1 if free,
//! else TEST-NET-2 or -3: .1 on the host side, .2 inside); no other address is used. The cut is `ip link set <veth> down` inside the
//! namespace, after which packets are dropped without an answer, and then a SIGKILL of
//! the client, whose FIN and RST cannot get out. Needs root and `ip netns`; prints
//! `SKIP vanished: …` and passes otherwise.
//!
//! Two shapes, one after the other (they share the addresses, so they cannot run at the
//! same time): (a) 50 sessions idle, their streams ended before the cut; (b) 50 streams
//! still open at the cut, each holding an outbound connection to the echo target.

mod common;

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::process::Command;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::*;

/// The /30 networks the veth pair may use, in order of preference: documentation
/// ranges only (TEST-NET-1, -2, -3). The first that overlaps no address or route of the
/// host is taken (some hosts use TEST-NET-1 themselves); .1 is the host's end, where the
/// server listens, and .2 the namespace's end, where the clients' SOCKS ports listen.
const CANDIDATE_NETS: [Ipv4Addr; 3] =
    [Ipv4Addr::new(192, 0, 2, 0), Ipv4Addr::new(198, 51, 100, 0), Ipv4Addr::new(203, 0, 113, 0)];
/// Clients, each with one stream and so one session of its own.
const CLIENTS: usize = 50;
/// Short keepalive settings: a silent peer is noticed 2 + 2 x 1 = 4 s after the last
/// packet, and data unacknowledged for 4 s ends the connection too.
const KEEPALIVE_ARGS: &[&str] = &[
    "--tcp-keepalive-secs",
    "2",
    "--tcp-keepalive-interval-secs",
    "1",
    "--tcp-keepalive-probes",
    "2",
    "--tcp-user-timeout-secs",
    "4",
];
/// The detection time above plus generous slack for a loaded machine.
const RELEASE_BOUND: Duration = Duration::from_secs(20);
/// Descriptors the server may hold above its baseline once everything is released.
const FD_SLACK: usize = 3;
/// Prefix of the namespaces this test creates (the pid and the shape follow).
const NS_PREFIX: &str = "anytls-vanished-";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_vanish_silently_are_released_within_the_keepalive_time() {
    let net = match usable_network() {
        Ok(net) => net,
        Err(why) => {
            announce(&format!("SKIP vanished: {why}"));
            return;
        }
    };
    bounded(Duration::from_secs(150), "vanished clients", async {
        let idle = run_shape(Shape::IdleSessions, net).await;
        announce(&idle.report(&format!("(a) {CLIENTS} idle sessions, link cut ({net}/30)")));
        let open = run_shape(Shape::OpenStreams, net).await;
        announce(&open.report(&format!("(b) {CLIENTS} open streams, link cut")));
    })
    .await;
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Shape {
    /// Streams ended before the cut: the server holds idle sessions only.
    IdleSessions,
    /// Streams still open at the cut, each with an outbound connection.
    OpenStreams,
}

impl Shape {
    fn tag(self) -> &'static str {
        match self {
            Shape::IdleSessions => "a",
            Shape::OpenStreams => "b",
        }
    }
}

/// What one shape measured.
struct Measured {
    /// Server sockets to the client just before the cut.
    sessions: usize,
    /// How many of them had the keepalive timer running.
    keepalive_timers: usize,
    baseline_fds: usize,
    loaded_fds: usize,
    final_fds: usize,
    /// From the cut until the server had no socket to the client left.
    sessions_gone: Duration,
    /// From the cut until sockets, outbound connections and descriptors were all back.
    all_released: Duration,
}

impl Measured {
    fn report(&self, shape: &str) -> String {
        format!(
            "NOTE vanished {shape}: all server sockets to the client gone {:.1} s after the cut, outbound \
             connections and fds back {:.1} s after (baseline {}, {} loaded, {} after); {}/{} server sockets had a \
             keepalive timer before the cut",
            self.sessions_gone.as_secs_f64(),
            self.all_released.as_secs_f64(),
            self.baseline_fds,
            self.loaded_fds,
            self.final_fds,
            self.keepalive_timers,
            self.sessions
        )
    }
}

async fn run_shape(shape: Shape, net: Ipv4Addr) -> Measured {
    // Dropped last (declared first): the namespace outlives the processes in it.
    let netns = Netns::create(shape.tag(), net).unwrap_or_else(|why| panic!("network namespace: {why}"));
    let echo = spawn_echo().await;
    let (server, listen, pin) = start_vanishing_server(netns.host_ip).await;
    let server_pid = server.pid();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let baseline = snapshot(server_pid, netns.ns_ip, echo);

    let client = start_netns_client(&netns, listen, &pin).await;
    let mut streams = Vec::with_capacity(CLIENTS);
    for i in 0..CLIENTS {
        let mut tcp = socks5_open(client.addr, echo).await;
        let data = payload(64, i as u64);
        tcp.write_all(&data).await.expect("write to the echo");
        let mut back = vec![0u8; data.len()];
        tcp.read_exact(&mut back).await.expect("read the echo");
        assert_eq!(back, data, "echo on stream {i}");
        streams.push(tcp);
    }
    // Every stream is open at the same time, so each has its own session and the server
    // one outbound connection per stream.
    let loaded = wait_until(Duration::from_secs(10), || {
        let now = snapshot(server_pid, netns.ns_ip, echo);
        (now.to_client >= CLIENTS && now.to_target >= CLIENTS).then_some(now)
    })
    .await
    .unwrap_or_else(|| {
        panic!("{CLIENTS} sessions and streams never showed: {:?}", snapshot(server_pid, netns.ns_ip, echo))
    });

    if shape == Shape::IdleSessions {
        drop(std::mem::take(&mut streams));
        client.wait_done(CLIENTS).await;
        wait_until(Duration::from_secs(10), || (snapshot(server_pid, netns.ns_ip, echo).to_target == 0).then_some(()))
            .await
            .unwrap_or_else(|| {
                panic!("the streams did not end on the server: {:?}", snapshot(server_pid, netns.ns_ip, echo))
            });
    }
    let before = snapshot(server_pid, netns.ns_ip, echo);
    assert!(before.to_client >= CLIENTS, "sessions before the cut: {before:?}");

    // The cut: the namespace's link goes down, so nothing more gets in or out, and then
    // the client dies without being able to say so.
    netns.ip(&["link", "set", &netns.ns_if, "down"]).expect("cut the link");
    let cut = Instant::now();
    let client_log = client.process.log();
    drop(client);

    let mut sessions_gone = None;
    let mut last = before.clone();
    while cut.elapsed() < RELEASE_BOUND {
        last = snapshot(server_pid, netns.ns_ip, echo);
        if last.to_client == 0 && sessions_gone.is_none() {
            sessions_gone = Some(cut.elapsed());
        }
        if last.to_client == 0 && last.to_target == 0 && last.fds <= baseline.fds + FD_SLACK {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let all_released = cut.elapsed();
    let released = last.to_client == 0 && last.to_target == 0 && last.fds <= baseline.fds + FD_SLACK;
    assert!(
        released,
        "shape {shape:?}: {RELEASE_BOUND:?} after the cut the server still holds {} sockets to the vanished \
         client, {} outbound connections and {} fds (baseline {}, {} before the cut)\n\
         ----- log of the client -----\n{client_log}----- end -----",
        last.to_client, last.to_target, last.fds, baseline.fds, before.fds
    );
    drop(streams);
    Measured {
        sessions: before.to_client,
        keepalive_timers: before.keepalive_timers,
        baseline_fds: baseline.fds,
        loaded_fds: loaded.fds,
        final_fds: last.fds,
        sessions_gone: sessions_gone.unwrap_or(all_released),
        all_released,
    }
}

/// The /30 the test can use (its network address), or why the test cannot run here.
fn usable_network() -> Result<Ipv4Addr, String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let uid = status.lines().find_map(|line| line.strip_prefix("Uid:")).and_then(|ids| ids.split_whitespace().nth(1));
    if uid != Some("0") {
        return Err("not root (network namespaces need it)".into());
    }
    remove_stale_namespaces();
    let probe = format!("{NS_PREFIX}{}-probe", std::process::id());
    ip(&["netns", "add", &probe]).map_err(|why| format!("`ip netns add` failed: {why}"))?;
    let _ = ip(&["netns", "del", &probe]);
    let taken = host_networks();
    CANDIDATE_NETS.into_iter().find(|&net| !taken.iter().any(|&(other, len)| overlaps(net, 30, other, len))).ok_or_else(
        || format!("every candidate documentation /30 ({CANDIDATE_NETS:?}) overlaps an address or route of this host"),
    )
}

/// Every IPv4 address or network that appears in the host's addresses and routes (all
/// tables), with its prefix length (32 for a bare address); the default route excluded.
fn host_networks() -> Vec<(Ipv4Addr, u32)> {
    let mut found = Vec::new();
    for args in [&["-4", "-o", "addr", "show"][..], &["-4", "route", "show", "table", "all"][..]] {
        let Ok(out) = Command::new("ip").args(args).output() else { continue };
        for token in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let (addr, len) = token.split_once('/').unwrap_or((token, "32"));
            if let (Ok(addr), Ok(len)) = (addr.parse::<Ipv4Addr>(), len.parse::<u32>())
                && (1..=32).contains(&len)
            {
                found.push((addr, len));
            }
        }
    }
    found
}

/// True when `a/a_len` and `b/b_len` share an address.
fn overlaps(a: Ipv4Addr, a_len: u32, b: Ipv4Addr, b_len: u32) -> bool {
    let mask = u32::MAX << (32 - a_len.min(b_len));
    u32::from(a) & mask == u32::from(b) & mask
}

/// Deletes the namespaces an earlier run of this test left behind when it was killed
/// (its pid no longer running); deleting one also deletes its veth pair.
fn remove_stale_namespaces() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else { return };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else { continue };
        let Some(rest) = name.strip_prefix(NS_PREFIX) else { continue };
        let pid = rest.split('-').next().unwrap_or_default();
        if !pid.is_empty() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", name]);
        }
    }
}

/// Runs `ip ARGS…`; its stderr on failure.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|err| format!("cannot run ip: {err}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// A network namespace with a veth pair to the host; deleted with the pair on drop.
struct Netns {
    name: String,
    host_if: String,
    ns_if: String,
    host_ip: Ipv4Addr,
    ns_ip: Ipv4Addr,
}

impl Netns {
    /// Makes the namespace and the pair on `net`/30: .1 on the host, .2 inside.
    fn create(tag: &str, net: Ipv4Addr) -> Result<Netns, String> {
        let pid = std::process::id();
        // Interface names stay within 15 characters: "avh" + tag + a pid of at most 7 digits.
        let netns = Netns {
            name: format!("{NS_PREFIX}{pid}-{tag}"),
            host_if: format!("avh{tag}{pid}"),
            ns_if: format!("avn{tag}{pid}"),
            host_ip: Ipv4Addr::from(u32::from(net) + 1),
            ns_ip: Ipv4Addr::from(u32::from(net) + 2),
        };
        ip(&["netns", "add", &netns.name])?;
        // From here on, a failure drops `netns`, which removes what was made.
        ip(&["link", "add", &netns.host_if, "type", "veth", "peer", "name", &netns.ns_if])?;
        ip(&["link", "set", &netns.ns_if, "netns", &netns.name])?;
        ip(&["addr", "add", &format!("{}/30", netns.host_ip), "dev", &netns.host_if])?;
        ip(&["link", "set", &netns.host_if, "up"])?;
        netns.ip(&["addr", "add", &format!("{}/30", netns.ns_ip), "dev", &netns.ns_if])?;
        netns.ip(&["link", "set", &netns.ns_if, "up"])?;
        netns.ip(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    /// `ip -n NAME ARGS…`: an `ip` command inside the namespace.
    fn ip(&self, args: &[&str]) -> Result<(), String> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Our server on `host_ip` with the short keepalive settings and no warm outbound
/// connections (so that its descriptors go back to the baseline). Returns the process,
/// its address and the fingerprint of its self-signed certificate.
async fn start_vanishing_server(host_ip: Ipv4Addr) -> (Process, SocketAddr, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_anytls-server"));
    command
        .args(["-l", &format!("{host_ip}:0"), "-p", PASSWORD, "--min-idle-connections", "0"])
        .args(KEEPALIVE_ARGS)
        .env("RUST_LOG", OUR_LOG_FILTER);
    let mut process = Process::spawn("anytls-server", command);
    let addr =
        process.wait_for(STARTUP_TIMEOUT, "`listening on` line", |line| address_after(line, "listening on ")).await;
    let pin = process
        .log()
        .lines()
        .find_map(|line| {
            let hex = line.split("SHA-256 fingerprint ").nth(1)?.trim();
            (hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit())).then(|| hex.to_string())
        })
        .expect("the self-signed server logs its fingerprint");
    (process, addr, pin)
}

/// Our client inside the namespace, its proxy port on the namespace's address, pinned to the server.
/// Idle sessions are kept for the whole test.
async fn start_netns_client(netns: &Netns, server: SocketAddr, pin: &str) -> Client {
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", &netns.name, env!("CARGO_BIN_EXE_anytls-client")])
        .args(["-l", &format!("{}:0", netns.ns_ip), "-s", &server.to_string(), "-p", PASSWORD, "--pin-sha256", pin])
        .args(["--idle-session-timeout-secs", "600", "--max-idle-sessions", "64"])
        .env("RUST_LOG", OUR_LOG_FILTER);
    let mut process = Process::spawn("anytls-client", command);
    let addr = process.wait_for(STARTUP_TIMEOUT, "`proxy on` line", |line| address_after(line, "proxy on ")).await;
    Client { process, addr }
}

/// The socket address right after `marker` in `line`.
fn address_after(line: &str, marker: &str) -> Option<SocketAddr> {
    let rest = line.split(marker).nth(1)?;
    rest[..rest.find([' ', ',']).unwrap_or(rest.len())].parse().ok()
}

/// Polls `check` every 100 ms until it gives a value or `limit` passes.
async fn wait_until<T>(limit: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What the server holds at one moment.
#[derive(Debug, Clone)]
struct Snapshot {
    /// Its TCP sockets (any state) to the namespace's address.
    to_client: usize,
    /// Those of them with the keepalive timer running (`tr` 2 in /proc/net/tcp).
    keepalive_timers: usize,
    /// Its TCP sockets to the echo target.
    to_target: usize,
    /// Its open descriptors.
    fds: usize,
}

/// Reads the server's descriptors and matches its sockets against /proc/net/tcp (the
/// host namespace's table, where the server lives) by inode.
fn snapshot(pid: u32, client_ip: Ipv4Addr, target: SocketAddr) -> Snapshot {
    let mut inodes: HashSet<u64> = HashSet::new();
    let mut fds = 0;
    if let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for entry in entries.flatten() {
            fds += 1;
            if let Ok(link) = std::fs::read_link(entry.path())
                && let Some(inode) =
                    link.to_str().and_then(|l| l.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok())
            {
                inodes.insert(inode);
            }
        }
    }
    let mut snap = Snapshot { to_client: 0, keepalive_timers: 0, to_target: 0, fds };
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 10 {
            continue;
        }
        let (Some(remote), Ok(inode)) = (parse_proc_addr(fields[2]), fields[9].parse::<u64>()) else { continue };
        if !inodes.contains(&inode) {
            continue;
        }
        if *remote.ip() == client_ip {
            snap.to_client += 1;
            if fields[5].starts_with("02:") {
                snap.keepalive_timers += 1;
            }
        } else if SocketAddr::V4(remote) == target {
            snap.to_target += 1;
        }
    }
    snap
}

/// `0202000C:1F90` (the address as the kernel's native-endian print of a big-endian
/// word, the port in hex) to an address.
fn parse_proc_addr(field: &str) -> Option<SocketAddrV4> {
    let (ip, port) = field.split_once(':')?;
    let ip = Ipv4Addr::from(u32::from_str_radix(ip, 16).ok()?.to_ne_bytes());
    Some(SocketAddrV4::new(ip, u16::from_str_radix(port, 16).ok()?))
}
