//! One round: every load under every condition back to back, the cost
//! windows, and the second (GSO) lab's loads.

#[allow(unused_imports)]
use super::*;

/// What one throughput measurement runs.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Load {
    Tcp(usize),
    SmallUdp,
}

/// One round: each load under each condition back to back (a tracer started
/// afresh for each, settled), so a ratio compares runs seconds apart; then,
/// per tracer, the time to its first verdict and the in-kernel cost window.
pub(super) fn measure_round(
    plan: &Plan,
    round: u32,
    wgtrace: &Path,
    stats: &BpfStats,
) -> Result<Vec<(Condition, Block)>> {
    // Each round starts with a different condition, so a drift within
    // rounds (the machine's other work) does not always favour one.
    let order: Vec<Condition> =
        (0..CONDITIONS.len()).map(|i| CONDITIONS[(i + round as usize - 1) % CONDITIONS.len()]).collect();
    let mut blocks: BTreeMap<usize, Block> = BTreeMap::new();
    let loads = [Load::Tcp(0), Load::Tcp(1), Load::Tcp(FIXED_LOAD), Load::SmallUdp];
    for load in loads {
        // wg1 fixed: fixed before any tracer starts, so no tracer sees the
        // change (wgtrace would trace it continuously for its first seconds).
        if load == Load::Tcp(FIXED_LOAD) {
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
        if load == Load::Tcp(FIXED_LOAD) {
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

pub(super) fn index_of(condition: Condition) -> usize {
    CONDITIONS.iter().position(|c| *c == condition).expect("a known condition")
}

impl Load {
    pub(super) fn label(self) -> &'static str {
        match self {
            Load::Tcp(i) => TCP_TESTS[i].0,
            Load::SmallUdp => "small UDP packets",
        }
    }
}

/// The GSO lab's loads, each under each condition back to back, in the
/// same rotating order as the first lab's rounds.
pub(super) fn measure_gso_round(
    plan: &Plan,
    round: u32,
    wgtrace: &Path,
    blocks: &mut [(u32, Condition, Block)],
) -> Result<()> {
    let order: Vec<Condition> =
        (0..CONDITIONS.len()).map(|i| CONDITIONS[(i + round as usize - 1) % CONDITIONS.len()]).collect();
    for (i, (label, remote)) in GSO_TCP_TESTS.iter().enumerate() {
        // As in the first lab: fixed before any tracer starts.
        if i == FIXED_LOAD {
            lab::fix()?;
        }
        let measured = (|| -> Result<()> {
            for &condition in &order {
                check_interrupted()?;
                let tracer = start_settled(plan, condition, wgtrace)?;
                let mbps = tcp(remote, plan.seconds, plan.omit)
                    .with_context(|| format!("{label} under {}", condition.label()))?;
                if let Some(tracer) = tracer {
                    tracer.stop()?;
                }
                if let Some((_, _, block)) = blocks.iter_mut().find(|(r, c, _)| *r == round && *c == condition) {
                    block.gso_tcp_mbps[i] = mbps;
                }
                std::thread::sleep(Duration::from_millis(300));
            }
            Ok(())
        })();
        if i == FIXED_LOAD {
            lab::unfix()?;
        }
        measured?;
    }
    Ok(())
}

/// Starts the condition's tracer and waits until wgtrace is in its steady
/// state (past the continuous tracing that follows its start).
pub(super) fn start_settled(plan: &Plan, condition: Condition, wgtrace: &Path) -> Result<Option<Tracer>> {
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

pub(super) fn measure_load(
    plan: &Plan,
    condition: Condition,
    load: Load,
    wgtrace: &Path,
    block: &mut Block,
) -> Result<()> {
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
pub(super) fn measure_costs(
    plan: &Plan,
    condition: Condition,
    wgtrace: &Path,
    stats: &BpfStats,
    block: &mut Block,
) -> Result<()> {
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
    // The same programs on ordinary traffic between two lab namespaces:
    // what every packet that is not a tunnel's pays.
    stats.set(true)?;
    let before = program_counters()?;
    let window = Instant::now();
    let load = tcp(NON_TUNNEL_REMOTE, plan.seconds, plan.omit);
    let after = program_counters();
    let window = window.elapsed();
    stats.set(false)?;
    load?;
    block.non_tunnel_costs = costs(&ids, &before, &after?, window, condition);
    tracer.stop()?;
    Ok(())
}

/// Per-run cost of each of `ids` between two snapshots, labelled by program.
pub(super) fn costs(
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
            Condition::Floor => floor::label(&b.name),
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
