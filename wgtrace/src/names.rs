//! Peer names, for people and dashboards rather than keys.
//!
//! Two sources, the second winning:
//! * `# friendly_name = NAME` comments in the `[Peer]` sections of the
//!   wg-quick configs wgtrace can see (prometheus_wireguard_exporter's
//!   convention): `/etc/wireguard/IFACE.conf` on the host and, for a
//!   userspace daemon, in its own mount namespace (`/proc/PID/root/...`);
//! * `--peer-names FILE`: `PUBLIC_KEY = NAME` lines (mdlayher's
//!   wireguard_exporter `-wireguard.peer-names`, one per line).
//!
//! Configs are untrusted input (any process can hold a TUN device and plant
//! files in its own root): they are opened with `openat2(RESOLVE_IN_ROOT)`
//! inside that root, must be regular files and are read up to 1 MiB. Private
//! keys in them are never kept, and errors name a line, never its text.

use std::{
    collections::HashMap,
    ffi::CString,
    io::Read as _,
    os::{
        fd::{FromRawFd as _, OwnedFd},
        unix::fs::OpenOptionsExt as _,
    },
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use zeroize::Zeroizing;

use crate::{correlation::TunnelReport, topology::Topology};

/// Names longer than this are cut (they end up in terminals and labels).
const MAX_NAME_CHARS: usize = 64;
const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// Configs are read again at most this often.
const REREAD_AFTER: Duration = Duration::from_secs(10);

/// A name as shown: control characters replaced, length bounded. Empty
/// names are no names.
fn clean(name: &str) -> Option<String> {
    let name: String = name.trim().chars().take(MAX_NAME_CHARS).map(|c| if c.is_control() { '?' } else { c }).collect();
    (!name.is_empty()).then_some(name)
}

/// Whether `key` looks like a WireGuard public key (32 bytes of base64).
fn is_public_key(key: &str) -> bool {
    key.len() == 44
        && key.ends_with('=')
        && key.as_bytes()[..43].iter().all(|b| b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/')
}

/// Parses a `--peer-names` file: `PUBLIC_KEY = NAME` per line, `#` comments
/// and blank lines ignored. A bad line is named by its number only: the
/// file may sit next to private keys, and a pasted one must not be echoed.
pub fn parse_names_file(text: &str) -> Result<HashMap<String, String>> {
    let mut names = HashMap::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let number = number + 1;
        let Some((key, name)) = line.split_once('=').map(|(k, n)| (k.trim(), n)) else {
            bail!("line {number}: expected PUBLIC_KEY = NAME");
        };
        // Base64 keys end in '=': `KEY= = NAME` splits at the key's own '='.
        let (key, name) = match name.trim_start().strip_prefix('=') {
            Some(rest) if !is_public_key(key) => (format!("{key}="), rest),
            _ => (key.to_owned(), name),
        };
        if !is_public_key(&key) {
            bail!("line {number}: the first field is not a WireGuard public key (44 characters of base64)");
        }
        let Some(name) = clean(name) else { bail!("line {number}: no name after '='") };
        names.insert(key, name);
    }
    Ok(names)
}

pub fn load_names_file(path: &Path) -> Result<HashMap<String, String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading --peer-names {}", path.display()))?;
    parse_names_file(&text).with_context(|| format!("--peer-names {}", path.display()))
}

/// `friendly_name` comments of a wg-quick config, by the `PublicKey` of
/// their `[Peer]` section. Nothing else of the config is kept.
pub fn friendly_names(config: &str) -> HashMap<String, String> {
    let mut names = HashMap::new();
    let (mut in_peer, mut key, mut name) = (false, None::<String>, None::<String>);
    let mut flush = |key: &mut Option<String>, name: &mut Option<String>| {
        if let (Some(key), Some(name)) = (key.take(), name.take()) {
            names.insert(key, name);
        }
    };
    for line in config.lines().map(str::trim) {
        if line.starts_with('[') {
            flush(&mut key, &mut name);
            in_peer = line.eq_ignore_ascii_case("[peer]");
            continue;
        }
        if !in_peer {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            if let Some((field, value)) = comment.split_once('=')
                && field.trim().eq_ignore_ascii_case("friendly_name")
            {
                name = clean(value);
            }
        } else if let Some((field, value)) = line.split_once('=')
            && field.trim().eq_ignore_ascii_case("publickey")
        {
            let value = value.split('#').next().unwrap_or("").trim();
            key = is_public_key(value).then(|| value.to_owned());
        }
    }
    flush(&mut key, &mut name);
    names
}

