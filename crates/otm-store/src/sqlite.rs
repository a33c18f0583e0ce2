//! [`SqliteRegistry`]: the embedded [`Registry`](otm_core::Registry), one SQLite file.
//!
//! Durability first: the database runs in WAL mode, and a write is answered only once the WAL
//! holding it is fsync'd.
//!
//! Nothing here blocks the async runtime:
//! - Writes go to ONE writer thread over a channel. The thread applies group commit: it takes every
//!   job queued at that moment (up to [`MAX_BATCH`]), runs them in one `BEGIN IMMEDIATE … COMMIT`
//!   transaction, each job inside its own savepoint so one failing job does not fail the others
//!   (an append, one statement, needs none: SQLite undoes a failed statement by itself).
//! - The commit itself does not wait for the disk (`synchronous=NORMAL`): a sync thread fsyncs the
//!   WAL and only then answers the batch's jobs, one fsync for every batch committed meanwhile,
//!   while the writer already runs the next batch. A failed fsync stops all writes (see
//!   `sync_loop`).
//! - A batch of relaxed writes only ([`SqliteRegistry::write_relaxed`]: an acknowledgement, a
//!   failed attempt, the last-activity time) is answered at its commit, without waiting for a
//!   sync: atomic, and kept when otm itself dies, but lost with the machine's power until the
//!   next sync or checkpoint. What such a loss undoes is safe to redo: an update delivered again
//!   (agents deduplicate `update_id`s), an attempt counted again.
//! - Reads use a small pool of read-only connections on `spawn_blocking` threads. WAL lets them
//!   run beside the writer, and each sees every commit answered before it started (and may see
//!   one whose sync is still under way: a delivery of an update whose webhook was not answered
//!   yet, which Telegram sends again should the machine lose power first).
//!
//! The schema lives in [`MIGRATIONS`], applied in order by `user_version`.

use crate::record::{self, InboxRow, InstanceRow, TenantRow, deadline, to_i64};
use otm_core::{
    Appended, DeadLetters, Error, FailOutcome, FleetSettings, Inbox, InboxItem, InboxView,
    InstanceId, InstanceRecord, InstanceStore, Result, Secret, Tenant, TenantId, TenantStatus,
    TenantStore,
};
use rusqlite::{
    Connection, ErrorCode, OpenFlags, OptionalExtension, Row, TransactionBehavior, params,
};
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc, oneshot};

const BACKEND: &str = "sqlite";

/// Most jobs one group commit takes.
pub const MAX_BATCH: usize = 256;
/// Most delivered updates one write of [`Inbox::inbox_prune`] deletes.
const PRUNE_STEP: i64 = 2_000;
/// Read-only connections in the pool.
const READERS: usize = 4;
/// Jobs that may wait for the writer before senders wait too.
const QUEUE: usize = 4096;
/// How long a connection waits for a lock held by another process before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// The settings row that holds [`FleetSettings`].
const FLEET_KEY: &str = "fleet";

/// The schema, one step per entry. Step `n` (1-based) brings `user_version` to `n`. Never edit a
/// released step; add a new one.
pub const MIGRATIONS: &[&str] = &[
    // 1: tenants, instances, inbox, settings.
    r#"
    CREATE TABLE tenants (
        id                TEXT PRIMARY KEY NOT NULL,
        profile           TEXT NOT NULL,
        idle_timeout_s    INTEGER NOT NULL,
        bot_token         TEXT,
        webhook_secret    TEXT NOT NULL,
        cold_start_notice INTEGER NOT NULL DEFAULT 0,
        status            TEXT NOT NULL,
        created_at_ms     INTEGER NOT NULL,
        last_active_ms    INTEGER NOT NULL,
        idle_deadline_ms  INTEGER NOT NULL,
        fence             INTEGER NOT NULL DEFAULT 0
    ) STRICT;
    -- idle_due: running tenants by deadline, cheap with 100,000 tenants.
    CREATE INDEX tenants_idle ON tenants (status, idle_deadline_ms);

    CREATE TABLE instances (
        id               TEXT PRIMARY KEY NOT NULL,
        tenant           TEXT UNIQUE,
        state            TEXT NOT NULL,
        address          TEXT NOT NULL,
        shim_token       TEXT NOT NULL,
        surrogate_digest TEXT,
        created_at_ms    INTEGER NOT NULL,
        bound_at_ms      INTEGER
    ) STRICT;
    CREATE INDEX instances_surrogate ON instances (surrogate_digest);
    -- claim_warm_instance finds unbound instances (the warm pool, a few) through the UNIQUE index
    -- on tenant, with tenant IS NULL.

    -- seq is global and never reused (AUTOINCREMENT), so it grows in append order per tenant.
    CREATE TABLE inbox (
        seq            INTEGER PRIMARY KEY AUTOINCREMENT,
        tenant         TEXT NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
        update_id      INTEGER NOT NULL,
        payload        BLOB NOT NULL,
        state          TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'done', 'dead')),
        attempts       INTEGER NOT NULL DEFAULT 0,
        accepted_at_ms INTEGER NOT NULL,
        last_error     TEXT,
        done_at_ms     INTEGER,
        UNIQUE (tenant, update_id)
    ) STRICT;
    CREATE INDEX inbox_queue ON inbox (tenant, state, seq);
    -- inbox_pending_tenants without scanning delivered rows.
    CREATE INDEX inbox_pending ON inbox (tenant) WHERE state = 'pending';
    -- inbox_prune without scanning pending rows.
    CREATE INDEX inbox_done ON inbox (accepted_at_ms) WHERE state = 'done';

    CREATE TABLE settings (
        key   TEXT PRIMARY KEY NOT NULL,
        value TEXT NOT NULL
    ) STRICT;
    "#,
    // 2: per-tenant resource limits (a JSON object of the set ones).
    r#"
    ALTER TABLE tenants ADD COLUMN limits TEXT NOT NULL DEFAULT '{}';
    "#,
    // 3: the fence of the dispatcher that owns a tenant's inbox (acks and failures check it).
    r#"
    ALTER TABLE tenants ADD COLUMN dispatch_fence INTEGER NOT NULL DEFAULT 0;
    "#,
    // 4: the audit trail of admin writes, and named admin tokens (their SHA-256 only).
    r#"
    CREATE TABLE audit (
        id     INTEGER PRIMARY KEY,
        at_ms  INTEGER NOT NULL,
        who    TEXT NOT NULL,
        method TEXT NOT NULL,
        route  TEXT NOT NULL,
        tenant TEXT,
        status INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE admin_tokens (
        name          TEXT PRIMARY KEY NOT NULL,
        digest        TEXT NOT NULL UNIQUE,
        read_only     INTEGER NOT NULL,
        created_at_ms INTEGER NOT NULL
    ) STRICT;
    "#,
    // 5: freeze deadlines (NULL: never frozen), so the idle sweep asks for the tenants due
    // instead of reading every awake one. 60 s is the default `freeze_after_s`.
    r#"
    ALTER TABLE tenants ADD COLUMN freeze_after_ms INTEGER;
    ALTER TABLE tenants ADD COLUMN freeze_deadline_ms INTEGER;
    UPDATE tenants SET freeze_after_ms = 1000 * coalesce(json_extract(limits, '$.freeze_after_s'), 60)
      WHERE typeof(coalesce(json_extract(limits, '$.freeze_after_s'), 60)) = 'integer'
        AND coalesce(json_extract(limits, '$.freeze_after_s'), 60)
            BETWEEN 1 AND min(idle_timeout_s - 1, 9000000000000);
    UPDATE tenants SET freeze_deadline_ms = last_active_ms + freeze_after_ms
      WHERE freeze_after_ms IS NOT NULL AND last_active_ms < 9000000000000000000 - freeze_after_ms;
    CREATE INDEX tenants_freeze ON tenants (status, freeze_deadline_ms);
    "#,
    // 6: fewer index pages per append. Every append wrote four B-trees (the rows, the unique
    // (tenant, update_id), inbox_queue and inbox_pending); a group commit rewrote each one's
    // page of each tenant in it. Pending and dead rows get partial indexes of their own, which
    // serve the queue, the depth, the pending tenants and the dead letters; an append writes
    // three B-trees.
    r#"
    DROP INDEX inbox_queue;
    DROP INDEX inbox_pending;
    CREATE INDEX inbox_pending ON inbox (tenant, seq) WHERE state = 'pending';
    CREATE INDEX inbox_dead ON inbox (tenant, seq) WHERE state = 'dead';
    "#,
];

/// The embedded registry: one SQLite file.
///
/// Cheap to share behind an `Arc`. Dropping the last handle lets the writer finish the queued
/// jobs, then waits while the writer thread closes every connection of the registry, one after
/// another: once the drop returns, the file may be opened again.
pub struct SqliteRegistry {
    path: PathBuf,
    /// Taken on drop, which ends the writer's loop.
    writer: Option<mpsc::Sender<Box<dyn WriteJob>>>,
    writer_thread: Option<std::thread::JoinHandle<()>>,
    readers: Arc<ReadPool>,
    stats: Arc<Counters>,
}

impl Drop for SqliteRegistry {
    /// Closes the registry's connections on one thread, in order. SQLite 3.51's unix VFS takes
    /// its global mutex and a file's lock mutex in one order when a connection closes and in the
    /// other when a connection to the same file locks it: a connection closing on one thread
    /// while another locks the same file on a second thread can deadlock both, forever.
    fn drop(&mut self) {
        drop(self.writer.take());
        if let Some(thread) = self.writer_thread.take()
            && thread.thread().id() != std::thread::current().id()
            && thread.join().is_err()
        {
            tracing::error!("the SQLite writer thread panicked");
        }
    }
}

impl fmt::Debug for SqliteRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteRegistry")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// What the writer thread has done so far; for tests and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Jobs run (committed or not).
    pub jobs: u64,
    /// Transactions committed. Fewer than `jobs` when group commit batched them.
    pub commits: u64,
    /// Commits fsync'd before their jobs were answered; the rest held relaxed writes only.
    pub synced_commits: u64,
    /// Syncs of the WAL. Fewer than `synced_commits` when one sync covered several commits.
    pub syncs: u64,
}

