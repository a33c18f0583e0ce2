//! otm's core: the words of the domain and the traits every backend implements.
//!
//! This crate holds no network code. Backends live in `otm-store` and `otm-runtime`; the
//! server in `otm-server` wires them through [`Context`](https://docs.rs) structs of its own.
//!
//! # Layout
//! - [`backoff`]: [`Backoff`], the one retry policy.
//! - [`id`]: tenant, instance and snapshot identifiers, random tokens.
//! - [`secret`]: [`Secret`], a string that never prints.
//! - [`tenant`]: the tenant record and its status.
//! - [`instance`]: the instance record and the endpoint a dispatcher delivers to.
//! - [`inbox`]: accepted updates waiting for delivery.
//! - [`registry`]: the [`Registry`], source of truth for all of the above: [`TenantStore`],
//!   [`InstanceStore`] and [`Inbox`] in one.
//! - [`coordinator`]: the [`Coordinator`] trait: endpoint cache, fenced locks, leases, notifications.
//! - [`state`]: the [`StateStore`] trait for snapshots.
//! - [`runtime`]: the [`Runtime`] trait that creates, lists, watches and deletes instances.
//! - [`shim_api`]: the wire types of the shim's control API.
//! - [`admin_api`]: the wire types of the admin API, and the error shape both APIs answer.
//! - [`audit`]: the [`AdminStore`]: the audit trail of admin writes and named admin tokens.
//! - [`error`]: the one error type every trait returns.

pub mod admin_api;
pub mod audit;
pub mod backoff;
pub mod base64;
pub mod coordinator;
pub mod error;
pub mod id;
pub mod inbox;
pub mod instance;
pub mod quantity;
pub mod registry;
pub mod runtime;
pub mod secret;
pub mod shim_api;
pub mod state;
pub mod tenant;
pub mod time;

pub use audit::{AdminStore, AdminToken, AuditEntry};
pub use backoff::Backoff;
pub use coordinator::{Coordinator, Lease, Notification};
pub use error::{Error, Result};
pub use id::{InstanceId, SnapshotId, TenantId};
pub use inbox::{
    Appended, DeadLetters, DeliveryFailure, DeliveryOutcome, FailOutcome, InboxItem, InboxView,
};
pub use instance::{InstanceRecord, InstanceState};
pub use registry::{FleetSettings, Inbox, InstanceStore, Registry, TenantStore};
pub use runtime::{
    InstanceSpec, LeaderElector, LimitKind, ResourceLimits, Runtime, RuntimeEvent, RuntimeInstance,
};
pub use secret::Secret;
pub use state::{SnapshotMeta, StateStore};
pub use tenant::{DmPolicy, Tenant, TenantLimits, TenantStatus, check_allowed_user};
