//! `wgtrace run --prometheus ADDR`: serves `/metrics` while tracing.
//!
//! The run loop publishes each new [`Report`] through a [`Publisher`] (a
//! `tokio::sync::watch` channel holding the latest `Arc<Report>`); the HTTP
//! side renders the exposition from that snapshot on each scrape, in
//! OpenMetrics or the Prometheus text format 0.0.4 as the `Accept` header
//! asks. Publishing never waits, so tracing never waits on HTTP; the server
//! runs on a thread of its own.
//!
//! * [`metrics`]: the metric families and content negotiation.
//! * [`buckets`]: histogram buckets from the latency histograms.
//! * `server`: the HTTP server and its connection limits.

pub mod buckets;
pub mod metrics;
mod server;

use std::{
    io::ErrorKind,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
};

use anyhow::{Context as _, Result};
use tokio::sync::watch;

pub use metrics::{Format, Series, encode, encode_with, negotiate};

use crate::report::Report;

/// The port suggested in the help and the deploy/ examples.
pub const DEFAULT_PORT: u16 = 9586;

/// Parses `--prometheus ADDR`: `IP:PORT`, `[IPv6]:PORT`, `localhost:PORT`,
/// or `:PORT` (and a bare `PORT`) for 127.0.0.1.
pub fn parse_address(text: &str) -> Result<SocketAddr, String> {
    let text = text.trim();
    let invalid = || {
        format!(
            "expected IP:PORT, e.g. 127.0.0.1:{DEFAULT_PORT}, [::1]:{DEFAULT_PORT}, 0.0.0.0:{DEFAULT_PORT} (all \
             interfaces) or :{DEFAULT_PORT} (127.0.0.1)"
        )
    };
    let loopback = |port: &str| port.parse::<u16>().map(|p| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), p));
    if let Some(port) = text.strip_prefix(':') {
        return loopback(port).map_err(|_| invalid());
    }
    if let Some(port) = text.strip_prefix("localhost:") {
        return loopback(port).map_err(|_| invalid());
    }
    if let Ok(address) = text.parse::<SocketAddr>() {
        return Ok(address);
    }
    loopback(text).map_err(|_| invalid())
}

/// Connections waiting to be accepted, at most.
const LISTEN_BACKLOG: i32 = 4096;

/// A listening socket for the metrics, bound before tracing starts so a
/// taken port fails fast.
pub struct Exporter {
    listener: std::net::TcpListener,
    address: SocketAddr,
    /// Connections served at once (from the open-file limit).
    cap: usize,
    series: Series,
}

impl Exporter {
    pub fn bind(address: SocketAddr) -> Result<Self> {
        let listener = std::net::TcpListener::bind(address).map_err(|err| bind_error(address, &err))?;
        listener.set_nonblocking(true).context("making the metrics socket non-blocking")?;
        // std listens with a backlog of 128: a flood of reconnecting clients
        // fills that queue and the kernel drops the next scrape's SYN (a 1 s
        // retransmit, a failed scrape). Listening again only sets a longer
        // queue (capped by net.core.somaxconn).
        // SAFETY: listen(2) on a socket we own.
        if unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&listener), LISTEN_BACKLOG) } != 0 {
            log::info!("lengthening the metrics accept queue: {}", std::io::Error::last_os_error());
        }
        let address = listener.local_addr().unwrap_or(address);
        let cap = server::connection_cap(raise_open_file_limit());
        if !address.ip().is_loopback() {
            log::warn!(
                "serving metrics on {address}, not only on loopback: whoever can reach it can read tunnel names, \
                 namespaces and traffic counts"
            );
        }
        Ok(Self { listener, address, cap, series: Series::PerTunnel })
    }

    /// Per-peer series (`--peer-metrics`) instead of per-tunnel ones.
    pub fn with_series(mut self, series: Series) -> Self {
        self.series = series;
        self
    }

    /// The address actually bound (with the port chosen for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.address
    }

    /// Starts serving on the current tokio runtime, with `first` as the
    /// snapshot until the next [`Publisher::publish`].
    pub fn start(self, first: Report) -> Result<Publisher> {
        let (sender, receiver) = watch::channel(Arc::new(first));
        // Its own thread and runtime: nothing the run loop does (rediscovery,
        // a slow daemon's UAPI socket) can delay a scrape, and nothing a
        // flood of clients does can delay tracing. The runtime is made and
        // dropped on that thread (never inside the caller's runtime).
        let (listener, cap, series) = (self.listener, self.cap, self.series);
        let (started, result) = std::sync::mpsc::channel::<Result<()>>();
        let server = std::thread::Builder::new()
            .name("wgtrace-metrics".into())
            .spawn(move || {
                let serving = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("starting the metrics server's runtime")
                    .and_then(|runtime| {
                        let listener = {
                            let _entered = runtime.enter();
                            tokio::net::TcpListener::from_std(listener).context("serving the metrics socket")?
                        };
                        Ok((runtime, listener))
                    });
                match serving {
                    Ok((runtime, listener)) => {
                        let _ = started.send(Ok(()));
                        runtime.block_on(server::serve(listener, receiver, cap, series));
                    }
                    Err(err) => {
                        let _ = started.send(Err(err));
                    }
                }
            })
            .context("starting the metrics server's thread")?;
        result.recv().context("the metrics server's thread ended at start")??;
        eprintln!("wgtrace: serving Prometheus metrics on http://{}/metrics", self.address);
        Ok(Publisher { sender: Some(sender), server: Some(server) })
    }
}

