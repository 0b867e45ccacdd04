//! Loading and attaching the eBPF programs, and reading what they record.
//!
//! All links are owned by file descriptors held in [`Tracer`]: dropping it,
//! exiting, or being killed detaches everything, and nothing is pinned.

pub mod btf;
pub mod offsets;
mod paths;
pub mod peers;
mod speakers;

use std::{collections::HashMap, io};

use crate::topology::{Implementation, Topology};
use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{BtfTracePoint, tp_btf::BtfTracePointLinkId},
};
use peers::{PeerId, PeerSlots};
use wgtrace_common::{
    COUNTER_CANDIDATES_DROPPED, COUNTER_EVENTS_LOST, COUNTER_FORGED, CandidateEvent, DeviceKey, EVENT_CANDIDATE,
    EVENT_HANDSHAKE, EVENT_NEW_FLOW, EVENT_NEW_ROUTE, EVENT_PLAINTEXT, EVENT_TRANSMIT, PORT_BITMAP_SLOTS, PacketEvent,
    PathKey, PathStats, PeerKey, PlaintextEvent, RouteEvent, RouteKey, RouteStats, TUNNEL_KERNEL, TUNNEL_USERSPACE,
    TransmitEvent,
};

mod clock;

/// A hook wgtrace wants, and what it is for when it is missing.
struct Hook {
    program: &'static str,
    tracepoint: &'static str,
    required: bool,
    purpose: &'static str,
}

const HOOKS: &[Hook] = &[
    Hook {
        program: "net_dev_start_xmit",
        tracepoint: "net_dev_start_xmit",
        required: true,
        purpose: "which device each tunnel's encrypted packets leave through",
    },
    Hook {
        program: "netif_receive_skb",
        tracepoint: "netif_receive_skb",
        required: false,
        purpose: "received transport packets",
    },
    Hook {
        program: "fib_table_lookup",
        tracepoint: "fib_table_lookup",
        required: false,
        purpose: "IPv4 routing decisions (mark and table)",
    },
    Hook {
        program: "fib6_table_lookup",
        tracepoint: "fib6_table_lookup",
        required: false,
        purpose: "IPv6 routing decisions (mark and table)",
    },
];

/// Whether each hook is active, and why not.
#[derive(Clone, Debug)]
pub struct HookStatus {
    pub name: &'static str,
    pub active: bool,
    pub detail: String,
}

/// A decoded ring-buffer record.
#[derive(Clone, Copy, Debug)]
pub enum Event {
    Packet(PacketEvent),
    Route(RouteEvent),
    Plaintext(PlaintextEvent),
    Transmit(TransmitEvent),
    /// A handshake message of a candidate speaker's socket.
    Candidate(CandidateEvent),
}

pub struct Tracer {
    ebpf: Ebpf,
    events: RingBuf<MapData>,
    /// `COARSE_CLOCK`, until [`Self::keep_clock`] hands it to its thread.
    coarse_clock: Option<Array<MapData, u64>>,
    pub hooks: Vec<HookStatus>,
    /// The active hooks' links: attached from start to finish, so every
    /// packet is traced.
    links: Vec<(&'static str, BtfTracePointLinkId)>,
    /// Which slot number the kernel side knows each peer by.
    peers: PeerSlots,
    /// The port bitmap as last written, to rewrite only changed slots.
    port_bits: Vec<u64>,
    /// `PEERS_GENERATION` as last written (0: PEERS never written).
    peers_generation: u32,
    path_readings: paths::Monotonic,
}

impl Tracer {
    pub fn start() -> Result<Self> {
        check_privileges()?;
        raise_memlock_limit();
        let object = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/wgtrace"));
        anyhow::ensure!(
            !object.is_empty(),
            "this wgtrace was built without its eBPF programs (AYA_BUILD_SKIP was set); rebuild without it"
        );
        // The kernel's BTF is large (several MB parsed): hold one parsed copy
        // at a time. Ours yields the offsets and which tracepoints exist...
        let (kernel_offsets, available) = {
            let btf = btf::Btf::from_sys_fs()?;
            let available: Vec<bool> = HOOKS.iter().map(|h| btf.has_tracepoint(h.tracepoint)).collect();
            (offsets::resolve(&btf)?, available)
        };
        // ...then aya's, to load the programs. The loader parses its own copy
        // for CO-RE relocations, which Rust programs do not have: drop it.
        let mut loader = EbpfLoader::new();
        loader.btf(None);
        let aya_btf = aya::Btf::from_sys_fs().context("loading the kernel's BTF for aya")?;
        let mut ebpf =
            loader.override_global("KERNEL_OFFSETS", &kernel_offsets, true).load(object).map_err(explain_load_error)?;
        // Set before anything is attached: the first packet reads it.
        let mut coarse_clock = Array::try_from(ebpf.take_map("COARSE_CLOCK").context("COARSE_CLOCK map missing")?)?;
        clock::tick(&mut coarse_clock)?;

        let mut hooks = Vec::new();
        let mut links = Vec::new();
        for (hook, available) in HOOKS.iter().zip(available) {
            let status = if !available {
                Err(anyhow::anyhow!(
                    "this kernel has no BTF tracepoint {} (needs Linux 5.5+ with BTF)",
                    hook.tracepoint
                ))
            } else {
                attach(&mut ebpf, hook, &aya_btf)
            };
            match status {
                Ok(link) => {
                    links.push((hook.program, link));
                    hooks.push(HookStatus { name: hook.program, active: true, detail: hook.purpose.to_owned() })
                }
                Err(err) if hook.required => {
                    return Err(err.context(format!("attaching {}, needed for {}", hook.program, hook.purpose)));
                }
                Err(err) => {
                    log::warn!("{} unavailable, so no {}: {err:#}", hook.program, hook.purpose);
                    hooks.push(HookStatus { name: hook.program, active: false, detail: format!("{err:#}") });
                }
            }
        }
        let events = RingBuf::try_from(ebpf.take_map("EVENTS").context("EVENTS map missing")?)?;
        Ok(Self {
            ebpf,
            events,
            coarse_clock: Some(coarse_clock),
            hooks,
            links,
            peers: PeerSlots::default(),
            port_bits: vec![0; PORT_BITMAP_SLOTS as usize],
            peers_generation: 0,
            path_readings: paths::Monotonic::default(),
        })
    }

