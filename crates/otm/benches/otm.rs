//! otm's benchmark: prints a table of durable accept throughput and latency, reply latency for an
//! awake tenant, and cold wake latency by phase. Run with `cargo bench -p otm`.

use otm_server::Settings;
use otm_testkit::{FakeTelegram, text_update};
use serde_json::Value;
use std::path::PathBuf;
use std::time::{Duration, Instant};

struct Stats(Vec<f64>);

impl Stats {
    fn pct(&self, p: f64) -> f64 {
        let mut v = self.0.clone();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        if v.is_empty() {
            return f64::NAN;
        }
        v[((v.len() as f64 - 1.0) * p).round() as usize]
    }
    fn mean(&self) -> f64 {
        self.0.iter().sum::<f64>() / self.0.len() as f64
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

async fn run() {
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
        ..Settings::default()
    };
    let server = otm_server::start(settings, None).await.unwrap();
    let http = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(64)
        .build()
        .unwrap();
    let admin = format!("http://{}/v1", server.admin_addr);
    let token = server.admin_token().expose().to_owned();
    let public = format!("http://{}", server.public_addr);

    let create = |id: &str, bot: &str| {
        tg.add_bot(bot);
        let http = http.clone();
        let admin = admin.clone();
        let token = token.clone();
        let body = serde_json::json!({"id": id, "bot_token": bot});
        async move {
            let r = http
                .post(format!("{admin}/tenants"))
                .bearer_auth(&token)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 201);
        }
    };
    let mut rows: Vec<(String, String)> = Vec::new();

