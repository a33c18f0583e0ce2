//! `otm demo`: an offline tour of otm on this machine.
//!
//! Everything runs locally and needs nothing beyond the build: a stand-in Telegram Bot API
//! ([`otm_testkit::FakeTelegram`]) on 127.0.0.1, an otm server in this process with its data in a
//! fresh directory under /tmp, and one sandboxed instance of the reference agent per tenant. The
//! tour only talks to the server over HTTP, as Telegram and an operator would: it creates three
//! tenants, holds a short conversation, lets one tenant fall asleep and wakes it with its memory
//! intact, and prints wake latencies by phase. It stops every instance and removes the data
//! directory at the end (unless `--keep`).
//!
//! The server's own logs are held back to warnings (unless `RUST_LOG` says otherwise) so that
//! the tour on stdout stays readable: the tour runs on a runtime of its own whose threads use a
//! quieter log filter than the process-wide one.

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use futures::FutureExt as _;
use otm_testkit::{FakeTelegram, SentMessage, text_update};
use reqwest::Method;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

/// Prints a line to stdout. A closed stdout (`otm demo | head`) must not panic half-way through
/// the tour, which would skip stopping the instances, so write errors are ignored.
macro_rules! say {
    () => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout());
    }};
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// Options of the demo.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Keep the temporary data directory instead of removing it at the end.
    #[arg(long)]
    pub keep: bool,
}

/// How long any one wait of the tour may take before it gives up.
const WAIT: Duration = Duration::from_secs(30);
/// How long the tour waits for the warm pool to start an instance.
const WARM_WAIT: Duration = Duration::from_secs(5);
/// The public URL webhooks are registered at; `.invalid` never resolves, and nothing calls it:
/// the tour posts the updates to the public listener itself, as Telegram would.
const PUBLIC_URL: &str = "https://demo.otm.invalid";

/// One demo tenant: who it is and what its user says in the conversation.
struct Script {
    id: &'static str,
    bot_id: u32,
    chat_id: i64,
    messages: &'static [&'static str],
}

const SCRIPTS: [Script; 3] = [
    Script {
        id: "alice",
        bot_id: 700_001,
        chat_id: 5001,
        messages: &["hello, I'm Alice", "what can you do?"],
    },
    Script {
        id: "bob",
        bot_id: 700_002,
        chat_id: 5002,
        messages: &["hi from Bob", "ping", "still there?"],
    },
    Script {
        id: "carol",
        bot_id: 700_003,
        chat_id: 5003,
        messages: &["good morning", "I'll go quiet for a bit"],
    },
];
/// The tenant that is put to sleep and woken again.
const SLEEPER: usize = 2;
/// The tenant whose wakes are timed.
const TIMED: usize = 0;

/// Runs the tour.
pub async fn run(args: DemoArgs) -> Result<()> {
    // The tour gets a runtime of its own on a thread of its own, so that every thread the server
    // runs on can carry the demo's quieter log filter (see `quiet_dispatch`).
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("otm-demo".into())
        .spawn(move || {
            let _ = tx.send(run_on_own_runtime(args));
        })
        .context("starting the demo thread")?;
    rx.await
        .map_err(|_| anyhow!("the demo stopped unexpectedly (see the message above)"))?
}

fn run_on_own_runtime(args: DemoArgs) -> Result<()> {
    let dispatch = quiet_dispatch();
    let _quiet = tracing::dispatcher::set_default(&dispatch);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("otm-demo-rt")
        .on_thread_start(move || {
            // The guard would restore the process-wide filter when dropped; these threads keep
            // the quiet one for as long as they live.
            std::mem::forget(tracing::dispatcher::set_default(&dispatch));
        })
        .build()
        .context("starting the demo's runtime")?;
    let result = runtime.block_on(tour(args));
    runtime.shutdown_timeout(Duration::from_secs(2));
    result
}

/// Server logs at `RUST_LOG` when set, else warnings and errors only, to stderr.
fn quiet_dispatch() -> tracing::Dispatch {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // Reporting a failed log write goes to stderr with eprintln!, which panics when stderr
        // is a closed pipe.
        .log_internal_errors(false)
        .finish();
    tracing::Dispatch::new(subscriber)
}

