//! Registry wrappers: [`Metered`] counts and times every call, [`Faulty`] makes chosen calls
//! fail with [`Error::Unavailable`] as an unreachable backend would. Both wrap any
//! [`Registry`] and are one themselves, so they stack with each other and with
//! [`crate::SealedRegistry`].

use crate::WriteCounters;
use async_trait::async_trait;
use otm_core::{
    Appended, DeadLetters, Error, FailOutcome, FleetSettings, Inbox, InboxItem, InboxView,
    InstanceId, InstanceRecord, InstanceStore, Registry, Result, Tenant, TenantId, TenantStatus,
    TenantStore,
};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

/// One registry operation: a method of [`TenantStore`], [`InstanceStore`] or [`Inbox`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RegistryOp {
    CreateTenant,
    GetTenant,
    ListTenants,
    UpdateTenant,
    DeleteTenant,
    SetTenantStatus,
    TouchTenant,
    IdleDue,
    FreezeDue,
    FrozenTenants,
    PutInstance,
    GetInstance,
    InstanceOf,
    InstanceBySurrogate,
    ListInstances,
    DeleteInstance,
    ClaimWarmInstance,
    GetSettings,
    PutSettings,
    InboxAppend,
    InboxNext,
    InboxAck,
    InboxFail,
    InboxClaim,
    InboxRetry,
    InboxDrop,
    InboxView,
    InboxDepth,
    InboxPendingTenants,
    InboxPrune,
    PurgeFreed,
    AuditAppend,
    AuditList,
    TokenCreate,
    TokenByDigest,
    TokenList,
    TokenRevoke,
}

impl RegistryOp {
    /// The method's name, as used in metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            RegistryOp::CreateTenant => "create_tenant",
            RegistryOp::GetTenant => "get_tenant",
            RegistryOp::ListTenants => "list_tenants",
            RegistryOp::UpdateTenant => "update_tenant",
            RegistryOp::DeleteTenant => "delete_tenant",
            RegistryOp::SetTenantStatus => "set_tenant_status",
            RegistryOp::TouchTenant => "touch_tenant",
            RegistryOp::IdleDue => "idle_due",
            RegistryOp::FreezeDue => "freeze_due",
            RegistryOp::FrozenTenants => "frozen_tenants",
            RegistryOp::PutInstance => "put_instance",
            RegistryOp::GetInstance => "get_instance",
            RegistryOp::InstanceOf => "instance_of",
            RegistryOp::InstanceBySurrogate => "instance_by_surrogate",
            RegistryOp::ListInstances => "list_instances",
            RegistryOp::DeleteInstance => "delete_instance",
            RegistryOp::ClaimWarmInstance => "claim_warm_instance",
            RegistryOp::GetSettings => "get_settings",
            RegistryOp::PutSettings => "put_settings",
            RegistryOp::InboxAppend => "inbox_append",
            RegistryOp::InboxNext => "inbox_next",
            RegistryOp::InboxAck => "inbox_ack",
            RegistryOp::InboxFail => "inbox_fail",
            RegistryOp::InboxClaim => "inbox_claim",
            RegistryOp::InboxRetry => "inbox_retry",
            RegistryOp::InboxDrop => "inbox_drop",
            RegistryOp::InboxView => "inbox_view",
            RegistryOp::InboxDepth => "inbox_depth",
            RegistryOp::InboxPendingTenants => "inbox_pending_tenants",
            RegistryOp::InboxPrune => "inbox_prune",
            RegistryOp::PurgeFreed => "purge_freed",
            RegistryOp::AuditAppend => "audit_append",
            RegistryOp::AuditList => "audit_list",
            RegistryOp::TokenCreate => "token_create",
            RegistryOp::TokenByDigest => "token_by_digest",
            RegistryOp::TokenList => "token_list",
            RegistryOp::TokenRevoke => "token_revoke",
        }
    }
}

impl fmt::Display for RegistryOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The outcome label of a call: `ok`, or the kind of its error.
pub fn outcome_of<T>(result: &Result<T>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(Error::NotFound { .. }) => "not_found",
        Err(Error::AlreadyExists { .. }) => "already_exists",
        Err(Error::Conflict { .. }) => "conflict",
        Err(Error::InvalidInput { .. }) => "invalid_input",
        Err(Error::Unavailable { .. }) => "unavailable",
        Err(Error::NotInBuild { .. }) => "not_in_build",
        Err(Error::Corrupt { .. }) => "corrupt",
        Err(_) => "error",
    }
}

