//! The nesting lab: the problem from DEVELOPERS.md, built for real in network
//! namespaces with wg-quick and wireguard-go.
//!
//! ```text
//!   wgtlab-client                wgtlab-router                    wgtlab-server
//!   wg0 full tunnel ─┐           wg1/wg2/wg3 servers              wg0 server, NAT
//!   wg1 203.0.113/24 ├─ c0 ═══ rc [delay line dly] rs ═══ s0 ──┘
//!   (wg2, wg3)       ┘ 192.0.2.2   192.0.2.1   198.51.100.1   198.51.100.2
//!                              lo 192.0.2.200 (wg1/wg2/wg3 endpoints)
//! ```
//!
//! wg0 (client) has AllowedIPs 0.0.0.0/0 and ::/0, so wg-quick gives it fwmark
//! 51820, table 51820 and the `not fwmark` / `suppress_prefixlength 0` rules.
//! wg1 routes only 203.0.113.0/24 and has no fwmark, so its transport to the
//! router (192.0.2.200:51821) is captured by wg0, decrypted on the server and
//! forwarded back to the router: wg1 rides inside wg0. The router delays
//! traffic between client and server by `delay_ms` each way, so the nested
//! path costs about 2 x delay_ms and the direct one almost nothing.
//!
//! Optional extra tunnels (`--extras`): wg2, whose endpoint is inside wg1's
//! AllowedIPs (deliberately nested in wg1, hence wg2 → wg1 → wg0), and wg3,
//! whose transport is IPv6.
//!
//! Only documentation and benchmark ranges are used, all inside the lab's own
//! namespaces; nothing is configured in the root namespace.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use crate::cmd::{output, run, shell};

pub const CLIENT: &str = "wgtlab-client";
pub const ROUTER: &str = "wgtlab-router";
pub const SERVER: &str = "wgtlab-server";
pub const NAMESPACES: [&str; 3] = [CLIENT, ROUTER, SERVER];
pub const STATE_DIR: &str = "/run/wgtrace-lab";
/// The mark wg-quick gives the full tunnel, and the fix for wg1.
pub const FULL_TUNNEL_MARK: u32 = 51820;
/// An address reached over wg1 (its server, in the router namespace).
pub const WG1_REMOTE: &str = "203.0.113.1";
/// An address reached over wg0 (its server's tunnel address).
pub const WG0_REMOTE: &str = "198.18.0.1";
pub const WG2_REMOTE: &str = "198.18.2.1";
pub const WG3_REMOTE: &str = "198.18.3.1";
/// The router's "public" address for the wg1/wg2/wg3 servers. It is off the
/// client's connected subnet, so (as on a real host) only a default route
/// reaches it, and wg-quick's `suppress_prefixlength 0` hands it to wg0.
pub const ROUTER_PUBLIC_V4: &str = "192.0.2.200";
pub const WG1_ENDPOINT: &str = "192.0.2.200:51821";
pub const DELAY_DEVICE: &str = "dly";

#[derive(Clone, Debug)]
pub struct LabOptions {
    /// One-way delay on the client ↔ wg0-server path; 0 leaves the delay line out.
    pub delay_ms: u64,
    pub extras: bool,
    /// wg0's FwMark/Table (wg-quick default 51820 when None).
    pub wg0_mark: Option<u32>,
    /// Whether wg0, the full tunnel, is built at all.
    pub full_tunnel: bool,
    /// Kernel WireGuard (wireguard.ko) instead of wireguard-go. The default
    /// comes from WGTRACE_LAB_WIREGUARD=kernel, which `cargo xtask vm-test`
    /// sets inside its VM so the same tests run against both.
    pub kernel: bool,
    /// The wireguard-go binary to run (None: the one on PATH, bookworm's
    /// 0.0.20220316 without offloads). The default comes from
    /// WGTRACE_LAB_WIREGUARD_GO, so the same tests run on both generations;
    /// `trixie` names the one `cargo xtask setup` unpacks.
    pub wireguard_go: Option<PathBuf>,
    /// Bring wg1 up already fixed (FwMark = wg0's mark in its config), so it
    /// never rides inside wg0.
    pub wg1_fixed: bool,
}

