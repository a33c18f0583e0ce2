//! Several processes over shared stores: two routers and two orchestrators from the built binary,
//! on Redis + PostgreSQL (and DynamoDB + S3 on moto), with the local runtime. Skipped with a
//! message when the external services' URLs are not set (`.ci/run` sets them).

mod common;

use common::cluster::*;

use otm_testkit::{FakeTelegram, text_update};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Ten chats, twenty updates each, sent concurrently over both routers.
async fn two_hundred_updates(c: &Cluster, backends_name: &str) {
    let token = "9501:SCALE";
    let secret = c.create_tenant("scaled", token).await;
    let watcher = {
        let dir = c.instances_dir();
        let stop = tokio_util::sync::CancellationToken::new();
        let s = stop.clone();
        let h = tokio::spawn(async move {
            let mut max = 0;
            while !s.is_cancelled() {
                max = max.max(std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0));
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            max
        });
        (stop, h)
    };
    let senders = (0..10i64).map(|chat| {
        let secret = secret.clone();
        async move {
            for i in 1..=20i64 {
                let update = text_update(chat * 1000 + i, 100 + chat, &format!("c{chat} m{i}"));
                let router = ((chat + i) % 2) as usize;
                let status = c.post(router, "scaled", &secret, &update).await;
                if status != 200 {
                    c.dump_logs();
                }
                assert_eq!(status, 200, "{backends_name}: update {i} of chat {chat}");
            }
        }
    });
    futures::future::join_all(senders).await;
    let got =
        c.tg.wait_for_messages(token, 200, Duration::from_secs(120))
            .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    watcher.0.cancel();
    let max = watcher.1.await.unwrap();
    if got.len() != 200 {
        c.dump_logs();
    }
    assert_eq!(got.len(), 200, "{backends_name}: every update answered");
    let all = c.tg.sent_messages(token);
    assert_eq!(all.len(), 200, "{backends_name}: nothing answered twice");
    for chat in 0..10i64 {
        let texts: Vec<&str> = all
            .iter()
            .filter(|m| m.chat_id == 100 + chat)
            .map(|m| m.text.as_str())
            .collect();
        let want: Vec<String> = (1..=20).map(|i| format!("#{i}: c{chat} m{i}")).collect();
        assert_eq!(texts, want, "{backends_name}: chat {chat} in order");
    }
    assert_eq!(max, 1, "{backends_name}: exactly one instance at any time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_routers_two_orchestrators_on_postgres_and_redis() {
    let Some(b) = pg_redis() else { return };
    let c = Cluster::start(b).await;
    two_hundred_updates(&c, "postgres+redis").await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_routers_two_orchestrators_on_dynamodb_and_s3() {
    let Some(b) = dynamo_s3() else { return };
    // DynamoDB needs its tables first.
    let out = Command::new(env!("CARGO_BIN_EXE_otm"))
        .args(["migrate", "--registry", &b.registry])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "otm migrate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The bucket, on the S3 stand-in (moto accepts an unsigned create).
    let (bucket, query) = b.state.trim_start_matches("s3://").split_once('?').unwrap();
    let bucket = bucket.split('/').next().unwrap();
    let endpoint = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("endpoint="))
        .expect("an endpoint in OTM_TEST_S3_URL");
    let _ = reqwest::Client::new()
        .put(format!("{endpoint}/{bucket}"))
        .send()
        .await;
    let c = Cluster::start(b).await;
    two_hundred_updates(&c, "dynamodb+s3").await;
    c.shutdown().await;
}

/// The orchestrator that runs the wake is killed while it runs; the other one completes it once
/// the wake lock's lease has lapsed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_orchestrator_killed_mid_wake_is_taken_over() {
    let Some(b) = pg_redis() else { return };
    let mut c = Cluster::start(b).await;
    let token = "9502:MIDWAKE";
    let secret = c.create_tenant("midwake", token).await;
    assert_eq!(
        c.post(0, "midwake", &secret, &text_update(1, 5, "first"))
            .await,
        200
    );
    // The moment an instance directory appears, its creator is in the middle of the wake.
    let deadline = Instant::now() + Duration::from_secs(30);
    let creator = loop {
        if let Some(pid) = first_instance_shim_pid(&c.records_dir()) {
            // The instance's first process is the sandbox's, below bubblewrap, below its creator.
            let parent = parent_of(pid);
            let grandparent = parent.and_then(parent_of);
            if let Some(i) = c
                .orchestrators
                .iter()
                .position(|o| Some(o.child.id()) == parent || Some(o.child.id()) == grandparent)
            {
                break i;
            }
        }
        assert!(Instant::now() < deadline, "no wake started");
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    c.orchestrators[creator].child.kill().unwrap();
    c.orchestrators[creator].child.wait().unwrap();
    for i in 2..=5 {
        assert_eq!(
            c.post(1, "midwake", &secret, &text_update(i, 5, &format!("m{i}")))
                .await,
            200
        );
    }
    let got =
        c.tg.wait_for_messages(token, 5, Duration::from_secs(90))
            .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let texts: Vec<String> =
        c.tg.sent_messages(token)
            .into_iter()
            .map(|m| m.text)
            .collect();
    assert_eq!(got.len(), 5, "{texts:?}");
    assert_eq!(
        texts,
        vec!["#1: first", "#2: m2", "#3: m3", "#4: m4", "#5: m5"]
    );
    let live = c.instance_count();
    assert!(
        live <= 2,
        "at most the killed orchestrator's leftover and the live instance: {live}"
    );
    c.orchestrators.remove(creator);
    c.shutdown().await;
}

/// A router killed while it dispatches: the other takes the tenant's dispatcher lease over.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_router_killed_while_dispatching_is_taken_over() {
    let Some(b) = pg_redis() else { return };
    let mut c = Cluster::start(b).await;
    let token = "9503:ROUTER";
    let secret = c.create_tenant("routed", token).await;
    c.tg.set_send_delay(Duration::from_millis(150));
    for i in 1..=12 {
        assert_eq!(
            c.post(0, "routed", &secret, &text_update(i, 6, &format!("m{i}")))
                .await,
            200
        );
    }
    c.tg.wait_for_messages(token, 3, Duration::from_secs(60))
        .await;
    // Kill both in turn would stop everything; kill the one that received the updates.
    c.routers[0].child.kill().unwrap();
    c.routers[0].child.wait().unwrap();
    let got =
        c.tg.wait_for_messages(token, 12, Duration::from_secs(90))
            .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let texts: Vec<String> =
        c.tg.sent_messages(token)
            .into_iter()
            .map(|m| m.text)
            .collect();
    assert_eq!(got.len(), 12, "{texts:?}");
    let want: Vec<String> = (1..=12).map(|i| format!("#{i}: m{i}")).collect();
    assert_eq!(texts, want, "every update answered once, in order");
    c.routers.remove(0);
    c.shutdown().await;
}

