//! What exists on the host: network namespaces, their interfaces and policy
//! rules, and every WireGuard tunnel with its configuration.
//!
//! Userspace implementations (wireguard-go, boringtun) are found through the
//! TUN device they hold open (`/proc/PID/fdinfo` names it) and queried over
//! their UAPI socket in their own mount namespace. Kernel WireGuard devices
//! are recognised by their rtnetlink kind. TUN holders that serve no UAPI
//! (tailscaled and the like) become candidates whose sockets' handshakes
//! can confirm them as tunnels (see [`speakers`]).

pub mod access;
pub mod genl;
pub mod netlink;
pub mod netns;
pub mod speakers;
pub mod uapi;
pub mod wgquick;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use serde::Serialize;

pub use access::Privileged;
use netlink::{Link, Rule};
pub use netns::Netns;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Peer {
    /// Base64, as `wg` prints it.
    pub public_key: String,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<(IpAddr, u8)>,
    pub last_handshake_sec: u64,
}

/// A WireGuard device's configuration, without its private key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Device {
    pub listen_port: u16,
    pub fwmark: u32,
    pub peers: Vec<Peer>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Implementation {
    Kernel,
    Userspace,
}

impl Implementation {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Kernel => "kernel",
            Self::Userspace => "userspace",
        }
    }
}

/// How a tunnel was found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DiscoveredBy {
    /// Kernel WireGuard, over generic netlink.
    #[default]
    Netlink,
    /// A userspace daemon's UAPI socket.
    Uapi,
    /// A TUN holder without a UAPI whose socket completed a handshake.
    Packets,
}

/// The process holding a tunnel's TUN device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Process {
    pub pid: u32,
    pub comm: String,
}

#[derive(Clone, Debug)]
pub struct Tunnel {
    pub netns: u64,
    pub netns_label: String,
    pub interface: String,
    pub ifindex: u32,
    pub implementation: Implementation,
    /// Userspace daemon, when there is one.
    pub daemon_pid: Option<u32>,
    pub discovered_by: DiscoveredBy,
    /// The TUN holder (userspace tunnels).
    pub process: Option<Process>,
    /// None when the configuration could not be read (the reason is logged).
    pub device: Option<Device>,
}

/// One namespace's interfaces and rules.
#[derive(Clone, Debug, Default)]
pub struct Namespace {
    pub label: String,
    pub links: Vec<Link>,
    pub rules_v4: Vec<Rule>,
    pub rules_v6: Vec<Rule>,
    pub handle: PathBuf,
    /// A route socket inside this namespace for [`Topology::route_get`],
    /// kept open across discoveries (one per namespace, never a setns per
    /// question; it also works after the privilege drop).
    pub route_socket: Option<Arc<Mutex<netlink::Socket>>>,
}

