//! `anytls-client`'s flags, and start-up: the flags (with `--config`) become the
//! client's settings (`ClientConfig`, one `Connector` per `-s`), then the local proxy
//! runs until a signal.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use clap::{CommandFactory, Parser};

use crate::cli::config_file as config;
use crate::cli::{KeepaliveArgs, accept_single_dash_long_flags, exit_with, named, pool_type_help, secs_or_never};
use crate::client::endpoint::{ServerOverrides, resolve_server};
use crate::client::failover::Policy;
use crate::client::inbound::Credentials;
use crate::client::servers::Servers;
use crate::client::sessions::{Connector, SessionPool, SessionPoolSettings};
use crate::client::tls::{Trust, client_config};
use crate::client::{self, ClientConfig};
use crate::logging::LogFormat;
use crate::pool::PoolType;
use crate::proto::{PaddingScheme, PasswordHash};
use crate::session::buffers::{BufferPoolMode, RelayBuffers};
use crate::session::{BufferBudget, ClientSessionOptions, SessionConfig};

/// AnyTLS client. The local port speaks SOCKS5, SOCKS4/4a and HTTP proxy.
/// The server's certificate is verified unless --insecure or --pin-sha256 is given.
#[derive(Parser, Debug)]
#[command(
    name = "anytls-client",
    version = crate::cli::VERSION,
    after_help = "Commands (before the flags):\n  check [FLAGS]    load every server and its trust as start-up does (or from --config FILE) and exit"
)]
struct Args {
    /// Local proxy address.
    #[arg(
        short = 'l',
        long = "listen",
        default_value = "127.0.0.1:1080",
        value_name = "ADDR",
        help_heading = "Local proxy"
    )]
    listen: String,
    /// Server as HOST:PORT, or an anytls://password@host:port/?sni=..&insecure=1 link.
    /// Repeat for several servers, in order of preference (see --policy).
    #[arg(short = 's', long = "server", required = true, value_name = "HOST:PORT|LINK", help_heading = "Servers")]
    servers: Vec<String>,
    /// With several servers: failover (the first healthy one, in the order given) or
    /// round-robin (rotate over the healthy ones, per new connection).
    #[arg(long, value_parser = named::<Policy>(), default_value_t = Policy::Failover, value_name = "POLICY", help_heading = "Servers")]
    policy: Policy,
    /// Consecutive failures (no session, or a session that died opening a stream) after
    /// which a server is taken out of use and probed instead.
    #[arg(long, default_value_t = 3, value_name = "N", help_heading = "Servers")]
    fallback_threshold: u32,
    /// How often a server taken out of use is probed (a new session), in seconds.
    #[arg(long, default_value_t = 5, value_name = "SECS", help_heading = "Servers")]
    probe_interval_secs: u64,
    /// Password (may instead be given in the link). Visible in `ps`: prefer
    /// ANYTLS_PASSWORD, --password-file or --config.
    #[arg(
        short = 'p',
        long = "password",
        value_name = "PASSWORD",
        env = "ANYTLS_PASSWORD",
        hide_env_values = true,
        help_heading = "Servers"
    )]
    password: Option<String>,
    /// TLS server name to send and verify (default: the server's host name).
    #[arg(long, value_name = "NAME", help_heading = "Server certificate")]
    sni: Option<String>,
    /// Accept any server certificate (encryption without authentication).
    #[arg(long, help_heading = "Server certificate")]
    insecure: bool,
    /// Extra trusted CA certificate (PEM) for private servers.
    #[arg(long = "ca", value_name = "FILE", help_heading = "Server certificate")]
    ca: Vec<PathBuf>,
    /// Accept exactly the certificate with this SHA-256 fingerprint (64 hex digits).
    #[arg(long = "pin-sha256", conflicts_with = "insecure", value_name = "HEX", help_heading = "Server certificate")]
    pin_sha256: Option<String>,
    /// Username local SOCKS5 clients must give (with --socks-pass).
    #[arg(long, requires = "socks_pass", value_name = "NAME", help_heading = "Local proxy")]
    socks_user: Option<String>,
    /// Password local SOCKS5 clients must give (with --socks-user).
    #[arg(long, requires = "socks_user", value_name = "PASSWORD", help_heading = "Local proxy")]
    socks_pass: Option<String>,
    /// Timeout for connecting to the server (TCP and TLS each), in seconds.
    #[arg(long, default_value_t = 10, value_name = "SECS", help_heading = "Sessions")]
    connect_timeout_secs: u64,
    /// Close sessions idle longer than this, in seconds.
    #[arg(long, default_value_t = 30, value_name = "SECS", help_heading = "Sessions")]
    idle_session_timeout_secs: u64,
    /// How often idle sessions are checked, in seconds.
    #[arg(long, default_value_t = 30, value_name = "SECS", help_heading = "Sessions")]
    idle_session_check_interval_secs: u64,
    /// Idle sessions the idle check always leaves open (the newest ones).
    #[arg(long, default_value_t = 5, value_name = "N", help_heading = "Sessions")]
    min_idle_session: usize,
    /// Streams one session carries at once (1 = one TLS connection per active stream,
    /// as the reference client; more multiplexes).
    #[arg(long, default_value_t = 1, value_name = "N", help_heading = "Sessions")]
    max_streams_per_session: usize,
    /// Idle sessions kept at most.
    #[arg(long, default_value_t = 64, value_name = "N", help_heading = "Sessions")]
    max_idle_sessions: usize,
    #[arg(long, value_parser = named::<PoolType>(), default_value_t = PoolType::LockFree, value_name = "ENGINE", help = pool_type_help("Session pool engine"), help_heading = "Sessions")]
    pool_type: PoolType,
    /// How often pool statistics are logged, in seconds (0 = never; the final ones at shutdown still are).
    #[arg(long, default_value_t = 60, value_name = "SECS", help_heading = "Monitoring")]
    stats_interval_secs: u64,
    /// A TCP stream with no data either way for this long is ended, in seconds (0 = never).
    #[arg(long, default_value_t = 300, value_name = "SECS", help_heading = "Sessions")]
    stream_idle_timeout_secs: u64,
    /// A session with open streams that received nothing for this long sends a
    /// heartbeat to the server (v2 servers), in seconds (0 = never).
    #[arg(long, default_value_t = 30, value_name = "SECS", help_heading = "Sessions")]
    heartbeat_interval_secs: u64,
    /// No answer this long after a heartbeat: the connection is taken as silently
    /// dropped, its streams fail and the session is replaced, in seconds.
    #[arg(long, default_value_t = 10, value_name = "SECS", help_heading = "Sessions")]
    heartbeat_timeout_secs: u64,
    /// On SIGINT/SIGTERM: stop accepting, then give connections in flight this long to
    /// finish before closing the sessions and exiting, in seconds.
    #[arg(long, default_value_t = 10, value_name = "SECS", help_heading = "Sessions")]
    shutdown_timeout_secs: u64,
    /// Serve the monitoring API and live page on ADDR (a bare PORT means 127.0.0.1:PORT).
    /// Off unless given.
    #[arg(long, value_name = "ADDR", help_heading = "Monitoring")]
    api: Option<String>,
    /// Token the API requires: `Authorization: Bearer TOKEN`, or `?token=TOKEN` in a browser.
    #[arg(long, value_name = "TOKEN", env = "ANYTLS_API_TOKEN", hide_env_values = true, help_heading = "Monitoring")]
    api_token: Option<String>,
    /// Relay reads into pooled 64 KiB buffers (on) or into the relay's own reused buffer (off).
    #[arg(long, value_parser = named::<BufferPoolMode>(), default_value_t = BufferPoolMode::Off, value_name = "on|off", help_heading = "Monitoring")]
    buffer_pool: BufferPoolMode,
    /// Read flags from a TOML file: each flag's long name is a key (`listen = "…"`,
    /// `server = ["…"]`); flags given here win.
    #[arg(long, value_name = "FILE", help_heading = "Servers")]
    config: Option<PathBuf>,
    /// Read the password from the first line of FILE (keeps it out of `ps`).
    #[arg(long, value_name = "FILE", conflicts_with = "password", help_heading = "Servers")]
    password_file: Option<PathBuf>,
    /// Stream data received from servers and not yet written to local connections,
    /// across all sessions, in MiB; a session over its share stops being read
    /// [default: 1/16 of physical memory, 64..1024].
    #[arg(long, value_name = "MIB", help_heading = "Sessions")]
    buffer_budget_mib: Option<usize>,
    /// The same, for one session, in KiB.
    #[arg(long, value_name = "KIB", default_value_t = 4096, help_heading = "Sessions")]
    session_buffer_kib: usize,
    /// One stream's data held in each direction, in KiB: past it the local connection is
    /// not read until the server takes what was sent.
    #[arg(long, default_value_t = (crate::session::DEFAULT_STREAM_BUFFER >> 10) as u64, value_name = "KIB", help_heading = "Sessions")]
    stream_buffer_kib: u64,
    /// Source address of the connections to the servers (one of this machine's), instead
    /// of the one the system picks.
    #[arg(long, value_name = "IP", help_heading = "Sessions")]
    bind: Option<std::net::IpAddr>,
    #[command(flatten)]
    keepalive: KeepaliveArgs,

    // The local and API edges (kept together at the end).
    /// A local connection that has not sent its whole greeting and request (SOCKS5,
    /// SOCKS4 or HTTP) within this many seconds is closed.
    #[arg(long, default_value_t = 10, value_name = "SECS", help_heading = "Local proxy")]
    local_handshake_timeout_secs: u64,
    /// Local connections served at once; more wait in the listen queue until one ends
    /// (none is refused) [default: half the descriptors left after a reserve].
    #[arg(long, value_name = "N", help_heading = "Local proxy")]
    max_connections: Option<usize>,
    /// API connections served at once; more are answered 503 and closed.
    #[arg(long, default_value_t = crate::api::DEFAULT_MAX_CONNECTIONS, value_name = "N", help_heading = "Monitoring")]
    api_max_connections: usize,
    /// An API client must send a request's whole header within this many seconds.
    #[arg(long, default_value_t = crate::api::DEFAULT_HEADER_TIMEOUT_SECS, value_name = "SECS", help_heading = "Monitoring")]
    api_header_timeout_secs: u64,
    /// Targets (server) or servers (client) that get per-target series in `/metrics`: the
    /// most active ones, so a server meeting many destinations keeps a bounded number of
    /// series.
    #[arg(long, default_value_t = crate::metrics::snapshot::DEFAULT_METRICS_TOP_TARGETS, value_name = "N", help_heading = "Monitoring")]
    metrics_top_targets: usize,
    /// Log line format: `text` (`TIME [LEVEL] message`) or `json` (one object a line:
    /// ts, level, target, msg and the record's fields). RUST_LOG sets the level either way.
    #[arg(long, value_parser = named::<LogFormat>(), default_value_t = LogFormat::Text, value_name = "text|json", help_heading = "Monitoring")]
    log_format: LogFormat,
}

