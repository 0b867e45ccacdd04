//! Candidate speakers' sockets (TUN holders without a UAPI): only their
//! handshake initiations and responses reach userspace, within a per-CPU
//! budget; nothing is counted or stored for them here.

#[allow(unused_imports)]
use super::*;

/// A packet of a port the bitmap passed with no known peer: when the port
/// is a candidate speaker's socket and the packet a well-formed handshake
/// initiation or response (not sent from a raw or packet socket), userspace
/// hears of it. Anything else is dropped here, creating no state.
#[inline(always)]
pub(crate) fn on_candidate(packet: &Packet, peer: &PeerKey, udp_length: u32) -> Result<(), super::packets::Forged> {
    // The message's shape first, from bytes already read: the data that a
    // router forwards for a tunnel port it does not own leaves here, before
    // any lookup.
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
    let key = CandidateKey { netns: peer.netns, port: peer.local_port, _pad: 0 };
    let Some(candidate) = (unsafe { CANDIDATES.get(&key) }) else {
        return Ok(());
    };
    if packet.direction == DIR_EGRESS && super::packets::forged(packet.skb) {
        return Err(super::packets::Forged);
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
