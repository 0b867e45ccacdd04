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

/// The wireguard.com/netns pattern: kernel interfaces created in a "birth"
/// namespace and moved into another, whose sockets (and so their encrypted
/// transport) stay in the birth namespace. One is direct (through the birth
/// namespace's veth), one rides inside a tunnel that stays there.
mod moved {
    use std::process::Command;

    use anyhow::{Context as _, Result};
    use wgtrace_tests::{TempDir, Trace, lab, wgtrace_bin};

    pub const BIRTH: &str = "wgtmv-birth";
    pub const INNER: &str = "wgtmv-inner";
    pub const PEER: &str = "wgtmv-peer";

    fn sh(script: &str) -> Result<String> {
        let output = Command::new("sh").args(["-e", "-c", script]).output().context("running sh")?;
        anyhow::ensure!(
            output.status.success(),
            "`{script}` failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }

    /// The three namespaces, removed (with every interface in them) on drop.
    pub struct Setup {
        _keys: TempDir,
        _lock: std::fs::File,
    }

    impl Drop for Setup {
        fn drop(&mut self) {
            for ns in [INNER, BIRTH, PEER] {
                let _ = Command::new("ip").args(["netns", "del", ns]).status();
            }
        }
    }

    impl Setup {
        pub fn up() -> Result<Self> {
            let lock = lab::lock()?;
            let keys = TempDir::new("wgtrace-moved")?;
            let dir = keys.0.display().to_string();
            let setup = Self { _keys: keys, _lock: lock };
            for ns in [INNER, BIRTH, PEER] {
                let _ = Command::new("ip").args(["netns", "del", ns]).output();
            }
            let mut script = String::from("umask 077\n");
            for name in ["mv", "mn", "out", "pd", "pn", "outc"] {
                script.push_str(&format!("wg genkey > {dir}/{name}; wg pubkey < {dir}/{name} > {dir}/{name}.pub\n"));
            }
            let key = |name: &str| format!("$(cat {dir}/{name}.pub)");
            let wg = |ns: &str, dev: &str, port: u16, private: &str, peer: &str, endpoint: &str, allowed: &str| {
                format!(
                    "ip netns exec {ns} wg set {dev} listen-port {port} private-key {dir}/{private} peer {} \
                     endpoint {endpoint} allowed-ips {allowed}\n",
                    key(peer)
                )
            };
            script.push_str(&format!(
                "for ns in {BIRTH} {INNER} {PEER}; do ip netns add $ns; ip -n $ns link set lo up; done\n\
                 ip -n {BIRTH} link add mv0 type veth peer name mv1 netns {PEER}\n\
                 ip -n {BIRTH} addr add 192.0.2.1/24 dev mv0; ip -n {BIRTH} link set mv0 up\n\
                 ip -n {PEER} addr add 192.0.2.2/24 dev mv1; ip -n {PEER} link set mv1 up\n\
                 ip -n {BIRTH} link add wgout type wireguard\n\
                 ip -n {PEER} link add wgoutc type wireguard\n\
                 ip -n {PEER} link add wgpd type wireguard\n\
                 ip -n {PEER} link add wgpn type wireguard\n\
                 ip -n {BIRTH} link add wgmv type wireguard\n\
                 ip -n {BIRTH} link add wgmn type wireguard\n"
            ));
            // The outer tunnel stays in the birth namespace and carries
            // 198.51.100.0/24, where wgmn's peer's endpoint is.
            script.push_str(&wg(BIRTH, "wgout", 51840, "out", "outc", "192.0.2.2:51841", "198.51.100.0/24"));
            script.push_str(&wg(PEER, "wgoutc", 51841, "outc", "out", "192.0.2.1:51840", "198.51.100.1/32"));
            script.push_str(&wg(BIRTH, "wgmv", 51830, "mv", "pd", "192.0.2.2:51831", "10.77.0.2/32"));
            script.push_str(&wg(BIRTH, "wgmn", 51832, "mn", "pn", "198.51.100.2:51833", "10.78.0.2/32"));
            script.push_str(&wg(PEER, "wgpd", 51831, "pd", "mv", "192.0.2.1:51830", "10.77.0.1/32"));
            script.push_str(&wg(PEER, "wgpn", 51833, "pn", "mn", "198.51.100.1:51832", "10.78.0.1/32"));
            script.push_str(&format!(
                "ip -n {BIRTH} addr add 198.51.100.1/24 dev wgout; ip -n {BIRTH} link set wgout up\n\
                 ip -n {PEER} addr add 198.51.100.2/24 dev wgoutc; ip -n {PEER} link set wgoutc up\n\
                 ip -n {PEER} addr add 10.77.0.2/24 dev wgpd; ip -n {PEER} link set wgpd up\n\
                 ip -n {PEER} addr add 10.78.0.2/24 dev wgpn; ip -n {PEER} link set wgpn mtu 1360 up\n\
                 ip -n {BIRTH} link set wgmv netns {INNER}\n\
                 ip -n {BIRTH} link set wgmn netns {INNER}\n\
                 ip -n {INNER} addr add 10.77.0.1/24 dev wgmv; ip -n {INNER} link set wgmv up\n\
                 ip -n {INNER} addr add 10.78.0.1/24 dev wgmn; ip -n {INNER} link set wgmn up\n"
            ));
            sh(&script)?;
            for address in ["10.77.0.2", "10.78.0.2"] {
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
                while !Command::new("ip")
                    .args(["netns", "exec", INNER, "ping", "-c1", "-W1", address])
                    .output()?
                    .status
                    .success()
                {
                    anyhow::ensure!(std::time::Instant::now() < deadline, "no ping reply from {address}");
                }
            }
            Ok(setup)
        }
    }

    /// `wgtrace run --json EXTRA` while both moved tunnels carry pings.
    pub fn run_report(seconds: f64, extra: &[&str]) -> Result<serde_json::Value> {
        let mut pings = Vec::new();
        for address in ["10.77.0.2", "10.78.0.2"] {
            pings.push(
                Command::new("ip")
                    .args(["netns", "exec", INNER, "ping", "-q", "-i", "0.2", address])
                    .stdout(std::process::Stdio::null())
                    .spawn()?,
            );
        }
        let report = Trace::start(seconds, extra)?.report();
        for mut ping in pings {
            let _ = ping.kill();
            let _ = ping.wait();
        }
        report
    }

    pub fn check_report() -> Result<(i32, serde_json::Value)> {
        let output = Command::new(wgtrace_bin()).args(["check", "--all-netns", "--json"]).output()?;
        let json = serde_json::from_slice(&output.stdout)
            .with_context(|| format!("check printed no JSON: {}", String::from_utf8_lossy(&output.stderr)))?;
        Ok((output.status.code().unwrap_or(-1), json))
    }

    pub fn tunnel<'a>(report: &'a serde_json::Value, interface: &str) -> &'a serde_json::Value {
        report["tunnels"]
            .as_array()
            .expect("tunnels")
            .iter()
            .find(|t| t["netns"] == INNER && t["interface"] == interface)
            .unwrap_or_else(|| panic!("no {interface} in {INNER}: {report:#}"))
    }
}

