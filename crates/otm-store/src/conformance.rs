//! Conformance suites: one per backend trait, run against every backend.
//!
//! Each suite is an async function that panics on the first broken contract point. The embedded
//! backends run them in this crate's `tests/conformance.rs`; external ones (PostgreSQL, Redis,
//! DynamoDB, S3) run the same functions whenever their URL is set. Every run uses fresh, random
//! tenant ids and keys, and checks only its own records, so runs may share a backend. Suites
//! that must touch shared state (`inbox_prune`, fleet settings, warm instances) say so below.

use crate::ObjectStateStore;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::{ObjectStoreExt, PutPayload};
use otm_core::instance::Endpoint;
use otm_core::{
    Appended, Coordinator, DeadLetters, Error, FailOutcome, FleetSettings, InstanceId,
    InstanceRecord, InstanceState, InstanceStore, Lease, Notification, Registry, Secret,
    SnapshotId, SnapshotMeta, StateStore, Tenant, TenantId, TenantStatus, TenantStore,
};
use sha2::Digest;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

/// Asserts that `$e` is an `Err` matching `$pat`.
macro_rules! assert_err {
    ($e:expr, $pat:pat, $($ctx:tt)+) => {
        match $e {
            Err($pat) => {}
            other => panic!("{}: expected Err({}), got {:?}", format!($($ctx)+), stringify!($pat), other),
        }
    };
}

/// A fresh prefix for this run's ids: `ct-` and 8 hex digits.
fn run_id() -> String {
    format!("ct-{}", otm_core::id::random_hex(4))
}

fn tenant_id(run: &str, name: &str) -> TenantId {
    TenantId::parse(&format!("{run}-{name}")).expect("a valid tenant id")
}

/// A tenant with fixed, distinctive field values, active at `last_active_ms`.
fn tenant(id: &TenantId, last_active_ms: i64, idle_timeout_s: u64) -> Tenant {
    Tenant {
        id: id.clone(),
        profile: "reference".into(),
        idle_timeout_s,
        bot_token: Some(Secret::new("123456:conformance-bot-token")),
        webhook_secret: Secret::random(),
        cold_start_notice: true,
        status: TenantStatus::Idle,
        created_at_ms: 1_000,
        last_active_ms,
        limits: otm_core::TenantLimits {
            memory_bytes: Some(512 << 20),
            pids: Some(64),
            ..Default::default()
        },
    }
}

// =============================================================================================
// Registry

/// Every contract point of [`Registry`].
///
/// Touches shared state: `inbox_prune` forgets every backend-wide delivered update accepted
/// before now, warm instances of other runs may be claimed (and are put back), and the fleet
/// settings are written (and restored).
pub async fn registry_suite(r: Arc<dyn Registry>) {
    let run = run_id();
    registry_tenants(&*r, &run).await;
    registry_fences(&*r, &run).await;
    registry_dispatch_fences(&*r, &run).await;
    registry_idle_due(&*r, &run).await;
    registry_freeze_due(&*r, &run).await;
    registry_inbox(&*r, &run).await;
    registry_inbox_together(&*r, &run).await;
    registry_dead_letters(&*r, &run).await;
    registry_admin(&*r, &run).await;
    registry_inbox_prune(&*r, &run).await;
    registry_instances(r.clone(), &run).await;
    registry_settings(&*r).await;
    inbox_stress(r.clone(), 4, 10, 10).await;
    sealed_registry(r.clone(), &run).await;
}

/// The backend under [`crate::SealedRegistry`]: it stores only ciphertext for bot tokens and
/// webhook secrets and a marker for derived shim tokens, reads plaintext rows from before
/// encryption, and refuses (naming the tenant) a ciphertext moved to another tenant.
async fn sealed_registry(r: Arc<dyn Registry>, run: &str) {
    use crate::secrets::{DERIVED_SHIM_TOKEN, SealedRegistry, SecretKeys};
    let keys = Arc::new(SecretKeys::ephemeral());
    let sealed = SealedRegistry::new(r.clone(), keys.clone());
    let a = tenant_id(run, "sealed-a");
    let b = tenant_id(run, "sealed-b");
    let ta = tenant(&a, 2_000, 30);
    sealed.create_tenant(&ta).await.unwrap();
    let raw = r.get_tenant(&a).await.unwrap().unwrap();
    for (field, stored, plain) in [
        (
            "bot token",
            raw.bot_token.as_ref().unwrap(),
            ta.bot_token.as_ref().unwrap(),
        ),
        ("webhook secret", &raw.webhook_secret, &ta.webhook_secret),
    ] {
        assert!(
            stored.expose().starts_with("v1:") && !stored.expose().contains(plain.expose()),
            "the backend stores the {field} encrypted"
        );
    }
    assert_eq!(
        sealed.get_tenant(&a).await.unwrap().as_ref(),
        Some(&ta),
        "a sealed tenant reads back decrypted"
    );

    // A plaintext row from before encryption reads as it is, and the next write encrypts it.
    let tb = tenant(&b, 2_000, 30);
    r.create_tenant(&tb).await.unwrap();
    assert_eq!(sealed.get_tenant(&b).await.unwrap().as_ref(), Some(&tb));
    sealed.update_tenant(&tb).await.unwrap();
    let raw_b = r.get_tenant(&b).await.unwrap().unwrap();
    assert!(raw_b.webhook_secret.expose().starts_with("v1:"));
    assert_eq!(sealed.get_tenant(&b).await.unwrap().as_ref(), Some(&tb));

    // A ciphertext copied to another tenant does not decrypt there; the error names the tenant
    // and carries no secret.
    let mut moved = raw_b.clone();
    moved.bot_token = raw.bot_token.clone();
    r.update_tenant(&moved).await.unwrap();
    let err = sealed.get_tenant(&b).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Corrupt { .. }), "{err:?}");
    assert!(
        msg.contains(b.as_str()) && msg.contains("bot token") && !msg.contains("conformance"),
        "{msg}"
    );
    assert!(sealed.list_tenants().await.is_err());
    // Nothing was lost: the old value is still there to restore.
    r.update_tenant(&raw_b).await.unwrap();
    assert_eq!(sealed.get_tenant(&b).await.unwrap().as_ref(), Some(&tb));

    // Shim tokens: derived ones are stored as a marker and come back derived.
    let id = InstanceId::random();
    let rec = InstanceRecord {
        id: id.clone(),
        tenant: None,
        state: InstanceState::Warm,
        address: "unix:/run/otm/sealed.sock".into(),
        shim_token: keys.shim_token(&id),
        surrogate_digest: None,
        created_at_ms: 1_000,
        bound_at_ms: None,
    };
    sealed.put_instance(&rec, None).await.unwrap();
    assert_eq!(
        r.get_instance(&id)
            .await
            .unwrap()
            .unwrap()
            .shim_token
            .expose(),
        DERIVED_SHIM_TOKEN,
        "no shim token in the backend"
    );
    assert_eq!(sealed.get_instance(&id).await.unwrap(), Some(rec));
    sealed.delete_instance(&id).await.unwrap();
    sealed.delete_tenant(&a).await.unwrap();
    sealed.delete_tenant(&b).await.unwrap();
}

async fn registry_tenants(r: &dyn Registry, run: &str) {
    let a = tenant_id(run, "a");
    let b = tenant_id(run, "b");
    let ta = tenant(&a, 2_000, 30);
    r.create_tenant(&ta).await.expect("create a tenant");
    assert_eq!(
        r.get_tenant(&a).await.unwrap().as_ref(),
        Some(&ta),
        "a tenant reads back as written, secrets included"
    );
    assert_err!(
        r.create_tenant(&ta).await,
        Error::AlreadyExists { .. },
        "creating tenant {a} twice"
    );

    let mut tb = tenant(&b, 2_000, 30);
    tb.bot_token = None;
    tb.cold_start_notice = false;
    tb.status = TenantStatus::Running;
    r.create_tenant(&tb).await.unwrap();
    assert_eq!(
        r.get_tenant(&b).await.unwrap().as_ref(),
        Some(&tb),
        "no bot token, running status"
    );

    let all = r.list_tenants().await.unwrap();
    assert!(
        all.windows(2).all(|w| w[0].id < w[1].id),
        "list_tenants is ordered by id"
    );
    let ours: Vec<_> = all.iter().filter(|t| t.id == a || t.id == b).collect();
    assert_eq!(ours, vec![&ta, &tb], "list_tenants holds both, in id order");

    assert_eq!(
        r.get_tenant(&tenant_id(run, "missing")).await.unwrap(),
        None,
        "a missing tenant is Ok(None)"
    );

    // update_tenant replaces settings and secrets, not status or activity.
    let mut changed = ta.clone();
    changed.profile = "openclaw".into();
    changed.idle_timeout_s = 45;
    changed.bot_token = Some(Secret::new("654321:rotated"));
    changed.webhook_secret = Secret::random();
    changed.cold_start_notice = false;
    changed.limits = otm_core::TenantLimits {
        cpu_millis: Some(250),
        disk_bytes: Some(1 << 20),
        model_requests_per_minute: Some(20),
        model_tokens_per_day: Some(0),
        model_api_key: Some(Secret::new("sk-own-key")),
        ..Default::default()
    };
    changed.status = TenantStatus::Running;
    changed.last_active_ms = 999_999;
    changed.created_at_ms = 5;
    r.update_tenant(&changed).await.expect("update a tenant");
    let got = r.get_tenant(&a).await.unwrap().unwrap();
    assert_eq!(got.profile, "openclaw");
    assert_eq!(got.idle_timeout_s, 45);
    assert_eq!(got.bot_token, Some(Secret::new("654321:rotated")));
    assert_eq!(got.webhook_secret, changed.webhook_secret);
    assert!(!got.cold_start_notice);
    assert_eq!(
        got.limits, changed.limits,
        "update_tenant replaces the limits"
    );
    assert_eq!(
        got.status,
        TenantStatus::Idle,
        "update_tenant keeps the status"
    );
    assert_eq!(
        got.last_active_ms, 2_000,
        "update_tenant keeps the activity"
    );
    assert_eq!(
        got.created_at_ms, 1_000,
        "update_tenant keeps the creation time"
    );
    let mut cleared = got.clone();
    cleared.bot_token = None;
    r.update_tenant(&cleared).await.unwrap();
    assert_eq!(
        r.get_tenant(&a).await.unwrap().unwrap().bot_token,
        None,
        "a bot token can be removed"
    );

    let missing = tenant(&tenant_id(run, "missing"), 0, 1);
    assert_err!(
        r.update_tenant(&missing).await,
        Error::NotFound { .. },
        "update_tenant of a missing tenant"
    );
    assert_err!(
        r.set_tenant_status(&missing.id, TenantStatus::Running, None)
            .await,
        Error::NotFound { .. },
        "set_tenant_status of a missing tenant"
    );
    assert_err!(
        r.touch_tenant(&missing.id, 1).await,
        Error::NotFound { .. },
        "touch_tenant of a missing tenant"
    );

    r.touch_tenant(&b, 7_000).await.unwrap();
    assert_eq!(
        r.get_tenant(&b).await.unwrap().unwrap().last_active_ms,
        7_000,
        "touch_tenant records activity"
    );

    assert!(
        r.delete_tenant(&a).await.unwrap(),
        "delete_tenant of an existing tenant is true"
    );
    assert_eq!(r.get_tenant(&a).await.unwrap(), None);
    assert!(
        !r.delete_tenant(&a).await.unwrap(),
        "delete_tenant of a missing tenant is false"
    );
    assert!(r.delete_tenant(&b).await.unwrap());
}

