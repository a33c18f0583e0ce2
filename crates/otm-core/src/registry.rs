//! The [`Registry`]: the source of truth for tenants, instances, inboxes and fleet settings.
//!
//! It is three traits, each with its own contract: [`TenantStore`] (tenants and their status),
//! [`InstanceStore`] (instance records and the fleet settings) and [`Inbox`] (accepted updates
//! waiting for delivery). [`Registry`] is all three; every type that implements the three is a
//! `Registry`, so callers hold one `Arc<dyn Registry>` and backends implement three small traits.

use crate::{
    Appended, DeadLetters, FailOutcome, InboxItem, InboxView, InstanceId, InstanceRecord, Result,
    Tenant, TenantId, TenantStatus,
};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// Settings shared by the whole fleet, changed at run time through the admin API.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct FleetSettings {
    /// How many started, unbound instances to keep ready.
    pub warm_pool_target: u32,
    /// Most instances running at once (warm ones included); 0 is no limit. Beyond it, updates
    /// wait in their inboxes and the longest-idle tenants are put to sleep first.
    pub max_running: u32,
    /// Most wakes under way at once in one orchestrator; 0 is no limit.
    pub max_concurrent_wakes: u32,
    /// Most memory frozen agents may hold together, in bytes; 0 is no limit. Beyond it, the least
    /// recently active frozen tenants are put to sleep (snapshotted and stopped) first.
    pub frozen_memory_max: u64,
    /// Limits of every instance, unless its tenant says otherwise.
    pub default_limits: crate::ResourceLimits,
}

/// Tenants: their settings, secrets, status and activity.
///
/// Contract, for every backend:
/// - Every method that returns `Ok` has made its write durable: a crash right after it returns
///   loses nothing. Each write is atomic: it happens whole or not at all.
/// - [`TenantStore::set_tenant_status`] with a `fence` is refused with
///   [`crate::Error::Conflict`] when a larger fence was already used for that tenant (the fence
///   check and the write are one atomic step), so a stale holder of the tenant's lock cannot
///   overwrite a newer one. The stored fence never decreases.
/// - [`TenantStore::delete_tenant`] deletes the tenant's inbox with it, atomically.
/// - [`TenantStore::list_tenants`] is ordered by id (byte order); [`TenantStore::idle_due`] and
///   [`TenantStore::frozen_tenants`] by idle deadline, [`TenantStore::freeze_due`] by freeze
///   deadline ([`Tenant::freeze_deadline_ms`], kept by every write that moves it: create, update,
///   touch).
/// - Missing tenants are [`crate::Error::NotFound`] for updates, `Ok(None)` for gets.
#[async_trait]
pub trait TenantStore: Send + Sync + std::fmt::Debug + 'static {
    /// Stores a new tenant; [`crate::Error::AlreadyExists`] if the id is taken.
    async fn create_tenant(&self, tenant: &Tenant) -> Result<()>;
    /// One tenant.
    async fn get_tenant(&self, id: &TenantId) -> Result<Option<Tenant>>;
    /// All tenants, ordered by id.
    async fn list_tenants(&self) -> Result<Vec<Tenant>>;
    /// Replaces a tenant's settings and secrets (not its status or activity).
    async fn update_tenant(&self, tenant: &Tenant) -> Result<()>;
    /// Deletes a tenant and its inbox; returns false if there was none.
    async fn delete_tenant(&self, id: &TenantId) -> Result<bool>;
    /// Sets a tenant's status; with a fence, only if no larger fence was used for it.
    async fn set_tenant_status(
        &self,
        id: &TenantId,
        status: TenantStatus,
        fence: Option<u64>,
    ) -> Result<()>;
    /// Records activity now (`at_ms`), pushing the idle deadline out.
    async fn touch_tenant(&self, id: &TenantId, at_ms: i64) -> Result<()>;
    /// Running tenants whose idle deadline is at or before `now_ms`, at most `limit`.
    async fn idle_due(&self, now_ms: i64, limit: usize) -> Result<Vec<TenantId>>;
    /// Running tenants whose freeze deadline is at or before `now_ms` and whose idle deadline is
    /// after it, at most `limit`: the ones the idle sweep freezes next. Tenants that never freeze
    /// are never listed.
    async fn freeze_due(&self, now_ms: i64, limit: usize) -> Result<Vec<TenantId>>;
    /// Every frozen tenant with its idle deadline (Unix milliseconds), ordered by idle deadline.
    async fn frozen_tenants(&self) -> Result<Vec<(TenantId, i64)>>;
}

