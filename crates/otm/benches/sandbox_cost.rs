//! What the sandbox costs a wake: cold and warm-pool wakes of the reference agent, by phase,
//! with instances in bubblewrap and, in the same run, unsandboxed (`--sandbox none`), and the
//! difference. Prints a table. Run with `cargo bench -p otm --bench sandbox_cost` (about a
//! minute; `-- --wakes N` for more or fewer wakes per path, default 30).

use otm_server::{Sandbox, Settings};
use otm_testkit::FakeTelegram;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn main() {
    let wakes = std::env::args()
        .skip_while(|a| a != "--wakes")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(30usize);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(wakes));
}

/// Per path (`cold`, `warm`), per phase and `total`, the milliseconds of every wake.
type Figures = BTreeMap<String, BTreeMap<String, Vec<f64>>>;

fn p50(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn p90(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v.get((v.len() * 9) / 10).copied().unwrap_or(f64::NAN)
}

async fn run(wakes: usize) {
    let mut by_mode = Vec::new();
    // Alternated twice, so that a noisy minute of a shared machine does not land on one mode.
    for mode in [
        Sandbox::None,
        Sandbox::Bubblewrap,
        Sandbox::None,
        Sandbox::Bubblewrap,
    ] {
        let figures = measure(mode, wakes / 2).await;
        by_mode.push((mode, figures));
    }
    let merged = |want: Sandbox| -> Figures {
        let mut out = Figures::new();
        for (mode, f) in &by_mode {
            if *mode != want {
                continue;
            }
            for (path, phases) in f {
                for (phase, v) in phases {
                    out.entry(path.clone())
                        .or_default()
                        .entry(phase.clone())
                        .or_default()
                        .extend(v);
                }
            }
        }
        out
    };
    let (none, bwrap) = (merged(Sandbox::None), merged(Sandbox::Bubblewrap));
    println!(
        "\n{} wakes per path and mode, reference agent, admin API's answers (ms)\n",
        wakes / 2 * 2
    );
    println!(
        "| wake, phase | unsandboxed p50 / p90 | bubblewrap p50 / p90 | the sandbox's cost, p50 |"
    );
    println!("|---|---|---|---|");
    for (path, phases) in &bwrap {
        let mut names: Vec<&String> = phases.keys().filter(|k| *k != "total").collect();
        names.push(phases.keys().find(|k| *k == "total").unwrap());
        for phase in names {
            let b = &phases[phase];
            let n = none
                .get(path)
                .and_then(|p| p.get(phase))
                .cloned()
                .unwrap_or_default();
            println!(
                "| {path} `{phase}` | {:.1} / {:.1} | {:.1} / {:.1} | {:+.1} |",
                p50(&n),
                p90(&n),
                p50(b),
                p90(b),
                p50(b) - p50(&n)
            );
        }
    }
}

async fn measure(mode: Sandbox, wakes: usize) -> Figures {
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
        sandbox: mode,
        ..Settings::default()
    };
    let server = otm_server::start(settings, None).await.unwrap();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let admin = format!("http://{}/v1", server.admin_addr);
    let token = server.admin_token().expose().to_owned();
    let call = |method: reqwest::Method, path: &str, body: Option<Value>| {
        let r = http
            .request(method, format!("{admin}{path}"))
            .bearer_auth(&token);
        let r = match body {
            Some(b) => r.json(&b),
            None => r,
        };
        async move {
            let resp = r.send().await.unwrap();
            let status = resp.status();
            let v: Value = resp.json().await.unwrap_or(Value::Null);
            assert!(status.is_success(), "{status}: {v}");
            v
        }
    };
    tg.add_bot("9300:COST");
    call(
        reqwest::Method::POST,
        "/tenants",
        Some(serde_json::json!({"id": "cost", "bot_token": "9300:COST"})),
    )
    .await;
    let mut figures = Figures::new();
    let mut record = |v: &Value| {
        let path = v["path"].as_str().unwrap().to_owned();
        let f = figures.entry(path).or_default();
        f.entry("total".into())
            .or_default()
            .push(v["total_ms"].as_f64().unwrap());
        for (k, ms) in v["phases_ms"].as_object().unwrap() {
            f.entry(k.clone()).or_default().push(ms.as_f64().unwrap());
        }
    };
    // One wake first that is not counted: the first start of anything is slower.
    for warm in [false, true] {
        let target = serde_json::json!({"warm_pool_target": u32::from(warm)});
        call(reqwest::Method::PUT, "/config", Some(target)).await;
        for i in 0..=wakes {
            call(reqwest::Method::POST, "/tenants/cost/stop", None).await;
            if warm {
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    let list = call(reqwest::Method::GET, "/instances", None).await;
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
            }
            let v = call(reqwest::Method::POST, "/tenants/cost/wake", None).await;
            assert_eq!(v["path"], if warm { "warm" } else { "cold" }, "{v}");
            if i > 0 {
                record(&v);
            }
        }
    }
    server.shutdown(Duration::from_secs(5), true).await;
    figures
}