async fn registry_fences(r: &dyn Registry, run: &str) {
    let t = tenant_id(run, "fence");
    r.create_tenant(&tenant(&t, 1_000, 60)).await.unwrap();
    let status = |want: TenantStatus, ctx: &'static str| {
        let t = t.clone();
        async move {
            assert_eq!(
                r.get_tenant(&t).await.unwrap().unwrap().status,
                want,
                "{ctx}"
            )
        }
    };

    r.set_tenant_status(&t, TenantStatus::Provisioning, Some(5))
        .await
        .expect("fence 5 on a fresh tenant");
    status(TenantStatus::Provisioning, "fence 5 applied").await;
    assert_err!(
        r.set_tenant_status(&t, TenantStatus::Running, Some(4))
            .await,
        Error::Conflict { .. },
        "fence 4 after fence 5"
    );
    status(TenantStatus::Provisioning, "a stale fence writes nothing").await;
    r.set_tenant_status(&t, TenantStatus::Running, Some(5))
        .await
        .expect("the same fence again");
    status(TenantStatus::Running, "the same fence applies").await;
    r.set_tenant_status(&t, TenantStatus::Stopping, None)
        .await
        .expect("no fence");
    status(TenantStatus::Stopping, "an unfenced write applies").await;
    r.set_tenant_status(&t, TenantStatus::Idle, Some(9))
        .await
        .expect("a larger fence");
    status(TenantStatus::Idle, "a larger fence applies").await;
    assert_err!(
        r.set_tenant_status(&t, TenantStatus::Running, Some(5))
            .await,
        Error::Conflict { .. },
        "fence 5 after fence 9 (the unfenced write must not reset the fence)"
    );
    status(TenantStatus::Idle, "a stale fence writes nothing").await;

    // Instance writes for the tenant carry the same fence.
    let mut bound = instance("unix:/run/otm/fenced.sock");
    bound.tenant = Some(t.clone());
    bound.state = InstanceState::Binding;
    bound.bound_at_ms = Some(2_000);
    r.put_instance(&bound, Some(9))
        .await
        .expect("the current holder writes its instance");
    let mut stale = bound.clone();
    stale.state = InstanceState::Ready;
    assert_err!(
        r.put_instance(&stale, Some(5)).await,
        Error::Conflict { .. },
        "an instance write with fence 5 after fence 9"
    );
    assert_eq!(
        r.get_instance(&bound.id).await.unwrap().map(|i| i.state),
        Some(InstanceState::Binding),
        "a stale instance write changes nothing"
    );
    let mut other = instance("unix:/run/otm/fenced-2.sock");
    other.tenant = Some(t.clone());
    assert!(
        r.put_instance(&other, Some(5)).await.is_err(),
        "a stale holder cannot bind another instance either"
    );
    assert_eq!(r.get_instance(&other.id).await.unwrap(), None);
    r.put_instance(&stale, Some(9))
        .await
        .expect("the current fence again");
    r.delete_instance(&bound.id).await.unwrap();
    r.delete_tenant(&t).await.unwrap();
}

/// Acks and failures carry the dispatcher's fence: once a newer dispatcher claimed the inbox, the
/// old one can neither acknowledge nor fail what it still holds.
async fn registry_dispatch_fences(r: &dyn Registry, run: &str) {
    let t = tenant_id(run, "dfence");
    r.create_tenant(&tenant(&t, 1_000, 60)).await.unwrap();
    let mut seqs = Vec::new();
    for id in 1..=3 {
        match r.inbox_append(&t, id, &payload(id, "x")).await.unwrap() {
            Appended::Stored { seq } => seqs.push(seq),
            other => panic!("{other:?}"),
        }
    }
    r.inbox_claim(&t, 10).await.expect("a first claim");
    r.inbox_ack(&t, seqs[0], Some(10))
        .await
        .expect("the claiming dispatcher acks");
    assert_err!(
        r.inbox_claim(&t, 9).await,
        Error::Conflict { .. },
        "a smaller claim after 10"
    );
    r.inbox_claim(&t, 12)
        .await
        .expect("a newer dispatcher claims");
    assert_err!(
        r.inbox_ack(&t, seqs[1], Some(10)).await,
        Error::Conflict { .. },
        "the old dispatcher's ack after a newer claim"
    );
    assert_err!(
        r.inbox_ack(&t, seqs[0], Some(10)).await,
        Error::Conflict { .. },
        "a stale ack of an update already done"
    );
    assert_err!(
        r.inbox_fail(&t, seqs[1], "late", 3, Some(10)).await,
        Error::Conflict { .. },
        "the old dispatcher's failure after a newer claim"
    );
    let next = r.inbox_next(&t).await.unwrap().expect("still pending");
    assert_eq!(
        (next.seq, next.attempts),
        (seqs[1], 0),
        "stale writes changed nothing"
    );
    r.inbox_ack(&t, seqs[1], Some(12))
        .await
        .expect("the new dispatcher acks");
    assert_eq!(
        r.inbox_fail(&t, seqs[2], "bad", 1, Some(12)).await.unwrap(),
        FailOutcome::DeadLettered,
        "the new dispatcher fails"
    );
    assert_eq!(r.inbox_depth(&t).await.unwrap(), 0);
    r.inbox_ack(&t, seqs[2], None)
        .await
        .expect("an unfenced ack (an operator's) still applies");
    assert_err!(
        r.inbox_claim(&tenant_id(run, "dfence-ghost"), 1).await,
        Error::NotFound { .. },
        "claiming a missing tenant's inbox"
    );
    r.delete_tenant(&t).await.unwrap();
}

/// `freeze_due` lists running tenants past their freeze deadline and not yet past their idle
/// deadline, by freeze deadline, following every write that moves either; `frozen_tenants` lists
/// frozen tenants with their idle deadlines.
async fn registry_freeze_due(r: &dyn Registry, run: &str) {
    // Times near the epoch, so tenants of other runs (active now) never show up as due.
    let a = tenant_id(run, "freeze-a"); // running, freezes after 10 s: due from 11_000
    let b = tenant_id(run, "freeze-b"); // running, the default 60 s: due from 61_000
    let c = tenant_id(run, "freeze-c"); // running, freezing off
    let d = tenant_id(run, "freeze-d"); // idle: never due
    let e = tenant_id(run, "freeze-e"); // running, idle timeout before the freeze: never due
    let f = tenant_id(run, "freeze-f"); // frozen, idle deadline 51_000
    for (id, status, idle_s, freeze_after_s) in [
        (&a, TenantStatus::Running, 100, Some(10)),
        (&b, TenantStatus::Running, 100, None),
        (&c, TenantStatus::Running, 100, Some(0)),
        (&d, TenantStatus::Idle, 100, Some(10)),
        (&e, TenantStatus::Running, 20, Some(30)),
        (&f, TenantStatus::Frozen, 50, Some(10)),
    ] {
        let mut t = tenant(id, 1_000, idle_s);
        t.status = status;
        t.limits.freeze_after_s = freeze_after_s;
        r.create_tenant(&t).await.unwrap();
    }
    let ours = [&a, &b, &c, &d, &e, &f];
    const NONE: Vec<TenantId> = Vec::new();
    let due = |now: i64| async move {
        r.freeze_due(now, 10_000)
            .await
            .unwrap()
            .into_iter()
            .filter(|t| ours.contains(&t))
            .collect::<Vec<TenantId>>()
    };
    let frozen = || async move {
        r.frozen_tenants()
            .await
            .unwrap()
            .into_iter()
            .filter(|(t, _)| ours.contains(&t))
            .collect::<Vec<(TenantId, i64)>>()
    };
    assert_eq!(
        due(10_999).await,
        NONE,
        "nobody is due before the first deadline"
    );
    assert_eq!(
        due(11_000).await,
        vec![a.clone()],
        "a deadline equal to now is due"
    );
    assert_eq!(
        due(61_000).await,
        [a.clone(), b.clone()],
        "running tenants that freeze, by freeze deadline"
    );
    assert!(
        r.freeze_due(61_000, 1).await.unwrap().len() <= 1,
        "freeze_due honours its limit"
    );
    assert_eq!(
        due(101_000).await,
        NONE,
        "past the idle deadline a tenant is idle_due's, not freeze_due's"
    );
    assert_eq!(frozen().await, [(f.clone(), 51_000)]);

    r.touch_tenant(&a, 50_000).await.unwrap();
    assert_eq!(
        due(59_999).await,
        NONE,
        "touch_tenant pushes the freeze deadline out"
    );
    assert_eq!(due(61_000).await, [a.clone(), b.clone()]);

    // update_tenant recomputes the freeze deadline from the stored activity.
    let mut ta = r.get_tenant(&a).await.unwrap().unwrap();
    ta.limits.freeze_after_s = Some(0);
    r.update_tenant(&ta).await.unwrap();
    let mut tb = r.get_tenant(&b).await.unwrap().unwrap();
    tb.limits.freeze_after_s = Some(5);
    r.update_tenant(&tb).await.unwrap();
    assert_eq!(
        due(6_000).await,
        vec![b.clone()],
        "a shorter freeze time moves the deadline in"
    );
    assert_eq!(
        due(70_000).await,
        vec![b.clone()],
        "freezing turned off: never due"
    );
    r.touch_tenant(&a, 80_000).await.unwrap();
    assert_eq!(
        due(175_000).await,
        NONE,
        "freezing stays off across touches"
    );

    // Frozen tenants leave freeze_due for frozen_tenants; a touch moves their idle deadline.
    r.set_tenant_status(&b, TenantStatus::Frozen, None)
        .await
        .unwrap();
    assert_eq!(due(70_000).await, NONE);
    assert_eq!(frozen().await, [(f.clone(), 51_000), (b.clone(), 101_000)]);
    r.touch_tenant(&f, 60_000).await.unwrap();
    assert_eq!(frozen().await, [(b.clone(), 101_000), (f.clone(), 110_000)]);
    r.set_tenant_status(&b, TenantStatus::Running, None)
        .await
        .unwrap();
    assert_eq!(frozen().await, [(f.clone(), 110_000)]);
    assert_eq!(due(70_000).await, vec![b.clone()]);

    for id in ours {
        r.delete_tenant(id).await.unwrap();
    }
    assert_eq!(due(70_000).await, NONE);
    assert_eq!(frozen().await, Vec::<(TenantId, i64)>::new());
}

