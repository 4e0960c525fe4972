//! Scenario 10: an orphan the store will not delete. s3s-fs keeps each object as a file; the
//! scenario makes the first orphan's file immutable (`chattr +i`: unlink fails with EPERM, even
//! for root), so every DeleteObject of it fails with a 500. The reconciliation passes over it
//! and deletes every other orphan; the objects of live rows stay. Before, the walk ended at the
//! first failed delete, so one such object (listed first, pass after pass) kept every orphan
//! after it forever. Then sixteen such objects in a row, as a store that is down answers:
//! a service's walk ends there, and its next walk lists from after them and deletes the
//! orphan listed after them (before, every walk ended at the same sixteen).

use std::{path::Path, process::Command, time::Duration};

use rand::{rngs::StdRng, SeedableRng};
use uuid::Uuid;

use crate::{
    harness::{bounded, Pg, S3s, Scratch, Service, ServiceConfig, BUCKET, PREFIX},
    load::{payload, Api, Recorder},
    verify,
};

/// Orphans the store deletes, listed after the one it will not.
const ORPHANS: usize = 5;

/// How long a sweeping service may take to delete the orphan after the undeletable run:
/// two walks, the first with sixteen failing deletes and the SDK's retries of each.
const LATE_DEADLINE: Duration = Duration::from_secs(60);

/// `ORPHAN_FAILURES_IN_A_ROW_MAX` in src/sweep.rs: failed deletes in a row that end a walk.
const IN_A_ROW: usize = 16;

/// The `i`th key of the ones made undeletable, of workspace `ws`: they sort first among its
/// keys, in order. Orphans are objects of a workspace the database knows (one it does not
/// is another deployment's, left alone).
fn stuck_key(ws: Uuid, i: usize) -> String {
    format!("{PREFIX}{ws}/00000000-0000-0000-0000-{i:012}")
}

async fn put(client: &aws_sdk_s3::Client, key: &str) {
    client
        .put_object()
        .bucket(BUCKET)
        .key(key)
        .body(b"orphaned".to_vec().into())
        .send()
        .await
        .expect("put an orphan");
}

/// Sets or clears the immutable attribute of `path`.
fn immutable(path: &Path, on: bool) {
    let flag = if on { "+i" } else { "-i" };
    let out = Command::new("chattr")
        .arg(flag)
        .arg(path)
        .output()
        .expect("run chattr (e2fsprogs)");
    assert!(
        out.status.success(),
        "chattr {flag} {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Clears the attribute however the scenario ends, so its scratch folder can be removed.
struct Mutable<'a>(&'a Path);

impl Drop for Mutable<'_> {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(self.0).status();
    }
}

