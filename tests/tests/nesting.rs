//! `wgtrace run` on the real lab: wireguard-go tunnels in namespaces, real
//! packets, verdicts read from the JSON report.

use std::{process::Command, time::Duration};

use serde_json::Value;
use wgtrace_tests::{LabGuard, Traffic, client_peer, client_tunnel, lab, privileged_or_skip, trace_json};

#[test]
fn first_probe_counts_lookups_per_mark_and_table() {
    if !privileged_or_skip("first_probe_counts_lookups_per_mark_and_table") {
        return;
    }
    let _lab = LabGuard::up(&lab::LabOptions::default()).unwrap();
    let _traffic = Traffic::ping(lab::WG1_REMOTE).unwrap();
    let report = trace_json(3.0, &[]).unwrap();
    let lookups = report["route_lookups"].as_array().unwrap();
    let count = |mark: u64, table: u64| {
        lookups
            .iter()
            .filter(|r| r["mark"] == mark && r["table"] == table)
            .map(|r| r["lookups"].as_u64().unwrap())
            .sum::<u64>()
    };
    assert!(count(51820, 254) > 0, "wg0's marked transport is routed by main: {lookups:?}");
    assert!(count(0, 51820) > 0, "wg1's unmarked transport is routed by table 51820: {lookups:?}");
    println!("eBPF lab test ran: lookups {lookups:?}");
}

#[test]
fn broken_lab_shows_wg1_nested_in_wg0_and_the_fix_moves_it_out() {
    if !privileged_or_skip("broken_lab_shows_wg1_nested_in_wg0_and_the_fix_moves_it_out") {
        return;
    }
    let _lab = LabGuard::up(&lab::LabOptions::default()).unwrap();
    {
        let _traffic = Traffic::ping(lab::WG1_REMOTE).unwrap();
        let report = trace_json(3.0, &[]).unwrap();
        let wg1 = client_peer(&report, "wg1");
        assert_eq!(wg1["nested_in"], "wg0", "{report:#}");
        assert_eq!(wg1["nesting"], "accidental");
        assert_eq!(wg1["verdict"], "nested");
        assert_eq!(
            (wg1["outer"]["interface"].as_str(), wg1["outer"]["kind"].as_str()),
            (Some("wg0"), Some("wireguard"))
        );
        assert!(wg1["loop"].is_null());
        assert_eq!(wg1["fix_details"]["kind"], "mark");
        if client_tunnel(&report, "wg1")["implementation"] == "userspace" {
            // The lab bind-mounts its configs over the daemon's /etc/wireguard.
            assert_eq!(client_tunnel(&report, "wg1")["manager"], "wg-quick");
        }
        let kinds: Vec<&Value> =
            client_tunnel(&report, "wg1")["findings"].as_array().unwrap().iter().map(|f| &f["kind"]).collect();
        assert!(kinds.contains(&&Value::from("nested")), "run reports check's findings too: {kinds:?}");
        assert_eq!(wg1["transport"]["egress_interface"], "wg0");
        assert_eq!(wg1["transport"]["mark"], 0);
        assert_eq!(wg1["transport"]["route_table"], 51820);
        assert!(wg1["transport"]["packets"].as_u64().unwrap() > 0);
        let fix = wg1["fix"].as_str().expect("a fix is suggested");
        assert!(fix.contains("51820"), "{fix}");
        assert_eq!(wg1["fix_details"]["wg_set"], "wg set wg1 fwmark 51820");
        assert_eq!(wg1["fix_details"]["verified_egress_interface"], "c0");
        let wg0 = client_peer(&report, "wg0");
        assert!(wg0["nested_in"].is_null(), "wg0 is not nested: {wg0:#}");
        assert_eq!(wg0["verdict"], "direct");
        assert_eq!(wg0["transport"]["egress_interface"], "c0");
        assert_eq!(client_tunnel(&report, "wg0")["fwmark"], 51820);
        assert_eq!(report["events_lost"], 0);
    }
    lab::fix().unwrap();
    let _traffic = Traffic::ping(lab::WG1_REMOTE).unwrap();
    let report = trace_json(3.0, &[]).unwrap();
    let wg1 = client_peer(&report, "wg1");
    assert!(wg1["nested_in"].is_null(), "fixed wg1 is direct: {wg1:#}");
    assert_eq!(wg1["verdict"], "direct");
    assert!(wg1["fix"].is_null());
    assert_eq!(wg1["transport"]["egress_interface"], "c0");
    assert_eq!(wg1["transport"]["mark"], 51820);
    assert_eq!(wg1["transport"]["route_table"], 254);
}

