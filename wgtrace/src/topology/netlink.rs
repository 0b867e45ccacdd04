//! Minimal rtnetlink: links, policy rules, and "where would this packet go"
//! (RTM_GETROUTE). Only what wgtrace needs, parsed defensively: a truncated
//! or odd message ends parsing of that message, never the program.

use std::{
    io,
    net::IpAddr,
    ops::Deref,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use anyhow::{Context as _, Result, bail};
use zeroize::Zeroizing;

pub const NETLINK_ROUTE: i32 = 0;
pub const NETLINK_GENERIC: i32 = 16;
/// Socket listings (`ss`): where a kernel WireGuard socket lives.
pub const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// struct inet_diag_msg.
const INET_DIAG_MSG_LEN: usize = 72;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
pub(crate) const NLM_F_DUMP: u16 = 0x300;

const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
const RTM_NEWRULE: u16 = 32;
const RTM_GETRULE: u16 = 34;

const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFLA_LINK: u16 = 5;
const IFLA_MASTER: u16 = 10;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;

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

pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;

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

/// A UDP socket as sock_diag lists it: bound, not connected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BoundUdp {
    pub local: IpAddr,
    pub port: u16,
    /// Socket inode (kernel sockets have one too; no process holds it).
    pub inode: u32,
    pub uid: u32,
}

#[derive(Debug)]
pub struct Socket {
    fd: OwnedFd,
    sequence: u32,
}

/// A received netlink message payload, wiped when dropped (the `zeroize`
/// crate): generic netlink replies (WireGuard's) carry private and preshared
/// keys.
pub(crate) struct ZeroOnDrop(Zeroizing<Vec<u8>>);

impl Deref for ZeroOnDrop {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.0
    }
}

/// A netlink request and its whole answer must fit in this: the kernel
/// answers in microseconds, so only a stuck namespace gets near it.
pub const DEADLINE: std::time::Duration = std::time::Duration::from_secs(1);
/// And in this many bytes (a dump of a namespace's links or rules, or one
/// WireGuard device with thousands of peers, is far smaller).
pub const MAX_ANSWER: usize = 32 << 20;

impl Socket {
    /// Opens a NETLINK_ROUTE socket in the calling thread's namespace.
    pub fn route() -> Result<Self> {
        Self::open(NETLINK_ROUTE)
    }

    /// Opens a netlink socket of `protocol` in the calling thread's namespace.
    pub fn open(protocol: i32) -> Result<Self> {
        Ok(Self::from_fd(open_raw(protocol)?))
    }

    /// A netlink socket opened elsewhere (it stays in the namespace it was
    /// opened in), such as one the privileged helper passed over.
    pub fn from_fd(fd: OwnedFd) -> Self {
        // Every recv is bounded; `request` bounds the whole answer.
        let timeout = libc::timeval { tv_sec: DEADLINE.as_secs() as libc::time_t, tv_usec: 0 };
        // SAFETY: setsockopt with a timeval we own, of the size passed.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        Self { fd, sequence: 1 }
    }

