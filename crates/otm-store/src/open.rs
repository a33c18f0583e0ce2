//! Backend choice by URL.
//!
//! Each enum lists every backend otm knows, compiled in or not, so a configuration that names a
//! missing one fails with "not in this build (rebuild with the cargo feature …)" instead of
//! "unknown". URLs may carry passwords: errors name only the scheme, and the enums keep such
//! URLs as [`Secret`]s.

use crate::{MemoryCoordinator, ObjectStateStore, RegistryMetrics, SqliteRegistry};
use otm_core::{Coordinator, Error, Registry, Result, Secret, StateStore};
use std::path::PathBuf;
use std::sync::Arc;

const REGISTRY_FORMS: &str = "sqlite:///absolute/path.db, sqlite://relative/path.db or sqlite:path.db, postgres://… or dynamodb://…";
const COORDINATOR_FORMS: &str = "memory or redis://…";
const STATE_STORE_FORMS: &str =
    "file:///absolute/dir, a plain directory path, or s3://bucket/prefix";

/// A registry backend, parsed from its URL.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RegistryBackend {
    /// The embedded SQLite file (`sqlite://path`, `sqlite:path`).
    Sqlite { path: PathBuf },
    /// PostgreSQL (`postgres://…`, `postgresql://…`); cargo feature `postgres`.
    Postgres { url: Secret },
    /// DynamoDB (`dynamodb://table`); cargo feature `dynamodb`.
    DynamoDb { url: Secret },
}

/// A coordinator backend, parsed from its URL.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CoordinatorBackend {
    /// In-process (`memory`); for a single `otm server`.
    Memory,
    /// Redis (`redis://…`, `rediss://…`); cargo feature `redis`.
    Redis { url: Secret },
}

/// A state store backend, parsed from its URL.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StateStoreBackend {
    /// A local directory (`file:///dir` or a plain path).
    Local { dir: PathBuf },
    /// S3 or an S3-compatible store (`s3://bucket/prefix`); cargo feature `s3`.
    S3 { url: String },
    /// Google Cloud Storage (`gs://bucket/prefix`); cargo feature `gcs` (object_store's `gcp`).
    Gcs { url: String },
    /// Azure Blob Storage (`az://container/prefix`); cargo feature `azure`.
    Azure { url: String },
}

/// Splits `scheme://rest`; `None` when there is no `://`.
fn scheme(url: &str) -> Option<(&str, &str)> {
    url.split_once("://")
}

fn unsupported(kind: &str, scheme: &str, forms: &str) -> Error {
    Error::invalid(format!(
        "{kind} URL scheme `{scheme}` is not supported; use {forms}"
    ))
}

// Unused in a build with every backend.
#[cfg_attr(
    all(
        feature = "postgres",
        feature = "redis",
        feature = "dynamodb",
        feature = "s3"
    ),
    allow(dead_code)
)]
fn not_in_build(kind: &'static str, backend: &str, feature: &'static str) -> Error {
    Error::NotInBuild {
        kind,
        backend: backend.to_owned(),
        feature,
    }
}

impl RegistryBackend {
    /// Parses a registry URL.
    pub fn parse(url: &str) -> Result<Self> {
        let url = url.trim();
        let path = match scheme(url) {
            Some(("sqlite", rest)) => rest,
            Some(("postgres" | "postgresql", _)) => {
                return Ok(RegistryBackend::Postgres {
                    url: Secret::new(url),
                });
            }
            Some(("dynamodb", _)) => {
                return Ok(RegistryBackend::DynamoDb {
                    url: Secret::new(url),
                });
            }
            Some((other, _)) => return Err(unsupported("registry", other, REGISTRY_FORMS)),
            None => match url.strip_prefix("sqlite:") {
                Some(rest) => rest,
                None => {
                    return Err(Error::invalid(format!(
                        "the registry must be given as a URL: {REGISTRY_FORMS}"
                    )));
                }
            },
        };
        if path.is_empty() {
            return Err(Error::invalid(format!(
                "the sqlite registry URL names no file; use {REGISTRY_FORMS}"
            )));
        }
        Ok(RegistryBackend::Sqlite {
            path: PathBuf::from(path),
        })
    }

