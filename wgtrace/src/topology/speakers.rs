//! WireGuard speakers without a UAPI or netlink answer (tailscaled and
//! daemons like it): a process that holds a TUN device, serves no UAPI
//! socket, and owns UDP sockets. Discovery lists such sockets as
//! *candidates* (bounded, keyed by process and socket); the kernel side
//! reports only their handshake initiations and responses; a candidate
//! becomes a tunnel once an initiation and its response pair up by index
//! (the response's receiver index is the initiation's sender index, in the
//! other direction, with the same endpoint). Stray WireGuard-shaped
//! datagrams never pair, so they never make a speaker, and sockets of
//! processes that hold no TUN device are never candidates at all.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use wgtrace_common::{AF_INET, CANDIDATE_MAP_ENTRIES, CandidateEvent, DIR_EGRESS, wire};

use super::{Device, DiscoveredBy, Peer, Process, Topology, Tunnel};

/// At most this many candidate sockets on the host (the kernel map's size).
pub const MAX_CANDIDATES: usize = CANDIDATE_MAP_ENTRIES as usize;
/// Unanswered initiations remembered per candidate (oldest dropped first).
const MAX_PENDING: usize = 64;
/// Endpoints (peers) remembered per confirmed speaker.
pub const MAX_SPEAKER_PEERS: usize = 256;
/// Sockets listed per process (a TUN holder may open any number).
const MAX_SOCKETS_PER_PROCESS: usize = 16;

/// The prefix that makes a keyless peer's internal identity: such peers are
/// known by their endpoint only. Every output shows them as having no public
/// key (`public_key` null in JSON).
pub const KEYLESS_PREFIX: &str = "no-public-key:";

pub fn keyless_id(endpoint: SocketAddr) -> String {
    format!("{KEYLESS_PREFIX}{endpoint}")
}

pub fn is_keyless(public_key: &str) -> bool {
    public_key.starts_with(KEYLESS_PREFIX)
}

/// A UDP socket of some process, as /proc shows it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct UdpSocket {
    pub inode: u64,
    pub port: u16,
}

/// A candidate speaker: a TUN holder without a UAPI, and one of its sockets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub netns: u64,
    pub netns_label: String,
    pub interface: String,
    pub ifindex: u32,
    pub pid: u32,
    pub comm: String,
    pub socket: UdpSocket,
}

impl Candidate {
    /// The table key: (process, socket).
    pub fn key(&self) -> (u32, u64) {
        (self.pid, self.socket.inode)
    }
}

/// The UDP sockets `pid` owns (its fd table's `socket:[INODE]` links matched
/// against /proc/PID/net/udp{,6}, which list the sockets of its namespace).
/// Facts the kernel writes; nothing the process says is read.
pub fn udp_sockets_of(pid: u32) -> Vec<UdpSocket> {
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else { return Vec::new() };
    let inodes: HashSet<u64> = fds
        .flatten()
        .filter_map(|fd| fs::read_link(fd.path()).ok())
        .filter_map(|target| socket_inode(&target))
        .collect();
    if inodes.is_empty() {
        return Vec::new();
    }
    let mut found = Vec::new();
    for table in ["udp", "udp6"] {
        let Ok(text) = fs::read_to_string(format!("/proc/{pid}/net/{table}")) else { continue };
        for socket in parse_udp_table(&text) {
            if inodes.contains(&socket.inode) && !found.contains(&socket) {
                found.push(socket);
            }
        }
    }
    found.sort_by_key(|s| (s.port, s.inode));
    found.truncate(MAX_SOCKETS_PER_PROCESS);
    found
}

fn socket_inode(target: &Path) -> Option<u64> {
    target.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
}

/// Bound sockets of a /proc/net/udp table: `sl local rem st ... uid timeout inode`.
pub fn parse_udp_table(text: &str) -> Vec<UdpSocket> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let port = u16::from_str_radix(fields.get(1)?.rsplit_once(':')?.1, 16).ok()?;
            let inode = fields.get(9)?.parse().ok()?;
            (port != 0 && inode != 0).then_some(UdpSocket { inode, port })
        })
        .collect()
}

