//! The frozen tier on one machine, with the reference agent in its sandbox: idle tenants are
//! frozen in place, thawed by the next message without a new instance, still put to sleep at
//! their idle timeout, kept awake while a call of theirs runs through the egress proxy, and
//! put to sleep least recently active first when frozen memory is over its budget.

mod common;

use common::{Harness, proc_state};
use otm_testkit::text_update;
use reqwest::Method;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn tenant(h: &Harness, id: &str) -> Value {
    h.api(Method::GET, &format!("/tenants/{id}"), None).await.1
}

async fn status(h: &Harness, id: &str) -> String {
    tenant(h, id).await["status"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

async fn metrics(h: &Harness) -> String {
    h.http
        .get(format!("http://{}/metrics", h.server().admin_addr))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of one sample line of `/metrics` (0 when absent).
fn sample(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The agent's processes inside its sandbox (host pids and names), found through the agent's
/// environment; bubblewrap's own process outside the sandbox, which only waits, is left out.
fn agent_processes(instance_dir: &std::path::Path) -> Vec<(u32, String)> {
    let marker = format!("OTM_AGENT_STATE_DIR={}/state", instance_dir.display());
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(environ) = std::fs::read(e.path().join("environ")) else {
            continue;
        };
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        let comm = comm.trim().to_owned();
        if comm != "bwrap" && environ.split(|b| *b == 0).any(|v| v == marker.as_bytes()) {
            out.push((pid, comm));
        }
    }
    out
}

async fn send(h: &Harness, id: &str, secret: &str, token: &str, n: i64) -> String {
    let have = h.tg.sent_messages(token).len();
    assert_eq!(
        h.post_update(id, secret, &text_update(n, 42, &format!("m{n}")))
            .await,
        200
    );
    let got =
        h.tg.wait_for_messages(token, have + 1, Duration::from_secs(60))
            .await;
    got.last().unwrap().text.clone()
}

async fn patch(h: &Harness, id: &str, body: Value) {
    let (status, answer) = h
        .api(Method::PATCH, &format!("/tenants/{id}"), Some(body))
        .await;
    assert_eq!(status, 200, "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_tenant_is_frozen_thawed_by_a_message_and_still_sleeps_at_its_idle_timeout() {
    let h = Harness::start().await;
    let token = "9301:FROZEN";
    let secret = h.tenant("icy", token).await;
    patch(
        &h,
        "icy",
        json!({"freeze_after_s": 1, "idle_timeout_s": 600}),
    )
    .await;
    assert_eq!(tenant(&h, "icy").await["freeze_after_s"], 1);
    assert_eq!(send(&h, "icy", &secret, token, 1).await, "#1: m1");
    assert_eq!(send(&h, "icy", &secret, token, 2).await, "#2: m2");
    let instance = tenant(&h, "icy").await["instance"].clone();
    assert!(instance.is_string());

    wait_until(
        "the idle tenant to be frozen",
        Duration::from_secs(30),
        || async { status(&h, "icy").await == "frozen" },
    )
    .await;
    let dir = h
        .dir
        .path()
        .join("d/instances")
        .join(instance.as_str().unwrap());
    let agent = agent_processes(&dir);
    assert!(!agent.is_empty(), "the frozen agent still exists");
    // Where the instance has cgroups, the agent is frozen through a cgroup of its own: the
    // kernel says so, and none of its processes is merely stopped by a signal, or runs.
    let cgroup = common::instance_cgroup(instance.as_str().unwrap());
    let freezer = cgroup.as_ref().and_then(|c| c.agent_dir()).map(|d| {
        otm_shim::freezer::AgentCgroup::open(&d)
            .unwrap_or_else(|e| panic!("the agent has a cgroup of its own: {e}"))
    });
    match &freezer {
        Some(freezer) => {
            assert!(freezer.is_frozen().unwrap(), "the agent's cgroup is frozen");
            let members = freezer.procs();
            for (pid, comm) in &agent {
                assert!(
                    members.contains(&(*pid as i32)),
                    "{comm} ({pid}) of the frozen agent is in its cgroup: {members:?}"
                );
                assert_ne!(
                    proc_state(*pid),
                    "T",
                    "{comm} ({pid}) is frozen by its cgroup, not stopped by a signal"
                );
            }
            let before: Vec<u64> = agent.iter().map(|(p, _)| common::cpu_ticks(*p)).collect();
            tokio::time::sleep(Duration::from_millis(500)).await;
            let after: Vec<u64> = agent.iter().map(|(p, _)| common::cpu_ticks(*p)).collect();
            assert_eq!(before, after, "the frozen agent used no CPU");
        }
        None => {
            for (pid, comm) in &agent {
                assert_eq!(
                    proc_state(*pid),
                    "T",
                    "{comm} ({pid}) of the frozen agent is stopped"
                );
            }
        }
    }
    let pid = agent[0].0;
    let (_, list) = h.api(Method::GET, "/tenants", None).await;
    let listed = list
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == "icy")
        .unwrap()
        .clone();
    assert_eq!(listed["status"], "frozen");
    let m = metrics(&h).await;
    assert_eq!(sample(&m, "otm_instances_frozen"), 1.0, "{m}");
    assert!(sample(&m, "otm_frozen_memory_bytes") > 0.0, "{m}");

    // A message thaws it and is answered by the same instance, its memory intact.
    assert_eq!(send(&h, "icy", &secret, token, 3).await, "#3: m3");
    let t = tenant(&h, "icy").await;
    assert_eq!(t["instance"], instance, "no new instance: {t}");
    assert_ne!(proc_state(pid), "T");
    if let Some(freezer) = &freezer {
        assert!(
            !freezer.is_frozen().unwrap(),
            "the agent's cgroup is thawed"
        );
        assert!(freezer.procs().contains(&(pid as i32)));
    }
    let m = metrics(&h).await;
    assert!(
        sample(&m, "otm_wake_seconds_count{path=\"frozen\"}") >= 1.0,
        "the wake went the frozen path: {m}"
    );
    assert!(sample(&m, "otm_thaw_seconds_count") >= 1.0, "{m}");
    assert_eq!(
        sample(&m, "otm_wake_seconds_count{path=\"cold\"}"),
        1.0,
        "one cold wake only"
    );

    // Frozen again, then its idle timeout puts it to sleep with a final snapshot.
    wait_until(
        "the tenant to freeze again",
        Duration::from_secs(30),
        || async { status(&h, "icy").await == "frozen" },
    )
    .await;
    patch(&h, "icy", json!({"idle_timeout_s": 2})).await;
    wait_until(
        "the frozen tenant to be stopped",
        Duration::from_secs(30),
        || async {
            let t = tenant(&h, "icy").await;
            t["status"] == "idle" && t["instance"].is_null()
        },
    )
    .await;
    let (_, snaps) = h.api(Method::GET, "/tenants/icy/snapshots", None).await;
    assert_eq!(snaps["snapshots"][0]["reason"], "final", "{snaps}");
    if let Some(cgroup) = &cgroup {
        // The stopped instance leaves no cgroup behind, the agent's frozen one included.
        wait_until(
            "the stopped instance's cgroups to be removed",
            Duration::from_secs(10),
            || async { cgroup.leftovers().is_empty() },
        )
        .await;
    }
    patch(&h, "icy", json!({"idle_timeout_s": 600})).await;
    assert_eq!(
        send(&h, "icy", &secret, token, 4).await,
        "#4: m4",
        "the state survived freeze, thaw and sleep"
    );
    assert_ne!(tenant(&h, "icy").await["instance"], instance);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freezing_can_be_turned_off_per_tenant() {
    let h = Harness::start().await;
    let token = "9302:AWAKE";
    let secret = h.tenant("warmish", token).await;
    patch(
        &h,
        "warmish",
        json!({"freeze_after_s": 0, "idle_timeout_s": 600}),
    )
    .await;
    assert_eq!(send(&h, "warmish", &secret, token, 1).await, "#1: m1");
    // A second tenant that does freeze shows the sweep ran meanwhile.
    let token2 = "9303:COLD";
    let secret2 = h.tenant("freezer", token2).await;
    patch(&h, "freezer", json!({"freeze_after_s": 1})).await;
    assert_eq!(send(&h, "freezer", &secret2, token2, 1).await, "#1: m1");
    wait_until(
        "the other tenant to freeze",
        Duration::from_secs(30),
        || async { status(&h, "freezer").await == "frozen" },
    )
    .await;
    let t = tenant(&h, "warmish").await;
    assert_eq!(t["status"], "running", "{t}");
    assert!(
        t["last_active_ms"].as_i64().unwrap()
            <= tenant(&h, "freezer").await["last_active_ms"]
                .as_i64()
                .unwrap()
    );
    h.stop().await;
}

/// A model upstream that takes every call and answers none until told to.
async fn slow_model() -> (
    String,
    tokio::sync::watch::Sender<bool>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (release, released) = tokio::sync::watch::channel(false);
    let arrived = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = arrived.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let mut released = released.clone();
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let _ = conn.read(&mut buf).await;
                seen.fetch_add(1, Ordering::SeqCst);
                let _ = released.wait_for(|r| *r).await;
                let body = r#"{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"done"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#;
                let _ = conn
                    .write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .await;
            });
        }
    });
    (format!("http://{addr}"), release, arrived)
}

