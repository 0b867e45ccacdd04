//! The cross-platform WireGuard userspace API (wireguard-go, boringtun): a
//! unix socket per interface that answers `get=1` with `key=value` lines.
//!
//! Every TUN holder on the host is untrusted: any user who can create a TUN
//! device (an unprivileged user namespace is enough) can serve a socket that
//! drips, hangs, floods or plants symlinks. So:
//! - the socket path is resolved inside the daemon's own root
//!   (`/proc/PID/root`) with `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`:
//!   an absolute symlink cannot point wgtrace at a socket outside it;
//! - before a byte is sent, `SO_PEERCRED` must name the process that holds
//!   the TUN device: another process's socket is never written to;
//! - connect, request and the whole reply share one deadline ([`DEADLINE`])
//!   and one size cap ([`MAX_REPLY`]);
//! - every buffer that held the reply (it carries the private key) is wiped
//!   on every path, parse errors included.

use std::{
    ffi::CString,
    net::SocketAddr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use zeroize::Zeroizing;

use super::{Device, Peer, parse_prefix};

/// Connect, request and the whole reply must fit in this.
pub const DEADLINE: Duration = Duration::from_secs(1);
/// A reply is a few hundred bytes per peer: 1 MiB is thousands of peers.
pub const MAX_REPLY: usize = 1 << 20;

/// Where daemons keep their sockets, relative to their root.
const SOCKET_DIRS: [&str; 2] = ["run/wireguard", "var/run/wireguard"];

const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
const RESOLVE_IN_ROOT: u64 = 0x10;

/// struct open_how (include/uapi/linux/openat2.h).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// An interface name usable as one path component (IFNAMSIZ, no `/`).
fn valid_interface(interface: &str) -> bool {
    !interface.is_empty()
        && interface.len() < 16
        && interface != "."
        && interface != ".."
        && !interface.bytes().any(|b| b == b'/' || b == 0)
}

/// Opens (`O_PATH`) the UAPI socket of `interface` of the daemon `pid`,
/// resolving the path as if `/proc/PID/root` were `/`: symlinks, `..` and
/// absolute links stay inside the daemon's root, magic links are refused.
/// `Ok(None)`: no such socket.
pub fn open_socket(pid: u32, interface: &str) -> Result<Option<OwnedFd>> {
    if !valid_interface(interface) {
        bail!("interface name {interface:?} is not a valid path component");
    }
    let root_path = CString::new(format!("/proc/{pid}/root")).expect("no NUL in a formatted path");
    // SAFETY: open(2) on a NUL-terminated path; the fd is owned below.
    let root = unsafe { libc::open(root_path.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) };
    if root < 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("opening the root of PID {pid}"));
    }
    // SAFETY: a fresh, valid descriptor.
    let root = unsafe { OwnedFd::from_raw_fd(root) };
    for dir in SOCKET_DIRS {
        let path = CString::new(format!("{dir}/{interface}.sock")).expect("interface has no NUL");
        let how = OpenHow {
            flags: (libc::O_PATH | libc::O_CLOEXEC) as u64,
            mode: 0,
            resolve: RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS,
        };
        // SAFETY: openat2 with a valid dirfd, NUL-terminated path and a
        // struct open_how of the size passed.
        let fd =
            unsafe { libc::syscall(libc::SYS_openat2, root.as_raw_fd(), path.as_ptr(), &how, size_of::<OpenHow>()) };
        if fd < 0 {
            let err = std::io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::ENOENT) | Some(libc::ENOTDIR) => continue,
                _ => return Err(err).with_context(|| format!("resolving {dir}/{interface}.sock in PID {pid}'s root")),
            }
        }
        // SAFETY: a fresh, valid descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // SAFETY: fstat into a zeroed struct we own.
        let mut stat: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut stat) } != 0 || stat.st_mode & libc::S_IFMT != libc::S_IFSOCK {
            bail!("{dir}/{interface}.sock in PID {pid}'s root is not a socket");
        }
        return Ok(Some(fd));
    }
    Ok(None)
}

