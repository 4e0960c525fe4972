//! `longpoll`: the activity feed's `wait=` (bytea).
//!
//! (a) upload-to-poller latency: one poller per workspace waits (`wait=30`) on its cursor; an
//!     uploader sends 1 KiB to a random workspace every ~50 ms (each upload its own task, so
//!     the schedule holds); latency = the poller's answer − the upload's request start (and −
//!     its response);
//! (b) the same across two replicas on one database: pollers on A, uploads to B;
//! (c) 10,000 raw HTTP/1.1 pollers (`wait=60`) over 1,000 workspaces on one replica: service
//!     RSS and database connections not idle while they wait, then one upload, which must
//!     reach its workspace's pollers (and only them).

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use rand::Rng;
use serde_json::Value;
use sqlx::{Connection, PgConnection, Row};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::{mpsc, Semaphore},
    task::JoinSet,
};

use crate::harness::{
    concurrently, db_name, drop_db, fresh_db, http_client, payload, quantile, upload,
    whole_response, workspaces, Env, Service, Spec, Ws,
};

pub struct Opts {
    pub pollers: usize,
    pub uploads: usize,
    pub interval: Duration,
    pub idle_pollers: usize,
    pub idle_workspaces: usize,
}

struct Delivery {
    scenario: String,
    uploads: usize,
    received: usize,
    from_start: Vec<f64>,
    from_response: Vec<f64>,
    early: usize,
}

pub async fn run(env: &Env, o: &Opts) {
    let db = fresh_db(&env.server).await;
    let spec = |_: ()| Spec {
        bin: &env.bin,
        db: &db,
        backend: "bytea",
        prefix: "unused/",
        extra: &[],
    };
    let a = Service::start(env, spec(())).await;
    let one = delivery(
        format!(
            "one replica, {} pollers on {} workspaces",
            o.pollers, o.pollers
        ),
        &a.base,
        &a.base,
        o,
    )
    .await;
    let b = Service::start(env, spec(())).await;
    let two = delivery(
        format!(
            "two replicas, one database: pollers on A, uploads to B ({} pollers)",
            o.pollers
        ),
        &a.base,
        &b.base,
        o,
    )
    .await;
    drop((a, b));
    print_delivery(o, &[one, two]);
    // MAX_LONG_POLLS (10,000 by default) must hold every idle poller.
    let max = o.idle_pollers.max(10_000).to_string();
    let svc = Service::start(
        env,
        Spec {
            extra: &[("MAX_LONG_POLLS", &max)],
            ..spec(())
        },
    )
    .await;
    idle(env, &svc, &db, o).await;
    drop(svc);
    drop_db(&env.server, &db).await;
}

/// Workspaces with one staged file each, and each one's newest activity row (the cursor).
async fn seeded(http: &reqwest::Client, base: &str, n: usize) -> Vec<(Ws, String)> {
    let wss = workspaces(http, base, n).await;
    let data = payload(1024);
    concurrently(n, 8, |i| {
        let ws = wss[i].clone();
        let data = &data;
        async move {
            upload(http, base, &ws.id, data, "seed.txt").await;
            let rows = crate::harness::activity(http, base, &ws, "limit=1").await;
            let cursor = rows[0]["id"].as_str().unwrap().to_string();
            (ws, cursor)
        }
    })
    .await
}

/// The service's `long_polls_waiting` gauge (None if it has none).
async fn waiting(http: &reqwest::Client, base: &str) -> Option<usize> {
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find(|l| l.starts_with("pending_uploads_long_polls_waiting "))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as usize)
}

