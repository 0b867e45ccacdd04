//! The kernel struct field offsets the eBPF programs need, resolved from the
//! running kernel's BTF.

use anyhow::{Context as _, Result};
use wgtrace_common::{KernelOffsets, OFFSET_UNAVAILABLE};

use super::btf::Btf;

/// Resolves every field in [`KernelOffsets`]. Errors name the missing field,
/// which is what a user needs to report a kernel wgtrace does not support.
pub fn resolve(btf: &Btf) -> Result<KernelOffsets> {
    let field = |owner: &str, path: &[&str]| {
        btf.field_offset(owner, path)
            .with_context(|| format!("this kernel's layout of struct {owner} is not one wgtrace understands"))
    };
    // A field inside an embedded struct: offset of the member plus its own.
    let via = |owner: &str, member: &str, inner_owner: &str, inner: &[&str]| -> Result<u32> {
        Ok(field(owner, &[member])? + field(inner_owner, inner)?)
    };
    Ok(KernelOffsets {
        flowi4_oif: field("flowi4", &["__fl_common", "flowic_oif"])?,
        flowi4_iif: field("flowi4", &["__fl_common", "flowic_iif"])?,
        flowi4_mark: field("flowi4", &["__fl_common", "flowic_mark"])?,
        flowi4_proto: field("flowi4", &["__fl_common", "flowic_proto"])?,
        flowi4_saddr: field("flowi4", &["saddr"])?,
        flowi4_daddr: field("flowi4", &["daddr"])?,
        flowi4_sport: field("flowi4", &["uli", "ports", "sport"])?,
        flowi4_dport: field("flowi4", &["uli", "ports", "dport"])?,
        flowi6_oif: field("flowi6", &["__fl_common", "flowic_oif"])?,
        flowi6_iif: field("flowi6", &["__fl_common", "flowic_iif"])?,
        flowi6_mark: field("flowi6", &["__fl_common", "flowic_mark"])?,
        flowi6_proto: field("flowi6", &["__fl_common", "flowic_proto"])?,
        flowi6_saddr: field("flowi6", &["saddr"])?,
        flowi6_daddr: field("flowi6", &["daddr"])?,
        flowi6_sport: field("flowi6", &["uli", "ports", "sport"])?,
        flowi6_dport: field("flowi6", &["uli", "ports", "dport"])?,
        fib_nh_common_dev: field("fib_nh_common", &["nhc_dev"])?,
        fib6_result_nh: field("fib6_result", &["nh"])?,
        fib6_nh_dev: via("fib6_nh", "nh_common", "fib_nh_common", &["nhc_dev"])?,
        fib6_table_id: field("fib6_table", &["tb6_id"])?,
        net_device_ifindex: field("net_device", &["ifindex"])?,
        net_device_name: field("net_device", &["name"])?,
        net_device_net: field("net_device", &["nd_net", "net"])?,
        net_inum: field("net", &["ns", "inum"])?,
        skb_head: field("sk_buff", &["head"])?,
        skb_data: field("sk_buff", &["data"])?,
        skb_network_header: field("sk_buff", &["network_header"])?,
        skb_protocol: field("sk_buff", &["protocol"])?,
        skb_mark: field("sk_buff", &["mark"])?,
        skb_dev: field("sk_buff", &["dev"])?,
        skb_sk: field("sk_buff", &["sk"])?,
        skb_len: field("sk_buff", &["len"])?,
        skb_end: field("sk_buff", &["end"])?,
        shinfo_gso_size: gso_size_then_segs(btf)?,
        net_device_type: field("net_device", &["type"])?,
        sock_type: optional(btf, "sock", &["sk_type"]),
        sock_protocol: optional(btf, "sock", &["sk_protocol"]),
        sock_family: optional(btf, "sock", &["__sk_common", "skc_family"]),
        task_nsproxy: field("task_struct", &["nsproxy"])?,
        nsproxy_net: field("nsproxy", &["net_ns"])?,
    })
}

/// `skb_shared_info.gso_size`, checked to be followed by `gso_segs`: the
/// programs read both in one go (they have been neighbours since 2.6).
fn gso_size_then_segs(btf: &Btf) -> Result<u32> {
    let size = btf.field_offset("skb_shared_info", &["gso_size"])?;
    let segs = btf.field_offset("skb_shared_info", &["gso_segs"])?;
    anyhow::ensure!(segs == size + 2, "this kernel's skb_shared_info has gso_segs at {segs}, not after gso_size");
    Ok(size)
}

/// A field wgtrace can do without: [`OFFSET_UNAVAILABLE`] when missing, so
/// the check that needs it is skipped rather than the whole tool failing.
fn optional(btf: &Btf, owner: &str, path: &[&str]) -> u32 {
    btf.field_offset(owner, path).unwrap_or_else(|err| {
        log::info!("not checking which socket sent transport packets: {err}");
        OFFSET_UNAVAILABLE
    })
}
