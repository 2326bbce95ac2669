//! `quiet`: a wave of N streams held open at once, silent for longer than a heartbeat
//! interval, then asked to echo again. The shape of SSH sessions, long polls and held
//! WebSockets: a proxy that refuses streams when many are open, or drops the ones that
//! carry nothing for a while, fails this.
//!
//! Each stream opens and echoes one message (a stream that cannot is *refused*), waits
//! until every stream of the wave has opened (so all N are held together), stays silent
//! for `--quiet-secs`, echoes one more message (one that cannot is *dropped*) and closes.
//! When all are open, `held N streams` goes to stderr: the moment for a script to read
//! the proxy's memory and file descriptors.
//!
//! Optionally `--stall-streams K` of them go to `--stall-target`, a target expected to
//! stop answering during the wave. Their outcome is reported apart (`stalled`) and does
//! not fail the run; each of their echoes gives up after `--echo-timeout-secs`, so the
//! wave still ends in bounded time and the proxy must free what those streams held.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{sleep_until, timeout};

use crate::hold::message;
use crate::report::{Report, Value};
use crate::route::Route;
use crate::stats::Latency;

pub struct Quiet {
    pub route: Route,
    pub target: SocketAddr,
    pub streams: usize,
    pub quiet: Duration,
    pub open_concurrency: usize,
    /// Where the `stall_streams` extra streams go (the target that stops answering).
    pub stall_target: Option<SocketAddr>,
    pub stall_streams: usize,
    /// How long one echo may take before the stream counts as failed.
    pub echo_timeout: Duration,
    pub deadline: Instant,
}

/// What happened to one stream.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    /// Opened, survived the quiet period, echoed and closed cleanly.
    Survived,
    /// Could not open or its first echo failed.
    Refused(String),
    /// Opened but failed after the quiet period.
    Dropped(String),
}

/// Counts the streams that finished opening (or failed to), and wakes the waiters
/// when the whole wave has: the quiet period starts together for everyone.
struct Gate {
    pending: AtomicUsize,
    open: Notify,
}

impl Gate {
    fn new(streams: usize) -> Gate {
        Gate { pending: AtomicUsize::new(streams), open: Notify::new() }
    }

    /// Marks one stream as settled; true for the last one.
    fn settle(&self) -> bool {
        let last = self.pending.fetch_sub(1, Ordering::AcqRel) == 1;
        if last {
            self.open.notify_waiters();
        }
        last
    }

    async fn wait(&self) {
        let notified = self.open.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.pending.load(Ordering::Acquire) == 0 {
            return;
        }
        notified.await;
    }
}

