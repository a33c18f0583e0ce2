//! [`ObjectStateStore`]: the [`StateStore`] over any `object_store` backend: a local directory,
//! S3 and S3-compatible stores (cargo feature `s3`), GCS or Azure when their features are added.
//!
//! Layout under the optional key prefix:
//!
//! ```text
//! tenants/{tenant}/snapshots/{id}.tar.zst   the archive, written first, never overwritten
//! tenants/{tenant}/snapshots/{id}.json      its SnapshotMeta, written after the archive
//! tenants/{tenant}/head.json                {"id": "..."}: the snapshot to restore
//! tombstones/{name}/...                      a deleted tenant's keys, kept on request
//! ```
//!
//! A crash part-way through a put leaves at most an archive without metadata, which no reader
//! sees; the head moves only on publish, with one atomic object write, conditional on the head
//! as it was read where the store supports conditional writes (S3: `If-Match`/`If-None-Match`).
//!
//! Archives are streamed, never held whole: one up to 8 MiB goes up in a single request, a larger
//! one as a multipart upload (5 MiB parts, two in flight; an upload that fails is aborted), and a
//! download streams into a local file with its size and SHA-256 checked as it arrives.

use async_trait::async_trait;
use bytes::Bytes;
use futures::TryStreamExt;
use futures::stream::{self, StreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{
    ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion, WriteMultipart,
};
use otm_core::{Error, Result, SnapshotId, SnapshotMeta, StateStore, TenantId};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BACKEND: &str = "object_store";
/// Metadata reads in flight at once while listing.
const LIST_CONCURRENCY: usize = 8;

/// Snapshots as objects in an [`ObjectStore`].
#[derive(Debug, Clone)]
pub struct ObjectStateStore {
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
}

/// `head.json`.
#[derive(Serialize, Deserialize)]
struct Head {
    id: SnapshotId,
}

impl ObjectStateStore {
    /// Snapshots in `store`, at its root.
    pub fn new(store: Arc<dyn ObjectStore>) -> Self {
        ObjectStateStore {
            store,
            prefix: ObjectPath::default(),
        }
    }

    /// Snapshots in the local directory `dir`, created if missing. Every write is fsync'd.
    pub fn local(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| {
            Error::generic(
                BACKEND,
                format!("cannot create the state directory {}: {e}", dir.display()),
            )
        })?;
        let fs = object_store::local::LocalFileSystem::new_with_prefix(dir)
            .map_err(|e| Error::generic(BACKEND, e))?
            .with_fsync(true);
        Ok(Self::new(Arc::new(fs)))
    }

    /// Puts every key under `prefix` (`a/b`), so several fleets can share one bucket.
    pub fn with_prefix(mut self, prefix: &str) -> Result<Self> {
        self.prefix = ObjectPath::parse(prefix.trim_matches('/')).map_err(|e| {
            Error::invalid(format!("`{prefix}` is not a valid object key prefix: {e}"))
        })?;
        Ok(self)
    }

    /// The underlying object store (for operator tools and tests).
    pub fn object_store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    fn tenant_dir(&self, tenant: &TenantId) -> ObjectPath {
        self.prefix.clone().join("tenants").join(tenant.as_str())
    }

    fn snapshots_dir(&self, tenant: &TenantId) -> ObjectPath {
        self.tenant_dir(tenant).join("snapshots")
    }

    /// Where a snapshot's archive lives.
    pub fn archive_path(&self, tenant: &TenantId, id: &SnapshotId) -> ObjectPath {
        self.snapshots_dir(tenant).join(format!("{id}.tar.zst"))
    }

    /// Where a snapshot's metadata lives.
    pub fn meta_path(&self, tenant: &TenantId, id: &SnapshotId) -> ObjectPath {
        self.snapshots_dir(tenant).join(format!("{id}.json"))
    }

    /// Where a deleted tenant's keys go when they are kept.
    fn tombstone_dir(&self, name: &str) -> Result<ObjectPath> {
        let part = object_store::path::PathPart::parse(name)
            .ok()
            .filter(|_| !name.is_empty() && !name.contains('/'))
            .ok_or_else(|| Error::invalid(format!("`{name}` is not a valid tombstone name")))?;
        Ok(self.prefix.clone().join("tombstones").join(part))
    }

    /// Every object under a tenant's keys, the head (if any) first.
    async fn tenant_objects(&self, tenant: &TenantId) -> Result<Vec<ObjectPath>> {
        let dir = self.tenant_dir(tenant);
        let mut objects: Vec<ObjectPath> =
            match self.store.list(Some(&dir)).try_collect::<Vec<_>>().await {
                Ok(objects) => objects.into_iter().map(|o| o.location).collect(),
                Err(object_store::Error::NotFound { .. }) => Vec::new(),
                Err(e) => return Err(store_error(e)),
            };
        let head = self.head_path(tenant);
        objects.sort_by_key(|p| (*p != head, p.clone()));
        Ok(objects)
    }

    /// Where a tenant's head record lives.
    pub fn head_path(&self, tenant: &TenantId) -> ObjectPath {
        self.tenant_dir(tenant).join("head.json")
    }

    /// The object at `path`, or `None` if there is none.
    async fn read(&self, path: &ObjectPath) -> Result<Option<Bytes>> {
        match self.store.get(path).await {
            Ok(got) => got.bytes().await.map(Some).map_err(store_error),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(store_error(e)),
        }
    }

    /// A snapshot's metadata, checked against where it was found.
    async fn read_meta(&self, tenant: &TenantId, id: &SnapshotId) -> Result<Option<SnapshotMeta>> {
        let path = self.meta_path(tenant, id);
        let Some(raw) = self.read(&path).await? else {
            return Ok(None);
        };
        let meta: SnapshotMeta = serde_json::from_slice(&raw).map_err(|e| {
            corrupt(
                &path,
                format!("the snapshot metadata is not valid JSON: {e}"),
            )
        })?;
        if &meta.id != id || &meta.tenant != tenant {
            return Err(corrupt(
                &path,
                format!(
                    "it describes snapshot {} of tenant {}",
                    meta.id, meta.tenant
                ),
            ));
        }
        Ok(Some(meta))
    }

    /// The head's snapshot id, if the tenant has a head.
    async fn head_id(&self, tenant: &TenantId) -> Result<Option<SnapshotId>> {
        let path = self.head_path(tenant);
        let Some(raw) = self.read(&path).await? else {
            return Ok(None);
        };
        let head: Head = serde_json::from_slice(&raw)
            .map_err(|e| corrupt(&path, format!("the head record is not valid JSON: {e}")))?;
        // Checked again: the id becomes part of an object key.
        SnapshotId::parse(head.id.as_str())
            .map(Some)
            .map_err(|e| corrupt(&path, e))
    }
}

