//! Who sent a request: the connection's peer, or, when that peer is a proxy the operator
//! trusts (`TRUSTED_PROXIES`), the address the proxies say they forwarded for
//! (`X-Forwarded-For`). Used to keep a bucket of registrations per client, and to bound the
//! connections and the slots one client holds.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
};

use axum::http::HeaderMap;

use crate::{
    networks::{client_key, Networks},
    push_target::is_internal,
};

/// Open connections per client address (`MAX_CONNECTIONS_PER_CLIENT`, off by default), so
/// that one client cannot hold a replica's `MAX_CONNECTIONS` places and leave everyone else
/// in the listen backlog. A trusted proxy is not counted: its connections carry many clients.
/// The table holds only addresses with a connection open, at most `MAX_CONNECTIONS` of them.
pub struct ConnectionsPerClient {
    max: usize,
    trusted: Networks,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One counted connection; its place is given back when this is dropped.
pub struct ConnectionPlace {
    owner: Arc<ConnectionsPerClient>,
    key: Option<IpAddr>,
}

impl ConnectionsPerClient {
    pub fn new(max: usize, trusted: Networks) -> Arc<Self> {
        Arc::new(ConnectionsPerClient {
            max,
            trusted,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// Whether `peer` is one of TRUSTED_PROXIES.
    pub fn is_proxy(&self, peer: IpAddr) -> bool {
        self.trusted.contains(peer.to_canonical())
    }

    /// A place for a connection from `peer`, or `None` when it has `max` open already (a
    /// `max` of 0: no limit).
    pub fn open(self: &Arc<Self>, peer: IpAddr) -> Option<ConnectionPlace> {
        let peer = peer.to_canonical();
        let key = match self.max == 0 || self.trusted.contains(peer) {
            true => None,
            false => Some(client_key(peer)),
        };
        if let Some(key) = key {
            let mut open = self
                .open
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let count = open.entry(key).or_insert(0);
            if *count >= self.max {
                return None;
            }
            *count += 1;
        }
        Some(ConnectionPlace {
            owner: self.clone(),
            key,
        })
    }

    #[cfg(test)]
    fn clients(&self) -> usize {
        self.open.lock().unwrap().len()
    }
}

impl Drop for ConnectionPlace {
    fn drop(&mut self) {
        let Some(key) = self.key else { return };
        let mut open = self
            .owner
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = open.get_mut(&key) {
            *count -= 1;
            if *count == 0 {
                open.remove(&key);
            }
        }
    }
}

/// What a connection over its client's limit is sent before it is closed, unread: the JSON
/// error shape of every other refusal (SPEC §10).
pub const TOO_MANY_CONNECTIONS: &[u8] = b"HTTP/1.1 429 Too Many Requests\r\n\
Content-Type: application/json\r\n\
Retry-After: 1\r\n\
Connection: close\r\n\
Content-Length: 93\r\n\r\n\
{\"error\":\"too many connections from this client \xe2\x80\x94 retry shortly\",\"code\":\"connection_limit\"}";

/// The connection's peer address, put on every request by the server loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer(pub IpAddr);

/// The client's address. Each trusted proxy appends the address it received from to
/// `X-Forwarded-For`, so the list is read from the right: the first hop that is not a trusted
/// proxy is the client, and whatever stands left of it the client may have written itself
/// (bytes that are not text included: a proxy appends to the client's own line). A hop that
/// is not an address ends the walk at the last trusted one.
pub fn client_address(peer: IpAddr, headers: &HeaderMap, trusted: &Networks) -> IpAddr {
    let mut client = peer.to_canonical();
    if !trusted.contains(client) {
        return client;
    }
    for value in headers.get_all("x-forwarded-for").iter().rev() {
        for hop in value.as_bytes().rsplit(|b| *b == b',') {
            let Some(ip) = hop_address(hop) else {
                return client;
            };
            client = ip;
            if !trusted.contains(ip) {
                return ip;
            }
        }
    }
    client
}

/// The client a request's slots are counted under (`SLOT_SHARE_PER_CLIENT`): its address's
/// key, or `None` when it is not counted: the operator's own (a trusted proxy that forwarded
/// no client, an address in a local network) or unknown (a request made inside the process).
pub fn slot_client(
    peer: Option<IpAddr>,
    headers: &HeaderMap,
    trusted: &Networks,
) -> Option<IpAddr> {
    counted_client(client_address(peer?, headers, trusted), trusted)
}

/// The key a request's `client` (its [`client_address`]) is counted under, as
/// [`slot_client`] says.
pub fn counted_client(client: IpAddr, trusted: &Networks) -> Option<IpAddr> {
    let client = crate::networks::untranslated(client);
    // Internal addresses (private, loopback, link-local, shared, …: what a push URL may not
    // reach) are the operator's own, never where a client on the internet connects from.
    match trusted.contains(client) || is_internal(client) {
        true => None,
        false => Some(client_key(client)),
    }
}

/// `203.0.113.7`, `2001:db8::7`, or either with a port (`203.0.113.7:4711`, `[2001:db8::7]:4711`).
fn hop_address(hop: &[u8]) -> Option<IpAddr> {
    let hop = std::str::from_utf8(hop).ok()?.trim();
    hop.parse::<IpAddr>()
        .or_else(|_| hop.parse::<SocketAddr>().map(|s| s.ip()))
        .ok()
        .map(|ip| ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use proptest::prelude::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn forwarded(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn only_a_trusted_peer_is_believed() {
        let trusted: Networks = "10.0.0.0/8".parse().unwrap();
        let h = forwarded(&["198.51.100.1"]);
        assert_eq!(
            client_address(ip("192.0.2.9"), &h, &trusted),
            ip("192.0.2.9")
        );
        assert_eq!(
            client_address(ip("10.0.0.2"), &h, &trusted),
            ip("198.51.100.1")
        );
        let none = Networks::default();
        assert_eq!(client_address(ip("10.0.0.2"), &h, &none), ip("10.0.0.2"));
    }

    #[test]
    fn the_first_untrusted_hop_from_the_right_is_the_client() {
        let trusted: Networks = "10.0.0.0/8".parse().unwrap();
        let peer = ip("10.0.0.2");
        let h = forwarded(&["1.1.1.1, 198.51.100.1, 10.0.0.7"]);
        assert_eq!(client_address(peer, &h, &trusted), ip("198.51.100.1"));
        let h = forwarded(&["1.1.1.1", "198.51.100.1:4711", "10.0.0.7"]);
        assert_eq!(client_address(peer, &h, &trusted), ip("198.51.100.1"));
        let h = forwarded(&["[2001:db8::1]:80"]);
        assert_eq!(client_address(peer, &h, &trusted), ip("2001:db8::1"));
        let h = forwarded(&["::ffff:198.51.100.1"]);
        assert_eq!(client_address(peer, &h, &trusted), ip("198.51.100.1"));
        let mut h = HeaderMap::new();
        h.append(
            "x-forwarded-for",
            HeaderValue::from_bytes(b"\xff, 198.51.100.1").unwrap(),
        );
        assert_eq!(client_address(peer, &h, &trusted), ip("198.51.100.1"));
        // Garbage or nothing: the last trusted hop.
        let h = forwarded(&["1.1.1.1, unknown, 10.0.0.7"]);
        assert_eq!(client_address(peer, &h, &trusted), ip("10.0.0.7"));
        assert_eq!(client_address(peer, &HeaderMap::new(), &trusted), peer);
        let h = forwarded(&["10.0.0.9"]);
        assert_eq!(client_address(peer, &h, &trusted), ip("10.0.0.9"));
    }

    #[test]
    fn slots_count_public_clients_only() {
        // Public clients are public addresses: documentation ranges count as internal
        // (push_target::is_internal), as private ones do.
        let trusted: Networks = "10.0.0.0/8, 192.0.2.1".parse().unwrap();
        let none = HeaderMap::new();
        let slot_client = |peer: &str, h: &HeaderMap| slot_client(Some(ip(peer)), h, &trusted);
        assert_eq!(slot_client("8.8.4.4", &none), Some(ip("8.8.4.4")));
        assert_eq!(
            slot_client("2606:4700:0:1::7", &none),
            Some(ip("2606:4700::")),
            "an IPv6 client by its /48"
        );
        assert_eq!(slot_client("127.0.0.1", &none), None);
        assert_eq!(slot_client("192.168.7.7", &none), None);
        assert_eq!(
            slot_client("100.64.0.1", &none),
            None,
            "shared address space"
        );
        assert_eq!(slot_client("fd00::1", &none), None, "unique local");
        assert_eq!(
            slot_client("2001:0:4136:e378:8000:63bf:f7f7:fbb2", &none),
            Some(ip("8.8.4.77")),
            "a Teredo client by the IPv4 address it carries"
        );
        assert_eq!(
            slot_client("2001:0:4136:e378:8000:63bf:ffff:fffe", &none),
            None,
            "a Teredo client behind 0.0.0.1"
        );
        assert_eq!(
            slot_client("2002:808:44d:ff00::1", &none),
            Some(ip("8.8.4.77")),
            "a 6to4 site by its IPv4 address"
        );
        assert_eq!(
            slot_client("2002:a00:1::1", &none),
            None,
            "6to4 of 10.0.0.1"
        );
        assert_eq!(slot_client("192.0.2.1", &none), None, "a trusted proxy");
        let h = forwarded(&["8.8.8.9"]);
        assert_eq!(slot_client("192.0.2.1", &h), Some(ip("8.8.8.9")));
        assert_eq!(slot_client("10.0.0.2", &h), Some(ip("8.8.8.9")));
        assert_eq!(slot_client("8.8.4.4", &h), Some(ip("8.8.4.4")));
        assert_eq!(super::slot_client(None, &h, &trusted), None);
    }

    #[test]
    fn no_limit_counts_nothing() {
        let limit = ConnectionsPerClient::new(0, Networks::default());
        let open: Vec<_> = (0..5)
            .map(|_| limit.open(ip("203.0.113.1")).unwrap())
            .collect();
        assert_eq!((open.len(), limit.clients()), (5, 0));
    }

    #[test]
    fn connections_are_counted_per_client_and_given_back() {
        let limit = ConnectionsPerClient::new(2, "10.0.0.0/8".parse().unwrap());
        let a = limit.open(ip("203.0.113.1")).unwrap();
        let _b = limit.open(ip("::ffff:203.0.113.1")).unwrap();
        assert!(limit.open(ip("203.0.113.1")).is_none());
        assert!(limit.open(ip("203.0.113.2")).is_some(), "another client");
        let proxied: Vec<_> = (0..5)
            .map(|_| limit.open(ip("10.0.0.2")).unwrap())
            .collect();
        assert_eq!(proxied.len(), 5, "a trusted proxy is not counted");
        drop(a);
        assert!(limit.open(ip("203.0.113.1")).is_some());
        drop(_b);
        assert_eq!(limit.clients(), 0, "nothing kept for closed connections");
    }

    #[test]
    fn the_refusal_is_a_whole_json_answer() {
        let text = std::str::from_utf8(TOO_MANY_CONNECTIONS).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(body.len(), length);
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["code"], "connection_limit");
    }

    proptest! {
        /// Whatever a client writes left of the proxies' own hops changes nothing, and the
        /// answer is always the peer or an address the header names.
        #[test]
        fn what_the_client_writes_cannot_move_its_address(
            forged in proptest::collection::vec(any::<u8>(), 0..80),
            client in any::<[u8; 4]>(),
        ) {
            let trusted: Networks = "10.0.0.0/8".parse().unwrap();
            let client = IpAddr::from(client);
            prop_assume!(!trusted.contains(client));
            let peer = ip("10.0.0.2");
            // As nginx's `$proxy_add_x_forwarded_for` writes it: the client's own line, then
            // what each proxy appends.
            let mut line = forged;
            line.extend_from_slice(format!(", {client}, 10.0.0.3").as_bytes());
            if let Ok(value) = HeaderValue::from_bytes(&line) {
                let mut h = HeaderMap::new();
                h.append("x-forwarded-for", value);
                prop_assert_eq!(client_address(peer, &h, &trusted), client);
            }
        }

        #[test]
        fn any_header_bytes_are_read_without_panic(
            raw in proptest::collection::vec(any::<u8>(), 0..96),
        ) {
            let trusted: Networks = "0.0.0.0/0, ::/0".parse().unwrap();
            if let Ok(value) = HeaderValue::from_bytes(&raw) {
                let mut h = HeaderMap::new();
                h.append("x-forwarded-for", value);
                let _ = client_address(ip("10.0.0.2"), &h, &trusted);
            }
        }
    }
}
