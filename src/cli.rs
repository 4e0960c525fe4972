//! Command line: every flag also reads the environment variable of the same name.

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::config::{DbArgs, ServeArgs, StorageArgs, SweepArgs};

#[derive(Debug, Parser)]
#[command(
    name = "pending-uploads",
    version,
    about = "Stages chat file uploads for agent workspaces behind NAT"
)]
pub struct Cli {
    /// Log format: text or json.
    #[arg(long, env = "LOG_FORMAT", default_value = "text", global = true,
          value_parser = ["text", "json"])]
    pub log_format: String,
    /// Lines one log statement may write per second; more are dropped and counted
    /// (`log_lines_dropped_total`, and a line a second saying how many). 0 = no limit.
    #[arg(
        long,
        env = "LOG_LINES_PER_SECOND",
        default_value_t = 1000,
        global = true
    )]
    pub log_lines_per_second: u64,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP service (the default).
    Serve(Box<ServeArgs>),
    /// Apply database migrations and exit.
    Migrate {
        #[command(flatten)]
        db: DbArgs,
    },
    /// Copy bytea-only rows to S3, verify each copy, and point the rows at it (resumable).
    Backfill {
        #[command(flatten)]
        db: DbArgs,
        #[command(flatten)]
        storage: StorageArgs,
        /// Rows copied at once (1..=256).
        #[arg(long, env = "BACKFILL_CONCURRENCY", default_value_t = 4,
              value_parser = clap::value_parser!(u16).range(1..=256))]
        concurrency: u16,
        /// Rows fetched per batch (1..=100000).
        #[arg(long, env = "BACKFILL_BATCH_SIZE", default_value_t = 200,
              value_parser = clap::value_parser!(i64).range(1..=100_000))]
        batch_size: i64,
        /// Attempts after the first, per row.
        #[arg(long, env = "BACKFILL_RETRIES", default_value_t = 3)]
        retries: u32,
        /// Only count what would be copied.
        #[arg(long)]
        dry_run: bool,
        /// Hide the progress bar.
        #[arg(long)]
        no_progress: bool,
        /// Folder for the copies' spool files, as `serve` spools uploads (defaults to the
        /// system temp dir).
        #[arg(long, env = "SPOOL_DIR")]
        spool_dir: Option<std::path::PathBuf>,
    },
    /// Release the bytea copies of rows whose S3 copy is there and holds their bytes (each is
    /// checked); refuses while any row's bytes live only in Postgres.
    Contract {
        #[command(flatten)]
        db: DbArgs,
        #[command(flatten)]
        storage: StorageArgs,
        /// Rows checked and updated per batch (1..=100000).
        #[arg(long, env = "CONTRACT_BATCH_SIZE", default_value_t = 500,
              value_parser = clap::value_parser!(i64).range(1..=100_000))]
        batch_size: i64,
    },
    /// Print the OpenAPI document (what /openapi.json serves).
    Openapi,
    /// The workspace side: receive staged files into a folder, ack them.
    Agent(AgentArgs),
    /// Run one sweep pass and exit.
    Sweep {
        #[command(flatten)]
        db: DbArgs,
        #[command(flatten)]
        storage: StorageArgs,
        #[command(flatten)]
        sweep: SweepArgs,
    },
}

/// An agent's `--platform-url`: refused at start (before, a typo came out as reqwest's
/// "builder error" after a pass of retries).
fn platform_url(raw: &str) -> Result<String, String> {
    let url = url::Url::parse(raw.trim()).map_err(|e| format!("not a URL: {e}"))?;
    // reqwest sends a URL's user and password as Basic auth beside the Bearer: the service
    // reads the first Authorization and answered 401 to a valid token (a probe).
    if !url.username().is_empty() || url.password().is_some() {
        return Err(
            "must not hold a user or password: the agent authenticates with its token alone".into(),
        );
    }
    match (url.scheme(), url.host()) {
        ("http" | "https", Some(_)) if url.query().is_none() && url.fragment().is_none() => {
            Ok(raw.trim().to_string())
        }
        _ => Err("must be an http(s) URL with a host and no query".into()),
    }
}

