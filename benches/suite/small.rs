//! `small`: 1 KiB request rates at concurrency 8 — uploads to one workspace, uploads spread
//! over 8 workspaces, and downloads (first fetch of each file) — per backend; with
//! `--reference-bin`, the same against that binary, interleaved phase by phase.

use crate::harness::{
    download_all, drop_db, fresh_db, http_client, payload, timed, upload_all, workspaces, Env,
    Service, Spec, Ws,
};

const CONC: usize = 8;

struct Instance {
    label: &'static str,
    svc: Service,
    db: String,
    one: Vec<Ws>,
    eight: Vec<Ws>,
    ids: Vec<(usize, String)>,
    rates: [f64; 3],
}

pub async fn run(env: &Env, backends: &[String], files: usize) {
    let http = http_client();
    let data = payload(1024);
    let mut rows = Vec::new();
    for backend in backends {
        let mut instances = Vec::new();
        let bins = std::iter::once(("service", env.bin.as_str()))
            .chain(env.reference_bin.as_deref().map(|b| ("reference", b)));
        for (label, bin) in bins {
            let db = fresh_db(&env.server).await;
            let prefix = format!("bench-{}/", uuid::Uuid::new_v4().simple());
            let svc = Service::start(
                env,
                Spec {
                    bin,
                    db: &db,
                    backend,
                    prefix: &prefix,
                    extra: &[],
                },
            )
            .await;
            let one = workspaces(&http, &svc.base, 1).await;
            let eight = workspaces(&http, &svc.base, 8).await;
            // warm-up: the pool's connections open, statements prepared
            upload_all(&http, &svc.base, &eight, &data, 200, CONC).await;
            instances.push(Instance {
                label,
                svc,
                db,
                one,
                eight,
                ids: Vec::new(),
                rates: [0.0; 3],
            });
        }
        for phase in 0..3 {
            for inst in instances.iter_mut() {
                let base = inst.svc.base.clone();
                let rate = match phase {
                    0 => {
                        let (ids, secs) =
                            timed(upload_all(&http, &base, &inst.one, &data, files, CONC)).await;
                        inst.ids = ids;
                        files as f64 / secs
                    }
                    1 => {
                        let (_, secs) =
                            timed(upload_all(&http, &base, &inst.eight, &data, files, CONC)).await;
                        files as f64 / secs
                    }
                    _ => {
                        let (read, secs) =
                            timed(download_all(&http, &base, &inst.one, &inst.ids, CONC)).await;
                        assert_eq!(read, files * 1024);
                        files as f64 / secs
                    }
                };
                eprintln!("small {backend} {} phase {phase}: {rate:.0}/s", inst.label);
                inst.rates[phase] = rate;
            }
        }
        for inst in instances {
            rows.push((backend.clone(), inst.label, inst.rates));
            drop(inst.svc);
            drop_db(&env.server, &inst.db).await;
        }
    }
    println!("\nSmall requests, 1 KiB, concurrency {CONC} ({files} requests per figure, after a warm-up):\n");
    println!("| backend | binary | uploads/s, one workspace | uploads/s, 8 workspaces | downloads/s (GET content) |");
    println!("|---|---|---|---|---|");
    for (backend, label, r) in &rows {
        println!(
            "| {backend} | {label} | {:.0} | {:.0} | {:.0} |",
            r[0], r[1], r[2]
        );
    }
    if env.reference_bin.is_some() {
        for pair in rows.chunks(2) {
            if let [(backend, _, a), (_, _, b)] = pair {
                println!(
                    "| {backend} | service / reference | {:.2}x | {:.2}x | {:.2}x |",
                    a[0] / b[0],
                    a[1] / b[1],
                    a[2] / b[2]
                );
            }
        }
    }
}
