//! The monitoring API (`--api ADDR`): the pools' statistics as JSON, as Prometheus metrics,
//! and a live page, over plain HTTP/1.1 served by axum.
//!
//! - `GET /api/connection-pool-stats`: [`stats::ConnectionPoolStats`] as JSON.
//! - `GET /api/memory-pool-stats`: [`stats::MemoryPoolStats`] as JSON.
//! - `GET /api/events`: server-sent events, one [`stats::Snapshot`] a second (the page's feed).
//! - `GET /api/users`: [`stats::UsersStats`] (server): per-user counters, authentication
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
//! The API only reads counters; it shares nothing with the proxy's data path but the
//! atomics it loads, and runs on the same runtime as the proxy (a request costs microseconds).

pub mod stats;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Json, Response};
use axum::routing::get;
use futures_util::Stream;
use tokio::net::TcpListener;

use crate::pool::buffers::{BufferPoolMode, relay_buffer_pool_mode, relay_buffer_stats};
use stats::{ConnectionPoolStats, MemoryPoolStats, Snapshot};

/// How often the live page gets a new snapshot.
const EVENT_INTERVAL: Duration = Duration::from_secs(1);

/// The live page, compiled in.
const PAGE: &str = include_str!("page.html");

/// A pool the API can show: the server's outbound pool, the client's servers.
pub trait PoolSource: Send + Sync + 'static {
    fn connection_pool_stats(&self) -> ConnectionPoolStats;
}

#[derive(Clone)]
struct ApiState {
    source: Arc<dyn PoolSource>,
    token: Option<Arc<str>>,
}

/// The address `--api VALUE` means: a bare port is on loopback, anything else as given.
pub fn api_listen_address(value: &str) -> String {
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        format!("127.0.0.1:{value}")
    } else {
        value.to_string()
    }
}

/// Binds `--api`'s address and serves the API in the background; returns the bound
/// address, which is also logged as `api on ADDR` (so `:0` works).
pub async fn start(value: &str, token: Option<String>, source: Arc<dyn PoolSource>) -> Result<SocketAddr, String> {
    let address = api_listen_address(value);
    let listener = TcpListener::bind(&address).await.map_err(|e| format!("--api: cannot listen on {address}: {e}"))?;
    let bound = listener.local_addr().map_err(|e| e.to_string())?;
    let token = token.filter(|t| !t.is_empty());
    log::info!("api on {bound} (http://{bound}/){}", if token.is_some() { ", bearer token required" } else { "" });
    if token.is_none() && !bound.ip().is_loopback() {
        log::warn!(
            "api on {bound} is reachable from other machines and has no --api-token: anyone who can \
             reach it sees the pool statistics and target names"
        );
    }
    let app = router(source, token);
    tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            log::warn!("api on {bound} stopped: {err}");
        }
    });
    Ok(bound)
}

/// The routes, behind the token check when a token is set.
fn router(source: Arc<dyn PoolSource>, token: Option<String>) -> Router {
    let state = ApiState { source, token: token.map(Arc::from) };
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

async fn memory_pool_stats() -> Json<MemoryPoolStats> {
    Json(memory_stats())
}

async fn metrics(State(state): State<ApiState>) -> Response {
    let mut body = stats::render_prometheus(&snapshot(&state));
    body.push_str(&users_stats().map(|users| stats::render_user_metrics(&users)).unwrap_or_default());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response()
}

/// The server's users, when the binary has shown them ([`show_users`]).
static USERS: std::sync::OnceLock<Arc<crate::server::users::Users>> = std::sync::OnceLock::new();

/// Makes the API show `users` (`/api/users`, the page, `/metrics`).
pub fn show_users(users: Arc<crate::server::users::Users>) {
    let _ = USERS.set(users);
}

fn users_stats() -> Option<stats::UsersStats> {
    use crate::server::policy::{Refusal, refused_total};
    let users = USERS.get()?;
    Some(stats::UsersStats {
        users: users.report(),
        auth_failures: users.auth_failures(),
        policy_refused: Refusal::ALL.iter().map(|r| (r.label(), refused_total(*r))).collect(),
    })
}

/// `null` on the client, which has no users.
async fn users() -> Json<Option<stats::UsersStats>> {
    Json(users_stats())
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
    let unix_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    Snapshot { unix_ms, connections: state.source.connection_pool_stats(), memory: memory_stats() }
}

fn memory_stats() -> MemoryPoolStats {
    MemoryPoolStats { enabled: relay_buffer_pool_mode() == BufferPoolMode::On, tiers: relay_buffer_stats() }
}

/// Lets a request through when no token is set, or when it carries the token.
async fn require_token(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let Some(token) = &state.token else { return next.run(request).await };
    let bearer = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::to_string);
    let query = request.uri().query().and_then(token_in_query);
    let presented = bearer.or(query);
    if presented.is_some_and(|given| same_secret(given.as_bytes(), token.as_bytes())) {
        return next.run(request).await;
    }
    let mut refused =
        (StatusCode::UNAUTHORIZED, "a bearer token is required (Authorization: Bearer TOKEN or ?token=TOKEN)\n")
            .into_response();
    refused.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    refused
}

/// The `token` parameter of a query string, percent-decoded.
fn token_in_query(query: &str) -> Option<String> {
    query.split('&').find_map(|pair| pair.strip_prefix("token=")).map(percent_decode)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                if let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    out.push((hi * 16 + lo) as u8);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Compares without stopping at the first difference, so the time taken does not tell an
/// attacker how much of a guess was right.
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len() && given.iter().zip(expected).fold(0u8, |diff, (a, b)| diff | (a ^ b)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_port_means_loopback() {
        assert_eq!(api_listen_address("9090"), "127.0.0.1:9090");
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
    fn secrets_compare_whole() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abd", b"abc"));
        assert!(!same_secret(b"ab", b"abc"));
    }
}
