//! The access log (`--access-log PATH`): one record per stream when it ends: who
//! (user, client address), where to (the destination as requested), how much (bytes up
//! and down), how long, and how it ended.
//!
//! The data path never waits for the disk: a stream's end puts its record in a bounded
//! queue and moves on; one writer thread formats and writes. When the queue is full (a
//! slow disk, a pipe nobody reads) records are dropped and counted
//! (`anytls_access_log_dropped_total`), with a WARN at most every 10 s. The writer opens
//! the file itself, so a FIFO without a reader blocks the writer, never start-up.
//! SIGHUP asks the writer to reopen PATH (logrotate's rename-then-HUP).

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use crate::logging::{LogFormat, push_json_string};
use crate::metrics::AccessLogCounters;

/// Records waiting for the writer by default: a few seconds of a busy server's streams.
pub const DEFAULT_QUEUE: usize = 4096;
/// The least time between two WARN lines about dropped records.
const WARN_EVERY: Duration = Duration::from_secs(10);
/// How often an idle writer looks for a reopen request.
const REOPEN_CHECK: Duration = Duration::from_millis(200);

/// Where and how the access log is written.
#[derive(Debug, Clone)]
pub struct AccessLogSettings {
    /// A file (appended to), or `-` for stdout.
    pub path: PathBuf,
    pub format: LogFormat,
    /// Records the queue holds before new ones are dropped.
    pub queue: usize,
}

/// TCP or UDP over TCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Network {
    Tcp,
    Udp,
}

impl Network {
    fn name(self) -> &'static str {
        match self {
            Network::Tcp => "tcp",
            Network::Udp => "udp",
        }
    }
}

/// How a stream ended, as the server can tell. The label is stable (for queries); the
/// reason is the detail, where there is one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Relayed until both sides (or, with a reference peer, one side) finished.
    Ok,
    /// The outbound policy (`--deny`, `--deny-private`, the server's own addresses) refused it.
    Refused(String),
    /// Over a stream cap (server, user or session).
    OverLimit(String),
    /// No usable destination or UDP request.
    BadRequest(String),
    /// The destination could not be resolved or connected to.
    DialFailed(String),
    /// No data either way for the idle (or half-close) time.
    IdleTimeout(String),
    /// The client's session ended (the client went away, or the server shut down).
    SessionClosed(String),
    /// A socket error on the destination's side.
    Error(String),
}

impl Outcome {
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Refused(_) => "refused",
            Outcome::OverLimit(_) => "over_limit",
            Outcome::BadRequest(_) => "bad_request",
            Outcome::DialFailed(_) => "dial_failed",
            Outcome::IdleTimeout(_) => "idle_timeout",
            Outcome::SessionClosed(_) => "session_closed",
            Outcome::Error(_) => "error",
        }
    }

    pub fn reason(&self) -> Option<&str> {
        match self {
            Outcome::Ok => None,
            Outcome::Refused(why)
            | Outcome::OverLimit(why)
            | Outcome::BadRequest(why)
            | Outcome::DialFailed(why)
            | Outcome::IdleTimeout(why)
            | Outcome::SessionClosed(why)
            | Outcome::Error(why) => Some(why),
        }
    }
}

/// Bytes a stream carried: up is client → destination, down the other way.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Traffic {
    pub up: u64,
    pub down: u64,
}

/// Who opened a stream: for log lines and the access log.
#[derive(Debug, Clone)]
pub struct StreamClient {
    /// The client's address, as log lines name it.
    pub peer: String,
    pub user: Arc<str>,
}

/// One ended stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessRecord {
    pub ended: SystemTime,
    pub user: Arc<str>,
    pub client: String,
    pub network: Network,
    /// As the client asked (`host:port`); `-` when it sent none.
    pub destination: String,
    pub traffic: Traffic,
    pub duration: Duration,
    pub outcome: Outcome,
}

impl AccessRecord {
    /// `ts=… user=… client=… network=tcp destination=… bytes_up=… bytes_down=…
    /// duration_ms=… outcome=… [reason="…"]`: the JSON record's fields, in logfmt.
    pub fn text_line(&self) -> String {
        let mut line = String::with_capacity(160);
        line.push_str("ts=");
        line.push_str(&rfc3339(self.ended));
        for (key, value) in [("user", &*self.user), ("client", &self.client)] {
            push_text_field(&mut line, key, value);
        }
        push_text_field(&mut line, "network", self.network.name());
        push_text_field(&mut line, "destination", &self.destination);
        line.push_str(&format!(
            " bytes_up={} bytes_down={} duration_ms={}",
            self.traffic.up,
            self.traffic.down,
            self.duration.as_millis()
        ));
        push_text_field(&mut line, "outcome", self.outcome.label());
        if let Some(reason) = self.outcome.reason() {
            push_text_field(&mut line, "reason", reason);
        }
        line
    }

