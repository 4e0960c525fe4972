//! Scenario 11: PostgreSQL runs out of disk under the uploads. `pending_uploads` (and its
//! TOAST table, where a file's bytes go) lives in a tablespace on a 16 MiB tmpfs; the WAL and
//! every other table stay on the cluster's own disk. Uploads past the space get a clean 503
//! (`platform_unavailable`, Retry-After) and leave nothing; downloads and feed pages go on;
//! acks may get the same 503 (an ack writes a row version). Once the filesystem grows (the
//! operator's fix), uploads succeed again with no restart of anything.

use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use rand::{rngs::StdRng, SeedableRng};

use crate::{
    harness::{bounded, Pg, Scratch, Service, ServiceConfig},
    load::{payload, Api, Fleet, Recorder, Retry, Summary, Worker},
    spool_full::{usage, Uploaders},
    verify,
};

const SIZE_MB: u64 = 16;
const BIG: usize = 3 * 1024 * 1024;

/// A tmpfs mounted for the tablespace, owned by the server's user, unmounted when this drops:
/// declared before the cluster, so after the cluster stopped.
struct Tablespace {
    dir: PathBuf,
}

impl Tablespace {
    fn mount(dir: PathBuf) -> Tablespace {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={SIZE_MB}m,mode=0700"))
            .arg("tmpfs")
            .arg(&dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "cannot mount a tmpfs for the tablespace ({}); run as root",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let space = Tablespace { dir };
        // As root the cluster runs as `postgres` (harness::as_pg), which must own it.
        if crate::harness::is_root() {
            let _ = Command::new("chown")
                .arg("postgres")
                .arg(&space.dir)
                .status();
        }
        space
    }

    /// The operator's fix: the filesystem grows.
    fn grow(&self) {
        let status = Command::new("mount")
            .args(["-o", "remount,size=256m"])
            .arg(&self.dir)
            .status()
            .expect("run mount");
        assert!(status.success(), "grow the tablespace's tmpfs");
    }

    fn available(&self) -> u64 {
        usage(&self.dir).1
    }
}

impl Drop for Tablespace {
    fn drop(&mut self) {
        crate::harness::unmount(&self.dir);
    }
}

async fn sql(pool: &sqlx::PgPool, statement: &str) {
    sqlx::query(statement)
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("{statement}: {e}"));
}

async fn run() {
    let name = "pg_disk_full";
    let scratch = Scratch::new(name);
    let space = Tablespace::mount(scratch.sub("tablespace"));
    let pg = Pg::start(&scratch);
    let spool: PathBuf = scratch.sub("spool");
    let config = ServiceConfig::new(&pg.url(), spool.clone());
    let service = Service::start(config, scratch.path().join("service.log")).await;
    let pool = pg.pool().await;
    sql(
        &pool,
        &format!("CREATE TABLESPACE small LOCATION '{}'", space.dir.display()),
    )
    .await;
    sql(&pool, "ALTER TABLE pending_uploads SET TABLESPACE small").await;
    let rec = Recorder::new();
    let api = Api::new(&service.base(), &rec);

    let fleet = Fleet::start(&api, 3, |i, ws, token| Worker {
        api: api.clone(),
        ws,
        token,
        seed: 1100 + i as u64,
        sizes: 1..4_000,
        files: 1..=2,
        retry: Retry::Never,
        ack_every: 3,
        page: 50,
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    rec.fault_begin();
    let mut uploaders = Uploaders::default();
    for i in 0..2 {
        uploaders.start(&api, "upload_big", "big", BIG, 1110 + i);
    }
    // Until the tablespace refuses a big upload, then 4 s more of a full disk under load.
    let started = Instant::now();
    let mut least_free = u64::MAX;
    while started.elapsed() < Duration::from_secs(30) && !refused_big(&rec) {
        least_free = least_free.min(space.available());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let filled_after = started.elapsed();
    for _ in 0..40 {
        least_free = least_free.min(space.available());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    uploaders.stop().await;
    space.grow();
    rec.fault_end(Duration::from_secs(1));
    // The normal clients go on past the fix: their requests from here on must all succeed.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let _feeds = fleet.stop().await;

    // ---- checks
    let samples = rec.samples();
    let big_refused = samples
        .iter()
        .filter(|s| s.op == "upload_big")
        .filter(|s| verify::clean_503(&s.outcome, &["platform_unavailable"]).is_ok())
        .count();
    let bad = verify::fault_violations(&rec, &samples, "the disk-full window", |s| match s.op {
        "download" | "activity" => Err("a read failed while only writes lacked room".into()),
        _ => verify::clean_503(&s.outcome, &["platform_unavailable"]),
    });
    // Afterwards uploads take room again (a big file, one request).
    let (ws, token) = api.register().await;
    let mut rng = StdRng::seed_from_u64(1190);
    let (after, _) = api
        .upload(ws, &token, &[("after.bin".into(), payload(&mut rng, BIG))])
        .await;
    let accepted = rec.accepted();
    let found = verify::Findings::of_uploads(&api, &pool, &accepted).await;
    let leaks = verify::Leaks::settled(&pool, &spool, &service).await;
    let bugs = service.bug_lines();

    Summary::print(
        &rec,
        name,
        found.lost_count(),
        found.orphaned_count(),
        leaks.count(),
    );
    println!(
        "CHAOS-DETAIL {name}: tablespace=tmpfs size={SIZE_MB}m full_after={:.1}s least_free_bytes={least_free} big_uploads_refused_503={big_refused} upload_after={} uploads_accepted={} bug_log_lines={}",
        filled_after.as_secs_f64(),
        after.key(),
        accepted.len(),
        bugs.len()
    );

    let mut checks = verify::Checks::default();
    checks.none("statuses while the database's disk was full", &bad);
    found.check(&mut checks);
    leaks.check(&mut checks);
    checks.none("service log: bugs", &bugs);
    checks.that(
        big_refused >= 1,
        "no big upload was refused: the tablespace never filled",
    );
    checks.that(
        after.is_ok(),
        format!("upload after the filesystem grew: {}", after.key()),
    );
    checks.finish(name);
}

/// A big upload was answered 503 (the tablespace is full).
fn refused_big(rec: &Recorder) -> bool {
    rec.samples()
        .iter()
        .any(|s| s.op == "upload_big" && s.outcome.status() == Some(503))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_11_pg_disk_full() {
    bounded("pg_disk_full", Duration::from_secs(120), run()).await;
}
