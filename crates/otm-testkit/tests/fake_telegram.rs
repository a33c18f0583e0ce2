//! Black-box tests of the fake Telegram Bot API over real HTTP.

use std::time::Duration;

use otm_testkit::{FILE_BYTES, FakeTelegram, SentMessage, WebhookInfo};
use serde_json::{Value, json};

const TOKEN: &str = "123456:test-token";

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

async fn post(fake: &FakeTelegram, token: &str, method: &str, body: Value) -> (u16, Value) {
    let response = client()
        .post(format!("{}/bot{token}/{method}", fake.url()))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

#[tokio::test]
async fn get_me_describes_the_bot() {
    let fake = FakeTelegram::start().await;
    fake.add_bot(TOKEN);
    let (status, body) = post(&fake, TOKEN, "getMe", json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(body["ok"], true);
    assert_eq!(body["result"]["id"], 123456);
    assert_eq!(body["result"]["is_bot"], true);
    assert_eq!(body["result"]["first_name"], "Fake");
    assert_eq!(body["result"]["username"], "fake_123456_bot");
}

#[tokio::test]
async fn unknown_token_is_unauthorized_and_not_recorded() {
    let fake = FakeTelegram::start().await;
    fake.add_bot(TOKEN);
    let (status, body) = post(
        &fake,
        "123456:wrong",
        "sendMessage",
        json!({"chat_id": 1, "text": "x"}),
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(
        body,
        json!({"ok": false, "error_code": 401, "description": "Unauthorized"})
    );
    assert!(fake.calls().is_empty());
    assert!(fake.sent_messages("123456:wrong").is_empty());
    assert!(fake.sent_messages(TOKEN).is_empty());
}

#[tokio::test]
async fn send_message_is_recorded_in_order_and_answered() {
    let fake = FakeTelegram::start().await;
    fake.add_bot(TOKEN);
    let (status, body) = post(
        &fake,
        TOKEN,
        "sendMessage",
        json!({"chat_id": 42, "text": "first"}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["ok"], true);
    assert_eq!(body["result"]["message_id"], 1);
    assert_eq!(body["result"]["chat"], json!({"id": 42, "type": "private"}));
    assert_eq!(body["result"]["text"], "first");
    assert!(body["result"]["date"].as_i64().unwrap() > 0);

    let (_, body) = post(
        &fake,
        TOKEN,
        "sendMessage",
        json!({"chat_id": -7, "text": "second"}),
    )
    .await;
    assert_eq!(body["result"]["message_id"], 2);

    assert_eq!(
        fake.sent_messages(TOKEN),
        vec![
            SentMessage {
                chat_id: 42,
                text: "first".into()
            },
            SentMessage {
                chat_id: -7,
                text: "second".into()
            },
        ]
    );
    let calls = fake.calls();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0].token, TOKEN);
    assert_eq!(calls[0].method, "sendMessage");
    assert_eq!(calls[0].params, json!({"chat_id": 42, "text": "first"}));
    assert!(calls[0].at <= calls[1].at);
}

#[tokio::test]
async fn form_bodies_and_query_parameters_are_understood() {
    let fake = FakeTelegram::start().await;
    fake.add_bot(TOKEN);
    let response = client()
        .post(format!("{}/bot{TOKEN}/sendMessage", fake.url()))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("chat_id=5&text=hi+there%21")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let response = client()
        .get(format!(
            "{}/bot{TOKEN}/sendMessage?chat_id=6&text=from%20query",
            fake.url()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        fake.sent_messages(TOKEN),
        vec![
            SentMessage {
                chat_id: 5,
                text: "hi there!".into()
            },
            SentMessage {
                chat_id: 6,
                text: "from query".into()
            },
        ]
    );
    assert_eq!(
        fake.calls()[0].params,
        json!({"chat_id": "5", "text": "hi there!"})
    );
}

#[tokio::test]
async fn send_message_without_text_or_chat_is_a_bad_request() {
    let fake = FakeTelegram::start().await;
    fake.add_bot(TOKEN);
    let (status, body) = post(&fake, TOKEN, "sendMessage", json!({"chat_id": 1})).await;
    assert_eq!(status, 400);
    assert_eq!(body["error_code"], 400);
    let (status, _) = post(&fake, TOKEN, "sendMessage", json!({"text": "x"})).await;
    assert_eq!(status, 400);
    assert!(fake.sent_messages(TOKEN).is_empty());
}

#[tokio::test]
async fn webhooks_are_set_reported_and_deleted_per_bot() {
    let fake = FakeTelegram::start().await;
    fake.add_bot(TOKEN);
    fake.add_bot("999:other");
    let (status, body) = post(
        &fake,
        TOKEN,
        "setWebhook",
        json!({"url": "https://example.test/tg/acme", "secret_token": "s3cret"}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["result"], true);
    assert_eq!(
        fake.webhook(TOKEN),
        Some(WebhookInfo {
            url: "https://example.test/tg/acme".into(),
            secret_token: Some("s3cret".into()),
        })
    );
    assert_eq!(fake.webhook("999:other"), None);

    let (_, body) = post(&fake, TOKEN, "getWebhookInfo", json!({})).await;
    assert_eq!(body["result"]["url"], "https://example.test/tg/acme");

    let (_, body) = post(&fake, TOKEN, "deleteWebhook", json!({})).await;
    assert_eq!(body["result"], true);
    assert_eq!(fake.webhook(TOKEN), None);
    let (_, body) = post(&fake, TOKEN, "getWebhookInfo", json!({})).await;
    assert_eq!(body["result"]["url"], "");
}

#[tokio::test]
async fn other_methods_succeed_and_are_recorded() {
    let fake = FakeTelegram::start().await;
    fake.add_bot(TOKEN);
    for method in [
        "sendChatAction",
        "setMyCommands",
        "deleteMyCommands",
        "answerCallbackQuery",
    ] {
        let (status, body) = post(&fake, TOKEN, method, json!({"chat_id": 1})).await;
        assert_eq!(status, 200, "{method}");
        assert_eq!(body, json!({"ok": true, "result": true}), "{method}");
    }
    let methods: Vec<String> = fake.calls().into_iter().map(|c| c.method).collect();
    assert_eq!(
        methods,
        [
            "sendChatAction",
            "setMyCommands",
            "deleteMyCommands",
            "answerCallbackQuery"
        ]
    );
}

#[tokio::test]
async fn file_downloads_return_fixed_bytes_for_known_tokens() {
    let fake = FakeTelegram::start().await;
    fake.add_bot(TOKEN);
    let response = client()
        .get(format!("{}/file/bot{TOKEN}/photos/file_1.jpg", fake.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.bytes().await.unwrap().as_ref(), FILE_BYTES);
    assert_eq!(
        fake.calls()[0].params,
        json!({"file_path": "photos/file_1.jpg"})
    );

    let response = client()
        .get(format!("{}/file/bot1:nope/photos/file_1.jpg", fake.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
}

#[tokio::test]
async fn paths_outside_the_api_are_not_found() {
    let fake = FakeTelegram::start().await;
    fake.add_bot(TOKEN);
    for path in [
        "/",
        "/healthz",
        "/bot123456:test-token",
        "/bot123456:test-token/a/b",
    ] {
        let response = client()
            .get(format!("{}{path}", fake.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 404, "{path}");
    }
}

#[tokio::test]
async fn failed_sends_answer_500_then_recover() {
    let fake = FakeTelegram::start().await;
    fake.add_bot(TOKEN);
    fake.fail_next_send(2);
    for _ in 0..2 {
        let (status, body) = post(
            &fake,
            TOKEN,
            "sendMessage",
            json!({"chat_id": 1, "text": "x"}),
        )
        .await;
        assert_eq!(status, 500);
        assert_eq!(body["ok"], false);
        assert_eq!(body["error_code"], 500);
    }
    assert!(fake.sent_messages(TOKEN).is_empty());
    let (status, _) = post(
        &fake,
        TOKEN,
        "sendMessage",
        json!({"chat_id": 1, "text": "x"}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(fake.sent_messages(TOKEN).len(), 1);
    // The failed attempts were still calls.
    assert_eq!(fake.calls().len(), 3);
}

#[tokio::test]
async fn wait_for_messages_wakes_on_send_and_times_out_short() {
    let fake = FakeTelegram::start().await;
    fake.add_bot(TOKEN);
    fake.set_send_delay(Duration::from_millis(50));

    let url = fake.url();
    let sender = tokio::spawn(async move {
        for i in 0..3 {
            client()
                .post(format!("{url}/bot{TOKEN}/sendMessage"))
                .json(&json!({"chat_id": 9, "text": format!("m{i}")}))
                .send()
                .await
                .unwrap();
        }
    });
    let sent = fake
        .wait_for_messages(TOKEN, 3, Duration::from_secs(10))
        .await;
    assert_eq!(
        sent.iter().map(|m| m.text.as_str()).collect::<Vec<_>>(),
        ["m0", "m1", "m2"]
    );
    sender.await.unwrap();

    let started = std::time::Instant::now();
    let sent = fake
        .wait_for_messages(TOKEN, 4, Duration::from_millis(100))
        .await;
    assert_eq!(sent.len(), 3);
    assert!(started.elapsed() >= Duration::from_millis(100));
}

#[tokio::test]
async fn send_delay_holds_the_answer() {
    let fake = FakeTelegram::start().await;
    fake.add_bot(TOKEN);
    fake.set_send_delay(Duration::from_millis(200));
    let started = std::time::Instant::now();
    let (status, _) = post(
        &fake,
        TOKEN,
        "sendMessage",
        json!({"chat_id": 1, "text": "x"}),
    )
    .await;
    assert_eq!(status, 200);
    assert!(started.elapsed() >= Duration::from_millis(200));
}

#[tokio::test]
async fn shutdown_and_drop_stop_the_server() {
    let fake = FakeTelegram::start().await;
    fake.add_bot(TOKEN);
    let url = fake.url();
    // A client holding a kept-alive connection does not hold the shutdown up.
    let client = client();
    let response = client
        .get(format!("{url}/bot{TOKEN}/getMe"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    tokio::time::timeout(Duration::from_secs(5), fake.shutdown())
        .await
        .expect("shutdown finished");
    assert!(
        client
            .get(format!("{url}/bot{TOKEN}/getMe"))
            .send()
            .await
            .is_err()
    );

    let fake = FakeTelegram::start().await;
    let addr = fake.addr();
    drop(fake);
    // The listener closes once the server task sees the stop signal.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "server still accepting after drop"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[test]
#[should_panic(expected = "a bot token looks like")]
fn malformed_tokens_are_refused() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let fake = FakeTelegram::start().await;
        fake.add_bot("no-colon");
    });
}
