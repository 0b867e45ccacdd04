//! wgtrace's kernel side: four BTF tracepoints, all in vmlinux so they work
//! for kernel WireGuard (usually a module) and userspace implementations alike.
//!
//! * `fib_table_lookup` / `fib6_table_lookup`: every routing-table lookup for
//!   a UDP flow from a tunnel's port, aggregated per (netns, mark, table,
//!   flow) in an LRU map.
//! * `net_dev_start_xmit` / `netif_receive_skb`: every packet leaving or
//!   entering any device of any namespace, including devices created after we
//!   attached. Chosen over TCX because tracepoints need no per-interface
//!   attachment (nothing to chase as namespaces and tunnels come and go, and
//!   nothing left on interfaces if we die), and over classic tracepoints
//!   because tp_btf skips building the trace record (measured: 7% and 20% of
//!   tunnel throughput for empty classic programs here).
//!
//! Packets that are neither UDP nor, on a tunnel's own device, an echo or a
//! TCP handshake leave after a few loads. WireGuard data packets only bump
//! per-CPU counters; the ring buffer carries new flows, new route decisions,
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
    AF_INET, AF_INET6, AF_PACKET, COUNTER_EVENTS_LOST, COUNTER_FORGED, COUNTER_HOOK_RUNS, COUNTER_READ_ERRORS,
    COUNTER_SLOTS, DIR_EGRESS, DIR_INGRESS, DeviceKey, EVENT_HANDSHAKE, EVENT_NEW_FLOW, EVENT_NEW_ROUTE,
    EVENT_PLAINTEXT, EVENT_TRANSMIT, FLOW_MAP_ENTRIES, FlowKey, FlowStats, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_RAW,
    IPPROTO_TCP, IPPROTO_UDP, KernelOffsets, OFFSET_UNAVAILABLE, PLAINTEXT_ECHO_REPLY, PLAINTEXT_ECHO_REQUEST,
    PLAINTEXT_SYN, PLAINTEXT_SYN_ACK, PacketEvent, PlaintextEvent, RING_BUFFER_BYTES, ROUTE_MAP_ENTRIES, RouteEvent,
    RouteKey, RouteStats, SOCK_RAW, TRANSMIT_BY_LENGTH, TRANSMIT_BY_SKB, TRANSMIT_PENDING_ENTRIES,
    TUNNEL_DEVICE_ENTRIES, TUNNEL_KERNEL, TransmitEvent, TransmitKey, TransmitOrigin, ciphertext_length,
    wire::{self, HEADER_PREFIX_LEN},
};

/// Filled in by userspace from the running kernel's BTF before loading.
#[unsafe(no_mangle)]
static KERNEL_OFFSETS: KernelOffsets = unsafe { core::mem::zeroed() };

#[map]
static FLOWS: LruPerCpuHashMap<FlowKey, FlowStats> = LruPerCpuHashMap::with_max_entries(FLOW_MAP_ENTRIES, 0);

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

/// Listen ports of every tunnel, kept current by userspace: only route
/// lookups from these ports are tunnel transport worth recording.
#[map]
static TUNNEL_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(TUNNEL_DEVICE_ENTRIES, 0);

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

#[inline(always)]
fn netns_of_device(dev: *const u8) -> Result<u32, ()> {
    let net: *const u8 = load(dev, offset!(net_device_net));
    Ok(load(net, offset!(net_inum)))
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
    count(COUNTER_HOOK_RUNS);
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
    let table: u32 = ctx.arg(0);
    let nexthop: *const u8 = ctx.arg(2);
    let error: i32 = ctx.arg(3);
    let mut key = RouteKey {
        table,
        family: AF_INET,
        mark: load(flow, offset!(flowi4_mark)),
        oif: load(flow, offset!(flowi4_oif)),
        iif: load(flow, offset!(flowi4_iif)),
        sport: u16::from_be(load(flow, offset!(flowi4_sport))),
        dport: u16::from_be(load(flow, offset!(flowi4_dport))),
        ..RouteKey::default()
    };
    if TUNNEL_PORTS.get_ptr(&key.sport).is_none() {
        return Ok(());
    }
    let saddr = load::<u32>(flow, offset!(flowi4_saddr)).to_ne_bytes();
    let daddr = load::<u32>(flow, offset!(flowi4_daddr)).to_ne_bytes();
    key.saddr[..4].copy_from_slice(&saddr);
    key.daddr[..4].copy_from_slice(&daddr);
    let device: *const u8 =
        if nexthop.is_null() || error != 0 { core::ptr::null() } else { load(nexthop, offset!(fib_nh_common_dev)) };
    key.netns = if device.is_null() { netns_of_current_task()? } else { netns_of_device(device)? };
    record_route(&key, device, error)
}

