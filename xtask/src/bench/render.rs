//! Statistics over rounds and the Markdown report (the budget's lines: `budget`).

#[allow(unused_imports)]
use super::*;

pub(super) struct Host {
    pub(super) kernel: String,
    pub(super) cpu: String,
    pub(super) cores: usize,
    pub(super) date: String,
    pub(super) revision: String,
    pub(super) tools: String,
    pub(super) load_before: String,
}

impl Host {
    pub(super) fn describe(root: &Path) -> Self {
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

pub(super) fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

pub(super) struct Results<'a> {
    pub(super) plan: &'a Plan,
    pub(super) host: Host,
    pub(super) blocks: Vec<(u32, Condition, Block)>,
    pub(super) tunnels: Vec<TunnelScale>,
    pub(super) flows: Vec<FlowScale>,
    pub(super) load_after: String,
    pub(super) elapsed: Duration,
    pub(super) lock_wait: Duration,
    pub(super) build: Duration,
}

impl Results<'_> {
    pub(super) fn of(&self, condition: Condition) -> impl Iterator<Item = &Block> {
        self.blocks.iter().filter(move |(_, c, _)| *c == condition).map(|(_, _, b)| b)
    }

    /// Per-round ratios of a traced value to the untraced one of the same round.
    pub(super) fn ratios(&self, condition: Condition, value: impl Fn(&Block) -> f64) -> Vec<f64> {
        (1..=self.plan.rounds)
            .filter_map(|round| {
                let find = |c| self.blocks.iter().find(|(r, cc, _)| *r == round && *cc == c).map(|(_, _, b)| b);
                let (traced, untraced) = (find(condition)?, find(Condition::Untraced)?);
                let base = value(untraced);
                (base > 0.0).then(|| value(traced) / base)
            })
            .collect()
    }

    pub(super) fn values(&self, condition: Condition, value: impl Fn(&Block) -> Option<f64>) -> Vec<f64> {
        self.of(condition).filter_map(value).collect()
    }

    pub(super) fn cost(&self, condition: Condition, program: &str) -> Vec<f64> {
        self.values(condition, |b| b.costs.get(program).and_then(|c| c.ns_per_run))
    }
}

#[derive(Clone, Copy)]
pub(super) struct Summary {
    pub(super) median: f64,
    pub(super) min: f64,
    pub(super) max: f64,
}

