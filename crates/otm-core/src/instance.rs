//! The instance record: one running sandbox with `otm shim` inside.

use crate::{InstanceId, Secret, TenantId};
use serde::{Deserialize, Serialize};

/// Where an instance is in its lifecycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceState {
    /// Created, bound to no tenant: a warm instance.
    Warm,
    /// Claimed by a tenant; restore and agent start under way.
    Binding,
    /// The agent is ready for deliveries.
    Ready,
    /// Being stopped.
    Stopping,
}

impl InstanceState {
    /// The lower-case name used in storage and answers.
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Warm => "warm",
            InstanceState::Binding => "binding",
            InstanceState::Ready => "ready",
            InstanceState::Stopping => "stopping",
        }
    }

    /// Parses [`InstanceState::as_str`] output.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "warm" => InstanceState::Warm,
            "binding" => InstanceState::Binding,
            "ready" => InstanceState::Ready,
            "stopping" => InstanceState::Stopping,
            _ => return None,
        })
    }
}

/// One instance as the registry knows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub id: InstanceId,
    /// The bound tenant; `None` for a warm instance.
    pub tenant: Option<TenantId>,
    pub state: InstanceState,
    /// The shim's control address: `unix:/path` or `http://host:port`.
    pub address: String,
    /// The token every shim call carries. Derived from the instance id under the server's key;
    /// registries store a marker in its place (see `otm_store::secrets`).
    pub shim_token: Secret,
    /// SHA-256 of the surrogate bot token the agent uses with the Bot API proxy.
    pub surrogate_digest: Option<String>,
    pub created_at_ms: i64,
    pub bound_at_ms: Option<i64>,
}

/// What a dispatcher needs to deliver to a tenant's instance; cached in the coordinator.
///
/// The cached form carries no shim token (it is never serialized; whoever delivers derives it
/// from the instance id) and a signature over tenant, instance and address, checked before an
/// entry is used, so that whoever can write to the cache cannot redirect deliveries.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Endpoint {
    pub instance: InstanceId,
    pub address: String,
    #[serde(skip_serializing, default)]
    pub shim_token: Secret,
    /// Hex HMAC-SHA256 under the server's key; set when the entry is cached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

impl From<&InstanceRecord> for Endpoint {
    fn from(r: &InstanceRecord) -> Self {
        Endpoint {
            instance: r.id.clone(),
            address: r.address.clone(),
            shim_token: r.shim_token.clone(),
            signature: None,
        }
    }
}
