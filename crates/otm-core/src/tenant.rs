//! The tenant record.

use crate::{Secret, TenantId};
use serde::{Deserialize, Serialize};

/// Default idle timeout: ten minutes.
pub const DEFAULT_IDLE_TIMEOUT_S: u64 = 600;

/// Default time idle before a tenant's agent is frozen: one minute.
pub const DEFAULT_FREEZE_AFTER_S: u64 = 60;

/// Where a tenant is in its lifecycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TenantStatus {
    /// No instance; the next update wakes it.
    Idle,
    /// A wake is under way.
    Provisioning,
    /// An instance is bound and ready.
    Running,
    /// An instance is bound and its agent frozen in place (no CPU, memory kept); the next
    /// update thaws it.
    Frozen,
    /// The instance is being stopped.
    Stopping,
}

impl TenantStatus {
    /// The lower-case name used in storage and answers.
    pub fn as_str(self) -> &'static str {
        match self {
            TenantStatus::Idle => "idle",
            TenantStatus::Provisioning => "provisioning",
            TenantStatus::Running => "running",
            TenantStatus::Frozen => "frozen",
            TenantStatus::Stopping => "stopping",
        }
    }

    /// Parses [`TenantStatus::as_str`] output.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "idle" => TenantStatus::Idle,
            "provisioning" => TenantStatus::Provisioning,
            "running" => TenantStatus::Running,
            "frozen" => TenantStatus::Frozen,
            "stopping" => TenantStatus::Stopping,
            _ => return None,
        })
    }
}

/// One customer: id, channel binding, settings, secrets.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Tenant {
    pub id: TenantId,
    /// The agent profile that serves this tenant (`reference`, `openclaw`).
    pub profile: String,
    /// Seconds without a delivery after which the tenant is put to sleep.
    pub idle_timeout_s: u64,
    /// The real Telegram bot token; never leaves the control plane.
    pub bot_token: Option<Secret>,
    /// The secret Telegram sends in `X-Telegram-Bot-Api-Secret-Token`.
    pub webhook_secret: Secret,
    /// Send a short "starting up" message on a cold wake.
    pub cold_start_notice: bool,
    pub status: TenantStatus,
    pub created_at_ms: i64,
    /// Last accepted or delivered update.
    pub last_active_ms: i64,
    /// What its instances may use, where it differs from the fleet's defaults.
    #[serde(default)]
    pub limits: TenantLimits,
}

/// A tenant's own resource limits, and its egress policy; each unset limit is the fleet's
/// default.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenantLimits {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_millis: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pids: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_bytes: Option<u64>,
    /// The egress policy: `None` (or empty) is `none`, no way out but the Bot API and model
    /// proxies; host names (`example.com`, `*.example.com`) are `proxy`, an HTTP CONNECT proxy to
    /// those hosts on public addresses only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub egress_allow: Option<Vec<String>>,
    /// Who may talk to the tenant's agent: Telegram user ids (`"123456789"`), or `"*"` for
    /// anyone. See [`TenantLimits::dm_policy`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_users: Option<Vec<String>>,
    /// Model requests a minute through the model proxy; 0 is no limit; unset is the server's
    /// `model_requests_per_minute`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_requests_per_minute: Option<u32>,
    /// Model tokens a UTC day, as the provider reports them in `usage`; 0 is no limit; unset is
    /// the server's `model_tokens_per_day`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_tokens_per_day: Option<u64>,
    /// This tenant's own key at the model provider, sent upstream in place of the server's;
    /// write-only: views say only whether one is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_api_key: Option<Secret>,
    /// Seconds without a delivery after which the agent is frozen in place (until the next
    /// update or its idle timeout); 0 never freezes it; unset is [`DEFAULT_FREEZE_AFTER_S`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub freeze_after_s: Option<u64>,
}

/// Who may write to a tenant's agent in a direct chat.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DmPolicy {
    /// Nobody: no user was allowed (OpenClaw's `disabled`).
    Nobody,
    /// These Telegram user ids (OpenClaw's `allowlist`).
    Users(Vec<i64>),
    /// Anyone who finds the bot (OpenClaw's `open`): set only on purpose, with `"*"`.
    Anyone,
}

impl DmPolicy {
    /// OpenClaw's name for it.
    pub fn openclaw_name(&self) -> &'static str {
        match self {
            DmPolicy::Nobody => "disabled",
            DmPolicy::Users(_) => "allowlist",
            DmPolicy::Anyone => "open",
        }
    }

    /// The allowed list as an agent's setting: `*`, or ids joined by commas (empty: nobody).
    pub fn to_setting(&self) -> String {
        match self {
            DmPolicy::Nobody => String::new(),
            DmPolicy::Anyone => "*".into(),
            DmPolicy::Users(ids) => ids.iter().map(i64::to_string).collect::<Vec<_>>().join(","),
        }
    }

    /// Reads [`DmPolicy::to_setting`] back.
    pub fn from_setting(s: &str) -> DmPolicy {
        if s.split(',').any(|p| p.trim() == "*") {
            return DmPolicy::Anyone;
        }
        let ids: Vec<i64> = s.split(',').filter_map(|p| p.trim().parse().ok()).collect();
        if ids.is_empty() {
            DmPolicy::Nobody
        } else {
            DmPolicy::Users(ids)
        }
    }

    /// Whether a message from `user` may reach the agent.
    pub fn allows(&self, user: i64) -> bool {
        match self {
            DmPolicy::Nobody => false,
            DmPolicy::Anyone => true,
            DmPolicy::Users(ids) => ids.contains(&user),
        }
    }
}

