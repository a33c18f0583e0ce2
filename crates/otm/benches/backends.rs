//! Durable accepts with the inbox on each registry backend side by side, and wake latency with
//! Redis in the path. Backends whose URL is not set (`OTM_TEST_POSTGRES_URL`,
//! `OTM_TEST_DYNAMODB_URL`, `OTM_TEST_REDIS_URL`; `.ci/run` shows how to start them) are left out.
//! Run with `cargo bench -p otm --bench backends`.

use otm_server::Settings;
use otm_testkit::{FakeTelegram, text_update};
use serde_json::Value;
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn suffix() -> String {
    otm_core::id::random_hex(4)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

async fn run() {
    let mut rows: Vec<(String, String)> = Vec::new();
    let mut backends: Vec<(&str, Option<String>, Option<String>)> = vec![("SQLite", None, None)];
    if let Some(pg) = env("OTM_TEST_POSTGRES_URL") {
        let db = format!("otm_bench_{}", suffix());
        let ok = std::process::Command::new("psql")
            .arg(&pg)
            .args(["-q", "-c", &format!("CREATE DATABASE {db}")])
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            let base = pg.rsplit_once('/').unwrap().0.to_owned();
            backends.push(("PostgreSQL", Some(format!("{base}/{db}")), None));
        }
    }
    if let Some(d) = env("OTM_TEST_DYNAMODB_URL") {
        let (base, q) = d.split_once('?').unwrap_or((&d, ""));
        let url = format!("{base}-bench{}?{q}", suffix());
        otm_store::open::migrate_registry(&url).await.unwrap();
        backends.push(("DynamoDB (moto)", Some(url), None));
    }
    for (name, registry, coordinator) in &backends {
        let (rate, p50, p99, refused) = accepts(registry.clone(), coordinator.clone()).await;
        let note = if refused > 0 {
            format!(" ({refused} of 2048 refused with 503: the store failed)")
        } else {
            String::new()
        };
        rows.push((
            format!("durable accepts/s, inbox on {name}"),
            format!("{rate:.0}{note}"),
        ));
        rows.push((
            format!("accept latency p50 / p99, inbox on {name}"),
            format!("{p50:.2} ms / {p99:.2} ms"),
        ));
    }
    if let (Some(redis), Some((_, Some(pg), _))) = (
        env("OTM_TEST_REDIS_URL"),
        backends.iter().find(|b| b.0 == "PostgreSQL"),
    ) {
        let redis = format!("{}/{}", redis.trim_end_matches('/'), 9);
        let (cold, cache) = wakes(Some(pg.clone()), Some(redis)).await;
        rows.push(("cold wake p50 / max, PostgreSQL + Redis".into(), cold));
        rows.push((
            "awake (endpoint cache) wake p50, PostgreSQL + Redis".into(),
            cache,
        ));
        let (cold, cache) = wakes(None, None).await;
        rows.push(("cold wake p50 / max, SQLite + in-process".into(), cold));
        rows.push((
            "awake (endpoint cache) wake p50, SQLite + in-process".into(),
            cache,
        ));
    }
    println!();
    println!(
        "otm backends benchmark ({} cores)",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!();
    let w = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    println!("| {:w$} | value |", "measure");
    println!("|{}|-------|", "-".repeat(w + 2));
    for (k, v) in rows {
        println!("| {k:w$} | {v} |");
    }
}

struct Running {
    server: otm_server::Server,
    tg: FakeTelegram,
    _dir: tempfile::TempDir,
    http: reqwest::Client,
}

async fn server(registry: Option<String>, coordinator: Option<String>) -> Running {
    let tg = FakeTelegram::start().await;
    let dir = tempfile::Builder::new()
        .prefix("otm-bench")
        .tempdir_in("/tmp")
        .unwrap();
    // Instances run as uids of their own: they must be able to traverse to their directories.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o711),
    )
    .unwrap();
    let settings = Settings {
        listen: "127.0.0.1:0".into(),
        admin_listen: "127.0.0.1:0".into(),
        egress_listen: "127.0.0.1:0".into(),
        data_dir: dir.path().join("d"),
        telegram_api: tg.url(),
        public_url: Some("https://otm.bench.test".into()),
        otm_binary: Some(PathBuf::from(env!("CARGO_BIN_EXE_otm"))),
        registry,
        coordinator,
        ..Settings::default()
    };
    let server = otm_server::start(settings, None).await.unwrap();
    Running {
        server,
        tg,
        _dir: dir,
        http: reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(64)
            .build()
            .unwrap(),
    }
}

