//! The known peers, as the kernel side counts them: each peer of each
//! discovered tunnel gets a slot number, and its tunnel socket (namespace,
//! listen port) plus endpoint name it in the `PEERS` map. The socket's
//! namespace is the one its packets are seen in: the interface's own, or,
//! for a kernel interface moved after creation, the one it was created in.
//! Nothing else is counted, so no one but the topology decides what state
//! exists.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use wgtrace_common::{AF_INET, AF_INET6, PEER_MAP_ENTRIES, PORT_BITMAP_SLOTS, PeerKey};

use crate::topology::Topology;

/// A peer by its tunnel device (namespace inode, ifindex) and public key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PeerId {
    pub netns: u64,
    pub ifindex: u32,
    pub public_key: String,
}

/// How long a peer that vanished from the topology keeps its slot and its
/// `PEERS` entry: a peer removed and added back (`wg set ... remove`, a
/// restart) is the same peer, and its first handshake after coming back
/// often comes before the next discovery would announce it.
pub const VANISHED_GRACE: Duration = Duration::from_secs(30);

/// Vanished peers that wait out their grace at once; the longest gone go
/// first.
pub const MAX_VANISHED: usize = PEER_MAP_ENTRIES as usize;

/// Slot numbers, stable while a peer exists (so its counts continue across
/// endpoint changes) and never reused (so a new peer never inherits an old
/// one's paths). Bounded by the topology: a vanished peer's slot is dropped
/// after [`VANISHED_GRACE`], and at most [`MAX_VANISHED`] wait at once (a
/// daemon that renames its peers every discovery cannot grow the table).
#[derive(Default)]
pub struct PeerSlots {
    slots: HashMap<PeerId, u32>,
    by_slot: HashMap<u32, PeerId>,
    /// Peers gone from the topology: slot, last key, when last seen.
    vanished: HashMap<PeerId, (u32, Option<PeerKey>, Instant)>,
    /// Each present peer's current key.
    keys: HashMap<PeerId, PeerKey>,
    next: u32,
    warned_full: bool,
}

impl PeerSlots {
    /// Follows `topology`; returns the `PEERS` map's wanted contents.
    pub fn update(&mut self, topology: &Topology) -> HashMap<PeerKey, u32> {
        self.update_at(topology, Instant::now())
    }

    fn update_at(&mut self, topology: &Topology, now: Instant) -> HashMap<PeerKey, u32> {
        let mut wanted = HashMap::new();
        let mut present = HashMap::new();
        let mut keys = HashMap::new();
        for tunnel in &topology.tunnels {
            let Some(device) = &tunnel.device else { continue };
            for peer in &device.peers {
                let id = PeerId { netns: tunnel.netns, ifindex: tunnel.ifindex, public_key: peer.public_key.clone() };
                if present.len() >= PEER_MAP_ENTRIES as usize {
                    if !std::mem::replace(&mut self.warned_full, true) {
                        log::warn!("more than {PEER_MAP_ENTRIES} peers: the rest are not traced");
                    }
                    break;
                }
                let known = self.slots.get(&id).copied().or_else(|| self.vanished.remove(&id).map(|(slot, _, _)| slot));
                let slot = known.unwrap_or_else(|| {
                    self.next += 1;
                    self.next
                });
                if let Some(endpoint) = peer.endpoint {
                    // Packets carry the namespace of the device they are on:
                    // the socket's, which a moved kernel interface left behind.
                    let key = peer_key(topology.transport_netns(tunnel), device.listen_port, endpoint);
                    wanted.insert(key, slot);
                    keys.insert(id.clone(), key);
                }
                present.insert(id, slot);
            }
        }
        // Peers that just vanished wait out the grace period, keys and all.
        for (id, slot) in std::mem::take(&mut self.slots) {
            if !present.contains_key(&id) {
                self.vanished.insert(id.clone(), (slot, self.keys.get(&id).copied(), now));
            }
        }
        self.vanished.retain(|_, (_, _, since)| now.duration_since(*since) < VANISHED_GRACE);
        if self.vanished.len() > MAX_VANISHED {
            let mut by_age: Vec<(Instant, PeerId)> =
                self.vanished.iter().map(|(id, (_, _, since))| (*since, id.clone())).collect();
            by_age.sort_by_key(|(since, _)| *since);
            for (_, id) in by_age.into_iter().take(self.vanished.len() - MAX_VANISHED) {
                self.vanished.remove(&id);
            }
        }
        for (slot, key, _) in self.vanished.values() {
            if let Some(key) = key
                && wanted.len() < PEER_MAP_ENTRIES as usize
            {
                wanted.entry(*key).or_insert(*slot);
            }
        }
        self.by_slot = present.iter().map(|(id, slot)| (*slot, id.clone())).collect();
        for (id, (slot, _, _)) in &self.vanished {
            self.by_slot.entry(*slot).or_insert_with(|| id.clone());
        }
        self.slots = present;
        self.keys = keys;
        wanted
    }

