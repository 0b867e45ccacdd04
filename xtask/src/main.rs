use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use xtask::{cmd, lab, setup};

/// Developer tasks for wgtrace.
#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing to build and test wgtrace (Debian/Ubuntu, as root).
    Setup,
    /// Set up, build, and run wgtrace: on this host's tunnels if it has any,
    /// else on the built-in lab, before and after the fix.
    Run {
        /// Arguments passed to `wgtrace run` when tracing this host's own tunnels.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, build, and run every test (eBPF and lab tests need root).
    ///
    /// Everything by default: unit and host integration tests (wireguard-go
    /// lab), the same suite against kernel WireGuard in a VM, the fuzz
    /// targets for a bounded time, and the benchmark's smoke form.
    Test {
        /// Only `cargo test` on this host (no VM, fuzzing or benchmark).
        #[arg(long)]
        host_only: bool,
        /// Seconds per fuzz target.
        #[arg(long, default_value_t = 20)]
        fuzz_seconds: u32,
        /// Extra arguments for `cargo test` (e.g. a test name filter); implies --host-only.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the integration suite against kernel WireGuard on Debian's stock
    /// kernel, in a VM (qemu, software emulation).
    VmTest,
    /// Trace the lab under mixed load with the exporter on, checking memory
    /// stays flat and scrapes stay fast (ten minutes: --seconds 600).
    Soak {
        #[arg(long, default_value_t = 600)]
        seconds: u64,
    },
    /// Run every fuzz target of fuzz/ for a bounded time (cargo-fuzz, nightly).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 30)]
        seconds: u32,
    },
    /// Measure what tracing costs on the lab (no delay line), against the budget,
    /// side by side with a bpftrace baseline; writes BENCHMARKS.md.
    Bench {
        /// One round of ~1 s measurements, written to target/bench-smoke.md, no thresholds (for CI).
        #[arg(long)]
        smoke: bool,
        /// Rounds, each alternating untraced, wgtrace and the bpftrace baseline.
        #[arg(long, default_value_t = 5)]
        rounds: u32,
        /// Where to write the table (default BENCHMARKS.md at the repository root).
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// The nesting lab: wg1 silently inside wg0, in network namespaces.
    Lab {
        #[command(subcommand)]
        action: LabAction,
    },
    /// (internal) A lab VPN relay (TUN ↔ UDP); started by `lab shape tun-def1`.
    #[command(hide = true)]
    TunRelay {
        #[arg(long)]
        netns: String,
        #[arg(long)]
        device: String,
        #[arg(long)]
        bind: std::net::SocketAddr,
        #[arg(long)]
        peer: Option<std::net::SocketAddr>,
    },
    /// (internal) The lab's delay line; started by `lab up`.
    #[command(hide = true)]
    DelayLine {
        #[arg(long)]
        netns: String,
        #[arg(long)]
        device: String,
        #[arg(long)]
        delay_ms: u64,
    },
    /// (internal) Empty BPF programs on these tracepoints, held until a
    /// signal: the benchmark's floor condition.
    #[command(hide = true)]
    EmptyHooks { tracepoints: Vec<String> },
    /// (internal) WireGuard-shaped datagrams from a plain UDP socket, for
    /// the speakers tests; started inside a lab namespace.
    #[command(hide = true)]
    WgShaped {
        #[arg(long)]
        tun: Option<String>,
        #[arg(long)]
        port: u16,
        #[arg(long)]
        to: Option<std::net::SocketAddr>,
        #[arg(long, default_value_t = 0)]
        count: u32,
        #[arg(long, default_value_t = 200)]
        burst: u32,
        #[arg(long)]
        respond: bool,
        #[arg(long)]
        seconds: f64,
    },
}

#[derive(Subcommand)]
enum LabAction {
    /// Build the lab (removing a leftover one first).
    Up {
        /// One-way delay on the wg0 path, in ms (0: no delay line, for benchmarks).
        #[arg(long, default_value_t = 20)]
        delay_ms: u64,
        /// Also add wg2 (nested in wg1, so wg2 → wg1 → wg0) and wg3 (IPv6 transport).
        #[arg(long)]
        extras: bool,
        /// Give wg0 this FwMark and Table instead of wg-quick's 51820.
        #[arg(long)]
        wg0_mark: Option<u32>,
        /// Leave out wg0, the full tunnel (only partial tunnels remain).
        #[arg(long)]
        no_full_tunnel: bool,
        /// Run this wireguard-go binary (default: $WGTRACE_LAB_WIREGUARD_GO, else
        /// the one on PATH). `trixie` is Debian trixie's, with UDP GSO/GRO, as
        /// `cargo xtask setup` unpacks it.
        #[arg(long, value_name = "PATH")]
        wireguard_go: Option<std::path::PathBuf>,
    },
    /// Remove everything the lab made.
    Down,
    /// Apply the fix: `wg set wg1 fwmark <wg0's mark>`.
    Fix,
    /// Undo the fix.
    Unfix,
    /// Show what is running and whether wg1 is fixed.
    Status,
    /// Ping over wg1 from the client and print the median RTT.
    Ping,
    /// Build the lab in one of the capture shapes (self-loop, mutual-loop,
    /// tun-def1, manager-mark, mtu, bridge; see xtask/src/lab/shapes.rs),
    /// e.g. `cargo xtask lab shape mutual-loop`, then `wgtrace check`.
    Shape {
        #[arg(value_enum)]
        shape: lab::shapes::Shape,
    },
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_owned()
}

fn cargo(args: &[&str]) -> Result<()> {
    let status = Command::new(env!("CARGO")).args(args).current_dir(workspace_root()).status()?;
    anyhow::ensure!(status.success(), "cargo {} failed", args.join(" "));
    Ok(())
}

fn host_has_tunnels() -> bool {
    let kernel = cmd::run("ip", &["-o", "link", "show", "type", "wireguard"]).is_ok_and(|o| !o.trim().is_empty());
    let userspace = std::fs::read_dir("/run/wireguard")
        .is_ok_and(|d| d.flatten().any(|e| e.path().extension().is_some_and(|x| x == "sock")));
    kernel || userspace
}

fn run_main_job(args: &[String]) -> Result<()> {
    setup::setup()?;
    cargo(&["build", "--release", "-p", "wgtrace"])?;
    let wgtrace = workspace_root().join("target/release/wgtrace");
    if host_has_tunnels() && !lab::is_up() {
        eprintln!("This host has WireGuard tunnels: tracing them (Ctrl-C for the report).");
        let status = Command::new(&wgtrace).arg("run").args(args).status()?;
        anyhow::ensure!(status.success(), "wgtrace failed");
        return Ok(());
    }
    eprintln!("No tunnels of this host's own: building the lab (wg1 nested inside wg0, 20 ms each way on wg0's path).");
    lab::up(&lab::LabOptions::default())?;
    let result = (|| -> Result<()> {
        eprintln!(
            "\n== Broken: ping over wg1 takes {:.1} ms (median). Tracing 5 s of traffic:",
            lab::ping_ms(lab::WG1_REMOTE, 5)?
        );
        // --probe: a few echoes along both paths show what the fix will save.
        trace_with_traffic(&wgtrace, 5, &["--probe"])?;
        lab::fix()?;
        eprintln!(
            "\n== After `wg set wg1 fwmark {}`: ping over wg1 takes {:.1} ms. Tracing again:",
            lab::FULL_TUNNEL_MARK,
            lab::ping_ms(lab::WG1_REMOTE, 5)?
        );
        trace_with_traffic(&wgtrace, 3, &[])
    })();
    lab::down()?;
    result
}

/// Pings over wg1 and wg0 (so both tunnels' RTTs show side by side) while
/// `wgtrace run` traces for `seconds` with `extra` arguments.
fn trace_with_traffic(wgtrace: &Path, seconds: u32, extra: &[&str]) -> Result<()> {
    let count = (seconds * 5).to_string();
    let ping = |address: &str| {
        Command::new("ip")
            .args(["netns", "exec", lab::CLIENT, "ping", "-q", "-i", "0.2", "-c", &count, address])
            .stdout(Stdio::null())
            .spawn()
    };
    let mut traffic = [ping(lab::WG1_REMOTE)?, ping(lab::WG0_REMOTE)?];
    let status = Command::new(wgtrace).args(["run", "--duration", &seconds.to_string()]).args(extra).status();
    for ping in &mut traffic {
        let _ = ping.kill();
        let _ = ping.wait();
    }
    anyhow::ensure!(status?.success(), "wgtrace run failed");
    Ok(())
}

/// Runs `cargo test` (echoing its output) and returns (passed, failed). A
/// full run (no `args`) then runs the nesting and counting suites again on
/// trixie's wireguard-go (UDP GSO/GRO, TUN offloads), the other generation
/// from the bookworm one on PATH. The bulk counting tests are skipped there:
/// counting.rs already runs its bulk test on trixie's binary by name.
fn run_tests(args: &[String]) -> Result<(u64, u64)> {
    setup::setup()?;
    cargo(&["build", "-p", "wgtrace"])?;
    let mut totals = (0, 0);
    let mut failed = !cargo_test(args, None, &mut totals)?;
    if args.is_empty() {
        let binary = setup::trixie_wireguard_go();
        if binary.exists() {
            eprintln!("\n== the nesting and counting suites on trixie's wireguard-go ({})", binary.display());
            let started = std::time::Instant::now();
            let args = ["-p", "wgtrace-tests", "--test", "nesting", "--test", "counting", "--", "--test-threads=1"]
                .into_iter()
                .chain(["--skip", "bulk_tcp_counts_match"])
                .map(String::from)
                .collect::<Vec<_>>();
            failed |= !cargo_test(&args, Some(&binary), &mut totals)?;
            eprintln!("== the trixie pass took {:.0} s", started.elapsed().as_secs_f64());
        } else if std::env::var("CI").is_ok_and(|v| v == "true") {
            // setup() just fetched it; in CI a missing binary is a broken setup.
            bail!("{} is missing after setup: the trixie pass cannot run", binary.display());
        } else {
            eprintln!(
                "\n*** SKIPPED the nesting and counting suites on trixie's wireguard-go: {} is missing ***\n",
                binary.display()
            );
        }
    }
    if failed {
        bail!("tests failed");
    }
    Ok(totals)
}

/// One `cargo test` with the lab's binaries named (and `wireguard_go` as the
/// lab's daemon, if given); adds its results to `totals`. Whether it passed.
fn cargo_test(args: &[String], wireguard_go: Option<&Path>, totals: &mut (u64, u64)) -> Result<bool> {
    let wgtrace = workspace_root().join("target/debug/wgtrace");
    let mut command = Command::new(env!("CARGO"));
    command
        .arg("test")
        .args(args)
        .current_dir(workspace_root())
        .env("WGTRACE_BIN", &wgtrace)
        .env("WGTRACE_LAB_HELPER", std::env::current_exe()?)
        .stdout(Stdio::piped());
    // The first pass is bookworm's (on PATH), whatever the caller's shell says.
    match wireguard_go {
        Some(binary) => command.env("WGTRACE_LAB_WIREGUARD_GO", binary),
        None => command.env_remove("WGTRACE_LAB_WIREGUARD_GO"),
    };
    let mut child = command.spawn().context("running cargo test")?;
    for line in std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().expect("piped"))) {
        let line = line?;
        println!("{line}");
        add_test_result(totals, &line);
    }
    Ok(child.wait()?.success())
}

