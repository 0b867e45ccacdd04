//! Reading the per-path counters: `PATHS` plus each CPU's pending counts
//! in the packet hooks' peer-cache ways (see `wgtrace_common::PendingPath`),
//! read as [`super::pending`] explains.

use std::collections::HashMap;

use anyhow::{Context as _, Result};
use aya::{
    Ebpf,
    maps::{PerCpuArray, PerCpuHashMap},
};
use wgtrace_common::{
    DIR_EGRESS, DIR_INGRESS, PEER_CACHE_RECEIVE, PEER_CACHE_WAYS, PEER_CACHE_XMIT, PathKey, PathStats, PeerCacheEntry,
};

use super::pending::{self, Counts};

/// One reading of the packet hooks' ways: (direction, entry) for every
/// way of every CPU, in a fixed order.
type Way = (u8, PeerCacheEntry);

/// Per-path counters, summed over CPUs, as one reading of the maps.
pub fn read(ebpf: &Ebpf) -> Result<HashMap<PathKey, PathStats>> {
    pending::read_consistently(
        || read_ways(ebpf),
        || read_catalogue(ebpf),
        |(_, entry)| entry.pending.flushes,
        with_pending,
    )
}

impl Counts for PathStats {
    fn keep_highest(&mut self, earlier: &Self) {
        self.packets = self.packets.max(earlier.packets);
        self.bytes = self.bytes.max(earlier.bytes);
        self.fragmented = self.fragmented.max(earlier.fragmented);
        self.last_seen_ns = self.last_seen_ns.max(earlier.last_seen_ns);
    }
}

/// Readings of the paths that never go backwards.
pub type Monotonic = pending::Monotonic<PathKey, PathStats>;

fn read_catalogue(ebpf: &Ebpf) -> Result<HashMap<PathKey, PathStats>> {
    let map: PerCpuHashMap<_, PathKey, PathStats> =
        PerCpuHashMap::try_from(ebpf.map("PATHS").context("PATHS map missing")?)?;
    let mut out: HashMap<PathKey, PathStats> = HashMap::new();
    for entry in map.iter() {
        // An entry removed while iterating is skipped; the walk may then
        // start over, so a key seen again replaces its first reading.
        let Ok((key, per_cpu)) = entry else { continue };
        let mut total = PathStats::default();
        per_cpu.iter().for_each(|stats| add(&mut total, stats));
        out.insert(key, total);
    }
    Ok(out)
}

fn read_ways(ebpf: &Ebpf) -> Result<Vec<Way>> {
    let map: PerCpuArray<_, PeerCacheEntry> =
        PerCpuArray::try_from(ebpf.map("PEER_CACHE").context("PEER_CACHE map missing")?)?;
    let mut out = Vec::new();
    for (hook, direction) in [(PEER_CACHE_XMIT, DIR_EGRESS), (PEER_CACHE_RECEIVE, DIR_INGRESS)] {
        for way in hook * PEER_CACHE_WAYS..(hook + 1) * PEER_CACHE_WAYS {
            let per_cpu = map.get(&way, 0).with_context(|| format!("reading PEER_CACHE way {way}"))?;
            out.extend(per_cpu.iter().map(|entry| (direction, *entry)));
        }
    }
    Ok(out)
}

/// `PATHS`' counts plus the ways' pending ones, under the ways' paths.
fn with_pending(mut paths: HashMap<PathKey, PathStats>, ways: &[Way]) -> HashMap<PathKey, PathStats> {
    for (direction, entry) in ways {
        let pending = &entry.pending;
        // A way with no path, one that answered "no such peer" (its counts
        // were moved when it did), or one caught while taking a new path
        // over (its counts not written yet).
        if pending.ifindex == 0 || entry.slot == u32::MAX || pending.stats.packets == 0 {
            continue;
        }
        let key = PathKey {
            peer: entry.slot,
            ifindex: pending.ifindex,
            mark: pending.mark,
            direction: *direction,
            _pad: [0; 3],
        };
        add(paths.entry(key).or_default(), &pending.stats);
    }
    paths
}

fn add(total: &mut PathStats, stats: &PathStats) {
    total.packets += stats.packets;
    total.bytes += stats.bytes;
    total.fragmented += stats.fragmented;
    total.last_seen_ns = total.last_seen_ns.max(stats.last_seen_ns);
}

#[cfg(test)]
mod tests {
    use super::*;
    use wgtrace_common::PendingPath;

    fn way(slot: u32, ifindex: u32, packets: u64, flushes: u64) -> PeerCacheEntry {
        PeerCacheEntry {
            slot,
            pending: PendingPath {
                ifindex,
                mark: 7,
                stats: PathStats { packets, bytes: packets * 100, last_seen_ns: 5, fragmented: 0 },
                flushes,
            },
            ..PeerCacheEntry::default()
        }
    }

    fn key(slot: u32, ifindex: u32, direction: u8) -> PathKey {
        PathKey { peer: slot, ifindex, mark: 7, direction, _pad: [0; 3] }
    }

    #[test]
    fn pending_counts_add_to_the_catalogued_ones_per_direction() {
        let mut paths = HashMap::new();
        paths.insert(key(1, 4, DIR_EGRESS), PathStats { packets: 10, bytes: 1000, last_seen_ns: 9, fragmented: 1 });
        // Two CPUs' ways for the same egress path, one ingress, one free
        // way and one cached "no such peer".
        let ways = vec![
            (DIR_EGRESS, way(1, 4, 3, 2)),
            (DIR_EGRESS, way(1, 4, 2, 0)),
            (DIR_INGRESS, way(1, 4, 5, 0)),
            (DIR_EGRESS, way(2, 0, 0, 0)),
            (DIR_EGRESS, way(u32::MAX, 4, 8, 0)),
            (DIR_INGRESS, way(1, 9, 0, 0)),
        ];
        let total = with_pending(paths, &ways);
        assert_eq!(total.len(), 2);
        let egress = total[&key(1, 4, DIR_EGRESS)];
        assert_eq!((egress.packets, egress.bytes, egress.last_seen_ns, egress.fragmented), (15, 1500, 9, 1));
        assert_eq!(total[&key(1, 4, DIR_INGRESS)].packets, 5);
    }
}
