//! Runs a shell command as root in a VM booted from Debian's stock kernel:
//! `cargo run -p xtask --example vm -- 'modprobe wireguard && lsmod'`.
//! A stand-in until `cargo xtask vm-test` exists.

use std::time::{Duration, Instant};

use clap::Parser;
use xtask::vm::{VmOptions, run_in_vm};

#[derive(Parser)]
struct Args {
    /// Guest memory in MiB.
    #[arg(long, default_value_t = VmOptions::default().memory_mib)]
    memory_mib: u32,
    /// Guest CPUs.
    #[arg(long, default_value_t = VmOptions::default().cpus)]
    cpus: u32,
    /// Seconds before qemu is killed.
    #[arg(long, default_value_t = VmOptions::default().timeout.as_secs())]
    timeout: u64,
    /// The shell command (words are joined with spaces).
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let opts = VmOptions { memory_mib: args.memory_mib, cpus: args.cpus, timeout: Duration::from_secs(args.timeout) };
    let started = Instant::now();
    let result = run_in_vm(&opts, &args.command.join(" "))?;
    print!("{}", result.output);
    eprintln!("vm: exit code {} after {:.1} s", result.exit_code, started.elapsed().as_secs_f64());
    std::process::exit(result.exit_code);
}
