//! Hostile and malformed traffic while tracing: truncated and mis-sized
//! WireGuard look-alikes, bogus types, fragments, IPv6 extension headers,
//! transport forged from a raw socket with a tunnel's own port, spoofed
//! handshake indices, and floods: WireGuard-shaped handshake pairs between
//! plain sockets on fresh ports, and data-shaped datagrams from 50 000
//! source ports. wgtrace must not crash, must not call the (fixed) wg1
//! nested, and its memory must stay flat: only known tunnels' sockets
//! create state.

use std::{process::Command, time::Duration};

use wgtrace_tests::{LabGuard, Trace, Traffic, client_peer, lab, privileged_or_skip};

const CLIENT_TRAFFIC: &str = r#"
import socket, struct, random, time
ENDPOINT = ("192.0.2.200", 51821)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
def wg(t, n, reserved=b"\0\0\0"):
    return bytes([t]) + reserved + random.randbytes(max(n - 4, 0))
malformed = [b"\x01\0\0", wg(1, 100), wg(1, 149), wg(2, 148), wg(3, 65), wg(4, 31), wg(4, 16),
             wg(5, 64), wg(0xff, 148), wg(4, 64, b"\0\1\0"), wg(1, 148, b"\x80\0\0")]
for _ in range(20):
    for m in malformed:
        u.sendto(m, ENDPOINT)
# Fragmented: a 2992-byte data-shaped datagram (first fragment looks like WireGuard).
for _ in range(20):
    u.sendto(wg(4, 2992), ENDPOINT)
# IPv6 with a hop-by-hop header before UDP.
r6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
src, dst = socket.inet_pton(socket.AF_INET6, "2001:db8:c::2"), socket.inet_pton(socket.AF_INET6, "2001:db8:e::1")
for _ in range(50):
    payload = wg(4, 64)
    udp = struct.pack("!HHHH", 40000, 51823, 8 + len(payload), 0) + payload
    hbh = bytes([17, 0, 1, 4, 0, 0, 0, 0])
    ip6 = struct.pack("!IHBB16s16s", 6 << 28, len(hbh) + len(udp), 0, 64, src, dst)
    r6.sendto(ip6 + hbh + udp, ("2001:db8:e::1", 0))
# A flood of new flows: data-shaped packets from 50000 source ports.
for _ in range(50000):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(wg(4, 64), ENDPOINT)
    s.close()
"#;

/// 40 000 handshake-shaped pairs (initiation, then the response naming its
/// sender index) between plain sockets on fresh loopback ports: what drove
/// wgtrace to 1.5 GB when state was keyed by the sender's addresses.
const HANDSHAKE_FLOOD: &str = r#"
import socket, struct, random
for i in range(40000):
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); a.bind(("127.0.0.1", 0))
    b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); b.bind(("127.0.0.1", 0))
    index = random.getrandbits(32)
    a.sendto(b"\x01\0\0\0" + struct.pack("<I", index) + random.randbytes(140), b.getsockname())
    b.sendto(b"\x02\0\0\0" + struct.pack("<II", random.getrandbits(32), index) + random.randbytes(80), a.getsockname())
    a.close(); b.close()
"#;

/// Transport forged with wg1's own source port from a raw socket, unmarked
/// (so it rides wg0), sent until killed: the newest "wg1" packets are forged.
const FORGED_TRANSPORT: &str = r#"
import socket, struct, random, time
def checksum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16: s = (s & 0xffff) + (s >> 16)
    return ~s & 0xffff
r = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
i = 0
while True:
    payload = b"\x04\0\0\0" + random.randbytes(60)
    udp = struct.pack("!HHHH", 51821, 51821, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), i & 0xffff, 0, 64, 17, 0,
                     socket.inet_aton("192.0.2.2"), socket.inet_aton("192.0.2.200"))
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    r.sendto(ip + udp, ("192.0.2.200", 0))
    i += 1
    time.sleep(0.01)
"#;

const ROUTER_TRAFFIC: &str = r#"
import socket, random
# Spoofed handshake responses with random receiver indices, at the client's wg1.
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("192.0.2.200", 0))
for _ in range(1000):
    s.sendto(b"\x02\0\0\0" + random.randbytes(88), ("192.0.2.2", 51821))
"#;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("VmRSS:").map(|v| v.trim().trim_end_matches(" kB").parse().ok()))?
        })
        .unwrap_or(0)
}

/// The highest RSS seen while `work` runs, sampled every 20 ms.
fn max_rss_during(pid: u32, work: impl FnOnce()) -> u64 {
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut max = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                max = max.max(rss_kib(pid));
                std::thread::sleep(Duration::from_millis(20));
            }
            max.max(rss_kib(pid))
        })
    };
    work();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    sampler.join().unwrap()
}

#[test]
fn hostile_traffic_causes_no_crash_no_false_verdict_and_bounded_memory() {
    if !privileged_or_skip("hostile_traffic_causes_no_crash_no_false_verdict_and_bounded_memory") {
        return;
    }
    let _lab = LabGuard::up(&lab::LabOptions { delay_ms: 0, ..Default::default() }).unwrap();
    lab::fix().unwrap();
    let trace = Trace::start(20.0, &[]).unwrap();
    let pid = trace.pid();
    let _wg1 = Traffic::ping(lab::WG1_REMOTE).unwrap();
    // Attached, discovered, a few refreshes and reports in: the steady state.
    std::thread::sleep(Duration::from_millis(3000));
    let before = rss_kib(pid);
    let run = |namespace: &str, script: &str| {
        Command::new("ip").args(["netns", "exec", namespace, "python3", "-c", script]).status().unwrap()
    };
    let mut forger =
        Command::new("ip").args(["netns", "exec", lab::CLIENT, "python3", "-c", FORGED_TRANSPORT]).spawn().unwrap();
    let peak = max_rss_during(pid, || {
        let spoof = std::thread::spawn(move || run(lab::ROUTER, ROUTER_TRAFFIC));
        let handshakes = std::thread::spawn(move || run(lab::CLIENT, HANDSHAKE_FLOOD));
        assert!(run(lab::CLIENT, CLIENT_TRAFFIC).success(), "the hostile traffic generator failed");
        assert!(spoof.join().unwrap().success());
        assert!(handshakes.join().unwrap().success(), "the handshake flood failed");
    });
    let report = trace.report().unwrap();
    let _ = forger.kill();
    let _ = forger.wait();
    let wg1 = client_peer(&report, "wg1");
    assert!(wg1["nested_in"].is_null(), "no false verdict from forged or malformed packets: {wg1:#}");
    assert_eq!(wg1["transport"]["egress_interface"], "c0");
    assert_eq!(wg1["transport"]["mark"], 51820);
    assert!(report["events_lost"].is_u64(), "losses are counted and reported");
    assert!(report["forged_packets"].as_u64().unwrap() > 0, "the forged transport was seen and set aside");
    let growth = peak.saturating_sub(before);
    assert!(growth < 5 * 1024, "RSS {before} KiB before the floods, {peak} KiB at most during them: must stay flat");
    println!("RSS {before} KiB before the floods, at most {peak} KiB during them (+{growth} KiB)");
}
