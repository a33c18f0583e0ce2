//! Time-based logic under `tokio::time::pause()`: the idle reaper, delivery backoff and
//! dead-lettering, lease renewal and giving up, and the warm pool, on in-process backends and a
//! runtime whose instances answer at once; the dispatcher against a stand-in waker and its
//! failure kinds; shutdown's drain. Minutes of the server's time pass in milliseconds.

mod support;

use async_trait::async_trait;
use futures::stream::BoxStream;
use otm_core::instance::Endpoint;
use otm_core::{
    Coordinator, DeliveryFailure, FleetSettings, InstanceState, Lease, Notification, Result,
    Runtime, TenantId, TenantStatus,
};
use otm_server::lease::HeldLease;
use otm_server::wake::{WakePath, Waker, Woken};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use support::World;
use tokio::time::{Instant, sleep, sleep_until};

#[tokio::test(start_paused = true)]
async fn an_idle_tenant_is_stopped_after_its_timeout_with_a_final_snapshot() {
    let w = World::new(|_| {}).await;
    w.run_loops();
    let t = w.tenant("sleepy", 60).await;
    w.update(&t, 1).await;
    w.until(Duration::from_secs(5), async || {
        w.registry().inbox_depth(&t).await.unwrap() == 0
    })
    .await;
    let delivered = Instant::now();
    assert_eq!(w.runtime.shims.deliveries.load(Ordering::SeqCst), 1);
    assert_eq!(w.status(&t).await, TenantStatus::Running);

    // Just before its idle timeout the tenant is still up.
    sleep_until(delivered + Duration::from_secs(58)).await;
    assert_eq!(w.status(&t).await, TenantStatus::Running);
    assert!(w.registry().instance_of(&t).await.unwrap().is_some());

    // The reaper looks every second: within two of the deadline it is stopped.
    sleep_until(delivered + Duration::from_secs(62)).await;
    assert_eq!(w.status(&t).await, TenantStatus::Idle);
    assert!(w.registry().instance_of(&t).await.unwrap().is_none());
    assert_eq!(w.runtime.running(), 0);
    let head = w.app.state().head(&t).await.unwrap().expect("a snapshot");
    assert_eq!(head.reason, "final");
}

#[tokio::test(start_paused = true)]
async fn an_idle_tenant_is_frozen_after_freeze_after_thawed_by_an_update_and_stopped_later() {
    let w = World::new(|_| {}).await;
    w.run_loops();
    let t = w.tenant("icy", 600).await;
    w.update(&t, 1).await;
    w.until(Duration::from_secs(5), async || {
        w.registry().inbox_depth(&t).await.unwrap() == 0
    })
    .await;
    let delivered = Instant::now();
    let instance = w.registry().instance_of(&t).await.unwrap().unwrap().id;

    // Frozen after the default 60 s, not before.
    sleep_until(delivered + Duration::from_secs(58)).await;
    assert_eq!(w.status(&t).await, TenantStatus::Running);
    sleep_until(delivered + Duration::from_secs(62)).await;
    assert_eq!(w.status(&t).await, TenantStatus::Frozen);
    assert_eq!(w.runtime.shims.freezes.load(Ordering::SeqCst), 1);
    assert!(
        w.app.coordinator().endpoint(&t).await.unwrap().is_none(),
        "the next update goes through a wake, which thaws"
    );
    otm_server::orchestrator::reconcile(&w.app).await.unwrap();
    assert!(
        w.app.coordinator().endpoint(&t).await.unwrap().is_none(),
        "the reconcile pass does not put a frozen tenant's endpoint back"
    );

    // An update thaws it: the same instance, a thaw, no new instance.
    w.update(&t, 2).await;
    w.until(Duration::from_secs(5), async || {
        w.registry().inbox_depth(&t).await.unwrap() == 0
    })
    .await;
    let thawed = Instant::now();
    assert_eq!(w.status(&t).await, TenantStatus::Running);
    assert_eq!(w.runtime.shims.thaws.load(Ordering::SeqCst), 1);
    assert_eq!(w.runtime.shims.created.load(Ordering::SeqCst), 1);
    assert_eq!(
        w.registry().instance_of(&t).await.unwrap().unwrap().id,
        instance
    );

    // Frozen again 60 s later; stopped with a final snapshot at its idle timeout.
    sleep_until(thawed + Duration::from_secs(62)).await;
    assert_eq!(w.status(&t).await, TenantStatus::Frozen);
    sleep_until(thawed + Duration::from_secs(598)).await;
    assert_eq!(w.status(&t).await, TenantStatus::Frozen);
    sleep_until(thawed + Duration::from_secs(602)).await;
    assert_eq!(w.status(&t).await, TenantStatus::Idle);
    assert!(w.registry().instance_of(&t).await.unwrap().is_none());
    let head = w.app.state().head(&t).await.unwrap().expect("a snapshot");
    assert_eq!(head.reason, "final");
}

