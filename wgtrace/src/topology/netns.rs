//! Network namespaces: finding them all, naming them, and running code
//! inside one.
//!
//! A namespace is identified by its inode number, the same number the eBPF
//! programs read from `net->ns.inum`. Names come from `/run/netns` (where
//! `ip netns` keeps them); namespaces without a name are still found through
//! the processes living in them.

use std::{
    collections::BTreeMap,
    fs,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Netns {
    pub inode: u64,
    /// The `ip netns` name, if it has one.
    pub name: Option<String>,
    /// A path that opens this namespace (`/run/netns/NAME` or `/proc/PID/ns/net`).
    pub handle: PathBuf,
}

impl Netns {
    /// Name for humans: the `ip netns` name, `host` for the root namespace of
    /// this process, else `netns:INODE`.
    pub fn label(&self, own_inode: u64) -> String {
        match &self.name {
            Some(name) => name.clone(),
            None if self.inode == own_inode => "host".to_owned(),
            None => format!("netns:{}", self.inode),
        }
    }
}

pub fn inode_of(path: &Path) -> Result<u64> {
    Ok(fs::metadata(path).with_context(|| format!("stat {}", path.display()))?.ino())
}

pub fn own_inode() -> Result<u64> {
    inode_of(Path::new("/proc/self/ns/net"))
}

/// Every network namespace that has a name or a process, by inode.
pub fn discover() -> BTreeMap<u64, Netns> {
    let mut found = BTreeMap::new();
    if let Ok(entries) = fs::read_dir("/run/netns") {
        for entry in entries.flatten() {
            let path = entry.path();
            if let Ok(inode) = inode_of(&path) {
                let name = entry.file_name().to_string_lossy().into_owned();
                found.insert(inode, Netns { inode, name: Some(name), handle: path });
            }
        }
    }
    for pid in pids() {
        let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
        if let Ok(inode) = inode_of(&path) {
            found.entry(inode).or_insert(Netns { inode, name: None, handle: path });
        }
    }
    found
}

/// Numeric entries of /proc.
pub fn pids() -> Vec<u32> {
    fs::read_dir("/proc")
        .map(|entries| entries.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default()
}

/// Runs `work` on a thread that has entered the namespace at `handle`.
/// Sockets it opens stay bound to that namespace. Only that thread switches,
/// so the rest of wgtrace is unaffected.
pub fn run_in<T: Send + 'static>(handle: &Path, work: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    // Our own namespace needs no setns, and so no CAP_SYS_ADMIN: this keeps
    // `wgtrace check` usable unprivileged.
    if inode_of(handle).ok() == own_inode().ok() {
        return work();
    }
    let file = fs::File::open(handle).with_context(|| format!("opening network namespace {}", handle.display()))?;
    let handle = handle.to_owned();
    std::thread::spawn(move || {
        // SAFETY: setns on a valid namespace fd affects only this thread.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            let err = std::io::Error::last_os_error();
            bail!("entering network namespace {}: {err} (needs CAP_SYS_ADMIN)", handle.display());
        }
        work()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("namespace worker panicked"))?
}

/// Where a kernel WireGuard interface's UDP socket was found.
///
/// The kernel opens it in the namespace the interface was created in (its
/// `creating_net`) and keeps it there when the interface is moved to
/// another namespace (`ip link set wg0 netns B`, the wireguard.com/netns
/// pattern): the encrypted transport is routed, and leaves, there. Neither
/// rtnetlink (WireGuard has no link-netns) nor generic netlink says which
/// namespace that is, so it is found by looking for the socket: an
/// unconnected UDP socket on the wildcard address bound to the listen port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SocketPlace {
    /// In the interface's own namespace (never moved, or moved back): that
    /// namespace is looked at first and, when it has the socket, the others
    /// are not asked.
    Own,
    /// In this other namespace, the only one with an unclaimed socket there.
    Moved(u64),
    /// No namespace wgtrace knows has it (the interface is down, or its
    /// birth namespace has neither a name nor a process): the interface's
    /// own namespace is assumed.
    NotFound,
    /// Several namespaces have an unclaimed socket on that port: the
    /// interface's own namespace is assumed, and these are named.
    Ambiguous(Vec<u64>),
}

