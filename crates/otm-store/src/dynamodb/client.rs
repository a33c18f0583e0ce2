//! A small client for DynamoDB's JSON API: one signed `POST` per operation.
//!
//! Requests carry `X-Amz-Target: DynamoDB_20120810.<Op>` and a JSON body, signed with AWS
//! Signature Version 4 with credentials from an [`AwsCredentialsProvider`]. Throttling, server
//! errors, refused connections and expired credentials are retried here with jittered backoff; everything else goes back to the caller as
//! [`ApiError`], which the registry maps to [`otm_core::Error`].

use crate::aws_credentials::{AwsCredentials, AwsCredentialsProvider, CredentialSource};
use hmac::{Hmac, KeyInit, Mac};
use otm_core::{Backoff, Error};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::BACKEND;

const SERVICE: &str = "dynamodb";
const CONTENT_TYPE: &str = "application/x-amz-json-1.0";
const TARGET_PREFIX: &str = "DynamoDB_20120810.";
/// Tries per call, the first one included, for errors that say "try again".
const ATTEMPTS: u32 = 8;
/// Tries when the connection is refused: an endpoint that is down stays down for a while.
const CONNECT_ATTEMPTS: u32 = 3;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// What a failed call answered.
#[derive(Debug)]
pub(crate) enum ApiError {
    /// DynamoDB answered with an error document.
    Service {
        status: u16,
        /// The short error name: `ConditionalCheckFailedException`, `ResourceNotFoundException`…
        code: String,
        message: String,
        /// The whole error document (cancellation reasons, the item on a failed condition).
        body: Value,
    },
    /// No usable answer: connection refused, timeout, a body that is not JSON.
    Transport { message: String },
    /// No credentials to sign with; the error names their source and what to set.
    Credentials(Error),
}

impl ApiError {
    /// The short error name, empty for transport errors.
    pub fn code(&self) -> &str {
        match self {
            ApiError::Service { code, .. } => code,
            ApiError::Transport { .. } | ApiError::Credentials(_) => "",
        }
    }

    /// True for a failed `ConditionExpression` of a single-item write.
    pub fn is_condition_failed(&self) -> bool {
        self.code() == "ConditionalCheckFailedException"
    }

    /// The item DynamoDB returned with a failed condition
    /// (`ReturnValuesOnConditionCheckFailure: ALL_OLD`), if any.
    pub fn failed_item(&self) -> Option<&serde_json::Map<String, Value>> {
        match self {
            ApiError::Service { body, .. } => body.get("Item")?.as_object(),
            ApiError::Transport { .. } | ApiError::Credentials(_) => None,
        }
    }

    /// For a cancelled transaction, each action's cancellation code (`None` for actions that
    /// were fine, `ConditionalCheckFailed`, `TransactionConflict`…).
    pub fn cancellation_codes(&self) -> Option<Vec<String>> {
        match self {
            ApiError::Service { code, body, .. } if code == "TransactionCanceledException" => {
                let reasons = body.get("CancellationReasons")?.as_array()?;
                Some(
                    reasons
                        .iter()
                        .map(|r| {
                            r.get("Code")
                                .and_then(Value::as_str)
                                .unwrap_or("None")
                                .to_owned()
                        })
                        .collect(),
                )
            }
            _ => None,
        }
    }

    /// Errors after which the same request may succeed.
    fn retryable(&self) -> bool {
        match self {
            ApiError::Service { status, code, .. } => {
                *status >= 500
                    || matches!(
                        code.as_str(),
                        "ThrottlingException"
                            | "ProvisionedThroughputExceededException"
                            | "RequestLimitExceeded"
                            | "InternalServerError"
                            | "ServiceUnavailable"
                            | "TransactionInProgressException"
                            | "TransactionConflictException"
                    )
            }
            ApiError::Transport { .. } | ApiError::Credentials(_) => false,
        }
    }

