//! The `kube` runtime: every instance a pod running `otm shim`, its control endpoint on TCP
//! (`http://<pod-ip>:<port>`, token-authenticated as on one machine), the token in a Secret the
//! pod owns. Pods are seen through one watch (a reflector over otm's pods), never by polling:
//! readiness, exits and evictions reach the orchestrator within about a second.
//!
//! - [`spec`]: the desired pod and secret, as pure functions.
//! - [`lease`]: leader election on a `coordination.k8s.io/v1` Lease.
//!
//! A warm pod is claimed with a label patch carrying the `resourceVersion` the claimer saw: of
//! two orchestrators claiming one pod, the API server lets exactly one through (409 for the
//! other), and the loser takes another pod or creates one.

pub mod lease;
pub mod spec;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use k8s_openapi::api::core::v1::{Pod, Secret, Toleration};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher::{self, Event};
use otm_core::{
    Error, InstanceId, InstanceSpec, ResourceLimits, Result, Runtime, RuntimeEvent,
    RuntimeInstance, TenantId,
};
use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{broadcast, watch};

const BACKEND: &str = "kube";

/// How the runtime makes pods.
#[derive(Clone, Debug)]
pub struct KubeRuntimeConfig {
    /// The namespace of tenant pods.
    pub namespace: String,
    /// `runtimeClassName` of every pod; `None` for the cluster's default.
    pub runtime_class: Option<String>,
    /// The otm image (runs the reference agent).
    pub image: String,
    /// The OpenClaw instance image (otm, Node and OpenClaw), for the `openclaw` profile and
    /// warm pods.
    pub openclaw_image: Option<String>,
    /// `imagePullPolicy`, or the cluster's default.
    pub image_pull_policy: Option<String>,
    /// Node selector of every pod (Kata nodes).
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations of every pod (the Kata nodes' taint).
    pub tolerations: Vec<Toleration>,
    /// The shim's control port in the pod.
    pub shim_port: u16,
    /// More arguments for `otm shim`.
    pub shim_args: Vec<String>,
    /// Whether pods name the `otm-tenant` and `otm-warm` PriorityClasses (the chart makes
    /// them).
    pub priority_classes: bool,
    /// `terminationGracePeriodSeconds`: time for a final snapshot once an eviction begins.
    pub termination_grace_s: i64,
    /// How long a pod may take to be scheduled, pull its image and answer.
    pub create_timeout: Duration,
    /// The Lease orchestrators elect their leader with.
    pub lease_name: String,
}

impl Default for KubeRuntimeConfig {
    fn default() -> Self {
        KubeRuntimeConfig {
            namespace: "default".into(),
            runtime_class: Some("kata-qemu".into()),
            image: "otm:latest".into(),
            openclaw_image: None,
            image_pull_policy: None,
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            shim_port: 7070,
            shim_args: Vec::new(),
            priority_classes: true,
            termination_grace_s: 60,
            create_timeout: Duration::from_secs(300),
            lease_name: "otm-orchestrator".into(),
        }
    }
}

/// Parses `k=v,k2=v2` (a node selector).
pub fn parse_selector(s: &str) -> std::result::Result<BTreeMap<String, String>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.trim().to_owned())),
            _ => Err(format!("`{p}` is not key=value")),
        })
        .collect()
}

/// Parses a JSON array of tolerations, as a pod spec writes them.
pub fn parse_tolerations(s: &str) -> std::result::Result<Vec<Toleration>, String> {
    if s.trim().is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_str(s).map_err(|e| format!("not a JSON array of tolerations: {e}"))
}

/// The `kube` runtime.
#[derive(Clone, Debug)]
pub struct KubeRuntime {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: KubeRuntimeConfig,
    client: kube::Client,
    pods: Api<Pod>,
    secrets: Api<Secret>,
    store: Store<Pod>,
    /// Bumped after every watch event, for waiters.
    changed: watch::Receiver<u64>,
    events: broadcast::Sender<RuntimeEvent>,
    /// Pods this runtime deletes: their going is no event.
    deleting: Mutex<HashSet<InstanceId>>,
    /// Instances already reported, so each is reported once.
    reported: Mutex<std::collections::HashMap<InstanceId, u8>>,
    watch_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeRuntime")
            .field("namespace", &self.cfg.namespace)
            .finish_non_exhaustive()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(t) = self.watch_task.get_mut().unwrap().take() {
            t.abort();
        }
    }
}

