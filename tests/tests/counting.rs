//! Counting checked against WireGuard's own counters (`wg show wg1
//! transfer`) under bulk TCP over the fixed wg1: every packet is traced, so
//! wgtrace's UDP payload bytes match WireGuard's tx/rx bytes, and a GSO skb
//! counts as the wire packets it carries. Run on bookworm's wireguard-go (one
//! skb per packet), trixie's (UDP GSO/GRO: one skb, many packets) and, in
//! `cargo xtask vm-test`, kernel WireGuard.

use std::{
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use wgtrace_tests::{LabGuard, Trace, client_peer, lab, privileged_or_skip};

/// (rx, tx) bytes of wg1's only peer, as WireGuard counts them.
fn wg1_transfer() -> (u64, u64) {
    let text = lab::client_wg("wg1", &["show", "wg1", "transfer"]).unwrap();
    let fields: Vec<&str> = text.split_whitespace().collect();
    assert_eq!(fields.len(), 3, "one peer: {text}");
    (fields[1].parse().unwrap(), fields[2].parse().unwrap())
}

/// iperf3 from the client to wg1's far end for `seconds`.
fn bulk_tcp_over_wg1(seconds: u32) {
    let status = Command::new("ip")
        .args(["netns", "exec", lab::CLIENT, "iperf3", "--connect-timeout", "3000", "-c", lab::WG1_REMOTE])
        .args(["-t", &seconds.to_string()])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "iperf3 over wg1 failed");
}

/// Waits until `pid` (a `wgtrace run`) has its programs attached, then
/// gives it time for its first discovery: start-up is slow under the VM's
/// emulation, and nothing before it is counted.
fn wait_until_tracing(pid: u32) {
    let links = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|dir| {
                dir.filter_map(Result::ok)
                    .filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.as_os_str() == "anon_inode:bpf_link"))
                    .count()
            })
            .unwrap_or(0)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while links() < 2 {
        assert!(std::time::Instant::now() < deadline, "wgtrace attached no programs within 120 s");
        thread::sleep(Duration::from_millis(100));
    }
    thread::sleep(Duration::from_millis(3000));
}

/// Ends a run started with a long --duration, as Ctrl-C would, for its report.
fn stop(trace: Trace) -> serde_json::Value {
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(trace.pid() as i32, libc::SIGINT) };
    trace.report().unwrap()
}

fn counts_match(test: &str, options: lab::LabOptions) {
    if !privileged_or_skip(test) {
        return;
    }
    let _lab = LabGuard::up(&lab::LabOptions { wg1_fixed: true, ..options }).unwrap();
    let mut server =
        Command::new("ip").args(["netns", "exec", lab::ROUTER, "iperf3", "-s"]).stdout(Stdio::null()).spawn().unwrap();
    thread::sleep(Duration::from_millis(500));
    // The lab is idle now: WireGuard's counters move only with what follows.
    let (rx_before, tx_before) = wg1_transfer();
    let trace = Trace::start(300.0, &[]).unwrap();
    wait_until_tracing(trace.pid());
    bulk_tcp_over_wg1(4);
    thread::sleep(Duration::from_millis(500));
    let (rx_after, tx_after) = wg1_transfer();
    let report = stop(trace);
    let _ = server.kill();
    let _ = server.wait();

    let transport = &client_peer(&report, "wg1")["transport"];
    assert_eq!(transport["egress_interface"], "c0", "{report:#}");
    assert_eq!(report["traced_fraction"], 1.0);
    let (tx, rx) = (tx_after - tx_before, rx_after - rx_before);
    let bytes = transport["bytes"].as_u64().unwrap();
    let packets = transport["packets"].as_u64().unwrap();
    let received = transport["received_bytes"].as_u64().unwrap();
    let within = |ours: u64, theirs: u64| (ours as f64 - theirs as f64).abs() <= theirs as f64 * 0.01;
    assert!(tx > 1_000_000, "bulk TCP moved only {tx} bytes");
    assert!(within(bytes, tx), "sent: wgtrace {bytes} bytes in {packets} packets, WireGuard {tx}");
    assert!(within(received, rx), "received: wgtrace {received} bytes, WireGuard {rx}");
    // Full-size data messages are at most the wire MTU's UDP payload: more
    // bytes per packet would mean skbs counted, not wire packets.
    let per_packet = bytes as f64 / packets as f64;
    assert!((1000.0..=1472.0).contains(&per_packet), "{bytes} bytes in {packets} packets: {per_packet:.0} per packet");
    println!("{test}: tx {bytes} vs {tx}, rx {received} vs {rx}, {packets} packets ({per_packet:.0} bytes each)");
}

/// Bookworm's wireguard-go on the host, kernel WireGuard in the VM.
#[test]
fn bulk_tcp_counts_match_wireguards_own_counters() {
    counts_match(
        "bulk_tcp_counts_match_wireguards_own_counters",
        lab::LabOptions { delay_ms: 0, ..Default::default() },
    );
}

/// Trixie's wireguard-go: UDP GSO sends many wire packets per skb.
#[test]
fn bulk_tcp_counts_match_with_gso_wireguard_go() {
    let options = lab::LabOptions { delay_ms: 0, ..Default::default() };
    if options.kernel {
        println!("kernel WireGuard lab: the wireguard-go generations run on the host");
        return;
    }
    let binary = xtask::setup::trixie_wireguard_go();
    if !binary.exists() {
        let reason = format!("{} is missing: run `cargo xtask setup`", binary.display());
        assert!(!std::env::var("CI").is_ok_and(|v| v == "true"), "{reason}");
        eprintln!("\n*** SKIPPED bulk_tcp_counts_match_with_gso_wireguard_go: {reason} ***\n");
        return;
    }
    let options = lab::LabOptions { wireguard_go: Some(binary), ..options };
    counts_match("bulk_tcp_counts_match_with_gso_wireguard_go", options);
}

/// Tracing never pauses: a handshake in the middle of a bulk transfer is
/// still seen, both messages, and timed.
#[test]
fn a_handshake_under_full_bulk_load_is_timed() {
    if !privileged_or_skip("a_handshake_under_full_bulk_load_is_timed") {
        return;
    }
    let _lab = LabGuard::up(&lab::LabOptions { delay_ms: 0, wg1_fixed: true, ..Default::default() }).unwrap();
    let mut server =
        Command::new("ip").args(["netns", "exec", lab::ROUTER, "iperf3", "-s"]).stdout(Stdio::null()).spawn().unwrap();
    thread::sleep(Duration::from_millis(500));
    let trace = Trace::start(300.0, &[]).unwrap();
    wait_until_tracing(trace.pid());
    let bulk = thread::spawn(|| bulk_tcp_over_wg1(5));
    thread::sleep(Duration::from_millis(2000)); // at full rate now
    lab::rekey("wg1").unwrap();
    bulk.join().unwrap();
    thread::sleep(Duration::from_millis(1000));
    let report = stop(trace);
    let _ = server.kill();
    let _ = server.wait();
    let handshake = &client_peer(&report, "wg1")["latency"]["handshake_rtt_us"];
    assert!(handshake["count"].as_u64().unwrap() >= 1, "the handshake under load was timed: {handshake:#}");
    assert_eq!(report["events_lost"], 0);
}
