//! Wiring: builds the state from configuration and runs the subcommands.

use std::{
    sync::{atomic::AtomicBool, Arc},
    time::Duration,
};

use anyhow::Context;
use axum::Router;
use sqlx::PgPool;
use tokio::net::TcpListener;

use crate::{
    auth::Auth,
    config::{DbArgs, ServeArgs, StorageArgs, SweepArgs},
    db,
    http::{self, AppState},
    storage::{ByteaBackend, S3Backend, Storage},
    sweep::Sweeper,
};

/// How long in-flight requests may take to finish after SIGTERM.
const DRAIN_DEADLINE: Duration = Duration::from_secs(30);
/// How often the backlog gauges are recomputed.
const GAUGE_REFRESH: Duration = Duration::from_secs(15);

pub async fn connect_and_migrate(db_args: &DbArgs) -> anyhow::Result<PgPool> {
    let pool = db::connect(db_args)
        .await
        .context("connecting to DATABASE_URL")?;
    db::migrate(&pool).await.context("applying migrations")?;
    Ok(pool)
}

pub async fn storage(args: &StorageArgs, pool: &PgPool) -> anyhow::Result<Storage> {
    let s3 = S3Backend::from_args(args).await;
    Storage::new(
        args.pending_uploads_backend,
        ByteaBackend::new(pool.clone()),
        s3,
    )
    .map_err(anyhow::Error::msg)
}

pub fn sweeper(args: &SweepArgs, pool: &PgPool, storage: &Storage) -> Sweeper {
    Sweeper {
        pool: pool.clone(),
        storage: storage.clone(),
        ack_retention: args.ack_retention.0,
        batch_size: args.sweep_batch_size.max(1),
        orphan_grace: args.orphan_grace.0,
        orphan_page_size: crate::sweep::ORPHAN_PAGE_SIZE,
    }
}

/// A running service: its router and the sweeper to start beside it.
pub struct Service {
    pub router: Router,
    pub state: AppState,
    pub sweeper: Sweeper,
}

pub async fn build(args: &ServeArgs) -> anyhow::Result<Service> {
    args.limits.validate().map_err(anyhow::Error::msg)?;
    // Register every metric now rather than inside the first request that touches one.
    crate::metrics::metrics();
    let pool = connect_and_migrate(&args.db).await?;
    let storage = storage(&args.storage, &pool).await?;
    let spool_dir = args.spool_dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&spool_dir)
        .with_context(|| format!("creating SPOOL_DIR {}", spool_dir.display()))?;
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .timeout(args.push_timeout.0)
        .build()
        .context("building the push HTTP client")?;
    let state = AppState {
        auth: Auth::new(args.admin_token.clone(), pool.clone()),
        pool: pool.clone(),
        storage: storage.clone(),
        limits: args.limits.clone(),
        spool_dir,
        http,
        accepting: Arc::new(AtomicBool::new(true)),
        upload_slots: Arc::new(tokio::sync::Semaphore::new(
            args.max_concurrent_uploads.max(1),
        )),
        body_idle_timeout: args.body_idle_timeout.0,
    };
    let router = http::router(state.clone(), &args.cors_allowed_origins);
    let sweeper = sweeper(&args.sweep, &pool, &storage);
    Ok(Service {
        router,
        state,
        sweeper,
    })
}

pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let service = build(&args).await?;
    let listener = TcpListener::bind(args.bind_addr)
        .await
        .with_context(|| format!("binding {}", args.bind_addr))?;
    tracing::info!(
        addr = %listener.local_addr()?, backend = args.storage.pending_uploads_backend.as_str(),
        admin = args.admin_token.is_some(), "pending-uploads listening"
    );
    let sweep = tokio::spawn(service.sweeper.clone().run_forever(args.sweep_interval.0));
    let gauges = tokio::spawn(refresh_gauges_forever(service.state.pool.clone()));
    let accepting = service.state.accepting.clone();
    let shutdown = async move {
        shutdown_signal().await;
        accepting.store(false, std::sync::atomic::Ordering::SeqCst);
        tracing::info!("shutdown requested: draining");
    };
    let timeouts = http::ServeTimeouts {
        drain_deadline: DRAIN_DEADLINE,
        response_idle: args.response_idle_timeout.0,
    };
    http::serve(listener, service.router, shutdown, timeouts).await?;
    sweep.abort();
    gauges.abort();
    service.state.pool.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// Keeps the backlog gauges fresh for /metrics.
async fn refresh_gauges_forever(pool: PgPool) {
    let mut ticker = tokio::time::interval(GAUGE_REFRESH);
    loop {
        ticker.tick().await;
        if let Err(e) = crate::metrics::refresh_gauges(&pool).await {
            tracing::debug!(error = %e, "could not refresh backlog gauges");
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
