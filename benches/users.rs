//! What a user costs the server: authentication (the password's hash to its user and a
//! session seat) with 1, 1,000 and 100,000 users, which should not grow with the count,
//! and the memory 100,000 users take, printed as bytes per user.
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

criterion_group!(benches, memory_per_user, authenticate);
criterion_main!(benches);
