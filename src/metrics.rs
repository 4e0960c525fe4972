//! Prometheus metrics, all under the `pending_uploads_` namespace (README lists them).
//! One process-wide registry: instrumented code anywhere calls `metrics()`.

use std::{sync::LazyLock, time::Instant};

use prometheus::{
    core::Collector, Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::db::uploads::Backlog;

pub struct Metrics {
    registry: Registry,
    names: Vec<String>,
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
    pub puts_while_receiving: IntCounterVec,
    pub backfill_rows: IntCounterVec,
    pub responses_cut: IntCounterVec,
    pub connections_refused: IntCounter,
    pub connections_shed: IntCounter,
    pub large_buffer_closes: IntCounter,
    pub log_lines_dropped: IntCounter,
    pub http_request_duration: HistogramVec,
    pub storage_operation_duration: HistogramVec,
    pub upload_size: Histogram,
    pub pending_rows: IntGaugeVec,
    pub pending_bytes: IntGaugeVec,
    pub oldest_unacked_age: Gauge,
    pub uploads_in_progress: IntGauge,
    pub downloads_in_progress: IntGauge,
    pub long_polls_waiting: IntGauge,
    pub registration_lookups: IntGauge,
    pub long_poll_wakes: IntCounterVec,
    pub spool_memory_reserved: IntGauge,
    pub upload_arena: IntGaugeVec,
    pub stored_bytes: IntGauge,
    pub stored_bytes_max: IntGauge,
    pub storage_share_refusals: IntCounter,
    pub storage_share_clients: IntGauge,
}

const NS: &str = "pending_uploads";

/// Registers collectors in one registry, remembering each family's full name.
struct Registrar {
    registry: Registry,
    names: Vec<String>,
}

impl Registrar {
    fn add<C: Collector + Clone + 'static>(&mut self, c: C) -> C {
        self.names
            .extend(c.desc().iter().map(|d| d.fq_name.clone()));
        // Names are constants below: a clash is a programming error caught by the first test.
        self.registry
            .register(Box::new(c.clone()))
            .expect("metric names are unique");
        c
    }

    fn counter(&mut self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.add(
            IntCounterVec::new(Opts::new(name, help).namespace(NS), labels).expect("valid metric"),
        )
    }

    fn gauge(&mut self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        self.add(
            IntGaugeVec::new(Opts::new(name, help).namespace(NS), labels).expect("valid metric"),
        )
    }

    fn histogram(
        &mut self,
        name: &str,
        help: &str,
        labels: &[&str],
        buckets: Vec<f64>,
    ) -> HistogramVec {
        let opts = HistogramOpts::new(name, help)
            .namespace(NS)
            .buckets(buckets);
        self.add(HistogramVec::new(opts, labels).expect("valid metric"))
    }
}

/// Latency buckets, seconds.
const LATENCY: [f64; 13] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