async fn registry_idle_due(r: &dyn Registry, run: &str) {
    // Times near the epoch, so tenants of other runs (active now) never show up as due.
    let a = tenant_id(run, "idle-a"); // running, deadline 1_000 + 10 s = 11_000
    let b = tenant_id(run, "idle-b"); // running, touched at 5_000: deadline 15_000
    let c = tenant_id(run, "idle-c"); // idle: never due
    for (id, status) in [
        (&a, TenantStatus::Running),
        (&b, TenantStatus::Running),
        (&c, TenantStatus::Idle),
    ] {
        let mut t = tenant(id, 1_000, 10);
        t.status = status;
        r.create_tenant(&t).await.unwrap();
    }
    r.touch_tenant(&b, 5_000).await.unwrap();
    let ours = [&a, &b, &c];
    let due = |now: i64| async move {
        let mut got: Vec<TenantId> = r
            .idle_due(now, 10_000)
            .await
            .unwrap()
            .into_iter()
            .filter(|t| ours.contains(&t))
            .collect();
        got.sort();
        got
    };
    assert_eq!(
        due(10_999).await,
        Vec::<TenantId>::new(),
        "nobody is due before the first deadline"
    );
    assert_eq!(
        due(11_000).await,
        vec![a.clone()],
        "a deadline equal to now is due"
    );
    assert_eq!(
        due(15_000).await,
        vec![a.clone(), b.clone()],
        "only running tenants are due"
    );
    assert!(
        r.idle_due(15_000, 1).await.unwrap().len() <= 1,
        "idle_due honours its limit"
    );

    r.touch_tenant(&a, 20_000).await.unwrap();
    assert_eq!(
        due(15_000).await,
        vec![b.clone()],
        "touch_tenant pushes the deadline out"
    );
    r.set_tenant_status(&a, TenantStatus::Running, None)
        .await
        .unwrap();
    assert_eq!(due(30_000).await, vec![a.clone(), b.clone()]);

    // update_tenant recomputes the deadline from the new timeout: 5_000 + 100 s.
    let mut tb = r.get_tenant(&b).await.unwrap().unwrap();
    tb.idle_timeout_s = 100;
    r.update_tenant(&tb).await.unwrap();
    assert_eq!(
        due(30_000).await,
        vec![a.clone()],
        "a longer idle timeout moves the deadline"
    );
    assert_eq!(due(105_000).await, vec![a.clone(), b.clone()]);

    r.set_tenant_status(&a, TenantStatus::Stopping, None)
        .await
        .unwrap();
    assert_eq!(
        due(105_000).await,
        vec![b.clone()],
        "a stopping tenant is not due"
    );
    for t in ours {
        r.delete_tenant(t).await.unwrap();
    }
}

