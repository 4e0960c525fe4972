//! Scenario 6: the spool directory is a small tmpfs (8 MiB). Uploads bigger than the free
//! space get a clear 503 (`spool_unavailable`, Retry-After) and leave nothing: no rows, no
//! open spool files, the tmpfs empty again; smaller uploads beside them succeed or get the
//! same 503; afterwards uploads succeed again.

use std::{
    ffi::CString,
    path::{Path, PathBuf},
    process::Command,
    sync::{atomic::AtomicBool, Arc},
    time::Duration,
};

use rand::{rngs::StdRng, SeedableRng};

use crate::{
    harness::{bounded, settled_spool_leaks, Pg, Scratch, Service, ServiceConfig},
    load::{payload, Api, Fleet, Recorder, Retry, Summary, Worker},
    verify,
};

const SIZE_MB: u64 = 8;
const BIG: usize = 12 * 1024 * 1024;
const MEDIUM: usize = 5 * 1024 * 1024;

/// Bytes used and available on the filesystem holding `dir`.
pub fn usage(dir: &Path) -> (u64, u64) {
    let c = CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: statvfs fills the struct we pass; the path is a valid C string.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        assert_eq!(libc::statvfs(c.as_ptr(), &mut st), 0, "statvfs {dir:?}");
        let f = st.f_frsize as u64;
        (
            (st.f_blocks - st.f_bfree) as u64 * f,
            st.f_bavail as u64 * f,
        )
    }
}

/// A small spool filesystem: a tmpfs mounted for the scenario and always unmounted when this
/// drops (also when the scenario fails). Where mounting is not allowed, a folder on a
/// filesystem dedicated to this by the operator (`CHAOS_SPOOL_FALLBACK_DIR`) is filled with a
/// ballast file until SIZE_MB are left; the suite never fills a filesystem it was not given.
struct SmallSpool {
    dir: PathBuf,
    /// Bytes used on its filesystem when the scenario began.
    baseline: u64,
    mounted: bool,
    ballast: Option<PathBuf>,
    how: String,
}