/// Raises the soft open-file limit to the hard one (a default soft limit of
/// 1024 is below what a flood of clients takes) and returns the soft limit
/// now in force.
pub fn raise_open_file_limit() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            } else {
                log::info!("raising the open-file limit: {}", std::io::Error::last_os_error());
            }
        }
    }
    limit.rlim_cur
}

fn bind_error(address: SocketAddr, err: &std::io::Error) -> anyhow::Error {
    let port = address.port();
    let what = match err.kind() {
        ErrorKind::AddrInUse => format!(
            "the address is already in use (another wgtrace or exporter?): stop that process or choose another \
             port, e.g. --prometheus {}:{}",
            if address.is_ipv6() { format!("[{}]", address.ip()) } else { address.ip().to_string() },
            if port == DEFAULT_PORT { DEFAULT_PORT + 1 } else { DEFAULT_PORT }
        ),
        ErrorKind::PermissionDenied if port < 1024 => format!(
            "permission denied: ports below 1024 need root or CAP_NET_BIND_SERVICE; use a port above 1023, e.g. \
             --prometheus :{DEFAULT_PORT}"
        ),
        ErrorKind::PermissionDenied => {
            "permission denied (a security policy such as SELinux or a seccomp profile forbids it)".to_owned()
        }
        ErrorKind::AddrNotAvailable => format!(
            "no interface of this host has the address {}: use 127.0.0.1 (this host only), 0.0.0.0 (all \
             interfaces) or one of this host's addresses (`ip address`)",
            address.ip()
        ),
        _ => err.to_string(),
    };
    anyhow::anyhow!("cannot serve metrics on {address}: {what}")
}

/// The run loop's end of the channel: [`publish`](Self::publish) replaces
/// the snapshot the scrapes read, and never waits. Dropping it stops the
/// server and closes its connections.
pub struct Publisher {
    sender: Option<watch::Sender<Arc<Report>>>,
    server: Option<std::thread::JoinHandle<()>>,
}

