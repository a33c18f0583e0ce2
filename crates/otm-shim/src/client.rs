//! The orchestrator's client for the shim's control API.
//!
//! `unix:` addresses are reached with a fresh HTTP/1 connection per call over the Unix socket
//! (cheap, and nothing to go stale when an instance is replaced); `http://` addresses (pods) with
//! a pooled HTTP client.

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use otm_core::shim_api::{
    BindRequest, BindResponse, DeliverResponse, ShimStatus, StopRequest, StopResponse,
};
use otm_core::{Error, Result, Secret};
use serde::de::DeserializeOwned;
use std::time::Duration;

const BACKEND: &str = "shim";

/// Largest answer read from a shim, except snapshots: an instance is hostile, and so may be
/// whatever answers on its control address.
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
    pub async fn status(&self) -> Result<ShimStatus> {
        json(
            self.call("GET", "/v1/status", None, Duration::from_secs(5))
                .await?,
        )
    }

    /// Replaces the state directory with an archive (before bind).
    pub async fn restore(&self, archive: Bytes) -> Result<()> {
        self.call("PUT", "/v1/state", Some(archive), Duration::from_secs(300))
            .await
            .map(drop)
    }

    /// Binds the instance to a tenant and waits until its agent is ready.
    pub async fn bind(&self, req: &BindRequest, timeout: Duration) -> Result<BindResponse> {
        let body = Bytes::from(serde_json::to_vec(req).map_err(|e| Error::generic(BACKEND, e))?);
        json(self.call("POST", "/v1/bind", Some(body), timeout).await?)
    }

    /// Delivers one update and returns the agent's answer.
    pub async fn deliver(&self, update: Bytes, timeout: Duration) -> Result<DeliverResponse> {
        json(
            self.call("POST", "/v1/deliver", Some(update), timeout)
                .await?,
        )
    }

    /// A consistent archive of the state directory (at most 1 GiB).
    pub async fn snapshot(&self) -> Result<Bytes> {
        self.snapshot_capped(1 << 30).await
    }

    /// A consistent archive of the state directory, refused past `max_bytes`.
    pub async fn snapshot_capped(&self, max_bytes: u64) -> Result<Bytes> {
        self.call_capped(
            "GET",
            "/v1/snapshot",
            None,
            Duration::from_secs(300),
            max_bytes,
        )
        .await
    }

    /// Stops the agent gracefully and waits for it.
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
        if let Some(socket) = self.address.strip_prefix("unix:") {
            let resp = self.unix_request(socket, "GET", &path, None).await?;
            let status = resp.status();
            if !status.is_success() {
                let body = resp
                    .into_body()
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                return Err(status_error(status.as_u16(), &body));
            }
            let body = resp
                .into_body()
                .into_data_stream()
                .map(|r| r.map_err(|e| Error::generic(BACKEND, e)));
            Ok(body.boxed())
        } else {
            let resp = self
                .http
                .get(format!("{}{path}", self.address))
                .bearer_auth(self.token.expose())
                .send()
                .await
                .map_err(unavailable)?;
            if !resp.status().is_success() {
                let status = resp.status().as_u16();
                let body = resp.bytes().await.unwrap_or_default();
                return Err(status_error(status, &body));
            }
            Ok(resp.bytes_stream().map(|r| r.map_err(unavailable)).boxed())
        }
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Bytes>,
        timeout: Duration,
    ) -> Result<Bytes> {
        self.call_capped(method, path, body, timeout, MAX_ANSWER)
            .await
    }

    async fn call_capped(
        &self,
        method: &str,
        path: &str,
        body: Option<Bytes>,
        timeout: Duration,
        limit: u64,
    ) -> Result<Bytes> {
        let too_big = || {
            Error::unavailable(
                BACKEND,
                format!("{method} {path}: the shim's answer is larger than {limit} bytes"),
            )
        };
        let fut = async {
            if let Some(socket) = self.address.strip_prefix("unix:") {
                let resp = self.unix_request(socket, method, path, body).await?;
                let status = resp.status().as_u16();
                let limited = http_body_util::Limited::new(resp.into_body(), limit as usize);
                let bytes = limited.collect().await.map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        too_big()
                    } else {
                        Error::unavailable(BACKEND, e)
                    }
                })?;
                Ok((status, bytes.to_bytes()))
            } else {
                let method = reqwest::Method::from_bytes(method.as_bytes())
                    .map_err(|e| Error::generic(BACKEND, e))?;
                let mut req = self
                    .http
                    .request(method, format!("{}{path}", self.address))
                    .bearer_auth(self.token.expose());
                if let Some(b) = body {
                    req = req.header("content-type", "application/json").body(b);
                }
                let mut resp = req.send().await.map_err(unavailable)?;
                let status = resp.status().as_u16();
                let mut buf = bytes::BytesMut::new();
                while let Some(chunk) = resp.chunk().await.map_err(unavailable)? {
                    if buf.len() as u64 + chunk.len() as u64 > limit {
                        return Err(too_big());
                    }
                    buf.extend_from_slice(&chunk);
                }
                Ok((status, buf.freeze()))
            }
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

    async fn unix_request(
        &self,
        socket: &str,
        method: &str,
        path: &str,
        body: Option<Bytes>,
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
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "shim")
            .header("authorization", format!("Bearer {}", self.token.expose()))
            .header("content-type", "application/json")
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| Error::generic(BACKEND, e))?;
        sender.send_request(req).await.map_err(unavailable_hyper)
    }
}

fn json<T: DeserializeOwned>(bytes: Bytes) -> Result<T> {
    serde_json::from_slice(&bytes).map_err(|e| Error::generic(BACKEND, e))
}

fn status_error(status: u16, body: &[u8]) -> Error {
    let message = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
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
