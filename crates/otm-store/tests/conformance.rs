//! The conformance suites against the embedded backends: SQLite in a temporary directory, the
//! in-process coordinator, and a local object store in a temporary directory.

use otm_core::{Appended, Error, Inbox, Registry, SnapshotId, StateStore, TenantId};
use otm_store::{MemoryCoordinator, ObjectStateStore, SqliteRegistry, conformance};
use std::sync::Arc;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_registry() {
    let dir = tempfile::tempdir().unwrap();
    let r = SqliteRegistry::open(&dir.path().join("registry.db")).unwrap();
    conformance::registry_suite(Arc::new(r)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_coordinator() {
    conformance::coordinator_suite(Arc::new(MemoryCoordinator::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_state_store() {
    let dir = tempfile::tempdir().unwrap();
    let s = ObjectStateStore::local(&dir.path().join("state")).unwrap();
    conformance::object_state_store_suite(Arc::new(s)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_state_store_with_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let s = ObjectStateStore::local(dir.path())
        .unwrap()
        .with_prefix("fleet-a/")
        .unwrap();
    conformance::object_state_store_suite(Arc::new(s)).await;
    assert!(
        dir.path().join("fleet-a/tenants").is_dir(),
        "keys live under the prefix"
    );
}

/// A byte flipped in the file on disk, not through the object store, is caught too.
#[tokio::test]
async fn local_state_store_catches_a_damaged_file() {
    let dir = tempfile::tempdir().unwrap();
    let s = ObjectStateStore::local(dir.path()).unwrap();
    let t = TenantId::parse("alice").unwrap();
    let id = SnapshotId::new_now();
    let archive = dir.path().join("archive");
    std::fs::write(&archive, b"state of alice").unwrap();
    s.put(&t, &id, &archive, "final").await.unwrap();
    let file = dir
        .path()
        .join(format!("tenants/alice/snapshots/{id}.tar.zst"));
    let mut data = std::fs::read(&file).unwrap();
    data[0] ^= 0x80;
    std::fs::write(&file, data).unwrap();
    let into = dir.path().join("restored");
    let err = s.get(&t, &id, &into).await.unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err:?}");
    assert!(!into.exists(), "nothing unchecked is left behind");
    assert!(
        err.to_string().contains("restore an older snapshot"),
        "{err}"
    );
}

/// 2,000 updates from 50 concurrent tasks: each stored once, in a consistent order, with no
/// errors, and the writer batched them into fewer commits than jobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn sqlite_concurrent_appends_use_group_commit() {
    let dir = tempfile::tempdir().unwrap();
    let r = Arc::new(SqliteRegistry::open(&dir.path().join("registry.db")).unwrap());
    let before = r.write_stats();
    conformance::inbox_stress(r.clone(), 5, 50, 40).await;
    let stats = r.write_stats();
    let jobs = stats.jobs - before.jobs;
    let commits = stats.commits - before.commits;
    // 5 tenant creations, 2,000 appends, 700 duplicate appends, 5 deletions.
    assert_eq!(jobs, 5 + 2_000 + 700 + 5, "{stats:?}");
    assert!(
        commits < jobs / 2,
        "group commit should batch concurrent writes: {commits} commits for {jobs} jobs"
    );
}

/// Everything answered before a drop is on disk for the next open.
#[tokio::test]
async fn sqlite_keeps_answered_writes_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.db");
    let t = TenantId::parse("bob").unwrap();
    {
        let r: Arc<dyn Registry> = Arc::new(SqliteRegistry::open(&path).unwrap());
        r.create_tenant(&otm_core::Tenant::new(t.clone(), "reference", None))
            .await
            .unwrap();
        for u in 0..100 {
            assert!(matches!(
                r.inbox_append(&t, u, b"{}").await.unwrap(),
                Appended::Stored { .. }
            ));
        }
    }
    let r = SqliteRegistry::open(&path).unwrap();
    assert_eq!(r.inbox_depth(&t).await.unwrap(), 100);
    assert_eq!(
        r.inbox_append(&t, 99, b"{}").await.unwrap(),
        Appended::Duplicate
    );
}
