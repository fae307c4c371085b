//! The ops listener: metrics, health, status and admin operations, on an
//! address of its own (loopback by default), apart from the data API.
//!
//! - `GET /metrics`: Prometheus text; pool gauges are refreshed per scrape;
//! - `GET /livez`: the process is alive;
//! - `GET /readyz`: 200 only while requests are admitted at once;
//! - `GET /status`: JSON, never secrets;
//! - `POST /admin/reconnect|pause|resume`: with the configured bearer token,
//!   or from a loopback peer when no token is configured.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use axum::Router;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use prometheus::Registry;
use serde_json::json;
use subtle::ConstantTimeEq;
use tracing::info;

use crate::backend::Secret;
use crate::guard::Executor;
use crate::lifecycle::{BackendSource, Lifecycle};
use crate::telemetry::Metrics;
use crate::telemetry::labels::PoolState;

/// Everything the ops listener needs.
#[derive(Debug)]
pub struct OpsState {
    /// The lifecycle to report on and steer.
    pub lifecycle: Lifecycle<BackendSource>,
    /// For replay-rule counts in `/status`.
    pub executor: Executor,
    /// Where every metric lives.
    pub registry: Registry,
    /// To refresh pool gauges per scrape.
    pub metrics: Metrics,
    /// Bearer token for `/admin/*`, if configured.
    pub admin_token: Option<Secret>,
    /// Settings shown in `/status`.
    pub settings: serde_json::Value,
    /// The wire front end and where it listens, when it is on.
    pub wire: Option<(SocketAddr, Arc<crate::wire::Wire>)>,
}

/// The ops routes.
pub fn router(state: Arc<OpsState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/admin/{operation}", post(admin))
        .with_state(state)
}

async fn metrics(State(state): State<Arc<OpsState>>) -> Response {
    let status = state.lifecycle.status();
    state
        .metrics
        .set_pool_connections(status.pool.idle, status.pool.in_use, status.pool.max_size);
    let text = crate::telemetry::scrape::render(&state.registry);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn readyz(State(state): State<Arc<OpsState>>) -> Response {
    let snapshot = state.lifecycle.snapshot();
    let state_name = snapshot.state.as_str();
    if snapshot.state == PoolState::Ready {
        (StatusCode::OK, format!("{state_name}\n")).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("{state_name}\n")).into_response()
    }
}

async fn status(State(state): State<Arc<OpsState>>) -> Response {
    let status = state.lifecycle.status();
    let since_epoch = |t: std::time::SystemTime| {
        t.duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0)
    };
    let reconnect = status.last_reconnect.as_ref().map(|r| {
        json!({
            "reason": r.reason.as_str(),
            "started_at_unix": since_epoch(r.started_at),
            "duration_ms": r.duration.map(|d| d.as_millis() as u64),
            "attempts": r.attempts,
        })
    });
    let warmup = status.last_warmup.map(|w| {
        json!({ "ping_ms": w.ping.as_millis() as u64, "queries_ms": w.queries.as_millis() as u64, "total_ms": w.total.as_millis() as u64 })
    });
    let rules: serde_json::Map<String, serde_json::Value> = state
        .executor
        .rule_counts()
        .into_iter()
        .map(|(rule, count)| (rule.as_str().to_owned(), json!(count)))
        .collect();
    let body = json!({
        "version": env!("CARGO_PKG_VERSION"),
        "state": status.state.as_str(),
        "ready": status.state == PoolState::Ready,
        "generation": status.generation,
        "pool": {
            "size": status.pool.size, "idle": status.pool.idle, "in_use": status.pool.in_use,
            "waiting": status.pool.waiting, "max": status.pool.max_size,
        },
        "last_reconnect": reconnect,
        "last_warmup": warmup,
        "last_failure": status.last_failure,
        "replay_decisions": rules,
        "wire": state.wire.as_ref().map(|(address, wire)| json!({
            "listen": address.to_string(),
            "clients": wire.clients(),
        })),
        "settings": state.settings,
    });
    axum::Json(body).into_response()
}

async fn admin(
    State(state): State<Arc<OpsState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(operation): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(refusal) = refuse(&state, peer, &headers) {
        return refusal;
    }
    match operation.as_str() {
        "reconnect" => state.lifecycle.reconnect(),
        "pause" => state.lifecycle.pause(),
        "resume" => state.lifecycle.resume(),
        _ => return (StatusCode::NOT_FOUND, "unknown admin operation\n").into_response(),
    }
    info!(operation = %operation, peer = %peer, "Admin operation accepted.");
    (
        StatusCode::ACCEPTED,
        axum::Json(json!({ "accepted": operation })),
    )
        .into_response()
}

/// `Some(refusal)` when the caller may not use the admin operations.
fn refuse(state: &OpsState, peer: SocketAddr, headers: &HeaderMap) -> Option<Response> {
    let Some(token) = &state.admin_token else {
        if peer.ip().is_loopback() {
            return None;
        }
        let message = "admin operations need a token (admin_token) when called from another host\n";
        return Some((StatusCode::FORBIDDEN, message).into_response());
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if bool::from(presented.as_bytes().ct_eq(token.expose().as_bytes())) {
        None
    } else {
        Some(
            (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "invalid or missing bearer token\n",
            )
                .into_response(),
        )
    }
}
