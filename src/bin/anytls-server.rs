//! `anytls-server`: accepts AnyTLS clients and connects them to their destinations.

// jemalloc gives memory back after waves of load; glibc malloc kept growing (docs/memory.md).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
/// jemalloc's options: a background thread hands freed pages back after about a second,
/// also while the process is idle (without it only new allocations trigger that).
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: &[u8; 60] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use anytls_rs::pool::PoolType;
use anytls_rs::pool::buffers::{BufferPoolMode, set_relay_buffer_pool};
use anytls_rs::proto::{Address, PaddingScheme, PasswordHash};
use anytls_rs::server::limits::ServerLimits;
use anytls_rs::server::outbound_pool::OutboundSettings;
use anytls_rs::server::tls::Identity;
use anytls_rs::server::udp::UdpSettings;
use anytls_rs::server::{self, ServerConfig};

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
    /// Connections allowed in the TLS/authentication phase at once; more are dropped.
    #[arg(long, default_value_t = 512)]
    max_handshakes: usize,
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
    /// Warm connections across all targets (bounds file descriptors).
    #[arg(long, default_value_t = 1024)]
    max_idle_total: usize,
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
    /// after authentication; unauthenticated connections count under --max-handshakes).
    #[arg(long, default_value_t = 4096)]
    max_sessions: usize,
    /// Streams at once across all sessions; more are refused (SYNACK error).
    #[arg(long, default_value_t = 65536)]
    max_streams: usize,
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
    let identity = match (&args.cert, &args.key) {
        (Some(cert), Some(key)) => Identity::from_files(cert, key).map_err(|e| e.to_string())?,
        _ => {
            let identity = Identity::self_signed().map_err(|e| e.to_string())?;
            log::info!("self-signed certificate for localhost, SHA-256 fingerprint {}", identity.fingerprint());
            identity
        }
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
        max_handshakes: args.max_handshakes,
        max_streams_per_session: args.max_streams_per_session,
        outbound: OutboundSettings {
            pool_type: args.pool_type,
            max_per_target: args.max_outbound_connections.max(1),
            min_idle: args.min_idle_connections,
            max_idle_total: args.max_idle_total,
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
        max_sessions: args.max_sessions.max(1),
        max_streams: args.max_streams.max(1),
        stream_idle_timeout: (args.stream_idle_timeout_secs > 0)
            .then(|| Duration::from_secs(args.stream_idle_timeout_secs)),
        drain_timeout: Duration::from_secs(args.shutdown_timeout_secs),
    };
    set_relay_buffer_pool(args.buffer_pool);
    let pool = server::new_outbound_pool(&config);
    if let Some(api) = &args.api {
        anytls_rs::api::start(api, args.api_token.clone(), std::sync::Arc::new(pool.clone())).await?;
    }
    let shutdown = async {
        let signal = anytls_rs::shutdown::signal().await;
        log::info!("{signal} received");
    };
    server::run_until(listener, config, pool, limits, shutdown).await;
    Ok(())
}