fn api_err(e: kube::Error) -> Error {
    match &e {
        kube::Error::Api(s) if s.code == 404 => Error::not_found(s.message.clone()),
        kube::Error::Api(s) if s.code == 409 => Error::conflict(&s.message),
        kube::Error::Api(s) if s.code == 401 || s.code == 403 => Error::generic(
            BACKEND,
            format!(
                "the Kubernetes API refused otm ({} {}): check the service account's RBAC in the tenant namespace",
                s.code, s.message
            ),
        ),
        kube::Error::Api(s) if s.code >= 500 || s.code == 429 => {
            Error::unavailable(BACKEND, format!("{} {}", s.code, s.message))
        }
        kube::Error::HyperError(_) | kube::Error::Service(_) => {
            Error::unavailable(BACKEND, e.to_string())
        }
        _ => Error::generic(BACKEND, e),
    }
}

fn status_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

impl KubeRuntime {
    /// A client from the environment: in-cluster configuration, or `KUBECONFIG` /
    /// `~/.kube/config`.
    pub async fn client_from_env() -> Result<kube::Client> {
        kube::Client::try_default().await.map_err(|e| {
            Error::generic(
                BACKEND,
                format!(
                    "no Kubernetes configuration: run in a pod with a service account, or set KUBECONFIG ({e})"
                ),
            )
        })
    }

