//! `anytls-client`: a local SOCKS5/SOCKS4/HTTP proxy that tunnels over AnyTLS.

// jemalloc gives memory back after waves of load; glibc malloc kept growing (docs/memory.md).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
/// jemalloc's options: a background thread hands freed pages back after about a second,
/// also while the process is idle (without it only new allocations trigger that).
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: &[u8; 60] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use clap::Parser;
use rustls::pki_types::ServerName;

use anytls_rs::client::failover::Policy;
use anytls_rs::client::inbound::Credentials;
use anytls_rs::client::link::{parse_link, parse_server};
use anytls_rs::client::servers::Servers;
use anytls_rs::client::sessions::{Connector, SessionPool, SessionPoolSettings};
use anytls_rs::client::tls::{Trust, client_config, parse_pin};
use anytls_rs::client::{self, ClientConfig};
use anytls_rs::pool::PoolType;
use anytls_rs::pool::buffers::{BufferPoolMode, set_relay_buffer_pool};
use anytls_rs::proto::address::Host;
use anytls_rs::proto::{PaddingScheme, PasswordHash};
use anytls_rs::session::SessionConfig;

/// AnyTLS client. The local port speaks SOCKS5, SOCKS4/4a and HTTP proxy.
/// The server's certificate is verified unless --insecure or --pin-sha256 is given.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Local proxy address.
    #[arg(short = 'l', long = "listen", default_value = "127.0.0.1:1080")]
    listen: String,
    /// Server as HOST:PORT, or an anytls://password@host:port/?sni=..&insecure=1 link.
    /// Repeat for several servers, in order of preference (see --policy).
    #[arg(short = 's', long = "server", required = true)]
    servers: Vec<String>,
    /// With several servers: failover (the first healthy one, in the order given) or
    /// round-robin (rotate over the healthy ones, per new connection).
    #[arg(long, value_enum, default_value_t = Policy::Failover)]
    policy: Policy,
    /// Consecutive failures (no session, or a session that died opening a stream) after
    /// which a server is taken out of use and probed instead.
    #[arg(long, default_value_t = 3)]
    fallback_threshold: u32,
    /// How often a server taken out of use is probed (a new session), in seconds.
    #[arg(long, default_value_t = 5)]
    probe_interval_secs: u64,
    /// Password (may instead be given in the link).
    #[arg(short = 'p', long = "password")]
    password: Option<String>,
    /// TLS server name to send and verify (default: the server's host name).
    #[arg(long)]
    sni: Option<String>,
    /// Accept any server certificate (encryption without authentication).
    #[arg(long)]
    insecure: bool,
    /// Extra trusted CA certificate (PEM) for private servers.
    #[arg(long = "ca")]
    ca: Vec<PathBuf>,
    /// Accept exactly the certificate with this SHA-256 fingerprint (64 hex digits).
    #[arg(long = "pin-sha256", conflicts_with = "insecure")]
    pin_sha256: Option<String>,
    /// Username local SOCKS5 clients must give (with --socks-pass).
    #[arg(long, requires = "socks_pass")]
    socks_user: Option<String>,
    /// Password local SOCKS5 clients must give (with --socks-user).
    #[arg(long, requires = "socks_user")]
    socks_pass: Option<String>,
    /// Timeout for connecting to the server (TCP and TLS each), in seconds.
    #[arg(long, default_value_t = 10)]
    connect_timeout_secs: u64,
    /// Close sessions idle longer than this, in seconds.
    #[arg(long, default_value_t = 30)]
    idle_session_timeout_secs: u64,
    /// How often idle sessions are checked, in seconds.
    #[arg(long, default_value_t = 30)]
    idle_session_check_interval_secs: u64,
    /// Idle sessions the idle check always leaves open (the newest ones).
    #[arg(long, default_value_t = 5)]
    min_idle_session: usize,
    /// Streams one session carries at once (1 = one TLS connection per active stream,
    /// as the reference client; more multiplexes).
    #[arg(long, default_value_t = 1)]
    max_streams_per_session: usize,
    /// Idle sessions kept at most.
    #[arg(long, default_value_t = 64)]
    max_idle_sessions: usize,
    /// Session pool engine: lock (a mutex), lockfree (arc-swap + epoch stacks), highperf (sharded).
    #[arg(long, value_enum, default_value_t = PoolType::LockFree)]
    pool_type: PoolType,
    /// How often pool statistics are logged, in seconds.
    #[arg(long, default_value_t = 60)]
    stats_interval_secs: u64,
    /// A TCP stream with no data either way for this long is ended, in seconds (0 = never).
    #[arg(long, default_value_t = 300)]
    stream_idle_timeout_secs: u64,
    /// A session with open streams that received nothing for this long sends a
    /// heartbeat to the server (v2 servers), in seconds (0 = never).
    #[arg(long, default_value_t = 30)]
    heartbeat_interval_secs: u64,
    /// No answer this long after a heartbeat: the connection is taken as silently
    /// dropped, its streams fail and the session is replaced, in seconds.
    #[arg(long, default_value_t = 10)]
    heartbeat_timeout_secs: u64,
    /// On SIGINT/SIGTERM: stop accepting, then give connections in flight this long to
    /// finish before closing the sessions and exiting, in seconds.
    #[arg(long, default_value_t = 10)]
    shutdown_timeout_secs: u64,
    /// Serve the monitoring API and live page on ADDR (a bare PORT means 127.0.0.1:PORT).
    /// Off unless given.
    #[arg(long, value_name = "ADDR")]
    api: Option<String>,
    /// Token the API requires: `Authorization: Bearer TOKEN`, or `?token=TOKEN` in a browser.
    #[arg(long, requires = "api")]
    api_token: Option<String>,
    /// Relay reads into pooled 64 KiB buffers (on) or a fresh buffer per read (off).
    #[arg(long, value_enum, default_value_t = BufferPoolMode::Off)]
    buffer_pool: BufferPoolMode,
}

