//! `wgtrace run --events`: one JSON object per line on stdout, for
//! investigations (`| jq`, a log shipper), in the spirit of pwru.
//!
//! Events are the differences between successive reports (tunnels and
//! peers appearing or going away, a transport seen for the first time, its
//! route decision changing, a verdict changing, a new handshake),  with the
//! round trip of each handshake that latency paired for a known peer. Every line has `timestamp`, `event`, `netns`, `interface`
//! and `peer` (null for tunnel events); the schema is in docs/json.md.

use std::{
    collections::{BTreeMap, HashMap},
    io::Write,
    time::{SystemTime, UNIX_EPOCH},
};

use serde_json::{Value, json};

use crate::{correlation::PeerReport, report::Report};

/// What the previous report said of one peer.
#[derive(Clone, Debug, PartialEq)]
struct PeerState {
    /// (egress, mark, table, rule) of its transport, when seen.
    route: Option<(String, u32, Option<u32>, Option<String>)>,
    /// "nested" or "direct" once its transport was seen.
    verdict: Option<(&'static str, Option<String>)>,
    last_handshake: Option<u64>,
}

/// (netns inode, interface) -> (netns label, public key -> state).
type Snapshot = BTreeMap<(u64, String), (String, BTreeMap<String, PeerState>)>;

fn peer_state(peer: &PeerReport) -> PeerState {
    PeerState {
        route: peer.transport.as_ref().map(|t| (t.egress_interface.clone(), t.mark, t.route_table, t.rule.clone())),
        verdict: peer.transport.as_ref().map(|_| (peer.verdict.as_str(), peer.nested_in.clone())),
        last_handshake: peer.handshake.as_ref().and_then(|h| h.last_unix_seconds),
    }
}

fn snapshot(report: &Report) -> Snapshot {
    report
        .tunnels
        .iter()
        .map(|t| {
            let peers = t.peers.iter().map(|p| (p.public_key.clone(), peer_state(p))).collect();
            ((t.netns_inode, t.interface.clone()), (t.netns.clone(), peers))
        })
        .collect()
}

/// `line` as JSON text with the common keys first.
fn ordered(line: &Value) -> String {
    const FIRST: [&str; 6] = ["timestamp", "event", "netns", "interface", "peer", "peer_name"];
    let Value::Object(map) = line else { return line.to_string() };
    let mut parts: Vec<String> = Vec::with_capacity(map.len());
    for key in FIRST.iter().copied().chain(map.keys().map(String::as_str).filter(|k| !FIRST.contains(k))) {
        if let Some(value) = map.get(key) {
            parts.push(format!("{}:{value}", Value::from(key)));
        }
    }
    format!("{{{}}}", parts.join(","))
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// One line of the stream.
#[derive(serde::Serialize)]
struct Line<'a> {
    timestamp: f64,
    event: &'a str,
    netns: Option<&'a str>,
    interface: Option<&'a str>,
    peer: Option<String>,
    peer_name: Option<String>,
    #[serde(flatten)]
    extra: serde_json::Map<String, Value>,
}

/// Turns reports and handshake messages into event lines.
pub struct EventStream<W: Write> {
    out: W,
    last: Option<Snapshot>,
    /// (netns inode, public key) -> the last handshake RTT (µs) not yet
    /// reported.
    handshake_rtt_us: HashMap<(u64, String), u64>,
    failed: bool,
}

impl<W: Write> EventStream<W> {
    pub fn new(out: W) -> Self {
        Self { out, last: None, handshake_rtt_us: HashMap::new(), failed: false }
    }

    /// A handshake round trip that latency paired for a known peer, to be
    /// told with that peer's next handshake line. One per peer is kept (the
    /// newest), so the table is bounded by the topology.
    pub fn on_handshake_rtt(&mut self, netns_inode: u64, public_key: &str, rtt_ns: u64) {
        self.handshake_rtt_us.insert((netns_inode, public_key.to_owned()), rtt_ns / 1_000);
    }

    /// Writes the events between the previous report and this one.
    pub fn on_report(&mut self, report: &Report) {
        let lines = self.diff(report);
        self.write(&lines);
    }

    /// The last line, written before wgtrace exits.
    pub fn finish(&mut self, report: &Report) {
        let mut lines = self.diff(report);
        let mut extra = serde_json::Map::new();
        extra.insert("duration_seconds".into(), json!(report.duration_seconds));
        extra.insert("events_lost".into(), json!(report.events_lost));
        let stopped = Line {
            timestamp: now(),
            event: "stopped",
            netns: None,
            interface: None,
            peer: None,
            peer_name: None,
            extra,
        };
        lines.push(serde_json::to_value(stopped).unwrap_or_default());
        self.write(&lines);
    }

