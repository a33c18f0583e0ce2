//! A server in-process on port 0 with a stand-in Telegram, the reference agent and a temporary
//! data directory.
#![allow(dead_code)]

pub mod cluster;
pub mod images;

use otm_server::{Server, Settings};
use otm_testkit::FakeTelegram;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub const PUBLIC_URL: &str = "https://otm.example.test";

pub struct Harness {
    pub server: Option<Server>,
    pub tg: FakeTelegram,
    pub dir: tempfile::TempDir,
    pub http: reqwest::Client,
    pub token: String,
}

pub fn settings(data_dir: PathBuf, tg: &FakeTelegram) -> Settings {
    Settings {
        listen: "127.0.0.1:0".into(),
        admin_listen: "127.0.0.1:0".into(),
        egress_listen: "127.0.0.1:0".into(),
        data_dir,
        telegram_api: tg.url(),
        public_url: Some(PUBLIC_URL.into()),
        otm_binary: Some(PathBuf::from(env!("CARGO_BIN_EXE_otm"))),
        ..Settings::default()
    }
}

impl Harness {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(f: impl FnOnce(&mut Settings)) -> Self {
        Self::start_with_registry(f, |r| r).await
    }

    /// A server whose registry backend is passed through `wrap` first.
    pub async fn start_with_registry(
        f: impl FnOnce(&mut Settings),
        wrap: impl FnOnce(Arc<dyn otm_core::Registry>) -> Arc<dyn otm_core::Registry>,
    ) -> Self {
        let tg = FakeTelegram::start().await;
        let dir = tempdir();
        let mut s = settings(dir.path().join("d"), &tg);
        f(&mut s);
        let server = otm_server::start_with_registry(s, None, wrap)
            .await
            .expect("server starts");
        let token = server.admin_token().expose().to_owned();
        Harness {
            server: Some(server),
            tg,
            dir,
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
            token,
        }
    }

    pub fn server(&self) -> &Server {
        self.server.as_ref().unwrap()
    }

    pub fn admin(&self, path: &str) -> String {
        format!("http://{}/v1{path}", self.server().admin_addr)
    }

    pub fn public(&self, path: &str) -> String {
        format!("http://{}{path}", self.server().public_addr)
    }

    pub async fn api(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self
            .http
            .request(method, self.admin(path))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Creates a tenant with a bot token; returns the webhook secret Telegram was given.
    pub async fn tenant(&self, id: &str, bot_token: &str) -> String {
        self.tg.add_bot(bot_token);
        let (status, body) = self
            .api(
                reqwest::Method::POST,
                "/tenants",
                Some(json!({"id": id, "bot_token": bot_token})),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        let hook = self.tg.webhook(bot_token).expect("webhook registered");
        assert_eq!(hook.url, format!("{PUBLIC_URL}/tg/{id}"));
        hook.secret_token.expect("secret given to Telegram")
    }

    /// Posts an update the way Telegram does; returns the status.
    pub async fn post_update(&self, tenant: &str, secret: &str, update: &Value) -> u16 {
        self.http
            .post(self.public(&format!("/tg/{tenant}")))
            .header("x-telegram-bot-api-secret-token", secret)
            .json(update)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    pub async fn instances(&self) -> Vec<Value> {
        let (status, v) = self.api(reqwest::Method::GET, "/instances", None).await;
        assert_eq!(status, 200);
        v.as_array().unwrap().clone()
    }

    pub fn instance_dirs(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.dir.path().join("d/instances"))
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default()
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown(Duration::from_secs(10), true).await;
        }
    }
}

impl Drop for Harness {
    /// A test that fails before `stop` still leaves no instance running on the machine.
    fn drop(&mut self) {
        if self.server.is_none() {
            return;
        }
        kill_instances(&self.dir.path().join("d"));
    }
}

/// Kills every instance recorded under a data directory (a test that failed leaves nothing
/// running on the machine).
pub fn kill_instances(data_dir: &std::path::Path) {
    {
        let Ok(dirs) = std::fs::read_dir(data_dir.join("runtime")) else {
            return;
        };
        for d in dirs.flatten() {
            let Ok(raw) = std::fs::read(d.path().join("record.json")) else {
                continue;
            };
            let Ok(v) = serde_json::from_slice::<Value>(&raw) else {
                continue;
            };
            if let Some(pid) = v["pid"].as_i64() {
                // Process 1 of the instance's PID namespace: the namespace goes with it.
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// A temporary directory under /tmp that instances, which run as uids of their own, can
/// traverse (but not list).
pub fn tempdir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix("otm")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    dir
}

/// The host pid of the live agent whose state directory is in `instance_dir` (found through its
/// environment, as seen from outside the sandbox).
pub fn agent_pid(instance_dir: &std::path::Path) -> Option<u32> {
    let marker = format!("OTM_AGENT_STATE_DIR={}/state", instance_dir.display());
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let environ = std::fs::read(e.path().join("environ")).ok()?;
        let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
        let zombie = stat
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'));
        (!zombie && environ.split(|b| *b == 0).any(|v| v == marker.as_bytes())).then_some(pid)
    })
}

/// The cgroup the local runtime gives instance `id` on this host: `None` where it runs
/// instances without cgroups (not as root, or no usable hierarchy).
pub fn instance_cgroup(id: &str) -> Option<otm_runtime::cgroup::InstanceCgroup> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    let layout = otm_runtime::cgroup::Layout::detect()?;
    Some(layout.instance(&otm_core::InstanceId::parse(id).ok()?))
}

/// The process state letter (`S`, `R`, `T`, `D` …) of a pid, from /proc.
pub fn proc_state(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("State:"))
        .map(|s| s.trim().chars().take(1).collect())
        .unwrap_or_default()
}

/// CPU time used so far by a process (user and system), in clock ticks.
pub fn cpu_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let mut f = s.rsplit_once(')')?.1.split_whitespace().skip(11);
            Some(f.next()?.parse::<u64>().ok()? + f.next()?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

/// A loopback port nobody listens on now and that this test process has not handed out before
/// (the kernel may give the same ephemeral port to two quick probes).
pub fn free_port() -> u16 {
    use std::sync::Mutex;
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut given = GIVEN.lock().unwrap();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}
