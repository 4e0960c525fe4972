//! Runtime configuration: every setting is an environment variable with a flag of the same
//! meaning (12-factor). Secrets are never printed: `Debug` redacts them.

use std::{fmt, net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

use clap::{Args, ValueEnum};

/// Hard ceilings from SPEC §9 (the canvas's 100 MB, and the table's CHECK); configuration may
/// only lower them.
pub const MAX_FILE_BYTES: u64 = 104_857_600;
pub const MAX_REQUEST_BYTES: u64 = 104_857_600;
pub const MAX_FILES_PER_REQUEST: usize = 64;
pub const MAX_FILENAME_CHARS: usize = 100;

/// The default of `DOWNLOAD_READ_AHEAD_BYTES`: eight whole reads of 1 MiB at once.
pub const DOWNLOAD_READ_AHEAD_BYTES: u64 = 16 * 1024 * 1024;

/// Where new bytes are written (SPEC §6). Reads always follow the row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendMode {
    Bytea,
    Dual,
    S3,
}

impl BackendMode {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendMode::Bytea => "bytea",
            BackendMode::Dual => "dual",
            BackendMode::S3 => "s3",
        }
    }
}

/// A duration written `90s`, `5m`, `1h`, `2d`, `250ms`, or a bare number of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("invalid duration {s:?}: expected e.g. 90s, 5m, 1h or 30"))?;
        let secs = |per: u64| {
            n.checked_mul(per)
                .map(Duration::from_secs)
                .ok_or_else(|| format!("duration {s:?} is too large"))
        };
        let d = match unit {
            "" | "s" => secs(1)?,
            "ms" => Duration::from_millis(n),
            "m" => secs(60)?,
            "h" => secs(3600)?,
            "d" => secs(86_400)?,
            _ => {
                return Err(format!(
                    "invalid duration unit in {s:?}: use ms, s, m, h or d"
                ))
            }
        };
        Ok(HumanDuration(d))
    }
}

/// A secret string: readable by the code, never by a log line.
#[derive(Clone, Default)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl FromStr for Secret {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_string()))
    }
}

#[derive(Debug, Clone, Args)]
pub struct DbArgs {
    /// PostgreSQL connection string.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Secret,
    /// Maximum connections in the pool (1..=10000).
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 20,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub database_max_connections: u32,
    /// Longest wait on a stalled dependency (database, S3) before a request gets 503
    /// (10ms..=7d: half of it, in whole milliseconds, is the lock wait, and 0 is none).
    #[arg(long, env = "DEPENDENCY_TIMEOUT", default_value = "10s")]
    pub dependency_timeout: HumanDuration,
}

impl DbArgs {
    pub fn validate(&self) -> Result<(), String> {
        // sqlx reads any URL as PostgreSQL's: `mysql://…` got as far as its connect (an audit).
        // The value is not echoed: it may hold a password.
        let scheme = self.database_url.0.split_once("://").map(|(s, _)| s);
        if !scheme.is_some_and(|s| {
            s.eq_ignore_ascii_case("postgres") || s.eq_ignore_ascii_case("postgresql")
        }) {
            return Err("DATABASE_URL must be a postgres:// or postgresql:// URL".into());
        }
        let timeout = [("DEPENDENCY_TIMEOUT", self.dependency_timeout)];
        deadline_range(&timeout, Duration::from_millis(10), "10ms")
    }
}

/// Which optional checksums S3 requests carry. `when-supported`: a PUT carries the file's
/// SHA-256 (taken as its bytes arrived) for the server to check, and responses are checked
/// where the server sends a checksum; `when-required`: none, for S3-compatible servers that
/// reject them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum S3Checksum {
    WhenSupported,
    WhenRequired,
}

