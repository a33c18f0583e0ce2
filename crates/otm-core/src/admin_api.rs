//! Wire types of the admin API under `/v1/`, shared by the server that builds them, the CLI that
//! reads them, and the shim's control API that answers errors in the same shape.
//!
//! A field renamed here is renamed for every side at once: the CLI reads these types, never a
//! JSON value by string key. Answers accept fields they do not know (an older CLI keeps working
//! against a newer server); requests refuse them, so a typo is an error rather than a no-op.
//!
//! | call | body | answer |
//! |---|---|---|
//! | `GET /v1/tenants` | | `[`[`TenantView`]`]` |
//! | `POST /v1/tenants` | [`CreateTenant`] | 201 [`TenantView`] |
//! | `GET /v1/tenants/{id}` | | [`TenantView`] |
//! | `PATCH /v1/tenants/{id}` | [`PatchTenant`] | [`TenantView`] |
//! | `DELETE /v1/tenants/{id}?keep_state=true` | | 204 |
//! | `POST /v1/tenants/{id}/wake` | | [`WakeView`] |
//! | `POST /v1/tenants/{id}/stop` | | [`StopView`] |
//! | `GET /v1/tenants/{id}/inbox` | | [`InboxAnswer`] |
//! | `POST /v1/tenants/{id}/inbox/{seq}/retry` | | [`RetryAnswer`] |
//! | `POST /v1/tenants/{id}/inbox/dead/retry` (every dead letter) | | [`RetryAnswer`] |
//! | `DELETE /v1/tenants/{id}/inbox/{seq}` | | [`DropAnswer`] |
//! | `DELETE /v1/tenants/{id}/inbox/dead` (every dead letter) | | [`DropAnswer`] |
//! | `GET /v1/tenants/{id}/snapshots` | | [`SnapshotList`] |
//! | `POST /v1/tenants/{id}/snapshots/{snapshot}/restore` | | [`RestoreView`] |
//! | `GET /v1/tenants/{id}/export` | | the state as a tar, `x-otm-snapshot` names its snapshot |
//! | `GET /v1/tenants/{id}/logs?tail=N&follow=true` | | the agent's output, text |
//! | `GET /v1/instances` | | `[`[`InstanceView`]`]` |
//! | `GET /v1/config` | | [`FleetSettings`] |
//! | `PUT /v1/config` | [`PutConfig`] | [`FleetSettings`] |
//! | `GET /v1/status` | | [`StatusView`] |
//! | `POST /v1/secrets/rotate` | [`RotateRequest`] (or nothing) | [`RotateAnswer`] |
//! | `GET /v1/audit?limit=N&before=ID` | | [`AuditPage`] |
//! | `POST /v1/tokens` | [`CreateToken`] | 201 [`NewToken`] |
//! | `GET /v1/tokens` | | `[`[`TokenView`]`]` |
//! | `DELETE /v1/tokens/{name}` | | 204 |
//!
//! Every write (every method but GET and HEAD) is recorded in the audit trail with the name of
//! the token that made it; a read-only token gets 403 `forbidden` on every write.
//!
//! Every error, of the admin API and of the shim's, is an [`ErrorBody`]:
//! `{"error": {"code": "not_found", "message": "tenant acme not found"}}`.

use crate::inbox::{DeliveryFailure, InboxItem};
use crate::{
    FleetSettings, LimitKind, ResourceLimits, SnapshotId, SnapshotMeta, TenantId, TenantLimits,
    TenantStatus,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// What went wrong, as a stable string a script can match.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// The request is malformed or names something invalid (400).
    InvalidRequest,
    /// Missing, wrong or revoked token (401).
    Unauthorized,
    /// The token may not do this: a read-only token on a write route (403).
    Forbidden,
    /// No such tenant, snapshot or route (404).
    NotFound,
    /// It exists already (409).
    AlreadyExists,
    /// It is in a state that does not allow this (409).
    Conflict,
    /// The tenant has no instance; wake it first (409).
    NotRunning,
    /// Telegram refused a call made on the tenant's behalf (502).
    TelegramError,
    /// A backend cannot be reached now; try again (503).
    Unavailable,
    /// Stored data failed its check (500).
    Corrupt,
    /// Anything else (500).
    Internal,
    /// A code this build does not know (from a newer peer).
    #[serde(other)]
    Other,
}

