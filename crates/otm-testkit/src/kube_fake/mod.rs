//! A fake Kubernetes API server for tests: real HTTP, close enough to the real server that
//! kube-rs (`kube::Client`, `Api`, `watcher`, reflectors) and `kubectl` work against it
//! unchanged, and it runs the pods it is given as local processes.
//!
//! # Starting it
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use otm_testkit::kube_fake::{FakeApiServer, ProcessRunner};
//! let fake = FakeApiServer::builder()
//!     .token("test-token")                      // 401 for any other bearer token
//!     .runner(ProcessRunner::new().binary("otm", "/path/to/target/debug/otm"))
//!     .bookmark_interval(std::time::Duration::from_secs(1))
//!     .history_limit(1000)
//!     .start()
//!     .await?;
//! let kubeconfig = fake.write_kubeconfig(std::path::Path::new("kubeconfig"))?;
//! // kube-rs: KUBECONFIG=that file, or Config::from_custom_kubeconfig(Kubeconfig::read_from(..))
//! // kubectl: kubectl --kubeconfig that-file get pods
//! # Ok(()) }
//! ```
//! It listens on `127.0.0.1:0` ([`FakeApiServer::url`]) over plain HTTP and stops when the handle
//! is dropped; pod processes are killed then too.
//!
//! # What it serves
//! Discovery (`/api`, `/api/v1`, `/apis`, `/apis/{group}/{version}`, `/version`) and, for core/v1
//! `pods` (with `status`, `log` and `resize` subresources; a resize may change only the
//! containers' CPU and memory, keeps the QoS class, and shows in the container statuses at once), `secrets`, `events`, `services`, `configmaps`,
//! `namespaces`, `coordination.k8s.io/v1` `leases` and `events.k8s.io/v1` `events`: namespaced
//! collections (list, watch, create, deletecollection), objects (get, put, patch, delete), and
//! cluster-wide list and watch (`/api/v1/pods`). Objects are kept as JSON; objects may be created
//! in any namespace (it is created on the fly). Errors are `Status` objects with the real reasons
//! (`NotFound`, `AlreadyExists`, `Conflict`, `Expired`, `Invalid`, `Unauthorized`).
//!
//! - **Versions**: one global `resourceVersion` counter (decimal strings). Lists honour
//!   `resourceVersion` with `resourceVersionMatch` (`Exact` reconstructs the past from the
//!   history; 410 `Expired` when it is older), `limit` and `continue` (consistent at the first
//!   page's version), `labelSelector` (`=`, `==`, `!=`, `in`, `notin`, `key`, `!key`) and
//!   `fieldSelector` (`=`/`!=` on any dotted path, e.g. `metadata.name`, `status.phase`).
//! - **Watches** (`watch=1`/`true`): newline-delimited `{"type","object"}` events. Without a
//!   `resourceVersion` (or with `"0"`, or `sendInitialEvents=true`) the current objects come
//!   first as `ADDED`; with one, the later history is replayed. A version older than the kept
//!   history gets an `ERROR` event with a 410 `Expired` Status, as the real server sends it;
//!   [`FakeApiServer::compact_history`] forces that for every earlier version.
//!   `allowWatchBookmarks=true` gets a `BOOKMARK` every bookmark interval (default 1 s);
//!   `timeoutSeconds` ends the stream. Selectors apply: an object that stops matching is sent
//!   as `DELETED`, one that starts matching as `ADDED`.
//! - **Writes**: `POST` (201, `uid`, `creationTimestamp`, `resourceVersion`, `generateName`;
//!   Secret `stringData` becomes base64 `data`), `PUT`, `PATCH` with
//!   `application/merge-patch+json`, `application/strategic-merge-patch+json` (applied as a merge
//!   patch: lists are replaced), `application/json-patch+json` and `application/apply-patch+yaml`
//!   (server-side apply, applied as a merge of the applied object, creating it if missing; the
//!   body must be JSON, which is valid YAML; `fieldManager` and `force` are accepted and
//!   ignored). A `metadata.resourceVersion` in a body that is not the current one, or a failing
//!   JSON-patch `test` (e.g. on `/metadata/resourceVersion`), is a 409 `Conflict`. Writes to a
//!   pod keep its status; writes to `pods/{name}/status` change only the status. A write that
//!   changes nothing keeps the version and sends no event.
//! - **Deletion**: `DeleteOptions` (body or `gracePeriodSeconds` in the query) with
//!   `preconditions` (`uid`, `resourceVersion`; 409 on a mismatch). A scheduled pod is deleted
//!   gracefully: `deletionTimestamp` and `deletionGracePeriodSeconds` are set (`MODIFIED`), its
//!   `lifecycle.preStop` hook runs (`exec` in the workload's environment, or `httpGet` on the
//!   pod IP), then its workload gets SIGTERM, and SIGKILL when the grace is over (the request's
//!   `gracePeriodSeconds`, else `spec.terminationGracePeriodSeconds`, else 30 s), its status shows the exit, and then it is
//!   removed (`DELETED`). `gracePeriodSeconds=0`, unscheduled pods and other kinds are removed at
//!   once. An object with `metadata.finalizers` only gets its `deletionTimestamp` and is removed
//!   by the write that empties them. Removing an object removes the objects whose
//!   `ownerReferences` name its uid (background propagation; finalizers do not hold that up).
//! - **Authentication**: with [`FakeApiServerBuilder::token`], a request with another bearer
//!   token gets 401; one without credentials is served, since `kubectl` sends none to a
//!   plain-HTTP server, unless [`FakeApiServerBuilder::require_token`] is set. Without a token,
//!   anything is accepted.
//! - `kubectl get` asks for `Table`s; the fake answers with tables for gets, lists and watches
//!   (pods with the usual NAME, READY, STATUS, RESTARTS, AGE columns, and IP and NODE for
//!   `-o wide`). kube-rs's metadata calls (`list_metadata`, `metadata_watcher`) get
//!   `PartialObjectMetadata`.
//!
//! # Pods
//! With a runner (by default a [`ProcessRunner`] with an empty binary map), the fake plays
//! scheduler and kubelet for every pod created: it binds it to node [`pods::NODE_NAME`], gives it
//! its own loopback address in `127.0.0.0/8` as `status.podIP` (so every pod's server can
//! listen on the same port; addresses are unique across the fakes of a process and, from a
//! per-process block, across processes), resolves the first container's environment
//! (`value` with `$(VAR)` expansion, `valueFrom.secretKeyRef` from the stored Secret (the pod
//! waits with `CreateContainerConfigError` until the Secret exists, as the kubelet does),
//! `valueFrom.fieldRef` for `status.podIP`, `metadata.name`, `metadata.namespace`, ...,
//! `envFrom[].secretRef`), expands `$(VAR)` in `command` and `args`, and starts it. Every
//! transition is a `MODIFIED` event: `PodScheduled` → `Running` with a running container status →
//! `Ready` once the `readinessProbe` passes (`httpGet` or `tcpSocket` on the pod IP, tried every
//! 150 ms; at once without a probe) → on exit `Succeeded` (exit 0) or `Failed` with
//! `state.terminated.exitCode` (`restartPolicy: Never` is assumed; nothing restarts). Volumes
//! are not mounted: a process gets a fresh working directory (also `HOME` and
//! `OTM_FAKE_POD_ROOT`) and the env and args of its container only, so secrets reach it through
//! `env` (not secret volumes); [`ProcessRunner::rewrite_mount_paths`] points arguments and env
//! values under an `emptyDir` mount path at a local directory. The pod's stdout and stderr are
//! its log (`GET .../pods/{name}/log`, [`FakeApiServer::pod_logs`]). Pod specs are not
//! defaulted or validated beyond a new pod's status (`Pending` with its `qosClass`).
//!
//! [`ProcessRunner::binary`] maps an image or a command word to a local binary (`otm` → the
//! built `otm`). Another [`PodRunner`] can be given with [`FakeApiServerBuilder::runner`]:
//! [`ContainerRunner`] runs a pod's first container as a real podman container of its image
//! instead, with the pod's user, capabilities, read-only root filesystem, `emptyDir` volumes
//! (as tmpfs), working directory and limits, on the host's network so that it listens on its
//! pod IP like a process does (see its docs); [`FakeApiServerBuilder::manual_pods`] turns pod driving off,
//! leaving every transition to the test.
//!
//! A test can drive pods by hand: [`FakeApiServer::set_pod_phase`],
//! [`FakeApiServer::set_pod_condition`], [`FakeApiServer::mark_pod_scheduled`],
//! [`FakeApiServer::mark_pod_running`], [`FakeApiServer::mark_pod_ready`],
//! [`FakeApiServer::fail_pod`] (kills the process and marks the pod Failed with a terminated
//! container state), [`FakeApiServer::lose_pod`] (the process dies and the object disappears at
//! once, as after a lost node and a force deletion), and make the next pods fail:
//! [`FakeApiServer::unschedulable_next`] (Pending forever with `PodScheduled=False`,
//! `Unschedulable`) and [`FakeApiServer::fail_start_next`] (Failed with a `StartError`).
//!
//! A test can look at and seed the store directly: [`FakeApiServer::get`],
//! [`FakeApiServer::list`], [`FakeApiServer::create`] (resources named as kubectl names them:
//! `pods`, `secrets`, `leases`, `events.events.k8s.io`), wait for an object to reach a state
//! ([`FakeApiServer::wait_for`], woken by changes), read a pod's output
//! ([`FakeApiServer::pod_logs`]) and see every request made ([`FakeApiServer::requests`]),
//! e.g. to check that a client watches instead of polling.
//!
//! # History
//! [`FakeApiServer::resource_version`] is the current version; the history keeps the last
//! [`FakeApiServerBuilder::history_limit`] changes (default 10 000);
//! [`FakeApiServer::compact_history`] drops all of it, so a watch from any earlier version gets
//! 410; [`FakeApiServer::expire_watches`] also ends the open watches with a 410 `ERROR` event,
//! so a kube-rs watcher relists at once.

