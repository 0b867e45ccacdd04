//! The metric families, rendered from one [`Report`] snapshot per scrape by
//! a `prometheus_client` collector, in OpenMetrics or Prometheus text 0.0.4.
//!
//! Labels are bounded by tunnels and interfaces: no per-flow or per-address
//! labels, and per-peer ones only with `--peer-metrics` ([`Series`]). A
//! tunnel that is gone from the latest report is gone from the exposition.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::SocketAddr,
    sync::Arc,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge, info::Info},
    registry::{Registry, Unit},
};

use super::buckets::Buckets;
use crate::report::Report;

/// The exposition formats, chosen per request by [`negotiate`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0.0 text, what Prometheus asks for first.
    OpenMetrics,
    /// The classic Prometheus text format 0.0.4 (`curl`, `promtool`, older
    /// scrapers): the default when nothing better is asked for.
    Prometheus,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Self::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        }
    }
}

/// Picks the format from an `Accept` header: OpenMetrics when it is asked
/// for explicitly with a quality at least that of the classic format
/// (`text/plain`, `text/*`, `*/*`), else the classic format.
pub fn negotiate(accept: Option<&str>) -> Format {
    let (mut openmetrics, mut classic) = (0.0f32, 0.0f32);
    for range in accept.unwrap_or("").split(',') {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or_default().to_ascii_lowercase();
        let (mut quality, mut version) = (1.0f32, None);
        for parameter in parts {
            let Some((key, value)) = parameter.split_once('=') else { continue };
            let value = value.trim().trim_matches('"');
            match key.trim().to_ascii_lowercase().as_str() {
                "q" => quality = value.parse().unwrap_or(0.0),
                "version" => version = Some(value.to_owned()),
                _ => {}
            }
        }
        match media.as_str() {
            "application/openmetrics-text" if matches!(version.as_deref(), None | Some("1.0.0" | "0.0.1")) => {
                openmetrics = openmetrics.max(quality)
            }
            "text/plain" | "text/*" | "*/*" => classic = classic.max(quality),
            _ => {}
        }
    }
    if openmetrics > 0.0 && openmetrics >= classic { Format::OpenMetrics } else { Format::Prometheus }
}

/// Which series to export: per tunnel (the default) or per peer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Series {
    /// One set of series per tunnel, peers merged: bounded by tunnels.
    #[default]
    PerTunnel,
    /// `--peer-metrics`: the per-peer families get a `peer` label (its
    /// name, else the first 8 characters of its key) instead of being
    /// merged: one set of series per peer.
    PerPeer,
}

/// The exposition of `report` in `format`, per tunnel.
pub fn encode(report: &Arc<Report>, format: Format) -> String {
    encode_with(report, format, Series::PerTunnel)
}

/// The exposition of `report` in `format` with these `series`.
pub fn encode_with(report: &Arc<Report>, format: Format, series: Series) -> String {
    // A fresh registry per scrape: everything derives from the snapshot, so
    // vanished tunnels cannot linger.
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Snapshot(Arc::clone(report), series)));
    let mut out = String::new();
    let encoded = match format {
        Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, &registry),
        Format::Prometheus => prometheus_client::encoding::prometheus_text::encode(&mut out, &registry),
    };
    // Writing into a String cannot fail, and the collector only fails
    // where the writer does.
    debug_assert!(encoded.is_ok());
    out
}

#[derive(Debug)]
struct Snapshot(Arc<Report>, Series);

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        write_families(&self.0, self.1, &mut encoder)
    }
}

