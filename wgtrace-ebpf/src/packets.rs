//! Packets on devices: the gate every packet passes, then, for the few that
//! pass, known peers' transport counted per path and plaintext probes.

#[allow(unused_imports)]
use super::*;

/// What the gate reads, for either family, in one go: the IP header (IPv4
/// without options, or IPv6's fixed one), then the first 20 bytes of UDP
/// (8 of header, WireGuard's 12-byte message prefix), TCP or ICMP. Aligned
/// so that it moves in words.
#[repr(C, align(8))]
pub(crate) struct Header([u8; 64]);
const L4_READ: usize = 8 + HEADER_PREFIX_LEN;

/// The IP-level facts every later step needs.
pub(crate) struct Packet<'a> {
    pub(crate) skb: *const u8,
    pub(crate) dev: *const u8,
    pub(crate) direction: u8,
    pub(crate) family: u16,
    pub(crate) protocol: u8,
    /// The far end's address: the destination when leaving, the source
    /// when arriving (one field, not two: stack is short).
    pub(crate) remote: [u8; 16],
    /// Where the transport header starts, for the length of a GSO skb.
    pub(crate) l4: *const u8,
    pub(crate) ip_length: u32,
    /// An IPv4 first fragment (more fragments follow).
    pub(crate) first_fragment: bool,
    /// The first bytes of the transport header, where the gate read them
    /// (no copy: stack is short).
    pub(crate) l4_bytes: &'a [u8; L4_READ],
}

/// The gate every packet on the host passes: the ethertype, one read of
/// the IP header and the first transport bytes, then one bit of the port
/// bitmap, or for plaintext probes the device type and the message kind
/// (only echo requests and replies, SYN and SYN-ACK are timed, so a TUN
/// device's bulk TCP leaves here). Kept apart from the rest, which is a
/// separate BPF function given the bytes already read, so that the
/// compiler cannot pull the later steps' work in front of the test.
#[inline(always)]
pub(crate) fn on_packet(skb: *const u8, dev: *const u8, direction: u8) {
    let ethertype: u16 = load(skb, offset!(skb_protocol));
    if ethertype != ETH_P_IP_RAW && ethertype != ETH_P_IPV6_RAW {
        return;
    }
    let l3 = network_header(skb, direction);
    // One read for either family, straight into an aligned buffer: no
    // zeroing or byte copies (BPF has no memset or memcpy, and the
    // compiler's stand-ins are byte loops). Past a short packet's end the
    // bytes are the skb's tailroom or shared info: still its allocation.
    let mut buffer = core::mem::MaybeUninit::<Header>::uninit();
    let status = unsafe {
        aya_ebpf::helpers::generated::bpf_probe_read_kernel(
            buffer.as_mut_ptr() as *mut _,
            core::mem::size_of::<Header>() as u32,
            l3 as *const _,
        )
    };
    if status != 0 {
        count(COUNTER_READ_ERRORS);
        return;
    }
    // Written in full by the helper (the verifier knows it).
    let header = unsafe { buffer.assume_init_mut() };
    let bytes = &header.0;
    // The transport's first bytes: after IPv4 without options or IPv6's
    // fixed header; anything else takes the long way. Fixed indices only,
    // so that there is no bounds check for the verifier to refuse.
    let (protocol, l4) = if ethertype == ETH_P_IP_RAW {
        if bytes[0] != 0x45 {
            return inspect_and_count(skb, dev, direction, header);
        }
        (bytes[9], [bytes[20], bytes[21], bytes[22], bytes[23], bytes[33]])
    } else {
        (bytes[6], [bytes[40], bytes[41], bytes[42], bytes[43], bytes[53]])
    };
    let worth_a_look = match protocol {
        IPPROTO_UDP => {
            let local = if direction == DIR_EGRESS { [l4[0], l4[1]] } else { [l4[2], l4[3]] };
            tunnel_port(u16::from_be_bytes(local))
        }
        // SYN, or SYN-ACK.
        IPPROTO_TCP => l4[4] & 0x02 != 0 && on_tunnel_device(dev),
        IPPROTO_ICMP => (l4[0] == 8 || l4[0] == 0) && on_tunnel_device(dev),
        IPPROTO_ICMPV6 => (l4[0] == 128 || l4[0] == 129) && on_tunnel_device(dev),
        _ => false,
    };
    if !worth_a_look {
        return;
    }
    inspect_and_count(skb, dev, direction, header)
}

