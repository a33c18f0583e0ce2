//! An in-memory [`Registry`] for tests under a paused clock: every call is a few map operations
//! on the caller's task, so no thread or file stands between a test and tokio's clock. It keeps
//! the contract's fencing and inbox rules; it keeps nothing across a restart.

use async_trait::async_trait;
use otm_core::registry::{Inbox, InstanceStore, TenantStore};
use otm_core::{
    Appended, DeadLetters, Error, FailOutcome, FleetSettings, InboxItem, InboxView, InstanceId,
    InstanceRecord, InstanceState, Result, Tenant, TenantId, TenantStatus,
};
use std::collections::BTreeMap;
use std::sync::Mutex;

#[derive(Debug, Default)]
pub struct MemoryRegistry {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    tenants: BTreeMap<TenantId, Row>,
    instances: BTreeMap<InstanceId, InstanceRecord>,
    inbox: BTreeMap<(TenantId, i64), Entry>,
    next_seq: i64,
    settings: FleetSettings,
    audit: BTreeMap<i64, otm_core::AuditEntry>,
    tokens: BTreeMap<String, otm_core::AdminToken>,
}

#[derive(Debug)]
struct Row {
    tenant: Tenant,
    fence: u64,
    dispatch_fence: u64,
    idle_deadline_ms: i64,
}

#[derive(Debug)]
struct Entry {
    item: InboxItem,
    state: EntryState,
}

#[derive(Debug, PartialEq, Eq)]
enum EntryState {
    Pending,
    Dead,
    Done,
}

fn stale(tenant: &TenantId, fence: u64, stored: u64) -> Error {
    Error::conflict(format!(
        "fence {fence} for tenant {tenant} is stale: fence {stored} was already used"
    ))
}

impl Inner {
    fn row(&mut self, id: &TenantId) -> Result<&mut Row> {
        self.tenants
            .get_mut(id)
            .ok_or_else(|| Error::not_found(format!("tenant {id}")))
    }

    fn dispatch_fence(&mut self, tenant: &TenantId, fence: Option<u64>) -> Result<()> {
        let Some(f) = fence else { return Ok(()) };
        let row = self.row(tenant)?;
        if row.dispatch_fence > f {
            return Err(stale(tenant, f, row.dispatch_fence));
        }
        row.dispatch_fence = f;
        Ok(())
    }

    fn pending(&mut self, tenant: &TenantId, seq: i64) -> Result<&mut Entry> {
        let e = self
            .inbox
            .get_mut(&(tenant.clone(), seq))
            .ok_or_else(|| Error::not_found(format!("update {seq} of tenant {tenant}")))?;
        if e.state != EntryState::Pending {
            return Err(Error::conflict(format!(
                "update {seq} of tenant {tenant} is not pending"
            )));
        }
        Ok(e)
    }

    /// Dead letters back to pending (`retry`) or to done, as the contract says.
    fn move_dead(
        &mut self,
        tenant: &TenantId,
        which: DeadLetters,
        retry: bool,
    ) -> Result<Vec<i64>> {
        self.row(tenant)?;
        if let DeadLetters::One(seq) = which {
            let e = self
                .inbox
                .get(&(tenant.clone(), seq))
                .ok_or_else(|| Error::not_found(format!("update {seq} of tenant {tenant}")))?;
            if e.state != EntryState::Dead {
                return Err(Error::conflict(format!(
                    "update {seq} of tenant {tenant} is not a dead letter"
                )));
            }
        }
        let mut moved = Vec::new();
        for ((t, seq), e) in self.inbox.iter_mut() {
            let named =
                matches!(which, DeadLetters::One(s) if s == *seq) || which == DeadLetters::All;
            if t == tenant && named && e.state == EntryState::Dead {
                if retry {
                    e.state = EntryState::Pending;
                    e.item.attempts = 0;
                } else {
                    e.state = EntryState::Done;
                    e.item.payload.clear();
                }
                moved.push(*seq);
            }
        }
        Ok(moved)
    }