/// The wireguard-go that `WGTRACE_LAB_WIREGUARD_GO` names: a path, or
/// `trixie` for the one `cargo xtask setup` fetches.
pub fn wireguard_go_from_env() -> Option<PathBuf> {
    let value = std::env::var_os("WGTRACE_LAB_WIREGUARD_GO").filter(|v| !v.is_empty())?;
    Some(if value == "trixie" { crate::setup::trixie_wireguard_go() } else { PathBuf::from(value) })
}

impl Default for LabOptions {
    fn default() -> Self {
        Self {
            delay_ms: 20,
            extras: false,
            wg0_mark: None,
            full_tunnel: true,
            kernel: std::env::var("WGTRACE_LAB_WIREGUARD").is_ok_and(|v| v == "kernel"),
            wireguard_go: wireguard_go_from_env(),
            wg1_fixed: false,
        }
    }
}

/// What `up` started, so `down` can stop exactly that.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct LabState {
    /// "netns/interface" -> wireguard-go PID.
    pub daemons: BTreeMap<String, u32>,
    pub delay_line_pid: Option<u32>,
    pub created_run_wireguard: bool,
    pub delay_ms: u64,
    pub extras: bool,
    pub wg0_mark: u32,
    /// Public keys by "netns/interface".
    pub public_keys: BTreeMap<String, String>,
    /// Kernel WireGuard rather than wireguard-go daemons.
    #[serde(default)]
    pub kernel: bool,
    /// The wireguard-go binary, when not the one on PATH.
    #[serde(default)]
    pub wireguard_go: Option<PathBuf>,
}

fn state_path() -> PathBuf {
    Path::new(STATE_DIR).join("state.json")
}

pub fn load_state() -> Result<LabState> {
    let text = fs::read_to_string(state_path()).context("the lab is not up (run `cargo xtask lab up`)")?;
    Ok(serde_json::from_str(&text)?)
}

pub(crate) fn save_state(state: &LabState) -> Result<()> {
    fs::write(state_path(), serde_json::to_string_pretty(state)?)?;
    Ok(())
}

pub mod relay;
pub mod shapes;

pub(crate) fn ns(namespace: &str, script: &str) -> Result<String> {
    run("ip", &["netns", "exec", namespace, "sh", "-ec", script]).with_context(|| format!("in namespace {namespace}"))
}

/// One tunnel: a wg-quick interface in the client and its peer in a server namespace.
pub(crate) struct TunnelSpec {
    pub(crate) name: &'static str,
    pub(crate) client_address: &'static str,
    pub(crate) client_allowed: &'static str,
    pub(crate) client_port: u16,
    pub(crate) server_namespace: &'static str,
    pub(crate) server_address: &'static str,
    pub(crate) server_allowed: &'static str,
    pub(crate) server_port: u16,
    pub(crate) endpoint: &'static str,
    pub(crate) server_post_up: &'static str,
}

const WG0: TunnelSpec = TunnelSpec {
    name: "wg0",
    client_address: "198.18.0.2/32, 2001:db8:100::2/128",
    client_allowed: "0.0.0.0/0, ::/0",
    client_port: 51820,
    server_namespace: SERVER,
    server_address: "198.18.0.1/24, 2001:db8:100::1/64",
    server_allowed: "198.18.0.2/32, 2001:db8:100::2/128",
    server_port: 51820,
    endpoint: "198.51.100.2:51820",
    server_post_up: "nft add table inet wgtlab; nft add chain inet wgtlab post '{ type nat hook postrouting priority 100; }'; nft add rule inet wgtlab post oifname s0 masquerade",
};

