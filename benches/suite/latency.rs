//! `latency`: p50/p99 of the workspace's hot requests at ~1,000 req/s offered, sharing the
//! machine with the service and PostgreSQL, from two generators:
//! - this bench's own open-loop generator ([`crate::paced`]): evenly spaced requests, latency
//!   counted from when each was due;
//! - `hey` (`-c W -q R/W`: W workers, each throttled to R/W requests per second, per
//!   shared/ENVIRONMENT.md), whose workers fire together and each wait for their own answer;
//! - `oha` (`-q R -c W --latency-correction`): requests sent at the rate over W connections,
//!   each one's latency counted from when it was due (no coordinated omission), as the
//!   issue's "open loop, e.g. hey -q or oha" asks of a tool that is not ours.
//!
//! Each route is warmed up first; hey's per-request CSV gives its percentiles. With
//! `--reference-bin`, the same routes against that binary too, route by route in turn.

use serde_json::Value;

use crate::harness::{drop_db, fresh_db, http_client, Env, Service, Spec, Ws, ADMIN};

pub struct Opts {
    pub seconds: u64,
    pub warmup: u64,
    pub rate: u64,
    pub workers: u64,
}

struct Route {
    name: &'static str,
    method: &'static str,
    url: String,
    token: String,
}

struct Figures {
    requests: usize,
    failed: usize,
    rate: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
    /// vCPU steal during the run, % (the paced runs measure it).
    steal: Option<f64>,
    /// The machine's CPU busy during the run, % (the paced runs measure it).
    busy: Option<f64>,
}

/// One binary under test: its service, database and routes.
struct Instance {
    label: &'static str,
    svc: Service,
    db: String,
    routes: Vec<Route>,
}

pub async fn run(env: &Env, o: &Opts) {
    let bins = std::iter::once(("service", env.bin.as_str()))
        .chain(env.reference_bin.as_deref().map(|b| ("reference", b)));
    let mut instances = Vec::new();
    for (label, bin) in bins {
        instances.push(start(env, label, bin).await);
    }
    let compared = instances.len() > 1;
    let mut paced = Vec::new();
    let mut hey = Vec::new();
    let mut oha = Vec::new();
    // Route by route, each binary in turn, which one first alternating: a change in the
    // machine's load between runs touches both alike.
    for route in 0..instances[0].routes.len() {
        let mut turn: Vec<&Instance> = instances.iter().collect();
        if route % 2 == 1 {
            turn.reverse();
        }
        for inst in &turn {
            let r = &inst.routes[route];
            let name = row_name(r.name, inst.label, compared);
            let addr = inst.svc.base.trim_start_matches("http://").to_string();
            let request = format!(
                "{} {} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\nContent-Length: 0\r\n\r\n",
                r.method,
                r.url.trim_start_matches(&inst.svc.base),
                r.token
            );
            crate::paced::run(&addr, &request, o.rate, o.warmup as f64).await;
            let out = crate::paced::run(&addr, &request, o.rate, o.seconds as f64).await;
            let mut f = figures(out.ms, out.failed, out.seconds);
            f.steal = Some(out.steal_pct);
            f.busy = Some(out.busy_pct);
            eprintln!(
                "latency (paced) {name}: {} sent, p50 {:.2} ms, p99 {:.2} ms, {:.0} req/s, {} connections, CPU busy {:.0} %, steal {:.1} %",
                out.sent, f.p50, f.p99, f.rate, out.connections, out.busy_pct, out.steal_pct
            );
            paced.push((name, f));
        }
        let tools = [
            (Tool::Oha, env.oha.as_deref(), &mut oha),
            (Tool::Hey, env.hey.as_deref(), &mut hey),
        ];
        for (tool, bin, rows) in tools {
            let Some(bin) = bin else { continue };
            for inst in &turn {
                let r = &inst.routes[route];
                let name = row_name(r.name, inst.label, compared);
                tool.run(bin, r, o.warmup, o).await;
                let f = tool.run(bin, r, o.seconds, o).await;
                eprintln!(
                    "latency ({}) {name}: p50 {:.2} ms, p99 {:.2} ms, {:.0} req/s",
                    tool.name(),
                    f.p50,
                    f.p99,
                    f.rate
                );
                rows.push((name, f));
            }
        }
    }
    for inst in instances {
        drop(inst.svc);
        drop_db(&env.server, &inst.db).await;
    }
    println!(
        "\nLatency at {} req/s offered, open loop and evenly paced (this bench's generator, `benches/suite/paced.rs`: request i due at i/rate, latency counted from when it was due; {} s per route after a {} s warm-up; bytea; service, PostgreSQL and generator on this machine{}):\n",
        o.rate,
        o.seconds,
        o.warmup,
        if compared {
            "; each route against this build and the reference binary in turn, which first alternating"
        } else {
            ""
        }
    );
    print_table(paced);
    if oha.is_empty() {
        println!("\noha: skipped, it is not installed (scripts/bench.sh installs it with cargo).");
    } else {
        println!(
            "\nThe same at {} req/s from oha (-z {}s -q {} -c {} --latency-correction, after a {} s warm-up per route; latency counted from when each request was due):\n",
            o.rate, o.seconds, o.rate, o.workers, o.warmup
        );
        print_table(oha);
    }
    if hey.is_empty() {
        println!(
            "\nhey: skipped, it is not installed (scripts/bench.sh installs it with apt-get)."
        );
        return;
    }
    println!(
        "\nThe same at {} req/s from hey (-z {}s -c {} -q {}, after a {} s warm-up per route):\n",
        o.rate,
        o.seconds,
        o.workers,
        o.rate / o.workers,
        o.warmup
    );
    print_table(hey);
    println!("\nhey's workers fire together, so its load arrives in bursts of {}, and each waits for its own previous answer, so a stall also lowers the achieved rate: compare it with the offered rate.", o.workers);
}

