//! `anytls-server`'s flags, and start-up: the flags (with `--config`) become the
//! server's settings (`ServerConfig`, `ServerLimits`, ...), then the server runs until a
//! signal; SIGHUP re-reads users and certificate.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::cli::config_file as config;
use crate::cli::{KeepaliveArgs, accept_single_dash_long_flags, exit_with, named, pool_type_help, secs_or_never};
use crate::fleet::{Panel, PanelSettings};
use crate::logging::LogFormat;
use crate::pool::PoolType;
use crate::proto::padding::DEFAULT_DOWNLINK_SCHEME;
use crate::proto::{Address, PaddingScheme, PasswordHash};
use crate::resources::ServerCaps;
use crate::server::access_log::{AccessLog, AccessLogSettings};
use crate::server::auth_callback::{AuthCallback, CallbackSettings};
use crate::server::dial::DnsStrategy;
use crate::server::dns::{Resolver, ServerSpec};
use crate::server::fallback::{FallbackSettings, ProbeSettings};
use crate::server::limits::ServerLimits;
use crate::server::outbound_pool::OutboundSettings;
use crate::server::policy::{Cidr, Policy};
use crate::server::route::spec::{RuleSpec, UpstreamSpec, compile_with_upstreams};
use crate::server::route::{RouteCounters, Routes};
use crate::server::state::{UserState, keep_usage};
use crate::server::tls::{CertificateSlot, Identity, KeptCertificate, kept_self_signed};
use crate::server::udp::UdpSettings;
use crate::server::users::admin::UserAdmin;
use crate::server::users::{UserEntry, Users};
use crate::server::{self, ServerConfig, ServerContext};
use crate::session::BufferBudget;
use crate::session::buffers::BufferPoolMode;

