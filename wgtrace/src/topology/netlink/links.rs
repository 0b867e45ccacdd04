//! Network interfaces: the RTM_GETLINK dump and its parsing.

use anyhow::Result;

use super::{
    socket::{NLM_F_DUMP, Socket},
    wire::{attributes, string_of, u32_of},
};

pub(super) const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;

const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFLA_LINK: u16 = 5;
const IFLA_MASTER: u16 = 10;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;

/// A network interface.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// rtnetlink "kind" (`wireguard`, `tun`, `veth`, ...), if any.
    pub kind: Option<String>,
    /// Device MTU (0 when the kernel did not say).
    pub mtu: u32,
    /// The device this one is stacked on (IFLA_LINK: a VLAN's or macvlan's
    /// lower device), when it is in the same namespace.
    pub parent: Option<u32>,
    /// The bond or bridge this device is enslaved to (IFLA_MASTER).
    pub master: Option<u32>,
    /// ARPHRD_* hardware type: tells a TUN (`none`) from a TAP (`ether`).
    pub hardware_type: u16,
}

impl Socket {
    pub fn links(&mut self) -> Result<Vec<Link>> {
        let body = [0u8; 16]; // struct ifinfomsg, all families
        let replies = self.request(RTM_GETLINK, NLM_F_DUMP, &body)?;
        Ok(replies.iter().filter(|(k, _)| *k == RTM_NEWLINK).filter_map(|(_, p)| parse_link(p)).collect())
    }
}

pub fn parse_link(payload: &[u8]) -> Option<Link> {
    let index = u32_of(payload.get(4..8)?)?;
    let hardware_type = u16::from_ne_bytes([*payload.get(2)?, *payload.get(3)?]);
    let mut link = Link { index, hardware_type, ..Link::default() };
    for (kind, value) in attributes(payload.get(16..)?) {
        match kind {
            IFLA_IFNAME => link.name = string_of(value),
            IFLA_MTU => link.mtu = u32_of(value).unwrap_or(0),
            // Index 0 or the device itself: not stacked.
            IFLA_LINK => link.parent = u32_of(value).filter(|p| *p != 0 && *p != index),
            IFLA_MASTER => link.master = u32_of(value).filter(|m| *m != 0),
            IFLA_LINKINFO => {
                link.kind =
                    attributes(value).into_iter().find(|(k, _)| *k == IFLA_INFO_KIND).map(|(_, v)| string_of(v));
            }
            _ => {}
        }
    }
    Some(link)
}

#[cfg(test)]
mod tests {
    use super::super::wire::push_attribute;
    use super::*;

    #[test]
    fn parses_links_with_kind() {
        let mut payload = vec![0u8; 16];
        payload[4..8].copy_from_slice(&9u32.to_ne_bytes());
        push_attribute(&mut payload, IFLA_IFNAME, b"wg1\0");
        let mut info = Vec::new();
        push_attribute(&mut info, IFLA_INFO_KIND, b"wireguard\0");
        push_attribute(&mut payload, IFLA_LINKINFO | 0x8000, &info);
        assert_eq!(
            parse_link(&payload),
            Some(Link { index: 9, name: "wg1".into(), kind: Some("wireguard".into()), ..Link::default() })
        );
    }
}
