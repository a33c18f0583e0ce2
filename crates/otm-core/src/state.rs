//! The [`StateStore`] trait: immutable, checksummed snapshots of tenants' state directories.

use crate::{Result, SnapshotId, TenantId};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::path::Path;

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

/// Snapshot storage. Archives move between files and the store as streams, never whole in
/// memory. Contract:
/// - [`StateStore::put`] streams the archive file under a key no other snapshot uses, then writes
///   its metadata, with the size and SHA-256 of the bytes it uploaded; it does not change the
///   head. A failure or crash part-way leaves the head as it was, and at most an archive without
///   metadata, which no reader sees.
/// - [`StateStore::publish`] points the head at a stored snapshot, atomically.
/// - [`StateStore::get`] streams the archive into a file, checking its size and SHA-256 as it
///   goes; on a mismatch it fails with [`crate::Error::Corrupt`], and on any failure it leaves
///   no file behind at that path.
#[async_trait]
pub trait StateStore: Send + Sync + std::fmt::Debug + 'static {
    /// Stores the archive in the local file `archive` and returns its metadata.
    async fn put(
        &self,
        tenant: &TenantId,
        id: &SnapshotId,
        archive: &Path,
        reason: &str,
    ) -> Result<SnapshotMeta>;
    /// Makes `id` the tenant's head snapshot.
    async fn publish(&self, tenant: &TenantId, id: &SnapshotId) -> Result<()>;
    /// The head snapshot's metadata.
    async fn head(&self, tenant: &TenantId) -> Result<Option<SnapshotMeta>>;
    /// All stored snapshots, oldest first.
    async fn list(&self, tenant: &TenantId) -> Result<Vec<SnapshotMeta>>;
    /// Writes a snapshot's archive into the local file `into` (created, or truncated; mode 0600),
    /// checksum verified, and returns its metadata.
    async fn get(&self, tenant: &TenantId, id: &SnapshotId, into: &Path) -> Result<SnapshotMeta>;
    /// Deletes one snapshot (archive and metadata); the head is never deleted.
    async fn delete(&self, tenant: &TenantId, id: &SnapshotId) -> Result<()>;
    /// Deletes everything stored for a tenant, head first (a reader sees no head rather than one
    /// pointing at nothing), then every snapshot; returns how many snapshots were removed. A
    /// tenant created again under the same id starts empty.
    async fn delete_tenant(&self, tenant: &TenantId) -> Result<u64>;
    /// Moves everything stored for a tenant under the tombstone `name`, where no tenant's
    /// reads ever look (a tenant created again under the same id starts empty); returns how
    /// many snapshots were moved. For operators who must keep a deleted tenant's data.
    async fn tombstone(&self, tenant: &TenantId, name: &str) -> Result<u64>;
}
