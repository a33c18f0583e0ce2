//! Live TLS: a throwaway certificate authority (the `openssl` command), a TLS-only `redis-server`
//! and a PostgreSQL cluster that takes `hostssl` connections only; the coordinator
//! (`rediss://`) and the registry (`sslmode=verify-full&sslrootcert=…`) run their conformance
//! suites through them, and a certificate from another authority is refused. Each test prints
//! "skipped: …" and passes when `openssl`, `redis-server` or PostgreSQL's `initdb` and `pg_ctl`
//! are missing, except under CI (`CI` set), where a missing tool fails the test.
//!
//! `rediss://` trusts the system's roots, which `SSL_CERT_FILE` replaces: the Redis test runs
//! its client in a child process of this test binary with that variable set.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Set in the child process that runs the Redis client: the `rediss://` URL to use.
const CHILD_URL_VAR: &str = "OTM_TLS_LIVE_REDIS_URL";

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Says why a test cannot run: a skip on a developer's machine, a failure under CI, which
/// installs every tool these tests need.
fn skip(why: &str) {
    assert!(std::env::var_os("CI").is_none(), "{why} (CI installs it)");
    println!("skipped: {why}");
}

fn run(command: &mut Command) {
    let out = command.output().expect("start a helper program");
    assert!(
        out.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A certificate authority and a server certificate it issued for 127.0.0.1 and localhost.
struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

/// Makes a CA named `name` in `dir` and, unless `ca_only`, a server certificate it signs.
fn make_pki(dir: &Path, name: &str) -> Pki {
    let p = |f: &str| dir.join(format!("{name}-{f}"));
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run(Command::new("openssl")
        .args(["req", "-x509", "-days", "2", "-subj"])
        .arg(format!("/CN=otm test {name}"))
        .args(ec)
        .args(["-addext", "basicConstraints=critical,CA:TRUE"])
        .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
        .arg("-keyout")
        .arg(p("ca.key"))
        .arg("-out")
        .arg(p("ca.crt")));
    run(Command::new("openssl")
        .args(["req", "-subj", "/CN=127.0.0.1"])
        .args(ec)
        .arg("-keyout")
        .arg(p("server.key"))
        .arg("-out")
        .arg(p("server.csr")));
    std::fs::write(
        p("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
         keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "2", "-CAcreateserial"])
        .arg("-in")
        .arg(p("server.csr"))
        .arg("-CA")
        .arg(p("ca.crt"))
        .arg("-CAkey")
        .arg(p("ca.key"))
        .arg("-extfile")
        .arg(p("ext.cnf"))
        .arg("-out")
        .arg(p("server.crt")));
    Pki {
        ca: p("ca.crt"),
        cert: p("server.crt"),
        key: p("server.key"),
    }
}

/// Waits until `port` on loopback accepts connections.
fn wait_for_port(port: u16, what: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on {port}: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[cfg(feature = "redis")]
#[test]
fn redis_over_verified_tls() {
    if let Ok(url) = std::env::var(CHILD_URL_VAR) {
        // The child: SSL_CERT_FILE names the throwaway CA.
        return redis_child(&url);
    }
    if !have("openssl") || !have("redis-server") {
        skip("redis_over_verified_tls: needs openssl and redis-server");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path(), "right");
    let other = make_pki(dir.path(), "other");
    let port = free_port();
    let log = dir.path().join("redis.log");
    let _redis = Killed(
        Command::new("redis-server")
            .args(["--port", "0", "--save", "", "--appendonly", "no"])
            .args(["--bind", "127.0.0.1", "--tls-port", &port.to_string()])
            .arg("--tls-cert-file")
            .arg(&pki.cert)
            .arg("--tls-key-file")
            .arg(&pki.key)
            .arg("--tls-ca-cert-file")
            .arg(&pki.ca)
            .args(["--tls-auth-clients", "no", "--requirepass", "x"])
            .arg("--logfile")
            .arg(&log)
            .arg("--dir")
            .arg(dir.path())
            .spawn()
            .expect("start redis-server"),
    );
    wait_for_port(port, "redis-server", &log);
    let url = format!("rediss://:x@127.0.0.1:{port}/");
    let child = |ca: &Path| {
        Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "redis_over_verified_tls", "--nocapture"])
            .env(CHILD_URL_VAR, &url)
            .env("SSL_CERT_FILE", ca)
            .env_remove("SSL_CERT_DIR")
            .output()
            .unwrap()
    };
    let out = child(&pki.ca);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("coordinator ok"),
        "the coordinator over TLS: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = child(&other.ca);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("refused:") && !text.contains("coordinator ok"),
        "a certificate of another authority was accepted: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[cfg(feature = "redis")]
fn redis_child(url: &str) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        match otm_store::RedisCoordinator::connect(url).await {
            Ok(c) => {
                let c = c
                    .with_prefix(&format!("otm-tls-{}:", otm_core::id::random_hex(6)))
                    .await
                    .expect("set the key prefix");
                otm_store::conformance::coordinator_suite(Arc::new(c)).await;
                println!("coordinator ok");
            }
            Err(e) => {
                assert!(
                    !format!("{e}").contains(":x@"),
                    "the error shows the password: {e}"
                );
                println!("refused: {e}");
            }
        }
    });
}