const WG1: TunnelSpec = TunnelSpec {
    name: "wg1",
    client_address: "203.0.113.2/32",
    client_allowed: "203.0.113.0/24",
    client_port: 51821,
    server_namespace: ROUTER,
    server_address: "203.0.113.1/24",
    server_allowed: "203.0.113.2/32",
    server_port: 51821,
    endpoint: WG1_ENDPOINT,
    server_post_up: "",
};

const WG2: TunnelSpec = TunnelSpec {
    name: "wg2",
    client_address: "198.18.2.2/32",
    client_allowed: "198.18.2.0/24",
    client_port: 51822,
    server_namespace: ROUTER,
    server_address: "198.18.2.1/24",
    server_allowed: "198.18.2.2/32",
    server_port: 51822,
    endpoint: "203.0.113.1:51822",
    server_post_up: "",
};

const WG3: TunnelSpec = TunnelSpec {
    name: "wg3",
    client_address: "198.18.3.2/32",
    client_allowed: "198.18.3.0/24",
    client_port: 51823,
    server_namespace: ROUTER,
    server_address: "198.18.3.1/24",
    server_allowed: "198.18.3.2/32",
    server_port: 51823,
    endpoint: "[2001:db8:e::1]:51823",
    server_post_up: "",
};

fn genkey() -> Result<(String, String)> {
    let private = run("wg", &["genkey"])?.trim().to_owned();
    let public = shell(&format!("echo '{private}' | wg pubkey"))?.trim().to_owned();
    Ok((private, public))
}

/// The per-namespace directory bind-mounted over /run/wireguard for that
/// namespace's daemons (wireguard-go keeps its UAPI sockets there, and every
/// network namespace shares the root mount namespace's /run otherwise).
fn uapi_dir(namespace: &str) -> PathBuf {
    Path::new(STATE_DIR).join(namespace).join("wireguard")
}

fn wg_quick_up(namespace: &str, config: &Path, state: &LabState) -> Result<()> {
    if state.kernel {
        ns(namespace, &format!("wg-quick up {} 2>&1", config.display()))
            .with_context(|| format!("wg-quick up {} (kernel WireGuard)", config.display()))?;
        return Ok(());
    }
    let dir = uapi_dir(namespace);
    fs::create_dir_all(&dir)?;
    ns(
        namespace,
        &format!(
            // The namespace's configs also appear as the daemon's
            // /etc/wireguard, where wgtrace looks for peer names.
            "mount --bind {dir} /run/wireguard; mount --bind {configs} /etc/wireguard; \
             WG_QUICK_USERSPACE_IMPLEMENTATION={implementation} \
             WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1 wg-quick up {config} 2>&1",
            dir = dir.display(),
            configs = config.parent().unwrap_or(Path::new("/")).display(),
            implementation = state.wireguard_go.as_deref().unwrap_or(Path::new("wireguard-go")).display(),
            config = config.display()
        ),
    )
    .with_context(|| format!("wg-quick up {}", config.display()))?;
    Ok(())
}

fn write_config(namespace: &str, name: &str, text: &str) -> Result<PathBuf> {
    let dir = Path::new(STATE_DIR).join(namespace);
    fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{name}.conf"));
    fs::write(&path, text)?;
    // It holds a private key.
    fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    Ok(path)
}

