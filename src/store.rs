//! The server's state directory: a small crash-safe key-value store for users added
//! through the admin API and the usage their quotas count.
//!
//! Layout of `DIR`:
//! - `lock`: held with an exclusive `flock` while a [`Store`] is open, so a second server
//!   pointed at the same directory fails at start instead of interleaving writes.
//! - `snapshot.json`: `{"seq": S, "entries": {...}}`, the contents after batch `S`.
//! - `journal.jsonl`: one line per batch, `{"seq": N, "changes": [...]}`, appended and
//!   `fdatasync`'d before the batch is acknowledged.
//!
//! Why a journal and not SQLite or a rewritten file: measured on this machine's disk
//! (ext4 on a virtual disk), 10,000 durable single-record writes, medians of 3 runs:
//!
//! | method                                             | sequential | 16 writers |
//! |----------------------------------------------------|-----------:|-----------:|
//! | journal + fdatasync, group commit                  |     1.98 s |     0.30 s |
//! | SQLite (bundled), WAL, synchronous=FULL, 1 tx each |     1.52 s |     1.70 s |
//! | whole file tmp+fsync+rename, 1,000 records present |    ≈7.1 s  |        —   |
//! | same, 100,000 records present                      |   ≈323 s   |        —   |
//!
//! (The whole-file rows are 10,000 × the measured cost of one write: 0.71 ms and 32 ms.)
//!
//! Rewriting the file costs in proportion to the whole contents on every write, so it
//! fails "10,000 users in under 10 s" as soon as there are many. SQLite is a little
//! faster one writer at a time but serialises concurrent commits (one fsync each), while
//! the journal's group commit shares one `fdatasync` among all waiting callers — the case
//! an API under load and periodic usage flushes produce. SQLite would also add about a
//! minute to a cold release build and 2 MB to each binary. Both keep data across a power
//! cut once acknowledged.
//!
//! Crash safety:
//! - A batch is one line, so it is applied whole or not at all. A crash mid-append leaves
//!   a torn last line, which [`Store::open`] drops (it was never acknowledged); a bad line
//!   anywhere else is corruption and an error naming the file and line, never skipped.
//! - Compaction writes `snapshot.json.tmp`, fsyncs it, renames it over `snapshot.json`,
//!   fsyncs the directory and only then empties the journal. Every intermediate state
//!   loads: a leftover tmp file is ignored, and journal lines with a sequence number the
//!   snapshot already covers are skipped, so replaying an old journal over a new snapshot
//!   never applies a batch twice.
//! - After a failed write or `fdatasync` the journal's state on disk is unknown (the
//!   kernel may have dropped the dirty pages), so the store refuses every later batch
//!   until it is reopened, which reads what actually reached the disk. A batch reported
//!   as failed may or may not be there after reopening.

use std::collections::BTreeMap;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};

const LOCK_FILE: &str = "lock";
const SNAPSHOT_FILE: &str = "snapshot.json";
const SNAPSHOT_TMP_FILE: &str = "snapshot.json.tmp";
const JOURNAL_FILE: &str = "journal.jsonl";

/// Callers beyond this many queued batches wait to send, so a flood of writers is held
/// back instead of growing memory without bound.
const QUEUED_BATCHES: usize = 1024;

/// The default journal size past which the writer compacts (when the journal is also
/// larger than the snapshot, so a large store is not rewritten for a small journal).
pub const DEFAULT_COMPACT_JOURNAL_OVER: u64 = 4 << 20;

/// One change in a batch given to [`Store::apply`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    Put(String, serde_json::Value),
    Delete(String),
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{action} {}: {source}", path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: Arc<io::Error>,
    },
    #[error("{} is locked by another process: is a second server using this state directory?", path.display())]
    Locked { path: PathBuf },
    #[error("{}: not a valid snapshot: {source}", path.display())]
    CorruptSnapshot {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}:{line}: {reason}", path.display())]
    CorruptJournal { path: PathBuf, line: usize, reason: String },
    #[error("the store's writer thread has stopped")]
    WriterGone,
}