/// Implements [`TenantStore`], [`InstanceStore`] and [`Inbox`] for a wrapper with an `inner`
/// registry and an `around(op, call)` method that every call goes through.
macro_rules! delegate_registry {
    ($ty:ident) => {
        #[async_trait]
        impl<R: Registry + ?Sized> TenantStore for $ty<R> {
            async fn create_tenant(&self, tenant: &Tenant) -> Result<()> {
                self.around(RegistryOp::CreateTenant, self.inner.create_tenant(tenant))
                    .await
            }
            async fn get_tenant(&self, id: &TenantId) -> Result<Option<Tenant>> {
                self.around(RegistryOp::GetTenant, self.inner.get_tenant(id))
                    .await
            }
            async fn list_tenants(&self) -> Result<Vec<Tenant>> {
                self.around(RegistryOp::ListTenants, self.inner.list_tenants())
                    .await
            }
            async fn update_tenant(&self, tenant: &Tenant) -> Result<()> {
                self.around(RegistryOp::UpdateTenant, self.inner.update_tenant(tenant))
                    .await
            }
            async fn delete_tenant(&self, id: &TenantId) -> Result<bool> {
                self.around(RegistryOp::DeleteTenant, self.inner.delete_tenant(id))
                    .await
            }
            async fn set_tenant_status(
                &self,
                id: &TenantId,
                status: TenantStatus,
                fence: Option<u64>,
            ) -> Result<()> {
                self.around(
                    RegistryOp::SetTenantStatus,
                    self.inner.set_tenant_status(id, status, fence),
                )
                .await
            }
            async fn touch_tenant(&self, id: &TenantId, at_ms: i64) -> Result<()> {
                self.around(RegistryOp::TouchTenant, self.inner.touch_tenant(id, at_ms))
                    .await
            }
            async fn idle_due(&self, now_ms: i64, limit: usize) -> Result<Vec<TenantId>> {
                self.around(RegistryOp::IdleDue, self.inner.idle_due(now_ms, limit))
                    .await
            }
            async fn freeze_due(&self, now_ms: i64, limit: usize) -> Result<Vec<TenantId>> {
                self.around(RegistryOp::FreezeDue, self.inner.freeze_due(now_ms, limit))
                    .await
            }
            async fn frozen_tenants(&self) -> Result<Vec<(TenantId, i64)>> {
                self.around(RegistryOp::FrozenTenants, self.inner.frozen_tenants())
                    .await
            }
        }

        #[async_trait]
        impl<R: Registry + ?Sized> InstanceStore for $ty<R> {
            async fn put_instance(
                &self,
                instance: &InstanceRecord,
                fence: Option<u64>,
            ) -> Result<()> {
                self.around(
                    RegistryOp::PutInstance,
                    self.inner.put_instance(instance, fence),
                )
                .await
            }
            async fn get_instance(&self, id: &InstanceId) -> Result<Option<InstanceRecord>> {
                self.around(RegistryOp::GetInstance, self.inner.get_instance(id))
                    .await
            }
            async fn instance_of(&self, tenant: &TenantId) -> Result<Option<InstanceRecord>> {
                self.around(RegistryOp::InstanceOf, self.inner.instance_of(tenant))
                    .await
            }
            async fn instance_by_surrogate(&self, digest: &str) -> Result<Option<InstanceRecord>> {
                self.around(
                    RegistryOp::InstanceBySurrogate,
                    self.inner.instance_by_surrogate(digest),
                )
                .await
            }
            async fn list_instances(&self) -> Result<Vec<InstanceRecord>> {
                self.around(RegistryOp::ListInstances, self.inner.list_instances())
                    .await
            }
            async fn delete_instance(&self, id: &InstanceId) -> Result<bool> {
                self.around(RegistryOp::DeleteInstance, self.inner.delete_instance(id))
                    .await
            }
            async fn claim_warm_instance(
                &self,
                tenant: &TenantId,
            ) -> Result<Option<InstanceRecord>> {
                self.around(
                    RegistryOp::ClaimWarmInstance,
                    self.inner.claim_warm_instance(tenant),
                )
                .await
            }
            async fn get_settings(&self) -> Result<FleetSettings> {
                self.around(RegistryOp::GetSettings, self.inner.get_settings())
                    .await
            }
            async fn put_settings(&self, settings: &FleetSettings) -> Result<()> {
                self.around(RegistryOp::PutSettings, self.inner.put_settings(settings))
                    .await
            }
        }

        #[async_trait]
        impl<R: Registry + ?Sized> Inbox for $ty<R> {
            async fn inbox_append(
                &self,
                tenant: &TenantId,
                update_id: i64,
                payload: &[u8],
            ) -> Result<Appended> {
                self.around(
                    RegistryOp::InboxAppend,
                    self.inner.inbox_append(tenant, update_id, payload),
                )
                .await
            }
            async fn inbox_next(&self, tenant: &TenantId) -> Result<Option<InboxItem>> {
                self.around(RegistryOp::InboxNext, self.inner.inbox_next(tenant))
                    .await
            }
            async fn inbox_head(&self, tenant: &TenantId, limit: usize) -> Result<Vec<InboxItem>> {
                self.around(RegistryOp::InboxNext, self.inner.inbox_head(tenant, limit))
                    .await
            }
            async fn inbox_ack(
                &self,
                tenant: &TenantId,
                seq: i64,
                fence: Option<u64>,
            ) -> Result<()> {
                self.around(
                    RegistryOp::InboxAck,
                    self.inner.inbox_ack(tenant, seq, fence),
                )
                .await
            }
            async fn inbox_fail(
                &self,
                tenant: &TenantId,
                seq: i64,
                error: &str,
                max_attempts: u32,
                fence: Option<u64>,
            ) -> Result<FailOutcome> {
                self.around(
                    RegistryOp::InboxFail,
                    self.inner
                        .inbox_fail(tenant, seq, error, max_attempts, fence),
                )
                .await
            }
            async fn inbox_claim(&self, tenant: &TenantId, fence: u64) -> Result<()> {
                self.around(
                    RegistryOp::InboxClaim,
                    self.inner.inbox_claim(tenant, fence),
                )
                .await
            }
            async fn inbox_retry(&self, tenant: &TenantId, which: DeadLetters) -> Result<Vec<i64>> {
                self.around(
                    RegistryOp::InboxRetry,
                    self.inner.inbox_retry(tenant, which),
                )
                .await
            }
            async fn inbox_drop(&self, tenant: &TenantId, which: DeadLetters) -> Result<Vec<i64>> {
                self.around(RegistryOp::InboxDrop, self.inner.inbox_drop(tenant, which))
                    .await
            }
            async fn inbox_view(
                &self,
                tenant: &TenantId,
                after: Option<i64>,
                limit: usize,
            ) -> Result<InboxView> {
                self.around(
                    RegistryOp::InboxView,
                    self.inner.inbox_view(tenant, after, limit),
                )
                .await
            }
            async fn inbox_depth(&self, tenant: &TenantId) -> Result<u64> {
                self.around(RegistryOp::InboxDepth, self.inner.inbox_depth(tenant))
                    .await
            }
            async fn inbox_pending_tenants(&self) -> Result<Vec<TenantId>> {
                self.around(
                    RegistryOp::InboxPendingTenants,
                    self.inner.inbox_pending_tenants(),
                )
                .await
            }
            async fn inbox_prune(&self, before_ms: i64) -> Result<u64> {
                self.around(RegistryOp::InboxPrune, self.inner.inbox_prune(before_ms))
                    .await
            }
            async fn purge_freed(&self) -> Result<()> {
                self.around(RegistryOp::PurgeFreed, self.inner.purge_freed())
                    .await
            }
        }

        #[async_trait]
        impl<R: Registry + ?Sized> otm_core::AdminStore for $ty<R> {
            async fn audit_append(&self, entry: &otm_core::AuditEntry) -> Result<()> {
                self.around(RegistryOp::AuditAppend, self.inner.audit_append(entry))
                    .await
            }
            async fn audit_list(
                &self,
                limit: usize,
                before: Option<i64>,
            ) -> Result<Vec<otm_core::AuditEntry>> {
                self.around(RegistryOp::AuditList, self.inner.audit_list(limit, before))
                    .await
            }
            async fn token_create(&self, token: &otm_core::AdminToken) -> Result<()> {
                self.around(RegistryOp::TokenCreate, self.inner.token_create(token))
                    .await
            }
            async fn token_by_digest(&self, digest: &str) -> Result<Option<otm_core::AdminToken>> {
                self.around(
                    RegistryOp::TokenByDigest,
                    self.inner.token_by_digest(digest),
                )
                .await
            }
            async fn token_list(&self) -> Result<Vec<otm_core::AdminToken>> {
                self.around(RegistryOp::TokenList, self.inner.token_list())
                    .await
            }
            async fn token_revoke(&self, name: &str) -> Result<bool> {
                self.around(RegistryOp::TokenRevoke, self.inner.token_revoke(name))
                    .await
            }
        }
    };
}