    fn items(&self, tenant: &TenantId, state: EntryState) -> impl Iterator<Item = &InboxItem> {
        self.inbox
            .iter()
            .filter(move |((t, _), e)| t == tenant && e.state == state)
            .map(|(_, e)| &e.item)
    }
}

impl MemoryRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap()
    }
}

#[async_trait]
impl TenantStore for MemoryRegistry {
    async fn create_tenant(&self, tenant: &Tenant) -> Result<()> {
        let mut i = self.lock();
        if i.tenants.contains_key(&tenant.id) {
            return Err(Error::AlreadyExists {
                what: format!("tenant {}", tenant.id),
            });
        }
        let idle_deadline_ms = tenant
            .last_active_ms
            .saturating_add(tenant.idle_timeout_s as i64 * 1000);
        i.tenants.insert(
            tenant.id.clone(),
            Row {
                tenant: tenant.clone(),
                fence: 0,
                dispatch_fence: 0,
                idle_deadline_ms,
            },
        );
        Ok(())
    }

    async fn get_tenant(&self, id: &TenantId) -> Result<Option<Tenant>> {
        Ok(self.lock().tenants.get(id).map(|r| r.tenant.clone()))
    }

    async fn list_tenants(&self) -> Result<Vec<Tenant>> {
        Ok(self
            .lock()
            .tenants
            .values()
            .map(|r| r.tenant.clone())
            .collect())
    }

    async fn update_tenant(&self, tenant: &Tenant) -> Result<()> {
        let mut i = self.lock();
        let row = i.row(&tenant.id)?;
        let (status, active) = (row.tenant.status, row.tenant.last_active_ms);
        row.tenant = Tenant {
            status,
            last_active_ms: active,
            ..tenant.clone()
        };
        Ok(())
    }

    async fn delete_tenant(&self, id: &TenantId) -> Result<bool> {
        let mut i = self.lock();
        i.inbox.retain(|(t, _), _| t != id);
        Ok(i.tenants.remove(id).is_some())
    }

    async fn set_tenant_status(
        &self,
        id: &TenantId,
        status: TenantStatus,
        fence: Option<u64>,
    ) -> Result<()> {
        let mut i = self.lock();
        let row = i.row(id)?;
        if let Some(f) = fence {
            if f < row.fence {
                return Err(stale(id, f, row.fence));
            }
            row.fence = f;
        }
        row.tenant.status = status;
        Ok(())
    }

    async fn touch_tenant(&self, id: &TenantId, at_ms: i64) -> Result<()> {
        let mut i = self.lock();
        let row = i.row(id)?;
        row.tenant.last_active_ms = at_ms;
        row.idle_deadline_ms = at_ms.saturating_add(row.tenant.idle_timeout_s as i64 * 1000);
        Ok(())
    }

    async fn idle_due(&self, now_ms: i64, limit: usize) -> Result<Vec<TenantId>> {
        let i = self.lock();
        let mut due: Vec<_> = i
            .tenants
            .values()
            .filter(|r| r.tenant.status == TenantStatus::Running && r.idle_deadline_ms <= now_ms)
            .map(|r| (r.idle_deadline_ms, r.tenant.id.clone()))
            .collect();
        due.sort();
        Ok(due.into_iter().take(limit).map(|(_, id)| id).collect())
    }

    async fn freeze_due(&self, now_ms: i64, limit: usize) -> Result<Vec<TenantId>> {
        let i = self.lock();
        let mut due: Vec<_> = i
            .tenants
            .values()
            .filter(|r| r.tenant.status == TenantStatus::Running && r.idle_deadline_ms > now_ms)
            .filter_map(|r| Some((r.tenant.freeze_deadline_ms()?, r.tenant.id.clone())))
            .filter(|(deadline, _)| *deadline <= now_ms)
            .collect();
        due.sort();
        Ok(due.into_iter().take(limit).map(|(_, id)| id).collect())
    }