async fn run() {
    let name = "undeletable_orphan";
    let scratch = Scratch::new(name);
    let pg = Pg::start(&scratch);
    let s3 = S3s::start(&scratch).await;
    let config = ServiceConfig::new(&pg.url(), scratch.sub("spool")).s3("s3", &s3);
    let service = Service::start(config.clone(), scratch.path().join("service.log")).await;
    let rec = Recorder::new();
    let api = Api::new(&service.base(), &rec);

    // Two live files: their objects must survive every reconciliation.
    let (ws, token) = api.register().await;
    let mut rng = StdRng::seed_from_u64(1000);
    let files: Vec<(String, Vec<u8>)> = (0..2)
        .map(|i| (format!("live-{i}.bin"), payload(&mut rng, 2000 + i)))
        .collect();
    let (outcome, accepted) = api.upload(ws, &token, &files).await;
    assert!(outcome.is_ok(), "set-up upload: {outcome:?}");
    let live = s3.keys().await;
    assert_eq!(live.len(), 2, "one object per live file: {live:?}");

    // Orphans under the prefix; the one the store will not delete sorts first.
    let client = s3.client();
    let stuck = stuck_key(ws, 0);
    let orphans: Vec<String> = (0..ORPHANS)
        .map(|_| format!("{PREFIX}{ws}/{}", Uuid::new_v4()))
        .collect();
    for key in std::iter::once(&stuck).chain(&orphans) {
        put(&client, key).await;
    }
    let stuck_file = s3.data_path(&stuck);
    immutable(&stuck_file, true);
    let _mutable = Mutable(&stuck_file);

    let started = std::time::Instant::now();
    let sweep = config.sweep();
    let took = started.elapsed();
    let mut left = s3.keys().await;
    left.sort();
    let mut want: Vec<String> = live.iter().cloned().chain([stuck.clone()]).collect();
    want.sort();
    println!(
        "CHAOS-DETAIL {name}: orphans={} undeletable=1 sweep={sweep} sweep_ms={} left={left:?}",
        ORPHANS + 1,
        took.as_millis()
    );

    let mut checks = verify::Checks::default();
    checks.that(
        sweep["orphans_deleted"] == ORPHANS,
        format!(
            "the sweep deleted {} orphans, not {ORPHANS}",
            sweep["orphans_deleted"]
        ),
    );
    checks.that(
        left == want,
        format!("left {left:?}, want the live objects and the undeletable one: {want:?}"),
    );
    for a in &accepted {
        let o = api.download_as("check", a).await;
        checks.that(
            o.is_ok(),
            format!("live file {} reads back: {o:?}", a.file_id),
        );
    }

    // As many failures in a row as a store that is down gives: that walk ends there, and the
    // next one lists from after them, so an orphan listed after them goes then (a service
    // keeps where its walk ended; a `sweep` run starts afresh). Before, every walk ended at
    // the same sixteen and the orphan stayed forever.
    let more: Vec<String> = (1..IN_A_ROW).map(|i| stuck_key(ws, i)).collect();
    let late = format!("{PREFIX}{ws}/ffffffff-ffff-ffff-ffff-ffffffffffff");
    for key in more.iter().chain([&late]) {
        put(&client, key).await;
    }
    let more_files: Vec<_> = more.iter().map(|k| s3.data_path(k)).collect();
    for f in &more_files {
        immutable(f, true);
    }
    let _more_mutable: Vec<Mutable> = more_files.iter().map(|f| Mutable(f)).collect();
    let sweeping = config
        .clone()
        .with("SWEEP_INTERVAL", "1s")
        // the shortest grace a replica takes (twice UPLOAD_BODY_TIMEOUT)
        .with("UPLOAD_BODY_TIMEOUT", "1s")
        .with("ORPHAN_GRACE", "2s");
    let started = std::time::Instant::now();
    let sweeper = Service::start(sweeping, scratch.path().join("sweeping.log")).await;
    while s3.keys().await.contains(&late) && started.elapsed() < LATE_DEADLINE {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let took = started.elapsed();
    let events: Vec<(String, String)> = sweeper
        .log_lines()
        .iter()
        .filter_map(|l| {
            Some((
                l["event"].as_str()?.to_string(),
                l["key"].as_str()?.to_string(),
            ))
        })
        .filter(|(event, _)| event.starts_with("orphan_"))
        .collect();
    let last_stuck = stuck_key(ws, IN_A_ROW - 1);
    let ended = events
        .iter()
        .position(|e| *e == ("orphan_walk_ended".to_string(), last_stuck.clone()));
    let late_gone = events
        .iter()
        .position(|e| *e == ("orphan_deleted".to_string(), late.clone()));
    let left = s3.keys().await;
    println!(
        "CHAOS-DETAIL {name}: undeletable_in_a_row={IN_A_ROW} walk_ended_at={ended:?} late_deleted_at={late_gone:?} late_gone_ms={} events={}",
        took.as_millis(),
        events.len()
    );
    checks.that(
        ended.is_some_and(|e| late_gone.is_some_and(|g| e < g)),
        format!(
            "a walk ends at the {IN_A_ROW}th failure in a row, the next deletes the orphan after them: {events:?}"
        ),
    );
    checks.that(
        !left.contains(&late) && (0..IN_A_ROW).all(|i| left.contains(&stuck_key(ws, i))),
        format!("left {left:?}: the orphan after the undeletable ones is gone, they stay"),
    );
    checks.finish(name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_10_an_undeletable_orphan_does_not_stall_the_reconciliation() {
    bounded("undeletable_orphan", Duration::from_secs(120), run()).await;
}
