//! [`PostgresRegistry`]: the [`Registry`](otm_core::Registry) on PostgreSQL, for fleets that outgrow one machine.
//!
//! Behaves exactly like [`crate::SqliteRegistry`], down to which error each call returns, but every
//! write is one atomic statement that is safe with many callers in many processes:
//! - [`Inbox::inbox_append`] uses group commit: the appends that arrive while earlier ones are
//!   being written go together in one multi-row statement (one transaction, one WAL flush), which
//!   locks their tenants' rows in id order and inserts with
//!   `ON CONFLICT (tenant, update_id) DO NOTHING`. Appends to one tenant thus commit in sequence
//!   order, so a dispatcher never sees a lower sequence number appear after a higher one; batches
//!   that share no tenant run side by side.
//! - [`TenantStore::set_tenant_status`] checks the fence inside its `UPDATE … WHERE fence <= $n`.
//! - [`InstanceStore::claim_warm_instance`] picks its row with `FOR UPDATE SKIP LOCKED`: concurrent
//!   claimers take different instances or nothing, never the same one.
//! - [`Inbox::inbox_ack`] and [`Inbox::inbox_fail`] are single `UPDATE`s.
//!
//! A write is durable when it returns: PostgreSQL commits each statement before answering, and a
//! connection whose session has `synchronous_commit = off` is switched back on. The exceptions are
//! the writes that redelivery makes safe to lose, as on SQLite: an acknowledgement, a failed
//! attempt and the tenant's activity time turn `synchronous_commit` off for their own statement
//! (`set_config(…, true)` inside it), so their commit does not wait for the WAL flush. They
//! survive a crash of the server's processes, and a crash of its machine can undo only the last
//! fraction of a second of them: an update delivered again (agents drop repeated `update_id`s),
//! an attempt counted again.
//!
//! Connections: a `deadpool-postgres` pool (at most [`PostgresOptions::pool_size`]), opened on
//! demand and kept, each with its cache of prepared statements (unbounded: the registry runs a
//! fixed set of statements); a connection found closed is dropped when it is next taken. Around it, this module keeps what the pool does not do:
//! - a new connection whose session has `synchronous_commit = off` is switched back on before
//!   the pool hands it out;
//! - a call abandoned mid-statement (its timeout ran out, or its caller went away) asks the
//!   server to cancel the statement and takes the connection out of the pool, since its answer
//!   is still on the way;
//! - a connection that broke is taken out of the pool, with the idle ones (they may have died
//!   with it), and a call that lost its connection is retried once on a fresh one when
//!   repeating it cannot change its answer (reads and idempotent writes);
//! - a statement that a concurrent schema change invalidated empties the connection's
//!   statement cache and is run again.
//!
//! Every call is bounded by [`PostgresOptions::timeout`], waiting for a connection included.
//!
//! The schema lives in [`MIGRATIONS`], applied in order at connect time inside one transaction
//! under an advisory lock, and tracked in `otm_schema_version`. Tables live in the connection's
//! default schema, or in a schema of their own ([`PostgresOptions::schema`], or `?schema=name` in
//! the URL), which lets several fleets or test runs share a database.
//!
//! The URL may hold a password: it never appears in an error, a log line or `Debug` output.

use crate::record::{self, InboxRow, InstanceRow, TenantRow, deadline, to_i64};
use otm_core::{
    Appended, DeadLetters, Error, FailOutcome, FleetSettings, Inbox, InboxItem, InboxView,
    InstanceId, InstanceRecord, InstanceStore, Result, Secret, Tenant, TenantId, TenantStatus,
    TenantStore,
};
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Config, Row};

pub mod tls;
use tls::RustlsConnect;

const BACKEND: &str = "postgres";

/// Connections in the pool unless [`PostgresOptions::pool_size`] says otherwise.
pub const DEFAULT_POOL_SIZE: usize = 8;
/// How long one call may take, waiting for a connection included, unless
/// [`PostgresOptions::timeout`] says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// TCP connect timeout when the URL sets none (`connect_timeout=`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for the migrations (another process may hold the migration lock).
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(120);
/// The settings row that holds [`FleetSettings`].
const FLEET_KEY: &str = "fleet";
/// The advisory lock that serializes migrations across processes: "otm-mig" in ASCII.
const MIGRATION_LOCK: i64 = 0x006f_746d_2d6d_6967;

/// The schema, one step per entry. Step `n` (1-based) is recorded as version `n` in
/// `otm_schema_version`. Never edit a released step; add a new one.
///
/// Identifier columns use the `"C"` collation, so `ORDER BY id` is byte order, as in SQLite and
/// in Rust, whatever the database's locale.
pub const MIGRATIONS: &[&str] = &[
    // 1: tenants, instances, inbox, settings.
    r#"
    CREATE TABLE tenants (
        id                TEXT COLLATE "C" PRIMARY KEY,
        profile           TEXT NOT NULL,
        idle_timeout_s    BIGINT NOT NULL,
        bot_token         TEXT,
        webhook_secret    TEXT NOT NULL,
        cold_start_notice BOOLEAN NOT NULL DEFAULT false,
        status            TEXT NOT NULL,
        created_at_ms     BIGINT NOT NULL,
        last_active_ms    BIGINT NOT NULL,
        idle_deadline_ms  BIGINT NOT NULL,
        fence             BIGINT NOT NULL DEFAULT 0
    );
    -- idle_due: running tenants by deadline, cheap with 100,000 tenants.
    CREATE INDEX tenants_idle ON tenants (status, idle_deadline_ms);

    CREATE TABLE instances (
        id               TEXT COLLATE "C" PRIMARY KEY,
        tenant           TEXT COLLATE "C" UNIQUE,
        state            TEXT NOT NULL,
        address          TEXT NOT NULL,
        shim_token       TEXT NOT NULL,
        surrogate_digest TEXT,
        created_at_ms    BIGINT NOT NULL,
        bound_at_ms      BIGINT
    );
    CREATE INDEX instances_surrogate ON instances (surrogate_digest);
    -- claim_warm_instance: the warm pool, in claim order.
    CREATE INDEX instances_warm ON instances (created_at_ms, id) WHERE state = 'warm' AND tenant IS NULL;

    -- seq comes from one sequence and is never reused, so it grows in append order per tenant.
    CREATE TABLE inbox (
        seq            BIGSERIAL PRIMARY KEY,
        tenant         TEXT COLLATE "C" NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
        update_id      BIGINT NOT NULL,
        payload        BYTEA NOT NULL,
        state          TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'done', 'dead')),
        attempts       BIGINT NOT NULL DEFAULT 0,
        accepted_at_ms BIGINT NOT NULL,
        last_error     TEXT,
        done_at_ms     BIGINT,
        UNIQUE (tenant, update_id)
    );
    CREATE INDEX inbox_queue ON inbox (tenant, state, seq);
    -- inbox_pending_tenants without scanning delivered rows.
    CREATE INDEX inbox_pending ON inbox (tenant) WHERE state = 'pending';
    -- inbox_prune without scanning pending rows.
    CREATE INDEX inbox_done ON inbox (accepted_at_ms) WHERE state = 'done';

    CREATE TABLE settings (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    "#,
    // 2: per-tenant resource limits (a JSON object of the set ones).
    r#"
    ALTER TABLE tenants ADD COLUMN limits TEXT NOT NULL DEFAULT '{}';
    "#,
    // 3: the fence of the dispatcher that owns a tenant's inbox (acks and failures check it).
    r#"
    ALTER TABLE tenants ADD COLUMN dispatch_fence BIGINT NOT NULL DEFAULT 0;
    "#,
    // 4: the audit trail of admin writes, and named admin tokens (their SHA-256 only).
    r#"
    CREATE TABLE audit (
        id     BIGINT PRIMARY KEY,
        at_ms  BIGINT NOT NULL,
        who    TEXT NOT NULL,
        method TEXT NOT NULL,
        route  TEXT NOT NULL,
        tenant TEXT,
        status INTEGER NOT NULL
    );
    CREATE TABLE admin_tokens (
        name          TEXT COLLATE "C" PRIMARY KEY,
        digest        TEXT NOT NULL UNIQUE,
        read_only     BOOLEAN NOT NULL,
        created_at_ms BIGINT NOT NULL
    );
    "#,
    // 5: freeze deadlines (NULL: never frozen), so the idle sweep asks for the tenants due
    // instead of reading every awake one. 60 s is the default `freeze_after_s`.
    r#"
    ALTER TABLE tenants ADD COLUMN freeze_after_ms BIGINT;
    ALTER TABLE tenants ADD COLUMN freeze_deadline_ms BIGINT;
    UPDATE tenants t SET freeze_after_ms = (f.s * 1000)::BIGINT
      FROM (SELECT id, COALESCE((limits::jsonb ->> 'freeze_after_s')::NUMERIC, 60) AS s FROM tenants) f
      WHERE f.id = t.id AND f.s > 0 AND f.s < t.idle_timeout_s AND f.s < 9000000000000;
    UPDATE tenants SET freeze_deadline_ms =
        LEAST(last_active_ms::NUMERIC + freeze_after_ms, 9223372036854775807)::BIGINT
      WHERE freeze_after_ms IS NOT NULL;
    CREATE INDEX tenants_freeze ON tenants (status, freeze_deadline_ms);
    "#,
];

