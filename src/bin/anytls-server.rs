//! `anytls-server`: accepts AnyTLS clients and connects them to their destinations.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use anytls_rs::proto::{PaddingScheme, PasswordHash};
use anytls_rs::server::tls::Identity;
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
}

fn main() -> ExitCode {
    anytls_rs::logging::init();
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(why) => {
            eprintln!("anytls-server: {why}");
            ExitCode::FAILURE
        }
    }
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
    };
    log::info!(
        "listening on {} ({} user{})",
        listener.local_addr().map_err(|e| e.to_string())?,
        config.passwords.len(),
        if config.passwords.len() == 1 { "" } else { "s" }
    );
    server::run(listener, config).await;
    Ok(())
}
