use clap::Parser;

fn main() -> std::process::ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pending-uploads: starting the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let cli = pending_uploads::cli::Cli::parse();
        pending_uploads::cli::init_tracing(&cli.log_format, cli.log_lines_per_second);
        let log_format = cli.log_format.clone();
        match pending_uploads::cli::run(cli).await {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                // Once: a JSON line for a collector, else (or when RUST_LOG hides errors)
                // plain text.
                match log_format == "json" && tracing::enabled!(tracing::Level::ERROR) {
                    true => tracing::error!(error = format!("{e:#}"), "fatal"),
                    false => eprintln!("pending-uploads: {e:#}"),
                }
                std::process::ExitCode::FAILURE
            }
        }
    })
}

/// jemalloc, not glibc's malloc. A connection's 8 KiB read and write buffers (hyper) sit mostly
/// unwritten while a long poll waits; glibc writes a header into every chunk and its free
/// lists into freed ones, jemalloc keeps its bookkeeping apart, so untouched pages stay out of
/// RSS. Measured with 10,000 waiting long polls: 173 MiB with glibc, 115 MiB with jemalloc.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings, unless `MALLOC_CONF` overrides them:
/// - freed pages go back to the kernel after a second, from a background thread, not from
///   requests;
/// - two arenas: spool writes run on many blocking threads, and each arena keeps its own free
///   pages;
/// - blocks of 512 KiB and more come from jemalloc's own arena for big blocks, which returns
///   them at once instead of keeping them a second: with 16 × 20 MiB S3 uploads in flight
///   peak RSS was 56 MiB without it and 45 MiB with it (hyper's read buffer then grew to
///   512 KiB; it stops below this threshold now, `http/mod.rs`), for ~5 % of large-transfer
///   throughput (set `oversize_threshold:8388608`, jemalloc's default, to trade back).
///   Small uploads' big buffers (spool, statement parameters, write buffer) and bytea reads'
///   buffers, which would come back as fresh pages every time, have an arena of their own
///   that keeps them (`arena.rs`, which knows this threshold).
#[export_name = "malloc_conf"]
static MALLOC_CONF: ConfString = ConfString(
    c"background_thread:true,narenas:2,dirty_decay_ms:1000,muzzy_decay_ms:0,oversize_threshold:524288"
        .as_ptr(),
);

/// A C string jemalloc reads at start-up (`const char *malloc_conf`).
#[repr(transparent)]
struct ConfString(*const std::ffi::c_char);

// SAFETY: it points at a static, immutable C string.
unsafe impl Sync for ConfString {}