/// Waits until `n` long polls are held (or, without the gauge, a few seconds); returns the
/// seconds it took.
async fn until_waiting(http: &reqwest::Client, base: &str, n: usize, limit: Duration) -> f64 {
    let started = Instant::now();
    while started.elapsed() < limit {
        match waiting(http, base).await {
            Some(w) if w >= n => break,
            None if started.elapsed() > Duration::from_secs(3) => break,
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    started.elapsed().as_secs_f64()
}

async fn delivery(scenario: String, poll_base: &str, upload_base: &str, o: &Opts) -> Delivery {
    let http = http_client();
    let wss = seeded(&http, upload_base, o.pollers).await;
    let (tx, mut rx) = mpsc::unbounded_channel::<(String, Instant)>();
    let mut pollers = JoinSet::new();
    for (ws, cursor) in wss.clone() {
        let (http, tx, base) = (http.clone(), tx.clone(), poll_base.to_string());
        pollers.spawn(async move {
            let mut cursor = cursor;
            loop {
                let Ok(resp) = http
                    .get(format!(
                        "{base}/workspaces/{}/activity?type=a2a_receive&since_id={cursor}&wait=30",
                        ws.id
                    ))
                    .bearer_auth(&ws.token)
                    .send()
                    .await
                else {
                    return;
                };
                let Ok(rows) = resp.json::<Vec<Value>>().await else {
                    return;
                };
                let now = Instant::now();
                for row in &rows {
                    if let Some(id) = row["request_body"]["file_id"].as_str() {
                        let _ = tx.send((id.to_string(), now));
                    }
                }
                if let Some(last) = rows.last().and_then(|r| r["id"].as_str()) {
                    cursor = last.to_string();
                }
            }
        });
    }
    drop(tx);
    until_waiting(&http, poll_base, o.pollers, Duration::from_secs(30)).await;
    let data = payload(1024);
    let mut uploads = JoinSet::new();
    let mut tick = tokio::time::interval(o.interval);
    for i in 0..o.uploads {
        tick.tick().await;
        let w = rand::thread_rng().gen_range(0..wss.len());
        let (http, data, ws, base) = (
            http.clone(),
            data.clone(),
            wss[w].0.id.clone(),
            upload_base.to_string(),
        );
        uploads.spawn(async move {
            let start = Instant::now();
            let id = upload(&http, &base, &ws, &data, &format!("lp{i}.txt")).await;
            (id, start, Instant::now())
        });
    }
    let sent: Vec<(String, Instant, Instant)> = uploads.join_all().await;
    let mut got: HashMap<String, Instant> = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while got.len() < sent.len() {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some((id, at))) => {
                got.entry(id).or_insert(at);
            }
            _ => break,
        }
    }
    pollers.abort_all();
    let mut d = Delivery {
        scenario,
        uploads: sent.len(),
        received: 0,
        from_start: Vec::new(),
        from_response: Vec::new(),
        early: 0,
    };
    for (id, start, end) in &sent {
        if let Some(at) = got.get(id) {
            d.received += 1;
            d.from_start
                .push(at.duration_since(*start).as_secs_f64() * 1000.0);
            if at < end {
                d.early += 1;
            }
            d.from_response
                .push(at.saturating_duration_since(*end).as_secs_f64() * 1000.0);
        }
    }
    d.from_start.sort_by(f64::total_cmp);
    d.from_response.sort_by(f64::total_cmp);
    eprintln!(
        "longpoll {}: {}/{} received, p50 {:.1} ms, p99 {:.1} ms",
        d.scenario,
        d.received,
        d.uploads,
        quantile(&d.from_start, 0.5),
        quantile(&d.from_start, 0.99)
    );
    d
}

fn print_delivery(o: &Opts, rows: &[Delivery]) {
    println!(
        "\nLong poll, upload to poller (bytea; pollers hold `wait=30` on their cursors; a 1 KiB upload to a random workspace every {} ms; latency from the upload's request start to the poller's answer, and from the upload's response):\n",
        o.interval.as_millis()
    );
    println!("| scenario | uploads | received | p50 ms | p99 ms | max ms | p50 ms after response | p99 ms after response | answered before the upload's response |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for d in rows {
        println!(
            "| {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} |",
            d.scenario,
            d.uploads,
            d.received,
            quantile(&d.from_start, 0.5),
            quantile(&d.from_start, 0.99),
            d.from_start.last().copied().unwrap_or(f64::NAN),
            quantile(&d.from_response, 0.5),
            quantile(&d.from_response, 0.99),
            d.early
        );
    }
}

/// One raw poller's answer: its workspace index, when it arrived, its status line.
type Answer = (usize, Instant, String);

/// Holds one HTTP/1.1 long poll on its own connection and reports the answer.
async fn raw_poller(
    addr: String,
    request: String,
    ws: usize,
    connect: Arc<Semaphore>,
    tx: mpsc::UnboundedSender<Answer>,
) {
    let mut stream = {
        let _slot = connect.acquire().await.unwrap();
        let mut s = match tokio::net::TcpStream::connect(&addr).await {
            Ok(s) => s,
            Err(e) => {
                let _ = tx.send((ws, Instant::now(), format!("connect: {e}")));
                return;
            }
        };
        if s.write_all(request.as_bytes()).await.is_err() {
            return;
        }
        s
    };
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if whole_response(&buf).is_some() {
                    break;
                }
            }
        }
    }
    let status = String::from_utf8_lossy(&buf)
        .lines()
        .next()
        .unwrap_or("closed")
        .to_string();
    let _ = tx.send((ws, Instant::now(), status));
}

