//! From packets to verdicts: which tunnel each transport flow belongs to,
//! where it really leaves, whether that is inside another tunnel, why, and
//! which mark would fix it.
//!
//! A path belongs to a peer by the tunnel's own socket: the kernel side
//! counts only packets between a tunnel's namespace and listen port and a
//! known endpoint, under the peer's slot number (see `probes::peers`), so
//! everything here is keyed by topology, never by what a sender picked.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
};

use anyhow::Result;
use serde::Serialize;
use wgtrace_common::{DIR_EGRESS, DIR_INGRESS, PathKey, PathStats, RouteKey, RouteStats};

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
    /// Packet counts, when the path was seen in packets (`run`), not
    /// predicted from routing (`check`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packets: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub received_packets: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub received_bytes: Option<u64>,
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
    #[serde(serialize_with = "crate::redact::serialize_key")]
    pub public_key: String,
    /// A friendly name (config comment or `--peer-names`); filled in by
    /// [`crate::names::PeerNames::annotate`].
    #[serde(serialize_with = "crate::names::serialize_name")]
    pub name: Option<String>,
    #[serde(serialize_with = "crate::redact::serialize_endpoint")]
    pub endpoint: Option<SocketAddr>,
    /// Filled in by [`crate::handshake::annotate`] (`run` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handshake: Option<crate::handshake::Handshake>,
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
    /// netlink, uapi, or packets (a speaker without a UAPI).
    pub discovered_by: crate::topology::DiscoveredBy,
    /// The TUN holder of a userspace tunnel.
    pub process: Option<crate::topology::Process>,
    pub fwmark: Option<u32>,
    pub listen_port: Option<u16>,
    pub peers: Vec<PeerReport>,
}

/// Everything the kernel side recorded, as read from its maps.
pub struct Observations<'a> {
    pub paths: &'a HashMap<PathKey, PathStats>,
    pub routes: &'a HashMap<RouteKey, RouteStats>,
    /// The slot the kernel side counts a peer under: (tunnel namespace,
    /// tunnel ifindex, public key) to slot.
    pub slot: &'a dyn Fn(u64, u32, &str) -> Option<u32>,
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
            discovered_by: tunnel.discovered_by,
            process: tunnel.process.clone(),
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

/// A peer report with nothing known yet.
pub fn empty_peer_report(peer: &crate::topology::Peer) -> PeerReport {
    PeerReport {
        public_key: peer.public_key.clone(),
        name: None,
        endpoint: peer.endpoint,
        handshake: None,
        transport: None,
        nested_in: None,
        nesting: None,
        chain: Vec::new(),
        fix: None,
        fix_details: None,
        explanation: None,
        latency: None,
        nesting_cost: None,
    }
}

