//! Stand-ins for the two AWS credential endpoints a pod or an instance asks, on `127.0.0.1:0`:
//!
//! - [`PodIdentityEndpoint`]: the EKS Pod Identity agent (`GET /v1/credentials`), which checks
//!   the `Authorization` header against the content of the token file it was given (read on
//!   every request, so a test can rotate it) and answers `AccessKeyId`, `SecretAccessKey`,
//!   `Token`, `AccountId` and `Expiration` as JSON.
//! - [`ImdsEndpoint`]: the EC2 instance metadata service, IMDSv2 only: `PUT /latest/api/token`
//!   with `X-aws-ec2-metadata-token-ttl-seconds` hands out a session token; every `GET` without
//!   a valid one is refused with 401; `/latest/meta-data/iam/security-credentials/` names the
//!   instance profile's role and `…/security-credentials/{role}` holds its credentials.
//!
//! Each hand-out has a new access key id (`ASIAPODIDENTITY00001`, `ASIAINSTANCE00000001`…), so a
//! test sees which source, and which fetch, signed a request. Expiry is an hour from the request
//! unless a test sets a lifetime or a fixed expiration time, to show refreshing before expiry.
//! Both count what they answered and refused.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The account id the stand-ins report.
pub const ACCOUNT_ID: &str = "123456789012";

enum Kind {
    PodIdentity { token_file: PathBuf },
    Imds { role: Option<String> },
}

struct Shared {
    kind: Kind,
    state: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    /// Access key ids handed out, in order.
    issued: Vec<String>,
    /// Requests refused for a missing or wrong token.
    refused: usize,
    /// IMDS session tokens handed out.
    session_tokens: Vec<String>,
    lifetime: Option<Duration>,
    expiration: Option<SystemTime>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Counts> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new set of credentials: the key id and the JSON fields.
    fn issue(&self, prefix: &str, width: usize) -> (String, String, String, String) {
        let mut counts = self.lock();
        let n = counts.issued.len() + 1;
        let key_id = format!("{prefix}{n:0width$}");
        counts.issued.push(key_id.clone());
        let expiration = counts.expiration.unwrap_or_else(|| {
            SystemTime::now() + counts.lifetime.unwrap_or(Duration::from_secs(3600))
        });
        let expiration = chrono::DateTime::<chrono::Utc>::from(expiration)
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let secret = format!("{}-secret-{n}", prefix.to_ascii_lowercase());
        let token = format!("{}-session-{n}", prefix.to_ascii_lowercase());
        (key_id, secret, token, expiration)
    }
}

/// A running stand-in. Stops when dropped.
struct Server {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Server {
    async fn start(kind: Kind) -> Server {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("aws metadata stand-in: cannot bind 127.0.0.1:0");
        let addr = listener
            .local_addr()
            .expect("aws metadata stand-in: local address");
        let shared = Arc::new(Shared {
            kind,
            state: Mutex::new(Counts::default()),
        });
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let server = axum::serve(listener, app).with_graceful_shutdown(async {
                let _ = stopped.await;
            });
            if let Err(e) = server.await {
                tracing::warn!(error = %e, "aws metadata stand-in failed");
            }
        });
        Server {
            addr,
            shared,
            stop: Some(stop),
            task: Some(task),
        }
    }

    async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The settings and counters both stand-ins share.
macro_rules! common_methods {
    () => {
        /// Access key ids handed out so far, oldest first.
        pub fn issued(&self) -> Vec<String> {
            self.server.shared.lock().issued.clone()
        }

        /// How many credential documents were handed out.
        pub fn credential_requests(&self) -> usize {
            self.server.shared.lock().issued.len()
        }

        /// Requests refused for a missing or wrong token.
        pub fn refused(&self) -> usize {
            self.server.shared.lock().refused
        }

        /// Credentials handed out from now on expire this long after their request.
        pub fn set_lifetime(&self, lifetime: Duration) {
            let mut counts = self.server.shared.lock();
            counts.lifetime = Some(lifetime);
            counts.expiration = None;
        }

        /// Credentials handed out from now on expire at `at`.
        pub fn set_expiration(&self, at: SystemTime) {
            self.server.shared.lock().expiration = Some(at);
        }

        /// The address the stand-in listens on.
        pub fn addr(&self) -> SocketAddr {
            self.server.addr
        }

        /// Stops the server and waits for it.
        pub async fn shutdown(mut self) {
            self.server.shutdown().await;
        }
    };
}

/// The EKS Pod Identity agent stand-in. See the [module docs](self).
pub struct PodIdentityEndpoint {
    server: Server,
}

impl fmt::Debug for PodIdentityEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PodIdentityEndpoint")
            .field("addr", &self.server.addr)
            .finish_non_exhaustive()
    }
}

