//! WireGuard speakers without a UAPI, on the real lab: a Tailscale-style
//! pair (wireguard-go running as `tailscaled`, UAPI socket moved away after
//! configuration, mark 0x80000 under Tailscale's rules, captured by wg0's
//! rules above them) is found from its packets, judged nested, and direct
//! after the rule fix; plain sockets sending WireGuard-shaped datagrams
//! make no speaker and leave wgtrace's memory flat.

use std::time::Duration;

use wgtrace_tests::{LabGuard, Trace, Traffic, lab, privileged_or_skip};
use xtask::speakers_lab::{self, ShapedSender, SpeakersLab};

fn tunnel<'a>(report: &'a serde_json::Value, netns: &str, interface: &str) -> Option<&'a serde_json::Value> {
    report["tunnels"].as_array()?.iter().find(|t| t["netns"] == netns && t["interface"] == interface)
}

/// Traces for `seconds` while forcing a fresh handshake now and then (a
/// speaker is confirmed only by a handshake wgtrace sees, and discovery
/// must have listed the candidate socket before it).
fn trace_with_handshakes(pair: &SpeakersLab, seconds: f64, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["--interval", "0.5"];
    args.extend_from_slice(extra);
    let trace = Trace::start(seconds, &args).unwrap();
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs_f64(seconds - 2.5) {
        std::thread::sleep(Duration::from_millis(1500));
        pair.rekey().unwrap();
    }
    trace.report().unwrap()
}

#[test]
fn tailscale_style_speaker_is_found_nested_then_direct_after_the_rule_fix() {
    if !privileged_or_skip("tailscale_style_speaker_is_found_nested_then_direct_after_the_rule_fix") {
        return;
    }
    let _lab = LabGuard::up(&lab::LabOptions::default()).unwrap();
    let pair = speakers_lab::up().unwrap();
    let _traffic = Traffic::ping(speakers_lab::REMOTE).unwrap();
    let report = trace_with_handshakes(&pair, 8.0, &[]);
    let ts = tunnel(&report, lab::CLIENT, speakers_lab::INTERFACE).unwrap_or_else(|| panic!("not found: {report:#}"));
    assert_eq!(ts["discovered_by"], "packets", "{ts:#}");
    assert_eq!(ts["process"]["comm"], speakers_lab::COMM);
    assert_eq!(ts["process"]["pid"], pair.client_pid());
    assert_eq!(ts["implementation"], "userspace");
    assert_eq!(ts["listen_port"], speakers_lab::CLIENT_PORT);
    assert_eq!(ts["fwmark"], speakers_lab::MARK, "the mark its packets carry");
    let peers = ts["peers"].as_array().unwrap();
    assert_eq!(peers.len(), 1, "{ts:#}");
    let peer = &peers[0];
    assert!(peer["public_key"].is_null(), "{peer:#}");
    assert_eq!(peer["endpoint"], speakers_lab::ROUTER_ENDPOINT);
    assert_eq!(peer["nested_in"], "wg0", "captured by wg-quick's rules: {report:#}");
    assert_eq!(peer["transport"]["egress_interface"], "wg0");
    assert_eq!(peer["transport"]["mark"], speakers_lab::MARK);
    assert!(peer["transport"]["packets"].as_u64().unwrap() > 0);
    assert_eq!(peer["handshake"]["up"], true, "the handshakes seen: {peer:#}");
    // Its manager owns its mark, so the fix is a rule above wg-quick's, never a FwMark.
    assert_eq!(ts["manager"], "tailscale", "{ts:#}");
    assert_eq!(peer["fix_details"]["kind"], "rule", "{peer:#}");
    // Its peer, equally unlisted, is found in the router and is direct.
    let far = tunnel(&report, lab::ROUTER, speakers_lab::INTERFACE).unwrap_or_else(|| panic!("{report:#}"));
    assert_eq!(far["discovered_by"], "packets");
    assert_eq!(far["process"]["pid"], pair.router_pid());
    // The lab's own tunnels are still found through their UAPI.
    let wg0 = tunnel(&report, lab::CLIENT, "wg0").unwrap();
    assert_eq!(wg0["discovered_by"], "uapi");
    assert_eq!(wg0["process"]["comm"], "wireguard-go");
    println!("nested: {peer:#}");

    pair.fix().unwrap();
    // Discovery through the privileged helper finds it too.
    let report = trace_with_handshakes(&pair, 9.0, &["--drop-privileges"]);
    let ts = tunnel(&report, lab::CLIENT, speakers_lab::INTERFACE).unwrap_or_else(|| panic!("not found: {report:#}"));
    assert_eq!(ts["discovered_by"], "packets");
    let peer = &ts["peers"][0];
    assert!(peer["nested_in"].is_null(), "direct after the fix: {report:#}");
    assert_eq!(peer["transport"]["egress_interface"], "c0");
    assert_eq!(peer["transport"]["mark"], speakers_lab::MARK);
    println!("direct: {peer:#}");
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap().trim().trim_end_matches(" kB").parse().unwrap()
}

