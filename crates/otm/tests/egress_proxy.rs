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

/// Sends one request exactly as written (no client normalises the path) and returns the status
/// and body.
async fn raw(addr: std::net::SocketAddr, method: &str, target: &str, body: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {target} HTTP/1.1\r\nhost: otm\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Wakes `tenant` and returns its instance's surrogate token.
async fn awake_surrogate(h: &Harness, tenant: &str) -> String {
    let (status, woken) = h
        .api(Method::POST, &format!("/tenants/{tenant}/wake"), None)
        .await;
    assert_eq!(status, 200, "{woken}");
    surrogate_of(h, woken["instance"].as_str().unwrap())
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

/// Every way an agent might move its tenant's webhook, end the bot's session or read its
/// updates is answered by otm or refused: the stand-in Telegram records none of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_tricks_never_reach_telegram() {
    let h = Harness::start().await;
    let token = "7101:TRICKStoken";
    h.tenant("tricks", token).await;
    let s = awake_surrogate(&h, "tricks").await;
    let egress = h.server().egress_addr;
    let hook = r#"{"url": "https://evil.example/hook"}"#;

    // The control: a plain call is forwarded and recorded, so the checks below can fail.
    let before = h.tg.calls().len();
    let (status, body) = raw(egress, "POST", &format!("/bot{s}/getMe"), "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(h.tg.calls().len(), before + 1);

    let before = h.tg.calls().len();
    let refused = [
        format!("/bot{s}/x/../setWebhook?url=https://evil.example/hook"),
        format!("/bot{s}/x/%2e%2e/deleteWebhook?drop_pending_updates=true"),
        format!("/bot{s}/x/%2E%2E/deleteWebhook"),
        format!("/bot{s}/x/.%2e/setWebhook"),
        format!("/bot{s}/./setWebhook"),
        format!("/bot{s}/x%2F..%2FsetWebhook"),
        format!("/bot{s}/setWebhook/"),
        format!("/bot{s}/setWebhook/?url=https://evil.example/hook"),
        format!("/bot{s}//setWebhook"),
        format!("/bot{s}/setWebhook.json"),
        format!("/bot{s}/"),
    ];
    for path in &refused {
        let (status, body) = raw(egress, "POST", path, hook).await;
        assert_eq!(status, 404, "{path}: {body}");
    }
    for path in [
        format!("/file/bot{s}/../../x"),
        format!("/file/bot{s}/photos/%2e%2e/%2E%2E/x"),
        format!("/file/bot{s}/photos/"),
        format!("/file/bot{s}/photos%2F..%2F..%2Fx"),
    ] {
        let (status, body) = raw(egress, "GET", &path, "").await;
        assert_eq!(status, 404, "{path}: {body}");
    }
    // Answered by otm, in any case, however spelled.
    for (method, expect) in [
        ("setWebhook", 200),
        ("SETWEBHOOK", 200),
        ("set%57ebhook", 200),
        ("deleteWebhook", 200),
        ("logOut", 200),
        ("LOGOUT", 200),
        ("close", 200),
        ("Close", 200),
        ("getUpdates", 409),
        ("getupdates", 409),
    ] {
        let (status, body) = raw(egress, "POST", &format!("/bot{s}/{method}"), hook).await;
        assert_eq!(status, expect, "{method}: {body}");
    }
    let forwarded: Vec<_> = h.tg.calls().into_iter().skip(before).collect();
    assert!(
        forwarded.is_empty(),
        "these calls reached Telegram: {forwarded:?}"
    );
    assert_eq!(
        h.tg.webhook(token).unwrap().url,
        format!("{}/tg/tricks", common::PUBLIC_URL),
        "the webhook stayed where otm set it"
    );
    let m = metrics(&h).await;
    for reason in [
        "path_dot_segment",
        "path_empty_segment",
        "path_bad_character",
        "method_not_allowed",
        "answered_locally",
    ] {
        assert!(
            m.contains(&format!(
                "otm_egress_refused_total{{proxy=\"bot\",reason=\"{reason}\"}}"
            )),
            "{reason} is counted: {m}"
        );
    }
    // The real token appears in no log line (refusals are logged with tenant and method).
    for f in walk(h.dir.path()) {
        if f.extension().is_some_and(|e| e == "log") {
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            assert!(!text.contains(token), "{} has the token", f.display());
        }
    }
    h.stop().await;
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_symlink() {
            continue;
        }
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Messages to one chat over Telegram's one-a-second wait their turn instead of failing, and
/// keep their order; a 429 from Telegram holds the bot's next call for its `retry_after`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_over_the_rate_limit_are_queued_in_order() {
    let h = Harness::start().await;
    let token = "7201:PACEDtoken";
    h.tenant("paced", token).await;
    let s = awake_surrogate(&h, "paced").await;
    let url = format!("http://{}/bot{s}/sendMessage", h.server().egress_addr);
    let chat = 424_242;
    let mut calls = Vec::new();
    for n in 1..=3 {
        let (http, url) = (h.http.clone(), url.clone());
        calls.push(tokio::spawn(async move {
            http.post(url)
                .json(&serde_json::json!({"chat_id": chat, "text": format!("q{n}")}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
        // Sent in this order.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for c in calls {
        assert_eq!(c.await.unwrap(), 200, "a queued message succeeds");
    }
    let to_chat: Vec<_> =
        h.tg.sent_messages(token)
            .into_iter()
            .filter(|m| m.chat_id == chat)
            .map(|m| m.text)
            .collect();
    assert_eq!(to_chat, ["q1", "q2", "q3"]);
    let at: Vec<_> =
        h.tg.calls()
            .into_iter()
            .filter(|c| c.method == "sendMessage" && c.params["chat_id"] == chat)
            .map(|c| c.at)
            .collect();
    assert_eq!(at.len(), 3);
    let spread = at[2] - at[0];
    assert!(
        spread >= Duration::from_millis(1900),
        "three messages to one chat took {spread:?}"
    );

    // Telegram says "retry after 2": that call is queued, not failed: it goes out again once
    // the two seconds are over, and so does the next call of the bot.
    h.tg.limit_next_send(2);
    let started = std::time::Instant::now();
    let limited = h
        .http
        .post(&url)
        .json(&serde_json::json!({"chat_id": 5150, "text": "r1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(limited.status(), 200, "the agent never sees Telegram's 429");
    let r1: Vec<_> =
        h.tg.calls()
            .into_iter()
            .filter(|c| c.params["text"] == "r1")
            .map(|c| c.at)
            .collect();
    assert_eq!(r1.len(), 2, "sent, refused with 429, sent again");
    assert!(
        r1[1].duration_since(r1[0]) >= Duration::from_millis(1900),
        "the second try waited out retry_after: {:?}",
        r1[1].duration_since(r1[0])
    );
    assert!(started.elapsed() >= Duration::from_millis(1900));
    assert_eq!(
        h.tg.sent_messages(token)
            .iter()
            .filter(|m| m.text == "r1")
            .count(),
        1,
        "sent once"
    );

    // Two 429s in a row: the second goes back to the agent, and the bot's next call waits.
    h.tg.limit_next_sends(2, 1);
    let limited = h
        .http
        .post(&url)
        .json(&serde_json::json!({"chat_id": 5152, "text": "r3"}))
        .send()
        .await
        .unwrap();
    assert_eq!(limited.status(), 429);
    let told = std::time::Instant::now();
    let next = h
        .http
        .post(&url)
        .json(&serde_json::json!({"chat_id": 5153, "text": "r4"}))
        .send()
        .await
        .unwrap();
    assert_eq!(next.status(), 200);
    let r4 =
        h.tg.calls()
            .into_iter()
            .find(|c| c.params["text"] == "r4")
            .unwrap();
    assert!(
        r4.at.duration_since(told) >= Duration::from_millis(700),
        "the call after a 429 went out {:?} after it",
        r4.at.duration_since(told)
    );
    h.stop().await;
}

mod model {
    use super::*;
    use otm_core::Secret;
    use otm_testkit::StubModel;
    use serde_json::json;

    const MODEL_KEY: &str = "sk-operator-key-for-proxy-tests";

    async fn start(stub: &StubModel) -> Harness {
        let model = stub.base_url();
        Harness::start_with(move |s| {
            s.model_base_url = Some(model);
            s.model_id = Some(otm_testkit::stub_model::STUB_MODEL_ID.into());
            s.model_api_key = Some(Secret::new(MODEL_KEY));
        })
        .await
    }

    fn ask(stream: bool) -> String {
        json!({"model": "stub-1", "stream": stream, "messages": [{"role": "user", "content": "ping"}]})
            .to_string()
    }

    /// Escapes and routes off the allowlist never reach the provider.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn model_escapes_and_other_routes_never_reach_the_provider() {
        let stub = StubModel::start().await;
        let h = start(&stub).await;
        h.tenant("escape", "7501:ESCAPEtoken").await;
        let s = awake_surrogate(&h, "escape").await;
        let egress = h.server().egress_addr;

        // The control: an allowed call arrives.
        let (status, body) = raw(
            egress,
            "POST",
            &format!("/model/{s}/chat/completions"),
            &ask(false),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(stub.arrivals(), ["POST /v1/chat/completions"]);

        for (method, tail) in [
            ("GET", "..%2F..%2Fadmin%2Fsecrets"),
            ("GET", "../../admin/secrets"),
            ("GET", "x/%2e%2e/%2e%2e/admin/secrets"),
            ("GET", "files"),
            ("GET", "v1/files"),
            ("DELETE", "files/x"),
            ("DELETE", "v1/files/x"),
            ("POST", "files"),
            ("POST", "embeddings"),
            ("POST", "chat/completions/"),
            ("POST", "chat%2Fcompletions"),
            ("POST", "x/../chat/completions"),
            ("GET", "chat/completions"),
            ("DELETE", "models/stub-1"),
        ] {
            let (status, body) =
                raw(egress, method, &format!("/model/{s}/{tail}"), &ask(false)).await;
            assert_eq!(status, 404, "{method} {tail}: {body}");
        }
        // Another model than the operator's is refused too.
        let other =
            json!({"model": "gpt-expensive", "messages": [{"role": "user", "content": "x"}]});
        let (status, body) = raw(
            egress,
            "POST",
            &format!("/model/{s}/chat/completions"),
            &other.to_string(),
        )
        .await;
        assert_eq!(status, 400, "{body}");
        assert!(body.contains("model_not_allowed"), "{body}");
        assert_eq!(
            stub.arrivals(),
            ["POST /v1/chat/completions"],
            "nothing else reached the provider"
        );
        let m = metrics(&h).await;
        assert!(
            m.contains("otm_egress_refused_total{proxy=\"model\",reason=\"route_not_allowed\"}"),
            "{m}"
        );
        h.stop().await;
    }

    /// A tenant over its budget gets 429 while another is served; budgets and usage show in
    /// the tenant view; a tenant's own model key replaces the server's and is never shown.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tenant_over_its_budget_gets_429_while_another_is_served() {
        let stub = StubModel::start().await;
        let h = start(&stub).await;
        h.tenant("frugal", "7601:FRUGALtoken").await;
        h.tenant("other", "7602:OTHERtoken").await;
        let (status, t) = h
            .api(
                Method::PATCH,
                "/tenants/frugal",
                Some(json!({"model_requests_per_minute": 2, "model_tokens_per_day": 1000})),
            )
            .await;
        assert_eq!(status, 200, "{t}");
        let (status, t) = h
            .api(
                Method::PATCH,
                "/tenants/other",
                Some(json!({"model_tokens_per_day": 20, "model_api_key": "sk-tenant-OWN-key"})),
            )
            .await;
        assert_eq!(status, 200, "{t}");
        assert_eq!(t["has_model_api_key"], true);
        assert!(!t.to_string().contains("sk-tenant-OWN-key"), "{t}");
        let frugal = awake_surrogate(&h, "frugal").await;
        let other = awake_surrogate(&h, "other").await;
        let call = |s: &str, stream: bool| {
            h.http
                .post(format!(
                    "http://{}/model/{s}/chat/completions",
                    h.server().egress_addr
                ))
                .header("content-type", "application/json")
                .body(ask(stream))
                .send()
        };

        // Two requests a minute, then 429.
        for _ in 0..2 {
            let r = call(&frugal, false).await.unwrap();
            assert_eq!(r.status(), 200);
            r.bytes().await.unwrap();
        }
        let over = call(&frugal, false).await.unwrap();
        assert_eq!(over.status(), 429);
        assert!(over.headers().contains_key("retry-after"));
        // The other tenant is served meanwhile, under its own key; its stream's usage counts.
        let r = call(&other, true).await.unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.text().await.unwrap().contains("[DONE]"));
        let r = call(&other, false).await.unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
        // 36 tokens of 20: the next one is refused.
        let mut refused = false;
        for _ in 0..50 {
            let r = call(&other, false).await.unwrap();
            if r.status() == 429 {
                refused = true;
                break;
            }
            r.bytes().await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(refused, "the day's tokens ran out");
        let keys: Vec<_> = stub
            .requests()
            .into_iter()
            .map(|r| r.authorization.unwrap_or_default())
            .collect();
        assert_eq!(
            keys,
            [
                format!("Bearer {MODEL_KEY}"),
                format!("Bearer {MODEL_KEY}"),
                "Bearer sk-tenant-OWN-key".into(),
                "Bearer sk-tenant-OWN-key".into(),
            ],
            "refused calls never reached the provider"
        );

        let (_, f) = h.api(Method::GET, "/tenants/frugal", None).await;
        assert_eq!(f["model_budget"]["requests_per_minute"], 2, "{f}");
        assert_eq!(f["model_budget"]["requests_last_minute"], 2, "{f}");
        assert_eq!(f["model_budget"]["tokens_today"], 36, "{f}");
        let (_, o) = h.api(Method::GET, "/tenants/other", None).await;
        assert_eq!(o["model_budget"]["tokens_per_day"], 20, "{o}");
        assert_eq!(o["model_budget"]["tokens_today"], 36, "{o}");
        assert!(!o.to_string().contains("sk-tenant-OWN-key"), "{o}");
        assert_eq!(o["own_limits"].get("model_api_key"), None, "{o}");
        h.stop().await;
    }
}

/// A body declared over the egress cap is refused before it is read (and nothing is
/// forwarded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_bodies_are_capped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = Harness::start().await;
    h.tenant("big", "7701:BIGtoken").await;
    let s = awake_surrogate(&h, "big").await;
    let before = h.tg.calls().len();
    let mut c = tokio::net::TcpStream::connect(h.server().egress_addr)
        .await
        .unwrap();
    c.write_all(
        format!(
            "POST /bot{s}/sendDocument HTTP/1.1\r\nhost: otm\r\ncontent-type: multipart/form-data; boundary=x\r\ncontent-length: {}\r\n\r\n",
            64u64 << 20
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(30), c.read(&mut head))
        .await
        .expect("answered without the body")
        .unwrap();
    let head = String::from_utf8_lossy(&head[..n]).into_owned();
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert_eq!(h.tg.calls().len(), before, "nothing was forwarded");
    h.stop().await;
}