impl Running {
    async fn tenant(&self, id: &str, bot: &str) -> String {
        self.tg.add_bot(bot);
        let r = self
            .http
            .post(format!("http://{}/v1/tenants", self.server.admin_addr))
            .bearer_auth(self.server.admin_token().expose())
            .json(&serde_json::json!({"id": id, "bot_token": bot}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        self.tg.webhook(bot).unwrap().secret_token.unwrap()
    }
}

/// 2,048 updates from 32 senders to 4 tenants; deliveries run meanwhile, as in production, and
/// are abandoned at the end.
async fn accepts(registry: Option<String>, coordinator: Option<String>) -> (f64, f64, f64, usize) {
    let s = server(registry, coordinator).await;
    let mut tenants = Vec::new();
    for i in 0..4 {
        let id = format!("acc{i}");
        let secret = s.tenant(&id, &format!("{}:B{i}", 9600 + i)).await;
        tenants.push((id, secret));
    }
    let public = format!("http://{}", s.server.public_addr);
    let (per_sender, senders) = (64usize, 32usize);
    let started = Instant::now();
    let tasks: Vec<_> = (0..senders)
        .map(|k| {
            let (http, public, tenants) = (s.http.clone(), public.clone(), tenants.clone());
            tokio::spawn(async move {
                let (mut lat, mut refused) = (Vec::new(), 0usize);
                for j in 0..per_sender {
                    let n = k * per_sender + j;
                    let (id, secret) = &tenants[n % tenants.len()];
                    let t0 = Instant::now();
                    let r = http
                        .post(format!("{public}/tg/{id}"))
                        .header("x-telegram-bot-api-secret-token", secret)
                        .json(&text_update(n as i64 + 1, 1, "bench"))
                        .send()
                        .await
                        .unwrap();
                    if r.status() == 200 {
                        lat.push(t0.elapsed().as_secs_f64() * 1000.0);
                    } else {
                        // Not stored (the store failed): Telegram would send it again.
                        refused += 1;
                    }
                }
                (lat, refused)
            })
        })
        .collect();
    let (mut lat, mut refused) = (Vec::new(), 0);
    for t in tasks {
        let (l, r) = t.await.unwrap();
        lat.extend(l);
        refused += r;
    }
    let rate = lat.len() as f64 / started.elapsed().as_secs_f64();
    // Accepts are what is measured; deliveries still under way are abandoned with the server.
    s.server.shutdown(Duration::from_secs(10), true).await;
    (rate, pct(&mut lat, 0.5), pct(&mut lat, 0.99), refused)
}

/// Ten cold wakes and ten cache-hit wakes through the admin API.
async fn wakes(registry: Option<String>, coordinator: Option<String>) -> (String, String) {
    let s = server(registry, coordinator).await;
    s.tenant("waker", "9700:WAKE").await;
    let admin = format!("http://{}/v1/tenants/waker", s.server.admin_addr);
    let token = s.server.admin_token().expose().to_owned();
    let (mut cold, mut cache) = (Vec::new(), Vec::new());
    for _ in 0..10 {
        let v: Value = s
            .http
            .post(format!("{admin}/wake"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["path"], "cold", "{v}");
        cold.push(v["total_ms"].as_f64().unwrap());
        let t0 = Instant::now();
        let v: Value = s
            .http
            .post(format!("{admin}/wake"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["path"], "cache", "{v}");
        cache.push(t0.elapsed().as_secs_f64() * 1000.0);
        s.http
            .post(format!("{admin}/stop"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
    }
    s.server.shutdown(Duration::from_secs(10), true).await;
    let max = cold.iter().cloned().fold(0.0, f64::max);
    (
        format!("{:.1} ms / {:.1} ms", pct(&mut cold, 0.5), max),
        format!("{:.2} ms (HTTP round trip included)", pct(&mut cache, 0.5)),
    )
}