// ---------------------------------------------------------------------------------------------
// Metered.

/// The labels of `otm_registry_calls_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub op: &'static str,
    pub outcome: &'static str,
}

/// The label of `otm_registry_call_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    pub op: &'static str,
}

fn latency_histogram() -> Histogram {
    Histogram::new([
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0, 10.0, 30.0,
    ])
}

/// What [`Metered`] counts: calls per operation and outcome, latency per operation. Cheap to
/// clone (the clones share the counts); register it in a Prometheus registry with
/// [`RegistryMetrics::register`].
#[derive(Clone, Debug)]
pub struct RegistryMetrics {
    calls: Family<CallLabels, Counter>,
    seconds: Family<OpLabel, Histogram, fn() -> Histogram>,
    /// The group commits of a backend that counts them (SQLite), once it was opened.
    writes: Arc<OnceLock<WriteCounters>>,
}

impl Default for RegistryMetrics {
    fn default() -> Self {
        RegistryMetrics {
            calls: Family::default(),
            seconds: Family::new_with_constructor(latency_histogram),
            writes: Arc::default(),
        }
    }
}

/// Exports a backend's group commits, read at each scrape.
#[derive(Debug)]
struct WriteCollector(Arc<OnceLock<WriteCounters>>);

impl Collector for WriteCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::result::Result<(), fmt::Error> {
        let Some(counters) = self.0.get() else {
            return Ok(());
        };
        let stats = counters.get();
        for (name, help, value) in [
            (
                "registry_write_jobs",
                "Writes run by the registry's writer thread (SQLite)",
                stats.jobs,
            ),
            (
                "registry_commits",
                "Transactions the registry's writer committed: fewer than its writes when group commit batched them",
                stats.commits,
            ),
            (
                "registry_synced_commits",
                "Commits synced to disk before their writes were answered; the rest held relaxed writes only",
                stats.synced_commits,
            ),
            (
                "registry_syncs",
                "Syncs (fdatasync) of the registry's write-ahead log: fewer than its synced commits when one sync covered several",
                stats.syncs,
            ),
        ] {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(
                name,
                help,
                None,
                counter.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

impl RegistryMetrics {
    /// Registers `registry_calls` (a counter: `registry_calls_total{op,outcome}`) and
    /// `registry_call_seconds{op}` (a histogram) in `registry`, under its prefix.
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register_collector(Box::new(WriteCollector(self.writes.clone())));
        registry.register(
            "registry_calls",
            "Registry calls, by operation and outcome (ok, or the error's kind)",
            self.calls.clone(),
        );
        registry.register(
            "registry_call_seconds",
            "Registry call latency, by operation",
            self.seconds.clone(),
        );
    }

    /// Exports the group commits of `counters`' registry as well (`registry_write_jobs_total`,
    /// `registry_commits_total`, `registry_synced_commits_total`, `registry_syncs_total`).
    /// The first registry given is the one exported.
    pub fn watch_writes(&self, counters: WriteCounters) {
        let _ = self.writes.set(counters);
    }

    /// Calls of `op` that ended with `outcome` so far.
    pub fn calls(&self, op: RegistryOp, outcome: &str) -> u64 {
        // Looked up without creating a series for a label pair never seen.
        let labels = CallLabels {
            op: op.as_str(),
            outcome: match outcome {
                "ok" => "ok",
                "not_found" => "not_found",
                "already_exists" => "already_exists",
                "conflict" => "conflict",
                "invalid_input" => "invalid_input",
                "unavailable" => "unavailable",
                "not_in_build" => "not_in_build",
                "corrupt" => "corrupt",
                "error" => "error",
                _ => return 0,
            },
        };
        self.calls.get(&labels).map_or(0, |c| c.get())
    }

    fn observe(&self, op: RegistryOp, outcome: &'static str, started: Instant) {
        self.calls
            .get_or_create(&CallLabels {
                op: op.as_str(),
                outcome,
            })
            .inc();
        self.seconds
            .get_or_create(&OpLabel { op: op.as_str() })
            .observe(started.elapsed().as_secs_f64());
    }
}

/// A registry that counts its calls, per operation and outcome, and times them, per
/// operation. Answers exactly what the registry it wraps answers.
pub struct Metered<R: ?Sized = dyn Registry> {
    inner: Arc<R>,
    metrics: RegistryMetrics,
}

impl<R: Registry + ?Sized> Metered<R> {
    /// Wraps `inner`, counting into `metrics`.
    pub fn new(inner: Arc<R>, metrics: RegistryMetrics) -> Self {
        Metered { inner, metrics }
    }

    /// The counts.
    pub fn metrics(&self) -> &RegistryMetrics {
        &self.metrics
    }

    async fn around<T>(&self, op: RegistryOp, call: impl Future<Output = Result<T>>) -> Result<T> {
        let started = Instant::now();
        let result = call.await;
        self.metrics.observe(op, outcome_of(&result), started);
        result
    }
}

impl<R: fmt::Debug + ?Sized> fmt::Debug for Metered<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metered")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

delegate_registry!(Metered);

// ---------------------------------------------------------------------------------------------
// Faulty.

/// The backend name of the errors [`Faulty`] injects.
pub const FAULT_BACKEND: &str = "registry (fault injected)";

/// A registry whose chosen operations fail with [`Error::Unavailable`], as calls to an
/// unreachable backend do, without reaching the registry it wraps: nothing is written. Which
/// calls fail is set through its [`FaultHandle`], at any time, from any task.
pub struct Faulty<R: ?Sized = dyn Registry> {
    inner: Arc<R>,
    faults: FaultHandle,
}

impl<R: Registry + ?Sized> Faulty<R> {
    /// Wraps `inner`; no call fails until the handle says so.
    pub fn new(inner: Arc<R>) -> Self {
        Faulty {
            inner,
            faults: FaultHandle::default(),
        }
    }

    /// The handle that chooses which calls fail.
    pub fn handle(&self) -> FaultHandle {
        self.faults.clone()
    }

    async fn around<T>(&self, op: RegistryOp, call: impl Future<Output = Result<T>>) -> Result<T> {
        if self.faults.take(op) {
            return Err(Error::unavailable(
                FAULT_BACKEND,
                format!("{op} was made to fail; the registry is unreachable"),
            ));
        }
        call.await
    }
}

impl<R: fmt::Debug + ?Sized> fmt::Debug for Faulty<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Faulty")
            .field("inner", &self.inner)
            .field("faults", &self.faults)
            .finish()
    }
}

