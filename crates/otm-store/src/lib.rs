//! otm's storage backends: the registry, the coordinator and the state store, plus the
//! conformance suites every backend of those traits must pass.
//!
//! Callers pick a backend by URL through [`open`] and use it as `Arc<dyn Trait>`; nothing outside
//! this crate names a concrete backend type except tests.
//!
//! # Layout
//! - [`sqlite`]: [`SqliteRegistry`], the embedded [`otm_core::Registry`]: one SQLite file, one
//!   writer thread with group commit, a small pool of read-only connections.
//! - `postgres` (cargo feature `postgres`): `PostgresRegistry`, the [`otm_core::Registry`] that
//!   replicas share: PostgreSQL, one atomic statement per write, a small reconnecting pool.
//! - `dynamodb` (cargo feature `dynamodb`): `DynamoRegistry`, the [`otm_core::Registry`] on
//!   DynamoDB: a hand-written, SigV4-signed JSON API client; conditional writes and transactions.
//! - `aws_credentials` (with `dynamodb` or `s3`): `AwsCredentialsProvider`, the AWS credential
//!   chain both use: the environment, web identity (IRSA), a container endpoint (EKS Pod
//!   Identity) and the instance metadata service, cached and refreshed before expiry.
//! - [`memory`]: [`MemoryCoordinator`], the in-process [`otm_core::Coordinator`].
//! - `redis` (cargo feature `redis`): `RedisCoordinator`, the [`otm_core::Coordinator`] that
//!   replicas share: a Redis cache, Lua-scripted fenced locks, pub/sub notifications.
//! - [`objstore`]: [`ObjectStateStore`], the [`otm_core::StateStore`] over any `object_store`
//!   backend: a local directory, or S3 and S3-compatible stores (cargo feature `s3`).
//! - [`secrets`]: secrets at rest: the key file, [`SealedRegistry`] (tenants' secrets encrypted
//!   in any registry, shim tokens derived) and [`SignedCoordinator`] (signed endpoint cache).
//! - [`wrap`]: registry wrappers: [`Metered`] counts and times calls, [`Faulty`] makes chosen
//!   calls fail as an unreachable backend would.
//! - [`open`]: picks a backend from a URL and names the ones missing from this build.
//! - `record`: what the three registries share: their errors, row checks and conversions.
//! - `conformance` (cargo feature `conformance`, for tests only): the shared test suites, one per
//!   trait.

#[cfg(feature = "aws-credentials")]
pub mod aws_credentials;
#[cfg(feature = "conformance")]
pub mod conformance;
#[cfg(feature = "dynamodb")]
pub mod dynamodb;
pub mod memory;
pub mod objstore;
pub mod open;
#[cfg(feature = "postgres")]
pub mod postgres;
pub(crate) mod record;
#[cfg(feature = "redis")]
pub mod redis;
pub mod secrets;
pub mod sqlite;
pub mod wrap;

#[cfg(feature = "redis")]
pub use self::redis::RedisCoordinator;
#[cfg(feature = "dynamodb")]
pub use dynamodb::DynamoRegistry;
pub use memory::MemoryCoordinator;
pub use objstore::ObjectStateStore;
pub use open::{
    CoordinatorBackend, RegistryBackend, StateStoreBackend, open_coordinator, open_registry,
    open_state_store,
};
#[cfg(feature = "postgres")]
pub use postgres::PostgresRegistry;
pub use secrets::{SealedRegistry, SecretKeys, SignedCoordinator};
pub use sqlite::{SqliteRegistry, WriteCounters, WriteStats};
pub use wrap::{FaultHandle, Faulty, Metered, RegistryMetrics, RegistryOp};