/// A handle on a registry's [`WriteStats`], read whenever asked.
#[derive(Clone, Debug)]
pub struct WriteCounters(Arc<Counters>);

impl WriteCounters {
    /// What the writer thread has done so far.
    pub fn get(&self) -> WriteStats {
        let c = &self.0;
        WriteStats {
            jobs: c.jobs.load(Ordering::Relaxed),
            commits: c.commits.load(Ordering::Relaxed),
            synced_commits: c.synced_commits.load(Ordering::Relaxed),
            syncs: c.syncs.load(Ordering::Relaxed),
        }
    }
}

/// Shared between the registry and its writer thread.
#[derive(Debug, Default)]
struct Counters {
    jobs: AtomicU64,
    commits: AtomicU64,
    synced_commits: AtomicU64,
    syncs: AtomicU64,
    /// Why the WAL could not be synced, once that happened: every write fails from then on.
    sync_failure: std::sync::OnceLock<String>,
    /// Set by [`Inbox::purge_freed`]: checkpoint and truncate the WAL after the next commit,
    /// outside any transaction.
    truncate_wal: std::sync::atomic::AtomicBool,
}

/// What the writer thread alone keeps between batches.
struct WriterState {
    /// A job that may have cleared or deleted something ran since the WAL was last truncated
    /// (true at start: the WAL may hold what an earlier process freed). Appends only add rows,
    /// so a WAL written by appends alone holds nothing to scrub, and is not truncated.
    freed: bool,
}

impl SqliteRegistry {
    /// Opens (creating it and its parent directory if needed) the database at `path`, applies
    /// the migrations, and starts the writer thread.
    pub fn open(path: &Path) -> Result<Self> {
        let mut wal = WalSync::new(path);
        Self::open_with_sync(path, move || wal.sync())
    }

    /// [`SqliteRegistry::open`] with `sync` as the way the WAL is made durable.
    fn open_with_sync(
        path: &Path,
        sync: impl FnMut() -> std::io::Result<()> + Send + 'static,
    ) -> Result<Self> {
        // Every connection would get a database of its own: readers would never see a write.
        let name = path.to_string_lossy();
        if name.is_empty() || name == ":memory:" || name.starts_with("file:") {
            return Err(Error::invalid(format!(
                "the SQLite registry needs a file path, not `{name}`; for a throwaway registry use a file in a \
                 temporary directory"
            )));
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                Error::generic(
                    BACKEND,
                    format!(
                        "cannot create the registry directory {}: {e}",
                        dir.display()
                    ),
                )
            })?;
        }
        let mut conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| open_error(path, e))?;
        configure_writer(&conn).map_err(|e| open_error(path, e))?;
        migrate(&mut conn, path)?;
        // From here a commit writes the WAL without syncing it; the sync thread syncs it before
        // answering the batch's durable jobs (see `sync_loop`), so an answered write survives
        // power loss. Checkpoints still sync the WAL, then the database, before the WAL starts
        // over.
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(|e| open_error(path, e))?;

        let mut readers = Vec::with_capacity(READERS);
        for _ in 0..READERS {
            let r = Connection::open_with_flags(
                path,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .map_err(|e| open_error(path, e))?;
            r.busy_timeout(BUSY_TIMEOUT)
                .map_err(|e| open_error(path, e))?;
            r.set_prepared_statement_cache_capacity(64);
            r.pragma_update(None, "query_only", true)
                .map_err(|e| open_error(path, e))?;
            readers.push(r);
        }

        let stats = Arc::new(Counters::default());
        let (committed, to_sync) = std::sync::mpsc::channel();
        let thread_stats = stats.clone();
        std::thread::Builder::new()
            .name("otm-sqlite-sync".into())
            .spawn(move || sync_loop(sync, to_sync, &thread_stats))
            .map_err(|e| Error::generic(BACKEND, format!("cannot start the sync thread: {e}")))?;
        let readers = Arc::new(ReadPool {
            conns: Mutex::new(readers),
            permits: Arc::new(Semaphore::new(READERS)),
        });
        let (tx, rx) = mpsc::channel(QUEUE);
        let thread_stats = stats.clone();
        let thread_readers = readers.clone();
        let writer_thread = std::thread::Builder::new()
            .name("otm-sqlite-writer".into())
            .spawn(move || {
                writer_loop(conn, rx, &thread_stats, committed, &thread_readers);
            })
            .map_err(|e| Error::generic(BACKEND, format!("cannot start the writer thread: {e}")))?;
        tracing::debug!(path = %path.display(), "opened the SQLite registry");

        Ok(SqliteRegistry {
            path: path.to_owned(),
            writer: Some(tx),
            writer_thread: Some(writer_thread),
            readers,
            stats,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What the writer thread has done so far.
    pub fn write_stats(&self) -> WriteStats {
        self.write_counters().get()
    }

    /// The writer's counters, to be read later (by `/metrics`) while the registry runs.
    pub fn write_counters(&self) -> WriteCounters {
        WriteCounters(self.stats.clone())
    }

    /// Runs `work` on the writer thread inside the next group commit, in a savepoint of its
    /// own; answers after the commit.
    async fn write<T, F>(&self, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        self.write_job(true, true, work).await
    }

    /// [`SqliteRegistry::write`] for work whose loss at a power cut is safe to redo (see the
    /// module's notes): its commit is not fsync'd unless a durable write shares the batch.
    async fn write_relaxed<T, F>(&self, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        self.write_job(true, false, work).await
    }

    /// [`SqliteRegistry::write`] for an append: work that writes one new row with one statement
    /// and cannot fail after it. No savepoint (SQLite undoes a failed statement by itself), and
    /// it frees nothing that [`Inbox::purge_freed`] must scrub.
    async fn write_append<T, F>(&self, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        self.write_job(false, true, work).await
    }

    async fn write_job<T, F>(&self, savepoint: bool, durable: bool, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job = Box::new(Job {
            work: Some(work),
            out: None,
            reply,
            savepoint,
            durable,
        });
        let writer = self.writer.as_ref().ok_or_else(writer_gone)?;
        writer.send(job).await.map_err(|_| writer_gone())?;
        answer.await.map_err(|_| writer_gone())?
    }

    /// The tenants a `sql` query with the parameters (now, limit) finds due.
    async fn due(&self, sql: &'static str, now_ms: i64, limit: usize) -> Result<Vec<TenantId>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |c| {
            let mut stmt = c.prepare_cached(sql).map_err(db)?;
            let ids = stmt
                .query_map(params![now_ms, limit], |r| r.get::<_, String>(0))
                .map_err(db)?;
            ids.map(|id| {
                let id = id.map_err(db)?;
                record::tenant_id(&id, "tenant row")
            })
            .collect()
        })
        .await
    }

    /// Runs `work` on a pooled read-only connection, off the async runtime.
    async fn read<T, F>(&self, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let pool = self.readers.clone();
        let permit = pool
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| writer_gone())?;
        let task = tokio::task::spawn_blocking(move || {
            // Dropped in reverse order: the connection goes back before the permit is released,
            // panic or not; if the task never runs, the permit is released with the closure.
            let _permit = permit;
            let conn = Pooled::take(&pool);
            work(&conn)
        });
        task.await
            .map_err(|e| Error::generic(BACKEND, format!("a read task failed: {e}")))?
    }
}

/// Read-only connections; `permits` counts the free ones.
struct ReadPool {
    conns: Mutex<Vec<Connection>>,
    permits: Arc<Semaphore>,
}

/// A connection taken from the pool, returned on drop.
struct Pooled<'a> {
    pool: &'a ReadPool,
    conn: Option<Connection>,
}

impl<'a> Pooled<'a> {
    fn take(pool: &'a ReadPool) -> Self {
        let conn = pool.conns.lock().unwrap_or_else(|e| e.into_inner()).pop();
        Pooled {
            pool,
            conn: Some(conn.expect("a read permit always finds a free connection")),
        }
    }
}

impl std::ops::Deref for Pooled<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        self.conn.as_ref().expect("present until drop")
    }
}

impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool
                .conns
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(conn);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The writer thread.

/// One queued write: `run` (inside a savepoint unless it needs none), then `finish` once the
/// batch's fate is known.
trait WriteJob: Send {
    /// Whether the work needs a savepoint of its own (and may clear or delete something): false
    /// for appends, which insert one row with one statement and fail only in it (SQLite undoes
    /// a failed statement by itself).
    fn savepoint(&self) -> bool;
    /// Whether the caller is answered only after the commit is fsync'd.
    fn durable(&self) -> bool;
    /// Runs the work; true if it succeeded and its savepoint should be kept.
    fn run(&mut self, conn: &Connection) -> bool;
    /// Answers the caller: the work's own result if the batch committed, else the batch error.
    fn finish(self: Box<Self>, batch: Result<(), &BatchError>);
}

struct Job<T, F> {
    work: Option<F>,
    out: Option<Result<T>>,
    reply: oneshot::Sender<Result<T>>,
    savepoint: bool,
    durable: bool,
}

impl<T, F> WriteJob for Job<T, F>
where
    T: Send + 'static,
    F: FnOnce(&Connection) -> Result<T> + Send + 'static,
{
    fn savepoint(&self) -> bool {
        self.savepoint
    }

    fn durable(&self) -> bool {
        self.durable
    }

    fn run(&mut self, conn: &Connection) -> bool {
        let Some(work) = self.work.take() else {
            return false;
        };
        let out = catch_unwind(AssertUnwindSafe(|| work(conn))).unwrap_or_else(|_| {
            Err(Error::generic(
                BACKEND,
                "a registry write panicked; it was rolled back",
            ))
        });
        let ok = out.is_ok();
        self.out = Some(out);
        ok
    }

    fn finish(self: Box<Self>, batch: Result<(), &BatchError>) {
        let answer = match (self.out, batch) {
            // A job that failed on its own keeps its own, more precise error.
            (Some(Err(e)), _) => Err(e),
            (Some(Ok(v)), Ok(())) => Ok(v),
            (_, Err(e)) => Err(e.to_error()),
            (None, Ok(())) => Err(Error::generic(BACKEND, "a registry write was never run")),
        };
        // The caller may have gone away; the write stands either way.
        let _ = self.reply.send(answer);
    }
}

