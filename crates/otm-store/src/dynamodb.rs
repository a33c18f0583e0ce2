//! [`DynamoRegistry`]: the [`Registry`](otm_core::Registry) on Amazon DynamoDB, through its JSON API.
//!
//! URL: `dynamodb://<table-prefix>?endpoint=http://127.0.0.1:5055&region=us-east-1&create_tables=true`,
//! every query option optional. The endpoint falls back to `AWS_ENDPOINT_URL_DYNAMODB`, then
//! `AWS_ENDPOINT_URL`, then `https://dynamodb.{region}.amazonaws.com`; the region to `AWS_REGION`,
//! then `AWS_DEFAULT_REGION`. Credentials come from the process-wide
//! [`AwsCredentialsProvider`](crate::aws_credentials::AwsCredentialsProvider): the environment,
//! web identity, EKS Pod Identity or the instance profile.
//!
//! # Tables
//!
//! Three tables named `{prefix}-tenants`, `{prefix}-instances` and `{prefix}-inbox`, created by
//! [`DynamoRegistry::create_tables`] or by hand from `docs/dynamodb-tables.json` (the same
//! definitions as [`table_definitions`]). On-demand billing.
//!
//! - **tenants**, key `tenant_id`: one item per tenant, plus the fleet settings under the key
//!   `@settings` and the tenant incarnation counter `@tenant-numbers` (tenant ids are DNS labels,
//!   so neither can collide). GSI `status-index` (`status`, `idle_deadline_ms`, keys only) makes
//!   [`TenantStore::idle_due`] one Query of the `running` partition up to `now`, and
//!   [`TenantStore::frozen_tenants`] one of the `frozen` partition. GSI `freeze-index`
//!   (`status`, `freeze_deadline_ms`, projecting `idle_deadline_ms`) makes
//!   [`TenantStore::freeze_due`] one Query of the `running` partition up to `now`. `touch_tenant`
//!   keeps `idle_deadline_ms` = `last_active_ms + idle_timeout_ms` and `freeze_deadline_ms` =
//!   `last_active_ms + freeze_after_ms` in one update expression (`freeze_after_ms` is
//!   [`NEVER_MS`] for a tenant that never freezes; an item written before it was stored is
//!   taken to freeze after the default time until its next update, and the sweep checks the
//!   tenant's own settings before it freezes anything).
//! - **instances**, key `instance_id`: one item per instance, plus pointer items that make
//!   two lookups strongly consistent and one of them unique: `@tenant/{tenant}` (the instance
//!   bound to a tenant; at most one, like SQLite's `UNIQUE (tenant)`) and `@surrogate/{digest}`.
//!   Every write of an instance updates its pointers in the same transaction. GSI `state-index`
//!   (`state`, `created_at_ms`, projecting `tenant`) lists warm instances, oldest first, for
//!   [`InstanceStore::claim_warm_instance`], which then takes one with a transaction whose condition
//!   is `attribute_not_exists(tenant) AND state = warm`, trying the next candidate when another
//!   claimant won.
//! - **inbox**, key (`tenant`, `sk`), one partition per tenant:
//!   - `#meta`: created with the tenant; `next_seq` (allocated with an atomic `ADD`; it starts
//!     at the tenant's incarnation number, from the `@tenant-numbers` item, shifted left by 32
//!     bits, so sequence numbers are unique across tenants as SQLite's are), `pending` (how
//!     many updates wait), `pending_shard` while some may wait, `deleting` while the tenant is
//!     being deleted.
//!   - `q#{seq:020}`: a pending update; `x#{seq:020}`: a dead-lettered one; `d#{seq:020}`: a
//!     delivered one (without its payload), kept for deduplication until pruned.
//!   - `u#{update_id}`: the dedupe marker, written with `attribute_not_exists` in the same
//!     transaction as the `q#` item and the `pending` increment.
//!
//!   Sparse GSI `pending-index` (`pending_shard`, `tenant`, keys only) holds only `#meta` items
//!   of tenants that may have pending updates, so [`Inbox::inbox_pending_tenants`] is a few
//!   Queries, not a Scan; hits are confirmed with a consistent read of `pending`, and stale
//!   entries are cleared there. Sparse GSI `done-index` (`done_shard`, `accepted_at_ms`)
//!   holds only `d#` items, so [`Inbox::inbox_prune`] is a few Queries too. Both spread
//!   their items over [`SHARDS`] partition keys.
//!
//!   - The partitions `@audit` and `@tokens` (tenant ids are DNS labels, so they collide with
//!     none) hold the audit trail (`a#{id:020}`, read newest first with one Query) and the named
//!     admin tokens (`t#{name}`, a handful, read with one consistent Query).
//!
//! Every state change is a conditional write or a transaction: fences
//! (`attribute_not_exists(fence) OR fence <= :f`), moves between `q#`, `x#` and `d#` (the source
//! must still be there), and the tenant's `#meta` (it must exist and not be `deleting`), so a
//! concurrent delete leaves no orphans. Reads that decide anything are strongly consistent;
//! only the GSI lookups (`idle_due`, `freeze_due`, `frozen_tenants`, candidates in `claim_warm_instance`,
//! `inbox_pending_tenants`, `inbox_prune`) are eventually consistent, as GSIs are on AWS.

mod attr;
mod client;

use crate::aws_credentials::{AwsCredentialsProvider, CredentialSource};
use crate::record::{self, InstanceRow, TenantRow, corrupt, deadline, to_i64, truncate};
use attr::{Item, Reader, b, boolean, n, s};
use client::{ApiError, Client};
use futures::stream::{self, StreamExt, TryStreamExt};
use otm_core::{
    Appended, DeadLetters, Error, FailOutcome, FleetSettings, Inbox, InboxItem, InboxView,
    InstanceId, InstanceRecord, InstanceState, InstanceStore, Result, Tenant, TenantId,
    TenantStatus, TenantStore,
};
use serde_json::{Value, json};
use std::collections::HashSet;
use std::fmt;
use std::time::{Duration, Instant};

pub(crate) const BACKEND: &str = "dynamodb";

/// Partition keys that the sparse GSIs `pending-index` and `done-index` spread items over.
pub const SHARDS: u64 = 8;
/// Optimistic read-then-write rounds before giving up.
const ROUNDS: u32 = 20;
/// Longest surrogate digest accepted as a key.
const MAX_DIGEST_LEN: usize = 512;
/// How long [`DynamoRegistry::create_tables`] waits for tables to become ACTIVE.
const CREATE_TIMEOUT: Duration = Duration::from_secs(600);
/// Requests in flight at once in bulk work (prune).
const CONCURRENCY: usize = 16;

/// `freeze_after_ms` of a tenant that never freezes: its freeze deadline is never reached.
pub const NEVER_MS: i64 = i64::MAX;

const SETTINGS_KEY: &str = "@settings";
/// The tenants-table item that numbers tenant incarnations.
const NUMBERS_KEY: &str = "@tenant-numbers";
/// Sequence numbers are `incarnation << SEQ_BITS | n`: unique across tenants (as SQLite's global
/// ones are, so a seq of one tenant never names an update of another or of an earlier tenant of
/// the same id), while each tenant's counter stays its own item.
const SEQ_BITS: u32 = 32;
const META: &str = "#meta";
const TENANT_POINTER: &str = "@tenant/";
const SURROGATE_POINTER: &str = "@surrogate/";

/// The three table names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tables {
    pub tenants: String,
    pub instances: String,
    pub inbox: String,
}

impl Tables {
    /// `{prefix}-tenants`, `{prefix}-instances`, `{prefix}-inbox`.
    pub fn with_prefix(prefix: &str) -> Self {
        Tables {
            tenants: format!("{prefix}-tenants"),
            instances: format!("{prefix}-instances"),
            inbox: format!("{prefix}-inbox"),
        }
    }

    fn all(&self) -> [&str; 3] {
        [&self.tenants, &self.instances, &self.inbox]
    }
}

/// `CreateTable` requests for the registry's tables, as `create_tables` sends them and
/// `docs/dynamodb-tables.json` lists them.
pub fn table_definitions(prefix: &str) -> Vec<Value> {
    let t = Tables::with_prefix(prefix);
    vec![
        json!({
            "TableName": t.tenants,
            "BillingMode": "PAY_PER_REQUEST",
            "AttributeDefinitions": [
                {"AttributeName": "tenant_id", "AttributeType": "S"},
                {"AttributeName": "status", "AttributeType": "S"},
                {"AttributeName": "idle_deadline_ms", "AttributeType": "N"},
                {"AttributeName": "freeze_deadline_ms", "AttributeType": "N"}
            ],
            "KeySchema": [{"AttributeName": "tenant_id", "KeyType": "HASH"}],
            "GlobalSecondaryIndexes": [
                {
                    "IndexName": "status-index",
                    "KeySchema": [
                        {"AttributeName": "status", "KeyType": "HASH"},
                        {"AttributeName": "idle_deadline_ms", "KeyType": "RANGE"}
                    ],
                    "Projection": {"ProjectionType": "KEYS_ONLY"}
                },
                {
                    "IndexName": "freeze-index",
                    "KeySchema": [
                        {"AttributeName": "status", "KeyType": "HASH"},
                        {"AttributeName": "freeze_deadline_ms", "KeyType": "RANGE"}
                    ],
                    "Projection": {"ProjectionType": "INCLUDE", "NonKeyAttributes": ["idle_deadline_ms"]}
                }
            ]
        }),
        json!({
            "TableName": t.instances,
            "BillingMode": "PAY_PER_REQUEST",
            "AttributeDefinitions": [
                {"AttributeName": "instance_id", "AttributeType": "S"},
                {"AttributeName": "state", "AttributeType": "S"},
                {"AttributeName": "created_at_ms", "AttributeType": "N"}
            ],
            "KeySchema": [{"AttributeName": "instance_id", "KeyType": "HASH"}],
            "GlobalSecondaryIndexes": [{
                "IndexName": "state-index",
                "KeySchema": [
                    {"AttributeName": "state", "KeyType": "HASH"},
                    {"AttributeName": "created_at_ms", "KeyType": "RANGE"}
                ],
                "Projection": {"ProjectionType": "INCLUDE", "NonKeyAttributes": ["tenant"]}
            }]
        }),
        json!({
            "TableName": t.inbox,
            "BillingMode": "PAY_PER_REQUEST",
            "AttributeDefinitions": [
                {"AttributeName": "tenant", "AttributeType": "S"},
                {"AttributeName": "sk", "AttributeType": "S"},
                {"AttributeName": "pending_shard", "AttributeType": "S"},
                {"AttributeName": "done_shard", "AttributeType": "S"},
                {"AttributeName": "accepted_at_ms", "AttributeType": "N"}
            ],
            "KeySchema": [
                {"AttributeName": "tenant", "KeyType": "HASH"},
                {"AttributeName": "sk", "KeyType": "RANGE"}
            ],
            "GlobalSecondaryIndexes": [
                {
                    "IndexName": "pending-index",
                    "KeySchema": [
                        {"AttributeName": "pending_shard", "KeyType": "HASH"},
                        {"AttributeName": "tenant", "KeyType": "RANGE"}
                    ],
                    "Projection": {"ProjectionType": "KEYS_ONLY"}
                },
                {
                    "IndexName": "done-index",
                    "KeySchema": [
                        {"AttributeName": "done_shard", "KeyType": "HASH"},
                        {"AttributeName": "accepted_at_ms", "KeyType": "RANGE"}
                    ],
                    "Projection": {"ProjectionType": "INCLUDE", "NonKeyAttributes": ["seq", "update_id"]}
                }
            ]
        }),
    ]
}

