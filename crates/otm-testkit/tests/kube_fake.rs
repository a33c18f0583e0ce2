//! Black-box tests of the fake Kubernetes API server over real HTTP, with plain HTTP requests,
//! with `kubectl` when it is installed, and with pods run as local processes.

use std::time::Duration;

use otm_testkit::kube_fake::{FakeApiServer, ProcessRunner};
use serde_json::{Value, json};

const TOKEN: &str = "fake-test-token";
const NS: &str = "otm";
/// How long a test waits for something the fake should do soon; only reached on a failure.
const PATIENCE: Duration = Duration::from_secs(20);

struct Api {
    fake: FakeApiServer,
    http: reqwest::Client,
}

impl Api {
    async fn start(builder: otm_testkit::kube_fake::FakeApiServerBuilder) -> Api {
        let fake = builder.token(TOKEN).start().await.unwrap();
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        Api { fake, http }
    }

    async fn manual() -> Api {
        Self::start(FakeApiServer::builder().manual_pods()).await
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.fake.url())
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> (u16, Value) {
        let resp = req.bearer_auth(TOKEN).send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, body)
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.send(self.http.get(self.url(path))).await
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(self.http.post(self.url(path)).json(&body)).await
    }

    async fn put(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(self.http.put(self.url(path)).json(&body)).await
    }

    async fn patch(&self, path: &str, content_type: &str, body: Value) -> (u16, Value) {
        let req = self
            .http
            .patch(self.url(path))
            .header("content-type", content_type)
            .body(body.to_string());
        self.send(req).await
    }

    async fn delete(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(self.http.delete(self.url(path)).json(&body))
            .await
    }

    async fn create_pod(&self, pod: Value) -> Value {
        let (status, body) = self
            .post(&format!("/api/v1/namespaces/{NS}/pods"), pod)
            .await;
        assert_eq!(status, 201, "{body}");
        body
    }

    async fn watch(&self, path_and_query: &str) -> Watch {
        let resp = self
            .http
            .get(self.url(path_and_query))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        Watch {
            resp,
            buf: Vec::new(),
        }
    }

    /// Waits until the stored pod satisfies `pred`.
    async fn wait_pod(&self, name: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let pod = self.fake.get("pods", NS, name).unwrap_or(Value::Null);
            if pred(&pod) {
                return pod;
            }
            if tokio::time::Instant::now() > deadline {
                let logs = self.fake.pod_logs(NS, name).unwrap_or_default();
                panic!("pod {name} never became {what}; it is now {pod:#}\nits log:\n{logs}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A watch response read event by event.
struct Watch {
    resp: reqwest::Response,
    buf: Vec<u8>,
}

impl Watch {
    /// The next event, or `None` when the server ended the stream.
    async fn next(&mut self) -> Option<Value> {
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                return Some(serde_json::from_slice(&line).unwrap());
            }
            let chunk = tokio::time::timeout(PATIENCE, self.resp.chunk())
                .await
                .expect("no watch event in time")
                .unwrap()?;
            self.buf.extend_from_slice(&chunk);
        }
    }

    /// Skips bookmarks; the next real event.
    async fn next_change(&mut self) -> Value {
        loop {
            let e = self.next().await.expect("the watch ended");
            if e["type"] != "BOOKMARK" {
                return e;
            }
        }
    }

    /// Reads until an event satisfies `pred`, returning the events before it and it.
    async fn until(&mut self, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        let mut seen = Vec::new();
        loop {
            let e = self.next().await.expect("the watch ended");
            let done = pred(&e);
            seen.push(e);
            if done {
                return seen;
            }
        }
    }
}

fn pod(name: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {"containers": [{"name": "main", "image": "busybox", "command": ["sleep", "1000"]}]},
    })
}

