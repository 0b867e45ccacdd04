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
    (key, PathStats { packets: 10, bytes: 1280, last_seen_ns, fragmented: 0 })
}

fn received(ifindex: u32, tunnel: u32, packets: u64) -> (PathKey, PathStats) {
    let key = PathKey { peer: tunnel, ifindex, mark: 0, direction: DIR_INGRESS, _pad: [0; 3] };
    (key, PathStats { packets, bytes: packets * 100, last_seen_ns: 1, fragmented: 0 })
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
fn paths_seen_within_one_clock_tick_give_the_same_verdict_whatever_the_read_order() {
    // The kernel side stamps paths with a coarse clock: the broken and the
    // fixed path of one moment tie. Every order of reading must agree.
    let tied = [path(WG0, WG1, 0, 100), path(C0, WG1, MARK, 100)];
    let routes = [lookup(MARK, 0, WG0, 100), lookup(254, MARK, C0, 100), lookup(253, MARK, C0, 100)];
    let first = wg1_report(&tied, &routes, &lab_routing());
    let first = first.transport.unwrap();
    for _ in 0..20 {
        // Each HashMap built in wg1_report has a seed of its own.
        let transport = wg1_report(&[tied[1], tied[0]], &routes, &lab_routing()).transport.unwrap();
        assert_eq!(
            (transport.egress_interface.as_str(), transport.mark, transport.route_table),
            (first.egress_interface.as_str(), first.mark, first.route_table)
        );
    }
}

#[test]
fn marked_but_still_nested_gets_its_endpoint_set_again_not_another_rule() {
    // wg1 got the mark, so routing sends it out via c0, but wireguard-go
    // still sends from the source it last received on, inside wg0.
    let peer = wg1_report(&[path(WG0, WG1, 0, 100), path(WG0, WG1, MARK, 200)], &[], &lab_routing());
    assert_eq!(peer.nested_in.as_deref(), Some("wg0"));
    assert_eq!(peer.transport.as_ref().unwrap().mark, MARK);
    let explanation = peer.explanation.unwrap();
    assert!(explanation.contains("routing already sends them out via c0"), "{explanation}");
    let fix = peer.fix_details.unwrap();
    assert_eq!(fix.kind, FixKind::ResetEndpoint);
    assert_eq!((fix.verified_egress_interface.as_str(), fix.verified_route_table), ("c0", Some(254)));
    assert_eq!(fix.commands, ["wg set wg1 peer wg1-peer endpoint 192.0.2.200:51821"]);
    assert_eq!(fix.how, fix.commands[0]);
    // Without the mark, routing itself leads into wg0: a mark is the fix.
    let peer = wg1_report(&[path(WG0, WG1, 0, 100)], &[], &lab_routing());
    assert_eq!(peer.fix_details.unwrap().kind, FixKind::Mark);
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

// Shapes beyond the seed's: each judged from packets (`correlate`, as
// `run`) and from the kernel's routing (`predict`, as `check`), which must
// agree.

const WG4: u32 = 6;
const TUN0: u32 = 7;
const TS0: u32 = 8;
const VLAN10: u32 = 9;

fn peer_of<'a>(reports: &'a [TunnelReport], interface: &str) -> &'a PeerReport {
    &reports.iter().find(|t| t.interface == interface).unwrap().peers[0]
}

/// `run`'s verdicts when each tunnel's transport was seen leaving where the
/// kernel routes it.
fn seen_as_routed(topology: &Topology, kernel: &FakeKernel) -> Vec<TunnelReport> {
    let paths: HashMap<_, _> = topology
        .tunnels
        .iter()
        .map(|t| {
            let device = t.device.as_ref().unwrap();
            let endpoint = device.peers[0].endpoint.unwrap();
            let query = UdpQuery {
                destination: endpoint.ip(),
                source_port: device.listen_port,
                destination_port: endpoint.port(),
                mark: device.fwmark,
            };
            let oif = kernel.route_get(NS, query).unwrap().oif.unwrap();
            path(oif, t.ifindex, device.fwmark, 100)
        })
        .collect();
    let seen = Observations { paths: &paths, routes: &HashMap::new(), slot: &slot_of_tunnel };
    correlate(topology, &seen, kernel)
}

fn both(topology: &Topology, kernel: &FakeKernel) -> [Vec<TunnelReport>; 2] {
    [seen_as_routed(topology, kernel), predict(topology, kernel)]
}