    /// One JSON object, the same fields as [`AccessRecord::text_line`].
    pub fn json_line(&self) -> String {
        let mut line = String::with_capacity(200);
        line.push_str("{\"ts\":");
        push_json_string(&mut line, &rfc3339(self.ended));
        for (key, value) in [
            ("user", &*self.user),
            ("client", &self.client),
            ("network", self.network.name()),
            ("destination", &self.destination),
        ] {
            line.push_str(&format!(",\"{key}\":"));
            push_json_string(&mut line, value);
        }
        line.push_str(&format!(
            ",\"bytes_up\":{},\"bytes_down\":{},\"duration_ms\":{},\"outcome\":\"{}\"",
            self.traffic.up,
            self.traffic.down,
            self.duration.as_millis(),
            self.outcome.label()
        ));
        if let Some(reason) = self.outcome.reason() {
            line.push_str(",\"reason\":");
            push_json_string(&mut line, reason);
        }
        line.push('}');
        line
    }

    fn line(&self, format: LogFormat) -> String {
        match format {
            LogFormat::Text => self.text_line(),
            LogFormat::Json => self.json_line(),
        }
    }
}

/// ` key=value`, the value quoted (JSON escaping) when it is empty or holds a space, a
/// quote, `=` or a control character, so that one record stays one parseable line.
fn push_text_field(line: &mut String, key: &str, value: &str) {
    line.push(' ');
    line.push_str(key);
    line.push('=');
    let plain = !value.is_empty() && !value.chars().any(|c| c.is_whitespace() || c.is_control() || "\"=\\".contains(c));
    if plain { line.push_str(value) } else { push_json_string(line, value) }
}

/// RFC 3339 in UTC, to the millisecond.
fn rfc3339(time: SystemTime) -> String {
    match jiff::Timestamp::try_from(time) {
        Ok(ts) => format!("{:.3}", ts),
        Err(_) => "1970-01-01T00:00:00.000Z".into(),
    }
}

/// The data path's side of the access log: off, or a bounded queue to the writer.
#[derive(Default)]
pub struct AccessLog {
    queue: Option<flume::Sender<AccessRecord>>,
    counters: Arc<AccessLogCounters>,
    reopen: Arc<AtomicBool>,
    warnings: DropWarnings,
}

impl AccessLog {
    /// Opens the log (a clear error if PATH cannot be written) and starts its writer
    /// thread, which stops once the last `AccessLog` is dropped.
    pub fn start(settings: &AccessLogSettings) -> Result<AccessLog, String> {
        let sink = Sink::open(&settings.path)
            .map_err(|e| format!("--access-log {}: cannot open: {e}", settings.path.display()))?;
        let (log, records) = AccessLog::with_queue(settings.queue.max(1));
        let (counters, reopen, format) = (log.counters.clone(), log.reopen.clone(), settings.format);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_records(records, sink, format, &counters, &reopen))
            .map_err(|e| format!("--access-log: cannot start its writer: {e}"))?;
        Ok(log)
    }

    /// A log whose records go to the returned receiver (the writer's end).
    pub fn with_queue(capacity: usize) -> (AccessLog, flume::Receiver<AccessRecord>) {
        let (sender, receiver) = flume::bounded(capacity);
        (AccessLog { queue: Some(sender), ..AccessLog::default() }, receiver)
    }

    pub fn is_on(&self) -> bool {
        self.queue.is_some()
    }

    pub fn counters(&self) -> &AccessLogCounters {
        &self.counters
    }

    /// Asks the writer to reopen PATH before its next record (SIGHUP).
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::Relaxed);
    }

    /// Queues the record of a stream that started at `started`; never waits.
    pub fn record(
        &self,
        client: &StreamClient,
        network: Network,
        destination: Option<&str>,
        traffic: Traffic,
        started: Instant,
        outcome: Outcome,
    ) {
        let Some(queue) = &self.queue else { return };
        let record = AccessRecord {
            ended: SystemTime::now(),
            user: client.user.clone(),
            client: client.peer.clone(),
            network,
            destination: destination.unwrap_or("-").to_string(),
            traffic,
            duration: started.elapsed(),
            outcome,
        };
        if queue.try_send(record).is_err() {
            let dropped = self.counters.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            self.warnings.dropped(dropped);
        }
    }
}

/// The WARN about dropped records, at most once per [`WARN_EVERY`], with the number
/// dropped since the last one.
#[derive(Default)]
struct DropWarnings {
    /// Milliseconds after `epoch` of the last warning (0: none yet).
    last_ms: AtomicU64,
    reported: AtomicU64,
    epoch: std::sync::OnceLock<Instant>,
}

