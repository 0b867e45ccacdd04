//! Traffic: iperf3 servers and clients in the lab.

#[allow(unused_imports)]
use super::*;

/// iperf3 servers at wg0's far end (server namespace) and wg1's (router).
pub(super) struct IperfServers {
    pub(super) _servers: Vec<Background>,
}

impl IperfServers {
    pub(super) fn start() -> Result<Self> {
        let mut servers = Vec::new();
        for namespace in [lab::SERVER, lab::ROUTER] {
            servers.push(Background::spawn("ip", &["netns", "exec", namespace, "iperf3", "-s"])?);
        }
        std::thread::sleep(Duration::from_millis(300));
        Ok(Self { _servers: servers })
    }
}

/// Runs an iperf3 client in the lab client namespace and returns its JSON,
/// retrying twice (a server still finishing the previous test says busy).
pub(super) fn iperf(args: &[&str]) -> Result<Value> {
    let mut full = vec!["netns", "exec", lab::CLIENT, "iperf3", "-J", "--connect-timeout", "3000"];
    full.extend_from_slice(args);
    let mut last_error = None;
    for attempt in 0..3 {
        if attempt > 0 {
            std::thread::sleep(Duration::from_secs(1));
        }
        check_interrupted()?;
        let output = crate::cmd::output("ip", &full)?;
        let json: Result<Value> = serde_json::from_slice(&output.stdout).context("iperf3 printed no JSON");
        match json {
            Ok(json) if json.get("error").is_none() && output.status.success() => return Ok(json),
            Ok(json) => last_error = Some(anyhow::anyhow!("{}", json["error"])),
            Err(err) => last_error = Some(err.context(String::from_utf8_lossy(&output.stderr).trim().to_owned())),
        }
    }
    Err(last_error.expect("three attempts").context(format!("iperf3 {}", args.join(" "))))
}

/// TCP throughput to `address`, in Mbit/s as the receiver saw it.
pub(super) fn tcp(address: &str, seconds: u32, omit: u32) -> Result<f64> {
    let (seconds, omit) = (seconds.to_string(), omit.to_string());
    let json = iperf(&["-c", address, "-t", &seconds, "-O", &omit])?;
    let bps =
        json["end"]["sum_received"]["bits_per_second"].as_f64().context("no end.sum_received in iperf3's JSON")?;
    Ok(bps / 1e6)
}

/// Small UDP packets at unlimited rate to `address`: packets per second received.
pub(super) fn udp_small(address: &str, seconds: u32, omit: u32) -> Result<f64> {
    let (seconds, omit, length) = (seconds.to_string(), omit.to_string(), SMALL_PAYLOAD.to_string());
    let json = iperf(&["-c", address, "-u", "-b", "0", "-l", &length, "-t", &seconds, "-O", &omit])?;
    let received = &json["end"]["sum_received"];
    let bytes = received["bytes"].as_f64().context("no end.sum_received.bytes in iperf3's JSON")?;
    let elapsed = received["seconds"].as_f64().filter(|s| *s > 0.0).context("no end.sum_received.seconds")?;
    Ok(bytes / SMALL_PAYLOAD as f64 / elapsed)
}
