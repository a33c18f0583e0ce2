//! The orchestrator: wakes tenants (single-flight, fenced), stops them with a final snapshot,
//! reaps idle ones, and reconciles the registry with what the runtime runs.

use crate::app::App;
use crate::spool::SpoolFile;
use crate::wake::{WakePath, Waker, Woken};
use futures::StreamExt;
use otm_core::instance::Endpoint;
use otm_core::shim_api::{BindRequest, StopRequest};
use otm_core::{
    Error, InstanceId, InstanceRecord, InstanceSpec, InstanceState, Notification, Result,
    RuntimeEvent, Secret, SnapshotId, TenantId, TenantStatus,
};
use otm_shim::ShimClient;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How long a cached endpoint stays valid without being refreshed.
const ENDPOINT_TTL: Duration = Duration::from_secs(300);
/// Instances and records younger than this are left alone by the full reconcile pass.
const RECONCILE_GRACE_MS: i64 = 120_000;

/// How long a wake or stop waits for another replica's wake lock.
const WAKE_WAIT: Duration = Duration::from_secs(300);

/// TTL of the wake lock and dispatcher leases (renewed while held).
pub(crate) fn lease_ttl(app: &App) -> Duration {
    crate::lease::ttl(app.settings())
}

/// The [`Waker`] of a process that runs instances: wakes them here.
#[derive(Debug)]
pub struct Local {
    app: std::sync::Weak<App>,
}

impl Local {
    pub fn new(app: std::sync::Weak<App>) -> Self {
        Local { app }
    }
}

#[async_trait::async_trait]
impl Waker for Local {
    async fn wake(&self, tenant: &TenantId, chat: Option<i64>) -> Result<Woken> {
        let app = self
            .app
            .upgrade()
            .ok_or_else(|| Error::unavailable("orchestrator", "the server is shutting down"))?;
        wake_here(&app, tenant, chat).await
    }
}

/// Steps 3 to 5 of [`App::wake`]'s locking scheme: the tenant lock, the registry, the
/// fenced lease, then the wake itself.
async fn wake_here(app: &Arc<App>, tenant: &TenantId, chat: Option<i64>) -> Result<Woken> {
    let begun = Instant::now();
    let lock = app.tenant_lock(tenant);
    let _joined = lock.lock().await;
    if let Some(ep) = app.coordinator().endpoint(tenant).await? {
        return Ok(Woken::cached(ep, begun));
    }
    if let Some(rec) = app.registry().instance_of(tenant).await?
        && let Some(woken) = use_registered(app, tenant, &rec, begun).await?
    {
        return Ok(woken);
    }

    let lease = crate::lease::HeldLease::acquire(
        app.coordinator(),
        &format!("wake:{tenant}"),
        lease_ttl(app),
        WAKE_WAIT,
    )
    .await?;
    let result = tokio::select! {
        r = wake_locked(app, tenant, lease.fence(), begun, chat) => r,
        _ = lease.lost().cancelled() => Err(Error::conflict(format!("lost the wake lock of {tenant}; another replica took over"))),
    };
    lease.release().await;
    let outcome = if result.is_ok() { "ok" } else { "error" };
    app.metrics()
        .wakes
        .get_or_create(&crate::metrics::Outcome {
            outcome: outcome.into(),
        })
        .inc();
    result
}

/// A registered instance that is ready and answers serves the wake: its endpoint goes back into
/// the cache. A frozen one is thawed first (the `frozen` wake path). `None` when it cannot
/// serve.
async fn use_registered(
    app: &Arc<App>,
    tenant: &TenantId,
    rec: &InstanceRecord,
    begun: Instant,
) -> Result<Option<Woken>> {
    if rec.state != InstanceState::Ready {
        return Ok(None);
    }
    let shim = ShimClient::new(rec.address.clone(), rec.shim_token.clone());
    let Some(status) = answers(&shim).await else {
        return Ok(None);
    };
    let ep = Endpoint::from(rec);
    if !status.frozen {
        // Frozen by this orchestrator's account, but thawed meanwhile (a delivery that had the
        // endpoint before the freeze thaws the agent itself).
        if matches!(app.registry().get_tenant(tenant).await, Ok(Some(t)) if t.status == TenantStatus::Frozen)
        {
            app.registry()
                .set_tenant_status(tenant, TenantStatus::Running, None)
                .await?;
        }
        app.coordinator()
            .set_endpoint(tenant, &ep, ENDPOINT_TTL)
            .await?;
        return Ok(Some(Woken::cached(ep, begun)));
    }
    // Thaw: the agent resumes where it stopped; the update is delivered at once after.
    let thawing = Instant::now();
    let thawed = shim.thaw().await?;
    let thaw_ms = thawing.elapsed();
    let recording = Instant::now();
    app.registry()
        .set_tenant_status(tenant, TenantStatus::Running, None)
        .await?;
    app.registry()
        .touch_tenant(tenant, app.clock().now_ms())
        .await?;
    app.coordinator()
        .set_endpoint(tenant, &ep, ENDPOINT_TTL)
        .await?;
    let total = begun.elapsed();
    let phases = vec![
        (
            "prepare".to_owned(),
            thawing.duration_since(begun).as_millis() as u64,
        ),
        ("thaw".to_owned(), thaw_ms.as_millis() as u64),
        ("record".to_owned(), recording.elapsed().as_millis() as u64),
    ];
    let p = WakePath::Frozen.as_str();
    app.metrics()
        .wake_phase(p, "prepare", thawing.duration_since(begun));
    app.metrics().wake_phase(p, "thaw", thaw_ms);
    app.metrics().wake_phase(p, "record", recording.elapsed());
    app.metrics()
        .wake_seconds
        .get_or_create(&crate::metrics::WakePath { path: p.into() })
        .observe(total.as_secs_f64());
    app.metrics().thaw_seconds.observe(total.as_secs_f64());
    app.metrics()
        .wakes
        .get_or_create(&crate::metrics::Outcome {
            outcome: "ok".into(),
        })
        .inc();
    app.metrics().instances_frozen.dec();
    tracing::info!(%tenant, instance = %rec.id, path = p, total_ms = total.as_millis() as u64, shim_us = thawed.micros, "thawed");
    Ok(Some(Woken {
        instance: ep.instance.clone(),
        endpoint: ep,
        path: WakePath::Frozen,
        total_ms: total.as_millis() as u64,
        phases,
    }))
}

/// A registered instance's shim's status, when it answers and its agent is not stopped or
/// failed (checked only when the endpoint cache missed).
async fn answers(shim: &ShimClient) -> Option<otm_core::shim_api::ShimStatus> {
    match tokio::time::timeout(Duration::from_secs(3), shim.status()).await {
        Ok(Ok(s)) if s.agent != "stopped" && s.agent != "failed" => Some(s),
        _ => None,
    }
}