#[derive(Debug, Clone, Args)]
pub struct StorageArgs {
    /// Where new bytes are written: bytea (default), dual or s3.
    #[arg(long, env = "PENDING_UPLOADS_BACKEND", value_enum, default_value_t = BackendMode::Bytea)]
    pub pending_uploads_backend: BackendMode,
    /// Bytes that downloads of bytea ranges up to 1 MiB, read in one statement, may hold at
    /// once on this replica (each reserves 2 MiB while it reads, then keeps what it read until
    /// it is sent); beyond it a download reads 256 KiB slices. 0 turns whole reads off. At
    /// most 1 GiB.
    #[arg(long, env = "DOWNLOAD_READ_AHEAD_BYTES", default_value_t = DOWNLOAD_READ_AHEAD_BYTES,
          value_parser = clap::value_parser!(u64).range(0..=1 << 30))]
    pub download_read_ahead_bytes: u64,
    /// Bucket for S3-backed bytes; needed by dual and s3, and to read rows that have a key.
    #[arg(
        long = "pending-uploads-s3-bucket",
        visible_alias = "s3-bucket",
        env = "PENDING_UPLOADS_S3_BUCKET"
    )]
    pub s3_bucket: Option<String>,
    /// Key prefix inside the bucket.
    #[arg(
        long = "pending-uploads-s3-prefix",
        visible_alias = "s3-prefix",
        env = "PENDING_UPLOADS_S3_PREFIX",
        default_value = "pending-uploads/"
    )]
    pub s3_prefix: String,
    /// Path-style addressing (MinIO, LocalStack).
    #[arg(long = "pending-uploads-s3-force-path-style", visible_alias = "s3-force-path-style", env = "PENDING_UPLOADS_S3_FORCE_PATH_STYLE", default_value_t = true, action = clap::ArgAction::Set)]
    pub s3_force_path_style: bool,
    /// Optional S3 checksums: when-supported (a PUT carries the SHA-256) or when-required.
    #[arg(long = "pending-uploads-s3-checksum", visible_alias = "s3-checksum", env = "PENDING_UPLOADS_S3_CHECKSUM", value_enum, default_value_t = S3Checksum::WhenSupported)]
    pub s3_checksum: S3Checksum,
    /// PUTs a replica may run alongside their files' receive (`s3`, `dual`): each holds its
    /// buffers (about 1 MiB) while the receive holds its own; beyond this an upload's PUT
    /// waits for its receive to end. 0 turns it off.
    #[arg(long, env = "S3_PUTS_WHILE_RECEIVING", default_value_t = 1)]
    pub s3_puts_while_receiving: usize,
    /// S3 endpoint (standard AWS variable), an http or https URL; unset means AWS itself.
    #[arg(long, env = "AWS_ENDPOINT_URL", value_parser = endpoint_url)]
    pub aws_endpoint_url: Option<String>,
    /// Region (standard AWS variable); defaults to us-east-1 when the chain has none.
    #[arg(long, env = "AWS_REGION")]
    pub aws_region: Option<String>,
}

/// An S3 endpoint: an absolute http(s) URL with a host. Taken as it came before, `notaurl`
/// started a replica whose every S3 request failed (503s) (an audit).
fn endpoint_url(raw: &str) -> Result<String, String> {
    match url::Url::parse(raw) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.has_host() => Ok(raw.to_string()),
        _ => Err("not an absolute http or https URL".into()),
    }
}

#[derive(Debug, Clone, Args)]
pub struct LimitArgs {
    /// Largest accepted file, in bytes (at most 104857600).
    #[arg(long, env = "MAX_FILE_BYTES", default_value_t = MAX_FILE_BYTES)]
    pub max_file_bytes: u64,
    /// Largest accepted request body, in bytes (at most 104857600).
    #[arg(long, env = "MAX_REQUEST_BYTES", default_value_t = MAX_REQUEST_BYTES)]
    pub max_request_bytes: u64,
    /// Most files in one upload request (at most 64).
    #[arg(long, env = "MAX_FILES_PER_REQUEST", default_value_t = MAX_FILES_PER_REQUEST)]
    pub max_files_per_request: usize,
    /// Longest stored filename, in characters (at most 100).
    #[arg(long, env = "MAX_FILENAME_CHARS", default_value_t = MAX_FILENAME_CHARS)]
    pub max_filename_chars: usize,
    /// Upload bytes the fleet keeps, every workspace's, acked or not, before uploads get 503
    /// `storage_full` (0: no such bound).
    #[arg(long, env = "MAX_STORED_BYTES", default_value_t = 100 << 30)]
    pub max_stored_bytes: u64,
    /// Percent of MAX_STORED_BYTES one client address (an IPv6 client by its /48; internal
    /// addresses and trusted proxies not counted) may stage a day on this replica, before
    /// its uploads get 429 `storage_share` (0..=100; 0: no share). A whole share takes one
    /// request larger than it.
    #[arg(long, env = "STORED_SHARE_PER_CLIENT", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(0..=100))]
    pub stored_share_per_client: u64,
    /// Unacked bytes a workspace may have staged before uploads get 429.
    #[arg(long, env = "MAX_PENDING_BYTES_PER_WORKSPACE", default_value_t = 1 << 30)]
    pub max_pending_bytes_per_workspace: u64,
    /// Unacked files a workspace may have staged before uploads get 429.
    #[arg(
        long,
        env = "MAX_PENDING_FILES_PER_WORKSPACE",
        default_value_t = 10_000
    )]
    pub max_pending_files_per_workspace: u64,
    /// Live tokens a workspace may hold (1..=1024): minting more gets 429 until one is
    /// revoked. As many revoked ones are kept (the newest), older ones deleted.
    #[arg(long, env = "MAX_TOKENS_PER_WORKSPACE", default_value_t = 16,
          value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub max_tokens_per_workspace: u64,
}

