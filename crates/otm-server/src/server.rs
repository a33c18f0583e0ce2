//! Starting and stopping a whole server: backends opened, listeners bound, loops spawned.

use crate::app::App;
use crate::config::Settings;
use crate::listen::{self, ListenerLimits};
use crate::wake::Waker;
use crate::{admin, console, dispatch, egress, ingress, orchestrator};
use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::http::StatusCode;
use otm_core::Secret;
use otm_runtime::{LocalRuntime, LocalRuntimeConfig, SandboxMode};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Setting(#[from] crate::config::InvalidSetting),
    #[error("cannot bind the {listener} listener on {addr}")]
    Bind {
        listener: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot use the data directory {path}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Backend(#[from] otm_core::Error),
    #[error(transparent)]
    SecretKeys(#[from] otm_store::secrets::KeyFileError),
}

/// A running server.
#[derive(Debug)]
pub struct Server {
    pub public_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub egress_addr: SocketAddr,
    pub app: Arc<App>,
    tasks: Vec<JoinHandle<()>>,
}

/// The admin token: `OTM_ADMIN_TOKEN` when given, else `<data-dir>/admin.token`, created with mode
/// 0600 on first start.
pub fn admin_token(data_dir: &Path, given: Option<Secret>) -> std::io::Result<Secret> {
    if let Some(t) = given {
        return Ok(t);
    }
    let path = data_dir.join("admin.token");
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => Ok(Secret::new(s.trim())),
        _ => {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let token = Secret::random();
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .mode(0o600)
                .open(&path)?;
            f.write_all(token.expose().as_bytes())?;
            f.sync_all()?;
            Ok(token)
        }
    }
}

/// Starts everything `otm server --role all` runs. `admin_token` overrides the token file.
pub async fn start(
    settings: Settings,
    admin_token_given: Option<Secret>,
) -> Result<Server, StartError> {
    start_with_registry(settings, admin_token_given, |registry| registry).await
}

/// [`start`], with the registry backend passed through `wrap` before the server uses it (tests
/// wrap it in an [`otm_store::Faulty`] to make it fail on demand).
pub async fn start_with_registry(
    settings: Settings,
    admin_token_given: Option<Secret>,
    wrap: impl FnOnce(Arc<dyn otm_core::Registry>) -> Arc<dyn otm_core::Registry>,
) -> Result<Server, StartError> {
    let listeners = settings.validate()?;
    let caps = ListenerLimits::for_descriptors(listen::raise_nofile());
    let data_dir = settings.data_dir.clone();
    let dd_err = |source| StartError::DataDir {
        path: data_dir.display().to_string(),
        source,
    };
    // Everything otm writes is private to its user unless said otherwise: the data directory is
    // 0700 (0711, traversable but not listable, when instances run as uids of their own and
    // must reach their directories in it), and every file otm keeps in it 0600.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    std::fs::create_dir_all(&data_dir).map_err(dd_err)?;
    let data_dir = std::path::absolute(&data_dir).map_err(dd_err)?;
    make_private(&data_dir).map_err(dd_err)?;
    // Archives a crashed process left on their way in or out.
    match crate::spool::clear(&data_dir) {
        Ok(0) => {}
        Ok(n) => tracing::info!(files = n, "removed spool files left by an earlier run"),
        Err(e) => tracing::warn!(error = %e, "cannot clear the spool directory"),
    }
    let token = admin_token(&data_dir, admin_token_given).map_err(dd_err)?;

    let registry_url = settings
        .registry
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}", data_dir.join("otm.db").display()));
    let coordinator_url = settings
        .coordinator
        .clone()
        .unwrap_or_else(|| "memory".into());
    let state_url = settings
        .state
        .clone()
        .unwrap_or_else(|| format!("file://{}", data_dir.join("state").display()));
    // The key file: given, or generated into the data directory on first start.
    let keys = Arc::new(match &settings.secret_key_file {
        Some(path) => otm_store::SecretKeys::load_or_create(path, false)?,
        None => otm_store::SecretKeys::load_or_create(&data_dir.join("secret.key"), true)?,
    });
    if let Some(path) = &settings.secret_key_file {
        warn_if_readable_by_others(path);
    }
    // Every registry stores tenants' secrets encrypted and no shim token; every cached endpoint is
    // signed, holds no shim token, and is checked before use.
    // Every call is counted and timed for /metrics.
    let registry_calls = otm_store::RegistryMetrics::default();
    let backend =
        wrap(otm_store::open::open_registry_metered(&registry_url, &registry_calls).await?);
    let registry = Arc::new(otm_store::SealedRegistry::new(
        Arc::new(otm_store::Metered::new(backend, registry_calls.clone())),
        keys.clone(),
    ));
    let coordinator: Arc<dyn otm_core::Coordinator> = Arc::new(otm_store::SignedCoordinator::new(
        otm_store::open::open_coordinator(&coordinator_url).await?,
        keys,
    ));
    let state = otm_store::open::open_state_store(&state_url).await?;

    let otm_binary = match &settings.otm_binary {
        Some(p) => p.clone(),
        None => std::env::current_exe().map_err(dd_err)?,
    };
    let sandbox = match settings.sandbox {
        crate::config::Sandbox::Bubblewrap => SandboxMode::Bubblewrap,
        crate::config::Sandbox::None => SandboxMode::None,
        crate::config::Sandbox::Auto => SandboxMode::Auto,
    };
    // Instances reach the egress proxy through a socket in this directory only (they have no
    // other network).
    let egress_dir = data_dir.join("run");
    let local = settings.runtime == crate::config::RuntimeKind::Local;
    let egress_unix = if settings.runs_orchestrator() && local {
        Some(bind_egress_socket(&egress_dir).map_err(dd_err)?)
    } else {
        None
    };
    let runtime: Arc<dyn otm_core::Runtime> = if settings.runs_orchestrator() && !local {
        let client = otm_runtime::kube::KubeRuntime::client_from_env().await?;
        let cfg = settings.kube_config(client.default_namespace())?;
        if settings.egress_url.is_none() {
            tracing::warn!(
                "--runtime kube without --egress-url: pods are told this process's own egress address, which only pods on this machine can reach; set it to otm's egress Service"
            );
        }
        Arc::new(otm_runtime::kube::KubeRuntime::new(client, cfg).await?)
    } else if settings.runs_orchestrator() {
        // An OpenClaw installation is shown read-only inside the sandboxes.
        let read_only = crate::openclaw::locate(&settings)
            .map(|i| i.read_only)
            .unwrap_or_default();
        Arc::new(LocalRuntime::new(LocalRuntimeConfig {
            data_dir: data_dir.clone(),
            otm_binary,
            sandbox,
            read_only,
            egress_dir: Some(egress_dir.clone()),
            uid_base: settings.sandbox_uid_base,
            favor_dynmods: settings.cgroup_favordynmods,
        })?)
    } else {
        Arc::new(crate::remote::NoRuntime)
    };

    let bind = |listener: &'static str, addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind {
                listener,
                addr,
                source,
            })
    };
    let public = bind("public", listeners.public).await?;
    let admin = bind("admin", listeners.admin).await?;
    let egress = bind("egress", listeners.egress).await?;
    let public_addr = public.local_addr().map_err(dd_err)?;
    let admin_addr = admin.local_addr().map_err(dd_err)?;
    let egress_addr = egress.local_addr().map_err(dd_err)?;
    let egress_url = settings.egress_url.clone().unwrap_or_else(|| {
        let ip = if egress_addr.ip().is_unspecified() {
            "127.0.0.1".to_owned()
        } else {
            egress_addr.ip().to_string()
        };
        format!("http://{ip}:{}", egress_addr.port())
    });

    let shutdown = CancellationToken::new();
    // The waker is chosen once, from the role: routers ask the orchestrators.
    let orchestrators = (settings.role == crate::config::Role::Router).then(|| {
        (
            settings.orchestrator_urls(),
            settings
                .service_token
                .clone()
                .unwrap_or_else(|| otm_core::Secret::new("")),
            Duration::from_secs(settings.wake_timeout_s + 30),
        )
    });
    let make_waker = move |me: std::sync::Weak<App>, http: &reqwest::Client| -> Arc<dyn Waker> {
        match orchestrators {
            Some((urls, token, timeout)) => Arc::new(crate::remote::OrchestratorClient::new(
                urls,
                token,
                http.clone(),
                timeout,
            )),
            None => Arc::new(crate::orchestrator::Local::new(me)),
        }
    };
    let app = App::new(
        settings,
        registry,
        coordinator,
        state,
        runtime,
        egress_url,
        token,
        shutdown.clone(),
        crate::clock::Clock::system(),
        make_waker,
    );
    app.metrics().register_registry_calls(&registry_calls);
    let role = app.settings().role;

    let mut tasks = Vec::new();
    // Every role answers /healthz and /metrics; the public listener takes webhooks only on
    // routers, the admin API lives on orchestrators, and both serve the Bot API proxy (agents
    // are pointed at their orchestrator's, or at --egress-url).
    // Each listener has its own connection cap, so that idle connections to one (the egress
    // listener is reachable by every agent) cannot use up the descriptors webhooks need.
    let refused_app = app.clone();
    let metrics: Option<listen::OnRefused> = Some(Arc::new(move |listener: &'static str| {
        refused_app.metrics().connection_refused(listener)
    }));
    tasks.push(listen::serve(
        "public",
        public,
        public_router(app.clone()),
        caps.public,
        metrics.clone(),
        shutdown.clone(),
    ));
    tasks.push(listen::serve(
        "admin",
        admin,
        admin_router(app.clone()),
        caps.admin,
        metrics.clone(),
        shutdown.clone(),
    ));
    tasks.push(listen::serve(
        "egress",
        egress,
        egress_router(app.clone()),
        caps.egress,
        metrics.clone(),
        shutdown.clone(),
    ));
    if let Some(unix) = egress_unix {
        tasks.push(listen::serve(
            "egress-socket",
            unix,
            egress_router(app.clone()),
            caps.egress,
            metrics,
            shutdown.clone(),
        ));
    }
    // The orchestrator asks for deliveries (an instance came up or died with updates waiting)
    // through this channel rather than calling into dispatch.
    tasks.push(tokio::spawn(dispatch::run_delivery_requests(app.clone())));
    if app.settings().runs_orchestrator() {
        if let Err(e) = orchestrator::reconcile(&app).await {
            tracing::warn!(error = %e, "first reconcile pass failed");
        }
        tasks.push(tokio::spawn(orchestrator::run_reaper(app.clone())));
        tasks.push(tokio::spawn(orchestrator::run_reconciler(app.clone())));
        tasks.push(tokio::spawn(orchestrator::run_leader_election(app.clone())));
        tasks.push(tokio::spawn(orchestrator::run_warm_pool(app.clone())));
        tasks.push(tokio::spawn(orchestrator::run_periodic_snapshots(
            app.clone(),
        )));
    }
    if app.settings().runs_router() {
        tasks.push(tokio::spawn(dispatch::run_sweeper(app.clone())));
        tasks.push(tokio::spawn(dispatch::run_notifications(app.clone())));
        // Inboxes left pending by an earlier run are drained at once.
        if let Ok(pending) = app.registry().inbox_pending_tenants().await {
            for t in pending {
                dispatch::kick(&app, &t);
            }
        }
    }
    tracing::info!(%role, %public_addr, %admin_addr, %egress_addr, runtime = app.runtime().name(), isolation = %app.runtime().isolation(), "otm server started");
    Ok(Server {
        public_addr,
        admin_addr,
        egress_addr,
        app,
        tasks,
    })
}