/// A process's short name, as the kernel keeps it (at most 15 bytes). The
/// process chooses it, so control characters (terminal escapes) become `?`.
pub fn comm_of(pid: u32) -> String {
    let comm = fs::read(format!("/proc/{pid}/comm")).unwrap_or_default();
    sanitize_comm(&comm)
}

fn sanitize_comm(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw.strip_suffix(b"\n").unwrap_or(raw));
    text.chars().take(15).map(|c| if c.is_control() { '?' } else { c }).collect()
}

/// What packets taught about one candidate.
#[derive(Clone, Debug, Default)]
struct Learned {
    /// Initiations not answered yet: (sender index, endpoint, direction), oldest first.
    pending: VecDeque<(u32, SocketAddr, u8)>,
    /// Endpoints with a completed handshake, in order of confirmation, and
    /// when (unix seconds) the last one completed.
    peers: Vec<(SocketAddr, u64)>,
    /// The mark seen on the socket's outgoing handshake messages.
    mark: Option<u32>,
}

/// How long a confirmed speaker that one discovery did not list (its
/// sockets unreadable for a moment: a busy privileged helper, a process
/// mid-exec) is kept. Once confirmed, its handshakes are a known peer's and
/// no longer a candidate's, so dropping it at once would lose it for as
/// long as its peer's slot outlives it (the probes keep a vanished peer's
/// slot for 30 s too).
pub const CONFIRMED_GRACE: Duration = Duration::from_secs(30);

/// The candidates of the newest discovery and what their packets showed.
/// Bounded: at most [`MAX_CANDIDATES`] candidates, each with at most
/// [`MAX_PENDING`] open initiations and [`MAX_SPEAKER_PEERS`] peers; state
/// of a candidate that vanished from discovery is dropped with it (after
/// [`CONFIRMED_GRACE`] for a confirmed speaker).
#[derive(Default)]
pub struct Speakers {
    /// Candidate number (as the kernel map holds it) to candidate.
    candidates: HashMap<u32, Candidate>,
    numbers: HashMap<(u32, u64), u32>,
    next: u32,
    learned: HashMap<(u32, u64), Learned>,
    /// Confirmed speakers missing from discovery, since when.
    missing_since: HashMap<(u32, u64), Instant>,
}

impl Speakers {
    /// Follows the newest discovery's candidates; returns the kernel map's
    /// wanted contents ((namespace, port) -> candidate number).
    pub fn set_candidates(&mut self, candidates: &[Candidate]) -> HashMap<(u32, u16), u32> {
        self.set_candidates_at(candidates, Instant::now())
    }

    fn set_candidates_at(&mut self, candidates: &[Candidate], now: Instant) -> HashMap<(u32, u16), u32> {
        let mut numbers = HashMap::new();
        let mut by_number = HashMap::new();
        let mut wanted = HashMap::new();
        for candidate in candidates.iter().take(MAX_CANDIDATES) {
            let key = candidate.key();
            let number = match self.numbers.get(&key) {
                Some(number) => *number,
                None => {
                    self.next += 1;
                    self.next
                }
            };
            numbers.insert(key, number);
            by_number.insert(number, candidate.clone());
            wanted.insert((candidate.netns as u32, candidate.socket.port), number);
        }
        self.missing_since.retain(|key, _| !numbers.contains_key(key));
        for (key, number) in &self.numbers {
            let confirmed = self.learned.get(key).is_some_and(|learned| !learned.peers.is_empty());
            if numbers.contains_key(key) || !confirmed || numbers.len() >= MAX_CANDIDATES {
                continue;
            }
            let since = *self.missing_since.entry(*key).or_insert(now);
            let Some(candidate) = self.candidates.get(number) else { continue };
            if now.duration_since(since) < CONFIRMED_GRACE {
                numbers.insert(*key, *number);
                wanted.insert((candidate.netns as u32, candidate.socket.port), *number);
                by_number.insert(*number, candidate.clone());
            }
        }
        self.missing_since.retain(|key, _| numbers.contains_key(key));
        self.learned.retain(|key, _| numbers.contains_key(key));
        self.numbers = numbers;
        self.candidates = by_number;
        wanted
    }

