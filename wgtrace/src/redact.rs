//! `--redact`: public keys and addresses hidden in every output, for reports
//! that leave the machine. Keys become stable short digests (so peers can
//! still be told apart); addresses become `[redacted]`, ports stay.

use std::{
    hash::{DefaultHasher, Hash as _, Hasher as _},
    net::{IpAddr, SocketAddr},
    sync::atomic::{AtomicBool, Ordering},
};

static ENABLED: AtomicBool = AtomicBool::new(false);

pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

pub fn key(key: &str) -> String {
    // Speakers found from their packets have peers known by endpoint only:
    // shown as having no key, told apart by a digest (which reveals no
    // address, so it needs no redaction).
    if crate::topology::speakers::is_keyless(key) {
        let mut hasher = DefaultHasher::new();
        key.hash(&mut hasher);
        return format!("no key {:08x}", hasher.finish() as u32);
    }
    if !enabled() {
        return key.to_owned();
    }
    // DefaultHasher::new() has fixed keys: the same key gives the same digest
    // in every run, so redacted reports can still be compared.
    let mut hasher = DefaultHasher::new();
    key.hash(&mut hasher);
    format!("redacted-{:08x}", hasher.finish() as u32)
}

pub fn address(address: IpAddr) -> String {
    if enabled() { "[redacted]".to_owned() } else { address.to_string() }
}

pub fn endpoint(endpoint: SocketAddr) -> String {
    if enabled() { format!("[redacted]:{}", endpoint.port()) } else { endpoint.to_string() }
}

/// A key, or null for a peer that has none (known by its endpoint only).
pub fn serialize_key<S: serde::Serializer>(value: &str, serializer: S) -> Result<S::Ok, S::Error> {
    if crate::topology::speakers::is_keyless(value) {
        return serializer.serialize_none();
    }
    serializer.serialize_str(&key(value))
}

pub fn serialize_endpoint<S: serde::Serializer>(value: &Option<SocketAddr>, serializer: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(e) => serializer.serialize_str(&endpoint(*e)),
        None => serializer.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_only_when_enabled() {
        let e: SocketAddr = "192.0.2.200:51821".parse().unwrap();
        assert_eq!(endpoint(e), "192.0.2.200:51821");
        enable();
        assert_eq!(endpoint(e), "[redacted]:51821");
        assert_eq!(address(e.ip()), "[redacted]");
        let digest = key("uFmW/sycfx/G0lcqdu2hHVm80gvo5UOxXOS9hajnWjM=");
        assert!(digest.starts_with("redacted-") && !digest.contains("uFmW"));
        assert_eq!(digest, key("uFmW/sycfx/G0lcqdu2hHVm80gvo5UOxXOS9hajnWjM="), "stable");
        ENABLED.store(false, Ordering::Relaxed);
    }

    #[test]
    fn keyless_peers_say_so_and_stay_apart() {
        let a = crate::topology::speakers::keyless_id("192.0.2.200:41642".parse().unwrap());
        let b = crate::topology::speakers::keyless_id("192.0.2.201:41642".parse().unwrap());
        assert!(key(&a).starts_with("no key ") && !key(&a).contains("192.0.2"));
        assert_ne!(key(&a), key(&b));
        let json = serde_json::to_value(Keyed(a)).unwrap();
        assert!(json.is_null(), "{json}");
    }

    struct Keyed(String);
    impl serde::Serialize for Keyed {
        fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            serialize_key(&self.0, serializer)
        }
    }
}
