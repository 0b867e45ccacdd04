//! A netlink socket and its one request/answer exchange, bounded in time
//! and size.

use std::{
    io,
    ops::Deref,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use anyhow::{Context as _, Result, bail};
use zeroize::Zeroizing;

use super::wire::split_messages;

pub const NETLINK_ROUTE: i32 = 0;
pub const NETLINK_GENERIC: i32 = 16;
/// Socket listings (`ss`): where a kernel WireGuard socket lives.
pub const NETLINK_SOCK_DIAG: i32 = 4;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
pub(crate) const NLM_F_DUMP: u16 = 0x300;

#[derive(Debug)]
pub struct Socket {
    fd: OwnedFd,
    sequence: u32,
}

/// A received netlink message payload, wiped when dropped (the `zeroize`
/// crate): generic netlink replies (WireGuard's) carry private and preshared
/// keys.
pub(crate) struct ZeroOnDrop(Zeroizing<Vec<u8>>);

impl Deref for ZeroOnDrop {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.0
    }
}

/// A netlink request and its whole answer must fit in this: the kernel
/// answers in microseconds, so only a stuck namespace gets near it.
pub const DEADLINE: std::time::Duration = std::time::Duration::from_secs(1);
/// And in this many bytes (a dump of a namespace's links or rules, or one
/// WireGuard device with thousands of peers, is far smaller).
pub const MAX_ANSWER: usize = 32 << 20;

impl Socket {
    /// Opens a NETLINK_ROUTE socket in the calling thread's namespace.
    pub fn route() -> Result<Self> {
        Self::open(NETLINK_ROUTE)
    }

    /// Opens a netlink socket of `protocol` in the calling thread's namespace.
    pub fn open(protocol: i32) -> Result<Self> {
        Ok(Self::from_fd(open_raw(protocol)?))
    }

    /// A netlink socket opened elsewhere (it stays in the namespace it was
    /// opened in), such as one the privileged helper passed over.
    pub fn from_fd(fd: OwnedFd) -> Self {
        // Every recv is bounded; `request` bounds the whole answer.
        let timeout = libc::timeval { tv_sec: DEADLINE.as_secs() as libc::time_t, tv_usec: 0 };
        // SAFETY: setsockopt with a timeval we own, of the size passed.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        Self { fd, sequence: 1 }
    }

    pub(crate) fn request(&mut self, message_type: u16, flags: u16, body: &[u8]) -> Result<Vec<(u16, ZeroOnDrop)>> {
        self.sequence += 1;
        let length = 16 + body.len();
        let mut packet = Vec::with_capacity(length);
        packet.extend_from_slice(&(length as u32).to_ne_bytes());
        packet.extend_from_slice(&message_type.to_ne_bytes());
        packet.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        packet.extend_from_slice(&self.sequence.to_ne_bytes());
        packet.extend_from_slice(&0u32.to_ne_bytes());
        packet.extend_from_slice(body);
        // SAFETY: sending a buffer we own to our own socket; the kernel is the
        // default destination of an unbound netlink socket.
        let sent = unsafe { libc::send(self.fd.as_raw_fd(), packet.as_ptr().cast(), packet.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error()).context("sending a netlink request");
        }
        let mut replies = Vec::new();
        let mut buffer = ZeroOnDrop(Zeroizing::new(vec![0u8; 1 << 16]));
        let deadline = std::time::Instant::now() + DEADLINE;
        let mut total = 0usize;
        loop {
            // SAFETY: receiving into a buffer we own, within its length.
            let received = unsafe { libc::recv(self.fd.as_raw_fd(), buffer.0.as_mut_ptr().cast(), buffer.len(), 0) };
            if received < 0 {
                let err = io::Error::last_os_error();
                if err.raw_os_error() == Some(libc::EINTR) && std::time::Instant::now() < deadline {
                    continue;
                }
                return Err(err).context("reading a netlink reply");
            }
            total += received as usize;
            if total > MAX_ANSWER || std::time::Instant::now() > deadline {
                bail!("a netlink answer larger than {} MiB or slower than {} s", MAX_ANSWER >> 20, DEADLINE.as_secs());
            }
            let mut done = flags & NLM_F_DUMP != NLM_F_DUMP;
            for (kind, sequence, payload) in split_messages(&buffer[..received as usize]) {
                if sequence != self.sequence {
                    continue;
                }
                match kind {
                    // A dump that fails part-way still ends with NLMSG_DONE,
                    // which then carries the negative errno instead of 0.
                    NLMSG_DONE | NLMSG_ERROR => {
                        let code = payload.get(0..4).map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]])).unwrap_or(0);
                        if code != 0 {
                            return Err(io::Error::from_raw_os_error(-code))
                                .context("the kernel refused a netlink request");
                        }
                        done = true;
                    }
                    _ => replies.push((kind, ZeroOnDrop(Zeroizing::new(payload.to_vec())))),
                }
            }
            if done {
                return Ok(replies);
            }
        }
    }
}

/// A bare netlink socket of `protocol` in the calling thread's namespace.
pub fn open_raw(protocol: i32) -> Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context("opening a netlink socket");
    }
    // SAFETY: fd is a fresh, valid descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
