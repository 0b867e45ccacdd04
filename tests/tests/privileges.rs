//! Without privileges wgtrace says exactly what it needs and exits 2; it
//! never half-attaches. With `--drop-privileges` the tracer (every thread)
//! is user nobody without CAP_SYS_ADMIN, CAP_BPF or CAP_PERFMON, its helper
//! keeps only what discovery needs, and tunnels created afterwards still get
//! their verdicts.

use std::process::Command;

use wgtrace_tests::{privileged_or_skip, wgtrace_bin};

/// Runs wgtrace as `nobody` (a copy it can read), with `args`.
fn as_nobody(args: &[&str]) -> (i32, String, String) {
    // One copy per call: tests run in parallel, and writing a binary another
    // test is executing fails with "Text file busy".
    static COPIES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let copy = std::env::temp_dir().join(format!(
        "wgtrace-nobody-{}-{}",
        std::process::id(),
        COPIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::copy(wgtrace_bin(), &copy).unwrap();
    // A process another test forks in the moment between the copy's open and
    // close holds its write descriptor until it execs: executing the copy
    // then fails with ETXTBSY ("Text file busy") for that moment.
    let mut attempts = 0;
    let output = loop {
        let output = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"])
            .arg(&copy)
            .args(args)
            .output()
            .unwrap();
        attempts += 1;
        if output.status.code() == Some(126)
            && String::from_utf8_lossy(&output.stderr).contains("Text file busy")
            && attempts < 20
        {
            std::thread::sleep(std::time::Duration::from_millis(50));
            continue;
        }
        break output;
    };
    let _ = std::fs::remove_file(&copy);
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn run_without_privileges_names_what_is_missing() {
    if !privileged_or_skip("run_without_privileges_names_what_is_missing") {
        return;
    }
    let (code, _, stderr) = as_nobody(&["run", "--duration", "1"]);
    assert_eq!(code, 2, "{stderr}");
    for capability in ["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"] {
        assert!(stderr.contains(capability), "names {capability}: {stderr}");
    }
    assert!(stderr.contains("wgtrace check"), "suggests the eBPF-free alternative: {stderr}");
}

#[test]
fn check_without_privileges_says_it_is_incomplete() {
    if !privileged_or_skip("check_without_privileges_says_it_is_incomplete") {
        return;
    }
    let (code, stdout, stderr) = as_nobody(&["check"]);
    assert_eq!(code, 2, "could not check everything: {stdout}{stderr}");
    assert!(stdout.contains("run as root"), "{stdout}");
    assert!(!stdout.contains("healthy:"), "must not claim health it could not check: {stdout}");
}

const CAP_SYS_ADMIN: u64 = 1 << 21;
const CAP_PERFMON: u64 = 1 << 38;
const CAP_BPF: u64 = 1 << 39;

/// (thread id, field) -> value of every `Cap*:` and `Uid:` line of every
/// thread of `pid`.
fn thread_credentials(pid: u32) -> Vec<(String, String, String)> {
    let mut found = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else { continue };
        for line in status.lines() {
            if let Some((field, value)) = line.split_once(':')
                && (field.starts_with("Cap") || field == "Uid")
            {
                found.push((
                    task.file_name().to_string_lossy().into_owned(),
                    field.to_owned(),
                    value.trim().to_owned(),
                ));
            }
        }
    }
    found
}

fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect()
}

#[test]
fn dropped_privileges_still_trace() {
    if !privileged_or_skip("dropped_privileges_still_trace") {
        return;
    }
    use wgtrace_tests::{LabGuard, Trace, Traffic, client_peer, lab};
    let _lab = LabGuard::up(&lab::LabOptions::default()).unwrap();
    let _traffic = Traffic::ping(lab::WG1_REMOTE).unwrap();
    let trace = Trace::start(
        if std::env::var_os("WGTRACE_LAB_WIREGUARD").is_some() { 40.0 } else { 12.0 },
        &["--drop-privileges", "-v"],
    )
    .unwrap();
    // Attaching takes a while (much longer under emulation in the VM); the
    // drop follows it, then discovery starts.
    let started = std::time::Instant::now();
    while !std::fs::read_to_string(format!("/proc/{}/status", trace.pid()))
        .is_ok_and(|s| s.lines().any(|l| l.starts_with("Uid:") && l.contains("65534")))
    {
        assert!(started.elapsed().as_secs() < 60, "the tracer never became nobody");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // Then the discovery thread starts.
    while std::fs::read_dir(format!("/proc/{}/task", trace.pid())).unwrap().count() < 2 {
        assert!(started.elapsed().as_secs() < 60, "no discovery thread after the drop");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    // The tracer: every thread (the discovery thread and UAPI queries too).
    let credentials = thread_credentials(trace.pid());
    let threads: std::collections::BTreeSet<_> = credentials.iter().map(|(t, _, _)| t.clone()).collect();
    assert!(threads.len() >= 2, "the discovery thread is among them: {credentials:?}");
    // Kernels before 5.19 with kernel.unprivileged_bpf_disabled refuse map
    // reads by fd without CAP_BPF: there (only) the tracer keeps CAP_BPF.
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut version = release.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse::<u32>().ok());
    let old_kernel = (version.next().unwrap(), version.next().unwrap()) < (5, 19)
        && std::fs::read_to_string("/proc/sys/kernel/unprivileged_bpf_disabled").unwrap().trim() != "0";
    // CAP_NET_ADMIN (12) only: kernel WireGuard's GET needs it of the sender.
    let allowed = if old_kernel { CAP_BPF | 1 << 12 } else { 1 << 12 };
    for (thread, field, value) in &credentials {
        if field == "Uid" {
            assert!(value.split_whitespace().all(|id| id == "65534"), "thread {thread} is user nobody: Uid {value}");
            continue;
        }
        if field == "CapAmb" || field == "CapInh" || field == "CapEff" || field == "CapPrm" || field == "CapBnd" {
            let caps = u64::from_str_radix(value, 16).unwrap();
            for (bit, name) in [(CAP_SYS_ADMIN, "CAP_SYS_ADMIN"), (CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")] {
                assert!(caps & bit & !allowed == 0, "thread {thread} {field} holds {name}: {value}");
            }
            assert_eq!(caps & !allowed, 0, "thread {thread} {field}: only NET_ADMIN: {value}");
        }
    }
    // The helper: root, with what discovery needs and no BPF capability.
    let helpers = children_of(trace.pid());
    assert_eq!(helpers.len(), 1, "one privileged helper: {helpers:?}");
    for (thread, field, value) in thread_credentials(helpers[0]) {
        if field == "CapEff" {
            let caps = u64::from_str_radix(&value, 16).unwrap();
            assert_eq!(caps & (CAP_BPF | CAP_PERFMON), 0, "helper thread {thread}: {value}");
            assert_ne!(caps & CAP_SYS_ADMIN, 0, "the helper keeps what entering namespaces needs: {value}");
        }
    }
    // A tunnel created after the drop is discovered (through the helper)
    // and gets its verdict from packets.
    lab::add_tunnel("wg2").unwrap();
    let _wg2 = Traffic::ping(lab::WG2_REMOTE).unwrap();
    let report = trace.report().unwrap();
    let wg1 = client_peer(&report, "wg1");
    assert_eq!(wg1["nested_in"], "wg0", "tracing, topology and verdicts still work: {wg1:#}");
    assert!(wg1["latency"]["inner_rtt_us"]["count"].as_u64().unwrap() > 0);
    let wg2 = client_peer(&report, "wg2");
    assert_eq!(wg2["nested_in"], "wg1", "a tunnel created after the drop gets its verdict: {wg2:#}");
    assert!(wg2["transport"]["packets"].as_u64().unwrap_or(0) > 0, "from packets: {wg2:#}");
    assert!(children_of(std::process::id()).iter().all(|p| !helpers.contains(p)));
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(!std::path::Path::new(&format!("/proc/{}", helpers[0])).exists(), "the helper ends with the run");
}

/// Holds TUN devices `PREFIX0` .. `PREFIX{N-1}` (argv[1], argv[2]) in its
/// network namespace, each with a UAPI socket that never accepts: listen
/// backlog 0, filled by a connection of its own, so every further connect
/// finds the queue full (EAGAIN, or blocks in a blocking connect). Plus
/// `PREFIXhang`, whose socket accepts and never answers.
const STALLING_HOLDER: &str = r#"
import fcntl, os, socket, struct, sys, time
prefix, count = sys.argv[1], int(sys.argv[2])
os.makedirs("/run/wireguard", exist_ok=True)
keep = []
def tun(name):
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, 0x400454ca, struct.pack("16sH", name.encode(), 0x0001 | 0x1000))
    keep.append(fd)
def listener(name, backlog):
    path = "/run/wireguard/%s.sock" % name
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(backlog)
    keep.append(server)
    return server, path
for i in range(count):
    name = "%s%d" % (prefix, i)
    tun(name)
    _, path = listener(name, 0)
    filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    filler.connect(path)
    keep.append(filler)
tun(prefix + "hang")
hang, _ = listener(prefix + "hang", 64)
print("ready", flush=True)
while True:
    keep.append(hang.accept()[0])
"#;

/// The stalling holder's devices: more than one round of requests to a
/// helper that serves one request at a time can take (each costs the whole
/// 1 s UAPI deadline).
const STALLING_DEVICES: usize = 24;

#[test]
fn dropped_privileges_discovery_survives_daemons_that_never_accept() {
    if !privileged_or_skip("dropped_privileges_discovery_survives_daemons_that_never_accept") {
        return;
    }
    use std::{
        io::Read as _,
        process::Stdio,
        time::{Duration, Instant},
    };

    use wgtrace_tests::{LabGuard, Traffic, client_peer, lab};
    const NETNS: &str = "wgtnb-stall";
    const PREFIX: &str = "nbstall";
    struct Cleanup(Option<std::process::Child>);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            if let Some(child) = &mut self.0 {
                let _ = child.kill();
                let _ = child.wait();
            }
            let _ = Command::new("ip").args(["netns", "del", NETNS]).status();
            for entry in std::fs::read_dir("/run/wireguard").into_iter().flatten().flatten() {
                if entry.file_name().to_string_lossy().starts_with(PREFIX) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
    }
    let _lab = LabGuard::up(&lab::LabOptions::default()).unwrap();
    let _traffic = Traffic::ping(lab::WG1_REMOTE).unwrap();
    let mut cleanup = Cleanup(None);
    let _ = Command::new("ip").args(["netns", "del", NETNS]).status();
    assert!(Command::new("ip").args(["netns", "add", NETNS]).status().unwrap().success());
    let mut holder = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{NETNS}"))
        .args(["python3", "-c", STALLING_HOLDER, PREFIX, &STALLING_DEVICES.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = [0u8; 6];
    holder.stdout.as_mut().unwrap().read_exact(&mut ready).unwrap();
    assert_eq!(&ready, b"ready\n");
    cleanup.0 = Some(holder);

    let slow = std::env::var_os("WGTRACE_LAB_WIREGUARD").is_some();
    let run = |args: &[&str]| {
        Command::new(wgtrace_bin())
            .args(["run", "--json", "--drop-privileges", "-v"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let finish = |child: std::process::Child| {
        let output = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(output.status.success(), "wgtrace exited with {}: {stderr}", output.status);
        let report: serde_json::Value =
            serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("no JSON report ({e}): {stderr}"));
        (report, stderr)
    };

    // A short run: startup waits for the first discovery only so long (the
    // hostile daemons' deadlines), and its report has the lab's verdicts.
    let started = Instant::now();
    let (report, stderr) = finish(run(&["--duration", "3"]));
    let short = started.elapsed().as_secs_f64();
    eprintln!("a 3 s run took {short:.2} s");
    assert!(short < if slow { 30.0 } else { 8.0 }, "a 3 s run took {short:.2} s: discovery held up startup\n{stderr}");
    assert_eq!(client_peer(&report, "wg1")["nested_in"], "wg0", "the first report has the lab's verdicts: {report:#}");

    // A long run: a tunnel created after startup is discovered through the
    // helper while the stalling daemons keep failing, and SIGTERM ends it.
    let child = run(&["--duration", "600"]);
    let pid = child.id();
    let started = Instant::now();
    while !std::fs::read_to_string(format!("/proc/{pid}/status"))
        .is_ok_and(|s| s.lines().any(|l| l.starts_with("Uid:") && l.contains("65534")))
    {
        assert!(started.elapsed().as_secs() < 60, "the tracer never became nobody");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    lab::add_tunnel("wg2").unwrap();
    let _wg2 = Traffic::ping(lab::WG2_REMOTE).unwrap();
    std::thread::sleep(Duration::from_secs(if slow { 20 } else { 6 }));
    let signalled = Instant::now();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let (report, stderr) = finish(child);
    let elapsed = signalled.elapsed().as_secs_f64();
    eprintln!("SIGTERM to exit: {elapsed:.3} s\n{stderr}");
    assert!(elapsed < 1.0, "SIGTERM must end the run within 1 s, took {elapsed:.3} s");
    let wg1 = client_peer(&report, "wg1");
    assert_eq!(wg1["nested_in"], "wg0", "the lab's verdict stays right: {wg1:#}");
    assert_eq!(client_peer(&report, "wg0")["transport"]["egress_interface"], "c0");
    let wg2 = client_peer(&report, "wg2");
    assert_eq!(wg2["nested_in"], "wg1", "a tunnel created after startup gets its verdict: {wg2:#}");
    assert!(wg2["transport"]["packets"].as_u64().unwrap_or(0) > 0, "from packets: {wg2:#}");
    // Every stalling daemon is reported unreadable, once (not every round).
    for name in (0..STALLING_DEVICES).map(|i| i.to_string()).chain(["hang".to_owned()]) {
        let reported = stderr.matches(&format!("{NETNS}/{PREFIX}{name}: ")).count();
        assert!(
            (1..=2).contains(&reported),
            "{PREFIX}{name} is reported unreadable once, not {reported} times: {stderr}"
        );
    }
    assert!(stderr.contains("listen queue stayed full"), "says why: {stderr}");
}