    pub(crate) fn request(&mut self, message_type: u16, flags: u16, body: &[u8]) -> Result<Vec<(u16, ZeroOnDrop)>> {
        self.sequence += 1;
        let length = 16 + body.len();
        let mut packet = Vec::with_capacity(length);
        packet.extend_from_slice(&(length as u32).to_ne_bytes());
        packet.extend_from_slice(&message_type.to_ne_bytes());
        packet.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        packet.extend_from_slice(&self.sequence.to_ne_bytes());
        packet.extend_from_slice(&0u32.to_ne_bytes());
        packet.extend_from_slice(body);
        // SAFETY: sending a buffer we own to our own socket; the kernel is the
        // default destination of an unbound netlink socket.
        let sent = unsafe { libc::send(self.fd.as_raw_fd(), packet.as_ptr().cast(), packet.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error()).context("sending a netlink request");
        }
        let mut replies = Vec::new();
        let mut buffer = ZeroOnDrop(Zeroizing::new(vec![0u8; 1 << 16]));
        let deadline = std::time::Instant::now() + DEADLINE;
        let mut total = 0usize;
        loop {
            // SAFETY: receiving into a buffer we own, within its length.
            let received = unsafe { libc::recv(self.fd.as_raw_fd(), buffer.0.as_mut_ptr().cast(), buffer.len(), 0) };
            if received < 0 {
                let err = io::Error::last_os_error();
                if err.raw_os_error() == Some(libc::EINTR) && std::time::Instant::now() < deadline {
                    continue;
                }
                return Err(err).context("reading a netlink reply");
            }
            total += received as usize;
            if total > MAX_ANSWER || std::time::Instant::now() > deadline {
                bail!("a netlink answer larger than {} MiB or slower than {} s", MAX_ANSWER >> 20, DEADLINE.as_secs());
            }
            let mut done = flags & NLM_F_DUMP != NLM_F_DUMP;
            for (kind, sequence, payload) in split_messages(&buffer[..received as usize]) {
                if sequence != self.sequence {
                    continue;
                }
                match kind {
                    // A dump that fails part-way still ends with NLMSG_DONE,
                    // which then carries the negative errno instead of 0.
                    NLMSG_DONE | NLMSG_ERROR => {
                        let code = payload.get(0..4).map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]])).unwrap_or(0);
                        if code != 0 {
                            return Err(io::Error::from_raw_os_error(-code))
                                .context("the kernel refused a netlink request");
                        }
                        done = true;
                    }
                    _ => replies.push((kind, ZeroOnDrop(Zeroizing::new(payload.to_vec())))),
                }
            }
            if done {
                return Ok(replies);
            }
        }
    }

    pub fn links(&mut self) -> Result<Vec<Link>> {
        let body = [0u8; 16]; // struct ifinfomsg, all families
        let replies = self.request(RTM_GETLINK, NLM_F_DUMP, &body)?;
        Ok(replies.iter().filter(|(k, _)| *k == RTM_NEWLINK).filter_map(|(_, p)| parse_link(p)).collect())
    }

    pub fn rules(&mut self, family: u8) -> Result<Vec<Rule>> {
        let mut body = [0u8; 12]; // struct fib_rule_hdr
        body[0] = family;
        let replies = self.request(RTM_GETRULE, NLM_F_DUMP, &body)?;
        let mut rules: Vec<Rule> =
            replies.iter().filter(|(k, _)| *k == RTM_NEWRULE).filter_map(|(_, p)| parse_rule(p)).collect();
        rules.sort_by_key(|r| r.priority);
        Ok(rules)
    }

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

impl Socket {
    /// The unconnected UDP sockets of `family` bound to `port` in this
    /// socket's namespace (an inet_diag dump the kernel filters by port, so
    /// the answer is a handful of messages). Needs a NETLINK_SOCK_DIAG socket.
    pub fn udp_bound(&mut self, family: u8, port: u16) -> Result<Vec<BoundUdp>> {
        let replies = self.request(SOCK_DIAG_BY_FAMILY, NLM_F_DUMP, &udp_diag_request(family, port))?;
        Ok(replies
            .iter()
            .filter(|(kind, _)| *kind == SOCK_DIAG_BY_FAMILY)
            .filter_map(|(_, payload)| parse_bound_udp(payload))
            .filter(|socket| socket.port == port)
            .collect())
    }
}

/// struct inet_diag_req_v2 for UDP sockets of `family` whose source port is
/// `port`, in every state (an unconnected UDP socket is TCP_CLOSE).
fn udp_diag_request(family: u8, port: u16) -> Vec<u8> {
    let mut body = vec![0u8; 56];
    body[0] = family;
    body[1] = libc::IPPROTO_UDP as u8;
    body[4..8].copy_from_slice(&u32::MAX.to_ne_bytes()); // idiag_states
    body[8..10].copy_from_slice(&port.to_be_bytes()); // id.idiag_sport
    body
}

