//! `cargo xtask bench`: what tracing costs, on the lab with its delay line
//! off, side by side with a bpftrace baseline, checked against the overhead
//! budget and written to BENCHMARKS.md.
//!
//! One invocation alternates the conditions (untraced, wgtrace, bpftrace,
//! and empty programs on wgtrace's hooks: the floor) load by load, round after round, so each ratio compares measurements
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
//! client namespace, and the flood (1k vs 50k distinct WireGuard-shaped UDP
//! flows, 40 000 handshake-shaped pairs) with RSS before and after; then a
//! second lab with trixie's wireguard-go (UDP GSO) for a second set of TCP
//! loads. By concern: `rounds` (plan and rounds), `scaling`, `tracer`
//! (tracer processes), `floor` (the empty programs), `traffic`, `procfs`
//! (kernel and procfs readings), `session` (the lab lock), `budget` (the
//! budget's lines), `render` (statistics and the report).

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

mod budget;
mod floor;
mod procfs;
mod render;
mod rounds;
mod scaling;
mod session;
mod tracer;
mod traffic;

use budget::*;
pub use floor::serve as serve_empty_hooks;
use procfs::*;
use render::*;
use rounds::*;
use scaling::*;
use session::*;
use tracer::*;
use traffic::*;

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
const MIN_GSO_THROUGHPUT_RATIO: f64 = 0.99;
/// wgtrace's BPF programs together, in the cost window at the lab's maximum rate.
const MAX_BPF_CPU_PERCENT: f64 = 2.0;
/// Each program on traffic that is not tunnel transport.
const MAX_NON_TUNNEL_NS: f64 = 40.0;
/// RSS growth under the flood (handshake-shaped pairs, data-shaped flows).
const MAX_FLOOD_RSS_GROWTH_KB: u64 = 5 * 1024;
/// Handshake-shaped pairs in the flood.
const HANDSHAKE_PAIRS: usize = 40_000;
/// The router's address on the client's link: iperf3 to it is ordinary
/// traffic between two lab namespaces, outside any tunnel.
const NON_TUNNEL_REMOTE: &str = "192.0.2.1";
/// wgtrace traces every packet from its start; this only lets it discover
/// the topology (its first refresh) before a measurement.
const SETTLE: Duration = Duration::from_millis(1500);
/// The loads of the second lab, with trixie's wireguard-go (UDP GSO/GRO),
/// the same three as the first lab's TCP loads (wg1 is fixed for the third).
const GSO_TCP_TESTS: [(&str, &str); 3] = TCP_TESTS;
/// The TCP load (of either lab) that runs with wg1 fixed.
const FIXED_LOAD: usize = 2;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Condition {
    Untraced,
    Wgtrace,
    Bpftrace,
    /// Empty programs on wgtrace's hooks: what any tracer there pays (see `floor`).
    Floor,
}

const CONDITIONS: [Condition; 4] = [Condition::Untraced, Condition::Wgtrace, Condition::Bpftrace, Condition::Floor];

impl Condition {
    fn label(self) -> &'static str {
        match self {
            Condition::Untraced => "untraced",
            Condition::Wgtrace => "wgtrace",
            Condition::Bpftrace => "bpftrace baseline",
            Condition::Floor => "empty programs (floor)",
        }
    }
}

/// The TCP throughput tests: label, far end (wg1 is fixed for `FIXED_LOAD`).
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
    /// TCP over the trixie (GSO) lab, per GSO_TCP_TESTS.
    gso_tcp_mbps: [f64; 3],
    /// Program label → cost under TCP between two lab namespaces, outside any tunnel.
    non_tunnel_costs: BTreeMap<String, Cost>,
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

impl FlowScale {
    /// The larger of the two readings after sending (VmHWM includes the
    /// start-up peak, so it is not used here).
    fn rss_peak_during_kb(&self) -> u64 {
        self.rss_after_kb.max(self.rss_before_kb)
    }
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
    handshake_pairs: usize,
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
    let lab_session = match crate::setup::trixie_wireguard_go() {
        binary if binary.exists() => {
            eprintln!("bench: the second lab, with trixie's wireguard-go (UDP GSO/GRO)");
            lab_session.down()?;
            let session = LabSession::up_with(lab::LabOptions {
                delay_ms: 0,
                wireguard_go: Some(binary),
                ..lab::LabOptions::default()
            })?;
            let servers = IperfServers::start()?;
            tcp(lab::WG0_REMOTE, 1, 0)?;
            tcp(lab::WG1_REMOTE, 1, 0)?;
            for round in 1..=plan.rounds {
                eprintln!("bench: GSO round {round}/{}", plan.rounds);
                measure_gso_round(&plan, round, &wgtrace, &mut blocks).with_context(|| format!("GSO round {round}"))?;
            }
            drop(servers);
            session
        }
        binary => {
            eprintln!("bench: {} is missing (`cargo xtask setup`): no GSO loads", binary.display());
            lab_session
        }
    };
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
