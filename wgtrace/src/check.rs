//! `wgtrace check`: a static diagnosis in about a second, without eBPF.
//! Where each tunnel's transport *would* go is asked of the kernel itself
//! (RTM_GETROUTE with the tunnel's mark and ports), then judged by the same
//! code that judges packets in `wgtrace run`.

use std::{fmt::Write as _, io::IsTerminal as _, path::PathBuf};

use anyhow::{Context as _, Result};
use serde::Serialize;

pub use crate::correlation::{Finding, Severity};
use crate::{
    correlation::{self, TunnelReport},
    topology::{
        Implementation, Scope, Topology, Tunnel,
        netlink::{FR_ACT_TO_TBL, Rule, table_name},
        wgquick,
    },
};

pub struct CheckOptions {
    pub scope: Scope,
    pub json: bool,
    /// A wg-quick config to judge before it is brought up.
    pub config: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct CheckReport {
    pub tunnels: Vec<TunnelReport>,
    pub findings: Vec<Finding>,
    /// What could not be looked at for lack of privilege.
    pub privilege_notes: Vec<String>,
    /// False when something could not be looked at, so "no problems found"
    /// would not mean healthy.
    pub complete: bool,
}

impl CheckReport {
    /// 0 healthy, 1 problems found, 2 could not check everything. A tunnel
    /// whose configuration could not be read is not a problem found but
    /// one not checked (`unreadable` findings make `complete` false).
    pub fn exit_code(&self) -> u8 {
        if self.findings.iter().any(|f| f.severity >= Severity::Warning && f.kind != "unreadable") {
            1
        } else if !self.complete {
            2
        } else {
            0
        }
    }
}

pub fn check(options: &CheckOptions) -> Result<CheckReport> {
    let mut topology = Topology::discover(&options.scope)?;
    let mut privilege_notes = privilege_notes();
    let mut config_findings = Vec::new();
    if let Some(path) = &options.config {
        // Wiped on every path: the file holds the private key.
        let text = zeroize::Zeroizing::new(
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
        );
        let config = wgquick::parse(&text).with_context(|| format!("parsing {}", path.display()))?;
        config_findings = config.unknown_keys.clone();
        let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "config".into());
        anyhow::ensure!(
            !topology.tunnels.iter().any(|t| t.netns == topology.own_netns && t.interface == name),
            "{name} is already up here; check it without --config"
        );
        topology.tunnels.push(Tunnel {
            netns: topology.own_netns,
            netns_label: format!("{} (not up: {})", topology.netns_label(topology.own_netns), path.display()),
            interface: name,
            ifindex: 0,
            implementation: Implementation::Userspace,
            daemon_pid: None,
            discovered_by: crate::topology::DiscoveredBy::default(),
            process: None,
            device: Some(config.device),
        });
    }
    let mut findings: Vec<Finding> = config_findings
        .into_iter()
        .map(|message| Finding {
            severity: Severity::Warning,
            kind: "unknown_key",
            netns: topology.netns_label(topology.own_netns),
            interface: options.config.as_ref().and_then(|p| p.file_stem()).map(|s| s.to_string_lossy().into_owned()),
            message: format!("{message}: wg-quick would refuse this file"),
        })
        .collect();
    for tunnel in topology.tunnels.iter().filter(|t| t.device.is_none()) {
        findings.push(Finding {
            severity: Severity::Warning,
            kind: "unreadable",
            netns: tunnel.netns_label.clone(),
            interface: Some(tunnel.interface.clone()),
            message: format!(
                "{}'s configuration could not be read ({} WireGuard); run as root to include it",
                tunnel.interface,
                tunnel.implementation.as_str()
            ),
        });
    }
    // The same judge, loops, fixes and findings as `run`, from the
    // kernel's routing instead of packets.
    let cache = correlation::RouteCache::default();
    let tunnels = correlation::predict(&topology, &cache.oracle(&topology));
    findings.extend(tunnels.iter().flat_map(|t| t.findings.iter().cloned()));
    for namespace in topology.namespaces.values() {
        for rules in [&namespace.rules_v4, &namespace.rules_v6] {
            findings.extend(mark_overlaps(rules).into_iter().map(|message| Finding {
                severity: Severity::Warning,
                kind: "mark_overlap",
                netns: namespace.label.clone(),
                interface: None,
                message,
            }));
        }
    }
    let unprivileged = unsafe { libc::geteuid() } != 0;
    let mut complete = !findings.iter().any(|f| f.kind == "unreadable");
    if unprivileged && options.config.is_none() {
        privilege_notes.push("run as root (sudo wgtrace check) to include every tunnel".into());
        complete = false;
    }
    findings.sort_by_key(|f| std::cmp::Reverse(f.severity));
    Ok(CheckReport { tunnels, findings, privilege_notes, complete })
}

