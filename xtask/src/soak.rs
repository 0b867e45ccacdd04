//! `cargo xtask soak`: wgtrace under mixed load for a long while, checking
//! that it stays flat in memory, keeps answering scrapes, and counts (never
//! hides) what it cannot deliver. `.ci/run` runs a one-minute form; run
//! `cargo xtask soak --seconds 600` for the ten-minute one.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{http, lab};

/// Mixed traffic from the lab client: bulk TCP over wg1, pings over both
/// tunnels (latency samples), and a steady trickle of new UDP flows.
fn start_traffic(seconds: u64) -> Result<Vec<Child>> {
    let in_client = |args: &[&str]| {
        Command::new("ip")
            .args(["netns", "exec", lab::CLIENT])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", args.join(" ")))
    };
    let server = Command::new("ip")
        .args(["netns", "exec", lab::ROUTER, "iperf3", "-s", "-1"])
        .stdout(Stdio::null())
        .spawn()
        .context("starting iperf3 -s")?;
    std::thread::sleep(Duration::from_millis(300));
    let duration = seconds.to_string();
    let flows = format!(
        "import socket,time\nend=time.time()+{seconds}\nwhile time.time()<end:\n \
         s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.sendto(b'x'*32,('{}',9)); s.close(); time.sleep(0.005)\n",
        lab::WG1_REMOTE
    );
    Ok(vec![
        server,
        in_client(&["iperf3", "-c", lab::WG1_REMOTE, "-t", &duration, "-b", "100M"])?,
        in_client(&["ping", "-q", "-i", "0.05", "-w", &duration, lab::WG1_REMOTE])?,
        in_client(&["ping", "-q", "-i", "0.05", "-w", &duration, lab::WG0_REMOTE])?,
        in_client(&["python3", "-c", &flows])?,
    ])
}

fn rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches(" kB")
        .parse()
        .ok()
}

/// The value of an unlabelled sample in a text exposition.
fn sample(exposition: &str, name: &str) -> Option<f64> {
    exposition.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

pub struct Sample {
    pub at: Duration,
    pub rss_kib: u64,
    pub scrape: Duration,
    pub events_lost: f64,
}

pub fn run(workspace: &std::path::Path, seconds: u64) -> Result<()> {
    let _lock = lab::lock()?;
    let status =
        Command::new(env!("CARGO")).args(["build", "--release", "-p", "wgtrace"]).current_dir(workspace).status()?;
    anyhow::ensure!(status.success(), "building wgtrace failed");
    lab::up(&lab::LabOptions { delay_ms: 0, ..lab::LabOptions::default() })?;
    let result = soak(workspace, seconds);
    lab::down()?;
    let samples = result?;
    report(&samples)
}

fn soak(workspace: &std::path::Path, seconds: u64) -> Result<Vec<Sample>> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let address = format!("127.0.0.1:{port}");
    let mut wgtrace = Command::new(workspace.join("target/release/wgtrace"))
        .args(["run", "--prometheus", &address])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting wgtrace")?;
    let pid = wgtrace.id();
    let started = Instant::now();
    let mut traffic = start_traffic(seconds)?;
    let mut samples = Vec::new();
    let outcome = (|| -> Result<()> {
        while started.elapsed() < Duration::from_secs(seconds) {
            std::thread::sleep(Duration::from_secs(5));
            if let Some(status) = wgtrace.try_wait()? {
                bail!("wgtrace exited during the soak: {status}");
            }
            let asked = Instant::now();
            let response = http::get(&address, "/metrics", None).context("scraping wgtrace")?;
            let scrape = asked.elapsed();
            anyhow::ensure!(response.status == 200, "scrape answered {}", response.status);
            anyhow::ensure!(response.body.contains("wgtrace_tunnel_nested"), "scrape without tunnel metrics");
            samples.push(Sample {
                at: started.elapsed(),
                rss_kib: rss_kib(pid).unwrap_or(0),
                scrape,
                events_lost: sample(&response.body, "wgtrace_events_lost_total").unwrap_or(f64::NAN),
            });
            eprintln!(
                "soak: {:>4.0} s  RSS {:>6} KiB  scrape {:>5.1} ms  events lost {}",
                started.elapsed().as_secs_f64(),
                samples.last().map_or(0, |s| s.rss_kib),
                scrape.as_secs_f64() * 1000.0,
                samples.last().map_or(f64::NAN, |s| s.events_lost)
            );
        }
        Ok(())
    })();
    for child in &mut traffic {
        let _ = child.kill();
        let _ = child.wait();
    }
    // SAFETY: signalling the child we started.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let status = wgtrace.wait()?;
    outcome?;
    anyhow::ensure!(status.success(), "wgtrace did not exit cleanly on SIGTERM: {status}");
    Ok(samples)
}

/// Memory is flat when the last third of the run holds no more than the
/// first third (after warm-up) plus a small allowance for allocator noise.
const RSS_ALLOWANCE_KIB: u64 = 2048;

fn report(samples: &[Sample]) -> Result<()> {
    anyhow::ensure!(samples.len() >= 3, "too few samples; soak for at least 15 s");
    let third = samples.len() / 3;
    let early = samples[..third.max(1)].iter().map(|s| s.rss_kib).max().unwrap_or(0);
    let late = samples[samples.len() - third.max(1)..].iter().map(|s| s.rss_kib).max().unwrap_or(0);
    let slowest = samples.iter().map(|s| s.scrape).max().unwrap_or_default();
    let lost = samples.last().map_or(f64::NAN, |s| s.events_lost);
    println!(
        "soak: {} samples over {:.0} s; RSS {} KiB early, {} KiB late; slowest scrape {:.1} ms; events lost {lost}",
        samples.len(),
        samples.last().map_or(0.0, |s| s.at.as_secs_f64()),
        early,
        late,
        slowest.as_secs_f64() * 1000.0
    );
    anyhow::ensure!(late <= early + RSS_ALLOWANCE_KIB, "memory grew from {early} KiB to {late} KiB");
    anyhow::ensure!(slowest < Duration::from_secs(1), "a scrape took {slowest:?} under load");
    anyhow::ensure!(lost.is_finite(), "events lost were not reported");
    Ok(())
}
