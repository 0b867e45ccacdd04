//! Where the time goes, per tunnel and peer, from packets the kernel side
//! already sees (method and accuracy: docs/latency.md):
//!
//! * inner RTT: echo requests and TCP SYNs leaving a tunnel's own device,
//!   paired with the replies arriving on it;
//! * handshake RTT: a handshake initiation leaving (sender index I) to the
//!   response arriving (receiver index I), wherever the transport travels;
//! * transmit latency: a sampled plaintext packet entering the tunnel device
//!   to its encrypted form leaving the host's last egress device.
//!
//! Timestamps come from the kernel (`bpf_ktime_get_ns`); pairing happens
//! here, in bounded maps.

pub mod histogram;
pub mod pending;
pub mod probe;

use std::{collections::HashMap, net::IpAddr};

use wgtrace_common::{
    AF_INET, DIR_EGRESS, DIR_INGRESS, PLAINTEXT_ECHO_REPLY, PLAINTEXT_ECHO_REQUEST, PLAINTEXT_SYN, PLAINTEXT_SYN_ACK,
    PacketEvent, PlaintextEvent, TRANSMIT_BY_LENGTH, TRANSMIT_BY_SKB, TransmitEvent,
    wire::{MESSAGE_HANDSHAKE_INITIATION, MESSAGE_HANDSHAKE_RESPONSE},
};

pub use histogram::{LatencyHistogram, Summary};
use pending::Pending;

use serde::Serialize;

use crate::topology::{Topology, prefix_contains};

/// How many unanswered requests (and handshakes) are remembered.
const PENDING_CAPACITY: usize = 8192;

/// Histograms kept for peers absent from the topology but within their
/// slot's grace: a few, for a peer removed and added back, never one per
/// peer a daemon could invent and drop (each histogram is ~136 KiB).
const MAX_ABSENT_PEER_HISTOGRAMS: usize = 16;

fn address(family: u16, bytes: &[u8; 16]) -> IpAddr {
    if family == AF_INET { IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]]) } else { IpAddr::from(*bytes) }
}

/// A request and its reply share this key once the kernel side has put
/// both in the requester's terms (local id or port, remote address).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct ProbeKey {
    netns: u32,
    ifindex: u32,
    tcp: bool,
    id: u16,
    port: u16,
    sequence: u32,
    remote: IpAddr,
}

/// A tunnel device, by namespace inode and ifindex.
pub type Device = (u64, u32);

/// A peer's AllowedIPs entry and its public key.
type AllowedPrefix = ((IpAddr, u8), String);

#[derive(Default)]
pub struct LatencyTracker {
    probes: Option<Pending<ProbeKey, u64>>,
    /// Initiations by (peer slot, sender index).
    handshakes: Option<Pending<(u32, u32), u64>>,
    /// Per device and peer (public key; empty when no peer's AllowedIPs match).
    inner: HashMap<(Device, String), LatencyHistogram>,
    /// Per known peer: tunnel device and public key.
    handshake: HashMap<(Device, String), LatencyHistogram>,
    transmit: HashMap<Device, LatencyHistogram>,
    /// How each device's transmit samples were matched, last seen.
    transmit_method: HashMap<Device, u32>,
    /// Tunnel devices with their peers' AllowedIPs, from the last topology.
    peers_of_device: HashMap<Device, Vec<AllowedPrefix>>,
}

impl LatencyTracker {
    pub fn new() -> Self {
        Self {
            probes: Some(Pending::new(PENDING_CAPACITY)),
            handshakes: Some(Pending::new(PENDING_CAPACITY)),
            ..Self::default()
        }
    }

    /// `recently_known` says whether a peer absent from `topology` still
    /// has its slot (it vanished within the grace userspace keeps slots
    /// for): a peer removed and added back (`wg set ... remove`, a
    /// `syncconf`), caught absent by one discovery, keeps its handshake
    /// and inner RTT history ([`MAX_ABSENT_PEER_HISTOGRAMS`] at most).
    pub fn set_topology(&mut self, topology: &Topology, recently_known: impl Fn(Device, &str) -> bool) {
        self.peers_of_device = topology
            .tunnels
            .iter()
            .map(|t| {
                let peers = t
                    .device
                    .iter()
                    .flat_map(|d| &d.peers)
                    .flat_map(|p| p.allowed_ips.iter().map(move |prefix| (*prefix, p.public_key.clone())))
                    .collect();
                ((t.netns, t.ifindex), peers)
            })
            .collect();
        // Histograms exist only for peers that still exist (or, briefly,
        // just vanished): memory follows the topology, never the traffic.
        let known: std::collections::HashSet<(Device, &str)> = topology
            .tunnels
            .iter()
            .flat_map(|t| t.device.iter().flat_map(move |d| d.peers.iter().map(move |p| ((t.netns, t.ifindex), p))))
            .map(|(device, p)| (device, p.public_key.as_str()))
            .collect();
        let mut absent = 0;
        let mut keep = |device: Device, key: &str| {
            known.contains(&(device, key))
                || (recently_known(device, key) && {
                    absent += 1;
                    absent <= MAX_ABSENT_PEER_HISTOGRAMS
                })
        };
        self.handshake.retain(|(device, key), _| keep(*device, key));
        let devices = &self.peers_of_device;
        // Inner RTT samples whose remote no peer's AllowedIPs hold are
        // the device's own (key "").
        self.inner.retain(|(device, key), _| devices.contains_key(device) && (key.is_empty() || keep(*device, key)));
        self.transmit.retain(|device, _| devices.contains_key(device));
        self.transmit_method.retain(|device, _| devices.contains_key(device));
    }