/// Time left before `deadline`, as a poll(2) timeout in milliseconds.
fn remaining_ms(deadline: Instant) -> Result<i32> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        bail!("no complete answer within {} ms", DEADLINE.as_millis());
    }
    Ok(left.as_millis().clamp(1, i32::MAX as u128) as i32)
}

/// Waits until `fd` is ready for `events`, or the deadline passes.
fn wait(fd: i32, events: i16, deadline: Instant) -> Result<()> {
    loop {
        let mut pollfd = libc::pollfd { fd, events, revents: 0 };
        // SAFETY: one pollfd we own.
        let n = unsafe { libc::poll(&mut pollfd, 1, remaining_ms(deadline)?) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINTR) {
                continue; // the deadline still bounds the retry
            }
            return Err(err).context("waiting for the UAPI socket");
        }
        if n > 0 {
            return Ok(());
        }
    }
}

/// Connects to the socket behind the `O_PATH` descriptor `path_fd`, and
/// checks that its listener is `holder` (the process holding the TUN
/// device). Nothing is sent here.
pub fn connect_checked(path_fd: &OwnedFd, holder: u32, deadline: Instant) -> Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("opening a unix socket");
    }
    // SAFETY: a fresh, valid descriptor.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // Connecting through /proc/self/fd/N reaches exactly the inode that was
    // resolved, with no second path walk that a daemon could race.
    let mut address: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    address.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let path = format!("/proc/self/fd/{}", path_fd.as_raw_fd());
    for (slot, byte) in address.sun_path.iter_mut().zip(path.bytes()) {
        *slot = byte as libc::c_char;
    }
    loop {
        // SAFETY: a sockaddr_un we own, of the size passed.
        let rc = unsafe {
            libc::connect(
                socket.as_raw_fd(),
                (&address as *const libc::sockaddr_un).cast(),
                size_of::<libc::sockaddr_un>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            break;
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            // A full backlog: a stream socket that does not accept.
            Some(libc::EAGAIN) | Some(libc::EINPROGRESS) => {
                if Instant::now() >= deadline {
                    bail!(
                        "connecting: its listen queue stayed full for {} ms (it accepts no connection)",
                        DEADLINE.as_millis()
                    );
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Some(libc::EINTR) => {}
            _ => return Err(err).context("connecting"),
        }
    }
    let mut credentials = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut length = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED into a struct ucred we own, of the size passed.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut credentials as *mut libc::ucred).cast(),
            &mut length,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("reading the socket's peer credentials");
    }
    // wireguard-go daemonizes: the parent that called listen() (whose PID
    // SO_PEERCRED names) has exited, and the child holding the TUN device
    // inherited the listener. Then the holder must be the one that accepted
    // this connection: it holds the server end in its fd table.
    if credentials.pid as u32 != holder && !holder_accepted(&socket, holder, deadline)? {
        bail!(
            "the socket is served by PID {}, not by PID {holder} that holds the TUN device: nothing was sent to it",
            credentials.pid
        );
    }
    Ok(socket)
}

/// Whether `holder` has accepted the connection of `socket`: the server end
/// (asked of the kernel with unix sock_diag) is among its descriptors.
fn holder_accepted(socket: &OwnedFd, holder: u32, deadline: Instant) -> Result<bool> {
    // SAFETY: fstat into a zeroed struct we own.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(socket.as_raw_fd(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error()).context("stat of our own socket");
    }
    let mut diag = super::netlink::Socket::open(NETLINK_SOCK_DIAG).context("opening a sock_diag socket")?;
    let wanted = loop {
        // The server end has an inode only once accepted.
        match peer_inode(&mut diag, stat.st_ino as u32)? {
            Some(inode) if inode != 0 => break format!("socket:[{inode}]"),
            _ => {}
        }
        remaining_ms(deadline).context("waiting for the TUN holder to accept")?;
        std::thread::sleep(Duration::from_millis(5));
    };
    let Ok(fds) = std::fs::read_dir(format!("/proc/{holder}/fd")) else { return Ok(false) };
    Ok(fds.flatten().any(|fd| std::fs::read_link(fd.path()).is_ok_and(|link| link.as_os_str() == wanted.as_str())))
}

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const UDIAG_SHOW_PEER: u32 = 0x4;
const UNIX_DIAG_PEER: u16 = 2;

