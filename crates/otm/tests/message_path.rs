//! The message path end to end: webhook → durable inbox → wake → shim → reference agent →
//! Bot API proxy → (stand-in) Telegram.

mod common;

use common::Harness;
use otm_testkit::text_update;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_tenants_twenty_messages_each_in_order_exactly_once() {
    // Many replies to one chat: the Bot API proxy's pacing (one a second per chat, tested in
    // egress_proxy.rs) is turned off so this measures the message path.
    let h = Harness::start_with(|s| s.bot_chat_interval_ms = 0).await;
    let tenants = [
        ("alice", "1001:AAAalice"),
        ("bob", "1002:BBBbob"),
        ("carol", "1003:CCCcarol"),
    ];
    let mut secrets = Vec::new();
    for (id, token) in tenants {
        secrets.push(h.tenant(id, token).await);
    }
    let sends = tenants
        .iter()
        .zip(&secrets)
        .enumerate()
        .map(|(n, ((id, _), secret))| {
            let h = &h;
            async move {
                for i in 1..=20 {
                    let update = text_update(
                        1000 * (n as i64 + 1) + i,
                        500 + n as i64,
                        &format!("msg {i}"),
                    );
                    assert_eq!(h.post_update(id, secret, &update).await, 200);
                }
            }
        });
    futures::future::join_all(sends).await;

    for (n, (_, token)) in tenants.iter().enumerate() {
        let got =
            h.tg.wait_for_messages(token, 20, Duration::from_secs(60))
                .await;
        assert_eq!(got.len(), 20, "tenant {n}: {got:?}");
        for (i, m) in got.iter().enumerate() {
            assert_eq!(m.chat_id, 500 + n as i64);
            assert_eq!(m.text, format!("#{}: msg {}", i + 1, i + 1));
        }
    }
    // Nothing more arrives later.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (_, token) in tenants {
        assert_eq!(h.tg.sent_messages(token).len(), 20);
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hundred_concurrent_updates_to_a_cold_tenant_one_instance_each_answered_once() {
    // Many replies to one chat: the Bot API proxy's pacing (one a second per chat, tested in
    // egress_proxy.rs) is turned off so this measures the message path.
    let h = Harness::start_with(|s| s.bot_chat_interval_ms = 0).await;
    let token = "2001:COLDcold";
    let secret = h.tenant("cold", token).await;

    // Watch the runtime and the registry the whole time: never more than one instance.
    let stop = tokio_util::sync::CancellationToken::new();
    let watcher = {
        let stop = stop.clone();
        let dirs = h.dir.path().join("d/instances");
        let admin = h.admin("/instances");
        let http = h.http.clone();
        let tok = h.token.clone();
        tokio::spawn(async move {
            let mut max_dirs = 0;
            let mut max_records = 0;
            while !stop.is_cancelled() {
                let n = std::fs::read_dir(&dirs).map(|d| d.count()).unwrap_or(0);
                max_dirs = max_dirs.max(n);
                let v: serde_json::Value = http
                    .get(&admin)
                    .bearer_auth(&tok)
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                max_records = max_records.max(v.as_array().unwrap().len());
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (max_dirs, max_records)
        })
    };

    let posts = (1..=100).map(|i| {
        let h = &h;
        let secret = &secret;
        async move {
            h.post_update("cold", secret, &text_update(i, 77, &format!("u{i}")))
                .await
        }
    });
    let statuses = futures::future::join_all(posts).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");

    let got =
        h.tg.wait_for_messages(token, 100, Duration::from_secs(60))
            .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.cancel();
    let (max_dirs, max_records) = watcher.await.unwrap();
    assert_eq!(max_dirs, 1, "instance directories seen at once");
    assert_eq!(max_records, 1, "instance records seen at once");

    let got_after = h.tg.sent_messages(token);
    assert_eq!(got.len(), 100);
    assert_eq!(got_after.len(), 100, "no reply twice");
    let mut texts: Vec<String> = got_after
        .iter()
        .map(|m| m.text.split_once(": ").unwrap().1.to_owned())
        .collect();
    for (n, m) in got_after.iter().enumerate() {
        assert!(m.text.starts_with(&format!("#{}: ", n + 1)), "{m:?} at {n}");
    }
    texts.sort();
    texts.dedup();
    assert_eq!(texts.len(), 100, "every update answered once");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_cover_every_phase() {
    // Many replies to one chat: the Bot API proxy's pacing (one a second per chat, tested in
    // egress_proxy.rs) is turned off so this measures the message path.
    let h = Harness::start_with(|s| s.bot_chat_interval_ms = 0).await;
    let token = "2101:METRICS";
    let secret = h.tenant("metered", token).await;
    assert_eq!(
        h.post_update("metered", &secret, &text_update(1, 3, "hi"))
            .await,
        200
    );
    assert_eq!(
        h.post_update("metered", &secret, &text_update(1, 3, "hi"))
            .await,
        200
    );
    h.tg.wait_for_messages(token, 1, Duration::from_secs(30))
        .await;
    // The reply is out; the acknowledgement follows it.
    for _ in 0..500 {
        let (_, inbox) = h
            .api(reqwest::Method::GET, "/tenants/metered/inbox", None)
            .await;
        if inbox["pending"].as_array().is_some_and(|p| p.is_empty()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let bad = h
        .http
        .post(h.public("/tg/metered"))
        .header("x-telegram-bot-api-secret-token", "nope")
        .json(&text_update(2, 3, "x"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 401);
    // The instance gauge is counted from the registry at most once a second: wait for it.
    let mut text = String::new();
    for _ in 0..500 {
        text = h
            .http
            .get(format!("http://{}/metrics", h.server().admin_addr))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if text
            .lines()
            .any(|l| l == "otm_instances{state=\"ready\"} 1")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let value = |needle: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(needle))
            .and_then(|l| l.rsplit_once(' '))
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or_else(|| panic!("{needle} missing from /metrics:\n{text}"))
    };
    assert_eq!(value("otm_updates_accepted_total"), 1.0);
    assert_eq!(value("otm_updates_duplicate_total"), 1.0);
    assert_eq!(
        value("otm_updates_rejected_total{reason=\"bad_secret\"}"),
        1.0
    );
    for phase in ["prepare", "create", "restore", "start", "ready", "record"] {
        assert_eq!(
            value(&format!(
                "otm_wake_phase_seconds_count{{path=\"cold\",phase=\"{phase}\"}}"
            )),
            1.0,
            "{phase}"
        );
    }
    assert_eq!(value("otm_wake_seconds_count{path=\"cold\"}"), 1.0);
    assert_eq!(value("otm_deliveries_total{outcome=\"acked\"}"), 1.0);
    assert_eq!(value("otm_instances{state=\"ready\"}"), 1.0);
    assert!(text.contains("otm_accept_seconds_bucket"));
    // The SQLite registry's group commits: the tenant, the update, its delivery and more were
    // written; the update's commit was synced before its 200.
    let (jobs, commits) = (
        value("otm_registry_write_jobs_total"),
        value("otm_registry_commits_total"),
    );
    let (synced, syncs) = (
        value("otm_registry_synced_commits_total"),
        value("otm_registry_syncs_total"),
    );
    assert!(jobs >= 3.0, "{jobs} writes");
    assert!(
        (1.0..=jobs).contains(&commits),
        "{commits} commits for {jobs} writes"
    );
    assert!(
        (1.0..=commits).contains(&synced) && (1.0..=synced).contains(&syncs),
        "{syncs} syncs for {synced} synced commits of {commits}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_refuses_an_update_shows_as_agent_refused_in_the_inbox_and_metrics() {
    // One attempt only: the refused update goes straight to the dead-letter list, where it
    // stays to be looked at.
    let h = Harness::start_with(|s| {
        s.bot_chat_interval_ms = 0;
        s.max_delivery_attempts = 1;
    })
    .await;
    let token = "2201:REFUSED";
    let secret = h.tenant("refused", token).await;
    // The agent cannot send its reply, so it answers 502 and does not acknowledge the update.
    h.tg.fail_next_send(1);
    assert_eq!(
        h.post_update("refused", &secret, &text_update(7, 3, "hi"))
            .await,
        200
    );
    let mut inbox = serde_json::Value::Null;
    for _ in 0..3000 {
        let (status, v) = h
            .api(reqwest::Method::GET, "/tenants/refused/inbox", None)
            .await;
        assert_eq!(status, 200, "{v}");
        inbox = v;
        if inbox["dead"].as_array().is_some_and(|d| !d.is_empty()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let dead = &inbox["dead"][0];
    assert_eq!(dead["update_id"], 7, "{inbox}");
    assert_eq!(dead["last_error_kind"], "agent_refused", "{inbox}");
    let text = dead["last_error"].as_str().expect("a last error");
    assert!(
        !text.starts_with("agent_refused"),
        "the kind is a field of its own, not part of the text: {text}"
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
        metrics.contains("otm_delivery_failures_total{kind=\"agent_refused\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("otm_deliveries_total{outcome=\"dead_lettered\"} 1"),
        "{metrics}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reference_agent_answers_only_the_users_its_tenant_allows() {
    let h = Harness::start_with(|s| s.bot_chat_interval_ms = 0).await;
    let token = "2301:OWNED";
    h.tg.add_bot(token);
    let (status, body) = h
        .api(
            reqwest::Method::POST,
            "/tenants",
            Some(serde_json::json!({"id": "owned", "bot_token": token, "allowed_users": ["501"]})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["dm_policy"], "allowlist", "{body}");
    let secret =
        h.tg.webhook(token)
            .and_then(|w| w.secret_token)
            .expect("webhook secret");

    // A stranger first, then the owner: only the owner is answered, and the stranger's update is
    // taken off the inbox rather than retried.
    assert_eq!(
        h.post_update("owned", &secret, &text_update(1, 777, "let me in"))
            .await,
        200
    );
    assert_eq!(
        h.post_update("owned", &secret, &text_update(2, 501, "hello"))
            .await,
        200
    );
    let got =
        h.tg.wait_for_messages(token, 1, Duration::from_secs(30))
            .await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].chat_id, 501, "{got:?}");

    // An empty list set on purpose allows nobody, the owner included.
    let (status, body) = h
        .api(
            reqwest::Method::PATCH,
            "/tenants/owned",
            Some(serde_json::json!({"allowed_users": []})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["dm_policy"], "disabled", "{body}");
    // The running instance keeps the list it was bound with; the next wake takes the new one.
    let (status, body) = h
        .api(reqwest::Method::POST, "/tenants/owned/stop", None)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        h.post_update("owned", &secret, &text_update(3, 501, "again"))
            .await,
        200
    );
    let mut pending = u64::MAX;
    for _ in 0..3000 {
        let (_, t) = h.api(reqwest::Method::GET, "/tenants/owned", None).await;
        pending = t["inbox_pending"].as_u64().unwrap_or(u64::MAX);
        if pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(pending, 0, "the update was delivered and acknowledged");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        h.tg.sent_messages(token).len(),
        1,
        "nobody is answered once the list is empty"
    );
    h.stop().await;
}
