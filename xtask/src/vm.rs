//! Runs a shell command as root in a throwaway VM: Debian's stock kernel under
//! qemu software emulation, with this host's root filesystem as the guest's
//! (read-only over 9p, a tmpfs overlay on top). The host kernel may lack
//! WireGuard or kprobes; the guest has both, and it runs the host's `wg`, `ip`,
//! wireguard-go and the binaries under `target/` without copying anything.
//!
//! The kernel and busybox packages are fetched with `apt-get download` once and
//! kept under `target/vm-cache/`; each run builds a small initramfs in a
//! per-run directory there and removes it afterwards.

use std::{
    fs::{self, File},
    io::{ErrorKind, Read, Write},
    os::unix::{ffi::OsStrExt, fs::OpenOptionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::cmd;

/// Debian packages the harness needs on the host: qemu (with SeaBIOS) to boot,
/// kmod for depmod on the host and for `modprobe` inside the guest (which runs
/// the host's binaries), xz-utils to unpack the kernel image. Busybox for the
/// initramfs is fetched with `apt-get download` instead, because installing
/// busybox-static would displace a host's dynamic busybox.
pub const VM_PACKAGES: &[&str] = &["qemu-system-x86", "kmod", "xz-utils"];

/// Modules the initramfs loads to reach the host root: virtio transport, the
/// virtio-serial ports that carry the output, 9p, and overlayfs. Their
/// dependencies come from modules.dep.
const INITRAMFS_MODULES: &[&str] = &["virtio_pci", "virtio_console", "9pnet_virtio", "9p", "overlay"];

/// What to give the guest.
#[derive(Debug, Clone)]
pub struct VmOptions {
    pub memory_mib: u32,
    pub cpus: u32,
    /// Boot, command and power-off together; qemu is killed after this.
    pub timeout: Duration,
}

impl Default for VmOptions {
    fn default() -> Self {
        Self { memory_mib: 2048, cpus: 2, timeout: Duration::from_secs(300) }
    }
}

/// What the command did inside the guest.
#[derive(Debug, Clone)]
pub struct VmOutput {
    pub exit_code: i32,
    /// stdout and stderr, interleaved as written.
    pub output: String,
}

/// Checks that the host has what `run_in_vm` needs, naming what to install.
pub fn ensure_vm_tools() -> Result<()> {
    let listed = Command::new("dpkg-query")
        .args(["-W", "-f", "${Package} ${db:Status-Abbrev}\n"])
        .args(VM_PACKAGES)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .context("running dpkg-query: the VM harness needs a Debian-based host (apt-get, dpkg)")?;
    let listed = String::from_utf8_lossy(&listed.stdout);
    let missing: Vec<&str> = VM_PACKAGES
        .iter()
        .copied()
        .filter(|p| !listed.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == [p, "ii"]))
        .collect();
    ensure!(
        missing.is_empty(),
        "the VM harness needs {}: install with `sudo apt-get install --no-install-recommends {}`",
        missing.join(", "),
        missing.join(" ")
    );
    Ok(())
}

/// Boots the VM, runs `command` with `sh -c` as root in it, and powers it off.
/// The guest's root is the host's, so paths under the workspace work as on the
/// host; writes land in a tmpfs and vanish with the VM.
pub fn run_in_vm(opts: &VmOptions, command: &str) -> Result<VmOutput> {
    ensure_vm_tools()?;
    let cache = workspace_root().join("target/vm-cache");
    fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let (kernel_deb, busybox_deb) = resolve_debs(&cache)?;
    let kernel = cached_kernel(&cache, &kernel_deb)?;
    let busybox = cached_busybox(&cache, &busybox_deb)?;
    let run_dir = RunDir::create(&cache)?;
    let initramfs = run_dir.0.join("initramfs.cpio");
    fs::write(&initramfs, build_initramfs(&kernel, &busybox, command)?)
        .with_context(|| format!("writing {}", initramfs.display()))?;
    boot(opts, &kernel, &initramfs, &run_dir.0)
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_owned()
}

/// The unpacked kernel package.
struct Kernel {
    release: String,
    vmlinux: PathBuf,
    /// `lib/modules/<release>` of the package, with modules.dep from depmod.
    modules: PathBuf,
}

fn cached_kernel(cache: &Path, deb: &str) -> Result<Kernel> {
    let dir = cached_package(cache, deb, |root| {
        let release = kernel_release(root)?;
        extract_vmlinux(&root.join(format!("boot/vmlinuz-{release}")), &root.join("vmlinux"))?;
        // The package leaves module indexes to its postinst; the guest's
        // modprobe and our initramfs both need them.
        let root_str = root.to_str().context("cache path is not UTF-8")?;
        cmd::run("depmod", &["-b", root_str, &release]).context("indexing the guest kernel's modules")?;
        Ok(())
    })?;
    let release = kernel_release(&dir)?;
    Ok(Kernel { vmlinux: dir.join("vmlinux"), modules: dir.join("lib/modules").join(&release), release })
}

fn kernel_release(root: &Path) -> Result<String> {
    let modules = root.join("lib/modules");
    let mut entries = fs::read_dir(&modules).with_context(|| format!("reading {}", modules.display()))?;
    let entry = entries.next().with_context(|| format!("{} is empty", modules.display()))??;
    entry.file_name().into_string().map_err(|n| anyhow::anyhow!("odd kernel release {n:?}"))
}

fn cached_busybox(cache: &Path, deb: &str) -> Result<PathBuf> {
    let dir = cached_package(cache, deb, |_| Ok(()))?;
    Ok(dir.join("bin/busybox"))
}

/// The .deb files apt would fetch now for the guest kernel (the one
/// linux-image-amd64 depends on) and for busybox. Asking apt takes longer than
/// the rest of a run's preparation, so the answer is kept until apt's package
/// lists change (`apt-get update`).
fn resolve_debs(cache: &Path) -> Result<(String, String)> {
    let stamp = fs::metadata("/var/lib/apt/lists")
        .and_then(|m| m.modified())
        .map(|t| t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos().to_string())
        .context("reading /var/lib/apt/lists: the VM harness needs apt")?;
    let memo = cache.join("apt-resolved");
    if let Ok(text) = fs::read_to_string(&memo)
        && let [memo_stamp, kernel, busybox] = text.lines().collect::<Vec<_>>()[..]
        && memo_stamp == stamp
    {
        return Ok((kernel.to_owned(), busybox.to_owned()));
    }
    let depends = cmd::run("apt-cache", &["depends", "linux-image-amd64"])
        .context("asking apt which kernel linux-image-amd64 pulls in (try `apt-get update`)")?;
    let kernel_package = depends
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-"))
        .with_context(|| format!("linux-image-amd64 depends on no linux-image-* package:\n{depends}"))?;
    let uris = cmd::run("apt-get", &["download", "--print-uris", kernel_package, "busybox-static"])
        .context("asking apt for the kernel and busybox-static packages (try `apt-get update`)")?;
    // Lines are `'URL' FILE SIZE HASH`.
    let deb = |package: &str| {
        uris.lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .find(|file| file.starts_with(&format!("{package}_")))
            .map(str::to_owned)
            .with_context(|| format!("apt offers no {package} to download:\n{uris}"))
    };
    let (kernel, busybox) = (deb(kernel_package)?, deb("busybox-static")?);
    fs::write(&memo, format!("{stamp}\n{kernel}\n{busybox}\n"))
        .with_context(|| format!("writing {}", memo.display()))?;
    Ok((kernel, busybox))
}

/// Downloads and unpacks `deb` into `cache/<deb without .deb>/` unless it is
/// there already; `prepare` finishes the unpacked tree. Work happens in a
/// scratch directory renamed into place at the end, so an interrupted run
/// never leaves a half-made cache entry.
fn cached_package(cache: &Path, deb: &str, prepare: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
    let package = deb.split('_').next().unwrap_or(deb);
    let dir = cache.join(deb.trim_end_matches(".deb"));
    if dir.join(".complete").exists() {
        return Ok(dir);
    }
    eprintln!("vm: fetching {deb} into {} (once)", cache.display());
    let scratch = cache.join(format!(".scratch-{}-{package}", std::process::id()));
    let _ = fs::remove_dir_all(&scratch);
    fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let result = (|| -> Result<()> {
        let download = Command::new("apt-get")
            .args(["download", "-q", package])
            .current_dir(&scratch)
            .stdin(Stdio::null())
            .output()
            .context("running apt-get download")?;
        ensure!(
            download.status.success(),
            "apt-get download {package} failed (try `apt-get update`): {}",
            String::from_utf8_lossy(&download.stderr).trim()
        );
        let root = scratch.join("root");
        let debs = fs::read_dir(&scratch)
            .with_context(|| format!("listing {}", scratch.display()))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension() == Some("deb".as_ref()));
        for deb in debs {
            cmd::run("dpkg-deb", &["-x", path_str(&deb)?, path_str(&root)?])?;
            // The unpacked tree is all we use; the .deb would only double the cache.
            fs::remove_file(&deb).with_context(|| format!("removing {}", deb.display()))?;
        }
        prepare(&root)?;
        fs::write(root.join(".complete"), "").context("marking the cache entry complete")?;
        Ok(())
    })();
    let result = result.and_then(|()| {
        // A concurrent run may have finished the same entry first; then its copy serves.
        match fs::rename(scratch.join("root"), &dir) {
            Err(_) if dir.join(".complete").exists() => Ok(()),
            other => other.with_context(|| format!("moving the unpacked {package} to {}", dir.display())),
        }
    });
    let _ = fs::remove_dir_all(&scratch);
    result.with_context(|| format!("preparing {package} for the VM"))?;
    Ok(dir)
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str().with_context(|| format!("{} is not UTF-8", path.display()))
}

