//! Lab shapes: the ways a tunnel's transport gets captured, each built for
//! real on top of the nesting lab (`cargo xtask lab shape NAME`), with real
//! packets. The integration tests (tests/tests/shapes.rs) check each with
//! `wgtrace run` and `wgtrace check` and apply the fix wgtrace prints.
//!
//! * `self-loop`: wg0 loses its own mark; its transport enters wg0 itself.
//! * `mutual-loop`: a second wg-quick full tunnel, wg4 (mark = table 51821,
//!   rules above wg0's): each captures the other's transport.
//! * `tun-def1`: no wg0; a non-WireGuard VPN of our own (a TUN ↔ UDP relay
//!   between client and router, see [`super::relay`]) with OpenVPN's
//!   `def1` routes captures wg1's transport.
//! * `manager-mark`: wg1 stands for Tailscale (mark 0x80000, rules
//!   5210-5270 for 0x80000/0xff0000, table 52) and wg0's wg-quick rules
//!   landed above them, as when wg-quick starts second: each new rule gets
//!   the priority below the first, so `not fwmark` at 5209 and
//!   `suppress_prefixlength 0` at 5208.
//! * `mtu`: the seed's wg1 inside wg0, both MTU 1420 (as when wg1 comes up
//!   first).
//! * `bridge`: the client's underlay is a bridge br0 over c0; wg1 fixed.

use std::{path::Path, process::Stdio, time::Duration};

use anyhow::{Context as _, Result, bail};

use super::{
    CLIENT, LabOptions, ROUTER, STATE_DIR, TunnelSpec, WG0_REMOTE, WG1_ENDPOINT, WG1_REMOTE, bring_up_tunnel,
    client_wg, find_daemons, load_state, ns, save_state, wait_for_ping,
};
use crate::cmd::run;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Shape {
    SelfLoop,
    MutualLoop,
    TunDef1,
    ManagerMark,
    Mtu,
    Bridge,
}

/// The second full tunnel of `mutual-loop`.
const WG4: TunnelSpec = TunnelSpec {
    name: "wg4",
    client_address: "198.18.4.2/32",
    client_allowed: "0.0.0.0/0",
    client_port: 51824,
    server_namespace: ROUTER,
    server_address: "198.18.4.1/24",
    server_allowed: "198.18.4.2/32",
    server_port: 51824,
    endpoint: "192.0.2.200:51824",
    server_post_up: "",
};
pub const WG4_ENDPOINT: &str = "192.0.2.200:51824";
pub const WG0_ENDPOINT: &str = "198.51.100.2:51820";
/// The relay's TUN device in the client, and its holder's name.
pub const VPN_DEVICE: &str = "tun0";

impl Shape {
    pub fn name(self) -> &'static str {
        match self {
            Self::SelfLoop => "self-loop",
            Self::MutualLoop => "mutual-loop",
            Self::TunDef1 => "tun-def1",
            Self::ManagerMark => "manager-mark",
            Self::Mtu => "mtu",
            Self::Bridge => "bridge",
        }
    }

    /// The lab this shape is built on.
    pub fn options(self) -> LabOptions {
        LabOptions {
            // No delay line: verdicts, not latency, are under test.
            delay_ms: 0,
            full_tunnel: self != Self::TunDef1,
            wg1_fixed: self == Self::Bridge,
            ..LabOptions::default()
        }
    }

    /// Builds the shape on a lab brought up with [`Shape::options`].
    pub fn apply(self) -> Result<()> {
        match self {
            Self::SelfLoop => {
                client_wg("wg0", &["set", "wg0", "fwmark", "0"])?;
                reset_endpoint("wg0")
            }
            Self::MutualLoop => {
                let mut state = load_state()?;
                bring_up_tunnel(&WG4, &LabOptions { delay_ms: 0, ..LabOptions::default() }, &mut state)?;
                find_daemons(&mut state)?;
                save_state(&state)?;
                // wireguard-go pinned wg0's source (and device) while its
                // transport still left directly; set anew, it follows routing.
                reset_endpoint("wg0")
            }
            Self::TunDef1 => tun_def1(),
            Self::ManagerMark => {
                client_wg("wg1", &["set", "wg1", "fwmark", "0x80000"])?;
                ns(
                    CLIENT,
                    "ip rule add fwmark 0x80000/0xff0000 lookup main pref 5210; \
                     ip rule add fwmark 0x80000/0xff0000 lookup default pref 5230; \
                     ip rule add fwmark 0x80000/0xff0000 unreachable pref 5250; \
                     ip rule add lookup 52 pref 5270; \
                     ip rule del not fwmark 51820 table 51820; ip rule del table main suppress_prefixlength 0; \
                     ip rule add not fwmark 51820 table 51820 pref 5209; \
                     ip rule add table main suppress_prefixlength 0 pref 5208",
                )?;
                reset_endpoint("wg1")
            }
            // wg-quick picks 1420 for a tunnel brought up before the full
            // tunnel (its endpoint then routes via the 1500-byte underlay).
            Self::Mtu => ns(CLIENT, "ip link set wg1 mtu 1420").map(drop),
            Self::Bridge => {
                ns(
                    CLIENT,
                    "ip link add br0 type bridge; ip link set br0 up; ip addr flush dev c0 scope global; \
                     ip link set c0 master br0; ip addr add 192.0.2.2/25 dev br0; \
                     ip route add default via 192.0.2.1 dev br0",
                )?;
                reset_endpoint("wg0")?;
                reset_endpoint("wg1")
            }
        }
    }

    /// The address whose pings make this shape's transport flow.
    pub fn traffic_to(self) -> &'static str {
        match self {
            Self::SelfLoop | Self::MutualLoop => WG0_REMOTE,
            _ => WG1_REMOTE,
        }
    }
}

