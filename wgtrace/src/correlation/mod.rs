//! From packets (or the kernel's routing) to verdicts: which tunnel each
//! transport flow belongs to, where it really leaves, whether that is inside
//! another tunnel or itself, why, and the verified fix.
//!
//! A path belongs to a peer by the tunnel's own socket: the kernel side
//! counts only packets between a tunnel's socket's namespace and listen
//! port and a known endpoint, under the peer's slot number (see
//! `probes::peers`), so everything here is keyed by topology, never by what
//! a sender picked. A path's devices, routes and rules are those of the
//! socket's namespace (`Topology::transport_netns`): the interface's own,
//! or for a kernel interface moved after creation, its birth namespace.
//!
//! `run` learns a path from packets ([`correlate`]), `check` from
//! RTM_GETROUTE ([`predict`]); both hand it to the same judge
//! ([`verdict::judge`]), the same loop and chain resolution and the same
//! findings, so the two commands cannot disagree about one path.
//!
//! * [`path`]: what the first egress device is (path model).
//! * [`verdict`]: direct / nested / loop / unseen / unroutable, explanations, findings, MTU.
//! * [`fix`]: the remedy per cause, each verified with RTM_GETROUTE.
//! * [`manager`]: who manages a tunnel (wg-quick, NetworkManager, ...).

pub mod findings;
pub mod fix;
pub mod manager;
pub mod path;
pub mod verdict;

use std::{
    cell::RefCell,
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::Result;
use serde::Serialize;
use wgtrace_common::{DIR_EGRESS, DIR_INGRESS, PathKey, PathStats, RouteKey, RouteStats};

pub use findings::{Finding, Severity};
pub use fix::{Fix, FixKind};
pub use manager::Manager;
pub use path::{Outer, OuterKind};
pub use verdict::{Nesting, PathFacts, Verdict};

use crate::latency::{NestingCost, PeerLatency};
use crate::topology::{
    Implementation, Topology, Tunnel,
    netlink::{FR_ACT_TO_TBL, RouteAnswer, Rule, TableRoute, UdpQuery},
};

/// Asks the kernel where a packet would go; the live implementation is
/// [`Topology::route_get`], tests substitute their own routing tables.
pub trait RouteOracle {
    fn route_get(&self, netns: u64, query: UdpQuery) -> Result<RouteAnswer>;
    /// Every route of `table` (a dump): what a rule that looks it up finds.
    fn table_routes(&self, netns: u64, family: u8, table: u32) -> Result<Vec<TableRoute>>;
}

impl RouteOracle for Topology {
    fn route_get(&self, netns: u64, query: UdpQuery) -> Result<RouteAnswer> {
        Topology::route_get(self, netns, query)
    }
    fn table_routes(&self, netns: u64, family: u8, table: u32) -> Result<Vec<TableRoute>> {
        Topology::table_routes(self, netns, family, table)
    }
}

/// Answers kept per topology fingerprint (and for at most `MAX_AGE`, since
/// routes are not part of the fingerprint): a report every second asks the
/// kernel again only when something changed.
pub struct RouteCache {
    fingerprint: u64,
    since: Instant,
    routes: RefCell<HashMap<(u64, UdpQuery), Option<RouteAnswer>>>,
    tables: RefCell<HashMap<TableKey, Option<Vec<TableRoute>>>>,
}

/// (netns, family, table).
type TableKey = (u64, u8, u32);

const MAX_AGE: Duration = Duration::from_secs(10);

impl Default for RouteCache {
    fn default() -> Self {
        Self { fingerprint: 0, since: Instant::now(), routes: RefCell::default(), tables: RefCell::default() }
    }
}

impl RouteCache {
    /// Forgets everything when the topology changed or the answers aged.
    pub fn refresh(&mut self, topology: &Topology) {
        let fingerprint = topology.fingerprint();
        if fingerprint != self.fingerprint || self.since.elapsed() > MAX_AGE {
            *self = Self { fingerprint, ..Self::default() };
        }
    }

    pub fn oracle<'a>(&'a self, topology: &'a Topology) -> Cached<'a> {
        Cached { cache: self, inner: topology }
    }
}

pub struct Cached<'a> {
    cache: &'a RouteCache,
    inner: &'a dyn RouteOracle,
}