async fn idle(env: &Env, svc: &Service, db: &str, o: &Opts) {
    let http = http_client();
    let n = o.idle_pollers;
    let wss = seeded(&http, &svc.base, o.idle_workspaces).await;
    let addr = svc.base.trim_start_matches("http://").to_string();
    let rss_before = svc.rss_mib();
    svc.reset_peak();
    let (tx, mut rx) = mpsc::unbounded_channel::<Answer>();
    let connect = Arc::new(Semaphore::new(256));
    let mut pollers = JoinSet::new();
    let started = Instant::now();
    for i in 0..n {
        let w = i % wss.len();
        let (ws, cursor) = &wss[w];
        let request = format!(
            "GET /workspaces/{}/activity?type=a2a_receive&since_id={cursor}&wait=60 HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\r\n",
            ws.id, ws.token
        );
        pollers.spawn(raw_poller(
            addr.clone(),
            request,
            w,
            connect.clone(),
            tx.clone(),
        ));
    }
    drop(tx);
    let setup = until_waiting(&http, &svc.base, n, Duration::from_secs(45)).await;
    let held = waiting(&http, &svc.base).await;
    let setup_total = started.elapsed().as_secs_f64();
    let _ = setup;
    // while they wait: RSS and the service's database connections, sampled
    let mut mon = PgConnection::connect(&env.server).await.unwrap();
    let (mut busy_max, mut conns_max, mut rss_max) = (0i64, 0i64, 0f64);
    let mut busy_seen = Vec::new();
    for _ in 0..6 {
        let rows = sqlx::query(
            "SELECT state, left(query, 80) FROM pg_stat_activity
             WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(db_name(db))
        .fetch_all(&mut mon)
        .await
        .unwrap();
        let busy: Vec<String> = rows
            .iter()
            .filter(|r| r.get::<Option<String>, _>(0).as_deref() != Some("idle"))
            .map(|r| {
                format!(
                    "{}: {}",
                    r.get::<Option<String>, _>(0).unwrap_or_default(),
                    r.get::<Option<String>, _>(1).unwrap_or_default()
                )
            })
            .collect();
        busy_max = busy_max.max(busy.len() as i64);
        conns_max = conns_max.max(rows.len() as i64);
        busy_seen.extend(busy);
        rss_max = rss_max.max(svc.rss_mib());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // nothing should have answered yet
    let mut early = 0;
    while let Ok(a) = rx.try_recv() {
        early += 1;
        if early <= 3 {
            eprintln!("  early answer: workspace {} {}", a.0, a.2);
        }
    }
    // one upload to workspace 0: its pollers (and only they) answer
    let target_pollers = (0..n).filter(|i| i % wss.len() == 0).count();
    let t0 = Instant::now();
    upload(&http, &svc.base, &wss[0].0.id, &payload(1024), "wake.txt").await;
    let mut reached = Vec::new();
    let mut others = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while reached.len() < target_pollers {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some((w, at, status))) if w == 0 && status.contains(" 200") => {
                reached.push(at.duration_since(t0).as_secs_f64() * 1000.0)
            }
            Ok(Some(_)) => others += 1,
            _ => break,
        }
    }
    reached.sort_by(f64::total_cmp);
    let peak = svc.peak_rss_mib();
    pollers.abort_all();
    while pollers.join_next().await.is_some() {}
    let busy_seen: std::collections::BTreeSet<String> = busy_seen.into_iter().collect();
    eprintln!(
        "longpoll idle: {} held, rss {rss_max:.0} MiB, busy db conns {busy_max}, reached {}/{target_pollers}",
        held.map_or("?".into(), |h| h.to_string()),
        reached.len()
    );
    println!(
        "\nLong poll, {n} waiting pollers on one replica (raw HTTP/1.1 connections, `wait=60`, {} workspaces; bytea):\n",
        wss.len()
    );
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| long polls held (service gauge `long_polls_waiting`) | {} (all connected after {setup_total:.1} s) |",
        held.map_or("no gauge".into(), |h| h.to_string())
    );
    println!("| service RSS MiB before / while waiting (max of 6 samples over 3 s) / peak | {rss_before:.0} / {rss_max:.0} / {peak:.0} |");
    println!(
        "| service database connections not idle while waiting (max of 6 samples) | {busy_max} |"
    );
    println!("| service database connections open | {conns_max} |");
    println!("| answered before any upload (should be 0) | {early} |");
    println!(
        "| one upload: its workspace's pollers answered | {} of {target_pollers}, p50 {:.1} ms, max {:.1} ms after the upload's start |",
        reached.len(),
        quantile(&reached, 0.5),
        reached.last().copied().unwrap_or(f64::NAN)
    );
    println!("| other pollers answered by that upload (should be 0) | {others} |");
    if !busy_seen.is_empty() {
        println!("\nNot-idle connections seen while waiting (state: query):\n");
        for b in busy_seen {
            println!("- `{}`", b.replace('`', "'"));
        }
    }
}
