//! Records from the kernel's ring buffer: any length, any kind.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = wgtrace::probes::decode(data);
});
