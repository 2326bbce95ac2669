//! The server's acquire path on each pool engine: from 1, 2 and 8 threads, on one hot
//! target, over 1,000 targets, and with churn over 100,000 distinct targets (every acquire a
//! new key), plus the time to insert 100,000 new keys.
//!
//! One "acquire" is what `OutboundPool::acquire` does around the socket, with a `u64` in the
//! place of the TCP connection: one `checkout` (key lookup, the target's state and a warm
//! take), the demand and limit bookkeeping on the target's atomics, then the refill's give of
//! a fresh warm entry. [`Target`] here mirrors the server's per-target state field for field
//! (managed count, counters, and the server's own `WarmDemand` for the demand bookkeeping);
//! only the dial and the liveness check (syscalls) are left out.
//!
//! **Time is CPU time, not wall time**: the process's CPU time over the timed region (all
//! worker threads together), so that other jobs on a loaded machine do not inflate it, and
//! so that a contended engine pays for its retries, spinning and futex calls. Criterion's
//! "elements" are acquires summed over all threads, so elem/s is acquires per CPU-second,
//! and the time per element is the CPU cost of one acquire. Thread start-up is kept out of
//! the timing by a barrier.
//!
//! `refill_handoff` prices how the server starts a refill after a warm take: a task spawned
//! per refill (what it does) against a message to one long-lived refill worker, beside the
//! loopback dial (connect, accept, close) that every refill then makes. `outbound_refill`
//! times the server's own `OutboundPool::acquire` on a warm target over loopback, refill
//! included: one target served warm after another, and 64 targets taken at once.
//!
//! The bench allocates with jemalloc, as both binaries do: a `give` in `lockfree` and
//! `highperf` allocates a node, and that cost is the production allocator's.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use anytls_rs::pool::{Idle, IdlePool, KeyCounters, PoolSettings, PoolType, new_pool, reserve_slot};
use anytls_rs::proto::Address;
use anytls_rs::server::dial::Dialer;
use anytls_rs::server::outbound_pool::{OutboundPool, OutboundSettings, WarmDemand};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const ENGINES: [PoolType; 3] = [PoolType::Lock, PoolType::LockFree, PoolType::HighPerf];
const THREADS: [usize; 3] = [1, 2, 8];
const CHURN_KEYS: u32 = 100_000;
const MAX_PER_TARGET: u64 = 100;
const WINDOW_MS: u64 = 300_000;
const WARM_AFTER_MS: u64 = 1000;
/// The server's default `--min-idle-connections`: the largest warm set.
const MIN_IDLE: u64 = 5;

/// The server's per-target state (`server::outbound_pool::Target`), field for field; its
/// demand bookkeeping is the server's own [`WarmDemand`].
#[derive(Default)]
struct Target {
    managed: AtomicU64,
    warm: AtomicU64,
    demand: WarmDemand,
    refilling: AtomicBool,
    counters: KeyCounters,
}

type Engine = Arc<dyn IdlePool<Address, Target, u64>>;
/// Picks the next key's index: (generator, key count, acquire number).
type Pick = fn(&mut u64, usize, u64) -> usize;

