//! A client connection's socket, with the response side under deadlines (SPEC §10, slow
//! clients): a client that stops reading is cut after `idle`, and one that keeps a response
//! waiting must take at least `min_rate` bytes per second of that waiting, counted in windows
//! of `window`. An idle timer on our writes alone (what came before) sees a reader's progress
//! only when the kernel's send buffer has drained enough to wake the writer: measured, it cut
//! a steady 10 KB/s reader after 60 s and let a 1 KB/s one hold its download slot as long.
//!
//! Only time spent waiting on the client counts: a write the socket refused (its send buffer
//! is full) until the socket takes bytes again. Time the service spends producing bytes
//! (reading storage, waiting for a long poll) never does, so a slow backend does not make a
//! fast client look slow.

use std::{
    future::Future,
    io::{self, IoSlice},
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, PoisonError,
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    time::{Instant, Sleep},
};

/// How a client must take a response.
#[derive(Debug, Clone, Copy)]
pub struct ResponsePace {
    /// Longest wait for the client to take any byte (judged at deadlines, so a cut comes
    /// one to two of these after the last byte taken).
    pub idle: Duration,
    /// Bytes per second of waiting the client must take; 0 turns the rate rule off.
    pub min_rate: u64,
    /// How much waiting makes up one window of the rate rule; zero also turns it off.
    pub window: Duration,
}

impl ResponsePace {
    fn rate_rule(&self) -> bool {
        self.min_rate > 0 && !self.window.is_zero()
    }
}

/// Why a response was cut off: the `io::Error` a write fails with carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ResponseCut {
    #[error("client stopped reading the response")]
    Idle,
    #[error("client read the response below the minimum rate")]
    TooSlow,
}

impl ResponseCut {
    /// The metric label and log field.
    pub fn reason(self) -> &'static str {
        match self {
            ResponseCut::Idle => "idle",
            ResponseCut::TooSlow => "too_slow",
        }
    }

    /// The cut behind a connection's error, if that is why it ended.
    pub fn of(e: &(dyn std::error::Error + 'static)) -> Option<ResponseCut> {
        let mut source = Some(e);
        while let Some(err) = source {
            if let Some(io) = err.downcast_ref::<io::Error>() {
                return io
                    .get_ref()
                    .and_then(|i| i.downcast_ref::<ResponseCut>().copied());
            }
            source = err.source();
        }
        None
    }
}

/// The current window of the rate rule.
#[derive(Debug, Clone, Copy)]
struct Window {
    /// Waiting counted in it so far (not counting the wait under way, if any).
    waited: Duration,
    /// The client's acknowledged bytes when it began.
    acked: u64,
}

/// A write the socket refuses, under way.
#[derive(Debug, Clone, Copy)]
struct Wait {
    /// Up to when its time is counted in `Window::waited`.
    counted_to: Instant,
    /// The client's acknowledged bytes when last looked at, and when they last moved.
    acked: u64,
    moved_at: Instant,
}

/// A server-side client socket whose writes fail with a [`ResponseCut`] (as
/// `ErrorKind::TimedOut`) when the client takes a response too slowly.
///
/// What the client took is what its TCP stack acknowledged (`TCP_INFO`), not what we
/// wrote: the kernel's send buffer (up to megabytes) hides a reader's progress from the
/// writer, whom it wakes only once a good part of the buffer has drained.
pub struct ClientStream {
    inner: TcpStream,
    /// The socket, for [`PeerWatch`]es, until this is dropped (and the socket closed).
    watched: Arc<Mutex<Option<std::os::fd::RawFd>>>,
    pace: ResponsePace,
    /// Bytes written, what `acked` falls back to where `TCP_INFO` has no count.
    written: u64,
    window: Option<Window>,
    /// While the last write has been refused.
    waiting: Option<Wait>,
    /// The next deadline of a wait, made at the first one (most connections never wait:
    /// 10,000 long polls should not carry 10,000 timers).
    timer: Option<(Pin<Box<Sleep>>, Instant)>,
    /// Set, for good, once hyper's read buffer has grown past [`LARGE_READ`].
    large_read: Arc<AtomicBool>,
}

/// hyper's first read buffer: a read that fills a connection's buffer doubles it (up to its
/// bound), and so does a head that arrives in pieces (the buffer is reserved again for the
/// rest), and the connection keeps what it grew to while it lives, idle or not.
pub const LARGE_READ: usize = 8 * 1024;

