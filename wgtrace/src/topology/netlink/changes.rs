//! Change notifications: a route socket subscribed to link and rule
//! changes, so discovery can wait for one instead of polling.

use std::{
    io,
    os::fd::{AsRawFd as _, OwnedFd},
};

use anyhow::{Context as _, Result};

/// rtnetlink multicast groups (RTMGRP_*) whose messages mean the topology
/// changed: links, and IPv4 and IPv6 policy rules.
pub const CHANGE_GROUPS: u32 = group_bit(RTNLGRP_LINK) | group_bit(RTNLGRP_IPV4_RULE) | group_bit(RTNLGRP_IPV6_RULE);
const RTNLGRP_LINK: u32 = 1;
const RTNLGRP_IPV4_RULE: u32 = 8;
const RTNLGRP_IPV6_RULE: u32 = 19;

/// The `nl_groups` bit of rtnetlink group `group` (numbered from 1).
const fn group_bit(group: u32) -> u32 {
    1 << (group - 1)
}

/// Subscribes the route socket `fd` (opened in some namespace) to `groups`
/// and makes it non-blocking: it then only ever becomes readable when that
/// namespace changes. Unprivileged: rtnetlink lets anyone listen.
pub fn subscribe(fd: OwnedFd, groups: u32) -> Result<OwnedFd> {
    // SAFETY: a zeroed sockaddr_nl is valid; bind and fcntl on a descriptor we own.
    unsafe {
        let mut address: libc::sockaddr_nl = std::mem::zeroed();
        address.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        address.nl_groups = groups;
        if libc::bind(
            fd.as_raw_fd(),
            (&address as *const libc::sockaddr_nl).cast(),
            size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        ) != 0
        {
            return Err(io::Error::last_os_error()).context("subscribing to rtnetlink notifications");
        }
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
    Ok(fd)
}

/// Reads and discards whatever is queued on the non-blocking socket `fd`;
/// whether anything was. (The next discovery dumps the state anyway; an
/// overflowed queue, ENOBUFS, also means something changed.)
pub fn drain(fd: &OwnedFd) -> bool {
    let mut buffer = [0u8; 8192];
    let mut any = false;
    loop {
        // SAFETY: receiving into a buffer we own, within its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len(), libc::MSG_DONTWAIT) };
        if n > 0 {
            any = true;
            continue;
        }
        if n < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOBUFS) {
            any = true;
            continue;
        }
        return any;
    }
}