impl ErrorCode {
    /// The code for an HTTP status, where only the status is known (the shim's errors).
    pub fn from_status(status: u16) -> Self {
        match status {
            400 | 413 | 422 => ErrorCode::InvalidRequest,
            401 => ErrorCode::Unauthorized,
            403 => ErrorCode::Forbidden,
            404 => ErrorCode::NotFound,
            409 => ErrorCode::Conflict,
            502 => ErrorCode::Unavailable,
            503 | 504 => ErrorCode::Unavailable,
            _ => ErrorCode::Internal,
        }
    }
}

/// The body of every error answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong and what to do about it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: ErrorCode,
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorBody {
            error: ErrorDetail {
                code,
                message: message.into(),
            },
        }
    }

    /// Reads an error answer; `None` when the body is not one (a proxy's HTML page, say).
    pub fn parse(body: &[u8]) -> Option<Self> {
        serde_json::from_slice(body).ok()
    }
}

/// A tenant as the API shows it: no secrets, only whether a bot token is set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TenantView {
    pub id: TenantId,
    pub profile: String,
    pub status: TenantStatus,
    pub idle_timeout_s: u64,
    /// Seconds idle before the agent is frozen; 0: never.
    #[serde(default)]
    pub freeze_after_s: u64,
    pub cold_start_notice: bool,
    pub has_bot_token: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<String>,
    pub created_at_ms: i64,
    pub last_active_ms: i64,
    pub instance: Option<String>,
    pub inbox_pending: u64,
    /// What its instances may use: its own limits over the fleet's defaults.
    pub limits: ResourceLimits,
    /// The limits set for this tenant alone.
    pub own_limits: TenantLimits,
    /// `none` (no way out but the Bot API and model proxies) or `proxy` (CONNECT to `egress_allow`).
    pub egress: String,
    pub egress_allow: Vec<String>,
    /// Telegram user ids that may write to the agent, or `*` (anyone); empty: nobody, or (when
    /// the list was never set) the profile's default, which `dm_policy` tells.
    pub allowed_users: Vec<String>,
    /// The DM policy the agent applies: `disabled` (nobody), `allowlist` or `open` (anyone).
    /// With no list ever set, an OpenClaw agent answers nobody and the reference agent anyone.
    pub dm_policy: String,
    /// Whether the tenant has a model key of its own (the key itself is never shown).
    pub has_model_api_key: bool,
    /// The model budget in force and what was used of it (as this server counted it).
    pub model_budget: BudgetView,
    /// The last limit one of its instances ran into (as this server saw it).
    pub last_limit_kill: Option<LimitKill>,
    /// The last wake that could not restore the head snapshot: what it skipped and why (as this
    /// server saw it).
    pub last_restore_fallback: Option<RestoreFallback>,
}

/// What a tenant used, as one server process counted it, beside its budget.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetView {
    pub requests_per_minute: Option<u32>,
    pub tokens_per_day: Option<u64>,
    pub requests_last_minute: u32,
    pub tokens_today: u64,
}

/// An instance stopped for running into a limit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitKill {
    pub limit: LimitKind,
    pub detail: String,
    pub at_ms: i64,
}

/// A wake that skipped snapshots it could not restore.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreFallback {
    /// The snapshot restored instead; `None` when none could be.
    pub restored: Option<SnapshotId>,
    /// Newest first.
    pub skipped: Vec<SkippedSnapshot>,
    pub at_ms: i64,
}

/// One snapshot a wake could not restore, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedSnapshot {
    pub snapshot: SnapshotId,
    pub reason: String,
}