/// Instance records (which instance serves which tenant, at what address) and the fleet
/// settings that govern them.
///
/// Contract, for every backend:
/// - Every method that returns `Ok` has made its write durable, atomically.
/// - At most one instance is bound to a tenant: a write that would bind a second one is
///   refused with [`crate::Error::Conflict`].
/// - [`InstanceStore::put_instance`] with a `fence` is fenced by the tenant's status fence (the
///   one [`TenantStore::set_tenant_status`] records), checked in the same atomic step as the
///   write.
/// - [`InstanceStore::claim_warm_instance`] is atomic: concurrent claimers, in any process,
///   take different instances or none, never the same one. Warm instances are taken oldest
///   first.
/// - [`InstanceStore::list_instances`] is ordered by id.
/// - Missing instances are `Ok(None)` for gets and `Ok(false)` for deletes.
#[async_trait]
pub trait InstanceStore: Send + Sync + std::fmt::Debug + 'static {
    /// Stores or replaces an instance record. With a `fence` (the wake lock's) and a tenant on
    /// the record, the write is refused with [`crate::Error::Conflict`] when a larger fence was
    /// already used for that tenant's status: a waker that lost its lock cannot publish or
    /// change the instance of the tenant's newer waker.
    async fn put_instance(&self, instance: &InstanceRecord, fence: Option<u64>) -> Result<()>;
    /// One instance.
    async fn get_instance(&self, id: &InstanceId) -> Result<Option<InstanceRecord>>;
    /// The instance bound to a tenant, if any.
    async fn instance_of(&self, tenant: &TenantId) -> Result<Option<InstanceRecord>>;
    /// The live instance whose surrogate token has this digest.
    async fn instance_by_surrogate(&self, digest: &str) -> Result<Option<InstanceRecord>>;
    /// All instances.
    async fn list_instances(&self) -> Result<Vec<InstanceRecord>>;
    /// Deletes an instance record; false if there was none.
    async fn delete_instance(&self, id: &InstanceId) -> Result<bool>;
    /// Atomically takes one warm instance and binds it to `tenant` (state becomes binding).
    async fn claim_warm_instance(&self, tenant: &TenantId) -> Result<Option<InstanceRecord>>;

    /// The fleet settings (defaults if never written).
    async fn get_settings(&self) -> Result<FleetSettings>;
    /// Replaces the fleet settings.
    async fn put_settings(&self, settings: &FleetSettings) -> Result<()>;
}

