//! The control API served by `otm shim` inside an instance.

use crate::agent::{Agent, AgentState};
use crate::archive;
use crate::pipe;
use crate::profile::{self, AgentProfile, LaunchInputs};
use crate::sandbox::Prestarted;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use futures::StreamExt;
use otm_core::Secret;
use otm_core::admin_api::{ErrorBody, ErrorCode};
use otm_core::shim_api::{
    BindRequest, BindResponse, FreezeResponse, ShimStatus, StopRequest, StopResponse,
};
use serde::Deserialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

/// Largest state archive accepted by `PUT /v1/state`, compressed.
const MAX_ARCHIVE: u64 = 1 << 30;

/// How the shim is started.
#[derive(Clone, Debug)]
pub struct ShimConfig {
    /// The instance id, for status and logs.
    pub instance: String,
    /// The instance directory: `state/` for the agent, `agent.log`, `tmp/`.
    pub dir: PathBuf,
    /// `unix:/path/to/socket`, `tcp:host:port`, or `stdin` for a listening Unix socket handed
    /// over as standard input (the local runtime's way: the socket file lives where no instance
    /// can reach it).
    pub listen: String,
    /// The token every call must carry.
    pub token: Secret,
    /// otm's egress proxy as a Unix socket. When given, the shim serves a loopback TCP forwarder
    /// to it and points the agent's Bot API root and model URL there (the instance has no other
    /// network).
    pub egress: Option<PathBuf>,
    /// Start agents in a sandbox of their own (inside the instance sandbox).
    pub agent_sandbox: Option<Arc<crate::sandbox::AgentSandbox>>,
    /// After SIGTERM, how long a bound shim keeps serving so that the orchestrator can stop its
    /// agent and take the final snapshot (a pod being evicted); zero: stop at once.
    pub term_grace: Duration,
}

/// How long a shim whose agent was stopped after SIGTERM still serves, for the final snapshot.
const SNAPSHOT_WINDOW: Duration = Duration::from_secs(10);

struct Bound {
    tenant: otm_core::TenantId,
    profile: AgentProfile,
    agent: Agent,
}

struct Shim {
    config: ShimConfig,
    bound: Mutex<Option<Bound>>,
    /// `http://127.0.0.1:<port>` of the egress forwarder, when there is one.
    egress_root: Option<String>,
    /// Told when the agent has been stopped through the control API.
    agent_stopped: tokio::sync::Notify,
    /// The agent's sandbox, being made (or made) while the instance waits for its tenant; the
    /// first bind takes it.
    prestarting: Mutex<Option<tokio::task::JoinHandle<std::io::Result<Prestarted>>>>,
}

impl Shim {
    fn state_dir(&self) -> PathBuf {
        self.config.dir.join("state")
    }
    fn log_path(&self) -> PathBuf {
        self.config.dir.join("agent.log")
    }
    /// What the agent may write: its state, scratch and home directories.
    fn agent_writable(&self) -> Vec<PathBuf> {
        agent_writable(&self.config.dir)
    }
}

/// What the agent of the instance directory `dir` may write: its state, scratch and home
/// directories.
fn agent_writable(dir: &Path) -> Vec<PathBuf> {
    vec![dir.join("state"), dir.join("tmp"), dir.join("home")]
}

/// Makes the agent's sandbox ahead of the bind that needs it: the agent's start then pays for
/// no namespace and no mount. Whatever the profile, it shows the agent's writable directories
/// and [`profile::CONFIG_DIR`] read-only; a launch that needs more gets a sandbox of its own.
fn prestart(shim: &ShimConfig) -> Option<tokio::task::JoinHandle<std::io::Result<Prestarted>>> {
    let sandbox = shim.agent_sandbox.clone()?;
    let config = shim.dir.join(profile::CONFIG_DIR);
    let workdir = shim.dir.join("state");
    let writable = agent_writable(&shim.dir);
    let log = shim.dir.join("agent.log");
    Some(tokio::spawn(async move {
        std::fs::create_dir_all(&config)?;
        let (out, _) = crate::agent::open_log(&log)?;
        let made = sandbox
            .prestart(&workdir, &writable, &[config], out)
            .await?;
        tracing::debug!(
            ms = made.took.as_secs_f64() * 1e3,
            "agent sandbox made ahead"
        );
        Ok(made)
    }))
}