/// PostgreSQL's programs, from the newest installed version.
fn postgres_bin() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| Some(e.ok()?.path().join("bin")))
        .filter(|b| b.join("initdb").is_file() && b.join("pg_ctl").is_file())
        .collect();
    dirs.sort();
    dirs.pop()
}

/// A PostgreSQL cluster in a temporary directory, stopped on drop.
struct Cluster {
    bin: PathBuf,
    data: PathBuf,
    user: Option<&'static str>,
}

impl Cluster {
    fn command(&self, program: &str) -> Command {
        let program = self.bin.join(program);
        match self.user {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(program);
                c
            }
            None => Command::new(program),
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "stop"])
            .output();
    }
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread")]
async fn postgres_over_verified_tls() {
    let Some(bin) = postgres_bin().filter(|_| have("openssl")) else {
        skip(
            "postgres_over_verified_tls: needs openssl and /usr/lib/postgresql/*/bin/initdb, pg_ctl",
        );
        return;
    };
    // PostgreSQL refuses to run as root: the cluster belongs to another user then.
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    let user = if !root {
        None
    } else if Command::new("id")
        .arg("postgres")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        Some("postgres")
    } else {
        Some("nobody")
    };
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path(), "right");
    let other = make_pki(dir.path(), "other");
    if let Some(user) = user {
        run(Command::new("chown").args(["-R", user]).arg(dir.path()));
    }
    let cluster = Cluster {
        bin,
        data: dir.path().join("pg"),
        user,
    };
    run(cluster
        .command("initdb")
        .args(["-A", "trust", "-U", "otm", "-N", "-D"])
        .arg(&cluster.data));
    let port = free_port();
    let conf = format!(
        "listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\n\
         ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\nfsync = off\n",
        dir.path().display(),
        pki.cert.display(),
        pki.key.display()
    );
    let append = |file: &str, text: &str, replace: bool| {
        let path = cluster.data.join(file);
        let mut all = if replace {
            String::new()
        } else {
            std::fs::read_to_string(&path).unwrap()
        };
        all.push_str(text);
        std::fs::write(&path, all).unwrap();
    };
    append("postgresql.conf", &conf, false);
    // TLS or nothing over TCP.
    append(
        "pg_hba.conf",
        "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
        true,
    );
    let log = dir.path().join("pg.log");
    run(cluster
        .command("pg_ctl")
        .arg("-D")
        .arg(&cluster.data)
        .arg("-l")
        .arg(&log)
        .args(["-w", "start"]));
    wait_for_port(port, "postgres", &log);

    let url = |mode: &str, ca: &Path| {
        format!(
            "postgres://otm@127.0.0.1:{port}/postgres?sslmode={mode}&sslrootcert={}",
            ca.display()
        )
    };
    let registry = otm_store::PostgresRegistry::connect(&url("verify-full", &pki.ca))
        .await
        .expect("the registry connects with sslmode=verify-full");
    otm_store::conformance::registry_suite(Arc::new(registry)).await;
    // Without TLS the server says no: hostssl is all there is.
    let plain = otm_store::PostgresRegistry::connect(&format!(
        "postgres://otm@127.0.0.1:{port}/postgres?sslmode=disable"
    ))
    .await;
    assert!(plain.is_err(), "a connection without TLS was accepted");
    // Another authority's root does not verify this server.
    for mode in ["verify-ca", "verify-full"] {
        let e = otm_store::PostgresRegistry::connect(&url(mode, &other.ca))
            .await
            .err()
            .unwrap_or_else(|| panic!("{mode} accepted a certificate of another authority"));
        assert!(
            !e.to_string().is_empty(),
            "{mode}: the refusal says nothing"
        );
    }
    drop(cluster);
}