#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// The platform's base URL (http or https).
    #[arg(long, env = "PENDING_UPLOADS_PLATFORM_URL", value_parser = platform_url)]
    pub platform_url: String,
    /// This workspace's id.
    #[arg(long, env = "PENDING_UPLOADS_WORKSPACE_ID")]
    pub workspace_id: uuid::Uuid,
    /// File holding the workspace token (or set PENDING_UPLOADS_TOKEN).
    #[arg(long, env = "PENDING_UPLOADS_TOKEN_FILE")]
    pub token_file: Option<std::path::PathBuf>,
    /// Folder the files are written to.
    #[arg(long, env = "PENDING_UPLOADS_DIR")]
    pub dir: std::path::PathBuf,
    /// One pass, then exit (cron, tests).
    #[arg(long)]
    pub once: bool,
    /// Downloads at once (1..=64: a service takes 16 per workspace by default and answers
    /// the rest 429).
    #[arg(long, env = "PENDING_UPLOADS_CONCURRENCY", default_value_t = 4,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub concurrency: u16,
    /// Time between passes (100ms..=7d).
    #[arg(long, env = "PENDING_UPLOADS_POLL_INTERVAL", default_value = "5s")]
    pub poll_interval: crate::config::HumanDuration,
    /// Download rate cap in bytes per second, all downloads together (0 = none).
    #[arg(long, env = "PENDING_UPLOADS_MAX_RATE", default_value_t = 0)]
    pub max_rate: u64,
    /// Retries per request or download within a pass.
    #[arg(long, env = "PENDING_UPLOADS_RETRIES", default_value_t = 5)]
    pub retries: u32,
    /// How long a request to the platform may take in all (a long poll's wait not counted),
    /// and how long a download may wait on the platform for 1 KiB (1s..=7d).
    #[arg(long, env = "PENDING_UPLOADS_REQUEST_TIMEOUT", default_value = "60s")]
    pub request_timeout: crate::config::HumanDuration,
}

/// The token: from `--token-file` when given (a flag wins over the environment), else from
/// `PENDING_UPLOADS_TOKEN`. A byte-order mark and surrounding whitespace are not part of it;
/// an empty one is refused here rather than by the platform with a bare 401.
fn agent_token(token_file: Option<&std::path::Path>) -> anyhow::Result<String> {
    let (token, from) = match token_file {
        Some(path) => {
            let raw = std::fs::read_to_string(path).map_err(|e| {
                anyhow::anyhow!(
                    "reading the token file (--token-file) {}: {e}",
                    path.display()
                )
            })?;
            (raw, format!("the token file {}", path.display()))
        }
        None => match std::env::var("PENDING_UPLOADS_TOKEN") {
            Ok(t) => (t, "PENDING_UPLOADS_TOKEN".to_string()),
            Err(_) => anyhow::bail!("give --token-file or set PENDING_UPLOADS_TOKEN"),
        },
    };
    let token = token.trim_start_matches('\u{feff}').trim().to_string();
    if token.is_empty() {
        anyhow::bail!("{from} is empty: it should hold the workspace's token");
    }
    Ok(token)
}

