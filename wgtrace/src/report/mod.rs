//! Rendering: the live view, the final human report, and the JSON document.

pub mod join;

use std::fmt::Write as _;

pub use join::{join_latency, probe_nested};

use serde::Serialize;

use crate::{
    correlation::{PeerReport, Severity, TunnelReport, Verdict},
    latency::{NestingCost, PeerLatency, Summary},
    probes::HookStatus,
    topology::netlink::table_name,
};

/// The final report; its JSON form is a documented contract (docs/json.md).
#[derive(Debug, Serialize)]
pub struct Report {
    pub tunnels: Vec<TunnelReport>,
    pub events_lost: u64,
    /// WireGuard-shaped packets written by raw or packet sockets (which can
    /// claim a tunnel's port), ignored rather than attributed.
    pub forged_packets: u64,
    /// Routing-table lookups of UDP flows per (mark, table).
    pub route_lookups: Vec<RouteLookups>,
    pub duration_seconds: f64,
    /// Share of the run with the programs attached: always 1 now that every
    /// packet is traced (kept for consumers of versions that traced in
    /// windows).
    pub traced_fraction: f64,
}

#[derive(Debug, Serialize)]
pub struct RouteLookups {
    pub mark: u32,
    pub table: u32,
    pub lookups: u64,
}

pub fn render(report: &Report, hooks: &[HookStatus]) -> String {
    let mut out = String::new();
    let inactive: Vec<_> = hooks.iter().filter(|h| !h.active).collect();
    for hook in inactive {
        let _ = writeln!(out, "note: hook {} inactive: {}", hook.name, hook.detail);
    }
    if report.tunnels.is_empty() {
        out.push_str("No WireGuard tunnels found in any network namespace.\n");
    }
    let mut last_netns = None;
    for tunnel in &report.tunnels {
        if last_netns != Some(&tunnel.netns) {
            let _ = writeln!(out, "netns {}", tunnel.netns);
            last_netns = Some(&tunnel.netns);
        }
        let config = match (tunnel.listen_port, tunnel.fwmark) {
            (Some(port), Some(mark)) => {
                format!("port {port}, fwmark {}", if mark == 0 { "off".into() } else { format!("{mark} ({mark:#x})") })
            }
            _ => "configuration unreadable".into(),
        };
        // A speaker without a UAPI is named by its device and its process.
        let found_by = match (&tunnel.discovered_by, &tunnel.process) {
            (crate::topology::DiscoveredBy::Packets, Some(p)) => {
                format!(", held by {} (PID {}), no UAPI: found from its packets", p.comm, p.pid)
            }
            _ => String::new(),
        };
        let manager = tunnel.manager.map(|m| format!(", {}", m.as_str())).unwrap_or_default();
        let _ =
            writeln!(out, "  {} ({}, {config}{manager}{found_by})", tunnel.interface, tunnel.implementation.as_str());
        for peer in &tunnel.peers {
            let endpoint = peer.endpoint.map(crate::redact::endpoint).unwrap_or_else(|| "no endpoint".into());
            let key: String = crate::redact::key(&peer.public_key).chars().take(17).collect();
            match &peer.name {
                Some(name) => {
                    let _ = write!(out, "    peer {} ({key}…) → {endpoint}: ", crate::names::shown(name));
                }
                None => {
                    let _ = write!(out, "    peer {key}… → {endpoint}: ");
                }
            }
            match &peer.transport {
                None => out.push_str("no transport packets seen yet\n"),
                Some(t) => {
                    let table = t.route_table.map(table_name).unwrap_or_else(|| "?".into());
                    let _ = writeln!(
                        out,
                        "leaves via {} (mark {:#x}, table {table}), {} packets",
                        t.egress_interface,
                        t.mark,
                        t.packets.unwrap_or(0)
                    );
                    if let Some(rule) = &t.rule {
                        let _ = writeln!(out, "      rule: {rule}");
                    }
                    if let Some(fragmented) = t.fragmented_packets.filter(|f| *f > 0) {
                        let _ = writeln!(
                            out,
                            "      {fragmented} of them fragmented: the path's MTU is smaller than {}'s packets",
                            tunnel.interface
                        );
                    }
                }
            }
            render_verdict(&mut out, &tunnel.interface, peer, report.duration_seconds);
            render_diagnosis(&mut out, peer, "      ");
            if let Some(handshake) = &peer.handshake {
                render_handshake(&mut out, handshake);
            }
            if let Some(latency) = &peer.latency {
                render_latency(&mut out, latency);
            }
            if let Some(cost) = &peer.nesting_cost {
                render_nesting_cost(&mut out, &tunnel.interface, cost);
            }
        }
        render_findings(&mut out, tunnel, "  ", false, &[Severity::Warning, Severity::Error]);
    }
    if !report.route_lookups.is_empty() {
        out.push_str("UDP routing lookups (mark, table): ");
        let parts: Vec<String> = report
            .route_lookups
            .iter()
            .map(|r| format!("{:#x}/{}={}", r.mark, table_name(r.table), r.lookups))
            .collect();
        out.push_str(&parts.join(", "));
        out.push('\n');
    }
    let _ = writeln!(out, "events lost: {}", report.events_lost);
    if report.forged_packets > 0 {
        let _ = writeln!(
            out,
            "ignored {} WireGuard-shaped packets sent from raw or packet sockets (not any tunnel's)",
            report.forged_packets
        );
    }
    out
}