/// Unpacks the ELF kernel from a bzImage, as the kernel's scripts/extract-vmlinux
/// does: qemu boots the ELF through its PVH entry point, skipping the in-guest
/// decompression that costs about two seconds under emulation.
fn extract_vmlinux(vmlinuz: &Path, vmlinux: &Path) -> Result<()> {
    const XZ_MAGIC: &[u8] = b"\xfd7zXZ\x00";
    let image = fs::read(vmlinuz).with_context(|| format!("reading {}", vmlinuz.display()))?;
    let start = image.windows(XZ_MAGIC.len()).position(|w| w == XZ_MAGIC).with_context(|| {
        format!("{} holds no xz-compressed kernel (Debian's amd64 kernels are xz)", vmlinuz.display())
    })?;
    let out = File::create(vmlinux).with_context(|| format!("creating {}", vmlinux.display()))?;
    // --single-stream: the compressed kernel is followed by other data.
    let mut xz = Command::new("xz")
        .args(["-dcq", "--single-stream"])
        .stdin(Stdio::piped())
        .stdout(out)
        .spawn()
        .context("running xz (install xz-utils)")?;
    match xz.stdin.take().expect("piped").write_all(&image[start..]) {
        // xz stops reading at the end of the stream, before the end of the image.
        Err(e) if e.kind() != ErrorKind::BrokenPipe => return Err(e).context("feeding the kernel image to xz"),
        _ => {}
    }
    ensure!(xz.wait()?.success(), "xz could not unpack the kernel in {}", vmlinuz.display());
    let mut magic = [0; 4];
    File::open(vmlinux)?.read_exact(&mut magic)?;
    ensure!(&magic == b"\x7fELF", "unpacking {} gave no ELF kernel", vmlinuz.display());
    Ok(())
}