fn rv(obj: &Value) -> u64 {
    obj["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

fn names(list: &Value) -> Vec<String> {
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["metadata"]["name"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn wrong_token_is_unauthorized() {
    let api = Api::manual().await;
    let resp = api
        .http
        .get(api.url("/api/v1/namespaces/otm/pods"))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["kind"], "Status");
    assert_eq!(body["reason"], "Unauthorized");
    let (status, _) = api.get("/api/v1/namespaces/otm/pods").await;
    assert_eq!(status, 200);
    let anonymous = api
        .http
        .get(api.url("/api/v1/namespaces/otm/pods"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        anonymous.status().as_u16(),
        200,
        "kubectl sends no token over plain HTTP"
    );

    let strict = Api::start(FakeApiServer::builder().manual_pods().require_token()).await;
    let anonymous = strict
        .http
        .get(strict.url("/api/v1/namespaces/otm/pods"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status().as_u16(), 401);
    let (status, _) = strict.get("/api/v1/namespaces/otm/pods").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn create_get_and_errors_are_status_objects() {
    let api = Api::manual().await;
    let created = api.create_pod(pod("a", json!({}))).await;
    assert_eq!(created["metadata"]["namespace"], NS);
    assert_eq!(
        created["status"],
        json!({"phase": "Pending", "qosClass": "BestEffort"})
    );
    assert!(created["metadata"]["uid"].as_str().unwrap().len() == 36);
    assert!(
        created["metadata"]["creationTimestamp"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );

    let (status, again) = api
        .post(
            &format!("/api/v1/namespaces/{NS}/pods"),
            pod("a", json!({})),
        )
        .await;
    assert_eq!(status, 409);
    assert_eq!(
        (
            again["kind"].as_str(),
            again["reason"].as_str(),
            again["code"].as_u64()
        ),
        (Some("Status"), Some("AlreadyExists"), Some(409))
    );

    let (status, missing) = api.get(&format!("/api/v1/namespaces/{NS}/pods/nope")).await;
    assert_eq!(status, 404);
    assert_eq!(missing["reason"], "NotFound");
    assert_eq!(missing["details"]["name"], "nope");

    let (status, generated) = api
        .post(
            &format!("/api/v1/namespaces/{NS}/secrets"),
            json!({"metadata": {"generateName": "tok-"}, "stringData": {"token": "s3cret"}}),
        )
        .await;
    assert_eq!(status, 201);
    let name = generated["metadata"]["name"].as_str().unwrap();
    assert!(name.starts_with("tok-") && name.len() == 9, "{name}");
    assert_eq!(generated["data"]["token"], "czNjcmV0");
    assert_eq!(generated["stringData"], Value::Null);

    let (status, lease) = api
        .post(
            &format!("/apis/coordination.k8s.io/v1/namespaces/{NS}/leases"),
            json!({"metadata": {"name": "otm-leader"}, "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15}}),
        )
        .await;
    assert_eq!(status, 201);
    assert_eq!(lease["apiVersion"], "coordination.k8s.io/v1");
    assert_eq!(lease["kind"], "Lease");
    let (status, ns_list) = api.get("/api/v1/namespaces").await;
    assert_eq!(status, 200);
    assert!(names(&ns_list).contains(&NS.to_owned()), "{ns_list}");
}

#[tokio::test]
async fn list_and_watch_with_bookmarks() {
    let api = Api::start(
        FakeApiServer::builder()
            .manual_pods()
            .bookmark_interval(Duration::from_millis(200)),
    )
    .await;
    api.create_pod(pod("a", json!({"app": "otm"}))).await;
    let (status, list) = api.get(&format!("/api/v1/namespaces/{NS}/pods")).await;
    assert_eq!(status, 200);
    assert_eq!(list["kind"], "PodList");
    assert_eq!(names(&list), ["a"]);
    let list_rv = rv(&list);
    assert_eq!(list_rv, api.fake.resource_version());

    let mut w = api
        .watch(&format!("/api/v1/namespaces/{NS}/pods?watch=true&allowWatchBookmarks=true&resourceVersion={list_rv}"))
        .await;
    let b = api.create_pod(pod("b", json!({"app": "otm"}))).await;
    let e = w.next_change().await;
    assert_eq!(
        (e["type"].as_str(), e["object"]["metadata"]["name"].as_str()),
        (Some("ADDED"), Some("b"))
    );
    assert_eq!(rv(&e["object"]), rv(&b));
    let (status, patched) = api
        .patch(
            &format!("/api/v1/namespaces/{NS}/pods/a"),
            "application/merge-patch+json",
            json!({"metadata": {"labels": {"x": "y"}}}),
        )
        .await;
    assert_eq!(status, 200);
    let e = w.next_change().await;
    assert_eq!(
        (
            e["type"].as_str(),
            e["object"]["metadata"]["labels"]["x"].as_str()
        ),
        (Some("MODIFIED"), Some("y"))
    );
    // Bookmarks carry only the version, and it is the latest the watch has seen.
    let seen = w.until(|e| e["type"] == "BOOKMARK").await;
    let bookmark = seen.last().unwrap();
    assert_eq!(bookmark["object"]["kind"], "Pod");
    assert_eq!(rv(&bookmark["object"]), rv(&patched));
    assert_eq!(bookmark["object"]["metadata"].as_object().unwrap().len(), 1);

    // A watch without a version starts with the current objects.
    let mut fresh = api
        .watch(&format!("/api/v1/namespaces/{NS}/pods?watch=1"))
        .await;
    let first: Vec<_> = [fresh.next_change().await, fresh.next_change().await]
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap().to_owned(),
                e["object"]["metadata"]["name"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        first,
        [
            ("ADDED".to_owned(), "a".to_owned()),
            ("ADDED".to_owned(), "b".to_owned())
        ]
    );

    // Cluster-wide list and watch, and timeoutSeconds ends the stream.
    api.fake
        .create("pods", "elsewhere", pod("c", json!({})))
        .unwrap();
    let (_, all) = api.get("/api/v1/pods").await;
    // Ordered by namespace, then name, as etcd keys are.
    assert_eq!(names(&all), ["c", "a", "b"]);
    let mut short = api
        .watch(&format!(
            "/api/v1/pods?watch=true&timeoutSeconds=1&resourceVersion={}",
            api.fake.resource_version()
        ))
        .await;
    assert!(
        short.next().await.is_none(),
        "the watch should end after its timeout"
    );

    // Pages are consistent: the second page is read at the first page's version.
    let (_, page1) = api.get("/api/v1/pods?limit=2").await;
    assert_eq!(names(&page1), ["c", "a"]);
    let token = page1["metadata"]["continue"].as_str().unwrap().to_owned();
    api.fake.create("pods", "zzz", pod("d", json!({}))).unwrap();
    let (_, page2) = api
        .get(&format!("/api/v1/pods?limit=2&continue={token}"))
        .await;
    assert_eq!(names(&page2), ["b"]);
    assert_eq!(page2["metadata"].get("continue"), None);
}

#[tokio::test]
async fn a_compacted_version_is_gone() {
    let api = Api::manual().await;
    api.create_pod(pod("a", json!({}))).await;
    let old = api.fake.resource_version();
    api.create_pod(pod("b", json!({}))).await;

    // Before compaction, the past can be listed exactly and watched from.
    let (status, then) = api
        .get(&format!(
            "/api/v1/namespaces/{NS}/pods?resourceVersion={old}&resourceVersionMatch=Exact"
        ))
        .await;
    assert_eq!(status, 200);
    assert_eq!(names(&then), ["a"]);
    let mut w = api
        .watch(&format!(
            "/api/v1/namespaces/{NS}/pods?watch=true&resourceVersion={old}"
        ))
        .await;
    assert_eq!(w.next_change().await["object"]["metadata"]["name"], "b");

    api.fake.compact_history();
    let mut w = api
        .watch(&format!(
            "/api/v1/namespaces/{NS}/pods?watch=true&resourceVersion={old}"
        ))
        .await;
    let e = w.next().await.unwrap();
    assert_eq!(e["type"], "ERROR");
    assert_eq!(e["object"]["kind"], "Status");
    assert_eq!(e["object"]["code"], 410);
    assert_eq!(e["object"]["reason"], "Expired");
    assert!(w.next().await.is_none(), "the watch ends after the error");
    let (status, gone) = api
        .get(&format!(
            "/api/v1/namespaces/{NS}/pods?resourceVersion={old}&resourceVersionMatch=Exact"
        ))
        .await;
    assert_eq!((status, gone["reason"].as_str()), (410, Some("Expired")));

    // A watch from the current version still works, and a small history expires old versions.
    let now = api.fake.resource_version();
    let mut w = api
        .watch(&format!(
            "/api/v1/namespaces/{NS}/pods?watch=true&resourceVersion={now}"
        ))
        .await;
    api.create_pod(pod("c", json!({}))).await;
    assert_eq!(w.next_change().await["object"]["metadata"]["name"], "c");
    api.fake.set_history_limit(1);
    api.create_pod(pod("d", json!({}))).await;
    let mut w = api
        .watch(&format!(
            "/api/v1/namespaces/{NS}/pods?watch=true&resourceVersion={now}"
        ))
        .await;
    assert_eq!(w.next().await.unwrap()["object"]["code"], 410);
}

#[tokio::test]
async fn stale_resource_versions_conflict() {
    let api = Api::manual().await;
    let created = api
        .create_pod(pod("warm-1", json!({"otm.dev/warm": "true"})))
        .await;
    let version = created["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = format!("/api/v1/namespaces/{NS}/pods/warm-1");

    // Two claims with the same version, as two orchestrators would send them: one wins.
    let claim = |who: &str| json!({"metadata": {"resourceVersion": version, "labels": {"otm.dev/warm": "false", "otm.dev/instance": who}}});
    let (a, b) = tokio::join!(
        api.patch(&path, "application/merge-patch+json", claim("one")),
        api.patch(&path, "application/merge-patch+json", claim("two")),
    );
    let mut codes = [a.0, b.0];
    codes.sort_unstable();
    assert_eq!(codes, [200, 409], "{a:?} {b:?}");
    let loser = if a.0 == 409 { &a.1 } else { &b.1 };
    assert_eq!(
        (loser["kind"].as_str(), loser["reason"].as_str()),
        (Some("Status"), Some("Conflict"))
    );
    let winner = if a.0 == 200 { &a.1 } else { &b.1 };
    let stored = api.fake.get("pods", NS, "warm-1").unwrap();
    assert_eq!(stored["metadata"]["labels"], winner["metadata"]["labels"]);

    // The same with PUT, and with a JSON patch whose test names the version.
    let mut body = stored.clone();
    body["metadata"]["labels"]["x"] = json!("1");
    let (first, second) = tokio::join!(api.put(&path, body.clone()), api.put(&path, body.clone()));
    let mut codes = [first.0, second.0];
    codes.sort_unstable();
    assert_eq!(codes, [200, 409]);
    let current = api.fake.get("pods", NS, "warm-1").unwrap();
    let stale_test = json!([
        {"op": "test", "path": "/metadata/resourceVersion", "value": stored["metadata"]["resourceVersion"]},
        {"op": "replace", "path": "/metadata/labels/x", "value": "2"},
    ]);
    let (status, _) = api
        .patch(&path, "application/json-patch+json", stale_test)
        .await;
    assert_eq!(status, 409);
    let fresh_test = json!([
        {"op": "test", "path": "/metadata/resourceVersion", "value": current["metadata"]["resourceVersion"]},
        {"op": "replace", "path": "/metadata/labels/x", "value": "2"},
    ]);
    let (status, patched) = api
        .patch(&path, "application/json-patch+json", fresh_test)
        .await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(patched["metadata"]["labels"]["x"], "2");

    // A patch without a version always applies; one that changes nothing keeps the version.
    let (status, same) = api
        .patch(
            &path,
            "application/merge-patch+json",
            json!({"metadata": {"labels": {"x": "2"}}}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(rv(&same), rv(&patched));

    // Delete preconditions.
    let (status, refused) = api
        .delete(
            &path,
            json!({"preconditions": {"uid": "00000000-0000-4000-8000-000000000000"}}),
        )
        .await;
    assert_eq!(
        (status, refused["reason"].as_str()),
        (409, Some("Conflict"))
    );
    let (status, refused) = api
        .delete(
            &path,
            json!({"preconditions": {"resourceVersion": version}}),
        )
        .await;
    assert_eq!(
        (status, refused["reason"].as_str()),
        (409, Some("Conflict"))
    );
    assert!(api.fake.get("pods", NS, "warm-1").is_some());
    let (status, _) = api.delete(&path, json!({"preconditions": {"uid": created["metadata"]["uid"], "resourceVersion": same["metadata"]["resourceVersion"]}})).await;
    assert_eq!(status, 200);
    assert!(
        api.fake.get("pods", NS, "warm-1").is_none(),
        "an unscheduled pod goes at once"
    );
}

#[tokio::test]
async fn status_is_its_own_subresource_and_apply_creates() {
    let api = Api::manual().await;
    api.create_pod(pod("p", json!({}))).await;
    let path = format!("/api/v1/namespaces/{NS}/pods/p");
    let (status, _) = api
        .patch(
            &path,
            "application/merge-patch+json",
            json!({"status": {"phase": "Running"}}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        api.fake.get("pods", NS, "p").unwrap()["status"]["phase"],
        "Pending",
        "the main resource ignores status"
    );
    let (status, patched) = api
        .patch(
            &format!("{path}/status"),
            "application/merge-patch+json",
            json!({"status": {"phase": "Running"}, "metadata": {"labels": {"ignored": "yes"}}}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(patched["status"]["phase"], "Running");
    assert_eq!(patched["metadata"]["labels"].get("ignored"), None);

    let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "leader"}, "spec": {"holderIdentity": "a"}});
    let lease_path = format!(
        "/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/leader?fieldManager=otm&force=true"
    );
    let (status, created) = api
        .patch(&lease_path, "application/apply-patch+yaml", lease.clone())
        .await;
    assert_eq!(status, 201, "{created}");
    let mut moved = lease.clone();
    moved["spec"]["holderIdentity"] = json!("b");
    let (status, applied) = api
        .patch(&lease_path, "application/apply-patch+yaml", moved)
        .await;
    assert_eq!(status, 200);
    assert_eq!(applied["spec"]["holderIdentity"], "b");
    assert_eq!(applied["metadata"]["uid"], created["metadata"]["uid"]);
}

#[tokio::test]
async fn resize_changes_only_cpu_and_memory_and_keeps_the_qos_class() {
    let api = Api::manual().await;
    let mut p = pod("r", json!({}));
    p["spec"]["containers"][0]["resources"] = json!({
        "requests": {"cpu": "200m", "memory": "1Gi"},
        "limits": {"cpu": "1", "memory": "2Gi", "ephemeral-storage": "1Gi"},
    });
    api.create_pod(p).await;
    api.fake.mark_pod_running(NS, "r", true).unwrap();
    let path = format!("/api/v1/namespaces/{NS}/pods/r/resize");
    let strategic = "application/strategic-merge-patch+json";
    let resize = |resources: Value| json!({"spec": {"containers": [{"name": "main", "resources": resources}]}});

    let (status, resized) = api
        .patch(
            &path,
            strategic,
            resize(json!({"limits": {"cpu": "1500m", "memory": "3Gi"}})),
        )
        .await;
    assert_eq!(status, 200, "{resized}");
    let c = &resized["spec"]["containers"][0];
    assert_eq!(c["image"], "busybox", "the rest of the container is kept");
    assert_eq!(c["resources"]["limits"]["cpu"], "1500m");
    assert_eq!(c["resources"]["limits"]["ephemeral-storage"], "1Gi");
    assert_eq!(c["resources"]["requests"]["cpu"], "200m");
    assert_eq!(
        resized["status"]["containerStatuses"][0]["resources"]["limits"]["memory"], "3Gi",
        "actuated at once"
    );

    for (what, body) in [
        (
            "ephemeral storage",
            resize(json!({"limits": {"ephemeral-storage": "2Gi"}})),
        ),
        (
            "the QoS class",
            resize(json!({"requests": {"cpu": "1500m", "memory": "3Gi"}})),
        ),
        (
            "another field",
            json!({"spec": {"containers": [{"name": "main", "image": "evil"}]}}),
        ),
        (
            "an unknown container",
            json!({"spec": {"containers": [{"name": "nope", "resources": {}}]}}),
        ),
    ] {
        let (status, body) = api.patch(&path, strategic, body).await;
        assert_eq!(status, 422, "{what} cannot be resized: {body}");
        assert_eq!(body["reason"], "Invalid");
    }
    let (status, _) = api
        .patch(
            &path,
            strategic,
            json!({"metadata": {"resourceVersion": "1"}, "spec": {"containers": []}}),
        )
        .await;
    assert_eq!(status, 409, "a stale version");
    assert!(api.fake.fail_pod(NS, "r", 1, "Error"));
    let (status, _) = api
        .patch(&path, strategic, resize(json!({"limits": {"cpu": "2"}})))
        .await;
    assert_eq!(status, 422, "an ended pod");
}

#[tokio::test]
async fn label_selectors_filter_lists_and_watches() {
    let api = Api::manual().await;
    api.create_pod(pod("warm-a", json!({"app": "otm", "otm.dev/warm": "true"})))
        .await;
    api.create_pod(pod(
        "bound-b",
        json!({"app": "otm", "otm.dev/warm": "false", "otm.dev/instance": "i1"}),
    ))
    .await;
    api.create_pod(pod("other", json!({"app": "web"}))).await;
    let api_ref = &api;
    let select = |sel: &str| {
        let path = format!(
            "/api/v1/namespaces/{NS}/pods?labelSelector={}",
            urlencode(sel)
        );
        async move { names(&api_ref.get(&path).await.1) }
    };
    assert_eq!(select("app=otm").await, ["bound-b", "warm-a"]);
    assert_eq!(select("app!=otm").await, ["other"]);
    assert_eq!(select("otm.dev/warm in (true,maybe)").await, ["warm-a"]);
    assert_eq!(
        select("app notin (web),otm.dev/warm=false").await,
        ["bound-b"]
    );
    assert_eq!(select("otm.dev/instance").await, ["bound-b"]);
    assert_eq!(select("!otm.dev/instance,app").await, ["other", "warm-a"]);
    let (_, by_name) = api
        .get(&format!(
            "/api/v1/namespaces/{NS}/pods?fieldSelector=metadata.name%3Dother"
        ))
        .await;
    assert_eq!(names(&by_name), ["other"]);
    let (status, bad) = api
        .get(&format!(
            "/api/v1/namespaces/{NS}/pods?labelSelector={}",
            urlencode("a in b")
        ))
        .await;
    assert_eq!((status, bad["reason"].as_str()), (400, Some("BadRequest")));

    // A watch with a selector: a pod that stops matching is DELETED, one that starts is ADDED.
    let now = api.fake.resource_version();
    let mut w = api
        .watch(&format!(
            "/api/v1/namespaces/{NS}/pods?watch=true&resourceVersion={now}&labelSelector={}",
            urlencode("otm.dev/warm=true")
        ))
        .await;
    let path = |n: &str| format!("/api/v1/namespaces/{NS}/pods/{n}");
    let merge = "application/merge-patch+json";
    api.patch(
        &path("other"),
        merge,
        json!({"metadata": {"labels": {"unrelated": "1"}}}),
    )
    .await;
    api.patch(
        &path("warm-a"),
        merge,
        json!({"metadata": {"labels": {"otm.dev/warm": "false"}}}),
    )
    .await;
    api.patch(
        &path("bound-b"),
        merge,
        json!({"metadata": {"labels": {"otm.dev/warm": "true"}}}),
    )
    .await;
    api.patch(
        &path("bound-b"),
        merge,
        json!({"metadata": {"labels": {"seen": "yes"}}}),
    )
    .await;
    let got: Vec<(String, String)> = [
        w.next_change().await,
        w.next_change().await,
        w.next_change().await,
    ]
    .iter()
    .map(|e| {
        (
            e["type"].as_str().unwrap().to_owned(),
            e["object"]["metadata"]["name"].as_str().unwrap().to_owned(),
        )
    })
    .collect();
    let want = [
        ("DELETED", "warm-a"),
        ("ADDED", "bound-b"),
        ("MODIFIED", "bound-b"),
    ]
    .map(|(a, b)| (a.to_owned(), b.to_owned()));
    assert_eq!(got, want);
    // Deleting a collection by selector.
    let (status, _) = api
        .delete(
            &format!("/api/v1/namespaces/{NS}/pods?labelSelector=app%3Dweb"),
            json!({}),
        )
        .await;
    assert_eq!(status, 200);
    assert!(api.fake.get("pods", NS, "other").is_none());
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn sleeper(name: &str, command: &[&str]) -> Value {
    json!({
        "metadata": {"name": name, "labels": {"app": "otm"}},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "main", "image": "busybox", "command": command}],
        },
    })
}

fn phase(p: &Value) -> &str {
    p["status"]["phase"].as_str().unwrap_or_default()
}

fn is_ready(p: &Value) -> bool {
    p["status"]["conditions"].as_array().is_some_and(|cs| {
        cs.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

fn terminated(p: &Value) -> &Value {
    &p["status"]["containerStatuses"][0]["state"]["terminated"]
}

#[tokio::test]
async fn graceful_deletion_and_owner_garbage_collection() {
    let api = Api::start(FakeApiServer::builder()).await;
    let now = api.fake.resource_version();
    let mut w = api
        .watch(&format!(
            "/api/v1/namespaces/{NS}/pods?watch=true&resourceVersion={now}"
        ))
        .await;
    let mut secrets = api
        .watch(&format!(
            "/api/v1/namespaces/{NS}/secrets?watch=true&resourceVersion={now}"
        ))
        .await;
    // This process ignores SIGTERM, so only the SIGKILL after the grace ends it.
    let stubborn = api
        .create_pod(sleeper(
            "stubborn",
            &["sh", "-c", "trap '' TERM; echo started; sleep 1000"],
        ))
        .await;
    let uid = stubborn["metadata"]["uid"].as_str().unwrap();
    let (status, _) = api
        .post(
            &format!("/api/v1/namespaces/{NS}/secrets"),
            json!({"metadata": {"name": "stubborn-token", "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": "stubborn", "uid": uid}]}, "stringData": {"token": "t"}}),
        )
        .await;
    assert_eq!(status, 201);
    api.post(
        &format!("/api/v1/namespaces/{NS}/secrets"),
        json!({"metadata": {"name": "unowned"}}),
    )
    .await;
    api.wait_pod("stubborn", "Running", |p| phase(p) == "Running")
        .await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !api
        .fake
        .pod_logs(NS, "stubborn")
        .unwrap_or_default()
        .contains("started")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the pod process never started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (status, deleting) = api
        .delete(
            &format!("/api/v1/namespaces/{NS}/pods/stubborn"),
            json!({"gracePeriodSeconds": 1}),
        )
        .await;
    assert_eq!(status, 200);
    assert!(
        deleting["metadata"]["deletionTimestamp"].is_string(),
        "{deleting}"
    );
    assert_eq!(deleting["metadata"]["deletionGracePeriodSeconds"], 1);
    let events = w.until(|e| e["type"] == "DELETED").await;
    let marked = events
        .iter()
        .position(|e| {
            e["type"] == "MODIFIED" && e["object"]["metadata"]["deletionTimestamp"].is_string()
        })
        .expect("a MODIFIED event with the deletion timestamp");
    let exit = events
        .iter()
        .position(|e| terminated(&e["object"]).is_object())
        .expect("a MODIFIED event with the container's exit");
    assert!(marked < exit);
    assert_eq!(
        terminated(&events[exit]["object"])["exitCode"],
        137,
        "SIGTERM was ignored, so SIGKILL ended it"
    );
    assert!(api.fake.get("pods", NS, "stubborn").is_none());
    // The owned Secret is collected; the other one stays.
    let secret_events = secrets.until(|e| e["type"] == "DELETED").await;
    assert_eq!(
        secret_events.last().unwrap()["object"]["metadata"]["name"],
        "stubborn-token"
    );
    assert!(api.fake.get("secrets", NS, "stubborn-token").is_none());
    assert!(api.fake.get("secrets", NS, "unowned").is_some());

    // A process that heeds SIGTERM exits with 143; a zero grace removes at once.
    api.create_pod(sleeper("polite", &["sleep", "1000"])).await;
    api.wait_pod("polite", "Running", |p| phase(p) == "Running")
        .await;
    api.delete(&format!("/api/v1/namespaces/{NS}/pods/polite"), json!({}))
        .await;
    let events = w
        .until(|e| e["type"] == "DELETED" && e["object"]["metadata"]["name"] == "polite")
        .await;
    let last = &events.last().unwrap()["object"];
    assert_eq!(terminated(last)["exitCode"], 143, "{last}");
    api.create_pod(sleeper("quick", &["sleep", "1000"])).await;
    api.wait_pod("quick", "Running", |p| phase(p) == "Running")
        .await;
    let (status, _) = api
        .delete(
            &format!("/api/v1/namespaces/{NS}/pods/quick?gracePeriodSeconds=0"),
            json!({}),
        )
        .await;
    assert_eq!(status, 200);
    assert!(api.fake.get("pods", NS, "quick").is_none());
}

/// A pod that serves HTTP on its own pod IP, with a readiness probe.
fn web_pod(name: &str) -> Value {
    json!({
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{
                "name": "web",
                // The image is mapped to a local binary; there is no command, as with an
                // image's entrypoint.
                "image": "registry.example/python:3.12",
                "args": ["-m", "http.server", "--bind", "$(POD_IP)", "7070"],
                "env": [
                    {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                    {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": format!("{name}-token"), "key": "token"}}},
                ],
                "ports": [{"name": "http", "containerPort": 7070}],
                "readinessProbe": {"httpGet": {"path": "/", "port": "http"}},
            }],
        },
    })
}

#[tokio::test]
async fn pods_run_as_processes_until_ready_and_fail_when_killed() {
    if std::process::Command::new("python3")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: python3 is not installed");
        return;
    }
    let runner = ProcessRunner::new().binary("python", "python3");
    let api = Api::start(FakeApiServer::builder().runner(runner)).await;
    let now = api.fake.resource_version();
    let mut w = api.watch(&format!("/api/v1/namespaces/{NS}/pods?watch=true&resourceVersion={now}&fieldSelector=metadata.name%3Dweb-1")).await;
    api.create_pod(web_pod("web-1")).await;
    // The token Secret does not exist yet: the pod waits for it, as with the kubelet.
    let waiting = api
        .wait_pod("web-1", "waiting for its Secret", |p| {
            p["status"]["containerStatuses"][0]["state"]["waiting"]["reason"]
                == "CreateContainerConfigError"
        })
        .await;
    assert_eq!(phase(&waiting), "Pending");
    for name in ["web-1", "web-2"] {
        api.post(
            &format!("/api/v1/namespaces/{NS}/secrets"),
            json!({"metadata": {"name": format!("{name}-token")}, "stringData": {"token": "t"}}),
        )
        .await;
    }
    api.create_pod(web_pod("web-2")).await;
    let one = api.wait_pod("web-1", "Ready", is_ready).await;
    let two = api.wait_pod("web-2", "Ready", is_ready).await;
    assert_eq!(phase(&one), "Running");
    assert_eq!(one["spec"]["nodeName"], "otm-fake-node");
    let (ip1, ip2) = (
        one["status"]["podIP"].as_str().unwrap(),
        two["status"]["podIP"].as_str().unwrap(),
    );
    assert_ne!(ip1, ip2, "each pod has its own address");
    assert!(ip1.starts_with("127."), "{ip1}");
    for ip in [ip1, ip2] {
        let resp = api
            .http
            .get(format!("http://{ip}:7070/"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.status().as_u16(),
            200,
            "the pod at {ip} answers on its port"
        );
    }

    // Every transition was a MODIFIED event, in order.
    let events = w.until(|e| is_ready(&e["object"])).await;
    assert_eq!(events[0]["type"], "ADDED");
    let steps: Vec<&str> = events
        .iter()
        .skip(1)
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert!(steps.iter().all(|t| *t == "MODIFIED"), "{steps:?}");
    let scheduled = events
        .iter()
        .position(|e| e["object"]["spec"]["nodeName"].is_string())
        .unwrap();
    let running = events
        .iter()
        .position(|e| phase(&e["object"]) == "Running")
        .unwrap();
    let ready = events.len() - 1;
    assert!(
        scheduled < running && running <= ready,
        "{scheduled} {running} {ready}"
    );

    assert!(api.fake.fail_pod(NS, "web-1", 137, "OOMKilled"));
    let failed = api
        .wait_pod("web-1", "Failed", |p| phase(p) == "Failed")
        .await;
    assert_eq!(terminated(&failed)["exitCode"], 137);
    assert_eq!(terminated(&failed)["reason"], "OOMKilled");
    assert!(!is_ready(&failed));
    let refused = api
        .http
        .get(format!("http://{ip1}:7070/"))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(refused.is_err(), "the killed pod's server is gone");
    let e = w.until(|e| phase(&e["object"]) == "Failed").await;
    assert_eq!(e.last().unwrap()["type"], "MODIFIED");

    // A process that exits on its own: Failed with its code, or Succeeded.
    api.create_pod(sleeper("exit-3", &["sh", "-c", "echo bye; exit 3"]))
        .await;
    api.create_pod(sleeper("exit-0", &["true"])).await;
    let p = api
        .wait_pod("exit-3", "Failed", |p| phase(p) == "Failed")
        .await;
    assert_eq!(terminated(&p)["exitCode"], 3);
    assert_eq!(api.fake.pod_logs(NS, "exit-3").unwrap(), "bye\n");
    let (_, log) = api
        .get(&format!("/api/v1/namespaces/{NS}/pods/exit-3/log"))
        .await;
    assert_eq!(log, Value::String("bye\n".into()));
    api.wait_pod("exit-0", "Succeeded", |p| phase(p) == "Succeeded")
        .await;

    // A lost pod disappears at once; the next pods can be made to fail.
    assert!(api.fake.lose_pod(NS, "web-2"));
    assert!(api.fake.get("pods", NS, "web-2").is_none());
    api.fake.unschedulable_next(1);
    api.fake.fail_start_next(1);
    api.create_pod(sleeper("never", &["sleep", "1000"])).await;
    api.create_pod(sleeper("broken", &["sleep", "1000"])).await;
    let never = api
        .wait_pod("never", "unschedulable", |p| {
            p["status"]["conditions"]
                .as_array()
                .is_some_and(|cs| cs.iter().any(|c| c["reason"] == "Unschedulable"))
        })
        .await;
    assert_eq!(never["spec"]["nodeName"], Value::Null);
    let broken = api
        .wait_pod("broken", "Failed", |p| phase(p) == "Failed")
        .await;
    assert_eq!(terminated(&broken)["reason"], "StartError");
}

#[tokio::test]
async fn pods_can_be_driven_by_hand() {
    let api = Api::manual().await;
    api.create_pod(pod("p", json!({}))).await;
    api.fake
        .mark_pod_scheduled(NS, "p", "127.0.0.9".parse().unwrap())
        .unwrap();
    api.fake.mark_pod_running(NS, "p", false).unwrap();
    let p = api.fake.mark_pod_ready(NS, "p", true).unwrap();
    assert!(is_ready(&p));
    assert_eq!(p["status"]["podIP"], "127.0.0.9");
    let ready = |p: Option<&Value>| p.is_some_and(is_ready);
    assert!(
        api.fake
            .wait_for("pods", NS, "p", Duration::ZERO, ready)
            .await
    );
    let p = api.fake.set_pod_condition(NS, "p", "Ready", false).unwrap();
    assert!(
        !api.fake
            .wait_for("pods", NS, "p", Duration::from_millis(100), ready)
            .await
    );
    assert!(!is_ready(&p));
    assert!(api.fake.fail_pod(NS, "p", 1, "Error"));
    let p = api.fake.get("pods", NS, "p").unwrap();
    assert_eq!(
        (phase(&p), terminated(&p)["exitCode"].as_i64()),
        ("Failed", Some(1))
    );
    assert_eq!(
        api.fake
            .set_pod_phase(NS, "p", "Unknown")
            .map(|p| phase(&p).to_owned()),
        Some("Unknown".to_owned())
    );
}

// ---- kubectl ----

/// `kubectl`: `$OTM_TEST_KUBECTL`, `/usr/bin/kubectl` (Debian's `kubernetes-client`, which
/// `.ci/run` installs), or one on `PATH`.
fn kubectl() -> Option<std::path::PathBuf> {
    if let Some(given) = std::env::var_os("OTM_TEST_KUBECTL").filter(|v| !v.is_empty()) {
        return Some(given.into());
    }
    let path = std::path::PathBuf::from("/usr/bin/kubectl");
    if path.exists() {
        return Some(path);
    }
    let found = std::process::Command::new("kubectl")
        .arg("version")
        .arg("--client")
        .output()
        .is_ok();
    found.then(|| "kubectl".into())
}

async fn run_kubectl(
    kubectl: &std::path::Path,
    kubeconfig: &std::path::Path,
    args: &[&str],
) -> String {
    let out = tokio::process::Command::new(kubectl)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .env("HOME", kubeconfig.parent().unwrap())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "kubectl {args:?} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test]
async fn kubectl_lists_and_watches_pods() {
    let Some(kubectl) = kubectl() else {
        // CI installs it (.ci/run): there, a missing kubectl is a failure, not a skip.
        assert!(
            std::env::var_os("CI").is_none(),
            "kubectl is not installed, and CI is set (apt-get install kubernetes-client)"
        );
        eprintln!("skipped: kubectl is not installed (apt-get install kubernetes-client)");
        return;
    };
    let api = Api::manual().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api
        .fake
        .write_kubeconfig(&dir.path().join("kubeconfig"))
        .unwrap();
    api.create_pod(pod("first", json!({"app": "otm"}))).await;
    api.fake
        .mark_pod_scheduled(NS, "first", "127.0.0.9".parse().unwrap());
    api.fake.mark_pod_running(NS, "first", true);

    let json_out = run_kubectl(
        &kubectl,
        &kubeconfig,
        &["-n", NS, "get", "pods", "-o", "json"],
    )
    .await;
    let list: Value = serde_json::from_str(&json_out).unwrap();
    assert_eq!(names(&list), ["first"]);
    assert_eq!(list["items"][0]["status"]["phase"], "Running");

    let table = run_kubectl(&kubectl, &kubeconfig, &["-n", NS, "get", "pods"]).await;
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("NAME") && lines[0].contains("STATUS"),
        "{table}"
    );
    assert!(
        lines[1].starts_with("first") && lines[1].contains("1/1") && lines[1].contains("Running"),
        "{table}"
    );
    let wide = run_kubectl(
        &kubectl,
        &kubeconfig,
        &["-n", NS, "get", "pods", "-o", "wide", "-l", "app=otm"],
    )
    .await;
    assert!(wide.contains("127.0.0.9"), "{wide}");
    let one = run_kubectl(
        &kubectl,
        &kubeconfig,
        &[
            "-n",
            NS,
            "get",
            "pod",
            "first",
            "-o",
            "jsonpath={.metadata.name}",
        ],
    )
    .await;
    assert_eq!(one, "first");

    // `get --watch` prints the pods there are, then the ones created afterwards.
    let mut watch = tokio::process::Command::new(&kubectl)
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["-n", NS, "get", "pods", "--watch", "--request-timeout=30s"])
        .env("HOME", dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = watch.stdout.take().unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let mut seen = Vec::new();
    let mut created = false;
    let found = tokio::time::timeout(PATIENCE, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            seen.push(line.clone());
            if line.starts_with("first") && !created {
                created = true;
                api.create_pod(pod("second", json!({}))).await;
            }
            if line.starts_with("second") {
                return true;
            }
        }
        false
    })
    .await;
    let _ = watch.kill().await;
    assert_eq!(found, Ok(true), "kubectl --watch printed: {seen:?}");

    // And kubectl can write: delete goes through.
    let out = run_kubectl(
        &kubectl,
        &kubeconfig,
        &["-n", NS, "delete", "pod", "second", "--wait=false"],
    )
    .await;
    assert!(out.contains("deleted"), "{out}");
    assert!(api.fake.get("pods", NS, "second").is_none());
}

#[tokio::test]
async fn finalizers_hold_deletion_until_removed() {
    let api = Api::manual().await;
    let path = format!("/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/held");
    let (status, _) = api
        .post(
            &format!("/apis/coordination.k8s.io/v1/namespaces/{NS}/leases"),
            json!({"metadata": {"name": "held", "finalizers": ["otm.dev/cleanup"]}}),
        )
        .await;
    assert_eq!(status, 201);
    let (status, deleting) = api.delete(&path, json!({})).await;
    assert_eq!(status, 200);
    assert!(deleting["metadata"]["deletionTimestamp"].is_string());
    let (status, still) = api.get(&path).await;
    assert_eq!(status, 200, "the finalizer keeps it");
    assert!(still["metadata"]["deletionTimestamp"].is_string());
    let (status, _) = api
        .patch(
            &path,
            "application/merge-patch+json",
            json!({"metadata": {"finalizers": null}}),
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = api.get(&path).await;
    assert_eq!(status, 404, "gone once the finalizer is removed");
}

/// Whether a process runs (a zombie does not count).
fn process_runs(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit(')')
            .next()
            .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
    })
}

#[tokio::test]
async fn a_pod_s_processes_end_with_it() {
    let api = Api::start(FakeApiServer::builder()).await;
    api.create_pod(sleeper(
        "family",
        &["sh", "-c", "sleep 1000 & echo $!; wait"],
    ))
    .await;
    api.wait_pod("family", "Running", |p| phase(p) == "Running")
        .await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let child: u32 = loop {
        let log = api.fake.pod_logs(NS, "family").unwrap_or_default();
        if let Ok(pid) = log.trim().parse() {
            break pid;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no child pid in the log: {log:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(process_runs(child));
    // SIGTERM reaches the shell only (it exits); the container's other process goes with it.
    let (status, _) = api
        .delete(&format!("/api/v1/namespaces/{NS}/pods/family"), json!({}))
        .await;
    assert_eq!(status, 200);
    api.wait_pod("family", "deleted", Value::is_null).await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while process_runs(child) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the pod's child process {child} outlived it"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---- pods as containers ----

/// Builds a local image holding `/bin/sh` and `/bin/sleep` with their libraries, through
/// `podman import` (no registry). `None` when podman cannot build or run it here.
async fn import_test_image(
    podman: &otm_testkit::podman::Podman,
    dir: &std::path::Path,
) -> Option<String> {
    let root = dir.join("rootfs");
    let ldd = std::process::Command::new("ldd")
        .args(["/bin/sh", "/bin/sleep"])
        .output()
        .ok()?;
    let mut files = vec!["/bin/sh".to_owned(), "/bin/sleep".to_owned()];
    for word in String::from_utf8_lossy(&ldd.stdout).split_whitespace() {
        // Library paths; not the `/bin/sh:` headers ldd prints for several files.
        if word.starts_with('/') && !word.ends_with(':') && !files.iter().any(|f| f == word) {
            files.push(word.to_owned());
        }
    }
    for f in &files {
        let target = root.join(f.trim_start_matches('/'));
        std::fs::create_dir_all(target.parent()?).ok()?;
        std::fs::copy(f, &target).ok()?;
    }
    let tar = dir.join("rootfs.tar");
    let ok = std::process::Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .ok()?
        .success();
    if !ok {
        return None;
    }
    let image = format!("localhost/otm-kube-fake-test:{}", std::process::id());
    let out = podman
        .tokio_command()
        .arg("import")
        .arg(&tar)
        .arg(&image)
        .output()
        .await
        .ok()?;
    if !out.status.success() {
        eprintln!(
            "podman import failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    let run = podman
        .tokio_command()
        .args([
            "run",
            "--rm",
            "--network",
            "none",
            &image,
            "/bin/sh",
            "-c",
            "exit 0",
        ])
        .output()
        .await
        .ok()?;
    if !run.status.success() {
        eprintln!(
            "podman cannot run containers here: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        let _ = podman
            .tokio_command()
            .args(["rmi", "--force", &image])
            .output()
            .await;
        return None;
    }
    Some(image)
}

#[tokio::test]
async fn pods_run_as_podman_containers() {
    if std::process::Command::new("podman")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: podman is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Debian's podman: runc (crun refuses a hybrid cgroup layout) and no default ulimits.
    let podman = otm_testkit::podman::Podman::new().unwrap();
    let Some(image) = import_test_image(&podman, dir.path()).await else {
        eprintln!("skipped: podman cannot build and run a test image here");
        return;
    };
    let runner = otm_testkit::kube_fake::ContainerRunner::new(podman.clone())
        .image("otm-test", image.clone());
    let api = Api::start(FakeApiServer::builder().runner(runner)).await;
    api.post(
        &format!("/api/v1/namespaces/{NS}/secrets"),
        json!({"metadata": {"name": "greeting"}, "stringData": {"text": "hello from a secret"}}),
    )
    .await;
    let script = "echo \"$GREETING on $POD_IP\"; echo x > /state/f && echo wrote-volume; \
                  ( : > /root-file ) 2>/dev/null || echo read-only-root; exec sleep 1000";
    api.create_pod(json!({
        "metadata": {"name": "boxed"},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
            "securityContext": {"runAsUser": 65532},
            "volumes": [{"name": "state", "emptyDir": {}}],
            "containers": [{
                "name": "main",
                "image": "otm-test",
                "command": ["/bin/sh", "-c", script],
                "securityContext": {"readOnlyRootFilesystem": true},
                "volumeMounts": [{"name": "state", "mountPath": "/state"}],
                "env": [
                    {"name": "GREETING", "valueFrom": {"secretKeyRef": {"name": "greeting", "key": "text"}}},
                    {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                ],
            }],
        },
    }))
    .await;
    let pod = api
        .wait_pod("boxed", "Running", |p| phase(p) == "Running")
        .await;
    let ip = pod["status"]["podIP"].as_str().unwrap().to_owned();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let log = loop {
        let log = api.fake.pod_logs(NS, "boxed").unwrap_or_default();
        if log.contains("read-only-root") || tokio::time::Instant::now() > deadline {
            break log;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        log.contains(&format!("hello from a secret on {ip}")),
        "{log}"
    );
    assert!(log.contains("wrote-volume"), "{log}");
    assert!(log.contains("read-only-root"), "{log}");

    // sleep runs as the container's PID 1, which ignores SIGTERM: SIGKILL after the grace.
    api.delete(&format!("/api/v1/namespaces/{NS}/pods/boxed"), json!({}))
        .await;
    api.wait_pod("boxed", "deleted", Value::is_null).await;
    let left = podman
        .tokio_command()
        .args(["ps", "--all", "--quiet", "--filter"])
        .arg(format!(
            "label={}=boxed",
            otm_testkit::kube_fake::container::POD_NAME_LABEL
        ))
        .output()
        .await
        .unwrap();
    assert!(left.stdout.is_empty(), "the container is removed");
    let _ = podman
        .tokio_command()
        .args(["rmi", "--force", &image])
        .output()
        .await;
}

// ---- the otm shim as a pod ----

/// The `otm` binary of this build, when it has been built (`cargo build` builds it).
fn otm_binary() -> Option<std::path::PathBuf> {
    let exe = std::env::current_exe().ok()?;
    // target/<profile>/deps/<test> -> target/<profile>/otm
    let otm = exe.parent()?.parent()?.join("otm");
    otm.is_file().then_some(otm)
}

#[tokio::test]
async fn the_otm_shim_runs_as_a_pod_and_answers_on_its_pod_ip() {
    let Some(otm) = otm_binary() else {
        eprintln!("skipped: the otm binary is not built (cargo build -p otm)");
        return;
    };
    let runner = ProcessRunner::new()
        .binary("otm", otm)
        .rewrite_mount_paths();
    let api = Api::start(FakeApiServer::builder().runner(runner)).await;
    // As the kube runtime would write it: the token in a Secret, state in an emptyDir.
    api.create_pod(json!({
        "metadata": {"name": "otm-i1", "labels": {"otm.dev/instance": "i1"}},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": false,
            "volumes": [{"name": "instance", "emptyDir": {"sizeLimit": "1Gi"}}],
            "containers": [{
                "name": "shim",
                "image": "registry.example/otm:dev",
                "command": ["otm", "shim"],
                "args": [
                    "--instance", "i1",
                    "--dir", "/var/lib/otm/instance",
                    "--listen", "tcp:$(POD_IP):7070",
                    "--token-env", "OTM_SHIM_TOKEN",
                ],
                "env": [
                    {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                    {"name": "OTM_SHIM_TOKEN", "valueFrom": {"secretKeyRef": {"name": "otm-i1-token", "key": "token"}}},
                ],
                "ports": [{"name": "control", "containerPort": 7070}],
                "readinessProbe": {"tcpSocket": {"port": "control"}},
                "securityContext": {"readOnlyRootFilesystem": true},
                "volumeMounts": [{"name": "instance", "mountPath": "/var/lib/otm/instance"}],
            }],
        },
    }))
    .await;
    api.post(
        &format!("/api/v1/namespaces/{NS}/secrets"),
        json!({"metadata": {"name": "otm-i1-token"}, "stringData": {"token": "shim-secret"}}),
    )
    .await;
    let pod = api.wait_pod("otm-i1", "Ready", is_ready).await;
    let url = format!(
        "http://{}:7070/v1/status",
        pod["status"]["podIP"].as_str().unwrap()
    );
    let status: Value = api
        .http
        .get(&url)
        .bearer_auth("shim-secret")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["instance"], "i1");
    let refused = api.http.get(&url).send().await.unwrap();
    assert_eq!(refused.status().as_u16(), 401);

    let (status, _) = api
        .delete(&format!("/api/v1/namespaces/{NS}/pods/otm-i1"), json!({}))
        .await;
    assert_eq!(status, 200);
    let gone = api
        .fake
        .wait_for("pods", NS, "otm-i1", PATIENCE, |p| p.is_none())
        .await;
    assert!(gone, "the shim pod was never removed");
    assert!(
        api.http
            .get(&url)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .is_err()
    );
}

#[tokio::test]
async fn pre_stop_hooks_run_before_sigterm() {
    let api = Api::start(FakeApiServer::builder()).await;
    // The main process reports, on SIGTERM, whether the hook had already run.
    let main = "trap '[ -f \"$HOME/hook-ran\" ] && echo hook-before-term; exit 0' TERM; \
                echo up; while :; do sleep 0.1; done";
    api.create_pod(json!({
        "metadata": {"name": "hooked"},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 10,
            "containers": [{
                "name": "main",
                "image": "busybox",
                "command": ["sh", "-c", main],
                "lifecycle": {"preStop": {"exec": {"command": ["sh", "-c", "sleep 0.3; touch \"$HOME/hook-ran\""]}}},
            }],
        },
    }))
    .await;
    api.wait_pod("hooked", "Running", |p| phase(p) == "Running")
        .await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !api
        .fake
        .pod_logs(NS, "hooked")
        .unwrap_or_default()
        .contains("up")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the pod never started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let now = api.fake.resource_version();
    let mut w = api
        .watch(&format!(
            "/api/v1/namespaces/{NS}/pods?watch=true&resourceVersion={now}"
        ))
        .await;
    api.delete(&format!("/api/v1/namespaces/{NS}/pods/hooked"), json!({}))
        .await;
    let events = w.until(|e| e["type"] == "DELETED").await;
    let exited = events
        .iter()
        .find(|e| terminated(&e["object"]).is_object())
        .expect("the exit is reported before the deletion");
    assert_eq!(
        terminated(&exited["object"])["exitCode"],
        0,
        "it exited on SIGTERM, not SIGKILL"
    );
    let log = api.fake.pod_logs(NS, "hooked").unwrap();
    assert!(log.contains("hook-before-term"), "{log}");
}