pub(crate) fn bring_up_tunnel(spec: &TunnelSpec, options: &LabOptions, state: &mut LabState) -> Result<()> {
    let (client_private, client_public) = genkey()?;
    let (server_private, server_public) = genkey()?;
    let server_post_up =
        if spec.server_post_up.is_empty() { String::new() } else { format!("PostUp = {}\n", spec.server_post_up) };
    let server = format!(
        "[Interface]\nPrivateKey = {server_private}\nListenPort = {}\nAddress = {}\n{server_post_up}\n\
         [Peer]\nPublicKey = {client_public}\nAllowedIPs = {}\n",
        spec.server_port, spec.server_address, spec.server_allowed
    );
    let mut client_extra = String::new();
    if spec.name == "wg0"
        && let Some(mark) = options.wg0_mark
    {
        // wg-quick adds its bypass rules only for `Table = auto`; with an
        // explicit table the rules are the user's, as here.
        client_extra = format!(
            "FwMark = {mark}\nTable = {mark}\n\
             PostUp = ip -4 rule add not fwmark {mark} table {mark}; ip -4 rule add table main suppress_prefixlength 0; \
             ip -6 rule add not fwmark {mark} table {mark}; ip -6 rule add table main suppress_prefixlength 0\n"
        );
    }
    if spec.name == "wg1" && options.wg1_fixed {
        client_extra = format!("FwMark = {}\n", options.wg0_mark.unwrap_or(FULL_TUNNEL_MARK));
    }
    let client = format!(
        "[Interface]\nPrivateKey = {client_private}\nListenPort = {}\nAddress = {}\n{client_extra}\n\
         [Peer]\n# friendly_name = {}-server\nPublicKey = {server_public}\nEndpoint = {}\nAllowedIPs = {}\n",
        spec.client_port, spec.client_address, spec.name, spec.endpoint, spec.client_allowed
    );
    let server_config = write_config(spec.server_namespace, spec.name, &server)?;
    wg_quick_up(spec.server_namespace, &server_config, state)?;
    let client_config = write_config(CLIENT, spec.name, &client)?;
    wg_quick_up(CLIENT, &client_config, state)?;
    state.public_keys.insert(format!("{CLIENT}/{}", spec.name), client_public);
    state.public_keys.insert(format!("{}/{}", spec.server_namespace, spec.name), server_public);
    Ok(())
}

/// wireguard-go daemonizes; find each one among the namespace's processes.
pub(crate) fn find_daemons(state: &mut LabState) -> Result<()> {
    for namespace in NAMESPACES {
        for pid in run("ip", &["netns", "pids", namespace])?.split_whitespace() {
            let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else { continue };
            let args: Vec<String> =
                cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
            if args.first().is_some_and(|a| a.ends_with("wireguard-go"))
                && let Some(interface) = args.iter().skip(1).find(|a| !a.starts_with('-'))
            {
                state.daemons.insert(format!("{namespace}/{interface}"), pid.parse()?);
            }
        }
    }
    Ok(())
}

pub fn up(options: &LabOptions) -> Result<()> {
    crate::setup::ensure_lab_tools()?;
    if is_up() || Path::new(STATE_DIR).exists() {
        eprintln!("lab: cleaning up an earlier lab first");
        down()?;
    }
    fs::create_dir_all(STATE_DIR)?;
    let mut state = LabState {
        delay_ms: options.delay_ms,
        extras: options.extras,
        wg0_mark: options.wg0_mark.unwrap_or(FULL_TUNNEL_MARK),
        kernel: options.kernel,
        wireguard_go: options.wireguard_go.clone(),
        ..LabState::default()
    };
    if let Some(binary) = &state.wireguard_go {
        anyhow::ensure!(!state.kernel, "--wireguard-go and kernel WireGuard exclude each other");
        let version = crate::cmd::output(binary.to_str().context("non-UTF-8 wireguard-go path")?, &["--version"])
            .with_context(|| format!("{} does not run (for trixie's, run `cargo xtask setup`)", binary.display()))?;
        anyhow::ensure!(version.status.success(), "{} --version failed", binary.display());
    }
    if !Path::new("/run/wireguard").exists() {
        fs::create_dir_all("/run/wireguard")?;
        state.created_run_wireguard = true;
    }
    save_state(&state)?;
    let result = build(options, &mut state);
    save_state(&state)?;
    if let Err(err) = result {
        let _ = down();
        return Err(err.context("bringing the lab up failed; everything it made was removed"));
    }
    Ok(())
}

