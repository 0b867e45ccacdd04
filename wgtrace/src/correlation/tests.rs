//! Correlation on recorded event sequences: the maps as the kernel side
//! leaves them, a topology as discovery returns it, and a routing oracle
//! standing in for RTM_GETROUTE.

use super::*;
use crate::topology::netlink::{RouteAnswer, TableRoute};
use crate::topology::{Device, Namespace, Peer, netlink::Link, prefix_contains};

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
    let link = |index, name: &str| Link { index, name: name.into(), mtu: 1420, ..Link::default() };
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
        ..Topology::default()
    }
}

fn route(table: u32, destination: &str, prefix_len: u8, oif: u32) -> TableRoute {
    TableRoute {
        destination: Some(destination.parse().unwrap()),
        prefix_len,
        table,
        oif: Some(oif),
        gateway: None,
        route_type: 1,
    }
}

/// The lab client's tables: main's default via c0 and wg1's /24, wg0's table.
fn lab_table(table: u32) -> Vec<TableRoute> {
    match table {
        254 => vec![route(254, "0.0.0.0", 0, C0), route(254, "203.0.113.0", 24, WG1)],
        MARK => vec![route(MARK, "0.0.0.0", 0, WG0)],
        _ => vec![],
    }
}

/// Policy routing as the kernel does it, over the topology's rules and
/// these tables: the first matching rule whose table has a route (and whose
/// answer is not suppressed) decides.
struct FakeKernel {
    rules: Vec<Rule>,
    tables: HashMap<u32, Vec<TableRoute>>,
}

impl FakeKernel {
    fn new(topology: &Topology, tables: &[(u32, Vec<TableRoute>)]) -> Self {
        Self { rules: topology.namespaces[&NS].rules_v4.clone(), tables: tables.iter().cloned().collect() }
    }
}

impl RouteOracle for FakeKernel {
    fn route_get(&self, _netns: u64, query: UdpQuery) -> Result<RouteAnswer> {
        for rule in
            self.rules.iter().filter(|r| r.action == FR_ACT_TO_TBL && r.matches(query.mark, None, query.destination))
        {
            let best = self
                .tables
                .get(&rule.table)
                .into_iter()
                .flatten()
                .filter(|r| prefix_contains(r.destination.unwrap(), r.prefix_len, query.destination))
                .max_by_key(|r| r.prefix_len);
            let Some(best) = best else { continue };
            if rule.suppress_prefixlen.is_some_and(|s| best.prefix_len as u32 <= s) {
                continue;
            }
            return Ok(RouteAnswer {
                oif: best.oif,
                prefix_len: best.prefix_len,
                table: Some(rule.table),
                gateway: None,
                prefsrc: None,
            });
        }
        anyhow::bail!("Network is unreachable")
    }
    fn table_routes(&self, _netns: u64, _family: u8, table: u32) -> Result<Vec<TableRoute>> {
        Ok(self.tables.get(&table).cloned().unwrap_or_default())
    }
}

/// Routing as the lab's client does it: the full tunnel's table for
/// everything unmarked, 203.0.113.0/24 via wg1, main otherwise.
fn lab_routing() -> FakeKernel {
    FakeKernel::new(&topology(), &[(254, lab_table(254)), (MARK, lab_table(MARK))])
}

/// Routing where no mark escapes wg0.
struct EverythingIntoWg0;

impl RouteOracle for EverythingIntoWg0 {
    fn route_get(&self, _netns: u64, _query: UdpQuery) -> Result<RouteAnswer> {
        Ok(RouteAnswer { oif: Some(WG0), prefix_len: 0, table: Some(MARK), gateway: None, prefsrc: None })
    }
    fn table_routes(&self, _netns: u64, _family: u8, table: u32) -> Result<Vec<TableRoute>> {
        // Every table leads into wg0.
        Ok(vec![route(table, "0.0.0.0", 0, WG0)])
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
        &lab_routing(),
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
        &lab_routing(),
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
        &lab_routing(),
    );
    let transport = peer.transport.unwrap();
    assert_eq!(transport.egress_interface, "c0");
    assert_eq!((transport.packets, transport.bytes), (Some(10), Some(1280)));
    assert_eq!((transport.received_packets, transport.received_bytes), (Some(7), Some(700)), "busiest device");
    assert!(peer.nested_in.is_none());
}

#[test]
fn no_packets_no_verdict() {
    let peer = wg1_report(&[], &[], &lab_routing());
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
    let reports = correlate(&topology(), &seen, &lab_routing());
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
