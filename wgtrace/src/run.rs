//! `wgtrace run`: trace until told to stop, refreshing the view each
//! interval, then print the final report.

use std::{
    io::{IsTerminal as _, Write as _},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};

use crate::{
    correlation::{self, Observations},
    exporter::Exporter,
    latency::LatencyTracker,
    probes::{Event, Tracer, peers::PeerId},
    report::{self, Report, RouteLookups},
    topology::{Discoverer, Privileged, Scope, Topology},
};

pub struct RunOptions {
    pub duration: Option<Duration>,
    pub interval: Duration,
    pub json: bool,
    pub scope: Scope,
    /// Send ICMP echoes along both paths of each nested tunnel (`--probe`).
    pub probe: bool,
    /// Privilege separation: a privileged helper for discovery, and this
    /// process user nobody without CAP_SYS_ADMIN, CAP_BPF or CAP_PERFMON
    /// once attached (see `privileges`).
    pub drop_privileges: bool,
    /// Serve Prometheus metrics on this address (`--prometheus`).
    pub prometheus: Option<std::net::SocketAddr>,
    /// Names by public key from `--peer-names` (config comments are read too).
    pub peer_names: std::collections::HashMap<String, String>,
    /// A peer is up with a handshake within this (`--handshake-timeout`).
    pub handshake_timeout: Duration,
    /// Per-peer metric series (`--peer-metrics`).
    pub peer_metrics: bool,
    /// One JSON line per event on stdout (`--events`).
    pub events: bool,
}

struct Session {
    tracer: Tracer,
    latency: LatencyTracker,
    /// Discovery's topology plus the speakers confirmed by packets.
    topology: Topology,
    /// The last topology discovery sent, before speakers were added.
    discovered: Topology,
    /// Candidate speakers and what their handshakes showed.
    speakers: crate::topology::speakers::Speakers,
    /// RTM_GETROUTE answers, kept while the topology's fingerprint holds.
    routes: correlation::RouteCache,
    started: Instant,
    names: crate::names::PeerNames,
    handshake_timeout: Duration,
    /// `--events`: the line-per-event stream on stdout.
    events: Option<crate::events::EventStream<std::io::Stdout>>,
    /// Set when transport packets arrived and no verdict was logged yet.
    awaiting_first_verdict: bool,
    first_verdict_logged: bool,
}

impl Session {
    /// Takes a newer topology, so new tunnels are timed and vanished ones
    /// dropped.
    fn apply_topology(&mut self, topology: Topology) -> Result<()> {
        let candidates = self.speakers.set_candidates(&topology.candidates);
        self.tracer.set_candidates(&candidates)?;
        self.discovered = topology.clone();
        let mut topology = topology;
        self.speakers.add_to(&mut topology);
        self.topology = topology;
        // The tracer's peer slots first: they say which absent peers only
        // just vanished.
        let written = self.tracer.set_tunnel_devices(&self.topology);
        let tracer = &self.tracer;
        self.latency.set_topology(&self.topology, |(netns, ifindex), public_key| {
            tracer.present_or_in_grace(&PeerId { netns, ifindex, public_key: public_key.to_owned() })
        });
        written
    }

    fn drain_events(&mut self) {
        let mut confirmed = false;
        for event in self.tracer.drain_events() {
            match event {
                Event::Candidate(c) => {
                    if self.speakers.on_event(&c) {
                        log::info!(
                            "netns {} port {}: a WireGuard handshake completed on a socket without a UAPI",
                            c.key.netns,
                            c.key.port
                        );
                        confirmed = true;
                    }
                }
                Event::Plaintext(p) => self.latency.on_plaintext(&p),
                Event::Transmit(t) => self.latency.on_transmit(&t),
                Event::Packet(p) => {
                    log::debug!(
                        "netns {} if {} ({}): WireGuard type {} of peer slot {} mark {:#x}",
                        p.netns,
                        p.path.ifindex,
                        String::from_utf8_lossy(&p.ifname).trim_end_matches('\0'),
                        p.message_type,
                        p.path.peer,
                        p.path.mark
                    );
                    if let Some(peer) = self.tracer.peer_of_slot(p.path.peer) {
                        // A speaker found from its packets has no UAPI to
                        // tell its handshakes: the packets do.
                        if p.message_type == wgtrace_common::wire::MESSAGE_HANDSHAKE_RESPONSE
                            && let Some(at) =
                                self.speakers.on_peer_handshake(peer.netns, peer.ifindex, &peer.public_key)
                        {
                            set_last_handshake(&mut self.topology, peer, at);
                        }
                        let rtt = self.latency.on_handshake(((peer.netns, peer.ifindex), &peer.public_key), &p);
                        if let (Some(events), Some(rtt)) = (&mut self.events, rtt) {
                            events.on_handshake_rtt(peer.netns, &peer.public_key, rtt);
                        }
                    }
                    self.awaiting_first_verdict |= !self.first_verdict_logged;
                }
                Event::Route(r) => log::debug!(
                    "peer slot {} route lookup mark {:#x} table {} -> if {} (error {})",
                    r.key.peer,
                    r.key.mark,
                    r.key.table,
                    r.result_ifindex,
                    r.error
                ),
            }
        }
        // A newly confirmed speaker is a tunnel from now on.
        if confirmed && let Err(err) = self.apply_topology(self.discovered.clone()) {
            log::warn!("adding a speaker found from its packets: {err:#}");
        }
    }

