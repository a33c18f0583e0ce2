//! What a wake answers ([`Woken`], [`WakePath`]) and the [`Waker`] that does it: the
//! orchestrator in this process ([`crate::orchestrator::Local`]), or, in the router role, an
//! orchestrator over HTTP ([`crate::remote::OrchestratorClient`]). [`crate::app::App`] holds the
//! one its role needs; [`crate::app::App::wake`] is the one entry point.

use async_trait::async_trait;
use otm_core::instance::Endpoint;
use otm_core::{InstanceId, Result, TenantId};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// The error backend of a wake held back by admission control: the dispatcher waits and tries
/// again without counting an attempt.
pub const ADMISSION: &str = "admission";

/// How a wake was served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WakePath {
    /// Already awake: the endpoint was cached or registered.
    Cache,
    /// Frozen in place: its agent was thawed.
    Frozen,
    /// A warm instance was claimed.
    Warm,
    /// A new instance was created.
    Cold,
}

impl WakePath {
    pub fn as_str(self) -> &'static str {
        match self {
            WakePath::Cache => "cache",
            WakePath::Frozen => "frozen",
            WakePath::Warm => "warm",
            WakePath::Cold => "cold",
        }
    }
}

/// The result of a wake, with its phases in milliseconds.
#[derive(Clone, Debug, Serialize)]
pub struct Woken {
    #[serde(skip)]
    pub endpoint: Endpoint,
    pub instance: InstanceId,
    pub path: WakePath,
    pub total_ms: u64,
    /// `claim` or `create`, `restore`, `start`, `ready`, in order.
    pub phases: Vec<(String, u64)>,
}

impl Woken {
    /// A wake served by an instance that was already up.
    pub fn cached(endpoint: Endpoint, begun: Instant) -> Woken {
        Woken {
            instance: endpoint.instance.clone(),
            endpoint,
            path: WakePath::Cache,
            total_ms: begun.elapsed().as_millis() as u64,
            phases: vec![],
        }
    }
}

/// What wakes a tenant once the endpoint cache missed; [`crate::app::App::wake`] is the entry
/// point and documents the locking scheme.
#[async_trait]
pub trait Waker: Send + Sync + std::fmt::Debug {
    /// Makes sure `tenant` has a ready instance and returns its endpoint. `chat` is the chat
    /// waiting for it, told that the agent is starting when the tenant asks for that.
    async fn wake(&self, tenant: &TenantId, chat: Option<i64>) -> Result<Woken>;
}
