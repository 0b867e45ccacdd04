//! Recognising WireGuard messages in a UDP payload.
//!
//! WireGuard has no magic number: a message is recognised by its type byte,
//! three zero reserved bytes and an exact length per type. The eBPF programs
//! and userspace share this one implementation, so it stays branch-light and
//! loop-free for the verifier.

pub const MESSAGE_HANDSHAKE_INITIATION: u8 = 1;
pub const MESSAGE_HANDSHAKE_RESPONSE: u8 = 2;
pub const MESSAGE_COOKIE_REPLY: u8 = 3;
pub const MESSAGE_TRANSPORT_DATA: u8 = 4;

pub const HANDSHAKE_INITIATION_LEN: u32 = 148;
pub const HANDSHAKE_RESPONSE_LEN: u32 = 92;
pub const COOKIE_REPLY_LEN: u32 = 64;
/// Header (16 bytes) plus the authentication tag (16 bytes) of an empty
/// keepalive. Plaintext is padded to 16 bytes but never beyond the tunnel's
/// MTU (kernel and wireguard-go alike), so a full-size packet's message is
/// not a multiple of 16: bulk TCP is mostly such packets.
pub const TRANSPORT_DATA_MIN_LEN: u32 = 32;

/// How many payload bytes [`classify`] needs to read.
pub const HEADER_PREFIX_LEN: usize = 12;

/// Identity fields of a recognised message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Message {
    pub message_type: u8,
    pub sender: u32,
    pub receiver: u32,
}

/// Classifies a UDP payload of `payload_len` bytes whose first
/// [`HEADER_PREFIX_LEN`] bytes are `prefix`. Returns `None` for anything that
/// is not a well-formed WireGuard message header.
#[inline(always)]
pub fn classify(prefix: &[u8; HEADER_PREFIX_LEN], payload_len: u32) -> Option<Message> {
    if prefix[1] != 0 || prefix[2] != 0 || prefix[3] != 0 {
        return None;
    }
    let word = |at: usize| u32::from_le_bytes([prefix[at], prefix[at + 1], prefix[at + 2], prefix[at + 3]]);
    let message_type = prefix[0];
    let (sender, receiver) = match message_type {
        MESSAGE_HANDSHAKE_INITIATION if payload_len == HANDSHAKE_INITIATION_LEN => (word(4), 0),
        MESSAGE_HANDSHAKE_RESPONSE if payload_len == HANDSHAKE_RESPONSE_LEN => (word(4), word(8)),
        MESSAGE_COOKIE_REPLY if payload_len == COOKIE_REPLY_LEN => (0, word(4)),
        MESSAGE_TRANSPORT_DATA if payload_len >= TRANSPORT_DATA_MIN_LEN => (0, word(4)),
        _ => return None,
    };
    Some(Message { message_type, sender, receiver })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix(message_type: u8, a: u32, b: u32) -> [u8; HEADER_PREFIX_LEN] {
        let mut p = [0u8; HEADER_PREFIX_LEN];
        p[0] = message_type;
        p[4..8].copy_from_slice(&a.to_le_bytes());
        p[8..12].copy_from_slice(&b.to_le_bytes());
        p
    }

    #[test]
    fn each_type_needs_its_exact_length() {
        let init = prefix(1, 0xdead_beef, 7);
        assert_eq!(classify(&init, 148), Some(Message { message_type: 1, sender: 0xdead_beef, receiver: 0 }));
        assert_eq!(classify(&init, 147), None);
        assert_eq!(classify(&init, 149), None);

        let resp = prefix(2, 11, 22);
        assert_eq!(classify(&resp, 92), Some(Message { message_type: 2, sender: 11, receiver: 22 }));
        assert_eq!(classify(&resp, 148), None);

        let cookie = prefix(3, 33, 0);
        assert_eq!(classify(&cookie, 64), Some(Message { message_type: 3, sender: 0, receiver: 33 }));
        assert_eq!(classify(&cookie, 65), None);
    }

    #[test]
    fn data_is_at_least_32_bytes() {
        let data = prefix(4, 5, 0);
        assert_eq!(classify(&data, 32).map(|m| m.receiver), Some(5));
        assert_eq!(classify(&data, 1440).map(|m| m.message_type), Some(4));
        // A 1340-byte packet on a tunnel with MTU 1340 is padded to 1340,
        // not 1344: 16 + 1340 + 16.
        assert_eq!(classify(&data, 1372).map(|m| m.message_type), Some(4));
        assert_eq!(classify(&data, 31), None);
        assert_eq!(classify(&data, 16), None);
        assert_eq!(classify(&data, 0), None);
    }

    #[test]
    fn reserved_bytes_must_be_zero_and_types_known() {
        let mut p = prefix(4, 5, 0);
        p[2] = 1;
        assert_eq!(classify(&p, 64), None);
        for bogus in [0u8, 5, 0x80, 0xff] {
            assert_eq!(classify(&prefix(bogus, 1, 1), 64), None);
        }
    }
}