async fn run_agent(args: AgentArgs) -> anyhow::Result<()> {
    // 0 would poll without pause while the agent has no cursor yet.
    let interval = [("PENDING_UPLOADS_POLL_INTERVAL", args.poll_interval)];
    crate::config::deadline_range(&interval, std::time::Duration::from_millis(100), "100ms")
        .map_err(anyhow::Error::msg)?;
    let timeout = [("PENDING_UPLOADS_REQUEST_TIMEOUT", args.request_timeout)];
    crate::config::deadline_range(&timeout, std::time::Duration::from_secs(1), "1s")
        .map_err(anyhow::Error::msg)?;
    let token = agent_token(args.token_file.as_deref())?;
    let platform = crate::agent::without_credentials(&args.platform_url);
    let dir = args.dir.display().to_string();
    let agent = crate::agent::Agent::new(crate::agent::AgentConfig {
        platform_url: args.platform_url,
        workspace_id: args.workspace_id,
        token,
        dir: args.dir,
        concurrency: usize::from(args.concurrency),
        max_rate: Some(args.max_rate).filter(|r| *r > 0),
        retries: args.retries,
        request_timeout: args.request_timeout.0,
    })?;
    if args.once {
        let report = agent.run_once().await?;
        println!("{}", serde_json::to_string(&report)?);
        if report.failed > 0 {
            anyhow::bail!(
                "{} files could not be staged; the next pass retries them",
                report.failed
            );
        }
        return Ok(());
    }
    // Said at start and at a signal: a daemon that logs nothing until a file comes cannot be
    // told from one that hangs (an operator probe).
    tracing::info!(
        event = "agent_started",
        workspace_id = %args.workspace_id,
        platform_url = platform.as_str(),
        dir = dir.as_str(),
        concurrency = args.concurrency,
        poll_interval_ms = args.poll_interval.0.as_millis() as u64,
        "agent started: files arrive in DIR"
    );
    tokio::select! {
        ended = agent.run_forever(args.poll_interval.0) => Ok(ended?),
        () = crate::app::shutdown_signal() => {
            tracing::info!(
                event = "agent_stopped",
                "agent stopped by a signal: a download cut short resumes at the next start"
            );
            Ok(())
        }
    }
}

/// Every environment variable the binary reads through its flags, plus those read by the
/// libraries it configures (the AWS credentials chain, the log filter).
pub fn env_vars() -> std::collections::BTreeSet<String> {
    fn walk(cmd: &clap::Command, out: &mut std::collections::BTreeSet<String>) {
        for arg in cmd.get_arguments() {
            if let Some(env) = arg.get_env() {
                out.insert(env.to_string_lossy().into_owned());
            }
        }
        for sub in cmd.get_subcommands() {
            walk(sub, out);
        }
    }
    let mut out = std::collections::BTreeSet::new();
    walk(&<Cli as clap::CommandFactory>::command(), &mut out);
    for extra in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "RUST_LOG",
    ] {
        out.insert(extra.to_string());
    }
    out
}

pub fn init_tracing(format: &str, lines_per_second: u64) {
    use tracing_subscriber::{layer::SubscriberExt, util::SubscriberInitExt, Layer};
    // An empty RUST_LOG (a template's blank value) is unset: as a filter it enabled nothing,
    // errors included (a red team). One that cannot be read is said, once logging is up.
    let wanted = std::env::var_os("RUST_LOG")
        .map(|v| v.to_string_lossy().into_owned())
        .filter(|v| !v.trim().is_empty());
    let (filter, unreadable) = match wanted {
        None => (default_filter(), None),
        Some(raw) => match tracing_subscriber::EnvFilter::try_new(&raw) {
            Ok(filter) => (filter, None),
            Err(e) => (default_filter(), Some((raw, e.to_string()))),
        },
    };
    // Colours only on a terminal, and not there either under NO_COLOR (no-color.org): in a
    // file or a collector's pipe the escapes are noise that line-based tools trip over.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let lines = tracing_subscriber::fmt::layer()
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    let lines = match format == "json" {
        true => lines.json().flatten_event(true).boxed(),
        false => lines.boxed(),
    };
    let named = sdk_targets_named(&std::env::var("RUST_LOG").unwrap_or_default());
    tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::filter::filter_fn(move |meta| {
            !hides_credentials(meta, &named)
        }))
        .with(lines.with_filter(crate::log_budget::LineBudget::new(lines_per_second)))
        .init();
    if let Some((raw, error)) = unreadable {
        tracing::warn!(
            rust_log = crate::logfmt::clip(&raw).as_str(),
            %error,
            default = DEFAULT_FILTER,
            "RUST_LOG could not be read: the default filter is used"
        );
    }
}