impl SmallSpool {
    fn new(scratch: &Scratch) -> SmallSpool {
        let dir = scratch.sub("spool");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={SIZE_MB}m,mode=0700"))
            .arg("tmpfs")
            .arg(&dir)
            .output()
            .expect("run mount");
        if out.status.success() {
            return SmallSpool {
                baseline: usage(&dir).0,
                dir,
                mounted: true,
                ballast: None,
                how: format!("tmpfs size={SIZE_MB}m"),
            };
        }
        let why = String::from_utf8_lossy(&out.stderr).trim().to_string();
        let Some(fallback) = std::env::var_os("CHAOS_SPOOL_FALLBACK_DIR").map(PathBuf::from) else {
            panic!(
                "cannot mount a tmpfs for the spool ({why}); run as root, or set \
                 CHAOS_SPOOL_FALLBACK_DIR to a folder on a small filesystem the suite may fill"
            );
        };
        let dir = fallback.join(format!("pu-chaos-spool-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (_, avail) = usage(&dir);
        let fill = avail.saturating_sub(SIZE_MB * 1024 * 1024);
        let ballast = fallback.join(format!("pu-chaos-ballast-{}", std::process::id()));
        let f = std::fs::File::create(&ballast).unwrap();
        f.set_len(0).unwrap();
        // Real blocks, not a sparse file.
        let status = Command::new("fallocate")
            .arg("-l")
            .arg(fill.to_string())
            .arg(&ballast)
            .status()
            .expect("run fallocate");
        assert!(status.success(), "fallocate the ballast file");
        SmallSpool {
            baseline: usage(&dir).0,
            dir,
            mounted: false,
            ballast: Some(ballast),
            how: format!("mount refused ({why}): {fallback:?} filled to {SIZE_MB} MiB free"),
        }
    }
}

impl Drop for SmallSpool {
    fn drop(&mut self) {
        if self.mounted {
            crate::harness::unmount(&self.dir);
        } else {
            if let Some(b) = &self.ballast {
                let _ = std::fs::remove_file(b);
            }
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Clients that each send one file again and again, to a workspace of their own, until
/// stopped.
#[derive(Default)]
pub struct Uploaders {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Uploaders {
    /// One more, its `size`-byte file named `<prefix>-<seed>-<n>.bin`, recorded as `op`.
    pub fn start(
        &mut self,
        api: &Api,
        op: &'static str,
        prefix: &'static str,
        size: usize,
        seed: u64,
    ) {
        let (api, stop) = (api.clone(), self.stop.clone());
        self.tasks
            .push(tokio::spawn(uploader(api, op, prefix, size, stop, seed)));
    }

    /// Stops them all, each after its request in flight.
    pub async fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
    }
}

/// Uploads one `size`-byte file named `<prefix>-<seed>-<n>.bin` again and again until stopped.
async fn uploader(
    api: Api,
    op: &'static str,
    prefix: &'static str,
    size: usize,
    stop: Arc<AtomicBool>,
    seed: u64,
) {
    let (ws, token) = api.register().await;
    let mut rng = StdRng::seed_from_u64(seed);
    let data = payload(&mut rng, size);
    let mut n = 0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        n += 1;
        api.upload_as(
            op,
            ws,
            &token,
            &[(format!("{prefix}-{seed}-{n}.bin"), data.clone())],
        )
        .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn run() {
    let name = "spool_full";
    let scratch = Scratch::new(name);
    let pg = Pg::start(&scratch);
    // Declared before the service: dropped (unmounted) after it.
    let spool = SmallSpool::new(&scratch);
    let config = ServiceConfig::new(&pg.url(), spool.dir.clone());
    let service = Service::start(config, scratch.path().join("service.log")).await;
    let rec = Recorder::new();
    let api = Api::new(&service.base(), &rec);

    let fleet = Fleet::start(&api, 3, |i, ws, token| Worker {
        api: api.clone(),
        ws,
        token,
        seed: 600 + i as u64,
        sizes: 1..200_000,
        files: 1..=2,
        retry: Retry::Never,
        ack_every: 0,
        page: 50,
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    rec.fault_begin();
    let mut uploaders = Uploaders::default();
    for i in 0..2 {
        uploaders.start(&api, "upload_big", "big", BIG, 610 + i);
    }
    uploaders.start(&api, "upload_medium", "medium", MEDIUM, 620);
    tokio::time::sleep(Duration::from_secs(8)).await;
    uploaders.stop().await;
    rec.fault_end(Duration::ZERO);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _feeds = fleet.stop().await;

    // ---- checks
    let samples = rec.samples();
    let big: Vec<_> = samples.iter().filter(|s| s.op == "upload_big").collect();
    let big_refused = big
        .iter()
        .filter(|s| verify::clean_503(&s.outcome, &["spool_unavailable"]).is_ok())
        .count();
    let bad = verify::fault_violations(&rec, &samples, "the disk-full window", |s| {
        verify::clean_503(&s.outcome, &["spool_unavailable"])
    });
    let pool = pg.pool().await;
    let big_rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pending_uploads WHERE filename LIKE 'big-%'")
            .fetch_one(&pool)
            .await
            .unwrap();
    let (spool_files, spool_fds) =
        settled_spool_leaks(&spool.dir, service.pid(), Duration::from_secs(5)).await;
    let used = usage(&spool.dir).0.saturating_sub(spool.baseline);
    // Afterwards the spool takes uploads again (a 1 MiB file, one request).
    let (ws, token) = api.register().await;
    let mut rng = StdRng::seed_from_u64(690);
    let (after, _) = api
        .upload(
            ws,
            &token,
            &[("after.bin".into(), payload(&mut rng, 1 << 20))],
        )
        .await;
    let accepted = rec.accepted();
    let found = verify::Findings::of_uploads(&api, &pool, &accepted).await;
    let leaks = verify::Leaks {
        idle_tx: verify::idle_in_transaction(&pool).await,
        spool_files,
        spool_fds,
    };
    let bugs = service.bug_lines();

    Summary::print(
        &rec,
        name,
        found.lost_count(),
        found.orphaned_count() + big_rows as usize,
        leaks.count() + usize::from(used > 0),
    );
    println!(
        "CHAOS-DETAIL {name}: spool={} big_uploads_refused_503={big_refused} big_rows={big_rows} spool_bytes_used_after={used} upload_after={} uploads_accepted={} bug_log_lines={}",
        spool.how,
        after.key(),
        accepted.len(),
        bugs.len()
    );

    let mut checks = verify::Checks::default();
    checks.none("statuses while the spool was full", &bad);
    found.check(&mut checks);
    checks.none("service log: bugs", &bugs);
    checks.that(
        big_rows == 0,
        format!("{big_rows} rows of uploads bigger than the spool"),
    );
    checks.that(
        big_refused == big.len() && big_refused >= 2,
        format!(
            "uploads bigger than the spool: {} sent, {big_refused} refused with a clean 503",
            big.len()
        ),
    );
    leaks.check(&mut checks);
    checks.that(
        used == 0,
        format!("{used} bytes still used on the spool filesystem"),
    );
    checks.that(
        after.is_ok(),
        format!("upload after the fault: {}", after.key()),
    );
    checks.finish(name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_6_spool_full() {
    bounded("spool_full", Duration::from_secs(120), run()).await;
}