/// The mark set while replies are in flight: wireguard-go clears the source
/// it pinned on a mark change, but the next reply through wg0 pins it
/// there again, and each send from there brings another. Routing now sends
/// wg1's transport out via c0, its packets still go into wg0: still nested,
/// by its packets, and the fix is not another mark or rule but setting the
/// endpoint again with nothing in flight. Applied as given, it moves out.
#[test]
fn a_mark_the_sender_does_not_follow_yet_gets_the_endpoint_set_again() {
    if !privileged_or_skip("a_mark_the_sender_does_not_follow_yet_gets_the_endpoint_set_again") {
        return;
    }
    let options = lab::LabOptions::default();
    if options.kernel {
        println!("kernel WireGuard drops a source its route no longer allows: nothing pins it");
        return;
    }
    if options.wireguard_go.as_ref().is_some_and(|binary| *binary == xtask::setup::trixie_wireguard_go()) {
        // Its UDP GRO path drops IP_PKTINFO (see xtask's lab): it never
        // learns a source to pin.
        println!("trixie's wireguard-go does not pin the source of coalesced packets: nothing to unpin");
        return;
    }
    let _lab = LabGuard::up(&options).unwrap();
    // Every 5 ms over a 40 ms round trip: replies are always in flight.
    let mut flood = Command::new("ip")
        .args(["netns", "exec", lab::CLIENT, "ping", "-q", "-i", "0.005", lab::WG1_REMOTE])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    lab::client_wg("wg1", &["set", "wg1", "fwmark", "51820"]).unwrap();
    let report = trace_json(3.0, &[]);
    let _ = flood.kill();
    let _ = flood.wait();
    let report = report.unwrap();
    let wg1 = client_peer(&report, "wg1");
    assert_eq!(wg1["nested_in"], "wg0", "the replies arriving through wg0 keep it there: {wg1:#}");
    assert_eq!(wg1["transport"]["mark"], 51820);
    let fix = &wg1["fix_details"];
    assert_eq!(fix["kind"], "reset_endpoint", "{wg1:#}");
    assert_eq!(fix["verified_egress_interface"], "c0");
    let command = fix["commands"][0].as_str().unwrap();
    let args: Vec<&str> = command.split_whitespace().collect();
    assert_eq!(&args[..4], ["wg", "set", "wg1", "peer"], "{command}");
    assert_eq!(args[5..], ["endpoint", lab::WG1_ENDPOINT], "{command}");
    // Nothing in flight any more (the flood stopped a round trip ago).
    std::thread::sleep(Duration::from_millis(200));
    lab::client_wg("wg1", &args[1..]).unwrap();
    let _traffic = Traffic::ping(lab::WG1_REMOTE).unwrap();
    let report = trace_json(3.0, &[]).unwrap();
    let wg1 = client_peer(&report, "wg1");
    assert!(wg1["nested_in"].is_null(), "the fix as given moved it out: {wg1:#}");
    assert_eq!(wg1["transport"]["egress_interface"], "c0");
}

#[test]
fn chain_and_ipv6_transport() {
    if !privileged_or_skip("chain_and_ipv6_transport") {
        return;
    }
    let _lab = LabGuard::up(&lab::LabOptions { extras: true, ..Default::default() }).unwrap();
    let _t2 = Traffic::ping(lab::WG2_REMOTE).unwrap();
    let _t3 = Traffic::ping(lab::WG3_REMOTE).unwrap();
    let report = trace_json(3.0, &[]).unwrap();
    let wg2 = client_peer(&report, "wg2");
    assert_eq!(wg2["nested_in"], "wg1", "{report:#}");
    assert_eq!(wg2["nesting"], "deliberate", "wg1's AllowedIPs name wg2's endpoint");
    assert_eq!(wg2["chain"], serde_json::json!(["wg1", "wg0"]));
    assert!(wg2["fix"].is_null(), "deliberate nesting needs no fix");
    let wg3 = client_peer(&report, "wg3");
    assert!(wg3["endpoint"].as_str().unwrap().starts_with("[2001:db8:"), "{wg3:#}");
    assert_eq!(wg3["nested_in"], "wg0", "IPv6 transport captured by wg0's ::/0: {wg3:#}");
    assert_eq!(wg3["transport"]["route_table"], 51820);
    assert!(wg3["fix"].as_str().unwrap().contains("51820"));
}