/// What a `dynamodb://` URL says.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Options {
    prefix: String,
    endpoint: Option<String>,
    region: Option<String>,
    create_tables: bool,
}

const URL_FORM: &str = "dynamodb://<table-prefix>?endpoint=<url>&region=<region>&create_tables=true \
                        (every option optional)";

impl Options {
    fn parse(url: &str) -> Result<Self> {
        let rest = url.trim().strip_prefix("dynamodb://").ok_or_else(|| {
            Error::invalid(format!("a DynamoDB registry URL has the form {URL_FORM}"))
        })?;
        let (prefix, query) = rest.split_once('?').unwrap_or((rest, ""));
        let prefix = prefix.trim_end_matches('/');
        let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.');
        if prefix.is_empty() || prefix.len() > 200 || !prefix.chars().all(valid) {
            return Err(Error::invalid(format!(
                "the DynamoDB table prefix `{}` is not valid: use 1 to 200 of a-z, A-Z, 0-9, '_', '-' and '.'; \
                 the form is {URL_FORM}",
                prefix.chars().take(60).collect::<String>()
            )));
        }
        let mut opts = Options {
            prefix: prefix.to_owned(),
            endpoint: None,
            region: None,
            create_tables: false,
        };
        // Parsed as the query of a throwaway URL, for percent-decoding.
        let parsed = reqwest::Url::parse(&format!("http://x/?{query}"))
            .map_err(|e| Error::invalid(format!("the DynamoDB URL's query is not valid: {e}")))?;
        for (key, value) in parsed.query_pairs() {
            match &*key {
                "endpoint" => opts.endpoint = Some(value.into_owned()),
                "region" => opts.region = Some(value.into_owned()),
                "create_tables" => {
                    opts.create_tables = match &*value {
                        "true" | "1" | "yes" => true,
                        "false" | "0" | "no" => false,
                        other => {
                            return Err(Error::invalid(format!(
                                "create_tables={other} in the DynamoDB URL: use true or false"
                            )));
                        }
                    }
                }
                other => {
                    return Err(Error::invalid(format!(
                        "unknown option `{other}` in the DynamoDB URL; the form is {URL_FORM}"
                    )));
                }
            }
        }
        Ok(opts)
    }
}

/// The registry on DynamoDB. Cheap to share behind an `Arc`.
pub struct DynamoRegistry {
    client: Client,
    tables: Tables,
    create_tables: bool,
}

impl fmt::Debug for DynamoRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DynamoRegistry")
            .field("endpoint", &self.client.endpoint())
            .field("tables", &self.tables)
            .finish_non_exhaustive()
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn api(e: ApiError) -> Error {
    e.into_error()
}

/// True when action `i` of a cancelled transaction failed its condition.
fn failed_at(e: &ApiError, i: usize) -> bool {
    e.cancellation_codes()
        .is_some_and(|c| c.get(i).map(String::as_str) == Some("ConditionalCheckFailed"))
}

/// FNV-1a: a stable hash for picking shards (not `DefaultHasher`, which may change).
fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, byte| {
        (h ^ u64::from(*byte)).wrapping_mul(0x100_0000_01b3)
    })
}

fn pending_shard(tenant: &TenantId) -> String {
    (fnv(tenant.as_str().as_bytes()) % SHARDS).to_string()
}

fn done_shard(tenant: &TenantId, seq: i64) -> String {
    (fnv(format!("{tenant}/{seq}").as_bytes()) % SHARDS).to_string()
}

fn q_sk(seq: i64) -> String {
    format!("q#{seq:020}")
}
fn x_sk(seq: i64) -> String {
    format!("x#{seq:020}")
}
fn d_sk(seq: i64) -> String {
    format!("d#{seq:020}")
}
fn u_sk(update_id: i64) -> String {
    format!("u#{update_id}")
}

fn tenant_key(id: &str) -> Value {
    json!({ "tenant_id": s(id) })
}
fn inbox_key(tenant: &TenantId, sk: &str) -> Value {
    json!({ "tenant": s(tenant.as_str()), "sk": s(sk) })
}
fn instance_key(id: &str) -> Value {
    json!({ "instance_id": s(id) })
}

fn tenant_item(t: &Tenant) -> Result<Value> {
    let idle_s = to_i64(t.idle_timeout_s, "idle timeout")?;
    let idle_ms = idle_s.saturating_mul(1000);
    let mut item = json!({
        "tenant_id": s(t.id.as_str()),
        "profile": s(&t.profile),
        "idle_timeout_s": n(idle_s),
        "idle_timeout_ms": n(idle_ms),
        "webhook_secret": s(t.webhook_secret.expose()),
        "cold_start_notice": boolean(t.cold_start_notice),
        "status": s(t.status.as_str()),
        "created_at_ms": n(t.created_at_ms),
        "last_active_ms": n(t.last_active_ms),
        "idle_deadline_ms": n(deadline(t.last_active_ms, idle_s)),
        "freeze_after_ms": n(record::freeze_after_ms(t).unwrap_or(NEVER_MS)),
        // Past i64 for a tenant that never freezes, as `touch_tenant` computes it too.
        "freeze_deadline_ms": { "N": (i128::from(t.last_active_ms)
            + i128::from(record::freeze_after_ms(t).unwrap_or(NEVER_MS))).to_string() },
        "fence": n(0),
        "limits": s(t.limits.to_json()),
    });
    if let Some(token) = &t.bot_token {
        item["bot_token"] = s(token.expose());
    }
    Ok(item)
}

fn tenant_from(item: &Item) -> Result<Tenant> {
    let raw_id = item
        .get("tenant_id")
        .and_then(|v| v.get("S"))
        .and_then(Value::as_str)
        .unwrap_or("?");
    let what = format!("tenant item `{raw_id}`");
    let r = Reader::new(item, &what);
    TenantRow {
        id: r.s("tenant_id")?.to_owned(),
        profile: r.s("profile")?.to_owned(),
        idle_timeout_s: r.n("idle_timeout_s")?,
        bot_token: r.opt_s("bot_token")?.map(str::to_owned),
        webhook_secret: r.s("webhook_secret")?.to_owned(),
        cold_start_notice: r.bool("cold_start_notice")?,
        status: r.s("status")?.to_owned(),
        created_at_ms: r.n("created_at_ms")?,
        last_active_ms: r.n("last_active_ms")?,
        limits: r.opt_s("limits")?.map(str::to_owned),
    }
    .into_tenant(&what)
}

fn instance_item(i: &InstanceRecord) -> Value {
    let mut item = json!({
        "instance_id": s(i.id.as_str()),
        "state": s(i.state.as_str()),
        "address": s(&i.address),
        "shim_token": s(i.shim_token.expose()),
        "created_at_ms": n(i.created_at_ms),
    });
    if let Some(t) = &i.tenant {
        item["tenant"] = s(t.as_str());
    }
    if let Some(d) = &i.surrogate_digest {
        item["surrogate_digest"] = s(d);
    }
    if let Some(at) = i.bound_at_ms {
        item["bound_at_ms"] = n(at);
    }
    item
}

fn instance_from(item: &Item) -> Result<InstanceRecord> {
    let raw_id = item
        .get("instance_id")
        .and_then(|v| v.get("S"))
        .and_then(Value::as_str)
        .unwrap_or("?");
    let what = format!("instance item `{raw_id}`");
    let r = Reader::new(item, &what);
    InstanceRow {
        id: r.s("instance_id")?.to_owned(),
        tenant: r.opt_s("tenant")?.map(str::to_owned),
        state: r.s("state")?.to_owned(),
        address: r.s("address")?.to_owned(),
        shim_token: r.s("shim_token")?.to_owned(),
        surrogate_digest: r.opt_s("surrogate_digest")?.map(str::to_owned),
        created_at_ms: r.n("created_at_ms")?,
        bound_at_ms: r.opt_n("bound_at_ms")?,
    }
    .into_instance(&what)
}

/// A `q#` or `x#` item as an [`InboxItem`].
fn inbox_item_from(tenant: &TenantId, item: &Item) -> Result<InboxItem> {
    let what = format!("inbox item of tenant {tenant}");
    let r = Reader::new(item, &what);
    Ok(InboxItem {
        tenant: tenant.clone(),
        seq: r.n("seq")?,
        update_id: r.n("update_id")?,
        payload: r.b("payload")?,
        attempts: record::attempts(r.n("attempts")?),
        accepted_at_ms: r.n("accepted_at_ms")?,
        last_error: r.opt_s("last_error")?.map(str::to_owned),
    })
}

/// The `#meta` item's "may have pending updates" marker and counter.
#[derive(Debug)]
struct Meta {
    pending: i64,
    deleting: bool,
}

impl DynamoRegistry {
    /// Opens the registry a `dynamodb://` URL names (see the module docs for its form). Opening
    /// sends nothing, unless the URL says `create_tables=true`: then the tables are created
    /// (if missing) and waited for.
    pub async fn open(url: &str) -> Result<Self> {
        Self::open_with_credentials(url, AwsCredentialsProvider::shared_from_env()?).await
    }

    /// [`DynamoRegistry::open`] with credentials from `credentials` instead of the process-wide
    /// provider.
    pub async fn open_with_credentials(
        url: &str,
        credentials: AwsCredentialsProvider,
    ) -> Result<Self> {
        let opts = Options::parse(url)?;
        let endpoint = opts
            .endpoint
            .clone()
            .or_else(|| env("AWS_ENDPOINT_URL_DYNAMODB"))
            .or_else(|| env("AWS_ENDPOINT_URL"));
        let region = opts
            .region
            .clone()
            .or_else(|| env("AWS_REGION"))
            .or_else(|| env("AWS_DEFAULT_REGION"));
        let region = match (region, &endpoint) {
            (Some(r), _) => r,
            // A local stand-in does not care; signing needs some region.
            (None, Some(_)) => "us-east-1".to_owned(),
            (None, None) => {
                return Err(Error::invalid(
                    "the DynamoDB registry needs a region: add ?region=… to the URL or set AWS_REGION",
                ));
            }
        };
        let endpoint =
            endpoint.unwrap_or_else(|| format!("https://dynamodb.{region}.amazonaws.com"));
        let client = Client::new(&endpoint, &region, credentials)?;
        let registry = DynamoRegistry {
            client,
            tables: Tables::with_prefix(&opts.prefix),
            create_tables: opts.create_tables,
        };
        if registry.create_tables {
            registry.create_tables().await?;
        }
        tracing::debug!(endpoint = %endpoint, prefix = %opts.prefix, "opened the DynamoDB registry");
        Ok(registry)
    }

    /// Where the registry's AWS credentials come from.
    pub fn credential_source(&self) -> CredentialSource {
        self.client.credential_source()
    }

    /// The table names.
    pub fn tables(&self) -> &Tables {
        &self.tables
    }

