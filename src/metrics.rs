//! Prometheus metrics, all under the `pending_uploads_` namespace (README lists them).
//! One process-wide registry: instrumented code anywhere calls `metrics()`.

use std::{sync::LazyLock, time::Instant};

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use sqlx::PgPool;

pub struct Metrics {
    registry: Registry,
    pub files_staged: IntCounterVec,
    pub bytes_staged: IntCounterVec,
    pub files_fetched: IntCounterVec,
    pub bytes_served: IntCounterVec,
    pub files_acked: IntCounterVec,
    pub files_swept: IntCounterVec,
    pub sweep_runs: IntCounterVec,
    pub orphans_deleted: IntCounter,
    pub storage_errors: IntCounterVec,
    pub storage_fallbacks: IntCounterVec,
    pub backfill_rows: IntCounterVec,
    pub http_request_duration: HistogramVec,
    pub storage_operation_duration: HistogramVec,
    pub upload_size: Histogram,
    pub pending_rows: IntGaugeVec,
    pub pending_bytes: IntGaugeVec,
    pub oldest_unacked_age: Gauge,
    pub uploads_in_progress: IntGauge,
}

const NS: &str = "pending_uploads";

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help).namespace(NS), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help).namespace(NS), labels).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn histogram(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: Vec<f64>,
) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help)
            .namespace(NS)
            .buckets(buckets),
        labels,
    )
    .expect("valid metric");
    r.register(Box::new(h.clone())).expect("unique metric");
    h
}

impl Metrics {
    fn new() -> Metrics {
        let r = Registry::new();
        let latency = vec![
            0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ];
        let sizes = prometheus::exponential_buckets(1024.0, 4.0, 9).expect("valid buckets");
        let orphans_deleted = IntCounter::with_opts(
            Opts::new(
                "orphans_deleted_total",
                "Objects without a row removed by the sweep",
            )
            .namespace(NS),
        )
        .expect("valid metric");
        r.register(Box::new(orphans_deleted.clone()))
            .expect("unique metric");
        let oldest_unacked_age = Gauge::with_opts(
            Opts::new(
                "oldest_unacked_age_seconds",
                "Age of the oldest unacked, unexpired upload",
            )
            .namespace(NS),
        )
        .expect("valid metric");
        r.register(Box::new(oldest_unacked_age.clone()))
            .expect("unique metric");
        let uploads_in_progress = IntGauge::with_opts(
            Opts::new(
                "uploads_in_progress",
                "Upload requests holding one of the MAX_CONCURRENT_UPLOADS slots",
            )
            .namespace(NS),
        )
        .expect("valid metric");
        r.register(Box::new(uploads_in_progress.clone()))
            .expect("unique metric");
        Metrics {
            files_staged: counter(
                &r,
                "files_staged_total",
                "Files in upload requests, by outcome",
                &["backend", "outcome"],
            ),
            bytes_staged: counter(
                &r,
                "bytes_staged_total",
                "Bytes of staged files",
                &["backend"],
            ),
            files_fetched: counter(
                &r,
                "files_fetched_total",
                "Content requests, by outcome",
                &["backend", "outcome"],
            ),
            bytes_served: counter(
                &r,
                "bytes_served_total",
                "Bytes streamed to workspaces",
                &["backend"],
            ),
            files_acked: counter(
                &r,
                "files_acked_total",
                "Acks, by outcome (acked, repeat, raced)",
                &["outcome"],
            ),
            files_swept: counter(
                &r,
                "files_swept_total",
                "Rows removed by the sweeper",
                &["backend", "reason"],
            ),
            sweep_runs: counter(
                &r,
                "sweep_runs_total",
                "Sweep passes, by outcome",
                &["outcome"],
            ),
            orphans_deleted,
            storage_errors: counter(
                &r,
                "storage_errors_total",
                "Failed storage operations",
                &["backend", "operation"],
            ),
            storage_fallbacks: counter(
                &r,
                "storage_fallbacks_total",
                "Reads served from the bytea copy because S3 failed",
                &["operation"],
            ),
            backfill_rows: counter(
                &r,
                "backfill_rows_total",
                "Rows handled by backfill, by outcome",
                &["outcome"],
            ),
            http_request_duration: histogram(
                &r,
                "http_request_duration_seconds",
                "HTTP request latency (until the response head)",
                &["route", "method", "status"],
                latency.clone(),
            ),
            storage_operation_duration: histogram(
                &r,
                "storage_operation_duration_seconds",
                "Storage operation latency",
                &["backend", "operation"],
                latency,
            ),
            upload_size: {
                let h = Histogram::with_opts(
                    HistogramOpts::new("upload_size_bytes", "Size of staged files")
                        .namespace(NS)
                        .buckets(sizes),
                )
                .expect("valid metric");
                r.register(Box::new(h.clone())).expect("unique metric");
                h
            },
            pending_rows: gauge(
                &r,
                "pending_rows",
                "Rows by state (unfetched, fetched, acked)",
                &["state"],
            ),
            pending_bytes: gauge(
                &r,
                "pending_bytes",
                "Bytes by state (unfetched, fetched, acked)",
                &["state"],
            ),
            oldest_unacked_age,
            uploads_in_progress,
            registry: r,
        }
    }
}

