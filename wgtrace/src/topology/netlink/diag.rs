//! Socket listings (sock_diag, what `ss` reads): the UDP sockets bound to a
//! port, to find where a kernel WireGuard socket lives.

use std::net::IpAddr;

use anyhow::Result;

use super::{
    socket::{NLM_F_DUMP, Socket},
    wire::{AF_INET, AF_INET6, u32_of},
};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// struct inet_diag_msg.
const INET_DIAG_MSG_LEN: usize = 72;

/// A UDP socket as sock_diag lists it: bound, not connected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BoundUdp {
    pub local: IpAddr,
    pub port: u16,
    /// Socket inode (kernel sockets have one too; no process holds it).
    pub inode: u32,
    pub uid: u32,
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
