//! The remedy per cause, each verified with RTM_GETROUTE before it is shown
//! (a route question with the new mark, or a dump of the table a new rule
//! would look up), and written in the form of the manager owning the tunnel
//! being fixed. Routes and rules are those of the namespace the transport
//! is routed in (`Topology::transport_netns`).

use std::net::IpAddr;

use serde::Serialize;

use super::{RouteOracle, manager::Manager, path};
use crate::topology::{
    Topology, Tunnel,
    netlink::{AF_INET, AF_INET6, TableRoute, UdpQuery, table_name},
    prefix_contains,
};

const MAIN: u32 = 254;
/// RTN_UNICAST.
const UNICAST: u8 = 1;
/// The table a mark_and_rule fix creates when main itself leads into a
/// tunnel (OpenVPN's def1 routes live in main).
pub const BYPASS_TABLE: u32 = 51999;

#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FixKind {
    /// A mark an existing bypass rule honours.
    Mark,
    /// A new mark plus a rule (and table) whose route leaves physically.
    MarkAndRule,
    /// A rule above the capturing one for the mark the tunnel's manager owns.
    Rule,
    /// The tunnel lost its own mark: restore it.
    RestoreMark,
    /// Two full tunnels capture each other: only one may own the default route.
    OneDefaultRoute,
    /// The endpoint is inside the tunnel's own AllowedIPs.
    ExcludeEndpoint,
    /// Routing already sends the transport out physically, but the sender
    /// still uses the source (and device) it last received on: set the
    /// endpoint again so that it follows the route.
    ResetEndpoint,
}

impl FixKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mark => "mark",
            Self::MarkAndRule => "mark_and_rule",
            Self::Rule => "rule",
            Self::RestoreMark => "restore_mark",
            Self::OneDefaultRoute => "one_default_route",
            Self::ExcludeEndpoint => "exclude_endpoint",
            Self::ResetEndpoint => "reset_endpoint",
        }
    }
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Fix {
    pub kind: FixKind,
    /// The mark the transport should carry (for `rule`, the manager's mark).
    pub mark: u32,
    /// Where the kernel said the transport goes with the fix.
    pub verified_egress_interface: String,
    pub verified_route_table: Option<u32>,
    /// Whose form `how` is written in (the manager of the tunnel the fix is
    /// applied to), or null for plain commands.
    pub manager: Option<Manager>,
    /// The fix in that manager's form.
    pub how: String,
    /// The same as shell commands, to apply now.
    pub commands: Vec<String>,
    pub wg_quick: String,
    pub wg_set: String,
    pub systemd_networkd: String,
    pub network_manager: String,
}

impl Fix {
    /// One line for the `fix` key and the terminal.
    pub fn summary(&self, tunnel: &str, outer: Option<&str>) -> String {
        let around = outer.map(|o| format!(" so its transport bypasses {o}")).unwrap_or_default();
        let what = match self.kind {
            FixKind::Mark => format!("set FwMark = {} on {tunnel}{around}", self.mark),
            FixKind::MarkAndRule => {
                format!("mark {tunnel}'s transport {:#x} and route that mark physically{around}", self.mark)
            }
            FixKind::Rule => format!("add a rule for {tunnel}'s manager's mark above the capturing rule{around}"),
            FixKind::RestoreMark => format!("restore {tunnel}'s own mark {}", self.mark),
            FixKind::OneDefaultRoute => format!("let {tunnel}'s marked transport out through main{around}"),
            FixKind::ExcludeEndpoint => format!("route {tunnel}'s endpoint outside its own AllowedIPs"),
            FixKind::ResetEndpoint => {
                let out_of = outer.map(|o| format!(" out of {o}")).unwrap_or_default();
                format!("set {tunnel}'s endpoint again so that its transport follows its route{out_of}")
            }
        };
        format!(
            "{what} (verified: it would leave via {}); now: `{}`",
            self.verified_egress_interface,
            self.commands.join("; ")
        )
    }
}