/// Who usually owns a mark: a hint for mark overlap findings.
fn known_owner(mark: u32, mask: u32) -> Option<&'static str> {
    match (mark, mask) {
        (0x80000, 0xff0000) => Some("Tailscale"),
        (51820, _) => Some("wg-quick"),
        (51821..=51899, _) => Some("NetworkManager"),
        _ => None,
    }
}

/// Pairs of rules whose mark selectors can match the same mark but lead to
/// different tables: the later one never sees those packets.
pub fn mark_overlaps(rules: &[Rule]) -> Vec<String> {
    let marked: Vec<&Rule> = rules.iter().filter(|r| r.action == FR_ACT_TO_TBL && r.fwmark.is_some()).collect();
    let mut out = Vec::new();
    for (i, first) in marked.iter().enumerate() {
        for second in &marked[i + 1..] {
            let (m1, k1) = (first.fwmark.unwrap_or(0), first.fwmask.unwrap_or(u32::MAX));
            let (m2, k2) = (second.fwmark.unwrap_or(0), second.fwmask.unwrap_or(u32::MAX));
            if first.invert != second.invert || first.table == second.table || (m1 ^ m2) & k1 & k2 != 0 {
                continue;
            }
            let owner = |m, k| known_owner(m, k).map(|o| format!(" ({o})")).unwrap_or_default();
            out.push(format!(
                "rules `{}`{} and `{}`{} select overlapping marks but different tables ({} vs {}): the first wins, \
                 so traffic meant for table {} never gets there",
                first.describe(),
                owner(m1, k1),
                second.describe(),
                owner(m2, k2),
                table_name(first.table),
                table_name(second.table),
                table_name(second.table)
            ));
        }
    }
    out
}

fn privilege_notes() -> Vec<String> {
    if unsafe { libc::geteuid() } == 0 {
        return Vec::new();
    }
    vec![
        "not root: userspace WireGuard daemons (their UAPI sockets under /proc/PID/root) are not visible".into(),
        "not root: kernel WireGuard configuration needs CAP_NET_ADMIN".into(),
        "not root: other network namespaces need CAP_SYS_ADMIN to enter".into(),
    ]
}