impl ClientStream {
    pub fn new(inner: TcpStream, pace: ResponsePace) -> ClientStream {
        use std::os::fd::AsRawFd;
        ClientStream {
            watched: Arc::new(Mutex::new(Some(inner.as_raw_fd()))),
            inner,
            pace,
            written: 0,
            window: None,
            waiting: None,
            timer: None,
            large_read: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Asks whether the client has closed its side of this connection, for as long as the
    /// connection lives.
    pub fn watch(&self) -> PeerWatch {
        PeerWatch(self.watched.clone())
    }

    /// Set once hyper's read buffer of this connection has grown past [`LARGE_READ`].
    pub fn large_reads(&self) -> Arc<AtomicBool> {
        self.large_read.clone()
    }

    /// Bytes of responses the client has acknowledged.
    fn acked(&self) -> u64 {
        tcp_bytes_acked(&self.inner).unwrap_or(self.written)
    }

    /// Judges the window if its waiting is used up: a new one starts when the client took
    /// enough, else the response is cut.
    fn close_window_if_due(&mut self, acked: u64) -> Result<(), ResponseCut> {
        let Some(window) = self.window else {
            return Ok(());
        };
        if !self.pace.rate_rule() || window.waited < self.pace.window {
            return Ok(());
        }
        let needs = (self.pace.min_rate as f64 * self.pace.window.as_secs_f64()) as u64;
        if acked.saturating_sub(window.acked) < needs {
            return Err(ResponseCut::TooSlow);
        }
        self.window = Some(Window {
            waited: Duration::ZERO,
            acked,
        });
        Ok(())
    }

    /// A write went through: the wait under way, if any, ends. Its time stays counted in
    /// the window, which the next wait judges at once if it is used up.
    fn wrote(&mut self, n: usize) {
        self.written += n as u64;
        if let (Some(wait), Some(window)) = (self.waiting.take(), self.window.as_mut()) {
            window.waited += wait.counted_to.elapsed();
        }
    }

    /// The wait under way and its window, both begun now if there is none.
    fn current_wait(&mut self) -> (Wait, Window) {
        let wait = self.waiting.unwrap_or_else(|| {
            let now = Instant::now();
            Wait {
                counted_to: now,
                acked: self.acked(),
                moved_at: now,
            }
        });
        self.waiting = Some(wait);
        let window = *self.window.get_or_insert(Window {
            waited: Duration::ZERO,
            acked: wait.acked,
        });
        (wait, window)
    }

    /// The socket refused a write: arms the timer for the next deadline of this wait and
    /// fails once one passes with the client not having taken enough.
    fn wait(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        loop {
            let (wait, window) = self.current_wait();
            let idle_at = wait.moved_at + self.pace.idle;
            let deadline = if !self.pace.rate_rule() {
                idle_at
            } else {
                let left = self.pace.window.saturating_sub(window.waited);
                idle_at.min(wait.counted_to + left)
            };
            let (timer, at) = self
                .timer
                .get_or_insert_with(|| (Box::pin(tokio::time::sleep_until(deadline)), deadline));
            if *at != deadline {
                timer.as_mut().reset(deadline);
                *at = deadline;
            }
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let (now, acked) = (Instant::now(), self.acked());
            let moved_at = if acked > wait.acked {
                now
            } else {
                wait.moved_at
            };
            if now >= moved_at + self.pace.idle {
                return Poll::Ready(Err(cut_error(ResponseCut::Idle)));
            }
            self.waiting = Some(Wait {
                counted_to: now,
                acked,
                moved_at,
            });
            self.window = Some(Window {
                waited: window.waited + (now - wait.counted_to),
                ..window
            });
            if let Err(cut) = self.close_window_if_due(acked) {
                return Poll::Ready(Err(cut_error(cut)));
            }
        }
    }

    fn write_with(
        &mut self,
        cx: &mut Context<'_>,
        write: impl FnOnce(Pin<&mut TcpStream>, &mut Context<'_>) -> Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match write(Pin::new(&mut self.inner), cx) {
            Poll::Ready(Ok(n)) => {
                self.wrote(n);
                Poll::Ready(Ok(n))
            }
            Poll::Pending => self.wait(cx),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        }
    }
}

impl Drop for ClientStream {
    fn drop(&mut self) {
        // Before the socket closes (the fields drop after this): its number may be reused.
        *self.watched.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }
}

/// Whether a connection's client has gone: it closed its side (a FIN) or reset the
/// connection. A request that waits on something else (a long poll) asks this of the socket
/// itself: hyper reads a connection only to find its next request, and stops while it holds
/// one (pipelined, or a stray CRLF after the head) or an unread body; it then never sees the
/// close, and the request would keep its place for its whole wait. A client that half-closes
/// (shuts down only its sending side) counts as gone: its TCP state is the same. hyper also
/// counts it gone while it reads (`half_close` is off); one that pipelined a request behind
/// its long poll before half-closing now gets neither answer (its cursor has not moved). A
/// peer that vanished without a FIN or reset (a dropped NAT entry) stays established; not on
/// Linux, no client is ever found gone here.
#[derive(Clone)]
pub struct PeerWatch(Arc<Mutex<Option<std::os::fd::RawFd>>>);

impl PeerWatch {
    pub fn gone(&self) -> bool {
        let socket = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match *socket {
            // Held under the lock: the socket cannot close meanwhile.
            Some(fd) => tcp_state(fd).is_some_and(|state| state != TCP_ESTABLISHED),
            None => true,
        }
    }
}

const TCP_ESTABLISHED: u8 = 1;

/// The TCP state of socket `fd` (`TCP_INFO`'s `tcpi_state`), or `None` where it cannot be read.
#[cfg(target_os = "linux")]
fn tcp_state(fd: std::os::fd::RawFd) -> Option<u8> {
    tcp_info(fd, std::mem::offset_of!(libc::tcp_info, tcpi_state) + 1).map(|i| i.tcpi_state)
}

/// What the peer has acknowledged of everything sent on `socket` (Linux ≥ 4.1).
#[cfg(target_os = "linux")]
fn tcp_bytes_acked(socket: &TcpStream) -> Option<u64> {
    use std::os::fd::AsRawFd;
    let needed = std::mem::offset_of!(libc::tcp_info, tcpi_bytes_acked) + 8;
    tcp_info(socket.as_raw_fd(), needed).map(|i| i.tcpi_bytes_acked)
}

/// Socket `fd`'s `TCP_INFO`, when the kernel filled at least its first `needed` bytes.
#[cfg(target_os = "linux")]
fn tcp_info(fd: std::os::fd::RawFd, needed: usize) -> Option<libc::tcp_info> {
    // SAFETY: getsockopt writes at most `len` bytes into `info`, a plain C struct for which
    // all zeroes is a valid value, and reports in `len` how many it wrote; `fd` is open (the
    // callers hold it, see `PeerWatch`).
    unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let rc = libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        );
        (rc == 0 && len as usize >= needed).then_some(info)
    }
}

