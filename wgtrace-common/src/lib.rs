//! Types shared by the eBPF programs and userspace, and the pure parsers both
//! sides use. Everything here is `no_std`, `#[repr(C)]` and free of padding
//! surprises: each struct spells its padding out so that the kernel and
//! userspace agree byte for byte.
#![no_std]

pub mod wire;

/// Address family values as the kernel uses them.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_ICMPV6: u8 = 58;

/// Where a packet was seen relative to the device in its key.
pub const DIR_EGRESS: u8 = 0;
pub const DIR_INGRESS: u8 = 1;

/// Kinds of records on the ring buffer. The first four bytes of every record
/// hold one of these.
pub const EVENT_NEW_FLOW: u32 = 1;
pub const EVENT_HANDSHAKE: u32 = 2;
pub const EVENT_NEW_ROUTE: u32 = 3;
/// A latency probe packet (echo request/reply, SYN/SYN-ACK) on a tunnel device.
pub const EVENT_PLAINTEXT: u32 = 4;
/// One encryption stage of a sampled plaintext packet (see [`TransmitEvent`]).
pub const EVENT_TRANSMIT: u32 = 5;
/// A handshake message of a candidate speaker's socket (see [`CandidateEvent`]).
pub const EVENT_CANDIDATE: u32 = 6;

/// Slots of the `COUNTERS` per-CPU array.
pub const COUNTER_EVENTS_LOST: u32 = 0;
pub const COUNTER_READ_ERRORS: u32 = 1;
/// WireGuard-shaped packets sent by something other than a UDP socket
/// (raw or packet sockets): forged, never attributed to a tunnel.
pub const COUNTER_FORGED: u32 = 2;
/// Known peers' packets not counted because the path map was full of
/// other paths (its keys are topology only, and userspace removes those of
/// peers that are gone, so only a host with more paths than it holds).
pub const COUNTER_PATHS_FULL: u32 = 3;
/// Candidate speakers' handshake messages not reported because the
/// per-CPU budget for them was used up (a flood from a TUN holder).
pub const COUNTER_CANDIDATES_DROPPED: u32 = 4;
pub const COUNTER_SLOTS: u32 = 5;

/// An offset the running kernel's BTF could not provide.
pub const OFFSET_UNAVAILABLE: u32 = u32::MAX;
pub const SOCK_RAW: u16 = 3;
pub const AF_PACKET: u16 = 17;
pub const IPPROTO_RAW: u16 = 255;

/// Known peers (tunnel socket and endpoint) the kernel side counts. Only
/// userspace adds to this map, from the discovered topology.
pub const PEER_MAP_ENTRIES: u32 = 4096;
/// Each CPU remembers its last few `PEERS` answers, so that a tunnel's
/// packets (and its socket's route lookups) find their peer in a handful of
/// loads instead of a hash lookup each. Direct-mapped by ports, with ways
/// of its own for each hook (see `PEER_CACHE_HOOKS`).
pub const PEER_CACHE_WAYS: u32 = 8;
/// The hooks that ask `PEERS`: a FIB lookup runs in process context and can
/// be interrupted on its CPU by a packet hook in softirq, so hooks never
/// share a cache entry (the kernel never nests a program in itself).
pub const PEER_CACHE_HOOKS: u32 = 4;
pub const PEER_CACHE_XMIT: u32 = 0;
pub const PEER_CACHE_RECEIVE: u32 = 1;
pub const PEER_CACHE_FIB4: u32 = 2;
pub const PEER_CACHE_FIB6: u32 = 3;
/// Paths (peer, device, mark, direction) and route decisions (peer, mark,
/// table). Entries exist only for known peers, so these fill only with real
/// paths. `ROUTES` is LRU (touched on every lookup); `PATHS` is not: a busy
/// path counts in its peer's cache way and touches `PATHS` only when it
/// moves its counts, so an LRU would take it for the coldest entry.
/// Userspace removes the paths of peers that are gone.
pub const PATH_MAP_ENTRIES: u32 = 4096;
pub const ROUTE_MAP_ENTRIES: u32 = 4096;
/// The listen-port bitmap: one bit per UDP port, 64 per slot.
pub const PORT_BITMAP_SLOTS: u32 = 1024;
/// `net_device.type` of WireGuard and TUN devices (no link layer).
pub const ARPHRD_NONE: u16 = 0xfffe;
pub const RING_BUFFER_BYTES: u32 = 1 << 20;
pub const TUNNEL_DEVICE_ENTRIES: u32 = 4096;
pub const TRANSMIT_PENDING_ENTRIES: u32 = 1024;

pub const IFNAMSIZ: usize = 16;