/// Serves the control API until `terminated` (the process's SIGTERM, which `main` watches) or
/// `shutdown`, then stops the agent gracefully.
pub async fn run(
    config: ShimConfig,
    shutdown: CancellationToken,
    terminated: CancellationToken,
) -> std::io::Result<()> {
    std::fs::create_dir_all(config.dir.join("state"))?;
    std::fs::create_dir_all(config.dir.join("tmp"))?;
    // First, so that the agent's sandbox is under way while the rest starts.
    let prestarting = prestart(&config);
    let egress_root = match &config.egress {
        Some(socket) => Some(crate::forward::start(socket.clone(), shutdown.clone()).await?),
        None => None,
    };
    let shim = Arc::new(Shim {
        config: config.clone(),
        bound: Mutex::new(None),
        egress_root,
        agent_stopped: tokio::sync::Notify::new(),
        prestarting: Mutex::new(prestarting),
    });
    let app = router(shim.clone());

    let stop = shutdown.clone();
    let on_term = shim.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = terminated.cancelled() => {}
            _ = stop.cancelled() => return,
        }
        // A bound instance being removed (an evicted pod): serve on until the orchestrator has
        // stopped the agent and fetched the final snapshot, within the grace.
        let grace = on_term.config.term_grace;
        if !grace.is_zero() && on_term.bound.lock().await.is_some() {
            tracing::info!(
                grace_s = grace.as_secs(),
                "SIGTERM: serving on for the final snapshot"
            );
            let deadline = tokio::time::Instant::now() + grace;
            let stopped = tokio::time::timeout_at(deadline, on_term.agent_stopped.notified()).await;
            if stopped.is_ok() {
                tokio::time::sleep_until(
                    deadline.min(tokio::time::Instant::now() + SNAPSHOT_WINDOW),
                )
                .await;
            }
        }
        stop.cancel();
    });

    let served = shutdown.clone();
    if config.listen == "stdin" {
        let fd = nix::unistd::dup(std::io::stdin())?;
        let listener = std::os::unix::net::UnixListener::from(fd);
        listener.set_nonblocking(true)?;
        let listener = tokio::net::UnixListener::from_std(listener)?;
        tracing::info!(instance = %config.instance, "shim listening on its inherited socket");
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { served.cancelled().await })
            .await?;
    } else if let Some(path) = config.listen.strip_prefix("unix:") {
        let _ = std::fs::remove_file(path);
        let listener = tokio::net::UnixListener::bind(path)?;
        set_mode(path, 0o600)?;
        tracing::info!(instance = %config.instance, listen = %config.listen, "shim listening");
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { served.cancelled().await })
            .await?;
    } else if let Some(addr) = config.listen.strip_prefix("tcp:") {
        let listener = tokio::net::TcpListener::bind(tcp_addr(addr)?).await?;
        tracing::info!(instance = %config.instance, listen = %listener.local_addr()?, "shim listening");
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { served.cancelled().await })
            .await?;
    } else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "listen address `{}` must start with unix: or tcp:",
                config.listen
            ),
        ));
    }
    if let Some(bound) = shim.bound.lock().await.take() {
        bound.agent.stop(None).await;
    }
    Ok(())
}

fn set_mode(path: &str, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

fn router(shim: Arc<Shim>) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        // Streamed and counted against MAX_ARCHIVE by the handler itself.
        .route("/v1/state", put(restore))
        .route("/v1/bind", post(bind))
        .route(
            "/v1/deliver",
            post(deliver).layer(DefaultBodyLimit::max(2 << 20)),
        )
        .route("/v1/snapshot", get(snapshot))
        .route("/v1/stop", post(stop))
        .route("/v1/freeze", post(freeze))
        .route("/v1/thaw", post(thaw))
        .route("/v1/logs", get(logs))
        // Every route requires the instance token.
        .layer(middleware::from_fn_with_state(shim.clone(), authorize))
        .with_state(shim)
}

async fn authorize(
    State(shim): State<Arc<Shim>>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    let presented = headers
        .get(otm_core::shim_api::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(t) if shim.config.token.matches(t) => next.run(req).await,
        _ => error(StatusCode::UNAUTHORIZED, "missing or wrong instance token"),
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        Json(ErrorBody::new(
            ErrorCode::from_status(status.as_u16()),
            message,
        )),
    )
        .into_response()
}