    async fn frozen_tenants(&self) -> Result<Vec<(TenantId, i64)>> {
        let i = self.lock();
        let mut frozen: Vec<_> = i
            .tenants
            .values()
            .filter(|r| r.tenant.status == TenantStatus::Frozen)
            .map(|r| (r.idle_deadline_ms, r.tenant.id.clone()))
            .collect();
        frozen.sort();
        Ok(frozen.into_iter().map(|(d, id)| (id, d)).collect())
    }
}

#[async_trait]
impl InstanceStore for MemoryRegistry {
    async fn put_instance(&self, instance: &InstanceRecord, fence: Option<u64>) -> Result<()> {
        let mut i = self.lock();
        if let (Some(f), Some(t)) = (fence, &instance.tenant)
            && let Some(row) = i.tenants.get(t)
            && row.fence > f
        {
            return Err(stale(t, f, row.fence));
        }
        i.instances.insert(instance.id.clone(), instance.clone());
        Ok(())
    }

    async fn get_instance(&self, id: &InstanceId) -> Result<Option<InstanceRecord>> {
        Ok(self.lock().instances.get(id).cloned())
    }

    async fn instance_of(&self, tenant: &TenantId) -> Result<Option<InstanceRecord>> {
        Ok(self
            .lock()
            .instances
            .values()
            .find(|r| r.tenant.as_ref() == Some(tenant))
            .cloned())
    }

    async fn instance_by_surrogate(&self, digest: &str) -> Result<Option<InstanceRecord>> {
        Ok(self
            .lock()
            .instances
            .values()
            .find(|r| r.surrogate_digest.as_deref() == Some(digest))
            .cloned())
    }

    async fn list_instances(&self) -> Result<Vec<InstanceRecord>> {
        Ok(self.lock().instances.values().cloned().collect())
    }

    async fn delete_instance(&self, id: &InstanceId) -> Result<bool> {
        Ok(self.lock().instances.remove(id).is_some())
    }

    async fn claim_warm_instance(&self, tenant: &TenantId) -> Result<Option<InstanceRecord>> {
        let mut i = self.lock();
        let Some(rec) = i
            .instances
            .values_mut()
            .find(|r| r.tenant.is_none() && r.state == InstanceState::Warm)
        else {
            return Ok(None);
        };
        rec.tenant = Some(tenant.clone());
        rec.state = InstanceState::Binding;
        Ok(Some(rec.clone()))
    }

    async fn get_settings(&self) -> Result<FleetSettings> {
        Ok(self.lock().settings.clone())
    }

    async fn put_settings(&self, settings: &FleetSettings) -> Result<()> {
        self.lock().settings = settings.clone();
        Ok(())
    }
}

#[async_trait]
impl Inbox for MemoryRegistry {
    async fn inbox_append(
        &self,
        tenant: &TenantId,
        update_id: i64,
        payload: &[u8],
    ) -> Result<Appended> {
        let mut i = self.lock();
        i.row(tenant)?;
        if i.inbox
            .iter()
            .any(|((t, _), e)| t == tenant && e.item.update_id == update_id)
        {
            return Ok(Appended::Duplicate);
        }
        i.next_seq += 1;
        let seq = i.next_seq;
        let item = InboxItem {
            tenant: tenant.clone(),
            seq,
            update_id,
            payload: payload.to_vec(),
            attempts: 0,
            accepted_at_ms: otm_core::time::now_ms(),
            last_error: None,
        };
        i.inbox.insert(
            (tenant.clone(), seq),
            Entry {
                item,
                state: EntryState::Pending,
            },
        );
        Ok(Appended::Stored { seq })
    }

    async fn inbox_next(&self, tenant: &TenantId) -> Result<Option<InboxItem>> {
        Ok(self
            .lock()
            .items(tenant, EntryState::Pending)
            .next()
            .cloned())
    }

    async fn inbox_ack(&self, tenant: &TenantId, seq: i64, fence: Option<u64>) -> Result<()> {
        let mut i = self.lock();
        i.dispatch_fence(tenant, fence)?;
        let e = i.pending(tenant, seq)?;
        e.state = EntryState::Done;
        e.item.payload.clear();
        Ok(())
    }

