//! A delay line: a TUN device whose packets come back out after a fixed
//! delay. This kernel has no netem, so the lab routes the wg0 path through
//! one of these in the router namespace to make the cost of nesting visible.
//!
//! Packets are read from the TUN device, held until their due time, and
//! written back into the same device, where they re-enter routing with the
//! TUN device as their input interface (the lab's rules send them on from
//! there). A constant delay keeps packets in order.

use std::{
    fs::{File, OpenOptions},
    io::{Read as _, Write as _},
    os::fd::AsRawFd as _,
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;
const TUNSETIFF: libc::c_ulong = 0x400454ca;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Creates TUN device `device` (no packet information header) in this
/// thread's network namespace and returns its queue.
pub fn create_tun(device: &str) -> Result<File> {
    let tun = OpenOptions::new().read(true).write(true).open("/dev/net/tun").context("opening /dev/net/tun")?;
    let mut request = IfReq { name: [0; libc::IFNAMSIZ], flags: IFF_TUN | IFF_NO_PI, _pad: [0; 22] };
    anyhow::ensure!(device.len() < libc::IFNAMSIZ, "device name too long");
    request.name[..device.len()].copy_from_slice(device.as_bytes());
    // SAFETY: TUNSETIFF with a properly sized ifreq.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &mut request) } != 0 {
        bail!("creating TUN device {device}: {}", std::io::Error::last_os_error());
    }
    Ok(tun)
}

/// Enters `netns_path`, creates TUN device `device`, and delays forever.
pub fn serve(netns_path: &str, device: &str, delay: Duration) -> Result<()> {
    let netns = File::open(netns_path).with_context(|| format!("opening {netns_path}"))?;
    // SAFETY: setns with a valid namespace fd; this process is single-threaded here.
    if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("entering {netns_path}: {}", std::io::Error::last_os_error());
    }
    let tun = create_tun(device)?;
    let mut reader = tun.try_clone()?;
    let mut writer = tun;
    let (queue, due) = mpsc::channel::<(Instant, Vec<u8>)>();
    let sender = std::thread::spawn(move || {
        for (when, packet) in due {
            let now = Instant::now();
            if when > now {
                std::thread::sleep(when - now);
            }
            // A write fails only when the device is going away.
            if writer.write_all(&packet).is_err() {
                return;
            }
        }
    });
    let mut buffer = vec![0u8; 65536];
    loop {
        let n = match reader.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        if queue.send((Instant::now() + delay, buffer[..n].to_vec())).is_err() {
            break;
        }
    }
    drop(queue);
    let _ = sender.join();
    Ok(())
}