/// Reads `path` (relative) inside `root` without leaving it: symlinks,
/// `..` and absolute links resolve within `root`; only regular files, at
/// most [`MAX_CONFIG_BYTES`]. The file is first opened with `O_PATH`, which
/// has no effect on what it names, and read only once it is known to be a
/// regular file: a plain open of a device node planted there (say a
/// watchdog) would act on it. The text (the whole config, private key
/// included) is wiped when dropped.
fn read_in_root(root: &Path, path: &str) -> Result<Zeroizing<String>> {
    use std::os::fd::AsRawFd as _;
    let open_dir = CString::new(root.as_os_str().as_encoded_bytes())?;
    // SAFETY: open(2) of a NUL-terminated path; the fd is owned below.
    let dir = unsafe { libc::open(open_dir.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) };
    if dir < 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("opening {}", root.display()));
    }
    // SAFETY: `dir` is a fresh fd we own.
    let dir = unsafe { OwnedFd::from_raw_fd(dir) };
    let name = CString::new(path)?;
    // SAFETY: open_how is plain integers; all-zero is a valid value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: openat2(2) with a valid dirfd, path and open_how of the right size.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            name.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: a fresh fd we own.
    let located = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: fstat(2) into a zeroed stat buffer on an fd we own.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(located.as_raw_fd(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    anyhow::ensure!(stat.st_mode & libc::S_IFMT == libc::S_IFREG, "not a regular file");
    // Reopening the very inode found above, readable now that it is known
    // to be a regular file.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(format!("/proc/self/fd/{}", located.as_raw_fd()))?;
    let mut text = Zeroizing::new(String::new());
    file.take(MAX_CONFIG_BYTES).read_to_string(&mut text)?;
    Ok(text)
}

/// (netns, interface) -> names read from that tunnel's configs.
type ConfigNames = HashMap<(u64, String), HashMap<String, String>>;

/// Reads the configs of these tunnels ((netns, interface, daemon PID)).
fn read_config_names(tunnels: Vec<(u64, String, Option<u32>)>) -> ConfigNames {
    let mut all = HashMap::new();
    for (netns, interface, daemon_pid) in tunnels {
        let relative = format!("etc/wireguard/{interface}.conf");
        let mut roots = vec![std::path::PathBuf::from("/")];
        if let Some(pid) = daemon_pid {
            roots.push(format!("/proc/{pid}/root").into());
        }
        let mut names = HashMap::new();
        for root in roots {
            match read_in_root(&root, &relative) {
                Ok(text) => names.extend(friendly_names(&text)),
                Err(err) => log::debug!("peer names: {}/{relative}: {err:#}", root.display()),
            }
        }
        all.insert((netns, interface), names);
    }
    all
}

/// Names from `--peer-names` and from the configs of the tunnels found,
/// the configs re-read now and then.
#[derive(Default)]
pub struct PeerNames {
    from_file: HashMap<String, String>,
    /// By (netns, interface): names from that tunnel's configs.
    from_configs: ConfigNames,
    read_at: Option<(Instant, u64)>,
    /// The reader in flight, if any. Configs are read on a thread of their
    /// own, one at a time: a file in a daemon's root can be on a mount that
    /// never answers (FUSE), and that must stall neither the run loop nor
    /// pile up readers.
    reading: Option<std::sync::mpsc::Receiver<ConfigNames>>,
}

impl PeerNames {
    pub fn new(from_file: HashMap<String, String>) -> Self {
        Self { from_file, ..Self::default() }
    }

    /// Takes what the last reader found, and starts a new one when the
    /// tunnels changed or a while has passed (never while one is still
    /// reading).
    fn refresh(&mut self, topology: &Topology) {
        if let Some(reading) = &self.reading {
            match reading.try_recv() {
                Ok(names) => {
                    self.from_configs = names;
                    self.reading = None;
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => return,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => self.reading = None,
            }
        }
        let fingerprint = topology.fingerprint();
        if self.read_at.is_some_and(|(at, seen)| seen == fingerprint && at.elapsed() < REREAD_AFTER) {
            return;
        }
        self.read_at = Some((Instant::now(), fingerprint));
        let tunnels = topology.tunnels.iter().map(|t| (t.netns, t.interface.clone(), t.daemon_pid)).collect();
        let (sender, receiver) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new().name("wgtrace-names".into()).spawn(move || {
            let _ = sender.send(read_config_names(tunnels));
        });
        match spawned {
            Ok(_) => {
                // A quick reader (the usual case) is taken at once, so names
                // are there from the first report.
                if let Ok(names) = receiver.recv_timeout(Duration::from_millis(200)) {
                    self.from_configs = names;
                } else {
                    self.reading = Some(receiver);
                }
            }
            Err(err) => log::debug!("peer names: starting a reader: {err}"),
        }
    }

    /// Fills in every peer's `name`.
    pub fn annotate(&mut self, tunnels: &mut [TunnelReport], topology: &Topology) {
        self.refresh(topology);
        for tunnel in tunnels {
            let configs = self.from_configs.get(&(tunnel.netns_inode, tunnel.interface.clone()));
            for peer in &mut tunnel.peers {
                peer.name = self
                    .from_file
                    .get(&peer.public_key)
                    .or_else(|| configs.and_then(|c| c.get(&peer.public_key)))
                    .cloned();
            }
        }
    }
}

/// The name to show: redacted like keys are under `--redact`.
pub fn shown(name: &str) -> String {
    crate::redact::key(name)
}

pub fn serialize_name<S: serde::Serializer>(value: &Option<String>, serializer: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(name) => serializer.serialize_str(&shown(name)),
        None => serializer.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: &str = "tCfh9vIdYi0RwYCNk5bxfy6W2mKxXIYFzD6cmXk2lH0=";
    const KEY_B: &str = "9/8Wyhud+ZzmWCFCp1qVfMEdxwLBgWR6dBKCmsfkc3A=";

    #[test]
    fn friendly_names_from_peer_sections_only() {
        let config = format!(
            "[Interface]\n# friendly_name = not a peer\nPrivateKey = c2VjcmV0\n\n\
             [Peer]\n# friendly_name = Alice's laptop\nPublicKey = {KEY_A}\nAllowedIPs = 10.0.0.2/32\n\n\
             [Peer]\nPublicKey = {KEY_B} # trailing comment\n#friendly_name=bob\n\n\
             [Peer]\nPublicKey = {KEY_A}x\n# friendly_name = invalid key\n"
        );
        let names = friendly_names(&config);
        assert_eq!(names.len(), 2, "{names:?}");
        assert_eq!(names[KEY_A], "Alice's laptop");
        assert_eq!(names[KEY_B], "bob");
        assert!(!format!("{names:?}").contains("c2VjcmV0"), "nothing but names kept");
    }

    #[test]
    fn names_files_and_their_errors() {
        let text = format!("# comment\n\n{KEY_A} = alice\n{KEY_B}=bob  \n");
        let names = parse_names_file(&text).unwrap();
        assert_eq!((names[KEY_A].as_str(), names[KEY_B].as_str()), ("alice", "bob"));
        let secret = "aGVsbG8gdGhpcyBpcyBhIHByaXZhdGUga2V5IG5vdCBzaG93bg==";
        for (text, line) in [
            (format!("{KEY_A} = a\n{secret}\n"), "line 2"),
            (format!("\n\n{secret} = x\n"), "line 3"),
            (format!("{KEY_A} =   \n"), "line 1"),
        ] {
            let err = format!("{:#}", parse_names_file(&text).unwrap_err());
            assert!(err.contains(line), "{err}");
            assert!(!err.contains(secret) && !err.contains("aGVsbG8"), "a bad line is never echoed: {err}");
        }
        let long = parse_names_file(&format!("{KEY_A} = {}\u{1b}[2J\n", "n".repeat(100))).unwrap();
        assert_eq!(long[KEY_A].chars().count(), MAX_NAME_CHARS);
        assert!(!long[KEY_A].contains('\u{1b}'));
    }

    #[test]
    fn configs_are_read_inside_their_root_only() {
        let root = std::env::temp_dir().join(format!("wgtrace-names-{}", std::process::id()));
        let etc = root.join("etc/wireguard");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(etc.join("wg0.conf"), format!("[Peer]\n# friendly_name = a\nPublicKey = {KEY_A}\n")).unwrap();
        assert!(read_in_root(&root, "etc/wireguard/wg0.conf").unwrap().contains("friendly_name"));
        // A planted absolute symlink resolves inside the root, not to the host's file.
        let outside = std::env::temp_dir().join(format!("wgtrace-names-outside-{}", std::process::id()));
        std::fs::write(&outside, "host secret").unwrap();
        std::os::unix::fs::symlink(&outside, etc.join("wg1.conf")).unwrap();
        assert!(read_in_root(&root, "etc/wireguard/wg1.conf").is_err(), "followed a link out of the root");
        std::os::unix::fs::symlink("../../../../../../../etc/hostname", etc.join("wg2.conf")).unwrap();
        assert!(read_in_root(&root, "etc/wireguard/wg2.conf").is_err(), "climbed out of the root");
        std::fs::create_dir(etc.join("wg3.conf")).unwrap();
        assert!(read_in_root(&root, "etc/wireguard/wg3.conf").is_err(), "read a directory");
        // A FIFO (like a device node) is never opened for reading: a plain
        // open of one would block here (or, for a device, act on it).
        let fifo = std::ffi::CString::new(etc.join("wg4.conf").as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo(3) of a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let error = read_in_root(&root, "etc/wireguard/wg4.conf").unwrap_err();
        assert!(format!("{error:#}").contains("not a regular file"), "{error:#}");
        let _ = std::fs::remove_dir_all(&root);
        let _ = std::fs::remove_file(&outside);
    }
}
