//! `memory`: the service's peak RSS (VmHWM, reset before each phase) with N files of one size
//! in flight at once, uploads then downloads, per backend: 16 × 20 MiB, 4 × 20 MiB and
//! 4 × 100 MB by default, side by side, so growth with file size shows at equal concurrency.
//! Each cell gets a service of its own: the allocator keeps what an earlier cell freed, so a
//! shared service would report the largest cell so far.

use crate::harness::{
    download_all, drop_db, fresh_db, http_client, human, mb_per_s, payload, sweep_all, timed,
    upload_all, workspace, Env, Service, Spec,
};

pub async fn run(env: &Env, backends: &[String], cells: &[(usize, usize)]) {
    let mut rows = Vec::new();
    for backend in backends {
        let db = fresh_db(&env.server).await;
        let prefix = format!("bench-{}/", uuid::Uuid::new_v4().simple());
        let http = http_client();
        let mut idle = 0.0f64;
        let mut figures = Vec::new();
        for &(files, size) in cells {
            let svc = Service::start(
                env,
                Spec {
                    bin: &env.bin,
                    db: &db,
                    backend,
                    prefix: &prefix,
                    extra: &[],
                },
            )
            .await;
            let ws = [workspace(&http, &svc.base).await];
            idle = idle.max(svc.rss_mib());
            let data = payload(size);
            svc.reset_peak();
            let (ids, up_secs) =
                timed(upload_all(&http, &svc.base, &ws, &data, files, files)).await;
            let up = svc.peak_rss_mib();
            svc.reset_peak();
            let (read, down_secs) = timed(download_all(&http, &svc.base, &ws, &ids, files)).await;
            assert_eq!(read, files * size);
            let down = svc.peak_rss_mib();
            eprintln!(
                "memory {backend} {files} x {}: up {up:.0} MiB ({:.0} MB/s), down {down:.0} MiB ({:.0} MB/s)",
                human(size),
                mb_per_s(files * size, up_secs),
                mb_per_s(files * size, down_secs)
            );
            figures.push((up, down));
            drop(svc);
            sweep_all(env, &env.bin, &db, backend, &prefix).await;
        }
        rows.push((backend.clone(), idle, figures));
        drop_db(&env.server, &db).await;
    }
    println!("\nService peak RSS MiB (VmHWM) with N files in flight at once, uploads then downloads (all N start together, one workspace):\n");
    let heads: Vec<String> = cells
        .iter()
        .map(|&(n, s)| format!("{n} x {} up | {n} x {} down", human(s), human(s)))
        .collect();
    println!("| backend | idle | {} |", heads.join(" | "));
    println!("|---|---|{}", "---|---|".repeat(cells.len()));
    for (backend, idle, figures) in rows {
        let cols: Vec<String> = figures
            .iter()
            .map(|(u, d)| format!("{u:.0} | {d:.0}"))
            .collect();
        println!("| {backend} | {idle:.0} | {} |", cols.join(" | "));
    }
}
