//! `--probe`: a few ICMP echoes to a nested tunnel's endpoint, once with the
//! mark it uses now (through the outer tunnel) and once with the suggested
//! fix mark (the direct path), from the tunnel's own network namespace. The
//! difference is what the nesting costs each round trip. Nothing is sent
//! unless the user asks for it.

use std::{
    io,
    mem::size_of,
    net::IpAddr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use crate::topology::netns;

/// Median RTT in microseconds of `count` echoes to `destination` sent with
/// `mark`, or None when nothing answered.
pub fn echo_rtt(netns_handle: &Path, destination: IpAddr, mark: u32, count: u16) -> Result<Option<u64>> {
    netns::run_in(netns_handle, move || {
        let socket = open(destination, mark)?;
        let id = (std::process::id() as u16) ^ (mark as u16).rotate_left(7);
        let mut rtts = Vec::new();
        for sequence in 0..count {
            if let Some(rtt) = one_echo(&socket, destination, id, sequence)? {
                rtts.push(rtt.as_micros() as u64);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        rtts.sort_unstable();
        Ok(rtts.get(rtts.len() / 2).copied())
    })
}

fn open(destination: IpAddr, mark: u32) -> Result<OwnedFd> {
    let (domain, protocol) = match destination {
        IpAddr::V4(_) => (libc::AF_INET, libc::IPPROTO_ICMP),
        IpAddr::V6(_) => (libc::AF_INET6, libc::IPPROTO_ICMPV6),
    };
    // SAFETY: plain socket(2); ownership is taken at once.
    let fd = unsafe { libc::socket(domain, libc::SOCK_RAW | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context("opening a raw ICMP socket (needs CAP_NET_RAW)");
    }
    // SAFETY: fd is fresh and valid.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    set_option(&socket, libc::SOL_SOCKET, libc::SO_MARK, mark).context("setting SO_MARK (needs CAP_NET_ADMIN)")?;
    let timeout = libc::timeval { tv_sec: 1, tv_usec: 0 };
    // SAFETY: valid fd, option value of the right type and size.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            size_of::<libc::timeval>() as u32,
        )
    };
    Ok(socket)
}

fn set_option(socket: &OwnedFd, level: i32, name: i32, value: u32) -> io::Result<()> {
    // SAFETY: valid fd and a u32 option value.
    let rc = unsafe { libc::setsockopt(socket.as_raw_fd(), level, name, (&value as *const u32).cast(), 4) };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

fn one_echo(socket: &OwnedFd, destination: IpAddr, id: u16, sequence: u16) -> Result<Option<Duration>> {
    let v4 = destination.is_ipv4();
    let mut message = vec![if v4 { 8 } else { 128 }, 0, 0, 0];
    message.extend_from_slice(&id.to_be_bytes());
    message.extend_from_slice(&sequence.to_be_bytes());
    message.extend_from_slice(b"wgtrace probe...");
    if v4 {
        // ICMPv6 checksums are filled in by the kernel; ICMPv4 ones are ours.
        let sum = checksum(&message);
        message[2..4].copy_from_slice(&sum.to_be_bytes());
    }
    let (address, length) = socket_address(destination);
    let started = Instant::now();
    // SAFETY: sending our buffer to a sockaddr we built with its length.
    let sent = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            message.as_ptr().cast(),
            message.len(),
            0,
            (&address as *const libc::sockaddr_storage).cast(),
            length,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error()).context("sending an ICMP echo");
    }
    let mut buffer = [0u8; 1500];
    while started.elapsed() < Duration::from_secs(1) {
        // SAFETY: receiving into our buffer within its length.
        let n = unsafe { libc::recv(socket.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len(), 0) };
        if n < 0 {
            return Ok(None); // timed out
        }
        let packet = &buffer[..n as usize];
        // A raw IPv4 socket hands over the IP header too.
        let icmp =
            if v4 { packet.get(((packet.first().copied().unwrap_or(0) & 0x0f) as usize) * 4..) } else { Some(packet) };
        let Some(icmp) = icmp else { continue };
        let reply_type = if v4 { 0 } else { 129 };
        if icmp.len() >= 8
            && icmp[0] == reply_type
            && icmp[4..6] == id.to_be_bytes()
            && icmp[6..8] == sequence.to_be_bytes()
        {
            return Ok(Some(started.elapsed()));
        }
    }
    Ok(None)
}

fn socket_address(destination: IpAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is valid; the family-specific view
    // written below fits inside it.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match destination {
        IpAddr::V4(a) => {
            let sin = unsafe { &mut *(&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            sin.sin_family = libc::AF_INET as u16;
            sin.sin_addr.s_addr = u32::from_ne_bytes(a.octets());
            (storage, size_of::<libc::sockaddr_in>() as u32)
        }
        IpAddr::V6(a) => {
            let sin6 = unsafe { &mut *(&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            sin6.sin6_family = libc::AF_INET6 as u16;
            sin6.sin6_addr.s6_addr = a.octets();
            (storage, size_of::<libc::sockaddr_in6>() as u32)
        }
    }
}

/// The Internet checksum (RFC 1071).
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data.chunks(2).map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_matches_rfc1071_example() {
        // RFC 1071 section 3: the sum of these words is 0xddf2.
        assert_eq!(checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]), !0xddf2);
        // A message with its checksum filled in sums to zero.
        let mut m = vec![8, 0, 0, 0, 0x12, 0x34, 0, 1, b'x'];
        let c = checksum(&m);
        m[2..4].copy_from_slice(&c.to_be_bytes());
        assert_eq!(checksum(&m), 0);
    }
}