#[test]
fn custom_full_tunnel_mark_is_the_one_suggested() {
    if !privileged_or_skip("custom_full_tunnel_mark_is_the_one_suggested") {
        return;
    }
    let _lab = LabGuard::up(&lab::LabOptions { wg0_mark: Some(1234), ..Default::default() }).unwrap();
    let _traffic = Traffic::ping(lab::WG1_REMOTE).unwrap();
    let report = trace_json(3.0, &[]).unwrap();
    let wg1 = client_peer(&report, "wg1");
    assert_eq!(wg1["nested_in"], "wg0", "{report:#}");
    assert_eq!(wg1["transport"]["route_table"], 1234);
    assert_eq!(wg1["fix_details"]["mark"], 1234);
    lab::fix().unwrap();
    let report = trace_json(3.0, &[]).unwrap();
    let wg1 = client_peer(&report, "wg1");
    assert!(wg1["nested_in"].is_null(), "{wg1:#}");
    assert_eq!(wg1["transport"]["mark"], 1234);
}

#[test]
fn partial_tunnels_without_a_full_tunnel_get_no_verdict() {
    if !privileged_or_skip("partial_tunnels_without_a_full_tunnel_get_no_verdict") {
        return;
    }
    let _lab = LabGuard::up(&lab::LabOptions { extras: true, full_tunnel: false, ..Default::default() }).unwrap();
    let _t1 = Traffic::ping(lab::WG1_REMOTE).unwrap();
    let _t3 = Traffic::ping(lab::WG3_REMOTE).unwrap();
    let report = trace_json(3.0, &[]).unwrap();
    for interface in ["wg1", "wg3"] {
        let peer = client_peer(&report, interface);
        assert!(peer["nested_in"].is_null(), "{interface}: {peer:#}");
        assert!(peer["fix"].is_null());
        assert_eq!(peer["transport"]["egress_interface"], "c0");
    }
}

/// A plain UDP socket sending WireGuard-shaped packets to wg1's endpoint is
/// not wg1: it must not make the fixed wg1 look nested.
#[test]
fn impostor_socket_causes_no_false_verdict() {
    if !privileged_or_skip("impostor_socket_causes_no_false_verdict") {
        return;
    }
    let _lab = LabGuard::up(&lab::LabOptions::default()).unwrap();
    lab::fix().unwrap();
    let _traffic = Traffic::ping(lab::WG1_REMOTE).unwrap();
    // 148-byte handshake initiation and 64-byte data messages, unmarked, so
    // they ride inside wg0, from a port that is not wg1's.
    let script = format!(
        "import socket,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
         end=time.time()+4\nwhile time.time()<end:\n\
         \x20 s.sendto(b'\\x01\\0\\0\\0'+b'\\x11'*144,('{ip}',51821))\n\
         \x20 s.sendto(b'\\x04\\0\\0\\0'+b'\\x22'*60,('{ip}',51821))\n\
         \x20 time.sleep(0.05)\n",
        ip = lab::ROUTER_PUBLIC_V4
    );
    let mut impostor =
        Command::new("ip").args(["netns", "exec", lab::CLIENT, "python3", "-c", &script]).spawn().unwrap();
    let report = trace_json(3.0, &[]).unwrap();
    let _ = impostor.wait();
    let wg1 = client_peer(&report, "wg1");
    assert!(wg1["nested_in"].is_null(), "the impostor's packets are not wg1's: {wg1:#}");
    assert_eq!(wg1["transport"]["egress_interface"], "c0");
}
