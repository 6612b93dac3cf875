//! The HTTP/1.1 server: hyper with its timer, so that no client holds a connection
//! longer than the timeouts allow, and a shutdown with a deadline.
//!
//! - A new connection's first request must have its headers in within
//!   `HTTP_HEADER_TIMEOUT` of the accept, or the connection is closed: a client
//!   trickling headers (slowloris) or sending nothing costs a connection for that long.
//! - A kept-alive connection waits `HTTP_IDLE_TIMEOUT` for its next request's headers
//!   (hyper's header-read timer, which runs from the end of the previous response),
//!   longer than the usual load balancer's idle timeout, so that the balancer closes
//!   first and never sends on a connection we are closing.
//! - Bodies are read within `HTTP_BODY_TIMEOUT` by the handlers' body extractor.
//! - On shutdown, the listener closes, idle connections close, those mid-request
//!   finish it and close; whatever is still open at the deadline is dropped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prometheus::IntCounterVec;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::settings::HttpTimeouts;

/// How a server stopped.
#[derive(Debug, Clone, Copy)]
pub struct Stopped {
    /// When the grace period given at shutdown ends.
    pub deadline: Instant,
    /// Whether every connection closed by then (the rest were dropped).
    pub connections_closed: bool,
}

/// Serves `router` on `listener` until `shutdown` resolves, then closes the
/// connections, giving those mid-request `grace` to finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    timeouts: HttpTimeouts,
    shutdown: impl std::future::Future<Output = ()>,
    grace: std::time::Duration,
    closed: IntCounterVec,
) -> Stopped {
    let connections = TaskTracker::new();
    let closing = CancellationToken::new();
    let abort = CancellationToken::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        match accepted {
            Ok((stream, _)) => {
                let (router, closing, abort) = (router.clone(), closing.clone(), abort.clone());
                let closed = closed.clone();
                connections.spawn(connection(stream, router, timeouts, closing, abort, closed));
            }
            Err(error) => {
                // Out of file descriptors, usually: others will close; do not spin.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
    drop(listener);
    let deadline = Instant::now() + grace;
    closing.cancel();
    connections.close();
    let connections_closed = tokio::time::timeout_at(deadline, connections.wait())
        .await
        .is_ok();
    if !connections_closed {
        abort.cancel();
        connections.wait().await;
    }
    Stopped {
        deadline,
        connections_closed,
    }
}

/// One connection, until it closes, its first request's headers are late, or the
/// server aborts it.
async fn connection(
    stream: TcpStream,
    router: Router,
    timeouts: HttpTimeouts,
    closing: CancellationToken,
    abort: CancellationToken,
    closed: IntCounterVec,
) {
    let _ = stream.set_nodelay(true);
    let requested = Arc::new(AtomicBool::new(false));
    let service = {
        let requested = Arc::clone(&requested);
        let router = TowerToHyperService::new(router);
        hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            requested.store(true, Ordering::Relaxed);
            hyper::service::Service::call(&router, request)
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(timeouts.idle)
        .keep_alive(true);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let first_headers = tokio::time::sleep(timeouts.header);
    tokio::pin!(first_headers);
    let (mut headers_in, mut closing_seen) = (false, false);
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%error, "connection ended with an error");
                }
                return;
            }
            () = &mut first_headers, if !headers_in => {
                if !requested.load(Ordering::Relaxed) {
                    tracing::debug!("first request headers not received within HTTP_HEADER_TIMEOUT; closing");
                    closed.with_label_values(&["header_timeout"]).inc();
                    return;
                }
                headers_in = true;
            }
            () = closing.cancelled(), if !closing_seen => {
                closing_seen = true;
                conn.as_mut().graceful_shutdown();
            }
            () = abort.cancelled() => {
                closed.with_label_values(&["shutdown"]).inc();
                return;
            }
        }
    }
}