/// The public router behind its middleware, outermost first. The connection-level limits of
/// every listener (header-read timeout, connection cap) are applied where connections are
/// accepted ([`crate::listen`]); these layers are per request.
fn public_router(app: Arc<App>) -> Router {
    ingress::router(app).layer(
        ServiceBuilder::new()
            // A span per request, with its method and path, and its outcome at debug level.
            .layer(traced("public"))
            // Errors of the layers below become 503, which Telegram retries.
            .layer(HandleErrorLayer::new(|_: tower::BoxError| async {
                StatusCode::SERVICE_UNAVAILABLE
            }))
            // Over the limit, refuse at once rather than queue webhooks behind a slow store.
            .load_shed()
            // Webhooks handled at once: the largest of the listeners' limits.
            .concurrency_limit(PUBLIC_CONCURRENCY)
            // A stuck store cannot hold a webhook (and its connection) for longer than this.
            .timeout(Duration::from_secs(30)),
    )
}

/// A `TraceLayer` whose spans name the listener and the request's method, and on the public
/// and admin listeners its path; the egress listener's paths carry surrogate tokens and are
/// never recorded.
fn traced(
    listener: &'static str,
) -> tower_http::trace::TraceLayer<
    tower_http::classify::SharedClassifier<tower_http::classify::ServerErrorsAsFailures>,
    impl Fn(&axum::http::Request<axum::body::Body>) -> tracing::Span + Clone,
