//! `cargo xtask bench`: what tracing costs, on the lab with its delay line
//! off, side by side with a bpftrace baseline, checked against the overhead
//! budget and written to BENCHMARKS.md.
//!
//! One invocation alternates the conditions (untraced, wgtrace, bpftrace)
//! load by load, round after round, so each ratio compares measurements
//! taken seconds apart on the same, possibly shared and noisy, machine.
//! Tables give the median over rounds with min–max. Per round:
//!
//! * iperf3 TCP over wg0, over wg1 as the lab leaves it (nested in wg0) and
//!   over wg1 fixed, then iperf3 UDP with 64-byte payloads at unlimited rate
//!   over wg1, each under each condition back to back, the tracer started
//!   afresh (and wgtrace given time to settle into its steady state); the
//!   tracer's utime+stime and VmHWM are read around the UDP run, and
//!   wgtrace's `--json` report after it gives `events_lost`;
//! * per tracer, a run started with ping already flowing over wg1, for the
//!   time to wgtrace's first verdict, then a cost window with
//!   `kernel.bpf_stats_enabled=1` (TCP, then small UDP over wg1) read
//!   through `bpftool prog show --json`. The sysctl is on only there, so its
//!   two clock reads per program run do not bias the throughput ratios.
//!
//! Then, once: wgtrace with 0, 1, 10, 100 extra wireguard-go tunnels in the
//! client namespace, and with 1k vs 50k distinct WireGuard-shaped UDP flows.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader, Read},
    net::{Ipv4Addr, UdpSocket},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::{
    cmd::{have, run, shell},
    lab,
};

pub struct Options {
    /// One round of ~1 s measurements, no thresholds, written to target/bench-smoke.md.
    pub smoke: bool,
    pub rounds: u32,
    /// Where to write the table (default BENCHMARKS.md, or target/bench-smoke.md with `smoke`).
    pub output: Option<PathBuf>,
}

/// The least a hand-written nesting detector must do: see every transmitted
/// packet's device and mark.
const BASELINE_SCRIPT: &str =
    "tracepoint:net:net_dev_start_xmit { @[str(args->name), ((struct sk_buff *)args->skbaddr)->mark] = count(); }";
/// How the baseline's program is labelled in the tables.
const BASELINE: &str = "bpftrace net_dev_start_xmit";
/// wgtrace's programs that run for every packet on every device.
const PER_PACKET: [&str; 2] = ["net_dev_start_xmit", "netif_receive_skb"];
const WGTRACE_PROGRAMS: [&str; 4] =
    ["net_dev_start_xmit", "netif_receive_skb", "fib_table_lookup", "fib6_table_lookup"];
const SMALL_PAYLOAD: u32 = 64;
const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";
const LOCK_FILE: &str = "/run/wgtrace-lab.lock";
/// Destination of the flow-scaling datagrams (discard, in the router, over wg1).
const FLOW_PORT: u16 = 9;
/// Flow-scaling datagrams per second: paced so wgtrace's ring buffer keeps up
/// and userspace really sees every new flow.
const FLOWS_PER_SECOND: usize = 20_000;

// Budget.
const MIN_THROUGHPUT_RATIO: f64 = 0.98;
const MIN_SMALL_PACKET_RATIO: f64 = 0.95;
const MAX_CPU_PERCENT: f64 = 2.0;
const MAX_RSS_BYTES: f64 = 40e6;
const MAX_FIRST_VERDICT_MS: f64 = 1000.0;
/// wgtrace traces continuously for 3 s after it starts and after each
/// topology change (the lab's fix and unfix), by design; the budget is about
/// the steady state a long-running tracer settles into, so every condition
/// waits this long after those events before measuring.
const SETTLE: Duration = Duration::from_millis(5500);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Condition {
    Untraced,
    Wgtrace,
    Bpftrace,
}

const CONDITIONS: [Condition; 3] = [Condition::Untraced, Condition::Wgtrace, Condition::Bpftrace];

impl Condition {
    fn label(self) -> &'static str {
        match self {
            Condition::Untraced => "untraced",
            Condition::Wgtrace => "wgtrace",
            Condition::Bpftrace => "bpftrace baseline",
        }
    }
}

/// The TCP throughput tests: label, far end, whether wg1 is fixed.
const TCP_TESTS: [(&str, &str); 3] = [
    ("wg0 (full tunnel)", lab::WG0_REMOTE),
    ("wg1 broken (nested in wg0)", lab::WG1_REMOTE),
    ("wg1 fixed (direct)", lab::WG1_REMOTE),
];

struct Plan {
    smoke: bool,
    rounds: u32,
    /// Seconds each iperf3 run measures, after `omit` seconds it discards.
    seconds: u32,
    omit: u32,
    tunnel_counts: Vec<usize>,
    flow_counts: Vec<usize>,
}

#[derive(Clone, Copy, Debug)]
struct Cost {
    ns_per_run: Option<f64>,
    runs_per_second: f64,
}

/// One condition in one round.
#[derive(Default, Debug)]
struct Block {
    tcp_mbps: [f64; 3],
    udp_pps: f64,
    /// Program label → cost, over the cost window.
    costs: BTreeMap<String, Cost>,
    cpu_percent: Option<f64>,
    rss_peak_kb: Option<u64>,
    events_lost: Option<u64>,
    /// Share of the block with wgtrace's programs attached.
    traced_fraction: Option<f64>,
    /// Some(None): wgtrace gave no verdict in time.
    first_verdict_ms: Option<Option<u64>>,
}

struct TunnelScale {
    extra: usize,
    tunnels_reported: usize,
    cpu_percent: f64,
    rss_peak_kb: u64,
    costs: BTreeMap<String, Cost>,
}

struct FlowScale {
    requested: usize,
    sent: usize,
    send_seconds: f64,
    rss_before_kb: u64,
    rss_after_kb: u64,
    rss_peak_kb: u64,
    memlock_bytes: u64,
    /// (entries, max_entries)
    flow_entries: Option<(u64, u64)>,
    route_entries: Option<(u64, u64)>,
    events_lost: u64,
}

pub fn main(options: &Options) -> Result<()> {
    anyhow::ensure!(unsafe { libc::geteuid() } == 0, "the benchmark needs root (eBPF, the lab)");
    let started = Instant::now();
    let plan = if options.smoke {
        Plan {
            smoke: true,
            rounds: 1,
            seconds: 1,
            omit: 0,
            tunnel_counts: vec![0, 1, 10],
            flow_counts: vec![1_000, 50_000],
        }
    } else {
        anyhow::ensure!(options.rounds > 0, "--rounds must be at least 1");
        Plan {
            smoke: false,
            rounds: options.rounds,
            seconds: 5,
            omit: 1,
            tunnel_counts: vec![0, 1, 10, 100],
            flow_counts: vec![1_000, 50_000],
        }
    };
    let root = workspace_root();
    let output = options
        .output
        .clone()
        .unwrap_or_else(|| if options.smoke { root.join("target/bench-smoke.md") } else { root.join("BENCHMARKS.md") });
    crate::setup::setup()?;
    for tool in ["bpftrace", "bpftool", "iperf3", "ip", "wg", "wireguard-go"] {
        anyhow::ensure!(have(tool), "{tool} is missing: run `cargo xtask setup`");
    }
    eprintln!("bench: building wgtrace (release)");
    let build_started = Instant::now();
    let status = Command::new(env!("CARGO"))
        .args(["build", "--release", "-p", "wgtrace"])
        .current_dir(&root)
        .status()
        .context("running cargo build")?;
    anyhow::ensure!(status.success(), "cargo build --release -p wgtrace failed");
    let wgtrace = root.join("target/release/wgtrace");
    let build = build_started.elapsed();
    install_sigint_handler();

    let lock_started = Instant::now();
    let _lock = lock_lab()?;
    let lock_wait = lock_started.elapsed();
    let host = Host::describe(&root);
    let stats = BpfStats::new()?;
    eprintln!("bench: bringing the lab up (no delay line)");
    let lab_session = LabSession::up()?;
    let servers = IperfServers::start()?;
    // Handshakes and caches, before anything is recorded.
    tcp(lab::WG0_REMOTE, 1, 0)?;
    tcp(lab::WG1_REMOTE, 1, 0)?;

    let mut blocks: Vec<(u32, Condition, Block)> = Vec::new();
    for round in 1..=plan.rounds {
        eprintln!("bench: round {round}/{}", plan.rounds);
        let measured = measure_round(&plan, round, &wgtrace, &stats).with_context(|| format!("round {round}"))?;
        for (condition, block) in measured {
            eprintln!("bench:   {}: {block:?}", condition.label());
            blocks.push((round, condition, block));
        }
    }
    eprintln!("bench: scaling with tunnels: {:?} extra", plan.tunnel_counts);
    let tunnels = scale_tunnels(&plan, &wgtrace, &stats).context("scaling with tunnels")?;
    eprintln!("bench: scaling with flows: {:?}", plan.flow_counts);
    let flows = scale_flows(&plan, &wgtrace).context("scaling with flows")?;
    drop(servers);
    drop(stats);
    let lab_down = lab_session.down();
    let load_after = load_average();

    let elapsed = started.elapsed();
    let results = Results { plan: &plan, host, blocks, tunnels, flows, load_after, elapsed, lock_wait, build };
    let markdown = render(&results);
    if let Some(parent) = output.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::write(&output, &markdown).with_context(|| format!("writing {}", output.display()))?;
    println!("{markdown}");
    eprintln!(
        "bench: wrote {} after {} ({} of it waiting for the lab lock, {} building)",
        output.display(),
        minutes(elapsed),
        minutes(lock_wait),
        minutes(build)
    );
    if let Err(err) = lab_down {
        eprintln!("bench: warning: taking the lab down failed: {err:#}");
    }
    Ok(())
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_owned()
}

