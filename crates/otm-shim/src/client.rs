//! The orchestrator's client for the shim's control API.
//!
//! `unix:` addresses are reached with a fresh HTTP/1 connection per call over the Unix socket
//! (cheap, and nothing to go stale when an instance is replaced); `http://` addresses (pods) with
//! a pooled HTTP client.

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::Request;
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use otm_core::shim_api::{
    BindRequest, BindResponse, DeliverResponse, ShimStatus, StopRequest, StopResponse,
};
use otm_core::{Error, Result, Secret};
use serde::de::DeserializeOwned;
use std::time::Duration;
use tokio_util::io::ReaderStream;

const BACKEND: &str = "shim";

/// Largest answer read whole from a shim (snapshots are streamed, with a cap of their own): an
/// instance is hostile, and so may be whatever answers on its control address.
const MAX_ANSWER: u64 = 1 << 20;

/// A client for one instance's shim.
#[derive(Clone, Debug)]
pub struct ShimClient {
    address: String,
    token: Secret,
    http: reqwest::Client,
}

impl ShimClient {
    /// A client for the shim at `address` (`unix:/path` or `http://host:port`).
    pub fn new(address: impl Into<String>, token: Secret) -> Self {
        ShimClient {
            address: address.into(),
            token,
            http: reqwest::Client::builder()
                .no_proxy()
                .build()
                .expect("HTTP client"),
        }
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

    /// Delivers one update and returns the agent's answer.
    #[tracing::instrument(name = "shim", skip_all, fields(call = "deliver"))]
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
        if let Some(socket) = self.address.strip_prefix("unix:") {
            let resp = self.unix_request(socket, method, path, body).await?;
            let status = resp.status().as_u16();
            let stream = resp
                .into_body()
                .into_data_stream()
                .map(|r| r.map_err(unavailable_hyper));
            Ok((status, stream.boxed()))
        } else {
            let method = reqwest::Method::from_bytes(method.as_bytes())
                .map_err(|e| Error::generic(BACKEND, e))?;
            let mut req = self
                .http
                .request(method, format!("{}{path}", self.address))
                .bearer_auth(self.token.expose());
            match body {
                Payload::Empty => {}
                Payload::Bytes(b) => req = req.header("content-type", "application/json").body(b),
                Payload::File(f) => {
                    req = req
                        .header("content-type", "application/zstd")
                        .body(reqwest::Body::wrap_stream(file_stream(f)));
                }
            }
            let resp = req.send().await.map_err(unavailable)?;
            let status = resp.status().as_u16();
            Ok((
                status,
                resp.bytes_stream().map(|r| r.map_err(unavailable)).boxed(),
            ))
        }
    }

    async fn unix_request(
        &self,
        socket: &str,
        method: &str,
        path: &str,
        body: Payload,
    ) -> Result<hyper::Response<hyper::body::Incoming>> {
        let stream = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|e| Error::unavailable(BACKEND, format!("cannot reach the shim: {e}")))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(unavailable_hyper)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let (content_type, body) = match body {
            Payload::Empty => (
                "application/json",
                Full::new(Bytes::new()).map_err(never).boxed_unsync(),
            ),
            Payload::Bytes(b) => (
                "application/json",
                Full::new(b).map_err(never).boxed_unsync(),
            ),
            Payload::File(f) => (
                "application/zstd",
                StreamBody::new(file_stream(f).map_ok(Frame::data)).boxed_unsync(),
            ),
        };
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "shim")
            .header("authorization", format!("Bearer {}", self.token.expose()))
            .header("content-type", content_type)
            .body(body)
            .map_err(|e| Error::generic(BACKEND, e))?;
        sender.send_request(req).await.map_err(unavailable_hyper)
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

fn never(n: std::convert::Infallible) -> std::io::Error {
    match n {}
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
    Error::unavailable(BACKEND, e.without_url())
}

fn unavailable_hyper(e: hyper::Error) -> Error {
    Error::unavailable(BACKEND, e)
}
