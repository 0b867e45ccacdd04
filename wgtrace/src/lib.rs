//! wgtrace: where each WireGuard tunnel's encrypted packets really go.
//!
//! * [`probes`]: loading, attaching and reading the eBPF programs (BTF offsets).
//! * [`topology`]: namespaces, interfaces, rules, WireGuard configuration.
//! * [`correlation`]: from recorded packets to verdicts and fixes.
//! * [`latency`]: inner, handshake and transmit latency histograms.
//! * [`report`]: terminal and JSON output.
//! * [`run`]: the `wgtrace run` command that ties them together.
//! * [`exporter`]: `run --prometheus`, the metrics endpoint.
//! * [`names`]: peer names from config comments and `--peer-names`.
//! * [`handshake`]: per-peer handshake age and whether the peer is up.
//! * [`events`]: `run --events`, one JSON line per change.
//! * [`check`]: `wgtrace check`, the static diagnosis from routing alone.

pub mod check;
pub mod correlation;
pub mod events;
pub mod exporter;
pub mod handshake;
pub mod latency;
pub mod names;
pub mod privileges;
pub mod probes;
pub mod redact;
pub mod report;
pub mod run;
pub mod topology;