    /// Logs how long after start the first tunnel got a verdict from
    /// packets: the time-to-answer users see (and `cargo xtask bench` reads).
    fn log_first_verdict(&mut self) -> Result<()> {
        if !std::mem::take(&mut self.awaiting_first_verdict) {
            return Ok(());
        }
        let report = self.report()?;
        let verdict = report
            .tunnels
            .iter()
            .flat_map(|t| t.peers.iter().map(move |p| (t, p)))
            .find(|(_, p)| p.transport.is_some());
        if let Some((tunnel, peer)) = verdict {
            self.first_verdict_logged = true;
            log::info!(
                "first verdict after {} ms: {} {}",
                self.started.elapsed().as_millis(),
                tunnel.interface,
                match &peer.nested_in {
                    Some(outer) => format!("nested in {outer}"),
                    None => "direct".to_owned(),
                }
            );
        }
        Ok(())
    }

    fn report(&mut self) -> Result<Report> {
        let paths = self.tracer.paths()?;
        let routes = self.tracer.routes()?;
        let slot = |netns: u64, ifindex: u32, public_key: &str| {
            self.tracer.peer_slot(&PeerId { netns, ifindex, public_key: public_key.to_owned() })
        };
        let seen = Observations { paths: &paths, routes: &routes, slot: &slot };
        self.routes.refresh(&self.topology);
        let mut tunnels = correlation::correlate(&self.topology, &seen, &self.routes.oracle(&self.topology));
        crate::report::join_latency(&mut tunnels, &self.latency);
        self.names.annotate(&mut tunnels, &self.topology);
        crate::handshake::annotate(&mut tunnels, &self.topology, self.handshake_timeout);
        let route_lookups = correlation::lookups_by_mark_and_table(&routes)
            .into_iter()
            .map(|(mark, table, lookups)| RouteLookups { mark, table, lookups })
            .collect();
        Ok(Report {
            tunnels,
            events_lost: self.tracer.events_lost()?,
            forged_packets: self.tracer.forged_packets()?,
            route_lookups,
            duration_seconds: self.started.elapsed().as_secs_f64(),
            // Every packet is traced, from start to finish.
            traced_fraction: 1.0,
        })
    }
}

fn set_last_handshake(topology: &mut Topology, peer: &PeerId, at: u64) {
    let tunnel = topology.tunnels.iter_mut().find(|t| t.netns == peer.netns && t.ifindex == peer.ifindex);
    if let Some(found) = tunnel
        .and_then(|t| t.device.as_mut())
        .and_then(|d| d.peers.iter_mut().find(|p| p.public_key == peer.public_key))
    {
        found.last_handshake_sec = at;
    }
}

