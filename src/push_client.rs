//! The push relay's HTTP/1.1 client: one connection per relay, opened for it and owned by it.
//! The relay drives the connection itself, so it can end it whenever it must (PUSH_TIMEOUT, a
//! workspace that stops taking the upload, a failed exchange) and let go of the upload's slot
//! then: a pooled client's connection runs in a task of its own, and a workspace that answered
//! at once and then read the rest slowly kept that task, and the slot, long past PUSH_TIMEOUT
//! (an audit: 30 MB read at 6.5 KB/s held it ~130 s with PUSH_TIMEOUT=20s). Every address a
//! name resolves to is checked as it connects, and no proxy is used (one would resolve names
//! itself, out of reach of that check). No connection is kept for reuse: a pool keeps one per
//! workspace address, however many, and a client re-registering its URL to a new port before
//! each upload held a socket per upload until 20,000 used up the replica's open files (a red
//! team); a handshake per upload is the price.

use std::{
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use hyper::client::conn::http1::{Connection, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tokio_rustls::{
    rustls::{self, pki_types::ServerName},
    TlsConnector,
};
use url::{Host, Url};

use crate::push_target::{PushPolicy, Refused, Unresolved};

/// What the relay sends: the upload's bytes as they come.
pub type RelayBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One connection's transport, plain or TLS.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// A connection to a push workspace: the caller sends one request on `sender` and must drive
/// `connection` (until it ends, or drop it to close the socket).
pub struct Opened {
    pub sender: SendRequest<RelayBody>,
    pub connection: Connection<TokioIo<Box<dyn Io>>, RelayBody>,
    pub socket: RelaySocket,
}

/// A second handle on a connection's socket, to see what it holds and to cut it.
pub struct RelaySocket(socket2::Socket);

impl RelaySocket {
    /// The connection, once closed, is reset rather than ended: unsent bytes are dropped. A
    /// socket closed with bytes still queued keeps sending them (the kernel's, not the
    /// relay's, once the relay has let go), and a workspace reading slowly got most of a MB
    /// more after its cut.
    pub fn reset_on_close(&self) {
        // Best effort: a socket already gone has nothing left to send.
        let _ = self.0.set_linger(Some(Duration::ZERO));
    }

    /// Bytes written to the socket that the workspace has not acknowledged (SIOCOUTQ): what
    /// the relay has sent on is not what the workspace took until these are subtracted (the
    /// kernel's send buffer grows to 4 MiB, a head start of minutes at BODY_MIN_RATE).
    pub fn unsent(&self) -> u64 {
        let mut queued: libc::c_int = 0;
        // SAFETY: TIOCOUTQ (SIOCOUTQ for a TCP socket) writes one int through the pointer,
        // which points at `queued`; the descriptor is this handle's own, open while it lives.
        let done = unsafe { libc::ioctl(self.0.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
        match done {
            0 => u64::try_from(queued).unwrap_or(0),
            _ => 0,
        }
    }
}

/// hyper's write buffer for a relay (its default is ~400 KiB): what it holds is, like the
/// socket's queue, counted as sent on before the workspace has it, and unlike that queue
/// cannot be asked; at BODY_MIN_RATE's 8 KiB/s, 64 KiB is 8 s of head start.
const WRITE_BUFFER: usize = 64 << 10;

/// Why no connection was opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The policy refused the address (a name that resolves to an internal one).
    #[error(transparent)]
    Refused(#[from] Refused),
    #[error("{0}")]
    Failed(String),
}

impl From<Unresolved> for OpenError {
    fn from(e: Unresolved) -> Self {
        match e {
            Unresolved::Refused(r) => OpenError::Refused(r),
            other => OpenError::Failed(other.to_string()),
        }
    }
}

#[derive(Clone)]
pub struct PushClient {
    policy: PushPolicy,
    tls: TlsConnector,
    /// For the TCP connect and the TLS handshake together.
    connect_timeout: Duration,
    /// Sent bytes unacknowledged, or a zero window, this long end the connection
    /// (TCP_USER_TIMEOUT): a workspace that stops reading once it has answered.
    stalled_after: Duration,
}

impl PushClient {
    pub fn new(
        policy: PushPolicy,
        connect_timeout: Duration,
        stalled_after: Duration,
    ) -> Result<Self, rustls::Error> {
        let roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        Self::with_roots(policy, roots, connect_timeout, stalled_after)
    }

    fn with_roots(
        policy: PushPolicy,
        roots: rustls::RootCertStore,
        connect_timeout: Duration,
        stalled_after: Duration,
    ) -> Result<Self, rustls::Error> {
        // The provider named: with both of rustls's providers compiled in (the AWS SDK brings
        // the other) it will not pick one itself.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(PushClient {
            policy,
            tls: TlsConnector::from(Arc::new(config)),
            connect_timeout,
            stalled_after,
        })
    }

    pub fn policy(&self) -> &PushPolicy {
        &self.policy
    }

    /// Opens a connection to `url`'s host (http or https, already checked by the policy's
    /// `check_url`).
    pub async fn open(&self, url: &Url) -> Result<Opened, OpenError> {
        let port = url
            .port_or_known_default()
            .ok_or_else(|| OpenError::Failed("no port".into()))?;
        let host = url
            .host()
            .ok_or_else(|| OpenError::Failed("no host".into()))?;
        // The name's lookup counts in the connect timeout, as it did in reqwest's.
        let (io, socket) =
            tokio::time::timeout(self.connect_timeout, self.transport(url, &host, port))
                .await
                .map_err(|_| OpenError::Failed("connect timed out".into()))??;
        let (sender, connection) = hyper::client::conn::http1::Builder::new()
            .max_buf_size(WRITE_BUFFER)
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| OpenError::Failed(e.to_string()))?;
        Ok(Opened {
            sender,
            connection,
            socket,
        })
    }

    async fn transport(
        &self,
        url: &Url,
        host: &Host<&str>,
        port: u16,
    ) -> Result<(Box<dyn Io>, RelaySocket), OpenError> {
        let addrs = match host {
            // Every address it resolves to checked by `resolve`.
            Host::Domain(name) => self.policy.resolve(name, port).await?,
            Host::Ipv4(ip) => vec![SocketAddr::new(IpAddr::V4(*ip), port)],
            Host::Ipv6(ip) => vec![SocketAddr::new(IpAddr::V6(*ip), port)],
        };
        if addrs.iter().any(|a| !self.policy.address_allowed(a.ip())) {
            return Err(Refused {
                reason: "internal address",
            }
            .into());
        }
        let tcp = connect_any(addrs, self.connect_timeout).await?;
        let failed = |e: std::io::Error| OpenError::Failed(e.to_string());
        let sock = socket2::SockRef::from(&tcp);
        sock.set_tcp_user_timeout(Some(self.stalled_after))
            .map_err(failed)?;
        let socket = RelaySocket(sock.try_clone().map_err(failed)?);
        if url.scheme() != "https" {
            return Ok((Box::new(tcp), socket));
        }
        let name = match host {
            Host::Domain(d) => ServerName::try_from(d.to_string())
                .map_err(|e| OpenError::Failed(format!("TLS server name: {e}")))?,
            Host::Ipv4(ip) => ServerName::IpAddress(IpAddr::V4(*ip).into()),
            Host::Ipv6(ip) => ServerName::IpAddress(IpAddr::V6(*ip).into()),
        };
        let tls = self
            .tls
            .connect(name, tcp)
            .await
            .map_err(|e| OpenError::Failed(format!("TLS handshake: {e}")))?;
        Ok((Box::new(tls), socket))
    }
}

/// How long the addresses of a name's first family have alone before the other family's are
/// tried too (RFC 8305's "Happy Eyeballs"; hyper-util's 300 ms, which the relay had through
/// reqwest): a workspace whose name has AAAA and A records, with IPv6 broken between it and the
/// replica, was reached only after the IPv6 attempt's share of the connect timeout (5 s), or
/// not before the rate watchdog's 502 (a review).
const OTHER_FAMILY_AFTER: Duration = Duration::from_millis(300);

/// A connection to one of `addrs`, within `timeout`: those of the first address's family in
/// the resolver's order, and the other family's alongside them from [`OTHER_FAMILY_AFTER`].
async fn connect_any(addrs: Vec<SocketAddr>, timeout: Duration) -> Result<TcpStream, OpenError> {
    let first_v6 = addrs.first().is_some_and(SocketAddr::is_ipv6);
    let (first, other): (Vec<_>, Vec<_>) = addrs.into_iter().partition(|a| a.is_ipv6() == first_v6);
    let first = in_turn(first, timeout);
    if other.is_empty() {
        return first.await;
    }
    let other = async {
        tokio::time::sleep(OTHER_FAMILY_AFTER).await;
        in_turn(other, timeout).await
    };
    let (mut first, mut other) = (std::pin::pin!(first), std::pin::pin!(other));
    tokio::select! {
        tcp = &mut first => match tcp {
            Ok(tcp) => Ok(tcp),
            Err(_) => other.await,
        },
        tcp = &mut other => match tcp {
            Ok(tcp) => Ok(tcp),
            Err(_) => first.await,
        },
    }
}

/// The first of `addrs` that takes a connection, tried in turn, each with its share of
/// `timeout` (so one that never answers does not leave the next none).
async fn in_turn(addrs: Vec<SocketAddr>, timeout: Duration) -> Result<TcpStream, OpenError> {
    let each = timeout / addrs.len().max(1) as u32;
    let mut last = String::from("the name has no address");
    for addr in addrs {
        match tokio::time::timeout(each, TcpStream::connect(addr)).await {
            Err(_) => last = format!("connect to {addr}: timed out"),
            Ok(Ok(tcp)) => {
                // The relay writes as the client's bytes come, and the answer is small.
                tcp.set_nodelay(true)
                    .map_err(|e| OpenError::Failed(e.to_string()))?;
                return Ok(tcp);
            }
            Ok(Err(e)) => last = format!("connect to {addr}: {e}"),
        }
    }
    Err(OpenError::Failed(last))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::{rustls::pki_types::PrivateKeyDer, TlsAcceptor};

    use super::*;

    /// What the TLS workspace saw of its one connection: SNI, ALPN, the request head.
    type Seen = Arc<Mutex<Option<(Option<String>, Option<Vec<u8>>, String)>>>;

    /// An HTTPS workspace on loopback with a certificate of its own for `localhost`, answering
    /// one request `200 ok`; and the root that certificate chains to.
    async fn tls_workspace() -> (u16, rustls::RootCertStore, Seen) {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.cert.der().clone()).unwrap();
        let key = PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key)
            .unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen: Seen = Arc::default();
        let saw = seen.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    continue; // a client that refused the certificate
                };
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(n @ 1..) => head.extend_from_slice(&buf[..n]),
                        _ => break,
                    }
                }
                let (_, conn) = tls.get_ref();
                *saw.lock().unwrap() = Some((
                    conn.server_name().map(String::from),
                    conn.alpn_protocol().map(<[u8]>::to_vec),
                    String::from_utf8_lossy(&head).into_owned(),
                ));
                let _ = tls
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .await;
                let _ = tls.shutdown().await;
            }
        });
        (port, roots, seen)
    }

    fn loopback_policy() -> PushPolicy {
        PushPolicy::new("127.0.0.0/8, ::1/128".parse().unwrap(), 4, 100)
    }

    /// An `https` push URL is spoken to over TLS, its name sent (SNI) and checked against the
    /// certificate, HTTP/1.1 agreed (ALPN); a certificate no root vouches for is refused.
    #[tokio::test]
    async fn https_targets_are_reached_over_verified_tls() {
        let (port, roots, seen) = tls_workspace().await;
        let url: Url = format!("https://localhost:{port}/ingest").parse().unwrap();
        let second = Duration::from_secs(1);
        let trusting = PushClient::with_roots(loopback_policy(), roots, second, second).unwrap();
        let Opened {
            mut sender,
            connection,
            ..
        } = trusting.open(&url).await.unwrap();
        tokio::spawn(connection);
        let body = http_body_util::Empty::<Bytes>::new()
            .map_err(|never| match never {})
            .boxed_unsync();
        let req = hyper::Request::post("/ingest")
            .header("host", format!("localhost:{port}"))
            .body(body)
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let answer = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&answer[..], b"ok");
        let (sni, alpn, head) = seen.lock().unwrap().take().unwrap();
        assert_eq!(sni.as_deref(), Some("localhost"));
        assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
        assert!(head.starts_with("POST /ingest HTTP/1.1\r\n"), "{head}");

        // The same workspace, with only the public roots: its certificate is nobody's.
        let public = PushClient::new(loopback_policy(), second, second).unwrap();
        match public.open(&url).await {
            Err(OpenError::Failed(why)) => assert!(why.starts_with("TLS handshake"), "{why}"),
            Err(other) => panic!("{other}"),
            Ok(_) => panic!("an unknown certificate was taken"),
        }
    }

    /// A listener whose accept queue is full: the SYNs of further connects go unanswered, as
    /// to a host whose route is broken.
    async fn unanswering(addr: SocketAddr) -> (SocketAddr, socket2::Socket, Vec<TcpStream>) {
        let domain = socket2::Domain::for_address(addr);
        let listener = socket2::Socket::new(domain, socket2::Type::STREAM, None).unwrap();
        listener.bind(&addr.into()).unwrap();
        listener.listen(0).unwrap();
        let addr = listener.local_addr().unwrap().as_socket().unwrap();
        let filler = TcpStream::connect(addr).await.unwrap();
        (addr, listener, vec![filler])
    }

    /// A name with addresses of both families, the first family's unanswering: the other's is
    /// reached within a moment, not after the first's share of the connect timeout.
    #[tokio::test]
    async fn the_other_address_family_is_tried_alongside() {
        let v4 = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let good = v4.local_addr().unwrap();
        let (dead, _listener, _filler) = unanswering("[::1]:0".parse().unwrap()).await;
        // The first connect to `dead` shows it unanswering (its SYN dropped, not refused).
        let probe = tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(dead));
        assert!(probe.await.is_err(), "the listener answers");
        let started = std::time::Instant::now();
        let tcp = connect_any(vec![dead, good], Duration::from_secs(10))
            .await
            .unwrap();
        let took = started.elapsed();
        assert_eq!(tcp.peer_addr().unwrap(), good);
        assert!(took < Duration::from_secs(2), "took {took:?}");
        // And in the other order, the same.
        let (dead4, _l4, _f4) = unanswering("127.0.0.1:0".parse().unwrap()).await;
        let v6 = tokio::net::TcpListener::bind("[::1]:0").await.unwrap();
        let good6 = v6.local_addr().unwrap();
        let started = std::time::Instant::now();
        let tcp = connect_any(vec![dead4, good6], Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(tcp.peer_addr().unwrap(), good6);
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