fn store_error(e: object_store::Error) -> Error {
    match e {
        object_store::Error::NotFound { path, .. } => Error::not_found(format!("object {path}")),
        object_store::Error::AlreadyExists { path, .. } => Error::AlreadyExists {
            what: format!("object {path}"),
        },
        e => Error::generic(BACKEND, e),
    }
}

fn corrupt(path: &ObjectPath, message: impl std::fmt::Display) -> Error {
    Error::Corrupt {
        what: path.to_string(),
        message: message.to_string(),
    }
}

/// Archives up to this size go up in one request; larger ones as a multipart upload.
const SINGLE_PUT_MAX: u64 = 8 << 20;
/// Part size of a multipart upload (S3's minimum is 5 MiB).
const PART_SIZE: usize = 5 << 20;
/// Parts uploading at once; with [`PART_SIZE`] this bounds an upload's memory.
const PARTS_IN_FLIGHT: usize = 2;
/// Bytes read from the local file at a time.
const READ_CHUNK: usize = 1 << 20;

fn local_error(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::generic(
        BACKEND,
        format!("cannot {what} the local file {}: {e}", path.display()),
    )
}

/// The next chunk of `file`, empty at its end.
async fn next_chunk(file: &mut tokio::fs::File, path: &Path) -> Result<Bytes> {
    let mut buf = bytes::BytesMut::with_capacity(READ_CHUNK);
    while buf.len() < READ_CHUNK {
        if file
            .read_buf(&mut buf)
            .await
            .map_err(|e| local_error("read", path, e))?
            == 0
        {
            break;
        }
    }
    Ok(buf.freeze())
}

