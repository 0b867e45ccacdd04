//! The kernel side's candidate speaker sockets (`CANDIDATES`): written from
//! discovery only, so no packet ever adds to it, and bounded by its size.

use std::collections::HashMap;

use anyhow::{Context as _, Result};
use aya::Ebpf;
use wgtrace_common::CandidateKey;

/// Makes `CANDIDATES` hold exactly `wanted` ((namespace, port) -> number).
pub(super) fn write_candidates(ebpf: &mut Ebpf, wanted: &HashMap<(u32, u16), u32>) -> Result<()> {
    let mut map: aya::maps::HashMap<_, CandidateKey, u32> =
        aya::maps::HashMap::try_from(ebpf.map_mut("CANDIDATES").context("CANDIDATES map missing")?)?;
    let wanted: HashMap<CandidateKey, u32> = wanted
        .iter()
        .map(|((netns, port), number)| (CandidateKey { netns: *netns, port: *port, _pad: 0 }, *number))
        .collect();
    let stale: Vec<CandidateKey> = map.keys().filter_map(Result::ok).filter(|k| !wanted.contains_key(k)).collect();
    for key in stale {
        let _ = map.remove(&key);
    }
    for (key, number) in &wanted {
        if map.get(key, 0).ok() != Some(*number) {
            map.insert(key, number, 0).context("updating CANDIDATES")?;
        }
    }
    Ok(())
}
