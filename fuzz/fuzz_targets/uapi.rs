//! The userspace WireGuard API's `get=1` reply parser.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Ok(device) = wgtrace::topology::uapi::parse(text) {
        // Keys that were never a public key must not surface.
        let shown = format!("{device:?}");
        for line in text.lines() {
            if let Some(secret) = line.strip_prefix("private_key=") {
                if secret.len() >= 16 {
                    assert!(!shown.contains(secret), "private key leaked into the parsed device");
                }
            }
        }
    }
});
