//! The floor: a program that does nothing (`r0 = 0; exit`) on each of
//! wgtrace's hooks. The kernel's dispatch of a tracepoint program (and, in
//! the cost windows, bpf_stats' own clock read) is paid by any tracer on
//! those hooks, whatever it does; this condition measures it in the same
//! rounds as wgtrace, so that every line can say how much of wgtrace's cost
//! is its own work and how much is the hook's.
//!
//! Raw tracepoint programs go through the same `bpf_trace_runN` dispatch as
//! wgtrace's tp_btf ones, and need no BTF id. Loaded with the bpf(2)
//! syscall directly: nothing to build, no object file.

use anyhow::{Context as _, Result};

use super::WGTRACE_PROGRAMS;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_RAW_TRACEPOINT_OPEN: libc::c_long = 17;
const BPF_PROG_TYPE_RAW_TRACEPOINT: u32 = 17;
/// The leading part of `union bpf_attr` these commands need (the kernel
/// treats the attributes past the size it is given as zero).
const ATTR_SIZE: usize = 128;

/// `r0 = 0; exit`: BPF_ALU64 | BPF_MOV | BPF_K with r0 and imm 0, then
/// BPF_JMP | BPF_EXIT, each instruction one u64 with the opcode in its
/// lowest byte (so little-endian only).
#[cfg(target_endian = "little")]
static EMPTY_PROGRAM: [u64; 2] = [0xb7, 0x95];

fn bpf(command: libc::c_long, attr: &mut [u8; ATTR_SIZE]) -> std::io::Result<i32> {
    // SAFETY: `attr` is a zero-padded bpf_attr of ATTR_SIZE bytes for `command`.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, command, attr.as_mut_ptr(), ATTR_SIZE as u32) };
    if fd < 0 { Err(std::io::Error::last_os_error()) } else { Ok(fd as i32) }
}

/// Loads and attaches an empty program on `tracepoint`; the returned link fd
/// keeps it attached until this process exits.
fn attach_empty(tracepoint: &str) -> Result<i32> {
    let license = c"GPL";
    let mut attr = [0u8; ATTR_SIZE];
    attr[0..4].copy_from_slice(&BPF_PROG_TYPE_RAW_TRACEPOINT.to_ne_bytes());
    attr[4..8].copy_from_slice(&(EMPTY_PROGRAM.len() as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(EMPTY_PROGRAM.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    // prog_name (at 48, 16 bytes with the NUL): the tracepoint's, cut as the kernel cuts wgtrace's.
    let name = tracepoint.as_bytes();
    let length = name.len().min(15);
    attr[48..48 + length].copy_from_slice(&name[..length]);
    let program =
        bpf(BPF_PROG_LOAD, &mut attr).with_context(|| format!("loading an empty program for {tracepoint}"))?;
    let name = std::ffi::CString::new(tracepoint)?;
    let mut attr = [0u8; ATTR_SIZE];
    attr[0..8].copy_from_slice(&(name.as_ptr() as u64).to_ne_bytes());
    attr[8..12].copy_from_slice(&(program as u32).to_ne_bytes());
    bpf(BPF_RAW_TRACEPOINT_OPEN, &mut attr).with_context(|| format!("attaching an empty program to {tracepoint}"))
}

/// `cargo xtask empty-hooks TRACEPOINT...` (internal, the bench's floor
/// condition): attaches, says "Attaching" like bpftrace, and holds the
/// programs until a signal ends the process (the kernel then detaches them).
pub fn serve(tracepoints: &[String]) -> Result<()> {
    for tracepoint in tracepoints {
        attach_empty(tracepoint)?;
    }
    println!("Attaching {} empty programs: {}", tracepoints.len(), tracepoints.join(", "));
    use std::io::Write as _;
    std::io::stdout().flush()?;
    loop {
        // SAFETY: pause() has no preconditions; SIGINT/SIGTERM end the process.
        unsafe { libc::pause() };
    }
}

/// The floor condition's label for a program the kernel names `name` (cut
/// to 15 bytes): `empty` and the full hook name.
pub(super) fn label(name: &str) -> String {
    let hook = WGTRACE_PROGRAMS.iter().find(|hook| !name.is_empty() && hook.starts_with(name)).copied();
    format!("empty {}", hook.unwrap_or(name))
}

#[cfg(test)]
mod tests {
    #[test]
    fn labels_name_the_whole_hook() {
        assert_eq!(super::label("net_dev_start_x"), "empty net_dev_start_xmit");
        assert_eq!(super::label("fib6_table_look"), "empty fib6_table_lookup");
        assert_eq!(super::label("other"), "empty other");
    }
}
