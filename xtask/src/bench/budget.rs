//! The budget: each line's target, what wgtrace measured, and what the
//! floor (empty programs on the same hooks, same rounds) measured on the
//! same line, so a missed line says whether any program on those hooks
//! could meet it on this machine.

#[allow(unused_imports)]
use super::*;

pub(super) struct BudgetLine {
    pub(super) what: String,
    pub(super) target: String,
    pub(super) measured: String,
    pub(super) met: Option<bool>,
    /// The floor's value on the same line ("–" where it has none).
    pub(super) floor: String,
    /// Whether the floor itself meets the target.
    pub(super) floor_met: Option<bool>,
}

impl BudgetLine {
    fn new(what: String, target: String, measured: String, met: Option<bool>) -> Self {
        Self { what, target, measured, met, floor: "–".into(), floor_met: None }
    }

    fn with_floor(self, floor: String, floor_met: Option<bool>) -> Self {
        Self { floor, floor_met, ..self }
    }

    /// The verdict column.
    pub(super) fn verdict(&self, smoke: bool) -> &'static str {
        match (smoke, self.met, self.floor_met) {
            (true, _, _) => "not checked (smoke)",
            (false, Some(true), _) => "met",
            (false, Some(false), Some(false)) => "**MISSED**; empty programs miss it too",
            (false, Some(false), _) => "**MISSED**",
            (false, None, _) => "not measured",
        }
    }
}

fn median(values: &[f64]) -> Option<f64> {
    summarize(values).map(|s| s.median)
}

fn worst(values: &[f64]) -> Option<f64> {
    summarize(values).map(|s| s.max)
}

/// A traced/untraced ratio line, with the floor's ratio beside it.
fn ratio_line(results: &Results, what: String, minimum: f64, value: impl Fn(&Block) -> f64) -> BudgetLine {
    let ratios = results.ratios(Condition::Wgtrace, &value);
    let floor = results.ratios(Condition::Floor, &value);
    BudgetLine::new(
        what,
        format!("≥ {:.0}%", minimum * 100.0),
        format!("{}%", show(&ratios, 100.0, 1)),
        median(&ratios).map(|m| m >= minimum),
    )
    .with_floor(format!("{}%", show(&floor, 100.0, 1)), median(&floor).map(|m| m >= minimum))
}

/// Share of one core (in %) a program took: ns per run × runs per second.
pub(super) fn cpu_share(cost: &Cost) -> f64 {
    cost.ns_per_run.map_or(0.0, |ns| ns * cost.runs_per_second / 1e7)
}

/// Share of one core that a block's programs took in its cost window.
pub(super) fn bpf_cpu_percent(block: &Block) -> Option<f64> {
    (!block.costs.is_empty()).then(|| block.costs.values().map(cpu_share).sum())
}

