//! One supervised agent process: start, readiness, restart on crash, delivery, graceful stop.

use crate::freezer::AgentCgroup;
use crate::profile::{AckRule, AgentLaunch, AgentProfile};
use crate::sandbox::{AgentSandbox, Prestarted};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use otm_core::shim_api::DeliverResponse;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{Mutex, watch};

/// Where the agent process is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentState {
    /// Spawned, not answering its health check yet.
    Starting { pid: u32 },
    /// Answering; deliveries go through.
    Ready { pid: u32 },
    /// Exited on its own; a restart follows.
    Crashed { code: Option<i32> },
    /// Stopped on request; no restart.
    Stopped { code: Option<i32>, killed: bool },
    /// Could not be started at all.
    Failed { message: String },
}

impl AgentState {
    /// The short name the status call reports.
    pub fn name(&self) -> &'static str {
        match self {
            AgentState::Starting { .. } => "starting",
            AgentState::Ready { .. } => "ready",
            AgentState::Crashed { .. } => "restarting",
            AgentState::Stopped { .. } => "stopped",
            AgentState::Failed { .. } => "failed",
        }
    }

    /// The agent's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        match self {
            AgentState::Starting { pid } | AgentState::Ready { pid } => Some(*pid),
            _ => None,
        }
    }
}

/// A supervised agent. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Agent {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    launch: AgentLaunch,
    profile: AgentProfile,
    log_path: PathBuf,
    workdir: PathBuf,
    state: watch::Sender<AgentState>,
    stopping: AtomicBool,
    restarts: AtomicU32,
    /// Serializes deliveries: one update at a time, in order.
    deliver_lock: Mutex<()>,
    /// HTTP to the agent's loopback ports: its health checks and its webhook.
    http: crate::loopback::Client,
    /// Where the agent runs: its own sandbox, or a plain child process.
    sandbox: Option<Arc<AgentSandbox>>,
    /// Directories the agent may write (sandboxed only).
    writable: Vec<PathBuf>,
    /// A sandbox made ahead for the first start, when there is one.
    prestarted: std::sync::Mutex<Option<Prestarted>>,
    /// Who holds the agent stopped right now (a snapshot, a freeze).
    holds: Arc<std::sync::Mutex<Holds>>,
    /// The hold of a freeze, while the agent is frozen.
    frozen: std::sync::Mutex<Option<Hold>>,
}

/// The agent's processes stopped once for however many holders want them stopped.
#[derive(Debug, Default)]
struct Holds {
    count: usize,
    paused: Option<Paused>,
}

impl Agent {
    /// Spawns the agent and supervises it until [`Agent::stop`]. Returns at once; use
    /// [`Agent::wait_ready`] to wait for readiness.
    pub fn start(
        profile: AgentProfile,
        launch: AgentLaunch,
        workdir: PathBuf,
        log_path: PathBuf,
        sandbox: Option<Arc<AgentSandbox>>,
        writable: Vec<PathBuf>,
        prestarted: Option<Prestarted>,
    ) -> Agent {
        let (state, _) = watch::channel(AgentState::Starting { pid: 0 });
        let agent = Agent {
            inner: Arc::new(Inner {
                launch,
                profile,
                log_path,
                workdir,
                state,
                stopping: AtomicBool::new(false),
                restarts: AtomicU32::new(0),
                deliver_lock: Mutex::new(()),
                http: Default::default(),
                sandbox,
                writable,
                prestarted: std::sync::Mutex::new(prestarted),
                holds: Default::default(),
                frozen: std::sync::Mutex::new(None),
            }),
        };
        tokio::spawn(agent.clone().supervise());
        agent
    }

    /// The current state.
    pub fn state(&self) -> AgentState {
        self.inner.state.borrow().clone()
    }

    /// How often the agent was restarted after crashing.
    pub fn restarts(&self) -> u32 {
        self.inner.restarts.load(Ordering::Relaxed)
    }

