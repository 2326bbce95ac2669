//! The client's servers: one session pool each, chosen per new connection by the
//! failover policy (`client::failover`), with background probes of the ones that are
//! down. There is no cluster behind this: each server is independent, and the client
//! only decides which one a new connection uses.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::error::ConnectError;
use super::failover::{Policy, ServerSet};
use super::sessions::{Lease, SessionPool, new_session_engine, sweep_all};
use crate::pool::{KeyStats, PoolKey, PoolStatsSnapshot};

/// How often due probes are looked for (each server keeps its own probe interval).
const PROBE_TICK: Duration = Duration::from_millis(250);

/// A session from one of the servers.
pub struct ServerLease {
    pub server: usize,
    pub lease: Lease,
}

pub struct Servers {
    pools: Vec<SessionPool>,
    set: Mutex<ServerSet>,
}

impl Servers {
    /// `pools` in order of preference (the order of `-s` on the command line). They are
    /// moved onto one engine keyed by server.
    pub fn new(mut pools: Vec<SessionPool>, policy: Policy, threshold: u32, probe_interval: Duration) -> Servers {
        if let Some(first) = pools.first() {
            let engine = new_session_engine(first.settings(), pools.len());
            pools.iter_mut().for_each(|pool| pool.share_engine(&engine));
        }
        let set = ServerSet::new(pools.len(), policy, threshold, probe_interval);
        Servers { pools, set: Mutex::new(set) }
    }

    /// One server, no policy to speak of.
    pub fn single(pool: SessionPool) -> Servers {
        Servers::new(vec![pool], Policy::Failover, 3, Duration::from_secs(5))
    }

    fn set(&self) -> std::sync::MutexGuard<'_, ServerSet> {
        // The set is only mutated by short, non-panicking calls; a poisoned lock still
        // holds a consistent state.
        self.set.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A session from the server the policy picks; a failure to get one counts against
    /// that server.
    pub async fn acquire(&self) -> Result<ServerLease, ConnectError> {
        let server = self.set().pick().ok_or(ConnectError::NoServer)?;
        let pool = &self.pools[server];
        match pool.acquire().await {
            Ok(lease) => Ok(ServerLease { server, lease }),
            Err(why) => {
                self.set().record_failure(server, Instant::now());
                Err(why)
            }
        }
    }

    /// The server opened a stream (or refused it on its own behalf): it works.
    pub fn opened(&self, server: usize) {
        self.set().record_success(server);
    }

    /// The server's session died while a stream was being opened.
    pub fn failed(&self, server: usize) {
        self.set().record_failure(server, Instant::now());
    }

    /// Gives a session back to its server's pool.
    pub fn release(&self, lease: ServerLease) {
        self.pools[lease.server].release(lease.lease.session);
    }

    pub fn sweep(&self) {
        sweep_all(&self.pools);
    }

    /// Closes every idle session (shutdown); returns how many.
    pub fn close_idle(&self) -> usize {
        self.pools.iter().map(SessionPool::close_idle).sum()
    }

    /// Pool statistics of all servers (they share one engine).
    pub fn stats(&self) -> PoolStatsSnapshot {
        self.pools.first().map(SessionPool::stats).unwrap_or_default()
    }

    /// Logs the `[Pool Stats]` and `[Pool Status]` lines.
    pub fn log_stats(&self) {
        crate::metrics::log_lines::log_stats(&self.stats(), &self.idle_by_server(), "");
    }

    pub fn idle_by_server(&self) -> Vec<(PoolKey, usize)> {
        self.pools.iter().flat_map(SessionPool::idle_by_server).collect()
    }

    /// Each server's counters, in the order given on the command line.
    pub fn per_server_stats(&self) -> Vec<KeyStats> {
        self.pools.iter().map(SessionPool::key_stats).collect()
    }

    /// Probes down servers when due, forever: a probe opens a session (TCP, TLS and the
    /// authentication block) and closes it again.
    pub async fn probe_forever(self: Arc<Self>) {
        let mut tick = tokio::time::interval(PROBE_TICK);
        loop {
            tick.tick().await;
            for server in self.set().due_probes(Instant::now()) {
                let servers = self.clone();
                tokio::spawn(async move {
                    let connector = &servers.pools[server].connector;
                    let healthy = match connector.connect().await {
                        Ok(session) => {
                            session.close("probe done");
                            true
                        }
                        Err(why) => {
                            log::debug!("probe of server #{server} ({}): {why}", connector.server);
                            false
                        }
                    };
                    servers.set().probe_result(server, healthy, Instant::now());
                });
            }
        }
    }
}

impl Servers {
    /// The session pools as the metrics room shows them.
    pub fn connection_pool_stats(&self) -> crate::metrics::ConnectionPoolStats {
        let pool_type = self.pools.first().map(|pool| pool.pool_type().to_string()).unwrap_or_default();
        // Sessions outlive their streams; only the pool closes them (no `ended`).
        crate::metrics::ConnectionPoolStats::new("sessions", pool_type, self.stats(), self.per_server_stats())
    }
}