delegate_registry!(Faulty);

/// Chooses which calls of a [`Faulty`] registry fail. Clones share the choice.
#[derive(Clone, Debug, Default)]
pub struct FaultHandle {
    state: Arc<Mutex<Faults>>,
}

#[derive(Debug, Default)]
struct Faults {
    /// Per operation: how many of the next calls fail (`u64::MAX`: every call).
    armed: HashMap<RegistryOp, u64>,
    /// Per operation: calls failed so far.
    injected: HashMap<RegistryOp, u64>,
}

impl FaultHandle {
    fn state(&self) -> std::sync::MutexGuard<'_, Faults> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next `n` calls of `op` fail (replacing what was set for it).
    pub fn fail_next(&self, op: RegistryOp, n: u64) {
        self.state().armed.insert(op, n);
    }

    /// Every call of `op` fails until [`FaultHandle::clear`].
    pub fn fail_always(&self, op: RegistryOp) {
        self.state().armed.insert(op, u64::MAX);
    }

    /// Calls of `op` go through again.
    pub fn clear(&self, op: RegistryOp) {
        self.state().armed.remove(&op);
    }

    /// Every call goes through again.
    pub fn clear_all(&self) {
        self.state().armed.clear();
    }

    /// Calls of `op` failed so far.
    pub fn injected(&self, op: RegistryOp) -> u64 {
        self.state().injected.get(&op).copied().unwrap_or(0)
    }