    /// A client from a kubeconfig file.
    pub async fn client_from_kubeconfig(path: &std::path::Path) -> Result<kube::Client> {
        let kc = kube::config::Kubeconfig::read_from(path)
            .map_err(|e| Error::generic(BACKEND, format!("kubeconfig {}: {e}", path.display())))?;
        let config =
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| {
                    Error::generic(BACKEND, format!("kubeconfig {}: {e}", path.display()))
                })?;
        kube::Client::try_from(config).map_err(|e| Error::generic(BACKEND, e))
    }

    /// Starts watching otm's pods in the namespace and returns once the first list is in, so
    /// [`Runtime::list`] sees the pods that outlived an earlier orchestrator (adoption).
    pub async fn new(client: kube::Client, cfg: KubeRuntimeConfig) -> Result<Self> {
        let pods: Api<Pod> = Api::namespaced(client.clone(), &cfg.namespace);
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &cfg.namespace);
        // Fail early, with a clear message, when the API or the namespace cannot be read.
        pods.list_metadata(
            &kube::api::ListParams::default()
                .labels(spec::SELECTOR)
                .limit(1),
        )
        .await
        .map_err(|e| match api_err(e) {
            Error::NotFound { what } => {
                Error::generic(BACKEND, format!("namespace {}: {what}", cfg.namespace))
            }
            other => other,
        })?;
        let (reader, writer) = reflector::store::<Pod>();
        let (changed_tx, changed) = watch::channel(0u64);
        let (events, _) = broadcast::channel(1024);
        let inner = Arc::new(Inner {
            cfg,
            client,
            pods: pods.clone(),
            secrets,
            store: reader.clone(),
            changed,
            events,
            deleting: Mutex::new(HashSet::new()),
            reported: Mutex::new(std::collections::HashMap::new()),
            watch_task: Mutex::new(None),
        });
        let weak = Arc::downgrade(&inner);
        let stream = watcher::watcher(pods, watcher::Config::default().labels(spec::SELECTOR))
            .default_backoff()
            .reflect(writer);
        let task = tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            let mut listing: HashSet<InstanceId> = HashSet::new();
            let mut known: HashSet<InstanceId> = HashSet::new();
            while let Some(ev) = stream.next().await {
                // The runtime is gone: so is its watch.
                let Some(inner) = weak.upgrade() else { return };
                match ev {
                    Ok(Event::Init) => listing.clear(),
                    Ok(Event::InitApply(pod)) => {
                        if let Some(id) = spec::instance_of(&pod) {
                            listing.insert(id.clone());
                            known.insert(id);
                        }
                        inner.observe(&pod);
                    }
                    Ok(Event::InitDone) => {
                        // Pods that went while the watch was down: gone without an event.
                        for id in known.difference(&listing).cloned().collect::<Vec<_>>() {
                            known.remove(&id);
                            inner.gone(&id);
                        }
                    }
                    Ok(Event::Apply(pod)) => {
                        if let Some(id) = spec::instance_of(&pod) {
                            known.insert(id);
                        }
                        inner.observe(&pod);
                    }
                    Ok(Event::Delete(pod)) => {
                        if let Some(id) = spec::instance_of(&pod) {
                            known.remove(&id);
                            inner.gone(&id);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "watching instance pods"),
                }
                changed_tx.send_modify(|n| *n += 1);
            }
        });
        *inner.watch_task.lock().unwrap() = Some(task);
        tokio::time::timeout(Duration::from_secs(30), reader.wait_until_ready())
            .await
            .map_err(|_| Error::unavailable(BACKEND, "the first list of pods took over 30 s"))?
            .map_err(|e| Error::generic(BACKEND, e))?;
        Ok(KubeRuntime { inner })
    }

    /// The client this runtime uses (leader election shares it).
    pub fn client(&self) -> kube::Client {
        self.inner.client.clone()
    }

    /// The namespace of tenant pods.
    pub fn namespace(&self) -> &str {
        &self.inner.cfg.namespace
    }

    fn pod(&self, id: &InstanceId) -> Option<Arc<Pod>> {
        self.inner
            .store
            .get(&ObjectRef::new(&spec::pod_name(id)).within(&self.inner.cfg.namespace))
    }

    fn address(&self, pod: &Pod) -> Option<String> {
        let ip = pod.status.as_ref()?.pod_ip.as_deref()?;
        let host = if ip.contains(':') {
            format!("[{ip}]")
        } else {
            ip.to_owned()
        };
        Some(format!("http://{host}:{}", self.inner.cfg.shim_port))
    }

    /// Waits until the pod is ready with an address, or has failed.
    async fn wait_ready(&self, id: &InstanceId) -> Result<(Arc<Pod>, String)> {
        let mut changed = self.inner.changed.clone();
        let deadline = tokio::time::Instant::now() + self.inner.cfg.create_timeout;
        loop {
            if let Some(pod) = self.pod(id) {
                if let Some(why) = spec::ended(&pod) {
                    return Err(Error::unavailable(BACKEND, format!("instance {id}: {why}")));
                }
                if spec::ready(&pod)
                    && let Some(addr) = self.address(&pod)
                {
                    return Ok((pod, addr));
                }
            }
            match tokio::time::timeout_at(deadline, changed.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(Error::unavailable(BACKEND, "the pod watch stopped")),
                Err(_) => {
                    let phase = self
                        .pod(id)
                        .map(|p| spec::phase(&p).to_owned())
                        .unwrap_or_else(|| "not seen".into());
                    return Err(Error::unavailable(
                        BACKEND,
                        format!(
                            "pod {} was not ready within {} s (phase {phase}): check scheduling, the image and the RuntimeClass",
                            spec::pod_name(id),
                            self.inner.cfg.create_timeout.as_secs()
                        ),
                    ));
                }
            }
        }
    }

    async fn delete_objects(&self, id: &InstanceId, grace: Option<u32>) -> Result<()> {
        let name = spec::pod_name(id);
        let dp = DeleteParams {
            grace_period_seconds: grace,
            ..DeleteParams::default()
        };
        match self.inner.pods.delete(&name, &dp).await {
            Ok(_) => {}
            Err(e) if status_code(&e) == Some(404) => {}
            Err(e) => return Err(api_err(e)),
        }
        match self
            .inner
            .secrets
            .delete(&name, &DeleteParams::default())
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if status_code(&e) == Some(404) => Ok(()),
            Err(e) => Err(api_err(e)),
        }
    }
}