#[cfg(not(target_os = "linux"))]
fn tcp_state(_: std::os::fd::RawFd) -> Option<u8> {
    None
}

#[cfg(not(target_os = "linux"))]
fn tcp_bytes_acked(_: &TcpStream) -> Option<u64> {
    None
}

fn cut_error(cut: ResponseCut) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, cut)
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // Room offered past the first buffer's means it grew (a head of 60 KiB sent 2 KiB at
        // a time grew it without one large read: the diff's review); a read that fills the
        // first buffer makes hyper double it for the next.
        let (before, offered) = (buf.filled().len(), buf.remaining());
        let read = Pin::new(&mut this.inner).poll_read(cx, buf);
        if offered > LARGE_READ || buf.filled().len() - before >= LARGE_READ {
            this.large_read.store(true, Ordering::Relaxed);
        }
        read
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .write_with(cx, |io, cx| io.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .write_with(cx, |io, cx| io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;

    use tokio::{io::AsyncWriteExt, net::TcpListener};

    use super::*;

    /// Runs `test` on a runtime of its own thread, failing if it takes over 20 s (a poll that
    /// never returns would otherwise hang the test run); also returns the CPU time the
    /// thread spent.
    fn within_20s<T: Send + 'static>(
        test: impl Future<Output = T> + Send + 'static,
    ) -> (T, Duration) {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let out = rt.block_on(test);
            let _ = tx.send((out, thread_cpu()));
        });
        rx.recv_timeout(Duration::from_secs(20))
            .expect("the write neither failed nor returned within 20 s")
    }

    fn thread_cpu() -> Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec into `ts`.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        assert_eq!(rc, 0);
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    /// Writes to a client that never reads until a write fails: why it failed.
    async fn cut_of_a_client_that_never_reads(pace: ResponsePace) -> ResponseCut {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let mut stream = ClientStream::new(server, pace);
        let chunk = vec![7u8; 1 << 20];
        let error = loop {
            if let Err(e) = stream.write_all(&chunk).await {
                break e;
            }
        };
        drop(client);
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        ResponseCut::of(&error).expect("a ResponseCut")
    }

    #[test]
    fn a_client_that_never_reads_is_cut_by_the_rule_that_comes_first() {
        let ms = Duration::from_millis;
        let pace = |idle, min_rate, window| ResponsePace {
            idle,
            min_rate,
            window,
        };
        let cases = [
            ("idle only", pace(ms(300), 0, ms(100)), ResponseCut::Idle),
            (
                "rate first",
                pace(ms(60_000), 1 << 20, ms(200)),
                ResponseCut::TooSlow,
            ),
            // A zero window turns the rate rule off: the wait must sleep until the idle
            // deadline, not wake at every timer tick for a window deadline that is always now
            // (that took ~90 ms of CPU here in those 2 s, the sleep ~1.5 ms).
            (
                "zero window",
                pace(ms(2_000), 8192, Duration::ZERO),
                ResponseCut::Idle,
            ),
        ];
        for (name, pace, expected) in cases {
            let (cut, cpu) = within_20s(cut_of_a_client_that_never_reads(pace));
            assert_eq!(cut, expected, "{name}");
            assert!(cpu < ms(30), "{name}: {cpu:?} of CPU while waiting");
        }
    }
}