/// AnyTLS server. Without --cert/--key it makes a self-signed certificate and logs
/// its SHA-256 fingerprint (give that to clients with --pin-sha256).
#[derive(Parser, Debug)]
#[command(
    name = "anytls-server",
    version = crate::cli::VERSION,
    after_help = "Commands (before the flags):\n  check [FLAGS]                     check the configuration the flags (or --config FILE) describe, \
                  as SIGHUP does, and exit\n  link --user NAME [--host HOST[:PORT]] [--qr] [FLAGS]\n                                    print that \
                  user's anytls:// link (password and pin included) and a QR code\n  health [FLAGS]                    \
                  one TLS handshake with the listen address (a container's HEALTHCHECK): exit 0 if answered"
)]
struct Args {
    /// Address to listen on; repeat for several (`-l 0.0.0.0:8443 -l [::]:8443`)
    /// [default: 0.0.0.0:8443, or with --panel 0.0.0.0:<the panel's server_port>].
    #[arg(short = 'l', long = "listen", value_name = "ADDR", help_heading = "Listening and TLS")]
    listen: Vec<String>,
    /// Password of an unnamed user; repeat for several. Visible in `ps`: prefer
    /// ANYTLS_PASSWORD, --password-file, or users in --config.
    #[arg(
        short = 'p',
        long = "password",
        value_name = "PASSWORD",
        env = "ANYTLS_PASSWORD",
        hide_env_values = true,
        help_heading = "Configuration, users and secrets"
    )]
    passwords: Vec<String>,
    /// Certificate chain (PEM). Needs --key.
    #[arg(long, requires = "key", value_name = "FILE", help_heading = "Listening and TLS")]
    cert: Option<PathBuf>,
    /// Private key (PEM). Needs --cert.
    #[arg(long, requires = "cert", value_name = "FILE", help_heading = "Listening and TLS")]
    key: Option<PathBuf>,
    /// Padding scheme file sent to clients (default: the reference's scheme); re-read on SIGHUP.
    #[arg(long, value_name = "FILE", help_heading = "Listening and TLS")]
    padding_scheme: Option<PathBuf>,
    /// Pads the server's own first writes of each session by this scheme file (same syntax
    /// as --padding-scheme), by the built-in one (`default`, the default), or not (`off`).
    /// Re-read on SIGHUP.
    #[arg(long, value_name = "FILE|default|off", help_heading = "Listening and TLS")]
    downlink_padding_scheme: Option<PathBuf>,
    /// Timeout for each outbound connection, in seconds.
    #[arg(long, default_value_t = 5, value_name = "SECS", help_heading = "Outbound connections")]
    connect_timeout_secs: u64,
    /// Which addresses of a destination name are dialed: `system` (the resolver's order,
    /// one after another), `prefer-ipv4` / `prefer-ipv6` (both families, raced as Happy
    /// Eyeballs, RFC 8305), `ipv4-only`, `ipv6-only`.
    #[arg(long, default_value = "system", value_name = "STRATEGY", value_parser = DnsStrategy::NAMES,
          help_heading = "Outbound connections")]
    dns_strategy: String,
    /// A DNS server destination names are looked up at, instead of the system resolver
    /// (repeatable; tried in order): `ADDRESS[:PORT]` (UDP, then TCP for long answers),
    /// `udp://`, `tcp://`, `tls://HOST[:PORT]` (DNS over TLS) or `https://HOST[:PORT][/PATH]`
    /// (DNS over HTTPS). An encrypted server's HOST is the name its certificate must carry;
    /// a host name there is looked up once at start-up by the system resolver.
    #[arg(long, value_name = "SERVER", help_heading = "Outbound connections")]
    dns_server: Vec<String>,
    /// PEM file of CA certificates trusted for `tls://` and `https://` DNS servers, besides
    /// the public web's roots (a private resolver's own CA).
    #[arg(long, value_name = "FILE", requires = "dns_server", help_heading = "Outbound connections")]
    dns_ca: Option<PathBuf>,
    /// Time a client has to finish TLS and authenticate, in seconds.
    #[arg(long, default_value_t = 10, value_name = "SECS", help_heading = "Listening and TLS")]
    handshake_timeout_secs: u64,
    #[arg(long, value_name = "N", help_heading = "Listening and TLS", help = cap_help(
        "Connections in the TLS/authentication phase at once; more wait for a place until their handshake deadline",
        ServerCaps::HANDSHAKES_RULE,
    ))]
    max_handshakes: Option<usize>,
    /// Streams one session may have open at once: each counts from its SYN until its
    /// relay has ended, whatever frames arrive.
    #[arg(long, default_value_t = 1024, value_name = "N", help_heading = "Limits")]
    max_streams_per_session: usize,
    /// Sessions one user may have at once [default: --max-sessions split between the
    /// users, at most 4 ways: all for one user, half each for two, a quarter for 4 or more].
    #[arg(long, value_name = "N", help_heading = "Limits")]
    max_sessions_per_user: Option<usize>,
    /// Streams one user may have at once across its sessions [default: --max-streams,
    /// within the descriptors, split as for --max-sessions-per-user].
    #[arg(long, value_name = "N", help_heading = "Limits")]
    max_streams_per_user: Option<usize>,
    /// Once one direction of a stream has ended (FIN), the stream is ended after this
    /// long with no data, in seconds (0 = only --stream-idle-timeout-secs).
    #[arg(long, default_value_t = 60, value_name = "SECS", help_heading = "Limits")]
    half_close_timeout_secs: u64,
    /// A session with no stream that received nothing for this long is closed, in
    /// seconds (0 = never); clients close their own idle sessions far sooner.
    #[arg(long, default_value_t = 300, value_name = "SECS", help_heading = "Limits")]
    idle_session_timeout_secs: u64,
    /// One stream's data held in each direction, in KiB: past it the stream's socket is
    /// not read until the other side catches up.
    #[arg(long, default_value_t = (crate::session::DEFAULT_STREAM_BUFFER >> 10) as u64, value_name = "KIB", help_heading = "Limits")]
    stream_buffer_kib: u64,
    #[command(flatten)]
    keepalive: KeepaliveArgs,
    #[arg(long, value_parser = named::<PoolType>(), default_value_t = PoolType::LockFree, value_name = "ENGINE", help = pool_type_help("Outbound pool engine"), help_heading = "Outbound pool")]
    pool_type: PoolType,
    /// Outbound connections the pool manages per target (in use + warm); streams beyond
    /// it are dialed unpooled, never refused.
    #[arg(long, default_value_t = 100, value_name = "N", help_heading = "Outbound pool")]
    max_outbound_connections: usize,
    /// Warm connections idle longer than this are closed, and targets quiet this long are let go.
    #[arg(long, default_value_t = 300, value_name = "SECS", help_heading = "Outbound pool")]
    max_idle_time_secs: u64,
    /// Warm connections kept ready at most per busy target: a target is warmed once its
    /// demand has lasted (see --warm-after-ms), as many as it uses (0 = never warm).
    #[arg(long, default_value_t = 5, value_name = "N", help_heading = "Outbound pool")]
    min_idle_connections: usize,
    /// A target is warmed once a second stream comes at least this long after its first
    /// (within the idle window), or two start after an earlier one ended: streams that
    /// all come at once are one visit.
    #[arg(long, default_value_t = crate::server::outbound_pool::DEFAULT_WARM_AFTER.as_millis() as u64, value_name = "MS", help_heading = "Outbound pool")]
    warm_after_ms: u64,
    /// Warm connections older than this are closed, in seconds.
    #[arg(long, default_value_t = 1800, value_name = "SECS", help_heading = "Outbound pool")]
    max_lifetime_secs: u64,
    #[arg(long, value_name = "N", help_heading = "Outbound pool", help = cap_help(
        "Warm connections across all targets, idle or being dialed (a hard cap)",
        ServerCaps::WARM_RULE,
    ))]
    max_idle_total: Option<usize>,
    /// Targets to warm up at start-up: host:port,host:port.
    #[arg(long, value_delimiter = ',', value_name = "HOST:PORT,...", help_heading = "Outbound pool")]
    warmup: Vec<String>,
    /// How often pool statistics are logged, in seconds (0 = never; the final ones at shutdown still are).
    #[arg(long, default_value_t = 60, value_name = "SECS", help_heading = "Monitoring")]
    stats_interval_secs: u64,
    /// UDP-over-TCP streams with no datagram either way for this long are closed, in seconds.
    #[arg(long, default_value_t = 60, value_name = "SECS", help_heading = "Limits")]
    udp_idle_timeout_secs: u64,
    #[arg(long, value_name = "N", help_heading = "Limits", help = cap_help(
        "Authenticated sessions at once; one more gets an Alert and is closed (unauthenticated connections count \
         under --max-handshakes)",
        ServerCaps::SHARED_RULE,
    ))]
    max_sessions: Option<usize>,
    #[arg(long, value_name = "N", help_heading = "Limits", help = cap_help(
        "Streams at once across all sessions; more are refused (SYNACK error)",
        ServerCaps::SHARED_RULE,
    ))]
    max_streams: Option<usize>,
    /// A TCP stream with no data either way for this long is ended, in seconds (0 = never).
    #[arg(long, default_value_t = 300, value_name = "SECS", help_heading = "Limits")]
    stream_idle_timeout_secs: u64,
    /// On SIGINT/SIGTERM: stop accepting, then give streams in flight this long to
    /// finish before closing everything and exiting, in seconds.
    #[arg(long, default_value_t = 10, value_name = "SECS", help_heading = "Limits")]
    shutdown_timeout_secs: u64,
    /// Serve the monitoring API and live page on ADDR (a bare PORT means 127.0.0.1:PORT).
    /// Off unless given.
    #[arg(long, value_name = "ADDR", help_heading = "Monitoring")]
    api: Option<String>,
    /// Token the API requires: `Authorization: Bearer TOKEN`, or `?token=TOKEN` in a browser.
    #[arg(long, value_name = "TOKEN", env = "ANYTLS_API_TOKEN", hide_env_values = true, help_heading = "Monitoring")]
    api_token: Option<String>,
    /// Relay reads into pooled 64 KiB buffers (on) or into the relay's own reused buffer (off).
    #[arg(long, value_parser = named::<BufferPoolMode>(), default_value_t = BufferPoolMode::Off, value_name = "on|off", help_heading = "Outbound pool")]
    buffer_pool: BufferPoolMode,
    /// Read flags from a TOML file: each flag's long name is a key (`listen = "…"`,
    /// `max-sessions = 100`), plus [[users]] tables; flags given here win. Re-read on SIGHUP.
    #[arg(long, value_name = "FILE", help_heading = "Configuration, users and secrets")]
    config: Option<PathBuf>,
    /// A named user; repeat for several (config: [[users]] name = "…" password = "…",
    /// with limits such as quota-bytes: see docs/users.md).
    #[arg(long = "user", value_name = "NAME:PASSWORD", help_heading = "Configuration, users and secrets")]
    users: Vec<String>,
    /// A [[users]] table with limits, as the config file hands it on (not in --help).
    #[arg(long = "user-json", hide = true)]
    user_json: Vec<String>,
    /// A [[route]] table, as the config file hands it on (not in --help; docs/routing.md).
    #[arg(long = "route-json", hide = true)]
    route_json: Vec<String>,
    /// An [[upstream]] table, as the config file hands it on (not in --help; docs/routing.md).
    #[arg(long = "upstream-json", hide = true)]
    upstream_json: Vec<String>,
    /// Opens the admin API on --api (users changed live, docs/users.md), for requests with
    /// `Authorization: Bearer TOKEN`. Without it the admin API is off.
    #[arg(long, value_name = "TOKEN", env = "ANYTLS_ADMIN_TOKEN", hide_env_values = true, help_heading = "Users")]
    admin_token: Option<String>,
    /// Where users added through the admin API and quota usage are kept across restarts
    /// [default, when the admin API is on or a user has a quota: $STATE_DIRECTORY (systemd),
    /// /var/lib/anytls as root, else $XDG_STATE_HOME/anytls or ~/.local/state/anytls];
    /// `off`: keep nothing.
    #[arg(long, value_name = "DIR|off", help_heading = "Users")]
    state_dir: Option<PathBuf>,
    /// Take users from this panel's UniProxy node API (Xboard, V2board: its base URL) and
    /// report their traffic to it (docs/fleet.md).
    #[arg(long, value_name = "URL", requires_all = ["panel_token", "panel_node_id"], help_heading = "Fleet")]
    panel: Option<String>,
    /// The panel's node token (its `server_token`).
    #[arg(long, value_name = "TOKEN", env = "ANYTLS_PANEL_TOKEN", hide_env_values = true, help_heading = "Fleet")]
    panel_token: Option<String>,
    /// This node's id at the panel.
    #[arg(long, value_name = "ID", help_heading = "Fleet")]
    panel_node_id: Option<String>,
    /// Pull and push every SECS instead of the panel's pull_interval and push_interval.
    #[arg(long, value_name = "SECS", help_heading = "Fleet")]
    panel_interval_secs: Option<u64>,
    /// A CA file to trust for an https:// panel, beside the web PKI; repeat for several.
    #[arg(long, value_name = "FILE", help_heading = "Fleet")]
    panel_ca: Vec<PathBuf>,
    /// Ask this URL (POST) about passwords no local user has: an HTTP auth callback
    /// (docs/fleet.md). Fails closed: a timeout or error refuses.
    #[arg(long, value_name = "URL", help_heading = "Fleet")]
    auth_url: Option<String>,
    /// The auth callback must answer within this many seconds.
    #[arg(long, default_value_t = 3, value_name = "SECS", help_heading = "Fleet")]
    auth_timeout_secs: u64,
    /// How long the auth callback's yes is trusted (its no: a tenth of it, at least 1 s).
    #[arg(long, default_value_t = 300, value_name = "SECS", help_heading = "Fleet")]
    auth_cache_secs: u64,
    /// Base path of the Shadowsocks Server Management API v1 shape of the admin API.
    #[arg(long, default_value = crate::api::DEFAULT_SSM_BASE, value_parser = ssm_base, value_name = "PATH", help_heading = "Users")]
    ssm_base: String,
    /// Read passwords of unnamed users from FILE, one per line (keeps them out of `ps`).
    #[arg(long, value_name = "FILE", help_heading = "Configuration, users and secrets")]
    password_file: Option<PathBuf>,
    /// Refuse streams (TCP and UDP) to this address range, after name resolution; repeat.
    #[arg(long, value_name = "CIDR", help_heading = "Outbound connections")]
    deny: Vec<String>,
    /// Refuse streams to loopback, RFC 1918, link-local (169.254.169.254) and ULA addresses.
    #[arg(long, help_heading = "Outbound connections")]
    deny_private: bool,
    /// Stream data received and not yet written out, across all sessions, in MiB; a
    /// session over its share stops being read [default: 1/16 of physical memory,
    /// 64..1024].
    #[arg(long, value_name = "MIB", help_heading = "Limits")]
    buffer_budget_mib: Option<usize>,
    /// The same, for one session, in KiB.
    #[arg(long, value_name = "KIB", default_value_t = 4096, help_heading = "Limits")]
    session_buffer_kib: usize,

    // The API's edge (kept together at the end).
    /// API connections served at once; more are answered 503 and closed.
    #[arg(long, default_value_t = crate::api::DEFAULT_MAX_CONNECTIONS, value_name = "N", help_heading = "Monitoring")]
    api_max_connections: usize,
    /// An API client must send a request's whole header within this many seconds.
    #[arg(long, default_value_t = crate::api::DEFAULT_HEADER_TIMEOUT_SECS, value_name = "SECS", help_heading = "Monitoring")]
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
    /// Connections from this range (repeatable) start with a PROXY protocol header (v1 or
    /// v2, as HAProxy's send-proxy or nginx's proxy_protocol send), whose client address
    /// is then the client's: for per-source shares, users' addresses and the logs. Others
    /// are served as usual. Only a balancer's own address belongs here.
    #[arg(long, value_name = "CIDR")]
    proxy_protocol_from: Vec<String>,
    /// Relays to the --fallback site at once; one more is closed silently.
    #[arg(long, default_value_t = 1024, requires = "fallback")]
    max_fallback_connections: usize,
    /// Targets (server) or servers (client) that get per-target series in `/metrics`: the
    /// most active ones, so a server meeting many destinations keeps a bounded number of
    /// series.
    #[arg(long, default_value_t = crate::metrics::snapshot::DEFAULT_METRICS_TOP_TARGETS, value_name = "N", help_heading = "Monitoring")]
    metrics_top_targets: usize,
    /// Log line format: `text` (`TIME [LEVEL] message`) or `json` (one object a line:
    /// ts, level, target, msg and the record's fields). RUST_LOG sets the level either way.
    #[arg(long, value_parser = named::<LogFormat>(), default_value_t = LogFormat::Text, value_name = "text|json", help_heading = "Monitoring")]
    log_format: LogFormat,
    /// Write one record per stream, when it ends (user, client, destination, bytes up and
    /// down, duration, outcome), to FILE (appended; reopened on SIGHUP) or `-` (stdout),
    /// in --log-format. Off unless given.
    #[arg(long, value_name = "FILE|-", help_heading = "Monitoring")]
    access_log: Option<PathBuf>,
    /// Access log records waiting for the disk at most; past it records are dropped and
    /// counted (anytls_access_log_dropped_total), never waited for.
    #[arg(long, default_value_t = crate::server::access_log::DEFAULT_QUEUE, value_name = "N", requires = "access_log", help_heading = "Monitoring")]
    access_log_queue: usize,
    /// Print the pool engines' names, one a line, and exit (for scripts; not in --help).
    #[arg(long, hide = true)]
    list_pool_types: bool,
}

