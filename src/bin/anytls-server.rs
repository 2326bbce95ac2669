//! `anytls-server`: accepts AnyTLS clients and connects them to their destinations.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use anytls_rs::pool::PoolType;
use anytls_rs::pool::buffers::{BufferPoolMode, set_relay_buffer_pool};
use anytls_rs::proto::{Address, PaddingScheme, PasswordHash};
use anytls_rs::resources::ServerCaps;
use anytls_rs::server::fallback::{FallbackSettings, ProbeSettings};
use anytls_rs::server::limits::ServerLimits;
use anytls_rs::server::outbound_pool::OutboundSettings;
use anytls_rs::server::tls::Identity;
use anytls_rs::server::udp::UdpSettings;
use anytls_rs::server::{self, ServerConfig};
use anytls_rs::session::BufferBudget;

/// AnyTLS server. Without --cert/--key it makes a self-signed certificate and logs
/// its SHA-256 fingerprint (give that to clients with --pin-sha256).
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Address to listen on.
    #[arg(short = 'l', long = "listen", default_value = "0.0.0.0:8443")]
    listen: String,
    /// Password; repeat for several users.
    #[arg(short = 'p', long = "password", required = true)]
    passwords: Vec<String>,
    /// Certificate chain (PEM). Needs --key.
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// Private key (PEM). Needs --cert.
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// Padding scheme file sent to clients (default: the reference's scheme).
    #[arg(long)]
    padding_scheme: Option<PathBuf>,
    /// Timeout for each outbound connection, in seconds.
    #[arg(long, default_value_t = 5)]
    connect_timeout_secs: u64,
    /// Time a client has to finish TLS and authenticate, in seconds.
    #[arg(long, default_value_t = 10)]
    handshake_timeout_secs: u64,
    /// Connections allowed in the TLS/authentication phase at once; more are dropped
    /// [default: 1/16 of the file-descriptor limit].
    #[arg(long, value_name = "N")]
    max_handshakes: Option<usize>,
    /// Streams one session may have open at once.
    #[arg(long, default_value_t = 1024)]
    max_streams_per_session: usize,
    /// Outbound pool engine: lock (a mutex), lockfree (arc-swap + epoch stacks), highperf (sharded).
    #[arg(long, value_enum, default_value_t = PoolType::LockFree)]
    pool_type: PoolType,
    /// Outbound connections (in use + warm) per target; more streams wait, then fail.
    #[arg(long, default_value_t = 100)]
    max_outbound_connections: usize,
    /// Warm connections idle longer than this are closed, and targets quiet this long are let go.
    #[arg(long, default_value_t = 300)]
    max_idle_time_secs: u64,
    /// Warm connections kept ready per recently used target (0 = dial on demand only).
    #[arg(long, default_value_t = 5)]
    min_idle_connections: usize,
    /// Warm connections older than this are closed, in seconds.
    #[arg(long, default_value_t = 1800)]
    max_lifetime_secs: u64,
    /// Warm connections across all targets [default: 1/16 of the file-descriptor
    /// limit, at most 1024].
    #[arg(long, value_name = "N")]
    max_idle_total: Option<usize>,
    /// Targets to warm up at start-up: host:port,host:port.
    #[arg(long, value_delimiter = ',')]
    warmup: Vec<String>,
    /// How often pool statistics are logged, in seconds.
    #[arg(long, default_value_t = 60)]
    stats_interval_secs: u64,
    /// UDP-over-TCP streams with no datagram either way for this long are closed, in seconds.
    #[arg(long, default_value_t = 60)]
    udp_idle_timeout_secs: u64,
    /// Authenticated sessions at once; one more gets an Alert and is closed (checked
    /// after authentication; unauthenticated connections count under --max-handshakes)
    /// [default: 7/16 of the file-descriptor limit].
    #[arg(long, value_name = "N")]
    max_sessions: Option<usize>,
    /// Streams at once across all sessions; more are refused (SYNACK error)
    /// [default: 7/16 of the file-descriptor limit].
    #[arg(long, value_name = "N")]
    max_streams: Option<usize>,
    /// A TCP stream with no data either way for this long is ended, in seconds (0 = never).
    #[arg(long, default_value_t = 300)]
    stream_idle_timeout_secs: u64,
    /// On SIGINT/SIGTERM: stop accepting, then give streams in flight this long to
    /// finish before closing everything and exiting, in seconds.
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
    /// Stream data received and not yet written out, across all sessions, in MiB; a
    /// session over its share stops being read [default: 1/16 of physical memory,
    /// 64..1024].
    #[arg(long, value_name = "MIB")]
    buffer_budget_mib: Option<usize>,
    /// The same, for one session, in KiB.
    #[arg(long, value_name = "KIB", default_value_t = 4096)]
    session_buffer_kib: usize,

    // The API's edge (kept together at the end).
    /// API connections served at once; more are answered 503 and closed.
    #[arg(long, default_value_t = anytls_rs::api::DEFAULT_MAX_CONNECTIONS)]
    api_max_connections: usize,
    /// An API client must send a request's whole header within this many seconds.
    #[arg(long, default_value_t = anytls_rs::api::DEFAULT_HEADER_TIMEOUT_SECS)]
    api_header_timeout_secs: u64,
    /// Hand connections that do not authenticate (browsers, probes, wrong passwords) to
    /// this web server, bytes and all, instead of closing them. Off unless given.
    #[arg(long, value_name = "HOST:PORT")]
    fallback: Option<String>,
    /// ALPN protocols the fallback site speaks, in order of preference; a client offering
    /// none of them gets no ALPN. Add h2 only if the site speaks HTTP/2 in clear (h2c).
    #[arg(long, value_delimiter = ',', default_value = "http/1.1", requires = "fallback")]
    fallback_alpn: Vec<String>,
    /// Without --cert/--key: the self-signed certificate names this host (the site's
    /// name) instead of localhost.
    #[arg(long, value_name = "NAME", conflicts_with = "cert")]
    self_signed_name: Option<String>,
    /// Handshakes one source address (IPv6: one /64) may have in progress at once; more
    /// wait for a place until their deadline [default: a quarter of --max-handshakes,
    /// at least 16].
    #[arg(long)]
    max_handshakes_per_source: Option<usize>,
    /// Relays to the --fallback site at once; one more is closed silently.
    #[arg(long, default_value_t = 1024, requires = "fallback")]
    max_fallback_connections: usize,
}