#[tokio::test(start_paused = true)]
async fn over_the_frozen_memory_budget_the_least_recently_active_frozen_tenants_sleep_first() {
    let w = World::new(|_| {}).await;
    w.run_loops();
    let mut tenants = Vec::new();
    for (i, id) in ["first", "second", "third"].into_iter().enumerate() {
        let t = w.tenant(id, 600).await;
        w.update(&t, 1).await;
        w.until(Duration::from_secs(5), async || {
            w.registry().inbox_depth(&t).await.unwrap() == 0
        })
        .await;
        tenants.push(t);
        if i < 2 {
            sleep(Duration::from_secs(5)).await;
        }
    }
    sleep(Duration::from_secs(62)).await;
    for t in &tenants {
        assert_eq!(w.status(t).await, TenantStatus::Frozen, "{t}");
    }
    // Room for two of the three: the one active longest ago goes to sleep, the others stay.
    let mut fleet = w.registry().get_settings().await.unwrap();
    fleet.frozen_memory_max = 2 * support::runtime::FROZEN_MEMORY + 1;
    w.registry().put_settings(&fleet).await.unwrap();
    sleep(Duration::from_secs(3)).await;
    assert_eq!(w.status(&tenants[0]).await, TenantStatus::Idle);
    assert_eq!(w.status(&tenants[1]).await, TenantStatus::Frozen);
    assert_eq!(w.status(&tenants[2]).await, TenantStatus::Frozen);
    // Room for one.
    fleet.frozen_memory_max = support::runtime::FROZEN_MEMORY;
    w.registry().put_settings(&fleet).await.unwrap();
    sleep(Duration::from_secs(3)).await;
    assert_eq!(w.status(&tenants[1]).await, TenantStatus::Idle);
    assert_eq!(w.status(&tenants[2]).await, TenantStatus::Frozen);
}

#[tokio::test(start_paused = true)]
async fn a_tenant_with_updates_arriving_stays_awake() {
    let w = World::new(|_| {}).await;
    w.run_loops();
    let t = w.tenant("chatty", 30).await;
    // One update every 20 s for two minutes: never 30 s without activity.
    for i in 1..=6 {
        w.update(&t, i).await;
        sleep(Duration::from_secs(20)).await;
        assert_eq!(
            w.status(&t).await,
            TenantStatus::Running,
            "after update {i}"
        );
    }
    assert_eq!(w.runtime.shims.created.load(Ordering::SeqCst), 1);
    sleep(Duration::from_secs(12)).await;
    assert_eq!(w.status(&t).await, TenantStatus::Idle);
}

#[tokio::test(start_paused = true)]
async fn a_draining_backlog_records_activity_once_a_second_and_after_its_last_update() {
    let w = World::new(|_| {}).await;
    w.run_loops();
    let t = w.tenant("backlog", 60).await;
    // Thirty updates, each a 100 ms turn of the agent: about three seconds of deliveries.
    w.runtime.shims.turn_ms.store(100, Ordering::SeqCst);
    let started = w.app.clock().now_ms();
    for i in 1..=30 {
        w.update(&t, i).await;
    }
    let mut seen = std::collections::BTreeSet::new();
    w.until(Duration::from_secs(30), async || {
        let tenant = w.registry().get_tenant(&t).await.unwrap().unwrap();
        seen.insert(tenant.last_active_ms);
        w.registry().inbox_depth(&t).await.unwrap() == 0
    })
    .await;
    sleep(Duration::from_millis(50)).await;
    let drained = w.app.clock().now_ms();
    let last = w
        .registry()
        .get_tenant(&t)
        .await
        .unwrap()
        .unwrap()
        .last_active_ms;
    seen.insert(last);
    assert_eq!(w.runtime.shims.deliveries.load(Ordering::SeqCst), 30);
    // Written about once a second while it drained (not once per update), …
    let writes = seen.iter().filter(|&&at| at > started).count();
    assert!(
        (2..=6).contains(&writes),
        "activity written {writes} times for 30 deliveries: {seen:?}"
    );
    // … and as of the last delivery once the inbox is empty.
    assert!(
        last >= started + 2_900 && last <= drained,
        "last activity {} ms after the first update, drained at {} ms",
        last - started,
        drained - started
    );
}