/// The AWS SDK's crates (`aws_smithy_runtime`, `aws_sigv4`, …), whose debug and trace lines
/// print the access key id (the request machinery its configuration, the signer its
/// credentials; the secret key is redacted).
const SDK: &str = "aws_";

/// The SDK's targets a RUST_LOG filter names itself (`aws_sigv4=trace` names `aws_sigv4`).
fn sdk_targets_named(rust_log: &str) -> Vec<String> {
    rust_log
        .split(',')
        .filter_map(|d| d.split(['=', '[']).next())
        .map(str::trim)
        .filter(|t| t.starts_with(SDK))
        .map(String::from)
        .collect()
}

/// A line of the SDK's past `info`: left out unless RUST_LOG names its target (or a crate
/// of it), so `RUST_LOG=debug` or `trace` does not write the S3 access key id into every
/// request's lines (an operator red team: `aws_smithy_runtime`; an audit: `aws_sigv4` at
/// trace) while one debugging the SDK can still ask for them.
fn hides_credentials(meta: &tracing::Metadata<'_>, named: &[String]) -> bool {
    let target = meta.target();
    *meta.level() > tracing::Level::INFO
        && target.starts_with(SDK)
        && !named.iter().any(|n| target.starts_with(n.as_str()))
}

/// The log filter when RUST_LOG is unset, blank or unreadable.
const DEFAULT_FILTER: &str = "info,sqlx=warn";