    fn write(&mut self, lines: &[Value]) {
        if self.failed || lines.is_empty() {
            return;
        }
        let mut result = Ok(());
        for line in lines {
            // serde_json's maps are sorted (no preserve_order): the common
            // keys are put first by hand.
            result = result.and_then(|_| writeln!(self.out, "{}", ordered(line)));
        }
        if let Err(err) = result.and_then(|_| self.out.flush()) {
            // A reader that went away (`| head`) ends the stream, not the trace.
            log::warn!("--events: writing to stdout: {err}; no more events are written");
            self.failed = true;
        }
    }

    fn diff(&mut self, report: &Report) -> Vec<Value> {
        let now = now();
        let current = snapshot(report);
        // Handshakes from before the first report are history, not events.
        let first = self.last.is_none();
        let previous = self.last.take().unwrap_or_default();
        let mut lines = Vec::new();
        let line = |event: &str, netns: &str, interface: &str, peer: Option<&PeerReport>, extra: Value| {
            let extra = match extra {
                Value::Object(map) => map,
                _ => serde_json::Map::new(),
            };
            // The common keys first, in this order, for people reading the stream.
            serde_json::to_value(Line {
                timestamp: now,
                event,
                netns: Some(netns),
                interface: Some(interface),
                peer: peer.map(|p| crate::redact::key(&p.public_key)),
                peer_name: peer.and_then(|p| p.name.as_deref()).map(crate::names::shown),
                extra,
            })
            .unwrap_or_default()
        };
        for ((inode, interface), (netns, _)) in &previous {
            if !current.contains_key(&(*inode, interface.clone())) {
                lines.push(line("tunnel_gone", netns, interface, None, json!({})));
            }
        }
        for tunnel in &report.tunnels {
            let key = (tunnel.netns_inode, tunnel.interface.clone());
            let (netns, interface) = (tunnel.netns.as_str(), tunnel.interface.as_str());
            let before = previous.get(&key).map(|(_, peers)| peers);
            if before.is_none() {
                lines.push(line(
                    "tunnel_appeared",
                    netns,
                    interface,
                    None,
                    json!({ "implementation": tunnel.implementation.as_str(), "listen_port": tunnel.listen_port,
                            "fwmark": tunnel.fwmark }),
                ));
            }
            let empty = BTreeMap::new();
            let before = before.unwrap_or(&empty);
            for (public_key, _) in before.iter().filter(|(k, _)| !tunnel.peers.iter().any(|p| &p.public_key == *k)) {
                let mut value = line("peer_gone", netns, interface, None, json!({}));
                value["peer"] = json!(crate::redact::key(public_key));
                lines.push(value);
            }
            for peer in &tunnel.peers {
                let now_state = peer_state(peer);
                let was = before.get(&peer.public_key);
                if was.is_none() {
                    let endpoint = peer.endpoint.map(crate::redact::endpoint);
                    lines.push(line("peer_appeared", netns, interface, Some(peer), json!({ "endpoint": endpoint })));
                }
                let was_route = was.and_then(|w| w.route.as_ref());
                if let (Some(transport), None) = (&peer.transport, was_route) {
                    lines.push(line(
                        "transport_flow",
                        netns,
                        interface,
                        Some(peer),
                        json!({ "endpoint": peer.endpoint.map(crate::redact::endpoint),
                                "egress_interface": transport.egress_interface, "mark": transport.mark,
                                "packets": transport.packets }),
                    ));
                }
                if let Some(route) = &now_state.route
                    && was_route != Some(route)
                {
                    lines.push(line(
                        "route_decision",
                        netns,
                        interface,
                        Some(peer),
                        json!({ "egress_interface": route.0, "mark": route.1, "route_table": route.2,
                                "rule": route.3 }),
                    ));
                }
                let was_verdict = was.and_then(|w| w.verdict.clone());
                // Nested in wg0, then in wg2, is a change too.
                if let Some((verdict, outer)) = &now_state.verdict
                    && was_verdict.as_ref() != now_state.verdict.as_ref()
                {
                    lines.push(line(
                        "verdict_change",
                        netns,
                        interface,
                        Some(peer),
                        json!({ "from": was_verdict.as_ref().map(|v| v.0), "from_nested_in": was_verdict.and_then(|v| v.1),
                                "to": verdict, "nested_in": outer,
                                "nesting": peer.nesting.map(|n| n.as_str()), "fix": peer.fix }),
                    ));
                }
                let was_handshake = was.and_then(|w| w.last_handshake);
                // A peer removed and added again (a rekey) counts as new.
                if let Some(last) = now_state.last_handshake
                    && !first
                    && was_handshake.is_none_or(|before| last > before)
                {
                    let rtt = self.handshake_rtt_us.remove(&(tunnel.netns_inode, peer.public_key.clone()));
                    lines.push(line(
                        "handshake",
                        netns,
                        interface,
                        Some(peer),
                        json!({ "last_unix_seconds": last, "rtt_us": rtt }),
                    ));
                }
            }
        }
        self.last = Some(current);
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        correlation::{Nesting, Transport},
        exporter::metrics::tests::report_of,
        handshake::Handshake,
    };

