//! Discovery: listing the namespaces in scope, reading each one's links,
//! rules and kernel WireGuard devices, asking userspace daemons, and
//! assembling the [`Topology`], round after round.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use super::{
    access::{self, Privileged},
    daemons::{BackingOff, DaemonQueries},
    model::{Device, DiscoveredBy, Implementation, Namespace, Process, Topology, Tunnel},
    namespace_sockets::{self, NamespaceSockets},
    netns::{self, Netns},
    speakers, uapi,
};

/// Which namespaces to look at.
#[derive(Clone, Debug, Default)]
pub enum Scope {
    #[default]
    All,
    Named(String),
    Current,
}

impl Topology {
    /// One discovery, as `wgtrace check` does it. `wgtrace run` keeps a
    /// [`Discoverer`] on a thread of its own instead.
    pub fn discover(scope: &Scope) -> Result<Self> {
        Discoverer::new(scope.clone()).discover()
    }
}

/// Discovery that remembers between rounds: which processes hold TUN
/// devices (the /proc scan is redone only when the set of TUN links
/// changes), which daemons are backing off, and what was already logged.
pub struct Discoverer {
    scope: Scope,
    access: Arc<dyn Privileged>,
    /// Sockets inside each namespace seen, kept while it is listed.
    sockets: HashMap<u64, NamespaceSockets>,
    /// (netns inode, interface) -> PID holding that TUN device.
    tun_holders: HashMap<(u64, String), u32>,
    /// The TUN links (netns, ifindex, name) `tun_holders` was scanned for.
    tun_links: BTreeSet<(u64, u32, String)>,
    /// Userspace daemons backing off, and UAPI queries under way.
    daemons: DaemonQueries,
    /// The last problem logged per tunnel, so each is logged once.
    logged: HashMap<(u64, String), String>,
    /// `--netns NAME` was found once: its vanishing is then not an error.
    named_seen: bool,
    named_gone_logged: bool,
    /// The namespaces the last successful listing found, used while listing
    /// fails.
    namespaces: Option<Vec<Netns>>,
    /// Steps of a round that failed, and what was logged about each.
    failing_steps: StepFailures,
    /// Where kernel tunnels' sockets were found, as last logged.
    placements_logged: HashMap<(u64, String), String>,
}

