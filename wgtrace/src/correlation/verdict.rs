//! Verdicts: direct, nested (chain innermost first, WireGuard or not), loop
//! (naming every member), unseen or unroutable; their explanations, fixes
//! and findings. `run` and `check` both come through here.

use std::{collections::HashMap, net::SocketAddr};

use serde::Serialize;

use super::{
    Finding, PeerReport, RouteOracle, Severity, Transport, TunnelReport, empty_peer_report, fix,
    fix::FixKind,
    manager::{self, Manager},
    path::{self, Egress, Outer, OuterKind},
};
use crate::topology::{
    Topology, Tunnel,
    netlink::{UdpQuery, table_name},
    prefix_contains,
};

#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Direct,
    Nested,
    Loop,
    /// No transport packets seen yet (`run`), or no endpoint to send to.
    Unseen,
    /// The kernel has no route to the endpoint.
    Unroutable,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Nested => "nested",
            Self::Loop => "loop",
            Self::Unseen => "unseen",
            Self::Unroutable => "unroutable",
        }
    }
}

#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Nesting {
    /// The outer tunnel's AllowedIPs (or a specific route) name this endpoint.
    Deliberate,
    /// Captured by the outer tunnel's default route (AllowedIPs 0.0.0.0/0 or
    /// ::/0, or OpenVPN's 0.0.0.0/1 + 128.0.0.0/1).
    Accidental,
}

impl Nesting {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Deliberate => "deliberate",
            Self::Accidental => "accidental",
        }
    }
}

/// A transport path however it was learned: from packets (`run`) or from
/// RTM_GETROUTE (`check`).
#[derive(Clone, Debug)]
pub enum PathFacts {
    /// No endpoint, or no packets seen.
    None,
    Unroutable {
        query: UdpQuery,
        error: String,
    },
    Path {
        query: UdpQuery,
        egress_ifindex: u32,
        transport: Transport,
        rule_priority: Option<u32>,
        /// Where the kernel routes this flow now (RTM_GETROUTE), which can
        /// differ from where packets were seen: wireguard-go keeps sending
        /// from the source (and device) it last received on.
        routed_ifindex: Option<u32>,
    },
}

/// WireGuard's overhead on an inner packet: outer IP + UDP (8) + WireGuard
/// header (16) + tag (16).
pub fn overhead(ipv4_transport: bool) -> u32 {
    if ipv4_transport { 60 } else { 80 }
}

fn endpoint_inside_own_allowed_ips(tunnel: &Tunnel, endpoint: std::net::IpAddr) -> bool {
    tunnel
        .device
        .iter()
        .flat_map(|d| &d.peers)
        .flat_map(|p| &p.allowed_ips)
        .any(|(net, len)| *len > 0 && prefix_contains(*net, *len, endpoint))
}