> {
    tower_http::trace::TraceLayer::new_for_http().make_span_with(
        move |req: &axum::http::Request<axum::body::Body>| {
            let path = if listener == "egress" {
                ""
            } else {
                req.uri().path()
            };
            tracing::debug_span!("request", listener, method = %req.method(), path)
        },
    )
}

/// Requests handled at once on each listener. The public listener's is the largest, and each
/// listener sheds its own excess, so that admin or egress load cannot take what webhooks need.
const PUBLIC_CONCURRENCY: usize = 4096;
const ADMIN_CONCURRENCY: usize = 64;
const EGRESS_CONCURRENCY: usize = 512;

/// What a layer's error (shed, timed out) becomes.
async fn layer_error(e: tower::BoxError) -> StatusCode {
    if e.is::<tower::timeout::error::Elapsed>() {
        StatusCode::GATEWAY_TIMEOUT
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// The admin listener's router (the admin API, and the web console when it is served) behind
/// its middleware, outermost first.
fn admin_router(app: Arc<App>) -> Router {
    // A wake answers when the agent is ready: the longest an admin call may take.
    let timeout = Duration::from_secs(app.settings().wake_timeout_s + 60);
    let api = admin::router(app.clone());
    let routes = match console::router(app) {
        Some(console) => api.merge(console),
        None => api,
    };
    routes.layer(
        ServiceBuilder::new()
            // A span per request, with its method and route, and its outcome at debug level.
            .layer(traced("admin"))
            // Errors of the layers below become answers: 503 when shed, 504 when timed out.
            .layer(HandleErrorLayer::new(layer_error))
            // Over the limit, refuse at once: an operator retries, a queue would only grow.
            .load_shed()
            // Operators, the CLI, dashboards and Prometheus need few calls at once.
            .concurrency_limit(ADMIN_CONCURRENCY)
            // Until the answer's head (streamed logs and exports go on after it).
            .timeout(timeout),
    )
}

/// The egress router behind its middleware, outermost first. Each tenant also has a cap on its
/// calls under way, and request bodies share one buffer budget (see [`egress`]).
fn egress_router(app: Arc<App>) -> Router {
    egress::router(app).layer(
        ServiceBuilder::new()
            // A span per request (never its path: it holds the caller's surrogate token).
            .layer(traced("egress"))
            // Errors of the layers below become answers: 503 when shed, 504 when timed out.
            .layer(HandleErrorLayer::new(layer_error))
            // Over the limit, refuse at once: agents' Bot API and model clients retry.
            .load_shed()
            // Calls under way on this listener (Bot API calls waiting for their rate-limit
            // slot included).
            .concurrency_limit(EGRESS_CONCURRENCY)
            // Until the answer's head: as long as a model may take, since non-streamed
            // answers come whole (streams go on after it).
            .timeout(crate::model_proxy::TIMEOUT + Duration::from_secs(10))
            // Bodies over the egress cap are refused from their Content-Length before anything
            // is read, and cut off when they grow past it.
            .layer(axum::middleware::from_fn(cap_body)),
    )
}

/// Refuses a body declared larger than [`crate::surrogate::MAX_BODY`] and bounds one that is not declared.
async fn cap_body(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let declared = req
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > crate::surrogate::MAX_BODY as u64) {
        return (StatusCode::PAYLOAD_TOO_LARGE, "request body too large").into_response();
    }
    let req = req.map(|b| {
        axum::body::Body::new(http_body_util::Limited::new(b, crate::surrogate::MAX_BODY))
    });
    next.run(req).await
}

/// Binds this server's egress socket in `dir` (`egress-<pid>.sock`; several servers may share a
/// data directory), after removing sockets nobody answers on any more. Instances run as other
/// uids and see only this directory (shown in their sandboxes), so its sockets are connectable
/// by anyone who can reach them; the data directory above is not listable.
fn bind_egress_socket(dir: &Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    for e in std::fs::read_dir(dir)?.flatten() {
        if e.file_name().to_str().is_some_and(|n| n.ends_with(".sock"))
            && std::os::unix::net::UnixStream::connect(e.path()).is_err()
        {
            let _ = std::fs::remove_file(e.path());
        }
    }
    // Bound under a name the sweep above skips and renamed into place once listening: a server
    // starting beside this one must not take the socket for a dead one between bind and listen.
    let pid = std::process::id();
    let path = dir.join(format!("egress-{pid}.sock"));
    let binding = dir.join(format!("egress-{pid}.binding"));
    let _ = std::fs::remove_file(&binding);
    let listener = tokio::net::UnixListener::bind(&binding)?;
    std::fs::set_permissions(&binding, std::fs::Permissions::from_mode(0o666))?;
    std::fs::rename(&binding, &path)?;
    Ok(listener)
}

/// Makes what otm keeps in the data directory private to its user, whatever an older version or
/// the umask left: the directory itself 0700 (the local runtime opens it to 0711 when instances
/// run as uids of their own), files at its top (the registry, its WAL and shared memory, the
/// admin token, the key file) 0600, and the local state store's snapshots and the spool
/// directory, all the way down, 0700 for directories and 0600 for files. What instances use
/// (`instances`, `run`, `sandbox`, `runtime`) is the runtime's to set.
fn make_private(data_dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let set = |path: &Path, m: &std::fs::Metadata, mode: u32| {
        if m.permissions().mode() & 0o777 != mode
            && let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        {
            tracing::warn!(path = %path.display(), error = %e, "cannot make a file private");
        }
    };
    set(data_dir, &std::fs::symlink_metadata(data_dir)?, 0o700);
    for e in std::fs::read_dir(data_dir)?.flatten() {
        let Ok(m) = e.path().symlink_metadata() else {
            continue;
        };
        if m.is_file() {
            set(&e.path(), &m, 0o600);
        } else if m.is_dir() && matches!(e.file_name().to_str(), Some("state" | "spool")) {
            private_tree(&e.path(), &set);
        }
    }
    Ok(())
}

/// Directories 0700 and files 0600 under `dir`, symbolic links left alone.
fn private_tree(dir: &Path, set: &dyn Fn(&Path, &std::fs::Metadata, u32)) {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(m) = d.symlink_metadata() {
            set(&d, &m, 0o700);
        }
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() {
                set(&e.path(), &m, 0o600);
            }
        }
    }
}