    /// As the error a registry caller sees.
    pub fn into_error(self) -> Error {
        match self {
            ApiError::Credentials(e) => e,
            ApiError::Transport { message } => Error::unavailable(BACKEND, message),
            e if e.retryable() => {
                Error::unavailable(BACKEND, format!("DynamoDB is overloaded or failing: {e}"))
            }
            ApiError::Service { code, message, .. } if code == "ResourceNotFoundException" => {
                Error::generic(
                    BACKEND,
                    format!(
                        "{message}: a registry table is missing; create the tables (DynamoRegistry::create_tables, \
                         or by hand as docs/dynamodb-tables.json describes)"
                    ),
                )
            }
            ApiError::Service {
                code,
                message,
                status,
                ..
            } if matches!(
                code.as_str(),
                "UnrecognizedClientException"
                    | "InvalidSignatureException"
                    | "AccessDeniedException"
                    | "MissingAuthenticationTokenException"
                    | "ExpiredTokenException"
            ) =>
            {
                Error::generic(
                    BACKEND,
                    format!(
                        "DynamoDB refused the credentials ({status} {code}: {message}); check where they \
                         come from (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, the service account's \
                         role, the instance profile) and the IAM policy"
                    ),
                )
            }
            e => Error::generic(BACKEND, e.to_string()),
        }
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiError::Service {
                status,
                code,
                message,
                ..
            } => write!(f, "{code} ({status}): {message}"),
            ApiError::Transport { message } => f.write_str(message),
            ApiError::Credentials(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for ApiError {}

/// The client: an endpoint, a region and credentials.
pub(crate) struct Client {
    http: reqwest::Client,
    url: reqwest::Url,
    /// The `Host` header as sent (and signed): host, and port when not the scheme's default.
    host: String,
    region: String,
    credentials: AwsCredentialsProvider,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("endpoint", &self.url.as_str())
            .field("region", &self.region)
            .field("credentials", &self.credentials.source().name())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client for `endpoint` (`https://dynamodb.us-east-1.amazonaws.com`).
    pub fn new(
        endpoint: &str,
        region: &str,
        credentials: AwsCredentialsProvider,
    ) -> Result<Self, Error> {
        let url = reqwest::Url::parse(endpoint).map_err(|e| {
            Error::invalid(format!(
                "the DynamoDB endpoint `{endpoint}` is not a URL: {e}"
            ))
        })?;
        if !matches!(url.scheme(), "http" | "https") || url.query().is_some() {
            return Err(Error::invalid(format!(
                "the DynamoDB endpoint `{endpoint}` must be an http:// or https:// URL without a query"
            )));
        }
        let Some(host) = url.host_str() else {
            return Err(Error::invalid(format!(
                "the DynamoDB endpoint `{endpoint}` names no host"
            )));
        };
        let host = match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        };
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|e| Error::generic(BACKEND, format!("cannot build the HTTP client: {e}")))?;
        Ok(Client {
            http,
            url,
            host,
            region: region.to_owned(),
            credentials,
        })
    }

    /// The endpoint, for messages.
    pub fn endpoint(&self) -> &str {
        self.url.as_str()
    }

    /// Where the credentials come from.
    pub fn credential_source(&self) -> CredentialSource {
        self.credentials.source()
    }

    /// Runs one operation, retrying what may succeed on a later try.
    pub async fn call(&self, op: &str, body: &Value) -> Result<Value, ApiError> {
        let payload = serde_json::to_vec(body).map_err(|e| ApiError::Transport {
            message: format!("cannot encode a {op} request: {e}"),
        })?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.send(op, &payload).await {
                Ok(v) => return Ok(v),
                Err(e) if e.retryable && attempt < e.max_attempts() => {
                    tracing::debug!(op, attempt, error = %e.error, "retrying a DynamoDB call");
                    tokio::time::sleep(BACKOFF.delay(attempt)).await;
                }
                Err(e) => return Err(e.error),
            }
        }
    }