/// Judges one peer's path.
pub fn judge(
    topology: &Topology,
    tunnel: &Tunnel,
    peer: &crate::topology::Peer,
    facts: PathFacts,
    oracle: &dyn RouteOracle,
) -> PeerReport {
    let mut report = empty_peer_report(peer);
    let name = &tunnel.interface;
    let (query, egress_ifindex, transport, rule_priority, routed_ifindex) = match facts {
        PathFacts::None => return report,
        PathFacts::Unroutable { query, error } => {
            report.verdict = Verdict::Unroutable;
            report.explanation = Some(format!(
                "{name}'s endpoint {} is unreachable with mark {:#x}: {error}",
                crate::redact::endpoint(SocketAddr::new(query.destination, query.destination_port)),
                query.mark
            ));
            return report;
        }
        PathFacts::Path { query, egress_ifindex, transport, rule_priority, routed_ifindex } => {
            (query, egress_ifindex, transport, rule_priority, routed_ifindex)
        }
    };
    let via = match (transport.route_table, &transport.rule) {
        (Some(table), Some(rule)) => format!("rule `{rule}` sends them to table {}, ", table_name(table)),
        (Some(table), None) => format!("table {} ", table_name(table)),
        _ => String::new(),
    };
    report.transport = Some(transport);
    let endpoint = SocketAddr::new(query.destination, query.destination_port);
    let shown_endpoint = crate::redact::endpoint(endpoint);
    let own_manager = manager::recognise(topology, tunnel);
    // A config not yet up (check --config) has no device: wg-quick would
    // route its specific AllowedIPs into it.
    let not_up_loop = tunnel.ifindex == 0 && endpoint_inside_own_allowed_ips(tunnel, endpoint.ip());
    // The egress device is in the namespace the transport is routed in.
    let netns = topology.transport_netns(tunnel);
    let outer = match path::classify(topology, netns, egress_ifindex) {
        Egress::Wireguard(t)
            if t.netns == tunnel.netns && t.interface == tunnel.interface && t.ifindex == tunnel.ifindex =>
        {
            None
        }
        _ if not_up_loop => None,
        Egress::Wireguard(t) => Some((
            Outer {
                interface: t.interface.clone(),
                kind: OuterKind::Wireguard,
                owner: topology
                    .tun_holders
                    .get(&(t.netns, t.interface.clone()))
                    .map(|(pid, comm)| format!("{comm} (pid {pid})")),
                ifindex: t.ifindex,
            },
            Some(t),
        )),
        Egress::Tunnel(outer) => Some((outer, None)),
        Egress::Underlay => {
            report.verdict = Verdict::Direct;
            if let Some(routed) = routed_ifindex.filter(|oif| path::is_tunnel(topology, netns, *oif)) {
                // Packets say direct; routing says otherwise. Both are true
                // for now: say so, so `check`'s different answer is explained.
                report.explanation = Some(format!(
                    "{name}'s transport to {shown_endpoint} still leaves directly, but routing now sends it into {}: \
                     {name} keeps the source it last used (wireguard-go does) until its endpoint is set again or \
                     roams, and then follows the route (`wgtrace check` judges that route)",
                    crate::correlation::interface_name(topology, netns, routed)
                ));
            }
            return report;
        }
    };
    let Some((outer, outer_tunnel)) = outer else {
        // The transport comes back into its own tunnel.
        report.verdict = Verdict::Loop;
        report.loop_members = Some(vec![name.clone()]);
        let lost_mark = lost_own_mark(topology, tunnel, query);
        let (why, fix) = if endpoint_inside_own_allowed_ips(tunnel, endpoint.ip()) {
            (
                format!(
                    "{name}'s endpoint {shown_endpoint} is inside {name}'s own AllowedIPs and nothing routes its transport \
                     around it: its encrypted packets loop into {name} itself"
                ),
                fix::exclude_endpoint(topology, tunnel, own_manager, endpoint.ip(), oracle),
            )
        } else if let Some(mark) = lost_mark {
            (
                format!(
                    "{name}'s encrypted packets to {shown_endpoint} carry mark {:#x}; {via}which routes them back into {name} \
                     itself: a routing loop. {name} lost its own mark {mark:#x}, which the rules exempt from its table",
                    query.mark
                ),
                fix::existing_mark(topology, tunnel, own_manager, &[mark], query, oracle, FixKind::RestoreMark),
            )
        } else {
            (
                format!(
                    "{name}'s encrypted packets to {shown_endpoint} carry mark {:#x}; {via}which routes them back into {name} \
                     itself: a routing loop",
                    query.mark
                ),
                fix::existing_mark(topology, tunnel, own_manager, &[], query, oracle, FixKind::RestoreMark),
            )
        };
        report.explanation = Some(why);
        set_fix(&mut report, name, None, fix);
        return report;
    };
    report.verdict = Verdict::Nested;
    report.nested_in = Some(outer.interface.clone());
    let outer_name = outer.interface.clone();
    let (nesting, why) = match outer_tunnel {
        Some(outer_tunnel) => {
            let specific = outer_tunnel
                .device
                .iter()
                .flat_map(|d| d.peers.iter().flat_map(|p| &p.allowed_ips))
                .filter(|(net, len)| prefix_contains(*net, *len, endpoint.ip()))
                .map(|(_, len)| *len)
                .max()
                .unwrap_or(0);
            let outer_mark = outer_tunnel.device.as_ref().map(|d| d.fwmark).unwrap_or(0);
            let bypass = if outer_mark != 0 {
                format!("{outer_name} marks its own transport {outer_mark:#x} to bypass that route; {name} does not.")
            } else {
                format!(
                    "{outer_name} itself carries no mark now, so its own transport loops too (see {outer_name}); \
                     the rules exempt {} from its table.",
                    lost_own_mark(topology, outer_tunnel, query)
                        .map(|m| format!("mark {m:#x}"))
                        .unwrap_or("no mark".into())
                )
            };
            let outer_manager = manager::recognise(topology, outer_tunnel)
                .map(|m| format!(" ({} manages it)", m.as_str()))
                .unwrap_or_default();
            if specific > 0 {
                (
                    Nesting::Deliberate,
                    format!(
                        "{name}'s transport to {shown_endpoint} rides inside {outer_name} on purpose: {outer_name}'s \
                         AllowedIPs name that endpoint specifically (/{specific})."
                    ),
                )
            } else {
                (
                    Nesting::Accidental,
                    format!(
                        "{name}'s encrypted packets to {shown_endpoint} carry mark {mark:#x}; {via}which routes them into \
                         {outer_name}: {name} is nested inside {outer_name} (double encapsulation), captured by \
                         {outer_name}'s full-tunnel default route{outer_manager}. {bypass}",
                        mark = query.mark,
                    ),
                )
            }
        }
        None => {
            let def1 = def1_pair(oracle, netns, outer.ifindex, endpoint.ip().is_ipv4());
            let held = outer.owner.as_deref().map(|o| format!(", held by {o}")).unwrap_or_default();
            let route_prefix = specific_route_prefix(oracle, netns, outer.ifindex, endpoint.ip());
            if !def1 && route_prefix.is_some_and(|len| len > 1) {
                (
                    Nesting::Deliberate,
                    format!(
                        "{name}'s transport to {shown_endpoint} rides inside {outer_name} ({} device{held}) on purpose: a \
                         /{} route sends that endpoint there.",
                        outer.kind.as_str(),
                        route_prefix.unwrap_or(0)
                    ),
                )
            } else {
                let how = if def1 {
                    format!("the OpenVPN-style `def1` routes 0.0.0.0/1 and 128.0.0.0/1 via {outer_name}")
                } else {
                    format!("{outer_name}'s default route")
                };
                (
                    Nesting::Accidental,
                    format!(
                        "{name}'s encrypted packets to {shown_endpoint} carry mark {mark:#x}; {via}which routes them into \
                         {outer_name} ({} device{held}, not WireGuard): {name} is nested inside {outer_name}, captured by \
                         {how}.",
                        outer.kind.as_str(),
                        mark = query.mark,
                    ),
                )
            }
        }
    };
    report.nesting = Some(nesting);
    report.explanation = Some(why);
    report.outer = Some(outer);
    // Packets say nested; routing says direct (a fix applied, the sender
    // not following it yet). Only a userspace implementation pins its
    // source (kernel WireGuard drops one its route no longer allows).
    // Another mark or rule would change nothing: the sender has to let go.
    let pinned = routed_ifindex.filter(|oif| *oif != egress_ifindex && !path::is_tunnel(topology, netns, *oif));
    if nesting == Nesting::Accidental
        && tunnel.implementation == crate::topology::Implementation::Userspace
        && let Some(routed) = pinned
    {
        report.explanation = Some(format!(
            "{name}'s encrypted packets to {shown_endpoint} still ride inside {outer_name} (mark {mark:#x}), but \
             routing already sends them out via {routed}: {name} keeps the source and device it last received on \
             (wireguard-go does) until its endpoint is set again or it roams, and each reply through {outer_name} \
             pins it there again, so set it when none is in flight (a pause in traffic of one round trip)",
            mark = query.mark,
            routed = crate::correlation::interface_name(topology, netns, routed),
        ));
        let fix = fix::reset_endpoint(topology, tunnel, own_manager, &peer.public_key, query, oracle);
        set_fix(&mut report, name, Some(&outer_name), fix);
        return report;
    }
    if nesting == Nesting::Accidental {
        let fix = nested_fix(topology, tunnel, own_manager, outer_tunnel, query, rule_priority, oracle);
        if let (Some(fix), Some(explanation)) = (&fix, report.explanation.as_mut())
            && fix.kind == FixKind::Rule
            && let Some(m) = own_manager
        {
            explanation.push_str(&format!(
                " {name}'s mark {:#x} belongs to {}, which sets it itself: the fix is a rule, not a new mark.",
                fix.mark,
                m.as_str()
            ));
        }
        set_fix(&mut report, name, Some(&outer_name), fix);
    }
    report
}

