//! `bulk`: throughput over K parallel streams, download then upload.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;
use tokio::time::timeout_at;

use crate::report::{Report, Value};
use crate::route::Route;
use crate::stats::gbit_per_sec;
use crate::target::{self, MODE_DOWNLOAD, MODE_UPLOAD};

/// Which directions a bulk run measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Direction {
    Down,
    Up,
    Both,
}

pub struct Bulk {
    pub route: Route,
    pub target: SocketAddr,
    pub bytes: u64,
    pub streams: usize,
    pub direction: Direction,
    pub deadline: Instant,
}

/// One direction's outcome.
struct Phase {
    bytes: u64,
    seconds: f64,
    failed: usize,
    first_error: Option<String>,
}

impl Phase {
    fn gbit(&self) -> f64 {
        gbit_per_sec(self.bytes, std::time::Duration::from_secs_f64(self.seconds))
    }

    fn json(&self) -> Value {
        Value::Obj(vec![
            ("bytes", Value::Int(self.bytes)),
            ("seconds", Value::Num(self.seconds)),
            ("gbit_per_sec", Value::Num(self.gbit())),
            ("failed", Value::Int(self.failed as u64)),
        ])
    }
}

impl Bulk {
    pub async fn run(self) -> Report {
        let down = matches!(self.direction, Direction::Down | Direction::Both);
        let up = matches!(self.direction, Direction::Up | Direction::Both);
        let download = if down { Some(self.phase(MODE_DOWNLOAD).await) } else { None };
        let upload = if up { Some(self.phase(MODE_UPLOAD).await) } else { None };
        let timed_out = Instant::now() >= self.deadline;
        let phases = [("download", &download), ("upload", &upload)];
        let failed: usize = phases.iter().filter_map(|(_, p)| p.as_ref()).map(|p| p.failed).sum();
        let first_error = phases.iter().filter_map(|(_, p)| p.as_ref()?.first_error.clone()).next();

        let mut human = format!("bulk {} ({} stream{}):", self.route, self.streams, plural(self.streams));
        let mut json = vec![
            ("mode", Value::Str("bulk".into())),
            ("route", Value::Str(self.route.to_string())),
            ("streams", Value::Int(self.streams as u64)),
            ("bytes", Value::Int(self.bytes)),
        ];
        for (name, phase) in phases {
            if let Some(p) = phase {
                human += &format!(" {name} {:.1} MiB in {:.2} s = {:.2} Gbit/s;", mib(p.bytes), p.seconds, p.gbit());
                json.push((name, p.json()));
            }
        }
        human += &format!(" {failed} failed");
        if timed_out {
            human += " (stopped at --max-seconds)";
        }
        if let Some(err) = &first_error {
            human += &format!(" (first error: {err})");
        }
        json.push(("failed", Value::Int(failed as u64)));
        json.push(("timed_out", Value::Bool(timed_out)));
        if let Some(err) = first_error {
            json.push(("first_error", Value::Str(err)));
        }
        Report { human, json: Value::Obj(json), ok: failed == 0 && !timed_out }
    }

    /// All streams move their share in one direction at once; the phase lasts
    /// from the first connect to the last byte.
    async fn phase(&self, mode: u8) -> Phase {
        let moved = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let mut tasks = JoinSet::new();
        for share in split_evenly(self.bytes, self.streams) {
            let (route, target, moved) = (self.route, self.target, moved.clone());
            let transfer = async move {
                if mode == MODE_DOWNLOAD {
                    download(route, target, share, &moved).await
                } else {
                    upload(route, target, share, &moved).await
                }
            };
            let deadline = self.deadline.into();
            tasks.spawn(async move {
                timeout_at(deadline, transfer).await.unwrap_or_else(|_| Err("stopped at --max-seconds".into()))
            });
        }
        let mut failed = 0;
        let mut first_error = None;
        while let Some(result) = tasks.join_next().await {
            if let Err(err) = result.unwrap_or_else(|join| Err(join.to_string())) {
                failed += 1;
                first_error.get_or_insert(err);
            }
        }
        Phase { bytes: moved.load(Ordering::Relaxed), seconds: start.elapsed().as_secs_f64(), failed, first_error }
    }
}

async fn download(route: Route, target: SocketAddr, share: u64, moved: &AtomicU64) -> Result<(), String> {
    let mut tcp = route.connect(target).await.map_err(|e| format!("connect: {e}"))?;
    let request = bulk_request(MODE_DOWNLOAD, share);
    tcp.write_all(&request).await.map_err(|e| format!("request: {e}"))?;
    let mut buf = vec![0u8; target::CHUNK];
    let mut got = 0u64;
    loop {
        let n = tcp.read(&mut buf).await.map_err(|e| format!("read after {got} bytes: {e}"))?;
        if n == 0 {
            break;
        }
        got += n as u64;
        moved.fetch_add(n as u64, Ordering::Relaxed);
    }
    if got == share { Ok(()) } else { Err(format!("download ended after {got} of {share} bytes")) }
}

async fn upload(route: Route, target: SocketAddr, share: u64, moved: &AtomicU64) -> Result<(), String> {
    let mut tcp = route.connect(target).await.map_err(|e| format!("connect: {e}"))?;
    tcp.write_all(&bulk_request(MODE_UPLOAD, share)).await.map_err(|e| format!("request: {e}"))?;
    target::write_zeros(&mut tcp, share).await.map_err(|e| format!("upload write: {e}"))?;
    let mut reply = [0u8; 8];
    tcp.read_exact(&mut reply).await.map_err(|e| format!("upload reply: {e}"))?;
    let received = u64::from_be_bytes(reply);
    moved.fetch_add(received, Ordering::Relaxed);
    if received == share { Ok(()) } else { Err(format!("target received {received} of {share} uploaded bytes")) }
}

fn bulk_request(mode: u8, n: u64) -> [u8; 9] {
    let mut request = [mode, 0, 0, 0, 0, 0, 0, 0, 0];
    request[1..].copy_from_slice(&n.to_be_bytes());
    request
}

/// `total` split into `parts` shares that differ by at most one.
pub fn split_evenly(total: u64, parts: usize) -> Vec<u64> {
    let parts = parts.max(1) as u64;
    (0..parts).map(|i| total / parts + u64::from(i < total % parts)).collect()
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

pub fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up() {
        assert_eq!(split_evenly(10, 3), vec![4, 3, 3]);
        assert_eq!(split_evenly(9, 3), vec![3, 3, 3]);
        assert_eq!(split_evenly(2, 4), vec![1, 1, 0, 0]);
        assert_eq!(split_evenly(5, 0), vec![5]);
    }
}
