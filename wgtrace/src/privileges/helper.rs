//! The privileged helper of `--drop-privileges` (OpenSSH's monitor, in
//! small): wgtrace re-executes itself with [`ENV`] naming one end of a
//! `SOCK_SEQPACKET` socketpair, and the child serves five requests, each
//! answered with plain facts or one file descriptor (SCM_RIGHTS):
//!
//! - the network namespaces (inode, `ip netns` name, a handle path);
//! - the processes holding TUN devices (PID, namespace, device name, read
//!   from `/proc/PID/fd` links and `fdinfo`, which the kernel writes);
//! - a netlink socket (route, generic or sock_diag only) opened inside a namespace;
//! - a daemon's UAPI socket, resolved inside its root, connected and checked
//!   to be served by the TUN holder (nothing is sent on it);
//! - the UDP sockets of a TUN holder (candidate speakers).
//!
//! Requests carry an id and are served concurrently, each on a thread of
//! its own, so that one that blocks (a daemon whose listen backlog is full,
//! a path walk through a mount that never answers) holds up no other:
//! answers come back in any order. At most [`MAX_TOUCHING`] requests that
//! touch other processes' sockets and [`MAX_HOST`] others are under way at
//! once; beyond that a request is refused at once ("busy"). A UAPI request
//! has a deadline, enforced here too (a non-blocking connect bounded by it)
//! and again by the caller, which stops waiting and reports the daemon
//! unreadable.
//!
//! The helper never reads a byte another process wrote to a socket, parses
//! no netlink answer but the kernel's own sock_diag reply naming a UAPI
//! socket's owner, and takes requests only from its parent, whose
//! requests it validates (namespace handles, interface names, protocols).
//! It exits when the parent closes its end, and is killed if the parent dies.

use std::{
    collections::HashMap,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
        unix::process::CommandExt as _,
    },
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use super::channel::{Envelope, MAX_MESSAGE, receive, send};
use crate::topology::{
    Netns, Privileged,
    access::{Direct, TunHolder},
    uapi,
};

/// Set (to the descriptor number) in the helper's environment.
pub const ENV: &str = "WGTRACE_PRIVSEP_FD";
/// Requests that touch other processes' sockets or roots (UAPI sockets, UDP
/// sockets) under way at once in the helper: as many as discovery runs.
pub const MAX_TOUCHING: usize = 32;
/// Other requests (namespaces, TUN holders, netlink sockets) under way at
/// once: kept apart, so stuck UAPI requests never starve them.
pub const MAX_HOST: usize = 8;
/// How long the caller waits for an answer that has no deadline of its own.
const HOST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long past a UAPI request's own deadline the caller still waits (the
/// helper enforces the deadline itself; this covers a path walk that hangs).
const UAPI_GRACE: Duration = Duration::from_millis(250);

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Request {
    Namespaces,
    TunHolders,
    NetnsSocket { handle: PathBuf, inode: u64, protocol: i32 },
    UapiSocket { pid: u32, interface: String, timeout_ms: u64 },
    UdpSockets { pid: u32 },
}

impl Request {
    /// Whether it touches other processes' sockets or roots, where a
    /// hostile process can make it slow.
    fn touches_processes(&self) -> bool {
        matches!(self, Self::UapiSocket { .. } | Self::UdpSockets { .. })
    }
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

type Answer = (Response, Option<OwnedFd>);

/// Callers waiting for answers, by request id.
type Waiting = Mutex<HashMap<u64, mpsc::SyncSender<Answer>>>;

/// The unprivileged side's handle on the helper. Any number of threads may
/// call it at once; one reader thread (started by the first call, after the
/// privilege drop) hands each answer to the caller waiting for its id.
pub struct Client {
    socket: Arc<OwnedFd>,
    pid: u32,
    child: Mutex<Option<std::process::Child>>,
    closed: AtomicBool,
    /// Set by the reader when the channel ends.
    gone: Arc<AtomicBool>,
    next_id: AtomicU64,
    waiting: Arc<Waiting>,
    reader: OnceLock<std::result::Result<(), String>>,
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
        let client = Self::over(ours, child.id(), Some(child));
        // Read here, before any thread exists (the reader starts later).
        let (bytes, _) = receive(&client.socket).context("reading the privileged helper's first answer")?;
        anyhow::ensure!(!bytes.is_empty(), "the privileged helper exited as it started");
        let ready: Envelope<Response> =
            serde_json::from_slice(&bytes).context("unreadable answer from the privileged helper")?;
        match ready.body {
            Response::Ready => Ok(client),
            Response::Failed(reason) => bail!("the privileged helper failed to start: {reason}"),
            other => bail!("the privileged helper said {other:?} instead of ready"),
        }
    }

