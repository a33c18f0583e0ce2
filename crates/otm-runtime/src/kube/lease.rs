//! Leader election on a `coordination.k8s.io/v1` Lease, the way client-go's lease lock does it:
//! the holder renews `renewTime`; another candidate takes the Lease over only when it has seen no
//! change to it for `leaseDurationSeconds` by its own clock (so clock skew between machines does
//! not matter), and every write carries the `resourceVersion` it read, so of two candidates
//! exactly one wins (the API server answers 409 to the other).

use async_trait::async_trait;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use otm_core::{Error, LeaderElector, Result};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const BACKEND: &str = "kube lease";

/// How long a Lease stays with a holder that stopped renewing.
pub const LEASE_DURATION: Duration = Duration::from_secs(10);

/// One candidate for one Lease.
pub struct LeaseElector {
    api: Api<Lease>,
    name: String,
    holder: String,
    /// The Lease as last read, and when (by this process's clock) it last changed.
    observed: Mutex<Option<(String, Instant)>>,
}

impl std::fmt::Debug for LeaseElector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseElector")
            .field("name", &self.name)
            .field("holder", &self.holder)
            .finish_non_exhaustive()
    }
}

fn now() -> MicroTime {
    MicroTime(jiff::Timestamp::now())
}

impl LeaseElector {
    pub fn new(client: kube::Client, namespace: &str, name: &str, holder: &str) -> Self {
        LeaseElector {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            holder: holder.to_owned(),
            observed: Mutex::new(None),
        }
    }

    fn spec(&self, transitions: i32, acquired: Option<MicroTime>) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.holder.clone()),
            lease_duration_seconds: Some(LEASE_DURATION.as_secs() as i32),
            acquire_time: acquired.or_else(|| Some(now())),
            renew_time: Some(now()),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// Notes the Lease's version; true when it has not changed for a whole lease duration.
    fn expired(&self, lease: &Lease) -> bool {
        let rv = lease.metadata.resource_version.clone().unwrap_or_default();
        let mut observed = self.observed.lock().unwrap();
        match &*observed {
            Some((seen, at)) if *seen == rv => {
                let duration = lease
                    .spec
                    .as_ref()
                    .and_then(|s| s.lease_duration_seconds)
                    .map(|s| Duration::from_secs(s.max(1) as u64))
                    .unwrap_or(LEASE_DURATION);
                at.elapsed() >= duration
            }
            _ => {
                *observed = Some((rv, Instant::now()));
                false
            }
        }
    }
}

fn err(e: kube::Error) -> Error {
    match &e {
        kube::Error::Api(s) if s.code == 409 => Error::conflict(&s.message),
        kube::Error::Api(s) if s.code >= 500 || s.code == 429 => {
            Error::unavailable(BACKEND, format!("{} {}", s.code, s.message))
        }
        _ => Error::generic(BACKEND, e),
    }
}

fn code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

#[async_trait]
impl LeaderElector for LeaseElector {
    fn describe(&self) -> String {
        format!("Lease {}", self.name)
    }

    async fn acquire_or_renew(&self) -> Result<bool> {
        let pp = PostParams::default();
        let current = match self.api.get_opt(&self.name).await.map_err(err)? {
            Some(l) => l,
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..Default::default()
                    },
                    spec: Some(self.spec(0, None)),
                };
                return match self.api.create(&pp, &lease).await {
                    Ok(_) => Ok(true),
                    Err(e) if code(&e) == Some(409) => Ok(false),
                    Err(e) => Err(err(e)),
                };
            }
        };
        let spec = current.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let mine = holder == self.holder;
        let expired = self.expired(&current);
        if !mine && !holder.is_empty() && !expired {
            return Ok(false);
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!mine);
        let acquired = if mine {
            spec.acquire_time.clone()
        } else {
            None
        };
        let mut next = current.clone();
        next.spec = Some(self.spec(transitions, acquired));
        // `replace` sends the resourceVersion we read: a stale one is refused with 409.
        match self.api.replace(&self.name, &pp, &next).await {
            Ok(l) => {
                *self.observed.lock().unwrap() = l
                    .metadata
                    .resource_version
                    .clone()
                    .map(|rv| (rv, Instant::now()));
                Ok(true)
            }
            Err(e) if code(&e) == Some(409) => Ok(false),
            Err(e) => Err(err(e)),
        }
    }

    async fn release(&self) -> Result<()> {
        let Some(mut lease) = self.api.get_opt(&self.name).await.map_err(err)? else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(self.holder.as_str()) {
            return Ok(());
        }
        // As client-go releases: no holder, and a lease that others may take at once.
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(now());
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if matches!(code(&e), Some(409 | 404)) => Ok(()),
            Err(e) => Err(err(e)),
        }
    }
}