fn payload(update_id: i64, text: &str) -> Vec<u8> {
    format!(r#"{{"update_id":{update_id},"message":{{"text":"{text}"}}}}"#).into_bytes()
}

async fn registry_inbox(r: &dyn Registry, run: &str) {
    let t1 = tenant_id(run, "inbox-1");
    let t2 = tenant_id(run, "inbox-2");
    let ghost = tenant_id(run, "inbox-ghost");
    assert_err!(
        r.inbox_append(&ghost, 1, b"{}").await,
        Error::NotFound { .. },
        "append to a missing tenant"
    );
    r.create_tenant(&tenant(&t1, 1_000, 60)).await.unwrap();
    r.create_tenant(&tenant(&t2, 1_000, 60)).await.unwrap();

    // Update ids out of order and interleaved with another tenant: order is append order.
    let mut seqs: HashMap<(TenantId, i64), i64> = HashMap::new();
    let mut last: HashMap<TenantId, i64> = HashMap::new();
    for (t, u) in [
        (&t1, 50),
        (&t2, 1),
        (&t1, 10),
        (&t1, 40),
        (&t2, 2),
        (&t1, 20),
        (&t2, 3),
        (&t1, 30),
    ] {
        match r.inbox_append(t, u, &payload(u, "first")).await.unwrap() {
            Appended::Stored { seq } => {
                if let Some(prev) = last.insert(t.clone(), seq) {
                    assert!(
                        seq > prev,
                        "sequence numbers grow in append order ({prev} then {seq})"
                    );
                }
                seqs.insert((t.clone(), u), seq);
            }
            Appended::Duplicate => panic!("update {u} of {t} is new, not a duplicate"),
        }
    }
    let seq = |t: &TenantId, u: i64| seqs[&(t.clone(), u)];

    assert_eq!(
        r.inbox_append(&t1, 10, &payload(10, "again"))
            .await
            .unwrap(),
        Appended::Duplicate,
        "a pending dup"
    );
    assert!(
        matches!(
            r.inbox_append(&t2, 10, &payload(10, "t2")).await.unwrap(),
            Appended::Stored { .. }
        ),
        "deduplication is per tenant"
    );
    assert_eq!(r.inbox_depth(&t1).await.unwrap(), 5);
    assert_eq!(r.inbox_depth(&t2).await.unwrap(), 4);
    assert_eq!(r.inbox_depth(&ghost).await.unwrap(), 0);
    assert_eq!(r.inbox_next(&ghost).await.unwrap(), None);

    let head = r
        .inbox_next(&t1)
        .await
        .unwrap()
        .expect("t1 has pending updates");
    assert_eq!(
        (head.tenant.clone(), head.update_id, head.seq),
        (t1.clone(), 50, seq(&t1, 50)),
        "first appended first"
    );
    assert_eq!(
        head.payload,
        payload(50, "first"),
        "the payload reads back byte for byte"
    );
    assert_eq!((head.attempts, head.last_error.clone()), (0, None));
    let now = otm_core::time::now_ms();
    assert!(
        (now - 600_000..=now + 600_000).contains(&head.accepted_at_ms),
        "accepted_at_ms is the append time"
    );

    let pending = r.inbox_pending_tenants().await.unwrap();
    assert!(
        pending.contains(&t1) && pending.contains(&t2),
        "both tenants have pending updates"
    );

    // Ack: leaves the pending list, still counts for deduplication.
    r.inbox_ack(&t1, seq(&t1, 50), None).await.expect("ack");
    assert_eq!(
        r.inbox_next(&t1).await.unwrap().unwrap().update_id,
        10,
        "the next one moves up"
    );
    assert_eq!(
        r.inbox_append(&t1, 50, &payload(50, "again"))
            .await
            .unwrap(),
        Appended::Duplicate,
        "a delivered dup"
    );
    assert_err!(
        r.inbox_ack(&t2, seq(&t1, 10), None).await,
        Error::NotFound { .. },
        "ack of another tenant's update"
    );
    assert_eq!(
        r.inbox_depth(&t1).await.unwrap(),
        4,
        "a foreign ack changed nothing"
    );

    // Fail: retries, then the dead-letter list.
    let s10 = seq(&t1, 10);
    assert_eq!(
        r.inbox_fail(&t1, s10, "agent said 500", 3, None)
            .await
            .unwrap(),
        FailOutcome::Retry { attempts: 1 }
    );
    let item = r.inbox_next(&t1).await.unwrap().unwrap();
    assert_eq!(
        (item.update_id, item.attempts),
        (10, 1),
        "a failed update stays at the head"
    );
    assert_eq!(item.last_error.as_deref(), Some("agent said 500"));
    assert_eq!(
        r.inbox_fail(&t1, s10, "timeout", 3, None).await.unwrap(),
        FailOutcome::Retry { attempts: 2 }
    );
    assert_eq!(
        r.inbox_fail(&t1, s10, "still failing", 3, None)
            .await
            .unwrap(),
        FailOutcome::DeadLettered
    );
    assert_eq!(
        r.inbox_next(&t1).await.unwrap().unwrap().update_id,
        40,
        "the next update is at the head"
    );
    // Several at once: pending ones only, oldest first, no more than asked for.
    let ids =
        |items: Vec<otm_core::InboxItem>| items.iter().map(|i| i.update_id).collect::<Vec<_>>();
    assert_eq!(
        ids(r.inbox_head(&t1, 100).await.unwrap()),
        [40, 20, 30],
        "the delivered and the dead-lettered updates are not in the head"
    );
    assert_eq!(ids(r.inbox_head(&t1, 2).await.unwrap()), [40, 20]);
    assert!(r.inbox_head(&t1, 0).await.unwrap().is_empty());
    assert!(r.inbox_head(&ghost, 10).await.unwrap().is_empty());
    let head = r.inbox_head(&t1, 1).await.unwrap();
    assert_eq!(
        head,
        vec![r.inbox_next(&t1).await.unwrap().unwrap()],
        "a head of one is the next update, payload and all"
    );
    assert_eq!(
        r.inbox_append(&t1, 10, &payload(10, "again"))
            .await
            .unwrap(),
        Appended::Duplicate,
        "a dead dup"
    );
    assert_eq!(
        r.inbox_depth(&t1).await.unwrap(),
        3,
        "dead updates are not pending"
    );

    let view = r.inbox_view(&t1, None, 100).await.unwrap();
    let ids = |items: &[otm_core::InboxItem]| items.iter().map(|i| i.update_id).collect::<Vec<_>>();
    assert_eq!(
        ids(&view.pending),
        vec![40, 20, 30],
        "pending, oldest first"
    );
    assert_eq!(ids(&view.dead), vec![10], "dead-lettered");
    assert_eq!(view.dead[0].attempts, 3);
    assert_eq!(view.dead[0].last_error.as_deref(), Some("still failing"));
    assert_eq!(
        view.dead[0].payload,
        payload(10, "first"),
        "the first payload was kept"
    );
    let small = r.inbox_view(&t1, None, 1).await.unwrap();
    assert_eq!(
        (ids(&small.pending), ids(&small.dead)),
        (vec![40], vec![10]),
        "inbox_view honours its limit"
    );
    // A page after a sequence number holds only what comes after it, in both lists.
    let first = view.pending[0].seq;
    let rest = r.inbox_view(&t1, Some(first), 100).await.unwrap();
    assert_eq!(ids(&rest.pending), vec![20, 30], "after the first pending");
    let dead_after: Vec<i64> = view
        .dead
        .iter()
        .filter(|i| i.seq > first)
        .map(|i| i.update_id)
        .collect();
    assert_eq!(ids(&rest.dead), dead_after, "dead letters after it");
    let last = view
        .pending
        .iter()
        .chain(&view.dead)
        .map(|i| i.seq)
        .max()
        .unwrap();
    assert_eq!(
        r.inbox_view(&t1, Some(last), 100).await.unwrap(),
        Default::default(),
        "nothing after the last"
    );
    assert_eq!(
        r.inbox_view(&ghost, None, 10).await.unwrap(),
        Default::default()
    );

    // Drain in order.
    for want in [40, 20, 30] {
        let item = r.inbox_next(&t1).await.unwrap().unwrap();
        assert_eq!(item.update_id, want, "updates come out in append order");
        r.inbox_ack(&t1, item.seq, None).await.unwrap();
    }
    assert_eq!(r.inbox_next(&t1).await.unwrap(), None);
    assert_eq!(r.inbox_depth(&t1).await.unwrap(), 0);
    let pending = r.inbox_pending_tenants().await.unwrap();
    assert!(
        !pending.contains(&t1) && pending.contains(&t2),
        "only t2 has pending updates now"
    );

    // Deleting a tenant deletes its inbox: a new tenant of the same id starts empty.
    assert!(r.delete_tenant(&t2).await.unwrap());
    assert!(!r.inbox_pending_tenants().await.unwrap().contains(&t2));
    assert_eq!(
        r.inbox_view(&t2, None, 10).await.unwrap(),
        Default::default(),
        "the inbox went with the tenant"
    );
    r.create_tenant(&tenant(&t2, 1_000, 60)).await.unwrap();
    assert_eq!(r.inbox_depth(&t2).await.unwrap(), 0);
    assert!(
        matches!(
            r.inbox_append(&t2, 1, b"{}").await.unwrap(),
            Appended::Stored { .. }
        ),
        "no stale dedupe"
    );
    r.delete_tenant(&t1).await.unwrap();
    r.delete_tenant(&t2).await.unwrap();
}

/// Retrying and dropping dead letters: retried ones go back to the head in sequence order,
/// dropped ones are gone but still deduplicated, and only dead letters move.
/// Appends made at once, so that a backend that writes concurrent appends together (group
/// commit, multi-row inserts) takes several in one batch: several tenants, a missing one, the
/// same update twice in one tenant and once in another, and an update stored before. Each append
/// gets the answer it would get alone, and each inbox holds every new update once, with the
/// payload and sequence number of the append that stored it.
async fn registry_inbox_together(r: &dyn Registry, run: &str) {
    let a = tenant_id(run, "together-a");
    let b = tenant_id(run, "together-b");
    let c = tenant_id(run, "together-c");
    let ghost = tenant_id(run, "together-ghost");
    for t in [&a, &b, &c] {
        r.create_tenant(&tenant(t, 1_000, 60)).await.unwrap();
    }
    let Appended::Stored { seq: before } =
        r.inbox_append(&a, 1, &payload(1, "before")).await.unwrap()
    else {
        panic!("update 1 of {a} is new");
    };
    let calls: Vec<(&TenantId, i64, Vec<u8>)> = [
        (&a, 1, "again"),
        (&a, 2, "first"),
        (&b, 2, "first"),
        (&ghost, 2, "ghost"),
        (&a, 2, "second"),
        (&c, 5, "first"),
        (&a, 3, "first"),
        (&b, 2, "second"),
        (&c, 6, "first"),
        (&a, 3, "second"),
        (&ghost, 3, "ghost"),
        (&b, 4, "first"),
    ]
    .into_iter()
    .map(|(t, u, text)| (t, u, payload(u, text)))
    .collect();
    let mut all: HashMap<(TenantId, i64), (i64, Vec<u8>)> = HashMap::new();
    all.insert((a.clone(), 1), (before, payload(1, "before")));
    // Several rounds: the first appends of a round may start a batch of their own, the later ones
    // then wait together for the next.
    for round in 0..3i64 {
        let calls: Vec<(&TenantId, i64, Vec<u8>)> = calls
            .iter()
            .map(|(t, u, p)| {
                let u = u + round * 100;
                (
                    *t,
                    u,
                    if round == 0 {
                        p.clone()
                    } else {
                        payload(u, &format!("{round}-{}", p.len()))
                    },
                )
            })
            .collect();
        let answers =
            futures::future::join_all(calls.iter().map(|(t, u, p)| r.inbox_append(t, *u, p))).await;
        // The payload and seq each new (tenant, update_id) was stored with.
        let mut stored: HashMap<(TenantId, i64), (i64, Vec<u8>)> = HashMap::new();
        let mut dups: HashMap<(TenantId, i64), usize> = HashMap::new();
        for ((t, u, p), answer) in calls.iter().zip(answers) {
            if **t == ghost {
                assert_err!(
                    answer,
                    Error::NotFound { .. },
                    "append {u} to a missing tenant, together with others"
                );
                continue;
            }
            match answer {
                Ok(Appended::Stored { seq }) => {
                    let old = stored.insert(((*t).clone(), *u), (seq, p.clone()));
                    assert!(old.is_none(), "update {u} of {t} stored twice in one batch");
                }
                Ok(Appended::Duplicate) => *dups.entry(((*t).clone(), *u)).or_default() += 1,
                Err(e) => panic!("append {u} to {t}, together with others: {e}"),
            }
        }
        if round == 0 {
            assert_eq!(
                dups.remove(&(a.clone(), 1)),
                Some(1),
                "an update stored before is a duplicate"
            );
        }
        let mut wanted: Vec<(&TenantId, i64)> = vec![
            (&a, 2 + round * 100),
            (&a, 3 + round * 100),
            (&b, 2 + round * 100),
            (&b, 4 + round * 100),
            (&c, 5 + round * 100),
            (&c, 6 + round * 100),
        ];
        if round > 0 {
            // Update 1 was stored before round 0 only.
            wanted.push((&a, 1 + round * 100));
        }
        for (t, u) in &wanted {
            assert!(
                stored.contains_key(&((*t).clone(), *u)),
                "update {u} of {t} stored"
            );
        }
        assert_eq!(
            stored.len(),
            wanted.len(),
            "only the new updates stored: {stored:?}"
        );
        for key in [(&a, 2), (&a, 3), (&b, 2)] {
            let key = (key.0.clone(), key.1 + round * 100);
            assert_eq!(
                dups.remove(&key),
                Some(1),
                "the second append of {key:?} is a duplicate"
            );
        }
        assert!(dups.is_empty(), "no other duplicates: {dups:?}");
        all.extend(stored);
    }
    for (t, n) in [(&a, 9), (&b, 6), (&c, 6)] {
        assert_eq!(
            r.inbox_depth(t).await.unwrap(),
            n,
            "every update of {t} stored once"
        );
        let view = r.inbox_view(t, None, 100).await.unwrap();
        assert!(
            view.pending.windows(2).all(|w| w[0].seq < w[1].seq),
            "the inbox of {t} is ordered by seq"
        );
        assert_eq!(view.pending.len(), n as usize);
        for item in &view.pending {
            assert_eq!(
                all.get(&(t.clone(), item.update_id)),
                Some(&(item.seq, item.payload.clone())),
                "update {} of {t} has the seq and payload of the append that stored it",
                item.update_id
            );
        }
    }
    assert_eq!(
        r.inbox_next(&a).await.unwrap().map(|i| i.seq),
        Some(before),
        "the update stored before is first"
    );
    assert_eq!(r.inbox_depth(&ghost).await.unwrap(), 0);
    for t in [&a, &b, &c] {
        r.delete_tenant(t).await.unwrap();
    }
}

async fn registry_dead_letters(r: &dyn Registry, run: &str) {
    let owned = tenant_id(run, "dead");
    let t = &owned;
    let ghost = tenant_id(run, "dead-ghost");
    r.create_tenant(&tenant(t, 1_000, 60)).await.unwrap();
    let mut s = Vec::new();
    for u in 1..=5 {
        match r.inbox_append(t, u, &payload(u, "dead")).await.unwrap() {
            Appended::Stored { seq } => s.push(seq),
            other => panic!("append {u}: {other:?}"),
        }
    }
    let kill = |seq: i64| async move {
        assert_eq!(
            r.inbox_next(t).await.unwrap().map(|i| i.seq),
            Some(seq),
            "the update about to be dead-lettered is at the head"
        );
        assert_eq!(
            r.inbox_fail(t, seq, "agent refused", 1, None)
                .await
                .unwrap(),
            FailOutcome::DeadLettered
        );
    };
    let pending = |v: &otm_core::InboxView| v.pending.iter().map(|i| i.seq).collect::<Vec<_>>();
    let dead = |v: &otm_core::InboxView| v.dead.iter().map(|i| i.seq).collect::<Vec<_>>();
    kill(s[0]).await;
    kill(s[1]).await;

    // Nothing moves that is not a dead letter of this tenant.
    assert_err!(
        r.inbox_retry(t, DeadLetters::One(i64::MAX - 7)).await,
        Error::NotFound { .. },
        "retry of an unknown seq"
    );
    assert_err!(
        r.inbox_drop(t, DeadLetters::One(i64::MAX - 7)).await,
        Error::NotFound { .. },
        "drop of an unknown seq"
    );
    assert_err!(
        r.inbox_retry(t, DeadLetters::One(s[2])).await,
        Error::Conflict { .. },
        "retry of a pending update"
    );
    assert_err!(
        r.inbox_drop(t, DeadLetters::One(s[2])).await,
        Error::Conflict { .. },
        "drop of a pending update"
    );
    assert_err!(
        r.inbox_retry(&ghost, DeadLetters::All).await,
        Error::NotFound { .. },
        "retry in a missing tenant"
    );
    assert_err!(
        r.inbox_drop(&ghost, DeadLetters::One(s[0])).await,
        Error::NotFound { .. },
        "drop in a missing tenant"
    );
    let v = r.inbox_view(t, None, 100).await.unwrap();
    assert_eq!((pending(&v), dead(&v)), (s[2..].to_vec(), s[..2].to_vec()));

    // Retried: back at the head, before later updates, with no failed attempts.
    assert_eq!(
        r.inbox_retry(t, DeadLetters::One(s[1])).await.unwrap(),
        vec![s[1]]
    );
    let head = r.inbox_next(t).await.unwrap().unwrap();
    assert_eq!((head.seq, head.update_id, head.attempts), (s[1], 2, 0));
    assert_eq!(head.payload, payload(2, "dead"), "the payload was kept");
    assert_eq!(r.inbox_depth(t).await.unwrap(), 4);
    assert_eq!(
        r.inbox_retry(t, DeadLetters::All).await.unwrap(),
        vec![s[0]],
        "all that were left"
    );
    let v = r.inbox_view(t, None, 100).await.unwrap();
    assert_eq!(
        (pending(&v), dead(&v)),
        (s.clone(), vec![]),
        "retried ones first, in seq order"
    );
    assert!(r.inbox_pending_tenants().await.unwrap().contains(t));
    assert_eq!(
        r.inbox_retry(t, DeadLetters::All).await.unwrap(),
        Vec::<i64>::new(),
        "nothing left to retry"
    );

    // Drain: the first is delivered, two die again.
    r.inbox_ack(t, s[0], None).await.unwrap();
    kill(s[1]).await;
    r.inbox_ack(t, s[2], None).await.unwrap();
    kill(s[3]).await;
    assert_err!(
        r.inbox_retry(t, DeadLetters::One(s[0])).await,
        Error::Conflict { .. },
        "retry of a delivered update"
    );

    // Dropped: gone from both lists, its update id still seen.
    assert_eq!(
        r.inbox_drop(t, DeadLetters::One(s[1])).await.unwrap(),
        vec![s[1]]
    );
    assert_eq!(r.inbox_drop(t, DeadLetters::All).await.unwrap(), vec![s[3]]);
    let v = r.inbox_view(t, None, 100).await.unwrap();
    assert_eq!((pending(&v), dead(&v)), (vec![s[4]], vec![]));
    assert_eq!(
        r.inbox_append(t, 2, &payload(2, "again")).await.unwrap(),
        Appended::Duplicate,
        "a dropped update still counts as seen"
    );
    assert_err!(
        r.inbox_drop(t, DeadLetters::One(s[1])).await,
        Error::Conflict { .. },
        "a dropped update is not dropped twice"
    );
    assert_eq!(
        r.inbox_drop(t, DeadLetters::All).await.unwrap(),
        Vec::<i64>::new()
    );
    assert_eq!(r.inbox_depth(t).await.unwrap(), 1);
    r.delete_tenant(t).await.unwrap();
}

/// The audit trail (newest first, paged with `before`) and named admin tokens (unique names,
/// found by digest, gone once revoked). Other runs' entries may share the trail: only this
/// run's are checked.
async fn registry_admin(r: &dyn Registry, run: &str) {
    use otm_core::{AdminToken, AuditEntry};
    let now = otm_core::time::now_ms();
    let mut written = Vec::new();
    for (i, status) in [201u16, 409, 401].into_iter().enumerate() {
        let e = AuditEntry::new(
            now + i as i64,
            run,
            "POST",
            "/v1/tenants/{id}/wake",
            Some("acme"),
            status,
        );
        r.audit_append(&e).await.unwrap();
        written.push(e);
    }
    let anon = AuditEntry::new(now + 3, run, "DELETE", "/v1/tokens/{name}", None, 204);
    r.audit_append(&anon).await.unwrap();
    written.push(anon);
    let ours = |list: Vec<AuditEntry>| {
        list.into_iter()
            .filter(|e| e.who == run)
            .collect::<Vec<_>>()
    };
    let newest_first: Vec<AuditEntry> = written.iter().rev().cloned().collect();
    assert_eq!(
        ours(r.audit_list(10_000, None).await.unwrap()),
        newest_first,
        "newest first, as written"
    );
    let page = ours(r.audit_list(10_000, Some(written[2].id)).await.unwrap());
    assert_eq!(
        page,
        newest_first[2..].to_vec(),
        "`before` pages to older entries"
    );
    assert!(r.audit_list(1, None).await.unwrap().len() <= 1, "limit");

    let digest = otm_core::secret::digest(&format!("token-of-{run}"));
    let token = AdminToken {
        name: format!("{run}-dash"),
        digest: digest.clone(),
        read_only: true,
        created_at_ms: now,
    };
    r.token_create(&token).await.unwrap();
    assert_err!(
        r.token_create(&AdminToken {
            digest: "other".into(),
            ..token.clone()
        })
        .await,
        Error::AlreadyExists { .. },
        "a token name is unique"
    );
    assert_eq!(
        r.token_by_digest(&digest).await.unwrap(),
        Some(token.clone())
    );
    assert_eq!(r.token_by_digest("no such digest").await.unwrap(), None);
    let full = AdminToken {
        name: format!("{run}-ci"),
        digest: otm_core::secret::digest(&format!("ci-of-{run}")),
        read_only: false,
        created_at_ms: now,
    };
    r.token_create(&full).await.unwrap();
    let listed: Vec<AdminToken> = r
        .token_list()
        .await
        .unwrap()
        .into_iter()
        .filter(|t| t.name.starts_with(run))
        .collect();
    assert_eq!(listed, vec![full.clone(), token.clone()], "by name");
    assert!(r.token_revoke(&token.name).await.unwrap());
    assert!(!r.token_revoke(&token.name).await.unwrap(), "revoked once");
    assert_eq!(
        r.token_by_digest(&digest).await.unwrap(),
        None,
        "a revoked token is gone at once"
    );
    assert!(r.token_revoke(&full.name).await.unwrap());
}

async fn registry_inbox_prune(r: &dyn Registry, run: &str) {
    let t = tenant_id(run, "prune");
    r.create_tenant(&tenant(&t, 1_000, 60)).await.unwrap();
    let mut seqs = Vec::new();
    for u in 1..=4 {
        let Appended::Stored { seq } = r.inbox_append(&t, u, &payload(u, "p")).await.unwrap()
        else {
            panic!("update {u} is new");
        };
        seqs.push(seq);
    }
    r.inbox_ack(&t, seqs[0], None).await.unwrap(); // 1: done
    r.inbox_ack(&t, seqs[1], None).await.unwrap(); // 2: done
    assert_eq!(
        r.inbox_fail(&t, seqs[2], "bad", 1, None).await.unwrap(),
        FailOutcome::DeadLettered
    ); // 3: dead
    // 4: pending

    assert_eq!(
        r.inbox_prune(0).await.unwrap(),
        0,
        "nothing was accepted before 1970"
    );
    assert_eq!(
        r.inbox_append(&t, 1, b"{}").await.unwrap(),
        Appended::Duplicate,
        "not pruned yet"
    );

    let pruned = r
        .inbox_prune(otm_core::time::now_ms() + 60_000)
        .await
        .unwrap();
    assert!(
        pruned >= 2,
        "both delivered updates are pruned (got {pruned})"
    );
    for u in [1, 2] {
        assert!(
            matches!(
                r.inbox_append(&t, u, b"{}").await.unwrap(),
                Appended::Stored { .. }
            ),
            "a pruned update {u} is forgotten"
        );
    }
    assert_eq!(
        r.inbox_append(&t, 3, b"{}").await.unwrap(),
        Appended::Duplicate,
        "prune keeps dead-lettered updates"
    );
    assert_eq!(
        r.inbox_append(&t, 4, b"{}").await.unwrap(),
        Appended::Duplicate,
        "prune keeps pending updates"
    );
    let view = r.inbox_view(&t, None, 10).await.unwrap();
    assert_eq!(
        view.dead.iter().map(|i| i.update_id).collect::<Vec<_>>(),
        vec![3]
    );
    assert_eq!(
        view.pending.iter().map(|i| i.update_id).collect::<Vec<_>>(),
        vec![4, 1, 2]
    );
    r.delete_tenant(&t).await.unwrap();
}

fn instance(address: &str) -> InstanceRecord {
    InstanceRecord {
        id: InstanceId::random(),
        tenant: None,
        state: InstanceState::Warm,
        address: address.into(),
        shim_token: Secret::new(format!("shim-token-{}", otm_core::id::random_hex(8))),
        surrogate_digest: Some(otm_core::secret::digest(&otm_core::id::random_hex(16))),
        created_at_ms: 1_000,
        bound_at_ms: None,
    }
}

async fn registry_instances(r: Arc<dyn Registry>, run: &str) {
    let mut warm = instance("unix:/run/otm/a.sock");
    r.put_instance(&warm, None).await.expect("put an instance");
    assert_eq!(
        r.get_instance(&warm.id).await.unwrap().as_ref(),
        Some(&warm),
        "an instance reads back as written"
    );
    warm.address = "http://10.0.0.7:7070".into();
    r.put_instance(&warm, None)
        .await
        .expect("replace an instance");
    assert_eq!(
        r.get_instance(&warm.id).await.unwrap().as_ref(),
        Some(&warm),
        "put_instance replaces"
    );
    assert_eq!(
        r.get_instance(&InstanceId::random()).await.unwrap(),
        None,
        "a missing instance is Ok(None)"
    );
    assert!(
        r.list_instances().await.unwrap().contains(&warm),
        "list_instances holds it"
    );

    let digest = warm.surrogate_digest.clone().unwrap();
    assert_eq!(
        r.instance_by_surrogate(&digest).await.unwrap().as_ref(),
        Some(&warm),
        "found by surrogate digest"
    );
    assert_eq!(
        r.instance_by_surrogate(&otm_core::secret::digest("nobody"))
            .await
            .unwrap(),
        None
    );

    // Warm instances of other runs on a shared backend may be claimed too; they are put back.
    let others: Vec<InstanceRecord> = r
        .list_instances()
        .await
        .unwrap()
        .into_iter()
        .filter(|i| i.state == InstanceState::Warm && i.tenant.is_none() && i.id != warm.id)
        .collect();
    let claimants: Vec<TenantId> = (0..10)
        .map(|i| tenant_id(run, &format!("claim-{i}")))
        .collect();
    for t in &claimants {
        assert_eq!(
            r.instance_of(t).await.unwrap(),
            None,
            "no instance bound yet"
        );
    }
    let tasks: Vec<_> = claimants
        .iter()
        .cloned()
        .map(|t| {
            let r = r.clone();
            tokio::spawn(async move {
                let got = r
                    .claim_warm_instance(&t)
                    .await
                    .expect("claim_warm_instance");
                (t, got)
            })
        })
        .collect();
    let mut claimed = Vec::new();
    for task in tasks {
        if let (t, Some(rec)) = task.await.expect("a claim task panicked") {
            claimed.push((t, rec));
        }
    }
    let distinct: HashSet<_> = claimed.iter().map(|(_, rec)| rec.id.clone()).collect();
    assert_eq!(
        distinct.len(),
        claimed.len(),
        "no instance is claimed twice: {claimed:?}"
    );
    let mine: Vec<_> = claimed
        .iter()
        .filter(|(_, rec)| rec.id == warm.id)
        .collect();
    assert_eq!(
        mine.len(),
        1,
        "10 concurrent claims take the warm instance exactly once"
    );
    if others.is_empty() {
        assert_eq!(
            claimed.len(),
            1,
            "with one warm instance, exactly one claim succeeds"
        );
    }
    let (winner, rec) = mine[0].clone();
    assert_eq!(
        rec.tenant.as_ref(),
        Some(&winner),
        "the claim binds the instance to the claimant"
    );
    assert_eq!(
        rec.state,
        InstanceState::Binding,
        "a claimed instance is binding"
    );
    assert!(rec.bound_at_ms.is_some(), "a claim records when");
    assert_eq!(
        (rec.address.as_str(), &rec.shim_token),
        (warm.address.as_str(), &warm.shim_token)
    );
    assert_eq!(
        r.get_instance(&warm.id).await.unwrap().as_ref(),
        Some(&rec),
        "the claim is stored"
    );
    assert_eq!(
        r.instance_of(&winner).await.unwrap().as_ref(),
        Some(&rec),
        "instance_of finds the bound instance"
    );
    for (_, other) in claimed.iter().filter(|(_, rec)| rec.id != warm.id) {
        let back = others
            .iter()
            .find(|o| o.id == other.id)
            .expect("a claimed instance was warm before");
        r.put_instance(back, None).await.unwrap();
    }
    let again = r
        .claim_warm_instance(&tenant_id(run, "late"))
        .await
        .unwrap();
    assert!(
        again.as_ref().is_none_or(|i| i.id != warm.id),
        "a claimed instance is no longer warm"
    );
    if let Some(other) = again {
        let back = others
            .iter()
            .find(|o| o.id == other.id)
            .expect("a claimed instance was warm before");
        r.put_instance(back, None).await.unwrap();
    }

    // Deleting a tenant leaves its instance record alone (the reconciler stops it).
    r.create_tenant(&tenant(&winner, 1_000, 60)).await.unwrap();
    r.delete_tenant(&winner).await.unwrap();
    assert!(
        r.get_instance(&warm.id).await.unwrap().is_some(),
        "delete_tenant keeps instances"
    );

    assert!(
        r.delete_instance(&warm.id).await.unwrap(),
        "delete_instance of an existing instance is true"
    );
    assert_eq!(r.get_instance(&warm.id).await.unwrap(), None);
    assert_eq!(r.instance_of(&winner).await.unwrap(), None);
    assert!(
        !r.delete_instance(&warm.id).await.unwrap(),
        "delete_instance of a missing instance is false"
    );
}

async fn registry_settings(r: &dyn Registry) {
    let before = r.get_settings().await.unwrap();
    let mut s = before.clone();
    s.warm_pool_target = before.warm_pool_target.wrapping_add(7);
    r.put_settings(&s).await.unwrap();
    assert_eq!(
        r.get_settings().await.unwrap(),
        s,
        "settings read back as written"
    );
    r.put_settings(&FleetSettings::default()).await.unwrap();
    assert_eq!(r.get_settings().await.unwrap(), FleetSettings::default());
    r.put_settings(&before).await.unwrap();
}

/// Appends `tasks * per_task` updates from `tasks` concurrent tasks spread over `tenants` fresh
/// tenants, each task re-appending every third update, and checks that every update is stored
/// exactly once, that duplicates are answered as such, and that each tenant's inbox holds the
/// updates in one order consistent with every task's own append order.
pub async fn inbox_stress(r: Arc<dyn Registry>, tenants: usize, tasks: usize, per_task: usize) {
    assert!(tenants > 0);
    let run = run_id();
    let ids: Vec<TenantId> = (0..tenants)
        .map(|i| tenant_id(&run, &format!("stress-{i}")))
        .collect();
    for t in &ids {
        r.create_tenant(&tenant(t, otm_core::time::now_ms(), 600))
            .await
            .unwrap();
    }
    let handles: Vec<_> = (0..tasks)
        .map(|k| {
            let r = r.clone();
            let t = ids[k % tenants].clone();
            tokio::spawn(async move {
                let mut stored = Vec::with_capacity(per_task);
                for i in 0..per_task {
                    let u = (k * per_task + i) as i64;
                    match r.inbox_append(&t, u, &payload(u, "stress")).await {
                        Ok(Appended::Stored { seq }) => stored.push((u, seq)),
                        other => panic!("append {u} to {t}: expected Stored, got {other:?}"),
                    }
                    if i % 3 == 0 {
                        let dup = r.inbox_append(&t, u, &payload(u, "dup")).await;
                        assert!(
                            matches!(dup, Ok(Appended::Duplicate)),
                            "re-append {u} to {t}: {dup:?}"
                        );
                    }
                }
                (t, stored)
            })
        })
        .collect();
    let mut expected: HashMap<TenantId, HashMap<i64, i64>> = HashMap::new();
    for h in handles {
        let (t, stored) = h.await.expect("an append task panicked");
        assert!(
            stored.windows(2).all(|w| w[0].1 < w[1].1),
            "one task's appends get growing seqs in {t}"
        );
        expected.entry(t).or_default().extend(stored);
    }
    for t in &ids {
        let want = expected.remove(t).unwrap_or_default();
        assert_eq!(
            r.inbox_depth(t).await.unwrap(),
            want.len() as u64,
            "every update of {t} stored once"
        );
        let view = r.inbox_view(t, None, want.len() + 10).await.unwrap();
        assert_eq!(view.pending.len(), want.len());
        assert!(
            view.pending.windows(2).all(|w| w[0].seq < w[1].seq),
            "the inbox of {t} is ordered by seq"
        );
        for item in &view.pending {
            assert_eq!(
                want.get(&item.update_id),
                Some(&item.seq),
                "update {} has the seq its append got",
                item.update_id
            );
            assert_eq!(
                item.payload,
                payload(item.update_id, "stress"),
                "the first payload is kept"
            );
        }
        r.delete_tenant(t).await.unwrap();
    }
}

// =============================================================================================
// Coordinator

/// Every contract point of [`Coordinator`]. Takes about two seconds: leases lapse in real time.
pub async fn coordinator_suite(c: Arc<dyn Coordinator>) {
    let run = run_id();
    coordinator_endpoints(&*c, &run).await;
    coordinator_leases(&*c, &run).await;
    coordinator_lease_expiry(&*c, &run).await;
    coordinator_lease_races(c.clone(), &run).await;
    coordinator_notifications(&*c, &run).await;
    signed_endpoints(c.clone(), &run).await;
}

/// The backend under [`crate::SignedCoordinator`]: cached endpoints hold no shim token, and an
/// entry written straight to the backend (forged, or copied from another tenant) is not used.
async fn signed_endpoints(c: Arc<dyn Coordinator>, run: &str) {
    use crate::secrets::{SecretKeys, SignedCoordinator};
    let keys = Arc::new(SecretKeys::ephemeral());
    let signed = SignedCoordinator::new(c.clone(), keys.clone());
    let a = tenant_id(run, "signed-a");
    let b = tenant_id(run, "signed-b");
    let id = InstanceId::random();
    let e = Endpoint {
        instance: id.clone(),
        address: "unix:/run/otm/signed.sock".into(),
        shim_token: keys.shim_token(&id),
        signature: None,
    };
    let ttl = Duration::from_secs(30);
    signed.set_endpoint(&a, &e, ttl).await.unwrap();
    let raw = c.endpoint(&a).await.unwrap().expect("cached");
    assert!(raw.shim_token.expose().is_empty(), "no shim token cached");
    assert!(raw.signature.is_some());
    let got = signed
        .endpoint(&a)
        .await
        .unwrap()
        .expect("a signed entry is used");
    assert_eq!(
        (got.address.as_str(), &got.shim_token),
        (e.address.as_str(), &e.shim_token)
    );

    // Redirected, or copied to another tenant: dropped, and cleared from the cache.
    let mut forged = raw.clone();
    forged.address = "http://203.0.113.7:9000".into();
    c.set_endpoint(&a, &forged, ttl).await.unwrap();
    assert_eq!(signed.endpoint(&a).await.unwrap(), None);
    assert_eq!(
        c.endpoint(&a).await.unwrap(),
        None,
        "a forged entry is cleared"
    );
    c.set_endpoint(&b, &raw, ttl).await.unwrap();
    assert_eq!(signed.endpoint(&b).await.unwrap(), None);
    let mut unsigned = raw.clone();
    unsigned.signature = None;
    c.set_endpoint(&a, &unsigned, ttl).await.unwrap();
    assert_eq!(signed.endpoint(&a).await.unwrap(), None);
    // An endpoint whose token is not the derived one is never cached.
    let mut legacy = e.clone();
    legacy.shim_token = Secret::new("random-legacy-token");
    signed.set_endpoint(&a, &legacy, ttl).await.unwrap();
    assert_eq!(c.endpoint(&a).await.unwrap(), None);
}

async fn coordinator_endpoints(c: &dyn Coordinator, run: &str) {
    let t = tenant_id(run, "ep");
    let short = tenant_id(run, "ep-short");
    let e = Endpoint {
        instance: InstanceId::random(),
        address: "unix:/run/otm/x.sock".into(),
        shim_token: Secret::default(),
        signature: Some("0a1b2c".into()),
    };
    assert_eq!(c.endpoint(&t).await.unwrap(), None, "nothing cached yet");
    c.set_endpoint(&t, &e, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(
        c.endpoint(&t).await.unwrap().as_ref(),
        Some(&e),
        "a cached endpoint reads back"
    );
    let mut e2 = e.clone();
    e2.address = "http://10.0.0.9:7070".into();
    c.set_endpoint(&t, &e2, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(
        c.endpoint(&t).await.unwrap().as_ref(),
        Some(&e2),
        "set_endpoint replaces"
    );
    c.clear_endpoint(&t).await.unwrap();
    assert_eq!(
        c.endpoint(&t).await.unwrap(),
        None,
        "clear_endpoint drops it"
    );
    c.clear_endpoint(&t).await.expect("clearing twice is fine");

    c.set_endpoint(&short, &e, Duration::from_millis(300))
        .await
        .unwrap();
    assert_eq!(c.endpoint(&short).await.unwrap().as_ref(), Some(&e));
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        c.endpoint(&short).await.unwrap(),
        None,
        "a cached endpoint lapses after its TTL"
    );
}

async fn coordinator_leases(c: &dyn Coordinator, run: &str) {
    let key = format!("{run}/lock");
    let ttl = Duration::from_secs(30);
    let a = c
        .acquire(&key, ttl)
        .await
        .unwrap()
        .expect("a free key can be taken");
    assert_eq!(a.key, key);
    assert!(
        c.acquire(&key, ttl).await.unwrap().is_none(),
        "a held key cannot be taken"
    );

    let impostor = Lease {
        owner: "not-the-owner".into(),
        ..a.clone()
    };
    assert!(
        !c.renew(&impostor, ttl).await.unwrap(),
        "renew by a non-owner fails"
    );
    assert!(
        !c.release(&impostor).await.unwrap(),
        "release by a non-owner fails"
    );
    assert!(
        c.acquire(&key, ttl).await.unwrap().is_none(),
        "still held after the impostor's tries"
    );
    assert!(c.renew(&a, ttl).await.unwrap(), "the owner renews");
    assert!(c.release(&a).await.unwrap(), "the owner releases");
    assert!(
        !c.release(&a).await.unwrap(),
        "a released lease cannot be released again"
    );
    assert!(
        !c.renew(&a, ttl).await.unwrap(),
        "a released lease cannot be renewed"
    );

    let mut fence = a.fence;
    for _ in 0..5 {
        let l = c
            .acquire(&key, ttl)
            .await
            .unwrap()
            .expect("a released key can be taken");
        assert!(
            l.fence > fence,
            "fences strictly increase across acquisitions ({fence} then {})",
            l.fence
        );
        assert_ne!(
            l.owner, a.owner,
            "every acquisition gets a fresh owner token"
        );
        fence = l.fence;
        assert!(c.release(&l).await.unwrap());
    }

    let other = c
        .acquire(&format!("{run}/other"), ttl)
        .await
        .unwrap()
        .expect("another key is independent");
    let again = c
        .acquire(&key, ttl)
        .await
        .unwrap()
        .expect("taking one key leaves others free");
    assert!(c.release(&other).await.unwrap() && c.release(&again).await.unwrap());
}

async fn coordinator_lease_expiry(c: &dyn Coordinator, run: &str) {
    let key = format!("{run}/expiry");
    let short = Duration::from_millis(300);
    let a = c.acquire(&key, short).await.unwrap().expect("take");
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        !c.renew(&a, short).await.unwrap(),
        "a lapsed lease cannot be renewed"
    );
    let b = c
        .acquire(&key, Duration::from_secs(30))
        .await
        .unwrap()
        .expect("a lapsed lease frees the key");
    assert!(
        b.fence > a.fence,
        "fences increase across lapses ({} then {})",
        a.fence,
        b.fence
    );
    assert!(
        !c.renew(&a, short).await.unwrap(),
        "the lapsed owner cannot renew over the new one"
    );
    assert!(
        !c.release(&a).await.unwrap(),
        "the lapsed owner cannot release the new one"
    );
    assert!(
        c.acquire(&key, short).await.unwrap().is_none(),
        "the new owner still holds it"
    );
    assert!(c.release(&b).await.unwrap());

    // Renewing extends: held past its first TTL.
    let key = format!("{run}/renew");
    let l = c
        .acquire(&key, Duration::from_millis(600))
        .await
        .unwrap()
        .expect("take");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        c.renew(&l, Duration::from_secs(30)).await.unwrap(),
        "renew before the TTL"
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        c.acquire(&key, short).await.unwrap().is_none(),
        "a renewed lease outlives its first TTL"
    );
    assert!(
        c.release(&l).await.unwrap(),
        "the renewed lease is still the owner's"
    );
}