/// `POST /v1/tenants`. Limits are given as the API takes them: `memory` and `disk` as sizes
/// (`512Mi`, `2GiB`, or a number of bytes), `cpu` as `500m`, `0.5` or a number of cores, `pids`
/// as a count; `"default"` (or null) returns one to the fleet's default.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTenant {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bot_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_s: Option<u64>,
    /// Seconds idle before the agent is frozen (0: never); `"default"` or null: the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze_after_s: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cold_start_notice: Option<bool>,
    /// The secret Telegram must send; generated when absent (it is then only ever given to
    /// Telegram through setWebhook).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_allow: Option<Vec<String>>,
    /// Telegram user ids (numbers or strings) that may write to the agent, or `"*"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_users: Option<Vec<Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_requests_per_minute: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_tokens_per_day: Option<Value>,
    /// The tenant's own key at the model provider (write-only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_api_key: Option<String>,
}

/// `PATCH /v1/tenants/{id}`: only what is given changes; the units are those of
/// [`CreateTenant`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchTenant {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bot_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_s: Option<u64>,
    /// Seconds idle before the agent is frozen (0: never); `"default"` or null: the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze_after_s: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cold_start_notice: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_allow: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_users: Option<Vec<Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_requests_per_minute: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_tokens_per_day: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_api_key: Option<String>,
}

impl PatchTenant {
    /// True when it changes nothing.
    pub fn is_empty(&self) -> bool {
        *self == PatchTenant::default()
    }

    /// The body of a new tenant `id` with these settings (the webhook secret generated).
    pub fn into_create(self, id: String) -> CreateTenant {
        CreateTenant {
            id,
            bot_token: self.bot_token,
            idle_timeout_s: self.idle_timeout_s,
            freeze_after_s: self.freeze_after_s,
            profile: self.profile,
            cold_start_notice: self.cold_start_notice,
            webhook_secret: None,
            memory: self.memory,
            cpu: self.cpu,
            pids: self.pids,
            disk: self.disk,
            egress: self.egress,
            egress_allow: self.egress_allow,
            allowed_users: self.allowed_users,
            model_requests_per_minute: self.model_requests_per_minute,
            model_tokens_per_day: self.model_tokens_per_day,
            model_api_key: self.model_api_key,
        }
    }
}

/// Resource limits in the units tenants take (`memory`, `cpu`, `pids`, `disk`), with the egress
/// policy; the `default_limits` of [`PutConfig`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsBody {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_allow: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_users: Option<Vec<Value>>,
}

/// `PUT /v1/config`: only what is given changes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm_pool_target: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_running: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_wakes: Option<u32>,
    /// A size (`8GiB`, a number of bytes); 0 is no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frozen_memory_max: Option<Value>,
    /// Fleet default limits, in the units tenants take (`memory`, `cpu`, `pids`, `disk`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_limits: Option<LimitsBody>,
}

/// The answer to a wake: where the tenant runs now, how it got there and how long it took.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WakeView {
    pub tenant: TenantId,
    pub instance: String,
    /// `cache`, `warm` or `cold`.
    pub path: String,
    pub total_ms: u64,
    /// Milliseconds by phase: `claim` or `create`, `restore`, `start`, `ready`.
    pub phases_ms: BTreeMap<String, u64>,
}

/// The answer to a stop.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopView {
    pub tenant: TenantId,
    /// False when the tenant was not running.
    pub stopped: bool,
}

/// One update in a tenant's inbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxEntry {
    pub seq: i64,
    pub update_id: i64,
    pub attempts: u32,
    pub accepted_at_ms: i64,
    pub last_error: Option<String>,
    /// What kind of failure `last_error` was, where it was recorded.
    #[serde(default)]
    pub last_error_kind: Option<DeliveryFailure>,
}

impl From<&InboxItem> for InboxEntry {
    fn from(i: &InboxItem) -> Self {
        let (kind, text) = i.failure();
        InboxEntry {
            seq: i.seq,
            update_id: i.update_id,
            attempts: i.attempts,
            accepted_at_ms: i.accepted_at_ms,
            last_error: text.map(str::to_owned),
            last_error_kind: kind,
        }
    }
}