/// panic=-1 with qemu's -no-reboot turns a guest panic into qemu exiting. The
/// rest trims boot time under emulation: speculation mitigations (barriers and
/// MSR writes on every syscall), the TSC watchdog and timer check (emulated
/// time looks unstable to them), crypto self-tests, probing unused UARTs.
const KERNEL_CMDLINE: &str = "console=ttyS0 panic=-1 rdinit=/init mitigations=off tsc=reliable no_timer_check \
                              cryptomgr.notests 8250.nr_uarts=1";

/// PID 1 of the guest, run by busybox from the initramfs. It loads the modules
/// listed in /vm.conf, stacks a tmpfs overlay on the host root from 9p, and
/// switches to it so that the command sees an ordinary root (a chroot would
/// break `nsenter --mount`, which resets the root to the namespace's).
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
export PATH=/bin
fail() { echo "vm init: $*"; poweroff -f; }
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
. /vm.conf
for m in $MODULES; do insmod "/modules/$m.ko" || fail "insmod $m failed"; done
# qemu names the virtio-serial ports a little after the driver loads.
port() { for p in /sys/class/virtio-ports/*; do [ "$(cat "$p/name" 2>/dev/null)" = "$1" ] && echo "/dev/${p##*/}"; done; }
tries=0
until out=$(port out); status=$(port status); [ -c "$out" ] && [ -c "$status" ]; do
    tries=$((tries + 1)) && [ $tries -gt 500 ] && fail "virtio-serial ports did not appear"
    usleep 10000