    /// The peer whose AllowedIPs hold `remote` most specifically.
    fn peer_for(&self, device: Device, remote: IpAddr) -> String {
        self.peers_of_device
            .get(&device)
            .and_then(|peers| {
                peers
                    .iter()
                    .filter(|((net, len), _)| prefix_contains(*net, *len, remote))
                    .max_by_key(|((_, len), _)| *len)
                    .map(|(_, key)| key.clone())
            })
            .unwrap_or_default()
    }

    pub fn on_plaintext(&mut self, event: &PlaintextEvent) {
        let key = ProbeKey {
            netns: event.device.netns,
            ifindex: event.device.ifindex,
            tcp: matches!(event.what, PLAINTEXT_SYN | PLAINTEXT_SYN_ACK),
            id: event.id,
            port: event.port_or_zero,
            sequence: event.sequence,
            remote: address(event.family, &event.remote),
        };
        let pending = self.probes.get_or_insert_with(|| Pending::new(PENDING_CAPACITY));
        match event.what {
            PLAINTEXT_ECHO_REQUEST | PLAINTEXT_SYN => pending.insert(key, event.timestamp_ns),
            PLAINTEXT_ECHO_REPLY | PLAINTEXT_SYN_ACK => {
                let Some(sent) = pending.take(&key) else { return };
                let Some(rtt) = event.timestamp_ns.checked_sub(sent) else { return };
                let device = (key.netns as u64, key.ifindex);
                let peer = self.peer_for(device, key.remote);
                self.inner.entry((device, peer)).or_default().record_ns(rtt);
            }
            _ => {}
        }
    }

    /// A handshake message of a known peer (`peer`: its tunnel device and
    /// public key, named by the session from the event's slot). Initiations
    /// leaving are paired with the responses arriving for their index; a
    /// completed pair's round trip (ns) is returned as well as recorded.
    pub fn on_handshake(&mut self, peer: (Device, &str), event: &PacketEvent) -> Option<u64> {
        let pending = self.handshakes.get_or_insert_with(|| Pending::new(PENDING_CAPACITY));
        match (event.message_type, event.path.direction) {
            (MESSAGE_HANDSHAKE_INITIATION, DIR_EGRESS) => {
                pending.insert_if_absent((event.path.peer, event.sender), event.timestamp_ns);
                None
            }
            (MESSAGE_HANDSHAKE_RESPONSE, DIR_INGRESS) => {
                let sent = pending.take(&(event.path.peer, event.receiver))?;
                let rtt = event.timestamp_ns.checked_sub(sent)?;
                self.handshake.entry((peer.0, peer.1.to_owned())).or_default().record_ns(rtt);
                Some(rtt)
            }
            _ => None,
        }
    }

    /// Only the stage that leaves through a device that is not a tunnel ends
    /// the transmit path; earlier stages are the nested tunnel's transport
    /// entering an outer tunnel.
    pub fn on_transmit(&mut self, event: &TransmitEvent) {
        let netns = event.netns as u64;
        if self.peers_of_device.contains_key(&(netns, event.egress_ifindex)) {
            return;
        }
        let Some(latency) = event.left_ns.checked_sub(event.entered_ns) else { return };
        self.transmit.entry((netns, event.origin_ifindex)).or_default().record_ns(latency);
        self.transmit_method.insert((netns, event.origin_ifindex), event.method);
    }

    pub fn inner_rtt(&self, device: Device, public_key: &str) -> Option<&LatencyHistogram> {
        self.inner.get(&(device, public_key.to_owned()))
    }

    /// Every inner RTT sample of a device, whatever the peer.
    pub fn inner_rtt_of_device(&self, device: Device) -> LatencyHistogram {
        let mut all = LatencyHistogram::default();
        for ((d, _), histogram) in &self.inner {
            if *d == device {
                all.merge(histogram);
            }
        }
        all
    }

