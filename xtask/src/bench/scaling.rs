//! Scaling: extra tunnels, and the flood (data-shaped flows and
//! handshake-shaped pairs).

#[allow(unused_imports)]
use super::*;

pub(super) fn scale_tunnels(plan: &Plan, wgtrace: &Path, stats: &BpfStats) -> Result<Vec<TunnelScale>> {
    let mut extras = ExtraTunnels::new()?;
    let mut out = Vec::new();
    for &extra in &plan.tunnel_counts {
        check_interrupted()?;
        let created = Instant::now();
        extras.grow_to(extra)?;
        eprintln!("bench:   {extra} extra tunnels ({:.1} s to create)", created.elapsed().as_secs_f64());
        let mut tracer = Tracer::start(Condition::Wgtrace, wgtrace)?;
        tracer.wait_ready(Duration::from_secs(60))?;
        // Past start-up and a first topology refresh.
        std::thread::sleep(Duration::from_millis(1500));
        let ids = bpf_ids(tracer.pid(), "prog_id");
        stats.set(true)?;
        let before = program_counters()?;
        let ticks = cpu_ticks(tracer.pid())?;
        let window = Instant::now();
        let load = tcp(lab::WG1_REMOTE, plan.seconds, plan.omit);
        let used = cpu_ticks(tracer.pid())?.saturating_sub(ticks);
        let after = program_counters();
        let elapsed = window.elapsed();
        stats.set(false)?;
        load?;
        let rss_peak_kb = status_kb(tracer.pid(), "VmHWM")?;
        let report: Value = serde_json::from_str(&tracer.stop()?).context("wgtrace's report is not JSON")?;
        let tunnels_reported = report["tunnels"].as_array().map_or(0, Vec::len);
        out.push(TunnelScale {
            extra,
            tunnels_reported,
            cpu_percent: ticks_to_percent(used, elapsed),
            rss_peak_kb,
            costs: costs(&ids, &before, &after?, elapsed, Condition::Wgtrace),
        });
    }
    extras.remove();
    Ok(out)
}

pub(super) fn scale_flows(plan: &Plan, wgtrace: &Path) -> Result<Vec<FlowScale>> {
    let mut out = Vec::new();
    for &requested in &plan.flow_counts {
        check_interrupted()?;
        let mut tracer = Tracer::start(Condition::Wgtrace, wgtrace)?;
        tracer.wait_ready(Duration::from_secs(60))?;
        std::thread::sleep(Duration::from_millis(1200));
        let rss_before_kb = status_kb(tracer.pid(), "VmRSS")?;
        let (sent, send_time) = send_flows(requested)?;
        let handshake_pairs = if requested == *plan.flow_counts.iter().max().unwrap_or(&0) {
            send_handshake_pairs(HANDSHAKE_PAIRS)?
        } else {
            0
        };
        // Two refresh ticks, so userspace has drained and processed them.
        std::thread::sleep(Duration::from_millis(2200));
        let rss_after_kb = status_kb(tracer.pid(), "VmRSS")?;
        let rss_peak_kb = status_kb(tracer.pid(), "VmHWM")?;
        let maps = maps(&bpf_ids(tracer.pid(), "map_id"))?;
        let memlock_bytes = maps.iter().map(|m| m.memlock).sum();
        let entries = |name: &str| -> Result<Option<(u64, u64)>> {
            maps.iter().find(|m| m.name == name).map(|m| Ok((map_entries(m.id)?, m.max_entries))).transpose()
        };
        let (flow_entries, route_entries) = (entries("PATHS")?, entries("ROUTES")?);
        let report: Value = serde_json::from_str(&tracer.stop()?).context("wgtrace's report is not JSON")?;
        out.push(FlowScale {
            requested,
            sent,
            send_seconds: send_time.as_secs_f64(),
            rss_before_kb,
            rss_after_kb,
            rss_peak_kb,
            memlock_bytes,
            flow_entries,
            route_entries,
            events_lost: report["events_lost"].as_u64().context("no events_lost in wgtrace's report")?,
            handshake_pairs,
        });
        if !plan.smoke {
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    Ok(out)
}

/// A WireGuard data message as wgtrace classifies it: type 4, three zero
/// bytes, receiver index, counter, and a 32-byte (padded + tag) body.
pub(super) fn wireguard_shaped_datagram() -> [u8; 48] {
    let mut message = [0u8; 48];
    message[0] = 4;
    message[4..8].copy_from_slice(&0x5eed_u32.to_le_bytes());
    message
}

/// Sends one WireGuard-shaped datagram from each of `count` distinct source
/// ports, from the lab client over wg1, paced at FLOWS_PER_SECOND.
pub(super) fn send_flows(count: usize) -> Result<(usize, Duration)> {
    let netns = fs::File::open(format!("/run/netns/{}", lab::CLIENT))?;
    let sender = std::thread::spawn(move || -> Result<(usize, Duration)> {
        // SAFETY: setns on this thread only, with a valid namespace fd.
        if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("entering {}: {}", lab::CLIENT, std::io::Error::last_os_error());
        }
        let message = wireguard_shaped_datagram();
        let started = Instant::now();
        let mut sent = 0;
        for port in 10_000..=u16::MAX {
            if sent == count {
                break;
            }
            // Ports in use (the lab's tunnels) are skipped.
            let Ok(socket) = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)) else { continue };
            if socket.send_to(&message, (lab::WG1_REMOTE, FLOW_PORT)).is_ok() {
                sent += 1;
            }
            if sent % 1000 == 0 {
                let due = Duration::from_secs_f64(sent as f64 / FLOWS_PER_SECOND as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        }
        Ok((sent, started.elapsed()))
    });
    sender.join().map_err(|_| anyhow::anyhow!("the flow sender panicked"))?
}

/// Handshake-shaped pairs between plain sockets on fresh loopback ports in
/// the lab client: an initiation, then a response naming its sender index.
/// Returns how many pairs were sent.
pub(super) fn send_handshake_pairs(count: usize) -> Result<usize> {
    let netns = fs::File::open(format!("/run/netns/{}", lab::CLIENT))?;
    let sender = std::thread::spawn(move || -> Result<usize> {
        // SAFETY: setns on this thread only, with a valid namespace fd.
        if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("entering {}: {}", lab::CLIENT, std::io::Error::last_os_error());
        }
        let mut sent = 0;
        for index in 0..count as u32 {
            let a = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
            let b = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
            let mut initiation = [0u8; 148];
            initiation[0] = 1;
            initiation[4..8].copy_from_slice(&index.to_le_bytes());
            let mut response = [0u8; 92];
            response[0] = 2;
            response[4..8].copy_from_slice(&(!index).to_le_bytes());
            response[8..12].copy_from_slice(&index.to_le_bytes());
            if a.send_to(&initiation, b.local_addr()?).is_ok() && b.send_to(&response, a.local_addr()?).is_ok() {
                sent += 1;
            }
        }
        Ok(sent)
    });
    sender.join().map_err(|_| anyhow::anyhow!("the handshake sender panicked"))?
}