/// A table row's name: the route, and which binary answered when two are compared.
fn row_name(route: &str, label: &str, compared: bool) -> String {
    if compared {
        format!("{route}, {label}")
    } else {
        route.to_string()
    }
}

/// A service of `bin` on a database of its own, with the files and workspaces the routes
/// read: 256 files of 1 KiB in one workspace (the activity feed, the content and the ack),
/// 64 pending in another (the list).
async fn start(env: &Env, label: &'static str, bin: &str) -> Instance {
    let db = fresh_db(&env.server).await;
    let svc = Service::start(
        env,
        Spec {
            bin,
            db: &db,
            backend: "bytea",
            prefix: "unused/",
            extra: &[],
        },
    )
    .await;
    let http = http_client();
    let base = svc.base.clone();
    let ws = crate::harness::workspace(&http, &base).await;
    let listed = crate::harness::workspace(&http, &base).await;
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.extend(upload_batch(&http, &base, &ws, 64).await);
    }
    upload_batch(&http, &base, &listed, 64).await;
    let feed = crate::harness::activity(&http, &base, &ws, "type=a2a_receive&limit=5").await;
    // newest first: the fifth newest row, so each poll answers the 4 rows after it
    let cursor = feed.last().unwrap()["id"].as_str().unwrap().to_string();
    let file = &ids[ids.len() / 2];
    let routes = vec![
        // no database: what the machine itself gives (scheduling, vCPU steal, loopback)
        Route {
            name: "GET /healthz (no database: this machine's floor)",
            method: "GET",
            url: format!("{base}/healthz"),
            token: ws.token.clone(),
        },
        Route {
            name: "GET activity (type=a2a_receive, since_id = 5th newest row, limit 100; 4 rows)",
            method: "GET",
            url: format!(
                "{base}/workspaces/{}/activity?type=a2a_receive&since_id={cursor}&limit=100",
                ws.id
            ),
            token: ws.token.clone(),
        },
        Route {
            name: "GET pending-uploads (64 pending)",
            method: "GET",
            url: format!("{base}/workspaces/{}/pending-uploads", listed.id),
            token: listed.token.clone(),
        },
        Route {
            name: "GET content (1 KiB, bytea)",
            method: "GET",
            url: format!("{base}/workspaces/{}/pending-uploads/{file}/content", ws.id),
            token: ws.token.clone(),
        },
        Route {
            name: "POST ack (the same 1 KiB file, repeated)",
            method: "POST",
            url: format!("{base}/workspaces/{}/pending-uploads/{file}/ack", ws.id),
            token: ws.token.clone(),
        },
    ];
    Instance {
        label,
        svc,
        db,
        routes,
    }
}

fn print_table(rows: Vec<(String, Figures)>) {
    println!(
        "| request | requests | failed | achieved req/s | p50 ms | p90 ms | p99 ms | max ms | CPU busy % | vCPU steal % |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (name, f) in rows {
        let steal = f.steal.map_or("–".into(), |s| format!("{s:.1}"));
        let busy = f.busy.map_or("–".into(), |s| format!("{s:.0}"));
        println!(
            "| {name} | {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.1} | {busy} | {steal} |",
            f.requests, f.failed, f.rate, f.p50, f.p90, f.p99, f.max
        );
    }
}

