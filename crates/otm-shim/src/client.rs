//! The orchestrator's client for the shim's control API.
//!
//! Clients are cheap to make: the HTTP clients behind them are shared by the whole process, one
//! for `http://` addresses (pods) and one per Unix socket for `unix:` addresses (kept while the
//! socket exists, however many there are), each with its pool of kept-alive connections. None of them trusts any TLS root: shims answer plain HTTP, so
//! no system certificate store is read to make one.

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use otm_core::shim_api::{
    BindRequest, BindResponse, DeliverResponse, FreezeResponse, ShimStatus, StopRequest,
    StopResponse,
};
use otm_core::{Error, Result, Secret};
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;
use tokio_util::io::ReaderStream;

const BACKEND: &str = "shim";

/// Largest answer read whole from a shim (snapshots are streamed, with a cap of their own): an
/// instance is hostile, and so may be whatever answers on its control address.
const MAX_ANSWER: u64 = 1 << 20;

/// How long a kept-alive connection to a shim may sit unused.
const POOL_IDLE: Duration = Duration::from_secs(30);

/// How long a kept-alive connection to a shim on a Unix socket may sit unused: connecting to a
/// local socket costs little, and a client kept for every awake instance must not hold a file
/// descriptor for each one long after its last call.
const UNIX_POOL_IDLE: Duration = Duration::from_secs(2);

/// Most Unix-socket clients kept at once: a bound far above any one machine's instances. Past
/// it, the least recently used half goes.
const MAX_SOCKET_CLIENTS: usize = 1 << 16;
/// The clients of sockets that are gone (instances come and go, each with a socket of its own)
/// are dropped whenever the map has doubled since the last such pruning, and at this size at
/// the least.
const PRUNE_SOCKET_CLIENTS_AT: usize = 256;

/// A client for one instance's shim.
#[derive(Clone, Debug)]
pub struct ShimClient {
    /// The URL calls are made under: the address itself, or `http://shim` over a Unix socket.
    base: String,
    token: Secret,
    http: reqwest::Client,
}

/// A client builder for shims: no proxy, no TLS roots.
fn builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .no_proxy()
        .tls_certs_only(std::iter::empty())
        .pool_idle_timeout(POOL_IDLE)
}

/// The one client for `http://` shims.
fn tcp_client() -> reqwest::Client {
    static CLIENT: LazyLock<reqwest::Client> =
        LazyLock::new(|| builder().build().expect("HTTP client"));
    CLIENT.clone()
}

/// The clients of the shims on Unix sockets, one per socket, made once and kept while the socket
/// exists: a shim is called many times (a status, a bind, every delivery), and building a client
/// costs far more than a call.
#[derive(Default)]
struct SocketClients {
    clients: HashMap<String, (reqwest::Client, u64)>,
    /// Incremented by every lookup: the larger a client's stamp, the more recently it was used.
    clock: u64,
    /// The size at which the next pruning runs.
    prune_at: usize,
}

impl SocketClients {
    fn get(&mut self, socket: &str) -> Option<reqwest::Client> {
        self.clock += 1;
        let now = self.clock;
        self.clients.get_mut(socket).map(|(client, used)| {
            *used = now;
            client.clone()
        })
    }

    /// Keeps `client` for `socket` (or the one another caller kept meanwhile) and returns it.
    fn insert(&mut self, socket: &str, client: reqwest::Client) -> reqwest::Client {
        if let Some(kept) = self.get(socket) {
            return kept;
        }
        if self.clients.len() >= self.prune_at.max(PRUNE_SOCKET_CLIENTS_AT) {
            self.clients
                .retain(|path, _| std::path::Path::new(path).exists());
            if self.clients.len() >= MAX_SOCKET_CLIENTS {
                let mut stamps: Vec<u64> = self.clients.values().map(|(_, used)| *used).collect();
                let (_, median, _) = stamps.select_nth_unstable(self.clients.len() / 2);
                let median = *median;
                self.clients.retain(|_, (_, used)| *used > median);
            }
            self.prune_at = self.clients.len() * 2;
        }
        self.clients
            .insert(socket.to_owned(), (client.clone(), self.clock));
        client
    }
}