/// Why a whole batch failed; every job of it hears this.
#[derive(Debug)]
struct BatchError {
    busy: bool,
    message: String,
}

impl BatchError {
    fn to_error(&self) -> Error {
        if self.busy {
            Error::unavailable(BACKEND, &self.message)
        } else {
            Error::generic(BACKEND, self.message.clone())
        }
    }
}

impl From<rusqlite::Error> for BatchError {
    fn from(e: rusqlite::Error) -> Self {
        BatchError {
            busy: is_busy(&e),
            message: format!("the write transaction failed: {e}"),
        }
    }
}

/// Runs batches until the registry is dropped, then closes the registry's connections: the
/// readers first, then its own, the last, which checkpoints the WAL and removes it.
fn writer_loop(
    mut conn: Connection,
    mut rx: mpsc::Receiver<Box<dyn WriteJob>>,
    stats: &Counters,
    committed: std::sync::mpsc::Sender<Vec<Box<dyn WriteJob>>>,
    readers: &ReadPool,
) {
    let mut state = WriterState { freed: true };
    let mut batch: Vec<Box<dyn WriteJob>> = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let outcome = match stats.sync_failure.get() {
            Some(message) => Err(BatchError {
                busy: false,
                message: message.clone(),
            }),
            None => run_batch(&mut conn, &mut batch),
        };
        if batch.iter().any(|job| job.savepoint()) {
            state.freed = true;
        }
        if stats.truncate_wal.swap(false, Ordering::Relaxed) && state.freed {
            state.freed = !truncate_wal(&conn);
        }
        stats.jobs.fetch_add(batch.len() as u64, Ordering::Relaxed);
        match &outcome {
            Ok(()) => {
                stats.commits.fetch_add(1, Ordering::Relaxed);
                if batch.iter().any(|job| job.durable()) {
                    // Answered by the sync thread once the WAL is on disk; meanwhile this thread
                    // goes on with the next batch.
                    let full = std::mem::replace(&mut batch, Vec::with_capacity(MAX_BATCH));
                    if let Err(std::sync::mpsc::SendError(jobs)) = committed.send(full) {
                        let gone = BatchError {
                            busy: false,
                            message: "the registry's sync thread stopped".into(),
                        };
                        for job in jobs {
                            job.finish(Err(&gone));
                        }
                    }
                    continue;
                }
            }
            Err(e) => {
                tracing::warn!(jobs = batch.len(), error = %e.message, "a registry write batch failed")
            }
        }
        for job in batch.drain(..) {
            job.finish(outcome.as_ref().map(|_| ()));
        }
    }
    drop(committed);
    close_readers(readers);
    drop(conn);
    tracing::debug!("the SQLite writer stopped");
}

/// Closes the pooled read connections on this thread, after the reads still running (a read
/// whose caller gave up runs to its end) have put theirs back; one still out after a while is
/// closed by its read.
fn close_readers(readers: &ReadPool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while readers.permits.available_permits() < READERS && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    let conns = std::mem::take(&mut *readers.conns.lock().unwrap_or_else(|e| e.into_inner()));
    drop(conns);
}

/// Makes committed batches durable, then answers their jobs: one `fdatasync` of the WAL for
/// every batch committed meanwhile. It runs beside the writer, which commits the next batch
/// while the disk syncs this one, so a commit's CPU and the disk's flush overlap rather than add
/// up. A failed sync leaves the WAL's state on disk unknown (the kernel may have dropped the
/// pages it could not write): every write from then on fails, until otm is restarted and
/// SQLite recovers the database from what the disk holds.
fn sync_loop(
    mut sync: impl FnMut() -> std::io::Result<()>,
    committed: std::sync::mpsc::Receiver<Vec<Box<dyn WriteJob>>>,
    stats: &Counters,
) {
    let mut batches = Vec::new();
    while let Ok(first) = committed.recv() {
        batches.push(first);
        batches.extend(committed.try_iter());
        let outcome = match stats.sync_failure.get() {
            Some(message) => Err(message.clone()),
            None => sync().map_err(|e| {
                let message = format!(
                    "the disk refused to sync the registry's WAL ({e}); writes stop until otm is restarted"
                );
                tracing::error!("{message}");
                stats.sync_failure.get_or_init(|| message).clone()
            }),
        };
        let outcome = outcome.map_err(|message| BatchError {
            busy: false,
            message,
        });
        if outcome.is_ok() {
            stats.syncs.fetch_add(1, Ordering::Relaxed);
            stats
                .synced_commits
                .fetch_add(batches.len() as u64, Ordering::Relaxed);
        }
        for job in batches.drain(..).flatten() {
            job.finish(outcome.as_ref().map(|_| ()));
        }
    }
}

/// `fdatasync` of the database's WAL file, opened once and again after SQLite replaced it.
/// The first sync of each opened file also syncs its directory, so that a WAL file SQLite just
/// created is found after a power loss.
struct WalSync {
    path: PathBuf,
    file: Option<std::fs::File>,
}

impl WalSync {
    fn new(db: &Path) -> WalSync {
        let mut path = db.as_os_str().to_owned();
        path.push("-wal");
        WalSync {
            path: path.into(),
            file: None,
        }
    }

    fn sync(&mut self) -> std::io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        if let Some(f) = &self.file
            && f.metadata()?.nlink() == 0
        {
            self.file = None;
        }
        if self.file.is_none() {
            let f = std::fs::File::open(&self.path)?;
            if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::File::open(dir)?.sync_all()?;
            }
            self.file = Some(f);
        }
        self.file.as_ref().expect("opened above").sync_data()
    }
}

/// Copies every WAL frame into the database (where `secure_delete` zeroed what was removed) and
/// cuts the WAL file to nothing, so old versions of rows are gone from both files. A reader in
/// the middle of a transaction blocks it; the next call tries again.
/// True if it did.
fn truncate_wal(conn: &Connection) -> bool {
    match conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
        r.get::<_, i64>(0)
    }) {
        Ok(0) => true,
        Ok(_) => {
            tracing::debug!("a reader blocked the WAL checkpoint; tried again later");
            false
        }
        Err(e) => {
            tracing::warn!(error = %e, "the WAL checkpoint failed");
            false
        }
    }
}

/// Runs a batch in one transaction, one savepoint per job that needs one. The savepoint
/// statements are prepared once and kept, like every other statement of the writer.
fn run_batch(conn: &mut Connection, batch: &mut [Box<dyn WriteJob>]) -> Result<(), BatchError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let step = |sql: &str| tx.prepare_cached(sql).and_then(|mut s| s.execute([]));
    for job in batch.iter_mut() {
        if !job.savepoint() {
            job.run(&tx);
        } else {
            step("SAVEPOINT job")?;
            if !job.run(&tx) {
                step("ROLLBACK TO job")?;
            }
            step("RELEASE job")?;
        }
        // Some errors (disk full, I/O) make SQLite roll back the whole transaction. A later
        // savepoint would then open a new transaction and the commit would cover only the jobs
        // after it, so stop here: nothing of this batch is durable.
        if tx.is_autocommit() {
            return Err(BatchError {
                busy: false,
                message: "SQLite rolled back the write transaction (disk full or I/O error?)"
                    .into(),
            });
        }
    }
    tx.commit()?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Opening.

fn configure_writer(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.set_prepared_statement_cache_capacity(64);
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(
            mode,
            "SQLite refused WAL mode; writes stay durable but readers may wait"
        );
    }
    // FULL while the migrations run on this thread; NORMAL once the writer takes over (see
    // `SqliteRegistry::open`).
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", true)?;
    // Deleted and overwritten content (an acked update's payload, a deleted tenant's rows) is
    // zeroed in the pages it leaves, not just marked free; `purge_freed` clears the WAL's copies.
    conn.pragma_update(None, "secure_delete", true)?;
    Ok(())
}

/// Applies the missing [`MIGRATIONS`] in one transaction.
fn migrate(conn: &mut Connection, path: &Path) -> Result<()> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| open_error(path, e))?;
    let version: i64 = tx
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|e| open_error(path, e))?;
    let known = MIGRATIONS.len() as i64;
    if version > known {
        return Err(Error::generic(
            BACKEND,
            format!(
                "the registry {} has schema version {version}, newer than this build knows ({known}); \
                 run a newer otm",
                path.display()
            ),
        ));
    }
    for (i, step) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.execute_batch(step).map_err(|e| {
            Error::generic(
                BACKEND,
                format!("migration {} of {} failed: {e}", i + 1, path.display()),
            )
        })?;
    }
    if version < known {
        tx.pragma_update(None, "user_version", known)
            .map_err(|e| open_error(path, e))?;
        tracing::info!(from = version, to = known, path = %path.display(), "migrated the registry schema");
    }
    tx.commit().map_err(|e| open_error(path, e))
}

fn open_error(path: &Path, e: rusqlite::Error) -> Error {
    if is_busy(&e) {
        Error::unavailable(
            BACKEND,
            format!(
                "the registry {} is locked by another process: {e}",
                path.display()
            ),
        )
    } else {
        Error::generic(
            BACKEND,
            format!("cannot open the registry {}: {e}", path.display()),
        )
    }
}

fn writer_gone() -> Error {
    Error::unavailable(BACKEND, "the registry is shutting down")
}

// ---------------------------------------------------------------------------------------------
// Error and row mapping.

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    )
}

fn is_constraint(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(ErrorCode::ConstraintViolation)
}

fn is_unique(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE)
}

fn is_foreign_key(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_FOREIGNKEY)
}

/// Maps a SQLite error; busy means another process holds the lock, and retrying may work.
fn db(e: rusqlite::Error) -> Error {
    if is_busy(&e) {
        Error::unavailable(BACKEND, format!("the database is locked: {e}"))
    } else {
        Error::generic(BACKEND, e)
    }
}