/// Extra userspace tunnels in the lab client namespace (`wgbN`), each its own
/// wireguard-go daemon with one peer, to see what wgtrace's per-tunnel work costs.
pub(super) struct ExtraTunnels {
    pub(super) dir: PathBuf,
    pub(super) count: usize,
    pub(super) peer: String,
}

impl ExtraTunnels {
    pub(super) fn new() -> Result<Self> {
        let dir = Path::new(lab::STATE_DIR).join(lab::CLIENT).join("bench-wireguard");
        fs::create_dir_all(&dir)?;
        let key = run("wg", &["genkey"])?.trim().to_owned();
        fs::write(dir.join("private.key"), format!("{key}\n"))?;
        let peer_private = run("wg", &["genkey"])?.trim().to_owned();
        let peer = shell(&format!("echo '{peer_private}' | wg pubkey"))?.trim().to_owned();
        Ok(Self { dir, count: 0, peer })
    }

    pub(super) fn grow_to(&mut self, count: usize) -> Result<()> {
        if count <= self.count {
            return Ok(());
        }
        anyhow::ensure!(count <= 250, "at most 250 extra tunnels");
        // One mount namespace for the batch, with /run/wireguard bound to our
        // directory as the lab does, so the UAPI sockets are found through
        // /proc/PID/root of each daemon.
        let script = format!(
            "mount --bind {dir} /run/wireguard\n\
             for i in $(seq {first} {last}); do\n\
               wireguard-go wgb$i >/dev/null 2>&1\n\
               wg set wgb$i private-key {dir}/private.key listen-port $((52000 + i)) \
                 peer {peer} endpoint {endpoint}:$((52000 + i)) allowed-ips 10.77.0.$i/32\n\
               ip addr add 10.78.0.$i/32 dev wgb$i\n\
               ip link set wgb$i up\n\
             done",
            dir = self.dir.display(),
            first = self.count + 1,
            last = count,
            peer = self.peer,
            endpoint = lab::ROUTER_PUBLIC_V4,
        );
        run("ip", &["netns", "exec", lab::CLIENT, "sh", "-ec", &script]).context("creating extra tunnels")?;
        self.count = count;
        Ok(())
    }

    /// The daemons, found by name among the client namespace's processes.
    pub(super) fn pids(&self) -> Vec<i32> {
        let Ok(pids) = run("ip", &["netns", "pids", lab::CLIENT]) else { return Vec::new() };
        pids.split_whitespace()
            .filter_map(|pid| pid.parse::<i32>().ok())
            .filter(|pid| {
                let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let mut args = cmdline.split(|b| *b == 0);
                args.next().is_some_and(|a| a.ends_with(b"wireguard-go"))
                    && args.next().is_some_and(|a| a.starts_with(b"wgb"))
            })
            .collect()
    }

    pub(super) fn remove(&mut self) {
        let pids = self.pids();
        for pid in &pids {
            // SAFETY: signalling daemons we started, found by name in the lab.
            unsafe { libc::kill(*pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while pids.iter().any(|pid| alive(*pid)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        for pid in pids.iter().filter(|pid| alive(**pid)) {
            unsafe { libc::kill(*pid, libc::SIGKILL) };
        }
        self.count = 0;
    }
}

impl Drop for ExtraTunnels {
    fn drop(&mut self) {
        if self.count > 0 {
            self.remove();
        }
    }
}

pub(super) fn alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| !stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')))
}