/// The verdict line of `run`: direct, nested with its chain, or a loop
/// with the packet rate that proves it.
fn render_verdict(out: &mut String, interface: &str, peer: &PeerReport, duration_seconds: f64) {
    match peer.verdict {
        Verdict::Nested => {
            let mut chain = vec![interface.to_owned()];
            chain.extend(peer.chain.iter().cloned());
            let kind = peer
                .outer
                .as_ref()
                .filter(|o| o.kind != crate::correlation::OuterKind::Wireguard)
                .map(|o| {
                    let owner = o.owner.as_deref().map(|w| format!(", held by {w}")).unwrap_or_default();
                    format!(" [{} is a {} device{owner}]", o.interface, o.kind.as_str())
                })
                .unwrap_or_default();
            let nesting = peer.nesting.map(|n| n.as_str()).unwrap_or("?");
            let _ = writeln!(out, "      NESTED ({nesting}): {}{kind}", chain.join(" inside "));
        }
        Verdict::Loop => {
            let members = peer.loop_members.clone().unwrap_or_default();
            let mut cycle = members.clone();
            cycle.extend(members.first().cloned());
            let rate = match peer.transport.as_ref().and_then(|t| t.packets) {
                Some(packets) if duration_seconds > 0.0 => format!(
                    ": {packets} transport packets in {duration_seconds:.1} s ({:.1}/s)",
                    packets as f64 / duration_seconds
                ),
                _ => String::new(),
            };
            let _ = writeln!(out, "      LOOP: {}{rate}", cycle.join(" → "));
        }
        Verdict::Direct => out.push_str("      direct: not inside another tunnel\n"),
        Verdict::Unroutable => out.push_str("      UNROUTABLE: the kernel has no route to the endpoint\n"),
        Verdict::Unseen => {}
    }
}

/// A tunnel's findings (the same list `check` prints), at or above `shown`.
pub fn render_findings(out: &mut String, tunnel: &TunnelReport, indent: &str, colour: bool, shown: &[Severity]) {
    for finding in tunnel.findings.iter().filter(|f| shown.contains(&f.severity)) {
        let label = format!("{:?}", finding.severity).to_uppercase();
        let label = if colour {
            let code = match finding.severity {
                Severity::Error => "31;1",
                Severity::Warning => "33;1",
                Severity::Info => "36",
            };
            format!("\x1b[{code}m{label}\x1b[0m")
        } else {
            label
        };
        let _ = writeln!(out, "{indent}{label} [{}] {}", finding.kind, finding.message);
    }
}