/// The most specific unicast route of `table` for `destination` that leaves
/// through no tunnel: what a rule looking up `table` would use.
pub fn physical_route(
    topology: &Topology,
    oracle: &dyn RouteOracle,
    netns: u64,
    table: u32,
    destination: IpAddr,
) -> Option<TableRoute> {
    let family = if destination.is_ipv4() { AF_INET } else { AF_INET6 };
    let routes = oracle.table_routes(netns, family, table).ok()?;
    let best = routes
        .into_iter()
        .filter(|r| {
            let zero = if destination.is_ipv4() { IpAddr::from([0u8; 4]) } else { IpAddr::from([0u16; 8]) };
            prefix_contains(r.destination.unwrap_or(zero), r.prefix_len, destination)
        })
        .max_by_key(|r| r.prefix_len)?;
    (best.route_type == UNICAST && best.oif.is_some_and(|oif| !path::is_tunnel(topology, netns, oif))).then_some(best)
}

/// The physical default route of main (for a table of its own when main's
/// specific routes lead into a tunnel, as OpenVPN's def1 pair does).
fn physical_default(topology: &Topology, oracle: &dyn RouteOracle, netns: u64, v4: bool) -> Option<TableRoute> {
    let family = if v4 { AF_INET } else { AF_INET6 };
    oracle.table_routes(netns, family, MAIN).ok()?.into_iter().find(|r| {
        r.prefix_len == 0 && r.route_type == UNICAST && r.oif.is_some_and(|oif| !path::is_tunnel(topology, netns, oif))
    })
}

struct Forms {
    wg_quick: String,
    wg_set: String,
    systemd_networkd: String,
    network_manager: String,
}

fn mark_forms(name: &str, mark: u32) -> Forms {
    Forms {
        wg_quick: format!("FwMark = {mark}   # under [Interface] in {name}.conf"),
        wg_set: format!("wg set {name} fwmark {mark}"),
        systemd_networkd: format!("FirewallMark={mark}   # under [WireGuard] in the {name}.netdev file"),
        network_manager: format!("nmcli connection modify {name} wireguard.fwmark {mark}"),
    }
}

fn pick(forms: &Forms, manager: Option<Manager>) -> String {
    match manager {
        Some(Manager::WgQuick) => forms.wg_quick.clone(),
        Some(Manager::SystemdNetworkd) => forms.systemd_networkd.clone(),
        Some(Manager::NetworkManager) => forms.network_manager.clone(),
        _ => forms.wg_set.clone(),
    }
}

fn build(
    kind: FixKind,
    mark: u32,
    egress: String,
    table: Option<u32>,
    manager: Option<Manager>,
    forms: Forms,
    commands: Vec<String>,
) -> Fix {
    Fix {
        kind,
        mark,
        verified_egress_interface: egress,
        verified_route_table: table,
        manager,
        how: pick(&forms, manager),
        commands,
        wg_quick: forms.wg_quick,
        wg_set: forms.wg_set,
        systemd_networkd: forms.systemd_networkd,
        network_manager: forms.network_manager,
    }
}

/// A moved kernel interface's routes and rules are those of its socket's
/// namespace: the `ip` commands are aimed there (`ip -n NAME`, or `nsenter
/// --net=/proc/PID/ns/net` for a namespace without a name), unless that is
/// the namespace wgtrace runs in; `wg` commands stay with the interface.
fn aimed(mut fix: Fix, topology: &Topology, tunnel: &Tunnel) -> Fix {
    let netns = topology.transport_netns(tunnel);
    if netns == tunnel.netns || netns == topology.own_netns {
        return fix;
    }
    let Some(handle) = topology.namespaces.get(&netns).and_then(|ns| ns.handle.to_str()) else { return fix };
    let prefix = match handle.strip_prefix("/run/netns/") {
        Some(name) => format!("ip -n {name} "),
        None if handle.starts_with("/proc/") && !handle.starts_with("/proc/self/") => {
            format!("nsenter --net={handle} ip ")
        }
        None => return fix,
    };
    let before = fix.commands.join("; ");
    fix.commands = fix
        .commands
        .iter()
        .map(|c| c.strip_prefix("ip ").map_or_else(|| c.clone(), |rest| format!("{prefix}{rest}")))
        .collect();
    if fix.wg_set == before {
        fix.wg_set = fix.commands.join("; ");
    }
    if fix.how == before {
        fix.how = fix.wg_set.clone();
    }
    fix
}

