//! The userspace WireGuard API's `get=1` reply parser.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    // The private key must not influence what is parsed (it is never kept):
    // the same reply with every private key replaced parses identically.
    let scrubbed: String = text
        .split_inclusive('\n')
        .map(|line| if line.starts_with("private_key=") { "private_key=0\n".to_owned() } else { line.to_owned() })
        .collect();
    let original = wgtrace::topology::uapi::parse(text).map(|d| format!("{d:?}")).map_err(|_| ());
    let without_key = wgtrace::topology::uapi::parse(&scrubbed).map(|d| format!("{d:?}")).map_err(|_| ());
    assert_eq!(original, without_key, "the private key changed the parsed device");
});
