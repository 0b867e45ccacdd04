//! Hostile neighbours while tracing the lab: processes that hold a TUN device
//! and serve (or fake) a UAPI socket that drips, hangs, floods or answers
//! garbage; a socket path that is a symlink to another process's socket; a
//! socket served by a process other than the TUN holder; namespaces deleted
//! mid-run. In each case the lab's verdicts stay right, memory stays flat,
//! the other processes' sockets receive nothing, and SIGTERM ends the run
//! within 1 s with a report.

use std::{
    io::Read as _,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use wgtrace_tests::{LabGuard, TempDir, Traffic, client_peer, lab, privileged_or_skip, wgtrace_bin};

/// Holds TUN device NAME (argv[2]) and behaves as argv[1] says on
/// /run/wireguard/NAME.sock.
const HOLDER: &str = r#"
import fcntl, os, socket, struct, sys, time, threading
mode, name = sys.argv[1], sys.argv[2]
tun = os.open("/dev/net/tun", os.O_RDWR)
fcntl.ioctl(tun, 0x400454ca, struct.pack("16sH", name.encode(), 0x0001 | 0x1000))
path = "/run/wireguard/%s.sock" % name
os.makedirs("/run/wireguard", exist_ok=True)
if mode != "hold":  # "hold" leaves the path to the impostor
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
if mode == "symlink":
    os.symlink(sys.argv[3], path)
if mode in ("symlink", "hold"):
    print("ready", flush=True)
    while True:
        time.sleep(60)
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(path)
server.listen(64)
def serve(c):
    try:
        if mode == "drip":
            for b in b"listen_port=1\nfwmark=1\n\n":
                c.send(bytes([b]))
                time.sleep(1.5)
        elif mode == "hang":
            time.sleep(3600)
        elif mode == "flood":
            chunk = b"x" * 65536
            while True:
                c.sendall(chunk)
        elif mode == "garbage":
            c.sendall(os.urandom(3000) + b"\n\n")
    except OSError:
        pass
    finally:
        c.close()
print("ready", flush=True)
while True:
    c, _ = server.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// Serves argv[1] (holding no TUN device) with a plausible but fake reply
/// (fwmark 4242), and keeps the number of bytes it ever received in argv[2].
const VICTIM: &str = r#"
import os, socket, sys, threading
path, log = sys.argv[1], sys.argv[2]
os.makedirs(os.path.dirname(path), exist_ok=True)
try:
    os.unlink(path)
except FileNotFoundError:
    pass
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(path)
server.listen(64)
total, lock = 0, threading.Lock()
open(log, "w").write("0")
def serve(c):
    global total
    try:
        while True:
            data = c.recv(4096)
            if not data:
                break
            with lock:
                total += len(data)
                open(log, "w").write(str(total))
            if b"\n\n" in data:
                c.sendall(b"listen_port=4242\nfwmark=4242\nerrno=0\n\n")
    except OSError:
        pass
print("ready", flush=True)
while True:
    c, _ = server.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// A background process, killed when dropped.
struct Process(Child);

impl Process {
    /// Runs a python script (in network namespace `netns`, if any) and waits
    /// until it says it is ready.
    fn python(netns: Option<&str>, script: &str, args: &[&str]) -> Self {
        let mut command = match netns {
            Some(netns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{netns}")).arg("python3");
                c
            }
            None => Command::new("python3"),
        };
        let mut child = command.arg("-c").arg(script).args(args).stdout(Stdio::piped()).spawn().unwrap();
        let mut ready = [0u8; 6];
        child.stdout.as_mut().unwrap().read_exact(&mut ready).unwrap();
        assert_eq!(&ready, b"ready\n");
        Self(child)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A network namespace of our own, deleted when dropped.
struct Netns(String);

impl Netns {
    fn add(name: &str) -> Self {
        let _ = Command::new("ip").args(["netns", "del", name]).status();
        assert!(Command::new("ip").args(["netns", "add", name]).status().unwrap().success());
        Self(name.to_owned())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field).map(|v| v.trim().trim_end_matches(" kB").parse().unwrap()))
        .unwrap()
}

/// `wgtrace run --json` with stderr captured.
fn start(args: &[&str]) -> Child {
    Command::new(wgtrace_bin())
        .args(["run", "--json"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// SIGTERMs the run and returns (seconds until it ended, report, stderr).
fn terminate(child: Child) -> (f64, serde_json::Value, String) {
    let started = Instant::now();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let output = child.wait_with_output().unwrap();
    let elapsed = started.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "wgtrace exited with {}: {stderr}", output.status);
    let report = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("no JSON report ({e}): {stderr}"));
    (elapsed, report, stderr)
}

const NEIGHBOURS: &str = "wgtnb-hostile";

#[test]
fn hostile_uapi_neighbours_cannot_stall_mislead_or_use_wgtrace() {
    if !privileged_or_skip("hostile_uapi_neighbours_cannot_stall_mislead_or_use_wgtrace") {
        return;
    }
    let _lab = LabGuard::up(&lab::LabOptions { delay_ms: 0, ..Default::default() }).unwrap();
    let _traffic = Traffic::ping(lab::WG1_REMOTE).unwrap();
    let dir = TempDir::new("wgtrace-neighbours").unwrap();
    let netns = Netns::add(NEIGHBOURS);
    let log = |name: &str| dir.0.join(format!("{name}.received")).to_string_lossy().into_owned();
    // Other processes' sockets: one a symlink points at, one served in the
    // name of a TUN device its server does not hold.
    let victim_path = dir.0.join("victim.sock").to_string_lossy().into_owned();
    let _victim = Process::python(None, VICTIM, &[&victim_path, &log("victim")]);
    let _impostor = Process::python(None, VICTIM, &["/run/wireguard/nb-other.sock", &log("impostor")]);
    let mut holders = Vec::new();
    for (mode, name) in [("drip", "nb-drip"), ("hang", "nb-hang"), ("flood", "nb-flood"), ("garbage", "nb-garbage")] {
        holders.push(Process::python(Some(&netns.0), HOLDER, &[mode, name]));
    }
    holders.push(Process::python(Some(&netns.0), HOLDER, &["symlink", "nb-link", &victim_path]));
    holders.push(Process::python(Some(&netns.0), HOLDER, &["hold", "nb-other"]));

    // Once with discovery in the tracer itself, once through the
    // privileged helper of --drop-privileges.
    for extra in [&[][..], &["--drop-privileges"]] {
        let child = start(&[&["--duration", "600"], extra].concat());
        let pid = child.id();
        std::thread::sleep(Duration::from_secs(3));
        let early = status_kib(pid, "VmRSS:");
        std::thread::sleep(Duration::from_secs(7));
        let late = status_kib(pid, "VmRSS:");
        let peak = status_kib(pid, "VmHWM:");
        let (elapsed, report, stderr) = terminate(child);
        eprintln!("{extra:?}: SIGTERM to exit: {elapsed:.3} s; RSS {early} -> {late} KiB, peak {peak} KiB\n{stderr}");

        assert!(elapsed < 1.0, "SIGTERM must end the run within 1 s, took {elapsed:.3} s");
        let wg1 = client_peer(&report, "wg1");
        assert_eq!(wg1["nested_in"], "wg0", "the lab's verdict stays right: {wg1:#}");
        assert_eq!(client_peer(&report, "wg0")["transport"]["egress_interface"], "c0");
        for name in ["victim", "impostor"] {
            let received = std::fs::read_to_string(log(name)).unwrap();
            assert_eq!(received, "0", "{name}'s socket must receive nothing, got {received} bytes");
        }
        let text = serde_json::to_string(&report).unwrap();
        assert!(!text.contains("4242"), "no configuration is taken from a process that does not hold the device");
        // Each is reported, and again only when its failure changes (the
        // garbage daemon may also close before the request is sent): not
        // every round.
        for name in ["nb-drip", "nb-hang", "nb-flood", "nb-garbage", "nb-link", "nb-other"] {
            let reported = stderr.matches(&format!("{NEIGHBOURS}/{name}: ")).count();
            assert!((1..=3).contains(&reported), "{name} is reported unreadable, not every round: {stderr}");
        }
        assert!(stderr.contains("not by PID"), "the impostor and the symlink are refused: {stderr}");
        assert!(late < early + 8 * 1024, "memory stays flat: RSS {early} -> {late} KiB");
        assert!(peak < 100 * 1024, "peak RSS {peak} KiB");
    }
    let _ = std::fs::remove_file("/run/wireguard/nb-other.sock");
    let _ = std::fs::remove_file("/run/wireguard/nb-link.sock");
}

#[test]
fn a_namespace_deleted_mid_run_is_left_out_and_the_run_goes_on() {
    if !privileged_or_skip("a_namespace_deleted_mid_run_is_left_out_and_the_run_goes_on") {
        return;
    }
    let _lab = LabGuard::up(&lab::LabOptions { delay_ms: 0, ..Default::default() }).unwrap();
    let _traffic = Traffic::ping(lab::WG1_REMOTE).unwrap();
    for named in [false, true] {
        let name = "wgtnb-doomed";
        let netns = Netns::add(name);
        let holder = Process::python(Some(name), HOLDER, &["hang", "nb-doomed"]);
        let args: Vec<&str> = if named { vec!["--netns", name] } else { vec![] };
        let child = start(&[&["--duration", "600"], &args[..]].concat());
        std::thread::sleep(Duration::from_secs(3));
        drop(holder);
        drop(netns);
        let _ = std::fs::remove_file("/run/wireguard/nb-doomed.sock");
        std::thread::sleep(Duration::from_secs(3));
        let (elapsed, report, stderr) = terminate(child);
        assert!(elapsed < 1.0, "SIGTERM ends the run within 1 s, took {elapsed:.3} s");
        let tunnels = report["tunnels"].as_array().unwrap();
        assert!(!tunnels.iter().any(|t| t["netns"] == name), "the vanished namespace is left out: {report:#}");
        if named {
            assert_eq!(stderr.matches("network namespace wgtnb-doomed is gone").count(), 1, "logged once: {stderr}");
        } else {
            assert_eq!(client_peer(&report, "wg1")["nested_in"], "wg0", "lab verdicts stay right: {report:#}");
        }
    }
}