impl Quiet {
    pub async fn run(self) -> Report {
        let start = Instant::now();
        let total = self.streams + self.stall_streams;
        let gate = Arc::new(Gate::new(total));
        let opening = Arc::new(Semaphore::new(self.open_concurrency.max(1)));
        let held_at = Arc::new(std::sync::Mutex::new(None::<Instant>));
        let mut tasks = JoinSet::new();
        for id in 0..total {
            let stalling = id >= self.streams;
            let target = match (stalling, self.stall_target) {
                (true, Some(stall)) => stall,
                _ => self.target,
            };
            let (route, quiet, echo_timeout) = (self.route, self.quiet, self.echo_timeout);
            let (gate, opening, held_at) = (gate.clone(), opening.clone(), held_at.clone());
            let (streams, deadline) = (total, self.deadline);
            tasks.spawn(async move {
                let mut open_time = None;
                let life =
                    hold_quietly(id, route, target, quiet, echo_timeout, &gate, &opening, &mut open_time, || {
                        *held_at.lock().expect("held_at lock") = Some(Instant::now());
                        eprintln!("held {streams} streams");
                    });
                let outcome = tokio::time::timeout_at(deadline.into(), life)
                    .await
                    .unwrap_or_else(|_| Outcome::Dropped("stopped at --max-seconds".into()));
                (stalling, open_time, outcome)
            });
        }

        let mut open_times = Vec::with_capacity(total);
        let (mut survived, mut refused, mut dropped, mut stalled_ok, mut stalled_failed) = (0, 0, 0, 0, 0);
        let (mut first_refusal, mut first_drop) = (None, None);
        while let Some(joined) = tasks.join_next().await {
            let (stalling, open_time, outcome) =
                joined.unwrap_or_else(|e| (false, None, Outcome::Dropped(format!("task: {e}"))));
            open_times.extend(open_time);
            match (stalling, outcome) {
                (true, Outcome::Survived) => stalled_ok += 1,
                (true, _) => stalled_failed += 1,
                (false, Outcome::Survived) => survived += 1,
                (false, Outcome::Refused(why)) => {
                    refused += 1;
                    first_refusal.get_or_insert(why);
                }
                (false, Outcome::Dropped(why)) => {
                    dropped += 1;
                    first_drop.get_or_insert(why);
                }
            }
        }
        let elapsed = start.elapsed().as_secs_f64();
        let open = Latency::of(&mut open_times);
        let held_after = held_at.lock().expect("held_at lock").map(|t| t.duration_since(start).as_secs_f64());
        let mut human = format!(
            "quiet {} ({} streams, {:.1} s quiet): {survived} survived, {refused} refused, {dropped} dropped \
             in {elapsed:.1} s; open ms p50 {:.2} p99 {:.2} max {:.2}",
            self.route,
            self.streams,
            self.quiet.as_secs_f64(),
            open.p50,
            open.p99,
            open.max
        );
        if self.stall_streams > 0 {
            human += &format!("; to the stalling target: {stalled_ok} answered, {stalled_failed} gave up");
        }
        if let Some(why) = &first_refusal {
            human += &format!(" (first refusal: {why})");
        }
        if let Some(why) = &first_drop {
            human += &format!(" (first drop: {why})");
        }
        let mut json = vec![
            ("mode", Value::Str("quiet".into())),
            ("route", Value::Str(self.route.to_string())),
            ("streams", Value::Int(self.streams as u64)),
            ("quiet_seconds", Value::Num(self.quiet.as_secs_f64())),
            ("seconds", Value::Num(elapsed)),
            ("survived", Value::Int(survived)),
            ("refused", Value::Int(refused)),
            ("dropped", Value::Int(dropped)),
            ("stall_streams", Value::Int(self.stall_streams as u64)),
            ("stalled_answered", Value::Int(stalled_ok)),
            ("stalled_gave_up", Value::Int(stalled_failed)),
            ("held_after_seconds", held_after.map_or(Value::Num(f64::NAN), Value::Num)),
            (
                "open_ms",
                Value::Obj(vec![
                    ("p50", Value::Num(open.p50)),
                    ("p99", Value::Num(open.p99)),
                    ("max", Value::Num(open.max)),
                ]),
            ),
        ];
        if let Some(why) = first_refusal {
            json.push(("first_refusal", Value::Str(why)));
        }
        if let Some(why) = first_drop {
            json.push(("first_drop", Value::Str(why)));
        }
        let ok = refused == 0 && dropped == 0 && survived == self.streams as u64;
        Report { human, json: Value::Obj(json), ok }
    }
}

