//! The warm refill: after a stream takes a target's warm connection (or starts while the
//! target's warm set is short), a background dial brings the set back to its size, one
//! refill per target at a time, within the target's limit and the global warm cap.
//!
//! Refills go to one worker task per pool over a bounded channel instead of a task each:
//! the worker runs the refills of all targets concurrently (as separate tasks would), and
//! a refill that finds the channel full is spawned as its own task and counted, so a take
//! never waits and no refill is lost. The worker holds the pool only weakly: when the last
//! clone of the pool is dropped and its refills in flight have ended, the channel closes
//! and the worker ends with it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;

use super::{Inner, Target, WarmConnection, WarmTicket};
use crate::pool::{Idle, KeyCounters, reserve_slot};
use crate::proto::Address;

/// Refills waiting for the worker at most; one more is spawned as its own task.
const REFILL_QUEUE: usize = 1024;

type Refill = (Address, Arc<Target>);

/// The pool's end of the refill worker.
pub(super) struct RefillQueue {
    sender: flume::Sender<Refill>,
    /// The worker's end until the first refill starts the worker: the pool may be built
    /// before the runtime it will run on.
    receiver: Mutex<Option<flume::Receiver<Refill>>>,
    started: AtomicBool,
    /// Refills spawned as their own task because the channel was full.
    overflowed: AtomicU64,
}

impl Default for RefillQueue {
    fn default() -> RefillQueue {
        let (sender, receiver) = flume::bounded(REFILL_QUEUE);
        RefillQueue {
            sender,
            receiver: Mutex::new(Some(receiver)),
            started: AtomicBool::new(false),
            overflowed: AtomicU64::new(0),
        }
    }
}

impl RefillQueue {
    /// Refills that found the channel full and ran as their own task.
    pub(super) fn overflowed(&self) -> u64 {
        self.overflowed.load(Ordering::Relaxed)
    }
}

impl Inner {
    /// Starts a background refill of `address`'s warm connections unless one is running.
    pub(super) fn refill_soon(self: &Arc<Self>, address: &Address, target: &Arc<Target>) {
        if target.warm.load(Ordering::Relaxed) >= self.warm_goal(target) {
            return;
        }
        if target.refilling.swap(true, Ordering::AcqRel) {
            return;
        }
        self.start_refill_worker();
        if let Err(err) = self.refills.sender.try_send((address.clone(), target.clone())) {
            // Full (or, were the worker gone, disconnected): the refill runs on its own.
            self.refills.overflowed.fetch_add(1, Ordering::Relaxed);
            let (address, target) = err.into_inner();
            tokio::spawn(refill_then_release(self.clone(), address, target));
        }
    }

    fn start_refill_worker(self: &Arc<Self>) {
        if self.refills.started.load(Ordering::Acquire) {
            return;
        }
        if let Some(queue) = self.refills.receiver.lock().unwrap_or_else(|e| e.into_inner()).take() {
            self.refills.started.store(true, Ordering::Release);
            tokio::spawn(refill_worker(Arc::downgrade(self), queue));
        }
    }

    async fn refill(&self, address: &Address, target: &Arc<Target>) {
        while target.warm.load(Ordering::Relaxed) < self.warm_goal(target) {
            // A warm dial takes a place under the target's limit and under the global cap
            // before it starts, so dials in flight count against both.
            if !reserve_slot(&target.managed, self.settings.max_per_target as u64) {
                return;
            }
            if !reserve_slot(&self.shared.warm, self.settings.max_idle_total as u64) {
                target.managed.fetch_sub(1, Ordering::Relaxed);
                return;
            }
            let mut ticket = WarmTicket::new(target, &self.shared);
            match self.dialer.connect_with(address, Some((&self.names, self.names.own()))).await {
                Ok(tcp) => {
                    ticket.dialed = true;
                    self.shared.counters.record_warmed();
                    KeyCounters::bump(&target.counters.warmed);
                    KeyCounters::bump(&target.counters.created);
                    if self.idle.give(address, Idle::new(WarmConnection { tcp, ticket })).is_err() {
                        return; // the per-target idle cap is reached
                    }
                }
                Err(err) => {
                    drop(ticket); // gives back both places; nothing was dialed
                    log::debug!("warming {address}: {err}");
                    return;
                }
            }
        }
    }
}

