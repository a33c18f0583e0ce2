//! Dead letters through the CLI: an update the agent refused is retried once the cause is
//! fixed and answered in order, `--all` takes every dead letter, a dropped one is gone for good,
//! and sequence numbers that name no dead letter are refused with the usual exit codes.

mod common;

use common::Harness;
use otm_testkit::text_update;
use serde_json::Value;
use std::time::Duration;

/// Runs `otm ARGS` against the harness's server; returns the exit code and stdout.
async fn otm(h: &Harness, args: &[&str]) -> (i32, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_otm"));
    cmd.args(args)
        .arg("--admin-url")
        .arg(format!("http://{}", h.server().admin_addr))
        .arg("--admin-token")
        .arg(&h.token)
        .env_remove("OTM_ADMIN_TOKEN")
        .env_remove("OTM_ADMIN_URL");
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), format!("{stdout}{stderr}"))
}

async fn inbox(h: &Harness, tenant: &str) -> Value {
    let (code, out) = otm(h, &["inbox", tenant, "-o", "json"]).await;
    assert_eq!(code, 0, "{out}");
    serde_json::from_str(&out).unwrap()
}

/// Waits until the tenant has `n` dead letters; returns their seqs, oldest first.
async fn dead_letters(h: &Harness, tenant: &str, n: usize) -> Vec<i64> {
    for _ in 0..3000 {
        let v = inbox(h, tenant).await;
        let dead = v["dead"].as_array().unwrap();
        if dead.len() >= n && v["pending"].as_array().unwrap().is_empty() {
            return dead.iter().map(|d| d["seq"].as_i64().unwrap()).collect();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "{tenant} never had {n} dead letters: {}",
        inbox(h, tenant).await
    );
}

/// The texts the bot sent, without the agent's `#n: ` counter.
fn texts(h: &Harness, token: &str) -> Vec<String> {
    h.tg.sent_messages(token)
        .into_iter()
        .map(|m| {
            m.text
                .split_once(": ")
                .map(|(_, t)| t.to_owned())
                .unwrap_or(m.text)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_updates_are_retried_in_order_once_fixed_and_dropped_ones_stay_gone() {
    let h = Harness::start_with(|s| {
        s.bot_chat_interval_ms = 0;
        s.max_delivery_attempts = 1;
    })
    .await;
    let token = "3301:DEADLETTER";
    let secret = h.tenant("mailbag", token).await;

    // The agent cannot send its replies, so it refuses both updates: two dead letters.
    h.tg.fail_next_send(2);
    for (u, text) in [(1, "one"), (2, "two")] {
        assert_eq!(
            h.post_update("mailbag", &secret, &text_update(u, 9, text))
                .await,
            200
        );
    }
    let dead = dead_letters(&h, "mailbag", 2).await;
    assert_eq!(
        texts(&h, token),
        Vec::<String>::new(),
        "nothing was answered"
    );

    // What names no dead letter is refused: an unknown seq (not found, exit 3), a tenant that
    // does not exist (3), a seq that is not a number (invalid, 2).
    let unknown = (dead[1] + 1_000_000).to_string();
    let (code, out) = otm(&h, &["inbox", "retry", "mailbag", &unknown]).await;
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("not found"), "{out}");
    let (code, out) = otm(&h, &["inbox", "drop", "mailbag", &unknown]).await;
    assert_eq!(code, 3, "{out}");
    let (code, out) = otm(&h, &["inbox", "retry", "nobody", "--all"]).await;
    assert_eq!(code, 3, "{out}");
    let (status, body) = h
        .api(
            reqwest::Method::POST,
            "/tenants/mailbag/inbox/first/retry",
            None,
        )
        .await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (400, &Value::from("invalid_request"))
    );

    // The cause is gone now (Telegram takes sends again). Retry the first: answered at once.
    let (code, out) = otm(&h, &["inbox", "retry", "mailbag", &dead[0].to_string()]).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("retried update {}", dead[0])),
        "{out}"
    );
    let sent =
        h.tg.wait_for_messages(token, 1, Duration::from_secs(30))
            .await;
    assert_eq!(sent.len(), 1, "the retried update was answered");
    assert_eq!(texts(&h, token), ["one"]);
    // It is no dead letter any more: retrying it again is a conflict (exit 4).
    let (code, out) = otm(&h, &["inbox", "retry", "mailbag", &dead[0].to_string()]).await;
    assert_eq!(code, 4, "{out}");
    assert!(out.contains("not a dead letter"), "{out}");

    // Two more refused, then --all: the three come back in their order, after the first.
    h.tg.fail_next_send(2);
    for (u, text) in [(3, "three"), (4, "four")] {
        assert_eq!(
            h.post_update("mailbag", &secret, &text_update(u, 9, text))
                .await,
            200
        );
    }
    let dead = dead_letters(&h, "mailbag", 3).await;
    let (code, out) = otm(&h, &["inbox", "retry", "mailbag", "--all", "-o", "json"]).await;
    assert_eq!(code, 0, "{out}");
    let answer: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(answer["retried"], serde_json::json!(dead));
    h.tg.wait_for_messages(token, 4, Duration::from_secs(30))
        .await;
    assert_eq!(texts(&h, token), ["one", "two", "three", "four"]);
    let v = inbox(&h, "mailbag").await;
    assert_eq!(v["dead"], serde_json::json!([]), "{v}");
    let (code, out) = otm(&h, &["inbox", "retry", "mailbag", "--all"]).await;
    assert_eq!((code, out.trim()), (0, "mailbag: no dead letters to retry"));

    // Dropped: gone from the inbox, and Telegram sending it again changes nothing.
    h.tg.fail_next_send(1);
    assert_eq!(
        h.post_update("mailbag", &secret, &text_update(5, 9, "five"))
            .await,
        200
    );
    let dead = dead_letters(&h, "mailbag", 1).await;
    let (code, out) = otm(&h, &["inbox", "drop", "mailbag", "--all"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("dropped update {}", dead[0])),
        "{out}"
    );
    assert_eq!(inbox(&h, "mailbag").await["dead"], serde_json::json!([]));
    assert_eq!(
        h.post_update("mailbag", &secret, &text_update(5, 9, "five"))
            .await,
        200
    );
    assert_eq!(
        h.post_update("mailbag", &secret, &text_update(6, 9, "six"))
            .await,
        200
    );
    h.tg.wait_for_messages(token, 5, Duration::from_secs(30))
        .await;
    assert_eq!(texts(&h, token), ["one", "two", "three", "four", "six"]);
    let (code, out) = otm(&h, &["inbox", "drop", "mailbag", &dead[0].to_string()]).await;
    assert_eq!(code, 4, "a dropped update is not dropped twice: {out}");
    h.stop().await;
}