impl LimitArgs {
    pub fn validate(&self) -> Result<(), String> {
        let checks = [
            ("MAX_FILE_BYTES", self.max_file_bytes, 1, MAX_FILE_BYTES),
            (
                "MAX_REQUEST_BYTES",
                self.max_request_bytes,
                1,
                MAX_REQUEST_BYTES,
            ),
            (
                "MAX_FILES_PER_REQUEST",
                self.max_files_per_request as u64,
                1,
                MAX_FILES_PER_REQUEST as u64,
            ),
            (
                "MAX_FILENAME_CHARS",
                self.max_filename_chars as u64,
                20,
                MAX_FILENAME_CHARS as u64,
            ),
        ];
        for (name, value, min, max) in checks {
            if value < min || value > max {
                return Err(format!("{name}={value} is out of range {min}..={max}"));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Args)]
pub struct SweepArgs {
    /// How long acked rows are kept (canvas previews), e.g. 1h; 0 sweeps them at once.
    #[arg(long, env = "ACK_RETENTION", default_value = "1h")]
    pub ack_retention: HumanDuration,
    /// Rows deleted per sweep statement (1..=100000).
    #[arg(long, env = "SWEEP_BATCH_SIZE", default_value_t = 500,
          value_parser = clap::value_parser!(i64).range(1..=100_000))]
    pub sweep_batch_size: i64,
    /// Inline (bytea) bytes deleted per sweep statement, plus one row's: deleting a row
    /// deletes its bytes in the statement, so this bounds how long one takes.
    #[arg(long, env = "SWEEP_BATCH_BYTES", default_value_t = 64 * 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(1..=(1u64 << 40)))]
    pub sweep_batch_bytes: u64,
    /// Objects with no row are deleted by the sweep once older than this.
    #[arg(long, env = "ORPHAN_GRACE", default_value = "1h")]
    pub orphan_grace: HumanDuration,
    /// This service's own chat_upload_receive activity rows are deleted once older than this.
    #[arg(long, env = "ACTIVITY_RETENTION", default_value = "7d")]
    pub activity_retention: HumanDuration,
}

