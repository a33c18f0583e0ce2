//! Several `otm server` processes from the built binary over shared stores (PostgreSQL and
//! Redis, or DynamoDB and S3 on moto), with the stand-in Telegram: the scale-out and the `kube`
//! runtime's tests share them.

use super::free_port;
use otm_testkit::FakeTelegram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const SERVICE_TOKEN: &str = "scale-out-service-token";
pub const ADMIN_TOKEN: &str = "scale-out-admin-token";

pub fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

pub struct Proc {
    pub child: Child,
    pub public: u16,
    pub admin: u16,
    pub egress: u16,
    pub log: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Clone, Debug)]
pub struct Backends {
    pub registry: String,
    pub coordinator: String,
    pub state: String,
}

/// What the orchestrators of a [`Cluster`] are started with beyond the shared settings.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// More `otm server` arguments for every orchestrator.
    pub orchestrator_args: Vec<String>,
    /// More variables for every orchestrator.
    pub orchestrator_env: Vec<(String, String)>,
}

pub struct Cluster {
    pub backends: Backends,
    pub options: Options,
    pub state: String,
    pub tg: FakeTelegram,
    pub dir: tempfile::TempDir,
    pub http: reqwest::Client,
    pub orchestrators: Vec<Proc>,
    pub routers: Vec<Proc>,
}

pub fn spawn(role: &str, data: &Path, b: &Backends, tg: &FakeTelegram, extra: &[String]) -> Proc {
    spawn_with(role, data, b, tg, extra, &[])
}

pub fn spawn_with(
    role: &str,
    data: &Path,
    b: &Backends,
    tg: &FakeTelegram,
    extra: &[String],
    envs: &[(String, String)],
) -> Proc {
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
        .envs(envs.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    Proc {
        child,
        public,
        admin,
        egress,
        log,
    }
}

pub async fn healthy(http: &reqwest::Client, p: &mut Proc) {
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
    pub async fn start(b: Backends) -> Cluster {
        Cluster::start_with(b, Options::default()).await
    }

    pub async fn start_with(b: Backends, options: Options) -> Cluster {
        let state = b.state.clone();
        let tg = FakeTelegram::start().await;
        let dir = super::tempdir();
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        // Orchestrators on one machine share the instances directory (the local runtime).
        let shared = dir.path().join("o");
        std::fs::create_dir_all(&shared).unwrap();
        let orchestrators: Vec<Proc> = (0..2)
            .map(|_| {
                spawn_with(
                    "orchestrator",
                    &shared,
                    &b,
                    &tg,
                    &options.orchestrator_args,
                    &options.orchestrator_env,
                )
            })
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
            backends: b,
            options,
            state,
            tg,
            dir,
            http,
            orchestrators,
            routers,
        }
    }

    /// Prints the end of every process's log, to explain a failure.
    pub fn dump_logs(&self) {
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

    pub fn instances_dir(&self) -> PathBuf {
        self.dir.path().join("o/instances")
    }

    /// The local runtime's own records of the instances.
    pub fn records_dir(&self) -> PathBuf {
        self.dir.path().join("o/runtime")
    }

    pub fn instance_count(&self) -> usize {
        std::fs::read_dir(self.instances_dir())
            .map(|d| d.count())
            .unwrap_or(0)
    }

    pub async fn create_tenant(&self, id: &str, token: &str) -> String {
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

    pub async fn post(
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

    pub async fn shutdown(mut self) {
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
    pub fn kill_instances(&self) {
        super::kill_instances(&self.dir.path().join("o"));
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.kill_instances();
    }
}

pub fn random_suffix() -> String {
    format!(
        "{:08x}",
        std::process::id() ^ (Instant::now().elapsed().as_nanos() as u32) ^ rand_u32()
    )
}

pub fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .unwrap();
    u32::from_le_bytes(b)
}

/// A fresh PostgreSQL database and Redis database number for one test.
pub fn pg_redis() -> Option<Backends> {
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

pub fn dynamo_s3() -> Option<Backends> {
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