    /// Creates the tables that are missing and waits until every table and index is ACTIVE.
    /// Idempotent: tables that exist already are left as they are.
    pub async fn create_tables(&self) -> Result<()> {
        for def in table_definitions_for(&self.tables) {
            let name = def["TableName"].as_str().unwrap_or_default().to_owned();
            match self.client.call("CreateTable", &def).await {
                Ok(_) => tracing::info!(table = %name, "created a DynamoDB table"),
                Err(e) if e.code() == "ResourceInUseException" => {
                    self.add_missing_indexes(&def).await?;
                }
                Err(e) => {
                    return Err(Error::generic(
                        BACKEND,
                        format!("cannot create the table {name}: {}", api(e)),
                    ));
                }
            }
        }
        let deadline = Instant::now() + CREATE_TIMEOUT;
        for name in self.tables.all() {
            loop {
                if self.table_active(name).await? {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(Error::unavailable(
                        BACKEND,
                        format!(
                            "the table {name} did not become ACTIVE within {} s",
                            CREATE_TIMEOUT.as_secs()
                        ),
                    ));
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        Ok(())
    }

    /// Creates the GSIs of `def` that its existing table lacks (added by a later version), one
    /// `UpdateTable` each; `create_tables` then waits for them to become ACTIVE.
    async fn add_missing_indexes(&self, def: &Value) -> Result<()> {
        let name = def["TableName"].as_str().unwrap_or_default();
        let desc = self
            .client
            .call("DescribeTable", &json!({ "TableName": name }))
            .await
            .map_err(api)?;
        let has = |index: &str| {
            desc["Table"]["GlobalSecondaryIndexes"]
                .as_array()
                .is_some_and(|ix| ix.iter().any(|i| i["IndexName"] == index))
        };
        for index in def["GlobalSecondaryIndexes"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let index_name = index["IndexName"].as_str().unwrap_or_default();
            if has(index_name) {
                continue;
            }
            // Index creations on one table go one at a time: wait for the previous one.
            let deadline = Instant::now() + CREATE_TIMEOUT;
            while !self.table_active(name).await? {
                if Instant::now() > deadline {
                    return Err(Error::unavailable(
                        BACKEND,
                        format!(
                            "the table {name} did not become ACTIVE within {} s",
                            CREATE_TIMEOUT.as_secs()
                        ),
                    ));
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            let update = json!({
                "TableName": name,
                "AttributeDefinitions": def["AttributeDefinitions"],
                "GlobalSecondaryIndexUpdates": [{ "Create": index }],
            });
            self.client
                .call("UpdateTable", &update)
                .await
                .map_err(|e| {
                    Error::generic(
                        BACKEND,
                        format!(
                            "cannot add the index {index_name} to the table {name}: {}",
                            api(e)
                        ),
                    )
                })?;
            tracing::info!(table = %name, index = %index_name, "added a DynamoDB index");
        }
        Ok(())
    }

    /// Deletes the three tables and everything in them (test teardown); missing ones are fine.
    pub async fn delete_tables(&self) -> Result<()> {
        for name in self.tables.all() {
            match self
                .client
                .call("DeleteTable", &json!({ "TableName": name }))
                .await
            {
                Ok(_) => {}
                Err(e) if e.code() == "ResourceNotFoundException" => {}
                Err(e) => return Err(api(e)),
            }
        }
        Ok(())
    }

    /// Checks that every table exists; the error says how to create them.
    pub async fn check_tables(&self) -> Result<()> {
        for name in self.tables.all() {
            match self
                .client
                .call("DescribeTable", &json!({ "TableName": name }))
                .await
            {
                Ok(_) => {}
                Err(e) if e.code() == "ResourceNotFoundException" => {
                    return Err(Error::generic(
                        BACKEND,
                        format!(
                            "the registry table {name} does not exist at {}; create the tables with \
                             create_tables=true in the registry URL, or by hand as docs/dynamodb-tables.json describes",
                            self.client.endpoint()
                        ),
                    ));
                }
                Err(e) => return Err(api(e)),
            }
        }
        Ok(())
    }

    async fn table_active(&self, name: &str) -> Result<bool> {
        let desc = self
            .client
            .call("DescribeTable", &json!({ "TableName": name }))
            .await
            .map_err(api)?;
        let table = &desc["Table"];
        let indexes_active = table["GlobalSecondaryIndexes"]
            .as_array()
            .is_none_or(|ix| ix.iter().all(|i| i["IndexStatus"] == "ACTIVE"));
        Ok(table["TableStatus"] == "ACTIVE" && indexes_active)
    }

    // -----------------------------------------------------------------------------------------
    // Request helpers.

    async fn get(&self, table: &str, key: Value) -> Result<Option<Item>> {
        let resp = self
            .client
            .call(
                "GetItem",
                &json!({ "TableName": table, "Key": key, "ConsistentRead": true }),
            )
            .await
            .map_err(api)?;
        Ok(resp.get("Item").and_then(Value::as_object).cloned())
    }

    /// Strongly consistent reads of several keys of one table, in no particular order.
    async fn batch_get(&self, table: &str, keys: Vec<Value>) -> Result<Vec<Item>> {
        let mut out = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(100) {
            let mut pending = chunk.to_vec();
            let mut attempt = 0;
            while !pending.is_empty() {
                let resp = self
                    .client
                    .call(
                        "BatchGetItem",
                        &json!({ "RequestItems": { table: { "Keys": pending, "ConsistentRead": true } } }),
                    )
                    .await
                    .map_err(api)?;
                if let Some(items) = resp["Responses"][table].as_array() {
                    out.extend(items.iter().filter_map(Value::as_object).cloned());
                }
                pending = resp["UnprocessedKeys"][table]["Keys"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                if !pending.is_empty() {
                    attempt += 1;
                    if attempt > ROUNDS {
                        return Err(Error::unavailable(
                            BACKEND,
                            "DynamoDB keeps leaving reads unprocessed (throttled)",
                        ));
                    }
                    tokio::time::sleep(client::BACKOFF.delay(attempt)).await;
                }
            }
        }
        Ok(out)
    }

    /// Deletes keys of one table, 25 per request, without conditions.
    async fn batch_delete(&self, table: &str, keys: Vec<Value>) -> Result<()> {
        for chunk in keys.chunks(25) {
            let mut pending: Vec<Value> = chunk
                .iter()
                .map(|k| json!({ "DeleteRequest": { "Key": k } }))
                .collect();
            let mut attempt = 0;
            while !pending.is_empty() {
                let resp = self
                    .client
                    .call(
                        "BatchWriteItem",
                        &json!({ "RequestItems": { table: pending } }),
                    )
                    .await
                    .map_err(api)?;
                pending = resp["UnprocessedItems"][table]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                if !pending.is_empty() {
                    attempt += 1;
                    if attempt > ROUNDS {
                        return Err(Error::unavailable(
                            BACKEND,
                            "DynamoDB keeps leaving deletes unprocessed (throttled)",
                        ));
                    }
                    tokio::time::sleep(client::BACKOFF.delay(attempt)).await;
                }
            }
        }
        Ok(())
    }

    /// Runs a Query or Scan (`op`) page by page, up to `limit` items.
    async fn pages(&self, op: &str, mut body: Value, limit: Option<usize>) -> Result<Vec<Item>> {
        let mut out = Vec::new();
        loop {
            if let Some(limit) = limit {
                body["Limit"] = json!((limit - out.len()).min(1000));
            }
            let resp = self.client.call(op, &body).await.map_err(api)?;
            if let Some(items) = resp["Items"].as_array() {
                out.extend(items.iter().filter_map(Value::as_object).cloned());
            }
            if limit.is_some_and(|l| out.len() >= l) {
                out.truncate(limit.unwrap_or(usize::MAX));
                break;
            }
            match resp.get("LastEvaluatedKey") {
                Some(k) if k.is_object() => body["ExclusiveStartKey"] = k.clone(),
                _ => break,
            }
        }
        Ok(out)
    }

    /// `TransactWriteItems`; cancellations caused only by concurrent transactions on the same
    /// items are retried here, a failed condition goes back to the caller.
    async fn transact(&self, actions: Vec<Value>) -> Result<(), ApiError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let body = json!({
                "TransactItems": actions,
                "ClientRequestToken": otm_core::id::random_hex(16),
            });
            match self.client.call("TransactWriteItems", &body).await {
                Ok(_) => return Ok(()),
                Err(e) => {
                    let contended = e.cancellation_codes().is_some_and(|codes| {
                        codes
                            .iter()
                            .any(|c| c == "TransactionConflict" || c == "ThrottlingError")
                            && !codes.iter().any(|c| c == "ConditionalCheckFailed")
                    });
                    if contended && attempt < ROUNDS {
                        tokio::time::sleep(client::BACKOFF.delay(attempt)).await;
                        continue;
                    }
                    return Err(e);
                }
            }
        }
    }

    async fn meta(&self, tenant: &TenantId) -> Result<Option<Meta>> {
        let Some(item) = self
            .get(&self.tables.inbox, inbox_key(tenant, META))
            .await?
        else {
            return Ok(None);
        };
        meta_from(tenant, &item).map(Some)
    }

    /// The `#meta` update that must accompany every change of a tenant's pending count.
    fn meta_update(&self, tenant: &TenantId, delta: i64, set_shard: bool) -> Value {
        let mut expr = "ADD #p :d".to_owned();
        let mut values = json!({ ":d": n(delta) });
        let mut names = json!({ "#p": "pending", "#sk": "sk", "#del": "deleting" });
        if set_shard {
            expr.push_str(" SET #ps = :ps");
            values[":ps"] = s(pending_shard(tenant));
            names["#ps"] = json!("pending_shard");
        }
        json!({ "Update": {
            "TableName": self.tables.inbox,
            "Key": inbox_key(tenant, META),
            "UpdateExpression": expr,
            "ConditionExpression": "attribute_exists(#sk) AND attribute_not_exists(#del)",
            "ExpressionAttributeNames": names,
            "ExpressionAttributeValues": values,
        }})
    }

    fn meta_check(&self, tenant: &TenantId) -> Value {
        json!({ "ConditionCheck": {
            "TableName": self.tables.inbox,
            "Key": inbox_key(tenant, META),
            "ConditionExpression": "attribute_exists(#sk) AND attribute_not_exists(#del)",
            "ExpressionAttributeNames": { "#sk": "sk", "#del": "deleting" },
        }})
    }

    /// `action` on the tenant's inbox counter, made to check and record a dispatcher fence: the
    /// transaction fails at it when a larger fence was claimed.
    fn fenced(action: Value, fence: Option<i64>) -> Value {
        let Some(f) = fence else { return action };
        let (mut update, expr) = match action {
            Value::Object(mut o) if o.contains_key("ConditionCheck") => (
                o.remove("ConditionCheck").unwrap_or_default(),
                "SET #df = :f".to_owned(),
            ),
            Value::Object(mut o) => {
                let u = o.remove("Update").unwrap_or_default();
                let e = u["UpdateExpression"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                let e = if e.contains("SET ") {
                    format!("{e}, #df = :f")
                } else {
                    format!("{e} SET #df = :f")
                };
                (u, e)
            }
            other => return other,
        };
        let cond = update["ConditionExpression"]
            .as_str()
            .unwrap_or("attribute_exists(#sk)")
            .to_owned();
        update["UpdateExpression"] = json!(expr);
        update["ConditionExpression"] = json!(format!(
            "{cond} AND (attribute_not_exists(#df) OR #df <= :f)"
        ));
        update["ExpressionAttributeNames"]["#df"] = json!("dispatch_fence");
        if !update["ExpressionAttributeValues"].is_object() {
            update["ExpressionAttributeValues"] = json!({});
        }
        update["ExpressionAttributeValues"][":f"] = n(f);
        json!({ "Update": update })
    }

    /// A conflict if the inbox counter shows a dispatcher fence larger than `fence` (nothing
    /// without a fence or a counter: the caller says what else went wrong).
    async fn check_dispatch_fence(&self, tenant: &TenantId, fence: Option<i64>) -> Result<()> {
        let Some(f) = fence else { return Ok(()) };
        let Some(item) = self
            .get(&self.tables.inbox, inbox_key(tenant, META))
            .await?
        else {
            return Ok(());
        };
        match Reader::new(&item, "an inbox counter").opt_n("dispatch_fence")? {
            Some(stored) if stored > f => Err(record::stale_dispatcher(tenant, f, stored)),
            _ => Ok(()),
        }
    }

    /// Pending or dead updates (`q#` or `x#`) with a sequence number above `after`, oldest
    /// first, at most `limit`.
    async fn inbox_range(
        &self,
        tenant: &TenantId,
        prefix: &str,
        after: Option<i64>,
        limit: usize,
    ) -> Result<Vec<InboxItem>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        // Sort keys are `{prefix}{seq:020}`: sequence numbers are never negative, and 20 nines
        // are above any of them.
        let from = after.map_or(0, |a| a.saturating_add(1).max(0));
        let items = self
            .pages(
                "Query",
                json!({
                    "TableName": self.tables.inbox,
                    "KeyConditionExpression": "#t = :t AND #sk BETWEEN :lo AND :hi",
                    "ExpressionAttributeNames": { "#t": "tenant", "#sk": "sk" },
                    "ExpressionAttributeValues": {
                        ":t": s(tenant.as_str()),
                        ":lo": s(format!("{prefix}{from:020}")),
                        ":hi": s(format!("{prefix}{}", "9".repeat(20))),
                    },
                    "ConsistentRead": true,
                }),
                Some(limit),
            )
            .await?;
        items.iter().map(|i| inbox_item_from(tenant, i)).collect()
    }

    /// The dead letters `which` names, or why there are none to move.
    async fn dead_letters(&self, tenant: &TenantId, which: DeadLetters) -> Result<Vec<InboxItem>> {
        let inbox = &self.tables.inbox;
        let seq = match which {
            DeadLetters::All => {
                if self.get(inbox, inbox_key(tenant, META)).await?.is_none() {
                    return Err(record::tenant_not_found(tenant));
                }
                return self.inbox_range(tenant, "x#", None, usize::MAX).await;
            }
            DeadLetters::One(seq) => seq,
        };
        let found = self
            .batch_get(
                inbox,
                vec![
                    inbox_key(tenant, META),
                    inbox_key(tenant, &q_sk(seq)),
                    inbox_key(tenant, &x_sk(seq)),
                    inbox_key(tenant, &d_sk(seq)),
                ],
            )
            .await?;
        let find = |sk: &str| {
            found
                .iter()
                .find(|i| i.get("sk").and_then(|v| v.get("S")).and_then(Value::as_str) == Some(sk))
        };
        if let Some(x) = find(&x_sk(seq)) {
            return Ok(vec![inbox_item_from(tenant, x)?]);
        }
        if find(META).is_none() {
            return Err(record::tenant_not_found(tenant));
        }
        if find(&q_sk(seq)).is_some() {
            return Err(record::not_dead(tenant, seq, "pending"));
        }
        if find(&d_sk(seq)).is_some() {
            return Err(record::not_dead(tenant, seq, "done"));
        }
        Err(record::update_not_found(tenant, seq))
    }

    /// Moves dead letters back to pending (`retry`: a `q#` item with no failed attempts, and
    /// the tenant's pending count up) or to done (a `d#` item without the payload), each in a
    /// transaction that needs its `x#` item still there.
    async fn move_dead(
        &self,
        tenant: &TenantId,
        which: DeadLetters,
        retry: bool,
    ) -> Result<Vec<i64>> {
        let inbox = &self.tables.inbox;
        let mut moved = Vec::new();
        for _ in 0..ROUNDS {
            let items = match self.dead_letters(tenant, which).await {
                // Moved by someone else since the last round: one named update is done, for
                // this caller too; a listed one does not count here.
                Err(Error::Conflict { .. }) if !moved.is_empty() => return Ok(moved),
                other => other?,
            };
            let mut raced = false;
            for entry in items {
                let seq = entry.seq;
                let target = if retry {
                    let mut item = json!({
                        "tenant": s(tenant.as_str()), "sk": s(q_sk(seq)), "seq": n(seq),
                        "update_id": n(entry.update_id), "payload": b(&entry.payload), "attempts": n(0),
                        "accepted_at_ms": n(entry.accepted_at_ms),
                    });
                    if let Some(e) = &entry.last_error {
                        item["last_error"] = s(e);
                    }
                    item
                } else {
                    json!({
                        "tenant": s(tenant.as_str()), "sk": s(d_sk(seq)), "seq": n(seq),
                        "update_id": n(entry.update_id), "accepted_at_ms": n(entry.accepted_at_ms),
                        "done_at_ms": n(otm_core::time::now_ms()), "done_shard": s(done_shard(tenant, seq)),
                    })
                };
                let actions = vec![
                    json!({ "Delete": {
                        "TableName": inbox,
                        "Key": inbox_key(tenant, &x_sk(seq)),
                        "ConditionExpression": "attribute_exists(#sk)",
                        "ExpressionAttributeNames": { "#sk": "sk" },
                    }}),
                    json!({ "Put": { "TableName": inbox, "Item": target } }),
                    if retry {
                        self.meta_update(tenant, 1, true)
                    } else {
                        self.meta_check(tenant)
                    },
                ];
                match self.transact(actions).await {
                    Ok(()) => moved.push(seq),
                    Err(e) if failed_at(&e, 2) => return Err(record::tenant_not_found(tenant)),
                    Err(e) if e.cancellation_codes().is_some() => raced = true,
                    Err(e) => return Err(api(e)),
                }
            }
            if !raced {
                moved.sort_unstable();
                return Ok(moved);
            }
        }
        Err(Error::conflict(format!(
            "the dead letters of tenant {tenant} kept changing while they were moved; try again"
        )))
    }

    /// The instance item and the pointer items that name it, for a read-then-write round.
    async fn instance_with_pointers(&self, id: &InstanceId) -> Result<Option<(Item, Vec<String>)>> {
        let Some(item) = self
            .get(&self.tables.instances, instance_key(id.as_str()))
            .await?
        else {
            return Ok(None);
        };
        let r = Reader::new(&item, "an instance item");
        let mut wanted = Vec::new();
        if let Some(t) = r.opt_s("tenant")? {
            wanted.push(format!("{TENANT_POINTER}{t}"));
        }
        if let Some(d) = r.opt_s("surrogate_digest")? {
            wanted.push(format!("{SURROGATE_POINTER}{d}"));
        }
        let keys = wanted.iter().map(|k| instance_key(k)).collect();
        let pointers = self.batch_get(&self.tables.instances, keys).await?;
        let ours = pointers
            .iter()
            .filter(|p| {
                p.get("target")
                    .and_then(|v| v.get("S"))
                    .and_then(Value::as_str)
                    == Some(id.as_str())
            })
            .filter_map(|p| p.get("instance_id")?.get("S")?.as_str().map(str::to_owned))
            .collect();
        Ok(Some((item, ours)))
    }

    /// A condition that the instance item still has the tenant and digest read before.
    fn unchanged_instance(old: &Item) -> Result<(String, Value, Value)> {
        let r = Reader::new(old, "an instance item");
        let mut cond = vec!["attribute_exists(#id)".to_owned()];
        let names = json!({ "#id": "instance_id", "#t": "tenant", "#sd": "surrogate_digest" });
        let mut values = json!({});
        match r.opt_s("tenant")? {
            Some(t) => {
                cond.push("#t = :old_t".into());
                values[":old_t"] = s(t);
            }
            None => cond.push("attribute_not_exists(#t)".into()),
        }
        match r.opt_s("surrogate_digest")? {
            Some(d) => {
                cond.push("#sd = :old_sd".into());
                values[":old_sd"] = s(d);
            }
            None => cond.push("attribute_not_exists(#sd)".into()),
        }
        Ok((cond.join(" AND "), names, values))
    }

    fn delete_pointer(&self, key: &str, id: &InstanceId) -> Value {
        json!({ "Delete": {
            "TableName": self.tables.instances,
            "Key": instance_key(key),
            "ConditionExpression": "#tg = :id",
            "ExpressionAttributeNames": { "#tg": "target" },
            "ExpressionAttributeValues": { ":id": s(id.as_str()) },
        }})
    }

    /// The instance a pointer item names, if it still carries the pointed-at value.
    async fn follow(
        &self,
        pointer: &str,
        check: impl Fn(&InstanceRecord) -> bool,
    ) -> Result<Option<InstanceRecord>> {
        let Some(p) = self
            .get(&self.tables.instances, instance_key(pointer))
            .await?
        else {
            return Ok(None);
        };
        let target = Reader::new(&p, pointer).s("target")?.to_owned();
        let Some(item) = self
            .get(&self.tables.instances, instance_key(&target))
            .await?
        else {
            return Ok(None);
        };
        let rec = instance_from(&item)?;
        Ok(check(&rec).then_some(rec))
    }
}

fn meta_from(tenant: &TenantId, item: &Item) -> Result<Meta> {
    let what = format!("the inbox counter of tenant {tenant}");
    let r = Reader::new(item, &what);
    Ok(Meta {
        pending: r.opt_n("pending")?.unwrap_or(0),
        deleting: item.contains_key("deleting"),
    })
}

fn table_definitions_for(tables: &Tables) -> Vec<Value> {
    let mut defs = table_definitions("x");
    for (def, name) in defs.iter_mut().zip(tables.all()) {
        def["TableName"] = json!(name);
    }
    defs
}

#[async_trait::async_trait]
impl TenantStore for DynamoRegistry {
    async fn create_tenant(&self, tenant: &Tenant) -> Result<()> {
        let item = tenant_item(tenant)?;
        // One write per tenant creation on this counter: never a hot key.
        let numbered = self
            .client
            .call(
                "UpdateItem",
                &json!({
                    "TableName": self.tables.tenants,
                    "Key": tenant_key(NUMBERS_KEY),
                    "UpdateExpression": "ADD #last :one",
                    "ExpressionAttributeNames": { "#last": "last" },
                    "ExpressionAttributeValues": { ":one": n(1) },
                    "ReturnValues": "UPDATED_NEW",
                }),
            )
            .await
            .map_err(api)?;
        let attrs = numbered["Attributes"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        let incarnation = Reader::new(&attrs, "the tenant numbers").n("last")?;
        let first_seq = incarnation
            .checked_mul(1 << SEQ_BITS)
            .ok_or_else(|| corrupt("the tenant numbers", format!("{incarnation} is too large")))?;
        let actions = vec![
            json!({ "Put": {
                "TableName": self.tables.tenants,
                "Item": item,
                "ConditionExpression": "attribute_not_exists(#id)",
                "ExpressionAttributeNames": { "#id": "tenant_id" },
            }}),
            // No tenant item means any earlier inbox of this id was purged (delete_tenant purges
            // before it deletes the tenant item), so a leftover counter may be overwritten.
            json!({ "Put": {
                "TableName": self.tables.inbox,
                "Item": {
                    "tenant": s(tenant.id.as_str()), "sk": s(META),
                    "next_seq": n(first_seq), "pending": n(0),
                },
            }}),
        ];
        match self.transact(actions).await {
            Ok(()) => Ok(()),
            Err(e) if failed_at(&e, 0) => Err(record::tenant_exists(&tenant.id)),
            Err(e) => Err(api(e)),
        }
    }

    async fn get_tenant(&self, id: &TenantId) -> Result<Option<Tenant>> {
        self.get(&self.tables.tenants, tenant_key(id.as_str()))
            .await?
            .map(|item| tenant_from(&item))
            .transpose()
    }

    async fn list_tenants(&self) -> Result<Vec<Tenant>> {
        let items = self
            .pages(
                "Scan",
                json!({
                    "TableName": self.tables.tenants,
                    "ConsistentRead": true,
                    "FilterExpression": "attribute_exists(#st)",
                    "ExpressionAttributeNames": { "#st": "status" },
                }),
                None,
            )
            .await?;
        let mut tenants = items.iter().map(tenant_from).collect::<Result<Vec<_>>>()?;
        tenants.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(tenants)
    }

    async fn update_tenant(&self, tenant: &Tenant) -> Result<()> {
        let idle_s = to_i64(tenant.idle_timeout_s, "idle timeout")?;
        let idle_ms = idle_s.saturating_mul(1000);
        let names = json!({
            "#id": "tenant_id", "#pr": "profile", "#is": "idle_timeout_s", "#ims": "idle_timeout_ms",
            "#ws": "webhook_secret", "#cs": "cold_start_notice", "#dl": "idle_deadline_ms",
            "#la": "last_active_ms", "#bt": "bot_token", "#lm": "limits",
            "#fam": "freeze_after_ms", "#fd": "freeze_deadline_ms",
        });
        let mut values = json!({
            ":pr": s(&tenant.profile), ":is": n(idle_s), ":ims": n(idle_ms),
            ":ws": s(tenant.webhook_secret.expose()), ":cs": boolean(tenant.cold_start_notice),
            ":lm": s(tenant.limits.to_json()),
            ":fam": n(record::freeze_after_ms(tenant).unwrap_or(NEVER_MS)),
        });
        let mut expr = "SET #pr = :pr, #is = :is, #ims = :ims, #ws = :ws, #cs = :cs, #lm = :lm, \
                        #dl = #la + :ims, #fam = :fam, #fd = #la + :fam"
            .to_owned();
        match &tenant.bot_token {
            Some(token) => {
                expr.push_str(", #bt = :bt");
                values[":bt"] = s(token.expose());
            }
            None => expr.push_str(" REMOVE #bt"),
        }
        let body = json!({
            "TableName": self.tables.tenants,
            "Key": tenant_key(tenant.id.as_str()),
            "UpdateExpression": expr,
            "ConditionExpression": "attribute_exists(#id)",
            "ExpressionAttributeNames": names,
            "ExpressionAttributeValues": values,
        });
        match self.client.call("UpdateItem", &body).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_condition_failed() => Err(record::tenant_not_found(&tenant.id)),
            Err(e) => Err(api(e)),
        }
    }

    async fn delete_tenant(&self, id: &TenantId) -> Result<bool> {
        let inbox = &self.tables.inbox;
        // 1. Stop every inbox write: each one is conditional on `#meta` without `deleting`.
        let flag = json!({
            "TableName": inbox,
            "Key": inbox_key(id, META),
            "UpdateExpression": "SET #del = :yes",
            "ConditionExpression": "attribute_exists(#sk)",
            "ExpressionAttributeNames": { "#del": "deleting", "#sk": "sk" },
            "ExpressionAttributeValues": { ":yes": boolean(true) },
        });
        match self.client.call("UpdateItem", &flag).await {
            Ok(_) => {}
            Err(e) if e.is_condition_failed() => {}
            Err(e) => return Err(api(e)),
        }
        // 2. Purge the inbox partition, `#meta` last.
        let items = self
            .pages(
                "Query",
                json!({
                    "TableName": inbox,
                    "KeyConditionExpression": "#t = :t",
                    "ProjectionExpression": "#t, #sk",
                    "ExpressionAttributeNames": { "#t": "tenant", "#sk": "sk" },
                    "ExpressionAttributeValues": { ":t": s(id.as_str()) },
                    "ConsistentRead": true,
                }),
                None,
            )
            .await?;
        let keys: Vec<Value> = items
            .into_iter()
            .filter(|i| i.get("sk").and_then(|v| v.get("S")).and_then(Value::as_str) != Some(META))
            .map(Value::Object)
            .collect();
        self.batch_delete(inbox, keys).await?;
        // 3. The tenant, then the counter: a crash in between leaves a `deleting` counter, which
        //    blocks nothing and is overwritten by the next create. The counter goes only while
        //    it is still flagged: a create that won the race in between keeps its fresh one.
        let resp = self
            .client
            .call(
                "DeleteItem",
                &json!({
                    "TableName": self.tables.tenants,
                    "Key": tenant_key(id.as_str()),
                    "ReturnValues": "ALL_OLD",
                }),
            )
            .await
            .map_err(api)?;
        let counter = json!({
            "TableName": inbox,
            "Key": inbox_key(id, META),
            "ConditionExpression": "attribute_exists(#del)",
            "ExpressionAttributeNames": { "#del": "deleting" },
        });
        match self.client.call("DeleteItem", &counter).await {
            Ok(_) => {}
            Err(e) if e.is_condition_failed() => {}
            Err(e) => return Err(api(e)),
        }
        Ok(resp
            .get("Attributes")
            .is_some_and(|a| a.as_object().is_some_and(|o| !o.is_empty())))
    }

    async fn set_tenant_status(
        &self,
        id: &TenantId,
        status: TenantStatus,
        fence: Option<u64>,
    ) -> Result<()> {
        let fence = fence.map(|f| to_i64(f, "fence")).transpose()?;
        let mut body = json!({
            "TableName": self.tables.tenants,
            "Key": tenant_key(id.as_str()),
            "UpdateExpression": "SET #st = :st",
            "ConditionExpression": "attribute_exists(#id)",
            "ExpressionAttributeNames": { "#id": "tenant_id", "#st": "status" },
            "ExpressionAttributeValues": { ":st": s(status.as_str()) },
            "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
        });
        if let Some(f) = fence {
            body["UpdateExpression"] = json!("SET #st = :st, #f = :f");
            body["ConditionExpression"] =
                json!("attribute_exists(#id) AND (attribute_not_exists(#f) OR #f <= :f)");
            body["ExpressionAttributeNames"]["#f"] = json!("fence");
            body["ExpressionAttributeValues"][":f"] = n(f);
        }
        match self.client.call("UpdateItem", &body).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_condition_failed() => {
                let stored = match e.failed_item() {
                    Some(item) => Some(item.clone()),
                    None => {
                        self.get(&self.tables.tenants, tenant_key(id.as_str()))
                            .await?
                    }
                };
                match (stored, fence) {
                    (Some(item), Some(f)) => {
                        let stored = Reader::new(&item, "a tenant item")
                            .opt_n("fence")?
                            .unwrap_or(0);
                        Err(record::stale_status(id, f, stored))
                    }
                    _ => Err(record::tenant_not_found(id)),
                }
            }
            Err(e) => Err(api(e)),
        }
    }

    async fn touch_tenant(&self, id: &TenantId, at_ms: i64) -> Result<()> {
        let body = json!({
            "TableName": self.tables.tenants,
            "Key": tenant_key(id.as_str()),
            "UpdateExpression":
                "SET #la = :at, #dl = :at + #ims, #fd = :at + if_not_exists(#fam, :dflt)",
            "ConditionExpression": "attribute_exists(#id)",
            "ExpressionAttributeNames": {
                "#id": "tenant_id", "#la": "last_active_ms", "#dl": "idle_deadline_ms",
                "#ims": "idle_timeout_ms", "#fd": "freeze_deadline_ms", "#fam": "freeze_after_ms",
            },
            "ExpressionAttributeValues": {
                ":at": n(at_ms),
                ":dflt": n(otm_core::tenant::DEFAULT_FREEZE_AFTER_S as i64 * 1000),
            },
        });
        match self.client.call("UpdateItem", &body).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_condition_failed() => Err(record::tenant_not_found(id)),
            Err(e) => Err(api(e)),
        }
    }

    async fn idle_due(&self, now_ms: i64, limit: usize) -> Result<Vec<TenantId>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let items = self
            .pages(
                "Query",
                json!({
                    "TableName": self.tables.tenants,
                    "IndexName": "status-index",
                    "KeyConditionExpression": "#st = :running AND #dl <= :now",
                    "ExpressionAttributeNames": { "#st": "status", "#dl": "idle_deadline_ms" },
                    "ExpressionAttributeValues": {
                        ":running": s(TenantStatus::Running.as_str()), ":now": n(now_ms),
                    },
                }),
                Some(limit),
            )
            .await?;
        items
            .iter()
            .map(|i| {
                let id = Reader::new(i, "a status-index entry").s("tenant_id")?;
                record::tenant_id(id, "tenant item")
            })
            .collect()
    }

    async fn freeze_due(&self, now_ms: i64, limit: usize) -> Result<Vec<TenantId>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let items = self
            .pages(
                "Query",
                json!({
                    "TableName": self.tables.tenants,
                    "IndexName": "freeze-index",
                    "KeyConditionExpression": "#st = :running AND #fd <= :now",
                    "FilterExpression": "#dl > :now",
                    "ExpressionAttributeNames": {
                        "#st": "status", "#fd": "freeze_deadline_ms", "#dl": "idle_deadline_ms",
                    },
                    "ExpressionAttributeValues": {
                        ":running": s(TenantStatus::Running.as_str()), ":now": n(now_ms),
                    },
                }),
                Some(limit),
            )
            .await?;
        items
            .iter()
            .map(|i| {
                let id = Reader::new(i, "a freeze-index entry").s("tenant_id")?;
                record::tenant_id(id, "tenant item")
            })
            .collect()
    }