// ---------------------------------------------------------------------------
// One round

/// What one throughput measurement runs.
#[derive(Clone, Copy, PartialEq)]
enum Load {
    Tcp(usize),
    SmallUdp,
}

/// One round: each load under each condition back to back (a tracer started
/// afresh for each, settled), so a ratio compares runs seconds apart; then,
/// per tracer, the time to its first verdict and the in-kernel cost window.
fn measure_round(plan: &Plan, round: u32, wgtrace: &Path, stats: &BpfStats) -> Result<Vec<(Condition, Block)>> {
    // Each round starts with a different condition, so a drift within
    // rounds (the machine's other work) does not always favour one.
    let order: Vec<Condition> =
        (0..CONDITIONS.len()).map(|i| CONDITIONS[(i + round as usize - 1) % CONDITIONS.len()]).collect();
    let mut blocks: BTreeMap<usize, Block> = BTreeMap::new();
    let loads = [Load::Tcp(0), Load::Tcp(1), Load::Tcp(2), Load::SmallUdp];
    for load in loads {
        // wg1 fixed: fixed before any tracer starts, so no tracer sees the
        // change (wgtrace would trace it continuously for its first seconds).
        if load == Load::Tcp(2) {
            lab::fix()?;
        }
        let measured = (|| -> Result<()> {
            for &condition in &order {
                check_interrupted()?;
                let block = blocks.entry(index_of(condition)).or_default();
                measure_load(plan, condition, load, wgtrace, block)
                    .with_context(|| format!("{} under {}", load.label(), condition.label()))?;
            }
            Ok(())
        })();
        if load == Load::Tcp(2) {
            lab::unfix()?;
        }
        measured?;
    }
    for &condition in order.iter().filter(|c| **c != Condition::Untraced) {
        let block = blocks.entry(index_of(condition)).or_default();
        measure_costs(plan, condition, wgtrace, stats, block)
            .with_context(|| format!("cost window of {}", condition.label()))?;
    }
    Ok(order.iter().map(|&c| (c, blocks.remove(&index_of(c)).unwrap_or_default())).collect())
}

fn index_of(condition: Condition) -> usize {
    CONDITIONS.iter().position(|c| *c == condition).expect("a known condition")
}

impl Load {
    fn label(self) -> &'static str {
        match self {
            Load::Tcp(i) => TCP_TESTS[i].0,
            Load::SmallUdp => "small UDP packets",
        }
    }
}

/// Starts the condition's tracer and waits until wgtrace is in its steady
/// state (past the continuous tracing that follows its start).
fn start_settled(plan: &Plan, condition: Condition, wgtrace: &Path) -> Result<Option<Tracer>> {
    if condition == Condition::Untraced {
        return Ok(None);
    }
    let mut tracer = Tracer::start(condition, wgtrace)?;
    tracer.wait_ready(Duration::from_secs(60))?;
    if condition == Condition::Wgtrace && !plan.smoke {
        std::thread::sleep(SETTLE);
    }
    Ok(Some(tracer))
}

fn measure_load(plan: &Plan, condition: Condition, load: Load, wgtrace: &Path, block: &mut Block) -> Result<()> {
    let tracer = start_settled(plan, condition, wgtrace)?;
    match load {
        Load::Tcp(i) => block.tcp_mbps[i] = tcp(TCP_TESTS[i].1, plan.seconds, plan.omit)?,
        Load::SmallUdp => {
            // The maximum rate, with the tracer's userspace CPU around it.
            let before = tracer.as_ref().map(|t| cpu_ticks(t.pid())).transpose()?;
            let wall = Instant::now();
            block.udp_pps = udp_small(lab::WG1_REMOTE, plan.seconds, plan.omit)?;
            if let (Some(tracer), Some(before)) = (&tracer, before) {
                let used = cpu_ticks(tracer.pid())?.saturating_sub(before);
                block.cpu_percent = Some(ticks_to_percent(used, wall.elapsed()));
                block.rss_peak_kb = Some(status_kb(tracer.pid(), "VmHWM")?);
            }
        }
    }
    let Some(tracer) = tracer else { return Ok(()) };
    let report = tracer.stop()?;
    if condition == Condition::Wgtrace && load == Load::SmallUdp {
        let report: Value =
            serde_json::from_str(&report).context("wgtrace --json printed something that is not JSON")?;
        block.events_lost = Some(report["events_lost"].as_u64().context("no events_lost in wgtrace's report")?);
        block.traced_fraction = report["traced_fraction"].as_f64();
    }
    std::thread::sleep(Duration::from_millis(300));
    Ok(())
}

/// The time to the first verdict (wgtrace), then a cost window with the
/// kernel's accounting on under mixed load over wg1.
fn measure_costs(plan: &Plan, condition: Condition, wgtrace: &Path, stats: &BpfStats, block: &mut Block) -> Result<()> {
    // Traffic already flowing over wg1 when the tracer starts, so the first
    // verdict measures wgtrace, not the wait for a packet.
    let ping = Background::spawn("ip", &["netns", "exec", lab::CLIENT, "ping", "-q", "-i", "0.01", lab::WG1_REMOTE])?;
    std::thread::sleep(Duration::from_millis(300));
    // wgtrace logs its first verdict long before it has settled.
    let mut tracer = start_settled(plan, condition, wgtrace)?.context("a traced condition has a tracer")?;
    if condition == Condition::Wgtrace {
        block.first_verdict_ms = Some(tracer.first_verdict_ms(Duration::from_secs(10))?);
    }
    drop(ping);
    let ids = bpf_ids(tracer.pid(), "prog_id");
    anyhow::ensure!(!ids.is_empty(), "{} holds no BPF programs", condition.label());
    stats.set(true)?;
    let before = program_counters()?;
    let window = Instant::now();
    let load = tcp(lab::WG1_REMOTE, plan.seconds, plan.omit).and_then(|_| udp_small(lab::WG1_REMOTE, plan.seconds, 0));
    let after = program_counters();
    let window = window.elapsed();
    stats.set(false)?;
    load?;
    block.costs = costs(&ids, &before, &after?, window, condition);
    tracer.stop()?;
    Ok(())
}

