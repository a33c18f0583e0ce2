//! The AWS credential chain against stand-ins on loopback: the EKS Pod Identity agent and the
//! instance metadata service from otm-testkit, and moto (`OTM_TEST_DYNAMODB_URL`'s endpoint) for
//! STS `AssumeRoleWithWebIdentity`, behind a recording proxy where a test counts the calls; then
//! the DynamoDB registry and the S3 state store against moto with credentials from each of those
//! sources.
//!
//! Every provider here is built from its own variable map, never from the process environment,
//! so the tests run in parallel without touching each other's variables. Time is a clock the
//! test moves, so refreshing before expiry is shown without waiting for it.

#![cfg(feature = "aws-credentials")]

use otm_core::Error;
use otm_store::aws_credentials::{AwsCredentialsProvider, CredentialSource};
use otm_testkit::{ImdsEndpoint, PodIdentityEndpoint};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// A clock that stands still until the test moves it.
#[derive(Clone)]
struct TestClock {
    base: SystemTime,
    offset_s: Arc<AtomicU64>,
}

impl TestClock {
    fn new() -> Self {
        TestClock {
            base: SystemTime::now(),
            offset_s: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The test's "now" moved to `s` seconds after the start.
    fn set(&self, s: u64) {
        self.offset_s.store(s, Ordering::SeqCst);
    }

    fn now(&self) -> SystemTime {
        self.base + Duration::from_secs(self.offset_s.load(Ordering::SeqCst))
    }

    /// `s` seconds after the start.
    fn at(&self, s: u64) -> SystemTime {
        self.base + Duration::from_secs(s)
    }

    fn install(&self, provider: AwsCredentialsProvider) -> AwsCredentialsProvider {
        let clock = self.clone();
        provider.with_clock(move || clock.now())
    }
}

/// The access key ids `n` concurrent callers got.
async fn concurrent_key_ids(provider: &AwsCredentialsProvider, n: usize) -> Vec<String> {
    let calls = (0..n).map(|_| provider.credentials());
    futures::future::join_all(calls)
        .await
        .into_iter()
        .map(|c| c.expect("credentials").access_key_id.clone())
        .collect()
}

fn count(keys: &[String], key: &str) -> usize {
    keys.iter().filter(|k| *k == key).count()
}

fn invalid_input(result: Result<AwsCredentialsProvider, Error>) -> String {
    match result {
        Err(e @ Error::InvalidInput { .. }) => e.to_string(),
        Err(e) => panic!("expected invalid input, got {e}"),
        Ok(p) => panic!("expected an error, got {p:?}"),
    }
}

#[tokio::test]
async fn environment_credentials_are_used_as_they_are_and_never_shown() {
    let p = AwsCredentialsProvider::from_vars([
        ("AWS_ACCESS_KEY_ID", "AKIAENVIRONMENT00001"),
        ("AWS_SECRET_ACCESS_KEY", "env-secret-hunter2"),
        ("AWS_SESSION_TOKEN", "env-session-hunter2"),
        // Lower in the chain: not used while the keys are set.
        ("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/otm"),
        ("AWS_WEB_IDENTITY_TOKEN_FILE", "/nonexistent/token"),
    ])
    .unwrap();
    assert_eq!(p.source(), CredentialSource::Environment);
    let c = p.credentials().await.unwrap();
    assert_eq!(c.access_key_id, "AKIAENVIRONMENT00001");
    assert_eq!(c.secret_access_key.expose(), "env-secret-hunter2");
    assert_eq!(
        c.session_token.as_ref().map(|t| t.expose()),
        Some("env-session-hunter2")
    );
    assert_eq!(c.expires_at, None);
    assert_eq!(p.fetches(), 0, "the environment is read once, not fetched");
    let shown = format!("{p:?} {c:?}");
    assert!(
        !shown.contains("hunter2") && !shown.contains("AKIAENVIRONMENT"),
        "{shown}"
    );
}

#[tokio::test]
async fn half_set_or_missing_sources_say_what_to_set() {
    let msg = invalid_input(AwsCredentialsProvider::from_vars([(
        "AWS_ACCESS_KEY_ID",
        "AKIA1",
    )]));
    assert!(msg.contains("AWS_SECRET_ACCESS_KEY"), "{msg}");
    let msg = invalid_input(AwsCredentialsProvider::from_vars([(
        "AWS_SECRET_ACCESS_KEY",
        "hunter2",
    )]));
    assert!(
        msg.contains("AWS_ACCESS_KEY_ID") && !msg.contains("hunter2"),
        "{msg}"
    );
    let msg = invalid_input(AwsCredentialsProvider::from_vars([(
        "AWS_ROLE_ARN",
        "arn:aws:iam::123456789012:role/otm",
    )]));
    assert!(
        msg.contains("AWS_WEB_IDENTITY_TOKEN_FILE") && msg.contains("eks.amazonaws.com/role-arn"),
        "{msg}"
    );
    let msg = invalid_input(AwsCredentialsProvider::from_vars([(
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "/var/run/secrets/eks.amazonaws.com/serviceaccount/token",
    )]));
    assert!(msg.contains("AWS_ROLE_ARN"), "{msg}");
    // Nothing configured and the metadata service off: every source is named.
    let msg = invalid_input(AwsCredentialsProvider::from_vars([(
        "AWS_EC2_METADATA_DISABLED",
        "true",
    )]));
    for what in [
        "AWS_ACCESS_KEY_ID",
        "AWS_ROLE_ARN",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "instance profile",
        "AWS_EC2_METADATA_DISABLED",
    ] {
        assert!(msg.contains(what), "{what} missing from: {msg}");
    }
    // A token is not sent in the clear to a host off this machine.
    let msg = invalid_input(AwsCredentialsProvider::from_vars([
        (
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            "http://10.1.2.3/v1/credentials",
        ),
        ("AWS_CONTAINER_AUTHORIZATION_TOKEN", "hunter2"),
    ]));
    assert!(
        msg.contains("https://") && !msg.contains("hunter2"),
        "{msg}"
    );
    let msg = invalid_input(AwsCredentialsProvider::from_vars([
        ("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/otm"),
        ("AWS_WEB_IDENTITY_TOKEN_FILE", "/t"),
        ("AWS_ENDPOINT_URL_STS", "http://sts.example.com"),
    ]));
    assert!(msg.contains("https://"), "{msg}");
}

#[tokio::test]
async fn pod_identity_credentials_are_refreshed_before_they_expire() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("eks-pod-identity-token");
    std::fs::write(&token_file, "pod-token-1\n").unwrap();
    let agent = PodIdentityEndpoint::start(&token_file).await;
    let clock = TestClock::new();
    agent.set_expiration(clock.at(3600));
    let p = clock.install(
        AwsCredentialsProvider::from_vars([
            ("AWS_CONTAINER_CREDENTIALS_FULL_URI", agent.full_uri()),
            (
                "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
                token_file.display().to_string(),
            ),
        ])
        .unwrap(),
    );
    assert_eq!(p.source(), CredentialSource::ContainerEndpoint);
    assert_eq!(
        agent.credential_requests(),
        0,
        "choosing a source sends nothing"
    );

    let first = p.credentials().await.unwrap();
    assert_eq!(first.access_key_id, "ASIAPODIDENTITY00001");
    assert_eq!(
        first.session_token.as_ref().map(|t| t.expose()),
        Some("asiapodidentity-session-1")
    );
    let expires = first.expires_at.expect("temporary credentials expire");
    assert!(expires > clock.at(3598) && expires <= clock.at(3600));
    // Cached: until 5 minutes before expiry nobody asks the agent again.
    clock.set(3000);
    assert_eq!(
        concurrent_key_ids(&p, 4).await,
        vec!["ASIAPODIDENTITY00001"; 4]
    );
    assert_eq!(agent.credential_requests(), 1);

    // 4 min 59 s before expiry: one caller fetches new credentials, the others go on with the
    // old ones, which are still valid.
    agent.set_expiration(clock.at(7200));
    clock.set(3301);
    assert!(clock.now() < expires);
    let keys = concurrent_key_ids(&p, 8).await;
    assert_eq!(count(&keys, "ASIAPODIDENTITY00002"), 1, "{keys:?}");
    assert_eq!(count(&keys, "ASIAPODIDENTITY00001"), 7, "{keys:?}");
    assert_eq!(agent.credential_requests(), 2);
    assert_eq!(
        p.credentials().await.unwrap().access_key_id,
        "ASIAPODIDENTITY00002"
    );
    assert_eq!(agent.credential_requests(), 2);

    // Past expiry (a process that slept): everybody waits for one fetch. The token file was
    // rotated meanwhile; the new token is read.
    std::fs::write(&token_file, "pod-token-2\n").unwrap();
    agent.set_expiration(clock.at(10_800));
    clock.set(7300);
    assert_eq!(
        concurrent_key_ids(&p, 8).await,
        vec!["ASIAPODIDENTITY00003"; 8]
    );
    assert_eq!(agent.credential_requests(), 3);
    assert_eq!(agent.refused(), 0);
    assert_eq!(p.fetches(), 3);
}

#[tokio::test]
async fn a_refused_pod_identity_token_is_named_without_showing_it() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "the-right-token").unwrap();
    let agent = PodIdentityEndpoint::start(&token_file).await;
    let p = AwsCredentialsProvider::from_vars([
        ("AWS_CONTAINER_CREDENTIALS_FULL_URI", agent.full_uri()),
        (
            "AWS_CONTAINER_AUTHORIZATION_TOKEN",
            "wrong-token-hunter2".into(),
        ),
    ])
    .unwrap();
    let err = p.credentials().await.unwrap_err().to_string();
    assert!(
        err.contains("container credentials endpoint")
            && err.contains("401")
            && err.contains("pod identity association"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");
    assert_eq!(agent.refused(), 1, "a refusal is not retried");
    assert_eq!(agent.credential_requests(), 0);

    // A token file that is missing names the file and the variable.
    let p = AwsCredentialsProvider::from_vars([
        ("AWS_CONTAINER_CREDENTIALS_FULL_URI", agent.full_uri()),
        (
            "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
            dir.path().join("missing").display().to_string(),
        ),
    ])
    .unwrap();
    let err = p.credentials().await.unwrap_err().to_string();
    assert!(
        err.contains("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE") && err.contains("missing"),
        "{err}"
    );
}

#[tokio::test]
async fn instance_profile_credentials_come_through_imdsv2_and_refresh_at_half_life() {
    let imds = ImdsEndpoint::start(Some("otm-node-role")).await;
    // IMDSv1 is refused: no token, no credentials.
    let v1 = reqwest::get(format!(
        "{}/latest/meta-data/iam/security-credentials/otm-node-role",
        imds.endpoint()
    ))
    .await
    .unwrap();
    assert_eq!(v1.status(), reqwest::StatusCode::UNAUTHORIZED);
    assert_eq!(imds.refused(), 1);

    let clock = TestClock::new();
    // Short-lived credentials: a minute, so the refresh comes at half-life, not 5 min early.
    imds.set_expiration(clock.at(60));
    let p = clock.install(
        AwsCredentialsProvider::from_vars([("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.endpoint())])
            .unwrap(),
    );
    assert_eq!(p.source(), CredentialSource::InstanceMetadata);
    let c = p.credentials().await.unwrap();
    assert_eq!(c.access_key_id, "ASIAINSTANCE00000001");
    assert_eq!(imds.token_requests(), 1);
    assert_eq!(imds.credential_requests(), 1);
    clock.set(29);
    assert_eq!(
        p.credentials().await.unwrap().access_key_id,
        "ASIAINSTANCE00000001"
    );
    imds.set_expiration(clock.at(120));
    clock.set(31);
    assert_eq!(
        p.credentials().await.unwrap().access_key_id,
        "ASIAINSTANCE00000002"
    );
    assert_eq!(imds.credential_requests(), 2);
    assert_eq!(imds.token_requests(), 2);
    assert_eq!(
        imds.refused(),
        1,
        "the provider always sends its session token"
    );

    // An instance without an instance profile.
    let bare = ImdsEndpoint::start(None).await;
    let p =
        AwsCredentialsProvider::from_vars([("AWS_EC2_METADATA_SERVICE_ENDPOINT", bare.endpoint())])
            .unwrap();
    let err = p.credentials().await.unwrap_err().to_string();
    assert!(err.contains("no instance profile"), "{err}");

    // Disabled: the endpoint is not asked.
    let msg = invalid_input(AwsCredentialsProvider::from_vars([
        ("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.endpoint()),
        ("AWS_EC2_METADATA_DISABLED", "true".into()),
    ]));
    assert!(msg.contains("AWS_EC2_METADATA_DISABLED"), "{msg}");

    // Not there: port 1 refuses the connection.
    let p = AwsCredentialsProvider::from_vars([(
        "AWS_EC2_METADATA_SERVICE_ENDPOINT",
        "http://127.0.0.1:1",
    )])
    .unwrap();
    let err = p.credentials().await.unwrap_err();
    assert!(
        matches!(err, Error::Unavailable { .. }) && err.to_string().contains("127.0.0.1:1"),
        "{err}"
    );
}

/// moto's endpoint, from `OTM_TEST_DYNAMODB_URL`, or `None` (and a note).
fn moto_endpoint(test: &str) -> Option<String> {
    let url = std::env::var("OTM_TEST_DYNAMODB_URL")
        .ok()
        .filter(|u| !u.is_empty());
    let Some(endpoint) = url.as_deref().and_then(|u| {
        u.split_once('?')?
            .1
            .split('&')
            .find_map(|p| p.strip_prefix("endpoint="))
    }) else {
        println!("skipped: {test}: OTM_TEST_DYNAMODB_URL with an endpoint= is not set");
        return None;
    };
    Some(endpoint.trim_end_matches('/').to_owned())
}

/// Variables for web identity through moto's STS; `dir` holds the token file.
fn web_identity_vars(dir: &std::path::Path, sts: &str) -> Vec<(String, String)> {
    let token_file = dir.join("web-identity-token");
    // A projected service account token is a JWT; moto accepts any that is shaped like one.
    std::fs::write(
        &token_file,
        "eyJhbGciOiJSUzI1NiIsImtpZCI6Im90bSJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6b3RtOm90bSJ9.c2lnbmF0dXJl\n",
    )
    .unwrap();
    [
        (
            "AWS_WEB_IDENTITY_TOKEN_FILE",
            token_file.display().to_string(),
        ),
        (
            "AWS_ROLE_ARN",
            "arn:aws:iam::123456789012:role/otm-control-plane".into(),
        ),
        ("AWS_ROLE_SESSION_NAME", "otm-test".into()),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_STS_REGIONAL_ENDPOINTS", "regional".into()),
        ("AWS_ENDPOINT_URL_STS", sts.into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

#[tokio::test]
async fn web_identity_assumes_the_role_through_sts() {
    let Some(sts) = moto_endpoint("web_identity_assumes_the_role_through_sts") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let p = AwsCredentialsProvider::from_vars(web_identity_vars(dir.path(), &sts)).unwrap();
    assert_eq!(p.source(), CredentialSource::WebIdentity);
    let c = p.credentials().await.unwrap();
    assert!(c.access_key_id.starts_with("ASIA"), "temporary credentials");
    assert!(c.session_token.is_some());
    assert!(c.expires_at.unwrap() > SystemTime::now());
    assert_eq!(p.fetches(), 1);
    let again = p.credentials().await.unwrap();
    assert_eq!(again.access_key_id, c.access_key_id, "cached");
    assert_eq!(p.fetches(), 1);

    // The token file is read on every fetch: a missing one is named.
    let mut vars = web_identity_vars(dir.path(), &sts);
    for (k, v) in &mut vars {
        if k == "AWS_WEB_IDENTITY_TOKEN_FILE" {
            *v = dir.path().join("gone").display().to_string();
        }
    }
    let err = AwsCredentialsProvider::from_vars(vars)
        .unwrap()
        .credentials()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("AWS_WEB_IDENTITY_TOKEN_FILE") && err.contains("gone"),
        "{err}"
    );
}

/// Two projected service account tokens, before and after the kubelet rotates one. JWT-shaped,
/// and of characters a form body carries as they are, so the recorded bodies show them verbatim.
const WEB_IDENTITY_TOKEN_1: &str = "eyJhbGciOiJSUzI1NiIsImtpZCI6Im90bSJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6b3RtOm90bSJ9.cm90YXRpb24tMQ";
const WEB_IDENTITY_TOKEN_2: &str = "eyJhbGciOiJSUzI1NiIsImtpZCI6Im90bSJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6b3RtOm90bSJ9.cm90YXRpb24tMg";

/// A loopback proxy in front of moto's STS that keeps the form body of every request before
/// passing it on unchanged, so a test counts the `AssumeRoleWithWebIdentity` calls and sees which
/// token each one carried. Stops when dropped.
struct StsRecorder {
    url: String,
    state: Arc<RecorderState>,
    task: tokio::task::JoinHandle<()>,
}

struct RecorderState {
    upstream: String,
    http: reqwest::Client,
    bodies: Mutex<Vec<String>>,
}

impl StsRecorder {
    async fn start(upstream: &str) -> StsRecorder {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("STS recorder: cannot bind 127.0.0.1:0");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(RecorderState {
            upstream: upstream.to_owned(),
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
            bodies: Mutex::new(Vec::new()),
        });
        let app = axum::Router::new()
            .fallback(forward_to_sts)
            .with_state(state.clone());
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .await
                .expect("STS recorder failed");
        });
        StsRecorder { url, state, task }
    }

    fn bodies(&self) -> Vec<String> {
        self.state
            .bodies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// How many requests reached STS.
    fn requests(&self) -> usize {
        self.bodies().len()
    }

    /// The value of `name`, as sent (form-encoded), in the `n`th request (from 0).
    fn param(&self, n: usize, name: &str) -> Option<String> {
        let bodies = self.bodies();
        bodies.get(n)?.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            (k == name).then(|| v.to_owned())
        })
    }
}

impl Drop for StsRecorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward_to_sts(
    axum::extract::State(state): axum::extract::State<Arc<RecorderState>>,
    method: axum::http::Method,
    uri: axum::http::Uri,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> axum::response::Response {
    use axum::http::header::{ACCEPT, CONTENT_TYPE};
    use axum::response::IntoResponse;
    state
        .bodies
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(String::from_utf8_lossy(&body).into_owned());
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut request = state
        .http
        .request(method, format!("{}{path}", state.upstream))
        .body(body);
    for name in [CONTENT_TYPE, ACCEPT] {
        if let Some(value) = headers.get(&name) {
            request = request.header(name, value);
        }
    }
    let answer = match request.send().await {
        Ok(answer) => answer,
        Err(e) => return (axum::http::StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    };
    let status = answer.status();
    let content_type = answer.headers().get(CONTENT_TYPE).cloned();
    let body = answer.bytes().await.unwrap_or_default();
    let mut response = (status, body).into_response();
    if let Some(content_type) = content_type {
        response.headers_mut().insert(CONTENT_TYPE, content_type);
    }
    response
}

#[tokio::test]
async fn web_identity_credentials_are_refreshed_before_they_expire() {
    let Some(moto) = moto_endpoint("web_identity_credentials_are_refreshed_before_they_expire")
    else {
        return;
    };
    let sts = StsRecorder::start(&moto).await;
    let dir = tempfile::tempdir().unwrap();
    let vars = web_identity_vars(dir.path(), &sts.url);
    let token_file = dir.path().join("web-identity-token");
    std::fs::write(&token_file, format!("{WEB_IDENTITY_TOKEN_1}\n")).unwrap();
    let clock = TestClock::new();
    let p = clock.install(AwsCredentialsProvider::from_vars(vars).unwrap());
    assert_eq!(p.source(), CredentialSource::WebIdentity);
    assert_eq!(sts.requests(), 0, "choosing a source sends nothing");

    let first = p.credentials().await.unwrap();
    assert!(
        first.access_key_id.starts_with("ASIA"),
        "temporary credentials"
    );
    // No DurationSeconds is sent, so STS (and moto) issue them for an hour, counted on this
    // machine's clock, where the test clock started just before.
    let expires = first.expires_at.expect("temporary credentials expire");
    assert!(
        expires > clock.at(3590) && expires < clock.at(3660),
        "{expires:?} is not an hour after {:?}",
        clock.at(0)
    );
    assert_eq!(sts.requests(), 1);
    assert_eq!(
        sts.param(0, "Action").as_deref(),
        Some("AssumeRoleWithWebIdentity")
    );
    assert_eq!(
        sts.param(0, "RoleArn").as_deref(),
        Some("arn%3Aaws%3Aiam%3A%3A123456789012%3Arole%2Fotm-control-plane")
    );
    assert_eq!(sts.param(0, "RoleSessionName").as_deref(), Some("otm-test"));
    assert_eq!(
        sts.param(0, "WebIdentityToken").as_deref(),
        Some(WEB_IDENTITY_TOKEN_1)
    );

    // Cached: until 5 minutes before expiry nobody asks STS again.
    clock.set(3000);
    let keys = concurrent_key_ids(&p, 4).await;
    assert_eq!(count(&keys, &first.access_key_id), 4, "{keys:?}");
    assert_eq!(sts.requests(), 1);

    // Due for a refresh while the kubelet rotates the token, the file gone for a moment: the
    // refresh fails before STS is asked, and the current credentials, still valid, are used.
    std::fs::remove_file(&token_file).unwrap();
    clock.set(3400);
    assert!(clock.now() < expires);
    assert_eq!(
        p.credentials().await.unwrap().access_key_id,
        first.access_key_id
    );
    assert_eq!(sts.requests(), 1);
    assert_eq!(p.fetches(), 1);

    // The rotated token is there: one caller exchanges it for new credentials, before the old
    // ones expire; the others go on with the old ones meanwhile.
    std::fs::write(&token_file, format!("{WEB_IDENTITY_TOKEN_2}\n")).unwrap();
    let keys = concurrent_key_ids(&p, 8).await;
    assert_eq!(count(&keys, &first.access_key_id), 7, "{keys:?}");
    let second = keys
        .iter()
        .find(|k| **k != first.access_key_id)
        .expect("one caller got new credentials")
        .clone();
    assert!(second.starts_with("ASIA"), "{second}");
    assert_eq!(sts.requests(), 2);
    assert_eq!(
        sts.param(1, "WebIdentityToken").as_deref(),
        Some(WEB_IDENTITY_TOKEN_2),
        "the refresh read the token file again"
    );
    assert!(clock.now() < expires);
    let refreshed = p.credentials().await.unwrap();
    assert_eq!(refreshed.access_key_id, second, "the new ones are cached");
    assert!(refreshed.expires_at.expect("temporary credentials expire") >= expires);
    assert_eq!(sts.requests(), 2);
    assert_eq!(p.fetches(), 2);
}

#[cfg(all(feature = "dynamodb", feature = "s3"))]
mod end_to_end {
    use super::*;
    use object_store::ObjectStoreExt;
    use object_store::path::Path as ObjectPath;
    use otm_core::{Tenant, TenantId, TenantStore};
    use otm_store::DynamoRegistry;

    /// The S3 state store and then the DynamoDB registry, both on `provider` (fresh), each doing
    /// real work against moto: the store fetches the credentials, the registry signs with the
    /// same ones.
    async fn store_and_registry_work(provider: &AwsCredentialsProvider) {
        assert_eq!(provider.fetches(), 0);
        let suffix = otm_core::id::random_hex(4);
        let s3 = std::env::var("OTM_TEST_S3_URL")
            .ok()
            .filter(|u| !u.is_empty())
            .expect("OTM_TEST_S3_URL is set with OTM_TEST_DYNAMODB_URL");
        let rest = s3.strip_prefix("s3://").unwrap();
        let (location, query) = rest.split_once('?').unwrap_or((rest, ""));
        let bucket = location.split('/').next().unwrap();
        let endpoint = query
            .split('&')
            .find_map(|p| p.strip_prefix("endpoint="))
            .unwrap();
        // moto takes an unsigned PUT to create the bucket (it exists already on a second run).
        reqwest::Client::new()
            .put(format!("{}/{bucket}", endpoint.trim_end_matches('/')))
            .send()
            .await
            .unwrap();
        let url = format!("s3://{bucket}/creds-{suffix}?{query}");
        let store =
            otm_store::open::s3_state_store_with_credentials(&url, provider.clone()).unwrap();
        let path = ObjectPath::from(format!("creds-{suffix}/probe"));
        store
            .object_store()
            .put(&path, b"signed".to_vec().into())
            .await
            .unwrap();
        let got = store
            .object_store()
            .get(&path)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(&got[..], b"signed");
        store.object_store().delete(&path).await.unwrap();
        assert_eq!(
            provider.fetches(),
            1,
            "the S3 store took its credentials from the provider"
        );

        let dynamo = std::env::var("OTM_TEST_DYNAMODB_URL").unwrap();
        let (base, query) = dynamo.split_once('?').unwrap();
        let url = format!("{}-creds-{suffix}?{query}", base.trim_end_matches('/'));
        let registry = DynamoRegistry::open_with_credentials(&url, provider.clone())
            .await
            .unwrap();
        assert_eq!(registry.credential_source(), provider.source());
        registry.create_tables().await.unwrap();
        let tenant = TenantId::parse("creds").unwrap();
        registry
            .create_tenant(&Tenant::new(tenant.clone(), "reference", None))
            .await
            .unwrap();
        assert_eq!(registry.list_tenants().await.unwrap().len(), 1);
        registry.delete_tables().await.unwrap();
        assert_eq!(
            provider.fetches(),
            1,
            "the registry signed with the credentials the store fetched"
        );
    }

    #[tokio::test]
    async fn dynamodb_and_s3_with_web_identity() {
        let Some(sts) = moto_endpoint("dynamodb_and_s3_with_web_identity") else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let p = AwsCredentialsProvider::from_vars(web_identity_vars(dir.path(), &sts)).unwrap();
        store_and_registry_work(&p).await;
        assert_eq!(p.source(), CredentialSource::WebIdentity);
        assert!(
            p.credentials()
                .await
                .unwrap()
                .access_key_id
                .starts_with("ASIA")
        );
    }

    #[tokio::test]
    async fn dynamodb_and_s3_with_pod_identity() {
        if moto_endpoint("dynamodb_and_s3_with_pod_identity").is_none() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join("eks-pod-identity-token");
        std::fs::write(&token_file, "pod-token").unwrap();
        let agent = PodIdentityEndpoint::start(&token_file).await;
        let p = AwsCredentialsProvider::from_vars([
            ("AWS_CONTAINER_CREDENTIALS_FULL_URI", agent.full_uri()),
            (
                "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
                token_file.display().to_string(),
            ),
        ])
        .unwrap();
        store_and_registry_work(&p).await;
        assert_eq!(p.source(), CredentialSource::ContainerEndpoint);
        assert_eq!(
            agent.issued(),
            vec!["ASIAPODIDENTITY00001"],
            "both backends signed with the one set the agent handed out"
        );
        assert_eq!(
            p.credentials().await.unwrap().access_key_id,
            "ASIAPODIDENTITY00001"
        );
    }

    #[tokio::test]
    async fn dynamodb_and_s3_with_the_instance_profile() {
        if moto_endpoint("dynamodb_and_s3_with_the_instance_profile").is_none() {
            return;
        }
        let imds = ImdsEndpoint::start(Some("otm-node-role")).await;
        let p = AwsCredentialsProvider::from_vars([(
            "AWS_EC2_METADATA_SERVICE_ENDPOINT",
            imds.endpoint(),
        )])
        .unwrap();
        store_and_registry_work(&p).await;
        assert_eq!(p.source(), CredentialSource::InstanceMetadata);
        assert_eq!(imds.issued(), vec!["ASIAINSTANCE00000001"]);
        assert_eq!(imds.token_requests(), 1);
        assert_eq!(imds.refused(), 0);
    }
}