    pub fn handshake_rtt(&self, device: Device, public_key: &str) -> Option<&LatencyHistogram> {
        self.handshake.get(&(device, public_key.to_owned()))
    }

    pub fn transmit(&self, device: Device) -> Option<&LatencyHistogram> {
        self.transmit.get(&device)
    }

    /// How `device`'s transmit latency was measured (docs/latency.md).
    pub fn transmit_method(&self, device: Device) -> Option<&'static str> {
        match *self.transmit_method.get(&device)? {
            TRANSMIT_BY_SKB => Some("skb_identity"),
            TRANSMIT_BY_LENGTH => Some("length_prediction"),
            _ => None,
        }
    }
}

/// The JSON `latency` object of a peer; counts are 0 where nothing was seen.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PeerLatency {
    pub inner_rtt_us: Summary,
    pub handshake_rtt_us: Summary,
    /// Measured per tunnel device, so the same for every peer of a tunnel.
    pub transmit_us: Summary,
    /// `skb_identity` (kernel WireGuard) or `length_prediction` (userspace).
    pub transmit_method: Option<&'static str>,
    /// The histograms behind the summaries, for the terminal and the exporter.
    #[serde(skip)]
    pub histograms: PeerHistograms,
}

#[derive(Clone, Debug, Default)]
pub struct PeerHistograms {
    pub inner_rtt: Option<LatencyHistogram>,
    pub handshake_rtt: Option<LatencyHistogram>,
    pub transmit: Option<LatencyHistogram>,
}

/// What riding inside the outer tunnel costs a nested peer's round trips.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct NestingCost {
    pub outer_interface: String,
    /// The outer tunnel's own inner RTT (p50), when traffic over it was seen.
    pub outer_inner_rtt_p50_us: Option<u64>,
    /// Estimated extra RTT from the nesting: measured by `--probe` when
    /// given, else the outer tunnel's RTT.
    pub estimated_cost_us: Option<u64>,
    /// The nested tunnel's RTT to expect after the fix.
    pub expected_inner_rtt_after_fix_us: Option<u64>,
    pub probe: Option<ProbeReport>,
}

/// `--probe` results: echoes to the endpoint along each path.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ProbeReport {
    pub current_path_rtt_us: Option<u64>,
    pub direct_path_rtt_us: Option<u64>,
    pub fix_mark: u32,
}

#[cfg(test)]
mod tests {
    use wgtrace_common::{DeviceKey, PathKey};

    use super::*;

    fn echo(what: u8, direction: u8, sequence: u32, at_ms: u64) -> PlaintextEvent {
        let mut remote = [0u8; 16];
        remote[..4].copy_from_slice(&[203, 0, 113, 1]);
        PlaintextEvent {
            what,
            direction,
            family: AF_INET,
            timestamp_ns: at_ms * 1_000_000,
            device: DeviceKey { netns: 7, ifindex: 3 },
            remote,
            id: 42,
            sequence,
            ..PlaintextEvent::default()
        }
    }

    #[test]
    fn pairs_echoes_despite_reordering_duplicates_and_loss() {
        let mut t = LatencyTracker::new();
        t.on_plaintext(&echo(PLAINTEXT_ECHO_REQUEST, DIR_EGRESS, 1, 0));
        t.on_plaintext(&echo(PLAINTEXT_ECHO_REQUEST, DIR_EGRESS, 2, 10));
        t.on_plaintext(&echo(PLAINTEXT_ECHO_REQUEST, DIR_EGRESS, 3, 20)); // never answered
        t.on_plaintext(&echo(PLAINTEXT_ECHO_REPLY, DIR_INGRESS, 2, 50)); // 40 ms, out of order
        t.on_plaintext(&echo(PLAINTEXT_ECHO_REPLY, DIR_INGRESS, 1, 41)); // 41 ms
        t.on_plaintext(&echo(PLAINTEXT_ECHO_REPLY, DIR_INGRESS, 1, 90)); // duplicate: ignored
        t.on_plaintext(&echo(PLAINTEXT_ECHO_REPLY, DIR_INGRESS, 9, 95)); // no request: ignored
        let s = t.inner_rtt_of_device((7, 3)).summary();
        assert_eq!(s.count, 2);
        assert!((40_000..=41_100).contains(&s.p50), "{s:?}");
        assert!((41_000..=41_100).contains(&s.max), "{s:?}");
    }

