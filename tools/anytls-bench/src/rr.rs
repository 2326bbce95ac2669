//! `rr`: request/response with a new stream per request (`GET /bytes/S`, keep-alive
//! off), C at a time. Measures what a browser-like client feels: the cost of
//! opening a stream through the proxy plus one small transfer.
//!
//! With `distinct_targets` the requests are spread over many loopback addresses; with
//! `target_names` as well, each destination is sent as the name `t<index>.<suffix>`
//! instead, which the proxy's server resolves (a hosts file from [`hosts_lines`] maps
//! each name to the address the same index has without names).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;
use tokio::time::timeout_at;

use crate::report::{Report, Value};
use crate::route::{Destination, Route};
use crate::stats::{Latency, per_sec};

pub struct Rr {
    pub route: Route,
    pub target: SocketAddr,
    pub requests: u64,
    pub concurrency: usize,
    pub size: u64,
    /// Spread the requests over this many distinct target addresses (0: just `target`).
    pub distinct_targets: u32,
    /// Where in the `distinct_targets` addresses the first request goes (so that
    /// successive runs can walk through all of them).
    pub target_offset: u64,
    /// Consecutive requests to each destination before the next one (at least 1), so
    /// that repeats of one destination are in flight together.
    pub repeat: u64,
    /// With `distinct_targets`: send destination `i` as the name `t<i>.<suffix>`.
    pub target_names: Option<String>,
    pub deadline: Instant,
}

/// What one worker saw.
#[derive(Default)]
struct WorkerResult {
    latencies: Vec<Duration>,
    failed: u64,
    first_error: Option<String>,
}

impl Rr {
    pub async fn run(self) -> Report {
        let next = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let mut workers = JoinSet::new();
        for _ in 0..self.concurrency.max(1) {
            let (route, target, size, requests, deadline) =
                (self.route, self.target, self.size, self.requests, self.deadline);
            let (distinct, offset, repeat) = (self.distinct_targets, self.target_offset, self.repeat);
            let names = self.target_names.clone();
            let next = next.clone();
            workers.spawn(async move {
                let mut result = WorkerResult::default();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= requests || Instant::now() >= deadline {
                        break;
                    }
                    let target = match (distinct, &names) {
                        (0, _) => Destination::Addr(target),
                        (n, None) => {
                            Destination::Addr(loopback_target(target_index(i, offset, repeat, n), n, target.port()))
                        }
                        (n, Some(suffix)) => {
                            Destination::Name(target_name(target_index(i, offset, repeat, n), suffix), target.port())
                        }
                    };
                    let t0 = Instant::now();
                    let outcome = timeout_at(deadline.into(), one_request(route, &target, size)).await;
                    match outcome.unwrap_or_else(|_| Err("stopped at --max-seconds".into())) {
                        Ok(()) => result.latencies.push(t0.elapsed()),
                        Err(err) => {
                            result.failed += 1;
                            result.first_error.get_or_insert(err);
                        }
                    }
                }
                result
            });
        }
        let mut latencies = Vec::with_capacity(self.requests as usize);
        let (mut failed, mut first_error) = (0, None);
        while let Some(worker) = workers.join_next().await {
            let worker = worker.unwrap_or_else(|join| WorkerResult {
                failed: 1,
                first_error: Some(join.to_string()),
                ..WorkerResult::default()
            });
            latencies.extend(worker.latencies);
            failed += worker.failed;
            if first_error.is_none() {
                first_error = worker.first_error;
            }
        }
        let elapsed = start.elapsed();
        let done = latencies.len() as u64;
        let missing = self.requests.saturating_sub(done + failed);
        let latency = Latency::of(&mut latencies);
        let rate = per_sec(done, elapsed);

