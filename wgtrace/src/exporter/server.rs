//! The HTTP side: a small HTTP/1.1 server on the run loop's runtime that
//! only ever reads the latest published report.
//!
//! Nothing here can hold up tracing: the run loop never awaits this side,
//! rendering runs on the blocking pool, and every connection is bounded in
//! number and lifetime, so a slow or stuck scraper only costs itself.

use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::Incoming,
    header::{self, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::watch, task::JoinSet};

use super::metrics::{self, Format};
use crate::report::Report;

/// Connections served at once; more are closed on accept.
const MAX_CONNECTIONS: usize = 32;
/// A request's headers must arrive within this time.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// After this, a connection finishes its current response and is closed
/// (scrapers reconnect); one that does not within [`GRACE`] is dropped.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
const GRACE: Duration = Duration::from_secs(10);

/// Accepts connections until the task is aborted; aborting it also drops
/// every connection (they live in its `JoinSet`).
pub(super) async fn serve(listener: TcpListener, reports: watch::Receiver<Arc<Report>>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if connections.len() >= MAX_CONNECTIONS {
                        log::warn!("metrics: {MAX_CONNECTIONS} connections open, closing the one from {peer}");
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    connections.spawn(connection(TokioIo::new(stream), reports.clone()));
                }
                Err(err) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    log::warn!("metrics: accepting a connection: {err}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next() => {}
        }
    }
}

async fn connection(io: TokioIo<tokio::net::TcpStream>, reports: watch::Receiver<Arc<Report>>) {
    let service = service_fn(move |request: Request<Incoming>| {
        let routed = route(&request, &reports);
        async move {
            Ok::<_, Infallible>(match routed {
                Routed::Metrics(format, report) => metrics_response(format, report).await,
                Routed::Done(response) => response,
            })
        }
    });
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT).keep_alive(true);
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(err) = result {
                log::debug!("metrics: connection: {err}");
            }
            return;
        }
        _ = tokio::time::sleep(CONNECTION_LIFETIME) => {}
    }
    connection.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(GRACE, connection).await;
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

/// What a request asks for.
enum Routed {
    /// The metrics in this format, from this snapshot.
    Metrics(Format, Arc<Report>),
    /// Anything else, answered at once.
    Done(Response<Full<Bytes>>),
}

fn route(request: &Request<Incoming>, reports: &watch::Receiver<Arc<Report>>) -> Routed {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        response.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return Routed::Done(response);
    }
    match request.uri().path() {
        "/metrics" => {}
        "/" => {
            let mut response = text(
                StatusCode::OK,
                "<html><head><title>wgtrace</title></head><body><h1>wgtrace</h1>\
                 <p><a href=\"/metrics\">Metrics</a></p></body></html>\n",
            );
            response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
            return Routed::Done(response);
        }
        _ => return Routed::Done(text(StatusCode::NOT_FOUND, "not found: the metrics are at /metrics\n")),
    }
    let accept = request.headers().get(header::ACCEPT).and_then(|v| v.to_str().ok());
    // The latest snapshot; the channel is let go of at once.
    Routed::Metrics(metrics::negotiate(accept), Arc::clone(&reports.borrow()))
}

async fn metrics_response(format: Format, report: Arc<Report>) -> Response<Full<Bytes>> {
    // Rendering is CPU work proportional to the tunnels: off the run loop's thread.
    let Ok(body) = tokio::task::spawn_blocking(move || metrics::encode(&report, format)).await else {
        return text(StatusCode::INTERNAL_SERVER_ERROR, "rendering the metrics failed\n");
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(format.content_type()));
    headers.insert(header::VARY, HeaderValue::from_static("Accept"));
    response
}
