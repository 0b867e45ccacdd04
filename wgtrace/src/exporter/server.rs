//! The HTTP side: a small HTTP/1.1 server, on a thread and runtime of its
//! own, that only ever reads the latest published report.
//!
//! Nothing here can hold up tracing, and no client can keep others out:
//! * the run loop never awaits this side, and rendering runs on the
//!   blocking pool;
//! * a connection must deliver a request's headers within
//!   [`HEADER_DEADLINE`] of being accepted (or of its previous response), or
//!   it is closed: idle and dripping clients cost a few seconds, not a slot;
//! * at the connection cap the *oldest* connection not serving a request is
//!   closed to make room, so a flood of idle connections cannot lock out the
//!   next scrape (refusing the newest, as a plain cap does, would);
//! * headers are bounded to [`MAX_HEADER_BYTES`] (hyper answers 431 and
//!   closes), so memory is bounded by the cap whatever clients send;
//! * dropped and refused connections are counted and logged once per
//!   [`LOG_INTERVAL`], never one line each.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

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
use tokio::{
    net::TcpListener,
    sync::watch,
    task::{AbortHandle, JoinSet},
    time::Instant,
};

use super::metrics::{self, Format};
use crate::report::Report;

/// Connections kept at most (lowered to fit the open-file limit, see
/// [`connection_cap`]); at the cap the oldest idle one makes room.
const MAX_CONNECTIONS: usize = 2048;
/// A request's headers must arrive within this time of the connection
/// being accepted or of its previous response.
pub(super) const HEADER_DEADLINE: Duration = Duration::from_secs(3);
/// Request line plus headers; Prometheus sends about 300 bytes.
pub(super) const MAX_HEADER_BYTES: usize = 16 * 1024;
/// After this, a connection finishes its current response and is closed
/// (scrapers reconnect); one that does not within [`GRACE`] is dropped.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
const GRACE: Duration = Duration::from_secs(10);
/// Dropped and refused connections are summed up in one line this often.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The cap for a process allowed `open_files` descriptors: each connection
/// takes one, and tracing needs some of its own.
pub(super) fn connection_cap(open_files: u64) -> usize {
    let spare = open_files.saturating_sub(256) as usize;
    spare.clamp(16, MAX_CONNECTIONS)
}

/// Why connections were let go of, summed between two log lines.
#[derive(Default)]
struct Dropped {
    /// Closed to make room at the cap (the oldest idle ones).
    evicted: AtomicU64,
    /// No complete request headers within [`HEADER_DEADLINE`].
    timed_out: AtomicU64,
    /// Refused on accept: every connection was busy serving a request.
    refused: AtomicU64,
    /// Protocol errors, oversized headers (431) and the like.
    failed: AtomicU64,
    /// `accept` itself failed (out of file descriptors and the like).
    accept_errors: AtomicU64,
}

impl Dropped {
    /// One line for everything since the last call, or None.
    fn summary(&self, cap: usize) -> Option<String> {
        let take = |counter: &AtomicU64| counter.swap(0, Ordering::Relaxed);
        let parts: Vec<String> = [
            (take(&self.evicted), format!("closed as the oldest idle at the cap of {cap}")),
            (take(&self.timed_out), format!("sent no complete request within {}s", HEADER_DEADLINE.as_secs())),
            (take(&self.refused), format!("refused, all {cap} connections busy")),
            (take(&self.failed), "closed on a protocol error or oversized headers".to_owned()),
            (take(&self.accept_errors), "accept errors (out of file descriptors?)".to_owned()),
        ]
        .into_iter()
        .filter(|(count, _)| *count > 0)
        .map(|(count, what)| format!("{count} {what}"))
        .collect();
        (!parts.is_empty())
            .then(|| format!("metrics connections in the last {}s: {}", LOG_INTERVAL.as_secs(), parts.join(", ")))
    }
}

/// What the accept loop knows of one open connection.
struct Open {
    task: AbortHandle,
    /// Set while a request is being answered.
    busy: Arc<AtomicBool>,
}

/// Accepts connections until the report channel closes (the publisher is
/// dropped); returning drops every connection (they live in its `JoinSet`).
pub(super) async fn serve(
    listener: TcpListener,
    reports: watch::Receiver<Arc<Report>>,
    cap: usize,
    series: metrics::Series,
) {
    let dropped = Arc::new(Dropped::default());
    let mut connections = JoinSet::new();
    // By accept order: the first entry is the oldest.
    let mut open: BTreeMap<u64, Open> = BTreeMap::new();
    let mut next_id = 0u64;
    let mut log_tick = tokio::time::interval_at(Instant::now() + LOG_INTERVAL, LOG_INTERVAL);
    let mut closed = reports.clone();
    loop {
        tokio::select! {
            changed = closed.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    if open.len() >= cap {
                        let oldest_idle = open.iter().find(|(_, c)| !c.busy.load(Ordering::Relaxed)).map(|(id, _)| *id);
                        match oldest_idle.and_then(|id| open.remove(&id)) {
                            Some(evicted) => {
                                evicted.task.abort();
                                dropped.evicted.fetch_add(1, Ordering::Relaxed);
                            }
                            None => {
                                dropped.refused.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                        }
                    }
                    let _ = stream.set_nodelay(true);
                    let busy = Arc::new(AtomicBool::new(false));
                    let id = next_id;
                    next_id += 1;
                    let task = connections.spawn(connection(
                        id,
                        TokioIo::new(stream),
                        reports.clone(),
                        series,
                        Arc::clone(&busy),
                        Arc::clone(&dropped),
                    ));
                    open.insert(id, Open { task, busy });
                }
                Err(_) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    dropped.accept_errors.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(finished) = connections.join_next() => {
                // Aborted tasks were removed when they were aborted.
                if let Ok(id) = finished {
                    open.remove(&id);
                }
            }
            _ = log_tick.tick() => {
                if let Some(line) = dropped.summary(cap) {
                    log::warn!("{line}");
                }
            }
        }
    }
}