fn main() -> ExitCode {
    anytls_rs::logging::init();
    // Reference command lines use Go-style flags such as `-sni`.
    let args = Args::parse_from(anytls_rs::cli::accept_single_dash_long_flags(
        std::env::args(),
        &["sni", "insecure", "ca", "pin-sha256"],
    ));
    anytls_rs::cli::exit_with("anytls-client", run(args))
}

#[tokio::main]
async fn run(args: Args) -> Result<(), String> {
    let pool_settings = SessionPoolSettings {
        pool_type: args.pool_type,
        idle_timeout: Duration::from_secs(args.idle_session_timeout_secs),
        min_idle: args.min_idle_session,
        max_streams_per_session: args.max_streams_per_session.max(1),
        max_idle: args.max_idle_sessions.max(1),
    };
    let mut pools = Vec::new();
    let mut described = Vec::new();
    for server in &args.servers {
        let (connector, trust) = connector_for(server, &args)?;
        described.push(format!("{} ({})", connector.server, describe_trust(&trust)));
        pools.push(SessionPool::new(connector, pool_settings.clone()));
    }
    let servers =
        Servers::new(pools, args.policy, args.fallback_threshold, Duration::from_secs(args.probe_interval_secs.max(1)));
    let config = ClientConfig {
        servers: Arc::new(servers),
        stats_interval: Duration::from_secs(args.stats_interval_secs.max(1)),
        credentials: args
            .socks_user
            .clone()
            .zip(args.socks_pass.clone())
            .map(|(username, password)| Credentials { username, password }),
        idle_check_interval: Duration::from_secs(args.idle_session_check_interval_secs.max(1)),
    };
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let policy = if described.len() > 1 { format!(", policy {:?}", args.policy) } else { String::new() };
    log::info!(
        "SOCKS5/SOCKS4/HTTP proxy on {}, server {}{policy}",
        listener.local_addr().map_err(|e| e.to_string())?,
        described.join(", ")
    );
    set_relay_buffer_pool(args.buffer_pool);
    if let Some(api) = &args.api {
        anytls_rs::api::start(api, args.api_token.clone(), config.servers.clone()).await?;
    }
    let shutdown = async {
        let signal = anytls_rs::shutdown::signal().await;
        log::info!("{signal} received");
    };
    client::run_until(listener, config, Duration::from_secs(args.shutdown_timeout_secs), shutdown).await;
    Ok(())
}

/// The connector for one `-s` value: a link's password, SNI and `insecure` win over
/// nothing, the command line's flags win over the link's.
fn connector_for(server: &str, args: &Args) -> Result<(Connector, Trust), String> {
    let (server, link_password, link_sni, link_insecure) = if server.starts_with("anytls://") {
        let link = parse_link(server)?;
        (link.server, link.password, link.sni, link.insecure)
    } else {
        let address = parse_server(server, 443).ok_or_else(|| format!("bad server address {server:?}"))?;
        (address, None, None, false)
    };
    let password = args
        .password
        .clone()
        .or(link_password)
        .ok_or_else(|| format!("no password for {server}: give -p or put it in the anytls:// link"))?;
    let trust = if let Some(pin) = &args.pin_sha256 {
        Trust::Pin(parse_pin(pin)?)
    } else if args.insecure || link_insecure {
        Trust::Insecure
    } else {
        Trust::Roots { extra_ca: args.ca.clone() }
    };
    let sni = args.sni.clone().or(link_sni);
    let server_name = match (&sni, &server.host) {
        (Some(name), _) => ServerName::try_from(name.clone()),
        (None, Host::Domain(name)) => ServerName::try_from(name.clone()),
        (None, Host::Ip(ip)) => Ok(ServerName::IpAddress((*ip).into())),
    }
    .map_err(|e| format!("bad TLS server name: {e}"))?;
    let connector = Connector {
        server,
        server_name,
        tls: tokio_rustls::TlsConnector::from(client_config(&trust)?),
        password: PasswordHash::of(&password),
        session_config: SessionConfig {
            padding: Arc::new(ArcSwap::from_pointee(PaddingScheme::default())),
            stream_idle_timeout: secs_or_never(args.stream_idle_timeout_secs),
            heartbeat_interval: secs_or_never(args.heartbeat_interval_secs),
            heartbeat_timeout: Duration::from_secs(args.heartbeat_timeout_secs.max(1)),
            ..SessionConfig::default()
        },
        connect_timeout: Duration::from_secs(args.connect_timeout_secs),
    };
    Ok((connector, trust))
}

/// A duration flag where 0 means "never".
fn secs_or_never(secs: u64) -> Option<Duration> {
    (secs > 0).then(|| Duration::from_secs(secs))
}

fn describe_trust(trust: &Trust) -> &'static str {
    match trust {
        Trust::Roots { .. } => "certificate verified",
        Trust::Pin(_) => "certificate pinned",
        Trust::Insecure => "certificate NOT verified",
    }
}