done
mkdir -p /lower /rw /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /lower || fail "mounting the host root over 9p failed"
mount -t tmpfs -o mode=0755 rw /rw && mkdir /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot || fail "overlay mount failed"
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
mount --move /dev /newroot/dev
# /run is fresh (the host's network namespace handles there mean nothing in the
# guest); /tmp is not, since the workspace may live under it.
mount -t tmpfs -o mode=0755 tmpfs /newroot/run
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts /newroot/dev/pts
mount -t tmpfs -o mode=1777 tmpfs /newroot/dev/shm
ln -sf /proc/self/fd /newroot/dev/fd
ln -sf /proc/self/fd/0 /newroot/dev/stdin
ln -sf /proc/self/fd/1 /newroot/dev/stdout
ln -sf /proc/self/fd/2 /newroot/dev/stderr
mount -t tracefs tracefs /newroot/sys/kernel/tracing
mount -t debugfs debugfs /newroot/sys/kernel/debug
mount -t bpf bpf /newroot/sys/fs/bpf
mount -t cgroup2 cgroup2 /newroot/sys/fs/cgroup
# The host's own /lib/modules is for the host's kernel; the guest's modules
# come from the unpacked package in the cache, reached through 9p.
mkdir -p "/newroot/lib/modules/$RELEASE"
mount --bind "/newroot$MODULES_DIR" "/newroot/lib/modules/$RELEASE" || fail "no modules at $MODULES_DIR"
ip link set lo up
hostname wgtrace-vm
# From here on only the host's binaries exist. sysrq powers off without needing
# an init system; PID 1 must outlive the command until the power goes.
exec switch_root /newroot /bin/sh -c '
    export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
    cd /
    /bin/sh -c "$3" </dev/null >"$1" 2>&1
    echo $? >"$2"
    echo o >/proc/sysrq-trigger
    while :; do sleep 1; done' vm "$out" "$status" "$(cat /command)"
"#;

/// The initramfs, built afresh each run (a few MB, milliseconds) so that it
/// always matches this code: busybox, the modules, /init, and the command.
fn build_initramfs(kernel: &Kernel, busybox: &Path, command: &str) -> Result<Vec<u8>> {
    let modules = module_load_order(&kernel.modules, INITRAMFS_MODULES)?;
    let mut cpio = Cpio::default();
    for dir in ["bin", "dev", "proc", "sys", "modules"] {
        cpio.dir(dir);
    }
    // The kernel opens /dev/console for PID 1 before anything is mounted.
    cpio.char_device("dev/console", 5, 1);
    cpio.file("bin/busybox", 0o755, &fs::read(busybox).with_context(|| format!("reading {}", busybox.display()))?);
    cpio.file("init", 0o755, INIT.as_bytes());
    let mut names = Vec::new();
    for module in &modules {
        let name = module.file_stem().and_then(|n| n.to_str()).context("odd module file name")?;
        let data = fs::read(kernel.modules.join(module)).with_context(|| format!("reading {}", module.display()))?;
        cpio.file(&format!("modules/{name}.ko"), 0o644, &data);
        names.push(name.to_owned());
    }
    let conf = format!(
        "MODULES='{}'\nRELEASE={}\nMODULES_DIR={}\n",
        names.join(" "),
        shell_quote(&kernel.release),
        shell_quote(path_str(&kernel.modules)?)
    );
    cpio.file("vm.conf", 0o644, conf.as_bytes());
    cpio.file("command", 0o644, command.as_bytes());
    Ok(cpio.finish())
}