impl ObjectStateStore {
    /// Uploads `file` to `path` as a new object and returns its size and SHA-256.
    async fn upload(
        &self,
        path: &ObjectPath,
        file: &mut tokio::fs::File,
        local: &Path,
        len: u64,
        what: impl Fn() -> String,
    ) -> Result<(u64, String)> {
        let already = || Error::AlreadyExists { what: what() };
        let mut hasher = Sha256::new();
        let mut size: u64 = 0;
        if len <= SINGLE_PUT_MAX {
            let mut payload = Vec::new();
            loop {
                let chunk = next_chunk(file, local).await?;
                if chunk.is_empty() {
                    break;
                }
                hasher.update(&chunk);
                size += chunk.len() as u64;
                payload.push(chunk);
            }
            let payload = PutPayload::from_iter(payload);
            // Create, not overwrite: an archive, once written, never changes under its metadata.
            let create = PutOptions {
                mode: PutMode::Create,
                ..Default::default()
            };
            match self.store.put_opts(path, payload.clone(), create).await {
                Ok(_) => {}
                Err(object_store::Error::AlreadyExists { .. }) => return Err(already()),
                // A store without conditional writes: snapshot ids are unique by construction.
                Err(object_store::Error::NotImplemented { .. }) => {
                    self.store.put(path, payload).await.map_err(store_error)?;
                }
                Err(e) => return Err(store_error(e)),
            }
            return Ok((size, hex::encode(hasher.finalize())));
        }
        // Multipart uploads cannot be conditional; snapshot ids are unique by construction, and
        // this check catches a caller that reuses one.
        match self.store.head(path).await {
            Ok(_) => return Err(already()),
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(store_error(e)),
        }
        let upload = self.store.put_multipart(path).await.map_err(store_error)?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        let streamed: Result<()> = async {
            loop {
                let chunk = next_chunk(file, local).await?;
                if chunk.is_empty() {
                    return Ok(());
                }
                hasher.update(&chunk);
                size += chunk.len() as u64;
                writer
                    .wait_for_capacity(PARTS_IN_FLIGHT)
                    .await
                    .map_err(store_error)?;
                writer.put(chunk);
            }
        }
        .await;
        match streamed {
            Ok(()) => {
                writer.finish().await.map_err(store_error)?;
            }
            Err(e) => {
                if let Err(abort) = writer.abort().await {
                    tracing::warn!(object = %path, error = %abort, "could not abort a multipart upload");
                }
                return Err(e);
            }
        }
        Ok((size, hex::encode(hasher.finalize())))
    }

    /// Streams the object at `path` into `file`, checking it against `meta` as it goes.
    async fn download(
        &self,
        path: &ObjectPath,
        meta: &SnapshotMeta,
        file: &mut tokio::fs::File,
        local: &Path,
    ) -> Result<()> {
        let got = match self.store.get(path).await {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(corrupt(
                    path,
                    "the archive is missing although its metadata exists; restore an older snapshot",
                ));
            }
            Err(e) => return Err(store_error(e)),
        };
        let mut stream = got.into_stream();
        let mut hasher = Sha256::new();
        let mut size: u64 = 0;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(store_error)?;
            size += chunk.len() as u64;
            if size > meta.size {
                tracing::warn!(tenant = %meta.tenant, snapshot = %meta.id, "a snapshot is larger than its metadata says");
                return Err(corrupt(
                    path,
                    format!(
                        "the archive holds more than the {} bytes its metadata says; the stored \
                         archive is damaged, restore an older snapshot",
                        meta.size
                    ),
                ));
            }
            hasher.update(&chunk);
            file.write_all(&chunk)
                .await
                .map_err(|e| local_error("write", local, e))?;
        }
        file.flush()
            .await
            .map_err(|e| local_error("write", local, e))?;
        let sha256 = hex::encode(hasher.finalize());
        if size != meta.size || sha256 != meta.sha256 {
            tracing::warn!(tenant = %meta.tenant, snapshot = %meta.id, "a snapshot failed its checksum");
            return Err(corrupt(
                path,
                format!(
                    "checksum mismatch: the archive has {size} bytes with SHA-256 {sha256}, its metadata says {} bytes \
                     with SHA-256 {}; the stored archive is damaged, restore an older snapshot",
                    meta.size, meta.sha256
                ),
            ));
        }
        Ok(())
    }
}

