//! wgtrace's kernel side: four BTF tracepoints, all in vmlinux so they work
//! for kernel WireGuard (usually a module) and userspace implementations alike.
//!
//! * `fib_table_lookup` / `fib6_table_lookup`: routing-table lookups of a
//!   known peer's transport, aggregated per (peer, mark, table).
//! * `net_dev_start_xmit` / `netif_receive_skb`: every packet leaving or
//!   entering any device of any namespace, including devices created after we
//!   attached. Chosen over TCX because tracepoints need no per-interface
//!   attachment (nothing to chase as namespaces and tunnels come and go, and
//!   nothing left on interfaces if we die), and over classic tracepoints
//!   because tp_btf skips building the trace record.
//!
//! Every packet on the host passes through here, so the path is built to let
//! everything that is not a known tunnel's leave at once: one read of the
//! IP and transport headers, then one bit of the listen-port bitmap (an array
//! map: the verifier inlines its lookup into plain loads) or, for plaintext
//! probes, the device type. The FIB hooks test the same bit first, from the
//! flow's fields, with no read at all. Only then is a known peer looked up
//! (by tunnel namespace, listen port and endpoint, all written by userspace),
//! so traffic from anyone else creates no state. Per-CPU path counters count
//! wire packets (a GSO skb's segments) and UDP payload bytes, as WireGuard
//! does; the ring buffer carries only new paths, new route decisions,
//! handshake messages and latency samples, and a failed reservation is
//! counted, never silent. Helpers are inlined: a BPF subprogram may not hand
//! a pointer to its stack back to its caller, and one frame keeps the
//! verifier's work small.
#![no_std]
#![no_main]

use aya_ebpf::{
    helpers::{bpf_get_current_task, bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_kernel_buf},
    macros::{btf_tracepoint, map},
    maps::{Array, HashMap, LruHashMap, LruPerCpuHashMap, PerCpuArray, RingBuf},
    programs::BtfTracePointContext,
};
use wgtrace_common::{
    AF_INET, AF_INET6, AF_PACKET, ARPHRD_NONE, CANDIDATE_MAP_ENTRIES, COUNTER_CANDIDATES_DROPPED, COUNTER_EVENTS_LOST,
    COUNTER_FORGED, COUNTER_PATHS_FULL, COUNTER_READ_ERRORS, COUNTER_SLOTS, CandidateEvent, CandidateKey, DIR_EGRESS,
    DIR_INGRESS, DeviceKey, EVENT_CANDIDATE, EVENT_HANDSHAKE, EVENT_NEW_FLOW, EVENT_NEW_ROUTE, EVENT_PLAINTEXT,
    EVENT_TRANSMIT, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_RAW, IPPROTO_TCP, IPPROTO_UDP, KernelOffsets,
    OFFSET_UNAVAILABLE, PATH_MAP_ENTRIES, PEER_MAP_ENTRIES, PLAINTEXT_ECHO_REPLY, PLAINTEXT_ECHO_REQUEST,
    PLAINTEXT_SYN, PLAINTEXT_SYN_ACK, PORT_BITMAP_SLOTS, PacketEvent, PathKey, PathStats, PeerKey, PlaintextEvent,
    RING_BUFFER_BYTES, ROUTE_MAP_ENTRIES, RouteEvent, RouteKey, RouteStats, SOCK_RAW, TRANSMIT_BY_LENGTH,
    TRANSMIT_BY_SKB, TRANSMIT_PENDING_ENTRIES, TUNNEL_DEVICE_ENTRIES, TUNNEL_KERNEL, TransmitEvent, TransmitKey,
    TransmitOrigin, ciphertext_length,
    wire::{self, HEADER_PREFIX_LEN},
};

/// Filled in by userspace from the running kernel's BTF before loading.
#[unsafe(no_mangle)]
static KERNEL_OFFSETS: KernelOffsets = unsafe { core::mem::zeroed() };

/// One bit per UDP port that some tunnel (in any namespace) listens on:
/// the first and only test most packets see.
#[map]
static TUNNEL_PORT_BITS: Array<u64> = Array::with_max_entries(PORT_BITMAP_SLOTS, 0);

/// Known peers by tunnel socket and endpoint, to their slot number.
#[map]
static PEERS: HashMap<PeerKey, u32> = HashMap::with_max_entries(PEER_MAP_ENTRIES, 0);

