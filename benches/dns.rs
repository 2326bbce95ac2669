//! Name lookups through the server's name cache: the system resolver (getaddrinfo) against
//! `--dns-server` (hickory) over UDP, TCP, TLS and HTTPS, all asking the same DNS server.
//! Run by scripts/bench-dns.sh, which starts unbound in a network and mount namespace of
//! its own and points /etc/resolv.conf there, so getaddrinfo asks it too. Two workloads,
//! variants interleaved, medians of the rounds: a burst of distinct new names at once
//! (wall and CPU seconds, peak threads), and names one after another (µs per lookup).
//! Without `--bench` (under `cargo test`) it only says how to run it.

use std::time::{Duration, Instant};

use anytls_rs::server::dial::{Dialer, DnsStrategy, LookupOwner, NameCache};
use anytls_rs::server::dns::{Resolver, ServerSpec};

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const ROUNDS: usize = 5;
const BURST: usize = 2000;
const SEQUENTIAL: usize = 500;

fn cpu_seconds() -> f64 {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct it is given.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

fn threads() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("Threads:")).and_then(|n| n.trim().parse().ok()).unwrap_or(0)
}

fn cache(resolver: &Resolver) -> NameCache {
    let dialer = Dialer {
        connect_timeout: Duration::from_secs(5),
        keepalive: Default::default(),
        strategy: DnsStrategy::System,
        resolver: resolver.clone(),
    };
    NameCache::for_dialer(&dialer)
}

struct Round {
    wall: f64,
    cpu: f64,
    threads: usize,
    sequential_us: f64,
}

async fn round(resolver: &Resolver, tag: &str) -> Round {
    let names = std::sync::Arc::new(cache(resolver));
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                peak.fetch_max(threads(), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    let (started, cpu) = (Instant::now(), cpu_seconds());
    let burst: Vec<_> = (0..BURST)
        .map(|i| {
            let names = names.clone();
            let name = format!("b{i}.{tag}.bench");
            // Each name another user's: only the server's bound on lookups in all applies.
            let owner = LookupOwner::session_of(&LookupOwner::user_bound());
            tokio::spawn(async move { names.resolve(&name, 80, &owner).await })
        })
        .collect();
    for lookup in burst {
        lookup.await.expect("joined").expect("every burst name resolves");
    }
    let (wall, cpu) = (started.elapsed().as_secs_f64(), cpu_seconds() - cpu);
    sampler.abort();
    let started = Instant::now();
    for i in 0..SEQUENTIAL {
        names.resolve(&format!("s{i}.{tag}.bench"), 80, names.own()).await.expect("resolves");
    }
    let sequential_us = started.elapsed().as_secs_f64() * 1e6 / SEQUENTIAL as f64;
    Round { wall, cpu, threads: peak.load(std::sync::atomic::Ordering::Relaxed), sequential_us }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[tokio::main(worker_threads = 2)]
async fn main() {
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("dns bench: run scripts/bench-dns.sh (it needs unbound and a namespace of its own)");
        return;
    }
    let server = |var: &str| std::env::var(var).unwrap_or_else(|_| panic!("{var} is set by scripts/bench-dns.sh"));
    let ca_file = server("DNS_BENCH_CA");
    let ca: Vec<_> = {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::pem_file_iter(&ca_file).unwrap().map(Result::unwrap).collect()
    };
    let mut variants = vec![("getaddrinfo".to_string(), Resolver::System)];
    for (label, var) in
        [("udp", "DNS_BENCH_UDP"), ("tcp", "DNS_BENCH_TCP"), ("tls", "DNS_BENCH_TLS"), ("https", "DNS_BENCH_HTTPS")]
    {
        let spec = ServerSpec::parse(&server(var)).unwrap();
        let resolver = Resolver::servers(&[spec], &ca, DnsStrategy::System).await.unwrap();
        variants.push((format!("hickory {label}"), resolver));
    }
    let mut results: Vec<Vec<Round>> = variants.iter().map(|_| Vec::new()).collect();
    for r in 0..ROUNDS {
        for (v, (_, resolver)) in variants.iter().enumerate() {
            results[v].push(round(resolver, &format!("r{r}v{v}")).await);
        }
    }
    println!(
        "| variant | burst of {BURST} new names: wall s | CPU s | CPU µs per name | peak threads | one after another: µs per lookup |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for ((label, _), rounds) in variants.iter().zip(&results) {
        let cpu = median(rounds.iter().map(|r| r.cpu).collect());
        println!(
            "| {label} | {:.3} | {cpu:.3} | {:.0} | {} | {:.0} |",
            median(rounds.iter().map(|r| r.wall).collect()),
            cpu * 1e6 / BURST as f64,
            rounds.iter().map(|r| r.threads).max().unwrap_or(0),
            median(rounds.iter().map(|r| r.sequential_us).collect()),
        );
    }
    println!("({ROUNDS} rounds, variants interleaved; medians, peak threads the highest of the rounds)");
}
