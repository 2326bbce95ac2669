//! The warm refill: after a stream takes a target's warm connection (or starts while the
//! target's warm set is short), a background dial brings the set back to its size, one
//! refill per target at a time, within the target's limit and the global warm cap.
//!
//! Each refill is a task of its own rather than a message to one refill worker per pool:
//! the worker measured slower (`outbound_refill` in benches/pool.rs), since one task then
//! polls every target's dial on one thread while spawned refills spread over the runtime.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::{Inner, Target, WarmConnection, WarmTicket};
use crate::pool::{Idle, KeyCounters, reserve_slot};
use crate::proto::Address;

impl Inner {
    /// Starts a background refill of `address`'s warm connections unless one is running.
    pub(super) fn refill_soon(self: &Arc<Self>, address: &Address, target: &Arc<Target>) {
        if target.warm.load(Ordering::Relaxed) >= self.warm_goal(target) {
            return;
        }
        if target.refilling.swap(true, Ordering::AcqRel) {
            return;
        }
        let (pool, address, target) = (self.clone(), address.clone(), target.clone());
        tokio::spawn(async move {
            pool.refill(&address, &target).await;
            target.refilling.store(false, Ordering::Release);
        });
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

#[cfg(test)]
mod tests {
    use super::super::tests::{holding_target, pool, settings, wait_until};
    use crate::pool::PoolType;
    use std::time::{Duration, Instant};

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
}
