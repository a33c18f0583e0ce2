//! otm side by side with its floors, measured from outside: the release `otm server` runs as a
//! process of its own, `wrk` (a separate process) posts Telegram updates to it, and in the same
//! run nginx answers the same requests with a fixed 200 and SQLite inserts the same rows with the
//! same durability. Prints the machine, its load and one table; draws SVG plots under
//! `target/bench/`.
//!
//! `cargo bench -p otm --bench side_by_side` (about 5 minutes), `-- --quick` for a smoke run of
//! about a minute, `-- --ingress` for the floors and the accept rows alone. Needs `wrk` and `nginx` on PATH (Debian: `apt-get install wrk nginx`); the
//! PostgreSQL rows need `OTM_TEST_POSTGRES_URL` (and `psql` to drop the schema afterwards).

use otm_testkit::FakeTelegram;
use plotters::prelude::*;
use serde_json::{Value, json};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

const SECRET_HEADER: &str = "x-telegram-bot-api-secret-token";
/// The `wrk` binary found at start.
static WRK: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
const ADMIN_TOKEN: &str = "bench-admin-token-0123456789abcdef";
/// The offered rate of the fixed-rate accept runs, updates a second.
const FIXED_RATE: u32 = 10_000;
/// The offered rate of webhooks while a backlog drains, updates a second.
const DRAIN_ACCEPT_RATE: u32 = 2_000;

/// The update every path receives, as Telegram sends it (`%d`: update id, message id, user id,
/// user id, chat id, chat id). The Lua script and the SQLite floor fill in the same template.
const UPDATE_TEMPLATE: &str = r#"{"update_id":%d,"message":{"message_id":%d,"from":{"id":%d,"is_bot":false,"first_name":"Test","username":"user%d","language_code":"en"},"chat":{"id":%d,"first_name":"Test","username":"user%d","type":"private"},"date":1765000000,"text":"bench"}}"#;

fn update_body(id: u64) -> String {
    let chat = 10 + id % 1000;
    let vals = [id, id, chat, chat, chat, chat];
    let mut out = String::new();
    let mut parts = UPDATE_TEMPLATE.split("%d");
    out.push_str(parts.next().unwrap());
    for (v, p) in vals.iter().zip(parts) {
        write!(out, "{v}{p}").unwrap();
    }
    out
}

#[derive(Clone, Copy)]
struct Plan {
    quick: bool,
    /// Only the floors and the accept rows (`--ingress`), for work on the ingress path.
    ingress_only: bool,
    /// `--drain`: the floors and the drain rows only.
    drain_only: bool,
    /// `--wakes`: the wake rows only (cold, warm pool, frozen), with more wakes each.
    wakes_only: bool,
    /// Seconds of each wrk run in the table.
    run_s: u32,
    /// Seconds of each point of the connection sweep.
    sweep_s: u32,
    sweep: &'static [u32],
    /// Sequential messages per awake path.
    replies: usize,
    /// Seconds of each SQLite floor.
    floor_s: f64,
    wakes: usize,
    idle_tenants: usize,
    /// Updates in each backlog of the drain.
    backlog: usize,
}

fn main() {
    // The bench's own load generator, started by the bench as a process of its own.
    if let Some(i) = std::env::args().position(|a| a == "--loadgen") {
        let args: Vec<String> = std::env::args().skip(i + 1).collect();
        std::process::exit(loadgen_main(&args));
    }
    // `cargo bench` passes --bench; `cargo test --all-targets` runs bench targets without it,
    // and a five-minute load test is no unit test.
    if !std::env::args().any(|a| a == "--bench") {
        println!("side_by_side runs under `cargo bench -p otm --bench side_by_side` only");
        return;
    }
    let quick = std::env::args().any(|a| a == "--quick");
    let ingress_only = std::env::args().any(|a| a == "--ingress");
    let drain_only = std::env::args().any(|a| a == "--drain");
    let wakes_only = std::env::args().any(|a| a == "--wakes");
    let mut plan = if quick {
        Plan {
            quick,
            ingress_only,
            drain_only,
            wakes_only,
            run_s: 3,
            sweep_s: 2,
            sweep: &[1, 32],
            replies: 60,
            floor_s: 1.0,
            wakes: 3,
            idle_tenants: 200,
            backlog: 1000,
        }
    } else {
        Plan {
            quick,
            ingress_only,
            drain_only,
            wakes_only,
            run_s: 8,
            sweep_s: 4,
            sweep: &[1, 4, 16, 32, 64, 128],
            replies: 300,
            floor_s: 3.0,
            wakes: 10,
            idle_tenants: 2000,
            backlog: 4000,
        }
    };
    if wakes_only {
        plan.wakes = if quick { 5 } else { 30 };
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(plan));
}

/// The path of `tool` on PATH (or in /usr/sbin, which a user's PATH may lack); exits with a hint
/// when it is missing.
fn need(tool: &str, hint: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            eprintln!("side_by_side needs `{tool}`: {hint}");
            std::process::exit(2);
        })
}