/// One struct inet_diag_msg: kept only when unconnected (no remote port).
pub fn parse_bound_udp(payload: &[u8]) -> Option<BoundUdp> {
    let message = payload.get(..INET_DIAG_MSG_LEN)?;
    let family = message[0];
    let port = u16::from_be_bytes([message[4], message[5]]);
    let remote_port = u16::from_be_bytes([message[6], message[7]]);
    let local = match family {
        AF_INET => IpAddr::from(<[u8; 4]>::try_from(&message[8..12]).ok()?),
        AF_INET6 => IpAddr::from(<[u8; 16]>::try_from(&message[8..24]).ok()?),
        _ => return None,
    };
    let uid = u32_of(&message[64..68])?;
    let inode = u32_of(&message[68..72])?;
    (remote_port == 0).then_some(BoundUdp { local, port, inode, uid })
}

/// rtnetlink multicast groups (RTMGRP_*) whose messages mean the topology
/// changed: links, and IPv4 and IPv6 policy rules.
pub const CHANGE_GROUPS: u32 = group_bit(RTNLGRP_LINK) | group_bit(RTNLGRP_IPV4_RULE) | group_bit(RTNLGRP_IPV6_RULE);
const RTNLGRP_LINK: u32 = 1;
const RTNLGRP_IPV4_RULE: u32 = 8;
const RTNLGRP_IPV6_RULE: u32 = 19;

/// The `nl_groups` bit of rtnetlink group `group` (numbered from 1).
const fn group_bit(group: u32) -> u32 {
    1 << (group - 1)
}

/// Subscribes the route socket `fd` (opened in some namespace) to `groups`
/// and makes it non-blocking: it then only ever becomes readable when that
/// namespace changes. Unprivileged: rtnetlink lets anyone listen.
pub fn subscribe(fd: OwnedFd, groups: u32) -> Result<OwnedFd> {
    // SAFETY: a zeroed sockaddr_nl is valid; bind and fcntl on a descriptor we own.
    unsafe {
        let mut address: libc::sockaddr_nl = std::mem::zeroed();
        address.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        address.nl_groups = groups;
        if libc::bind(
            fd.as_raw_fd(),
            (&address as *const libc::sockaddr_nl).cast(),
            size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        ) != 0
        {
            return Err(io::Error::last_os_error()).context("subscribing to rtnetlink notifications");
        }
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
    Ok(fd)
}

/// Reads and discards whatever is queued on the non-blocking socket `fd`;
/// whether anything was. (The next discovery dumps the state anyway; an
/// overflowed queue, ENOBUFS, also means something changed.)
pub fn drain(fd: &OwnedFd) -> bool {
    let mut buffer = [0u8; 8192];
    let mut any = false;
    loop {
        // SAFETY: receiving into a buffer we own, within its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len(), libc::MSG_DONTWAIT) };
        if n > 0 {
            any = true;
            continue;
        }
        if n < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOBUFS) {
            any = true;
            continue;
        }
        return any;
    }
}

/// A bare netlink socket of `protocol` in the calling thread's namespace.
pub fn open_raw(protocol: i32) -> Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context("opening a netlink socket");
    }
    // SAFETY: fd is a fresh, valid descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub(crate) fn push_attribute(buffer: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let length = 4 + value.len();
    buffer.extend_from_slice(&(length as u16).to_ne_bytes());
    buffer.extend_from_slice(&kind.to_ne_bytes());
    buffer.extend_from_slice(value);
    buffer.resize(buffer.len() + (align4(length) - length), 0);
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Splits a datagram into (type, sequence, payload) messages.
pub fn split_messages(mut data: &[u8]) -> Vec<(u16, u32, &[u8])> {
    let mut out = Vec::new();
    while data.len() >= 16 {
        let length = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
        if length < 16 || length > data.len() {
            break;
        }
        let kind = u16::from_ne_bytes([data[4], data[5]]);
        let sequence = u32::from_ne_bytes([data[8], data[9], data[10], data[11]]);
        out.push((kind, sequence, &data[16..length]));
        data = &data[align4(length).min(data.len())..];
    }
    out
}