fn correlate_peer(
    topology: &Topology,
    tunnel: &Tunnel,
    peer: &crate::topology::Peer,
    seen: &Observations,
    oracle: &dyn RouteOracle,
) -> PeerReport {
    let mut report = empty_peer_report(peer);
    let (Some(device), Some(endpoint)) = (tunnel.device.as_ref(), peer.endpoint) else {
        return report;
    };
    let Some(slot) = (seen.slot)(tunnel.netns, tunnel.ifindex, &peer.public_key) else {
        return report;
    };
    let ours = |key: &PathKey, direction: u8| key.peer == slot && key.direction == direction;
    // The current path is the one seen last: after a fix, old paths linger in
    // the maps but stop being updated.
    let Some((current, _)) =
        seen.paths.iter().filter(|(key, _)| ours(key, DIR_EGRESS)).max_by_key(|(_, stats)| stats.last_seen_ns)
    else {
        return report;
    };
    let (packets, bytes) = seen
        .paths
        .iter()
        .filter(|(key, _)| ours(key, DIR_EGRESS) && key.ifindex == current.ifindex && key.mark == current.mark)
        .fold((0, 0), |(p, b), (_, s)| (p + s.packets, b + s.bytes));
    // Received packets arrive on the tunnel's own namespace's devices; a
    // nested peer's are seen twice (on the outer tunnel's device and the
    // wire), so count one device: the busiest.
    let mut received_by_device: HashMap<u32, (u64, u64)> = HashMap::new();
    for (key, stats) in seen.paths.iter().filter(|(key, _)| ours(key, DIR_INGRESS)) {
        let entry = received_by_device.entry(key.ifindex).or_default();
        entry.0 += stats.packets;
        entry.1 += stats.bytes;
    }
    let (received_packets, received_bytes) = received_by_device.into_values().max().unwrap_or_default();

    let query = UdpQuery {
        destination: endpoint.ip(),
        source_port: device.listen_port,
        destination_port: endpoint.port(),
        mark: current.mark,
    };
    let kernel_answer = oracle.route_get(tunnel.netns, query).ok();
    let route_table = observed_table(seen.routes, slot, current).or(kernel_answer.as_ref().and_then(|a| a.table));
    let rule = route_table.and_then(|table| {
        deciding_rule_in(
            topology,
            tunnel.netns,
            current.mark,
            endpoint.ip(),
            table,
            kernel_answer.map(|a| a.prefix_len),
        )
    });
    report.transport = Some(Transport {
        egress_interface: interface_name(topology, tunnel.netns, current.ifindex),
        mark: current.mark,
        route_table,
        rule: rule.map(Rule::describe),
        packets: Some(packets),
        bytes: Some(bytes),
        received_packets: Some(received_packets),
        received_bytes: Some(received_bytes),
    });
    judge_path(topology, tunnel, query, current.ifindex, rule, oracle, &mut report);
    report
}

pub fn interface_name(topology: &Topology, netns: u64, ifindex: u32) -> String {
    topology.link_name(netns, ifindex).map(str::to_owned).unwrap_or_else(|| format!("ifindex {ifindex}"))
}

/// The rule that led to `table` in `netns`, for this family.
pub fn deciding_rule_in(
    topology: &Topology,
    netns: u64,
    mark: u32,
    destination: IpAddr,
    table: u32,
    prefix_len: Option<u8>,
) -> Option<&Rule> {
    let ns = topology.namespaces.get(&netns)?;
    let rules = if destination.is_ipv4() { &ns.rules_v4 } else { &ns.rules_v6 };
    deciding_rule(rules, mark, destination, table, prefix_len)
}