/// `anytls-server`'s flags as clap sees them: for man pages and shell completions.
pub fn command() -> clap::Command {
    Args::command()
}

/// The whole of `anytls-server`: read the flags, run, exit with one line on failure.
/// A cap's help: what it bounds and how its default follows the descriptor limit.
fn cap_help(what: &str, rule: &str) -> String {
    format!("{what} [default: {rule}]")
}

/// The command with each cap's default on this machine added to its help, from the same
/// [`ServerCaps`] that start-up uses, so `--help` and the start-up log cannot disagree.
fn command_here(caps: &ServerCaps) -> clap::Command {
    let here = |value: usize| {
        move |arg: clap::Arg| {
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            arg.help(format!("{help} [here: {value}]"))
        }
    };
    Args::command()
        .mut_arg("max_handshakes", here(caps.handshakes))
        .mut_arg("max_idle_total", here(caps.warm))
        .mut_arg("max_sessions", here(caps.descriptors))
        .mut_arg("max_streams", here(caps.descriptors))
}

pub fn main() -> ExitCode {
    // Reference command lines use Go-style flags such as `-padding-scheme`.
    let argv = accept_single_dash_long_flags(std::env::args(), &["padding-scheme", "cert", "key"]);
    match argv.get(1).map(String::as_str) {
        Some("link") => return exit_with("anytls-server link", print_user_link(argv)),
        Some("check") => return check_command(argv),
        Some("health") => return exit_with("anytls-server health", health_command(argv)),
        _ => {}
    }
    let fds = crate::resources::raise_fd_limit();
    let command = command_here(&ServerCaps::for_fd_limit(fds.limit));
    let args = match config::command_line_with_config(argv.clone(), &command) {
        Ok(full) => match Args::from_arg_matches(&command.get_matches_from(full)) {
            Ok(args) => args,
            Err(why) => why.exit(),
        },
        Err(why) => return exit_with("anytls-server", Err(why)),
    };
    // After the flags, so that the format can come from them (or the config file).
    crate::logging::init(args.log_format);
    if args.list_pool_types {
        PoolType::ALL.iter().for_each(|kind| println!("{kind}"));
        return ExitCode::SUCCESS;
    }
    exit_with("anytls-server", run(args, argv, fds))
}

/// The flags again, as at start-up: the same command line, the config file read anew.
fn reread_args(argv: &[String]) -> Result<Args, String> {
    let full = config::command_line_with_config(argv.to_vec(), &Args::command())?;
    Args::try_parse_from(full).map_err(|e| e.to_string().trim().to_string())
}

/// `--ssm-base`: a path below the root (the root is the live page).
fn ssm_base(value: &str) -> Result<String, String> {
    let base = value.trim_end_matches('/');
    if !base.starts_with('/') || base.is_empty() || base.contains(['?', '#', '{', '}', '*']) {
        return Err("expected a path such as /ssm/v1".into());
    }
    Ok(base.to_string())
}

/// A `[[users]]` table with a plan, as `--user-json` carries it.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileUser {
    name: String,
    password: String,
    plan: crate::server::users::Plan,
}

/// Why `password` is weak, if it is: short, or a placeholder from an example.
fn weakness(password: &str) -> Option<&'static str> {
    const PLACEHOLDERS: [&str; 6] = ["change-me", "changeme", "password", "123456", "anytls", "example"];
    let lower = password.to_lowercase();
    if PLACEHOLDERS.iter().any(|word| lower.contains(word)) {
        Some("it is, or holds, a placeholder such as the examples use")
    } else if password.chars().count() < 12 {
        Some("it is shorter than 12 characters")
    } else {
        None
    }
}

