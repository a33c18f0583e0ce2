//! [`App`]: the context every component gets. Tests build one with their own backends.

use crate::config::Settings;
use crate::metrics::Metrics;
use crate::telegram::Telegram;
use otm_core::{Coordinator, Registry, Runtime, Secret, StateStore, TenantId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Egress calls (Bot API and model) one tenant may have under way at once; more are answered
/// 429 at once.
pub const EGRESS_CALLS_PER_TENANT: usize = 32;

/// Request bodies the egress proxies hold in memory at once, together: 256 MiB (in KiB). A call
/// whose body does not fit waits for room, then gets 503.
pub const EGRESS_BUFFER_KIB: u32 = 256 * 1024;

/// Shared state of one server process.
#[derive(Debug)]
pub struct App {
    pub settings: Settings,
    /// The registry, behind [`otm_store::SealedRegistry`]: tenants' secrets are encrypted
    /// before they reach the backend.
    pub registry: Arc<dyn Registry>,
    /// The same registry, for key rotation.
    pub sealed: Arc<otm_store::SealedRegistry>,
    /// The key file's keys: shim tokens are derived from them.
    pub keys: Arc<otm_store::SecretKeys>,
    pub coordinator: Arc<dyn Coordinator>,
    pub state: Arc<dyn StateStore>,
    pub runtime: Arc<dyn Runtime>,
    pub metrics: Metrics,
    /// The real Bot API.
    pub telegram: Telegram,
    /// Outbound HTTP for the Bot API proxy.
    pub http: reqwest::Client,
    /// The Bot API proxy's root as agents see it.
    pub egress_url: String,
    pub admin_token: Secret,
    pub started: Instant,
    pub shutdown: CancellationToken,
    /// One lock per tenant: wakes join, stops wait.
    pub(crate) tenant_locks: Mutex<HashMap<TenantId, Arc<tokio::sync::Mutex<()>>>>,
    /// Running dispatchers, woken through their `Notify`.
    pub(crate) dispatchers: Mutex<HashMap<TenantId, Arc<Notify>>>,
    /// True while this process holds the leader lease.
    leader: std::sync::atomic::AtomicBool,
    /// In the router role: the orchestrators that wake tenants.
    pub remote: Option<crate::remote::OrchestratorClient>,
    /// The last limit each tenant's instance ran into, as this process saw it.
    pub(crate) limit_kills: Mutex<HashMap<TenantId, LimitKill>>,
    /// The last wake of each tenant that could not restore its head snapshot, as this process
    /// saw it.
    pub(crate) restore_fallbacks: Mutex<HashMap<TenantId, RestoreFallback>>,
    /// Wakes under way in this process (admission control).
    pub(crate) wakes_in_flight: std::sync::atomic::AtomicUsize,
    /// The Bot API proxy's per-bot rate limits.
    pub bot_limiter: crate::bot_limits::BotLimiter,
    /// The model proxy's per-tenant budgets.
    pub model_budgets: crate::model_budget::ModelBudgets,
    /// Calls each tenant has under way through the egress proxies.
    pub(crate) egress_in_flight: Mutex<HashMap<TenantId, Arc<tokio::sync::Semaphore>>>,
    /// The egress proxies' request bodies held in memory at once, in KiB.
    pub egress_buffer: Arc<tokio::sync::Semaphore>,
    /// Held while secrets are rotated: one rotation at a time.
    pub(crate) rotation: tokio::sync::Mutex<()>,
}

pub use otm_core::admin_api::{LimitKill, RestoreFallback, SkippedSnapshot};

impl App {
    /// Assembles the context.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        settings: Settings,
        registry: Arc<otm_store::SealedRegistry>,
        coordinator: Arc<dyn Coordinator>,
        state: Arc<dyn StateStore>,
        runtime: Arc<dyn Runtime>,
        egress_url: String,
        admin_token: Secret,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .pool_idle_timeout(std::time::Duration::from_secs(60))
            .build()
            .expect("HTTP client");
        let remote = (settings.role == "router").then(|| {
            crate::remote::OrchestratorClient::new(
                settings.orchestrator_urls(),
                settings
                    .service_token
                    .clone()
                    .unwrap_or_else(|| Secret::new("")),
                http.clone(),
                std::time::Duration::from_secs(settings.wake_timeout_s + 30),
            )
        });
        let bot_limits = crate::bot_limits::BotLimits::from_settings(&settings);
        Arc::new(App {
            remote,
            telegram: Telegram::new(&settings.telegram_api, http.clone()),
            settings,
            keys: registry.keys().clone(),
            sealed: registry.clone(),
            registry,
            coordinator,
            state,
            runtime,
            metrics: Metrics::new(),
            http,
            egress_url,
            admin_token,
            started: Instant::now(),
            shutdown,
            tenant_locks: Mutex::new(HashMap::new()),
            dispatchers: Mutex::new(HashMap::new()),
            limit_kills: Mutex::new(HashMap::new()),
            restore_fallbacks: Mutex::new(HashMap::new()),
            wakes_in_flight: std::sync::atomic::AtomicUsize::new(0),
            bot_limiter: crate::bot_limits::BotLimiter::new(bot_limits),
            model_budgets: Default::default(),
            egress_in_flight: Mutex::new(HashMap::new()),
            egress_buffer: Arc::new(tokio::sync::Semaphore::new(EGRESS_BUFFER_KIB as usize)),
            rotation: tokio::sync::Mutex::new(()),
            leader: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// True while this process holds the leader lease.
    pub(crate) fn record_limit_kill(
        &self,
        tenant: &TenantId,
        limit: otm_core::LimitKind,
        detail: &str,
    ) {
        let kill = LimitKill {
            limit,
            detail: detail.to_owned(),
            at_ms: otm_core::time::now_ms(),
        };
        self.limit_kills
            .lock()
            .unwrap()
            .insert(tenant.clone(), kill);
    }

    /// The last limit kill of a tenant's instance seen by this process.
    pub fn last_limit_kill(&self, tenant: &TenantId) -> Option<LimitKill> {
        self.limit_kills.lock().unwrap().get(tenant).cloned()
    }

    pub(crate) fn record_restore_fallback(
        &self,
        tenant: &TenantId,
        restored: Option<otm_core::SnapshotId>,
        skipped: Vec<SkippedSnapshot>,
    ) {
        let fallback = RestoreFallback {
            restored,
            skipped,
            at_ms: otm_core::time::now_ms(),
        };
        self.restore_fallbacks
            .lock()
            .unwrap()
            .insert(tenant.clone(), fallback);
    }

    /// The last wake of a tenant, seen by this process, that skipped snapshots it could not
    /// restore.
    pub fn last_restore_fallback(&self, tenant: &TenantId) -> Option<RestoreFallback> {
        self.restore_fallbacks.lock().unwrap().get(tenant).cloned()
    }

    /// A tenant's model budget in force: its own, else this server's default.
    pub fn model_budget(&self, t: &otm_core::Tenant) -> crate::model_budget::Budget {
        let (rpm, tpd) = t.limits.model_budget(
            self.settings.model_requests_per_minute,
            self.settings.model_tokens_per_day,
        );
        crate::model_budget::Budget {
            requests_per_minute: rpm,
            tokens_per_day: tpd,
        }
    }

    /// A tenant's model budget and what it used of it, as this process counted.
    pub fn model_budget_view(&self, t: &otm_core::Tenant) -> crate::model_budget::BudgetView {
        self.model_budgets.view(
            &t.id,
            self.model_budget(t),
            Instant::now(),
            otm_core::time::now_ms(),
        )
    }

    /// A slot for one egress call of `tenant`, or `None` when it has
    /// [`EGRESS_CALLS_PER_TENANT`] under way already: one tenant cannot take the whole
    /// listener's concurrency.
    pub(crate) fn egress_slot(
        &self,
        tenant: &TenantId,
    ) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let sem = self
            .egress_in_flight
            .lock()
            .unwrap()
            .entry(tenant.clone())
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(EGRESS_CALLS_PER_TENANT)))
            .clone();
        sem.try_acquire_owned().ok()
    }

    pub fn is_leader(&self) -> bool {
        self.leader.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub(crate) fn set_leader(&self, leader: bool) {
        self.leader
            .store(leader, std::sync::atomic::Ordering::SeqCst);
    }

    /// The lock that serializes wakes and stops of one tenant in this process.
    pub(crate) fn tenant_lock(&self, tenant: &TenantId) -> Arc<tokio::sync::Mutex<()>> {
        self.tenant_locks
            .lock()
            .unwrap()
            .entry(tenant.clone())
            .or_default()
            .clone()
    }

    /// The URL Telegram should call for a tenant, if a public URL is configured.
    pub fn webhook_url(&self, tenant: &TenantId) -> Option<String> {
        self.settings
            .public_url
            .as_ref()
            .map(|u| format!("{}/tg/{tenant}", u.trim_end_matches('/')))
    }
}