async fn coordinator_lease_races(c: Arc<dyn Coordinator>, run: &str) {
    let key = format!("{run}/race");
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let (c, key) = (c.clone(), key.clone());
            tokio::spawn(async move {
                c.acquire(&key, Duration::from_secs(30))
                    .await
                    .expect("acquire")
            })
        })
        .collect();
    let mut winners = Vec::new();
    for t in tasks {
        winners.extend(t.await.expect("an acquire task panicked"));
    }
    assert_eq!(
        winners.len(),
        1,
        "10 concurrent acquisitions: exactly one wins, got {winners:?}"
    );
    assert!(c.release(&winners[0]).await.unwrap());
}

/// The next notification that `want` accepts, within two seconds.
async fn next_matching(
    s: &mut BoxStream<'static, Notification>,
    want: impl Fn(&Notification) -> bool,
) -> Option<Notification> {
    tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(n) = s.next().await {
            if want(&n) {
                return Some(n);
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
}

async fn coordinator_notifications(c: &dyn Coordinator, run: &str) {
    let t = tenant_id(run, "notify");
    let late_t = tenant_id(run, "notify-late");
    let ours = {
        let (t, late_t) = (t.clone(), late_t.clone());
        move |n: &Notification| match n {
            Notification::InboxHasWork { tenant }
            | Notification::EndpointInvalidated { tenant } => *tenant == t || *tenant == late_t,
            _ => false,
        }
    };
    let mut s1 = c.subscribe();
    let mut s2 = c.subscribe();
    let sent = [
        Notification::InboxHasWork { tenant: t.clone() },
        Notification::EndpointInvalidated { tenant: t.clone() },
    ];
    for n in &sent {
        c.publish(n.clone()).await.unwrap();
    }
    c.publish(Notification::SettingsChanged).await.unwrap();
    let mut late = c.subscribe();
    c.publish(Notification::InboxHasWork {
        tenant: late_t.clone(),
    })
    .await
    .unwrap();

    for (name, s) in [("first", &mut s1), ("second", &mut s2)] {
        for n in &sent {
            assert_eq!(
                next_matching(s, &ours).await.as_ref(),
                Some(n),
                "the {name} subscriber gets {n:?}"
            );
        }
        assert_eq!(
            next_matching(s, |n| *n == Notification::SettingsChanged).await,
            Some(Notification::SettingsChanged),
            "the {name} subscriber gets SettingsChanged"
        );
    }
    assert_eq!(
        next_matching(&mut late, &ours).await,
        Some(Notification::InboxHasWork {
            tenant: late_t.clone()
        }),
        "a subscriber gets only what is published after it subscribed"
    );
}

// =============================================================================================
// StateStore

/// A private scratch directory for archives on their way in and out, removed on drop.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn new(run: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("otm-{run}-{}", otm_core::id::random_hex(4)));
        std::fs::create_dir(&dir).expect("create a scratch directory");
        Scratch(dir)
    }

    /// Writes `data` to a file of its own and returns the path.
    fn file(&self, name: &str, data: &[u8]) -> std::path::PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, data).expect("write a scratch file");
        path
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `get` into a fresh file, read back whole.
async fn get_bytes(
    s: &dyn StateStore,
    scratch: &Scratch,
    t: &TenantId,
    id: &SnapshotId,
) -> Result<(SnapshotMeta, Vec<u8>), Error> {
    let into = scratch.path(&format!("get-{}", otm_core::id::random_hex(4)));
    let got = s.get(t, id, &into).await;
    match got {
        Ok(meta) => {
            let data = std::fs::read(&into).expect("get leaves the archive in the file");
            std::fs::remove_file(&into).unwrap();
            Ok((meta, data))
        }
        Err(e) => {
            assert!(
                !into.exists(),
                "a failed get must leave no file behind ({e})"
            );
            Err(e)
        }
    }
}