fn kinds(reports: &[TunnelReport], interface: &str) -> Vec<&'static str> {
    reports.iter().find(|t| t.interface == interface).unwrap().findings.iter().map(|f| f.kind).collect()
}

#[test]
fn a_tunnel_that_lost_its_own_mark_loops_into_itself() {
    let mut topology = topology();
    topology.tunnels[0].device.as_mut().unwrap().fwmark = 0;
    let kernel = FakeKernel::new(&topology, &[(254, lab_table(254)), (MARK, lab_table(MARK))]);
    for reports in both(&topology, &kernel) {
        let wg0 = peer_of(&reports, "wg0");
        assert_eq!(wg0.verdict, Verdict::Loop, "{wg0:#?}");
        assert_eq!(wg0.loop_members.as_deref(), Some(&["wg0".to_owned()][..]));
        assert!(wg0.nested_in.is_none(), "a loop is not nesting in another tunnel");
        assert!(wg0.explanation.as_ref().unwrap().contains("lost its own mark 0xca6c"), "{wg0:#?}");
        let fix = wg0.fix_details.as_ref().unwrap();
        assert_eq!((fix.kind, fix.mark, fix.verified_egress_interface.as_str()), (FixKind::RestoreMark, MARK, "c0"));
        assert_eq!(kinds(&reports, "wg0"), ["loop"]);
        assert_eq!(reports[0].findings[0].severity, Severity::Error);
    }
}

/// Two wg-quick full tunnels: wg4 came up second (mark = table 51821, its
/// rules at 32762/32763 above wg0's).
fn two_full_tunnels() -> (Topology, FakeKernel) {
    let mut topology = topology();
    topology.tunnels.push(tunnel("wg4", WG4, 51824, 51821, "192.0.2.201:51824", &["0.0.0.0/0"]));
    let ns = topology.namespaces.get_mut(&NS).unwrap();
    ns.links.push(Link { index: WG4, name: "wg4".into(), mtu: 1420, ..Link::default() });
    ns.rules_v4.splice(1..1, [rule(32762, 254, None, false, Some(0)), rule(32763, 51821, Some(51821), true, None)]);
    let kernel = FakeKernel::new(
        &topology,
        &[(254, lab_table(254)), (MARK, lab_table(MARK)), (51821, vec![route(51821, "0.0.0.0", 0, WG4)])],
    );
    (topology, kernel)
}

#[test]
fn two_full_tunnels_capture_each_other_and_the_loop_names_both() {
    let (topology, kernel) = two_full_tunnels();
    for reports in both(&topology, &kernel) {
        let wg0 = peer_of(&reports, "wg0");
        let wg4 = peer_of(&reports, "wg4");
        assert_eq!((wg0.verdict, wg4.verdict), (Verdict::Loop, Verdict::Loop), "{wg0:#?} {wg4:#?}");
        assert_eq!(wg0.loop_members.as_deref().unwrap(), ["wg0", "wg4"]);
        assert_eq!(wg4.loop_members.as_deref().unwrap(), ["wg4", "wg0"]);
        assert!(wg0.explanation.as_ref().unwrap().contains("only one may own the default route"));
        let fix = wg0.fix_details.as_ref().unwrap();
        assert_eq!(fix.kind, FixKind::OneDefaultRoute);
        assert_eq!(fix.commands, ["ip rule add fwmark 51820 lookup main priority 32762"]);
        assert_eq!(fix.verified_egress_interface, "c0");
        assert!(
            fix.wg_quick.contains("PostUp = ip rule add fwmark 51820 lookup main priority 32762"),
            "{}",
            fix.wg_quick
        );
        assert_eq!(kinds(&reports, "wg0"), ["loop"]);
        // wg1 rides inside the loop: nested, with a chain that ends.
        let wg1 = peer_of(&reports, "wg1");
        assert_eq!(wg1.verdict, Verdict::Nested);
        assert_eq!(wg1.chain, ["wg4", "wg0"]);
    }
}

