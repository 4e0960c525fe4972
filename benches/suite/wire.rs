//! A counting TCP proxy between the service and PostgreSQL: it forwards bytes untouched both
//! ways, counts the bytes the server sends and the frontend messages by type, so round trips can be counted on the wire
//! (what pg_stat_statements cannot see: pings, and the statements that deferred triggers run
//! inside COMMIT, which it lists as top-level although they cost no round trip).
//!
//! A round trip is a message after which the client waits for the server: Sync (`S`, the end
//! of an extended-protocol batch), a simple Query (`Q`), and CopyDone/CopyFail (`c`/`f`, the
//! second wait of a COPY FROM STDIN; its first is the Query). A Sync with nothing before it
//! in its batch is a ping (sqlx's `ping()`: the service pings a connection idle over 1 s before
//! use, and a release before 39a32aa, on sqlx's pool, pinged every connection it took back);
//! those are counted apart too.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// Where bare Syncs (pings) are counted: no message has type 0.
const PING: u8 = 0;

const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;

pub struct Proxy {
    pub port: u16,
    counts: Arc<Vec<AtomicU64>>,
    /// Bytes the server sent, all connections together (read by the API tests, which
    /// include this file).
    #[allow(dead_code)]
    down: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Frontend message counts by type byte.
#[derive(Clone)]
pub struct Counts(Vec<u64>);

impl Counts {
    pub fn get(&self, t: u8) -> u64 {
        self.0[t as usize]
    }

    /// Syncs with nothing before them in their batch.
    pub fn pings(&self) -> u64 {
        self.get(PING)
    }

    pub fn round_trips(&self) -> u64 {
        [b'S', b'Q', b'c', b'f'].iter().map(|t| self.get(*t)).sum()
    }

    pub fn since(&self, before: &Counts) -> Counts {
        Counts(self.0.iter().zip(&before.0).map(|(a, b)| a - b).collect())
    }
}

impl Proxy {
    /// Listens on a loopback port and forwards every connection to `upstream` (host:port).
    pub async fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let counts: Arc<Vec<AtomicU64>> = Arc::new((0..256).map(|_| AtomicU64::new(0)).collect());
        let down = Arc::new(AtomicU64::new(0));
        let (c, d) = (counts.clone(), down.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (upstream, counts, down) = (upstream.clone(), c.clone(), d.clone());
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(&upstream).await {
                        pump(client, server, counts, down).await;
                    }
                });
            }
        });
        Proxy {
            port,
            counts,
            down,
            task,
        }
    }

    /// Bytes the server has sent so far.
    #[allow(dead_code)]
    pub fn bytes_down(&self) -> u64 {
        self.down.load(Ordering::SeqCst)
    }

    pub fn counts(&self) -> Counts {
        Counts(
            self.counts
                .iter()
                .map(|c| c.load(Ordering::SeqCst))
                .collect(),
        )
    }
}

async fn pump(
    client: TcpStream,
    server: TcpStream,
    counts: Arc<Vec<AtomicU64>>,
    sent: Arc<AtomicU64>,
) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let down = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n @ 1..) = sr.read(&mut buf).await {
            sent.fetch_add(n as u64, Ordering::SeqCst);
            if cw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = cw.shutdown().await;
    });
    let mut parser = Parser::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match cr.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                parser.feed(&buf[..n], &counts);
                if sw.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = sw.shutdown().await;
    let _ = down.await;
}

/// Follows frontend message boundaries across reads: untyped start-up packets (an SSL or
/// GSS request, then the startup message), then typed messages.
#[derive(Default)]
struct Parser {
    typed: bool,
    head: Vec<u8>,
    skip: usize,
    /// Messages since the last Sync, Query or CopyDone.
    batch: usize,
}

impl Parser {
    fn feed(&mut self, mut data: &[u8], counts: &[AtomicU64]) {
        while !data.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(data.len());
                self.skip -= n;
                data = &data[n..];
                continue;
            }
            let need = if self.typed { 5 } else { 8 };
            let take = (need - self.head.len()).min(data.len());
            self.head.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.head.len() < need {
                return;
            }
            let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
            if self.typed {
                let t = self.head[0];
                counts[t as usize].fetch_add(1, Ordering::SeqCst);
                if t == b'S' && self.batch == 0 {
                    counts[PING as usize].fetch_add(1, Ordering::SeqCst);
                }
                self.batch = match t {
                    b'S' | b'Q' | b'c' | b'f' => 0,
                    _ => self.batch + 1,
                };
                self.skip = be(&self.head[1..5]).saturating_sub(4);
            } else {
                let code = be(&self.head[4..8]) as u32;
                self.skip = be(&self.head[0..4]).saturating_sub(8);
                self.typed = code != SSL_REQUEST && code != GSSENC_REQUEST;
            }
            self.head.clear();
        }
    }
}

/// The database URL's host:port, and a function giving the same URL through another local port.
pub fn split_host(db: &str) -> (String, impl Fn(u16) -> String + '_) {
    let (scheme, rest) = db.split_once("://").expect("a postgres:// URL");
    let (auth, rest) = match rest.split_once('@') {
        Some((a, r)) => (format!("{a}@"), r),
        None => (String::new(), rest),
    };
    let (hostport, path) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    let upstream = if hostport.contains(':') {
        hostport.to_string()
    } else {
        format!("{hostport}:5432")
    };
    (upstream, move |port| {
        format!("{scheme}://{auth}127.0.0.1:{port}{path}")
    })
}
