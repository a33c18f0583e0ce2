//! A tenant's data over its life: deleted with the tenant (or kept under a tombstone on request),
//! never handed to a tenant created again under the same id, dropped from the registry's files
//! once delivered, and exportable as a tar.

mod common;

use common::Harness;
use otm_testkit::text_update;
use reqwest::Method;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

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

async fn snapshot_ids(h: &Harness, tenant: &str) -> Vec<String> {
    let (status, v) = h
        .api(Method::GET, &format!("/tenants/{tenant}/snapshots"), None)
        .await;
    assert_eq!(status, 200, "{v}");
    v["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Every regular file under `dir`.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_tenant_takes_its_snapshots_and_a_recreated_one_starts_empty() {
    let h = Harness::start().await;
    let state = h.dir.path().join("d/state");

    // The first owner talks, and sleeps: a final snapshot holds its history.
    let secret = h.tenant("reuse", "8201:FIRST-owner").await;
    assert_eq!(
        say(&h, "reuse", &secret, "8201:FIRST-owner", 1, "one").await,
        "#1: one"
    );
    assert_eq!(
        say(&h, "reuse", &secret, "8201:FIRST-owner", 2, "two").await,
        "#2: two"
    );
    assert_eq!(
        h.api(Method::POST, "/tenants/reuse/stop", None).await.0,
        200
    );
    assert!(!snapshot_ids(&h, "reuse").await.is_empty());
    assert!(!files_under(&state.join("tenants/reuse")).is_empty());

    // Deleted: the snapshots go with it.
    let (status, v) = h.api(Method::DELETE, "/tenants/reuse", None).await;
    assert_eq!(status, 204, "{v}");
    assert!(snapshot_ids(&h, "reuse").await.is_empty());
    assert_eq!(
        files_under(&state.join("tenants/reuse")),
        Vec::<PathBuf>::new(),
        "nothing of the tenant is left in the state store"
    );

    // A new owner under the same id starts empty: the count starts again at #1.
    let secret = h.tenant("reuse", "8201:SECOND-owner").await;
    assert_eq!(
        say(&h, "reuse", &secret, "8201:SECOND-owner", 1, "hello").await,
        "#1: hello",
        "the new owner never sees the old owner's history"
    );
    assert_eq!(
        say(&h, "reuse", &secret, "8201:SECOND-owner", 2, "again").await,
        "#2: again"
    );

    // Kept on request: under a tombstone, out of reach of the next owner.
    assert_eq!(
        h.api(Method::POST, "/tenants/reuse/stop", None).await.0,
        200
    );
    let kept = snapshot_ids(&h, "reuse").await;
    assert!(!kept.is_empty());
    let (status, v) = h
        .api(Method::DELETE, "/tenants/reuse?keep_state=true", None)
        .await;
    assert_eq!(status, 204, "{v}");
    assert!(snapshot_ids(&h, "reuse").await.is_empty());
    let tombstones: Vec<String> = std::fs::read_dir(state.join("tombstones"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(tombstones.len(), 1, "{tombstones:?}");
    assert!(tombstones[0].starts_with("reuse-"), "{tombstones:?}");
    let in_tombstone = files_under(&state.join("tombstones").join(&tombstones[0]));
    for id in &kept {
        assert!(
            in_tombstone
                .iter()
                .any(|p| p.to_string_lossy().contains(id.as_str())),
            "snapshot {id} is kept: {in_tombstone:?}"
        );
    }
    let secret = h.tenant("reuse", "8201:THIRD-owner").await;
    assert_eq!(
        say(&h, "reuse", &secret, "8201:THIRD-owner", 1, "fresh").await,
        "#1: fresh"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivered_updates_text_leaves_the_registry_files() {
    let h = Harness::start().await;
    let secret = h.tenant("diary", "8202:diary-bot").await;
    let marker = "entry-for-my-diary-5c1f9e7a";
    let reply = say(&h, "diary", &secret, "8202:diary-bot", 1, marker).await;
    assert!(reply.contains(marker), "{reply}");
    let data = h.dir.path().join("d");
    let registry_files = || {
        ["otm.db", "otm.db-wal", "otm.db-shm", "otm.db-journal"]
            .iter()
            .map(|f| data.join(f))
            .filter(|p| p.exists())
            .collect::<Vec<_>>()
    };
    assert!(!registry_files().is_empty());
    let holding = || {
        registry_files()
            .into_iter()
            .filter(|p| {
                std::fs::read(p)
                    .is_ok_and(|bytes| bytes.windows(marker.len()).any(|w| w == marker.as_bytes()))
            })
            .collect::<Vec<_>>()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !holding().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        holding(),
        Vec::<PathBuf>::new(),
        "the message text is gone from the registry's files once delivered"
    );
    // Still deduplicated: Telegram's redelivery of the same update is not answered again.
    assert_eq!(
        h.post_update("diary", &secret, &text_update(1, 5, marker))
            .await,
        200
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(h.tg.sent_messages("8202:diary-bot").len(), 1);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otm_tenant_export_writes_the_latest_state_as_a_tar() {
    let h = Harness::start().await;
    let secret = h.tenant("exp", "8203:export-bot").await;
    let admin_url = format!("http://{}", h.server().admin_addr);
    let out_dir = common::tempdir();
    let export = |tenant: &str, file: &Path| {
        Command::new(env!("CARGO_BIN_EXE_otm"))
            .env_remove("OTM_ADMIN_TOKEN_FILE")
            .args(["--admin-url", &admin_url, "--admin-token"])
            .arg(h.server().admin_token().expose())
            .args(["tenant", "export", tenant, "--file"])
            .arg(file)
            .output()
            .unwrap()
    };

    // Never snapshotted: nothing to export, said plainly.
    let none = export("exp", &out_dir.path().join("none.tar"));
    assert_eq!(
        none.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&none.stderr)
    );
    assert!(!out_dir.path().join("none.tar").exists());

    // Awake with a conversation that no snapshot holds yet: the export takes one first.
    say(&h, "exp", &secret, "8203:export-bot", 1, "remember this").await;
    let tar = out_dir.path().join("exp.tar");
    let done = export("exp", &tar);
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let listing = Command::new("tar").arg("-tf").arg(&tar).output().unwrap();
    assert!(
        listing.status.success(),
        "a plain tar: {}",
        String::from_utf8_lossy(&listing.stderr)
    );
    let names = String::from_utf8_lossy(&listing.stdout).into_owned();
    assert!(
        names.contains(otm_reference_agent::STATE_FILE_NAME),
        "{names}"
    );
    let unpacked = common::tempdir();
    assert!(
        Command::new("tar")
            .arg("-xf")
            .arg(&tar)
            .arg("-C")
            .arg(unpacked.path())
            .status()
            .unwrap()
            .success()
    );
    let state_file = files_under(unpacked.path())
        .into_iter()
        .find(|p| p.ends_with(otm_reference_agent::STATE_FILE_NAME))
        .unwrap();
    let state: Value = serde_json::from_slice(&std::fs::read(state_file).unwrap()).unwrap();
    assert_eq!(
        state["chats"]["5"]["count"], 1,
        "the exported state holds the conversation so far: {state}"
    );
    let (_, snaps) = h.api(Method::GET, "/tenants/exp/snapshots", None).await;
    assert!(
        snaps["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["reason"] == "export"),
        "{snaps}"
    );
    h.stop().await;
}
