//! A hostile agent: a tenant on the `probe` profile runs each attack from inside its own
//! sandbox, with the agent's exact mounts, namespaces, uid and seccomp filter (the way an
//! OpenClaw agent's shell tool would, steered by whoever writes to it), and reports what
//! happened. Every attack must fail and leave the host, the server and a second tenant unharmed.

mod common;

use common::Harness;
use otm_testkit::text_update;
use reqwest::Method;
use serde_json::json;
use std::time::Duration;

const MALLORY: &str = "7001:MALLORYtoken";
const VICTIM: &str = "7002:VICTIMtoken";

struct Attacker<'a> {
    h: &'a Harness,
    secret: String,
    next: std::cell::Cell<i64>,
}

impl Attacker<'_> {
    /// Runs `command` with `sh -c` inside the attacker's sandbox; returns its exit status
    /// (`"0"`, `"1"`, `"timeout"`, …) and output.
    async fn sh(&self, command: &str) -> (String, String) {
        let id = self.next.get();
        self.next.set(id + 1);
        assert_eq!(
            self.h
                .post_update(
                    "mallory",
                    &self.secret,
                    &text_update(id, 66, &format!("/sh {command}"))
                )
                .await,
            200
        );
        let got = self
            .h
            .tg
            .wait_for_messages(MALLORY, id as usize, Duration::from_secs(60))
            .await;
        assert!(
            got.len() >= id as usize,
            "no answer to probe {id}: {command}"
        );
        let text = &got[id as usize - 1].text;
        let body = text.split_once(": ").map(|(_, b)| b).unwrap_or(text);
        let (first, rest) = body.split_once('\n').unwrap_or((body, ""));
        let status = first.strip_prefix("exit=").unwrap_or(first).to_owned();
        (status, rest.to_owned())
    }

    /// Asserts that `command` fails inside the sandbox.
    async fn fails(&self, what: &str, command: &str) -> String {
        let (status, out) = self.sh(command).await;
        assert_ne!(
            status, "0",
            "{what} succeeded from inside the sandbox: `{command}` said: {out}"
        );
        out
    }
}

/// A server with a victim tenant (awake, with state) and an attacker on the probe profile.
async fn start() -> (Harness, String, String) {
    let h = Harness::start_with(|s| s.allow_probe_profile = true).await;
    let (_, status) = h.api(Method::GET, "/status", None).await;
    assert_eq!(
        status["isolation"], "bubblewrap",
        "these checks need bubblewrap (apt-get install bubblewrap)"
    );
    let victim_secret = h.tenant("victim", VICTIM).await;
    assert_eq!(
        h.post_update(
            "victim",
            &victim_secret,
            &text_update(1, 5, "my secret diary")
        )
        .await,
        200
    );
    h.tg.wait_for_messages(VICTIM, 1, Duration::from_secs(30))
        .await;
    h.tg.add_bot(MALLORY);
    let (code, body) = h
        .api(
            Method::POST,
            "/tenants",
            Some(json!({"id": "mallory", "bot_token": MALLORY, "profile": "probe"})),
        )
        .await;
    assert_eq!(code, 201, "{body}");
    let secret = h.tg.webhook(MALLORY).unwrap().secret_token.unwrap();
    (h, secret, victim_secret)
}

