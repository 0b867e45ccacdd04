//! `cargo xtask vm-test`: the integration suite against kernel WireGuard
//! (wireguard.ko) on Debian's stock kernel, in a VM. The same tests as on the
//! host run there; `WGTRACE_LAB_WIREGUARD=kernel` makes the lab build its
//! tunnels with the kernel module instead of wireguard-go.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::vm::{self, VmOptions};

/// The test binaries (tests/tests/*.rs) that run inside the VM. Latency
/// thresholds assume real hardware, so that suite stays on the host; under
/// software emulation every packet is much slower.
pub const SUITES: &[&str] = &["nesting", "check", "kernel", "counting"];

/// The suites to run: all of [`SUITES`], or those named (comma-separated)
/// in WGTRACE_VM_SUITES, for a quicker look at one of them
/// (WGTRACE_VM_TEST_FILTER narrows them to tests whose names contain it).
fn selected() -> Vec<&'static str> {
    match std::env::var("WGTRACE_VM_SUITES") {
        Ok(names) if !names.trim().is_empty() => {
            SUITES.iter().copied().filter(|s| names.split(',').any(|n| n.trim() == *s)).collect()
        }
        _ => SUITES.to_vec(),
    }
}

/// Builds the test binaries and returns their paths by suite name.
fn test_binaries(workspace: &Path) -> Result<Vec<(String, PathBuf)>> {
    let output = Command::new(env!("CARGO"))
        .args(["test", "-p", "wgtrace-tests", "--no-run", "--message-format=json"])
        .current_dir(workspace)
        .output()
        .context("building the test binaries")?;
    anyhow::ensure!(
        output.status.success(),
        "building the test binaries failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut binaries = Vec::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let (Some(name), Some(executable)) = (message["target"]["name"].as_str(), message["executable"].as_str())
        else {
            continue;
        };
        if selected().contains(&name) {
            binaries.push((name.to_owned(), PathBuf::from(executable)));
        }
    }
    for suite in selected() {
        anyhow::ensure!(binaries.iter().any(|(n, _)| n == suite), "test suite {suite} was not built");
    }
    Ok(binaries)
}

/// The guest's script: kernel WireGuard loaded, then each suite in turn.
fn guest_script(workspace: &Path, wgtrace: &Path, helper: &Path, binaries: &[(String, PathBuf)]) -> String {
    let path = std::env::var("PATH").unwrap_or_default();
    let mut script = format!(
        "export PATH='{path}' CI=true RUST_BACKTRACE=0 WGTRACE_LAB_WIREGUARD=kernel \
         WGTRACE_BIN='{wgtrace}' WGTRACE_LAB_HELPER='{helper}'\n\
         cd '{workspace}'\n\
         modprobe wireguard || exit 90\n\
         modprobe -q udp_diag || echo 'udp_diag: not loaded (moved kernel interfaces cannot be placed)'\n\
         modprobe tun && mkdir -p /dev/net && {{ [ -e /dev/net/tun ] || mknod /dev/net/tun c 10 200; }}\n\
         echo \"guest kernel $(uname -r), kprobes: $(test -d /sys/kernel/debug/kprobes && echo yes || echo no)\"\n\
         failed=0\n",
        wgtrace = wgtrace.display(),
        helper = helper.display(),
        workspace = workspace.display(),
    );
    // WGTRACE_VM_TEST_FILTER: only the tests whose names contain it.
    let filter = std::env::var("WGTRACE_VM_TEST_FILTER")
        .ok()
        .filter(|f| !f.is_empty() && f.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .map(|f| format!(" '{f}'"))
        .unwrap_or_default();
    for (name, binary) in binaries {
        script.push_str(&format!(
            "echo \"== vm suite {name}\"\n'{}' --test-threads=1{filter} || failed=1\n",
            binary.display()
        ));
    }
    script.push_str("exit $failed\n");
    script
}

/// Runs the suites in the VM and returns the guest's output.
pub fn run(workspace: &Path) -> Result<String> {
    vm::ensure_vm_tools()?;
    let status = Command::new(env!("CARGO"))
        .args(["build", "-p", "wgtrace"])
        .current_dir(workspace)
        .status()
        .context("building wgtrace")?;
    anyhow::ensure!(status.success(), "building wgtrace failed");
    let binaries = test_binaries(workspace)?;
    let script = guest_script(workspace, &workspace.join("target/debug/wgtrace"), &std::env::current_exe()?, &binaries);
    let started = Instant::now();
    let options = VmOptions { memory_mib: 3072, timeout: Duration::from_secs(40 * 60), ..VmOptions::default() };
    let output = vm::run_in_vm(&options, &script)?;
    print!("{}", output.output);
    eprintln!(
        "vm-test: guest finished in {:.0} s with exit code {}",
        started.elapsed().as_secs_f64(),
        output.exit_code
    );
    match output.exit_code {
        0 => Ok(output.output),
        90 => bail!("the guest kernel could not load wireguard.ko"),
        code => bail!("tests failed inside the VM (exit code {code})"),
    }
}