    /// The backend's name, as errors and logs show it.
    pub fn name(&self) -> &'static str {
        match self {
            RegistryBackend::Sqlite { .. } => "sqlite",
            RegistryBackend::Postgres { .. } => "postgres",
            RegistryBackend::DynamoDb { .. } => "dynamodb",
        }
    }

    /// Opens the backend.
    pub async fn open(&self) -> Result<Arc<dyn Registry>> {
        match self {
            RegistryBackend::Sqlite { path } => Ok(Arc::new(SqliteRegistry::open(path)?)),
            #[cfg(feature = "postgres")]
            RegistryBackend::Postgres { url } => Ok(Arc::new(
                crate::PostgresRegistry::connect(url.expose()).await?,
            )),
            #[cfg(not(feature = "postgres"))]
            RegistryBackend::Postgres { .. } => {
                Err(not_in_build("registry", self.name(), "postgres"))
            }
            #[cfg(feature = "dynamodb")]
            RegistryBackend::DynamoDb { url } => {
                let registry = crate::DynamoRegistry::open(url.expose()).await?;
                registry.check_tables().await?;
                Ok(Arc::new(registry))
            }
            #[cfg(not(feature = "dynamodb"))]
            RegistryBackend::DynamoDb { .. } => {
                Err(not_in_build("registry", self.name(), "dynamodb"))
            }
        }
    }
}

impl CoordinatorBackend {
    /// Parses a coordinator URL.
    pub fn parse(url: &str) -> Result<Self> {
        let url = url.trim();
        match url {
            "memory" | "memory:" | "memory://" => return Ok(CoordinatorBackend::Memory),
            _ => {}
        }
        match scheme(url) {
            Some(("redis" | "rediss", _)) => Ok(CoordinatorBackend::Redis {
                url: Secret::new(url),
            }),
            Some((other, _)) => Err(unsupported("coordinator", other, COORDINATOR_FORMS)),
            None => Err(Error::invalid(format!(
                "coordinator `{}` is not supported; use {COORDINATOR_FORMS}",
                url.chars().take(40).collect::<String>()
            ))),
        }
    }

    /// The backend's name, as errors and logs show it.
    pub fn name(&self) -> &'static str {
        match self {
            CoordinatorBackend::Memory => "memory",
            CoordinatorBackend::Redis { .. } => "redis",
        }
    }

    /// Opens the backend.
    pub async fn open(&self) -> Result<Arc<dyn Coordinator>> {
        match self {
            CoordinatorBackend::Memory => Ok(Arc::new(MemoryCoordinator::new())),
            #[cfg(feature = "redis")]
            CoordinatorBackend::Redis { url } => Ok(Arc::new(
                crate::RedisCoordinator::connect(url.expose()).await?,
            )),
            #[cfg(not(feature = "redis"))]
            CoordinatorBackend::Redis { .. } => {
                Err(not_in_build("coordinator", self.name(), "redis"))
            }
        }
    }
}

impl StateStoreBackend {
    /// Parses a state store URL or a plain directory path.
    pub fn parse(url: &str) -> Result<Self> {
        let url = url.trim();
        match scheme(url) {
            Some(("file", rest)) => {
                let dir = PathBuf::from(rest);
                if !dir.is_absolute() {
                    return Err(Error::invalid(format!(
                        "a file:// state store URL takes an absolute path (file:///var/lib/otm/state); use {STATE_STORE_FORMS}"
                    )));
                }
                Ok(StateStoreBackend::Local { dir })
            }
            Some(("s3", _)) => Ok(StateStoreBackend::S3 {
                url: url.to_owned(),
            }),
            Some(("gs", _)) => Ok(StateStoreBackend::Gcs {
                url: url.to_owned(),
            }),
            Some(("az" | "azure", _)) => Ok(StateStoreBackend::Azure {
                url: url.to_owned(),
            }),
            Some((other, _)) => Err(unsupported("state store", other, STATE_STORE_FORMS)),
            None if url.is_empty() => Err(Error::invalid(format!(
                "the state store location is empty; use {STATE_STORE_FORMS}"
            ))),
            None => Ok(StateStoreBackend::Local {
                dir: PathBuf::from(url),
            }),
        }
    }