impl RouteOracle for Cached<'_> {
    fn route_get(&self, netns: u64, query: UdpQuery) -> Result<RouteAnswer> {
        if let Some(answer) = self.cache.routes.borrow().get(&(netns, query)) {
            return answer.clone().ok_or_else(|| anyhow::anyhow!("no route (cached answer)"));
        }
        let answer = self.inner.route_get(netns, query);
        self.cache.routes.borrow_mut().insert((netns, query), answer.as_ref().ok().cloned());
        answer
    }
    fn table_routes(&self, netns: u64, family: u8, table: u32) -> Result<Vec<TableRoute>> {
        if let Some(routes) = self.cache.tables.borrow().get(&(netns, family, table)) {
            return routes.clone().ok_or_else(|| anyhow::anyhow!("table unreadable (cached answer)"));
        }
        let routes = self.inner.table_routes(netns, family, table);
        self.cache.tables.borrow_mut().insert((netns, family, table), routes.as_ref().ok().cloned());
        routes
    }
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Transport {
    /// Device the encrypted packets leave through first (a bond or bridge
    /// port is shown as its master).
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
    /// Of `packets`, those the kernel fragmented on the way out (IPv4):
    /// the path's MTU is smaller than the tunnel's packets.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fragmented_packets: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub received_packets: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub received_bytes: Option<u64>,
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
    pub verdict: Verdict,
    /// The device this one's transport rides inside, WireGuard or not.
    pub outer: Option<Outer>,
    /// `outer.interface`.
    pub nested_in: Option<String>,
    pub nesting: Option<Nesting>,
    /// Outer tunnels from the innermost out, e.g. [wg1, wg0] for wg2.
    pub chain: Vec<String>,
    /// The tunnels whose transports capture each other, this one first, or
    /// null when the transport does not come back into its own tunnel.
    #[serde(rename = "loop")]
    pub loop_members: Option<Vec<String>>,
    /// A one-line summary of the fix, or null.
    pub fix: Option<String>,
    pub fix_details: Option<Fix>,
    pub explanation: Option<String>,
    /// Filled in by [`crate::report::join_latency`].
    pub latency: Option<PeerLatency>,
    /// For a nested peer: what riding inside the outer tunnel costs.
    pub nesting_cost: Option<NestingCost>,
}

#[derive(Clone, Debug, Serialize)]
pub struct TunnelReport {
    pub interface: String,
    pub netns: String,
    pub netns_inode: u64,
    /// The namespace whose routing carries the encrypted transport: `netns`,
    /// except for a kernel interface moved out of the namespace it was
    /// created in, whose socket stayed there.
    pub transport_netns: String,
    #[serde(skip)]
    pub transport_netns_inode: u64,
    pub ifindex: u32,
    pub implementation: Implementation,
    /// netlink, uapi, or packets (a speaker without a UAPI).
    pub discovered_by: crate::topology::DiscoveredBy,
    /// The TUN holder of a userspace tunnel.
    pub process: Option<crate::topology::Process>,
    pub fwmark: Option<u32>,
    pub listen_port: Option<u16>,
    /// wg-quick, networkmanager, systemd-networkd, tailscale, mullvad, or null.
    pub manager: Option<Manager>,
    pub mtu: Option<u32>,
    pub peers: Vec<PeerReport>,
    /// The same `{severity, kind, message}` findings in `run` and `check`.
    pub findings: Vec<Finding>,
}

/// Everything the kernel side recorded, as read from its maps.
pub struct Observations<'a> {
    pub paths: &'a HashMap<PathKey, PathStats>,
    pub routes: &'a HashMap<RouteKey, RouteStats>,
    /// The slot the kernel side counts a peer under: (tunnel namespace,
    /// tunnel ifindex, public key) to slot.
    pub slot: &'a dyn Fn(u64, u32, &str) -> Option<u32>,
}

