//! AWS credentials for the DynamoDB registry and the S3 state store, from wherever they are
//! where otm runs: [`AwsCredentialsProvider`].
//!
//! The sources, tried in the order of the AWS SDKs' default chain, the first one configured wins:
//!
//! 1. **The environment**: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, optional
//!    `AWS_SESSION_TOKEN`. Used as they are, never refreshed.
//! 2. **Web identity** (EKS IAM Roles for Service Accounts): `AWS_WEB_IDENTITY_TOKEN_FILE` and
//!    `AWS_ROLE_ARN`, optional `AWS_ROLE_SESSION_NAME`. The token file is read on every refresh
//!    (the kubelet rotates it) and exchanged through STS `AssumeRoleWithWebIdentity` at
//!    `AWS_ENDPOINT_URL_STS`, else `AWS_ENDPOINT_URL`, else the regional endpoint of `AWS_REGION`
//!    (or `AWS_DEFAULT_REGION`), else, or with `AWS_STS_REGIONAL_ENDPOINTS=legacy`, the global
//!    `https://sts.amazonaws.com`.
//! 3. **A container credentials endpoint** (EKS Pod Identity, ECS task roles):
//!    `AWS_CONTAINER_CREDENTIALS_RELATIVE_URI` (under `http://169.254.170.2`) or
//!    `AWS_CONTAINER_CREDENTIALS_FULL_URI`, with the `Authorization` header from
//!    `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE` (read on every refresh) or
//!    `AWS_CONTAINER_AUTHORIZATION_TOKEN`. A full URI over plain HTTP must name a loopback address
//!    or one of the link-local agents (`169.254.170.2`, `169.254.170.23`, `fd00:ec2::23`).
//! 4. **The EC2 instance metadata service**, IMDSv2 only: a session token from
//!    `PUT /latest/api/token`, then the instance profile's role and its credentials. The
//!    endpoint is `AWS_EC2_METADATA_SERVICE_ENDPOINT`, else `http://169.254.169.254` (or
//!    `http://[fd00:ec2::254]` with `AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE=IPv6`);
//!    `AWS_EC2_METADATA_DISABLED=true` leaves it out.
//!
//! Choosing a source sends nothing: it is decided by which variables are set, so a half-set
//! source (a role ARN without a token file) is an error at once instead of a silent fall-through
//! to the next one.
//!
//! Temporary credentials are cached and fetched again before they expire: 5 minutes before, or
//! at half their lifetime when they were issued for less than 10 minutes. One caller fetches at a
//! time; while the old credentials are still valid the others go on with them, and a failed
//! refresh keeps them until they expire. Errors name the source and what to set; no secret, key
//! or token appears in an error, a log line or a `Debug` output.
//!
//! One provider serves both backends: [`AwsCredentialsProvider::shared_from_env`] is the
//! process-wide one that `DynamoRegistry::open` and `open::s3_state_store` use, and
//! [`AwsCredentialsProvider::object_store`] adapts it to `object_store`'s `CredentialProvider`.
//! Tests build their own from an explicit variable map with [`AwsCredentialsProvider::from_vars`]
//! instead of changing the process environment.

use otm_core::{Error, Result, Secret};
use serde::Deserialize;
use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const BACKEND: &str = "aws-credentials";
/// Refresh this long before expiry…
const REFRESH_MARGIN: Duration = Duration::from_secs(5 * 60);
/// …and stop using credentials this long before it (clock skew, a request in flight).
const EXPIRY_MARGIN: Duration = Duration::from_secs(10);
const DEFAULT_IMDS_ENDPOINT: &str = "http://169.254.169.254";
const DEFAULT_IMDS_ENDPOINT_V6: &str = "http://[fd00:ec2::254]";
const ECS_ENDPOINT: &str = "http://169.254.170.2";
/// The IMDSv2 session token's lifetime asked for, in seconds.
const IMDS_TOKEN_TTL_S: &str = "21600";
const METADATA_TIMEOUT: Duration = Duration::from_secs(2);
const STS_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Tries per fetch for errors that may pass (refused connections, timeouts, 5xx).
const ATTEMPTS: u32 = 3;

/// Where a provider's credentials come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CredentialSource {
    /// `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`.
    Environment,
    /// STS `AssumeRoleWithWebIdentity` with a projected service account token (IRSA).
    WebIdentity,
    /// A container credentials endpoint: EKS Pod Identity or ECS.
    ContainerEndpoint,
    /// The EC2 instance metadata service (IMDSv2): the instance profile's role.
    InstanceMetadata,
}

impl CredentialSource {
    /// A short name for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            CredentialSource::Environment => "environment",
            CredentialSource::WebIdentity => "web-identity",
            CredentialSource::ContainerEndpoint => "container-endpoint",
            CredentialSource::InstanceMetadata => "instance-metadata",
        }
    }
}

impl fmt::Display for CredentialSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CredentialSource::Environment => {
                "the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"
            }
            CredentialSource::WebIdentity => {
                "web identity (AWS_ROLE_ARN, AWS_WEB_IDENTITY_TOKEN_FILE)"
            }
            CredentialSource::ContainerEndpoint => {
                "the container credentials endpoint (AWS_CONTAINER_CREDENTIALS_FULL_URI or \
                 AWS_CONTAINER_CREDENTIALS_RELATIVE_URI)"
            }
            CredentialSource::InstanceMetadata => "the EC2 instance metadata service (IMDSv2)",
        })
    }
}