#[test]
fn a_kernel_interface_moved_to_another_namespace_is_judged_where_its_socket_is() {
    if !privileged_or_skip("a_kernel_interface_moved_to_another_namespace_is_judged_where_its_socket_is") {
        return;
    }
    if !kernel_lab() {
        eprintln!("*** SKIPPED: kernel WireGuard runs only in the VM (`cargo xtask vm-test`) ***");
        return;
    }
    let _setup = moved::Setup::up().unwrap();
    let run = moved::run_report(4.0, &[]).unwrap();
    // The privileged helper opens the sock_diag sockets after the drop.
    // (Attaching under emulation is slow, and discovery starts after it.)
    let dropped = moved::run_report(12.0, &["--drop-privileges"]).unwrap();
    let (code, check) = moved::check_report().unwrap();
    for (command, report) in [("run", &run), ("run --drop-privileges", &dropped), ("check", &check)] {
        let direct = moved::tunnel(report, "wgmv");
        assert_eq!(direct["implementation"], "kernel", "{command}: {direct:#}");
        let peer = &direct["peers"][0];
        assert_eq!(peer["verdict"], "direct", "{command}: {peer:#}");
        assert_eq!(peer["transport"]["egress_interface"], "mv0", "{command}: {peer:#}");
        assert_eq!(direct["transport_netns"], moved::BIRTH, "{command}: {direct:#}");

        let nested = moved::tunnel(report, "wgmn");
        let peer = &nested["peers"][0];
        assert_eq!(peer["verdict"], "nested", "{command}: {peer:#}");
        assert_eq!(peer["outer"]["interface"], "wgout", "{command}: {peer:#}");
        assert_eq!(peer["outer"]["kind"], "wireguard", "{command}: {peer:#}");
        assert_eq!(peer["nesting"], "deliberate", "{command}: a specific route sends it there: {peer:#}");
        assert_eq!(peer["transport"]["egress_interface"], "wgout", "{command}: {peer:#}");
        assert_eq!(nested["transport_netns"], moved::BIRTH, "{command}: {nested:#}");
    }
    // wgmn keeps WireGuard's default MTU 1420 inside wgout's 1420: the
    // outer device's MTU is read in the birth namespace. (wgpn, its peer,
    // is set to 1360 and fits.)
    for (command, report) in [("run", &run), ("check", &check)] {
        let findings = moved::tunnel(report, "wgmn")["findings"].as_array().unwrap();
        assert!(
            findings.iter().any(|f| f["kind"] == "mtu"
                && f["message"].as_str().unwrap().contains("inside wgout (MTU 1420)")
                && f["message"].as_str().unwrap().contains("Set MTU = 1360 on wgmn")),
            "{command}: {findings:#?}"
        );
    }
    let problems: Vec<_> = check["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["severity"] != "info")
        .map(|f| (f["interface"].as_str().unwrap_or(""), f["kind"].as_str().unwrap_or("")))
        .collect();
    assert_eq!(problems, vec![("wgmn", "mtu")], "{check:#}");
    assert_eq!(code, 1, "the MTU warning is the one problem: {check:#}");
    for (report, interface) in [(&run, "wgmv"), (&run, "wgmn"), (&dropped, "wgmv")] {
        let transport = &moved::tunnel(report, interface)["peers"][0]["transport"];
        assert!(transport["packets"].as_u64().unwrap() > 0, "run saw {interface}'s packets: {transport:#}");
    }
}
