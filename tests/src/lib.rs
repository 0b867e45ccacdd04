//! Helpers for wgtrace's integration tests: privilege checks that turn into
//! failures in CI, exclusive use of the lab, and running the real binary
//! against real traffic.

use std::{
    fs::File,
    path::PathBuf,
    process::{Child, Command, Stdio},
};

use anyhow::{Context as _, Result};
pub use xtask::lab;

/// Whether the root/eBPF tests can run here. Outside CI they skip with a
/// loud reason; in CI (`CI=true`) a skip is a failure.
pub fn privileged_or_skip(test: &str) -> bool {
    let reason = if unsafe { libc::geteuid() } != 0 {
        Some("not running as root")
    } else if std::env::var_os("WGTRACE_BIN").is_none() {
        Some("WGTRACE_BIN is not set (run the tests with `cargo xtask test`)")
    } else {
        None
    };
    match reason {
        None => true,
        Some(reason) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("{test}: cannot run in CI: {reason}")
        }
        Some(reason) => {
            eprintln!(
                "\n*** SKIPPED {test}: {reason}. These tests need root and eBPF; run `sudo cargo xtask test`. ***\n"
            );
            false
        }
    }
}

/// Holds the lab for one test; tests in other binaries wait their turn.
pub struct LabGuard {
    _lock: File,
}

impl LabGuard {
    pub fn up(options: &lab::LabOptions) -> Result<Self> {
        let lock = lab::lock()?;
        lab::up(options)?;
        Ok(Self { _lock: lock })
    }
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        if let Err(err) = lab::down() {
            eprintln!("lab down failed: {err:#}");
        }
    }
}

pub fn wgtrace_bin() -> PathBuf {
    PathBuf::from(std::env::var_os("WGTRACE_BIN").expect("WGTRACE_BIN"))
}

/// Pings `address` from the lab client in the background until dropped.
pub struct Traffic(Child);

impl Traffic {
    pub fn ping(address: &str) -> Result<Self> {
        Self::ping_sized(address, 56)
    }

    /// Pings with `payload` bytes of ICMP payload (56 is ping's default).
    pub fn ping_sized(address: &str, payload: u32) -> Result<Self> {
        let payload = payload.to_string();
        let child = Command::new("ip")
            .args(["netns", "exec", lab::CLIENT, "ping", "-q", "-i", "0.1", "-s", &payload, address])
            .stdout(Stdio::null())
            .spawn()
            .context("starting ping")?;
        Ok(Self(child))
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `wgtrace run --json` for `seconds` and returns the report.
pub fn trace_json(seconds: f64, extra: &[&str]) -> Result<serde_json::Value> {
    Trace::start(seconds, extra)?.report()
}

/// A `wgtrace run --json --duration N` running in the background, so a test
/// can make things happen while it traces.
pub struct Trace(Option<Child>);

impl Trace {
    pub fn start(seconds: f64, extra: &[&str]) -> Result<Self> {
        let child = Command::new(wgtrace_bin())
            .args(["run", "--json", "--duration", &seconds.to_string()])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("running wgtrace")?;
        Ok(Self(Some(child)))
    }

    pub fn pid(&self) -> u32 {
        self.0.as_ref().expect("running").id()
    }

    /// Waits for the run to end and parses its report.
    pub fn report(mut self) -> Result<serde_json::Value> {
        let output = self.0.take().expect("running").wait_with_output()?;
        anyhow::ensure!(output.status.success(), "wgtrace exited with {}", output.status);
        serde_json::from_slice(&output.stdout).context("wgtrace --json printed something that is not JSON")
    }
}

impl Drop for Trace {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The report's entry for `interface` in the lab client namespace.
pub fn client_tunnel<'a>(report: &'a serde_json::Value, interface: &str) -> &'a serde_json::Value {
    report["tunnels"]
        .as_array()
        .expect("tunnels is an array")
        .iter()
        .find(|t| t["netns"] == lab::CLIENT && t["interface"] == interface)
        .unwrap_or_else(|| panic!("no {interface} in {}: {report:#}", lab::CLIENT))
}

/// The first peer of a client tunnel.
pub fn client_peer<'a>(report: &'a serde_json::Value, interface: &str) -> &'a serde_json::Value {
    &client_tunnel(report, interface)["peers"][0]
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

pub use xtask::http::{HttpResponse, get as http_get};

/// Percent-encodes a URL query value.
pub fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A directory under the system temporary directory, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> Result<Self> {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.subsec_nanos();
        let path = std::env::temp_dir().join(format!("{prefix}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