fn main() -> ExitCode {
    anytls_rs::logging::init();
    // Reference command lines use Go-style flags such as `-padding-scheme`.
    let args = Args::parse_from(anytls_rs::cli::accept_single_dash_long_flags(
        std::env::args(),
        &["padding-scheme", "cert", "key"],
    ));
    anytls_rs::cli::exit_with("anytls-server", run(args))
}

#[tokio::main]
async fn run(args: Args) -> Result<(), String> {
    let fds = anytls_rs::resources::raise_fd_limit();
    let caps = ServerCaps::for_fd_limit(fds.limit);
    let max_handshakes = args.max_handshakes.unwrap_or(caps.handshakes).max(1);
    let max_sessions = args.max_sessions.unwrap_or(caps.sessions).max(1);
    let max_streams = args.max_streams.unwrap_or(caps.streams).max(1);
    let max_idle_total = args.max_idle_total.unwrap_or(caps.warm);
    log::info!(
        "file descriptors: {fds}; --max-handshakes {max_handshakes}, --max-sessions {max_sessions}, \
         --max-streams {max_streams}, --max-idle-total {max_idle_total} (defaults are shares of the limit)"
    );
    let buffers = BufferBudget::new(
        args.buffer_budget_mib.map_or_else(anytls_rs::resources::default_buffer_budget, |mib| mib << 20),
        args.session_buffer_kib << 10,
    );
    log::info!(
        "buffered stream data: at most {} MiB in all (--buffer-budget-mib), {} KiB per session (--session-buffer-kib)",
        buffers.global_bytes() >> 20,
        buffers.per_session() >> 10
    );
    let identity = match (&args.cert, &args.key) {
        (Some(cert), Some(key)) => Identity::from_files(cert, key).map_err(|e| e.to_string())?,
        _ => {
            let (identity, name) = match &args.self_signed_name {
                Some(name) => (Identity::self_signed_named(name), name.as_str()),
                None => (Identity::self_signed(), "localhost"),
            };
            let identity = identity.map_err(|e| e.to_string())?;
            log::info!("self-signed certificate for {name}, SHA-256 fingerprint {}", identity.fingerprint());
            identity
        }
    };
    let fallback = match &args.fallback {
        Some(target) => {
            Address::parse_host_port(target).ok_or_else(|| format!("--fallback: bad host:port {target:?}"))?;
            let mut fallback = FallbackSettings::new(target);
            fallback.alpn = args.fallback_alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
            fallback.max_connections = args.max_fallback_connections.max(1);
            if args.cert.is_none() {
                log::warn!(
                    "--fallback with a self-signed certificate: browsers will warn before showing the site; \
                     give the site's certificate with --cert/--key (see docs/probe-resistance.md)"
                );
            }
            Some(fallback)
        }
        None => None,
    };
    let padding = match &args.padding_scheme {
        Some(path) => {
            let raw = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            PaddingScheme::parse(&raw).map_err(|e| format!("{}: {e}", path.display()))?
        }
        None => PaddingScheme::default(),
    };
    let warmup = args
        .warmup
        .iter()
        .map(|target| Address::parse_host_port(target).ok_or_else(|| format!("--warmup: bad host:port {target:?}")))
        .collect::<Result<Vec<_>, _>>()?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let config = ServerConfig {
        tls: identity.server_config().map_err(|e| e.to_string())?,
        passwords: args.passwords.iter().map(|p| PasswordHash::of(p)).collect(),
        padding,
        connect_timeout: Duration::from_secs(args.connect_timeout_secs),
        handshake_timeout: Duration::from_secs(args.handshake_timeout_secs),
        max_handshakes,
        probe: ProbeSettings { fallback, max_handshakes_per_source: args.max_handshakes_per_source },
        max_streams_per_session: args.max_streams_per_session,
        outbound: OutboundSettings {
            pool_type: args.pool_type,
            max_per_target: args.max_outbound_connections.max(1),
            min_idle: args.min_idle_connections,
            max_idle_total,
            max_idle_time: Duration::from_secs(args.max_idle_time_secs),
            max_lifetime: Duration::from_secs(args.max_lifetime_secs),
            max_waiters_per_target: args.max_outbound_connections.max(1) * 4,
        },
        warmup,
        stats_interval: Duration::from_secs(args.stats_interval_secs.max(1)),
        udp: UdpSettings { idle_timeout: Duration::from_secs(args.udp_idle_timeout_secs.max(1)) },
    };
    log::info!(
        "listening on {} ({} user{})",
        listener.local_addr().map_err(|e| e.to_string())?,
        config.passwords.len(),
        if config.passwords.len() == 1 { "" } else { "s" }
    );
    let limits = ServerLimits {
        max_sessions,
        max_streams,
        stream_idle_timeout: (args.stream_idle_timeout_secs > 0)
            .then(|| Duration::from_secs(args.stream_idle_timeout_secs)),
        drain_timeout: Duration::from_secs(args.shutdown_timeout_secs),
        buffers,
    };
    set_relay_buffer_pool(args.buffer_pool);
    let pool = server::new_outbound_pool(&config);
    if let Some(api) = &args.api {
        let settings = anytls_rs::api::ApiSettings {
            token: args.api_token.clone(),
            max_connections: args.api_max_connections.max(1),
            header_timeout: Duration::from_secs(args.api_header_timeout_secs.max(1)),
        };
        anytls_rs::api::start(api, settings, std::sync::Arc::new(pool.clone())).await.map_err(|e| e.to_string())?;
    }
    let shutdown = async {
        let signal = anytls_rs::shutdown::signal().await;
        log::info!("{signal} received");
    };
    server::run_until(listener, config, pool, limits, shutdown).await;
    Ok(())
}