impl Inner {
    fn report(&self, ev: RuntimeEvent) {
        // Each instance is reported once as terminating and once as gone, in that order.
        let (id, level) = match &ev {
            RuntimeEvent::Terminating { id, .. } => (id.clone(), 1),
            RuntimeEvent::Exited { id, .. } | RuntimeEvent::LimitExceeded { id, .. } => {
                (id.clone(), 2)
            }
        };
        {
            let mut reported = self.reported.lock().unwrap();
            let seen = reported.entry(id.clone()).or_insert(0);
            if *seen >= level {
                return;
            }
            *seen = level;
        }
        tracing::info!(instance = %id, event = ?ev, "instance pod changed");
        let _ = self.events.send(ev);
    }

    /// A pod was added or changed.
    fn observe(&self, pod: &Pod) {
        let Some(id) = spec::instance_of(pod) else {
            return;
        };
        if self.deleting.lock().unwrap().contains(&id) {
            return;
        }
        if let Some(why) = spec::ended(pod) {
            self.report(RuntimeEvent::Exited { id, detail: why });
        } else if pod.metadata.deletion_timestamp.is_some() {
            self.report(RuntimeEvent::Terminating {
                id,
                detail: "the pod is being deleted by someone else (eviction, node drain)".into(),
            });
        }
    }

    /// A pod is gone.
    fn gone(&self, id: &InstanceId) {
        if self.deleting.lock().unwrap().remove(id) {
            self.reported.lock().unwrap().remove(id);
            return;
        }
        self.report(RuntimeEvent::Exited {
            id: id.clone(),
            detail: "the pod was deleted".into(),
        });
        self.reported.lock().unwrap().remove(id);
    }
}