impl SweepArgs {
    pub fn validate(&self) -> Result<(), String> {
        let periods = [
            ("ACK_RETENTION", self.ack_retention),
            ("ORPHAN_GRACE", self.orphan_grace),
            ("ACTIVITY_RETENTION", self.activity_retention),
        ];
        at_most(&periods, MAX_RETENTION, "3650d")
    }
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub db: DbArgs,
    #[command(flatten)]
    pub storage: StorageArgs,
    #[command(flatten)]
    pub limits: LimitArgs,
    #[command(flatten)]
    pub sweep: SweepArgs,
    /// Address to listen on.
    #[arg(long, env = "BIND_ADDR", default_value = "127.0.0.1:8080")]
    pub bind_addr: SocketAddr,
    /// The platform/canvas credential; unset means no admin access at all.
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<Secret>,
    /// How often the sweeper runs.
    #[arg(long, env = "SWEEP_INTERVAL", default_value = "5m")]
    pub sweep_interval: HumanDuration,
    /// Browser origins allowed by CORS, comma-separated.
    #[arg(long, env = "CORS_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub cors_allowed_origins: Vec<String>,
    /// Folder for spooling uploads (unnamed temp files; defaults to the system temp dir).
    #[arg(long, env = "SPOOL_DIR")]
    pub spool_dir: Option<PathBuf>,
    /// Upload requests whose body is at most this many bytes keep their files in memory
    /// instead of in SPOOL_DIR; a body without Content-Length keeps this much, then spills
    /// (at most 16777216; 0 spools every file to disk).
    #[arg(long, env = "SPOOL_MEMORY_PER_REQUEST", default_value_t = crate::spool::MEMORY_PER_REQUEST as u64,
          value_parser = clap::value_parser!(u64).range(0..=crate::spool::MEMORY_PER_REQUEST_MAX as u64))]
    pub spool_memory_per_request: u64,
    /// File bytes all upload requests of this replica keep in memory at once; a request that
    /// finds too little of it left spools to SPOOL_DIR (at most 1073741824).
    #[arg(long, env = "SPOOL_MEMORY_TOTAL", default_value_t = crate::spool::MEMORY_TOTAL as u64,
          value_parser = clap::value_parser!(u64).range(0..=1 << 30))]
    pub spool_memory_total: u64,
    /// Distinct entries each background batch queue keeps between two batches (workspaces
    /// to wake, downloads to stamp fetched_at on; a batch goes out at most every 5 ms). Past
    /// it, one notification wakes every long poll, and the further stamps are dropped
    /// (logged). At most 1000000.
    #[arg(long, env = "BATCH_MAX_KEYS", default_value_t = crate::batch::BATCH_MAX as u64,
          value_parser = clap::value_parser!(u64).range(1..=crate::batch::BATCH_MAX_LIMIT as u64))]
    pub batch_max_keys: u64,
    /// Upload requests handled at once by this replica; more get 503 with Retry-After.
    #[arg(long, env = "MAX_CONCURRENT_UPLOADS", default_value_t = 64)]
    pub max_concurrent_uploads: usize,
    /// Upload requests one workspace may have in progress on this replica; more get 429.
    #[arg(
        long,
        env = "MAX_CONCURRENT_UPLOADS_PER_WORKSPACE",
        default_value_t = 4
    )]
    pub max_concurrent_uploads_per_workspace: usize,
    /// Push uploads (relays to push workspaces) at once on this replica, apart from
    /// MAX_CONCURRENT_UPLOADS: anyone can register a push workspace that is slow to answer, and
    /// those must not take the slots staged uploads need. More get 503 with Retry-After.
    #[arg(long, env = "MAX_CONCURRENT_PUSH_UPLOADS", default_value_t = 16)]
    pub max_concurrent_push_uploads: usize,
    /// Downloads (content GETs) streaming at once from this replica; more get 503 with
    /// Retry-After. Each holds up to ~300 KiB while its client reads.
    #[arg(long, env = "MAX_CONCURRENT_DOWNLOADS", default_value_t = 256)]
    pub max_concurrent_downloads: usize,
    /// Downloads one workspace may have streaming from this replica; more get 429.
    #[arg(
        long,
        env = "MAX_CONCURRENT_DOWNLOADS_PER_WORKSPACE",
        default_value_t = 16
    )]
    pub max_concurrent_downloads_per_workspace: usize,
    /// Long polls (`wait=`) one workspace may hold waiting on this replica; more get 429 with
    /// Retry-After. Each upload wakes all of them into a feed query, so without a bound one
    /// workspace's pollers could turn its uploads into enough queries to take the pool
    /// (at most 1024).
    #[arg(long, env = "MAX_LONG_POLLS_PER_WORKSPACE", default_value_t = 32,
          value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub max_long_polls_per_workspace: u64,
    /// Long polls waiting at once on this replica; more get 503 with Retry-After. Below
    /// MAX_CONNECTIONS, so waiting polls cannot take the connections other requests need
    /// (10,000 waiting polls hold ~95 MiB; at most 1000000).
    #[arg(long, env = "MAX_LONG_POLLS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_long_polls: u64,
    /// Open client connections per replica. When all are taken, a new one closes the one idle
    /// longest between requests (for a second at least); with none idle it waits, and further
    /// connections wait in the listen backlog.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 16_384)]
    pub max_connections: usize,
    /// Open connections kept alive after a read buffer of theirs grew (a request, or requests,
    /// that came in faster than 8 KiB a read: an upload body, a body a refusal drained): hyper
    /// keeps what a buffer grew to, up to 256 KiB, while its connection lives. Past this many,
    /// such a connection is closed after its answer, and a long poll on one answers at once
    /// (its client polls again on a new connection). Bounds that memory (~32 MiB at 128); 0:
    /// close every such connection. A TRUSTED_PROXIES peer's are not counted (the proxy
    /// bounds its pool).
    #[arg(long, env = "MAX_LARGE_BUFFER_CONNECTIONS", default_value_t = 128,
          value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub max_large_buffer_connections: u64,
    /// Open connections one client address may hold (an IPv6 client by its /48; proxies in
    /// TRUSTED_PROXIES are not counted); more are answered 429 and closed, so one client
    /// cannot hold MAX_CONNECTIONS. 0, the default: no such limit. Set it where clients
    /// connect directly: behind a proxy every client has the proxy's address, and the proxy
    /// is where a per-client connection limit belongs.
    #[arg(long, env = "MAX_CONNECTIONS_PER_CLIENT", default_value_t = 0,
          value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub max_connections_per_client: u64,
    /// Percent of each of this replica's slot kinds (uploads, push uploads, downloads, long
    /// polls) one client address may hold at once (an IPv6 client by its /48; 1..=100, at
    /// least one slot); more get 429. Registration is open, so without it one client with
    /// enough workspaces could take every slot. Clients in private, loopback or link-local
    /// networks and proxies in TRUSTED_PROXIES forwarding no client are not counted: behind a
    /// proxy not listed there every client has the proxy's address (list a public one).
    #[arg(long, env = "SLOT_SHARE_PER_CLIENT", default_value_t = 25,
          value_parser = clap::value_parser!(u64).range(1..=100))]
    pub slot_share_per_client: u64,
    #[command(flatten)]
    pub deadlines: DeadlineArgs,
    /// Timeout for the push-mode proxy to a workspace, the whole relay: what is left of an
    /// upload after an early answer is cut there too (the canvas allows ~100 KB/s for 100 MB).
    #[arg(long, env = "PUSH_TIMEOUT", default_value = "1200s")]
    pub push_timeout: HumanDuration,
    /// A push workspace's whole answer must come within this of the upload's last byte
    /// (else 502): a workspace that never answers cannot hold the upload's slot.
    #[arg(long, env = "PUSH_ANSWER_TIMEOUT", default_value = "30s")]
    pub push_answer_timeout: HumanDuration,
    /// Largest push answer body relayed (it is read whole first; larger: 502).
    #[arg(long, env = "PUSH_ANSWER_MAX_BYTES", default_value_t = 1024 * 1024)]
    pub push_answer_max_bytes: u64,
    /// Networks a push URL may reach although they are internal (comma-separated CIDRs, e.g.
    /// 127.0.0.0/8 for a receiver on this host). Empty: none.
    #[arg(long, env = "PUSH_ALLOWED_NETWORKS", default_value = "")]
    pub push_allowed_networks: crate::networks::Networks,
    /// Name lookups of push URLs that registrations may have in flight on this replica; more
    /// get 503 with Retry-After. Each holds a thread of the blocking pool (512, shared with
    /// spool writes) until the resolver answers, so at most half of it.
    #[arg(long, env = "MAX_CONCURRENT_REGISTRATION_LOOKUPS", default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(1..=256))]
    pub max_concurrent_registration_lookups: u64,
    /// Registrations this replica accepts a minute from callers with no claim on the
    /// workspace (no bearer, or neither the admin's nor the workspace's own token), as many at
    /// once: each first registration adds rows nothing removes. More get 429 with Retry-After.
    #[arg(long, env = "REGISTRATIONS_PER_MINUTE", default_value_t = 600,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub registrations_per_minute: u64,
    /// Workspaces the registry holds before a first registration by a caller with no claim is
    /// refused (503 registry_full): each adds rows nothing removes (up to ~3.6 KB with the
    /// longest name and URL), and a rate alone let the table grow for ever. The admin's
    /// registrations and `POST /workspaces` are not refused. Read from the database every
    /// 15 s, plus what this replica created since the reading began and the places of first
    /// registrations in flight; 0: no bound.
    #[arg(long, env = "MAX_WORKSPACES", default_value_t = 1_000_000)]
    pub max_workspaces: u64,
    /// Of those, what one client address may use a minute (an IPv6 client by its /48), as
    /// many at once, so that one stranger cannot use up the replica's for everyone.
    #[arg(long, env = "REGISTRATIONS_PER_MINUTE_PER_CLIENT", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub registrations_per_minute_per_client: u64,
    /// Proxies whose `X-Forwarded-For` names the client (comma-separated CIDRs, e.g. the load
    /// balancer's 10.0.0.0/8). Empty: the connection's peer is the client, whatever the header.
    #[arg(long, env = "TRUSTED_PROXIES", default_value = "")]
    pub trusted_proxies: crate::networks::Networks,
}