    pub fn slot(&self, peer: &PeerId) -> Option<u32> {
        self.slots.get(peer).copied()
    }

    /// Present, or vanished within [`VANISHED_GRACE`] (as of the last
    /// update): a slot that events may still name.
    pub fn present_or_in_grace(&self, peer: &PeerId) -> bool {
        self.slots.contains_key(peer) || self.vanished.contains_key(peer)
    }

    pub fn peer(&self, slot: u32) -> Option<&PeerId> {
        self.by_slot.get(&slot)
    }
}

/// How packets name a peer: IPv4-mapped endpoints as the IPv4 packets
/// they really are.
pub fn peer_key(netns: u64, listen_port: u16, endpoint: SocketAddr) -> PeerKey {
    let mut key =
        PeerKey { netns: netns as u32, local_port: listen_port, remote_port: endpoint.port(), ..PeerKey::default() };
    match endpoint.ip().to_canonical() {
        IpAddr::V4(v4) => {
            key.family = AF_INET;
            key.remote[..4].copy_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            key.family = AF_INET6;
            key.remote = v6.octets();
        }
    }
    key
}

/// One bit per port some tunnel listens on, in any namespace, and per
/// candidate speaker's socket (whose handshakes may confirm it).
pub fn port_bitmap(topology: &Topology) -> Vec<u64> {
    let mut bits = vec![0u64; PORT_BITMAP_SLOTS as usize];
    let tunnel_ports = topology.tunnels.iter().filter_map(|t| t.device.as_ref().map(|d| d.listen_port));
    for port in tunnel_ports.chain(topology.candidates.iter().map(|c| c.socket.port)) {
        bits[(port >> 6) as usize] |= 1 << (port & 63);
    }
    bits
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{Device, Implementation, Peer, Tunnel};

    fn tunnel(netns: u64, ifindex: u32, port: u16, peers: &[(&str, Option<&str>)]) -> Tunnel {
        Tunnel {
            netns,
            netns_label: String::new(),
            daemon_pid: None,
            discovered_by: crate::topology::DiscoveredBy::Uapi,
            process: None,
            interface: format!("wg{ifindex}"),
            ifindex,
            implementation: Implementation::Userspace,
            device: Some(Device {
                listen_port: port,
                fwmark: 0,
                peers: peers
                    .iter()
                    .map(|(key, endpoint)| Peer {
                        public_key: (*key).to_owned(),
                        endpoint: endpoint.map(|e| e.parse().unwrap()),
                        ..Peer::default()
                    })
                    .collect(),
            }),
        }
    }

    fn topology(tunnels: Vec<Tunnel>) -> Topology {
        Topology { tunnels, ..Topology::default() }
    }

    #[test]
    fn slots_are_stable_never_reused_and_dropped_after_a_grace_period() {
        let mut slots = PeerSlots::default();
        let start = Instant::now();
        let a = PeerId { netns: 7, ifindex: 3, public_key: "a".into() };
        let b = PeerId { netns: 7, ifindex: 3, public_key: "b".into() };
        let both = topology(vec![tunnel(7, 3, 51821, &[("a", Some("10.0.0.1:51821")), ("b", Some("10.0.0.2:1"))])]);
        let wanted = slots.update_at(&both, start);
        assert_eq!(wanted.len(), 2);
        let (slot_a, slot_b) = (slots.slot(&a).unwrap(), slots.slot(&b).unwrap());
        assert_ne!(slot_a, slot_b);
        // a's endpoint moves: same slot, new key; b is removed, and keeps
        // its slot and key for the grace period.
        let only_a = topology(vec![tunnel(7, 3, 51821, &[("a", Some("10.0.0.9:51821"))])]);
        let wanted = slots.update_at(&only_a, start + Duration::from_secs(1));
        assert_eq!(slots.slot(&a), Some(slot_a));
        assert_eq!(slots.slot(&b), None);
        assert_eq!(wanted.len(), 2, "b's key stays while it may come back");
        assert_eq!(slots.peer(slot_b), Some(&b), "events during the grace period still name b");
        assert!(slots.present_or_in_grace(&b), "b may still come back");
        // Added back within the grace period: the same peer, same slot.
        slots.update_at(&both, start + Duration::from_secs(2));
        assert_eq!(slots.slot(&b), Some(slot_b));
        // Gone for longer: its slot is dropped, and a return is a new peer.
        slots.update_at(&only_a, start + Duration::from_secs(3));
        let wanted = slots.update_at(&only_a, start + Duration::from_secs(3) + VANISHED_GRACE);
        assert_eq!(wanted.values().copied().collect::<Vec<_>>(), vec![slot_a]);
        assert_eq!(slots.peer(slot_b), None);
        assert!(!slots.present_or_in_grace(&b) && slots.present_or_in_grace(&a));
        slots.update_at(&both, start + Duration::from_secs(40));
        assert!(slots.slot(&b).unwrap() > slot_b, "b came back as a new peer");
    }

    #[test]
    fn a_daemon_renaming_its_peers_every_discovery_cannot_grow_the_vanished_table() {
        let mut slots = PeerSlots::default();
        let start = Instant::now();
        for round in 0..3u32 {
            let names: Vec<String> = (0..3000).map(|i| format!("r{round}-{i}")).collect();
            let peers: Vec<(&str, Option<&str>)> = names.iter().map(|n| (n.as_str(), None)).collect();
            slots.update_at(&topology(vec![tunnel(7, 3, 51821, &peers)]), start + Duration::from_secs(round.into()));
        }
        assert_eq!(slots.vanished.len(), MAX_VANISHED);
        // The longest gone went first: all of round 1's wait, some of round 0's.
        let round_one = PeerId { netns: 7, ifindex: 3, public_key: "r1-0".into() };
        assert!(slots.present_or_in_grace(&round_one));
        assert!(slots.vanished.keys().filter(|id| id.public_key.starts_with("r0-")).count() == MAX_VANISHED - 3000);
    }

    /// The kernel side builds its keys from the packet's address words;
    /// userspace's `PEERS` keys must be the same bytes, or no packet is
    /// ever a known peer's.
    #[test]
    fn keys_match_what_the_kernel_side_builds_from_packets() {
        let v4 = [192, 0, 2, 200];
        let word = |b: &[u8]| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
        let from_packet =
            |family, remote| PeerKey { netns: 9, family, local_port: 51820, remote_port: 51821, _pad: 0, remote };
        let ipv4 = from_packet(AF_INET, wgtrace_common::address_bytes([word(&v4), 0, 0, 0]));
        assert_eq!(ipv4, peer_key(9, 51820, "192.0.2.200:51821".parse().unwrap()));
        let v6: std::net::Ipv6Addr = "2001:db8:e::1".parse().unwrap();
        let o = v6.octets();
        let ipv6 = from_packet(
            AF_INET6,
            wgtrace_common::address_bytes([word(&o[0..]), word(&o[4..]), word(&o[8..]), word(&o[12..])]),
        );
        assert_eq!(ipv6, peer_key(9, 51820, "[2001:db8:e::1]:51821".parse().unwrap()));
    }

    #[test]
    fn a_moved_kernel_interface_is_keyed_by_its_sockets_namespace() {
        let mut moved = topology(vec![tunnel(7, 3, 51820, &[("a", Some("192.0.2.2:51821"))])]);
        moved.transport_netns.insert((7, 3), 9);
        let wanted = PeerSlots::default().update(&moved);
        let keys: Vec<&PeerKey> = wanted.keys().collect();
        assert_eq!(keys, vec![&peer_key(9, 51820, "192.0.2.2:51821".parse().unwrap())]);
        let mut slots = PeerSlots::default();
        slots.update(&moved);
        assert!(slots.slot(&PeerId { netns: 7, ifindex: 3, public_key: "a".into() }).is_some(), "named by its device");
    }

    #[test]
    fn mapped_endpoints_are_keyed_as_ipv4_and_ports_set_their_bit() {
        let key = peer_key(7, 51820, "[::ffff:192.0.2.1]:51821".parse().unwrap());
        assert_eq!(key, peer_key(7, 51820, "192.0.2.1:51821".parse().unwrap()));
        assert_eq!(key.family, AF_INET);
        let bits = port_bitmap(&topology(vec![tunnel(7, 3, 51820, &[]), tunnel(8, 3, 65535, &[])]));
        assert_eq!(bits[51820 / 64], 1 << (51820 % 64));
        assert_eq!(bits[1023], 1 << 63);
        assert_eq!(bits.iter().map(|b| b.count_ones()).sum::<u32>(), 2);
    }
}
