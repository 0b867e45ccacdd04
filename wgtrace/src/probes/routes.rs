//! Reading the route-lookup counters: `ROUTES` plus each CPU's pending
//! lookups in `ROUTE_CACHE` (see `wgtrace_common::PendingRoute`), read as
//! [`super::pending`] explains.

use std::collections::HashMap;

use anyhow::{Context as _, Result};
use aya::{
    Ebpf,
    maps::{PerCpuArray, PerCpuHashMap},
};
use wgtrace_common::{PendingRoute, ROUTE_CACHE_HOOKS, ROUTE_CACHE_WAYS, RouteKey, RouteStats};

use super::pending::{self, Counts};

/// Route lookups per (peer, mark, table), summed over CPUs, with the
/// newest answer, as one reading of the maps.
pub fn read(ebpf: &Ebpf) -> Result<HashMap<RouteKey, RouteStats>> {
    pending::read_consistently(|| read_cache(ebpf), || read_catalogue(ebpf), |entry| entry.flushes, with_pending)
}

impl Counts for RouteStats {
    fn keep_highest(&mut self, earlier: &Self) {
        self.lookups = self.lookups.max(earlier.lookups);
        if earlier.last_seen_ns > self.last_seen_ns {
            (self.last_seen_ns, self.result_ifindex, self.error) =
                (earlier.last_seen_ns, earlier.result_ifindex, earlier.error);
        }
    }
}

/// Readings of the route lookups that never go backwards.
pub type Monotonic = pending::Monotonic<RouteKey, RouteStats>;

fn read_catalogue(ebpf: &Ebpf) -> Result<HashMap<RouteKey, RouteStats>> {
    let map: PerCpuHashMap<_, RouteKey, RouteStats> =
        PerCpuHashMap::try_from(ebpf.map("ROUTES").context("ROUTES map missing")?)?;
    let mut out = HashMap::new();
    for entry in map.iter() {
        // As for `PATHS`: a key seen again replaces its first reading.
        let Ok((key, per_cpu)) = entry else { continue };
        let mut total = RouteStats::default();
        per_cpu.iter().for_each(|stats| add(&mut total, stats));
        out.insert(key, total);
    }
    Ok(out)
}

fn read_cache(ebpf: &Ebpf) -> Result<Vec<PendingRoute>> {
    let map: PerCpuArray<_, PendingRoute> =
        PerCpuArray::try_from(ebpf.map("ROUTE_CACHE").context("ROUTE_CACHE map missing")?)?;
    let mut out = Vec::new();
    for index in 0..ROUTE_CACHE_HOOKS * ROUTE_CACHE_WAYS {
        let per_cpu = map.get(&index, 0).with_context(|| format!("reading ROUTE_CACHE entry {index}"))?;
        out.extend(per_cpu.iter().copied());
    }
    Ok(out)
}

/// `ROUTES`' lookups plus the cache's pending ones. A decision is
/// catalogued in `ROUTES` when it takes its entry, but a full map would
/// leave it out: its pending lookups count all the same. (Those of a gone
/// slot match no peer, and leave the readings when their entry is taken.)
fn with_pending(mut routes: HashMap<RouteKey, RouteStats>, cache: &[PendingRoute]) -> HashMap<RouteKey, RouteStats> {
    for entry in cache.iter().filter(|entry| entry.stats.lookups != 0) {
        add(routes.entry(entry.key).or_default(), &entry.stats);
    }
    routes
}

/// Lookups add up; each CPU keeps the answer it saw last, and the newest
/// is the decision's current answer.
fn add(total: &mut RouteStats, stats: &RouteStats) {
    total.lookups += stats.lookups;
    if stats.last_seen_ns != 0 && stats.last_seen_ns >= total.last_seen_ns {
        (total.last_seen_ns, total.result_ifindex, total.error) =
            (stats.last_seen_ns, stats.result_ifindex, stats.error);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(table: u32) -> RouteKey {
        RouteKey { peer: 1, mark: 0, table, _pad: 0 }
    }

    fn stats(lookups: u64, last_seen_ns: u64, result_ifindex: u32) -> RouteStats {
        RouteStats { lookups, last_seen_ns, result_ifindex, error: 0 }
    }

    #[test]
    fn pending_lookups_add_to_the_catalogued_ones_and_the_newest_answer_wins() {
        let routes = HashMap::from([(key(254), stats(10, 50, 3)), (key(51820), stats(0, 40, 5))]);
        let cache = vec![
            // Two CPUs' entries for main: the second answered last.
            PendingRoute { key: key(254), stats: stats(2, 60, 3), flushes: 2 },
            PendingRoute { key: key(254), stats: stats(1, 70, 4), flushes: 0 },
            PendingRoute { key: key(51820), stats: stats(4, 45, 5), flushes: 0 },
            // A free entry, and one of a decision the map had no room for.
            PendingRoute { key: key(255), stats: RouteStats::default(), flushes: 6 },
            PendingRoute { key: RouteKey { peer: 9, ..key(254) }, stats: stats(3, 80, 3), flushes: 0 },
        ];
        let total = with_pending(routes, &cache);
        assert_eq!(total.len(), 3);
        assert_eq!(total[&RouteKey { peer: 9, ..key(254) }], stats(3, 80, 3));
        assert_eq!(total[&key(254)], stats(13, 70, 4));
        assert_eq!(total[&key(51820)], stats(4, 45, 5));
    }

    #[test]
    fn an_earlier_reading_keeps_its_higher_count_and_a_newer_answer() {
        let mut now = stats(5, 10, 3);
        now.keep_highest(&stats(8, 20, 4));
        assert_eq!(now, stats(8, 20, 4));
        let mut now = stats(9, 30, 3);
        now.keep_highest(&stats(8, 20, 4));
        assert_eq!(now, stats(9, 30, 3));
    }
}
