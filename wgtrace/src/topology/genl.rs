//! Kernel WireGuard devices over generic netlink (`WG_CMD_GET_DEVICE`, as
//! `wg show` does), parsed defensively into the same [`Device`] as the
//! userspace UAPI. Private and preshared keys are never copied out of the
//! received messages, and those are zeroed when dropped.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use anyhow::{Context as _, Result, ensure};

use super::{
    Device, Peer,
    netlink::{AF_INET, AF_INET6, NETLINK_GENERIC, NLM_F_DUMP, Socket, attributes, push_attribute},
    uapi::base64,
};

/// struct genlmsghdr: cmd, version, reserved u16.
const GENL_HDRLEN: usize = 4;

const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_VERSION: u8 = 1;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;

// include/uapi/linux/wireguard.h
const WG_GENL_NAME: &[u8] = b"wireguard\0";
const WG_GENL_VERSION: u8 = 1;
const WG_KEY_LEN: usize = 32;
const WG_CMD_GET_DEVICE: u8 = 0;

const WGDEVICE_A_IFNAME: u16 = 2;
const WGDEVICE_A_PRIVATE_KEY: u16 = 3;
const WGDEVICE_A_LISTEN_PORT: u16 = 6;
const WGDEVICE_A_FWMARK: u16 = 7;
const WGDEVICE_A_PEERS: u16 = 8;

const WGPEER_A_PUBLIC_KEY: u16 = 1;
const WGPEER_A_PRESHARED_KEY: u16 = 2;
const WGPEER_A_ENDPOINT: u16 = 4;
const WGPEER_A_LAST_HANDSHAKE_TIME: u16 = 6;
const WGPEER_A_ALLOWEDIPS: u16 = 9;

const WGALLOWEDIP_A_FAMILY: u16 = 1;
const WGALLOWEDIP_A_IPADDR: u16 = 2;
const WGALLOWEDIP_A_CIDR_MASK: u16 = 3;

/// The `wireguard` generic netlink family, resolved once, and a socket in the
/// namespace it was opened in (device names are looked up there).
pub struct Wireguard {
    socket: Socket,
    family: u16,
}

impl Wireguard {
    /// Resolves the family from the calling thread's network namespace.
    /// `Ok(None)` when it is not registered: the module is not loaded.
    ///
    /// The kernel tries to load a missing family's module on this request,
    /// so call it only once a link of kind `wireguard` has been seen.
    pub fn open() -> Result<Option<Self>> {
        Self::with_socket(Socket::open(NETLINK_GENERIC).context("opening a generic netlink socket")?)
    }

    /// [`Wireguard::open`] over a generic netlink socket opened elsewhere
    /// (its namespace is the one asked about).
    pub fn with_socket(mut socket: Socket) -> Result<Option<Self>> {
        let mut body = vec![CTRL_CMD_GETFAMILY, CTRL_VERSION, 0, 0];
        push_attribute(&mut body, CTRL_ATTR_FAMILY_NAME, WG_GENL_NAME);
        let replies = match socket.request(GENL_ID_CTRL, 0, &body) {
            Ok(replies) => replies,
            Err(err) if err.downcast_ref::<io::Error>().and_then(io::Error::raw_os_error) == Some(libc::ENOENT) => {
                return Ok(None);
            }
            Err(err) => return Err(err.context("resolving the wireguard generic netlink family")),
        };
        let family = replies
            .iter()
            .filter(|(kind, _)| *kind == GENL_ID_CTRL)
            .find_map(|(_, payload)| parse_family_id(payload))
            .context("the generic netlink controller sent no id for the wireguard family")?;
        Ok(Some(Self { socket, family }))
    }

    /// The configuration of the kernel WireGuard interface `ifname`.
    pub fn device(&mut self, ifname: &str) -> Result<Device> {
        let replies = self
            .socket
            .request(self.family, NLM_F_DUMP, &get_device_request(ifname))
            .with_context(|| format!("asking the kernel for WireGuard device {ifname}"))?;
        let payloads = replies.iter().filter(|(kind, _)| *kind == self.family).map(|(_, payload)| &payload[..]);
        parse_device(payloads).with_context(|| format!("unreadable WireGuard configuration of {ifname}"))
    }
}

fn get_device_request(ifname: &str) -> Vec<u8> {
    let mut body = vec![WG_CMD_GET_DEVICE, WG_GENL_VERSION, 0, 0];
    push_attribute(&mut body, WGDEVICE_A_IFNAME, format!("{ifname}\0").as_bytes());
    body
}