#[tracing::instrument(name = "shim_api", skip_all, level = "debug", fields(instance = %shim.config.instance, call = "status"))]
async fn status(State(shim): State<Arc<Shim>>) -> Json<ShimStatus> {
    let bound = shim.bound.lock().await;
    let (tenant, profile, agent, pid, restarts, frozen, memory) = match &*bound {
        None => (None, None, "unbound".to_owned(), None, 0, false, None),
        Some(b) => {
            let st = b.agent.state();
            let a = b.agent.clone();
            let memory = tokio::task::spawn_blocking(move || a.memory_bytes())
                .await
                .ok()
                .flatten();
            (
                Some(b.tenant.clone()),
                Some(b.profile.name.to_owned()),
                st.name().to_owned(),
                st.pid(),
                b.agent.restarts(),
                b.agent.is_frozen(),
                memory,
            )
        }
    };
    Json(ShimStatus {
        instance: shim.config.instance.clone(),
        tenant,
        profile,
        agent,
        agent_pid: pid,
        restarts,
        frozen,
        memory_bytes: memory,
    })
}

/// Unpacks the archive in the body as it arrives, on a blocking thread fed through a channel,
/// within the archive caps; the body is refused past [`MAX_ARCHIVE`] bytes.
#[tracing::instrument(name = "shim_api", skip_all, fields(instance = %shim.config.instance, call = "restore"))]
async fn restore(State(shim): State<Arc<Shim>>, body: Body) -> Response {
    let bound = shim.bound.lock().await;
    if bound.is_some() {
        return error(
            StatusCode::CONFLICT,
            "the instance is bound; state can only be restored before bind",
        );
    }
    let dir = shim.state_dir();
    let (tx, rx) = pipe::channel();
    let unpacking = tokio::task::spawn_blocking(move || {
        archive::unpack(pipe::Reader::new(rx), &dir, &archive::Caps::default()).map(drop)
    });
    let mut body = body.into_data_stream();
    let mut received: u64 = 0;
    // Once unpacking stopped (it failed), the rest of the body is read and dropped, so the
    // caller gets the answer rather than a broken connection.
    let mut feeding = Some(tx);
    while let Some(chunk) = body.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                if let Some(tx) = feeding.take() {
                    let _ = tx
                        .send(Err(std::io::Error::other(format!(
                            "the archive's upload broke off: {e}"
                        ))))
                        .await;
                }
                break;
            }
        };
        received += chunk.len() as u64;
        if received > MAX_ARCHIVE {
            if let Some(tx) = feeding.take() {
                let _ = tx
                    .send(Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("the archive is larger than {MAX_ARCHIVE} bytes"),
                    )))
                    .await;
            }
            break;
        }
        if let Some(tx) = &feeding
            && tx.send(Ok(chunk)).await.is_err()
        {
            feeding = None;
        }
    }
    drop(feeding);
    match unpacking.await {
        Ok(Ok(())) => StatusCode::NO_CONTENT.into_response(),
        Ok(Err(e)) => error(
            StatusCode::BAD_REQUEST,
            format!("cannot unpack the state archive: {e}"),
        ),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[tracing::instrument(name = "shim_api", skip_all, fields(instance = %shim.config.instance, call = "bind"))]
async fn bind(State(shim): State<Arc<Shim>>, Json(req): Json<BindRequest>) -> Response {
    let begun = Instant::now();
    let mut bound = shim.bound.lock().await;
    if let Some(b) = &*bound {
        if b.tenant != req.tenant {
            return error(
                StatusCode::CONFLICT,
                format!("the instance is bound to another tenant ({})", b.tenant),
            );
        }
        // Binding the same tenant again is a no-op once the agent is up.
        return match b.agent.wait_ready(b.profile.ready_timeout).await {
            Ok(pid) => Json(BindResponse {
                agent_pid: Some(pid),
                start_ms: 0,
                ready_ms: 0,
            })
            .into_response(),
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
        };
    }
    let Some(profile) = profile::profile(&req.profile) else {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "unknown agent profile `{}`; this build knows {:?}",
                req.profile,
                profile::known_profiles()
            ),
        );
    };
    let port = match free_port() {
        Ok(p) => p,
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("no free port for the agent: {e}"),
            );
        }
    };
    let state_dir = shim.state_dir();
    let secret = Secret::random();
    // Inside a network namespace the agent reaches otm only through the forwarder.
    let (root, settings) = match &shim.egress_root {
        None => (req.bot_api_root.clone(), req.settings.clone()),
        Some(local) => {
            let given = req.bot_api_root.trim_end_matches('/');
            let settings = req
                .settings
                .iter()
                .map(|(k, v)| match v.strip_prefix(given) {
                    Some(rest) if !given.is_empty() => (k.clone(), format!("{local}{rest}")),
                    _ => (k.clone(), v.clone()),
                })
                .collect();
            (local.clone(), settings)
        }
    };
    let inputs = LaunchInputs {
        instance_dir: &shim.config.dir,
        state_dir: &state_dir,
        port,
        bot_api_root: &root,
        bot_token: &req.bot_token,
        webhook_secret: secret.expose(),
        settings: &settings,
    };
    let launch = match profile.render(&inputs) {
        Ok(l) => l,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let mut launch = launch;
    launch
        .env
        .entry("TMPDIR".into())
        .or_insert_with(|| shim.config.dir.join("tmp").display().to_string());
    // The egress policy `proxy`: web tools reach allowlisted hosts through otm's CONNECT proxy,
    // which knows the instance by its surrogate.
    if req.settings.get(profile::EGRESS_PROXY).map(String::as_str) == Some("1")
        && let Some(proxy) = connect_proxy(&root, &req.bot_token)
    {
        for k in [
            "HTTPS_PROXY",
            "https_proxy",
            "HTTP_PROXY",
            "http_proxy",
            "ALL_PROXY",
        ] {
            launch.env.insert(k.into(), proxy.clone());
        }
        for k in ["NO_PROXY", "no_proxy"] {
            launch
                .env
                .insert(k.into(), "127.0.0.1,localhost,::1".into());
        }
        launch.env.insert("NODE_USE_ENV_PROXY".into(), "1".into());
    }
    let writable = shim.agent_writable();
    let prestarted = match shim.prestarting.lock().await.take() {
        Some(making) => match making.await {
            Ok(Ok(made)) => Some(made),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "the agent sandbox made ahead failed; making another");
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "the agent sandbox made ahead failed; making another");
                None
            }
        },
        None => None,
    };
    let agent = Agent::start(
        profile.clone(),
        launch,
        state_dir,
        shim.log_path(),
        shim.config.agent_sandbox.clone(),
        writable,
        prestarted,
    );
    let start_ms = begun.elapsed().as_millis() as u64;
    let spawned = Instant::now();
    let ready = agent.wait_ready(profile.ready_timeout).await;
    let ready_ms = spawned.elapsed().as_millis() as u64;
    match ready {
        Ok(pid) => {
            tracing::info!(tenant = %req.tenant, profile = profile.name, start_ms, ready_ms, "bound");
            *bound = Some(Bound {
                tenant: req.tenant,
                profile,
                agent,
            });
            Json(BindResponse {
                agent_pid: Some(pid),
                start_ms,
                ready_ms,
            })
            .into_response()
        }
        Err(e) => {
            agent.stop(Some(Duration::from_secs(1))).await;
            let tail = tail_lines(&shim.log_path(), 20).unwrap_or_default();
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the agent did not become ready: {e}\n{tail}"),
            )
        }
    }
}

