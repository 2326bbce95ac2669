//! `hold`: N long-lived streams to the echo target, each sending a small message
//! every interval and checking the echo, for T seconds. Finds streams that a
//! proxy drops, stalls or mixes up when many are open at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::{sleep_until, timeout_at};

use crate::bulk::plural;
use crate::report::{Report, Value};
use crate::route::Route;
use crate::stats::Latency;

/// Bytes per trickle message.
const MESSAGE_LEN: usize = 64;

pub struct Hold {
    pub route: Route,
    pub target: SocketAddr,
    pub streams: usize,
    pub seconds: f64,
    pub interval: Duration,
    /// Streams being opened at once (bounds the SYN burst, not the total).
    pub open_concurrency: usize,
    pub deadline: Instant,
}

#[derive(Default)]
struct StreamResult {
    open_time: Option<Duration>,
    round_trips: Vec<Duration>,
    error: Option<String>,
}

impl Hold {
    pub async fn run(self) -> Report {
        let start = Instant::now();
        // Every stream stops trickling at the same moment, so all of them are open
        // together for (T - ramp-up); never later than --max-seconds allows.
        let stop = (start + Duration::from_secs_f64(self.seconds)).min(self.deadline);
        let opening = Arc::new(Semaphore::new(self.open_concurrency.max(1)));
        let mut tasks = JoinSet::new();
        for id in 0..self.streams {
            let (route, target, interval, deadline, opening) =
                (self.route, self.target, self.interval, self.deadline, opening.clone());
            tasks.spawn(async move {
                let mut result = StreamResult::default();
                let run = hold_one(id, route, target, interval, stop, &opening, &mut result);
                // A grace second past the stop to finish the last echo and the close.
                let limit = (stop + Duration::from_secs(1)).min(deadline);
                match timeout_at(limit.into(), run).await {
                    Ok(Ok(())) => {}
                    Ok(Err(err)) => result.error = Some(err),
                    Err(_) => result.error = Some("stalled: no echo or close in time".into()),
                }
                result
            });
        }
        let mut open_times = Vec::new();
        let mut round_trips = Vec::new();
        let (mut failed, mut first_error) = (0usize, None);
        while let Some(joined) = tasks.join_next().await {
            let result = joined.unwrap_or_else(|e| StreamResult { error: Some(e.to_string()), ..Default::default() });
            open_times.extend(result.open_time);
            round_trips.extend(result.round_trips);
            if let Some(err) = result.error {
                failed += 1;
                first_error.get_or_insert(err);
            }
        }
        let elapsed = start.elapsed().as_secs_f64();
        let opened = open_times.len();
        let open = Latency::of(&mut open_times);
        let echo = Latency::of(&mut round_trips);
        let mut human = format!(
            "hold {} ({} stream{}, {:.1} s): {opened} opened, {failed} failed, {} echoes; \
             open ms p50 {:.2} p99 {:.2} max {:.2}; echo ms p50 {:.2} p99 {:.2} max {:.2}",
            self.route,
            self.streams,
            plural(self.streams),
            elapsed,
            round_trips.len(),
            open.p50,
            open.p99,
            open.max,
            echo.p50,
            echo.p99,
            echo.max
        );
        if let Some(err) = &first_error {
            human += &format!(" (first error: {err})");
        }
        let ms = |l: Latency| {
            Value::Obj(vec![
                ("p50", Value::Num(l.p50)),
                ("p90", Value::Num(l.p90)),
                ("p99", Value::Num(l.p99)),
                ("max", Value::Num(l.max)),
            ])
        };
        let mut json = vec![
            ("mode", Value::Str("hold".into())),
            ("route", Value::Str(self.route.to_string())),
            ("streams", Value::Int(self.streams as u64)),
            ("seconds", Value::Num(elapsed)),
            ("opened", Value::Int(opened as u64)),
            ("failed", Value::Int(failed as u64)),
            ("echoes", Value::Int(round_trips.len() as u64)),
            ("open_ms", ms(open)),
            ("echo_ms", ms(echo)),
        ];
        if let Some(err) = first_error {
            json.push(("first_error", Value::Str(err)));
        }
        Report { human, json: Value::Obj(json), ok: failed == 0 }
    }
}

/// One stream's life: open, trickle until `stop`, half-close, expect the echo's EOF.
async fn hold_one(
    id: usize,
    route: Route,
    target: SocketAddr,
    interval: Duration,
    stop: Instant,
    opening: &Semaphore,
    result: &mut StreamResult,
) -> Result<(), String> {
    let permit = opening.acquire().await.map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let mut tcp = route.connect(target).await.map_err(|e| format!("connect: {e}"))?;
    result.open_time = Some(t0.elapsed());
    drop(permit);

    // Spread the streams' messages over the interval instead of sending in bursts.
    let phase = interval.mul_f64((id % 97) as f64 / 97.0);
    let mut next = Instant::now() + phase;
    let mut seq = 0u64;
    let mut echo = [0u8; MESSAGE_LEN];
    while next < stop {
        sleep_until(next.into()).await;
        let message = message(id, seq);
        let t = Instant::now();
        tcp.write_all(&message).await.map_err(|e| format!("write message {seq}: {e}"))?;
        tcp.read_exact(&mut echo).await.map_err(|e| format!("echo of message {seq}: {e}"))?;
        if echo != message {
            return Err(format!("stream {id}: echo of message {seq} does not match"));
        }
        result.round_trips.push(t.elapsed());
        seq += 1;
        next += interval;
    }
    tcp.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
    let mut rest = [0u8; 1];
    match tcp.read(&mut rest).await {
        Ok(0) => Ok(()),
        Ok(_) => Err("unexpected bytes after the last echo".into()),
        Err(e) => Err(format!("close: {e}")),
    }
}

/// A message that names its stream and sequence number, so crossed streams show.
pub fn message(id: usize, seq: u64) -> [u8; MESSAGE_LEN] {
    let mut m = [b'.'; MESSAGE_LEN];
    let text = format!("stream {id} message {seq}");
    let n = text.len().min(MESSAGE_LEN);
    m[..n].copy_from_slice(&text.as_bytes()[..n]);
    m
}
