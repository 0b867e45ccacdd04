use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};
use wgtrace::{
    run::{RunOptions, run},
    topology::Scope,
};

/// Shows where each WireGuard tunnel's encrypted packets really go, and what
/// that costs.
///
/// wgtrace watches real packets with eBPF: for every tunnel it reports the
/// interface its encrypted UDP transport leaves through, with which mark and
/// routing table, and tells when one tunnel is silently nested inside another
/// (for example a split tunnel captured by a full tunnel's default route),
/// with the FwMark that fixes it, verified against the kernel's routing.
#[derive(Parser)]
#[command(version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Hide public keys (shown as stable digests) and addresses in all output.
    #[arg(long, global = true)]
    redact: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Trace tunnels until Ctrl-C, SIGTERM or --duration, then print a report.
    #[command(after_help = "\
Examples:
  sudo wgtrace run                      live view of every tunnel in every namespace
  sudo wgtrace run --duration 10        trace 10 s, then print the report
  sudo wgtrace run --duration 5 --json  machine-readable report on stdout (logs on stderr)
  sudo wgtrace run --netns blue         only tunnels in `ip netns` namespace blue
  sudo wgtrace run --duration 10 --probe  also measure what a nested tunnel's fix would save
  sudo wgtrace run --prometheus :9586   serve metrics on 127.0.0.1:9586 until SIGTERM (deploy/ has examples)
  sudo wgtrace run --peer-names /etc/wgtrace/peers  name peers (`PUBLIC_KEY = NAME` lines)
  sudo wgtrace run --prometheus :9586 --peer-metrics  per-peer series instead of per-tunnel ones
  sudo wgtrace run --events | jq .      one JSON line per event (flows, routes, verdicts, handshakes)

Every packet is traced, continuously; packets that are not a known tunnel's leave the programs after a
header read and one bit test (docs/performance.md).")]
    Run {
        /// Stop after this many seconds (default: run until Ctrl-C or SIGTERM).
        #[arg(long, value_name = "SECONDS")]
        duration: Option<f64>,
        /// Refresh the live view (and the --prometheus metrics) this often.
        #[arg(long, value_name = "SECONDS", default_value_t = 1.0)]
        interval: f64,
        /// Print the final report as one JSON document on stdout.
        #[arg(long)]
        json: bool,
        /// Only tunnels in this named network namespace (`ip netns list`).
        #[arg(long, value_name = "NAME", conflicts_with = "current_netns")]
        netns: Option<String>,
        /// Only tunnels in wgtrace's own network namespace.
        #[arg(long)]
        current_netns: bool,
        /// Measure what nesting costs: send 5 ICMP echoes to each nested
        /// tunnel's endpoint along its current path and along the fixed one.
        /// Nothing is sent without this flag.
        #[arg(long)]
        probe: bool,
        /// Privilege separation: once attached, wgtrace becomes user nobody
        /// with only CAP_NET_ADMIN (no CAP_SYS_ADMIN, CAP_BPF
        /// or CAP_PERFMON: it cannot load BPF or enter namespaces); a small
        /// root helper that parses nothing enters namespaces and finds
        /// daemons for it. Not with --probe.
        #[arg(long, conflicts_with = "probe")]
        drop_privileges: bool,
        /// Serve Prometheus metrics at http://ADDR/metrics while tracing
        /// (OpenMetrics or text format 0.0.4, as the scraper asks), until
        /// SIGTERM. ADDR is IP:PORT, or :PORT for 127.0.0.1; on any other
        /// address whoever can reach it can read tunnel names and counts.
        #[arg(long, value_name = "ADDR", value_parser = wgtrace::exporter::parse_address)]
        prometheus: Option<std::net::SocketAddr>,
        /// Peer names from FILE: one `PUBLIC_KEY = NAME` per line (`#`
        /// comments). `# friendly_name = NAME` comments in the [Peer]
        /// sections of /etc/wireguard/IFACE.conf (on the host, or in a
        /// userspace daemon's mount namespace) are read too; the file wins.
        #[arg(long, value_name = "FILE")]
        peer_names: Option<std::path::PathBuf>,
        /// A peer counts as up when its last handshake is at most this old
        /// (WireGuard rekeys every 120 s while in use; 180 allows retries).
        #[arg(long, value_name = "SECONDS", default_value_t = 180, value_parser = clap::value_parser!(u64).range(1..))]
        handshake_timeout: u64,
        /// Export per-peer series (a `peer` label: its name, else the first 8
        /// characters of its key) instead of per-tunnel ones: one set of
        /// series per peer, so leave it off on hubs with many peers.
        #[arg(long, requires = "prometheus")]
        peer_metrics: bool,
        /// Write one JSON object per line to stdout for each event: transport
        /// flow seen, route decision, verdict change, handshake, tunnel or peer
        /// appearing or going away (schema: docs/json.md). The final report
        /// is not printed; the live view is off.
        #[arg(long, conflicts_with = "json")]
        events: bool,
        /// More detail on stderr (repeat for debug output).
        #[arg(short, long, action = clap::ArgAction::Count)]
        verbose: u8,
    },
    /// Diagnose tunnel routing statically, in a second, without eBPF.
    ///
    /// Asks the kernel where each tunnel's encrypted transport would be
    /// routed (with the tunnel's mark and ports) and reports tunnels nested
    /// inside others, routing loops, unreachable endpoints and colliding
    /// marks, each with a fix verified against the kernel. Exit status: 0
    /// healthy, 1 problems found, 2 could not check.
    #[command(after_help = "\