/// Serves one connection; returns its id when it is done.
async fn connection(
    id: u64,
    io: TokioIo<tokio::net::TcpStream>,
    reports: watch::Receiver<Arc<Report>>,
    series: metrics::Series,
    busy: Arc<AtomicBool>,
    dropped: Arc<Dropped>,
) -> u64 {
    // When the last response was handed to hyper (or the connection was
    // accepted), in milliseconds since `accepted`.
    let accepted = Instant::now();
    let idle_since = Arc::new(AtomicU64::new(0));
    let service = {
        let (busy, idle_since) = (Arc::clone(&busy), Arc::clone(&idle_since));
        service_fn(move |request: Request<Incoming>| {
            busy.store(true, Ordering::Relaxed);
            let routed = route(&request, &reports);
            let (busy, idle_since) = (Arc::clone(&busy), Arc::clone(&idle_since));
            async move {
                let response = match routed {
                    Routed::Metrics(format, report) => metrics_response(format, report, series).await,
                    Routed::Done(response) => response,
                };
                idle_since.store(accepted.elapsed().as_millis() as u64, Ordering::Relaxed);
                busy.store(false, Ordering::Relaxed);
                Ok::<_, Infallible>(response)
            }
        })
    };
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_DEADLINE)
        .max_buf_size(MAX_HEADER_BYTES)
        .max_header_size(MAX_HEADER_BYTES)
        .keep_alive(true);
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    let lifetime = accepted + CONNECTION_LIFETIME;
    // hyper's own header timeout only runs once bytes arrive: this one also
    // catches clients that connect and send nothing.
    let mut deadline = accepted + HEADER_DEADLINE;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(err) = result {
                    if err.is_timeout() {
                        dropped.timed_out.fetch_add(1, Ordering::Relaxed);
                    } else if !err.is_incomplete_message() {
                        dropped.failed.fetch_add(1, Ordering::Relaxed);
                    }
                    log::debug!("metrics: connection: {err}");
                }
                return id;
            }
            _ = tokio::time::sleep_until(deadline) => {
                let idle_until = accepted + Duration::from_millis(idle_since.load(Ordering::Relaxed)) + HEADER_DEADLINE;
                if busy.load(Ordering::Relaxed) {
                    deadline = Instant::now() + HEADER_DEADLINE;
                } else if idle_until > Instant::now() {
                    deadline = idle_until;
                } else {
                    dropped.timed_out.fetch_add(1, Ordering::Relaxed);
                    return id;
                }
            }
            _ = tokio::time::sleep_until(lifetime) => break,
        }
    }
    connection.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(GRACE, connection).await;
    id
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

async fn metrics_response(format: Format, report: Arc<Report>, series: metrics::Series) -> Response<Full<Bytes>> {
    // Rendering is CPU work proportional to the tunnels: off the run loop's thread.
    let Ok(body) = tokio::task::spawn_blocking(move || metrics::encode_with(&report, format, series)).await else {
        return text(StatusCode::INTERNAL_SERVER_ERROR, "rendering the metrics failed\n");
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(format.content_type()));
    headers.insert(header::VARY, HeaderValue::from_static("Accept"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_are_summed_into_one_line_per_interval() {
        let dropped = Dropped::default();
        assert_eq!(dropped.summary(1024), None, "nothing to say, no line");
        for _ in 0..1500 {
            dropped.evicted.fetch_add(1, Ordering::Relaxed);
        }
        dropped.timed_out.fetch_add(7, Ordering::Relaxed);
        let line = dropped.summary(1024).unwrap();
        assert!(line.contains("1500 closed as the oldest idle at the cap of 1024"), "{line}");
        assert!(line.contains("7 sent no complete request within 3s"), "{line}");
        assert!(!line.contains("refused"), "{line}");
        assert_eq!(dropped.summary(1024), None, "counts start again after each line");
    }

    #[test]
    fn the_cap_fits_the_open_file_limit() {
        assert_eq!(connection_cap(1024), 768);
        assert_eq!(connection_cap(524_288), MAX_CONNECTIONS);
        assert_eq!(connection_cap(100), 16);
    }
}