/// `anytls-client`'s flags as clap sees them: for man pages and shell completions.
pub fn command() -> clap::Command {
    Args::command()
}

/// The whole of `anytls-client`: read the flags, run, exit with one line on failure.
pub fn main() -> ExitCode {
    // Reference command lines use Go-style flags such as `-sni`.
    let mut argv = accept_single_dash_long_flags(std::env::args(), &["sni", "insecure", "ca", "pin-sha256"]);
    let checking = argv.get(1).map(String::as_str) == Some("check");
    if checking {
        argv.remove(1);
    }
    let mut args = match config::command_line_with_config(argv, &Args::command()) {
        Ok(full) => Args::parse_from(full),
        Err(why) => return exit_with("anytls-client", Err(why)),
    };
    // After the flags, so that the format can come from them (or the config file).
    crate::logging::init(args.log_format);
    if let Some(file) = &args.password_file {
        match config::read_secret_lines(file) {
            Ok(lines) => args.password = lines.into_iter().next(),
            Err(why) => return exit_with("anytls-client", Err(format!("--password-file: {why}"))),
        }
    }
    if checking {
        return check_command(&args);
    }
    exit_with("anytls-client", run(args))
}

/// `anytls-client check [FLAGS…]` (usually `check --config FILE`): every server resolved
/// and its trust loaded (CA files read, pins parsed), as start-up does, without serving;
/// each problem on its own line, exit 0 when there is none.
fn check_command(args: &Args) -> ExitCode {
    let mut found = Vec::new();
    for server in &args.servers {
        match resolve_server(server, &server_overrides(args)) {
            Ok(endpoint) => {
                if let Err(why) = client_config(&endpoint.trust) {
                    found.push(format!("{server}: {why}"));
                }
                for note in &endpoint.ignored {
                    eprintln!("anytls-client check: warning: {server}: the link's {note}");
                }
            }
            Err(why) => found.push(format!("{server}: {why}")),
        }
    }
    if args.servers.is_empty() {
        found.push("no server: give -s HOST:PORT or an anytls:// link".into());
    }
    crate::cli::check_report("anytls-client", args.config.as_deref(), &found)
}