/// An inbox far longer than one page is shown whole: the admin API answers it page by page
/// (`?after=`, `next_after`), in order, nothing missed and nothing twice across the pending and
/// the dead-letter lists, and `otm inbox` follows the pages to the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_inbox_is_shown_whole_page_by_page() {
    let h = Harness::start().await;
    h.tenant("long", "3301:LONGinbox").await;
    let app = &h.server().app;
    let t = otm_core::TenantId::parse("long").unwrap();
    // No dispatcher can take this inbox: it is claimed under a fence none of them will hold, so
    // everything stays as the test leaves it.
    let fence = u64::MAX / 2;
    app.registry().inbox_claim(&t, fence).await.unwrap();
    let (mut want_pending, mut want_dead) = (Vec::new(), Vec::new());
    for id in 1..=2500i64 {
        let payload = text_update(id, 5, "queued").to_string();
        let seq = match app
            .registry()
            .inbox_append(&t, id, payload.as_bytes())
            .await
            .unwrap()
        {
            otm_core::Appended::Stored { seq } => seq,
            other => panic!("{other:?}"),
        };
        if id % 10 == 0 {
            app.registry()
                .inbox_fail(&t, seq, "refused", 1, Some(fence))
                .await
                .unwrap();
            want_dead.push(id);
        } else {
            want_pending.push(id);
        }
    }

    let (mut pending, mut dead, mut pages) = (Vec::new(), Vec::new(), 0);
    let mut after: Option<i64> = None;
    loop {
        let path = match after {
            Some(a) => format!("/tenants/long/inbox?limit=1000&after={a}"),
            None => "/tenants/long/inbox?limit=1000".to_owned(),
        };
        let (status, v) = h.api(reqwest::Method::GET, &path, None).await;
        assert_eq!(status, 200, "{v}");
        pages += 1;
        let ids = |list: &Value| -> Vec<i64> {
            list.as_array()
                .unwrap()
                .iter()
                .map(|e| e["update_id"].as_i64().unwrap())
                .collect()
        };
        assert!(ids(&v["pending"]).len() <= 1000);
        pending.extend(ids(&v["pending"]));
        dead.extend(ids(&v["dead"]));
        match v["next_after"].as_i64() {
            Some(a) => after = Some(a),
            None => break,
        }
    }
    assert!(pages >= 3, "{pages} pages");
    assert_eq!(pending, want_pending, "every pending update once, in order");
    assert_eq!(dead, want_dead, "every dead letter once, in order");

    let v = inbox(&h, "long").await;
    assert_eq!(v["pending"].as_array().unwrap().len(), 2250);
    assert_eq!(v["dead"].as_array().unwrap().len(), 250);
    assert_eq!(v["next_after"], Value::Null);
    let (status, v) = h
        .api(reqwest::Method::GET, "/tenants/long/inbox?limit=lots", None)
        .await;
    assert_eq!(status, 400, "{v}");
    h.stop().await;
}