/// WireGuard and TUN devices have no link layer: only there are
/// plaintext probes timed (userspace's `TUNNEL_DEVICES` decides which).
#[inline(always)]
fn on_tunnel_device(dev: *const u8) -> bool {
    let device_type: u16 = load(dev, offset!(net_device_type));
    device_type == ARPHRD_NONE
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

/// A packet the gate let through, with the bytes it read: parsed in full
/// and handled.
#[inline(never)]
// Its result must be used (`inspect_and_count` tests it): a BPF function
// whose result nobody uses is compiled to return nothing and leave r0 to
// chance, and a stack address left there makes the verifier refuse it.
fn inspect(skb: *const u8, dev: *const u8, direction: u8, header: &mut Header) -> u32 {
    match inspect_packet(skb, dev, direction, header) {
        Ok(()) => 0,
        Err(Forged) => 1,
    }
}

/// The packet claims a tunnel's transport but was written by a raw or
/// packet socket (see [`forged`]): not counted as a tunnel's, but counted
/// as a forgery by `inspect`'s caller (why there: see `inspect`).
pub(crate) struct Forged;

/// `inspect`, and the forgeries it found counted.
#[inline(always)]
fn inspect_and_count(skb: *const u8, dev: *const u8, direction: u8, header: &mut Header) {
    if inspect(skb, dev, direction, header) != 0 {
        count(COUNTER_FORGED);
    }
}

#[inline(always)]
fn inspect_packet(skb: *const u8, dev: *const u8, direction: u8, header: &mut Header) -> Result<(), Forged> {
    let ethertype: u16 = load(skb, offset!(skb_protocol));
    let l3 = network_header(skb, direction);
    let remote;
    let (family, protocol, ip_length, first_fragment, l4, l4_at) = if ethertype == ETH_P_IP_RAW {
        let bytes = &header.0;
        let ihl = ((bytes[0] & 0x0f) as usize) * 4;
        let not_first_fragment = (bytes[6] & 0x1f) != 0 || bytes[7] != 0;
        if bytes[0] >> 4 != 4 || ihl < 20 || not_first_fragment {
            return Ok(());
        }
        let remote_at = if direction == DIR_EGRESS { 16 } else { 12 };
        // Words built in place in each arm: one shared helper taking the
        // buffer by reference compiled to 53 more instructions here.
        let address = [bytes[remote_at], bytes[remote_at + 1], bytes[remote_at + 2], bytes[remote_at + 3]];
        remote = address_bytes([u32::from_ne_bytes(address), 0, 0, 0]);
        let (protocol, ip_length) = (bytes[9], u16::from_be_bytes([bytes[2], bytes[3]]) as u32);
        let first_fragment = bytes[6] & 0x20 != 0;
        let l4 = l3.wrapping_add(ihl);
        if ihl != 20 {
            // IP options (rare): the transport header is further on, and
            // the gate could not test it. Its bytes go where the options
            // were, which nothing needs any more.
            if unsafe { bpf_probe_read_kernel_buf(l4, &mut header.0[20..20 + L4_READ]) }.is_err() {
                count(COUNTER_READ_ERRORS);
                return Ok(());
            }
        }
        (AF_INET, protocol, ip_length, first_fragment, l4, 20)
    } else {
        // Only a transport header directly after the fixed header; extension
        // headers are rare on tunnel transport and not followed here.
        let bytes = &header.0;
        if bytes[0] >> 4 != 6 {
            return Ok(());
        }
        let remote_at = if direction == DIR_EGRESS { 24 } else { 8 };
        let word = |at: usize| u32::from_ne_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
        remote = address_bytes([word(remote_at), word(remote_at + 4), word(remote_at + 8), word(remote_at + 12)]);
        let ip_length = 40 + u16::from_be_bytes([bytes[4], bytes[5]]) as u32;
        (AF_INET6, bytes[6], ip_length, false, l3.wrapping_add(40), 40)
    };
    // SAFETY: 20 or 40, plus L4_READ, is within the 64-byte header.
    let l4_bytes = unsafe { &*(header.0.as_ptr().add(l4_at) as *const [u8; L4_READ]) };
    let packet = Packet { skb, dev, direction, family, protocol, remote, l4, ip_length, first_fragment, l4_bytes };
    match packet.protocol {
        IPPROTO_UDP => on_udp(&packet),
        IPPROTO_TCP | IPPROTO_ICMP | IPPROTO_ICMPV6 => on_plaintext(&packet),
        _ => Ok(()),
    }
}

/// Wire packets and UDP payload bytes in this skb. A GSO skb (UDP GSO from
/// wireguard-go since 2023, or GRO) holds `gso_segs` datagrams with one
/// UDP header between them: its payload is what follows that header.
/// The shared info is read for every skb: a UDP GSO skb's UDP header
/// announces the whole batch, not one datagram, and a batch of small
/// messages can be shorter than the MTU, so nothing in the skb itself tells
/// a single datagram from a batch.
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
fn on_udp(packet: &Packet) -> Result<(), Forged> {
    let udp = &packet.l4_bytes;
    let udp_length = u16::from_be_bytes([udp[4], udp[5]]) as u32;
    let source_port = u16::from_be_bytes([udp[0], udp[1]]);
    let destination_port = u16::from_be_bytes([udp[2], udp[3]]);
    let egress = packet.direction == DIR_EGRESS;
    // The gate's test, for packets that came the long way (IPv4 options).
    if !tunnel_port(if egress { source_port } else { destination_port }) {
        return Ok(());
    }
    let netns = netns_of_device(packet.dev);
    let peer = PeerKey {
        netns,
        family: packet.family,
        local_port: if egress { source_port } else { destination_port },
        remote_port: if egress { destination_port } else { source_port },
        _pad: 0,
        remote: packet.remote,
    };
    // Only a known tunnel socket talking to a known endpoint goes on.
    let hook = if egress { PEER_CACHE_XMIT } else { PEER_CACHE_RECEIVE };
    let Some((slot, way)) = peer_way(&peer, hook) else {
        return super::speakers::on_candidate(packet, &peer, udp_length);
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
    let key = path_key(slot, ifindex, load(packet.skb, offset!(skb_mark)), packet.direction);
    let (packets, bytes) = wire_counts(packet, udp_length);
    // Coarse: a path's last use and a way's quiet second need no more.
    let now = coarse_now();
    let counted = PathStats { packets, bytes, last_seen_ns: now, fragmented: packet.first_fragment as u64 };
    // Counted in the peer's cache way while the path stays the same: no
    // hash lookup. A path that is new here takes the way over if it is
    // free or its path went quiet; any other (a packet seen on a VLAN, its
    // bond and the bond's port in turn) is counted in `PATHS` directly.
    let pending = unsafe { &mut (*way).pending };
    let new_path = if pending.ifindex == key.ifindex && pending.mark == key.mark {
        pending.stats.packets += packets;
        pending.stats.bytes += bytes;
        pending.stats.last_seen_ns = now;
        pending.stats.fragmented += counted.fragmented;
        false
    } else if pending.ifindex == 0 || now.saturating_sub(pending.stats.last_seen_ns) > PENDING_IDLE_NS {
        if pending.ifindex != 0 {
            flush_pending(way, packet.direction);
        }
        let new_path = catalog_path(&key, packet)?;
        let pending = unsafe { &mut (*way).pending };
        pending.ifindex = key.ifindex;
        pending.mark = key.mark;
        pending.stats = counted;
        new_path
    } else {
        count_in_paths(&key, &counted, packet)?
    };
    let payload_length = udp_length.wrapping_sub(8);
    if message_type == wire::MESSAGE_TRANSPORT_DATA || message_type == 0 {
        if egress && message_type != 0 && sample_in_flight(now) {
            follow_transmit(packet, netns, &key, payload_length, unsafe { bpf_ktime_get_ns() });
        }
        if !new_path {
            return Ok(());
        }
    }
    // Written straight into the ring buffer: a stack copy would take
    // stack that 6.1's verifier does not have to spare here.
    let Some(mut entry) = EVENTS.reserve::<PacketEvent>(0) else {
        count(COUNTER_EVENTS_LOST);
        return Ok(());
    };
    let event = entry.as_mut_ptr();
    unsafe {
        (*event).kind = if message_type == wire::MESSAGE_TRANSPORT_DATA || message_type == 0 {
            EVENT_NEW_FLOW
        } else {
            EVENT_HANDSHAKE
        };
        (*event).message_type = message_type;
        (*event)._pad = [0; 3];
        (*event).timestamp_ns = bpf_ktime_get_ns();
        (*event).path = key;
        (*event).netns = netns;
        (*event).length = payload_length;
        (*event).sender = message.map_or(0, |m| m.sender);
        (*event).receiver = message.map_or(0, |m| m.receiver);
        (*event).ifname = [0; IFNAMSIZ];
        device_name(packet.dev, &mut (*event).ifname);
    }
    entry.submit(0);
    Ok(())
}

/// Adds `counted` to `key`'s counts in `PATHS`; whether the path is new
/// there. Err: the packet is forged, and not counted.
#[inline(always)]
fn count_in_paths(key: &PathKey, counted: &PathStats, packet: &Packet) -> Result<bool, Forged> {
    if add_to_paths(key, counted) {
        return Ok(false);
    }
    // Checked once per path, when it would start: a forged packet never
    // gets a path of its own, so it can never make a verdict.
    if packet.direction == DIR_EGRESS && forged(packet.skb) {
        return Err(Forged);
    }
    if PATHS.insert(key, counted, BPF_NOEXIST).is_ok() {
        return Ok(true);
    }
    // Another CPU created it in between: count there.
    if !add_to_paths(key, counted) {
        count(COUNTER_PATHS_FULL);
    }
    Ok(false)
}

/// Makes sure `PATHS` knows `key` (with no counts: they stay pending in the
/// way); whether it is new. Err: the packet is forged, and not counted.
#[inline(always)]
fn catalog_path(key: &PathKey, packet: &Packet) -> Result<bool, Forged> {
    count_in_paths(key, &PathStats::default(), packet)
}

#[inline(always)]
fn add_to_paths(key: &PathKey, counted: &PathStats) -> bool {
    match PATHS.get_ptr_mut(key) {
        Some(stats) => {
            unsafe {
                (*stats).packets += counted.packets;
                (*stats).bytes += counted.bytes;
                if counted.last_seen_ns > (*stats).last_seen_ns {
                    (*stats).last_seen_ns = counted.last_seen_ns;
                }
                (*stats).fragmented += counted.fragmented;
            }
            true
        }
        None => false,
    }
}

/// Moves a way's pending counts to `PATHS` and frees the way's path.
/// `flushes` is odd while the move is under way and advances by two, so
/// that userspace reading the way and `PATHS` can tell it happened.
#[inline(always)]
pub(crate) fn flush_pending(way: *mut PeerCacheEntry, direction: u8) {
    unsafe {
        let pending = &mut (*way).pending;
        pending.flushes += 1;
        let key = path_key((*way).slot, pending.ifindex, pending.mark, direction);
        // Evicted meanwhile (a host with more paths than the map): the
        // counts start it again.
        if !add_to_paths(&key, &pending.stats) && PATHS.insert(&key, &pending.stats, 0).is_err() {
            count(COUNTER_PATHS_FULL);
        }
        pending.ifindex = 0;
        pending.stats = PathStats::default();
        pending.flushes += 1;
    }
}

/// A tunnel is known by its own socket: a WireGuard-shaped packet written
/// by a raw IP/UDP socket or a packet socket (which can claim any source
/// port) is not a tunnel's. Other sockets pass: kernel WireGuard encrypts in
/// place, so its transport skb still names whatever socket sent the
/// plaintext (TCP, a ping socket, ...), and forwarded packets have none.
#[inline(always)]
pub(crate) fn forged(skb: *const u8) -> bool {
    let (type_at, protocol_at, family_at) = unsafe {
        (
            core::ptr::read_volatile(&KERNEL_OFFSETS.sock_type),
            core::ptr::read_volatile(&KERNEL_OFFSETS.sock_protocol),
            core::ptr::read_volatile(&KERNEL_OFFSETS.sock_family),
        )
    };
    if type_at == OFFSET_UNAVAILABLE || protocol_at == OFFSET_UNAVAILABLE || family_at == OFFSET_UNAVAILABLE {
        return false;
    }
    let sock: *const u8 = load(skb, offset!(skb_sk));
    if sock.is_null() {
        return false;
    }
    let family: u16 = load(sock, family_at as usize);
    if family == AF_PACKET {
        return true;
    }
    let socket_type: u16 = load(sock, type_at as usize);
    let protocol: u16 = load(sock, protocol_at as usize);
    socket_type == SOCK_RAW && (protocol == IPPROTO_RAW || protocol == IPPROTO_UDP as u16)
}