#[tokio::main]
async fn run(args: Args) -> Result<(), String> {
    if args.api_token.is_some() && args.api.is_none() {
        log::warn!("--api-token (or ANYTLS_API_TOKEN) without --api: there is no API to protect");
    }
    // Each local connection holds two descriptors (its own and, usually, a session's).
    let fds = crate::resources::raise_fd_limit();
    let max_connections =
        args.max_connections.unwrap_or_else(|| crate::resources::client_connections_for_fd_limit(fds.limit));
    log::info!("file descriptors: {fds}; local connections at once: --max-connections {max_connections}");
    let buffers = BufferBudget::new(
        args.buffer_budget_mib.map_or_else(crate::resources::default_buffer_budget, |mib| mib << 20),
        args.session_buffer_kib << 10,
    );
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
        let (connector, trust) = connector_for(server, &args, &buffers)?;
        described.push(format!("{} ({})", connector.server, describe_trust(&trust)));
        pools.push(SessionPool::new(connector, pool_settings.clone()));
    }
    let servers =
        Servers::new(pools, args.policy, args.fallback_threshold, Duration::from_secs(args.probe_interval_secs.max(1)));
    let config = ClientConfig {
        servers: Arc::new(servers),
        stats_interval: Duration::from_secs(args.stats_interval_secs),
        credentials: args
            .socks_user
            .clone()
            .zip(args.socks_pass.clone())
            .map(|(username, password)| Credentials { username, password }),
        idle_check_interval: Duration::from_secs(args.idle_session_check_interval_secs.max(1)),
        local_handshake_timeout: Duration::from_secs(args.local_handshake_timeout_secs.max(1)),
        max_connections: max_connections.max(1),
        relay_buffers: Arc::new(RelayBuffers::new(args.buffer_pool)),
    };
    let listen = crate::accept::listen_address(&args.listen, "127.0.0.1");
    let listener = crate::accept::listen(&listen).await.map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let policy = if described.len() > 1 { format!(", policy {:?}", args.policy) } else { String::new() };
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    log::info!("SOCKS5/SOCKS4/HTTP proxy on {local}, server {}{policy}", described.join(", "));
    if let Some(api) = &args.api {
        let settings = api_settings(&args);
        crate::api::start(api, settings, config.metrics(), None).await.map_err(|e| e.to_string())?;
    }
    let shutdown = async {
        let signal = crate::shutdown::signal().await;
        log::info!("{signal} received");
    };
    client::run_until(listener, config, Duration::from_secs(args.shutdown_timeout_secs), shutdown).await;
    Ok(())
}