mod api;
pub mod container;
mod patch;
pub mod pods;
mod select;
mod store;
mod util;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

pub use container::ContainerRunner;
use pods::{Fate, PodCommand};
pub use pods::{PodLaunch, PodRunner, ProcessRunner, Workload};
use store::{PODS, RESOURCES, Store, meta_str};

/// The token the kubeconfig carries when the fake accepts any token.
pub const DEFAULT_TOKEN: &str = "otm-fake-token";

/// Builds a [`FakeApiServer`]. See the [module docs](self).
#[derive(Debug)]
pub struct FakeApiServerBuilder {
    token: Option<String>,
    require_token: bool,
    runner: Option<Arc<dyn PodRunner>>,
    history_limit: usize,
    bookmark_interval: Duration,
}

impl Default for FakeApiServerBuilder {
    fn default() -> Self {
        FakeApiServerBuilder {
            token: None,
            require_token: false,
            runner: Some(Arc::new(ProcessRunner::new())),
            history_limit: 10_000,
            bookmark_interval: Duration::from_secs(1),
        }
    }
}

impl FakeApiServerBuilder {
    /// Answers 401 to requests with another bearer token. Requests without credentials are
    /// still served (as an anonymous user), because `kubectl` sends no token to a plain-HTTP
    /// server; [`FakeApiServerBuilder::require_token`] refuses those too.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// With [`FakeApiServerBuilder::token`], also answers 401 to requests without a token
    /// (`kubectl` then cannot be used).
    pub fn require_token(mut self) -> Self {
        self.require_token = true;
        self
    }

