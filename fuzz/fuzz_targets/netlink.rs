//! rtnetlink and generic netlink parsers, on whatever a socket could return.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wgtrace::topology::{genl, netlink};

fuzz_target!(|data: &[u8]| {
    let messages = netlink::split_messages(data);
    for (_, _, payload) in &messages {
        let _ = netlink::parse_link(payload);
        let _ = netlink::parse_rule(payload).map(|rule| rule.describe());
        let _ = netlink::parse_route_answer(payload);
        let _ = netlink::attributes(payload);
    }
    let _ = genl::parse_device(messages.iter().map(|(_, _, payload)| *payload));
});
