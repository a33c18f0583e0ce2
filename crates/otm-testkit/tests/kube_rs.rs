//! kube-rs against the fake API server: a client from the fake's kubeconfig, typed `Api` calls
//! with their error codes, and a `watcher` feeding a reflector store, as the kube runtime uses
//! them.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Config, ResourceExt};
use otm_testkit::kube_fake::FakeApiServer;
use serde_json::json;

const NS: &str = "otm";
/// How long a test waits for something the fake should do soon; only reached on a failure.
const PATIENCE: Duration = Duration::from_secs(20);

async fn client_for(kubeconfig_yaml: &str) -> Client {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    std::fs::write(&path, kubeconfig_yaml).unwrap();
    let kubeconfig = Kubeconfig::read_from(&path).unwrap();
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    assert_eq!(config.default_namespace, "default");
    Client::try_from(config).unwrap()
}

fn pod(name: &str, labels: serde_json::Value, command: &[&str]) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 5,
            "containers": [{"name": "main", "image": "busybox", "command": command}],
        },
    }))
    .unwrap()
}

fn api_code<T: std::fmt::Debug>(r: Result<T, kube::Error>) -> (u16, String) {
    match r {
        Err(kube::Error::Api(s)) => (s.code, s.reason.clone()),
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn typed_api_calls_and_their_errors() {
    let fake = FakeApiServer::builder()
        .token("kube-rs-token")
        .manual_pods()
        .start()
        .await
        .unwrap();
    let client = client_for(&fake.kubeconfig()).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);

    let created = pods
        .create(
            &PostParams::default(),
            &pod(
                "a",
                json!({"app": "otm", "otm.dev/warm": "true"}),
                &["sleep", "1"],
            ),
        )
        .await
        .unwrap();
    assert!(created.uid().is_some());
    assert_eq!(created.namespace().as_deref(), Some(NS));
    let again = pods
        .create(
            &PostParams::default(),
            &pod("a", json!({}), &["sleep", "1"]),
        )
        .await;
    assert_eq!(api_code(again), (409, "AlreadyExists".to_owned()));
    assert!(pods.get_opt("nope").await.unwrap().is_none());
    assert_eq!(
        api_code(pods.get("nope").await),
        (404, "NotFound".to_owned())
    );
    pods.create(
        &PostParams::default(),
        &pod("b", json!({"app": "other"}), &["sleep", "1"]),
    )
    .await
    .unwrap();
    let listed = pods
        .list(&ListParams::default().labels("app=otm"))
        .await
        .unwrap();
    assert_eq!(
        listed
            .items
            .iter()
            .map(|p| p.name_any())
            .collect::<Vec<_>>(),
        ["a"]
    );
    assert_eq!(
        listed.metadata.resource_version,
        Some(fake.resource_version().to_string())
    );
    let meta = pods
        .list_metadata(&ListParams::default().labels("app=otm"))
        .await
        .unwrap();
    assert_eq!(meta.items.len(), 1);
    assert_eq!(meta.items[0].metadata.name.as_deref(), Some("a"));
    let one = pods.get_metadata("a").await.unwrap();
    assert_eq!(one.metadata.uid, created.metadata.uid);
    assert_eq!(
        one.types.map(|t| t.kind).as_deref(),
        Some("PartialObjectMetadata")
    );
    let paged = pods.list(&ListParams::default().limit(1)).await.unwrap();
    assert_eq!(paged.items.len(), 1);
    let rest = pods
        .list(
            &ListParams::default()
                .limit(1)
                .continue_token(paged.metadata.continue_.as_deref().unwrap()),
        )
        .await
        .unwrap();
    assert_eq!(rest.items[0].name_any(), "b");

    // A claim is a label patch with a resourceVersion precondition: of two, one wins.
    let version = created.resource_version().unwrap();
    let claim = |who: &str| {
        Patch::Merge(
            json!({"metadata": {"resourceVersion": version, "labels": {"otm.dev/warm": "false", "otm.dev/instance": who}}}),
        )
    };
    let (one, two) = (claim("one"), claim("two"));
    let params = PatchParams::default();
    let (r1, r2) = tokio::join!(
        pods.patch("a", &params, &one),
        pods.patch("a", &params, &two)
    );
    let outcomes = [r1.is_ok(), r2.is_ok()];
    assert_eq!(
        outcomes.iter().filter(|ok| **ok).count(),
        1,
        "{r1:?} {r2:?}"
    );
    let lost = if r1.is_ok() { r2 } else { r1 };
    assert_eq!(api_code(lost), (409, "Conflict".to_owned()));

    // Status through its subresource.
    let status = Patch::Merge(json!({"status": {"phase": "Running"}}));
    let patched = pods.patch_status("a", &params, &status).await.unwrap();
    assert_eq!(
        patched.status.and_then(|s| s.phase).as_deref(),
        Some("Running")
    );

    // Leases: server-side apply creates and updates; a stale replace conflicts.
    let leases: Api<Lease> = Api::namespaced(client.clone(), NS);
    let lease: Lease = serde_json::from_value(json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": "otm-leader"},
        "spec": {"holderIdentity": "orch-1", "leaseDurationSeconds": 15},
    }))
    .unwrap();
    let apply = PatchParams::apply("otm").force();
    let first = leases
        .patch("otm-leader", &apply, &Patch::Apply(&lease))
        .await
        .unwrap();
    let mut taken = first.clone();
    taken.spec.as_mut().unwrap().holder_identity = Some("orch-2".into());
    let second = leases
        .replace("otm-leader", &PostParams::default(), &taken)
        .await
        .unwrap();
    assert_eq!(
        second.spec.unwrap().holder_identity.as_deref(),
        Some("orch-2")
    );
    let stale = leases
        .replace("otm-leader", &PostParams::default(), &taken)
        .await;
    assert_eq!(api_code(stale), (409, "Conflict".to_owned()));

    // Secrets owned by a pod, and delete preconditions.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    let b = pods.get("b").await.unwrap();
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "b-token", "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": "b", "uid": b.uid().unwrap()}]},
        "stringData": {"token": "shim-token"},
    }))
    .unwrap();
    let stored = secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    assert_eq!(stored.data.unwrap()["token"].0, b"shim-token");
    let wrong = DeleteParams {
        preconditions: Some(Preconditions {
            uid: Some("00000000-0000-4000-8000-000000000000".into()),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    assert_eq!(
        api_code(pods.delete("b", &wrong).await),
        (409, "Conflict".to_owned())
    );
    pods.delete("b", &DeleteParams::default()).await.unwrap();
    assert!(pods.get_opt("b").await.unwrap().is_none());
    assert!(
        secrets.get_opt("b-token").await.unwrap().is_none(),
        "the owned Secret is collected"
    );

    // Another token is refused.
    let wrong_token = fake.kubeconfig().replace("kube-rs-token", "another-token");
    let stranger: Api<Pod> = Api::namespaced(client_for(&wrong_token).await, NS);
    assert_eq!(api_code(stranger.list(&ListParams::default()).await).0, 401);
}

/// Waits until the reflector store holds what `pred` wants.
async fn wait_store(
    store: &reflector::Store<Pod>,
    what: &str,
    pred: impl Fn(&reflector::Store<Pod>) -> bool,
) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !pred(store) {
        let names: Vec<String> = store.state().iter().map(|p| p.name_any()).collect();
        assert!(
            tokio::time::Instant::now() < deadline,
            "the reflector never saw {what}; it holds {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn phase_in(store: &reflector::Store<Pod>, name: &str) -> Option<String> {
    store
        .get(&ObjectRef::new(name).within(NS))
        .and_then(|p| p.status.as_ref().and_then(|s| s.phase.clone()))
}

#[tokio::test]
async fn a_watcher_and_reflector_follow_pods_and_relist_after_410() {
    let fake = FakeApiServer::builder()
        .bookmark_interval(Duration::from_millis(200))
        .start()
        .await
        .unwrap();
    let client = client_for(&fake.kubeconfig()).await;
    let pods: Api<Pod> = Api::namespaced(client, NS);
    pods.create(
        &PostParams::default(),
        &pod("before", json!({"app": "otm"}), &["sleep", "1000"]),
    )
    .await
    .unwrap();

    let (store, writer) = reflector::store::<Pod>();
    let events: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen = events.clone();
    let stream = reflector::reflector(
        writer,
        watcher(pods.clone(), watcher::Config::default().labels("app=otm")),
    )
    .default_backoff();
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(e) = stream.next().await {
            let text = match e {
                Ok(e) => e.to_string(),
                Err(e) => format!("error: {e}"),
            };
            seen.lock().unwrap().push(text);
        }
    });
    tokio::time::timeout(PATIENCE, store.wait_until_ready())
        .await
        .unwrap()
        .unwrap();
    wait_store(&store, "the pod created before it started", |s| {
        phase_in(s, "before").as_deref() == Some("Running")
    })
    .await;

    pods.create(
        &PostParams::default(),
        &pod("r1", json!({"app": "otm"}), &["sleep", "1000"]),
    )
    .await
    .unwrap();
    pods.create(
        &PostParams::default(),
        &pod("unlabelled", json!({}), &["sleep", "1000"]),
    )
    .await
    .unwrap();
    wait_store(&store, "r1 running", |s| {
        phase_in(s, "r1").as_deref() == Some("Running")
    })
    .await;

    // The server drops the watch with 410: the watcher relists and carries on.
    let inits_before = events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| *e == "Init")
        .count();
    fake.expire_watches();
    pods.create(
        &PostParams::default(),
        &pod("r2", json!({"app": "otm"}), &["sleep", "1000"]),
    )
    .await
    .unwrap();
    wait_store(&store, "r2 running", |s| {
        phase_in(s, "r2").as_deref() == Some("Running")
    })
    .await;
    let inits_after = events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| *e == "Init")
        .count();
    assert!(
        inits_after > inits_before,
        "no relist after the 410: {:?}",
        events.lock().unwrap()
    );

    // Failures and deletions reach the store.
    assert!(fake.fail_pod(NS, "r1", 137, "OOMKilled"));
    wait_store(&store, "r1 failed", |s| {
        phase_in(s, "r1").as_deref() == Some("Failed")
    })
    .await;
    pods.delete("r2", &DeleteParams::default()).await.unwrap();
    wait_store(&store, "r2 gone", |s| {
        s.get(&ObjectRef::new("r2").within(NS)).is_none()
    })
    .await;
    assert!(
        store
            .get(&ObjectRef::new("unlabelled").within(NS))
            .is_none()
    );
    // It watched rather than polled: one list at the start and one after the 410.
    let requests = fake.requests();
    let pod_requests: Vec<&String> = requests
        .iter()
        .filter(|r| r.starts_with(&format!("GET /api/v1/namespaces/{NS}/pods?")))
        .collect();
    let lists = pod_requests
        .iter()
        .filter(|r| !r.contains("watch="))
        .count();
    assert_eq!(lists, 2, "{pod_requests:#?}");
    assert!(
        pod_requests
            .iter()
            .any(|r| r.contains("watch=true") && r.contains("allowWatchBookmarks=true")),
        "{pod_requests:#?}"
    );
    let mut names: Vec<String> = store.state().iter().map(|p| p.name_any()).collect();
    names.sort();
    assert_eq!(names, ["before", "r1"]);
    // The only error the watcher saw is the one 410 the server was told to send.
    let events = events.lock().unwrap().clone();
    let errors: Vec<&String> = events.iter().filter(|e| e.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "{events:?}");
    assert!(errors[0].contains("Expired"), "{events:?}");
    assert_eq!(
        events.last().map(String::as_str),
        Some("Delete(r2)"),
        "{events:?}"
    );
    task.abort();
}

