//! `--auth-url` end to end, with the real client: a password the callback knows works and
//! carries the callback's plan, its answer is cached, and a callback that refuses, errs or
//! hangs refuses the password (fail closed) without holding up the server's own users.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use common::*;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

fn hex_hash(password: &str) -> String {
    Sha256::digest(password.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Default)]
struct Calls {
    all: AtomicU64,
    known: AtomicU64,
}

/// The operator's user database: holds the hash of `cb-password` (user carol, with a plan).
async fn auth(State(calls): State<Arc<Calls>>, body: Bytes) -> Response {
    calls.all.fetch_add(1, Ordering::Relaxed);
    let Ok(request) = serde_json::from_slice::<Value>(&body) else { return StatusCode::BAD_REQUEST.into_response() };
    let auth = request["auth"].as_str().unwrap_or_default();
    assert!(request["addr"].as_str().is_some_and(|a| a.starts_with("127.0.0.1:")), "{request}");
    if auth == hex_hash("cb-password") {
        calls.known.fetch_add(1, Ordering::Relaxed);
        return axum::Json(json!({"ok": true, "id": "carol", "max-sessions": 50})).into_response();
    }
    if auth == hex_hash("slow-password") {
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
    if auth == hex_hash("error-password") {
        return (StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response();
    }
    axum::Json(json!({"ok": false})).into_response()
}

async fn spawn_callback(calls: Arc<Calls>) -> SocketAddr {
    let app = Router::new().route("/auth", post(auth)).with_state(calls);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    address
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callback_names_users_is_cached_and_fails_closed() {
    bounded(Duration::from_secs(120), "auth callback", async {
        let calls = Arc::new(Calls::default());
        let callback = spawn_callback(calls.clone()).await;
        let url = format!("http://{callback}/auth");
        let mut server = start_server(
            PASSWORD,
            &["--auth-url", &url, "--auth-timeout-secs", "1", "--auth-cache-secs", "60", "--api", "127.0.0.1:0"],
        )
        .await;
        let api = api_address(&mut server.process).await;
        let pin = server.fingerprint.clone().unwrap();
        let echo = spawn_echo().await;
        let client = |password: &'static str| {
            let pin = pin.clone();
            let addr = server.addr;
            async move { start_client(addr, password, &["--pin-sha256", &pin, "--min-idle-session", "0"]).await }
        };

        let carol = client("cb-password").await;
        assert!(echo_works(carol.addr, echo, Duration::from_secs(10)).await, "the callback's user works");
        let users = api_get(api, "/api/users", None).await.1;
        assert!(users.contains("\"carol\""), "carol is one of the users: {users}");
        // A second client of carol's: the cached answer, no second call.
        let again = client("cb-password").await;
        assert!(echo_works(again.addr, echo, Duration::from_secs(10)).await);
        assert_eq!(calls.known.load(Ordering::Relaxed), 1, "the yes is cached");

        for refused in ["nobody-password", "error-password"] {
            let stranger = client(refused).await;
            assert!(!echo_works(stranger.addr, echo, Duration::from_secs(8)).await, "{refused} is refused");
        }

        // A hanging callback refuses after its timeout, and meanwhile the -p user goes on.
        let slow = client("slow-password").await;
        let hanging = tokio::spawn(async move { echo_works(slow.addr, echo, Duration::from_secs(8)).await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        let own = client(PASSWORD).await;
        let started = Instant::now();
        assert!(echo_works(own.addr, echo, Duration::from_secs(5)).await, "the server's own user");
        let took = started.elapsed();
        announce(&format!("NOTE auth callback hanging: the -p user's first request took {took:?} meanwhile"));
        assert!(took < Duration::from_secs(1), "the -p user is not held up by the hanging callback: {took:?}");
        assert!(!hanging.await.unwrap(), "the hanging callback's password is refused");
        let metrics = api_get(api, "/metrics", None).await.1;
        assert!(!metrics.contains("anytls_auth_callback_failures_total 0\n"), "failures counted:\n{metrics}");
    })
    .await;
}