/// The family id in a CTRL_CMD_NEWFAMILY reply.
fn parse_family_id(payload: &[u8]) -> Option<u16> {
    let (_, id) = attributes(payload.get(GENL_HDRLEN..)?).into_iter().find(|(kind, _)| *kind == CTRL_ATTR_FAMILY_ID)?;
    Some(u16::from_ne_bytes(id.try_into().ok()?))
}

/// Builds one device from the payloads of a WG_CMD_GET_DEVICE dump. Device
/// attributes may repeat; the peer list continues from message to message,
/// and a peer whose allowed IPs did not fit is continued by a peer with the
/// same public key carrying only more allowed IPs.
pub fn parse_device<'a>(payloads: impl IntoIterator<Item = &'a [u8]>) -> Result<Device> {
    let mut device = Device::default();
    for payload in payloads {
        let attrs = payload.get(GENL_HDRLEN..).context("message shorter than its generic netlink header")?;
        for (kind, value) in attributes(attrs) {
            match kind {
                WGDEVICE_A_LISTEN_PORT => {
                    device.listen_port = u16::from_ne_bytes(value.try_into().context("listen port is not a u16")?);
                }
                WGDEVICE_A_FWMARK => {
                    device.fwmark = u32::from_ne_bytes(value.try_into().context("fwmark is not a u32")?);
                }
                WGDEVICE_A_PEERS => {
                    for (_, nested) in attributes(value) {
                        let peer = parse_peer(nested).with_context(|| format!("peer {}", device.peers.len() + 1))?;
                        match device.peers.last_mut() {
                            Some(last) if last.public_key == peer.public_key => {
                                last.allowed_ips.extend(peer.allowed_ips);
                            }
                            _ => device.peers.push(peer),
                        }
                    }
                }
                WGDEVICE_A_PRIVATE_KEY => {} // never copied
                _ => {}
            }
        }
    }
    Ok(device)
}

fn parse_peer(data: &[u8]) -> Result<Peer> {
    let mut peer = Peer::default();
    for (kind, value) in attributes(data) {
        match kind {
            WGPEER_A_PUBLIC_KEY => {
                ensure!(value.len() == WG_KEY_LEN, "public key of {} bytes", value.len());
                peer.public_key = base64(value);
            }
            WGPEER_A_ENDPOINT => peer.endpoint = Some(parse_endpoint(value).context("unreadable endpoint")?),
            WGPEER_A_LAST_HANDSHAKE_TIME => {
                // struct __kernel_timespec { i64 tv_sec; i64 tv_nsec; }
                ensure!(value.len() == 16, "last handshake time of {} bytes", value.len());
                let seconds = i64::from_ne_bytes(value[..8].try_into()?);
                peer.last_handshake_sec = u64::try_from(seconds).unwrap_or(0);
            }
            WGPEER_A_ALLOWEDIPS => {
                for (_, nested) in attributes(value) {
                    peer.allowed_ips.push(parse_allowed_ip(nested)?);
                }
            }
            WGPEER_A_PRESHARED_KEY => {} // never copied
            _ => {}
        }
    }
    ensure!(!peer.public_key.is_empty(), "peer without a public key");
    Ok(peer)
}

/// A struct sockaddr_in or sockaddr_in6 (whose flow info and scope id are
/// not needed: the endpoint is matched against packet addresses).
fn parse_endpoint(value: &[u8]) -> Option<SocketAddr> {
    let family = u16::from_ne_bytes(value.get(0..2)?.try_into().ok()?);
    let port = u16::from_be_bytes(value.get(2..4)?.try_into().ok()?);
    let address = match value.len() {
        16 if family == u16::from(AF_INET) => IpAddr::from(<[u8; 4]>::try_from(&value[4..8]).ok()?),
        28 if family == u16::from(AF_INET6) => IpAddr::from(<[u8; 16]>::try_from(&value[8..24]).ok()?),
        _ => return None,
    };
    Some(SocketAddr::new(address, port))
}

