//! `--drop-privileges`: once the programs are attached, wgtrace gives up
//! every capability it no longer needs, so a compromise of the long-running
//! process cannot load BPF or do anything else root can. Map file
//! descriptors keep working without CAP_BPF.

use std::io;

use anyhow::{Context as _, Result, bail};

const CAP_NET_ADMIN: u32 = 12;
const CAP_NET_RAW: u32 = 13;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_LAST: u32 = 40;

/// What tracing still needs after attach: netlink and generic netlink
/// queries (NET_ADMIN), `--probe` raw sockets (NET_RAW), finding userspace
/// daemons under /proc/PID (SYS_PTRACE), entering other namespaces
/// (SYS_ADMIN).
pub const KEPT: [u32; 4] = [CAP_NET_ADMIN, CAP_NET_RAW, CAP_SYS_PTRACE, CAP_SYS_ADMIN];

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

fn kept_mask() -> u64 {
    KEPT.iter().fold(0, |mask, cap| mask | 1 << cap)
}

/// Drops every capability but [`KEPT`] from the bounding, effective,
/// permitted and inheritable sets, and forbids regaining any (no_new_privs).
pub fn drop_to_tracing_only() -> Result<()> {
    let keep = kept_mask();
    for cap in 0..=CAP_LAST {
        if keep & (1 << cap) == 0 {
            // SAFETY: prctl with integer arguments; EINVAL for capabilities
            // this kernel does not know is fine.
            let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
            if rc != 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
                return Err(io::Error::last_os_error()).context("dropping a capability from the bounding set");
            }
        }
    }
    let mut header = CapHeader { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget with a v3 header and two data words.
    if unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error()).context("reading capabilities");
    }
    for (word, data) in data.iter_mut().enumerate() {
        let mask = (keep >> (32 * word)) as u32;
        data.effective &= mask;
        data.permitted &= mask;
        data.inheritable = 0;
    }
    // SAFETY: capset with the sets just read, narrowed.
    if unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error()).context("dropping capabilities");
    }
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        bail!("setting no_new_privs: {}", io::Error::last_os_error());
    }
    log::info!("dropped every capability but CAP_NET_ADMIN, CAP_NET_RAW, CAP_SYS_PTRACE and CAP_SYS_ADMIN");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_only_what_tracing_needs() {
        let mask = kept_mask();
        assert_eq!(mask.count_ones(), 4);
        assert_eq!(mask & (1 << 39), 0, "CAP_BPF goes");
        assert_eq!(mask & (1 << 38), 0, "CAP_PERFMON goes");
        assert_ne!(mask & (1 << CAP_SYS_ADMIN), 0);
    }
}
