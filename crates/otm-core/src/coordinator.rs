//! The [`Coordinator`] trait: fast shared state between replicas.

use crate::instance::Endpoint;
use crate::{Result, TenantId};
use async_trait::async_trait;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// A held lock or lease. `fence` grows with every acquisition of the same key, so a write guarded
/// by an old lease can be told apart from one guarded by the current lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub key: String,
    /// Random owner token: only the owner can renew or release.
    pub owner: String,
    pub fence: u64,
}

/// A change other replicas should react to at once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Notification {
    /// The tenant's inbox has pending updates.
    InboxHasWork { tenant: TenantId },
    /// The tenant's cached endpoint is no longer valid.
    EndpointInvalidated { tenant: TenantId },
    /// Fleet settings changed.
    SettingsChanged,
    /// A tenant was deleted or created: what a replica keeps of it (its webhook secret) is stale.
    TenantChanged { tenant: TenantId },
}

/// Fast shared state. Contract:
/// - The endpoint cache is a cache: a miss is always safe, the registry decides.
/// - [`Coordinator::acquire`] succeeds for at most one owner of a key at a time; the lease lapses
///   after its TTL unless renewed. Renew and release succeed only for the current owner.
/// - Fences of one key strictly increase across acquisitions, also across lapses.
/// - Notifications are best effort and delivered to every subscriber, the publisher included;
///   sweepers make up for a lost one.
#[async_trait]
pub trait Coordinator: Send + Sync + std::fmt::Debug + 'static {
    /// The cached endpoint of a tenant.
    async fn endpoint(&self, tenant: &TenantId) -> Result<Option<Endpoint>>;
    /// Caches a tenant's endpoint for `ttl`.
    async fn set_endpoint(
        &self,
        tenant: &TenantId,
        endpoint: &Endpoint,
        ttl: Duration,
    ) -> Result<()>;
    /// Drops a tenant's cached endpoint.
    async fn clear_endpoint(&self, tenant: &TenantId) -> Result<()>;
    /// Takes the lock `key` for `ttl` if nobody holds it.
    async fn acquire(&self, key: &str, ttl: Duration) -> Result<Option<Lease>>;
    /// Extends a held lease; false if it lapsed or another owner holds the key.
    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool>;
    /// Releases a held lease; false if it was not held by this owner any more.
    async fn release(&self, lease: &Lease) -> Result<bool>;
    /// Publishes a notification to every subscriber.
    async fn publish(&self, notification: Notification) -> Result<()>;
    /// Notifications published from now on.
    fn subscribe(&self) -> BoxStream<'static, Notification>;
}