/// A key file others can read is used, and said so.
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(path)
        && m.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(file = %path.display(), mode = format!("{:o}", m.permissions().mode() & 0o777), "the secret key file can be read by other users; chmod 600 it");
    }
}

impl Server {
    /// The admin token.
    pub fn admin_token(&self) -> &Secret {
        self.app.admin_token()
    }

    /// Stops accepting, lets work drain for up to `grace`, and ends every loop. Instances keep
    /// running unless `stop_instances` (the next start adopts them).
    pub async fn shutdown(self, grace: Duration, stop_instances: bool) {
        self.app.shutdown().cancel();
        // One deadline for everything: the listeners and loops, then the tenants' tasks
        // (dispatchers end their delivery and release their leases; idle stops finish).
        let deadline = tokio::time::Instant::now() + grace;
        let drain = futures::future::join_all(self.tasks);
        let _ = tokio::time::timeout_at(deadline, drain).await;
        if !self.app.drain_tasks(deadline).await {
            tracing::warn!("tasks still running at the end of the grace period were cut off");
        }
        if stop_instances {
            let tenants: Vec<_> = self
                .app
                .registry()
                .list_instances()
                .await
                .unwrap_or_default()
                .into_iter()
                .filter_map(|i| i.tenant)
                .collect();
            let stops = tenants
                .iter()
                .map(|t| orchestrator::stop(&self.app, t, "shutdown"));
            let _ = tokio::time::timeout(grace, futures::future::join_all(stops)).await;
            for rec in self
                .app
                .registry()
                .list_instances()
                .await
                .unwrap_or_default()
            {
                let _ = self.app.runtime().delete(&rec.id).await;
                let _ = self.app.registry().delete_instance(&rec.id).await;
            }
        }
    }
}