fn set_fix(report: &mut PeerReport, name: &str, outer: Option<&str>, fix: Option<fix::Fix>) {
    report.fix = fix.as_ref().map(|f| f.summary(name, outer));
    report.fix_details = fix;
}

/// A mark the rules exempt from a table that leads back into this tunnel:
/// wg-quick's `not fwmark M lookup M` with M the tunnel's own table.
fn lost_own_mark(topology: &Topology, tunnel: &Tunnel, query: UdpQuery) -> Option<u32> {
    let ns = topology.namespaces.get(&topology.transport_netns(tunnel))?;
    let rules = if query.destination.is_ipv4() { &ns.rules_v4 } else { &ns.rules_v6 };
    rules.iter().find(|r| r.invert && r.fwmark.is_some_and(|m| m != query.mark && m != 0)).and_then(|r| r.fwmark)
}

/// The fix for a transport captured by another tunnel's default route, by cause.
fn nested_fix(
    topology: &Topology,
    tunnel: &Tunnel,
    own_manager: Option<Manager>,
    outer_tunnel: Option<&Tunnel>,
    query: UdpQuery,
    rule_priority: Option<u32>,
    oracle: &dyn RouteOracle,
) -> Option<fix::Fix> {
    let outer_name = outer_tunnel.map(|t| t.interface.clone());
    if let Some(manager) = own_manager.filter(|m| m.owns_mark())
        && let Some(mark) = manager::manager_mark(manager, tunnel)
    {
        let outer_manager = outer_tunnel.and_then(|t| manager::recognise(topology, t));
        return fix::manager_mark_rule(
            topology,
            tunnel,
            mark,
            outer_name.as_deref().unwrap_or("the capturing tunnel"),
            outer_manager,
            rule_priority,
            query.destination,
            oracle,
        );
    }
    let preferred: Vec<u32> = outer_tunnel.and_then(|t| t.device.as_ref()).map(|d| vec![d.fwmark]).unwrap_or_default();
    fix::existing_mark(topology, tunnel, own_manager, &preferred, query, oracle, FixKind::Mark).or_else(|| {
        fix::mark_and_rule(
            topology,
            tunnel,
            own_manager,
            rule_priority,
            query.destination,
            oracle,
            FixKind::MarkAndRule,
        )
    })
}