#[tokio::test(start_paused = true)]
async fn refused_updates_back_off_then_go_to_the_dead_letter_list() {
    let w = World::new(|s| s.max_delivery_attempts = 4).await;
    w.run_loops();
    w.runtime.shims.refuse.store(true, Ordering::SeqCst);
    let t = w.tenant("refused", 600).await;
    let start = Instant::now();
    w.update(&t, 1).await;
    let attempts = async |w: &World, t: &TenantId| {
        let v = w.registry().inbox_view(t, None, 10).await.unwrap();
        (
            v.pending.first().map(|i| i.attempts),
            v.dead.first().map(|i| i.attempts),
        )
    };
    // Attempts at 0 ms, then 100, 200 and 400 ms apart.
    sleep_until(start + Duration::from_millis(50)).await;
    assert_eq!(attempts(&w, &t).await, (Some(1), None));
    sleep_until(start + Duration::from_millis(150)).await;
    assert_eq!(attempts(&w, &t).await, (Some(2), None));
    sleep_until(start + Duration::from_millis(290)).await;
    assert_eq!(attempts(&w, &t).await, (Some(2), None));
    sleep_until(start + Duration::from_millis(650)).await;
    assert_eq!(attempts(&w, &t).await, (Some(3), None));
    sleep_until(start + Duration::from_millis(750)).await;
    assert_eq!(attempts(&w, &t).await, (None, Some(4)));

    let dead = w.registry().inbox_view(&t, None, 10).await.unwrap().dead;
    assert_eq!(dead[0].failure().0, Some(DeliveryFailure::AgentRefused));
    assert_eq!(w.runtime.shims.deliveries.load(Ordering::SeqCst), 4);
    // Nothing is tried again once it is dead.
    sleep(Duration::from_secs(60)).await;
    assert_eq!(w.runtime.shims.deliveries.load(Ordering::SeqCst), 4);
    // The next update goes through once the agent takes updates again.
    w.runtime.shims.refuse.store(false, Ordering::SeqCst);
    w.update(&t, 2).await;
    w.until(Duration::from_secs(5), async || {
        w.registry().inbox_depth(&t).await.unwrap() == 0
    })
    .await;
    assert_eq!(w.runtime.shims.deliveries.load(Ordering::SeqCst), 5);
}

/// The in-memory coordinator, whose renewals fail while `fail_renewals` is set, and find
/// another owner while `taken` is.
#[derive(Debug, Default)]
struct Flaky {
    inner: otm_store::MemoryCoordinator,
    fail_renewals: AtomicBool,
    /// Renewals answer that another owner holds the lease.
    taken: AtomicBool,
}

#[async_trait]
impl Coordinator for Flaky {
    async fn endpoint(&self, tenant: &TenantId) -> Result<Option<Endpoint>> {
        self.inner.endpoint(tenant).await
    }
    async fn set_endpoint(&self, tenant: &TenantId, ep: &Endpoint, ttl: Duration) -> Result<()> {
        self.inner.set_endpoint(tenant, ep, ttl).await
    }
    async fn clear_endpoint(&self, tenant: &TenantId) -> Result<()> {
        self.inner.clear_endpoint(tenant).await
    }
    async fn acquire(&self, key: &str, ttl: Duration) -> Result<Option<Lease>> {
        self.inner.acquire(key, ttl).await
    }
    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool> {
        if self.fail_renewals.load(Ordering::SeqCst) {
            return Err(otm_core::Error::unavailable("coordinator", "unreachable"));
        }
        if self.taken.load(Ordering::SeqCst) {
            return Ok(false);
        }
        self.inner.renew(lease, ttl).await
    }
    async fn release(&self, lease: &Lease) -> Result<bool> {
        self.inner.release(lease).await
    }
    async fn publish(&self, n: Notification) -> Result<()> {
        self.inner.publish(n).await
    }
    fn subscribe(&self) -> BoxStream<'static, Notification> {
        self.inner.subscribe()
    }
}

