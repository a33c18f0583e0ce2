//! The [`Runtime`] trait: creates, lists, watches and deletes instances.

use crate::{InstanceId, Result, Secret, TenantId};
use async_trait::async_trait;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};

/// What to create.
#[derive(Clone, Debug)]
pub struct InstanceSpec {
    pub id: InstanceId,
    /// The token the shim will require on every call.
    pub shim_token: Secret,
    /// The tenant it is created for, or `None` for a warm instance. A label only: binding is
    /// done through the shim.
    pub tenant: Option<TenantId>,
}

/// One instance as the runtime sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RuntimeInstance {
    pub id: InstanceId,
    /// The shim's control address.
    pub address: String,
    pub alive: bool,
    /// The tenant label it was created with.
    pub tenant: Option<TenantId>,
    /// When it was created, if the runtime knows.
    #[serde(default)]
    pub created_at_ms: Option<i64>,
}

/// A change in the runtime that the reconciler acts on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RuntimeEvent {
    /// The instance's process tree or pod is gone or failed.
    Exited { id: InstanceId, detail: String },
}

/// Runs instances. Contract:
/// - [`Runtime::create`] returns once the shim answers on its control address.
/// - [`Runtime::delete`] treats an instance that is already gone as deleted.
/// - [`Runtime::events`] reports an instance that exits without `delete` within about a second.
#[async_trait]
pub trait Runtime: Send + Sync + std::fmt::Debug + 'static {
    /// `local` or `kube`.
    fn name(&self) -> &'static str;
    /// How instances are isolated, for status pages (`bubblewrap`, `none`, `kata-qemu`).
    fn isolation(&self) -> String;
    /// Starts an instance running `otm shim`.
    async fn create(&self, spec: &InstanceSpec) -> Result<RuntimeInstance>;
    /// Every instance this runtime manages, alive or not.
    async fn list(&self) -> Result<Vec<RuntimeInstance>>;
    /// Stops and removes an instance; gone already is fine.
    async fn delete(&self, id: &InstanceId) -> Result<()>;
    /// Instances that exit on their own.
    fn events(&self) -> BoxStream<'static, RuntimeEvent>;
}
