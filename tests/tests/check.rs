//! `wgtrace check` on the real lab: a static diagnosis from the kernel's
//! routing, no eBPF.

use std::process::{Command, Output};

use wgtrace_tests::{LabGuard, lab, privileged_or_skip, wgtrace_bin};

/// Runs `wgtrace check ARGS` inside the lab client's network namespace.
fn check(args: &[&str]) -> (i32, serde_json::Value, Output) {
    let output = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab::CLIENT))
        .arg(wgtrace_bin())
        .arg("check")
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    let json = serde_json::from_slice(&output.stdout).unwrap_or(serde_json::Value::Null);
    (output.status.code().unwrap_or(-1), json, output)
}

fn peer<'a>(report: &'a serde_json::Value, interface: &str) -> &'a serde_json::Value {
    &report["tunnels"].as_array().unwrap().iter().find(|t| t["interface"] == interface).unwrap()["peers"][0]
}

fn has_finding(report: &serde_json::Value, kind: &str, severity: &str) -> bool {
    report["findings"].as_array().unwrap().iter().any(|f| f["kind"] == kind && f["severity"] == severity)
}

#[test]
fn broken_lab_fails_with_a_verified_fix_and_fixed_lab_passes() {
    if !privileged_or_skip("broken_lab_fails_with_a_verified_fix_and_fixed_lab_passes") {
        return;
    }
    let _lab = LabGuard::up(&lab::LabOptions::default()).unwrap();
    let (code, report, output) = check(&[]);
    assert_eq!(code, 1, "problems found: {}", String::from_utf8_lossy(&output.stderr));
    let wg1 = peer(&report, "wg1");
    assert_eq!(wg1["nested_in"], "wg0", "{report:#}");
    assert_eq!(wg1["transport"]["egress_interface"], "wg0");
    assert_eq!(wg1["transport"]["route_table"], 51820);
    assert_eq!(wg1["transport"]["mark"], 0);
    assert!(wg1["transport"]["packets"].is_null(), "check sees no packets, so claims none");
    assert!(wg1["fix"].as_str().unwrap().contains("51820"));
    assert_eq!(wg1["fix_details"]["verified_egress_interface"], "c0");
    assert!(has_finding(&report, "nested", "warning"));
    assert!(peer(&report, "wg0")["nested_in"].is_null());

    // The human form says the same.
    let human = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab::CLIENT))
        .arg(wgtrace_bin())
        .arg("check")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(text.contains("wg1 is nested inside wg0") && text.contains("wg set wg1 fwmark 51820"), "{text}");

    lab::fix().unwrap();
    let (code, report, _) = check(&[]);
    assert_eq!(code, 0, "healthy after the fix: {report:#}");
    assert!(peer(&report, "wg1")["nested_in"].is_null());
    assert_eq!(peer(&report, "wg1")["transport"]["egress_interface"], "c0");
}

#[test]
fn a_config_that_would_be_captured_is_flagged_before_it_is_up() {
    if !privileged_or_skip("a_config_that_would_be_captured_is_flagged_before_it_is_up") {
        return;
    }
    let _lab = LabGuard::up(&lab::LabOptions::default()).unwrap();
    lab::fix().unwrap(); // only the new config is a problem
    let dir = std::env::temp_dir().join(format!("wgtrace-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("wg9.conf");
    std::fs::write(
        &config,
        format!(
            "[Interface]\nPrivateKey = aGVsbG8gd29ybGQgaGVsbG8gd29ybGQgaGVsbG8gd28=\nListenPort = 51829\n\n\
             [Peer]\nPublicKey = uFmW/sycfx/G0lcqdu2hHVm80gvo5UOxXOS9hajnWjM=\nEndpoint = {}:51829\n\
             AllowedIPs = 198.18.9.0/24\n",
            lab::ROUTER_PUBLIC_V4
        ),
    )
    .unwrap();
    let (code, report, _) = check(&["--config", config.to_str().unwrap()]);
    assert_eq!(code, 1, "{report:#}");
    let wg9 = peer(&report, "wg9");
    assert_eq!(wg9["nested_in"], "wg0", "{report:#}");
    assert!(wg9["fix"].as_str().unwrap().contains("51820"));
    assert!(!serde_json::to_string(&report).unwrap().contains("aGVsbG8"), "the private key never appears");

    // A config whose endpoint sits inside its own AllowedIPs would loop.
    std::fs::write(&config, std::fs::read_to_string(&config).unwrap().replace("198.18.9.0/24", "192.0.2.128/25"))
        .unwrap();
    let (code, report, _) = check(&["--config", config.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(has_finding(&report, "loop", "error"), "{report:#}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn routing_loops_and_mark_collisions_on_live_tunnels() {
    if !privileged_or_skip("routing_loops_and_mark_collisions_on_live_tunnels") {
        return;
    }
    let _lab = LabGuard::up(&lab::LabOptions::default()).unwrap();
    lab::fix().unwrap();
    // wg1 now also routes its own endpoint: its transport would enter wg1.
    let peer_key = lab::load_state().unwrap().public_keys[&format!("{}/wg1", lab::ROUTER)].clone();
    let allowed = format!("203.0.113.0/24,{}/32", lab::ROUTER_PUBLIC_V4);
    lab::client_wg("wg1", &["set", "wg1", "fwmark", "0", "peer", &peer_key, "allowed-ips", &allowed]).unwrap();
    let ip = |args: &str| {
        let status = Command::new("sh").args(["-c", &format!("ip -n {} {args}", lab::CLIENT)]).status().unwrap();
        assert!(status.success(), "ip {args}");
    };
    ip(&format!("route add {}/32 dev wg1", lab::ROUTER_PUBLIC_V4));
    // A Tailscale-style rule and a rule whose mark falls inside its mask.
    ip("rule add fwmark 0x80000/0xff0000 lookup 52 pref 5270");
    ip("rule add fwmark 0x8ca6c lookup 100 pref 6000");
    let (code, report, _) = check(&[]);
    assert_eq!(code, 1);
    assert!(has_finding(&report, "loop", "error"), "{report:#}");
    let overlap = report["findings"].as_array().unwrap().iter().find(|f| f["kind"] == "mark_overlap").unwrap();
    assert!(overlap["message"].as_str().unwrap().contains("Tailscale"), "{overlap:#}");
}
