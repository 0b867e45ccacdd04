//! Builds the eBPF programs (wgtrace-ebpf) for bpfel-unknown-none on the
//! nightly toolchain with bpf-linker, and leaves the object in OUT_DIR, where
//! `include_bytes_aligned!` picks it up.
//!
//! With AYA_BUILD_SKIP=1 (fuzzing, docs) an empty object stands in, and
//! `Tracer::start` refuses to run with it.
fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = std::path::Path::new(&manifest_dir).join("../wgtrace-ebpf");
    let ebpf_dir = ebpf_dir.to_str().ok_or_else(|| anyhow::anyhow!("non-UTF-8 path"))?;
    let object = std::path::Path::new(&std::env::var("OUT_DIR")?).join("wgtrace");
    if std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) && !object.exists() {
        std::fs::write(&object, [])?;
    }
    aya_build::build_ebpf(
        [aya_build::Package { name: "wgtrace-ebpf", root_dir: ebpf_dir, ..Default::default() }],
        aya_build::Toolchain::default(),
    )
}