/// How to connect, beyond the URL.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PostgresOptions {
    /// The schema that holds otm's tables, created if missing; `None` uses the connection's
    /// default (`public`, or what the URL's `options=-csearch_path=…` says). A lowercase SQL
    /// identifier: `[a-z_][a-z0-9_]*`, at most 63 bytes.
    pub schema: Option<String>,
    /// Most connections open at once.
    pub pool_size: usize,
    /// Longest time one call may take, waiting for a free connection included.
    pub timeout: Duration,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions {
            schema: None,
            pool_size: DEFAULT_POOL_SIZE,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

impl PostgresOptions {
    /// Puts the tables in `schema`.
    pub fn with_schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = Some(schema.into());
        self
    }

    /// Keeps at most `size` connections.
    pub fn with_pool_size(mut self, size: usize) -> Self {
        self.pool_size = size;
        self
    }

    /// Bounds every call by `timeout`.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

/// The PostgreSQL registry. Cheap to share behind an `Arc`; any number of processes may use the
/// same database (and schema) at once.
pub struct PostgresRegistry {
    db: Db,
    size: usize,
    schema: Option<String>,
    /// Appends waiting for the next multi-row insert ([`Inbox::inbox_append`]).
    appends: Arc<AppendQueue>,
    /// When the inbox was last vacuumed, in ms since the epoch ([`Inbox::purge_freed`]).
    vacuumed_at_ms: AtomicI64,
}

/// How often [`Inbox::purge_freed`] vacuums the inbox: acknowledged payloads are blanked at
/// once, and their old row versions are gone from the table within this long.
const VACUUM_EVERY_MS: i64 = 60_000;

impl fmt::Debug for PostgresRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresRegistry")
            .field("schema", &self.schema)
            .field("pool_size", &self.size)
            .finish_non_exhaustive()
    }
}

impl PostgresRegistry {
    /// Connects to `url` (`postgres://user:password@host:port/database`, optionally with
    /// `?schema=name` and any parameter `tokio-postgres` knows), applies the migrations, and keeps
    /// the connection for later calls.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, PostgresOptions::default()).await
    }

    /// [`PostgresRegistry::connect`] with options. A schema in `options` and another one in the
    /// URL are an error.
    pub async fn connect_with(url: &str, options: PostgresOptions) -> Result<Self> {
        let (url, url_schema) = split_schema(url);
        let (url, tls_options) = tls::split_tls(&url)?;
        let tls = RustlsConnect::new(&tls_options)?;
        let schema = match (options.schema, url_schema) {
            (Some(a), Some(b)) if a != b => {
                return Err(Error::invalid(format!(
                    "the PostgreSQL registry is given two schemas, `{a}` in the options and `{b}` in the URL; keep one"
                )));
            }
            (a, b) => a.or(b),
        };
        if let Some(s) = &schema {
            check_schema_name(s)?;
        }
        if options.pool_size == 0 {
            return Err(Error::invalid(
                "the PostgreSQL registry needs a pool of at least one connection",
            ));
        }
        if options.timeout.is_zero() {
            return Err(Error::invalid(
                "the PostgreSQL registry timeout must be longer than zero",
            ));
        }
        let mut config: Config = url.parse().map_err(|e| {
            Error::invalid(format!(
                "the PostgreSQL registry URL is not valid ({}); use postgres://user:password@host:port/database",
                describe(&e)
            ))
        })?;
        config.ssl_mode(tls_options.mode.for_driver());
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("otm");
        }
        if let Some(s) = &schema {
            // Set at startup, so every connection (and every reconnect) resolves tables there.
            let opts = match config.get_options() {
                Some(o) if !o.trim().is_empty() => format!("{o} -c search_path={s}"),
                _ => format!("-c search_path={s}"),
            };
            config.options(opts);
        }

        let manager = deadpool_postgres::Manager::from_connect(
            config,
            Connector { tls: tls.clone() },
            deadpool_postgres::ManagerConfig {
                // Taking a connection checks only that it is open: a statement on a connection
                // that died unnoticed fails as a connection error and is retried on a fresh one.
                recycling_method: deadpool_postgres::RecyclingMethod::Fast,
            },
        );
        let pool = deadpool_postgres::Pool::builder(manager)
            .max_size(options.pool_size)
            .build()
            .map_err(|e| {
                Error::generic(BACKEND, format!("cannot build the connection pool: {e}"))
            })?;
        let mut first = tokio::time::timeout(options.timeout, pool.get())
            .await
            .map_err(|_| timed_out("connecting", options.timeout))?
            .map_err(pool_error)?;
        tokio::time::timeout(
            MIGRATE_TIMEOUT.max(options.timeout),
            migrate(&mut first, schema.as_deref()),
        )
        .await
        .map_err(|_| {
            Error::unavailable(
                BACKEND,
                format!(
                    "the registry migrations did not finish within {} s; another otm process may hold the \
                     migration lock, or the database is overloaded",
                    MIGRATE_TIMEOUT.max(options.timeout).as_secs()
                ),
            )
        })??;
        drop(first);
        tracing::debug!(
            schema = schema.as_deref().unwrap_or("(default)"),
            "opened the PostgreSQL registry"
        );

        Ok(PostgresRegistry {
            db: Db {
                pool,
                tls,
                timeout: options.timeout,
            },
            size: options.pool_size,
            schema,
            appends: Arc::new(AppendQueue::new(options.pool_size)),
            vacuumed_at_ms: AtomicI64::new(0),
        })
    }

    /// The schema that holds the tables, if one was chosen.
    pub fn schema(&self) -> Option<&str> {
        self.schema.as_deref()
    }

    /// Runs one statement and returns its rows. `idempotent`: repeating the statement cannot change
    /// its answer, so it is retried once when its connection was lost mid-call.
    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        idempotent: bool,
    ) -> Result<Vec<Row>> {
        match self.db.call(sql, params, idempotent, false).await? {
            Output::Rows(rows) => Ok(rows),
            Output::Count(_) => unreachable!("asked for rows"),
        }
    }

    /// Runs one statement and returns how many rows it changed.
    async fn execute(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        idempotent: bool,
    ) -> Result<u64> {
        match self.db.call(sql, params, idempotent, true).await? {
            Output::Count(n) => Ok(n),
            Output::Rows(_) => unreachable!("asked for a count"),
        }
    }

    /// A conflict if a dispatcher fence larger than `fence` was claimed for the tenant's inbox
    /// (nothing if the tenant is missing: the caller says what else went wrong).
    async fn check_dispatch_fence(&self, tenant: &TenantId, fence: i64) -> Result<()> {
        let row = self
            .query_opt(
                "SELECT dispatch_fence FROM tenants WHERE id = $1",
                &[&tenant.as_str()],
                true,
            )
            .await?;
        if let Some(row) = row {
            let stored: i64 = get(&row, 0)?;
            if stored > fence {
                return Err(record::stale_dispatcher(tenant, fence, stored));
            }
        }
        Ok(())
    }

    /// Moves dead letters back to pending (`retry`, with no failed attempts) or to done
    /// (without their payload), in one statement: the tenant's row is locked first, and what
    /// `seq` named is read in the same snapshot, to say why nothing moved.
    async fn move_dead(
        &self,
        tenant: &TenantId,
        which: DeadLetters,
        retry: bool,
    ) -> Result<Vec<i64>> {
        let one = match which {
            DeadLetters::One(seq) => Some(seq),
            DeadLetters::All => None,
        };
        let set = if retry {
            "state = 'pending', attempts = 0"
        } else {
            "state = 'done', done_at_ms = $3, payload = ''::bytea"
        };
        let sql = format!(
            "WITH t AS (SELECT id FROM tenants WHERE id = $1 FOR NO KEY UPDATE), \
                  cur AS (SELECT state FROM inbox WHERE tenant = $1 AND seq = $2::BIGINT), \
                  moved AS (UPDATE inbox SET {set} \
                            WHERE tenant IN (SELECT id FROM t) AND state = 'dead' \
                            AND ($2::BIGINT IS NULL OR seq = $2::BIGINT) RETURNING seq) \
             SELECT EXISTS (SELECT 1 FROM t), (SELECT state FROM cur), \
                    COALESCE((SELECT array_agg(seq ORDER BY seq) FROM moved), '{{}}'::BIGINT[]), \
                    $3::BIGINT"
        );
        let row = self
            .query_opt(
                &sql,
                &[&tenant.as_str(), &one, &otm_core::time::now_ms()],
                false,
            )
            .await?
            .ok_or_else(|| Error::generic(BACKEND, "a dead-letter move returned no row"))?;
        let known: bool = get(&row, 0)?;
        let state: Option<String> = get(&row, 1)?;
        let moved: Vec<i64> = get(&row, 2)?;
        if !known {
            return Err(record::tenant_not_found(tenant));
        }
        if let Some(seq) = one {
            match state.as_deref() {
                None => return Err(record::update_not_found(tenant, seq)),
                Some("dead") => {}
                Some(other) => return Err(record::not_dead(tenant, seq, other)),
            }
        }
        Ok(moved)
    }

    async fn query_opt(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        idempotent: bool,
    ) -> Result<Option<Row>> {
        Ok(self
            .query(sql, params, idempotent)
            .await?
            .into_iter()
            .next())
    }
}

/// The connection pool and what every call on it needs; cheap to clone, so that a task of its
/// own can run calls (the multi-row appends).
#[derive(Clone)]
struct Db {
    pool: deadpool_postgres::Pool,
    tls: RustlsConnect,
    timeout: Duration,
}

