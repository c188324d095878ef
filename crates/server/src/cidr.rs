//! `--check-allowed-cidrs` (issue 14 §3): the addresses active health checks may probe. A
//! registry user who can register a check could otherwise make every member connect to any
//! host its network reaches. Default: any address, as Consul (documented).

use std::net::IpAddr;
use std::sync::OnceLock;

/// One `address/prefix` block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Cidr, String> {
        let bad = || format!("{s:?} is not a CIDR block (such as 10.0.0.0/8 or fd00::/8)");
        let (addr, prefix) = s.trim().split_once('/').ok_or_else(bad)?;
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(bad());
        }
        Ok(Cidr { addr, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4 address reached through an IPv4-mapped IPv6 one is judged as IPv4.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                masked(u32::from(net).into(), 32, self.prefix) == masked(u32::from(ip).into(), 32, self.prefix)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                masked(u128::from(net), 128, self.prefix) == masked(u128::from(ip), 128, self.prefix)
            }
            _ => false,
        }
    }
}

fn masked(bits: u128, width: u32, prefix: u8) -> u128 {
    if prefix == 0 {
        return 0;
    }
    bits >> (width - u32::from(prefix))
}

static ALLOWED: OnceLock<Vec<Cidr>> = OnceLock::new();

/// Set once at start (one member per process); empty or unset: any address.
pub fn set_allowed(blocks: Vec<Cidr>) {
    let _ = ALLOWED.set(blocks);
}

/// Whether a health check may probe `ip`; `Err` names the blocks allowed.
pub fn check(ip: IpAddr) -> Result<(), String> {
    match ALLOWED.get() {
        Some(blocks) if !blocks.is_empty() && !blocks.iter().any(|b| b.contains(ip)) => {
            let list: Vec<String> = blocks.iter().map(Cidr::to_string).collect();
            Err(format!("{ip} is outside --check-allowed-cidrs ({})", list.join(", ")))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_contain_what_their_prefix_says() {
        let c = |s: &str| s.parse::<Cidr>().unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(c("10.0.0.0/8").contains(ip("10.200.3.4")));
        assert!(!c("10.0.0.0/8").contains(ip("11.0.0.1")));
        assert!(c("127.0.0.1/32").contains(ip("127.0.0.1")));
        assert!(!c("127.0.0.1/32").contains(ip("127.0.0.2")));
        assert!(c("0.0.0.0/0").contains(ip("8.8.8.8")));
        assert!(c("fd00::/8").contains(ip("fd12::1")));
        assert!(!c("fd00::/8").contains(ip("fe80::1")));
        assert!(c("10.0.0.0/8").contains(ip("::ffff:10.1.2.3")), "IPv4-mapped");
        assert!(!c("10.0.0.0/8").contains(ip("fd00::1")));
        for bad in ["10.0.0.0", "10.0.0.0/33", "x/8", "::/129", "10.0.0.0/-1"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }
}
