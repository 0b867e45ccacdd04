//! A non-WireGuard VPN of our own for the lab: a TUN device whose packets
//! travel as plain UDP datagrams to a peer relay in another namespace, which
//! writes them into its own TUN device (and the way back). With the
//! OpenVPN-style `def1` routes (0.0.0.0/1 and 128.0.0.0/1 via the TUN
//! device) it captures a WireGuard tunnel's transport the way OpenVPN's
//! `redirect-gateway def1` does. No encryption: only the routing matters.

use std::{
    fs::File,
    io::{Read as _, Write as _},
    net::{SocketAddr, UdpSocket},
    os::fd::AsRawFd as _,
    sync::{Arc, Mutex},
};

use anyhow::{Context as _, Result, bail};

/// The process name the relay shows (`/proc/PID/comm`): what wgtrace names
/// as the holder of the TUN device.
pub const PROCESS_NAME: &str = "vpn-relay";

/// Enters `netns_path`, creates TUN `device`, binds `bind`, and relays
/// forever. Without `peer` the peer is the sender of the last datagram.
pub fn serve(netns_path: &str, device: &str, bind: SocketAddr, peer: Option<SocketAddr>) -> Result<()> {
    let netns = File::open(netns_path).with_context(|| format!("opening {netns_path}"))?;
    // SAFETY: setns with a valid namespace fd, before any thread exists.
    if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("entering {netns_path}: {}", std::io::Error::last_os_error());
    }
    let name = std::ffi::CString::new(PROCESS_NAME)?;
    // SAFETY: PR_SET_NAME with a NUL-terminated name of at most 16 bytes,
    // on the main thread (whose name /proc/PID/comm shows).
    unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
    let tun = crate::delay::create_tun(device)?;
    let socket = UdpSocket::bind(bind).with_context(|| format!("binding {bind}"))?;
    let peer = Arc::new(Mutex::new(peer));
    let (mut from_tun, socket_out, peer_out) = (tun.try_clone()?, socket.try_clone()?, peer.clone());
    std::thread::spawn(move || {
        let mut buffer = vec![0u8; 65536];
        while let Ok(n) = from_tun.read(&mut buffer) {
            let to = *peer_out.lock().unwrap();
            if let Some(to) = to {
                let _ = socket_out.send_to(&buffer[..n], to);
            }
        }
    });
    let mut to_tun = tun;
    let mut buffer = vec![0u8; 65536];
    loop {
        let (n, from) = socket.recv_from(&mut buffer)?;
        *peer.lock().unwrap() = Some(from);
        // A write fails only for a malformed packet or a vanishing device.
        let _ = to_tun.write_all(&buffer[..n]);
    }
}
