//! The instance image: built offline from this build's `otm` by `scripts/build-images`, it runs
//! the shim as a container the way a pod does (read-only root filesystem, user 65532, no
//! capabilities, a writable instance directory of its own, the control API on TCP), and the
//! reference agent in it answers a delivered update through the Bot API root it was bound to.
//!
//! Runs when `OTM_TEST_IMAGES=1` (podman and runc installed; `.ci/run` sets it); skipped
//! otherwise. `OTM_TEST_IMAGE=<tag>` uses an image built beforehand instead of building one.

mod common;

use otm_core::shim_api::BindRequest;
use otm_core::{Secret, TenantId};
use otm_shim::ShimClient;
use otm_testkit::{FakeTelegram, text_update};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

const RUNC: &str = "/usr/sbin/runc";
/// The instance directory inside the image (`otm shim --dir`), an emptyDir in a pod.
const INSTANCE_DIR: &str = "/var/lib/otm/instance";
const SHIM_PORT: u16 = 7070;

/// How podman is run here: runc where the host has it (crun refuses cgroup v1 and hybrid
/// layouts), and a containers.conf that keeps the process limits podman runs with (its default
/// of 1048576 open files fails where the hard limit is lower and cannot be raised).
struct Podman {
    conf: Option<PathBuf>,
}

impl Podman {
    fn new(dir: &Path) -> Podman {
        let conf = std::env::var_os("CONTAINERS_CONF").is_none().then(|| {
            let path = dir.join("containers.conf");
            std::fs::write(&path, "[containers]\ndefault_ulimits = []\n").unwrap();
            path
        });
        Podman { conf }
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new("podman");
        if Path::new(RUNC).exists() {
            cmd.args(["--runtime", RUNC]);
        }
        if let Some(conf) = &self.conf {
            cmd.env("CONTAINERS_CONF", conf);
        }
        cmd
    }

    /// Runs podman with `args`; panics with its output unless it succeeds.
    fn run(&self, args: &[&str]) -> String {
        let out = self.command().args(args).output().expect("podman runs");
        check(&format!("podman {}", args.join(" ")), &out);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn exists(&self, container: &str) -> bool {
        self.command()
            .args(["container", "exists", container])
            .status()
            .expect("podman runs")
            .success()
    }
}

fn check(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "`{what}` failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Removes the container (and an image the test built) however the test ends.
struct Cleanup<'a> {
    podman: &'a Podman,
    container: Option<String>,
    image: Option<String>,
}

impl Drop for Cleanup<'_> {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_instance_image_runs_the_shim_and_the_reference_agent_answers() {
    if std::env::var("OTM_TEST_IMAGES").as_deref() != Ok("1") {
        eprintln!(
            "skipped: set OTM_TEST_IMAGES=1 to build the instance image and run it with podman \
             (apt-get install podman runc)"
        );
        return;
    }
    let dir = common::tempdir();
    let podman = Podman::new(dir.path());
    let suffix = otm_core::id::random_hex(6);
    let mut cleanup = Cleanup {
        podman: &podman,
        container: None,
        image: None,
    };

    // The image: built offline from this build's binaries, or given.
    let image = match std::env::var("OTM_TEST_IMAGE") {
        Ok(tag) if !tag.is_empty() => tag,
        _ => {
            let version = format!("test-{suffix}");
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/build-images");
            let mut build = Command::new(script);
            build.args([
                "--offline",
                "--only",
                "otm",
                "--otm-binary",
                env!("CARGO_BIN_EXE_otm"),
                "--version",
                &version,
            ]);
            if let Some(conf) = &podman.conf {
                build.env("CONTAINERS_CONF", conf);
            }
            let out = build.output().expect("scripts/build-images runs");
            check("scripts/build-images", &out);
            let tag = format!("localhost/otm:{version}");
            cleanup.image = Some(tag.clone());
            tag
        }
    };

    // The agent's Bot API: a stand-in Telegram on the host's loopback.
    let tg = FakeTelegram::start().await;
    let bot_token = format!("4242:{}", otm_core::id::random_hex(12));
    tg.add_bot(&bot_token);