/// Adds the counts of a libtest `test result: ... N passed; M failed` line.
fn add_test_result(totals: &mut (u64, u64), line: &str) {
    let Some(rest) = line.strip_prefix("test result: ") else { return };
    let count = |word: &str| {
        rest.split(';').find_map(|part| part.trim().strip_suffix(word)?.trim().rsplit(' ').next()?.parse::<u64>().ok())
    };
    totals.0 += count("passed").unwrap_or(0);
    totals.1 += count("failed").unwrap_or(0);
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Task::Setup => setup::setup(),
        Task::Run { args } => run_main_job(&args),
        Task::Test { host_only, fuzz_seconds, args } => {
            let mut totals = run_tests(&args)?;
            if !host_only && args.is_empty() {
                eprintln!("\n== kernel WireGuard in a VM (cargo xtask vm-test)");
                let output = xtask::vmtest::run(&workspace_root())?;
                output.lines().for_each(|line| add_test_result(&mut totals, line));
                eprintln!("\n== fuzzing ({fuzz_seconds} s per target)");
                xtask::fuzz::run(&workspace_root(), fuzz_seconds)?;
                eprintln!("\n== soak, short form (60 s)");
                xtask::soak::run(&workspace_root(), 60)?;
                eprintln!("\n== benchmark smoke run (no thresholds)");
                xtask::bench::main(&xtask::bench::Options { smoke: true, rounds: 1, output: None })?;
            }
            // One closing line for the whole run, host and VM suites together.
            println!("\nwgtrace: {} passed, {} failed", totals.0, totals.1);
            Ok(())
        }
        Task::VmTest => {
            setup::setup()?;
            xtask::vmtest::run(&workspace_root()).map(drop)
        }
        Task::Soak { seconds } => {
            setup::setup()?;
            xtask::soak::run(&workspace_root(), seconds)
        }
        Task::Fuzz { seconds } => xtask::fuzz::run(&workspace_root(), seconds),
        Task::Bench { smoke, rounds, output } => xtask::bench::main(&xtask::bench::Options { smoke, rounds, output }),
        Task::Lab { action } => lab_command(action),
        Task::TunRelay { netns, device, bind, peer } => lab::relay::serve(&netns, &device, bind, peer),
        Task::DelayLine { netns, device, delay_ms } => {
            xtask::delay::serve(&netns, &device, Duration::from_millis(delay_ms))
        }
        Task::EmptyHooks { tracepoints } => xtask::bench::serve_empty_hooks(&tracepoints),
        Task::WgShaped { tun, port, to, count, burst, respond, seconds } => {
            xtask::speakers_lab::send_shaped(&xtask::speakers_lab::ShapedSender {
                tun,
                port,
                to,
                count,
                burst,
                respond,
                seconds,
            })
        }
    }
}

fn lab_command(action: LabAction) -> Result<()> {
    match action {
        LabAction::Up { delay_ms, extras, wg0_mark, no_full_tunnel, wireguard_go } => {
            let wireguard_go = match wireguard_go {
                Some(path) if path.as_os_str() == "trixie" => Some(setup::trixie_wireguard_go()),
                Some(path) => Some(path),
                None => lab::wireguard_go_from_env(),
            };
            lab::up(&lab::LabOptions {
                delay_ms,
                extras,
                wg0_mark,
                full_tunnel: !no_full_tunnel,
                wireguard_go,
                ..Default::default()
            })?;
            print!("{}", lab::status()?);
            Ok(())
        }
        LabAction::Down => lab::down(),
        LabAction::Fix => lab::fix(),
        LabAction::Unfix => lab::unfix(),
        LabAction::Status => {
            print!("{}", lab::status()?);
            Ok(())
        }
        LabAction::Shape { shape } => {
            lab::shapes::up(shape)?;
            println!("lab: up in shape {}", shape.name());
            Ok(())
        }
        LabAction::Ping => {
            println!("wg1 RTT: {:.2} ms (median of 10)", lab::ping_ms(lab::WG1_REMOTE, 10)?);
            Ok(())
        }
    }
}