#[tokio::test]
async fn a_watcher_with_streaming_lists_gets_its_initial_events() {
    let fake = FakeApiServer::builder()
        .manual_pods()
        .start()
        .await
        .unwrap();
    let client = client_for(&fake.kubeconfig()).await;
    let pods: Api<Pod> = Api::namespaced(client, NS);
    for name in ["s1", "s2"] {
        pods.create(
            &PostParams::default(),
            &pod(name, json!({"app": "otm"}), &["sleep", "1"]),
        )
        .await
        .unwrap();
    }
    let stream = watcher(pods.clone(), watcher::Config::default().streaming_lists());
    let mut stream = std::pin::pin!(stream);
    let mut seen = Vec::new();
    while seen.last().map(String::as_str) != Some("Apply(s3)") {
        let event = tokio::time::timeout(PATIENCE, stream.next())
            .await
            .expect("no watcher event in time")
            .expect("the watcher ended")
            .expect("a watcher error");
        seen.push(event.to_string());
        if event.to_string() == "InitDone" {
            pods.create(
                &PostParams::default(),
                &pod("s3", json!({}), &["sleep", "1"]),
            )
            .await
            .unwrap();
        }
    }
    assert_eq!(
        seen,
        [
            "Init",
            "InitApply(s1)",
            "InitApply(s2)",
            "InitDone",
            "Apply(s3)"
        ]
    );

    // A metadata watcher lists and watches PartialObjectMetadata.
    let metadata: Api<kube::core::PartialObjectMeta<Pod>> =
        Api::namespaced(pods.clone().into_client(), NS);
    let stream = watcher(metadata, watcher::Config::default());
    let mut stream = std::pin::pin!(stream);
    let mut seen = Vec::new();
    while seen.last().map(String::as_str) != Some("InitDone") {
        let event = tokio::time::timeout(PATIENCE, stream.next())
            .await
            .expect("no metadata watcher event in time")
            .expect("the watcher ended")
            .expect("a watcher error");
        seen.push(event.to_string());
    }
    assert_eq!(
        seen,
        [
            "Init",
            "InitApply(s1)",
            "InitApply(s2)",
            "InitApply(s3)",
            "InitDone"
        ]
    );
}