/// Candidate WireGuard speakers' sockets: UDP sockets of TUN holders that
/// serve no UAPI (tailscaled-style daemons). Written by userspace only, from
/// discovery, so no packet can add to it.
pub const CANDIDATE_MAP_ENTRIES: u32 = 64;

/// A candidate speaker's socket: its namespace and local port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CandidateKey {
    pub netns: u32,
    /// Host byte order.
    pub port: u16,
    pub _pad: u16,
}

/// A handshake initiation or response (types 1 and 2 only) leaving or
/// entering a candidate socket. Userspace pairs initiation and response by
/// their indices before it believes the socket speaks WireGuard.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CandidateEvent {
    pub kind: u32,
    /// Userspace's number for the candidate (the `CANDIDATES` value).
    pub candidate: u32,
    pub timestamp_ns: u64,
    pub key: CandidateKey,
    pub family: u16,
    pub remote_port: u16,
    pub remote: [u8; 16],
    /// `skb->mark` (the socket's SO_MARK on egress).
    pub mark: u32,
    pub ifindex: u32,
    pub sender: u32,
    pub receiver: u32,
    pub length: u32,
    pub message_type: u8,
    pub direction: u8,
    pub _pad: [u8; 2],
}

/// Kernel struct field offsets, resolved from the running kernel's BTF at load
/// time and written into the programs' read-only data before loading. The eBPF
/// side reads them as constants, so the verifier sees fixed offsets.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    // struct flowi4
    pub flowi4_oif: u32,
    pub flowi4_iif: u32,
    pub flowi4_mark: u32,
    pub flowi4_proto: u32,
    pub flowi4_saddr: u32,
    pub flowi4_daddr: u32,
    pub flowi4_sport: u32,
    pub flowi4_dport: u32,
    // struct flowi6
    pub flowi6_oif: u32,
    pub flowi6_iif: u32,
    pub flowi6_mark: u32,
    pub flowi6_proto: u32,
    pub flowi6_saddr: u32,
    pub flowi6_daddr: u32,
    pub flowi6_sport: u32,
    pub flowi6_dport: u32,
    // routing results
    pub fib_nh_common_dev: u32,
    pub fib6_result_nh: u32,
    pub fib6_nh_dev: u32,
    pub fib6_table_id: u32,
    // struct net_device / struct net
    pub net_device_ifindex: u32,
    pub net_device_name: u32,
    pub net_device_net: u32,
    pub net_inum: u32,
    // struct sk_buff
    pub skb_head: u32,
    pub skb_data: u32,
    pub skb_network_header: u32,
    pub skb_protocol: u32,
    pub skb_mark: u32,
    pub skb_dev: u32,
    pub skb_sk: u32,
    pub skb_len: u32,
    /// `sk_buff.end`: offset of `skb_shared_info` from `head` (64-bit kernels).
    pub skb_end: u32,
    /// `skb_shared_info.gso_size`; `gso_segs` follows it directly.
    pub shinfo_gso_size: u32,
    pub net_device_type: u32,
    /// `sock.sk_type`, `sock.sk_protocol` and `sock.__sk_common.skc_family`,
    /// or [`OFFSET_UNAVAILABLE`] on kernels where the first two are
    /// bit-fields (before 5.6): then the sending socket is not checked.
    pub sock_type: u32,
    pub sock_protocol: u32,
    pub sock_family: u32,
    // current task's network namespace, for lookups with no result device
    pub task_nsproxy: u32,
    pub nsproxy_net: u32,
}

/// A known peer as packets name it: the tunnel's socket (namespace and
/// listen port) and the peer's endpoint. Written by userspace only.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PeerKey {
    /// Inode number of the tunnel's network namespace.
    pub netns: u32,
    pub family: u16,
    /// Ports in host byte order.
    pub local_port: u16,
    pub remote_port: u16,
    pub _pad: u16,
    pub remote: [u8; 16],
}

/// One way of the per-CPU peer cache: a `PEERS` answer, valid while the
/// map's generation (bumped by userspace on every change) is unchanged, and,
/// in the packet hooks' ways, that peer's counts on its current path on
/// this CPU, not yet added to `PATHS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerCacheEntry {
    pub key: PeerKey,
    /// The peer's slot, or `u32::MAX`: `PEERS` has no such peer.
    pub slot: u32,
    pub generation: u32,
    pub _pad: u32,
    pub pending: PendingPath,
}

/// A peer's counts on one path, kept in its cache way on one CPU so that a
/// packet costs no hash lookup. They move to `PATHS` (under the way's slot
/// and the hook's direction) only when something changes: the way is taken
/// by another peer or slot, or another path of the peer takes it over.
/// `flushes` counts those moves, so that userspace can tell a consistent
/// reading of `PATHS` plus the ways from one a move fell into.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingPath {
    /// 0: no path (no device has index 0).
    pub ifindex: u32,
    pub mark: u32,
    pub stats: PathStats,
    pub flushes: u64,
}

