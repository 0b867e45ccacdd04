//! What discovery needs privilege for, behind one interface: listing
//! namespaces and TUN holders (other processes' /proc entries), opening
//! netlink sockets inside other namespaces (setns), and reaching a daemon's
//! UAPI socket in its own root. [`Direct`] does it in this process; with
//! `run --drop-privileges` a separate privileged helper does it and passes
//! back plain facts and file descriptors (see `privileges::helper`), so the
//! process that parses what comes back holds none of that privilege.

use std::{
    fs,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde::{Deserialize, Serialize};

use super::{
    netlink::{self, NETLINK_GENERIC, NETLINK_ROUTE},
    netns::{self, Netns},
    speakers::{self, UdpSocket},
    uapi,
};

/// A process holding a TUN device open.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunHolder {
    pub netns: u64,
    pub interface: String,
    pub pid: u32,
}

pub trait Privileged: Send + Sync {
    /// Every network namespace that has a name or a process.
    fn namespaces(&self) -> Result<Vec<Netns>>;
    /// Every process holding a TUN device, with the device's name.
    fn tun_holders(&self) -> Result<Vec<TunHolder>>;
    /// A netlink socket of `protocol` (route, generic or sock_diag) opened inside the
    /// namespace `handle`, which must still be the namespace `inode`.
    fn netns_socket(&self, handle: &Path, inode: u64, protocol: i32) -> Result<OwnedFd>;
    /// A connected UAPI socket of `interface`, checked to be served by
    /// `pid`, the TUN holder; nothing has been sent on it. None when the
    /// holder has no UAPI socket (it is no WireGuard daemon).
    fn uapi_socket(&self, pid: u32, interface: &str, timeout: Duration) -> Result<Option<OwnedFd>>;
    /// The UDP sockets of `pid`, which must hold a TUN device (candidate
    /// WireGuard speakers' sockets; nothing else is listed).
    fn udp_sockets(&self, pid: u32) -> Result<Vec<UdpSocket>>;
    /// Ended on purpose (the run is over): failures are then not news.
    fn is_closed(&self) -> bool {
        false
    }
}

/// Everything in this process, with this process's privileges.
pub struct Direct;

impl Privileged for Direct {
    fn namespaces(&self) -> Result<Vec<Netns>> {
        Ok(netns::discover().into_values().collect())
    }

    fn tun_holders(&self) -> Result<Vec<TunHolder>> {
        Ok(netns::pids().into_iter().flat_map(tun_devices_of).collect())
    }

    fn netns_socket(&self, handle: &Path, inode: u64, protocol: i32) -> Result<OwnedFd> {
        ensure!(
            [NETLINK_ROUTE, NETLINK_GENERIC, netlink::NETLINK_SOCK_DIAG].contains(&protocol),
            "netlink protocol {protocol} is not needed"
        );
        ensure!(is_namespace_handle(handle), "{} is not a network namespace handle", handle.display());
        netns::run_in(handle, move || {
            // The namespace the thread entered must be the one listed (a PID
            // may have been reused since).
            let entered = netns::inode_of(Path::new("/proc/thread-self/ns/net"))?;
            ensure!(entered == inode, "the namespace changed between listing and entering it");
            netlink::open_raw(protocol)
        })
    }

    fn uapi_socket(&self, pid: u32, interface: &str, timeout: Duration) -> Result<Option<OwnedFd>> {
        let deadline = Instant::now() + timeout.min(uapi::DEADLINE);
        if !tun_devices_of(pid).iter().any(|holder| holder.interface == interface) {
            bail!("PID {pid} does not hold TUN device {interface}");
        }
        let Some(path) = uapi::open_socket(pid, interface)? else { return Ok(None) };
        uapi::connect_checked(&path, pid, deadline).map(Some).with_context(|| format!("UAPI socket of {interface}"))
    }

    fn udp_sockets(&self, pid: u32) -> Result<Vec<UdpSocket>> {
        ensure!(!tun_devices_of(pid).is_empty(), "PID {pid} holds no TUN device");
        Ok(speakers::udp_sockets_of(pid))
    }
}

/// `/run/netns/NAME`, `/proc/PID/ns/net` or `/proc/self/ns/net`, nothing else.
pub fn is_namespace_handle(handle: &Path) -> bool {
    let Some(text) = handle.to_str() else { return false };
    if let Some(name) = text.strip_prefix("/run/netns/") {
        return !name.is_empty() && !name.contains('/') && name != "." && name != "..";
    }
    text.strip_prefix("/proc/")
        .and_then(|rest| rest.strip_suffix("/ns/net"))
        .is_some_and(|pid| pid == "self" || (!pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit())))
}

/// The TUN devices `pid` holds (`/proc/PID/fdinfo` names them: facts the
/// kernel writes, not the process).
fn tun_devices_of(pid: u32) -> Vec<TunHolder> {
    let mut found = Vec::new();
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else { return found };
    let Ok(netns) = netns::inode_of(&PathBuf::from(format!("/proc/{pid}/ns/net"))) else { return found };
    for fd in fds.flatten() {
        if fs::read_link(fd.path()).ok().as_deref() != Some(Path::new("/dev/net/tun")) {
            continue;
        }
        let fdinfo = fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", fd.file_name().to_string_lossy()));
        if let Some(interface) =
            fdinfo.ok().and_then(|info| info.lines().find_map(|l| l.strip_prefix("iff:").map(|v| v.trim().to_owned())))
        {
            found.push(TunHolder { netns, interface, pid });
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_namespace_handles_are_opened() {
        for good in ["/run/netns/blue", "/proc/1/ns/net", "/proc/self/ns/net"] {
            assert!(is_namespace_handle(Path::new(good)), "{good}");
        }
        for bad in ["/etc/shadow", "/run/netns/../../etc/shadow", "/run/netns/", "/proc/1/ns/mnt", "/proc/x/ns/net"] {
            assert!(!is_namespace_handle(Path::new(bad)), "{bad}");
        }
    }
}
