//! Serving HTTP on otm's listeners with bounds on what one client can hold.
//!
//! `axum::serve` has neither a header-read timeout nor a connection cap: a client that opens
//! connections and sends nothing holds a file descriptor each, for ever, and 1,100 of them on
//! the egress listener once made webhooks on the public one fail at a 1,024-descriptor limit.
//! Here every listener:
//! - holds at most [`ListenerLimits::max_connections`] connections, a share of the process's
//!   descriptor limit ([`ListenerLimits::for_descriptors`]); one over the cap is closed at once
//!   (and counted in `otm_listener_connections_refused_total{listener}`), so that no listener
//!   can use up the descriptors of another;
//! - closes a connection whose request head has not arrived within
//!   [`ListenerLimits::header_read_timeout`], idle keep-alive connections included;
//! - drains its connections on shutdown (each finishes the request it is in).
//!
//! What is bounded per request (body size, time, concurrency) stays with each router's own
//! middleware. [`raise_nofile`] lifts the process's descriptor limit to its hard limit at start.

use axum::Router;
use axum::extract::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// Pauses after a failed accept: 50 ms, doubling up to a second while accepts keep failing.
const ACCEPT_RETRY: otm_core::Backoff =
    otm_core::Backoff::new(Duration::from_millis(50), Duration::from_secs(1));

/// Bounds of one listener.
#[derive(Clone, Copy, Debug)]
pub struct ListenerLimits {
    /// Connections held at once.
    pub max_connections: usize,
    /// How long a connection may take to send a request head (and may sit idle between
    /// requests).
    pub header_read_timeout: Duration,
}

impl ListenerLimits {
    /// The caps of otm's listeners for a process that may hold `nofile` descriptors: together
    /// at most about half of them (the rest are for instances, the registry and clients), the
    /// public listener the largest share, so that no other listener can starve webhooks.
    pub fn for_descriptors(nofile: u64) -> Listeners {
        let share = |divisor: u64, most: usize| ListenerLimits {
            max_connections: ((nofile / divisor) as usize).clamp(8, most),
            header_read_timeout: Duration::from_secs(30),
        };
        Listeners {
            // Telegram's webhook deliveries: at most 100 connections per bot, many bots.
            public: share(4, 16384),
            // Operators, the CLI, dashboards, Prometheus.
            admin: share(16, 256),
            // Agents' Bot API and model calls, on the TCP listener and on the socket each.
            egress: share(8, 4096),
        }
    }
}

/// The caps of every listener of one server.
#[derive(Clone, Copy, Debug)]
pub struct Listeners {
    pub public: ListenerLimits,
    pub admin: ListenerLimits,
    pub egress: ListenerLimits,
}

/// Something that accepts connections: a TCP or a Unix listener.
pub trait Accept: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept(&mut self) -> impl Future<Output = std::io::Result<Self::Io>> + Send;
}

impl Accept for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept(&mut self) -> std::io::Result<Self::Io> {
        let (stream, _) = tokio::net::TcpListener::accept(self).await?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}

impl Accept for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept(&mut self) -> std::io::Result<Self::Io> {
        tokio::net::UnixListener::accept(self).await.map(|(s, _)| s)
    }
}

/// Called with the listener's name for every connection closed over the cap.
pub type OnRefused = Arc<dyn Fn(&'static str) + Send + Sync>;

/// Serves `router` on `listener` within `limits` until `shutdown`, then drains.
pub fn serve<L: Accept>(
    name: &'static str,
    mut listener: L,
    router: Router,
    limits: ListenerLimits,
    on_refused: Option<OnRefused>,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let slots = Arc::new(Semaphore::new(limits.max_connections));
        let connections = TaskTracker::new();
        let mut failures = 0;
        loop {
            let io = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(io) => {
                        failures = 0;
                        io
                    }
                    Err(e) => {
                        // Out of descriptors or a connection reset before it was taken: wait a
                        // little rather than spin (longer while it lasts), and go on.
                        tracing::warn!(listener = name, error = %e, "accept failed");
                        failures += 1;
                        tokio::time::sleep(ACCEPT_RETRY.delay(failures)).await;
                        continue;
                    }
                },
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                if let Some(f) = &on_refused {
                    f(name);
                }
                tracing::debug!(listener = name, "connection cap reached; connection closed");
                drop(io);
                continue;
            };
            let service = TowerToHyperService::new(
                router
                    .clone()
                    .map_request(|req: Request<Incoming>| req.map(axum::body::Body::new)),
            );
            let stop = shutdown.clone();
            connections.spawn(async move {
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(limits.header_read_timeout)
                    .serve_connection(TokioIo::new(io), service)
                    .with_upgrades();
                tokio::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => {}
                    _ = stop.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        let _ = conn.await;
                    }
                }
                drop(slot);
            });
        }
        connections.close();
        connections.wait().await;
    })
}

/// Raises the soft limit on open files to the hard limit: every connection and every instance's
/// files take descriptors, and the usual soft limit of 1,024 is reached long before memory.
/// Returns the limit in force.
pub fn raise_nofile() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                tracing::warn!(error = %e, soft, "cannot raise the open-file limit");
                soft
            }
        },
        Ok((soft, _)) => soft,
        Err(_) => 1024,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn start(limits: ListenerLimits) -> (std::net::SocketAddr, CancellationToken) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        serve(
            "test",
            listener,
            Router::new().route("/", get(|| async { "hello" })),
            limits,
            None,
            stop.clone(),
        );
        (addr, stop)
    }

    async fn get_root(addr: std::net::SocketAddr) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        out
    }

    #[test]
    fn the_listeners_together_hold_at_most_about_half_the_descriptors() {
        for nofile in [1024, 4096, 20_000, 1 << 20] {
            let l = ListenerLimits::for_descriptors(nofile);
            let all =
                l.public.max_connections + l.admin.max_connections + 2 * l.egress.max_connections;
            assert!(all as u64 <= nofile * 6 / 10, "{nofile}: {l:?}");
            assert!(l.public.max_connections > l.egress.max_connections, "{l:?}");
            assert!(l.egress.max_connections > l.admin.max_connections, "{l:?}");
        }
        assert_eq!(
            ListenerLimits::for_descriptors(1 << 20)
                .admin
                .max_connections,
            256
        );
    }

    #[tokio::test]
    async fn a_connection_that_sends_nothing_is_closed_after_the_header_timeout() {
        let (addr, _stop) = start(ListenerLimits {
            max_connections: 8,
            header_read_timeout: Duration::from_millis(300),
        })
        .await;
        let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 64];
        // Closed by the server: the read ends (EOF or reset) instead of waiting for ever.
        let read = tokio::time::timeout(Duration::from_secs(20), idle.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "the idle connection was not closed: {read:?}"
        );
        assert!(get_root(addr).await.ends_with("hello"));
    }

    #[tokio::test]
    async fn connections_over_the_cap_are_closed_and_the_listener_recovers() {
        let (addr, stop) = start(ListenerLimits {
            max_connections: 4,
            header_read_timeout: Duration::from_secs(30),
        })
        .await;
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        // The fifth is accepted and closed at once.
        let mut fifth = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(20), fifth.read(&mut buf)).await;
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
        drop(held);
        // Slots come back once the held connections are gone.
        let mut answered = false;
        for _ in 0..100 {
            if get_root(addr).await.ends_with("hello") {
                answered = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(answered, "the listener did not recover its slots");
        stop.cancel();
    }
}
