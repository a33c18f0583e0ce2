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
    /// What the instance may use.
    pub limits: ResourceLimits,
    /// The agent profile it will run, when known (`None` for a warm instance): runtimes that
    /// pick an image per profile use it.
    pub profile: Option<String>,
}

/// What one instance may use. Defaults are those of the system otm replaces: requests 200m CPU,
/// limits 1 CPU and 2 GiB; 512 processes; a 1 GiB state directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ResourceLimits {
    /// Memory limit in bytes (the OOM killer acts inside the instance beyond it).
    pub memory_bytes: u64,
    /// CPU limit in thousandths of a core.
    pub cpu_millis: u32,
    /// CPU share when the machine is busy, in thousandths of a core.
    pub cpu_request_millis: u32,
    /// Processes and threads.
    pub pids: u32,
    /// Bytes on disk under the instance's state, home and temporary directories.
    pub disk_bytes: u64,
}

impl Default for ResourceLimits {
    fn default() -> Self {
        ResourceLimits {
            memory_bytes: 2 << 30,
            cpu_millis: 1000,
            cpu_request_millis: 200,
            pids: 512,
            disk_bytes: 1 << 30,
        }
    }
}

/// A limit that stopped an instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitKind {
    Memory,
    Pids,
    Disk,
}

impl LimitKind {
    /// The lower-case name used in metrics and answers.
    pub fn as_str(self) -> &'static str {
        match self {
            LimitKind::Memory => "memory",
            LimitKind::Pids => "pids",
            LimitKind::Disk => "disk",
        }
    }
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
    /// The instance ran into one of its limits and its processes were killed; its directory is
    /// kept until the orchestrator saved its state and deletes it.
    LimitExceeded {
        id: InstanceId,
        limit: LimitKind,
        detail: String,
    },
    /// Someone else began to remove the instance (a pod evicted, a node drained): it still runs
    /// for its grace period, time enough for a final snapshot.
    Terminating { id: InstanceId, detail: String },
}

/// Leader election where the runtime has its own means (a Kubernetes Lease). Contract: at most
/// one candidate of a name gets `true` from [`LeaderElector::acquire_or_renew`] within a lease
/// duration; a holder that stops renewing loses the lead after it.
#[async_trait]
pub trait LeaderElector: Send + Sync + std::fmt::Debug + 'static {
    /// What is elected on, for logs.
    fn describe(&self) -> String;
    /// Takes the lead or keeps it; false while another candidate holds it.
    async fn acquire_or_renew(&self) -> Result<bool>;
    /// Gives the lead up at once, if held.
    async fn release(&self) -> Result<()>;
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
    /// How instances are limited, for status pages (`cgroup v1`, `cgroup v2`, `none (why)`).
    fn limits(&self) -> String {
        "none".into()
    }
    /// Starts an instance running `otm shim`.
    async fn create(&self, spec: &InstanceSpec) -> Result<RuntimeInstance>;
    /// Every instance this runtime manages, alive or not.
    async fn list(&self) -> Result<Vec<RuntimeInstance>>;
    /// Stops and removes an instance; gone already is fine.
    async fn delete(&self, id: &InstanceId) -> Result<()>;
    /// Instances that exit on their own.
    fn events(&self) -> BoxStream<'static, RuntimeEvent>;
    /// Changes the limits of a running instance (a warm instance claimed by a tenant).
    async fn set_limits(&self, _id: &InstanceId, _limits: &ResourceLimits) -> Result<()> {
        Ok(())
    }
    /// Packs an instance's state directory from outside the instance, for when its shim is dead
    /// or could not snapshot, streaming a tar + zstd archive with only regular files,
    /// directories and symbolic links, within `max_bytes` unpacked, into the local file `into`
    /// (created or truncated). False, and nothing written, when this runtime cannot reach the
    /// state from outside (pods), or the instance has no state directory.
    async fn salvage_state(
        &self,
        _id: &InstanceId,
        _skip: &[String],
        _max_bytes: u64,
        _into: &std::path::Path,
    ) -> Result<bool> {
        Ok(false)
    }
    /// Removes what the runtime keeps beside its instances and what no instance owns any more,
    /// when older than `grace` (the `kube` runtime's per-instance Secrets whose pod is gone);
    /// the reconciler's full pass calls it. Returns how many objects went.
    async fn collect_garbage(&self, _grace: std::time::Duration) -> Result<usize> {
        Ok(0)
    }
    /// Marks a warm instance as claimed by `tenant`, atomically against other claimers of the
    /// same instance: false when another claimed it first (or it is gone), and the caller takes
    /// another instance or creates one. Runtimes whose registry claim is enough return true.
    async fn claim(&self, _id: &InstanceId, _tenant: &TenantId) -> Result<bool> {
        Ok(true)
    }
    /// The runtime's own leader election for the candidate `holder`, where it has one;
    /// otherwise the coordinator's lease is used.
    fn leader_elector(&self, _holder: &str) -> Option<std::sync::Arc<dyn LeaderElector>> {
        None
    }
}