/// Per-run cost of each of `ids` between two snapshots, labelled by program.
fn costs(
    ids: &BTreeSet<u32>,
    before: &BTreeMap<u32, Counter>,
    after: &BTreeMap<u32, Counter>,
    window: Duration,
    condition: Condition,
) -> BTreeMap<String, Cost> {
    let mut out = BTreeMap::new();
    for id in ids {
        let (Some(a), Some(b)) = (before.get(id), after.get(id)) else { continue };
        let runs = b.run_cnt.saturating_sub(a.run_cnt);
        let ns = b.run_time_ns.saturating_sub(a.run_time_ns);
        let label = match condition {
            Condition::Bpftrace if b.name.starts_with("net_dev_start") => BASELINE.to_owned(),
            Condition::Bpftrace => format!("bpftrace {}", b.name),
            _ => b.name.clone(),
        };
        let cost = Cost {
            ns_per_run: (runs > 0).then(|| ns as f64 / runs as f64),
            runs_per_second: runs as f64 / window.as_secs_f64(),
        };
        out.insert(label, cost);
    }
    out
}

// ---------------------------------------------------------------------------
// Scaling

fn scale_tunnels(plan: &Plan, wgtrace: &Path, stats: &BpfStats) -> Result<Vec<TunnelScale>> {
    let mut extras = ExtraTunnels::new()?;
    let mut out = Vec::new();
    for &extra in &plan.tunnel_counts {
        check_interrupted()?;
        let created = Instant::now();
        extras.grow_to(extra)?;
        eprintln!("bench:   {extra} extra tunnels ({:.1} s to create)", created.elapsed().as_secs_f64());
        let mut tracer = Tracer::start(Condition::Wgtrace, wgtrace)?;
        tracer.wait_ready(Duration::from_secs(60))?;
        // Past start-up and a first topology refresh.
        std::thread::sleep(Duration::from_millis(1500));
        let ids = bpf_ids(tracer.pid(), "prog_id");
        stats.set(true)?;
        let before = program_counters()?;
        let ticks = cpu_ticks(tracer.pid())?;
        let window = Instant::now();
        let load = tcp(lab::WG1_REMOTE, plan.seconds, plan.omit);
        let used = cpu_ticks(tracer.pid())?.saturating_sub(ticks);
        let after = program_counters();
        let elapsed = window.elapsed();
        stats.set(false)?;
        load?;
        let rss_peak_kb = status_kb(tracer.pid(), "VmHWM")?;
        let report: Value = serde_json::from_str(&tracer.stop()?).context("wgtrace's report is not JSON")?;
        let tunnels_reported = report["tunnels"].as_array().map_or(0, Vec::len);
        out.push(TunnelScale {
            extra,
            tunnels_reported,
            cpu_percent: ticks_to_percent(used, elapsed),
            rss_peak_kb,
            costs: costs(&ids, &before, &after?, elapsed, Condition::Wgtrace),
        });
    }
    extras.remove();
    Ok(out)
}

