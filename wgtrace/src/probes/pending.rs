//! Counts the kernel side keeps in two places: a shared map (`PATHS`,
//! `ROUTES`: what it has catalogued, with the counts moved there) and each
//! CPU's pending counts in a fixed cache (`PEER_CACHE`'s packet ways,
//! `ROUTE_CACHE`), moved to the map only when something changes.
//!
//! A move can fall between reading the cache and the map. The cache is read
//! before and after the map: when no entry's `flushes` changed (and none was
//! mid-move), nothing moved while the map was read, so the map plus the
//! second reading counts everything once. Otherwise the reading is
//! repeated; moves are rare (an entry changing hands).

use std::{collections::HashMap, hash::Hash};

use anyhow::{Context as _, Result};
use aya::{Ebpf, Pod, maps::PerCpuHashMap};

/// Readings before a possibly torn one is taken as it is.
const ATTEMPTS: usize = 4;

/// One reading of the map plus the cache: everything counted once, unless
/// a move fell into each of the attempts (then the last attempt, which may
/// miss what moved: see [`Monotonic`]). `flushes` of a cache entry counts
/// its moves and is odd during one.
pub fn read_consistently<Entry, Reading>(
    mut read_cache: impl FnMut() -> Result<Vec<Entry>>,
    mut read_map: impl FnMut() -> Result<Reading>,
    flushes: impl Fn(&Entry) -> u64,
    with_pending: impl Fn(Reading, &[Entry]) -> Reading,
) -> Result<Reading> {
    let mut last = None;
    for _ in 0..ATTEMPTS {
        let before = read_cache()?;
        let catalogued = read_map()?;
        let after = read_cache()?;
        let consistent = no_move_between(&before, &after, &flushes);
        last = Some(with_pending(catalogued, &after));
        if consistent {
            break;
        }
    }
    Ok(last.expect("at least one attempt"))
}

/// Whether no entry moved its counts between two readings.
fn no_move_between<Entry>(before: &[Entry], after: &[Entry], flushes: impl Fn(&Entry) -> u64) -> bool {
    before.len() == after.len()
        && before.iter().zip(after).all(|(a, b)| flushes(a) == flushes(b) && flushes(a).is_multiple_of(2))
}

/// Removes from the map `name` every entry whose peer slot (`slot_of`) is
/// gone (`known` says no). The maps are not LRU, so this is what bounds
/// them by the topology; a cache entry may still move counts of a gone
/// slot there, which the next round removes.
pub fn forget_slots<Key: Pod, Stats: Pod>(
    ebpf: &mut Ebpf,
    name: &str,
    slot_of: impl Fn(&Key) -> u32,
    known: impl Fn(u32) -> bool,
) -> Result<()> {
    let mut map: PerCpuHashMap<_, Key, Stats> =
        PerCpuHashMap::try_from(ebpf.map_mut(name).with_context(|| format!("{name} map missing"))?)?;
    let gone: Vec<Key> = map.keys().filter_map(Result::ok).filter(|key| !known(slot_of(key))).collect();
    for key in gone {
        // Already gone is as good.
        let _ = map.remove(&key);
    }
    Ok(())
}

/// Counts that can be merged with an earlier reading of themselves.
pub trait Counts: Clone {
    /// Keeps, of `self` and `earlier`, the higher counts and the newer facts.
    fn keep_highest(&mut self, earlier: &Self);
}

/// Readings that never go backwards: a reading can only miss counts (a
/// move between reading the map and the cache), never count twice, so each
/// key keeps the highest counts seen. Counters built on it (Prometheus)
/// never see a false reset. Bounded by the map: only keys still there are
/// kept.
pub struct Monotonic<Key, Stats> {
    last: HashMap<Key, Stats>,
}

impl<Key, Stats> Default for Monotonic<Key, Stats> {
    fn default() -> Self {
        Self { last: HashMap::new() }
    }
}

impl<Key: Eq + Hash + Clone, Stats: Counts> Monotonic<Key, Stats> {
    pub fn follow(&mut self, mut reading: HashMap<Key, Stats>) -> HashMap<Key, Stats> {
        for (key, stats) in &mut reading {
            if let Some(before) = self.last.get(key) {
                stats.keep_highest(before);
            }
        }
        self.last = reading.clone();
        reading
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Debug, PartialEq)]
    struct Count(u64);

    impl Counts for Count {
        fn keep_highest(&mut self, earlier: &Self) {
            self.0 = self.0.max(earlier.0);
        }
    }

    #[test]
    fn readings_never_go_backwards() {
        let mut monotonic = Monotonic::default();
        let reading = |count: u64| HashMap::from([(1, Count(count))]);
        assert_eq!(monotonic.follow(reading(10))[&1], Count(10));
        // A move fell between the readings: 4 were in neither place.
        assert_eq!(monotonic.follow(reading(6))[&1], Count(10));
        assert_eq!(monotonic.follow(reading(12))[&1], Count(12));
        // A key gone from the map is forgotten.
        assert!(monotonic.follow(HashMap::new()).is_empty());
        assert_eq!(monotonic.follow(reading(3))[&1], Count(3));
    }

    #[test]
    fn a_move_during_the_reading_is_noticed_and_read_again() {
        assert!(no_move_between(&[2u64, 0], &[2, 0], |f| *f));
        // Finished in between, or still under way at the second reading.
        assert!(!no_move_between(&[2u64, 0], &[4, 0], |f| *f));
        assert!(!no_move_between(&[3u64, 0], &[3, 0], |f| *f));
        // The first attempt sees a move; the second does not, and is the one
        // returned.
        let cache = std::cell::RefCell::new(vec![vec![2u64], vec![4], vec![4], vec![4]].into_iter());
        let maps = std::cell::RefCell::new(vec![10u64, 20].into_iter());
        let reading = read_consistently(
            || Ok(cache.borrow_mut().next().unwrap()),
            || Ok(maps.borrow_mut().next().unwrap()),
            |f| *f,
            |map, cache| map + cache[0],
        )
        .unwrap();
        assert_eq!(reading, 24);
    }
}
