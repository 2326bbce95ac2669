//! Route rules at scale: a rule set of 1,000,000 domains (one a line, as the community
//! lists are written) loaded into one `[[route]]` rule, and one decision on a name it
//! holds (a subdomain of a listed suffix), on a name it does not, and on an address.
//! Printed first: how long the load took (median of 3) and the set's size. Run under
//! `cargo test` (no `--bench`) it loads 10,000 domains, to check that it runs.

use std::hint::black_box;
use std::io::Write;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use anytls_rs::server::route::spec::{RuleSpec, compile};
use anytls_rs::server::route::{Action, Network, Query, RouteCounters, Routes};
use criterion::{Criterion, criterion_group, criterion_main};

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn domain(i: usize) -> String {
    format!("host{i}.zone{}.example", i % 997)
}

fn load(path: &std::path::Path) -> (Routes, Duration) {
    let spec: RuleSpec = serde_json::from_value(serde_json::json!({
        "name": "big-list", "rule-set": path, "action": "block"
    }))
    .expect("a rule");
    let started = Instant::now();
    let routes = compile(&[spec], &RouteCounters::default()).expect("the list loads");
    (routes, started.elapsed())
}

fn bench_routes(c: &mut Criterion) {
    let full = std::env::args().any(|arg| arg == "--bench");
    let count = if full { 1_000_000 } else { 10_000 };
    let path = std::env::temp_dir().join(format!("anytls-route-bench-{}.txt", std::process::id()));
    let mut file = std::io::BufWriter::new(std::fs::File::create(&path).expect("temp file"));
    for i in 0..count {
        writeln!(file, "{}", domain(i)).unwrap();
    }
    file.flush().unwrap();
    drop(file);
    let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);

    let mut took: Vec<Duration> = Vec::new();
    let mut routes = None;
    for _ in 0..3 {
        let (loaded, elapsed) = load(&path);
        took.push(elapsed);
        routes = Some(loaded);
    }
    took.sort();
    println!(
        "route: loaded {count} domain rules ({:.1} MB file) in {:.3} s (median of 3: {:?})",
        bytes as f64 / 1e6,
        took[1].as_secs_f64(),
        took
    );
    let _ = std::fs::remove_file(&path);
    let routes = routes.unwrap();

    let hit = format!("cdn.a.{}", domain(count / 2));
    let listed = routes.decide(&query(Some(&hit), &[]));
    assert_eq!(listed.action, Action::Block, "{hit} is under a listed domain");
    let miss = "cdn.a.host1.zone2.example.org";
    assert_eq!(routes.decide(&query(Some(miss), &[])).action, Action::Direct);
    let address: [IpAddr; 1] = ["192.0.2.1".parse().unwrap()];

    let mut group = c.benchmark_group(format!("route {count} domains"));
    group
        .bench_function("decide: listed (subdomain)", |b| b.iter(|| routes.decide(black_box(&query(Some(&hit), &[])))));
    group.bench_function("decide: not listed (5 labels)", |b| {
        b.iter(|| routes.decide(black_box(&query(Some(miss), &[]))))
    });
    group.bench_function("decide: an address", |b| b.iter(|| routes.decide(black_box(&query(None, &address)))));
    group.finish();
}

fn query<'a>(name: Option<&'a str>, addresses: &'a [IpAddr]) -> Query<'a> {
    Query { name, addresses, port: 443, network: Network::Tcp, user: "alice" }
}

criterion_group!(benches, bench_routes);
criterion_main!(benches);
