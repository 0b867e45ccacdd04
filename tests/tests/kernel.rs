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

#[test]
fn transmit_latency_is_measured_the_way_the_implementation_allows() {
    if !privileged_or_skip("transmit_latency_is_measured_the_way_the_implementation_allows") {
        return;
    }
    let _lab = LabGuard::up(&lab::LabOptions { delay_ms: 0, ..Default::default() }).unwrap();
    let _wg1 = Traffic::ping(lab::WG1_REMOTE).unwrap();
    let _wg0 = Traffic::ping(lab::WG0_REMOTE).unwrap();
    let report = trace_json(3.0, &[]).unwrap();
    // Kernel WireGuard keeps the skb through encryption; userspace copies it.
    let expected = if kernel_lab() { "skb_identity" } else { "length_prediction" };
    for interface in ["wg0", "wg1"] {
        let latency = &client_tunnel(&report, interface)["peers"][0]["latency"];
        assert!(latency["transmit_us"]["count"].as_u64().unwrap() > 0, "{interface}: {latency:#}");
        assert_eq!(latency["transmit_method"], expected, "{interface}: {latency:#}");
    }
    // wg1's packets are encrypted twice (wg1, then wg0): with wireguard-go
    // on real CPUs its transmit path is measurably longer. (In the VM, under
    // software emulation, kernel workqueue scheduling noise swamps that.)
    if !kernel_lab() {
        let p50 = |interface| {
            client_tunnel(&report, interface)["peers"][0]["latency"]["transmit_us"]["p50"].as_u64().unwrap()
        };
        assert!(p50("wg1") >= p50("wg0"), "nested transmit {} µs vs outer {} µs", p50("wg1"), p50("wg0"));
    }
}
