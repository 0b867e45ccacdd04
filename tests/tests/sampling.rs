//! Tracing in windows under load (`--max-traced-rate`): the verdict still
//! comes from packets, and the extrapolated counts stay near the truth.

use std::{
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use wgtrace_tests::{LabGuard, Trace, Traffic, client_peer, lab, privileged_or_skip, trace_json};

/// Bytes iperf3 sent over wg1, from its JSON.
fn iperf_over_wg1(seconds: u32) -> u64 {
    let output = Command::new("ip")
        .args(["netns", "exec", lab::CLIENT, "iperf3", "-J", "--connect-timeout", "3000", "-c", lab::WG1_REMOTE])
        .args(["-t", &seconds.to_string()])
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(output.status.success(), "iperf3: {}", String::from_utf8_lossy(&output.stdout));
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    json["end"]["sum_sent"]["bytes"].as_u64().unwrap()
}

#[test]
fn under_load_tracing_goes_to_windows_and_counts_are_extrapolated() {
    if !privileged_or_skip("under_load_tracing_goes_to_windows_and_counts_are_extrapolated") {
        return;
    }
    let _lab = LabGuard::up(&lab::LabOptions { delay_ms: 0, ..Default::default() }).unwrap();
    let mut server =
        Command::new("ip").args(["netns", "exec", lab::ROUTER, "iperf3", "-s"]).stdout(Stdio::null()).spawn().unwrap();
    thread::sleep(Duration::from_millis(500));
    // A low limit, so that the lab's load is well above it; the 3 s of
    // continuous tracing after start are inside the transfer.
    let trace = Trace::start(12.0, &["--max-traced-rate", "2000"]).unwrap();
    thread::sleep(Duration::from_millis(500));
    let sent = iperf_over_wg1(10);
    let report = trace.report().unwrap();
    let _ = server.kill();
    let _ = server.wait();

    let traced = report["traced_fraction"].as_f64().unwrap();
    assert!(traced > 0.0 && traced < 0.6, "programs were detached most of the time: traced {traced}");
    let wg1 = client_peer(&report, "wg1");
    assert_eq!(wg1["nested_in"], "wg0", "{report:#}");
    // wg1's transport carries iperf's bytes plus TCP/IP and WireGuard
    // headers (about 9% here); windows leave an estimate, not a count.
    let bytes = wg1["transport"]["bytes"].as_u64().unwrap();
    let ratio = bytes as f64 / sent as f64;
    assert!((0.7..1.6).contains(&ratio), "wg1 transport {bytes} bytes for {sent} sent by iperf3 ({ratio:.2})");
    println!("windows: traced {:.0}% of the run; transport/iperf bytes {ratio:.2}", traced * 100.0);
}

#[test]
fn below_the_limit_tracing_is_continuous_and_exact() {
    if !privileged_or_skip("below_the_limit_tracing_is_continuous_and_exact") {
        return;
    }
    let _lab = LabGuard::up(&lab::LabOptions::default()).unwrap();
    let _traffic = Traffic::ping(lab::WG1_REMOTE).unwrap();
    let report = trace_json(5.0, &[]).unwrap();
    assert_eq!(report["traced_fraction"], 1.0, "a few pings stay far below the default limit");
    let wg1 = client_peer(&report, "wg1");
    let packets = wg1["transport"]["packets"].as_u64().unwrap();
    // Traffic::ping sends every 100 ms: ~45 while tracing, never more than
    // it sent in its whole life (an estimate could be).
    assert!((40..=65).contains(&packets), "every echo counted once: {packets}");
}
