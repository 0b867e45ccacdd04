//! The path model: what the device a transport packet leaves through first
//! is. Another WireGuard tunnel, another kind of tunnel device (TUN/TAP with
//! the process holding it, ipip, gre, sit, vxlan, geneve, xfrm), or the
//! underlay, with VLAN, bond, bridge and macvlan stacks collapsed to the
//! device the user configured (the one routes point at).

use serde::Serialize;

use crate::topology::{Topology, Tunnel, netlink::Link};

/// ARPHRD_ETHER: a TAP device (a TUN device is ARPHRD_NONE).
const ARPHRD_ETHER: u16 = 1;

#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum OuterKind {
    Wireguard,
    Tun,
    Tap,
    Ipip,
    Gre,
    Sit,
    Vxlan,
    Geneve,
    Xfrm,
    Other,
}

impl OuterKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Wireguard => "wireguard",
            Self::Tun => "tun",
            Self::Tap => "tap",
            Self::Ipip => "ipip",
            Self::Gre => "gre",
            Self::Sit => "sit",
            Self::Vxlan => "vxlan",
            Self::Geneve => "geneve",
            Self::Xfrm => "xfrm",
            Self::Other => "other",
        }
    }
}

/// The tunnel a transport rides inside.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Outer {
    pub interface: String,
    pub kind: OuterKind,
    /// The process holding a TUN/TAP device (`openvpn (pid 812)`), or null.
    pub owner: Option<String>,
    #[serde(skip)]
    pub ifindex: u32,
}

/// What the first egress device is.
#[derive(Clone, Debug)]
pub enum Egress<'a> {
    /// A WireGuard tunnel of the topology (possibly the tunnel itself).
    Wireguard(&'a Tunnel),
    /// Another kind of tunnel device.
    Tunnel(Outer),
    /// The underlay: a physical path.
    Underlay,
}

/// The tunnel kind of a link, or None for underlay devices (veth, VLAN,
/// bond, bridge, macvlan, physical NICs, loopback).
pub fn tunnel_kind(link: &Link) -> Option<OuterKind> {
    Some(match link.kind.as_deref()? {
        "wireguard" => OuterKind::Wireguard,
        "tun" if link.hardware_type == ARPHRD_ETHER => OuterKind::Tap,
        "tun" => OuterKind::Tun,
        "ipip" | "ip6tnl" => OuterKind::Ipip,
        "gre" | "gretap" | "ip6gre" | "ip6gretap" | "erspan" | "ip6erspan" => OuterKind::Gre,
        "sit" => OuterKind::Sit,
        "vxlan" => OuterKind::Vxlan,
        "geneve" => OuterKind::Geneve,
        "xfrm" | "vti" | "vti6" => OuterKind::Xfrm,
        _ => return None,
    })
}

pub fn link(topology: &Topology, netns: u64, ifindex: u32) -> Option<&Link> {
    topology.namespaces.get(&netns)?.links.iter().find(|l| l.index == ifindex)
}

/// Classifies the device `ifindex` in `netns`.
pub fn classify(topology: &Topology, netns: u64, ifindex: u32) -> Egress<'_> {
    if let Some(tunnel) = topology.tunnel_on_ifindex(netns, ifindex) {
        return Egress::Wireguard(tunnel);
    }
    let Some(link) = link(topology, netns, ifindex) else { return Egress::Underlay };
    match tunnel_kind(link) {
        None => Egress::Underlay,
        Some(kind) => Egress::Tunnel(Outer {
            interface: link.name.clone(),
            kind,
            owner: topology
                .tun_holders
                .get(&(netns, link.name.clone()))
                .map(|(pid, comm)| if comm.is_empty() { format!("pid {pid}") } else { format!("{comm} (pid {pid})") }),
            ifindex,
        }),
    }
}

/// Whether a device is a tunnel (WireGuard or not): a fix must not leave
/// through one.
pub fn is_tunnel(topology: &Topology, netns: u64, ifindex: u32) -> bool {
    !matches!(classify(topology, netns, ifindex), Egress::Underlay)
}

/// Whether `lower` sits below `upper` in a device stack: a VLAN or macvlan
/// on its parent, a bond or bridge port under its master. A packet seen on
/// both left through `upper` as far as routing (and the user) is concerned.
pub fn is_below(topology: &Topology, netns: u64, lower: u32, upper: u32) -> bool {
    if lower == upper {
        return false;
    }
    // upper and the devices it is stacked on (a VLAN's parent, ...).
    let mut stack = vec![upper];
    while let Some(parent) = link(topology, netns, *stack.last().unwrap()).and_then(|l| l.parent) {
        if stack.contains(&parent) || stack.len() > 8 {
            break;
        }
        stack.push(parent);
    }
    // lower and the masters above it (bond, bridge).
    let mut current = lower;
    for _ in 0..8 {
        if stack.contains(&current) {
            return true;
        }
        match link(topology, netns, current).and_then(|l| l.master) {
            Some(master) => current = master,
            None => return false,
        }
    }
    false
}

/// The device a user configured, for a device seen at the bottom of a stack:
/// a bond or bridge port is shown as its master.
pub fn configured_device(topology: &Topology, netns: u64, ifindex: u32) -> u32 {
    let mut current = ifindex;
    for _ in 0..8 {
        match link(topology, netns, current).and_then(|l| l.master) {
            Some(master) => current = master,
            None => break,
        }
    }
    current
}