/// The monitoring API's settings from the flags.
fn api_settings(args: &Args) -> crate::api::ApiSettings {
    crate::api::ApiSettings {
        token: args.api_token.clone(),
        max_connections: args.api_max_connections.max(1),
        header_timeout: Duration::from_secs(args.api_header_timeout_secs.max(1)),
        metrics_top_targets: args.metrics_top_targets,
        ..crate::api::ApiSettings::default()
    }
}

/// What the command line gives for every server; a link fills in the rest
/// ([`resolve_server`] holds the precedence).
fn server_overrides(args: &Args) -> ServerOverrides {
    ServerOverrides {
        password: args.password.clone(),
        sni: args.sni.clone(),
        insecure: args.insecure,
        extra_ca: args.ca.clone(),
        pin_sha256: args.pin_sha256.clone(),
    }
}

/// The connector for one `-s` value, with the session settings the flags give.
fn connector_for(server: &str, args: &Args, buffers: &BufferBudget) -> Result<(Connector, Trust), String> {
    let endpoint = resolve_server(server, &server_overrides(args)).map_err(|e| e.to_string())?;
    for note in &endpoint.ignored {
        log::warn!("{}: the link's {note}", endpoint.server);
    }
    let connector = Connector {
        server: endpoint.server,
        server_name: endpoint.server_name,
        tls: tokio_rustls::TlsConnector::from(client_config(&endpoint.trust).map_err(|e| e.to_string())?),
        password: PasswordHash::of(&endpoint.password),
        session_config: SessionConfig {
            padding: Arc::new(ArcSwap::from_pointee(PaddingScheme::default())),
            stream_idle_timeout: secs_or_never(args.stream_idle_timeout_secs),
            buffers: buffers.clone(),
            stream_buffer: (args.stream_buffer_kib.max(4) << 10) as usize,
            ..SessionConfig::default()
        },
        client_options: ClientSessionOptions {
            heartbeat_interval: secs_or_never(args.heartbeat_interval_secs),
            heartbeat_timeout: Duration::from_secs(args.heartbeat_timeout_secs.max(1)),
            ..ClientSessionOptions::default()
        },
        connect_timeout: Duration::from_secs(args.connect_timeout_secs),
        keepalive: args.keepalive.keepalive(),
        bind: args.bind,
    };
    Ok((connector, endpoint.trust))
}