/// Refuses `fence` if a larger one was claimed for the tenant's inbox; otherwise records it.
fn check_dispatch_fence(c: &Connection, tenant: &TenantId, fence: i64) -> Result<()> {
    let stored: Option<i64> = c
        .prepare_cached("SELECT dispatch_fence FROM tenants WHERE id = ?1")
        .and_then(|mut s| s.query_row([tenant.as_str()], |r| r.get(0)).optional())
        .map_err(db)?;
    let Some(stored) = stored else {
        return Err(record::tenant_not_found(tenant));
    };
    if stored > fence {
        return Err(record::stale_dispatcher(tenant, fence, stored));
    }
    if stored < fence {
        c.prepare_cached("UPDATE tenants SET dispatch_fence = ?2 WHERE id = ?1")
            .and_then(|mut s| s.execute(params![tenant.as_str(), fence]))
            .map_err(db)?;
    }
    Ok(())
}

/// Moves dead letters back to pending (`retry`, with no failed attempts) or to done (without
/// their payload), in the writer's transaction.
fn move_dead(
    c: &Connection,
    tenant: &TenantId,
    which: DeadLetters,
    retry: bool,
) -> Result<Vec<i64>> {
    if !tenant_exists(c, tenant.as_str())? {
        return Err(record::tenant_not_found(tenant));
    }
    let one = match which {
        DeadLetters::One(seq) => {
            let state: Option<String> = c
                .prepare_cached("SELECT state FROM inbox WHERE tenant = ?1 AND seq = ?2")
                .and_then(|mut s| {
                    s.query_row(params![tenant.as_str(), seq], |r| r.get(0))
                        .optional()
                })
                .map_err(db)?;
            match state.as_deref() {
                None => return Err(record::update_not_found(tenant, seq)),
                Some("dead") => {}
                Some(other) => return Err(record::not_dead(tenant, seq, other)),
            }
            Some(seq)
        }
        DeadLetters::All => None,
    };
    let sql = if retry {
        "UPDATE inbox SET state = 'pending', attempts = 0 \
         WHERE tenant = ?1 AND state = 'dead' AND (?2 IS NULL OR seq = ?2) RETURNING seq"
    } else {
        "UPDATE inbox SET state = 'done', done_at_ms = ?3, payload = X'' \
         WHERE tenant = ?1 AND state = 'dead' AND (?2 IS NULL OR seq = ?2) RETURNING seq"
    };
    let mut stmt = c.prepare_cached(sql).map_err(db)?;
    let now = otm_core::time::now_ms();
    fn seq_of(r: &Row<'_>) -> rusqlite::Result<i64> {
        r.get(0)
    }
    let rows = if retry {
        stmt.query_map(params![tenant.as_str(), one], seq_of)
    } else {
        stmt.query_map(params![tenant.as_str(), one, now], seq_of)
    }
    .map_err(db)?;
    let mut seqs = rows.collect::<rusqlite::Result<Vec<i64>>>().map_err(db)?;
    seqs.sort_unstable();
    Ok(seqs)
}

const TENANT_COLUMNS: &str = "id, profile, idle_timeout_s, bot_token, webhook_secret, cold_start_notice, status, \
                              created_at_ms, last_active_ms, limits";

/// Reads a row of [`TENANT_COLUMNS`]; the outer error is SQLite's, the inner one a bad value.
fn tenant_row(row: &Row<'_>) -> rusqlite::Result<Result<Tenant>> {
    let id: String = row.get(0)?;
    let what = format!("tenant row `{id}`");
    let stored = TenantRow {
        id,
        profile: row.get(1)?,
        idle_timeout_s: row.get(2)?,
        bot_token: row.get(3)?,
        webhook_secret: row.get(4)?,
        cold_start_notice: row.get(5)?,
        status: row.get(6)?,
        created_at_ms: row.get(7)?,
        last_active_ms: row.get(8)?,
        limits: row.get(9)?,
    };
    Ok(stored.into_tenant(&what))
}

const INSTANCE_COLUMNS: &str =
    "id, tenant, state, address, shim_token, surrogate_digest, created_at_ms, bound_at_ms";

fn instance_row(row: &Row<'_>) -> rusqlite::Result<Result<InstanceRecord>> {
    let id: String = row.get(0)?;
    let what = format!("instance {id}");
    let stored = InstanceRow {
        id,
        tenant: row.get(1)?,
        state: row.get(2)?,
        address: row.get(3)?,
        shim_token: row.get(4)?,
        surrogate_digest: row.get(5)?,
        created_at_ms: row.get(6)?,
        bound_at_ms: row.get(7)?,
    };
    Ok(stored.into_instance(&what))
}

const INBOX_COLUMNS: &str = "tenant, seq, update_id, payload, attempts, accepted_at_ms, last_error";

fn inbox_row(row: &Row<'_>) -> rusqlite::Result<Result<InboxItem>> {
    let stored = InboxRow {
        tenant: row.get(0)?,
        seq: row.get(1)?,
        update_id: row.get(2)?,
        payload: row.get(3)?,
        attempts: row.get(4)?,
        accepted_at_ms: row.get(5)?,
        last_error: row.get(6)?,
    };
    Ok(stored.into_item())
}

/// Runs a query whose rows map through `f`, flattening both error layers.
fn collect<T, P: rusqlite::Params>(
    conn: &Connection,
    sql: &str,
    params: P,
    f: fn(&Row<'_>) -> rusqlite::Result<Result<T>>,
) -> Result<Vec<T>> {
    let mut stmt = conn.prepare_cached(sql).map_err(db)?;
    let rows = stmt.query_map(params, f).map_err(db)?;
    let mut out = Vec::new();
    for row in rows {
        out.push(row.map_err(db)??);
    }
    Ok(out)
}

fn one<T, P: rusqlite::Params>(
    conn: &Connection,
    sql: &str,
    params: P,
    f: fn(&Row<'_>) -> rusqlite::Result<Result<T>>,
) -> Result<Option<T>> {
    let mut stmt = conn.prepare_cached(sql).map_err(db)?;
    stmt.query_row(params, f)
        .optional()
        .map_err(db)?
        .transpose()
}

fn tenant_exists(conn: &Connection, id: &str) -> Result<bool> {
    let mut stmt = conn
        .prepare_cached("SELECT 1 FROM tenants WHERE id = ?1")
        .map_err(db)?;
    stmt.exists([id]).map_err(db)
}

// ---------------------------------------------------------------------------------------------
// The trait.

#[async_trait::async_trait]
impl TenantStore for SqliteRegistry {
    async fn create_tenant(&self, tenant: &Tenant) -> Result<()> {
        let t = tenant.clone();
        let idle = to_i64(t.idle_timeout_s, "idle timeout")?;
        self.write(move |c| {
            let mut stmt = c
                .prepare_cached(
                    "INSERT INTO tenants (id, profile, idle_timeout_s, bot_token, webhook_secret, cold_start_notice, \
                     status, created_at_ms, last_active_ms, idle_deadline_ms, limits, \
                     freeze_after_ms, freeze_deadline_ms) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
                )
                .map_err(db)?;
            let freeze = record::freeze_after_ms(&t);
            stmt.execute(params![
                t.id.as_str(),
                t.profile,
                idle,
                t.bot_token.as_ref().map(Secret::expose),
                t.webhook_secret.expose(),
                t.cold_start_notice,
                t.status.as_str(),
                t.created_at_ms,
                t.last_active_ms,
                deadline(t.last_active_ms, idle),
                t.limits.to_json(),
                freeze,
                freeze.map(|f| t.last_active_ms.saturating_add(f)),
            ])
            .map_err(|e| {
                if is_constraint(&e) {
                    record::tenant_exists(&t.id)
                } else {
                    db(e)
                }
            })?;
            Ok(())
        })
        .await
    }

    async fn get_tenant(&self, id: &TenantId) -> Result<Option<Tenant>> {
        let id = id.clone();
        self.read(move |c| {
            one(
                c,
                &format!("SELECT {TENANT_COLUMNS} FROM tenants WHERE id = ?1"),
                [id.as_str()],
                tenant_row,
            )
        })
        .await
    }

    async fn list_tenants(&self) -> Result<Vec<Tenant>> {
        self.read(|c| {
            collect(
                c,
                &format!("SELECT {TENANT_COLUMNS} FROM tenants ORDER BY id"),
                [],
                tenant_row,
            )
        })
        .await
    }

    async fn update_tenant(&self, tenant: &Tenant) -> Result<()> {
        let t = tenant.clone();
        let idle = to_i64(t.idle_timeout_s, "idle timeout")?;
        self.write(move |c| {
            let last_active: Option<i64> = c
                .prepare_cached("SELECT last_active_ms FROM tenants WHERE id = ?1")
                .and_then(|mut s| s.query_row([t.id.as_str()], |r| r.get(0)).optional())
                .map_err(db)?;
            let Some(last_active) = last_active else {
                return Err(record::tenant_not_found(&t.id));
            };
            c.prepare_cached(
                "UPDATE tenants SET profile = ?2, idle_timeout_s = ?3, bot_token = ?4, webhook_secret = ?5, \
                 cold_start_notice = ?6, idle_deadline_ms = ?7, limits = ?8, freeze_after_ms = ?9, \
                 freeze_deadline_ms = ?10 WHERE id = ?1",
            )
            .and_then(|mut s| {
                let freeze = record::freeze_after_ms(&t);
                s.execute(params![
                    t.id.as_str(),
                    t.profile,
                    idle,
                    t.bot_token.as_ref().map(Secret::expose),
                    t.webhook_secret.expose(),
                    t.cold_start_notice,
                    deadline(last_active, idle),
                    t.limits.to_json(),
                    freeze,
                    freeze.map(|f| last_active.saturating_add(f)),
                ])
            })
            .map_err(db)?;
            Ok(())
        })
        .await
    }

    async fn delete_tenant(&self, id: &TenantId) -> Result<bool> {
        let id = id.clone();
        self.write(move |c| {
            c.prepare_cached("DELETE FROM inbox WHERE tenant = ?1")
                .and_then(|mut s| s.execute([id.as_str()]))
                .map_err(db)?;
            let n = c
                .prepare_cached("DELETE FROM tenants WHERE id = ?1")
                .and_then(|mut s| s.execute([id.as_str()]))
                .map_err(db)?;
            Ok(n > 0)
        })
        .await
    }

    async fn set_tenant_status(
        &self,
        id: &TenantId,
        status: TenantStatus,
        fence: Option<u64>,
    ) -> Result<()> {
        let id = id.clone();
        let fence = fence.map(|f| to_i64(f, "fence")).transpose()?;
        self.write(move |c| {
            let stored: Option<i64> = c
                .prepare_cached("SELECT fence FROM tenants WHERE id = ?1")
                .and_then(|mut s| s.query_row([id.as_str()], |r| r.get(0)).optional())
                .map_err(db)?;
            let Some(stored) = stored else {
                return Err(record::tenant_not_found(&id));
            };
            let new_fence = match fence {
                Some(f) if f < stored => return Err(record::stale_status(&id, f, stored)),
                Some(f) => f,
                None => stored,
            };
            c.prepare_cached("UPDATE tenants SET status = ?2, fence = ?3 WHERE id = ?1")
                .and_then(|mut s| s.execute(params![id.as_str(), status.as_str(), new_fence]))
                .map_err(db)?;
            Ok(())
        })
        .await
    }

    async fn touch_tenant(&self, id: &TenantId, at_ms: i64) -> Result<()> {
        let id = id.clone();
        self.write_relaxed(move |c| {
            let stored: Option<(i64, Option<i64>)> = c
                .prepare_cached("SELECT idle_timeout_s, freeze_after_ms FROM tenants WHERE id = ?1")
                .and_then(|mut s| {
                    s.query_row([id.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))
                        .optional()
                })
                .map_err(db)?;
            let Some((idle, freeze)) = stored else {
                return Err(record::tenant_not_found(&id));
            };
            c.prepare_cached(
                "UPDATE tenants SET last_active_ms = ?2, idle_deadline_ms = ?3, freeze_deadline_ms = ?4 \
                 WHERE id = ?1",
            )
            .and_then(|mut s| {
                s.execute(params![
                    id.as_str(),
                    at_ms,
                    deadline(at_ms, idle),
                    freeze.map(|f| at_ms.saturating_add(f))
                ])
            })
            .map_err(db)?;
            Ok(())
        })
        .await
    }

    async fn idle_due(&self, now_ms: i64, limit: usize) -> Result<Vec<TenantId>> {
        self.due(
            "SELECT id FROM tenants WHERE status = 'running' AND idle_deadline_ms <= ?1 \
             ORDER BY idle_deadline_ms LIMIT ?2",
            now_ms,
            limit,
        )
        .await
    }

    async fn freeze_due(&self, now_ms: i64, limit: usize) -> Result<Vec<TenantId>> {
        self.due(
            "SELECT id FROM tenants WHERE status = 'running' AND freeze_deadline_ms <= ?1 \
             AND idle_deadline_ms > ?1 ORDER BY freeze_deadline_ms LIMIT ?2",
            now_ms,
            limit,
        )
        .await
    }

    async fn frozen_tenants(&self) -> Result<Vec<(TenantId, i64)>> {
        self.read(move |c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT id, idle_deadline_ms FROM tenants WHERE status = 'frozen' \
                     ORDER BY idle_deadline_ms",
                )
                .map_err(db)?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
                .map_err(db)?;
            rows.map(|row| {
                let (id, deadline) = row.map_err(db)?;
                Ok((record::tenant_id(&id, "tenant row")?, deadline))
            })
            .collect()
        })
        .await
    }
}