    async fn send(&self, op: &str, payload: &[u8]) -> Result<Value, Attempt> {
        let credentials = self.credentials.credentials().await.map_err(|e| Attempt {
            retryable: false,
            error: ApiError::Credentials(e),
        })?;
        let target = format!("{TARGET_PREFIX}{op}");
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let amz_date = amz_date(now);
        let mut headers: Vec<(&str, &str)> = vec![
            ("content-type", CONTENT_TYPE),
            ("host", &self.host),
            ("x-amz-date", &amz_date),
            ("x-amz-target", &target),
        ];
        if let Some(token) = &credentials.session_token {
            headers.push(("x-amz-security-token", token.expose()));
        }
        let authorization = authorization(&Signing {
            method: "POST",
            path: self.url.path(),
            query: "",
            headers: &headers,
            payload,
            amz_date: &amz_date,
            region: &self.region,
            service: SERVICE,
            credentials: &credentials,
        });
        let mut req = self
            .http
            .post(self.url.clone())
            .header("authorization", authorization)
            .body(payload.to_vec());
        for (name, value) in &headers {
            // reqwest sets Host itself, from the URL, to the value signed above.
            if *name != "host" {
                req = req.header(*name, *value);
            }
        }
        let resp = req.send().await.map_err(|e| Attempt {
            // A refused connection never reached DynamoDB: safe to send again.
            retryable: e.is_connect(),
            error: ApiError::Transport {
                message: format!("cannot reach DynamoDB at {}: {e}", self.url),
            },
        })?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.map_err(|e| Attempt {
            retryable: false,
            error: ApiError::Transport {
                message: format!("reading DynamoDB's answer to {op} failed: {e}"),
            },
        })?;
        let body: Value = if bytes.is_empty() {
            Value::Object(Default::default())
        } else {
            serde_json::from_slice(&bytes).map_err(|e| {
                let error = ApiError::Transport {
                    message: format!(
                        "DynamoDB answered {op} with status {status} and a body that is not JSON: {e}"
                    ),
                };
                Attempt {
                    retryable: status >= 500,
                    error,
                }
            })?
        };
        if (200..300).contains(&status) {
            return Ok(body);
        }
        let code = body
            .get("__type")
            .and_then(Value::as_str)
            .map(|t| t.rsplit('#').next().unwrap_or(t).to_owned())
            .unwrap_or_else(|| format!("HTTP{status}"));
        let message = body
            .get("message")
            .or_else(|| body.get("Message"))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let error = ApiError::Service {
            status,
            code,
            message,
            body,
        };
        Err(Attempt {
            retryable: error.retryable(),
            error,
        }
        .expired_credentials(&self.credentials))
    }
}

struct Attempt {
    retryable: bool,
    error: ApiError,
}

impl Attempt {
    /// After DynamoDB said the credentials expired, the next try fetches new ones.
    fn expired_credentials(mut self, provider: &AwsCredentialsProvider) -> Self {
        if self.error.code() == "ExpiredTokenException" {
            provider.invalidate();
            self.retryable = true;
        }
        self
    }

    fn max_attempts(&self) -> u32 {
        match &self.error {
            // A server error without a JSON body (a proxy or a stand-in failing) is as worth
            // retrying as a declared one; a refused connection less so.
            ApiError::Transport { message } if message.contains("not JSON") => ATTEMPTS,
            ApiError::Transport { .. } => CONNECT_ATTEMPTS,
            ApiError::Service { code, .. } if code == "ExpiredTokenException" => 2,
            ApiError::Service { .. } | ApiError::Credentials(_) => ATTEMPTS,
        }
    }
}

/// Pauses between retries of one call: 25–37.5 ms, 50–75 ms, 100–150 ms … up to 1.6–2.4 s
/// (a base doubling from 25 ms up to 1.6 s, plus up to half of it again at random).
pub(crate) const BACKOFF: Backoff =
    Backoff::new(Duration::from_micros(37_500), Duration::from_millis(2_400))
        .with_jitter(1.0 / 3.0);

/// `YYYYMMDDTHHMMSSZ` for a Unix time in seconds.
fn amz_date(unix_s: u64) -> String {
    let days = (unix_s / 86_400) as i64;
    let secs = unix_s % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// What a SigV4 signature covers.
struct Signing<'a> {
    method: &'a str,
    /// The canonical URI: the path, already URI-encoded.
    path: &'a str,
    /// The canonical query string (sorted, encoded); empty here.
    query: &'a str,
    /// Lower-case names, every header that is signed.
    headers: &'a [(&'a str, &'a str)],
    payload: &'a [u8],
    amz_date: &'a str,
    region: &'a str,
    service: &'a str,
    credentials: &'a AwsCredentials,
}

type HmacSha256 = Hmac<Sha256>;

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