/// Runs one target's refill, then lets the next take start another.
async fn refill_then_release(pool: Arc<Inner>, address: Address, target: Arc<Target>) {
    pool.refill(&address, &target).await;
    target.refilling.store(false, Ordering::Release);
}

/// Runs the refills sent to it, all at once, until the pool is gone. A refill in flight
/// holds the pool (and with it the channel's sender), so the channel closes only once the
/// pool is dropped and nothing of it is left running.
async fn refill_worker(pool: Weak<Inner>, queue: flume::Receiver<Refill>) {
    let mut running = FuturesUnordered::new();
    loop {
        tokio::select! {
            refill = queue.recv_async() => match refill {
                Ok((address, target)) => match pool.upgrade() {
                    Some(pool) => running.push(refill_then_release(pool, address, target)),
                    None => continue, // sent just before the pool went away
                },
                Err(_) => break,
            },
            Some(()) = running.next(), if !running.is_empty() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{holding_target, pool, settings, wait_until};
    use super::*;
    use crate::pool::PoolType;
    use std::net::SocketAddr;
    use std::time::{Duration, Instant};
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn warm_connections_in_all_never_exceed_the_total_cap_even_while_dialing() {
        let mut capped = settings(PoolType::HighPerf, 10, 5);
        capped.max_idle_total = 3;
        let pool = pool(capped);
        let mut targets = Vec::new();
        for _ in 0..4 {
            let (address, held) = holding_target().await;
            // Six streams each: every target would like five warm connections.
            for _ in 0..6 {
                drop(pool.acquire(&address, pool.names().own()).await.unwrap());
                assert!(pool.warm_now() <= 3, "warm connections (idle or dialing) over the cap");
            }
            targets.push((address, held));
        }
        let deadline = Instant::now() + Duration::from_millis(300);
        while Instant::now() < deadline {
            assert!(pool.warm_now() <= 3, "warm connections (idle or dialing) over the cap");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let idle: usize = targets.iter().map(|(address, _)| pool.idle_count(address)).sum();
        assert_eq!((idle, pool.warm_now()), (3, 3));
    }

    #[tokio::test]
    async fn a_dropped_pool_leaves_no_refill_task_behind() {
        let (address, held) = holding_target().await;
        let tasks = || tokio::runtime::Handle::current().metrics().num_alive_tasks();
        let before = tasks();
        let pool = pool(settings(PoolType::LockFree, 10, 2));
        pool.warm_up(&address);
        wait_until("warm connections", || pool.idle_count(&address) == 2).await;
        // A take starts a refill; the pool goes away while it may still be dialing.
        let outbound = pool.acquire(&address, pool.names().own()).await.unwrap();
        assert!(outbound.reused);
        drop((outbound, pool));
        wait_until("every refill task to end", || tasks() == before).await;
        assert!(held.lock().unwrap().len() >= 2, "the warm dials reached the target");
    }

    #[tokio::test]
    async fn refills_beyond_the_queue_run_on_their_own_and_all_end() {
        // A port nothing listens on, on many loopback addresses: every warm dial is refused.
        let port = TcpListener::bind("0.0.0.0:0").await.unwrap().local_addr().unwrap().port();
        let targets: Vec<Address> = (0..REFILL_QUEUE + 3)
            .map(|i| Address::socket(SocketAddr::from(([127, 0, (i / 250) as u8, (i % 250) as u8 + 1], port))))
            .collect();
        let pool = pool(settings(PoolType::Lock, 10, 1));
        // The worker cannot run before this test yields (one thread): the queue fills.
        for target in &targets {
            pool.warm_up(target);
        }
        assert_eq!(pool.refills_overflowed(), 3);
        let refilling =
            || targets.iter().filter(|t| pool.inner.idle.state(t).refilling.load(Ordering::Acquire)).count();
        wait_until("every refill to end", || refilling() == 0).await;
        assert_eq!((pool.warmed(), pool.warm_now()), (0, 0));
    }
}