/// Whether main holds OpenVPN's `redirect-gateway def1` pair via `ifindex`.
fn def1_pair(oracle: &dyn RouteOracle, netns: u64, ifindex: u32, v4: bool) -> bool {
    if !v4 {
        return false;
    }
    let Ok(routes) = oracle.table_routes(netns, crate::topology::netlink::AF_INET, 254) else { return false };
    let has = |first: [u8; 4]| {
        routes.iter().any(|r| {
            r.prefix_len == 1 && r.oif == Some(ifindex) && r.destination == Some(std::net::IpAddr::from(first))
        })
    };
    has([0, 0, 0, 0]) && has([128, 0, 0, 0])
}

/// The prefix length of main's most specific route for `destination` via `ifindex`.
fn specific_route_prefix(
    oracle: &dyn RouteOracle,
    netns: u64,
    ifindex: u32,
    destination: std::net::IpAddr,
) -> Option<u8> {
    let family =
        if destination.is_ipv4() { crate::topology::netlink::AF_INET } else { crate::topology::netlink::AF_INET6 };
    let routes = oracle.table_routes(netns, family, 254).ok()?;
    routes
        .iter()
        .filter(|r| r.oif == Some(ifindex))
        .filter(|r| r.destination.is_some_and(|d| prefix_contains(d, r.prefix_len, destination)))
        .map(|r| r.prefix_len)
        .max()
}

