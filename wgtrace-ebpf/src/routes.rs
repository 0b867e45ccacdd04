//! Routing decisions: the FIB hooks, gated on the listen-port bitmap like
//! the packet hooks, recording known peers' lookups per (peer, mark, table).
//! Successful input route lookups are kept (their result device names their
//! namespace): with all input lookups filtered out by their input device,
//! the VM's nesting test (kernel WireGuard on Debian's 6.1, which caches its
//! output routes per peer in a `dst_cache`, so that it looks up rarely) saw
//! none of the client's route decisions. Failed ones are dropped: nothing
//! names their namespace.

#[allow(unused_imports)]
use super::*;

/// `flowi4_iif` of an output lookup (`ip_route_output_key_hash` sets it).
const LOOPBACK_IFINDEX: u32 = 1;

/// `trace_fib_table_lookup(tb_id, flp, nhc, err)`: fires once per table a
/// lookup visits, so one packet can produce several (e.g. main, suppressed by
/// `suppress_prefixlength 0`, then 51820). Userspace picks the decision that
/// matches where the packet really went.
#[inline(always)]
pub(crate) fn on_fib4_lookup(ctx: &BtfTracePointContext) -> Result<(), ()> {
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
    let netns = if !device.is_null() {
        netns_of_device(device)
    } else if load::<u32>(flow, offset!(flowi4_iif)) == LOOPBACK_IFINDEX {
        // An output lookup: made by its sender (see the limit for kernel
        // WireGuard at `netns_of_current_task`).
        netns_of_current_task()
    } else {
        // A failed input lookup (a forwarded or received packet) names no
        // namespace: it runs in softirq, on top of whatever task was
        // current, and a tunnel's own decisions are output lookups.
        return Ok(());
    };
    let peer = PeerKey {
        netns,
        family: AF_INET,
        local_port: sport,
        remote_port: u16::from_be(load(flow, offset!(flowi4_dport))),
        _pad: 0,
        remote: address_bytes([load(flow, offset!(flowi4_daddr)), 0, 0, 0]),
    };
    let Some(slot) = peer_slot(&peer, PEER_CACHE_FIB4) else {
        return Ok(());
    };
    let key = RouteKey { peer: slot, mark: load(flow, offset!(flowi4_mark)), table: ctx.arg(0), _pad: 0 };
    record_route(&key, device, error)
}

/// `trace_fib6_table_lookup(net, res, table, flp)`.
#[inline(always)]
pub(crate) fn on_fib6_lookup(ctx: &BtfTracePointContext) -> Result<(), ()> {
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
        _pad: 0,
        remote: read(flow, offset!(flowi6_daddr))?,
    };
    let Some(slot) = peer_slot(&peer, PEER_CACHE_FIB6) else {
        return Ok(());
    };
    let key = RouteKey {
        peer: slot,
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
    let result_ifindex: u32 = if device.is_null() { 0 } else { load(device, offset!(net_device_ifindex)) };
    if let Some(stats) = ROUTES.get_ptr_mut(key) {
        unsafe {
            (*stats).lookups += 1;
            // The same (peer, mark, table) may answer differently now (a
            // route was added, removed or changed): keep the newest answer.
            // Userspace reads it from the map; no event, so that a
            // multipath route alternating per packet costs no ring space.
            // A repeated answer is stamped with the coarse clock; a changed
            // one precisely, so that it is newer than another CPU's old
            // answer from the same tick (userspace takes the newest).
            if (*stats).result_ifindex == result_ifindex && (*stats).error == error {
                (*stats).last_seen_ns = (*stats).last_seen_ns.max(coarse_now());
            } else {
                (*stats).last_seen_ns = bpf_ktime_get_ns();
                (*stats).result_ifindex = result_ifindex;
                (*stats).error = error;
            }
        }
        return Ok(());
    }
    let now = unsafe { bpf_ktime_get_ns() };
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
