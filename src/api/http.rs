//! The data listener: `POST /sql`, Neon-compatible.
//!
//! Every request is authenticated from its `Neon-Connection-String` (user,
//! password and database must match the configured ones; host, port and
//! parameters only tell the client where to send), parsed, run through the
//! executor, and answered in Neon's JSON shape. Every answer, success or
//! not, is counted in `pgwarden_requests_duration_seconds` and every error in
//! `pgwarden_errors_total`.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use percent_encoding::percent_decode_str;
use serde_json::Value;
use subtle::ConstantTimeEq;
use tower_http::cors::{Any, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tracing::{Instrument, field, info_span};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::neon::{BatchBody, ResultBody, SqlRequest, batch_options, error_body, parse_body};
use crate::guard::{ExecError, Executor};
use crate::telemetry::Metrics;
use crate::telemetry::labels::{Api, ClientErrorKind, RequestKind, RequestOutcome};

/// Who may use the data API, and on which database.
#[derive(Clone)]
pub struct Credentials {
    /// The user clients must name.
    pub user: String,
    /// The password clients must present (empty when none is configured).
    pub password: String,
    /// The database clients must name (the pool's).
    pub database: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"***")
            .field("database", &self.database)
            .finish()
    }
}

/// Everything the data listener needs.
#[derive(Debug)]
pub struct DataState {
    /// Runs requests through the guard.
    pub executor: Executor,
    /// Request and error metrics.
    pub metrics: Metrics,
    /// Who may connect.
    pub credentials: Credentials,
    /// Largest accepted request body in bytes.
    pub max_request_bytes: usize,
    /// Largest response in bytes.
    pub max_response_bytes: usize,
}

/// The data listener's routes: `POST /sql` and its CORS preflight.
pub fn router(state: Arc<DataState>) -> Router {
    let cors = CorsLayer::new()
        .allow_origin(Any)
        .allow_methods([axum::http::Method::POST, axum::http::Method::OPTIONS])
        .allow_headers(Any)
        .expose_headers([header::HeaderName::from_static("x-request-id")])
        .max_age(std::time::Duration::from_secs(86400));
    Router::new()
        .route("/sql", post(sql))
        .with_state(state)
        .layer(cors)
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
}

/// A refusal with its status, client-facing kind and JSON body.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    kind: ClientErrorKind,
    outcome: RequestOutcome,
    body: Value,
}

impl Refusal {
    fn bad_request(message: &str, code: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            ClientErrorKind::BadRequest,
            error_body(message, Some(code), None),
        )
    }

    fn auth(message: &str, code: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            ClientErrorKind::Auth,
            error_body(message, Some(code), None),
        )
    }

    fn new(status: StatusCode, kind: ClientErrorKind, body: Value) -> Self {
        Self {
            status,
            kind,
            outcome: RequestOutcome::Rejected,
            body,
        }
    }

    fn into_response(self) -> Response {
        let retry = self.status == StatusCode::SERVICE_UNAVAILABLE;
        let mut response = (self.status, axum::Json(self.body)).into_response();
        if retry {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

impl From<ExecError> for Refusal {
    fn from(error: ExecError) -> Self {
        let (status, body) = match &error {
            ExecError::Sql { error: db, .. } => {
                (StatusCode::BAD_REQUEST, error_body("", None, Some(db)))
            }
            ExecError::TooLarge(_) => (
                StatusCode::INSUFFICIENT_STORAGE,
                error_body(TOO_LARGE_RESPONSE, None, None),
            ),
            ExecError::Guard(_) | ExecError::ConnectionLost(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                error_body(&error.to_string(), error.sqlstate(), None),
            ),
            ExecError::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                error_body(&error.to_string(), Some("XX000"), None),
            ),
            _ => (
                StatusCode::BAD_REQUEST,
                error_body(&error.to_string(), error.sqlstate(), None),
            ),
        };
        Self {
            status,
            kind: error.kind(),
            outcome: error.outcome(),
            body,
        }
    }
}

/// The message of a response over `max_response_bytes`.
const TOO_LARGE_RESPONSE: &str = "the response exceeds the size limit";

async fn sql(State(state): State<Arc<DataState>>, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let span = info_span!(
        "http_request",
        "http.request.method" = "POST",
        "url.path" = "/sql",
        "http.response.status_code" = field::Empty,
    );
    let parent =
        opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(&headers)));
    let _ = span.set_parent(parent);
    let (kind, outcome) = handle(&state, &headers, body)
        .instrument(span.clone())
        .await;
    let response = match outcome {
        Ok(response) => {
            state
                .metrics
                .request(Api::Http, kind, RequestOutcome::Ok, started.elapsed());
            response
        }
        Err(refusal) => {
            state
                .metrics
                .request(Api::Http, kind, refusal.outcome, started.elapsed());
            state.metrics.client_error(refusal.kind);
            refusal.into_response()
        }
    };
    span.record("http.response.status_code", response.status().as_u16());
    response
}