    /// True if this call of `op` is to fail; counts it.
    fn take(&self, op: RegistryOp) -> bool {
        let mut faults = self.state();
        let fail = match faults.armed.get_mut(&op) {
            None | Some(0) => false,
            Some(&mut u64::MAX) => true,
            Some(n) => {
                *n -= 1;
                true
            }
        };
        if fail {
            *faults.injected.entry(op).or_default() += 1;
        }
        fail
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SqliteRegistry;

    fn tenant(id: &str) -> Tenant {
        Tenant::new(TenantId::parse(id).unwrap(), "reference", None)
    }

    #[tokio::test]
    async fn faults_fail_the_chosen_calls_and_write_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let sqlite: Arc<dyn Registry> =
            Arc::new(SqliteRegistry::open(&dir.path().join("r.db")).unwrap());
        let faulty = Faulty::new(sqlite.clone());
        let faults = faulty.handle();
        let alice = TenantId::parse("alice").unwrap();
        faulty.create_tenant(&tenant("alice")).await.unwrap();

        faults.fail_next(RegistryOp::InboxAppend, 2);
        for _ in 0..2 {
            let err = faulty.inbox_append(&alice, 1, b"{}").await.unwrap_err();
            assert!(matches!(err, Error::Unavailable { .. }), "{err}");
        }
        assert_eq!(
            sqlite.inbox_depth(&alice).await.unwrap(),
            0,
            "nothing written"
        );
        // Other operations were never affected; the third append goes through.
        assert_eq!(faulty.inbox_depth(&alice).await.unwrap(), 0);
        assert!(matches!(
            faulty.inbox_append(&alice, 1, b"{}").await.unwrap(),
            Appended::Stored { .. }
        ));
        assert_eq!(faults.injected(RegistryOp::InboxAppend), 2);

        faults.fail_always(RegistryOp::GetTenant);
        for _ in 0..3 {
            assert!(faulty.get_tenant(&alice).await.is_err());
        }
        faults.clear(RegistryOp::GetTenant);
        assert!(faulty.get_tenant(&alice).await.unwrap().is_some());
        assert_eq!(faults.injected(RegistryOp::GetTenant), 3);
    }