/// The surrogate token the agent of `instance` was given, read from its environment.
fn surrogate_of(h: &Harness, instance: &str) -> String {
    let marker = format!(
        "OTM_AGENT_STATE_DIR={}/state",
        h.dir.path().join("d/instances").join(instance).display()
    );
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(environ) = std::fs::read(e.path().join("environ")) else {
            continue;
        };
        let vars: Vec<&[u8]> = environ.split(|b| *b == 0).collect();
        if vars.contains(&marker.as_bytes()) {
            for v in vars {
                if let Some(t) = v.strip_prefix(b"OTM_BOT_TOKEN=") {
                    return String::from_utf8(t.to_vec()).unwrap();
                }
            }
        }
    }
    panic!("agent of {instance} not found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_with_a_model_call_under_way_is_neither_frozen_nor_stopped() {
    use std::sync::atomic::Ordering;
    let (model, release, arrived) = slow_model().await;
    let h = Harness::start_with(|s| {
        s.model_base_url = Some(model);
        s.model_id = Some("slow-1".into());
    })
    .await;
    let token = "9304:BUSY";
    let secret = h.tenant("busy", token).await;
    patch(
        &h,
        "busy",
        json!({"freeze_after_s": 1, "idle_timeout_s": 2}),
    )
    .await;
    // An idle control tenant, frozen and stopped by the same sweep meanwhile.
    let token2 = "9305:IDLE";
    let secret2 = h.tenant("lazy", token2).await;
    patch(
        &h,
        "lazy",
        json!({"freeze_after_s": 1, "idle_timeout_s": 2}),
    )
    .await;

    assert_eq!(send(&h, "busy", &secret, token, 1).await, "#1: m1");
    let instance = tenant(&h, "busy").await["instance"]
        .as_str()
        .unwrap()
        .to_owned();
    let surrogate = surrogate_of(&h, &instance);
    // A long model turn, as the agent would make it, through the egress listener.
    let url = format!(
        "http://{}/model/{surrogate}/chat/completions",
        h.server().egress_addr
    );
    let http = h.http.clone();
    let call = tokio::spawn(async move {
        http.post(url)
            .json(&json!({"messages": [{"role": "user", "content": "think hard"}]}))
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    wait_until(
        "the model call to reach the upstream",
        Duration::from_secs(20),
        || async { arrived.load(Ordering::SeqCst) > 0 },
    )
    .await;
    assert_eq!(send(&h, "lazy", &secret2, token2, 1).await, "#1: m1");
    // The control goes through freezing to sleep; the busy tenant stays up all along.
    wait_until(
        "the idle control tenant to sleep",
        Duration::from_secs(60),
        || async {
            let s = status(&h, "lazy").await;
            let busy = tenant(&h, "busy").await;
            assert_eq!(
                busy["status"], "running",
                "a busy tenant was put away: {busy}"
            );
            assert_eq!(busy["instance"], instance.as_str());
            s == "idle"
        },
    )
    .await;
    assert!(!call.is_finished(), "the model call is still under way");
    release.send(true).unwrap();
    assert_eq!(
        call.await.unwrap().unwrap(),
        200,
        "the long call was not cut off"
    );
    // Once the call ended, the tenant is idle again and goes the usual way.
    wait_until(
        "the tenant to sleep after its call",
        Duration::from_secs(60),
        || async { status(&h, "busy").await == "idle" },
    )
    .await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_frozen_memory_budget_the_least_recently_active_frozen_tenant_sleeps_first() {
    let h = Harness::start().await;
    let (ta, tb) = ("9306:OLDER", "9307:NEWER");
    let sa = h.tenant("older", ta).await;
    let sb = h.tenant("newer", tb).await;
    for id in ["older", "newer"] {
        patch(&h, id, json!({"freeze_after_s": 1, "idle_timeout_s": 600})).await;
    }
    assert_eq!(send(&h, "older", &sa, ta, 1).await, "#1: m1");
    assert_eq!(send(&h, "newer", &sb, tb, 1).await, "#1: m1");
    wait_until(
        "both tenants to freeze",
        Duration::from_secs(30),
        || async { status(&h, "older").await == "frozen" && status(&h, "newer").await == "frozen" },
    )
    .await;
    wait_until(
        "the frozen memory to be counted",
        Duration::from_secs(10),
        || async {
            let m = metrics(&h).await;
            sample(&m, "otm_instances_frozen") == 2.0 && sample(&m, "otm_frozen_memory_bytes") > 0.0
        },
    )
    .await;
    let total = sample(&metrics(&h).await, "otm_frozen_memory_bytes");
    // One byte short of what both hold: one of them must go, the older first.
    let (status_code, cfg) = h
        .api(
            Method::PUT,
            "/config",
            Some(json!({"frozen_memory_max": format!("{}", total as u64 - 1)})),
        )
        .await;
    assert_eq!(status_code, 200, "{cfg}");
    assert_eq!(cfg["frozen_memory_max"], total as u64 - 1);
    wait_until(
        "the older frozen tenant to sleep",
        Duration::from_secs(30),
        || async { status(&h, "older").await == "idle" },
    )
    .await;
    assert_eq!(
        status(&h, "newer").await,
        "frozen",
        "the newer one stays frozen"
    );
    let (_, snaps) = h.api(Method::GET, "/tenants/older/snapshots", None).await;
    assert_eq!(snaps["snapshots"][0]["reason"], "final", "{snaps}");
    // Both still answer, with their memory.
    assert_eq!(send(&h, "older", &sa, ta, 2).await, "#2: m2");
    assert_eq!(send(&h, "newer", &sb, tb, 2).await, "#2: m2");
    h.stop().await;
}
