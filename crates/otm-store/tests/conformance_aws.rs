//! The conformance suites against DynamoDB and S3, or a stand-in that speaks their APIs (moto in
//! CI), whenever their URLs are set:
//!
//! - `OTM_TEST_DYNAMODB_URL`, e.g. `dynamodb://otm-test?endpoint=http://127.0.0.1:5055&region=us-east-1`:
//!   every test creates its own tables under the URL's prefix plus a random suffix (the suites
//!   touch the fleet settings and prune backend-wide), and deletes them afterwards.
//! - `OTM_TEST_S3_URL`, e.g. `s3://otm-test?endpoint=http://127.0.0.1:5055&allow_http=true`:
//!   every test works under a random key prefix of that bucket, created first when the endpoint
//!   is a plain-HTTP stand-in.
//!
//! Credentials and region come from the usual `AWS_*` variables.

#![cfg(any(feature = "dynamodb", feature = "s3"))]

use std::sync::Arc;

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// `url` with `suffix` appended to the part before the query.
fn with_suffix(url: &str, suffix: &str) -> String {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let base = base.trim_end_matches('/');
    if query.is_empty() {
        format!("{base}{suffix}")
    } else {
        format!("{base}{suffix}?{query}")
    }
}

#[cfg(feature = "dynamodb")]
mod dynamodb {
    use super::*;
    use otm_core::{
        Error, InstanceId, InstanceRecord, InstanceState, InstanceStore, Secret, Tenant, TenantId,
        TenantStore,
    };
    use otm_store::{DynamoRegistry, conformance};

    /// A registry on fresh tables, or `None` (and a note) when no DynamoDB is configured.
    async fn fresh(test: &str) -> Option<Arc<DynamoRegistry>> {
        let Some(url) = env("OTM_TEST_DYNAMODB_URL") else {
            println!("skipped: {test}: OTM_TEST_DYNAMODB_URL is not set");
            return None;
        };
        let url = with_suffix(&url, &format!("-{}", otm_core::id::random_hex(4)));
        let r = DynamoRegistry::open(&url)
            .await
            .expect("open the DynamoDB registry");
        r.create_tables().await.expect("create the tables");
        r.create_tables()
            .await
            .expect("creating them again is fine");
        Some(Arc::new(r))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn dynamodb_registry() {
        let Some(r) = fresh("dynamodb_registry").await else {
            return;
        };
        conformance::registry_suite(r.clone()).await;
        conformance::inbox_stress(r.clone(), 5, 25, 8).await;
        r.delete_tables().await.unwrap();
    }

    /// `open_registry` checks the tables, and with `create_tables=true` makes them.
    #[tokio::test]
    async fn dynamodb_open_checks_and_creates_tables() {
        let Some(url) = env("OTM_TEST_DYNAMODB_URL") else {
            println!(
                "skipped: dynamodb_open_checks_and_creates_tables: OTM_TEST_DYNAMODB_URL is not set"
            );
            return;
        };
        let url = with_suffix(&url, &format!("-{}", otm_core::id::random_hex(4)));
        let err = otm_store::open_registry(&url).await.unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("does not exist") && msg.contains("create_tables=true"),
            "a missing table is named, with how to create it: {msg}"
        );
        let sep = if url.contains('?') { '&' } else { '?' };
        let r = otm_store::open_registry(&format!("{url}{sep}create_tables=true"))
            .await
            .expect("open with create_tables=true");
        assert!(r.list_tenants().await.unwrap().is_empty());
        otm_store::open_registry(&url)
            .await
            .expect("the tables exist now");
        DynamoRegistry::open(&url)
            .await
            .unwrap()
            .delete_tables()
            .await
            .unwrap();
    }

    /// Like SQLite's `UNIQUE (tenant)`: a tenant is bound to at most one instance, and the
    /// lookups by tenant and by surrogate follow rebinding at once (no index lag).
    #[tokio::test]
    async fn dynamodb_instance_bindings_are_unique_and_consistent() {
        let Some(r) = fresh("dynamodb_instance_bindings_are_unique_and_consistent").await else {
            return;
        };
        let t = TenantId::parse("binder").unwrap();
        let u = TenantId::parse("other").unwrap();
        let instance = |tenant: Option<&TenantId>, digest: &str| InstanceRecord {
            id: InstanceId::random(),
            tenant: tenant.cloned(),
            state: InstanceState::Ready,
            address: "http://10.0.0.1:7070".into(),
            shim_token: Secret::new("shim"),
            surrogate_digest: Some(otm_core::secret::digest(digest)),
            created_at_ms: 1,
            bound_at_ms: Some(2),
        };
        let mut a = instance(Some(&t), "a");
        r.put_instance(&a, None).await.unwrap();
        let b = instance(Some(&t), "b");
        assert!(
            matches!(r.put_instance(&b, None).await, Err(Error::Conflict { .. })),
            "a second instance for the same tenant"
        );
        assert_eq!(
            r.get_instance(&b.id).await.unwrap(),
            None,
            "the refused put wrote nothing"
        );
        assert_eq!(r.instance_of(&t).await.unwrap().as_ref(), Some(&a));

        // Rebind a to another tenant and a new surrogate: the old lookups go, the new ones work.
        let old_digest = a.surrogate_digest.clone().unwrap();
        a.tenant = Some(u.clone());
        a.surrogate_digest = Some(otm_core::secret::digest("a2"));
        r.put_instance(&a, None).await.unwrap();
        assert_eq!(r.instance_of(&t).await.unwrap(), None);
        assert_eq!(r.instance_of(&u).await.unwrap().as_ref(), Some(&a));
        assert_eq!(r.instance_by_surrogate(&old_digest).await.unwrap(), None);
        assert_eq!(
            r.instance_by_surrogate(a.surrogate_digest.as_ref().unwrap())
                .await
                .unwrap()
                .as_ref(),
            Some(&a)
        );
        r.put_instance(&b, None)
            .await
            .expect("the tenant is free again");
        assert!(
            matches!(
                r.claim_warm_instance(&t).await,
                Ok(None) | Err(Error::Conflict { .. })
            ),
            "no warm instance, or the tenant is bound already"
        );

        // Pointers never show up as instances.
        let mut listed = r.list_instances().await.unwrap();
        listed.sort_by(|x, y| x.id.cmp(&y.id));
        let mut want = vec![a.clone(), b.clone()];
        want.sort_by(|x, y| x.id.cmp(&y.id));
        assert_eq!(listed, want);

        assert!(r.delete_instance(&a.id).await.unwrap());
        assert_eq!(r.instance_of(&u).await.unwrap(), None);
        assert_eq!(
            r.instance_by_surrogate(a.surrogate_digest.as_ref().unwrap())
                .await
                .unwrap(),
            None
        );
        assert!(r.delete_instance(&b.id).await.unwrap());
        assert_eq!(r.list_instances().await.unwrap(), vec![]);

        // Settings never show up as a tenant.
        r.put_settings(&otm_core::FleetSettings {
            warm_pool_target: 3,
            ..Default::default()
        })
        .await
        .unwrap();
        assert!(r.list_tenants().await.unwrap().is_empty());
        r.create_tenant(&Tenant::new(t.clone(), "reference", None))
            .await
            .unwrap();
        assert_eq!(r.list_tenants().await.unwrap().len(), 1);
        r.delete_tables().await.unwrap();
    }
}