impl StoreError {
    fn io(path: &Path, action: &'static str, source: io::Error) -> StoreError {
        StoreError::Io { path: path.to_path_buf(), action, source: Arc::new(source) }
    }

    /// The same error for another waiter of a failed group (io::Error is not Clone).
    fn for_another_waiter(&self) -> StoreError {
        match self {
            StoreError::Io { path, action, source } => {
                StoreError::Io { path: path.clone(), action, source: source.clone() }
            }
            _ => StoreError::WriterGone,
        }
    }
}

/// Tuning for [`Store::open_with`]; [`Store::open`] uses the defaults.
#[derive(Debug, Clone, Copy)]
pub struct StoreOptions {
    /// Compact once the journal is larger than this many bytes and than the snapshot.
    pub compact_journal_over: u64,
}

impl Default for StoreOptions {
    fn default() -> StoreOptions {
        StoreOptions { compact_journal_over: DEFAULT_COMPACT_JOURNAL_OVER }
    }
}

struct Request {
    changes: Vec<Change>,
    reply: flume::Sender<Result<(), StoreError>>,
}

/// An open state directory. Writes go through one writer thread; see the module doc.
pub struct Store {
    requests: Option<flume::Sender<Request>>,
    writer: Option<JoinHandle<()>>,
}

impl Store {
    /// Opens `dir` (created with mode 0700 if missing), takes an exclusive advisory lock
    /// on `DIR/lock`, loads the snapshot and replays the journal. Returns the contents.
    ///
    /// A torn last journal line (a crash mid-write) is dropped and the journal truncated
    /// to the last whole line; a bad line anywhere else is an error naming file and line.
    pub fn open(dir: &Path) -> Result<(Store, BTreeMap<String, serde_json::Value>), StoreError> {
        Store::open_with(dir, StoreOptions::default())
    }

    pub fn open_with(
        dir: &Path,
        options: StoreOptions,
    ) -> Result<(Store, BTreeMap<String, serde_json::Value>), StoreError> {
        create_state_dir(dir)?;
        let lock = lock_state_dir(dir)?;
        // A tmp snapshot is a compaction that did not reach its rename: the old snapshot
        // and the journal still hold everything.
        remove_if_present(&dir.join(SNAPSHOT_TMP_FILE))?;
        let (snapshot_seq, mut entries, snapshot_len) = read_snapshot(&dir.join(SNAPSHOT_FILE))?;
        let journal_path = dir.join(JOURNAL_FILE);
        let (journal, journal_len, last_seq) = open_journal(&journal_path, dir, snapshot_seq, &mut entries)?;
        let writer = Writer {
            dir: dir.to_path_buf(),
            journal_path,
            journal,
            journal_len,
            snapshot_len,
            last_seq,
            entries: entries.clone(),
            options,
            compact_again_at: 0,
            failed: None,
            _lock: lock,
        };
        let (requests, queue) = flume::bounded(QUEUED_BATCHES);
        let writer = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer.run(queue))
            .map_err(|e| StoreError::io(dir, "starting the writer thread for", e))?;
        Ok((Store { requests: Some(requests), writer: Some(writer) }, entries))
    }

    /// Applies `changes` as one batch; returns once they are durable (written and
    /// fdatasync'd). Concurrent callers share one fdatasync. Never blocks the runtime:
    /// the caller awaits the writer thread's reply. A batch whose future is dropped once
    /// queued may still be committed.
    pub async fn apply(&self, changes: Vec<Change>) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        let requests = self.requests.as_ref().ok_or(StoreError::WriterGone)?;
        let (reply, replied) = flume::bounded(1);
        requests.send_async(Request { changes, reply }).await.map_err(|_| StoreError::WriterGone)?;
        replied.recv_async().await.map_err(|_| StoreError::WriterGone)?
    }
}

