//! Scenario 1: clients that hang up at every phase of a request, a few hundred times, while
//! other workspaces' clients run normally and must all succeed (SPEC §10: cancellation never
//! leaks).

use std::{
    collections::{HashMap, HashSet},
    sync::{atomic::AtomicBool, Arc},
    time::{Duration, Instant},
};

use rand::{rngs::StdRng, Rng, SeedableRng};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use uuid::Uuid;

use crate::{
    harness::{bounded, Pg, Scratch, Service, ServiceConfig},
    load::{payload, sha256, Accepted, Api, Outcome, Recorder, Retry, Summary, Worker},
    verify,
};

/// Where a victim hangs up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Phase {
    /// Request head sent (with a Content-Length), no body.
    HeadersOnly,
    /// Half the body sent.
    MidBody,
    /// The whole (small) body sent, gone before the answer.
    AfterLastByte,
    /// The whole multi-MB body sent, gone while the service commits it.
    MidCommit,
    /// A download's headers and first bytes read.
    MidDownload,
}

const PLAN: [(Phase, usize); 5] = [
    (Phase::HeadersOnly, 70),
    (Phase::MidBody, 70),
    (Phase::AfterLastByte, 70),
    (Phase::MidCommit, 40),
    (Phase::MidDownload, 50),
];
/// Concurrent victims (each with a workspace of its own).
const VICTIMS: usize = 8;
const NORMAL_WORKERS: usize = 4;
const BIG: usize = 3 * 1024 * 1024;
const DOWNLOAD_SIZE: usize = 4 * 1024 * 1024;

fn multipart_body(boundary: &str, name: &str, data: &[u8]) -> Vec<u8> {
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(data);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    body
}

/// A victim's upload whose outcome it never learns: if the service committed it, it must be
/// whole (name → digest).
struct Sent {
    phase: Phase,
    ws: Uuid,
    token: String,
    name: String,
    size: usize,
    sha256: [u8; 32],
}

async fn hang_up(sock: TcpStream, rst: bool) {
    if rst {
        let _ = sock.set_zero_linger();
    }
    drop(sock);
}