async fn wake_locked(
    app: &Arc<App>,
    tenant: &TenantId,
    fence: u64,
    begun: Instant,
    chat: Option<i64>,
) -> Result<Woken> {
    // Another process may have finished a wake while we waited for the lock.
    if let Some(rec) = app.registry().instance_of(tenant).await? {
        if let Some(woken) = use_registered(app, tenant, &rec, begun).await? {
            return Ok(woken);
        }
        // A wake that died half-way, or an instance that died unseen, left this behind.
        tracing::warn!(%tenant, instance = %rec.id, state = rec.state.as_str(), "removing an instance that is half-bound or gone");
        if !retire(app, &rec).await {
            return Err(Error::unavailable(
                "orchestrator",
                format!(
                    "the state of tenant {tenant}'s last instance could not be saved; it is kept and the wake waits"
                ),
            ));
        }
    }
    let t = app
        .registry()
        .get_tenant(tenant)
        .await?
        .ok_or_else(|| Error::not_found(format!("tenant {tenant}")))?;
    let fleet = app.registry().get_settings().await?;
    let limits = t.limits.over(&fleet.default_limits);
    let _admitted = admit(app, &fleet, tenant).await?;

    // `prepare`: locks and admission before any instance work.
    let mut phases: Vec<(String, u64)> =
        vec![("prepare".into(), begun.elapsed().as_millis() as u64)];
    let mark = Instant::now();
    // Claim a warm instance, or create one, while the newest snapshot is fetched and the status
    // written.
    let provisioning =
        app.registry()
            .set_tenant_status(tenant, TenantStatus::Provisioning, Some(fence));
    let instance = async {
        let claimed = match app.registry().claim_warm_instance(tenant).await? {
            Some(rec) => claim_warm(app, rec, tenant, &limits).await,
            None => None,
        };
        let (rec, path) = match claimed {
            Some(rec) => (rec, WakePath::Warm),
            None => {
                if let Err(e) = make_room(app, &fleet, tenant).await {
                    let _ = app
                        .registry()
                        .set_tenant_status(tenant, TenantStatus::Idle, Some(fence))
                        .await;
                    return Err(e);
                }
                if let (true, Some(chat), Some(token)) =
                    (t.cold_start_notice, chat, t.bot_token.as_ref())
                {
                    let notice =
                        app.telegram()
                            .send_message(token, chat, "Starting up, one moment…");
                    match tokio::time::timeout(Duration::from_secs(3), notice).await {
                        Ok(Ok(())) => app.metrics().reconciler("cold_start_notice"),
                        Ok(Err(e)) => {
                            tracing::warn!(%tenant, error = %e, "cold-start notice failed")
                        }
                        Err(_) => tracing::warn!(%tenant, "cold-start notice timed out"),
                    }
                }
                let id = InstanceId::random();
                let spec = InstanceSpec {
                    shim_token: app.keys().shim_token(&id),
                    id,
                    tenant: Some(tenant.clone()),
                    limits,
                    profile: Some(t.profile.clone()),
                };
                let created = match app.runtime().create(&spec).await {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = app
                            .registry()
                            .set_tenant_status(tenant, TenantStatus::Idle, Some(fence))
                            .await;
                        return Err(e);
                    }
                };
                let now = app.clock().now_ms();
                let rec = InstanceRecord {
                    id: spec.id,
                    tenant: Some(tenant.clone()),
                    state: InstanceState::Binding,
                    address: created.address,
                    shim_token: spec.shim_token,
                    surrogate_digest: None,
                    created_at_ms: now,
                    bound_at_ms: Some(now),
                };
                (rec, WakePath::Cold)
            }
        };
        Ok((rec, path))
    };
    let (status, prefetched, instance) =
        tokio::join!(provisioning, prefetch_newest(app, tenant), instance);
    if let Err(e) = status {
        // The fence was lost (another wake holds the tenant now), or the registry failed.
        if let Ok((rec, _)) = &instance {
            discard(app, rec).await;
        }
        return Err(e);
    }
    let (mut rec, path) = instance?;
    let first = if path == WakePath::Warm {
        "claim"
    } else {
        "create"
    };
    phases.push((first.to_owned(), mark.elapsed().as_millis() as u64));

    let result = bind(app, &t, &mut rec, fence, prefetched, &mut phases).await;
    if let Err(e) = result {
        tracing::error!(%tenant, instance = %rec.id, error = %e, "wake failed");
        discard(app, &rec).await;
        let _ = app
            .registry()
            .set_tenant_status(tenant, TenantStatus::Idle, Some(fence))
            .await;
        return Err(e);
    }
    let total = begun.elapsed();
    let p = path.as_str();
    for (name, ms) in &phases {
        app.metrics()
            .wake_phase(p, name, Duration::from_millis(*ms));
    }
    app.metrics()
        .wake_seconds
        .get_or_create(&crate::metrics::WakePath { path: p.into() })
        .observe(total.as_secs_f64());
    tracing::info!(%tenant, instance = %rec.id, path = p, total_ms = total.as_millis() as u64, ?phases, "woke");
    refresh_instance_gauge(app).await;
    Ok(Woken {
        endpoint: Endpoint::from(&rec),
        instance: rec.id.clone(),
        path,
        total_ms: total.as_millis() as u64,
        phases,
    })
}

/// Makes a warm instance the tenant's in the runtime too (a pod's labels, with a precondition)
/// and gives it the tenant's limits; `None` when another orchestrator claimed it first or it
/// cannot take the limits, and the wake creates an instance instead.
async fn claim_warm(
    app: &Arc<App>,
    rec: InstanceRecord,
    tenant: &TenantId,
    limits: &otm_core::ResourceLimits,
) -> Option<InstanceRecord> {
    match app.runtime().claim(&rec.id, tenant).await {
        Ok(true) => {}
        Ok(false) => {
            // Someone else's now: forget our record of it, leave the instance alone.
            tracing::warn!(%tenant, instance = %rec.id, "lost the claim of a warm instance; creating one");
            app.metrics().reconciler("warm_claim_lost");
            let _ = app.registry().delete_instance(&rec.id).await;
            return None;
        }
        Err(e) => {
            tracing::warn!(%tenant, instance = %rec.id, error = %e, "claiming a warm instance failed; creating one");
            discard(app, &rec).await;
            return None;
        }
    }
    if let Err(e) = app.runtime().set_limits(&rec.id, limits).await {
        tracing::warn!(%tenant, instance = %rec.id, error = %e, "a warm instance could not take the tenant's limits; creating one");
        discard(app, &rec).await;
        return None;
    }
    Some(rec)
}

async fn bind(
    app: &Arc<App>,
    t: &otm_core::Tenant,
    rec: &mut InstanceRecord,
    fence: u64,
    prefetched: Result<Option<Prefetch>>,
    phases: &mut Vec<(String, u64)>,
) -> Result<()> {
    let tenant = &t.id;
    // The surrogate token is known to the instance only; the registry keeps its digest.
    let surrogate = Secret::new(format!(
        "{}:{}",
        surrogate_bot_id(t),
        otm_core::id::random_hex(24)
    ));
    rec.surrogate_digest = Some(surrogate.digest());
    rec.state = InstanceState::Binding;
    let shim = ShimClient::new(rec.address.clone(), rec.shim_token.clone());
    let restoring = Instant::now();
    // The instance is recorded (a wake that dies from here on leaves it to be cleaned up) while
    // the snapshot goes in.
    let (recorded, restored) = tokio::join!(app.registry().put_instance(rec, Some(fence)), async {
        restore_newest(app, tenant, &shim, prefetched?).await
    });
    recorded?;
    restored?;
    phases.push(("restore".into(), restoring.elapsed().as_millis() as u64));

    let req = BindRequest {
        tenant: tenant.clone(),
        profile: t.profile.clone(),
        bot_api_root: app.egress_url().to_owned().clone(),
        bot_token: surrogate.expose().to_owned(),
        // Empty for the reference agent; for OpenClaw its install, template and model route.
        settings: {
            let mut s = crate::openclaw::bind_settings(
                app.settings(),
                app.egress_url(),
                t,
                surrogate.expose(),
            )?;
            if t.limits.egress() == "proxy" {
                s.insert(otm_shim::profile::EGRESS_PROXY.to_owned(), "1".to_owned());
            }
            // Absent: never set for this tenant (the reference agent then answers everyone;
            // OpenClaw answers no one).
            if t.limits.allowed_users.is_some() {
                s.insert(
                    otm_shim::profile::ALLOWED_USERS.to_owned(),
                    t.limits.dm_policy().to_setting(),
                );
            }
            s
        },
    };
    let bound = shim
        .bind(&req, Duration::from_secs(app.settings().wake_timeout_s))
        .await?;
    phases.push(("start".into(), bound.start_ms));
    phases.push(("ready".into(), bound.ready_ms));

    // `record`: publishing the ready instance (registry writes, endpoint cache).
    let recording = Instant::now();
    rec.state = InstanceState::Ready;
    // Three writes at once: one group commit, one sync.
    let (put, status, touched) = tokio::join!(
        app.registry().put_instance(rec, Some(fence)),
        app.registry()
            .set_tenant_status(tenant, TenantStatus::Running, Some(fence)),
        app.registry().touch_tenant(tenant, app.clock().now_ms()),
    );
    put?;
    status?;
    touched?;
    app.coordinator()
        .set_endpoint(tenant, &Endpoint::from(&*rec), ENDPOINT_TTL)
        .await?;
    phases.push(("record".into(), recording.elapsed().as_millis() as u64));
    Ok(())
}

