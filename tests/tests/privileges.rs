//! Without privileges wgtrace says exactly what it needs and exits 2; it
//! never half-attaches. With `--drop-privileges` the tracer (every thread)
//! is user nobody without CAP_SYS_ADMIN, CAP_BPF or CAP_PERFMON, its helper
//! keeps only what discovery needs, and tunnels created afterwards still get
//! their verdicts.

use std::process::Command;

use wgtrace_tests::{privileged_or_skip, wgtrace_bin};

/// Runs wgtrace as `nobody` (a copy it can read), with `args`.
fn as_nobody(args: &[&str]) -> (i32, String, String) {
    // One copy per call: tests run in parallel, and writing a binary another
    // test is executing fails with "Text file busy".
    static COPIES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let copy = std::env::temp_dir().join(format!(
        "wgtrace-nobody-{}-{}",
        std::process::id(),
        COPIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::copy(wgtrace_bin(), &copy).unwrap();
    let output = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"])
        .arg(&copy)
        .args(args)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&copy);
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn run_without_privileges_names_what_is_missing() {
    if !privileged_or_skip("run_without_privileges_names_what_is_missing") {
        return;
    }
    let (code, _, stderr) = as_nobody(&["run", "--duration", "1"]);
    assert_eq!(code, 2, "{stderr}");
    for capability in ["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"] {
        assert!(stderr.contains(capability), "names {capability}: {stderr}");
    }
    assert!(stderr.contains("wgtrace check"), "suggests the eBPF-free alternative: {stderr}");
}

#[test]
fn check_without_privileges_says_it_is_incomplete() {
    if !privileged_or_skip("check_without_privileges_says_it_is_incomplete") {
        return;
    }
    let (code, stdout, stderr) = as_nobody(&["check"]);
    assert_eq!(code, 2, "could not check everything: {stdout}{stderr}");
    assert!(stdout.contains("run as root"), "{stdout}");
    assert!(!stdout.contains("healthy:"), "must not claim health it could not check: {stdout}");
}

const CAP_SYS_ADMIN: u64 = 1 << 21;
const CAP_PERFMON: u64 = 1 << 38;
const CAP_BPF: u64 = 1 << 39;

/// (thread id, field) -> value of every `Cap*:` and `Uid:` line of every
/// thread of `pid`.
fn thread_credentials(pid: u32) -> Vec<(String, String, String)> {
    let mut found = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else { continue };
        for line in status.lines() {
            if let Some((field, value)) = line.split_once(':')
                && (field.starts_with("Cap") || field == "Uid")
            {
                found.push((
                    task.file_name().to_string_lossy().into_owned(),
                    field.to_owned(),
                    value.trim().to_owned(),
                ));
            }
        }
    }
    found
}

fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect()
}

#[test]
fn dropped_privileges_still_trace() {
    if !privileged_or_skip("dropped_privileges_still_trace") {
        return;
    }
    use wgtrace_tests::{LabGuard, Trace, Traffic, client_peer, lab};
    let _lab = LabGuard::up(&lab::LabOptions::default()).unwrap();
    let _traffic = Traffic::ping(lab::WG1_REMOTE).unwrap();
    let trace = Trace::start(
        if std::env::var_os("WGTRACE_LAB_WIREGUARD").is_some() { 40.0 } else { 12.0 },
        &["--drop-privileges", "-v"],
    )
    .unwrap();
    // Attaching takes a while (much longer under emulation in the VM); the
    // drop follows it, then discovery starts.
    let started = std::time::Instant::now();
    while !std::fs::read_to_string(format!("/proc/{}/status", trace.pid()))
        .is_ok_and(|s| s.lines().any(|l| l.starts_with("Uid:") && l.contains("65534")))
    {
        assert!(started.elapsed().as_secs() < 60, "the tracer never became nobody");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // Then the first discovery, then the discovery thread starts.
    while std::fs::read_dir(format!("/proc/{}/task", trace.pid())).unwrap().count() < 2 {
        assert!(started.elapsed().as_secs() < 60, "no discovery thread after the drop");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    // The tracer: every thread (the discovery thread and UAPI queries too).
    let credentials = thread_credentials(trace.pid());
    let threads: std::collections::BTreeSet<_> = credentials.iter().map(|(t, _, _)| t.clone()).collect();
    assert!(threads.len() >= 2, "the discovery thread is among them: {credentials:?}");
    // Kernels before 5.19 with kernel.unprivileged_bpf_disabled refuse map
    // reads by fd without CAP_BPF: there (only) the tracer keeps CAP_BPF.
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut version = release.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse::<u32>().ok());
    let old_kernel = (version.next().unwrap(), version.next().unwrap()) < (5, 19)
        && std::fs::read_to_string("/proc/sys/kernel/unprivileged_bpf_disabled").unwrap().trim() != "0";
    let allowed = if old_kernel { CAP_BPF | 1 << 12 | 1 << 13 } else { 1 << 12 | 1 << 13 };
    for (thread, field, value) in &credentials {
        if field == "Uid" {
            assert!(value.split_whitespace().all(|id| id == "65534"), "thread {thread} is user nobody: Uid {value}");
            continue;
        }
        if field == "CapAmb" || field == "CapInh" || field == "CapEff" || field == "CapPrm" || field == "CapBnd" {
            let caps = u64::from_str_radix(value, 16).unwrap();
            for (bit, name) in [(CAP_SYS_ADMIN, "CAP_SYS_ADMIN"), (CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")] {
                assert!(caps & bit & !allowed == 0, "thread {thread} {field} holds {name}: {value}");
            }
            assert_eq!(caps & !allowed, 0, "thread {thread} {field}: only NET_ADMIN and NET_RAW: {value}");
        }
    }
    // The helper: root, with what discovery needs and no BPF capability.
    let helpers = children_of(trace.pid());
    assert_eq!(helpers.len(), 1, "one privileged helper: {helpers:?}");
    for (thread, field, value) in thread_credentials(helpers[0]) {
        if field == "CapEff" {
            let caps = u64::from_str_radix(&value, 16).unwrap();
            assert_eq!(caps & (CAP_BPF | CAP_PERFMON), 0, "helper thread {thread}: {value}");
            assert_ne!(caps & CAP_SYS_ADMIN, 0, "the helper keeps what entering namespaces needs: {value}");
        }
    }
    // A tunnel created after the drop is discovered (through the helper)
    // and gets its verdict from packets.
    lab::add_tunnel("wg2").unwrap();
    let _wg2 = Traffic::ping(lab::WG2_REMOTE).unwrap();
    let report = trace.report().unwrap();
    let wg1 = client_peer(&report, "wg1");
    assert_eq!(wg1["nested_in"], "wg0", "tracing, topology and verdicts still work: {wg1:#}");
    assert!(wg1["latency"]["inner_rtt_us"]["count"].as_u64().unwrap() > 0);
    let wg2 = client_peer(&report, "wg2");
    assert_eq!(wg2["nested_in"], "wg1", "a tunnel created after the drop gets its verdict: {wg2:#}");
    assert!(wg2["transport"]["packets"].as_u64().unwrap_or(0) > 0, "from packets: {wg2:#}");
    assert!(children_of(std::process::id()).iter().all(|p| !helpers.contains(p)));
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(!std::path::Path::new(&format!("/proc/{}", helpers[0])).exists(), "the helper ends with the run");
}
