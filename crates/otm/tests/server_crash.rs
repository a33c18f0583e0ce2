//! `otm server` killed with SIGKILL while instances run and updates wait: the next start adopts
//! the instances and answers every accepted update exactly once.

mod common;

use otm_testkit::{FakeTelegram, text_update};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::free_port;

struct Ports {
    public: u16,
    admin: u16,
    egress: u16,
}

fn start(ports: &Ports, data: &std::path::Path, tg: &FakeTelegram) -> Child {
    Command::new(env!("CARGO_BIN_EXE_otm"))
        .args(["server", "--listen", &format!("127.0.0.1:{}", ports.public)])
        .args(["--admin-listen", &format!("127.0.0.1:{}", ports.admin)])
        .args(["--egress-listen", &format!("127.0.0.1:{}", ports.egress)])
        .args([
            "--telegram-api",
            &tg.url(),
            "--public-url",
            "https://crash.example.test",
        ])
        .arg("--data-dir")
        .arg(data)
        .env("OTM_ADMIN_TOKEN", "crash-test-admin-token")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

async fn wait_healthy(http: &reqwest::Client, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while http
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .send()
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "server did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_restarts_adopts_instances_and_answers_everything_once() {
    let tg = FakeTelegram::start().await;
    let token = "9301:CRASH";
    tg.add_bot(token);
    let dir = common::tempdir();
    let data = dir.path().join("d");
    let ports = Ports {
        public: free_port(),
        admin: free_port(),
        egress: free_port(),
    };
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let admin = format!("http://127.0.0.1:{}/v1", ports.admin);

    let mut first = start(&ports, &data, &tg);
    wait_healthy(&http, ports.public).await;
    let r = http
        .post(format!("{admin}/tenants"))
        .bearer_auth("crash-test-admin-token")
        .json(&serde_json::json!({"id": "crashy", "bot_token": token}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let secret = tg.webhook(token).unwrap().secret_token.unwrap();

    // The first replies fail, so updates pile up in the inbox while the instance runs. (A kill
    // while a reply is on its way through the proxy can repeat that one reply: Telegram has no
    // idempotent send. This test kills between sends.)
    tg.fail_next_send(3);
    for i in 1..=20 {
        let status = http
            .post(format!("http://127.0.0.1:{}/tg/crashy", ports.public))
            .header("x-telegram-bot-api-secret-token", &secret)
            .json(&text_update(i, 7, &format!("m{i}")))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 200);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let inbox: serde_json::Value = http
            .get(format!("{admin}/tenants/crashy/inbox"))
            .bearer_auth("crash-test-admin-token")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if inbox["pending"][0]["attempts"].as_u64().unwrap_or(0) >= 2 {
            assert_eq!(inbox["pending"].as_array().unwrap().len(), 20);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no failed attempt recorded: {inbox}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first.kill().unwrap(); // SIGKILL
    first.wait().unwrap();
    assert!(
        tg.sent_messages(token).len() < 20,
        "updates were still waiting when the server died"
    );

    let instances: Vec<_> = std::fs::read_dir(data.join("instances"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(instances.len(), 1, "the instance outlived the server");

    let mut second = start(&ports, &data, &tg);
    wait_healthy(&http, ports.public).await;
    let got = tg
        .wait_for_messages(token, 20, Duration::from_secs(60))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let all = tg.sent_messages(token);
    assert_eq!(got.len(), 20);
    assert_eq!(all.len(), 20, "nothing answered twice: {all:?}");
    for (n, m) in all.iter().enumerate() {
        assert_eq!(m.text, format!("#{}: m{}", n + 1, n + 1));
    }
    let list: serde_json::Value = http
        .get(format!("{admin}/instances"))
        .bearer_auth("crash-test-admin-token")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<_> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        ids,
        vec![instances[0].file_name().to_string_lossy().into_owned()],
        "the same instance was adopted"
    );

    let r = http
        .post(format!("{admin}/tenants/crashy/stop"))
        .bearer_auth("crash-test-admin-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(second.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    second.wait().unwrap();
}

/// Fencing numbers survive a restart of a single-node server: a tenant woken before the restart
/// wakes again after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wakes_work_after_a_restart_of_a_single_node_server() {
    let tg = FakeTelegram::start().await;
    let token = "9302:RESTART";
    tg.add_bot(token);
    let dir = common::tempdir();
    let data = dir.path().join("d");
    let ports = Ports {
        public: free_port(),
        admin: free_port(),
        egress: free_port(),
    };
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let admin = format!("http://127.0.0.1:{}/v1", ports.admin);
    let call = |method: reqwest::Method, path: &str| {
        http.request(method, format!("{admin}{path}"))
            .bearer_auth("crash-test-admin-token")
            .send()
    };
    let mut first = start(&ports, &data, &tg);
    wait_healthy(&http, ports.public).await;
    let r = http
        .post(format!("{admin}/tenants"))
        .bearer_auth("crash-test-admin-token")
        .json(&serde_json::json!({"id": "again", "bot_token": token}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    for _ in 0..3 {
        assert_eq!(
            call(reqwest::Method::POST, "/tenants/again/wake")
                .await
                .unwrap()
                .status(),
            200
        );
        assert_eq!(
            call(reqwest::Method::POST, "/tenants/again/stop")
                .await
                .unwrap()
                .status(),
            200
        );
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    first.wait().unwrap();

    let mut second = start(&ports, &data, &tg);
    wait_healthy(&http, ports.public).await;
    let r = call(reqwest::Method::POST, "/tenants/again/wake")
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(
        call(reqwest::Method::POST, "/tenants/again/stop")
            .await
            .unwrap()
            .status(),
        200
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(second.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    second.wait().unwrap();
}