#[derive(Clone, Debug, Default)]
pub struct Topology {
    pub own_netns: u64,
    pub namespaces: BTreeMap<u64, Namespace>,
    pub tunnels: Vec<Tunnel>,
    /// TUN holders without a UAPI, with their UDP sockets: possible
    /// WireGuard speakers, confirmed by their packets (bounded).
    pub candidates: Vec<speakers::Candidate>,
    /// (netns inode, interface) -> (PID, process name) holding a TUN or TAP
    /// device, WireGuard or not: who owns a tunnel another one rides in.
    pub tun_holders: BTreeMap<(u64, String), (u32, String)>,
    /// (netns inode, ifindex) of a kernel tunnel moved out of the namespace
    /// it was created in -> that namespace, where its socket stayed and its
    /// transport is routed ([`netns::SocketPlace`]). Absent: its own.
    pub transport_netns: BTreeMap<(u64, u32), u64>,
}

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

    /// Changes when a tunnel, peer, endpoint, mark or policy rule does
    /// (not with handshakes): when transport may take a new path.
    pub fn fingerprint(&self) -> u64 {
        use std::hash::{Hash as _, Hasher as _};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        for tunnel in &self.tunnels {
            (tunnel.netns, tunnel.ifindex, &tunnel.interface).hash(&mut hasher);
            if let Some(device) = &tunnel.device {
                (device.listen_port, device.fwmark).hash(&mut hasher);
                // wireguard-go lists peers (and their allowed IPs) in no
                // stable order.
                let mut peers: Vec<_> = device
                    .peers
                    .iter()
                    .map(|peer| {
                        let mut allowed_ips = peer.allowed_ips.clone();
                        allowed_ips.sort();
                        (&peer.public_key, peer.endpoint, allowed_ips)
                    })
                    .collect();
                peers.sort();
                peers.hash(&mut hasher);
            }
        }
        for (inode, namespace) in &self.namespaces {
            inode.hash(&mut hasher);
            format!("{:?}{:?}", namespace.rules_v4, namespace.rules_v6).hash(&mut hasher);
        }
        hasher.finish()
    }

    /// The namespace whose routing carries `tunnel`'s encrypted transport.
    pub fn transport_netns(&self, tunnel: &Tunnel) -> u64 {
        self.transport_netns.get(&(tunnel.netns, tunnel.ifindex)).copied().unwrap_or(tunnel.netns)
    }

    pub fn tunnel_on_ifindex(&self, netns: u64, ifindex: u32) -> Option<&Tunnel> {
        self.tunnels.iter().find(|t| t.netns == netns && t.ifindex == ifindex)
    }

    pub fn link_name(&self, netns: u64, ifindex: u32) -> Option<&str> {
        self.namespaces.get(&netns)?.links.iter().find(|l| l.index == ifindex).map(|l| l.name.as_str())
    }

    pub fn netns_label(&self, netns: u64) -> String {
        self.namespaces.get(&netns).map(|n| n.label.clone()).unwrap_or_else(|| format!("netns:{netns}"))
    }

    /// Every route of `table` in `netns` for this family (RTM_GETROUTE dump).
    pub fn table_routes(&self, netns: u64, family: u8, table: u32) -> Result<Vec<netlink::TableRoute>> {
        let namespace = self.namespaces.get(&netns).context("namespace vanished")?;
        if let Some(socket) = &namespace.route_socket {
            let mut socket = socket.lock().map_err(|_| anyhow::anyhow!("route socket poisoned"))?;
            return socket.table_routes(family, table);
        }
        let handle = namespace.handle.clone();
        netns::run_in(&handle, move || netlink::Socket::route()?.table_routes(family, table))
    }

    /// Asks the kernel, inside `netns`, where a UDP packet would go.
    pub fn route_get(&self, netns: u64, query: netlink::UdpQuery) -> Result<netlink::RouteAnswer> {
        let namespace = self.namespaces.get(&netns).context("namespace vanished")?;
        if let Some(socket) = &namespace.route_socket {
            let mut socket = socket.lock().map_err(|_| anyhow::anyhow!("route socket poisoned"))?;
            return socket.route_get(&query);
        }
        let handle = namespace.handle.clone();
        netns::run_in(&handle, move || netlink::Socket::route()?.route_get(&query))
    }
}

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
struct BackingOff(u32);

impl std::fmt::Display for BackingOff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "unreadable: its UAPI socket failed {} time(s) in a row; asked again later", self.0)
    }
}

impl std::error::Error for BackingOff {}

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
    backoff: HashMap<(u32, String), Backoff>,
    /// UAPI queries still running past their deadline (a hostile mount can
    /// stall a path walk): never a second one for the same daemon.
    in_flight: Arc<Mutex<HashSet<(u32, String)>>>,
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

/// One namespace's netlink sockets. Holding them keeps the namespace (and
/// so its inode number) alive until it is no longer listed.
struct NamespaceSockets {
    /// Link and rule dumps.
    dumps: netlink::Socket,
    /// Route questions from the report (shared with the topology).
    oracle: Arc<Mutex<netlink::Socket>>,
    /// Kernel WireGuard, opened once such a link is seen.
    wireguard: Option<genl::Wireguard>,
    /// Subscribed to link and rule notifications ([`Discoverer::wait`]).
    changes: Option<std::os::fd::OwnedFd>,
    /// Socket listings, opened once a kernel tunnel's socket is looked for.
    diag: Option<netlink::Socket>,
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
            backoff: HashMap::new(),
            in_flight: Arc::default(),
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
                queries.push((*inode, link.name.clone(), pid, self.ask_daemon(pid, &link.name)));
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
                self.note_answer(pid, &interface, result.is_ok());
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
        self.backoff.retain(|(pid, interface), _| present.contains(&(*pid, interface.as_str())));
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

