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
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_kernel_buf},
    macros::{btf_tracepoint, map},
    maps::{Array, HashMap, LruHashMap, LruPerCpuHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::BtfTracePointContext,
};
use wgtrace_common::{
    AF_INET, AF_INET6, AF_PACKET, ARPHRD_NONE, CANDIDATE_MAP_ENTRIES, COUNTER_CANDIDATES_DROPPED, COUNTER_EVENTS_LOST,
    COUNTER_FORGED, COUNTER_PATHS_FULL, COUNTER_READ_ERRORS, COUNTER_SLOTS, CandidateEvent, CandidateKey, DIR_EGRESS,
    DIR_INGRESS, DeviceKey, EVENT_CANDIDATE, EVENT_HANDSHAKE, EVENT_NEW_FLOW, EVENT_NEW_ROUTE, EVENT_PLAINTEXT,
    EVENT_TRANSMIT, IFNAMSIZ, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_RAW, IPPROTO_TCP, IPPROTO_UDP, KernelOffsets,
    OFFSET_UNAVAILABLE, PATH_MAP_ENTRIES, PEER_CACHE_FIB4, PEER_CACHE_FIB6, PEER_CACHE_HOOKS, PEER_CACHE_RECEIVE,
    PEER_CACHE_WAYS, PEER_CACHE_XMIT, PEER_MAP_ENTRIES, PENDING_IDLE_NS, PLAINTEXT_ECHO_REPLY, PLAINTEXT_ECHO_REQUEST,
    PLAINTEXT_SYN, PLAINTEXT_SYN_ACK, PORT_BITMAP_SLOTS, PacketEvent, PathKey, PathStats, PeerCacheEntry, PeerKey,
    PlaintextEvent, RING_BUFFER_BYTES, ROUTE_MAP_ENTRIES, RouteEvent, RouteKey, RouteStats, SOCK_RAW,
    TRANSMIT_BY_LENGTH, TRANSMIT_BY_SKB, TRANSMIT_PENDING_ENTRIES, TUNNEL_DEVICE_ENTRIES, TUNNEL_KERNEL, TransmitEvent,
    TransmitKey, TransmitOrigin, address_bytes, ciphertext_length, path_key,
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

/// Bumped by userspace after every change to `PEERS`: a cached answer
/// from an older generation is asked again.
#[map]
static PEERS_GENERATION: Array<u32> = Array::with_max_entries(1, 0);

/// Each CPU's last `PEERS` answers, and pending path counts (see [`peer_way`]).
#[map]
static PEER_CACHE: PerCpuArray<PeerCacheEntry> = PerCpuArray::with_max_entries(PEER_CACHE_HOOKS * PEER_CACHE_WAYS, 0);

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
static PATHS: PerCpuHashMap<PathKey, PathStats> = PerCpuHashMap::with_max_entries(PATH_MAP_ENTRIES, 0);

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

/// CLOCK_MONOTONIC in ns, written by userspace every `COARSE_CLOCK_TICK_NS`
/// (see [`coarse_now`]).
#[map]
static COARSE_CLOCK: Array<u64> = Array::with_max_entries(1, 0);

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
/// tracepoint argument, `bpf_get_current_task_btf`, or a pointer loaded
/// from one): a plain load, which the verifier checks against the kernel's
/// BTF and makes fault-safe. Much cheaper than a `bpf_probe_read_kernel`
/// call; packet bytes (not a BTF type) still use the helper.
#[inline(always)]
fn load<T: Copy>(base: *const u8, offset: usize) -> T {
    unsafe { core::ptr::read_volatile(base.wrapping_add(offset) as *const T) }
}

/// The time as userspace last wrote it (every `COARSE_CLOCK_TICK_NS`,
/// nominally), in one plain load: for a path's or a repeated route
/// answer's last use and a way gone quiet, so that a tunnel packet or route
/// lookup pays no clock read (`bpf_ktime_get_ns` is a helper call and a
/// clocksource read, dear on this kind of VM). Userspace orders paths and route answers
/// by these stamps, so two seen within one tick tie (it breaks ties the same
/// way every time). Event timestamps (handshakes, new paths and routes,
/// latency samples) and a changed route answer's stamp still come from
/// `bpf_ktime_get_ns`.
#[inline(always)]
fn coarse_now() -> u64 {
    match COARSE_CLOCK.get(0) {
        Some(now) => *now,
        None => 0,
    }
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

/// The slot of the known peer `peer` names, if any, and its cache way. A
/// tunnel's packets and its socket's route lookups come in runs of the same
/// peer on a CPU, and so do the packets and lookups a router forwards for a
/// tunnel port it does not own (the port bitmap is host-wide). So each CPU
/// caches the answer, direct-mapped by ports: a hit, or a cached "no such
/// peer", costs a few loads and compares; a miss or a stale generation one
/// `PEERS` lookup. The cache is a fixed per-CPU array: no packet can grow
/// it, only take a way. `hook` (a `PEER_CACHE_*` constant) picks the hook's
/// own ways: a program interrupted halfway through rewriting an entry by
/// another program on the same CPU would otherwise leave one peer's key
/// with another's slot. A packet hook's way also holds its peer's pending
/// counts (see [`PendingPath`]): they move to `PATHS` before the way changes
/// hands.
#[inline(always)]
fn peer_way(peer: &PeerKey, hook: u32) -> Option<(u32, *mut PeerCacheEntry)> {
    let generation = match PEERS_GENERATION.get(0) {
        Some(generation) => *generation,
        None => 0,
    };
    let way = hook * PEER_CACHE_WAYS
        + (((peer.local_port ^ peer.remote_port) as u32 ^ peer.remote[3] as u32 ^ peer.remote[15] as u32)
            & (PEER_CACHE_WAYS - 1));
    let entry = PEER_CACHE.get_ptr_mut(way)?;
    // Compared as words: no memcmp in BPF.
    let wanted: [u32; 7] = unsafe { core::ptr::read_unaligned(peer as *const PeerKey as *const [u32; 7]) };
    let cached: [u32; 7] = unsafe { core::ptr::read_unaligned(&(*entry).key as *const PeerKey as *const [u32; 7]) };
    let mut key_difference = 0;
    for i in 0..7 {
        key_difference |= wanted[i] ^ cached[i];
    }
    let slot = if key_difference | (unsafe { (*entry).generation } ^ generation) == 0 {
        unsafe { (*entry).slot }
    } else {
        let slot = match unsafe { PEERS.get(peer) } {
            Some(slot) => *slot,
            None => NO_PEER,
        };
        // A stranger's packet (any source port can hash to this way) does
        // not evict a peer whose counts are pending and current: it would
        // force their move to `PATHS` at the stranger's packet rate.
        if slot == NO_PEER && unsafe { (*entry).pending.ifindex } != 0 && pending_is_current(entry) {
            return None;
        }
        unsafe {
            // Constant per program: the FIB hooks' ways never hold counts.
            let packet_hook = hook == PEER_CACHE_XMIT || hook == PEER_CACHE_RECEIVE;
            if packet_hook && (*entry).pending.ifindex != 0 && (key_difference != 0 || slot != (*entry).slot) {
                let direction = if hook == PEER_CACHE_XMIT { DIR_EGRESS } else { DIR_INGRESS };
                packets::flush_pending(entry, direction);
            }
            (*entry).key = *peer;
            (*entry).slot = slot;
            (*entry).generation = generation;
        }
        slot
    };
    if slot == NO_PEER { None } else { Some((slot, entry)) }
}

/// Whether a way's pending path saw a packet within `PENDING_IDLE_NS`
/// (both times coarse).
#[inline(always)]
fn pending_is_current(entry: *const PeerCacheEntry) -> bool {
    coarse_now().saturating_sub(unsafe { (*entry).pending.stats.last_seen_ns }) <= PENDING_IDLE_NS
}

/// The slot of the known peer `peer` names, for hooks that keep no
/// pending counts.
#[inline(always)]
fn peer_slot(peer: &PeerKey, hook: u32) -> Option<u32> {
    peer_way(peer, hook).map(|(slot, _)| slot)
}

/// A cached answer of `PEERS`: no such peer. Userspace's slots count up
/// from 1 and are never reused, so none is ever this one.
const NO_PEER: u32 = u32::MAX;

#[inline(always)]
fn netns_of_device(dev: *const u8) -> u32 {
    let net: *const u8 = load(dev, offset!(net_device_net));
    load(net, offset!(net_inum))
}

/// The current task's namespace, through BTF-typed pointers (plain loads).
/// Right for an output route lookup made by a process (wireguard-go's
/// socket, a ping); kernel WireGuard sends from a kworker, which is in the
/// initial namespace, so a namespaced kernel tunnel's failed lookups match
/// no peer (its successful ones are placed by their result device).
#[inline(always)]
fn netns_of_current_task() -> u32 {
    let task = unsafe { aya_ebpf::helpers::generated::bpf_get_current_task_btf() } as *const u8;
    let nsproxy: *const u8 = load(task, offset!(task_nsproxy));
    let net: *const u8 = load(nsproxy, offset!(nsproxy_net));
    load(net, offset!(net_inum))
}

#[inline(always)]
fn device_name(dev: *const u8, name: &mut [u8; 16]) {
    if !dev.is_null() {
        let name_at = dev.wrapping_add(offset!(net_device_name));
        let _ = unsafe { bpf_probe_read_kernel_buf(name_at, name) };
    }
}

mod latency;
mod packets;
mod routes;
mod speakers;

use latency::{follow_transmit, on_plaintext, sample_in_flight};
use packets::{Packet, on_packet};
use routes::{on_fib4_lookup, on_fib6_lookup};

// ---------------------------------------------------------------------------
// Routing decisions

#[btf_tracepoint(function = "fib_table_lookup")]
pub fn fib_table_lookup(ctx: BtfTracePointContext) -> i32 {
    let _ = on_fib4_lookup(&ctx);
    0
}

#[btf_tracepoint(function = "fib6_table_lookup")]
pub fn fib6_table_lookup(ctx: BtfTracePointContext) -> i32 {
    let _ = on_fib6_lookup(&ctx);
    0
}

// ---------------------------------------------------------------------------
// Packets on devices

#[btf_tracepoint(function = "net_dev_start_xmit")]
pub fn net_dev_start_xmit(ctx: BtfTracePointContext) -> i32 {
    let skb: *const u8 = ctx.arg(0);
    let dev: *const u8 = ctx.arg(1);
    on_packet(skb, dev, DIR_EGRESS);
    0
}

#[btf_tracepoint(function = "netif_receive_skb")]
pub fn netif_receive_skb(ctx: BtfTracePointContext) -> i32 {
    let skb: *const u8 = ctx.arg(0);
    let dev: *const u8 = load(skb, offset!(skb_dev));
    on_packet(skb, dev, DIR_INGRESS);
    0
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
