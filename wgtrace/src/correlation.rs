//! From packets to verdicts: which tunnel each transport flow belongs to,
//! where it really leaves, whether that is inside another tunnel, why, and
//! which mark would fix it.
//!
//! A flow belongs to a tunnel by its own socket: the tunnel's network
//! namespace and listen port as the source. Destination alone proves nothing
//! (any socket can send to a tunnel's endpoint).

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
};

use anyhow::Result;
use serde::Serialize;
use wgtrace_common::{AF_INET, DIR_EGRESS, DIR_INGRESS, FlowKey, FlowStats, RouteKey, RouteStats};

use crate::latency::{NestingCost, PeerLatency};
use crate::topology::{
    Implementation, Topology, Tunnel,
    netlink::{FR_ACT_TO_TBL, RouteAnswer, Rule, UdpQuery, table_name},
    prefix_contains,
};

/// Asks the kernel where a packet would go; the live implementation is
/// [`Topology::route_get`], tests substitute their own routing tables.
pub trait RouteOracle {
    fn route_get(&self, netns: u64, query: UdpQuery) -> Result<RouteAnswer>;
}

impl RouteOracle for Topology {
    fn route_get(&self, netns: u64, query: UdpQuery) -> Result<RouteAnswer> {
        Topology::route_get(self, netns, query)
    }
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Transport {
    /// Device the encrypted packets leave through first.
    pub egress_interface: String,
    pub mark: u32,
    /// Routing table that answered (None when no lookup was seen and the
    /// kernel could not be asked).
    pub route_table: Option<u32>,
    /// The policy rule that led to that table.
    pub rule: Option<String>,
    pub packets: u64,
    pub bytes: u64,
    pub received_packets: u64,
}

#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Nesting {
    /// The outer tunnel's AllowedIPs name this endpoint specifically.
    Deliberate,
    /// Captured by the outer tunnel's default route (AllowedIPs 0.0.0.0/0 or ::/0).
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

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Fix {
    pub mark: u32,
    /// Where the kernel said the transport goes with that mark.
    pub verified_egress_interface: String,
    pub verified_route_table: Option<u32>,
    pub wg_quick: String,
    pub wg_set: String,
    pub systemd_networkd: String,
    pub network_manager: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct PeerReport {
    pub public_key: String,
    pub endpoint: Option<SocketAddr>,
    pub transport: Option<Transport>,
    /// The interface of the tunnel this one's transport rides inside.
    pub nested_in: Option<String>,
    pub nesting: Option<Nesting>,
    /// Outer tunnels from the innermost out, e.g. [wg1, wg0] for wg2.
    pub chain: Vec<String>,
    /// A one-line summary of the fix, or null.
    pub fix: Option<String>,
    pub fix_details: Option<Fix>,
    pub explanation: Option<String>,
    /// Filled in by [`crate::latency::annotate`].
    pub latency: Option<PeerLatency>,
    /// For a nested peer: what riding inside the outer tunnel costs.
    pub nesting_cost: Option<NestingCost>,
}

#[derive(Clone, Debug, Serialize)]
pub struct TunnelReport {
    pub interface: String,
    pub netns: String,
    pub netns_inode: u64,
    pub ifindex: u32,
    pub implementation: Implementation,
    pub fwmark: Option<u32>,
    pub listen_port: Option<u16>,
    pub peers: Vec<PeerReport>,
}

/// Everything the kernel side recorded, as read from its maps.
pub struct Observations<'a> {
    pub flows: &'a HashMap<FlowKey, FlowStats>,
    pub routes: &'a HashMap<RouteKey, RouteStats>,
}

fn key_address(family: u16, bytes: &[u8; 16]) -> IpAddr {
    if family == AF_INET { IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]]) } else { IpAddr::from(*bytes) }
}

pub fn correlate(topology: &Topology, seen: &Observations, oracle: &dyn RouteOracle) -> Vec<TunnelReport> {
    let mut reports: Vec<TunnelReport> = topology
        .tunnels
        .iter()
        .map(|tunnel| TunnelReport {
            interface: tunnel.interface.clone(),
            netns: tunnel.netns_label.clone(),
            netns_inode: tunnel.netns,
            ifindex: tunnel.ifindex,
            implementation: tunnel.implementation.clone(),
            fwmark: tunnel.device.as_ref().map(|d| d.fwmark),
            listen_port: tunnel.device.as_ref().map(|d| d.listen_port),
            peers: tunnel
                .device
                .iter()
                .flat_map(|d| &d.peers)
                .map(|peer| correlate_peer(topology, tunnel, peer, seen, oracle))
                .collect(),
        })
        .collect();
    fill_chains(&mut reports);
    reports
}