/// A tenant's pending and dead-lettered updates.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxAnswer {
    pub tenant: TenantId,
    pub pending: Vec<InboxEntry>,
    pub dead: Vec<InboxEntry>,
    /// Where the next page starts (`?after=`); `None` on the last page.
    #[serde(default)]
    pub next_after: Option<i64>,
}

/// The answer to a retry of dead letters: they are pending again, at the head of the inbox,
/// and the tenant's dispatcher was told.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryAnswer {
    pub tenant: TenantId,
    /// Sequence numbers of the updates retried, ascending.
    pub retried: Vec<i64>,
}

/// The answer to a drop of dead letters: they are gone (their update ids still count as seen).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropAnswer {
    pub tenant: TenantId,
    /// Sequence numbers of the updates dropped, ascending.
    pub dropped: Vec<i64>,
}

/// One snapshot of a tenant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotEntry {
    pub id: SnapshotId,
    /// Archive size in bytes.
    pub size: u64,
    /// Hex SHA-256 of the archive.
    pub sha256: String,
    pub created_at_ms: i64,
    /// `final`, `periodic`, `manual`, `crash`, ….
    pub reason: String,
    /// Whether the next wake restores this one.
    pub head: bool,
}

impl SnapshotEntry {
    pub fn new(m: SnapshotMeta, head: bool) -> Self {
        SnapshotEntry {
            id: m.id,
            size: m.size,
            sha256: m.sha256,
            created_at_ms: m.created_at_ms,
            reason: m.reason,
            head,
        }
    }
}

/// A tenant's snapshots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotList {
    pub tenant: TenantId,
    pub head: Option<SnapshotId>,
    pub snapshots: Vec<SnapshotEntry>,
}

/// The answer to a restore: the snapshot the next wake starts from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreView {
    pub tenant: TenantId,
    pub head: SnapshotId,
    /// When it takes effect: `next wake`.
    pub restored_on: String,
}

/// A live instance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceView {
    pub id: String,
    pub tenant: Option<TenantId>,
    pub state: String,
    pub created_at_ms: i64,
    pub bound_at_ms: Option<i64>,
}

/// The server's status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusView {
    pub version: String,
    pub uptime_s: u64,
    /// `all`, `router` or `orchestrator`.
    pub role: String,
    pub runtime: String,
    pub isolation: String,
    pub sandboxed: bool,
    pub limits: String,
    /// Whether this replica holds the leader lease (runs the reaper, the warm pool, periodic
    /// snapshots and the reconciler's full passes).
    #[serde(default)]
    pub leader: bool,
    /// What an operator must know about this server's safety, in words.
    pub warnings: Vec<String>,
    pub tenants: u64,
    pub tenants_running: u64,
    pub instances: u64,
    pub inbox_pending: u64,
    pub settings: FleetSettings,
}

/// `POST /v1/secrets/rotate`: what to rotate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RotateRequest {
    /// Add a fresh key to the key file first (false: re-encrypt under the newest key the key
    /// file already lists, for key files their operator manages).
    pub new_key: bool,
    /// Drop the older keys from the key file once every secret is re-encrypted.
    pub retire_old_keys: bool,
}

impl Default for RotateRequest {
    fn default() -> Self {
        RotateRequest {
            new_key: true,
            retire_old_keys: true,
        }
    }
}

/// What a rotation did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotateAnswer {
    /// The key that encrypts every secret now.
    pub key_id: String,
    /// Whether that key was made by this rotation.
    pub new_key: bool,
    /// Tenants whose secrets were re-encrypted.
    pub reencrypted: u64,
    /// Tenants already under that key.
    pub unchanged: u64,
    /// Tenants whose secrets could not be read; while any is left, no key is retired.
    pub failed: Vec<String>,
    /// Keys dropped from the key file after every secret was re-encrypted.
    pub retired: Vec<String>,
}

/// A page of the audit trail, newest first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditPage {
    pub entries: Vec<crate::AuditEntry>,
    /// Pass as `before` for the next (older) page; `None` on the last page.
    pub next_before: Option<i64>,
}