    async fn frozen_tenants(&self) -> Result<Vec<(TenantId, i64)>> {
        let items = self
            .pages(
                "Query",
                json!({
                    "TableName": self.tables.tenants,
                    "IndexName": "status-index",
                    "KeyConditionExpression": "#st = :frozen",
                    "ExpressionAttributeNames": { "#st": "status" },
                    "ExpressionAttributeValues": { ":frozen": s(TenantStatus::Frozen.as_str()) },
                }),
                None,
            )
            .await?;
        items
            .iter()
            .map(|i| {
                let r = Reader::new(i, "a status-index entry");
                let id = record::tenant_id(r.s("tenant_id")?, "tenant item")?;
                Ok((id, r.n("idle_deadline_ms")?))
            })
            .collect()
    }
}

#[async_trait::async_trait]
impl InstanceStore for DynamoRegistry {
    async fn put_instance(&self, instance: &InstanceRecord, fence: Option<u64>) -> Result<()> {
        let id = &instance.id;
        let fence = fence.map(|f| to_i64(f, "fence")).transpose()?;
        if id.as_str().starts_with('@') {
            return Err(Error::invalid(format!(
                "instance id `{id}` may not start with '@'"
            )));
        }
        if instance
            .surrogate_digest
            .as_ref()
            .is_some_and(|d| d.len() > MAX_DIGEST_LEN)
        {
            return Err(Error::invalid("the surrogate digest is too long"));
        }
        for _ in 0..ROUNDS {
            let old = self.instance_with_pointers(id).await?;
            let mut actions = Vec::new();
            let mut put = json!({ "Put": {
                "TableName": self.tables.instances,
                "Item": instance_item(instance),
            }});
            match &old {
                None => {
                    put["Put"]["ConditionExpression"] = json!("attribute_not_exists(#id)");
                    put["Put"]["ExpressionAttributeNames"] = json!({ "#id": "instance_id" });
                }
                Some((item, _)) => {
                    let (cond, names, values) = Self::unchanged_instance(item)?;
                    put["Put"]["ConditionExpression"] = json!(cond);
                    put["Put"]["ExpressionAttributeNames"] = names;
                    if values.as_object().is_some_and(|v| !v.is_empty()) {
                        put["Put"]["ExpressionAttributeValues"] = values;
                    }
                }
            }
            actions.push(put);
            let new_tenant = instance
                .tenant
                .as_ref()
                .map(|t| format!("{TENANT_POINTER}{t}"));
            let new_digest = instance
                .surrogate_digest
                .as_ref()
                .map(|d| format!("{SURROGATE_POINTER}{d}"));
            let tenant_action = new_tenant.as_ref().map(|key| {
                actions.push(json!({ "Put": {
                    "TableName": self.tables.instances,
                    "Item": { "instance_id": s(key), "target": s(id.as_str()) },
                    "ConditionExpression": "attribute_not_exists(#id) OR #tg = :id",
                    "ExpressionAttributeNames": { "#id": "instance_id", "#tg": "target" },
                    "ExpressionAttributeValues": { ":id": s(id.as_str()) },
                }}));
                actions.len() - 1
            });
            if let Some(key) = &new_digest {
                // Last writer wins, as the newest instance wins in SQLite.
                actions.push(json!({ "Put": {
                    "TableName": self.tables.instances,
                    "Item": { "instance_id": s(key), "target": s(id.as_str()) },
                }}));
            }
            if let Some((_, ours)) = &old {
                for key in ours {
                    if Some(key) != new_tenant.as_ref() && Some(key) != new_digest.as_ref() {
                        actions.push(self.delete_pointer(key, id));
                    }
                }
            }
            // A waker that lost the tenant's lock: its fence is below the tenant's.
            let fence_action = match (fence, &instance.tenant) {
                (Some(f), Some(t)) => {
                    actions.push(json!({ "ConditionCheck": {
                        "TableName": self.tables.tenants,
                        "Key": tenant_key(t.as_str()),
                        "ConditionExpression": "attribute_not_exists(#f) OR #f <= :f",
                        "ExpressionAttributeNames": { "#f": "fence" },
                        "ExpressionAttributeValues": { ":f": n(f) },
                    }}));
                    Some((actions.len() - 1, t, f))
                }
                _ => None,
            };
            match self.transact(actions).await {
                Ok(()) => return Ok(()),
                Err(e) if fence_action.is_some_and(|(i, _, _)| failed_at(&e, i)) => {
                    let (_, t, f) = fence_action.expect("checked");
                    let stored = match self
                        .get(&self.tables.tenants, tenant_key(t.as_str()))
                        .await?
                    {
                        Some(item) => Reader::new(&item, "a tenant item")
                            .opt_n("fence")?
                            .unwrap_or(0),
                        None => 0,
                    };
                    return Err(record::stale_waker(t, f, stored));
                }
                Err(e) if tenant_action.is_some_and(|i| failed_at(&e, i)) => {
                    // Only a record with a tenant has a tenant action.
                    return Err(match &instance.tenant {
                        Some(t) => record::bound_elsewhere(t, id),
                        None => Error::conflict(format!("instance {id} was not written")),
                    });
                }
                Err(e) if e.cancellation_codes().is_some() => continue,
                Err(e) => return Err(api(e)),
            }
        }
        Err(Error::conflict(format!(
            "instance {id} kept changing while it was written; try again"
        )))
    }

