//! The cross-platform WireGuard userspace API (wireguard-go, boringtun): a
//! unix socket per interface that answers `get=1` with `key=value` lines.
//!
//! The socket lives in the daemon's own mount namespace, so it is reached
//! through `/proc/PID/root/...` of the daemon, never a global path.

use std::{
    io::{Read as _, Write as _},
    net::SocketAddr,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use super::{Device, Peer, parse_prefix};

/// Where a daemon with this PID keeps the socket of `interface`.
pub fn socket_path(pid: u32, interface: &str) -> Option<PathBuf> {
    ["run/wireguard", "var/run/wireguard"]
        .iter()
        .map(|dir| PathBuf::from(format!("/proc/{pid}/root/{dir}/{interface}.sock")))
        .find(|p| p.exists())
}

pub fn get(socket: &Path) -> Result<Device> {
    let mut stream = UnixStream::connect(socket).with_context(|| format!("connecting to {}", socket.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(b"get=1\n\n")?;
    let mut reply = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).with_context(|| format!("reading from {}", socket.display()))?;
        reply.extend_from_slice(&chunk[..n]);
        if n == 0 || reply.ends_with(b"\n\n") {
            break;
        }
        if reply.len() > 16 << 20 {
            bail!("{} sent more than 16 MiB", socket.display());
        }
    }
    let text = String::from_utf8_lossy(&reply);
    let device = parse(&text)?;
    // Overwrite the reply: it held the private key.
    reply.iter_mut().for_each(|b| *b = 0);
    Ok(device)
}

/// Parses a `get=1` reply. The private key and preshared keys are skipped,
/// never stored.
pub fn parse(text: &str) -> Result<Device> {
    let mut device = Device::default();
    for line in text.lines() {
        if line.is_empty() {
            break;
        }
        let Some((key, value)) = line.split_once('=') else {
            bail!("malformed UAPI line (no '=')");
        };
        match key {
            "listen_port" => device.listen_port = value.parse().context("listen_port")?,
            "fwmark" => device.fwmark = value.parse().context("fwmark")?,
            "public_key" => device.peers.push(Peer { public_key: hex_key_to_base64(value)?, ..Peer::default() }),
            "endpoint" => {
                let peer = device.peers.last_mut().context("endpoint before any peer")?;
                peer.endpoint = Some(value.parse::<SocketAddr>().context("endpoint")?);
            }
            "allowed_ip" => {
                let peer = device.peers.last_mut().context("allowed_ip before any peer")?;
                peer.allowed_ips.push(parse_prefix(value).context("allowed_ip")?);
            }
            "last_handshake_time_sec" => {
                if let Some(peer) = device.peers.last_mut() {
                    peer.last_handshake_sec = value.parse().unwrap_or(0);
                }
            }
            "errno" if value != "0" => bail!("the daemon answered errno={value}"),
            _ => {} // private_key, preshared_key, counters: not needed
        }
    }
    Ok(device)
}

fn hex_key_to_base64(hex: &str) -> Result<String> {
    if hex.len() != 64 {
        bail!("a WireGuard key is 32 bytes");
    }
    let bytes = (0..32)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()
        .context("key is not hex")?;
    Ok(base64(&bytes))
}

pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n =
            (chunk[0] as u32) << 16 | (*chunk.get(1).unwrap_or(&0) as u32) << 8 | *chunk.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPLY: &str = "private_key=e84b5a6d2717c1003a13b431570353dbaca9146cf150c5f8575680feba52027a\n\
listen_port=51821\n\
fwmark=51820\n\
public_key=b85996fecc9c7f1fc6d2572a76eda11d59bcd20be8e543b15ce4bd85a8e75a33\n\
preshared_key=0000000000000000000000000000000000000000000000000000000000000000\n\
protocol_version=1\n\
endpoint=192.0.2.1:51821\n\
last_handshake_time_sec=1700000000\n\
allowed_ip=203.0.113.0/24\n\
allowed_ip=2001:db8:1::/48\n\
errno=0\n\n";

    #[test]
    fn parses_a_wireguard_go_reply_without_keeping_the_private_key() {
        let device = parse(REPLY).unwrap();
        assert_eq!(device.listen_port, 51821);
        assert_eq!(device.fwmark, 51820);
        assert_eq!(device.peers.len(), 1);
        let peer = &device.peers[0];
        assert_eq!(peer.public_key, "uFmW/sycfx/G0lcqdu2hHVm80gvo5UOxXOS9hajnWjM=");
        assert_eq!(peer.endpoint, Some("192.0.2.1:51821".parse().unwrap()));
        assert_eq!(peer.allowed_ips.len(), 2);
        assert!(!format!("{device:?}").contains("e84b5a6d"), "private key must not be kept");
    }

    #[test]
    fn rejects_errors_and_garbage() {
        assert!(parse("errno=19\n\n").is_err());
        assert!(parse("listen_port=notanumber\n").is_err());
        assert!(parse("endpoint=1.2.3.4:5\n").is_err(), "endpoint before peer");
        assert!(parse("public_key=abc\n").is_err());
        assert!(parse("garbage\n").is_err());
    }

    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }
}