/// The transport's route (with its current mark) already leaves through no
/// tunnel, asked of the kernel here: only the running sender has to follow
/// it. Nothing in the configuration changes, so every form is the runtime
/// command, which makes the sender drop the source it pinned.
pub fn reset_endpoint(
    topology: &Topology,
    tunnel: &Tunnel,
    manager: Option<Manager>,
    public_key: &str,
    query: UdpQuery,
    oracle: &dyn RouteOracle,
) -> Option<Fix> {
    // A speaker known by its packets only has no key to name in `wg set`.
    if crate::topology::speakers::is_keyless(public_key) {
        return None;
    }
    let netns = topology.transport_netns(tunnel);
    let answer = oracle.route_get(netns, query).ok()?;
    let oif = answer.oif.filter(|oif| !path::is_tunnel(topology, netns, *oif))?;
    let egress = topology.link_name(netns, oif)?.to_owned();
    let endpoint = std::net::SocketAddr::new(query.destination, query.destination_port);
    let command = format!(
        "wg set {} peer {} endpoint {}",
        tunnel.interface,
        crate::redact::key(public_key),
        crate::redact::endpoint(endpoint)
    );
    let forms = Forms {
        wg_quick: command.clone(),
        wg_set: command.clone(),
        systemd_networkd: command.clone(),
        network_manager: command.clone(),
    };
    Some(build(FixKind::ResetEndpoint, query.mark, egress, answer.table, manager, forms, vec![command]))
}

/// A mark that an existing rule honours: the outer tunnel's own mark first
/// (what its bypass rule exempts), then every mark the rules test for.
/// Each is asked of the kernel before it is suggested.
pub fn existing_mark(
    topology: &Topology,
    tunnel: &Tunnel,
    manager: Option<Manager>,
    preferred: &[u32],
    query: UdpQuery,
    oracle: &dyn RouteOracle,
    kind: FixKind,
) -> Option<Fix> {
    let netns = topology.transport_netns(tunnel);
    let mut candidates: Vec<u32> = preferred.iter().copied().filter(|m| *m != 0).collect();
    if let Some(ns) = topology.namespaces.get(&netns) {
        candidates.extend(ns.rules_v4.iter().chain(&ns.rules_v6).filter_map(|r| r.fwmark).filter(|m| *m != 0));
    }
    candidates.dedup();
    candidates.into_iter().filter(|m| *m != query.mark).find_map(|mark| {
        let answer = oracle.route_get(netns, UdpQuery { mark, ..query }).ok()?;
        let oif = answer.oif?;
        if path::is_tunnel(topology, netns, oif) {
            return None; // still inside some tunnel
        }
        let egress = topology.link_name(netns, oif)?.to_owned();
        let forms = mark_forms(&tunnel.interface, mark);
        let commands = vec![forms.wg_set.clone()];
        Some(aimed(build(kind, mark, egress, answer.table, manager, forms, commands), topology, tunnel))
    })
}