pub async fn run(options: RunOptions) -> Result<()> {
    let started = Instant::now();
    // Replies of hostile daemons (up to uapi::MAX_REPLY each, on threads of
    // their own) must not ratchet up the heap: with a fixed threshold glibc
    // maps large buffers on their own and returns them on free, instead of
    // raising the threshold and keeping them in per-thread arenas.
    // SAFETY: mallopt with integer arguments, before any other thread exists.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10)
    };
    // Bound before tracing starts, so a taken port fails fast.
    let series =
        if options.peer_metrics { crate::exporter::Series::PerPeer } else { crate::exporter::Series::PerTunnel };
    let exporter = options.prometheus.map(Exporter::bind).transpose()?.map(|e| e.with_series(series));
    // Handlers first: a signal that arrives once programs are attached must
    // end in a clean exit and report, not the default action.
    let mut sigterm = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    // The privileged helper starts before anything is attached, while this
    // process is still whole and single-threaded.
    let helper = match options.drop_privileges {
        true => Some(Arc::new(crate::privileges::helper::Client::spawn()?)),
        false => None,
    };
    let tracer = Tracer::start()?;
    for hook in &tracer.hooks {
        log::info!("hook {}: {}", hook.name, if hook.active { "active" } else { "inactive" });
    }
    let mut session = Session {
        tracer,
        latency: LatencyTracker::new(),
        topology: Topology::default(),
        discovered: Topology::default(),
        speakers: Default::default(),
        routes: correlation::RouteCache::default(),
        started,
        names: crate::names::PeerNames::new(options.peer_names),
        handshake_timeout: options.handshake_timeout,
        events: options.events.then(|| crate::events::EventStream::new(std::io::stdout())),
        awaiting_first_verdict: false,
        first_verdict_logged: false,
    };
    let discoverer = match &helper {
        Some(helper) => Discoverer::with_access(options.scope, Arc::clone(helper) as Arc<dyn Privileged>),
        None => Discoverer::new(options.scope),
    };
    if let Some(helper) = &helper {
        crate::privileges::drop_after_attach()?;
        log::info!("privileged helper: PID {}", helper.pid());
    }
    let mut clock_stopped = session.tracer.keep_clock()?;
    let mut failure = None;
    // Spawned after the drop, so the discovery thread has no more
    // capabilities than the rest of the process. Even the first discovery
    // runs there: tracing is already attached, and the wait for it is
    // bounded, so no process on the host can delay the run's start (or its
    // end: a signal meanwhile ends the run at once).
    let (mut topologies, first) = spawn_discovery(discoverer, options.interval)?;
    let mut stopped = false;
    tokio::select! {
        first = tokio::time::timeout(FIRST_DISCOVERY_WAIT, first) => match first {
            Ok(Ok(Ok(()))) => {
                let topology = topologies.borrow_and_update().clone();
                session.apply_topology(topology)?;
            }
            // A discovery that cannot start at all (`--netns` of a name that
            // does not exist) ends the run as it always did.
            Ok(Ok(Err(err))) => return Err(err),
            Ok(Err(_)) => anyhow::bail!("the discovery thread ended before its first discovery"),
            Err(_) => log::warn!(
                "the first discovery is taking longer than {} ms (a process on the host slow to answer?): \
                 tracing goes on, and tunnels appear as soon as it ends",
                FIRST_DISCOVERY_WAIT.as_millis()
            ),
        },
        _ = sigint.recv() => stopped = true,
        _ = sigterm.recv() => stopped = true,
    }
    // Serving starts with a report, so the first scrape has data. The run
    // loop only ever publishes (never waits) to the HTTP side.
    let publisher = match exporter {
        Some(exporter) => Some(exporter.start(session.report()?)?),
        None => None,
    };
    // SAFETY: the ring buffer's fd is owned by `session.tracer`, declared
    // before `ring` and so dropped after it; the fd stays valid while registered.
    let ring = unsafe { AsyncFd::register(session.tracer.events_fd()) }
        .map_err(|e| e.into_parts().1)
        .context("watching the ring buffer")?;
    let live = !options.json && !options.events && std::io::stderr().is_terminal();
    // The first discovery is in (or late, and applied when it comes): the
    // first refresh is one interval away.
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + options.interval, options.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let deadline = options.duration.map(|d| tokio::time::Instant::now() + d);
    // A signal during the wait for the first discovery goes straight to the
    // report.
    if !stopped {
        loop {
            tokio::select! {
                ready = ring.readable() => {
                    let mut guard = ready?;
                    session.drain_events();
                    guard.clear_ready();
                    session.log_first_verdict()?;
                }
                Ok(()) = topologies.changed() => {
                    let topology = topologies.borrow_and_update().clone();
                    session.apply_topology(topology)?;
                }
                _ = ticker.tick() => {
                    session.drain_events();
                    if live || publisher.is_some() || session.events.is_some() {
                        let report = session.report()?;
                        if let Some(events) = &mut session.events {
                            events.on_report(&report);
                        }
                        if live {
                            let mut err = std::io::stderr().lock();
                            // Clear the screen and redraw from the top.
                            let _ = write!(err, "\x1b[H\x1b[2J{}", report::render(&report, &session.tracer.hooks));
                        }
                        if let Some(publisher) = &publisher {
                            publisher.publish(report);
                        }
                    }
                }
                clock_result = &mut clock_stopped => {
                    // Paths could no longer be ordered: report what was
                    // seen so far, then fail. (A sender dropped unsent is
                    // a thread that panicked.)
                    let err = clock_result.unwrap_or_else(|_| anyhow::anyhow!("its thread ended"));
                    log::error!("the kernel side's coarse clock stopped: {err:#}; ending the run");
                    failure = Some(err.context("the kernel side's coarse clock stopped"));
                    break;
                }
                _ = sigint.recv() => break,
                _ = sigterm.recv() => break,
                _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => break,
            }
        }
    }
    // Stop serving metrics: the server and its connections are dropped.
    drop(publisher);
    // Discovery is over: the newest snapshot is taken below.
    if let Some(helper) = &helper {
        helper.end();
    }
    if let Err(err) = session.tracer.finish() {
        log::warn!("ending the trace: {err:#}; the report follows regardless");
    }
    session.drain_events();
    if let Ok(dropped @ 1..) = session.tracer.candidate_messages_dropped() {
        log::warn!(
            "{dropped} handshake-shaped messages of sockets without a UAPI were over the budget and not examined \
             (a TUN holder flooding them?)"
        );
    }
    // The newest topology the discovery thread has, without waiting for it.
    if topologies.has_changed().unwrap_or(false) {
        let topology = topologies.borrow_and_update().clone();
        session.apply_topology(topology)?;
    }
    let mut report = session.report()?;
    if options.probe {
        crate::report::probe_nested(&mut report.tunnels, &session.topology);
    }
    if let Some(events) = &mut session.events {
        // A stream: its last line, and no report after it.
        events.finish(&report);
    } else if options.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report::render(&report, &session.tracer.hooks));
    }
    failure.map_or(Ok(()), Err)
}

