//! Kernel and procfs readings: bpf_stats per program, maps, CPU ticks,
//! RSS.

#[allow(unused_imports)]
use super::*;

#[derive(Debug)]
pub(super) struct Counter {
    pub(super) name: String,
    pub(super) run_time_ns: u64,
    pub(super) run_cnt: u64,
}

/// Every loaded program's accumulated run time and count (`bpftool prog
/// show --json`; both are absent while zero).
pub(super) fn program_counters() -> Result<BTreeMap<u32, Counter>> {
    let text = run("bpftool", &["prog", "show", "--json"])?;
    let programs: Vec<Value> = serde_json::from_str(&text).context("bpftool prog show --json")?;
    Ok(programs
        .iter()
        .filter_map(|p| {
            let counter = Counter {
                name: p["name"].as_str().unwrap_or_default().to_owned(),
                run_time_ns: p["run_time_ns"].as_u64().unwrap_or(0),
                run_cnt: p["run_cnt"].as_u64().unwrap_or(0),
            };
            Some((u32::try_from(p["id"].as_u64()?).ok()?, counter))
        })
        .collect())
}

pub(super) struct MapInfo {
    pub(super) id: u32,
    pub(super) name: String,
    pub(super) memlock: u64,
    pub(super) max_entries: u64,
}

/// The maps `ids`, from `bpftool map show --json`.
pub(super) fn maps(ids: &BTreeSet<u32>) -> Result<Vec<MapInfo>> {
    let text = run("bpftool", &["map", "show", "--json"])?;
    let maps: Vec<Value> = serde_json::from_str(&text).context("bpftool map show --json")?;
    Ok(maps
        .iter()
        .filter_map(|m| {
            let id = u32::try_from(m["id"].as_u64()?).ok()?;
            let name = m["name"].as_str().unwrap_or_default().to_owned();
            let memlock = m["bytes_memlock"].as_u64().unwrap_or(0);
            ids.contains(&id).then(|| MapInfo {
                id,
                name,
                memlock,
                max_entries: m["max_entries"].as_u64().unwrap_or(0),
            })
        })
        .collect())
}

/// How many entries map `id` holds: `bpftool map dump` ends with "Found N elements".
pub(super) fn map_entries(id: u32) -> Result<u64> {
    let text = run("bpftool", &["map", "dump", "id", &id.to_string()])?;
    text.lines()
        .rev()
        .find_map(|l| l.strip_prefix("Found ")?.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no element count in `bpftool map dump id {id}`"))
}

/// The BPF program (`prog_id`) or map (`map_id`) IDs a process holds,
/// from its fds' fdinfo: this finds a tracer's own objects even when other
/// tools have loaded programs of the same name.
pub(super) fn bpf_ids(pid: u32, key: &str) -> BTreeSet<u32> {
    let prefix = format!("{key}:");
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else { return BTreeSet::new() };
    fds.flatten()
        .filter_map(|fd| fs::read_to_string(fd.path()).ok())
        .flat_map(|info| {
            info.lines().filter_map(|l| l.strip_prefix(&prefix)?.trim().parse::<u32>().ok()).collect::<Vec<_>>()
        })
        .collect()
}

/// utime + stime of all of a process's threads, in clock ticks.
pub(super) fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("reading /proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat.rsplit_once(')').context("/proc/PID/stat")?.1.split_whitespace().collect();
    // After "pid (comm)", field 3 (state) is index 0: utime is 14, stime 15.
    let field = |n: usize| -> Result<u64> { Ok(fields.get(n - 3).context("short /proc/PID/stat")?.parse()?) };
    Ok(field(14)? + field(15)?)
}

pub(super) fn ticks_to_percent(ticks: u64, wall: Duration) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 / per_second / wall.as_secs_f64() * 100.0
}

/// A `kB` line of /proc/PID/status (VmHWM, VmRSS).
pub(super) fn status_kb(pid: u32, key: &str) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':')?.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {key} in /proc/{pid}/status"))
}

/// kernel.bpf_stats_enabled, on only during cost windows, restored on drop.
pub(super) struct BpfStats {
    pub(super) original: String,
}

impl BpfStats {
    pub(super) fn new() -> Result<Self> {
        let original = fs::read_to_string(STATS_SYSCTL).context("reading kernel.bpf_stats_enabled")?.trim().to_owned();
        Ok(Self { original })
    }

    pub(super) fn set(&self, on: bool) -> Result<()> {
        // Someone else's setting wins over our "off".
        let value = if on || self.original == "1" { "1" } else { "0" };
        fs::write(STATS_SYSCTL, value).context("setting kernel.bpf_stats_enabled")
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Err(err) = fs::write(STATS_SYSCTL, &self.original) {
            eprintln!("bench: warning: restoring kernel.bpf_stats_enabled={}: {err}", self.original);
        }
    }
}