fn parse_allowed_ip(data: &[u8]) -> Result<(IpAddr, u8)> {
    let (mut family, mut address, mut cidr) = (None, None, None);
    for (kind, value) in attributes(data) {
        match kind {
            WGALLOWEDIP_A_FAMILY => family = Some(u16::from_ne_bytes(value.try_into().context("family is not a u16")?)),
            WGALLOWEDIP_A_IPADDR => address = Some(value),
            WGALLOWEDIP_A_CIDR_MASK => cidr = Some(*value.first().context("empty CIDR mask")?),
            _ => {}
        }
    }
    let (family, address, cidr) = (
        family.context("allowed IP without a family")?,
        address.context("allowed IP without an address")?,
        cidr.context("allowed IP without a CIDR mask")?,
    );
    let address = if family == u16::from(AF_INET) && address.len() == 4 {
        IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(address)?))
    } else if family == u16::from(AF_INET6) && address.len() == 16 {
        IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(address)?))
    } else {
        anyhow::bail!("allowed IP of family {family} with a {}-byte address", address.len());
    };
    ensure!(cidr <= if address.is_ipv4() { 32 } else { 128 }, "allowed IP {address}/{cidr}");
    Ok((address, cidr))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::netlink::split_messages;

    const NLA_F_NESTED: u16 = 0x8000;
    const NLMSG_DONE: u16 = 3;
    const FAMILY: u16 = 0x1b;
    const PRIVATE_KEY: [u8; 32] = [0xa5; 32];
    const PRESHARED_KEY: [u8; 32] = [0x5a; 32];

    fn message(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((16 + payload.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&0x2u16.to_ne_bytes()); // NLM_F_MULTI
        m.extend_from_slice(&9u32.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(payload);
        m.resize(m.len().next_multiple_of(4), 0);
        m
    }

    fn nest(buffer: &mut Vec<u8>, kind: u16, items: &[Vec<u8>]) {
        push_attribute(buffer, kind | NLA_F_NESTED, &items.concat());
    }

    fn key(byte: u8) -> [u8; 32] {
        [byte; 32]
    }

    fn allowed_ip(family: u8, address: &[u8], cidr: u8) -> Vec<u8> {
        let mut fields = Vec::new();
        push_attribute(&mut fields, WGALLOWEDIP_A_FAMILY, &u16::from(family).to_ne_bytes());
        push_attribute(&mut fields, WGALLOWEDIP_A_IPADDR, address);
        push_attribute(&mut fields, WGALLOWEDIP_A_CIDR_MASK, &[cidr]);
        let mut item = Vec::new();
        push_attribute(&mut item, NLA_F_NESTED, &fields);
        item
    }

    /// A peer list entry: `fields` are its attributes, `ips` its allowed IPs.
    fn peer(fields: &[u8], ips: &[Vec<u8>]) -> Vec<u8> {
        let mut body = fields.to_vec();
        if !ips.is_empty() {
            nest(&mut body, WGPEER_A_ALLOWEDIPS, ips);
        }
        let mut item = Vec::new();
        push_attribute(&mut item, NLA_F_NESTED, &body);
        item
    }

    fn sockaddr_in(address: [u8; 4], port: u16) -> Vec<u8> {
        let mut s = u16::from(AF_INET).to_ne_bytes().to_vec();
        s.extend_from_slice(&port.to_be_bytes());
        s.extend_from_slice(&address);
        s.resize(16, 0);
        s
    }

    fn sockaddr_in6(address: Ipv6Addr, port: u16, scope_id: u32) -> Vec<u8> {
        let mut s = u16::from(AF_INET6).to_ne_bytes().to_vec();
        s.extend_from_slice(&port.to_be_bytes());
        s.extend_from_slice(&0u32.to_ne_bytes()); // flow info
        s.extend_from_slice(&address.octets());
        s.extend_from_slice(&scope_id.to_ne_bytes());
        s
    }

    fn timespec(seconds: i64) -> Vec<u8> {
        [seconds.to_ne_bytes(), 123_456_789i64.to_ne_bytes()].concat()
    }

    fn genl(attributes: &[u8]) -> Vec<u8> {
        [&[WG_CMD_GET_DEVICE, WG_GENL_VERSION, 0, 0][..], attributes].concat()
    }

    /// Runs a received datagram through the same filtering as `device()`.
    fn parse_datagram(datagram: &[u8]) -> Result<Device> {
        let messages = split_messages(datagram);
        parse_device(messages.iter().filter(|(kind, _, _)| *kind == FAMILY).map(|(_, _, payload)| *payload))
    }

    #[test]
    fn resolves_the_family_id() {
        let mut payload = vec![1, 2, 0, 0]; // CTRL_CMD_NEWFAMILY
        push_attribute(&mut payload, CTRL_ATTR_FAMILY_NAME, WG_GENL_NAME);
        push_attribute(&mut payload, CTRL_ATTR_FAMILY_ID, &FAMILY.to_ne_bytes());
        push_attribute(&mut payload, 3, &1u32.to_ne_bytes()); // CTRL_ATTR_VERSION
        let datagram = message(GENL_ID_CTRL, &payload);
        let messages = split_messages(&datagram);
        assert_eq!(parse_family_id(messages[0].2), Some(FAMILY));
        assert_eq!(parse_family_id(&payload[..GENL_HDRLEN + 12]), None, "cut before the id");
        assert_eq!(parse_family_id(&[1, 2]), None);
    }

    #[test]
    fn asks_for_the_device_by_nul_terminated_name() {
        let request = get_device_request("wg0");
        assert_eq!(request[..GENL_HDRLEN], [WG_CMD_GET_DEVICE, WG_GENL_VERSION, 0, 0]);
        assert_eq!(attributes(&request[GENL_HDRLEN..]), vec![(WGDEVICE_A_IFNAME, &b"wg0\0"[..])]);
    }

    #[test]
    fn merges_a_dump_split_across_messages_without_keeping_keys() {
        let endpoint6: Ipv6Addr = "2001:db8::1".parse().unwrap();

        let mut first = Vec::new();
        push_attribute(&mut first, 1, &5u32.to_ne_bytes()); // WGDEVICE_A_IFINDEX
        push_attribute(&mut first, WGDEVICE_A_IFNAME, b"wg0\0");
        push_attribute(&mut first, WGDEVICE_A_PRIVATE_KEY, &PRIVATE_KEY);
        push_attribute(&mut first, 4, &key(0x11)); // WGDEVICE_A_PUBLIC_KEY
        push_attribute(&mut first, WGDEVICE_A_LISTEN_PORT, &51820u16.to_ne_bytes());
        push_attribute(&mut first, WGDEVICE_A_FWMARK, &0xca6cu32.to_ne_bytes());
        let mut a = Vec::new();
        push_attribute(&mut a, WGPEER_A_PUBLIC_KEY, &key(0x22));
        push_attribute(&mut a, WGPEER_A_PRESHARED_KEY, &PRESHARED_KEY);
        push_attribute(&mut a, WGPEER_A_ENDPOINT, &sockaddr_in([192, 0, 2, 1], 51821));
        push_attribute(&mut a, WGPEER_A_LAST_HANDSHAKE_TIME, &timespec(1_700_000_000));
        push_attribute(&mut a, 7, &4096u64.to_ne_bytes()); // WGPEER_A_RX_BYTES
        let mut b = Vec::new();
        push_attribute(&mut b, WGPEER_A_PUBLIC_KEY, &key(0x33));
        push_attribute(&mut b, WGPEER_A_PRESHARED_KEY, &PRESHARED_KEY);
        push_attribute(&mut b, WGPEER_A_ENDPOINT, &sockaddr_in6(endpoint6, 51822, 3));
        push_attribute(&mut b, WGPEER_A_LAST_HANDSHAKE_TIME, &timespec(0));
        nest(
            &mut first,
            WGDEVICE_A_PEERS,
            &[
                peer(&a, &[allowed_ip(AF_INET, &[10, 0, 0, 0], 24)]),
                peer(&b, &[allowed_ip(AF_INET, &[10, 0, 1, 0], 24)]),
            ],
        );

        // The next message carries only the name and the peers: first the
        // rest of b's allowed IPs, then a new peer without an endpoint.
        let mut second = Vec::new();
        push_attribute(&mut second, WGDEVICE_A_IFNAME, b"wg0\0");
        let mut b_continued = Vec::new();
        push_attribute(&mut b_continued, WGPEER_A_PUBLIC_KEY, &key(0x33));
        let mut c = Vec::new();
        push_attribute(&mut c, WGPEER_A_PUBLIC_KEY, &key(0x44));
        nest(
            &mut second,
            WGDEVICE_A_PEERS,
            &[
                peer(&b_continued, &[allowed_ip(AF_INET6, &"2001:db8:1::".parse::<Ipv6Addr>().unwrap().octets(), 48)]),
                peer(&c, &[]),
            ],
        );

        let datagram =
            [message(FAMILY, &genl(&first)), message(FAMILY, &genl(&second)), message(NLMSG_DONE, &[0; 4])].concat();
        let device = parse_datagram(&datagram).unwrap();
        let expected = Device {
            listen_port: 51820,
            fwmark: 0xca6c,
            peers: vec![
                Peer {
                    public_key: base64(&key(0x22)),
                    endpoint: Some("192.0.2.1:51821".parse().unwrap()),
                    allowed_ips: vec![("10.0.0.0".parse().unwrap(), 24)],
                    last_handshake_sec: 1_700_000_000,
                },
                Peer {
                    public_key: base64(&key(0x33)),
                    endpoint: Some(SocketAddr::new(endpoint6.into(), 51822)),
                    allowed_ips: vec![("10.0.1.0".parse().unwrap(), 24), ("2001:db8:1::".parse().unwrap(), 48)],
                    last_handshake_sec: 0,
                },
                Peer { public_key: base64(&key(0x44)), ..Peer::default() },
            ],
        };
        assert_eq!(device, expected);

        let debug = format!("{device:?}");
        for secret in [PRIVATE_KEY, PRESHARED_KEY] {
            assert!(!debug.contains(&base64(&secret)), "a secret key leaked into {debug}");
            assert!(!debug.contains(&format!("{}, {}", secret[0], secret[1])), "secret key bytes leaked");
        }
    }

    #[test]
    fn device_attributes_repeated_in_later_messages_agree() {
        let mut attrs = Vec::new();
        push_attribute(&mut attrs, WGDEVICE_A_LISTEN_PORT, &51821u16.to_ne_bytes());
        let one = message(FAMILY, &genl(&attrs));
        let device = parse_datagram(&[one.clone(), one].concat()).unwrap();
        assert_eq!(device, Device { listen_port: 51821, ..Device::default() });
    }

    #[test]
    fn truncated_attributes_end_the_message_without_panicking() {
        let mut attrs = Vec::new();
        push_attribute(&mut attrs, WGDEVICE_A_LISTEN_PORT, &51820u16.to_ne_bytes());
        // A peer list whose header claims 64 bytes where only 8 follow.
        attrs.extend_from_slice(&64u16.to_ne_bytes());
        attrs.extend_from_slice(&(WGDEVICE_A_PEERS | NLA_F_NESTED).to_ne_bytes());
        attrs.extend_from_slice(&[0; 4]);
        let device = parse_datagram(&message(FAMILY, &genl(&attrs))).unwrap();
        assert_eq!(device, Device { listen_port: 51820, ..Device::default() });
        assert!(parse_device([&[0u8, 1][..]]).is_err(), "shorter than the genl header");
    }

    #[test]
    fn rejects_malformed_values() {
        let device_with = |fields: &[u8], ips: &[Vec<u8>]| {
            let mut attrs = Vec::new();
            nest(&mut attrs, WGDEVICE_A_PEERS, &[peer(fields, ips)]);
            parse_datagram(&message(FAMILY, &genl(&attrs)))
        };
        let mut good_key = Vec::new();
        push_attribute(&mut good_key, WGPEER_A_PUBLIC_KEY, &key(0x22));
        assert!(device_with(&good_key, &[allowed_ip(AF_INET, &[10, 0, 0, 0], 8)]).is_ok());

        let mut short_key = Vec::new();
        push_attribute(&mut short_key, WGPEER_A_PUBLIC_KEY, &[0x22; 31]);
        assert!(device_with(&short_key, &[]).is_err(), "31-byte public key");
        assert!(device_with(&[], &[allowed_ip(AF_INET, &[10, 0, 0, 0], 8)]).is_err(), "no public key");

        for (ip, what) in [
            (allowed_ip(AF_INET, &[10, 0, 0, 0], 33), "prefix too long"),
            (allowed_ip(AF_INET, &[0; 16], 8), "family and address disagree"),
            (allowed_ip(AF_INET6, &[0; 5], 8), "odd address length"),
        ] {
            assert!(device_with(&good_key, &[ip]).is_err(), "{what}");
        }

        let mut bad_endpoint = good_key.clone();
        push_attribute(&mut bad_endpoint, WGPEER_A_ENDPOINT, &sockaddr_in([192, 0, 2, 1], 1)[..10]);
        assert!(device_with(&bad_endpoint, &[]).is_err(), "truncated sockaddr_in");

        let mut bad_port = Vec::new();
        push_attribute(&mut bad_port, WGDEVICE_A_LISTEN_PORT, &[1]);
        assert!(parse_datagram(&message(FAMILY, &genl(&bad_port))).is_err(), "1-byte listen port");
    }
}
