//! `roundtrips`: database round trips per request over N requests of each kind, one kind per
//! window, at concurrency 1 after a warm-up, counted two ways: `pg_stat_statements` (`calls`
//! of the top-level statements run in the service's database; BEGIN/COMMIT/ROLLBACK count and
//! are shown apart), and on the wire by a counting proxy between the service and PostgreSQL
//! (`wire`), which also sees pings and does not count the statements deferred triggers run
//! inside COMMIT. The top statements of each kind are listed.

use bytes::Bytes;
use sqlx::{Connection, PgConnection, Row};

use crate::harness::{
    ack, activity, db_name, download, drop_db, fresh_db, http_client, payload, upload, workspace,
    ws_get, Env, Service, Spec, Ws,
};
use crate::wire::{split_host, Counts, Proxy};

struct Stmt {
    query: String,
    calls: i64,
    mean_ms: f64,
}

struct Measured {
    kind: &'static str,
    target: &'static str,
    n: usize,
    stmts: Vec<Stmt>,
    wire: Counts,
}

impl Measured {
    fn total(&self) -> i64 {
        self.stmts.iter().map(|s| s.calls).sum()
    }

    fn transaction_control(&self) -> i64 {
        self.stmts
            .iter()
            .filter(|s| {
                let q = s.query.trim_start().to_ascii_uppercase();
                [
                    "BEGIN",
                    "COMMIT",
                    "ROLLBACK",
                    "START TRANSACTION",
                    "SAVEPOINT",
                    "RELEASE",
                ]
                .iter()
                .any(|k| q.starts_with(k))
            })
            .map(|s| s.calls)
            .sum()
    }

    fn per_request(&self, calls: i64) -> f64 {
        calls as f64 / self.n as f64
    }
}

/// The monitoring connection: on the server's own database, so its statements are not
/// counted against the service's.
struct Monitor {
    conn: PgConnection,
    dbname: String,
}

impl Monitor {
    async fn connect(env: &Env, db: &str) -> Result<Monitor, String> {
        let mut conn = PgConnection::connect(&env.server)
            .await
            .map_err(|e| e.to_string())?;
        sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .execute(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        sqlx::query("SELECT pg_stat_statements_reset()")
            .execute(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        Ok(Monitor {
            conn,
            dbname: db_name(db).to_string(),
        })
    }

    async fn reset(&mut self) {
        sqlx::query("SELECT pg_stat_statements_reset()")
            .execute(&mut self.conn)
            .await
            .unwrap();
    }

    async fn snapshot(&mut self) -> Vec<Stmt> {
        sqlx::query(
            "SELECT query, calls, total_exec_time FROM pg_stat_statements
             WHERE dbid = (SELECT oid FROM pg_database WHERE datname = $1) AND toplevel
             ORDER BY calls DESC, total_exec_time DESC",
        )
        .bind(&self.dbname)
        .fetch_all(&mut self.conn)
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let calls: i64 = r.get(1);
            let total: f64 = r.get(2);
            Stmt {
                query: r.get(0),
                calls,
                mean_ms: total / calls.max(1) as f64,
            }
        })
        .collect()
    }
}

pub async fn run(env: &Env, backends: &[String], n: usize) {
    for backend in backends {
        let mut results = Vec::new();
        let bins: Vec<(&str, &str)> = std::iter::once(("service", env.bin.as_str()))
            .chain(env.reference_bin.as_deref().map(|b| ("reference", b)))
            .collect();
        for (label, bin) in &bins {
            match measure(env, bin, backend, n).await {
                Ok(m) => results.push((*label, m)),
                Err(e) => {
                    println!("\nRound trips ({backend}): skipped, pg_stat_statements is not available ({e}); scripts/bench.sh starts PostgreSQL with shared_preload_libraries=pg_stat_statements.");
                    return;
                }
            }
        }
        print(backend, n, &results);
    }
}