/// After every peer is judged: chains, mutual loops (a chain that comes back
/// to its start), MTU and the findings, the same for `run` and `check`.
pub fn resolve(topology: &Topology, reports: &mut [TunnelReport], oracle: &dyn RouteOracle) {
    // (namespace, tunnel) -> its outer and the namespace that outer is in
    // (the tunnel's transport namespace).
    let outer_of: HashMap<(u64, String), (u64, String)> = reports
        .iter()
        .flat_map(|t| {
            t.peers.iter().filter_map(move |p| {
                Some(((t.netns_inode, t.interface.clone()), (t.transport_netns_inode, p.nested_in.clone()?)))
            })
        })
        .collect();
    for tunnel in reports.iter_mut() {
        let Some(this) =
            topology.tunnels.iter().find(|t| t.netns == tunnel.netns_inode && t.interface == tunnel.interface)
        else {
            continue;
        };
        for peer in &mut tunnel.peers {
            let mut chain = Vec::new();
            let mut next = peer.nested_in.clone().map(|outer| (tunnel.transport_netns_inode, outer));
            let mut looped = false;
            while let Some((netns, outer)) = next {
                if netns == tunnel.netns_inode && outer == tunnel.interface {
                    looped = true;
                    break;
                }
                if chain.contains(&outer) || chain.len() > 16 {
                    break;
                }
                next = outer_of.get(&(netns, outer.clone())).cloned();
                chain.push(outer);
            }
            if looped {
                mutual_loop(topology, this, peer, &chain, oracle);
            }
            peer.chain = chain;
        }
    }
    for tunnel in reports.iter_mut() {
        tunnel.findings = findings(topology, tunnel);
    }
}

fn mutual_loop(
    topology: &Topology,
    tunnel: &Tunnel,
    peer: &mut PeerReport,
    chain: &[String],
    oracle: &dyn RouteOracle,
) {
    let name = &tunnel.interface;
    let mut members = vec![name.clone()];
    members.extend(chain.iter().cloned());
    let Some(transport) = &peer.transport else { return };
    let outer = chain.first().cloned().unwrap_or_default();
    let full_tunnels = members.iter().all(|m| {
        topology.tunnels.iter().any(|t| {
            t.netns == tunnel.netns
                && &t.interface == m
                && t.device.iter().flat_map(|d| &d.peers).flat_map(|p| &p.allowed_ips).any(|(_, len)| *len == 0)
        })
    });
    let cycle = members.iter().chain(std::iter::once(name)).cloned().collect::<Vec<_>>().join(" → ");
    peer.verdict = Verdict::Loop;
    let back = if chain.len() > 1 {
        format!("{outer}'s (through {}) by {name}", chain[1..].join(", "))
    } else {
        format!("{outer}'s by {name}")
    };
    peer.explanation = Some(format!(
        "{name}'s transport is captured by {outer}, and {back}: the transports of {} capture each other, a routing \
         loop ({cycle}).{}",
        members.join(" and "),
        if full_tunnels { " Each is a full tunnel; only one may own the default route." } else { "" }
    ));
    if let Some(endpoint) = peer.endpoint {
        let rule_priority = topology.namespaces.get(&topology.transport_netns(tunnel)).and_then(|ns| {
            let rules = if endpoint.is_ipv4() { &ns.rules_v4 } else { &ns.rules_v6 };
            rules.iter().find(|r| transport.rule.as_deref() == Some(&r.describe())).map(|r| r.priority)
        });
        let fix = fix::mark_and_rule(
            topology,
            tunnel,
            manager::recognise(topology, tunnel),
            rule_priority,
            endpoint.ip(),
            oracle,
            FixKind::OneDefaultRoute,
        );
        set_fix(peer, name, Some(&outer), fix);
    }
    peer.loop_members = Some(members);
}