impl ServeArgs {
    /// What clap's parsers cannot check alone; the database's are checked as it connects.
    pub fn validate(&self) -> Result<(), String> {
        for origin in &self.cors_allowed_origins {
            cors_origin(origin)?;
        }
        self.limits.validate()?;
        self.deadlines.validate()?;
        self.sweep.validate()?;
        self.bounds_are_places()?;
        let push = [
            ("PUSH_TIMEOUT", self.push_timeout),
            ("PUSH_ANSWER_TIMEOUT", self.push_answer_timeout),
        ];
        deadline_range(&push, Duration::from_millis(100), "100ms")?;
        self.orphans_outlive_uploads()?;
        // Any interval may be short: the sweeper waits at least a second between passes.
        at_most(
            &[("SWEEP_INTERVAL", self.sweep_interval)],
            MAX_DEADLINE,
            "7d",
        )
    }
}

impl ServeArgs {
    /// Bounds that count places or quota: 0 is not "no bound" for these (as it is for
    /// MAX_STORED_BYTES or MAX_CONNECTIONS_PER_CLIENT). Taken before, it made a replica that
    /// answered nothing or refused every upload: MAX_CONNECTIONS=0 held one connection, so one
    /// long poll kept /healthz waiting; a zero quota answered every upload 429 with a
    /// Retry-After that never came true (a red team). And each has a top: a quota is a
    /// PostgreSQL bigint (2^63 wrapped negative, and every upload got 429 again), and a slot
    /// count past tokio's semaphore (2^61) or connections past what the descriptor check can
    /// add up stopped the start-up with a panic (an audit).
    fn bounds_are_places(&self) -> Result<(), String> {
        let quota = i64::MAX as u64;
        let places = [
            ("MAX_CONNECTIONS", self.max_connections as u64, MAX_PLACES),
            (
                "MAX_CONCURRENT_UPLOADS",
                self.max_concurrent_uploads as u64,
                MAX_PLACES,
            ),
            (
                "MAX_CONCURRENT_UPLOADS_PER_WORKSPACE",
                self.max_concurrent_uploads_per_workspace as u64,
                MAX_PLACES,
            ),
            (
                "MAX_CONCURRENT_PUSH_UPLOADS",
                self.max_concurrent_push_uploads as u64,
                MAX_PLACES,
            ),
            (
                "MAX_CONCURRENT_DOWNLOADS",
                self.max_concurrent_downloads as u64,
                MAX_PLACES,
            ),
            (
                "MAX_CONCURRENT_DOWNLOADS_PER_WORKSPACE",
                self.max_concurrent_downloads_per_workspace as u64,
                MAX_PLACES,
            ),
            (
                "MAX_PENDING_BYTES_PER_WORKSPACE",
                self.limits.max_pending_bytes_per_workspace,
                quota,
            ),
            (
                "MAX_PENDING_FILES_PER_WORKSPACE",
                self.limits.max_pending_files_per_workspace,
                quota,
            ),
        ];
        for (name, value, max) in places {
            if value == 0 {
                return Err(format!(
                    "{name}=0: it must be at least 1 (0 is not \"no bound\" here)"
                ));
            }
            if value > max {
                return Err(format!("{name}={value}: it must be at most {max}"));
            }
        }
        Ok(())
    }
}