#[async_trait::async_trait]
impl InstanceStore for SqliteRegistry {
    async fn put_instance(&self, instance: &InstanceRecord, fence: Option<u64>) -> Result<()> {
        let i = instance.clone();
        let fence = fence.map(|f| to_i64(f, "fence")).transpose()?;
        self.write(move |c| {
            if let (Some(f), Some(t)) = (fence, &i.tenant) {
                let stored: Option<i64> = c
                    .prepare_cached("SELECT fence FROM tenants WHERE id = ?1")
                    .and_then(|mut s| s.query_row([t.as_str()], |r| r.get(0)).optional())
                    .map_err(db)?;
                if let Some(stored) = stored.filter(|s| *s > f) {
                    return Err(record::stale_waker(t, f, stored));
                }
            }
            c.prepare_cached(
                "INSERT INTO instances (id, tenant, state, address, shim_token, surrogate_digest, created_at_ms, bound_at_ms) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) \
                 ON CONFLICT (id) DO UPDATE SET tenant = excluded.tenant, state = excluded.state, \
                 address = excluded.address, shim_token = excluded.shim_token, \
                 surrogate_digest = excluded.surrogate_digest, created_at_ms = excluded.created_at_ms, \
                 bound_at_ms = excluded.bound_at_ms",
            )
            .and_then(|mut s| {
                s.execute(params![
                    i.id.as_str(),
                    i.tenant.as_ref().map(TenantId::as_str),
                    i.state.as_str(),
                    i.address,
                    i.shim_token.expose(),
                    i.surrogate_digest,
                    i.created_at_ms,
                    i.bound_at_ms,
                ])
            })
            .map_err(|e| match (&i.tenant, is_constraint(&e)) {
                (Some(t), true) => record::bound_elsewhere(t, &i.id),
                _ => db(e),
            })?;
            Ok(())
        })
        .await
    }

    async fn get_instance(&self, id: &InstanceId) -> Result<Option<InstanceRecord>> {
        let id = id.clone();
        self.read(move |c| {
            one(
                c,
                &format!("SELECT {INSTANCE_COLUMNS} FROM instances WHERE id = ?1"),
                [id.as_str()],
                instance_row,
            )
        })
        .await
    }

    async fn instance_of(&self, tenant: &TenantId) -> Result<Option<InstanceRecord>> {
        let tenant = tenant.clone();
        self.read(move |c| {
            one(
                c,
                &format!("SELECT {INSTANCE_COLUMNS} FROM instances WHERE tenant = ?1"),
                [tenant.as_str()],
                instance_row,
            )
        })
        .await
    }

    async fn instance_by_surrogate(&self, digest: &str) -> Result<Option<InstanceRecord>> {
        let digest = digest.to_owned();
        self.read(move |c| {
            one(
                c,
                &format!(
                    "SELECT {INSTANCE_COLUMNS} FROM instances WHERE surrogate_digest = ?1 \
                     ORDER BY created_at_ms DESC LIMIT 1"
                ),
                [digest.as_str()],
                instance_row,
            )
        })
        .await
    }

    async fn list_instances(&self) -> Result<Vec<InstanceRecord>> {
        self.read(|c| {
            collect(
                c,
                &format!("SELECT {INSTANCE_COLUMNS} FROM instances ORDER BY id"),
                [],
                instance_row,
            )
        })
        .await
    }

    async fn delete_instance(&self, id: &InstanceId) -> Result<bool> {
        let id = id.clone();
        self.write(move |c| {
            let n = c
                .prepare_cached("DELETE FROM instances WHERE id = ?1")
                .and_then(|mut s| s.execute([id.as_str()]))
                .map_err(db)?;
            Ok(n > 0)
        })
        .await
    }

    async fn claim_warm_instance(&self, tenant: &TenantId) -> Result<Option<InstanceRecord>> {
        // With no warm instance (the pool is off, or empty for now), a read answers, and the
        // wake waits for no sync. One made meanwhile is missed: the wake makes its own.
        let any_warm = self
            .read(|c| {
                c.prepare_cached(
                    "SELECT EXISTS (SELECT 1 FROM instances WHERE state = 'warm' AND tenant IS NULL)",
                )
                .and_then(|mut s| s.query_row([], |r| r.get::<_, bool>(0)))
                .map_err(db)
            })
            .await?;
        if !any_warm {
            return Ok(None);
        }
        let tenant = tenant.clone();
        // The single writer makes select-then-update atomic: no other write runs in between.
        self.write(move |c| {
            one(
                c,
                &format!(
                    "UPDATE instances SET tenant = ?1, state = 'binding', bound_at_ms = ?2 \
                     WHERE id = (SELECT id FROM instances WHERE state = 'warm' AND tenant IS NULL \
                                 ORDER BY created_at_ms, id LIMIT 1) \
                     RETURNING {INSTANCE_COLUMNS}"
                ),
                params![tenant.as_str(), otm_core::time::now_ms()],
                instance_row,
            )
            .map_err(|e| match e {
                Error::Generic { source, .. }
                    if source
                        .downcast_ref::<rusqlite::Error>()
                        .is_some_and(is_constraint) =>
                {
                    record::already_bound(&tenant)
                }
                e => e,
            })
        })
        .await
    }

    async fn get_settings(&self) -> Result<FleetSettings> {
        self.read(|c| {
            let value: Option<String> = c
                .prepare_cached("SELECT value FROM settings WHERE key = ?1")
                .and_then(|mut s| s.query_row([FLEET_KEY], |r| r.get(0)).optional())
                .map_err(db)?;
            match value {
                None => Ok(FleetSettings::default()),
                Some(v) => {
                    serde_json::from_str(&v).map_err(|e| record::corrupt("the fleet settings", e))
                }
            }
        })
        .await
    }

    async fn put_settings(&self, settings: &FleetSettings) -> Result<()> {
        let value = serde_json::to_string(settings).map_err(|e| Error::generic(BACKEND, e))?;
        self.write(move |c| {
            c.prepare_cached(
                "INSERT INTO settings (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )
            .and_then(|mut s| s.execute([FLEET_KEY, value.as_str()]))
            .map_err(db)?;
            Ok(())
        })
        .await
    }
}

#[async_trait::async_trait]
impl Inbox for SqliteRegistry {
    async fn inbox_append(
        &self,
        tenant: &TenantId,
        update_id: i64,
        payload: &[u8],
    ) -> Result<Appended> {
        let tenant = tenant.clone();
        let payload = payload.to_vec();
        // A plain insert: the unique (tenant, update_id) index finds a duplicate in the same
        // descent that places the new entry, and the insert then fails before it writes
        // anything, taking no sequence number (INSERT … ON CONFLICT DO NOTHING would take one
        // and leave a gap). The insert is one row of VALUES, which SQLite undoes by itself
        // should it fail (INSERT … SELECT would need a statement journal, written for every
        // append), so no savepoint either. A missing tenant fails the foreign key.
        // The new row's seq is its rowid, read back without `RETURNING` (which buffers the
        // returned rows in a temporary table of its own).
        self.write_append(move |c| {
            let inserted = c
                .prepare_cached(
                    "INSERT INTO inbox (tenant, update_id, payload, accepted_at_ms) \
                     VALUES (?1, ?2, ?3, ?4)",
                )
                .and_then(|mut s| {
                    let now = otm_core::time::now_ms();
                    s.execute(params![tenant.as_str(), update_id, payload, now])
                });
            match inserted {
                Ok(_) => {}
                Err(e) if is_unique(&e) => return Ok(Appended::Duplicate),
                Err(e) if is_foreign_key(&e) => return Err(record::tenant_not_found(&tenant)),
                Err(e) => return Err(db(e)),
            }
            Ok(Appended::Stored {
                seq: c.last_insert_rowid(),
            })
        })
        .await
    }

