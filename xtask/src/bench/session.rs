//! The lab, held exclusively for the whole run, and Ctrl-C.

#[allow(unused_imports)]
use super::*;

/// The lab lock every lab user takes (the integration tests' LabGuard,
/// `cargo xtask lab`), held for the whole benchmark.
pub(super) fn lock_lab() -> Result<fs::File> {
    let lock = fs::File::create(LOCK_FILE).with_context(|| format!("creating {LOCK_FILE}"))?;
    // SAFETY: flock on a file we own; released when it is closed.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        eprintln!("bench: the lab is in use (integration tests?); waiting for {LOCK_FILE}");
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            bail!("locking the lab: {}", std::io::Error::last_os_error());
        }
    }
    Ok(lock)
}

/// The lab with its delay line off; taken down when dropped, also on error.
pub(super) struct LabSession {
    pub(super) up: bool,
}

impl LabSession {
    pub(super) fn up() -> Result<Self> {
        Self::up_with(lab::LabOptions { delay_ms: 0, ..lab::LabOptions::default() })
    }

    pub(super) fn up_with(options: lab::LabOptions) -> Result<Self> {
        lab::up(&options)?;
        Ok(Self { up: true })
    }

    pub(super) fn down(mut self) -> Result<()> {
        self.up = false;
        lab::down()
    }
}

impl Drop for LabSession {
    fn drop(&mut self) {
        if self.up
            && let Err(err) = lab::down()
        {
            eprintln!("bench: warning: taking the lab down failed: {err:#}");
        }
    }
}

pub(super) static INTERRUPTED: AtomicBool = AtomicBool::new(false);

pub(super) extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C ends the benchmark at the next step, through the normal cleanup
/// (lab down, sysctl restored) instead of killing it mid-way.
pub(super) fn install_sigint_handler() {
    // SAFETY: the handler only stores to an atomic.
    unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
}

pub(super) fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}
