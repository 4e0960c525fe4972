//! Ports for the services, proxies and servers a test starts and binds later.
//!
//! The kernel's `bind(0)` hands out a port from the ephemeral range, and a port the caller
//! closes again goes back to it: until the child binds it, another test's `bind(0)` can be
//! given the same one, or a client connection can take it as its local port (either makes
//! the child fail to bind, or lets a readiness probe reach another test's service). These
//! ports come from below the ephemeral range (Linux's default starts at 32768), where
//! neither happens, each at most once in this process, and only one found free.

use std::sync::atomic::{AtomicU32, Ordering};

const FIRST: u32 = 20_000;
const LAST: u32 = 32_000;

/// A loopback port no one listens on, not handed out before by this process.
pub fn free_port() -> u16 {
    // Processes started one after another begin at different places.
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id() % (LAST - FIRST),
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in FIRST..LAST {
        let port = (FIRST + NEXT.fetch_add(1, Ordering::Relaxed) % (LAST - FIRST)) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {FIRST}..{LAST}");
}
