//! Wire types of the shim's control API, shared by the orchestrator (client) and `otm shim`
//! (server). Every call carries `Authorization: Bearer <instance token>`.
//!
//! | call | body | answer |
//! |---|---|---|
//! | `GET /v1/status` | | [`ShimStatus`] |
//! | `PUT /v1/state` | tar+zstd archive | 204: state directory replaced (before bind only) |
//! | `POST /v1/bind` | [`BindRequest`] | [`BindResponse`] once the agent is ready |
//! | `POST /v1/deliver` | the update (JSON) | [`DeliverResponse`] |
//! | `GET /v1/snapshot` | | tar+zstd archive of the state directory |
//! | `POST /v1/stop` | [`StopRequest`] | [`StopResponse`] after the agent exited |
//! | `POST /v1/freeze` | | [`FreezeResponse`]: the agent's process tree is stopped in place |
//! | `POST /v1/thaw` | | [`FreezeResponse`]: the agent runs again |
//! | `GET /v1/logs?tail=N&follow=true` | | the agent's output, text |

use crate::TenantId;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The header that carries the instance token.
pub const AUTHORIZATION: &str = "authorization";

/// Binds an instance to a tenant and starts its agent.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BindRequest {
    pub tenant: TenantId,
    /// Agent profile name.
    pub profile: String,
    /// Root URL of otm's Bot API proxy, as the agent should see it.
    pub bot_api_root: String,
    /// The surrogate bot token for this instance (never the real one).
    pub bot_token: String,
    /// Extra settings for the profile (model provider and the like).
    #[serde(default)]
    pub settings: BTreeMap<String, String>,
}

/// How long the phases of a bind took.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct BindResponse {
    pub agent_pid: Option<u32>,
    /// From bind call to agent process spawned, milliseconds.
    pub start_ms: u64,
    /// From spawn to the agent answering ready, milliseconds.
    pub ready_ms: u64,
}

/// What the agent said to one delivery.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeliverResponse {
    /// True when the agent acknowledged the update (it will not be delivered again).
    pub acknowledged: bool,
    /// The agent's HTTP status.
    pub status: u16,
    /// A short description when not acknowledged.
    #[serde(default)]
    pub detail: Option<String>,
}

/// Stops the agent.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StopRequest {
    /// Seconds to wait after SIGTERM before SIGKILL; the profile's default when absent.
    pub grace_s: Option<u64>,
}

/// How the agent ended.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StopResponse {
    pub exit_code: Option<i32>,
    /// True if the grace period ran out and the agent was killed.
    pub killed: bool,
}

/// The shim's view of itself.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ShimStatus {
    pub instance: String,
    pub tenant: Option<TenantId>,
    pub profile: Option<String>,
    /// `unbound`, `starting`, `ready`, `exited`, `stopped`.
    pub agent: String,
    pub agent_pid: Option<u32>,
    pub restarts: u32,
    /// True while the agent is frozen ([`FreezeResponse`]).
    #[serde(default)]
    pub frozen: bool,
    /// Resident memory of the agent's processes, in bytes, while it runs or is frozen.
    #[serde(default)]
    pub memory_bytes: Option<u64>,
}

/// What a freeze or a thaw did. Deliveries, stops and snapshots of a frozen agent need no thaw
/// first: a delivery or a stop thaws it, a snapshot packs the frozen state as it is.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FreezeResponse {
    /// Whether the agent is frozen after the call.
    pub frozen: bool,
    /// Whether the call changed anything (false: it was frozen, or thawed, already).
    pub changed: bool,
    /// How the agent is held: `cgroup` (its cgroup frozen, where the instance has one) or
    /// `sigstop` (every process of its tree stopped).
    #[serde(default)]
    pub method: Option<String>,
    /// Resident memory of the agent's processes, in bytes.
    #[serde(default)]
    pub memory_bytes: u64,
    /// How long the call took inside the shim, in microseconds.
    #[serde(default)]
    pub micros: u64,
}
