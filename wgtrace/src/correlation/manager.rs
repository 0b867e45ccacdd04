//! Which program manages a tunnel, recognised from the namespace's rules,
//! the tunnel's mark and its manager's files: the explanation names it and
//! the fix is written in its form (a wg-quick line for a wg-quick tunnel, a
//! rule for a tunnel whose manager owns its mark).

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::topology::{Topology, Tunnel, netlink::Rule};

#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq, Hash)]
pub enum Manager {
    #[serde(rename = "wg-quick")]
    WgQuick,
    #[serde(rename = "networkmanager")]
    NetworkManager,
    #[serde(rename = "systemd-networkd")]
    SystemdNetworkd,
    #[serde(rename = "tailscale")]
    Tailscale,
    #[serde(rename = "mullvad")]
    Mullvad,
}

impl Manager {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::WgQuick => "wg-quick",
            Self::NetworkManager => "NetworkManager",
            Self::SystemdNetworkd => "systemd-networkd",
            Self::Tailscale => "Tailscale",
            Self::Mullvad => "Mullvad",
        }
    }

    /// The manager sets the mark itself and offers no setting for it: a fix
    /// must be a rule, never a new mark.
    pub fn owns_mark(self) -> bool {
        matches!(self, Self::Tailscale | Self::Mullvad)
    }
}

/// Tailscale's mark and mask (`fwmark 0x80000/0xff0000`, rules 5210-5270).
pub const TAILSCALE_MARK: (u32, u32) = (0x80000, 0xff0000);
/// Mullvad's mark (`0x6d6f6c65`, "mole").
pub const MULLVAD_MARK: u32 = 0x6d6f_6c65;

/// The mark (and mask) a manager's own rules test for, when it has one.
pub fn manager_mark(manager: Manager, tunnel: &Tunnel) -> Option<(u32, u32)> {
    match manager {
        Manager::Tailscale => Some(TAILSCALE_MARK),
        Manager::Mullvad => Some((MULLVAD_MARK, u32::MAX)),
        _ => tunnel.device.as_ref().map(|d| d.fwmark).filter(|m| *m != 0).map(|m| (m, u32::MAX)),
    }
}

fn has_mark_rule(rules: &[Rule], mark: u32, mask: u32) -> bool {
    rules.iter().any(|r| r.fwmark == Some(mark) && r.fwmask.unwrap_or(u32::MAX) == mask)
}

/// The process name holding a userspace tunnel's TUN device.
fn daemon_name<'a>(topology: &'a Topology, tunnel: &Tunnel) -> Option<&'a str> {
    topology.tun_holders.get(&(tunnel.netns, tunnel.interface.clone())).map(|(_, comm)| comm.as_str())
}

/// Where a tunnel's manager keeps its files: the daemon's root for a
/// userspace tunnel (its mount namespace), else the host's.
fn root_of(tunnel: &Tunnel) -> PathBuf {
    match tunnel.daemon_pid {
        Some(pid) => PathBuf::from(format!("/proc/{pid}/root")),
        None => PathBuf::from("/"),
    }
}

/// systemd-networkd: a .netdev file naming the interface. Files are small;
/// only a bounded prefix of each is read.
fn networkd_netdev(root: &Path, interface: &str) -> bool {
    ["etc/systemd/network", "run/systemd/network"].iter().any(|dir| {
        std::fs::read_dir(root.join(dir)).into_iter().flatten().flatten().take(256).any(|entry| {
            let path = entry.path();
            path.extension().is_some_and(|e| e == "netdev")
                && std::fs::read(&path).is_ok_and(|bytes| {
                    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(64 << 10)]);
                    text.lines().any(|l| l.replace(' ', "") == format!("Name={interface}"))
                })
        })
    })
}

/// Recognises the manager of `tunnel` (None: hand-made or unknown).
pub fn recognise(topology: &Topology, tunnel: &Tunnel) -> Option<Manager> {
    let rules: Vec<&Rule> = topology
        .namespaces
        .get(&tunnel.netns)
        .map(|ns| ns.rules_v4.iter().chain(&ns.rules_v6).collect())
        .unwrap_or_default();
    let rules: Vec<Rule> = rules.into_iter().cloned().collect();
    let fwmark = tunnel.device.as_ref().map(|d| d.fwmark).unwrap_or(0);
    let (ts_mark, ts_mask) = TAILSCALE_MARK;
    if daemon_name(topology, tunnel) == Some("tailscaled")
        || tunnel.interface.starts_with("tailscale")
        || (fwmark & ts_mask == ts_mark && has_mark_rule(&rules, ts_mark, ts_mask))
    {
        return Some(Manager::Tailscale);
    }
    if fwmark == MULLVAD_MARK
        || tunnel.interface.ends_with("-mullvad")
        || daemon_name(topology, tunnel) == Some("mullvad-daemon")
    {
        return Some(Manager::Mullvad);
    }
    let root = root_of(tunnel);
    let name = &tunnel.interface;
    if root.join(format!("etc/NetworkManager/system-connections/{name}.nmconnection")).exists() {
        return Some(Manager::NetworkManager);
    }
    if networkd_netdev(&root, name) {
        return Some(Manager::SystemdNetworkd);
    }
    if root.join(format!("etc/wireguard/{name}.conf")).exists() {
        return Some(Manager::WgQuick);
    }
    // wg-quick's full tunnel: `not fwmark M lookup M` with M its own mark.
    if fwmark != 0 && rules.iter().any(|r| r.invert && r.fwmark == Some(fwmark) && r.table == fwmark) {
        return Some(Manager::WgQuick);
    }
    None
}

/// Who owns a rule, when its mark or priority says so: for explanations
/// ("wg-quick's rule 5208 ...").
pub fn rule_owner(rule: &Rule, topology: &Topology, netns: u64) -> Option<Manager> {
    let (ts_mark, ts_mask) = TAILSCALE_MARK;
    if rule.fwmark == Some(ts_mark) && rule.fwmask == Some(ts_mask)
        || (5200..5300).contains(&rule.priority) && rule.table == 52
    {
        return Some(Manager::Tailscale);
    }
    let mark = rule.fwmark?;
    if rule.invert && rule.table == mark {
        return topology
            .tunnels
            .iter()
            .filter(|t| t.netns == netns && t.device.as_ref().is_some_and(|d| d.fwmark == mark))
            .find_map(|t| recognise(topology, t))
            .or(Some(Manager::WgQuick));
    }
    None
}