/// CPU time the whole process has used so far.
fn process_cpu_time() -> Duration {
    // SAFETY: clock_gettime only writes the timespec it is given.
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn settings() -> PoolSettings {
    PoolSettings {
        max_idle_per_key: 5,
        max_idle_total: 1_000_000,
        max_idle_time: Duration::from_secs(3600),
        max_lifetime: Duration::from_secs(3600),
    }
}

fn target(i: u32) -> Address {
    let ip = Ipv4Addr::from(0x0A00_0000 | i);
    Address::socket(SocketAddr::new(IpAddr::V4(ip), 443))
}

/// One acquire: lookup + warm take, demand and limit bookkeeping, the stream's end, and the
/// refill's give of a fresh warm entry.
fn acquire(engine: &dyn IdlePool<Address, Target, u64>, address: &Address, now_ms: u64) {
    let (target, found) = engine.checkout(address, Instant::now());
    target.demand.record_stream(now_ms, WINDOW_MS, WARM_AFTER_MS, MIN_IDLE, found.is_some());
    match found {
        Some(entry) => {
            black_box(entry.value);
            KeyCounters::bump(&target.counters.reused);
            target.warm.fetch_sub(1, Ordering::Relaxed);
        }
        None => {
            let pooled = reserve_slot(&target.managed, MAX_PER_TARGET);
            KeyCounters::bump(if pooled { &target.counters.created } else { &target.counters.unpooled });
        }
    }
    KeyCounters::bump(&target.counters.active);
    // The stream ends: its connection is closed, its place freed.
    KeyCounters::drop_one(&target.counters.active);
    target.demand.record_end();
    target.managed.fetch_sub(1, Ordering::Relaxed);
    // The refill: a warm entry takes a place and goes into the pool.
    if !target.refilling.load(Ordering::Relaxed) && reserve_slot(&target.managed, MAX_PER_TARGET) {
        target.warm.fetch_add(1, Ordering::Relaxed);
        KeyCounters::bump(&target.counters.warmed);
        if engine.give(address, Idle::new(now_ms)).is_err() {
            target.warm.fetch_sub(1, Ordering::Relaxed);
            target.managed.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// `iters` acquires on each of `threads` threads, each picking from `keys` with its own
/// generator; returns the CPU time all of them used.
fn run(
    engine: &Engine,
    keys: &[Address],
    threads: usize,
    iters: u64,
    pick: fn(&mut u64, usize, u64) -> usize,
) -> Duration {
    let start_line = Barrier::new(threads + 1);
    thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let start_line = &start_line;
                s.spawn(move || {
                    let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ (t as u64 + 1);
                    start_line.wait();
                    for i in 0..iters {
                        let key = &keys[pick(&mut rng, keys.len(), i * threads as u64 + t as u64)];
                        acquire(&**engine, key, i);
                    }
                })
            })
            .collect();
        start_line.wait();
        let started = process_cpu_time();
        for worker in workers {
            worker.join().expect("bench worker panicked");
        }
        process_cpu_time() - started
    })
}

fn random(rng: &mut u64, len: usize, _: u64) -> usize {
    *rng ^= *rng << 13;
    *rng ^= *rng >> 7;
    *rng ^= *rng << 17;
    (*rng % len as u64) as usize
}

/// Walks the keys in order: with 100,000 keys and a pool forgotten between samples, almost
/// every acquire meets a key not seen before.
fn sequential(_: &mut u64, len: usize, i: u64) -> usize {
    (i % len as u64) as usize
}

fn acquire_path(c: &mut Criterion) {
    let hot = vec![target(1)];
    let thousand: Vec<Address> = (0..1000).map(target).collect();
    let churn: Vec<Address> = (0..CHURN_KEYS).map(target).collect();
    let workloads: [(&str, &[Address], Pick); 3] = [
        ("acquire_hot_key", &hot, random),
        ("acquire_1000_keys", &thousand, random),
        ("acquire_churn_100k", &churn, sequential),
    ];
    for (name, keys, pick) in workloads {
        let mut group = c.benchmark_group(name);
        group.measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500)).sample_size(10);
        for threads in THREADS {
            group.throughput(Throughput::Elements(threads as u64));
            for kind in ENGINES {
                let engine: Engine = new_pool(kind, settings());
                group.bench_with_input(BenchmarkId::new(kind.name(), threads), &threads, |b, &threads| {
                    b.iter_custom(|iters| {
                        if name == "acquire_churn_100k" {
                            // Keys quiet and empty are forgotten between samples, as the
                            // server's maintenance does, so the churn keeps meeting new keys.
                            engine.drain();
                            engine.forget_where(&|_| true);
                        }
                        run(&engine, keys, threads, iters, pick)
                    })
                });
            }
        }
        group.finish();
    }
}

/// 100,000 new keys into an empty pool, one thread: one iteration inserts them all.
fn insert_100k_keys(c: &mut Criterion) {
    let keys: Vec<Address> = (0..CHURN_KEYS).map(target).collect();
    let mut group = c.benchmark_group("insert_100k_keys");
    group.measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_millis(500)).sample_size(10);
    group.throughput(Throughput::Elements(u64::from(CHURN_KEYS)));
    for kind in ENGINES {
        group.bench_function(kind.name(), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let engine: Engine = new_pool(kind, settings());
                    let started = process_cpu_time();
                    for key in &keys {
                        black_box(engine.state(key));
                    }
                    total += process_cpu_time() - started;
                    assert_eq!(engine.key_count(), keys.len());
                }
                total
            })
        });
    }
    group.finish();
}

