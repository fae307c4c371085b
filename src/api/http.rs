//! The data listener: `POST /sql`, Neon-compatible.
//!
//! Every request is authenticated from its `Neon-Connection-String` (user,
//! password and database must match the configured ones; host, port and
//! parameters only tell the client where to send), parsed, run through the
//! executor, and answered in Neon's JSON shape. Every answer, success or
//! not, is counted in `pgwarden_requests_duration_seconds` and every error in
//! `pgwarden_errors_total`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use percent_encoding::percent_decode_str;
use serde_json::Value;
use subtle::ConstantTimeEq;
use tower_http::cors::{Any, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tracing::{Instrument, field, info_span};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::neon::{
    BatchBody, RequestError, ResultBody, SqlRequest, batch_options, error_body, parse_body,
};
use crate::backend::{Statement, TransactionOptions};
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
    /// Largest request head in bytes (431 beyond).
    pub max_header_bytes: usize,
    /// How long a client may take to send the body once its headers are in
    /// (408 beyond), so a client that stops half-way does not hold a
    /// connection and a buffer forever.
    pub body_read_timeout: Duration,
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
        let status = self.status;
        let mut response = (status, axum::Json(self.body)).into_response();
        let headers = response.headers_mut();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if status == StatusCode::REQUEST_TIMEOUT {
            // The rest of a stalled body may still arrive: never read it as
            // the next request.
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

impl From<RequestError> for Refusal {
    fn from(error: RequestError) -> Self {
        Refusal::bad_request(&error.to_string(), error.sqlstate())
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

async fn sql(
    State(state): State<Arc<DataState>>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
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
    let (kind, outcome) = handle(&state, &uri, &headers, body)
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
    uri: &Uri,
    headers: &HeaderMap,
    body: Body,
) -> (RequestKind, Result<Response, Refusal>) {
    match admit(state, uri, headers, body).await {
        Ok(SqlRequest::Single(statement)) => (
            RequestKind::Query,
            run_single(state, headers, &statement).await,
        ),
        Ok(SqlRequest::Batch(statements)) => (
            RequestKind::Batch,
            run_batch(state, headers, &statements).await,
        ),
        Err((kind, refusal)) => (kind, Err(refusal)),
    }
}

/// Everything checked before the database sees a request: head size,
/// credentials (before the body is buffered, so an unauthenticated client
/// gets nothing buffered), the body within its size and time limits, and
/// what the protocol can carry.
async fn admit(
    state: &DataState,
    uri: &Uri,
    headers: &HeaderMap,
    body: Body,
) -> Result<SqlRequest, (RequestKind, Refusal)> {
    let refuse = |refusal| (RequestKind::Query, refusal);
    check_head_size(uri, headers, state.max_header_bytes).map_err(refuse)?;
    authenticate(headers, &state.credentials).map_err(refuse)?;
    let bytes = read_body(state, body).await.map_err(refuse)?;
    let request = parse_body(&bytes).map_err(|e| refuse(Refusal::from(e)))?;
    if let SqlRequest::Single(_) = request {
        // A single query ignores the batch options, but a value that names
        // no isolation level is still a client bug worth reporting.
        options(headers).map_err(refuse)?;
    }
    Ok(request)
}

async fn run_single(
    state: &DataState,
    headers: &HeaderMap,
    statement: &Statement,
) -> Result<Response, Refusal> {
    let array_mode = header_is(headers, "neon-array-mode", "true");
    let result = state.executor.query(statement).await;
    let body = result.map(|r| {
        serde_json::to_vec(&ResultBody {
            result: &r,
            array_mode,
        })
    });
    respond(state, body)
}

async fn run_batch(
    state: &DataState,
    headers: &HeaderMap,
    statements: &[Statement],
) -> Result<Response, Refusal> {
    let array_mode = header_is(headers, "neon-array-mode", "true");
    let options = options(headers)?;
    let result = state.executor.batch(&options, statements).await;
    let body = result.map(|r| {
        serde_json::to_vec(&BatchBody {
            results: &r,
            array_mode,
        })
    });
    respond(state, body)
}

/// The batch options from the raw header bytes, so that a value that is
/// not even UTF-8 is refused rather than taken as absent.
fn options(headers: &HeaderMap) -> Result<TransactionOptions, Refusal> {
    let raw = |name| headers.get(name).map(HeaderValue::as_bytes);
    batch_options(
        raw("neon-batch-isolation-level"),
        raw("neon-batch-read-only"),
        raw("neon-batch-deferrable"),
    )
    .map_err(Refusal::from)
}

/// Refuses a request head over `max_header_bytes` with 431. hyper itself
/// only answers (bodiless) beyond a larger hard cap; checking here, once
/// the head is parsed, lets the answer carry the usual JSON error.
fn check_head_size(uri: &Uri, headers: &HeaderMap, max_header_bytes: usize) -> Result<(), Refusal> {
    // The request line is `POST <uri> HTTP/1.1\r\n`, each header line
    // `name: value\r\n`.
    let target = uri
        .path_and_query()
        .map_or(1, |target| target.as_str().len());
    let request_line = "POST ".len() + target + " HTTP/1.1\r\n".len();
    let size: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum::<usize>()
        + request_line;
    if size <= max_header_bytes {
        return Ok(());
    }
    let message = format!("request headers exceed the limit of {max_header_bytes} bytes");
    Err(Refusal::new(
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        ClientErrorKind::TooLarge,
        error_body(&message, Some("54000"), None),
    ))
}

/// Buffers the body within `max_request_bytes` (413 beyond) and
/// `body_read_timeout` (408 when the client stops sending half-way, and the
/// connection is closed: what is left of the body will never be read).
async fn read_body(state: &DataState, body: Body) -> Result<Bytes, Refusal> {
    let read = axum::body::to_bytes(body, state.max_request_bytes);
    match tokio::time::timeout(state.body_read_timeout, read).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(error)) if is_length_limit(&error) => {
            let message = format!(
                "request body exceeds the limit of {} bytes",
                state.max_request_bytes
            );
            Err(Refusal::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                ClientErrorKind::TooLarge,
                error_body(&message, Some("54000"), None),
            ))
        }
        // The client went away or broke the framing: nobody to answer.
        Ok(Err(_)) => Err(Refusal::bad_request(
            "request body could not be read",
            "08P01",
        )),
        Err(_) => {
            let message = format!(
                "request body not received within {} ms",
                state.body_read_timeout.as_millis()
            );
            Err(Refusal::new(
                StatusCode::REQUEST_TIMEOUT,
                ClientErrorKind::BadRequest,
                error_body(&message, Some("08P01"), None),
            ))
        }
    }
}

/// Whether a body error is the size limit rather than a broken read.
fn is_length_limit(error: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = source {
        if current.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = current.source();
    }
    false
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