impl DropWarnings {
    fn dropped(&self, total: u64) {
        let epoch = *self.epoch.get_or_init(Instant::now);
        let now_ms = epoch.elapsed().as_millis() as u64 + 1;
        let last = self.last_ms.load(Ordering::Relaxed);
        if last != 0 && now_ms - last < WARN_EVERY.as_millis() as u64 {
            return;
        }
        // One thread wins the right to warn for this period.
        if self.last_ms.compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed).is_err() {
            return;
        }
        let since = total - self.reported.swap(total, Ordering::Relaxed);
        log::warn!(
            dropped = since, dropped_total = total;
            "access log: {since} records dropped (the writer cannot keep up; {total} in all): see \
             anytls_access_log_dropped_total"
        );
    }
}

/// Where the writer writes: stdout, or a file opened (and reopened) by path.
enum Sink {
    Stdout(io::Stdout),
    File { path: PathBuf, file: Option<BufWriter<File>> },
}

impl Sink {
    /// Checks now that PATH can be written, except for a FIFO, which the writer opens
    /// (opening a FIFO without a reader blocks).
    fn open(path: &Path) -> io::Result<Sink> {
        if path.as_os_str() == "-" {
            return Ok(Sink::Stdout(io::stdout()));
        }
        use std::os::unix::fs::FileTypeExt;
        let fifo = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_fifo());
        let file = if fifo { None } else { Some(open_append(path)?) };
        Ok(Sink::File { path: path.to_path_buf(), file })
    }

    fn write_line(&mut self, line: &str) -> io::Result<()> {
        match self {
            Sink::Stdout(out) => writeln!(out.lock(), "{line}"),
            Sink::File { path, file } => {
                if file.is_none() {
                    *file = Some(open_append(path)?);
                }
                writeln!(file.as_mut().expect("opened above"), "{line}")
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::Stdout(out) => out.flush(),
            Sink::File { file: Some(file), .. } => file.flush(),
            Sink::File { file: None, .. } => Ok(()),
        }
    }

    /// Writes out what is buffered, then opens PATH anew (a file renamed away keeps what
    /// it had; new records go to a new file at PATH).
    fn reopen(&mut self) {
        let _ = self.flush();
        if let Sink::File { path, file } = self {
            match open_append(path) {
                Ok(new) => {
                    *file = Some(new);
                    log::info!("access log: reopened {}", path.display());
                }
                Err(why) => log::error!("access log: cannot reopen {}: {why}", path.display()),
            }
        }
    }
}

fn open_append(path: &Path) -> io::Result<BufWriter<File>> {
    use std::os::unix::fs::OpenOptionsExt;
    // Records name users and their addresses: not for everyone's eyes.
    let file = OpenOptions::new().create(true).append(true).mode(0o640).open(path)?;
    Ok(BufWriter::with_capacity(64 << 10, file))
}

