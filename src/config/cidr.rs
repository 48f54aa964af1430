//! Address ranges in CIDR notation, for the peers a listener trusts (`proxy_protocol_from`,
//! `trusted_proxies`). An IPv4-mapped IPv6 address (`::ffff:192.0.2.1`, what a dual-stack socket
//! reports for an IPv4 peer) is the IPv4 address it maps, on either side of a match.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// `192.0.2.0/24`, `2001:db8::/32`; a bare address is a range of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// With every bit past `prefix_len` zero.
    network: IpAddr,
    prefix_len: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text}: {problem}")]
pub struct CidrError {
    text: String,
    problem: CidrProblem,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrProblem {
    #[error("not an IP address, e.g. \"10.0.0.0/8\" or \"2001:db8::/32\"")]
    Address,
    #[error("prefix length must be a number from 0 to {0}")]
    NotANumber(u8),
    #[error("prefix length must be at most {0}")]
    TooLong(u8),
    /// Refused rather than masked: `10.0.0.1/8` is more likely a typo than a wish for all of 10/8.
    #[error("bits are set past the prefix length; the range is {0}")]
    HostBits(Cidr),
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.network.is_ipv4() && masked(ip, self.prefix_len) == self.network
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(text: &str) -> Result<Cidr, CidrError> {
        let fail = |problem| CidrError {
            text: text.to_owned(),
            problem,
        };
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let address: IpAddr = address.parse().map_err(|_| fail(CidrProblem::Address))?;
        let max = if address.is_ipv4() { 32 } else { 128 };
        let prefix_len = match prefix {
            None => max,
            // Digits only: `u8::from_str` would take "+8".
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
                match p.parse::<u8>() {
                    Ok(len) if len <= max => len,
                    _ => return Err(fail(CidrProblem::TooLong(max))),
                }
            }
            Some(_) => return Err(fail(CidrProblem::NotANumber(max))),
        };
        let (address, prefix_len) = unmapped(address, prefix_len);
        let cidr = Cidr {
            network: masked(address, prefix_len),
            prefix_len,
        };
        if cidr.network != address {
            return Err(fail(CidrProblem::HostBits(cidr)));
        }
        Ok(cidr)
    }
}

/// `::ffff:a.b.c.d/n` with n ≥ 96 is the IPv4 range `a.b.c.d/(n-96)`.
fn unmapped(address: IpAddr, prefix_len: u8) -> (IpAddr, u8) {
    match address {
        IpAddr::V6(v6) if prefix_len >= 96 && v6.to_ipv4_mapped().is_some() => {
            (address.to_canonical(), prefix_len - 96)
        }
        _ => (address, prefix_len),
    }
}

fn masked(address: IpAddr, prefix_len: u8) -> IpAddr {
    match address {
        IpAddr::V4(ip) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix_len));
            IpAddr::V4((u32::from(ip) & mask.unwrap_or(0)).into())
        }
        IpAddr::V6(ip) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix_len));
            IpAddr::V6((u128::from(ip) & mask.unwrap_or(0)).into())
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

/// The ranges of one list. A linear scan: these lists name a few balancers or proxies, and
/// are consulted once per connection, not per byte.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CidrSet(Vec<Cidr>);

