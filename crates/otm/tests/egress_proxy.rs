//! The Bot API proxy: surrogate tokens map to the tenant's real token, webhook methods are
//! answered locally, and unknown or revoked surrogates are refused.

mod common;

use common::Harness;
use otm_testkit::text_update;
use reqwest::Method;
use std::time::Duration;

/// The surrogate token the agent of `tenant` was given, read from its environment.
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
async fn surrogates_map_to_their_own_tenant_and_die_with_the_instance() {
    let h = Harness::start().await;
    let (a_token, b_token) = ("7001:AAAproxy", "7002:BBBproxy");
    let a_secret = h.tenant("pa", a_token).await;
    let b_secret = h.tenant("pb", b_token).await;
    assert_eq!(
        h.post_update("pa", &a_secret, &text_update(1, 1, "x"))
            .await,
        200
    );
    assert_eq!(
        h.post_update("pb", &b_secret, &text_update(1, 2, "y"))
            .await,
        200
    );
    h.tg.wait_for_messages(a_token, 1, Duration::from_secs(30))
        .await;
    h.tg.wait_for_messages(b_token, 1, Duration::from_secs(30))
        .await;

    let instances = h.instances().await;
    let inst = |t: &str| {
        instances.iter().find(|i| i["tenant"] == t).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let surrogate = surrogate_of(&h, &inst("pa"));
    assert_ne!(surrogate, a_token);
    assert!(
        surrogate.starts_with("7001:"),
        "the surrogate keeps the bot id"
    );
    let egress = |path: String| format!("http://{}{path}", h.server().egress_addr);

    // Forwarded under the real token of its own tenant.
    let me: serde_json::Value = h
        .http
        .post(egress(format!("/bot{surrogate}/getMe")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(me["ok"], true);
    assert_eq!(me["result"]["id"], 7001);
    let last = h.tg.calls().into_iter().last().unwrap();
    assert_eq!(
        (last.method.as_str(), last.token.as_str()),
        ("getMe", a_token)
    );

    // File downloads go the same way.
    let file = h
        .http
        .get(egress(format!("/file/bot{surrogate}/photos/1.jpg")))
        .send()
        .await
        .unwrap();
    assert_eq!(file.status(), 200);
    assert_eq!(
        file.bytes().await.unwrap().as_ref(),
        otm_testkit::fake_telegram::FILE_BYTES
    );

    // Webhook methods never reach Telegram: otm owns the webhook.
    let before = h.tg.calls().len();
    for method in ["setWebhook", "deleteWebhook"] {
        let r: serde_json::Value = h
            .http
            .post(egress(format!("/bot{surrogate}/{method}")))
            .json(&serde_json::json!({"url": "https://evil.example/hook"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(r["ok"], true, "{method}");
    }
    let info: serde_json::Value = h
        .http
        .get(egress(format!("/bot{surrogate}/getWebhookInfo")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        info["result"]["url"],
        format!("{}/tg/pa", common::PUBLIC_URL)
    );
    assert_eq!(h.tg.calls().len(), before, "nothing forwarded");
    assert_eq!(
        h.tg.webhook(a_token).unwrap().url,
        format!("{}/tg/pa", common::PUBLIC_URL)
    );

    // Made-up tokens, the real token, and a mix of two surrogates are refused.
    let b_surrogate = surrogate_of(&h, &inst("pb"));
    let forged = format!("7002:{}", surrogate.split_once(':').unwrap().1);
    for bad in [
        a_token.to_owned(),
        "7001:guess".to_owned(),
        forged,
        format!("{surrogate}x"),
    ] {
        let r = h
            .http
            .post(egress(format!("/bot{bad}/sendMessage")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{bad}");
    }
    let ok = h
        .http
        .post(egress(format!("/bot{b_surrogate}/getMe")))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);

    // Once the instance is stopped, its surrogate is dead.
    let (status, _) = h.api(Method::POST, "/tenants/pa/stop", None).await;
    assert_eq!(status, 200);
    let r = h
        .http
        .post(egress(format!("/bot{surrogate}/sendMessage")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let sent_after = h.tg.sent_messages(a_token).len();
    assert_eq!(sent_after, 1);
    h.stop().await;
}