    pub fn candidate_ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.candidates.values().map(|c| c.socket.port)
    }

    /// Takes one handshake message of a candidate socket. True when it
    /// confirmed a new peer (the topology then changes).
    pub fn on_event(&mut self, event: &CandidateEvent) -> bool {
        let Some(candidate) = self.candidates.get(&event.candidate) else { return false };
        let key = candidate.key();
        let endpoint = endpoint_of(event);
        let learned = self.learned.entry(key).or_default();
        if event.direction == DIR_EGRESS {
            learned.mark = Some(event.mark);
        }
        match event.message_type {
            wire::MESSAGE_HANDSHAKE_INITIATION => {
                if learned.pending.len() >= MAX_PENDING {
                    learned.pending.pop_front();
                }
                learned.pending.push_back((event.sender, endpoint, event.direction));
                false
            }
            wire::MESSAGE_HANDSHAKE_RESPONSE => {
                let answered = learned.pending.iter().position(|(sender, from, direction)| {
                    *sender == event.receiver && *from == endpoint && *direction != event.direction
                });
                let Some(at) = answered else { return false };
                learned.pending.remove(at);
                if let Some(known) = learned.peers.iter_mut().find(|(e, _)| *e == endpoint) {
                    known.1 = unix_now();
                    return false;
                }
                if learned.peers.len() >= MAX_SPEAKER_PEERS {
                    return false;
                }
                learned.peers.push((endpoint, unix_now()));
                true
            }
            _ => false,
        }
    }

    /// Confirmed speakers as tunnels, added to `topology` (one per device
    /// and process; its socket is the one handshakes completed on).
    pub fn add_to(&self, topology: &mut Topology) {
        let mut speakers: Vec<(&Candidate, &Learned)> = self
            .numbers
            .iter()
            .filter_map(|(key, number)| Some((self.candidates.get(number)?, self.learned.get(key)?)))
            .filter(|(_, learned)| !learned.peers.is_empty())
            .collect();
        speakers.sort_by_key(|(c, _)| (c.netns, c.ifindex, c.socket.port));
        for (candidate, learned) in speakers {
            let taken = topology.tunnels.iter().any(|t| t.netns == candidate.netns && t.ifindex == candidate.ifindex);
            if taken {
                continue; // the device already is a tunnel (a second socket, or UAPI came back)
            }
            let peers = learned
                .peers
                .iter()
                .map(|(endpoint, at)| Peer {
                    public_key: keyless_id(*endpoint),
                    endpoint: Some(*endpoint),
                    last_handshake_sec: *at,
                    ..Peer::default()
                })
                .collect();
            topology.tunnels.push(Tunnel {
                netns: candidate.netns,
                netns_label: candidate.netns_label.clone(),
                interface: candidate.interface.clone(),
                ifindex: candidate.ifindex,
                implementation: super::Implementation::Userspace,
                daemon_pid: Some(candidate.pid),
                discovered_by: DiscoveredBy::Packets,
                process: Some(Process { pid: candidate.pid, comm: candidate.comm.clone() }),
                device: Some(Device { listen_port: candidate.socket.port, fwmark: learned.mark.unwrap_or(0), peers }),
            });
        }
        topology.tunnels.sort_by(|a, b| (&a.netns_label, &a.interface).cmp(&(&b.netns_label, &b.interface)));
    }

    /// A confirmed speaker's peer completed another handshake (seen as a
    /// known peer's response): its handshake time moves on. Returns the
    /// new time for the topology's copy.
    pub fn on_peer_handshake(&mut self, netns: u64, ifindex: u32, public_key: &str) -> Option<u64> {
        let endpoint: SocketAddr = public_key.strip_prefix(KEYLESS_PREFIX)?.parse().ok()?;
        let key = self.candidates.values().find(|c| c.netns == netns && c.ifindex == ifindex)?.key();
        let peers = &mut self.learned.get_mut(&key)?.peers;
        let known = peers.iter_mut().find(|(e, _)| *e == endpoint)?;
        known.1 = unix_now();
        Some(known.1)
    }

    /// Candidates and open initiations held (for bounds checks).
    pub fn state_size(&self) -> (usize, usize) {
        (self.candidates.len(), self.learned.values().map(|l| l.pending.len()).sum())
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn endpoint_of(event: &CandidateEvent) -> SocketAddr {
    let ip = if event.family == AF_INET {
        IpAddr::V4(Ipv4Addr::new(event.remote[0], event.remote[1], event.remote[2], event.remote[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(event.remote))
    };
    SocketAddr::new(ip, event.remote_port)
}

#[cfg(test)]
mod tests {
    use super::*;
    use wgtrace_common::{CandidateKey, DIR_INGRESS, EVENT_CANDIDATE};

    fn candidate(pid: u32, inode: u64, port: u16) -> Candidate {
        Candidate {
            netns: 7,
            netns_label: "host".into(),
            interface: "tailscale0".into(),
            ifindex: 4,
            pid,
            comm: "tailscaled".into(),
            socket: UdpSocket { inode, port },
        }
    }

    fn event(
        number: u32,
        message_type: u8,
        direction: u8,
        sender: u32,
        receiver: u32,
        remote: [u8; 4],
    ) -> CandidateEvent {
        let mut event = CandidateEvent {
            kind: EVENT_CANDIDATE,
            candidate: number,
            key: CandidateKey { netns: 7, port: 41641, _pad: 0 },
            family: AF_INET,
            remote_port: 41642,
            mark: 0x80000,
            sender,
            receiver,
            message_type,
            direction,
            ..CandidateEvent::default()
        };
        event.remote[..4].copy_from_slice(&remote);
        event
    }

    #[test]
    fn process_names_cannot_carry_terminal_escapes() {
        assert_eq!(sanitize_comm(b"tailscaled\n"), "tailscaled");
        assert_eq!(sanitize_comm(b"\x1b[2Jevil\x07\n"), "?[2Jevil?");
    }

    #[test]
    fn udp_tables_give_bound_ports_and_inodes() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
                    \x20 12: 00000000:A2A9 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 98765 2 0000000000000000 0\n\
                    \x20 13: 00000000:0000 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 11 2 0000000000000000 0\n";
        assert_eq!(parse_udp_table(text), vec![UdpSocket { inode: 98765, port: 41641 }]);
        assert_eq!(socket_inode(Path::new("socket:[98765]")), Some(98765));
        assert_eq!(socket_inode(Path::new("/dev/net/tun")), None);
    }

    #[test]
    fn only_an_initiation_answered_by_its_index_makes_a_speaker() {
        let mut speakers = Speakers::default();
        let wanted = speakers.set_candidates(&[candidate(100, 5, 41641)]);
        let number = wanted[&(7, 41641)];
        let peer = [192, 0, 2, 200];
        // A response to nothing, a response with the wrong index, one from
        // another endpoint, and one in the same direction: no speaker.
        assert!(!speakers.on_event(&event(number, 2, DIR_INGRESS, 9, 1234, peer)));
        assert!(!speakers.on_event(&event(number, 1, DIR_EGRESS, 1234, 0, peer)));
        assert!(!speakers.on_event(&event(number, 2, DIR_INGRESS, 9, 4321, peer)));
        assert!(!speakers.on_event(&event(number, 2, DIR_INGRESS, 9, 1234, [192, 0, 2, 201])));
        assert!(!speakers.on_event(&event(number, 2, DIR_EGRESS, 9, 1234, peer)));
        let mut topology = Topology::default();
        speakers.add_to(&mut topology);
        assert!(topology.tunnels.is_empty(), "no pairing yet");
        assert!(speakers.on_event(&event(number, 2, DIR_INGRESS, 9, 1234, peer)));
        speakers.add_to(&mut topology);
        let tunnel = &topology.tunnels[0];
        assert_eq!(tunnel.interface, "tailscale0");
        assert_eq!(tunnel.discovered_by, DiscoveredBy::Packets);
        assert_eq!(tunnel.process, Some(Process { pid: 100, comm: "tailscaled".into() }));
        let device = tunnel.device.as_ref().unwrap();
        assert_eq!((device.listen_port, device.fwmark), (41641, 0x80000));
        assert_eq!(device.peers[0].endpoint, Some("192.0.2.200:41642".parse().unwrap()));
        assert!(is_keyless(&device.peers[0].public_key));
        assert!(device.peers[0].last_handshake_sec > 0, "the handshake seen is the peer's last");
        let id = device.peers[0].public_key.clone();
        assert!(speakers.on_peer_handshake(7, 4, &id).is_some());
        assert!(speakers.on_peer_handshake(7, 5, &id).is_none(), "another device");
        // A responder is confirmed the other way round.
        let wanted = speakers.set_candidates(&[candidate(100, 5, 41641), candidate(200, 6, 41642)]);
        let other = wanted[&(7, 41642)];
        assert!(!speakers.on_event(&event(other, 1, DIR_INGRESS, 77, 0, peer)));
        assert!(speakers.on_event(&event(other, 2, DIR_EGRESS, 5, 77, peer)));
    }

    #[test]
    fn a_flood_stays_within_the_bounds() {
        let mut speakers = Speakers::default();
        let many: Vec<Candidate> = (0..1000).map(|i| candidate(i, i as u64, 1000 + i as u16)).collect();
        let wanted = speakers.set_candidates(&many);
        assert_eq!(wanted.len(), MAX_CANDIDATES);
        for number in wanted.values() {
            for index in 0..10_000u32 {
                speakers.on_event(&event(*number, 1, DIR_EGRESS, index, 0, [192, 0, 2, 1]));
                speakers.on_event(&event(
                    *number,
                    2,
                    DIR_INGRESS,
                    index,
                    index.wrapping_add(1) | 1 << 31,
                    [192, 0, 2, 1],
                ));
            }
        }
        let (candidates, pending) = speakers.state_size();
        assert_eq!(candidates, MAX_CANDIDATES);
        assert!(pending <= MAX_CANDIDATES * MAX_PENDING, "{pending}");
        let mut topology = Topology::default();
        speakers.add_to(&mut topology);
        assert!(topology.tunnels.is_empty(), "unpaired messages make no speaker");
        // An unknown candidate number is ignored; vanished candidates drop
        // their state (none of these was confirmed).
        assert!(!speakers.on_event(&event(999_999, 2, DIR_INGRESS, 0, 0, [192, 0, 2, 1])));
        speakers.set_candidates(&[]);
        assert_eq!(speakers.state_size(), (0, 0));
    }

    #[test]
    fn a_confirmed_speaker_outlives_a_discovery_that_missed_it_for_a_while() {
        let mut speakers = Speakers::default();
        let start = Instant::now();
        let wanted = speakers.set_candidates_at(&[candidate(100, 5, 41641)], start);
        let number = wanted[&(7, 41641)];
        let peer = [192, 0, 2, 200];
        assert!(!speakers.on_event(&event(number, 1, DIR_EGRESS, 1234, 0, peer)));
        assert!(speakers.on_event(&event(number, 2, DIR_INGRESS, 9, 1234, peer)));
        // One discovery without it: still a speaker, still in the kernel map.
        let wanted = speakers.set_candidates_at(&[], start + Duration::from_secs(1));
        assert_eq!(wanted.get(&(7, 41641)), Some(&number));
        let mut topology = Topology::default();
        speakers.add_to(&mut topology);
        assert_eq!(topology.tunnels.len(), 1);
        // Listed again: the grace starts over; missing past it: gone.
        speakers.set_candidates_at(&[candidate(100, 5, 41641)], start + Duration::from_secs(2));
        speakers.set_candidates_at(&[], start + Duration::from_secs(3));
        assert_eq!(speakers.state_size().0, 1);
        let wanted = speakers.set_candidates_at(&[], start + Duration::from_secs(4) + CONFIRMED_GRACE);
        assert!(wanted.is_empty());
        assert_eq!(speakers.state_size(), (0, 0));
    }
}