impl Drop for Store {
    /// Waits for the writer to finish what is queued, so the lock is released (and the
    /// directory can be opened again) once the store is dropped.
    fn drop(&mut self) {
        drop(self.requests.take());
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

fn create_state_dir(dir: &Path) -> Result<(), StoreError> {
    if dir.is_dir() {
        return Ok(());
    }
    DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| StoreError::io(dir, "creating", e))?;
    // The new directory's entry must survive a power cut too, or so would nothing in it.
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        sync_dir(parent)?;
    }
    Ok(())
}

/// How long a held lock is tried again before the directory counts as in use.
const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_secs(1);

fn lock_state_dir(dir: &Path) -> Result<File, StoreError> {
    let path = dir.join(LOCK_FILE);
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| StoreError::io(&path, "opening", e))?;
    // A lock can outlive its holder for a moment: a server just stopped by a restart, or a
    // copy of the descriptor in a child being spawned (between fork and exec) by whoever
    // held it. So a held lock is tried again for a second before it means "in use".
    let deadline = std::time::Instant::now() + LOCK_PATIENCE;
    loop {
        // SAFETY: flock only takes the descriptor, which `lock` keeps open.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(lock);
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::WouldBlock {
            return Err(StoreError::io(&path, "locking", error));
        }
        if std::time::Instant::now() >= deadline {
            return Err(StoreError::Locked { path });
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn remove_if_present(path: &Path) -> Result<(), StoreError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(StoreError::io(path, "removing", e)),
        _ => Ok(()),
    }
}

#[derive(Serialize)]
struct SnapshotOut<'a> {
    seq: u64,
    entries: &'a BTreeMap<String, serde_json::Value>,
}

#[derive(Deserialize)]
struct SnapshotIn {
    seq: u64,
    entries: BTreeMap<String, serde_json::Value>,
}

/// Returns the sequence number the snapshot covers, its entries and its size; a missing
/// snapshot is an empty store at sequence 0.
fn read_snapshot(path: &Path) -> Result<(u64, BTreeMap<String, serde_json::Value>, u64), StoreError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((0, BTreeMap::new(), 0)),
        Err(e) => return Err(StoreError::io(path, "reading", e)),
    };
    let snapshot: SnapshotIn = serde_json::from_slice(&bytes)
        .map_err(|source| StoreError::CorruptSnapshot { path: path.to_path_buf(), source })?;
    Ok((snapshot.seq, snapshot.entries, bytes.len() as u64))
}

#[derive(Serialize)]
struct BatchOut<'a> {
    seq: u64,
    changes: &'a [Change],
}

#[derive(Deserialize)]
struct BatchIn {
    seq: u64,
    changes: Vec<Change>,
}

/// Opens the journal for appending, replays it over `entries` and cuts off a torn last
/// line. Returns the file, its length and the last sequence number applied.
fn open_journal(
    path: &Path,
    dir: &Path,
    snapshot_seq: u64,
    entries: &mut BTreeMap<String, serde_json::Value>,
) -> Result<(File, u64, u64), StoreError> {
    let existed = path.exists();
    let mut journal = OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| StoreError::io(path, "opening", e))?;
    if !existed {
        sync_dir(dir)?;
    }
    let mut bytes = Vec::new();
    journal.read_to_end(&mut bytes).map_err(|e| StoreError::io(path, "reading", e))?;
    let replayed = replay(&bytes, snapshot_seq, entries).map_err(|(line, reason)| StoreError::CorruptJournal {
        path: path.to_path_buf(),
        line,
        reason,
    })?;
    if let Some(line) = replayed.dropped_line {
        log::warn!(
            "{}:{line}: dropping a torn last line ({} bytes), left by a crash while it was written",
            path.display(),
            bytes.len() as u64 - replayed.whole_len
        );
        journal.set_len(replayed.whole_len).map_err(|e| StoreError::io(path, "truncating", e))?;
        fdatasync(&journal).map_err(|e| StoreError::io(path, "fdatasync", e))?;
    }
    Ok((journal, replayed.whole_len, replayed.last_seq))
}

#[derive(Debug, PartialEq)]
struct Replayed {
    /// Bytes up to the end of the last whole line kept.
    whole_len: u64,
    last_seq: u64,
    /// The 1-based number of a torn last line that was dropped.
    dropped_line: Option<usize>,
}