#[btf_tracepoint(function = "fib6_table_lookup")]
pub fn fib6_table_lookup(ctx: BtfTracePointContext) -> i32 {
    count(COUNTER_HOOK_RUNS);
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
    let net: *const u8 = ctx.arg(0);
    let result: *const u8 = ctx.arg(1);
    let table: *const u8 = ctx.arg(2);
    let mut key = RouteKey {
        table: if table.is_null() { 0 } else { load(table, offset!(fib6_table_id)) },
        family: AF_INET6,
        netns: load(net, offset!(net_inum)),
        mark: load(flow, offset!(flowi6_mark)),
        oif: load(flow, offset!(flowi6_oif)),
        iif: load(flow, offset!(flowi6_iif)),
        sport: u16::from_be(load(flow, offset!(flowi6_sport))),
        dport: u16::from_be(load(flow, offset!(flowi6_dport))),
        ..RouteKey::default()
    };
    if TUNNEL_PORTS.get_ptr(&key.sport).is_none() {
        return Ok(());
    }
    key.saddr = read(flow, offset!(flowi6_saddr))?;
    key.daddr = read(flow, offset!(flowi6_daddr))?;
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
    count(COUNTER_HOOK_RUNS);
    let skb: *const u8 = ctx.arg(0);
    let dev: *const u8 = ctx.arg(1);
    let _ = on_packet(skb, dev, DIR_EGRESS);
    0
}

#[btf_tracepoint(function = "netif_receive_skb")]
pub fn netif_receive_skb(ctx: BtfTracePointContext) -> i32 {
    count(COUNTER_HOOK_RUNS);
    let skb: *const u8 = ctx.arg(0);
    let dev: *const u8 = load(skb, offset!(skb_dev));
    let _ = on_packet(skb, dev, DIR_INGRESS);
    0
}

/// The parts of a UDP datagram's start that identify a WireGuard message.
#[repr(C)]
struct UdpPrefix {
    source_port: [u8; 2],
    destination_port: [u8; 2],
    length: [u8; 2],
    checksum: [u8; 2],
    payload: [u8; HEADER_PREFIX_LEN],
}

/// The IP-level facts every later step needs.
struct Packet {
    skb: *const u8,
    dev: *const u8,
    direction: u8,
    family: u16,
    protocol: u8,
    saddr: [u8; 16],
    daddr: [u8; 16],
    l4: *const u8,
    l3_header_length: u32,
    ip_length: u32,
}

#[inline(always)]
fn on_packet(skb: *const u8, dev: *const u8, direction: u8) -> Result<(), ()> {
    let ethertype: u16 = load(skb, offset!(skb_protocol));
    if ethertype != ETH_P_IP_RAW && ethertype != ETH_P_IPV6_RAW {
        return Ok(());
    }
    // On transmit the stack has set the network header; on receive the
    // tracepoint fires before it is reset, but `data` already points at L3.
    let l3: *const u8 = if direction == DIR_EGRESS {
        let head: *const u8 = load(skb, offset!(skb_head));
        let network_header: u16 = load(skb, offset!(skb_network_header));
        head.wrapping_add(network_header as usize)
    } else {
        load(skb, offset!(skb_data))
    };
    let mut packet = Packet {
        skb,
        dev,
        direction,
        family: 0,
        protocol: 0,
        saddr: [0; 16],
        daddr: [0; 16],
        l4: l3,
        l3_header_length: 0,
        ip_length: 0,
    };
    if ethertype == ETH_P_IP_RAW {
        let header: [u8; 20] = read(l3, 0)?;
        let ihl = ((header[0] & 0x0f) as u32) * 4;
        let not_first_fragment = (header[6] & 0x1f) != 0 || header[7] != 0;
        if header[0] >> 4 != 4 || ihl < 20 || not_first_fragment {
            return Ok(());
        }
        packet.family = AF_INET;
        packet.protocol = header[9];
        packet.saddr[..4].copy_from_slice(&header[12..16]);
        packet.daddr[..4].copy_from_slice(&header[16..20]);
        packet.l3_header_length = ihl;
        packet.ip_length = u16::from_be_bytes([header[2], header[3]]) as u32;
    } else {
        let header: [u8; 40] = read(l3, 0)?;
        // Only a transport header directly after the fixed header; extension
        // headers are rare on tunnel transport and not followed here.
        if header[0] >> 4 != 6 {
            return Ok(());
        }
        packet.family = AF_INET6;
        packet.protocol = header[6];
        packet.saddr.copy_from_slice(&header[8..24]);
        packet.daddr.copy_from_slice(&header[24..40]);
        packet.l3_header_length = 40;
        packet.ip_length = 40 + u16::from_be_bytes([header[4], header[5]]) as u32;
    }
    packet.l4 = l3.wrapping_add(packet.l3_header_length as usize);
    match packet.protocol {
        IPPROTO_UDP => on_udp(&packet),
        IPPROTO_ICMP | IPPROTO_ICMPV6 | IPPROTO_TCP => on_plaintext(&packet),
        _ => Ok(()),
    }
}