    /// A client on one end of the channel (the helper, `pid`, on the other).
    fn over(socket: OwnedFd, pid: u32, child: Option<std::process::Child>) -> Self {
        Self {
            socket: Arc::new(socket),
            pid,
            child: Mutex::new(child),
            closed: Default::default(),
            gone: Default::default(),
            next_id: AtomicU64::new(1),
            waiting: Default::default(),
            reader: OnceLock::new(),
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
        self.closed.store(true, Ordering::Relaxed);
        // SAFETY: shutdown(2) on the descriptor this client owns; the reader
        // then sees the end and every waiting caller gets an error.
        unsafe { libc::shutdown(self.socket.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(mut child) = self.child.lock().ok().and_then(|mut c| c.take()) {
            let deadline = Instant::now() + Duration::from_millis(500);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    /// Starts the reader on first use: after the privilege drop (which
    /// refuses to run with a second thread), so it holds no more than the
    /// rest of the process.
    fn ensure_reader(&self) -> Result<()> {
        let started = self.reader.get_or_init(|| {
            let (socket, waiting, gone) = (Arc::clone(&self.socket), Arc::clone(&self.waiting), Arc::clone(&self.gone));
            std::thread::Builder::new()
                .name("wgtrace-helper".into())
                .spawn(move || read_answers(&socket, &waiting, &gone))
                .map(drop)
                .map_err(|err| format!("starting the helper channel's reader: {err}"))
        });
        started.clone().map_err(anyhow::Error::msg)
    }

    /// Sends `request` and waits at most `timeout` for its answer; other
    /// requests go on meanwhile. A late answer is dropped (with its
    /// descriptor) by the reader.
    fn call(&self, request: Request, timeout: Duration) -> Result<Answer> {
        self.ensure_reader()?;
        anyhow::ensure!(!self.gone.load(Ordering::Relaxed), "the privileged helper exited");
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = mpsc::sync_channel(1);
        self.waiting.lock().map_err(|_| anyhow::anyhow!("helper channel poisoned"))?.insert(id, sender);
        let forget = || {
            if let Ok(mut waiting) = self.waiting.lock() {
                waiting.remove(&id);
            }
        };
        let bytes = serde_json::to_vec(&Envelope { id, body: request })?;
        if let Err(err) = send(&self.socket, &bytes, None) {
            forget();
            return Err(err).context("asking the privileged helper");
        }
        match receiver.recv_timeout(timeout) {
            Ok((Response::Failed(reason), _)) => Err(anyhow::anyhow!(reason)),
            Ok(answer) => Ok(answer),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                forget();
                bail!("the privileged helper did not answer within {} ms", timeout.as_millis())
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => bail!("the privileged helper exited"),
        }
    }
}

/// The reader: hands each answer to the caller waiting for its id, until the
/// channel ends; then every waiting caller learns that the helper is gone.
fn read_answers(socket: &OwnedFd, waiting: &Waiting, gone: &AtomicBool) {
    loop {
        let message = receive(socket);
        let (bytes, fd) = match message {
            Ok((bytes, fd)) if !bytes.is_empty() => (bytes, fd),
            _ => break,
        };
        let Ok(answer) = serde_json::from_slice::<Envelope<Response>>(&bytes) else {
            log::debug!("an unreadable answer from the privileged helper was dropped");
            continue;
        };
        let caller = waiting.lock().ok().and_then(|mut w| w.remove(&answer.id));
        // Nobody waiting (it gave up): the descriptor is closed here.
        if let Some(caller) = caller {
            let _ = caller.try_send((answer.body, fd));
        }
    }
    gone.store(true, Ordering::Relaxed);
    if let Ok(mut waiting) = waiting.lock() {
        waiting.clear(); // their receivers now report the helper gone
    }
}

impl Privileged for Client {
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    fn namespaces(&self) -> Result<Vec<Netns>> {
        match self.call(Request::Namespaces, HOST_TIMEOUT)? {
            (Response::Namespaces(namespaces), _) => Ok(namespaces),
            (other, _) => bail!("the privileged helper answered {other:?}"),
        }
    }

    fn tun_holders(&self) -> Result<Vec<TunHolder>> {
        match self.call(Request::TunHolders, HOST_TIMEOUT)? {
            (Response::TunHolders(holders), _) => Ok(holders),
            (other, _) => bail!("the privileged helper answered {other:?}"),
        }
    }

    fn netns_socket(&self, handle: &Path, inode: u64, protocol: i32) -> Result<OwnedFd> {
        match self.call(Request::NetnsSocket { handle: handle.to_owned(), inode, protocol }, HOST_TIMEOUT)? {
            (Response::Descriptor, Some(fd)) => Ok(fd),
            (other, _) => bail!("the privileged helper answered {other:?} without a socket"),
        }
    }

    fn uapi_socket(&self, pid: u32, interface: &str, timeout: Duration) -> Result<Option<OwnedFd>> {
        let timeout = timeout.min(uapi::DEADLINE);
        let request =
            Request::UapiSocket { pid, interface: interface.to_owned(), timeout_ms: timeout.as_millis() as u64 };
        match self.call(request, timeout + UAPI_GRACE)? {
            (Response::Descriptor, Some(fd)) => Ok(Some(fd)),
            (Response::NoSocket, _) => Ok(None),
            (other, _) => bail!("the privileged helper answered {other:?} without a socket"),
        }
    }

    fn udp_sockets(&self, pid: u32) -> Result<Vec<crate::topology::speakers::UdpSocket>> {
        match self.call(Request::UdpSockets { pid }, HOST_TIMEOUT)? {
            (Response::UdpSockets(sockets), _) => Ok(sockets),
            (other, _) => bail!("the privileged helper answered {other:?}"),
        }
    }
}

/// The helper's descriptor, when this process was started as the helper.
pub fn started_as_helper() -> Option<RawFd> {
    std::env::var(ENV).ok()?.parse().ok()
}

/// Sends one answer (`id`'s).
fn reply(socket: &OwnedFd, id: u64, response: Response, fd: Option<&OwnedFd>) -> Result<()> {
    send(socket, &serde_json::to_vec(&Envelope { id, body: response })?, fd)
}

/// The helper's whole life: drop to what it needs, then serve until the
/// parent closes the channel. Returns the exit status.
pub fn serve(fd: RawFd) -> u8 {
    // SAFETY: the parent passed us this descriptor; it is ours alone now.
    let socket = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
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
        let _ = reply(&socket, 0, Response::Failed(format!("{err:#}")), None);
        return 2;
    }
    if reply(&socket, 0, Response::Ready, None).is_err() {
        return 2;
    }
    serve_requests(&socket, answer)
}

/// Serves requests until the parent closes the channel, each on a thread of
/// its own that answers with `answer`.
fn serve_requests(socket: &Arc<OwnedFd>, answer: fn(Request, Instant) -> Answer) -> u8 {
    // Requests under way: [touching other processes, the rest].
    let under_way: Arc<[AtomicUsize; 2]> = Arc::default();
    loop {
        let Ok((bytes, _)) = receive(socket) else { return 2 };
        if bytes.is_empty() {
            return 0; // the parent is done; threads still stuck die with us
        }
        let Ok(Envelope { id, body: request }) = serde_json::from_slice::<Envelope<Request>>(&bytes) else {
            // Without an id nobody waits for an answer: the caller times out.
            continue;
        };
        let received = Instant::now();
        let (class, limit) = if request.touches_processes() { (0, MAX_TOUCHING) } else { (1, MAX_HOST) };
        if under_way[class].fetch_add(1, Ordering::AcqRel) >= limit {
            under_way[class].fetch_sub(1, Ordering::AcqRel);
            let busy = format!("the privileged helper is busy with {limit} such requests; asked again later");
            if reply(socket, id, Response::Failed(busy), None).is_err() {
                return 2;
            }
            continue;
        }
        let (worker_socket, worker_count) = (Arc::clone(socket), Arc::clone(&under_way));
        let spawned = std::thread::Builder::new().name("helper-request".into()).spawn(move || {
            let (response, descriptor) = answer(request, received);
            // A failed send means the parent is gone: the main loop ends too.
            let _ = reply(&worker_socket, id, response, descriptor.as_ref());
            worker_count[class].fetch_sub(1, Ordering::AcqRel);
        });
        if let Err(err) = spawned {
            under_way[class].fetch_sub(1, Ordering::AcqRel);
            if reply(socket, id, Response::Failed(format!("starting a helper thread: {err}")), None).is_err() {
                return 2;
            }
        }
    }
}

fn answer(request: Request, received: Instant) -> Answer {
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
        // Direct checks that PID holds the TUN device and serves the socket,
        // and bounds the connect by the deadline (counted from receipt).
        Request::UapiSocket { pid, interface, timeout_ms } => {
            let timeout = Duration::from_millis(timeout_ms).min(uapi::DEADLINE);
            match Direct.uapi_socket(pid, &interface, timeout) {
                // A path walk outlived the deadline: the caller has given up.
                Ok(Some(_)) if received.elapsed() > timeout => {
                    failed(anyhow::anyhow!("no socket within {} ms", timeout.as_millis()))
                }
                Ok(Some(fd)) => (Response::Descriptor, Some(fd)),
                Ok(None) => (Response::NoSocket, None),
                Err(err) => failed(err),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stands in for the privileged work: UDP sockets of PID 1 and UAPI
    /// sockets take 600 ms (a hostile daemon), everything else is instant.
    fn slow_for_some(request: Request, _: Instant) -> Answer {
        match request {
            Request::UdpSockets { pid: 1 } | Request::UapiSocket { .. } => {
                std::thread::sleep(Duration::from_millis(600));
                (Response::UdpSockets(Vec::new()), None)
            }
            Request::UdpSockets { .. } => (Response::UdpSockets(Vec::new()), None),
            _ => (Response::Namespaces(Vec::new()), None),
        }
    }

    #[test]
    fn a_slow_request_holds_up_no_other_and_times_out_alone() {
        let mut fds = [0; 2];
        assert_eq!(unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0, fds.as_mut_ptr()) }, 0);
        let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let theirs = Arc::new(theirs);
        let helper = std::thread::spawn(move || serve_requests(&theirs, slow_for_some));
        let client = Arc::new(Client::over(ours, 0, None));
        // Slow requests under way in the helper...
        let slow: Vec<_> = (0..4)
            .map(|_| {
                let client = Arc::clone(&client);
                std::thread::spawn(move || {
                    let started = Instant::now();
                    client.udp_sockets(1).unwrap();
                    started.elapsed()
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(50));
        // ...hold up neither other kinds of request nor the same kind.
        let started = Instant::now();
        client.namespaces().unwrap();
        client.udp_sockets(2).unwrap();
        assert!(started.elapsed() < Duration::from_millis(300), "took {:?}", started.elapsed());
        // The slow ones ran at once, not one after another.
        for slow in slow {
            let took = slow.join().unwrap();
            assert!(took < Duration::from_millis(1500), "four 600 ms requests took {took:?}");
        }
        // The caller stops waiting at its deadline (plus the grace), and the
        // late answer is dropped without disturbing the next request.
        let started = Instant::now();
        let err = client.uapi_socket(7, "wg0", Duration::from_millis(100)).unwrap_err();
        let took = started.elapsed();
        assert!(format!("{err:#}").contains("did not answer within"), "{err:#}");
        assert!(took < Duration::from_millis(550), "gave up after {took:?}");
        std::thread::sleep(Duration::from_millis(600));
        client.namespaces().unwrap();
        // Closing the channel ends the helper.
        client.end();
        assert_eq!(helper.join().unwrap(), 0);
        assert!(format!("{:#}", client.namespaces().unwrap_err()).contains("exited"));
    }

    #[test]
    fn requests_over_the_bound_are_refused_at_once() {
        let mut fds = [0; 2];
        assert_eq!(unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0, fds.as_mut_ptr()) }, 0);
        let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let theirs = Arc::new(theirs);
        std::thread::spawn(move || serve_requests(&theirs, slow_for_some));
        let client = Arc::new(Client::over(ours, 0, None));
        let slow: Vec<_> = (0..MAX_TOUCHING)
            .map(|_| {
                let client = Arc::clone(&client);
                std::thread::spawn(move || client.udp_sockets(1))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(200));
        let started = Instant::now();
        let err = client.udp_sockets(1).unwrap_err();
        assert!(format!("{err:#}").contains("busy"), "{err:#}");
        assert!(started.elapsed() < Duration::from_millis(300));
        // Other kinds still have room.
        client.namespaces().unwrap();
        assert!(slow.into_iter().all(|s| s.join().unwrap().is_ok()));
        client.end();
    }
}