#[async_trait]
impl Runtime for KubeRuntime {
    fn name(&self) -> &'static str {
        "kube"
    }

    fn isolation(&self) -> String {
        match &self.inner.cfg.runtime_class {
            Some(rc) => format!("pod ({rc})"),
            None => "pod (the cluster's default runtime)".into(),
        }
    }

    fn limits(&self) -> String {
        "pod requests and limits".into()
    }

    #[tracing::instrument(name = "kube_create", skip_all, fields(instance = %spec.id))]
    async fn create(&self, spec: &InstanceSpec) -> Result<RuntimeInstance> {
        let cfg = &self.inner.cfg;
        let name = spec::pod_name(&spec.id);
        let pp = PostParams::default();
        self.inner
            .secrets
            .create(&pp, &spec::secret(cfg, &spec.id, &spec.shim_token, None))
            .await
            .map_err(api_err)?;
        let created = match self.inner.pods.create(&pp, &spec::pod(cfg, spec)).await {
            Ok(p) => p,
            Err(e) => {
                let _ = self
                    .inner
                    .secrets
                    .delete(&name, &DeleteParams::default())
                    .await;
                return Err(api_err(e));
            }
        };
        // The secret goes with its pod.
        if let Some(uid) = created.metadata.uid.as_deref() {
            let patch = serde_json::json!({
                "metadata": { "ownerReferences": [spec::owner_ref(&name, uid)] }
            });
            if let Err(e) = self
                .inner
                .secrets
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                tracing::warn!(instance = %spec.id, error = %e, "could not make the pod own its secret");
            }
        }
        let ready = self.wait_ready(&spec.id).await;
        let (pod, address) = match ready {
            Ok(r) => r,
            Err(e) => {
                self.inner.deleting.lock().unwrap().insert(spec.id.clone());
                let _ = self.delete_objects(&spec.id, Some(0)).await;
                return Err(e);
            }
        };
        // The readiness probe opened a connection; the contract is that the shim answers.
        let shim = otm_shim::ShimClient::new(address.clone(), spec.shim_token.clone());
        let mut tries = 0;
        loop {
            match shim.status().await {
                Ok(_) => break,
                Err(e) if tries >= 50 => {
                    self.inner.deleting.lock().unwrap().insert(spec.id.clone());
                    let _ = self.delete_objects(&spec.id, Some(0)).await;
                    return Err(Error::unavailable(
                        BACKEND,
                        format!("the shim of pod {name} does not answer: {e}"),
                    ));
                }
                Err(_) => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        Ok(RuntimeInstance {
            id: spec.id.clone(),
            address,
            alive: true,
            tenant: spec::tenant_of(&pod),
            created_at_ms: created_ms(&pod),
        })
    }

    async fn list(&self) -> Result<Vec<RuntimeInstance>> {
        let deleting = self.inner.deleting.lock().unwrap().clone();
        Ok(self
            .inner
            .store
            .state()
            .into_iter()
            .filter_map(|pod| {
                let id = spec::instance_of(&pod)?;
                let alive = spec::phase(&pod) == "Running"
                    && spec::ended(&pod).is_none()
                    && pod.metadata.deletion_timestamp.is_none()
                    && !deleting.contains(&id);
                Some(RuntimeInstance {
                    address: self.address(&pod).unwrap_or_default(),
                    alive,
                    tenant: spec::tenant_of(&pod),
                    created_at_ms: created_ms(&pod),
                    id,
                })
            })
            .collect())
    }

    #[tracing::instrument(name = "kube_delete", skip_all, fields(instance = %id))]
    async fn delete(&self, id: &InstanceId) -> Result<()> {
        self.inner.deleting.lock().unwrap().insert(id.clone());
        // The orchestrator took the final snapshot before it deletes: a short grace is enough.
        let r = self.delete_objects(id, Some(5)).await;
        if self.pod(id).is_none() {
            // Never seen (or already gone): nothing will come to clear the mark.
            self.inner.deleting.lock().unwrap().remove(id);
        }
        r
    }

    fn events(&self) -> BoxStream<'static, RuntimeEvent> {
        let rx = self.inner.events.subscribe();
        futures::stream::unfold(rx, |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(ev) => return Some((ev, rx)),
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
        .boxed()
    }

    /// A running pod's resources can only change through the `resize` subresource (in-place
    /// resize), and only its CPU and memory: a tenant whose disk limit differs (the pod's
    /// ephemeral-storage limit and the emptyDir's size) needs a new pod, as it does where the
    /// cluster refuses the resize; the caller then creates one.
    async fn set_limits(&self, id: &InstanceId, limits: &ResourceLimits) -> Result<()> {
        let pod = self
            .pod(id)
            .ok_or_else(|| Error::not_found(format!("pod {}", spec::pod_name(id))))?;
        let have = pod
            .spec
            .as_ref()
            .and_then(|s| s.containers.first())
            .and_then(|c| c.resources.clone())
            .unwrap_or_default();
        let want = spec::resources(limits);
        if spec::storage(&have) != spec::storage(&want) {
            return Err(Error::unavailable(
                BACKEND,
                format!(
                    "pod {} has another disk limit, which cannot change in place",
                    spec::pod_name(id)
                ),
            ));
        }
        let want = spec::resizable(&want);
        if spec::resizable(&have) == want {
            return Ok(());
        }
        let patch = serde_json::json!({
            "spec": { "containers": [{ "name": "shim", "resources": want }] }
        });
        self.inner
            .pods
            .patch_subresource(
                "resize",
                &spec::pod_name(id),
                &PatchParams::default(),
                &Patch::Strategic(&patch),
            )
            .await
            .map(drop)
            .map_err(|e| {
                Error::unavailable(
                    BACKEND,
                    format!(
                        "the cluster did not resize pod {} in place: {e}",
                        spec::pod_name(id)
                    ),
                )
            })
    }

    /// Secrets of otm's instances whose pod is gone: a pod owns its Secret once created, and the
    /// cluster's garbage collector removes the Secret with it, but an orchestrator that dies (or
    /// fails to set the owner) between creating the Secret and the pod leaves one behind.
    async fn collect_garbage(&self, grace: Duration) -> Result<usize> {
        let secrets = self
            .inner
            .secrets
            .list(&kube::api::ListParams::default().labels(&format!(
                "{}=otm,{}",
                spec::MANAGED_BY,
                spec::INSTANCE_LABEL
            )))
            .await
            .map_err(api_err)?;
        let now = jiff::Timestamp::now();
        let mut removed = 0;
        for secret in secrets {
            let Some(name) = secret.metadata.name.as_deref() else {
                continue;
            };
            let old_enough = secret
                .metadata
                .creation_timestamp
                .as_ref()
                .is_some_and(|t| {
                    now.duration_since(t.0)
                        >= jiff::SignedDuration::try_from(grace).unwrap_or_default()
                });
            if !old_enough
                || self
                    .inner
                    .store
                    .get(&ObjectRef::new(name).within(&self.inner.cfg.namespace))
                    .is_some()
            {
                continue;
            }
            // The watch may lag: ask the API server itself before deleting.
            if self
                .inner
                .pods
                .get_opt(name)
                .await
                .map_err(api_err)?
                .is_some()
            {
                continue;
            }
            let dp =
                DeleteParams {
                    preconditions: secret.metadata.uid.clone().map(|uid| {
                        kube::api::Preconditions {
                            uid: Some(uid),
                            resource_version: None,
                        }
                    }),
                    ..DeleteParams::default()
                };
            match self.inner.secrets.delete(name, &dp).await {
                Ok(_) => {
                    tracing::warn!(secret = name, "removed the Secret of a pod that is gone");
                    removed += 1;
                }
                Err(e) if matches!(status_code(&e), Some(404 | 409)) => {}
                Err(e) => return Err(api_err(e)),
            }
        }
        Ok(removed)
    }

    async fn claim(&self, id: &InstanceId, tenant: &TenantId) -> Result<bool> {
        let Some(pod) = self.pod(id) else {
            return Ok(false);
        };
        if !spec::claimable(&pod) {
            return Ok(false);
        }
        let Some(rv) = pod.metadata.resource_version.as_deref() else {
            return Ok(false);
        };
        let patch = spec::claim_patch(tenant, rv);
        match self
            .inner
            .pods
            .patch(
                &spec::pod_name(id),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => Ok(true),
            // Lost the race (or the pod went): the caller takes another or creates one.
            Err(e) if matches!(status_code(&e), Some(409 | 404)) => Ok(false),
            Err(e) => Err(api_err(e)),
        }
    }

    fn leader_elector(&self, holder: &str) -> Option<Arc<dyn otm_core::LeaderElector>> {
        Some(Arc::new(lease::LeaseElector::new(
            self.inner.client.clone(),
            &self.inner.cfg.namespace,
            &self.inner.cfg.lease_name,
            holder,
        )))
    }
}