impl Metrics {
    fn new() -> Metrics {
        let mut r = Registrar {
            registry: Registry::new(),
            names: Vec::new(),
        };
        let opts = |name: &str, help: &str| Opts::new(name, help).namespace(NS);
        let sizes = prometheus::exponential_buckets(1024.0, 4.0, 9).expect("valid buckets");
        let upload_size = HistogramOpts::new("upload_size_bytes", "Size of staged files")
            .namespace(NS)
            .buckets(sizes);
        Metrics {
            files_staged: r.counter(
                "files_staged_total",
                "Files in upload requests, by outcome",
                &["backend", "outcome"],
            ),
            bytes_staged: r.counter("bytes_staged_total", "Bytes of staged files", &["backend"]),
            files_fetched: r.counter(
                "files_fetched_total",
                "Content requests, by outcome",
                &["backend", "outcome"],
            ),
            bytes_served: r.counter(
                "bytes_served_total",
                "Bytes streamed to workspaces",
                &["backend"],
            ),
            files_acked: r.counter(
                "files_acked_total",
                "Acks, by where the row's bytes live and outcome (acked, repeat, raced)",
                &["backend", "outcome"],
            ),
            files_swept: r.counter(
                "files_swept_total",
                "Rows removed by the sweeper",
                &["backend", "reason"],
            ),
            sweep_runs: r.counter("sweep_runs_total", "Sweep passes, by outcome", &["outcome"]),
            orphans_deleted: r.add(
                IntCounter::with_opts(opts(
                    "orphans_deleted_total",
                    "Objects without a row removed by the sweep",
                ))
                .expect("valid metric"),
            ),
            storage_errors: r.counter(
                "storage_errors_total",
                "Failed storage operations",
                &["backend", "operation"],
            ),
            storage_fallbacks: r.counter(
                "storage_fallbacks_total",
                "Reads served from the bytea copy because S3 failed",
                &["operation"],
            ),
            puts_while_receiving: r.counter(
                "s3_puts_while_receiving_total",
                "S3 PUTs started alongside their file's receive, by outcome: written, put_again (the file was put after its receive: a wrong size guess, a failed PUT), stalled (the server took no bytes: the upload got 503), stopped (the request failed first)",
                &["outcome"],
            ),
            backfill_rows: r.counter(
                "backfill_rows_total",
                "Rows handled by backfill, by outcome",
                &["outcome"],
            ),
            responses_cut: r.counter(
                "responses_cut_total",
                "Responses cut off because the client stopped reading (idle) or read below RESPONSE_MIN_RATE (too_slow)",
                &["reason"],
            ),
            connections_refused: r.add(
                IntCounter::with_opts(opts(
                    "connections_refused_total",
                    "Connections answered 429 and closed: their client had MAX_CONNECTIONS_PER_CLIENT open",
                ))
                .expect("valid metric"),
            ),
            connections_shed: r.add(
                IntCounter::with_opts(opts(
                    "connections_shed_total",
                    "Connections idle between requests closed to make room for a new one: every MAX_CONNECTIONS place was taken",
                ))
                .expect("valid metric"),
            ),
            large_buffer_closes: r.add(
                IntCounter::with_opts(opts(
                    "large_buffer_closes_total",
                    "Connections closed after their answer (a long poll on one answered at once): their read buffer had grown and MAX_LARGE_BUFFER_CONNECTIONS such were kept alive",
                ))
                .expect("valid metric"),
            ),
            log_lines_dropped: r.add(
                IntCounter::with_opts(opts(
                    "log_lines_dropped_total",
                    "Log lines dropped: their statement had written LOG_LINES_PER_SECOND this second",
                ))
                .expect("valid metric"),
            ),
            http_request_duration: r.histogram(
                "http_request_duration_seconds",
                "HTTP request latency (until the response head)",
                &["route", "method", "status"],
                LATENCY.to_vec(),
            ),
            storage_operation_duration: r.histogram(
                "storage_operation_duration_seconds",
                "Storage operation latency",
                &["backend", "operation"],
                LATENCY.to_vec(),
            ),
            upload_size: r.add(Histogram::with_opts(upload_size).expect("valid metric")),
            pending_rows: r.gauge(
                "pending_rows",
                "Rows by state (unfetched, fetched, acked)",
                &["state"],
            ),
            pending_bytes: r.gauge(
                "pending_bytes",
                "Bytes by state (unfetched, fetched, acked)",
                &["state"],
            ),
            oldest_unacked_age: r.add(
                Gauge::with_opts(opts(
                    "oldest_unacked_age_seconds",
                    "Age of the oldest unacked, unexpired upload",
                ))
                .expect("valid metric"),
            ),
            uploads_in_progress: r.add(
                IntGauge::with_opts(opts(
                    "uploads_in_progress",
                    "Upload requests holding a slot (MAX_CONCURRENT_UPLOADS, MAX_CONCURRENT_PUSH_UPLOADS)",
                ))
                .expect("valid metric"),
            ),
            downloads_in_progress: r.add(
                IntGauge::with_opts(opts(
                    "downloads_in_progress",
                    "Downloads holding one of the MAX_CONCURRENT_DOWNLOADS slots",
                ))
                .expect("valid metric"),
            ),
            long_polls_waiting: r.add(
                IntGauge::with_opts(opts(
                    "long_polls_waiting",
                    "Long polls (wait=) waiting, each holding one of the MAX_LONG_POLLS slots",
                ))
                .expect("valid metric"),
            ),
            registration_lookups: r.add(
                IntGauge::with_opts(opts(
                    "registration_lookups_in_progress",
                    "Push URL name lookups of registrations in progress, each holding one of the MAX_CONCURRENT_REGISTRATION_LOOKUPS places until the resolver answers",
                ))
                .expect("valid metric"),
            ),
            long_poll_wakes: r.counter(
                "long_poll_wakes_total",
                "Waiting long polls woken by a commit in their workspace: queried (the feed read again) or ignored (their filter cannot match what commits announce); shutdown wakes are neither",
                &["outcome"],
            ),
            spool_memory_reserved: r.add(
                IntGauge::with_opts(opts(
                    "spool_memory_reserved_bytes",
                    "Bytes of SPOOL_MEMORY_TOTAL reserved by upload requests and the files they hold in memory",
                ))
                .expect("valid metric"),
            ),
            stored_bytes: r.add(
                IntGauge::with_opts(opts(
                    "stored_bytes",
                    "What the fleet keeps as MAX_STORED_BYTES counts it (files, 512 bytes an upload row and 1,024 an activity row), as this replica last read it plus what it has in flight or committed since",
                ))
                .expect("valid metric"),
            ),
            stored_bytes_max: r.add(
                IntGauge::with_opts(opts(
                    "stored_bytes_max",
                    "MAX_STORED_BYTES (0: no bound)",
                ))
                .expect("valid metric"),
            ),
            storage_share_refusals: r.add(
                IntCounter::with_opts(opts(
                    "storage_share_refusals_total",
                    "Uploads refused (429 storage_share): their client had staged its STORED_SHARE_PER_CLIENT of MAX_STORED_BYTES",
                ))
                .expect("valid metric"),
            ),
            storage_share_clients: r.add(
                IntGauge::with_opts(opts(
                    "storage_share_clients",
                    "Client addresses whose STORED_SHARE_PER_CLIENT this replica keeps (at most 16,384)",
                ))
                .expect("valid metric"),
            ),
            upload_arena: r.gauge(
                "upload_arena_bytes",
                "Pages of the arena for small uploads' and bytea reads' big buffers: in_use, and kept (freed, returned after a second)",
                &["state"],
            ),
            names: r.names,
            registry: r.registry,
        }
        .with_alerted_series()
    }