/// The surrogate keeps the bot id of the real token (the part before ':') so agents that parse
/// it see the right bot; the secret part is random.
fn surrogate_bot_id(t: &otm_core::Tenant) -> String {
    t.bot_token
        .as_ref()
        .and_then(|tok| tok.expose().split_once(':').map(|(id, _)| id.to_owned()))
        .filter(|id| id.bytes().all(|b| b.is_ascii_digit()) && !id.is_empty())
        .unwrap_or_else(|| "0".into())
}

/// Removes an instance from the runtime and the registry, ignoring what is already gone.
async fn discard(app: &Arc<App>, rec: &InstanceRecord) {
    if let Err(e) = app.runtime().delete(&rec.id).await {
        tracing::warn!(instance = %rec.id, error = %e, "could not delete instance");
    }
    let _ = app.registry().delete_instance(&rec.id).await;
    app.surrogates().forget_instance(&rec.id);
    if let Some(t) = &rec.tenant {
        let _ = app.coordinator().clear_endpoint(t).await;
    }
    refresh_instance_gauge(app).await;
}

/// Stops a tenant's instance: endpoint cleared first (new updates wait in the inbox), surrogate
/// revoked, agent stopped gracefully, final snapshot published, instance deleted. Returns false
/// when the tenant had no instance.
pub async fn stop(app: &Arc<App>, tenant: &TenantId, reason: &str) -> Result<bool> {
    let lock = app.tenant_lock(tenant);
    let _held = lock.lock().await;
    app.coordinator().clear_endpoint(tenant).await?;
    let Some(mut rec) = app.registry().instance_of(tenant).await? else {
        if app.registry().get_tenant(tenant).await?.is_some() {
            app.registry()
                .set_tenant_status(tenant, TenantStatus::Idle, None)
                .await?;
        }
        return Ok(false);
    };
    let lease = crate::lease::HeldLease::acquire(
        app.coordinator(),
        &format!("wake:{tenant}"),
        lease_ttl(app),
        WAKE_WAIT,
    )
    .await?;
    let result = stop_locked(app, tenant, &mut rec, reason, lease.fence()).await;
    lease.release().await;
    let _ = app
        .coordinator()
        .publish(Notification::EndpointInvalidated {
            tenant: tenant.clone(),
        })
        .await;
    result.map(|()| true)
}

async fn stop_locked(
    app: &Arc<App>,
    tenant: &TenantId,
    rec: &mut InstanceRecord,
    reason: &str,
    fence: u64,
) -> Result<()> {
    let began = Instant::now();
    rec.state = InstanceState::Stopping;
    rec.surrogate_digest = None;
    app.registry().put_instance(rec, Some(fence)).await?;
    app.surrogates().forget_instance(&rec.id);
    if app.registry().get_tenant(tenant).await?.is_some() {
        app.registry()
            .set_tenant_status(tenant, TenantStatus::Stopping, Some(fence))
            .await?;
    }
    let shim = ShimClient::new(rec.address.clone(), rec.shim_token.clone());
    match shim
        .stop(&StopRequest::default(), Duration::from_secs(150))
        .await
    {
        Ok(r) if r.killed => {
            tracing::warn!(%tenant, "agent did not stop within its grace period and was killed")
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(%tenant, error = %e, "graceful stop failed"),
    }
    if let Err(e) = take_snapshot(app, tenant, &shim, "final").await {
        tracing::error!(%tenant, error = %e, "final snapshot through the shim failed; packing the state from outside");
        if let Err(e) = salvage(app, tenant, rec, "final").await {
            // Nothing is deleted: the instance's state stays on disk, the record says
            // `stopping`, and the next stop, wake or reconcile pass tries again.
            app.metrics().reconciler("final_snapshot_failed");
            return Err(Error::unavailable(
                "orchestrator",
                format!(
                    "tenant {tenant} was not stopped cleanly: its final snapshot failed ({e}); its state is kept and \
                     the previous snapshot stays in force"
                ),
            ));
        }
    }
    discard(app, rec).await;
    if app.registry().get_tenant(tenant).await?.is_some() {
        app.registry()
            .set_tenant_status(tenant, TenantStatus::Idle, Some(fence))
            .await?;
    }
    app.metrics()
        .stops
        .get_or_create(&crate::metrics::Reason {
            reason: reason.into(),
        })
        .inc();
    tracing::info!(%tenant, instance = %rec.id, reason, ms = began.elapsed().as_millis() as u64, "stopped");
    Ok(())
}

pub use crate::wake::ADMISSION;

/// A wake under way, counted while it lives.
pub(crate) struct Admitted<'a>(&'a App);

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        let n = self.0.wake_ended();
        self.0.metrics().wakes_in_flight.set(n as i64);
    }
}

