//! The ways a tunnel's transport gets captured (`cargo xtask lab shape`),
//! each with real packets: `wgtrace check` and `wgtrace run` must give the
//! same verdict, explanation and fix kind, and the fix wgtrace prints is
//! applied as printed and must make the path direct.

use std::{
    process::{Command, Output},
    time::Duration,
};

use serde_json::Value;
use wgtrace_tests::{LabGuard, Traffic, client_peer, client_tunnel, lab, privileged_or_skip, trace_json, wgtrace_bin};
use xtask::lab::shapes::{self, Shape};

/// `wgtrace check --json` inside the lab client's network namespace.
fn check() -> (i32, Value, Output) {
    let output = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab::CLIENT))
        .arg(wgtrace_bin())
        .args(["check", "--json"])
        .output()
        .unwrap();
    let json = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
    (output.status.code().unwrap_or(-1), json, output)
}

fn check_peer<'a>(report: &'a Value, interface: &str) -> &'a Value {
    &report["tunnels"].as_array().unwrap().iter().find(|t| t["interface"] == interface).unwrap()["peers"][0]
}

fn check_tunnel<'a>(report: &'a Value, interface: &str) -> &'a Value {
    report["tunnels"].as_array().unwrap().iter().find(|t| t["interface"] == interface).unwrap()
}

fn finding_kinds(tunnel: &Value) -> Vec<String> {
    tunnel["findings"].as_array().unwrap().iter().map(|f| f["kind"].as_str().unwrap().to_owned()).collect()
}

/// The lab in `shape`, held for the test.
fn shape(shape: Shape) -> LabGuard {
    let guard = LabGuard::up(&shape.options()).unwrap();
    shape.apply().unwrap();
    guard
}

/// Applies the fix as wgtrace printed it.
fn apply(fix: &Value) {
    let commands: Vec<String> =
        fix["commands"].as_array().unwrap().iter().map(|c| c.as_str().unwrap().to_owned()).collect();
    shapes::apply_commands(&commands).unwrap();
}

/// The same verdict, outer, loop and fix kind in both reports.
fn agree(checked: &Value, traced: &Value) {
    for key in ["verdict", "nested_in", "nesting", "loop"] {
        assert_eq!(checked[key], traced[key], "{key}: check {checked:#} vs run {traced:#}");
    }
    assert_eq!(checked["outer"]["kind"], traced["outer"]["kind"]);
    assert_eq!(checked["fix_details"]["kind"], traced["fix_details"]["kind"]);
}

#[test]
fn a_tunnel_that_lost_its_own_mark_is_a_loop_in_run_and_check_and_restoring_it_fixes_it() {
    if !privileged_or_skip("a_tunnel_that_lost_its_own_mark_is_a_loop_in_run_and_check_and_restoring_it_fixes_it") {
        return;
    }
    let _lab = shape(Shape::SelfLoop);
    let (code, report, _) = check();
    assert_eq!(code, 1, "{report:#}");
    let checked = check_peer(&report, "wg0");
    assert_eq!(checked["verdict"], "loop", "{checked:#}");
    assert_eq!(checked["loop"], serde_json::json!(["wg0"]));
    assert!(checked["explanation"].as_str().unwrap().contains("lost its own mark 0xca6c"), "{checked:#}");
    assert_eq!(checked["fix_details"]["kind"], "restore_mark");
    assert_eq!(checked["fix_details"]["verified_egress_interface"], "c0");
    assert!(finding_kinds(check_tunnel(&report, "wg0")).contains(&"loop".to_owned()));

    let traced = {
        let _traffic = Traffic::ping(lab::WG0_REMOTE).unwrap();
        trace_json(3.0, &[]).unwrap()
    };
    let wg0 = client_peer(&traced, "wg0");
    assert_eq!(wg0["transport"]["egress_interface"], "wg0", "{wg0:#}");
    assert!(wg0["transport"]["packets"].as_u64().unwrap() > 0);
    agree(checked, wg0);
    let loop_finding =
        client_tunnel(&traced, "wg0")["findings"].as_array().unwrap().iter().find(|f| f["kind"] == "loop");
    assert_eq!(loop_finding.expect("run reports the loop as a finding")["severity"], "error");

    apply(&checked["fix_details"]);
    shapes::reset_endpoint("wg0").unwrap();
    // wireguard-go's queues still hold the packets that looped while the
    // mark was lost (gigabytes of re-encryptions); a ping waits behind them
    // until they drain out through c0, which took longer than 10 s on a
    // loaded CI machine.
    lab::wait_for_ping(lab::WG0_REMOTE, Duration::from_secs(45)).unwrap();
    let (_, report, _) = check();
    let fixed = check_peer(&report, "wg0");
    assert_eq!(
        (fixed["verdict"].as_str(), fixed["transport"]["egress_interface"].as_str()),
        (Some("direct"), Some("c0"))
    );
}