pub(super) fn budget(results: &Results) -> Vec<BudgetLine> {
    let mut lines = Vec::new();
    for (i, (label, _)) in TCP_TESTS.iter().enumerate() {
        let what = format!("TCP throughput over {label}, traced / untraced");
        lines.push(ratio_line(results, what, MIN_THROUGHPUT_RATIO, |b| b.tcp_mbps[i]));
    }
    let what = "Small-packet rate over wg1, traced / untraced".to_owned();
    lines.push(ratio_line(results, what, MIN_SMALL_PACKET_RATIO, |b| b.udp_pps));
    let lost = results.values(Condition::Wgtrace, |b| b.events_lost.map(|n| n as f64));
    lines.push(BudgetLine::new(
        "Events lost at the lab's maximum rate (worst round)".into(),
        "0".into(),
        worst(&lost).map_or("–".into(), |m| format!("{m:.0}")),
        worst(&lost).map(|m| m == 0.0),
    ));
    let cpu = results.values(Condition::Wgtrace, |b| b.cpu_percent);
    lines.push(BudgetLine::new(
        "wgtrace userspace CPU at the maximum rate".into(),
        format!("≤ {MAX_CPU_PERCENT:.0}% of one core"),
        format!("{}%", show(&cpu, 1.0, 2)),
        median(&cpu).map(|m| m <= MAX_CPU_PERCENT),
    ));
    let rss = results.values(Condition::Wgtrace, |b| b.rss_peak_kb.map(mb));
    lines.push(BudgetLine::new(
        "wgtrace peak RSS (VmHWM, worst round)".into(),
        format!("≤ {:.0} MB", MAX_RSS_BYTES / 1e6),
        worst(&rss).map_or("–".into(), |m| format!("{m:.1} MB")),
        worst(&rss).map(|m| m * 1e6 <= MAX_RSS_BYTES),
    ));
    let verdicts: Vec<Option<u64>> = results.of(Condition::Wgtrace).filter_map(|b| b.first_verdict_ms).collect();
    let seen: Vec<f64> = verdicts.iter().flatten().map(|ms| *ms as f64).collect();
    let missing = verdicts.len() - seen.len();
    lines.push(BudgetLine::new(
        "Time from start to the first verdict (traffic flowing over wg1)".into(),
        format!("≤ {MAX_FIRST_VERDICT_MS:.0} ms"),
        format!(
            "{} ms{}",
            show(&seen, 1.0, 0),
            if missing > 0 { format!(", none within 10 s in {missing} round(s)") } else { String::new() }
        ),
        (!verdicts.is_empty()).then(|| missing == 0 && median(&seen).is_some_and(|m| m <= MAX_FIRST_VERDICT_MS)),
    ));
    let baseline = results.cost(Condition::Bpftrace, BASELINE);
    for program in PER_PACKET {
        let ours = results.cost(Condition::Wgtrace, program);
        let floor = results.cost(Condition::Floor, &floor::label(program));
        lines.push(
            BudgetLine::new(
                format!("wgtrace {program}, ns per run, vs the baseline's program"),
                format!("≤ baseline ({} ns)", show(&baseline, 1.0, 0)),
                format!("{} ns", show(&ours, 1.0, 0)),
                median(&ours).zip(median(&baseline)).map(|(o, b)| o <= b),
            )
            .with_floor(
                format!("{} ns", show(&floor, 1.0, 0)),
                median(&floor).zip(median(&baseline)).map(|(f, b)| f <= b),
            ),
        );
    }
    for (i, (label, _)) in GSO_TCP_TESTS.iter().enumerate() {
        let what = format!("TCP throughput over {label}, trixie wireguard-go (GSO), traced / untraced");
        lines.push(ratio_line(results, what, MIN_GSO_THROUGHPUT_RATIO, |b| b.gso_tcp_mbps[i]));
    }
    let bpf_cpu = results.values(Condition::Wgtrace, bpf_cpu_percent);
    let floor_cpu = results.values(Condition::Floor, bpf_cpu_percent);
    lines.push(
        BudgetLine::new(
            "wgtrace's BPF programs together, TCP then small UDP over wg1 at the maximum rate".into(),
            format!("≤ {MAX_BPF_CPU_PERCENT:.0}% of one core"),
            format!("{}%", show(&bpf_cpu, 1.0, 2)),
            median(&bpf_cpu).map(|m| m <= MAX_BPF_CPU_PERCENT),
        )
        .with_floor(format!("{}%", show(&floor_cpu, 1.0, 2)), median(&floor_cpu).map(|m| m <= MAX_BPF_CPU_PERCENT)),
    );
    for program in WGTRACE_PROGRAMS {
        let non_tunnel = |condition, label: &str| {
            results.values(condition, |b| b.non_tunnel_costs.get(label).and_then(|c| c.ns_per_run))
        };
        let ns = non_tunnel(Condition::Wgtrace, program);
        if ns.is_empty() && !PER_PACKET.contains(&program) {
            continue; // a FIB hook that TCP over a cached route never runs
        }
        let floor = non_tunnel(Condition::Floor, &floor::label(program));
        lines.push(
            BudgetLine::new(
                format!("wgtrace {program}, ns per run on TCP outside any tunnel"),
                format!("≤ {MAX_NON_TUNNEL_NS:.0} ns"),
                format!("{} ns", show(&ns, 1.0, 0)),
                median(&ns).map(|m| m <= MAX_NON_TUNNEL_NS),
            )
            .with_floor(format!("{} ns", show(&floor, 1.0, 0)), median(&floor).map(|m| m <= MAX_NON_TUNNEL_NS)),
        );
    }
    let traced = results.values(Condition::Wgtrace, |b| b.traced_fraction);
    lines.push(BudgetLine::new(
        "`traced_fraction` at the maximum rate (lowest round)".into(),
        "1".into(),
        summarize(&traced).map_or("–".into(), |s| format!("{}", s.min)),
        summarize(&traced).map(|s| s.min == 1.0),
    ));
    if let Some(flood) = results.flows.iter().find(|f| f.handshake_pairs > 0) {
        let growth = flood.rss_peak_during_kb().saturating_sub(flood.rss_before_kb);
        lines.push(BudgetLine::new(
            format!(
                "RSS growth under the flood ({} handshake-shaped pairs, {} data-shaped flows)",
                flood.handshake_pairs, flood.sent
            ),
            format!("≤ {} MB", MAX_FLOOD_RSS_GROWTH_KB / 1024),
            format!("{:.1} MB", mb(growth)),
            Some(growth <= MAX_FLOOD_RSS_GROWTH_KB),
        ));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(met: Option<bool>, floor_met: Option<bool>) -> BudgetLine {
        BudgetLine::new(String::new(), String::new(), String::new(), met).with_floor(String::new(), floor_met)
    }

    #[test]
    fn a_miss_says_when_empty_programs_miss_too() {
        assert_eq!(line(Some(false), Some(false)).verdict(false), "**MISSED**; empty programs miss it too");
        assert_eq!(line(Some(false), Some(true)).verdict(false), "**MISSED**");
        assert_eq!(line(Some(false), None).verdict(false), "**MISSED**");
        assert_eq!(line(Some(true), Some(false)).verdict(false), "met");
        assert_eq!(line(None, None).verdict(false), "not measured");
        assert_eq!(line(Some(false), Some(false)).verdict(true), "not checked (smoke)");
    }
}
