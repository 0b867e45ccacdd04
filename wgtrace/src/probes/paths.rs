//! Reading the per-path counters: `PATHS` (paths the kernel side has
//! catalogued, with the counts moved there) plus each CPU's pending counts
//! in the packet hooks' peer-cache ways (see `wgtrace_common::PendingPath`).
//!
//! A move from a way to `PATHS` can fall between reading the one and the
//! other. The ways are read before and after `PATHS`: when no way's
//! `flushes` changed (and none was mid-move), nothing moved while `PATHS`
//! was read, so `PATHS` plus the second reading counts every packet once.
//! Otherwise the reading is repeated; moves are rare (a way changing hands,
//! a path taking over a quiet one).

use std::collections::HashMap;

use anyhow::{Context as _, Result};
use aya::{
    Ebpf,
    maps::{PerCpuArray, PerCpuHashMap},
};
use wgtrace_common::{
    DIR_EGRESS, DIR_INGRESS, PEER_CACHE_RECEIVE, PEER_CACHE_WAYS, PEER_CACHE_XMIT, PathKey, PathStats, PeerCacheEntry,
};

/// Readings before a possibly torn one is taken as it is.
const ATTEMPTS: usize = 4;

/// One reading of the packet hooks' ways: (direction, entry) for every
/// way of every CPU, in a fixed order.
type Ways = Vec<(u8, PeerCacheEntry)>;

/// Per-path counters, summed over CPUs, as one reading of the maps: every
/// packet counted once, unless a move fell into each of the attempts (then
/// the last attempt, which may miss what moved: see [`Monotonic`]).
pub fn read(ebpf: &Ebpf) -> Result<HashMap<PathKey, PathStats>> {
    let mut last = HashMap::new();
    for _ in 0..ATTEMPTS {
        let before = read_ways(ebpf)?;
        let catalogued = read_catalogue(ebpf)?;
        let after = read_ways(ebpf)?;
        let consistent = no_move_between(&before, &after);
        last = with_pending(catalogued, &after);
        if consistent {
            break;
        }
    }
    Ok(last)
}

/// Readings that never go backwards: a reading can only miss counts (a
/// move between reading `PATHS` and the ways), never count twice, so each
/// path keeps the highest counts seen. Counters built on it (Prometheus)
/// never see a false reset. Bounded by `PATHS`: only paths still there are
/// kept.
#[derive(Default)]
pub struct Monotonic {
    last: HashMap<PathKey, PathStats>,
}

impl Monotonic {
    pub fn read(&mut self, ebpf: &Ebpf) -> Result<HashMap<PathKey, PathStats>> {
        Ok(self.follow(read(ebpf)?))
    }

    fn follow(&mut self, mut reading: HashMap<PathKey, PathStats>) -> HashMap<PathKey, PathStats> {
        for (key, stats) in &mut reading {
            if let Some(before) = self.last.get(key) {
                stats.packets = stats.packets.max(before.packets);
                stats.bytes = stats.bytes.max(before.bytes);
                stats.fragmented = stats.fragmented.max(before.fragmented);
                stats.last_seen_ns = stats.last_seen_ns.max(before.last_seen_ns);
            }
        }
        self.last = reading.clone();
        reading
    }
}

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

/// Removes from `PATHS` every path of a slot `known` says is gone.
pub fn forget_slots(ebpf: &mut Ebpf, known: impl Fn(u32) -> bool) -> Result<()> {
    let mut map: PerCpuHashMap<_, PathKey, PathStats> =
        PerCpuHashMap::try_from(ebpf.map_mut("PATHS").context("PATHS map missing")?)?;
    let gone: Vec<PathKey> = map.keys().filter_map(Result::ok).filter(|key| !known(key.peer)).collect();
    for key in gone {
        // Already gone is as good.
        let _ = map.remove(&key);
    }
    Ok(())
}

fn read_ways(ebpf: &Ebpf) -> Result<Ways> {
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

/// Whether no way moved its counts between two readings (an odd count is a
/// move under way).
fn no_move_between(before: &Ways, after: &Ways) -> bool {
    before.len() == after.len()
        && before
            .iter()
            .zip(after)
            .all(|((_, a), (_, b))| a.pending.flushes == b.pending.flushes && a.pending.flushes % 2 == 0)
}

/// `PATHS`' counts plus the ways' pending ones, under the ways' paths.
fn with_pending(mut paths: HashMap<PathKey, PathStats>, ways: &Ways) -> HashMap<PathKey, PathStats> {
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

    #[test]
    fn readings_never_go_backwards() {
        let mut monotonic = Monotonic::default();
        let reading = |packets: u64| HashMap::from([(key(1, 4, DIR_EGRESS), way(1, 4, packets, 0).pending.stats)]);
        assert_eq!(monotonic.follow(reading(10))[&key(1, 4, DIR_EGRESS)].packets, 10);
        // A move fell between the readings: 4 packets were in neither map.
        assert_eq!(monotonic.follow(reading(6))[&key(1, 4, DIR_EGRESS)].packets, 10);
        assert_eq!(monotonic.follow(reading(12))[&key(1, 4, DIR_EGRESS)].packets, 12);
        // A path gone from the maps is forgotten.
        assert!(monotonic.follow(HashMap::new()).is_empty());
        assert_eq!(monotonic.follow(reading(3))[&key(1, 4, DIR_EGRESS)].packets, 3);
    }

    #[test]
    fn a_move_during_the_reading_is_noticed() {
        let before = vec![(DIR_EGRESS, way(1, 4, 3, 2)), (DIR_INGRESS, way(1, 4, 3, 0))];
        assert!(no_move_between(&before, &before.clone()));
        // Finished in between, or still under way at the second reading.
        let moved = vec![(DIR_EGRESS, way(1, 0, 0, 4)), (DIR_INGRESS, way(1, 4, 3, 0))];
        assert!(!no_move_between(&before, &moved));
        let midway = vec![(DIR_EGRESS, way(1, 4, 3, 3)), (DIR_INGRESS, way(1, 4, 3, 0))];
        assert!(!no_move_between(&midway, &midway.clone()));
    }
}