/// One set of AWS credentials. `Debug` shows neither the key id nor the secrets.
#[derive(Clone)]
pub struct AwsCredentials {
    /// Names the key (not a secret, but no use in a log either).
    pub access_key_id: String,
    pub secret_access_key: Secret,
    pub session_token: Option<Secret>,
    /// When temporary credentials stop working; `None` for long-term ones.
    pub expires_at: Option<SystemTime>,
}

impl fmt::Debug for AwsCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsCredentials")
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// The variables a provider reads: the process environment, or a map a test passes.
#[derive(Clone, Default)]
pub struct AwsEnv {
    vars: HashMap<String, String>,
}

impl fmt::Debug for AwsEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Names only: the values include secrets.
        let mut names: Vec<&str> = self.vars.keys().map(String::as_str).collect();
        names.sort_unstable();
        f.debug_struct("AwsEnv").field("set", &names).finish()
    }
}

impl AwsEnv {
    /// The `AWS_*` variables of this process.
    pub fn from_process() -> Self {
        AwsEnv {
            vars: std::env::vars()
                .filter(|(k, _)| k.starts_with("AWS_"))
                .collect(),
        }
    }

    /// Exactly these variables.
    pub fn from_vars<K: Into<String>, V: Into<String>>(
        vars: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        AwsEnv {
            vars: vars
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        }
    }

    /// A variable's value, trimmed; unset and empty are the same.
    fn get(&self, name: &str) -> Option<&str> {
        self.vars
            .get(name)
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
    }

    fn is_true(&self, name: &str) -> bool {
        self.get(name)
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    }
}

/// How fresh credentials are fetched.
enum Fetcher {
    Static,
    WebIdentity {
        token_file: PathBuf,
        role_arn: String,
        session_name: Option<String>,
        endpoint: reqwest::Url,
    },
    Container {
        url: reqwest::Url,
        token: ContainerToken,
    },
    InstanceMetadata {
        endpoint: reqwest::Url,
        /// Whether the endpoint was set explicitly (an unset one that does not answer means
        /// "not on EC2", and the error says which other sources there are).
        explicit: bool,
    },
}

enum ContainerToken {
    None,
    File(PathBuf),
    Value(Secret),
}

/// Credentials as cached, with when to fetch new ones.
struct Cached {
    credentials: Arc<AwsCredentials>,
    /// From then on a caller fetches new ones.
    refresh_at: Option<SystemTime>,
    /// From then on nobody uses these any more.
    unusable_at: Option<SystemTime>,
}

impl Cached {
    fn new(credentials: AwsCredentials, now: SystemTime) -> Self {
        let (refresh_at, unusable_at) = match credentials.expires_at {
            None => (None, None),
            Some(expires) => {
                let lifetime = expires.duration_since(now).unwrap_or_default();
                let margin = REFRESH_MARGIN.min(lifetime / 2);
                (
                    Some(expires - margin),
                    Some(expires.checked_sub(EXPIRY_MARGIN).unwrap_or(expires)),
                )
            }
        };
        Cached {
            credentials: Arc::new(credentials),
            refresh_at,
            unusable_at,
        }
    }

    fn fresh(&self, now: SystemTime) -> bool {
        self.refresh_at.is_none_or(|t| now < t)
    }

    fn usable(&self, now: SystemTime) -> bool {
        self.unusable_at.is_none_or(|t| now < t)
    }
}

type Clock = Box<dyn Fn() -> SystemTime + Send + Sync>;

struct Inner {
    source: CredentialSource,
    fetcher: Fetcher,
    http: reqwest::Client,
    cached: Mutex<Option<Cached>>,
    /// Held by the one caller that fetches.
    refresh: tokio::sync::Mutex<()>,
    fetches: AtomicU64,
    clock: Clock,
}

/// A credential chain's chosen source with its cache. Cheap to clone; clones share the cache.
/// See the [module docs](self).
#[derive(Clone)]
pub struct AwsCredentialsProvider {
    inner: Arc<Inner>,
}

impl fmt::Debug for AwsCredentialsProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsCredentialsProvider")
            .field("source", &self.inner.source.name())
            .field("fetches", &self.fetches())
            .finish_non_exhaustive()
    }
}

/// The process-wide provider (see [`AwsCredentialsProvider::shared_from_env`]).
static SHARED: Mutex<Option<AwsCredentialsProvider>> = Mutex::new(None);

impl AwsCredentialsProvider {
    /// The chain over this process's environment.
    pub fn from_env() -> Result<Self> {
        Self::new(&AwsEnv::from_process())
    }

    /// The chain over exactly these variables (tests; nothing is read from the process).
    pub fn from_vars<K: Into<String>, V: Into<String>>(
        vars: impl IntoIterator<Item = (K, V)>,
    ) -> Result<Self> {
        Self::new(&AwsEnv::from_vars(vars))
    }

    /// One provider for the whole process, made from its environment on first use, so the
    /// DynamoDB registry and the S3 state store share one cache (and one refresh).
    pub fn shared_from_env() -> Result<Self> {
        let mut shared = SHARED.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(provider) = shared.as_ref() {
            return Ok(provider.clone());
        }
        let provider = Self::from_env()?;
        *shared = Some(provider.clone());
        Ok(provider)
    }

