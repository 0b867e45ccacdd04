//! Network namespaces: finding them all, naming them, and running code
//! inside one.
//!
//! A namespace is identified by its inode number, the same number the eBPF
//! programs read from `net->ns.inum`. Names come from `/run/netns` (where
//! `ip netns` keeps them); namespaces without a name are still found through
//! the processes living in them.

use std::{
    collections::BTreeMap,
    fs,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Netns {
    pub inode: u64,
    /// The `ip netns` name, if it has one.
    pub name: Option<String>,
    /// A path that opens this namespace (`/run/netns/NAME` or `/proc/PID/ns/net`).
    pub handle: PathBuf,
}

impl Netns {
    /// Name for humans: the `ip netns` name, `host` for the root namespace of
    /// this process, else `netns:INODE`.
    pub fn label(&self, own_inode: u64) -> String {
        match &self.name {
            Some(name) => name.clone(),
            None if self.inode == own_inode => "host".to_owned(),
            None => format!("netns:{}", self.inode),
        }
    }
}

pub fn inode_of(path: &Path) -> Result<u64> {
    Ok(fs::metadata(path).with_context(|| format!("stat {}", path.display()))?.ino())
}

pub fn own_inode() -> Result<u64> {
    inode_of(Path::new("/proc/self/ns/net"))
}

/// Every network namespace that has a name or a process, by inode.
pub fn discover() -> BTreeMap<u64, Netns> {
    let mut found = BTreeMap::new();
    if let Ok(entries) = fs::read_dir("/run/netns") {
        for entry in entries.flatten() {
            let path = entry.path();
            if let Ok(inode) = inode_of(&path) {
                let name = entry.file_name().to_string_lossy().into_owned();
                found.insert(inode, Netns { inode, name: Some(name), handle: path });
            }
        }
    }
    for pid in pids() {
        let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
        if let Ok(inode) = inode_of(&path) {
            found.entry(inode).or_insert(Netns { inode, name: None, handle: path });
        }
    }
    found
}

/// Numeric entries of /proc.
pub fn pids() -> Vec<u32> {
    fs::read_dir("/proc")
        .map(|entries| entries.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default()
}

/// Runs `work` on a thread that has entered the namespace at `handle`.
/// Sockets it opens stay bound to that namespace. Only that thread switches,
/// so the rest of wgtrace is unaffected.
pub fn run_in<T: Send + 'static>(handle: &Path, work: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    // Our own namespace needs no setns, and so no CAP_SYS_ADMIN: this keeps
    // `wgtrace check` usable unprivileged.
    if inode_of(handle).ok() == own_inode().ok() {
        return work();
    }
    let file = fs::File::open(handle).with_context(|| format!("opening network namespace {}", handle.display()))?;
    let handle = handle.to_owned();
    std::thread::spawn(move || {
        // SAFETY: setns on a valid namespace fd affects only this thread.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            let err = std::io::Error::last_os_error();
            bail!("entering network namespace {}: {err} (needs CAP_SYS_ADMIN)", handle.display());
        }
        work()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("namespace worker panicked"))?
}