/// Candidate speakers' sockets (namespace, port) to userspace's candidate
/// number: UDP sockets of TUN holders without a UAPI. Only their handshake
/// messages are reported, nothing is counted or stored here.
#[map]
static CANDIDATES: HashMap<CandidateKey, u32> = HashMap::with_max_entries(CANDIDATE_MAP_ENTRIES, 0);

/// Candidate events per CPU and window ([window start ns, count]): a TUN
/// holder flooding handshake-shaped datagrams from its own socket can use
/// only this much of the ring buffer, never the known tunnels' share.
#[map]
static CANDIDATE_BUDGET: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

#[map]
static PATHS: LruPerCpuHashMap<PathKey, PathStats> = LruPerCpuHashMap::with_max_entries(PATH_MAP_ENTRIES, 0);

#[map]
static ROUTES: LruPerCpuHashMap<RouteKey, RouteStats> = LruPerCpuHashMap::with_max_entries(ROUTE_MAP_ENTRIES, 0);

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(RING_BUFFER_BYTES, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// The tunnels' own devices, kept current by userspace: only there are
/// plaintext packets timed.
#[map]
static TUNNEL_DEVICES: HashMap<DeviceKey, u8> = HashMap::with_max_entries(TUNNEL_DEVICE_ENTRIES, 0);

/// Sampled plaintext packets by skb address, for kernel WireGuard, which
/// keeps the skb through encryption.
#[map]
static SKB_SAMPLES: LruHashMap<u64, TransmitOrigin> = LruHashMap::with_max_entries(TRANSMIT_PENDING_ENTRIES, 0);

/// A sample not seen leaving within this long is abandoned.
const MAX_TRANSMIT_NS: u64 = 100_000_000;

/// When the last plaintext sample was taken.
#[map]
static LAST_SAMPLE: Array<u64> = Array::with_max_entries(1, 0);

/// Sampled plaintext packets awaiting their next encryption.
#[map]
static TRANSMIT_PENDING: LruHashMap<TransmitKey, TransmitOrigin> =
    LruHashMap::with_max_entries(TRANSMIT_PENDING_ENTRIES, 0);

const BPF_NOEXIST: u64 = 1;
/// `skb->protocol` as read from memory (big endian) on a little-endian host.
const ETH_P_IP_RAW: u16 = 0x0800u16.to_be();
const ETH_P_IPV6_RAW: u16 = 0x86ddu16.to_be();

/// Reads one field of `KERNEL_OFFSETS`. A volatile read keeps the compiler
/// from folding the zero placeholder; the verifier then sees the loaded
/// constant from the frozen .rodata map.
macro_rules! offset {
    ($field:ident) => {
        unsafe { core::ptr::read_volatile(&KERNEL_OFFSETS.$field) as usize }
    };
}

#[inline(always)]
fn read<T>(base: *const u8, offset: usize) -> Result<T, ()> {
    unsafe { bpf_probe_read_kernel(base.wrapping_add(offset) as *const T) }.map_err(|_| count(COUNTER_READ_ERRORS))
}

/// A field of a kernel struct reached through a BTF-typed pointer (a
/// tracepoint argument, or a pointer loaded from one): a plain load, which
/// the verifier checks against the kernel's BTF and makes fault-safe. Much
/// cheaper than a `bpf_probe_read_kernel` call; packet bytes and the task
/// struct (reached through an untyped pointer) still use the helper.
#[inline(always)]
fn load<T: Copy>(base: *const u8, offset: usize) -> T {
    unsafe { core::ptr::read_volatile(base.wrapping_add(offset) as *const T) }
}

#[inline(always)]
fn count(slot: u32) {
    if let Some(counter) = COUNTERS.get_ptr_mut(slot) {
        unsafe { *counter += 1 };
    }
}

/// Whether some tunnel listens on `port`: two plain loads.
#[inline(always)]
fn tunnel_port(port: u16) -> bool {
    match TUNNEL_PORT_BITS.get((port >> 6) as u32) {
        Some(bits) => *bits & (1u64 << (port & 63)) != 0,
        None => false,
    }
}

#[inline(always)]
fn netns_of_device(dev: *const u8) -> u32 {
    let net: *const u8 = load(dev, offset!(net_device_net));
    load(net, offset!(net_inum))
}

#[inline(always)]
fn netns_of_current_task() -> Result<u32, ()> {
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let nsproxy: *const u8 = read(task, offset!(task_nsproxy))?;
    let net: *const u8 = read(nsproxy, offset!(nsproxy_net))?;
    read(net, offset!(net_inum))
}

#[inline(always)]
fn device_name(dev: *const u8, name: &mut [u8; 16]) {
    if !dev.is_null() {
        let name_at = dev.wrapping_add(offset!(net_device_name));
        let _ = unsafe { bpf_probe_read_kernel_buf(name_at, name) };
    }
}

// ---------------------------------------------------------------------------
// Routing decisions

#[btf_tracepoint(function = "fib_table_lookup")]
pub fn fib_table_lookup(ctx: BtfTracePointContext) -> i32 {
    let _ = on_fib4_lookup(&ctx);
    0
}

/// `trace_fib_table_lookup(tb_id, flp, nhc, err)`: fires once per table a
/// lookup visits, so one packet can produce several (e.g. main, suppressed by
/// `suppress_prefixlength 0`, then 51820). Userspace picks the decision that
/// matches where the packet really went.
#[inline(always)]
fn on_fib4_lookup(ctx: &BtfTracePointContext) -> Result<(), ()> {
    let flow: *const u8 = ctx.arg(1);
    let protocol: u8 = load(flow, offset!(flowi4_proto));
    if protocol != IPPROTO_UDP {
        return Ok(());
    }
    let sport = u16::from_be(load(flow, offset!(flowi4_sport)));
    if !tunnel_port(sport) {
        return Ok(());
    }
    let nexthop: *const u8 = ctx.arg(2);
    let error: i32 = ctx.arg(3);
    let device: *const u8 =
        if nexthop.is_null() || error != 0 { core::ptr::null() } else { load(nexthop, offset!(fib_nh_common_dev)) };
    let mut peer = PeerKey {
        netns: if device.is_null() { netns_of_current_task()? } else { netns_of_device(device) },
        family: AF_INET,
        local_port: sport,
        remote_port: u16::from_be(load(flow, offset!(flowi4_dport))),
        ..PeerKey::default()
    };
    let daddr = load::<u32>(flow, offset!(flowi4_daddr)).to_ne_bytes();
    peer.remote[..4].copy_from_slice(&daddr);
    let Some(slot) = (unsafe { PEERS.get(&peer) }) else {
        return Ok(());
    };
    let key = RouteKey { peer: *slot, mark: load(flow, offset!(flowi4_mark)), table: ctx.arg(0), _pad: 0 };
    record_route(&key, device, error)
}

#[btf_tracepoint(function = "fib6_table_lookup")]
pub fn fib6_table_lookup(ctx: BtfTracePointContext) -> i32 {
    let _ = on_fib6_lookup(&ctx);
    0
}

/// `trace_fib6_table_lookup(net, res, table, flp)`.
#[inline(always)]
fn on_fib6_lookup(ctx: &BtfTracePointContext) -> Result<(), ()> {
    let flow: *const u8 = ctx.arg(3);
    let protocol: u8 = load(flow, offset!(flowi6_proto));
    if protocol != IPPROTO_UDP {
        return Ok(());
    }
    let sport = u16::from_be(load(flow, offset!(flowi6_sport)));
    if !tunnel_port(sport) {
        return Ok(());
    }
    let net: *const u8 = ctx.arg(0);
    let result: *const u8 = ctx.arg(1);
    let table: *const u8 = ctx.arg(2);
    let peer = PeerKey {
        netns: load(net, offset!(net_inum)),
        family: AF_INET6,
        local_port: sport,
        remote_port: u16::from_be(load(flow, offset!(flowi6_dport))),
        remote: read(flow, offset!(flowi6_daddr))?,
        ..PeerKey::default()
    };
    let Some(slot) = (unsafe { PEERS.get(&peer) }) else {
        return Ok(());
    };
    let key = RouteKey {
        peer: *slot,
        mark: load(flow, offset!(flowi6_mark)),
        table: if table.is_null() { 0 } else { load(table, offset!(fib6_table_id)) },
        _pad: 0,
    };
    let nexthop: *const u8 = load(result, offset!(fib6_result_nh));
    let device: *const u8 = if nexthop.is_null() { core::ptr::null() } else { load(nexthop, offset!(fib6_nh_dev)) };
    // IPv6 reports a miss as a nexthop-less result rather than an errno.
    let error = if device.is_null() { -11 } else { 0 };
    record_route(&key, device, error)
}

#[inline(always)]
fn record_route(key: &RouteKey, device: *const u8, error: i32) -> Result<(), ()> {
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(stats) = ROUTES.get_ptr_mut(key) {
        unsafe {
            (*stats).lookups += 1;
            (*stats).last_seen_ns = now;
        }
        return Ok(());
    }
    let result_ifindex: u32 = if device.is_null() { 0 } else { load(device, offset!(net_device_ifindex)) };
    let stats = RouteStats { lookups: 1, last_seen_ns: now, result_ifindex, error };
    if ROUTES.insert(key, &stats, BPF_NOEXIST).is_err() {
        return Ok(()); // another CPU announced it first
    }
    let mut event = RouteEvent {
        kind: EVENT_NEW_ROUTE,
        error,
        timestamp_ns: now,
        key: *key,
        result_ifindex,
        ..RouteEvent::default()
    };
    device_name(device, &mut event.ifname);
    if EVENTS.output::<RouteEvent>(&event, 0).is_err() {
        count(COUNTER_EVENTS_LOST);
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Packets on devices

#[btf_tracepoint(function = "net_dev_start_xmit")]
pub fn net_dev_start_xmit(ctx: BtfTracePointContext) -> i32 {
    let skb: *const u8 = ctx.arg(0);
    let dev: *const u8 = ctx.arg(1);
    let _ = on_packet(skb, dev, DIR_EGRESS);
    0
}

#[btf_tracepoint(function = "netif_receive_skb")]
pub fn netif_receive_skb(ctx: BtfTracePointContext) -> i32 {
    let skb: *const u8 = ctx.arg(0);
    let dev: *const u8 = load(skb, offset!(skb_dev));
    let _ = on_packet(skb, dev, DIR_INGRESS);
    0
}

/// The headers of an IPv4 packet without options, read in one go: the IP
/// header, then the first 20 bytes of UDP (8 of header, WireGuard's 12-byte
/// message prefix), TCP or ICMP.
const IPV4_READ: usize = 40;
/// The same after IPv6's fixed header.
const IPV6_READ: usize = 60;
const L4_READ: usize = 8 + HEADER_PREFIX_LEN;

/// The IP-level facts every later step needs.
struct Packet {
    skb: *const u8,
    dev: *const u8,
    direction: u8,
    family: u16,
    protocol: u8,
    saddr: [u8; 16],
    daddr: [u8; 16],
    /// Where the transport header starts, for the length of a GSO skb.
    l4: *const u8,
    ip_length: u32,
    /// The first bytes of the transport header.
    l4_bytes: [u8; L4_READ],
}

/// The gate every packet on the host passes: the ethertype, one read of
/// the IP header and ports, then one bit of the port bitmap (or the device
/// type, for plaintext probes). Kept apart from the rest, which is a
/// separate BPF function, so that the compiler cannot pull the later steps'
/// work in front of the test.
#[inline(always)]
fn on_packet(skb: *const u8, dev: *const u8, direction: u8) -> Result<(), ()> {
    let ethertype: u16 = load(skb, offset!(skb_protocol));
    if ethertype != ETH_P_IP_RAW && ethertype != ETH_P_IPV6_RAW {
        return Ok(());
    }
    let l3 = network_header(skb, direction);
    let (protocol, ports) = if ethertype == ETH_P_IP_RAW {
        let header: [u8; 24] = read(l3, 0)?;
        // Without IP options the ports follow at 20; anything else is
        // rare enough to take the long way.
        if header[0] != 0x45 {
            return inspect(skb, dev, direction);
        }
        (header[9], [header[20], header[21], header[22], header[23]])
    } else {
        let header: [u8; 44] = read(l3, 0)?;
        (header[6], [header[40], header[41], header[42], header[43]])
    };
    let worth_a_look = match protocol {
        IPPROTO_UDP => {
            let local = if direction == DIR_EGRESS { [ports[0], ports[1]] } else { [ports[2], ports[3]] };
            tunnel_port(u16::from_be_bytes(local))
        }
        IPPROTO_TCP | IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let device_type: u16 = load(dev, offset!(net_device_type));
            device_type == ARPHRD_NONE
        }
        _ => false,
    };
    if !worth_a_look {
        return Ok(());
    }
    inspect(skb, dev, direction)
}

/// On transmit the stack has set the network header; on receive the
/// tracepoint fires before it is reset, but `data` already points at L3.
#[inline(always)]
fn network_header(skb: *const u8, direction: u8) -> *const u8 {
    if direction == DIR_EGRESS {
        let head: *const u8 = load(skb, offset!(skb_head));
        let network_header: u16 = load(skb, offset!(skb_network_header));
        head.wrapping_add(network_header as usize)
    } else {
        load(skb, offset!(skb_data))
    }
}

/// A packet the gate let through: parsed in full and handled.
#[inline(never)]
fn inspect(skb: *const u8, dev: *const u8, direction: u8) -> Result<(), ()> {
    let ethertype: u16 = load(skb, offset!(skb_protocol));
    let l3 = network_header(skb, direction);
    let mut packet = Packet {
        skb,
        dev,
        direction,
        family: 0,
        protocol: 0,
        saddr: [0; 16],
        daddr: [0; 16],
        l4: l3,
        ip_length: 0,
        l4_bytes: [0; L4_READ],
    };
    if ethertype == ETH_P_IP_RAW {
        // Read again, in full: only packets past the gate get here.
        let header: [u8; IPV4_READ] = read(l3, 0)?;
        let ihl = ((header[0] & 0x0f) as usize) * 4;
        let not_first_fragment = (header[6] & 0x1f) != 0 || header[7] != 0;
        if header[0] >> 4 != 4 || ihl < 20 || not_first_fragment {
            return Ok(());
        }
        packet.protocol = header[9];
        packet.family = AF_INET;
        packet.saddr[..4].copy_from_slice(&header[12..16]);
        packet.daddr[..4].copy_from_slice(&header[16..20]);
        packet.ip_length = u16::from_be_bytes([header[2], header[3]]) as u32;
        packet.l4 = l3.wrapping_add(ihl);
        if ihl == 20 {
            packet.l4_bytes.copy_from_slice(&header[20..20 + L4_READ]);
        } else {
            // IP options (rare): the transport header is further on.
            packet.l4_bytes = read(packet.l4, 0)?;
        }
    } else {
        let header: [u8; IPV6_READ] = read(l3, 0)?;
        // Only a transport header directly after the fixed header; extension
        // headers are rare on tunnel transport and not followed here.
        if header[0] >> 4 != 6 {
            return Ok(());
        }
        packet.protocol = header[6];
        packet.family = AF_INET6;
        packet.saddr.copy_from_slice(&header[8..24]);
        packet.daddr.copy_from_slice(&header[24..40]);
        packet.ip_length = 40 + u16::from_be_bytes([header[4], header[5]]) as u32;
        packet.l4 = l3.wrapping_add(40);
        packet.l4_bytes.copy_from_slice(&header[40..40 + L4_READ]);
    }
    match packet.protocol {
        IPPROTO_UDP => on_udp(&packet),
        IPPROTO_TCP | IPPROTO_ICMP | IPPROTO_ICMPV6 => on_plaintext(&packet),
        _ => Ok(()),
    }
}

/// Wire packets and UDP payload bytes in this skb. A GSO skb (UDP GSO from
/// wireguard-go since 2023, or GRO) holds `gso_segs` datagrams with one
/// UDP header between them: its payload is what follows that header.
#[inline(always)]
fn wire_counts(packet: &Packet, udp_length: u32) -> (u64, u64) {
    let head: *const u8 = load(packet.skb, offset!(skb_head));
    let end: u32 = load(packet.skb, offset!(skb_end));
    let gso = read::<[u16; 2]>(head.wrapping_add(end as usize), offset!(shinfo_gso_size)).unwrap_or([0, 0]);
    let (gso_size, gso_segs) = (gso[0], gso[1]);
    if gso_size == 0 || gso_segs <= 1 {
        return (1, udp_length.saturating_sub(8) as u64);
    }
    let data: u64 = load(packet.skb, offset!(skb_data));
    let length: u32 = load(packet.skb, offset!(skb_len));
    let before_payload = (packet.l4 as u64).wrapping_sub(data).wrapping_add(8);
    (gso_segs as u64, (length as u64).saturating_sub(before_payload))
}

#[inline(always)]
fn on_udp(packet: &Packet) -> Result<(), ()> {
    let udp = &packet.l4_bytes;
    let udp_length = u16::from_be_bytes([udp[4], udp[5]]) as u32;
    let netns = netns_of_device(packet.dev);
    let source_port = u16::from_be_bytes([udp[0], udp[1]]);
    let destination_port = u16::from_be_bytes([udp[2], udp[3]]);
    let egress = packet.direction == DIR_EGRESS;
    let peer = PeerKey {
        netns,
        family: packet.family,
        local_port: if egress { source_port } else { destination_port },
        remote_port: if egress { destination_port } else { source_port },
        _pad: 0,
        remote: if egress { packet.daddr } else { packet.saddr },
    };
    // Only a known tunnel socket talking to a known endpoint goes on.
    let Some(slot) = (unsafe { PEERS.get(&peer) }) else {
        return on_candidate(packet, &peer, udp_length);
    };
    // Everything between a tunnel's socket and its peer's endpoint is that
    // tunnel's WireGuard traffic, and counted. The message itself may not be
    // readable here: a GSO skb can keep its payload in page fragments, past
    // the linear headers. Handshakes (small, linear) always are.
    let mut prefix = [0u8; HEADER_PREFIX_LEN];
    prefix.copy_from_slice(&udp[8..8 + HEADER_PREFIX_LEN]);
    let message = wire::classify(&prefix, udp_length.wrapping_sub(8));
    let message_type = match message {
        Some(message) => message.message_type,
        None => 0,
    };
    let ifindex: u32 = load(packet.dev, offset!(net_device_ifindex));
    let key = PathKey {
        peer: *slot,
        ifindex,
        mark: load(packet.skb, offset!(skb_mark)),
        direction: packet.direction,
        _pad: [0; 3],
    };
    let (packets, bytes) = wire_counts(packet, udp_length);
    let now = unsafe { bpf_ktime_get_ns() };
    let new_path = match PATHS.get_ptr_mut(&key) {
        Some(stats) => {
            unsafe {
                (*stats).packets += packets;
                (*stats).bytes += bytes;
                (*stats).last_seen_ns = now;
            }
            false
        }
        None => {
            // Checked once per path, when it would start: a forged packet
            // never gets a path of its own, so it can never make a verdict.
            if egress && forged(packet.skb)? {
                count(COUNTER_FORGED);
                return Ok(());
            }
            let stats = PathStats { packets, bytes, last_seen_ns: now };
            if PATHS.insert(&key, &stats, BPF_NOEXIST).is_err() {
                // Another CPU created it in between: count there.
                match PATHS.get_ptr_mut(&key) {
                    Some(stats) => unsafe {
                        (*stats).packets += packets;
                        (*stats).bytes += bytes;
                        (*stats).last_seen_ns = now;
                    },
                    None => count(COUNTER_PATHS_FULL),
                }
                false
            } else {
                true
            }
        }
    };
    let payload_length = udp_length.wrapping_sub(8);
    if message_type == wire::MESSAGE_TRANSPORT_DATA || message_type == 0 {
        if egress && message_type != 0 {
            follow_transmit(packet.skb, netns, &key, payload_length, packet.ip_length, now);
        }
        if !new_path {
            return Ok(());
        }
    }
    let mut event = PacketEvent {
        kind: if message_type == wire::MESSAGE_TRANSPORT_DATA || message_type == 0 {
            EVENT_NEW_FLOW
        } else {
            EVENT_HANDSHAKE
        },
        message_type,
        timestamp_ns: now,
        path: key,
        netns,
        length: payload_length,
        sender: message.map_or(0, |m| m.sender),
        receiver: message.map_or(0, |m| m.receiver),
        ..PacketEvent::default()
    };
    device_name(packet.dev, &mut event.ifname);
    if EVENTS.output::<PacketEvent>(&event, 0).is_err() {
        count(COUNTER_EVENTS_LOST);
    }
    Ok(())
}

/// A packet of a port the bitmap passed with no known peer: when the port
/// is a candidate speaker's socket and the packet a well-formed handshake
/// initiation or response (not sent from a raw or packet socket), userspace
/// hears of it. Anything else is dropped here, creating no state.
#[inline(always)]
fn on_candidate(packet: &Packet, peer: &PeerKey, udp_length: u32) -> Result<(), ()> {
    let key = CandidateKey { netns: peer.netns, port: peer.local_port, _pad: 0 };
    let Some(candidate) = (unsafe { CANDIDATES.get(&key) }) else {
        return Ok(());
    };
    let mut prefix = [0u8; HEADER_PREFIX_LEN];
    prefix.copy_from_slice(&packet.l4_bytes[8..8 + HEADER_PREFIX_LEN]);
    let Some(message) = wire::classify(&prefix, udp_length.wrapping_sub(8)) else {
        return Ok(());
    };
    if message.message_type != wire::MESSAGE_HANDSHAKE_INITIATION
        && message.message_type != wire::MESSAGE_HANDSHAKE_RESPONSE
    {
        return Ok(());
    }
    if packet.direction == DIR_EGRESS && forged(packet.skb)? {
        count(COUNTER_FORGED);
        return Ok(());
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(budget) = CANDIDATE_BUDGET.get_ptr_mut(0) else {
        return Ok(());
    };
    unsafe {
        if now.wrapping_sub((*budget)[0]) > CANDIDATE_WINDOW_NS {
            (*budget)[0] = now;
            (*budget)[1] = 0;
        }
        if (*budget)[1] >= CANDIDATE_EVENTS_PER_WINDOW {
            count(COUNTER_CANDIDATES_DROPPED);
            return Ok(());
        }
        (*budget)[1] += 1;
    }
    let event = CandidateEvent {
        kind: EVENT_CANDIDATE,
        candidate: *candidate,
        timestamp_ns: now,
        key,
        family: peer.family,
        remote_port: peer.remote_port,
        remote: peer.remote,
        mark: load(packet.skb, offset!(skb_mark)),
        ifindex: load(packet.dev, offset!(net_device_ifindex)),
        sender: message.sender,
        receiver: message.receiver,
        length: udp_length.wrapping_sub(8),
        message_type: message.message_type,
        direction: packet.direction,
        _pad: [0; 2],
    };
    if EVENTS.output::<CandidateEvent>(&event, 0).is_err() {
        count(COUNTER_EVENTS_LOST);
    }
    Ok(())
}

/// Candidate events each CPU may send per window.
const CANDIDATE_EVENTS_PER_WINDOW: u64 = 256;
const CANDIDATE_WINDOW_NS: u64 = 100_000_000;

/// A tunnel is known by its own socket: a WireGuard-shaped packet written
/// by a raw IP/UDP socket or a packet socket (which can claim any source
/// port) is not a tunnel's. Other sockets pass: kernel WireGuard encrypts in
/// place, so its transport skb still names whatever socket sent the
/// plaintext (TCP, a ping socket, ...), and forwarded packets have none.
#[inline(always)]
fn forged(skb: *const u8) -> Result<bool, ()> {
    let (type_at, protocol_at, family_at) = unsafe {
        (
            core::ptr::read_volatile(&KERNEL_OFFSETS.sock_type),
            core::ptr::read_volatile(&KERNEL_OFFSETS.sock_protocol),
            core::ptr::read_volatile(&KERNEL_OFFSETS.sock_family),
        )
    };
    if type_at == OFFSET_UNAVAILABLE || protocol_at == OFFSET_UNAVAILABLE || family_at == OFFSET_UNAVAILABLE {
        return Ok(false);
    }
    let sock: *const u8 = load(skb, offset!(skb_sk));
    if sock.is_null() {
        return Ok(false);
    }
    let family: u16 = load(sock, family_at as usize);
    if family == AF_PACKET {
        return Ok(true);
    }
    let socket_type: u16 = load(sock, type_at as usize);
    let protocol: u16 = load(sock, protocol_at as usize);
    Ok(socket_type == SOCK_RAW && (protocol == IPPROTO_RAW || protocol == IPPROTO_UDP as u16))
}

/// Transmit latency: a sampled plaintext packet is followed to its
/// encryptions. Kernel WireGuard encrypts in place, so the very skb that
/// entered the tunnel device leaves the host: matched by identity. Userspace
/// implementations copy packets out through TUN and write new ones, so there
/// the sample's length predicts the data message that carries it; when one
/// leaves, the stage is recorded and the next encryption predicted (a nested
/// tunnel's transport is itself plaintext for the outer tunnel).
#[inline(always)]
fn follow_transmit(skb: *const u8, netns: u32, path: &PathKey, payload_length: u32, ip_length: u32, now: u64) {
    // Most data packets are not samples: skip the lookups unless a sample
    // was taken recently enough to still be on its way.
    let last_sample = LAST_SAMPLE.get(0).copied().unwrap_or(0);
    if now.wrapping_sub(last_sample) > MAX_TRANSMIT_NS {
        return;
    }
    let by_length = TransmitKey { netns: netns, payload_length };
    let (origin, method) = match SKB_SAMPLES.get_ptr(&(skb as u64)) {
        // A recycled skb address with a stale entry is not the sample.
        Some(origin) if now.wrapping_sub(unsafe { (*origin).entered_ns }) < MAX_TRANSMIT_NS => {
            (unsafe { *origin }, TRANSMIT_BY_SKB)
        }
        _ => match TRANSMIT_PENDING.get_ptr(&by_length) {
            Some(origin) => (unsafe { *origin }, TRANSMIT_BY_LENGTH),
            None => return,
        },
    };
    // Either way, the length prediction is used up.
    let _ = TRANSMIT_PENDING.remove(&by_length);
    let stage = origin.stage + 1;
    let event = TransmitEvent {
        kind: EVENT_TRANSMIT,
        stage,
        entered_ns: origin.entered_ns,
        left_ns: now,
        netns: netns,
        origin_ifindex: origin.ifindex,
        egress_ifindex: path.ifindex,
        mark: path.mark,
        method,
        _pad: 0,
    };
    if EVENTS.output::<TransmitEvent>(&event, 0).is_err() {
        count(COUNTER_EVENTS_LOST);
    }
    let next = TransmitOrigin { stage, ..origin };
    let entered_another_tunnel = TUNNEL_DEVICES.get_ptr(&DeviceKey { netns: netns, ifindex: path.ifindex }).is_some();
    if method == TRANSMIT_BY_SKB {
        if entered_another_tunnel {
            let _ = SKB_SAMPLES.insert(&(skb as u64), &next, 0);
        } else {
            let _ = SKB_SAMPLES.remove(&(skb as u64));
        }
    } else if entered_another_tunnel {
        let next_key = TransmitKey { netns: netns, payload_length: ciphertext_length(ip_length) };
        let _ = TRANSMIT_PENDING.insert(&next_key, &next, 0);
    }
}

/// ICMP/ICMPv6 echo and TCP SYN/SYN-ACK on a tunnel's own device: the
/// requests and replies userspace pairs into the tunnel's inner RTT.
#[inline(always)]
fn on_plaintext(packet: &Packet) -> Result<(), ()> {
    let egress = packet.direction == DIR_EGRESS;
    let mut event = PlaintextEvent {
        kind: EVENT_PLAINTEXT,
        direction: packet.direction,
        family: packet.family,
        remote: if egress { packet.daddr } else { packet.saddr },
        ip_length: packet.ip_length,
        ..PlaintextEvent::default()
    };
    if packet.protocol == IPPROTO_TCP {
        let tcp = &packet.l4_bytes;
        let flags = tcp[13] & 0x12; // SYN and ACK
        let (local, remote) =
            if egress { ([tcp[0], tcp[1]], [tcp[2], tcp[3]]) } else { ([tcp[2], tcp[3]], [tcp[0], tcp[1]]) };
        event.id = u16::from_be_bytes(local);
        event.port_or_zero = u16::from_be_bytes(remote);
        if egress && flags == 0x02 {
            event.what = PLAINTEXT_SYN;
            event.sequence = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
        } else if !egress && flags == 0x12 {
            event.what = PLAINTEXT_SYN_ACK;
            event.sequence = u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]).wrapping_sub(1);
        } else {
            return Ok(());
        }
    } else {
        let icmp = &packet.l4_bytes;
        let (request, reply) = if packet.protocol == IPPROTO_ICMP { (8, 0) } else { (128, 129) };
        event.what = if egress && icmp[0] == request {
            PLAINTEXT_ECHO_REQUEST
        } else if !egress && icmp[0] == reply {
            PLAINTEXT_ECHO_REPLY
        } else {
            return Ok(());
        };
        event.id = u16::from_be_bytes([icmp[4], icmp[5]]);
        event.sequence = u16::from_be_bytes([icmp[6], icmp[7]]) as u32;
    }
    let device =
        DeviceKey { netns: netns_of_device(packet.dev), ifindex: load(packet.dev, offset!(net_device_ifindex)) };
    let Some(tunnel_kind) = TUNNEL_DEVICES.get_ptr(&device) else {
        return Ok(());
    };
    let tunnel_kind = unsafe { *tunnel_kind };
    event.device = device;
    event.timestamp_ns = unsafe { bpf_ktime_get_ns() };
    if EVENTS.output::<PlaintextEvent>(&event, 0).is_err() {
        count(COUNTER_EVENTS_LOST);
    }
    if egress {
        let key = TransmitKey { netns: device.netns, payload_length: ciphertext_length(packet.ip_length) };
        let origin = TransmitOrigin { entered_ns: event.timestamp_ns, ifindex: device.ifindex, stage: 0 };
        let _ = TRANSMIT_PENDING.insert(&key, &origin, 0);
        if let Some(last) = LAST_SAMPLE.get_ptr_mut(0) {
            unsafe { *last = event.timestamp_ns };
        }
        // Only kernel WireGuard keeps the skb: a TUN device's is freed, and
        // its address soon reused by an unrelated packet.
        if tunnel_kind == TUNNEL_KERNEL {
            let _ = SKB_SAMPLES.insert(&(packet.skb as u64), &origin, 0);
        }
    }
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// bpf_probe_read_kernel is a GPL-only helper.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
