//! The egress forwarder: a loopback TCP listener inside the instance's network namespace whose
//! every connection is passed on to otm's egress proxy, which the instance reaches only as a
//! Unix socket. Agents that need a TCP URL (OpenClaw's model base URL and Telegram `apiRoot`)
//! are pointed here.
//!
//! The egress is a directory of sockets, one per server on the machine (several orchestrators
//! may share one data directory, and a restarted server binds a new one): each connection goes
//! to the newest socket that answers.

use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Connections forwarded at once; more wait for a free one.
const MAX_CONNECTIONS: usize = 256;

/// Binds the forwarder on an ephemeral loopback port and serves it until `shutdown`; returns
/// its root URL, `http://127.0.0.1:<port>`.
pub async fn start(socket: PathBuf, shutdown: CancellationToken) -> std::io::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let root = format!("http://{}", listener.local_addr()?);
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        // Pauses after a failed accept: 50 ms, doubling up to a second while it lasts.
        const ACCEPT_RETRY: otm_core::Backoff = otm_core::Backoff::new(
            std::time::Duration::from_millis(50),
            std::time::Duration::from_secs(1),
        );
        let mut failures = 0;
        loop {
            let permit = tokio::select! {
                _ = shutdown.cancelled() => return,
                p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            };
            let (mut tcp, _) = tokio::select! {
                _ = shutdown.cancelled() => return,
                a = listener.accept() => match a {
                    Ok(a) => {
                        failures = 0;
                        a
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "egress forwarder accept failed");
                        failures += 1;
                        tokio::time::sleep(ACCEPT_RETRY.delay(failures)).await;
                        continue;
                    }
                },
            };
            // The agent's calls are small requests and answers: each write goes out at once,
            // never held back waiting for the agent to acknowledge the one before it.
            let _ = tcp.set_nodelay(true);
            let socket = socket.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match connect(&socket).await {
                    Ok(mut unix) => {
                        let _ = tokio::io::copy_bidirectional(&mut tcp, &mut unix).await;
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot reach otm's egress proxy"),
                }
            });
        }
    });
    Ok(root)
}

/// Connects to the egress socket, or to the newest answering `*.sock` in the egress directory.
async fn connect(path: &std::path::Path) -> std::io::Result<tokio::net::UnixStream> {
    let Ok(entries) = std::fs::read_dir(path) else {
        return tokio::net::UnixStream::connect(path).await;
    };
    let mut sockets: Vec<(std::time::SystemTime, PathBuf)> = entries
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.ends_with(".sock")))
        .map(|e| {
            (
                e.metadata()
                    .and_then(|m| m.modified())
                    .unwrap_or(std::time::UNIX_EPOCH),
                e.path(),
            )
        })
        .collect();
    sockets.sort_by_key(|s| std::cmp::Reverse(s.0));
    let mut last = std::io::Error::new(
        std::io::ErrorKind::NotFound,
        format!("no egress socket in {}", path.display()),
    );
    for (_, s) in sockets {
        match tokio::net::UnixStream::connect(&s).await {
            Ok(c) => return Ok(c),
            Err(e) => last = e,
        }
    }
    Err(last)
}