fn build(options: &LabOptions, state: &mut LabState) -> Result<()> {
    for namespace in NAMESPACES {
        run("ip", &["netns", "add", namespace])?;
        run("ip", &["-n", namespace, "link", "set", "lo", "up"])?;
    }
    run("ip", &["-n", CLIENT, "link", "add", "c0", "type", "veth", "peer", "name", "rc", "netns", ROUTER])?;
    run("ip", &["-n", SERVER, "link", "add", "s0", "type", "veth", "peer", "name", "rs", "netns", ROUTER])?;
    ns(
        CLIENT,
        "ip addr add 192.0.2.2/25 dev c0; ip addr add 2001:db8:c::2/64 dev c0 nodad; ip link set c0 up; \
         ip route add default via 192.0.2.1; ip -6 route add default via 2001:db8:c::1",
    )?;
    ns(
        ROUTER,
        "sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 net.ipv4.conf.all.rp_filter=0 \
         net.ipv4.conf.default.rp_filter=0; \
         ip addr add 192.0.2.1/25 dev rc; \
         ip addr add 192.0.2.200/32 dev lo; ip addr add 2001:db8:e::1/128 dev lo nodad; ip addr add 2001:db8:c::1/64 dev rc nodad; ip link set rc up; \
         ip addr add 198.51.100.1/24 dev rs; ip addr add 2001:db8:5::1/64 dev rs nodad; ip link set rs up",
    )?;
    // The router's own packets leave from its service address (the wg1/wg2/wg3
    // endpoints on lo), as a real host with a loopback service address is set
    // up. Without it, a server reply's source is whatever the kernel picks for
    // the outgoing interface unless the daemon pins the address the request
    // came to. Bookworm's wireguard-go pins it (IP_PKTINFO); trixie's
    // (0.0.20231211, still so upstream in 0.0.20250522) loses it whenever UDP
    // GRO is on: splitCoalescedMessages in conn/bind_std.go moves each
    // datagram without its control message, so the reply goes out with no
    // IP_PKTINFO and from 198.51.100.1. The wg0 server's masquerade then
    // cannot match that reply to wg1's NATed initiation (UdpNoPorts there),
    // so a nested wg1 never completes a handshake.
    ns(
        ROUTER,
        "ip route replace 192.0.2.0/25 dev rc proto kernel scope link src 192.0.2.200; \
         ip route replace 198.51.100.0/24 dev rs proto kernel scope link src 192.0.2.200; \
         ip -6 route replace 2001:db8:c::/64 dev rc proto kernel metric 256 src 2001:db8:e::1; \
         ip -6 route replace 2001:db8:5::/64 dev rs proto kernel metric 256 src 2001:db8:e::1",
    )
    .context("giving the router's connected routes its service address as their source")?;
    ns(
        SERVER,
        "sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1; \
         ip addr add 198.51.100.2/24 dev s0; ip addr add 2001:db8:5::2/64 dev s0 nodad; ip link set s0 up; \
         ip route add default via 198.51.100.1; ip -6 route add default via 2001:db8:5::1",
    )?;
    if options.delay_ms > 0 {
        start_delay_line(options.delay_ms, state)?;
    }
    if options.full_tunnel {
        bring_up_tunnel(&WG0, options, state)?;
    }
    bring_up_tunnel(&WG1, options, state)?;
    if options.extras {
        bring_up_tunnel(&WG2, options, state)?;
        bring_up_tunnel(&WG3, options, state)?;
    }
    find_daemons(state)?;
    if options.full_tunnel {
        wait_for_ping(WG0_REMOTE, Duration::from_secs(10)).context("wg0 did not come up")?;
    }
    wait_for_ping(WG1_REMOTE, Duration::from_secs(10)).context("wg1 did not come up")?;
    if options.extras {
        wait_for_ping(WG2_REMOTE, Duration::from_secs(10)).context("wg2 did not come up")?;
        wait_for_ping(WG3_REMOTE, Duration::from_secs(10)).context("wg3 did not come up")?;
    }
    Ok(())
}

