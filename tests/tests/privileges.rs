//! Without privileges wgtrace says exactly what it needs and exits 2; it
//! never half-attaches.

use std::process::Command;

use wgtrace_tests::{privileged_or_skip, wgtrace_bin};

/// Runs wgtrace as `nobody` (a copy it can read), with `args`.
fn as_nobody(args: &[&str]) -> (i32, String, String) {
    let copy = std::env::temp_dir().join(format!("wgtrace-nobody-{}", std::process::id()));
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

#[test]
fn dropped_privileges_still_trace() {
    if !privileged_or_skip("dropped_privileges_still_trace") {
        return;
    }
    use wgtrace_tests::{LabGuard, Trace, Traffic, client_peer, lab};
    let _lab = LabGuard::up(&lab::LabOptions::default()).unwrap();
    let _traffic = Traffic::ping(lab::WG1_REMOTE).unwrap();
    let trace = Trace::start(4.0, &["--drop-privileges"]).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let status = std::fs::read_to_string(format!("/proc/{}/status", trace.pid())).unwrap();
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    assert_eq!(effective & (1 << 39), 0, "CAP_BPF dropped: {effective:#x}");
    assert_eq!(effective & (1 << 38), 0, "CAP_PERFMON dropped: {effective:#x}");
    assert_eq!(effective & (1 << 16), 0, "CAP_SYS_MODULE dropped: {effective:#x}");
    let report = trace.report().unwrap();
    let wg1 = client_peer(&report, "wg1");
    assert_eq!(wg1["nested_in"], "wg0", "tracing, topology and verdicts still work: {wg1:#}");
    assert!(wg1["latency"]["inner_rtt_us"]["count"].as_u64().unwrap() > 0);
}