/// The writer thread: records in, lines out, flushed whenever the queue runs dry.
fn write_records(
    records: flume::Receiver<AccessRecord>,
    mut sink: Sink,
    format: LogFormat,
    counters: &AccessLogCounters,
    reopen: &AtomicBool,
) {
    let mut last_error: Option<Instant> = None;
    loop {
        let record = match records.recv_timeout(REOPEN_CHECK) {
            Ok(record) => Some(record),
            Err(flume::RecvTimeoutError::Timeout) => None,
            Err(flume::RecvTimeoutError::Disconnected) => break,
        };
        if reopen.swap(false, Ordering::Relaxed) {
            sink.reopen();
        }
        let Some(record) = record else { continue };
        let mut written = sink.write_line(&record.line(format));
        // Take whatever else is waiting before flushing: one write for a burst.
        while written.is_ok()
            && let Ok(record) = records.try_recv()
        {
            counters.records.fetch_add(1, Ordering::Relaxed);
            written = sink.write_line(&record.line(format));
        }
        if written.is_ok() {
            counters.records.fetch_add(1, Ordering::Relaxed);
            written = sink.flush();
        }
        if let Err(why) = written {
            counters.dropped.fetch_add(1, Ordering::Relaxed);
            if last_error.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
                log::warn!("access log: cannot write: {why}");
                last_error = Some(Instant::now());
            }
        }
    }
    let _ = sink.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(outcome: Outcome) -> AccessRecord {
        AccessRecord {
            ended: SystemTime::UNIX_EPOCH + Duration::from_millis(1_767_225_600_123),
            user: "alice".into(),
            client: "192.0.2.7:50000".into(),
            network: Network::Tcp,
            destination: "example.com:443".into(),
            traffic: Traffic { up: 517, down: 4096 },
            duration: Duration::from_millis(1250),
            outcome,
        }
    }

    #[test]
    fn a_text_record_is_logfmt_with_the_json_names() {
        assert_eq!(
            record(Outcome::Ok).text_line(),
            "ts=2026-01-01T00:00:00.123Z user=alice client=192.0.2.7:50000 network=tcp \
             destination=example.com:443 bytes_up=517 bytes_down=4096 duration_ms=1250 outcome=ok"
        );
        let refused = record(Outcome::DialFailed("dial example.com:443: connection refused".into())).text_line();
        assert!(
            refused.ends_with(r#"outcome=dial_failed reason="dial example.com:443: connection refused""#),
            "{refused}"
        );
    }

    #[test]
    fn a_json_record_has_every_field() {
        let line = record(Outcome::IdleTimeout("idle for 300s".into())).json_line();
        let object: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(object["ts"], "2026-01-01T00:00:00.123Z");
        assert_eq!(object["user"], "alice");
        assert_eq!(object["client"], "192.0.2.7:50000");
        assert_eq!(object["network"], "tcp");
        assert_eq!(object["destination"], "example.com:443");
        assert_eq!((object["bytes_up"].as_u64(), object["bytes_down"].as_u64()), (Some(517), Some(4096)));
        assert_eq!(object["duration_ms"], 1250);
        assert_eq!(
            (object["outcome"].as_str(), object["reason"].as_str()),
            (Some("idle_timeout"), Some("idle for 300s"))
        );
        assert!(record(Outcome::Ok).json_line().find("reason").is_none());
    }

    #[test]
    fn hostile_names_cannot_break_a_record() {
        let mut nasty = record(Outcome::Ok);
        nasty.destination = "a b\n\"c\"=d:1".into();
        nasty.user = "".into();
        let text = nasty.text_line();
        assert!(!text.contains('\n'), "{text}");
        assert!(text.contains(r#" user="" "#) && text.contains(r#"destination="a b\n\"c\"=d:1""#), "{text}");
        let object: serde_json::Value = serde_json::from_str(&nasty.json_line()).unwrap();
        assert_eq!(object["destination"], "a b\n\"c\"=d:1");
    }

    #[test]
    fn a_full_queue_drops_and_counts_without_waiting() {
        let (log, records) = AccessLog::with_queue(2);
        let client = StreamClient { peer: "192.0.2.7:1".into(), user: "u".into() };
        let started = Instant::now();
        for _ in 0..5 {
            log.record(&client, Network::Udp, Some("x:53"), Traffic::default(), started, Outcome::Ok);
        }
        assert!(started.elapsed() < Duration::from_secs(1), "recording never waits");
        assert_eq!(records.len(), 2);
        assert_eq!(log.counters().dropped.load(Ordering::Relaxed), 3);
        let off = AccessLog::default();
        assert!(!off.is_on());
        off.record(&client, Network::Tcp, None, Traffic::default(), started, Outcome::Ok);
    }

    #[test]
    fn the_writer_appends_reopens_and_stops_with_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let settings = AccessLogSettings { path: path.clone(), format: LogFormat::Json, queue: 16 };
        let log = AccessLog::start(&settings).unwrap();
        let client = StreamClient { peer: "192.0.2.7:1".into(), user: "u".into() };
        let written = |log: &AccessLog, n: u64| {
            let deadline = Instant::now() + Duration::from_secs(5);
            while log.counters().records.load(Ordering::Relaxed) < n && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        log.record(&client, Network::Tcp, Some("a:1"), Traffic::default(), Instant::now(), Outcome::Ok);
        written(&log, 1);
        let rotated = dir.path().join("access.log.1");
        std::fs::rename(&path, &rotated).unwrap();
        log.reopen();
        std::thread::sleep(REOPEN_CHECK * 2);
        log.record(&client, Network::Tcp, Some("b:2"), Traffic::default(), Instant::now(), Outcome::Ok);
        written(&log, 2);
        let old = std::fs::read_to_string(&rotated).unwrap();
        let new = std::fs::read_to_string(&path).unwrap();
        assert!(old.contains("\"a:1\"") && !old.contains("\"b:2\""), "{old}");
        assert!(new.contains("\"b:2\"") && !new.contains("\"a:1\""), "{new}");
    }

    #[test]
    fn an_unwritable_path_is_a_clear_error() {
        let settings =
            AccessLogSettings { path: "/nonexistent-dir/access.log".into(), format: LogFormat::Text, queue: 1 };
        let Err(why) = AccessLog::start(&settings) else { panic!("opened an impossible path") };
        assert!(why.starts_with("--access-log /nonexistent-dir/access.log: cannot open: "), "{why}");
    }
}