fn created_ms(pod: &Pod) -> Option<i64> {
    pod.metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.as_millisecond())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `OTM_KUBE_NODE_SELECTOR` and `OTM_KUBE_TOLERATIONS` as the Helm chart's ConfigMap renders
    /// them with the default values (`scripts/check-chart` renders the same chart).
    const CHART_NODE_SELECTOR: &str = "otm.dev/kata=true";
    const CHART_TOLERATIONS: &str =
        r#"[{"effect":"NoSchedule","key":"otm.dev/kata","operator":"Equal","value":"true"}]"#;

    #[test]
    fn the_charts_node_selector_parses() {
        let s = parse_selector(CHART_NODE_SELECTOR).unwrap();
        assert_eq!(
            s,
            BTreeMap::from([("otm.dev/kata".to_owned(), "true".to_owned())])
        );
        let s = parse_selector(" a=1 , b.example.com/c = x,,").unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s["b.example.com/c"], "x");
        assert_eq!(parse_selector("").unwrap(), BTreeMap::new());
        assert_eq!(parse_selector("a=").unwrap()["a"], "");
        for bad in ["novalue", "=v", "a=1,b"] {
            assert!(parse_selector(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_charts_tolerations_parse() {
        let t = parse_tolerations(CHART_TOLERATIONS).unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].key.as_deref(), Some("otm.dev/kata"));
        assert_eq!(t[0].operator.as_deref(), Some("Equal"));
        assert_eq!(t[0].value.as_deref(), Some("true"));
        assert_eq!(t[0].effect.as_deref(), Some("NoSchedule"));
        assert!(parse_tolerations("").unwrap().is_empty());
        assert!(parse_tolerations("  ").unwrap().is_empty());
        assert!(parse_tolerations("[]").unwrap().is_empty());
        for bad in [
            "otm.dev/kata=true:NoSchedule",
            r#"{"key":"otm.dev/kata"}"#,
            r#"[{"key":1}]"#,
        ] {
            assert!(parse_tolerations(bad).is_err(), "{bad}");
        }
    }
}