/// Bytes that do not compress, so an archive of them is as large as they are.
fn noise(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Every contract point of [`StateStore`] that can be checked through the trait.
pub async fn state_store_suite(s: Arc<dyn StateStore>) {
    let run = run_id();
    let scratch = Scratch::new(&run);
    let t = tenant_id(&run, "snap");
    let other = tenant_id(&run, "snap-other");
    let missing = SnapshotId::new_now();

    assert_eq!(
        s.head(&t).await.unwrap(),
        None,
        "no head before any snapshot"
    );
    assert_eq!(s.list(&t).await.unwrap(), vec![], "no snapshots yet");
    assert_err!(
        get_bytes(&*s, &scratch, &t, &missing).await,
        Error::NotFound { .. },
        "get of a missing snapshot"
    );
    assert_err!(
        s.publish(&t, &missing).await,
        Error::NotFound { .. },
        "publish of a missing snapshot"
    );
    assert!(
        s.put(&t, &missing, &scratch.path("absent"), "manual")
            .await
            .is_err(),
        "put of a file that does not exist"
    );
    assert_eq!(
        s.list(&t).await.unwrap(),
        vec![],
        "a failed put stores nothing"
    );

    let first = b"first archive: pretend this is a tar.zst".to_vec();
    let id1 = SnapshotId::new_now();
    let m1 = s
        .put(&t, &id1, &scratch.file("first", &first), "manual")
        .await
        .expect("put");
    assert_eq!(
        (&m1.id, &m1.tenant, m1.size),
        (&id1, &t, first.len() as u64)
    );
    assert_eq!(
        m1.sha256,
        hex::encode(sha2::Sha256::digest(&first)),
        "sha256 is the archive's hex SHA-256"
    );
    assert_eq!(m1.reason, "manual");
    assert_eq!(
        s.head(&t).await.unwrap(),
        None,
        "put does not move the head"
    );
    assert_eq!(
        get_bytes(&*s, &scratch, &t, &id1).await.unwrap(),
        (m1.clone(), first.clone()),
        "an archive reads back byte for byte, with its metadata"
    );
    let stale = scratch.file("stale", &[b'x'; 4096]);
    s.get(&t, &id1, &stale).await.unwrap();
    assert_eq!(
        std::fs::read(&stale).unwrap(),
        first,
        "get replaces what the file held"
    );

    tokio::time::sleep(Duration::from_millis(3)).await;
    let second = noise(1_000_000, 7);
    let id2 = SnapshotId::new_now();
    let m2 = s
        .put(&t, &id2, &scratch.file("second", &second), "periodic")
        .await
        .unwrap();
    // An id from an earlier time, stored last: list sorts by id (time), not by put order.
    let id0 =
        SnapshotId::parse(&format!("{:015}-0000", otm_core::time::now_ms() - 60_000)).unwrap();
    let m0 = s
        .put(&t, &id0, &scratch.file("empty", b""), "crash")
        .await
        .expect("an empty archive is fine");
    assert_eq!(get_bytes(&*s, &scratch, &t, &id0).await.unwrap().1, b"");
    assert_eq!(
        s.list(&t).await.unwrap(),
        vec![m0.clone(), m1.clone(), m2.clone()],
        "list is oldest first"
    );
    assert_eq!(
        get_bytes(&*s, &scratch, &t, &id2).await.unwrap().1,
        second,
        "a 1 MB archive reads back"
    );
    assert_err!(
        s.put(&t, &id2, &scratch.path("second"), "periodic").await,
        Error::AlreadyExists { .. },
        "a snapshot id is written once"
    );

    // Larger than one request: streamed up in parts, and back.
    tokio::time::sleep(Duration::from_millis(3)).await;
    let big = noise(21 << 20, 11);
    let id3 = SnapshotId::new_now();
    let m3 = s
        .put(&t, &id3, &scratch.file("big", &big), "final")
        .await
        .expect("put of a 21 MiB archive");
    assert_eq!(m3.size, big.len() as u64);
    assert_eq!(m3.sha256, hex::encode(sha2::Sha256::digest(&big)));
    let (got_meta, got) = get_bytes(&*s, &scratch, &t, &id3).await.unwrap();
    assert_eq!(got_meta, m3);
    assert!(got == big, "a 21 MiB archive reads back byte for byte");
    assert_err!(
        s.put(&t, &id3, &scratch.path("big"), "final").await,
        Error::AlreadyExists { .. },
        "a large snapshot's id is written once too"
    );
    drop((big, got));
    s.delete(&t, &id3).await.unwrap();

    s.publish(&t, &id1).await.expect("publish");
    assert_eq!(
        s.head(&t).await.unwrap().as_ref(),
        Some(&m1),
        "the head is the published snapshot"
    );
    s.publish(&t, &id2).await.unwrap();
    assert_eq!(
        s.head(&t).await.unwrap().as_ref(),
        Some(&m2),
        "publish moves the head"
    );
    s.publish(&t, &id0).await.unwrap();
    assert_eq!(
        s.head(&t).await.unwrap().as_ref(),
        Some(&m0),
        "the head may move back to an older snapshot"
    );
    s.publish(&t, &id2).await.unwrap();

    assert_err!(
        s.delete(&t, &id2).await,
        Error::Conflict { .. },
        "deleting the head"
    );
    assert_eq!(
        get_bytes(&*s, &scratch, &t, &id2).await.unwrap().1,
        second,
        "a refused delete deletes nothing"
    );
    s.delete(&t, &id1)
        .await
        .expect("delete a snapshot that is not the head");
    assert_err!(
        get_bytes(&*s, &scratch, &t, &id1).await,
        Error::NotFound { .. },
        "get of a deleted snapshot"
    );
    assert_err!(
        s.delete(&t, &id1).await,
        Error::NotFound { .. },
        "deleting twice"
    );
    assert_err!(
        s.publish(&t, &id1).await,
        Error::NotFound { .. },
        "publish of a deleted snapshot"
    );
    assert_eq!(s.list(&t).await.unwrap(), vec![m0.clone(), m2.clone()]);
    assert_eq!(s.head(&t).await.unwrap().as_ref(), Some(&m2));

    // Tenants are separate.
    assert_eq!(
        s.list(&other).await.unwrap(),
        vec![],
        "another tenant sees no snapshots"
    );
    assert_eq!(s.head(&other).await.unwrap(), None);
    assert_err!(
        get_bytes(&*s, &scratch, &other, &id2).await,
        Error::NotFound { .. },
        "get through another tenant"
    );
    assert_err!(
        s.publish(&other, &id2).await,
        Error::NotFound { .. },
        "publish through another tenant"
    );

    s.delete(&t, &id0).await.unwrap();

    // Deleting a tenant's data: everything goes, head included; other tenants keep theirs.
    let gone = tenant_id(&run, "snap-gone");
    let kept = tenant_id(&run, "snap-kept");
    for tenant in [&gone, &kept, &other] {
        for n in 0..2 {
            let id = SnapshotId::new_now();
            let data = format!("{tenant} archive {n}").into_bytes();
            s.put(
                tenant,
                &id,
                &scratch.file(&format!("{tenant}-{n}"), &data),
                "final",
            )
            .await
            .unwrap();
            s.publish(tenant, &id).await.unwrap();
        }
    }
    let before_other = s.list(&other).await.unwrap();
    assert_eq!(
        s.delete_tenant(&gone).await.unwrap(),
        2,
        "both snapshots deleted"
    );
    assert_eq!(
        s.head(&gone).await.unwrap(),
        None,
        "no head after delete_tenant"
    );
    assert_eq!(
        s.list(&gone).await.unwrap(),
        vec![],
        "no snapshots after delete_tenant"
    );
    assert_eq!(
        s.delete_tenant(&gone).await.unwrap(),
        0,
        "deleting nothing is fine"
    );
    let tomb = format!("{kept}-{}", otm_core::time::now_ms());
    assert_eq!(
        s.tombstone(&kept, &tomb).await.unwrap(),
        2,
        "both snapshots moved"
    );
    assert_eq!(
        s.head(&kept).await.unwrap(),
        None,
        "a tombstoned tenant has no head"
    );
    assert_eq!(s.list(&kept).await.unwrap(), vec![], "nor snapshots");
    assert!(
        s.tombstone(&kept, "bad/name").await.is_err(),
        "a tombstone name is one key part"
    );
    assert_eq!(
        s.list(&other).await.unwrap(),
        before_other,
        "other tenants are untouched"
    );
    s.delete_tenant(&other).await.unwrap();
}

/// [`state_store_suite`], then checksum verification: archives damaged in the underlying object
/// store must fail [`StateStore::get`] with [`Error::Corrupt`], leaving no file behind.
pub async fn object_state_store_suite(s: Arc<ObjectStateStore>) {
    state_store_suite(s.clone()).await;

    let run = run_id();
    let scratch = Scratch::new(&run);
    let t = tenant_id(&run, "corrupt");
    let raw = s.object_store().clone();
    let good = Bytes::from_static(b"a healthy archive of some length");

    let id = SnapshotId::new_now();
    s.put(&t, &id, &scratch.file("good", &good), "final")
        .await
        .unwrap();
    s.publish(&t, &id).await.unwrap();
    let path = s.archive_path(&t, &id);
    let mut flipped = good.to_vec();
    flipped[3] ^= 0x01;
    raw.put(&path, PutPayload::from(flipped)).await.unwrap();
    let err = get_bytes(&*s, &scratch, &t, &id)
        .await
        .expect_err("a flipped bit must be caught");
    assert!(
        matches!(err, Error::Corrupt { .. }),
        "expected Corrupt, got {err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("checksum") && msg.contains(&id.to_string()),
        "the message names the problem: {msg}"
    );

    raw.put(&path, PutPayload::from(good.slice(..10)))
        .await
        .unwrap();
    assert_err!(
        get_bytes(&*s, &scratch, &t, &id).await,
        Error::Corrupt { .. },
        "a truncated archive"
    );

    let mut longer = good.to_vec();
    longer.extend_from_slice(&noise(3 << 20, 5));
    raw.put(&path, PutPayload::from(longer)).await.unwrap();
    assert_err!(
        get_bytes(&*s, &scratch, &t, &id).await,
        Error::Corrupt { .. },
        "an archive longer than its metadata says"
    );

    raw.delete(&path).await.unwrap();
    assert_err!(
        get_bytes(&*s, &scratch, &t, &id).await,
        Error::Corrupt { .. },
        "an archive missing under its metadata"
    );

    let id2 = SnapshotId::new_now();
    s.put(&t, &id2, &scratch.path("good"), "final")
        .await
        .unwrap();
    raw.put(
        &s.meta_path(&t, &id2),
        PutPayload::from_static(b"{not json"),
    )
    .await
    .unwrap();
    assert_err!(
        get_bytes(&*s, &scratch, &t, &id2).await,
        Error::Corrupt { .. },
        "unreadable metadata"
    );

    raw.put(
        &s.head_path(&t),
        PutPayload::from_static(b"{\"id\":\"../../etc\"}"),
    )
    .await
    .unwrap();
    assert_err!(
        s.head(&t).await,
        Error::Corrupt { .. },
        "a head naming an unsafe id"
    );
}