impl Db {
    async fn call(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        idempotent: bool,
        count: bool,
    ) -> Result<Output> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let run = async {
                // A retry takes a new connection: the idle ones were dropped when the last one
                // broke, as they may have died with it.
                let mut conn = Pooled {
                    conn: Some(
                        self.pool
                            .get()
                            .await
                            .map_err(|e| (pool_error(e), Retry::Never))?,
                    ),
                    in_flight: false,
                    broken: false,
                    tls: &self.tls,
                };
                conn.run(sql, params, count).await.map_err(|e| {
                    let retry = if is_stale_plan(&e) {
                        Retry::Always
                    } else if is_connection_error(&e) {
                        Retry::IfIdempotent
                    } else {
                        Retry::Never
                    };
                    if matches!(retry, Retry::IfIdempotent) {
                        // Whatever broke this connection may have broken the idle ones too.
                        self.pool.retain(|_, _| false);
                    }
                    (pg(&e), retry)
                })
            };
            match tokio::time::timeout(self.timeout, run).await {
                Ok(Ok(out)) => return Ok(out),
                Ok(Err((e, retry))) => {
                    let again = match retry {
                        Retry::Always => true,
                        Retry::IfIdempotent => idempotent,
                        Retry::Never => false,
                    };
                    if !again || attempt >= 2 {
                        return Err(e);
                    }
                    tracing::debug!(error = %e, "retrying a registry call on a fresh connection");
                }
                // The pooled connection, if it was mid-statement, was dropped and its statement
                // cancelled: see `Pooled::drop`.
                Err(_) => return Err(timed_out("a registry call", self.timeout)),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Group commit of appends.

/// Most appends one multi-row insert takes.
const APPEND_BATCH: usize = 256;
/// Most payload bytes one multi-row insert takes (the first append of a batch always goes in).
const APPEND_BATCH_BYTES: usize = 4 << 20;
/// Most multi-row inserts under way at once, whatever the pool size. Two: while one commits,
/// the next is already sent (and waits for the tenant locks the first holds, when they share
/// tenants, as batches of a few busy tenants do); more would only split the waiting appends
/// into smaller batches that commit one after another all the same.
const APPEND_BATCHES: usize = 2;

/// The multi-row append: lock the batch's tenants (in id order, so batches from several
/// processes cannot deadlock; appends to one tenant thus take their seq and commit one batch
/// after another, so seq order is commit order), then insert the batch in its order unless
/// `(tenant, update_id)` is taken. Answers the tenants found and what was inserted.
const APPEND_SQL: &str = "WITH input AS (SELECT * FROM unnest($1::TEXT[], $2::BIGINT[], $3::BYTEA[]) \
                          WITH ORDINALITY AS i (tenant, update_id, payload, ord)), \
          t AS (SELECT id FROM tenants WHERE id = ANY ($1::TEXT[]) ORDER BY id FOR NO KEY UPDATE), \
          ins AS (INSERT INTO inbox (tenant, update_id, payload, accepted_at_ms) \
                  SELECT i.tenant, i.update_id, i.payload, $4::BIGINT FROM input i \
                  WHERE i.tenant IN (SELECT id FROM t) ORDER BY i.ord \
                  ON CONFLICT (tenant, update_id) DO NOTHING \
                  RETURNING tenant, update_id, seq) \
     SELECT ARRAY(SELECT id FROM t), ARRAY(SELECT tenant FROM ins), \
            ARRAY(SELECT update_id FROM ins), ARRAY(SELECT seq FROM ins)";

/// One append waiting for its batch.
struct PendingAppend {
    tenant: TenantId,
    update_id: i64,
    payload: Vec<u8>,
    reply: tokio::sync::oneshot::Sender<Result<Appended>>,
}

/// Appends waiting to ride in a multi-row insert, and how many inserts are under way. Group
/// commit: while inserts are under way (at most `max_batches`), new appends wait here, and the
/// next insert to start takes all of them (up to [`APPEND_BATCH`]): one statement, one
/// transaction and one WAL flush serve many webhooks.
struct AppendQueue {
    state: std::sync::Mutex<AppendState>,
    max_batches: usize,
}

#[derive(Default)]
struct AppendState {
    waiting: std::collections::VecDeque<PendingAppend>,
    batches: usize,
}

impl AppendQueue {
    fn new(pool_size: usize) -> Self {
        AppendQueue {
            state: Default::default(),
            max_batches: pool_size.clamp(1, APPEND_BATCHES),
        }
    }

    /// Queues an append; starts an inserting task when fewer than `max_batches` run.
    fn push(self: &Arc<Self>, db: &Db, append: PendingAppend) {
        {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            st.waiting.push_back(append);
            if st.batches >= self.max_batches {
                return; // a running task takes it
            }
            st.batches += 1;
        }
        // A task of its own: the insert goes on (and answers every append of its batch) even if
        // the caller that started it goes away. It takes its batch when it first runs, so the
        // appends queued meanwhile ride along.
        let (queue, db) = (self.clone(), db.clone());
        tokio::spawn(async move {
            loop {
                let batch = {
                    let mut st = queue.state.lock().unwrap_or_else(|p| p.into_inner());
                    if st.waiting.is_empty() {
                        st.batches -= 1;
                        return;
                    }
                    take_batch(&mut st.waiting)
                };
                append_batch(&db, batch).await;
            }
        });
    }
}

/// The next batch off the front of the queue.
fn take_batch(waiting: &mut std::collections::VecDeque<PendingAppend>) -> Vec<PendingAppend> {
    let mut bytes = 0;
    let mut n = 0;
    for a in waiting.iter() {
        if n == APPEND_BATCH || (n > 0 && bytes + a.payload.len() > APPEND_BATCH_BYTES) {
            break;
        }
        bytes += a.payload.len();
        n += 1;
    }
    waiting.drain(..n).collect()
}

/// Runs one multi-row insert and answers every append of `batch`. A second append of the same
/// `(tenant, update_id)` in one batch is not sent: it is a duplicate of the first (or fails as
/// the first does).
async fn append_batch(db: &Db, batch: Vec<PendingAppend>) {
    let mut first_of: HashMap<(&str, i64), usize> = HashMap::with_capacity(batch.len());
    // For each append, the index of the first append of its (tenant, update_id) in `sent`.
    let mut sent: Vec<usize> = Vec::with_capacity(batch.len());
    let mut refers: Vec<usize> = Vec::with_capacity(batch.len());
    for (i, a) in batch.iter().enumerate() {
        let k = *first_of
            .entry((a.tenant.as_str(), a.update_id))
            .or_insert_with(|| {
                sent.push(i);
                sent.len() - 1
            });
        refers.push(k);
    }
    let tenants: Vec<&str> = sent.iter().map(|&i| batch[i].tenant.as_str()).collect();
    let update_ids: Vec<i64> = sent.iter().map(|&i| batch[i].update_id).collect();
    let payloads: Vec<&[u8]> = sent.iter().map(|&i| batch[i].payload.as_slice()).collect();
    let now = otm_core::time::now_ms();
    let outcome = db
        .call(
            APPEND_SQL,
            &[&tenants, &update_ids, &payloads, &now],
            false,
            false,
        )
        .await
        .and_then(|out| {
            match out {
                Output::Rows(rows) => rows.into_iter().next(),
                Output::Count(_) => None,
            }
            .ok_or_else(|| Error::generic(BACKEND, "an inbox append returned no row"))
        })
        .and_then(|row| {
            let known: Vec<String> = get(&row, 0)?;
            let ins_tenants: Vec<String> = get(&row, 1)?;
            let ins_ids: Vec<i64> = get(&row, 2)?;
            let ins_seqs: Vec<i64> = get(&row, 3)?;
            let stored: HashMap<(String, i64), i64> =
                ins_tenants.into_iter().zip(ins_ids).zip(ins_seqs).collect();
            Ok((known, stored))
        });
    // What each sent append got: `Some(seq)` stored, `None` a duplicate; `Err(())` an unknown
    // tenant.
    let results: Result<Vec<Result<Option<i64>, ()>>> = outcome.map(|(known, stored)| {
        sent.iter()
            .map(|&i| {
                let a = &batch[i];
                if !known.iter().any(|k| k == a.tenant.as_str()) {
                    return Err(());
                }
                Ok(stored
                    .get(&(a.tenant.as_str().to_owned(), a.update_id))
                    .copied())
            })
            .collect()
    });
    let answers: Vec<Result<Appended>> = batch
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let k = refers[i];
            let first = sent[k] == i;
            match &results {
                Err(e) => Err(copy_error(e)),
                Ok(r) => match r[k] {
                    Err(()) => Err(record::tenant_not_found(&a.tenant)),
                    Ok(Some(seq)) if first => Ok(Appended::Stored { seq }),
                    Ok(_) => Ok(Appended::Duplicate),
                },
            }
        })
        .collect();
    for (a, answer) in batch.into_iter().zip(answers) {
        // The caller may have gone away; the write stands either way.
        let _ = a.reply.send(answer);
    }
}

/// The same error for every append of a failed batch.
fn copy_error(e: &Error) -> Error {
    match e {
        Error::Unavailable { backend, message } => Error::Unavailable {
            backend,
            message: message.clone(),
        },
        Error::InvalidInput { message } => Error::invalid(message),
        Error::NotFound { what } => Error::not_found(what),
        Error::Conflict { message } => Error::conflict(message),
        e => Error::generic(BACKEND, e.to_string()),
    }
}

enum Output {
    Rows(Vec<Row>),
    Count(u64),
}

#[derive(Clone, Copy)]
enum Retry {
    /// Nothing ran (a prepared statement went stale): always safe to repeat.
    Always,
    /// The connection was lost; the statement may or may not have committed.
    IfIdempotent,
    Never,
}