impl CidrSet {
    pub const fn new(ranges: Vec<Cidr>) -> CidrSet {
        CidrSet(ranges)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|range| range.contains(ip))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn ranges(&self) -> &[Cidr] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(text: &str) -> Cidr {
        text.parse().unwrap()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn membership() {
        let cases = [
            ("10.0.0.0/8", "10.255.1.2", true),
            ("10.0.0.0/8", "11.0.0.1", false),
            ("192.0.2.7", "192.0.2.7", true),
            ("192.0.2.7", "192.0.2.8", false),
            ("0.0.0.0/0", "203.0.113.9", true),
            ("0.0.0.0/0", "2001:db8::1", false),
            ("192.0.2.128/25", "192.0.2.127", false),
            ("192.0.2.128/25", "192.0.2.255", true),
            ("2001:db8::/32", "2001:db8:ffff::1", true),
            ("2001:db8::/32", "2001:db9::1", false),
            ("::/0", "::1", true),
            ("::1", "::1", true),
            // A dual-stack socket's view of an IPv4 peer matches the IPv4 range...
            ("10.0.0.0/8", "::ffff:10.1.2.3", true),
            ("10.0.0.0/8", "::ffff:11.1.2.3", false),
            // ...and a range written in mapped form is the IPv4 range.
            ("::ffff:10.0.0.0/104", "10.1.2.3", true),
            ("::ffff:10.0.0.0/104", "::ffff:10.1.2.3", true),
            ("::ffff:10.0.0.0/104", "11.0.0.1", false),
            // Not mapped: an IPv4-compatible or NAT64 address is IPv6.
            ("10.0.0.0/8", "::10.1.2.3", false),
            ("64:ff9b::/96", "64:ff9b::a01:203", true),
            ("64:ff9b::/96", "10.1.2.3", false),
            ("::ffff:0.0.0.0/96", "192.0.2.1", true),
        ];
        for (range, address, inside) in cases {
            assert_eq!(
                cidr(range).contains(ip(address)),
                inside,
                "{range} {address}"
            );
        }
    }

    #[test]
    fn parse_errors_say_what_is_wrong() {
        let cases = [
            (
                "10.0.0.0/33",
                "10.0.0.0/33: prefix length must be at most 32",
            ),
            (
                "2001:db8::/129",
                "2001:db8::/129: prefix length must be at most 128",
            ),
            (
                "10.0.0.0/300",
                "10.0.0.0/300: prefix length must be at most 32",
            ),
            (
                "10.0.0.0/",
                "10.0.0.0/: prefix length must be a number from 0 to 32",
            ),
            (
                "10.0.0.0/+8",
                "10.0.0.0/+8: prefix length must be a number from 0 to 32",
            ),
            (
                "10.0.0.0/8/8",
                "10.0.0.0/8/8: prefix length must be a number from 0 to 32",
            ),
            (
                "10.0.0/8",
                "10.0.0/8: not an IP address, e.g. \"10.0.0.0/8\" or \"2001:db8::/32\"",
            ),
            (
                "lb.internal",
                "lb.internal: not an IP address, e.g. \"10.0.0.0/8\" or \"2001:db8::/32\"",
            ),
            (
                "10.0.0.1/8",
                "10.0.0.1/8: bits are set past the prefix length; the range is 10.0.0.0/8",
            ),
            (
                "2001:db8::1/32",
                "2001:db8::1/32: bits are set past the prefix length; the range is 2001:db8::/32",
            ),
        ];
        for (text, message) in cases {
            assert_eq!(
                text.parse::<Cidr>().unwrap_err().to_string(),
                message,
                "{text}"
            );
        }
    }

    #[test]
    fn display_is_canonical() {
        assert_eq!(cidr("10.0.0.0/8").to_string(), "10.0.0.0/8");
        assert_eq!(cidr("192.0.2.7").to_string(), "192.0.2.7/32");
        assert_eq!(cidr("::ffff:10.0.0.0/104").to_string(), "10.0.0.0/8");
        assert_eq!(cidr("2001:DB8::/32").to_string(), "2001:db8::/32");
    }

    #[test]
    fn a_set_matches_any_of_its_ranges() {
        let set = CidrSet::new(vec![cidr("10.0.0.0/8"), cidr("2001:db8::/32")]);
        assert!(set.contains(ip("10.9.9.9")));
        assert!(set.contains(ip("2001:db8::9")));
        assert!(set.contains(ip("::ffff:10.0.0.1")));
        assert!(!set.contains(ip("192.0.2.1")));
        assert!(!CidrSet::default().contains(ip("10.0.0.1")));
        assert!(CidrSet::default().is_empty());
    }
}