#[async_trait]
impl StateStore for ObjectStateStore {
    async fn put(
        &self,
        tenant: &TenantId,
        id: &SnapshotId,
        archive: &Path,
        reason: &str,
    ) -> Result<SnapshotMeta> {
        let mut file = tokio::fs::File::open(archive)
            .await
            .map_err(|e| local_error("open", archive, e))?;
        let len = file
            .metadata()
            .await
            .map_err(|e| local_error("read", archive, e))?
            .len();
        let path = self.archive_path(tenant, id);
        let (size, sha256) = self
            .upload(&path, &mut file, archive, len, || {
                format!("snapshot {id} of tenant {tenant}")
            })
            .await?;
        let meta = SnapshotMeta {
            id: id.clone(),
            tenant: tenant.clone(),
            size,
            sha256,
            created_at_ms: otm_core::time::now_ms(),
            reason: reason.to_owned(),
        };
        // The metadata last: until it exists, no reader sees the archive.
        let json = serde_json::to_vec(&meta).map_err(|e| Error::generic(BACKEND, e))?;
        self.store
            .put(&self.meta_path(tenant, id), PutPayload::from(json))
            .await
            .map_err(store_error)?;
        tracing::debug!(%tenant, snapshot = %id, size = meta.size, reason, "stored a snapshot");
        Ok(meta)
    }

    async fn publish(&self, tenant: &TenantId, id: &SnapshotId) -> Result<()> {
        if self.read_meta(tenant, id).await?.is_none() {
            return Err(Error::not_found(format!(
                "snapshot {id} of tenant {tenant}"
            )));
        }
        let json =
            serde_json::to_vec(&Head { id: id.clone() }).map_err(|e| Error::generic(BACKEND, e))?;
        let path = self.head_path(tenant);
        // Conditional on the head as read here (its e-tag, or its absence), where the store
        // supports it: of two racing publishers, one gets a Conflict instead of both "winning".
        let mode = match self.store.head(&path).await {
            Ok(current) if current.e_tag.is_some() => PutMode::Update(UpdateVersion {
                e_tag: current.e_tag,
                version: current.version,
            }),
            Ok(_) => PutMode::Overwrite,
            Err(object_store::Error::NotFound { .. }) => PutMode::Create,
            Err(e) => return Err(store_error(e)),
        };
        let payload = PutPayload::from(json);
        let opts = PutOptions {
            mode,
            ..Default::default()
        };
        match self.store.put_opts(&path, payload.clone(), opts).await {
            Ok(_) => {}
            // A store without conditional writes (the local one has no Update): plain overwrite.
            Err(object_store::Error::NotImplemented { .. }) => {
                self.store.put(&path, payload).await.map_err(store_error)?;
            }
            Err(
                object_store::Error::Precondition { .. }
                | object_store::Error::AlreadyExists { .. },
            ) => {
                return Err(Error::conflict(format!(
                    "the head of tenant {tenant} changed while snapshot {id} was being published; \
                     another writer published at the same time"
                )));
            }
            Err(e) => return Err(store_error(e)),
        }
        tracing::debug!(%tenant, snapshot = %id, "published a snapshot");
        Ok(())
    }

    async fn head(&self, tenant: &TenantId) -> Result<Option<SnapshotMeta>> {
        let Some(id) = self.head_id(tenant).await? else {
            return Ok(None);
        };
        match self.read_meta(tenant, &id).await? {
            Some(meta) => Ok(Some(meta)),
            None => Err(corrupt(
                &self.head_path(tenant),
                format!(
                    "the head points at snapshot {id}, which is missing; publish another snapshot"
                ),
            )),
        }
    }

