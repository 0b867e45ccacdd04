//! The one place verdicts and latency meet: correlation says where each
//! transport goes, latency says how long round trips take, and the nesting
//! cost (what riding inside the outer tunnel adds) is joined here for the
//! report. Neither module imports the other.

use std::collections::HashMap;

use crate::{
    correlation::{Nesting, TunnelReport, Verdict},
    latency::{
        LatencyTracker, NestingCost, PeerHistograms, PeerLatency, ProbeReport, Summary, histogram::LatencyHistogram,
        probe,
    },
    topology::Topology,
};

/// Puts each peer's latency into the reports and, for nested peers, sets
/// their RTT next to the outer tunnel's.
pub fn join_latency(reports: &mut [TunnelReport], tracker: &LatencyTracker) {
    let outer_rtt: HashMap<(u64, String), Summary> = reports
        .iter()
        .map(|t| {
            ((t.netns_inode, t.interface.clone()), tracker.inner_rtt_of_device((t.netns_inode, t.ifindex)).summary())
        })
        .collect();
    for tunnel in reports.iter_mut() {
        let device = (tunnel.netns_inode, tunnel.ifindex);
        let single_peer = tunnel.peers.len() == 1;
        for peer in &mut tunnel.peers {
            let mut inner = tracker.inner_rtt(device, &peer.public_key).cloned();
            if single_peer {
                // With one peer every sample is its own, even to addresses
                // outside its AllowedIPs (which the kernel would not route).
                inner = Some(tracker.inner_rtt_of_device(device));
            }
            let handshake = tracker.handshake_rtt(device, &peer.public_key);
            let transmit = tracker.transmit(device);
            peer.latency = Some(PeerLatency {
                inner_rtt_us: inner.as_ref().map(LatencyHistogram::summary).unwrap_or_default(),
                handshake_rtt_us: handshake.map(LatencyHistogram::summary).unwrap_or_default(),
                transmit_us: transmit.map(LatencyHistogram::summary).unwrap_or_default(),
                transmit_method: tracker.transmit_method(device),
                histograms: PeerHistograms {
                    inner_rtt: inner.filter(|h| !h.is_empty()),
                    handshake_rtt: handshake.cloned(),
                    transmit: transmit.cloned(),
                },
            });
            if let (Some(outer), Some(Nesting::Accidental)) = (&peer.nested_in, peer.nesting)
                && peer.verdict == Verdict::Nested
            {
                // The outer tunnel is in the namespace the transport leaves from.
                let outer_p50 = outer_rtt
                    .get(&(tunnel.transport_netns_inode, outer.clone()))
                    .filter(|s| s.count > 0)
                    .map(|s| s.p50);
                let own_p50 = peer.latency.as_ref().map(|l| l.inner_rtt_us).filter(|s| s.count > 0).map(|s| s.p50);
                peer.nesting_cost = Some(NestingCost {
                    outer_interface: outer.clone(),
                    outer_inner_rtt_p50_us: outer_p50,
                    estimated_cost_us: outer_p50,
                    expected_inner_rtt_after_fix_us: own_p50.zip(outer_p50).map(|(own, cost)| own.saturating_sub(cost)),
                    probe: None,
                });
            }
        }
    }
}

/// `--probe`: measures both paths to each accidentally nested peer's
/// endpoint (when its fix is a mark: the direct path is the packet with
/// that mark) and replaces the estimate with the measured difference.
pub fn probe_nested(reports: &mut [TunnelReport], topology: &Topology) {
    for tunnel in reports.iter_mut() {
        // Probes go where the transport is routed (a moved kernel
        // interface's birth namespace).
        let Some(handle) = topology.namespaces.get(&tunnel.transport_netns_inode).map(|n| n.handle.clone()) else {
            continue;
        };
        for peer in &mut tunnel.peers {
            let (Some(endpoint), Some(fix), Some(transport), Some(cost)) =
                (peer.endpoint, &peer.fix_details, &peer.transport, peer.nesting_cost.as_mut())
            else {
                continue;
            };
            // Only a mark some existing rule honours changes the path by
            // itself; a fix that needs a new rule cannot be measured before
            // the rule exists.
            if fix.kind != crate::correlation::FixKind::Mark {
                continue;
            }
            let measure = |mark| match probe::echo_rtt(&handle, endpoint.ip(), mark, 5) {
                Ok(rtt) => rtt,
                Err(err) => {
                    log::warn!("--probe to {endpoint} with mark {mark:#x}: {err:#}");
                    None
                }
            };
            let current = measure(transport.mark);
            let direct = measure(fix.mark);
            cost.probe =
                Some(ProbeReport { current_path_rtt_us: current, direct_path_rtt_us: direct, fix_mark: fix.mark });
            if let (Some(current), Some(direct)) = (current, direct) {
                let extra = current.saturating_sub(direct);
                cost.estimated_cost_us = Some(extra);
                let own = peer.latency.as_ref().map(|l| l.inner_rtt_us).filter(|s| s.count > 0).map(|s| s.p50);
                // Never below the direct path itself; without inner traffic
                // that is the best guess.
                cost.expected_inner_rtt_after_fix_us =
                    Some(own.map_or(direct, |own| own.saturating_sub(extra).max(direct)));
            }
        }
    }
}