    /// The series the alert rules take `increase`/`rate` of, at 0 from the start: a labelled
    /// family shows nothing until its first event, so "no sweep pass for 30 minutes" could
    /// never fire for a replica whose sweeper never ran, and the first error of a series
    /// was not an increase (its first sample was already 1).
    fn with_alerted_series(self) -> Metrics {
        for outcome in ["ok", "error"] {
            self.sweep_runs.with_label_values(&[outcome]);
        }
        let operations = [
            ("bytea", "get"),
            ("s3", "put"),
            ("s3", "get"),
            ("s3", "head"),
            ("s3", "delete"),
            ("s3", "list"),
        ];
        for (backend, operation) in operations {
            self.storage_errors.with_label_values(&[backend, operation]);
        }
        self.storage_fallbacks.with_label_values(&["get"]);
        self
    }

    /// The fully qualified name of every metric family (histograms without their
    /// `_bucket`/`_sum`/`_count` series).
    pub fn names(&self) -> Vec<String> {
        self.names.clone()
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

pub fn metrics() -> &'static Metrics {
    &METRICS
}

/// The Prometheus text exposition of every metric.
pub fn render() -> String {
    if let Some(usage) = crate::arena::usage() {
        let arena = &metrics().upload_arena;
        arena
            .with_label_values(&["in_use"])
            .set(usage.in_use as i64);
        arena.with_label_values(&["kept"]).set(usage.kept as i64);
    }
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
    storage_observed(backend, operation, started, result.is_ok());
    result
}

/// Records one storage operation begun at `started` (for calls [`storage_op`] cannot wrap).
pub fn storage_observed(backend: &str, operation: &str, started: Instant, ok: bool) {
    let m = metrics();
    m.storage_operation_duration
        .with_label_values(&[backend, operation])
        .observe(started.elapsed().as_secs_f64());
    if !ok {
        m.storage_errors
            .with_label_values(&[backend, operation])
            .inc();
    }
}

/// Sets the backlog gauges from a reading of the table.
pub fn set_backlog(backlog: &Backlog) {
    let m = metrics();
    for (state, n, bytes) in [
        ("unfetched", backlog.unfetched_rows, backlog.unfetched_bytes),
        ("fetched", backlog.fetched_rows, backlog.fetched_bytes),
        ("acked", backlog.acked_rows, backlog.acked_bytes),
    ] {
        m.pending_rows.with_label_values(&[state]).set(n);
        m.pending_bytes.with_label_values(&[state]).set(bytes);
    }
    m.oldest_unacked_age
        .set(backlog.oldest_unacked_secs.unwrap_or(0.0));
}
