//! Latency samples: plaintext probes on tunnel devices, and transmit
//! latency followed through each encryption.

#[allow(unused_imports)]
use super::*;

/// Whether a plaintext sample was taken recently enough to still be on its
/// way: most data packets are not samples, and skip the lookups.
/// `coarse_now` lags the real time, never leads it: a sample stamped after
/// it (precisely) is in flight, and the lag can only widen the window by a
/// tick.
#[inline(always)]
pub(crate) fn sample_in_flight(coarse_now: u64) -> bool {
    let last_sample = LAST_SAMPLE.get(0).copied().unwrap_or(0);
    coarse_now.saturating_sub(last_sample) <= MAX_TRANSMIT_NS
}

/// Transmit latency: a sampled plaintext packet is followed to its
/// encryptions. Kernel WireGuard encrypts in place, so the very skb that
/// entered the tunnel device leaves the host: matched by identity. Userspace
/// implementations copy packets out through TUN and write new ones, so there
/// the sample's length predicts the data message that carries it; when one
/// leaves, the stage is recorded and the next encryption predicted (a nested
/// tunnel's transport is itself plaintext for the outer tunnel).
#[inline(always)]
pub(crate) fn follow_transmit(packet: &Packet, netns: u32, path: &PathKey, payload_length: u32, now: u64) {
    let (skb, ip_length) = (packet.skb, packet.ip_length);
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
/// Never fails: its result only matches the transport path's.
pub(crate) fn on_plaintext(packet: &Packet) -> Result<(), super::packets::Forged> {
    let egress = packet.direction == DIR_EGRESS;
    let mut event = PlaintextEvent {
        kind: EVENT_PLAINTEXT,
        direction: packet.direction,
        family: packet.family,
        remote: packet.remote,
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