#[inline(always)]
fn device_key(dev: *const u8) -> Result<DeviceKey, ()> {
    Ok(DeviceKey { netns: netns_of_device(dev)?, ifindex: load(dev, offset!(net_device_ifindex)) })
}

#[inline(always)]
fn on_udp(packet: &Packet) -> Result<(), ()> {
    let udp: UdpPrefix = read(packet.l4, 0)?;
    let udp_length = u16::from_be_bytes(udp.length) as u32;
    let Some(message) = wire::classify(&udp.payload, udp_length.wrapping_sub(8)) else {
        return Ok(());
    };
    let device = device_key(packet.dev)?;
    let key = FlowKey {
        netns: device.netns,
        ifindex: device.ifindex,
        mark: load(packet.skb, offset!(skb_mark)),
        family: packet.family,
        direction: packet.direction,
        saddr: packet.saddr,
        daddr: packet.daddr,
        sport: u16::from_be_bytes(udp.source_port),
        dport: u16::from_be_bytes(udp.destination_port),
        ..FlowKey::default()
    };

    let now = unsafe { bpf_ktime_get_ns() };
    let bytes = (udp_length + packet.l3_header_length) as u64;
    let new_flow = match FLOWS.get_ptr_mut(&key) {
        Some(stats) => {
            unsafe {
                (*stats).packets += 1;
                (*stats).bytes += bytes;
                (*stats).last_seen_ns = now;
            }
            false
        }
        None => {
            // Checked once per flow, when it would start: a forged packet
            // never gets a flow of its own, so it can never make a verdict.
            if packet.direction == DIR_EGRESS && forged(packet.skb)? {
                count(COUNTER_FORGED);
                return Ok(());
            }
            let stats = FlowStats { packets: 1, bytes, last_seen_ns: now };
            FLOWS.insert(&key, &stats, BPF_NOEXIST).is_ok()
        }
    };
    let payload_length = udp_length.wrapping_sub(8);
    if message.message_type == wire::MESSAGE_TRANSPORT_DATA {
        if packet.direction == DIR_EGRESS {
            follow_transmit(packet.skb, &key, payload_length, udp_length + packet.l3_header_length, now);
        }
        if !new_flow {
            return Ok(());
        }
    }
    let mut event = PacketEvent {
        kind: if message.message_type == wire::MESSAGE_TRANSPORT_DATA { EVENT_NEW_FLOW } else { EVENT_HANDSHAKE },
        message_type: message.message_type,
        timestamp_ns: now,
        key,
        length: payload_length,
        sender: message.sender,
        receiver: message.receiver,
        ..PacketEvent::default()
    };
    device_name(packet.dev, &mut event.ifname);
    if EVENTS.output::<PacketEvent>(&event, 0).is_err() {
        count(COUNTER_EVENTS_LOST);
    }
    Ok(())
}

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
fn follow_transmit(skb: *const u8, flow: &FlowKey, payload_length: u32, ip_length: u32, now: u64) {
    // Most data packets are not samples: skip the lookups unless a sample
    // was taken recently enough to still be on its way.
    let last_sample = LAST_SAMPLE.get(0).copied().unwrap_or(0);
    if now.wrapping_sub(last_sample) > MAX_TRANSMIT_NS {
        return;
    }
    let by_length = TransmitKey { netns: flow.netns, payload_length };
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
        netns: flow.netns,
        origin_ifindex: origin.ifindex,
        egress_ifindex: flow.ifindex,
        mark: flow.mark,
        method,
        _pad: 0,
    };
    if EVENTS.output::<TransmitEvent>(&event, 0).is_err() {
        count(COUNTER_EVENTS_LOST);
    }
    let next = TransmitOrigin { stage, ..origin };
    let entered_another_tunnel =
        TUNNEL_DEVICES.get_ptr(&DeviceKey { netns: flow.netns, ifindex: flow.ifindex }).is_some();
    if method == TRANSMIT_BY_SKB {
        if entered_another_tunnel {
            let _ = SKB_SAMPLES.insert(&(skb as u64), &next, 0);
        } else {
            let _ = SKB_SAMPLES.remove(&(skb as u64));
        }
    } else if entered_another_tunnel {
        let next_key = TransmitKey { netns: flow.netns, payload_length: ciphertext_length(ip_length) };
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
        let tcp: [u8; 14] = read(packet.l4, 0)?;
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
        let icmp: [u8; 8] = read(packet.l4, 0)?;
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
    let device = device_key(packet.dev)?;
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