fn correlate_peer(
    topology: &Topology,
    tunnel: &Tunnel,
    peer: &crate::topology::Peer,
    seen: &Observations,
    oracle: &dyn RouteOracle,
) -> PeerReport {
    let mut report = PeerReport {
        public_key: peer.public_key.clone(),
        endpoint: peer.endpoint,
        transport: None,
        nested_in: None,
        nesting: None,
        chain: Vec::new(),
        fix: None,
        fix_details: None,
        explanation: None,
        latency: None,
        nesting_cost: None,
    };
    let (Some(device), Some(endpoint)) = (tunnel.device.as_ref(), peer.endpoint) else {
        return report;
    };
    let ours = |key: &FlowKey, direction: u8| {
        key.netns as u64 == tunnel.netns && key.direction == direction && {
            let (local_port, remote_port, remote) = if direction == DIR_EGRESS {
                (key.sport, key.dport, key_address(key.family, &key.daddr))
            } else {
                (key.dport, key.sport, key_address(key.family, &key.saddr))
            };
            local_port == device.listen_port && remote_port == endpoint.port() && same_ip(remote, endpoint.ip())
        }
    };
    // The current path is the one seen last: after a fix, old flows linger in
    // the maps but stop being updated.
    let Some((current, _)) =
        seen.flows.iter().filter(|(key, _)| ours(key, DIR_EGRESS)).max_by_key(|(_, stats)| stats.last_seen_ns)
    else {
        return report;
    };
    let (packets, bytes) = seen
        .flows
        .iter()
        .filter(|(key, _)| ours(key, DIR_EGRESS) && key.ifindex == current.ifindex && key.mark == current.mark)
        .fold((0, 0), |(p, b), (_, s)| (p + s.packets, b + s.bytes));
    let received_packets = seen.flows.iter().filter(|(key, _)| ours(key, DIR_INGRESS)).map(|(_, s)| s.packets).sum();

    let query = UdpQuery {
        destination: endpoint.ip(),
        source_port: device.listen_port,
        destination_port: endpoint.port(),
        mark: current.mark,
    };
    let kernel_answer = oracle.route_get(tunnel.netns, query).ok();
    let route_table = observed_table(seen.routes, tunnel, current, endpoint, device.listen_port)
        .or(kernel_answer.as_ref().and_then(|a| a.table));
    let rules =
        topology.namespaces.get(&tunnel.netns).map(|ns| if endpoint.is_ipv4() { &ns.rules_v4 } else { &ns.rules_v6 });
    let rule = route_table.and_then(|table| {
        deciding_rule(rules?, current.mark, endpoint.ip(), table, kernel_answer.as_ref().map(|a| a.prefix_len))
    });

    let egress_interface = topology
        .link_name(tunnel.netns, current.ifindex)
        .map(str::to_owned)
        .unwrap_or_else(|| format!("ifindex {}", current.ifindex));
    report.transport = Some(Transport {
        egress_interface: egress_interface.clone(),
        mark: current.mark,
        route_table,
        rule: rule.map(Rule::describe),
        packets,
        bytes,
        received_packets,
    });

    let Some(outer) =
        topology.tunnel_on_ifindex(tunnel.netns, current.ifindex).filter(|o| o.interface != tunnel.interface)
    else {
        return report;
    };
    report.nested_in = Some(outer.interface.clone());
    let specific_route = outer
        .device
        .iter()
        .flat_map(|d| d.peers.iter().flat_map(|p| &p.allowed_ips))
        .filter(|(net, len)| prefix_contains(*net, *len, endpoint.ip()))
        .map(|(_, len)| *len)
        .max()
        .unwrap_or(0);
    let nesting = if specific_route > 0 { Nesting::Deliberate } else { Nesting::Accidental };
    report.nesting = Some(nesting);

    let via = match (&report.transport, rule) {
        (Some(Transport { route_table: Some(table), .. }), Some(rule)) => {
            format!("rule `{}` sends them to table {}, ", rule.describe(), table_name(*table))
        }
        (Some(Transport { route_table: Some(table), .. }), None) => format!("table {} ", table_name(*table)),
        _ => String::new(),
    };
    let outer_mark = outer.device.as_ref().map(|d| d.fwmark).unwrap_or(0);
    report.explanation = Some(match nesting {
        Nesting::Accidental => format!(
            "{inner}'s encrypted packets to {endpoint} carry mark {mark:#x}; {via}which routes them into {outer_name}: \
             {inner} is nested inside {outer_name} (double encapsulation), captured by {outer_name}'s full-tunnel \
             default route. {outer_name} marks its own transport {outer_mark:#x} to bypass that route; {inner} does not.",
            inner = tunnel.interface,
            mark = current.mark,
            outer_name = outer.interface,
        ),
        Nesting::Deliberate => format!(
            "{inner}'s transport to {endpoint} rides inside {outer_name} on purpose: {outer_name}'s AllowedIPs name \
             that endpoint specifically (/{specific_route}).",
            inner = tunnel.interface,
            outer_name = outer.interface,
        ),
    });
    if nesting == Nesting::Accidental {
        report.fix_details = find_fix(topology, tunnel, outer, current.mark, query, oracle);
        report.fix = report.fix_details.as_ref().map(|fix| {
            format!(
                "set FwMark = {mark} on {inner} so its transport bypasses {outer_name} (verified: it would leave via {via}); \
                 now: `{wg_set}`",
                mark = fix.mark,
                inner = tunnel.interface,
                outer_name = outer.interface,
                via = fix.verified_egress_interface,
                wg_set = fix.wg_set,
            )
        });
    }
    report
}