/// Routes client ↔ wg0-server traffic in the router through the delay line.
/// Packets the delay line writes back arrive with iif `dly`, so the rules
/// (which select by the input interface) do not loop them.
fn start_delay_line(delay_ms: u64, state: &mut LabState) -> Result<()> {
    let exe = helper_binary()?;
    let log = fs::File::create(Path::new(STATE_DIR).join("delay-line.log"))?;
    let mut command = std::process::Command::new(exe);
    command
        .args(["delay-line", "--netns", &format!("/run/netns/{ROUTER}"), "--device", DELAY_DEVICE])
        .args(["--delay-ms", &delay_ms.to_string()])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setsid in the child before exec detaches it from our session,
    // so it outlives `cargo xtask lab up`.
    unsafe {
        use std::os::unix::process::CommandExt as _;
        command.pre_exec(|| {
            libc::setsid();
            // A daemon must not keep its starter's descriptors open: an
            // inherited lock (e.g. from flock(1)) would be held forever.
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        });
    }
    let child = command.spawn().context("starting the delay line")?;
    state.delay_line_pid = Some(child.id());
    save_state(state)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while output("ip", &["-n", ROUTER, "link", "show", DELAY_DEVICE])?.status.code() != Some(0) {
        if Instant::now() > deadline {
            bail!("the delay line did not create {DELAY_DEVICE}; see {STATE_DIR}/delay-line.log");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    ns(
        ROUTER,
        &format!(
            "ip link set {d} up; sysctl -qw net.ipv4.conf.{d}.rp_filter=0; \
             ip route add default dev {d} table 100; ip -6 route add default dev {d} table 100; \
             ip rule add iif rc to 198.51.100.2 lookup 100 pref 100; \
             ip rule add iif rs from 198.51.100.2 to 192.0.2.2 lookup 100 pref 101; \
             ip -6 rule add iif rc to 2001:db8:5::2 lookup 100 pref 100; \
             ip -6 rule add iif rs from 2001:db8:5::2 to 2001:db8:c::2 lookup 100 pref 101",
            d = DELAY_DEVICE
        ),
    )?;
    Ok(())
}

/// The xtask binary, which runs the delay line. Code that uses the lab from
/// another binary (the integration tests) names it in WGTRACE_LAB_HELPER,
/// as `cargo xtask test` does.
pub(crate) fn helper_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("WGTRACE_LAB_HELPER") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe()?;
    anyhow::ensure!(
        exe.file_stem().is_some_and(|s| s == "xtask"),
        "set WGTRACE_LAB_HELPER to the xtask binary (cargo xtask test does) so the lab can start its delay line"
    );
    Ok(exe)
}

pub fn wait_for_ping(address: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if output("ip", &["netns", "exec", CLIENT, "ping", "-c1", "-W1", address])?.status.success() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("no ping reply from {address} within {timeout:?}");
        }
    }
}

/// Median RTT in ms of `count` pings from the client.
pub fn ping_ms(address: &str, count: u32) -> Result<f64> {
    let text =
        run("ip", &["netns", "exec", CLIENT, "ping", "-c", &count.to_string(), "-i", "0.2", "-W", "2", address])?;
    let mut rtts: Vec<f64> =
        text.lines().filter_map(|l| l.split("time=").nth(1)?.split_whitespace().next()?.parse().ok()).collect();
    anyhow::ensure!(!rtts.is_empty(), "no ping replies from {address}:\n{text}");
    rtts.sort_by(f64::total_cmp);
    Ok(rtts[rtts.len() / 2])
}

/// Runs `wg ARGS` against the client's wgN daemon: in its mount namespace,
/// where its UAPI socket is.
pub fn client_wg(interface: &str, args: &[&str]) -> Result<String> {
    let state = load_state()?;
    if state.kernel {
        let mut full = vec!["netns", "exec", CLIENT, "wg"];
        full.extend_from_slice(args);
        return run("ip", &full);
    }
    let pid = state
        .daemons
        .get(&format!("{CLIENT}/{interface}"))
        .with_context(|| format!("no daemon recorded for {interface}"))?;
    let pid = pid.to_string();
    let mut full = vec!["--target", pid.as_str(), "--mount", "--net", "wg"];
    full.extend_from_slice(args);
    run("nsenter", &full)
}