    #[tokio::test]
    async fn metered_counts_calls_by_outcome_and_registers_them() {
        let dir = tempfile::tempdir().unwrap();
        let sqlite: Arc<dyn Registry> =
            Arc::new(SqliteRegistry::open(&dir.path().join("r.db")).unwrap());
        let faulty = Arc::new(Faulty::new(sqlite));
        let faults = faulty.handle();
        let metered = Metered::new(faulty, RegistryMetrics::default());
        let alice = TenantId::parse("alice").unwrap();

        metered.create_tenant(&tenant("alice")).await.unwrap();
        assert!(metered.create_tenant(&tenant("alice")).await.is_err());
        assert!(metered.get_tenant(&alice).await.unwrap().is_some());
        faults.fail_next(RegistryOp::GetTenant, 1);
        assert!(metered.get_tenant(&alice).await.is_err());

        let m = metered.metrics();
        assert_eq!(m.calls(RegistryOp::CreateTenant, "ok"), 1);
        assert_eq!(m.calls(RegistryOp::CreateTenant, "already_exists"), 1);
        assert_eq!(m.calls(RegistryOp::GetTenant, "ok"), 1);
        assert_eq!(m.calls(RegistryOp::GetTenant, "unavailable"), 1);
        assert_eq!(m.calls(RegistryOp::InboxAppend, "ok"), 0);

        let mut registry = prometheus_client::registry::Registry::with_prefix("otm");
        m.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(
                "otm_registry_calls_total{op=\"create_tenant\",outcome=\"already_exists\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("otm_registry_call_seconds_count{op=\"get_tenant\"} 2"),
            "{text}"
        );
    }
}