#[cfg(feature = "s3")]
mod s3 {
    use super::*;
    use object_store::{PutMode, PutOptions, PutPayload, UpdateVersion};
    use otm_core::{SnapshotId, StateStore, TenantId};
    use otm_store::conformance;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Creates the bucket on a plain-HTTP stand-in (moto takes an unsigned `PUT /bucket`); on
    /// real S3 the bucket must exist already.
    async fn ensure_bucket(url: &str) {
        let Some(rest) = url.strip_prefix("s3://") else {
            return;
        };
        let (location, query) = rest.split_once('?').unwrap_or((rest, ""));
        let bucket = location.split('/').next().unwrap_or_default();
        let Some(endpoint) = query
            .split('&')
            .find_map(|p| p.strip_prefix("endpoint="))
            .and_then(|e| e.strip_prefix("http://"))
        else {
            return;
        };
        let host = endpoint.trim_end_matches('/');
        let Ok(mut conn) = tokio::net::TcpStream::connect(host).await else {
            return;
        };
        let req = format!(
            "PUT /{bucket} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        if conn.write_all(req.as_bytes()).await.is_ok() {
            let mut answer = Vec::new();
            let _ = conn.read_to_end(&mut answer).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn s3_state_store() {
        let Some(url) = env("OTM_TEST_S3_URL") else {
            println!("skipped: s3_state_store: OTM_TEST_S3_URL is not set");
            return;
        };
        ensure_bucket(&url).await;
        let run = format!("/otm-test-{}", otm_core::id::random_hex(4));
        let url = with_suffix(&url, &run);
        let store = Arc::new(otm_store::open::s3_state_store(&url).expect("configure S3"));
        conformance::object_state_store_suite(store.clone()).await;

        // The same store through open_state_store, by URL: it sees what the other wrote.
        let t = TenantId::parse("through-open").unwrap();
        let id = SnapshotId::new_now();
        let scratch = tempfile::tempdir().unwrap();
        let tar = scratch.path().join("tar");
        std::fs::write(&tar, b"tar").unwrap();
        store.put(&t, &id, &tar, "manual").await.unwrap();
        store.publish(&t, &id).await.unwrap();
        let opened = otm_store::open_state_store(&url).await.unwrap();
        assert_eq!(
            opened.head(&t).await.unwrap().map(|m| m.id),
            Some(id.clone())
        );
        let back = scratch.path().join("back");
        opened.get(&t, &id, &back).await.unwrap();
        assert_eq!(std::fs::read(&back).unwrap(), b"tar");
        // A new head replaces the old one conditionally (If-Match on its e-tag).
        let id2 = SnapshotId::new_now();
        std::fs::write(&tar, b"tar2").unwrap();
        opened.put(&t, &id2, &tar, "manual").await.unwrap();
        opened.publish(&t, &id2).await.unwrap();
        assert_eq!(
            store.head(&t).await.unwrap().map(|m| m.id),
            Some(id2.clone())
        );

        // The store enforces those conditions (publish falls back to a plain overwrite only
        // where they are not implemented): a stale e-tag and a second create are refused.
        let raw = store.object_store();
        let head = store.head_path(&t);
        let stale = PutOptions {
            mode: PutMode::Update(UpdateVersion {
                e_tag: Some("\"not-the-current-etag\"".into()),
                version: None,
            }),
            ..Default::default()
        };
        let err = raw
            .put_opts(&head, PutPayload::from_static(b"{}"), stale)
            .await
            .unwrap_err();
        assert!(
            matches!(err, object_store::Error::Precondition { .. }),
            "{err:?}"
        );
        let create = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        let err = raw
            .put_opts(&head, PutPayload::from_static(b"{}"), create)
            .await
            .unwrap_err();
        assert!(
            matches!(err, object_store::Error::AlreadyExists { .. }),
            "{err:?}"
        );
        assert_eq!(
            store.head(&t).await.unwrap().map(|m| m.id),
            Some(id2),
            "both left the head alone"
        );
    }
}
