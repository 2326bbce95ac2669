//! End-to-end runs of `anytls-bench` with small numbers: direct against its
//! in-process targets, and once through our own server/client pair.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{OnceLock, mpsc};
use std::time::Duration;

const BENCH: &str = env!("CARGO_BIN_EXE_anytls-bench");
const PRODUCT_BINS: [&str; 2] = ["anytls-server", "anytls-client"];

/// The path of the product binary `name` (`anytls-server` or `anytls-client`).
///
/// Cargo only tells a test where its own package's binaries are, so the product's are
/// looked for beside the bench binary (same target dir and profile). `cargo test
/// --workspace` has built them there already; `cargo test -p anytls-bench` from a clean
/// checkout has not, so then they are built once with the same profile.
fn product_bin(name: &str) -> PathBuf {
    static PRODUCT_DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = PRODUCT_DIR.get_or_init(|| {
        let dir = Path::new(BENCH).parent().expect("the bench binary lies in a directory").to_path_buf();
        if PRODUCT_BINS.iter().any(|bin| !dir.join(bin).exists()) {
            build_product_bins(&dir);
        }
        dir
    });
    let path = dir.join(name);
    assert!(path.exists(), "{} missing after building the product binaries", path.display());
    path
}

/// `cargo build -p anytls-rs --bins` into the target dir and profile `bin_dir` belongs to
/// (`<target dir>/debug` is the `dev` profile, `<target dir>/<name>` the profile `name`).
fn build_product_bins(bin_dir: &Path) {
    let profile_dir = bin_dir.file_name().and_then(|name| name.to_str()).expect("a profile directory");
    let profile = if profile_dir == "debug" { "dev" } else { profile_dir };
    let target_dir = bin_dir.parent().expect("the profile directory lies in the target dir");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.toml");
    let status = Command::new(cargo)
        .args(["build", "-p", "anytls-rs", "--bins", "--profile", profile, "--manifest-path"])
        .arg(&workspace)
        .arg("--target-dir")
        .arg(target_dir)
        .status()
        .expect("run cargo build for the product binaries");
    assert!(status.success(), "cargo build -p anytls-rs --bins --profile {profile} failed: {status}");
}

/// Runs anytls-bench with `--json --max-seconds 20`; returns (exit ok, stdout).
fn bench(args: &[&str]) -> (bool, String) {
    let out =
        Command::new(BENCH).args(args).args(["--json", "--max-seconds", "20"]).output().expect("run anytls-bench");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(stdout.starts_with('{') && stdout.trim_end().ends_with('}'), "not one JSON object: {stdout:?}");
    assert_eq!(stdout.trim_end().lines().count(), 1, "more than one line: {stdout:?}");
    (out.status.success(), stdout)
}

/// The number after `"key":` in a flat JSON text (first occurrence).
fn number(json: &str, key: &str) -> f64 {
    let at = json.find(&format!("\"{key}\":")).unwrap_or_else(|| panic!("no {key} in {json}")) + key.len() + 3;
    let end = json[at..].find([',', '}']).expect("value end") + at;
    json[at..end].parse().unwrap_or_else(|_| panic!("{key} is not a number in {json}"))
}

#[test]
fn rr_direct_answers_every_request() {
    let (ok, json) = bench(&["rr", "--direct", "--requests", "200", "--concurrency", "8", "--size", "3000"]);
    assert!(ok, "{json}");
    assert_eq!(number(&json, "ok"), 200.0);
    assert_eq!(number(&json, "failed"), 0.0);
    assert!(number(&json, "streams_per_sec") > 0.0);
    let (p50, p99, max) = (number(&json, "p50"), number(&json, "p99"), number(&json, "max"));
    assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{json}");
}

#[test]
fn bulk_direct_moves_every_byte_both_ways() {
    let (ok, json) = bench(&["bulk", "--direct", "--bytes", "8M", "--streams", "3"]);
    assert!(ok, "{json}");
    // download and upload each report all 8 MiB (first "bytes" is the request).
    assert_eq!(json.matches(&format!("\"bytes\":{}", 8 << 20)).count(), 3, "{json}");
    assert!(number(&json, "gbit_per_sec") > 0.0);
    assert_eq!(number(&json, "failed"), 0.0);
}

#[test]
fn hold_direct_keeps_streams_open() {
    let (ok, json) = bench(&["hold", "--direct", "--streams", "20", "--seconds", "1", "--interval-ms", "100"]);
    assert!(ok, "{json}");
    assert_eq!(number(&json, "opened"), 20.0);
    assert!(number(&json, "echoes") >= 20.0, "{json}");
}

#[test]
fn rr_to_a_dead_proxy_fails_cleanly() {
    // Port 1 on loopback: nothing listens, every connect is refused at once.
    let (ok, json) = bench(&["rr", "--socks", "127.0.0.1:1", "--requests", "5", "--concurrency", "2"]);
    assert!(!ok);
    assert_eq!(number(&json, "failed"), 5.0);
    assert!(json.contains("first_error"), "{json}");
}

/// A child process killed when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a binary and waits (≤ 10 s) for a stderr line containing `marker`;
/// returns the process and the text after the marker on every line until then.
fn start_and_wait(bin: &Path, args: &[&str], markers: &[&str]) -> (Running, Vec<String>) {
    let mut child =
        Command::new(bin).args(args).stderr(Stdio::piped()).stdout(Stdio::null()).spawn().expect("start binary");
    let stderr = child.stderr.take().expect("stderr");
    let running = Running(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                // Keep draining so the child never blocks on a full pipe.
                continue;
            }
        }
    });
    let mut found = Vec::new();
    for marker in markers {
        loop {
            let line =
                rx.recv_timeout(Duration::from_secs(10)).unwrap_or_else(|_| panic!("{}: no {marker:?}", bin.display()));
            if let Some(at) = line.find(marker) {
                found.push(line[at + marker.len()..].to_string());
                break;
            }
        }
    }
    (running, found)
}

#[test]
fn rr_and_bulk_through_our_pair() {
    let (_server, found) = start_and_wait(
        &product_bin("anytls-server"),
        &["-l", "127.0.0.1:0", "-p", "bench-pass"],
        &["SHA-256 fingerprint ", "listening on "],
    );
    let fingerprint = found[0].trim().to_string();
    let server_addr = found[1].split_whitespace().next().expect("address").to_string();
    let (_client, found) = start_and_wait(
        &product_bin("anytls-client"),
        &[
            "-l",
            "127.0.0.1:0",
            "-s",
            &server_addr,
            "-p",
            "bench-pass",
            "--sni",
            "localhost",
            "--pin-sha256",
            &fingerprint,
        ],
        &["proxy on "],
    );
    let socks = found[0].split([',', ' ']).next().expect("address").to_string();

    let (ok, json) = bench(&["rr", "--socks", &socks, "--requests", "50", "--concurrency", "4", "--size", "2000"]);
    assert!(ok, "{json}");
    assert_eq!(number(&json, "ok"), 50.0);
    let (ok, json) = bench(&["bulk", "--socks", &socks, "--bytes", "4M", "--streams", "2"]);
    assert!(ok, "{json}");
    assert_eq!(number(&json, "failed"), 0.0);
}
