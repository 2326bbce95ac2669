//! The admin API: users changed live (`/api/admin/…`), and the same in the shape of the
//! Shadowsocks Server Management API v1 (under `--ssm-base`, default `/ssm/v1`), so tools
//! written for it need only `password` where they send `uPSK` (which is accepted too).
//!
//! Served only when an admin token is set (`--admin-token`), and only to requests carrying
//! it as `Authorization: Bearer TOKEN`; without one these paths answer 404. Everything is
//! JSON in and out, and every error is `{"error": "…"}` with its status. See docs/users.md.

use std::net::IpAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::server::users::admin::{AdminError, NewUser, UserAdmin};
use crate::server::users::{Plan, PlanChange, UsersError};

/// Users per page when a request does not say, and at most.
const PAGE: usize = 1000;
const MAX_PAGE: usize = 10_000;

/// A JSON error with its status.
pub struct Failure(StatusCode, String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<AdminError> for Failure {
    fn from(err: AdminError) -> Failure {
        let status = match &err {
            AdminError::Users(UsersError::NoSuchUser(_)) => StatusCode::NOT_FOUND,
            AdminError::Users(UsersError::NameTaken(_) | UsersError::SamePassword(..)) => StatusCode::CONFLICT,
            AdminError::Users(_) => StatusCode::BAD_REQUEST,
            AdminError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        Failure(status, err.to_string())
    }
}

fn bad_request(why: impl std::fmt::Display) -> Failure {
    Failure(StatusCode::BAD_REQUEST, why.to_string())
}

/// The body as a JSON object, or a 400 that says why not.
fn object(body: &Bytes) -> Result<Map<String, Value>, Failure> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(bad_request("expected a JSON object")),
        Err(why) => Err(bad_request(format!("bad JSON: {why}"))),
    }
}

/// Takes a string field out of `map`.
fn take_string(map: &mut Map<String, Value>, key: &str) -> Result<Option<String>, Failure> {
    match map.remove(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(bad_request(format!("`{key}` must be a string"))),
    }
}

/// The routes of the admin API (ours and the SSM shape under `ssm_base`).
pub fn routes(admin: Arc<UserAdmin>, ssm_base: &str) -> Router {
    let ours = Router::new()
        .route("/api/admin/users", get(list_users).post(add_user))
        .route("/api/admin/users/{name}", get(get_user).patch(update_user).delete(remove_user))
        .route("/api/admin/users/{name}/kick", post(kick_user))
        .route("/api/admin/stats", get(stats));
    let ssm = Router::new()
        .route("/", get(ssm_info))
        .route("/users", get(ssm_list).post(ssm_add))
        .route("/users/{name}", get(ssm_get).patch(ssm_update).delete(ssm_remove))
        .route("/stats", get(ssm_stats));
    let base = ssm_base.trim_end_matches('/');
    let ours = ours.with_state(admin.clone());
    let ssm = ssm.with_state(admin);
    // The spec's `GET /` is the base itself, with or without its trailing slash.
    let info = Router::new().route(&format!("{base}/"), get(ssm_info)).with_state(());
    let all = if base.is_empty() { ours.merge(ssm) } else { ours.nest(base, ssm).merge(info) };
    all.method_not_allowed_fallback(|| async {
        Failure(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here".into())
    })
}

/// What the admin paths answer while the admin API is off.
pub fn off(ssm_base: &str) -> Router {
    let off =
        || async { Failure(StatusCode::NOT_FOUND, "the admin API is off: start the server with --admin-token".into()) };
    let base = ssm_base.trim_end_matches('/');
    let mut router =
        Router::new().route("/api/admin", axum::routing::any(off)).route("/api/admin/{*rest}", axum::routing::any(off));
    if !base.is_empty() {
        router =
            router.route(base, axum::routing::any(off)).route(&format!("{base}/{{*rest}}"), axum::routing::any(off));
    }
    router
}

/// `?after=NAME&limit=N&clear=true`, each optional.
#[derive(Debug, Default)]
struct PageQuery {
    /// The last name of the previous page.
    after: Option<String>,
    limit: Option<usize>,
    clear: bool,
}

impl PageQuery {
    fn parse(raw: Option<String>) -> Result<PageQuery, Failure> {
        let mut query = PageQuery::default();
        for pair in raw.as_deref().unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = super::percent_decode(value);
            match key {
                "after" => query.after = Some(value),
                "limit" => {
                    let limit = value.parse().map_err(|_| bad_request(format!("`limit`: not a count: {value:?}")))?;
                    query.limit = Some(limit);
                }
                "clear" => {
                    query.clear = match value.as_str() {
                        "true" | "1" | "" => true,
                        "false" | "0" => false,
                        _ => return Err(bad_request(format!("`clear`: expected true or false, not {value:?}"))),
                    }
                }
                "token" => {}
                other => return Err(bad_request(format!("unknown parameter `{other}` (after, limit, clear)"))),
            }
        }
        Ok(query)
    }

    fn limit(&self) -> usize {
        self.limit.unwrap_or(PAGE).clamp(1, MAX_PAGE)
    }
}