async fn upload_batch(http: &reqwest::Client, base: &str, ws: &Ws, n: usize) -> Vec<String> {
    let mut form = reqwest::multipart::Form::new();
    for i in 0..n {
        form = form.part(
            "files",
            reqwest::multipart::Part::bytes(vec![b'x'; 1024]).file_name(format!("l{i}.txt")),
        );
    }
    let v: Value = http
        .post(format!("{base}/workspaces/{}/chat/uploads", ws.id))
        .bearer_auth(ADMIN)
        .multipart(form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(crate::harness::file_id)
        .collect()
}

/// A load generator that is not ours.
#[derive(Clone, Copy)]
enum Tool {
    Oha,
    Hey,
}

impl Tool {
    fn name(self) -> &'static str {
        match self {
            Tool::Oha => "oha",
            Tool::Hey => "hey",
        }
    }

    /// How the tool is told the rate (hey per worker, oha in all) and how it reports.
    fn own_args(self, o: &Opts) -> Vec<String> {
        let args: &[&str] = match self {
            Tool::Hey => &["-o", "csv"],
            Tool::Oha => &[
                "--latency-correction",
                "--no-tui",
                "--output-format",
                "json",
            ],
        };
        let per_second = match self {
            Tool::Hey => (o.rate / o.workers).max(1),
            Tool::Oha => o.rate,
        };
        let mut all = vec!["-q".to_string(), per_second.to_string()];
        all.extend(args.iter().map(|a| a.to_string()));
        all
    }

    async fn run(self, bin: &str, r: &Route, seconds: u64, o: &Opts) -> Figures {
        let out = tokio::process::Command::new(bin)
            .args(["-z", &format!("{seconds}s")])
            .args(["-c", &o.workers.to_string()])
            .args(self.own_args(o))
            .args(["-m", r.method])
            .args(["-H", &format!("Authorization: Bearer {}", r.token)])
            .arg(&r.url)
            .output()
            .await
            .unwrap_or_else(|e| panic!("run {}: {e}", self.name()));
        assert!(
            out.status.success(),
            "{} failed: {}",
            self.name(),
            String::from_utf8_lossy(&out.stderr)
        );
        match self {
            Tool::Hey => parse_csv(&String::from_utf8_lossy(&out.stdout), seconds as f64),
            Tool::Oha => parse_oha(&out.stdout, &r.url),
        }
    }
}

/// oha's JSON report.
fn parse_oha(report: &[u8], url: &str) -> Figures {
    let v: Value = serde_json::from_slice(report).expect("oha's JSON");
    let ms = |p: &str| v["latencyPercentiles"][p].as_f64().unwrap_or(f64::NAN) * 1000.0;
    let count = |field: &str, ok: fn(&str) -> bool| -> usize {
        v[field].as_object().map_or(0, |m| {
            m.iter()
                .filter(|(k, _)| ok(k))
                .map(|(_, n)| n.as_u64().unwrap_or(0) as usize)
                .sum()
        })
    };
    // Requests still in flight when the run's time is up are cut by oha itself: not the
    // service's failures.
    let answered = count("statusCodeDistribution", |_| true);
    let errors = count("errorDistribution", |k| {
        !k.contains("aborted due to deadline")
    });
    if errors > 0 {
        eprintln!("oha errors on {url}: {}", v["errorDistribution"]);
    }
    Figures {
        requests: answered + errors,
        failed: count("statusCodeDistribution", |k| !k.starts_with('2')) + errors,
        rate: v["summary"]["requestsPerSec"].as_f64().unwrap_or(f64::NAN),
        p50: ms("p50"),
        p90: ms("p90"),
        p99: ms("p99"),
        max: v["summary"]["slowest"].as_f64().unwrap_or(f64::NAN) * 1000.0,
        steal: None,
        busy: None,
    }
}

/// hey's CSV: response-time (s), …, status-code, offset (s).
fn parse_csv(text: &str, seconds: f64) -> Figures {
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or("").split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name);
    let (rt, status) = (
        col("response-time").expect("hey csv: response-time"),
        col("status-code").expect("hey csv: status-code"),
    );
    let mut ms = Vec::new();
    let mut failed = 0;
    for l in lines {
        let f: Vec<&str> = l.split(',').collect();
        let Some(t) = f.get(rt).and_then(|v| v.parse::<f64>().ok()) else {
            continue;
        };
        if !f.get(status).is_some_and(|s| s.starts_with('2')) {
            failed += 1;
        }
        ms.push(t * 1000.0);
    }
    ms.sort_by(f64::total_cmp);
    figures(ms, failed, seconds)
}

/// Percentiles of sorted latencies (ms) over a run of `seconds`.
fn figures(ms: Vec<f64>, failed: usize, seconds: f64) -> Figures {
    let q = |p| crate::harness::quantile(&ms, p);
    Figures {
        requests: ms.len(),
        failed,
        rate: ms.len() as f64 / seconds,
        p50: q(0.5),
        p90: q(0.9),
        p99: q(0.99),
        max: ms.last().copied().unwrap_or(f64::NAN),
        steal: None,
        busy: None,
    }
}
