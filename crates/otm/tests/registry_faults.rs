//! The server while its registry fails: webhooks answer 503 so that Telegram retries, and
//! nothing is lost; dispatchers retry and deliver in order, each update once; the admin API
//! answers 503 in its one error shape. The registry is made to fail through
//! `otm_store::Faulty`, which fails chosen calls as an unreachable backend would.

mod common;

use common::Harness;
use otm_core::admin_api::{ErrorBody, ErrorCode};
use otm_store::{FaultHandle, Faulty, RegistryOp};
use otm_testkit::text_update;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A server whose registry fails as its [`FaultHandle`] says.
async fn faulty_server() -> (Harness, FaultHandle) {
    let handle = Arc::new(Mutex::new(None));
    let slot = handle.clone();
    let h = Harness::start_with_registry(
        |s| s.bot_chat_interval_ms = 0,
        move |registry| {
            let faulty = Faulty::new(registry);
            *slot.lock().unwrap() = Some(faulty.handle());
            Arc::new(faulty)
        },
    )
    .await;
    let faults = handle
        .lock()
        .unwrap()
        .take()
        .expect("the registry was wrapped");
    (h, faults)
}

/// The value of one sample in the server's /metrics.
async fn metric(h: &Harness, sample: &str) -> Option<f64> {
    let text = h
        .http
        .get(format!("http://{}/metrics", h.server().admin_addr))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_webhook_the_inbox_cannot_take_is_answered_503_and_its_retry_delivered_once() {
    let (h, faults) = faulty_server().await;
    let token = "3001:FAULTfault";
    let secret = h.tenant("alice", token).await;
    let first = text_update(1, 71, "first");

    faults.fail_always(RegistryOp::InboxAppend);
    // Telegram retries an update until it is answered 2xx.
    for _ in 0..3 {
        assert_eq!(h.post_update("alice", &secret, &first).await, 503);
    }
    assert_eq!(faults.injected(RegistryOp::InboxAppend), 3);
    let (status, inbox) = h
        .api(reqwest::Method::GET, "/tenants/alice/inbox", None)
        .await;
    assert_eq!(status, 200, "{inbox}");
    assert_eq!(inbox["pending"].as_array().unwrap().len(), 0, "{inbox}");

    faults.clear(RegistryOp::InboxAppend);
    assert_eq!(h.post_update("alice", &secret, &first).await, 200);
    // A retry that crosses the 200 is a duplicate and stores nothing.
    assert_eq!(h.post_update("alice", &secret, &first).await, 200);
    let got =
        h.tg.wait_for_messages(token, 1, Duration::from_secs(60))
            .await;
    assert_eq!(got[0].text, "#1: first");
    // The agent numbers what it receives: the next update is its second, so the first came once.
    assert_eq!(
        h.post_update("alice", &secret, &text_update(2, 71, "second"))
            .await,
        200
    );
    let got =
        h.tg.wait_for_messages(token, 2, Duration::from_secs(60))
            .await;
    let texts: Vec<&str> = got.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(texts, ["#1: first", "#2: second"]);

    // The registry's calls are in /metrics, the refused appends among them.
    assert_eq!(
        metric(
            &h,
            "otm_registry_calls_total{op=\"inbox_append\",outcome=\"unavailable\"}"
        )
        .await,
        Some(3.0)
    );
    assert!(
        metric(
            &h,
            "otm_registry_calls_total{op=\"inbox_append\",outcome=\"ok\"}"
        )
        .await
        .is_some_and(|n| n >= 3.0)
    );
    assert!(
        metric(&h, "otm_registry_call_seconds_count{op=\"inbox_append\"}")
            .await
            .is_some_and(|n| n >= 6.0)
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dispatcher_whose_inbox_reads_and_acks_fail_retries_in_order_without_duplicates() {
    let (h, faults) = faulty_server().await;
    let token = "3002:FAULTfault";
    let secret = h.tenant("bob", token).await;

    // Reading the head fails twice, and so does acknowledging: an acknowledgement that did
    // not go through must not make the dispatcher deliver the update again.
    faults.fail_next(RegistryOp::InboxNext, 2);
    faults.fail_next(RegistryOp::InboxAck, 2);
    for i in 1..=3 {
        assert_eq!(
            h.post_update("bob", &secret, &text_update(i, 72, &format!("m{i}")))
                .await,
            200
        );
    }
    let got =
        h.tg.wait_for_messages(token, 3, Duration::from_secs(60))
            .await;
    let texts: Vec<&str> = got.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(texts, ["#1: m1", "#2: m2", "#3: m3"]);
    assert_eq!(faults.injected(RegistryOp::InboxNext), 2);
    assert_eq!(faults.injected(RegistryOp::InboxAck), 2);

    // Nothing was delivered twice: the agent's next update is its fourth.
    assert_eq!(
        h.post_update("bob", &secret, &text_update(4, 72, "m4"))
            .await,
        200
    );
    let got =
        h.tg.wait_for_messages(token, 4, Duration::from_secs(60))
            .await;
    assert_eq!(got.len(), 4);
    assert_eq!(got[3].text, "#4: m4");
    // The agent replies before the dispatcher records the delivery: wait for the inbox to drain.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (status, inbox) = h
            .api(reqwest::Method::GET, "/tenants/bob/inbox", None)
            .await;
        assert_eq!(status, 200, "{inbox}");
        if inbox["pending"].as_array().unwrap().is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the inbox never drained: {inbox}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The reference agent answers a repeat of an update it has seen with a bare acknowledgement,
    // so repeats would not show in its replies: count them at the server. Four updates, four
    // deliveries, four acknowledgements.
    assert_eq!(
        metric(&h, "otm_delivery_seconds_count").await,
        Some(4.0),
        "one delivery per update"
    );
    assert_eq!(
        metric(&h, "otm_deliveries_total{outcome=\"acked\"}").await,
        Some(4.0)
    );
    assert_eq!(
        metric(
            &h,
            "otm_registry_calls_total{op=\"inbox_ack\",outcome=\"unavailable\"}"
        )
        .await,
        Some(2.0)
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_admin_api_answers_503_in_its_error_shape_while_the_registry_is_unavailable() {
    let (h, faults) = faulty_server().await;
    let token = "3003:FAULTfault";
    h.tenant("carol", token).await;

    let unavailable = |status: u16, body: &serde_json::Value| {
        assert_eq!(status, 503, "{body}");
        let parsed = ErrorBody::parse(body.to_string().as_bytes()).expect("the one error shape");
        assert_eq!(parsed.error.code, ErrorCode::Unavailable, "{body}");
        assert!(!parsed.error.message.is_empty());
    };
    faults.fail_always(RegistryOp::ListTenants);
    faults.fail_always(RegistryOp::GetTenant);
    faults.fail_always(RegistryOp::CreateTenant);
    let (status, body) = h.api(reqwest::Method::GET, "/tenants", None).await;
    unavailable(status, &body);
    let (status, body) = h.api(reqwest::Method::GET, "/tenants/carol", None).await;
    unavailable(status, &body);
    let (status, body) = h
        .api(
            reqwest::Method::POST,
            "/tenants",
            Some(serde_json::json!({"id": "dave", "bot_token": "3004:FAULTfault"})),
        )
        .await;
    unavailable(status, &body);

    faults.clear_all();
    let (status, body) = h.api(reqwest::Method::GET, "/tenants", None).await;
    assert_eq!(status, 200, "{body}");
    let ids: Vec<&str> = body
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["carol"], "the refused create stored nothing");
    h.stop().await;
}
