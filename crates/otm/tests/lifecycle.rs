//! Sleep, snapshots, wake with memory, recovery and the warm pool on one machine.

mod common;

use common::Harness;
use otm_testkit::text_update;
use reqwest::Method;
use serde_json::json;
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

async fn send_many(
    h: &Harness,
    tenant: &str,
    secret: &str,
    token: &str,
    range: std::ops::RangeInclusive<i64>,
) {
    let have = h.tg.sent_messages(token).len();
    let n = range.clone().count();
    for i in range {
        assert_eq!(
            h.post_update(tenant, secret, &text_update(i, 42, &format!("m{i}")))
                .await,
            200
        );
    }
    let got =
        h.tg.wait_for_messages(token, have + n, Duration::from_secs(60))
            .await;
    assert_eq!(got.len(), have + n);
}

fn numbers(h: &Harness, token: &str) -> Vec<u64> {
    h.tg.sent_messages(token)
        .iter()
        .filter_map(|m| {
            m.text
                .strip_prefix('#')
                .and_then(|t| t.split_once(':'))
                .and_then(|(n, _)| n.parse().ok())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tenants_sleep_with_a_snapshot_and_wake_with_their_memory() {
    let h = Harness::start().await;
    let token = "9101:SLEEPY";
    let secret = h.tenant("sleepy", token).await;
    let (status, _) = h
        .api(
            Method::PATCH,
            "/tenants/sleepy",
            Some(json!({"idle_timeout_s": 1})),
        )
        .await;
    assert_eq!(status, 200);
    send_many(&h, "sleepy", &secret, token, 1..=20).await;
    assert_eq!(h.instances().await.len(), 1);

    wait_until(
        "the idle tenant to be stopped",
        Duration::from_secs(20),
        || async {
            let (_, t) = h.api(Method::GET, "/tenants/sleepy", None).await;
            t["status"] == "idle" && t["instance"].is_null()
        },
    )
    .await;
    assert!(h.instances().await.is_empty());
    assert!(
        h.instance_dirs().is_empty(),
        "the instance is gone from the machine"
    );
    let (_, snaps) = h.api(Method::GET, "/tenants/sleepy/snapshots", None).await;
    let list = snaps["snapshots"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{snaps}");
    assert_eq!(list[0]["reason"], "final");
    assert_eq!(snaps["head"], list[0]["id"]);

    send_many(&h, "sleepy", &secret, token, 21..=21).await;
    let last = h.tg.sent_messages(token).pop().unwrap();
    assert_eq!(
        last.text, "#21: m21",
        "the reply number continues after the sleep"
    );
    assert_eq!(numbers(&h, token), (1..=21).collect::<Vec<_>>());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_is_noticed_at_once_and_nothing_is_lost_or_repeated() {
    let h = Harness::start().await;
    let token = "9102:KILLME";
    let secret = h.tenant("victim", token).await;
    send_many(&h, "victim", &secret, token, 1..=5).await;
    // Kill it between updates: a kill in the middle of a send can repeat that one reply (Telegram
    // offers no idempotent send), which the agent bounds to the one in flight.
    wait_until(
        "the last update to be acknowledged",
        Duration::from_secs(10),
        || async {
            let (_, inbox) = h.api(Method::GET, "/tenants/victim/inbox", None).await;
            inbox["pending"].as_array().is_some_and(|p| p.is_empty())
        },
    )
    .await;
    let dir = h.instance_dirs().pop().unwrap();
    let pid = common::agent_pid(&dir).expect("agent running");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let killed = Instant::now();
    // A new agent process runs on the same state directory within a second.
    let mut restarted = None;
    while killed.elapsed() < Duration::from_secs(5) {
        if let Some(p) = common::agent_pid(&dir).filter(|p| *p != pid) {
            restarted = Some((p, killed.elapsed()));
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (_, after) = restarted.expect("the agent was restarted");
    assert!(after < Duration::from_secs(1), "noticed after {after:?}");
    send_many(&h, "victim", &secret, token, 6..=10).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        numbers(&h, token),
        (1..=10).collect::<Vec<_>>(),
        "no number lost or repeated"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_pool_of_two_serves_wakes_and_refills() {
    let h = Harness::start().await;
    let token = "9103:WARM";
    let secret = h.tenant("warmed", token).await;
    let (status, cfg) = h
        .api(Method::PUT, "/config", Some(json!({"warm_pool_target": 2})))
        .await;
    assert_eq!((status, cfg["warm_pool_target"].as_u64()), (200, Some(2)));
    wait_until("two warm instances", Duration::from_secs(20), || async {
        warm(&h).await == 2
    })
    .await;
    let (status, woken) = h.api(Method::POST, "/tenants/warmed/wake", None).await;
    assert_eq!(status, 200, "{woken}");
    assert_eq!(woken["path"], "warm", "{woken}");
    assert!(woken["phases_ms"]["claim"].is_number(), "{woken}");
    wait_until("the pool to refill", Duration::from_secs(20), || async {
        warm(&h).await == 2
    })
    .await;
    assert_eq!(h.instances().await.len(), 3);
    // The claimed instance answers for its tenant.
    send_many(&h, "warmed", &secret, token, 1..=2).await;
    assert_eq!(numbers(&h, token), vec![1, 2]);
    let (_, cfg) = h
        .api(Method::PUT, "/config", Some(json!({"warm_pool_target": 0})))
        .await;
    assert_eq!(cfg["warm_pool_target"], 0);
    wait_until("the pool to drain", Duration::from_secs(20), || async {
        warm(&h).await == 0
    })
    .await;
    h.stop().await;
}

async fn warm(h: &Harness) -> usize {
    h.instances()
        .await
        .into_iter()
        .filter(|i| i["tenant"].is_null() && i["state"] == "warm")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_and_half_written_snapshots_leave_a_restorable_head() {
    let h = Harness::start_with(|s| s.snapshot_keep = 5).await;
    let token = "9104:SNAP";
    let secret = h.tenant("snappy", token).await;
    send_many(&h, "snappy", &secret, token, 1..=3).await;
    assert_eq!(
        h.api(Method::POST, "/tenants/snappy/stop", None).await.0,
        200
    );
    send_many(&h, "snappy", &secret, token, 4..=5).await;
    assert_eq!(
        h.api(Method::POST, "/tenants/snappy/stop", None).await.0,
        200
    );
    let (_, snaps) = h.api(Method::GET, "/tenants/snappy/snapshots", None).await;
    let ids: Vec<String> = snaps["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 2);
    assert_eq!(snaps["head"], ids[1]);
    let state = h.dir.path().join("d/state/tenants/snappy/snapshots");

    // A write interrupted half-way: an archive under a new key, no metadata, head untouched.
    std::fs::write(state.join("000099999999999-dead.tar.zst"), b"half an archi").unwrap();
    let (_, after) = h.api(Method::GET, "/tenants/snappy/snapshots", None).await;
    assert_eq!(after["head"], ids[1], "the head did not move");

    // The head is corrupted: the wake refuses it and restores the one before.
    let head_file = state.join(format!("{}.tar.zst", ids[1]));
    let mut bytes = std::fs::read(&head_file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&head_file, bytes).unwrap();
    send_many(&h, "snappy", &secret, token, 6..=6).await;
    let last = h.tg.sent_messages(token).pop().unwrap();
    assert_eq!(
        last.text, "#4: m6",
        "state of the previous snapshot (three messages) was restored"
    );
    let metrics = h
        .http
        .get(format!("http://{}/metrics", h.server().admin_addr))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("snapshot_corrupt"),
        "the refusal is counted"
    );
    // And recorded on the tenant, with why.
    let (_, t) = h.api(Method::GET, "/tenants/snappy", None).await;
    let fallback = &t["last_restore_fallback"];
    assert_eq!(fallback["restored"], ids[0], "{t}");
    assert_eq!(fallback["skipped"][0]["snapshot"], ids[1], "{t}");
    assert!(
        fallback["skipped"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("checksum mismatch"),
        "{t}"
    );

    // An operator restores the first snapshot explicitly: the next wake starts from it.
    let (status, r) = h
        .api(
            Method::POST,
            &format!("/tenants/snappy/snapshots/{}/restore", ids[0]),
            None,
        )
        .await;
    assert_eq!(status, 200, "{r}");
    send_many(&h, "snappy", &secret, token, 7..=7).await;
    assert_eq!(h.tg.sent_messages(token).pop().unwrap().text, "#4: m7");
    // Restoring a corrupt snapshot is refused with a clear error.
    assert_eq!(
        h.api(Method::POST, "/tenants/snappy/stop", None).await.0,
        200
    );
    let (status, err) = h
        .api(
            Method::POST,
            &format!("/tenants/snappy/snapshots/{}/restore", ids[1]),
            None,
        )
        .await;
    assert_eq!(status, 500, "{err}");
    assert_eq!(err["error"]["code"], "corrupt");

    // A head whose checksum matches but which does not decode (damaged before it was stored, or
    // metadata rewritten with it): the wake's test decode refuses it and takes the one before.
    let (_, snaps) = h.api(Method::GET, "/tenants/snappy/snapshots", None).await;
    let list: Vec<String> = snaps["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect();
    let head = snaps["head"].as_str().unwrap().to_owned();
    assert_eq!(list.last(), Some(&head));
    let before_head = list[list.len() - 2].clone();
    let garbage = b"zstd? no: a well-checksummed pile of nothing".to_vec();
    std::fs::write(state.join(format!("{head}.tar.zst")), &garbage).unwrap();
    let meta_file = state.join(format!("{head}.json"));
    let mut meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&meta_file).unwrap()).unwrap();
    let digest = std::process::Command::new("sha256sum")
        .arg(state.join(format!("{head}.tar.zst")))
        .output()
        .unwrap();
    let digest = String::from_utf8(digest.stdout).unwrap();
    meta["sha256"] = json!(digest.split_whitespace().next().unwrap());
    meta["size"] = json!(garbage.len());
    std::fs::write(&meta_file, serde_json::to_vec(&meta).unwrap()).unwrap();
    send_many(&h, "snappy", &secret, token, 8..=8).await;
    assert_eq!(
        h.tg.sent_messages(token).pop().unwrap().text,
        "#5: m8",
        "the snapshot before the head (m1-3 and m6) was restored"
    );
    let (_, t) = h.api(Method::GET, "/tenants/snappy", None).await;
    let fallback = &t["last_restore_fallback"];
    assert_eq!(fallback["restored"], before_head.as_str(), "{t}");
    assert_eq!(fallback["skipped"][0]["snapshot"], head.as_str(), "{t}");
    assert!(
        fallback["skipped"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("does not decode"),
        "{t}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_are_pruned_to_the_retention_count() {
    let h = Harness::start_with(|s| s.snapshot_keep = 2).await;
    let token = "9105:KEEP";
    let secret = h.tenant("keeper", token).await;
    for round in 0..4 {
        send_many(&h, "keeper", &secret, token, round + 1..=round + 1).await;
        assert_eq!(
            h.api(Method::POST, "/tenants/keeper/stop", None).await.0,
            200
        );
    }
    let (_, snaps) = h.api(Method::GET, "/tenants/keeper/snapshots", None).await;
    let list = snaps["snapshots"].as_array().unwrap();
    assert_eq!(list.len(), 2, "{snaps}");
    assert_eq!(snaps["head"], list[1]["id"]);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_start_notice_goes_out_before_the_reply() {
    let h = Harness::start().await;
    let token = "9106:NOTICE";
    h.tg.add_bot(token);
    let (status, _) = h
        .api(
            Method::POST,
            "/tenants",
            Some(json!({"id": "noticed", "bot_token": token, "cold_start_notice": true})),
        )
        .await;
    assert_eq!(status, 201);
    let secret = h.tg.webhook(token).unwrap().secret_token.unwrap();
    assert_eq!(
        h.post_update("noticed", &secret, &text_update(1, 8, "hi"))
            .await,
        200
    );
    let got =
        h.tg.wait_for_messages(token, 2, Duration::from_secs(30))
            .await;
    assert!(
        got[0].text.to_lowercase().contains("starting up"),
        "{got:?}"
    );
    assert_eq!(got[0].chat_id, 8);
    assert_eq!(got[1].text, "#1: hi");
    // Awake now: no notice for the next message.
    send_many(&h, "noticed", &secret, token, 2..=2).await;
    assert_eq!(h.tg.sent_messages(token).len(), 3);
    h.stop().await;
}
