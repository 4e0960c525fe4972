//! A jemalloc arena of the service's own for the big buffers of small uploads and of bytea
//! reads.
//!
//! jemalloc serves blocks of 512 KiB and more from its arena for big blocks
//! (`oversize_threshold`, see `main.rs`), and any arena hands a freed block of its
//! `oversize_threshold` or more back to the kernel at once, whatever its decay: that keeps
//! large uploads' peak RSS down. But a small upload (its body in memory, up to
//! `SPOOL_MEMORY_PER_REQUEST`, sent as a statement parameter) makes three such blocks per MiB
//! it carries: its spool, sqlx's parameter buffer and the connection's write buffer. Each came
//! back as fresh pages: 1 MiB uploads at concurrency 1 took ~1,260 page faults and 5.2–6.0 ms
//! of the service's CPU each, more than the rest of the upload together. bytea downloads did
//! the same with sqlx's read buffer, which grows past each 256 KiB slice it receives: ~150
//! faults per 1 MiB download.
//!
//! Those blocks come from an arena of their own ([`big_block`], [`big_blocks`]) that keeps freed
//! blocks of any size until its decay (a second, as the ordinary arenas) returns them, so the
//! next request finds their pages mapped. What it can keep is what was in flight at once:
//! small uploads' bodies (bounded by `SPOOL_MEMORY_TOTAL` and the one-statement read-back
//! limit), the database pool's buffers, and the slices of downloads being sent (bounded by
//! `MAX_CONCURRENT_DOWNLOADS`, a slice sent and one fetched ahead each, or up to 1 MiB within
//! the read-ahead budget).

use std::{
    ffi::{c_void, CStr, CString},
    future::Future,
    pin::Pin,
    sync::OnceLock,
    task::{Context, Poll},
};

/// Larger than any block this service allocates.
const KEEP_ALL: usize = 1 << 40;

/// `mallctl(name)`: reads the control's old value into `old` and writes `new`, each when
/// given; whether jemalloc accepted it.
///
/// # Safety
/// `R` and `W` must be the types the control reads and writes (jemalloc's manual).
unsafe fn mallctl<R, W>(name: &CStr, old: Option<&mut R>, new: Option<&mut W>) -> bool {
    let mut old_len = std::mem::size_of::<R>();
    let (old_ptr, old_len_ptr) = match old {
        Some(old) => ((old as *mut R).cast::<c_void>(), &mut old_len as *mut usize),
        None => (std::ptr::null_mut(), std::ptr::null_mut()),
    };
    let (new_ptr, new_len) = match new {
        Some(new) => ((new as *mut W).cast::<c_void>(), std::mem::size_of::<W>()),
        None => (std::ptr::null_mut(), 0),
    };
    // SAFETY: the pointers come from live references of the sizes given; the caller vouches
    // for the types.
    unsafe {
        tikv_jemalloc_sys::mallctl(name.as_ptr(), old_ptr, old_len_ptr, new_ptr, new_len) == 0
    }
}

/// The arena's index, or `None` when jemalloc would not create one (allocations then come
/// from the usual arenas).
fn arena() -> Option<u32> {
    static ARENA: OnceLock<Option<u32>> = OnceLock::new();
    *ARENA.get_or_init(|| {
        let mut index: u32 = 0;
        // SAFETY: `arenas.create` reads an unsigned, the new arena's index.
        if !unsafe { mallctl::<u32, ()>(c"arenas.create", Some(&mut index), None) } {
            return None;
        }
        // Freed blocks at least an arena's `oversize_threshold` are purged at once, whatever
        // the decay; in this arena no block is: they go back after a second unused.
        let name = CString::new(format!("arena.{index}.oversize_threshold")).ok()?;
        // SAFETY: `arena.<i>.oversize_threshold` takes a size_t.
        if !unsafe { mallctl::<(), usize>(&name, None, Some(&mut { KEEP_ALL })) } {
            return None;
        }
        keep_bound(index);
        Some(index)
    })
}

/// jemalloc purges every free page of an arena whose last thread leaves it, and each
/// [`big_block`] leaves it: a thread that stays bound keeps the pages for the arena's decay.
fn keep_bound(index: u32) {
    let (bound, wait) = std::sync::mpsc::channel();
    let keeper = std::thread::Builder::new()
        .name("upload-arena".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            let _ = bound.send(bind(index));
            loop {
                std::thread::park();
            }
        });
    if keeper.is_ok() {
        let _ = wait.recv();
    }
}

