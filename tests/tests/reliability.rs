//! wgtrace must never be what breaks the box: nothing left attached however
//! it ends, and tracing that follows tunnels and daemons as they come and go.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use wgtrace_tests::{LabGuard, Trace, Traffic, client_peer, lab, privileged_or_skip, wgtrace_bin};

const PROGRAMS: [&str; 4] = ["net_dev_start_xmit", "netif_receive_skb", "fib_table_lookup", "fib6_table_lookup"];

/// IDs of loaded BPF programs with wgtrace's names, and of links to them.
fn wgtrace_objects() -> (Vec<u64>, Vec<u64>) {
    let progs: serde_json::Value =
        serde_json::from_slice(&Command::new("bpftool").args(["prog", "show", "--json"]).output().unwrap().stdout)
            .unwrap();
    let ids: Vec<u64> = progs
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| PROGRAMS.contains(&p["name"].as_str().unwrap_or("")))
        .map(|p| p["id"].as_u64().unwrap())
        .collect();
    let links: serde_json::Value =
        serde_json::from_slice(&Command::new("bpftool").args(["link", "show", "--json"]).output().unwrap().stdout)
            .unwrap();
    let links = links
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| ids.contains(&l["prog_id"].as_u64().unwrap_or(0)))
        .map(|l| l["id"].as_u64().unwrap())
        .collect();
    (ids, links)
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn start(args: &[&str]) -> Child {
    Command::new(wgtrace_bin()).arg("run").args(args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap()
}

/// No tc filter or qdisc may appear on any lab interface (wgtrace uses none).
fn tc_state() -> String {
    lab::NAMESPACES
        .iter()
        .map(|ns| {
            let out = Command::new("sh")
                .args([
                    "-c",
                    &format!(
                        "ip -n {ns} -o link show | cut -d: -f2 | while read d; do d=${{d%@*}}; \
                     tc -n {ns} qdisc show dev $d; tc -n {ns} filter show dev $d ingress 2>/dev/null; \
                     tc -n {ns} filter show dev $d egress 2>/dev/null; done"
                    ),
                ])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
        .collect()
}

#[test]
fn nothing_is_left_attached_however_wgtrace_ends() {
    if !privileged_or_skip("nothing_is_left_attached_however_wgtrace_ends") {
        return;
    }
    let _lab = LabGuard::up(&lab::LabOptions::default()).unwrap();
    assert!(wgtrace_objects().0.is_empty(), "a wgtrace from elsewhere is still attached");
    let tc_before = tc_state();
    let endings: [(&str, Option<i32>); 5] = [
        ("--duration expiry", None),
        ("SIGINT", Some(libc::SIGINT)),
        ("SIGTERM", Some(libc::SIGTERM)),
        ("SIGKILL", Some(libc::SIGKILL)),
        ("SIGABRT (what a panic with panic=abort does)", Some(libc::SIGABRT)),
    ];
    for (ending, signal) in endings {
        let mut child = match signal {
            None => start(&["--duration", "1.5"]),
            Some(_) => start(&[]),
        };
        wait_until(&format!("{ending}: programs attached"), Duration::from_secs(10), || {
            let (progs, links) = wgtrace_objects();
            progs.len() == PROGRAMS.len() && links.len() == PROGRAMS.len()
        });
        if let Some(signal) = signal {
            unsafe { libc::kill(child.id() as i32, signal) };
        }
        let status = child.wait().unwrap();
        if matches!(signal, None | Some(libc::SIGINT) | Some(libc::SIGTERM)) {
            assert!(status.success(), "{ending}: clean exit expected, got {status}");
        }
        wait_until(&format!("{ending}: everything detached"), Duration::from_secs(5), || {
            wgtrace_objects() == (vec![], vec![])
        });
        let pinned = std::fs::read_dir("/sys/fs/bpf")
            .map(|d| d.flatten().filter(|e| e.file_name().to_string_lossy().contains("wgtrace")).count())
            .unwrap_or(0);
        assert_eq!(pinned, 0, "{ending}: nothing pinned");
    }
    assert_eq!(tc_state(), tc_before, "no tc qdisc or filter added in any lab namespace");
}

#[test]
fn tracing_follows_tunnels_and_daemons_as_they_come_and_go() {
    if !privileged_or_skip("tracing_follows_tunnels_and_daemons_as_they_come_and_go") {
        return;
    }
    let _lab = LabGuard::up(&lab::LabOptions { delay_ms: 0, ..Default::default() }).unwrap();
    let trace = Trace::start(9.0, &["--interval", "0.5"]).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let _wg1 = Traffic::ping(lab::WG1_REMOTE).unwrap();
    // A tunnel appears while tracing; then wg1's daemon restarts (new PID,
    // new TUN device with a new ifindex); handshakes happen as they do.
    lab::add_tunnel("wg2").unwrap();
    let _wg2 = Traffic::ping(lab::WG2_REMOTE).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    lab::restart_client_daemon("wg1").unwrap();
    lab::rekey("wg2").unwrap();
    lab::wait_for_ping(lab::WG1_REMOTE, Duration::from_secs(10)).unwrap();
    let report = trace.report().unwrap();
    let wg2 = client_peer(&report, "wg2");
    assert_eq!(wg2["nested_in"], "wg1", "a tunnel created mid-run gets its verdict: {wg2:#}");
    assert!(wg2["latency"]["inner_rtt_us"]["count"].as_u64().unwrap() > 0, "and its latency: {wg2:#}");
    let wg1 = client_peer(&report, "wg1");
    assert_eq!(wg1["nested_in"], "wg0", "after the restart wg1 is still traced: {wg1:#}");
    assert!(
        wg1["latency"]["inner_rtt_us"]["count"].as_u64().unwrap() > 0,
        "the restarted daemon's new device is timed: {wg1:#}"
    );
    assert_eq!(report["events_lost"], 0);
}

#[test]
fn link_notifications_find_a_new_tunnel_long_before_the_next_interval() {
    if !privileged_or_skip("link_notifications_find_a_new_tunnel_long_before_the_next_interval") {
        return;
    }
    let _lab = LabGuard::up(&lab::LabOptions { delay_ms: 0, ..Default::default() }).unwrap();
    let _wg1 = Traffic::ping(lab::WG1_REMOTE).unwrap();
    // Polling alone would not look again within the run.
    let trace = Trace::start(10.0, &["--interval", "60"]).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    lab::add_tunnel("wg2").unwrap();
    let _wg2 = Traffic::ping(lab::WG2_REMOTE).unwrap();
    let report = trace.report().unwrap();
    let wg2 = client_peer(&report, "wg2");
    assert_eq!(wg2["nested_in"], "wg1", "wg2's link notification started a discovery: {wg2:#}");
}
