//! The privileged helper of `--drop-privileges` (OpenSSH's monitor, in
//! small): wgtrace re-executes itself with [`ENV`] naming one end of a
//! `SOCK_SEQPACKET` socketpair, and the child serves four requests, each
//! answered with plain facts or one file descriptor (SCM_RIGHTS):
//!
//! - the network namespaces (inode, `ip netns` name, a handle path);
//! - the processes holding TUN devices (PID, namespace, device name, read
//!   from `/proc/PID/fd` links and `fdinfo`, which the kernel writes);
//! - a netlink socket (route, generic or sock_diag only) opened inside a namespace;
//! - a daemon's UAPI socket, resolved inside its root, connected and checked
//!   to be served by the TUN holder (nothing is sent on it).
//!
//! The helper never reads a byte another process wrote to a socket, never
//! parses a netlink answer, and takes requests only from its parent, whose
//! requests it validates (namespace handles, interface names, protocols).
//! It exits when the parent closes its end, and is killed if the parent dies.

use std::{
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
        unix::process::CommandExt as _,
    },
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Mutex,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use crate::topology::{
    Netns, Privileged,
    access::{Direct, TunHolder},
};

/// Set (to the descriptor number) in the helper's environment.
pub const ENV: &str = "WGTRACE_PRIVSEP_FD";
/// Largest request or answer.
const MAX_MESSAGE: usize = 4 << 20;

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Request {
    Namespaces,
    TunHolders,
    NetnsSocket { handle: PathBuf, inode: u64, protocol: i32 },
    UapiSocket { pid: u32, interface: String, timeout_ms: u64 },
    UdpSockets { pid: u32 },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Response {
    Ready,
    Namespaces(Vec<Netns>),
    TunHolders(Vec<TunHolder>),
    UdpSockets(Vec<crate::topology::speakers::UdpSocket>),
    /// The descriptor travels alongside.
    Descriptor,
    NoSocket,
    Failed(String),
}

/// The unprivileged side's handle on the helper.
pub struct Client {
    socket: Mutex<OwnedFd>,
    /// The channel's number, to shut it down without its lock.
    raw_socket: RawFd,
    pid: u32,
    child: Mutex<Option<std::process::Child>>,
    closed: std::sync::atomic::AtomicBool,
}

impl Client {
    /// Starts the helper. Call it while this process still has every
    /// privilege the helper needs, and has a single thread.
    pub fn spawn() -> Result<Self> {
        let mut fds = [0; 2];
        // SAFETY: socketpair into an array of two ints.
        if unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) }
            != 0
        {
            return Err(std::io::Error::last_os_error()).context("creating the helper's socketpair");
        }
        // SAFETY: two fresh descriptors, owned from here on.
        let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // Only the helper's end is inherited, and only by the helper.
        // SAFETY: fcntl on a descriptor we own.
        unsafe { libc::fcntl(theirs.as_raw_fd(), libc::F_SETFD, 0) };
        let child = Command::new("/proc/self/exe")
            .arg0("wgtrace-privileged-helper")
            .env(ENV, theirs.as_raw_fd().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the privileged helper")?;
        drop(theirs);
        let client = Self {
            raw_socket: ours.as_raw_fd(),
            socket: Mutex::new(ours),
            pid: child.id(),
            child: Mutex::new(Some(child)),
            closed: Default::default(),
        };
        let ready = client.receive(&client.socket.lock().expect("fresh mutex"))?;
        match ready {
            (Response::Ready, _) => Ok(client),
            (Response::Failed(reason), _) => bail!("the privileged helper failed to start: {reason}"),
            (other, _) => bail!("the privileged helper said {other:?} instead of ready"),
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Ends the helper at the end of a run: it exits when its channel
    /// closes (a signal would not do: it runs as root, this process as
    /// nobody). Waits at most 500 ms for it; were this process to die
    /// instead, PDEATHSIG kills it.
    pub fn end(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::Relaxed);
        // Without taking the channel's lock: a discovery may hold it.
        // SAFETY: shutdown(2) on the descriptor this client owns.
        unsafe { libc::shutdown(self.raw_socket, libc::SHUT_RDWR) };
        if let Some(mut child) = self.child.lock().ok().and_then(|mut c| c.take()) {
            let deadline = std::time::Instant::now() + Duration::from_millis(500);
            while matches!(child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    fn call(&self, request: &Request) -> Result<(Response, Option<OwnedFd>)> {
        let socket = self.socket.lock().map_err(|_| anyhow::anyhow!("helper channel poisoned"))?;
        send(&socket, &serde_json::to_vec(request)?, None).context("asking the privileged helper")?;
        match self.receive(&socket)? {
            (Response::Failed(reason), _) => Err(anyhow::anyhow!(reason)),
            answer => Ok(answer),
        }
    }

    fn receive(&self, socket: &OwnedFd) -> Result<(Response, Option<OwnedFd>)> {
        let (bytes, fd) = receive(socket).context("reading the privileged helper's answer")?;
        anyhow::ensure!(!bytes.is_empty(), "the privileged helper exited");
        Ok((serde_json::from_slice(&bytes).context("unreadable answer from the privileged helper")?, fd))
    }
}

impl Privileged for Client {
    fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn namespaces(&self) -> Result<Vec<Netns>> {
        match self.call(&Request::Namespaces)? {
            (Response::Namespaces(namespaces), _) => Ok(namespaces),
            (other, _) => bail!("the privileged helper answered {other:?}"),
        }
    }

    fn tun_holders(&self) -> Result<Vec<TunHolder>> {
        match self.call(&Request::TunHolders)? {
            (Response::TunHolders(holders), _) => Ok(holders),
            (other, _) => bail!("the privileged helper answered {other:?}"),
        }
    }

    fn netns_socket(&self, handle: &Path, inode: u64, protocol: i32) -> Result<OwnedFd> {
        match self.call(&Request::NetnsSocket { handle: handle.to_owned(), inode, protocol })? {
            (Response::Descriptor, Some(fd)) => Ok(fd),
            (other, _) => bail!("the privileged helper answered {other:?} without a socket"),
        }
    }

    fn uapi_socket(&self, pid: u32, interface: &str, timeout: Duration) -> Result<Option<OwnedFd>> {
        let request =
            Request::UapiSocket { pid, interface: interface.to_owned(), timeout_ms: timeout.as_millis() as u64 };
        match self.call(&request)? {
            (Response::Descriptor, Some(fd)) => Ok(Some(fd)),
            (Response::NoSocket, _) => Ok(None),
            (other, _) => bail!("the privileged helper answered {other:?} without a socket"),
        }
    }

    fn udp_sockets(&self, pid: u32) -> Result<Vec<crate::topology::speakers::UdpSocket>> {
        match self.call(&Request::UdpSockets { pid })? {
            (Response::UdpSockets(sockets), _) => Ok(sockets),
            (other, _) => bail!("the privileged helper answered {other:?}"),
        }
    }
}

/// The helper's descriptor, when this process was started as the helper.
pub fn started_as_helper() -> Option<RawFd> {
    std::env::var(ENV).ok()?.parse().ok()
}

/// The helper's whole life: drop to what it needs, then serve until the
/// parent closes the channel. Returns the exit status.
pub fn serve(fd: RawFd) -> u8 {
    // SAFETY: the parent passed us this descriptor; it is ours alone now.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: prctl and fcntl with integer arguments.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
    }
    // Answers may be large (many namespaces): let one fit in the buffer.
    let size = MAX_MESSAGE as libc::c_int;
    // SAFETY: setsockopt with an int we own.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDBUFFORCE,
            (&size as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if let Err(err) = super::drop_to_helper() {
        let _ = send(&socket, &serde_json::to_vec(&Response::Failed(format!("{err:#}"))).unwrap_or_default(), None);
        return 2;
    }
    if send(&socket, &serde_json::to_vec(&Response::Ready).unwrap_or_default(), None).is_err() {
        return 2;
    }
    loop {
        let Ok((bytes, _)) = receive(&socket) else { return 2 };
        if bytes.is_empty() {
            return 0; // the parent is done
        }
        let (response, descriptor) = match serde_json::from_slice::<Request>(&bytes) {
            Ok(request) => answer(request),
            Err(_) => (Response::Failed("unreadable request".into()), None),
        };
        let Ok(bytes) = serde_json::to_vec(&response) else { return 2 };
        if send(&socket, &bytes, descriptor.as_ref()).is_err() {
            return 2;
        }
    }
}

fn answer(request: Request) -> (Response, Option<OwnedFd>) {
    let failed = |err: anyhow::Error| (Response::Failed(format!("{err:#}")), None);
    match request {
        Request::Namespaces => Direct.namespaces().map_or_else(failed, |n| (Response::Namespaces(n), None)),
        Request::TunHolders => Direct.tun_holders().map_or_else(failed, |h| (Response::TunHolders(h), None)),
        // Direct checks that PID holds a TUN device.
        Request::UdpSockets { pid } => Direct.udp_sockets(pid).map_or_else(failed, |s| (Response::UdpSockets(s), None)),
        // Direct validates the handle and the protocol.
        Request::NetnsSocket { handle, inode, protocol } => {
            Direct.netns_socket(&handle, inode, protocol).map_or_else(failed, |fd| (Response::Descriptor, Some(fd)))
        }
        // Direct checks that PID holds the TUN device and serves the socket.
        Request::UapiSocket { pid, interface, timeout_ms } => {
            match Direct.uapi_socket(pid, &interface, Duration::from_millis(timeout_ms)) {
                Ok(Some(fd)) => (Response::Descriptor, Some(fd)),
                Ok(None) => (Response::NoSocket, None),
                Err(err) => failed(err),
            }
        }
    }
}

/// Sends one message, with `fd` attached if given.
fn send(socket: &OwnedFd, bytes: &[u8], fd: Option<&OwnedFd>) -> Result<()> {
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
fn receive(socket: &OwnedFd) -> Result<(Vec<u8>, Option<OwnedFd>)> {
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
        send(&a, &serde_json::to_vec(&Response::NoSocket).unwrap(), None).unwrap();
        let (bytes, fd) = receive(&b).unwrap();
        assert!(matches!(serde_json::from_slice(&bytes).unwrap(), Response::NoSocket) && fd.is_none());
        drop(a);
        assert!(receive(&b).unwrap().0.is_empty(), "a closed end reads as empty");
    }
}