/// Binds the calling thread to arena `index` and returns the one it was bound to.
fn bind(mut index: u32) -> Option<u32> {
    let mut old: u32 = 0;
    // SAFETY: `thread.arena` reads and writes an unsigned.
    unsafe { mallctl(c"thread.arena", Some(&mut old), Some(&mut index)) }.then_some(old)
}

/// The calling thread bound to the upload arena until dropped.
struct Bound(Option<u32>);

impl Bound {
    fn new() -> Self {
        Bound(arena().and_then(bind))
    }
}

impl Drop for Bound {
    fn drop(&mut self) {
        if let Some(previous) = self.0 {
            bind(previous);
        }
    }
}

/// The arena's pages in bytes: in use, and freed but kept until its decay returns them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub in_use: u64,
    pub kept: u64,
}

/// What the arena holds now, or `None` without one (or when jemalloc will not say).
pub fn usage() -> Option<Usage> {
    let index = arena()?;
    let pages = |stat: &str| -> Option<u64> {
        let name = CString::new(format!("stats.arenas.{index}.{stat}")).ok()?;
        let mut n: usize = 0;
        // SAFETY: `stats.arenas.<i>.pactive` and `.pdirty` read a size_t.
        unsafe { mallctl::<usize, ()>(&name, Some(&mut n), None) }.then_some(n as u64)
    };
    let mut epoch: u64 = 1;
    let mut page: usize = 0;
    // SAFETY: `epoch` reads and writes a u64 (writing refreshes the statistics); `arenas.page`
    // reads a size_t.
    let read = unsafe {
        mallctl(c"epoch", Some(&mut { epoch }), Some(&mut epoch))
            && mallctl::<usize, ()>(c"arenas.page", Some(&mut page), None)
    };
    if !read {
        return None;
    }
    Some(Usage {
        in_use: pages("pactive")? * page as u64,
        kept: pages("pdirty")? * page as u64,
    })
}

/// jemalloc's `oversize_threshold` in `main.rs`: smaller blocks come from the ordinary arenas,
/// which keep them anyway.
const OVERSIZE: usize = 512 * 1024;

/// Runs `f`, which allocates a block of `size` bytes, with its allocations served from the
/// upload arena when the block is big enough to need it (binding a thread to an arena
/// and back costs ~15 µs, as much as a 1 KiB upload's whole spool: not done for those).
pub fn big_block<T>(size: usize, f: impl FnOnce() -> T) -> T {
    if size < OVERSIZE {
        return f();
    }
    let _bound = Bound::new();
    f()
}

/// About the block sqlx's read buffer grows to (it doubles) while it receives a row carrying
/// `bytes`: a download's 256 KiB slices make blocks of 512 KiB and more, each a fresh one
/// outside the arena.
pub fn read_buffer(bytes: u64) -> usize {
    usize::try_from(bytes).map_or(usize::MAX, |b| b.saturating_mul(2))
}

/// Awaits `future`, which allocates blocks of about `size` bytes, with its allocations served
/// from the upload arena when they are big enough to need it (bound again on every
/// poll: other tasks run on the thread in between).
pub async fn big_blocks<F: Future>(size: usize, future: F) -> F::Output {
    if size < OVERSIZE {
        return future.await;
    }
    Polled(Box::pin(future)).await
}

struct Polled<F>(Pin<Box<F>>);

