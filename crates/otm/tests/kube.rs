//! The `kube` runtime against the fake Kubernetes API server of `otm-testkit` (real HTTP, list
//! and watch, preconditions; its pods run as local `otm shim` processes, each on a loopback
//! address of its own), or against a real cluster when `OTM_TEST_KUBECONFIG` is set:
//! - `OTM_TEST_KUBE_NAMESPACE` (default `otm-test`, which must exist) and `OTM_TEST_KUBE_IMAGE`
//!   (the otm image, built by `scripts/build-images` and pullable by the cluster);
//! - `OTM_TEST_KUBE_RUNTIME_CLASS` (default: the cluster's default runtime);
//! - the cluster tests (two orchestrators) need pod IPs routable from this machine and
//!   `OTM_TEST_KUBE_EGRESS_URL`, an address of this machine the pods can reach.
//!
//! The cluster tests also need PostgreSQL and Redis (`OTM_TEST_POSTGRES_URL`,
//! `OTM_TEST_REDIS_URL`) and are skipped with a message without them.
//!
//! With `OTM_TEST_IMAGES` set (podman and runc installed; `.ci/run` sets it), the conformance
//! suite and the two-orchestrator delivery test run a second time with the fake's pods as real
//! containers of the otm image (built offline from this build once per run, or the one
//! `OTM_TEST_IMAGE` names): read-only, as user 65532, without capabilities, with the pod's
//! emptyDirs as tmpfs and its limits, on the host's network so that each listens on its pod IP.

mod common;

use common::cluster::*;
use futures::StreamExt;
use otm_core::{InstanceId, InstanceSpec, LeaderElector, Runtime, RuntimeEvent, Secret, TenantId};
use otm_runtime::kube::{KubeRuntime, KubeRuntimeConfig, lease::LeaseElector, spec as pod_spec};
use otm_testkit::kube_fake::{ContainerRunner, FakeApiServer, ProcessRunner};
use otm_testkit::podman::Podman;
use otm_testkit::text_update;
use serde_json::Value;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The image name the fake maps to the built `otm`.
const FAKE_IMAGE: &str = "otm-test:dev";
/// The OpenClaw image's name in the fake: a stand-in of its `/usr/local/bin` (this build's `otm`
/// and `otm-reference-agent`, and nothing on `PATH` that holds them) as processes, or the otm
/// image as containers. That the real OpenClaw image holds the reference agent is checked by
/// `images.rs`; here what is checked is that a warm pod of that image serves any tenant.
const FAKE_OPENCLAW_IMAGE: &str = "otm-openclaw-test:dev";

/// A directory laid out as the OpenClaw image's `/usr/local/bin`, with this build's binaries
/// linked (or copied) in: `otm shim` finds the reference agent beside itself there, or not at
/// all.
fn openclaw_image_stand_in(dir: &std::path::Path) -> PathBuf {
    let bin = dir.join("openclaw-image/usr/local/bin");
    std::fs::create_dir_all(&bin).unwrap();
    let otm = PathBuf::from(env!("CARGO_BIN_EXE_otm"));
    let agent = otm.with_file_name("otm-reference-agent");
    for from in [&otm, &agent] {
        let to = bin.join(from.file_name().unwrap());
        if std::fs::hard_link(from, &to).is_err() {
            std::fs::copy(from, &to).unwrap();
        }
    }
    bin.join("otm")
}

/// How the fake runs its pods.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pods {
    /// As local `otm shim` processes.
    Processes,
    /// As podman containers of the otm image.
    Containers,
}

/// The otm image the fake's containers run, built once per test binary: the tag is fixed, so
/// each run replaces the last one's image rather than adding one.
async fn otm_image(podman: &Podman) -> String {
    static IMAGE: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();
    IMAGE
        .get_or_init(|| async {
            if let Some(tag) = env("OTM_TEST_IMAGE") {
                return tag;
            }
            let podman = podman.clone();
            tokio::task::spawn_blocking(move || {
                let version = "kube-fake-test";
                let _ = podman
                    .command()
                    .args(["rmi", "-f", "--ignore", &format!("localhost/otm:{version}")])
                    .output();
                let started = Instant::now();
                let image = common::images::build_image(&podman, "otm", version);
                eprintln!("built {image} in {:?}", started.elapsed());
                image
            })
            .await
            .unwrap()
        })
        .await
        .clone()
}

/// Where the tests' pods live: the fake, or a real cluster.
struct Kube {
    fake: Option<FakeApiServer>,
    /// With the fake's pods as containers, how podman is run.
    podman: Option<Podman>,
    kubeconfig: PathBuf,
    namespace: String,
    image: String,
    /// `--kube-openclaw-image`, when a test sets it.
    openclaw_image: Option<String>,
    runtime_class: Option<String>,
    _dir: tempfile::TempDir,
}

impl Kube {
    async fn start() -> Kube {
        Kube::start_with(Pods::Processes).await
    }

    /// With `Pods::Containers`, `None` (after saying why) unless `OTM_TEST_IMAGES` is set, and
    /// against a real cluster (whose pods are containers anyway).
    async fn start_containers(test: &str) -> Option<Kube> {
        if !common::images::enabled(test, "1") {
            return None;
        }
        if env("OTM_TEST_KUBECONFIG").is_some() {
            eprintln!("{test}: skipped: a real cluster runs its pods as containers anyway");
            return None;
        }
        Some(Kube::start_with(Pods::Containers).await)
    }