fn default_filter() -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::new(DEFAULT_FILTER)
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        None => {
            // `pending-uploads` alone is `serve`, with its settings from the environment.
            match Cli::parse_from(["pending-uploads", "serve"]).command {
                Some(Command::Serve(args)) => crate::app::serve(*args).await,
                _ => anyhow::bail!("could not read serve settings"),
            }
        }
        Some(Command::Serve(args)) => crate::app::serve(*args).await,
        Some(Command::Migrate { db }) => {
            crate::app::connect_and_migrate(&db).await?;
            tracing::info!("migrations applied");
            Ok(())
        }
        Some(Command::Backfill {
            db,
            storage,
            concurrency,
            batch_size,
            retries,
            dry_run,
            no_progress,
            spool_dir,
        }) => {
            let db = match dry_run {
                true => crate::app::connect_db_as_is(&db).await?,
                false => crate::app::connect_db(&db).await?,
            };
            let storage = crate::app::storage(&storage, &db).await?;
            let opts = crate::backfill::BackfillOptions {
                concurrency: usize::from(concurrency),
                batch_size,
                retries,
                dry_run,
                progress: !no_progress,
            };
            // Where `serve` spools (SPOOL_DIR), not always the system temp dir: a host whose
            // /tmp is small spooled the service's uploads elsewhere, but not the backfill's.
            let spool_dir = crate::app::spool_dir(spool_dir)?;
            let report = crate::backfill::backfill(&db, &storage, &spool_dir, &opts).await?;
            // The summary goes out however the run ended, so a script reads what was done.
            println!("{}", serde_json::to_string(&report)?);
            if report.stopped == Some(crate::backfill::S3_UNAVAILABLE) {
                anyhow::bail!(
                    "S3 unavailable for {} rows in a row: stopped ({} migrated, {} skipped, {} \
                     failed so far; run backfill again once S3 answers)",
                    opts.concurrency.max(1),
                    report.migrated,
                    report.skipped,
                    report.failed
                );
            }
            if report.failed > 0 {
                anyhow::bail!(
                    "{} rows failed to copy; run backfill again to retry them",
                    report.failed
                );
            }
            Ok(())
        }
        Some(Command::Agent(args)) => run_agent(args).await,
        Some(Command::Openapi) => {
            // Written, not printed: `print!` panicked on a full or closed stdout (a red team's
            // `openapi > /dev/full`: exit 101 and a backtrace).
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            out.write_all(&crate::http::document())
                .and_then(|()| out.flush())
                .context("writing the OpenAPI document to stdout")
        }
        Some(Command::Contract {
            db,
            storage,
            batch_size,
        }) => {
            let db = crate::app::connect_db(&db).await?;
            let storage = crate::app::storage(&storage, &db).await?;
            let Some(s3) = storage.s3() else {
                anyhow::bail!(
                    "contract checks each row's S3 copy before releasing its bytea copy: \
                     set PENDING_UPLOADS_S3_BUCKET and the S3 settings the service uses"
                );
            };
            s3.require_bucket().await?;
            let report = crate::contract::contract(&db, s3, batch_size).await?;
            println!("{}", serde_json::to_string(&report)?);
            if report.missing_copies > 0 {
                anyhow::bail!(
                    "{} rows' S3 copies were missing or not their bytes: they kept their bytea \
                     copies and are bytea-only again; run `pending-uploads backfill`, then \
                     contract again",
                    report.missing_copies
                );
            }
            Ok(())
        }
        Some(Command::Sweep { db, storage, sweep }) => {
            sweep.validate().map_err(anyhow::Error::msg)?;
            let db = crate::app::connect_db(&db).await?;
            let storage = crate::app::storage(&storage, &db).await?;
            let stats = crate::app::sweeper(&sweep, &db, &storage)
                .run_once()
                .await?;
            tracing::info!(rows = stats.rows, bytes = stats.bytes, "sweep pass done");
            println!(
                "{}",
                serde_json::json!({
                    "swept_rows": stats.rows,
                    "swept_bytes": stats.bytes,
                    "objects_deleted": stats.objects_deleted,
                    "object_errors": stats.object_errors,
                    "orphans_deleted": stats.orphans_deleted,
                    "orphan_reconciliation_failed": stats.orphans_failed,
                    "activity_rows_deleted": stats.activity_rows,
                })
            );
            // A cron job must see it: its report alone said 0 orphans deleted, exit 0.
            anyhow::ensure!(
                !stats.orphans_failed,
                "the orphan reconciliation failed (logged above): rows were swept, orphans not"
            );
            // The same for objects whose rows went (S3 down, or no bucket set): exit 0 hid
            // that they are left until a reconciliation with S3 reachable deletes them.
            anyhow::ensure!(
                stats.object_errors == 0,
                "{} swept rows' S3 objects could not be deleted (logged above): the orphan reconciliation deletes them once S3 is reachable with PENDING_UPLOADS_S3_BUCKET set",
                stats.object_errors
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// README: every setting's flag is its environment variable's name, in lower case with
    /// dashes (`PENDING_UPLOADS_S3_BUCKET` is `--pending-uploads-s3-bucket`); a subcommand's
    /// own variables drop its name from their flags (`BACKFILL_CONCURRENCY` is `backfill
    /// --concurrency`), and the agent's drop `PENDING_UPLOADS_`.
    #[test]
    fn every_flag_is_named_as_its_environment_variable() {
        fn walk(cmd: &clap::Command, path: &str, wrong: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let (Some(env), Some(long)) = (arg.get_env(), arg.get_long()) else {
                    continue;
                };
                let env = env.to_string_lossy().to_ascii_lowercase().replace('_', "-");
                let sub = path.rsplit(' ').next().unwrap_or_default();
                let own = match sub {
                    "agent" => "pending-uploads-".to_string(),
                    sub => format!("{sub}-"),
                };
                if long != env && env.strip_prefix(own.as_str()) != Some(long) {
                    wrong.push(format!("{path}: --{long} reads {env}"));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), wrong);
            }
        }
        let mut wrong = Vec::new();
        walk(&Cli::command(), "pending-uploads", &mut wrong);
        assert!(wrong.is_empty(), "{wrong:#?}");
    }
}
