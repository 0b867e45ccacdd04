//! The kernel side's coarse clock: CLOCK_MONOTONIC (the clock of
//! `bpf_ktime_get_ns`) written into `COARSE_CLOCK` every
//! `COARSE_CLOCK_TICK_NS` (nominally: a loaded host may delay a tick), so
//! that a tunnel packet or route lookup reads the time in one load instead
//! of a helper call. It stamps the last use of paths and repeated route
//! answers (what userspace orders them by) and tells a way gone quiet.
//!
//! A thread of its own keeps it current whatever the run loop is doing. A
//! clock that stopped would freeze those stamps (the current path and route
//! answer could no longer be told apart) and keep every transmit-latency
//! sample "in flight", so a failed write ends the run (see [`spawn`]).
//! Array map updates are copied bytewise by the kernel, so a program may
//! rarely read a value torn between two ticks; its worst effect is one
//! early hand-over of a way (its counts move to `PATHS`, still exact).

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use aya::maps::{Array, MapData};
use wgtrace_common::COARSE_CLOCK_TICK_NS;

/// CLOCK_MONOTONIC in ns.
fn monotonic_ns() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// Writes the current time.
pub(super) fn tick(map: &mut Array<MapData, u64>) -> Result<()> {
    map.set(0, monotonic_ns(), 0).context("updating the kernel side's coarse clock (COARSE_CLOCK)")
}

/// Ticks on a thread until the process ends; the receiver hears of a
/// failed write, after which the clock no longer advances.
pub(super) fn spawn(mut map: Array<MapData, u64>) -> Result<tokio::sync::oneshot::Receiver<anyhow::Error>> {
    let (failed, failure) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("coarse-clock".into())
        .spawn(move || {
            let period = Duration::from_nanos(COARSE_CLOCK_TICK_NS);
            // Absolute deadlines: the write's own time does not add up.
            let mut next = Instant::now();
            loop {
                if let Err(err) = tick(&mut map) {
                    let _ = failed.send(err);
                    return;
                }
                next += period;
                let now = Instant::now();
                if next > now {
                    std::thread::sleep(next - now);
                } else {
                    next = now;
                }
            }
        })
        .context("starting the coarse clock's thread")?;
    Ok(failure)
}
