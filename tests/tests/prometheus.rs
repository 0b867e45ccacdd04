//! `wgtrace run --prometheus` scraped by a real Prometheus server (Debian's
//! `prometheus`, on loopback with a throwaway config and data directory)
//! while it traces the real lab; the shipped deploy/ files checked with
//! `promtool`.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use wgtrace_tests::{
    HttpResponse, LabGuard, TempDir, Traffic, free_port, http_get, lab, privileged_or_skip, url_encode, wgtrace_bin,
};

const PROMETHEUS: &str = "/usr/bin/prometheus";
const PROMTOOL: &str = "/usr/bin/promtool";
/// wgtrace's programs as `bpftool prog show` names them (kernels and
/// bpftool versions may truncate names to 15 characters).
const PROGRAMS: [&str; 4] = ["net_dev_start_x", "netif_receive_s", "fib_table_looku", "fib6_table_look"];
const CLASSIC: &str = "text/plain;version=0.0.4";
const OPENMETRICS: &str = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(path)
}

/// Like `privileged_or_skip`, for the Prometheus tools.
fn tools_or_skip(test: &str, tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !Path::new(t).exists()).collect();
    if missing.is_empty() {
        return true;
    }
    let reason = format!("{} not installed (`cargo xtask setup` installs the prometheus package)", missing.join(", "));
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: cannot run in CI: {reason}");
    }
    eprintln!("\n*** SKIPPED {test}: {reason}. ***\n");
    false
}