pub fn render(report: &CheckReport, colour: bool) -> String {
    let paint = |severity: Severity, text: &str| {
        if !colour {
            return text.to_owned();
        }
        let code = match severity {
            Severity::Error => "31;1",
            Severity::Warning => "33;1",
            Severity::Info => "36",
        };
        format!("\x1b[{code}m{text}\x1b[0m")
    };
    let mut out = String::new();
    for tunnel in &report.tunnels {
        let mark = tunnel.fwmark.filter(|m| *m != 0).map(|m| format!("{m:#x}")).unwrap_or_else(|| "off".into());
        let manager = tunnel.manager.map(|m| format!(", {}", m.as_str())).unwrap_or_default();
        let _ = writeln!(
            out,
            "{} in {} (fwmark {mark}, port {}{manager})",
            tunnel.interface,
            tunnel.netns,
            tunnel.listen_port.unwrap_or(0)
        );
        for peer in &tunnel.peers {
            let endpoint = peer.endpoint.map(crate::redact::endpoint).unwrap_or_else(|| "no endpoint".into());
            match &peer.transport {
                Some(t) => {
                    let table = t.route_table.map(table_name).unwrap_or_else(|| "?".into());
                    let _ = writeln!(
                        out,
                        "  → {endpoint}: would leave via {} (table {table}): {}",
                        t.egress_interface,
                        peer.verdict.as_str()
                    );
                    if let Some(rule) = &t.rule {
                        let _ = writeln!(out, "    rule: {rule}");
                    }
                }
                None => {
                    let _ = writeln!(out, "  → {endpoint}: no route");
                }
            }
            crate::report::render_diagnosis(&mut out, peer, "    ");
        }
    }
    if report.tunnels.is_empty() {
        out.push_str("No WireGuard tunnels found.\n");
    }
    for finding in &report.findings {
        let label = format!("{:?}", finding.severity).to_uppercase();
        let _ = writeln!(out, "{} [{}] {}", paint(finding.severity, &label), finding.kind, finding.message);
    }
    for note in &report.privilege_notes {
        let _ = writeln!(out, "note: {note}");
    }
    match report.exit_code() {
        0 => out.push_str("healthy: no tunnel's transport is captured by another or loops\n"),
        2 => out.push_str("incomplete: no problems found in what could be checked (see the notes above)\n"),
        _ => {}
    }
    out
}

/// Runs `wgtrace check` and returns its exit status (0 healthy, 1 problems).
pub fn main(options: &CheckOptions) -> Result<u8> {
    let report = check(options)?;
    if options.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report, std::io::stdout().is_terminal()));
    }
    Ok(report.exit_code())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marked(priority: u32, mark: u32, mask: u32, table: u32, invert: bool) -> Rule {
        Rule {
            family: 2,
            priority,
            action: FR_ACT_TO_TBL,
            table,
            invert,
            fwmark: Some(mark),
            fwmask: Some(mask),
            ..Rule::default()
        }
    }

    #[test]
    fn overlapping_marks_with_different_tables_are_flagged() {
        let tailscale = marked(5270, 0x80000, 0xff0000, 52, false);
        let colliding = marked(6000, 0x8ca6c, u32::MAX, 100, false); // has 0x80000 in Tailscale's byte
        let found = mark_overlaps(&[tailscale.clone(), colliding]);
        assert_eq!(found.len(), 1);
        assert!(found[0].contains("Tailscale") && found[0].contains("table 100 never"), "{}", found[0]);
    }

    #[test]
    fn disjoint_or_same_table_marks_are_fine() {
        let tailscale = marked(5270, 0x80000, 0xff0000, 52, false);
        let wg_quick = marked(32765, 51820, u32::MAX, 51820, true);
        let other = marked(100, 0xca6c, u32::MAX, 51820, false);
        assert!(mark_overlaps(&[tailscale, wg_quick, other.clone()]).is_empty());
        assert!(mark_overlaps(&[other.clone(), marked(200, 0xca6c, u32::MAX, 51820, false)]).is_empty());
    }

    #[test]
    fn rendering_says_healthy_or_names_the_problem() {
        let healthy = CheckReport { tunnels: vec![], findings: vec![], privilege_notes: vec![], complete: true };
        assert!(render(&healthy, false).contains("healthy"));
        assert_eq!(healthy.exit_code(), 0);
        let broken = CheckReport {
            tunnels: vec![],
            findings: vec![Finding {
                severity: Severity::Warning,
                kind: "nested",
                netns: "host".into(),
                interface: Some("wg1".into()),
                message: "wg1 is nested inside wg0".into(),
            }],
            privilege_notes: vec![],
            complete: true,
        };
        let text = render(&broken, true);
        assert!(text.contains("\x1b[33;1mWARNING\x1b[0m [nested] wg1 is nested inside wg0"), "{text}");
        assert!(!text.contains("healthy"));
        assert_eq!(broken.exit_code(), 1);
        let partial = CheckReport { complete: false, ..healthy };
        assert_eq!(partial.exit_code(), 2);
        assert!(render(&partial, false).contains("incomplete"));
    }
}
