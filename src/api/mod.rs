//! The monitoring API (`--api ADDR`): the pools' statistics as JSON, as Prometheus metrics,
//! and a live page, over plain HTTP/1.1 served by axum.
//!
//! - `GET /api/connection-pool-stats`: [`ConnectionPoolStats`] as JSON.
//! - `GET /api/memory-pool-stats`: [`MemoryPoolStats`] as JSON.
//! - `GET /api/events`: server-sent events, one [`Snapshot`] a second (the page's feed).
//! - `GET /api/users`: [`UsersStats`] (server): per-user counters, authentication
//!   failures, outbound policy refusals.
//! - `GET /metrics`: the Prometheus text exposition of the same numbers.
//! - `GET /`: the live page (`page.html`, compiled into the binary: no CDN, no files).
//!
//! The API is off unless asked for, and listens on loopback when given a bare port. With
//! `--api-token` every request must carry the token, as `Authorization: Bearer TOKEN` or,
//! for a browser (which cannot add headers to a link or to an `EventSource`), as
//! `?token=TOKEN`. Without a token on a non-loopback address anyone who can reach the port
//! sees the targets the proxy talks to, so that case logs a warning.
//!
//! The port guards itself: at most `--api-max-connections` connections at once (more get
//! `503` and are closed), and a request's header must arrive within
//! `--api-header-timeout-secs` (a client trickling bytes is closed).
//!
//! The API reads counters through the service's [`MetricsSource`], and serves what the
//! metrics room renders; it shares nothing with the proxy's data path but the atomics it
//! loads, and runs on the same runtime as the proxy (a request costs microseconds).
//!
//! On the server, with `--admin-token`, the same port serves the admin API ([`admin`]):
//! users changed live, behind that token alone (`Authorization: Bearer TOKEN`). The admin
//! token also opens the read-only routes; the read-only token never opens the admin API.

pub mod admin;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Json, Response};
use axum::routing::get;
use futures_util::Stream;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::metrics::snapshot::DEFAULT_METRICS_TOP_TARGETS;
use crate::metrics::{ConnectionPoolStats, MemoryPoolStats, MetricsSource, Snapshot, UsersStats};

/// How often the live page gets a new snapshot.
const EVENT_INTERVAL: Duration = Duration::from_secs(1);

/// The live page, compiled in.
const PAGE: &str = include_str!("page.html");

#[derive(Clone)]
struct ApiState {
    source: Arc<dyn MetricsSource>,
    /// Targets with series of their own in `/metrics` (the most active).
    top_targets: usize,
    /// SHA-256 of the token: requests are checked by comparing digests, which takes the
    /// same time whatever the length of the guess or of the token.
    token_digest: Option<[u8; 32]>,
    /// SHA-256 of the admin token.
    admin_digest: Option<[u8; 32]>,
}

/// Default for `--ssm-base`.
pub const DEFAULT_SSM_BASE: &str = "/ssm/v1";

/// Default for `--api-max-connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 64;
/// Default for `--api-header-timeout-secs`.
pub const DEFAULT_HEADER_TIMEOUT_SECS: u64 = 10;

/// How the API guards itself.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    /// Required as `Authorization: Bearer TOKEN` or `?token=TOKEN`; none means open.
    pub token: Option<String>,
    /// Connections served at once (a live page holds one for as long as it is open).
    /// More are answered `503` and closed, so idle or slow clients cannot pile up.
    pub max_connections: usize,
    /// A request's whole header must arrive within this time (slow-loris), and an idle
    /// keep-alive connection is closed after it.
    pub header_timeout: Duration,
    /// How many targets (the most active) get per-target series in `/metrics`.
    pub metrics_top_targets: usize,
    /// Opens the admin API (server), as `Authorization: Bearer TOKEN`; none: it is off.
    pub admin_token: Option<String>,
    /// Where the Shadowsocks Server Management API v1 shape is served.
    pub ssm_base: String,
}

