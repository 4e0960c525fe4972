//! Wiring: builds the state from configuration and runs the subcommands.

use std::{
    sync::{atomic::AtomicBool, Arc},
    time::Duration,
};

use anyhow::Context;
use axum::Router;
use sqlx::PgPool;
use tokio::{net::TcpListener, time::Instant};

use crate::{
    auth::Auth,
    config::{DbArgs, ServeArgs, StorageArgs, SweepArgs},
    db::{self, Db},
    fetched::FetchedStamps,
    http::{self, body::Pace, conn::ResponsePace, AppState, Deadlines, ServeOptions, Shared},
    longpoll::{Announcer, Hub},
    push_target::PushPolicy,
    slots::Slots,
    spool::SpoolMemory,
    staging::{Quota, Stager},
    storage::{ByteaBackend, S3Backend, Storage},
    stored::Stored,
    sweep::Sweeper,
};

/// How long in-flight requests may take to finish after SIGTERM.
const DRAIN_DEADLINE: Duration = Duration::from_secs(30);
/// How long a start-up waits on the database before it says that it is waiting.
const DATABASE_WAIT_NOTICE: Duration = Duration::from_secs(2);
/// How often the backlog gauges, and what MAX_STORED_BYTES counts, are read again at most.
const GAUGE_REFRESH: Duration = Duration::from_secs(15);
/// The backlog gauges' read aggregates the upload table, so its cost grows with it: 0.13 s at
/// 218,000 uploads (with the activity count it then had), once every GAUGE_REFRESH for the
/// fleet; the registry count reads the workspaces (up to MAX_WORKSPACES) on every replica.
/// The fleet waits this many times as long as the last backlog read took before the next, and
/// a replica as long as its own last read took, so the reads keep to 1/21 of a database core
/// (per replica for the registry count) however large the tables grow.
const GAUGE_SHARE: u32 = 20;
/// How long the backlog gauges' read may take, when DEPENDENCY_TIMEOUT is shorter: its time
/// grows with the table (86 ms at 520,000 upload rows), no request waits on it, and
/// GAUGE_SHARE paces it.
const BACKLOG_READ_DEADLINE: Duration = Duration::from_secs(120);
/// How long the fleet's reading of the backlog stands before a replica's call reads the table
/// again: a little under GAUGE_REFRESH, so that a replica alone reads it at each of its turns.
const BACKLOG_READING_LASTS: Duration = Duration::from_secs(14);

pub async fn connect_and_migrate(db_args: &DbArgs) -> anyhow::Result<PgPool> {
    let pool = connect_checked(db_args).await?;
    db::migrate(&pool).await.context("applying migrations")?;
    Ok(pool)
}

async fn connect_checked(db_args: &DbArgs) -> anyhow::Result<PgPool> {
    db_args.validate().map_err(anyhow::Error::msg)?;
    let mut connect = std::pin::pin!(db::connect(db_args, db_args.dependency_timeout.0));
    // A database that is down is waited for (DEPENDENCY_TIMEOUT, up to 7 days, and one more
    // attempt as long, see `db::connect`): a line says so once the wait is noticeable, so an
    // operator is not left with a silent process.
    let connected = tokio::select! {
        connected = &mut connect => connected,
        () = tokio::time::sleep(DATABASE_WAIT_NOTICE) => {
            tracing::warn!(
                event = "database_waiting",
                database = %db::describe(&db_args.database_url.0),
                timeout = ?db_args.dependency_timeout.0,
                "the database does not answer yet: waiting for it (DEPENDENCY_TIMEOUT)"
            );
            connect.await
        }
    };
    connected.context("connecting to DATABASE_URL")
}

/// SPOOL_DIR, made if missing (the system temp dir when unset): where `serve` spools
/// uploads and `backfill` its copies. It must take a spool file, as a spool makes one: a
/// folder that could not (read-only, immutable, `/proc`) was taken, and then every upload
/// over SPOOL_MEMORY_PER_REQUEST answered 503 "retry shortly" for ever, with /readyz green
/// and log lines that did not name the folder (a red team).
pub fn spool_dir(configured: Option<std::path::PathBuf>) -> anyhow::Result<std::path::PathBuf> {
    let dir = configured.unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("creating SPOOL_DIR {}", dir.display()))?;
    tempfile::tempfile_in(&dir)
        .with_context(|| format!("SPOOL_DIR {} cannot hold spool files", dir.display()))?;
    Ok(dir)
}