    /// Keeps the kernel side's coarse clock current from a thread of its
    /// own, until the process ends (see [`clock`]); the receiver hears if it
    /// stops. Called once, after any privilege drop, so the thread holds no
    /// more than the rest.
    pub fn keep_clock(&mut self) -> Result<tokio::sync::oneshot::Receiver<anyhow::Error>> {
        let map = self.coarse_clock.take().context("the coarse clock is already kept")?;
        clock::spawn(map)
    }

    /// Detaches every program; the maps stay readable for the last report.
    pub fn finish(&mut self) -> Result<()> {
        let mut result = Ok(());
        for (name, link) in std::mem::take(&mut self.links) {
            let detached = self.program(name).and_then(|p| p.detach(link).map_err(Into::into));
            if let Err(err) = detached {
                result = Err(err.context(format!("detaching {name}")));
            }
        }
        result
    }

    fn program(&mut self, name: &str) -> Result<&mut BtfTracePoint> {
        Ok(self.ebpf.program_mut(name).with_context(|| format!("program {name} missing"))?.try_into()?)
    }

    /// Drains the ring buffer.
    pub fn drain_events(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        while let Some(record) = self.events.next() {
            if let Some(event) = decode(&record) {
                out.push(event);
            }
        }
        out
    }

    pub fn events_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd as _;
        self.events.as_raw_fd()
    }

    /// Per-path counters, summed over CPUs: every packet is traced, and
    /// counted once (see [`paths`] for a reading a move fell into).
    pub fn paths(&mut self) -> Result<HashMap<PathKey, PathStats>> {
        self.path_readings.read(&self.ebpf)
    }

    /// Routing-table lookups per (peer, mark, table), summed over CPUs.
    pub fn routes(&self) -> Result<HashMap<RouteKey, RouteStats>> {
        let map: PerCpuHashMap<_, RouteKey, RouteStats> =
            PerCpuHashMap::try_from(self.ebpf.map("ROUTES").context("ROUTES map missing")?)?;
        let mut out = HashMap::new();
        for entry in map.iter() {
            let Ok((key, per_cpu)) = entry else { continue };
            let mut total = RouteStats::default();
            for stats in per_cpu.iter() {
                total.lookups += stats.lookups;
                // Each CPU keeps the answer it saw last: the newest is the
                // route's current answer.
                if stats.lookups > 0 && stats.last_seen_ns >= total.last_seen_ns {
                    total.last_seen_ns = stats.last_seen_ns;
                    total.result_ifindex = stats.result_ifindex;
                    total.error = stats.error;
                }
            }
            out.insert(key, total);
        }
        Ok(out)
    }

    /// The slot the kernel side counts a peer under.
    pub fn peer_slot(&self, peer: &PeerId) -> Option<u32> {
        self.peers.slot(peer)
    }