    /// Runs pods with this runner (the default is a [`ProcessRunner`] with no binary map).
    pub fn runner(mut self, runner: impl PodRunner + 'static) -> Self {
        self.runner = Some(Arc::new(runner));
        self
    }

    /// Leaves pods alone: they stay as created until the test drives them.
    pub fn manual_pods(mut self) -> Self {
        self.runner = None;
        self
    }

    /// How many changes the watch history keeps.
    pub fn history_limit(mut self, n: usize) -> Self {
        self.history_limit = n;
        self
    }

    /// How often watches with `allowWatchBookmarks=true` get a bookmark.
    pub fn bookmark_interval(mut self, interval: Duration) -> Self {
        self.bookmark_interval = interval;
        self
    }

    /// Starts the server on `127.0.0.1:0`.
    pub async fn start(self) -> std::io::Result<FakeApiServer> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let root = tempfile::Builder::new().prefix("otm-kube-fake").tempdir()?;
        let (changed, _) = watch::channel(0);
        let (expire, _) = watch::channel(0);
        let (shutdown, mut stopped) = watch::channel(false);
        let inner = Arc::new(Inner {
            addr,
            store: Mutex::new(Store::new(self.history_limit)),
            changed,
            expire,
            shutdown,
            token: self.token,
            require_token: self.require_token,
            runner: self.runner,
            bookmark_interval: Mutex::new(self.bookmark_interval),
            pods: Mutex::new(Pods::default()),
            requests: Mutex::new(Vec::new()),
            root,
        });
        let app = api::router(inner.clone());
        let task = tokio::spawn(async move {
            let server = axum::serve(listener, app).with_graceful_shutdown(async move {
                let _ = stopped.wait_for(|s| *s).await.map(|_| ());
            });
            if let Err(e) = server.await {
                tracing::warn!(error = %e, "fake Kubernetes API server failed");
            }
        });
        tracing::debug!(%addr, "fake Kubernetes API server listening");
        Ok(FakeApiServer {
            inner,
            task: Some(task),
        })
    }
}