/// The database handle of a subcommand: connected, migrated, bounded by DEPENDENCY_TIMEOUT.
pub async fn connect_db(db_args: &DbArgs) -> anyhow::Result<Db> {
    let pool = connect_and_migrate(db_args).await?;
    Ok(Db::new(pool, db_args.dependency_timeout.0))
}

/// [`connect_db`] for a run that must change nothing (`backfill --dry-run`): the schema as it
/// is, no migration applied.
pub async fn connect_db_as_is(db_args: &DbArgs) -> anyhow::Result<Db> {
    let pool = connect_checked(db_args).await?;
    Ok(Db::new(pool, db_args.dependency_timeout.0))
}

pub async fn storage(args: &StorageArgs, db: &Db) -> anyhow::Result<Storage> {
    let s3 = S3Backend::from_args(args, db.timeout()).await;
    if s3.is_none() {
        warn_of_rows_only_in_s3(db).await;
    }
    if let Some(s3) = &s3 {
        if !s3.prefix_is_private() {
            tracing::warn!(
                prefix = %s3.prefix(),
                "PENDING_UPLOADS_S3_PREFIX is empty or does not end in '/': the orphan reconciliation will not run (it could reach other applications' objects)"
            );
        }
    }
    Storage::new(
        args.pending_uploads_backend,
        ByteaBackend::new(db.clone(), args.download_read_ahead_bytes),
        s3,
    )
    .map_err(anyhow::Error::msg)
}

/// Rows whose bytes live only in S3 cannot be read without a bucket (a fleet rolled back to
/// `bytea` without its S3 settings): said once at start-up, as they would otherwise only show
/// as 503s on their downloads. Best effort (the check must not stop a start).
async fn warn_of_rows_only_in_s3(db: &Db) {
    let found = db
        .run(|c| {
            Box::pin(async move {
                sqlx::query_scalar::<_, bool>(
                    "SELECT EXISTS (SELECT 1 FROM pending_uploads
                                    WHERE s3_key IS NOT NULL AND content IS NULL)",
                )
                .fetch_one(&mut *c)
                .await
            })
        })
        .await;
    if let Ok(true) = found {
        tracing::warn!(
            "some rows' bytes live only in S3 and PENDING_UPLOADS_S3_BUCKET is not set: their downloads will answer 503 until it is"
        );
    }
}

/// How long an upload stays pending unacked (`pending_uploads.expires_at`'s default).
const UPLOAD_LIFE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

pub fn sweeper(args: &SweepArgs, db: &Db, storage: &Storage) -> Sweeper {
    // Taken without a word before: with 0 a `sweep` removed the activity rows of files still
    // pending, and their workspace's feed never showed them (a red team).
    if args.activity_retention.0 < UPLOAD_LIFE {
        tracing::warn!(
            activity_retention = ?args.activity_retention.0,
            "ACTIVITY_RETENTION is shorter than an upload's 24 h: the activity rows of files still pending are swept, and a workspace polling its feed misses them (its pending list still shows them)"
        );
    }
    Sweeper {
        db: db.clone(),
        storage: storage.clone(),
        ack_retention: args.ack_retention.0,
        activity_retention: args.activity_retention.0,
        batch_size: args.sweep_batch_size,
        batch_bytes: args.sweep_batch_bytes,
        orphan_grace: args.orphan_grace.0,
        orphan_page_size: crate::sweep::ORPHAN_PAGE_SIZE,
        resume_after: Default::default(),
        replica: uuid::Uuid::new_v4(),
        after_pass: Default::default(),
    }
}

/// A running service: its router and the sweeper to start beside it.
pub struct Service {
    pub router: Router,
    pub state: AppState,
    pub sweeper: Sweeper,
}

