//! What the SQLite, PostgreSQL and DynamoDB registries share: the errors they give (so every
//! backend words a stale fence or a missing update the same way), the checks that turn stored
//! values back into domain records, and the time and number conversions.
//!
//! A backend reads its own row format into a [`TenantRow`], [`InstanceRow`] or [`InboxRow`] of
//! plain values, and this module turns it into a [`Tenant`], [`InstanceRecord`] or
//! [`InboxItem`], refusing values no backend writes with [`Error::Corrupt`].

use otm_core::{
    Error, FailOutcome, InboxItem, InstanceId, InstanceRecord, InstanceState, Result, Secret,
    Tenant, TenantId, TenantLimits, TenantStatus,
};
use std::fmt;

/// Longest stored delivery error, in bytes.
pub(crate) const MAX_ERROR_LEN: usize = 2000;

// ---------------------------------------------------------------------------------------------
// Errors.

/// The error every registry gives an ack, failure or claim whose dispatcher fence is stale.
pub(crate) fn stale_dispatcher(
    tenant: &TenantId,
    fence: impl fmt::Display,
    stored: impl fmt::Display,
) -> Error {
    Error::conflict(format!(
        "dispatcher fence {fence} for tenant {tenant} is stale: fence {stored} was already \
         claimed; another dispatcher took the inbox over"
    ))
}

/// The error every registry gives an instance write whose wake fence is stale.
pub(crate) fn stale_waker(
    tenant: &TenantId,
    fence: impl fmt::Display,
    stored: impl fmt::Display,
) -> Error {
    Error::conflict(format!(
        "fence {fence} for tenant {tenant} is stale: fence {stored} was already used; another \
         holder of the tenant's lock took over, so this instance write is refused"
    ))
}

/// The error every registry gives a status write whose fence is stale.
pub(crate) fn stale_status(
    tenant: &TenantId,
    fence: impl fmt::Display,
    stored: impl fmt::Display,
) -> Error {
    Error::conflict(format!(
        "fence {fence} for tenant {tenant} is stale: fence {stored} was already used; \
         another holder of the tenant's lock took over"
    ))
}

/// A write or read that names a tenant the registry does not have.
pub(crate) fn tenant_not_found(tenant: &TenantId) -> Error {
    Error::not_found(format!("tenant {tenant}"))
}

/// A new tenant whose id is taken.
pub(crate) fn tenant_exists(tenant: &TenantId) -> Error {
    Error::AlreadyExists {
        what: format!("tenant {tenant}"),
    }
}

/// An ack or failure of an update the tenant's inbox does not hold.
pub(crate) fn update_not_found(tenant: &TenantId, seq: i64) -> Error {
    Error::not_found(format!("update {seq} in the inbox of tenant {tenant}"))
}

/// A failure recorded for an update that is no longer pending (`state`: done or dead).
pub(crate) fn not_pending(tenant: &TenantId, seq: i64, state: impl fmt::Display) -> Error {
    Error::conflict(format!(
        "update {seq} of tenant {tenant} is {state}, not pending; nothing to retry"
    ))
}

/// A retry or drop of an update that is not a dead letter (`state`: pending or done).
pub(crate) fn not_dead(tenant: &TenantId, seq: i64, state: &str) -> Error {
    let state = if state == "done" { "delivered" } else { state };
    Error::conflict(format!(
        "update {seq} of tenant {tenant} is {state}, not a dead letter; only dead letters can be retried or dropped"
    ))
}

/// An instance write that would bind a tenant to a second instance.
pub(crate) fn bound_elsewhere(tenant: &TenantId, instance: &InstanceId) -> Error {
    Error::conflict(format!(
        "tenant {tenant} is already bound to another instance than {instance}; stop that one first"
    ))
}

/// A warm-instance claim for a tenant that already has an instance.
pub(crate) fn already_bound(tenant: &TenantId) -> Error {
    Error::conflict(format!("tenant {tenant} is already bound to an instance"))
}