/// Admission for one wake: at most `max_concurrent_wakes` at once in this process (waiting up
/// to a few seconds for a turn).
async fn admit<'a>(
    app: &'a Arc<App>,
    fleet: &otm_core::FleetSettings,
    tenant: &TenantId,
) -> Result<Admitted<'a>> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n = app.wake_started();
        if fleet.max_concurrent_wakes == 0 || n <= fleet.max_concurrent_wakes as usize {
            app.metrics().wakes_in_flight.set(n as i64);
            return Ok(Admitted(app));
        }
        app.wake_ended();
        if Instant::now() >= deadline {
            app.metrics()
                .admission_waits
                .get_or_create(&crate::metrics::Reason {
                    reason: "max_concurrent_wakes".into(),
                })
                .inc();
            return Err(Error::unavailable(
                ADMISSION,
                format!(
                    "{} wakes are under way (max-concurrent-wakes); {tenant} waits",
                    fleet.max_concurrent_wakes
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Makes room for one more instance under `max_running`: puts the longest-idle running tenant
/// with nothing waiting to sleep (or a surplus warm instance away). When nothing can go, the
/// wake is held back and its updates wait in the inbox.
async fn make_room(
    app: &Arc<App>,
    fleet: &otm_core::FleetSettings,
    waking: &TenantId,
) -> Result<()> {
    app.metrics().max_running.set(i64::from(fleet.max_running));
    if fleet.max_running == 0 {
        return Ok(());
    }
    let max = fleet.max_running as usize;
    let instances = app.registry().list_instances().await?;
    if instances.len() < max {
        return Ok(());
    }
    // A warm instance goes first: it serves nobody.
    if let Some(warm) = instances
        .iter()
        .find(|r| r.tenant.is_none() && r.state == InstanceState::Warm)
    {
        discard(app, warm).await;
        app.metrics().reconciler("warm_removed_for_room");
        return Ok(());
    }
    let mut candidates = Vec::new();
    for rec in instances.iter().filter(|r| r.state == InstanceState::Ready) {
        let Some(t) = rec.tenant.as_ref().filter(|t| *t != waking) else {
            continue;
        };
        if app.registry().inbox_depth(t).await.unwrap_or(1) > 0 {
            continue;
        }
        if let Ok(Some(tenant)) = app.registry().get_tenant(t).await {
            candidates.push((tenant.last_active_ms, t.clone()));
        }
    }
    candidates.sort();
    for (_, t) in candidates {
        // Only a tenant nobody is waking or stopping right now.
        let lock = app.tenant_lock(&t);
        let Ok(free) = lock.try_lock() else { continue };
        drop(free);
        tracing::info!(tenant = %t, for_tenant = %waking, max_running = max, "putting the longest-idle tenant to sleep to make room");
        app.metrics()
            .admission_waits
            .get_or_create(&crate::metrics::Reason {
                reason: "evicted_idle".into(),
            })
            .inc();
        if stop(app, &t, "admission").await.is_ok() {
            return Ok(());
        }
    }
    app.metrics()
        .admission_waits
        .get_or_create(&crate::metrics::Reason {
            reason: "max_running".into(),
        })
        .inc();
    Err(Error::unavailable(
        ADMISSION,
        format!(
            "the fleet runs its limit of {max} instances (max-running) and none is idle; {waking} waits"
        ),
    ))
}

/// Packs a tenant's state from outside its instance (whose shim is dead or failed to snapshot),
/// checks it and publishes it, retrying a few times.
async fn salvage(
    app: &Arc<App>,
    tenant: &TenantId,
    rec: &InstanceRecord,
    reason: &str,
) -> Result<()> {
    let profile = match app.registry().get_tenant(tenant).await? {
        Some(t) => t.profile,
        None => return Ok(()),
    };
    let skip: Vec<String> = otm_shim::profile::profile(&profile)
        .map(|p| p.snapshot_skip.iter().map(|s| s.to_string()).collect())
        .unwrap_or_default();
    // Three tries, 200 ms and 400 ms apart.
    const RETRY: otm_core::Backoff =
        otm_core::Backoff::new(Duration::from_millis(200), Duration::from_secs(1));
    let mut last = None;
    for attempt in 0..3u32 {
        if attempt > 0 {
            tokio::time::sleep(RETRY.delay(attempt)).await;
        }
        let (spool, file) = SpoolFile::create(&app.settings().data_dir, tenant.as_str()).await?;
        drop(file);
        match app
            .runtime()
            .salvage_state(&rec.id, &skip, MAX_SNAPSHOT_BYTES, spool.path())
            .await
        {
            Ok(false) => return Ok(()),
            Ok(true) => {
                match publish_snapshot(app, tenant, &spool, &format!("{reason}-salvaged")).await {
                    Ok(meta) => {
                        app.metrics().reconciler("state_salvaged");
                        tracing::info!(%tenant, instance = %rec.id, snapshot = %meta.id, size = meta.size, "state packed from outside the instance");
                        return Ok(());
                    }
                    Err(e) => last = Some(e),
                }
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| Error::unavailable("orchestrator", "salvage failed")))
}

/// Removes an instance that is gone or going, saving its state first when it was serving a
/// tenant (ready or stopping). Returns false, and deletes nothing, when that state could not be
/// saved.
async fn retire(app: &Arc<App>, rec: &InstanceRecord) -> bool {
    if let (Some(tenant), InstanceState::Ready | InstanceState::Stopping) = (&rec.tenant, rec.state)
        && let Err(e) = salvage(app, tenant, rec, "exit").await
    {
        tracing::error!(%tenant, instance = %rec.id, error = %e, "cannot save the state of a dead instance; keeping it");
        app.metrics().reconciler("salvage_failed");
        return false;
    }
    discard(app, rec).await;
    true
}

/// The idle sweep, every second until shutdown, on the leader: freezes tenants idle past their
/// `freeze_after_s`, stops (snapshots) tenants idle past their idle timeout, frozen or not, and
/// puts the least recently active frozen tenants to sleep while frozen agents hold more memory
/// than the fleet's `frozen_memory_max`. A busy tenant (updates waiting, a call under way
/// through the egress proxies) is left alone.
pub async fn run_reaper(app: Arc<App>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut frozen = FrozenBook::default();
    loop {
        tokio::select! {
            _ = app.shutdown().cancelled() => return,
            _ = tick.tick() => {}
        }
        if !app.is_leader() {
            frozen = FrozenBook::default();
            continue;
        }
        sweep(&app, &mut frozen).await;
    }
}

/// What the sweep knows of the frozen tenants: since when, the idle deadline the registry had
/// for them then, and the memory their agents hold (as their shims reported it).
#[derive(Debug, Default)]
pub struct FrozenBook {
    tenants: std::collections::HashMap<TenantId, FrozenEntry>,
}

#[derive(Clone, Copy, Debug)]
struct FrozenEntry {
    since_ms: i64,
    idle_deadline_ms: i64,
    memory_bytes: u64,
}

/// Most tenants one pass of the sweep looks at to freeze; the rest wait for the next pass.
const FREEZE_BATCH: usize = 1024;

/// One pass of the idle sweep ([`run_reaper`]).
pub async fn sweep(app: &Arc<App>, frozen: &mut FrozenBook) {
    let now = app.clock().now_ms();
    let due = match app.registry().idle_due(now, 256).await {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, "idle sweep failed");
            return;
        }
    };
    for tenant in due {
        if busy(app, &tenant).await {
            continue;
        }
        spawn_idle_stop(app, tenant, "idle");
    }
    if let Err(e) = sweep_awake(app, frozen, now).await {
        tracing::warn!(error = %e, "freeze sweep failed");
    }
}

/// Updates still waiting, or a call under way through the egress proxies, keep a tenant awake.
async fn busy(app: &Arc<App>, tenant: &TenantId) -> bool {
    app.egress_calls(tenant) > 0 || app.registry().inbox_depth(tenant).await.unwrap_or(0) > 0
}

fn spawn_idle_stop(app: &Arc<App>, tenant: TenantId, reason: &'static str) {
    let a = app.clone();
    app.spawn(async move {
        let app = a;
        if let Err(e) = stop(&app, &tenant, reason).await {
            tracing::warn!(%tenant, error = %e, "idle stop failed");
        }
        // Anything that arrived during the stop wakes the tenant again.
        if app.registry().inbox_depth(&tenant).await.unwrap_or(0) > 0 {
            app.request_delivery(&tenant);
        }
    });
}

/// The frozen tier's part of the sweep: freezes, stops of frozen tenants past their idle
/// timeout, and the frozen memory budget. It reads what is due and what is frozen, not every
/// awake tenant: the frozen tenants come with their idle deadlines in one query
/// ([`otm_core::TenantStore::frozen_tenants`]), and only those new to the book or whose deadline
/// moved (a delivery thawed them, or their idle timeout changed) are read further; the tenants
/// to freeze come from [`otm_core::TenantStore::freeze_due`].
async fn sweep_awake(app: &Arc<App>, book: &mut FrozenBook, now: i64) -> Result<()> {
    let fleet = app.registry().get_settings().await?;
    // Read before this pass freezes anyone: the ones it freezes are added below.
    let frozen = app.registry().frozen_tenants().await?;
    let mut seen = std::collections::HashSet::with_capacity(frozen.len());
    // (last active, tenant, memory) of every tenant frozen after this pass.
    let mut frozen_now: Vec<(i64, TenantId, u64)> = Vec::new();
    for (tenant, idle_deadline_ms) in frozen {
        let entry = match book.tenants.get(&tenant) {
            Some(e) if e.idle_deadline_ms == idle_deadline_ms => *e,
            known => {
                let known = known.copied();
                let Some(t) = app.registry().get_tenant(&tenant).await? else {
                    continue;
                };
                if t.status != TenantStatus::Frozen {
                    continue;
                }
                match known {
                    Some(e) if t.last_active_ms > e.since_ms => {
                        // A delivery reached it since: it was thawed by its shim. Awake again.
                        let _ = app
                            .registry()
                            .set_tenant_status(&tenant, TenantStatus::Running, None)
                            .await;
                        continue;
                    }
                    Some(e) => FrozenEntry {
                        idle_deadline_ms: t.idle_deadline_ms(),
                        ..e
                    },
                    None => {
                        // Frozen before this process led the sweep: ask its shim.
                        let rec = match app.registry().instance_of(&tenant).await? {
                            Some(rec) if rec.state == InstanceState::Ready => rec,
                            _ => continue,
                        };
                        let shim = ShimClient::new(rec.address.clone(), rec.shim_token.clone());
                        let memory = answers(&shim)
                            .await
                            .and_then(|s| s.memory_bytes)
                            .unwrap_or(0);
                        FrozenEntry {
                            since_ms: t.last_active_ms,
                            idle_deadline_ms: t.idle_deadline_ms(),
                            memory_bytes: memory,
                        }
                    }
                }
            }
        };
        seen.insert(tenant.clone());
        book.tenants.insert(tenant.clone(), entry);
        if entry.idle_deadline_ms <= now {
            if !busy(app, &tenant).await {
                seen.remove(&tenant);
                spawn_idle_stop(app, tenant, "idle");
            }
            continue;
        }
        frozen_now.push((entry.since_ms, tenant, entry.memory_bytes));
    }
    book.tenants.retain(|t, _| seen.contains(t));
    for tenant in app.registry().freeze_due(now, FREEZE_BATCH).await? {
        // The registry listed it; its own record decides (it may have changed since).
        let Some(t) = app.registry().get_tenant(&tenant).await? else {
            continue;
        };
        let Some(deadline) = t.freeze_deadline_ms() else {
            continue;
        };
        if t.status != TenantStatus::Running
            || deadline > now
            || t.idle_deadline_ms() <= now
            || busy(app, &tenant).await
        {
            continue;
        }
        let rec = match app.registry().instance_of(&tenant).await? {
            Some(rec) if rec.state == InstanceState::Ready => rec,
            _ => continue,
        };
        if let Some(memory) = freeze(app, &tenant, &rec).await {
            let after = app.registry().get_tenant(&tenant).await.ok().flatten();
            let since = after
                .as_ref()
                .map_or(t.last_active_ms, |t| t.last_active_ms);
            book.tenants.insert(
                tenant.clone(),
                FrozenEntry {
                    since_ms: since,
                    idle_deadline_ms: after.as_ref().unwrap_or(&t).idle_deadline_ms(),
                    memory_bytes: memory,
                },
            );
            frozen_now.push((since, tenant, memory));
        }
    }
    // The budget: the least recently active frozen tenants go to sleep first.
    frozen_now.sort();
    let mut total: u64 = frozen_now.iter().map(|(_, _, m)| m).sum();
    let mut count = frozen_now.len();
    if fleet.frozen_memory_max > 0 {
        for (_, tenant, memory) in &frozen_now {
            if total <= fleet.frozen_memory_max {
                break;
            }
            tracing::info!(%tenant, memory_bytes = memory, frozen_memory_bytes = total, frozen_memory_max = fleet.frozen_memory_max, "frozen memory over its budget: putting the least recently active frozen tenant to sleep");
            book.tenants.remove(tenant);
            spawn_idle_stop(app, tenant.clone(), "frozen_memory");
            total -= memory;
            count -= 1;
        }
    }
    app.metrics().instances_frozen.set(count as i64);
    app.metrics().frozen_memory_bytes.set(total as i64);
    Ok(())
}

/// Freezes one idle tenant's agent through its shim, under the tenant's lock: its endpoint is
/// cleared first, so the next update goes through a wake, which thaws it. Returns the memory
/// its agent holds, or `None` when it was not frozen (busy, changed meanwhile, or refused).
async fn freeze(app: &Arc<App>, tenant: &TenantId, rec: &InstanceRecord) -> Option<u64> {
    let lock = app.tenant_lock(tenant);
    // A wake or a stop under way: not idle.
    let _held = lock.try_lock().ok()?;
    match app.registry().instance_of(tenant).await {
        Ok(Some(r)) if r.id == rec.id && r.state == InstanceState::Ready => {}
        _ => return None,
    }
    if busy(app, tenant).await {
        app.metrics().freeze("busy");
        return None;
    }
    let _ = app.coordinator().clear_endpoint(tenant).await;
    let _ = app
        .coordinator()
        .publish(Notification::EndpointInvalidated {
            tenant: tenant.clone(),
        })
        .await;
    let shim = ShimClient::new(rec.address.clone(), rec.shim_token.clone());
    let restore_endpoint = || async {
        let _ = app
            .coordinator()
            .set_endpoint(tenant, &Endpoint::from(rec), ENDPOINT_TTL)
            .await;
    };
    // A call that began between the check and the endpoint's clearing.
    if busy(app, tenant).await {
        restore_endpoint().await;
        app.metrics().freeze("busy");
        return None;
    }
    match shim.freeze().await {
        Ok(r) => {
            if let Err(e) = app
                .registry()
                .set_tenant_status(tenant, TenantStatus::Frozen, None)
                .await
            {
                tracing::warn!(%tenant, error = %e, "cannot record the freeze; thawing");
                let _ = shim.thaw().await;
                restore_endpoint().await;
                return None;
            }
            app.metrics().freeze("frozen");
            tracing::info!(%tenant, instance = %rec.id, memory_bytes = r.memory_bytes, shim_us = r.micros, "frozen");
            Some(r.memory_bytes)
        }
        Err(e) => {
            tracing::info!(%tenant, error = %e, "not frozen");
            app.metrics().freeze(match e {
                Error::Conflict { .. } => "busy",
                _ => "failed",
            });
            restore_endpoint().await;
            None
        }
    }
}

/// Acts on runtime events until shutdown: an instance that exits on its own is removed, its
/// tenant returns to idle, and pending updates wake it again.
pub async fn run_reconciler(app: Arc<App>) {
    let mut events = app.runtime().events();
    let mut full_pass = tokio::time::interval(Duration::from_secs(60));
    full_pass.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = app.shutdown().cancelled() => return,
            ev = events.next() => match ev {
                Some(RuntimeEvent::Exited { id, detail }) => instance_exited(&app, &id, &detail, None).await,
                Some(RuntimeEvent::LimitExceeded { id, limit, detail }) => instance_exited(&app, &id, &detail, Some(limit)).await,
                Some(RuntimeEvent::Terminating { id, detail }) => instance_terminating(&app, id, detail).await,
                None => return,
            },
            _ = full_pass.tick() => {
                if let Err(e) = reconcile(&app).await {
                    tracing::warn!(error = %e, "reconcile pass failed");
                }
            }
        }
    }
}

/// Someone else is removing an instance (an eviction, a node drain): while it still runs, its
/// tenant is put to sleep the usual way, final snapshot included, and the next update wakes it
/// elsewhere. This is what a preStop state sync does, driven from outside the instance.
async fn instance_terminating(app: &Arc<App>, id: InstanceId, detail: String) {
    app.metrics().reconciler("instance_terminating");
    let Ok(Some(rec)) = app.registry().get_instance(&id).await else {
        return;
    };
    tracing::warn!(instance = %id, tenant = ?rec.tenant, detail, "instance is being removed; saving its state");
    let Some(tenant) = rec.tenant else {
        discard(app, &rec).await;
        return;
    };
    let app2 = app.clone();
    app.spawn(async move {
        match stop(&app2, &tenant, "evicted").await {
            Ok(_) => {
                if app2.registry().inbox_depth(&tenant).await.unwrap_or(0) > 0 {
                    app2.request_delivery(&tenant);
                }
            }
            Err(e) => {
                tracing::warn!(%tenant, error = %e, "saving an evicted instance's state failed")
            }
        }
    });
}

async fn instance_exited(
    app: &Arc<App>,
    id: &InstanceId,
    detail: &str,
    limit: Option<otm_core::LimitKind>,
) {
    app.metrics().reconciler(if limit.is_some() {
        "limit_kill"
    } else {
        "instance_exited"
    });
    let Ok(Some(rec)) = app.registry().get_instance(id).await else {
        // Not ours (any more): make sure nothing is left of it.
        if limit.is_some() {
            let _ = app.runtime().delete(id).await;
        }
        return;
    };
    tracing::warn!(instance = %id, tenant = ?rec.tenant, detail, "instance died");
    if let Some(kind) = limit {
        app.metrics()
            .limit_kills
            .get_or_create(&crate::metrics::Limit {
                limit: kind.as_str().into(),
            })
            .inc();
        if let Some(t) = &rec.tenant {
            app.record_limit_kill(t, kind, detail);
        }
    }
    if let Some(tenant) = &rec.tenant {
        let lock = app.tenant_lock(tenant);
        let _held = lock.lock().await;
        let _ = app.coordinator().clear_endpoint(tenant).await;
        if limit == Some(otm_core::LimitKind::Disk) {
            // State over its disk limit is not kept: the previous snapshot stays in force.
            tracing::warn!(%tenant, instance = %id, "state over the disk limit is dropped; the previous snapshot stays the head");
            discard(app, &rec).await;
        } else if !retire(app, &rec).await {
            return;
        }
        let _ = app
            .registry()
            .set_tenant_status(tenant, TenantStatus::Idle, None)
            .await;
        if app.registry().inbox_depth(tenant).await.unwrap_or(0) > 0 {
            app.request_delivery(tenant);
        }
    } else {
        discard(app, &rec).await;
    }
}

/// One full pass: adopts live instances the registry knows, removes instances that belong to no
/// record (and what gone instances left behind), and repairs records whose instance is gone.
pub async fn reconcile(app: &Arc<App>) -> Result<()> {
    let now = app.clock().now_ms();
    let live = app.runtime().list().await?;
    let records = app.registry().list_instances().await?;
    for inst in &live {
        let known = records.iter().find(|r| r.id == inst.id);
        match known {
            Some(rec) if inst.alive && rec.state == InstanceState::Ready => {
                // A frozen tenant has no endpoint on purpose: its next update thaws it.
                if let Some(t) = &rec.tenant
                    && app.coordinator().endpoint(t).await?.is_none()
                    && !matches!(app.registry().get_tenant(t).await?, Some(t) if t.status == TenantStatus::Frozen)
                {
                    app.coordinator()
                        .set_endpoint(t, &Endpoint::from(rec), ENDPOINT_TTL)
                        .await?;
                    app.metrics().reconciler("adopted");
                }
            }
            Some(_) => {}
            // Another replica may be between creating an instance and recording it.
            None if inst
                .created_at_ms
                .is_some_and(|t| now - t < RECONCILE_GRACE_MS) => {}
            None => {
                tracing::warn!(instance = %inst.id, "removing an instance that no record owns");
                app.runtime().delete(&inst.id).await?;
                app.metrics().reconciler("orphan_removed");
            }
        }
    }
    for rec in &records {
        let alive = live.iter().any(|i| i.id == rec.id && i.alive);
        if !alive && now - rec.created_at_ms >= RECONCILE_GRACE_MS {
            tracing::warn!(instance = %rec.id, "removing the record of an instance that is gone");
            if !retire(app, rec).await {
                continue;
            }
            if let Some(t) = &rec.tenant {
                let _ = app
                    .registry()
                    .set_tenant_status(t, TenantStatus::Idle, None)
                    .await;
            }
            app.metrics().reconciler("stale_record_removed");
        }
    }
    // What instances leave behind (a pod's Secret when its owner reference was never set).
    match app
        .runtime()
        .collect_garbage(Duration::from_millis(RECONCILE_GRACE_MS as u64))
        .await
    {
        Ok(0) => {}
        Ok(n) => {
            tracing::warn!(removed = n, "removed what gone instances left behind");
            app.metrics().reconciler("garbage_removed");
        }
        Err(e) => tracing::warn!(error = %e, "removing what gone instances left behind failed"),
    }
    // Tenants marked awake without an instance are idle.
    for t in app.registry().list_tenants().await? {
        if t.status != TenantStatus::Idle && app.registry().instance_of(&t.id).await?.is_none() {
            app.registry()
                .set_tenant_status(&t.id, TenantStatus::Idle, None)
                .await?;
            app.metrics().reconciler("status_repaired");
        }
    }
    refresh_instance_gauge(app).await;
    Ok(())
}

/// The tenant's newest snapshot, fetched from the state store and test-decoded into a spool
/// file (or why it could not be), for [`restore_newest`]. A wake fetches it while the instance
/// starts, so that restoring is only the copy into the instance.
pub(crate) struct Prefetch {
    head: otm_core::SnapshotMeta,
    spool: SpoolFile,
    fetched: Result<()>,
}

/// Fetches the newest snapshot of `tenant`; `None` when it has none. An error reading the head
/// fails the wake; a snapshot that cannot be fetched or decoded is left to [`restore_newest`],
/// which falls back to older ones.
async fn prefetch_newest(app: &Arc<App>, tenant: &TenantId) -> Result<Option<Prefetch>> {
    let Some(head) = app.state().head(tenant).await? else {
        return Ok(None);
    };
    // One private file, refilled for each candidate, removed however this ends.
    let (spool, file) = SpoolFile::create(&app.settings().data_dir, tenant.as_str()).await?;
    drop(file);
    let fetched = fetch_checked(app, tenant, &head.id, &spool)
        .await
        .map(|_| ());
    Ok(Some(Prefetch {
        head,
        spool,
        fetched,
    }))
}

/// Restores the tenant's newest snapshot that works into the instance: the head (prefetched),
/// or, when it fails for any reason (missing, damaged, refused by the checksum, the test decode
/// or the instance), the newest older one, with each skipped snapshot and why recorded (log,
/// metrics, the tenant's `last_restore_fallback`). A store or instance that cannot be reached
/// fails the wake instead (it is retried): an older snapshot would fare no better there, and
/// falling back over a passing outage would drop newer state. Nothing to do for a tenant
/// without snapshots.
async fn restore_newest(
    app: &Arc<App>,
    tenant: &TenantId,
    shim: &ShimClient,
    prefetched: Option<Prefetch>,
) -> Result<()> {
    let Some(Prefetch {
        head,
        spool,
        fetched,
    }) = prefetched
    else {
        return Ok(());
    };
    let mut skipped = Vec::new();
    let mut restored = None;
    // The older snapshots, newest first: listed only once the newest has failed.
    let mut older: Option<std::vec::IntoIter<otm_core::SnapshotMeta>> = None;
    let mut next = Some((head.id.clone(), fetched));
    loop {
        let (id, fetched) = match next.take() {
            Some(candidate) => candidate,
            None => {
                if older.is_none() {
                    let mut list: Vec<_> = match app.state().list(tenant).await {
                        Ok(list) => list.into_iter().filter(|m| m.id < head.id).collect(),
                        Err(e) => {
                            if !skipped.is_empty() {
                                app.record_restore_fallback(tenant, None, skipped);
                            }
                            return Err(e);
                        }
                    };
                    list.reverse();
                    older = Some(list.into_iter());
                }
                let Some(meta) = older.as_mut().and_then(|o| o.next()) else {
                    break;
                };
                let fetched = fetch_checked(app, tenant, &meta.id, &spool)
                    .await
                    .map(|_| ());
                (meta.id, fetched)
            }
        };
        let tried = async {
            fetched?;
            shim.restore(spool.open().await?).await
        }
        .await;
        match tried {
            Ok(()) => {
                restored = Some(id);
                break;
            }
            Err(e @ Error::Unavailable { .. }) => {
                if !skipped.is_empty() {
                    app.record_restore_fallback(tenant, None, skipped);
                }
                return Err(e);
            }
            Err(e) => {
                tracing::error!(%tenant, snapshot = %id, error = %e, "cannot restore this snapshot; trying the one before it");
                app.metrics().reconciler(match e {
                    Error::Corrupt { .. } => "snapshot_corrupt",
                    _ => "restore_refused",
                });
                skipped.push(crate::app::SkippedSnapshot {
                    snapshot: id,
                    reason: e.to_string(),
                });
            }
        }
    }
    if skipped.is_empty() {
        return Ok(());
    }
    let all_failed = restored.is_none();
    if let Some(id) = &restored {
        tracing::warn!(%tenant, snapshot = %id, skipped = skipped.len(), "restored an older snapshot because newer ones failed");
        app.metrics().reconciler("restore_fallback");
    }
    let count = skipped.len();
    app.record_restore_fallback(tenant, restored, skipped);
    if all_failed {
        return Err(Error::Corrupt {
            what: format!("every snapshot of tenant {tenant}"),
            message: format!(
                "none of its {count} snapshots could be restored; see last_restore_fallback on the tenant for why"
            ),
        });
    }
    Ok(())
}

/// Fetches a snapshot from the store into `spool` (checksum checked on the way) and test-decodes
/// it there; a snapshot that does not decode within the caps is [`Error::Corrupt`].
async fn fetch_checked(
    app: &Arc<App>,
    tenant: &TenantId,
    id: &SnapshotId,
    spool: &SpoolFile,
) -> Result<otm_core::SnapshotMeta> {
    let meta = app.state().get(tenant, id, spool.path()).await?;
    verify_archive(spool.path())
        .await
        .map_err(|e| Error::Corrupt {
            what: format!("snapshot {id} of tenant {tenant}"),
            message: format!("the archive does not decode: {e}"),
        })?;
    Ok(meta)
}

/// Decodes a whole archive file on a blocking thread, checking entries and caps, writing nothing.
async fn verify_archive(path: &std::path::Path) -> std::io::Result<otm_shim::archive::Summary> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&path)?;
        otm_shim::archive::verify(
            std::io::BufReader::with_capacity(otm_shim::pipe::CHUNK, file),
            &otm_shim::archive::Caps {
                max_bytes: MAX_SNAPSHOT_BYTES,
                ..Default::default()
            },
        )
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Takes a snapshot through the shim, stores it, makes it the head, and prunes old ones. The
/// archive streams into a spool file (counted against [`MAX_SNAPSHOT_BYTES`] as it arrives), is
/// test-decoded there, then streams into the state store.
pub async fn take_snapshot(
    app: &Arc<App>,
    tenant: &TenantId,
    shim: &ShimClient,
    reason: &str,
) -> Result<otm_core::SnapshotMeta> {
    let (spool, mut file) = SpoolFile::create(&app.settings().data_dir, tenant.as_str()).await?;
    shim.snapshot(&mut file, MAX_SNAPSHOT_BYTES).await?;
    drop(file);
    publish_snapshot(app, tenant, &spool, reason).await
}