impl PodIdentityEndpoint {
    /// Starts the agent; requests must carry the content of `token_file` (as it is at the time
    /// of the request, whitespace trimmed) as their `Authorization` header.
    ///
    /// # Panics
    /// If no local port can be bound.
    pub async fn start(token_file: &Path) -> PodIdentityEndpoint {
        PodIdentityEndpoint {
            server: Server::start(Kind::PodIdentity {
                token_file: token_file.to_owned(),
            })
            .await,
        }
    }

    /// The value for `AWS_CONTAINER_CREDENTIALS_FULL_URI`, e.g.
    /// `http://127.0.0.1:40123/v1/credentials`.
    pub fn full_uri(&self) -> String {
        format!("http://{}/v1/credentials", self.server.addr)
    }

    common_methods!();
}

/// The IMDSv2 stand-in. See the [module docs](self).
pub struct ImdsEndpoint {
    server: Server,
}

impl fmt::Debug for ImdsEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImdsEndpoint")
            .field("addr", &self.server.addr)
            .finish_non_exhaustive()
    }
}

impl ImdsEndpoint {
    /// Starts the service for an instance whose profile has the role `role` (`None`: an
    /// instance without an instance profile).
    ///
    /// # Panics
    /// If no local port can be bound.
    pub async fn start(role: Option<&str>) -> ImdsEndpoint {
        ImdsEndpoint {
            server: Server::start(Kind::Imds {
                role: role.map(str::to_owned),
            })
            .await,
        }
    }

    /// The value for `AWS_EC2_METADATA_SERVICE_ENDPOINT`, e.g. `http://127.0.0.1:40123`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.server.addr)
    }

    /// How many session tokens were handed out.
    pub fn token_requests(&self) -> usize {
        self.server.shared.lock().session_tokens.len()
    }

    common_methods!();
}

fn refuse(shared: &Shared, status: StatusCode, body: String) -> Response {
    shared.lock().refused += 1;
    (status, body).into_response()
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    match &shared.kind {
        Kind::PodIdentity { token_file } => {
            if method != Method::GET || uri.path() != "/v1/credentials" {
                return StatusCode::NOT_FOUND.into_response();
            }
            let want = std::fs::read_to_string(token_file).unwrap_or_default();
            let want = want.trim();
            if want.is_empty() || header("authorization") != Some(want) {
                return refuse(
                    &shared,
                    StatusCode::UNAUTHORIZED,
                    json!({"code": "AccessDeniedException", "message": "the service account token is not valid"})
                        .to_string(),
                );
            }
            let (key_id, secret, token, expiration) = shared.issue("ASIAPODIDENTITY", 5);
            axum::Json(json!({
                "AccessKeyId": key_id,
                "SecretAccessKey": secret,
                "Token": token,
                "AccountId": ACCOUNT_ID,
                "Expiration": expiration,
            }))
            .into_response()
        }
        Kind::Imds { role } => {
            if method == Method::PUT && uri.path() == "/latest/api/token" {
                let ttl = header("x-aws-ec2-metadata-token-ttl-seconds")
                    .and_then(|v| v.parse::<u32>().ok())
                    .filter(|ttl| (1..=21_600).contains(ttl));
                if ttl.is_none() {
                    return (
                        StatusCode::BAD_REQUEST,
                        "X-aws-ec2-metadata-token-ttl-seconds must be 1 to 21600",
                    )
                        .into_response();
                }
                let mut counts = shared.lock();
                let token = format!("imds-session-{}", counts.session_tokens.len() + 1);
                counts.session_tokens.push(token.clone());
                return token.into_response();
            }
            if method != Method::GET {
                return StatusCode::METHOD_NOT_ALLOWED.into_response();
            }
            let valid = header("x-aws-ec2-metadata-token")
                .is_some_and(|t| shared.lock().session_tokens.iter().any(|s| s == t));
            if !valid {
                // IMDSv1 (no token) is off, as on an instance that requires IMDSv2.
                return refuse(&shared, StatusCode::UNAUTHORIZED, String::new());
            }
            let Some(rest) = uri
                .path()
                .strip_prefix("/latest/meta-data/iam/security-credentials/")
            else {
                return StatusCode::NOT_FOUND.into_response();
            };
            let Some(role) = role else {
                return StatusCode::NOT_FOUND.into_response();
            };
            if rest.is_empty() {
                return role.clone().into_response();
            }
            if rest != role {
                return StatusCode::NOT_FOUND.into_response();
            }
            let (key_id, secret, token, expiration) = shared.issue("ASIAINSTANCE", 8);
            let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
            axum::Json(json!({
                "Code": "Success",
                "LastUpdated": now,
                "Type": "AWS-HMAC",
                "AccessKeyId": key_id,
                "SecretAccessKey": secret,
                "Token": token,
                "Expiration": expiration,
            }))
            .into_response()
        }
    }
}