// ---------------------------------------------------------------------------------------------
// Connections.

/// Opens the pool's connections: each is driven on a task of its own and checked to commit
/// durably before the pool hands it out.
struct Connector {
    tls: RustlsConnect,
}

impl deadpool_postgres::Connect for Connector {
    fn connect(
        &self,
        config: &Config,
    ) -> futures::future::BoxFuture<
        '_,
        Result<(Client, tokio::task::JoinHandle<()>), tokio_postgres::Error>,
    > {
        let config = config.clone();
        let tls = self.tls.clone();
        Box::pin(async move {
            let (client, connection) = config.connect(tls).await?;
            let task = tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::warn!(error = %describe(&e), "a PostgreSQL registry connection broke; the next call opens a new one");
                }
            });
            // Every answered write must be durable: undo a session default that would lose
            // commits.
            let sync: String = client
                .query_one("SELECT current_setting('synchronous_commit')", &[])
                .await?
                .try_get(0)?;
            if sync == "off" {
                client.batch_execute("SET synchronous_commit TO on").await?;
                tracing::warn!(
                    "the PostgreSQL session had synchronous_commit = off; the registry turned it on, since every \
                     answered write must be durable"
                );
            }
            Ok((client, task))
        })
    }
}

/// What taking a connection from the pool failed with.
fn pool_error(e: deadpool_postgres::PoolError) -> Error {
    use deadpool_postgres::PoolError;
    match e {
        PoolError::Backend(e) => Error::unavailable(
            BACKEND,
            format!("cannot connect to PostgreSQL: {}", describe(&e)),
        ),
        PoolError::Closed => Error::unavailable(BACKEND, "the registry is shutting down"),
        e => Error::unavailable(BACKEND, format!("cannot take a PostgreSQL connection: {e}")),
    }
}

/// A connection taken from the pool; goes back on drop unless it broke or was abandoned
/// mid-statement.
struct Pooled<'a> {
    conn: Option<deadpool_postgres::Object>,
    /// A statement was sent and its answer not yet read: set while `run` awaits, so a caller that
    /// gives up (timeout, cancellation) leaves a connection that must not be reused.
    in_flight: bool,
    broken: bool,
    tls: &'a RustlsConnect,
}

impl Pooled<'_> {
    async fn run(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        count: bool,
    ) -> Result<Output, tokio_postgres::Error> {
        let conn = self.conn.as_mut().expect("present until drop");
        self.in_flight = true;
        let out = async {
            let stmt = conn.prepare_cached(sql).await?;
            if count {
                conn.execute(&stmt, params).await.map(Output::Count)
            } else {
                conn.query(&stmt, params).await.map(Output::Rows)
            }
        }
        .await;
        self.in_flight = false;
        if let Err(e) = &out {
            if is_stale_plan(e) {
                conn.statement_cache.clear();
            }
            self.broken = conn.is_closed() || is_connection_error(e);
        }
        out
    }
}

impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        if !self.in_flight && !self.broken {
            return; // back to the pool
        }
        // Out of the pool; the connection closes when `conn` goes.
        let conn = deadpool_postgres::Object::take(conn);
        if self.in_flight && !conn.is_closed() {
            // Abandoned mid-statement: ask the server to stop it.
            let token = conn.cancel_token();
            let tls = self.tls.clone();
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = token.cancel_query(tls).await;
                });
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Opening.

/// Takes `schema=name` out of a URL's query string: it is otm's, not a libpq parameter.
fn split_schema(url: &str) -> (String, Option<String>) {
    let url = url.trim();
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_owned(), None);
    };
    let mut schema = None;
    let mut rest = Vec::new();
    for pair in query.split('&') {
        match pair.strip_prefix("schema=") {
            Some(s) => schema = Some(s.to_owned()),
            None if pair.is_empty() => {}
            None => rest.push(pair),
        }
    }
    let url = if rest.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    (url, schema)
}

/// A schema name otm accepts: a lowercase identifier that needs no quoting.
fn check_schema_name(s: &str) -> Result<()> {
    let mut chars = s.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !first_ok || !rest_ok || s.len() > 63 || s.starts_with("pg_") {
        return Err(Error::invalid(format!(
            "`{s}` is not a usable PostgreSQL schema name; use lowercase letters, digits and `_`, starting \
             with a letter or `_`, at most 63 bytes, not starting with `pg_`"
        )));
    }
    Ok(())
}