/// Largest snapshot accepted from an instance, compressed or unpacked.
pub const MAX_SNAPSHOT_BYTES: u64 = 1 << 30;

/// Checks an archive an instance produced (it decodes to its end, holds only files, directories
/// and links with plain paths, within the caps), then stores it and makes it the head.
async fn publish_snapshot(
    app: &Arc<App>,
    tenant: &TenantId,
    archive: &SpoolFile,
    reason: &str,
) -> Result<otm_core::SnapshotMeta> {
    let started = Instant::now();
    verify_archive(archive.path()).await.map_err(|e| {
        Error::invalid(format!(
            "the instance's snapshot of {tenant} was refused: {e}"
        ))
    })?;
    let id = SnapshotId::new_now();
    let meta = app.state().put(tenant, &id, archive.path(), reason).await?;
    app.state().publish(tenant, &id).await?;
    tracing::info!(%tenant, snapshot = %id, size = meta.size, reason, ms = started.elapsed().as_millis() as u64, "snapshot published");
    prune_snapshots(app, tenant).await;
    Ok(meta)
}

/// Deletes the oldest snapshots beyond the retention count; never the head.
async fn prune_snapshots(app: &Arc<App>, tenant: &TenantId) {
    let keep = app.settings().snapshot_keep;
    let (Ok(list), Ok(head)) = (
        app.state().list(tenant).await,
        app.state().head(tenant).await,
    ) else {
        return;
    };
    let head = head.map(|h| h.id);
    let excess = list.len().saturating_sub(keep);
    for meta in list
        .into_iter()
        .filter(|m| Some(&m.id) != head.as_ref())
        .take(excess)
    {
        if let Err(e) = app.state().delete(tenant, &meta.id).await {
            tracing::warn!(%tenant, snapshot = %meta.id, error = %e, "could not prune a snapshot");
        }
    }
}