/// Sets wg1's mark and re-sets its peer's endpoint. wireguard-go pins the
/// source address (and interface) of the last packet it received, so a reply
/// still in flight on the old path would pin it there again: wait for those
/// to drain (one delayed round trip) before re-setting, and check the path
/// really moved when the delay line makes that visible.
fn set_wg1_mark(mark: u32) -> Result<()> {
    let state = load_state()?;
    let peer = state.public_keys.get(&format!("{ROUTER}/wg1")).context("wg1 server key missing from lab state")?;
    client_wg("wg1", &["set", "wg1", "fwmark", &mark.to_string()])?;
    let drain = Duration::from_millis(2 * state.delay_ms + 100);
    let nested_expected = mark != state.wg0_mark;
    for _ in 0..3 {
        std::thread::sleep(drain);
        client_wg("wg1", &["set", "wg1", "peer", peer, "endpoint", WG1_ENDPOINT])?;
        wait_for_ping(WG1_REMOTE, Duration::from_secs(10))?;
        if state.delay_ms == 0 {
            return Ok(());
        }
        let rtt = ping_ms(WG1_REMOTE, 3)?;
        if (rtt > state.delay_ms as f64) == nested_expected {
            return Ok(());
        }
    }
    bail!("wg1's path did not follow its new mark {mark} after three endpoint resets")
}

/// Brings up one of the extra tunnels (`wg2`, `wg3`) on a running lab, as a
/// user would while wgtrace traces.
pub fn add_tunnel(interface: &str) -> Result<()> {
    let spec = [&WG2, &WG3]
        .into_iter()
        .find(|s| s.name == interface)
        .with_context(|| format!("no extra tunnel {interface}"))?;
    let mut state = load_state()?;
    let options = LabOptions { delay_ms: state.delay_ms, ..LabOptions::default() };
    bring_up_tunnel(spec, &options, &mut state)?;
    find_daemons(&mut state)?;
    save_state(&state)?;
    let remote = if interface == "wg2" { WG2_REMOTE } else { WG3_REMOTE };
    wait_for_ping(remote, Duration::from_secs(10))
}

/// Stops the client's daemon for `interface` and starts it again from the
/// same config (a userspace WireGuard restart: new PID, new TUN device). With
/// kernel WireGuard the interface is taken down and up again.
pub fn restart_client_daemon(interface: &str) -> Result<()> {
    let mut state = load_state()?;
    let config = Path::new(STATE_DIR).join(CLIENT).join(format!("{interface}.conf"));
    if state.kernel {
        ns(CLIENT, &format!("wg-quick down {c} 2>&1; wg-quick up {c} 2>&1", c = config.display()))?;
        return Ok(());
    }
    let key = format!("{CLIENT}/{interface}");
    let pid = *state.daemons.get(&key).with_context(|| format!("no daemon recorded for {interface}"))?;
    stop(pid);
    state.daemons.remove(&key);
    // wg-quick's own teardown ran with the daemon gone: remove what it left.
    let _ = run("ip", &["-n", CLIENT, "link", "del", interface]);
    wg_quick_up(CLIENT, &config, &state)?;
    find_daemons(&mut state)?;
    save_state(&state)?;
    Ok(())
}

/// Forces a fresh handshake on the client's `interface`: the peer is removed
/// and added back, so the next packet starts a handshake.
pub fn rekey(interface: &str) -> Result<()> {
    let state = load_state()?;
    let spec = [&WG0, &WG1, &WG2, &WG3]
        .into_iter()
        .find(|s| s.name == interface)
        .with_context(|| format!("no lab tunnel {interface}"))?;
    let peer = state
        .public_keys
        .get(&format!("{}/{interface}", spec.server_namespace))
        .with_context(|| format!("{interface} is not up in this lab"))?;
    let allowed = spec.client_allowed.replace(' ', "");
    client_wg(interface, &["set", interface, "peer", peer, "remove"])?;
    client_wg(interface, &["set", interface, "peer", peer, "endpoint", spec.endpoint, "allowed-ips", &allowed])?;
    Ok(())
}

