//! The kernel BTF reader: a corrupt /sys/kernel/btf/vmlinux must give an
//! error, never a panic or a hang.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wgtrace::probes::btf::Btf;

fuzz_target!(|data: &[u8]| {
    if let Ok(btf) = Btf::parse(data) {
        let _ = btf.field_offset("sk_buff", &["mark"]);
        let _ = btf.field_offset("flowi4", &["__fl_common", "flowic_mark"]);
        let _ = btf.has_tracepoint("net_dev_start_xmit");
    }
});
