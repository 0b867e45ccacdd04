//! IP prefixes (`ADDR/LEN`), as allowed IPs and policy rules use them.

use std::net::IpAddr;

use anyhow::Result;

/// Parses `ADDR/LEN` (or a bare address, as a host prefix).
pub fn parse_prefix(text: &str) -> Result<(IpAddr, u8)> {
    let (address, length) = match text.split_once('/') {
        Some((a, l)) => (a.parse::<IpAddr>()?, Some(l.parse::<u8>()?)),
        None => (text.parse::<IpAddr>()?, None),
    };
    let max = if address.is_ipv4() { 32 } else { 128 };
    let length = length.unwrap_or(max);
    anyhow::ensure!(length <= max, "prefix length {length} is too long for {address}");
    Ok((address, length))
}

pub fn prefix_contains(network: IpAddr, length: u8, address: IpAddr) -> bool {
    match (network, address) {
        (IpAddr::V4(n), IpAddr::V4(a)) => {
            let mask = if length == 0 { 0 } else { u32::MAX << (32 - length.min(32)) };
            u32::from(n) & mask == u32::from(a) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(a)) => {
            let mask = if length == 0 { 0 } else { u128::MAX << (128 - length.min(128)) };
            u128::from(n) & mask == u128::from(a) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        assert_eq!(parse_prefix("203.0.113.0/24").unwrap(), ("203.0.113.0".parse().unwrap(), 24));
        assert_eq!(parse_prefix("2001:db8::1").unwrap().1, 128);
        assert!(parse_prefix("10.0.0.0/33").is_err());
        let net: IpAddr = "203.0.113.0".parse().unwrap();
        assert!(prefix_contains(net, 24, "203.0.113.9".parse().unwrap()));
        assert!(!prefix_contains(net, 24, "203.0.114.9".parse().unwrap()));
        assert!(prefix_contains("0.0.0.0".parse().unwrap(), 0, "198.51.100.1".parse().unwrap()));
        assert!(!prefix_contains(net, 0, "2001:db8::1".parse().unwrap()), "families never match");
    }
}