impl Publisher {
    pub fn publish(&self, report: Report) {
        if let Some(sender) = &self.sender {
            sender.send_replace(Arc::new(report));
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        // The server ends when the channel closes; its connections and the
        // listening socket are gone once the thread is joined.
        drop(self.sender.take());
        if let Some(server) = self.server.take() {
            let _ = server.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        net::TcpStream,
        time::Duration,
    };

    use super::*;

    #[test]
    fn addresses() {
        let ok = |text: &str| parse_address(text).unwrap().to_string();
        assert_eq!(ok(":9586"), "127.0.0.1:9586");
        assert_eq!(ok("9586"), "127.0.0.1:9586");
        assert_eq!(ok("localhost:9586"), "127.0.0.1:9586");
        assert_eq!(ok("127.0.0.1:9586"), "127.0.0.1:9586");
        assert_eq!(ok("0.0.0.0:9586"), "0.0.0.0:9586");
        assert_eq!(ok("[::1]:9586"), "[::1]:9586");
        for bad in ["", ":", "127.0.0.1", ":99999", "example.com:9586", "::1:9586", "127.0.0.1:http"] {
            let err = parse_address(bad).unwrap_err();
            assert!(err.contains("127.0.0.1:9586"), "{bad}: {err}");
        }
    }

    #[test]
    fn bind_errors_name_the_address_and_what_to_do() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = taken.local_addr().unwrap();
        let err = Exporter::bind(address).err().unwrap().to_string();
        assert!(err.contains(&address.to_string()) && err.contains("already in use"), "{err}");
        assert!(err.contains("--prometheus 127.0.0.1:9586"), "{err}");
        let err = Exporter::bind("192.0.2.77:9586".parse().unwrap()).err().unwrap().to_string();
        assert!(err.contains("192.0.2.77:9586") && err.contains("no interface"), "{err}");
    }

    fn empty_report() -> Report {
        metrics::tests::report_of(Vec::new())
    }

    /// Serves on a runtime of its own thread, as `run` does on its own.
    fn serve() -> (SocketAddr, std::sync::mpsc::Sender<Report>) {
        serve_with_cap(None)
    }

    fn serve_with_cap(cap: Option<usize>) -> (SocketAddr, std::sync::mpsc::Sender<Report>) {
        let mut exporter = Exporter::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        exporter.cap = cap.unwrap_or(exporter.cap);
        let address = exporter.local_addr();
        let (reports, incoming) = std::sync::mpsc::channel::<Report>();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async move {
                let publisher = exporter.start(empty_report()).unwrap();
                loop {
                    match incoming.try_recv() {
                        Ok(report) => publisher.publish(report),
                        Err(std::sync::mpsc::TryRecvError::Empty) => {
                            tokio::time::sleep(Duration::from_millis(10)).await
                        }
                        Err(std::sync::mpsc::TryRecvError::Disconnected) => break,
                    }
                }
            });
        });
        (address, reports)
    }

    /// One HTTP/1.0 request: (status line, headers, body).
    fn get(address: SocketAddr, method: &str, path: &str, accept: Option<&str>) -> (String, String, String) {
        let mut stream = TcpStream::connect(address).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let accept = accept.map(|a| format!("Accept: {a}\r\n")).unwrap_or_default();
        write!(stream, "{method} {path} HTTP/1.0\r\nHost: test\r\n{accept}\r\n").unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        let (status, headers) = head.split_once("\r\n").unwrap();
        (status.to_owned(), headers.to_ascii_lowercase(), body.to_owned())
    }

    #[test]
    fn serves_both_formats_by_negotiation() {
        let (address, reports) = serve();
        let openmetrics = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        let (status, headers, body) = get(address, "GET", "/metrics", Some(openmetrics));
        assert_eq!(status, "HTTP/1.0 200 OK");
        assert!(headers.contains("content-type: application/openmetrics-text; version=1.0.0"), "{headers}");
        assert!(body.ends_with("# EOF\n") && body.contains("wgtrace_build_info{"), "{body}");
        let (_, headers, body) = get(address, "GET", "/metrics", None);
        assert!(headers.contains("content-type: text/plain; version=0.0.4"), "{headers}");
        assert!(!body.contains("# EOF") && body.contains("# TYPE wgtrace_build_info gauge"), "{body}");
        let (_, headers, body) = get(address, "HEAD", "/metrics", Some("text/plain"));
        assert!(headers.contains("text/plain; version=0.0.4") && body.is_empty(), "{headers}{body}");
        assert!(get(address, "GET", "/nope", None).0.contains("404"));
        assert!(get(address, "POST", "/metrics", None).0.contains("405"));
        assert!(get(address, "GET", "/", None).2.contains("/metrics"));

        // A new snapshot is what the next scrape sees.
        let mut report = empty_report();
        report.events_lost = 42;
        reports.send(report).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !get(address, "GET", "/metrics", None).2.contains("wgtrace_events_lost_total 42\n") {
            assert!(std::time::Instant::now() < deadline, "the published report never showed");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_stuck_client_does_not_block_others() {
        let (address, _reports) = serve();
        // Connected, sends half a request, never reads.
        let mut stuck = TcpStream::connect(address).unwrap();
        stuck.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").unwrap();
        let idle: Vec<TcpStream> = (0..5).map(|_| TcpStream::connect(address).unwrap()).collect();
        let (status, _, body) = get(address, "GET", "/metrics", None);
        assert_eq!(status, "HTTP/1.0 200 OK");
        assert!(body.contains("wgtrace_events_lost_total 0"));
        drop((stuck, idle));
    }

    /// Whether the server closed `stream` within `within` (EOF or reset).
    fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
        stream.set_read_timeout(Some(within)).unwrap();
        let mut buf = [0u8; 256];
        loop {
            match stream.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }

    #[test]
    fn silent_and_dripping_clients_are_closed_at_the_header_deadline() {
        let (address, _reports) = serve();
        let started = std::time::Instant::now();
        let mut silent = TcpStream::connect(address).unwrap();
        let mut dripping = TcpStream::connect(address).unwrap();
        dripping.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();
        let drip = {
            let mut dripping = dripping.try_clone().unwrap();
            std::thread::spawn(move || {
                while dripping.write_all(b"X").is_ok() && started.elapsed() < Duration::from_secs(10) {
                    std::thread::sleep(Duration::from_millis(200));
                }
            })
        };
        let limit = server::HEADER_DEADLINE + Duration::from_secs(2);
        assert!(closed_within(&mut silent, limit), "a silent client outlived the header deadline");
        assert!(closed_within(&mut dripping, limit), "a dripping client outlived the header deadline");
        assert!(started.elapsed() >= server::HEADER_DEADLINE - Duration::from_millis(100), "closed too early");
        drip.join().unwrap();
    }

    #[test]
    fn at_the_cap_the_oldest_idle_connection_makes_room() {
        let (address, _reports) = serve_with_cap(Some(4));
        let mut idle: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(address).unwrap()).collect();
        std::thread::sleep(Duration::from_millis(100));
        // The fifth is served; the first (oldest) is closed to make room.
        let (status, _, _) = get(address, "GET", "/metrics", None);
        assert_eq!(status, "HTTP/1.0 200 OK");
        assert!(closed_within(&mut idle[0], Duration::from_millis(500)), "the oldest idle connection is still open");
        assert!(!closed_within(&mut idle[3], Duration::from_millis(200)), "a newer idle connection was closed");
    }

    /// 2 000 clients holding connections with half a request, and one
    /// sending megabytes of headers: scrapes are still answered within 1 s.
    #[test]
    fn two_thousand_slow_clients_and_huge_headers_do_not_blind_a_scrape() {
        // Both ends live in this process: 2 000 unless the hard open-file
        // limit is the kernel's default of 4096.
        let clients = 2000.min((raise_open_file_limit() as usize).saturating_sub(512) / 2);
        let (address, _reports) = serve();
        let slow: Vec<TcpStream> = (0..clients)
            .map(|_| {
                let mut stream = TcpStream::connect(address).unwrap();
                stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").unwrap();
                stream
            })
            .collect();
        let huge = std::thread::spawn(move || {
            let mut stream = TcpStream::connect(address).unwrap();
            stream.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
            let line = format!("X-Padding: {}\r\n", "a".repeat(1000));
            let mut sent = stream.write_all(b"GET /metrics HTTP/1.1\r\n").map(|_| 0usize);
            while let Ok(bytes) = sent {
                if bytes >= 8 << 20 {
                    break;
                }
                sent = stream.write_all(line.as_bytes()).map(|_| bytes + line.len());
            }
            let mut answer = String::new();
            let _ = stream.read_to_string(&mut answer);
            (sent.is_err(), answer)
        });
        for _ in 0..5 {
            let started = std::time::Instant::now();
            let (status, _, body) = get(address, "GET", "/metrics", None);
            let took = started.elapsed();
            assert_eq!(status, "HTTP/1.0 200 OK");
            assert!(body.contains("wgtrace_build_info"), "{body}");
            assert!(took < Duration::from_secs(1), "a scrape took {took:?} with 2 000 slow clients");
        }
        let (cut_off, answer) = huge.join().unwrap();
        assert!(cut_off || answer.contains("431"), "8 MB of headers were taken in: {answer}");
        drop(slow);
    }
}