/// A rule (priority `priority`) that sends `mark`/`mask` to `table`, with
/// the forms to keep it: wg-quick PostUp/PreDown, a systemd-networkd
/// [RoutingPolicyRule], NetworkManager's routing-rules.
fn rule_forms(
    name: &str,
    selector: &str,
    table: u32,
    priority: u32,
    set_mark: Option<u32>,
    route: Option<&str>,
) -> (Forms, Vec<String>) {
    let family = if route.is_some_and(|r| r.contains(':')) { "-6 " } else { "" };
    let rule = format!("ip {family}rule add fwmark {selector} lookup {} priority {priority}", table_name(table));
    let mut commands: Vec<String> = set_mark.map(|m| format!("wg set {name} fwmark {m}")).into_iter().collect();
    let mut post_up = Vec::new();
    let mut pre_down = Vec::new();
    if let Some(route) = route {
        commands.push(format!("ip {family}route add {route} table {table}"));
        post_up.push(format!("ip {family}route add {route} table {table}"));
        pre_down.push(format!("ip {family}route del {route} table {table}"));
    }
    commands.push(rule.clone());
    post_up.push(rule.clone());
    pre_down.push(rule.replace(" add ", " del "));
    let fw_mark = set_mark.map(|m| format!("FwMark = {m}\n")).unwrap_or_default();
    let wg_quick = format!(
        "{fw_mark}PostUp = {}\nPreDown = {}   # under [Interface] in {name}.conf",
        post_up.join("; "),
        pre_down.join("; ")
    );
    let (mark, mask) = selector.split_once('/').unwrap_or((selector, ""));
    let mask = if mask.is_empty() { String::new() } else { format!("/{mask}") };
    let networkd = format!(
        "{}[RoutingPolicyRule]\nFirewallMark={mark}{mask}\nTable={table}\nPriority={priority}   # in the .network file of {name}",
        set_mark.map(|m| format!("FirewallMark={m}   # under [WireGuard] in {name}.netdev\n")).unwrap_or_default()
    );
    let nm = format!(
        "nmcli connection modify {name} {}+ipv4.routing-rules \"priority {priority} fwmark {mark}{mask} table {table}\"",
        set_mark.map(|m| format!("wireguard.fwmark {m} ")).unwrap_or_default()
    );
    let forms = Forms { wg_quick, wg_set: commands.join("; "), systemd_networkd: networkd, network_manager: nm };
    (forms, commands)
}

/// The priority just above (before) the capturing rule.
fn above(priority: Option<u32>) -> u32 {
    priority.map(|p| p.saturating_sub(1)).unwrap_or(1000).max(1)
}

/// A tunnel whose manager owns its mark: a rule for that mark, placed above
/// the rule that captures it, looking up main. The rule belongs to whoever
/// put the capturing rule there (`outer_manager`), e.g. wg-quick's PostUp.
#[allow(clippy::too_many_arguments)]
pub fn manager_mark_rule(
    topology: &Topology,
    tunnel: &Tunnel,
    (mark, mask): (u32, u32),
    outer_name: &str,
    outer_manager: Option<Manager>,
    capturing_priority: Option<u32>,
    destination: IpAddr,
    oracle: &dyn RouteOracle,
) -> Option<Fix> {
    let netns = topology.transport_netns(tunnel);
    let route = physical_route(topology, oracle, netns, MAIN, destination)?;
    let egress = topology.link_name(netns, route.oif?)?.to_owned();
    let selector = if mask == u32::MAX { format!("{mark:#x}") } else { format!("{mark:#x}/{mask:#x}") };
    let priority = above(capturing_priority);
    let (mut forms, commands) = rule_forms(outer_name, &selector, MAIN, priority, None, None);
    forms.wg_quick.push_str(&format!(
        "\n(or bring {outer_name} up before {}: its rules then land below the manager's)",
        tunnel.interface
    ));
    let fix = build(FixKind::Rule, mark, egress, Some(MAIN), outer_manager.or(Some(Manager::WgQuick)), forms, commands);
    Some(aimed(fix, topology, tunnel))
}

