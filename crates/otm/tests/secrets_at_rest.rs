//! Secrets at rest: the data directory and its files are private to otm's user, no bot token
//! or webhook secret is in any file in plaintext, `otm secrets rotate` re-encrypts them while
//! the server keeps delivering (and after a restart), and a forged endpoint in Redis is not
//! followed.

mod common;

use common::Harness;
use otm_testkit::text_update;
use reqwest::Method;
use serde_json::{Value, json};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Sends one message as chat 5 and waits for the agent's answer; returns its text.
async fn say(
    h: &Harness,
    tenant: &str,
    secret: &str,
    token: &str,
    update_id: i64,
    text: &str,
) -> String {
    let have = h.tg.sent_messages(token).len();
    assert_eq!(
        h.post_update(tenant, secret, &text_update(update_id, 5, text))
            .await,
        200
    );
    let got =
        h.tg.wait_for_messages(token, have + 1, Duration::from_secs(60))
            .await;
    assert!(got.len() > have, "no answer from {tenant} to {text:?}");
    got[have].text.clone()
}

/// Every regular file under `dir` (sockets and other special files left out).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() {
                out.push(e.path());
            }
        }
    }
    out
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// The files under `dir` whose raw bytes contain `needle`.
fn files_containing(dir: &Path, needle: &str) -> Vec<PathBuf> {
    files_under(dir)
        .into_iter()
        .filter(|p| {
            std::fs::read(p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle.as_bytes()))
        })
        .collect()
}

/// Restarts the harness's server on the same data directory.
async fn restart(h: &mut Harness, configure: impl FnOnce(&mut otm_server::Settings)) {
    if let Some(s) = h.server.take() {
        s.shutdown(Duration::from_secs(10), true).await;
    }
    let mut s = common::settings(h.dir.path().join("d"), &h.tg);
    configure(&mut s);
    let server = otm_server::start(s, None).await.expect("server restarts");
    h.token = server.admin_token().expose().to_owned();
    h.server = Some(server);
}