/// Judges a transport path, however it was learned (from packets by `run`,
/// from the kernel's routing by `check`): whether it leads into another
/// tunnel, deliberately or not, why, and the verified fix.
pub fn judge_path(
    topology: &Topology,
    tunnel: &Tunnel,
    query: UdpQuery,
    egress_ifindex: u32,
    rule: Option<&Rule>,
    oracle: &dyn RouteOracle,
    report: &mut PeerReport,
) {
    let endpoint = SocketAddr::new(query.destination, query.destination_port);
    let shown_endpoint = crate::redact::endpoint(endpoint);
    let Some(outer) =
        topology.tunnel_on_ifindex(tunnel.netns, egress_ifindex).filter(|o| o.interface != tunnel.interface)
    else {
        return;
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

    let via = match (report.transport.as_ref().and_then(|t| t.route_table), rule) {
        (Some(table), Some(rule)) => format!("rule `{}` sends them to table {}, ", rule.describe(), table_name(table)),
        (Some(table), None) => format!("table {} ", table_name(table)),
        _ => String::new(),
    };
    let outer_mark = outer.device.as_ref().map(|d| d.fwmark).unwrap_or(0);
    report.explanation = Some(match nesting {
        Nesting::Accidental => format!(
            "{inner}'s encrypted packets to {shown_endpoint} carry mark {mark:#x}; {via}which routes them into {outer_name}: \
             {inner} is nested inside {outer_name} (double encapsulation), captured by {outer_name}'s full-tunnel \
             default route. {outer_name} marks its own transport {outer_mark:#x} to bypass that route; {inner} does not.",
            inner = tunnel.interface,
            mark = query.mark,
            outer_name = outer.interface,
        ),
        Nesting::Deliberate => format!(
            "{inner}'s transport to {shown_endpoint} rides inside {outer_name} on purpose: {outer_name}'s AllowedIPs name \
             that endpoint specifically (/{specific_route}).",
            inner = tunnel.interface,
            outer_name = outer.interface,
        ),
    });
    if nesting == Nesting::Accidental {
        report.fix_details = find_fix(topology, tunnel, outer, query, oracle);
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
}

/// The table whose lookup produced the device the packet really left by.
/// When several tables were consulted (a suppressed main lookup, then the
/// tunnel table), the one pointing at the real egress device is the decision
/// that was used.
fn observed_table(routes: &HashMap<RouteKey, RouteStats>, slot: u32, path: &PathKey) -> Option<u32> {
    routes
        .iter()
        .filter(|(key, stats)| {
            key.peer == slot && key.mark == path.mark && stats.error == 0 && stats.result_ifindex == path.ifindex
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
    query: UdpQuery,
    oracle: &dyn RouteOracle,
) -> Option<Fix> {
    let current_mark = query.mark;
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
pub fn fill_chains(reports: &mut [TunnelReport]) {
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

#[cfg(test)]
mod tests {
    //! Correlation on recorded event sequences: the maps as the kernel side
    //! leaves them, a topology as discovery returns it, and a routing oracle
    //! standing in for RTM_GETROUTE.

    use super::*;
    use crate::topology::{Device, Namespace, Peer, netlink::Link};

    const NS: u64 = 4026532000;
    const LO: u32 = 1;
    const C0: u32 = 2;
    const WG0: u32 = 3;
    const WG1: u32 = 4;
    const WG2: u32 = 5;
    const MARK: u32 = 51820;
    const WG1_ENDPOINT: &str = "192.0.2.200:51821";

    fn rule(priority: u32, table: u32, fwmark: Option<u32>, invert: bool, suppress: Option<u32>) -> Rule {
        Rule {
            family: 2,
            priority,
            action: FR_ACT_TO_TBL,
            table,
            invert,
            fwmark,
            fwmask: fwmark.map(|_| u32::MAX),
            suppress_prefixlen: suppress,
            ..Rule::default()
        }
    }

    fn tunnel(name: &str, ifindex: u32, port: u16, fwmark: u32, endpoint: &str, allowed: &[&str]) -> Tunnel {
        Tunnel {
            netns: NS,
            netns_label: "client".into(),
            interface: name.into(),
            ifindex,
            implementation: Implementation::Userspace,
            daemon_pid: None,
            discovered_by: crate::topology::DiscoveredBy::Uapi,
            process: None,
            device: Some(Device {
                listen_port: port,
                fwmark,
                peers: vec![Peer {
                    public_key: format!("{name}-peer"),
                    endpoint: Some(endpoint.parse().unwrap()),
                    allowed_ips: allowed.iter().map(|a| crate::topology::parse_prefix(a).unwrap()).collect(),
                    last_handshake_sec: 0,
                }],
            }),
        }
    }

    /// The lab's client: wg0 full tunnel with wg-quick's rules, wg1 for one
    /// /24, wg2 whose endpoint is inside wg1's AllowedIPs.
    fn topology() -> Topology {
        let link = |index, name: &str| Link { index, name: name.into(), kind: None };
        let namespace = Namespace {
            label: "client".into(),
            links: vec![link(LO, "lo"), link(C0, "c0"), link(WG0, "wg0"), link(WG1, "wg1"), link(WG2, "wg2")],
            rules_v4: vec![
                rule(0, 255, None, false, None),
                rule(32764, 254, None, false, Some(0)),
                rule(32765, MARK, Some(MARK), true, None),
                rule(32766, 254, None, false, None),
            ],
            rules_v6: vec![],
            handle: "/proc/self/ns/net".into(),
            ..Namespace::default()
        };
        Topology {
            own_netns: NS,
            namespaces: [(NS, namespace)].into(),
            tunnels: vec![
                tunnel("wg0", WG0, 51820, MARK, "198.51.100.2:51820", &["0.0.0.0/0"]),
                tunnel("wg1", WG1, 51821, 0, WG1_ENDPOINT, &["203.0.113.0/24"]),
                tunnel("wg2", WG2, 51822, 0, "203.0.113.1:51822", &["198.18.2.0/24"]),
            ],
            candidates: vec![],
        }
    }

    /// Routing as the lab's client does it: the full tunnel's table for
    /// everything unmarked, 203.0.113.0/24 via wg1, main otherwise.
    struct LabRouting;

    impl RouteOracle for LabRouting {
        fn route_get(&self, _netns: u64, query: UdpQuery) -> Result<RouteAnswer> {
            let in_wg1 = prefix_contains("203.0.113.0".parse().unwrap(), 24, query.destination);
            let (oif, table, prefix_len) = match (in_wg1, query.mark == MARK) {
                (true, _) => (WG1, 254, 24),
                (false, true) => (C0, 254, 0),
                (false, false) => (WG0, MARK, 0),
            };
            Ok(RouteAnswer { oif: Some(oif), prefix_len, table: Some(table), gateway: None, prefsrc: None })
        }
    }

    /// Routing where no mark escapes wg0.
    struct EverythingIntoWg0;

    impl RouteOracle for EverythingIntoWg0 {
        fn route_get(&self, _netns: u64, _query: UdpQuery) -> Result<RouteAnswer> {
            Ok(RouteAnswer { oif: Some(WG0), prefix_len: 0, table: Some(MARK), gateway: None, prefsrc: None })
        }
    }

    /// In these tests a peer's slot is its tunnel's ifindex.
    fn slot_of_tunnel(netns: u64, ifindex: u32, _public_key: &str) -> Option<u32> {
        (netns == NS).then_some(ifindex)
    }

    /// A path of `tunnel`'s peer leaving through `ifindex`.
    fn path(ifindex: u32, tunnel: u32, mark: u32, last_seen_ns: u64) -> (PathKey, PathStats) {
        let key = PathKey { peer: tunnel, ifindex, mark, direction: DIR_EGRESS, _pad: [0; 3] };
        (key, PathStats { packets: 10, bytes: 1280, last_seen_ns })
    }

    fn received(ifindex: u32, tunnel: u32, packets: u64) -> (PathKey, PathStats) {
        let key = PathKey { peer: tunnel, ifindex, mark: 0, direction: DIR_INGRESS, _pad: [0; 3] };
        (key, PathStats { packets, bytes: packets * 100, last_seen_ns: 1 })
    }

    fn lookup(table: u32, mark: u32, result_ifindex: u32, last_seen_ns: u64) -> (RouteKey, RouteStats) {
        let key = RouteKey { peer: WG1, mark, table, _pad: 0 };
        (key, RouteStats { lookups: 5, last_seen_ns, result_ifindex, error: 0 })
    }

    fn wg1_report(
        paths: &[(PathKey, PathStats)],
        routes: &[(RouteKey, RouteStats)],
        oracle: &dyn RouteOracle,
    ) -> PeerReport {
        let paths: HashMap<_, _> = paths.iter().copied().collect();
        let routes: HashMap<_, _> = routes.iter().copied().collect();
        let seen = Observations { paths: &paths, routes: &routes, slot: &slot_of_tunnel };
        let reports = correlate(&topology(), &seen, oracle);
        reports.into_iter().find(|t| t.interface == "wg1").unwrap().peers.remove(0)
    }

    #[test]
    fn broken_wg1_is_nested_and_the_used_table_is_the_one_that_pointed_at_wg0() {
        // One send visits main first (default route via c0, suppressed by
        // suppress_prefixlength 0), then 51820 (default via wg0).
        let peer = wg1_report(
            &[path(C0, WG0, MARK, 1), path(WG0, WG1, 0, 100)],
            &[lookup(254, 0, C0, 100), lookup(MARK, 0, WG0, 100)],
            &LabRouting,
        );
        let transport = peer.transport.as_ref().unwrap();
        assert_eq!(transport.egress_interface, "wg0");
        assert_eq!((transport.mark, transport.route_table), (0, Some(MARK)));
        assert_eq!(transport.rule.as_deref(), Some("32765: not from all fwmark 0xca6c lookup 51820"));
        assert_eq!(peer.nested_in.as_deref(), Some("wg0"));
        assert_eq!(peer.nesting, Some(Nesting::Accidental));
        let fix = peer.fix_details.unwrap();
        assert_eq!((fix.mark, fix.verified_egress_interface.as_str()), (MARK, "c0"));
        assert_eq!(fix.wg_set, "wg set wg1 fwmark 51820");
        assert!(peer.explanation.unwrap().contains("captured by wg0's full-tunnel default route"));
    }

    #[test]
    fn after_the_fix_the_newest_path_wins() {
        let peer = wg1_report(
            &[path(WG0, WG1, 0, 100), path(C0, WG1, MARK, 200)],
            &[lookup(MARK, 0, WG0, 100), lookup(254, MARK, C0, 200)],
            &LabRouting,
        );
        let transport = peer.transport.unwrap();
        assert_eq!((transport.egress_interface.as_str(), transport.mark), ("c0", MARK));
        assert_eq!(transport.route_table, Some(254));
        assert_eq!(transport.rule.as_deref(), Some("32766: from all lookup main"), "main via default: not 32764");
        assert!(peer.nested_in.is_none() && peer.fix.is_none());
    }

    #[test]
    fn another_peers_paths_do_not_make_wg1_nested() {
        // wg2's transport rides inside wg0, more recently than wg1's own
        // direct packets: wg1's verdict comes from wg1's slot only.
        let peer = wg1_report(
            &[path(C0, WG1, MARK, 100), path(WG0, WG2, 0, 500), received(C0, WG1, 7), received(WG0, WG1, 2)],
            &[],
            &LabRouting,
        );
        let transport = peer.transport.unwrap();
        assert_eq!(transport.egress_interface, "c0");
        assert_eq!((transport.packets, transport.bytes), (Some(10), Some(1280)));
        assert_eq!((transport.received_packets, transport.received_bytes), (Some(7), Some(700)), "busiest device");
        assert!(peer.nested_in.is_none());
    }

    #[test]
    fn no_packets_no_verdict() {
        let peer = wg1_report(&[], &[], &LabRouting);
        assert!(peer.transport.is_none() && peer.nested_in.is_none() && peer.fix.is_none());
    }

    #[test]
    fn a_fix_that_would_not_bypass_is_not_suggested() {
        let peer = wg1_report(&[path(WG0, WG1, 0, 100)], &[], &EverythingIntoWg0);
        assert_eq!(peer.nested_in.as_deref(), Some("wg0"));
        assert!(peer.fix.is_none() && peer.fix_details.is_none());
        assert_eq!(peer.transport.unwrap().route_table, Some(MARK), "table from the kernel when no lookup was seen");
    }

    #[test]
    fn deliberate_nesting_and_chains() {
        let paths: HashMap<_, _> = [path(WG0, WG1, 0, 100), path(WG1, WG2, 0, 100)].into_iter().collect();
        let seen = Observations { paths: &paths, routes: &HashMap::new(), slot: &slot_of_tunnel };
        let reports = correlate(&topology(), &seen, &LabRouting);
        let wg2 = &reports.iter().find(|t| t.interface == "wg2").unwrap().peers[0];
        assert_eq!(wg2.nested_in.as_deref(), Some("wg1"));
        assert_eq!(wg2.nesting, Some(Nesting::Deliberate));
        assert_eq!(wg2.chain, ["wg1", "wg0"]);
        assert!(wg2.fix.is_none(), "deliberate nesting needs no fix");
        let wg0 = &reports.iter().find(|t| t.interface == "wg0").unwrap().peers[0];
        assert!(wg0.transport.is_none() && wg0.chain.is_empty());
    }

    #[test]
    fn lookups_are_totalled_per_mark_and_table() {
        let routes: HashMap<_, _> = [lookup(254, 0, C0, 1), lookup(MARK, 0, WG0, 1)].into_iter().collect();
        assert_eq!(lookups_by_mark_and_table(&routes), vec![(0, 254, 5), (0, MARK, 5)]);
    }
}
