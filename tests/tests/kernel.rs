//! What differs between kernel and userspace WireGuard, checked on whichever
//! the lab runs: wireguard-go on the host, wireguard.ko in `cargo xtask vm-test`.

use wgtrace_tests::{LabGuard, Traffic, client_tunnel, lab, privileged_or_skip, trace_json};

fn kernel_lab() -> bool {
    lab::LabOptions::default().kernel
}

#[test]
fn the_report_says_which_implementation_each_tunnel_uses() {
    if !privileged_or_skip("the_report_says_which_implementation_each_tunnel_uses") {
        return;
    }
    let _lab = LabGuard::up(&lab::LabOptions::default()).unwrap();
    let _traffic = Traffic::ping(lab::WG1_REMOTE).unwrap();
    let report = trace_json(3.0, &[]).unwrap();
    let expected = if kernel_lab() { "kernel" } else { "userspace" };
    for interface in ["wg0", "wg1"] {
        let tunnel = client_tunnel(&report, interface);
        assert_eq!(tunnel["implementation"], expected, "{tunnel:#}");
        assert_eq!(tunnel["listen_port"], if interface == "wg0" { 51820 } else { 51821 }, "configuration read");
    }
    assert_eq!(client_tunnel(&report, "wg0")["fwmark"], 51820);
    assert_eq!(client_tunnel(&report, "wg1")["peers"][0]["nested_in"], "wg0");
}