/// Creates a tenant whose webhook secret is chosen by the caller.
async fn tenant_with_secret(h: &Harness, id: &str, bot_token: &str, secret: &str) {
    h.tg.add_bot(bot_token);
    let (status, body) = h
        .api(
            Method::POST,
            "/tenants",
            Some(json!({"id": id, "bot_token": bot_token, "webhook_secret": secret})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
}

fn otm_cli(h: &Harness, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_otm"))
        .args(args)
        .env_remove("OTM_ADMIN_TOKEN_FILE")
        .env("OTM_ADMIN_URL", format!("http://{}", h.server().admin_addr))
        .env("OTM_ADMIN_TOKEN", &h.token)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_encrypted_files_private_and_rotation_keeps_delivering() {
    let mut h = Harness::start_with(|s| s.sandbox = otm_server::Sandbox::None).await;
    let data = h.dir.path().join("d");
    let tokens = ["8301:ALPHA-bot-token-xyz", "8302:BRAVO-bot-token-xyz"];
    let mut secrets = vec![h.tenant("alpha", tokens[0]).await];
    tenant_with_secret(&h, "bravo", tokens[1], "Bravo_webhook_SECRET_0123").await;
    secrets.push("Bravo_webhook_SECRET_0123".into());
    // A tenant's own model provider key is sealed like the bot token.
    let model_key = "sk-bravo-own-provider-key-0123456789";
    let (status, body) = h
        .api(
            Method::PATCH,
            "/tenants/bravo",
            Some(json!({"model_api_key": model_key})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["has_model_api_key"], true, "{body}");
    secrets.push(model_key.into());
    assert_eq!(
        say(&h, "alpha", &secrets[0], tokens[0], 1, "hi").await,
        "#1: hi"
    );
    assert_eq!(
        say(&h, "bravo", &secrets[1], tokens[1], 1, "hi").await,
        "#1: hi"
    );
    // A snapshot in the local state store.
    assert_eq!(
        h.api(Method::POST, "/tenants/alpha/stop", None).await.0,
        200
    );

    // Private: the directory, the registry with its WAL, the key file, the admin token, every
    // snapshot.
    assert_eq!(mode(&data), 0o700, "the data directory");
    let db = data.join("otm.db");
    assert!(db.exists());
    for f in [
        "otm.db",
        "otm.db-wal",
        "otm.db-shm",
        "admin.token",
        "secret.key",
    ] {
        let p = data.join(f);
        if p.exists() {
            assert_eq!(mode(&p), 0o600, "{f}");
        } else {
            assert!(f.ends_with("-shm") || f.ends_with("-wal"), "{f} is missing");
        }
    }
    let snapshots = files_under(&data.join("state"));
    assert!(!snapshots.is_empty(), "a snapshot was written");
    for p in &snapshots {
        assert_eq!(mode(p), 0o600, "{}", p.display());
    }
    assert_eq!(mode(&data.join("state")), 0o700);

    // No file anywhere under the data directory holds a bot token or a webhook secret.
    for needle in tokens.iter().map(|t| t.to_string()).chain(secrets.clone()) {
        assert_eq!(
            files_containing(&data, &needle),
            Vec::<PathBuf>::new(),
            "a secret is in plaintext"
        );
    }
    let key_file = std::fs::read_to_string(data.join("secret.key")).unwrap();
    let old_key = key_file
        .lines()
        .find(|l| !l.starts_with('#') && !l.starts_with("mac "))
        .and_then(|l| l.split(' ').next())
        .unwrap()
        .to_owned();

    // Rotation through the CLI against the running server.
    let out = otm_cli(&h, &["secrets", "rotate", "-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    let new_key = r["key_id"].as_str().unwrap().to_owned();
    assert_ne!(new_key, old_key);
    assert_eq!(r["new_key"], true);
    assert_eq!(r["reencrypted"], 2, "{r}");
    assert_eq!(r["retired"], json!([old_key]), "{r}");
    let key_file = std::fs::read_to_string(data.join("secret.key")).unwrap();
    assert!(key_file.contains(&format!("\n{new_key} ")) && !key_file.contains(&old_key));
    assert_eq!(mode(&data.join("secret.key")), 0o600);
    assert!(
        !files_containing(&data, &format!("v1:{new_key}:")).is_empty(),
        "the registry holds values under the new key"
    );
    // The server still delivers: webhook secrets check, bot tokens reach Telegram.
    assert_eq!(
        say(&h, "alpha", &secrets[0], tokens[0], 2, "after").await,
        "#2: after"
    );
    assert_eq!(
        say(&h, "bravo", &secrets[1], tokens[1], 2, "after").await,
        "#2: after"
    );
    // A wrong webhook secret is still refused.
    assert_eq!(
        h.post_update("alpha", "not-the-secret", &text_update(3, 5, "x"))
            .await,
        401
    );

    // Permissions an older version left are fixed at the next start, and the secrets read.
    for p in [db.clone(), data.join("admin.token")]
        .into_iter()
        .chain(snapshots.clone())
    {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    restart(&mut h, |s| s.sandbox = otm_server::Sandbox::None).await;
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&db), 0o600);
    assert_eq!(mode(&data.join("admin.token")), 0o600);
    for p in &snapshots {
        assert_eq!(mode(p), 0o600, "{}", p.display());
    }
    assert_eq!(
        say(&h, "alpha", &secrets[0], tokens[0], 4, "restarted").await,
        "#3: restarted"
    );
    assert_eq!(
        say(&h, "bravo", &secrets[1], tokens[1], 4, "restarted").await,
        "#3: restarted"
    );
    for needle in tokens.iter().map(|t| t.to_string()).chain(secrets.clone()) {
        assert_eq!(files_containing(&data, &needle), Vec::<PathBuf>::new());
    }

    // Without its key, a tenant's secrets are an error that names it, not a crash.
    h.server
        .take()
        .unwrap()
        .shutdown(Duration::from_secs(10), true)
        .await;
    let other_key = data.join("other.key");
    let out = Command::new(env!("CARGO_BIN_EXE_otm"))
        .args(["secrets", "keygen", other_key.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // It refuses to replace a file.
    let again = Command::new(env!("CARGO_BIN_EXE_otm"))
        .args(["secrets", "keygen", other_key.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert_eq!(mode(&other_key), 0o600);
    let server = otm_server::start(
        {
            let mut s = common::settings(data.clone(), &h.tg);
            s.sandbox = otm_server::Sandbox::None;
            s.secret_key_file = Some(other_key);
            s
        },
        None,
    )
    .await
    .expect("a server with another key still starts");
    h.server = Some(server);
    let (status, v) = h.api(Method::GET, "/tenants/alpha", None).await;
    assert_eq!(status, 500, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("alpha") && msg.contains("not in the secret key file"),
        "{msg}"
    );
    assert_eq!(
        h.post_update("alpha", &secrets[0], &text_update(9, 5, "x"))
            .await
            / 100,
        5,
        "no update is accepted while the tenant's secrets cannot be read"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_sandboxed_instances_the_data_directory_is_only_traversable() {
    let h = Harness::start().await;
    let data = h.dir.path().join("d");
    let secret = h.tenant("sbx", "8303:CHARLIE-bot-token").await;
    assert_eq!(
        say(&h, "sbx", &secret, "8303:CHARLIE-bot-token", 1, "hi").await,
        "#1: hi"
    );
    // 0700, or 0711 when instances run as uids of their own: never listable or writable by others.
    let m = mode(&data);
    assert!(m == 0o700 || m == 0o711, "{m:o}");
    for f in ["otm.db", "admin.token", "secret.key"] {
        assert_eq!(mode(&data.join(f)), 0o600, "{f}");
    }
    for needle in ["8303:CHARLIE-bot-token", secret.as_str()] {
        assert_eq!(files_containing(&data, needle), Vec::<PathBuf>::new());
    }
    h.stop().await;
}

/// A minimal Redis client: one command, one reply (bulk strings, integers, simple strings).
async fn redis_cmd(url: &str, args: &[&str]) -> Option<String> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let hostport = rest.rsplit('@').next().unwrap().split('/').next().unwrap();
    let mut conn = tokio::net::TcpStream::connect(hostport).await.unwrap();
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut r = BufReader::new(conn);
    let mut line = String::new();
    r.read_line(&mut line).await.unwrap();
    let line = line.trim_end();
    match line.as_bytes()[0] {
        b'$' => {
            let n: i64 = line[1..].parse().unwrap();
            if n < 0 {
                return None;
            }
            let mut buf = vec![0; n as usize + 2];
            r.read_exact(&mut buf).await.unwrap();
            buf.truncate(n as usize);
            Some(String::from_utf8(buf).unwrap())
        }
        b'-' => panic!("redis: {line}"),
        _ => Some(line[1..].to_owned()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_redis_endpoint_is_not_followed() {
    let Some(redis) = std::env::var("OTM_TEST_REDIS_URL")
        .ok()
        .filter(|u| !u.is_empty())
    else {
        eprintln!("skipped: OTM_TEST_REDIS_URL is not set");
        return;
    };
    let url = redis.clone();
    let h = Harness::start_with(move |s| s.coordinator = Some(url)).await;
    let tenant = format!("forge-{}", std::process::id());
    let token = "8304:DELTA-bot-token";
    let secret = h.tenant(&tenant, token).await;
    assert_eq!(say(&h, &tenant, &secret, token, 1, "hi").await, "#1: hi");

    // The genuine entry: signed, no shim token.
    let key = format!("otm:endpoint:{tenant}");
    let genuine: Value =
        serde_json::from_str(&redis_cmd(&redis, &["GET", &key]).await.expect("cached")).unwrap();
    assert!(genuine.get("shim_token").is_none(), "{genuine}");
    assert!(genuine["signature"].is_string(), "{genuine}");

    // Whoever can write to Redis points the tenant at their own listener.
    let trap = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let trap_addr = trap.local_addr().unwrap();
    let caught = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = caught.clone();
    tokio::spawn(async move {
        while let Ok((_conn, _)) = trap.accept().await {
            c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let mut forged = genuine.clone();
    forged["address"] = json!(format!("http://{trap_addr}"));
    redis_cmd(&redis, &["SET", &key, &forged.to_string()]).await;
    assert_eq!(say(&h, &tenant, &secret, token, 2, "two").await, "#2: two");
    // An entry with a made-up signature and the token field of old: not followed either.
    forged["signature"] = json!("00".repeat(32));
    forged["shim_token"] = json!("guess");
    redis_cmd(&redis, &["SET", &key, &forged.to_string()]).await;
    assert_eq!(
        say(&h, &tenant, &secret, token, 3, "three").await,
        "#3: three"
    );
    assert_eq!(
        caught.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "no delivery went to the forged address"
    );
    let after = redis_cmd(&redis, &["GET", &key]).await;
    if let Some(after) = after {
        let v: Value = serde_json::from_str(&after).unwrap();
        assert_eq!(
            v["address"], genuine["address"],
            "only a genuine entry is cached"
        );
    }
    let (status, _) = h
        .api(Method::DELETE, &format!("/tenants/{tenant}"), None)
        .await;
    assert_eq!(status, 204);
    h.stop().await;
}