/// The most connections or slots of a kind a replica may be given: more than any machine
/// serves, far below what the arithmetic on them can hold.
const MAX_PLACES: u64 = 1_000_000;

/// A CORS_ALLOWED_ORIGINS entry as browsers send `Origin` (`scheme://host[:port]`, lower
/// case, default port left out): the layer echoes an origin only when it is byte-equal to
/// one listed, so `https://Canvas.example.com/` would have matched nothing. Blank entries
/// (a trailing comma) are `None`. `*` is refused: the canvas sends credentials, and a
/// wildcard cannot go with them.
pub fn cors_origin(raw: &str) -> Result<Option<String>, String> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Ok(None);
    }
    let refused = |why: &str| Err(format!("CORS_ALLOWED_ORIGINS entry {raw:?} {why}"));
    if raw == "*" {
        return refused("is a wildcard: list the canvas origins (the canvas sends credentials)");
    }
    let Ok(url) = url::Url::parse(raw) else {
        return refused("is not an origin (scheme://host[:port])");
    };
    // Userinfo is no part of an origin (`https://user:pw@host` was taken as `https://host`),
    // an empty one (`https://@host`) included.
    let bare = url.path() == "/"
        && url.query().is_none()
        && url.fragment().is_none()
        && !raw.contains('@');
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() || !bare {
        return refused("is not an origin (scheme://host[:port])");
    }
    Ok(Some(url.origin().ascii_serialization()))
}

impl ServeArgs {
    /// The admin credential, without surrounding whitespace (a secret mounted as a file ends
    /// in a newline, and bearers are compared trimmed): unset, empty or blank is none (SPEC
    /// §3: no admin access).
    pub fn admin_token(&self) -> Option<Secret> {
        let token = self.admin_token.as_ref()?.0.trim();
        (!token.is_empty()).then(|| Secret(token.to_string()))
    }

    /// The orphan reconciliation deletes objects older than ORPHAN_GRACE that no row points
    /// at. An upload still being received has exactly those: objects stored for its earlier
    /// files, its row not committed yet, for up to UPLOAD_BODY_TIMEOUT of the client's time
    /// plus the S3 and commit time that does not count against it. A grace shorter than that
    /// deleted live uploads' bytes, and their rows then committed pointing at nothing. Twice
    /// the body's deadline leaves the rest its own as much again.
    fn orphans_outlive_uploads(&self) -> Result<(), String> {
        // No bucket, no reconciliation: any grace is harmless then.
        if self.storage.s3_bucket.as_deref().is_none_or(str::is_empty) {
            return Ok(());
        }
        let (grace, body) = (
            self.sweep.orphan_grace.0,
            self.deadlines.upload_body_timeout.0,
        );
        match grace >= body.saturating_mul(2) {
            true => Ok(()),
            false => Err(format!(
                "ORPHAN_GRACE={grace:?} is shorter than twice UPLOAD_BODY_TIMEOUT={body:?}: \
                 the orphan reconciliation would delete the objects of uploads still being \
                 received (raise ORPHAN_GRACE or lower UPLOAD_BODY_TIMEOUT)"
            )),
        }
    }
}

