//! An [`App`] on in-process backends for tests under `tokio::time::pause()`: the in-memory
//! registry and coordinator, snapshots in a temporary directory, the stand-in runtime, and a
//! [`Clock`] that follows tokio's clock.
#![allow(dead_code)]

pub mod registry;
pub mod runtime;

use otm_core::{Registry, Secret, Tenant, TenantId, TenantLimits, TenantStatus};
use otm_server::clock::Clock;
use otm_server::wake::Waker;
use otm_server::{App, Settings};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub struct World {
    pub app: Arc<App>,
    pub runtime: Arc<runtime::FakeRuntime>,
    pub shutdown: CancellationToken,
    pub dir: tempfile::TempDir,
}

impl World {
    /// A world whose settings `f` adjusts; no loop runs yet.
    pub async fn new(f: impl FnOnce(&mut Settings)) -> World {
        World::on(
            Arc::new(registry::MemoryRegistry::default()),
            Arc::new(otm_store::SecretKeys::ephemeral()),
            f,
        )
        .await
    }

    /// A world on the registry `inner`, its secrets sealed with `keys` (the same registry and
    /// keys again: the world after a restart).
    pub async fn on(
        inner: Arc<dyn Registry>,
        keys: Arc<otm_store::SecretKeys>,
        f: impl FnOnce(&mut Settings),
    ) -> World {
        World::build(inner, keys, f, |me| {
            Arc::new(otm_server::orchestrator::Local::new(me))
        })
        .await
    }

    /// A world whose tenants are woken by what `waker` makes (given the [`App`] it serves)
    /// instead of the orchestrator in this process.
    pub async fn with_waker(
        f: impl FnOnce(&mut Settings),
        waker: impl FnOnce(std::sync::Weak<App>) -> Arc<dyn Waker>,
    ) -> World {
        World::build(
            Arc::new(registry::MemoryRegistry::default()),
            Arc::new(otm_store::SecretKeys::ephemeral()),
            f,
            waker,
        )
        .await
    }

    async fn build(
        inner: Arc<dyn Registry>,
        keys: Arc<otm_store::SecretKeys>,
        f: impl FnOnce(&mut Settings),
        waker: impl FnOnce(std::sync::Weak<App>) -> Arc<dyn Waker>,
    ) -> World {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = Settings {
            data_dir: dir.path().join("d"),
            ..Settings::default()
        };
        f(&mut settings);
        std::fs::create_dir_all(&settings.data_dir).unwrap();
        let registry = Arc::new(otm_store::SealedRegistry::new(inner, keys));
        let state = otm_store::open::open_state_store(&format!(
            "file://{}",
            dir.path().join("state").display()
        ))
        .await
        .unwrap();
        let runtime = Arc::new(runtime::FakeRuntime::new());
        let shutdown = CancellationToken::new();
        let app = App::new(
            settings,
            registry,
            Arc::new(otm_store::MemoryCoordinator::new()),
            state,
            runtime.clone(),
            "http://127.0.0.1:9".into(),
            Secret::new("admin"),
            shutdown.clone(),
            Clock::tokio(),
            |me, _| waker(me),
        );
        World {
            app,
            runtime,
            shutdown,
            dir,
        }
    }

    /// Starts the loops of an orchestrator that delivers: leader election, delivery requests,
    /// the idle reaper and the warm pool.
    pub fn run_loops(&self) {
        let app = &self.app;
        tokio::spawn(otm_server::orchestrator::run_leader_election(app.clone()));
        tokio::spawn(otm_server::dispatch::run_delivery_requests(app.clone()));
        tokio::spawn(otm_server::orchestrator::run_reaper(app.clone()));
        tokio::spawn(otm_server::orchestrator::run_warm_pool(app.clone()));
    }

    pub fn registry(&self) -> &Arc<dyn Registry> {
        self.app.registry()
    }

    /// A tenant of the reference profile that falls idle after `idle_timeout_s`.
    pub async fn tenant(&self, id: &str, idle_timeout_s: u64) -> TenantId {
        let now = self.app.clock().now_ms();
        let t = Tenant {
            id: TenantId::parse(id).unwrap(),
            profile: "reference".into(),
            idle_timeout_s,
            bot_token: Some(Secret::new("1:AAAA")),
            webhook_secret: Secret::new("hook"),
            cold_start_notice: false,
            status: TenantStatus::Idle,
            created_at_ms: now,
            last_active_ms: now,
            limits: TenantLimits::default(),
        };
        self.registry().create_tenant(&t).await.unwrap();
        t.id
    }

    /// Stores an update for `tenant` and starts its dispatcher, as the webhook does.
    pub async fn update(&self, tenant: &TenantId, update_id: i64) {
        let payload = serde_json::to_vec(&serde_json::json!({
            "update_id": update_id,
            "message": {"message_id": update_id, "chat": {"id": 7}, "text": "hi"}
        }))
        .unwrap();
        self.registry()
            .inbox_append(tenant, update_id, &payload)
            .await
            .unwrap();
        otm_server::dispatch::kick(&self.app, tenant);
    }

    /// Lets the world run until `done` holds, checking every 10 ms of tokio's clock, for at most
    /// `within` of it.
    pub async fn until<F: AsyncFnMut() -> bool>(&self, within: Duration, mut done: F) {
        let deadline = tokio::time::Instant::now() + within;
        while !done().await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "not done within {within:?} of tokio's clock"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn status(&self, tenant: &TenantId) -> TenantStatus {
        self.registry()
            .get_tenant(tenant)
            .await
            .unwrap()
            .unwrap()
            .status
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