    /// The chain over `env`: picks the source (sending nothing).
    pub fn new(env: &AwsEnv) -> Result<Self> {
        let (source, fetcher, initial) = choose(env)?;
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(|e| Error::generic(BACKEND, format!("cannot build the HTTP client: {e}")))?;
        let now = SystemTime::now();
        let provider = AwsCredentialsProvider {
            inner: Arc::new(Inner {
                source,
                fetcher,
                http,
                cached: Mutex::new(initial.map(|c| Cached::new(c, now))),
                refresh: tokio::sync::Mutex::new(()),
                fetches: AtomicU64::new(0),
                clock: Box::new(SystemTime::now),
            }),
        };
        tracing::debug!(source = source.name(), "chose the AWS credentials source");
        Ok(provider)
    }

    /// The same provider reading the time from `clock` (tests move time on without waiting).
    ///
    /// # Panics
    /// If the provider was cloned already.
    pub fn with_clock(self, clock: impl Fn() -> SystemTime + Send + Sync + 'static) -> Self {
        let mut inner = Arc::into_inner(self.inner)
            .expect("with_clock is for a provider that was not shared yet");
        inner.clock = Box::new(clock);
        AwsCredentialsProvider {
            inner: Arc::new(inner),
        }
    }

    /// Which source this provider takes credentials from.
    pub fn source(&self) -> CredentialSource {
        self.inner.source
    }

    /// How many times credentials were fetched from the source (not counting the environment,
    /// which is read once).
    pub fn fetches(&self) -> u64 {
        self.inner.fetches.load(Ordering::Relaxed)
    }

    fn now(&self) -> SystemTime {
        (self.inner.clock)()
    }

    fn cached(&self) -> Option<(Arc<AwsCredentials>, bool, bool)> {
        let now = self.now();
        let cached = self.inner.cached.lock().unwrap_or_else(|p| p.into_inner());
        cached.as_ref().map(|c| {
            let usable = c.usable(now);
            // Credentials issued for less than 20 s reach the end of their use before their
            // refresh time: they count as due for a refresh then.
            (c.credentials.clone(), usable && c.fresh(now), usable)
        })
    }

    /// Credentials to sign a request with: the cached ones, or new ones when those are due for
    /// a refresh.
    pub async fn credentials(&self) -> Result<Arc<AwsCredentials>> {
        match self.cached() {
            Some((c, true, _)) => Ok(c),
            Some((old, false, true)) => {
                // Due for a refresh but still valid: one caller fetches, the others go on with
                // these.
                let Ok(_guard) = self.inner.refresh.try_lock() else {
                    return Ok(old);
                };
                if let Some((c, true, _)) = self.cached() {
                    return Ok(c);
                }
                match self.fetch().await {
                    Ok(c) => Ok(c),
                    Err(e) => {
                        tracing::warn!(
                            source = self.inner.source.name(),
                            error = %e,
                            "refreshing AWS credentials failed; the current ones are used until they expire"
                        );
                        Ok(old)
                    }
                }
            }
            _ => {
                // None yet, or expired: everybody waits for the one fetch.
                let _guard = self.inner.refresh.lock().await;
                if let Some((c, true, _)) = self.cached() {
                    return Ok(c);
                }
                self.fetch().await
            }
        }
    }

    /// Drops the cached credentials (after a service said they expired), so the next call
    /// fetches new ones. Does nothing for long-term credentials.
    pub fn invalidate(&self) {
        if !matches!(self.inner.fetcher, Fetcher::Static) {
            *self.inner.cached.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }

    async fn fetch(&self) -> Result<Arc<AwsCredentials>> {
        let inner = &self.inner;
        let credentials = match &inner.fetcher {
            Fetcher::Static => {
                // Never dropped from the cache; here only after a poisoned lock lost them.
                return Err(Error::generic(
                    BACKEND,
                    "the credentials from the environment are gone; restart the process",
                ));
            }
            Fetcher::WebIdentity {
                token_file,
                role_arn,
                session_name,
                endpoint,
            } => {
                web_identity(
                    &inner.http,
                    token_file,
                    role_arn,
                    session_name.as_deref(),
                    endpoint,
                )
                .await?
            }
            Fetcher::Container { url, token } => container(&inner.http, url, token).await?,
            Fetcher::InstanceMetadata { endpoint, explicit } => {
                instance_metadata(&inner.http, endpoint, *explicit).await?
            }
        };
        inner.fetches.fetch_add(1, Ordering::Relaxed);
        let now = self.now();
        if credentials.expires_at.is_some_and(|t| t <= now) {
            tracing::warn!(
                source = inner.source.name(),
                "the AWS credentials just fetched have expired already; check the clock"
            );
        }
        tracing::debug!(
            source = inner.source.name(),
            expires_at = ?credentials.expires_at.map(|t| t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()),
            "fetched AWS credentials"
        );
        let cached = Cached::new(credentials, now);
        let credentials = cached.credentials.clone();
        *inner.cached.lock().unwrap_or_else(|p| p.into_inner()) = Some(cached);
        Ok(credentials)
    }

    /// This provider as `object_store`'s credential provider, for `AmazonS3Builder::with_credentials`.
    #[cfg(feature = "s3")]
    pub fn object_store(&self) -> object_store::aws::AwsCredentialProvider {
        Arc::new(ObjectStoreCredentials(self.clone()))
    }
}

/// [`AwsCredentialsProvider`] as an `object_store` `CredentialProvider`.
#[cfg(feature = "s3")]
#[derive(Debug)]
struct ObjectStoreCredentials(AwsCredentialsProvider);

#[cfg(feature = "s3")]
#[async_trait::async_trait]
impl object_store::CredentialProvider for ObjectStoreCredentials {
    type Credential = object_store::aws::AwsCredential;