/// `wanted` and everything they need, dependencies first, as paths relative to
/// the modules directory.
fn module_load_order(modules: &Path, wanted: &[&str]) -> Result<Vec<PathBuf>> {
    let dep_file = modules.join("modules.dep");
    let deps = fs::read_to_string(&dep_file).with_context(|| format!("reading {}", dep_file.display()))?;
    let deps: Vec<(&str, Vec<&str>)> = deps
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(module, needs)| (module, needs.split_whitespace().collect()))
        .collect();
    fn visit<'a>(module: &'a str, deps: &[(&'a str, Vec<&'a str>)], order: &mut Vec<&'a str>) -> Result<()> {
        if order.contains(&module) {
            return Ok(());
        }
        let (_, needs) =
            deps.iter().find(|(m, _)| *m == module).with_context(|| format!("{module} not in modules.dep"))?;
        for need in needs {
            visit(need, deps, order)?;
        }
        order.push(module);
        Ok(())
    }
    let mut order = Vec::new();
    for name in wanted {
        let file = format!("/{name}.ko");
        let (module, _) = deps
            .iter()
            .find(|(m, _)| m.ends_with(&file))
            .with_context(|| format!("the guest kernel has no module {name} (in {})", dep_file.display()))?;
        visit(module, &deps, &mut order)?;
    }
    Ok(order.into_iter().map(PathBuf::from).collect())
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A cpio archive in the "newc" format, the one the kernel unpacks.
#[derive(Default)]
struct Cpio {
    data: Vec<u8>,
    inode: u32,
}

impl Cpio {
    fn dir(&mut self, name: &str) {
        self.entry(name, libc::S_IFDIR | 0o755, 2, (0, 0), &[]);
    }

    fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.entry(name, libc::S_IFREG | mode, 1, (0, 0), data);
    }

    fn char_device(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, libc::S_IFCHR | 0o600, 1, (major, minor), &[]);
    }

    fn entry(&mut self, name: &str, mode: u32, nlink: u32, rdev: (u32, u32), data: &[u8]) {
        self.inode += 1;
        let fields =
            [self.inode, mode, 0, 0, nlink, 0, data.len() as u32, 0, 0, rdev.0, rdev.1, name.len() as u32 + 1, 0];
        self.data.extend_from_slice(b"070701");
        for field in fields {
            self.data.extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.data.extend_from_slice(name.as_bytes());
        self.data.push(0);
        self.pad();
        self.data.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        self.data.resize(self.data.len().next_multiple_of(4), 0);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, 1, (0, 0), &[]);
        self.data
    }
}

/// A per-run scratch directory, removed however the run ends.
struct RunDir(PathBuf);

impl RunDir {
    fn create(cache: &Path) -> Result<Self> {
        remove_abandoned(cache);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        let dir = cache.join(format!("run-{}-{nanos}", std::process::id()));
        fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }
}

