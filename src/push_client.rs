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
    pub socket: Resettable,
}

/// A second handle on a connection's socket, to cut it: a socket closed with bytes still
/// unsent keeps sending them (the kernel's, not the relay's, once the relay has let go), and a
/// workspace reading slowly got most of a MB more after its cut. Reset, its close discards them.
pub struct Resettable(socket2::Socket);

impl Resettable {
    /// The connection, once closed, is reset rather than ended: unsent bytes are dropped.
    pub fn reset_on_close(&self) {
        // Best effort: a socket already gone has nothing left to send.
        let _ = self.0.set_linger(Some(Duration::ZERO));
    }
}

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
        let addrs = match &host {
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
        let (io, socket) =
            tokio::time::timeout(self.connect_timeout, self.transport(url, &host, addrs))
                .await
                .map_err(|_| OpenError::Failed("connect timed out".into()))??;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
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
        addrs: Vec<SocketAddr>,
    ) -> Result<(Box<dyn Io>, Resettable), OpenError> {
        // Each address gets its share of the connect timeout, so one that never answers does
        // not leave the next none.
        let each = self.connect_timeout / addrs.len().max(1) as u32;
        let tcp = connect_any(addrs, each).await?;
        let failed = |e: std::io::Error| OpenError::Failed(e.to_string());
        let sock = socket2::SockRef::from(&tcp);
        sock.set_tcp_user_timeout(Some(self.stalled_after))
            .map_err(failed)?;
        let socket = Resettable(sock.try_clone().map_err(failed)?);
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

/// The first of `addrs` that takes a connection within `each`, in the resolver's order.
async fn connect_any(addrs: Vec<SocketAddr>, each: Duration) -> Result<TcpStream, OpenError> {
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
