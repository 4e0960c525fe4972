//! Which push targets the service may call (SPEC §4 Registry and Upload step 2): the shape of
//! a push URL, and the addresses it may reach. The address rule is applied twice: to a URL's
//! literal or resolved host at registration, and to every address the push client resolves
//! when it connects, so a name that later re-resolves to an internal host (DNS rebinding), or
//! a row written by someone else, still cannot reach one.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs},
    time::Duration,
};

use url::Url;

use crate::{
    networks::Networks,
    slots::{Refused as SlotRefused, Slots},
};

/// Longest push URL taken.
pub const URL_MAX_BYTES: usize = 2048;

/// Why a push URL or address is refused (for logs; clients see one text).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("workspace URL not allowed: {reason}")]
pub struct Refused {
    pub reason: &'static str,
}

fn refused(reason: &'static str) -> Refused {
    Refused { reason }
}

/// Why a registration's push URL was not accepted.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RegistrationCheck {
    #[error(transparent)]
    Refused(#[from] Refused),
    /// Every lookup place of this replica is taken: try again shortly.
    #[error("too many push URL lookups in progress")]
    LookupsBusy,
    /// The client holds its share of the lookup places.
    #[error("too many push URL lookups in progress from this client")]
    ClientLookupsBusy,
}

/// The push policy: the URL rules plus the networks an operator opened up, and the bound on
/// registration lookups.
#[derive(Clone)]
pub struct PushPolicy {
    allowed: Networks,
    /// Places for registration lookups in flight (`MAX_CONCURRENT_REGISTRATION_LOOKUPS`). A
    /// lookup is a getaddrinfo call on tokio's blocking pool (512 threads, shared with spool
    /// writes) that nothing can cancel: the timeout below only stops waiting for it, and the
    /// thread stays until the resolver gives up (10 s and more with an unanswering
    /// nameserver). Registration needs no credential, so without this bound anyone could
    /// hold the whole pool with names that never resolve.
    /// One client address may hold `SLOT_SHARE_PER_CLIENT` percent of them: its bucket lets
    /// it register 60 at once, and names that never resolve held nearly every place for
    /// everyone else's (a review).
    lookups: Slots,
}

/// Bounds the name lookup done at registration (the connect-time check does not depend on it).
const REGISTRATION_LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

impl PushPolicy {
    pub fn new(allowed: Networks, max_lookups: usize, client_share: u64) -> Self {
        let gauge = &crate::metrics::metrics().registration_lookups;
        PushPolicy {
            allowed,
            // No workspace's: the per-workspace bound never applies.
            lookups: Slots::new(max_lookups, max_lookups, client_share, gauge),
        }
    }

    /// May the push client connect to `ip`?
    pub fn address_allowed(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.allowed.contains(ip) || !is_internal(ip)
    }