/// What one tunnel (or, per peer, one peer) exposes, merged over its peers.
#[derive(Default)]
struct TunnelMetrics<'a> {
    /// Tunnels its peers' transports ride inside; empty when direct.
    /// (outer interface, outer kind).
    outer: BTreeSet<(&'a str, &'static str)>,
    /// Some peer's transport loops (into its own tunnel, or through others back).
    looped: bool,
    /// (egress interface, mark) -> (packets, bytes).
    transport: BTreeMap<(&'a str, u32), (u64, u64)>,
    inner_rtt: Buckets,
    handshake_rtt: Buckets,
    transmit: Buckets,
    peers: u64,
    peers_up: u64,
    /// The stalest peer's last handshake (0: one never had any); None
    /// when no peer's handshake is known.
    stalest_handshake: Option<u64>,
}

/// (netns, interface, peer label: None when merged).
type Group<'a> = (&'a str, &'a str, Option<String>);

/// The `peer` label of each peer of `tunnel`: its name, else the first 8
/// characters of its key (both redacted under `--redact`); made unique
/// within the tunnel.
fn peer_labels(tunnel: &crate::correlation::TunnelReport) -> Vec<String> {
    let mut used = HashSet::new();
    tunnel
        .peers
        .iter()
        .map(|peer| {
            let key: String = crate::redact::key(&peer.public_key).chars().take(8).collect();
            let label = match &peer.name {
                Some(name) => crate::names::shown(name),
                None => key.clone(),
            };
            if used.insert(label.clone()) {
                return label;
            }
            let unique = format!("{label}~{}", crate::redact::key(&peer.public_key));
            used.insert(unique.clone());
            unique
        })
        .collect()
}

fn groups(report: &Report, series: Series) -> BTreeMap<Group<'_>, TunnelMetrics<'_>> {
    let mut groups: BTreeMap<Group, TunnelMetrics> = BTreeMap::new();
    for tunnel in &report.tunnels {
        let labels = match series {
            Series::PerPeer => peer_labels(tunnel).into_iter().map(Some).collect(),
            Series::PerTunnel => vec![None; tunnel.peers.len()],
        };
        if tunnel.peers.is_empty() || series == Series::PerTunnel {
            groups.entry((tunnel.netns.as_str(), tunnel.interface.as_str(), None)).or_default();
        }
        // Handshake RTT is kept per endpoint and transmit latency per device,
        // so peers sharing them must count them once.
        let mut handshake_endpoints: HashSet<Option<SocketAddr>> = HashSet::new();
        let mut transmit_seen = false;
        for (peer, label) in tunnel.peers.iter().zip(labels) {
            let per_peer = label.is_some();
            let metrics = groups.entry((tunnel.netns.as_str(), tunnel.interface.as_str(), label)).or_default();
            if per_peer {
                handshake_endpoints.clear();
            }
            metrics.peers += 1;
            if let Some(handshake) = &peer.handshake {
                metrics.peers_up += u64::from(handshake.up);
                let last = handshake.last_unix_seconds.unwrap_or(0);
                metrics.stalest_handshake = Some(metrics.stalest_handshake.map_or(last, |s| s.min(last)));
            }
            if let Some(outer) = &peer.nested_in {
                let kind = peer.outer.as_ref().map(|o| o.kind.as_str()).unwrap_or("wireguard");
                metrics.outer.insert((outer, kind));
            }
            metrics.looped |= peer.verdict == crate::correlation::Verdict::Loop;
            if let Some(transport) = &peer.transport {
                let counts =
                    metrics.transport.entry((transport.egress_interface.as_str(), transport.mark)).or_default();
                counts.0 += transport.packets.unwrap_or_default();
                counts.1 += transport.bytes.unwrap_or_default();
            }
            let Some(histograms) = peer.latency.as_ref().map(|l| &l.histograms) else { continue };
            if let Some(h) = &histograms.inner_rtt {
                metrics.inner_rtt.add(h);
            }
            if let Some(h) = &histograms.handshake_rtt
                && handshake_endpoints.insert(peer.endpoint)
            {
                metrics.handshake_rtt.add(h);
            }
            // Per device: never per peer.
            if let Some(h) = &histograms.transmit
                && !transmit_seen
            {
                transmit_seen = true;
                metrics.transmit.add(h);
            }
        }
    }
    groups
}