/// The inode of the peer of our unix socket `inode` (0 while not accepted).
fn peer_inode(diag: &mut super::netlink::Socket, inode: u32) -> Result<Option<u32>> {
    // struct unix_diag_req: family, protocol, pad, states, ino, show, cookie[2].
    let mut request = Vec::with_capacity(24);
    request.extend_from_slice(&[libc::AF_UNIX as u8, 0, 0, 0]);
    request.extend_from_slice(&u32::MAX.to_ne_bytes());
    request.extend_from_slice(&inode.to_ne_bytes());
    request.extend_from_slice(&UDIAG_SHOW_PEER.to_ne_bytes());
    request.extend_from_slice(&u32::MAX.to_ne_bytes());
    request.extend_from_slice(&u32::MAX.to_ne_bytes());
    let replies = diag.request(SOCK_DIAG_BY_FAMILY, 0, &request).context("asking sock_diag for our peer")?;
    // struct unix_diag_msg is 16 bytes, then attributes.
    Ok(replies
        .iter()
        .filter(|(kind, _)| *kind == SOCK_DIAG_BY_FAMILY)
        .filter_map(|(_, payload)| payload.get(16..))
        .flat_map(super::netlink::attributes)
        .find(|(kind, _)| *kind == UNIX_DIAG_PEER)
        .and_then(|(_, value)| Some(u32::from_ne_bytes(value.get(0..4)?.try_into().ok()?))))
}

/// A growable buffer whose every allocation is wiped when replaced or
/// dropped (a plain `Vec` would leave copies behind when it reallocates).
#[derive(Default)]
struct SecretBuffer(Zeroizing<Vec<u8>>);

impl SecretBuffer {
    fn extend(&mut self, bytes: &[u8]) {
        if self.0.capacity() - self.0.len() < bytes.len() {
            let capacity = (self.0.capacity() * 2).max(self.0.len() + bytes.len()).max(4096);
            let mut bigger = Zeroizing::new(Vec::with_capacity(capacity));
            bigger.extend_from_slice(&self.0);
            self.0 = bigger; // the old allocation is zeroized on drop
        }
        self.0.extend_from_slice(bytes);
    }
}

/// Sends `get=1` over a connected, checked socket and parses the reply,
/// all before `deadline`.
pub fn query(socket: &OwnedFd, deadline: Instant) -> Result<Device> {
    let request = b"get=1\n\n";
    let mut sent = 0;
    while sent < request.len() {
        wait(socket.as_raw_fd(), libc::POLLOUT, deadline).context("sending the request")?;
        // SAFETY: sending from a buffer we own, within its length.
        let n = unsafe {
            libc::send(socket.as_raw_fd(), request[sent..].as_ptr().cast(), request.len() - sent, libc::MSG_NOSIGNAL)
        };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if matches!(err.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EINTR)) {
                continue;
            }
            return Err(err).context("sending the request");
        }
        sent += n as usize;
    }
    let mut reply = SecretBuffer::default();
    let mut chunk = Zeroizing::new([0u8; 4096]);
    loop {
        wait(socket.as_raw_fd(), libc::POLLIN, deadline).context("reading the reply")?;
        // SAFETY: receiving into a buffer we own, within its length.
        let n = unsafe { libc::recv(socket.as_raw_fd(), chunk.as_mut_ptr().cast(), chunk.len(), 0) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if matches!(err.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EINTR)) {
                continue;
            }
            return Err(err).context("reading the reply");
        }
        let n = n as usize;
        if reply.0.len() + n > MAX_REPLY {
            bail!("the reply is larger than {} KiB", MAX_REPLY >> 10);
        }
        reply.extend(&chunk[..n]);
        if n == 0 || reply.0.ends_with(b"\n\n") {
            break;
        }
    }
    let text = std::str::from_utf8(&reply.0).map_err(|_| anyhow::anyhow!("the reply is not text"))?;
    parse(text)
}