/// Why a peer's transport goes where it does and the verified fix, in the
/// form of the manager owning the tunnel it applies to; shared by `run` and
/// `check` output.
pub fn render_diagnosis(out: &mut String, peer: &PeerReport, indent: &str) {
    if let Some(why) = &peer.explanation {
        let _ = writeln!(out, "{indent}why: {why}");
    }
    if let Some(fix) = &peer.fix_details {
        let form = fix.manager.map(|m| format!(", {}", m.as_str())).unwrap_or_default();
        let mut lines = fix.how.lines();
        let _ = writeln!(out, "{indent}fix ({}{form}): {}", fix.kind.as_str(), lines.next().unwrap_or_default());
        for line in lines {
            let _ = writeln!(out, "{indent}     {line}");
        }
        let _ = writeln!(out, "{indent}     now: {}", fix.commands.join("; "));
        let table = fix.verified_route_table.map(table_name).map(|t| format!(" (table {t})")).unwrap_or_default();
        let _ = writeln!(out, "{indent}     verified: would leave via {}{table}", fix.verified_egress_interface);
    }
}

fn render_handshake(out: &mut String, handshake: &crate::handshake::Handshake) {
    let state = if handshake.up {
        "up".to_owned()
    } else {
        format!("DOWN (no handshake within {} s)", handshake.timeout_seconds)
    };
    match handshake.age_seconds {
        Some(age) => {
            let _ = writeln!(out, "      handshake: {}, {state}", crate::handshake::human_age(age));
        }
        None => {
            let _ = writeln!(out, "      handshake: none yet, {state}");
        }
    }
}

/// Microseconds for people: `850 µs`, `41.2 ms`, `1.25 s`.
pub fn human_us(us: u64) -> String {
    match us {
        0..1_000 => format!("{us} µs"),
        1_000..1_000_000 => format!("{:.1} ms", us as f64 / 1_000.0),
        _ => format!("{:.2} s", us as f64 / 1_000_000.0),
    }
}

fn summary_text(summary: &Summary) -> String {
    format!(
        "p50 {} p90 {} p99 {} max {} (n={})",
        human_us(summary.p50),
        human_us(summary.p90),
        human_us(summary.p99),
        human_us(summary.max),
        summary.count
    )
}

fn render_latency(out: &mut String, latency: &PeerLatency) {
    for (name, summary) in [
        ("inner RTT", &latency.inner_rtt_us),
        ("handshake RTT", &latency.handshake_rtt_us),
        ("transmit", &latency.transmit_us),
    ] {
        if summary.count > 0 {
            let method = match (name, latency.transmit_method) {
                ("transmit", Some(method)) => format!(" [{}]", method.replace('_', " ")),
                _ => String::new(),
            };
            let _ = writeln!(out, "      {name}: {}{method}", summary_text(summary));
        }
    }
    if let Some(histogram) = &latency.histograms.inner_rtt {
        out.push_str(&histogram.render_log2("        "));
    }
}

fn render_nesting_cost(out: &mut String, inner: &str, cost: &NestingCost) {
    let outer = &cost.outer_interface;
    match (cost.estimated_cost_us, &cost.probe) {
        (Some(extra), Some(_)) => {
            let _ = writeln!(
                out,
                "      cost: riding inside {outer} adds {} per round trip (measured by --probe)",
                human_us(extra)
            );
        }
        (Some(extra), None) => {
            let _ = writeln!(
                out,
                "      cost: riding inside {outer} adds about {} per round trip ({outer}'s own RTT p50; --probe measures it)",
                human_us(extra)
            );
        }
        (None, _) => {
            let _ = writeln!(
                out,
                "      cost: unknown (no traffic over {outer} seen); run with --probe to measure {inner}'s direct path"
            );
        }
    }
    if let Some(probe) = &cost.probe {
        let show = |v: Option<u64>| v.map(human_us).unwrap_or_else(|| "no reply".into());
        let _ = writeln!(
            out,
            "      probe: endpoint RTT now {}, with mark {} (direct) {}",
            show(probe.current_path_rtt_us),
            probe.fix_mark,
            show(probe.direct_path_rtt_us)
        );
    }
    if let Some(expected) = cost.expected_inner_rtt_after_fix_us {
        let _ = writeln!(out, "      after the fix expect {inner}'s RTT around {}", human_us(expected));
    }
}
