//! `cargo xtask setup`: installs what building and testing wgtrace needs,
//! and only what is missing, so it is fast when everything is there.

use std::path::Path;

use anyhow::{Context as _, Result, bail};

use crate::cmd::{have, output, run};

/// Debian packages, with the command that shows each is present.
const PACKAGES: &[(&str, &str)] = &[
    ("llvm-22-dev", "/usr/lib/llvm-22/bin/llvm-config"),
    ("libpolly-22-dev", "/usr/lib/llvm-22/lib/libPolly.a"),
    ("wireguard-tools", "/usr/bin/wg-quick"),
    ("wireguard-go", "/usr/bin/wireguard-go"),
    ("iproute2", "/usr/sbin/ip"),
    ("nftables", "/usr/sbin/nft"),
    ("iptables", "/usr/sbin/iptables"),
    ("iputils-ping", "/usr/bin/ping"),
    ("bpftool", "/usr/sbin/bpftool"),
    ("util-linux", "/usr/bin/nsenter"),
    ("iperf3", "/usr/bin/iperf3"),
    // `cargo xtask vm-test`: qemu, modprobe/depmod, and xz for the kernel image.
    ("qemu-system-x86", "/usr/bin/qemu-system-x86_64"),
    ("kmod", "/usr/bin/kmod"),
    ("xz-utils", "/usr/bin/xz"),
    ("bpftrace", "/usr/bin/bpftrace"),
    ("prometheus", "/usr/bin/prometheus"),
];

const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn setup() -> Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().filter(|(_, probe)| !Path::new(probe).exists()).map(|(p, _)| *p).collect();
    if !missing.is_empty() {
        let is_root = unsafe { libc::geteuid() } == 0;
        if !(is_root && have("apt-get")) {
            bail!(
                "missing packages: {}. Install them (Debian/Ubuntu: `sudo apt-get install {}`), or run `cargo xtask setup` as root on Debian/Ubuntu.",
                missing.join(", "),
                missing.join(" ")
            );
        }
        eprintln!("setup: installing {}", missing.join(" "));
        run("apt-get", &["update", "-q"])?;
        let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
        args.extend(&missing);
        let status = std::process::Command::new("apt-get")
            .args(&args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("running apt-get")?;
        anyhow::ensure!(status.success(), "apt-get install {} failed", missing.join(" "));
    }
    ensure_nightly()?;
    ensure_bpf_linker()?;
    ensure_trixie_wireguard_go()?;
    mount_if_missing("tracefs", "/sys/kernel/tracing")?;
    mount_if_missing("bpf", "/sys/fs/bpf")?;
    Ok(())
}

fn ensure_nightly() -> Result<()> {
    let installed = run("rustup", &["+nightly", "component", "list", "--installed"]);
    match installed {
        Ok(list) if list.lines().any(|l| l.starts_with("rust-src")) => Ok(()),
        Ok(_) => {
            eprintln!("setup: adding rust-src to the nightly toolchain");
            run("rustup", &["component", "add", "rust-src", "--toolchain", "nightly"]).map(drop)
        }
        Err(_) => {
            eprintln!("setup: installing the nightly toolchain with rust-src");
            run("rustup", &["toolchain", "install", "nightly", "--profile", "minimal", "--component", "rust-src"])
                .map(drop)
        }
    }
}

fn ensure_bpf_linker() -> Result<()> {
    if let Ok(out) = output("bpf-linker", &["--version"])
        && String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION)
    {
        return Ok(());
    }
    eprintln!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (a few minutes, once)");
    let status = std::process::Command::new("cargo")
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION, "--locked", "--no-default-features"])
        .args(["--features", "llvm-22"])
        // Without it bpf-linker's build finds LLVM 14 and fails to link.
        .env("LLVM_PREFIX", "/usr/lib/llvm-22")
        .status()
        .context("running cargo install bpf-linker")?;
    anyhow::ensure!(status.success(), "installing bpf-linker failed");
    Ok(())
}

/// Where setup unpacks Debian trixie's wireguard-go (0.0.20231211: UDP
/// GSO/GRO and TUN offloads, a static binary): the second userspace
/// generation the lab and the tests run, next to bookworm's
/// /usr/bin/wireguard-go (no offloads).
pub const TRIXIE_WIREGUARD_GO_DIR: &str = "/var/cache/wgtrace/wireguard-go-trixie";