/// A way's path that has seen no packet for this long may be taken over by
/// another path of its peer (after a fix, the old path stops at once).
pub const PENDING_IDLE_NS: u64 = 1_000_000_000;
/// How often, nominally, userspace writes `COARSE_CLOCK` (CLOCK_MONOTONIC,
/// the clock of `bpf_ktime_get_ns`): the resolution of `last_seen_ns` in
/// `PATHS`, the pending ways and (for repeated answers) `ROUTES`.
pub const COARSE_CLOCK_TICK_NS: u64 = 50_000_000;

/// One path of one known peer's transport: where (device, direction) and
/// with which mark. The peer is userspace's slot number from `PEERS`; the
/// device is in the tunnel's own namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PathKey {
    pub peer: u32,
    pub ifindex: u32,
    pub mark: u32,
    pub direction: u8,
    pub _pad: [u8; 3],
}

/// Per-CPU counters of one path; userspace sums the CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PathStats {
    /// Wire packets: a GSO/GRO skb counts its segments.
    pub packets: u64,
    /// UDP payload bytes (WireGuard messages), as WireGuard's own tx/rx
    /// counters count them.
    pub bytes: u64,
    pub last_seen_ns: u64,
    /// Of those, datagrams the kernel fragmented on the way out (IPv4
    /// first fragments): the path's MTU is smaller than the tunnel's
    /// packets. Later fragments carry no ports and are not seen.
    pub fragmented: u64,
}

/// A known peer's WireGuard message seen on a device: sent for the first
/// packet of a path and for every handshake message.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketEvent {
    pub kind: u32,
    pub message_type: u8,
    pub _pad: [u8; 3],
    pub timestamp_ns: u64,
    pub path: PathKey,
    pub netns: u32,
    /// UDP payload length (of the first segment's message for GSO).
    pub length: u32,
    /// Sender index (types 1 and 2), 0 otherwise.
    pub sender: u32,
    /// Receiver index (types 2, 3 and 4), 0 otherwise.
    pub receiver: u32,
    pub ifname: [u8; IFNAMSIZ],
}

/// Routing-table lookups for a known peer's transport, by mark and table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RouteKey {
    pub peer: u32,
    pub mark: u32,
    pub table: u32,
    pub _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RouteStats {
    pub lookups: u64,
    pub last_seen_ns: u64,
    /// Device the table pointed to (0 when the lookup failed).
    pub result_ifindex: u32,
    /// The lookup's error: 0, or a negative errno (e.g. -EAGAIN for "not in this table").
    pub error: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RouteEvent {
    pub kind: u32,
    pub error: i32,
    pub timestamp_ns: u64,
    pub key: RouteKey,
    pub result_ifindex: u32,
    pub ifname: [u8; IFNAMSIZ],
    pub _pad: u32,
}

/// A network device, by namespace and index.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DeviceKey {
    pub netns: u32,
    pub ifindex: u32,
}

/// Values of the `TUNNEL_DEVICES` map: how the tunnel behind a device
/// treats packets.
pub const TUNNEL_USERSPACE: u8 = 1;
/// Kernel WireGuard: the skb that enters the device is the one that leaves.
pub const TUNNEL_KERNEL: u8 = 2;

/// What a plaintext probe packet is.
pub const PLAINTEXT_ECHO_REQUEST: u8 = 1;
pub const PLAINTEXT_ECHO_REPLY: u8 = 2;
pub const PLAINTEXT_SYN: u8 = 3;
pub const PLAINTEXT_SYN_ACK: u8 = 4;

/// An ICMP/ICMPv6 echo or TCP handshake packet seen on a tunnel's own device:
/// requests leaving, replies arriving. Userspace pairs them into inner RTTs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlaintextEvent {
    pub kind: u32,
    pub what: u8,
    pub direction: u8,
    pub family: u16,
    pub timestamp_ns: u64,
    pub device: DeviceKey,
    /// The far end: destination of a request, source of a reply.
    pub remote: [u8; 16],
    /// Echo identifier, or the local TCP port.
    pub id: u16,
    /// Echo sequence number, or the remote TCP port.
    pub port_or_zero: u16,
    /// Echo sequence, or the TCP sequence number a SYN-ACK acknowledges (minus one).
    pub sequence: u32,
    /// IP length of the packet.
    pub ip_length: u32,
    pub _pad: u32,
}

