//! Throughput of the pool engines: take+give pairs (one connection reused and parked again)
//! from 1, 2, 4 and 8 threads, on one hot key and spread over 1,000 keys.
//!
//! Criterion's "elements" are pairs: each iteration is one pair on every thread, so the
//! reported elem/s is pairs per second across all threads. Thread start-up is kept out of the
//! timing by a barrier. Times are short so the whole run fits in a few minutes on 2 cores.

use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use anytls_rs::pool::{Idle, IdlePool, PoolKey, PoolSettings, PoolType, new_pool};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

const ENGINES: [PoolType; 3] = [PoolType::Lock, PoolType::LockFree, PoolType::HighPerf];
const THREADS: [usize; 4] = [1, 2, 4, 8];
/// Entries parked per key before timing, so that a take usually finds one.
const PREFILL_PER_KEY: u64 = 16;

fn settings() -> PoolSettings {
    PoolSettings {
        max_idle_per_key: 64,
        max_idle_total: 100_000,
        max_idle_time: Duration::from_secs(3600),
        max_lifetime: Duration::from_secs(3600),
    }
}

fn prefilled(kind: PoolType, keys: &[PoolKey]) -> Arc<dyn IdlePool<u64>> {
    let pool = new_pool(kind, settings());
    for key in keys {
        for id in 0..PREFILL_PER_KEY {
            pool.give(key, Idle::new(id)).expect("prefill fits the caps");
        }
    }
    pool
}

/// Runs `iters` take+give pairs on each of `threads` threads and times them together.
fn run_pairs(pool: &dyn IdlePool<u64>, keys: &[PoolKey], threads: usize, iters: u64) -> Duration {
    let start_line = Barrier::new(threads + 1);
    thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let start_line = &start_line;
                s.spawn(move || {
                    let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ (t as u64 + 1);
                    start_line.wait();
                    for _ in 0..iters {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        let key = &keys[(rng % keys.len() as u64) as usize];
                        // A miss stands for a fresh dial; either way one entry goes back.
                        let entry = pool.take(key).unwrap_or_else(|| Idle::new(0));
                        black_box(pool.give(key, entry).is_ok());
                    }
                })
            })
            .collect();
        start_line.wait();
        let started = Instant::now();
        for worker in workers {
            worker.join().expect("bench worker panicked");
        }
        started.elapsed()
    })
}

fn take_give_pairs(c: &mut Criterion) {
    let workloads = [
        ("hot_key", vec![PoolKey::from("example.com:443")]),
        ("1000_keys", (0..1000).map(|i| PoolKey::from(format!("10.0.{}.{}:443", i / 256, i % 256))).collect()),
    ];
    for (name, keys) in &workloads {
        let mut group = c.benchmark_group(*name);
        group.measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500)).sample_size(10);
        for threads in THREADS {
            group.throughput(Throughput::Elements(threads as u64));
            for kind in ENGINES {
                let pool = prefilled(kind, keys);
                group.bench_with_input(BenchmarkId::new(kind.name(), threads), &threads, |b, &threads| {
                    b.iter_custom(|iters| run_pairs(&*pool, keys, threads, iters))
                });
            }
        }
        group.finish();
    }
}

criterion_group!(benches, take_give_pairs);
criterion_main!(benches);