/// Places each kernel tunnel's socket, given as (own namespace, listen
/// port). `namespaces` are those wgtrace knows; `taken` are (namespace,
/// port) sockets that belong to something else (a userspace tunnel or a
/// candidate speaker there); `listening(namespace, port)` asks a namespace
/// whether it has such a socket (each pair is asked at most once). A socket
/// found for one tunnel is never given to another.
pub fn place_sockets(
    tunnels: &[(u64, u16)],
    namespaces: &[u64],
    taken: &std::collections::HashSet<(u64, u16)>,
    mut listening: impl FnMut(u64, u16) -> bool,
) -> Vec<SocketPlace> {
    let mut asked: BTreeMap<(u64, u16), bool> = BTreeMap::new();
    let mut ask = |netns: u64, port: u16| *asked.entry((netns, port)).or_insert_with(|| listening(netns, port));
    let mut claimed: std::collections::HashSet<(u64, u16)> = taken.clone();
    let mut places: Vec<Option<SocketPlace>> = vec![None; tunnels.len()];
    // The usual case first: the socket is where the interface is.
    for (place, &(own, port)) in places.iter_mut().zip(tunnels) {
        if !taken.contains(&(own, port)) && ask(own, port) {
            claimed.insert((own, port));
            *place = Some(SocketPlace::Own);
        }
    }
    for (place, &(own, port)) in places.iter_mut().zip(tunnels) {
        if place.is_some() {
            continue;
        }
        let found: Vec<u64> = namespaces
            .iter()
            .copied()
            .filter(|netns| *netns != own && !claimed.contains(&(*netns, port)) && ask(*netns, port))
            .collect();
        *place = Some(match found.as_slice() {
            [] => SocketPlace::NotFound,
            [netns] => {
                claimed.insert((*netns, port));
                SocketPlace::Moved(*netns)
            }
            _ => SocketPlace::Ambiguous(found),
        });
    }
    places.into_iter().map(|p| p.unwrap_or(SocketPlace::NotFound)).collect()
}