impl Metrics {
    /// The fully qualified name of every metric family (histograms without their
    /// `_bucket`/`_sum`/`_count` series).
    pub fn names(&self) -> Vec<String> {
        use prometheus::core::Collector;
        let collectors: [&dyn Collector; 18] = [
            &self.files_staged,
            &self.bytes_staged,
            &self.files_fetched,
            &self.bytes_served,
            &self.files_acked,
            &self.files_swept,
            &self.sweep_runs,
            &self.orphans_deleted,
            &self.storage_errors,
            &self.storage_fallbacks,
            &self.backfill_rows,
            &self.http_request_duration,
            &self.storage_operation_duration,
            &self.upload_size,
            &self.pending_rows,
            &self.pending_bytes,
            &self.oldest_unacked_age,
            &self.uploads_in_progress,
        ];
        collectors
            .iter()
            .flat_map(|c| c.desc())
            .map(|d| d.fq_name.clone())
            .collect()
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

pub fn metrics() -> &'static Metrics {
    &METRICS
}

/// The Prometheus text exposition of every metric.
pub fn render() -> String {
    let mut buf = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&metrics().registry.gather(), &mut buf) {
        tracing::warn!(error = %e, "could not encode metrics");
    }
    String::from_utf8(buf).unwrap_or_default()
}

/// Times a storage operation and counts its failure.
pub async fn storage_op<T, E>(
    backend: &str,
    operation: &str,
    fut: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let started = Instant::now();
    let result = fut.await;
    let m = metrics();
    m.storage_operation_duration
        .with_label_values(&[backend, operation])
        .observe(started.elapsed().as_secs_f64());
    if result.is_err() {
        m.storage_errors
            .with_label_values(&[backend, operation])
            .inc();
    }
    result
}

/// Refreshes the backlog gauges with one cheap query.
pub async fn refresh_gauges(pool: &PgPool) -> Result<(), sqlx::Error> {
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT CASE WHEN acked_at IS NOT NULL THEN 'acked'
                     WHEN fetched_at IS NOT NULL THEN 'fetched' ELSE 'unfetched' END,
                count(*), COALESCE(sum(size_bytes), 0)::bigint
         FROM pending_uploads WHERE expires_at > now() GROUP BY 1",
    )
    .fetch_all(pool)
    .await?;
    let m = metrics();
    for state in ["unfetched", "fetched", "acked"] {
        let (n, bytes) = rows
            .iter()
            .find(|r| r.0 == state)
            .map(|r| (r.1, r.2))
            .unwrap_or((0, 0));
        m.pending_rows.with_label_values(&[state]).set(n);
        m.pending_bytes.with_label_values(&[state]).set(bytes);
    }
    let oldest: Option<f64> = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM now() - min(created_at))::float8 FROM pending_uploads
         WHERE acked_at IS NULL AND expires_at > now()",
    )
    .fetch_one(pool)
    .await?;
    m.oldest_unacked_age.set(oldest.unwrap_or(0.0));
    Ok(())
}