/// Where the next encryption of a sampled packet is expected: in `netns`, a
/// WireGuard data message whose UDP payload is `payload_length` bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TransmitKey {
    pub netns: u32,
    pub payload_length: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TransmitOrigin {
    /// When the plaintext entered its tunnel device.
    pub entered_ns: u64,
    /// The tunnel device it entered.
    pub ifindex: u32,
    /// How many encryptions it has been through so far.
    pub stage: u32,
}

/// A sampled plaintext packet, seen leaving `egress_ifindex` as a WireGuard
/// data message after `stage` encryptions. The last stage (leaving a device
/// that is not a tunnel) ends its transmit latency.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TransmitEvent {
    pub kind: u32,
    pub stage: u32,
    pub entered_ns: u64,
    pub left_ns: u64,
    pub netns: u32,
    pub origin_ifindex: u32,
    pub egress_ifindex: u32,
    pub mark: u32,
    /// [`TRANSMIT_BY_SKB`] or [`TRANSMIT_BY_LENGTH`].
    pub method: u32,
    pub _pad: u32,
}

/// The sample was matched by skb identity (kernel WireGuard).
pub const TRANSMIT_BY_SKB: u32 = 1;
/// The sample was matched by its predicted ciphertext length (userspace).
pub const TRANSMIT_BY_LENGTH: u32 = 2;

/// Length of the WireGuard data message (UDP payload) that carries a
/// plaintext packet of `plaintext_length` bytes: 16-byte header, plaintext
/// padded to 16, 16-byte tag. Implementations pad to a multiple of 16 (capped
/// at the MTU, which sampled packets, being small, never reach).
#[inline(always)]
pub const fn ciphertext_length(plaintext_length: u32) -> u32 {
    32 + ((plaintext_length + 15) & !15)
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are #[repr(C)], made only of integers and byte
    // arrays, with explicit padding, so any bit pattern is valid.
    unsafe impl aya::Pod for KernelOffsets {}
    unsafe impl aya::Pod for PeerKey {}
    unsafe impl aya::Pod for PathKey {}
    unsafe impl aya::Pod for PathStats {}
    unsafe impl aya::Pod for PeerCacheEntry {}
    unsafe impl aya::Pod for RouteKey {}
    unsafe impl aya::Pod for RouteStats {}
    unsafe impl aya::Pod for DeviceKey {}
    unsafe impl aya::Pod for TransmitKey {}
    unsafe impl aya::Pod for TransmitOrigin {}
    unsafe impl aya::Pod for CandidateKey {}
}

/// An address (`PeerKey::remote`) from its four words, each as it lies in
/// memory (`u32::from_ne_bytes` of the packet's bytes). The kernel side
/// builds keys this way: a zeroed byte array with the address copied in
/// compiles to a call of the linked `memset`, a byte loop of dozens of
/// instructions, on every packet past the gate.
#[inline(always)]
pub fn address_bytes(words: [u32; 4]) -> [u8; 16] {
    // SAFETY: same size, and every bit pattern is valid for both.
    unsafe { core::mem::transmute(words) }
}

/// A `PathKey` from words, for the same reason: `direction` and its three
/// zero padding bytes are one word, every byte of it set.
#[inline(always)]
pub fn path_key(peer: u32, ifindex: u32, mark: u32, direction: u8) -> PathKey {
    let last = u32::from_ne_bytes([direction, 0, 0, 0]);
    // SAFETY: `PathKey` is repr(C), 16 bytes of integers without implicit
    // padding (the test below pins it), valid for any bits.
    unsafe { core::mem::transmute::<[u32; 4], PathKey>([peer, ifindex, mark, last]) }
}

#[cfg(test)]
mod layout_tests {
    use super::*;

    #[test]
    fn keys_built_from_words_are_the_fields() {
        assert_eq!((core::mem::size_of::<PathKey>(), core::mem::offset_of!(PathKey, direction)), (16, 12));
        let key = path_key(7, 3, 51820, DIR_INGRESS);
        assert_eq!(key, PathKey { peer: 7, ifindex: 3, mark: 51820, direction: DIR_INGRESS, _pad: [0; 3] });
        // 28 bytes, no implicit padding: also what `peer_way` compares as
        // seven words.
        assert_eq!((core::mem::size_of::<PeerKey>(), core::mem::offset_of!(PeerKey, remote)), (28, 12));
        let words = [0x0102_0304, 0x0506_0708, 0x090a_0b0c, 0x0d0e_0f10u32];
        let bytes = address_bytes(words);
        for (i, word) in words.iter().enumerate() {
            assert_eq!(bytes[i * 4..i * 4 + 4], word.to_ne_bytes(), "word {i} in place");
        }
    }
}
