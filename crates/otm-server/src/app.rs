//! [`App`]: the context every component gets. Tests build one with their own backends.

use crate::clock::Clock;
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::telegram::Telegram;
use crate::wake::{Waker, Woken};
use otm_core::{Coordinator, Registry, Runtime, Secret, StateStore, TenantId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Egress calls (Bot API and model) one tenant may have under way at once; more are answered
/// 429 at once.
pub const EGRESS_CALLS_PER_TENANT: usize = 32;

/// Request bodies the egress proxies hold in memory at once, together: 256 MiB (in KiB). A call
/// whose body does not fit waits for room, then gets 503.
pub const EGRESS_BUFFER_KIB: u32 = 256 * 1024;

/// While an egress call runs, how often it refreshes its tenant's last activity (so that other
/// replicas' idle sweeps see the tenant busy too).
const EGRESS_HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(10);

/// One egress call under way ([`App::egress_slot`]): the tenant is busy until it is dropped.
#[derive(Debug)]
pub(crate) struct EgressCall {
    _permit: tokio::sync::OwnedSemaphorePermit,
    done: CancellationToken,
}

impl Drop for EgressCall {
    fn drop(&mut self) {
        self.done.cancel();
    }
}

/// Shared state of one server process.
#[derive(Debug)]
pub struct App {
    settings: Settings,
    /// The registry, behind [`otm_store::SealedRegistry`]: tenants' secrets are encrypted
    /// before they reach the backend.
    registry: Arc<dyn Registry>,
    /// The same registry, for key rotation.
    sealed: Arc<otm_store::SealedRegistry>,
    /// The key file's keys: shim tokens are derived from them.
    keys: Arc<otm_store::SecretKeys>,
    coordinator: Arc<dyn Coordinator>,
    state: Arc<dyn StateStore>,
    runtime: Arc<dyn Runtime>,
    metrics: Metrics,
    /// The real Bot API.
    telegram: Telegram,
    /// Outbound HTTP for the Bot API proxy.
    http: reqwest::Client,
    /// The Bot API proxy's root as agents see it.
    egress_url: String,
    admin_token: Secret,
    started: Instant,
    /// Wall time: the system's, or in tests tokio's (see [`Clock`]).
    clock: Clock,
    shutdown: CancellationToken,
    /// One lock per tenant: wakes join, stops wait.
    tenant_locks: Mutex<HashMap<TenantId, Arc<tokio::sync::Mutex<()>>>>,
    /// Running dispatchers, woken through their `Notify`.
    dispatchers: Mutex<HashMap<TenantId, Arc<Notify>>>,
    /// True while this process holds the leader lease.
    leader: std::sync::atomic::AtomicBool,
    /// What wakes tenants once the endpoint cache missed: the orchestrator here, or in the
    /// router role the orchestrators over HTTP.
    waker: Arc<dyn Waker>,
    /// True in the router role: another process wakes and runs instances.
    routed: bool,
    /// Tenants whose inbox should be looked at again (see [`App::request_delivery`]).
    kicks: tokio::sync::mpsc::UnboundedSender<TenantId>,
    kicks_rx: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<TenantId>>>,
    /// Every task spawned for a tenant (dispatchers, idle stops, egress heartbeats, CONNECT
    /// tunnels) and the console's sampler: shutdown waits for them, within its grace period, so
    /// dispatchers finish and release their leases.
    tasks: tokio_util::task::TaskTracker,
    /// The last limit each tenant's instance ran into, as this process saw it.
    limit_kills: Mutex<HashMap<TenantId, LimitKill>>,
    /// The last wake of each tenant that could not restore its head snapshot, as this process
    /// saw it.
    restore_fallbacks: Mutex<HashMap<TenantId, RestoreFallback>>,
    /// Wakes under way in this process (admission control).
    wakes_in_flight: std::sync::atomic::AtomicUsize,
    /// The Bot API proxy's per-bot rate limits.
    bot_limiter: crate::bot_limits::BotLimiter,
    /// The model proxy's per-tenant budgets.
    model_budgets: crate::model_budget::ModelBudgets,
    /// Calls each tenant has under way through the egress proxies.
    egress_in_flight: Mutex<HashMap<TenantId, Arc<tokio::sync::Semaphore>>>,
    /// The egress proxies' request bodies held in memory at once, in KiB.
    egress_buffer: Arc<tokio::sync::Semaphore>,
    /// Held while secrets are rotated: one rotation at a time.
    rotation: tokio::sync::Mutex<()>,
    /// The last wake of each tenant that did more than read the cache, as this process saw it.
    last_wakes: Mutex<HashMap<TenantId, LastWake>>,
    /// When `otm_instances` was last read from the registry, and whether a reading is
    /// scheduled (see [`App::instance_gauge_due`]).
    instance_gauge: Mutex<(Option<tokio::time::Instant>, bool)>,
    /// Tenants' webhook secrets, so that accepting an update needs no registry read.
    webhook_secrets: crate::webhook_secrets::WebhookSecrets,
    surrogates: crate::surrogate::Surrogates,
}

/// The outcome of a tenant's last wake that did more than read the cache (the console shows it).
#[derive(Clone, Debug)]
pub struct LastWake {
    /// When it ended, wall time in milliseconds.
    pub at_ms: i64,
    /// `warm` or `cold`; empty when it failed.
    pub path: String,
    pub total_ms: u64,
    /// `claim` or `create`, `restore`, `start`, `ready`, in order, in milliseconds.
    pub phases: Vec<(String, u64)>,
    /// Why it failed; `None` when it succeeded.
    pub error: Option<String>,
}

pub use otm_core::admin_api::{LimitKill, RestoreFallback, SkippedSnapshot};

/// The name of the bootstrap admin token in the audit trail.
pub const ADMIN_NAME: &str = "admin";
/// Who a failed sign-in was, in the audit trail.
pub const UNKNOWN_CALLER: &str = "unknown";

/// Who made an admin call: the name of the token it presented, and what that token may do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    /// May read everything and change nothing.
    pub read_only: bool,
}

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
        clock: Clock,
        make_waker: impl FnOnce(std::sync::Weak<App>, &reqwest::Client) -> Arc<dyn Waker>,
    ) -> Arc<Self> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .pool_idle_timeout(std::time::Duration::from_secs(60))
            .build()
            .expect("HTTP client");
        let routed = settings.role == crate::config::Role::Router;
        let (kicks, kicks_rx) = tokio::sync::mpsc::unbounded_channel();
        let bot_limits = crate::bot_limits::BotLimits::from_settings(&settings);
        Arc::new_cyclic(|me| App {
            waker: make_waker(me.clone(), &http),
            routed,
            kicks,
            kicks_rx: Mutex::new(Some(kicks_rx)),
            tasks: tokio_util::task::TaskTracker::new(),
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
            clock,
            shutdown,
            tenant_locks: Mutex::new(HashMap::new()),
            dispatchers: Mutex::new(HashMap::new()),
            limit_kills: Mutex::new(HashMap::new()),
            restore_fallbacks: Mutex::new(HashMap::new()),
            wakes_in_flight: std::sync::atomic::AtomicUsize::new(0),
            bot_limiter: crate::bot_limits::BotLimiter::new(bot_limits),
            webhook_secrets: Default::default(),
            surrogates: Default::default(),
            model_budgets: Default::default(),
            egress_in_flight: Mutex::new(HashMap::new()),
            egress_buffer: Arc::new(tokio::sync::Semaphore::new(EGRESS_BUFFER_KIB as usize)),
            rotation: tokio::sync::Mutex::new(()),
            last_wakes: Mutex::new(HashMap::new()),
            instance_gauge: Mutex::new((None, false)),
            leader: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Makes sure a tenant has a ready instance and returns its endpoint: the one way every
    /// caller (dispatchers, the admin API, the orchestrators' internal API) wakes a tenant.
    /// `chat` is the chat waiting, told that the agent is starting when the tenant asks for that.
    ///
    /// The locking scheme, outermost first:
    /// 1. The endpoint cache (the coordinator) is read without a lock: a hit is an awake tenant
    ///    and costs one cache read. Entries are signed and checked by the coordinator, and a
    ///    delivery that fails clears the entry, so a stale one costs one failed attempt.
    /// 2. On a miss the [`Waker`] takes over. In the router role it asks an orchestrator over
    ///    HTTP, which goes on from 1. In an orchestrator ([`crate::orchestrator::Local`]):
    /// 3. the tenant's lock in this process ([`App::tenant_lock`]): concurrent wakes of one
    ///    tenant join, and a stop waits for a wake under way; the cache is read again under it;
    /// 4. the registry: an instance registered ready that answers serves the wake (its endpoint
    ///    goes back into the cache);
    /// 5. the coordinator's lease `wake:{tenant}`, waited for while another replica holds it.
    ///    Its fence goes with every write of the wake (tenant status, instance records), and the
    ///    registry refuses a write whose fence is smaller than one already used, so a replica
    ///    that lost the lease cannot overwrite its successor's. The lease is renewed while the
    ///    wake runs; a wake whose lease is lost fails.
    ///
    /// Stops take the same tenant lock and lease, so a wake and a stop of one tenant never
    /// overlap. Dispatchers hold a lease of their own (`dispatch:{tenant}`), see
    /// [`crate::dispatch`].
    pub async fn wake(&self, tenant: &TenantId, chat: Option<i64>) -> otm_core::Result<Woken> {
        let begun = Instant::now();
        // An awake tenant, the case of nearly every delivery: the cached endpoint, no span.
        if let Some(ep) = self.coordinator.endpoint(tenant).await? {
            return Ok(Woken::cached(ep, begun));
        }
        self.wake_uncached(tenant, chat).await
    }

    #[tracing::instrument(name = "wake", skip_all, fields(%tenant, instance = tracing::field::Empty))]
    async fn wake_uncached(&self, tenant: &TenantId, chat: Option<i64>) -> otm_core::Result<Woken> {
        let woken = match self.waker.wake(tenant, chat).await {
            Ok(w) => w,
            Err(e) => {
                // Held back by admission control is waiting, not failing.
                if !matches!(&e, otm_core::Error::Unavailable { backend, .. } if *backend == crate::wake::ADMISSION)
                {
                    self.record_wake(tenant, None, Some(e.to_string()));
                }
                return Err(e);
            }
        };
        tracing::Span::current().record("instance", tracing::field::display(&woken.instance));
        if woken.path != crate::wake::WakePath::Cache {
            self.record_wake(tenant, Some(&woken), None);
        }
        Ok(woken)
    }

    fn record_wake(&self, tenant: &TenantId, woken: Option<&Woken>, error: Option<String>) {
        let last = LastWake {
            at_ms: self.clock.now_ms(),
            path: woken
                .map(|w| w.path.as_str().to_owned())
                .unwrap_or_default(),
            total_ms: woken.map_or(0, |w| w.total_ms),
            phases: woken.map(|w| w.phases.clone()).unwrap_or_default(),
            error,
        };
        self.last_wakes.lock().unwrap().insert(tenant.clone(), last);
    }

    /// The last wake of `tenant` that did more than read the cache, as this process saw it.
    pub fn last_wake(&self, tenant: &TenantId) -> Option<LastWake> {
        self.last_wakes.lock().unwrap().get(tenant).cloned()
    }

    /// The settings this server started with.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The registry, behind [`otm_store::SealedRegistry`]: tenants' secrets are encrypted before
    /// they reach the backend.
    pub fn registry(&self) -> &Arc<dyn Registry> {
        &self.registry
    }

    /// The same registry, for key rotation.
    pub fn sealed(&self) -> &Arc<otm_store::SealedRegistry> {
        &self.sealed
    }

    /// The key file's keys: shim tokens are derived from them.
    pub fn keys(&self) -> &Arc<otm_store::SecretKeys> {
        &self.keys
    }

    pub fn coordinator(&self) -> &Arc<dyn Coordinator> {
        &self.coordinator
    }

    /// Where snapshots are kept.
    pub fn state(&self) -> &Arc<dyn StateStore> {
        &self.state
    }

    pub fn runtime(&self) -> &Arc<dyn Runtime> {
        &self.runtime
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The real Bot API.
    pub fn telegram(&self) -> &Telegram {
        &self.telegram
    }

    /// Outbound HTTP for the egress proxies and the orchestrators' internal API.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// The Bot API proxy's root as agents see it.
    pub fn egress_url(&self) -> &str {
        &self.egress_url
    }

    pub fn admin_token(&self) -> &Secret {
        &self.admin_token
    }

    /// How long this server has run.
    pub fn uptime(&self) -> std::time::Duration {
        self.started.elapsed()
    }

    /// Cancelled when the server shuts down.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// Tenants' webhook secrets as this process keeps them.
    pub fn webhook_secrets(&self) -> &crate::webhook_secrets::WebhookSecrets {
        &self.webhook_secrets
    }

    /// The tenants of surrogate tokens as this process keeps them.
    pub fn surrogates(&self) -> &crate::surrogate::Surrogates {
        &self.surrogates
    }

    /// A tenant was deleted, created or changed: forget what this process keeps of it, and tell
    /// the other replicas to do the same (best effort; their entries expire soon anyway).
    pub async fn tenant_changed(&self, tenant: &TenantId) {
        self.webhook_secrets.forget(tenant);
        self.surrogates.forget_tenant(tenant);
        if let Err(e) = self
            .coordinator
            .publish(otm_core::Notification::TenantChanged {
                tenant: tenant.clone(),
            })
            .await
        {
            tracing::warn!(%tenant, error = %e, "could not tell other replicas that a tenant changed");
        }
    }

    /// The Bot API proxy's per-bot rate limits.
    pub fn bot_limiter(&self) -> &crate::bot_limits::BotLimiter {
        &self.bot_limiter
    }

    /// The model proxy's per-tenant budgets.
    pub fn model_budgets(&self) -> &crate::model_budget::ModelBudgets {
        &self.model_budgets
    }

    /// The egress proxies' request bodies held in memory at once, in KiB.
    pub(crate) fn egress_buffer(&self) -> &Arc<tokio::sync::Semaphore> {
        &self.egress_buffer
    }

    /// Held while secrets are rotated: one rotation at a time.
    pub(crate) fn rotation_lock(&self) -> &tokio::sync::Mutex<()> {
        &self.rotation
    }

    /// When to read the instances for `otm_instances` next, at most once every `every`: now
    /// (`None`), at the returned instant (the caller schedules that reading), or never, when one
    /// is already scheduled (`Some(None)`).
    pub(crate) fn instance_gauge_due(
        &self,
        every: std::time::Duration,
    ) -> Option<Option<tokio::time::Instant>> {
        let now = tokio::time::Instant::now();
        let mut g = self.instance_gauge.lock().unwrap();
        match *g {
            (_, true) => Some(None),
            (Some(last), false) if now < last + every => {
                g.1 = true;
                Some(Some(last + every))
            }
            _ => {
                *g = (Some(now), false);
                None
            }
        }
    }

    /// A scheduled reading of the instances for `otm_instances` runs now.
    pub(crate) fn instance_gauge_reading(&self) {
        *self.instance_gauge.lock().unwrap() = (Some(tokio::time::Instant::now()), false);
    }

    /// Counts a wake starting in this process (admission control); the wakes now under way.
    pub(crate) fn wake_started(&self) -> usize {
        self.wakes_in_flight
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1
    }

    /// Counts a wake that ended (or was not admitted); the wakes still under way.
    pub(crate) fn wake_ended(&self) -> usize {
        self.wakes_in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst)
            - 1
    }

    /// Nudges `tenant`'s dispatcher in this process and answers `None`, or, when none runs,
    /// registers one and answers the `Notify` it is to wait on.
    pub(crate) fn register_dispatcher(&self, tenant: &TenantId) -> Option<Arc<Notify>> {
        let mut running = self.dispatchers.lock().unwrap();
        if let Some(notify) = running.get(tenant) {
            notify.notify_one();
            return None;
        }
        let notify = Arc::new(Notify::new());
        running.insert(tenant.clone(), notify.clone());
        Some(notify)
    }

    /// Forgets `tenant`'s dispatcher: it ends, and the next kick starts another.
    pub(crate) fn dispatcher_ended(&self, tenant: &TenantId) {
        self.dispatchers.lock().unwrap().remove(tenant);
    }

    /// Wall time as this server sees it: timestamps written to the registry and idle and age
    /// decisions use it.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// True in the router role: the instances run elsewhere.
    pub fn routed(&self) -> bool {
        self.routed
    }

    /// Who a presented admin token is: the bootstrap token (`admin.token`, `OTM_ADMIN_TOKEN`) is
    /// `admin` with every right; a named token is looked up by its SHA-256 in the registry on
    /// every call, so a revoked one is refused at once by every replica. `Ok(None)`: no such
    /// token.
    pub async fn authenticate(&self, token: &str) -> otm_core::Result<Option<Caller>> {
        if self.admin_token.matches(token) {
            return Ok(Some(Caller {
                name: ADMIN_NAME.to_owned(),
                read_only: false,
            }));
        }
        let digest = otm_core::secret::digest(token);
        Ok(self
            .registry
            .token_by_digest(&digest)
            .await?
            .map(|t| Caller {
                name: t.name,
                read_only: t.read_only,
            }))
    }

    /// Appends one admin write to the audit trail: `who` is the token's name ([`Caller::name`],
    /// or [`UNKNOWN_CALLER`] for a failed sign-in, never a token), `method` and `route` what was
    /// done (`route` as the API or console names it, e.g. `/v1/tenants/{id}/wake`), `tenant` the
    /// tenant it was done to, `status` the HTTP status answered. The admin API calls it for every
    /// write; anything else that changes the fleet on an operator's behalf (the web console)
    /// calls it for its own writes. Best effort: a registry that cannot take the entry is logged,
    /// and the write it records stands.
    pub async fn audit(
        &self,
        who: &str,
        method: &str,
        route: &str,
        tenant: Option<&str>,
        status: u16,
    ) {
        let entry =
            otm_core::AuditEntry::new(self.clock.now_ms(), who, method, route, tenant, status);
        if let Err(e) = self.registry.audit_append(&entry).await {
            tracing::warn!(who, method, route, status, error = %e, "cannot append to the audit trail");
        }
    }

    /// Makes dead letters of `tenant` pending again, at the head of its inbox, and has them
    /// delivered at once: delivery is requested here ([`App::request_delivery`]), and (with a
    /// shared coordinator) the replica that may hold its lease is told. Returns the sequence numbers retried. Errors as
    /// [`otm_core::Inbox::inbox_retry`]: not found for an unknown tenant or seq, conflict for an
    /// update that is not a dead letter.
    pub async fn retry_dead_letters(
        &self,
        tenant: &TenantId,
        which: otm_core::DeadLetters,
    ) -> otm_core::Result<Vec<i64>> {
        let retried = self.registry.inbox_retry(tenant, which).await?;
        if !retried.is_empty() {
            tracing::info!(%tenant, ?retried, "dead letters retried");
            self.request_delivery(tenant);
            if self.routed
                || self
                    .settings
                    .coordinator
                    .as_deref()
                    .is_some_and(|c| c != "memory")
            {
                let _ = self
                    .coordinator
                    .publish(otm_core::Notification::InboxHasWork {
                        tenant: tenant.clone(),
                    })
                    .await;
            }
        }
        Ok(retried)
    }

    /// Drops dead letters of `tenant`; returns the sequence numbers dropped. Errors as
    /// [`otm_core::Inbox::inbox_drop`].
    pub async fn drop_dead_letters(
        &self,
        tenant: &TenantId,
        which: otm_core::DeadLetters,
    ) -> otm_core::Result<Vec<i64>> {
        let dropped = self.registry.inbox_drop(tenant, which).await?;
        if !dropped.is_empty() {
            tracing::info!(%tenant, ?dropped, "dead letters dropped");
        }
        Ok(dropped)
    }

    /// Asks for `tenant`'s inbox to be looked at again (an instance came up, or died with
    /// updates waiting). Whoever drains [`App::take_delivery_requests`] starts its dispatcher;
    /// the orchestrator does not call into dispatch itself.
    pub(crate) fn request_delivery(&self, tenant: &TenantId) {
        let _ = self.kicks.send(tenant.clone());
    }

    /// Spawns a task that shutdown waits for ([`App::drain_tasks`]).
    pub(crate) fn spawn<F>(&self, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(task);
    }

    /// Waits, until `deadline`, for the tasks of [`App::spawn`] to end; none can be spawned
    /// after this was called. True if they all ended.
    pub async fn drain_tasks(&self, deadline: tokio::time::Instant) -> bool {
        self.tasks.close();
        tokio::time::timeout_at(deadline, self.tasks.wait())
            .await
            .is_ok()
    }

    /// The receiving end of [`App::request_delivery`], once.
    pub(crate) fn take_delivery_requests(
        &self,
    ) -> Option<tokio::sync::mpsc::UnboundedReceiver<TenantId>> {
        self.kicks_rx.lock().unwrap().take()
    }

    /// Remembers the limit `tenant`'s instance ran into.
    pub(crate) fn record_limit_kill(
        &self,
        tenant: &TenantId,
        limit: otm_core::LimitKind,
        detail: &str,
    ) {
        let kill = LimitKill {
            limit,
            detail: detail.to_owned(),
            at_ms: self.clock.now_ms(),
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
            at_ms: self.clock.now_ms(),
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
            std::time::Instant::now(),
            self.clock.now_ms(),
        )
    }

    /// A slot for one egress call of `tenant`, or `None` when it has
    /// [`EGRESS_CALLS_PER_TENANT`] under way already: one tenant cannot take the whole
    /// listener's concurrency. While the slot is held the tenant is busy, not idle
    /// ([`App::egress_calls`]): the idle sweep neither freezes nor stops it. Other replicas learn
    /// it through the tenant's last activity, refreshed while the call runs and when it ends.
    pub(crate) fn egress_slot(&self, tenant: &TenantId) -> Option<EgressCall> {
        let sem = self
            .egress_in_flight
            .lock()
            .unwrap()
            .entry(tenant.clone())
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(EGRESS_CALLS_PER_TENANT)))
            .clone();
        let permit = sem.try_acquire_owned().ok()?;
        let done = CancellationToken::new();
        let (registry, clock, t, ended, shutdown) = (
            self.registry.clone(),
            self.clock.clone(),
            tenant.clone(),
            done.clone(),
            self.shutdown.clone(),
        );
        self.spawn(async move {
            let begun = Instant::now();
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(EGRESS_HEARTBEAT) => {}
                    _ = ended.cancelled() => break,
                    // A call still under way at shutdown does not hold the drain up.
                    _ = shutdown.cancelled() => break,
                }
                let _ = registry.touch_tenant(&t, clock.now_ms()).await;
            }
            // A long call restarts the idle clock when it ends; a short one is covered by the
            // delivery that caused it.
            if begun.elapsed() >= std::time::Duration::from_secs(1) {
                let _ = registry.touch_tenant(&t, clock.now_ms()).await;
            }
        });
        Some(EgressCall {
            _permit: permit,
            done,
        })
    }

    /// Egress calls `tenant` has under way through this process's proxies.
    pub fn egress_calls(&self, tenant: &TenantId) -> usize {
        self.egress_in_flight
            .lock()
            .unwrap()
            .get(tenant)
            .map_or(0, |s| EGRESS_CALLS_PER_TENANT - s.available_permits())
    }

    /// True while this process holds the leader lease.
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