/// The labels of a group, with `peer` when it is one peer's.
fn labels<'a>(group: &'a Group<'a>, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut labels = vec![("netns", group.0), ("interface", group.1)];
    if let Some(peer) = &group.2 {
        labels.push(("peer", peer.as_str()));
    }
    labels.extend_from_slice(extra);
    labels
}

fn write_families(report: &Report, series: Series, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
    let info = Info::new([("version", env!("CARGO_PKG_VERSION"))]);
    info.encode(encoder.encode_descriptor("wgtrace_build", "wgtrace's version.", None, info.metric_type())?)?;

    let lost = ConstCounter::new(report.events_lost);
    lost.encode(encoder.encode_descriptor(
        "wgtrace_events_lost",
        "Events the kernel side could not hand over (ring buffer full); latencies miss those samples.",
        None,
        lost.metric_type(),
    )?)?;

    let traced = ConstGauge::new(report.traced_fraction);
    traced.encode(encoder.encode_descriptor(
        "wgtrace_traced_ratio",
        "Share of the run with the programs attached: always 1, every packet is traced (kept for dashboards \
         of versions that traced in windows).",
        None,
        traced.metric_type(),
    )?)?;

    let groups = groups(report, series);
    // Per tunnel whatever `series` says: counts of peers, and the transmit
    // latency, which is measured per device.
    let tunnels = self::groups(report, Series::PerTunnel);

    for (name, help, up) in [
        ("wgtrace_peers", "Peers configured on the tunnel.", false),
        ("wgtrace_peers_up", "Peers of the tunnel whose last handshake is within --handshake-timeout.", true),
    ] {
        let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (group, metrics) in &tunnels {
            let value = if up { metrics.peers_up } else { metrics.peers };
            ConstGauge::new(value as i64).encode(family.encode_family(&labels(group, &[]))?)?;
        }
    }

    let mut family = encoder.encode_descriptor(
        "wgtrace_peer_last_handshake_timestamp_seconds",
        "Unix time of the peer's last completed handshake, from WireGuard's own state (0: none yet). Per tunnel: \
         the stalest peer's.",
        None,
        MetricType::Gauge,
    )?;
    for (group, metrics) in &groups {
        if let Some(last) = metrics.stalest_handshake {
            ConstGauge::new(last as i64).encode(family.encode_family(&labels(group, &[]))?)?;
        }
    }
    if series == Series::PerPeer {
        let mut family = encoder.encode_descriptor(
            "wgtrace_peer_up",
            "1 when the peer's last handshake is within --handshake-timeout, else 0.",
            None,
            MetricType::Gauge,
        )?;
        for (group, metrics) in groups.iter().filter(|(g, _)| g.2.is_some()) {
            if metrics.stalest_handshake.is_some() {
                ConstGauge::new(metrics.peers_up as i64).encode(family.encode_family(&labels(group, &[]))?)?;
            }
        }
    }

    let mut family = encoder.encode_descriptor(
        "wgtrace_tunnel_nested",
        "1 when the tunnel's encrypted transport rides inside another tunnel (outer_interface, of kind outer_kind: \
         wireguard, tun, tap, ipip, gre, sit, vxlan, geneve, xfrm, other), else 0.",
        None,
        MetricType::Gauge,
    )?;
    for (group, metrics) in &groups {
        let outer: Vec<(&str, &str)> =
            if metrics.outer.is_empty() { vec![("", "")] } else { metrics.outer.iter().copied().collect() };
        for (outer_interface, outer_kind) in outer {
            let labels = labels(group, &[("outer_interface", outer_interface), ("outer_kind", outer_kind)]);
            ConstGauge::new(i64::from(!outer_interface.is_empty())).encode(family.encode_family(&labels)?)?;
        }
    }

    let mut family = encoder.encode_descriptor(
        "wgtrace_tunnel_loop",
        "1 when the tunnel's encrypted transport comes back into the tunnel itself, directly or through others \
         (a routing loop), else 0.",
        None,
        MetricType::Gauge,
    )?;
    for (group, metrics) in &groups {
        ConstGauge::new(i64::from(metrics.looped)).encode(family.encode_family(&labels(group, &[]))?)?;
    }

    for (name, help, packets) in [
        ("wgtrace_transport_packets", "Encrypted transport packets sent, by the interface they leave through.", true),
        ("wgtrace_transport_bytes", "Encrypted transport bytes sent, by the interface they leave through.", false),
    ] {
        let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        for (group, metrics) in &groups {
            for ((egress, mark), (packet_count, byte_count)) in &metrics.transport {
                let mark = mark.to_string();
                let labels = labels(group, &[("egress_interface", *egress), ("mark", &mark)]);
                let value = if packets { *packet_count } else { *byte_count };
                ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
            }
        }
    }

    type Pick = for<'a> fn(&'a TunnelMetrics<'a>) -> &'a Buckets;
    let histograms: [(&str, &str, Pick, bool); 3] = [
        (
            "wgtrace_inner_rtt",
            "Round trips through the tunnel (echo and TCP SYN to their replies).",
            |m| &m.inner_rtt,
            true,
        ),
        ("wgtrace_handshake_rtt", "WireGuard handshake initiation to response.", |m| &m.handshake_rtt, true),
        (
            "wgtrace_transmit_latency",
            "A plaintext packet entering the tunnel to its encrypted form leaving the host (per device).",
            |m| &m.transmit,
            false,
        ),
    ];
    for (name, help, pick, per_peer) in histograms {
        let mut family = encoder.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Histogram)?;
        for (group, metrics) in if per_peer { &groups } else { &tunnels } {
            let buckets = pick(metrics);
            family.encode_family(&labels(group, &[]))?.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                buckets.sum_seconds(),
                buckets.count(),
                &buckets.per_bucket(),
                None,
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::{
        correlation::{Nesting, PeerReport, TunnelReport},
        latency::{LatencyHistogram, PeerHistograms, PeerLatency},
        topology::Implementation,
    };

    fn histogram(samples_ms: &[u64]) -> LatencyHistogram {
        let mut h = LatencyHistogram::default();
        for ms in samples_ms {
            h.record_ns(ms * 1_000_000);
        }
        h
    }

    fn peer(nested_in: Option<&str>, egress: &str, mark: u32, packets: u64, rtt_ms: &[u64]) -> PeerReport {
        PeerReport {
            public_key: "tCfh9vIdkey=".into(),
            name: None,
            endpoint: Some("192.0.2.200:51821".parse().unwrap()),
            handshake: None,
            transport: Some(crate::correlation::Transport {
                egress_interface: egress.into(),
                mark,
                route_table: Some(51820),
                rule: None,
                packets: Some(packets),
                bytes: Some(packets * 100),
                fragmented_packets: None,
                received_packets: Some(packets),
                received_bytes: Some(packets * 100),
            }),
            verdict: if nested_in.is_some() {
                crate::correlation::Verdict::Nested
            } else {
                crate::correlation::Verdict::Direct
            },
            outer: nested_in.map(|name| crate::correlation::Outer {
                interface: name.into(),
                kind: crate::correlation::OuterKind::Wireguard,
                owner: None,
                ifindex: 3,
            }),
            nested_in: nested_in.map(Into::into),
            nesting: nested_in.map(|_| Nesting::Accidental),
            chain: nested_in.iter().map(|s| s.to_string()).collect(),
            loop_members: None,
            fix: None,
            fix_details: None,
            explanation: None,
            latency: Some(PeerLatency {
                histograms: PeerHistograms {
                    inner_rtt: Some(histogram(rtt_ms)),
                    handshake_rtt: Some(histogram(&[42])),
                    transmit: Some(histogram(&[1])),
                },
                ..PeerLatency::default()
            }),
            nesting_cost: None,
        }
    }

    fn tunnel(interface: &str, peers: Vec<PeerReport>) -> TunnelReport {
        TunnelReport {
            interface: interface.into(),
            netns: "wgtlab-client".into(),
            netns_inode: 4026532000,
            transport_netns: "wgtlab-client".into(),
            transport_netns_inode: 4026532000,
            ifindex: 3,
            implementation: Implementation::Userspace,
            discovered_by: crate::topology::DiscoveredBy::Uapi,
            process: None,
            fwmark: Some(0),
            listen_port: Some(51821),
            manager: None,
            mtu: None,
            peers,
            findings: Vec::new(),
        }
    }

    /// A report of these tunnels and nothing else of note.
    pub(crate) fn report_of(tunnels: Vec<TunnelReport>) -> Report {
        Report {
            tunnels,
            events_lost: 0,
            forged_packets: 0,
            route_lookups: Vec::new(),
            duration_seconds: 1.0,
            traced_fraction: 1.0,
        }
    }

    /// wg1 nested in wg0 with two peers (one seen via wg0, one direct),
    /// wg0 direct.
    pub(crate) fn nested_report() -> Arc<Report> {
        Arc::new(Report {
            tunnels: vec![
                tunnel("wg0", vec![peer(None, "c0", 51820, 50, &[40, 41])]),
                tunnel(
                    "wg1",
                    vec![peer(Some("wg0"), "wg0", 0, 30, &[41, 42, 43]), peer(None, "wg0", 0, 5, &[41, 1_000])],
                ),
            ],
            events_lost: 7,
            forged_packets: 0,
            route_lookups: Vec::new(),
            duration_seconds: 3.0,
            traced_fraction: 1.0,
        })
    }

    /// `name{a="x",b="y"}` as its name and sorted labels (values unescaped).
    fn series(text: &str) -> (String, Vec<(String, String)>) {
        let Some((name, rest)) = text.split_once('{') else { return (text.to_owned(), Vec::new()) };
        let mut labels = Vec::new();
        let mut chars = rest.chars().peekable();
        loop {
            let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
            if key.is_empty() || chars.next() != Some('"') {
                break;
            }
            let mut value = String::new();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.push(chars.next().map(|e| if e == 'n' { '\n' } else { e }).unwrap_or_default()),
                    '"' => break,
                    c => value.push(c),
                }
            }
            labels.push((key.trim_start_matches(',').to_owned(), value));
        }
        labels.sort();
        (name.to_owned(), labels)
    }

    /// The value of `wanted` (labels in any order) in an exposition.
    fn sample<'a>(text: &'a str, wanted: &str) -> &'a str {
        let wanted = series(wanted);
        text.lines()
            .filter(|line| !line.starts_with('#'))
            .find_map(|line| line.rsplit_once(' ').filter(|(s, _)| series(s) == wanted).map(|(_, value)| value))
            .unwrap_or_else(|| panic!("no sample {wanted:?} in:\n{text}"))
    }

    #[test]
    fn openmetrics_exposition_of_a_nested_tunnel() {
        let text = encode(&nested_report(), Format::OpenMetrics);
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(text.contains("# TYPE wgtrace_tunnel_nested gauge\n"), "{text}");
        assert_eq!(
            sample(
                &text,
                r#"wgtrace_tunnel_nested{netns="wgtlab-client",interface="wg1",outer_interface="wg0",outer_kind="wireguard"}"#
            ),
            "1"
        );
        assert_eq!(
            sample(
                &text,
                r#"wgtrace_tunnel_nested{netns="wgtlab-client",interface="wg0",outer_interface="",outer_kind=""}"#
            ),
            "0"
        );
        assert!(text.contains("# TYPE wgtrace_transport_packets counter\n"), "{text}");
        assert!(text.contains("# TYPE wgtrace_traced_ratio gauge\n"), "{text}");
        assert_eq!(sample(&text, "wgtrace_traced_ratio"), "1.0");
        // Both wg1 peers leave via wg0 unmarked: one series, summed.
        let wg1 = r#"{netns="wgtlab-client",interface="wg1",egress_interface="wg0",mark="0"}"#;
        assert_eq!(sample(&text, &format!("wgtrace_transport_packets_total{wg1}")), "35");
        assert_eq!(sample(&text, &format!("wgtrace_transport_bytes_total{wg1}")), "3500");
        let wg0 = r#"{netns="wgtlab-client",interface="wg0",egress_interface="c0",mark="51820"}"#;
        assert_eq!(sample(&text, &format!("wgtrace_transport_packets_total{wg0}")), "50");
        assert_eq!(sample(&text, "wgtrace_events_lost_total"), "7");
        assert!(text.contains("# TYPE wgtrace_build info\n"), "{text}");
        assert!(text.contains(&format!("wgtrace_build_info{{version=\"{}\"}} 1\n", env!("CARGO_PKG_VERSION"))));

        assert!(
            text.contains("# TYPE wgtrace_inner_rtt_seconds histogram\n# UNIT wgtrace_inner_rtt_seconds seconds\n")
        );
        // Peers merged: 5 samples, one of them 1 s.
        let labels = r#"netns="wgtlab-client",interface="wg1""#;
        assert_eq!(sample(&text, &format!("wgtrace_inner_rtt_seconds_count{{{labels}}}")), "5");
        let le = |bound: &str| sample(&text, &format!("wgtrace_inner_rtt_seconds_bucket{{{labels},le=\"{bound}\"}}"));
        assert_eq!(le("+Inf"), "5");
        let buckets: Vec<(f64, u64)> = text
            .lines()
            .filter_map(|line| line.rsplit_once(' '))
            .filter_map(|(name, value)| {
                let (name, labels) = series(name);
                let le = labels.iter().find(|(k, _)| k == "le")?.1.clone();
                (name == "wgtrace_inner_rtt_seconds_bucket" && labels.contains(&("interface".into(), "wg1".into())))
                    .then(|| (if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap() }, value.parse().unwrap()))
            })
            .collect();
        assert_eq!(buckets.len(), 19, "18 bounds and +Inf: {buckets:?}");
        assert!(buckets.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1), "cumulative: {buckets:?}");
        let count_at = |seconds: f64| buckets.iter().find(|(b, _)| *b >= seconds).unwrap().1;
        assert_eq!(count_at(0.025), 0);
        assert_eq!(count_at(0.05), 4, "40-43 ms are at or below 50 ms: {buckets:?}");
        assert_eq!(count_at(1.0), 5);
        let sum: f64 = sample(&text, &format!("wgtrace_inner_rtt_seconds_sum{{{labels}}}")).parse().unwrap();
        assert!((1.15..1.18).contains(&sum), "4 × about 41 ms + 1 s: {sum}");
        // Handshake RTT per endpoint: the two wg1 peers share one, counted once.
        assert_eq!(sample(&text, &format!("wgtrace_handshake_rtt_seconds_count{{{labels}}}")), "1");
        assert_eq!(sample(&text, &format!("wgtrace_transmit_latency_seconds_count{{{labels}}}")), "1");
    }

    #[test]
    fn classic_exposition_of_a_nested_tunnel() {
        let text = encode(&nested_report(), Format::Prometheus);
        assert!(!text.contains("# EOF") && !text.contains("# UNIT"), "{text}");
        assert!(text.contains("# TYPE wgtrace_transport_packets_total counter\n"), "{text}");
        assert!(text.contains("# TYPE wgtrace_events_lost_total counter\n"), "{text}");
        assert!(text.contains("# TYPE wgtrace_build_info gauge\n"), "{text}");
        assert!(text.contains("# TYPE wgtrace_inner_rtt_seconds histogram\n"), "{text}");
        assert_eq!(
            sample(
                &text,
                r#"wgtrace_tunnel_nested{netns="wgtlab-client",interface="wg1",outer_interface="wg0",outer_kind="wireguard"}"#
            ),
            "1"
        );
        let labels = r#"netns="wgtlab-client",interface="wg1""#;
        assert_eq!(sample(&text, &format!("wgtrace_inner_rtt_seconds_bucket{{{labels},le=\"+Inf\"}}")), "5");
        assert_eq!(sample(&text, &format!("wgtrace_inner_rtt_seconds_count{{{labels}}}")), "5");
        assert_eq!(sample(&text, "wgtrace_events_lost_total"), "7");
    }

    #[test]
    fn vanished_tunnels_and_empty_reports() {
        let empty = Arc::new(report_of(Vec::new()));
        for format in [Format::OpenMetrics, Format::Prometheus] {
            let text = encode(&empty, format);
            assert!(!text.contains("interface="), "no tunnel, no series: {text}");
            assert!(text.contains("wgtrace_build_info{"), "{text}");
            assert!(text.contains("wgtrace_events_lost_total 0\n"), "{text}");
        }
        // A tunnel without latency samples still exposes empty histograms.
        let mut bare = tunnel("wg9", vec![peer(None, "eth0", 0, 1, &[])]);
        bare.peers[0].latency = None;
        let report = Arc::new(report_of(vec![bare]));
        let text = encode(&report, Format::Prometheus);
        assert_eq!(sample(&text, r#"wgtrace_inner_rtt_seconds_count{netns="wgtlab-client",interface="wg9"}"#), "0");
    }

    #[test]
    fn label_values_are_escaped() {
        let mut odd = tunnel("wg\"x", vec![]);
        odd.netns = "a\\b".into();
        let report = Arc::new(report_of(vec![odd]));
        let text = encode(&report, Format::OpenMetrics);
        assert!(
            text.contains(
                r#"wgtrace_tunnel_nested{netns="a\\b",interface="wg\"x",outer_interface="",outer_kind=""} 0"#
            ),
            "{text}"
        );
    }

    #[test]
    fn content_negotiation() {
        // What Prometheus 2.x sends.
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,\
                          text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(negotiate(Some(prometheus)), Format::OpenMetrics);
        assert_eq!(negotiate(Some("application/openmetrics-text")), Format::OpenMetrics);
        assert_eq!(negotiate(Some("application/openmetrics-text; version=0.0.1")), Format::OpenMetrics);
        assert_eq!(
            negotiate(Some("text/plain;version=0.0.4;q=0.9, application/openmetrics-text;q=0.5")),
            Format::Prometheus
        );
        assert_eq!(negotiate(Some("text/plain; version=0.0.4")), Format::Prometheus);
        assert_eq!(negotiate(Some("*/*")), Format::Prometheus, "curl and browsers get the classic format");
        assert_eq!(negotiate(None), Format::Prometheus);
        assert_eq!(negotiate(Some("")), Format::Prometheus);
        assert_eq!(negotiate(Some("application/openmetrics-text;version=2.0.0")), Format::Prometheus);
        assert_eq!(negotiate(Some("application/openmetrics-text;q=0")), Format::Prometheus);
        assert_eq!(negotiate(Some("application/vnd.google.protobuf")), Format::Prometheus);
        assert_eq!(negotiate(Some("APPLICATION/OpenMetrics-Text; Q=0.8, */*;q=0.8")), Format::OpenMetrics);
        assert!(Format::OpenMetrics.content_type().starts_with("application/openmetrics-text; version=1.0.0"));
        assert!(Format::Prometheus.content_type().starts_with("text/plain; version=0.0.4"));
    }

    /// Sample lines: each one a series to Prometheus.
    fn series_count(text: &str) -> usize {
        text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()).count()
    }

    fn with_handshakes(report: &Report, names: &[Option<&str>]) -> Arc<Report> {
        let mut tunnels = report.tunnels.clone();
        let mut names = names.iter();
        for tunnel in &mut tunnels {
            for peer in &mut tunnel.peers {
                peer.name = names.next().copied().flatten().map(Into::into);
                peer.handshake = Some(crate::handshake::Handshake::at(
                    1_700_000_000,
                    1_700_000_100,
                    std::time::Duration::from_secs(180),
                ));
            }
        }
        Arc::new(Report { tunnels, ..report_of(Vec::new()) })
    }

    /// The README's series counts: 3 + 70·T per tunnel (the default), and
    /// 3 + 23·T + 48·P with `--peer-metrics`, for tunnels whose peers each
    /// have one transport path and a known handshake.
    #[test]
    fn series_counts_per_tunnel_and_per_peer() {
        let report = with_handshakes(&nested_report(), &[]);
        let (tunnels, peers) = (2, 3);
        for format in [Format::Prometheus, Format::OpenMetrics] {
            let default = encode_with(&report, format, Series::PerTunnel);
            assert_eq!(series_count(&default), 3 + 70 * tunnels, "{default}");
            assert!(!default.contains("peer=\""), "no peer label by default: {default}");
            let per_peer = encode_with(&report, format, Series::PerPeer);
            assert_eq!(series_count(&per_peer), 3 + 23 * tunnels + 48 * peers, "{per_peer}");
        }
    }

    #[test]
    fn per_peer_series_are_labelled_by_name_else_key_prefix() {
        let report = with_handshakes(&nested_report(), &[Some("exit"), None, None]);
        let text = encode_with(&report, Format::Prometheus, Series::PerPeer);
        let exit = r#"netns="wgtlab-client",interface="wg0",peer="exit""#;
        assert_eq!(sample(&text, &format!("wgtrace_peer_up{{{exit}}}")), "1");
        assert_eq!(sample(&text, &format!("wgtrace_peer_last_handshake_timestamp_seconds{{{exit}}}")), "1700000000");
        assert_eq!(sample(&text, &format!("wgtrace_inner_rtt_seconds_count{{{exit}}}")), "2");
        assert_eq!(
            sample(&text, &format!(r#"wgtrace_transport_packets_total{{{exit},egress_interface="c0",mark="51820"}}"#)),
            "50"
        );
        // wg1's two peers share a key prefix here: the second is made unique.
        let first = r#"netns="wgtlab-client",interface="wg1",peer="tCfh9vId""#;
        assert_eq!(sample(&text, &format!("wgtrace_inner_rtt_seconds_count{{{first}}}")), "3");
        assert_eq!(
            sample(
                &text,
                &format!("wgtrace_tunnel_nested{{{first},outer_interface=\"wg0\",outer_kind=\"wireguard\"}}")
            ),
            "1"
        );
        assert!(text.contains(r#"peer="tCfh9vId~tCfh9vIdkey=""#), "{text}");
        // Transmit latency is per device; peer counts per tunnel.
        assert_eq!(
            sample(&text, r#"wgtrace_transmit_latency_seconds_count{netns="wgtlab-client",interface="wg1"}"#),
            "1"
        );
        assert_eq!(sample(&text, r#"wgtrace_peers_up{netns="wgtlab-client",interface="wg1"}"#), "2");
        let default = encode_with(&report, Format::Prometheus, Series::PerTunnel);
        assert_eq!(sample(&default, r#"wgtrace_peers{netns="wgtlab-client",interface="wg1"}"#), "2");
        assert_eq!(
            sample(&default, r#"wgtrace_peer_last_handshake_timestamp_seconds{netns="wgtlab-client",interface="wg1"}"#),
            "1700000000"
        );
    }
}