#[test]
fn wireguard_shaped_datagrams_from_plain_sockets_make_no_speaker_and_memory_stays_flat() {
    if !privileged_or_skip("wireguard_shaped_datagrams_from_plain_sockets_make_no_speaker_and_memory_stays_flat") {
        return;
    }
    let _lab = LabGuard::up(&lab::LabOptions::default()).unwrap();
    let trace = Trace::start(14.0, &["--interval", "0.5"]).unwrap();
    std::thread::sleep(Duration::from_secs(4));
    let before = rss_kib(trace.pid());
    // The senders outlive the trace: a speaker whose process is gone is
    // no tunnel any more, and the report is taken at the end.
    let seconds = 14.0;
    // A plain responder in the router answering every initiation with a
    // response whose index matches; plain senders to it from the router
    // (on a port that passes the kernel side's port gate: wg0 listens on
    // 51820 elsewhere) and from the client; and a TUN holder without a UAPI
    // (a candidate) whose initiations nobody answers. A second TUN holder,
    // whose trickle of initiations the responder answers, is the control:
    // it must be found, so the others' absence means something.
    let plain = |port, to: Option<&str>, respond, count| ShapedSender {
        tun: None,
        port,
        to: to.map(|t| t.parse().unwrap()),
        count,
        burst: 200,
        respond,
        seconds,
    };
    let mut children = vec![
        speakers_lab::spawn_shaped(lab::ROUTER, &plain(41700, None, true, 0)).unwrap(),
        speakers_lab::spawn_shaped(lab::ROUTER, &plain(51820, Some("127.0.0.1:41700"), false, 40_000)).unwrap(),
        speakers_lab::spawn_shaped(lab::CLIENT, &plain(41702, Some("192.0.2.200:41700"), false, 40_000)).unwrap(),
        speakers_lab::spawn_shaped(
            lab::ROUTER,
            &ShapedSender { tun: Some("tsfake0".into()), ..plain(41710, Some("127.0.0.1:41711"), false, 20_000) },
        )
        .unwrap(),
        speakers_lab::spawn_shaped(
            lab::ROUTER,
            &ShapedSender {
                tun: Some("tsfake1".into()),
                burst: 1,
                ..plain(41720, Some("127.0.0.1:41700"), false, 1_000)
            },
        )
        .unwrap(),
    ];
    // The floods are sent within about a second; the control trickles on.
    std::thread::sleep(Duration::from_secs(7));
    let after = rss_kib(trace.pid());
    let report = trace.report().unwrap();
    for child in &mut children {
        assert!(child.wait().unwrap().success());
    }
    let found: Vec<&serde_json::Value> =
        report["tunnels"].as_array().unwrap().iter().filter(|t| t["discovered_by"] == "packets").collect();
    let control = tunnel(&report, lab::ROUTER, "tsfake1").unwrap_or_else(|| panic!("control not found: {report:#}"));
    assert_eq!(control["peers"][0]["endpoint"], "127.0.0.1:41700");
    assert_eq!(control["listen_port"], 41720);
    assert_eq!(found.len(), 1, "only the answered TUN holder is a speaker: {found:#?}");
    assert!(tunnel(&report, lab::ROUTER, "tsfake0").is_none(), "unanswered initiations make no speaker");
    let growth = after as i64 - before as i64;
    println!("wgtrace RSS before {before} KiB, after {after} KiB, growth {growth} KiB");
    assert!(growth < 4096, "RSS grew by {growth} KiB during the flood");
}