    async fn get_instance(&self, id: &InstanceId) -> Result<Option<InstanceRecord>> {
        if id.as_str().starts_with('@') || id.as_str().is_empty() {
            return Ok(None);
        }
        self.get(&self.tables.instances, instance_key(id.as_str()))
            .await?
            .map(|item| instance_from(&item))
            .transpose()
    }

    async fn instance_of(&self, tenant: &TenantId) -> Result<Option<InstanceRecord>> {
        self.follow(&format!("{TENANT_POINTER}{tenant}"), |r| {
            r.tenant.as_ref() == Some(tenant)
        })
        .await
    }

    async fn instance_by_surrogate(&self, digest: &str) -> Result<Option<InstanceRecord>> {
        if digest.is_empty() || digest.len() > MAX_DIGEST_LEN {
            return Ok(None);
        }
        self.follow(&format!("{SURROGATE_POINTER}{digest}"), |r| {
            r.surrogate_digest.as_deref() == Some(digest)
        })
        .await
    }

    async fn list_instances(&self) -> Result<Vec<InstanceRecord>> {
        let items = self
            .pages(
                "Scan",
                json!({
                    "TableName": self.tables.instances,
                    "ConsistentRead": true,
                    "FilterExpression": "attribute_exists(#st)",
                    "ExpressionAttributeNames": { "#st": "state" },
                }),
                None,
            )
            .await?;
        let mut out = items
            .iter()
            .map(instance_from)
            .collect::<Result<Vec<_>>>()?;
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn delete_instance(&self, id: &InstanceId) -> Result<bool> {
        if id.as_str().starts_with('@') || id.as_str().is_empty() {
            return Ok(false);
        }
        for _ in 0..ROUNDS {
            let Some((item, ours)) = self.instance_with_pointers(id).await? else {
                return Ok(false);
            };
            let (cond, names, values) = Self::unchanged_instance(&item)?;
            let mut delete = json!({ "Delete": {
                "TableName": self.tables.instances,
                "Key": instance_key(id.as_str()),
                "ConditionExpression": cond,
                "ExpressionAttributeNames": names,
            }});
            if values.as_object().is_some_and(|v| !v.is_empty()) {
                delete["Delete"]["ExpressionAttributeValues"] = values;
            }
            let mut actions = vec![delete];
            actions.extend(ours.iter().map(|key| self.delete_pointer(key, id)));
            match self.transact(actions).await {
                Ok(()) => return Ok(true),
                Err(e) if e.cancellation_codes().is_some() => continue,
                Err(e) => return Err(api(e)),
            }
        }
        Err(Error::conflict(format!(
            "instance {id} kept changing while it was deleted; try again"
        )))
    }

    async fn claim_warm_instance(&self, tenant: &TenantId) -> Result<Option<InstanceRecord>> {
        let mut tried: HashSet<String> = HashSet::new();
        for _ in 0..ROUNDS {
            // The index is eventually consistent: a candidate may be taken already, and the
            // conditional write below finds out.
            let candidates = self
                .pages(
                    "Query",
                    json!({
                        "TableName": self.tables.instances,
                        "IndexName": "state-index",
                        "KeyConditionExpression": "#st = :warm",
                        "ExpressionAttributeNames": { "#st": "state" },
                        "ExpressionAttributeValues": { ":warm": s(InstanceState::Warm.as_str()) },
                    }),
                    Some(32),
                )
                .await?;
            let fresh: Vec<String> = candidates
                .iter()
                .filter(|c| !c.contains_key("tenant"))
                .filter_map(|c| c.get("instance_id")?.get("S")?.as_str().map(str::to_owned))
                .filter(|id| !tried.contains(id))
                .collect();
            if fresh.is_empty() {
                return Ok(None);
            }
            for id in fresh {
                tried.insert(id.clone());
                let actions = vec![
                    json!({ "Update": {
                        "TableName": self.tables.instances,
                        "Key": instance_key(&id),
                        "UpdateExpression": "SET #t = :t, #st = :binding, #ba = :now",
                        "ConditionExpression": "attribute_exists(#id) AND attribute_not_exists(#t) AND #st = :warm",
                        "ExpressionAttributeNames": {
                            "#id": "instance_id", "#t": "tenant", "#st": "state", "#ba": "bound_at_ms",
                        },
                        "ExpressionAttributeValues": {
                            ":t": s(tenant.as_str()),
                            ":binding": s(InstanceState::Binding.as_str()),
                            ":warm": s(InstanceState::Warm.as_str()),
                            ":now": n(otm_core::time::now_ms()),
                        },
                    }}),
                    json!({ "Put": {
                        "TableName": self.tables.instances,
                        "Item": { "instance_id": s(format!("{TENANT_POINTER}{tenant}")), "target": s(&id) },
                        "ConditionExpression": "attribute_not_exists(#id)",
                        "ExpressionAttributeNames": { "#id": "instance_id" },
                    }}),
                ];
                match self.transact(actions).await {
                    Ok(()) => {
                        if let Some(rec) = self.get_instance(&InstanceId::new(id)).await? {
                            return Ok(Some(rec));
                        }
                    }
                    Err(e) if failed_at(&e, 1) => {
                        return Err(record::already_bound(tenant));
                    }
                    Err(e) if e.cancellation_codes().is_some() => {}
                    Err(e) => return Err(api(e)),
                }
            }
        }
        Ok(None)
    }

    async fn get_settings(&self) -> Result<FleetSettings> {
        match self
            .get(&self.tables.tenants, tenant_key(SETTINGS_KEY))
            .await?
        {
            None => Ok(FleetSettings::default()),
            Some(item) => {
                let raw = Reader::new(&item, "the fleet settings").s("fleet")?;
                serde_json::from_str(raw).map_err(|e| corrupt("the fleet settings", e))
            }
        }
    }

    async fn put_settings(&self, settings: &FleetSettings) -> Result<()> {
        let value = serde_json::to_string(settings).map_err(|e| Error::generic(BACKEND, e))?;
        self.client
            .call(
                "PutItem",
                &json!({
                    "TableName": self.tables.tenants,
                    "Item": { "tenant_id": s(SETTINGS_KEY), "fleet": s(value) },
                }),
            )
            .await
            .map_err(api)?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl Inbox for DynamoRegistry {
    async fn inbox_append(
        &self,
        tenant: &TenantId,
        update_id: i64,
        payload: &[u8],
    ) -> Result<Appended> {
        let inbox = &self.tables.inbox;
        // A repeat costs one read and takes no sequence number.
        if self
            .get(inbox, inbox_key(tenant, &u_sk(update_id)))
            .await?
            .is_some()
        {
            return Ok(Appended::Duplicate);
        }
        let alloc = json!({
            "TableName": inbox,
            "Key": inbox_key(tenant, META),
            "UpdateExpression": "ADD #ns :one",
            "ConditionExpression": "attribute_exists(#sk) AND attribute_not_exists(#del)",
            "ExpressionAttributeNames": { "#ns": "next_seq", "#sk": "sk", "#del": "deleting" },
            "ExpressionAttributeValues": { ":one": n(1) },
            "ReturnValues": "UPDATED_NEW",
        });
        let seq = match self.client.call("UpdateItem", &alloc).await {
            Ok(resp) => {
                let attrs = resp["Attributes"].as_object().cloned().unwrap_or_default();
                Reader::new(&attrs, &format!("the inbox counter of tenant {tenant}"))
                    .n("next_seq")?
            }
            Err(e) if e.is_condition_failed() => {
                return Err(record::tenant_not_found(tenant));
            }
            Err(e) => return Err(api(e)),
        };
        if seq % (1 << SEQ_BITS) == 0 {
            return Err(Error::generic(
                BACKEND,
                format!(
                    "the inbox of tenant {tenant} ran out of sequence numbers; delete and re-create the tenant"
                ),
            ));
        }
        let now = otm_core::time::now_ms();
        let actions = vec![
            json!({ "Put": {
                "TableName": inbox,
                "Item": {
                    "tenant": s(tenant.as_str()), "sk": s(u_sk(update_id)),
                    "seq": n(seq), "accepted_at_ms": n(now),
                },
                "ConditionExpression": "attribute_not_exists(#sk)",
                "ExpressionAttributeNames": { "#sk": "sk" },
            }}),
            json!({ "Put": {
                "TableName": inbox,
                "Item": {
                    "tenant": s(tenant.as_str()), "sk": s(q_sk(seq)), "seq": n(seq),
                    "update_id": n(update_id), "payload": b(payload), "attempts": n(0),
                    "accepted_at_ms": n(now),
                },
                "ConditionExpression": "attribute_not_exists(#sk)",
                "ExpressionAttributeNames": { "#sk": "sk" },
            }}),
            self.meta_update(tenant, 1, true),
        ];
        match self.transact(actions).await {
            Ok(()) => Ok(Appended::Stored { seq }),
            Err(e) if failed_at(&e, 0) => Ok(Appended::Duplicate),
            Err(e) if failed_at(&e, 2) => Err(record::tenant_not_found(tenant)),
            Err(e) if failed_at(&e, 1) => Err(corrupt(
                format!("the inbox of tenant {tenant}"),
                format!("sequence number {seq} was handed out twice"),
            )),
            Err(e) => Err(api(e)),
        }
    }

    async fn inbox_next(&self, tenant: &TenantId) -> Result<Option<InboxItem>> {
        Ok(self
            .inbox_range(tenant, "q#", None, 1)
            .await?
            .into_iter()
            .next())
    }

    async fn inbox_head(&self, tenant: &TenantId, limit: usize) -> Result<Vec<InboxItem>> {
        self.inbox_range(tenant, "q#", None, limit).await
    }

    /// Acking a dead-lettered update (an operator redelivered it) moves it to done as well;
    /// acking a delivered one again changes nothing.
    async fn inbox_ack(&self, tenant: &TenantId, seq: i64, fence: Option<u64>) -> Result<()> {
        let inbox = &self.tables.inbox;
        let fence = fence.map(|f| to_i64(f, "fence")).transpose()?;
        for _ in 0..ROUNDS {
            let found = self
                .batch_get(
                    inbox,
                    vec![
                        inbox_key(tenant, &q_sk(seq)),
                        inbox_key(tenant, &x_sk(seq)),
                        inbox_key(tenant, &d_sk(seq)),
                    ],
                )
                .await?;
            let find = |sk: &str| {
                found.iter().find(|i| {
                    i.get("sk").and_then(|v| v.get("S")).and_then(Value::as_str) == Some(sk)
                })
            };
            let (source, pending) = match (find(&q_sk(seq)), find(&x_sk(seq)), find(&d_sk(seq))) {
                (Some(q), _, _) => (q, true),
                (None, Some(x), _) => (x, false),
                (None, None, Some(_)) if fence.is_none() => return Ok(()),
                (None, None, Some(_)) => {
                    // Already done; a stale dispatcher still learns it lost the inbox.
                    let check = Self::fenced(self.meta_check(tenant), fence);
                    return match self.transact(vec![check]).await {
                        Ok(()) => Ok(()),
                        Err(e) if failed_at(&e, 0) => {
                            self.check_dispatch_fence(tenant, fence).await?;
                            Err(record::tenant_not_found(tenant))
                        }
                        Err(e) => Err(api(e)),
                    };
                }
                (None, None, None) => {
                    return Err(record::update_not_found(tenant, seq));
                }
            };
            let entry = inbox_item_from(tenant, source)?;
            let source_sk = if pending { q_sk(seq) } else { x_sk(seq) };
            let actions = vec![
                json!({ "Delete": {
                    "TableName": inbox,
                    "Key": inbox_key(tenant, &source_sk),
                    "ConditionExpression": "attribute_exists(#sk)",
                    "ExpressionAttributeNames": { "#sk": "sk" },
                }}),
                json!({ "Put": {
                    "TableName": inbox,
                    "Item": {
                        "tenant": s(tenant.as_str()), "sk": s(d_sk(seq)), "seq": n(seq),
                        "update_id": n(entry.update_id), "accepted_at_ms": n(entry.accepted_at_ms),
                        "done_at_ms": n(otm_core::time::now_ms()), "done_shard": s(done_shard(tenant, seq)),
                    },
                }}),
                Self::fenced(
                    if pending {
                        self.meta_update(tenant, -1, false)
                    } else {
                        self.meta_check(tenant)
                    },
                    fence,
                ),
            ];
            match self.transact(actions).await {
                Ok(()) => return Ok(()),
                Err(e) if failed_at(&e, 2) => {
                    let missing = record::update_not_found(tenant, seq);
                    self.check_dispatch_fence(tenant, fence).await?;
                    return Err(missing);
                }
                // Moved by someone else in between: look again.
                Err(e) if e.cancellation_codes().is_some() => continue,
                Err(e) => return Err(api(e)),
            }
        }
        Err(Error::conflict(format!(
            "update {seq} of tenant {tenant} kept changing while it was acknowledged; try again"
        )))
    }

    async fn inbox_fail(
        &self,
        tenant: &TenantId,
        seq: i64,
        error: &str,
        max_attempts: u32,
        fence: Option<u64>,
    ) -> Result<FailOutcome> {
        let inbox = &self.tables.inbox;
        let error = truncate(error, record::MAX_ERROR_LEN);
        let fence = fence.map(|f| to_i64(f, "fence")).transpose()?;
        for _ in 0..ROUNDS {
            let Some(item) = self.get(inbox, inbox_key(tenant, &q_sk(seq))).await? else {
                let other = self
                    .batch_get(
                        inbox,
                        vec![inbox_key(tenant, &x_sk(seq)), inbox_key(tenant, &d_sk(seq))],
                    )
                    .await?;
                let state = other
                    .iter()
                    .find_map(|i| i.get("sk")?.get("S")?.as_str())
                    .map(|sk| if sk.starts_with('x') { "dead" } else { "done" });
                self.check_dispatch_fence(tenant, fence).await?;
                return Err(match state {
                    Some(state) => record::not_pending(tenant, seq, state),
                    None => record::update_not_found(tenant, seq),
                });
            };
            let mut entry = inbox_item_from(tenant, &item)?;
            let before = entry.attempts;
            let attempts = before.saturating_add(1);
            if attempts < max_attempts {
                let body = json!({
                    "TableName": inbox,
                    "Key": inbox_key(tenant, &q_sk(seq)),
                    "UpdateExpression": "SET #a = :a, #le = :e",
                    "ConditionExpression": "#a = :before",
                    "ExpressionAttributeNames": { "#a": "attempts", "#le": "last_error" },
                    "ExpressionAttributeValues": {
                        ":a": n(i64::from(attempts)), ":e": s(&error), ":before": n(i64::from(before)),
                    },
                });
                if fence.is_none() {
                    match self.client.call("UpdateItem", &body).await {
                        Ok(_) => return Ok(FailOutcome::Retry { attempts }),
                        Err(e) if e.is_condition_failed() => continue,
                        Err(e) => return Err(api(e)),
                    }
                }
                let mut update = body;
                if let Some(o) = update.as_object_mut() {
                    o.remove("ReturnValuesOnConditionCheckFailure");
                }
                let actions = vec![
                    json!({ "Update": update }),
                    Self::fenced(self.meta_check(tenant), fence),
                ];
                match self.transact(actions).await {
                    Ok(()) => return Ok(FailOutcome::Retry { attempts }),
                    Err(e) if failed_at(&e, 1) => {
                        let missing = record::tenant_not_found(tenant);
                        self.check_dispatch_fence(tenant, fence).await?;
                        return Err(missing);
                    }
                    Err(e) if e.cancellation_codes().is_some() => continue,
                    Err(e) => return Err(api(e)),
                }
            }
            entry.attempts = attempts;
            entry.last_error = Some(error.clone());
            let actions = vec![
                json!({ "Delete": {
                    "TableName": inbox,
                    "Key": inbox_key(tenant, &q_sk(seq)),
                    "ConditionExpression": "#a = :before",
                    "ExpressionAttributeNames": { "#a": "attempts" },
                    "ExpressionAttributeValues": { ":before": n(i64::from(before)) },
                }}),
                json!({ "Put": {
                    "TableName": inbox,
                    "Item": {
                        "tenant": s(tenant.as_str()), "sk": s(x_sk(seq)), "seq": n(seq),
                        "update_id": n(entry.update_id), "payload": b(&entry.payload),
                        "attempts": n(i64::from(attempts)), "accepted_at_ms": n(entry.accepted_at_ms),
                        "last_error": s(&error),
                    },
                }}),
                Self::fenced(self.meta_update(tenant, -1, false), fence),
            ];
            match self.transact(actions).await {
                Ok(()) => return Ok(FailOutcome::DeadLettered),
                Err(e) if failed_at(&e, 2) => {
                    let missing = record::update_not_found(tenant, seq);
                    self.check_dispatch_fence(tenant, fence).await?;
                    return Err(missing);
                }
                Err(e) if e.cancellation_codes().is_some() => continue,
                Err(e) => return Err(api(e)),
            }
        }
        Err(Error::conflict(format!(
            "update {seq} of tenant {tenant} kept changing while its failure was recorded; try again"
        )))
    }

    async fn inbox_retry(&self, tenant: &TenantId, which: DeadLetters) -> Result<Vec<i64>> {
        self.move_dead(tenant, which, true).await
    }

    async fn inbox_drop(&self, tenant: &TenantId, which: DeadLetters) -> Result<Vec<i64>> {
        self.move_dead(tenant, which, false).await
    }

    async fn inbox_claim(&self, tenant: &TenantId, fence: u64) -> Result<()> {
        let f = to_i64(fence, "fence")?;
        let Value::Object(mut action) = Self::fenced(self.meta_check(tenant), Some(f)) else {
            unreachable!("fenced returns an object");
        };
        let mut body = action.remove("Update").unwrap_or_default();
        body["ReturnValuesOnConditionCheckFailure"] = json!("ALL_OLD");
        match self.client.call("UpdateItem", &body).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_condition_failed() => {
                self.check_dispatch_fence(tenant, Some(f)).await?;
                Err(record::tenant_not_found(tenant))
            }
            Err(e) => Err(api(e)),
        }
    }

    async fn inbox_view(
        &self,
        tenant: &TenantId,
        after: Option<i64>,
        limit: usize,
    ) -> Result<InboxView> {
        let (pending, dead) = futures::try_join!(
            self.inbox_range(tenant, "q#", after, limit),
            self.inbox_range(tenant, "x#", after, limit)
        )?;
        Ok(InboxView { pending, dead })
    }

    async fn inbox_depth(&self, tenant: &TenantId) -> Result<u64> {
        Ok(self
            .meta(tenant)
            .await?
            .map_or(0, |m| u64::try_from(m.pending).unwrap_or(0)))
    }

    async fn inbox_pending_tenants(&self) -> Result<Vec<TenantId>> {
        let inbox = &self.tables.inbox;
        let shards = (0..SHARDS).map(|shard| {
            self.pages(
                "Query",
                json!({
                    "TableName": inbox,
                    "IndexName": "pending-index",
                    "KeyConditionExpression": "#ps = :s",
                    "ExpressionAttributeNames": { "#ps": "pending_shard" },
                    "ExpressionAttributeValues": { ":s": s(shard.to_string()) },
                }),
                None,
            )
        });
        let mut candidates = Vec::new();
        for items in futures::future::try_join_all(shards).await? {
            for i in items {
                let t = Reader::new(&i, "a pending-index entry").s("tenant")?;
                candidates.push(record::tenant_id(t, "inbox of")?);
            }
        }
        // The index lags: confirm each candidate with a consistent read, and clear the marker of
        // tenants whose inbox drained.
        let keys = candidates.iter().map(|t| inbox_key(t, META)).collect();
        let metas = self.batch_get(inbox, keys).await?;
        let mut out = Vec::new();
        for item in metas {
            let t = Reader::new(&item, "an inbox counter").s("tenant")?;
            let tenant = record::tenant_id(t, "inbox of")?;
            let meta = meta_from(&tenant, &item)?;
            if meta.deleting {
                continue;
            }
            if meta.pending > 0 {
                out.push(tenant);
                continue;
            }
            let clear = json!({
                "TableName": inbox,
                "Key": inbox_key(&tenant, META),
                "UpdateExpression": "REMOVE #ps",
                "ConditionExpression": "#p <= :zero",
                "ExpressionAttributeNames": { "#ps": "pending_shard", "#p": "pending" },
                "ExpressionAttributeValues": { ":zero": n(0) },
            });
            match self.client.call("UpdateItem", &clear).await {
                Ok(_) => {}
                // An update arrived in between.
                Err(e) if e.is_condition_failed() => out.push(tenant),
                Err(e) => return Err(api(e)),
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    async fn inbox_prune(&self, before_ms: i64) -> Result<u64> {
        let inbox = &self.tables.inbox;
        let shards = (0..SHARDS).map(|shard| {
            self.pages(
                "Query",
                json!({
                    "TableName": inbox,
                    "IndexName": "done-index",
                    "KeyConditionExpression": "#ds = :s AND #acc < :before",
                    "ExpressionAttributeNames": { "#ds": "done_shard", "#acc": "accepted_at_ms" },
                    "ExpressionAttributeValues": { ":s": s(shard.to_string()), ":before": n(before_ms) },
                }),
                None,
            )
        });
        let done: Vec<Item> = futures::future::try_join_all(shards)
            .await?
            .into_iter()
            .flatten()
            .collect();
        let pruned: Vec<bool> = stream::iter(done)
            .map(|item| async move {
                let r = Reader::new(&item, "a done-index entry");
                let tenant = r.s("tenant")?;
                let tenant = record::tenant_id(tenant, "inbox of")?;
                let (seq, update_id) = (r.n("seq")?, r.n("update_id")?);
                // The marker first, and only if it is still this update's: a crash in between
                // leaves the `d#` item, which the next prune finds again.
                let marker = json!({
                    "TableName": inbox,
                    "Key": inbox_key(&tenant, &u_sk(update_id)),
                    "ConditionExpression": "#seq = :seq",
                    "ExpressionAttributeNames": { "#seq": "seq" },
                    "ExpressionAttributeValues": { ":seq": n(seq) },
                });
                match self.client.call("DeleteItem", &marker).await {
                    Ok(_) => {}
                    Err(e) if e.is_condition_failed() => {}
                    Err(e) => return Err(api(e)),
                }
                let resp = self
                    .client
                    .call(
                        "DeleteItem",
                        &json!({ "TableName": inbox, "Key": inbox_key(&tenant, &d_sk(seq)), "ReturnValues": "ALL_OLD" }),
                    )
                    .await
                    .map_err(api)?;
                Ok::<_, Error>(resp["Attributes"].as_object().is_some_and(|a| !a.is_empty()))
            })
            .buffer_unordered(CONCURRENCY)
            .try_collect()
            .await?;
        Ok(pruned.into_iter().filter(|p| *p).count() as u64)
    }
}

const AUDIT: &str = "@audit";
const TOKENS: &str = "@tokens";

fn token_from(item: &Item) -> Result<otm_core::AdminToken> {
    let r = Reader::new(item, "an admin token item");
    Ok(otm_core::AdminToken {
        name: r.s("name")?.to_owned(),
        digest: r.s("digest")?.to_owned(),
        read_only: r.bool("read_only")?,
        created_at_ms: r.n("created_at_ms")?,
    })
}

impl DynamoRegistry {
    async fn tokens(&self) -> Result<Vec<otm_core::AdminToken>> {
        let items = self
            .pages(
                "Query",
                json!({
                    "TableName": self.tables.inbox,
                    "KeyConditionExpression": "#t = :t",
                    "ExpressionAttributeNames": { "#t": "tenant" },
                    "ExpressionAttributeValues": { ":t": s(TOKENS) },
                    "ConsistentRead": true,
                }),
                None,
            )
            .await?;
        items.iter().map(token_from).collect()
    }
}

#[async_trait::async_trait]
impl otm_core::AdminStore for DynamoRegistry {
    async fn audit_append(&self, e: &otm_core::AuditEntry) -> Result<()> {
        let mut item = json!({
            "tenant": s(AUDIT), "sk": s(format!("a#{:020}", e.id)), "id": n(e.id),
            "at_ms": n(e.at_ms), "who": s(&e.who), "method": s(&e.method), "route": s(&e.route),
            "status": n(i64::from(e.status)),
        });
        if let Some(t) = &e.tenant {
            item["audit_tenant"] = s(t);
        }
        self.client
            .call(
                "PutItem",
                &json!({ "TableName": self.tables.inbox, "Item": item }),
            )
            .await
            .map_err(api)?;
        Ok(())
    }

    async fn audit_list(
        &self,
        limit: usize,
        before: Option<i64>,
    ) -> Result<Vec<otm_core::AuditEntry>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let below = before.map_or_else(|| "a$".to_owned(), |b| format!("a#{b:020}"));
        let items = self
            .pages(
                "Query",
                json!({
                    "TableName": self.tables.inbox,
                    "KeyConditionExpression": "#t = :t AND #sk < :b",
                    "ExpressionAttributeNames": { "#t": "tenant", "#sk": "sk" },
                    "ExpressionAttributeValues": { ":t": s(AUDIT), ":b": s(below) },
                    "ScanIndexForward": false,
                    "ConsistentRead": true,
                }),
                Some(limit),
            )
            .await?;
        items
            .iter()
            .map(|i| {
                let r = Reader::new(i, "an audit item");
                Ok(otm_core::AuditEntry {
                    id: r.n("id")?,
                    at_ms: r.n("at_ms")?,
                    who: r.s("who")?.to_owned(),
                    method: r.s("method")?.to_owned(),
                    route: r.s("route")?.to_owned(),
                    tenant: r.opt_s("audit_tenant")?.map(str::to_owned),
                    status: u16::try_from(r.n("status")?).unwrap_or(0),
                })
            })
            .collect()
    }

    async fn token_create(&self, t: &otm_core::AdminToken) -> Result<()> {
        let body = json!({
            "TableName": self.tables.inbox,
            "Item": {
                "tenant": s(TOKENS), "sk": s(format!("t#{}", t.name)), "name": s(&t.name),
                "digest": s(&t.digest), "read_only": boolean(t.read_only),
                "created_at_ms": n(t.created_at_ms),
            },
            "ConditionExpression": "attribute_not_exists(#sk)",
            "ExpressionAttributeNames": { "#sk": "sk" },
        });
        match self.client.call("PutItem", &body).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_condition_failed() => Err(Error::AlreadyExists {
                what: format!("admin token {}", t.name),
            }),
            Err(e) => Err(api(e)),
        }
    }

    async fn token_by_digest(&self, digest: &str) -> Result<Option<otm_core::AdminToken>> {
        Ok(self
            .tokens()
            .await?
            .into_iter()
            .find(|t| t.digest == digest))
    }

    async fn token_list(&self) -> Result<Vec<otm_core::AdminToken>> {
        let mut list = self.tokens().await?;
        list.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(list)
    }

    async fn token_revoke(&self, name: &str) -> Result<bool> {
        let body = json!({
            "TableName": self.tables.inbox,
            "Key": { "tenant": s(TOKENS), "sk": s(format!("t#{name}")) },
            "ReturnValues": "ALL_OLD",
        });
        let resp = self.client.call("DeleteItem", &body).await.map_err(api)?;
        Ok(resp["Attributes"]
            .as_object()
            .is_some_and(|a| !a.is_empty()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use otm_core::Secret;

    #[test]
    fn parses_urls() {
        let o = Options::parse("dynamodb://otm-prod").unwrap();
        assert_eq!(
            o,
            Options {
                prefix: "otm-prod".into(),
                endpoint: None,
                region: None,
                create_tables: false
            }
        );
        let o = Options::parse(
            "dynamodb://otm_t.1/?endpoint=http://127.0.0.1:5055&region=eu-west-1&create_tables=true",
        )
        .unwrap();
        assert_eq!(o.prefix, "otm_t.1");
        assert_eq!(o.endpoint.as_deref(), Some("http://127.0.0.1:5055"));
        assert_eq!(o.region.as_deref(), Some("eu-west-1"));
        assert!(o.create_tables);
        let o = Options::parse("dynamodb://p?endpoint=http%3A%2F%2Flocalhost%3A8000").unwrap();
        assert_eq!(o.endpoint.as_deref(), Some("http://localhost:8000"));
        for bad in [
            "dynamodb://",
            "dynamodb://a b",
            "dynamodb://p?color=red",
            "dynamodb://p?create_tables=maybe",
            "postgres://x",
        ] {
            assert!(
                matches!(Options::parse(bad), Err(Error::InvalidInput { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn sort_keys_order_by_sequence() {
        assert!(q_sk(9) < q_sk(10));
        assert!(q_sk(99_999) < q_sk(i64::MAX));
        assert_eq!(q_sk(i64::MAX).len(), 2 + 20);
        assert_eq!(u_sk(-5), "u#-5");
    }

    #[test]
    fn shards_are_stable_and_in_range() {
        let t = TenantId::parse("alice").unwrap();
        assert_eq!(pending_shard(&t), pending_shard(&t));
        let all: HashSet<String> = (0..1000).map(|i| done_shard(&t, i)).collect();
        assert_eq!(
            all.len() as u64,
            SHARDS,
            "done items spread over every shard"
        );
        assert!(all.iter().all(|s| s.parse::<u64>().unwrap() < SHARDS));
    }

    #[test]
    fn tenant_items_round_trip() {
        let mut t = Tenant::new(
            TenantId::parse("bob").unwrap(),
            "reference",
            Some(Secret::new("1:x")),
        );
        t.idle_timeout_s = 45;
        let item = tenant_item(&t).unwrap();
        assert_eq!(item["idle_deadline_ms"], n(t.last_active_ms + 45_000));
        assert_eq!(tenant_from(item.as_object().unwrap()).unwrap(), t);
        t.bot_token = None;
        let item = tenant_item(&t).unwrap();
        assert!(item.get("bot_token").is_none());
        assert_eq!(tenant_from(item.as_object().unwrap()).unwrap(), t);
    }

    #[test]
    fn the_documented_tables_match_the_code() {
        let doc: Value = serde_json::from_str(include_str!("../../../docs/dynamodb-tables.json"))
            .expect("docs/dynamodb-tables.json is JSON");
        assert_eq!(
            doc["Tables"],
            Value::Array(table_definitions("otm")),
            "docs/dynamodb-tables.json must list table_definitions(\"otm\")"
        );
    }
}