pub async fn build(args: &ServeArgs) -> anyhow::Result<Service> {
    args.validate().map_err(anyhow::Error::msg)?;
    // Register every metric now rather than inside the first request that touches one.
    crate::metrics::metrics();
    let db = connect_db(&args.db).await?;
    let storage = storage(&args.storage, &db).await?;
    let spool_dir = spool_dir(args.spool_dir.clone())?;
    let push = http::push::Pusher::new(
        PushPolicy::new(
            args.push_allowed_networks.clone(),
            args.max_concurrent_registration_lookups as usize,
            args.slot_share_per_client,
        ),
        http::push::PushLimits {
            timeout: args.push_timeout.0,
            answer_timeout: args.push_answer_timeout.0,
            answer_max_bytes: args.push_answer_max_bytes,
            max_request_bytes: args.limits.max_request_bytes,
        },
    )
    .context("building the push HTTP client")?;
    let d = &args.deadlines;
    let upload_slots = Slots::new(
        args.max_concurrent_uploads,
        args.max_concurrent_uploads_per_workspace,
        args.slot_share_per_client,
        &crate::metrics::metrics().uploads_in_progress,
    );
    let state = AppState::new(Shared {
        auth: Auth::new(args.admin_token(), db.clone()),
        stager: Stager {
            db: db.clone(),
            storage: storage.clone(),
            quota: Quota {
                max_bytes: args.limits.max_pending_bytes_per_workspace,
                max_files: args.limits.max_pending_files_per_workspace,
            },
            announcer: Announcer::new(args.batch_max_keys as usize),
            orphan_grace: args.sweep.orphan_grace.0,
        },
        db: db.clone(),
        storage: storage.clone(),
        limits: args.limits.clone(),
        spool_dir,
        spool_memory: SpoolMemory::new(
            args.spool_memory_per_request as usize,
            args.spool_memory_total as usize,
        ),
        push,
        accepting: Arc::new(AtomicBool::new(true)),
        push_slots: upload_slots.sharing_workspaces(
            args.max_concurrent_push_uploads,
            args.slot_share_per_client,
            &crate::metrics::metrics().uploads_in_progress,
        ),
        upload_slots,
        download_slots: Slots::new(
            args.max_concurrent_downloads,
            args.max_concurrent_downloads_per_workspace,
            args.slot_share_per_client,
            &crate::metrics::metrics().downloads_in_progress,
        ),
        long_poll_slots: Slots::new(
            args.max_long_polls as usize,
            args.max_long_polls_per_workspace as usize,
            args.slot_share_per_client,
            &crate::metrics::metrics().long_polls_waiting,
        ),
        deadlines: Deadlines {
            request_body: d.request_body_timeout.0,
            upload: Pace {
                idle: d.body_idle_timeout.0,
                min_rate: d.body_min_rate,
                grace: d.body_rate_grace.0,
                whole: d.upload_body_timeout.0,
            },
        },
        hub: Hub::default(),
        fetched: FetchedStamps::new(args.batch_max_keys as usize),
        registrations: crate::rate::RateLimit::per_minute(args.registrations_per_minute),
        registrations_per_client: crate::rate::PerClient::per_minute(
            args.registrations_per_minute_per_client,
        ),
        trusted_proxies: args.trusted_proxies.clone(),
        ready: Default::default(),
        stored: Arc::new(
            crate::stored::Stored::new(
                args.limits.max_stored_bytes,
                args.limits.stored_share_per_client,
            )
            .with_activity_retention(args.sweep.activity_retention.0),
        ),
        workspace_cap: Arc::new(crate::http::registry::WorkspaceCap::new(
            args.max_workspaces,
        )),
    });
    let router = http::router(state.clone(), &args.cors_allowed_origins);
    let sweeper = sweeper(&args.sweep, &db, &storage);
    Ok(Service {
        router,
        state,
        sweeper,
    })
}

/// Connection settings of `http::serve` from the configuration.
pub fn serve_options(args: &ServeArgs, drain_deadline: Duration) -> ServeOptions {
    ServeOptions {
        drain_deadline,
        response: ResponsePace {
            idle: args.deadlines.response_idle_timeout.0,
            min_rate: args.deadlines.response_min_rate,
            window: args.deadlines.response_rate_window.0,
        },
        header_read: args.deadlines.header_read_timeout.0,
        max_connections: args.max_connections,
        per_client: crate::http::peer::ConnectionsPerClient::new(
            args.max_connections_per_client as usize,
            args.trusted_proxies.clone(),
        ),
        max_large_buffer_connections: args.max_large_buffer_connections as usize,
    }
}

pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let fd_limit = raise_fd_limit();
    let service = build(&args).await?;
    warn_if_too_few_descriptors(&args, fd_limit);
    warn_if_a_share_is_below_a_request(&args, service.state.stored.share());
    warn_if_long_polls_can_take_every_connection(&args);
    let listener =
        listen_on(args.bind_addr).with_context(|| format!("binding {}", args.bind_addr))?;
    if args.admin_token.is_some() && args.admin_token().is_none() {
        tracing::warn!("ADMIN_TOKEN is set but blank: no admin access");
    }
    tracing::info!(
        addr = %listener.local_addr()?, backend = args.storage.pending_uploads_backend.as_str(),
        admin = args.admin_token().is_some(), "pending-uploads listening"
    );
    let sweep = tokio::spawn(service.sweeper.clone().run_forever(args.sweep_interval.0));
    let drops = tokio::spawn(crate::log_budget::report_drops_forever());
    let db = service.state.db.clone();
    let stored = tokio::spawn(refresh_stored_forever(
        service.state.db.clone(),
        service.state.stored.clone(),
        service.state.workspace_cap.clone(),
        service.sweeper.after_pass.clone(),
    ));
    let gauges = tokio::spawn(refresh_backlog_gauges_forever(service.state.db.clone()));
    let listen = tokio::spawn(
        service
            .state
            .hub
            .clone()
            .listen_forever(db.pool().clone(), db.timeout()),
    );
    let batches = Batches::start(&service.state);
    let state = service.state.clone();
    let (first_signal, first_at) = tokio::sync::oneshot::channel();
    let shutdown = async move {
        shutdown_signal().await;
        let _ = first_signal.send(tokio::time::Instant::now());
        state.stop_accepting();
        tracing::info!("shutdown requested: draining");
    };
    let cut_drain = async move {
        match first_at.await {
            Ok(first) => second_signal(first).await,
            Err(_) => std::future::pending().await,
        }
    };
    http::serve(
        listener,
        service.router,
        shutdown,
        cut_drain,
        serve_options(&args, DRAIN_DEADLINE),
    )
    .await?;
    sweep.abort();
    gauges.abort();
    stored.abort();
    drops.abort();
    listen.abort();
    // What queued while the connections drained still goes out.
    batches.stop().await;
    db.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// The tasks that write what requests queue for batching (`crate::batch`): long-poll
/// announcements and fetched_at stamps. Dropped, they stop; `stop` first writes what is left.
pub struct Batches {
    state: AppState,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Batches {
    pub fn start(state: &AppState) -> Batches {
        let db = state.db.clone();
        Batches {
            state: state.clone(),
            tasks: vec![
                tokio::spawn(state.stager.announcer.clone().run_forever(db.clone())),
                tokio::spawn(state.fetched.clone().run_forever(db)),
            ],
        }
    }

    pub async fn stop(mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
            // Once it is gone, a batch it was writing is back in its queue (batch::InFlight).
            let _ = task.await;
        }
        self.state.stager.announcer.flush(&self.state.db).await;
        self.state.fetched.flush(&self.state.db).await;
    }
}

impl Drop for Batches {
    fn drop(&mut self) {
        self.tasks.iter().for_each(|t| t.abort());
    }
}

/// Connections past `MAX_CONNECTIONS` wait in the listen backlog (README). `TcpListener::bind`
/// asks for 128 (mio's), and a connect past it has its SYN dropped and tried again a second
/// later: 3,000 agents reconnecting at once took 5 s, where 4,096 (the kernel caps it at
/// `net.core.somaxconn`) takes them as they come.
const LISTEN_BACKLOG: u32 = 4096;

fn listen_on(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    // As `TcpListener::bind` does: a restarted replica binds while old connections linger.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Long polls hold a socket each: lift the soft descriptor limit to the hard one. Returns the
/// limit now in force, when it could be read.
fn raise_fd_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return None;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                ..lim
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    Some(lim.rlim_cur)
}