/// One stream's life; `on_held` runs once, in the stream that completes the wave.
#[allow(clippy::too_many_arguments)]
async fn hold_quietly(
    id: usize,
    route: Route,
    target: SocketAddr,
    quiet: Duration,
    echo_timeout: Duration,
    gate: &Gate,
    opening: &Semaphore,
    open_time: &mut Option<Duration>,
    on_held: impl FnOnce(),
) -> Outcome {
    let opened = async {
        let _permit = opening.acquire().await.map_err(|e| e.to_string())?;
        let t0 = Instant::now();
        let mut tcp = timeout(echo_timeout, route.connect(target))
            .await
            .map_err(|_| "connect: timed out".to_string())?
            .map_err(|e| format!("connect: {e}"))?;
        echo(&mut tcp, id, 0, echo_timeout).await?;
        *open_time = Some(t0.elapsed());
        Ok::<_, String>(tcp)
    }
    .await;
    // Settle before waiting, failed or not, so that a refusal never holds the wave up.
    if gate.settle() {
        on_held();
    }
    let mut tcp = match opened {
        Ok(tcp) => tcp,
        Err(why) => return Outcome::Refused(why),
    };
    gate.wait().await;
    sleep_until((Instant::now() + quiet).into()).await;
    if let Err(why) = echo(&mut tcp, id, 1, echo_timeout).await {
        return Outcome::Dropped(format!("after {:.1} s quiet: {why}", quiet.as_secs_f64()));
    }
    match close(&mut tcp, echo_timeout).await {
        Ok(()) => Outcome::Survived,
        Err(why) => Outcome::Dropped(why),
    }
}

/// Sends message `seq` and expects it back, within `limit`.
async fn echo(tcp: &mut TcpStream, id: usize, seq: u64, limit: Duration) -> Result<(), String> {
    let message = message(id, seq);
    let mut back = [0u8; 64];
    let round = async {
        tcp.write_all(&message).await.map_err(|e| format!("write: {e}"))?;
        match tcp.read_exact(&mut back[..message.len()]).await {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err("closed by the proxy".to_string()),
            Err(e) => Err(format!("read: {e}")),
        }
    };
    timeout(limit, round).await.map_err(|_| format!("no echo within {} s", limit.as_secs_f64()))??;
    if back[..message.len()] != message[..] {
        return Err(format!("stream {id}: echo {seq} does not match"));
    }
    Ok(())
}

/// Half-closes and expects the echo target's EOF.
async fn close(tcp: &mut TcpStream, limit: Duration) -> Result<(), String> {
    let ending = async {
        tcp.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
        let mut rest = [0u8; 1];
        match tcp.read(&mut rest).await {
            Ok(0) => Ok(()),
            Ok(_) => Err("unexpected bytes after the last echo".to_string()),
            Err(e) => Err(format!("close: {e}")),
        }
    };
    timeout(limit, ending).await.map_err(|_| "no EOF after the close".to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_gate_opens_when_every_stream_settled() {
        let gate = Arc::new(Gate::new(3));
        let waiter = tokio::spawn({
            let gate = gate.clone();
            async move { gate.wait().await }
        });
        assert!(!gate.settle());
        assert!(!gate.settle());
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        assert!(gate.settle());
        tokio::time::timeout(Duration::from_secs(1), waiter).await.expect("gate opened").unwrap();
        // Late waiters pass at once.
        tokio::time::timeout(Duration::from_secs(1), gate.wait()).await.expect("open gate");
    }

    /// A direct wave against an in-process echo target survives; one against a target
    /// that accepts but never answers is counted as refused.
    #[tokio::test]
    async fn counts_survivors_and_refusals() {
        let targets = crate::target::start(SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap();
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let silent_addr = silent.local_addr().unwrap();
        let _keep = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((tcp, _)) = silent.accept().await {
                held.push(tcp);
            }
        });
        let wave = |target, stall_target, stall_streams| Quiet {
            route: Route::Direct,
            target,
            streams: 20,
            quiet: Duration::from_millis(200),
            open_concurrency: 8,
            stall_target,
            stall_streams,
            echo_timeout: Duration::from_millis(500),
            deadline: Instant::now() + Duration::from_secs(10),
        };
        let report = wave(targets.echo, Some(silent_addr), 3).run().await;
        assert!(report.ok, "{}", report.human);
        assert!(report.human.contains("20 survived, 0 refused, 0 dropped"), "{}", report.human);
        assert!(report.human.contains("0 answered, 3 gave up"), "{}", report.human);

        let report = wave(silent_addr, None, 0).run().await;
        assert!(!report.ok);
        assert!(report.human.contains("0 survived, 20 refused"), "{}", report.human);
    }
}