    /// Whether events may still name a peer: it exists, or vanished within
    /// the grace its slot is kept for.
    pub fn present_or_in_grace(&self, peer: &PeerId) -> bool {
        self.peers.present_or_in_grace(peer)
    }

    /// The peer behind a slot named by an event.
    pub fn peer_of_slot(&self, slot: u32) -> Option<&PeerId> {
        self.peers.peer(slot)
    }

    /// Tells the kernel side the topology: which devices are tunnels (where
    /// plaintext packets are timed) and of which implementation, which ports
    /// tunnels listen on (the bitmap every packet is tested against), and
    /// which (tunnel socket, endpoint) pairs are known peers (the only
    /// traffic that is counted). New entries are added, vanished ones
    /// removed, and every table is bounded by the topology.
    pub fn set_tunnel_devices(&mut self, topology: &Topology) -> Result<()> {
        let mut map: aya::maps::HashMap<_, DeviceKey, u8> =
            aya::maps::HashMap::try_from(self.ebpf.map_mut("TUNNEL_DEVICES").context("TUNNEL_DEVICES map missing")?)?;
        let wanted: HashMap<DeviceKey, u8> = topology
            .tunnels
            .iter()
            .map(|t| {
                let kind = match t.implementation {
                    Implementation::Kernel => TUNNEL_KERNEL,
                    Implementation::Userspace => TUNNEL_USERSPACE,
                };
                (DeviceKey { netns: t.netns as u32, ifindex: t.ifindex }, kind)
            })
            .collect();
        let stale: Vec<DeviceKey> = map.keys().filter_map(Result::ok).filter(|k| !wanted.contains_key(k)).collect();
        for key in stale {
            let _ = map.remove(&key);
        }
        for (key, kind) in wanted {
            map.insert(key, kind, 0).context("updating TUNNEL_DEVICES")?;
        }

        // Peers before ports: a port's bit is only set once its peers are
        // known, so the first packets through the gate find them.
        let wanted = self.peers.update(topology);
        let mut peers: aya::maps::HashMap<_, PeerKey, u32> =
            aya::maps::HashMap::try_from(self.ebpf.map_mut("PEERS").context("PEERS map missing")?)?;
        let stale: Vec<PeerKey> = peers.keys().filter_map(Result::ok).filter(|k| !wanted.contains_key(k)).collect();
        let mut changed = !stale.is_empty();
        for key in stale {
            let _ = peers.remove(&key);
        }
        let mut failed = None;
        for (key, slot) in &wanted {
            if peers.get(key, 0).ok() != Some(*slot) {
                // Even a failed insert may follow removals: the generation
                // is bumped either way, below.
                changed = true;
                if let Err(err) = peers.insert(key, slot, 0) {
                    failed = Some(err);
                    break;
                }
            }
        }
        if changed {
            // Each CPU's cached PEERS answers are from an older generation now.
            self.peers_generation = self.peers_generation.wrapping_add(1).max(1);
            let mut generation: aya::maps::Array<_, u32> = aya::maps::Array::try_from(
                self.ebpf.map_mut("PEERS_GENERATION").context("PEERS_GENERATION map missing")?,
            )?;
            generation.set(0, self.peers_generation, 0).context("updating PEERS_GENERATION")?;
        }
        if let Some(err) = failed {
            return Err(anyhow::Error::new(err).context("updating PEERS"));
        }
        // `PATHS` is not LRU: the paths of peers whose slots are gone go
        // here (a way may still move counts of a gone slot there; the next
        // round removes them).
        paths::forget_slots(&mut self.ebpf, |slot| self.peers.peer(slot).is_some())?;

        let bits = peers::port_bitmap(topology);
        let mut array: aya::maps::Array<_, u64> =
            aya::maps::Array::try_from(self.ebpf.map_mut("TUNNEL_PORT_BITS").context("TUNNEL_PORT_BITS map missing")?)?;
        for (index, (new, old)) in bits.iter().zip(self.port_bits.iter_mut()).enumerate() {
            if new != old {
                array.set(index as u32, new, 0).context("updating TUNNEL_PORT_BITS")?;
                *old = *new;
            }
        }
        Ok(())
    }

    /// Tells the kernel side which sockets are candidate speakers
    /// ((namespace, port) -> candidate number), before their ports' bits
    /// are set by [`Self::set_tunnel_devices`].
    pub fn set_candidates(&mut self, wanted: &HashMap<(u32, u16), u32>) -> Result<()> {
        speakers::write_candidates(&mut self.ebpf, wanted)
    }

    /// Events the kernel side could not deliver (ring buffer full).
    pub fn events_lost(&self) -> Result<u64> {
        self.counter(COUNTER_EVENTS_LOST)
    }

