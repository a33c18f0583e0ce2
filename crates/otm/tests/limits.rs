//! Limits and failures of one instance stay with that instance: a fork bomb, a memory hog and a
//! disk filler are each stopped by their limit and reported while the server and another tenant
//! go on; a shim killed outright loses no acknowledged state.

mod common;

use common::Harness;
use otm_testkit::text_update;
use reqwest::Method;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

const HOG: &str = "7101:HOGtoken";
const NEIGHBOUR: &str = "7102:NEIGHBOURtoken";

/// A server with a probe tenant whose limits are `limits`, and a neighbour on the reference
/// agent. Returns the harness and both webhook secrets.
async fn start(limits: Value) -> (Harness, String, String) {
    let h = Harness::start_with(|s| s.allow_probe_profile = true).await;
    let (_, status) = h.api(Method::GET, "/status", None).await;
    assert!(
        status["limits"]
            .as_str()
            .unwrap_or("")
            .starts_with("cgroup"),
        "these checks need cgroups: {status}"
    );
    let neighbour = h.tenant("neighbour", NEIGHBOUR).await;
    h.tg.add_bot(HOG);
    let mut body = json!({"id": "hog", "bot_token": HOG, "profile": "probe"});
    for (k, v) in limits.as_object().unwrap() {
        body[k] = v.clone();
    }
    let (code, t) = h.api(Method::POST, "/tenants", Some(body)).await;
    assert_eq!(code, 201, "{t}");
    let hog = h.tg.webhook(HOG).unwrap().secret_token.unwrap();
    (h, hog, neighbour)
}

/// Sends the hog a probe command and waits for its answer.
async fn probe(h: &Harness, secret: &str, n: i64, command: &str) -> String {
    assert_eq!(
        h.post_update("hog", secret, &text_update(n, 9, &format!("/sh {command}")))
            .await,
        200
    );
    let got =
        h.tg.wait_for_messages(HOG, n as usize, Duration::from_secs(60))
            .await;
    assert!(got.len() >= n as usize, "no answer to `{command}`");
    got[n as usize - 1].text.clone()
}