/// Polls `probe` every 200 ms until it yields something.
fn wait_for<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(found) = probe() {
            return found;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    use std::io::Write as _;
    let mut child = Command::new(PROMTOOL)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running promtool");
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    let output = child.wait_with_output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

/// `wgtrace run --prometheus ADDRESS` in the background.
struct Exporter {
    child: Option<Child>,
    address: String,
}

impl Exporter {
    fn start(address: &str) -> Self {
        Self::start_with(address, &[])
    }

    fn start_with(address: &str, extra: &[&str]) -> Self {
        let child = Command::new(wgtrace_bin())
            .args(["run", "--prometheus", address])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("running wgtrace");
        Self { child: Some(child), address: address.to_owned() }
    }

    fn metrics(&self, accept: &str) -> anyhow::Result<HttpResponse> {
        http_get(&self.address, "/metrics", Some(accept))
    }

    /// SIGTERM, as systemd and Kubernetes stop it; its exit status.
    fn terminate(mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        wait_for("wgtrace to exit after SIGTERM", Duration::from_secs(20), || child.try_wait().unwrap())
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A Prometheus server scraping `target` every second, with the shipped
/// alert rules, killed and its data removed when dropped.
struct Prometheus {
    child: Child,
    address: String,
    dir: TempDir,
}

impl Prometheus {
    fn start(target: &str) -> Self {
        Self::start_with_rules(target, &std::fs::read_to_string(deploy("prometheus/wgtrace-rules.yml")).unwrap())
    }

    fn start_with_rules(target: &str, rules: &str) -> Self {
        let dir = TempDir::new("wgtrace-prometheus").unwrap();
        std::fs::write(dir.0.join("wgtrace-rules.yml"), rules).unwrap();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - wgtrace-rules.yml\n\
             scrape_configs:\n  - job_name: wgtrace\n    static_configs:\n      - targets: ['{target}']\n"
        );
        std::fs::write(dir.0.join("prometheus.yml"), config).unwrap();
        let address = format!("127.0.0.1:{}", free_port());
        let log = std::fs::File::create(dir.0.join("prometheus.log")).unwrap();
        let child = Command::new(PROMETHEUS)
            .arg(format!("--config.file={}", dir.0.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.0.join("data").display()))
            .arg(format!("--web.listen-address={address}"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting prometheus");
        let prometheus = Self { child, address, dir };
        wait_for("Prometheus to be ready", Duration::from_secs(60), || {
            http_get(&prometheus.address, "/-/ready", None).ok().filter(|r| r.status == 200)
        });
        prometheus
    }

    /// An instant query: each result's labels and value.
    fn query(&self, expr: &str) -> Vec<(serde_json::Value, f64)> {
        let response = http_get(&self.address, &format!("/api/v1/query?query={}", url_encode(expr)), None)
            .unwrap_or_else(|err| panic!("querying Prometheus: {err:#}\n{}", self.log()));
        let json: serde_json::Value = serde_json::from_str(&response.body)
            .unwrap_or_else(|_| panic!("Prometheus answered {}: {}", response.status, response.body));
        assert_eq!(json["status"], "success", "{expr}: {json}");
        json["data"]["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (r["metric"].clone(), r["value"][1].as_str().unwrap().parse::<f64>().unwrap()))
            .collect()
    }

    /// Waits for `expr` to have a result with a value `accept` takes.
    fn wait_for_value(&self, what: &str, expr: &str, accept: impl Fn(f64) -> bool) -> (serde_json::Value, f64) {
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            let results = self.query(expr);
            if let Some(found) = results.iter().find(|(_, v)| accept(*v)) {
                return found.clone();
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: `{expr}` gives {results:?}\ntargets: {}\nlog:\n{}",
                http_get(&self.address, "/api/v1/targets", None).map(|r| r.body).unwrap_or_default(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Names of loaded BPF programs that are wgtrace's.
fn wgtrace_programs() -> Vec<String> {
    let output = Command::new("bpftool").args(["prog", "show"]).output().expect("running bpftool");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().skip_while(|w| *w != "name").nth(1))
        .filter(|name| PROGRAMS.iter().any(|p| name.starts_with(p)))
        .map(str::to_owned)
        .collect()
}

#[test]
fn prometheus_scrapes_the_nesting_and_its_latency_from_the_lab() {
    const NAME: &str = "prometheus_scrapes_the_nesting_and_its_latency_from_the_lab";
    if !privileged_or_skip(NAME) || !tools_or_skip(NAME, &[PROMETHEUS, PROMTOOL]) {
        return;
    }
    let _lab = LabGuard::up(&lab::LabOptions::default()).unwrap();
    let _traffic = Traffic::ping(lab::WG1_REMOTE).unwrap();
    let address = format!("127.0.0.1:{}", free_port());
    let exporter = Exporter::start(&address);

    // Both formats, by content negotiation, from the first scrape on.
    let classic = wait_for("wgtrace's metrics endpoint", Duration::from_secs(30), || {
        exporter.metrics(CLASSIC).ok().filter(|r| r.status == 200)
    });
    assert!(classic.content_type.starts_with("text/plain; version=0.0.4"), "{}", classic.content_type);
    assert!(classic.body.contains("wgtrace_build_info{version="), "{}", classic.body);
    let openmetrics = exporter.metrics(OPENMETRICS).unwrap();
    assert!(openmetrics.content_type.starts_with("application/openmetrics-text; version=1.0.0"));
    assert!(openmetrics.body.ends_with("# EOF\n"), "{}", openmetrics.body);

    let prometheus = Prometheus::start(&address);
    let wg1 = r#"interface="wg1",netns="wgtlab-client""#;
    let nested = format!("wgtrace_tunnel_nested{{{wg1}}}");
    let (labels, _) = prometheus.wait_for_value("wg1 nested in wg0", &nested, |v| v == 1.0);
    assert_eq!(labels["outer_interface"], "wg0", "{labels}");
    assert_eq!(labels["job"], "wgtrace");
    let p50 = format!("histogram_quantile(0.5, rate(wgtrace_inner_rtt_seconds_bucket{{{wg1}}}[5s]))");
    let (_, rtt) = prometheus.wait_for_value("wg1's inner RTT", &p50, f64::is_finite);
    assert!((0.035..=0.080).contains(&rtt), "nested wg1 inner RTT p50 {rtt} s");
    let packets = format!("wgtrace_transport_packets_total{{{wg1}}}");
    let (labels, _) = prometheus.wait_for_value("wg1's transport packets", &packets, |v| v > 0.0);
    assert_eq!((&labels["egress_interface"], &labels["mark"]), (&"wg0".into(), &"0".into()), "{labels}");
    // The shipped alert rule sees it (pending: it waits minutes to fire).
    let alert = format!(r#"ALERTS{{alertname="WireGuardTunnelNested",{wg1}}}"#);
    prometheus.wait_for_value("the WireGuardTunnelNested alert", &alert, |v| v == 1.0);

    // Every query of the shipped Grafana dashboard is valid PromQL and
    // finds data (Grafana's variables filled in as "All").
    for expr in dashboard_queries() {
        let expr = expr
            .replace("$__rate_interval", "5s")
            .replace("$__range", "1m")
            .replace("$instance", ".*")
            .replace("$netns", ".*")
            .replace("$interface", ".*");
        assert!(!prometheus.query(&expr).is_empty(), "the dashboard's `{expr}` finds nothing");
    }

    // A live exposition passes promtool's checks.
    let live = exporter.metrics(CLASSIC).unwrap();
    for family in
        ["wgtrace_inner_rtt_seconds_bucket{", "wgtrace_handshake_rtt_seconds_count{", "wgtrace_events_lost_total"]
    {
        assert!(live.body.contains(family), "{family} in:\n{}", live.body);
    }
    let (ok, report) = promtool(&["check", "metrics"], Some(&live.body));
    assert!(ok, "promtool check metrics: {report}\n{}", live.body);

    lab::fix().unwrap();
    prometheus.wait_for_value("wg1 direct after the fix", &nested, |v| v == 0.0);
    assert!(
        prometheus.query(&format!("{nested} == 1")).is_empty(),
        "the nested series went stale: {:?}",
        prometheus.query(&nested)
    );
    let (_, fixed) = prometheus.wait_for_value("wg1's inner RTT after the fix", &p50, |v| v < 0.010);
    println!("Prometheus saw wg1's inner RTT p50 go from {:.1} ms to {:.2} ms", rtt * 1e3, fixed * 1e3);
    let (labels, _) = prometheus.wait_for_value(
        "wg1's transport leaving directly",
        &format!(r#"wgtrace_transport_packets_total{{{wg1},egress_interface="c0"}}"#),
        |v| v > 0.0,
    );
    assert_eq!(labels["mark"], "51820", "{labels}");

    // Stopped as a service is: exit 0, the port closed, nothing left loaded.
    let status = exporter.terminate();
    assert_eq!(status.code(), Some(0), "wgtrace exited with {status}");
    assert!(std::net::TcpStream::connect(&address).is_err(), "{address} still accepts connections");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !wgtrace_programs().is_empty() {
        // The kernel frees programs shortly after their last reference goes.
        assert!(Instant::now() < deadline, "BPF programs left loaded: {:?}", wgtrace_programs());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn shipped_prometheus_files_pass_promtool() {
    const NAME: &str = "shipped_prometheus_files_pass_promtool";
    if !tools_or_skip(NAME, &[PROMTOOL]) {
        return;
    }
    for args in [
        ["check", "rules", "wgtrace-rules.yml"],
        ["check", "config", "prometheus.yml"],
        ["test", "rules", "wgtrace-rules.test.yml"],
    ] {
        let dir = deploy("prometheus");
        let output = Command::new(PROMTOOL).args(args).current_dir(&dir).output().unwrap();
        assert!(
            output.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// The PromQL of every panel and variable of the shipped Grafana dashboard.
fn dashboard_queries() -> Vec<String> {
    fn collect(value: &serde_json::Value, out: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, v) in map {
                    match (key.as_str(), v) {
                        ("expr" | "query", serde_json::Value::String(s)) if s != "prometheus" => out.push(s.clone()),
                        _ => collect(v, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| collect(v, out)),
            _ => {}
        }
    }
    let text = std::fs::read_to_string(deploy("grafana/wgtrace-dashboard.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    collect(&dashboard, &mut exprs);
    // label_values(...) is Grafana's, not PromQL: its selector is.
    exprs
        .into_iter()
        .map(|e| match e.strip_prefix("label_values(").and_then(|r| r.rsplit_once(',')) {
            Some((selector, _)) => selector.to_owned(),
            None => e,
        })
        .collect()
}

/// The Grafana dashboard is JSON and asks only for metrics that exist.
#[test]
fn grafana_dashboard_uses_the_exported_families() {
    let families = [
        "wgtrace_tunnel_nested",
        "wgtrace_transport_packets_total",
        "wgtrace_transport_bytes_total",
        "wgtrace_inner_rtt_seconds_bucket",
        "wgtrace_handshake_rtt_seconds_bucket",
        "wgtrace_transmit_latency_seconds_bucket",
        "wgtrace_inner_rtt_seconds_count",
        "wgtrace_events_lost_total",
        "wgtrace_build_info",
        "wgtrace_peers",
        "wgtrace_peers_up",
        "wgtrace_peer_last_handshake_timestamp_seconds",
        "up",
    ];
    let exprs = dashboard_queries();
    assert!(exprs.len() >= 6, "panels with queries: {exprs:?}");
    for expr in &exprs {
        let names: Vec<&str> = expr
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("wgtrace_"))
            .collect();
        for name in names {
            assert!(families.contains(&name), "{name} in `{expr}` is not exported");
        }
    }
}

/// Clients that connect, send half a request and drip a byte now and then,
/// reconnecting whenever the server closes them; plus one that sends
/// megabytes of headers, over and over. Stops when dropped.
struct SlowClients {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<u64>>,
}

impl SlowClients {
    fn start(address: &str, count: usize) -> Self {
        use std::{io::Write as _, net::TcpStream, sync::atomic::Ordering};
        raise_open_file_limit();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let connect = |address: &str| {
            let mut stream = TcpStream::connect(address).ok()?;
            stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").ok()?;
            stream.set_nonblocking(true).ok()?;
            Some(stream)
        };
        let mut slow: Vec<Option<TcpStream>> = (0..count).map(|_| connect(address)).collect();
        let dripping = {
            let (stop, address) = (stop.clone(), address.to_owned());
            std::thread::spawn(move || {
                let mut reconnects = 0;
                while !stop.load(Ordering::Relaxed) {
                    for slot in &mut slow {
                        let alive = slot.as_mut().is_some_and(|s| match s.write(b"X") {
                            Ok(_) => true,
                            Err(err) => err.kind() == std::io::ErrorKind::WouldBlock,
                        });
                        if !alive {
                            *slot = connect(&address);
                            reconnects += 1;
                        }
                    }
                    std::thread::sleep(Duration::from_millis(300));
                }
                reconnects
            })
        };
        let huge = {
            let (stop, address) = (stop.clone(), address.to_owned());
            std::thread::spawn(move || {
                let line = format!("X-Padding: {}\r\n", "a".repeat(1000));
                let mut cut_off = 0;
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut stream) = TcpStream::connect(&address) else { continue };
                    let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
                    let mut sent = 0usize;
                    while sent < 8 << 20 && stream.write_all(line.as_bytes()).is_ok() {
                        sent += line.len();
                    }
                    assert!(sent < 8 << 20, "the exporter took in 8 MB of headers");
                    cut_off += 1;
                    std::thread::sleep(Duration::from_millis(50));
                }
                cut_off
            })
        };
        Self { stop, threads: vec![dripping, huge] }
    }

    /// Stops them: (reconnects of the slow ones, huge requests cut off).
    fn stop(mut self) -> (u64, u64) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut results = self.threads.drain(..).map(|t| t.join().expect("a client thread panicked"));
        (results.next().unwrap(), results.next().unwrap())
    }
}

impl Drop for SlowClients {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

fn raise_open_file_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit on a local rlimit.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
}

/// A process's peak resident memory in kB.
fn peak_rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn prometheus_scrapes_while_two_thousand_slow_clients_hold_connections() {
    const NAME: &str = "prometheus_scrapes_while_two_thousand_slow_clients_hold_connections";
    if !privileged_or_skip(NAME) || !tools_or_skip(NAME, &[PROMETHEUS]) {
        return;
    }
    // No lab: the exporter is the subject, whatever the host's tunnels. The
    // lab lock all the same: a 1 s bound should not share two cores with
    // another test's lab traffic and tracer.
    let _alone = lab::lock().unwrap();
    let address = format!("127.0.0.1:{}", free_port());
    let exporter = Exporter::start(&address);
    wait_for("wgtrace's metrics endpoint", Duration::from_secs(30), || {
        exporter.metrics(CLASSIC).ok().filter(|r| r.status == 200)
    });
    let pid = exporter.child.as_ref().unwrap().id();
    let rss_before = peak_rss_kb(pid);
    let prometheus = Prometheus::start(&address);
    prometheus.wait_for_value("a first scrape", r#"up{job="wgtrace"}"#, |v| v == 1.0);

    let clients = SlowClients::start(&address, 2000);
    // Long enough for slow clients to be dropped at the header deadline and
    // to reconnect, several scrapes one second apart.
    std::thread::sleep(Duration::from_secs(8));
    let window = r#"[6s]"#;
    let scrapes = prometheus.query(&format!(r#"count_over_time(up{{job="wgtrace"}}{window})"#));
    let answered = prometheus.query(&format!(r#"sum_over_time(up{{job="wgtrace"}}{window})"#));
    let slowest = prometheus.query(&format!(r#"max_over_time(scrape_duration_seconds{{job="wgtrace"}}{window})"#));
    let rss_under_attack = peak_rss_kb(pid);
    let (reconnects, cut_off) = clients.stop();
    println!(
        "under 2 000 slow clients ({reconnects} reconnects after being closed) and {cut_off} 8 MB header floods: \
         {scrapes:?} scrapes, {answered:?} answered, slowest {slowest:?} s; wgtrace peak RSS {rss_before} kB before, \
         {rss_under_attack} kB after"
    );
    assert!(scrapes.first().is_some_and(|(_, n)| *n >= 4.0), "too few scrapes: {scrapes:?}\n{}", prometheus.log());
    assert_eq!(
        scrapes.first().map(|(_, n)| *n),
        answered.first().map(|(_, n)| *n),
        "scrapes failed under the flood\n{}",
        prometheus.log()
    );
    let slowest = slowest.first().map(|(_, v)| *v).unwrap_or(f64::INFINITY);
    assert!(slowest < 1.0, "the slowest scrape took {slowest} s");
    assert!(cut_off > 0, "the header flood never got cut off");
    assert!(rss_under_attack < rss_before + 64 * 1024, "memory grew from {rss_before} kB to {rss_under_attack} kB");
    let status = exporter.terminate();
    assert_eq!(status.code(), Some(0), "wgtrace exited with {status}");
}

/// The shipped WireGuardHandshakeStale rule, evaluated by a real
/// Prometheus against the lab (its `for` shortened, wgtrace's
/// --handshake-timeout too): quiet while wg1 is idle with an old
/// handshake, firing once wg1's server is stopped and wg1 sends.
#[test]
fn the_handshake_alert_fires_for_a_dead_server_while_sending_and_stays_quiet_when_idle() {
    const NAME: &str = "the_handshake_alert_fires_for_a_dead_server_while_sending_and_stays_quiet_when_idle";
    if !privileged_or_skip(NAME) || !tools_or_skip(NAME, &[PROMETHEUS]) {
        return;
    }
    let _lab = LabGuard::up(&lab::LabOptions::default()).unwrap();
    let address = format!("127.0.0.1:{}", free_port());
    let _exporter = Exporter::start_with(&address, &["--handshake-timeout", "3"]);
    let shipped = std::fs::read_to_string(deploy("prometheus/wgtrace-rules.yml")).unwrap();
    let stale_rule =
        shipped.split("- alert: WireGuardHandshakeStale").nth(1).unwrap().split("- alert:").next().unwrap();
    assert!(stale_rule.contains("        for: 5m\n"), "{stale_rule}");
    let rules = shipped.replace(stale_rule, &stale_rule.replace("        for: 5m\n", "        for: 2s\n"));
    let prometheus = Prometheus::start_with_rules(&address, &rules);
    let wg1 = r#"interface="wg1",netns="wgtlab-client""#;
    let alert = format!(r#"ALERTS{{alertname="WireGuardHandshakeStale",{wg1}}}"#);

    // Idle: the lab's handshake ages past 3 s, nothing is sent: quiet.
    prometheus
        .wait_for_value("wg1's peer down by its handshake age", &format!("wgtrace_peers_up{{{wg1}}}"), |v| v == 0.0);
    let quiet_until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < quiet_until {
        assert!(prometheus.query(&alert).is_empty(), "alert on an idle tunnel: {:?}", prometheus.query(&alert));
        std::thread::sleep(Duration::from_millis(500));
    }

    // wg1's server stops; the client keeps sending (handshake initiations).
    let state = lab::load_state().unwrap();
    let server = state.daemons[&format!("{}/wg1", lab::ROUTER)];
    // SAFETY: signalling the lab's own daemon, recorded by `lab up`.
    unsafe { libc::kill(server as libc::pid_t, libc::SIGTERM) };
    let _traffic = Traffic::ping(lab::WG1_REMOTE).unwrap();
    let firing = format!(r#"ALERTS{{alertname="WireGuardHandshakeStale",alertstate="firing",{wg1}}}"#);
    let (labels, _) = prometheus.wait_for_value("the stale-handshake alert firing for wg1", &firing, |v| v == 1.0);
    assert_eq!(labels["severity"], "warning", "{labels}");
    // (wg0, which carries that traffic, may alert too: with a 3 s timeout its
    // handshakes, renewed every 120 s, are stale while it sends.)
}