#[derive(Default)]
struct Pods {
    drivers: HashMap<String, mpsc::UnboundedSender<PodCommand>>,
    tasks: Vec<JoinHandle<()>>,
    logs: HashMap<(String, String), PathBuf>,
    fates: VecDeque<Fate>,
}

/// State shared by the handle, the HTTP handlers and the pod drivers.
pub(crate) struct Inner {
    addr: SocketAddr,
    store: Mutex<Store>,
    /// The latest resourceVersion, sent after every write; watches wait on it.
    changed: watch::Sender<u64>,
    /// Bumped to end every open watch with a 410 `ERROR` event.
    expire: watch::Sender<u64>,
    shutdown: watch::Sender<bool>,
    token: Option<String>,
    require_token: bool,
    runner: Option<Arc<dyn PodRunner>>,
    bookmark_interval: Mutex<Duration>,
    pods: Mutex<Pods>,
    /// Every authorized request, as `METHOD /path?query`.
    requests: Mutex<Vec<String>>,
    root: tempfile::TempDir,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves nothing half-updated that matters to a test.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    /// Runs `f` on the store, then wakes the watches.
    fn write<R>(&self, f: impl FnOnce(&mut Store) -> R) -> R {
        let mut store = lock(&self.store);
        let r = f(&mut store);
        let rv = store.resource_version();
        drop(store);
        self.changed.send_replace(rv);
        r
    }

    fn read<R>(&self, f: impl FnOnce(&Store) -> R) -> R {
        f(&lock(&self.store))
    }

    pub(crate) fn get_object(&self, res: usize, ns: &str, name: &str) -> Option<Value> {
        self.read(|s| s.get(res, ns, name).cloned())
    }

    /// Changes a pod's stored object if it is still the pod with `uid`.
    pub(crate) fn update_pod(
        &self,
        ns: &str,
        name: &str,
        uid: &str,
        f: impl FnOnce(&mut Value),
    ) -> Option<Value> {
        self.write(|s| {
            s.modify(PODS, ns, name, |p| {
                if meta_str(p, "uid") != uid {
                    return false;
                }
                f(p);
                true
            })
        })
    }