        let spread = match (self.distinct_targets, &self.target_names) {
            (0, _) => String::new(),
            (n, None) => format!(", {n} distinct targets"),
            (n, Some(suffix)) => format!(", {n} distinct names t<i>.{suffix}"),
        };
        let spread = match self.repeat {
            0 | 1 => spread,
            r => format!("{spread}, {r} in a row each"),
        };
        let mut human = format!(
            "rr {} (concurrency {}, {} B each{spread}): {done}/{} ok, {failed} failed in {:.2} s = {rate:.0} streams/s; \
             latency ms p50 {:.2} p90 {:.2} p99 {:.2} max {:.2}",
            self.route,
            self.concurrency,
            self.size,
            self.requests,
            elapsed.as_secs_f64(),
            latency.p50,
            latency.p90,
            latency.p99,
            latency.max
        );
        if missing > 0 {
            human += &format!(" ({missing} not sent: stopped at --max-seconds)");
        }
        if let Some(err) = &first_error {
            human += &format!(" (first error: {err})");
        }
        let mut json = vec![
            ("mode", Value::Str("rr".into())),
            ("route", Value::Str(self.route.to_string())),
            ("requests", Value::Int(self.requests)),
            ("concurrency", Value::Int(self.concurrency as u64)),
            ("size", Value::Int(self.size)),
            ("distinct_targets", Value::Int(u64::from(self.distinct_targets))),
            ("repeat", Value::Int(self.repeat.max(1))),
            ("ok", Value::Int(done)),
            ("failed", Value::Int(failed)),
            ("not_sent", Value::Int(missing)),
            ("seconds", Value::Num(elapsed.as_secs_f64())),
            ("streams_per_sec", Value::Num(rate)),
            ("gbit_per_sec", Value::Num(crate::stats::gbit_per_sec(done * self.size, elapsed))),
            (
                "latency_ms",
                Value::Obj(vec![
                    ("p50", Value::Num(latency.p50)),
                    ("p90", Value::Num(latency.p90)),
                    ("p99", Value::Num(latency.p99)),
                    ("max", Value::Num(latency.max)),
                ]),
            ),
        ];
        if let Some(suffix) = &self.target_names {
            json.push(("target_names", Value::Str(suffix.clone())));
        }
        if let Some(err) = first_error {
            json.push(("first_error", Value::Str(err)));
        }
        Report { human, json: Value::Obj(json), ok: failed == 0 && missing == 0 }
    }
}

/// Request `i`'s target among `distinct` loopback addresses: 127.0.0.1, 127.0.0.2, …
/// (all of 127.0.0.0/8 is this host, so a target listening on 0.0.0.0:`port` answers
/// at each; the proxy sees `distinct` different destinations).
pub fn loopback_target(i: u64, distinct: u32, port: u16) -> SocketAddr {
    // 127.0.0.1 ..= 127.255.255.254: skips the network and broadcast addresses.
    const HOSTS: u64 = (1 << 24) - 2;
    let host = (i % u64::from(distinct)) % HOSTS + 1;
    let ip = std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(127, 0, 0, 0)) + host as u32);
    SocketAddr::from((ip, port))
}

/// Which of `distinct` destinations request `i` goes to: `repeat` requests in a row to
/// each, starting at destination `offset`, round and round.
pub fn target_index(i: u64, offset: u64, repeat: u64, distinct: u32) -> u64 {
    offset.wrapping_add(i / repeat.max(1)) % u64::from(distinct.max(1))
}

/// Destination `index`'s name: `t<index>.<suffix>`.
pub fn target_name(index: u64, suffix: &str) -> String {
    format!("t{index}.{suffix}")
}

/// A hosts file's lines for the first `distinct` names: `127.x.y.z t<index>.<suffix>`,
/// each name at the address its index has without names ([`loopback_target`]).
pub fn hosts_lines(distinct: u32, suffix: &str) -> impl Iterator<Item = String> + '_ {
    (0..u64::from(distinct))
        .map(move |index| format!("{} {}", loopback_target(index, distinct, 0).ip(), target_name(index, suffix)))
}