/// Applies the journal's batches newer than `snapshot_seq` to `entries`. A last line that
/// is unterminated or does not parse is torn (the writer only ever appends whole lines,
/// and a crash can cut or zero the tail of an append); any other bad line is an error
/// `(line number, reason)`.
fn replay(
    bytes: &[u8],
    snapshot_seq: u64,
    entries: &mut BTreeMap<String, serde_json::Value>,
) -> Result<Replayed, (usize, String)> {
    let mut last_seq = snapshot_seq;
    let mut offset = 0;
    let mut number = 0;
    while offset < bytes.len() {
        number += 1;
        let rest = &bytes[offset..];
        let (line, terminated) = match rest.iter().position(|&b| b == b'\n') {
            Some(end) => (&rest[..end], true),
            None => (rest, false),
        };
        let is_last = offset + line.len() + usize::from(terminated) == bytes.len();
        let parsed = match terminated {
            true => serde_json::from_slice::<BatchIn>(line).map_err(|e| e.to_string()),
            false => Err("no line end".to_string()),
        };
        let batch = match parsed {
            Ok(batch) => batch,
            Err(_) if is_last => {
                return Ok(Replayed { whole_len: offset as u64, last_seq, dropped_line: Some(number) });
            }
            Err(reason) => return Err((number, format!("not a journal record: {reason}"))),
        };
        offset += line.len() + 1;
        // Batches the snapshot already holds: a compaction renamed its snapshot but did
        // not get to empty the journal.
        if batch.seq <= snapshot_seq {
            continue;
        }
        if batch.seq != last_seq + 1 {
            return Err((number, format!("sequence {} follows {last_seq}: batches are missing", batch.seq)));
        }
        last_seq = batch.seq;
        for change in batch.changes {
            apply_change(entries, change);
        }
    }
    Ok(Replayed { whole_len: offset as u64, last_seq, dropped_line: None })
}

fn apply_change(entries: &mut BTreeMap<String, serde_json::Value>, change: Change) {
    match change {
        Change::Put(key, value) => {
            entries.insert(key, value);
        }
        Change::Delete(key) => {
            entries.remove(&key);
        }
    }
}