#[tokio::test(start_paused = true)]
async fn a_renewed_lease_outlives_many_ttls() {
    let flaky = Arc::new(Flaky::default());
    let c: Arc<dyn Coordinator> = flaky.clone();
    let ttl = Duration::from_secs(3);
    let held = HeldLease::try_acquire(&c, "k", ttl).await.unwrap().unwrap();
    sleep(ttl * 20).await;
    assert!(!held.lost().is_cancelled());
    assert!(c.acquire("k", ttl).await.unwrap().is_none(), "still held");
    held.release().await;
    assert!(c.acquire("k", ttl).await.unwrap().is_some(), "released");
}

#[tokio::test(start_paused = true)]
async fn a_lease_that_cannot_be_renewed_is_given_up_before_it_lapses() {
    let flaky = Arc::new(Flaky::default());
    let c: Arc<dyn Coordinator> = flaky.clone();
    // A 4 s lease is renewed every 1.33 s and given up 1 s before it may lapse.
    let ttl = Duration::from_secs(4);
    let start = Instant::now();
    let held = HeldLease::try_acquire(&c, "k", ttl).await.unwrap().unwrap();
    flaky.fail_renewals.store(true, Ordering::SeqCst);
    sleep_until(start + Duration::from_millis(2900)).await;
    assert!(!held.lost().is_cancelled(), "failed renewals are retried");
    // Given up within the TTL minus its margin (and one retry pause)...
    sleep_until(start + Duration::from_millis(3500)).await;
    assert!(held.lost().is_cancelled(), "given up");
    // ...while the coordinator still holds it for this owner: nobody else can have taken over.
    assert!(c.acquire("k", ttl).await.unwrap().is_none());
    sleep_until(start + Duration::from_millis(4100)).await;
    assert!(
        c.acquire("k", ttl).await.unwrap().is_some(),
        "lapsed at its TTL"
    );
}

#[tokio::test(start_paused = true)]
async fn a_lease_another_owner_took_is_lost_at_the_next_renewal() {
    let flaky = Arc::new(Flaky::default());
    let c: Arc<dyn Coordinator> = flaky.clone();
    let ttl = Duration::from_secs(3);
    let start = Instant::now();
    let held = HeldLease::try_acquire(&c, "k", ttl).await.unwrap().unwrap();
    flaky.taken.store(true, Ordering::SeqCst);
    sleep_until(start + Duration::from_millis(900)).await;
    assert!(!held.lost().is_cancelled());
    // Renewed every third of the TTL: the first renewal, at 1 s, finds another owner.
    sleep_until(start + Duration::from_millis(1100)).await;
    assert!(held.lost().is_cancelled());
}