impl<F: Future> Future for Polled<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let _bound = Bound::new();
        self.0.as_mut().poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The arena a block was allocated from.
    fn arena_of(ptr: *const u8) -> u32 {
        let mut index: u32 = u32::MAX;
        let mut ptr = ptr.cast::<c_void>();
        // SAFETY: `arenas.lookup` takes a pointer and reads an unsigned.
        assert!(unsafe { mallctl(c"arenas.lookup", Some(&mut index), Some(&mut ptr)) });
        index
    }

    /// Page faults of the calling thread so far.
    fn minor_faults() -> i64 {
        // SAFETY: getrusage fills the struct it is given.
        unsafe {
            let mut usage: libc::rusage = std::mem::zeroed();
            libc::getrusage(libc::RUSAGE_THREAD, &mut usage);
            usage.ru_minflt
        }
    }

    /// A block of `BLOCK` bytes filled and dropped, `ROUNDS` times; the page faults of all but
    /// the first.
    fn refaults(alloc: impl Fn() -> Vec<u8>) -> i64 {
        let fill = |mut v: Vec<u8>| {
            v.resize(v.capacity(), 1);
            std::hint::black_box(&v);
        };
        fill(alloc());
        let before = minor_faults();
        for _ in 0..ROUNDS {
            fill(alloc());
        }
        minor_faults() - before
    }

    /// Over the oversize threshold of the service (512 KiB) and of this test binary
    /// (jemalloc's default, 8 MiB).
    const BLOCK: usize = 16 << 20;
    const ROUNDS: i64 = 10;
    const PAGES: i64 = (BLOCK / 4096) as i64;

    #[test]
    fn big_blocks_come_from_the_arena_only_inside() {
        let arena = arena().expect("jemalloc creates an arena");
        let inside: Vec<u8> = big_block(1 << 20, || Vec::with_capacity(1 << 20));
        let small: Vec<u8> = big_block(1 << 10, || Vec::with_capacity(1 << 10));
        let outside: Vec<u8> = Vec::with_capacity(1 << 20);
        assert_eq!(arena_of(inside.as_ptr()), arena);
        assert_ne!(arena_of(outside.as_ptr()), arena);
        assert_ne!(arena_of(small.as_ptr()), arena);
    }

    #[test]
    fn usage_counts_a_block_in_use_then_kept() {
        let block: Vec<u8> = big_block(BLOCK, || vec![1; BLOCK]);
        let held = usage().expect("jemalloc reports the arena's pages");
        assert!(held.in_use >= BLOCK as u64, "{held:?}");
        drop(block);
        // Other tests may take the kept pages meanwhile: then they are in use.
        let after = usage().expect("jemalloc reports the arena's pages");
        assert!(after.in_use + after.kept >= BLOCK as u64, "{after:?}");
    }

    #[test]
    fn a_freed_block_is_kept_for_the_next() {
        let elsewhere = refaults(|| Vec::with_capacity(BLOCK));
        // Bound and unbound around each allocation, as a spool is; filled and freed outside.
        let kept = refaults(|| big_block(BLOCK, || Vec::with_capacity(BLOCK)));
        assert!(
            elsewhere >= ROUNDS * PAGES / 2,
            "{elsewhere}: big blocks outside the arena are returned at once"
        );
        assert!(kept < PAGES, "{kept} page faults refilling a kept block");
    }

    #[tokio::test]
    async fn a_statement_s_blocks_are_kept_across_polls() {
        // Allocated in one poll, freed in a later one: in between the thread leaves the arena,
        // and jemalloc purges an arena its last thread leaves.
        let round = || {
            big_blocks(BLOCK, async {
                let mut v: Vec<u8> = Vec::with_capacity(BLOCK);
                v.resize(BLOCK, 1);
                tokio::task::yield_now().await;
                std::hint::black_box(&v);
            })
        };
        round().await;
        let before = minor_faults();
        for _ in 0..ROUNDS {
            round().await;
        }
        let faults = minor_faults() - before;
        assert!(faults < PAGES, "{faults} page faults over {ROUNDS} rounds");
    }

    #[test]
    fn download_slices_bind_and_short_ranges_do_not() {
        assert!(read_buffer(crate::storage::bytea::READ_CHUNK) >= OVERSIZE);
        assert!(read_buffer(1024) < OVERSIZE);
        assert_eq!(read_buffer(u64::MAX), usize::MAX);
    }

    #[tokio::test]
    async fn small_blocks_stay_in_the_ordinary_arenas() {
        let v = big_blocks(1024, async { Vec::<u8>::with_capacity(OVERSIZE) }).await;
        assert_ne!(arena_of(v.as_ptr()), arena().expect("an arena"));
        let v = big_blocks(OVERSIZE, async { Vec::<u8>::with_capacity(OVERSIZE) }).await;
        assert_eq!(arena_of(v.as_ptr()), arena().expect("an arena"));
    }
}
