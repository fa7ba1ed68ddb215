//! Address ranges as the configuration writes them (`10.0.0.0/8`, or one address), shared by
//! ACL rules, PROXY-protocol trust and the per-address limits so they parse the same way.

use std::net::IpAddr;

pub use ipnet::IpNet;

/// Parses a CIDR range, or a single address as its own /32 or /128.
pub fn parse_cidr(s: &str) -> Option<IpNet> {
    let s = s.trim();
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
}

/// IPv4-mapped IPv6 addresses compare as IPv4.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}