    async fn start_with(pods: Pods) -> Kube {
        let dir = common::tempdir();
        if let Some(kc) = env("OTM_TEST_KUBECONFIG") {
            let image = env("OTM_TEST_KUBE_IMAGE").expect(
                "OTM_TEST_KUBE_IMAGE must name the otm image when OTM_TEST_KUBECONFIG is set",
            );
            eprintln!("running against the cluster of {kc}");
            return Kube {
                fake: None,
                podman: None,
                kubeconfig: kc.into(),
                namespace: env("OTM_TEST_KUBE_NAMESPACE").unwrap_or_else(|| "otm-test".into()),
                image,
                openclaw_image: None,
                runtime_class: env("OTM_TEST_KUBE_RUNTIME_CLASS"),
                _dir: dir,
            };
        }
        let builder = FakeApiServer::builder();
        let (builder, podman) = match pods {
            Pods::Processes => (
                builder.runner(
                    ProcessRunner::new()
                        .binary(FAKE_IMAGE, env!("CARGO_BIN_EXE_otm"))
                        .binary(FAKE_OPENCLAW_IMAGE, openclaw_image_stand_in(dir.path())),
                ),
                None,
            ),
            Pods::Containers => {
                let podman = Podman::new().unwrap();
                let image = otm_image(&podman).await;
                (
                    builder.runner(
                        ContainerRunner::new(podman.clone())
                            .image(FAKE_IMAGE, image.clone())
                            .image(FAKE_OPENCLAW_IMAGE, image),
                    ),
                    Some(podman),
                )
            }
        };
        let fake = builder.start().await.unwrap();
        let kubeconfig = fake
            .write_kubeconfig(&dir.path().join("kubeconfig"))
            .unwrap();
        Kube {
            fake: Some(fake),
            podman,
            kubeconfig,
            namespace: "otm-tenants".into(),
            image: FAKE_IMAGE.into(),
            openclaw_image: None,
            runtime_class: Some("kata-qemu".into()),
            _dir: dir,
        }
    }

    /// Gives the orchestrators `--kube-openclaw-image` (the fake's stand-in, or
    /// `OTM_TEST_KUBE_OPENCLAW_IMAGE` on a real cluster); false, after saying why, without one.
    fn use_openclaw_image(&mut self) -> bool {
        self.openclaw_image = if self.fake.is_some() {
            Some(FAKE_OPENCLAW_IMAGE.to_owned())
        } else {
            env("OTM_TEST_KUBE_OPENCLAW_IMAGE")
        };
        if self.openclaw_image.is_none() {
            eprintln!("skipped: against a real cluster this needs OTM_TEST_KUBE_OPENCLAW_IMAGE");
        }
        self.openclaw_image.is_some()
    }

    /// An instance pod as the API server has it.
    fn pod(&self, name: &str) -> Option<Value> {
        self.pods()
            .into_iter()
            .find(|p| p["metadata"]["name"] == name)
    }

    /// The running warm pods.
    fn warm_pods(&self) -> Vec<String> {
        self.pods()
            .iter()
            .filter(|p| {
                p["metadata"]["labels"]["otm.dev/warm"] == "true"
                    && p["status"]["phase"] == "Running"
                    && p["metadata"]["deletionTimestamp"].is_null()
            })
            .map(|p| p["metadata"]["name"].as_str().unwrap().to_owned())
            .collect()
    }

    fn config(&self) -> KubeRuntimeConfig {
        KubeRuntimeConfig {
            namespace: self.namespace.clone(),
            image: self.image.clone(),
            runtime_class: self.runtime_class.clone(),
            // A real test cluster may not have the chart's PriorityClasses.
            priority_classes: self.fake.is_some(),
            create_timeout: Duration::from_secs(120),
            ..KubeRuntimeConfig::default()
        }
    }

    async fn runtime(&self) -> KubeRuntime {
        let client = KubeRuntime::client_from_kubeconfig(&self.kubeconfig)
            .await
            .unwrap();
        KubeRuntime::new(client, self.config()).await.unwrap()
    }