/// A dispatcher that did not notice it lost its lease (its process paused past the TTL, say)
/// delivers, then finds its late acknowledgement refused: the inbox was claimed under a newer
/// fence meanwhile. The update stays pending for the new owner, and the old dispatcher stops.
#[tokio::test(start_paused = true)]
async fn a_late_acknowledgement_under_a_stale_fence_is_refused() {
    let w = World::new(|_| {}).await;
    w.run_loops();
    let t = w.tenant("fenced", 600).await;
    w.runtime.shims.hold.store(true, Ordering::SeqCst);
    w.update(&t, 1).await;
    w.until(Duration::from_secs(5), async || {
        w.runtime.shims.deliveries.load(Ordering::SeqCst) == 1
    })
    .await;
    // Another dispatcher takes the inbox over while the agent is still at the update.
    w.registry().inbox_claim(&t, u64::MAX / 2).await.unwrap();
    w.runtime.shims.hold.store(false, Ordering::SeqCst);
    sleep(Duration::from_secs(10)).await;

    let view = w.registry().inbox_view(&t, None, 10).await.unwrap();
    assert_eq!(
        view.pending.len(),
        1,
        "the late acknowledgement was refused"
    );
    assert_eq!(view.pending[0].update_id, 1);
    assert_eq!(view.pending[0].attempts, 0, "nor recorded as a failure");
    let metrics = w.app.metrics().encode();
    assert!(
        !metrics.contains("otm_deliveries_total{outcome=\"acked\"}"),
        "{metrics}"
    );
    // Nothing more is delivered under the stale fence: the inbox is the new owner's.
    assert_eq!(w.runtime.shims.deliveries.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn the_warm_pool_fills_refills_after_a_claim_and_drains() {
    let w = World::new(|_| {}).await;
    w.run_loops();
    let warm = async |w: &World| {
        w.registry()
            .list_instances()
            .await
            .unwrap()
            .iter()
            .filter(|r| r.tenant.is_none() && r.state == InstanceState::Warm)
            .count()
    };
    sleep(Duration::from_secs(2)).await;
    assert_eq!(warm(&w).await, 0);
    w.registry()
        .put_settings(&FleetSettings {
            warm_pool_target: 2,
            ..Default::default()
        })
        .await
        .unwrap();
    sleep(Duration::from_millis(1500)).await;
    assert_eq!(warm(&w).await, 2);
    assert_eq!(w.runtime.running(), 2);

    let t = w.tenant("warmed", 600).await;
    w.update(&t, 1).await;
    w.until(Duration::from_secs(5), async || {
        w.registry().inbox_depth(&t).await.unwrap() == 0
    })
    .await;
    sleep(Duration::from_millis(1500)).await;
    assert_eq!(warm(&w).await, 2, "refilled after the wake claimed one");
    assert_eq!(
        w.runtime.shims.created.load(Ordering::SeqCst),
        3,
        "the wake took a warm instance instead of creating one"
    );

    w.registry()
        .put_settings(&FleetSettings::default())
        .await
        .unwrap();
    sleep(Duration::from_millis(1500)).await;
    assert_eq!(warm(&w).await, 0);
    assert_eq!(w.runtime.running(), 1, "the tenant's instance stays");
}

/// An orchestrator's internal API stand-in on loopback: answers every wake with `status` (and a
/// wake when 200), counting the calls.
async fn orchestrator(status: u16, calls: Arc<std::sync::atomic::AtomicUsize>) -> String {
    use axum::http::StatusCode;
    let app = axum::Router::new().route(
        "/internal/v1/wake/{tenant}",
        axum::routing::post(move || {
            let calls = calls.clone();
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                let status = StatusCode::from_u16(status).unwrap();
                let body = if status.is_success() {
                    serde_json::to_value(otm_server::remote::WakeAnswer {
                        instance: otm_core::InstanceId::random(),
                        address: "unix:/nowhere".into(),
                        shim_token: otm_core::Secret::new("t"),
                        path: otm_server::wake::WakePath::Warm,
                        total_ms: 1,
                        phases: vec![],
                    })
                    .unwrap()
                } else {
                    serde_json::json!({"error": {"code": "unavailable", "message": "busy"}})
                };
                (status, axum::Json(body))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

#[tokio::test(start_paused = true)]
async fn a_router_fails_over_to_the_next_orchestrator_and_stops_at_not_found() {
    use otm_server::remote::OrchestratorClient;
    use std::sync::atomic::AtomicUsize;
    let counters: Vec<Arc<AtomicUsize>> = (0..3).map(|_| Arc::default()).collect();
    let failing = orchestrator(503, counters[0].clone()).await;
    let working = orchestrator(200, counters[1].clone()).await;
    let missing = orchestrator(404, counters[2].clone()).await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let client = |urls: Vec<String>| {
        OrchestratorClient::new(
            urls,
            otm_core::Secret::new("s"),
            http.clone(),
            Duration::from_secs(5),
        )
    };
    // Which orchestrator is asked first depends on the tenant: "a" (97) starts at index 1 of 2.
    let t = TenantId::parse("a").unwrap();
    let woken = client(vec![working.clone(), failing.clone()])
        .wake_remote(&t, None)
        .await
        .unwrap();
    assert_eq!(woken.path, otm_server::wake::WakePath::Warm);
    assert_eq!(
        counters[0].load(Ordering::SeqCst),
        1,
        "the failing one first"
    );
    assert_eq!(counters[1].load(Ordering::SeqCst), 1, "then the next");

    // Every orchestrator failing: each is asked once, and the last failure is the answer.
    let err = client(vec![failing.clone(), failing.clone()])
        .wake_remote(&t, None)
        .await
        .unwrap_err();
    assert!(matches!(err, otm_core::Error::Unavailable { .. }), "{err}");
    assert_eq!(counters[0].load(Ordering::SeqCst), 3);

    // Not found is an answer, not a failure: nobody else is asked.
    let err = client(vec![working, missing])
        .wake_remote(&t, None)
        .await
        .unwrap_err();
    assert!(matches!(err, otm_core::Error::NotFound { .. }), "{err}");
    assert_eq!(counters[2].load(Ordering::SeqCst), 1);
    assert_eq!(counters[1].load(Ordering::SeqCst), 1);
}

/// A waker standing in for the orchestrator: its first `failures` wakes fail, every later one
/// answers the endpoint it was given (without caching it, so every attempt asks again).
#[derive(Debug)]
struct FakeWaker {
    failures: usize,
    calls: std::sync::atomic::AtomicUsize,
    endpoint: std::sync::Mutex<Option<Endpoint>>,
}

impl FakeWaker {
    fn new(failures: usize) -> Arc<FakeWaker> {
        Arc::new(FakeWaker {
            failures,
            calls: Default::default(),
            endpoint: Default::default(),
        })
    }

    fn answer(&self, address: String) {
        *self.endpoint.lock().unwrap() = Some(Endpoint {
            instance: otm_core::InstanceId::random(),
            address,
            shim_token: otm_core::Secret::new("t"),
            signature: None,
        });
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl Waker for FakeWaker {
    async fn wake(&self, _tenant: &TenantId, _chat: Option<i64>) -> Result<Woken> {
        if self.calls.fetch_add(1, Ordering::SeqCst) < self.failures {
            return Err(otm_core::Error::unavailable(
                "orchestrator",
                "no orchestrator answered",
            ));
        }
        let endpoint = self.endpoint.lock().unwrap().clone().expect("an endpoint");
        Ok(Woken {
            instance: endpoint.instance.clone(),
            endpoint,
            path: WakePath::Warm,
            total_ms: 0,
            phases: vec![],
        })
    }
}

/// A world whose wakes go to `waker`; no loop runs, the dispatcher is started by each update.
async fn world_waking_with(waker: &Arc<FakeWaker>, max_attempts: u32) -> World {
    let waker = waker.clone();
    World::with_waker(
        |s| s.max_delivery_attempts = max_attempts,
        move |_| waker as Arc<dyn Waker>,
    )
    .await
}

/// The pending and dead-lettered head of `t`'s inbox: attempts, and the kind of the last failure.
async fn head(
    w: &World,
    t: &TenantId,
) -> (
    Option<(u32, Option<DeliveryFailure>)>,
    Option<(u32, Option<DeliveryFailure>)>,
) {
    let v = w.registry().inbox_view(t, None, 10).await.unwrap();
    let of = |i: &otm_core::InboxItem| (i.attempts, i.failure().0);
    (v.pending.first().map(of), v.dead.first().map(of))
}

/// `otm_delivery_failures_total{kind}` as the metrics page shows it.
fn failures_counted(w: &World, kind: DeliveryFailure) -> u64 {
    let page = w.app.metrics().encode();
    let prefix = format!("otm_delivery_failures_total{{kind=\"{}\"}} ", kind.as_str());
    page.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |n| n.trim().parse().unwrap())
}

#[tokio::test(start_paused = true)]
async fn failed_wakes_back_off_are_recorded_as_wake_failed_and_the_update_goes_through_after() {
    let waker = FakeWaker::new(3);
    let w = world_waking_with(&waker, 10).await;
    // Once the waker stops failing it answers a stand-in shim that takes updates.
    let instance = w
        .runtime
        .create(&otm_core::InstanceSpec {
            id: otm_core::InstanceId::random(),
            shim_token: otm_core::Secret::new("t"),
            tenant: None,
            limits: Default::default(),
            profile: None,
        })
        .await
        .unwrap();
    waker.answer(instance.address);
    let t = w.tenant("unwakeable", 600).await;
    let start = Instant::now();
    w.update(&t, 1).await;
    // Attempts at 0 ms, then 100, 200 and 400 ms apart; the first three find no instance.
    sleep_until(start + Duration::from_millis(50)).await;
    assert_eq!(
        head(&w, &t).await,
        (Some((1, Some(DeliveryFailure::WakeFailed))), None)
    );
    sleep_until(start + Duration::from_millis(150)).await;
    assert_eq!(
        head(&w, &t).await.0,
        Some((2, Some(DeliveryFailure::WakeFailed)))
    );
    sleep_until(start + Duration::from_millis(290)).await;
    assert_eq!(
        head(&w, &t).await.0,
        Some((2, Some(DeliveryFailure::WakeFailed)))
    );
    sleep_until(start + Duration::from_millis(650)).await;
    assert_eq!(
        head(&w, &t).await.0,
        Some((3, Some(DeliveryFailure::WakeFailed)))
    );
    assert_eq!(waker.calls(), 3);
    assert_eq!(w.runtime.shims.deliveries.load(Ordering::SeqCst), 0);
    // The fourth wake works: the update is delivered and leaves the inbox.
    sleep_until(start + Duration::from_millis(750)).await;
    assert_eq!(head(&w, &t).await, (None, None));
    assert_eq!(w.registry().inbox_depth(&t).await.unwrap(), 0);
    assert_eq!(waker.calls(), 4);
    assert_eq!(w.runtime.shims.deliveries.load(Ordering::SeqCst), 1);
    assert_eq!(failures_counted(&w, DeliveryFailure::WakeFailed), 3);
    assert_eq!(failures_counted(&w, DeliveryFailure::ShimUnreachable), 0);
}

#[tokio::test(start_paused = true)]
async fn a_shim_nobody_listens_on_is_recorded_as_shim_unreachable() {
    let waker = FakeWaker::new(0);
    let w = world_waking_with(&waker, 2).await;
    waker.answer(format!(
        "unix:{}",
        w.dir.path().join("nobody.sock").display()
    ));
    let t = w.tenant("unreachable", 600).await;
    let start = Instant::now();
    w.update(&t, 1).await;
    sleep_until(start + Duration::from_millis(50)).await;
    assert_eq!(
        head(&w, &t).await,
        (Some((1, Some(DeliveryFailure::ShimUnreachable))), None)
    );
    // The second attempt, 100 ms later, is the last.
    sleep_until(start + Duration::from_millis(150)).await;
    assert_eq!(
        head(&w, &t).await,
        (None, Some((2, Some(DeliveryFailure::ShimUnreachable))))
    );
    assert_eq!(waker.calls(), 2);
    assert_eq!(failures_counted(&w, DeliveryFailure::ShimUnreachable), 2);
    assert_eq!(failures_counted(&w, DeliveryFailure::WakeFailed), 0);
}

#[tokio::test(start_paused = true)]
async fn a_shim_that_never_answers_is_recorded_as_timeout_after_60_s() {
    let waker = FakeWaker::new(0);
    let w = world_waking_with(&waker, 1).await;
    // A socket that takes connections and never answers on them.
    let socket = w.dir.path().join("silent.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            held.push(conn);
        }
    });
    waker.answer(format!("unix:{}", socket.display()));
    let t = w.tenant("silent", 600).await;
    let start = Instant::now();
    w.update(&t, 1).await;
    sleep_until(start + Duration::from_secs(59)).await;
    assert_eq!(head(&w, &t).await, (Some((0, None)), None), "still waiting");
    sleep_until(start + Duration::from_secs(61)).await;
    assert_eq!(
        head(&w, &t).await,
        (None, Some((1, Some(DeliveryFailure::Timeout))))
    );
    assert_eq!(waker.calls(), 1);
    assert_eq!(failures_counted(&w, DeliveryFailure::Timeout), 1);
}

#[tokio::test(start_paused = true)]
async fn shutdown_drains_the_dispatchers_and_releases_their_leases_at_once() {
    let w = World::new(|s| s.lease_ttl_s = 30).await;
    w.run_loops();
    let t = w.tenant("draining", 600).await;
    w.update(&t, 1).await;
    w.until(Duration::from_secs(5), async || {
        w.registry().inbox_depth(&t).await.unwrap() == 0
    })
    .await;
    // The dispatcher stays for a while with nothing to do, holding its lease.
    let key = format!("dispatch:{t}");
    let ttl = Duration::from_secs(30);
    assert!(
        w.app
            .coordinator()
            .acquire(&key, ttl)
            .await
            .unwrap()
            .is_none(),
        "the dispatcher holds its lease"
    );

    let begun = Instant::now();
    w.shutdown.cancel();
    assert!(
        w.app.drain_tasks(begun + Duration::from_secs(10)).await,
        "every tracked task ended within the grace period"
    );
    assert!(
        begun.elapsed() < Duration::from_secs(1),
        "{:?}",
        begun.elapsed()
    );
    // Released, not left to lapse: another replica takes it at once, well before the TTL.
    assert!(
        w.app
            .coordinator()
            .acquire(&key, ttl)
            .await
            .unwrap()
            .is_some(),
        "the lease was released at shutdown"
    );
    assert!(begun.elapsed() < ttl);
}
