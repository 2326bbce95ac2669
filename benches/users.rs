//! What a user costs the server: authentication (the password's hash to its user and a
//! session seat) with 1, 1,000 and 100,000 users, which should not grow with the count,
//! the memory 100,000 users take, printed as bytes per user, and a panel's list of 100,000
//! users parsed and applied (CPU seconds, and the pause it puts on authentication).
//!
//! Memory is the allocator's resident growth (jemalloc, as the binaries use) across building
//! the users, measured from `/proc/self/statm`; it includes the maps that index them. It is
//! measured first: once the authentication benches have built and dropped 100,000 users, the
//! allocator reuses their pages and the growth reads far too low (under 100 bytes per user).

use std::hint::black_box;
use std::net::IpAddr;

use anytls_rs::proto::PasswordHash;
use anytls_rs::server::users::{Plan, UserEntry, Users};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn entries(n: usize) -> Vec<UserEntry> {
    (0..n).map(|i| UserEntry::new(&format!("user{i:06}"), &format!("password-{i}"), Plan::default())).collect()
}

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    pages * 4096
}

fn authenticate(c: &mut Criterion) {
    let mut group = c.benchmark_group("authenticate");
    let ip = IpAddr::from([127, 0, 0, 2]);
    for n in [1usize, 1_000, 100_000] {
        let users = Users::new(entries(n)).unwrap();
        let hash = PasswordHash::of(&format!("password-{}", n - 1));
        let now = jiff::Timestamp::now();
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| drop(black_box(users.admit(hash.as_bytes(), ip, now).ok())))
        });
    }
    group.finish();
}

fn memory_per_user(_: &mut Criterion) {
    let n = 100_000;
    let before = resident_bytes();
    let users = Users::new(entries(n)).unwrap();
    let after = resident_bytes();
    println!(
        "memory: {n} users take {} MiB resident, {} bytes per user (name, password, plan, counters, maps)",
        (after - before) >> 20,
        (after - before) / n as u64
    );
    black_box(users);
}

/// CPU seconds of this thread (the work itself, whatever else the machine runs).
fn thread_cpu() -> f64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid pointer to a timespec, and a clock every Linux has.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    now.tv_sec as f64 + now.tv_nsec as f64 / 1e9
}

/// A panel's `GET …/user` answer with `n` users, `changed` of them with a new password.
fn panel_list(n: usize, changed: usize) -> Vec<u8> {
    let users: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            let uuid = if i < changed { format!("changed-{i}") } else { format!("uuid-{i:06}-0000-4000-8000-000000000000") };
            serde_json::json!({"id": i + 1, "uuid": uuid, "speed_limit": if i % 3 == 0 { serde_json::json!(100) } else { serde_json::Value::Null }, "device_limit": 3})
        })
        .collect();
    serde_json::to_vec(&serde_json::json!({ "users": users })).unwrap()
}

/// A panel list of 100,000 users: parse and apply, first all new, then unchanged, then with
/// 1,000 changed; and the longest authentication seen by another thread meanwhile (the pause
/// a sync puts on handshakes).
fn panel_sync(_: &mut Criterion) {
    use anytls_rs::fleet::uniproxy::{PanelUser, parse_users};
    let n = 100_000;
    let users = std::sync::Arc::new(Users::managed(Vec::new()).unwrap());
    let before = resident_bytes();
    for (what, changed) in [("all new", 0), ("unchanged", 0), ("1,000 changed", 1_000)] {
        let body = panel_list(n, changed);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watcher = {
            let (users, stop) = (users.clone(), stop.clone());
            std::thread::spawn(move || {
                let hash = PasswordHash::of(&format!("uuid-{:06}-0000-4000-8000-000000000000", n - 1));
                let ip = IpAddr::from([127, 0, 0, 2]);
                let mut longest = std::time::Duration::ZERO;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let started = std::time::Instant::now();
                    drop(black_box(users.admit(hash.as_bytes(), ip, jiff::Timestamp::now()).ok()));
                    longest = longest.max(started.elapsed());
                }
                longest
            })
        };
        let (cpu, wall) = (thread_cpu(), std::time::Instant::now());
        let parsed = parse_users(&body).unwrap();
        let parse_cpu = thread_cpu() - cpu;
        let summary = users.replace_from_panel(parsed.iter().map(PanelUser::entry).collect());
        let (all_cpu, took) = (thread_cpu() - cpu, wall.elapsed());
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let longest = watcher.join().unwrap();
        println!(
            "panel list of {n} users, {what}: parse {parse_cpu:.3} s CPU, parse + apply {all_cpu:.3} s CPU ({took:.2?} wall; \
             {} added, {} kept), the longest authentication meanwhile {longest:.2?}",
            summary.added.len(),
            summary.kept
        );
    }
    let after = resident_bytes();
    println!("memory: {n} panel users take {} bytes each", (after - before) / n as u64);
}

criterion_group!(benches, memory_per_user, panel_sync, authenticate);
criterion_main!(benches);