#[test]
fn two_full_tunnels_form_a_mutual_loop_and_one_default_route_ends_it() {
    if !privileged_or_skip("two_full_tunnels_form_a_mutual_loop_and_one_default_route_ends_it") {
        return;
    }
    let _lab = shape(Shape::MutualLoop);
    let (code, report, _) = check();
    assert_eq!(code, 1, "{report:#}");
    let wg0 = check_peer(&report, "wg0");
    let wg4 = check_peer(&report, "wg4");
    assert_eq!((wg0["verdict"].as_str(), wg4["verdict"].as_str()), (Some("loop"), Some("loop")), "{report:#}");
    assert_eq!(wg0["loop"], serde_json::json!(["wg0", "wg4"]));
    assert_eq!(wg4["loop"], serde_json::json!(["wg4", "wg0"]));
    assert!(wg0["explanation"].as_str().unwrap().contains("only one may own the default route"), "{wg0:#}");
    assert_eq!(wg0["fix_details"]["kind"], "one_default_route");
    assert_eq!(check_tunnel(&report, "wg4")["manager"], "wg-quick");

    let traced = {
        let _traffic = Traffic::ping(lab::WG0_REMOTE).unwrap();
        trace_json(6.0, &[]).unwrap()
    };
    let seen: Vec<&Value> =
        ["wg0", "wg4"].iter().map(|t| client_peer(&traced, t)).filter(|p| !p["transport"].is_null()).collect();
    assert!(!seen.is_empty(), "the loop's packets were seen: {traced:#}");
    for peer in &seen {
        assert_ne!(peer["verdict"], "direct", "a loop is never called direct: {peer:#}");
    }
    if seen.len() == 2 {
        agree(wg0, client_peer(&traced, "wg0"));
    }

    apply(&wg0["fix_details"]);
    shapes::reset_endpoint("wg0").unwrap();
    let (_, report, _) = check();
    let fixed = check_peer(&report, "wg0");
    assert_eq!(fixed["verdict"], "direct", "{report:#}");
    assert!(!finding_kinds(check_tunnel(&report, "wg4")).contains(&"loop".to_owned()), "{report:#}");
}

#[test]
fn wireguard_inside_an_openvpn_style_tun_vpn_is_nested_with_a_verified_mark_and_rule() {
    if !privileged_or_skip("wireguard_inside_an_openvpn_style_tun_vpn_is_nested_with_a_verified_mark_and_rule") {
        return;
    }
    let _lab = shape(Shape::TunDef1);
    let (code, report, _) = check();
    assert_eq!(code, 1, "{report:#}");
    let checked = check_peer(&report, "wg1");
    assert_eq!(
        (checked["verdict"].as_str(), checked["nested_in"].as_str()),
        (Some("nested"), Some("tun0")),
        "{checked:#}"
    );
    assert_eq!(checked["outer"]["kind"], "tun");
    assert!(checked["outer"]["owner"].as_str().unwrap().starts_with("vpn-relay (pid "), "{checked:#}");
    assert!(checked["explanation"].as_str().unwrap().contains("`def1` routes"));
    assert_eq!(checked["fix_details"]["kind"], "mark_and_rule");

    let traced = {
        let _traffic = Traffic::ping(lab::WG1_REMOTE).unwrap();
        trace_json(3.0, &[]).unwrap()
    };
    let wg1 = client_peer(&traced, "wg1");
    assert_eq!(wg1["transport"]["egress_interface"], "tun0", "{wg1:#}");
    agree(checked, wg1);
    assert_eq!(wg1["fix_details"]["commands"], checked["fix_details"]["commands"]);

    apply(&checked["fix_details"]);
    shapes::reset_endpoint("wg1").unwrap();
    lab::wait_for_ping(lab::WG1_REMOTE, Duration::from_secs(10)).unwrap();
    let (code, report, _) = check();
    let fixed = check_peer(&report, "wg1");
    assert_eq!(
        (fixed["verdict"].as_str(), fixed["transport"]["egress_interface"].as_str()),
        (Some("direct"), Some("c0"))
    );
    assert_eq!(code, 0, "{report:#}");
    let traced = {
        let _traffic = Traffic::ping(lab::WG1_REMOTE).unwrap();
        trace_json(2.0, &[]).unwrap()
    };
    let wg1 = client_peer(&traced, "wg1");
    assert_eq!((wg1["verdict"].as_str(), wg1["transport"]["egress_interface"].as_str()), (Some("direct"), Some("c0")));
}