    async fn get_credential(&self) -> object_store::Result<Arc<Self::Credential>> {
        let c = self
            .0
            .credentials()
            .await
            .map_err(|e| object_store::Error::Generic {
                store: "S3",
                source: Box::new(e),
            })?;
        Ok(Arc::new(object_store::aws::AwsCredential {
            key_id: c.access_key_id.clone(),
            secret_key: c.secret_access_key.expose().to_owned(),
            token: c.session_token.as_ref().map(|t| t.expose().to_owned()),
        }))
    }
}

/// What to set, for the error when no source is configured or reachable.
const NO_SOURCE: &str = "no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY; or on \
     EKS give the service account a role through IRSA (AWS_ROLE_ARN and AWS_WEB_IDENTITY_TOKEN_FILE, \
     set by the eks.amazonaws.com/role-arn annotation) or EKS Pod Identity \
     (AWS_CONTAINER_CREDENTIALS_FULL_URI and AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE, set by a pod \
     identity association); or run on an EC2 instance with an instance profile";

/// Picks the source from the variables, and reads static credentials.
fn choose(env: &AwsEnv) -> Result<(CredentialSource, Fetcher, Option<AwsCredentials>)> {
    // 1. The environment.
    match (
        env.get("AWS_ACCESS_KEY_ID"),
        env.get("AWS_SECRET_ACCESS_KEY"),
    ) {
        (Some(id), Some(secret)) => {
            let credentials = AwsCredentials {
                access_key_id: id.to_owned(),
                secret_access_key: Secret::new(secret),
                session_token: env.get("AWS_SESSION_TOKEN").map(Secret::new),
                expires_at: None,
            };
            return Ok((
                CredentialSource::Environment,
                Fetcher::Static,
                Some(credentials),
            ));
        }
        (Some(_), None) => {
            return Err(Error::invalid(
                "AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not: set both, or neither \
                 to use another source of AWS credentials",
            ));
        }
        (None, Some(_)) => {
            return Err(Error::invalid(
                "AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not: set both, or neither \
                 to use another source of AWS credentials",
            ));
        }
        (None, None) => {}
    }
    // 2. Web identity.
    match (
        env.get("AWS_WEB_IDENTITY_TOKEN_FILE"),
        env.get("AWS_ROLE_ARN"),
    ) {
        (Some(token_file), Some(role_arn)) => {
            let endpoint = sts_endpoint(env)?;
            return Ok((
                CredentialSource::WebIdentity,
                Fetcher::WebIdentity {
                    token_file: PathBuf::from(token_file),
                    role_arn: role_arn.to_owned(),
                    session_name: env.get("AWS_ROLE_SESSION_NAME").map(str::to_owned),
                    endpoint,
                },
                None,
            ));
        }
        (Some(_), None) => {
            return Err(Error::invalid(
                "AWS_WEB_IDENTITY_TOKEN_FILE is set but AWS_ROLE_ARN is not: set the ARN of the \
                 role to assume (on EKS, annotate the service account with eks.amazonaws.com/role-arn)",
            ));
        }
        (None, Some(_)) => {
            return Err(Error::invalid(
                "AWS_ROLE_ARN is set but AWS_WEB_IDENTITY_TOKEN_FILE is not: set the path of the \
                 service account token (on EKS the pod identity webhook mounts it when the service \
                 account has the eks.amazonaws.com/role-arn annotation)",
            ));
        }
        (None, None) => {}
    }
    // 3. A container credentials endpoint.
    let container_url = if let Some(relative) = env.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") {
        Some(parse_url(
            &format!("{ECS_ENDPOINT}{relative}"),
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        )?)
    } else if let Some(full) = env.get("AWS_CONTAINER_CREDENTIALS_FULL_URI") {
        let url = parse_url(full, "AWS_CONTAINER_CREDENTIALS_FULL_URI")?;
        check_container_host(&url)?;
        Some(url)
    } else {
        None
    };
    if let Some(url) = container_url {
        let token = if let Some(file) = env.get("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE") {
            ContainerToken::File(PathBuf::from(file))
        } else if let Some(token) = env.get("AWS_CONTAINER_AUTHORIZATION_TOKEN") {
            ContainerToken::Value(Secret::new(token))
        } else {
            ContainerToken::None
        };
        return Ok((
            CredentialSource::ContainerEndpoint,
            Fetcher::Container { url, token },
            None,
        ));
    }
    // 4. The instance metadata service.
    if env.is_true("AWS_EC2_METADATA_DISABLED") {
        return Err(Error::invalid(format!(
            "{NO_SOURCE} (the instance metadata service is off: AWS_EC2_METADATA_DISABLED=true)"
        )));
    }
    let (endpoint, explicit) = match env.get("AWS_EC2_METADATA_SERVICE_ENDPOINT") {
        Some(e) => (e, true),
        None if env
            .get("AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE")
            .is_some_and(|m| m.eq_ignore_ascii_case("ipv6")) =>
        {
            (DEFAULT_IMDS_ENDPOINT_V6, false)
        }
        None => (DEFAULT_IMDS_ENDPOINT, false),
    };
    let endpoint = parse_url(endpoint, "AWS_EC2_METADATA_SERVICE_ENDPOINT")?;
    Ok((
        CredentialSource::InstanceMetadata,
        Fetcher::InstanceMetadata { endpoint, explicit },
        None,
    ))
}

