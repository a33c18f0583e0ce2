//! Named admin tokens and the audit trail, through the CLI and the API: a read-only token reads
//! and changes nothing, a revoked token is refused at once, and every write shows in `otm audit`
//! with the name of its token, failed sign-ins as `unknown`.

mod common;

use common::Harness;
use reqwest::Method;
use serde_json::{Value, json};

/// Runs `otm ARGS` with `token`; returns the exit code, stdout and stderr.
async fn otm(h: &Harness, token: &str, args: &[&str]) -> (i32, String, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_otm"));
    cmd.args(args)
        .arg("--admin-url")
        .arg(format!("http://{}", h.server().admin_addr))
        .arg("--admin-token")
        .arg(token)
        .env_remove("OTM_ADMIN_TOKEN")
        .env_remove("OTM_ADMIN_URL");
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn call(
    h: &Harness,
    token: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = h.http.request(method, h.admin(path)).bearer_auth(token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_tokens_change_nothing_revoked_ones_are_refused_and_the_audit_trail_names_them() {
    let h = Harness::start().await;
    let admin = h.token.clone();

    // Tokens are printed once, by name.
    let (code, dash, err) = otm(&h, &admin, &["token", "create", "dash", "--read-only"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("read-only"), "{err}");
    let dash = dash.trim().to_owned();
    let (code, ci, err) = otm(&h, &admin, &["token", "create", "ci"]).await;
    assert_eq!(code, 0, "{err}");
    let ci = ci.trim().to_owned();
    assert_ne!(dash, ci);
    let (code, _, err) = otm(&h, &admin, &["token", "create", "ci"]).await;
    assert_eq!(code, 4, "a taken name is a conflict: {err}");
    let (code, _, err) = otm(&h, &admin, &["token", "create", "admin"]).await;
    assert_eq!(code, 4, "the bootstrap token's name is taken: {err}");
    let (code, out, err) = otm(&h, &admin, &["token", "list", "-o", "json"]).await;
    assert_eq!(code, 0, "{err}");
    let list: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        list.as_array()
            .unwrap()
            .iter()
            .map(|t| (t["name"].clone(), t["read_only"].clone()))
            .collect::<Vec<_>>(),
        vec![(json!("ci"), json!(false)), (json!("dash"), json!(true))]
    );
    assert!(
        !out.contains(&dash) && !out.contains(&ci),
        "tokens are never listed: {out}"
    );

    // A full named token changes the fleet.
    let (status, body) = call(
        &h,
        &ci,
        Method::POST,
        "/tenants",
        Some(json!({"id": "acme"})),
    )
    .await;
    assert_eq!(status, 201, "{body}");

    // The read-only token reads everything…
    for path in [
        "/tenants",
        "/tenants/acme",
        "/tenants/acme/inbox",
        "/config",
        "/status",
        "/tokens",
        "/audit",
    ] {
        let (status, body) = call(&h, &dash, Method::GET, path, None).await;
        assert_eq!(status, 200, "GET {path}: {body}");
    }
    // …and changes nothing: every write route answers 403 `forbidden`.
    let writes: Vec<(Method, &str, Option<Value>)> = vec![
        (Method::POST, "/tenants", Some(json!({"id": "sneaky"}))),
        (
            Method::PATCH,
            "/tenants/acme",
            Some(json!({"idle_timeout_s": 5})),
        ),
        (Method::DELETE, "/tenants/acme", None),
        (Method::POST, "/tenants/acme/wake", None),
        (Method::POST, "/tenants/acme/stop", None),
        (Method::POST, "/tenants/acme/inbox/dead/retry", None),
        (Method::DELETE, "/tenants/acme/inbox/dead", None),
        (Method::PUT, "/config", Some(json!({"warm_pool_target": 3}))),
        (Method::POST, "/secrets/rotate", None),
        (Method::POST, "/tokens", Some(json!({"name": "mine"}))),
        (Method::DELETE, "/tokens/ci", None),
    ];
    for (method, path, body) in writes {
        let (status, answer) = call(&h, &dash, method.clone(), path, body).await;
        assert_eq!(
            (status, &answer["error"]["code"]),
            (403, &json!("forbidden")),
            "{method} {path}: {answer}"
        );
    }
    let (code, _, err) = otm(&h, &dash, &["tenant", "create", "sneaky"]).await;
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("read-only"), "{err}");
    let (_, tenants) = call(&h, &admin, Method::GET, "/tenants", None).await;
    let ids: Vec<&str> = tenants
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["acme"], "nothing was created or deleted");
    let (_, acme) = call(&h, &admin, Method::GET, "/tenants/acme", None).await;
    assert_ne!(acme["idle_timeout_s"], 5, "nothing was changed");
    let (_, config) = call(&h, &admin, Method::GET, "/config", None).await;
    assert_eq!(config["warm_pool_target"], 0);

    // A wrong token is refused, and its attempt recorded without the token.
    let wrong = "not-a-token-0123456789";
    let (status, _) = call(&h, wrong, Method::DELETE, "/tenants/acme", None).await;
    assert_eq!(status, 401);

    // Revoked: refused at once, and gone from the list.
    let (code, out, err) = otm(&h, &admin, &["token", "revoke", "ci"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("revoked"), "{out}");
    let (status, body) = call(&h, &ci, Method::GET, "/tenants", None).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (401, &json!("unauthorized")),
        "{body}"
    );
    let (status, _) = call(
        &h,
        &ci,
        Method::POST,
        "/tenants",
        Some(json!({"id": "late"})),
    )
    .await;
    assert_eq!(status, 401, "a revoked token writes nothing");
    let (code, _, err) = otm(&h, &ci, &["tenant", "list"]).await;
    assert_eq!(code, 5, "{err}");
    let (code, _, err) = otm(&h, &admin, &["token", "revoke", "ci"]).await;
    assert_eq!(code, 3, "revoked once: {err}");

    // The audit trail, newest first.
    let (code, out, err) = otm(&h, &dash, &["audit", "--limit", "100", "-o", "json"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        !out.contains(wrong) && !out.contains(&dash) && !out.contains(&ci),
        "no token in the trail"
    );
    let page: Value = serde_json::from_str(&out).unwrap();
    let entries = page["entries"].as_array().unwrap();
    let find = |who: &str, method: &str, route: &str, status: u16| {
        entries.iter().position(|e| {
            e["who"] == who && e["method"] == method && e["route"] == route && e["status"] == status
        })
    };
    let created_token = find("admin", "POST", "/v1/tokens", 201).expect("token creation recorded");
    let created = find("ci", "POST", "/v1/tenants", 201).expect("ci's write recorded");
    let refused =
        find("dash", "PATCH", "/v1/tenants/{id}", 403).expect("dash's refused write recorded");
    let wrong_at = find("unknown", "DELETE", "/v1/tenants/{id}", 401)
        .expect("the wrong token's attempt recorded");
    let revoked =
        find("admin", "DELETE", "/v1/tokens/{name}", 204).expect("the revocation recorded");
    assert!(
        revoked < wrong_at && wrong_at < refused && refused < created && created < created_token,
        "newest first: {page}"
    );
    assert_eq!(entries[refused]["tenant"], "acme");
    assert!(
        entries
            .iter()
            .all(|e| e["method"] != "GET" || e["who"] == "unknown"),
        "reads are recorded only when their token failed (the revoked one's): {page}"
    );
    // Paged: one at a time, each page older than the last.
    let (_, first) = call(&h, &admin, Method::GET, "/audit?limit=1", None).await;
    let next = first["next_before"].as_i64().expect("more pages");
    let (_, second) = call(
        &h,
        &admin,
        Method::GET,
        &format!("/audit?limit=1&before={next}"),
        None,
    )
    .await;
    assert!(
        second["entries"][0]["id"].as_i64().unwrap() < next,
        "{second}"
    );
    assert_eq!(
        second["entries"][0], entries[1],
        "the second page is the second newest entry"
    );
    h.stop().await;
}