    #[test]
    fn attributes_rtt_to_the_peer_by_allowed_ips() {
        let mut t = LatencyTracker::new();
        t.peers_of_device.insert(
            (7, 3),
            vec![
                (("0.0.0.0".parse().unwrap(), 0), "default".into()),
                (("203.0.113.0".parse().unwrap(), 24), "specific".into()),
            ],
        );
        t.on_plaintext(&echo(PLAINTEXT_ECHO_REQUEST, DIR_EGRESS, 1, 0));
        t.on_plaintext(&echo(PLAINTEXT_ECHO_REPLY, DIR_INGRESS, 1, 5));
        assert_eq!(t.inner_rtt((7, 3), "specific").map(|h| h.summary().count), Some(1));
        assert!(t.inner_rtt((7, 3), "default").is_none());
    }

    fn handshake(message_type: u8, direction: u8, index: u32, at_ms: u64) -> PacketEvent {
        let path = PathKey { peer: 1, ifindex: 2, direction, ..PathKey::default() };
        let (sender, receiver) = if message_type == MESSAGE_HANDSHAKE_INITIATION { (index, 0) } else { (99, index) };
        PacketEvent { message_type, path, sender, receiver, timestamp_ns: at_ms * 1_000_000, ..PacketEvent::default() }
    }

    #[test]
    fn handshake_rtt_pairs_by_sender_index() {
        let mut t = LatencyTracker::new();
        let peer = ((7, 3), "wg1-peer");
        t.on_handshake(peer, &handshake(MESSAGE_HANDSHAKE_INITIATION, DIR_EGRESS, 5, 0));
        t.on_handshake(peer, &handshake(MESSAGE_HANDSHAKE_INITIATION, DIR_EGRESS, 5, 3)); // seen again elsewhere
        t.on_handshake(peer, &handshake(MESSAGE_HANDSHAKE_RESPONSE, DIR_INGRESS, 6, 30)); // another handshake's
        t.on_handshake(peer, &handshake(MESSAGE_HANDSHAKE_RESPONSE, DIR_INGRESS, 5, 42));
        let s = t.handshake_rtt((7, 3), "wg1-peer").unwrap().summary();
        assert_eq!(s.count, 1);
        assert!((41_900..=42_100).contains(&s.p50), "timed from the first sighting: {s:?}");
    }

    #[test]
    fn a_peer_caught_absent_by_one_discovery_keeps_its_handshake_history() {
        let mut t = LatencyTracker::new();
        let peer = ((7, 3), "wg1-peer");
        t.on_handshake(peer, &handshake(MESSAGE_HANDSHAKE_INITIATION, DIR_EGRESS, 5, 0));
        t.on_handshake(peer, &handshake(MESSAGE_HANDSHAKE_RESPONSE, DIR_INGRESS, 5, 42));
        // A discovery between `wg set ... remove` and the re-add: the peer
        // still has its slot.
        t.set_topology(&Topology::default(), |device, key| (device, key) == peer);
        assert_eq!(t.handshake_rtt((7, 3), "wg1-peer").map(|h| h.summary().count), Some(1));
        // Gone for good (its slot too): its history goes.
        t.set_topology(&Topology::default(), |_, _| false);
        assert!(t.handshake_rtt((7, 3), "wg1-peer").is_none());
    }

    #[test]
    fn absent_peers_keep_only_a_few_histograms() {
        let mut t = LatencyTracker::new();
        for peer in 0..100u32 {
            let key = format!("peer-{peer}");
            let mut initiation = handshake(MESSAGE_HANDSHAKE_INITIATION, DIR_EGRESS, peer, 0);
            let mut response = handshake(MESSAGE_HANDSHAKE_RESPONSE, DIR_INGRESS, peer, 1);
            (initiation.path.peer, response.path.peer) = (peer, peer);
            t.on_handshake(((7, 3), &key), &initiation);
            t.on_handshake(((7, 3), &key), &response);
        }
        assert_eq!(t.handshake.len(), 100);
        // All 100 renamed away at once, all within their grace.
        t.set_topology(&Topology::default(), |_, _| true);
        assert_eq!(t.handshake.len(), MAX_ABSENT_PEER_HISTOGRAMS);
    }

    #[test]
    fn transmit_ends_at_the_first_non_tunnel_device() {
        let mut t = LatencyTracker::new();
        t.peers_of_device.insert((7, 3), vec![]); // wg1
        t.peers_of_device.insert((7, 2), vec![]); // wg0
        let stage = |stage, egress, left_us: u64| TransmitEvent {
            stage,
            entered_ns: 0,
            left_ns: left_us * 1000,
            netns: 7,
            origin_ifindex: 3,
            egress_ifindex: egress,
            ..TransmitEvent::default()
        };
        t.on_transmit(&stage(1, 2, 150)); // wg1's transport entering wg0: not the end
        t.on_transmit(&stage(2, 9, 400)); // leaving the veth
        let s = t.transmit((7, 3)).unwrap().summary();
        assert_eq!((s.count, s.max), (1, 400));
    }
}