/// Makes an older snapshot the head, so that the next wake restores it. A running tenant is
/// stopped first (its final snapshot is kept, but no longer the head).
pub async fn restore_snapshot(app: &Arc<App>, tenant: &TenantId, id: &SnapshotId) -> Result<()> {
    // Fetch and test-decode before anything changes.
    let (spool, file) = SpoolFile::create(&app.settings().data_dir, tenant.as_str()).await?;
    drop(file);
    fetch_checked(app, tenant, id, &spool).await?;
    drop(spool);
    stop(app, tenant, "restore").await?;
    let lock = app.tenant_lock(tenant);
    let _held = lock.lock().await;
    app.state().publish(tenant, id).await?;
    tracing::info!(%tenant, snapshot = %id, "snapshot made head; the next wake restores it");
    Ok(())
}

/// A tenant's latest state as a plain tar in a spool file, for an operator who must hand a user
/// their data: a running tenant is snapshotted first (reason `export`), else its head is used.
pub async fn export_state(
    app: &Arc<App>,
    tenant: &TenantId,
) -> Result<(SpoolFile, otm_core::SnapshotMeta)> {
    {
        let lock = app.tenant_lock(tenant);
        let _held = lock.lock().await;
        if let Ok(Some(rec)) = app.registry().instance_of(tenant).await
            && rec.state == InstanceState::Ready
        {
            let shim = ShimClient::new(rec.address.clone(), rec.shim_token.clone());
            if let Err(e) = take_snapshot(app, tenant, &shim, "export").await {
                tracing::warn!(%tenant, error = %e, "export: a fresh snapshot failed; exporting the head");
            }
        }
    }
    let Some(head) = app.state().head(tenant).await? else {
        return Err(Error::not_found(format!(
            "saved state of tenant {tenant} (it has never been snapshotted)"
        )));
    };
    let (archive, file) = SpoolFile::create(&app.settings().data_dir, tenant.as_str()).await?;
    drop(file);
    let meta = fetch_checked(app, tenant, &head.id, &archive).await?;
    let (tar, file) = SpoolFile::create(&app.settings().data_dir, tenant.as_str()).await?;
    let from = archive.path().to_path_buf();
    let file = file.into_std().await;
    tokio::task::spawn_blocking(move || {
        let input = std::fs::File::open(&from)?;
        let mut out = std::io::BufWriter::new(file);
        otm_shim::archive::decompress(
            std::io::BufReader::with_capacity(otm_shim::pipe::CHUNK, input),
            &mut out,
        )?;
        std::io::Write::flush(&mut out)
    })
    .await
    .map_err(|e| Error::generic("export", e))?
    .map_err(|e| Error::generic("export", format!("cannot decode snapshot {}: {e}", head.id)))?;
    Ok((tar, meta))
}

