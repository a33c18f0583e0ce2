//! Several processes over shared stores: two routers and two orchestrators from the built binary,
//! on Redis + PostgreSQL (and DynamoDB + S3 on moto), with the local runtime. Skipped with a
//! message when the external services' URLs are not set (`.ci/run` sets them).

mod common;

use otm_testkit::{FakeTelegram, text_update};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SERVICE_TOKEN: &str = "scale-out-service-token";
const ADMIN_TOKEN: &str = "scale-out-admin-token";

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

use common::free_port;

struct Proc {
    child: Child,
    public: u16,
    admin: u16,
    log: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Backends {
    registry: String,
    coordinator: String,
    state: String,
}

struct Cluster {
    state: String,
    tg: FakeTelegram,
    dir: tempfile::TempDir,
    http: reqwest::Client,
    orchestrators: Vec<Proc>,
    routers: Vec<Proc>,
}

fn spawn(role: &str, data: &Path, b: &Backends, tg: &FakeTelegram, extra: &[String]) -> Proc {
    let (public, admin, egress) = (free_port(), free_port(), free_port());
    let log = data.with_extension(format!("{role}-{admin}.log"));
    // Every replica shares one key file.
    let key_file = data.parent().unwrap().join("secret.key");
    if !key_file.exists() {
        std::fs::write(&key_file, otm_store::secrets::generate_key_file()).unwrap();
    }
    let child = Command::new(env!("CARGO_BIN_EXE_otm"))
        .args(["server", "--role", role])
        .args(["--listen", &format!("127.0.0.1:{public}")])
        .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
        .args(["--egress-listen", &format!("127.0.0.1:{egress}")])
        .args([
            "--telegram-api",
            &tg.url(),
            "--public-url",
            "https://scale.example.test",
        ])
        .args([
            "--registry",
            &b.registry,
            "--coordinator",
            &b.coordinator,
            "--state",
            &b.state,
        ])
        .args(["--lease-ttl-s", "3"])
        // Replies to one chat come back at once, not paced at Telegram's one a second.
        .args(["--bot-chat-interval-ms", "0"])
        .args(extra)
        .arg("--data-dir")
        .arg(data)
        .env("OTM_SERVICE_TOKEN", SERVICE_TOKEN)
        .env("OTM_SECRET_KEY_FILE", &key_file)
        .env("OTM_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    Proc {
        child,
        public,
        admin,
        log,
    }
}

async fn healthy(http: &reqwest::Client, p: &mut Proc) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while http
        .get(format!("http://127.0.0.1:{}/healthz", p.admin))
        .send()
        .await
        .is_err()
    {
        let exited = p.child.try_wait().unwrap();
        if exited.is_some() || Instant::now() > deadline {
            let log = std::fs::read_to_string(&p.log).unwrap_or_default();
            panic!("a server did not start ({exited:?}):\n{log}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

impl Cluster {
    async fn start(b: Backends) -> Cluster {
        let state = b.state.clone();
        let tg = FakeTelegram::start().await;
        let dir = common::tempdir();
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        // Orchestrators on one machine share the instances directory (the local runtime).
        let shared = dir.path().join("o");
        std::fs::create_dir_all(&shared).unwrap();
        let orchestrators: Vec<Proc> = (0..2)
            .map(|_| spawn("orchestrator", &shared, &b, &tg, &[]))
            .collect();
        let urls = orchestrators
            .iter()
            .map(|o| format!("http://127.0.0.1:{}", o.admin))
            .collect::<Vec<_>>()
            .join(",");
        let routers: Vec<Proc> = (0..2)
            .map(|i| {
                let d = dir.path().join(format!("r{i}"));
                spawn(
                    "router",
                    &d,
                    &b,
                    &tg,
                    &["--orchestrator-url".into(), urls.clone()],
                )
            })
            .collect();
        let (mut orchestrators, mut routers) = (orchestrators, routers);
        for p in orchestrators.iter_mut().chain(routers.iter_mut()) {
            healthy(&http, p).await;
        }
        Cluster {
            state,
            tg,
            dir,
            http,
            orchestrators,
            routers,
        }
    }

    /// Prints the end of every process's log, to explain a failure.
    fn dump_logs(&self) {
        for e in std::fs::read_dir(self.dir.path()).unwrap().flatten() {
            if e.path().extension().is_some_and(|x| x == "log") {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                eprintln!("==== {}", e.path().display());
                for l in tail.into_iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }

    fn instances_dir(&self) -> PathBuf {
        self.dir.path().join("o/instances")
    }

    /// The local runtime's own records of the instances.
    fn records_dir(&self) -> PathBuf {
        self.dir.path().join("o/runtime")
    }

    fn instance_count(&self) -> usize {
        std::fs::read_dir(self.instances_dir())
            .map(|d| d.count())
            .unwrap_or(0)
    }

    async fn create_tenant(&self, id: &str, token: &str) -> String {
        self.tg.add_bot(token);
        let r = self
            .http
            .post(format!(
                "http://127.0.0.1:{}/v1/tenants",
                self.orchestrators[0].admin
            ))
            .bearer_auth(ADMIN_TOKEN)
            .json(&serde_json::json!({"id": id, "bot_token": token}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
        self.tg.webhook(token).unwrap().secret_token.unwrap()
    }

    async fn post(
        &self,
        router: usize,
        tenant: &str,
        secret: &str,
        update: &serde_json::Value,
    ) -> u16 {
        let port = self.routers[router].public;
        self.http
            .post(format!("http://127.0.0.1:{port}/tg/{tenant}"))
            .header("x-telegram-bot-api-secret-token", secret)
            .json(update)
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    }

    async fn shutdown(mut self) {
        // Stop instances through an orchestrator that still runs, then the processes.
        let mut list = serde_json::Value::Null;
        for o in &self.orchestrators {
            let r = self
                .http
                .get(format!("http://127.0.0.1:{}/v1/tenants", o.admin))
                .bearer_auth(ADMIN_TOKEN)
                .send()
                .await;
            if let Ok(r) = r {
                list = r.json().await.unwrap_or_default();
                break;
            }
        }
        for t in list.as_array().into_iter().flatten() {
            for o in &self.orchestrators {
                let ok = self
                    .http
                    .post(format!(
                        "http://127.0.0.1:{}/v1/tenants/{}/stop",
                        o.admin,
                        t["id"].as_str().unwrap()
                    ))
                    .bearer_auth(ADMIN_TOKEN)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                if ok {
                    break;
                }
            }
        }
        self.routers.clear();
        self.orchestrators.clear();
        if let Some(dir) = self.state.strip_prefix("file://") {
            let _ = std::fs::remove_dir_all(dir);
        }
        self.kill_instances();
    }

    /// Kills every instance's process group (an instance of a killed orchestrator, or all of them
    /// when a test fails half-way).
    fn kill_instances(&self) {
        common::kill_instances(&self.dir.path().join("o"));
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.kill_instances();
    }
}

fn random_suffix() -> String {
    format!(
        "{:08x}",
        std::process::id() ^ (Instant::now().elapsed().as_nanos() as u32) ^ rand_u32()
    )
}

fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .unwrap();
    u32::from_le_bytes(b)
}

/// A fresh PostgreSQL database and Redis database number for one test.
fn pg_redis() -> Option<Backends> {
    let (Some(pg), Some(redis)) = (env("OTM_TEST_POSTGRES_URL"), env("OTM_TEST_REDIS_URL")) else {
        eprintln!("skipped: OTM_TEST_POSTGRES_URL and OTM_TEST_REDIS_URL are not both set");
        return None;
    };
    let db = format!("otm_scale_{}", random_suffix());
    let out = Command::new("psql")
        .arg(&pg)
        .args([
            "-v",
            "ON_ERROR_STOP=1",
            "-q",
            "-c",
            &format!("CREATE DATABASE {db}"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "creating a test database: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let base = pg.rsplit_once('/').map(|(b, _)| b.to_owned()).unwrap();
    let redis_db = 1 + rand_u32() % 15;
    Some(Backends {
        registry: format!("{base}/{db}"),
        coordinator: format!("{}/{redis_db}", redis.trim_end_matches('/')),
        state: "file:///tmp/otm-scale-state-".to_owned() + &db,
    })
}

fn dynamo_s3() -> Option<Backends> {
    let (Some(dynamo), Some(s3), Some(redis)) = (
        env("OTM_TEST_DYNAMODB_URL"),
        env("OTM_TEST_S3_URL"),
        env("OTM_TEST_REDIS_URL"),
    ) else {
        eprintln!(
            "skipped: OTM_TEST_DYNAMODB_URL, OTM_TEST_S3_URL and OTM_TEST_REDIS_URL are not all set"
        );
        return None;
    };
    let suffix = random_suffix();
    let with_prefix = |url: &str, prefix: &str| match url.split_once('?') {
        Some((base, q)) => format!("{}{prefix}?{q}", base.trim_end_matches('/')),
        None => format!("{}{prefix}", url.trim_end_matches('/')),
    };
    Some(Backends {
        registry: with_prefix(&dynamo, &format!("-scale{suffix}")),
        coordinator: format!("{}/{}", redis.trim_end_matches('/'), 1 + rand_u32() % 15),
        state: with_prefix(&s3, &format!("/scale{suffix}")),
    })
}

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
    let routers = vec![
        spawn(
            "router",
            &dir.path().join("r0"),
            &cut_off,
            &tg,
            &router_args,
        ),
        spawn("router", &dir.path().join("r1"), &b, &tg, &router_args),
    ];
    let mut c = Cluster {
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
    let (r0, r1) = (c.routers[0].admin, c.routers[1].admin);
    assert!(
        counter(&c.http, r0, acked).await >= 1.0,
        "the first router dispatches"
    );
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