    async fn inbox_next(&self, tenant: &TenantId) -> Result<Option<InboxItem>> {
        let tenant = tenant.clone();
        self.read(move |c| {
            one(
                c,
                &format!(
                    "SELECT {INBOX_COLUMNS} FROM inbox WHERE tenant = ?1 AND state = 'pending' ORDER BY seq LIMIT 1"
                ),
                [tenant.as_str()],
                inbox_row,
            )
        })
        .await
    }

    async fn inbox_head(&self, tenant: &TenantId, limit: usize) -> Result<Vec<InboxItem>> {
        let tenant = tenant.clone();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |c| {
            collect(
                c,
                &format!(
                    "SELECT {INBOX_COLUMNS} FROM inbox WHERE tenant = ?1 AND state = 'pending' ORDER BY seq LIMIT ?2"
                ),
                params![tenant.as_str(), limit],
                inbox_row,
            )
        })
        .await
    }

    /// Acking a dead-lettered update (an operator redelivered it) moves it to done as well.
    async fn inbox_ack(&self, tenant: &TenantId, seq: i64, fence: Option<u64>) -> Result<()> {
        let tenant = tenant.clone();
        let fence = fence.map(|f| to_i64(f, "fence")).transpose()?;
        self.write_relaxed(move |c| {
            if let Some(f) = fence {
                check_dispatch_fence(c, &tenant, f)?;
            }
            let n = c
                .prepare_cached(
                    "UPDATE inbox SET state = 'done', done_at_ms = COALESCE(done_at_ms, ?3), \
                     payload = X'' WHERE tenant = ?1 AND seq = ?2",
                )
                .and_then(|mut s| {
                    s.execute(params![tenant.as_str(), seq, otm_core::time::now_ms()])
                })
                .map_err(db)?;
            if n == 0 {
                return Err(record::update_not_found(&tenant, seq));
            }
            Ok(())
        })
        .await
    }

    async fn inbox_fail(
        &self,
        tenant: &TenantId,
        seq: i64,
        error: &str,
        max_attempts: u32,
        fence: Option<u64>,
    ) -> Result<FailOutcome> {
        let tenant = tenant.clone();
        let error = record::truncate(error, record::MAX_ERROR_LEN);
        let fence = fence.map(|f| to_i64(f, "fence")).transpose()?;
        self.write_relaxed(move |c| {
            if let Some(f) = fence {
                check_dispatch_fence(c, &tenant, f)?;
            }
            let state: Option<String> = c
                .prepare_cached("SELECT state FROM inbox WHERE tenant = ?1 AND seq = ?2")
                .and_then(|mut s| {
                    s.query_row(params![tenant.as_str(), seq], |r| r.get(0))
                        .optional()
                })
                .map_err(db)?;
            match state.as_deref() {
                None => return Err(record::update_not_found(&tenant, seq)),
                Some("pending") => {}
                Some(other) => return Err(record::not_pending(&tenant, seq, other)),
            }
            let attempts: i64 = c
                .prepare_cached(
                    "UPDATE inbox SET attempts = attempts + 1, last_error = ?3, \
                     state = CASE WHEN attempts + 1 >= ?4 THEN 'dead' ELSE state END \
                     WHERE tenant = ?1 AND seq = ?2 RETURNING attempts",
                )
                .and_then(|mut s| {
                    s.query_row(
                        params![tenant.as_str(), seq, error, i64::from(max_attempts)],
                        |r| r.get(0),
                    )
                })
                .map_err(db)?;
            Ok(record::fail_outcome(
                record::attempts(attempts),
                max_attempts,
            ))
        })
        .await
    }

    async fn inbox_claim(&self, tenant: &TenantId, fence: u64) -> Result<()> {
        let tenant = tenant.clone();
        let fence = to_i64(fence, "fence")?;
        self.write(move |c| check_dispatch_fence(c, &tenant, fence))
            .await
    }

    async fn inbox_retry(&self, tenant: &TenantId, which: DeadLetters) -> Result<Vec<i64>> {
        let tenant = tenant.clone();
        self.write(move |c| move_dead(c, &tenant, which, true))
            .await
    }

    async fn inbox_drop(&self, tenant: &TenantId, which: DeadLetters) -> Result<Vec<i64>> {
        let tenant = tenant.clone();
        self.write(move |c| move_dead(c, &tenant, which, false))
            .await
    }

    async fn inbox_view(
        &self,
        tenant: &TenantId,
        after: Option<i64>,
        limit: usize,
    ) -> Result<InboxView> {
        let tenant = tenant.clone();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let after = after.unwrap_or(i64::MIN);
        self.read(move |c| {
            // One read transaction, so both lists come from the same snapshot.
            let tx = c.unchecked_transaction().map_err(db)?;
            // The state written out, so that each query reads its partial index.
            let sql = |state: &str| format!("SELECT {INBOX_COLUMNS} FROM inbox WHERE tenant = ?1 AND state = '{state}' AND seq > ?3 ORDER BY seq LIMIT ?2");
            let pending = collect(&tx, &sql("pending"), params![tenant.as_str(), limit, after], inbox_row)?;
            let dead = collect(&tx, &sql("dead"), params![tenant.as_str(), limit, after], inbox_row)?;
            tx.finish().map_err(db)?;
            Ok(InboxView { pending, dead })
        })
        .await
    }

    async fn inbox_depth(&self, tenant: &TenantId) -> Result<u64> {
        let tenant = tenant.clone();
        self.read(move |c| {
            let n: i64 = c
                .prepare_cached(
                    "SELECT COUNT(*) FROM inbox WHERE tenant = ?1 AND state = 'pending'",
                )
                .and_then(|mut s| s.query_row([tenant.as_str()], |r| r.get(0)))
                .map_err(db)?;
            Ok(n as u64)
        })
        .await
    }

    async fn inbox_pending_tenants(&self) -> Result<Vec<TenantId>> {
        self.read(|c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT DISTINCT tenant FROM inbox WHERE state = 'pending' ORDER BY tenant",
                )
                .map_err(db)?;
            let ids = stmt.query_map([], |r| r.get::<_, String>(0)).map_err(db)?;
            ids.map(|id| {
                let id = id.map_err(db)?;
                record::tenant_id(&id, "inbox of")
            })
            .collect()
        })
        .await
    }

    /// In steps of [`PRUNE_STEP`] rows, each a write of its own: appends queued meanwhile
    /// commit between them rather than wait for one long delete.
    async fn inbox_prune(&self, before_ms: i64) -> Result<u64> {
        let mut total = 0;
        loop {
            let n = self
                .write(move |c| {
                    c.prepare_cached(
                        "DELETE FROM inbox WHERE seq IN (SELECT seq FROM inbox \
                         WHERE state = 'done' AND accepted_at_ms < ?1 LIMIT ?2)",
                    )
                    .and_then(|mut s| s.execute(params![before_ms, PRUNE_STEP]))
                    .map_err(db)
                })
                .await?;
            total += n as u64;
            if (n as i64) < PRUNE_STEP {
                return Ok(total);
            }
        }
    }

    async fn purge_freed(&self) -> Result<()> {
        // The writer thread checkpoints right after the commit this empty job rides in (if a
        // job since the last time may have freed something); the job itself frees nothing.
        self.stats.truncate_wal.store(true, Ordering::Relaxed);
        self.write_job(false, false, |_| Ok(())).await
    }
}

fn audit_row(r: &Row<'_>) -> rusqlite::Result<Result<otm_core::AuditEntry>> {
    Ok(Ok(otm_core::AuditEntry {
        id: r.get(0)?,
        at_ms: r.get(1)?,
        who: r.get(2)?,
        method: r.get(3)?,
        route: r.get(4)?,
        tenant: r.get(5)?,
        status: u16::try_from(r.get::<_, i64>(6)?).unwrap_or(0),
    }))
}

fn token_row(r: &Row<'_>) -> rusqlite::Result<Result<otm_core::AdminToken>> {
    Ok(Ok(otm_core::AdminToken {
        name: r.get(0)?,
        digest: r.get(1)?,
        read_only: r.get(2)?,
        created_at_ms: r.get(3)?,
    }))
}