/// The client for the shim listening on `socket`, made once per socket.
fn unix_client(socket: &str) -> reqwest::Client {
    static CLIENTS: LazyLock<Mutex<SocketClients>> = LazyLock::new(Default::default);
    let lock = || CLIENTS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(c) = lock().get(socket) {
        return c;
    }
    // Built outside the lock: callers for other sockets do not wait for it.
    let client = builder()
        .pool_idle_timeout(UNIX_POOL_IDLE)
        .unix_socket(std::path::PathBuf::from(socket))
        .build()
        .expect("HTTP client");
    lock().insert(socket, client)
}

impl ShimClient {
    /// A client for the shim at `address` (`unix:/path` or `http://host:port`).
    pub fn new(address: impl Into<String>, token: Secret) -> Self {
        let address = address.into();
        let (base, http) = match address.strip_prefix("unix:") {
            Some(socket) => ("http://shim".to_owned(), unix_client(socket)),
            None => (address, tcp_client()),
        };
        ShimClient { base, token, http }
    }

    /// The shim's view of itself.
    #[tracing::instrument(name = "shim", skip_all, fields(call = "status"))]
    pub async fn status(&self) -> Result<ShimStatus> {
        json(
            self.call("GET", "/v1/status", None, Duration::from_secs(5))
                .await?,
        )
    }

    /// Replaces the state directory with the archive in `archive` (before bind), sent as a
    /// stream.
    #[tracing::instrument(name = "shim", skip_all, fields(call = "restore"))]
    pub async fn restore(&self, archive: tokio::fs::File) -> Result<()> {
        let body = Payload::File(archive);
        self.call_payload(
            "PUT",
            "/v1/state",
            body,
            Duration::from_secs(300),
            MAX_ANSWER,
        )
        .await
        .map(drop)
    }

    /// Binds the instance to a tenant and waits until its agent is ready.
    #[tracing::instrument(name = "shim", skip_all, fields(call = "bind"))]
    pub async fn bind(&self, req: &BindRequest, timeout: Duration) -> Result<BindResponse> {
        let body = Bytes::from(serde_json::to_vec(req).map_err(|e| Error::generic(BACKEND, e))?);
        json(self.call("POST", "/v1/bind", Some(body), timeout).await?)
    }

    /// Delivers one update and returns the agent's answer. (Its span is at debug level: one per
    /// delivery, and a formatted record each when enabled.)
    #[tracing::instrument(name = "shim", level = "debug", skip_all, fields(call = "deliver"))]
    pub async fn deliver(&self, update: Bytes, timeout: Duration) -> Result<DeliverResponse> {
        json(
            self.call("POST", "/v1/deliver", Some(update), timeout)
                .await?,
        )
    }