/// Findings from the verdicts: one code path for both commands.
pub fn findings(topology: &Topology, tunnel: &TunnelReport) -> Vec<Finding> {
    let finding = |severity, kind, message| Finding {
        severity,
        kind,
        netns: tunnel.netns.clone(),
        interface: Some(tunnel.interface.clone()),
        message,
    };
    let mut out = Vec::new();
    let name = &tunnel.interface;
    for peer in &tunnel.peers {
        let why = peer.explanation.clone().unwrap_or_default();
        let fix = peer
            .fix_details
            .as_ref()
            .map(|f| {
                format!(
                    "; fix ({}): {} (verified: would leave via {})",
                    f.kind.as_str(),
                    f.how.replace('\n', " "),
                    f.verified_egress_interface
                )
            })
            .unwrap_or_default();
        match (peer.verdict, peer.nesting) {
            (Verdict::Loop, _) => {
                let packets = peer
                    .transport
                    .as_ref()
                    .and_then(|t| t.packets)
                    .map(|p| format!(" ({p} transport packets seen looping)"))
                    .unwrap_or_default();
                out.push(finding(
                    Severity::Error,
                    "loop",
                    format!(
                        "routing loop {}: {why}{packets}{}",
                        peer.loop_members.as_deref().unwrap_or_default().join(" → "),
                        if fix.is_empty() { "; no verified fix found".to_owned() } else { fix }
                    ),
                ));
            }
            (Verdict::Unroutable, _) => out.push(finding(Severity::Error, "no_route", why)),
            (Verdict::Nested, Some(Nesting::Accidental)) if peer.fix_details.is_some() => out.push(finding(
                Severity::Warning,
                "nested",
                format!("{name} is nested inside {}{fix}", peer.nested_in.as_deref().unwrap_or("?")),
            )),
            (Verdict::Nested, Some(Nesting::Accidental)) => out.push(finding(
                Severity::Error,
                "no_bypass_mark",
                format!(
                    "{name} is nested inside {}, and neither a mark used in this namespace's rules nor a new rule was \
                     verified to take its transport around it",
                    peer.nested_in.as_deref().unwrap_or("?")
                ),
            )),
            (Verdict::Nested, _) => out.push(finding(Severity::Info, "nested", why)),
            _ => {}
        }
        if peer.verdict == Verdict::Nested
            && let Some(message) = mtu_problem(topology, tunnel, peer)
        {
            out.push(finding(Severity::Warning, "mtu", message));
        }
    }
    out
}

/// X nested in Y: X's full-size packets become X's MTU + WireGuard's
/// overhead (by X's transport family) on Y, which must fit Y's MTU.
fn mtu_problem(topology: &Topology, tunnel: &TunnelReport, peer: &PeerReport) -> Option<String> {
    let inner_mtu = tunnel.mtu?;
    let outer = peer.outer.as_ref()?;
    let outer_mtu =
        path::link(topology, tunnel.transport_netns_inode, outer.ifindex).map(|l| l.mtu).filter(|m| *m > 0)?;
    let v4 = peer.endpoint?.is_ipv4();
    let needed = inner_mtu + overhead(v4);
    (needed > outer_mtu).then(|| {
        format!(
            "{name} (MTU {inner_mtu}) rides inside {outer_name} (MTU {outer_mtu}): {name}'s full-size packets become \
             {needed}-byte transport packets ({inner_mtu} + {} over {}), more than {outer_name} carries, so they are \
             fragmented or dropped. Set MTU = {} on {name} (or raise {outer_name}'s), or fix the nesting.",
            overhead(v4),
            if v4 { "IPv4" } else { "IPv6" },
            outer_mtu.saturating_sub(overhead(v4)),
            name = tunnel.interface,
            outer_name = outer.interface,
        )
    })
}