/// Applies the missing [`MIGRATIONS`] in one transaction, under a lock that makes a concurrent
/// migration in another process wait.
async fn migrate(client: &mut Client, schema: Option<&str>) -> Result<()> {
    let tx = client.transaction().await.map_err(|e| pg(&e))?;
    tx.batch_execute("SET LOCAL client_min_messages TO warning")
        .await
        .map_err(|e| pg(&e))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(|e| pg(&e))?;
    if let Some(s) = schema {
        // `s` passed check_schema_name: no quoting issue.
        tx.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS \"{s}\""))
            .await
            .map_err(|e| pg(&e))?;
    }
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS otm_schema_version (
             version    INTEGER PRIMARY KEY,
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
         )",
    )
    .await
    .map_err(|e| pg(&e))?;
    let version: i32 = tx
        .query_one(
            "SELECT COALESCE(max(version), 0) FROM otm_schema_version",
            &[],
        )
        .await
        .and_then(|r| r.try_get(0))
        .map_err(|e| pg(&e))?;
    let known = MIGRATIONS.len() as i32;
    if version > known {
        return Err(Error::generic(
            BACKEND,
            format!(
                "the PostgreSQL registry has schema version {version}, newer than this build knows ({known}); \
                 run a newer otm"
            ),
        ));
    }
    for (i, step) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let n = i as i32 + 1;
        tx.batch_execute(step).await.map_err(|e| {
            Error::generic(
                BACKEND,
                format!(
                    "migration {n} of the PostgreSQL registry failed: {}",
                    describe(&e)
                ),
            )
        })?;
        tx.execute(
            "INSERT INTO otm_schema_version (version) VALUES ($1)",
            &[&n],
        )
        .await
        .map_err(|e| pg(&e))?;
    }
    tx.commit().await.map_err(|e| pg(&e))?;
    if version < known {
        tracing::info!(
            from = version,
            to = known,
            schema = schema.unwrap_or("(default)"),
            "migrated the registry schema"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Error and row mapping.

/// A PostgreSQL error in words, without the detail line: it may quote a failing row, secrets
/// included.
fn describe(e: &tokio_postgres::Error) -> String {
    use std::error::Error as _;
    match (e.as_db_error(), e.source()) {
        (Some(db), _) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        (None, Some(src)) => format!("{e}: {src}"),
        (None, None) => e.to_string(),
    }
}

/// True when the connection, not the statement, failed: retrying on another one may work.
fn is_connection_error(e: &tokio_postgres::Error) -> bool {
    use std::error::Error as _;
    if e.is_closed() {
        return true;
    }
    match e.code() {
        Some(code) => {
            code.code().starts_with("08")
                || [
                    SqlState::ADMIN_SHUTDOWN,
                    SqlState::CRASH_SHUTDOWN,
                    SqlState::CANNOT_CONNECT_NOW,
                    SqlState::TOO_MANY_CONNECTIONS,
                ]
                .contains(code)
        }
        None => e
            .source()
            .is_some_and(|s| s.downcast_ref::<std::io::Error>().is_some()),
    }
}

/// A prepared statement that a concurrent schema change invalidated; nothing ran.
fn is_stale_plan(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::INVALID_SQL_STATEMENT_NAME)
        || (e.code() == Some(&SqlState::FEATURE_NOT_SUPPORTED)
            && e.as_db_error()
                .is_some_and(|db| db.message().contains("cached plan")))
}

fn is_unique_violation(e: &Error) -> bool {
    matches!(e, Error::AlreadyExists { .. })
}

/// Maps a PostgreSQL error onto otm's.
fn pg(e: &tokio_postgres::Error) -> Error {
    if is_connection_error(e) {
        return Error::unavailable(BACKEND, describe(e));
    }
    match e.code() {
        Some(c) if *c == SqlState::UNIQUE_VIOLATION => Error::AlreadyExists {
            what: e
                .as_db_error()
                .and_then(|db| db.table())
                .map_or_else(|| "the row".to_owned(), |t| format!("a row in {t}")),
        },
        Some(c) if *c == SqlState::CHARACTER_NOT_IN_REPERTOIRE => Error::invalid(format!(
            "PostgreSQL cannot store this text ({}); remove NUL characters",
            describe(e)
        )),
        _ => Error::generic(BACKEND, describe(e)),
    }
}

fn timed_out(what: &str, after: Duration) -> Error {
    Error::unavailable(
        BACKEND,
        format!(
            "{what} took longer than {} ms; the database is unreachable or overloaded",
            after.as_millis()
        ),
    )
}

/// `deadline(at, idle)` in SQL: numeric arithmetic clamped to BIGINT, like the saturating Rust.
/// A CTE that turns `synchronous_commit` off for the statement's own transaction; the statement
/// names it in its `WHERE` (`EXISTS (SELECT 1 FROM relaxed)`) so that it runs.
macro_rules! relaxed_cte {
    () => {
        "relaxed AS (SELECT set_config('synchronous_commit', 'off', true))"
    };
}

macro_rules! deadline_sql {
    ($at:literal, $idle:literal) => {
        concat!(
            "LEAST(GREATEST(",
            $at,
            "::BIGINT::NUMERIC + ",
            $idle,
            "::BIGINT::NUMERIC * 1000, -9223372036854775808), 9223372036854775807)::BIGINT"
        )
    };
}

/// SQL for `at + ms`, both BIGINT milliseconds, saturating as [`record::deadline`] does; NULL
/// when `ms` is (LEAST and GREATEST skip NULLs, so it is checked first).
macro_rules! offset_sql {
    ($at:literal, $ms:literal) => {
        concat!(
            "CASE WHEN ",
            $ms,
            "::BIGINT IS NULL THEN NULL ELSE LEAST(GREATEST(",
            $at,
            "::BIGINT::NUMERIC + ",
            $ms,
            "::BIGINT::NUMERIC, -9223372036854775808), 9223372036854775807)::BIGINT END"
        )
    };
}

/// [`TenantStore::touch_tenant`], relaxed: ($1 tenant, $2 at).
const TOUCH_SQL: &str = concat!(
    "WITH ",
    relaxed_cte!(),
    " UPDATE tenants SET last_active_ms = $2, idle_deadline_ms = ",
    deadline_sql!("$2", "idle_timeout_s"),
    ", freeze_deadline_ms = ",
    offset_sql!("$2", "freeze_after_ms"),
    " WHERE id = $1 AND EXISTS (SELECT 1 FROM relaxed)"
);

/// [`Inbox::inbox_ack`], relaxed, with the fence check in the same statement: ($1 tenant, $2 seq,
/// $3 now, $4 fence or NULL).
const ACK_SQL: &str = concat!(
    "WITH ",
    relaxed_cte!(),
    ", f AS (UPDATE tenants SET dispatch_fence = $4 \
         WHERE id = $1 AND dispatch_fence <= $4::BIGINT RETURNING id) \
         UPDATE inbox SET state = 'done', done_at_ms = COALESCE(done_at_ms, $3), \
         payload = ''::bytea WHERE tenant = $1 AND seq = $2 \
         AND ($4::BIGINT IS NULL OR EXISTS (SELECT 1 FROM f)) \
         AND EXISTS (SELECT 1 FROM relaxed)"
);

/// [`Inbox::inbox_fail`], relaxed: ($1 tenant, $2 seq, $3 error, $4 max attempts, $5 fence or
/// NULL).
const FAIL_SQL: &str = concat!(
    "WITH ",
    relaxed_cte!(),
    ", f AS (UPDATE tenants SET dispatch_fence = $5 \
         WHERE id = $1 AND dispatch_fence <= $5::BIGINT RETURNING id) \
         UPDATE inbox SET attempts = attempts + 1, last_error = $3, \
         state = CASE WHEN attempts + 1 >= $4 THEN 'dead' ELSE state END \
         WHERE tenant = $1 AND seq = $2 AND state = 'pending' \
         AND ($5::BIGINT IS NULL OR EXISTS (SELECT 1 FROM f)) \
         AND EXISTS (SELECT 1 FROM relaxed) RETURNING attempts"
);

fn get<'a, T: tokio_postgres::types::FromSql<'a>>(row: &'a Row, idx: usize) -> Result<T> {
    row.try_get(idx).map_err(|e| pg(&e))
}

macro_rules! tenant_columns {
    () => {
        "id, profile, idle_timeout_s, bot_token, webhook_secret, cold_start_notice, status, created_at_ms, \
         last_active_ms, limits"
    };
}

fn tenant_row(row: &Row) -> Result<Tenant> {
    let id: String = get(row, 0)?;
    let what = format!("tenant row `{id}`");
    TenantRow {
        id,
        profile: get(row, 1)?,
        idle_timeout_s: get(row, 2)?,
        bot_token: get(row, 3)?,
        webhook_secret: get(row, 4)?,
        cold_start_notice: get(row, 5)?,
        status: get(row, 6)?,
        created_at_ms: get(row, 7)?,
        last_active_ms: get(row, 8)?,
        limits: get(row, 9)?,
    }
    .into_tenant(&what)
}

macro_rules! instance_columns {
    () => {
        "id, tenant, state, address, shim_token, surrogate_digest, created_at_ms, bound_at_ms"
    };
}

fn instance_row(row: &Row) -> Result<InstanceRecord> {
    let id: String = get(row, 0)?;
    let what = format!("instance {id}");
    InstanceRow {
        id,
        tenant: get(row, 1)?,
        state: get(row, 2)?,
        address: get(row, 3)?,
        shim_token: get(row, 4)?,
        surrogate_digest: get(row, 5)?,
        created_at_ms: get(row, 6)?,
        bound_at_ms: get(row, 7)?,
    }
    .into_instance(&what)
}

macro_rules! inbox_columns {
    () => {
        "tenant, seq, update_id, payload, attempts, accepted_at_ms, last_error"
    };
}

fn inbox_row(row: &Row) -> Result<InboxItem> {
    inbox_row_at(row, 0)
}

fn tenant_ids(rows: Vec<Row>, what: &str) -> Result<Vec<TenantId>> {
    rows.iter()
        .map(|r| {
            let id: String = get(r, 0)?;
            record::tenant_id(&id, what)
        })
        .collect()
}

/// At most `max` bytes, cut on a character boundary, without NUL characters (PostgreSQL text
/// cannot hold them).
fn truncate(s: &str, max: usize) -> String {
    if s.contains('\0') {
        record::truncate(&s.replace('\0', "\u{fffd}"), max)
    } else {
        record::truncate(s, max)
    }
}

// ---------------------------------------------------------------------------------------------
// The trait.

#[async_trait::async_trait]
impl TenantStore for PostgresRegistry {
    async fn create_tenant(&self, tenant: &Tenant) -> Result<()> {
        let t = tenant;
        let idle = to_i64(t.idle_timeout_s, "idle timeout")?;
        let freeze = record::freeze_after_ms(t);
        self.execute(
            "INSERT INTO tenants (id, profile, idle_timeout_s, bot_token, webhook_secret, cold_start_notice, \
             status, created_at_ms, last_active_ms, idle_deadline_ms, limits, freeze_after_ms, \
             freeze_deadline_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
            &[
                &t.id.as_str(),
                &t.profile,
                &idle,
                &t.bot_token.as_ref().map(Secret::expose),
                &t.webhook_secret.expose(),
                &t.cold_start_notice,
                &t.status.as_str(),
                &t.created_at_ms,
                &t.last_active_ms,
                &deadline(t.last_active_ms, idle),
                &t.limits.to_json(),
                &freeze,
                &freeze.map(|f| t.last_active_ms.saturating_add(f)),
            ],
            false,
        )
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                record::tenant_exists(&t.id)
            } else {
                e
            }
        })?;
        Ok(())
    }

    async fn get_tenant(&self, id: &TenantId) -> Result<Option<Tenant>> {
        self.query_opt(
            concat!("SELECT ", tenant_columns!(), " FROM tenants WHERE id = $1"),
            &[&id.as_str()],
            true,
        )
        .await?
        .as_ref()
        .map(tenant_row)
        .transpose()
    }

    async fn list_tenants(&self) -> Result<Vec<Tenant>> {
        self.query(
            concat!("SELECT ", tenant_columns!(), " FROM tenants ORDER BY id"),
            &[],
            true,
        )
        .await?
        .iter()
        .map(tenant_row)
        .collect()
    }

    async fn update_tenant(&self, tenant: &Tenant) -> Result<()> {
        let t = tenant;
        let idle = to_i64(t.idle_timeout_s, "idle timeout")?;
        let n = self
            .execute(
                concat!(
                    "UPDATE tenants SET profile = $2, idle_timeout_s = $3, bot_token = $4, webhook_secret = $5, \
                     cold_start_notice = $6, limits = $7, freeze_after_ms = $8, idle_deadline_ms = ",
                    deadline_sql!("last_active_ms", "$3"),
                    ", freeze_deadline_ms = ",
                    offset_sql!("last_active_ms", "$8"),
                    " WHERE id = $1"
                ),
                &[
                    &t.id.as_str(),
                    &t.profile,
                    &idle,
                    &t.bot_token.as_ref().map(Secret::expose),
                    &t.webhook_secret.expose(),
                    &t.cold_start_notice,
                    &t.limits.to_json(),
                    &record::freeze_after_ms(t),
                ],
                true,
            )
            .await?;
        if n == 0 {
            return Err(record::tenant_not_found(&t.id));
        }
        Ok(())
    }

    async fn delete_tenant(&self, id: &TenantId) -> Result<bool> {
        // The inbox goes with it: ON DELETE CASCADE, in the same statement.
        let n = self
            .execute("DELETE FROM tenants WHERE id = $1", &[&id.as_str()], false)
            .await?;
        Ok(n > 0)
    }

    async fn set_tenant_status(
        &self,
        id: &TenantId,
        status: TenantStatus,
        fence: Option<u64>,
    ) -> Result<()> {
        let fence = fence.map(|f| to_i64(f, "fence")).transpose()?;
        // The fence check and the write are one statement: no stale holder slips in between.
        // Repeating it cannot change its answer, so it is idempotent.
        let n = self
            .execute(
                "UPDATE tenants SET status = $2, fence = COALESCE($3, fence) \
                 WHERE id = $1 AND ($3::BIGINT IS NULL OR fence <= $3::BIGINT)",
                &[&id.as_str(), &status.as_str(), &fence],
                true,
            )
            .await?;
        if n > 0 {
            return Ok(());
        }
        // Nothing written: say why.
        let stored: Option<i64> = match self
            .query_opt(
                "SELECT fence FROM tenants WHERE id = $1",
                &[&id.as_str()],
                true,
            )
            .await?
        {
            Some(row) => Some(get(&row, 0)?),
            None => None,
        };
        match (stored, fence) {
            (Some(stored), Some(f)) if f < stored => Err(record::stale_status(id, f, stored)),
            // Missing when the update ran (it may have been created since).
            _ => Err(record::tenant_not_found(id)),
        }
    }

    async fn touch_tenant(&self, id: &TenantId, at_ms: i64) -> Result<()> {
        let n = self
            .execute(TOUCH_SQL, &[&id.as_str(), &at_ms], true)
            .await?;
        if n == 0 {
            return Err(record::tenant_not_found(id));
        }
        Ok(())
    }

    async fn idle_due(&self, now_ms: i64, limit: usize) -> Result<Vec<TenantId>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .query(
                "SELECT id FROM tenants WHERE status = 'running' AND idle_deadline_ms <= $1 \
                 ORDER BY idle_deadline_ms LIMIT $2",
                &[&now_ms, &limit],
                true,
            )
            .await?;
        tenant_ids(rows, "tenant row")
    }

    async fn freeze_due(&self, now_ms: i64, limit: usize) -> Result<Vec<TenantId>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .query(
                "SELECT id FROM tenants WHERE status = 'running' AND freeze_deadline_ms <= $1 \
                 AND idle_deadline_ms > $1 ORDER BY freeze_deadline_ms LIMIT $2",
                &[&now_ms, &limit],
                true,
            )
            .await?;
        tenant_ids(rows, "tenant row")
    }

    async fn frozen_tenants(&self) -> Result<Vec<(TenantId, i64)>> {
        let rows = self
            .query(
                "SELECT id, idle_deadline_ms FROM tenants WHERE status = 'frozen' \
                 ORDER BY idle_deadline_ms",
                &[],
                true,
            )
            .await?;
        rows.iter()
            .map(|r| {
                let id: String = get(r, 0)?;
                Ok((record::tenant_id(&id, "tenant row")?, get(r, 1)?))
            })
            .collect()
    }
}