Examples:
  wgtrace check                         tunnels in this network namespace
  sudo wgtrace check --all-netns        every namespace
  wgtrace check --json                  machine-readable, for CI jobs and monitoring probes
  wgtrace check --config wg2.conf       what would wg2's transport do if brought up now?")]
    Check {
        /// Only tunnels in this named network namespace (`ip netns list`).
        #[arg(long, value_name = "NAME", conflicts_with = "all_netns")]
        netns: Option<String>,
        /// Every network namespace (needs root to enter them).
        #[arg(long)]
        all_netns: bool,
        /// Judge a wg-quick config file before it is brought up.
        #[arg(long, value_name = "FILE.conf")]
        config: Option<std::path::PathBuf>,
        /// Print the diagnosis as one JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
}

fn seconds(value: f64, what: &str) -> Result<Duration> {
    anyhow::ensure!(value.is_finite() && value > 0.0, "--{what} must be a positive number of seconds, not {value}");
    Ok(Duration::from_secs_f64(value))
}

fn main() -> std::process::ExitCode {
    // `run --drop-privileges` re-executes wgtrace as its privileged helper.
    if let Some(fd) = wgtrace::privileges::helper::started_as_helper() {
        return std::process::ExitCode::from(wgtrace::privileges::helper::serve(fd));
    }
    let cli = Cli::parse();
    if cli.redact {
        wgtrace::redact::enable();
    }
    let result = match cli.command {
        Command::Run {
            duration,
            interval,
            json,
            netns,
            current_netns,
            probe,
            drop_privileges,
            prometheus,
            peer_names,
            handshake_timeout,
            peer_metrics,
            events,
            verbose,
        } => {
            init_logging(verbose);
            (|| -> Result<u8> {
                let options = RunOptions {
                    duration: duration.map(|d| seconds(d, "duration")).transpose()?,
                    interval: seconds(interval, "interval")?,
                    json,
                    probe,
                    drop_privileges,
                    prometheus,
                    peer_names: peer_names
                        .as_deref()
                        .map(wgtrace::names::load_names_file)
                        .transpose()?
                        .unwrap_or_default(),
                    handshake_timeout: Duration::from_secs(handshake_timeout),
                    peer_metrics,
                    events,
                    scope: match (netns, current_netns) {
                        (Some(name), _) => Scope::Named(name),
                        (None, true) => Scope::Current,
                        (None, false) => Scope::All,
                    },
                };
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                runtime.block_on(run(options))?;
                Ok(0)
            })()
        }
        Command::Check { netns, all_netns, config, json } => {
            init_logging(0);
            let scope = match (netns, all_netns) {
                (Some(name), _) => Scope::Named(name),
                (None, true) => Scope::All,
                (None, false) => Scope::Current,
            };
            wgtrace::check::main(&wgtrace::check::CheckOptions { scope, json, config })
        }
    };
    match result {
        Ok(code) => std::process::ExitCode::from(code),
        Err(err) => {
            eprintln!("wgtrace: error: {err:#}");
            std::process::ExitCode::from(2)
        }
    }
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level)).init();
}