async fn tour(args: DemoArgs) -> Result<()> {
    let started = Instant::now();
    say!("otm demo: an offline tour of otm on this machine");
    say!("  A stand-in for the Telegram Bot API, an otm server and one sandboxed instance of");
    say!("  the reference agent per tenant, all on 127.0.0.1. Nothing goes to the network.");

    section("Starting");
    let dir = make_data_dir()?;
    say!("  data directory     {}", dir.display());
    let outcome = start_and_run(&dir).await;

    let keep_reason = match (&outcome, args.keep) {
        (_, true) => Some("--keep: the registry is otm.db, the snapshots are under state/"),
        (Err(e), false) if !e.is::<Interrupted>() => Some("to look at: the demo failed"),
        (Err(_), false) => None,
        (Ok(()), false) => None,
    };
    match keep_reason {
        Some(why) => say!("  kept {} ({why})", dir.display()),
        None => match std::fs::remove_dir_all(&dir) {
            Ok(()) => say!("  removed {}", dir.display()),
            Err(e) => say!("  could not remove {}: {e}", dir.display()),
        },
    }
    outcome?;
    say!();
    say!("demo finished in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// A fresh, private, short data directory: Unix socket paths under it must stay under 100 bytes.
fn make_data_dir() -> Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = PathBuf::from(format!(
        "/tmp/otm-demo-{}-{}",
        std::process::id(),
        otm_core::id::random_hex(4)
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating the data directory {}", dir.display()))?;
    Ok(dir)
}

/// Starts the stand-in Telegram and the server, runs the tour, and always stops both, with
/// every instance, whatever happened.
async fn start_and_run(dir: &Path) -> Result<()> {
    let fake = FakeTelegram::try_start()
        .await
        .context("starting the stand-in Telegram")?;
    say!(
        "  stand-in Telegram  {} (serves the Bot API as api.telegram.org would)",
        fake.url()
    );
    let settings = otm_server::Settings {
        listen: "127.0.0.1:0".into(),
        admin_listen: "127.0.0.1:0".into(),
        egress_listen: "127.0.0.1:0".into(),
        data_dir: dir.to_path_buf(),
        telegram_api: fake.url(),
        public_url: Some(PUBLIC_URL.into()),
        wake_timeout_s: WAIT.as_secs(),
        // The demo runs anywhere: without bubblewrap its instances are plain processes, and it
        // says so (a server never falls back on its own).
        sandbox: if otm_shim::sandbox::bwrap().is_some() {
            otm_server::Sandbox::Bubblewrap
        } else {
            otm_server::Sandbox::None
        },
        ..Default::default()
    };
    if settings.sandbox == otm_server::Sandbox::None {
        say!(
            "  NOTE: bubblewrap (bwrap) is not installed, so this demo's instances run UNSANDBOXED,"
        );
        say!("        as plain processes that could read everything here. `otm server` refuses to");
        say!(
            "        run like that; install bubblewrap (apt-get install bubblewrap) for the real thing."
        );
    }
    let server = otm_server::start(settings, None)
        .await
        .context("starting the otm server")?;
    let outcome = {
        match Demo::new(&server, &fake) {
            Ok(demo) => tokio::select! {
                // A bug in the tour must still stop the instances below.
                r = std::panic::AssertUnwindSafe(demo.steps()).catch_unwind() => {
                    r.unwrap_or_else(|_| Err(anyhow!("the demo panicked (see the message above)")))
                }
                _ = tokio::signal::ctrl_c() => Err(Interrupted.into()),
            },
            Err(e) => Err(e),
        }
    };
    if outcome.is_err() {
        say!();
        say!("the demo stopped early; cleaning up (the reason is printed at the end)");
    }

    section("Cleaning up");
    say!("  stopping the server; every instance takes a final snapshot and is removed ...");
    server.shutdown(Duration::from_secs(10), true).await;
    fake.shutdown().await;
    outcome
}

/// Ctrl-C: the tour stops, cleans up and exits with an error.
#[derive(Debug)]
struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

/// A tenant as the tour knows it.
struct Tenant {
    script: &'static Script,
    /// The bot token: random, given to the stand-in Telegram and to otm, never printed.
    bot_token: String,
    /// The webhook secret otm gave Telegram with setWebhook; never printed.
    secret: String,
}

struct Demo<'a> {
    fake: &'a FakeTelegram,
    http: reqwest::Client,
    /// `http://<admin listener>/v1`
    admin: String,
    /// `http://<public listener>`
    public: String,
    admin_token: String,
    next_update_id: AtomicI64,
}

impl<'a> Demo<'a> {
    fn new(server: &otm_server::Server, fake: &'a FakeTelegram) -> Result<Self> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(WAIT)
            .build()
            .context("building the HTTP client")?;
        Ok(Demo {
            fake,
            http,
            admin: format!("http://{}/v1", server.admin_addr),
            public: format!("http://{}", server.public_addr),
            admin_token: server.admin_token().expose().to_owned(),
            next_update_id: AtomicI64::new(100_000),
        })
    }

    async fn steps(&self) -> Result<()> {
        let status = self.api(Method::GET, "/status", None).await?;
        say!(
            "  otm server         webhooks on {}/tg/<tenant>, admin API on {}/",
            self.public,
            self.admin
        );
        match status["isolation"].as_str().unwrap_or("unknown") {
            "none" => say!(
                "  sandbox            NONE: instances run unsandboxed (bubblewrap is not installed)"
            ),
            other => say!(
                "  sandbox            {other} (each instance: `otm shim` in a sandbox of its own, the reference agent in a second one inside it)"
            ),
        }

        section("1. Three tenants, each with its own Telegram bot");
        let mut tenants = Vec::new();
        for script in &SCRIPTS {
            tenants.push(self.create_tenant(script).await?);
        }
        say!("  Each webhook got a secret of its own; Telegram sends it back with every update.");

        section("2. A short conversation");
        say!("  Each update is posted to the public listener as Telegram would; otm stores it,");
        say!("  wakes the tenant if needed and hands it to the agent, which answers through otm's");
        say!("  Bot API proxy. The reference agent numbers the messages of each chat.");
        let rounds = SCRIPTS.iter().map(|s| s.messages.len()).max().unwrap_or(0);
        for round in 0..rounds {
            say!();
            for t in &tenants {
                let Some(text) = t.script.messages.get(round) else {
                    continue;
                };
                let note = if round == 0 {
                    "including a cold wake of the tenant"
                } else {
                    "tenant awake"
                };
                self.say(t, text, note).await?;
            }
        }

        self.sleep_and_wake(&tenants[SLEEPER]).await?;
        self.latencies(&tenants[TIMED]).await?;
        Ok(())
    }

    async fn create_tenant(&self, script: &'static Script) -> Result<Tenant> {
        let bot_token = format!("{}:{}", script.bot_id, otm_core::id::random_hex(16));
        self.fake.add_bot(&bot_token);
        let body = json!({"id": script.id, "bot_token": bot_token, "idle_timeout_s": 600});
        let created = self
            .api(Method::POST, "/tenants", Some(body))
            .await
            .with_context(|| format!("creating tenant {}", script.id))?;
        let hook = self.fake.webhook(&bot_token).with_context(|| {
            format!(
                "creating tenant {} registered no webhook with Telegram",
                script.id
            )
        })?;
        let secret = hook
            .secret_token
            .with_context(|| format!("the webhook of tenant {} has no secret", script.id))?;
        say!(
            "  {:<6} profile {}, bot {}, webhook {}",
            script.id,
            created["profile"].as_str().unwrap_or("?"),
            script.bot_id,
            hook.url
        );
        Ok(Tenant {
            script,
            bot_token,
            secret,
        })
    }

    /// Sends `text` from the tenant's user and prints it with the bot's reply.
    async fn say(&self, t: &Tenant, text: &str, note: &str) -> Result<(String, Duration)> {
        let id = t.script.id;
        let tag = format!("[{id}]");
        say!("  {tag:<8} user: {text}");
        let have = self.fake.sent_messages(&t.bot_token).len();
        let began = Instant::now();
        self.post_update(t, text).await?;
        let reply = self.wait_for_reply(t, have + 1).await?;
        let took = began.elapsed();
        say!(
            "  {tag:<8} bot:  {}   ({}, {note})",
            reply.text,
            fmt_duration(took)
        );
        Ok((reply.text, took))
    }

    /// Posts a text message update the way Telegram does.
    async fn post_update(&self, t: &Tenant, text: &str) -> Result<()> {
        let update_id = self.next_update_id.fetch_add(1, Ordering::Relaxed);
        let update = text_update(update_id, t.script.chat_id, text);
        let url = format!("{}/tg/{}", self.public, t.script.id);
        let resp = self
            .http
            .post(&url)
            .header("X-Telegram-Bot-Api-Secret-Token", &t.secret)
            .json(&update)
            .send()
            .await
            .with_context(|| format!("posting an update to {url}"))?;
        if resp.status() != reqwest::StatusCode::OK {
            bail!(
                "posting an update to {url}: the server answered {}",
                resp.status()
            );
        }
        Ok(())
    }

    /// Waits until the tenant's bot has sent `n` messages and returns the last one.
    async fn wait_for_reply(&self, t: &Tenant, n: usize) -> Result<SentMessage> {
        let id = t.script.id;
        let began = Instant::now();
        loop {
            let left = WAIT.saturating_sub(began.elapsed());
            let sent = self
                .fake
                .wait_for_messages(&t.bot_token, n, left.min(Duration::from_secs(3)))
                .await;
            if sent.len() >= n {
                let reply = sent[n - 1].clone();
                if reply.chat_id != t.script.chat_id {
                    bail!(
                        "{id}'s bot answered chat {} instead of chat {}",
                        reply.chat_id,
                        t.script.chat_id
                    );
                }
                return Ok(reply);
            }
            if began.elapsed() >= WAIT {
                bail!(
                    "no reply from {id}'s bot within {} s (see `GET /v1/tenants/{id}/inbox` for failed deliveries)",
                    WAIT.as_secs()
                );
            }
            say!(
                "    ... still waiting for {id}'s reply ({:.0} s)",
                began.elapsed().as_secs_f64()
            );
        }
    }

    async fn sleep_and_wake(&self, t: &Tenant) -> Result<()> {
        let id = t.script.id;
        section("3. Sleep, and wake with memory intact");
        self.api(
            Method::PATCH,
            &format!("/tenants/{id}"),
            Some(json!({"idle_timeout_s": 1})),
        )
        .await
        .with_context(|| format!("setting {id}'s idle timeout"))?;
        say!("  {id}'s idle timeout is now 1 s. The idle reaper looks every second; it stops the");
        say!("  agent, takes a final snapshot of its state directory and removes the instance.");
        let began = Instant::now();
        let mut last = String::new();
        loop {
            let v = self
                .api(Method::GET, &format!("/tenants/{id}"), None)
                .await?;
            let status = v["status"].as_str().unwrap_or("?").to_owned();
            let instance = v["instance"].as_str().map(str::to_owned);
            let seen = format!("{status} {instance:?}");
            if seen != last {
                let what = match &instance {
                    Some(i) => format!("{status}, instance {}", short(i)),
                    None => format!("{status}, no instance"),
                };
                say!("    +{:.1} s  {id}: {what}", began.elapsed().as_secs_f64());
                last = seen;
            }
            if status == "idle" && instance.is_none() {
                break;
            }
            if began.elapsed() >= WAIT {
                bail!(
                    "{id} did not fall asleep within {} s (status {status})",
                    WAIT.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let instances = self.api(Method::GET, "/instances", None).await?;
        let running = instances
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|i| i["tenant"].as_str() == Some(id))
                    .count()
            })
            .unwrap_or(0);
        if running > 0 {
            bail!("{id} is idle, yet GET /v1/instances lists {running} instances of it");
        }
        say!("  {id} is asleep: no process runs for it; its state is in its latest snapshot:");

        let snaps = self
            .api(Method::GET, &format!("/tenants/{id}/snapshots"), None)
            .await?;
        let head = snaps["head"].as_str().map(str::to_owned);
        let list = snaps["snapshots"].as_array().cloned().unwrap_or_default();
        let Some(snap) = list.iter().find(|s| s["id"].as_str() == head.as_deref()) else {
            bail!("{id} fell asleep but has no head snapshot");
        };
        say!(
            "    snapshot {} (head, {} kept): {}, reason \"{}\"",
            snap["id"].as_str().unwrap_or("?"),
            list.len(),
            fmt_size(snap["size"].as_u64().unwrap_or(0)),
            snap["reason"].as_str().unwrap_or("?"),
        );

        let before = t.script.messages.len();
        say!();
        let (reply, _) = self
            .say(
                t,
                "I'm back. Do you remember me?",
                "woken, state restored from the snapshot",
            )
            .await?;
        let expected = format!("#{}:", before + 1);
        if !reply.starts_with(&expected) {
            bail!(
                "{id}'s reply after the wake should start with {expected} (its memory was lost?): {reply}"
            );
        }
        say!(
            "  The count went on from #{before} to #{}: {id}'s history survived the sleep.",
            before + 1
        );
        Ok(())
    }

    async fn latencies(&self, t: &Tenant) -> Result<()> {
        let id = t.script.id;
        section("4. Wake latency by phase");
        say!("  Three ways POST /v1/tenants/{id}/wake is served; the server times each phase.");
        say!();

        let awake = self.wake(id).await?;
        expect_path(&awake, "cache")?;
        say!("  {id} is running: the wake answers from the endpoint cache");

        self.stop(id).await?;
        let cold = self.wake(id).await?;
        expect_path(&cold, "cold")?;
        say!("  stopped {id} (POST /v1/tenants/{id}/stop), woke it: a new sandbox was created");

        say!("  stopped {id} again and sent it a message; the message wakes it:");
        self.stop(id).await?;
        let (_, first_reply) = self
            .say(t, "are you awake?", "webhook to reply, cold wake included")
            .await?;

        say!(
            "  asked for a warm pool of one instance (PUT /v1/config {{\"warm_pool_target\": 1}})"
        );
        self.api(Method::PUT, "/config", Some(json!({"warm_pool_target": 1})))
            .await?;
        let warm = match self.wait_for_warm_instance().await? {
            Some(instance) => {
                say!(
                    "  warm instance {} is up, bound to no tenant; stopped {id} and woke it",
                    short(&instance)
                );
                self.stop(id).await?;
                let w = self.wake(id).await?;
                if w["path"] != "warm" {
                    say!(
                        "  (that wake did not claim the warm instance: path {})",
                        w["path"]
                    );
                }
                Some(w)
            }
            None => {
                say!(
                    "  the warm pool is not available in this build (no warm instance after {} s)",
                    WARM_WAIT.as_secs()
                );
                None
            }
        };
        self.api(Method::PUT, "/config", Some(json!({"warm_pool_target": 0})))
            .await?;

        say!();
        say!(
            "  milliseconds, one sample each (other: locks and registry writes around the phases):"
        );
        print_table(&[
            ("cold", "a new sandbox is created", Some(cold)),
            ("warm", "a pre-started sandbox is claimed", warm),
            (
                "awake",
                "already running: the endpoint is cached",
                Some(awake),
            ),
        ]);
        say!();
        say!(
            "  first reply after a cold wake, webhook in to reply out: {}",
            fmt_duration(first_reply)
        );
        say!(
            "  (`cargo bench -p otm` takes many samples; GET /metrics has them by path and phase)"
        );
        Ok(())
    }

    async fn wake(&self, id: &str) -> Result<Value> {
        self.api(Method::POST, &format!("/tenants/{id}/wake"), None)
            .await
            .with_context(|| format!("waking {id}"))
    }

    async fn stop(&self, id: &str) -> Result<()> {
        self.api(Method::POST, &format!("/tenants/{id}/stop"), None)
            .await
            .with_context(|| format!("stopping {id}"))?;
        Ok(())
    }

    /// Waits up to [`WARM_WAIT`] for an instance bound to no tenant in state `warm`.
    async fn wait_for_warm_instance(&self) -> Result<Option<String>> {
        let began = Instant::now();
        let mut said = 0;
        loop {
            let list = self.api(Method::GET, "/instances", None).await?;
            let warm = list.as_array().and_then(|a| {
                a.iter()
                    .find(|i| i["tenant"].is_null() && i["state"] == "warm")
                    .and_then(|i| i["id"].as_str())
            });
            if let Some(w) = warm {
                return Ok(Some(w.to_owned()));
            }
            if began.elapsed() >= WARM_WAIT {
                return Ok(None);
            }
            let secs = began.elapsed().as_secs();
            if secs > said {
                said = secs;
                say!("    ... waiting for a warm instance ({secs} s)");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Calls the admin API; any answer but 2xx is an error carrying the API's message.
    async fn api(&self, method: Method, path: &str, body: Option<Value>) -> Result<Value> {
        let url = format!("{}{path}", self.admin);
        let mut req = self
            .http
            .request(method.clone(), &url)
            .bearer_auth(&self.admin_token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("{method} {url}"))?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .with_context(|| format!("{method} {url}: reading the answer"))?;
        let value = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        if !status.is_success() {
            let message = value["error"]["message"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| value.to_string());
            bail!("{method} /v1{path}: the server answered {status}: {message}");
        }
        Ok(value)
    }
}

fn expect_path(wake: &Value, path: &str) -> Result<()> {
    if wake["path"] != path {
        bail!("expected a wake by path \"{path}\", the server answered {wake}");
    }
    Ok(())
}

/// Prints the wake table: one row per path, one column per phase, milliseconds. `other` is the
/// part of the total no phase accounts for (locks and registry writes around the phases).
fn print_table(rows: &[(&str, &str, Option<Value>)]) {
    let mut columns: Vec<String> = ["create", "claim", "restore", "start", "ready"]
        .map(String::from)
        .to_vec();
    for (_, _, w) in rows {
        if let Some(map) = w.as_ref().and_then(|w| w["phases_ms"].as_object()) {
            for k in map.keys() {
                if !columns.contains(k) {
                    columns.push(k.clone());
                }
            }
        }
    }
    columns.push("other".into());
    columns.push("total".into());
    let width = |c: &str| c.len().max(5);
    let mut header = format!("  {:<6}", "path");
    for c in &columns {
        header.push_str(&format!("  {c:>w$}", w = width(c)));
    }
    say!("{header}  how");
    for (name, how, w) in rows {
        let mut line = format!("  {name:<6}");
        match w {
            Some(w) => {
                let phases = w["phases_ms"].as_object().filter(|p| !p.is_empty());
                let total = w["total_ms"].as_u64();
                let other = phases.zip(total).map(|(p, total)| {
                    total.saturating_sub(p.values().filter_map(Value::as_u64).sum())
                });
                for c in &columns {
                    let ms = match c.as_str() {
                        "total" => total,
                        "other" => other,
                        phase => w["phases_ms"][phase].as_u64(),
                    };
                    let cell = ms.map_or("-".to_owned(), |ms| ms.to_string());
                    line.push_str(&format!("  {cell:>w$}", w = width(c)));
                }
                line.push_str(&format!("  {how}"));
            }
            None => line.push_str("  not available in this build"),
        }
        say!("{line}");
    }
}

fn section(title: &str) {
    say!();
    say!("== {title}");
}

/// The first characters of an instance id: enough to tell instances apart.
fn short(id: &str) -> &str {
    id.get(..10).unwrap_or(id)
}

fn fmt_duration(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 10.0 {
        format!("{ms:.1} ms")
    } else if ms < 10_000.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{:.1} s", ms / 1000.0)
    }
}

fn fmt_size(bytes: u64) -> String {
    if bytes < 1024 {
        format!("{bytes} B")
    } else {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    }
}