/// How long a client may take (SPEC §10, slow clients).
#[derive(Debug, Clone, Args)]
pub struct DeadlineArgs {
    /// A request head (line and headers) must arrive within this.
    #[arg(long, env = "HEADER_READ_TIMEOUT", default_value = "10s")]
    pub header_read_timeout: HumanDuration,
    /// A non-upload request body (JSON) must arrive whole within this.
    #[arg(long, env = "REQUEST_BODY_TIMEOUT", default_value = "10s")]
    pub request_body_timeout: HumanDuration,
    /// An upload body that sends nothing for this long is cut off with 408.
    #[arg(long, env = "BODY_IDLE_TIMEOUT", default_value = "30s")]
    pub body_idle_timeout: HumanDuration,
    /// After BODY_RATE_GRACE, an upload body must average at least this many bytes per
    /// second since it began, or it is cut off with 408 (a trickle cannot hold a slot).
    #[arg(long, env = "BODY_MIN_RATE", default_value_t = 8192)]
    pub body_min_rate: u64,
    /// How long an upload body may run before BODY_MIN_RATE applies.
    #[arg(long, env = "BODY_RATE_GRACE", default_value = "10s")]
    pub body_rate_grace: HumanDuration,
    /// The service waits at most this long in all for an upload body's bytes (poll or
    /// push), else 408: at BODY_MIN_RATE alone a 100 MiB body could hold its upload slot for
    /// 3.6 hours. Time the body's reader spends elsewhere (a push workspace taking it slowly,
    /// S3) is not the client's and does not count. The default is PUSH_TIMEOUT's (the canvas
    /// allows ~100 KB/s for 100 MB); whole seconds, 1s..=7d.
    #[arg(long, env = "UPLOAD_BODY_TIMEOUT", default_value = "1200s")]
    pub upload_body_timeout: HumanDuration,
    /// A response the client stops reading for this long is cut off (slow readers cannot
    /// hold a connection, a storage stream and a drain slot forever).
    #[arg(long, env = "RESPONSE_IDLE_TIMEOUT", default_value = "60s")]
    pub response_idle_timeout: HumanDuration,
    /// While a response waits on its client (the socket takes no more), the client must take
    /// at least this many bytes per second of that waiting, judged every RESPONSE_RATE_WINDOW
    /// of it, or the response is cut off (a reader trickling a few bytes a minute cannot hold
    /// a download slot); 0 turns it off.
    #[arg(long, env = "RESPONSE_MIN_RATE", default_value_t = 8192)]
    pub response_min_rate: u64,
    /// How much waiting on a client makes up one window of RESPONSE_MIN_RATE (0 turns the
    /// rate rule off).
    #[arg(long, env = "RESPONSE_RATE_WINDOW", default_value = "10s")]
    pub response_rate_window: HumanDuration,
}

/// Longest deadline, timeout or interval: a deadline must end, and fit in a clock's range
/// (the parser takes up to 2^64 seconds, and `Instant + Duration` panics on overflow).
pub const MAX_DEADLINE: Duration = Duration::from_secs(7 * 86_400);

/// Longest retention or grace period: ten years (chrono cannot hold the parser's largest, and
/// an ORPHAN_GRACE it cannot hold would have become zero).
pub const MAX_RETENTION: Duration = Duration::from_secs(3650 * 86_400);

/// Refuses any of `durations` shorter than `min` (`min_text`, as an operator writes it): a
/// zero deadline cuts everything at once.
pub fn at_least(
    durations: &[(&str, HumanDuration)],
    min: Duration,
    min_text: &str,
) -> Result<(), String> {
    match durations.iter().find(|(_, d)| d.0 < min) {
        Some((name, HumanDuration(d))) => Err(format!("{name}={d:?} is shorter than {min_text}")),
        None => Ok(()),
    }
}

/// Refuses any of `durations` shorter than `min` ([`at_least`]) or longer than
/// [`MAX_DEADLINE`].
pub fn deadline_range(
    durations: &[(&str, HumanDuration)],
    min: Duration,
    min_text: &str,
) -> Result<(), String> {
    at_least(durations, min, min_text)?;
    at_most(durations, MAX_DEADLINE, "7d")
}

/// Refuses any of `durations` longer than `max` (`max_text`, as an operator writes it).
pub fn at_most(
    durations: &[(&str, HumanDuration)],
    max: Duration,
    max_text: &str,
) -> Result<(), String> {
    match durations.iter().find(|(_, d)| d.0 > max) {
        Some((name, HumanDuration(d))) => Err(format!("{name}={d:?} is longer than {max_text}")),
        None => Ok(()),
    }
}

