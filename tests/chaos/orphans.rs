//! Scenario 10: an orphan the store will not delete. s3s-fs keeps each object as a file; the
//! scenario makes the first orphan's file immutable (`chattr +i`: unlink fails with EPERM, even
//! for root), so every DeleteObject of it fails with a 500. The reconciliation passes over it
//! and deletes every other orphan; the objects of live rows stay. Before, the walk ended at the
//! first failed delete, so one such object (listed first, pass after pass) kept every orphan
//! after it forever.

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
    let stuck = format!("{PREFIX}00000000-0000-0000-0000-000000000000/stuck");
    let mut orphans: Vec<String> = (0..ORPHANS)
        .map(|_| format!("{PREFIX}{}/{}", Uuid::new_v4(), Uuid::new_v4()))
        .collect();
    for key in std::iter::once(&stuck).chain(&orphans) {
        client
            .put_object()
            .bucket(BUCKET)
            .key(key)
            .body(b"orphaned".to_vec().into())
            .send()
            .await
            .expect("put an orphan");
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
    orphans.sort();
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
    checks.finish(name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_10_an_undeletable_orphan_does_not_stall_the_reconciliation() {
    bounded("undeletable_orphan", Duration::from_secs(90), run()).await;
}