/// `POST /v1/tokens`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// Lowercase letters, digits, `-` and `_`, up to 63; `admin` and `unknown` are taken.
    pub name: String,
    #[serde(default)]
    pub read_only: bool,
}

/// A named admin token, without the token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenView {
    pub name: String,
    pub read_only: bool,
    pub created_at_ms: i64,
}

/// The answer to `POST /v1/tokens`: the only time the token is shown (only its SHA-256 is kept).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewToken {
    pub name: String,
    pub read_only: bool,
    pub created_at_ms: i64,
    pub token: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn errors_carry_string_codes() {
        let body = ErrorBody::new(ErrorCode::NotFound, "tenant acme not found");
        assert_eq!(
            serde_json::to_value(&body).unwrap(),
            json!({"error": {"code": "not_found", "message": "tenant acme not found"}})
        );
        for (code, name) in [
            (ErrorCode::InvalidRequest, "invalid_request"),
            (ErrorCode::AlreadyExists, "already_exists"),
            (ErrorCode::NotRunning, "not_running"),
            (ErrorCode::TelegramError, "telegram_error"),
        ] {
            assert_eq!(serde_json::to_value(code).unwrap(), json!(name));
        }
    }

    #[test]
    fn error_bodies_parse_and_unknown_codes_are_kept_apart() {
        let parsed =
            ErrorBody::parse(br#"{"error":{"code":"conflict","message":"bound elsewhere"}}"#)
                .unwrap();
        assert_eq!(parsed.error.code, ErrorCode::Conflict);
        assert_eq!(parsed.error.message, "bound elsewhere");
        let newer = ErrorBody::parse(br#"{"error":{"code":"quota_exceeded","message":"m"}}"#);
        assert_eq!(newer.unwrap().error.code, ErrorCode::Other);
        assert!(ErrorBody::parse(b"<html>bad gateway</html>").is_none());
        assert!(ErrorBody::parse(br#"{"code":404}"#).is_none());
    }

    #[test]
    fn status_codes_map_to_codes() {
        assert_eq!(ErrorCode::from_status(404), ErrorCode::NotFound);
        assert_eq!(ErrorCode::from_status(401), ErrorCode::Unauthorized);
        assert_eq!(ErrorCode::from_status(403), ErrorCode::Forbidden);
        assert_eq!(ErrorCode::from_status(409), ErrorCode::Conflict);
        assert_eq!(ErrorCode::from_status(400), ErrorCode::InvalidRequest);
        assert_eq!(ErrorCode::from_status(503), ErrorCode::Unavailable);
        assert_eq!(ErrorCode::from_status(500), ErrorCode::Internal);
    }

    #[test]
    fn inbox_entries_show_the_failure_kind_apart_from_its_text() {
        let item = InboxItem {
            tenant: TenantId::parse("acme").unwrap(),
            seq: 3,
            update_id: 7,
            payload: vec![],
            attempts: 2,
            accepted_at_ms: 1,
            last_error: Some(DeliveryFailure::AgentRefused.record("agent answered 500")),
        };
        let v = serde_json::to_value(InboxEntry::from(&item)).unwrap();
        assert_eq!(v["last_error"], json!("agent answered 500"));
        assert_eq!(v["last_error_kind"], json!("agent_refused"));
        // Recorded before kinds were: the text as it is, no kind.
        let old = InboxItem {
            last_error: Some("wake failed: no room".into()),
            ..item
        };
        let v = serde_json::to_value(InboxEntry::from(&old)).unwrap();
        assert_eq!(v["last_error"], json!("wake failed: no room"));
        assert_eq!(v["last_error_kind"], Value::Null);
    }

    #[test]
    fn requests_leave_out_what_is_not_given() {
        let body = PatchTenant {
            idle_timeout_s: Some(30),
            ..PatchTenant::default()
        };
        assert_eq!(
            serde_json::to_value(&body).unwrap(),
            json!({"idle_timeout_s": 30})
        );
        assert!(serde_json::from_value::<PatchTenant>(json!({"idle_timeout": 30})).is_err());
    }
}