    /// Removes an object and what it owns, and stops the workloads of removed pods.
    pub(crate) fn remove(&self, res: usize, ns: &str, name: &str) -> Vec<(usize, Value)> {
        let removed = self.write(|s| s.remove(res, ns, name));
        let mut pods = lock(&self.pods);
        for (r, obj) in &removed {
            if *r == PODS
                && let Some(driver) = pods.drivers.remove(meta_str(obj, "uid"))
            {
                let _ = driver.send(PodCommand::Removed);
            }
        }
        removed
    }

    pub(crate) fn remove_pod_if(&self, ns: &str, name: &str, uid: &str) {
        let same = self.read(|s| {
            s.get(PODS, ns, name)
                .is_some_and(|p| meta_str(p, "uid") == uid)
        });
        if same {
            self.finish_deletion(PODS, ns, name);
        }
    }

    /// Removes an object whose deletion was asked for, unless it has finalizers: then it only
    /// gets its `deletionTimestamp` and stays until they are removed. Returns the object kept.
    pub(crate) fn finish_deletion(&self, res: usize, ns: &str, name: &str) -> Option<Value> {
        let kept = self.write(|s| {
            let obj = s.get(res, ns, name)?;
            if !api::finalizers(obj) {
                return None;
            }
            s.modify(res, ns, name, |o| {
                if o["metadata"].get("deletionTimestamp").is_none() {
                    o["metadata"]["deletionTimestamp"] = json!(util::now_rfc3339());
                    o["metadata"]["deletionGracePeriodSeconds"] = json!(0);
                }
                true
            })
        });
        if kept.is_none() {
            self.remove(res, ns, name);
        }
        kept
    }

    /// After a write: an object being deleted whose last finalizer is gone is removed now
    /// (a pod whose container still runs is removed when it stops).
    pub(crate) fn finalized(&self, res: usize, ns: &str, name: &str, obj: &Value) {
        if obj["metadata"].get("deletionTimestamp").is_none() || api::finalizers(obj) {
            return;
        }
        let running = res == PODS
            && obj
                .pointer("/status/containerStatuses/0/state/running")
                .is_some()
            && lock(&self.pods).drivers.contains_key(meta_str(obj, "uid"));
        if !running {
            self.remove(res, ns, name);
        }
    }

    pub(crate) fn allocate_ip(&self) -> Ipv4Addr {
        next_pod_ip()
    }

    pub(crate) fn pod_dirs(&self, ns: &str, name: &str, uid: &str) -> (PathBuf, PathBuf) {
        let base = self
            .root
            .path()
            .join(ns)
            .join(format!("{name}-{}", &uid[..8.min(uid.len())]));
        let workdir = base.join("work");
        let _ = std::fs::create_dir_all(&workdir);
        let log = base.join("log");
        lock(&self.pods)
            .logs
            .insert((ns.to_owned(), name.to_owned()), log.clone());
        (workdir, log)
    }