/// A stored value no backend writes.
pub(crate) fn corrupt(what: impl fmt::Display, message: impl fmt::Display) -> Error {
    Error::Corrupt {
        what: what.to_string(),
        message: message.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// Numbers and time.

/// A fence, timeout or other unsigned number as the signed 64-bit integer the backends store.
pub(crate) fn to_i64(value: u64, what: &str) -> Result<i64> {
    i64::try_from(value).map_err(|_| Error::invalid(format!("{what} {value} is too large")))
}

/// The idle deadline of a tenant last active at `at_ms`: `at_ms + idle_timeout_s` seconds,
/// saturating instead of overflowing.
pub(crate) fn deadline(at_ms: i64, idle_timeout_s: i64) -> i64 {
    at_ms.saturating_add(idle_timeout_s.saturating_mul(1000))
}

/// How long after its last activity a tenant is frozen, in milliseconds (saturating); `None`
/// when it never is. The stored freeze deadline is `last_active_ms` plus this, as
/// [`Tenant::freeze_deadline_ms`] computes it.
pub(crate) fn freeze_after_ms(t: &Tenant) -> Option<i64> {
    let after = t.limits.freeze_after_s();
    (after > 0 && after < t.idle_timeout_s).then(|| {
        i64::try_from(after)
            .unwrap_or(i64::MAX)
            .saturating_mul(1000)
    })
}

/// A stored attempt counter as the domain's `u32`, saturating.
pub(crate) fn attempts(stored: i64) -> u32 {
    u32::try_from(stored).unwrap_or(u32::MAX)
}

/// What a failure recorded as attempt number `attempts` (counted after the write) means.
pub(crate) fn fail_outcome(attempts: u32, max_attempts: u32) -> FailOutcome {
    if attempts >= max_attempts {
        FailOutcome::DeadLettered
    } else {
        FailOutcome::Retry { attempts }
    }
}

/// At most `max` bytes of `s`, cut on a character boundary and marked with `…` when cut.
pub(crate) fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

// ---------------------------------------------------------------------------------------------
// Rows.

/// A tenant as stored: plain values, checked by [`TenantRow::into_tenant`].
#[derive(Debug)]
pub(crate) struct TenantRow {
    pub id: String,
    pub profile: String,
    pub idle_timeout_s: i64,
    pub bot_token: Option<String>,
    pub webhook_secret: String,
    pub cold_start_notice: bool,
    pub status: String,
    pub created_at_ms: i64,
    pub last_active_ms: i64,
    /// The set limits as a JSON object; none reads as no limits.
    pub limits: Option<String>,
}

impl TenantRow {
    /// The tenant; `what` names the row in errors (`tenant row `alice``).
    pub fn into_tenant(self, what: &str) -> Result<Tenant> {
        Ok(Tenant {
            id: TenantId::parse(&self.id).map_err(|e| corrupt(what, e))?,
            profile: self.profile,
            idle_timeout_s: u64::try_from(self.idle_timeout_s)
                .map_err(|_| corrupt(what, "negative idle timeout"))?,
            bot_token: self.bot_token.map(Secret::new),
            webhook_secret: Secret::new(self.webhook_secret),
            cold_start_notice: self.cold_start_notice,
            status: tenant_status(&self.status, what)?,
            created_at_ms: self.created_at_ms,
            last_active_ms: self.last_active_ms,
            limits: TenantLimits::from_json(self.limits.as_deref())
                .map_err(|e| corrupt(what, e))?,
        })
    }
}

/// A stored tenant status.
pub(crate) fn tenant_status(stored: &str, what: &str) -> Result<TenantStatus> {
    TenantStatus::parse(stored).ok_or_else(|| corrupt(what, format!("unknown status `{stored}`")))
}

/// A stored tenant id (in an index, a foreign key, a list of ids).
pub(crate) fn tenant_id(stored: &str, what: impl fmt::Display) -> Result<TenantId> {
    TenantId::parse(stored).map_err(|e| corrupt(format!("{what} `{stored}`"), e))
}

/// An instance record as stored: plain values, checked by [`InstanceRow::into_instance`].
#[derive(Debug)]
pub(crate) struct InstanceRow {
    pub id: String,
    pub tenant: Option<String>,
    pub state: String,
    pub address: String,
    pub shim_token: String,
    pub surrogate_digest: Option<String>,
    pub created_at_ms: i64,
    pub bound_at_ms: Option<i64>,
}

impl InstanceRow {
    /// The record; `what` names the row in errors.
    pub fn into_instance(self, what: &str) -> Result<InstanceRecord> {
        Ok(InstanceRecord {
            tenant: self
                .tenant
                .map(|t| TenantId::parse(&t))
                .transpose()
                .map_err(|e| corrupt(what, e))?,
            state: InstanceState::parse(&self.state)
                .ok_or_else(|| corrupt(what, format!("unknown state `{}`", self.state)))?,
            address: self.address,
            shim_token: Secret::new(self.shim_token),
            surrogate_digest: self.surrogate_digest,
            created_at_ms: self.created_at_ms,
            bound_at_ms: self.bound_at_ms,
            id: InstanceId::new(self.id),
        })
    }
}

/// A pending or dead-lettered update as stored, checked by [`InboxRow::into_item`].
#[derive(Debug)]
pub(crate) struct InboxRow {
    pub tenant: String,
    pub seq: i64,
    pub update_id: i64,
    pub payload: Vec<u8>,
    pub attempts: i64,
    pub accepted_at_ms: i64,
    pub last_error: Option<String>,
}

impl InboxRow {
    /// The item.
    pub fn into_item(self) -> Result<InboxItem> {
        Ok(InboxItem {
            tenant: TenantId::parse(&self.tenant)
                .map_err(|e| corrupt(format!("inbox row {}", self.seq), e))?,
            seq: self.seq,
            update_id: self.update_id,
            payload: self.payload,
            attempts: attempts(self.attempts),
            accepted_at_ms: self.accepted_at_ms,
            last_error: self.last_error,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncates_on_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h…");
        assert_eq!(truncate("abc", 5), "abc");
    }

    #[test]
    fn freeze_offsets_give_the_tenants_freeze_deadline() {
        let mut t = Tenant::new(TenantId::parse("alice").unwrap(), "reference", None);
        t.idle_timeout_s = 600;
        for (after, expected) in [
            (
                None,
                Some(otm_core::tenant::DEFAULT_FREEZE_AFTER_S as i64 * 1000),
            ),
            (Some(0), None),
            (Some(30), Some(30_000)),
            (Some(600), None),
            (Some(u64::MAX), None),
        ] {
            t.limits.freeze_after_s = after;
            assert_eq!(freeze_after_ms(&t), expected, "{after:?}");
            assert_eq!(
                freeze_after_ms(&t).map(|ms| t.last_active_ms + ms),
                t.freeze_deadline_ms(),
                "{after:?}"
            );
        }
    }

    #[test]
    fn deadlines_saturate() {
        assert_eq!(deadline(1_000, 10), 11_000);
        assert_eq!(deadline(i64::MAX - 5, 10), i64::MAX);
        assert_eq!(deadline(i64::MIN, -10), i64::MIN);
    }

    #[test]
    fn rows_with_values_no_backend_writes_are_corrupt() {
        let row = |status: &str, idle: i64| TenantRow {
            id: "alice".into(),
            profile: "reference".into(),
            idle_timeout_s: idle,
            bot_token: None,
            webhook_secret: "s".into(),
            cold_start_notice: false,
            status: status.into(),
            created_at_ms: 1,
            last_active_ms: 2,
            limits: None,
        };
        let t = row("idle", 60).into_tenant("tenant row `alice`").unwrap();
        assert_eq!(t.status, TenantStatus::Idle);
        assert_eq!(t.idle_timeout_s, 60);
        for bad in [row("sleepy", 60), row("idle", -1)] {
            let err = bad.into_tenant("tenant row `alice`").unwrap_err();
            assert!(matches!(err, Error::Corrupt { .. }), "{err}");
            assert!(err.to_string().contains("tenant row `alice`"), "{err}");
        }
        let item = InboxRow {
            tenant: "alice".into(),
            seq: 3,
            update_id: 9,
            payload: b"{}".to_vec(),
            attempts: i64::MAX,
            accepted_at_ms: 1,
            last_error: None,
        }
        .into_item()
        .unwrap();
        assert_eq!(item.attempts, u32::MAX);
    }

    #[test]
    fn failures_dead_letter_at_the_limit() {
        assert_eq!(fail_outcome(2, 3), FailOutcome::Retry { attempts: 2 });
        assert_eq!(fail_outcome(3, 3), FailOutcome::DeadLettered);
    }
}