/// (namespace, ifindex) of each kernel tunnel whose socket lives in another
/// namespace -> that namespace. `bound(namespace, port)` lists the UDP
/// sockets bound to `port` there (sock_diag); a failure counts as none and
/// is logged at debug level. What is decided is logged once per tunnel
/// (`logged` remembers it).
pub fn transport_namespaces(
    topology: &super::Topology,
    logged: &mut std::collections::HashMap<(u64, String), String>,
    mut bound: impl FnMut(u64, u16) -> Result<Vec<super::netlink::BoundUdp>>,
) -> BTreeMap<(u64, u32), u64> {
    use super::Implementation;
    let kernel: Vec<&super::Tunnel> = topology
        .tunnels
        .iter()
        .filter(|t| t.implementation == Implementation::Kernel)
        .filter(|t| t.device.as_ref().is_some_and(|d| d.listen_port != 0))
        .collect();
    if kernel.is_empty() {
        logged.clear();
        return BTreeMap::new();
    }
    let wanted: Vec<(u64, u16)> =
        kernel.iter().map(|t| (t.netns, t.device.as_ref().map_or(0, |d| d.listen_port))).collect();
    let mut taken: std::collections::HashSet<(u64, u16)> = topology
        .tunnels
        .iter()
        .filter(|t| t.implementation != Implementation::Kernel)
        .filter_map(|t| Some((t.netns, t.device.as_ref()?.listen_port)))
        .collect();
    taken.extend(topology.candidates.iter().map(|c| (c.netns, c.socket.port)));
    let namespaces: Vec<u64> = topology.namespaces.keys().copied().collect();
    let places = place_sockets(&wanted, &namespaces, &taken, |netns, port| match bound(netns, port) {
        // Only a root-owned socket: any user can make a namespace of their
        // own (an unprivileged user namespace is enough) and bind the port
        // there, and must not be able to steer where the transport is
        // judged. A kernel socket is owned by whoever brought the interface
        // up, root on the host; one brought up by a container's mapped root
        // is not placed, and the interface's own namespace is kept.
        Ok(sockets) => sockets.iter().any(|s| s.local.is_unspecified() && s.uid == 0),
        Err(err) => {
            log::debug!("UDP sockets on port {port} in {}: {err:#}", topology.netns_label(netns));
            false
        }
    });
    let mut moved = BTreeMap::new();
    let mut present = std::collections::HashSet::new();
    for (tunnel, place) in kernel.into_iter().zip(places) {
        let key = (tunnel.netns, tunnel.interface.clone());
        let name = format!("{}/{}", tunnel.netns_label, tunnel.interface);
        let message = match &place {
            SocketPlace::Own => None,
            SocketPlace::Moved(netns) => {
                moved.insert((tunnel.netns, tunnel.ifindex), *netns);
                Some(format!(
                    "{name}: its UDP socket is in namespace {}, where it was created: its transport is traced and \
                     routed there",
                    topology.netns_label(*netns)
                ))
            }
            SocketPlace::NotFound => Some(format!(
                "{name}: no namespace wgtrace sees has its UDP socket (down, or created in a namespace without a \
                 name or a process): its transport is assumed to leave from its own namespace"
            )),
            SocketPlace::Ambiguous(found) => Some(format!(
                "{name}: namespaces {} each have a UDP socket on its port and none is known to be another's: its \
                 transport is assumed to leave from its own namespace",
                found.iter().map(|n| topology.netns_label(*n)).collect::<Vec<_>>().join(", ")
            )),
        };
        present.insert(key.clone());
        match message {
            Some(message) if logged.get(&key) != Some(&message) => {
                if matches!(place, SocketPlace::Ambiguous(_)) {
                    log::warn!("{message}");
                } else {
                    log::info!("{message}");
                }
                logged.insert(key, message);
            }
            Some(_) => {}
            None => {
                logged.remove(&key);
            }
        }
    }
    logged.retain(|key, _| present.contains(key));
    moved
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn a_kernel_socket_is_placed_where_it_is_found_and_never_twice() {
        // Sockets on 51820 in 1 and 3, on 51821 in 2 and 4, on 51822 nowhere.
        let sockets: HashSet<(u64, u16)> = [(1, 51820), (3, 51820), (2, 51821), (4, 51821)].into();
        let mut asked = Vec::new();
        let tunnels = [(1, 51820), (5, 51820), (6, 51821), (7, 51822)];
        let places = place_sockets(&tunnels, &[1, 2, 3, 4, 5, 6, 7], &HashSet::new(), |netns, port| {
            asked.push((netns, port));
            sockets.contains(&(netns, port))
        });
        assert_eq!(
            places,
            vec![
                SocketPlace::Own,
                SocketPlace::Moved(3), // 1's socket is its own interface's
                SocketPlace::Ambiguous(vec![2, 4]),
                SocketPlace::NotFound,
            ]
        );
        let unique: HashSet<_> = asked.iter().collect();
        assert_eq!(unique.len(), asked.len(), "each namespace and port asked once");
    }

    #[test]
    fn the_own_namespace_is_asked_first_and_sockets_of_others_are_skipped() {
        let mut asked = Vec::new();
        let places = place_sockets(&[(1, 51820)], &[1, 2, 3], &HashSet::new(), |netns, port| {
            asked.push((netns, port));
            true
        });
        assert_eq!(places, vec![SocketPlace::Own]);
        assert_eq!(asked, vec![(1, 51820)], "found at home: nobody else is asked");
        // A userspace tunnel's socket on the same port in 2 is not it.
        let taken: HashSet<(u64, u16)> = [(2, 51820)].into();
        let places = place_sockets(&[(1, 51820)], &[1, 2, 3], &taken, |netns, _| netns != 1);
        assert_eq!(places, vec![SocketPlace::Moved(3)]);
    }
}
