//! The [`StateStore`] trait: immutable, checksummed snapshots of tenants' state directories.

use crate::{Result, SnapshotId, TenantId};
use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// What is known of one stored snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    pub id: SnapshotId,
    pub tenant: TenantId,
    /// Archive size in bytes.
    pub size: u64,
    /// Hex SHA-256 of the archive.
    pub sha256: String,
    pub created_at_ms: i64,
    /// Why it was taken: `final`, `periodic`, `manual`, `crash`.
    pub reason: String,
}

/// Snapshot storage. Contract:
/// - [`StateStore::put`] writes the archive under a key no other snapshot uses, then its metadata;
///   it does not change the head. A crash part-way leaves the head as it was.
/// - [`StateStore::publish`] points the head at a stored snapshot, atomically.
/// - [`StateStore::get`] verifies the SHA-256 and fails with [`crate::Error::Corrupt`] on mismatch.
#[async_trait]
pub trait StateStore: Send + Sync + std::fmt::Debug + 'static {
    /// Stores an archive and returns its metadata.
    async fn put(
        &self,
        tenant: &TenantId,
        id: &SnapshotId,
        archive: Bytes,
        reason: &str,
    ) -> Result<SnapshotMeta>;
    /// Makes `id` the tenant's head snapshot.
    async fn publish(&self, tenant: &TenantId, id: &SnapshotId) -> Result<()>;
    /// The head snapshot's metadata.
    async fn head(&self, tenant: &TenantId) -> Result<Option<SnapshotMeta>>;
    /// All stored snapshots, oldest first.
    async fn list(&self, tenant: &TenantId) -> Result<Vec<SnapshotMeta>>;
    /// A snapshot's archive, checksum verified.
    async fn get(&self, tenant: &TenantId, id: &SnapshotId) -> Result<Bytes>;
    /// Deletes one snapshot (archive and metadata); the head is never deleted.
    async fn delete(&self, tenant: &TenantId, id: &SnapshotId) -> Result<()>;
}