/// How long the run waits for the first discovery before it goes on without
/// it: a UAPI daemon's whole deadline ([`crate::topology::uapi::DEADLINE`])
/// and the collection margin, with room to spare. Normally it takes tens of
/// milliseconds.
const FIRST_DISCOVERY_WAIT: Duration = Duration::from_millis(2500);

/// The newest topology, and the first discovery's outcome (the topology
/// itself is in the watch channel).
type Discoveries = (tokio::sync::watch::Receiver<Topology>, tokio::sync::oneshot::Receiver<Result<()>>);

/// Discovers on a thread of its own, first at once, then when a namespace's
/// links or rules change and every `interval` anyway, so that no process on
/// the host (a daemon that drips its answer, a namespace that hangs) can hold
/// up tracing, the live view or the final report. The trace loop reads the
/// newest snapshot without ever waiting for one.
fn spawn_discovery(mut discoverer: Discoverer, interval: Duration) -> Result<Discoveries> {
    let (sender, receiver) = tokio::sync::watch::channel(Topology::default());
    let (first_sender, first) = tokio::sync::oneshot::channel();
    // The receiver starts out "seen": only new snapshots wake the loop.
    let mut receiver = receiver;
    receiver.mark_unchanged();
    std::thread::Builder::new()
        .name("wgtrace-discovery".into())
        .spawn(move || {
            let mut failing = false;
            let mut first_sender = Some(first_sender);
            loop {
                // Link and rule changes wake it at once; everything else
                // (new namespaces, daemons' configuration) is polled.
                if first_sender.is_none() && discoverer.wait(interval) {
                    log::debug!("a link or rule changed: rediscovering now");
                }
                let discovered = discoverer.discover();
                if let Some(first_sender) = first_sender.take() {
                    match discovered {
                        Ok(topology) => {
                            let _ = sender.send(topology);
                            let _ = first_sender.send(Ok(()));
                            continue;
                        }
                        // The run ends; or, if it stopped waiting (even
                        // between a check and this send), the failure is
                        // logged like any later one and discovery goes on.
                        Err(err) => match first_sender.send(Err(err)) {
                            Ok(()) => return,
                            Err(unsent) => {
                                failing = true;
                                if let Err(err) = unsent {
                                    log::warn!("discovering tunnels: {err:#}; retrying");
                                }
                                continue;
                            }
                        },
                    }
                }
                match discovered {
                    Ok(topology) => {
                        failing = false;
                        if sender.send(topology).is_err() {
                            return; // the run is over
                        }
                    }
                    Err(_) if discoverer.is_closed() => return, // the run is over
                    // Keep the last snapshot; say so once per outage.
                    Err(err) if !std::mem::replace(&mut failing, true) => {
                        log::warn!("discovering tunnels: {err:#}; keeping the last view");
                    }
                    Err(_) => {}
                }
            }
        })
        .context("starting the discovery thread")?;
    Ok((receiver, first))
}