fn same_ip(a: IpAddr, b: IpAddr) -> bool {
    a.to_canonical() == b.to_canonical()
}

/// The table whose lookup produced the device the packet really left by.
/// When several tables were consulted (a suppressed main lookup, then the
/// tunnel table), the one pointing at the real egress device is the decision
/// that was used.
fn observed_table(
    routes: &HashMap<RouteKey, RouteStats>,
    tunnel: &Tunnel,
    flow: &FlowKey,
    endpoint: SocketAddr,
    listen_port: u16,
) -> Option<u32> {
    routes
        .iter()
        .filter(|(key, stats)| {
            key.netns as u64 == tunnel.netns
                && key.mark == flow.mark
                && key.dport == endpoint.port()
                && (key.sport == listen_port || key.sport == 0)
                && same_ip(key_address(key.family, &key.daddr), endpoint.ip())
                && stats.error == 0
                && stats.result_ifindex == flow.ifindex
        })
        .max_by_key(|(_, stats)| stats.last_seen_ns)
        .map(|(key, _)| key.table)
}

/// The first rule that selects this packet and leads to `table`, skipping a
/// `suppress_prefixlength` rule whose answer would have been suppressed.
pub fn deciding_rule(
    rules: &[Rule],
    mark: u32,
    destination: IpAddr,
    table: u32,
    prefix_len: Option<u8>,
) -> Option<&Rule> {
    rules.iter().find(|rule| {
        rule.action == FR_ACT_TO_TBL
            && rule.table == table
            && rule.matches(mark, None, destination)
            && !matches!((rule.suppress_prefixlen, prefix_len), (Some(s), Some(len)) if len as u32 <= s)
    })
}

/// Candidate marks, most likely first: the outer tunnel's own mark (what its
/// bypass rule exempts), then every mark the namespace's rules test for.
/// Each is verified by asking the kernel before it is suggested.
fn find_fix(
    topology: &Topology,
    tunnel: &Tunnel,
    outer: &Tunnel,
    current_mark: u32,
    query: UdpQuery,
    oracle: &dyn RouteOracle,
) -> Option<Fix> {
    let mut candidates: Vec<u32> = outer.device.iter().map(|d| d.fwmark).filter(|m| *m != 0).collect();
    if let Some(ns) = topology.namespaces.get(&tunnel.netns) {
        candidates.extend(ns.rules_v4.iter().chain(&ns.rules_v6).filter_map(|r| r.fwmark).filter(|m| *m != 0));
    }
    candidates.dedup();
    candidates.into_iter().filter(|m| *m != current_mark).find_map(|mark| {
        let answer = oracle.route_get(tunnel.netns, UdpQuery { mark, ..query }).ok()?;
        let oif = answer.oif?;
        if topology.tunnel_on_ifindex(tunnel.netns, oif).is_some() {
            return None; // still inside some tunnel
        }
        let egress = topology.link_name(tunnel.netns, oif)?.to_owned();
        let name = &tunnel.interface;
        Some(Fix {
            mark,
            verified_egress_interface: egress,
            verified_route_table: answer.table,
            wg_quick: format!("FwMark = {mark}   # under [Interface] in {name}.conf"),
            wg_set: format!("wg set {name} fwmark {mark}"),
            systemd_networkd: format!("FirewallMark={mark}   # under [WireGuard] in the {name}.netdev file"),
            network_manager: format!("nmcli connection modify {name} wireguard.fwmark {mark}"),
        })
    })
}

/// Follows `nested_in` links to list every outer tunnel, innermost first.
fn fill_chains(reports: &mut [TunnelReport]) {
    let outer_of: HashMap<(u64, String), String> = reports
        .iter()
        .flat_map(|t| {
            t.peers.iter().filter_map(move |p| Some(((t.netns_inode, t.interface.clone()), p.nested_in.clone()?)))
        })
        .collect();
    for tunnel in reports.iter_mut() {
        for peer in &mut tunnel.peers {
            let mut chain = Vec::new();
            let mut next = peer.nested_in.clone();
            while let Some(outer) = next {
                if chain.contains(&outer) || chain.len() > 16 {
                    break;
                }
                next = outer_of.get(&(tunnel.netns_inode, outer.clone())).cloned();
                chain.push(outer);
            }
            peer.chain = chain;
        }
    }
}

/// Routing-table lookups per (mark, table), as the first probe reports them.
pub fn lookups_by_mark_and_table(routes: &HashMap<RouteKey, RouteStats>) -> Vec<(u32, u32, u64)> {
    let mut totals: HashMap<(u32, u32), u64> = HashMap::new();
    for (key, stats) in routes {
        *totals.entry((key.mark, key.table)).or_default() += stats.lookups;
    }
    let mut out: Vec<_> = totals.into_iter().map(|((m, t), n)| (m, t, n)).collect();
    out.sort();
    out
}