fn parse_url(value: &str, variable: &str) -> Result<reqwest::Url> {
    let url = reqwest::Url::parse(value)
        .map_err(|e| Error::invalid(format!("{variable} `{value}` is not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(Error::invalid(format!(
            "{variable} `{value}` must be an http:// or https:// URL with a host"
        )));
    }
    Ok(url)
}

/// A URL's host as an IP address, if it is one.
fn host_ip(url: &reqwest::Url) -> Option<IpAddr> {
    let host = url.host_str()?;
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

/// Whether a URL's host is a loopback address (or `localhost`).
fn is_loopback(url: &reqwest::Url) -> bool {
    match host_ip(url) {
        Some(ip) => ip.is_loopback(),
        None => url
            .host_str()
            .is_some_and(|h| h.eq_ignore_ascii_case("localhost")),
    }
}

/// A token goes over plain HTTP only to this machine or to the link-local credential agents.
fn check_container_host(url: &reqwest::Url) -> Result<()> {
    if url.scheme() == "https" || is_loopback(url) {
        return Ok(());
    }
    let agents: [IpAddr; 3] = [
        [169, 254, 170, 2].into(),
        [169, 254, 170, 23].into(),
        [0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x23].into(),
    ];
    if host_ip(url).is_some_and(|ip| agents.contains(&ip)) {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "AWS_CONTAINER_CREDENTIALS_FULL_URI `{url}` is plain HTTP to a host that is neither \
             loopback nor a credentials agent (169.254.170.2, 169.254.170.23, fd00:ec2::23); use https://"
        )))
    }
}

/// The STS endpoint for web identity.
fn sts_endpoint(env: &AwsEnv) -> Result<reqwest::Url> {
    for variable in ["AWS_ENDPOINT_URL_STS", "AWS_ENDPOINT_URL"] {
        if let Some(value) = env.get(variable) {
            let url = parse_url(value, variable)?;
            if url.scheme() == "http" && !is_loopback(&url) {
                return Err(Error::invalid(format!(
                    "{variable} `{url}` is plain HTTP to a host that is not loopback: the web \
                     identity token would cross the network in the clear; use https://"
                )));
            }
            return Ok(url);
        }
    }
    let region = env
        .get("AWS_REGION")
        .or_else(|| env.get("AWS_DEFAULT_REGION"));
    let legacy = env
        .get("AWS_STS_REGIONAL_ENDPOINTS")
        .is_some_and(|v| v.eq_ignore_ascii_case("legacy"));
    let url = match region {
        Some(region) if !legacy => {
            let suffix = if region.starts_with("cn-") {
                "amazonaws.com.cn"
            } else {
                "amazonaws.com"
            };
            format!("https://sts.{region}.{suffix}")
        }
        _ => "https://sts.amazonaws.com".to_owned(),
    };
    parse_url(&url, "AWS_REGION")
}

/// Whether an error may pass on a later try.
enum Failure {
    Retry(Error),
    Final(Error),
}

impl From<Failure> for Error {
    fn from(f: Failure) -> Error {
        match f {
            Failure::Retry(e) | Failure::Final(e) => e,
        }
    }
}

/// Runs `attempt` up to [`ATTEMPTS`] times while it fails with [`Failure::Retry`].
async fn with_retries<T, F, Fut>(mut attempt: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::result::Result<T, Failure>>,
{
    let mut n = 0;
    loop {
        n += 1;
        match attempt().await {
            Ok(v) => return Ok(v),
            Err(Failure::Retry(e)) if n < ATTEMPTS => {
                tracing::debug!(attempt = n, error = %e, "retrying an AWS credentials request");
                tokio::time::sleep(Duration::from_millis(100 << n)).await;
            }
            Err(f) => return Err(f.into()),
        }
    }
}

/// The body of a failed answer, shortened, for an error message.
fn excerpt(body: &str) -> String {
    let body = body.trim();
    let mut end = body.len().min(300);
    while !body.is_char_boundary(end) {
        end -= 1;
    }
    let more = if end < body.len() { "…" } else { "" };
    format!("{}{more}", &body[..end])
}

fn read_token_file(path: &PathBuf, what: &str, hint: &str) -> Result<String> {
    let token = std::fs::read_to_string(path).map_err(|e| {
        Error::invalid(format!(
            "cannot read the {what} {}: {e}; {hint}",
            path.display()
        ))
    })?;
    let token = token.trim().to_owned();
    if token.is_empty() {
        return Err(Error::invalid(format!(
            "the {what} {} is empty; {hint}",
            path.display()
        )));
    }
    Ok(token)
}

/// The credentials document of the container endpoint and the instance metadata service.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CredentialsDocument {
    access_key_id: String,
    secret_access_key: String,
    token: Option<String>,
    expiration: Option<String>,
    /// IMDS: `Success` or an error code.
    code: Option<String>,
    message: Option<String>,
}

fn parse_expiration(value: &str, source: CredentialSource) -> Result<SystemTime> {
    chrono::DateTime::parse_from_rfc3339(value)
        .map(SystemTime::from)
        .map_err(|e| {
            Error::generic(
                BACKEND,
                format!("{source} gave an expiration time that is not RFC 3339 (`{value}`): {e}"),
            )
        })
}