fn scale_flows(plan: &Plan, wgtrace: &Path) -> Result<Vec<FlowScale>> {
    let mut out = Vec::new();
    for &requested in &plan.flow_counts {
        check_interrupted()?;
        let mut tracer = Tracer::start(Condition::Wgtrace, wgtrace)?;
        tracer.wait_ready(Duration::from_secs(60))?;
        std::thread::sleep(Duration::from_millis(1200));
        let rss_before_kb = status_kb(tracer.pid(), "VmRSS")?;
        let (sent, send_time) = send_flows(requested)?;
        // Two refresh ticks, so userspace has drained and processed them.
        std::thread::sleep(Duration::from_millis(2200));
        let rss_after_kb = status_kb(tracer.pid(), "VmRSS")?;
        let rss_peak_kb = status_kb(tracer.pid(), "VmHWM")?;
        let maps = maps(&bpf_ids(tracer.pid(), "map_id"))?;
        let memlock_bytes = maps.iter().map(|m| m.memlock).sum();
        let entries = |name: &str| -> Result<Option<(u64, u64)>> {
            maps.iter().find(|m| m.name == name).map(|m| Ok((map_entries(m.id)?, m.max_entries))).transpose()
        };
        let (flow_entries, route_entries) = (entries("FLOWS")?, entries("ROUTES")?);
        let report: Value = serde_json::from_str(&tracer.stop()?).context("wgtrace's report is not JSON")?;
        out.push(FlowScale {
            requested,
            sent,
            send_seconds: send_time.as_secs_f64(),
            rss_before_kb,
            rss_after_kb,
            rss_peak_kb,
            memlock_bytes,
            flow_entries,
            route_entries,
            events_lost: report["events_lost"].as_u64().context("no events_lost in wgtrace's report")?,
        });
        if !plan.smoke {
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    Ok(out)
}

/// A WireGuard data message as wgtrace classifies it: type 4, three zero
/// bytes, receiver index, counter, and a 32-byte (padded + tag) body.
fn wireguard_shaped_datagram() -> [u8; 48] {
    let mut message = [0u8; 48];
    message[0] = 4;
    message[4..8].copy_from_slice(&0x5eed_u32.to_le_bytes());
    message
}

/// Sends one WireGuard-shaped datagram from each of `count` distinct source
/// ports, from the lab client over wg1, paced at FLOWS_PER_SECOND.
fn send_flows(count: usize) -> Result<(usize, Duration)> {
    let netns = fs::File::open(format!("/run/netns/{}", lab::CLIENT))?;
    let sender = std::thread::spawn(move || -> Result<(usize, Duration)> {
        // SAFETY: setns on this thread only, with a valid namespace fd.
        if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("entering {}: {}", lab::CLIENT, std::io::Error::last_os_error());
        }
        let message = wireguard_shaped_datagram();
        let started = Instant::now();
        let mut sent = 0;
        for port in 10_000..=u16::MAX {
            if sent == count {
                break;
            }
            // Ports in use (the lab's tunnels) are skipped.
            let Ok(socket) = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)) else { continue };
            if socket.send_to(&message, (lab::WG1_REMOTE, FLOW_PORT)).is_ok() {
                sent += 1;
            }
            if sent % 1000 == 0 {
                let due = Duration::from_secs_f64(sent as f64 / FLOWS_PER_SECOND as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        }
        Ok((sent, started.elapsed()))
    });
    sender.join().map_err(|_| anyhow::anyhow!("the flow sender panicked"))?
}

/// Extra userspace tunnels in the lab client namespace (`wgbN`), each its own
/// wireguard-go daemon with one peer, to see what wgtrace's per-tunnel work costs.
struct ExtraTunnels {
    dir: PathBuf,
    count: usize,
    peer: String,
}

impl ExtraTunnels {
    fn new() -> Result<Self> {
        let dir = Path::new(lab::STATE_DIR).join(lab::CLIENT).join("bench-wireguard");
        fs::create_dir_all(&dir)?;
        let key = run("wg", &["genkey"])?.trim().to_owned();
        fs::write(dir.join("private.key"), format!("{key}\n"))?;
        let peer_private = run("wg", &["genkey"])?.trim().to_owned();
        let peer = shell(&format!("echo '{peer_private}' | wg pubkey"))?.trim().to_owned();
        Ok(Self { dir, count: 0, peer })
    }

    fn grow_to(&mut self, count: usize) -> Result<()> {
        if count <= self.count {
            return Ok(());
        }
        anyhow::ensure!(count <= 250, "at most 250 extra tunnels");
        // One mount namespace for the batch, with /run/wireguard bound to our
        // directory as the lab does, so the UAPI sockets are found through
        // /proc/PID/root of each daemon.
        let script = format!(
            "mount --bind {dir} /run/wireguard\n\
             for i in $(seq {first} {last}); do\n\
               wireguard-go wgb$i >/dev/null 2>&1\n\
               wg set wgb$i private-key {dir}/private.key listen-port $((52000 + i)) \
                 peer {peer} endpoint {endpoint}:$((52000 + i)) allowed-ips 10.77.0.$i/32\n\
               ip addr add 10.78.0.$i/32 dev wgb$i\n\
               ip link set wgb$i up\n\
             done",
            dir = self.dir.display(),
            first = self.count + 1,
            last = count,
            peer = self.peer,
            endpoint = lab::ROUTER_PUBLIC_V4,
        );
        run("ip", &["netns", "exec", lab::CLIENT, "sh", "-ec", &script]).context("creating extra tunnels")?;
        self.count = count;
        Ok(())
    }

    /// The daemons, found by name among the client namespace's processes.
    fn pids(&self) -> Vec<i32> {
        let Ok(pids) = run("ip", &["netns", "pids", lab::CLIENT]) else { return Vec::new() };
        pids.split_whitespace()
            .filter_map(|pid| pid.parse::<i32>().ok())
            .filter(|pid| {
                let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let mut args = cmdline.split(|b| *b == 0);
                args.next().is_some_and(|a| a.ends_with(b"wireguard-go"))
                    && args.next().is_some_and(|a| a.starts_with(b"wgb"))
            })
            .collect()
    }

    fn remove(&mut self) {
        let pids = self.pids();
        for pid in &pids {
            // SAFETY: signalling daemons we started, found by name in the lab.
            unsafe { libc::kill(*pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while pids.iter().any(|pid| alive(*pid)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        for pid in pids.iter().filter(|pid| alive(**pid)) {
            unsafe { libc::kill(*pid, libc::SIGKILL) };
        }
        self.count = 0;
    }
}

impl Drop for ExtraTunnels {
    fn drop(&mut self) {
        if self.count > 0 {
            self.remove();
        }
    }
}

fn alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| !stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')))
}

// ---------------------------------------------------------------------------
// Tracers

type Lines = Arc<Mutex<Vec<String>>>;

fn collect_lines(stream: impl Read + Send + 'static) -> (Lines, JoinHandle<()>) {
    let lines: Lines = Arc::default();
    let sink = lines.clone();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            sink.lock().expect("lines").push(line);
        }
    });
    (lines, reader)
}

/// wgtrace (`run --json -v`) or the bpftrace baseline, running in the root
/// namespace (both see every namespace).
struct Tracer {
    condition: Condition,
    child: Child,
    stdout: Lines,
    stderr: Lines,
    readers: Vec<JoinHandle<()>>,
}

impl Tracer {
    fn start(condition: Condition, wgtrace: &Path) -> Result<Self> {
        let mut command = match condition {
            Condition::Wgtrace => {
                let mut command = Command::new(wgtrace);
                command.args(["run", "--json", "-v"]).env_remove("RUST_LOG");
                command
            }
            Condition::Bpftrace => {
                let mut command = Command::new("bpftrace");
                command.args(["-e", BASELINE_SCRIPT]);
                command
            }
            Condition::Untraced => bail!("no tracer for the untraced condition"),
        };
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", condition.label()))?;
        let (stdout, out_reader) = collect_lines(child.stdout.take().expect("piped"));
        let (stderr, err_reader) = collect_lines(child.stderr.take().expect("piped"));
        Ok(Self { condition, child, stdout, stderr, readers: vec![out_reader, err_reader] })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stderr_text(&self) -> String {
        self.stderr.lock().expect("lines").join("\n")
    }

    fn bail_if_exited(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited early ({status}):\n{}", self.condition.label(), self.stderr_text());
        }
        Ok(())
    }

    /// Until the programs are attached: wgtrace logs each hook, bpftrace
    /// prints "Attaching"; both then hold their programs' fds.
    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.bail_if_exited()?;
            let ready = match self.condition {
                Condition::Wgtrace => {
                    let hooks = self.stderr.lock().expect("lines").iter().filter(|l| l.contains(" hook ")).count();
                    hooks >= WGTRACE_PROGRAMS.len()
                }
                _ => self.stdout.lock().expect("lines").iter().any(|l| l.starts_with("Attaching")),
            };
            if ready && !bpf_ids(self.pid(), "prog_id").is_empty() {
                for line in self.stderr.lock().expect("lines").iter() {
                    if line.contains(" hook ") && line.ends_with("inactive") {
                        eprintln!("bench: warning: {line}");
                    }
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{} did not attach within {timeout:?}:\n{}", self.condition.label(), self.stderr_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The `first verdict after N ms` that `wgtrace run -v` logs, or None
    /// when none came within `timeout`.
    fn first_verdict_ms(&mut self, timeout: Duration) -> Result<Option<u64>> {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self.stderr.lock().expect("lines").iter().find_map(|line| {
                line.split_once("first verdict after ")?.1.split_whitespace().next()?.parse::<u64>().ok()
            });
            if found.is_some() {
                return Ok(found);
            }
            self.bail_if_exited()?;
            if Instant::now() > deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the tracer the way a user would (wgtrace: SIGTERM, then it
    /// prints its report; bpftrace: SIGINT) and returns its stdout.
    fn stop(mut self) -> Result<String> {
        let signal = if self.condition == Condition::Wgtrace { libc::SIGTERM } else { libc::SIGINT };
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid() as i32, signal) };
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                bail!("{} did not exit within 30 s of being stopped", self.condition.label());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        for reader in std::mem::take(&mut self.readers) {
            let _ = reader.join();
        }
        if self.condition == Condition::Wgtrace {
            anyhow::ensure!(status.success(), "wgtrace exited with {status}:\n{}", self.stderr_text());
        }
        Ok(self.stdout.lock().expect("lines").join("\n"))
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A helper process killed when dropped (iperf3 servers, ping).
struct Background(Child);

impl Background {
    fn spawn(program: &str, args: &[&str]) -> Result<Self> {
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {program} {}", args.join(" ")))?;
        Ok(Self(child))
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// ---------------------------------------------------------------------------
// Traffic

/// iperf3 servers at wg0's far end (server namespace) and wg1's (router).
struct IperfServers {
    _servers: Vec<Background>,
}

impl IperfServers {
    fn start() -> Result<Self> {
        let mut servers = Vec::new();
        for namespace in [lab::SERVER, lab::ROUTER] {
            servers.push(Background::spawn("ip", &["netns", "exec", namespace, "iperf3", "-s"])?);
        }
        std::thread::sleep(Duration::from_millis(300));
        Ok(Self { _servers: servers })
    }
}

/// Runs an iperf3 client in the lab client namespace and returns its JSON,
/// retrying twice (a server still finishing the previous test says busy).
fn iperf(args: &[&str]) -> Result<Value> {
    let mut full = vec!["netns", "exec", lab::CLIENT, "iperf3", "-J", "--connect-timeout", "3000"];
    full.extend_from_slice(args);
    let mut last_error = None;
    for attempt in 0..3 {
        if attempt > 0 {
            std::thread::sleep(Duration::from_secs(1));
        }
        check_interrupted()?;
        let output = crate::cmd::output("ip", &full)?;
        let json: Result<Value> = serde_json::from_slice(&output.stdout).context("iperf3 printed no JSON");
        match json {
            Ok(json) if json.get("error").is_none() && output.status.success() => return Ok(json),
            Ok(json) => last_error = Some(anyhow::anyhow!("{}", json["error"])),
            Err(err) => last_error = Some(err.context(String::from_utf8_lossy(&output.stderr).trim().to_owned())),
        }
    }
    Err(last_error.expect("three attempts").context(format!("iperf3 {}", args.join(" "))))
}

/// TCP throughput to `address`, in Mbit/s as the receiver saw it.
fn tcp(address: &str, seconds: u32, omit: u32) -> Result<f64> {
    let (seconds, omit) = (seconds.to_string(), omit.to_string());
    let json = iperf(&["-c", address, "-t", &seconds, "-O", &omit])?;
    let bps =
        json["end"]["sum_received"]["bits_per_second"].as_f64().context("no end.sum_received in iperf3's JSON")?;
    Ok(bps / 1e6)
}

/// Small UDP packets at unlimited rate to `address`: packets per second received.
fn udp_small(address: &str, seconds: u32, omit: u32) -> Result<f64> {
    let (seconds, omit, length) = (seconds.to_string(), omit.to_string(), SMALL_PAYLOAD.to_string());
    let json = iperf(&["-c", address, "-u", "-b", "0", "-l", &length, "-t", &seconds, "-O", &omit])?;
    let received = &json["end"]["sum_received"];
    let bytes = received["bytes"].as_f64().context("no end.sum_received.bytes in iperf3's JSON")?;
    let elapsed = received["seconds"].as_f64().filter(|s| *s > 0.0).context("no end.sum_received.seconds")?;
    Ok(bytes / SMALL_PAYLOAD as f64 / elapsed)
}

// ---------------------------------------------------------------------------
// Kernel and process accounting

#[derive(Debug)]
struct Counter {
    name: String,
    run_time_ns: u64,
    run_cnt: u64,
}

/// Every loaded program's accumulated run time and count (`bpftool prog
/// show --json`; both are absent while zero).
fn program_counters() -> Result<BTreeMap<u32, Counter>> {
    let text = run("bpftool", &["prog", "show", "--json"])?;
    let programs: Vec<Value> = serde_json::from_str(&text).context("bpftool prog show --json")?;
    Ok(programs
        .iter()
        .filter_map(|p| {
            let counter = Counter {
                name: p["name"].as_str().unwrap_or_default().to_owned(),
                run_time_ns: p["run_time_ns"].as_u64().unwrap_or(0),
                run_cnt: p["run_cnt"].as_u64().unwrap_or(0),
            };
            Some((u32::try_from(p["id"].as_u64()?).ok()?, counter))
        })
        .collect())
}

struct MapInfo {
    id: u32,
    name: String,
    memlock: u64,
    max_entries: u64,
}

/// The maps `ids`, from `bpftool map show --json`.
fn maps(ids: &BTreeSet<u32>) -> Result<Vec<MapInfo>> {
    let text = run("bpftool", &["map", "show", "--json"])?;
    let maps: Vec<Value> = serde_json::from_str(&text).context("bpftool map show --json")?;
    Ok(maps
        .iter()
        .filter_map(|m| {
            let id = u32::try_from(m["id"].as_u64()?).ok()?;
            let name = m["name"].as_str().unwrap_or_default().to_owned();
            let memlock = m["bytes_memlock"].as_u64().unwrap_or(0);
            ids.contains(&id).then(|| MapInfo {
                id,
                name,
                memlock,
                max_entries: m["max_entries"].as_u64().unwrap_or(0),
            })
        })
        .collect())
}

/// How many entries map `id` holds: `bpftool map dump` ends with "Found N elements".
fn map_entries(id: u32) -> Result<u64> {
    let text = run("bpftool", &["map", "dump", "id", &id.to_string()])?;
    text.lines()
        .rev()
        .find_map(|l| l.strip_prefix("Found ")?.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no element count in `bpftool map dump id {id}`"))
}

/// The BPF program (`prog_id`) or map (`map_id`) IDs a process holds,
/// from its fds' fdinfo: this finds a tracer's own objects even when other
/// tools have loaded programs of the same name.
fn bpf_ids(pid: u32, key: &str) -> BTreeSet<u32> {
    let prefix = format!("{key}:");
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else { return BTreeSet::new() };
    fds.flatten()
        .filter_map(|fd| fs::read_to_string(fd.path()).ok())
        .flat_map(|info| {
            info.lines().filter_map(|l| l.strip_prefix(&prefix)?.trim().parse::<u32>().ok()).collect::<Vec<_>>()
        })
        .collect()
}

/// utime + stime of all of a process's threads, in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("reading /proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat.rsplit_once(')').context("/proc/PID/stat")?.1.split_whitespace().collect();
    // After "pid (comm)", field 3 (state) is index 0: utime is 14, stime 15.
    let field = |n: usize| -> Result<u64> { Ok(fields.get(n - 3).context("short /proc/PID/stat")?.parse()?) };
    Ok(field(14)? + field(15)?)
}

fn ticks_to_percent(ticks: u64, wall: Duration) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 / per_second / wall.as_secs_f64() * 100.0
}

/// A `kB` line of /proc/PID/status (VmHWM, VmRSS).
fn status_kb(pid: u32, key: &str) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':')?.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {key} in /proc/{pid}/status"))
}

/// kernel.bpf_stats_enabled, on only during cost windows, restored on drop.
struct BpfStats {
    original: String,
}

impl BpfStats {
    fn new() -> Result<Self> {
        let original = fs::read_to_string(STATS_SYSCTL).context("reading kernel.bpf_stats_enabled")?.trim().to_owned();
        Ok(Self { original })
    }

    fn set(&self, on: bool) -> Result<()> {
        // Someone else's setting wins over our "off".
        let value = if on || self.original == "1" { "1" } else { "0" };
        fs::write(STATS_SYSCTL, value).context("setting kernel.bpf_stats_enabled")
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Err(err) = fs::write(STATS_SYSCTL, &self.original) {
            eprintln!("bench: warning: restoring kernel.bpf_stats_enabled={}: {err}", self.original);
        }
    }
}

// ---------------------------------------------------------------------------
// The lab, exclusively, and interruption

/// The lab lock every lab user takes (the integration tests' LabGuard,
/// `cargo xtask lab`), held for the whole benchmark.
fn lock_lab() -> Result<fs::File> {
    let lock = fs::File::create(LOCK_FILE).with_context(|| format!("creating {LOCK_FILE}"))?;
    // SAFETY: flock on a file we own; released when it is closed.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        eprintln!("bench: the lab is in use (integration tests?); waiting for {LOCK_FILE}");
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            bail!("locking the lab: {}", std::io::Error::last_os_error());
        }
    }
    Ok(lock)
}

/// The lab with its delay line off; taken down when dropped, also on error.
struct LabSession {
    up: bool,
}

impl LabSession {
    fn up() -> Result<Self> {
        lab::up(&lab::LabOptions { delay_ms: 0, ..lab::LabOptions::default() })?;
        Ok(Self { up: true })
    }

    fn down(mut self) -> Result<()> {
        self.up = false;
        lab::down()
    }
}

impl Drop for LabSession {
    fn drop(&mut self) {
        if self.up
            && let Err(err) = lab::down()
        {
            eprintln!("bench: warning: taking the lab down failed: {err:#}");
        }
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C ends the benchmark at the next step, through the normal cleanup
/// (lab down, sysctl restored) instead of killing it mid-way.
fn install_sigint_handler() {
    // SAFETY: the handler only stores to an atomic.
    unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The report

struct Host {
    kernel: String,
    cpu: String,
    cores: usize,
    date: String,
    revision: String,
    tools: String,
    load_before: String,
}

impl Host {
    fn describe(root: &Path) -> Self {
        let first_line = |program: &str, args: &[&str]| {
            run(program, args).ok().and_then(|o| o.lines().next().map(|l| l.trim().to_owned())).unwrap_or_default()
        };
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| Some(l.strip_prefix("model name")?.split_once(':')?.1.trim().to_owned()))
            .unwrap_or_else(|| "unknown".into());
        let root_arg = root.to_string_lossy().into_owned();
        let commit = first_line("git", &["-C", &root_arg, "rev-parse", "--short", "HEAD"]);
        let dirty =
            run("git", &["-C", &root_arg, "status", "--porcelain", "--", "wgtrace", "wgtrace-ebpf", "wgtrace-common"])
                .is_ok_and(|s| !s.trim().is_empty());
        let revision = if commit.is_empty() {
            "unknown".into()
        } else if dirty {
            format!("{commit} with uncommitted changes in wgtrace*/")
        } else {
            commit
        };
        let wireguard_go = first_line("wireguard-go", &["--version"]);
        let tools = format!(
            "{}, {}, {}, {}",
            first_line("iperf3", &["--version"]).split(" (").next().unwrap_or_default(),
            first_line("bpftrace", &["--version"]),
            first_line("bpftool", &["version"]),
            wireguard_go.split(" for ").next().unwrap_or_default()
        );
        Host {
            kernel: first_line("uname", &["-r"]),
            cpu,
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            date: first_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            revision,
            tools,
            load_before: load_average(),
        }
    }
}

fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

struct Results<'a> {
    plan: &'a Plan,
    host: Host,
    blocks: Vec<(u32, Condition, Block)>,
    tunnels: Vec<TunnelScale>,
    flows: Vec<FlowScale>,
    load_after: String,
    elapsed: Duration,
    lock_wait: Duration,
    build: Duration,
}

impl Results<'_> {
    fn of(&self, condition: Condition) -> impl Iterator<Item = &Block> {
        self.blocks.iter().filter(move |(_, c, _)| *c == condition).map(|(_, _, b)| b)
    }

    /// Per-round ratios of a traced value to the untraced one of the same round.
    fn ratios(&self, condition: Condition, value: impl Fn(&Block) -> f64) -> Vec<f64> {
        (1..=self.plan.rounds)
            .filter_map(|round| {
                let find = |c| self.blocks.iter().find(|(r, cc, _)| *r == round && *cc == c).map(|(_, _, b)| b);
                let (traced, untraced) = (find(condition)?, find(Condition::Untraced)?);
                let base = value(untraced);
                (base > 0.0).then(|| value(traced) / base)
            })
            .collect()
    }

    fn values(&self, condition: Condition, value: impl Fn(&Block) -> Option<f64>) -> Vec<f64> {
        self.of(condition).filter_map(value).collect()
    }

    fn cost(&self, condition: Condition, program: &str) -> Vec<f64> {
        self.values(condition, |b| b.costs.get(program).and_then(|c| c.ns_per_run))
    }
}

#[derive(Clone, Copy)]
struct Summary {
    median: f64,
    min: f64,
    max: f64,
}

fn summarize(values: &[f64]) -> Option<Summary> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = if n % 2 == 1 { sorted[n / 2] } else { (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0 };
    Some(Summary { median, min: sorted[0], max: sorted[n - 1] })
}

/// "median (min–max)", or the single value; `scale` and `decimals` format it.
fn show(values: &[f64], scale: f64, decimals: usize) -> String {
    match summarize(values) {
        None => "–".into(),
        Some(s) if values.len() == 1 || s.min == s.max => format!("{:.*}", decimals, s.median * scale),
        Some(s) => {
            format!("{:.*} ({:.*}–{:.*})", decimals, s.median * scale, decimals, s.min * scale, decimals, s.max * scale)
        }
    }
}

fn minutes(elapsed: Duration) -> String {
    let seconds = elapsed.as_secs();
    if seconds >= 60 { format!("{} min {} s", seconds / 60, seconds % 60) } else { format!("{seconds} s") }
}

fn mb(kb: u64) -> f64 {
    kb as f64 * 1024.0 / 1e6
}

struct BudgetLine {
    what: String,
    target: String,
    measured: String,
    met: Option<bool>,
}

fn budget(results: &Results) -> Vec<BudgetLine> {
    let mut lines = Vec::new();
    let median = |v: &[f64]| summarize(v).map(|s| s.median);
    let max = |v: &[f64]| summarize(v).map(|s| s.max);
    for (i, (label, _)) in TCP_TESTS.iter().enumerate() {
        let ratios = results.ratios(Condition::Wgtrace, |b| b.tcp_mbps[i]);
        lines.push(BudgetLine {
            what: format!("TCP throughput over {label}, traced / untraced"),
            target: format!("≥ {:.0}%", MIN_THROUGHPUT_RATIO * 100.0),
            measured: format!("{}%", show(&ratios, 100.0, 1)),
            met: median(&ratios).map(|m| m >= MIN_THROUGHPUT_RATIO),
        });
    }
    let ratios = results.ratios(Condition::Wgtrace, |b| b.udp_pps);
    lines.push(BudgetLine {
        what: "Small-packet rate over wg1, traced / untraced".into(),
        target: format!("≥ {:.0}%", MIN_SMALL_PACKET_RATIO * 100.0),
        measured: format!("{}%", show(&ratios, 100.0, 1)),
        met: median(&ratios).map(|m| m >= MIN_SMALL_PACKET_RATIO),
    });
    let lost = results.values(Condition::Wgtrace, |b| b.events_lost.map(|n| n as f64));
    lines.push(BudgetLine {
        what: "Events lost at the lab's maximum rate (worst round)".into(),
        target: "0".into(),
        measured: max(&lost).map_or("–".into(), |m| format!("{m:.0}")),
        met: max(&lost).map(|m| m == 0.0),
    });
    let cpu = results.values(Condition::Wgtrace, |b| b.cpu_percent);
    lines.push(BudgetLine {
        what: "wgtrace userspace CPU at the maximum rate".into(),
        target: format!("≤ {MAX_CPU_PERCENT:.0}% of one core"),
        measured: format!("{}%", show(&cpu, 1.0, 2)),
        met: median(&cpu).map(|m| m <= MAX_CPU_PERCENT),
    });
    let rss = results.values(Condition::Wgtrace, |b| b.rss_peak_kb.map(mb));
    lines.push(BudgetLine {
        what: "wgtrace peak RSS (VmHWM, worst round)".into(),
        target: format!("≤ {:.0} MB", MAX_RSS_BYTES / 1e6),
        measured: max(&rss).map_or("–".into(), |m| format!("{m:.1} MB")),
        met: max(&rss).map(|m| m * 1e6 <= MAX_RSS_BYTES),
    });
    let verdicts: Vec<Option<u64>> = results.of(Condition::Wgtrace).filter_map(|b| b.first_verdict_ms).collect();
    let seen: Vec<f64> = verdicts.iter().flatten().map(|ms| *ms as f64).collect();
    let missing = verdicts.len() - seen.len();
    lines.push(BudgetLine {
        what: "Time from start to the first verdict (traffic flowing over wg1)".into(),
        target: format!("≤ {MAX_FIRST_VERDICT_MS:.0} ms"),
        measured: format!(
            "{} ms{}",
            show(&seen, 1.0, 0),
            if missing > 0 { format!(", none within 10 s in {missing} round(s)") } else { String::new() }
        ),
        met: (!verdicts.is_empty()).then(|| missing == 0 && median(&seen).is_some_and(|m| m <= MAX_FIRST_VERDICT_MS)),
    });
    let baseline = results.cost(Condition::Bpftrace, BASELINE);
    for program in PER_PACKET {
        let ours = results.cost(Condition::Wgtrace, program);
        lines.push(BudgetLine {
            what: format!("wgtrace {program}, ns per run, vs the baseline's program"),
            target: format!("≤ baseline ({} ns)", show(&baseline, 1.0, 0)),
            measured: format!("{} ns", show(&ours, 1.0, 0)),
            met: median(&ours).zip(median(&baseline)).map(|(o, b)| o <= b),
        });
    }
    lines
}

fn render(results: &Results) -> String {
    let plan = results.plan;
    let host = &results.host;
    let mut md = String::new();
    let w = &mut md;
    let _ = writeln!(w, "# wgtrace benchmarks\n");
    let _ = writeln!(
        w,
        "Generated by `cargo xtask bench{}` on {}. Do not edit by hand; re-run it instead.\n",
        if plan.smoke { " --smoke" } else { "" },
        host.date
    );
    let _ = writeln!(w, "| | |\n|---|---|");
    let _ = writeln!(w, "| Kernel | {} |", host.kernel);
    let _ = writeln!(w, "| CPU | {} ({} cores) |", host.cpu, host.cores);
    let _ = writeln!(w, "| wgtrace | {} (release build) |", host.revision);
    let _ = writeln!(w, "| Tools | {} |", host.tools);
    let _ = writeln!(
        w,
        "| Rounds | {} (each load untraced, under wgtrace and under the bpftrace baseline, back to back){} |",
        plan.rounds,
        if plan.smoke { "; smoke run, thresholds not checked" } else { "" }
    );
    let _ = writeln!(
        w,
        "| Each measurement | {} s{} |",
        plan.seconds,
        if plan.omit > 0 { format!(" after {} s discarded (iperf3 -O)", plan.omit) } else { String::new() }
    );
    let _ = writeln!(w, "| Load average (1/5/15 min) | {} before, {} after |", host.load_before, results.load_after);
    let _ = writeln!(
        w,
        "| Run time | {} measuring, plus {} building and {} waiting for the lab lock |\n",
        minutes(results.elapsed.saturating_sub(results.lock_wait + results.build)),
        minutes(results.build),
        minutes(results.lock_wait)
    );
    let _ = writeln!(
        w,
        "Values are the median over rounds with (min–max). A ratio compares a traced run with the untraced one \
         of the same round, seconds apart, so the machine's background load cancels out as far as it is steady.\n"
    );

    let _ = writeln!(w, "## Budget\n");
    let _ = writeln!(w, "| Line | Target | Measured | |\n|---|---|---|---|");
    let lines = budget(results);
    for line in &lines {
        let verdict = match (plan.smoke, line.met) {
            (true, _) => "not checked (smoke)",
            (false, Some(true)) => "met",
            (false, Some(false)) => "**MISSED**",
            (false, None) => "not measured",
        };
        let _ = writeln!(w, "| {} | {} | {} | {} |", line.what, line.target, line.measured, verdict);
    }
    if !plan.smoke {
        let missed: Vec<&str> = lines.iter().filter(|l| l.met == Some(false)).map(|l| l.what.as_str()).collect();
        if missed.is_empty() {
            let _ = writeln!(w, "\nEvery budget line is met.");
        } else {
            let _ = writeln!(w, "\nMissed ({} of {}): {}.", missed.len(), lines.len(), missed.join("; "));
        }
    }
    let _ = writeln!(
        w,
        "\nRatios, CPU and the time to the first verdict are judged on the median over rounds; events lost and \
         peak RSS on the worst round; program costs on the medians of the same benchmark run.\n"
    );

    let _ = writeln!(w, "## Throughput\n");
    let _ = writeln!(
        w,
        "iperf3 TCP from the lab client to the tunnel's far end (Mbit/s, as received). wg1 broken is the lab as \
         built: wg1's transport rides inside wg0, so each packet is encrypted twice; fixed is after `wg set wg1 \
         fwmark 51820`.\n"
    );
    let _ = writeln!(w, "| Tunnel | Untraced | wgtrace | bpftrace | wgtrace / untraced | bpftrace / untraced |");
    let _ = writeln!(w, "|---|---|---|---|---|---|");
    for (i, (label, _)) in TCP_TESTS.iter().enumerate() {
        let value = |c| results.values(c, |b: &Block| Some(b.tcp_mbps[i]));
        let _ = writeln!(
            w,
            "| {label} | {} | {} | {} | {}% | {}% |",
            show(&value(Condition::Untraced), 1.0, 0),
            show(&value(Condition::Wgtrace), 1.0, 0),
            show(&value(Condition::Bpftrace), 1.0, 0),
            show(&results.ratios(Condition::Wgtrace, |b| b.tcp_mbps[i]), 100.0, 1),
            show(&results.ratios(Condition::Bpftrace, |b| b.tcp_mbps[i]), 100.0, 1),
        );
    }
    let _ = writeln!(w, "\n## Small packets at the maximum rate\n");
    let _ = writeln!(
        w,
        "iperf3 UDP, {SMALL_PAYLOAD}-byte payloads, unlimited rate (`-u -b 0 -l {SMALL_PAYLOAD}`), over wg1 as \
         built (nested in wg0); packets per second received at wg1's far end.\n"
    );
    let _ = writeln!(w, "| | Untraced | wgtrace | bpftrace |\n|---|---|---|---|");
    let pps = |c| results.values(c, |b: &Block| Some(b.udp_pps));
    let _ = writeln!(
        w,
        "| Packets/s received | {} | {} | {} |",
        show(&pps(Condition::Untraced), 1.0, 0),
        show(&pps(Condition::Wgtrace), 1.0, 0),
        show(&pps(Condition::Bpftrace), 1.0, 0)
    );
    let _ = writeln!(
        w,
        "| Ratio to untraced | | {}% | {}% |",
        show(&results.ratios(Condition::Wgtrace, |b| b.udp_pps), 100.0, 1),
        show(&results.ratios(Condition::Bpftrace, |b| b.udp_pps), 100.0, 1)
    );
    let tracer_values = |c, f: &dyn Fn(&Block) -> Option<f64>| results.values(c, f);
    let _ = writeln!(
        w,
        "| Tracer userspace CPU, % of one core (utime+stime / wall) | | {} | {} |",
        show(&tracer_values(Condition::Wgtrace, &|b| b.cpu_percent), 1.0, 2),
        show(&tracer_values(Condition::Bpftrace, &|b| b.cpu_percent), 1.0, 2)
    );
    let _ = writeln!(
        w,
        "| Tracer peak RSS, MB (VmHWM) | | {} | {} |",
        show(&tracer_values(Condition::Wgtrace, &|b| b.rss_peak_kb.map(mb)), 1.0, 1),
        show(&tracer_values(Condition::Bpftrace, &|b| b.rss_peak_kb.map(mb)), 1.0, 1)
    );
    let _ = writeln!(
        w,
        "| Events lost (wgtrace `--json` `events_lost`, the maximum-rate run) | | {} | n/a |",
        show(&tracer_values(Condition::Wgtrace, &|b| b.events_lost.map(|n| n as f64)), 1.0, 0)
    );

    let _ = writeln!(w, "\n## In-kernel cost per program run\n");
    let _ = writeln!(
        w,
        "The kernel's own accounting: `kernel.bpf_stats_enabled=1` during a cost window of TCP and then small \
         UDP over wg1 ({} s each), `run_time_ns / run_cnt` deltas from `bpftool prog show --json` for the \
         programs the tracer holds. The sysctl is off during the throughput runs above, and restored at the end.\n",
        plan.seconds
    );
    let _ = writeln!(w, "| Program | ns per run | runs per second | CPU, % of one core |\n|---|---|---|---|");
    let mut programs: Vec<(Condition, String)> =
        WGTRACE_PROGRAMS.iter().map(|p| (Condition::Wgtrace, p.to_string())).collect();
    let mut others: BTreeSet<(u8, String)> = BTreeSet::new();
    for (_, condition, block) in &results.blocks {
        for name in block.costs.keys() {
            match condition {
                Condition::Wgtrace if !WGTRACE_PROGRAMS.contains(&name.as_str()) => {
                    others.insert((0, name.clone()));
                }
                Condition::Bpftrace => {
                    others.insert((1, name.clone()));
                }
                _ => {}
            }
        }
    }
    programs
        .extend(others.into_iter().map(|(k, n)| (if k == 0 { Condition::Wgtrace } else { Condition::Bpftrace }, n)));
    // ns per run × runs per second: the share of a core the program took.
    let share = |c: &Cost| c.ns_per_run.map_or(0.0, |ns| ns * c.runs_per_second / 1e7);
    for (condition, program) in &programs {
        let runs = results.values(*condition, |b| b.costs.get(program).map(|c| c.runs_per_second));
        let cpu = results.values(*condition, |b| b.costs.get(program).map(share));
        let label = if *condition == Condition::Wgtrace { format!("wgtrace {program}") } else { program.clone() };
        let label = if program == BASELINE { format!("{label} (baseline)") } else { label };
        let cost = show(&results.cost(*condition, program), 1.0, 0);
        let _ = writeln!(w, "| {label} | {cost} | {} | {} |", show(&runs, 1.0, 0), show(&cpu, 1.0, 1));
    }
    let total = results.values(Condition::Wgtrace, |b| Some(b.costs.values().map(share).sum()));
    let _ = writeln!(w, "| all of wgtrace's programs | | | {} |", show(&total, 1.0, 1));
    let _ = writeln!(
        w,
        "\nThe baseline is a classic tracepoint: its `run_time_ns` covers only its BPF program, not the trace \
         record the kernel builds before running it (wgtrace's tp_btf programs have none), so its full cost \
         shows in its throughput ratios rather than here."
    );

    let _ = writeln!(w, "\n## Time to the first verdict\n");
    let verdicts: Vec<String> = results
        .of(Condition::Wgtrace)
        .filter_map(|b| b.first_verdict_ms)
        .map(|v| v.map_or("none within 10 s".into(), |ms| format!("{ms} ms")))
        .collect();
    let _ = writeln!(
        w,
        "`wgtrace run -v` started with ping (every 10 ms) already flowing over wg1; the `first verdict after N ms` \
         line it logs, per round: {}.",
        verdicts.join(", ")
    );

    let _ = writeln!(w, "\n## Scaling with tunnels\n");
    let _ = writeln!(
        w,
        "Extra wireguard-go tunnels (one peer each, idle) in the lab client namespace, on top of the lab's 4 \
         (wg0 and wg1 at both ends). wgtrace started fresh for each count; measured over {} s of iperf3 TCP \
         over wg1, one run per count.\n",
        plan.seconds
    );
    let _ = writeln!(
        w,
        "| Extra tunnels | Tunnels in the report | Userspace CPU, % of one core | Peak RSS, MB | {} |",
        WGTRACE_PROGRAMS.iter().map(|p| format!("{p} ns/run")).collect::<Vec<_>>().join(" | ")
    );
    let _ = writeln!(w, "|---|---|---|---|{}", "---|".repeat(WGTRACE_PROGRAMS.len()));
    for t in &results.tunnels {
        let costs: Vec<String> = WGTRACE_PROGRAMS
            .iter()
            .map(|p| t.costs.get(*p).and_then(|c| c.ns_per_run).map_or("–".into(), |ns| format!("{ns:.0}")))
            .collect();
        let _ = writeln!(
            w,
            "| {} | {} | {:.2} | {:.1} | {} |",
            t.extra,
            t.tunnels_reported,
            t.cpu_percent,
            mb(t.rss_peak_kb),
            costs.join(" | ")
        );
    }
    if plan.smoke {
        let _ = writeln!(w, "\nSmoke run: 0, 1 and 10 extra tunnels only.");
    }

    let _ = writeln!(w, "\n## Scaling with flows\n");
    let _ = writeln!(
        w,
        "Distinct UDP flows: one WireGuard-shaped datagram (a 48-byte type-4 data message) from each of N source \
         ports, sent from the lab client over wg1 to {}:{FLOW_PORT} at {FLOWS_PER_SECOND}/s. Each is a new \
         entry in wgtrace's flow and route maps (bounded LRU maps) and a new-flow event. Ordinary UDP payloads are \
         not WireGuard messages and never enter the maps. wgtrace started fresh for each N; RSS read before \
         sending and 2 s after, map entries counted with `bpftool map dump`, memlock summed over wgtrace's maps \
         from `bpftool map show`.\n",
        lab::WG1_REMOTE
    );
    let _ = writeln!(
        w,
        "| Flows | Sent | Entries in FLOWS / ROUTES | RSS before, MB | RSS after, MB | Peak RSS, MB | BPF map memlock, MB \
         | Events lost |"
    );
    let _ = writeln!(w, "|---|---|---|---|---|---|---|---|");
    for f in &results.flows {
        let _ = writeln!(
            w,
            "| {} | {} in {:.1} s | {} / {} | {:.1} | {:.1} | {:.1} | {:.2} | {} |",
            f.requested,
            f.sent,
            f.send_seconds,
            f.flow_entries.map_or("–".into(), |(n, max)| format!("{n} of {max}")),
            f.route_entries.map_or("–".into(), |(n, max)| format!("{n} of {max}")),
            mb(f.rss_before_kb),
            mb(f.rss_after_kb),
            mb(f.rss_peak_kb),
            f.memlock_bytes as f64 / 1e6,
            f.events_lost
        );
    }

    let _ = writeln!(w, "\n## Every round\n");
    let _ = writeln!(
        w,
        "| Round | Condition | wg0 Mbit/s | wg1 broken Mbit/s | wg1 fixed Mbit/s | Small packets/s | CPU % | Peak RSS, MB \
         | Events lost | Traced | First verdict |"
    );
    let _ = writeln!(w, "|---|---|---|---|---|---|---|---|---|---|---|");
    for (round, condition, b) in &results.blocks {
        let opt = |v: Option<f64>, decimals: usize| v.map_or("–".into(), |v| format!("{v:.decimals$}"));
        let verdict = match b.first_verdict_ms {
            None => "–".to_owned(),
            Some(None) => "none in 10 s".to_owned(),
            Some(Some(ms)) => format!("{ms} ms"),
        };
        let _ = writeln!(
            w,
            "| {round} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} | {} | {} | {verdict} |",
            condition.label(),
            b.tcp_mbps[0],
            b.tcp_mbps[1],
            b.tcp_mbps[2],
            b.udp_pps,
            opt(b.cpu_percent, 2),
            opt(b.rss_peak_kb.map(mb), 1),
            opt(b.events_lost.map(|n| n as f64), 0),
            b.traced_fraction.map_or("–".into(), |f| format!("{:.0}%", f * 100.0)),
        );
    }

    let _ = writeln!(w, "\n## Method\n");
    let _ = writeln!(
        w,
        "* wgtrace runs with its defaults: above `--max-traced-rate` (40000 program runs/s) it traces in \
         windows, its programs detached between them (see docs/performance.md); the Traced column of the last \
         table is the share of the maximum-rate run with programs attached. It traces continuously for 3 s after \
         start and after each topology change, so each measurement under wgtrace starts {:.1} s after wgtrace \
         does, and wg1 is fixed (for wg1 fixed) before any tracer starts: the numbers are the steady state.",
        SETTLE.as_secs_f64()
    );
    let _ = writeln!(
        w,
        "* The lab (`cargo xtask lab up --delay-ms 0`): wireguard-go tunnels in network namespaces \
         `wgtlab-client`, `wgtlab-router`, `wgtlab-server`, no delay line. iperf3 servers run at wg0's far end \
         ({}, in `wgtlab-server`) and wg1's ({}, in `wgtlab-router`); clients run in `wgtlab-client`.",
        lab::WG0_REMOTE,
        lab::WG1_REMOTE
    );
    let _ = writeln!(
        w,
        "* Each round runs every load (TCP over wg0, wg1 broken, wg1 fixed; small UDP) untraced, under \
         `wgtrace run --json -v` and under the baseline `bpftrace -e '{BASELINE_SCRIPT}'` (root namespace; it sees \
         every namespace) back to back, each round starting with the next condition, so the runs a ratio \
         compares are seconds apart. The tracer is started afresh for each run and stopped after it (wgtrace with \
         SIGTERM, for its report). Then each tracer runs once more for the time to its first verdict and the \
         cost window."
    );
    let _ = writeln!(
        w,
        "* Userspace CPU: utime+stime from /proc/PID/stat over the maximum-rate run, per second of wall time. \
         Peak RSS: VmHWM from /proc/PID/status right after it."
    );
    let _ = writeln!(
        w,
        "* The lab is held under /run/wgtrace-lab.lock for the whole run, so integration tests wait; the machine \
         may still be shared with other work, which the load averages above hint at."
    );
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries() {
        let s = summarize(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(summarize(&[1.0, 2.0, 4.0, 5.0]).unwrap().median, 3.0);
        assert_eq!(show(&[0.981, 0.99, 1.0], 100.0, 1), "99.0 (98.1–100.0)");
        assert_eq!(show(&[12.0], 1.0, 0), "12");
        assert_eq!(show(&[], 1.0, 0), "–");
    }

    #[test]
    fn the_flow_datagram_is_a_wireguard_data_message() {
        let message = wireguard_shaped_datagram();
        assert_eq!(&message[..4], &[4, 0, 0, 0]);
        assert!(message.len() >= 32 && message.len().is_multiple_of(16));
    }

    #[test]
    fn own_cpu_ticks_and_status() {
        let pid = std::process::id();
        assert!(cpu_ticks(pid).is_ok());
        assert!(status_kb(pid, "VmHWM").unwrap() > 0);
        assert!(status_kb(pid, "NoSuchKey").is_err());
    }
}