#[async_trait::async_trait]
impl otm_core::AdminStore for SqliteRegistry {
    async fn audit_append(&self, entry: &otm_core::AuditEntry) -> Result<()> {
        let e = entry.clone();
        self.write(move |c| {
            c.prepare_cached(
                "INSERT OR IGNORE INTO audit (id, at_ms, who, method, route, tenant, status) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    e.id,
                    e.at_ms,
                    e.who,
                    e.method,
                    e.route,
                    e.tenant,
                    i64::from(e.status)
                ])
            })
            .map_err(db)?;
            Ok(())
        })
        .await
    }

    async fn audit_list(
        &self,
        limit: usize,
        before: Option<i64>,
    ) -> Result<Vec<otm_core::AuditEntry>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |c| {
            collect(
                c,
                "SELECT id, at_ms, who, method, route, tenant, status FROM audit \
                 WHERE ?1 IS NULL OR id < ?1 ORDER BY id DESC LIMIT ?2",
                params![before, limit],
                audit_row,
            )
        })
        .await
    }

    async fn token_create(&self, token: &otm_core::AdminToken) -> Result<()> {
        let t = token.clone();
        self.write(move |c| {
            let taken = c
                .prepare_cached("SELECT 1 FROM admin_tokens WHERE name = ?1")
                .and_then(|mut s| s.exists([t.name.as_str()]))
                .map_err(db)?;
            if taken {
                return Err(Error::AlreadyExists { what: format!("admin token {}", t.name) });
            }
            c.prepare_cached(
                "INSERT INTO admin_tokens (name, digest, read_only, created_at_ms) VALUES (?1, ?2, ?3, ?4)",
            )
            .and_then(|mut s| s.execute(params![t.name, t.digest, t.read_only, t.created_at_ms]))
            .map_err(db)?;
            Ok(())
        })
        .await
    }

    async fn token_by_digest(&self, digest: &str) -> Result<Option<otm_core::AdminToken>> {
        let digest = digest.to_owned();
        self.read(move |c| {
            one(
                c,
                "SELECT name, digest, read_only, created_at_ms FROM admin_tokens WHERE digest = ?1",
                [digest.as_str()],
                token_row,
            )
        })
        .await
    }

    async fn token_list(&self) -> Result<Vec<otm_core::AdminToken>> {
        self.read(|c| {
            collect(
                c,
                "SELECT name, digest, read_only, created_at_ms FROM admin_tokens ORDER BY name",
                [],
                token_row,
            )
        })
        .await
    }

    async fn token_revoke(&self, name: &str) -> Result<bool> {
        let name = name.to_owned();
        self.write(move |c| {
            let n = c
                .prepare_cached("DELETE FROM admin_tokens WHERE name = ?1")
                .and_then(|mut s| s.execute([name.as_str()]))
                .map_err(db)?;
            Ok(n > 0)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(id: &str) -> Tenant {
        Tenant::new(
            TenantId::parse(id).unwrap(),
            "reference",
            Some(Secret::new("123:abc")),
        )
    }

    #[tokio::test]
    async fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/dir/registry.db");
        {
            let r = SqliteRegistry::open(&path).unwrap();
            r.create_tenant(&tenant("alice")).await.unwrap();
            let id = TenantId::parse("alice").unwrap();
            assert_eq!(
                r.inbox_append(&id, 7, b"{}").await.unwrap(),
                Appended::Stored { seq: 1 }
            );
        }
        let r = SqliteRegistry::open(&path).unwrap();
        let id = TenantId::parse("alice").unwrap();
        let t = r.get_tenant(&id).await.unwrap().unwrap();
        assert_eq!(t.bot_token.unwrap().expose(), "123:abc");
        assert_eq!(
            r.inbox_append(&id, 7, b"{}").await.unwrap(),
            Appended::Duplicate
        );
        assert_eq!(
            r.inbox_append(&id, 8, b"{}").await.unwrap(),
            Appended::Stored { seq: 2 }
        );
    }

    /// Dropping a registry while its reads and writes are in flight, then opening the file
    /// again at once, many times over: each drop closes every connection before it returns, so
    /// no connection closes while another locks the file (which deadlocks SQLite 3.51's VFS).
    #[test]
    fn reopening_at_once_while_calls_are_in_flight_never_hangs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        let (done, finished) = std::sync::mpsc::channel();
        let worker = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let id = TenantId::parse("alice").unwrap();
                SqliteRegistry::open(&path)
                    .unwrap()
                    .create_tenant(&tenant("alice"))
                    .await
                    .unwrap();
                for round in 0..150_i64 {
                    let r = Arc::new(SqliteRegistry::open(&path).unwrap());
                    let mut calls = Vec::new();
                    for k in 0..4_i64 {
                        let (r, id) = (r.clone(), id.clone());
                        calls.push(tokio::spawn(async move {
                            let _ = r.get_tenant(&id).await;
                            let _ = r.inbox_append(&id, round * 4 + k, b"{}").await;
                            let _ = r.inbox_depth(&id).await;
                        }));
                    }
                    // Some calls are cut off mid-way; their reads still run to the end.
                    tokio::task::yield_now().await;
                    for call in &calls {
                        call.abort();
                    }
                    drop(r);
                    for call in calls {
                        let _ = call.await;
                    }
                }
                let r = SqliteRegistry::open(&path).unwrap();
                assert!(r.get_tenant(&id).await.unwrap().is_some());
            });
            done.send(()).unwrap();
        });
        finished
            .recv_timeout(Duration::from_secs(300))
            .expect("opening, using and dropping the registry deadlocked");
        worker.join().unwrap();
    }

    /// A duplicate found by the unique index fails its insert alone: the appends batched with
    /// it are stored, and the sequence has no gap where it was refused.
    #[tokio::test]
    async fn duplicates_in_a_batch_take_no_sequence_number() {
        let dir = tempfile::tempdir().unwrap();
        let r = Arc::new(SqliteRegistry::open(&dir.path().join("r.db")).unwrap());
        r.create_tenant(&tenant("alice")).await.unwrap();
        let id = TenantId::parse("alice").unwrap();
        for u in 0..10 {
            r.inbox_append(&id, u, b"{}").await.unwrap();
        }
        // Updates 5..15 at once: 5..10 are duplicates, 10..15 new, in one or a few batches.
        let calls: Vec<_> = (5..15)
            .map(|u| {
                let (r, id) = (r.clone(), id.clone());
                tokio::spawn(async move { (u, r.inbox_append(&id, u, b"{}").await.unwrap()) })
            })
            .collect();
        let mut seqs = Vec::new();
        for call in calls {
            match call.await.unwrap() {
                (u, Appended::Duplicate) => assert!(u < 10, "update {u} is new"),
                (u, Appended::Stored { seq }) => {
                    assert!(u >= 10, "update {u} was stored before");
                    seqs.push(seq);
                }
            }
        }
        seqs.sort_unstable();
        assert_eq!(seqs, (11..16).collect::<Vec<i64>>());
        assert_eq!(r.inbox_depth(&id).await.unwrap(), 15);
    }

    #[tokio::test]
    async fn pragmas_make_commits_durable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        let _r = SqliteRegistry::open(&path).unwrap();
        let c = Connection::open(&path).unwrap();
        let mode: String = c
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let version: i64 = c
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
        // synchronous is per connection: check the writer's setting through its own thread.
        let r = SqliteRegistry::open(&path).unwrap();
        let sync: i64 = r
            .write(|c| {
                c.query_row("PRAGMA synchronous", [], |r| r.get(0))
                    .map_err(db)
            })
            .await
            .unwrap();
        // NORMAL: the sync thread, not the commit, fsyncs the WAL (see the tests below).
        assert_eq!(sync, 1, "synchronous must be NORMAL");
        let fk: i64 = r
            .write(|c| {
                c.query_row("PRAGMA foreign_keys", [], |r| r.get(0))
                    .map_err(db)
            })
            .await
            .unwrap();
        assert_eq!(fk, 1);
    }

    #[test]
    fn refuses_in_memory_databases() {
        for p in [":memory:", "", "file:x.db?mode=memory"] {
            assert!(
                matches!(
                    SqliteRegistry::open(Path::new(p)),
                    Err(Error::InvalidInput { .. })
                ),
                "{p}"
            );
        }
    }

    #[tokio::test]
    async fn refuses_a_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        drop(SqliteRegistry::open(&path).unwrap());
        let c = Connection::open(&path).unwrap();
        c.pragma_update(None, "user_version", 99).unwrap();
        drop(c);
        let err = SqliteRegistry::open(&path).unwrap_err().to_string();
        assert!(err.contains("newer than this build"), "{err}");
    }

    /// A registry from before freeze deadlines were stored gets them, as the tenants' settings
    /// say, when it is opened.
    #[tokio::test]
    async fn migration_stores_the_freeze_deadlines_of_existing_tenants() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        {
            let mut c = Connection::open(&path).unwrap();
            let tx = c.transaction().unwrap();
            for step in &MIGRATIONS[..4] {
                tx.execute_batch(step).unwrap();
            }
            tx.pragma_update(None, "user_version", 4).unwrap();
            for (id, idle, limits) in [
                ("dflt", 600, "{}"),
                ("short", 600, r#"{"freeze_after_s":30}"#),
                ("never", 600, r#"{"freeze_after_s":0}"#),
                ("brief", 30, "{}"),
            ] {
                tx.execute(
                    "INSERT INTO tenants (id, profile, idle_timeout_s, webhook_secret, status, \
                     created_at_ms, last_active_ms, idle_deadline_ms, limits) \
                     VALUES (?1, 'reference', ?2, 's', 'running', 1000, 1000, 1000 + ?2 * 1000, ?3)",
                    params![id, idle, limits],
                )
                .unwrap();
            }
            tx.commit().unwrap();
        }
        let r = SqliteRegistry::open(&path).unwrap();
        let due = |at| {
            let r = &r;
            async move {
                r.freeze_due(at, 10)
                    .await
                    .unwrap()
                    .iter()
                    .map(|t| t.to_string())
                    .collect::<Vec<_>>()
            }
        };
        assert!(due(30_999).await.is_empty());
        assert_eq!(due(31_000).await, ["short"]);
        assert_eq!(due(61_000).await, ["short", "dflt"]);
        // A touch moves the deadline by the stored offset.
        r.touch_tenant(&TenantId::parse("short").unwrap(), 50_000)
            .await
            .unwrap();
        assert_eq!(due(61_000).await, ["dflt"]);
        assert_eq!(due(80_000).await, ["dflt", "short"]);
    }

    /// While the writer is busy with one job, queued jobs pile up and go out in ONE commit, and a
    /// failing job among them fails alone.
    #[tokio::test]
    async fn group_commit_batches_queued_jobs_and_isolates_failures() {
        let dir = tempfile::tempdir().unwrap();
        let r = Arc::new(SqliteRegistry::open(&dir.path().join("r.db")).unwrap());
        r.create_tenant(&tenant("bob")).await.unwrap();
        let before = r.write_stats();

        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let blocker = {
            let r = r.clone();
            tokio::spawn(async move {
                r.write(move |_| {
                    started_tx.send(()).unwrap();
                    std::thread::sleep(Duration::from_millis(300));
                    Ok(())
                })
                .await
            })
        };
        tokio::task::spawn_blocking(move || started_rx.recv().unwrap())
            .await
            .unwrap();

        let bob = TenantId::parse("bob").unwrap();
        let nobody = TenantId::parse("nobody").unwrap();
        let mut tasks = Vec::new();
        for i in 0..20 {
            let r = r.clone();
            let (bob, nobody) = (bob.clone(), nobody.clone());
            tasks.push(tokio::spawn(async move {
                if i == 10 {
                    r.inbox_append(&nobody, i, b"{}").await
                } else {
                    r.inbox_append(&bob, i, b"{}").await
                }
            }));
        }
        // Let all 20 reach the queue while the writer sleeps.
        tokio::time::sleep(Duration::from_millis(100)).await;
        blocker.await.unwrap().unwrap();
        for (i, t) in tasks.into_iter().enumerate() {
            let res = t.await.unwrap();
            if i == 10 {
                assert!(res.unwrap_err().is_not_found());
            } else {
                assert!(matches!(res.unwrap(), Appended::Stored { .. }));
            }
        }
        let after = r.write_stats();
        assert_eq!(after.jobs - before.jobs, 21);
        assert_eq!(
            after.commits - before.commits,
            2,
            "the 20 queued appends share one commit"
        );
        assert_eq!(r.inbox_depth(&bob).await.unwrap(), 19);
    }

    /// A sync the test holds: `entered` hears of each sync as it starts, and each waits for one
    /// message on the returned sender (or fails with the message's error).
    fn held_sync() -> (
        impl FnMut() -> std::io::Result<()> + Send + 'static,
        std::sync::mpsc::Receiver<()>,
        std::sync::mpsc::Sender<Option<std::io::Error>>,
    ) {
        let (entered_tx, entered) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel::<Option<std::io::Error>>();
        let sync = move || {
            let _ = entered_tx.send(());
            match released.recv() {
                Ok(None) => Ok(()),
                Ok(Some(e)) => Err(e),
                Err(_) => Err(std::io::Error::other("the test ended")),
            }
        };
        (sync, entered, release)
    }

    /// A durable write is answered only after the WAL's sync; the writer does not wait for it,
    /// and one sync answers every batch committed meanwhile.
    #[tokio::test]
    async fn durable_writes_wait_for_the_sync_and_the_writer_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let (sync, entered, release) = held_sync();
        let r = Arc::new(SqliteRegistry::open_with_sync(&dir.path().join("r.db"), sync).unwrap());
        let first = tokio::spawn({
            let r = r.clone();
            async move { r.create_tenant(&tenant("ann")).await }
        });
        let entered = tokio::task::spawn_blocking(move || {
            entered.recv().unwrap();
            entered
        })
        .await
        .unwrap();
        // The sync is held: the tenant is committed (readers see it) but not answered.
        let ann = TenantId::parse("ann").unwrap();
        assert!(r.get_tenant(&ann).await.unwrap().is_some());
        assert!(!first.is_finished());
        // The writer goes on: a relaxed write is answered at its commit, and a durable one is
        // committed and waits for the next sync.
        r.touch_tenant(&ann, 5_000).await.unwrap();
        let second = tokio::spawn({
            let r = r.clone();
            async move {
                r.inbox_append(&TenantId::parse("ann").unwrap(), 1, b"{}")
                    .await
            }
        });
        while r.inbox_depth(&ann).await.unwrap() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(!second.is_finished());
        let before = r.write_stats();
        release.send(None).unwrap();
        first.await.unwrap().unwrap();
        tokio::task::spawn_blocking(move || entered.recv().unwrap())
            .await
            .unwrap();
        assert!(!second.is_finished(), "the append waits for its own sync");
        release.send(None).unwrap();
        assert!(matches!(
            second.await.unwrap().unwrap(),
            Appended::Stored { .. }
        ));
        let after = r.write_stats();
        assert_eq!(after.syncs - before.syncs, 2);
    }

    /// After a failed sync nothing is answered as written: the batch it covered and every write
    /// after it fail, since what the disk holds is unknown until otm restarts.
    #[tokio::test]
    async fn a_failed_sync_stops_all_writes() {
        let dir = tempfile::tempdir().unwrap();
        let (sync, _entered, release) = held_sync();
        let r = SqliteRegistry::open_with_sync(&dir.path().join("r.db"), sync).unwrap();
        release
            .send(Some(std::io::Error::other("input/output error")))
            .unwrap();
        let err = r.create_tenant(&tenant("bea")).await.unwrap_err();
        assert!(err.to_string().contains("refused to sync"), "{err}");
        let bea = TenantId::parse("bea").unwrap();
        let err = r.touch_tenant(&bea, 1).await.unwrap_err();
        assert!(err.to_string().contains("refused to sync"), "{err}");
        let err = r.create_tenant(&tenant("cy")).await.unwrap_err();
        assert!(err.to_string().contains("refused to sync"), "{err}");
    }

    #[tokio::test]
    async fn relaxed_writes_alone_skip_the_fsync() {
        let dir = tempfile::tempdir().unwrap();
        let r = Arc::new(SqliteRegistry::open(&dir.path().join("r.db")).unwrap());
        // What the registry relaxes: acknowledgements and failures of deliveries, activity.
        // Tenants and appends stay fsync'd.
        let synced = || r.write_stats().synced_commits;
        let s0 = synced();
        r.create_tenant(&tenant("dora")).await.unwrap();
        let dora = TenantId::parse("dora").unwrap();
        let Appended::Stored { seq } = r.inbox_append(&dora, 1, b"{}").await.unwrap() else {
            panic!("stored")
        };
        assert_eq!(synced() - s0, 2, "a tenant and an append are durable");
        let c0 = r.write_stats().commits;
        r.inbox_fail(&dora, seq, "refused", 5, None).await.unwrap();
        r.touch_tenant(&dora, 1_000).await.unwrap();
        r.inbox_ack(&dora, seq, None).await.unwrap();
        assert_eq!(r.write_stats().commits - c0, 3);
        assert_eq!(synced() - s0, 2, "none of the three waited for an fsync");
        assert!(r.inbox_next(&dora).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_panicking_job_fails_alone() {
        let dir = tempfile::tempdir().unwrap();
        let r = SqliteRegistry::open(&dir.path().join("r.db")).unwrap();
        let err = r.write::<(), _>(|_| panic!("boom")).await.unwrap_err();
        assert!(err.to_string().contains("panicked"), "{err}");
        r.create_tenant(&tenant("carol")).await.unwrap();
        assert!(
            r.get_tenant(&TenantId::parse("carol").unwrap())
                .await
                .unwrap()
                .is_some()
        );
    }

    /// The queries that run per update or per sweep must stay index lookups at 100,000 tenants.
    #[tokio::test]
    async fn hot_queries_use_indexes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        let _r = SqliteRegistry::open(&path).unwrap();
        let c = Connection::open(&path).unwrap();
        for (sql, indexes) in [
            (
                "SELECT id FROM tenants WHERE status = 'running' AND idle_deadline_ms <= 1 \
                 ORDER BY idle_deadline_ms LIMIT 10",
                &["tenants_idle"][..],
            ),
            (
                "SELECT id FROM tenants WHERE status = 'running' AND freeze_deadline_ms <= 1 \
                 AND idle_deadline_ms > 1 ORDER BY freeze_deadline_ms LIMIT 10",
                &["tenants_freeze"][..],
            ),
            (
                "SELECT id, idle_deadline_ms FROM tenants WHERE status = 'frozen' \
                 ORDER BY idle_deadline_ms",
                &["tenants_idle"][..],
            ),
            (
                "SELECT * FROM inbox WHERE tenant = 'a' AND state = 'pending' ORDER BY seq LIMIT 1",
                &["inbox_pending"],
            ),
            (
                "SELECT * FROM inbox WHERE tenant = 'a' AND state = 'pending' AND seq > 5 \
                 ORDER BY seq LIMIT 100",
                &["inbox_pending"],
            ),
            (
                "SELECT * FROM inbox WHERE tenant = 'a' AND state = 'dead' AND seq > 5 \
                 ORDER BY seq LIMIT 100",
                &["inbox_dead"],
            ),
            (
                "SELECT COUNT(*) FROM inbox WHERE tenant = 'a' AND state = 'pending'",
                &["inbox_pending"],
            ),
            (
                "UPDATE inbox SET state = 'pending', attempts = 0 \
                 WHERE tenant = 'a' AND state = 'dead' AND (NULL IS NULL OR seq = NULL) RETURNING seq",
                &["inbox_dead"],
            ),
            (
                "SELECT DISTINCT tenant FROM inbox WHERE state = 'pending' ORDER BY tenant",
                &["inbox_pending"],
            ),
            (
                "SELECT 1 FROM inbox WHERE tenant = 'a' AND update_id = 1",
                &["sqlite_autoindex_inbox_1"],
            ),
            (
                "DELETE FROM inbox WHERE seq IN (SELECT seq FROM inbox \
                 WHERE state = 'done' AND accepted_at_ms < 5 LIMIT 10)",
                &["inbox_done"],
            ),
            (
                "SELECT * FROM instances WHERE surrogate_digest = 'x'",
                &["instances_surrogate"],
            ),
            (
                "SELECT id FROM instances WHERE state = 'warm' AND tenant IS NULL ORDER BY created_at_ms, id LIMIT 1",
                &["(tenant=?)"],
            ),
        ] {
            let mut stmt = c.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            let plan: Vec<String> = stmt
                .query_map([], |r| r.get::<_, String>(3))
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap();
            assert!(
                plan.iter()
                    .any(|step| step.contains("USING") && indexes.iter().any(|i| step.contains(i))),
                "{sql}: {plan:?}"
            );
            // A scan of the partial index inbox_pending reads pending rows only: fine.
            let full_scan =
                |step: &String| step.starts_with("SCAN") && !step.contains("inbox_pending");
            // Nor does an inbox query sort rows on its own: the index gives them in order.
            // (The warm pool's few rows may be sorted.)
            assert!(
                !sql.contains("FROM inbox")
                    || !plan.iter().any(|step| step.contains("TEMP B-TREE")),
                "{sql} sorts: {plan:?}"
            );
            assert!(!plan.iter().any(full_scan), "{sql} scans: {plan:?}");
        }
    }
}