    /// WireGuard-shaped packets sent from raw or packet sockets, ignored.
    pub fn forged_packets(&self) -> Result<u64> {
        self.counter(COUNTER_FORGED)
    }

    /// Candidate speakers' handshake messages over the kernel side's
    /// per-CPU budget, not reported.
    pub fn candidate_messages_dropped(&self) -> Result<u64> {
        self.counter(COUNTER_CANDIDATES_DROPPED)
    }

    fn counter(&self, slot: u32) -> Result<u64> {
        let map: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map("COUNTERS").context("COUNTERS map missing")?)?;
        Ok(map.get(&slot, 0)?.iter().sum())
    }
}

fn attach(ebpf: &mut Ebpf, hook: &Hook, btf: &aya::Btf) -> Result<BtfTracePointLinkId> {
    let program: &mut BtfTracePoint = ebpf
        .program_mut(hook.program)
        .with_context(|| format!("program {} missing from the object", hook.program))?
        .try_into()?;
    program
        .load(hook.tracepoint, btf)
        .map_err(|e| anyhow::anyhow!(e))
        .context("the verifier or kernel refused the program")?;
    program.attach().context("attaching")
}

/// Decodes one ring-buffer record; anything malformed is None.
pub fn decode(record: &[u8]) -> Option<Event> {
    let kind = u32::from_ne_bytes(record.get(0..4)?.try_into().ok()?);
    // SAFETY: both event types are plain-old-data #[repr(C)] structs; the
    // length is checked and the read is unaligned-safe.
    unsafe {
        match kind {
            EVENT_NEW_FLOW | EVENT_HANDSHAKE if record.len() >= size_of::<PacketEvent>() => {
                Some(Event::Packet(std::ptr::read_unaligned(record.as_ptr().cast())))
            }
            EVENT_NEW_ROUTE if record.len() >= size_of::<RouteEvent>() => {
                Some(Event::Route(std::ptr::read_unaligned(record.as_ptr().cast())))
            }
            EVENT_PLAINTEXT if record.len() >= size_of::<PlaintextEvent>() => {
                Some(Event::Plaintext(std::ptr::read_unaligned(record.as_ptr().cast())))
            }
            EVENT_TRANSMIT if record.len() >= size_of::<TransmitEvent>() => {
                Some(Event::Transmit(std::ptr::read_unaligned(record.as_ptr().cast())))
            }
            EVENT_CANDIDATE if record.len() >= size_of::<CandidateEvent>() => {
                Some(Event::Candidate(std::ptr::read_unaligned(record.as_ptr().cast())))
            }
            _ => None,
        }
    }
}

fn check_privileges() -> Result<()> {
    // Effective capabilities from /proc: CAP_NET_ADMIN(12), CAP_SYS_PTRACE(19),
    // CAP_SYS_ADMIN(21), CAP_PERFMON(38), CAP_BPF(39).
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |bit: u32| effective & (1 << bit) != 0;
    let mut missing = Vec::new();
    if !(has(39) || has(21)) {
        missing.push("CAP_BPF");
    }
    if !(has(38) || has(21)) {
        missing.push("CAP_PERFMON");
    }
    if !has(12) {
        missing.push("CAP_NET_ADMIN");
    }
    if !has(21) {
        // Entering other namespaces (setns) needs CAP_SYS_ADMIN.
        missing.push("CAP_SYS_ADMIN");
    }
    if !has(19) && missing.is_empty() {
        log::warn!(
            "without CAP_SYS_PTRACE, userspace WireGuard daemons (wireguard-go, boringtun) cannot be found: \
             their tunnels will be missing"
        );
    }
    if !missing.is_empty() {
        bail!(
            "wgtrace run needs {} to load eBPF programs and read every namespace. Run it as root (sudo wgtrace run), \
             or try `wgtrace check`, which needs no eBPF.",
            missing.join(", ")
        );
    }
    Ok(())
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK. Raising it can fail
/// with EPERM in containers; on newer kernels that is harmless, so it is only
/// logged.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: setrlimit with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        log::debug!("could not raise RLIMIT_MEMLOCK ({}); fine on Linux 5.11+", io::Error::last_os_error());
    }
}

fn explain_load_error(err: aya::EbpfError) -> anyhow::Error {
    let text = format!("{err:#}");
    let hint = if text.contains("Operation not permitted") || text.contains("EPERM") {
        " (the kernel refused BPF: missing CAP_BPF, kernel.unprivileged_bpf_disabled, lockdown, or a seccomp filter)"
    } else {
        ""
    };
    anyhow::anyhow!("loading wgtrace's eBPF programs failed: {text}{hint}")
}
