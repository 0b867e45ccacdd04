//! Routes: a table's routes (an RTM_GETROUTE dump) and the kernel's answer
//! to "where would this packet go".

use std::net::IpAddr;

use anyhow::{Context as _, Result, bail};

use super::{
    socket::{NLM_F_DUMP, Socket},
    wire::{AF_INET, AF_INET6, address_of, attributes, push_attribute, u32_of},
};

const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;

const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_PREFSRC: u16 = 7;
const RTA_TABLE: u16 = 15;
const RTA_MARK: u16 = 16;
const RTA_IP_PROTO: u16 = 27;
const RTA_SPORT: u16 = 28;
const RTA_DPORT: u16 = 29;
const RTM_F_LOOKUP_TABLE: u32 = 0x1000;
const RTM_F_FIB_MATCH: u32 = 0x2000;

/// One route of a routing table, as a dump lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableRoute {
    pub destination: Option<IpAddr>,
    pub prefix_len: u8,
    pub table: u32,
    pub oif: Option<u32>,
    pub gateway: Option<IpAddr>,
    /// RTN_UNICAST (1), RTN_UNREACHABLE (7), RTN_BLACKHOLE (6), ...
    pub route_type: u8,
}

/// The kernel's answer to "where would this packet go".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteAnswer {
    pub oif: Option<u32>,
    /// Prefix length of the route that matched (asked with RTM_F_FIB_MATCH).
    pub prefix_len: u8,
    pub table: Option<u32>,
    pub gateway: Option<IpAddr>,
    pub prefsrc: Option<IpAddr>,
}

/// A UDP flow to ask the kernel about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UdpQuery {
    pub destination: IpAddr,
    pub source_port: u16,
    pub destination_port: u16,
    pub mark: u32,
}

impl Socket {
    /// Every route of one family in `table` (an RTM_GETROUTE dump, filtered
    /// here): what a rule that looks that table up would find.
    pub fn table_routes(&mut self, family: u8, table: u32) -> Result<Vec<TableRoute>> {
        let mut body = vec![0u8; 12]; // struct rtmsg
        body[0] = family;
        let replies = self.request(RTM_GETROUTE, NLM_F_DUMP, &body)?;
        Ok(replies
            .iter()
            .filter(|(k, _)| *k == RTM_NEWROUTE)
            .filter_map(|(_, p)| parse_table_route(p))
            .filter(|r| r.table == table)
            .collect())
    }

    /// Asks the kernel where a UDP packet with this mark and these ports
    /// would be routed, as `ip route get ... mark M ipproto udp sport S dport D`,
    /// and which route (by prefix length) matched.
    pub fn route_get(&mut self, query: &UdpQuery) -> Result<RouteAnswer> {
        let mut answer = self.route_get_with(query, RTM_F_LOOKUP_TABLE)?;
        if let Ok(matched) = self.route_get_with(query, RTM_F_LOOKUP_TABLE | RTM_F_FIB_MATCH) {
            answer.prefix_len = matched.prefix_len;
        }
        Ok(answer)
    }

    fn route_get_with(&mut self, query: &UdpQuery, flags: u32) -> Result<RouteAnswer> {
        let (family, address) = match query.destination {
            IpAddr::V4(a) => (AF_INET, a.octets().to_vec()),
            IpAddr::V6(a) => (AF_INET6, a.octets().to_vec()),
        };
        let mut body = vec![0u8; 12]; // struct rtmsg
        body[0] = family;
        body[1] = (address.len() * 8) as u8;
        body[8..12].copy_from_slice(&flags.to_ne_bytes());
        push_attribute(&mut body, RTA_DST, &address);
        push_attribute(&mut body, RTA_MARK, &query.mark.to_ne_bytes());
        push_attribute(&mut body, RTA_IP_PROTO, &[libc::IPPROTO_UDP as u8]);
        push_attribute(&mut body, RTA_SPORT, &query.source_port.to_be_bytes());
        push_attribute(&mut body, RTA_DPORT, &query.destination_port.to_be_bytes());
        let replies = self.request(RTM_GETROUTE, 0, &body)?;
        let Some((_, payload)) = replies.iter().find(|(k, _)| *k == RTM_NEWROUTE) else {
            bail!("the kernel sent no route for {}", query.destination);
        };
        parse_route_answer(payload).context("unreadable route reply")
    }
}

pub fn parse_table_route(payload: &[u8]) -> Option<TableRoute> {
    let header = payload.get(0..12)?;
    let mut route = TableRoute {
        destination: None,
        prefix_len: header[1],
        table: header[4] as u32,
        oif: None,
        gateway: None,
        route_type: header[7],
    };
    for (kind, value) in attributes(&payload[12..]) {
        match kind {
            RTA_DST => route.destination = address_of(value),
            RTA_OIF => route.oif = u32_of(value),
            RTA_GATEWAY => route.gateway = address_of(value),
            RTA_TABLE => route.table = u32_of(value)?,
            _ => {}
        }
    }
    Some(route)
}

pub fn parse_route_answer(payload: &[u8]) -> Option<RouteAnswer> {
    let header = payload.get(0..12)?;
    let mut answer =
        RouteAnswer { oif: None, prefix_len: header[1], table: Some(header[4] as u32), gateway: None, prefsrc: None };
    for (kind, value) in attributes(&payload[12..]) {
        match kind {
            RTA_OIF => answer.oif = u32_of(value),
            RTA_TABLE => answer.table = u32_of(value),
            RTA_GATEWAY => answer.gateway = address_of(value),
            RTA_PREFSRC => answer.prefsrc = address_of(value),
            _ => {}
        }
    }
    Some(answer)
}
