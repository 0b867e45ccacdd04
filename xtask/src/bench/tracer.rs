//! The tracer processes: wgtrace, the bpftrace baseline and the floor's
//! empty programs, started, waited for and stopped; background helpers.

#[allow(unused_imports)]
use super::*;

pub(super) type Lines = Arc<Mutex<Vec<String>>>;

pub(super) fn collect_lines(stream: impl Read + Send + 'static) -> (Lines, JoinHandle<()>) {
    let lines: Lines = Arc::default();
    let sink = lines.clone();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            sink.lock().expect("lines").push(line);
        }
    });
    (lines, reader)
}

/// wgtrace (`run --json -v`), the bpftrace baseline or the floor's empty
/// programs, running in the root namespace (all see every namespace).
pub(super) struct Tracer {
    pub(super) condition: Condition,
    pub(super) child: Child,
    pub(super) stdout: Lines,
    pub(super) stderr: Lines,
    pub(super) readers: Vec<JoinHandle<()>>,
}

impl Tracer {
    pub(super) fn start(condition: Condition, wgtrace: &Path) -> Result<Self> {
        let mut command = match condition {
            Condition::Wgtrace => {
                let mut command = Command::new(wgtrace);
                command.args(["run", "--json", "-v"]).env_remove("RUST_LOG");
                command
            }
            Condition::Bpftrace => {
                let mut command = Command::new("bpftrace");
                command.args(["-e", BASELINE_SCRIPT]);
                command
            }
            Condition::Floor => {
                let mut command = Command::new(std::env::current_exe().context("finding the xtask binary")?);
                command.arg("empty-hooks").args(WGTRACE_PROGRAMS);
                command
            }
            Condition::Untraced => bail!("no tracer for the untraced condition"),
        };
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", condition.label()))?;
        let (stdout, out_reader) = collect_lines(child.stdout.take().expect("piped"));
        let (stderr, err_reader) = collect_lines(child.stderr.take().expect("piped"));
        Ok(Self { condition, child, stdout, stderr, readers: vec![out_reader, err_reader] })
    }

    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(super) fn stderr_text(&self) -> String {
        self.stderr.lock().expect("lines").join("\n")
    }

    pub(super) fn bail_if_exited(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited early ({status}):\n{}", self.condition.label(), self.stderr_text());
        }
        Ok(())
    }

    /// Until the programs are attached: wgtrace logs each hook, bpftrace and
    /// the floor print "Attaching"; all then hold their programs' fds.
    pub(super) fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.bail_if_exited()?;
            let ready = match self.condition {
                Condition::Wgtrace => {
                    let hooks = self.stderr.lock().expect("lines").iter().filter(|l| l.contains(" hook ")).count();
                    hooks >= WGTRACE_PROGRAMS.len()
                }
                _ => self.stdout.lock().expect("lines").iter().any(|l| l.starts_with("Attaching")),
            };
            if ready && !bpf_ids(self.pid(), "prog_id").is_empty() {
                for line in self.stderr.lock().expect("lines").iter() {
                    if line.contains(" hook ") && line.ends_with("inactive") {
                        eprintln!("bench: warning: {line}");
                    }
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{} did not attach within {timeout:?}:\n{}", self.condition.label(), self.stderr_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The `first verdict after N ms` that `wgtrace run -v` logs, or None
    /// when none came within `timeout`.
    pub(super) fn first_verdict_ms(&mut self, timeout: Duration) -> Result<Option<u64>> {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self.stderr.lock().expect("lines").iter().find_map(|line| {
                line.split_once("first verdict after ")?.1.split_whitespace().next()?.parse::<u64>().ok()
            });
            if found.is_some() {
                return Ok(found);
            }
            self.bail_if_exited()?;
            if Instant::now() > deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the tracer the way a user would (wgtrace: SIGTERM, then it
    /// prints its report; bpftrace: SIGINT) and returns its stdout.
    pub(super) fn stop(mut self) -> Result<String> {
        let signal = if self.condition == Condition::Wgtrace { libc::SIGTERM } else { libc::SIGINT };
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid() as i32, signal) };
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                bail!("{} did not exit within 30 s of being stopped", self.condition.label());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        for reader in std::mem::take(&mut self.readers) {
            let _ = reader.join();
        }
        if self.condition == Condition::Wgtrace {
            anyhow::ensure!(status.success(), "wgtrace exited with {status}:\n{}", self.stderr_text());
        }
        Ok(self.stdout.lock().expect("lines").join("\n"))
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A helper process killed when dropped (iperf3 servers, ping).
pub(super) struct Background(Child);

impl Background {
    pub(super) fn spawn(program: &str, args: &[&str]) -> Result<Self> {
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {program} {}", args.join(" ")))?;
        Ok(Self(child))
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