#[async_trait::async_trait]
impl InstanceStore for PostgresRegistry {
    async fn put_instance(&self, instance: &InstanceRecord, fence: Option<u64>) -> Result<()> {
        let i = instance;
        let fence = fence.map(|f| to_i64(f, "fence")).transpose()?;
        // The fence check locks the tenant's row (a status write with a newer fence waits for
        // this statement), and the write happens only if no larger fence was used.
        let n = self.execute(
            "WITH f AS (SELECT fence FROM tenants WHERE id = $2 FOR SHARE) \
             INSERT INTO instances (id, tenant, state, address, shim_token, surrogate_digest, created_at_ms, bound_at_ms) \
             SELECT $1, $2, $3, $4, $5, $6, $7, $8 \
             WHERE $9::BIGINT IS NULL OR $2::TEXT IS NULL OR COALESCE((SELECT fence FROM f), 0) <= $9::BIGINT \
             ON CONFLICT (id) DO UPDATE SET tenant = excluded.tenant, state = excluded.state, \
             address = excluded.address, shim_token = excluded.shim_token, \
             surrogate_digest = excluded.surrogate_digest, created_at_ms = excluded.created_at_ms, \
             bound_at_ms = excluded.bound_at_ms",
            &[
                &i.id.as_str(),
                &i.tenant.as_ref().map(TenantId::as_str),
                &i.state.as_str(),
                &i.address,
                &i.shim_token.expose(),
                &i.surrogate_digest,
                &i.created_at_ms,
                &i.bound_at_ms,
                &fence,
            ],
            true,
        )
        .await
        .map_err(|e| match (&i.tenant, is_unique_violation(&e)) {
            (Some(t), true) => record::bound_elsewhere(t, &i.id),
            _ => e,
        })?;
        if n == 0 {
            // Only the fence condition skips the write.
            let (Some(t), Some(f)) = (&i.tenant, fence) else {
                return Err(Error::conflict(format!(
                    "instance {} was not written",
                    i.id
                )));
            };
            let stored: i64 = match self
                .query_opt(
                    "SELECT fence FROM tenants WHERE id = $1",
                    &[&t.as_str()],
                    true,
                )
                .await?
            {
                Some(row) => get(&row, 0)?,
                None => 0,
            };
            return Err(record::stale_waker(t, f, stored));
        }
        Ok(())
    }

    async fn get_instance(&self, id: &InstanceId) -> Result<Option<InstanceRecord>> {
        self.query_opt(
            concat!(
                "SELECT ",
                instance_columns!(),
                " FROM instances WHERE id = $1"
            ),
            &[&id.as_str()],
            true,
        )
        .await?
        .as_ref()
        .map(instance_row)
        .transpose()
    }

    async fn instance_of(&self, tenant: &TenantId) -> Result<Option<InstanceRecord>> {
        self.query_opt(
            concat!(
                "SELECT ",
                instance_columns!(),
                " FROM instances WHERE tenant = $1"
            ),
            &[&tenant.as_str()],
            true,
        )
        .await?
        .as_ref()
        .map(instance_row)
        .transpose()
    }

    async fn instance_by_surrogate(&self, digest: &str) -> Result<Option<InstanceRecord>> {
        self.query_opt(
            concat!(
                "SELECT ",
                instance_columns!(),
                " FROM instances WHERE surrogate_digest = $1 ORDER BY created_at_ms DESC LIMIT 1"
            ),
            &[&digest],
            true,
        )
        .await?
        .as_ref()
        .map(instance_row)
        .transpose()
    }

    async fn list_instances(&self) -> Result<Vec<InstanceRecord>> {
        self.query(
            concat!(
                "SELECT ",
                instance_columns!(),
                " FROM instances ORDER BY id"
            ),
            &[],
            true,
        )
        .await?
        .iter()
        .map(instance_row)
        .collect()
    }

    async fn delete_instance(&self, id: &InstanceId) -> Result<bool> {
        let n = self
            .execute(
                "DELETE FROM instances WHERE id = $1",
                &[&id.as_str()],
                false,
            )
            .await?;
        Ok(n > 0)
    }