#[test]
fn a_wireguard_tunnel_inside_an_openvpn_style_tun_device_is_nested_and_gets_a_rule_and_table() {
    let mut topology = topology();
    topology.tunnels.retain(|t| t.interface == "wg1");
    let ns = topology.namespaces.get_mut(&NS).unwrap();
    ns.links.push(Link {
        index: TUN0,
        name: "tun0".into(),
        kind: Some("tun".into()),
        mtu: 1500,
        hardware_type: 65534,
        ..Link::default()
    });
    ns.rules_v4 = vec![rule(0, 255, None, false, None), rule(32766, 254, None, false, None)];
    topology.tun_holders.insert((NS, "tun0".into()), (812, "openvpn".into()));
    let mut main = lab_table(254);
    main.push(route(254, "0.0.0.0", 1, TUN0));
    main.push(route(254, "128.0.0.0", 1, TUN0));
    main[0].gateway = Some("192.0.2.1".parse().unwrap());
    let kernel = FakeKernel::new(&topology, &[(254, main)]);
    for reports in both(&topology, &kernel) {
        let wg1 = peer_of(&reports, "wg1");
        assert_eq!(wg1.verdict, Verdict::Nested, "{wg1:#?}");
        assert_eq!(wg1.nested_in.as_deref(), Some("tun0"));
        let outer = wg1.outer.as_ref().unwrap();
        assert_eq!((outer.kind, outer.owner.as_deref()), (OuterKind::Tun, Some("openvpn (pid 812)")));
        assert_eq!(wg1.nesting, Some(Nesting::Accidental));
        assert!(wg1.explanation.as_ref().unwrap().contains("`def1` routes"), "{wg1:#?}");
        let fix = wg1.fix_details.as_ref().unwrap();
        assert_eq!(fix.kind, FixKind::MarkAndRule);
        assert_eq!(
            fix.commands,
            [
                "wg set wg1 fwmark 51821",
                "ip route add default via 192.0.2.1 dev c0 table 51999",
                "ip rule add fwmark 51821 lookup 51999 priority 32765"
            ]
        );
        assert_eq!(fix.verified_egress_interface, "c0");
        assert_eq!(kinds(&reports, "wg1"), ["nested"]);
    }
}

#[test]
fn a_manager_owned_mark_gets_a_rule_above_the_capturing_one_not_a_new_mark() {
    let mut topology = topology();
    topology.tunnels.retain(|t| t.interface == "wg0");
    topology.tunnels.push(tunnel("ts0", TS0, 41641, 0x80000, "192.0.2.202:41641", &["100.64.0.0/10"]));
    let ns = topology.namespaces.get_mut(&NS).unwrap();
    ns.links.push(Link { index: TS0, name: "ts0".into(), mtu: 1280, ..Link::default() });
    let tailscale =
        |priority, table| Rule { fwmask: Some(0xff0000), ..rule(priority, table, Some(0x80000), false, None) };
    ns.rules_v4 = vec![
        rule(0, 255, None, false, None),
        rule(5208, 254, None, false, Some(0)),
        rule(5209, MARK, Some(MARK), true, None),
        tailscale(5210, 254),
        tailscale(5230, 253),
        rule(5270, 52, None, false, None),
        rule(32766, 254, None, false, None),
    ];
    let kernel = FakeKernel::new(&topology, &[(254, lab_table(254)), (MARK, lab_table(MARK))]);
    for reports in both(&topology, &kernel) {
        let ts0 = peer_of(&reports, "ts0");
        assert_eq!(reports.iter().find(|t| t.interface == "ts0").unwrap().manager, Some(Manager::Tailscale));
        assert_eq!((ts0.verdict, ts0.nested_in.as_deref()), (Verdict::Nested, Some("wg0")), "{ts0:#?}");
        let fix = ts0.fix_details.as_ref().unwrap();
        assert_eq!(fix.kind, FixKind::Rule, "{fix:#?}");
        assert_eq!(fix.commands, ["ip rule add fwmark 0x80000/0xff0000 lookup main priority 5208"]);
        assert!(fix.how.contains("bring wg0 up before ts0"), "{}", fix.how);
        assert!(!ts0.fix.as_ref().unwrap().contains("FwMark"), "no new mark for a manager that owns it");
        assert!(ts0.explanation.as_ref().unwrap().contains("belongs to Tailscale"));
        assert_eq!(peer_of(&reports, "wg0").verdict, Verdict::Direct);
    }
}

#[test]
fn an_inner_mtu_that_does_not_fit_is_a_finding_with_the_mtu_that_fits() {
    let topology = topology();
    for reports in both(&topology, &lab_routing()) {
        let wg1 = reports.iter().find(|t| t.interface == "wg1").unwrap();
        let mtu = wg1.findings.iter().find(|f| f.kind == "mtu").expect("an mtu finding");
        assert!(mtu.message.contains("1480-byte") && mtu.message.contains("Set MTU = 1360 on wg1"), "{}", mtu.message);
        assert_eq!(kinds(&reports, "wg1"), ["nested", "mtu"]);
    }
    let mut fits = topology.clone();
    fits.namespaces.get_mut(&NS).unwrap().links.iter_mut().find(|l| l.index == WG1).unwrap().mtu = 1360;
    let reports = predict(&fits, &lab_routing());
    assert_eq!(kinds(&reports, "wg1"), ["nested"], "1360 + 60 fits 1420");
}