pub(super) fn summarize(values: &[f64]) -> Option<Summary> {
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
pub(super) fn show(values: &[f64], scale: f64, decimals: usize) -> String {
    match summarize(values) {
        None => "–".into(),
        Some(s) if values.len() == 1 || s.min == s.max => format!("{:.*}", decimals, s.median * scale),
        Some(s) => {
            format!("{:.*} ({:.*}–{:.*})", decimals, s.median * scale, decimals, s.min * scale, decimals, s.max * scale)
        }
    }
}

pub(super) fn minutes(elapsed: Duration) -> String {
    let seconds = elapsed.as_secs();
    if seconds >= 60 { format!("{} min {} s", seconds / 60, seconds % 60) } else { format!("{seconds} s") }
}

pub(super) fn mb(kb: u64) -> f64 {
    kb as f64 * 1024.0 / 1e6
}

pub(super) fn render(results: &Results) -> String {
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
        "| Rounds | {} (each load untraced, under wgtrace, under the bpftrace baseline and under empty programs on \
         wgtrace's hooks, back to back){} |",
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
    let _ =
        writeln!(w, "| Line | Target | Measured | Empty programs on the same hooks (floor) | |\n|---|---|---|---|---|");
    let lines = budget(results);
    for line in &lines {
        let verdict = line.verdict(plan.smoke);
        let _ = writeln!(w, "| {} | {} | {} | {} | {verdict} |", line.what, line.target, line.measured, line.floor);
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
         peak RSS on the worst round; program costs on the medians of the same benchmark run. The floor column \
         is the same line measured with a program that does nothing (`r0 = 0; exit`) on each of wgtrace's \
         hooks, in the same rounds: the kernel's dispatch of a tracepoint program (and, for ns per run and BPF \
         CPU, bpf_stats' own clock read), which any tracer on those hooks pays; lines the floor does not apply to \
         show –. \"empty programs miss it too\" marks a line that a program doing nothing missed as well, in \
         these rounds.\n"
    );

    let _ = writeln!(w, "## Throughput\n");
    let _ = writeln!(
        w,
        "iperf3 TCP from the lab client to the tunnel's far end (Mbit/s, as received). wg1 broken is the lab as \
         built: wg1's transport rides inside wg0, so each packet is encrypted twice; fixed is after `wg set wg1 \
         fwmark 51820`.\n"
    );
    let _ = writeln!(
        w,
        "| Tunnel | Untraced | wgtrace | bpftrace | empty programs | wgtrace / untraced | bpftrace / untraced \
         | empty / untraced |"
    );
    let _ = writeln!(w, "|---|---|---|---|---|---|---|---|");
    for (i, (label, _)) in TCP_TESTS.iter().enumerate() {
        let value = |c| results.values(c, |b: &Block| Some(b.tcp_mbps[i]));
        let _ = writeln!(
            w,
            "| {label} | {} | {} | {} | {} | {}% | {}% | {}% |",
            show(&value(Condition::Untraced), 1.0, 0),
            show(&value(Condition::Wgtrace), 1.0, 0),
            show(&value(Condition::Bpftrace), 1.0, 0),
            show(&value(Condition::Floor), 1.0, 0),
            show(&results.ratios(Condition::Wgtrace, |b| b.tcp_mbps[i]), 100.0, 1),
            show(&results.ratios(Condition::Bpftrace, |b| b.tcp_mbps[i]), 100.0, 1),
            show(&results.ratios(Condition::Floor, |b| b.tcp_mbps[i]), 100.0, 1),
        );
    }
    let _ = writeln!(
        w,
        "\nThe same with Debian trixie's wireguard-go 0.0.20231211 (UDP GSO/GRO and TUN offloads: one skb \
         carries many wire packets), a second lab brought up after the first, the same three loads:\n"
    );
    let _ = writeln!(
        w,
        "| Tunnel (trixie wireguard-go) | Untraced | wgtrace | bpftrace | empty programs | wgtrace / untraced \
         | bpftrace / untraced | empty / untraced |"
    );
    let _ = writeln!(w, "|---|---|---|---|---|---|---|---|");
    for (i, (label, _)) in GSO_TCP_TESTS.iter().enumerate() {
        let value = |c| results.values(c, |b: &Block| (b.gso_tcp_mbps[i] > 0.0).then_some(b.gso_tcp_mbps[i]));
        let _ = writeln!(
            w,
            "| {label} | {} | {} | {} | {} | {}% | {}% | {}% |",
            show(&value(Condition::Untraced), 1.0, 0),
            show(&value(Condition::Wgtrace), 1.0, 0),
            show(&value(Condition::Bpftrace), 1.0, 0),
            show(&value(Condition::Floor), 1.0, 0),
            show(&results.ratios(Condition::Wgtrace, |b| b.gso_tcp_mbps[i]), 100.0, 1),
            show(&results.ratios(Condition::Bpftrace, |b| b.gso_tcp_mbps[i]), 100.0, 1),
            show(&results.ratios(Condition::Floor, |b| b.gso_tcp_mbps[i]), 100.0, 1),
        );
    }
    let _ = writeln!(w, "\n## Small packets at the maximum rate\n");
    let _ = writeln!(
        w,
        "iperf3 UDP, {SMALL_PAYLOAD}-byte payloads, unlimited rate (`-u -b 0 -l {SMALL_PAYLOAD}`), over wg1 as \
         built (nested in wg0); packets per second received at wg1's far end.\n"
    );
    let _ = writeln!(w, "| | Untraced | wgtrace | bpftrace | empty programs |\n|---|---|---|---|---|");
    let pps = |c| results.values(c, |b: &Block| Some(b.udp_pps));
    let _ = writeln!(
        w,
        "| Packets/s received | {} | {} | {} | {} |",
        show(&pps(Condition::Untraced), 1.0, 0),
        show(&pps(Condition::Wgtrace), 1.0, 0),
        show(&pps(Condition::Bpftrace), 1.0, 0),
        show(&pps(Condition::Floor), 1.0, 0)
    );
    let _ = writeln!(
        w,
        "| Ratio to untraced | | {}% | {}% | {}% |",
        show(&results.ratios(Condition::Wgtrace, |b| b.udp_pps), 100.0, 1),
        show(&results.ratios(Condition::Bpftrace, |b| b.udp_pps), 100.0, 1),
        show(&results.ratios(Condition::Floor, |b| b.udp_pps), 100.0, 1)
    );
    let tracer_values = |c, f: &dyn Fn(&Block) -> Option<f64>| results.values(c, f);
    let _ = writeln!(
        w,
        "| Tracer userspace CPU, % of one core (utime+stime / wall) | | {} | {} | – |",
        show(&tracer_values(Condition::Wgtrace, &|b| b.cpu_percent), 1.0, 2),
        show(&tracer_values(Condition::Bpftrace, &|b| b.cpu_percent), 1.0, 2)
    );
    let _ = writeln!(
        w,
        "| Tracer peak RSS, MB (VmHWM) | | {} | {} | – |",
        show(&tracer_values(Condition::Wgtrace, &|b| b.rss_peak_kb.map(mb)), 1.0, 1),
        show(&tracer_values(Condition::Bpftrace, &|b| b.rss_peak_kb.map(mb)), 1.0, 1)
    );
    let _ = writeln!(
        w,
        "| Events lost (wgtrace `--json` `events_lost`, the maximum-rate run) | | {} | n/a | n/a |",
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
    // Each of wgtrace's programs, followed by the empty program on its hook.
    let mut programs: Vec<(Condition, String)> = WGTRACE_PROGRAMS
        .iter()
        .flat_map(|p| [(Condition::Wgtrace, p.to_string()), (Condition::Floor, floor::label(p))])
        .collect();
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
    for (condition, program) in &programs {
        let runs = results.values(*condition, |b| b.costs.get(program).map(|c| c.runs_per_second));
        let cpu = results.values(*condition, |b| b.costs.get(program).map(cpu_share));
        let label = if *condition == Condition::Wgtrace { format!("wgtrace {program}") } else { program.clone() };
        let label = if program == BASELINE { format!("{label} (baseline)") } else { label };
        let cost = show(&results.cost(*condition, program), 1.0, 0);
        let _ = writeln!(w, "| {label} | {cost} | {} | {} |", show(&runs, 1.0, 0), show(&cpu, 1.0, 1));
    }
    let total = results.values(Condition::Wgtrace, bpf_cpu_percent);
    let _ = writeln!(w, "| all of wgtrace's programs | | | {} |", show(&total, 1.0, 1));
    let floor_total = results.values(Condition::Floor, bpf_cpu_percent);
    let _ = writeln!(w, "| all four empty programs (the floor) | | | {} |", show(&floor_total, 1.0, 1));
    let _ = writeln!(
        w,
        "\nThe same programs on TCP between two lab namespaces outside any tunnel (iperf3 from the client to \
         {NON_TUNNEL_REMOTE}, the router, over the plain veth; {} s): what every packet that is not a tunnel's \
         pays. bpf_stats' own clock reads are part of each run's time.\n",
        plan.seconds
    );
    let _ = writeln!(w, "| Program | ns per run | runs per second |\n|---|---|---|");
    for (condition, program) in
        programs.iter().filter(|(c, p)| *c != Condition::Wgtrace || WGTRACE_PROGRAMS.contains(&p.as_str()))
    {
        let ns = results.values(*condition, |b| b.non_tunnel_costs.get(program).and_then(|c| c.ns_per_run));
        let runs = results.values(*condition, |b| b.non_tunnel_costs.get(program).map(|c| c.runs_per_second));
        let label = if *condition == Condition::Wgtrace { format!("wgtrace {program}") } else { program.clone() };
        let _ = writeln!(w, "| {label} | {} | {} |", show(&ns, 1.0, 0), show(&runs, 1.0, 0));
    }
    let _ = writeln!(
        w,
        "\nThe baseline is a classic tracepoint: its `run_time_ns` covers only its BPF program, not the trace \
         record the kernel builds before running it (wgtrace's tp_btf programs have none), so its full cost \
         shows in its throughput ratios rather than here. The empty programs are raw tracepoint programs of two \
         instructions (`r0 = 0; exit`) on wgtrace's four hooks: the same `bpf_trace_runN` dispatch as wgtrace's \
         tp_btf programs, so their ns per run is what a run costs before any of wgtrace's work (mostly \
         bpf_stats' clock read; the dispatch around it is not in `run_time_ns`, see docs/performance.md)."
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
        "The flood: one WireGuard-shaped datagram (a 48-byte type-4 data message) from each of N source \
         ports, sent from the lab client over wg1 to {}:{FLOW_PORT} at {FLOWS_PER_SECOND}/s, and for the largest \
         N also {HANDSHAKE_PAIRS} handshake-shaped pairs (initiation, then the response naming its index) between \
         plain sockets on fresh loopback ports. None of it is a known tunnel's socket talking to its peer, so none \
         of it may create an entry or an event: wgtrace keys its maps by (peer, path), never by addresses a \
         sender picks. wgtrace started fresh for each N; RSS read before sending and 2 s after, map entries \
         counted with `bpftool map dump`, memlock summed over wgtrace's maps from `bpftool map show`.\n",
        lab::WG1_REMOTE
    );
    let _ = writeln!(
        w,
        "| Flows | Sent | Handshake-shaped pairs | Entries in PATHS / ROUTES | RSS before, MB | RSS after, MB | Peak RSS, MB \
         | BPF map memlock, MB | Events lost |"
    );
    let _ = writeln!(w, "|---|---|---|---|---|---|---|---|---|");
    for f in &results.flows {
        let _ = writeln!(
            w,
            "| {} | {} in {:.1} s | {} | {} / {} | {:.1} | {:.1} | {:.1} | {:.2} | {} |",
            f.requested,
            f.sent,
            f.send_seconds,
            f.handshake_pairs,
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
        "| Round | Condition | wg0 Mbit/s | wg1 broken Mbit/s | wg1 fixed Mbit/s | GSO wg0 Mbit/s | GSO wg1 broken Mbit/s \
         | GSO wg1 fixed Mbit/s | Small packets/s | CPU % | Peak RSS, MB | Events lost | Traced | First verdict |"
    );
    let _ = writeln!(w, "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (round, condition, b) in &results.blocks {
        let opt = |v: Option<f64>, decimals: usize| v.map_or("–".into(), |v| format!("{v:.decimals$}"));
        let verdict = match b.first_verdict_ms {
            None => "–".to_owned(),
            Some(None) => "none in 10 s".to_owned(),
            Some(Some(ms)) => format!("{ms} ms"),
        };
        let _ = writeln!(
            w,
            "| {round} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} | {} | {} | {verdict} |",
            condition.label(),
            b.tcp_mbps[0],
            b.tcp_mbps[1],
            b.tcp_mbps[2],
            b.gso_tcp_mbps[0],
            b.gso_tcp_mbps[1],
            b.gso_tcp_mbps[2],
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
        "* wgtrace runs with its defaults: every packet traced, continuously (`traced_fraction` 1, the Traced \
         column). Each measurement under wgtrace starts {:.1} s after wgtrace does (its first topology \
         refresh), and wg1 is fixed (for wg1 fixed) before any tracer starts.",
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
         cost window. The fourth condition, empty programs, is `cargo xtask empty-hooks` holding a \
         `r0 = 0; exit` raw tracepoint program on each of wgtrace's four hooks: the floor any tracer there pays."
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