fn tunnel_report(topology: &Topology, tunnel: &Tunnel, peers: Vec<PeerReport>) -> TunnelReport {
    TunnelReport {
        interface: tunnel.interface.clone(),
        netns: tunnel.netns_label.clone(),
        netns_inode: tunnel.netns,
        transport_netns: topology.netns_label(topology.transport_netns(tunnel)),
        transport_netns_inode: topology.transport_netns(tunnel),
        ifindex: tunnel.ifindex,
        implementation: tunnel.implementation.clone(),
        discovered_by: tunnel.discovered_by,
        process: tunnel.process.clone(),
        fwmark: tunnel.device.as_ref().map(|d| d.fwmark),
        listen_port: tunnel.device.as_ref().map(|d| d.listen_port),
        manager: manager::recognise(topology, tunnel),
        mtu: path::link(topology, tunnel.netns, tunnel.ifindex).map(|l| l.mtu).filter(|m| *m > 0),
        peers,
        findings: Vec::new(),
    }
}

/// `run`: verdicts from the paths packets were seen to take. Tunnels whose
/// configuration could not be read are listed too, without peers.
pub fn correlate(topology: &Topology, seen: &Observations, oracle: &dyn RouteOracle) -> Vec<TunnelReport> {
    judge_all(topology, oracle, |_| true, |tunnel, peer| observed_path(topology, tunnel, peer, seen, oracle))
}

/// `check`: verdicts from where the kernel says each transport would go
/// (unreadable tunnels are `check`'s own findings).
pub fn predict(topology: &Topology, oracle: &dyn RouteOracle) -> Vec<TunnelReport> {
    judge_all(
        topology,
        oracle,
        |tunnel| tunnel.device.is_some(),
        |tunnel, peer| predicted_path(topology, tunnel, peer, oracle),
    )
}

/// The one judge behind `run` and `check`: each listed tunnel's peers are
/// judged from `facts`, then loops and chains are resolved across tunnels.
fn judge_all(
    topology: &Topology,
    oracle: &dyn RouteOracle,
    listed: impl Fn(&Tunnel) -> bool,
    facts: impl Fn(&Tunnel, &crate::topology::Peer) -> PathFacts,
) -> Vec<TunnelReport> {
    let mut reports: Vec<TunnelReport> = topology
        .tunnels
        .iter()
        .filter(|tunnel| listed(tunnel))
        .map(|tunnel| {
            let peers = tunnel
                .device
                .iter()
                .flat_map(|d| &d.peers)
                .map(|peer| verdict::judge(topology, tunnel, peer, facts(tunnel, peer), oracle))
                .collect();
            tunnel_report(topology, tunnel, peers)
        })
        .collect();
    verdict::resolve(topology, &mut reports, oracle);
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
        verdict: Verdict::Unseen,
        outer: None,
        nested_in: None,
        nesting: None,
        chain: Vec::new(),
        loop_members: None,
        fix: None,
        fix_details: None,
        explanation: None,
        latency: None,
        nesting_cost: None,
    }
}

fn query_for(tunnel: &Tunnel, endpoint: SocketAddr, mark: u32) -> Option<UdpQuery> {
    let device = tunnel.device.as_ref()?;
    Some(UdpQuery {
        destination: endpoint.ip(),
        source_port: device.listen_port,
        destination_port: endpoint.port(),
        mark,
    })
}

/// The path `check` predicts: RTM_GETROUTE with the tunnel's mark and ports.
fn predicted_path(
    topology: &Topology,
    tunnel: &Tunnel,
    peer: &crate::topology::Peer,
    oracle: &dyn RouteOracle,
) -> PathFacts {
    let (Some(device), Some(endpoint)) = (tunnel.device.as_ref(), peer.endpoint) else { return PathFacts::None };
    let Some(query) = query_for(tunnel, endpoint, device.fwmark) else { return PathFacts::None };
    let netns = topology.transport_netns(tunnel);
    let answer = match oracle.route_get(netns, query) {
        Ok(answer) => answer,
        Err(err) => return PathFacts::Unroutable { query, error: format!("{err:#}") },
    };
    let Some(oif) = answer.oif else {
        return PathFacts::Unroutable { query, error: "the route has no output device".into() };
    };
    let rule = answer
        .table
        .and_then(|table| deciding_rule_in(topology, netns, query.mark, endpoint.ip(), table, Some(answer.prefix_len)));
    let egress = path::configured_device(topology, netns, oif);
    PathFacts::Path {
        query,
        egress_ifindex: egress,
        transport: Transport {
            egress_interface: interface_name(topology, netns, egress),
            mark: query.mark,
            route_table: answer.table,
            rule: rule.map(Rule::describe),
            packets: None,
            bytes: None,
            fragmented_packets: None,
            received_packets: None,
            received_bytes: None,
        },
        rule_priority: rule.map(|r| r.priority),
        routed_ifindex: Some(oif),
    }
}

