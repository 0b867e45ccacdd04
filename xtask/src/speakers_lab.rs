//! A Tailscale-style WireGuard pair on top of the nesting lab: a userspace
//! WireGuard daemon named `tailscaled` holding `tailscale0` in the client,
//! its peer in the router, both without a reachable UAPI socket (moved
//! away after configuration, as tailscaled serves none), the client's
//! socket marked `0x80000` under Tailscale's rules (5210-5270, fwmark
//! `0x80000/0xff0000`), and wg-quick's full-tunnel rules landed above them
//! (pref 5100/5101), so the pair's transport is captured by wg0.
//!
//! ```text
//!   wgtlab-client: tailscale0 100.64.0.1, :41641, mark 0x80000 ──(captured by wg0)──▶
//!   wgtlab-router: tailscale0 100.64.0.2, 192.0.2.200:41642
//! ```
//!
//! Everything lives in the lab's namespaces and under its state directory,
//! so `lab down` removes it all; [`SpeakersLab`]'s drop stops its daemons
//! first.

use std::{
    fs,
    io::{Read as _, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    cmd::{run, shell},
    lab::{self, CLIENT, ROUTER, STATE_DIR},
};

pub const INTERFACE: &str = "tailscale0";
/// The process name the daemons run under (a copy of wireguard-go).
pub const COMM: &str = "tailscaled";
pub const CLIENT_PORT: u16 = 41641;
pub const ROUTER_PORT: u16 = 41642;
pub const ROUTER_ENDPOINT: &str = "192.0.2.200:41642";
/// Tailscale's mark on its own sockets' packets.
pub const MARK: u32 = 0x80000;
/// An address reached over the pair (the router's end).
pub const REMOTE: &str = "100.64.0.2";

/// One daemon of the pair.
struct Daemon {
    child: Child,
    /// The UAPI socket's hidden name (host path), for re-keying.
    hidden_socket: PathBuf,
}

/// The running pair; dropping it stops both daemons (the lab's teardown
/// removes the rest with the namespaces).
pub struct SpeakersLab {
    client: Daemon,
    router: Daemon,
    router_public_hex: String,
}

fn ns(namespace: &str, script: &str) -> Result<String> {
    run("ip", &["netns", "exec", namespace, "sh", "-ec", script]).with_context(|| format!("in namespace {namespace}"))
}

fn dir(namespace: &str) -> PathBuf {
    Path::new(STATE_DIR).join("speakers").join(namespace)
}

/// A key pair: (base64 private, base64 public, hex public).
fn genkey() -> Result<(String, String, String)> {
    let private = run("wg", &["genkey"])?.trim().to_owned();
    let public = shell(&format!("echo '{private}' | wg pubkey"))?.trim().to_owned();
    let hex = shell(&format!("echo '{public}' | base64 -d | od -An -v -tx1 | tr -d ' \\n'"))?.trim().to_owned();
    anyhow::ensure!(hex.len() == 64, "converting a public key to hex gave {hex:?}");
    Ok((private, public, hex))
}

/// Starts `tailscaled` (wireguard-go under that name) for tailscale0 in
/// `namespace`, its UAPI socket in a private directory.
fn start_daemon(namespace: &str) -> Result<(Child, PathBuf)> {
    let state = lab::load_state()?;
    let dir = dir(namespace);
    fs::create_dir_all(&dir)?;
    let wireguard_go = match &state.wireguard_go {
        Some(path) => path.clone(),
        None => PathBuf::from(run("sh", &["-c", "command -v wireguard-go"])?.trim()),
    };
    let binary = dir.join(COMM);
    fs::copy(&wireguard_go, &binary).with_context(|| format!("copying {}", wireguard_go.display()))?;
    let script = format!(
        "mount --bind {dir} /run/wireguard; exec {binary} -f {INTERFACE}",
        dir = dir.display(),
        binary = binary.display()
    );
    let child = Command::new("ip")
        .args(["netns", "exec", namespace, "sh", "-ec", &script])
        .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the tailscaled-style daemon")?;
    let socket = dir.join(format!("{INTERFACE}.sock"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if Instant::now() > deadline {
            bail!("{COMM} in {namespace} made no UAPI socket within 10 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((child, socket))
}

/// `wg` against the daemon's socket in its private directory.
fn wg(namespace: &str, args: &str) -> Result<String> {
    ns(namespace, &format!("mount --bind {} /run/wireguard; wg {args}", dir(namespace).display()))
}

/// Moves the UAPI socket where nothing looks for it: the daemon is then
/// unlisted, as tailscaled is.
fn hide(socket: &Path) -> Result<PathBuf> {
    let hidden = socket.with_extension("hidden");
    fs::rename(socket, &hidden).with_context(|| format!("hiding {}", socket.display()))?;
    Ok(hidden)
}

/// One UAPI `set` transaction on a hidden socket.
fn uapi_set(socket: &Path, body: &str) -> Result<()> {
    let mut stream = UnixStream::connect(socket).with_context(|| format!("connecting to {}", socket.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(format!("set=1\n{body}\n").as_bytes())?;
    let mut reply = Vec::new();
    let mut buffer = [0u8; 256];
    while !reply.ends_with(b"\n\n") {
        let n = stream.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        reply.extend_from_slice(&buffer[..n]);
    }
    let reply = String::from_utf8_lossy(&reply);
    anyhow::ensure!(reply.contains("errno=0"), "UAPI set failed: {reply:?}");
    Ok(())
}

/// Brings the pair up on a running lab (which must have its full tunnel).
pub fn up() -> Result<SpeakersLab> {
    anyhow::ensure!(lab::is_up(), "the lab is not up");
    let (client_private, client_public, _) = genkey()?;
    let (router_private, router_public, router_public_hex) = genkey()?;
    let (client_child, client_socket) = start_daemon(CLIENT)?;
    let (router_child, router_socket) = start_daemon(ROUTER).inspect_err(|_| {
        let _ = stop(client_child.id());
    })?;
    let mut lab = SpeakersLab {
        client: Daemon { child: client_child, hidden_socket: client_socket.clone() },
        router: Daemon { child: router_child, hidden_socket: router_socket.clone() },
        router_public_hex,
    };
    for (namespace, private, port) in [(CLIENT, &client_private, CLIENT_PORT), (ROUTER, &router_private, ROUTER_PORT)] {
        let key = dir(namespace).join("private.key");
        fs::write(&key, format!("{private}\n"))?;
        fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        wg(namespace, &format!("set {INTERFACE} listen-port {port} private-key {}", key.display()))?;
    }
    wg(
        CLIENT,
        &format!(
            "set {INTERFACE} fwmark {MARK:#x} peer {router_public} endpoint {ROUTER_ENDPOINT} \
             allowed-ips 100.64.0.2/32 persistent-keepalive 1"
        ),
    )?;
    wg(ROUTER, &format!("set {INTERFACE} peer {client_public} allowed-ips 100.64.0.1/32"))?;
    // Tailscale's addresses, table 52 and rules; then wg-quick's full
    // tunnel rules above them, as when wg-quick came up after tailscaled.
    ns(
        CLIENT,
        &format!(
            "ip addr add 100.64.0.1/32 dev {INTERFACE}; ip link set {INTERFACE} up; \
             ip route add 100.64.0.0/10 dev {INTERFACE} table 52; ip route add 100.64.0.0/10 dev {INTERFACE}; \
             ip rule add fwmark 0x80000/0xff0000 lookup main pref 5210; \
             ip rule add fwmark 0x80000/0xff0000 lookup default pref 5230; \
             ip rule add fwmark 0x80000/0xff0000 unreachable pref 5250; \
             ip rule add lookup 52 pref 5270; \
             ip rule add table main suppress_prefixlength 0 pref 5100; \
             ip rule add not fwmark {wg0} table {wg0} pref 5101",
            wg0 = lab::FULL_TUNNEL_MARK
        ),
    )?;
    ns(
        ROUTER,
        &format!(
            "ip addr add 100.64.0.2/32 dev {INTERFACE}; ip link set {INTERFACE} up; \
             ip route add 100.64.0.1/32 dev {INTERFACE}"
        ),
    )?;
    lab.client.hidden_socket = hide(&client_socket)?;
    lab.router.hidden_socket = hide(&router_socket)?;
    lab::wait_for_ping(REMOTE, Duration::from_secs(10)).context("tailscale0 did not come up")?;
    Ok(lab)
}

impl SpeakersLab {
    pub fn client_pid(&self) -> u32 {
        self.client.child.id()
    }

    pub fn router_pid(&self) -> u32 {
        self.router.child.id()
    }

    /// Forces a fresh handshake: the client forgets its peer and learns it
    /// again (over the hidden socket), so its next packet starts one.
    pub fn rekey(&self) -> Result<()> {
        let peer = &self.router_public_hex;
        uapi_set(&self.client.hidden_socket, &format!("public_key={peer}\nremove=true\n"))?;
        uapi_set(
            &self.client.hidden_socket,
            &format!(
                "public_key={peer}\nendpoint={ROUTER_ENDPOINT}\nallowed_ip=100.64.0.2/32\n\
                 persistent_keepalive_interval=1\n"
            ),
        )?;
        lab::wait_for_ping(REMOTE, Duration::from_secs(10))
    }

    /// The fix in Tailscale's terms: a rule above wg-quick's that sends the
    /// daemon's marked packets to main. wireguard-go keeps the source
    /// address it last used, so the endpoint is set again after it
    /// ([`Self::rekey`]), before any trace starts: otherwise the pinned path
    /// through wg0 is still what its packets take.
    pub fn fix(&self) -> Result<()> {
        ns(CLIENT, "ip rule add fwmark 0x80000/0xff0000 lookup main pref 5000")?;
        self.rekey()
    }
}

fn stop(pid: u32) -> Result<()> {
    // SAFETY: signalling a child we started.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    Ok(())
}

impl Drop for SpeakersLab {
    fn drop(&mut self) {
        for daemon in [&mut self.client, &mut self.router] {
            let _ = stop(daemon.child.id());
            let deadline = Instant::now() + Duration::from_secs(3);
            loop {
                match daemon.child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() > deadline => {
                        let _ = daemon.child.kill();
                        let _ = daemon.child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
    }
}

/// What a WireGuard-shaped sender does (`cargo xtask wg-shaped`, run inside
/// a lab namespace by the tests): plain UDP, no WireGuard at all.
#[derive(Clone, Debug)]
pub struct ShapedSender {
    /// Hold a TUN device of this name while sending (a TUN holder without
    /// a UAPI, i.e. a candidate speaker), or none (a plain socket).
    pub tun: Option<String>,
    pub port: u16,
    /// Where initiation-shaped datagrams go (none: only answer).
    pub to: Option<std::net::SocketAddr>,
    pub count: u32,
    /// Datagrams per round (a round waits up to 5 ms for datagrams to
    /// answer): 200 makes a flood, 1 a trickle of about 200 a second.
    pub burst: u32,
    /// Answer every initiation-shaped datagram with a response whose
    /// receiver index matches it.
    pub respond: bool,
    pub seconds: f64,
}

const INITIATION_LEN: usize = 148;
const RESPONSE_LEN: usize = 92;

fn shaped(message_type: u8, sender: u32, receiver: u32, length: usize) -> Vec<u8> {
    let mut message = vec![0u8; length];
    message[0] = message_type;
    message[4..8].copy_from_slice(&sender.to_le_bytes());
    message[8..12].copy_from_slice(&receiver.to_le_bytes());
    message
}

/// Opens `name` as a TUN device in this process's namespace.
fn hold_tun(name: &str) -> Result<fs::File> {
    use std::os::fd::AsRawFd as _;
    let file = fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun").context("opening /dev/net/tun")?;
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: u16,
        _pad: [u8; 22],
    }
    let mut request = IfReq { name: [0; 16], flags: 0x0001 | 0x1000, _pad: [0; 22] }; // IFF_TUN | IFF_NO_PI
    anyhow::ensure!(name.len() < 16, "TUN name {name} too long");
    request.name[..name.len()].copy_from_slice(name.as_bytes());
    const TUNSETIFF: libc::c_ulong = 0x400454ca;
    // SAFETY: TUNSETIFF with a struct ifreq-sized buffer we own.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut request) } != 0 {
        return Err(std::io::Error::last_os_error()).context("TUNSETIFF");
    }
    Ok(file)
}

/// Sends `count` initiation-shaped datagrams (and/or answers them) from a
/// plain UDP socket, for `seconds`.
pub fn send_shaped(options: &ShapedSender) -> Result<()> {
    let _tun = options.tun.as_deref().map(hold_tun).transpose()?;
    let socket = std::net::UdpSocket::bind(("0.0.0.0", options.port)).context("binding the sender's socket")?;
    socket.set_read_timeout(Some(Duration::from_millis(5)))?;
    let deadline = Instant::now() + Duration::from_secs_f64(options.seconds);
    let mut sent = 0u32;
    let mut buffer = [0u8; 2048];
    while Instant::now() < deadline {
        if let Some(to) = options.to {
            // In bursts, so the flood is a flood but the loop still answers.
            for _ in 0..options.burst {
                if sent < options.count {
                    let _ = socket.send_to(&shaped(1, 0x1000_0000 | sent, 0, INITIATION_LEN), to);
                    sent += 1;
                }
            }
        }
        while let Ok((n, from)) = socket.recv_from(&mut buffer) {
            if options.respond && n == INITIATION_LEN && buffer[0] == 1 {
                let sender = u32::from_le_bytes(buffer[4..8].try_into().expect("4 bytes"));
                let _ = socket.send_to(&shaped(2, sender ^ 0x5555, sender, RESPONSE_LEN), from);
            }
        }
    }
    Ok(())
}

/// Starts [`send_shaped`] inside `namespace` (as `xtask wg-shaped`); the
/// child is the one holding the TUN device, so it is a TUN holder of that
/// namespace.
pub fn spawn_shaped(namespace: &str, options: &ShapedSender) -> Result<Child> {
    let helper =
        std::env::var_os("WGTRACE_LAB_HELPER").context("WGTRACE_LAB_HELPER is not set (cargo xtask test sets it)")?;
    let mut command = Command::new("ip");
    command.args(["netns", "exec", namespace]).arg(helper).args([
        "wg-shaped",
        "--port",
        &options.port.to_string(),
        "--count",
        &options.count.to_string(),
        "--seconds",
        &options.seconds.to_string(),
        "--burst",
        &options.burst.to_string(),
    ]);
    if let Some(tun) = &options.tun {
        command.args(["--tun", tun]);
    }
    if let Some(to) = options.to {
        command.args(["--to", &to.to_string()]);
    }
    if options.respond {
        command.arg("--respond");
    }
    command.stdin(Stdio::null()).stdout(Stdio::null()).spawn().context("starting a WireGuard-shaped sender")
}