/// A mark for the tunnel plus a rule (and, when main itself leads into a
/// tunnel, a table with the physical default route), placed above the
/// capturing rule. `kind` is `mark_and_rule`, or `one_default_route` for a
/// mutual loop.
#[allow(clippy::too_many_arguments)]
pub fn mark_and_rule(
    topology: &Topology,
    tunnel: &Tunnel,
    manager: Option<Manager>,
    capturing_priority: Option<u32>,
    destination: IpAddr,
    oracle: &dyn RouteOracle,
    kind: FixKind,
) -> Option<Fix> {
    let device = tunnel.device.as_ref()?;
    let netns = topology.transport_netns(tunnel);
    let tested: Vec<u32> = topology
        .namespaces
        .get(&netns)
        .map(|ns| ns.rules_v4.iter().chain(&ns.rules_v6).filter_map(|r| r.fwmark).collect())
        .unwrap_or_default();
    // Keep the tunnel's own mark when it has one; else its port, unless a
    // rule already tests for that value.
    let mark = if device.fwmark != 0 {
        device.fwmark
    } else {
        (device.listen_port as u32..).find(|m| *m != 0 && !tested.contains(m))?
    };
    let set_mark = (device.fwmark == 0).then_some(mark);
    let priority = above(capturing_priority);
    let (table, route, verified) = match physical_route(topology, oracle, netns, MAIN, destination) {
        Some(route) if route.prefix_len == 0 || kind == FixKind::OneDefaultRoute => (MAIN, None, route),
        _ => {
            let default = physical_default(topology, oracle, netns, destination.is_ipv4())?;
            let device_name = topology.link_name(netns, default.oif?)?.to_owned();
            let via = default.gateway.map(|g| format!(" via {g}")).unwrap_or_default();
            (BYPASS_TABLE, Some(format!("default{via} dev {device_name}")), default)
        }
    };
    let egress = topology.link_name(netns, verified.oif?)?.to_owned();
    let (forms, commands) =
        rule_forms(&tunnel.interface, &mark.to_string(), table, priority, set_mark, route.as_deref());
    Some(aimed(build(kind, mark, egress, Some(table), manager, forms, commands), topology, tunnel))
}

/// An endpoint inside the tunnel's own AllowedIPs: a host route for it via
/// the physical path (longer than any AllowedIP, so it wins in main).
pub fn exclude_endpoint(
    topology: &Topology,
    tunnel: &Tunnel,
    manager: Option<Manager>,
    destination: IpAddr,
    oracle: &dyn RouteOracle,
) -> Option<Fix> {
    let netns = topology.transport_netns(tunnel);
    let default = physical_default(topology, oracle, netns, destination.is_ipv4())?;
    let device_name = topology.link_name(netns, default.oif?)?.to_owned();
    let via = default.gateway.map(|g| format!(" via {g}")).unwrap_or_default();
    let host = if destination.is_ipv4() { 32 } else { 128 };
    let family = if destination.is_ipv4() { "" } else { "-6 " };
    let add = format!("ip {family}route add {destination}/{host}{via} dev {device_name}");
    let name = &tunnel.interface;
    let forms = Forms {
        wg_quick: format!(
            "remove {destination} from AllowedIPs in {name}.conf, or keep it and add\nPostUp = {add}\nPreDown = {}",
            add.replace(" add ", " del ")
        ),
        wg_set: add.clone(),
        systemd_networkd: format!(
            "[Route]\nDestination={destination}/{host}\n{}   # in the .network file of {device_name}",
            default.gateway.map(|g| format!("Gateway={g}")).unwrap_or_default()
        ),
        network_manager: format!(
            "nmcli connection modify {name} -wireguard.peer-routes   # or exclude {destination} from allowed-ips"
        ),
    };
    let fix = build(FixKind::ExcludeEndpoint, 0, device_name, Some(MAIN), manager, forms, vec![add]);
    Some(aimed(fix, topology, tunnel))
}