impl DeadlineArgs {
    pub fn validate(&self) -> Result<(), String> {
        let deadlines = [
            ("HEADER_READ_TIMEOUT", self.header_read_timeout),
            ("REQUEST_BODY_TIMEOUT", self.request_body_timeout),
            ("BODY_IDLE_TIMEOUT", self.body_idle_timeout),
            ("BODY_RATE_GRACE", self.body_rate_grace),
            ("UPLOAD_BODY_TIMEOUT", self.upload_body_timeout),
            ("RESPONSE_IDLE_TIMEOUT", self.response_idle_timeout),
            ("RESPONSE_RATE_WINDOW", self.response_rate_window),
        ];
        at_most(&deadlines, MAX_DEADLINE, "7d")?;
        // A zero here cuts every request at once (the grace and the rate window may be 0).
        let cutting = [
            ("HEADER_READ_TIMEOUT", self.header_read_timeout),
            ("REQUEST_BODY_TIMEOUT", self.request_body_timeout),
            ("BODY_IDLE_TIMEOUT", self.body_idle_timeout),
            ("RESPONSE_IDLE_TIMEOUT", self.response_idle_timeout),
        ];
        at_least(&cutting, Duration::from_millis(100), "100ms")?;
        // Whole seconds: the 408 says how many.
        let whole = self.upload_body_timeout.0;
        if whole < Duration::from_secs(1) || whole.subsec_nanos() != 0 {
            return Err(format!(
                "UPLOAD_BODY_TIMEOUT={whole:?} must be a whole number of seconds in 1s..=7d"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let cases = [
            ("90s", 90),
            ("5m", 300),
            ("1h", 3600),
            ("0", 0),
            ("30", 30),
            ("2d", 172_800),
        ];
        for (s, secs) in cases {
            assert_eq!(
                s.parse::<HumanDuration>().unwrap().0,
                Duration::from_secs(secs),
                "{s}"
            );
        }
        assert_eq!(
            "250ms".parse::<HumanDuration>().unwrap().0,
            Duration::from_millis(250)
        );
        for bad in ["", "m", "5x", "-1", "1.5h", "18446744073709551615d"] {
            assert!(bad.parse::<HumanDuration>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_download_read_ahead_is_bounded() {
        use clap::Parser;
        #[derive(Parser)]
        struct Flags {
            #[command(flatten)]
            storage: StorageArgs,
        }
        let read_ahead = |args: &[&str]| {
            let argv = std::iter::once("serve").chain(args.iter().copied());
            Flags::try_parse_from(argv).map(|f| f.storage.download_read_ahead_bytes)
        };
        assert_eq!(read_ahead(&[]).unwrap(), 16 << 20);
        assert_eq!(
            read_ahead(&["--download-read-ahead-bytes", "0"]).unwrap(),
            0
        );
        assert_eq!(
            read_ahead(&["--download-read-ahead-bytes", "1073741824"]).unwrap(),
            1 << 30
        );
        assert!(read_ahead(&["--download-read-ahead-bytes", "1073741825"]).is_err());
    }

    #[test]
    fn the_upload_body_deadline_is_bounded() {
        use clap::Parser;
        #[derive(Parser)]
        struct Flags {
            #[command(flatten)]
            deadlines: DeadlineArgs,
        }
        let whole = |args: &[&str]| {
            let argv = std::iter::once("serve").chain(args.iter().copied());
            let flags = Flags::try_parse_from(argv).unwrap();
            flags
                .deadlines
                .validate()
                .map(|()| flags.deadlines.upload_body_timeout.0)
        };
        assert_eq!(whole(&[]).unwrap(), Duration::from_secs(1200));
        assert_eq!(
            whole(&["--upload-body-timeout", "1s"]).unwrap(),
            Duration::from_secs(1)
        );
        assert_eq!(
            whole(&["--upload-body-timeout", "7d"]).unwrap(),
            MAX_DEADLINE
        );
        for bad in ["0", "999ms", "1500ms", "604801"] {
            let refused = whole(&["--upload-body-timeout", bad]).unwrap_err();
            assert!(refused.contains("UPLOAD_BODY_TIMEOUT"), "{bad}: {refused}");
        }
    }

    #[test]
    fn every_duration_setting_is_bounded() {
        use clap::Parser;
        #[derive(Parser)]
        struct Flags {
            #[command(flatten)]
            serve: ServeArgs,
        }
        let validated = |args: &[&str]| {
            let argv = ["serve", "--database-url", "postgres://x"].into_iter();
            let flags = Flags::try_parse_from(argv.chain(args.iter().copied())).unwrap();
            flags.serve.validate().and(flags.serve.db.validate())
        };
        assert_eq!(validated(&[]), Ok(()));
        // Each flag takes `ok` and refuses `over` with a message ending in `refusal`.
        let edge = |flags: &[&str], ok: &str, over: &str, refusal: &str| {
            for &flag in flags {
                assert_eq!(validated(&[flag, ok]), Ok(()), "{flag}");
                let refused = validated(&[flag, over]).unwrap_err();
                assert!(refused.ends_with(refusal), "{flag}: {refused}");
            }
        };
        // Every deadline ends within a week: later ones would overflow a clock when added.
        let week = [
            "--dependency-timeout",
            "--body-rate-grace",
            "--header-read-timeout",
            "--push-timeout",
            "--push-answer-timeout",
            "--sweep-interval",
            "--body-idle-timeout",
            "--response-rate-window",
        ];
        edge(&week, "7d", "604801", "is longer than 7d");
        let tenth = [
            "--push-timeout",
            "--push-answer-timeout",
            "--header-read-timeout",
            "--request-body-timeout",
            "--body-idle-timeout",
            "--response-idle-timeout",
        ];
        edge(&tenth, "100ms", "99ms", "is shorter than 100ms");
        let retentions = ["--ack-retention", "--orphan-grace", "--activity-retention"];
        edge(&retentions, "3650d", "3651d", "is longer than 3650d");
        // These may be 0: the rate rule then applies from the start, or is off.
        for flag in ["--body-rate-grace", "--response-rate-window"] {
            assert_eq!(validated(&[flag, "0"]), Ok(()), "{flag}");
        }
    }

    #[test]
    fn secrets_are_redacted() {
        assert_eq!(format!("{:?}", Secret("hunter2".into())), "<redacted>");
    }
}