/// A descriptor limit below what MAX_CONNECTIONS needs fails accepts well before it (each
/// failure logged), while the operator believes the replica takes MAX_CONNECTIONS: said once
/// at start-up, with the numbers.
fn warn_if_too_few_descriptors(args: &ServeArgs, limit: Option<u64>) {
    // Client connections, the database's (requests' and the pool's), an upload's spool
    // files (its files' shared one, and the last file's when its PUT follows the receive)
    // and S3 connection, a push relay's connection to its workspace and the second handle
    // that resets it (none is kept after the relay), and room for the rest (the listener,
    // logs).
    let needed = args.max_connections as u64
        + 2 * u64::from(args.db.database_max_connections)
        + 3 * args.max_concurrent_uploads as u64
        + 2 * args.max_concurrent_push_uploads as u64
        + 256;
    if let Some(limit) = limit.filter(|l| *l < needed) {
        tracing::warn!(
            limit,
            needed,
            max_connections = args.max_connections,
            "the open-file limit is below what MAX_CONNECTIONS needs: accepts will fail first (raise `ulimit -n`, or lower MAX_CONNECTIONS)"
        );
    }
}

/// Waiting long polls hold their connections: as many as MAX_CONNECTIONS of them leave none
/// for other requests (README: keep it below). Taken without a word before (a red team).
fn warn_if_long_polls_can_take_every_connection(args: &ServeArgs) {
    if args.max_long_polls >= args.max_connections as u64 {
        tracing::warn!(
            max_long_polls = args.max_long_polls,
            max_connections = args.max_connections,
            "MAX_LONG_POLLS is not below MAX_CONNECTIONS: waiting long polls can hold every connection, and other requests then wait"
        );
    }
}

/// A client whose share is whole may stage one request larger than it (so a share below
/// MAX_REQUEST_BYTES does not lower the per-file cap), which lets it take up to
/// MAX_REQUEST_BYTES a day however small its share: said at start-up (a red team staged
/// 9× its share in one request).
fn warn_if_a_share_is_below_a_request(args: &ServeArgs, share: u64) {
    let request = args.limits.max_request_bytes;
    if share > 0 && share < request {
        tracing::warn!(
            share,
            max_request_bytes = request,
            "STORED_SHARE_PER_CLIENT of MAX_STORED_BYTES is below MAX_REQUEST_BYTES: a client whose share is whole may stage one request over it a day"
        );
    }
}

/// When the next gauge read may start, the last having begun at `began` and taken `took`:
/// at the earliest (a sweep pass asks for one) and at the latest (GAUGE_REFRESH).
fn gauge_reads_after(began: Instant, took: Duration) -> (Instant, Instant) {
    let earliest = began + took * (GAUGE_SHARE + 1);
    (earliest, earliest.max(began + GAUGE_REFRESH))
}

/// Keeps what the fleet keeps for MAX_STORED_BYTES, and the registry's size for
/// MAX_WORKSPACES, fresh: every `GAUGE_REFRESH`, and after every sweep pass (which frees
/// room), each read paced by [`GAUGE_SHARE`].
async fn refresh_stored_forever(
    db: Db,
    stored: Arc<Stored>,
    workspaces: Arc<crate::http::registry::WorkspaceCap>,
    swept: Arc<tokio::sync::Notify>,
) {
    let (mut earliest, mut next) = (Instant::now(), Instant::now());
    let mut registry_full = false;
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(next) => {}
            () = swept.notified() => tokio::time::sleep_until(earliest).await,
        }
        let began = Instant::now();
        let reading = stored.reading();
        match db.run(|c| Box::pin(db::uploads::stored(c))).await {
            Ok(rows) => reading.done(rows.stored_bytes().max(0) as u64),
            Err(e) => tracing::warn!(
                error = %e,
                "could not read what the fleet stores: MAX_STORED_BYTES's figure not refreshed"
            ),
        }
        if workspaces.max() > 0 {
            workspaces.reading();
            let counted = db.run(|c| Box::pin(db::workspaces::count(c))).await;
            if let Ok(n) = counted {
                let full = workspaces.read(n.max(0) as u64);
                // Once when refusals start and once when they end, not a line per refusal.
                if full != registry_full {
                    registry_full = full;
                    match full {
                        true => tracing::warn!(event = "registry_full", workspaces = n, max = workspaces.max(), "MAX_WORKSPACES reached: first registrations without the admin token get 503"),
                        false => tracing::info!(event = "registry_room", workspaces = n, "the registry has room again"),
                    }
                }
            }
        }
        (earliest, next) = gauge_reads_after(began, began.elapsed());
    }
}