async fn measure(env: &Env, bin: &str, backend: &str, n: usize) -> Result<Vec<Measured>, String> {
    let db = fresh_db(&env.server).await;
    let prefix = format!("bench-{}/", uuid::Uuid::new_v4().simple());
    let (upstream, via_proxy) = split_host(&db);
    let proxy = Proxy::start(upstream).await;
    let proxied = via_proxy(proxy.port);
    let svc = Service::start(
        env,
        Spec {
            bin,
            db: &proxied,
            backend,
            prefix: &prefix,
            extra: &[],
        },
    )
    .await;
    let mut mon = Monitor::connect(env, &db).await?;
    let http = http_client();
    let base = svc.base.as_str();
    let ws = workspace(&http, base).await;
    let small = payload(1024);
    let big = payload(20 << 20);
    let big_n = (n / 20).clamp(3, 10);

    // warm-up: every statement prepared on the pool's connections
    let warm = seq_uploads(&http, base, &ws, &small, 100).await;
    let warm_cursor = activity_id_of(&http, base, &ws, &warm[0]).await;
    for id in &warm {
        download(&http, base, &ws, id).await;
        ack(&http, base, &ws, id).await;
        poll(&http, base, &ws, &warm_cursor).await;
    }

    let mut w = Windows {
        mon: &mut mon,
        proxy: &proxy,
        before: proxy.counts(),
        out: Vec::new(),
    };
    w.start().await;
    let ids = seq_uploads(&http, base, &ws, &small, n).await;
    w.end("upload 1 KiB (multipart POST, 1 file)", "≤ 4", n)
        .await;
    w.start().await;
    for id in &ids {
        assert_eq!(download(&http, base, &ws, id).await, 1024);
    }
    w.end("GET content 1 KiB (first fetch)", "≤ 2", n).await;
    w.start().await;
    for id in &ids {
        ack(&http, base, &ws, id).await;
    }
    w.end("POST ack (first ack)", "1", n).await;
    let cursor = ids[ids.len().saturating_sub(5)].clone();
    let cursor = activity_id_of(&http, base, &ws, &cursor).await;
    w.start().await;
    for _ in 0..n {
        poll(&http, base, &ws, &cursor).await;
    }
    w.end("GET activity (since_id, no wait)", "-", n).await;
    w.start().await;
    for _ in 0..n {
        let r = http
            .get(format!("{base}/workspaces/{}/pending-uploads", ws.id))
            .bearer_auth(&ws.token)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
        r.bytes().await.unwrap();
    }
    w.end("GET pending-uploads", "-", n).await;
    w.start().await;
    let big_ids = seq_uploads(&http, base, &ws, &big, big_n).await;
    w.end("upload 20 MiB", "-", big_n).await;
    w.start().await;
    for id in &big_ids {
        assert_eq!(download(&http, base, &ws, id).await, 20 << 20);
    }
    w.end("GET content 20 MiB", "-", big_n).await;
    w.start().await;
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    w.end("nothing (5 s idle: background work)", "-", 1).await;
    let out = w.out;
    drop(svc);
    drop_db(&env.server, &db).await;
    Ok(out)
}

/// Measurement windows: pg_stat_statements reset and the wire counts noted at the start,
/// both read at the end.
struct Windows<'a> {
    mon: &'a mut Monitor,
    proxy: &'a Proxy,
    before: Counts,
    out: Vec<Measured>,
}

impl Windows<'_> {
    async fn start(&mut self) {
        self.mon.reset().await;
        self.before = self.proxy.counts();
    }

    async fn end(&mut self, kind: &'static str, target: &'static str, n: usize) {
        // work a response leaves behind (fetched_at is stamped after the body) lands here
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let wire = self.proxy.counts().since(&self.before);
        let stmts = self.mon.snapshot().await;
        self.out.push(Measured {
            kind,
            target,
            n,
            stmts,
            wire,
        });
    }
}

async fn seq_uploads(
    http: &reqwest::Client,
    base: &str,
    ws: &Ws,
    data: &Bytes,
    n: usize,
) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        ids.push(upload(http, base, &ws.id, data, &format!("r{i}.bin")).await);
    }
    ids
}