fn fdatasync(file: &File) -> io::Result<()> {
    // SAFETY: fdatasync only takes the descriptor, which `file` keeps open.
    if unsafe { libc::fdatasync(file.as_raw_fd()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| StoreError::io(dir, "fsync of directory", e))
}

/// The writer thread's state: the open journal and the current contents.
struct Writer {
    dir: PathBuf,
    journal_path: PathBuf,
    journal: File,
    journal_len: u64,
    snapshot_len: u64,
    last_seq: u64,
    entries: BTreeMap<String, serde_json::Value>,
    options: StoreOptions,
    /// After a failed compaction, the journal length at which to try again, so a full
    /// disk is not retried on every commit.
    compact_again_at: u64,
    failed: Option<StoreError>,
    _lock: File,
}

impl Writer {
    fn run(mut self, queue: flume::Receiver<Request>) {
        let mut line_buf = Vec::new();
        while let Ok(first) = queue.recv() {
            // Group commit: everything queued meanwhile shares this write and fdatasync.
            let group: Vec<Request> = std::iter::once(first).chain(queue.try_iter()).collect();
            let result = self.commit(&group, &mut line_buf);
            for request in group {
                let reply = match &result {
                    Ok(()) => Ok(()),
                    Err(e) => Err(e.for_another_waiter()),
                };
                let _ = request.reply.send(reply);
            }
            if result.is_ok() && self.should_compact() {
                self.compact();
            }
        }
    }

    fn commit(&mut self, group: &[Request], line_buf: &mut Vec<u8>) -> Result<(), StoreError> {
        if let Some(failed) = &self.failed {
            return Err(failed.for_another_waiter());
        }
        line_buf.clear();
        for (n, request) in group.iter().enumerate() {
            let batch = BatchOut { seq: self.last_seq + 1 + n as u64, changes: &request.changes };
            serde_json::to_writer(&mut *line_buf, &batch).expect("JSON values always serialize");
            line_buf.push(b'\n');
        }
        let written = self.journal.write_all(line_buf).map_err(|e| (e, "appending to"));
        if let Err((e, action)) = written.and_then(|()| fdatasync(&self.journal).map_err(|e| (e, "fdatasync"))) {
            let error = StoreError::io(&self.journal_path, action, e);
            log::error!("{error}; no further writes are accepted until the state directory is reopened");
            self.failed = Some(error.for_another_waiter());
            return Err(error);
        }
        self.journal_len += line_buf.len() as u64;
        self.last_seq += group.len() as u64;
        for request in group {
            for change in &request.changes {
                apply_change(&mut self.entries, change.clone());
            }
        }
        Ok(())
    }

    fn should_compact(&self) -> bool {
        self.journal_len > self.options.compact_journal_over
            && self.journal_len > self.snapshot_len
            && self.journal_len >= self.compact_again_at
    }

    fn compact(&mut self) {
        match self.write_snapshot() {
            Ok(snapshot_len) => {
                self.snapshot_len = snapshot_len;
                self.compact_again_at = 0;
            }
            Err(e) => {
                // The journal is untouched, so nothing is lost; try again after it grows.
                log::warn!("compacting the state directory failed, will retry: {e}");
                self.compact_again_at = self.journal_len + self.options.compact_journal_over;
                return;
            }
        }
        // The snapshot now holds every batch, so the old lines are only skipped on replay:
        // emptying the journal is cleanup, and failing at it loses nothing.
        match self.journal.set_len(0).and_then(|()| fdatasync(&self.journal)) {
            Ok(()) => self.journal_len = 0,
            Err(e) => log::warn!("emptying {} after compaction failed: {e}", self.journal_path.display()),
        }
    }

    /// Writes the contents to `snapshot.json` atomically; returns its size.
    fn write_snapshot(&self) -> Result<u64, StoreError> {
        let tmp = self.dir.join(SNAPSHOT_TMP_FILE);
        let bytes = serde_json::to_vec(&SnapshotOut { seq: self.last_seq, entries: &self.entries })
            .expect("JSON values always serialize");
        let mut file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| StoreError::io(&tmp, "creating", e))?;
        file.write_all(&bytes).map_err(|e| StoreError::io(&tmp, "writing", e))?;
        file.sync_all().map_err(|e| StoreError::io(&tmp, "fsync", e))?;
        drop(file);
        let snapshot = self.dir.join(SNAPSHOT_FILE);
        std::fs::rename(&tmp, &snapshot).map_err(|e| StoreError::io(&snapshot, "renaming a new snapshot to", e))?;
        sync_dir(&self.dir)?;
        Ok(bytes.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::io::BufRead;
    use std::time::{Duration, Instant};

    fn put(key: &str, value: serde_json::Value) -> Change {
        Change::Put(key.to_string(), value)
    }

    fn reopen(dir: &Path) -> BTreeMap<String, serde_json::Value> {
        Store::open(dir).unwrap().1
    }

    fn small_compactions() -> StoreOptions {
        StoreOptions { compact_journal_over: 4096 }
    }

    fn journal_len(dir: &Path) -> u64 {
        std::fs::metadata(dir.join(JOURNAL_FILE)).unwrap().len()
    }

    #[tokio::test]
    async fn puts_and_deletes_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (store, contents) = Store::open(dir.path()).unwrap();
        assert!(contents.is_empty());
        store.apply(vec![put("user/alice", json!({"quota": 1})), put("user/bob", json!(2))]).await.unwrap();
        store.apply(vec![Change::Delete("user/bob".into()), put("usage/alice", json!(10))]).await.unwrap();
        store.apply(vec![put("user/alice", json!({"quota": 3}))]).await.unwrap();
        drop(store);
        let contents = reopen(dir.path());
        assert_eq!(
            contents,
            BTreeMap::from([("usage/alice".to_string(), json!(10)), ("user/alice".to_string(), json!({"quota": 3}))])
        );
    }

    #[tokio::test]
    async fn a_new_state_dir_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("state/nested");
        drop(Store::open(&dir).unwrap());
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
    }

    #[tokio::test]
    async fn a_torn_batch_is_dropped_whole() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        store.apply(vec![put("a", json!(1))]).await.unwrap();
        store.apply(vec![put("b", json!(2)), put("c", json!(3)), Change::Delete("a".into())]).await.unwrap();
        drop(store);
        // Cut the second batch in the middle, as a crash during its append would.
        let whole = journal_len(dir.path());
        let journal = OpenOptions::new().write(true).open(dir.path().join(JOURNAL_FILE)).unwrap();
        journal.set_len(whole - 20).unwrap();
        drop(journal);
        assert_eq!(reopen(dir.path()), BTreeMap::from([("a".to_string(), json!(1))]));
    }

    #[tokio::test]
    async fn a_torn_last_line_is_dropped_and_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        store.apply(vec![put("a", json!(1))]).await.unwrap();
        store.apply(vec![put("b", json!(2))]).await.unwrap();
        drop(store);
        let whole = journal_len(dir.path());
        let mut journal = OpenOptions::new().append(true).open(dir.path().join(JOURNAL_FILE)).unwrap();
        journal.write_all(br#"{"seq":3,"changes":[{"put":["c","#).unwrap();
        drop(journal);

        let (store, contents) = Store::open(dir.path()).unwrap();
        assert_eq!(contents, BTreeMap::from([("a".to_string(), json!(1)), ("b".to_string(), json!(2))]));
        assert_eq!(journal_len(dir.path()), whole, "the torn tail is truncated away");
        // New batches follow the whole lines, not the garbage.
        store.apply(vec![put("d", json!(4))]).await.unwrap();
        drop(store);
        assert_eq!(reopen(dir.path()).keys().collect::<Vec<_>>(), ["a", "b", "d"]);
    }

    #[test]
    fn a_zeroed_tail_after_the_last_line_end_is_torn() {
        let mut entries = BTreeMap::new();
        let journal = b"{\"seq\":1,\"changes\":[{\"put\":[\"a\",1]}]}\n\0\0\0\0\n";
        let first_line_len = journal.iter().position(|&b| b == b'\n').unwrap() as u64 + 1;
        let replayed = replay(journal, 0, &mut entries).unwrap();
        assert_eq!(replayed, Replayed { whole_len: first_line_len, last_seq: 1, dropped_line: Some(2) });
        assert_eq!(entries, BTreeMap::from([("a".to_string(), json!(1))]));
    }

    #[tokio::test]
    async fn a_corrupt_middle_line_is_an_error_naming_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        for n in 0..3 {
            store.apply(vec![put(&format!("k{n}"), json!(n))]).await.unwrap();
        }
        drop(store);
        let path = dir.path().join(JOURNAL_FILE);
        let text = std::fs::read_to_string(&path).unwrap();
        let mut lines: Vec<&str> = text.lines().collect();
        lines[1] = "{\"seq\":2,\"changes\":[{\"put\":[\"k1\"";
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();

        let error = Store::open(dir.path()).err().expect("a corrupt line must not be skipped");
        assert!(matches!(&error, StoreError::CorruptJournal { path: p, line: 2, .. } if *p == path), "{error:?}");
        assert!(error.to_string().starts_with(&format!("{}:2: ", path.display())), "{error}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), lines.join("\n") + "\n", "the journal is left as it was");
    }

    #[test]
    fn a_missing_batch_is_an_error() {
        let journal = b"{\"seq\":1,\"changes\":[]}\n{\"seq\":3,\"changes\":[]}\n{\"seq\":4,\"changes\":[]}\n";
        let error = replay(journal, 0, &mut BTreeMap::new()).unwrap_err();
        assert_eq!(error.0, 2);
    }

    #[tokio::test]
    async fn compaction_keeps_the_contents_and_empties_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open_with(dir.path(), small_compactions()).unwrap();
        let mut expected = BTreeMap::new();
        for n in 0..2000u64 {
            let key = format!("usage/{}", n % 37);
            if n % 5 == 4 {
                store.apply(vec![Change::Delete(key.clone())]).await.unwrap();
                expected.remove(&key);
            } else {
                store.apply(vec![put(&key, json!({"bytes": n}))]).await.unwrap();
                expected.insert(key, json!({"bytes": n}));
            }
        }
        drop(store);
        assert!(dir.path().join(SNAPSHOT_FILE).exists());
        assert!(journal_len(dir.path()) <= 4096 + 100, "journal was compacted: {} bytes", journal_len(dir.path()));
        assert!(!dir.path().join(SNAPSHOT_TMP_FILE).exists());
        assert_eq!(reopen(dir.path()), expected);
    }

    #[tokio::test]
    async fn a_tmp_snapshot_left_by_a_crash_before_its_rename_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        store.apply(vec![put("a", json!(1))]).await.unwrap();
        drop(store);
        for leftover in [&b"{\"seq\":9,\"entries\":{\"stale\":0}}"[..], b"{\"seq\":9,\"entr"] {
            std::fs::write(dir.path().join(SNAPSHOT_TMP_FILE), leftover).unwrap();
            assert_eq!(reopen(dir.path()), BTreeMap::from([("a".to_string(), json!(1))]));
            assert!(!dir.path().join(SNAPSHOT_TMP_FILE).exists());
        }
    }

    #[tokio::test]
    async fn an_old_journal_left_beside_a_new_snapshot_loads_and_takes_new_batches() {
        let dir = tempfile::tempdir().unwrap();
        let mut expected = BTreeMap::new();
        let mut n = 0;
        // Dropping the store after each batch waits for the compaction it may trigger, so
        // the journal as it was just before the compaction emptied it can be rebuilt: the
        // state on disk after a crash between the snapshot's rename and the truncation.
        let old_journal = loop {
            let before = std::fs::read(dir.path().join(JOURNAL_FILE)).unwrap_or_default();
            let batch = vec![put("counter", json!(n)), put(&format!("user/{n}"), json!(n))];
            let (store, _) = Store::open_with(dir.path(), small_compactions()).unwrap();
            store.apply(batch.clone()).await.unwrap();
            drop(store);
            for change in &batch {
                apply_change(&mut expected, change.clone());
            }
            n += 1;
            if journal_len(dir.path()) == 0 {
                let (snapshot_seq, snapshot, _) = read_snapshot(&dir.path().join(SNAPSHOT_FILE)).unwrap();
                assert_eq!(snapshot, expected);
                let mut last_line = serde_json::to_vec(&BatchOut { seq: snapshot_seq, changes: &batch }).unwrap();
                last_line.push(b'\n');
                break [before, last_line].concat();
            }
            assert!(n < 1000, "no compaction happened");
        };
        std::fs::write(dir.path().join(JOURNAL_FILE), &old_journal).unwrap();

        let (store, contents) = Store::open(dir.path()).unwrap();
        assert_eq!(contents, expected);
        store.apply(vec![Change::Delete("user/0".into()), put("counter", json!("after"))]).await.unwrap();
        drop(store);
        expected.remove("user/0");
        expected.insert("counter".into(), json!("after"));
        assert_eq!(reopen(dir.path()), expected);
    }

    #[test]
    fn batches_the_snapshot_covers_are_skipped() {
        let mut entries = BTreeMap::from([("a".to_string(), json!(2))]);
        let journal = b"{\"seq\":5,\"changes\":[{\"put\":[\"a\",1]}]}\n{\"seq\":6,\"changes\":[{\"put\":[\"b\",1]}]}\n";
        let replayed = replay(journal, 5, &mut entries).unwrap();
        assert_eq!(replayed.last_seq, 6);
        assert_eq!(entries, BTreeMap::from([("a".to_string(), json!(2)), ("b".to_string(), json!(1))]));
    }

    #[tokio::test]
    async fn a_second_open_fails_while_the_first_is_alive() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        store.apply(vec![put("a", json!(1))]).await.unwrap();
        let error = Store::open(dir.path()).err().expect("two stores on one directory");
        assert!(matches!(&error, StoreError::Locked { path } if *path == dir.path().join(LOCK_FILE)), "{error:?}");
        assert!(error.to_string().contains("second server"), "{error}");
        drop(store);
        assert_eq!(reopen(dir.path()), BTreeMap::from([("a".to_string(), json!(1))]));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writers_share_commits_and_lose_nothing() {
        const TASKS: usize = 16;
        const PUTS: usize = 1000;
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        let store = Arc::new(store);
        let started = Instant::now();
        let tasks: Vec<_> = (0..TASKS)
            .map(|task| {
                let store = store.clone();
                tokio::spawn(async move {
                    for n in 0..PUTS {
                        store.apply(vec![put(&format!("user/{task}/{n}"), json!(n))]).await.unwrap();
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        println!("{TASKS} tasks x {PUTS} durable puts took {:?}", started.elapsed());
        drop(Arc::into_inner(store).expect("every task is done"));
        let contents = reopen(dir.path());
        assert_eq!(contents.len(), TASKS * PUTS);
        assert_eq!(contents["user/15/999"], json!(999));
    }

    const KILL_CHILD_DIR: &str = "ANYTLS_STORE_TEST_KILL_CHILD_DIR";
    const ACKED: &str = "acked ";

    /// Acts as the writer that `acknowledged_batches_survive_kill_9` kills; a no-op in a
    /// normal test run.
    #[tokio::test]
    async fn kill_child_writer() {
        let Some(dir) = std::env::var_os(KILL_CHILD_DIR) else { return };
        // Compacting often, so that some kills land inside a compaction.
        let (store, _) = Store::open_with(Path::new(&dir), StoreOptions { compact_journal_over: 16 << 10 }).unwrap();
        let store = Arc::new(store);
        let run = std::process::id();
        let stop_at = Instant::now() + Duration::from_secs(5);
        let writers: Vec<_> = (0..4)
            .map(|writer| {
                let store = store.clone();
                tokio::spawn(async move {
                    let mut n = 0;
                    while Instant::now() < stop_at {
                        let key = format!("run/{run}/{writer}/{n}");
                        store
                            .apply(vec![put(&key, json!(n)), put(&format!("usage/{writer}"), json!(n))])
                            .await
                            .unwrap();
                        // Written straight to stdout, past the test harness's capture.
                        std::io::stdout().lock().write_all(format!("{ACKED}{key}\n").as_bytes()).unwrap();
                        n += 1;
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.await.unwrap();
        }
    }

    #[test]
    fn acknowledged_batches_survive_kill_9() {
        let dir = tempfile::tempdir().unwrap();
        for round in 0..5u64 {
            let mut child = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "store::tests::kill_child_writer", "--nocapture", "--test-threads=1"])
                .env(KILL_CHILD_DIR, dir.path())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
            let (first_ack, first_acked) = flume::bounded(1);
            let reader = std::thread::spawn(move || {
                let mut acked = Vec::new();
                for line in stdout.lines() {
                    let Some(key) = line.unwrap().strip_prefix(ACKED).map(str::to_string) else { continue };
                    let _ = first_ack.try_send(());
                    acked.push(key);
                }
                acked
            });
            // Kill it while it is writing, at a different moment each round.
            first_acked.recv_timeout(Duration::from_secs(10)).expect("the child acknowledges a write");
            std::thread::sleep(Duration::from_millis(100 + 50 * round));
            child.kill().unwrap();
            child.wait().unwrap();
            let acked = reader.join().unwrap();

            let contents = reopen(dir.path());
            let missing: Vec<_> = acked.iter().filter(|key| !contents.contains_key(*key)).collect();
            assert!(
                missing.is_empty(),
                "round {round}: {} of {} acknowledged keys lost: {missing:?}",
                missing.len(),
                acked.len()
            );
            println!("round {round}: {} acknowledged keys all present after kill -9", acked.len());
        }
        assert!(dir.path().join(SNAPSHOT_FILE).exists(), "the child compacted at least once");
    }
}
