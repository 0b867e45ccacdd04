//! The WireGuard message classifier (shared with the eBPF programs).
#![no_main]

use libfuzzer_sys::fuzz_target;
use wgtrace_common::wire::{HEADER_PREFIX_LEN, classify};

fuzz_target!(|data: &[u8]| {
    if data.len() < HEADER_PREFIX_LEN + 2 {
        return;
    }
    let prefix: [u8; HEADER_PREFIX_LEN] = data[..HEADER_PREFIX_LEN].try_into().unwrap();
    let length = u16::from_le_bytes([data[HEADER_PREFIX_LEN], data[HEADER_PREFIX_LEN + 1]]) as u32;
    if let Some(message) = classify(&prefix, length) {
        assert!((1..=4).contains(&message.message_type));
        assert_eq!(prefix[1..4], [0, 0, 0], "reserved bytes are zero in anything accepted");
        assert!(length >= 32);
    }
});