/// The trixie wireguard-go binary `setup` installs.
pub fn trixie_wireguard_go() -> std::path::PathBuf {
    Path::new(TRIXIE_WIREGUARD_GO_DIR).join("root/usr/bin/wireguard-go")
}

/// Fetches trixie's wireguard-go with apt pointed at a private sources list,
/// lists and cache under [`TRIXIE_WIREGUARD_GO_DIR`] (the system's apt
/// sources and lists are never touched), and unpacks it there with
/// `dpkg-deb -x`. Nothing is installed system-wide; done once.
fn ensure_trixie_wireguard_go() -> Result<()> {
    let binary = trixie_wireguard_go();
    if output(binary.to_str().unwrap_or_default(), &["--version"]).is_ok_and(|o| o.status.success()) {
        return Ok(());
    }
    if !(unsafe { libc::geteuid() } == 0 && have("apt-get") && have("dpkg-deb")) {
        eprintln!("setup: trixie's wireguard-go is missing; run `cargo xtask setup` as root on Debian to fetch it");
        return Ok(());
    }
    eprintln!("setup: fetching Debian trixie's wireguard-go into {TRIXIE_WIREGUARD_GO_DIR}");
    let base = Path::new(TRIXIE_WIREGUARD_GO_DIR);
    let apt = base.join("apt");
    for dir in ["lists/partial", "cache/archives/partial", "sources.list.d", "download"] {
        std::fs::create_dir_all(apt.join(dir)).with_context(|| format!("creating {}", apt.join(dir).display()))?;
    }
    let sources = apt.join("sources.list");
    std::fs::write(&sources, "deb http://deb.debian.org/debian trixie main\n")?;
    let options = [
        format!("Dir::Etc::SourceList={}", sources.display()),
        format!("Dir::Etc::SourceParts={}", apt.join("sources.list.d").display()),
        format!("Dir::State::Lists={}", apt.join("lists").display()),
        format!("Dir::Cache={}", apt.join("cache").display()),
        "APT::Get::List-Cleanup=0".to_owned(),
        "Acquire::Languages=none".to_owned(),
    ];
    let apt_get = |args: &[&str]| -> Result<()> {
        let mut command = std::process::Command::new("apt-get");
        for option in &options {
            command.args(["-o", option]);
        }
        let status = command
            .args(args)
            .current_dir(apt.join("download"))
            .status()
            .with_context(|| format!("running apt-get {}", args.join(" ")))?;
        anyhow::ensure!(status.success(), "apt-get {} (trixie, private lists) failed", args.join(" "));
        Ok(())
    };
    apt_get(&["update", "-q"])?;
    apt_get(&["download", "-q", "wireguard-go"])?;
    let package = std::fs::read_dir(apt.join("download"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .max()
        .context("apt-get download left no wireguard-go .deb")?;
    let root = base.join("root");
    run("dpkg-deb", &["-x", package.to_str().context("non-UTF-8 path")?, root.to_str().context("non-UTF-8 path")?])?;
    let version = output(binary.to_str().unwrap_or_default(), &["--version"])
        .with_context(|| format!("running {}", binary.display()))?;
    eprintln!("setup: {}", String::from_utf8_lossy(&version.stdout).lines().next().unwrap_or("wireguard-go unpacked"));
    Ok(())
}

fn mount_if_missing(fstype: &str, target: &str) -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if mounts.lines().any(|l| l.split_whitespace().nth(1) == Some(target)) {
        return Ok(());
    }
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("setup: {target} is not mounted; as root: mount -t {fstype} {fstype} {target}");
        return Ok(());
    }
    run("mount", &["-t", fstype, fstype, target]).map(drop)
}

/// The lab's tools, with a pointer to `setup` when one is missing.
pub fn ensure_lab_tools() -> Result<()> {
    anyhow::ensure!(unsafe { libc::geteuid() } == 0, "the lab needs root (network namespaces, wireguard-go)");
    for tool in ["ip", "wg", "wg-quick", "wireguard-go", "nft", "ping", "nsenter"] {
        anyhow::ensure!(have(tool), "{tool} is missing: run `cargo xtask setup`");
    }
    Ok(())
}
