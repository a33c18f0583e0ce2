//! The instance image: built offline from this build's `otm` by `scripts/build-images`, it runs
//! the shim as a container the way a pod does (read-only root filesystem, user 65532, no
//! capabilities, a writable instance directory of its own, the control API on TCP), and the
//! reference agent in it answers a delivered update through the Bot API root it was bound to.
//!
//! The OpenClaw image likewise, built from the installation in `OTM_OPENCLAW_PREFIX`: the
//! reference agent answers in it too (warm pods run it for every profile), and OpenClaw starts
//! in it and answers through the Bot API with the model's reply.
//!
//! Run when `OTM_TEST_IMAGES=1` (podman and runc installed; `.ci/run` sets it): both images are
//! built and the reference agent is run in each; `OTM_TEST_IMAGES=all` runs OpenClaw in its image
//! too.
//! Skipped otherwise. `OTM_TEST_IMAGE=<tag>` (`OTM_TEST_OPENCLAW_IMAGE=<tag>`) uses an image built
//! beforehand instead of building one.

mod common;

use common::images::{build_image, enabled};
use otm_core::shim_api::BindRequest;
use otm_core::{Secret, TenantId};
use otm_shim::ShimClient;
use otm_testkit::podman::{Podman, check};
use otm_testkit::{FakeTelegram, StubModel, text_update};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// The instance directory inside the image (`otm shim --dir`), an emptyDir in a pod.
const INSTANCE_DIR: &str = "/var/lib/otm/instance";
const SHIM_PORT: u16 = 7070;