/// Keeps the backlog gauges (rows and bytes by state, the oldest unacked age) fresh for
/// /metrics: every `GAUGE_REFRESH`, the fleet's last reading, which the call that finds it
/// stale reads again for every replica (one at a time, paced by [`GAUGE_SHARE`], allowed
/// [`BACKLOG_READ_DEADLINE`]). A task of its own: however long the read takes, what
/// MAX_STORED_BYTES counts is read on time.
async fn refresh_backlog_gauges_forever(db: Db) {
    let deadline = BACKLOG_READ_DEADLINE.max(db.timeout());
    loop {
        let began = Instant::now();
        let read = db.run_within(deadline, |c| {
            Box::pin(db::uploads::backlog(c, BACKLOG_READING_LASTS, GAUGE_SHARE))
        });
        match read.await {
            Ok(Some(backlog)) => crate::metrics::set_backlog(&backlog),
            // Another replica is taking the fleet's first reading.
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "could not read the backlog: gauges not refreshed")
            }
        }
        tokio::time::sleep_until(gauge_reads_after(began, began.elapsed()).1).await;
    }
}

/// SIGINT, SIGTERM, or SIGHUP (a closed terminal: it stopped the process with no drain) unless
/// the process started with SIGHUP ignored: a handler would replace the ignore that `nohup`
/// set, and closing the terminal would then stop what the operator meant to outlive it.
pub(crate) async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut term) = signal(SignalKind::terminate()) else {
            let _ = ctrl_c.await;
            return;
        };
        // Registered only when it was not ignored; without it (ignored, or a registration
        // that failed), SIGTERM and SIGINT still stop the process.
        let mut hup = match hangup_ignored() {
            false => signal(SignalKind::hangup()).ok(),
            true => None,
        };
        let hangup = async {
            match hup.as_mut() {
                Some(hup) => hup.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
            _ = hangup => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Whether SIGHUP was ignored when the process started. Read once, before the first handler
/// is installed: after it, the disposition is the handler's.
#[cfg(unix)]
fn hangup_ignored() -> bool {
    static IGNORED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *IGNORED.get_or_init(|| {
        // SAFETY: a query (no new action): the kernel writes the current one into `old`.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            libc::sigaction(libc::SIGHUP, std::ptr::null(), &mut old) == 0
                && old.sa_sigaction == libc::SIG_IGN
        }
    })
}

/// One event can deliver its signal twice (a terminal's SIGHUP reaches the process and again
/// through its shell; a wrapper forwards the Ctrl-C the terminal already sent): a signal this
/// soon after the first is that first one again.
const SIGNAL_REPEAT: std::time::Duration = std::time::Duration::from_secs(1);

/// A shutdown signal that is not a repeat of the first, taken at `first`: the operator asks
/// again, and the drain ends at once.
pub(crate) async fn second_signal(first: tokio::time::Instant) {
    loop {
        shutdown_signal().await;
        if first.elapsed() >= SIGNAL_REPEAT {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauge_reads_are_paced_by_their_cost() {
        let began = Instant::now();
        // a quick read: the next at GAUGE_REFRESH, one a sweep asks for almost at once
        let (earliest, next) = gauge_reads_after(began, Duration::from_millis(10));
        assert_eq!(earliest, began + Duration::from_millis(210));
        assert_eq!(next, began + GAUGE_REFRESH);
        // a read of 2 s: nothing for 42 s, whatever asks
        let (earliest, next) = gauge_reads_after(began, Duration::from_secs(2));
        assert_eq!(
            (earliest, next),
            (
                began + Duration::from_secs(42),
                began + Duration::from_secs(42)
            )
        );
    }
}
