//! `cargo xtask fuzz`: every fuzz target of `fuzz/` for a bounded time, so CI
//! exercises the parsers that read what the kernel, daemons and users hand
//! to wgtrace.

use std::{path::Path, process::Command};

use anyhow::{Context as _, Result};

pub const TARGETS: &[&str] = &["wire", "uapi", "netlink", "btf", "wgquick", "events", "peer_names"];
const CARGO_FUZZ_VERSION: &str = "0.13.2";

pub fn ensure_cargo_fuzz() -> Result<()> {
    let installed = crate::cmd::output("cargo", &["fuzz", "--version"])
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(CARGO_FUZZ_VERSION));
    if !installed {
        eprintln!("setup: installing cargo-fuzz {CARGO_FUZZ_VERSION}");
        crate::cmd::run("cargo", &["install", "cargo-fuzz", "--version", CARGO_FUZZ_VERSION, "--locked"])?;
    }
    Ok(())
}

pub fn run(workspace: &Path, seconds: u32) -> Result<()> {
    ensure_cargo_fuzz()?;
    for target in TARGETS {
        eprintln!("fuzz: {target} for {seconds} s");
        let corpus = workspace.join("target/fuzz-corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        let status = Command::new("cargo")
            .args(["+nightly", "fuzz", "run", target])
            .arg(&corpus)
            .args(["--", &format!("-max_total_time={seconds}"), "-rss_limit_mb=2048"])
            .current_dir(workspace.join("fuzz"))
            // The fuzz targets need wgtrace's parsers, not its eBPF object.
            .env("AYA_BUILD_SKIP", "1")
            .status()
            .with_context(|| format!("running cargo fuzz {target}"))?;
        anyhow::ensure!(status.success(), "fuzz target {target} found a crash (see fuzz/artifacts/{target})");
    }
    eprintln!("fuzz: {} targets ran {seconds} s each without a crash", TARGETS.len());
    Ok(())
}