async fn run(plan: Plan) {
    let wrk_bin = need("wrk", "install it (Debian: apt-get install wrk)");
    let nginx_bin = need("nginx", "install it (Debian: apt-get install nginx)");
    WRK.set(wrk_bin).unwrap();
    let started = Instant::now();
    let out_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("bench");
    std::fs::create_dir_all(&out_dir).unwrap();
    let dir = tempfile::Builder::new()
        .prefix("otm-side-by-side")
        .tempdir_in(std::env::temp_dir())
        .unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o711),
    )
    .unwrap();
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let tg = FakeTelegram::start().await;
    let http = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(64)
        .build()
        .unwrap();
    let mut table = Table::default();
    if plan.wakes_only {
        wake_rows(&plan, dir.path(), &tg, &http, &mut table, &out_dir).await;
        println!();
        println!("otm side by side, wake rows only (--wakes): {}", machine());
        println!();
        table.print();
        return;
    }

    // The HTTP floor: nginx answering 200 to the same POSTs.
    let agent_dir = dir.path().join("agent");
    std::fs::create_dir_all(&agent_dir).unwrap();
    let agent = DirectAgent::start(&agent_dir, &tg).await;
    let nginx = Nginx::start(&nginx_bin, &dir.path().join("nginx"), agent.port);
    let script = dir.path().join("post.lua");
    write_script(&script, &[("/tg/floor".into(), "none".into())]);
    eprintln!("nginx floor…");
    let nginx_run = wrk(&nginx.fixed_url(), &script, 32, plan.run_s, 0).await;

    // The durable floor: the inbox table, the same rows, WAL and synchronous=FULL.
    let mut floors = Vec::new();
    for per_tx in [1usize, 32, 256] {
        eprintln!("SQLite floor, {per_tx} rows per transaction…");
        let db = dir.path().join(format!("floor-{per_tx}.db"));
        let secs = plan.floor_s;
        let rate = tokio::task::spawn_blocking(move || sqlite_floor(&db, per_tx, secs))
            .await
            .unwrap();
        floors.push((per_tx, rate));
    }
    table.row(
        "HTTP floor: nginx answering the same POSTs with a fixed 200 (32 connections)",
        &format!(
            "{}, p50 {}, p99 {}{}",
            rate(nginx_run.rps),
            ms(nginx_run.p50_ms),
            ms(nginx_run.p99_ms),
            nginx_run.failures()
        ),
        "",
        "",
    );
    table.row(
        "durable floor: SQLite inserting the same rows into the same table (WAL, synchronous=FULL), rows/s",
        &format!(
            "1 per transaction: {}; 32: {}; 256: {}",
            rate(floors[0].1),
            rate(floors[1].1),
            rate(floors[2].1)
        ),
        "",
        "",
    );
    let floor_text = format!(
        "nginx {}; SQLite {} (32/tx), {} (256/tx)",
        rate(nginx_run.rps),
        rate(floors[1].1),
        rate(floors[2].1)
    );
    let floor32 = floors[1].1;
    let floor256 = floors[2].1;

    // otm's ingress, on SQLite and on PostgreSQL, with deliveries paused and running.
    // With --drain, none: the drain rows alone.
    let mut registries: Vec<(&str, Option<String>)> = vec![("SQLite", None)];
    if plan.drain_only {
        registries.clear();
    }
    let pg_url = std::env::var("OTM_TEST_POSTGRES_URL").ok();
    let mut pg_schemas = Vec::new();
    if let Some(pg) = pg_url.as_ref().filter(|_| !plan.drain_only) {
        registries.push(("PostgreSQL", Some(pg.clone())));
    } else if !plan.drain_only {
        eprintln!("OTM_TEST_POSTGRES_URL is not set: no PostgreSQL rows");
    }
    let mut sweep_otm = Vec::new();
    let mut base = 1u64;
    for (name, registry) in &registries {
        for running in [false, true] {
            let what = if running { "running" } else { "paused" };
            eprintln!("otm on {name}, deliveries {what}…");
            let data = dir.path().join(format!("otm-{name}-{what}"));
            // A schema of its own for each server on PostgreSQL, dropped at the end.
            let registry = registry.as_ref().map(|pg| {
                let schema = format!("otm_bench_{}_{what}", std::process::id());
                let sep = if pg.contains('?') { '&' } else { '?' };
                pg_schemas.push(schema.clone());
                format!("{pg}{sep}schema={schema}")
            });
            let server = OtmServer::start(&data, &tg, registry.as_deref(), "none").await;
            let mut tenants = Vec::new();
            for i in 0..4 {
                let id = format!("in{i}");
                let bot = format!("{}:INGRESS{i}{what}{name}", 7100 + i);
                let profile = if running { "reference" } else { "openclaw" };
                let secret = server.tenant(&http, &tg, &id, &bot, profile).await;
                tenants.push((format!("/tg/{id}"), secret, bot));
            }
            let script = data.join("post.lua");
            let paths: Vec<_> = tenants.iter().map(|t| (t.0.clone(), t.1.clone())).collect();
            write_script(&script, &paths);
            if !running && *name == "SQLite" {
                for &c in plan.sweep {
                    let o = wrk(&server.public, &script, c, plan.sweep_s, base).await;
                    base += 1_000_000_000;
                    let n = wrk(&nginx.fixed_url(), &script, c, plan.sweep_s, 0).await;
                    sweep_otm.push((c, o.rps, n.rps));
                }
            }
            let r = wrk(&server.public, &script, 32, plan.run_s, base).await;
            base += 1_000_000_000;
            let answered: usize = tenants.iter().map(|t| tg.sent_messages(&t.2).len()).sum();
            let mut measure = format!("accepts/s, {name}, deliveries {what}");
            if !running {
                measure.push_str(" (tenants whose wakes fail)");
            } else {
                measure.push_str(" (4 tenants on the reference agent)");
            }
            let mut otm_text = format!(
                "{}, p50 {}, p99 {}{}",
                rate(r.rps),
                ms(r.p50_ms),
                ms(r.p99_ms),
                r.failures()
            );
            if running {
                write!(
                    otm_text,
                    "; {} accepted in {} s, {answered} answered meanwhile",
                    r.requests, plan.run_s
                )
                .unwrap();
            }
            let ratio = format!(
                "{:.2} of nginx; {:.2} of SQLite at 32/tx, {:.2} at 256/tx",
                r.rps / nginx_run.rps,
                r.rps / floor32,
                r.rps / floor256
            );
            table.row(&measure, &floor_text, &otm_text, &ratio);
            if !running {
                eprintln!("otm on {name} at a fixed {}/s…", FIXED_RATE);
                let l = loadgen(
                    &server.public,
                    &paths,
                    FIXED_RATE,
                    plan.run_s as f64,
                    32,
                    base,
                )
                .await;
                base += 1_000_000_000;
                table.row(
                    &format!(
                        "accept latency at a fixed offered rate, {name}, deliveries paused (the bench's own open-loop generator, 32 connections)"
                    ),
                    "",
                    &l.summary(),
                    "",
                );
            }
            server.stop().await;
        }
    }
    for (pg, schema) in pg_url
        .iter()
        .flat_map(|pg| pg_schemas.iter().map(move |s| (pg, s)))
    {
        let _ = tokio::process::Command::new("psql")
            .arg(pg)
            .args([
                "-q",
                "-c",
                &format!("DROP SCHEMA IF EXISTS {schema} CASCADE"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
    }

    if plan.ingress_only {
        println!();
        println!(
            "otm side by side, accept rows only (--ingress): {}",
            machine()
        );
        println!();
        table.print();
        print_sweep(&sweep_otm);
        return;
    }

    // The drain: a backlog delivered to four awake tenants, with otm's CPU per delivery beside
    // the agents' own; then a second backlog drained while webhooks keep coming at a fixed rate.
    eprintln!("delivery drain…");
    let data = dir.path().join("otm-drain");
    let server = OtmServer::start(&data, &tg, None, "auto").await;
    let mut tenants = Vec::new();
    for i in 0..4 {
        let id = format!("drain{i}");
        let bot = format!("{}:DRAIN{i}", 7400 + i);
        let secret = server.tenant(&http, &tg, &id, &bot, "reference").await;
        let url = format!("{}/tg/{id}", server.public);
        reply_once(&http, &tg, &url, &secret, &bot, base).await;
        base += 1;
        tenants.push((format!("/tg/{id}"), secret, bot));
    }
    let paths: Vec<_> = tenants.iter().map(|t| (t.0.clone(), t.1.clone())).collect();
    let answered = || tenants.iter().map(|t| tg.sent_count(&t.2)).sum::<usize>();
    let drained = |target: usize| {
        let (tg, tenants) = (&tg, &tenants);
        async move {
            for t in tenants {
                let have = tg.sent_count(&t.2);
                let want = have.max(target);
                let got = tg
                    .wait_for_messages(&t.2, want, Duration::from_secs(600))
                    .await
                    .len();
                assert!(got >= want, "{}: {got} of {want} replies", t.0);
            }
        }
    };
    let n = plan.backlog;
    let per_tenant = tenants
        .iter()
        .map(|t| tg.sent_count(&t.2))
        .max()
        .unwrap_or(0)
        + n / 4;
    let posted = loadgen(&server.public, &paths, n as u32, 1.0, 32, base).await;
    base += 1_000_000_000;
    assert_eq!(
        posted.ok as usize, n,
        "every update of the backlog accepted"
    );
    eprintln!("draining {n} updates…");
    let cpu0 = cpu_use_ms(&server);
    let (t0, a0) = (Instant::now(), answered());
    drained(per_tenant).await;
    let cpu1 = cpu_use_ms(&server);
    let (took, delivered) = (t0.elapsed().as_secs_f64(), answered() - a0);
    let per = |i: usize| (cpu1[i] - cpu0[i]) / delivered as f64;
    table.row(
        &format!(
            "delivery drain: a backlog of {n} updates to 4 awake tenants (reference agent in the bubblewrap sandbox), no webhooks meanwhile; CPU per delivered update"
        ),
        &format!("the agent itself: {} per reply", ms(per(2))),
        &format!(
            "{} per delivery: server {}, shims and sandboxes {}; replied at {}",
            ms(per(0) + per(1)),
            ms(per(0)),
            ms(per(1)),
            rate(delivered as f64 / took)
        ),
        &format!(
            "{:.2} of the agent's",
            (per(0) + per(1)) / per(2).max(f64::MIN_POSITIVE)
        ),
    );
    // Fairness: webhooks at a fixed rate while a backlog drains.
    let posted = loadgen(&server.public, &paths, n as u32, 1.0, 32, base).await;
    base += 1_000_000_000;
    assert_eq!(
        posted.ok as usize, n,
        "every update of the backlog accepted"
    );
    let a0 = answered();
    let during = loadgen(
        &server.public,
        &paths,
        DRAIN_ACCEPT_RATE,
        plan.run_s as f64,
        32,
        base,
    )
    .await;
    let delivered = answered() - a0;
    table.row(
        &format!(
            "accepts while a backlog of {n} drains (4 awake tenants, the bench's own open-loop generator, 32 connections)"
        ),
        "",
        &format!(
            "{}; {delivered} replies meanwhile ({})",
            during.summary(),
            rate(delivered as f64 / plan.run_s as f64)
        ),
        "",
    );
    server.stop().await;
    if plan.drain_only {
        println!();
        println!("otm side by side, drain rows only (--drain): {}", machine());
        println!();
        table.print();
        return;
    }

    // Awake reply latency: through otm, straight to the same agent, through nginx as a proxy.
    eprintln!("awake reply latency…");
    let data = dir.path().join("otm-awake");
    // The instance sandboxed as in production (bubblewrap).
    let server = OtmServer::start(&data, &tg, None, "auto").await;
    let bot = "7200:AWAKE";
    let secret = server.tenant(&http, &tg, "awake", bot, "reference").await;
    // The three paths take turns, one message each, so that the machine's load changes weigh
    // on all three alike. The first message on each wakes or warms it up and is not counted.
    let paths = [
        (
            format!("{}/tg/awake", server.public),
            secret.clone(),
            bot.to_owned(),
        ),
        (
            format!("http://127.0.0.1:{}/webhook", agent.port),
            agent.secret.clone(),
            agent.bot.clone(),
        ),
        (
            format!("{}/webhook", nginx.proxy_url()),
            agent.secret.clone(),
            agent.bot.clone(),
        ),
    ];
    let mut lat: [Vec<f64>; 3] = Default::default();
    let mut next_id = 1u64;
    for i in 0..=plan.replies {
        for (k, (url, secret, bot)) in paths.iter().enumerate() {
            let t = reply_once(&http, &tg, url, secret, bot, next_id).await;
            next_id += 1;
            if i > 0 {
                lat[k].push(t);
            }
        }
    }
    let [via_otm, direct, proxied] = lat;
    let p = |v: &[f64]| {
        format!(
            "p50 {} / p90 {} / p99 {}",
            ms(pct(v, 0.5)),
            ms(pct(v, 0.9)),
            ms(pct(v, 0.99))
        )
    };
    table.row(
        &format!(
            "awake reply, webhook to reply at Telegram ({} in turn)",
            plan.replies
        ),
        &format!(
            "straight to the agent: {}; through nginx as a proxy: {}",
            p(&direct),
            p(&proxied)
        ),
        &format!("through otm: {}", p(&via_otm)),
        &format!(
            "+{} p50, +{} p99 over straight",
            ms(pct(&via_otm, 0.5) - pct(&direct, 0.5)),
            ms(pct(&via_otm, 0.99) - pct(&direct, 0.99))
        ),
    );

    // Wake latency by phase, from the server's own answers.
    eprintln!("wakes…");
    // (path, totals, phases) of each kind of wake, for the table and the plot.
    let starts_dir = dir.path().join("agent-starts");
    std::fs::create_dir_all(&starts_dir).unwrap();
    let starts = agent_starts(&starts_dir, &tg, plan.wakes).await;
    let mut wake_runs = Vec::new();
    for warm in [false, true] {
        let (totals, phases) = server.wakes(&http, "awake", plan.wakes, warm).await;
        let kind = if warm { "warm pool" } else { "cold" };
        wake_row(&mut table, kind, plan.wakes, &totals, &phases, &starts);
        wake_runs.push((kind, totals, phases));
    }

    // What one awake instance holds, process by process (the tenant was just answered).
    let procs = instance_processes(&data);
    if !procs.is_empty() {
        let list = procs
            .iter()
            .map(|(name, rss, pss)| {
                format!(
                    "{name} {:.1} MiB RSS / {:.1} MiB PSS",
                    *rss as f64 / 1024.0,
                    *pss as f64 / 1024.0
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        let (rss, pss) = procs
            .iter()
            .fold((0, 0), |(r, p), (_, rss, pss)| (r + rss, p + pss));
        table.row(
            "one awake instance (reference agent in the bubblewrap sandbox), by process",
            "",
            &list,
            &format!(
                "{:.1} MiB RSS, {:.1} MiB proportional in all",
                rss as f64 / 1024.0,
                pss as f64 / 1024.0
            ),
        );
    }

    // The shim of each of ten awake instances: the pages of its binary are shared between the
    // shims and divided among them in PSS, what each holds of its own is not.
    eprintln!("ten awake instances…");
    let mut others = Vec::new();
    for i in 1..10 {
        let (id, bot) = (format!("awake-{i}"), format!("72{i:02}:AWAKE"));
        let secret = server.tenant(&http, &tg, &id, &bot, "reference").await;
        let url = format!("{}/tg/{id}", server.public);
        reply_once(&http, &tg, &url, &secret, &bot, next_id).await;
        next_id += 1;
        others.push(id);
    }
    let shims = shim_memory(&data);
    if !shims.is_empty() {
        let n = shims.len() as f64;
        let mean = |k: usize| shims.iter().map(|m| m[k]).sum::<u64>() as f64 / n / 1024.0;
        table.row(
            &format!("the shim of each of {} awake instances, mean", shims.len()),
            "",
            &format!(
                "{:.1} MiB RSS / {:.1} MiB PSS / {:.1} MiB private dirty",
                mean(0),
                mean(1),
                mean(2)
            ),
            "",
        );
    }
    for id in &others {
        let path = format!("/tenants/{id}/stop");
        server.api(&http, reqwest::Method::POST, &path, None).await;
    }

    // A reply from the frozen tier: the tenant is frozen after a second idle, then written to;
    // webhook to reply at Telegram, beside the awake reply of the same run.
    eprintln!("frozen replies…");
    let (s, v) = server
        .api(
            &http,
            reqwest::Method::PATCH,
            "/tenants/awake",
            Some(json!({"freeze_after_s": 1})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let awake_url = format!("{}/tg/awake", server.public);
    let mut from_frozen = Vec::new();
    let mut next_id = 900_000_000u64;
    for _ in 0..plan.wakes {
        next_id += 1;
        reply_once(&http, &tg, &awake_url, &secret, bot, next_id).await;
        server.wait_frozen(&http, "awake").await;
        next_id += 1;
        from_frozen.push(reply_once(&http, &tg, &awake_url, &secret, bot, next_id).await);
    }
    table.row(
        &format!(
            "reply from the frozen tier, webhook to reply at Telegram ({} thaws, reference agent in the bubblewrap sandbox)",
            plan.wakes
        ),
        &format!("awake reply through otm: p50 {}", ms(pct(&via_otm, 0.5))),
        &format!(
            "p50 {}, max {}",
            ms(pct(&from_frozen, 0.5)),
            ms(pct(&from_frozen, 1.0))
        ),
        &format!(
            "+{} p50 over awake",
            ms(pct(&from_frozen, 0.5) - pct(&via_otm, 0.5))
        ),
    );

    // Wakes from the frozen tier through the admin API, by phase.
    let (totals, phases) = server.frozen_wakes(&http, "awake", plan.wakes).await;
    frozen_wake_row(&mut table, plan.wakes, &totals, &phases);
    wake_runs.push(("frozen", totals, phases));

    // Control-plane memory per idle tenant.
    eprintln!("idle tenants…");
    let before = server.rss_kib();
    server.idle_tenants(&http, plan.idle_tenants).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = server.rss_kib();
    table.row(
        &format!(
            "control-plane RSS per idle tenant ({} created)",
            plan.idle_tenants
        ),
        "",
        &format!(
            "{:.1} kB (server RSS {} MiB → {} MiB)",
            (after as f64 - before as f64) * 1.024 / plan.idle_tenants as f64,
            before / 1024,
            after / 1024
        ),
        "",
    );
    server.stop().await;
    drop(nginx);
    drop(agent);

    // Plots.
    let sweep_svg = out_dir.join("accepts-by-connections.svg");
    if plan.sweep.len() > 1 {
        plot_sweep(&sweep_svg, &sweep_otm);
    }
    let cdf_svg = out_dir.join("awake-reply-cdf.svg");
    plot_cdf(
        &cdf_svg,
        &[
            ("through otm", &via_otm),
            ("straight to the agent", &direct),
            ("through nginx as a proxy", &proxied),
        ],
    );

    let wakes_svg = out_dir.join("wake-phases.svg");
    plot_wakes(&wakes_svg, &wake_runs);

    let load_after = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!();
    println!(
        "otm side by side{}: {}",
        if plan.quick { " (--quick)" } else { "" },
        machine()
    );
    println!(
        "load average (1, 5, 15 min) before: {}; after: {}; run took {:.0} s",
        load_before
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        load_after
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        started.elapsed().as_secs_f64()
    );
    println!(
        "otm's accept runs use --sandbox none (ingress only; the awake and wake rows use the bubblewrap \
         sandbox), all without Telegram's send pacing (--bot-messages-per-second 0, \
         --bot-chat-interval-ms 0); wrk -t2 and the stand-in Telegram share the cores with what \
         they measure."
    );
    println!();
    table.print();
    if plan.sweep.len() > 1 {
        print_sweep(&sweep_otm);
        println!("plot: {}", sweep_svg.display());
    }
    println!("plot: {}", cdf_svg.display());
    println!("plot: {}", wakes_svg.display());
}

/// The connection sweep's points: otm's accepts/s beside nginx's.
fn print_sweep(sweep: &[(u32, f64, f64)]) {
    println!();
    println!("accepts/s by connections (otm on SQLite, deliveries paused; nginx):");
    for (c, o, n) in sweep {
        println!("  {c:>4}: otm {o:>9.0}  nginx {n:>9.0}");
    }
}

/// The phases of a kind of wake in the order they run.
const PHASE_ORDER: [&str; 8] = [
    "prepare", "claim", "create", "thaw", "restore", "start", "ready", "record",
];

/// The phases sorted as they run, each with its p50.
fn phase_p50s(phases: &std::collections::BTreeMap<String, Vec<f64>>) -> Vec<(String, f64)> {
    let mut out: Vec<(String, f64)> = phases
        .iter()
        .map(|(k, v)| (k.clone(), pct(v, 0.5)))
        .collect();
    out.sort_by_key(|(k, _)| {
        PHASE_ORDER
            .iter()
            .position(|o| o == k)
            .unwrap_or(PHASE_ORDER.len())
    });
    out
}

/// `--wakes`: cold, warm-pool and frozen wakes of one tenant on the reference agent in the
/// bubblewrap sandbox, by phase, and their plot.
async fn wake_rows(
    plan: &Plan,
    dir: &Path,
    tg: &FakeTelegram,
    http: &reqwest::Client,
    table: &mut Table,
    out_dir: &Path,
) {
    eprintln!("wakes…");
    let server = OtmServer::start(&dir.join("otm-wakes"), tg, None, "auto").await;
    let bot = "7200:AWAKE";
    let secret = server.tenant(http, tg, "awake", bot, "reference").await;
    // The first wake, and the first reply, bring the binaries' pages in.
    reply_once(
        http,
        tg,
        &format!("{}/tg/awake", server.public),
        &secret,
        bot,
        1,
    )
    .await;
    let agent_dir = dir.join("agent-starts");
    std::fs::create_dir_all(&agent_dir).unwrap();
    let starts = agent_starts(&agent_dir, tg, plan.wakes).await;
    let mut runs = Vec::new();
    for warm in [false, true] {
        let (totals, phases) = server.wakes(http, "awake", plan.wakes, warm).await;
        let kind = if warm { "warm pool" } else { "cold" };
        wake_row(table, kind, plan.wakes, &totals, &phases, &starts);
        runs.push((kind, totals, phases));
    }
    let (s, v) = server
        .api(
            http,
            reqwest::Method::PATCH,
            "/tenants/awake",
            Some(json!({"freeze_after_s": 1})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let (totals, phases) = server.frozen_wakes(http, "awake", plan.wakes).await;
    frozen_wake_row(table, plan.wakes, &totals, &phases);
    runs.push(("frozen", totals, phases));
    server.stop().await;
    plot_wakes(&out_dir.join("wake-phases.svg"), &runs);
}

/// A row of cold or warm-pool wakes, beside the agent's own start.
fn wake_row(
    table: &mut Table,
    kind: &str,
    n: usize,
    totals: &[f64],
    phases: &std::collections::BTreeMap<String, Vec<f64>>,
    agent_starts: &[f64],
) {
    table.row(
        &format!("wake, {kind}, reference agent in the bubblewrap sandbox ({n} wakes, admin API's answers)"),
        &format!(
            "the agent's own start (inside `ready`), spawned by hand without a sandbox, to its first accepted connection: p50 {}",
            ms(pct(agent_starts, 0.5))
        ),
        &wake_text(totals, phases),
        &format!(
            "+{} p50 beyond the agent's own start",
            ms(pct(totals, 0.5) - pct(agent_starts, 0.5))
        ),
    );
}

/// A row of wakes from the frozen tier.
fn frozen_wake_row(
    table: &mut Table,
    n: usize,
    totals: &[f64],
    phases: &std::collections::BTreeMap<String, Vec<f64>>,
) {
    table.row(
        &format!("wake, frozen tier, reference agent in the bubblewrap sandbox ({n} wakes, admin API's answers)"),
        "",
        &wake_text(totals, phases),
        "",
    );
}

/// Adds one answer of the admin API's wake (its total and phases) to a run's figures.
fn record_wake(
    v: &serde_json::Value,
    totals: &mut Vec<f64>,
    phases: &mut std::collections::BTreeMap<String, Vec<f64>>,
) {
    totals.push(v["total_ms"].as_f64().unwrap());
    for (k, ms) in v["phases_ms"].as_object().unwrap() {
        phases
            .entry(k.clone())
            .or_default()
            .push(ms.as_f64().unwrap());
    }
}

fn wake_text(totals: &[f64], phases: &std::collections::BTreeMap<String, Vec<f64>>) -> String {
    let by_phase = phase_p50s(phases)
        .iter()
        .map(|(k, v)| format!("{k} {}", ms(*v)))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "p50 {}, max {}; phases p50: {by_phase}",
        ms(pct(totals, 0.5)),
        ms(pct(totals, 1.0))
    )
}

#[derive(Default)]
struct Table(Vec<[String; 4]>);

impl Table {
    fn row(&mut self, measure: &str, floor: &str, otm: &str, ratio: &str) {
        self.0
            .push([measure.into(), floor.into(), otm.into(), ratio.into()]);
    }

    fn print(&self) {
        println!("| measure | floor in the same run | otm | ratio |");
        println!("|---|---|---|---|");
        for r in &self.0 {
            println!("| {} | {} | {} | {} |", r[0], r[1], r[2], r[3]);
        }
    }
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok())
        .unwrap_or(0);
    format!(
        "{cores} cores ({model}), {} GiB, Linux {}",
        mem / 1024 / 1024,
        kernel.trim()
    )
}

fn rate(r: f64) -> String {
    if r >= 10_000.0 {
        format!("{:.1}k/s", r / 1000.0)
    } else {
        format!("{r:.0}/s")
    }
}

fn ms(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0} ms")
    } else if v.abs() >= 10.0 {
        format!("{v:.1} ms")
    } else {
        format!("{v:.2} ms")
    }
}

fn pct(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// One `wrk` run, as its Lua `done` reported it.
struct WrkRun {
    rps: f64,
    requests: u64,
    non_2xx: u64,
    socket_errors: u64,
    p50_ms: f64,
    p99_ms: f64,
}

impl WrkRun {
    fn failures(&self) -> String {
        if self.non_2xx + self.socket_errors == 0 {
            String::new()
        } else {
            format!(
                " ({} not 2xx, {} socket errors)",
                self.non_2xx, self.socket_errors
            )
        }
    }
}

/// The wrk script: POSTs a Telegram update with an update id no other request of the run uses
/// (`base` + the thread number × 10⁸ + a counter) to each tenant in turn, with its secret.
fn write_script(path: &Path, tenants: &[(String, String)]) {
    let mut list = String::new();
    for (p, s) in tenants {
        writeln!(list, "  {{ {p:?}, {s:?} }},").unwrap();
    }
    let script = format!(
        r#"local tenants = {{
{list}}}
local template = [[{UPDATE_TEMPLATE}]]
next_thread = 0
thread_no = 0
function setup(thread)
  thread:set("thread_no", next_thread)
  next_thread = next_thread + 1
end
local base = 0
local n = 0
function init(args)
  base = tonumber(args[1] or "0")
end
function request()
  n = n + 1
  local id = base + thread_no * 100000000 + n
  local chat = 10 + id % 1000
  local t = tenants[n % #tenants + 1]
  local body = string.format(template, id, id, chat, chat, chat, chat)
  return wrk.format("POST", t[1], {{["Content-Type"] = "application/json", ["X-Telegram-Bot-Api-Secret-Token"] = t[2]}}, body)
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("BENCH %d %d %d %d %f %f\n", summary.requests, summary.duration,
    e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50) / 1000.0, latency:percentile(99) / 1000.0))
end
"#
    );
    std::fs::write(path, script).unwrap();
}

async fn wrk(url: &str, script: &Path, conns: u32, secs: u32, base: u64) -> WrkRun {
    let out = tokio::process::Command::new(WRK.get().unwrap())
        .arg(format!("-t{}", conns.min(2)))
        .arg(format!("-c{conns}"))
        .arg(format!("-d{secs}s"))
        .args(["--timeout", "10s", "-s"])
        .arg(script)
        .arg(url)
        .arg("--")
        .arg(base.to_string())
        .output()
        .await
        .expect("running wrk");
    let f = summary(&out, "BENCH ", "wrk");
    WrkRun {
        rps: f[0] / (f[1] / 1e6),
        requests: f[0] as u64,
        non_2xx: f[2] as u64,
        socket_errors: f[3] as u64,
        p50_ms: f[4],
        p99_ms: f[5],
    }
}

/// One run of the bench's own open-loop load generator, as it reported it: requests offered at a
/// fixed rate whatever the answers' pace (as `wrk2` does, which Debian does not package).
struct LoadRun {
    offered_rps: f64,
    ok: u64,
    failed: u64,
    /// Requests answered 200 per second of the run.
    rps: f64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

impl LoadRun {
    fn summary(&self) -> String {
        let mut s = format!(
            "{} offered, {} answered; p50 {}, p90 {}, p99 {}, max {}",
            rate(self.offered_rps),
            rate(self.rps),
            ms(self.p50_ms),
            ms(self.p90_ms),
            ms(self.p99_ms),
            ms(self.max_ms)
        );
        if self.failed > 0 {
            write!(s, " ({} failed)", self.failed).unwrap();
        }
        s
    }
}

/// Runs this bench binary as a load generator of its own (a separate process, as `wrk` is):
/// `rate` updates a second for `secs` seconds over `conns` connections, to the tenants in turn.
async fn loadgen(
    url: &str,
    tenants: &[(String, String)],
    rate: u32,
    secs: f64,
    conns: u32,
    base: u64,
) -> LoadRun {
    let list: String = tenants
        .iter()
        .map(|(path, secret)| format!("{path} {secret}\n"))
        .collect();
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), list).unwrap();
    let out = tokio::process::Command::new(std::env::current_exe().unwrap())
        .arg("--loadgen")
        .arg(url)
        .arg(rate.to_string())
        .arg(secs.to_string())
        .arg(conns.to_string())
        .arg(base.to_string())
        .arg(file.path())
        .output()
        .await
        .expect("running the load generator");
    let f = summary(&out, "LOADGEN ", "the load generator");
    LoadRun {
        offered_rps: rate as f64,
        ok: f[0] as u64,
        failed: f[1] as u64,
        rps: f[0] / f[2],
        p50_ms: f[3],
        p90_ms: f[4],
        p99_ms: f[5],
        max_ms: f[6],
    }
}

/// `--loadgen URL RATE SECS CONNS BASE TENANTS_FILE`: posts update `BASE + k` at `start + k /
/// RATE` to tenant `k mod n` (the file's lines: `PATH SECRET`), request `k` on connection
/// `k mod CONNS`, one request in flight per connection. A request's latency runs from the time
/// it was due when its connection was still busy then (the wait is the server's doing), else
/// from when it was sent (a late timer is the generator's). Prints `LOADGEN ok failed seconds
/// p50 p90 p99 max`, in ms.
fn loadgen_main(args: &[String]) -> i32 {
    let [url, rate, secs, conns, base, tenants] = args else {
        eprintln!("usage: --loadgen URL RATE SECS CONNS BASE TENANTS_FILE");
        return 2;
    };
    let (Ok(rate), Ok(secs), Ok(conns), Ok(base)) = (
        rate.parse::<f64>(),
        secs.parse::<f64>(),
        conns.parse::<u64>(),
        base.parse::<u64>(),
    ) else {
        eprintln!("--loadgen: RATE, SECS, CONNS and BASE are numbers");
        return 2;
    };
    let tenants: Vec<(String, String)> = std::fs::read_to_string(tenants)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(p, s)| (format!("{url}{p}"), s.to_owned()))
        .collect();
    if tenants.is_empty() || conns == 0 {
        eprintln!("--loadgen: no tenants, or no connections");
        return 2;
    }
    // One thread: the generator takes at most one core from what it measures.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let http = reqwest::Client::builder()
            .no_proxy()
            .http1_only()
            .pool_max_idle_per_host(conns as usize)
            .build()
            .unwrap();
        let total = (rate * secs) as u64;
        let tenants = std::sync::Arc::new(tenants);
        let start = tokio::time::Instant::now() + Duration::from_millis(50);
        let mut tasks = tokio::task::JoinSet::new();
        for c in 0..conns {
            let (http, tenants) = (http.clone(), tenants.clone());
            tasks.spawn(async move {
                let (mut ok, mut failed, mut lat) = (0u64, 0u64, Vec::new());
                let mut free_at = start;
                let mut k = c;
                while k < total {
                    let due = start + Duration::from_secs_f64(k as f64 / rate);
                    tokio::time::sleep_until(due).await;
                    let sent = tokio::time::Instant::now();
                    let from = if free_at > due { due } else { sent };
                    let (url, secret) = &tenants[(k % tenants.len() as u64) as usize];
                    let r = http
                        .post(url)
                        .header(SECRET_HEADER, secret)
                        .header("content-type", "application/json")
                        .body(update_body(base + k))
                        .timeout(Duration::from_secs(10))
                        .send()
                        .await;
                    free_at = tokio::time::Instant::now();
                    match r {
                        Ok(r) if r.status() == 200 => {
                            ok += 1;
                            lat.push((free_at - from).as_secs_f64() * 1000.0);
                        }
                        _ => failed += 1,
                    }
                    k += conns;
                }
                (ok, failed, lat)
            });
        }
        let (mut ok, mut failed, mut lat) = (0, 0, Vec::new());
        while let Some(r) = tasks.join_next().await {
            let (o, f, l) = r.unwrap();
            ok += o;
            failed += f;
            lat.extend(l);
        }
        let took = (tokio::time::Instant::now() - start).as_secs_f64();
        println!(
            "LOADGEN {ok} {failed} {took} {} {} {} {}",
            pct(&lat, 0.5),
            pct(&lat, 0.9),
            pct(&lat, 0.99),
            pct(&lat, 1.0)
        );
    });
    0
}