/// `lab up` for a shape, then the shape.
pub fn up(shape: Shape) -> Result<()> {
    super::up(&shape.options())?;
    if let Err(err) = shape.apply() {
        let _ = super::down();
        return Err(err.context(format!("building shape {} failed; the lab was removed", shape.name())));
    }
    Ok(())
}

/// Sets the client's `interface` peer endpoint again, so wireguard-go
/// forgets the source address it pinned and the next packet takes the
/// current route.
pub fn reset_endpoint(interface: &str) -> Result<()> {
    let state = load_state()?;
    let (server_namespace, endpoint) = match interface {
        "wg0" => (super::SERVER, WG0_ENDPOINT),
        "wg1" => (ROUTER, WG1_ENDPOINT),
        "wg4" => (ROUTER, WG4_ENDPOINT),
        other => bail!("no endpoint known for {other}"),
    };
    let peer = state
        .public_keys
        .get(&format!("{server_namespace}/{interface}"))
        .with_context(|| format!("{interface} is not up in this lab"))?;
    client_wg(interface, &["set", interface, "peer", peer, "endpoint", endpoint])?;
    Ok(())
}

/// Applies fix commands as wgtrace prints them (`fix_details.commands`) in
/// the client: `wg ...` through the daemon's mount namespace, `ip ...` in
/// the client's network namespace. Anything else is refused.
pub fn apply_commands(commands: &[String]) -> Result<()> {
    for command in commands {
        let words: Vec<&str> = command.split_whitespace().collect();
        match words.as_slice() {
            ["wg", "set", interface, ..] => {
                client_wg(interface, &words[1..]).with_context(|| format!("applying `{command}`"))?;
            }
            ["ip", rest @ ..] => {
                let mut args = vec!["-n", CLIENT];
                args.extend_from_slice(rest);
                run("ip", &args).with_context(|| format!("applying `{command}`"))?;
            }
            _ => bail!("not a command the lab applies: `{command}`"),
        }
    }
    Ok(())
}

/// The relay pair and the `def1` routes.
fn tun_def1() -> Result<()> {
    let exe = super::helper_binary()?;
    let start = |namespace: &str, device: &str, bind: &str, peer: Option<&str>| -> Result<u32> {
        let log = std::fs::File::create(Path::new(STATE_DIR).join(format!("relay-{device}.log")))?;
        let mut command = std::process::Command::new(&exe);
        command
            .args(["tun-relay", "--netns", &format!("/run/netns/{namespace}"), "--device", device, "--bind", bind])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if let Some(peer) = peer {
            command.args(["--peer", peer]);
        }
        // SAFETY: setsid and close_range in the child before exec, as for the
        // delay line: the relay outlives `lab shape` and holds nothing of ours.
        unsafe {
            use std::os::unix::process::CommandExt as _;
            command.pre_exec(|| {
                libc::setsid();
                libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
                Ok(())
            });
        }
        let child = command.spawn().context("starting the relay")?;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while crate::cmd::output("ip", &["-n", namespace, "link", "show", device])?.status.code() != Some(0) {
            anyhow::ensure!(std::time::Instant::now() < deadline, "the relay did not create {device} in {namespace}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(child.id())
    };
    // The lab's `down` stops every process left in its namespaces, relays too.
    start(ROUTER, "tunr", "192.0.2.1:1194", None)?;
    start(CLIENT, VPN_DEVICE, "192.0.2.2:1194", Some("192.0.2.1:1194"))?;
    ns(ROUTER, "ip addr add 10.8.0.1/24 dev tunr; ip link set tunr up; sysctl -qw net.ipv4.conf.tunr.rp_filter=0")?;
    ns(
        CLIENT,
        "sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.c0.rp_filter=0; \
         ip addr add 10.8.0.2/24 dev tun0; ip link set tun0 up; sysctl -qw net.ipv4.conf.tun0.rp_filter=0; \
         ip route add 0.0.0.0/1 dev tun0; ip route add 128.0.0.0/1 dev tun0",
    )?;
    reset_endpoint("wg1")?;
    wait_for_ping(WG1_REMOTE, Duration::from_secs(10)).context("wg1 does not work through the relay")
}