/// Removes the run and scratch directories of runs whose process is gone
/// (Ctrl-C kills us before Drop can clean up).
fn remove_abandoned(cache: &Path) {
    for entry in fs::read_dir(cache).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("run-").or_else(|| n.strip_prefix(".scratch-")))
        else {
            continue;
        };
        // Both are named <prefix><pid>-...
        let pid = rest.split('-').next().filter(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()));
        if pid.is_some_and(|pid| !Path::new("/proc").join(pid).exists()) {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// qemu, killed if the run is abandoned (timeout, error, panic).
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn boot(opts: &VmOptions, kernel: &Kernel, initramfs: &Path, run_dir: &Path) -> Result<VmOutput> {
    // The exit code travels through a virtio-serial port into a FIFO: qemu's
    // "pipe" chardev writes <path>.out (and reads <path>.in, which stays
    // silent). We hold the read end, so what the guest wrote survives qemu.
    let status_path = run_dir.join("status");
    for suffix in ["in", "out"] {
        let fifo = run_dir.join(format!("status.{suffix}"));
        let c_path = std::ffi::CString::new(fifo.as_os_str().as_bytes())?;
        // SAFETY: a valid NUL-terminated path.
        ensure!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) } == 0, "mkfifo {}", fifo.display());
    }
    let mut status_fifo = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(run_dir.join("status.out"))
        .context("opening the status FIFO")?;
    let console_log = run_dir.join("console.log");

    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-accel", "tcg", "-cpu", "max", "-machine", "q35", "-nodefaults", "-no-reboot", "-display", "none"])
        .args(["-m", &opts.memory_mib.to_string(), "-smp", &opts.cpus.to_string()])
        .arg("-kernel")
        .arg(&kernel.vmlinux)
        .arg("-initrd")
        .arg(initramfs)
        .args(["-append", KERNEL_CMDLINE])
        .arg("-chardev")
        .arg(format!("file,id=console,path={}", qemu_opt(&console_log)))
        .args(["-serial", "chardev:console"])
        // multidevs=remap: / spans several host filesystems, whose inode
        // numbers would otherwise collide in the guest.
        .args(["-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap"])
        .args(["-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot"])
        .args(["-device", "virtio-serial-pci"])
        .args(["-chardev", "stdio,id=out,signal=off", "-device", "virtserialport,chardev=out,name=out"])
        .arg("-chardev")
        .arg(format!("pipe,id=status,path={}", qemu_opt(&status_path)))
        .args(["-device", "virtserialport,chardev=status,name=status"])
        // qemu's stdio chardev reports the port closed when stdin hits EOF,
        // and the guest's writes then block forever: hold stdin open, unused.
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: prctl is async-signal-safe. It takes qemu down with us if we are
    // killed before our Drop can, so no emulator is left spinning.
    unsafe {
        qemu.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let started = Instant::now();
    let mut qemu = Qemu(qemu.spawn().context("starting qemu-system-x86_64 (install qemu-system-x86)")?);
    let stdout = drain(qemu.0.stdout.take().expect("piped"));
    let stderr = drain(qemu.0.stderr.take().expect("piped"));

    let exited = loop {
        if let Some(status) = qemu.0.try_wait()? {
            break status;
        }
        if started.elapsed() > opts.timeout {
            drop(qemu);
            let output = String::from_utf8_lossy(&stdout.join().unwrap_or_default()).into_owned();
            bail!(
                "the VM did not finish within {:?}, so qemu was killed; raise VmOptions::timeout if the command \
                 needs longer.\ncommand output so far:\n{output}\n{}",
                opts.timeout,
                console_tail(&console_log)
            );
        }
        thread::sleep(Duration::from_millis(20));
    };
    let output = String::from_utf8_lossy(&stdout.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&stderr.join().unwrap_or_default()).into_owned();
    let mut status = String::new();
    if let Err(e) = status_fifo.read_to_string(&mut status)
        && e.kind() != ErrorKind::WouldBlock
    {
        return Err(e).context("reading the status FIFO");
    }
    let Ok(exit_code) = status.trim().parse() else {
        bail!(
            "the VM stopped ({exited}) without reporting the command's exit code.\nqemu: {}\ncommand output:\n{output}\n{}",
            stderr.trim(),
            console_tail(&console_log)
        );
    };
    Ok(VmOutput { exit_code, output })
}

/// A path as a qemu option value, where a comma would end the value.
fn qemu_opt(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

fn drain(mut from: impl Read + Send + 'static) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = from.read_to_end(&mut buf);
        buf
    })
}

/// The end of the guest's kernel console, for errors about a failed boot.
fn console_tail(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    format!("guest console (last lines):\n{}", lines[lines.len().saturating_sub(40)..].join("\n"))
}