/// CPU time (user + system) a process has used so far, in ms.
fn cpu_ms(pid: u64) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command's name, which may hold spaces: state is the first.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    // In USER_HZ, which Linux keeps at 100 on every architecture it exports it to.
    ticks as f64 * 10.0
}

/// The numbers on the line of a load generator's output that starts with `prefix`.
fn summary(out: &std::process::Output, prefix: &str, what: &str) -> Vec<f64> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| {
            panic!(
                "{what} gave no summary: {stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    line.split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect()
}

/// Rows per second SQLite commits into otm's inbox table, `per_tx` rows a transaction, in WAL
/// mode with `synchronous=FULL`, as otm's writer does (`BEGIN IMMEDIATE`, `INSERT … RETURNING`).
fn sqlite_floor(db: &Path, per_tx: usize, secs: f64) -> f64 {
    let mut conn = rusqlite::Connection::open(db).unwrap();
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    conn.pragma_update(None, "synchronous", "FULL").unwrap();
    conn.pragma_update(None, "foreign_keys", true).unwrap();
    conn.execute_batch(
        "CREATE TABLE tenants (id TEXT PRIMARY KEY) STRICT;
         CREATE TABLE inbox (
            seq            INTEGER PRIMARY KEY AUTOINCREMENT,
            tenant         TEXT NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
            update_id      INTEGER NOT NULL,
            payload        BLOB NOT NULL,
            state          TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'done', 'dead')),
            attempts       INTEGER NOT NULL DEFAULT 0,
            accepted_at_ms INTEGER NOT NULL,
            last_error     TEXT,
            done_at_ms     INTEGER,
            UNIQUE (tenant, update_id)
         ) STRICT;
         CREATE INDEX inbox_pending ON inbox (tenant, seq) WHERE state = 'pending';
         CREATE INDEX inbox_dead ON inbox (tenant, seq) WHERE state = 'dead';
         INSERT INTO tenants VALUES ('in0'), ('in1'), ('in2'), ('in3');",
    )
    .unwrap();
    let tenants = ["in0", "in1", "in2", "in3"];
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed().as_secs_f64() < secs {
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .unwrap();
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT INTO inbox (tenant, update_id, payload, accepted_at_ms) \
                     VALUES (?1, ?2, ?3, ?4) RETURNING seq",
                )
                .unwrap();
            for _ in 0..per_tx {
                n += 1;
                let body = update_body(n);
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_millis() as i64;
                let _seq: i64 = stmt
                    .query_row(
                        rusqlite::params![tenants[n as usize % 4], n as i64, body.as_bytes(), now],
                        |r| r.get(0),
                    )
                    .unwrap();
            }
        }
        tx.commit().unwrap();
    }
    n as f64 / started.elapsed().as_secs_f64()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn wait_listening(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "{what} is not listening on {port}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// nginx on two loopback ports: one answering every request with a fixed 200, one a plain
/// reverse proxy to the directly started agent (keep-alive upstream connections).
struct Nginx {
    child: std::process::Child,
    fixed: u16,
    proxy: u16,
}

impl Nginx {
    fn start(bin: &Path, dir: &Path, agent_port: u16) -> Nginx {
        std::fs::create_dir_all(dir.join("logs")).unwrap();
        let fixed = free_port();
        let proxy = free_port();
        let d = dir.display();
        let conf = format!(
            r#"daemon off;
worker_processes auto;
pid {d}/nginx.pid;
error_log {d}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  keepalive_requests 1000000;
  upstream agent {{ server 127.0.0.1:{agent_port}; keepalive 16; }}
  server {{
    listen 127.0.0.1:{fixed};
    location / {{ return 200 '{{"ok":true}}'; }}
  }}
  server {{
    listen 127.0.0.1:{proxy};
    location / {{
      proxy_pass http://agent;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
"#
        );
        let path = dir.join("nginx.conf");
        std::fs::write(&path, conf).unwrap();
        let child = std::process::Command::new(bin)
            .arg("-c")
            .arg(&path)
            .arg("-p")
            .arg(dir)
            .arg("-e")
            .arg(dir.join("logs/error.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting nginx");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", proxy)).is_err() {
            assert!(Instant::now() < deadline, "nginx did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Nginx {
            child,
            fixed,
            proxy,
        }
    }

    fn fixed_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.fixed)
    }

    fn proxy_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.proxy)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGQUIT: nginx's graceful stop; its workers go with the master.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGQUIT,
        );
        let _ = self.child.wait();
    }
}

/// The reference agent started by hand, its Bot API the stand-in Telegram.
struct DirectAgent {
    child: tokio::process::Child,
    port: u16,
    bot: String,
    secret: String,
}

impl DirectAgent {
    async fn start(dir: &Path, tg: &FakeTelegram) -> DirectAgent {
        let port = free_port();
        let bot = "7300:DIRECT".to_owned();
        let secret = "direct-secret".to_owned();
        tg.add_bot(&bot);
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_otm-reference-agent"))
            .env("OTM_AGENT_LISTEN", format!("127.0.0.1:{port}"))
            .env("OTM_AGENT_STATE_DIR", dir)
            .env("OTM_BOT_API_ROOT", tg.url())
            .env("OTM_BOT_TOKEN", &bot)
            .env("OTM_WEBHOOK_SECRET", &secret)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("starting otm-reference-agent");
        wait_listening(port, "the reference agent").await;
        DirectAgent {
            child,
            port,
            bot,
            secret,
        }
    }
}

/// The reference agent's own start, `n` times: milliseconds from spawning it by hand (no
/// sandbox) to its first accepted connection, polled every 100 µs.
async fn agent_starts(dir: &Path, tg: &FakeTelegram, n: usize) -> Vec<f64> {
    let (dir, root) = (dir.to_owned(), tg.url());
    tokio::task::spawn_blocking(move || {
        (0..n)
            .map(|_| {
                let port = free_port();
                let t0 = Instant::now();
                let mut child =
                    std::process::Command::new(env!("CARGO_BIN_EXE_otm-reference-agent"))
                        .env("OTM_AGENT_LISTEN", format!("127.0.0.1:{port}"))
                        .env("OTM_AGENT_STATE_DIR", &dir)
                        .env("OTM_BOT_API_ROOT", &root)
                        .env("OTM_BOT_TOKEN", "7301:START")
                        .env("OTM_WEBHOOK_SECRET", "start-secret")
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()
                        .expect("starting otm-reference-agent");
                let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
                while std::net::TcpStream::connect(addr).is_err() {
                    assert!(
                        t0.elapsed() < Duration::from_secs(10),
                        "the agent did not listen"
                    );
                    std::thread::sleep(Duration::from_micros(100));
                }
                let ms = t0.elapsed().as_secs_f64() * 1000.0;
                let _ = child.kill();
                let _ = child.wait();
                ms
            })
            .collect()
    })
    .await
    .unwrap()
}

impl Drop for DirectAgent {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Milliseconds from posting an update to its reply arriving at the stand-in Telegram.
async fn reply_once(
    http: &reqwest::Client,
    tg: &FakeTelegram,
    url: &str,
    secret: &str,
    bot: &str,
    id: u64,
) -> f64 {
    let have = tg.sent_messages(bot).len();
    let t0 = Instant::now();
    let r = http
        .post(url)
        .header(SECRET_HEADER, secret)
        .header("content-type", "application/json")
        .body(update_body(id))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{url}");
    tg.wait_for_messages(bot, have + 1, Duration::from_secs(120))
        .await;
    t0.elapsed().as_secs_f64() * 1000.0
}

/// The release `otm server` as a process of its own, on loopback ports, with a data directory of
/// its own.
struct OtmServer {
    child: tokio::process::Child,
    data: PathBuf,
    public: String,
    admin: String,
}

impl OtmServer {
    async fn start(
        data: &Path,
        tg: &FakeTelegram,
        registry: Option<&str>,
        sandbox: &str,
    ) -> OtmServer {
        std::fs::create_dir_all(data).unwrap();
        let (public, admin, egress) = (free_port(), free_port(), free_port());
        // An OpenClaw that exits at once: tenants on the openclaw profile fail every wake, and
        // their updates stay in the inbox (deliveries paused; each retried with backoff).
        let no_openclaw = data.join("failing-openclaw");
        std::fs::create_dir_all(no_openclaw.join("bin")).unwrap();
        let fake = no_openclaw.join("bin/openclaw");
        std::fs::write(&fake, "#!/bin/sh\nexit 1\n").unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let log = std::fs::File::create(data.join("server.log")).unwrap();
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_otm"));
        cmd.arg("--data-dir")
            .arg(data)
            .arg("server")
            .arg(format!("--listen=127.0.0.1:{public}"))
            .arg(format!("--admin-listen=127.0.0.1:{admin}"))
            .arg(format!("--egress-listen=127.0.0.1:{egress}"))
            .arg(format!("--telegram-api={}", tg.url()))
            .arg("--public-url=https://otm.bench.test")
            .arg(format!("--sandbox={sandbox}"))
            .arg("--bot-messages-per-second=0")
            .arg("--bot-chat-interval-ms=0")
            .arg("--bot-group-messages-per-minute=0")
            .arg("--snapshot-interval-s=0")
            .arg("--openclaw-prefix")
            .arg(&no_openclaw)
            .env("OTM_ADMIN_TOKEN", ADMIN_TOKEN)
            .env_remove("OTM_REGISTRY")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true);
        if let Some(r) = registry {
            cmd.arg(format!("--registry={r}"));
        }
        let mut child = cmd.spawn().expect("starting otm server");
        let deadline = Instant::now() + Duration::from_secs(60);
        for port in [admin, public] {
            while tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err()
            {
                let exited = child.try_wait().unwrap();
                if exited.is_some() || Instant::now() > deadline {
                    let log = std::fs::read_to_string(data.join("server.log")).unwrap_or_default();
                    panic!("otm server did not start ({exited:?}):\n{log}");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        OtmServer {
            child,
            data: data.to_owned(),
            public: format!("http://127.0.0.1:{public}"),
            admin: format!("http://127.0.0.1:{admin}/v1"),
        }
    }

    async fn api(
        &self,
        http: &reqwest::Client,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = http
            .request(method, format!("{}{path}", self.admin))
            .bearer_auth(ADMIN_TOKEN);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Creates a tenant with a bot; returns the webhook secret Telegram was given.
    async fn tenant(
        &self,
        http: &reqwest::Client,
        tg: &FakeTelegram,
        id: &str,
        bot: &str,
        profile: &str,
    ) -> String {
        tg.add_bot(bot);
        let (status, body) = self
            .api(
                http,
                reqwest::Method::POST,
                "/tenants",
                Some(json!({"id": id, "bot_token": bot, "profile": profile})),
            )
            .await;
        assert_eq!(status, 201, "creating tenant {id}: {body}");
        tg.webhook(bot)
            .and_then(|h| h.secret_token)
            .expect("webhook registered with a secret")
    }

    /// Wakes the tenant `n` times from stopped (cold) or from the warm pool; the totals and the
    /// phases as the server reports them, in ms.
    async fn wakes(
        &self,
        http: &reqwest::Client,
        id: &str,
        n: usize,
        warm: bool,
    ) -> (Vec<f64>, std::collections::BTreeMap<String, Vec<f64>>) {
        let post = reqwest::Method::POST;
        if warm {
            self.api(
                http,
                reqwest::Method::PUT,
                "/config",
                Some(json!({"warm_pool_target": 1})),
            )
            .await;
        }
        let mut totals = Vec::new();
        let mut phases: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
        for _ in 0..n {
            let (s, _) = self
                .api(http, post.clone(), &format!("/tenants/{id}/stop"), None)
                .await;
            assert_eq!(s, 200);
            if warm {
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    let (_, list) = self
                        .api(http, reqwest::Method::GET, "/instances", None)
                        .await;
                    if list
                        .as_array()
                        .is_some_and(|l| l.iter().any(|i| i["state"] == "warm"))
                    {
                        break;
                    }
                    assert!(Instant::now() < deadline, "no warm instance");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            let (s, v) = self
                .api(http, post.clone(), &format!("/tenants/{id}/wake"), None)
                .await;
            assert_eq!(s, 200, "{v}");
            let expect = if warm { "warm" } else { "cold" };
            assert_eq!(v["path"], expect, "{v}");
            record_wake(&v, &mut totals, &mut phases);
        }
        if warm {
            self.api(
                http,
                reqwest::Method::PUT,
                "/config",
                Some(json!({"warm_pool_target": 0})),
            )
            .await;
        }
        (totals, phases)
    }

    /// Waits until the tenant is frozen (its `freeze_after_s` is short).
    /// `n` wakes from the frozen tier through the admin API: (totals, phases) as `wakes`. The
    /// tenant has a short `freeze_after_s`.
    async fn frozen_wakes(
        &self,
        http: &reqwest::Client,
        id: &str,
        n: usize,
    ) -> (Vec<f64>, std::collections::BTreeMap<String, Vec<f64>>) {
        let mut totals = Vec::new();
        let mut phases: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
        for _ in 0..n {
            self.wait_frozen(http, id).await;
            let (s, v) = self
                .api(
                    http,
                    reqwest::Method::POST,
                    &format!("/tenants/{id}/wake"),
                    None,
                )
                .await;
            assert_eq!(s, 200, "{v}");
            assert_eq!(v["path"], "frozen", "{v}");
            record_wake(&v, &mut totals, &mut phases);
        }
        (totals, phases)
    }

    async fn wait_frozen(&self, http: &reqwest::Client, id: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (_, t) = self
                .api(http, reqwest::Method::GET, &format!("/tenants/{id}"), None)
                .await;
            if t["status"] == "frozen" {
                return;
            }
            assert!(Instant::now() < deadline, "never frozen: {t}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Creates `n` tenants without bots (never woken), 32 requests at a time.
    async fn idle_tenants(&self, http: &reqwest::Client, n: usize) {
        use futures::StreamExt;
        futures::stream::iter(0..n)
            .map(|i| async move {
                let (s, b) = self
                    .api(
                        http,
                        reqwest::Method::POST,
                        "/tenants",
                        Some(json!({"id": format!("idle{i}")})),
                    )
                    .await;
                assert_eq!(s, 201, "{b}");
            })
            .buffer_unordered(32)
            .collect::<Vec<()>>()
            .await;
    }

    fn rss_kib(&self) -> u64 {
        let pid = self.child.id().unwrap();
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
            .unwrap_or(0)
    }

    /// Stops the server (SIGTERM), then kills the instances it leaves running for the next
    /// start to adopt. Tenants are not stopped through the API first: with a backlog in the
    /// inbox, the dispatcher would wake them again.
    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        if tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.start_kill();
            let _ = self.child.wait().await;
        }
        // Twice: a shim may have been starting its agent during the first pass.
        kill_instances(&self.data);
        tokio::time::sleep(Duration::from_millis(300)).await;
        kill_instances(&self.data);
        remove_cgroups(&self.data);
    }
}

/// The processes of the instances recorded under a data directory (the sandbox's first process
/// and every descendant): name, RSS and PSS in KiB.
fn instance_processes(data: &Path) -> Vec<(String, u64, u64)> {
    instance_pids(data)
        .into_iter()
        .map(|pid| {
            let proc = PathBuf::from(format!("/proc/{pid}"));
            let field = |text: &str, key: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(key))
                    .and_then(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok())
                    .unwrap_or(0)
            };
            let rollup = std::fs::read_to_string(proc.join("smaps_rollup")).unwrap_or_default();
            (
                process_name(pid),
                field(&rollup, "Rss:"),
                field(&rollup, "Pss:"),
            )
        })
        .collect()
}

fn process_name(pid: u64) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// The first process of every instance recorded under a data directory and all its descendants.
fn instance_pids(data: &Path) -> Vec<u64> {
    let mut out = Vec::new();
    let mut todo = recorded_pids(data);
    while let Some(pid) = todo.pop() {
        out.push(pid);
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let children =
                std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            todo.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u64>().ok()),
            );
        }
    }
    out
}

/// The shims of the instances recorded under a data directory (each the one process given its
/// instance's id, bubblewrap aside): RSS, PSS and private dirty memory in KiB.
fn shim_memory(data: &Path) -> Vec<[u64; 3]> {
    let mut out = Vec::new();
    for pid in instance_pids(data) {
        let proc = PathBuf::from(format!("/proc/{pid}"));
        let argv = std::fs::read(proc.join("cmdline")).unwrap_or_default();
        let argv: Vec<&[u8]> = argv.split(|b| *b == 0).collect();
        if argv.contains(&&b"--instance"[..]) && !argv[0].ends_with(b"bwrap") {
            let rollup = std::fs::read_to_string(proc.join("smaps_rollup")).unwrap_or_default();
            let field = |key: &str| {
                rollup
                    .lines()
                    .find_map(|l| l.strip_prefix(key))
                    .and_then(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok())
                    .unwrap_or(0)
            };
            out.push([field("Rss:"), field("Pss:"), field("Private_Dirty:")]);
        }
    }
    out
}

/// CPU used so far, in ms: by the otm server, by every instance's shim and sandbox processes,
/// and by the agents (the reference agent's processes).
fn cpu_use_ms(server: &OtmServer) -> [f64; 3] {
    let mut out = [cpu_ms(server.child.id().unwrap_or(0) as u64), 0.0, 0.0];
    for pid in instance_pids(&server.data) {
        let agent = process_name(pid).starts_with("otm-reference");
        out[if agent { 2 } else { 1 }] += cpu_ms(pid);
    }
    out
}

/// Kills every instance recorded under a data directory, and any agent left running with its
/// state there (without a sandbox, an agent does not die with its shim's process group).
fn kill_instances(data: &Path) {
    let marker = format!("OTM_AGENT_STATE_DIR={}", data.display());
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(environ) = std::fs::read(e.path().join("environ")) else {
            continue;
        };
        if environ
            .split(|b| *b == 0)
            .any(|v| v.starts_with(marker.as_bytes()))
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    for pid in recorded_pids(data) {
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    }
}

/// The first process of every instance recorded under a data directory.
/// Kills what is left in the cgroups of the instances recorded under a data directory (a frozen
/// agent included: the kill thaws it) and removes them, as the runtime does when it deletes an
/// instance; the server that would have was stopped with its instances still up.
fn remove_cgroups(data: &Path) {
    let Some(layout) = otm_runtime::cgroup::Layout::detect() else {
        return;
    };
    for d in std::fs::read_dir(data.join("runtime"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let Some(id) = d.file_name().to_str().map(otm_core::InstanceId::new) else {
            continue;
        };
        let cgroup = layout.instance(&id);
        if cgroup.exists() {
            let _ = cgroup.kill(Duration::from_secs(5));
            cgroup.remove();
        }
    }
}

fn recorded_pids(data: &Path) -> Vec<u64> {
    let Ok(dirs) = std::fs::read_dir(data.join("runtime")) else {
        return Vec::new();
    };
    dirs.flatten()
        .filter_map(|d| std::fs::read(d.path().join("record.json")).ok())
        .filter_map(|raw| serde_json::from_slice::<Value>(&raw).ok())
        .filter_map(|v| v["pid"].as_u64())
        .collect()
}

/// A named line of points in a colour.
type Series = (&'static str, RGBColor, Vec<(f64, f64)>);

fn plot_sweep(path: &Path, points: &[(u32, f64, f64)]) {
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    root.fill(&WHITE).unwrap();
    let max_c = points.iter().map(|p| p.0).max().unwrap_or(1) as f64;
    let max_y = points.iter().map(|p| p.1.max(p.2)).fold(1.0, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption("accepts/s by wrk connections", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((1.0f64..max_c).log_scale(), 0.0..max_y)
        .unwrap();
    chart
        .configure_mesh()
        .x_desc("connections")
        .y_desc("requests/s")
        .draw()
        .unwrap();
    let series: [Series; 2] = [
        (
            "nginx, fixed 200",
            RGBColor(120, 120, 120),
            points.iter().map(|p| (p.0 as f64, p.2)).collect(),
        ),
        (
            "otm on SQLite, durable accepts (deliveries paused)",
            RGBColor(31, 119, 180),
            points.iter().map(|p| (p.0 as f64, p.1)).collect(),
        ),
    ];
    for (name, color, data) in series {
        chart
            .draw_series(LineSeries::new(data.clone(), color.stroke_width(2)))
            .unwrap()
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart
            .draw_series(data.into_iter().map(|p| Circle::new(p, 3, color.filled())))
            .unwrap();
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .unwrap();
    root.present().unwrap();
}

fn plot_cdf(path: &Path, series: &[(&str, &Vec<f64>)]) {
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    root.fill(&WHITE).unwrap();
    // A log scale: the three paths differ by multiples, and the tails matter.
    let all = || series.iter().flat_map(|s| s.1.iter().copied());
    let max_x = all().fold(1.0, f64::max) * 1.2;
    let min_x = all().fold(max_x, f64::min).max(0.01) * 0.8;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "awake reply latency, webhook to reply at Telegram (CDF)",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d((min_x..max_x).log_scale(), 0.0..1.0f64)
        .unwrap();
    chart
        .configure_mesh()
        .x_desc("ms (log scale)")
        .y_desc("fraction of replies")
        .draw()
        .unwrap();
    let colors = [
        RGBColor(31, 119, 180),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
    ];
    for ((name, v), color) in series.iter().zip(colors) {
        let mut s = (*v).clone();
        s.sort_by(f64::total_cmp);
        let n = s.len() as f64;
        let pts: Vec<(f64, f64)> = s
            .iter()
            .enumerate()
            .map(|(i, x)| (*x, (i + 1) as f64 / n))
            .collect();
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .unwrap()
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .unwrap();
    root.present().unwrap();
}

/// Wake latency by phase: one bar per kind of wake, its phases' p50s stacked in the order they
/// run, and the p50 of the wake's total (the phases do not add up to it: the rest is the HTTP
/// round trip, the tenant's lock and tracing) as a black tick.
type WakeRun<'a> = (
    &'a str,
    Vec<f64>,
    std::collections::BTreeMap<String, Vec<f64>>,
);

fn plot_wakes(path: &Path, runs: &[WakeRun]) {
    let root = SVGBackend::new(path, (720, 300)).into_drawing_area();
    root.fill(&WHITE).unwrap();
    let max_x = runs
        .iter()
        .map(|(_, totals, phases)| {
            pct(totals, 0.5).max(phase_p50s(phases).iter().map(|p| p.1).sum())
        })
        .fold(1.0, f64::max)
        * 1.15;
    let n = runs.len();
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "wake latency by phase, p50 (reference agent, bubblewrap sandbox)",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..max_x, 0.0..n as f64)
        .unwrap();
    let names: Vec<String> = runs.iter().map(|r| r.0.to_owned()).collect();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(n * 2 + 1)
        .y_label_formatter(&|y| {
            let i = y.floor() as usize;
            if (y - y.floor() - 0.5).abs() < 0.01 && i < names.len() {
                names[names.len() - 1 - i].clone()
            } else {
                String::new()
            }
        })
        .x_desc("ms")
        .draw()
        .unwrap();
    let color = |phase: &str| {
        let i = PHASE_ORDER.iter().position(|p| *p == phase).unwrap_or(0);
        Palette99::pick(i).to_rgba()
    };
    let mut legend_done = std::collections::HashSet::new();
    for (i, (_, totals, phases)) in runs.iter().enumerate() {
        let y = (n - 1 - i) as f64;
        let mut x = 0.0;
        for (phase, v) in phase_p50s(phases) {
            let c = color(&phase);
            let bar = chart
                .draw_series([Rectangle::new([(x, y + 0.2), (x + v, y + 0.8)], c.filled())])
                .unwrap();
            if legend_done.insert(phase.clone()) {
                bar.label(phase).legend(move |(lx, ly)| {
                    Rectangle::new([(lx, ly - 5), (lx + 12, ly + 5)], c.filled())
                });
            }
            x += v;
        }
        let t = pct(totals, 0.5);
        chart
            .draw_series([PathElement::new(
                vec![(t, y + 0.1), (t, y + 0.9)],
                BLACK.stroke_width(2),
            )])
            .unwrap();
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .unwrap();
    root.present().unwrap();
}