/// What handing a refill to the runtime costs, next to the dial the refill makes: a task
/// spawned per refill (it clones the target's address and state, as the server's does)
/// against a message to one worker task, and a loopback connect + accept + close.
fn refill_handoff(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let address = Address::domain("www.example.com", 443);
    let state = Arc::new(Target::default());
    let mut group = c.benchmark_group("refill_handoff");
    group.measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500)).sample_size(10);
    group.throughput(Throughput::Elements(1));
    group.bench_function("spawn_per_refill", |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let done = Arc::new(tokio::sync::Semaphore::new(0));
                let started = process_cpu_time();
                for _ in 0..iters {
                    let (address, state, done) = (address.clone(), state.clone(), done.clone());
                    tokio::spawn(async move {
                        black_box((&address, &state));
                        done.add_permits(1);
                    });
                }
                drop(done.acquire_many(iters as u32).await.unwrap());
                process_cpu_time() - started
            })
        })
    });
    group.bench_function("message_to_worker", |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let (refills, queue) = flume::unbounded::<(Address, Arc<Target>)>();
                let done = Arc::new(tokio::sync::Semaphore::new(0));
                let worker_done = done.clone();
                let worker = tokio::spawn(async move {
                    while let Ok(refill) = queue.recv_async().await {
                        black_box(refill);
                        worker_done.add_permits(1);
                    }
                });
                let started = process_cpu_time();
                for _ in 0..iters {
                    refills.send((address.clone(), state.clone())).unwrap();
                }
                drop(done.acquire_many(iters as u32).await.unwrap());
                let used = process_cpu_time() - started;
                drop(refills);
                worker.await.unwrap();
                used
            })
        })
    });
    group.bench_function("loopback_dial", |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let target = listener.local_addr().unwrap();
                let acceptor = tokio::spawn(async move {
                    for _ in 0..iters {
                        drop(listener.accept().await.unwrap());
                    }
                });
                let started = process_cpu_time();
                for _ in 0..iters {
                    drop(tokio::net::TcpStream::connect(target).await.unwrap());
                }
                acceptor.await.unwrap();
                process_cpu_time() - started
            })
        })
    });
    group.finish();
}

/// A loopback target on every 127.0.0.x that keeps the connections it accepted open until
/// newer ones push them out (a warm connection the target closed is never handed out);
/// the port it listens on.
async fn keeping_target() -> u16 {
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut kept = std::collections::VecDeque::new();
        while let Ok((tcp, _)) = listener.accept().await {
            if kept.len() == 512 {
                kept.pop_front();
            }
            kept.push_back(tcp);
        }
    });
    port
}

/// Until every target has its warm connection back.
async fn refilled(pool: &OutboundPool, targets: &[Address]) {
    while targets.iter().any(|target| pool.idle_count(target) == 0) {
        tokio::task::yield_now().await;
    }
}

/// The server's acquire from a warm pool and the refill it starts, over loopback: per
/// iteration, every target is taken warm at once, the streams end, and the refills dial
/// replacements. One target is the sequential case, 64 a burst over many targets.
fn outbound_refill(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut group = c.benchmark_group("outbound_refill");
    group.measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_millis(500)).sample_size(10);
    for count in [1u8, 64] {
        let (pool, targets) = runtime.block_on(async {
            let port = keeping_target().await;
            let settings = OutboundSettings {
                // An engine whose idle count is never ahead of what a take finds (lockfree
                // counts a give just before its entry is pushed), so "refilled" means ready.
                pool_type: PoolType::Lock,
                max_per_target: 100,
                min_idle: 1,
                max_idle_total: 1000,
                max_idle_time: Duration::from_secs(3600),
                max_lifetime: Duration::from_secs(3600),
                warm_after: Duration::ZERO,
            };
            let dialer = Dialer {
                connect_timeout: Duration::from_secs(5),
                keepalive: Default::default(),
                strategy: Default::default(),
                resolver: Default::default(),
            };
            let pool = OutboundPool::new(settings, dialer);
            let targets: Vec<Address> = (1..=count)
                .map(|i| Address::socket(SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, i)), port)))
                .collect();
            for target in &targets {
                // Two streams make repeated demand: the target is warmed from then on.
                for _ in 0..2 {
                    drop(pool.acquire(target, pool.names().own()).await.unwrap());
                }
            }
            refilled(&pool, &targets).await;
            (pool, targets)
        });
        group.throughput(Throughput::Elements(u64::from(count)));
        group.bench_function(BenchmarkId::new("targets", count), |b| {
            b.iter_custom(|iters| {
                runtime.block_on(async {
                    let started = process_cpu_time();
                    for _ in 0..iters {
                        let takes = targets.iter().map(|target| pool.acquire(target, pool.names().own()));
                        for outbound in futures_util::future::join_all(takes).await {
                            assert!(outbound.unwrap().reused, "served warm");
                        }
                        refilled(&pool, &targets).await;
                    }
                    process_cpu_time() - started
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, insert_100k_keys, acquire_path, refill_handoff, outbound_refill);
criterion_main!(benches);
