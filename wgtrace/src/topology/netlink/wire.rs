//! The netlink message format: framing, attributes and field decoding,
//! shared by every request and parser here.

use std::net::IpAddr;

pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;

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

pub(super) fn u32_of(value: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(value.get(0..4)?.try_into().ok()?))
}

pub(super) fn string_of(value: &[u8]) -> String {
    let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
    String::from_utf8_lossy(&value[..end]).into_owned()
}

pub(super) fn address_of(value: &[u8]) -> Option<IpAddr> {
    match value.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(value).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(value).ok()?)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::{links::RTM_NEWLINK, parse_link, parse_rule};
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
}