    fn report(nested: bool, handshake: u64, with_wg1: bool) -> Report {
        let mut peer = crate::correlation::empty_peer_report(&crate::topology::Peer {
            public_key: "tCfh9vIdYi0RwYCNk5bxfy6W2mKxXIYFzD6cmXk2lH0=".into(),
            endpoint: Some("192.0.2.200:51821".parse().unwrap()),
            ..Default::default()
        });
        peer.name = Some("wg1-server".into());
        peer.transport = Some(Transport {
            egress_interface: if nested { "wg0" } else { "c0" }.into(),
            mark: if nested { 0 } else { 51820 },
            route_table: Some(if nested { 51820 } else { 254 }),
            rule: None,
            packets: Some(3),
            bytes: Some(300),
            fragmented_packets: None,
            received_packets: Some(3),
            received_bytes: Some(300),
        });
        peer.verdict = if nested { crate::correlation::Verdict::Nested } else { crate::correlation::Verdict::Direct };
        if nested {
            peer.nested_in = Some("wg0".into());
            peer.nesting = Some(Nesting::Accidental);
        }
        peer.handshake = Some(Handshake::at(handshake, handshake + 1, std::time::Duration::from_secs(180)));
        let tunnel = crate::correlation::TunnelReport {
            interface: "wg1".into(),
            netns: "wgtlab-client".into(),
            netns_inode: 7,
            transport_netns: "wgtlab-client".into(),
            transport_netns_inode: 7,
            ifindex: 4,
            implementation: crate::topology::Implementation::Userspace,
            discovered_by: crate::topology::DiscoveredBy::Uapi,
            process: None,
            fwmark: Some(0),
            listen_port: Some(51821),
            manager: None,
            mtu: None,
            peers: vec![peer],
            findings: Vec::new(),
        };
        report_of(if with_wg1 { vec![tunnel] } else { Vec::new() })
    }

    fn lines(stream: &EventStream<Vec<u8>>) -> Vec<Value> {
        String::from_utf8_lossy(&stream.out).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    fn events(lines: &[Value]) -> Vec<&str> {
        lines.iter().map(|l| l["event"].as_str().unwrap()).collect()
    }

    #[test]
    fn appearing_fixing_handshaking_and_going_away() {
        let mut stream = EventStream::new(Vec::new());
        stream.on_report(&report(true, 100, true));
        let first = lines(&stream);
        assert_eq!(
            events(&first),
            ["tunnel_appeared", "peer_appeared", "transport_flow", "route_decision", "verdict_change"]
        );
        for line in &first {
            for key in ["timestamp", "netns", "interface", "peer"] {
                assert!(line.get(key).is_some(), "{key} in {line}");
            }
        }
        assert_eq!(first[4]["to"], "nested");
        assert_eq!(first[4]["from"], Value::Null);
        assert_eq!(first[4]["peer_name"], "wg1-server");
        // Nothing changed: nothing written.
        stream.on_report(&report(true, 100, true));
        assert_eq!(lines(&stream).len(), 5);
        // The fix: a new route and a verdict change; then a handshake whose
        // round trip was paired from its messages.
        stream.on_handshake_rtt(7, &report(false, 130, true).tunnels[0].peers[0].public_key, 450_000);
        stream.on_report(&report(false, 130, true));
        let all = lines(&stream);
        let fixed = &all[5..];
        assert_eq!(events(fixed), ["route_decision", "verdict_change", "handshake"]);
        assert_eq!((fixed[0]["egress_interface"].as_str(), fixed[0]["mark"].as_u64()), (Some("c0"), Some(51820)));
        assert_eq!((fixed[1]["from"].as_str(), fixed[1]["to"].as_str()), (Some("nested"), Some("direct")));
        assert_eq!(fixed[2]["rtt_us"], 450);
        assert_eq!(fixed[2]["last_unix_seconds"], 130);
        let raw = String::from_utf8_lossy(&stream.out).into_owned();
        assert!(raw.lines().all(|l| l.starts_with(r#"{"timestamp":"#)), "{raw}");
        assert!(raw.lines().all(|l| l.contains(r#","event":""#)), "{raw}");
        stream.finish(&report(false, 130, false));
        let all = lines(&stream);
        assert_eq!(events(&all[8..]), ["tunnel_gone", "stopped"]);
    }
}
