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
