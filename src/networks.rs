//! Lists of IP networks an operator configures (`PUSH_ALLOWED_NETWORKS`, `TRUSTED_PROXIES`).

use std::{net::IpAddr, str::FromStr};

use ipnet::IpNet;

/// Comma-separated CIDRs (a bare address is a /32 or /128); empty is none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Networks(pub Vec<IpNet>);

impl Networks {
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|net| net.contains(&ip))
    }
}

impl FromStr for Networks {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut nets = Vec::new();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let net = item
                .parse::<IpNet>()
                .or_else(|_| item.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    format!("invalid network {item:?}: expected a CIDR such as 127.0.0.0/8")
                })?;
            nets.push(net);
        }
        Ok(Networks(nets))
    }
}

/// The address a client is counted under (connections, slots, registrations, stored bytes):
/// an IPv4 address (also written IPv4-mapped, or carried by a translator or tunnel:
/// [`untranslated`]), or an IPv6 address's /48, the most a provider (or a free tunnel broker)
/// hands one site. Counting by /64 gave a customer with a /56 256 places where an IPv4 client
/// has one; by /56, a /48's 256 subnets each had a client's share: four of them held every
/// slot of a kind at SLOT_SHARE_PER_CLIENT=25 (a review), and eleven used up a replica's
/// REGISTRATIONS_PER_MINUTE (a resource probe). A /48's customers share one client's.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match untranslated(ip) {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 80) - 1)).into()),
        },
    }
}

/// The IPv4 client an IPv6 address stands for, else the address itself:
/// - the one a NAT64/SIIT translator put into it (the well-known prefix `64:ff9b::/96` and
///   the local-use `64:ff9b:1::/96`): behind such a translator every IPv4 client arrives as
///   one of those, and is that IPv4 client (not one /56 for all of them, nor, under the
///   local-use prefix that push URLs refuse, the operator's own);
/// - a Teredo client's (`2001::/32`, RFC 4380: its last 32 bits are its NAT's public IPv4
///   address, inverted). Teredo addresses were counted as internal (push URLs may not name
///   them), so not at all: a client could tunnel through Teredo and hold every upload slot
///   and every byte of `MAX_STORED_BYTES`, under as many addresses as it had ports;
/// - a 6to4 site's (`2002:a.b.c.d::/48`, RFC 3056): counted by /56, one IPv4 address had 256
///   clients' shares.
pub fn untranslated(ip: IpAddr) -> IpAddr {
    let IpAddr::V6(v6) = ip else {
        return ip;
    };
    let (seg, bits) = (v6.segments(), u128::from(v6));
    let v4 = |bits: u128| IpAddr::V4((bits as u32).into());
    match seg {
        [0x64, 0xff9b, 0 | 1, 0, 0, 0, ..] => v4(bits),
        [0x2001, 0, ..] => v4(!bits),
        [0x2002, ..] => v4(bits >> 80),
        _ => ip,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn translated_clients_are_their_ipv4_address() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(client_key(ip("64:ff9b::808:808")), ip("8.8.8.8"));
        assert_eq!(client_key(ip("64:ff9b:1::808:404")), ip("8.8.4.4"));
        assert_eq!(
            untranslated(ip("64:ff9b:2::808:808")),
            ip("64:ff9b:2::808:808")
        );
        assert_eq!(client_key(ip("2606:4700:0:1::7")), ip("2606:4700::"));
        assert_eq!(client_key(ip("2606:4700:0:ff00::7")), ip("2606:4700::"));
        assert_ne!(client_key(ip("2606:4700:1::7")), ip("2606:4700::"));
        // Teredo: server 65.54.227.120, client 8.8.4.77 (f7f7:fbb2 inverted), whatever port.
        assert_eq!(
            client_key(ip("2001:0:4136:e378:8000:63bf:f7f7:fbb2")),
            ip("8.8.4.77")
        );
        assert_eq!(
            client_key(ip("2001:0:4136:e378:8000:1234:f7f7:fbb2")),
            ip("8.8.4.77")
        );
        // 6to4: 8.8.4.77 is 0808:044d, whatever the site's subnet.
        assert_eq!(client_key(ip("2002:808:44d:ff00::1")), ip("8.8.4.77"));
        assert_eq!(client_key(ip("2002:808:44d:1::1")), ip("8.8.4.77"));
    }

    #[test]
    fn parses_cidrs_and_bare_addresses() {
        assert_eq!("".parse::<Networks>().unwrap(), Networks::default());
        let nets: Networks = "10.0.0.1, fd00::/8".parse().unwrap();
        assert_eq!(nets.0.len(), 2);
        assert!(nets.contains("10.0.0.1".parse().unwrap()));
        assert!(!nets.contains("10.0.0.2".parse().unwrap()));
        assert!(nets.contains("fd00::5".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Networks>().is_err());
        assert!("nope".parse::<Networks>().is_err());
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv6_clients_are_counted_by_their_48() {
        assert_eq!(client_key(ip("2001:db8:0:ff::1")), ip("2001:db8::"));
        assert_eq!(client_key(ip("2001:db8:0:100::1")), ip("2001:db8::"));
        assert_eq!(client_key(ip("2001:db8:0:ffff::1")), ip("2001:db8::"));
        assert_eq!(client_key(ip("2001:db8:1::1")), ip("2001:db8:1::"));
        assert_eq!(client_key(ip("::ffff:203.0.113.9")), ip("203.0.113.9"));
        assert_eq!(client_key(ip("203.0.113.9")), ip("203.0.113.9"));
        assert_eq!(client_key(ip("64:ff9b::808:808")), ip("8.8.8.8"));
    }
}
