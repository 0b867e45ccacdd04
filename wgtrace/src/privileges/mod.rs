//! `--drop-privileges`: privilege separation, as OpenSSH does it.
//!
//! Before anything is attached, wgtrace starts a small helper (itself,
//! re-executed: see [`helper`]) that keeps what discovery still needs:
//! CAP_SYS_ADMIN to enter other network namespaces, CAP_SYS_PTRACE and
//! CAP_DAC_READ_SEARCH to read other processes' /proc entries and roots,
//! CAP_DAC_OVERRIDE to connect to daemons' sockets, CAP_NET_ADMIN so the
//! generic netlink sockets it opens may ask for kernel WireGuard
//! configuration. It parses nothing any other process wrote; it hands back
//! file descriptors and plain facts.
//!
//! Once the programs are attached, the main process — the one that parses
//! untrusted input: ring-buffer records, UAPI replies, netlink answers and
//! HTTP requests — becomes user `nobody` (65534) and keeps only
//! CAP_NET_ADMIN, in every thread, with no_new_privs. The kernel answers
//! WireGuard's generic netlink GET only when the sender holds it (checked
//! on the process that sends, not only on the one that opened the socket).
//! It also lets a compromised tracer change network configuration through
//! the netlink sockets it holds (see docs/reliability.md). CAP_NET_RAW is
//! not kept: nothing after the drop opens a raw or packet socket (netlink
//! sockets need no capability; `--probe`'s raw ICMP sockets conflict with
//! `--drop-privileges`). It holds none of CAP_SYS_ADMIN, CAP_BPF or
//! CAP_PERFMON, so it can neither load BPF, nor read kernel memory through
//! BPF, nor enter a namespace. It reads its BPF maps through the descriptors it already has:
//! Linux 5.19 and later allow that without CAP_BPF (see [`bpf_by_fd_needs_cap_bpf`]).

mod channel;
pub mod helper;

use std::io;

use anyhow::{Context as _, Result, bail};

const CAP_DAC_OVERRIDE: u32 = 1;
const CAP_DAC_READ_SEARCH: u32 = 2;
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;
const CAP_LAST: u32 = 40;

/// The user the main process becomes (the kernel's overflow uid and gid).
pub const NOBODY: u32 = 65534;

/// What the main process keeps once attached.
pub const KEPT: [u32; 1] = [CAP_NET_ADMIN];
/// What the privileged helper keeps.
pub const HELPER_KEPT: [u32; 5] = [CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_NET_ADMIN, CAP_SYS_PTRACE, CAP_SYS_ADMIN];

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

fn mask_of(capabilities: &[u32]) -> u64 {
    capabilities.iter().fold(0, |mask, cap| mask | 1 << cap)
}

/// Threads of this process: capability sets are per thread, so a drop is
/// only honest in a process that has exactly one.
fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").map(|tasks| tasks.count()).unwrap_or(0)
}

/// Kernels before 5.19 refuse every bpf() command, map reads by fd
/// included, to a process without CAP_BPF while
/// kernel.unprivileged_bpf_disabled is set (Debian's default). 5.19
/// ("bpf: refine kernel.unprivileged_bpf_disabled behaviour") narrowed that
/// to BPF_PROG_LOAD and BPF_MAP_CREATE; access to existing objects then
/// depends on holding their descriptors.
pub fn bpf_by_fd_needs_cap_bpf() -> bool {
    let disabled =
        std::fs::read_to_string("/proc/sys/kernel/unprivileged_bpf_disabled").map(|v| v.trim() != "0").unwrap_or(true);
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut numbers = release.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse::<u32>().ok());
    let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    disabled && version < (5, 19)
}

/// Narrows the calling thread (the only one: checked) to `keep` in the
/// bounding, effective and permitted sets, empties the inheritable and
/// ambient sets and sets no_new_privs. With `become_nobody`, also changes
/// every uid and gid to [`NOBODY`] and drops supplementary groups, keeping
/// `keep` across the change.
fn narrow(keep: &[u32], become_nobody: bool) -> Result<()> {
    let threads = thread_count();
    if threads != 1 {
        bail!("refusing to drop privileges in a process with {threads} threads: the others would keep theirs");
    }
    let keep = mask_of(keep);
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
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) };
    if become_nobody {
        // SAFETY: prctl, setgroups, setresgid and setresuid with plain
        // arguments (glibc applies the id changes to every thread).
        unsafe {
            if libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0
                || libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresgid(NOBODY, NOBODY, NOBODY) != 0
                || libc::setresuid(NOBODY, NOBODY, NOBODY) != 0
            {
                return Err(io::Error::last_os_error())
                    .context("becoming user nobody (--drop-privileges needs CAP_SETUID and CAP_SETGID to start with)");
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
        data.permitted &= mask;
        // The uid change cleared the effective set; what is kept comes back.
        data.effective = data.permitted;
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
    Ok(())
}

/// The main process, once attached: user nobody with CAP_NET_ADMIN only (plus CAP_BPF where the kernel needs it to read maps by
/// fd, which is said loudly). Must be called before any other thread exists.
pub fn drop_after_attach() -> Result<()> {
    let mut keep = KEPT.to_vec();
    if bpf_by_fd_needs_cap_bpf() {
        keep.push(CAP_BPF);
        log::warn!(
            "this kernel (before 5.19, kernel.unprivileged_bpf_disabled set) refuses BPF map reads without CAP_BPF: \
             keeping CAP_BPF (not CAP_SYS_ADMIN or CAP_PERFMON); a compromise of wgtrace could then load BPF"
        );
    }
    narrow(&keep, true)?;
    log::info!(
        "privileges dropped: now user nobody with {}; namespaces, /proc and daemon sockets are reached through the \
         privileged helper",
        if keep.len() == 2 { "CAP_NET_ADMIN and CAP_BPF" } else { "only CAP_NET_ADMIN" }
    );
    Ok(())
}

/// The helper, as it starts: only what discovery needs (still root).
pub fn drop_to_helper() -> Result<()> {
    narrow(&HELPER_KEPT, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tracer_keeps_none_of_the_bpf_capable_ones() {
        let mask = mask_of(&KEPT);
        assert_eq!(mask, 1 << CAP_NET_ADMIN, "only what kernel WireGuard's GET needs");
        for (cap, name) in [(CAP_BPF, "CAP_BPF"), (38, "CAP_PERFMON"), (CAP_SYS_ADMIN, "CAP_SYS_ADMIN")] {
            assert_eq!(mask & (1 << cap), 0, "{name} must go: since 5.8 CAP_SYS_ADMIN implies the other two");
        }
        let helper = mask_of(&HELPER_KEPT);
        assert_eq!(helper & (1 << CAP_BPF | 1 << 38), 0, "the helper needs no BPF either");
    }
}