    // 1. Durable accepts: 4 tenants, 32 concurrent senders, 4,000 updates.
    let tenants: Vec<(String, String)> = (0..4)
        .map(|i| (format!("acc{i}"), format!("{}:ACCEPT{i}", 9100 + i)))
        .collect();
    let mut secrets = Vec::new();
    for (id, bot) in &tenants {
        create(id, bot).await;
        secrets.push(tg.webhook(bot).unwrap().secret_token.unwrap());
    }
    let total = 4000usize;
    let senders = 32usize;
    let started = Instant::now();
    let tasks: Vec<_> = (0..senders)
        .map(|s| {
            let http = http.clone();
            let public = public.clone();
            let tenants = tenants.clone();
            let secrets = secrets.clone();
            tokio::spawn(async move {
                let mut lat = Vec::new();
                for k in 0..total / senders {
                    let n = s * (total / senders) + k;
                    let t = n % tenants.len();
                    let body =
                        // A chat per update: the Bot API proxy paces one chat at one reply a
                        // second, as Telegram does, and this measures otm, not that pace.
                        serde_json::to_vec(&text_update(n as i64 + 1, 10 + n as i64, "bench"))
                            .unwrap();
                    let t0 = Instant::now();
                    let r = http
                        .post(format!("{public}/tg/{}", tenants[t].0))
                        .header("x-telegram-bot-api-secret-token", &secrets[t])
                        .header("content-type", "application/json")
                        .body(body)
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 200);
                    lat.push(t0.elapsed().as_secs_f64() * 1000.0);
                }
                lat
            })
        })
        .collect();
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let secs = started.elapsed().as_secs_f64();
    let accept = Stats(lat);
    rows.push((
        "durable accepts/s (SQLite, 32 senders, 4 tenants, deliveries running)".into(),
        format!("{:.0}", total as f64 / secs),
    ));
    rows.push((
        "accept latency p50 / p99".into(),
        format!("{:.2} ms / {:.2} ms", accept.pct(0.5), accept.pct(0.99)),
    ));
    // Let the deliveries finish before measuring latency.
    for (_, bot) in &tenants {
        tg.wait_for_messages(bot, total / tenants.len(), Duration::from_secs(600))
            .await;
    }

    // 2. Reply latency for an awake tenant: one update at a time, POST to reply at Telegram.
    create("awake", "9200:AWAKE").await;
    let secret = tg.webhook("9200:AWAKE").unwrap().secret_token.unwrap();
    let post = |n: i64| {
        let http = http.clone();
        let public = public.clone();
        let secret = secret.clone();
        async move {
            http.post(format!("{public}/tg/awake"))
                .header("x-telegram-bot-api-secret-token", &secret)
                .json(&text_update(n, n, "ping")) // a chat each: see above
                .send()
                .await
                .unwrap()
        }
    };
    post(1).await;
    tg.wait_for_messages("9200:AWAKE", 1, Duration::from_secs(60))
        .await;
    let mut replies = Vec::new();
    for n in 2..=101 {
        let t0 = Instant::now();
        post(n).await;
        tg.wait_for_messages("9200:AWAKE", n as usize, Duration::from_secs(60))
            .await;
        replies.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    let replies = Stats(replies);
    rows.push((
        "reply latency, awake tenant p50 / p99".into(),
        format!("{:.2} ms / {:.2} ms", replies.pct(0.5), replies.pct(0.99)),
    ));

    // 3. Cold wakes by phase, through the admin API, and cold first reply.
    let mut phases: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
    let mut totals = Vec::new();
    for _ in 0..10 {
        let r = http
            .post(format!("{admin}/tenants/awake/stop"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = http
            .post(format!("{admin}/tenants/awake/wake"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["path"], "cold", "{v}");
        totals.push(v["total_ms"].as_f64().unwrap());
        for (k, ms) in v["phases_ms"].as_object().unwrap() {
            phases
                .entry(k.clone())
                .or_default()
                .push(ms.as_f64().unwrap());
        }
    }
    for (k, v) in &phases {
        let s = Stats(v.clone());
        rows.push((
            format!("cold wake phase `{k}` mean / p50"),
            format!("{:.1} ms / {:.1} ms", s.mean(), s.pct(0.5)),
        ));
    }
    // Warm-pool wakes, by phase.
    http.put(format!("{admin}/config"))
        .bearer_auth(&token)
        .json(&serde_json::json!({"warm_pool_target": 1}))
        .send()
        .await
        .unwrap();
    let mut warm_phases: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
    let mut warm_totals = Vec::new();
    for _ in 0..10 {
        http.post(format!("{admin}/tenants/awake/stop"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let list: Value = http
                .get(format!("{admin}/instances"))
                .bearer_auth(&token)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if list
                .as_array()
                .unwrap()
                .iter()
                .any(|i| i["state"] == "warm")
            {
                break;
            }
            assert!(Instant::now() < deadline, "no warm instance");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let v: Value = http
            .post(format!("{admin}/tenants/awake/wake"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["path"], "warm", "{v}");
        warm_totals.push(v["total_ms"].as_f64().unwrap());
        for (k, ms) in v["phases_ms"].as_object().unwrap() {
            warm_phases
                .entry(k.clone())
                .or_default()
                .push(ms.as_f64().unwrap());
        }
    }
    http.put(format!("{admin}/config"))
        .bearer_auth(&token)
        .json(&serde_json::json!({"warm_pool_target": 0}))
        .send()
        .await
        .unwrap();
    for (k, v) in &warm_phases {
        let s = Stats(v.clone());
        rows.push((
            format!("warm wake phase `{k}` mean / p50"),
            format!("{:.1} ms / {:.1} ms", s.mean(), s.pct(0.5)),
        ));
    }
    let w = Stats(warm_totals);
    rows.push((
        "warm wake total mean / p50 / max".into(),
        format!(
            "{:.1} ms / {:.1} ms / {:.1} ms",
            w.mean(),
            w.pct(0.5),
            w.pct(1.0)
        ),
    ));
    // Frozen wakes (thaws), by phase, and the first reply to a frozen tenant.
    http.patch(format!("{admin}/tenants/awake"))
        .bearer_auth(&token)
        .json(&serde_json::json!({"freeze_after_s": 1}))
        .send()
        .await
        .unwrap();
    let frozen = || async {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let t: Value = http
                .get(format!("{admin}/tenants/awake"))
                .bearer_auth(&token)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if t["status"] == "frozen" {
                return;
            }
            assert!(Instant::now() < deadline, "the tenant did not freeze: {t}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let mut frozen_phases: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
    let mut frozen_totals = Vec::new();
    for _ in 0..10 {
        http.post(format!("{admin}/tenants/awake/wake"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        frozen().await;
        let v: Value = http
            .post(format!("{admin}/tenants/awake/wake"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["path"], "frozen", "{v}");
        frozen_totals.push(v["total_ms"].as_f64().unwrap());
        for (k, ms) in v["phases_ms"].as_object().unwrap() {
            frozen_phases
                .entry(k.clone())
                .or_default()
                .push(ms.as_f64().unwrap());
        }
    }
    for (k, v) in &frozen_phases {
        let s = Stats(v.clone());
        rows.push((
            format!("frozen wake (thaw) phase `{k}` mean / p50"),
            format!("{:.1} ms / {:.1} ms", s.mean(), s.pct(0.5)),
        ));
    }
    let f = Stats(frozen_totals);
    rows.push((
        "frozen wake (thaw) total mean / p50 / max".into(),
        format!(
            "{:.1} ms / {:.1} ms / {:.1} ms",
            f.mean(),
            f.pct(0.5),
            f.pct(1.0)
        ),
    ));
    let mut frozen_first = Vec::new();
    let mut n_frozen = 2000;
    for _ in 0..5 {
        frozen().await;
        let have = tg.sent_messages("9200:AWAKE").len();
        n_frozen += 1;
        let t0 = Instant::now();
        post(n_frozen).await;
        tg.wait_for_messages("9200:AWAKE", have + 1, Duration::from_secs(60))
            .await;
        frozen_first.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    let ff = Stats(frozen_first);
    rows.push((
        "first reply from a frozen tenant mean / p50".into(),
        format!("{:.1} ms / {:.1} ms", ff.mean(), ff.pct(0.5)),
    ));
    http.patch(format!("{admin}/tenants/awake"))
        .bearer_auth(&token)
        .json(&serde_json::json!({"freeze_after_s": 0}))
        .send()
        .await
        .unwrap();
    let t = Stats(totals);
    rows.push((
        "cold wake total mean / p50 / max".into(),
        format!(
            "{:.1} ms / {:.1} ms / {:.1} ms",
            t.mean(),
            t.pct(0.5),
            t.pct(1.0)
        ),
    ));
    let mut first = Vec::new();
    let mut n = 1000;
    for _ in 0..5 {
        http.post(format!("{admin}/tenants/awake/stop"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        let have = tg.sent_messages("9200:AWAKE").len();
        n += 1;
        let t0 = Instant::now();
        post(n).await;
        tg.wait_for_messages("9200:AWAKE", have + 1, Duration::from_secs(60))
            .await;
        first.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    let f = Stats(first);
    rows.push((
        "cold first reply (webhook to reply) mean / p50".into(),
        format!("{:.1} ms / {:.1} ms", f.mean(), f.pct(0.5)),
    ));

    // Snapshot and restore of a 2 MB and a 50 MB state directory (half text, half random bytes),
    // through the archive code and the local state store the server uses.
    for mb in [2usize, 50] {
        let src = dir.path().join(format!("state-{mb}"));
        std::fs::create_dir_all(src.join("db")).unwrap();
        let mut seed = 0x9e3779b97f4a7c15u64;
        let mut noise = vec![0u8; mb << 19];
        for b in noise.iter_mut() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            *b = seed as u8;
        }
        std::fs::write(src.join("db/blob.bin"), &noise).unwrap();
        let text: String = (0..)
            .map(|i| format!("line {i} of the conversation history\n"))
            .take((mb << 19) / 36)
            .collect();
        std::fs::write(src.join("history.txt"), text).unwrap();
        let store =
            otm_store::objstore::ObjectStateStore::local(&dir.path().join("bench-state")).unwrap();
        let tenant = otm_core::TenantId::parse("bench").unwrap();
        let caps = otm_shim::archive::Caps::default();
        let spool = dir.path().join(format!("spool-{mb}.tar.zst"));
        // As the server does it: packed into a file as a stream, test-decoded, streamed into
        // the store; fetched into a file with its checksum checked, test-decoded, unpacked.
        let t0 = Instant::now();
        {
            let mut out = std::io::BufWriter::new(std::fs::File::create(&spool).unwrap());
            otm_shim::archive::pack(&src, &[], &caps, &mut out).unwrap();
            std::io::Write::flush(&mut out).unwrap();
        }
        let reader = || std::io::BufReader::new(std::fs::File::open(&spool).unwrap());
        otm_shim::archive::verify(reader(), &caps).unwrap();
        let id = otm_core::SnapshotId::new_now();
        let meta = otm_core::StateStore::put(&store, &tenant, &id, &spool, "bench")
            .await
            .unwrap();
        otm_core::StateStore::publish(&store, &tenant, &id)
            .await
            .unwrap();
        let snap = t0.elapsed();
        std::fs::remove_file(&spool).unwrap();
        let t1 = Instant::now();
        otm_core::StateStore::get(&store, &tenant, &id, &spool)
            .await
            .unwrap();
        otm_shim::archive::verify(reader(), &caps).unwrap();
        let dst = dir.path().join(format!("restored-{mb}"));
        otm_shim::archive::unpack(reader(), &dst, &caps).unwrap();
        let restore = t1.elapsed();
        rows.push((
            format!(
                "snapshot / restore of a {mb} MB state ({} archive)",
                human(meta.size)
            ),
            format!(
                "{:.0} ms / {:.0} ms",
                snap.as_secs_f64() * 1000.0,
                restore.as_secs_f64() * 1000.0
            ),
        ));
    }

    // One idle sweep over 100,000 registered tenants (SQLite, indexed by status and deadline).
    {
        use otm_core::TenantStore;
        let reg = std::sync::Arc::new(
            otm_store::sqlite::SqliteRegistry::open(&dir.path().join("sweep.db")).unwrap(),
        );
        let n = 100_000;
        let t0 = Instant::now();
        for chunk in (0..n).collect::<Vec<_>>().chunks(2000) {
            let futs = chunk.iter().map(|i| {
                let reg = reg.clone();
                async move {
                    let id = otm_core::TenantId::parse(&format!("t{i}")).unwrap();
                    let t = otm_core::Tenant::new(id.clone(), "reference", None);
                    reg.create_tenant(&t).await.unwrap();
                    if i % 100 == 0 {
                        reg.set_tenant_status(&id, otm_core::TenantStatus::Running, None)
                            .await
                            .unwrap();
                    }
                }
            });
            futures::future::join_all(futs).await;
        }
        let fill = t0.elapsed();
        let now = otm_core::time::now_ms() + 3_600_000;
        let mut sweeps = Vec::new();
        for _ in 0..20 {
            let t = Instant::now();
            let due = reg.idle_due(now, 256).await.unwrap();
            sweeps.push(t.elapsed().as_secs_f64() * 1000.0);
            assert_eq!(due.len(), 256);
        }
        let s = Stats(sweeps);
        rows.push((
            "idle sweep over 100,000 tenants (1,000 running) p50 / max".into(),
            format!("{:.2} ms / {:.2} ms", s.pct(0.5), s.pct(1.0)),
        ));
        rows.push((
            "registering 100,000 tenants (group commit)".into(),
            format!("{:.1} s", fill.as_secs_f64()),
        ));
    }

    let status: Value = http
        .get(format!("{admin}/status"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    println!();
    println!(
        "otm benchmark ({} cores, isolation {})",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        status["isolation"]
    );
    println!();
    let w = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    println!("| {:w$} | value |", "measure");
    println!("|{}|-------|", "-".repeat(w + 2));
    for (k, v) in rows {
        println!("| {k:w$} | {v} |");
    }
    server.shutdown(Duration::from_secs(10), true).await;
}

fn human(n: u64) -> String {
    if n >= 1 << 20 {
        format!("{:.1} MiB", n as f64 / 1048576.0)
    } else {
        format!("{:.0} KiB", n as f64 / 1024.0)
    }
}