    /// The backend's name, as errors and logs show it.
    pub fn name(&self) -> &'static str {
        match self {
            StateStoreBackend::Local { .. } => "file",
            StateStoreBackend::S3 { .. } => "s3",
            StateStoreBackend::Gcs { .. } => "gcs",
            StateStoreBackend::Azure { .. } => "azure",
        }
    }

    /// Opens the backend.
    pub async fn open(&self) -> Result<Arc<dyn StateStore>> {
        match self {
            StateStoreBackend::Local { dir } => Ok(Arc::new(ObjectStateStore::local(dir)?)),
            #[cfg(feature = "s3")]
            StateStoreBackend::S3 { url } => Ok(Arc::new(s3_state_store(url)?)),
            #[cfg(not(feature = "s3"))]
            StateStoreBackend::S3 { .. } => Err(not_in_build("state store", self.name(), "s3")),
            // Not built yet: object_store reaches them through its `gcp` and `azure` features.
            StateStoreBackend::Gcs { .. } => Err(not_in_build("state store", self.name(), "gcs")),
            StateStoreBackend::Azure { .. } => {
                Err(not_in_build("state store", self.name(), "azure"))
            }
        }
    }
}

/// The state store an `s3://bucket/prefix?endpoint=…&region=…&allow_http=true` URL names: the
/// AWS environment (`AmazonS3Builder::from_env`), then the URL's bucket and options on top.
/// Options are object_store's S3 configuration keys; credentials come from the process-wide
/// [`AwsCredentialsProvider`](crate::aws_credentials::AwsCredentialsProvider) (the one the
/// DynamoDB registry uses too), never from the URL. Sends nothing.
#[cfg(feature = "s3")]
pub fn s3_state_store(url: &str) -> Result<ObjectStateStore> {
    s3_state_store_with_credentials(
        url,
        crate::aws_credentials::AwsCredentialsProvider::shared_from_env()?,
    )
}