/// Checks one entry of `allowed_users`: a Telegram user id (a positive integer) or `*`.
pub fn check_allowed_user(entry: &str) -> Result<String, String> {
    let e = entry.trim();
    let e = e
        .strip_prefix("tg:")
        .or_else(|| e.strip_prefix("telegram:"))
        .unwrap_or(e);
    if e == "*" || e.parse::<i64>().is_ok_and(|n| n > 0) {
        Ok(e.to_owned())
    } else {
        Err(format!(
            "`{entry}` is not a Telegram user id (a positive number, as Telegram's `from.id`) or `*` (anyone)"
        ))
    }
}

impl TenantLimits {
    /// Who may write to the agent: nobody until users are allowed, anyone only with `*`.
    pub fn dm_policy(&self) -> DmPolicy {
        DmPolicy::from_setting(&self.allowed_users.clone().unwrap_or_default().join(","))
    }

    /// The model budget in force: this tenant's own, else the server's default; 0 is none.
    pub fn model_budget(
        &self,
        default_rpm: Option<u32>,
        default_tpd: Option<u64>,
    ) -> (Option<u32>, Option<u64>) {
        (
            self.model_requests_per_minute
                .or(default_rpm)
                .filter(|n| *n > 0),
            self.model_tokens_per_day.or(default_tpd).filter(|n| *n > 0),
        )
    }

    /// Seconds idle before the agent is frozen; 0: never.
    pub fn freeze_after_s(&self) -> u64 {
        self.freeze_after_s.unwrap_or(DEFAULT_FREEZE_AFTER_S)
    }

    /// These limits as views show them: the model key left out.
    pub fn without_secrets(&self) -> Self {
        TenantLimits {
            model_api_key: None,
            ..self.clone()
        }
    }

    /// `proxy` when the tenant may reach allowlisted hosts, else `none`.
    pub fn egress(&self) -> &'static str {
        if self.egress_allow.as_ref().is_some_and(|a| !a.is_empty()) {
            "proxy"
        } else {
            "none"
        }
    }

    /// These limits over `defaults`.
    pub fn over(&self, defaults: &crate::ResourceLimits) -> crate::ResourceLimits {
        crate::ResourceLimits {
            memory_bytes: self.memory_bytes.unwrap_or(defaults.memory_bytes),
            cpu_millis: self.cpu_millis.unwrap_or(defaults.cpu_millis),
            cpu_request_millis: defaults
                .cpu_request_millis
                .min(self.cpu_millis.unwrap_or(u32::MAX)),
            pids: self.pids.unwrap_or(defaults.pids),
            disk_bytes: self.disk_bytes.unwrap_or(defaults.disk_bytes),
        }
    }

    /// The stored form: a JSON object of the set limits.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("limits serialise")
    }

    /// Reads [`TenantLimits::to_json`]; empty or absent is no limits of its own.
    pub fn from_json(s: Option<&str>) -> Result<Self, serde_json::Error> {
        match s.map(str::trim) {
            None | Some("") => Ok(TenantLimits::default()),
            Some(s) => serde_json::from_str(s),
        }
    }
}

impl Tenant {
    /// A new idle tenant with a fresh webhook secret.
    pub fn new(id: TenantId, profile: impl Into<String>, bot_token: Option<Secret>) -> Self {
        let now = crate::time::now_ms();
        Tenant {
            id,
            profile: profile.into(),
            idle_timeout_s: DEFAULT_IDLE_TIMEOUT_S,
            bot_token,
            webhook_secret: Secret::random(),
            cold_start_notice: false,
            status: TenantStatus::Idle,
            created_at_ms: now,
            last_active_ms: now,
            limits: TenantLimits::default(),
        }
    }

    /// When the tenant's agent is frozen if nothing arrives, in Unix milliseconds; `None` when it
    /// is never frozen (freezing is off, or would not come before the idle timeout).
    pub fn freeze_deadline_ms(&self) -> Option<i64> {
        let after = self.limits.freeze_after_s();
        (after > 0 && after < self.idle_timeout_s).then(|| {
            self.last_active_ms
                .saturating_add((after as i64).saturating_mul(1000))
        })
    }

    /// When the tenant becomes idle if nothing arrives, in Unix milliseconds.
    pub fn idle_deadline_ms(&self) -> i64 {
        self.last_active_ms
            .saturating_add((self.idle_timeout_s as i64).saturating_mul(1000))
    }
}
