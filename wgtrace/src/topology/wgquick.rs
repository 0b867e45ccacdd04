//! wg-quick configuration files, for `wgtrace check --config`: what a
//! tunnel would do before it is brought up. Private and preshared keys are
//! skipped, never stored, and no message ever quotes a line: errors name the
//! line number and the key, never a value (a value may be a private key, and
//! so may a line that is not `KEY = VALUE` at all).

use std::net::{SocketAddr, ToSocketAddrs as _};

use anyhow::{Context as _, Result, bail};

use super::{Device, Peer, parse_prefix};

/// wg-quick's default mark and table for a tunnel with a default route.
pub const WG_QUICK_DEFAULT_MARK: u32 = 51820;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QuickConfig {
    pub device: Device,
    /// `FwMark` as written (None when absent or `off`).
    pub fwmark: Option<u32>,
    /// `Table` as written, lowercased (`auto` when absent).
    pub table: String,
    /// Keys wg-quick does not know (misspelt, or in the wrong section), as
    /// `line N: ...` messages without their values. wg-quick would refuse
    /// the file; `check` reports each as a finding.
    pub unknown_keys: Vec<String>,
}

/// Keys wg-quick accepts in each section (wg-quick(8), wg(8)), lowercased.
const INTERFACE_KEYS: [&str; 12] = [
    "privatekey",
    "listenport",
    "fwmark",
    "address",
    "dns",
    "mtu",
    "table",
    "preup",
    "postup",
    "predown",
    "postdown",
    "saveconfig",
];
const PEER_KEYS: [&str; 5] = ["publickey", "presharedkey", "allowedips", "endpoint", "persistentkeepalive"];

/// The name of a key as it can be shown: its leading letters only, so that
/// `PrivateKey: SECRET` (no `=`) is named `PrivateKey` and never more.
fn key_name(text: &str) -> &str {
    let text = text.trim_start();
    let end = text.find(|c: char| !c.is_ascii_alphanumeric()).unwrap_or(text.len());
    &text[..end.min(32)]
}

impl QuickConfig {
    /// Whether wg-quick would install its full-tunnel policy (fwmark, table
    /// 51820 and the `not fwmark` rule) for this config.
    pub fn is_full_tunnel(&self) -> bool {
        self.table == "auto" && self.device.peers.iter().flat_map(|p| &p.allowed_ips).any(|(_, len)| *len == 0)
    }

    /// The mark its transport would carry once up.
    pub fn effective_mark(&self) -> u32 {
        match self.fwmark {
            Some(mark) => mark,
            None if self.is_full_tunnel() => WG_QUICK_DEFAULT_MARK,
            None => 0,
        }
    }
}

pub fn parse(text: &str) -> Result<QuickConfig> {
    parse_with(text, resolve)
}

/// [`parse`] with the endpoint resolver given, so that tests and fuzzing
/// never touch DNS.
pub fn parse_with(text: &str, resolve: impl Fn(&str) -> Result<SocketAddr>) -> Result<QuickConfig> {
    let mut config = QuickConfig { table: "auto".into(), ..QuickConfig::default() };
    let mut section = String::new();
    for (number, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let line_number = number + 1;
        if line.starts_with('[') {
            section = line.trim_matches(|c| c == '[' || c == ']').trim().to_ascii_lowercase();
            if section == "peer" {
                config.device.peers.push(Peer::default());
            } else if section != "interface" {
                bail!("line {line_number}: unknown section [{}]", key_name(&section));
            }
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            bail!("line {line_number}: expected KEY = VALUE after `{}` (the rest is not shown)", key_name(line))
        };
        let (key, value) = (key.trim().to_ascii_lowercase(), value.trim());
        let shown = key_name(&key).to_owned();
        let context = || format!("line {line_number}, {shown}");
        match (section.as_str(), key.as_str()) {
            ("", _) => bail!("line {line_number}: {shown} outside any section (before [Interface] or [Peer])"),
            ("interface", "listenport") => config.device.listen_port = value.parse().with_context(context)?,
            ("interface", "fwmark") => config.fwmark = parse_mark(value).with_context(context)?,
            ("interface", "table") => config.table = value.to_ascii_lowercase(),
            ("peer", "publickey") => last_peer(&mut config)?.public_key = value.to_owned(),
            ("peer", "endpoint") => last_peer(&mut config)?.endpoint = Some(resolve(value).with_context(context)?),
            ("peer", "allowedips") => {
                for prefix in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                    let prefix = parse_prefix(prefix).with_context(context)?;
                    last_peer(&mut config)?.allowed_ips.push(prefix);
                }
            }
            // PrivateKey, PresharedKey, Address, DNS, MTU, hooks: not needed.
            ("interface", known) if INTERFACE_KEYS.contains(&known) => {}
            ("peer", known) if PEER_KEYS.contains(&known) => {}
            (section, _) => {
                let misplaced = if section == "peer" {
                    INTERFACE_KEYS.contains(&key.as_str())
                } else {
                    PEER_KEYS.contains(&key.as_str())
                };
                config.unknown_keys.push(if misplaced {
                    format!("line {line_number}: {shown} does not belong in [{section}]")
                } else if shown.len() != key.len() {
                    format!("line {line_number}: `{shown}` followed by something that is not `= VALUE` (misspelt key?)")
                } else {
                    format!("line {line_number}: unknown key {shown} in [{section}] (misspelt?)")
                });
            }
        }
    }
    config.device.fwmark = config.effective_mark();
    Ok(config)
}

