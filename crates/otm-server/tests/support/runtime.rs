//! A [`Runtime`] whose instances live in the test process: each is a stand-in shim (an axum
//! router on a Unix socket of its own) that answers the shim API at once. Binding, restoring and
//! stopping always work; deliveries are acknowledged, or refused while [`Shims::refuse`] is set;
//! snapshots are an archive of an empty directory.

use async_trait::async_trait;
use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use futures::stream::BoxStream;
use otm_core::shim_api::{
    BindRequest, BindResponse, DeliverResponse, FreezeResponse, ShimStatus, StopResponse,
};
use otm_core::{
    Error, InstanceId, InstanceSpec, Result, Runtime, RuntimeEvent, RuntimeInstance, TenantId,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// What every stand-in shim of one runtime shares: switches and counters a test reads.
#[derive(Debug, Default)]
pub struct Shims {
    /// Deliveries are answered as refused by the agent while set.
    pub refuse: AtomicBool,
    /// Deliveries received (acknowledged or not).
    pub deliveries: AtomicUsize,
    /// Deliveries are received but not answered while set (an agent in the middle of a turn).
    pub hold: AtomicBool,
    /// How long the stand-in agent takes over each delivery, in ms.
    pub turn_ms: AtomicU64,
    /// Instances created, warm ones included.
    pub created: AtomicUsize,
    /// Instances deleted.
    pub deleted: AtomicUsize,
    /// Freezes and thaws that changed something.
    pub freezes: AtomicUsize,
    pub thaws: AtomicUsize,
}

/// What a frozen stand-in agent reports holding.
pub const FROZEN_MEMORY: u64 = 10 << 20;

#[derive(Debug)]
pub struct FakeRuntime {
    dir: tempfile::TempDir,
    pub shims: Arc<Shims>,
    archive: bytes::Bytes,
    running: Mutex<HashMap<InstanceId, Running>>,
}

#[derive(Debug)]
struct Running {
    address: String,
    tenant: Option<TenantId>,
    stop: tokio_util::sync::CancellationToken,
}

impl FakeRuntime {
    pub fn new() -> FakeRuntime {
        let empty = tempfile::tempdir().unwrap();
        let mut archive = Vec::new();
        otm_shim::archive::pack(empty.path(), &[], &Default::default(), &mut archive).unwrap();
        FakeRuntime {
            dir: tempfile::tempdir().unwrap(),
            shims: Arc::default(),
            archive: archive.into(),
            running: Mutex::default(),
        }
    }

    /// Instances running now.
    pub fn running(&self) -> usize {
        self.running.lock().unwrap().len()
    }
}

#[derive(Clone)]
struct Shim {
    id: InstanceId,
    shims: Arc<Shims>,
    archive: bytes::Bytes,
    tenant: Arc<Mutex<Option<TenantId>>>,
    frozen: Arc<AtomicBool>,
}

async fn status(State(s): State<Shim>) -> Json<ShimStatus> {
    let tenant = s.tenant.lock().unwrap().clone();
    Json(ShimStatus {
        instance: s.id.to_string(),
        agent: if tenant.is_some() { "running" } else { "idle" }.into(),
        tenant,
        profile: Some("reference".into()),
        agent_pid: None,
        restarts: 0,
        frozen: s.frozen.load(Ordering::SeqCst),
        memory_bytes: Some(FROZEN_MEMORY),
    })
}

async fn freeze(State(s): State<Shim>) -> Json<FreezeResponse> {
    let changed = !s.frozen.swap(true, Ordering::SeqCst);
    if changed {
        s.shims.freezes.fetch_add(1, Ordering::SeqCst);
    }
    Json(FreezeResponse {
        frozen: true,
        changed,
        method: Some("sigstop".into()),
        memory_bytes: FROZEN_MEMORY,
        micros: 0,
    })
}

async fn thaw(State(s): State<Shim>) -> Json<FreezeResponse> {
    let changed = s.frozen.swap(false, Ordering::SeqCst);
    if changed {
        s.shims.thaws.fetch_add(1, Ordering::SeqCst);
    }
    Json(FreezeResponse {
        frozen: false,
        changed,
        ..Default::default()
    })
}

async fn bind(State(s): State<Shim>, Json(req): Json<BindRequest>) -> Json<BindResponse> {
    *s.tenant.lock().unwrap() = Some(req.tenant);
    Json(BindResponse::default())
}

async fn deliver(State(s): State<Shim>) -> Json<DeliverResponse> {
    // A real shim thaws a frozen agent before delivering.
    s.frozen.store(false, Ordering::SeqCst);
    s.shims.deliveries.fetch_add(1, Ordering::SeqCst);
    let turn = s.shims.turn_ms.load(Ordering::SeqCst);
    if turn > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(turn)).await;
    }
    while s.shims.hold.load(Ordering::SeqCst) {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let refuse = s.shims.refuse.load(Ordering::SeqCst);
    Json(DeliverResponse {
        acknowledged: !refuse,
        status: if refuse { 500 } else { 200 },
        detail: refuse.then(|| "the agent refused the update".into()),
    })
}