/// Removes the container (and an image the test built) however the test ends.
struct Cleanup {
    podman: Podman,
    container: Option<String>,
    image: Option<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(c) = &self.container {
            let _ = self
                .podman
                .command()
                .args(["rm", "-f", "-t", "0", "--ignore", c])
                .output();
        }
        if let Some(i) = &self.image {
            let _ = self.podman.command().args(["rmi", "-f", i]).output();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The `Uid:` line of a process's status, e.g. `65532\t65532\t65532\t65532`.
fn status_field(pid: &str, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_owned()
}

/// The OpenClaw installation the OpenClaw image is built from, or `None` (after printing
/// "skipped") without one.
fn openclaw_prefix(test: &str) -> Option<PathBuf> {
    let Some(prefix) = std::env::var_os("OTM_OPENCLAW_PREFIX").filter(|p| !p.is_empty()) else {
        eprintln!(
            "{test}: skipped: OTM_OPENCLAW_PREFIX is not set (scripts/install-openclaw --prefix DIR installs OpenClaw)"
        );
        return None;
    };
    let prefix = PathBuf::from(prefix);
    assert!(
        prefix.join("bin/node").exists(),
        "OTM_OPENCLAW_PREFIX={} holds no OpenClaw installation",
        prefix.display()
    );
    Some(prefix)
}

/// One instance container, run as a pod runs it.
struct Instance {
    cleanup: Cleanup,
    container: String,
    image: String,
    shim: ShimClient,
    /// Whether the container has a network of its own (slirp4netns) rather than the host's.
    slirp: bool,
}

impl Instance {
    /// Builds the image (`otm` or `openclaw`) offline from this build's binaries unless the
    /// variable `given` names one, and starts the shim in it; returns once the shim answers.
    async fn start(which: &str, given: &str, instance: &str, tmpfs_size: &str) -> Instance {
        let podman = Podman::new().unwrap();
        let suffix = otm_core::id::random_hex(6);
        let mut cleanup = Cleanup {
            podman,
            container: None,
            image: None,
        };
        let image = match std::env::var(given) {
            Ok(tag) if !tag.is_empty() => tag,
            _ => {
                let tag = build_image(&cleanup.podman, which, &format!("test-{suffix}"));
                cleanup.image = Some(tag.clone());
                tag
            }
        };

        // Networking as in a pod: a network namespace of its own, the control port published
        // on the host's loopback, and otm's side (here the stand-ins on the host's loopback)
        // reached over TCP at an address that is not the container's loopback: slirp4netns
        // shows the host's loopback as 10.0.2.2. Without slirp4netns, the host's network.
        let host_port = free_port();
        let slirp = Command::new("slirp4netns")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        let (network, listen) = if slirp {
            (
                "slirp4netns:allow_host_loopback=true".to_owned(),
                format!("tcp:0.0.0.0:{SHIM_PORT}"),
            )
        } else {
            ("host".to_owned(), format!("tcp:127.0.0.1:{host_port}"))
        };
        let publish = format!("127.0.0.1:{host_port}:{SHIM_PORT}");
        let container = format!("otm-image-test-{suffix}");
        let shim_token = Secret::random();
        let tmpfs = format!("{INSTANCE_DIR}:rw,size={tmpfs_size},mode=0700,U");
        let mut args = vec![
            "run",
            "--rm",
            "-d",
            "--name",
            &container,
            "--read-only",
            "--user",
            "65532:65532",
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges",
            "--tmpfs",
            &tmpfs,
            "--network",
            &network,
            // The token from podman's own environment, not its arguments.
            "--env",
            "OTM_SHIM_TOKEN",
        ];
        if slirp {
            args.extend(["--publish", &publish]);
        }
        args.extend([
            &image,
            "shim",
            "--instance",
            instance,
            "--dir",
            INSTANCE_DIR,
            "--listen",
            &listen,
            "--token-env",
            "OTM_SHIM_TOKEN",
        ]);
        let out = cleanup
            .podman
            .command()
            .args(&args)
            .env("OTM_SHIM_TOKEN", shim_token.expose())
            .output()
            .expect("podman runs");
        check("podman run", &out);
        cleanup.container = Some(container.clone());

        let address = format!("http://127.0.0.1:{host_port}");
        let shim = ShimClient::new(address.clone(), shim_token);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match shim.status().await {
                Ok(_) => break,
                Err(e) if tokio::time::Instant::now() > deadline => panic!(
                    "the shim in the container never answered: {e}\n{}",
                    cleanup.podman.run(&["logs", &container])
                ),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        let stranger = ShimClient::new(address, Secret::random());
        assert!(
            stranger.status().await.is_err(),
            "the shim refuses another token"
        );
        Instance {
            cleanup,
            container,
            image,
            shim,
            slirp,
        }
    }

    fn podman(&self) -> &Podman {
        &self.cleanup.podman
    }

    /// The URL of something on the host's loopback as the container reaches it.
    fn host_url(&self, addr: std::net::SocketAddr) -> String {
        if self.slirp {
            format!("http://10.0.2.2:{}", addr.port())
        } else {
            format!("http://{addr}")
        }
    }

    /// The end of the agent's log, from the shim.
    async fn agent_log(&self) -> String {
        use futures::StreamExt;
        let Ok(mut stream) = self.shim.logs(60, false).await else {
            return String::new();
        };
        let mut out = Vec::new();
        while let Some(Ok(chunk)) = stream.next().await {
            out.extend_from_slice(&chunk);
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    fn logs(&self) -> String {
        self.podman().run(&["logs", &self.container])
    }

    /// The host's pids of the shim and of its agent.
    fn pids(&self) -> (String, String) {
        let pid = self
            .podman()
            .run(&["inspect", "--format", "{{.State.Pid}}", &self.container]);
        // Whichever of the shim's threads started it is the agent's parent.
        let children: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
            .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
            .flat_map(|c| c.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
            .collect();
        assert_eq!(
            children.len(),
            1,
            "the shim has the agent as its only child"
        );
        (pid, children[0].clone())
    }

    fn agent_environment(&self) -> BTreeMap<String, String> {
        let (_, agent) = self.pids();
        std::fs::read(format!("/proc/{agent}/environ"))
            .unwrap()
            .split(|b| *b == 0)
            .filter_map(|kv| {
                let kv = String::from_utf8_lossy(kv);
                kv.split_once('=')
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
            })
            .collect()
    }

    /// The shim and its agent run as 65532, with no capabilities and no way to gain any.
    fn assert_unprivileged(&self) {
        let (shim, agent) = self.pids();
        for p in [&shim, &agent] {
            assert_eq!(status_field(p, "Uid:"), "65532\t65532\t65532\t65532");
            assert_eq!(status_field(p, "Gid:"), "65532\t65532\t65532\t65532");
            assert_eq!(status_field(p, "CapEff:"), "0000000000000000");
            assert_eq!(status_field(p, "NoNewPrivs:"), "1");
        }
        let user = self.podman().run(&[
            "image",
            "inspect",
            "--format",
            "{{.Config.User}}",
            &self.image,
        ]);
        assert_eq!(user, "65532:65532", "the image's own default user");
    }

    /// Stops the container; `--rm` removes it, and nothing answers on its port any more.
    async fn stop(mut self) {
        self.podman().run(&["stop", "-t", "30", &self.container]);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while self.podman().exists(&self.container) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the stopped container {} is still there",
                self.container
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.cleanup.container = None;
        assert!(
            self.shim.status().await.is_err(),
            "nothing answers on the control port once the container is gone"
        );
    }
}

/// Binds the reference agent in the container and checks that it answers one update through
/// the Bot API root it was given, and what its environment holds.
async fn the_reference_agent_answers(c: &Instance, tenant: &str) {
    let status = c.shim.status().await.unwrap();
    assert_eq!(status.agent, "unbound");

    // The agent's Bot API: a stand-in Telegram on the host's loopback.
    let tg = FakeTelegram::start().await;
    let bot_token = format!("4242:{}", otm_core::id::random_hex(12));
    tg.add_bot(&bot_token);

    let tenant = TenantId::parse(tenant).unwrap();
    let bound = c
        .shim
        .bind(
            &BindRequest {
                tenant: tenant.clone(),
                profile: "reference".into(),
                bot_api_root: c.host_url(tg.addr()),
                bot_token: bot_token.clone(),
                // The egress policy `proxy`: with no forwarder in a pod, the CONNECT proxy is
                // at the Bot API root's host and port.
                settings: BTreeMap::from([(
                    otm_shim::profile::EGRESS_PROXY.to_owned(),
                    "1".to_owned(),
                )]),
            },
            Duration::from_secs(60),
        )
        .await
        .unwrap_or_else(|e| panic!("bind failed: {e}\n{}", c.logs()));
    assert!(bound.agent_pid.is_some());
    let status = c.shim.status().await.unwrap();
    assert_eq!(status.tenant.as_ref(), Some(&tenant));
    assert_eq!(status.agent, "ready");

    // One update in, one reply out through the Bot API.
    let update = serde_json::to_vec(&text_update(1, 777, "hello from a pod")).unwrap();
    let delivered = c
        .shim
        .deliver(update.into(), Duration::from_secs(30))
        .await
        .expect("deliver");
    assert!(delivered.acknowledged, "{delivered:?}");
    let sent = tg
        .wait_for_messages(&bot_token, 1, Duration::from_secs(30))
        .await;
    assert_eq!(sent.len(), 1, "the agent's reply never reached the Bot API");
    assert_eq!(sent[0].chat_id, 777);
    assert_eq!(sent[0].text, "#1: hello from a pod");

    // What the agent was given: the proxy, and never the shim's token.
    let env = c.agent_environment();
    let proxy = format!(
        "http://otm:{}@{}",
        bot_token.replace(':', "%3A"),
        c.host_url(tg.addr()).trim_start_matches("http://")
    );
    assert_eq!(env.get("HTTPS_PROXY"), Some(&proxy));
    assert!(!env.contains_key("OTM_SHIM_TOKEN"), "{:?}", env.keys());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_instance_image_runs_the_shim_and_the_reference_agent_answers() {
    if !enabled("the reference agent's image", "1") {
        return;
    }
    let instance = format!("i-{}", otm_core::id::random_hex(6));
    let c = Instance::start("otm", "OTM_TEST_IMAGE", &instance, "64m").await;
    let status = c.shim.status().await.unwrap();
    assert_eq!(status.instance, instance);
    the_reference_agent_answers(&c, "image-test").await;
    c.assert_unprivileged();
    c.stop().await;
}

/// A warm pod runs the OpenClaw image (when there is one) before its tenant, and so its profile,
/// is known: the image must serve the reference agent too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openclaw_image_builds_offline_and_runs_the_reference_agent() {
    let test = "the reference agent in the OpenClaw image";
    if !enabled(test, "1") {
        return;
    }
    if std::env::var_os("OTM_TEST_OPENCLAW_IMAGE").is_none() && openclaw_prefix(test).is_none() {
        return;
    }
    let instance = format!("i-{}", otm_core::id::random_hex(6));
    // The build runs `otm --version` and `openclaw --version` in the image, read-only, as 65532.
    let c = Instance::start("openclaw", "OTM_TEST_OPENCLAW_IMAGE", &instance, "64m").await;
    assert_eq!(c.shim.status().await.unwrap().instance, instance);
    the_reference_agent_answers(&c, "openclaw-image-reference").await;
    c.assert_unprivileged();
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openclaw_image_runs_openclaw_and_it_answers() {
    if !enabled("OpenClaw in its image", "all") {
        return;
    }
    if std::env::var_os("OTM_TEST_OPENCLAW_IMAGE").is_none()
        && openclaw_prefix("OpenClaw in its image").is_none()
    {
        return;
    }
    let instance = format!("i-{}", otm_core::id::random_hex(6));
    // OpenClaw's state (its SQLite stores, a cache of UI assets) needs more room.
    let c = Instance::start("openclaw", "OTM_TEST_OPENCLAW_IMAGE", &instance, "512m").await;

    let tg = FakeTelegram::start().await;
    let bot_token = format!("4343:{}", otm_core::id::random_hex(12));
    tg.add_bot(&bot_token);
    let stub = StubModel::start().await;
    const OWNER: i64 = 42;

    // What the orchestrator sends for an instance of this image: the launcher in the image,
    // and otm's model route as the model URL (here the stub model itself).
    let settings = BTreeMap::from([
        (
            "openclaw.command".to_owned(),
            "/opt/openclaw/bin/openclaw".to_owned(),
        ),
        ("openclaw.path".to_owned(), "/opt/openclaw/bin".to_owned()),
        (
            "model.base_url".to_owned(),
            format!("{}/v1", c.host_url(stub.addr())),
        ),
        (
            "model.id".to_owned(),
            otm_testkit::stub_model::STUB_MODEL_ID.to_owned(),
        ),
        ("model.api_key".to_owned(), "instance-key".to_owned()),
        ("telegram.allowed_users".to_owned(), OWNER.to_string()),
    ]);
    let tenant = TenantId::parse("openclaw-image-test").unwrap();
    c.shim
        .bind(
            &BindRequest {
                tenant: tenant.clone(),
                profile: "openclaw".into(),
                bot_api_root: c.host_url(tg.addr()),
                bot_token: bot_token.clone(),
                settings,
            },
            Duration::from_secs(300),
        )
        .await
        .unwrap_or_else(|e| panic!("bind failed: {e}\n{}", c.logs()));
    assert_eq!(c.shim.status().await.unwrap().agent, "ready");

    let update = serde_json::to_vec(&text_update(1, OWNER, "hello openclaw")).unwrap();
    let delivered = c
        .shim
        .deliver(update.into(), Duration::from_secs(60))
        .await
        .expect("deliver");
    assert!(delivered.acknowledged, "{delivered:?}");
    let sent = tg
        .wait_for_messages(&bot_token, 1, Duration::from_secs(300))
        .await;
    assert!(
        !sent.is_empty(),
        "OpenClaw's reply never reached the Bot API; the agent's log:\n{}",
        c.agent_log().await
    );
    assert_eq!(sent[0].chat_id, OWNER);
    assert!(
        sent[0].text.contains("you said: hello openclaw"),
        "{:?}",
        sent[0].text
    );
    assert!(
        !stub.requests().is_empty(),
        "the model was reached from inside the container"
    );

    c.assert_unprivileged();
    c.stop().await;
}