    /// Waits until the agent is ready, or fails with why not.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<u32, String> {
        let mut rx = self.inner.state.subscribe();
        let wait = async {
            loop {
                match &*rx.borrow_and_update() {
                    AgentState::Ready { pid } => return Ok(*pid),
                    AgentState::Failed { message } => return Err(message.clone()),
                    AgentState::Stopped { .. } => return Err("the agent was stopped".to_owned()),
                    _ => {}
                }
                if rx.changed().await.is_err() {
                    return Err("the agent supervisor ended".to_owned());
                }
            }
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "the agent was not ready within {} s",
                timeout.as_secs()
            )),
        }
    }

    async fn supervise(self) {
        let inner = &self.inner;
        loop {
            let started = Instant::now();
            let (mut child, pid) = match self.spawn().await {
                Ok(c) => c,
                Err(message) => {
                    tracing::error!(%message);
                    inner.state.send_replace(AgentState::Failed { message });
                    return;
                }
            };
            inner.state.send_replace(AgentState::Starting { pid });
            tracing::info!(pid, sandboxed = inner.sandbox.is_some(), "agent started");

            let ready = self.probe_until_ready(pid);
            tokio::pin!(ready);
            let mut became_ready = false;
            let status = loop {
                tokio::select! {
                    status = child.wait() => break status,
                    ok = &mut ready, if !became_ready => {
                        became_ready = true;
                        if ok {
                            inner.state.send_replace(AgentState::Ready { pid });
                            tracing::info!(pid, ms = started.elapsed().as_millis() as u64, "agent ready");
                        } else {
                            tracing::warn!(pid, "agent not ready in time; killing it");
                            self.signal(pid, Signal::SIGKILL);
                        }
                    }
                }
            };
            let code = status.ok().and_then(|s| s.code());
            // Whatever held the processes stopped held processes that are gone now: nothing to
            // resume (their pids may be someone else's soon).
            self.forget_holds();
            if inner.stopping.load(Ordering::SeqCst) {
                inner.state.send_replace(AgentState::Stopped {
                    code,
                    killed: false,
                });
                return;
            }
            let n = inner.restarts.fetch_add(1, Ordering::SeqCst) + 1;
            tracing::warn!(pid, ?code, restarts = n, "agent exited; restarting");
            inner.state.send_replace(AgentState::Crashed { code });
            // Back off a little on crash loops (200 ms, 400 ms … up to 3.2 s), but restart the
            // first crash at once.
            const RESTART: otm_core::Backoff =
                otm_core::Backoff::new(Duration::from_millis(100), Duration::from_millis(3200));
            if n > 1 {
                tokio::time::sleep(RESTART.delay(n)).await;
            }
            if inner.stopping.load(Ordering::SeqCst) {
                inner.state.send_replace(AgentState::Stopped {
                    code,
                    killed: false,
                });
                return;
            }
        }
    }

    /// Starts the agent process: in its sandbox (the pid is the sandbox's process 1, which passes
    /// signals on), or as a plain child in a process group of its own.
    async fn spawn(&self) -> Result<(tokio::process::Child, u32), String> {
        let inner = &self.inner;
        let (out, err) =
            open_log(&inner.log_path).map_err(|e| format!("cannot open the agent log: {e}"))?;
        let mut env = inner.launch.env.clone();
        for (k, v) in [
            ("LANG", "C.UTF-8".to_owned()),
            ("HOME", inner.workdir.display().to_string()),
        ] {
            env.entry(k.to_owned()).or_insert(v);
        }
        env.entry("PATH".into()).or_insert_with(|| {
            std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into())
        });
        if let Ok(rust_log) = std::env::var("RUST_LOG") {
            env.entry("RUST_LOG".into()).or_insert(rust_log);
        }
        let program = &inner.launch.program;
        let prestarted = inner
            .prestarted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(ready) = prestarted {
            if ready.fits(
                program,
                &inner.workdir,
                &inner.writable,
                &inner.launch.read_only,
            ) {
                let spawned = ready
                    .launch(program, &inner.launch.args, &env)
                    .map_err(|e| {
                        format!(
                            "cannot start {} in its waiting sandbox: {e}",
                            program.display()
                        )
                    })?;
                return Ok((spawned.child, spawned.init_pid));
            }
            tracing::info!(
                program = %program.display(),
                "the sandbox made ahead does not show what this agent needs; making another"
            );
        }
        if let Some(sandbox) = &inner.sandbox {
            let spawned = sandbox
                .spawn(
                    program,
                    &inner.launch.args,
                    &env,
                    &inner.workdir,
                    &inner.writable,
                    &inner.launch.read_only,
                    out,
                )
                .await
                .map_err(|e| format!("cannot start {} in its sandbox: {e}", program.display()))?;
            return Ok((spawned.child, spawned.init_pid));
        }
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(&inner.launch.args)
            .env_clear()
            .envs(&env)
            .current_dir(&inner.workdir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .kill_on_drop(false);
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
        let pid = child.id().unwrap_or(0);
        Ok((child, pid))
    }

    /// Sends `sig` to the whole agent: its sandbox's process 1 (which passes it on, and whose
    /// death ends the sandbox), or its process group.
    fn signal(&self, pid: u32, sig: Signal) {
        if pid == 0 {
            return;
        }
        if self.inner.sandbox.is_some() {
            let _ = kill(Pid::from_raw(pid as i32), sig);
        } else {
            let _ = killpg(Pid::from_raw(pid as i32), sig);
        }
    }

    /// Polls the health URL (then each of `also_ready`) until each answers 200; false on
    /// timeout.
    async fn probe_until_ready(&self, _pid: u32) -> bool {
        let deadline = Instant::now() + self.inner.profile.ready_timeout;
        // Every millisecond for the first 100 ms (a small agent is up in a few milliseconds, a
        // refused connection costs microseconds, and a doubling interval would add up to the
        // agent's own start), then every 25 ms.
        let started = Instant::now();
        let launch = &self.inner.launch;
        // Until the agent listens: a connection attempt every 200 µs on a blocking thread, for
        // up to 100 ms. A runtime timer ticks in whole milliseconds, which would add up to 2 ms
        // to every start of a small agent.
        if let Ok(addr) = crate::loopback::address(&launch.health_url) {
            let _ = tokio::task::spawn_blocking(move || {
                let until = Instant::now() + Duration::from_millis(100);
                while Instant::now() < until {
                    if std::net::TcpStream::connect(addr).is_ok() {
                        return;
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
            })
            .await;
        }
        for url in std::iter::once(&launch.health_url).chain(&launch.also_ready) {
            loop {
                if Instant::now() >= deadline {
                    return false;
                }
                let probe = self.inner.http.get(url);
                if let Ok(Ok(resp)) = tokio::time::timeout(Duration::from_secs(2), probe).await {
                    let ready = resp.status.is_success();
                    resp.finish(&self.inner.http);
                    if ready {
                        break;
                    }
                }
                let interval = if started.elapsed() < Duration::from_millis(100) {
                    1
                } else {
                    25
                };
                tokio::time::sleep(Duration::from_millis(interval)).await;
            }
        }
        true
    }

    /// Pauses the agent and every process it started until the guard is dropped, so its files
    /// can be copied as of one instant: through its cgroup's freezer where it has one, else by
    /// SIGSTOP (and SIGCONT). Holds nest: the agent resumes when the last one is dropped (a
    /// snapshot of a frozen agent leaves it frozen). `None` when no agent process runs.
    pub fn pause(&self) -> Option<Hold> {
        let mut holds = lock(&self.inner.holds);
        if holds.count == 0 {
            let pid = self.state().pid().filter(|p| *p > 0)? as i32;
            holds.paused = Some(self.hold_processes(pid)?);
        }
        holds.count += 1;
        Some(Hold {
            holds: self.inner.holds.clone(),
        })
    }

    /// Stops the agent whose sandbox's process 1 is `pid`: its cgroup frozen, when it has one
    /// and the agent is in it, else its processes stopped one by one.
    fn hold_processes(&self, pid: i32) -> Option<Paused> {
        if let Some(cg) = self.cgroup() {
            if !cg.procs().contains(&pid) {
                tracing::warn!(
                    pid,
                    cgroup = %cg.dir().display(),
                    "the agent is not in its cgroup; stopping it by SIGSTOP"
                );
            } else {
                match cg.freeze(crate::freezer::FREEZE_TIMEOUT) {
                    Ok(()) => return Some(Paused::Cgroup(cg.clone())),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot freeze the agent's cgroup; stopping it by SIGSTOP")
                    }
                }
            }
        }
        stop_family(pid).map(Paused::Signals)
    }

    /// The agent's cgroup, when it runs in one.
    fn cgroup(&self) -> Option<&Arc<AgentCgroup>> {
        self.inner.sandbox.as_ref()?.cgroup.as_ref()
    }

    /// How the agent is held right now: `cgroup` (its cgroup frozen) or `sigstop` (every
    /// process of its tree stopped); `None` while it runs.
    pub fn held_by(&self) -> Option<&'static str> {
        lock(&self.inner.holds).paused.as_ref().map(Paused::method)
    }

    /// Freezes the agent in place: its whole process tree frozen ([`Agent::pause`]: its cgroup,
    /// or SIGSTOP) until [`Agent::thaw`], costing no CPU and keeping its memory. Refused while it
    /// is not ready or a delivery runs. Returns whether it was frozen by this call.
    pub fn freeze(&self) -> Result<bool, String> {
        let Ok(_no_delivery) = self.inner.deliver_lock.try_lock() else {
            return Err("a delivery is under way".to_owned());
        };
        let mut frozen = lock(&self.inner.frozen);
        if frozen.is_some() {
            return Ok(false);
        }
        let pid = match self.state() {
            AgentState::Ready { pid } if pid > 0 => pid as i32,
            s => return Err(format!("the agent is {}", s.name())),
        };
        // An agent still at work on a turn it acknowledged (before its next call goes out) is
        // busy, not idle: it uses CPU, where an idle one waits on its timers.
        let before = family_cpu_ticks(pid);
        std::thread::sleep(BUSY_WINDOW);
        let used = family_cpu_ticks(pid).saturating_sub(before);
        if used >= BUSY_TICKS {
            return Err(format!(
                "the agent is working ({} ms of CPU in the last {} ms)",
                used * 10,
                BUSY_WINDOW.as_millis()
            ));
        }
        let hold = self
            .pause()
            .ok_or_else(|| "no agent process to freeze".to_owned())?;
        *frozen = Some(hold);
        tracing::info!(method = self.held_by().unwrap_or("none"), "agent frozen");
        Ok(true)
    }

    /// Thaws a frozen agent; returns whether it was frozen.
    pub fn thaw(&self) -> bool {
        let hold = lock(&self.inner.frozen).take();
        let was = hold.is_some();
        drop(hold);
        if was {
            tracing::info!("agent thawed");
        }
        was
    }

    /// True while the agent is frozen.
    pub fn is_frozen(&self) -> bool {
        lock(&self.inner.frozen).is_some()
    }

    /// Resident memory of the agent's processes, in bytes (`None` when none runs).
    pub fn memory_bytes(&self) -> Option<u64> {
        let pid = self.state().pid().filter(|p| *p > 0)? as i32;
        Some(family(pid).into_iter().map(rss_bytes).sum())
    }

    /// Drops every hold without resuming anything: the processes they stopped are gone. A
    /// frozen cgroup is thawed, though: the next agent starts in it.
    fn forget_holds(&self) {
        let frozen = lock(&self.inner.frozen).take();
        let mut holds = lock(&self.inner.holds);
        if let Some(Paused::Signals(pids)) = holds.paused.as_mut() {
            pids.clear();
        }
        holds.paused = None;
        drop(holds);
        // Dropping the freeze's hold now only counts down.
        drop(frozen);
    }

    /// Forwards one update to the agent's webhook and reports whether it acknowledged it.
    pub async fn deliver(&self, update: bytes::Bytes) -> DeliverResponse {
        let _one_at_a_time = self.inner.deliver_lock.lock().await;
        // A message for a frozen agent thaws it.
        self.thaw();
        if let Err(detail) = self.wait_ready(self.inner.profile.ready_timeout).await {
            return DeliverResponse {
                acknowledged: false,
                status: 503,
                detail: Some(detail),
            };
        }
        // Within the delivery timeout: the answer's status and headers, and the body of one
        // that does not acknowledge the update.
        let deadline = tokio::time::Instant::now() + self.inner.profile.deliver_timeout;
        let http = &self.inner.http;
        let launch = &self.inner.launch;
        let headers = [
            (hyper::header::CONTENT_TYPE, "application/json"),
            (SECRET_TOKEN, launch.webhook_secret.as_str()),
        ];
        let post = http.post(&launch.webhook_url, &headers, update);
        let resp = match tokio::time::timeout_at(deadline, post).await {
            Ok(Ok(resp)) => resp,
            failed => {
                match failed {
                    Ok(Err(e)) => tracing::debug!(error = %e, "the agent did not answer"),
                    _ => tracing::debug!("the agent did not answer in time"),
                }
                return DeliverResponse {
                    acknowledged: false,
                    status: 502,
                    detail: Some(NO_ANSWER.to_owned()),
                };
            }
        };
        let status = resp.status;
        let acknowledged = status.is_success()
            && match &self.inner.profile.ack {
                AckRule::Success => true,
                AckRule::Header { name, value } => {
                    crate::loopback::header_is(&resp.headers, name, value)
                }
            };
        let detail = if acknowledged {
            resp.finish(http);
            None
        } else {
            let body = tokio::time::timeout_at(deadline, resp.text(http))
                .await
                .unwrap_or_default();
            Some(format!(
                "agent answered {status}: {}",
                body.chars().take(200).collect::<String>()
            ))
        };
        DeliverResponse {
            acknowledged,
            status: status.as_u16(),
            detail,
        }
    }

    /// SIGTERM, the grace period, then SIGKILL. Returns the exit code and whether it was killed.
    pub async fn stop(&self, grace: Option<Duration>) -> (Option<i32>, bool) {
        let grace = grace.unwrap_or(self.inner.profile.stop_grace);
        self.inner.stopping.store(true, Ordering::SeqCst);
        let _no_more_deliveries = self.inner.deliver_lock.lock().await;
        // A stopped process would not see SIGTERM until resumed.
        self.thaw();
        let pid = match self.state() {
            AgentState::Stopped { code, killed } => return (code, killed),
            s => s.pid(),
        };
        let Some(pid) = pid.filter(|p| *p > 0) else {
            self.inner.state.send_replace(AgentState::Stopped {
                code: None,
                killed: false,
            });
            return (None, false);
        };
        self.signal(pid, Signal::SIGTERM);
        if let Some(code) = self.wait_stopped(grace).await {
            return (code, false);
        }
        tracing::warn!(
            pid,
            grace_s = grace.as_secs(),
            "agent ignored SIGTERM; killing it"
        );
        self.signal(pid, Signal::SIGKILL);
        let code = self.wait_stopped(Duration::from_secs(5)).await.flatten();
        self.inner
            .state
            .send_replace(AgentState::Stopped { code, killed: true });
        (code, true)
    }

    /// Waits for the supervisor to see the agent exit after a stop; `None` on timeout.
    async fn wait_stopped(&self, timeout: Duration) -> Option<Option<i32>> {
        let mut rx = self.inner.state.subscribe();
        let wait = async {
            loop {
                if let AgentState::Stopped { code, .. } = &*rx.borrow_and_update() {
                    return Some(*code);
                }
                if rx.changed().await.is_err() {
                    return Some(None);
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.ok().flatten()
    }
}

/// One holder's wish that the agent stays paused ([`Agent::pause`]); the agent resumes when the
/// last hold is dropped.
#[derive(Debug)]
pub struct Hold {
    holds: Arc<std::sync::Mutex<Holds>>,
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut holds = lock(&self.holds);
        holds.count = holds.count.saturating_sub(1);
        if holds.count == 0 {
            // Dropping it resumes the processes.
            holds.paused = None;
        }
    }
}

/// The agent's processes held stopped; dropping it resumes them.
#[derive(Debug)]
enum Paused {
    /// Stopped by [`stop_family`] (these pids).
    Signals(Vec<i32>),
    /// Its cgroup frozen.
    Cgroup(Arc<AgentCgroup>),
}

impl Paused {
    fn method(&self) -> &'static str {
        match self {
            Paused::Signals(_) => "sigstop",
            Paused::Cgroup(_) => "cgroup",
        }
    }
}