    /// The URL's shape, and its host when that is an address (or `localhost`): the checks
    /// that need no name lookup. Returns the parsed URL.
    pub fn check_url(&self, raw: &str) -> Result<Url, Refused> {
        let url = Url::parse(raw.trim()).map_err(|_| refused("not an absolute URL"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(refused("scheme is not http or https"));
        }
        // Empty userinfo (`http://@host`, `http://:@host`) leaves the parser's user and
        // password empty; the `@` is in the text all the same.
        if !url.username().is_empty() || url.password().is_some() || has_userinfo(raw) {
            return Err(refused("userinfo"));
        }
        if url.query().is_some() {
            return Err(refused("query"));
        }
        if url.fragment().is_some() {
            return Err(refused("fragment"));
        }
        let literal = match url.host() {
            None => return Err(refused("no host")),
            Some(url::Host::Ipv4(v4)) => Some(IpAddr::V4(v4)),
            Some(url::Host::Ipv6(v6)) => Some(IpAddr::V6(v6)),
            // RFC 6761: these names are loopback whatever a resolver says.
            Some(url::Host::Domain(d)) if is_localhost_name(d) => {
                Some(IpAddr::V4(Ipv4Addr::LOCALHOST))
            }
            Some(url::Host::Domain(_)) => None,
        };
        if literal.is_some_and(|ip| !self.address_allowed(ip)) {
            return Err(refused("internal address"));
        }
        Ok(url)
    }

    /// Does registering `raw` take a name lookup (a host that is a name, not `localhost`)? Each
    /// holds one of MAX_CONCURRENT_REGISTRATION_LOOKUPS until the resolver answers.
    pub fn needs_lookup(&self, raw: &str) -> bool {
        raw.len() <= URL_MAX_BYTES
            && self
                .check_url(raw)
                .is_ok_and(|url| matches!(url.host(), Some(url::Host::Domain(_))))
    }

    /// The registration check: the URL rules, and every address its name resolves to now.
    /// A name that does not resolve yet (or not within the timeout) is accepted: the
    /// connect-time check still applies.
    /// `client`: the client address a lookup's place is counted under (`None`: not counted).
    pub async fn check_registration(
        &self,
        raw: &str,
        client: Option<IpAddr>,
    ) -> Result<Url, RegistrationCheck> {
        // Stored on a row nothing deletes, and no real callback URL is anywhere near this.
        // (Not checked again at push time: a row written before this bound still works.)
        if raw.len() > URL_MAX_BYTES {
            return Err(refused("longer than 2048 bytes").into());
        }
        // (Not checked again at push time either: the relay calls the host the URL parser
        // found, and a row written before this check worked and still does.)
        read_alike(raw.trim())?;
        let url = self.check_url(raw)?;
        if let Some(url::Host::Domain(name)) = url.host() {
            let port = url.port_or_known_default().unwrap_or(80);
            for addr in self.lookup(name, port, client).await? {
                if !self.address_allowed(addr.ip()) {
                    return Err(refused("name resolves to an internal address").into());
                }
            }
        }
        Ok(url)
    }

    /// The addresses `name` resolves to, empty when it does not resolve within
    /// [`REGISTRATION_LOOKUP_TIMEOUT`]; `LookupsBusy` when every lookup place is taken. The
    /// blocking task owns the place, so it is given back when getaddrinfo returns, not when
    /// this stops waiting.
    async fn lookup(
        &self,
        name: &str,
        port: u16,
        client: Option<IpAddr>,
    ) -> Result<Vec<SocketAddr>, RegistrationCheck> {
        let place = self
            .lookups
            .acquire_for(client)
            .map_err(|refused| match refused {
                SlotRefused::Client => RegistrationCheck::ClientLookupsBusy,
                SlotRefused::Replica | SlotRefused::Workspace => RegistrationCheck::LookupsBusy,
            })?;
        let target = (name.to_string(), port);
        let lookup = tokio::task::spawn_blocking(move || {
            let _place = place;
            target.to_socket_addrs().map(Iterator::collect)
        });
        match tokio::time::timeout(REGISTRATION_LOOKUP_TIMEOUT, lookup).await {
            Ok(Ok(Ok(addrs))) => Ok(addrs),
            _ => Ok(Vec::new()),
        }
    }

    /// The addresses the push client may connect to for `name`: every one it resolves to must
    /// be allowed, or none is used (a name that resolves to an internal address among public
    /// ones is refused, not filtered).
    pub async fn resolve(&self, name: &str, port: u16) -> Result<Vec<SocketAddr>, Unresolved> {
        if is_localhost_name(name) && !self.address_allowed(IpAddr::V4(Ipv4Addr::LOCALHOST)) {
            return Err(refused("internal address").into());
        }
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((name, port)).await?.collect();
        if addrs.iter().any(|a| !self.address_allowed(a.ip())) {
            return Err(refused("name resolves to an internal address").into());
        }
        Ok(addrs)
    }
}

/// Why a push target's name gave no address to connect to.
#[derive(Debug, thiserror::Error)]
pub enum Unresolved {
    #[error(transparent)]
    Refused(#[from] Refused),
    #[error("name lookup failed: {0}")]
    Lookup(#[from] std::io::Error),
}

/// A URL that the WHATWG parser (the `url` crate) and RFC 3986 parsers (Go's `url.Parse`, the
/// platform's) read alike. WHATWG reads host `x` into `http:x`, `http:/x`, `http:///x` and
/// `http:\\x`, which have no authority by RFC 3986; takes `\` for `/` (`http://a.com\@b.com/`
/// is host `a.com` to it, an error to Go); and drops tabs and line breaks anywhere, which Go
/// refuses. So: `scheme://` and then a host, no backslash, no control character.
fn read_alike(raw: &str) -> Result<(), Refused> {
    if raw.chars().any(|c| c.is_ascii_control()) {
        return Err(refused("control character"));
    }
    if raw.contains('\\') {
        return Err(refused("backslash"));
    }
    let authority = raw
        .split_once(':')
        .and_then(|(_, rest)| rest.strip_prefix("//"));
    match authority {
        Some(a) if !a.starts_with('/') => Ok(()),
        _ => Err(refused("no host")),
    }
}

/// Whether the authority of `raw` (after `//`, up to the path, query or fragment; a `\` ends it
/// too, as the URL parser reads http(s)) has a `@`.
fn has_userinfo(raw: &str) -> bool {
    raw.split_once("//")
        .and_then(|(_, rest)| rest.split(['/', '\\', '?', '#']).next())
        .is_some_and(|authority| authority.contains('@'))
}

fn is_localhost_name(name: &str) -> bool {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost" || name.ends_with(".localhost")
}

/// Addresses a push must not reach unless an operator allows them: loopback, link-local
/// (cloud metadata lives at 169.254.169.254), private, unique-local, unspecified, multicast,
/// broadcast and reserved, shared (carrier-grade NAT) space, and IPv6 forms that embed such
/// an IPv4 address.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => is_internal_v4(v4),
        IpAddr::V6(v6) => is_internal_v6(v6),
    }
}

fn is_internal_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    ip.is_unspecified()
        || a == 0 // "this network"
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || (a == 100 && (64..128).contains(&b)) // shared address space, RFC 6598
        || (a, b, c) == (192, 0, 0) // IETF protocol assignments, RFC 6890
        || (a, b, c) == (192, 0, 2) // documentation (TEST-NET-1), RFC 5737
        || (a, b, c) == (198, 51, 100) // TEST-NET-2
        || (a, b, c) == (203, 0, 113) // TEST-NET-3
        || (a, b, c) == (192, 88, 99) // 6to4 relay anycast, deprecated (RFC 7526)
        || (a == 198 && (b == 18 || b == 19)) // benchmarking, RFC 2544: labs, not the internet
        || ip.is_multicast()
        || a >= 240 // reserved, and 255.255.255.255 broadcast
}