    /// Starts a UAPI query on its own thread, unless the daemon is backing
    /// off or its last query is still running.
    fn ask_daemon(&self, pid: u32, interface: &str) -> Result<std::sync::mpsc::Receiver<Result<Option<Device>>>> {
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
        let access = Arc::clone(&self.access);
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

    /// Links, rules and kernel WireGuard devices of one namespace, over
    /// the sockets kept for it (opened on first sight).
    #[allow(clippy::type_complexity)]
    fn read_namespace(
        &mut self,
        ns: &Netns,
    ) -> Result<(Vec<Link>, Vec<Rule>, Vec<Rule>, HashMap<String, Result<Device>>, Arc<Mutex<netlink::Socket>>)> {
        let sockets = match self.sockets.entry(ns.inode) {
            std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
            std::collections::hash_map::Entry::Vacant(entry) => {
                let open = || self.access.netns_socket(&ns.handle, ns.inode, netlink::NETLINK_ROUTE);
                // Without notifications discovery still happens every interval.
                let changes = open().and_then(|fd| netlink::subscribe(fd, netlink::CHANGE_GROUPS));
                if let Err(err) = &changes {
                    log::debug!("{}: no change notifications: {err:#}", ns.handle.display());
                }
                entry.insert(NamespaceSockets {
                    dumps: netlink::Socket::from_fd(open()?),
                    oracle: Arc::new(Mutex::new(netlink::Socket::from_fd(open()?))),
                    wireguard: None,
                    changes: changes.ok(),
                    diag: None,
                })
            }
        };
        let links = sockets.dumps.links()?;
        let rules_v4 = sockets.dumps.rules(netlink::AF_INET)?;
        let rules_v6 = sockets.dumps.rules(netlink::AF_INET6)?;
        let names: Vec<&str> =
            links.iter().filter(|l| l.kind.as_deref() == Some("wireguard")).map(|l| l.name.as_str()).collect();
        let mut kernel_devices = HashMap::new();
        if !names.is_empty() {
            // Asked only once such a link exists: asking for an unregistered
            // family makes the kernel try to load its module.
            if sockets.wireguard.is_none() {
                let socket = self.access.netns_socket(&ns.handle, ns.inode, netlink::NETLINK_GENERIC);
                match socket.and_then(|fd| genl::Wireguard::with_socket(netlink::Socket::from_fd(fd))) {
                    Ok(Some(wireguard)) => sockets.wireguard = Some(wireguard),
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
            if let Some(wireguard) = &mut sockets.wireguard {
                kernel_devices = names.into_iter().map(|n| (n.to_owned(), wireguard.device(n))).collect();
            }
        }
        Ok((links, rules_v4, rules_v6, kernel_devices, Arc::clone(&sockets.oracle)))
    }

    /// Where kernel tunnels' sockets live, over a sock_diag socket kept per
    /// namespace (see [`netns::transport_namespaces`]).
    fn transport_namespaces(&mut self, topology: &Topology) -> BTreeMap<(u64, u32), u64> {
        let (access, sockets) = (&self.access, &mut self.sockets);
        netns::transport_namespaces(topology, &mut self.placements_logged, |inode, port| {
            let handle = &topology.namespaces.get(&inode).context("namespace vanished")?.handle;
            let sockets = sockets.get_mut(&inode).context("namespace vanished")?;
            if sockets.diag.is_none() {
                let fd = access.netns_socket(handle, inode, netlink::NETLINK_SOCK_DIAG)?;
                sockets.diag = Some(netlink::Socket::from_fd(fd));
            }
            let diag = sockets.diag.as_mut().context("no sock_diag socket")?;
            // WireGuard binds both families; IPv6 is asked only when needed
            // (and may be disabled).
            let mut found = diag.udp_bound(netlink::AF_INET, port)?;
            if !found.iter().any(|s| s.local.is_unspecified()) {
                found.extend(diag.udp_bound(netlink::AF_INET6, port).unwrap_or_default());
            }
            Ok(found)
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
        let mut fds: Vec<libc::pollfd> = self
            .sockets
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
                for socket in self.sockets.values().filter_map(|s| s.changes.as_ref()) {
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

    fn note_answer(&mut self, pid: u32, interface: &str, answered: bool) {
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
}

/// Parses `ADDR/LEN` (or a bare address, as a host prefix).
pub fn parse_prefix(text: &str) -> Result<(IpAddr, u8)> {
    let (address, length) = match text.split_once('/') {
        Some((a, l)) => (a.parse::<IpAddr>()?, Some(l.parse::<u8>()?)),
        None => (text.parse::<IpAddr>()?, None),
    };
    let max = if address.is_ipv4() { 32 } else { 128 };
    let length = length.unwrap_or(max);
    anyhow::ensure!(length <= max, "prefix length {length} is too long for {address}");
    Ok((address, length))
}

pub fn prefix_contains(network: IpAddr, length: u8, address: IpAddr) -> bool {
    match (network, address) {
        (IpAddr::V4(n), IpAddr::V4(a)) => {
            let mask = if length == 0 { 0 } else { u32::MAX << (32 - length.min(32)) };
            u32::from(n) & mask == u32::from(a) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(a)) => {
            let mask = if length == 0 { 0 } else { u128::MAX << (128 - length.min(128)) };
            u128::from(n) & mask == u128::from(a) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_peers(peers: Vec<Peer>, fwmark: u32) -> Topology {
        let tunnel = Tunnel {
            netns: 1,
            netns_label: "host".into(),
            interface: "wg0".into(),
            ifindex: 3,
            implementation: Implementation::Userspace,
            daemon_pid: None,
            discovered_by: DiscoveredBy::Uapi,
            process: None,
            device: Some(Device { listen_port: 51820, fwmark, peers }),
        };
        Topology { tunnels: vec![tunnel], ..Topology::default() }
    }

    #[test]
    fn the_fingerprint_ignores_peer_order_and_handshakes_but_not_marks_or_endpoints() {
        let peer = |key: &str, endpoint: &str, handshake: u64| Peer {
            public_key: key.into(),
            endpoint: Some(endpoint.parse().unwrap()),
            allowed_ips: vec![("10.0.0.0".parse().unwrap(), 8), ("192.168.0.0".parse().unwrap(), 16)],
            last_handshake_sec: handshake,
        };
        let (a, b) = (peer("A=", "192.0.2.1:51820", 1), peer("B=", "192.0.2.2:51820", 1));
        let base = with_peers(vec![a.clone(), b.clone()], 0).fingerprint();
        let mut reordered_ips = b.clone();
        reordered_ips.allowed_ips.reverse();
        assert_eq!(with_peers(vec![reordered_ips, a.clone()], 0).fingerprint(), base);
        assert_eq!(with_peers(vec![peer("A=", "192.0.2.1:51820", 99), b.clone()], 0).fingerprint(), base);
        assert_ne!(with_peers(vec![a.clone(), b.clone()], 51820).fingerprint(), base);
        assert_ne!(with_peers(vec![peer("A=", "192.0.2.9:51820", 1), b], 0).fingerprint(), base);
    }

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

    #[test]
    fn prefixes() {
        assert_eq!(parse_prefix("203.0.113.0/24").unwrap(), ("203.0.113.0".parse().unwrap(), 24));
        assert_eq!(parse_prefix("2001:db8::1").unwrap().1, 128);
        assert!(parse_prefix("10.0.0.0/33").is_err());
        let net: IpAddr = "203.0.113.0".parse().unwrap();
        assert!(prefix_contains(net, 24, "203.0.113.9".parse().unwrap()));
        assert!(!prefix_contains(net, 24, "203.0.114.9".parse().unwrap()));
        assert!(prefix_contains("0.0.0.0".parse().unwrap(), 0, "198.51.100.1".parse().unwrap()));
        assert!(!prefix_contains(net, 0, "2001:db8::1".parse().unwrap()), "families never match");
    }
}