/// The `next` of a page: the name to pass as `after`, when the page was full.
fn next_after<T>(page: &[T], limit: usize, name: impl Fn(&T) -> &str) -> Option<String> {
    (page.len() == limit).then(|| page.last().map(|last| name(last).to_string())).flatten()
}

async fn list_users(State(admin): State<Arc<UserAdmin>>, RawQuery(raw): RawQuery) -> Result<Response, Failure> {
    let query = PageQuery::parse(raw)?;
    let limit = query.limit();
    let users = admin.list(query.after.as_deref(), limit);
    let next = next_after(&users, limit, |u| u.name.as_str());
    Ok(Json(json!({ "total": admin.users.len(), "users": users, "next": next })).into_response())
}

async fn add_user(State(admin): State<Arc<UserAdmin>>, body: Bytes) -> Result<Response, Failure> {
    let mut fields = object(&body)?;
    let name = take_string(&mut fields, "name")?.ok_or_else(|| bad_request("`name` is required"))?;
    let password = take_string(&mut fields, "password")?.ok_or_else(|| bad_request("`password` is required"))?;
    let plan: Plan = serde_json::from_value(Value::Object(fields)).map_err(bad_request)?;
    let view = admin.add(NewUser { name, password, plan }).await?;
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

async fn get_user(State(admin): State<Arc<UserAdmin>>, Path(name): Path<String>) -> Result<Response, Failure> {
    let view = admin.get(&name).ok_or(AdminError::Users(UsersError::NoSuchUser(name)))?;
    Ok(Json(view).into_response())
}

async fn update_user(
    State(admin): State<Arc<UserAdmin>>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, Failure> {
    let mut fields = object(&body)?;
    let password = take_string(&mut fields, "password")?;
    let change: PlanChange = serde_json::from_value(Value::Object(fields)).map_err(bad_request)?;
    Ok(Json(admin.update(&name, password.as_deref(), &change).await?).into_response())
}

async fn remove_user(State(admin): State<Arc<UserAdmin>>, Path(name): Path<String>) -> Result<StatusCode, Failure> {
    admin.remove(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn kick_user(
    State(admin): State<Arc<UserAdmin>>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, Failure> {
    let ip = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        let mut fields = object(&body)?;
        let ip = take_string(&mut fields, "ip")?;
        if let Some(other) = fields.keys().next() {
            return Err(bad_request(format!("unknown field `{other}`, expected `ip`")));
        }
        ip.map(|ip| ip.parse::<IpAddr>().map_err(|_| bad_request(format!("`ip`: not an IP address: {ip:?}"))))
            .transpose()?
    };
    Ok(Json(json!({ "closed": admin.kick(&name, ip)? })).into_response())
}

async fn stats(State(admin): State<Arc<UserAdmin>>, RawQuery(raw): RawQuery) -> Result<Response, Failure> {
    let query = PageQuery::parse(raw)?;
    let limit = query.limit();
    let users = admin.stats(query.after.as_deref(), limit, query.clear);
    let next = next_after(&users, limit, |u| u.name.as_str());
    Ok(Json(json!({ "users": users, "next": next })).into_response())
}

// ---------------------------------------------------------------------------------------
// The Shadowsocks Server Management API v1 shape.

async fn ssm_info() -> Json<Value> {
    Json(json!({ "server": concat!("anytls-rs ", env!("CARGO_PKG_VERSION")), "apiVersion": "v1" }))
}

/// A user in SSM's words: `uPSK` is our password.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct SsmUser {
    username: String,
    #[serde(rename = "uPSK")]
    u_psk: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SsmNewUser {
    username: String,
    #[serde(rename = "uPSK", alias = "password")]
    u_psk: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SsmPatch {
    #[serde(rename = "uPSK", alias = "password")]
    u_psk: String,
}

/// SSM counts per user; we have no packet counts, so the packet fields are left out.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
struct SsmTraffic {
    downlink_bytes: u64,
    uplink_bytes: u64,
    tcp_sessions: u64,
    udp_sessions: u64,
}

fn ssm_json<T: for<'a> Deserialize<'a>>(body: &Bytes) -> Result<T, Failure> {
    serde_json::from_slice(body).map_err(|why| bad_request(format!("bad request: {why}")))
}

/// Every page of `page(after)`, in pages of [`MAX_PAGE`] by name (SSM has no pagination).
fn every_page<T>(mut page: impl FnMut(Option<&str>) -> Vec<T>, name: impl Fn(&T) -> &str) -> Vec<T> {
    let mut all: Vec<T> = Vec::new();
    loop {
        let next = page(all.last().map(&name));
        let full = next.len() == MAX_PAGE;
        all.extend(next);
        if !full {
            return all;
        }
    }
}

async fn ssm_list(State(admin): State<Arc<UserAdmin>>) -> Json<Value> {
    let users: Vec<SsmUser> = every_page(|after| admin.list(after, MAX_PAGE), |u| u.name.as_str())
        .into_iter()
        .map(|u| SsmUser { username: u.name, u_psk: u.password.unwrap_or_default() })
        .collect();
    Json(json!({ "users": users }))
}

async fn ssm_add(State(admin): State<Arc<UserAdmin>>, body: Bytes) -> Result<StatusCode, Failure> {
    let new: SsmNewUser = ssm_json(&body)?;
    let added = admin.add(NewUser { name: new.username, password: new.u_psk, plan: Plan::default() }).await;
    match added {
        Ok(_) => Ok(StatusCode::CREATED),
        // The spec answers an existing user with 400.
        Err(AdminError::Users(why @ (UsersError::NameTaken(_) | UsersError::SamePassword(..)))) => {
            Err(bad_request(why))
        }
        Err(other) => Err(other.into()),
    }
}

async fn ssm_get(State(admin): State<Arc<UserAdmin>>, Path(name): Path<String>) -> Result<Json<Value>, Failure> {
    let user = admin.users.get(&name).ok_or_else(|| AdminError::Users(UsersError::NoSuchUser(name.clone())))?;
    let view = user.view();
    let usage = user.usage(false);
    let mut out = serde_json::to_value(SsmUser { username: view.name, u_psk: view.password.unwrap_or_default() })
        .expect("plain data");
    let traffic = serde_json::to_value(ssm_traffic(&usage)).expect("plain data");
    merge(&mut out, traffic);
    Ok(Json(out))
}

fn ssm_traffic(usage: &crate::server::users::UserUsage) -> SsmTraffic {
    SsmTraffic {
        downlink_bytes: usage.bytes_down,
        uplink_bytes: usage.bytes_up,
        tcp_sessions: usage.streams - usage.udp_streams,
        udp_sessions: usage.udp_streams,
    }
}

fn merge(into: &mut Value, from: Value) {
    if let (Value::Object(into), Value::Object(from)) = (into, from) {
        into.extend(from);
    }
}

async fn ssm_update(
    State(admin): State<Arc<UserAdmin>>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<StatusCode, Failure> {
    let patch: SsmPatch = ssm_json(&body)?;
    let current = admin.get(&name).ok_or_else(|| AdminError::Users(UsersError::NoSuchUser(name.clone())))?;
    if current.password.as_deref() == Some(patch.u_psk.as_str()) {
        return Err(bad_request("the uPSK is the same as the existing one"));
    }
    admin.update(&name, Some(&patch.u_psk), &PlanChange::default()).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn ssm_remove(State(admin): State<Arc<UserAdmin>>, Path(name): Path<String>) -> Result<StatusCode, Failure> {
    admin.remove(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn ssm_stats(State(admin): State<Arc<UserAdmin>>, RawQuery(raw): RawQuery) -> Result<Json<Value>, Failure> {
    let query = PageQuery::parse(raw)?;
    let mut total = SsmTraffic::default();
    let mut users = Vec::new();
    for usage in every_page(|after| admin.stats(after, MAX_PAGE, query.clear), |u| u.name.as_str()) {
        let traffic = ssm_traffic(&usage);
        total.downlink_bytes += traffic.downlink_bytes;
        total.uplink_bytes += traffic.uplink_bytes;
        total.tcp_sessions += traffic.tcp_sessions;
        total.udp_sessions += traffic.udp_sessions;
        let mut user = json!({ "username": usage.name });
        merge(&mut user, serde_json::to_value(traffic).expect("plain data"));
        users.push(user);
    }
    let mut out = serde_json::to_value(total).expect("plain data");
    merge(&mut out, json!({ "users": users }));
    Ok(Json(out))
}
