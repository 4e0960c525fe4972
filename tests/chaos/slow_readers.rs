//! Scenario 7: downloads whose clients read in a trickle or not at all, reopened as soon as
//! they are given up, from workspaces of their own, while other workspaces' clients run
//! normally and must all succeed (SPEC §10: no client can affect another). The service must
//! cut every slow download itself (RESPONSE_MIN_RATE) long before its client gives up, and
//! hold nothing of them afterwards.

use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use rand::{rngs::StdRng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{
    harness::{bounded, Pg, Scratch, Service, ServiceConfig},
    load::{payload, Api, Outcome, Recorder, Retry, Summary, Worker},
    verify,
};

/// Slow-reader workspaces, each with two connections at a time (under the per-workspace
/// download cap, so they never see a 429 that would end their download early).
const SLOW_WORKSPACES: usize = 6;
const PER_WORKSPACE: usize = 2;
const NORMAL_WORKERS: usize = 4;
const DOWNLOAD_SIZE: usize = 8 * 1024 * 1024;
/// A slow client gives up on its download after this long, then opens another.
const CLIENT_PATIENCE: Duration = Duration::from_secs(4);
const ATTACK: Duration = Duration::from_secs(12);

/// One slow download: reads 256 bytes every 100 ms (2.5 KB/s) or nothing, through a 4 KiB
/// receive buffer, until CLIENT_PATIENCE has passed or the connection ends.
async fn slow_download(addr: &str, path: &str, token: &str, trickle: bool) {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut sock = sock.connect(addr.parse().unwrap()).await.unwrap();
    let head =
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\r\n");
    sock.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 256];
    while started.elapsed() < CLIENT_PATIENCE {
        if trickle {
            match tokio::time::timeout(Duration::from_millis(100), sock.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return,
                _ => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_7_slow_readers() {
    bounded("slow_readers", Duration::from_secs(120), slow_readers()).await;
}

async fn slow_readers() {
    let scratch = Scratch::new("slow_readers");
    let pg = Pg::start(&scratch);
    let spool = scratch.sub("spool");
    let config = ServiceConfig::new(&pg.url(), spool.clone())
        .with("RESPONSE_RATE_WINDOW", "1s")
        .with("RESPONSE_IDLE_TIMEOUT", "60s");
    let service = Service::start(config, scratch.path().join("service.log")).await;
    let base = service.base();
    let rec = Recorder::new();
    let api = Api::new(&base, &rec);
    let addr = format!("127.0.0.1:{}", service.port);

    let mut slow = Vec::new();
    for w in 0..SLOW_WORKSPACES {
        let (ws, token) = api.register().await;
        let mut rng = StdRng::seed_from_u64(2000 + w as u64);
        let file = (format!("slow-{w}.bin"), payload(&mut rng, DOWNLOAD_SIZE));
        let (o, acc) = api.upload(ws, &token, &[file]).await;
        assert!(o.is_ok(), "set-up upload: {o:?}");
        let path = format!(
            "/workspaces/{ws}/pending-uploads/{}/content",
            acc[0].file_id
        );
        slow.push((path, token));
    }

    let stop = Arc::new(AtomicBool::new(false));
    let mut normal = Vec::new();
    for w in 0..NORMAL_WORKERS {
        let (ws, token) = api.register().await;
        let worker = Worker {
            api: api.clone(),
            ws,
            token,
            seed: 70 + w as u64,
            sizes: 1..3_000_000,
            files: 1..=2,
            retry: Retry::Never,
            ack_every: 3,
            page: 50,
        };
        normal.push(tokio::spawn(worker.run(stop.clone(), None)));
    }

    rec.fault_begin();
    let opened = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for (w, (path, token)) in slow.iter().cloned().enumerate() {
        for c in 0..PER_WORKSPACE {
            let (addr, path, token, rec, opened) = (
                addr.clone(),
                path.clone(),
                token.clone(),
                rec.clone(),
                opened.clone(),
            );
            let trickle = (w + c) % 2 == 0;
            tasks.push(tokio::spawn(async move {
                let attack = Instant::now();
                while attack.elapsed() < ATTACK {
                    let started = Instant::now();
                    opened.fetch_add(1, Ordering::Relaxed);
                    slow_download(&addr, &path, &token, trickle).await;
                    let kind = if trickle { "trickle" } else { "never" };
                    rec.record("slow_reader", started, Outcome::Dropped, kind.into());
                }
            }));
        }
    }
    // Sample the download slots the slow clients hold while they are all connected.
    let mut held_samples = Vec::new();
    let sampling = Instant::now();
    while sampling.elapsed() < ATTACK {
        tokio::time::sleep(Duration::from_millis(250)).await;
        held_samples.push(
            service
                .metric("pending_uploads_downloads_in_progress")
                .await,
        );
    }
    for t in tasks {
        t.await.unwrap();
    }
    rec.fault_end(Duration::ZERO);
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let mut feeds = Vec::new();
    for n in normal {
        feeds.push(n.await.unwrap());
    }

    // ---- checks
    let opened = opened.load(Ordering::Relaxed);
    let too_slow = service
        .metric("pending_uploads_responses_cut_total{reason=\"too_slow\"}")
        .await as usize;
    let idle = service
        .metric("pending_uploads_responses_cut_total{reason=\"idle\"}")
        .await as usize;
    let held_after = service
        .metric("pending_uploads_downloads_in_progress")
        .await;
    let samples = rec.samples();
    let normal_failures = verify::violations(&samples, |s| {
        if s.op == "slow_reader" || s.outcome.is_ok() {
            Ok(())
        } else {
            Err(format!("a normal client got {}", s.outcome.key()))
        }
    });
    let pool = pg.pool().await;
    let acked: HashSet<uuid::Uuid> = feeds.iter().flat_map(|f| f.acked.clone()).collect();
    let accepted = rec.accepted();
    let found = verify::Findings::of_uploads(&api, &pool, &accepted).await;
    let leaks = verify::Leaks::settled(&pool, &spool, &service).await;
    let bugs = service.bug_lines();
    let slow_clients = (SLOW_WORKSPACES * PER_WORKSPACE) as f64;
    let mean_held = held_samples.iter().sum::<f64>() / held_samples.len().max(1) as f64;

    Summary::print(
        &rec,
        "slow_readers",
        found.lost_count(),
        found.orphaned_count(),
        leaks.count(),
    );
    println!(
        "CHAOS-DETAIL slow_readers: slow_downloads_opened={opened} cut_too_slow={too_slow} cut_idle={idle} slots_held_mean={mean_held:.1} of {slow_clients} slow clients (normal downloads included) slots_held_after={held_after} normal_uploads_accepted={} acked={} bug_log_lines={}",
        accepted.len(),
        acked.len(),
        bugs.len()
    );

    let mut checks = verify::Checks::default();
    checks.none("normal clients during the slow readers", &normal_failures);
    found.check(&mut checks);
    checks.none("service log: bugs", &bugs);
    leaks.check(&mut checks);
    // Every slow download is cut by the service (a 1 s window of waiting) well before its
    // client gives up (4 s); a few at the end may still be waiting when the attack stops.
    checks.that(
        too_slow + idle + (slow_clients as usize) >= opened,
        format!("{opened} slow downloads, but the service cut only {too_slow} (too_slow) + {idle} (idle)"),
    );
    checks.that(
        mean_held < slow_clients * 0.75,
        format!("slow clients kept their slots: {mean_held:.1} held on average of {slow_clients}"),
    );
    checks.that(
        held_after == 0.0,
        format!("{held_after} download slots still held after every client left"),
    );
    checks.that(
        accepted.len() >= 20,
        format!("the normal load barely ran: {} uploads", accepted.len()),
    );
    checks.finish("slow_readers");
}