/// Warns once per weak password at start-up: whoever guesses one uses the server.
fn warn_weak_passwords(args: &Args, entries: &[UserEntry]) {
    let named = entries.iter().filter_map(|entry| Some((entry.name.clone(), entry.password.clone()?)));
    let unnamed = args.passwords.iter().enumerate().map(|(i, p)| (format!("-p#{}", i + 1), p.clone()));
    for (name, password) in named.chain(unnamed) {
        if let Some(why) = weakness(&password) {
            log::warn!("user {name}: weak password ({why}); use 16 or more random characters");
        }
    }
}

/// Every user the flags name: `--user`s and the file's tables, then `-p`/ANYTLS_PASSWORD
/// and --password-file.
fn user_entries(args: &Args) -> Result<Vec<UserEntry>, String> {
    let mut entries = args
        .users
        .iter()
        .map(|user| UserEntry::parse(user))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    for json in &args.user_json {
        let user: FileUser = serde_json::from_str(json).map_err(|e| format!("[[users]]: {e}"))?;
        entries.push(UserEntry::new(&user.name, &user.password, user.plan));
    }
    let mut passwords = args.passwords.clone();
    if let Some(file) = &args.password_file {
        passwords.extend(config::read_secret_lines(file).map_err(|e| format!("--password-file: {e}"))?);
    }
    entries.extend(UserEntry::unnamed(passwords.iter().map(|p| PasswordHash::of(p))));
    Ok(entries)
}

fn outbound_policy(args: &Args, own: Vec<std::net::SocketAddr>, counters: &RouteCounters) -> Result<Policy, String> {
    let deny = args.deny.iter().map(|range| Cidr::parse(range).map_err(|e| format!("--deny: {e}")));
    let routes = Arc::new(routes(args, counters)?);
    Ok(Policy { own, deny: deny.collect::<Result<_, _>>()?, deny_private: args.deny_private, routes })
}

/// The `--dns-server`s, parsed, and the `--dns-ca` roots.
fn dns_servers(args: &Args) -> Result<(Vec<ServerSpec>, Vec<CertificateDer<'static>>), String> {
    let specs = args.dns_server.iter().map(|text| ServerSpec::parse(text)).collect::<Result<Vec<_>, _>>()?;
    let roots = match &args.dns_ca {
        Some(path) => {
            let read = CertificateDer::pem_file_iter(path).and_then(|certs| certs.collect::<Result<Vec<_>, _>>());
            let roots = read.map_err(|e| format!("--dns-ca {}: {e}", path.display()))?;
            if roots.is_empty() {
                return Err(format!("--dns-ca {}: no certificate in it", path.display()));
            }
            roots
        }
        None => Vec::new(),
    };
    Ok((specs, roots))
}

/// Where destination names are looked up: the system resolver, or the `--dns-server`s.
async fn resolver(args: &Args, strategy: DnsStrategy) -> Result<Resolver, String> {
    let (specs, roots) = dns_servers(args)?;
    if specs.is_empty() {
        return Ok(Resolver::System);
    }
    Resolver::servers(&specs, &roots, strategy).await
}

fn proxy_protocol_sources(args: &Args) -> Result<Vec<Cidr>, String> {
    let ranges = args.proxy_protocol_from.iter();
    ranges.map(|range| Cidr::parse(range).map_err(|e| format!("--proxy-protocol-from: {e}"))).collect()
}

