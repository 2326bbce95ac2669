//! One server's shared state: its users, outbound pool, outbound policy, counters and
//! relay buffers. Each server owns one and hands it down to its connections, so two
//! servers in one process share nothing (no globals), and the monitoring API reads a
//! server through it ([`MetricsSource`]).

use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};

use super::ServerConfig;
use super::access_log::AccessLog;
use super::outbound::Dialer;
use super::outbound_pool::OutboundPool;
use super::policy::{OutboundPolicy, Policy, Refusal};
use super::users::Users;
use crate::metrics::panel::PanelHealth;
use crate::metrics::snapshot::{ConnectionPoolStats, MemoryPoolStats, UsersStats};
use crate::metrics::{AccessLogCounters, HandshakeCounters, MetricsSource};
use crate::proto::PaddingScheme;
use crate::session::buffers::{BufferPoolMode, RelayBuffers};

pub struct ServerContext {
    pub users: Arc<Users>,
    pub pool: OutboundPool,
    pub policy: OutboundPolicy,
    pub handshakes: HandshakeCounters,
    pub relay_buffers: RelayBuffers,
    /// The padding scheme sent to clients; the panel may change it live.
    pub padding: Arc<ArcSwap<PaddingScheme>>,
    /// The scheme the server pads its own first writes of a session by (`None`: no
    /// downlink padding); a reload may change it, for the sessions after.
    pub downlink_padding: ArcSwapOption<PaddingScheme>,
    /// The link to the panel, when there is one (`--panel`).
    pub panel: PanelHealth,
    /// `--auth-url`: asked about passwords no local user has.
    pub auth_callback: Option<Arc<super::auth_callback::AuthCallback>>,
    /// `--access-log`: one record per stream (off unless given).
    pub access_log: AccessLog,
    /// Failed authentications at INFO, at most one line per source a minute.
    pub auth_failure_log: super::auth_failures::AuthFailureLog,
}

impl ServerContext {
    /// A context serving `users` through `pool`, refusing nothing, relay buffers unpooled.
    pub fn new(users: Arc<Users>, pool: OutboundPool) -> ServerContext {
        ServerContext {
            users,
            pool,
            policy: OutboundPolicy::default(),
            handshakes: HandshakeCounters::default(),
            relay_buffers: RelayBuffers::default(),
            padding: Arc::new(ArcSwap::from_pointee(PaddingScheme::default())),
            downlink_padding: ArcSwapOption::empty(),
            panel: PanelHealth::default(),
            auth_callback: None,
            access_log: AccessLog::default(),
            auth_failure_log: Default::default(),
        }
    }

    /// As [`ServerContext::new`], with the outbound pool `config` asks for.
    pub fn from_config(config: &ServerConfig, users: Arc<Users>) -> ServerContext {
        let dialer = Dialer {
            connect_timeout: config.connect_timeout,
            keepalive: config.keepalive,
            strategy: config.dns_strategy,
            resolver: config.resolver.clone(),
        };
        let context = ServerContext::new(users, OutboundPool::new(config.outbound.clone(), dialer));
        context.padding.store(Arc::new(config.padding.clone()));
        context.downlink_padding.store(config.downlink_padding.clone().map(Arc::new));
        context
    }

    pub fn with_policy(self, rules: Policy) -> ServerContext {
        self.policy.replace(rules);
        self
    }

    pub fn with_auth_callback(self, callback: Option<Arc<super::auth_callback::AuthCallback>>) -> ServerContext {
        ServerContext { auth_callback: callback, ..self }
    }

    pub fn with_access_log(self, access_log: AccessLog) -> ServerContext {
        ServerContext { access_log, ..self }
    }

    pub fn with_relay_buffers(self, mode: BufferPoolMode) -> ServerContext {
        ServerContext { relay_buffers: RelayBuffers::new(mode), ..self }
    }
}

impl MetricsSource for ServerContext {
    fn connection_pool_stats(&self) -> ConnectionPoolStats {
        self.pool.connection_pool_stats()
    }

    fn memory_pool_stats(&self) -> MemoryPoolStats {
        MemoryPoolStats::of(&self.relay_buffers)
    }

    /// Everyone's counters, this server's wrong passwords and what its policy refused.
    fn users_stats(&self) -> Option<UsersStats> {
        let routes = self.policy.rules().routes.clone();
        Some(UsersStats {
            users: self.users.report(),
            auth_failures: self.handshakes.auth_failures.load(std::sync::atomic::Ordering::Relaxed),
            policy_refused: Refusal::ALL.iter().map(|r| (r.label(), self.policy.refused(*r))).collect(),
            route_decisions: routes
                .counts()
                .into_iter()
                .map(|(rule, action, count)| crate::metrics::snapshot::RouteDecisions { rule, action, count })
                .collect(),
            upstreams: routes
                .upstreams()
                .iter()
                .map(|upstream| crate::metrics::snapshot::UpstreamStats {
                    name: upstream.name.clone(),
                    streams: upstream.counters.streams.load(std::sync::atomic::Ordering::Relaxed),
                    failures: upstream.counters.failures.load(std::sync::atomic::Ordering::Relaxed),
                })
                .collect(),
            plan_refused: crate::server::users::Refusal::ALL
                .iter()
                .map(|r| (r.label(), self.users.refused(*r)))
                .collect(),
        })
    }

    fn handshakes(&self) -> Option<&HandshakeCounters> {
        Some(&self.handshakes)
    }

    fn access_log(&self) -> Option<&AccessLogCounters> {
        Some(self.access_log.counters())
    }

    fn panel(&self) -> Option<&PanelHealth> {
        Some(&self.panel)
    }
}
