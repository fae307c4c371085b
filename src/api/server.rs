//! Serving a router over HTTP/1.1 with the limits an exposed listener needs.
//!
//! `axum::serve` gives hyper no timer, so a client that opens a connection
//! and never finishes its request head would hold it forever. This loop
//! serves each connection with hyper's HTTP/1 builder, a Tokio timer and:
//!
//! - a header read timeout: the whole head must arrive within it. hyper
//!   starts it whenever it waits for a request, so it also closes an idle
//!   keep-alive connection after that long;
//! - a hard cap on the buffered head, beyond which hyper answers 431 on its
//!   own and closes. The configured limit lies well below it and is checked
//!   by the data API, so that the usual case gets the JSON error.
//!
//! Shutdown stops accepting and lets open connections finish the request in
//! flight (the caller bounds how long that may take).

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::{Service, service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// How much larger than the configured header limit hyper's own hard cap
/// is: requests between the two get the JSON 431, those beyond are cut off
/// by hyper without buffering more.
const HARD_CAP_FACTOR: usize = 4;

/// hyper refuses a read buffer smaller than this.
const MIN_HARD_CAP_BYTES: usize = 8192;

/// Pause after a failed `accept` (e.g. out of file descriptors), so the
/// loop does not spin while the condition lasts.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(100);

/// The connection-level limits of one listener.
#[derive(Clone, Copy, Debug)]
pub struct ServerLimits {
    /// Time a client has to send a complete request head; also how long an
    /// idle keep-alive connection is kept.
    pub header_read_timeout: Duration,
    /// The request-head limit the application enforces; hyper's hard cap
    /// is a multiple of it.
    pub max_header_bytes: usize,
}

impl ServerLimits {
    /// The size of head beyond which hyper stops buffering and answers 431.
    fn hard_cap(&self) -> usize {
        (self.max_header_bytes * HARD_CAP_FACTOR).max(MIN_HARD_CAP_BYTES)
    }
}

/// Serves `router` on `listener` until `stop` is cancelled, then waits for
/// open connections to finish their request in flight.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ServerLimits,
    stop: CancellationToken,
) {
    let builder = http1_builder(&limits);
    let graceful = GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let service = service(router.clone(), peer);
                let connection = builder.serve_connection(TokioIo::new(stream), service);
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    if let Err(error) = connection.await {
                        debug!(peer = %peer, error = %error, "Connection ended with an error.");
                    }
                });
            }
            Err(error) => {
                warn!(error = %error, "Accepting a connection failed.");
                tokio::time::sleep(ACCEPT_RETRY_DELAY).await;
            }
        }
    }
    drop(listener);
    graceful.shutdown().await;
}

fn http1_builder(limits: &ServerLimits) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_header_size(limits.hard_cap());
    builder
}

/// The router as a hyper service that tells handlers who the peer is
/// (`ConnectInfo<SocketAddr>`, as `axum::serve` would).
fn service(
    router: Router,
    peer: SocketAddr,
) -> impl Service<
    hyper::Request<Incoming>,
    Response = axum::response::Response,
    Error = std::convert::Infallible,
    Future = impl Send,
> + Clone {
    let router = TowerToHyperService::new(router);
    service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        router.call(request)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hard_cap_is_above_the_limit_and_never_below_hyper_minimum() {
        let limits = |max_header_bytes| ServerLimits {
            header_read_timeout: Duration::from_secs(1),
            max_header_bytes,
        };
        assert_eq!(limits(32 * 1024).hard_cap(), 128 * 1024);
        assert_eq!(limits(1024).hard_cap(), MIN_HARD_CAP_BYTES);
    }
}