    /// With the fake's pods as containers: the pod runs as a container of the otm image, confined
    /// as the pod asks (user 65532, read-only root, no capabilities, no new privileges, its
    /// emptyDirs as tmpfs, its memory limit), and listening on its pod IP.
    fn assert_pod_is_a_confined_container(&self, pod: &str) {
        let Some(podman) = &self.podman else { return };
        let found = podman.run(&[
            "ps",
            "--filter",
            &format!(
                "label={}={pod}",
                otm_testkit::kube_fake::container::POD_NAME_LABEL
            ),
            "--format",
            "{{.Names}}",
        ]);
        let names: Vec<&str> = found.lines().collect();
        assert_eq!(
            names.len(),
            1,
            "one running container for pod {pod}: {found:?}"
        );
        let inspect: Value = serde_json::from_str(&podman.run(&["inspect", names[0]])).unwrap();
        let c = &inspect[0];
        assert_eq!(c["Config"]["User"], "65532:65532", "{c}");
        assert_eq!(c["HostConfig"]["ReadonlyRootfs"], true);
        assert_eq!(c["HostConfig"]["NetworkMode"], "host");
        assert_eq!(c["HostConfig"]["Memory"], 2u64 << 30);
        let tmpfs = c["HostConfig"]["Tmpfs"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        for dir in ["/var/lib/otm/instance", "/tmp"] {
            assert!(tmpfs.contains_key(dir), "{dir} is a tmpfs: {tmpfs:?}");
        }
        // The container's processes, as the host sees them.
        let pid = c["State"]["Pid"].as_i64().unwrap();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
                .unwrap_or_default()
                .to_owned()
        };
        assert_eq!(field("Uid:"), "65532\t65532\t65532\t65532");
        assert_eq!(field("CapEff:"), "0000000000000000");
        assert_eq!(field("NoNewPrivs:"), "1");
        let ip = self
            .fake
            .as_ref()
            .unwrap()
            .get("pods", &self.namespace, pod)
            .unwrap()["status"]["podIP"]
            .as_str()
            .unwrap()
            .to_owned();
        std::net::TcpStream::connect((ip.as_str(), 7070))
            .unwrap_or_else(|e| panic!("the shim of {pod} listens on its pod IP {ip}: {e}"));
        // The container's output is the pod's log.
        let log = self
            .fake
            .as_ref()
            .unwrap()
            .pod_logs(&self.namespace, pod)
            .unwrap_or_default();
        assert!(log.contains("shim listening"), "the pod's log: {log}");
        // The shim's token reached the container from its Secret, and no process on the host
        // (podman's included) has it on its command line.
        let token = c["Config"]["Env"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .find_map(|e| e.strip_prefix("OTM_SHIM_TOKEN="))
            .expect("the container has the shim's token")
            .to_owned();
        assert!(token.len() >= 16, "a real token");
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
                let cmdline = String::from_utf8_lossy(&cmdline);
                assert!(
                    !cmdline.contains(&token),
                    "the token is in a command line: {cmdline}"
                );
            }
        }
    }

    /// Makes an instance's pod die as a crash would.
    fn fail_pod(&self, id: &InstanceId) {
        let name = pod_spec::pod_name(id);
        match &self.fake {
            Some(f) => assert!(
                f.fail_pod(&self.namespace, &name, 137, "Error"),
                "no pod {name}"
            ),
            None => {
                let st = std::process::Command::new("kubectl")
                    .arg("--kubeconfig")
                    .arg(&self.kubeconfig)
                    .args(["-n", &self.namespace, "delete", "pod", &name])
                    .args(["--grace-period=0", "--force", "--wait=false"])
                    .status()
                    .unwrap();
                assert!(st.success());
            }
        }
    }

    /// Deletes an instance's pod with its grace period, as an eviction or a node drain does.
    async fn evict_pod(&self, id: &InstanceId) {
        let name = pod_spec::pod_name(id);
        match &self.fake {
            Some(f) => {
                let r = reqwest::Client::new()
                    .delete(format!(
                        "{}/api/v1/namespaces/{}/pods/{name}",
                        f.url(),
                        self.namespace
                    ))
                    .send()
                    .await
                    .unwrap();
                assert!(r.status().is_success(), "{}", r.status());
            }
            None => {
                let st = std::process::Command::new("kubectl")
                    .arg("--kubeconfig")
                    .arg(&self.kubeconfig)
                    .args([
                        "-n",
                        &self.namespace,
                        "delete",
                        "pod",
                        &name,
                        "--wait=false",
                    ])
                    .status()
                    .unwrap();
                assert!(st.success());
            }
        }
    }

    /// The instance pods, as the API server has them.
    fn pods(&self) -> Vec<Value> {
        let all = match &self.fake {
            Some(f) => f.list("pods", Some(&self.namespace)),
            None => {
                let out = std::process::Command::new("kubectl")
                    .arg("--kubeconfig")
                    .arg(&self.kubeconfig)
                    .args(["-n", &self.namespace, "get", "pods", "-o", "json"])
                    .args(["-l", pod_spec::SELECTOR])
                    .output()
                    .unwrap();
                let v: Value = serde_json::from_slice(&out.stdout).unwrap();
                v["items"].as_array().cloned().unwrap_or_default()
            }
        };
        all.into_iter()
            .filter(|p| p["metadata"]["labels"]["otm.dev/role"] == "instance")
            .collect()
    }

    /// The names of every instance pod.
    fn pod_names(&self) -> Vec<String> {
        self.pods()
            .iter()
            .map(|p| p["metadata"]["name"].as_str().unwrap().to_owned())
            .collect()
    }

    fn pods_of(&self, tenant: &str) -> Vec<String> {
        self.pods()
            .iter()
            .filter(|p| {
                p["metadata"]["labels"]["otm.dev/tenant"] == tenant
                    && p["metadata"]["deletionTimestamp"].is_null()
            })
            .map(|p| p["metadata"]["name"].as_str().unwrap().to_owned())
            .collect()
    }

    fn secret(&self, name: &str) -> Option<Value> {
        self.fake.as_ref()?.get("secrets", &self.namespace, name)
    }

    /// `otm server` arguments and variables for the `kube` runtime.
    fn options(&self) -> Options {
        let mut args: Vec<String> = [
            "--runtime",
            "kube",
            "--kube-namespace",
            &self.namespace,
            "--kube-image",
            &self.image,
            "--kube-runtime-class",
            self.runtime_class.as_deref().unwrap_or(""),
            "--kube-priority-classes",
            if self.fake.is_some() { "true" } else { "false" },
        ]
        .map(String::from)
        .to_vec();
        if let Some(url) = env("OTM_TEST_KUBE_EGRESS_URL") {
            args.extend(["--egress-url".to_owned(), url]);
        }
        if let Some(image) = &self.openclaw_image {
            args.extend(["--kube-openclaw-image".to_owned(), image.clone()]);
        }
        Options {
            orchestrator_args: args,
            orchestrator_env: vec![(
                "KUBECONFIG".to_owned(),
                self.kubeconfig.display().to_string(),
            )],
        }
    }
}

fn spec(tenant: Option<&str>) -> InstanceSpec {
    InstanceSpec {
        id: InstanceId::random(),
        shim_token: Secret::random(),
        tenant: tenant.map(|t| TenantId::parse(t).unwrap()),
        limits: Default::default(),
        profile: tenant.map(|_| "reference".to_owned()),
    }
}

async fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_runtime_conformance_suite_passes_on_kube() {
    let kube = Kube::start().await;
    let rt = Arc::new(kube.runtime().await);
    otm_runtime::conformance::runtime_suite(rt, |id| kube.fail_pod(id)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_runtime_conformance_suite_passes_on_kube_with_pods_as_containers() {
    let Some(kube) = Kube::start_containers("the conformance suite with containers").await else {
        return;
    };
    let started = Instant::now();
    let rt = Arc::new(kube.runtime().await);
    otm_runtime::conformance::runtime_suite(rt, |id| kube.fail_pod(id)).await;
    eprintln!(
        "the conformance suite with containers took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pod_has_its_token_in_a_secret_it_owns_and_both_go_on_delete() {
    let kube = Kube::start().await;
    if kube.fake.is_none() {
        eprintln!("skipped against a real cluster: reads the fake's objects");
        return;
    }
    let rt = kube.runtime().await;
    let s = spec(Some("alice"));
    let created = rt.create(&s).await.unwrap();
    assert!(
        created.address.starts_with("http://127."),
        "{}",
        created.address
    );
    assert!(created.address.ends_with(":7070"));
    let name = pod_spec::pod_name(&s.id);
    let pod = kube
        .fake
        .as_ref()
        .unwrap()
        .get("pods", &kube.namespace, &name)
        .unwrap();
    assert_eq!(pod["spec"]["runtimeClassName"], "kata-qemu");
    assert_eq!(pod["spec"]["priorityClassName"], "otm-tenant");
    assert_eq!(pod["spec"]["automountServiceAccountToken"], false);
    assert_eq!(pod["metadata"]["labels"]["otm.dev/tenant"], "alice");
    assert_eq!(
        pod["metadata"]["annotations"]["karpenter.sh/do-not-disrupt"],
        "true"
    );
    assert!(
        !pod.to_string().contains(s.shim_token.expose()),
        "the token is not in the pod"
    );
    let secret = kube.secret(&name).expect("the token's secret");
    assert_eq!(
        secret["metadata"]["ownerReferences"][0]["uid"], pod["metadata"]["uid"],
        "the pod owns its secret"
    );
    rt.delete(&s.id).await.unwrap();
    eventually("pod and secret gone", Duration::from_secs(15), || {
        kube.fake
            .as_ref()
            .unwrap()
            .get("pods", &kube.namespace, &name)
            .is_none()
            && kube.secret(&name).is_none()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn of_two_orchestrators_claiming_one_warm_pod_exactly_one_wins() {
    let kube = Kube::start().await;
    let (a, b) = (kube.runtime().await, kube.runtime().await);
    for round in 0..3 {
        let warm = spec(None);
        a.create(&warm).await.unwrap();
        // Both have seen the pod running.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !b
            .list()
            .await
            .unwrap()
            .iter()
            .any(|i| i.id == warm.id && i.alive)
        {
            assert!(Instant::now() < deadline, "the second watcher sees the pod");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (ta, tb) = (
            TenantId::parse("ta").unwrap(),
            TenantId::parse("tb").unwrap(),
        );
        let (ra, rb) = tokio::join!(a.claim(&warm.id, &ta), b.claim(&warm.id, &tb));
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        assert!(
            ra ^ rb,
            "round {round}: exactly one claim wins (a {ra}, b {rb})"
        );
        let winner = if ra { "ta" } else { "tb" };
        let pod = kube
            .pods()
            .into_iter()
            .find(|p| p["metadata"]["name"] == pod_spec::pod_name(&warm.id).as_str())
            .unwrap();
        assert_eq!(pod["metadata"]["labels"]["otm.dev/tenant"], winner);
        assert_eq!(pod["metadata"]["labels"]["otm.dev/warm"], "false");
        // A claimed pod cannot be claimed again.
        let again = a
            .claim(&warm.id, &TenantId::parse("tc").unwrap())
            .await
            .unwrap();
        assert!(!again, "a bound pod is not claimable");
        a.delete(&warm.id).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_has_one_holder_and_moves_when_it_lapses() {
    let kube = Kube::start().await;
    let client = || KubeRuntime::client_from_kubeconfig(&kube.kubeconfig);
    let name = format!("otm-test-lease-{}", random_suffix());
    let a = LeaseElector::new(client().await.unwrap(), &kube.namespace, &name, "holder-a");
    let b = LeaseElector::new(client().await.unwrap(), &kube.namespace, &name, "holder-b");
    assert!(
        a.acquire_or_renew().await.unwrap(),
        "the first candidate takes it"
    );
    assert!(!b.acquire_or_renew().await.unwrap(), "the second does not");
    // While `a` renews, `b` never gets it.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(a.acquire_or_renew().await.unwrap());
        assert!(!b.acquire_or_renew().await.unwrap());
    }
    // `a` stops renewing: `b` takes over after a lease duration of no change.
    let stopped = Instant::now();
    loop {
        if b.acquire_or_renew().await.unwrap() {
            break;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(30),
            "b never took over"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!(
        "the lease moved {:?} after the holder stopped",
        stopped.elapsed()
    );
    assert!(
        !a.acquire_or_renew().await.unwrap(),
        "the old holder is out"
    );
    if let Some(f) = &kube.fake {
        let lease = f.get("leases", &kube.namespace, &name).unwrap();
        assert_eq!(lease["spec"]["holderIdentity"], "holder-b");
        assert_eq!(lease["spec"]["leaseTransitions"], 1);
    }
    // A released lease is taken at once.
    b.release().await.unwrap();
    assert!(a.acquire_or_renew().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_pod_is_reported_at_once_and_a_deleted_one_is_not() {
    let kube = Kube::start().await;
    let rt = kube.runtime().await;
    let mut events = rt.events();
    let s = spec(Some("crashy"));
    rt.create(&s).await.unwrap();
    let failed = Instant::now();
    kube.fail_pod(&s.id);
    let ev = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(RuntimeEvent::Exited { id, detail }) = events.next().await
                && id == s.id
            {
                return detail;
            }
        }
    })
    .await
    .expect("an exit event");
    let after = failed.elapsed();
    eprintln!("pod failure reported after {after:?}: {ev}");
    // The watch carries the failure as it happens (a few ms against the fake). On a real
    // cluster the kubelet first has to see the container die and write the pod's status, which
    // takes its own time: there the bound is the "about a second", with room.
    let bound = if kube.fake.is_some() {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(5)
    };
    assert!(
        after < bound,
        "a failed pod is reported within {bound:?}, not after {after:?}"
    );
    rt.delete(&s.id).await.unwrap();

    // A pod the runtime deletes itself is no event: its instance did not die.
    let quiet = spec(Some("quiet"));
    rt.create(&quiet).await.unwrap();
    rt.delete(&quiet.id).await.unwrap();
    eventually("the deleted pod is gone", Duration::from_secs(30), || {
        !kube.pod_names().contains(&pod_spec::pod_name(&quiet.id))
    })
    .await;
    let reported = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            match events.next().await {
                Some(RuntimeEvent::Exited { id, .. } | RuntimeEvent::Terminating { id, .. })
                    if id == quiet.id =>
                {
                    return;
                }
                Some(_) => {}
                None => std::future::pending::<()>().await,
            }
        }
    })
    .await;
    assert!(reported.is_err(), "a deleted pod is not reported");
}

// ---- Two orchestrators and a router on PostgreSQL + Redis, instances as pods -------------------

/// otm's egress Service as pods see it: one address in front of every replica's egress
/// listener, so that an agent's Bot API calls outlive the orchestrator that woke it.
struct EgressService {
    port: u16,
    backends: Arc<std::sync::Mutex<Vec<u16>>>,
}

impl EgressService {
    async fn start() -> EgressService {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let backends: Arc<std::sync::Mutex<Vec<u16>>> = Arc::default();
        let b = backends.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let ports = b.lock().unwrap().clone();
                tokio::spawn(async move {
                    for p in ports {
                        if let Ok(mut out) = tokio::net::TcpStream::connect(("127.0.0.1", p)).await
                        {
                            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                            return;
                        }
                    }
                });
            }
        });
        EgressService { port, backends }
    }

    fn serve(&self, c: &Cluster) {
        *self.backends.lock().unwrap() = c
            .orchestrators
            .iter()
            .chain(&c.routers)
            .map(|p| p.egress)
            .collect();
    }
}

async fn kube_cluster(kube: &Kube) -> Option<(Cluster, Option<EgressService>)> {
    if kube.fake.is_none() && env("OTM_TEST_KUBE_EGRESS_URL").is_none() {
        eprintln!("skipped: against a real cluster the pods need OTM_TEST_KUBE_EGRESS_URL");
        return None;
    }
    let b = pg_redis()?;
    let mut options = kube.options();
    let service = if kube.fake.is_some() {
        let s = EgressService::start().await;
        options.orchestrator_args.extend([
            "--egress-url".to_owned(),
            format!("http://127.0.0.1:{}", s.port),
        ]);
        Some(s)
    } else {
        None
    };
    let c = Cluster::start_with(b, options).await;
    if let Some(s) = &service {
        s.serve(&c);
    }
    Some((c, service))
}

async fn admin(c: &Cluster, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
    for o in &c.orchestrators {
        let mut r = c
            .http
            .request(
                method.clone(),
                format!("http://127.0.0.1:{}{path}", o.admin),
            )
            .bearer_auth(ADMIN_TOKEN);
        if let Some(b) = &body {
            r = r.json(b);
        }
        if let Ok(r) = r.send().await {
            let status = r.status();
            let v: Value = r.json().await.unwrap_or_default();
            assert!(status.is_success(), "{method} {path}: {status} {v}");
            return v;
        }
    }
    panic!("no orchestrator answers");
}

async fn send_and_wait(
    c: &Cluster,
    tenant: &str,
    secret: &str,
    token: &str,
    updates: &[(i64, i64, String)],
) {
    let before = c.tg.sent_messages(token).len();
    for (id, chat, text) in updates {
        let status = c
            .post(0, tenant, secret, &text_update(*id, *chat, text))
            .await;
        if status != 200 {
            c.dump_logs();
        }
        assert_eq!(status, 200);
    }
    let got =
        c.tg.wait_for_messages(token, before + updates.len(), Duration::from_secs(120))
            .await;
    if got.len() != before + updates.len() {
        c.dump_logs();
    }
    assert_eq!(got.len(), before + updates.len(), "every update answered");
}

/// Sets the warm pool's target to `n` and waits until `n` warm pods run and the registry has
/// them; returns their names.
async fn warm_pool(c: &Cluster, kube: &Kube, n: usize) -> Vec<String> {
    admin(
        c,
        reqwest::Method::PUT,
        "/v1/config",
        Some(serde_json::json!({ "warm_pool_target": n })),
    )
    .await;
    eventually("the warm pods run", Duration::from_secs(30), || {
        kube.warm_pods().len() == n
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let list = admin(c, reqwest::Method::GET, "/v1/instances", None).await;
        let registered = list
            .as_array()
            .into_iter()
            .flatten()
            .filter(|i| i["state"] == "warm")
            .count();
        if registered == n {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the warm instances are registered: {list}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    kube.warm_pods()
}

/// Wakes a tenant through orchestrator `o` and returns the answer.
async fn wake_through(c: &Cluster, o: usize, tenant: &str) -> Value {
    let r = c
        .http
        .post(format!(
            "http://127.0.0.1:{}/v1/tenants/{tenant}/wake",
            c.orchestrators[o].admin
        ))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let v: Value = r.json().await.unwrap_or_default();
    if !status.is_success() {
        c.dump_logs();
    }
    assert!(status.is_success(), "waking {tenant}: {status} {v}");
    v
}

/// The image of a pod's container.
fn image_of(pod: &Value) -> String {
    pod["spec"]["containers"][0]["image"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_orchestrators_on_kube_deliver_in_order_sleep_wake_and_survive_a_crash() {
    let kube = Kube::start().await;
    deliver_in_order_sleep_wake_and_survive_a_crash(&kube).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_orchestrators_on_kube_with_pods_as_containers_deliver_in_order_sleep_wake_and_survive_a_crash()
 {
    let test = "two orchestrators with containers";
    let Some(kube) = Kube::start_containers(test).await else {
        return;
    };
    let started = Instant::now();
    deliver_in_order_sleep_wake_and_survive_a_crash(&kube).await;
    eprintln!("{test}: took {:?}", started.elapsed());
}

async fn deliver_in_order_sleep_wake_and_survive_a_crash(kube: &Kube) {
    let Some((c, _egress)) = kube_cluster(kube).await else {
        return;
    };
    let token = "9601:KUBE";
    let secret = c.create_tenant("kt", token).await;

    // Ordered delivery: three chats, five updates each, answered in order per chat by one pod.
    let updates: Vec<(i64, i64, String)> = (1..=5)
        .flat_map(|i| (0..3).map(move |chat| (chat * 100 + i, 500 + chat, format!("c{chat} m{i}"))))
        .collect();
    send_and_wait(&c, "kt", &secret, token, &updates).await;
    let all = c.tg.sent_messages(token);
    for chat in 0..3i64 {
        let texts: Vec<&str> = all
            .iter()
            .filter(|m| m.chat_id == 500 + chat)
            .map(|m| m.text.as_str())
            .collect();
        assert_eq!(texts.len(), 5);
        let mut prev = 0;
        for (i, t) in texts.iter().enumerate() {
            let n: u32 = t[1..t.find(':').unwrap()].parse().unwrap();
            assert!(n > prev, "chat {chat}: in order: {texts:?}");
            prev = n;
            assert!(t.ends_with(&format!("c{chat} m{}", i + 1)), "{texts:?}");
        }
    }
    let pods = kube.pods_of("kt");
    assert_eq!(pods.len(), 1, "one pod serves the tenant: {pods:?}");
    kube.assert_pod_is_a_confined_container(&pods[0]);

    // Sleep: the pod goes, the state is kept; wake: a new pod goes on from it.
    admin(&c, reqwest::Method::POST, "/v1/tenants/kt/stop", None).await;
    eventually("the pod is gone", Duration::from_secs(30), || {
        kube.pods_of("kt").is_empty()
    })
    .await;
    send_and_wait(
        &c,
        "kt",
        &secret,
        token,
        &[(9001, 500, "after sleep".into())],
    )
    .await;
    let last = c.tg.sent_messages(token).last().unwrap().text.clone();
    assert_eq!(last, "#6: after sleep", "memory survives the sleep");
    let second = kube.pods_of("kt");
    assert_eq!(second.len(), 1);
    assert_ne!(second, pods, "a new pod");

    // Crash: the pod fails; the orchestrators notice, and the next update wakes the tenant
    // again from its last snapshot (a pod's own disk goes with it). First the last delivery is
    // acknowledged, so that nothing is delivered again.
    let deadline = Instant::now() + Duration::from_secs(30);
    while admin(&c, reqwest::Method::GET, "/v1/tenants/kt", None).await["inbox_pending"] != 0 {
        assert!(Instant::now() < deadline, "the inbox drains");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let id = InstanceId::parse(second[0].trim_start_matches("otm-")).unwrap();
    let failed = Instant::now();
    kube.fail_pod(&id);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let t = admin(&c, reqwest::Method::GET, "/v1/tenants/kt", None).await;
        if t["status"] != "running" {
            let after = failed.elapsed();
            eprintln!("pod failure noticed after {after:?}");
            // Against the fake, the watch brings the failure within milliseconds and the
            // orchestrator retires the instance at once (its shim refuses connections): the
            // tenant is no longer running well within a second. A real kubelet takes longer to
            // see the container die.
            if kube.fake.is_some() {
                assert!(
                    after < Duration::from_secs(1),
                    "the failure is noticed within a second, not after {after:?}"
                );
            }
            break;
        }
        assert!(Instant::now() < deadline, "the failure is noticed: {t}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    send_and_wait(
        &c,
        "kt",
        &secret,
        token,
        &[(9002, 500, "after crash".into())],
    )
    .await;
    let last = c.tg.sent_messages(token).last().unwrap().text.clone();
    assert_eq!(last, "#6: after crash", "the state of the last snapshot");

    // Eviction: the pod is deleted with its grace period by someone else; its shim serves on,
    // the orchestrators stop the tenant with a final snapshot, and nothing is lost.
    let deadline = Instant::now() + Duration::from_secs(30);
    while admin(&c, reqwest::Method::GET, "/v1/tenants/kt", None).await["inbox_pending"] != 0 {
        assert!(Instant::now() < deadline, "the inbox drains");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let third = kube.pods_of("kt");
    assert_eq!(third.len(), 1);
    kube.evict_pod(&InstanceId::parse(third[0].trim_start_matches("otm-")).unwrap())
        .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let t = admin(&c, reqwest::Method::GET, "/v1/tenants/kt", None).await;
        if t["status"] != "running" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the evicted tenant is put to sleep: {t}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    send_and_wait(
        &c,
        "kt",
        &secret,
        token,
        &[(9003, 500, "after eviction".into())],
    )
    .await;
    let last = c.tg.sent_messages(token).last().unwrap().text.clone();
    assert_eq!(
        last, "#7: after eviction",
        "the evicted pod's state was saved"
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_kube_a_warm_pod_is_claimed_pods_outlive_a_killed_orchestrator_and_the_lease_moves() {
    let kube = Kube::start().await;
    let Some((mut c, _egress)) = kube_cluster(&kube).await else {
        return;
    };

    // Warm pool: the leader keeps one warm pod; a wake claims it (its labels change).
    let warm = warm_pool(&c, &kube, 1).await.remove(0);
    let token = "9602:WARM";
    let secret = c.create_tenant("kw", token).await;
    let woken = admin(&c, reqwest::Method::POST, "/v1/tenants/kw/wake", None).await;
    if woken["path"] != "warm" {
        c.dump_logs();
    }
    assert_eq!(woken["path"], "warm", "{woken}");
    assert_eq!(
        kube.pods_of("kw"),
        vec![warm.clone()],
        "the warm pod is the tenant's now"
    );
    send_and_wait(&c, "kw", &secret, token, &[(1, 77, "hello".into())]).await;

    // Which orchestrator leads?
    let mut leader = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    while leader.is_none() {
        for (i, o) in c.orchestrators.iter().enumerate() {
            let s: Value = c
                .http
                .get(format!("http://127.0.0.1:{}/v1/status", o.admin))
                .bearer_auth(ADMIN_TOKEN)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if s["leader"] == true {
                leader = Some(i);
            }
        }
        assert!(Instant::now() < deadline, "one orchestrator leads");
    }
    let leader = leader.unwrap();
    let lease_holder = |kube: &Kube| {
        kube.fake
            .as_ref()
            .and_then(|f| f.get("leases", &kube.namespace, "otm-orchestrator"))
            .map(|l| l["spec"]["holderIdentity"].clone())
    };
    let holder = lease_holder(&kube);

    // The leader is killed (SIGKILL): the pods stay, the other orchestrator takes the lease, and
    // the tenant is answered by the same pod.
    let pods_before: Vec<String> = kube.pod_names();
    let killed = c.orchestrators.remove(leader);
    drop(killed);
    let other = 0;
    let moved = Instant::now();
    loop {
        let s: Value = c
            .http
            .get(format!(
                "http://127.0.0.1:{}/v1/status",
                c.orchestrators[other].admin
            ))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if s["leader"] == true {
            break;
        }
        assert!(
            moved.elapsed() < Duration::from_secs(40),
            "the other orchestrator leads"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "the lead moved {:?} after the leader was killed",
        moved.elapsed()
    );
    if holder.is_some() {
        assert_ne!(lease_holder(&kube), holder, "the Lease has another holder");
    }
    let pods_after: Vec<String> = kube.pod_names();
    for p in &pods_before {
        assert!(
            pods_after.contains(p),
            "pod {p} outlived the orchestrator: {pods_after:?}"
        );
    }
    send_and_wait(&c, "kw", &secret, token, &[(2, 77, "still there".into())]).await;
    assert_eq!(kube.pods_of("kw"), vec![warm], "the same pod answers");

    // A restarted orchestrator adopts the pods: nothing is deleted or created for them.
    let shared = c.dir.path().join("o");
    let mut back = spawn_with(
        "orchestrator",
        &shared,
        &c.backends,
        &c.tg,
        &c.options.orchestrator_args,
        &c.options.orchestrator_env,
    );
    healthy(&c.http, &mut back).await;
    c.orchestrators.push(back);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pods_adopted: Vec<String> = kube.pod_names();
    for p in &pods_before {
        assert!(
            pods_adopted.contains(p),
            "pod {p} kept after the restart: {pods_adopted:?}"
        );
    }
    send_and_wait(&c, "kw", &secret, token, &[(3, 77, "after restart".into())]).await;
    let last = c.tg.sent_messages(token).last().unwrap().text.clone();
    assert_eq!(last, "#3: after restart");
    c.shutdown().await;
}

/// With an OpenClaw image set (the chart's default), warm pods run it whatever profile their
/// tenant will have: a reference tenant woken into one is bound and answered there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_an_openclaw_image_a_warm_pod_serves_a_reference_tenant() {
    let mut kube = Kube::start().await;
    if !kube.use_openclaw_image() {
        return;
    }
    let Some((c, _egress)) = kube_cluster(&kube).await else {
        return;
    };
    let warm = warm_pool(&c, &kube, 1).await.remove(0);
    let openclaw_image = kube.openclaw_image.clone().unwrap();
    assert_eq!(
        image_of(&kube.pod(&warm).unwrap()),
        openclaw_image,
        "a warm pod runs the OpenClaw image"
    );

    let token = "9603:REFWARM";
    let secret = c.create_tenant("kref", token).await;
    let t = admin(&c, reqwest::Method::GET, "/v1/tenants/kref", None).await;
    assert_eq!(t["profile"], "reference", "{t}");
    let woken = wake_through(&c, 0, "kref").await;
    assert_eq!(woken["path"], "warm", "{woken}");
    assert_eq!(kube.pods_of("kref"), vec![warm.clone()]);
    send_and_wait(&c, "kref", &secret, token, &[(1, 88, "hello".into())]).await;
    let last = c.tg.sent_messages(token).last().unwrap().text.clone();
    assert_eq!(
        last, "#1: hello",
        "the reference agent answers in the warm pod"
    );
    c.shutdown().await;
}

/// A tenant with limits of its own claims a warm pod all the same: the pod is resized in place
/// (`pods/resize`) to the tenant's CPU and memory, not discarded for a cold one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_warm_pod_is_resized_in_place_to_its_tenants_limits() {
    let kube = Kube::start().await;
    let Some((c, _egress)) = kube_cluster(&kube).await else {
        return;
    };
    let warm = warm_pool(&c, &kube, 1).await.remove(0);
    let limits = |p: &Value| p["spec"]["containers"][0]["resources"]["limits"].clone();
    let before = limits(&kube.pod(&warm).unwrap());
    assert_eq!(before["cpu"], "1000m", "{before}");

    let token = "9604:RESIZE";
    let secret = c.create_tenant("kbig", token).await;
    admin(
        &c,
        reqwest::Method::PATCH,
        "/v1/tenants/kbig",
        Some(serde_json::json!({"memory": "1536Mi", "cpu": "1500m"})),
    )
    .await;
    let woken = wake_through(&c, 0, "kbig").await;
    assert_eq!(woken["path"], "warm", "{woken}");
    assert_eq!(
        kube.pods_of("kbig"),
        vec![warm.clone()],
        "the warm pod is kept"
    );
    let pod = kube.pod(&warm).unwrap();
    let after = limits(&pod);
    assert_eq!(after["cpu"], "1500m", "{pod}");
    assert_eq!(after["memory"], (1536u64 << 20).to_string(), "{pod}");
    assert_eq!(
        after["ephemeral-storage"], before["ephemeral-storage"],
        "only CPU and memory change"
    );
    if let Some(fake) = &kube.fake {
        assert!(
            fake.requests()
                .iter()
                .any(|r| r.starts_with("PATCH ") && r.contains(&format!("/pods/{warm}/resize"))),
            "resized through the resize subresource"
        );
        assert_eq!(
            pod["status"]["containerStatuses"][0]["resources"]["limits"]["cpu"], "1500m",
            "the resize was actuated"
        );
    }
    send_and_wait(&c, "kbig", &secret, token, &[(1, 99, "big".into())]).await;
    c.shutdown().await;
}

/// The reconciler's pass (the first one runs as an orchestrator starts) removes a pod no record
/// owns once it is older than the grace that covers another replica between creating a pod and
/// recording it, and a Secret of otm's whose pod is gone; it keeps younger ones and a Secret
/// whose pod is there. Ages come from backdating `creationTimestamp` in the fake.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_reconciler_removes_old_orphan_pods_and_secrets_whose_pod_is_gone() {
    let kube = Kube::start().await;
    let Some(fake) = kube.fake.as_ref() else {
        eprintln!("skipped against a real cluster: ages objects in the fake");
        return;
    };
    if env("OTM_TEST_POSTGRES_URL").is_none() || env("OTM_TEST_REDIS_URL").is_none() {
        eprintln!("skipped: OTM_TEST_POSTGRES_URL and OTM_TEST_REDIS_URL are not both set");
        return;
    }
    let old = Duration::from_secs(600);
    let rt = kube.runtime().await;
    // An old pod no record owns, and a young one.
    let (orphan, young) = (spec(None), spec(None));
    rt.create(&orphan).await.unwrap();
    rt.create(&young).await.unwrap();
    let (orphan_pod, young_pod) = (
        pod_spec::pod_name(&orphan.id),
        pod_spec::pod_name(&young.id),
    );
    fake.backdate("pods", &kube.namespace, &orphan_pod, old)
        .unwrap();
    // The young pod's Secret is old, but its pod is there.
    fake.backdate("secrets", &kube.namespace, &young_pod, old)
        .unwrap();
    // Secrets left behind without a pod (no owner reference was set): an old one, a young one.
    let leftover = |id: &InstanceId| {
        let s = pod_spec::secret(&kube.config(), id, &Secret::random(), None);
        fake.create("secrets", &kube.namespace, serde_json::to_value(s).unwrap())
            .unwrap();
        pod_spec::pod_name(id)
    };
    let (stale, fresh) = (
        leftover(&InstanceId::random()),
        leftover(&InstanceId::random()),
    );
    fake.backdate("secrets", &kube.namespace, &stale, old)
        .unwrap();
    drop(rt);

    let Some((c, _egress)) = kube_cluster(&kube).await else {
        return;
    };
    eventually(
        "the old orphan pod and the stale Secret are removed",
        Duration::from_secs(30),
        || {
            !kube.pod_names().contains(&orphan_pod)
                && kube.secret(&stale).is_none()
                && kube.secret(&orphan_pod).is_none()
        },
    )
    .await;
    assert!(kube.pod_names().contains(&young_pod), "a young pod is kept");
    assert!(
        kube.secret(&young_pod).is_some(),
        "a Secret whose pod is there is kept"
    );
    assert!(kube.secret(&fresh).is_some(), "a young Secret is kept");
    c.shutdown().await;
    let rt = kube.runtime().await;
    rt.delete(&young.id).await.unwrap();
}

/// Two tenants woken at the same moment through different orchestrators with one warm pod: the
/// registry hands the warm instance to exactly one, the other's wake creates a pod, and both are
/// answered. Then the runtime's half of a claim: a warm pod that another claimer has labelled
/// for its tenant, while the registry still lists it as warm, is lost (the label patch's
/// `resourceVersion` precondition fails, or the pod is no longer claimable), left alone, and the
/// wake creates a pod instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_wakes_at_once_share_one_warm_pod_and_a_lost_claim_creates_a_pod() {
    let kube = Kube::start().await;
    let Some((c, _egress)) = kube_cluster(&kube).await else {
        return;
    };
    let warm = warm_pool(&c, &kube, 1).await.remove(0);
    let (ta, tb) = ("9605:RACEA", "9606:RACEB");
    let sa = c.create_tenant("ka", ta).await;
    let sb = c.create_tenant("kb", tb).await;
    let (wa, wb) = tokio::join!(wake_through(&c, 0, "ka"), wake_through(&c, 1, "kb"));
    let mut paths = [
        wa["path"].as_str().unwrap().to_owned(),
        wb["path"].as_str().unwrap().to_owned(),
    ];
    paths.sort();
    assert_eq!(paths, ["cold", "warm"], "{wa} {wb}");
    let (winner, loser) = if wa["path"] == "warm" {
        ("ka", "kb")
    } else {
        ("kb", "ka")
    };
    assert_eq!(kube.pods_of(winner), vec![warm.clone()]);
    let cold = kube.pods_of(loser);
    assert_eq!(cold.len(), 1, "{cold:?}");
    assert_ne!(cold[0], warm);
    send_and_wait(&c, "ka", &sa, ta, &[(1, 10, "a".into())]).await;
    send_and_wait(&c, "kb", &sb, tb, &[(1, 20, "b".into())]).await;

    // The pool is refilled; another claimer takes the new warm pod on the API server first.
    let Some(fake) = &kube.fake else {
        c.shutdown().await;
        return;
    };
    let refilled = warm_pool(&c, &kube, 1).await.remove(0);
    assert_ne!(refilled, warm);
    let r = c
        .http
        .patch(format!(
            "{}/api/v1/namespaces/{}/pods/{refilled}",
            fake.url(),
            kube.namespace
        ))
        .header("content-type", "application/merge-patch+json")
        .body(
            serde_json::json!({"metadata": {"labels": {
                "otm.dev/warm": "false",
                "otm.dev/tenant": "elsewhere",
            }}})
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let tc = "9607:LOST";
    let sc = c.create_tenant("kc", tc).await;
    let woken = wake_through(&c, 0, "kc").await;
    assert_eq!(woken["path"], "cold", "a lost claim creates a pod: {woken}");
    let pods = kube.pods_of("kc");
    assert_eq!(pods.len(), 1);
    assert_ne!(pods[0], refilled);
    assert_eq!(
        kube.pods_of("elsewhere"),
        vec![refilled.clone()],
        "the other claimer's pod is left alone"
    );
    let logs: String = c
        .orchestrators
        .iter()
        .map(|o| std::fs::read_to_string(&o.log).unwrap_or_default())
        .collect();
    assert!(
        logs.contains("lost the claim of a warm instance"),
        "the wake went through the lost-claim path"
    );
    send_and_wait(&c, "kc", &sc, tc, &[(1, 30, "c".into())]).await;
    c.shutdown().await;
    let _ = fake.lose_pod(&kube.namespace, &refilled);
}