/// The path `run` saw: the newest egress path of the peer's slot, with
/// stacked underlay devices collapsed to the top one.
fn observed_path(
    topology: &Topology,
    tunnel: &Tunnel,
    peer: &crate::topology::Peer,
    seen: &Observations,
    oracle: &dyn RouteOracle,
) -> PathFacts {
    let (Some(_), Some(endpoint)) = (tunnel.device.as_ref(), peer.endpoint) else { return PathFacts::None };
    let Some(slot) = (seen.slot)(tunnel.netns, tunnel.ifindex, &peer.public_key) else { return PathFacts::None };
    // The devices packets were seen on are in the socket's namespace.
    let netns = topology.transport_netns(tunnel);
    let ours = |key: &PathKey, direction: u8| key.peer == slot && key.direction == direction;
    let egress: Vec<(&PathKey, &PathStats)> = seen.paths.iter().filter(|(key, _)| ours(key, DIR_EGRESS)).collect();
    // The current path is the one seen last: after a fix, old paths linger
    // in the maps but stop being updated. A packet leaving through a VLAN
    // on a bond is also seen on the bond and its port; those lower devices
    // are not where it was routed.
    let Some((current, _)) = egress
        .iter()
        .filter(|(key, stats)| {
            !egress.iter().any(|(other, other_stats)| {
                other.mark == key.mark
                    && other_stats.last_seen_ns + 1_000_000_000 >= stats.last_seen_ns
                    && path::is_below(topology, netns, key.ifindex, other.ifindex)
            })
        })
        // Stamps are good to the kernel side's coarse clock (50 ms): two
        // paths seen within one tick tie, and a tie is broken the same way
        // in every report, whatever order the map was read in.
        .max_by_key(|(key, stats)| (stats.last_seen_ns, key.ifindex, key.mark))
        .copied()
    else {
        return PathFacts::None;
    };
    let (packets, bytes, fragmented) = egress
        .iter()
        .filter(|(key, _)| key.ifindex == current.ifindex && key.mark == current.mark)
        .fold((0, 0, 0), |(p, b, f), (_, s)| (p + s.packets, b + s.bytes, f + s.fragmented));
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
    let Some(query) = query_for(tunnel, endpoint, current.mark) else { return PathFacts::None };
    let kernel_answer = oracle.route_get(netns, query).ok();
    let routed_ifindex = kernel_answer.as_ref().and_then(|a| a.oif);
    let route_table = observed_table(seen.routes, slot, current).or(kernel_answer.as_ref().and_then(|a| a.table));
    let rule = route_table.and_then(|table| {
        deciding_rule_in(topology, netns, current.mark, endpoint.ip(), table, kernel_answer.map(|a| a.prefix_len))
    });
    let egress_ifindex = path::configured_device(topology, netns, current.ifindex);
    PathFacts::Path {
        query,
        egress_ifindex,
        transport: Transport {
            egress_interface: interface_name(topology, netns, egress_ifindex),
            mark: current.mark,
            route_table,
            rule: rule.map(Rule::describe),
            packets: Some(packets),
            bytes: Some(bytes),
            fragmented_packets: Some(fragmented),
            received_packets: Some(received_packets),
            received_bytes: Some(received_bytes),
        },
        rule_priority: rule.map(|r| r.priority),
        routed_ifindex,
    }
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
        .max_by_key(|(key, stats)| (stats.last_seen_ns, key.table))
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
mod tests;