impl Default for ApiSettings {
    fn default() -> ApiSettings {
        ApiSettings {
            token: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_timeout: Duration::from_secs(DEFAULT_HEADER_TIMEOUT_SECS),
            metrics_top_targets: DEFAULT_METRICS_TOP_TARGETS,
            admin_token: None,
            ssm_base: DEFAULT_SSM_BASE.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("--api: cannot listen on {address}: {source}")]
    Listen { address: String, source: std::io::Error },
}

/// The address `--api VALUE` means: a bare port is on loopback, anything else as given.
pub fn api_listen_address(value: &str) -> String {
    crate::accept::listen_address(value, "127.0.0.1")
}

/// Binds `--api`'s address and serves the API in the background; returns the bound
/// address, which is also logged as `api on ADDR` (so `:0` works).
///
/// `admin` (the server's users) is served as the admin API when `settings.admin_token` is set.
pub async fn start(
    value: &str,
    settings: ApiSettings,
    source: Arc<dyn MetricsSource>,
    admin: Option<Arc<crate::server::users::admin::UserAdmin>>,
) -> Result<SocketAddr, ApiError> {
    let address = api_listen_address(value);
    let listen_error = |source| ApiError::Listen { address: address.clone(), source };
    let listener = TcpListener::bind(&address).await.map_err(listen_error)?;
    let bound = listener.local_addr().map_err(listen_error)?;
    let token = settings.token.clone().filter(|t| !t.is_empty());
    let admin_token = settings.admin_token.clone().filter(|t| !t.is_empty());
    let admin = admin.filter(|_| admin_token.is_some());
    log::info!(
        "api on {bound} (http://{bound}/), at most {} connections{}{}",
        settings.max_connections,
        if token.is_some() { ", bearer token required" } else { "" },
        if admin.is_some() { format!(", admin API on /api/admin and {}", settings.ssm_base) } else { String::new() }
    );
    if token.is_none() && !bound.ip().is_loopback() {
        log::warn!(
            "api on {bound} is reachable from other machines and has no --api-token: anyone who can \
             reach it sees the pool statistics and target names"
        );
    }
    let app = router(source, settings.metrics_top_targets, token, admin_token.zip(admin), &settings.ssm_base);
    tokio::spawn(serve(listener, app, settings));
    Ok(bound)
}

/// Answer to a connection over the cap: written without waiting, then closed.
const BUSY: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 1\r\nConnection: close\r\n\r\n";

/// Accepts API connections and serves each with hyper's HTTP/1.1, under the
/// connection cap and the header timeout (axum's own `serve` has neither).
async fn serve(listener: TcpListener, app: Router, settings: ApiSettings) {
    let slots = Arc::new(Semaphore::new(settings.max_connections));
    let mut refused_since_log = 0u64;
    let mut last_log: Option<tokio::time::Instant> = None;
    loop {
        let (tcp, peer) = crate::accept::accept_with_backoff(&listener).await;
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Never wait on a refused client: one non-blocking write, then close.
            let _ = tcp.try_write(BUSY);
            refused_since_log += 1;
            if last_log.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
                log::warn!(
                    "api: {refused_since_log} connections refused at the cap of {} (latest from {peer})",
                    settings.max_connections
                );
                refused_since_log = 0;
                last_log = Some(tokio::time::Instant::now());
            }
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        let header_timeout = settings.header_timeout;
        tokio::spawn(async move {
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new()).header_read_timeout(header_timeout);
            if let Err(err) = http.serve_connection(TokioIo::new(tcp), service).await {
                log::debug!("api: {peer}: {err}");
            }
            drop(slot);
        });
    }
}

/// The routes, behind the token check when a token is set, and the admin API behind its
/// own token when there is one.
fn router(
    source: Arc<dyn MetricsSource>,
    top_targets: usize,
    token: Option<String>,
    admin: Option<(String, Arc<crate::server::users::admin::UserAdmin>)>,
    ssm_base: &str,
) -> Router {
    let state = ApiState {
        source,
        top_targets,
        token_digest: token.map(|token| digest(token.as_bytes())),
        admin_digest: admin.as_ref().map(|(token, _)| digest(token.as_bytes())),
    };
    let admin_routes = match admin {
        Some((_, admin)) => {
            admin::routes(admin, ssm_base).layer(middleware::from_fn_with_state(state.clone(), require_admin_token))
        }
        None => admin::off(ssm_base),
    };
    read_routes(state).merge(admin_routes)
}

fn read_routes(state: ApiState) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/api/connection-pool-stats", get(connection_pool_stats))
        .route("/api/memory-pool-stats", get(memory_pool_stats))
        .route("/api/events", get(events))
        .route("/metrics", get(metrics))
        .route("/api/users", get(users))
        .layer(middleware::from_fn_with_state(state.clone(), require_token))
        .with_state(state)
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

async fn connection_pool_stats(State(state): State<ApiState>) -> Json<ConnectionPoolStats> {
    Json(state.source.connection_pool_stats())
}

async fn memory_pool_stats(State(state): State<ApiState>) -> Json<MemoryPoolStats> {
    Json(state.source.memory_pool_stats())
}

async fn metrics(State(state): State<ApiState>) -> Response {
    let body = crate::metrics::render_prometheus(state.source.as_ref(), state.top_targets);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response()
}

/// `null` on the client, which has no users.
async fn users(State(state): State<ApiState>) -> Json<Option<UsersStats>> {
    Json(state.source.users_stats())
}