/// Stops `pid` and every process it started (SIGSTOP), whatever their process group: the agent
/// first, so it starts nothing new; then its descendants, until a pass over /proc finds none
/// left running. The pids stopped; `None` when nothing could be stopped.
fn stop_family(pid: i32) -> Option<Vec<i32>> {
    let mut stopped = Vec::new();
    for _ in 0..4 {
        let fresh: Vec<i32> = family(pid)
            .into_iter()
            .filter(|p| !stopped.contains(p))
            .collect();
        if fresh.is_empty() {
            break;
        }
        for p in fresh {
            if kill(Pid::from_raw(p), Signal::SIGSTOP).is_ok() {
                stopped.push(p);
            }
        }
    }
    (!stopped.is_empty()).then_some(stopped)
}

/// How long [`Agent::freeze`] watches the agent's CPU use before it freezes it.
const BUSY_WINDOW: Duration = Duration::from_millis(200);
/// CPU used within [`BUSY_WINDOW`] (in clock ticks, 10 ms each) that makes an agent busy: a
/// quarter of one core.
const BUSY_TICKS: u64 = 5;

/// CPU time used so far by `pid` and its descendants, in clock ticks (user and system).
fn family_cpu_ticks(pid: i32) -> u64 {
    family(pid)
        .into_iter()
        .filter_map(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            // After `(comm)`: state is field 3, utime 14 and stime 15.
            let mut f = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
            let utime: u64 = f.next()?.parse().ok()?;
            let stime: u64 = f.next()?.parse().ok()?;
            Some(utime + stime)
        })
        .sum()
}