/// A lock holder whose lease lapsed cannot write with its old fencing number once another
/// holder has written with a newer one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_lock_holder_cannot_overwrite_the_registry() {
    let Some(b) = pg_redis() else { return };
    let registry = otm_store::open::open_registry(&b.registry).await.unwrap();
    let coordinator = otm_store::open::open_coordinator(&b.coordinator)
        .await
        .unwrap();
    let id = otm_core::TenantId::parse("fenced").unwrap();
    registry
        .create_tenant(&otm_core::Tenant::new(id.clone(), "reference", None))
        .await
        .unwrap();
    let key = format!("wake:fenced-{}", random_suffix());
    let old = coordinator
        .acquire(&key, Duration::from_millis(300))
        .await
        .unwrap()
        .expect("first holder");
    tokio::time::sleep(Duration::from_millis(500)).await; // lapses
    let new = coordinator
        .acquire(&key, Duration::from_secs(5))
        .await
        .unwrap()
        .expect("second holder");
    assert!(new.fence > old.fence);
    registry
        .set_tenant_status(&id, otm_core::TenantStatus::Running, Some(new.fence))
        .await
        .unwrap();
    let stale = registry
        .set_tenant_status(&id, otm_core::TenantStatus::Idle, Some(old.fence))
        .await;
    assert!(
        matches!(stale, Err(otm_core::Error::Conflict { .. })),
        "{stale:?}"
    );
    assert!(
        !coordinator
            .renew(&old, Duration::from_secs(1))
            .await
            .unwrap(),
        "the stale holder cannot renew"
    );
    assert_eq!(
        registry.get_tenant(&id).await.unwrap().unwrap().status,
        otm_core::TenantStatus::Running
    );
}