#[async_trait]
impl Runtime for FakeRuntime {
    fn name(&self) -> &'static str {
        "fake"
    }

    fn isolation(&self) -> String {
        "none (in-process stand-in)".into()
    }

    async fn create(&self, spec: &InstanceSpec) -> Result<RuntimeInstance> {
        let socket = self.dir.path().join(format!("{}.sock", spec.id));
        let listener = tokio::net::UnixListener::bind(&socket)
            .map_err(|e| Error::generic("fake runtime", e))?;
        let shim = Shim {
            id: spec.id.clone(),
            shims: self.shims.clone(),
            archive: self.archive.clone(),
            tenant: Arc::default(),
            frozen: Arc::default(),
        };
        let router = Router::new()
            .route("/v1/status", get(status))
            .route("/v1/state", put(|| async { StatusCode::NO_CONTENT }))
            .route("/v1/bind", post(bind))
            .route("/v1/deliver", post(deliver))
            .route("/v1/freeze", post(freeze))
            .route("/v1/thaw", post(thaw))
            .route(
                "/v1/snapshot",
                get(|State(s): State<Shim>| async move { s.archive.clone() }),
            )
            .route(
                "/v1/stop",
                post(|State(s): State<Shim>| async move {
                    *s.tenant.lock().unwrap() = None;
                    Json(StopResponse::default())
                }),
            )
            .with_state(shim);
        let stop = tokio_util::sync::CancellationToken::new();
        let until = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(until.cancelled_owned())
                .await;
        });
        let address = format!("unix:{}", socket.display());
        self.shims.created.fetch_add(1, Ordering::SeqCst);
        self.running.lock().unwrap().insert(
            spec.id.clone(),
            Running {
                address: address.clone(),
                tenant: spec.tenant.clone(),
                stop,
            },
        );
        Ok(RuntimeInstance {
            id: spec.id.clone(),
            address,
            alive: true,
            tenant: spec.tenant.clone(),
            created_at_ms: Some(otm_core::time::now_ms()),
        })
    }

    async fn list(&self) -> Result<Vec<RuntimeInstance>> {
        Ok(self
            .running
            .lock()
            .unwrap()
            .iter()
            .map(|(id, r)| RuntimeInstance {
                id: id.clone(),
                address: r.address.clone(),
                alive: true,
                tenant: r.tenant.clone(),
                created_at_ms: None,
            })
            .collect())
    }

    async fn delete(&self, id: &InstanceId) -> Result<()> {
        if let Some(r) = self.running.lock().unwrap().remove(id) {
            r.stop.cancel();
            self.shims.deleted.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }

    fn events(&self) -> BoxStream<'static, RuntimeEvent> {
        Box::pin(futures::stream::pending())
    }
}