/// Checks a name suffix for `t<index>.<suffix>`: dot-separated labels of letters, digits
/// and inner hyphens, 1-63 bytes each, short enough that every name fits SOCKS5's 255
/// bytes ("t" + 10 digits + "." leave 243).
pub fn parse_name_suffix(s: &str) -> Result<String, String> {
    let label_ok = |label: &str| {
        (1..=63).contains(&label.len())
            && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    if s.is_empty() || s.len() > 243 || !s.split('.').all(label_ok) {
        return Err(format!(
            "not a name suffix: {s:?} (dot-separated labels of letters, digits and inner hyphens, e.g. bench.test)"
        ));
    }
    Ok(s.to_ascii_lowercase())
}

/// One stream: connect, `GET /bytes/size`, read to EOF, check the body length.
async fn one_request(route: Route, target: &Destination, size: u64) -> Result<(), String> {
    let mut tcp = route.connect_to(target).await.map_err(|e| format!("connect: {e}"))?;
    let request = format!("GET /bytes/{size} HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.map_err(|e| format!("request: {e}"))?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut head = Vec::new();
    let mut body = 0u64;
    let mut in_body = false;
    loop {
        let n = tcp.read(&mut buf).await.map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            break;
        }
        if in_body {
            body += n as u64;
            continue;
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            if !head.starts_with(b"HTTP/1.1 200") {
                let line = String::from_utf8_lossy(head.split(|&b| b == b'\r').next().unwrap_or_default());
                return Err(format!("target answered {line:?}"));
            }
            body = (head.len() - end - 4) as u64;
            in_body = true;
        }
    }
    match (in_body, body == size) {
        (true, true) => Ok(()),
        (true, false) => Err(format!("body of {body} bytes, expected {size}")),
        (false, _) => Err(format!("connection closed after {} bytes, before the response head ended", head.len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_targets_cycle_through_loopback_addresses() {
        let at = |i| loopback_target(i, 70_000, 8080).to_string();
        assert_eq!(at(0), "127.0.0.1:8080");
        assert_eq!(at(1), "127.0.0.2:8080");
        assert_eq!(at(255), "127.0.1.0:8080");
        assert_eq!(at(69_999), "127.1.17.112:8080");
        assert_eq!(at(70_000), "127.0.0.1:8080");
        let all: std::collections::HashSet<_> = (0..70_000).map(|i| loopback_target(i, 70_000, 1)).collect();
        assert_eq!(all.len(), 70_000);
        assert_eq!(loopback_target((1 << 24) - 3, u32::MAX, 1).to_string(), "127.255.255.254:1");
    }

    #[test]
    fn repeats_come_in_a_row_and_wrap_with_the_offset() {
        let order = |offset, repeat, n| (0..7).map(|i| target_index(i, offset, repeat, n)).collect::<Vec<_>>();
        assert_eq!(order(0, 1, 3), [0, 1, 2, 0, 1, 2, 0]);
        assert_eq!(order(0, 2, 3), [0, 0, 1, 1, 2, 2, 0]);
        assert_eq!(order(2, 3, 3), [2, 2, 2, 0, 0, 0, 1]);
        assert_eq!(order(5, 0, 4), order(5, 1, 4), "repeat 0 counts as 1");
    }

    #[test]
    fn every_name_maps_to_the_address_of_its_index() {
        let lines: Vec<String> = hosts_lines(70_000, "bench.test").collect();
        assert_eq!(lines.len(), 70_000);
        assert_eq!(lines[0], "127.0.0.1 t0.bench.test");
        assert_eq!(lines[255], "127.0.1.0 t255.bench.test");
        for i in [0u64, 1, 254, 255, 69_999, 70_000, 123_457] {
            // The request's name and the address the same request gets without names.
            let index = target_index(i, 0, 1, 70_000);
            let (ip, name) = lines[index as usize].split_once(' ').unwrap();
            assert_eq!(name, target_name(index, "bench.test"));
            assert_eq!(ip, loopback_target(i, 70_000, 80).ip().to_string(), "request {i}");
        }
        let names: std::collections::HashSet<_> = lines.iter().map(|l| l.split_once(' ').unwrap().1).collect();
        assert_eq!(names.len(), 70_000);
    }

    #[test]
    fn name_suffixes_are_checked() {
        assert_eq!(parse_name_suffix("bench.test"), Ok("bench.test".into()));
        assert_eq!(parse_name_suffix("A-1.Example"), Ok("a-1.example".into()));
        assert_eq!(parse_name_suffix(&"a".repeat(63)), Ok("a".repeat(63)));
        let longest = ["a".repeat(63), "b".repeat(63), "c".repeat(63), "d".repeat(51)].join(".");
        assert_eq!(longest.len(), 243);
        assert!(parse_name_suffix(&longest).is_ok());
        assert!(target_name(u64::from(u32::MAX), &longest).len() <= 255, "the longest name fits SOCKS5");
        for bad in ["", ".", "bench.", ".test", "a..b", "-a.test", "a-.test", "a_b.test", "a b", &"a".repeat(64)] {
            assert!(parse_name_suffix(bad).is_err(), "{bad:?}");
        }
        assert!(parse_name_suffix(&format!("{longest}a")).is_err());
    }
}