/// Parses a `get=1` reply. The private key and preshared keys are skipped,
/// never stored.
pub fn parse(text: &str) -> Result<Device> {
    let mut device = Device::default();
    for line in text.lines() {
        if line.is_empty() {
            break;
        }
        let Some((key, value)) = line.split_once('=') else {
            bail!("malformed UAPI line (no '=')");
        };
        match key {
            "listen_port" => device.listen_port = value.parse().context("listen_port")?,
            "fwmark" => device.fwmark = value.parse().context("fwmark")?,
            "public_key" => device.peers.push(Peer { public_key: hex_key_to_base64(value)?, ..Peer::default() }),
            "endpoint" => {
                let peer = device.peers.last_mut().context("endpoint before any peer")?;
                peer.endpoint = Some(value.parse::<SocketAddr>().context("endpoint")?);
            }
            "allowed_ip" => {
                let peer = device.peers.last_mut().context("allowed_ip before any peer")?;
                peer.allowed_ips.push(parse_prefix(value).context("allowed_ip")?);
            }
            "last_handshake_time_sec" => {
                if let Some(peer) = device.peers.last_mut() {
                    peer.last_handshake_sec = value.parse().unwrap_or(0);
                }
            }
            "errno" if value != "0" => bail!("the daemon answered errno={value}"),
            _ => {} // private_key, preshared_key, counters: not needed
        }
    }
    Ok(device)
}

fn hex_key_to_base64(hex: &str) -> Result<String> {
    if hex.len() != 64 {
        bail!("a WireGuard key is 32 bytes");
    }
    let bytes = (0..32)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()
        .context("key is not hex")?;
    Ok(base64(&bytes))
}

pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n =
            (chunk[0] as u32) << 16 | (*chunk.get(1).unwrap_or(&0) as u32) << 8 | *chunk.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPLY: &str = "private_key=e84b5a6d2717c1003a13b431570353dbaca9146cf150c5f8575680feba52027a\n\
listen_port=51821\n\
fwmark=51820\n\
public_key=b85996fecc9c7f1fc6d2572a76eda11d59bcd20be8e543b15ce4bd85a8e75a33\n\
preshared_key=0000000000000000000000000000000000000000000000000000000000000000\n\
protocol_version=1\n\
endpoint=192.0.2.1:51821\n\
last_handshake_time_sec=1700000000\n\
allowed_ip=203.0.113.0/24\n\
allowed_ip=2001:db8:1::/48\n\
errno=0\n\n";

    #[test]
    fn parses_a_wireguard_go_reply_without_keeping_the_private_key() {
        let device = parse(REPLY).unwrap();
        assert_eq!(device.listen_port, 51821);
        assert_eq!(device.fwmark, 51820);
        assert_eq!(device.peers.len(), 1);
        let peer = &device.peers[0];
        assert_eq!(peer.public_key, "uFmW/sycfx/G0lcqdu2hHVm80gvo5UOxXOS9hajnWjM=");
        assert_eq!(peer.endpoint, Some("192.0.2.1:51821".parse().unwrap()));
        assert_eq!(peer.allowed_ips.len(), 2);
        assert!(!format!("{device:?}").contains("e84b5a6d"), "private key must not be kept");
    }

    #[test]
    fn rejects_errors_and_garbage() {
        assert!(parse("errno=19\n\n").is_err());
        assert!(parse("listen_port=notanumber\n").is_err());
        assert!(parse("endpoint=1.2.3.4:5\n").is_err(), "endpoint before peer");
        assert!(parse("public_key=abc\n").is_err());
        assert!(parse("garbage\n").is_err());
    }

    #[test]
    fn interface_names_are_one_path_component() {
        for good in ["wg0", "nb-other", "a.b"] {
            assert!(valid_interface(good), "{good}");
        }
        for bad in ["", ".", "..", "../../etc", "wg0/x", "a\0b", "sixteen-chars-xx"] {
            assert!(!valid_interface(bad), "{bad:?}");
        }
        assert!(open_socket(std::process::id(), "../../x").is_err());
    }

    #[test]
    fn the_secret_buffer_keeps_its_bytes_across_growth() {
        let mut buffer = SecretBuffer::default();
        for chunk in 0..100u8 {
            buffer.extend(&[chunk; 1000]);
        }
        assert_eq!(buffer.0.len(), 100_000);
        assert!(buffer.0.chunks(1000).enumerate().all(|(i, c)| c.iter().all(|&b| b == i as u8)));
    }

    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }
}
