//! Every bad webhook call gets the right status and leaves no trace: nothing stored, nothing
//! woken, nothing sent.

mod common;

use common::Harness;
use otm_testkit::text_update;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_store_nothing_wake_nothing_send_nothing() {
    let h = Harness::start().await;
    let token = "3001:REJECTme";
    let secret = h.tenant("guarded", token).await;
    let url = h.public("/tg/guarded");
    let good = serde_json::to_vec(&text_update(1, 9, "hi")).unwrap();
    let big = {
        let mut v = text_update(2, 9, "x");
        v["message"]["text"] = json!("x".repeat(1 << 20));
        serde_json::to_vec(&v).unwrap()
    };

    type Case = (&'static str, String, Option<String>, Vec<u8>, u16);
    let cases: Vec<Case> = vec![
        (
            "unknown tenant",
            h.public("/tg/nobody"),
            Some(secret.clone()),
            good.clone(),
            404,
        ),
        (
            "invalid tenant id",
            h.public("/tg/NOT_A_LABEL"),
            Some(secret.clone()),
            good.clone(),
            404,
        ),
        ("missing secret", url.clone(), None, good.clone(), 401),
        (
            "wrong secret",
            url.clone(),
            Some("wrong".into()),
            good.clone(),
            401,
        ),
        (
            "secret of a prefix",
            url.clone(),
            Some(secret[..secret.len() - 1].to_owned()),
            good.clone(),
            401,
        ),
        ("over 1 MiB", url.clone(), Some(secret.clone()), big, 413),
        (
            "not JSON",
            url.clone(),
            Some(secret.clone()),
            b"hello".to_vec(),
            400,
        ),
        (
            "JSON array",
            url.clone(),
            Some(secret.clone()),
            b"[1,2]".to_vec(),
            400,
        ),
        (
            "no update_id",
            url.clone(),
            Some(secret.clone()),
            br#"{"message":{}}"#.to_vec(),
            400,
        ),
        (
            "string update_id",
            url.clone(),
            Some(secret.clone()),
            br#"{"update_id":"7"}"#.to_vec(),
            400,
        ),
        (
            "fractional update_id",
            url.clone(),
            Some(secret.clone()),
            br#"{"update_id":7.5}"#.to_vec(),
            400,
        ),
        ("empty body", url.clone(), Some(secret.clone()), vec![], 400),
    ];
    for (name, url, secret, body, want) in cases {
        let mut req = h
            .http
            .post(&url)
            .header("content-type", "application/json")
            .body(body);
        if let Some(s) = secret {
            req = req.header("x-telegram-bot-api-secret-token", s);
        }
        let status = req.send().await.unwrap().status().as_u16();
        assert_eq!(status, want, "{name}");
    }
    // GET is not a webhook.
    assert_eq!(
        h.http.get(&url).send().await.unwrap().status().as_u16(),
        405
    );

    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let (status, inbox) = h
        .api(reqwest::Method::GET, "/tenants/guarded/inbox", None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(inbox["pending"], json!([]), "nothing stored");
    assert_eq!(inbox["dead"], json!([]));
    assert!(h.instances().await.is_empty(), "nothing woken");
    assert!(h.instance_dirs().is_empty(), "no instance created");
    let calls: Vec<_> =
        h.tg.calls()
            .into_iter()
            .filter(|c| c.method != "setWebhook")
            .collect();
    assert!(calls.is_empty(), "nothing sent: {calls:?}");
    let (_, t) = h.api(reqwest::Method::GET, "/tenants/guarded", None).await;
    assert_eq!(t["status"], "idle");

    // The same update done right is accepted, and a repeat of it is stored once.
    for _ in 0..3 {
        assert_eq!(
            h.post_update("guarded", &secret, &text_update(1, 9, "hi"))
                .await,
            200
        );
    }
    let got =
        h.tg.wait_for_messages(token, 1, std::time::Duration::from_secs(30))
            .await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].text, "#1: hi");
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(
        h.tg.sent_messages(token).len(),
        1,
        "a repeated update_id is answered once"
    );
    h.stop().await;
}