    /// Streams a consistent archive of the state directory into `out`, refused (with an error
    /// and part of it written) past `max_bytes`, or when the transfer breaks off. Returns its
    /// size. What lands in `out` comes from the instance: check it before trusting it.
    #[tracing::instrument(name = "shim", skip_all, fields(call = "snapshot"))]
    pub async fn snapshot(
        &self,
        out: &mut (impl tokio::io::AsyncWrite + Unpin),
        max_bytes: u64,
    ) -> Result<u64> {
        use tokio::io::AsyncWriteExt;
        let (method, path, timeout) = ("GET", "/v1/snapshot", Duration::from_secs(300));
        let fut = async {
            let (status, mut body) = self.open(method, path, Payload::Empty).await?;
            if !(200..300).contains(&status) {
                let bytes = collect(body, MAX_ANSWER, method, path).await?;
                return Err(status_error(status, &bytes));
            }
            let mut size: u64 = 0;
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| {
                    Error::unavailable(
                        BACKEND,
                        format!("the snapshot broke off after {size} bytes: {e}"),
                    )
                })?;
                size += chunk.len() as u64;
                if size > max_bytes {
                    return Err(Error::unavailable(
                        BACKEND,
                        format!("the shim's snapshot is larger than {max_bytes} bytes"),
                    ));
                }
                out.write_all(&chunk).await.map_err(|e| {
                    Error::generic(BACKEND, format!("cannot write the snapshot down: {e}"))
                })?;
            }
            out.flush().await.map_err(|e| {
                Error::generic(BACKEND, format!("cannot write the snapshot down: {e}"))
            })?;
            Ok(size)
        };
        tokio::time::timeout(timeout, fut).await.map_err(|_| {
            Error::unavailable(
                BACKEND,
                format!("{method} {path} took longer than {} s", timeout.as_secs()),
            )
        })?
    }

    /// Stops the agent gracefully and waits for it.
    #[tracing::instrument(name = "shim", skip_all, fields(call = "stop"))]
    pub async fn stop(&self, req: &StopRequest, timeout: Duration) -> Result<StopResponse> {
        let body = Bytes::from(serde_json::to_vec(req).map_err(|e| Error::generic(BACKEND, e))?);
        json(self.call("POST", "/v1/stop", Some(body), timeout).await?)
    }

    /// Freezes the agent in place (its process tree stopped, its memory kept).
    #[tracing::instrument(name = "shim", skip_all, fields(call = "freeze"))]
    pub async fn freeze(&self) -> Result<FreezeResponse> {
        json(
            self.call("POST", "/v1/freeze", None, Duration::from_secs(10))
                .await?,
        )
    }

    /// Thaws a frozen agent.
    #[tracing::instrument(name = "shim", skip_all, fields(call = "thaw"))]
    pub async fn thaw(&self) -> Result<FreezeResponse> {
        json(
            self.call("POST", "/v1/thaw", None, Duration::from_secs(10))
                .await?,
        )
    }

    /// The agent's output: the last `tail` lines, then, with `follow`, whatever it writes next.
    pub async fn logs(
        &self,
        tail: usize,
        follow: bool,
    ) -> Result<BoxStream<'static, Result<Bytes>>> {
        let path = format!("/v1/logs?tail={tail}&follow={follow}");
        let (status, body) = self.open("GET", &path, Payload::Empty).await?;
        if !(200..300).contains(&status) {
            let bytes = collect(body, MAX_ANSWER, "GET", &path)
                .await
                .unwrap_or_default();
            return Err(status_error(status, &bytes));
        }
        Ok(body)
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Bytes>,
        timeout: Duration,
    ) -> Result<Bytes> {
        let body = body.map_or(Payload::Empty, Payload::Bytes);
        self.call_payload(method, path, body, timeout, MAX_ANSWER)
            .await
    }

    /// One call whose answer is read whole, refused past `limit` bytes.
    async fn call_payload(
        &self,
        method: &str,
        path: &str,
        body: Payload,
        timeout: Duration,
        limit: u64,
    ) -> Result<Bytes> {
        let fut = async {
            let (status, answer) = self.open(method, path, body).await?;
            Ok((status, collect(answer, limit, method, path).await?))
        };
        let (status, bytes) = tokio::time::timeout(timeout, fut).await.map_err(|_| {
            Error::unavailable(
                BACKEND,
                format!("{method} {path} took longer than {} s", timeout.as_secs()),
            )
        })??;
        if (200..300).contains(&status) {
            Ok(bytes)
        } else {
            Err(status_error(status, &bytes))
        }
    }

    /// Sends one call and returns the status and the answer's body as a stream.
    async fn open(
        &self,
        method: &str,
        path: &str,
        body: Payload,
    ) -> Result<(u16, BoxStream<'static, Result<Bytes>>)> {
        let method = reqwest::Method::from_bytes(method.as_bytes())
            .map_err(|e| Error::generic(BACKEND, e))?;
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(self.token.expose());
        req = match body {
            Payload::Empty => req.header("content-type", "application/json"),
            Payload::Bytes(b) => req.header("content-type", "application/json").body(b),
            Payload::File(f) => req
                .header("content-type", "application/zstd")
                .body(reqwest::Body::wrap_stream(file_stream(f))),
        };
        let resp = req.send().await.map_err(unavailable)?;
        let status = resp.status().as_u16();
        Ok((
            status,
            resp.bytes_stream().map(|r| r.map_err(unavailable)).boxed(),
        ))
    }
}

/// What a call sends.
enum Payload {
    Empty,
    Bytes(Bytes),
    /// Streamed from the file's current position to its end.
    File(tokio::fs::File),
}