    async fn claim_warm_instance(&self, tenant: &TenantId) -> Result<Option<InstanceRecord>> {
        // SKIP LOCKED: a concurrent claimer (in any process) that holds the oldest warm row makes
        // this one take the next, instead of waiting and then finding it gone.
        self.query_opt(
            concat!(
                "UPDATE instances SET tenant = $1, state = 'binding', bound_at_ms = $2 \
                 WHERE id = (SELECT id FROM instances WHERE state = 'warm' AND tenant IS NULL \
                             ORDER BY created_at_ms, id LIMIT 1 FOR UPDATE SKIP LOCKED) \
                 RETURNING ",
                instance_columns!()
            ),
            &[&tenant.as_str(), &otm_core::time::now_ms()],
            false,
        )
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                record::already_bound(tenant)
            } else {
                e
            }
        })?
        .as_ref()
        .map(instance_row)
        .transpose()
    }

    async fn get_settings(&self) -> Result<FleetSettings> {
        let row = self
            .query_opt(
                "SELECT value FROM settings WHERE key = $1",
                &[&FLEET_KEY],
                true,
            )
            .await?;
        match row {
            None => Ok(FleetSettings::default()),
            Some(row) => {
                let v: String = get(&row, 0)?;
                serde_json::from_str(&v).map_err(|e| record::corrupt("the fleet settings", e))
            }
        }
    }

    async fn put_settings(&self, settings: &FleetSettings) -> Result<()> {
        let value = serde_json::to_string(settings).map_err(|e| Error::generic(BACKEND, e))?;
        self.execute(
            "INSERT INTO settings (key, value) VALUES ($1, $2) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            &[&FLEET_KEY, &value],
            true,
        )
        .await?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl Inbox for PostgresRegistry {
    async fn inbox_append(
        &self,
        tenant: &TenantId,
        update_id: i64,
        payload: &[u8],
    ) -> Result<Appended> {
        // Group commit: the append rides in the next multi-row insert (see `AppendQueue`).
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.appends.push(
            &self.db,
            PendingAppend {
                tenant: tenant.clone(),
                update_id,
                payload: payload.to_vec(),
                reply,
            },
        );
        answer.await.map_err(|_| {
            Error::unavailable(
                BACKEND,
                "the registry stopped before the append was answered",
            )
        })?
    }

    async fn inbox_next(&self, tenant: &TenantId) -> Result<Option<InboxItem>> {
        // A plain read: one dispatcher per tenant holds a lease, so nobody races it for the head.
        self.query_opt(
            concat!(
                "SELECT ",
                inbox_columns!(),
                " FROM inbox WHERE tenant = $1 AND state = 'pending' ORDER BY seq LIMIT 1"
            ),
            &[&tenant.as_str()],
            true,
        )
        .await?
        .as_ref()
        .map(inbox_row)
        .transpose()
    }

    async fn inbox_head(&self, tenant: &TenantId, limit: usize) -> Result<Vec<InboxItem>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.query(
            concat!(
                "SELECT ",
                inbox_columns!(),
                " FROM inbox WHERE tenant = $1 AND state = 'pending' ORDER BY seq LIMIT $2"
            ),
            &[&tenant.as_str(), &limit],
            true,
        )
        .await?
        .iter()
        .map(inbox_row)
        .collect()
    }

    /// Acking a dead-lettered update (an operator redelivered it) moves it to done as well.
    async fn inbox_ack(&self, tenant: &TenantId, seq: i64, fence: Option<u64>) -> Result<()> {
        let fence = fence.map(|f| to_i64(f, "fence")).transpose()?;
        // The fence check and the ack are one statement (the tenant's row is locked by the
        // first part), so a dispatcher that lost the inbox cannot ack in between.
        let n = self
            .execute(
                ACK_SQL,
                &[&tenant.as_str(), &seq, &otm_core::time::now_ms(), &fence],
                true,
            )
            .await?;
        if n == 0 {
            if let Some(f) = fence {
                self.check_dispatch_fence(tenant, f).await?;
            }
            return Err(record::update_not_found(tenant, seq));
        }
        Ok(())
    }

    async fn inbox_fail(
        &self,
        tenant: &TenantId,
        seq: i64,
        error: &str,
        max_attempts: u32,
        fence: Option<u64>,
    ) -> Result<FailOutcome> {
        let error = truncate(error, record::MAX_ERROR_LEN);
        let fence = fence.map(|f| to_i64(f, "fence")).transpose()?;
        // One statement: check the fence, count the attempt and dead-letter at the limit, only
        // if still pending.
        let row = self
            .query_opt(
                FAIL_SQL,
                &[
                    &tenant.as_str(),
                    &seq,
                    &error,
                    &i64::from(max_attempts),
                    &fence,
                ],
                false,
            )
            .await?;
        if let Some(row) = row {
            let attempts: i64 = get(&row, 0)?;
            return Ok(record::fail_outcome(
                record::attempts(attempts),
                max_attempts,
            ));
        }
        // Nothing written: say why.
        if let Some(f) = fence {
            self.check_dispatch_fence(tenant, f).await?;
        }
        let state: Option<String> = match self
            .query_opt(
                "SELECT state FROM inbox WHERE tenant = $1 AND seq = $2",
                &[&tenant.as_str(), &seq],
                true,
            )
            .await?
        {
            Some(row) => Some(get(&row, 0)?),
            None => None,
        };
        match state {
            None => Err(record::update_not_found(tenant, seq)),
            Some(other) => Err(record::not_pending(tenant, seq, other)),
        }
    }

    async fn inbox_claim(&self, tenant: &TenantId, fence: u64) -> Result<()> {
        let fence = to_i64(fence, "fence")?;
        let n = self
            .execute(
                "UPDATE tenants SET dispatch_fence = $2 WHERE id = $1 AND dispatch_fence <= $2",
                &[&tenant.as_str(), &fence],
                true,
            )
            .await?;
        if n > 0 {
            return Ok(());
        }
        self.check_dispatch_fence(tenant, fence).await?;
        Err(record::tenant_not_found(tenant))
    }

    async fn inbox_retry(&self, tenant: &TenantId, which: DeadLetters) -> Result<Vec<i64>> {
        self.move_dead(tenant, which, true).await
    }

    async fn inbox_drop(&self, tenant: &TenantId, which: DeadLetters) -> Result<Vec<i64>> {
        self.move_dead(tenant, which, false).await
    }

    async fn inbox_view(
        &self,
        tenant: &TenantId,
        after: Option<i64>,
        limit: usize,
    ) -> Result<InboxView> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let after = after.unwrap_or(i64::MIN);
        // One statement, so both lists come from the same snapshot.
        let rows = self
            .query(
                concat!(
                    "SELECT * FROM ( \
                       (SELECT state, ",
                    inbox_columns!(),
                    " FROM inbox WHERE tenant = $1 AND state = 'pending' AND seq > $3 ORDER BY seq LIMIT $2) \
                       UNION ALL \
                       (SELECT state, ",
                    inbox_columns!(),
                    " FROM inbox WHERE tenant = $1 AND state = 'dead' AND seq > $3 ORDER BY seq LIMIT $2) \
                     ) AS v ORDER BY seq"
                ),
                &[&tenant.as_str(), &limit, &after],
                true,
            )
            .await?;
        let mut view = InboxView::default();
        for row in &rows {
            let state: String = get(row, 0)?;
            let item = inbox_row_at(row, 1)?;
            match state.as_str() {
                "pending" => view.pending.push(item),
                _ => view.dead.push(item),
            }
        }
        Ok(view)
    }

    async fn inbox_depth(&self, tenant: &TenantId) -> Result<u64> {
        let row = self
            .query_opt(
                "SELECT COUNT(*) FROM inbox WHERE tenant = $1 AND state = 'pending'",
                &[&tenant.as_str()],
                true,
            )
            .await?
            .ok_or_else(|| Error::generic(BACKEND, "COUNT(*) returned no row"))?;
        let n: i64 = get(&row, 0)?;
        Ok(n as u64)
    }

    async fn inbox_pending_tenants(&self) -> Result<Vec<TenantId>> {
        let rows = self
            .query(
                "SELECT DISTINCT tenant FROM inbox WHERE state = 'pending' ORDER BY tenant",
                &[],
                true,
            )
            .await?;
        tenant_ids(rows, "inbox of")
    }

    async fn inbox_prune(&self, before_ms: i64) -> Result<u64> {
        self.execute(
            "DELETE FROM inbox WHERE state = 'done' AND accepted_at_ms < $1",
            &[&before_ms],
            false,
        )
        .await
    }

    /// An acknowledged update's payload is blanked by a new row version; the old version, text
    /// and all, stays in the table's pages until a vacuum removes it. Vacuums the inbox at most
    /// once a minute (autovacuum may take much longer on a quiet table). What PostgreSQL's own
    /// write-ahead log and free page space keep is beyond a client's reach: docs/secrets.md.
    async fn purge_freed(&self) -> Result<()> {
        let now = otm_core::time::now_ms();
        let last = self.vacuumed_at_ms.load(Ordering::Relaxed);
        if now - last < VACUUM_EVERY_MS
            || self
                .vacuumed_at_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return Ok(());
        }
        let client = self.db.pool.get().await.map_err(pool_error)?;
        // VACUUM runs outside a transaction: a simple query of its own.
        client
            .batch_execute("VACUUM inbox")
            .await
            .map_err(|e| Error::unavailable(BACKEND, format!("VACUUM inbox: {}", describe(&e))))
    }
}

/// [`inbox_row`] for a row whose inbox columns start at `offset`.
fn inbox_row_at(row: &Row, offset: usize) -> Result<InboxItem> {
    InboxRow {
        tenant: get(row, offset)?,
        seq: get(row, offset + 1)?,
        update_id: get(row, offset + 2)?,
        payload: get(row, offset + 3)?,
        attempts: get(row, offset + 4)?,
        accepted_at_ms: get(row, offset + 5)?,
        last_error: get(row, offset + 6)?,
    }
    .into_item()
}

fn audit_from(row: &Row) -> Result<otm_core::AuditEntry> {
    let status: i32 = get(row, 6)?;
    Ok(otm_core::AuditEntry {
        id: get(row, 0)?,
        at_ms: get(row, 1)?,
        who: get(row, 2)?,
        method: get(row, 3)?,
        route: get(row, 4)?,
        tenant: get(row, 5)?,
        status: u16::try_from(status).unwrap_or(0),
    })
}

fn token_from(row: &Row) -> Result<otm_core::AdminToken> {
    Ok(otm_core::AdminToken {
        name: get(row, 0)?,
        digest: get(row, 1)?,
        read_only: get(row, 2)?,
        created_at_ms: get(row, 3)?,
    })
}

#[async_trait::async_trait]
impl otm_core::AdminStore for PostgresRegistry {
    async fn audit_append(&self, entry: &otm_core::AuditEntry) -> Result<()> {
        let e = entry;
        self.execute(
            "INSERT INTO audit (id, at_ms, who, method, route, tenant, status) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO NOTHING",
            &[
                &e.id,
                &e.at_ms,
                &e.who,
                &e.method,
                &e.route,
                &e.tenant,
                &i32::from(e.status),
            ],
            true,
        )
        .await?;
        Ok(())
    }