/// One victim request; returns the upload it may have committed.
#[allow(clippy::too_many_arguments)]
async fn victim(
    addr: &str,
    phase: Phase,
    ws: Uuid,
    token: &str,
    download: &Accepted,
    n: usize,
    rng: &mut StdRng,
) -> Option<Sent> {
    let rst = n % 2 == 0;
    let mut sock = match TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => panic!("victim could not connect: {e}"),
    };
    if phase == Phase::MidDownload {
        let head = format!(
            "GET /workspaces/{}/pending-uploads/{}/content HTTP/1.1\r\nHost: {addr}\r\n\
             Authorization: Bearer {}\r\n\r\n",
            download.ws, download.file_id, download.token
        );
        sock.write_all(head.as_bytes()).await.unwrap();
        let want = rng.gen_range(1..DOWNLOAD_SIZE / 2);
        let mut got = 0;
        let mut buf = vec![0u8; 64 * 1024];
        while got < want {
            match tokio::time::timeout(Duration::from_secs(10), sock.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(k)) => got += k,
                Err(_) => panic!("mid-download victim: no bytes for 10 s"),
            }
        }
        hang_up(sock, rst).await;
        return None;
    }
    let size = match phase {
        Phase::MidCommit => BIG + rng.gen_range(0..1024 * 1024),
        _ => rng.gen_range(1024..256 * 1024),
    };
    let data = payload(rng, size);
    let name = format!("victim-{n}.bin");
    let boundary = format!("chaosboundary{n}");
    let body = multipart_body(&boundary, &name, &data);
    let head = format!(
        "POST /workspaces/{ws}/chat/uploads HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let sent = Sent {
        phase,
        ws,
        token: token.to_string(),
        name,
        size,
        sha256: sha256(&data),
    };
    sock.write_all(head.as_bytes()).await.unwrap();
    match phase {
        Phase::HeadersOnly => {
            tokio::time::sleep(Duration::from_millis(rng.gen_range(0..20))).await;
            hang_up(sock, rst).await;
            None
        }
        Phase::MidBody => {
            let cut = rng.gen_range(1..body.len());
            // The service may already have refused (e.g. slots): a write error is fine.
            let _ = sock.write_all(&body[..cut]).await;
            hang_up(sock, rst).await;
            None
        }
        Phase::AfterLastByte => {
            let _ = sock.write_all(&body).await;
            let _ = sock.flush().await;
            hang_up(sock, rst).await;
            Some(sent)
        }
        Phase::MidCommit => {
            // A client gone at once cancels the request before its commit starts; one gone
            // a little later (commits of a few MB take tens of ms here) hits the commit.
            let _ = sock.write_all(&body).await;
            let _ = sock.flush().await;
            tokio::time::sleep(Duration::from_millis(rng.gen_range(0..250))).await;
            hang_up(sock, rst).await;
            Some(sent)
        }
        Phase::MidDownload => unreachable!(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_1_client_disconnects() {
    bounded(
        "client_disconnect",
        Duration::from_secs(120),
        client_disconnects(),
    )
    .await;
}

async fn client_disconnects() {
    let scratch = Scratch::new("disconnect");
    let pg = Pg::start(&scratch);
    let spool = scratch.sub("spool");
    let config = ServiceConfig::new(&pg.url(), spool.clone())
        // A small pool: a connection left out of step would be handed out again at once.
        .with("DATABASE_MAX_CONNECTIONS", "6");
    let service = Service::start(config, scratch.path().join("service.log")).await;
    let rec = Recorder::new();
    let api = Api::new(&service.base(), &rec);
    let addr = format!("127.0.0.1:{}", service.port);

    // Victim workspaces, each with one big file to abandon downloads of.
    let mut victims = Vec::new();
    for v in 0..VICTIMS {
        let (ws, token) = api.register().await;
        let mut rng = StdRng::seed_from_u64(1000 + v as u64);
        let file = (
            format!("download-{v}.bin"),
            payload(&mut rng, DOWNLOAD_SIZE),
        );
        let (o, acc) = api.upload(ws, &token, &[file]).await;
        assert!(o.is_ok(), "set-up upload: {o:?}");
        victims.push((ws, token, acc[0].clone()));
    }

    // Normal clients of other workspaces.
    let stop = Arc::new(AtomicBool::new(false));
    let mut normal = Vec::new();
    for w in 0..NORMAL_WORKERS {
        let (ws, token) = api.register().await;
        let worker = Worker {
            api: api.clone(),
            ws,
            token,
            seed: w as u64,
            sizes: 1..300_000,
            files: 1..=2,
            retry: Retry::Never,
            ack_every: 3,
            page: 50,
        };
        normal.push(tokio::spawn(worker.run(stop.clone(), None)));
    }

    // The victims: the plan shuffled and dealt to VICTIMS tasks.
    let mut plan: Vec<Phase> = PLAN
        .iter()
        .flat_map(|(p, n)| std::iter::repeat_n(*p, *n))
        .collect();
    let mut rng = StdRng::seed_from_u64(7);
    for i in (1..plan.len()).rev() {
        plan.swap(i, rng.gen_range(0..=i));
    }
    let total_victims = plan.len();
    rec.fault_begin();
    let mut tasks = Vec::new();
    for (v, (ws, token, download)) in victims.iter().cloned().enumerate() {
        let phases: Vec<(usize, Phase)> = plan
            .iter()
            .enumerate()
            .filter(|(i, _)| i % VICTIMS == v)
            .map(|(i, p)| (i, *p))
            .collect();
        let addr = addr.clone();
        let rec = rec.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(100 + v as u64);
            let mut sent = Vec::new();
            for (n, phase) in phases {
                let started = Instant::now();
                if let Some(s) = victim(&addr, phase, ws, &token, &download, n, &mut rng).await {
                    sent.push(s);
                }
                rec.record("victim", started, Outcome::Dropped, format!("{phase:?}"));
                tokio::time::sleep(Duration::from_millis(rng.gen_range(0..15))).await;
            }
            sent
        }));
    }
    let mut sent: Vec<Sent> = Vec::new();
    for t in tasks {
        sent.extend(t.await.unwrap());
    }
    // Let the normal clients run a moment past the last hang-up.
    tokio::time::sleep(Duration::from_secs(1)).await;
    rec.fault_end(Duration::ZERO);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut feeds = Vec::new();
    for n in normal {
        feeds.push(n.await.unwrap());
    }
    // Commits of the last victims may still run: give them the dependency timeout.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // ---- checks
    let samples = rec.samples();
    let normal_failures = verify::violations(&samples, |s| {
        if s.op == "victim" || s.outcome.is_ok() {
            Ok(())
        } else {
            Err(format!("a normal client got {}", s.outcome.key()))
        }
    });

    let pool = pg.pool().await;
    let acked: HashSet<Uuid> = feeds.iter().flat_map(|f| f.acked.clone()).collect();
    let accepted = rec.accepted();
    let lost = verify::lost_uploads(&api, &accepted, &HashSet::new()).await;

    // Victim uploads that committed must be whole: each row matches what was sent.
    let by_name: HashMap<(Uuid, String), &Sent> =
        sent.iter().map(|s| ((s.ws, s.name.clone()), s)).collect();
    let victim_ws: Vec<Uuid> = victims.iter().map(|v| v.0).collect();
    let rows: Vec<(Uuid, Uuid, String, i64)> = sqlx::query_as(
        "SELECT workspace_id, file_id, filename, size_bytes FROM pending_uploads
         WHERE workspace_id = ANY($1) AND filename LIKE 'victim-%'",
    )
    .bind(&victim_ws)
    .fetch_all(&pool)
    .await
    .unwrap();
    let verifier = api.verifier();
    let mut victim_problems = Vec::new();
    let mut committed: HashMap<String, usize> = HashMap::new();
    for (ws, file_id, name, _) in &rows {
        match by_name.get(&(*ws, name.clone())) {
            None => victim_problems.push(format!(
                "row {file_id} ({name}) from a victim that never sent its last byte"
            )),
            Some(s) => {
                *committed.entry(format!("{:?}", s.phase)).or_insert(0) += 1;
                let a = Accepted {
                    ws: s.ws,
                    token: s.token.clone(),
                    file_id: *file_id,
                    name: s.name.clone(),
                    size: s.size,
                    sha256: s.sha256,
                };
                let o = verifier.download_as("verify", &a).await;
                if !o.is_ok() {
                    victim_problems.push(format!(
                        "committed victim upload {file_id} ({name}): {}",
                        o.key()
                    ));
                }
            }
        }
    }
    let half = verify::half_states(&pool, &HashSet::new()).await;
    let leaks = verify::Leaks::settled(&pool, &spool, &service).await;
    let bugs = service.bug_lines();

    Summary::print(
        &rec,
        "client_disconnect",
        lost.len() + victim_problems.len(),
        half.len(),
        leaks.count(),
    );
    println!(
        "CHAOS-DETAIL client_disconnect: victims={total_victims} (plan {:?}) victim_uploads_sent_whole={} committed={} {committed:?} normal_uploads_accepted={} acked={} spool_files={} spool_fds={} idle_in_tx={} bug_log_lines={}",
        PLAN,
        sent.len(),
        rows.len(),
        accepted.len(),
        acked.len(),
        leaks.spool_files,
        leaks.spool_fds,
        leaks.idle_tx,
        bugs.len()
    );

    let mut checks = verify::Checks::default();
    checks.none("normal clients during the disconnects", &normal_failures);
    checks.none("accepted uploads that do not download intact", &lost);
    checks.none("victim uploads", &victim_problems);
    checks.none("half states", &half);
    checks.none("service log: bugs", &bugs);
    leaks.check(&mut checks);
    checks.that(
        accepted.len() >= 20,
        format!("the normal load barely ran: {} uploads", accepted.len()),
    );
    checks.finish("client_disconnect");
}