/// A std mutex's guard, whether or not a holder panicked.
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The resident memory of one process, from `VmRSS` in /proc (0 when it is gone).
fn rss_bytes(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

impl Drop for Paused {
    fn drop(&mut self) {
        match self {
            Paused::Signals(pids) => {
                for p in pids {
                    let _ = kill(Pid::from_raw(*p), Signal::SIGCONT);
                }
            }
            Paused::Cgroup(cg) => {
                if let Err(e) = cg.thaw() {
                    tracing::error!(error = %e, cgroup = %cg.dir().display(), "cannot thaw the agent's cgroup");
                }
            }
        }
    }
}

/// `pid` and its descendants, from the parent pids in /proc.
fn family(pid: i32) -> Vec<i32> {
    let parents: Vec<(i32, i32)> = std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| {
                    let p: i32 = e.file_name().to_str()?.parse().ok()?;
                    let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
                    // `pid (comm) state ppid …`: comm may hold spaces and parentheses.
                    let ppid = stat
                        .rsplit_once(')')?
                        .1
                        .split_whitespace()
                        .nth(1)?
                        .parse()
                        .ok()?;
                    Some((p, ppid))
                })
                .collect()
        })
        .unwrap_or_default();
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let parent = out[i];
        out.extend(
            parents
                .iter()
                .filter(|(p, pp)| *pp == parent && !out.contains(p))
                .map(|(p, _)| *p)
                .collect::<Vec<_>>(),
        );
        i += 1;
    }
    out
}

pub(crate) fn open_log(path: &std::path::Path) -> std::io::Result<(std::fs::File, std::fs::File)> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    let err = out.try_clone()?;
    Ok((out, err))
}

/// Why a delivery failed when the agent did not answer (it is gone, it refused the connection,
/// or it did not answer in time): the agent's log says more.
const NO_ANSWER: &str = "the agent did not answer: error sending request for url (agent)";

const SECRET_TOKEN: hyper::header::HeaderName =
    hyper::header::HeaderName::from_static("x-telegram-bot-api-secret-token");

#[cfg(test)]
mod tests {
    use super::family;

    #[test]
    fn family_finds_children_in_other_process_groups() {
        use std::os::unix::process::CommandExt;
        let mut child = std::process::Command::new("sh")
            .args(["-c", "setsid sleep 30 & sleep 30 & wait"])
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while family(pid).len() < 3 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let found = family(pid);
        for p in &found {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*p),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = child.wait();
        assert_eq!(found[0], pid);
        assert_eq!(
            found.len(),
            3,
            "the shell, its sleep, and the sleep in a session of its own: {found:?}"
        );
    }
}