/// The `[[route]]` rules, rule-set files read, and the `[[upstream]]`s they name.
fn routes(args: &Args, counters: &RouteCounters) -> Result<Routes, String> {
    let specs = args
        .route_json
        .iter()
        .map(|json| serde_json::from_str::<RuleSpec>(json).map_err(|e| format!("[[route]]: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let upstreams = args
        .upstream_json
        .iter()
        .map(|json| serde_json::from_str::<UpstreamSpec>(json).map_err(|e| format!("[[upstream]]: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    compile_with_upstreams(&specs, &upstreams, counters)
}

/// Everything wrong with the configuration `args` describes, each problem one line naming
/// its flag, key or file: what `check` prints, and what a reload refuses on. (Mistakes in
/// the file's own syntax and values stop earlier, in [`reread_args`], with file and line.)
fn problems(args: &Args) -> Vec<String> {
    let mut found = Vec::new();
    match user_entries(args) {
        Ok(entries) => {
            if let Err(why) = Users::new(entries) {
                found.push(format!("users: {why}"));
            }
        }
        Err(why) => found.push(why),
    }
    if let Err(why) = padding_schemes(args) {
        found.push(why);
    }
    if let (Some(cert), Some(key)) = (&args.cert, &args.key)
        && let Err(why) = Identity::from_files(cert, key).and_then(Identity::certified_key)
    {
        found.push(format!("--cert/--key: {why}"));
    }
    if let Err(why) = outbound_policy(args, Vec::new(), &RouteCounters::default()) {
        found.push(why);
    }
    if let Err(why) = proxy_protocol_sources(args) {
        found.push(why);
    }
    if let Err(why) = dns_servers(args) {
        found.push(why);
    }
    let mut listeners = vec![];
    for listen in &args.listen {
        listeners.push(("--listen", crate::accept::listen_address(listen, "0.0.0.0")));
    }
    if let Some(api) = &args.api {
        listeners.push(("--api", crate::api::api_listen_address(api)));
    }
    for (flag, address) in &listeners {
        if address.rsplit_once(':').and_then(|(_, port)| port.parse::<u16>().ok()).is_none() {
            found.push(format!("{flag}: {address:?} is not HOST:PORT"));
        }
    }
    for (i, (flag_a, a)) in listeners.iter().enumerate() {
        for (flag_b, b) in &listeners[i + 1..] {
            if a == b && !a.ends_with(":0") {
                found.push(if flag_a == flag_b {
                    format!("{flag_a} is given {a} twice: each listener needs an address of its own")
                } else {
                    format!("{flag_a} and {flag_b} are both {a}: they need ports of their own")
                });
            }
        }
    }
    if let Some(target) = &args.fallback
        && Address::parse_host_port(target).is_none()
    {
        found.push(format!("--fallback: bad host:port {target:?}"));
    }
    for target in &args.warmup {
        if Address::parse_host_port(target).is_none() {
            found.push(format!("--warmup: bad host:port {target:?}"));
        }
    }
    found
}

/// `anytls-server check [FLAGS…]` (usually `check --config FILE`): the checks a reload
/// runs, without serving; each problem on its own line, exit 0 when there is none.
fn check_command(mut argv: Vec<String>) -> ExitCode {
    argv.remove(1);
    let args = match reread_args(&argv) {
        Ok(args) => args,
        Err(why) => {
            eprintln!("anytls-server check: {why}");
            return ExitCode::FAILURE;
        }
    };
    if let Ok(entries) = user_entries(&args) {
        let named = entries.iter().filter_map(|e| Some((e.name.clone(), e.password.clone()?)));
        for (name, why) in named.filter_map(|(name, password)| Some((name, weakness(&password)?))) {
            eprintln!("anytls-server check: warning: user {name}: weak password ({why})");
        }
    }
    crate::cli::check_report("anytls-server", args.config.as_deref(), &problems(&args))
}

/// The first `--listen` address (the default's without one), for the commands that name
/// the server: `health`, `link`.
fn first_listen_address(args: &Args) -> Result<std::net::SocketAddr, String> {
    let listen = args.listen.first().map(String::as_str).unwrap_or("0.0.0.0:8443");
    let listen = crate::accept::listen_address(listen, "0.0.0.0");
    listen.parse().map_err(|_| format!("--listen {listen:?} is not an address:port"))
}

/// `health`: one TLS handshake with the listen address the flags (or `--config`) give,
/// as a container's HEALTHCHECK runs it; exit 0 when the server answered.
fn health_command(mut argv: Vec<String>) -> Result<(), String> {
    argv.remove(1);
    let args = reread_args(&argv)?;
    let bound = first_listen_address(&args)?;
    let addr = crate::cli::health::probe_address(bound);
    let took =
        crate::cli::health::probe(addr, crate::cli::health::PROBE_TIMEOUT).map_err(|why| format!("{addr}: {why}"))?;
    println!("{addr}: TLS handshake in {:.1} ms", took.as_secs_f64() * 1000.0);
    Ok(())
}

/// Re-reads the config (SIGHUP): users and certificate, all or nothing.
fn reload(argv: &[String], context: &ServerContext, certificate: &CertificateSlot) -> Result<String, String> {
    let users = &context.users;
    let args = reread_args(argv)?;
    let found = problems(&args);
    if !found.is_empty() {
        return Err(found.join("; "));
    }
    let entries = user_entries(&args)?;
    let (padding, downlink) = padding_schemes(&args)?;
    let routes = Arc::new(routes(&args, context.policy.route_counters())?);
    let identity = match (&args.cert, &args.key) {
        (Some(cert), Some(key)) => Some(Identity::from_files(cert, key).map_err(|e| e.to_string())?),
        _ => None,
    };
    // Check the certificate fully before touching the users, so a bad one changes nothing.
    let certified = identity.map(|identity| identity.certified_key().map_err(|e| e.to_string())).transpose()?;
    let summary = users.replace(entries).map_err(|e| e.to_string())?;
    if let Some(certified) = certified {
        certificate.replace_key(certified);
    }
    // A scheme from a file replaces the running one; without the flag, one the panel gave stays.
    if let Some(padding) = padding {
        context.padding.store(Arc::new(padding));
    }
    context.downlink_padding.store(downlink.map(Arc::new));
    // The started policy (own addresses, --deny) stays; only its routes are the file's anew.
    let route_count = routes.rules().len();
    let policy = context.policy.rules();
    context.policy.replace(Policy { routes, ..(*policy).clone() });
    Ok(format!(
        "{} users ({} kept, added: {}, removed: {}, {} of the admin API or the panel left alone), certificate {}, \
         {route_count} route rule{}, {}",
        users.len(),
        summary.kept,
        list_or_none(&summary.added),
        list_or_none(&summary.removed),
        summary.left_alone,
        certificate.fingerprint(),
        if route_count == 1 { "" } else { "s" },
        describe_padding(context)
    ))
}

/// The schemes `--padding-scheme` and `--downlink-padding-scheme` name, each loaded
/// strictly (a mistake names its file and line).
fn padding_schemes(args: &Args) -> Result<(Option<PaddingScheme>, Option<PaddingScheme>), String> {
    let load = |path: &Option<PathBuf>| {
        path.as_ref()
            .map(|path| {
                let raw = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                PaddingScheme::load(&raw).map_err(|e| format!("{}: {e}", path.display()))
            })
            .transpose()
    };
    // On unless turned off: it costs about 11 µs and 470 bytes a session (benches/padding.rs).
    let downlink = match args.downlink_padding_scheme.as_ref().map(|path| path.to_str()) {
        Some(Some("off")) => None,
        None | Some(Some("default")) => {
            Some(PaddingScheme::load(DEFAULT_DOWNLINK_SCHEME.as_bytes()).expect("the built-in scheme loads"))
        }
        Some(_) => load(&args.downlink_padding_scheme)?,
    };
    Ok((load(&args.padding_scheme)?, downlink))
}

fn describe_padding(context: &ServerContext) -> String {
    let downlink = match &*context.downlink_padding.load() {
        Some(scheme) => format!("md5 {}, stop={}", scheme.md5_hex(), scheme.stop()),
        None => "off".into(),
    };
    format!("padding scheme md5 {}, downlink padding {downlink}", context.padding.load().md5_hex())
}

/// The flags a reload applies (by clap id); a change to any other needs a restart.
const RELOADED_FLAGS: [&str; 11] = [
    "config",
    "users",
    "user_json",
    "route_json",
    "upstream_json",
    "passwords",
    "password_file",
    "cert",
    "key",
    "padding_scheme",
    "downlink_padding_scheme",
];

/// The flags whose value differs between two full command lines (the config file read
/// in) and that a reload does not apply, as `--name`.
fn changed_restart_flags(started: &[String], now: &[String]) -> Vec<String> {
    let command = Args::command();
    let (Ok(before), Ok(after)) =
        (command.clone().try_get_matches_from(started), command.clone().try_get_matches_from(now))
    else {
        return Vec::new();
    };
    let raw = |matches: &clap::ArgMatches, id: &str| -> Option<Vec<std::ffi::OsString>> {
        matches.get_raw(id).map(|values| values.map(|v| v.to_owned()).collect())
    };
    command
        .get_arguments()
        .map(|arg| arg.get_id().as_str())
        .filter(|id| !RELOADED_FLAGS.contains(id) && raw(&before, id) != raw(&after, id))
        .map(|id| {
            format!("--{}", command.get_arguments().find(|a| a.get_id() == id).and_then(|a| a.get_long()).unwrap_or(id))
        })
        .collect()
}

fn list_or_none(names: &[String]) -> String {
    if names.is_empty() { "none".into() } else { names.join(", ") }
}

/// Reloads on every SIGHUP until the process ends.
#[cfg(unix)]
fn reload_on_sighup(
    argv: Vec<String>,
    context: Arc<ServerContext>,
    certificate: Arc<CertificateSlot>,
) -> Result<(), String> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangups = signal(SignalKind::hangup()).map_err(|e| format!("cannot watch SIGHUP: {e}"))?;
    tokio::spawn(async move {
        // What the flags were at start-up: a change to one a reload does not apply is said.
        let started = config::command_line_with_config(argv.clone(), &Args::command()).unwrap_or_default();
        while hangups.recv().await.is_some() {
            // Whatever the reload finds, logrotate's renamed file must be let go of.
            context.access_log.reopen();
            match reload(&argv, &context, &certificate) {
                Ok(what) => log::info!("SIGHUP: reloaded: {what}"),
                Err(why) => log::error!("SIGHUP: reload refused, the running configuration stays: {why}"),
            }
            let now = config::command_line_with_config(argv.clone(), &Args::command()).unwrap_or_default();
            let changed = changed_restart_flags(&started, &now);
            if !changed.is_empty() {
                log::warn!("SIGHUP: changed but applied only by a restart: {}", changed.join(", "));
            }
        }
    });
    Ok(())
}

#[cfg(not(unix))]
fn reload_on_sighup(_: Vec<String>, _: Arc<ServerContext>, _: Arc<CertificateSlot>) -> Result<(), String> {
    Ok(())
}

#[tokio::main]
async fn run(args: Args, argv: Vec<String>, fds: crate::resources::FdLimit) -> Result<(), String> {
    let caps = ServerCaps::for_fd_limit(fds.limit);
    let max_handshakes = args.max_handshakes.unwrap_or(caps.handshakes).max(1);
    let max_sessions = args.max_sessions.unwrap_or(caps.descriptors).max(1);
    let max_streams = args.max_streams.unwrap_or(caps.descriptors).max(1);
    let max_idle_total = args.max_idle_total.unwrap_or(caps.warm);
    log::info!(
        "file descriptors: {fds}; {} shared by client connections and streams, --max-handshakes \
         {max_handshakes}, --max-sessions {max_sessions}, --max-streams {max_streams}, --max-idle-total \
         {max_idle_total} (defaults derived from the limit)",
        caps.descriptors
    );
    let buffers = BufferBudget::new(
        args.buffer_budget_mib.map_or_else(crate::resources::default_buffer_budget, |mib| mib << 20),
        args.session_buffer_kib << 10,
    );
    log::info!(
        "buffered stream data: at most {} MiB in all (--buffer-budget-mib), {} KiB per session (--session-buffer-kib)",
        buffers.global_bytes() >> 20,
        buffers.per_session() >> 10
    );
    let entries = user_entries(&args)?;
    warn_weak_passwords(&args, &entries);
    let managed = args.admin_token.is_some() || args.panel.is_some() || args.auth_url.is_some();
    let users = if managed { Users::managed(entries) } else { Users::new(entries) };
    let users = Arc::new(users.map_err(|e| e.to_string())?);
    let state = match state_dir(&args, &users) {
        Some(dir) => Some(Arc::new(UserState::open(&dir, &users).map_err(|e| format!("--state-dir: {e}"))?)),
        None => None,
    };
    let self_signed = args.cert.is_none() || args.key.is_none();
    let identity = match (&args.cert, &args.key) {
        (Some(cert), Some(key)) => Identity::from_files(cert, key).map_err(|e| e.to_string())?,
        _ => self_signed_identity(&args)?,
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
    let (tls, certificate) = identity.reloadable_server_config().map_err(|e| e.to_string())?;
    let (padding, downlink_padding) = padding_schemes(&args)?;
    let padding = padding.unwrap_or_default();
    let warmup = args
        .warmup
        .iter()
        .map(|target| Address::parse_host_port(target).ok_or_else(|| format!("--warmup: bad host:port {target:?}")))
        .collect::<Result<Vec<_>, _>>()?;
    let dns_strategy = DnsStrategy::parse(&args.dns_strategy).expect("clap checked the name");
    let resolver = resolver(&args, dns_strategy).await?;
    let config = ServerConfig {
        tls,
        passwords: Vec::new(),
        padding,
        downlink_padding,
        connect_timeout: Duration::from_secs(args.connect_timeout_secs),
        dns_strategy,
        resolver,
        handshake_timeout: Duration::from_secs(args.handshake_timeout_secs),
        max_handshakes,
        probe: ProbeSettings { fallback, max_handshakes_per_source: args.max_handshakes_per_source },
        max_streams_per_session: args.max_streams_per_session,
        outbound: outbound_settings(&args, max_idle_total),
        warmup,
        stats_interval: Duration::from_secs(args.stats_interval_secs),
        udp: UdpSettings { idle_timeout: Duration::from_secs(args.udp_idle_timeout_secs.max(1)) },
        keepalive: args.keepalive.keepalive(),
        proxy_protocol_from: proxy_protocol_sources(&args)?,
    };
    if config.dns_strategy != DnsStrategy::System {
        log::info!("destination names are dialed by --dns-strategy {}", config.dns_strategy.name());
    }
    if let Resolver::Servers { .. } = config.resolver {
        log::info!("destination names are looked up at {} (--dns-server)", config.resolver.describe());
    }
    if !config.proxy_protocol_from.is_empty() {
        let ranges: Vec<String> = config.proxy_protocol_from.iter().map(ToString::to_string).collect();
        log::info!("connections from {} start with a PROXY protocol header (--proxy-protocol-from)", ranges.join(" "));
    }

    let limits = server_limits(&args, &caps, max_sessions, max_streams, buffers);
    let callback = match &args.auth_url {
        Some(url) => {
            let mut settings = CallbackSettings::new(url);
            settings.timeout = Duration::from_secs(args.auth_timeout_secs.max(1));
            settings.positive_ttl = Duration::from_secs(args.auth_cache_secs);
            settings.negative_ttl = Duration::from_secs((args.auth_cache_secs / 10).max(1));
            let callback = AuthCallback::new(settings).map_err(|e| format!("--auth-url: {e}"))?;
            log::info!("passwords no local user has are asked of the auth callback {url}");
            Some(Arc::new(callback))
        }
        None => None,
    };
    let access_log = match &args.access_log {
        Some(path) => {
            let settings =
                AccessLogSettings { path: path.clone(), format: args.log_format, queue: args.access_log_queue };
            let log = AccessLog::start(&settings)?;
            log::info!("access log: {} ({}), one record per stream", path.display(), args.log_format);
            log
        }
        None => AccessLog::default(),
    };
    let context = Arc::new(
        ServerContext::from_config(&config, users.clone())
            .with_relay_buffers(args.buffer_pool)
            .with_auth_callback(callback)
            .with_access_log(access_log),
    );
    let mut panel = match panel_settings(&args) {
        Some(settings) => {
            let mut panel = Panel::new(settings, context.clone(), state.clone()).map_err(|e| e.to_string())?;
            panel.keep_padding(args.padding_scheme.is_some());
            panel.start(5).await.map_err(|e| e.to_string())?;
            Some(panel)
        }
        None => None,
    };
    let listen = match (args.listen.as_slice(), panel.as_ref().and_then(|p| p.node_config().server_port)) {
        ([], Some(port)) => vec![format!("0.0.0.0:{port}")],
        ([], None) => vec!["0.0.0.0:8443".to_string()],
        (listen, _) => listen.to_vec(),
    };
    let mut listeners = Vec::with_capacity(listen.len());
    for listen in &listen {
        let listen = crate::accept::listen_address(listen, "0.0.0.0");
        // With several addresses `[::]` is IPv6 only, so that 0.0.0.0 on its port can bind too.
        let listener = crate::accept::listen_with(&listen, args.listen.len() > 1)
            .await
            .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        listeners.push(listener);
    }
    let bound_all = listeners
        .iter()
        .map(|listener| listener.local_addr())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let bound = bound_all[0];
    let mut own = bound_all.clone();
    if let Some(api) = &args.api {
        let settings = api_settings(&args);
        let admin = Arc::new(UserAdmin::new(users.clone(), state.clone()));
        own.push(crate::api::start(api, settings, context.clone(), Some(admin)).await.map_err(|e| e.to_string())?);
    } else if args.api_token.is_some() || args.admin_token.is_some() {
        log::warn!("--api-token or --admin-token without --api: there is no API to serve");
    }
    let usage_writer = state.clone().map(|state| tokio::spawn(keep_usage(state, users.clone())));
    let panel_link = panel.take().map(Panel::spawn);
    let policy = outbound_policy(&args, own, context.policy.route_counters())?;
    log_policy(&policy);
    context.policy.replace(policy);
    reload_on_sighup(argv, context.clone(), certificate.clone())?;
    log::info!("{}", describe_padding(&context));
    log::info!(
        "listening on {bound} ({} user{}: {})",
        users.len(),
        if users.len() == 1 { "" } else { "s" },
        some_names(&users.names())
    );
    for also in &bound_all[1..] {
        log::info!("also listening on {also}");
    }
    print_client_command(bound, &args, self_signed.then(|| certificate.fingerprint()));
    let shutdown = async {
        let signal = crate::shutdown::signal().await;
        log::info!("{signal} received");
    };
    server::serve(listeners, config, context, limits, shutdown).await;
    if let Some(link) = panel_link {
        // The link pushes what is left once more, then stops (at most one call's deadline).
        link.stop().await;
    }
    if let (Some(state), Some(writer)) = (state, usage_writer) {
        writer.abort();
        match state.save_usage(&users).await {
            Ok(written) => log::info!("state: usage of {written} users written at shutdown"),
            Err(why) => log::error!("state: cannot write usage at shutdown: {why}"),
        }
    }
    Ok(())
}

/// The outbound pool's settings from the flags (`max_idle_total` defaults from the descriptors).
fn outbound_settings(args: &Args, max_idle_total: usize) -> OutboundSettings {
    OutboundSettings {
        pool_type: args.pool_type,
        max_per_target: args.max_outbound_connections.max(1),
        min_idle: args.min_idle_connections,
        max_idle_total,
        max_idle_time: Duration::from_secs(args.max_idle_time_secs),
        max_lifetime: Duration::from_secs(args.max_lifetime_secs),
        warm_after: Duration::from_millis(args.warm_after_ms),
    }
}

/// The server's limits from the flags; the caps not given default from the descriptors.
fn server_limits(
    args: &Args,
    caps: &ServerCaps,
    max_sessions: usize,
    max_streams: usize,
    buffers: BufferBudget,
) -> ServerLimits {
    ServerLimits {
        max_sessions,
        max_streams,
        max_sessions_per_user: args.max_sessions_per_user.map(|n| n.max(1)),
        max_streams_per_user: args.max_streams_per_user.map(|n| n.max(1)),
        descriptors: caps.descriptors,
        stream_idle_timeout: secs_or_never(args.stream_idle_timeout_secs),
        half_close_timeout: secs_or_never(args.half_close_timeout_secs),
        idle_session_timeout: secs_or_never(args.idle_session_timeout_secs),
        drain_timeout: Duration::from_secs(args.shutdown_timeout_secs),
        buffers,
        stream_buffer: (args.stream_buffer_kib.max(4) << 10) as usize,
    }
}

/// The monitoring API's settings from the flags.
fn api_settings(args: &Args) -> crate::api::ApiSettings {
    crate::api::ApiSettings {
        token: args.api_token.clone(),
        max_connections: args.api_max_connections.max(1),
        header_timeout: Duration::from_secs(args.api_header_timeout_secs.max(1)),
        metrics_top_targets: args.metrics_top_targets,
        admin_token: args.admin_token.clone(),
        ssm_base: args.ssm_base.clone(),
    }
}

/// The first few of `names`, and how many more (a panel may have 100,000 users).
fn some_names(names: &[String]) -> String {
    const SHOWN: usize = 10;
    match names.len() {
        0 => "none yet".into(),
        n if n <= SHOWN => names.join(", "),
        n => format!("{}, … and {} more", names[..SHOWN].join(", "), n - SHOWN),
    }
}

fn panel_settings(args: &Args) -> Option<PanelSettings> {
    Some(PanelSettings {
        url: args.panel.clone()?,
        token: args.panel_token.clone().unwrap_or_default(),
        node_id: args.panel_node_id.clone().unwrap_or_default(),
        interval: args.panel_interval_secs.map(|s| Duration::from_secs(s.max(1))),
        extra_ca: args.panel_ca.clone(),
    })
}

/// The state directory to use, if any (see `--state-dir`).
fn state_dir(args: &Args, users: &Users) -> Option<PathBuf> {
    match &args.state_dir {
        Some(dir) if dir.as_os_str() == "off" => None,
        Some(dir) => Some(dir.clone()),
        None => {
            let quotas =
                users.names().iter().any(|name| users.get(name).is_some_and(|u| u.plan().quota_bytes.is_some()));
            (args.admin_token.is_some() || args.panel.is_some() || quotas).then(default_state_dir)
        }
    }
}

/// Where the self-signed certificate is kept between starts: the state directory, also
/// when no user store uses it (`--state-dir off`: nowhere, a new one at every start).
fn certificate_dir(args: &Args) -> Option<PathBuf> {
    match &args.state_dir {
        Some(dir) if dir.as_os_str() == "off" => None,
        Some(dir) => Some(dir.clone()),
        None => Some(default_state_dir()),
    }
}

/// The self-signed certificate (no --cert/--key): the one kept from the last start when
/// there is one, so clients pinned to it still connect; start-up says which.
fn self_signed_identity(args: &Args) -> Result<Identity, String> {
    let name = args.self_signed_name.as_deref();
    let shown = name.unwrap_or("localhost");
    let (identity, kept) = match certificate_dir(args) {
        Some(dir) => kept_self_signed(&dir, name).map_err(|e| e.to_string())?,
        None => {
            let fresh = match name {
                Some(name) => Identity::self_signed_named(name),
                None => Identity::self_signed(),
            };
            (fresh.map_err(|e| e.to_string())?, KeptCertificate::NotSaved("--state-dir off".into()))
        }
    };
    let fingerprint = identity.fingerprint();
    match kept {
        KeptCertificate::Reused => {
            log::info!(
                "self-signed certificate for {shown}, kept from the last start, SHA-256 fingerprint {fingerprint}"
            )
        }
        KeptCertificate::Created => {
            log::info!(
                "self-signed certificate for {shown}, new and kept for later starts, SHA-256 fingerprint {fingerprint}"
            )
        }
        // The fingerprint ends each line: scripts and tests read it from there.
        KeptCertificate::NotSaved(why) => log::info!(
            "self-signed certificate for {shown}, not kept ({why}): pinned clients need the new fingerprint after a \
             restart; SHA-256 fingerprint {fingerprint}"
        ),
    }
    Ok(identity)
}

fn default_state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("STATE_DIRECTORY").filter(|d| !d.is_empty()) {
        // systemd's StateDirectory= may list several, separated by colons: the first is ours.
        let first = dir.to_string_lossy().split(':').next().unwrap_or_default().to_string();
        return PathBuf::from(first);
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/lib/anytls");
    }
    match std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        Some(state) => PathBuf::from(state).join("anytls"),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| ".".into())).join(".local/state/anytls"),
    }
}

fn log_policy(policy: &Policy) {
    let own: Vec<String> = policy.own.iter().map(|a| a.to_string()).collect();
    let deny: Vec<String> = policy.deny.iter().map(|c| c.to_string()).collect();
    log::info!(
        "outbound policy: refusing the server's own {}{}{}",
        own.join(", "),
        if deny.is_empty() { String::new() } else { format!(", --deny {}", deny.join(" ")) },
        if policy.deny_private { ", private addresses (--deny-private)" } else { "" }
    );
    if !policy.routes.is_empty() {
        let rules: Vec<String> = policy
            .routes
            .rules()
            .iter()
            .map(|rule| format!("{} ({})", rule.name, policy.routes.action_name(rule.action)))
            .collect();
        log::info!("route rules, first match wins, then direct: {}", rules.join(", "));
    }
    for upstream in policy.routes.upstreams() {
        let at = upstream.proxy().map(|proxy| format!(" at {proxy}")).unwrap_or_default();
        let bind = upstream.bind.as_ref().map(|bind| format!(", bound {bind:?}")).unwrap_or_default();
        log::info!(
            "upstream {}: {}{at}{bind}, {:?} to connect",
            upstream.name,
            upstream.protocol.label(),
            upstream.timeout
        );
    }
}

/// Prints (stdout) a client command line and an `anytls://` link for this server. The
/// password is shown only on a terminal; elsewhere (logs, journald) it stays `PASSWORD`.
fn print_client_command(bound: std::net::SocketAddr, args: &Args, pin: Option<String>) {
    use std::io::IsTerminal;
    let host = client_facing_ip(bound.ip());
    let server = std::net::SocketAddr::new(host, bound.port());
    let first_password = args.users.first().and_then(|u| u.split_once(':')).map(|(_, p)| p.to_string());
    let password = first_password.or_else(|| args.passwords.first().cloned());
    let password = match password {
        Some(password) if std::io::stdout().is_terminal() => password,
        _ => "PASSWORD".to_string(),
    };
    let trust = pin.as_ref().map(|pin| format!(" --pin-sha256 {pin}")).unwrap_or_default();
    println!("client command: anytls-client -l 127.0.0.1:1080 -s {server} -p '{password}'{trust}");
    let link = client_link(&server.to_string(), &password, pin.as_deref());
    println!("client link: {link}");
    if std::io::stdout().is_terminal() {
        println!("{}", terminal_qr(&link));
    }
}

/// `anytls://PASSWORD@SERVER/?pin-sha256=…` (the pin for a self-signed certificate).
fn client_link(server: &str, password: &str, pin: Option<&str>) -> String {
    let query = pin.map(|pin| format!("?pin-sha256={pin}")).unwrap_or_default();
    format!("anytls://{}@{server}/{query}", percent_encode(password))
}

/// `text` as a QR code drawn with half-block characters, two rows of modules a line,
/// dark on a light border, which phone cameras read off a terminal.
fn terminal_qr(text: &str) -> String {
    match qrcode::QrCode::new(text.as_bytes()) {
        Ok(code) => code
            .render::<qrcode::render::unicode::Dense1x2>()
            .dark_color(qrcode::render::unicode::Dense1x2::Light)
            .light_color(qrcode::render::unicode::Dense1x2::Dark)
            .build(),
        Err(why) => format!("(no QR code: {why})"),
    }
}

/// `anytls-server link --user NAME [--host HOST[:PORT]] [--qr] [FLAGS…]`: the link of one user,
/// password included, for the server the same flags (or `--config FILE`) describe; with a
/// self-signed certificate, the pin of the one kept in the state directory (made now if
/// there is none yet, and used by the server from then on). A QR code follows on a
/// terminal, or with `--qr`.
fn print_user_link(argv: Vec<String>) -> Result<(), String> {
    let (mut user, mut host, mut qr, mut rest) = (None, None, false, vec![argv[0].clone()]);
    let mut words = argv.into_iter().skip(2);
    // `--user NAME` names whose link to print; `--user NAME:PASSWORD` stays a server flag.
    while let Some(word) = words.next() {
        let value = match word.as_str() {
            "--user" | "--host" => words.next().ok_or_else(|| format!("{word} needs a value"))?,
            _ => String::new(),
        };
        match word.as_str() {
            "--user" if !value.contains(':') && user.is_none() => user = Some(value),
            "--user" => rest.extend([word, value]),
            "--host" => host = Some(value),
            "--qr" => qr = true,
            _ if word.starts_with("--user=") && !word.contains(':') => user = Some(word["--user=".len()..].to_string()),
            _ if word.starts_with("--host=") => host = Some(word["--host=".len()..].to_string()),
            _ => rest.push(word),
        }
    }
    let user = user
        .ok_or("usage: anytls-server link --user NAME [--host HOST[:PORT]] [--qr] [server flags or --config FILE]")?;
    let args = reread_args(&rest)?;
    let entries = user_entries(&args)?;
    let Some(entry) = entries.iter().find(|entry| entry.name == user) else {
        let names: Vec<String> = entries.iter().map(|entry| entry.name.clone()).collect();
        return Err(format!("no user {user:?} (users: {})", some_names(&names)));
    };
    let password =
        entry.password.clone().ok_or_else(|| format!("user {user:?} has no password this command can show"))?;
    let bound = first_listen_address(&args)?;
    let server = match host {
        Some(host) => link_server(&host, bound.port()),
        None => std::net::SocketAddr::new(client_facing_ip(bound.ip()), bound.port()).to_string(),
    };
    let pin = match (&args.cert, &args.key, certificate_dir(&args)) {
        (Some(_), Some(_), _) => None,
        (_, _, Some(dir)) => {
            match kept_self_signed(&dir, args.self_signed_name.as_deref()).map_err(|e| e.to_string())? {
                (identity, KeptCertificate::Reused | KeptCertificate::Created) => Some(identity.fingerprint()),
                (_, KeptCertificate::NotSaved(why)) => return Err(format!("the self-signed certificate is {why}")),
            }
        }
        (_, _, None) => {
            return Err("with --state-dir off the self-signed certificate is new at every start: no pin to give".into());
        }
    };
    let link = client_link(&server, &password, pin.as_deref());
    println!("{link}");
    if qr || std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        println!("{}", terminal_qr(&link));
    }
    Ok(())
}

/// `--host` as the link's server: `HOST:PORT` as given (a container or NAT publishes
/// another port than the one listened on), a bare host with the listen port, an IPv6
/// address in brackets.
fn link_server(host: &str, listen_port: u16) -> String {
    if host.parse::<std::net::SocketAddr>().is_ok() {
        return host.to_string();
    }
    if let Some((name, port)) = host.rsplit_once(':')
        && !name.contains(':')
        && port.parse::<u16>().is_ok()
    {
        return host.to_string();
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<std::net::Ipv6Addr>() {
        Ok(ip) => std::net::SocketAddr::new(ip.into(), listen_port).to_string(),
        Err(_) => format!("{host}:{listen_port}"),
    }
}

/// The address a client would use: the listen address, or for a wildcard listen the
/// address of the route out (no packet is sent), or loopback.
fn client_facing_ip(listen: IpAddr) -> IpAddr {
    if !listen.is_unspecified() {
        return listen;
    }
    let probe = std::net::UdpSocket::bind("0.0.0.0:0").and_then(|s| s.connect("192.0.2.1:9").map(|()| s));
    probe.and_then(|s| s.local_addr()).map(|a| a.ip()).unwrap_or(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST))
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_links_host_keeps_its_own_port_and_brackets_ipv6() {
        assert_eq!(link_server("proxy.example.com", 8443), "proxy.example.com:8443");
        assert_eq!(link_server("proxy.example.com:443", 8443), "proxy.example.com:443");
        assert_eq!(link_server("192.0.2.7", 8443), "192.0.2.7:8443");
        assert_eq!(link_server("192.0.2.7:443", 8443), "192.0.2.7:443");
        assert_eq!(link_server("2001:db8::7", 8443), "[2001:db8::7]:8443");
        assert_eq!(link_server("[2001:db8::7]", 8443), "[2001:db8::7]:8443");
        assert_eq!(link_server("[2001:db8::7]:443", 8443), "[2001:db8::7]:443");
    }

    #[test]
    fn a_reload_names_the_changed_flags_it_does_not_apply() {
        let line = |extra: &[&str]| -> Vec<String> {
            ["anytls-server", "--user=a:pw"].iter().chain(extra).map(|s| s.to_string()).collect()
        };
        let started = line(&["--listen=0.0.0.0:8443", "--max-sessions=10"]);
        let now = line(&["--listen=0.0.0.0:9443", "--max-sessions=10", "--user=b:pw2"]);
        assert_eq!(
            changed_restart_flags(&started, &now),
            ["--listen"],
            "users are reloaded, the listen address is not"
        );
        let more = line(&["--listen=0.0.0.0:8443", "--max-sessions=20", "--deny=192.0.2.0/24"]);
        assert_eq!(changed_restart_flags(&started, &more), ["--max-sessions", "--deny"]);
        assert!(changed_restart_flags(&started, &started).is_empty());
    }

    #[test]
    fn weak_passwords_are_named_and_strong_ones_are_not() {
        assert!(weakness("change-me-alice").unwrap().contains("placeholder"));
        assert!(weakness("hunter2").unwrap().contains("12 characters"));
        assert_eq!(weakness("tG7#kq9!Vd2@xL4m"), None);
        assert_eq!(weakness("correct horse battery staple"), None);
    }

    #[test]
    fn the_flags_are_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn pool_type_accepts_exactly_the_engines_names() {
        let command = Args::command();
        let arg = command.get_arguments().find(|arg| arg.get_long() == Some("pool-type")).unwrap();
        let listed: Vec<String> = arg.get_possible_values().iter().map(|v| v.get_name().to_string()).collect();
        assert_eq!(listed, PoolType::ALL.map(|kind| kind.name().to_string()));
        for kind in PoolType::ALL {
            let args = Args::try_parse_from(["anytls-server", "--pool-type", kind.name()]).unwrap();
            assert_eq!(args.pool_type, kind);
        }
        assert!(Args::try_parse_from(["anytls-server", "--pool-type", "mutex"]).is_err());
    }

    #[test]
    fn the_list_of_pool_types_is_hidden_and_off_by_default() {
        let command = Args::command();
        let arg = command.get_arguments().find(|arg| arg.get_long() == Some("list-pool-types")).unwrap();
        assert!(arg.is_hide_set());
        assert!(!Args::parse_from(["anytls-server"]).list_pool_types);
        assert!(Args::parse_from(["anytls-server", "--list-pool-types"]).list_pool_types);
    }
}
