//! Asking userspace daemons for their configuration over UAPI: each query
//! on a thread of its own, a bounded number at once, never two for the
//! same daemon, and a daemon that failed asked again only after a backoff.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, mpsc::Receiver},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use super::{access::Privileged, model::Device, uapi};

/// Retry a daemon that missed its deadline after 2, 4, 8 ... seconds, at most
/// this long.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// UAPI queries under way at once, each on a thread of its own.
const MAX_UAPI_QUERIES: usize = 32;

/// A daemon that failed to answer: when to ask it again.
struct Backoff {
    failures: u32,
    retry_at: Instant,
}

/// A daemon not asked this round: it missed its deadline or failed before,
/// and is asked again later (the error then was logged).
#[derive(Debug)]
pub(super) struct BackingOff(u32);

impl std::fmt::Display for BackingOff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "unreadable: its UAPI socket failed {} time(s) in a row; asked again later", self.0)
    }
}

impl std::error::Error for BackingOff {}

/// The daemons backing off and the queries still running, by (PID,
/// interface).
#[derive(Default)]
pub(super) struct DaemonQueries {
    backoff: HashMap<(u32, String), Backoff>,
    /// UAPI queries still running past their deadline (a hostile mount can
    /// stall a path walk): never a second one for the same daemon.
    in_flight: Arc<Mutex<HashSet<(u32, String)>>>,
}

impl DaemonQueries {
    /// Starts a UAPI query on its own thread, unless the daemon is backing
    /// off or its last query is still running.
    pub(super) fn ask(
        &self,
        access: &Arc<dyn Privileged>,
        pid: u32,
        interface: &str,
    ) -> Result<Receiver<Result<Option<Device>>>> {
        let key = (pid, interface.to_owned());
        if let Some(backoff) = self.backoff.get(&key)
            && backoff.retry_at > Instant::now()
        {
            return Err(anyhow::Error::new(BackingOff(backoff.failures)));
        }
        {
            let mut in_flight = self.in_flight.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
            if in_flight.contains(&key) {
                anyhow::bail!("unreadable: its previous UAPI query is still stuck");
            }
            // Queries stuck on hostile daemons hold a thread each: bounded,
            // the rest are asked in a later round.
            if in_flight.len() >= MAX_UAPI_QUERIES {
                anyhow::bail!("unreadable: {MAX_UAPI_QUERIES} UAPI queries are still under way; asked again later");
            }
            in_flight.insert(key.clone());
        }
        let (sender, receiver) = std::sync::mpsc::channel();
        let in_flight = Arc::clone(&self.in_flight);
        let access = Arc::clone(access);
        std::thread::Builder::new()
            .name("wgtrace-uapi".into())
            .spawn(move || {
                let (pid, interface) = (key.0, key.1.as_str());
                // Connect (through the helper, if any), request and reply all
                // share one deadline.
                let deadline = Instant::now() + uapi::DEADLINE;
                let answer = access.uapi_socket(pid, interface, uapi::DEADLINE).and_then(|socket| match socket {
                    Some(socket) => uapi::query(&socket, deadline)
                        .map(Some)
                        .with_context(|| format!("UAPI socket of {interface} (PID {pid})")),
                    None => Ok(None),
                });
                let _ = sender.send(answer);
                if let Ok(mut in_flight) = in_flight.lock() {
                    in_flight.remove(&key);
                }
            })
            .context("starting a UAPI query")?;
        Ok(receiver)
    }

    pub(super) fn note_answer(&mut self, pid: u32, interface: &str, answered: bool) {
        let key = (pid, interface.to_owned());
        if answered {
            self.backoff.remove(&key);
            return;
        }
        let now = Instant::now();
        let backoff = self.backoff.entry(key).or_insert(Backoff { failures: 0, retry_at: now });
        backoff.failures += 1;
        backoff.retry_at = now + Duration::from_secs(1 << backoff.failures.min(6)).min(MAX_BACKOFF);
    }

    /// Forgets the backoff of daemons that serve none of `present` (PID,
    /// interface): holders that come and go must not grow it.
    pub(super) fn retain_present(&mut self, present: &HashSet<(u32, &str)>) {
        self.backoff.retain(|(pid, interface), _| present.contains(&(*pid, interface.as_str())));
    }
}
