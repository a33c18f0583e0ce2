//! The built `otm` binary: settings validation before binding, and the CLI against a running server.

mod common;

use common::Harness;
use otm_testkit::text_update;
use std::process::Command;
use std::time::Duration;

fn otm() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_otm"));
    c.env_remove("OTM_ADMIN_TOKEN")
        .env_remove("OTM_ADMIN_TOKEN_FILE")
        .env_remove("OTM_DATA_DIR")
        .env_remove("OTM_ADMIN_URL");
    c
}

#[test]
fn invalid_settings_exit_non_zero_before_binding() {
    let dir = common::tempdir();
    // A port we hold: had the server bound anything, it would say so; it must fail earlier.
    for (args, needle) in [
        (vec!["--listen", "not-an-address"], "listen"),
        (vec!["--telegram-api", "ftp://x"], "telegram-api"),
        (vec!["--public-url", "nope"], "public-url"),
        (vec!["--sandbox", "docker"], "sandbox"),
        // Backend URLs: an unknown scheme, or no URL at all.
        (
            vec!["--registry", "mysql://db/otm", "--sandbox", "none"],
            "registry",
        ),
        (
            vec!["--registry", "not a url", "--sandbox", "none"],
            "registry",
        ),
        (
            vec![
                "--coordinator",
                "etcd://127.0.0.1:2379",
                "--sandbox",
                "none",
            ],
            "coordinator",
        ),
        (
            vec!["--coordinator", "127.0.0.1:6379", "--sandbox", "none"],
            "coordinator",
        ),
        (
            vec!["--state", "ftp://files/otm", "--sandbox", "none"],
            "state",
        ),
        (
            vec!["--state", "file://relative/dir", "--sandbox", "none"],
            "state",
        ),
        (vec!["--role", "leader"], "role"),
        (
            vec!["--lease-ttl-s", "1", "--sandbox", "none"],
            "lease-ttl-s",
        ),
        (
            vec!["--role", "router", "--sandbox", "none"],
            "orchestrator-url",
        ),
        (
            vec![
                "--listen",
                "127.0.0.1:18555",
                "--admin-listen",
                "127.0.0.1:18555",
            ],
            "listen",
        ),
    ] {
        let out = otm()
            .arg("server")
            .args(&args)
            .arg("--data-dir")
            .arg(dir.path().join("d"))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{args:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(
            !dir.path().join("d/admin.token").exists(),
            "{args:?}: started before failing"
        );
    }
    // The TOML file is checked the same way.
    let cfg = dir.path().join("otm.toml");
    std::fs::write(&cfg, "listen = \"127.0.0.1:1\"\nno_such_setting = true\n").unwrap();
    let out = otm()
        .args(["server", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no_such_setting"));
}

#[test]
fn print_config_shows_the_effective_settings_without_secrets() {
    let dir = common::tempdir();
    let cfg = dir.path().join("otm.toml");
    std::fs::write(
        &cfg,
        "listen = \"127.0.0.1:18601\"\nadmin_listen = \"127.0.0.1:18602\"\nlease_ttl_s = 30\nmodel_api_key = \"sk-from-file\"\n",
    )
    .unwrap();
    let out = otm()
        .args(["server", "--print-config", "--sandbox", "none", "--config"])
        .arg(&cfg)
        .args(["--admin-listen", "127.0.0.1:18603"])
        .env("OTM_LEASE_TTL_S", "40")
        .env("OTM_SERVICE_TOKEN", "service-secret")
        .env("OTM_ADMIN_TOKEN", "admin-secret")
        .env("OTM_DATA_DIR", dir.path().join("d"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    for secret in ["sk-from-file", "service-secret", "admin-secret"] {
        assert!(!text.contains(secret), "{secret} printed:\n{text}");
    }
    let printed: toml::Table = text.parse().unwrap();
    let get = |k: &str| printed.get(k).map(ToString::to_string).unwrap_or_default();
    assert_eq!(get("listen"), "\"127.0.0.1:18601\"", "from the file");
    assert_eq!(get("admin_listen"), "\"127.0.0.1:18603\"", "the flag wins");
    assert_eq!(get("lease_ttl_s"), "40", "the variable wins");
    assert_eq!(get("egress_listen"), "\"127.0.0.1:8082\"", "the default");
    assert_eq!(get("sandbox"), "\"none\"");
    assert_eq!(get("role"), "\"all\"");
    for secret in ["model_api_key", "service_token", "admin_token"] {
        assert_eq!(get(secret), "\"<redacted>\"", "{text}");
    }
    assert!(
        get("data_dir").contains(&*dir.path().join("d").to_string_lossy()),
        "{text}"
    );
    assert!(
        !dir.path().join("d").exists(),
        "printing the settings created the data directory"
    );
}

#[test]
fn help_explains_every_command() {
    let out = otm().arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in [
        "server",
        "tenant",
        "config",
        "logs",
        "inbox",
        "snapshots",
        "instances",
        "status",
        "version",
    ] {
        assert!(text.contains(cmd), "{cmd} missing from --help");
    }
    let out = otm().args(["server", "--help"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for env in [
        "OTM_LISTEN",
        "OTM_ADMIN_LISTEN",
        "OTM_EGRESS_LISTEN",
        "OTM_DATA_DIR",
        "OTM_TELEGRAM_API",
        "OTM_PUBLIC_URL",
    ] {
        assert!(text.contains(env), "{env} missing from server --help");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_drives_a_running_server_in_table_and_json() {
    let h = Harness::start().await;
    let admin_url = format!("http://{}", h.server().admin_addr);
    let data_dir = h.dir.path().join("d");
    let run = |args: &[&str]| {
        let out = otm()
            .arg("--admin-url")
            .arg(&admin_url)
            .arg("--data-dir")
            .arg(&data_dir)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    h.tg.add_bot("8001:CLIbot");
    let (code, out, err) = run(&[
        "tenant",
        "create",
        "clara",
        "8001:CLIbot",
        "--idle-timeout",
        "120",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("clara") && out.contains("120s"), "{out}");
    assert!(!out.contains("CLIbot"), "the token is never printed");
    let (code, _, err) = run(&["tenant", "create", "clara"]);
    assert_eq!(code, 4, "a second create is a conflict: {err}");
    let (code, _, err) = run(&["tenant", "create", "Bad_Id"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, _) = run(&["tenant", "get", "nobody"]);
    assert_eq!(code, 3);

    let (code, out, _) = run(&["tenant", "list"]);
    assert_eq!(code, 0);
    let header = out.lines().next().unwrap();
    assert!(
        header.starts_with("ID") && header.contains("STATUS"),
        "{out}"
    );
    let (code, out, _) = run(&["tenant", "list", "-o", "json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["id"], "clara");
    let (code, out, _) = run(&["--output", "json", "tenant", "get", "clara"]);
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["idle_timeout_s"],
        120
    );

    // Resource limits, in the units operators write.
    let (code, _, err) = run(&[
        "tenant", "update", "clara", "--memory", "256Mi", "--cpu", "500m", "--pids", "100",
        "--disk", "2Gi",
    ]);
    assert_eq!(code, 0, "{err}");
    let (_, out, _) = run(&["-o", "json", "tenant", "get", "clara"]);
    let limits = serde_json::from_str::<serde_json::Value>(&out).unwrap()["limits"].clone();
    assert_eq!(
        limits,
        serde_json::json!({"memory_bytes": 256u64 << 20, "cpu_millis": 500, "cpu_request_millis": 200, "pids": 100, "disk_bytes": 2u64 << 30})
    );
    let (code, _, err) = run(&["tenant", "update", "clara", "--memory", "lots"]);
    assert_ne!(code, 0);
    assert!(err.contains("memory"), "{err}");
    let (code, _, err) = run(&["config", "set", "max-running", "50"]);
    assert_eq!(code, 0, "{err}");
    let (_, out, _) = run(&["-o", "json", "config", "get"]);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["max_running"],
        50
    );
    let (code, _, _) = run(&["config", "set", "max-running", "0"]);
    assert_eq!(code, 0);

    let (code, out, err) = run(&["tenant", "wake", "clara"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("awake"), "{out}");
    let (code, out, _) = run(&["instances", "-o", "json"]);
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap()[0]["tenant"],
        "clara"
    );
    let (code, out, _) = run(&["instances"]);
    assert_eq!(code, 0);
    assert!(out.contains("clara") && out.contains("ready"), "{out}");

    let secret = h.tg.webhook("8001:CLIbot").unwrap().secret_token.unwrap();
    assert_eq!(
        h.post_update("clara", &secret, &text_update(1, 3, "hi"))
            .await,
        200
    );
    h.tg.wait_for_messages("8001:CLIbot", 1, Duration::from_secs(30))
        .await;
    let (code, out, _) = run(&["logs", "clara", "--tail", "50"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("reference agent") || out.contains("listening"),
        "{out}"
    );
    let (code, out, _) = run(&["inbox", "clara"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("SEQ"), "{out}");
    // The agent sends its reply before it answers the delivery, which is acknowledged after:
    // the update leaves the inbox a moment after the reply.
    let mut pending = serde_json::Value::Null;
    for _ in 0..200 {
        let (code, out, _) = run(&["inbox", "clara", "-o", "json"]);
        assert_eq!(code, 0);
        pending = serde_json::from_str::<serde_json::Value>(&out).unwrap()["pending"].clone();
        if pending == serde_json::json!([]) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(pending, serde_json::json!([]));

    let (code, out, _) = run(&["tenant", "stop", "clara"]);
    assert_eq!(code, 0);
    assert!(out.contains("stopped"), "{out}");

    // The same verbs in JSON.
    let (code, out, err) = run(&[
        "tenant",
        "create",
        "jason",
        "--idle-timeout",
        "30",
        "-o",
        "json",
    ]);
    assert_eq!(code, 0, "{err}");
    let t: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (
            t["id"].as_str(),
            t["idle_timeout_s"].as_u64(),
            t["status"].as_str()
        ),
        (Some("jason"), Some(30), Some("idle"))
    );
    let (code, out, _) = run(&["tenant", "wake", "jason", "-o", "json"]);
    assert_eq!(code, 0);
    let w: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(w["path"], "cold");
    assert!(w["phases_ms"]["ready"].is_number(), "{w}");
    let (code, out, _) = run(&["tenant", "stop", "jason", "-o", "json"]);
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["stopped"],
        true
    );
    let (code, out, _) = run(&["tenant", "delete", "jason", "-o", "json"]);
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["deleted"],
        "jason"
    );
    let (code, out, _) = run(&["snapshots", "clara"]);
    assert_eq!(code, 0);
    assert!(out.contains("final"), "{out}");
    let (code, out, _) = run(&["snapshots", "clara", "-o", "json"]);
    assert_eq!(code, 0);
    let snaps: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(snaps["snapshots"].as_array().unwrap().len(), 1);

    let (code, out, _) = run(&["config", "set", "warm-pool-target", "0"]);
    assert_eq!(code, 0, "{out}");
    let (code, out, _) = run(&["config", "get", "-o", "json"]);
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["warm_pool_target"],
        0
    );
    let (code, _, _) = run(&["config", "set", "no-such-thing", "1"]);
    assert_eq!(code, 2);
    let (code, out, _) = run(&["status", "-o", "json"]);
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["tenants"],
        1
    );
    let (code, out, _) = run(&["status"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("FIELD") && out.contains("tenants"), "{out}");
    let (code, out, _) = run(&["version"]);
    assert_eq!(code, 0);
    assert!(out.contains(env!("CARGO_PKG_VERSION")));
    let (code, _, _) = run(&["tenant", "update", "clara", "--idle-timeout", "60"]);
    assert_eq!(code, 0);
    let (code, _, _) = run(&["tenant", "delete", "clara"]);
    assert_eq!(code, 0);
    let (code, _, _) = run(&["tenant", "get", "clara"]);
    assert_eq!(code, 3);

    // A wrong token is exit code 5.
    let out = otm()
        .args([
            "--admin-url",
            &admin_url,
            "--admin-token",
            "wrong",
            "tenant",
            "list",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5));
    h.stop().await;
}

#[test]
fn sandbox_auto_refuses_to_start_without_bubblewrap() {
    let dir = common::tempdir();
    for sandbox in ["auto", "bubblewrap"] {
        let out = otm()
            .env("PATH", "/nonexistent")
            .args([
                "server",
                "--sandbox",
                sandbox,
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ])
            .args(["--egress-listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("d"))
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "--sandbox {sandbox} started without bubblewrap"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("apt-get install bubblewrap") && err.contains("--sandbox none"),
            "{err}"
        );
        assert!(
            !dir.path().join("d/admin.token").exists(),
            "started before failing"
        );
    }
}

#[test]
fn sandbox_none_is_said_at_start_and_in_status() {
    use std::io::{BufRead, BufReader};
    let dir = common::tempdir();
    let data = dir.path().join("d");
    let mut server = otm()
        .args([
            "server",
            "--sandbox",
            "none",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .args(["--egress-listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let admin = line
        .split("admin API on ")
        .nth(1)
        .and_then(|r| r.split('/').nth(2))
        .expect("the admin address is printed")
        .to_owned();
    let status = otm()
        .args(["--admin-url", &format!("http://{admin}"), "--data-dir"])
        .arg(&data)
        .args(["-o", "json", "status"])
        .output()
        .unwrap();
    let _ = server.kill();
    let out = server.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("WITHOUT a sandbox"),
        "the start says so: {log}"
    );
    let v: serde_json::Value = serde_json::from_slice(&status.stdout)
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&status.stderr)));
    assert_eq!(v["isolation"], "none");
    assert_eq!(v["sandboxed"], false);
    assert!(
        v["warnings"][0]
            .as_str()
            .unwrap()
            .contains("without a sandbox"),
        "{v}"
    );
}

/// `./otm server` beside its default `./otm-data` (or `/opt/otm/{otm,data}`): the binary's
/// directory holds the data directory. Refused before anything is created, naming the flag.
#[test]
fn a_data_dir_beside_the_binary_is_refused() {
    let dir = common::tempdir();
    let binary = dir.path().join("otm");
    if std::fs::hard_link(env!("CARGO_BIN_EXE_otm"), &binary).is_err() {
        std::fs::copy(env!("CARGO_BIN_EXE_otm"), &binary).unwrap();
    }
    let out = Command::new(&binary)
        .current_dir(dir.path())
        .env_remove("OTM_DATA_DIR")
        .args([
            "server",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--egress-listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a data directory beside the binary was accepted"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("contains the data directory") && err.contains("--data-dir"),
        "{err}"
    );
    assert!(
        !dir.path().join("otm-data").exists(),
        "nothing is created before refusing"
    );
}

#[test]
fn the_sandbox_init_lets_the_agent_write_only_its_own_directories() {
    // What the agent sandbox's process 1 applies to itself (Landlock) holds for whatever the
    // agent starts: run both forms of it on the host, outside any other sandbox layer, so the
    // file rules alone decide. Not below /tmp, which the rules keep writable: beside the
    // binary, or in /var/tmp when the checkout itself is below /tmp.
    let target = std::path::Path::new(env!("CARGO_BIN_EXE_otm"))
        .parent()
        .unwrap()
        .to_path_buf();
    let base = if target.starts_with("/tmp") {
        std::path::PathBuf::from("/var/tmp")
    } else {
        target.clone()
    };
    let dir = tempfile::tempdir_in(&base).unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::write(dir.path().join("secret"), "host file").unwrap();
    let script = "echo kept > state/ok && cat secret && \
                  { echo x > outside && echo WROTE-OUTSIDE; true; } && \
                  { echo x >> secret && echo APPENDED; true; } && \
                  { mv state/ok moved && echo MOVED-OUT; true; } && \
                  { rm secret && echo REMOVED; true; }";
    let small = target.join("otm-sandbox-init");
    let mut forms: Vec<Command> = vec![otm()];
    forms[0].arg("sandbox-init");
    if small.is_file() {
        forms.push(Command::new(&small));
    }
    for mut init in forms {
        let out = init
            .arg("--rw")
            .arg(&state)
            .args(["--", "/bin/sh", "-c", script])
            .current_dir(dir.path())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stdout}{stderr}");
        if stderr.contains("has no Landlock") {
            println!("skipped: this kernel has no Landlock");
            return;
        }
        assert!(stdout.contains("host file"), "reads go on: {stdout}");
        for bad in ["WROTE-OUTSIDE", "APPENDED", "MOVED-OUT", "REMOVED"] {
            assert!(!stdout.contains(bad), "{bad}: {stdout}{stderr}");
        }
        assert_eq!(std::fs::read_to_string(state.join("ok")).unwrap(), "kept\n");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("secret")).unwrap(),
            "host file"
        );
        assert!(!dir.path().join("outside").exists());
        std::fs::remove_file(state.join("ok")).unwrap();
    }
}

/// The attack on the listeners, on the real binary at a 1,024-descriptor limit: 2,000 idle
/// connections to the admin and egress listeners leave the public one answering at once.
#[test]
fn idle_connections_cannot_starve_the_public_listener_at_a_low_descriptor_limit() {
    use std::net::TcpStream;
    let dir = common::tempdir();
    let (public, admin, egress) = (
        common::free_port(),
        common::free_port(),
        common::free_port(),
    );
    let mut server = Command::new("/bin/sh")
        .arg("-c")
        .arg("ulimit -n 1024 && exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_otm"))
        .args(["server", "--sandbox", "none", "--data-dir"])
        .arg(dir.path().join("d"))
        .args(["--listen", &format!("127.0.0.1:{public}")])
        .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
        .args(["--egress-listen", &format!("127.0.0.1:{egress}")])
        .env("RUST_LOG", "error")
        .env_remove("OTM_ADMIN_TOKEN")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let http = |port: u16, request: &str| -> Option<String> {
        use std::io::{Read, Write};
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
        s.write_all(request.as_bytes()).ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    };
    let health = "GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";
    let mut up = false;
    for _ in 0..200 {
        if http(public, health).is_some_and(|r| r.starts_with("HTTP/1.1 200")) {
            up = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(up, "the server did not start");
    let mut idle = Vec::new();
    for i in 0..2000 {
        let port = if i % 2 == 0 { admin } else { egress };
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        if let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            idle.push(s);
        }
    }
    // Let the server take (and close) what is over its caps.
    std::thread::sleep(Duration::from_millis(500));
    for n in 0..20 {
        let body = format!("{{\"update_id\":{n}}}");
        let webhook = format!(
            "POST /tg/nobody HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let answer = http(public, &webhook);
        assert!(
            answer
                .as_deref()
                .is_some_and(|r| r.starts_with("HTTP/1.1 404")),
            "webhook {n} was not answered within a second while {} idle connections were held: {answer:?}",
            idle.len()
        );
    }
    drop(idle);
    let _ = server.kill();
    let _ = server.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_come_from_files_and_stdin_and_owners_are_allowed_by_flag() {
    let h = Harness::start().await;
    let admin_url = format!("http://{}", h.server().admin_addr);
    let files = common::tempdir();
    let token_file = files.path().join("admin.token");
    std::fs::write(
        &token_file,
        format!("{}\n", h.server().admin_token().expose()),
    )
    .unwrap();
    // No data dir: the admin token comes from the file only.
    let run = |args: &[&str], stdin: Option<&str>| {
        use std::io::Write;
        let mut c = otm();
        c.arg("--admin-url")
            .arg(&admin_url)
            .arg("--data-dir")
            .arg(files.path().join("no-such-dir"))
            .env("OTM_ADMIN_TOKEN_FILE", &token_file)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        c.stdin(if stdin.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        });
        let mut child = c.spawn().unwrap();
        if let Some(text) = stdin {
            let mut pipe = child.stdin.take().unwrap();
            pipe.write_all(text.as_bytes()).unwrap();
        }
        let out = child.wait_with_output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let get = |id: &str| {
        let (code, out, err) = run(&["-o", "json", "tenant", "get", id], None);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };

    // The bot token from a file, owners by flag.
    let bot_file = files.path().join("bot.token");
    std::fs::write(&bot_file, "8101:FILEbot\n").unwrap();
    h.tg.add_bot("8101:FILEbot");
    let (code, out, err) = run(
        &[
            "tenant",
            "create",
            "fil",
            "--bot-token-file",
            bot_file.to_str().unwrap(),
            "--allow",
            "987654321",
            "--allow",
            "123,456",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains("FILEbot"), "{out}");
    assert!(
        h.tg.webhook("8101:FILEbot").is_some(),
        "the webhook was registered with the file's token"
    );
    let t = get("fil");
    assert_eq!(
        t["allowed_users"],
        serde_json::json!(["987654321", "123", "456"]),
        "{t}"
    );
    assert_eq!(t["dm_policy"], "allowlist", "{t}");

    // The bot token piped on stdin.
    h.tg.add_bot("8102:PIPEbot");
    let (code, _, err) = run(&["tenant", "create", "pip"], Some("8102:PIPEbot\n"));
    assert_eq!(code, 0, "{err}");
    assert!(
        h.tg.webhook("8102:PIPEbot").is_some(),
        "the webhook was registered with the piped token"
    );
    let t = get("pip");
    assert_eq!(t["allowed_users"], serde_json::json!([]), "{t}");
    assert_eq!(
        t["dm_policy"], "open",
        "a reference agent with no list set answers anyone, and the view says so: {t}"
    );

    // A closed, empty stdin creates a tenant without a bot; an empty token file is refused.
    let (code, _, err) = run(&["tenant", "create", "nobot"], None);
    assert_eq!(code, 0, "{err}");
    std::fs::write(&bot_file, "\n").unwrap();
    let (code, _, err) = run(
        &[
            "tenant",
            "create",
            "empty",
            "--bot-token-file",
            bot_file.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("empty"), "{err}");

    // Owners change with update; a wrong id is refused with a reason; `*` is anyone.
    let (code, _, err) = run(&["tenant", "update", "fil", "--allow", "not-a-user"], None);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("allowed_users"), "{err}");
    let (code, _, err) = run(&["tenant", "update", "pip", "--allow", "*"], None);
    assert_eq!(code, 0, "{err}");
    assert_eq!(get("pip")["dm_policy"], "open");
    let (code, _, err) = run(&["tenant", "update", "fil", "--allow", ""], None);
    assert_eq!(code, 0, "{err}");
    let t = get("fil");
    assert_eq!(t["allowed_users"], serde_json::json!([]), "{t}");
    assert_eq!(
        t["dm_policy"], "disabled",
        "an empty list set on purpose is nobody: {t}"
    );

    // Model budgets and a tenant's own model key: shown by `tenant get`, the key never.
    let key_file = files.path().join("model.key");
    std::fs::write(&key_file, "sk-FILE-model-key\n").unwrap();
    let (code, out, err) = run(
        &[
            "tenant",
            "update",
            "fil",
            "--model-requests-per-minute",
            "5",
            "--model-tokens-per-day",
            "1000",
            "--model-api-key-file",
            key_file.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains("sk-FILE-model-key"), "{out}");
    let t = get("fil");
    assert_eq!(t["model_budget"]["requests_per_minute"], 5, "{t}");
    assert_eq!(t["model_budget"]["tokens_per_day"], 1000, "{t}");
    assert_eq!(t["model_budget"]["tokens_today"], 0, "{t}");
    assert_eq!(t["has_model_api_key"], true, "{t}");
    assert!(!t.to_string().contains("sk-FILE-model-key"), "{t}");
    // The table says the same.
    let (code, table, err) = run(&["tenant", "get", "fil"], None);
    assert_eq!(code, 0, "{err}");
    let budget = table
        .lines()
        .find(|l| l.starts_with("model_budget"))
        .unwrap_or_else(|| panic!("a model_budget row in:\n{table}"));
    assert!(budget.contains(r#""requests_per_minute":5"#), "{budget}");
    assert!(budget.contains(r#""tokens_per_day":1000"#), "{budget}");
    assert!(!table.contains("sk-FILE-model-key"), "{table}");
    let (code, _, err) = run(
        &[
            "tenant",
            "update",
            "fil",
            "--model-requests-per-minute",
            "default",
            "--no-model-api-key",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let t = get("fil");
    assert_eq!(
        t["model_budget"]["requests_per_minute"],
        serde_json::Value::Null,
        "{t}"
    );
    assert_eq!(t["has_model_api_key"], false, "{t}");
    let (code, _, err) = run(
        &["tenant", "update", "fil", "--model-tokens-per-day", "lots"],
        None,
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("model_tokens_per_day"), "{err}");

    // A wrong token in the file is refused as unauthorised.
    std::fs::write(&token_file, "not-the-token").unwrap();
    let (code, _, _) = run(&["tenant", "list"], None);
    assert_eq!(code, 5);
    h.stop().await;
}

#[test]
fn the_server_takes_its_admin_token_from_a_file() {
    let dir = common::tempdir();
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, "file-given-admin-token-5a1e\n").unwrap();
    let (public, admin, egress) = (
        common::free_port(),
        common::free_port(),
        common::free_port(),
    );
    let mut server = otm()
        .args(["server", "--sandbox", "none", "--data-dir"])
        .arg(dir.path().join("d"))
        .args(["--listen", &format!("127.0.0.1:{public}")])
        .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
        .args(["--egress-listen", &format!("127.0.0.1:{egress}")])
        .env("OTM_ADMIN_TOKEN_FILE", &token_file)
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let list = |token: &str| {
        otm()
            .args([
                "--admin-url",
                &format!("http://127.0.0.1:{admin}"),
                "--admin-token",
                token,
            ])
            .args(["tenant", "list"])
            .output()
            .unwrap()
            .status
            .code()
    };
    let mut up = None;
    for _ in 0..200 {
        up = list("file-given-admin-token-5a1e");
        if up == Some(0) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let wrong = list("some-other-token");
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(up, Some(0), "the file's token is the admin token");
    assert_eq!(wrong, Some(5));
    assert!(
        !dir.path().join("d/admin.token").exists(),
        "no token is generated when one is given"
    );

    // An empty or missing file stops the server with a reason.
    std::fs::write(&token_file, "").unwrap();
    let out = otm()
        .args(["server", "--sandbox", "none", "--data-dir"])
        .arg(dir.path().join("d"))
        .env("OTM_ADMIN_TOKEN_FILE", &token_file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("OTM_ADMIN_TOKEN_FILE"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Serves one fixed answer to every request, the way a server of another version (or something
/// that is not otm at all) might answer.
fn answer_always(body: &'static str) -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut buf = [0u8; 8192];
            let _ = stream.read(&mut buf);
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    format!("http://{addr}")
}

#[test]
fn an_answer_of_another_shape_fails_clearly_instead_of_printing_blanks() {
    let url = answer_always(r#"[{"name":"acme","state":"up"}]"#);
    let out = otm()
        .args(["tenant", "list", "--admin-url", &url, "--admin-token", "t"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("GET /v1/tenants") && err.contains("missing field `id`"),
        "{err}"
    );
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn completions_cover_every_shell_and_subcommand() {
    for shell in ["bash", "zsh", "fish"] {
        let out = otm().args(["completions", shell]).output().unwrap();
        assert!(
            out.status.success(),
            "{shell}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let script = String::from_utf8(out.stdout).unwrap();
        for word in ["tenant", "inbox", "snapshots", "memory", "admin-url"] {
            assert!(script.contains(word), "{shell} completion lacks {word}");
        }
    }
    let out = otm().args(["completions", "tcsh"]).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
}

#[test]
fn man_pages_come_from_the_cli_definition() {
    let out = otm().arg("man").output().unwrap();
    assert!(out.status.success());
    let page = String::from_utf8(out.stdout).unwrap();
    assert!(
        page.starts_with(".ie") || page.contains(".TH otm 1"),
        "{page}"
    );
    let dir = tempfile::tempdir().unwrap();
    let out = otm()
        .arg("man")
        .arg("--dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let create = std::fs::read_to_string(dir.path().join("otm-tenant-create.1")).unwrap();
    assert!(create.contains("memory"), "the page documents the flags");
    assert!(dir.path().join("otm-server.1").is_file());
    assert!(!dir.path().join("otm-sandbox-exec.1").exists());
}