/// Snapshots every running tenant every `snapshot_interval_s`, on the leader.
pub async fn run_periodic_snapshots(app: Arc<App>) {
    let secs = app.settings().snapshot_interval_s;
    if secs == 0 {
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_secs(secs));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = app.shutdown().cancelled() => return,
            _ = tick.tick() => {}
        }
        if !app.is_leader() {
            continue;
        }
        for rec in app.registry().list_instances().await.unwrap_or_default() {
            let (Some(tenant), InstanceState::Ready) = (rec.tenant.clone(), rec.state) else {
                continue;
            };
            let lock = app.tenant_lock(&tenant);
            let _held = lock.lock().await;
            // Still the same ready instance once the lock is ours?
            match app.registry().instance_of(&tenant).await {
                Ok(Some(r)) if r.id == rec.id && r.state == InstanceState::Ready => {}
                _ => continue,
            }
            let shim = ShimClient::new(rec.address.clone(), rec.shim_token.clone());
            if let Err(e) = take_snapshot(&app, &tenant, &shim, "periodic").await {
                tracing::warn!(%tenant, error = %e, "periodic snapshot failed");
            }
        }
    }
}

/// Keeps `warm_pool_target` started, unbound instances, on the leader. Wakes claim them; this
/// loop refills the pool within about a second, or at once when the target changes.
pub async fn run_warm_pool(app: Arc<App>) {
    let mut notes = app.coordinator().subscribe();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = app.shutdown().cancelled() => return,
            _ = tick.tick() => {}
            n = notes.next() => if n.is_none() { return },
        }
        if !app.is_leader() {
            continue;
        }
        if let Err(e) = fill_warm_pool(&app).await {
            tracing::warn!(error = %e, "warm pool refill failed");
        }
    }
}

