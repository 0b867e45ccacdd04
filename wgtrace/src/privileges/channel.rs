//! The helper's channel: one `SOCK_SEQPACKET` message per request or
//! answer (JSON in an [`Envelope`]), with at most one descriptor attached
//! (SCM_RIGHTS). Every message is sent and received whole, so threads on
//! either side may send at once.

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};

use anyhow::Result;
use serde::{Deserialize, Serialize};

/// Largest request or answer.
pub const MAX_MESSAGE: usize = 4 << 20;

/// Every message carries the id of the request it belongs to (0: the
/// helper's ready message).
#[derive(Debug, Serialize, Deserialize)]
pub struct Envelope<T> {
    pub id: u64,
    pub body: T,
}

/// Sends one message, with `fd` attached if given.
pub fn send(socket: &OwnedFd, bytes: &[u8], fd: Option<&OwnedFd>) -> Result<()> {
    anyhow::ensure!(bytes.len() <= MAX_MESSAGE, "message of {} bytes is too large", bytes.len());
    let mut iov = libc::iovec { iov_base: bytes.as_ptr() as *mut libc::c_void, iov_len: bytes.len() };
    // u64 words keep the control buffer aligned for struct cmsghdr.
    let mut control = [0u64; 4];
    // SAFETY: a zeroed msghdr pointing at buffers that outlive the call.
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_iov = &mut iov;
    message.msg_iovlen = 1;
    if let Some(fd) = fd {
        // SAFETY: CMSG_* on a control buffer large enough for one int.
        unsafe {
            let space = libc::CMSG_SPACE(size_of::<RawFd>() as u32) as usize;
            message.msg_control = control.as_mut_ptr().cast();
            message.msg_controllen = space;
            let header = libc::CMSG_FIRSTHDR(&message);
            (*header).cmsg_level = libc::SOL_SOCKET;
            (*header).cmsg_type = libc::SCM_RIGHTS;
            (*header).cmsg_len = libc::CMSG_LEN(size_of::<RawFd>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(header).cast::<RawFd>(), fd.as_raw_fd());
        }
    }
    loop {
        // SAFETY: sendmsg with the msghdr built above.
        let sent = unsafe { libc::sendmsg(socket.as_raw_fd(), &message, libc::MSG_NOSIGNAL) };
        if sent >= 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINTR) {
            return Err(err.into());
        }
    }
}

/// Receives one message and the descriptor attached to it, if any. An empty
/// message means the other end closed.
pub fn receive(socket: &OwnedFd) -> Result<(Vec<u8>, Option<OwnedFd>)> {
    // The message's size first, so the buffer fits it exactly.
    let size = loop {
        // SAFETY: a zero-length peek; MSG_TRUNC makes it return the real size.
        let n = unsafe { libc::recv(socket.as_raw_fd(), std::ptr::null_mut(), 0, libc::MSG_PEEK | libc::MSG_TRUNC) };
        if n >= 0 {
            break n as usize;
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINTR) {
            return Err(err.into());
        }
    };
    anyhow::ensure!(size <= MAX_MESSAGE, "message of {size} bytes is too large");
    let mut bytes = vec![0u8; size.max(1)];
    let mut iov = libc::iovec { iov_base: bytes.as_mut_ptr().cast(), iov_len: bytes.len() };
    let mut control = [0u64; 4];
    // SAFETY: a zeroed msghdr pointing at buffers that outlive the call.
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_iov = &mut iov;
    message.msg_iovlen = 1;
    message.msg_control = control.as_mut_ptr().cast();
    message.msg_controllen = size_of_val(&control);
    let received = loop {
        // SAFETY: recvmsg into the buffers above; descriptors arrive close-on-exec.
        let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut message, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINTR) {
            return Err(err.into());
        }
    };
    bytes.truncate(received);
    let mut fd = None;
    // SAFETY: walking the control messages the kernel filled in.
    unsafe {
        let mut header = libc::CMSG_FIRSTHDR(&message);
        while !header.is_null() {
            if (*header).cmsg_level == libc::SOL_SOCKET && (*header).cmsg_type == libc::SCM_RIGHTS {
                let raw = std::ptr::read_unaligned(libc::CMSG_DATA(header).cast::<RawFd>());
                fd = Some(OwnedFd::from_raw_fd(raw));
            }
            header = libc::CMSG_NXTHDR(&message, header);
        }
    }
    Ok((bytes, fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_descriptors_cross_a_socketpair() {
        let mut fds = [0; 2];
        assert_eq!(unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0, fds.as_mut_ptr()) }, 0);
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let file = std::fs::File::open("/proc/self/status").unwrap();
        let passed = OwnedFd::from(file);
        send(&a, b"hello", Some(&passed)).unwrap();
        let (bytes, fd) = receive(&b).unwrap();
        assert_eq!(bytes, b"hello");
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::fs::File::from(fd.unwrap()), &mut text).unwrap();
        assert!(text.contains("Name:"));
        send(&a, &serde_json::to_vec(&Envelope { id: 7, body: "answer" }).unwrap(), None).unwrap();
        let (bytes, fd) = receive(&b).unwrap();
        let envelope: Envelope<String> = serde_json::from_slice(&bytes).unwrap();
        assert!(envelope.id == 7 && envelope.body == "answer" && fd.is_none());
        drop(a);
        assert!(receive(&b).unwrap().0.is_empty(), "a closed end reads as empty");
    }
}