async fn handle(
    state: &DataState,
    headers: &HeaderMap,
    body: Body,
) -> (RequestKind, Result<Response, Refusal>) {
    // Credentials first: an unauthenticated client gets nothing buffered.
    if let Err(refusal) = authenticate(headers, &state.credentials) {
        return (RequestKind::Query, Err(refusal));
    }
    let bytes = match axum::body::to_bytes(body, state.max_request_bytes).await {
        Ok(bytes) => bytes,
        Err(_) => {
            let message = format!(
                "request body exceeds the limit of {} bytes",
                state.max_request_bytes
            );
            let body = error_body(&message, Some("54000"), None);
            return (
                RequestKind::Query,
                Err(Refusal::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    ClientErrorKind::TooLarge,
                    body,
                )),
            );
        }
    };
    let request = match parse_body(&bytes) {
        Ok(request) => request,
        Err(message) => {
            return (
                RequestKind::Query,
                Err(Refusal::bad_request(&message, "08P01")),
            );
        }
    };
    let array_mode = header_is(headers, "neon-array-mode", "true");
    match request {
        SqlRequest::Single(statement) => {
            let result = state.executor.query(&statement).await;
            let body = result.map(|r| {
                serde_json::to_vec(&ResultBody {
                    result: &r,
                    array_mode,
                })
            });
            (RequestKind::Query, respond(state, body))
        }
        SqlRequest::Batch(statements) => {
            let text = |name| headers.get(name).and_then(|v| v.to_str().ok());
            let options = batch_options(
                text("neon-batch-isolation-level"),
                text("neon-batch-read-only"),
                text("neon-batch-deferrable"),
            );
            let options = match options {
                Ok(options) => options,
                Err(message) => {
                    return (
                        RequestKind::Batch,
                        Err(Refusal::bad_request(&message, "08P01")),
                    );
                }
            };
            let result = state.executor.batch(&options, &statements).await;
            let body = result.map(|r| {
                serde_json::to_vec(&BatchBody {
                    results: &r,
                    array_mode,
                })
            });
            (RequestKind::Batch, respond(state, body))
        }
    }
}

fn respond(
    state: &DataState,
    body: Result<serde_json::Result<Vec<u8>>, ExecError>,
) -> Result<Response, Refusal> {
    let json = body
        .map_err(Refusal::from)?
        .map_err(|e| Refusal::from(ExecError::Internal(e.to_string())))?;
    if json.len() > state.max_response_bytes {
        return Err(Refusal::from(ExecError::TooLarge(state.max_response_bytes)));
    }
    let mut response = Response::new(Body::from(json));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

/// Reads W3C trace context (`traceparent`, `tracestate`) from request headers.
struct HeaderExtractor<'a>(&'a HeaderMap);

impl opentelemetry::propagation::Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

fn header_is(headers: &HeaderMap, name: &str, expected: &str) -> bool {
    headers
        .get(name)
        .is_some_and(|v| v.as_bytes() == expected.as_bytes())
}

/// Checks the connection string's user, password and database.
fn authenticate(headers: &HeaderMap, expected: &Credentials) -> Result<(), Refusal> {
    let Some(value) = headers.get("neon-connection-string") else {
        return Err(Refusal::bad_request(
            "missing Neon-Connection-String header",
            "08P01",
        ));
    };
    let invalid = || Refusal::bad_request("invalid Neon-Connection-String header", "08P01");
    let text = value.to_str().map_err(|_| invalid())?;
    let url = url::Url::parse(text).map_err(|_| invalid())?;
    let decode = |s: &str| {
        percent_decode_str(s)
            .decode_utf8()
            .map(|d| d.into_owned())
            .map_err(|_| invalid())
    };
    let user = decode(url.username())?;
    let password = decode(url.password().unwrap_or(""))?;
    let database = decode(url.path().trim_start_matches('/'))?;
    let user_ok = user.as_bytes().ct_eq(expected.user.as_bytes());
    let password_ok = password.as_bytes().ct_eq(expected.password.as_bytes());
    if !bool::from(user_ok & password_ok) {
        return Err(Refusal::auth(
            &format!("password authentication failed for user \"{user}\""),
            "28P01",
        ));
    }
    if database != expected.database {
        return Err(Refusal::auth(
            &format!("database \"{database}\" does not exist"),
            "3D000",
        ));
    }
    Ok(())
}
