//! The operator's side of pgmux.
//!
//! - The HTTP admin port (`[admin] listen`): `/metrics` for Prometheus (`metrics.rs`),
//!   `/health` and `/ready` for probes, `/pools`, `/clients` and `/servers` as JSON
//!   (`views.rs`), `POST /reload`, and pause / resume / reconnect per pool. With
//!   `[admin] token` set, every endpoint but `/health` and `/ready` needs
//!   `Authorization: Bearer <token>`. It runs on a thread of its own, with limits on its
//!   connections (`port.rs`).
//! - The PgBouncer-style console on the client port (`console.rs`):
//!   `psql -p 6432 -U admin pgbouncer`.
//!
//! Handlers that read (metrics, views) run on the admin thread: they read atomics and
//! take each pool's lock briefly; none waits on a client. Handlers that change something
//! (reload, pool actions) run on the runtime that serves clients
//! ([`Pooler::runtime`]), so that whatever they start lives there.

pub mod console;
pub mod metrics;
mod port;
pub mod views;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tracing::info;

use crate::logging::Escaped;
use crate::pool::Pool;
use crate::pooler::Pooler;
use metrics::Metrics;
pub use port::{PortStats, serve, start};

/// How long `pause` waits for running transactions before it answers.
const PAUSE_WAIT: Duration = Duration::from_secs(10);

#[derive(Clone)]
struct Admin {
    pooler: Arc<Pooler>,
    metrics: Arc<Metrics>,
}

/// The admin routes; `port` is what the admin port counts about its connections.
pub fn router(pooler: Arc<Pooler>, port: Arc<PortStats>) -> Router {
    let state = Admin {
        metrics: Arc::new(Metrics::with_port(&pooler, port)),
        pooler,
    };
    let guarded = Router::new()
        .route("/", get(index))
        .route("/metrics", get(metrics))
        .route("/pools", get(pools))
        .route("/clients", get(clients))
        .route("/servers", get(servers))
        .route("/reload", post(reload))
        .route("/pools/{database}/{user}/{action}", post(pool_action))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .merge(guarded)
        .with_state(state)
}

/// Refuses a request without the configured bearer token (when one is configured).
async fn require_token(State(admin): State<Admin>, request: Request, next: Next) -> Response {
    let snapshot = admin.pooler.snapshot();
    let Some(token) = snapshot.config.admin.token.as_deref() else {
        return next.run(request).await;
    };
    if bearer(request.headers()).is_some_and(|given| same(given.as_bytes(), token.as_bytes())) {
        return next.run(request).await;
    }
    let mut response = (
        StatusCode::UNAUTHORIZED,
        axum::Json(json!({"error": "missing or wrong bearer token (admin.token)"})),
    )
        .into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"pgmux\""),
    );
    response
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Compares without stopping at the first difference, so timing does not tell how much
/// of a guess was right.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn index() -> axum::Json<Value> {
    axum::Json(json!({
        "pgmux": env!("CARGO_PKG_VERSION"),
        "endpoints": [
            "GET /health", "GET /ready", "GET /metrics", "GET /pools", "GET /clients",
            "GET /servers", "POST /reload", "POST /pools/{database}/{user}/pause",
            "POST /pools/{database}/{user}/resume", "POST /pools/{database}/{user}/reconnect",
        ],
    }))
}

async fn health() -> &'static str {
    "ok\n"
}

async fn ready(State(admin): State<Admin>) -> Response {
    match views::readiness(&admin.pooler) {
        Ok(()) => (StatusCode::OK, axum::Json(json!({"ready": true}))).into_response(),
        Err(reasons) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({
                "ready": false,
                "draining": admin.pooler.drain.is_begun(),
                "reasons": reasons,
            })),
        )
            .into_response(),
    }
}

async fn metrics(State(admin): State<Admin>) -> Response {
    let body = admin.metrics.render();
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        body,
    )
        .into_response()
}

async fn pools(State(admin): State<Admin>) -> axum::Json<Vec<views::PoolJson>> {
    axum::Json(views::pools(&admin.pooler))
}

async fn clients(State(admin): State<Admin>) -> axum::Json<Vec<views::ClientJson>> {
    axum::Json(views::clients(&admin.pooler))
}

async fn servers(State(admin): State<Admin>) -> axum::Json<Vec<views::ServerJson>> {
    axum::Json(views::servers(&admin.pooler))
}

async fn reload(State(admin): State<Admin>) -> Response {
    let pooler = admin.pooler.clone();
    // Reading and checking the file is blocking work (and SCRAM keys are derived). It runs
    // in the client runtime's blocking pool: what a reload starts belongs to that runtime.
    let result = admin
        .pooler
        .runtime()
        .spawn_blocking(move || pooler.reload())
        .await;
    match result {
        Ok(Ok(changes)) => (
            StatusCode::OK,
            axum::Json(json!({"ok": true, "changes": changes})),
        )
            .into_response(),
        Ok(Err(e)) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            axum::Json(json!({"ok": false, "errors": e.problems()})),
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            axum::Json(json!({"ok": false, "errors": [e.to_string()]})),
        )
            .into_response(),
    }
}

async fn pool_action(
    State(admin): State<Admin>,
    Path((database, user, action)): Path<(String, String, String)>,
) -> Response {
    let pooler = admin.pooler.clone();
    on_client_runtime(&admin.pooler, act_on_pool(pooler, database, user, action)).await
}

/// Runs `work` on the runtime that serves clients and waits for its answer.
async fn on_client_runtime<F>(pooler: &Pooler, work: F) -> Response
where
    F: Future<Output = Response> + Send + 'static,
{
    match pooler.runtime().spawn(work).await {
        Ok(response) => response,
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            axum::Json(json!({"error": e.to_string()})),
        )
            .into_response(),
    }
}

async fn act_on_pool(
    pooler: Arc<Pooler>,
    database: String,
    user: String,
    action: String,
) -> Response {
    let Some(pool) = find_pool(&pooler, &database, &user) else {
        return (
            StatusCode::NOT_FOUND,
            axum::Json(json!({"error": format!("no pool {database}/{user} (pools exist once a client used them)")})),
        )
            .into_response();
    };
    let body = match action.as_str() {
        "pause" => {
            let drained = pause(&pool).await;
            json!({"pool": pool.key.to_string(), "paused": true, "drained": drained, "active": pool.view().active})
        }
        "resume" => {
            pool.resume();
            json!({"pool": pool.key.to_string(), "paused": false})
        }
        "reconnect" => {
            pool.reconnect();
            json!({"pool": pool.key.to_string(), "reconnecting": true})
        }
        other => {
            return (
                StatusCode::NOT_FOUND,
                axum::Json(json!({"error": format!("unknown action \"{other}\": pause, resume or reconnect")})),
            )
                .into_response();
        }
    };
    info!(pool = %Escaped(&pool.key), action = %Escaped(&action), "admin action");
    (StatusCode::OK, axum::Json(body)).into_response()
}

/// Pauses `pool` and waits (up to [`PAUSE_WAIT`]) for its running transactions; returns
/// whether none is left.
pub async fn pause(pool: &Pool) -> bool {
    pool.pause();
    pool.wait_idle(PAUSE_WAIT).await
}

/// The existing pool for (database, user); pools are created when a client first logs in.
fn find_pool(pooler: &Pooler, database: &str, user: &str) -> Option<Arc<Pool>> {
    pooler
        .pools()
        .into_iter()
        .find(|p| p.key.database == database && p.key.user == user)
}