/// Every tenant's inbox: updates accepted from Telegram, waiting for delivery in order.
///
/// Contract, for every backend:
/// - Every method that returns `Ok` has made its write durable: an update answered
///   [`Appended::Stored`] survives a crash right after the call returns.
/// - [`Inbox::inbox_append`] is idempotent per `(tenant, update_id)`: the first call stores the
///   update, later ones return [`Appended::Duplicate`] and write nothing, for as long as the
///   update is pending or was delivered within the retention window (until
///   [`Inbox::inbox_prune`]).
/// - Ordering: per tenant, sequence numbers grow in append order, and [`Inbox::inbox_next`]
///   returns the pending update with the lowest one; an update never appears below one already
///   returned.
/// - Fencing: [`Inbox::inbox_claim`] records the fence of the dispatcher that owns the tenant's
///   inbox; [`Inbox::inbox_ack`] and [`Inbox::inbox_fail`] with a smaller fence are refused with
///   [`crate::Error::Conflict`], checked in the same atomic step as their write.
/// - Acks are idempotent: acking a delivered update again changes nothing.
/// - Dead letters: [`Inbox::inbox_retry`] makes dead-lettered updates pending again under their
///   own sequence numbers, with no failed attempts, so they are next in line (before every
///   update appended after them, in sequence order among themselves); the exception to "never
///   below one already returned". [`Inbox::inbox_drop`] moves them to delivered, without their
///   payload, so they still count for deduplication. Both act on dead letters only: a sequence
///   number that names no update of the tenant is [`crate::Error::NotFound`], one that names a
///   pending or delivered update [`crate::Error::Conflict`], and nothing is written; with
///   [`DeadLetters::All`] every dead letter moves in one atomic step where the backend can
///   (SQLite, PostgreSQL), else one by one. Neither is fenced: an operator acts outside any
///   dispatcher's lease.
#[async_trait]
pub trait Inbox: Send + Sync + std::fmt::Debug + 'static {
    /// Appends an update to a tenant's inbox, durably.
    async fn inbox_append(
        &self,
        tenant: &TenantId,
        update_id: i64,
        payload: &[u8],
    ) -> Result<Appended>;
    /// The oldest pending update of a tenant.
    async fn inbox_next(&self, tenant: &TenantId) -> Result<Option<InboxItem>>;
    /// The oldest pending updates of a tenant, at most `limit` of them, oldest first: what a
    /// dispatcher delivers next, read in one go. Backends that cannot read several at once
    /// answer the head alone.
    async fn inbox_head(&self, tenant: &TenantId, limit: usize) -> Result<Vec<InboxItem>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        Ok(self.inbox_next(tenant).await?.into_iter().collect())
    }
    /// Marks an update delivered and drops its payload (the message text is kept nowhere once
    /// the agent has it); it leaves the pending list but still counts for deduplication until
    /// [`Inbox::inbox_prune`].
    ///
    /// With a `fence` (the dispatcher lease's), the ack is refused with [`crate::Error::Conflict`]
    /// when a larger fence was claimed for the tenant's inbox: a dispatcher that lost its lease
    /// cannot acknowledge what its successor owns.
    async fn inbox_ack(&self, tenant: &TenantId, seq: i64, fence: Option<u64>) -> Result<()>;
    /// Records a failed delivery; after `max_attempts` failures the update is dead-lettered.
    /// Fenced as [`Inbox::inbox_ack`].
    async fn inbox_fail(
        &self,
        tenant: &TenantId,
        seq: i64,
        error: &str,
        max_attempts: u32,
        fence: Option<u64>,
    ) -> Result<FailOutcome>;
    /// Claims a tenant's inbox for the dispatcher holding `fence`: from now on acks and failures
    /// with a smaller fence are refused. [`crate::Error::Conflict`] if a larger fence was already
    /// claimed; [`crate::Error::NotFound`] if there is no such tenant.
    async fn inbox_claim(&self, tenant: &TenantId, fence: u64) -> Result<()>;
    /// Makes dead letters pending again, at the head of the inbox; returns their sequence
    /// numbers, ascending (empty when [`DeadLetters::All`] found none). A missing tenant is
    /// [`crate::Error::NotFound`].
    async fn inbox_retry(&self, tenant: &TenantId, which: DeadLetters) -> Result<Vec<i64>>;
    /// Drops dead letters: they leave the dead-letter list and their payload goes, but their
    /// update ids still count as seen. Returns their sequence numbers, ascending.
    async fn inbox_drop(&self, tenant: &TenantId, which: DeadLetters) -> Result<Vec<i64>>;
    /// Pending and dead-lettered updates with a sequence number above `after` (all with
    /// `None`), oldest first, at most `limit` of each: a page of the inbox; the next page starts
    /// after the largest sequence number of this one.
    async fn inbox_view(
        &self,
        tenant: &TenantId,
        after: Option<i64>,
        limit: usize,
    ) -> Result<InboxView>;
    /// Number of pending updates of a tenant.
    async fn inbox_depth(&self, tenant: &TenantId) -> Result<u64>;
    /// Tenants that have pending updates.
    async fn inbox_pending_tenants(&self) -> Result<Vec<TenantId>>;
    /// Forgets delivered updates accepted before `before_ms`; returns how many.
    async fn inbox_prune(&self, before_ms: i64) -> Result<u64>;
    /// Makes what was cleared or deleted (acked payloads, deleted tenants) unreadable from the
    /// registry's own files where the backend keeps old versions around (SQLite: its
    /// write-ahead log is checkpointed and truncated). Called every few seconds; cheap when
    /// there is nothing to do.
    async fn purge_freed(&self) -> Result<()> {
        Ok(())
    }
}

/// The source of truth: [`TenantStore`], [`InstanceStore`], [`Inbox`] and
/// [`crate::AdminStore`] in one.
///
/// Implemented for every type that implements the three, so a backend implements those and
/// callers hold an `Arc<dyn Registry>`. The contract is the three traits' together; across them,
/// [`TenantStore::delete_tenant`] also deletes the tenant's inbox, and
/// [`InstanceStore::put_instance`] is fenced by the status fence of [`TenantStore`].
pub trait Registry: TenantStore + InstanceStore + Inbox + crate::AdminStore {}

impl<T: TenantStore + InstanceStore + Inbox + crate::AdminStore + ?Sized> Registry for T {}
