//! Fleet features on the real lab: peer names (wg-quick `friendly_name`
//! comments and `--peer-names`) in text, JSON and metrics, hidden by
//! `--redact`; handshake health against `wg show latest-handshakes`; and
//! `run --events`.

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use wgtrace_tests::{
    LabGuard, TempDir, Traffic, client_peer, free_port, http_get, lab, privileged_or_skip, trace_json, wgtrace_bin,
};

/// The client's peer key for `interface` (its server's public key).
fn server_key(interface: &str) -> String {
    let state = lab::load_state().unwrap();
    let server = if interface == "wg0" { lab::SERVER } else { lab::ROUTER };
    state.public_keys[&format!("{server}/{interface}")].clone()
}

/// `wg show IFACE latest-handshakes` for the client's only peer.
fn latest_handshake(interface: &str) -> u64 {
    let text = lab::client_wg(interface, &["show", interface, "latest-handshakes"]).unwrap();
    text.split_whitespace().nth(1).and_then(|t| t.parse().ok()).unwrap_or_else(|| panic!("wg show: {text}"))
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// A `--peer-names` file naming wg0's peer.
fn names_file(dir: &TempDir) -> String {
    let path = dir.0.join("peers");
    std::fs::write(&path, format!("# lab\n{} = exit-node\n", server_key("wg0"))).unwrap();
    path.display().to_string()
}

fn run_text(args: &[&str]) -> String {
    let output = Command::new(wgtrace_bin()).args(args).stderr(Stdio::inherit()).output().expect("running wgtrace");
    assert!(output.status.success(), "wgtrace {args:?}: {}", output.status);
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn names_and_handshakes_in_text_json_and_metrics_and_redacted() {
    const NAME: &str = "names_and_handshakes_in_text_json_and_metrics_and_redacted";
    if !privileged_or_skip(NAME) {
        return;
    }
    let _lab = LabGuard::up(&lab::LabOptions::default()).unwrap();
    let dir = TempDir::new("wgtrace-fleet").unwrap();
    let names = names_file(&dir);

    // JSON: the file names wg0's peer (over its config's comment), wg1's
    // name comes from the `# friendly_name` in its wg-quick config.
    let report = trace_json(2.0, &["--peer-names", &names]).unwrap();
    let (wg0, wg1) = (client_peer(&report, "wg0"), client_peer(&report, "wg1"));
    assert_eq!(wg0["name"], "exit-node", "{wg0:#}");
    assert_eq!(wg1["name"], "wg1-server", "{wg1:#}");
    // Handshake health from WireGuard's own state (the lab's pings made one).
    let (wg_says, checked_at) = (latest_handshake("wg1"), now());
    let handshake = &wg1["handshake"];
    let last = handshake["last_unix_seconds"].as_u64().unwrap_or_else(|| panic!("{handshake}"));
    assert!(last.abs_diff(wg_says) <= 1, "wgtrace says {last}, wg show latest-handshakes {wg_says}");
    let age = handshake["age_seconds"].as_u64().unwrap();
    assert!(age.abs_diff(checked_at - wg_says) <= 1, "age {age} s, wg's handshake {} s ago", checked_at - wg_says);
    assert_eq!(handshake["up"], true, "{handshake}");
    assert_eq!(handshake["timeout_seconds"], 180);
    // Without the file, wg0's own config comment names it.
    let unnamed = trace_json(1.0, &[]).unwrap();
    assert_eq!(client_peer(&unnamed, "wg0")["name"], "wg0-server");
    // The lab's last handshake is seconds old by now: down with a 1 s timeout.
    let stale = trace_json(1.0, &["--handshake-timeout", "1"]).unwrap();
    let stale_wg1 = &client_peer(&stale, "wg1")["handshake"];
    assert!(stale_wg1["age_seconds"].as_u64().unwrap() >= 2, "{stale_wg1}");
    assert_eq!((&stale_wg1["up"], &stale_wg1["timeout_seconds"]), (&false.into(), &1.into()), "{stale_wg1}");

    // Text: name first, key prefix after, and the handshake line.
    let text = run_text(&["run", "--duration", "1", "--peer-names", &names]);
    assert!(text.contains("peer exit-node ("), "{text}");
    assert!(text.contains("peer wg1-server ("), "{text}");
    assert!(text.contains("handshake: ") && text.contains(" ago, up"), "{text}");

    // --redact hides names as it hides keys.
    let redacted = run_text(&["--redact", "run", "--json", "--duration", "1", "--peer-names", &names]);
    let redacted_text = run_text(&["--redact", "run", "--duration", "1", "--peer-names", &names]);
    for output in [&redacted, &redacted_text] {
        assert!(!output.contains("exit-node") && !output.contains("wg1-server"), "{output}");
        assert!(!output.contains(&server_key("wg1")), "{output}");
    }
    let redacted: serde_json::Value = serde_json::from_str(&redacted).unwrap();
    assert!(client_peer(&redacted, "wg1")["name"].as_str().unwrap().starts_with("redacted-"), "{redacted:#}");

    // Metrics: per-peer series named, with the handshake time wg reports.
    let address = format!("127.0.0.1:{}", free_port());
    let mut exporter = Command::new(wgtrace_bin())
        .args(["run", "--prometheus", &address, "--peer-metrics", "--peer-names", &names])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let body = loop {
        if let Ok(response) = http_get(&address, "/metrics", None)
            && response.body.contains("wgtrace_peer_up{")
        {
            break response.body;
        }
        assert!(Instant::now() < deadline, "no per-peer metrics");
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = exporter.kill();
    let _ = exporter.wait();
    let wg1 =
        r#"wgtrace_peer_last_handshake_timestamp_seconds{netns="wgtlab-client",interface="wg1",peer="wg1-server"}"#;
    let line = body.lines().find(|l| l.starts_with(wg1)).unwrap_or_else(|| panic!("{wg1} in:\n{body}"));
    let value: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(value.abs_diff(latest_handshake("wg1")) <= 1, "{line}");
    assert!(body.contains(r#"wgtrace_peer_up{netns="wgtlab-client",interface="wg0",peer="exit-node"} 1"#), "{body}");
}

/// `run --events` on the lab: the broken-to-fixed transition of wg1 is a
/// verdict-change line, every line is JSON with the common keys, and the
/// last one (`stopped`) comes before exit.
#[test]
fn events_stream_shows_wg1_going_from_nested_to_direct() {
    const NAME: &str = "events_stream_shows_wg1_going_from_nested_to_direct";
    if !privileged_or_skip(NAME) {
        return;
    }
    let _lab = LabGuard::up(&lab::LabOptions::default()).unwrap();
    let _traffic = Traffic::ping(lab::WG1_REMOTE).unwrap();
    let mut child = Command::new(wgtrace_bin())
        .args(["run", "--events", "--interval", "0.5"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let (sender, lines) = std::sync::mpsc::channel::<String>();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen: Vec<serde_json::Value> = Vec::new();
    let wait_for = |what: &str, seen: &mut Vec<serde_json::Value>, wanted: &dyn Fn(&serde_json::Value) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if seen.iter().any(wanted) {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no {what} in:\n{seen:#?}");
            if let Ok(line) = lines.recv_timeout(left) {
                seen.push(serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")));
            }
        }
    };
    let wg1_verdict = |to: &'static str| {
        move |e: &serde_json::Value| {
            e["event"] == "verdict_change" && e["interface"] == "wg1" && e["netns"] == lab::CLIENT && e["to"] == to
        }
    };
    wait_for("wg1 nested", &mut seen, &wg1_verdict("nested"));
    lab::fix().unwrap();
    wait_for("wg1 direct after the fix", &mut seen, &wg1_verdict("direct"));
    // A fresh handshake initiated by wg1 (its peer removed and re-added, the
    // ping restarts it): a handshake line with its round trip.
    lab::rekey("wg1").unwrap();
    wait_for("wg1's handshake with its RTT", &mut seen, &|e| {
        e["event"] == "handshake" && e["interface"] == "wg1" && e["netns"] == lab::CLIENT && e["rtt_us"].is_u64()
    });
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let status = child.wait().unwrap();
    reader.join().unwrap();
    seen.extend(lines.try_iter().map(|l| serde_json::from_str(&l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))));
    assert!(status.success(), "wgtrace exited with {status}");
    let handshake = seen.iter().find(|e| e["event"] == "handshake" && e["interface"] == "wg1").unwrap();
    println!("{} event lines; wg1's handshake after the rekey: {handshake}", seen.len());
    let fixed = seen.iter().find(|e| wg1_verdict("direct")(e)).unwrap();
    assert_eq!(fixed["from"], "nested", "{fixed}");
    assert_eq!(fixed["peer_name"], "wg1-server", "{fixed}");
    assert!(
        seen.iter().any(|e| e["event"] == "route_decision" && e["interface"] == "wg1" && e["mark"] == 51820),
        "no route decision with the fixed mark: {seen:#?}"
    );
    for event in ["tunnel_appeared", "peer_appeared", "transport_flow"] {
        assert!(seen.iter().any(|e| e["event"] == event), "no {event}: {seen:#?}");
    }
    for line in &seen {
        for key in ["timestamp", "event", "netns", "interface", "peer"] {
            assert!(line.get(key).is_some(), "{key} missing in {line}");
        }
    }
    assert_eq!(seen.last().unwrap()["event"], "stopped", "{seen:#?}");
}