    // Networking as in a pod: a network namespace of its own, the control port published on
    // the host's loopback, and the Bot API reached over TCP at an address that is not the
    // container's loopback (slirp4netns shows the host's loopback as 10.0.2.2). Without
    // slirp4netns, the host's network.
    let host_port = free_port();
    let slirp = Command::new("slirp4netns")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let (network, listen, bot_api_root) = if slirp {
        (
            "slirp4netns:allow_host_loopback=true".to_owned(),
            format!("tcp:0.0.0.0:{SHIM_PORT}"),
            format!("http://10.0.2.2:{}", tg.addr().port()),
        )
    } else {
        (
            "host".to_owned(),
            format!("tcp:127.0.0.1:{host_port}"),
            tg.url(),
        )
    };
    let publish = format!("127.0.0.1:{host_port}:{SHIM_PORT}");
    let container = format!("otm-image-test-{suffix}");
    let instance = format!("i-{suffix}");
    let shim_token = Secret::random();
    let tmpfs = format!("{INSTANCE_DIR}:rw,size=64m,mode=0700,U");
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
        &instance,
        "--dir",
        INSTANCE_DIR,
        "--listen",
        &listen,
        "--token-env",
        "OTM_SHIM_TOKEN",
    ]);
    let out = podman
        .command()
        .args(&args)
        .env("OTM_SHIM_TOKEN", shim_token.expose())
        .output()
        .expect("podman runs");
    check("podman run", &out);
    cleanup.container = Some(container.clone());

    // The shim answers on the published port, with this token only.
    let shim = ShimClient::new(format!("http://127.0.0.1:{host_port}"), shim_token.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        match shim.status().await {
            Ok(s) => break s,
            Err(e) if tokio::time::Instant::now() > deadline => panic!(
                "the shim in the container never answered: {e}\n{}",
                podman.run(&["logs", &container])
            ),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    assert_eq!(status.instance, instance);
    assert_eq!(status.agent, "unbound");
    let stranger = ShimClient::new(format!("http://127.0.0.1:{host_port}"), Secret::random());
    assert!(
        stranger.status().await.is_err(),
        "the shim refuses another token"
    );

    // Bind a tenant on the reference agent; its Bot API root is the stand-in Telegram.
    let tenant = TenantId::parse("image-test").unwrap();
    let bound = shim
        .bind(
            &BindRequest {
                tenant: tenant.clone(),
                profile: "reference".into(),
                bot_api_root,
                bot_token: bot_token.clone(),
                settings: Default::default(),
            },
            Duration::from_secs(60),
        )
        .await
        .unwrap_or_else(|e| panic!("bind failed: {e}\n{}", podman.run(&["logs", &container])));
    assert!(bound.agent_pid.is_some());
    let status = shim.status().await.unwrap();
    assert_eq!(status.tenant.as_ref(), Some(&tenant));
    assert_eq!(status.agent, "ready");

    // One update in, one reply out through the Bot API.
    let update = serde_json::to_vec(&text_update(1, 777, "hello from a pod")).unwrap();
    let delivered = shim
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

    // The shim and the agent run as 65532, with no capabilities.
    let pid = podman.run(&["inspect", "--format", "{{.State.Pid}}", &container]);
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
    let agent = &children[0];
    for p in [&pid, agent] {
        assert_eq!(status_field(p, "Uid:"), "65532\t65532\t65532\t65532");
        assert_eq!(status_field(p, "Gid:"), "65532\t65532\t65532\t65532");
        assert_eq!(status_field(p, "CapEff:"), "0000000000000000");
        assert_eq!(status_field(p, "NoNewPrivs:"), "1");
    }
    let user = podman.run(&["image", "inspect", "--format", "{{.Config.User}}", &image]);
    assert_eq!(user, "65532:65532", "the image's own default user");

    // Stopping the container ends it, and `--rm` removes it.
    podman.run(&["stop", "-t", "10", &container]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while podman.exists(&container) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stopped container {container} is still there"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cleanup.container = None;
    assert!(
        shim.status().await.is_err(),
        "nothing answers on the control port once the container is gone"
    );
}