    async fn audit_list(
        &self,
        limit: usize,
        before: Option<i64>,
    ) -> Result<Vec<otm_core::AuditEntry>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .query(
                "SELECT id, at_ms, who, method, route, tenant, status FROM audit \
                 WHERE $1::BIGINT IS NULL OR id < $1 ORDER BY id DESC LIMIT $2",
                &[&before, &limit],
                true,
            )
            .await?;
        rows.iter().map(audit_from).collect()
    }

    async fn token_create(&self, token: &otm_core::AdminToken) -> Result<()> {
        let t = token;
        let n = self
            .execute(
                "INSERT INTO admin_tokens (name, digest, read_only, created_at_ms) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                &[&t.name, &t.digest, &t.read_only, &t.created_at_ms],
                false,
            )
            .await?;
        if n == 0 {
            return Err(Error::AlreadyExists {
                what: format!("admin token {}", t.name),
            });
        }
        Ok(())
    }

    async fn token_by_digest(&self, digest: &str) -> Result<Option<otm_core::AdminToken>> {
        self.query_opt(
            "SELECT name, digest, read_only, created_at_ms FROM admin_tokens WHERE digest = $1",
            &[&digest],
            true,
        )
        .await?
        .as_ref()
        .map(token_from)
        .transpose()
    }

    async fn token_list(&self) -> Result<Vec<otm_core::AdminToken>> {
        let rows = self
            .query(
                "SELECT name, digest, read_only, created_at_ms FROM admin_tokens ORDER BY name",
                &[],
                true,
            )
            .await?;
        rows.iter().map(token_from).collect()
    }

    async fn token_revoke(&self, name: &str) -> Result<bool> {
        let n = self
            .execute("DELETE FROM admin_tokens WHERE name = $1", &[&name], true)
            .await?;
        Ok(n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_the_schema_out_of_the_url() {
        assert_eq!(
            split_schema("postgres://u:p@h/db"),
            ("postgres://u:p@h/db".to_owned(), None)
        );
        assert_eq!(
            split_schema("postgres://u:p@h/db?schema=otm_a"),
            ("postgres://u:p@h/db".to_owned(), Some("otm_a".to_owned()))
        );
        assert_eq!(
            split_schema("postgres://h/db?connect_timeout=3&schema=x&application_name=otm-a"),
            (
                "postgres://h/db?connect_timeout=3&application_name=otm-a".to_owned(),
                Some("x".to_owned())
            )
        );
    }

    #[test]
    fn accepts_only_plain_schema_names() {
        for ok in ["otm", "_x", "otm_test_0a1b", &"a".repeat(63)] {
            assert!(check_schema_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Otm",
            "1x",
            "a-b",
            "a\"b",
            "a b",
            "pg_temp",
            &"a".repeat(64),
        ] {
            assert!(
                matches!(check_schema_name(bad), Err(Error::InvalidInput { .. })),
                "{bad}"
            );
        }
    }

    #[tokio::test]
    async fn refuses_bad_options_before_connecting() {
        let url = "postgres://u:hunter2@127.0.0.1:1/db";
        for (options, url) in [
            (PostgresOptions::default().with_pool_size(0), url),
            (PostgresOptions::default().with_timeout(Duration::ZERO), url),
            (PostgresOptions::default().with_schema("Bad-Name"), url),
            (
                PostgresOptions::default().with_schema("a"),
                "postgres://u:hunter2@127.0.0.1:1/db?schema=b",
            ),
            (
                PostgresOptions::default(),
                "postgres://u:hunter2@127.0.0.1:notaport/db",
            ),
            (
                PostgresOptions::default(),
                "postgres://u:hunter2@h/db?bogus=1",
            ),
        ] {
            let err = PostgresRegistry::connect_with(url, options)
                .await
                .unwrap_err();
            assert!(matches!(err, Error::InvalidInput { .. }), "{url}: {err:?}");
            assert!(!format!("{err} {err:?}").contains("hunter2"), "{err}");
        }
    }

    /// `OTM_TEST_POSTGRES_URL`, when set: the live tests below do nothing without it.
    fn test_url() -> Option<String> {
        std::env::var("OTM_TEST_POSTGRES_URL")
            .ok()
            .filter(|u| !u.is_empty())
    }

    /// A registry in a schema of its own (the test drops it at the end), and the schema's name.
    async fn in_fresh_schema(url: &str) -> (PostgresRegistry, String) {
        let schema = format!("otm_test_{}", otm_core::id::random_hex(4));
        let r =
            PostgresRegistry::connect_with(url, PostgresOptions::default().with_schema(&schema))
                .await
                .unwrap();
        (r, schema)
    }

    /// An acknowledged update's text leaves the table's row versions at the next scrub: the
    /// blanked row replaces it, and the vacuum removes the old version. Read with
    /// `pageinspect`, row version by row version. Needs `OTM_TEST_POSTGRES_URL` (as a superuser,
    /// for the extension); passes without doing anything when it is not set.
    #[tokio::test]
    async fn an_acknowledged_payload_leaves_the_table_at_the_next_scrub() {
        let Some(url) = test_url() else {
            return;
        };
        let (r, schema) = in_fresh_schema(&url).await;
        let id = TenantId::parse("scrubbed").unwrap();
        r.create_tenant(&otm_core::Tenant::new(id.clone(), "reference", None))
            .await
            .unwrap();
        let secret_text = format!("the-secret-{}", otm_core::id::random_hex(8));
        let payload = format!(r#"{{"update_id":1,"message":{{"text":"{secret_text}"}}}}"#);
        r.inbox_append(&id, 1, payload.as_bytes()).await.unwrap();
        let item = r.inbox_next(&id).await.unwrap().expect("pending");
        r.inbox_ack(&id, item.seq, None).await.unwrap();

        r.execute(
            "CREATE EXTENSION IF NOT EXISTS pageinspect SCHEMA public",
            &[],
            false,
        )
        .await
        .unwrap();
        let versions_with_text = async || -> i64 {
            let rows = r
                .query(
                    "SELECT count(*) FROM public.heap_page_items(public.get_raw_page('inbox', 0)) \
                     WHERE position(convert_to($1, 'UTF8') IN t_data) > 0",
                    &[&secret_text],
                    true,
                )
                .await
                .unwrap();
            rows[0].get(0)
        };
        assert_eq!(
            versions_with_text().await,
            1,
            "the old version is there before"
        );
        // Another session's open snapshot can hold a vacuum back for a moment.
        let mut left = 1;
        for _ in 0..50 {
            r.vacuumed_at_ms.store(0, Ordering::Relaxed);
            r.purge_freed().await.unwrap();
            left = versions_with_text().await;
            if left == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(left, 0, "no row version holds the text after the scrub");
        // Within the minute, a second scrub does nothing.
        let at = r.vacuumed_at_ms.load(Ordering::Relaxed);
        r.purge_freed().await.unwrap();
        assert_eq!(r.vacuumed_at_ms.load(Ordering::Relaxed), at);
        r.execute(&format!("DROP SCHEMA {schema} CASCADE"), &[], false)
            .await
            .unwrap();
    }

    /// A session default that would lose answered writes is undone on every pooled connection.
    /// Needs `OTM_TEST_POSTGRES_URL`; passes without doing anything when it is not set.
    #[tokio::test]
    async fn pooled_connections_commit_synchronously() {
        let Some(url) = test_url() else {
            return;
        };
        let sep = if url.contains('?') { '&' } else { '?' };
        let url = format!("{url}{sep}options=-c%20synchronous_commit%3Doff");
        let schema = format!("otm_test_{}", otm_core::id::random_hex(4));
        let r = PostgresRegistry::connect_with(
            &url,
            PostgresOptions::default()
                .with_schema(&schema)
                .with_pool_size(2),
        )
        .await
        .unwrap();
        // Both connections of the pool, taken at once.
        let show = "SELECT current_setting('synchronous_commit'), pg_sleep(0.05)::text";
        let (a, b) = tokio::join!(r.query(show, &[], true), r.query(show, &[], true));
        for rows in [a.unwrap(), b.unwrap()] {
            let value: String = rows[0].get(0);
            assert_eq!(value, "on");
        }
        r.execute(&format!("DROP SCHEMA {schema} CASCADE"), &[], false)
            .await
            .unwrap();
    }

    /// An acknowledgement, a failed attempt and the activity time turn `synchronous_commit` off
    /// for their own transaction, and only for it. Run here inside a transaction of the test's
    /// own, which can look at the setting after them. Needs `OTM_TEST_POSTGRES_URL`; passes
    /// without doing anything when it is not set.
    #[tokio::test]
    async fn relaxed_writes_commit_without_waiting_for_the_wal_flush() {
        let Some(url) = test_url() else {
            return;
        };
        let (r, schema) = in_fresh_schema(&url).await;
        let ann = TenantId::parse("ann").unwrap();
        r.create_tenant(&Tenant::new(ann.clone(), "reference", None))
            .await
            .unwrap();
        let Appended::Stored { seq } = r.inbox_append(&ann, 1, b"{}").await.unwrap() else {
            panic!("stored")
        };
        let (mut client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
            .batch_execute(&format!("SET search_path TO {schema}"))
            .await
            .unwrap();
        let setting = "SELECT current_setting('synchronous_commit')";
        let no_fence: Option<i64> = None;
        let tenant = ann.as_str();
        let statements: [(&str, &str, Vec<&(dyn tokio_postgres::types::ToSql + Sync)>); 3] = [
            ("touch", TOUCH_SQL, vec![&tenant, &7i64]),
            (
                "fail",
                FAIL_SQL,
                vec![&tenant, &seq, &"refused", &5i64, &no_fence],
            ),
            ("ack", ACK_SQL, vec![&tenant, &seq, &9i64, &no_fence]),
        ];
        for (what, sql, params) in statements {
            let tx = client.transaction().await.unwrap();
            let n = tx.execute(sql, &params).await.unwrap();
            assert_eq!(n, 1, "{what} changed its row");
            let v: String = tx.query_one(setting, &[]).await.unwrap().get(0);
            assert_eq!(v, "off", "{what} turned synchronous_commit off");
            tx.rollback().await.unwrap();
            let v: String = client.query_one(setting, &[]).await.unwrap().get(0);
            assert_eq!(v, "on", "{what}: for its own transaction only");
        }
        // Through the registry, the same calls do what they always did.
        r.inbox_fail(&ann, seq, "refused", 5, None).await.unwrap();
        r.touch_tenant(&ann, 1_000).await.unwrap();
        r.inbox_ack(&ann, seq, None).await.unwrap();
        assert!(r.inbox_next(&ann).await.unwrap().is_none());
        r.execute(&format!("DROP SCHEMA {schema} CASCADE"), &[], false)
            .await
            .unwrap();
    }

    #[test]
    fn truncates_on_char_boundaries_and_drops_nul() {
        assert_eq!(truncate("héllo", 2), "h…");
        assert_eq!(truncate("abc", 5), "abc");
        assert_eq!(truncate("a\0b", 10), "a\u{fffd}b");
    }
}