#[test]
fn stacked_underlay_devices_do_not_change_the_verdict() {
    // wg1 fixed (mark 51820) leaving through vlan10 on c0: packets are seen
    // on both; the verdict names vlan10 and stays direct.
    let mut topology = topology();
    topology.tunnels[1].device.as_mut().unwrap().fwmark = MARK;
    let ns = topology.namespaces.get_mut(&NS).unwrap();
    ns.links.push(Link {
        index: VLAN10,
        name: "vlan10".into(),
        kind: Some("vlan".into()),
        parent: Some(C0),
        ..Link::default()
    });
    let paths: HashMap<_, _> = [path(VLAN10, WG1, MARK, 100), path(C0, WG1, MARK, 101)].into_iter().collect();
    let seen = Observations { paths: &paths, routes: &HashMap::new(), slot: &slot_of_tunnel };
    let reports = correlate(&topology, &seen, &lab_routing());
    let wg1 = peer_of(&reports, "wg1");
    assert_eq!(wg1.verdict, Verdict::Direct);
    assert_eq!(wg1.transport.as_ref().unwrap().egress_interface, "vlan10");
    // A bond port is shown as its bond.
    let ns = topology.namespaces.get_mut(&NS).unwrap();
    ns.links.iter_mut().find(|l| l.index == C0).unwrap().master = Some(VLAN10);
    let paths: HashMap<_, _> = [path(C0, WG1, MARK, 100)].into_iter().collect();
    let seen = Observations { paths: &paths, routes: &HashMap::new(), slot: &slot_of_tunnel };
    let reports = correlate(&topology, &seen, &lab_routing());
    assert_eq!(peer_of(&reports, "wg1").transport.as_ref().unwrap().egress_interface, "vlan10");
}

#[test]
fn the_route_cache_asks_once_per_fingerprint() {
    use std::cell::Cell;
    struct Counting<'a>(FakeKernel, &'a Cell<u32>);
    impl RouteOracle for Counting<'_> {
        fn route_get(&self, netns: u64, query: UdpQuery) -> Result<RouteAnswer> {
            self.1.set(self.1.get() + 1);
            self.0.route_get(netns, query)
        }
        fn table_routes(&self, netns: u64, family: u8, table: u32) -> Result<Vec<TableRoute>> {
            self.1.set(self.1.get() + 1);
            self.0.table_routes(netns, family, table)
        }
    }
    let topology = topology();
    let asked = Cell::new(0);
    let kernel = Counting(lab_routing(), &asked);
    let mut cache = RouteCache::default();
    cache.refresh(&topology);
    let cached = Cached { cache: &cache, inner: &kernel };
    let first = predict(&topology, &cached);
    let after_first = asked.get();
    let second = predict(&topology, &cached);
    assert!(after_first > 0);
    assert_eq!(asked.get(), after_first, "the second report asked the kernel nothing");
    assert_eq!(peer_of(&first, "wg1").fix, peer_of(&second, "wg1").fix);
}

/// A kernel interface created in the client namespace and moved to
/// another: its socket, and so its routing, stayed in the client.
mod moved {
    use super::*;

    const INNER: u64 = 4026532999;
    const WGM: u32 = 9;

    fn moved_topology(follow_the_socket: bool) -> Topology {
        let mut topology = topology();
        let mut wgm = tunnel("wgm", WGM, 51830, 0, "198.51.100.77:51831", &["10.77.0.0/24"]);
        wgm.netns = INNER;
        wgm.netns_label = "inner".into();
        wgm.implementation = Implementation::Kernel;
        topology.tunnels.push(wgm);
        let link = |index, name: &str| Link { index, name: name.into(), mtu: 1420, ..Link::default() };
        topology.namespaces.insert(
            INNER,
            Namespace { label: "inner".into(), links: vec![link(LO, "lo"), link(WGM, "wgm")], ..Namespace::default() },
        );
        if follow_the_socket {
            topology.transport_netns.insert((INNER, WGM), NS);
        }
        topology
    }

    /// The lab client's routing, and nothing at all in the inner namespace
    /// (only the interface and its own subnet are there).
    struct ClientOnly(FakeKernel);