pub fn fix() -> Result<()> {
    let state = load_state()?;
    set_wg1_mark(state.wg0_mark)
}

pub fn unfix() -> Result<()> {
    set_wg1_mark(0)
}

/// Exclusive use of the lab: integration tests and benchmarks take this
/// lock, so one never tears down another's lab. (The `lab` commands leave
/// it to their user, who may already hold it, e.g. with flock(1).)
pub fn lock() -> Result<fs::File> {
    use std::os::fd::AsRawFd as _;
    let lock = fs::File::create("/run/wgtrace-lab.lock").context("creating /run/wgtrace-lab.lock")?;
    // SAFETY: flock on a file we own; released when it is closed.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        bail!("locking the lab: {}", std::io::Error::last_os_error());
    }
    Ok(lock)
}

pub fn is_up() -> bool {
    NAMESPACES.iter().any(|n| Path::new("/run/netns").join(n).exists())
}

pub fn status() -> Result<String> {
    if !is_up() {
        return Ok("lab: down\n".into());
    }
    let state = load_state()?;
    let mut out = String::from("lab: up\n");
    if let Some(binary) = &state.wireguard_go {
        out.push_str(&format!("  wireguard-go: {}\n", binary.display()));
    }
    for (name, pid) in &state.daemons {
        let alive = process_alive(*pid);
        out.push_str(&format!("  {name}: wireguard-go pid {pid} {}\n", if alive { "running" } else { "GONE" }));
    }
    if let Some(pid) = state.delay_line_pid {
        out.push_str(&format!("  delay line: pid {pid}, {} ms each way\n", state.delay_ms));
    }
    let mark = client_wg("wg1", &["show", "wg1", "fwmark"]).unwrap_or_default();
    let mark = mark.trim();
    let broken = mark.is_empty() || mark == "off" || mark == "0";
    out.push_str(&format!(
        "  wg1 fwmark: {} ({})\n",
        if mark.is_empty() { "off" } else { mark },
        if broken { "broken: wg1 rides inside wg0" } else { "fixed" }
    ));
    Ok(out)
}

fn process_alive(pid: u32) -> bool {
    // A zombie has exited; PID 1 here reaps slowly.
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn stop(pid: u32) {
    // SAFETY: signalling a PID we recorded; ESRCH when it is gone is fine.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(3);
    while process_alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if process_alive(pid) {
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
}

/// Removes everything the lab made: its daemons (by PID), the delay line,
/// any other process left in its namespaces, the namespaces and the state.
pub fn down() -> Result<()> {
    let state = load_state().unwrap_or_default();
    for pid in state.daemons.values() {
        stop(*pid);
    }
    if let Some(pid) = state.delay_line_pid {
        stop(pid);
    }
    for namespace in NAMESPACES {
        if !Path::new("/run/netns").join(namespace).exists() {
            continue;
        }
        // Processes of a crashed earlier run that the state does not know.
        if let Ok(pids) = run("ip", &["netns", "pids", namespace]) {
            for pid in pids.split_whitespace().filter_map(|p| p.parse().ok()) {
                stop(pid);
            }
        }
        // Another lab user may have removed it meanwhile; only failing to
        // remove one that still exists is an error.
        if let Err(err) = run("ip", &["netns", "del", namespace])
            && Path::new("/run/netns").join(namespace).exists()
        {
            return Err(err);
        }
    }
    if Path::new(STATE_DIR).exists() {
        fs::remove_dir_all(STATE_DIR).with_context(|| format!("removing {STATE_DIR}"))?;
    }
    if state.created_run_wireguard {
        let _ = fs::remove_dir("/run/wireguard");
    }
    Ok(())
}
