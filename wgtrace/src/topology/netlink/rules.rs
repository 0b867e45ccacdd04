//! Policy routing rules (`ip rule`): the RTM_GETRULE dump, its parsing,
//! and what a rule selects.

use std::net::IpAddr;

use anyhow::Result;

use super::{
    socket::{NLM_F_DUMP, Socket},
    wire::{address_of, attributes, string_of, u32_of},
};

const RTM_NEWRULE: u16 = 32;
const RTM_GETRULE: u16 = 34;

const FRA_DST: u16 = 1;
const FRA_SRC: u16 = 2;
const FRA_IIFNAME: u16 = 3;
const FRA_PRIORITY: u16 = 6;
const FRA_FWMARK: u16 = 10;
const FRA_SUPPRESS_PREFIXLEN: u16 = 14;
const FRA_TABLE: u16 = 15;
const FRA_FWMASK: u16 = 16;
const FRA_OIFNAME: u16 = 17;
const FRA_IP_PROTO: u16 = 22;
const FIB_RULE_INVERT: u32 = 0x2;
pub const FR_ACT_TO_TBL: u8 = 1;

/// A policy routing rule (`ip rule`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    pub family: u8,
    pub priority: u32,
    pub action: u8,
    pub table: u32,
    pub invert: bool,
    pub fwmark: Option<u32>,
    pub fwmask: Option<u32>,
    pub src: Option<(IpAddr, u8)>,
    pub dst: Option<(IpAddr, u8)>,
    pub iifname: Option<String>,
    pub oifname: Option<String>,
    pub ip_proto: Option<u8>,
    pub suppress_prefixlen: Option<u32>,
}

impl Socket {
    pub fn rules(&mut self, family: u8) -> Result<Vec<Rule>> {
        let mut body = [0u8; 12]; // struct fib_rule_hdr
        body[0] = family;
        let replies = self.request(RTM_GETRULE, NLM_F_DUMP, &body)?;
        let mut rules: Vec<Rule> =
            replies.iter().filter(|(k, _)| *k == RTM_NEWRULE).filter_map(|(_, p)| parse_rule(p)).collect();
        rules.sort_by_key(|r| r.priority);
        Ok(rules)
    }
}

pub fn parse_rule(payload: &[u8]) -> Option<Rule> {
    let header = payload.get(0..12)?;
    let mut rule = Rule {
        family: header[0],
        table: header[4] as u32,
        action: header[7],
        invert: u32_of(&header[8..12])? & FIB_RULE_INVERT != 0,
        ..Rule::default()
    };
    let (dst_len, src_len) = (header[1], header[2]);
    for (kind, value) in attributes(&payload[12..]) {
        match kind {
            FRA_PRIORITY => rule.priority = u32_of(value)?,
            FRA_TABLE => rule.table = u32_of(value)?,
            FRA_FWMARK => rule.fwmark = u32_of(value),
            FRA_FWMASK => rule.fwmask = u32_of(value),
            FRA_SUPPRESS_PREFIXLEN => rule.suppress_prefixlen = u32_of(value),
            FRA_DST => rule.dst = address_of(value).map(|a| (a, dst_len)),
            FRA_SRC => rule.src = address_of(value).map(|a| (a, src_len)),
            FRA_IIFNAME => rule.iifname = Some(string_of(value)),
            FRA_OIFNAME => rule.oifname = Some(string_of(value)),
            FRA_IP_PROTO => rule.ip_proto = value.first().copied(),
            _ => {}
        }
    }
    // suppress_prefixlength is reported as -1 (u32::MAX) when unset.
    if rule.suppress_prefixlen == Some(u32::MAX) {
        rule.suppress_prefixlen = None;
    }
    Some(rule)
}

impl Rule {
    /// Whether this rule's selector matches a locally sent UDP packet with
    /// `mark` from `source` to `destination`. Interface selectors match only
    /// `lo` for iif (locally generated traffic) and nothing for oif, since
    /// transport sockets are not bound to a device.
    pub fn matches(&self, mark: u32, source: Option<IpAddr>, destination: IpAddr) -> bool {
        let in_prefix = |prefix: &Option<(IpAddr, u8)>, address: Option<IpAddr>| match (prefix, address) {
            (None, _) => true,
            (Some((net, len)), Some(addr)) => crate::topology::prefix_contains(*net, *len, addr),
            (Some(_), None) => false,
        };
        let selected = self.fwmark.is_none_or(|m| mark & self.fwmask.unwrap_or(u32::MAX) == m)
            && in_prefix(&self.src, source)
            && in_prefix(&self.dst, Some(destination))
            && self.iifname.as_deref().is_none_or(|i| i == "lo")
            && self.oifname.is_none()
            && self.ip_proto.is_none_or(|p| p == libc::IPPROTO_UDP as u8);
        selected != self.invert
    }

    /// `ip rule`-style text, e.g. `32765: not from all fwmark 0xca6c lookup 51820`.
    pub fn describe(&self) -> String {
        let mut text = format!("{}: ", self.priority);
        if self.invert {
            text.push_str("not ");
        }
        match self.src {
            Some((a, l)) => text.push_str(&format!("from {}/{l}", crate::redact::address(a))),
            None => text.push_str("from all"),
        }
        if let Some((a, l)) = self.dst {
            text.push_str(&format!(" to {}/{l}", crate::redact::address(a)));
        }
        if let Some(mark) = self.fwmark {
            text.push_str(&format!(" fwmark {mark:#x}"));
            if let Some(mask) = self.fwmask.filter(|m| *m != u32::MAX) {
                text.push_str(&format!("/{mask:#x}"));
            }
        }
        if let Some(i) = &self.iifname {
            text.push_str(&format!(" iif {i}"));
        }
        if self.action == FR_ACT_TO_TBL {
            text.push_str(&format!(" lookup {}", table_name(self.table)));
        }
        if let Some(s) = self.suppress_prefixlen {
            text.push_str(&format!(" suppress_prefixlength {s}"));
        }
        text
    }
}

pub fn table_name(table: u32) -> String {
    match table {
        253 => "default".into(),
        254 => "main".into(),
        255 => "local".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::wire::{AF_INET, push_attribute};
    use super::*;

    #[test]
    fn parses_a_wg_quick_rule() {
        let mut payload = vec![AF_INET, 0, 0, 0, 0, 0, 0, FR_ACT_TO_TBL];
        payload.extend_from_slice(&FIB_RULE_INVERT.to_ne_bytes());
        push_attribute(&mut payload, FRA_PRIORITY, &32765u32.to_ne_bytes());
        push_attribute(&mut payload, FRA_TABLE, &51820u32.to_ne_bytes());
        push_attribute(&mut payload, FRA_FWMARK, &51820u32.to_ne_bytes());
        push_attribute(&mut payload, FRA_FWMASK, &u32::MAX.to_ne_bytes());
        let rule = parse_rule(&payload).unwrap();
        assert_eq!(rule.describe(), "32765: not from all fwmark 0xca6c lookup 51820");
        let dst: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(rule.matches(0, None, dst), "unmarked traffic takes the tunnel table");
        assert!(!rule.matches(51820, None, dst), "the tunnel's own mark bypasses it");
    }
}