/// Which steps of a discovery round fail, so each failure is logged once
/// (again only when its message changes) and its recovery once, instead of
/// every round. A failing step never ends the round: it goes on with what
/// it could read.
#[derive(Default)]
struct StepFailures(HashMap<&'static str, String>);

impl StepFailures {
    /// Notes `step`'s outcome; logs a new or changed failure, or a recovery,
    /// unless `quiet` (the run is over). Returns the value, if any.
    fn note<T>(&mut self, step: &'static str, result: Result<T>, quiet: bool) -> Option<T> {
        match result {
            Ok(value) => {
                if self.0.remove(step).is_some() && !quiet {
                    log::info!("discovery: {step} works again");
                }
                Some(value)
            }
            Err(err) => {
                let message = format!("{err:#}");
                if self.0.get(step) != Some(&message) {
                    if !quiet {
                        log::warn!("discovery: {step} failed: {message}; going on with what could be read");
                    }
                    self.0.insert(step, message);
                }
                None
            }
        }
    }
}

impl Discoverer {
    /// Discovery with this process's own privileges.
    pub fn new(scope: Scope) -> Self {
        Self::with_access(scope, Arc::new(access::Direct))
    }

    /// Discovery whose privileged steps go through `access` (the privilege
    /// separation helper after `--drop-privileges`).
    pub fn with_access(scope: Scope, access: Arc<dyn Privileged>) -> Self {
        Self {
            scope,
            access,
            sockets: HashMap::new(),
            tun_holders: HashMap::new(),
            tun_links: BTreeSet::new(),
            daemons: DaemonQueries::default(),
            logged: HashMap::new(),
            named_seen: false,
            named_gone_logged: false,
            namespaces: None,
            failing_steps: StepFailures::default(),
            placements_logged: HashMap::new(),
        }
    }

    pub fn discover(&mut self) -> Result<Topology> {
        let own_netns = netns::own_inode()?;
        let quiet = self.access.is_closed();
        // Without a listing the last one is used (a first failure ends the
        // round: there is nothing to go on with).
        let listed = self.access.namespaces().context("listing network namespaces");
        let listed = match self.failing_steps.note("listing network namespaces", listed, quiet) {
            Some(listed) => self.namespaces.insert(listed).clone(),
            None => match &self.namespaces {
                Some(last) => last.clone(),
                None => {
                    let err = self.failing_steps.0.get("listing network namespaces").cloned().unwrap_or_default();
                    anyhow::bail!("{err}"); // already says "listing network namespaces"
                }
            },
        };
        let mut candidates: BTreeMap<u64, Netns> = listed.into_iter().map(|ns| (ns.inode, ns)).collect();
        match &self.scope {
            Scope::All => {}
            Scope::Current => candidates.retain(|inode, _| *inode == own_netns),
            Scope::Named(name) => {
                candidates.retain(|_, ns| ns.name.as_deref() == Some(name));
                if candidates.is_empty() {
                    anyhow::ensure!(self.named_seen, "no network namespace named {name} (see `ip netns list`)");
                    if !std::mem::replace(&mut self.named_gone_logged, true) {
                        log::warn!("network namespace {name} is gone: its tunnels are left out from now on");
                    }
                } else {
                    self.named_seen = true;
                    self.named_gone_logged = false;
                }
            }
        }
        let mut topology = Topology { own_netns, ..Topology::default() };
        let mut found = Vec::new();
        self.sockets.retain(|inode, _| candidates.contains_key(inode));
        for (inode, ns) in candidates {
            let label = ns.label(own_netns);
            // A namespace can vanish between listing and entering it: that is
            // normal operation, so it is skipped quietly.
            let Ok((links, rules_v4, rules_v6, kernel_devices, oracle)) = self.read_namespace(&ns) else {
                self.sockets.remove(&inode);
                continue;
            };
            found.push((inode, label.clone(), links.clone(), kernel_devices));
            let namespace =
                Namespace { label, links, rules_v4, rules_v6, handle: ns.handle.clone(), route_socket: Some(oracle) };
            topology.namespaces.insert(inode, namespace);
        }
        let tun_links: BTreeSet<(u64, u32, String)> = found
            .iter()
            .flat_map(|(inode, _, links, _)| {
                links.iter().filter(|l| l.kind.as_deref() == Some("tun")).map(|l| (*inode, l.index, l.name.clone()))
            })
            .collect();
        if tun_links != self.tun_links {
            // A TUN device appeared or went: only then is /proc worth a scan.
            // If it fails, the last scan's holders stand and the scan is
            // retried next round.
            let holders = self.access.tun_holders().context("finding the processes that hold TUN devices");
            if let Some(holders) = self.failing_steps.note("finding TUN holders", holders, quiet) {
                self.tun_holders =
                    holders.into_iter().map(|holder| ((holder.netns, holder.interface), holder.pid)).collect();
                self.tun_links = tun_links;
            }
        }
        topology.tun_holders = self
            .tun_holders
            .iter()
            .map(|(key, pid)| {
                // comm is the kernel's copy (at most 15 bytes), not the
                // process's own words; still shown as data, never trusted.
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                let comm: String = comm.trim().chars().filter(|c| !c.is_control()).take(15).collect();
                (key.clone(), (*pid, comm))
            })
            .collect();
        // Userspace daemons are asked in parallel, each within its deadline.
        let mut queries = Vec::new();
        for (inode, _, links, _) in &found {
            for link in links {
                let Some(&pid) = self.tun_holders.get(&(*inode, link.name.clone())) else { continue };
                queries.push((*inode, link.name.clone(), pid, self.daemons.ask(&self.access, pid, &link.name)));
            }
        }
        let mut userspace: HashMap<(u64, String), (u32, Result<Device>)> = HashMap::new();
        let mut no_uapi = Vec::new();
        // All were started together: one deadline for all of them.
        let answers_by = Instant::now() + uapi::DEADLINE + Duration::from_millis(500);
        for (inode, interface, pid, answer) in queries {
            let result = match answer {
                Ok(receiver) => receiver
                    .recv_timeout(answers_by.saturating_duration_since(Instant::now()))
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("the UAPI query did not end in time"))),
                Err(err) => Err(err),
            };
            // A TUN holder without a UAPI socket is no WireGuard daemon (or
            // its socket is not there yet: asked again next round), unless
            // its sockets' packets show otherwise: its sockets are candidates.
            let result = match result {
                Ok(None) => {
                    no_uapi.push((inode, interface, pid));
                    continue;
                }
                Ok(Some(device)) => Ok(device),
                Err(err) => Err(err),
            };
            if !result.as_ref().is_err_and(|err| err.downcast_ref::<BackingOff>().is_some()) {
                self.daemons.note_answer(pid, &interface, result.is_ok());
            }
            userspace.insert((inode, interface), (pid, result));
        }
        for (inode, label, links, mut kernel_devices) in found {
            for link in &links {
                let (implementation, daemon, device) = if link.kind.as_deref() == Some("wireguard") {
                    let device = kernel_devices
                        .remove(&link.name)
                        .unwrap_or_else(|| Err(anyhow::anyhow!("no generic netlink answer for {}", link.name)));
                    (Implementation::Kernel, None, device)
                } else if let Some((pid, device)) = userspace.remove(&(inode, link.name.clone())) {
                    let process = Process { pid, comm: speakers::comm_of(pid) };
                    (Implementation::Userspace, Some(process), device)
                } else {
                    continue;
                };
                let device = match device {
                    Ok(device) => {
                        self.logged.remove(&(inode, link.name.clone()));
                        Some(device)
                    }
                    // Backing off repeats the last error, already logged.
                    Err(err) if err.downcast_ref::<BackingOff>().is_some() => None,
                    Err(err) => {
                        let message = format!("{label}/{}: {err:#}", link.name);
                        if !self.access.is_closed()
                            && self.logged.insert((inode, link.name.clone()), message.clone()).as_ref()
                                != Some(&message)
                        {
                            log::warn!("{message}");
                        }
                        None
                    }
                };
                topology.tunnels.push(Tunnel {
                    netns: inode,
                    netns_label: label.clone(),
                    interface: link.name.clone(),
                    ifindex: link.index,
                    discovered_by: match implementation {
                        Implementation::Kernel => DiscoveredBy::Netlink,
                        Implementation::Userspace => DiscoveredBy::Uapi,
                    },
                    implementation,
                    daemon_pid: daemon.as_ref().map(|p| p.pid),
                    process: daemon,
                    device,
                });
            }
        }
        topology.candidates = self.candidates(&topology, no_uapi);
        topology.transport_netns = self.transport_namespaces(&topology);
        // Backoff and what was logged are kept only for tunnels that still
        // exist: holders that come and go must not grow them.
        let present: HashSet<(u32, &str)> =
            topology.tunnels.iter().filter_map(|t| Some((t.daemon_pid?, t.interface.as_str()))).collect();
        self.daemons.retain_present(&present);
        let tunnels: HashSet<(u64, &str)> = topology.tunnels.iter().map(|t| (t.netns, t.interface.as_str())).collect();
        self.logged.retain(|(netns, interface), _| tunnels.contains(&(*netns, interface.as_str())));
        topology.tunnels.sort_by(|a, b| (&a.netns_label, &a.interface).cmp(&(&b.netns_label, &b.interface)));
        Ok(topology)
    }

    /// The UDP sockets of TUN holders that serve no UAPI, at most
    /// [`speakers::MAX_CANDIDATES`]. A process that already is a UAPI or
    /// netlink tunnel's is never a candidate.
    fn candidates(&self, topology: &Topology, no_uapi: Vec<(u64, String, u32)>) -> Vec<speakers::Candidate> {
        let tunnel_pids: HashSet<u32> = topology.tunnels.iter().filter_map(|t| t.daemon_pid).collect();
        let mut candidates = Vec::new();
        for (inode, interface, pid) in no_uapi {
            if tunnel_pids.contains(&pid) {
                continue;
            }
            let Some(namespace) = topology.namespaces.get(&inode) else { continue };
            let Some(link) = namespace.links.iter().find(|l| l.name == interface) else { continue };
            let sockets = match self.access.udp_sockets(pid) {
                Ok(sockets) => sockets,
                Err(err) => {
                    log::debug!("UDP sockets of PID {pid}: {err:#}");
                    continue;
                }
            };
            let comm = speakers::comm_of(pid);
            for socket in sockets {
                if candidates.len() >= speakers::MAX_CANDIDATES {
                    log::debug!(
                        "more than {} candidate speaker sockets: the rest are ignored",
                        speakers::MAX_CANDIDATES
                    );
                    return candidates;
                }
                candidates.push(speakers::Candidate {
                    netns: inode,
                    netns_label: namespace.label.clone(),
                    interface: interface.clone(),
                    ifindex: link.index,
                    pid,
                    comm: comm.clone(),
                    socket,
                });
            }
        }
        candidates
    }

    /// Links, rules and kernel WireGuard devices of one namespace, over
    /// the sockets kept for it (opened on first sight).
    fn read_namespace(&mut self, ns: &Netns) -> Result<namespace_sockets::Reading> {
        let sockets = match self.sockets.entry(ns.inode) {
            std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
            std::collections::hash_map::Entry::Vacant(entry) => {
                entry.insert(NamespaceSockets::open(self.access.as_ref(), ns)?)
            }
        };
        sockets.read(self.access.as_ref(), ns)
    }

    /// Where kernel tunnels' sockets live, over a sock_diag socket kept per
    /// namespace (see [`netns::transport_namespaces`]).
    fn transport_namespaces(&mut self, topology: &Topology) -> BTreeMap<(u64, u32), u64> {
        let (access, sockets) = (&self.access, &mut self.sockets);
        netns::transport_namespaces(topology, &mut self.placements_logged, |inode, port| {
            let handle = &topology.namespaces.get(&inode).context("namespace vanished")?.handle;
            let sockets = sockets.get_mut(&inode).context("namespace vanished")?;
            sockets.udp_bound(access.as_ref(), handle, inode, port)
        })
    }

    /// Whether its privileged access was ended on purpose (the run is over).
    pub fn is_closed(&self) -> bool {
        self.access.is_closed()
    }

    /// Waits until a namespace seen in the last discovery reports a link or
    /// rule change, or `timeout` passes (namespaces, daemons and their
    /// configuration change without notifications, so `wgtrace run` still
    /// rediscovers every interval). Whether a change woke it.
    pub fn wait(&self, timeout: Duration) -> bool {
        namespace_sockets::wait_for_change(&self.sockets, timeout)
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    /// This process's own namespace (no privilege needed), with listing
    /// steps that fail on demand.
    #[derive(Default)]
    struct Flaky {
        namespaces_fail: std::sync::atomic::AtomicBool,
        holders_fail: std::sync::atomic::AtomicBool,
        holder_scans: std::sync::atomic::AtomicUsize,
    }

    impl Privileged for Flaky {
        fn namespaces(&self) -> Result<Vec<Netns>> {
            anyhow::ensure!(!self.namespaces_fail.load(std::sync::atomic::Ordering::Relaxed), "listing refused");
            let handle = PathBuf::from("/proc/self/ns/net");
            Ok(vec![Netns { inode: netns::inode_of(&handle)?, name: None, handle }])
        }
        fn tun_holders(&self) -> Result<Vec<access::TunHolder>> {
            self.holder_scans.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            anyhow::ensure!(!self.holders_fail.load(std::sync::atomic::Ordering::Relaxed), "scan refused");
            Ok(Vec::new())
        }
        fn netns_socket(&self, handle: &std::path::Path, inode: u64, protocol: i32) -> Result<std::os::fd::OwnedFd> {
            access::Direct.netns_socket(handle, inode, protocol)
        }
        fn uapi_socket(&self, _: u32, _: &str, _: Duration) -> Result<Option<std::os::fd::OwnedFd>> {
            Ok(None)
        }
        fn udp_sockets(&self, _: u32) -> Result<Vec<speakers::UdpSocket>> {
            Ok(Vec::new())
        }
    }

    #[test]
    fn a_failing_step_does_not_end_the_round() {
        use std::sync::atomic::Ordering::Relaxed;
        let access = Arc::new(Flaky::default());
        let mut discoverer = Discoverer::with_access(Scope::Current, Arc::clone(&access) as Arc<dyn Privileged>);
        // Nothing listed yet: nothing to go on with.
        access.namespaces_fail.store(true, Relaxed);
        assert!(discoverer.discover().is_err());
        access.namespaces_fail.store(false, Relaxed);
        // A TUN link the last scan did not see (gone now): a scan is due.
        discoverer.tun_links.insert((0, 0, "gone0".into()));
        access.holders_fail.store(true, Relaxed);
        let own = netns::own_inode().unwrap();
        let topology = discoverer.discover().expect("the round goes on without TUN holders");
        assert!(topology.namespaces.contains_key(&own), "links and rules were still read");
        assert_eq!(discoverer.failing_steps.0.len(), 1, "the failure is remembered, so logged once");
        // Still failing: retried every round (logged once); then it works.
        discoverer.discover().unwrap();
        assert_eq!(access.holder_scans.load(Relaxed), 2);
        access.holders_fail.store(false, Relaxed);
        discoverer.discover().unwrap();
        assert!(discoverer.failing_steps.0.is_empty(), "its recovery is noted");
        discoverer.discover().unwrap();
        assert_eq!(access.holder_scans.load(Relaxed), 3, "no rescan once the scan matches the links");
        // Listing fails later: the last list is used.
        access.namespaces_fail.store(true, Relaxed);
        let topology = discoverer.discover().expect("the last listing stands in");
        assert!(topology.namespaces.contains_key(&own));
    }
}