/// Iterates (type, value) attributes; stops at the first malformed one.
pub fn attributes(mut data: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while data.len() >= 4 {
        let length = u16::from_ne_bytes([data[0], data[1]]) as usize;
        if length < 4 || length > data.len() {
            break;
        }
        // The top two bits are the nested / byte-order flags.
        let kind = u16::from_ne_bytes([data[2], data[3]]) & 0x3fff;
        out.push((kind, &data[4..length]));
        data = &data[align4(length).min(data.len())..];
    }
    out
}

fn u32_of(value: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(value.get(0..4)?.try_into().ok()?))
}

fn string_of(value: &[u8]) -> String {
    let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
    String::from_utf8_lossy(&value[..end]).into_owned()
}

fn address_of(value: &[u8]) -> Option<IpAddr> {
    match value.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(value).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(value).ok()?)),
        _ => None,
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
    use super::*;

    fn message(kind: u16, sequence: u32, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((16 + payload.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&sequence.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(payload);
        m.resize(align4(m.len()), 0);
        m
    }

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

    #[test]
    fn split_and_attributes_survive_truncation() {
        let mut data = message(RTM_NEWLINK, 7, &[0u8; 20]);
        data.extend_from_slice(&[0xff, 0xff, 0, 0]); // a bogus trailing header
        let messages = split_messages(&data);
        assert_eq!(messages.len(), 1);
        assert_eq!(messages[0].1, 7);
        assert!(attributes(&[8, 0, 1, 0, 1]).is_empty(), "attribute longer than the buffer");
        assert!(attributes(&[2, 0, 1, 0]).is_empty(), "attribute shorter than its header");
        assert!(parse_link(&[1, 2, 3]).is_none());
        assert!(parse_rule(&[0; 5]).is_none());
    }

    #[test]
    fn udp_diag_asks_by_port_and_keeps_only_unconnected_sockets() {
        let request = udp_diag_request(AF_INET6, 51820);
        assert_eq!(request.len(), 56, "struct inet_diag_req_v2");
        assert_eq!((request[0], request[1]), (AF_INET6, 17));
        assert_eq!(request[8..10], 51820u16.to_be_bytes());
        let diag = |family: u8, local: &[u8], port: u16, remote_port: u16, inode: u32| {
            let mut m = vec![0u8; INET_DIAG_MSG_LEN];
            m[0] = family;
            m[1] = 7; // TCP_CLOSE: unconnected UDP
            m[4..6].copy_from_slice(&port.to_be_bytes());
            m[6..8].copy_from_slice(&remote_port.to_be_bytes());
            m[8..8 + local.len()].copy_from_slice(local);
            m[68..72].copy_from_slice(&inode.to_ne_bytes());
            m
        };
        let bound = parse_bound_udp(&diag(AF_INET, &[0; 4], 51820, 0, 4242)).unwrap();
        assert_eq!(bound, BoundUdp { local: "0.0.0.0".parse().unwrap(), port: 51820, inode: 4242, uid: 0 });
        let v6 = parse_bound_udp(&diag(AF_INET6, &[0; 16], 51820, 0, 1)).unwrap();
        assert_eq!(v6.local, "::".parse::<IpAddr>().unwrap());
        assert_eq!(parse_bound_udp(&diag(AF_INET, &[0; 4], 51820, 53, 1)), None, "connected");
        assert_eq!(parse_bound_udp(&diag(AF_INET, &[0; 4], 51820, 0, 1)[..71]), None, "truncated");
        assert_eq!(parse_bound_udp(&diag(99, &[0; 4], 51820, 0, 1)), None, "unknown family");
    }

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