fn is_internal_v6(ip: Ipv6Addr) -> bool {
    let seg = ip.segments();
    let embedded_v4 = |hi: u16, lo: u16| Ipv4Addr::from(((hi as u32) << 16) | lo as u32);
    ip.is_unspecified()
        || ip.is_loopback()
        || (seg[0] & 0xfe00) == 0xfc00 // unique local fc00::/7
        || (seg[0] & 0xffc0) == 0xfe80 // link-local fe80::/10
        || (seg[0] & 0xffc0) == 0xfec0 // site-local fec0::/10 (deprecated)
        || ip.is_multicast()
        // IPv4-compatible ::a.b.c.d (deprecated), IPv4-translated ::ffff:0:a.b.c.d (SIIT,
        // RFC 2765) and NAT64 64:ff9b::a.b.c.d (RFC 6052): a translator reaches the IPv4 one
        || (seg[..6] == [0; 6] && is_internal_v4(embedded_v4(seg[6], seg[7])))
        || (seg[..6] == [0, 0, 0, 0, 0xffff, 0] && is_internal_v4(embedded_v4(seg[6], seg[7])))
        || (seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] && is_internal_v4(embedded_v4(seg[6], seg[7])))
        // local-use NAT64 64:ff9b:1::/48 (RFC 8215): a network's own translator, whatever it
        // embeds (and where, which its prefix length decides)
        || seg[..3] == [0x64, 0xff9b, 1]
        // 6to4 2002:a.b.c.d::/48
        || (seg[0] == 0x2002 && is_internal_v4(embedded_v4(seg[1], seg[2])))
        || seg[..4] == [0x100, 0, 0, 0] // discard-only 100::/64, RFC 6666
        || seg[..2] == [0x2001, 0xdb8] // documentation 2001:db8::/32, RFC 3849
        || (seg[0] == 0x3fff && seg[1] < 0x1000) // documentation 3fff::/20, RFC 9637 (not 3ff0::/12)
        || seg[..3] == [0x2001, 2, 0] // benchmarking 2001:2::/48, RFC 5180
        || seg[..2] == [0x2001, 0] // Teredo 2001::/32: reaches an IPv4 host through a relay
        // ORCHID 2001:10::/28 and ORCHIDv2 2001:20::/28: identifiers, never routed
        || (seg[0] == 0x2001 && (seg[1] & 0xfff0 == 0x10 || seg[1] & 0xfff0 == 0x20))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allowed: &str) -> PushPolicy {
        PushPolicy::new(allowed.parse().unwrap(), 4, 100)
    }

    #[test]
    fn refused_url_forms() {
        let p = policy("");
        for bad in [
            "http://127.0.0.1:9/",
            "http://localhost:8000",
            "http://LOCALHOST./",
            "http://api.localhost/",
            "http://127.1/",
            "http://2130706433/",
            "http://0x7f000001/",
            "http://0/",
            "http://[::1]/",
            "http://[::ffff:169.254.169.254]/",
            "http://[::ffff:a9fe:a9fe]/",
            "http://169.254.169.254/latest",
            "http://[fd00::1]/",
            "http://[fe80::1]/",
            "http://[64:ff9b::a00:1]/",
            "http://[2002:7f00:1::]/",
            "http://10.0.0.1/",
            "http://172.16.5.4/",
            "http://192.168.1.1/",
            "http://100.64.0.1/",
            "http://224.0.0.1/",
            "http://255.255.255.255/",
            "http://user:pw@example.com/",
            "http://user@example.com/",
            "http://@example.com/",
            "http://:@example.com/",
            // translated, local-use NAT64 and reserved forms (a black-box probe's)
            "http://[::ffff:0:a9fe:a9fe]/",
            "http://[::ffff:0:7f00:1]/",
            "http://[64:ff9b:1::a9fe:a9fe]/",
            "http://[64:ff9b:1:a9fe:a9:fe00::]/",
            "http://192.0.0.1/",
            "http://192.0.2.1/",
            "http://198.18.0.1/",
            "http://198.19.255.1/",
            "http://198.51.100.7/",
            "http://203.0.113.9/",
            "http://[2001:db8::1]/",
            "http://[100::1]/",
            "http://[2001:10::1]/",
            "http://[2001:20::1]/",
            "http://[3fff::1]/",
            "http://[3fff:fff::1]/",
            "http://[2001:2::1]/",
            "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/",
            "http://example.com/x?y=",
            "http://example.com/x?",
            "http://example.com/#frag",
            "ftp://example.com/",
            "example.com",
            "/relative",
            "http://",
        ] {
            assert!(p.check_url(bad).is_err(), "{bad}");
        }
        for good in [
            "http://example.com",
            "https://93.184.216.34:8443/base/",
            // next to 3fff::/20, and global: 3ff0::/12 was taken for it
            "http://[3fff:1000::1]/",
            "http://[3ff0::1]/",
            "http://[2606:4700::1]/",
            "http://198.17.255.1/",
            "http://198.20.0.1/",
            "http://192.0.3.1/",
            "http://[2001:4860::8888]/",
            "http://[64:ff9b::5db8:d822]/",
            "http://example.com/a@b",
            " https://example.com/base ",
            "HTTP://Example.COM:80/a/b",
        ] {
            assert!(p.check_url(good).is_ok(), "{good}");
        }
    }

    #[tokio::test]
    async fn urls_that_parsers_read_differently_are_refused_at_registration() {
        let p = policy("");
        for bad in [
            // no authority by RFC 3986, though the WHATWG parser finds host `x`
            "http:///x",
            "https:///example.invalid/",
            "http:x",
            "http:/x",
            "http:\\\\x",
            "http://\\x",
            "http://example.invalid\\@evil.invalid/",
            // control characters, which the WHATWG parser drops and Go refuses
            "http://exa\nmple.invalid/",
            "http://example.invalid/\tpath",
            "http://example.invalid/\u{7f}",
        ] {
            assert!(p.check_registration(bad, None).await.is_err(), "{bad}");
            // A row written before this check still pushes to the host the parser found.
            assert!(p.check_url(bad).is_ok(), "{bad}");
        }
        for good in [
            " https://93.184.216.34:8443/base/ ",
            "HTTP://93.184.216.34:80/a/b",
            "http://[2606:4700::1]/",
        ] {
            assert!(p.check_registration(good, None).await.is_ok(), "{good}");
        }
    }

    #[test]
    fn allowed_networks_open_exactly_themselves() {
        let p = policy("127.0.0.0/8, fd00::/8");
        assert!(p.check_url("http://127.0.0.1:9/").is_ok());
        assert!(p.check_url("http://localhost:9/").is_ok());
        assert!(p.check_url("http://[::ffff:127.0.0.1]/").is_ok());
        assert!(p.check_url("http://[fd00::5]/").is_ok());
        assert!(p.check_url("http://169.254.169.254/").is_err());
        assert!(p.check_url("http://10.1.1.1/").is_err());
        assert!(
            p.check_url("http://127.0.0.1/?q").is_err(),
            "shape rules still apply"
        );
    }

    #[tokio::test]
    async fn the_resolver_refuses_names_of_internal_addresses() {
        let refused = policy("").resolve("localhost", 80).await;
        assert!(
            matches!(refused, Err(Unresolved::Refused(_))),
            "{refused:?}"
        );
        let open = policy("127.0.0.0/8, ::1/128");
        let addrs = open.resolve("localhost", 8080).await.unwrap();
        assert!(!addrs.is_empty());
        assert!(addrs.iter().all(|a| a.port() == 8080), "{addrs:?}");
    }
}