    pub(crate) fn log_path(&self, ns: &str, name: &str) -> Option<PathBuf> {
        lock(&self.pods)
            .logs
            .get(&(ns.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Starts the driver of a newly created pod, when the fake runs pods.
    pub(crate) fn pod_created(self: &Arc<Self>, pod: &Value) {
        let Some(runner) = self.runner.clone() else {
            return;
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let uid = meta_str(pod, "uid").to_owned();
        let mut pods = lock(&self.pods);
        let fate = pods.fates.pop_front().unwrap_or(Fate::Normal);
        pods.drivers.insert(uid.clone(), tx);
        pods.tasks.retain(|t| !t.is_finished());
        pods.tasks.push(tokio::spawn(pods::drive_pod(
            self.clone(),
            runner,
            meta_str(pod, "namespace").to_owned(),
            meta_str(pod, "name").to_owned(),
            uid,
            fate,
            rx,
        )));
    }

    /// Sends an order to a pod's driver; false if it has none.
    pub(crate) fn command_pod(&self, uid: &str, cmd: PodCommand) -> bool {
        lock(&self.pods)
            .drivers
            .get(uid)
            .is_some_and(|d| d.send(cmd).is_ok())
    }

    pub(crate) fn record_request(&self, method: &axum::http::Method, uri: &axum::http::Uri) {
        let target = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
        lock(&self.requests).push(format!("{method} {target}"));
    }

    pub(crate) fn bookmark_interval(&self) -> Duration {
        *lock(&self.bookmark_interval)
    }
}

/// The next pod address, unique in this process and (for up to 256 pods per process) among
/// processes: every fake in a test binary shares the sequence, and each process starts at its
/// own block of `127.0.0.0/8` (from its pid), so tests that run in parallel, in one process or
/// in many, never give two pods the same address and port.
fn next_pod_ip() -> Ipv4Addr {
    static NEXT: std::sync::OnceLock<std::sync::atomic::AtomicU32> = std::sync::OnceLock::new();
    let next = NEXT.get_or_init(|| {
        let block = std::process::id() % 65_000;
        // Block 0 starts at 127.0.0.2, after the host's own 127.0.0.1.
        std::sync::atomic::AtomicU32::new((block << 8) + 2)
    });
    let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let n = n % 0x00ff_fffe + 1;
    if n == 1 {
        return next_pod_ip();
    }
    Ipv4Addr::from(0x7f00_0000 | n)
}

/// A running fake API server. See the [module docs](self).
pub struct FakeApiServer {
    inner: Arc<Inner>,
    task: Option<JoinHandle<()>>,
}

impl fmt::Debug for FakeApiServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeApiServer")
            .field("addr", &self.inner.addr)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for Pods {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pods")
            .field("drivers", &self.drivers.len())
            .finish_non_exhaustive()
    }
}

/// Finds a resource by its plural, optionally qualified by its group as kubectl writes it:
/// `pods`, `leases`, `events` (core), `events.events.k8s.io`.
fn resource_named(name: &str) -> usize {
    RESOURCES
        .iter()
        .position(|r| {
            r.plural == name || (!r.group.is_empty() && format!("{}.{}", r.plural, r.group) == name)
        })
        .unwrap_or_else(|| panic!("the fake API server has no resource {name:?}"))
}

impl FakeApiServer {
    /// A builder with the defaults: any token, a [`ProcessRunner`], 1 s bookmarks.
    pub fn builder() -> FakeApiServerBuilder {
        FakeApiServerBuilder::default()
    }

    /// Starts a server with the defaults.
    ///
    /// # Panics
    /// If no local port can be bound.
    pub async fn start() -> FakeApiServer {
        match Self::builder().start().await {
            Ok(f) => f,
            Err(e) => panic!("fake Kubernetes API server: cannot start: {e}"),
        }
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// The server URL, e.g. `http://127.0.0.1:40123`.
    pub fn url(&self) -> String {
        format!("http://{}", self.inner.addr)
    }

    /// The bearer token clients should send.
    pub fn token(&self) -> &str {
        self.inner.token.as_deref().unwrap_or(DEFAULT_TOKEN)
    }

    /// A kubeconfig (YAML) with one cluster, user and context `otm-fake`, namespace `default`.
    pub fn kubeconfig(&self) -> String {
        self.kubeconfig_for_namespace("default")
    }

    /// A kubeconfig whose context uses `namespace`.
    pub fn kubeconfig_for_namespace(&self, namespace: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: otm-fake\n  cluster:\n    server: {url}\ncontexts:\n- name: otm-fake\n  context:\n    cluster: otm-fake\n    user: otm-fake\n    namespace: {namespace}\ncurrent-context: otm-fake\nusers:\n- name: otm-fake\n  user:\n    token: {token}\npreferences: {{}}\n",
            url = self.url(),
            token = self.token(),
        )
    }

    /// Writes [`FakeApiServer::kubeconfig`] to `path` and returns the path.
    pub fn write_kubeconfig(&self, path: &Path) -> std::io::Result<PathBuf> {
        std::fs::write(path, self.kubeconfig())?;
        Ok(path.to_owned())
    }

    /// The current (latest) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.inner.read(Store::resource_version)
    }

    /// Forgets the watch history: watches and exact lists from any version before now get 410.
    pub fn compact_history(&self) {
        self.inner.write(Store::compact);
    }

    /// Compacts the history and ends every open watch with an `ERROR` event carrying a 410
    /// `Expired` Status, as the real server does to a watcher that fell too far behind: a
    /// kube-rs watcher then relists.
    pub fn expire_watches(&self) {
        self.inner.write(Store::compact);
        self.inner.expire.send_modify(|n| *n += 1);
    }

    /// Changes how many changes the history keeps (older ones are dropped now).
    pub fn set_history_limit(&self, n: usize) {
        self.inner.write(|s| s.set_history_limit(n));
    }

    /// Changes the bookmark interval of watches started from now on.
    pub fn set_bookmark_interval(&self, interval: Duration) {
        *lock(&self.inner.bookmark_interval) = interval;
    }

    /// An object as stored, by resource (`pods`, `secrets`, `leases`, `events.events.k8s.io`),
    /// namespace (empty for cluster-scoped ones) and name.
    pub fn get(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        self.inner
            .get_object(resource_named(resource), namespace, name)
    }

    /// The objects of a resource in a namespace (`None`: everywhere), ordered by namespace and name.
    pub fn list(&self, resource: &str, namespace: Option<&str>) -> Vec<Value> {
        let res = resource_named(resource);
        self.inner.read(|s| s.list(res, namespace))
    }

    /// Creates an object as a `POST` would (pods are then run as usual).
    pub fn create(&self, resource: &str, namespace: &str, object: Value) -> Result<Value, String> {
        let res = resource_named(resource);
        let created = self
            .inner
            .write(|s| s.create(res, namespace, object))
            .map_err(|e| e.message)?;
        if res == PODS {
            self.inner.pod_created(&created);
        }
        Ok(created)
    }

    fn modify_pod(&self, namespace: &str, name: &str, f: impl FnOnce(&mut Value)) -> Option<Value> {
        self.inner.write(|s| {
            s.modify(PODS, namespace, name, |p| {
                f(p);
                true
            })
        })
    }

    /// Moves an object's `creationTimestamp` back by `by` (one `MODIFIED` event), so that a test
    /// can make it look as old as it needs without waiting; the real API server lets no client
    /// do this. `None` if there is no such object.
    pub fn backdate(
        &self,
        resource: &str,
        namespace: &str,
        name: &str,
        by: Duration,
    ) -> Option<Value> {
        let res = resource_named(resource);
        let by = chrono::Duration::from_std(by).ok()?;
        self.inner.write(|s| {
            s.modify(res, namespace, name, |o| {
                let Ok(t) = chrono::DateTime::parse_from_rfc3339(meta_str(o, "creationTimestamp"))
                else {
                    return false;
                };
                o["metadata"]["creationTimestamp"] =
                    json!(util::rfc3339(t.with_timezone(&chrono::Utc) - by));
                true
            })
        })
    }

    /// Every authorized request so far, oldest first, as `METHOD /path?query` (e.g.
    /// `GET /api/v1/namespaces/otm/pods?watch=true&...`): to check that a client watches
    /// rather than polls, or sent a precondition.
    pub fn requests(&self) -> Vec<String> {
        lock(&self.inner.requests).clone()
    }

    /// Waits until the object satisfies `pred` (given `None` while it does not exist), woken by
    /// each change rather than polling; returns whether it did within `timeout`.
    pub async fn wait_for(
        &self,
        resource: &str,
        namespace: &str,
        name: &str,
        timeout: Duration,
        pred: impl Fn(Option<&Value>) -> bool,
    ) -> bool {
        let res = resource_named(resource);
        let mut changed = self.inner.changed.subscribe();
        let check = async {
            loop {
                let obj = self.inner.get_object(res, namespace, name);
                if pred(obj.as_ref()) {
                    return;
                }
                if changed.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::time::timeout(timeout, check).await.is_ok()
    }

    /// Sets a pod's `status.phase`; `None` if there is no such pod.
    pub fn set_pod_phase(&self, namespace: &str, name: &str, phase: &str) -> Option<Value> {
        self.modify_pod(namespace, name, |p| p["status"]["phase"] = json!(phase))
    }

    /// Sets one of a pod's conditions (`PodScheduled`, `Initialized`, `ContainersReady`, `Ready`).
    pub fn set_pod_condition(
        &self,
        namespace: &str,
        name: &str,
        kind: &str,
        status: bool,
    ) -> Option<Value> {
        self.modify_pod(namespace, name, |p| {
            pods::set_condition(p, kind, status, None)
        })
    }

    /// Binds a pod to the node and gives it `pod_ip` (any loopback address), as the scheduler
    /// and the kubelet would; for pods driven by hand.
    pub fn mark_pod_scheduled(
        &self,
        namespace: &str,
        name: &str,
        pod_ip: Ipv4Addr,
    ) -> Option<Value> {
        self.modify_pod(namespace, name, |p| pods::mark_scheduled(p, Some(pod_ip)))
    }

    /// Marks a pod Running with a running container, ready or not.
    pub fn mark_pod_running(&self, namespace: &str, name: &str, ready: bool) -> Option<Value> {
        self.modify_pod(namespace, name, |p| pods::mark_running(p, ready))
    }

    /// Sets a pod's `Ready` and `ContainersReady` conditions and its container's `ready`.
    pub fn mark_pod_ready(&self, namespace: &str, name: &str, ready: bool) -> Option<Value> {
        self.modify_pod(namespace, name, |p| pods::mark_ready(p, ready))
    }

    /// Fails a pod: its process is killed and the pod marked Failed, its container terminated
    /// with `exit_code` and `reason` (e.g. 137, `OOMKilled`). Returns false if there is no such pod.
    pub fn fail_pod(&self, namespace: &str, name: &str, exit_code: i32, reason: &str) -> bool {
        let Some(pod) = self.get("pods", namespace, name) else {
            return false;
        };
        let uid = meta_str(&pod, "uid").to_owned();
        let cmd = PodCommand::Fail {
            exit_code,
            reason: reason.to_owned(),
        };
        if !self.inner.command_pod(&uid, cmd) {
            self.modify_pod(namespace, name, |p| {
                pods::mark_terminated(p, exit_code, reason, None)
            });
        }
        true
    }

    /// Loses a pod as with a dead node and a force deletion: its process is killed and the object
    /// removed at once (one `DELETED` event). Returns false if there is no such pod.
    pub fn lose_pod(&self, namespace: &str, name: &str) -> bool {
        !self.inner.remove(PODS, namespace, name).is_empty()
    }

    /// The next `n` pods created are never scheduled: Pending with `PodScheduled=False`.
    pub fn unschedulable_next(&self, n: usize) {
        lock(&self.inner.pods)
            .fates
            .extend(std::iter::repeat_n(Fate::Unschedulable, n));
    }

    /// The next `n` pods created fail to start: Failed, container terminated with `StartError`.
    pub fn fail_start_next(&self, n: usize) {
        lock(&self.inner.pods)
            .fates
            .extend(std::iter::repeat_n(Fate::FailStart, n));
    }

    /// What a pod's process wrote to stdout and stderr so far.
    pub fn pod_logs(&self, namespace: &str, name: &str) -> Option<String> {
        let path = self.inner.log_path(namespace, name)?;
        Some(std::fs::read_to_string(path).unwrap_or_default())
    }

    /// Stops the server, ends open watches and kills every pod process.
    pub async fn shutdown(mut self) {
        self.stop();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    fn stop(&mut self) {
        self.inner.shutdown.send_replace(true);
        let mut pods = lock(&self.inner.pods);
        pods.drivers.clear();
        for t in pods.tasks.drain(..) {
            t.abort();
        }
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}