    async fn list(&self, tenant: &TenantId) -> Result<Vec<SnapshotMeta>> {
        let dir = self.snapshots_dir(tenant);
        let objects: Vec<_> = match self.store.list(Some(&dir)).try_collect().await {
            Ok(objects) => objects,
            Err(object_store::Error::NotFound { .. }) => Vec::new(),
            Err(e) => return Err(store_error(e)),
        };
        let mut ids: Vec<SnapshotId> = objects
            .iter()
            .filter_map(|o| o.location.filename()?.strip_suffix(".json"))
            .filter_map(|stem| SnapshotId::parse(stem).ok())
            .collect();
        ids.sort();
        let metas: Vec<Option<SnapshotMeta>> = stream::iter(ids)
            .map(|id| async move { self.read_meta(tenant, &id).await })
            .buffered(LIST_CONCURRENCY)
            .try_collect()
            .await?;
        // Ids start with their creation time, so id order is age order.
        Ok(metas.into_iter().flatten().collect())
    }

    async fn get(&self, tenant: &TenantId, id: &SnapshotId, into: &Path) -> Result<SnapshotMeta> {
        let Some(meta) = self.read_meta(tenant, id).await? else {
            return Err(Error::not_found(format!(
                "snapshot {id} of tenant {tenant}"
            )));
        };
        let path = self.archive_path(tenant, id);
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(into)
            .await
            .map_err(|e| local_error("create", into, e))?;
        let got = self.download(&path, &meta, &mut file, into).await;
        drop(file);
        if got.is_err() {
            // Nothing half-written, or unchecked, is left where the caller looks.
            if let Err(e) = tokio::fs::remove_file(into).await
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(file = %into.display(), error = %e, "could not remove a failed download");
            }
        }
        got.map(|()| meta)
    }

    async fn delete(&self, tenant: &TenantId, id: &SnapshotId) -> Result<()> {
        if self.head_id(tenant).await?.as_ref() == Some(id) {
            return Err(Error::conflict(format!(
                "snapshot {id} is the head of tenant {tenant}; publish another snapshot before deleting it"
            )));
        }
        // Metadata first: a crash in between leaves an archive nobody lists, never metadata
        // pointing at nothing.
        let meta_path = self.meta_path(tenant, id);
        // Some stores answer a delete of a missing object with success: ask first.
        let had_meta = match self.store.head(&meta_path).await {
            Ok(_) => true,
            Err(object_store::Error::NotFound { .. }) => false,
            Err(e) => return Err(store_error(e)),
        };
        if had_meta {
            match self.store.delete(&meta_path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(store_error(e)),
            }
        }
        match self.store.delete(&self.archive_path(tenant, id)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(store_error(e)),
        }
        if !had_meta {
            return Err(Error::not_found(format!(
                "snapshot {id} of tenant {tenant}"
            )));
        }
        Ok(())
    }

    async fn delete_tenant(&self, tenant: &TenantId) -> Result<u64> {
        let objects = self.tenant_objects(tenant).await?;
        let snapshots = count_snapshots(&objects);
        for path in &objects {
            match self.store.delete(path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(store_error(e)),
            }
        }
        tracing::info!(%tenant, snapshots, "deleted a tenant's snapshots");
        Ok(snapshots)
    }

    async fn tombstone(&self, tenant: &TenantId, name: &str) -> Result<u64> {
        let to = self.tombstone_dir(name)?;
        let from = self.tenant_dir(tenant);
        let objects = self.tenant_objects(tenant).await?;
        let snapshots = count_snapshots(&objects);
        // Copies first, all of them: a failure part-way leaves the tenant's keys whole.
        let mut moved = Vec::with_capacity(objects.len());
        for path in &objects {
            let rel = path.prefix_match(&from).into_iter().flatten();
            let target = rel.fold(to.clone(), |p, part| p.join(part));
            self.store.copy(path, &target).await.map_err(store_error)?;
            moved.push(path);
        }
        for path in moved {
            match self.store.delete(path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(store_error(e)),
            }
        }
        tracing::info!(%tenant, snapshots, tombstone = name, "moved a deleted tenant's snapshots to a tombstone");
        Ok(snapshots)
    }
}

/// How many snapshots (metadata objects) are among a tenant's objects.
fn count_snapshots(objects: &[ObjectPath]) -> u64 {
    objects
        .iter()
        .filter(|p| {
            p.filename()
                .is_some_and(|f| f.ends_with(".json") && f != "head.json")
        })
        .count() as u64
}