    impl RouteOracle for ClientOnly {
        fn route_get(&self, netns: u64, query: UdpQuery) -> Result<RouteAnswer> {
            anyhow::ensure!(netns == NS, "Network is unreachable (asked in {netns})");
            self.0.route_get(netns, query)
        }
        fn table_routes(&self, netns: u64, family: u8, table: u32) -> Result<Vec<TableRoute>> {
            anyhow::ensure!(netns == NS, "no such table in {netns}");
            self.0.table_routes(netns, family, table)
        }
    }

    fn wgm(reports: Vec<TunnelReport>) -> TunnelReport {
        reports.into_iter().find(|t| t.interface == "wgm").unwrap()
    }

    #[test]
    fn check_asks_the_sockets_namespace_and_verifies_the_fix_there() {
        let oracle = ClientOnly(lab_routing());
        let report = wgm(predict(&moved_topology(true), &oracle));
        assert_eq!((report.netns.as_str(), report.transport_netns.as_str()), ("inner", "client"));
        let peer = &report.peers[0];
        // Unmarked, it takes wg0's table in the client: nested in wg0.
        assert_eq!(peer.verdict, Verdict::Nested, "{peer:?}");
        assert_eq!(peer.nested_in.as_deref(), Some("wg0"));
        assert_eq!(
            peer.transport.as_ref().unwrap().rule.as_deref(),
            Some("32765: not from all fwmark 0xca6c lookup 51820")
        );
        let fix = peer.fix_details.as_ref().unwrap();
        assert_eq!((fix.kind, fix.mark, fix.verified_egress_interface.as_str()), (FixKind::Mark, MARK, "c0"));
        // Judged in its own namespace, it would have no route at all.
        let unfollowed = wgm(predict(&moved_topology(false), &oracle));
        assert_eq!(unfollowed.peers[0].verdict, Verdict::Unroutable);
        assert_eq!(unfollowed.transport_netns, "inner");
    }

    #[test]
    fn run_names_the_device_in_the_sockets_namespace() {
        let oracle = ClientOnly(lab_routing());
        // Its slot is 42; its packets were seen leaving through the
        // client's c0 (ifindex 2, which in the inner namespace is nothing).
        let paths: HashMap<_, _> = [path(C0, 42, MARK, 100)].into();
        let routes = HashMap::new();
        let slot = |netns: u64, ifindex: u32, _: &str| (netns == INNER && ifindex == WGM).then_some(42);
        let seen = Observations { paths: &paths, routes: &routes, slot: &slot };
        let report = wgm(correlate(&moved_topology(true), &seen, &oracle));
        let peer = &report.peers[0];
        assert_eq!(peer.verdict, Verdict::Direct, "{peer:?}");
        let transport = peer.transport.as_ref().unwrap();
        assert_eq!((transport.egress_interface.as_str(), transport.route_table), ("c0", Some(254)));
        let unfollowed = wgm(correlate(&moved_topology(false), &seen, &oracle));
        assert_eq!(unfollowed.peers[0].transport.as_ref().unwrap().egress_interface, "ifindex 2");
    }

    #[test]
    fn a_new_rule_is_added_in_the_sockets_namespace() {
        // No mark escapes the client's table 51820 (no `not fwmark` rule):
        // the fix is a mark and a rule, and the rule belongs where the
        // socket is, the named client namespace (wgtrace runs elsewhere).
        let mut topology = moved_topology(true);
        topology.own_netns = 1;
        let client = topology.namespaces.get_mut(&NS).unwrap();
        client.handle = "/run/netns/client".into();
        client.rules_v4 = vec![
            rule(0, 255, None, false, None),
            rule(100, MARK, None, false, None),
            rule(32766, 254, None, false, None),
        ];
        let oracle = ClientOnly(FakeKernel::new(&topology, &[(254, lab_table(254)), (MARK, lab_table(MARK))]));
        let report = wgm(predict(&topology, &oracle));
        let fix = report.peers[0].fix_details.as_ref().unwrap();
        assert_eq!(fix.kind, FixKind::MarkAndRule);
        assert_eq!(fix.verified_egress_interface, "c0");
        assert_eq!(
            fix.commands,
            vec![
                "wg set wgm fwmark 51830".to_owned(),
                "ip -n client rule add fwmark 51830 lookup main priority 99".to_owned()
            ]
        );
        assert_eq!(fix.how, fix.commands.join("; "), "no manager: the commands are the form");
    }
}