async fn poll(http: &reqwest::Client, base: &str, ws: &Ws, since: &str) {
    let query = format!("type=a2a_receive&since_id={since}&limit=100");
    ws_get(http, base, ws, &format!("activity?{query}"))
        .await
        .bytes()
        .await
        .unwrap();
}

/// The id of the activity row that staged `file_id`.
async fn activity_id_of(http: &reqwest::Client, base: &str, ws: &Ws, file_id: &str) -> String {
    let rows = activity(http, base, ws, "type=a2a_receive&limit=500").await;
    rows.iter()
        .find(|r| r["request_body"]["file_id"].as_str() == Some(file_id))
        .or(rows.first())
        .and_then(|r| r["id"].as_str())
        .expect("an activity row")
        .to_string()
}

fn print(backend: &str, n: usize, results: &[(&str, Vec<Measured>)]) {
    let (_, ours) = &results[0];
    let reference = results.get(1).map(|(_, m)| m);
    println!(
        "\nDatabase round trips per request, {backend} ({n} requests per kind, one kind per window, concurrency 1, after a warm-up). `statements`: pg_stat_statements `calls` of top-level statements in the service's database, BEGIN/COMMIT/ROLLBACK included; `wire`: round trips counted between the service and PostgreSQL (Sync, simple Query, CopyDone messages):\n"
    );
    print!("| request | requests | statements / request | of which BEGIN/COMMIT/ROLLBACK | wire round trips / request | of which pings | target |");
    if reference.is_some() {
        print!(" reference binary: statements / wire |");
    }
    println!();
    println!(
        "|---|---|---|---|---|---|---|{}",
        if reference.is_some() { "---|" } else { "" }
    );
    for (i, m) in ours.iter().enumerate() {
        print!(
            "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {} |",
            m.kind,
            m.n,
            m.per_request(m.total()),
            m.per_request(m.transaction_control()),
            m.per_request(m.wire.round_trips() as i64),
            m.per_request(m.wire.pings() as i64),
            m.target
        );
        if let Some(r) = reference.and_then(|r| r.get(i)) {
            print!(
                " {:.2} / {:.2} |",
                r.per_request(r.total()),
                r.per_request(r.wire.round_trips() as i64)
            );
        }
        println!();
    }
    println!(
        "\nThe two counts differ where pg_stat_statements and the wire disagree on what a round trip is: pings (a bare Sync: the service pings a connection idle over 1 s before use; sqlx's own pool, which the service used before 39a32aa, pings every connection it takes back) are round trips pg_stat_statements does not list; statements that deferred constraint triggers run inside COMMIT are listed by pg_stat_statements as top-level but cost no round trip; a COPY FROM STDIN is one statement and two round trips (the Query, then CopyDone)."
    );
    for m in ours {
        let per = |t: u8| m.per_request(m.wire.get(t) as i64);
        println!(
            "\nTop statements, {backend}, {} (wire messages / request: Sync {:.2}, Query {:.2}, Parse {:.2}, Bind {:.2}, CopyData {:.2}, CopyDone {:.2}):\n",
            m.kind,
            per(b'S'),
            per(b'Q'),
            per(b'P'),
            per(b'B'),
            per(b'd'),
            per(b'c')
        );
        println!("| calls / request | mean ms | statement |");
        println!("|---|---|---|");
        for s in m.stmts.iter().take(10) {
            println!(
                "| {:.2} | {:.3} | `{}` |",
                m.per_request(s.calls),
                s.mean_ms,
                squash(&s.query, 140)
            );
        }
    }
}

/// One line, at most `max` characters, safe in a markdown table cell.
fn squash(q: &str, max: usize) -> String {
    let one: String = q.split_whitespace().collect::<Vec<_>>().join(" ");
    let one = one.replace('|', "\\|").replace('`', "'");
    if one.chars().count() > max {
        format!("{}…", one.chars().take(max).collect::<String>())
    } else {
        one
    }
}