#[test]
fn a_manager_owned_mark_captured_by_a_later_wg_quick_gets_a_rule_fix() {
    if !privileged_or_skip("a_manager_owned_mark_captured_by_a_later_wg_quick_gets_a_rule_fix") {
        return;
    }
    let _lab = shape(Shape::ManagerMark);
    let (code, report, _) = check();
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(check_tunnel(&report, "wg1")["manager"], "tailscale");
    let checked = check_peer(&report, "wg1");
    assert_eq!(
        (checked["verdict"].as_str(), checked["nested_in"].as_str()),
        (Some("nested"), Some("wg0")),
        "{checked:#}"
    );
    assert_eq!(checked["fix_details"]["kind"], "rule");
    assert_eq!(
        checked["fix_details"]["commands"],
        serde_json::json!(["ip rule add fwmark 0x80000/0xff0000 lookup main priority 5208"])
    );
    assert!(!checked["fix"].as_str().unwrap().contains("FwMark"), "never a new mark: {checked:#}");

    let traced = {
        let _traffic = Traffic::ping(lab::WG1_REMOTE).unwrap();
        trace_json(3.0, &[]).unwrap()
    };
    agree(checked, client_peer(&traced, "wg1"));

    apply(&checked["fix_details"]);
    shapes::reset_endpoint("wg1").unwrap();
    lab::wait_for_ping(lab::WG1_REMOTE, Duration::from_secs(10)).unwrap();
    let (_, report, _) = check();
    let fixed = check_peer(&report, "wg1");
    assert_eq!(
        (fixed["verdict"].as_str(), fixed["transport"]["egress_interface"].as_str()),
        (Some("direct"), Some("c0"))
    );
}

#[test]
fn an_inner_mtu_that_does_not_fit_is_a_finding_in_run_and_check() {
    if !privileged_or_skip("an_inner_mtu_that_does_not_fit_is_a_finding_in_run_and_check") {
        return;
    }
    let _lab = shape(Shape::Mtu);
    let (_, report, _) = check();
    let mtu = |tunnel: &Value| {
        tunnel["findings"].as_array().unwrap().iter().find(|f| f["kind"] == "mtu").cloned().expect("an mtu finding")
    };
    let checked = mtu(check_tunnel(&report, "wg1"));
    assert!(checked["message"].as_str().unwrap().contains("Set MTU = 1360 on wg1"), "{checked:#}");
    // Full-size packets for wg1 (1392 + 8 + 20 = its MTU of 1420): its
    // 1480-byte transport does not fit into wg0's 1420 and is fragmented.
    let traced = {
        let _traffic = Traffic::ping_sized(lab::WG1_REMOTE, 1392).unwrap();
        trace_json(2.0, &[]).unwrap()
    };
    assert_eq!(mtu(client_tunnel(&traced, "wg1"))["message"], checked["message"]);
    let wg1 = &client_peer(&traced, "wg1")["transport"];
    let (sent, fragmented) = (wg1["packets"].as_u64().unwrap(), wg1["fragmented_packets"].as_u64().unwrap());
    assert!(sent > 0 && fragmented * 2 >= sent, "most of wg1's transport was fragmented: {wg1:#}");
    // wg0 carries those fragments (each fits) and its own packets fit the
    // underlay: none of its transport is fragmented.
    assert_eq!(client_peer(&traced, "wg0")["transport"]["fragmented_packets"], 0, "{traced:#}");
}

#[test]
fn a_bridge_underlay_does_not_change_the_verdict() {
    if !privileged_or_skip("a_bridge_underlay_does_not_change_the_verdict") {
        return;
    }
    let _lab = shape(Shape::Bridge);
    let (code, report, _) = check();
    assert_eq!(code, 0, "{report:#}");
    let traced = {
        let _wg0 = Traffic::ping(lab::WG0_REMOTE).unwrap();
        let _wg1 = Traffic::ping(lab::WG1_REMOTE).unwrap();
        trace_json(2.0, &[]).unwrap()
    };
    for interface in ["wg0", "wg1"] {
        let (checked, traced) = (check_peer(&report, interface), client_peer(&traced, interface));
        assert_eq!(checked["verdict"], "direct", "{checked:#}");
        assert_eq!(checked["transport"]["egress_interface"], "br0");
        assert_eq!(traced["transport"]["egress_interface"], "br0", "a bridge port is shown as its bridge: {traced:#}");
        agree(checked, traced);
    }
}