fn file_stream(f: tokio::fs::File) -> ReaderStream<tokio::fs::File> {
    ReaderStream::with_capacity(f, crate::pipe::CHUNK)
}

/// Reads a whole answer, refusing more than `limit` bytes.
async fn collect(
    mut body: BoxStream<'static, Result<Bytes>>,
    limit: u64,
    method: &str,
    path: &str,
) -> Result<Bytes> {
    let mut buf = bytes::BytesMut::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk?;
        if buf.len() as u64 + chunk.len() as u64 > limit {
            return Err(Error::unavailable(
                BACKEND,
                format!("{method} {path}: the shim's answer is larger than {limit} bytes"),
            ));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

fn json<T: DeserializeOwned>(bytes: Bytes) -> Result<T> {
    serde_json::from_slice(&bytes).map_err(|e| Error::generic(BACKEND, e))
}

fn status_error(status: u16, body: &[u8]) -> Error {
    // A shim of an earlier version answers `{"error": {"code": 404, …}}`: its message still
    // counts.
    let message = otm_core::admin_api::ErrorBody::parse(body)
        .map(|b| b.error.message)
        .or_else(|| {
            serde_json::from_slice::<serde_json::Value>(body)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
        })
        .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(300).collect());
    match status {
        404 => Error::not_found(message),
        409 => Error::conflict(message),
        400 => Error::invalid(message),
        _ => Error::unavailable(BACKEND, format!("shim answered {status}: {message}")),
    }
}

fn unavailable(e: reqwest::Error) -> Error {
    let e = e.without_url();
    if e.is_connect() {
        // The chain says why (no such socket, refused): the top error alone does not.
        let mut message = String::from("cannot reach the shim");
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            message.push_str(": ");
            message.push_str(&s.to_string());
            source = s.source();
        }
        return Error::unavailable(BACKEND, message);
    }
    Error::unavailable(BACKEND, e)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With more live sockets than the pruning threshold, every socket keeps its client (no
    /// rebuild on the next call); the clients of sockets that are gone are dropped.
    #[test]
    fn socket_clients_are_kept_while_their_sockets_exist() {
        let dir = tempfile::tempdir().unwrap();
        let path = |i: usize| dir.path().join(format!("{i}.sock")).display().to_string();
        let client = builder().build().unwrap();
        let mut clients = SocketClients::default();
        let live = PRUNE_SOCKET_CLIENTS_AT * 3;
        for i in 0..live {
            std::fs::write(path(i), b"").unwrap();
            clients.insert(&path(i), client.clone());
        }
        assert!((0..live).all(|i| clients.get(&path(i)).is_some()));
        for i in 0..live / 2 {
            std::fs::remove_file(path(i)).unwrap();
        }
        for i in live..live * 3 {
            std::fs::write(path(i), b"").unwrap();
            clients.insert(&path(i), client.clone());
        }
        assert!((live / 2..live * 3).all(|i| clients.get(&path(i)).is_some()));
        assert!((0..live / 2).all(|i| clients.get(&path(i)).is_none()));
    }

    #[tokio::test]
    async fn a_missing_socket_is_an_unreachable_shim() {
        let dir = tempfile::tempdir().unwrap();
        let address = format!("unix:{}", dir.path().join("gone.sock").display());
        let err = ShimClient::new(address, Secret::new("t"))
            .status()
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::Unavailable { .. })
                && err.to_string().contains("cannot reach the shim"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn calls_over_a_unix_socket_carry_the_token_and_read_the_answer() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("shim.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let app = axum::Router::new().route(
            "/v1/status",
            axum::routing::get(|headers: axum::http::HeaderMap| async move {
                let authorized = headers
                    .get("authorization")
                    .is_some_and(|v| v == "Bearer sesame");
                axum::Json(serde_json::json!({
                    "instance": "i-1", "tenant": null, "profile": null,
                    "agent": if authorized { "running" } else { "refused" },
                    "agent_pid": null, "restarts": 0
                }))
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        let address = format!("unix:{}", socket.display());
        for _ in 0..3 {
            let status = ShimClient::new(address.clone(), Secret::new("sesame"))
                .status()
                .await
                .unwrap();
            assert_eq!(status.agent, "running");
        }
    }
}
