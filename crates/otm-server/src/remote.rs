//! What a router uses instead of an in-process orchestrator: an HTTP client for the
//! orchestrators' internal API, and a runtime that runs nothing.

use crate::wake::{WakePath, Waker, Woken};
use async_trait::async_trait;
use futures::stream::BoxStream;
use otm_core::instance::Endpoint;
use otm_core::{
    Error, InstanceId, InstanceSpec, Result, Runtime, RuntimeEvent, RuntimeInstance, Secret,
    TenantId,
};
use serde::{Deserialize, Serialize};
use std::time::Duration;

const BACKEND: &str = "orchestrator";

/// Pauses before trying the next orchestrator after one failed: 50 ms, 100 ms … up to a second,
/// jittered so that routers do not move over together.
const FAILOVER: otm_core::Backoff =
    otm_core::Backoff::new(Duration::from_millis(50), Duration::from_secs(1)).with_jitter(0.5);

/// The internal wake call's body.
#[derive(Debug, Serialize, Deserialize)]
pub struct WakeRequest {
    pub chat: Option<i64>,
}

/// The internal wake call's answer: the endpoint a router delivers to.
#[derive(Debug, Serialize, Deserialize)]
pub struct WakeAnswer {
    pub instance: InstanceId,
    pub address: String,
    pub shim_token: Secret,
    pub path: WakePath,
    pub total_ms: u64,
    pub phases: Vec<(String, u64)>,
}

impl From<&Woken> for WakeAnswer {
    fn from(w: &Woken) -> Self {
        WakeAnswer {
            instance: w.instance.clone(),
            address: w.endpoint.address.clone(),
            shim_token: w.endpoint.shim_token.clone(),
            path: w.path,
            total_ms: w.total_ms,
            phases: w.phases.clone(),
        }
    }
}

/// Calls the orchestrators, trying each in turn until one answers.
#[derive(Debug, Clone)]
pub struct OrchestratorClient {
    urls: Vec<String>,
    token: Secret,
    http: reqwest::Client,
    timeout: Duration,
}

impl OrchestratorClient {
    pub fn new(urls: Vec<String>, token: Secret, http: reqwest::Client, timeout: Duration) -> Self {
        OrchestratorClient {
            urls,
            token,
            http,
            timeout,
        }
    }

    /// Asks an orchestrator to wake a tenant; fails over to the next URL when one cannot be
    /// reached or dies mid-call.
    pub async fn wake_remote(&self, tenant: &TenantId, chat: Option<i64>) -> Result<Woken> {
        let mut last = Error::unavailable(BACKEND, "no orchestrator configured");
        // Start at a different orchestrator per tenant so load spreads.
        let start =
            tenant.as_str().bytes().map(usize::from).sum::<usize>() % self.urls.len().max(1);
        for i in 0..self.urls.len() {
            if i > 0 {
                tokio::time::sleep(FAILOVER.delay(i as u32)).await;
            }
            let base = &self.urls[(start + i) % self.urls.len()];
            let resp = self
                .http
                .post(format!("{base}/internal/v1/wake/{tenant}"))
                .bearer_auth(self.token.expose())
                .json(&WakeRequest { chat })
                .timeout(self.timeout)
                .send()
                .await;
            let resp = match resp {
                Ok(r) => r,
                Err(e) => {
                    let e = e.without_url();
                    tracing::warn!(%tenant, orchestrator = %base, error = %e, "orchestrator unreachable; trying the next");
                    last = Error::unavailable(BACKEND, e);
                    continue;
                }
            };
            let status = resp.status();
            if status.is_success() {
                let a: WakeAnswer = resp
                    .json()
                    .await
                    .map_err(|e| Error::generic(BACKEND, e.without_url()))?;
                return Ok(Woken {
                    endpoint: Endpoint {
                        instance: a.instance.clone(),
                        address: a.address,
                        shim_token: a.shim_token,
                        signature: None,
                    },
                    instance: a.instance,
                    path: a.path,
                    total_ms: a.total_ms,
                    phases: a.phases,
                });
            }
            let body = resp.bytes().await.unwrap_or_default();
            let message = otm_core::admin_api::ErrorBody::parse(&body)
                .map_or_else(|| "no message".to_owned(), |b| b.error.message);
            if status.as_u16() == 404 {
                return Err(Error::not_found(message));
            }
            last = Error::unavailable(BACKEND, format!("{status}: {message}"));
            if status.is_server_error() {
                continue;
            }
            return Err(last);
        }
        Err(last)
    }
}

/// The runtime of a router: it runs no instances; orchestrators do.
#[derive(Debug, Default)]
pub struct NoRuntime;

#[async_trait]
impl Runtime for NoRuntime {
    fn name(&self) -> &'static str {
        "none (router)"
    }
    fn isolation(&self) -> String {
        "n/a".into()
    }
    async fn create(&self, _: &InstanceSpec) -> Result<RuntimeInstance> {
        Err(Error::invalid(
            "the router role runs no instances; orchestrators do",
        ))
    }
    async fn list(&self) -> Result<Vec<RuntimeInstance>> {
        Ok(vec![])
    }
    async fn delete(&self, _: &InstanceId) -> Result<()> {
        Err(Error::invalid(
            "the router role runs no instances; orchestrators do",
        ))
    }
    fn events(&self) -> BoxStream<'static, RuntimeEvent> {
        Box::pin(futures::stream::pending())
    }
}

#[async_trait]
impl Waker for OrchestratorClient {
    async fn wake(&self, tenant: &TenantId, chat: Option<i64>) -> Result<Woken> {
        self.wake_remote(tenant, chat).await
    }
}
