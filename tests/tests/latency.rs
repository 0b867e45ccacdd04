//! Latency on the real lab (20 ms each way on wg0's path): the nested wg1
//! pays wg0's path, the fix removes that, and `--probe` predicts it.

use std::time::Duration;

use wgtrace_tests::{LabGuard, Trace, Traffic, client_peer, lab, privileged_or_skip, trace_json};

fn us(value: &serde_json::Value) -> u64 {
    value.as_u64().unwrap_or_else(|| panic!("not a number of µs: {value}"))
}

#[test]
fn nested_tunnel_pays_the_outer_path_and_the_fix_removes_it() {
    if !privileged_or_skip("nested_tunnel_pays_the_outer_path_and_the_fix_removes_it") {
        return;
    }
    let _lab = LabGuard::up(&lab::LabOptions::default()).unwrap();
    {
        let trace = Trace::start(5.0, &[]).unwrap();
        std::thread::sleep(Duration::from_millis(1500)); // attached and discovered
        lab::rekey("wg1").unwrap(); // a fresh handshake to time
        let _wg1 = Traffic::ping(lab::WG1_REMOTE).unwrap();
        let _wg0 = Traffic::ping(lab::WG0_REMOTE).unwrap();
        let report = trace.report().unwrap();
        let wg1 = &client_peer(&report, "wg1")["latency"];
        let inner = us(&wg1["inner_rtt_us"]["p50"]);
        assert!((35_000..=80_000).contains(&inner), "broken wg1 inner RTT p50 {inner} µs: {wg1:#}");
        assert!(us(&wg1["inner_rtt_us"]["count"]) >= 10);
        let handshake = us(&wg1["handshake_rtt_us"]["p50"]);
        assert!(us(&wg1["handshake_rtt_us"]["count"]) >= 1, "the rekeyed handshake was timed: {wg1:#}");
        assert!((35_000..=80_000).contains(&handshake), "handshake rides wg0 too: {handshake} µs");
        assert!(us(&wg1["transmit_us"]["count"]) >= 1, "transmit latency measured: {wg1:#}");
        let cost = &client_peer(&report, "wg1")["nesting_cost"];
        assert_eq!(cost["outer_interface"], "wg0");
        assert!(us(&cost["estimated_cost_us"]) > 30_000, "{cost:#}");
        let wg0 = us(&client_peer(&report, "wg0")["latency"]["inner_rtt_us"]["p50"]);
        assert!((35_000..=80_000).contains(&wg0), "wg0 {wg0} µs");
    }
    lab::fix().unwrap();
    let _wg1 = Traffic::ping(lab::WG1_REMOTE).unwrap();
    let _wg0 = Traffic::ping(lab::WG0_REMOTE).unwrap();
    let report = trace_json(3.0, &[]).unwrap();
    let inner = us(&client_peer(&report, "wg1")["latency"]["inner_rtt_us"]["p50"]);
    assert!(inner < 10_000, "fixed wg1 inner RTT p50 {inner} µs");
    assert!(client_peer(&report, "wg1")["nesting_cost"].is_null());
    let wg0 = us(&client_peer(&report, "wg0")["latency"]["inner_rtt_us"]["p50"]);
    assert!((35_000..=80_000).contains(&wg0), "wg0 stays slow: {wg0} µs");
}

#[test]
fn probe_predicts_the_fixed_rtt_before_the_fix() {
    if !privileged_or_skip("probe_predicts_the_fixed_rtt_before_the_fix") {
        return;
    }
    let _lab = LabGuard::up(&lab::LabOptions::default()).unwrap();
    let predicted = {
        let _wg1 = Traffic::ping(lab::WG1_REMOTE).unwrap();
        let report = trace_json(3.0, &["--probe"]).unwrap();
        let cost = &client_peer(&report, "wg1")["nesting_cost"];
        let probe = &cost["probe"];
        assert!(us(&probe["current_path_rtt_us"]) > 35_000, "{cost:#}");
        assert!(us(&probe["direct_path_rtt_us"]) < 10_000, "{cost:#}");
        us(&cost["expected_inner_rtt_after_fix_us"])
    };
    lab::fix().unwrap();
    let _wg1 = Traffic::ping(lab::WG1_REMOTE).unwrap();
    let report = trace_json(3.0, &[]).unwrap();
    let actual = us(&client_peer(&report, "wg1")["latency"]["inner_rtt_us"]["p50"]);
    assert!(predicted.abs_diff(actual) < 3_000, "predicted {predicted} µs, got {actual} µs after the fix");
}

/// ICMP echo requests the lab router has received (its /proc/net/snmp).
fn router_echo_requests() -> u64 {
    let snmp = std::process::Command::new("ip")
        .args(["netns", "exec", lab::ROUTER, "cat", "/proc/net/snmp"])
        .output()
        .unwrap();
    let text = String::from_utf8(snmp.stdout).unwrap();
    let icmp: Vec<&str> = text.lines().filter(|l| l.starts_with("Icmp:")).collect();
    let names: Vec<&str> = icmp[0].split_whitespace().collect();
    let values: Vec<&str> = icmp[1].split_whitespace().collect();
    let at = names.iter().position(|n| *n == "InEchos").unwrap();
    values[at].parse().unwrap()
}

#[test]
fn nothing_is_sent_without_probe() {
    if !privileged_or_skip("nothing_is_sent_without_probe") {
        return;
    }
    let _lab = LabGuard::up(&lab::LabOptions::default()).unwrap();
    // UDP, not ICMP, over wg1: the only echoes the router could see are probes.
    let script = format!(
        "import socket,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
         end=time.time()+12\nwhile time.time()<end:\n s.sendto(b'x'*64,('{}',9)); time.sleep(0.05)\n",
        lab::WG1_REMOTE
    );
    let mut udp = std::process::Command::new("ip")
        .args(["netns", "exec", lab::CLIENT, "python3", "-c", &script])
        .spawn()
        .unwrap();
    let before = router_echo_requests();
    let report = trace_json(2.0, &[]).unwrap();
    assert_eq!(client_peer(&report, "wg1")["nested_in"], "wg0", "{report:#}");
    assert!(client_peer(&report, "wg1")["nesting_cost"]["probe"].is_null());
    assert_eq!(router_echo_requests(), before, "no echo may be sent without --probe");
    let report = trace_json(2.0, &["--probe"]).unwrap();
    let _ = udp.kill();
    let _ = udp.wait();
    assert!(!client_peer(&report, "wg1")["nesting_cost"]["probe"].is_null());
    assert!(router_echo_requests() >= before + 10, "--probe sends 5 echoes along each path");
}