#[tracing::instrument(name = "shim_api", skip_all, fields(instance = %shim.config.instance, call = "deliver"))]
async fn deliver(State(shim): State<Arc<Shim>>, body: Bytes) -> Response {
    let agent = match &*shim.bound.lock().await {
        Some(b) => b.agent.clone(),
        None => {
            return error(
                StatusCode::CONFLICT,
                "the instance is not bound to a tenant",
            );
        }
    };
    // A delivery runs to completion even if the orchestrator goes away meanwhile.
    match tokio::spawn(async move { agent.deliver(body).await }).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Streams an archive of the state directory, packed on a blocking thread as the body is sent.
/// A failure before the first chunk is a 500 with the reason; a failure later aborts the body,
/// so the caller sees a broken transfer, never a short archive that looks whole.
#[tracing::instrument(name = "shim_api", skip_all, fields(instance = %shim.config.instance, call = "snapshot"))]
async fn snapshot(State(shim): State<Arc<Shim>>) -> Response {
    // A frozen agent is held by its freeze already; the snapshot's own hold keeps it so.
    let (skip, running): (Vec<&'static str>, Option<Agent>) = match &*shim.bound.lock().await {
        Some(b) => (
            b.profile.snapshot_skip.to_vec(),
            (b.profile.quiesce_snapshots || b.agent.is_frozen()).then(|| b.agent.clone()),
        ),
        None => (vec![], None),
    };
    let dir = shim.state_dir();
    let (tx, mut rx) = pipe::channel();
    let packing = tokio::task::spawn_blocking(move || {
        // A running agent that asks for it is paused while its files are read, and resumed when
        // `paused` drops, however packing ends (a caller that goes away ends it too).
        let paused = running.as_ref().and_then(Agent::pause);
        let began = Instant::now();
        let mut out = pipe::Writer::new(tx);
        let packed = archive::pack(&dir, &skip, &archive::Caps::default(), &mut out)
            .and_then(|summary| out.flush().map(|()| summary));
        if paused.is_some() {
            drop(paused);
            tracing::info!(
                paused_ms = began.elapsed().as_millis() as u64,
                "state packed while the agent was paused"
            );
        }
        match packed {
            Ok(summary) => {
                tracing::debug!(
                    entries = summary.entries,
                    bytes = summary.bytes,
                    "state packed"
                )
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot pack the state directory");
                out.fail(std::io::Error::other(format!(
                    "cannot pack the state directory: {e}"
                )));
            }
        }
    });
    let first = match rx.recv().await {
        Some(Ok(chunk)) => chunk,
        Some(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        None => {
            // No chunk and no error: the packing thread died.
            let why = match packing.await {
                Err(e) => e.to_string(),
                Ok(()) => "packing ended without an archive".to_owned(),
            };
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot pack the state directory: {why}"),
            );
        }
    };
    let rest = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let body = futures::stream::once(async move { Ok(first) }).chain(rest);
    (
        [("content-type", "application/zstd")],
        Body::from_stream(body),
    )
        .into_response()
}

#[tracing::instrument(name = "shim_api", skip_all, fields(instance = %shim.config.instance, call = "stop"))]
async fn stop(
    State(shim): State<Arc<Shim>>,
    body: Option<Json<StopRequest>>,
) -> Json<StopResponse> {
    let grace = body.and_then(|Json(b)| b.grace_s).map(Duration::from_secs);
    let agent = shim.bound.lock().await.as_ref().map(|b| b.agent.clone());
    let (exit_code, killed) = match agent {
        Some(a) => a.stop(grace).await,
        None => (None, false),
    };
    shim.agent_stopped.notify_waiters();
    Json(StopResponse { exit_code, killed })
}

/// Freezes the bound agent in place ([`Agent::freeze`]).
#[tracing::instrument(name = "shim_api", skip_all, fields(instance = %shim.config.instance, call = "freeze"))]
async fn freeze(State(shim): State<Arc<Shim>>) -> Response {
    let Some(agent) = shim.bound.lock().await.as_ref().map(|b| b.agent.clone()) else {
        return error(
            StatusCode::CONFLICT,
            "the instance is not bound to a tenant",
        );
    };
    let begun = Instant::now();
    let frozen = tokio::task::spawn_blocking(move || {
        let changed = agent.freeze()?;
        Ok::<_, String>((changed, agent.held_by(), agent.memory_bytes().unwrap_or(0)))
    })
    .await;
    match frozen {
        Ok(Ok((changed, method, memory_bytes))) => Json(FreezeResponse {
            frozen: true,
            changed,
            method: method.map(str::to_owned),
            memory_bytes,
            micros: begun.elapsed().as_micros() as u64,
        })
        .into_response(),
        Ok(Err(why)) => error(
            StatusCode::CONFLICT,
            format!("the agent cannot be frozen now: {why}"),
        ),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Thaws the bound agent; thawing one that is not frozen changes nothing.
#[tracing::instrument(name = "shim_api", skip_all, fields(instance = %shim.config.instance, call = "thaw"))]
async fn thaw(State(shim): State<Arc<Shim>>) -> Response {
    let Some(agent) = shim.bound.lock().await.as_ref().map(|b| b.agent.clone()) else {
        return error(
            StatusCode::CONFLICT,
            "the instance is not bound to a tenant",
        );
    };
    let begun = Instant::now();
    let method = agent.held_by();
    let changed = agent.thaw();
    let micros = begun.elapsed().as_micros() as u64;
    Json(FreezeResponse {
        frozen: false,
        changed,
        method: method.filter(|_| changed).map(str::to_owned),
        memory_bytes: 0,
        micros,
    })
    .into_response()
}

#[derive(Deserialize)]
struct LogsQuery {
    tail: Option<usize>,
    #[serde(default)]
    follow: bool,
}

#[tracing::instrument(name = "shim_api", skip_all, fields(instance = %shim.config.instance, call = "logs"))]
async fn logs(State(shim): State<Arc<Shim>>, Query(q): Query<LogsQuery>) -> Response {
    let path = shim.log_path();
    let tail = tail_lines(&path, q.tail.unwrap_or(200)).unwrap_or_default();
    if !q.follow {
        return ([("content-type", "text/plain; charset=utf-8")], tail).into_response();
    }
    let start = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let agent = shim.bound.lock().await.as_ref().map(|b| b.agent.clone());
    let stream = futures::stream::unfold(
        (path, start, Some(tail), agent),
        |(path, mut pos, first, agent)| async move {
            if let Some(first) = first {
                return Some((
                    Ok::<_, std::io::Error>(Bytes::from(first)),
                    (path, pos, None, agent),
                ));
            }
            loop {
                let len = tokio::fs::metadata(&path)
                    .await
                    .map(|m| m.len())
                    .unwrap_or(0);
                if len > pos {
                    let chunk = read_range(&path, pos, len).await.unwrap_or_default();
                    pos = len;
                    return Some((Ok(Bytes::from(chunk)), (path, pos, None, agent)));
                }
                if matches!(
                    agent.as_ref().map(|a| a.state()),
                    Some(AgentState::Stopped { .. })
                ) {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        },
    );
    (
        [("content-type", "text/plain; charset=utf-8")],
        Body::from_stream(stream),
    )
        .into_response()
}

async fn read_range(path: &std::path::Path, from: u64, to: u64) -> std::io::Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let mut f = tokio::fs::File::open(path).await?;
    f.seek(std::io::SeekFrom::Start(from)).await?;
    let mut buf = vec![0; (to - from) as usize];
    f.read_exact(&mut buf).await?;
    Ok(buf)
}

/// The last `n` lines of a file (reading at most its last 1 MiB).
pub fn tail_lines(path: &std::path::Path, n: usize) -> std::io::Result<String> {
    use std::io::{Read, Seek};
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let from = len.saturating_sub(1 << 20);
    f.seek(std::io::SeekFrom::Start(from))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().collect();
    let mut out = lines[lines.len().saturating_sub(n)..].join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    Ok(out)
}

/// The URL of otm's CONNECT proxy for an agent, with its surrogate token as the password. The
/// proxy is on otm's egress listener, at the host and port of the agent's Bot API root: the
/// forwarder's when there is one, else (in a pod) the root the bind request gave, such as otm's
/// egress Service. `None` when that root is not an `http://host:port[/...]` URL.
fn connect_proxy(bot_api_root: &str, bot_token: &str) -> Option<String> {
    let hostport = bot_api_root.strip_prefix("http://")?.split('/').next()?;
    if hostport.is_empty() {
        return None;
    }
    Some(format!(
        "http://otm:{}@{hostport}",
        bot_token.replace(':', "%3A")
    ))
}

/// A loopback port nobody listens on right now.
fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `host:port`, where host may be a bare IPv6 address (a pod's IP put in by `$(POD_IP)`).
fn tcp_addr(addr: &str) -> std::io::Result<std::net::SocketAddr> {
    if let Ok(a) = addr.parse() {
        return Ok(a);
    }
    let bad = || {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("`{addr}` is not an address like 0.0.0.0:7070"),
        )
    };
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    let ip: std::net::IpAddr = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .map_err(|_| bad())?;
    Ok(std::net::SocketAddr::new(
        ip,
        port.parse().map_err(|_| bad())?,
    ))
}

#[cfg(test)]
mod tests {
    use super::connect_proxy;

    #[test]
    fn the_connect_proxy_is_at_the_bot_api_roots_host_and_port() {
        // Behind the forwarder, as in the local runtime.
        assert_eq!(
            connect_proxy("http://127.0.0.1:41000", "42:abc").as_deref(),
            Some("http://otm:42%3Aabc@127.0.0.1:41000")
        );
        // In a pod: the egress Service the bind request named, path and all.
        assert_eq!(
            connect_proxy("http://otm-egress.otm.svc:8082/", "42:abc").as_deref(),
            Some("http://otm:42%3Aabc@otm-egress.otm.svc:8082")
        );
        assert_eq!(connect_proxy("https://api.telegram.org", "42:abc"), None);
        assert_eq!(connect_proxy("http:///bot", "42:abc"), None);
    }
}