impl<'a> Attacker<'a> {
    async fn new(h: &'a Harness, secret: String) -> Attacker<'a> {
        let a = Attacker {
            h,
            secret,
            next: std::cell::Cell::new(1),
        };
        let (status, out) = a.sh("id -u").await;
        assert_eq!(
            (status.as_str(), out.trim()),
            ("0", "1000"),
            "the probe agent answers, as uid 1000 in its sandbox"
        );
        a
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_dir_other_tenants_and_the_shim_are_out_of_reach() {
    let (h, secret, victim_secret) = start().await;
    let a = Attacker::new(&h, secret).await;
    let data = h.dir.path().join("d");
    let d = data.display();
    let victim_dir = {
        let inst = h.instances().await;
        let id = inst.iter().find(|i| i["tenant"] == "victim").unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        data.join("instances").join(id)
    };
    assert!(
        victim_dir.join("state/reference-agent.json").exists(),
        "the victim has state on the host"
    );

    a.fails("reading the admin token", &format!("cat {d}/admin.token"))
        .await;
    a.fails("reading the registry", &format!("cat {d}/otm.db"))
        .await;
    // The sandbox has the path of its own directories, on an empty skeleton: nothing else.
    let (_, listing) = a.sh(&format!("ls -a {d} {d}/instances")).await;
    for name in [
        "admin.token",
        "otm.db",
        "runtime",
        "state",
        "run",
        victim_dir.file_name().unwrap().to_str().unwrap(),
    ] {
        assert!(
            !listing.split_whitespace().any(|w| w == name),
            "{name} is visible in the sandbox: {listing}"
        );
    }
    a.fails("listing the runtime records", &format!("ls {d}/runtime"))
        .await;
    a.fails(
        "reading the victim's state",
        &format!("cat {}/state/reference-agent.json", victim_dir.display()),
    )
    .await;
    a.fails("reading the snapshots", &format!("ls {d}/state"))
        .await;
    a.fails("reading host secrets", "cat /etc/shadow").await;
    a.fails("listing /root", "ls /root/").await;
    a.fails("listing /home", "ls /home/").await;
    a.fails(
        "reading the host's process list",
        "ps -e -o args | grep -q '[o]tm server'",
    )
    .await;

    // The shim is not even visible: no process of the sandbox is it, no instance token anywhere.
    let (_, procs) = a.sh("cat /proc/[0-9]*/cmdline | tr '\\0' ' '").await;
    assert!(
        !procs.contains(" shim ") && !procs.contains("otm-shim") && !procs.contains("--instance"),
        "the shim is visible from the agent: {procs}"
    );
    a.fails(
        "finding the shim's token file",
        "find / -name shim.token 2>/dev/null | grep -q .",
    )
    .await;
    a.fails(
        "reading the shim's socket",
        "find / -name shim.sock 2>/dev/null | grep -q .",
    )
    .await;
    let (_, status) = a
        .sh("grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status")
        .await;
    assert!(status.contains("CapEff:\t0000000000000000"), "{status}");
    assert!(
        status.contains("NoNewPrivs:\t1") && status.contains("Seccomp:\t2"),
        "{status}"
    );
    // The agent started in the sandbox the shim made ahead of it, its launch read from a pipe.
    let (_, init) = a.sh("tr '\\0' ' ' < /proc/1/cmdline").await;
    assert!(init.contains("--wait-fd"), "process 1 is {init}");

    // The victim is fine and still answers.
    assert_eq!(
        h.post_update("victim", &victim_secret, &text_update(2, 5, "still there?"))
            .await,
        200
    );
    let got =
        h.tg.wait_for_messages(VICTIM, 2, Duration::from_secs(30))
            .await;
    assert_eq!(got[1].text, "#2: still there?");
    drop(a);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_network_but_the_egress_proxy() {
    let (h, secret, _) = start().await;
    let a = Attacker::new(&h, secret).await;
    let server = h.server();
    let victim_port = {
        let inst = h.instances().await;
        let id = inst.iter().find(|i| i["tenant"] == "victim").unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let dir = h.dir.path().join("d/instances").join(id);
        let pid = common::agent_pid(&dir).expect("the victim's agent runs");
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        let listen = environ
            .split(|b| *b == 0)
            .find_map(|v| {
                std::str::from_utf8(v)
                    .ok()?
                    .strip_prefix("OTM_AGENT_LISTEN=")
                    .map(str::to_owned)
            })
            .unwrap();
        listen.rsplit_once(':').unwrap().1.parse::<u16>().unwrap()
    };
    let connect = |port: u16| {
        format!("python3 -c \"import socket; socket.create_connection(('127.0.0.1', {port}), 2)\"")
    };
    for (what, port) in [
        ("the admin listener", server.admin_addr.port()),
        ("the egress listener", server.egress_addr.port()),
        ("the public listener", server.public_addr.port()),
        ("PostgreSQL", 5432),
        ("Redis", 6379),
        ("the victim's agent", victim_port),
    ] {
        a.fails(&format!("connecting to {what}"), &connect(port))
            .await;
    }
    a.fails(
        "reaching the cloud metadata address",
        "python3 -c \"import socket; socket.create_connection(('169.254.169.254', 80), 2)\"",
    )
    .await;
    let (_, tcp) = a.sh("cat /proc/net/tcp").await;
    let admin_hex = format!(":{:04X}", server.admin_addr.port());
    assert!(
        !tcp.contains(&admin_hex),
        "the host's listeners are listed inside: {tcp}"
    );
    a.fails(
        "opening a packet socket",
        "python3 -c \"import socket; socket.socket(socket.AF_PACKET, socket.SOCK_RAW)\"",
    )
    .await;
    a.fails(
        "opening a raw socket",
        "python3 -c \"import socket; socket.socket(socket.AF_INET, socket.SOCK_RAW, 1)\"",
    )
    .await;
    for sock in [
        "/run/postgresql/.s.PGSQL.5432",
        "/run/mysqld/mysqld.sock",
        "/var/run/docker.sock",
    ] {
        a.fails(
            &format!("connecting to the host's {sock}"),
            &format!(
                "python3 -c \"import socket; s=socket.socket(socket.AF_UNIX); s.connect('{sock}')\""
            ),
        )
        .await;
    }
    // What it may reach: the egress proxy, through the forwarder its shim serves; and that only
    // with its own surrogate.
    let (status, out) = a.sh("python3 -c \"import os,urllib.request; print(urllib.request.urlopen(os.environ['OTM_BOT_API_ROOT'] + '/bot' + os.environ['OTM_BOT_TOKEN'] + '/getMe').status)\"").await;
    assert_eq!(
        (status.as_str(), out.trim()),
        ("0", "200"),
        "the Bot API proxy answers the agent"
    );
    drop(a);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mounts_namespaces_and_terminals_are_refused() {
    let (h, secret, _) = start().await;
    let a = Attacker::new(&h, secret).await;
    a.fails("unmounting", "umount -l /usr").await;
    a.fails("remounting / writable", "mount -o remount,bind,rw /")
        .await;
    a.fails("mounting a tmpfs", "mount -t tmpfs x /tmp").await;
    a.fails("a user namespace", "unshare -r true").await;
    a.fails("a mount namespace", "unshare -m true").await;
    a.fails("a network namespace", "unshare -n true").await;
    a.fails("writing the system", "touch /usr/otm-was-here")
        .await;
    a.fails("writing /etc", "touch /etc/otm-was-here").await;
    a.fails("a controlling terminal", "exec 3</dev/tty").await;
    a.fails(
        "pushing keystrokes (TIOCSTI)",
        "python3 -c \"import fcntl, termios; fcntl.ioctl(2, termios.TIOCSTI, b'x')\"",
    )
    .await;
    a.fails(
        "ptrace",
        "python3 -c \"import ctypes; libc=ctypes.CDLL(None); assert libc.ptrace(0,0,0,0) == 0\"",
    )
    .await;
    a.fails(
        "another process's memory",
        "python3 -c \"open('/proc/1/mem','rb').read(1)\"",
    )
    .await;
    a.fails("setting the clock", "date -s '2001-01-01'").await;

    // The agent's own cgroup, which its shim freezes: the agent can neither see it nor thaw,
    // freeze or leave it, nor write any other cgroup file, nor mount a cgroup hierarchy.
    let instance = {
        let inst = h.instances().await;
        inst.iter().find(|i| i["tenant"] == "mallory").unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let agent_cgroup = common::instance_cgroup(&instance).and_then(|c| c.agent_dir());
    let mut dirs = vec![otm_shim::sandbox::AGENT_CGROUP_DIR.to_owned()];
    if let Some(d) = &agent_cgroup {
        // The agent runs in it, so a write that got through would matter.
        let pid = common::agent_pid(&h.dir.path().join("d/instances").join(&instance))
            .expect("the attacker's agent runs");
        let members = std::fs::read_to_string(d.join("cgroup.procs")).unwrap();
        assert!(
            members.lines().any(|l| l.trim() == pid.to_string()),
            "the agent ({pid}) runs in its cgroup: {members}"
        );
        dirs.push(d.display().to_string());
        dirs.push(d.parent().unwrap().display().to_string());
    }
    // Only values that thaw or move: a hole shows as a success, not as a frozen attacker.
    let writes: Vec<String> = dirs
        .iter()
        .flat_map(|d| {
            [
                format!("echo THAWED > {d}/freezer.state"),
                format!("echo 0 > {d}/cgroup.freeze"),
                format!("echo 0 > {d}/cgroup.procs"),
                format!("echo 1 > {d}/cgroup.kill"),
            ]
        })
        .collect();
    let try_all = writes
        .iter()
        .map(|w| format!("({w}) 2>/dev/null && echo \"{w}\" && exit 0"))
        .collect::<Vec<_>>()
        .join("; ");
    a.fails("writing a cgroup file", &format!("{try_all}; exit 1"))
        .await;
    a.fails(
        "finding a cgroup file",
        "find / -path /proc -prune -o \\( -name 'cgroup.*' -o -name 'freezer.*' \\) -print 2>/dev/null | grep .",
    )
    .await;
    a.fails("seeing a cgroup mount", "grep cgroup /proc/self/mountinfo")
        .await;
    a.fails(
        "holding a cgroup descriptor",
        "ls -l /proc/self/fd/ /proc/$PPID/fd/ | grep cgroup",
    )
    .await;
    a.fails(
        "mounting the freezer hierarchy",
        "mount -t cgroup -o freezer none /tmp",
    )
    .await;
    a.fails("mounting cgroup v2", "mount -t cgroup2 none /tmp")
        .await;
    if let Some(d) = &agent_cgroup {
        let state = otm_shim::freezer::AgentCgroup::open(d).unwrap();
        assert!(!state.is_frozen().unwrap(), "the agent still runs");
    }
    drop(a);
    h.stop().await;
}

/// The egress policy: `none` gives an agent no proxy at all; `proxy` gives it a CONNECT proxy
/// that refuses hosts off its allowlist and private, loopback and metadata addresses even when
/// listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_egress_proxy_reaches_only_allowlisted_public_hosts() {
    let (h, secret, _) = start().await;
    let a = Attacker::new(&h, secret).await;
    let (_, env) = a.sh("env | grep -ci proxy || true").await;
    assert_eq!(env.trim(), "0", "policy none: no proxy is offered");

    let (code, t) = h
        .api(
            Method::PATCH,
            "/tenants/mallory",
            Some(json!({"egress": "proxy", "egress_allow": ["example.com", "localhost"]})),
        )
        .await;
    assert_eq!(code, 200, "{t}");
    assert_eq!(
        (t["egress"].as_str(), t["egress_allow"].clone()),
        (Some("proxy"), json!(["example.com", "localhost"]))
    );
    let (code, bad) = h
        .api(
            Method::PATCH,
            "/tenants/mallory",
            Some(json!({"egress_allow": ["10.0.0.1"]})),
        )
        .await;
    assert_eq!(code, 400, "an address is not a host name: {bad}");
    // The policy applies from the next wake.
    h.api(Method::POST, "/tenants/mallory/stop", None).await;
    let a = Attacker {
        h: &h,
        secret: a.secret.clone(),
        next: std::cell::Cell::new(a.next.get()),
    };
    let (_, env) = a.sh("echo $HTTPS_PROXY | sed 's/:[^:@]*@/:***@/'").await;
    assert!(
        env.contains("@127.0.0.1:"),
        "policy proxy: the proxy is the shim's forwarder: {env}"
    );

    // Through the proxy even for loopback names (no NO_PROXY), as a hostile agent would try.
    let fetch = |url: &str| {
        format!(
            "env -u NO_PROXY -u no_proxy python3 -c \"import urllib.request; urllib.request.urlopen('{url}', timeout=5)\" 2>&1 | tail -1"
        )
    };
    for (what, url, needle) in [
        ("a host off the allowlist", "https://evil.example/", "403"),
        ("loopback, though allowlisted", "https://localhost/", "403"),
        ("a literal loopback address", "https://127.0.0.1/", "403"),
        ("the metadata address", "https://169.254.169.254/", "403"),
    ] {
        let (_, out) = a.sh(&fetch(url)).await;
        assert!(out.contains(needle), "{what}: {out}");
    }
    let text = h
        .http
        .get(format!("http://{}/metrics", h.server().admin_addr))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("outcome=\"connect_not_allowed\"")
            && text.contains("outcome=\"connect_private_address\""),
        "refusals are counted"
    );
    drop(a);
    h.stop().await;
}

/// An agent sandbox made ahead of its agent runs exactly the launch it is sent (program,
/// arguments, environment); bubblewrap and process 1 never hold the agent's environment, no
/// descriptor of the launch pipe reaches the agent, and a launch the sandbox does not show
/// does not fit it.
#[tokio::test]
async fn a_sandbox_made_ahead_runs_exactly_its_launch() {
    use otm_shim::sandbox::{AgentSandbox, SystemView};
    use std::path::PathBuf;
    let bwrap = otm_shim::sandbox::bwrap().expect("these checks need bubblewrap");
    let dir = tempfile::tempdir().unwrap();
    let at = |p: &str| dir.path().join(p);
    let writable = vec![at("state"), at("tmp"), at("home")];
    std::fs::create_dir_all(at("config")).unwrap();
    let sandbox = std::sync::Arc::new(AgentSandbox {
        bwrap,
        otm: PathBuf::from(env!("CARGO_BIN_EXE_otm")),
        view: SystemView {
            tmp_bytes: 1 << 20,
            ..Default::default()
        },
        cgroup: None,
    });
    let log = std::fs::File::create(at("agent.log")).unwrap();
    let made = sandbox
        .prestart(&at("state"), &writable, &[at("config")], log)
        .await
        .unwrap();
    let sh = std::path::Path::new("/usr/bin/sh");
    assert!(made.fits(sh, &at("state"), &writable, &[at("config/agent.json")]));
    assert!(
        !made.fits(sh, &at("state"), &writable, &[at("elsewhere.json")]),
        "a file outside what it shows"
    );
    assert!(!made.fits(&at("agent"), &at("state"), &writable, &[]));
    assert!(!made.fits(sh, &at("state"), &writable[..1], &[]));

    let env: std::collections::BTreeMap<String, String> = [
        ("SECRET".to_owned(), "s3cret-value".to_owned()),
        ("PATH".to_owned(), "/usr/bin:/bin".to_owned()),
    ]
    .into();
    let args = vec![
        "-c".to_owned(),
        "echo \"secret=$SECRET arg=$0\"; ls /proc/self/fd | tr '\\n' ' '; echo; pwd; \
         touch started; while [ ! -e go ]; do sleep 0.01; done"
            .to_owned(),
        "two words".to_owned(),
    ];
    let init_pid = made.init_pid();
    let cmdline = std::fs::read(format!("/proc/{init_pid}/cmdline")).unwrap();
    let mut spawned = made.launch(sh, &args, &env).unwrap();
    // While the agent runs (it waits for `go`), process 1 is there to look at.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !at("state/started").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent never started"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let environ = std::fs::read(format!("/proc/{init_pid}/environ")).unwrap();
    std::fs::write(at("state/go"), "").unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), spawned.child.wait())
        .await
        .expect("the agent ran and ended")
        .unwrap();
    let out = std::fs::read_to_string(at("agent.log")).unwrap();
    assert!(status.success(), "{status:?}: {out}");
    assert!(out.contains("secret=s3cret-value arg=two words"), "{out}");
    let fds: Vec<&str> = out
        .lines()
        .nth(1)
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(fds, ["0", "1", "2", "3"], "only its own descriptors: {out}");
    assert!(out.contains(&at("state").display().to_string()), "{out}");
    let contains =
        |hay: &[u8], needle: &str| hay.windows(needle.len()).any(|w| w == needle.as_bytes());
    assert!(
        contains(&cmdline, "--wait-fd"),
        "process 1 waited for its launch"
    );
    assert!(
        !contains(&environ, "s3cret-value"),
        "process 1's environment holds none of the agent's"
    );
}