/// Waits until the hog's instance was stopped for `limit`, checking all the while that the
/// neighbour answers its webhooks; returns the tenant view.
async fn wait_for_limit_kill(h: &Harness, neighbour: &str, limit: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut n = 0;
    loop {
        n += 1;
        let sent = Instant::now();
        assert_eq!(
            h.post_update(
                "neighbour",
                neighbour,
                &text_update(n, 5, &format!("ping {n}"))
            )
            .await,
            200
        );
        let got =
            h.tg.wait_for_messages(NEIGHBOUR, n as usize, Duration::from_secs(30))
                .await;
        assert_eq!(got.len(), n as usize, "the neighbour answered ping {n}");
        assert!(sent.elapsed() < Duration::from_secs(30));
        let (_, t) = h.api(Method::GET, "/tenants/hog", None).await;
        if t["last_limit_kill"]["limit"] == limit {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "the hog was not stopped for its {limit} limit: {t}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn limit_kills(h: &Harness, limit: &str) -> f64 {
    let text = h
        .http
        .get(format!("http://{}/metrics", h.server().admin_addr))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let key = format!("otm_instance_limit_kills_total{{limit=\"{limit}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_bomb_is_stopped_by_its_pids_limit() {
    let (h, hog, neighbour) = start(json!({"pids": 64})).await;
    let (_, t) = h.api(Method::GET, "/tenants/hog", None).await;
    assert_eq!(t["limits"]["pids"], 64, "{t}");
    let answer = probe(
        &h,
        &hog,
        1,
        "(for i in $(seq 500); do sleep 120 & done) >/dev/null 2>&1 & echo started",
    )
    .await;
    assert!(answer.contains("started"), "{answer}");
    let t = wait_for_limit_kill(&h, &neighbour, "pids").await;
    assert!(
        t["last_limit_kill"]["detail"]
            .as_str()
            .unwrap()
            .contains("64"),
        "{t}"
    );
    assert!(limit_kills(&h, "pids").await >= 1.0);
    // Nothing of it is left on the machine.
    let sleepers = std::process::Command::new("pgrep")
        .args(["-c", "-x", "sleep"])
        .output()
        .unwrap();
    let left: usize = String::from_utf8_lossy(&sleepers.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    assert!(
        left < 100,
        "{left} sleeps of the fork bomb outlived its instance"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_hog_is_stopped_by_its_memory_limit() {
    let (h, hog, neighbour) = start(json!({"memory": "128Mi"})).await;
    let answer =
        probe(&h, &hog, 1, "(python3 -c 'x = bytearray(600 << 20); import time; time.sleep(60)') >/dev/null 2>&1 & echo started").await;
    assert!(answer.contains("started"), "{answer}");
    let t = wait_for_limit_kill(&h, &neighbour, "memory").await;
    assert_eq!(t["limits"]["memory_bytes"], 128u64 << 20, "{t}");
    assert!(limit_kills(&h, "memory").await >= 1.0);
    // The tenant is woken again by its next message, and its history is intact.
    let again = probe(&h, &hog, 2, "echo back").await;
    assert!(
        again.starts_with("#2: exit=0") && again.contains("back"),
        "{again}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_filler_is_stopped_by_its_disk_limit() {
    let (h, hog, neighbour) = start(json!({"disk": "20Mi"})).await;
    let answer = probe(&h, &hog, 1, "echo first").await;
    assert!(answer.starts_with("#1: exit=0"), "{answer}");
    h.api(Method::POST, "/tenants/hog/stop", None).await;
    let answer = probe(
        &h,
        &hog,
        2,
        "(for i in 1 2 3 4 5 6; do dd if=/dev/zero of=$OTM_AGENT_STATE_DIR/fill$i bs=1M count=10; done) >/dev/null 2>&1 & echo filling",
    )
    .await;
    assert!(answer.contains("filling"), "{answer}");
    wait_for_limit_kill(&h, &neighbour, "disk").await;
    assert!(limit_kills(&h, "disk").await >= 1.0);
    // The state over the limit is not kept: the snapshot before it is the one restored.
    let again = probe(&h, &hog, 3, "ls $OTM_AGENT_STATE_DIR").await;
    assert!(
        !again.contains("fill"),
        "the filler's files came back: {again}"
    );
    h.stop().await;
}

/// An instance whose shim is killed outright: the server packs the state from outside, and the
/// reply count goes on after the re-wake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_shim_loses_no_acknowledged_state() {
    let h = Harness::start().await;
    let token = "7201:SHIMKILL";
    let secret = h.tenant("sturdy", token).await;
    for n in 1..=3 {
        assert_eq!(
            h.post_update("sturdy", &secret, &text_update(n, 5, &format!("m{n}")))
                .await,
            200
        );
        h.tg.wait_for_messages(token, n as usize, Duration::from_secs(30))
            .await;
    }
    let (_, snaps) = h.api(Method::GET, "/tenants/sturdy/snapshots", None).await;
    assert_eq!(
        snaps["snapshots"].as_array().map(Vec::len),
        Some(0),
        "no snapshot yet: only the instance has the state"
    );
    let instance = h.instances().await[0]["id"].as_str().unwrap().to_owned();
    let shim = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .find_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            // `otm-shim --instance …`, or `otm shim --instance …` where it is not installed.
            let program = cmd.split(' ').next().unwrap_or("");
            let shim = program.ends_with("otm-shim") || cmd.contains(" shim ");
            (shim && cmd.contains(&instance) && !cmd.contains("bwrap")).then_some(pid)
        })
        .expect("the shim runs");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shim),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, snaps) = h.api(Method::GET, "/tenants/sturdy/snapshots", None).await;
        if snaps["snapshots"].as_array().is_some_and(|a| !a.is_empty()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the dead instance's state was not saved"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        h.post_update("sturdy", &secret, &text_update(4, 5, "m4"))
            .await,
        200
    );
    // The kill may fall between the agent's reply to m3 and its acknowledgement: m3 is then
    // delivered again and its reply, recorded as pending in the state, sent once more with the
    // same number. What must hold: no count is lost, and m4 is answered as the fourth.
    let mut got =
        h.tg.wait_for_messages(token, 4, Duration::from_secs(30))
            .await;
    if !got.iter().any(|m| m.text.ends_with(": m4")) {
        got =
            h.tg.wait_for_messages(token, 5, Duration::from_secs(30))
                .await;
    }
    let texts: Vec<&str> = got.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(
        texts.iter().rev().find(|t| t.ends_with(": m4")),
        Some(&"#4: m4"),
        "the count went on from the state packed after the kill: {texts:?}"
    );
    for t in &texts[3..] {
        assert!(
            *t == "#4: m4" || *t == "#3: m3",
            "only the reply in flight at the kill may come again, with its number: {texts:?}"
        );
    }
    h.stop().await;
}

/// With `max-running 1`, a wake puts the longest-idle tenant to sleep; a tenant busy with an
/// update is never put to sleep, so the other's updates wait in its inbox, and arrive after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_running_puts_idle_tenants_to_sleep_and_holds_the_rest() {
    let (h, hog, neighbour) = start(json!({})).await;
    let (code, cfg) = h
        .api(Method::PUT, "/config", Some(json!({"max_running": 1})))
        .await;
    assert_eq!((code, &cfg["max_running"]), (200, &json!(1)), "{cfg}");
    let dir = h.dir.path().join("d/runtime");
    let stop = tokio_util::sync::CancellationToken::new();
    let watcher = {
        let (dir, stop) = (dir.clone(), stop.clone());
        tokio::spawn(async move {
            let mut max = 0;
            while !stop.is_cancelled() {
                max = max.max(std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0));
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            max
        })
    };
    assert!(probe(&h, &hog, 1, "echo one").await.contains("one"));
    // The neighbour's message puts the idle hog to sleep.
    assert_eq!(
        h.post_update("neighbour", &neighbour, &text_update(1, 5, "hello"))
            .await,
        200
    );
    let got =
        h.tg.wait_for_messages(NEIGHBOUR, 1, Duration::from_secs(30))
            .await;
    assert_eq!(got[0].text, "#1: hello");
    let (_, t) = h.api(Method::GET, "/tenants/hog", None).await;
    assert!(
        t["instance"].is_null(),
        "the idle hog was put to sleep: {t}"
    );

    // A busy tenant is not put to sleep: the neighbour's update waits for it.
    assert_eq!(
        h.post_update("hog", &hog, &text_update(2, 9, "/sh sleep 4; echo slow"))
            .await,
        200
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while h.api(Method::GET, "/tenants/hog", None).await.1["instance"].is_null() {
        assert!(Instant::now() < deadline, "the hog did not wake");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        h.post_update("neighbour", &neighbour, &text_update(2, 5, "after you"))
            .await,
        200
    );
    let hog_got =
        h.tg.wait_for_messages(HOG, 2, Duration::from_secs(60))
            .await;
    let hog_done = Instant::now();
    assert!(hog_got[1].text.contains("slow"));
    let got =
        h.tg.wait_for_messages(NEIGHBOUR, 2, Duration::from_secs(60))
            .await;
    assert_eq!(
        got[1].text, "#2: after you",
        "the held update was delivered, once, in order"
    );
    let sent_at = |token: &str, needle: &str| {
        h.tg.calls()
            .into_iter()
            .find(|c| {
                c.token == token
                    && c.params["text"]
                        .as_str()
                        .is_some_and(|t| t.contains(needle))
            })
            .unwrap()
            .at
    };
    assert!(
        sent_at(NEIGHBOUR, "after you") > sent_at(HOG, "slow"),
        "the neighbour waited for the busy hog"
    );
    let _ = hog_done;
    stop.cancel();
    assert_eq!(watcher.await.unwrap(), 1, "never more than one instance");
    let text = h
        .http
        .get(format!("http://{}/metrics", h.server().admin_addr))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("otm_admission_waits_total{reason=\"max_running\"}"),
        "admission waits are counted"
    );
    assert!(text.contains("otm_max_running 1"), "the limit is shown");
    h.stop().await;
}