/// One snapshot now, then one every [`EVENT_INTERVAL`], until the browser goes away.
async fn events(State(state): State<ApiState>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let ticks = tokio::time::interval(EVENT_INTERVAL);
    let feed = futures_util::stream::unfold((ticks, state), |(mut ticks, state)| async move {
        ticks.tick().await;
        let event = Event::default().event("snapshot").json_data(snapshot(&state)).unwrap_or_default();
        Some((Ok(event), (ticks, state)))
    });
    Sse::new(feed).keep_alive(KeepAlive::default())
}

fn snapshot(state: &ApiState) -> Snapshot {
    crate::metrics::snapshot(state.source.as_ref())
}

/// Lets a request through when no token is set, or when it carries the token (or the
/// admin token).
async fn require_token(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let Some(expected) = &state.token_digest else { return next.run(request).await };
    let bearer = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(bearer_token)
        .map(str::to_string);
    let query = request.uri().query().and_then(token_in_query);
    let presented = bearer.or(query).map(|given| digest(given.as_bytes()));
    let admin = state.admin_digest.as_ref();
    // Both compared, always: the time taken does not tell which token a guess was near.
    let opens = |given: &[u8; 32]| same_digest(given, expected) | admin.is_some_and(|admin| same_digest(given, admin));
    if presented.as_ref().is_some_and(opens) {
        return next.run(request).await;
    }
    let mut refused =
        (StatusCode::UNAUTHORIZED, "a bearer token is required (Authorization: Bearer TOKEN or ?token=TOKEN)\n")
            .into_response();
    refused.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    refused
}

/// Lets a request to the admin API through only with the admin token as a bearer token;
/// anything else is a JSON 401.
async fn require_admin_token(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(bearer_token)
        .map(|given| digest(given.as_bytes()));
    let expected = state.admin_digest.as_ref();
    if let (Some(given), Some(expected)) = (&presented, expected)
        && same_digest(given, expected)
    {
        return next.run(request).await;
    }
    let why = "the admin token is required: Authorization: Bearer TOKEN";
    let mut refused = (StatusCode::UNAUTHORIZED, Json(serde_json::json!({ "error": why }))).into_response();
    refused.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    refused
}

/// The token of an `Authorization: Bearer TOKEN` value; the scheme is case-insensitive
/// (RFC 9110 §11.1), so `bearer` and `BEARER` work too.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim_start())
}

/// The `token` parameter of a query string, percent-decoded.
fn token_in_query(query: &str) -> Option<String> {
    query.split('&').find_map(|pair| pair.strip_prefix("token=")).map(percent_decode)
}

/// Form decoding: `+` is a space, `%XX` a byte; a `%` without two hex digits after it
/// stays as it is, and bytes that are not UTF-8 become U+FFFD.
fn percent_decode(s: &str) -> String {
    // `+` first: a `%2B` must stay a plus.
    let spaced = s.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced).decode_utf8_lossy().into_owned()
}

fn digest(secret: &[u8]) -> [u8; 32] {
    Sha256::digest(secret).into()
}

/// Compares two digests without stopping at the first difference. Digests have one
/// length, so neither the time nor the answer depends on the length of a guess.
fn same_digest(given: &[u8; 32], expected: &[u8; 32]) -> bool {
    given.ct_eq(expected).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_port_means_loopback() {
        assert_eq!(api_listen_address("9090"), "127.0.0.1:9090");
        assert_eq!(api_listen_address(":9090"), "127.0.0.1:9090");
        assert_eq!(api_listen_address("0.0.0.0:9090"), "0.0.0.0:9090");
        assert_eq!(api_listen_address("[::1]:0"), "[::1]:0");
    }

    #[test]
    fn the_token_is_found_in_the_query_and_decoded() {
        assert_eq!(token_in_query("token=abc"), Some("abc".into()));
        assert_eq!(token_in_query("x=1&token=a%2Fb%3d+c"), Some("a/b= c".into()));
        assert_eq!(token_in_query("token=50%"), Some("50%".into()));
        assert_eq!(token_in_query("tokens=abc"), None);
    }

    #[test]
    fn invalid_escapes_stay_as_they_are() {
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("%%41"), "%A");
        assert_eq!(percent_decode("%2B+%2b"), "+ +");
        assert_eq!(percent_decode("a%41"), "aA");
        assert_eq!(percent_decode("%FF"), "\u{FFFD}");
        assert_eq!(percent_decode("%e2%82%AC"), "€");
    }

    #[test]
    fn tokens_compare_by_digest() {
        let expected = digest(b"abc");
        assert!(same_digest(&digest(b"abc"), &expected));
        assert!(!same_digest(&digest(b"abd"), &expected));
        assert!(!same_digest(&digest(b"ab"), &expected));
        assert!(!same_digest(&digest(b"abcd"), &expected));
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer abc"), Some("abc"));
        assert_eq!(bearer_token("BEARER   abc"), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer"), None);
    }
}
