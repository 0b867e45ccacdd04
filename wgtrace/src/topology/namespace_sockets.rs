//! The netlink sockets discovery keeps inside each namespace it sees: what
//! they read (links, rules, kernel WireGuard devices, bound UDP sockets)
//! and the change notifications it waits on.

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use super::{
    access::Privileged,
    genl,
    model::Device,
    netlink::{self, Link, Rule},
    netns::Netns,
};

/// One namespace's netlink sockets. Holding them keeps the namespace (and
/// so its inode number) alive until it is no longer listed.
pub(super) struct NamespaceSockets {
    /// Link and rule dumps.
    dumps: netlink::Socket,
    /// Route questions from the report (shared with the topology).
    oracle: Arc<Mutex<netlink::Socket>>,
    /// Kernel WireGuard, opened once such a link is seen.
    wireguard: Option<genl::Wireguard>,
    /// Subscribed to link and rule notifications ([`wait_for_change`]).
    changes: Option<std::os::fd::OwnedFd>,
    /// Socket listings, opened once a kernel tunnel's socket is looked for.
    diag: Option<netlink::Socket>,
}

/// One namespace as a round reads it: its links, IPv4 and IPv6 rules,
/// kernel WireGuard devices by name, and its route socket for the topology.
pub(super) type Reading =
    (Vec<Link>, Vec<Rule>, Vec<Rule>, HashMap<String, Result<Device>>, Arc<Mutex<netlink::Socket>>);

impl NamespaceSockets {
    /// Opens the sockets of `ns` that every round needs.
    pub(super) fn open(access: &dyn Privileged, ns: &Netns) -> Result<Self> {
        let open = || access.netns_socket(&ns.handle, ns.inode, netlink::NETLINK_ROUTE);
        // Without notifications discovery still happens every interval.
        let changes = open().and_then(|fd| netlink::subscribe(fd, netlink::CHANGE_GROUPS));
        if let Err(err) = &changes {
            log::debug!("{}: no change notifications: {err:#}", ns.handle.display());
        }
        Ok(Self {
            dumps: netlink::Socket::from_fd(open()?),
            oracle: Arc::new(Mutex::new(netlink::Socket::from_fd(open()?))),
            wireguard: None,
            changes: changes.ok(),
            diag: None,
        })
    }

    /// What this round reads from `ns`.
    pub(super) fn read(&mut self, access: &dyn Privileged, ns: &Netns) -> Result<Reading> {
        let links = self.dumps.links()?;
        let rules_v4 = self.dumps.rules(netlink::AF_INET)?;
        let rules_v6 = self.dumps.rules(netlink::AF_INET6)?;
        let names: Vec<&str> =
            links.iter().filter(|l| l.kind.as_deref() == Some("wireguard")).map(|l| l.name.as_str()).collect();
        let mut kernel_devices = HashMap::new();
        if !names.is_empty() {
            // Asked only once such a link exists: asking for an unregistered
            // family makes the kernel try to load its module.
            if self.wireguard.is_none() {
                let socket = access.netns_socket(&ns.handle, ns.inode, netlink::NETLINK_GENERIC);
                match socket.and_then(|fd| genl::Wireguard::with_socket(netlink::Socket::from_fd(fd))) {
                    Ok(Some(wireguard)) => self.wireguard = Some(wireguard),
                    Ok(None) => {
                        let reason = "the wireguard generic netlink family is not registered";
                        kernel_devices = names.iter().map(|n| (n.to_string(), Err(anyhow::anyhow!(reason)))).collect();
                    }
                    Err(err) => {
                        let text = format!("{err:#}");
                        kernel_devices =
                            names.iter().map(|n| (n.to_string(), Err(anyhow::anyhow!("{text}")))).collect();
                    }
                }
            }
            if let Some(wireguard) = &mut self.wireguard {
                kernel_devices = names.into_iter().map(|n| (n.to_owned(), wireguard.device(n))).collect();
            }
        }
        Ok((links, rules_v4, rules_v6, kernel_devices, Arc::clone(&self.oracle)))
    }

    /// The unconnected UDP sockets bound to `port` in this namespace (the
    /// one `handle` opens, `inode`), over a sock_diag socket opened on
    /// first use.
    pub(super) fn udp_bound(
        &mut self,
        access: &dyn Privileged,
        handle: &Path,
        inode: u64,
        port: u16,
    ) -> Result<Vec<netlink::BoundUdp>> {
        if self.diag.is_none() {
            let fd = access.netns_socket(handle, inode, netlink::NETLINK_SOCK_DIAG)?;
            self.diag = Some(netlink::Socket::from_fd(fd));
        }
        let diag = self.diag.as_mut().context("no sock_diag socket")?;
        // WireGuard binds both families; IPv6 is asked only when needed
        // (and may be disabled).
        let mut found = diag.udp_bound(netlink::AF_INET, port)?;
        if !found.iter().any(|s| s.local.is_unspecified()) {
            found.extend(diag.udp_bound(netlink::AF_INET6, port).unwrap_or_default());
        }
        Ok(found)
    }
}

/// Waits until one of `sockets` reports a link or rule change, or `timeout`
/// passes; whether a change woke it.
pub(super) fn wait_for_change(sockets: &HashMap<u64, NamespaceSockets>, timeout: Duration) -> bool {
    let mut fds: Vec<libc::pollfd> = sockets
        .values()
        .filter_map(|s| s.changes.as_ref())
        .map(|fd| libc::pollfd { fd: std::os::fd::AsRawFd::as_raw_fd(fd), events: libc::POLLIN, revents: 0 })
        .collect();
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        // SAFETY: poll over pollfds we own, for their number.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, left.as_millis() as i32 + 1) };
        if n > 0 {
            // Let a burst (wg-quick adds several rules) settle, then drain.
            std::thread::sleep(Duration::from_millis(20));
            let mut changed = false;
            for socket in sockets.values().filter_map(|s| s.changes.as_ref()) {
                changed |= netlink::drain(socket);
            }
            if changed {
                return true;
            }
        } else if n < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            std::thread::sleep(left);
            return false;
        }
    }
}