fn describe_trust(trust: &Trust) -> &'static str {
    match trust {
        Trust::Roots { .. } => "certificate verified",
        Trust::Pin(_) => "certificate pinned",
        Trust::Insecure => "certificate NOT verified",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Args {
        Args::try_parse_from(["anytls-client", "-s", "proxy.example"].iter().chain(extra)).unwrap()
    }

    #[test]
    fn the_flags_are_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn the_named_flags_take_their_types_names() {
        for kind in PoolType::ALL {
            assert_eq!(parse(&["--pool-type", kind.name()]).pool_type, kind);
        }
        for policy in Policy::ALL {
            assert_eq!(parse(&["--policy", policy.name()]).policy, policy);
        }
        for mode in BufferPoolMode::ALL {
            assert_eq!(parse(&["--buffer-pool", mode.name()]).buffer_pool, mode);
        }
        let defaults = parse(&[]);
        assert_eq!((defaults.pool_type, defaults.policy, defaults.buffer_pool), Default::default());
    }

    #[test]
    fn the_command_lines_server_settings_go_to_every_server() {
        let args = parse(&["-p", "pw", "--sni", "front.example", "--insecure", "--ca", "/ca.pem"]);
        let overrides = server_overrides(&args);
        assert_eq!(overrides.password.as_deref(), Some("pw"));
        assert_eq!(overrides.sni.as_deref(), Some("front.example"));
        assert!(overrides.insecure);
        assert_eq!(overrides.extra_ca, [PathBuf::from("/ca.pem")]);
        assert_eq!(overrides.pin_sha256, None);
    }
}