impl CredentialsDocument {
    fn into_credentials(self, source: CredentialSource) -> Result<AwsCredentials> {
        if let Some(code) = self.code.as_deref().filter(|c| *c != "Success") {
            return Err(Error::generic(
                BACKEND,
                format!(
                    "{source} answered {code}: {}",
                    self.message.as_deref().unwrap_or("no message")
                ),
            ));
        }
        if self.access_key_id.is_empty() || self.secret_access_key.is_empty() {
            return Err(Error::generic(
                BACKEND,
                format!("{source} answered credentials without a key"),
            ));
        }
        Ok(AwsCredentials {
            access_key_id: self.access_key_id,
            secret_access_key: Secret::new(self.secret_access_key),
            session_token: self.token.filter(|t| !t.is_empty()).map(Secret::new),
            expires_at: self
                .expiration
                .as_deref()
                .map(|e| parse_expiration(e, source))
                .transpose()?,
        })
    }
}

/// A transport error: worth another try.
fn unreachable(source: CredentialSource, url: &reqwest::Url, e: &reqwest::Error) -> Failure {
    Failure::Retry(Error::unavailable(
        BACKEND,
        format!("{source}: cannot reach {url}: {e}"),
    ))
}

/// A JSON credentials document from `GET url`.
async fn get_document(
    http: &reqwest::Client,
    source: CredentialSource,
    url: &reqwest::Url,
    headers: &[(&str, &str)],
    hint: &str,
) -> std::result::Result<AwsCredentials, Failure> {
    let mut req = http.get(url.clone()).timeout(METADATA_TIMEOUT);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let resp = req.send().await.map_err(|e| unreachable(source, url, &e))?;
    let status = resp.status();
    let body = resp
        .text()
        .await
        .map_err(|e| unreachable(source, url, &e))?;
    if !status.is_success() {
        let e = Error::generic(
            BACKEND,
            format!(
                "{source}: {url} answered {status}: {}; {hint}",
                excerpt(&body)
            ),
        );
        return Err(if status.is_server_error() {
            Failure::Retry(e)
        } else {
            Failure::Final(e)
        });
    }
    let doc: CredentialsDocument = serde_json::from_str(&body).map_err(|e| {
        // The body holds the secret: name only what is wrong with it.
        Failure::Final(Error::generic(
            BACKEND,
            format!(
                "{source}: {url} answered with a credentials document that cannot be read: {e}"
            ),
        ))
    })?;
    doc.into_credentials(source).map_err(Failure::Final)
}

async fn container(
    http: &reqwest::Client,
    url: &reqwest::Url,
    token: &ContainerToken,
) -> Result<AwsCredentials> {
    let source = CredentialSource::ContainerEndpoint;
    let hint = "check the pod identity association (EKS) or the task role (ECS)";
    with_retries(|| async {
        // Read on every try: the agent's token is rotated.
        let token = match token {
            ContainerToken::None => None,
            ContainerToken::File(path) => Some(Secret::new(
                read_token_file(
                    path,
                    "container authorization token file (AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE)",
                    "on EKS the Pod Identity webhook mounts it when the pod's service account has a pod identity association",
                )
                .map_err(Failure::Final)?,
            )),
            ContainerToken::Value(t) => Some(t.clone()),
        };
        if token
            .as_ref()
            .is_some_and(|t| t.expose().contains(['\r', '\n']))
        {
            return Err(Failure::Final(Error::invalid(
                "the container authorization token holds a line break; check \
                 AWS_CONTAINER_AUTHORIZATION_TOKEN(_FILE)",
            )));
        }
        let headers: Vec<(&str, &str)> = token
            .as_ref()
            .map(|t| ("authorization", t.expose()))
            .into_iter()
            .collect();
        get_document(http, source, url, &headers, hint).await
    })
    .await
}