fn first_instance_shim_pid(dir: &Path) -> Option<u32> {
    std::fs::read_dir(dir).ok()?.flatten().find_map(|d| {
        let raw = std::fs::read(d.path().join("record.json")).ok()?;
        serde_json::from_slice::<serde_json::Value>(&raw).ok()?["pid"]
            .as_u64()
            .map(|p| p as u32)
    })
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// A TCP relay in front of Redis that the test can cut: its live connections are dropped and
/// new ones closed at once, as when a network partition separates one replica from Redis.
struct Relay {
    port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Relay {
    async fn start(upstream: std::net::SocketAddr) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (c, list) = (cut.clone(), conns.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if c.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: closed at once
                }
                let task = tokio::spawn(async move {
                    if let Ok(mut out) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
                list.lock().unwrap().push(task);
            }
        });
        Relay { port, cut, conns }
    }

    fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for task in self.conns.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

/// A counter from a process's `/metrics`, 0 when absent.
async fn counter(http: &reqwest::Client, admin: u16, series: &str) -> f64 {
    let text = http
        .get(format!("http://127.0.0.1:{admin}/metrics"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A router cut off from Redis while it dispatches gives its lease up before the lease can lapse
/// to another router, stops delivering, and acknowledges nothing more; the other router takes
/// the inbox over and every update is answered once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_router_cut_off_from_redis_stops_dispatching_within_the_ttl() {
    let Some(b) = pg_redis() else { return };
    let redis: reqwest::Url = b.coordinator.parse().unwrap();
    let upstream = format!(
        "{}:{}",
        redis.host_str().unwrap(),
        redis.port().unwrap_or(6379)
    );
    let upstream = tokio::net::lookup_host(upstream)
        .await
        .unwrap()
        .next()
        .unwrap();
    let relay = Relay::start(upstream).await;
    let mut relayed = redis.clone();
    relayed.set_host(Some("127.0.0.1")).unwrap();
    relayed.set_port(Some(relay.port)).unwrap();

    let tg = FakeTelegram::start().await;
    let dir = common::tempdir();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let shared = dir.path().join("o");
    std::fs::create_dir_all(&shared).unwrap();
    let orchestrator = spawn("orchestrator", &shared, &b, &tg, &[]);
    let orchestrator_url = format!("http://127.0.0.1:{}", orchestrator.admin);
    let cut_off = Backends {
        registry: b.registry.clone(),
        coordinator: relayed.to_string(),
        state: b.state.clone(),
    };
    let router_args = ["--orchestrator-url".to_owned(), orchestrator_url];
    // The second router starts once the first one dispatches: otherwise either could win the
    // dispatcher lease, and only the first goes through the relay that is cut.
    let routers = vec![spawn(
        "router",
        &dir.path().join("r0"),
        &cut_off,
        &tg,
        &router_args,
    )];
    let mut c = Cluster {
        backends: b.clone(),
        options: Options::default(),
        state: b.state.clone(),
        tg,
        dir,
        http,
        orchestrators: vec![orchestrator],
        routers,
    };
    for p in c.orchestrators.iter_mut().chain(c.routers.iter_mut()) {
        healthy(&c.http, p).await;
    }

    let token = "9504:CUTOFF";
    let secret = c.create_tenant("cutoff", token).await;
    c.tg.set_send_delay(Duration::from_millis(400));
    for i in 1..=10 {
        assert_eq!(
            c.post(0, "cutoff", &secret, &text_update(i, 7, &format!("m{i}")))
                .await,
            200
        );
    }
    c.tg.wait_for_messages(token, 2, Duration::from_secs(60))
        .await;
    let acked = "otm_deliveries_total{outcome=\"acked\"}";
    let r0 = c.routers[0].admin;
    // The replies are out; their acknowledgements follow a moment later.
    let deadline = Instant::now() + Duration::from_secs(15);
    while counter(&c.http, r0, acked).await < 1.0 {
        if Instant::now() > deadline {
            c.dump_logs();
            panic!("the first router dispatches");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let orchestrator_url = format!("http://127.0.0.1:{}", c.orchestrators[0].admin);
    let mut second = spawn(
        "router",
        &c.dir.path().join("r1"),
        &b,
        &c.tg,
        &["--orchestrator-url".to_owned(), orchestrator_url],
    );
    healthy(&c.http, &mut second).await;
    let r1 = second.admin;
    c.routers.push(second);
    relay.cut();
    // The lease's TTL is 3 s: by then the cut-off router has given it up.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let acked_at_ttl = counter(&c.http, r0, acked).await;

    let got =
        c.tg.wait_for_messages(token, 10, Duration::from_secs(90))
            .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let texts: Vec<String> =
        c.tg.sent_messages(token)
            .into_iter()
            .map(|m| m.text)
            .collect();
    if got.len() < 10 {
        c.dump_logs();
    }
    assert_eq!(got.len(), 10, "{texts:?}");
    let want: Vec<String> = (1..=10).map(|i| format!("#{i}: m{i}")).collect();
    assert_eq!(texts, want, "every update answered once, in order");
    assert_eq!(
        counter(&c.http, r0, acked).await,
        acked_at_ttl,
        "the cut-off router acknowledged nothing after its lease's TTL"
    );
    assert!(
        counter(&c.http, r1, acked).await >= 1.0,
        "the other router took the inbox over"
    );
    let log = std::fs::read_to_string(&c.routers[0].log).unwrap();
    assert!(
        log.contains("giving the lease up"),
        "the cut-off router says it gave its lease up:\n{log}"
    );
    c.shutdown().await;
}
