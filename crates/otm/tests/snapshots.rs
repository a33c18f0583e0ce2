//! Snapshots move as streams: from a shim through the server's spool into the state store, with
//! the server's memory bounded whatever the state's size, and anything short, broken or garbled
//! refused before it can become the head.

mod common;

use common::Harness;
use otm_core::{Secret, TenantId};
use otm_shim::{ShimClient, ShimConfig};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// Writes `len` incompressible bytes to `path`, a megabyte at a time.
fn noise_file(path: &Path, len: usize, seed: u64) {
    let mut x = seed | 1;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut chunk = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        for b in chunk.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let n = left.min(chunk.len());
        f.write_all(&chunk[..n]).unwrap();
        left -= n;
    }
    f.flush().unwrap();
}

/// A field of `/proc/self/status`, in KiB.
fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}

/// A real shim, in this process, over the instance directory `dir` (unbound: it snapshots the
/// whole state directory).
async fn start_shim(dir: &Path, shutdown: &CancellationToken) -> ShimClient {
    let socket = dir.join("shim.sock");
    let token = Secret::new("instance-token");
    let config = ShimConfig {
        instance: "inproc".into(),
        dir: dir.to_path_buf(),
        listen: format!("unix:{}", socket.display()),
        token: token.clone(),
        egress: None,
        agent_sandbox: None,
        term_grace: std::time::Duration::ZERO,
    };
    let stop = shutdown.clone();
    tokio::spawn(async move {
        otm_shim::run_shim(config, stop, CancellationToken::new())
            .await
            .unwrap()
    });
    let client = ShimClient::new(format!("unix:{}", socket.display()), token);
    for _ in 0..500 {
        if client.status().await.is_ok() {
            return client;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the in-process shim did not come up");
}

fn spool_files(h: &Harness) -> Vec<PathBuf> {
    std::fs::read_dir(h.dir.path().join("d/spool"))
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_state_streams_into_the_store_in_bounded_memory() {
    const STATE: usize = 64 << 20;
    let h = Harness::start().await;
    let app = h.server().app.clone();
    let instance = common::tempdir();
    std::fs::create_dir_all(instance.path().join("state/db")).unwrap();
    noise_file(&instance.path().join("state/db/blob"), STATE, 42);
    std::fs::write(instance.path().join("state/notes.txt"), b"remember me").unwrap();
    let shutdown = CancellationToken::new();
    let shim = start_shim(instance.path(), &shutdown).await;
    let tenant = TenantId::parse("bigstate").unwrap();

    // Peak RSS from here on: the transfer must not hold the archive.
    std::fs::write("/proc/self/clear_refs", "5").expect("reset the peak RSS");
    let before = status_kib("VmHWM:");
    let meta = otm_server::orchestrator::take_snapshot(&app, &tenant, &shim, "manual")
        .await
        .expect("the snapshot reaches the store");
    let grown = status_kib("VmHWM:").saturating_sub(before);
    println!(
        "snapshot of a {} MiB state: {} MiB archive, peak RSS grew by {} KiB",
        STATE >> 20,
        meta.size >> 20,
        grown
    );
    assert!(
        meta.size > STATE as u64,
        "incompressible state, archive of {} bytes",
        meta.size
    );
    assert!(
        grown < (STATE as u64 / 2) >> 10,
        "peak RSS grew by {grown} KiB while a {} MiB snapshot went through",
        STATE >> 20
    );
    assert_eq!(app.state().head(&tenant).await.unwrap(), Some(meta.clone()));
    assert!(spool_files(&h).is_empty(), "the spool file is gone");

    // And back: restored into a fresh instance, byte for byte.
    let fresh = common::tempdir();
    let shim2 = start_shim(fresh.path(), &shutdown).await;
    let into = h.dir.path().join("fetched.tar.zst");
    app.state().get(&tenant, &meta.id, &into).await.unwrap();
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let before = status_kib("VmHWM:");
    shim2
        .restore(tokio::fs::File::open(&into).await.unwrap())
        .await
        .expect("the instance takes the archive as a stream");
    let grown = status_kib("VmHWM:").saturating_sub(before);
    println!("restore of the same state: peak RSS grew by {grown} KiB");
    assert!(
        grown < (STATE as u64 / 2) >> 10,
        "peak RSS grew by {grown} KiB while a {} MiB archive was restored",
        STATE >> 20
    );
    assert_eq!(
        std::fs::read(fresh.path().join("state/notes.txt")).unwrap(),
        b"remember me"
    );
    let same = |a: &Path, b: &Path| {
        let (mut fa, mut fb) = (
            std::fs::File::open(a).unwrap(),
            std::fs::File::open(b).unwrap(),
        );
        let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
        loop {
            let na = std::io::Read::read(&mut fa, &mut ba).unwrap();
            let nb = std::io::Read::read_exact(&mut fb, &mut bb[..na]).map(|()| na);
            assert_eq!(nb.unwrap(), na);
            if na == 0 {
                return std::io::Read::read(&mut fb, &mut bb).unwrap() == 0;
            }
            if ba[..na] != bb[..na] {
                return false;
            }
        }
    };
    assert!(same(
        &instance.path().join("state/db/blob"),
        &fresh.path().join("state/db/blob")
    ));
    shutdown.cancel();
    h.stop().await;
}

/// Serves one canned answer, raw, to every connection on `socket`, then closes it.
fn fake_shim(socket: PathBuf, answer: Vec<u8>) -> tokio::task::JoinHandle<()> {
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = conn.write_all(&answer).await;
                let _ = conn.shutdown().await;
            });
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_broken_or_garbled_snapshots_never_become_the_head() {
    let h = Harness::start().await;
    let app = h.server().app.clone();
    let tenant = TenantId::parse("fragile").unwrap();

    // A good head first, from a real shim.
    let instance = common::tempdir();
    std::fs::create_dir_all(instance.path().join("state")).unwrap();
    noise_file(&instance.path().join("state/a-data"), 1 << 20, 7);
    let shutdown = CancellationToken::new();
    let real = start_shim(instance.path(), &shutdown).await;
    let good = otm_server::orchestrator::take_snapshot(&app, &tenant, &real, "manual")
        .await
        .unwrap();
    let mut archive = Vec::new();
    otm_shim::archive::pack(
        &instance.path().join("state"),
        &[],
        &otm_shim::archive::Caps::default(),
        &mut archive,
    )
    .unwrap();
    let half = &archive[..archive.len() / 2];

    let with_length = |body: &[u8], length: usize| {
        let mut a = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/zstd\r\ncontent-length: {length}\r\nconnection: close\r\n\r\n"
        )
        .into_bytes();
        a.extend_from_slice(body);
        a
    };
    let mut chunked_cut = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    chunked_cut.extend_from_slice(format!("{:x}\r\n", half.len()).as_bytes());
    chunked_cut.extend_from_slice(half);
    chunked_cut.extend_from_slice(b"\r\n"); // and no last chunk: the transfer breaks off
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "garbage",
            with_length(b"not an archive at all", 21),
            "was refused",
        ),
        (
            "an archive cut in half, sent whole",
            with_length(half, half.len()),
            "was refused",
        ),
        (
            "a chunked transfer that breaks off",
            chunked_cut,
            "broke off",
        ),
        (
            "fewer bytes than the announced length",
            with_length(half, archive.len()),
            "broke off",
        ),
    ];
    let fakes = common::tempdir();
    for (i, (what, answer, expect)) in cases.into_iter().enumerate() {
        let socket = fakes.path().join(format!("fake-{i}.sock"));
        let server = fake_shim(socket.clone(), answer);
        let fake = ShimClient::new(
            format!("unix:{}", socket.display()),
            Secret::new("instance-token"),
        );
        let err = otm_server::orchestrator::take_snapshot(&app, &tenant, &fake, "manual")
            .await
            .expect_err(what);
        assert!(err.to_string().contains(expect), "{what}: {err}");
        assert_eq!(
            app.state().head(&tenant).await.unwrap().map(|m| m.id),
            Some(good.id.clone()),
            "{what}: the head did not move"
        );
        assert_eq!(
            app.state().list(&tenant).await.unwrap().len(),
            1,
            "{what}: nothing was stored"
        );
        assert!(spool_files(&h).is_empty(), "{what}: the spool file is gone");
        server.abort();
    }

    // The cap counts while reading: a whole, valid archive over it is refused part-way.
    let socket = fakes.path().join("whole.sock");
    let server = fake_shim(socket.clone(), with_length(&archive, archive.len()));
    let fake = ShimClient::new(
        format!("unix:{}", socket.display()),
        Secret::new("instance-token"),
    );
    let mut sink = Vec::new();
    let err = fake.snapshot(&mut sink, 64 << 10).await.unwrap_err();
    assert!(err.to_string().contains("larger than 65536 bytes"), "{err}");
    assert!(sink.len() <= 64 << 10, "{} bytes written", sink.len());
    server.abort();

    // A real shim that fails to pack: before its first chunk, a clear error; after it, the
    // body is aborted, so the transfer breaks off instead of ending short.
    let deep = |root: &Path| {
        let mut p = root.join("z-deep");
        for _ in 0..70 {
            p.push("d");
        }
        std::fs::create_dir_all(p).unwrap();
    };
    let early = common::tempdir();
    std::fs::create_dir_all(early.path().join("state")).unwrap();
    deep(&early.path().join("state"));
    let shim = start_shim(early.path(), &shutdown).await;
    let err = otm_server::orchestrator::take_snapshot(&app, &tenant, &shim, "manual")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("nests deeper"), "{err}");
    deep(&instance.path().join("state"));
    let err = otm_server::orchestrator::take_snapshot(&app, &tenant, &real, "manual")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("broke off"), "{err}");
    assert_eq!(
        app.state().head(&tenant).await.unwrap().map(|m| m.id),
        Some(good.id.clone()),
        "a failed pack leaves the head alone"
    );
    assert_eq!(app.state().list(&tenant).await.unwrap().len(), 1);
    assert!(spool_files(&h).is_empty());
    shutdown.cancel();
    h.stop().await;
}