    async fn inbox_fail(
        &self,
        tenant: &TenantId,
        seq: i64,
        error: &str,
        max_attempts: u32,
        fence: Option<u64>,
    ) -> Result<FailOutcome> {
        let mut i = self.lock();
        i.dispatch_fence(tenant, fence)?;
        let e = i.pending(tenant, seq)?;
        e.item.attempts += 1;
        e.item.last_error = Some(error.to_owned());
        if e.item.attempts >= max_attempts {
            e.state = EntryState::Dead;
            Ok(FailOutcome::DeadLettered)
        } else {
            Ok(FailOutcome::Retry {
                attempts: e.item.attempts,
            })
        }
    }

    async fn inbox_claim(&self, tenant: &TenantId, fence: u64) -> Result<()> {
        self.lock().dispatch_fence(tenant, Some(fence))
    }

    async fn inbox_retry(&self, tenant: &TenantId, which: DeadLetters) -> Result<Vec<i64>> {
        self.lock().move_dead(tenant, which, true)
    }

    async fn inbox_drop(&self, tenant: &TenantId, which: DeadLetters) -> Result<Vec<i64>> {
        self.lock().move_dead(tenant, which, false)
    }

    async fn inbox_view(
        &self,
        tenant: &TenantId,
        after: Option<i64>,
        limit: usize,
    ) -> Result<InboxView> {
        let i = self.lock();
        let after = after.unwrap_or(i64::MIN);
        Ok(InboxView {
            pending: i
                .items(tenant, EntryState::Pending)
                .filter(|e| e.seq > after)
                .take(limit)
                .cloned()
                .collect(),
            dead: i
                .items(tenant, EntryState::Dead)
                .filter(|e| e.seq > after)
                .take(limit)
                .cloned()
                .collect(),
        })
    }

    async fn inbox_depth(&self, tenant: &TenantId) -> Result<u64> {
        Ok(self.lock().items(tenant, EntryState::Pending).count() as u64)
    }

    async fn inbox_pending_tenants(&self) -> Result<Vec<TenantId>> {
        let i = self.lock();
        let mut tenants: Vec<TenantId> = i
            .inbox
            .iter()
            .filter(|(_, e)| e.state == EntryState::Pending)
            .map(|((t, _), _)| t.clone())
            .collect();
        tenants.dedup();
        Ok(tenants)
    }

    async fn inbox_prune(&self, before_ms: i64) -> Result<u64> {
        let mut i = self.lock();
        let before = i.inbox.len();
        i.inbox
            .retain(|_, e| e.state != EntryState::Done || e.item.accepted_at_ms >= before_ms);
        Ok((before - i.inbox.len()) as u64)
    }
}

#[async_trait]
impl otm_core::AdminStore for MemoryRegistry {
    async fn audit_append(&self, entry: &otm_core::AuditEntry) -> Result<()> {
        self.lock().audit.insert(entry.id, entry.clone());
        Ok(())
    }
    async fn audit_list(
        &self,
        limit: usize,
        before: Option<i64>,
    ) -> Result<Vec<otm_core::AuditEntry>> {
        let i = self.lock();
        Ok(i.audit
            .range(..before.unwrap_or(i64::MAX))
            .rev()
            .take(limit)
            .map(|(_, e)| e.clone())
            .collect())
    }
    async fn token_create(&self, token: &otm_core::AdminToken) -> Result<()> {
        let mut i = self.lock();
        if i.tokens.contains_key(&token.name) {
            return Err(Error::AlreadyExists {
                what: format!("admin token {}", token.name),
            });
        }
        i.tokens.insert(token.name.clone(), token.clone());
        Ok(())
    }
    async fn token_by_digest(&self, digest: &str) -> Result<Option<otm_core::AdminToken>> {
        Ok(self
            .lock()
            .tokens
            .values()
            .find(|t| t.digest == digest)
            .cloned())
    }
    async fn token_list(&self) -> Result<Vec<otm_core::AdminToken>> {
        Ok(self.lock().tokens.values().cloned().collect())
    }
    async fn token_revoke(&self, name: &str) -> Result<bool> {
        Ok(self.lock().tokens.remove(name).is_some())
    }
}
