//! The data model: a [`Topology`] of namespaces and the tunnels in them,
//! as one discovery found them.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex},
};

use serde::Serialize;

use super::{
    netlink::{self, Link, Rule},
    speakers,
};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Peer {
    /// Base64, as `wg` prints it.
    pub public_key: String,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<(IpAddr, u8)>,
    pub last_handshake_sec: u64,
}

/// A WireGuard device's configuration, without its private key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Device {
    pub listen_port: u16,
    pub fwmark: u32,
    pub peers: Vec<Peer>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Implementation {
    Kernel,
    Userspace,
}

impl Implementation {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Kernel => "kernel",
            Self::Userspace => "userspace",
        }
    }
}

/// How a tunnel was found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DiscoveredBy {
    /// Kernel WireGuard, over generic netlink.
    #[default]
    Netlink,
    /// A userspace daemon's UAPI socket.
    Uapi,
    /// A TUN holder without a UAPI whose socket completed a handshake.
    Packets,
}

/// The process holding a tunnel's TUN device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Process {
    pub pid: u32,
    pub comm: String,
}

#[derive(Clone, Debug)]
pub struct Tunnel {
    pub netns: u64,
    pub netns_label: String,
    pub interface: String,
    pub ifindex: u32,
    pub implementation: Implementation,
    /// Userspace daemon, when there is one.
    pub daemon_pid: Option<u32>,
    pub discovered_by: DiscoveredBy,
    /// The TUN holder (userspace tunnels).
    pub process: Option<Process>,
    /// None when the configuration could not be read (the reason is logged).
    pub device: Option<Device>,
}

/// One namespace's interfaces and rules.
#[derive(Clone, Debug, Default)]
pub struct Namespace {
    pub label: String,
    pub links: Vec<Link>,
    pub rules_v4: Vec<Rule>,
    pub rules_v6: Vec<Rule>,
    pub handle: PathBuf,
    /// A route socket inside this namespace for [`Topology::route_get`],
    /// kept open across discoveries (one per namespace, never a setns per
    /// question; it also works after the privilege drop).
    pub route_socket: Option<Arc<Mutex<netlink::Socket>>>,
}

#[derive(Clone, Debug, Default)]
pub struct Topology {
    pub own_netns: u64,
    pub namespaces: BTreeMap<u64, Namespace>,
    pub tunnels: Vec<Tunnel>,
    /// TUN holders without a UAPI, with their UDP sockets: possible
    /// WireGuard speakers, confirmed by their packets (bounded).
    pub candidates: Vec<speakers::Candidate>,
    /// (netns inode, interface) -> (PID, process name) holding a TUN or TAP
    /// device, WireGuard or not: who owns a tunnel another one rides in.
    pub tun_holders: BTreeMap<(u64, String), (u32, String)>,
    /// (netns inode, ifindex) of a kernel tunnel moved out of the namespace
    /// it was created in -> that namespace, where its socket stayed and its
    /// transport is routed ([`netns::SocketPlace`](super::netns::SocketPlace)). Absent: its own.
    pub transport_netns: BTreeMap<(u64, u32), u64>,
}

impl Topology {
    /// Changes when a tunnel, peer, endpoint, mark or policy rule does
    /// (not with handshakes): when transport may take a new path.
    pub fn fingerprint(&self) -> u64 {
        use std::hash::{Hash as _, Hasher as _};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        for tunnel in &self.tunnels {
            (tunnel.netns, tunnel.ifindex, &tunnel.interface).hash(&mut hasher);
            if let Some(device) = &tunnel.device {
                (device.listen_port, device.fwmark).hash(&mut hasher);
                // wireguard-go lists peers (and their allowed IPs) in no
                // stable order.
                let mut peers: Vec<_> = device
                    .peers
                    .iter()
                    .map(|peer| {
                        let mut allowed_ips = peer.allowed_ips.clone();
                        allowed_ips.sort();
                        (&peer.public_key, peer.endpoint, allowed_ips)
                    })
                    .collect();
                peers.sort();
                peers.hash(&mut hasher);
            }
        }
        for (inode, namespace) in &self.namespaces {
            inode.hash(&mut hasher);
            format!("{:?}{:?}", namespace.rules_v4, namespace.rules_v6).hash(&mut hasher);
        }
        hasher.finish()
    }

    /// The namespace whose routing carries `tunnel`'s encrypted transport.
    pub fn transport_netns(&self, tunnel: &Tunnel) -> u64 {
        self.transport_netns.get(&(tunnel.netns, tunnel.ifindex)).copied().unwrap_or(tunnel.netns)
    }

    pub fn tunnel_on_ifindex(&self, netns: u64, ifindex: u32) -> Option<&Tunnel> {
        self.tunnels.iter().find(|t| t.netns == netns && t.ifindex == ifindex)
    }

    pub fn link_name(&self, netns: u64, ifindex: u32) -> Option<&str> {
        self.namespaces.get(&netns)?.links.iter().find(|l| l.index == ifindex).map(|l| l.name.as_str())
    }

    pub fn netns_label(&self, netns: u64) -> String {
        self.namespaces.get(&netns).map(|n| n.label.clone()).unwrap_or_else(|| format!("netns:{netns}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_peers(peers: Vec<Peer>, fwmark: u32) -> Topology {
        let tunnel = Tunnel {
            netns: 1,
            netns_label: "host".into(),
            interface: "wg0".into(),
            ifindex: 3,
            implementation: Implementation::Userspace,
            daemon_pid: None,
            discovered_by: DiscoveredBy::Uapi,
            process: None,
            device: Some(Device { listen_port: 51820, fwmark, peers }),
        };
        Topology { tunnels: vec![tunnel], ..Topology::default() }
    }

    #[test]
    fn the_fingerprint_ignores_peer_order_and_handshakes_but_not_marks_or_endpoints() {
        let peer = |key: &str, endpoint: &str, handshake: u64| Peer {
            public_key: key.into(),
            endpoint: Some(endpoint.parse().unwrap()),
            allowed_ips: vec![("10.0.0.0".parse().unwrap(), 8), ("192.168.0.0".parse().unwrap(), 16)],
            last_handshake_sec: handshake,
        };
        let (a, b) = (peer("A=", "192.0.2.1:51820", 1), peer("B=", "192.0.2.2:51820", 1));
        let base = with_peers(vec![a.clone(), b.clone()], 0).fingerprint();
        let mut reordered_ips = b.clone();
        reordered_ips.allowed_ips.reverse();
        assert_eq!(with_peers(vec![reordered_ips, a.clone()], 0).fingerprint(), base);
        assert_eq!(with_peers(vec![peer("A=", "192.0.2.1:51820", 99), b.clone()], 0).fingerprint(), base);
        assert_ne!(with_peers(vec![a.clone(), b.clone()], 51820).fingerprint(), base);
        assert_ne!(with_peers(vec![peer("A=", "192.0.2.9:51820", 1), b], 0).fingerprint(), base);
    }
}