/// The `Authorization` header value of AWS Signature Version 4.
fn authorization(s: &Signing<'_>) -> String {
    let mut headers: Vec<(String, String)> = s
        .headers
        .iter()
        .map(|(n, v)| (n.to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    headers.sort();
    let signed_headers = headers
        .iter()
        .map(|(n, _)| n.as_str())
        .collect::<Vec<_>>()
        .join(";");
    let canonical_headers: String = headers.iter().map(|(n, v)| format!("{n}:{v}\n")).collect();
    let path = if s.path.is_empty() { "/" } else { s.path };
    let canonical_request = format!(
        "{}\n{path}\n{}\n{canonical_headers}\n{signed_headers}\n{}",
        s.method,
        s.query,
        hex::encode(Sha256::digest(s.payload))
    );
    let date = &s.amz_date[..8];
    let scope = format!("{date}/{}/{}/aws4_request", s.region, s.service);
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{}\n{scope}\n{}",
        s.amz_date,
        hex::encode(Sha256::digest(canonical_request.as_bytes()))
    );
    let secret = format!("AWS4{}", s.credentials.secret_access_key.expose());
    let key = hmac(secret.as_bytes(), date.as_bytes());
    let key = hmac(&key, s.region.as_bytes());
    let key = hmac(&key, s.service.as_bytes());
    let key = hmac(&key, b"aws4_request");
    let signature = hex::encode(hmac(&key, string_to_sign.as_bytes()));
    format!(
        "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed_headers}, Signature={signature}",
        s.credentials.access_key_id
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(token: Option<&str>) -> AwsCredentials {
        AwsCredentials {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: otm_core::Secret::new("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"),
            session_token: token.map(otm_core::Secret::new),
            expires_at: None,
        }
    }

    /// Reference signatures computed by botocore's `SigV4Auth` for the same request.
    #[test]
    fn signs_like_botocore() {
        let body = br#"{"TableName":"t"}"#;
        for (token, want) in [
            (
                None,
                "SignedHeaders=content-type;host;x-amz-date;x-amz-target, \
                 Signature=c08e0345783dafd4e526d3f984b2859fea499ff3199003495bcb23ec61bd67be",
            ),
            (
                Some("SESSIONTOKEN/+="),
                "SignedHeaders=content-type;host;x-amz-date;x-amz-security-token;x-amz-target, \
                 Signature=e0eabc4738bcc7b85a2a6032c8f0b8197fe878bb89246a5ad5b3c52383c578cd",
            ),
        ] {
            let creds = creds(token);
            let mut headers = vec![
                ("content-type", CONTENT_TYPE),
                ("host", "127.0.0.1:5055"),
                ("x-amz-date", "20150830T123600Z"),
                ("x-amz-target", "DynamoDB_20120810.GetItem"),
            ];
            if let Some(t) = token {
                headers.push(("x-amz-security-token", t));
            }
            let got = authorization(&Signing {
                method: "POST",
                path: "/",
                query: "",
                headers: &headers,
                payload: body,
                amz_date: "20150830T123600Z",
                region: "us-east-1",
                service: "dynamodb",
                credentials: &creds,
            });
            assert_eq!(
                got,
                format!(
                    "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/dynamodb/aws4_request, {want}"
                )
            );
        }
    }

    #[test]
    fn formats_amz_dates() {
        assert_eq!(amz_date(0), "19700101T000000Z");
        assert_eq!(amz_date(1_440_938_160), "20150830T123600Z");
        assert_eq!(amz_date(951_782_400), "20000229T000000Z");
        assert_eq!(amz_date(4_102_444_799), "20991231T235959Z");
    }

    #[test]
    fn reads_cancellation_reasons() {
        let e = ApiError::Service {
            status: 400,
            code: "TransactionCanceledException".into(),
            message: "cancelled".into(),
            body: serde_json::json!({"CancellationReasons": [{"Code": "None"}, {"Code": "ConditionalCheckFailed"}]}),
        };
        assert_eq!(
            e.cancellation_codes().unwrap(),
            vec!["None", "ConditionalCheckFailed"]
        );
        assert!(!e.retryable());
        assert!(matches!(e.into_error(), Error::Generic { .. }));
        let throttled = ApiError::Service {
            status: 400,
            code: "ThrottlingException".into(),
            message: String::new(),
            body: Value::Null,
        };
        assert!(throttled.retryable());
        assert!(matches!(throttled.into_error(), Error::Unavailable { .. }));
    }
}