async fn fill_warm_pool(app: &Arc<App>) -> Result<()> {
    let settings = app.registry().get_settings().await?;
    app.metrics()
        .max_running
        .set(i64::from(settings.max_running));
    let mut target = settings.warm_pool_target as usize;
    if settings.max_running > 0 {
        // Warm instances count as running: the pool never takes the fleet over its limit.
        let running = app
            .registry()
            .list_instances()
            .await?
            .iter()
            .filter(|r| r.tenant.is_some())
            .count();
        target = target.min((settings.max_running as usize).saturating_sub(running));
    }
    let warm: Vec<InstanceRecord> = app
        .registry()
        .list_instances()
        .await?
        .into_iter()
        .filter(|r| r.tenant.is_none() && r.state == InstanceState::Warm)
        .collect();
    if warm.len() > target {
        for rec in warm.iter().skip(target) {
            // Claimed meanwhile? Only delete what is still warm.
            if let Ok(Some(r)) = app.registry().get_instance(&rec.id).await
                && r.tenant.is_none()
                && r.state == InstanceState::Warm
            {
                discard(app, &r).await;
                app.metrics().reconciler("warm_removed");
            }
        }
        return Ok(());
    }
    for _ in warm.len()..target {
        if app.shutdown().is_cancelled() {
            break;
        }
        let id = InstanceId::random();
        let spec = InstanceSpec {
            shim_token: app.keys().shim_token(&id),
            id,
            tenant: None,
            limits: settings.default_limits,
            profile: None,
        };
        let created = app.runtime().create(&spec).await?;
        let rec = InstanceRecord {
            id: spec.id,
            tenant: None,
            state: InstanceState::Warm,
            address: created.address,
            shim_token: spec.shim_token,
            surrogate_digest: None,
            created_at_ms: app.clock().now_ms(),
            bound_at_ms: None,
        };
        app.registry().put_instance(&rec, None).await?;
        app.metrics().reconciler("warm_created");
        refresh_instance_gauge(app).await;
    }
    Ok(())
}

/// Shortest time between two readings of every instance record for `otm_instances`.
const INSTANCE_GAUGE_EVERY: Duration = Duration::from_secs(1);

/// Sets `otm_instances{state}` from the registry: at once when it was last read more than
/// [`INSTANCE_GAUGE_EVERY`] ago, else once that long after the last reading, so a burst of wakes
/// and stops reads every instance record once a second, not once per wake.
pub(crate) async fn refresh_instance_gauge(app: &Arc<App>) {
    match app.instance_gauge_due(INSTANCE_GAUGE_EVERY) {
        None => read_instance_gauge(app).await,
        Some(None) => {}
        Some(Some(at)) => {
            let a = app.clone();
            app.spawn(async move {
                let app = a;
                tokio::select! {
                    _ = app.shutdown().cancelled() => return,
                    _ = tokio::time::sleep_until(at) => {}
                }
                app.instance_gauge_reading();
                read_instance_gauge(&app).await;
            });
        }
    }
}

async fn read_instance_gauge(app: &Arc<App>) {
    let Ok(list) = app.registry().list_instances().await else {
        return;
    };
    for state in [
        InstanceState::Warm,
        InstanceState::Binding,
        InstanceState::Ready,
        InstanceState::Stopping,
    ] {
        let n = list.iter().filter(|i| i.state == state).count() as i64;
        app.metrics()
            .instances
            .get_or_create(&crate::metrics::State {
                state: state.as_str().into(),
            })
            .set(n);
    }
}

/// Holds the leader lease while it can: the reaper, the warm pool and periodic snapshots act
/// only on the leader, so several replicas never reap or fill twice.
pub async fn run_leader_election(app: Arc<App>) {
    let holder = format!(
        "{}-{}",
        std::env::var("HOSTNAME").unwrap_or_else(|_| "otm".into()),
        otm_core::id::random_hex(4)
    );
    if let Some(elector) = app.runtime().leader_elector(&holder) {
        return run_elector(app, elector.as_ref(), &holder).await;
    }
    const TTL: Duration = Duration::from_secs(10);
    let mut held: Option<otm_core::Lease> = None;
    loop {
        held = match held.take() {
            Some(lease) => match app.coordinator().renew(&lease, TTL).await {
                Ok(true) => Some(lease),
                _ => {
                    tracing::warn!("lost the leader lease");
                    None
                }
            },
            None => app
                .coordinator()
                .acquire("leader", TTL)
                .await
                .ok()
                .flatten()
                .inspect(|l| {
                    tracing::info!(fence = l.fence, "this replica is the leader");
                }),
        };
        app.set_leader(held.is_some());
        tokio::select! {
            _ = app.shutdown().cancelled() => break,
            _ = tokio::time::sleep(if held.is_some() { Duration::from_secs(3) } else { Duration::from_millis(500) }) => {}
        }
    }
    app.set_leader(false);
    if let Some(lease) = held {
        let _ = app.coordinator().release(&lease).await;
    }
}

/// Leader election through the runtime's own means (a Kubernetes Lease): renewed every 2 s,
/// tried every second while another holds it; a renewal that fails drops the lead at once.
async fn run_elector(app: Arc<App>, elector: &dyn otm_core::LeaderElector, holder: &str) {
    let mut leading = false;
    loop {
        let now_leading = match elector.acquire_or_renew().await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, on = %elector.describe(), "leader election failed");
                false
            }
        };
        if now_leading != leading {
            if now_leading {
                tracing::info!(holder, on = %elector.describe(), "this replica is the leader");
            } else {
                tracing::warn!(holder, on = %elector.describe(), "lost the lead");
            }
        }
        leading = now_leading;
        app.set_leader(leading);
        tokio::select! {
            _ = app.shutdown().cancelled() => break,
            _ = tokio::time::sleep(if leading { Duration::from_secs(2) } else { Duration::from_secs(1) }) => {}
        }
    }
    app.set_leader(false);
    if leading {
        let _ = elector.release().await;
    }
}