async fn instance_metadata(
    http: &reqwest::Client,
    endpoint: &reqwest::Url,
    explicit: bool,
) -> Result<AwsCredentials> {
    let source = CredentialSource::InstanceMetadata;
    let base = endpoint.as_str().trim_end_matches('/').to_owned();
    let token_url = parse_url(
        &format!("{base}/latest/api/token"),
        "AWS_EC2_METADATA_SERVICE_ENDPOINT",
    )?;
    // The session token: a service that does not answer here is most likely not there at all.
    let token = with_retries(|| async {
        let resp = http
            .put(token_url.clone())
            .header("x-aws-ec2-metadata-token-ttl-seconds", IMDS_TOKEN_TTL_S)
            .timeout(METADATA_TIMEOUT)
            .send()
            .await
            .map_err(|e| {
                let e = if explicit {
                    Error::unavailable(BACKEND, format!("{source}: cannot reach {token_url}: {e}"))
                } else {
                    Error::unavailable(
                        BACKEND,
                        format!(
                            "{NO_SOURCE}. The instance metadata service at {base} did not answer \
                             ({e}): on EC2, allow IMDSv2 with a hop limit of 2 so pods reach it, \
                             or set AWS_EC2_METADATA_DISABLED=true to skip it"
                        ),
                    )
                };
                Failure::Retry(e)
            })?;
        let status = resp.status();
        let body = resp
            .text()
            .await
            .map_err(|e| unreachable(source, &token_url, &e))?;
        if !status.is_success() {
            let e = Error::generic(
                BACKEND,
                format!(
                    "{source}: PUT {token_url} answered {status}: {}; IMDSv2 must be enabled on the instance",
                    excerpt(&body)
                ),
            );
            return Err(if status.is_server_error() {
                Failure::Retry(e)
            } else {
                Failure::Final(e)
            });
        }
        Ok(Secret::new(body.trim()))
    })
    .await?;
    let roles_url = parse_url(
        &format!("{base}/latest/meta-data/iam/security-credentials/"),
        "AWS_EC2_METADATA_SERVICE_ENDPOINT",
    )?;
    let role = with_retries(|| async {
        let resp = http
            .get(roles_url.clone())
            .header("x-aws-ec2-metadata-token", token.expose())
            .timeout(METADATA_TIMEOUT)
            .send()
            .await
            .map_err(|e| unreachable(source, &roles_url, &e))?;
        let status = resp.status();
        let body = resp
            .text()
            .await
            .map_err(|e| unreachable(source, &roles_url, &e))?;
        if status == reqwest::StatusCode::NOT_FOUND {
            return Err(Failure::Final(Error::invalid(format!(
                "{source}: the instance has no instance profile: attach an IAM role to the \
                 instance (or its Karpenter EC2NodeClass), or use IRSA or EKS Pod Identity"
            ))));
        }
        if !status.is_success() {
            let e = Error::generic(
                BACKEND,
                format!(
                    "{source}: {roles_url} answered {status}: {}",
                    excerpt(&body)
                ),
            );
            return Err(if status.is_server_error() {
                Failure::Retry(e)
            } else {
                Failure::Final(e)
            });
        }
        body.lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| {
                Failure::Final(Error::invalid(format!(
                    "{source}: the instance profile names no role; attach an IAM role to it"
                )))
            })
    })
    .await?;
    if role.contains(['/', '?', '#']) {
        return Err(Error::generic(
            BACKEND,
            format!("{source}: the role name `{role}` is not a plain name"),
        ));
    }
    let url = parse_url(
        &format!("{base}/latest/meta-data/iam/security-credentials/{role}"),
        "AWS_EC2_METADATA_SERVICE_ENDPOINT",
    )?;
    with_retries(|| async {
        let headers = [("x-aws-ec2-metadata-token", token.expose())];
        get_document(
            http,
            source,
            &url,
            &headers,
            "check the instance profile's role",
        )
        .await
    })
    .await
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct StsResponse {
    assume_role_with_web_identity_result: StsResult,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct StsResult {
    credentials: StsCredentials,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct StsCredentials {
    access_key_id: String,
    secret_access_key: String,
    session_token: String,
    expiration: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct StsErrorResponse {
    error: StsError,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct StsError {
    code: String,
    #[serde(default)]
    message: String,
}

/// `application/x-www-form-urlencoded` encoding of one value.
fn form_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

async fn web_identity(
    http: &reqwest::Client,
    token_file: &PathBuf,
    role_arn: &str,
    session_name: Option<&str>,
    endpoint: &reqwest::Url,
) -> Result<AwsCredentials> {
    let source = CredentialSource::WebIdentity;
    with_retries(|| async {
        // Read on every try: the kubelet rotates the projected token.
        let token = Secret::new(
            read_token_file(
                token_file,
                "web identity token file (AWS_WEB_IDENTITY_TOKEN_FILE)",
                "on EKS the pod identity webhook mounts it when the service account has the \
                 eks.amazonaws.com/role-arn annotation",
            )
            .map_err(Failure::Final)?,
        );
        let session = match session_name {
            Some(s) => s.to_owned(),
            None => format!(
                "otm-{}",
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_millis()
            ),
        };
        let body = format!(
            "Action=AssumeRoleWithWebIdentity&Version=2011-06-15&RoleArn={}&RoleSessionName={}&WebIdentityToken={}",
            form_encode(role_arn),
            form_encode(&session),
            form_encode(token.expose())
        );
        let resp = http
            .post(endpoint.clone())
            .header("content-type", "application/x-www-form-urlencoded")
            .header("accept", "text/xml")
            .timeout(STS_TIMEOUT)
            .body(body)
            .send()
            .await
            .map_err(|e| unreachable(source, endpoint, &e))?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .map_err(|e| unreachable(source, endpoint, &e))?;
        if !status.is_success() {
            let (code, message) = match quick_xml::de::from_str::<StsErrorResponse>(&text) {
                Ok(r) => (r.error.code, r.error.message),
                Err(_) => (format!("HTTP {status}"), excerpt(&text)),
            };
            let e = Error::generic(
                BACKEND,
                format!(
                    "{source}: STS at {endpoint} refused AssumeRoleWithWebIdentity for {role_arn}: \
                     {code}: {message}; check that the role's trust policy names the cluster's \
                     OIDC provider and this service account"
                ),
            );
            // STS says so for a token it could not check against the provider yet.
            let transient = status.is_server_error()
                || matches!(
                    code.as_str(),
                    "IDPCommunicationError" | "Throttling" | "ThrottlingException"
                );
            return Err(if transient {
                Failure::Retry(e)
            } else {
                Failure::Final(e)
            });
        }
        let parsed: StsResponse = quick_xml::de::from_str(&text).map_err(|e| {
            Failure::Final(Error::generic(
                BACKEND,
                format!("{source}: STS at {endpoint} answered with a document that cannot be read: {e}"),
            ))
        })?;
        let c = parsed.assume_role_with_web_identity_result.credentials;
        Ok(AwsCredentials {
            access_key_id: c.access_key_id,
            secret_access_key: Secret::new(c.secret_access_key),
            session_token: Some(Secret::new(c.session_token)),
            expires_at: Some(parse_expiration(&c.expiration, source).map_err(Failure::Final)?),
        })
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_process_shares_one_provider() {
        let a = AwsCredentialsProvider::shared_from_env().unwrap();
        let b = AwsCredentialsProvider::shared_from_env().unwrap();
        assert!(Arc::ptr_eq(&a.inner, &b.inner));
    }

    #[test]
    fn refreshes_five_minutes_early_or_at_half_life() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let creds = |lifetime: u64| AwsCredentials {
            access_key_id: "A".into(),
            secret_access_key: Secret::new("s"),
            session_token: None,
            expires_at: Some(now + Duration::from_secs(lifetime)),
        };
        let hour = Cached::new(creds(3600), now);
        assert_eq!(hour.refresh_at, Some(now + Duration::from_secs(3300)));
        assert_eq!(hour.unusable_at, Some(now + Duration::from_secs(3590)));
        let minute = Cached::new(creds(60), now);
        assert_eq!(minute.refresh_at, Some(now + Duration::from_secs(30)));
        assert!(minute.fresh(now + Duration::from_secs(29)));
        assert!(!minute.fresh(now + Duration::from_secs(30)));
        assert!(minute.usable(now + Duration::from_secs(49)));
        assert!(!minute.usable(now + Duration::from_secs(50)));
    }

    #[test]
    fn parses_sts_answers() {
        let ok = r#"<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><AssumeRoleWithWebIdentityResult><Credentials><AccessKeyId>ASIAX</AccessKeyId><SecretAccessKey>a+b/c</SecretAccessKey><SessionToken>t&amp;k=</SessionToken><Expiration>2026-12-05T12:16:19.315484Z</Expiration></Credentials><AssumedRoleUser><Arn>arn:aws:sts::1:assumed-role/r/s</Arn></AssumedRoleUser></AssumeRoleWithWebIdentityResult></AssumeRoleWithWebIdentityResponse>"#;
        let r: StsResponse = quick_xml::de::from_str(ok).unwrap();
        let c = r.assume_role_with_web_identity_result.credentials;
        assert_eq!(c.access_key_id, "ASIAX");
        assert_eq!(c.secret_access_key, "a+b/c");
        assert_eq!(c.session_token, "t&k=");
        let t = parse_expiration(&c.expiration, CredentialSource::WebIdentity).unwrap();
        assert_eq!(
            t.duration_since(UNIX_EPOCH).unwrap().as_secs(),
            1_796_472_979
        );
        let err = r#"<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error><Type>Sender</Type><Code>InvalidIdentityToken</Code><Message>No OpenIDConnect provider found</Message></Error><RequestId>x</RequestId></ErrorResponse>"#;
        let e: StsErrorResponse = quick_xml::de::from_str(err).unwrap();
        assert_eq!(e.error.code, "InvalidIdentityToken");
        assert_eq!(e.error.message, "No OpenIDConnect provider found");
    }

    #[test]
    fn encodes_form_values() {
        assert_eq!(
            form_encode("arn:aws:iam::1:role/a b+c"),
            "arn%3Aaws%3Aiam%3A%3A1%3Arole%2Fa%20b%2Bc"
        );
    }

    #[test]
    fn picks_the_sts_endpoint() {
        let endpoint = |vars: &[(&str, &str)]| {
            sts_endpoint(&AwsEnv::from_vars(vars.iter().copied())).map(|u| u.to_string())
        };
        assert_eq!(endpoint(&[]).unwrap(), "https://sts.amazonaws.com/");
        assert_eq!(
            endpoint(&[("AWS_REGION", "eu-west-1")]).unwrap(),
            "https://sts.eu-west-1.amazonaws.com/"
        );
        assert_eq!(
            endpoint(&[("AWS_DEFAULT_REGION", "cn-north-1")]).unwrap(),
            "https://sts.cn-north-1.amazonaws.com.cn/"
        );
        assert_eq!(
            endpoint(&[
                ("AWS_REGION", "eu-west-1"),
                ("AWS_STS_REGIONAL_ENDPOINTS", "legacy")
            ])
            .unwrap(),
            "https://sts.amazonaws.com/"
        );
        assert_eq!(
            endpoint(&[
                ("AWS_REGION", "eu-west-1"),
                ("AWS_ENDPOINT_URL_STS", "http://127.0.0.1:5055")
            ])
            .unwrap(),
            "http://127.0.0.1:5055/"
        );
        let err = endpoint(&[("AWS_ENDPOINT_URL_STS", "http://sts.example.com")]).unwrap_err();
        assert!(err.to_string().contains("https://"), "{err}");
    }

    #[test]
    fn container_endpoints_over_http_must_be_local() {
        for ok in [
            "http://127.0.0.1:8080/creds",
            "http://localhost/creds",
            "http://[::1]:80/creds",
            "http://169.254.170.23/v1/credentials",
            "http://[fd00:ec2::23]/v1/credentials",
            "https://creds.example.com/",
        ] {
            check_container_host(&reqwest::Url::parse(ok).unwrap()).unwrap();
        }
        for bad in ["http://10.0.0.5/creds", "http://creds.example.com/"] {
            let err = check_container_host(&reqwest::Url::parse(bad).unwrap()).unwrap_err();
            assert!(matches!(err, Error::InvalidInput { .. }), "{err}");
        }
    }
}