/// [`s3_state_store`] with credentials from `credentials`.
#[cfg(feature = "s3")]
pub fn s3_state_store_with_credentials(
    url: &str,
    credentials: crate::aws_credentials::AwsCredentialsProvider,
) -> Result<ObjectStateStore> {
    use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
    const FORM: &str = "s3://bucket/prefix?endpoint=…&region=…&allow_http=true";
    let rest = url.strip_prefix("s3://").unwrap_or(url);
    let (location, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (bucket, prefix) = location.split_once('/').unwrap_or((location, ""));
    if bucket.is_empty() {
        return Err(Error::invalid(format!(
            "the S3 state store URL names no bucket; use {FORM}"
        )));
    }
    let mut builder = AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .with_credentials(credentials.object_store());
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, "true"));
        let (key, value) = (percent_decode(key)?, percent_decode(value)?);
        let lower = key.to_ascii_lowercase();
        if lower.contains("secret") || lower.contains("token") || lower.contains("access_key") {
            return Err(Error::invalid(format!(
                "`{key}` in the S3 state store URL: credentials do not go in the URL; give \
                 the service account a role (IRSA or EKS Pod Identity), or set \
                 AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            )));
        }
        let config: AmazonS3ConfigKey = lower.parse().map_err(|_| {
            Error::invalid(format!(
                "unknown option `{key}` in the S3 state store URL; use {FORM}"
            ))
        })?;
        builder = builder.with_config(config, value);
    }
    let store = builder
        .build()
        .map_err(|e| Error::invalid(format!("cannot configure the S3 state store: {e}")))?;
    ObjectStateStore::new(Arc::new(store)).with_prefix(prefix)
}

/// Decodes `%XX` escapes (and `+` as a space) in a URL query part.
#[cfg(feature = "s3")]
fn percent_decode(s: &str) -> Result<String> {
    let bad = || {
        Error::invalid(format!(
            "`{s}` in a URL query is not valid percent-encoding"
        ))
    };
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(c) = bytes.next() {
        match c {
            b'%' => {
                let hi = bytes
                    .next()
                    .and_then(|h| (h as char).to_digit(16))
                    .ok_or_else(bad)?;
                let lo = bytes
                    .next()
                    .and_then(|l| (l as char).to_digit(16))
                    .ok_or_else(bad)?;
                out.push((hi * 16 + lo) as u8);
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
    }
    String::from_utf8(out).map_err(|_| bad())
}

/// Prepares a registry's storage and opens it: SQL backends apply their migrations, DynamoDB
/// creates its tables (and waits until they are active). Safe to run again.
pub async fn migrate_registry(url: &str) -> Result<Arc<dyn Registry>> {
    let backend = RegistryBackend::parse(url)?;
    #[cfg(feature = "dynamodb")]
    if let RegistryBackend::DynamoDb { url } = &backend {
        let registry = crate::DynamoRegistry::open(url.expose()).await?;
        registry.create_tables().await?;
        return Ok(Arc::new(registry));
    }
    backend.open().await
}

/// Opens the registry a URL names.
pub async fn open_registry(url: &str) -> Result<Arc<dyn Registry>> {
    RegistryBackend::parse(url)?.open().await
}

/// [`open_registry`], and where the backend counts its group commits (SQLite), `metrics`
/// exports them from then on.
pub async fn open_registry_metered(
    url: &str,
    metrics: &RegistryMetrics,
) -> Result<Arc<dyn Registry>> {
    match RegistryBackend::parse(url)? {
        RegistryBackend::Sqlite { path } => {
            let registry = SqliteRegistry::open(&path)?;
            metrics.watch_writes(registry.write_counters());
            Ok(Arc::new(registry))
        }
        other => other.open().await,
    }
}

/// Opens the coordinator a URL names.
pub async fn open_coordinator(url: &str) -> Result<Arc<dyn Coordinator>> {
    CoordinatorBackend::parse(url)?.open().await
}

/// Opens the state store a URL (or plain directory path) names.
pub async fn open_state_store(url: &str) -> Result<Arc<dyn StateStore>> {
    StateStoreBackend::parse(url)?.open().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_registry_urls() {
        assert_eq!(
            RegistryBackend::parse("sqlite:///var/lib/otm/r.db").unwrap(),
            RegistryBackend::Sqlite {
                path: "/var/lib/otm/r.db".into()
            }
        );
        assert_eq!(
            RegistryBackend::parse("sqlite:r.db").unwrap(),
            RegistryBackend::Sqlite {
                path: "r.db".into()
            }
        );
        assert_eq!(
            RegistryBackend::parse("sqlite://d/r.db").unwrap(),
            RegistryBackend::Sqlite {
                path: "d/r.db".into()
            }
        );
        assert!(matches!(
            RegistryBackend::parse("sqlite://"),
            Err(Error::InvalidInput { .. })
        ));
        assert!(matches!(
            RegistryBackend::parse("/plain/path.db"),
            Err(Error::InvalidInput { .. })
        ));
    }

    #[tokio::test]
    async fn missing_backends_say_not_in_build_without_leaking_the_url() {
        let missing: [(&str, &str); _] = [
            #[cfg(not(feature = "postgres"))]
            ("postgres://u:hunter2@db/otm", "postgres"),
            #[cfg(not(feature = "dynamodb"))]
            ("dynamodb://otm-table", "dynamodb"),
        ];
        for (url, feature) in missing {
            let err = open_registry(url).await.unwrap_err();
            assert!(
                matches!(err, Error::NotInBuild { feature: f, .. } if f == feature),
                "{err}"
            );
            let msg = err.to_string();
            assert!(
                msg.contains("not in this build") && !msg.contains("hunter2"),
                "{msg}"
            );
            assert!(!format!("{:?}", RegistryBackend::parse(url).unwrap()).contains("hunter2"));
        }
        #[cfg(feature = "postgres")]
        {
            // Port 1 on the loopback address refuses connections at once.
            let err = open_registry("postgres://u:hunter2@127.0.0.1:1/otm")
                .await
                .unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::Unavailable {
                        backend: "postgres",
                        ..
                    }
                ),
                "{err}"
            );
            assert!(!format!("{err} {err:?}").contains("hunter2"), "{err:?}");
        }
        // Port 1 on the loopback address refuses connections at once.
        let err = open_coordinator("redis://:hunter2@127.0.0.1:1")
            .await
            .unwrap_err();
        #[cfg(not(feature = "redis"))]
        assert!(
            matches!(
                err,
                Error::NotInBuild {
                    feature: "redis",
                    ..
                }
            ),
            "{err}"
        );
        #[cfg(feature = "redis")]
        assert!(
            matches!(
                err,
                Error::Unavailable {
                    backend: "redis",
                    ..
                }
            ),
            "{err}"
        );
        assert!(!err.to_string().contains("hunter2"));
        #[cfg(feature = "dynamodb")]
        {
            // With credentials in the environment, port 1 refuses the connection. (Without them
            // the chain would ask the instance metadata service, which tests must not reach; the
            // chain's own tests cover that with their own variables.)
            let url = "dynamodb://otm-table?endpoint=http://127.0.0.1:1&region=us-east-1";
            let set = |v: &str| std::env::var(v).is_ok_and(|v| !v.is_empty());
            if set("AWS_ACCESS_KEY_ID") && set("AWS_SECRET_ACCESS_KEY") {
                let err = open_registry(url).await.unwrap_err();
                assert!(
                    matches!(
                        err,
                        Error::Unavailable {
                            backend: "dynamodb",
                            ..
                        }
                    ),
                    "{err}"
                );
            } else {
                println!("skipped: opening DynamoDB on a closed port: no AWS_ACCESS_KEY_ID");
            }
        }
        #[cfg(not(feature = "s3"))]
        {
            let err = open_state_store("s3://bucket/otm").await.unwrap_err();
            assert!(
                matches!(err, Error::NotInBuild { feature: "s3", .. }),
                "{err}"
            );
        }
        #[cfg(feature = "s3")]
        {
            open_state_store(
                "s3://bucket/otm?endpoint=http://127.0.0.1:1&region=eu-west-1&allow_http=true",
            )
            .await
            .expect("configuring an S3 state store sends nothing");
            for bad in [
                "s3://",
                "s3:///prefix",
                "s3://bucket/otm?colour=red",
                "s3://bucket/otm?endpoint=%zz",
                "s3://bucket/otm?secret_access_key=hunter2",
            ] {
                let err = open_state_store(bad).await.unwrap_err();
                assert!(matches!(err, Error::InvalidInput { .. }), "{bad}: {err}");
                assert!(!err.to_string().contains("hunter2"), "{err}");
            }
        }
    }

    #[tokio::test]
    async fn unknown_schemes_name_the_accepted_forms() {
        let err = open_registry("mysql://u:hunter2@db").await.unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::InvalidInput { .. }));
        assert!(
            msg.contains("`mysql`") && msg.contains("sqlite:") && !msg.contains("hunter2"),
            "{msg}"
        );
        let msg = open_coordinator("etcd://x").await.unwrap_err().to_string();
        assert!(msg.contains("memory") && msg.contains("redis://"), "{msg}");
        let msg = open_state_store("gopher://x")
            .await
            .unwrap_err()
            .to_string();
        assert!(msg.contains("file:///") && msg.contains("s3://"), "{msg}");
        assert!(matches!(
            open_state_store("file://relative/dir").await,
            Err(Error::InvalidInput { .. })
        ));
    }

    #[tokio::test]
    async fn opens_the_embedded_backends() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("sub/registry.db");
        let r = open_registry(&format!("sqlite://{}", db.display()))
            .await
            .unwrap();
        assert!(r.list_tenants().await.unwrap().is_empty());
        assert!(db.exists());
        open_coordinator("memory").await.unwrap();
        let state = dir.path().join("state");
        let s = open_state_store(&format!("file://{}", state.display()))
            .await
            .unwrap();
        assert!(
            s.list(&otm_core::TenantId::parse("a").unwrap())
                .await
                .unwrap()
                .is_empty()
        );
        assert!(state.is_dir());
        open_state_store(dir.path().join("plain").to_str().unwrap())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn gcs_and_azure_say_not_in_build() {
        for (url, feature) in [("gs://bucket/otm", "gcs"), ("az://container/otm", "azure")] {
            let err = open_state_store(url).await.unwrap_err();
            assert!(
                matches!(err, Error::NotInBuild { feature: f, .. } if f == feature),
                "{err}"
            );
        }
    }
}