fn last_peer(config: &mut QuickConfig) -> Result<&mut Peer> {
    config.device.peers.last_mut().context("peer setting before any [Peer]")
}

fn parse_mark(value: &str) -> Result<Option<u32>> {
    if value.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let mark = match value.strip_prefix("0x").or_else(|| value.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16)?,
        None => value.parse()?,
    };
    Ok((mark != 0).then_some(mark))
}

/// `HOST:PORT` or `[V6]:PORT`; names are resolved as wg-quick would.
pub fn resolve(value: &str) -> Result<SocketAddr> {
    if let Ok(address) = value.parse() {
        return Ok(address);
    }
    value.to_socket_addrs()?.next().context("the endpoint did not resolve")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPLIT: &str = "\
[Interface]
PrivateKey = aGVsbG8gd29ybGQgaGVsbG8gd29ybGQgaGVsbG8gd28=
ListenPort = 51822   # comment
Address = 198.18.2.2/32

[Peer]
PublicKey = uFmW/sycfx/G0lcqdu2hHVm80gvo5UOxXOS9hajnWjM=
Endpoint = 192.0.2.200:51822
AllowedIPs = 198.18.2.0/24, 2001:db8:2::/48
";

    #[test]
    fn a_split_tunnel_is_unmarked() {
        let config = parse(SPLIT).unwrap();
        assert_eq!(config.device.listen_port, 51822);
        assert!(!config.is_full_tunnel());
        assert_eq!(config.device.fwmark, 0);
        let peer = &config.device.peers[0];
        assert_eq!(peer.endpoint, Some("192.0.2.200:51822".parse().unwrap()));
        assert_eq!(peer.allowed_ips.len(), 2);
        assert!(!format!("{config:?}").contains("aGVsbG8"), "private key must not be kept");
    }

    #[test]
    fn full_tunnels_get_wg_quicks_mark_unless_told_otherwise() {
        let full = SPLIT.replace("198.18.2.0/24, 2001:db8:2::/48", "0.0.0.0/0");
        assert_eq!(parse(&full).unwrap().device.fwmark, 51820);
        assert_eq!(parse(&full.replace("ListenPort", "FwMark = 0x4d2\nListenPort")).unwrap().device.fwmark, 1234);
        assert_eq!(parse(&full.replace("ListenPort", "Table = off\nListenPort")).unwrap().device.fwmark, 0);
        assert_eq!(parse(&SPLIT.replace("ListenPort", "FwMark = off\nListenPort")).unwrap().fwmark, None);
    }

    #[test]
    fn errors_name_the_line() {
        let err = parse("[Interface]\nListenPort = lots\n").unwrap_err();
        assert!(format!("{err:#}").contains("line 2"), "{err:#}");
        assert!(parse("[Peer]\nEndpoint = nonsense\n").is_err());
        assert!(parse("ListenPort = 1\n").is_err());
        assert!(parse("[Bogus]\n").is_err());
        let misplaced = parse("[Interface]\nAllowedIPs = 10.0.0.0/8\n").unwrap();
        assert_eq!(misplaced.unknown_keys, ["line 2: allowedips does not belong in [interface]"]);
    }

    const SECRET: &str = "aGVsbG8gd29ybGQgaGVsbG8gd29ybGQgaGVsbG8gd28=";

    #[test]
    fn no_message_quotes_a_value() {
        let broken = [
            format!("PrivateKey = {SECRET}\n[Interface]\n"),
            "[Interface]\nPrivateKey aGVsbG8gd29ybGQ\n".to_owned(),
            format!("[{SECRET}]\n"),
            format!("[Interface]\nListenPort = {SECRET}\n"),
            format!("[Interface]\nFwMark = {SECRET}\n"),
            format!("[Peer]\nAllowedIPs = {SECRET}\n"),
            format!("[Peer]\nEndpoint = {SECRET}\n"),
        ];
        for text in &broken {
            let err = parse_with(text, |_| anyhow::bail!("does not resolve")).unwrap_err();
            let message = format!("{err:#} {err:?}");
            assert!(!message.contains("aGVsbG8"), "{message}");
            assert!(message.contains("line "), "{message}");
        }
        let err = parse(&format!("PrivateKey = {SECRET}\n")).unwrap_err();
        assert_eq!(format!("{err:#}"), "line 1: privatekey outside any section (before [Interface] or [Peer])");
    }

    #[test]
    fn misspelt_keys_are_reported_by_name_only() {
        let config =
            parse(&format!("[Interface]\nPrivateKey: {SECRET}\nListenPrt = 1\n[Peer]\nListenPort = 2\n")).unwrap();
        assert_eq!(
            config.unknown_keys,
            [
                "line 2: `privatekey` followed by something that is not `= VALUE` (misspelt key?)",
                "line 3: unknown key listenprt in [interface] (misspelt?)",
                "line 5: listenport does not belong in [peer]",
            ]
        );
        assert!(parse(SPLIT).unwrap().unknown_keys.is_empty(), "{:?}", parse(SPLIT).unwrap().unknown_keys);
    }
}
