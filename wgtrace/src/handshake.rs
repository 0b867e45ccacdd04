//! Handshake health per peer: how long ago WireGuard last completed a
//! handshake with it, and whether that counts as up.
//!
//! The time comes from WireGuard's own state (UAPI
//! `last_handshake_time_sec`, genl `WGPEER_A_LAST_HANDSHAKE_TIME`), read
//! with the topology, so it holds for handshakes from before wgtrace
//! started. A session is rekeyed every 120 s while in use (REKEY_AFTER_TIME)
//! and a failing handshake is retried for a while, so a peer counts as up
//! with a handshake within [`DEFAULT_TIMEOUT`]. An idle peer goes "down" by
//! that measure without anything being wrong: alerts should also ask whether
//! it is sending (deploy/prometheus/wgtrace-rules.yml does).

use std::{
    collections::HashMap,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;

use crate::{correlation::TunnelReport, topology::Topology};

/// 120 s rekey plus its retry time.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(180);

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Handshake {
    /// Unix time of the last completed handshake, None when there was none.
    pub last_unix_seconds: Option<u64>,
    /// Seconds since then (None when there was none).
    pub age_seconds: Option<u64>,
    /// Whether that is within `timeout_seconds`.
    pub up: bool,
    pub timeout_seconds: u64,
}

impl Handshake {
    /// From WireGuard's `last_handshake` (0: never) at `now` (Unix seconds).
    pub fn at(last_handshake: u64, now: u64, timeout: Duration) -> Self {
        let last = (last_handshake != 0).then_some(last_handshake);
        // A clock set back makes a handshake look like it is from the future:
        // it happened, and not long ago.
        let age = last.map(|last| now.saturating_sub(last));
        Self {
            last_unix_seconds: last,
            age_seconds: age,
            up: age.is_some_and(|age| age <= timeout.as_secs()),
            timeout_seconds: timeout.as_secs(),
        }
    }
}

pub fn now_unix_seconds() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Fills in every peer's `handshake` from the topology it was read with.
pub fn annotate(tunnels: &mut [TunnelReport], topology: &Topology, timeout: Duration) {
    let now = now_unix_seconds();
    let known: HashMap<(u64, &str, &str), u64> = topology
        .tunnels
        .iter()
        .flat_map(|t| {
            t.device
                .iter()
                .flat_map(|d| &d.peers)
                .map(move |p| ((t.netns, t.interface.as_str(), p.public_key.as_str()), p.last_handshake_sec))
        })
        .collect();
    for tunnel in tunnels {
        for peer in &mut tunnel.peers {
            let key = (tunnel.netns_inode, tunnel.interface.as_str(), peer.public_key.as_str());
            peer.handshake = known.get(&key).map(|last| Handshake::at(*last, now, timeout));
        }
    }
}

/// `12 s ago`, `3 min ago`, `2 h ago`, for the terminal.
pub fn human_age(seconds: u64) -> String {
    match seconds {
        0..120 => format!("{seconds} s ago"),
        120..7_200 => format!("{} min ago", seconds / 60),
        7_200..172_800 => format!("{} h ago", seconds / 3_600),
        _ => format!("{} days ago", seconds / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn up_within_the_timeout_down_after_it_and_never() {
        let timeout = DEFAULT_TIMEOUT;
        let fresh = Handshake::at(1_000, 1_100, timeout);
        assert_eq!((fresh.age_seconds, fresh.up), (Some(100), true));
        assert!(Handshake::at(1_000, 1_180, timeout).up, "exactly at the timeout is still up");
        let stale = Handshake::at(1_000, 1_181, timeout);
        assert_eq!((stale.last_unix_seconds, stale.up), (Some(1_000), false));
        let never = Handshake::at(0, 1_181, timeout);
        assert_eq!((never.last_unix_seconds, never.age_seconds, never.up), (None, None, false));
        let future = Handshake::at(2_000, 1_000, timeout);
        assert_eq!((future.age_seconds, future.up), (Some(0), true), "clock set back");
        assert!(!Handshake::at(1_000, 1_006, Duration::from_secs(5)).up, "--handshake-timeout 5");
    }

    #[test]
    fn ages_for_people() {
        assert_eq!(human_age(12), "12 s ago");
        assert_eq!(human_age(180), "3 min ago");
        assert_eq!(human_age(7_200), "2 h ago");
        assert_eq!(human_age(3 * 86_400), "3 days ago");
    }
}
