//! The control plane at fleet scale, on a simulated runtime: 100,000 tenants in a SQLite
//! registry, 10,000 of them awake on in-process stand-in instances (each the shim API on a Unix
//! socket of its own, answering at once), the idle sweep over them, and a restart with 10,000
//! tenants holding a pending update each, timed until every one is delivered under the default
//! admission limits. Prints the machine and one table.
//!
//! `cargo bench -p otm-server --bench scale` (a few minutes), `-- --quick` for 10,000 tenants
//! and 1,000 awake.
//!
//! The stand-in instances live in this process, so the memory per awake instance includes the
//! stand-in shim's own server task and socket besides what the control plane keeps.

#[path = "../tests/support/mod.rs"]
mod support;

use futures::StreamExt;
use otm_core::{Inbox, Registry, Runtime, Tenant, TenantId};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::World;

fn main() {
    // `cargo test --all-targets` runs bench targets without --bench.
    if !std::env::args().any(|a| a == "--bench") {
        println!("scale runs under `cargo bench -p otm-server --bench scale` only");
        return;
    }
    let quick = std::env::args().any(|a| a == "--quick");
    let (tenants, awake) = if quick {
        (10_000, 1_000)
    } else {
        (100_000, 10_000)
    };
    // Every awake stand-in holds a socket, and the control plane a connection to it.
    if let Ok((_, hard)) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    {
        let _ =
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(run(tenants, awake));
}

struct Table(Vec<(String, String)>);

impl Table {
    fn row(&mut self, measure: impl Into<String>, value: impl Into<String>) {
        let (m, v) = (measure.into(), value.into());
        eprintln!("  {m}: {v}");
        self.0.push((m, v));
    }
}

async fn run(tenants: usize, awake: usize) {
    let load = || {
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    };
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "otm scale, simulated runtime: {cores} cores, load average before: {}",
        load()
    );
    let started = Instant::now();
    let mut table = Table(Vec::new());
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("otm.db");
    let sqlite: Arc<dyn Registry> = Arc::new(otm_store::sqlite::SqliteRegistry::open(&db).unwrap());
    let keys = Arc::new(otm_store::SecretKeys::ephemeral());
    let w = World::on(sqlite.clone(), keys.clone(), |_| {}).await;
    let rss_start = rss_kib();

    // Tenants, registered through the sealed registry as the admin API does.
    eprintln!("registering {tenants} tenants…");
    let ids: Vec<TenantId> = (0..tenants)
        .map(|i| TenantId::parse(&format!("t{i}")).unwrap())
        .collect();
    let t0 = Instant::now();
    futures::stream::iter(ids.iter().cloned())
        .map(|id| {
            let registry = w.registry().clone();
            async move {
                let mut t = Tenant::new(id, "reference", Some(otm_core::Secret::new("1:AAAA")));
                t.idle_timeout_s = 3600;
                t.limits.freeze_after_s = Some(0);
                registry.create_tenant(&t).await.unwrap();
            }
        })
        .buffer_unordered(512)
        .collect::<Vec<()>>()
        .await;
    let fill = t0.elapsed();
    w.registry().purge_freed().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_idle = rss_kib();
    table.row(
        format!("registering {tenants} tenants (group commit, 512 at a time)"),
        format!(
            "{:.1} s ({:.0}/s)",
            fill.as_secs_f64(),
            tenants as f64 / fill.as_secs_f64()
        ),
    );
    table.row(
        format!("registry size with {tenants} tenants (SQLite file and WAL)"),
        format!(
            "{:.1} MiB ({:.0} bytes a tenant)",
            file_bytes(&db) as f64 / 1048576.0,
            file_bytes(&db) as f64 / tenants as f64
        ),
    );
    table.row(
        "control-plane RSS per idle tenant",
        format!(
            "{:.2} kB (RSS {} → {} MiB; SQLite's page cache included)",
            (rss_idle as f64 - rss_start as f64) * 1.024 / tenants as f64,
            rss_start / 1024,
            rss_idle / 1024
        ),
    );

    // Wakes: `awake` tenants get a stand-in instance each.
    eprintln!("waking {awake} tenants…");
    let t0 = Instant::now();
    let mut wake_ms: Vec<f64> = futures::stream::iter(ids[..awake].iter().cloned())
        .map(|id| {
            let app = w.app.clone();
            async move {
                let t = Instant::now();
                app.wake(&id, None).await.unwrap();
                t.elapsed().as_secs_f64() * 1000.0
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let woke = t0.elapsed();
    wake_ms.sort_by(f64::total_cmp);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_awake = rss_kib();
    table.row(
        format!("waking {awake} tenants on the simulated runtime, 64 at a time"),
        format!(
            "{:.1} s ({:.0}/s); each p50 {:.1} ms, p99 {:.1} ms",
            woke.as_secs_f64(),
            awake as f64 / woke.as_secs_f64(),
            pct(&wake_ms, 0.5),
            pct(&wake_ms, 0.99)
        ),
    );
    table.row(
        "control-plane RSS per awake instance (the stand-in shim's server included)",
        format!(
            "{:.1} kB (RSS {} → {} MiB)",
            (rss_awake as f64 - rss_idle as f64) * 1.024 / awake as f64,
            rss_idle / 1024,
            rss_awake / 1024
        ),
    );

    // The idle sweep: every awake tenant is looked at (none is due).
    let mut book = otm_server::orchestrator::FrozenBook::default();
    let mut sweeps = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        otm_server::orchestrator::sweep(&w.app, &mut book).await;
        sweeps.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    sweeps.sort_by(f64::total_cmp);
    table.row(
        format!("idle sweep, {tenants} tenants with {awake} awake (none due)"),
        format!(
            "p50 {:.1} ms, max {:.1} ms",
            pct(&sweeps, 0.5),
            pct(&sweeps, 1.0)
        ),
    );

    // A restart: the process goes, its instances with it; `awake` tenants have an update each
    // waiting. The next process reconciles and delivers them all.
    eprintln!("restart with {awake} tenants holding an update…");
    w.shutdown.cancel();
    for id in &ids[..awake] {
        let _ = w
            .runtime
            .delete(&w.registry().instance_of(id).await.unwrap().unwrap().id)
            .await;
    }
    drop(w);
    let registry_again = Arc::new(otm_store::SealedRegistry::new(sqlite.clone(), keys.clone()));
    futures::stream::iter(ids[..awake].iter().cloned())
        .map(|id| {
            let registry = registry_again.clone();
            async move {
                let payload =
                    r#"{"update_id":1,"message":{"message_id":1,"chat":{"id":7},"text":"hi"}}"#;
                registry
                    .inbox_append(&id, 1, payload.as_bytes())
                    .await
                    .unwrap();
            }
        })
        .buffer_unordered(512)
        .collect::<Vec<()>>()
        .await;
    let t0 = Instant::now();
    let w = World::on(sqlite.clone(), keys.clone(), |_| {}).await;
    otm_server::orchestrator::reconcile(&w.app).await.unwrap();
    let reconciled = t0.elapsed();
    w.run_loops();
    tokio::spawn(otm_server::dispatch::run_sweeper(w.app.clone()));
    for t in w.registry().inbox_pending_tenants().await.unwrap() {
        otm_server::dispatch::kick(&w.app, &t);
    }
    let fleet = w.registry().get_settings().await.unwrap();
    loop {
        let pending = w.registry().inbox_pending_tenants().await.unwrap().len();
        if pending == 0 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(1800),
            "{pending} tenants still hold updates"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let drained = t0.elapsed();
    table.row(
        format!("restart with {awake} tenants holding an update: until every one is delivered"),
        format!(
            "{:.1} s (reconcile {:.1} s; {:.0} wakes/s; max concurrent wakes {}, max running {})",
            drained.as_secs_f64(),
            reconciled.as_secs_f64(),
            awake as f64 / drained.as_secs_f64(),
            if fleet.max_concurrent_wakes == 0 {
                "unlimited".to_owned()
            } else {
                fleet.max_concurrent_wakes.to_string()
            },
            if fleet.max_running == 0 {
                "unlimited".to_owned()
            } else {
                fleet.max_running.to_string()
            }
        ),
    );
    w.shutdown.cancel();

    println!(
        "load average after: {}; run took {:.0} s",
        load(),
        started.elapsed().as_secs_f64()
    );
    println!();
    println!("| measure | value |");
    println!("|---|---|");
    for (m, v) in &table.0 {
        println!("| {m} | {v} |");
    }
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap_or(0)
}

/// The database file and its WAL, in bytes.
fn file_bytes(db: &Path) -> u64 {
    let wal = db.with_extension("db-wal");
    [db.to_path_buf(), wal]
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}
