//! [`RedisCoordinator`]: the [`Coordinator`] that replicas share, over one Redis server.
//!
//! # What lives where
//! Every key starts with the coordinator's prefix (empty unless [`RedisCoordinator::with_prefix`]
//! set one), so several fleets or test runs can share one Redis. Below, `<…>` stands for a
//! value and braces are literal:
//!
//! | key | type | what |
//! |---|---|---|
//! | `<prefix>otm:endpoint:<tenant>` | string, `PX` TTL | the tenant's cached [`Endpoint`], JSON |
//! | `<prefix>otm:lock:{<key>}` | string, `PX` TTL | the owner token of a held lock or lease |
//! | `<prefix>otm:fence:{<key>}` | integer, no TTL | the last fence handed out for `<key>` |
//! | `<prefix>otm:notify:<db>` | pub/sub channel | [`Notification`]s, JSON |
//!
//! Pub/sub ignores the database number of the URL (`redis://host/3`), so the channel name carries
//! it: fleets kept apart by database number do not hear each other either.
//!
//! The braces are Redis hash tags: a lock and its fence counter hash to the same slot, so the
//! scripts below keep working behind a proxy that shards by slot. This module speaks to one
//! Redis server (or a primary behind a stable address); it has no Cluster or Sentinel client.
//! `rediss://` connects over TLS (rustls; the server's certificate is checked against the
//! system's roots and the host name), and `redis://user:password@host` or `redis://:password@host`
//! authenticates with `AUTH`.
//!
//! # Operations
//! - Endpoint cache: `SET … PX ttl`, `GET`, `DEL`. An entry that does not decode (written by an
//!   incompatible version) reads as a miss, which the cache contract allows.
//! - Locks and leases are Lua scripts, so each is one atomic step on the server. Acquire runs
//!   `SET lock owner NX PX ttl` and, only if that took the lock, `INCR fence` (raised to the
//!   clock floor described below); renew compares the owner and then `PEXPIRE`s; release
//!   compares the owner and then `DEL`s. Owner tokens are random per acquisition, so only the
//!   holder of the [`Lease`] can renew or release it. TTLs run on the Redis server's clock;
//!   holders renew well before they lapse (otm renews every third of the TTL).
//! - Notifications: `PUBLISH` of the JSON form on one channel. One dedicated pub/sub connection
//!   is subscribed from [`RedisCoordinator::connect`] on; a background task forwards what it
//!   receives into a `tokio::sync::broadcast`, and [`Coordinator::subscribe`] hands out receivers
//!   of it, so a subscription is live as soon as `subscribe()` returns. The publisher receives its
//!   own notifications through Redis like everyone else. [`Coordinator::publish`] returns only
//!   after its notification came back over the pub/sub connection (a `PING` there, answered after
//!   everything Redis queued before it, is the barrier; bounded by a short timeout), so a
//!   subscriber created after `publish` returned never sees that notification. If the pub/sub
//!   connection drops, the task reconnects and resubscribes with backoff; notifications published
//!   meanwhile are lost, which the contract allows (sweepers make up for them).
//! - Commands go through a `ConnectionManager`, which reconnects by itself. Failures to reach
//!   Redis are [`Error::Unavailable`]; the URL, which may hold a password, is never logged nor put
//!   in an error.
//!
//! # Persistence: what the coordinator assumes of Redis
//! Redis holds only soft state here: the endpoint cache (the registry is the source of truth),
//! locks with TTLs, and fence counters. Losing all of it is survivable:
//! - Lost cache entries are misses; dispatchers fall back to the registry.
//! - Lost locks can briefly give a key two holders (the old one still working under its lease,
//!   a new one acquiring afresh). That is exactly what fences are for: writes to the registry
//!   carry the fence, and the registry rejects a fence smaller than the largest it has seen for
//!   the tenant, so the old holder's writes fail with a conflict once the new holder wrote.
//! - Lost fence counters would break that if fences restarted at 1: new holders would get fences
//!   the registry already saw (equal ones pass its check, smaller ones fail), so a stale holder
//!   could not be told apart, and a tenant could not be woken until its counter caught up again.
//!   To make fences survive this, acquire never hands out a fence below the Redis server's clock
//!   in milliseconds since the Unix epoch: a fence is `max(counter + 1, now_ms)`. After a restart
//!   that lost the counters, fences continue above every earlier one as long as the server's
//!   clock did not step back by more than the outage lasted (and no key was taken more often than
//!   once a millisecond for long, which would run its counter ahead of the clock). Fences are
//!   therefore large numbers such as `1767225600000`; only their order means anything.
//!
//! Recommended anyway: `appendonly yes` (with the default `appendfsync everysec`), so a restart
//! keeps the fence counters and the locks, and no `maxmemory-policy` that evicts keys without a
//! TTL (`noeviction` or a `volatile-*` policy): evicting a fence counter has the same effect as
//! losing it. Replication to a replica is asynchronous, so a failover can lose the last second of
//! writes, with the same effects as above, and the same protection from the clock floor.
//!
//! Endpoints carry the instance's shim token, so the Redis should need a password (or ACL user)
//! and live on a private network.

use async_trait::async_trait;
use futures::FutureExt;
use futures::stream::{BoxStream, StreamExt};
use otm_core::instance::Endpoint;
use otm_core::{Backoff, Coordinator, Error, Lease, Notification, Result, TenantId};
use redis::aio::{ConnectionManager, ConnectionManagerConfig, PubSubSink, PubSubStream};
use redis::{ErrorKind, RedisError, Script, ServerErrorKind};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

const BACKEND: &str = "redis";
/// Notifications a slow subscriber may fall behind by before it skips some.
const NOTIFY_CAPACITY: usize = 1024;
/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one command may take before it fails as unavailable.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Retries of the command connection before a call fails (each after a backoff up to a second).
const CONNECT_RETRIES: usize = 2;
/// How often the pub/sub connection is pinged to find a half-open connection.
const HEALTH_EVERY: Duration = Duration::from_secs(5);
/// How long a ping on the pub/sub connection may take before the connection counts as lost.
const PING_TIMEOUT: Duration = Duration::from_secs(2);
/// How long [`Coordinator::publish`] waits for its notification to come back.
const ECHO_WAIT: Duration = Duration::from_secs(1);
/// Pauses between pub/sub reconnection attempts: 100 ms, doubling up to 5 s.
const RESUBSCRIBE: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
/// The longest TTL passed to Redis (about 100 years), far below where `now + ttl` overflows.
const MAX_TTL_MS: u64 = 100 * 365 * 24 * 3600 * 1000;

/// Takes the lock and hands out the next fence. KEYS: lock, fence. ARGV: owner, ttl in ms.
/// Returns the fence, or nil when the lock is held. The fence is at least the server's clock in
/// milliseconds, so fences keep growing even if the counter was lost (see the module docs).
/// `%.0f` prints the whole number exactly; Lua's default number format would round it.
static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return false
end
local fence = redis.call('INCR', KEYS[2])
local now = redis.call('TIME')
local floor = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
if fence < floor then
  redis.call('SET', KEYS[2], string.format('%.0f', floor))
  fence = floor
end
return fence
",
    )
});

/// Extends a lock its owner holds. KEYS: lock. ARGV: owner, ttl in ms. Returns 1 or 0.
static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
",
    )
});

/// Deletes a lock its owner holds. KEYS: lock. ARGV: owner. Returns 1 or 0.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
",
    )
});

/// The coordinator over Redis. Cheap calls share one multiplexed, self-reconnecting connection;
/// notifications arrive on a second connection that a background task keeps subscribed. Dropping
/// the coordinator stops that task and ends every subscription stream.
pub struct RedisCoordinator {
    client: redis::Client,
    conn: ConnectionManager,
    prefix: String,
    /// The database number of the URL: pub/sub ignores it, so it goes into the channel name.
    db: i64,
    /// The notification channel: [`channel`] of `prefix` and `db`.
    channel: String,
    notify: broadcast::Sender<Notification>,
    listener: Listener,
    redact: Arc<Redactor>,
}

impl fmt::Debug for RedisCoordinator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not the client or the connection: their configuration holds the URL.
        f.debug_struct("RedisCoordinator")
            .field("prefix", &self.prefix)
            .field(
                "notifications_connected",
                &self.listener.connected.load(Ordering::Relaxed),
            )
            .finish_non_exhaustive()
    }
}

impl RedisCoordinator {
    /// Connects to the Redis at `url` (`redis://[user:password@]host[:port][/db]`, or
    /// `rediss://…` over TLS) with no key
    /// prefix, and subscribes to notifications before returning. [`Error::Unavailable`] if Redis
    /// cannot be reached, [`Error::InvalidInput`] if the URL is malformed; neither shows the URL.
    pub async fn connect(url: &str) -> Result<Self> {
        let redact = Arc::new(Redactor::for_url(url));
        let client = redis::Client::open(url).map_err(|e| {
            Error::invalid(format!(
                "the Redis coordinator URL is not valid ({}); use redis://[user:password@]host[:port][/db]",
                redact.apply(&e.to_string())
            ))
        })?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(CONNECT_RETRIES)
            .set_max_delay(Duration::from_secs(1));
        let conn = client
            .get_connection_manager_with_config(config)
            .await
            .map_err(|e| connect_error(&redact, &e))?;
        let (notify, _) = broadcast::channel(NOTIFY_CAPACITY);
        let prefix = String::new();
        let db = client.get_connection_info().redis_settings().db();
        let channel = channel(&prefix, db);
        let listener =
            Listener::start(&client, channel.clone(), notify.clone(), redact.clone()).await?;
        Ok(RedisCoordinator {
            client,
            conn,
            prefix,
            db,
            channel,
            notify,
            listener,
            redact,
        })
    }

    /// Puts every key and the notification channel under `prefix` (say `fleet-a:`), so several
    /// fleets or test runs can share one Redis. Resubscribes before returning; subscription
    /// streams taken before go on with the new channel. Braces are refused: they would break the
    /// hash tags that keep a lock and its fence counter together.
    pub async fn with_prefix(mut self, prefix: &str) -> Result<Self> {
        if prefix.contains(['{', '}']) {
            return Err(Error::invalid(format!(
                "the Redis key prefix `{prefix}` contains a brace; use letters, digits and `-_:.`"
            )));
        }
        self.prefix = prefix.to_owned();
        self.channel = channel(&self.prefix, self.db);
        // The old listener stops when it is dropped here, after the new one is subscribed.
        self.listener = Listener::start(
            &self.client,
            self.channel.clone(),
            self.notify.clone(),
            self.redact.clone(),
        )
        .await?;
        Ok(self)
    }

    /// The key prefix ("" unless [`RedisCoordinator::with_prefix`] set one).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn endpoint_key(&self, tenant: &TenantId) -> String {
        format!("{}otm:endpoint:{tenant}", self.prefix)
    }

    fn lock_key(&self, key: &str) -> String {
        format!("{}otm:lock:{{{key}}}", self.prefix)
    }

    fn fence_key(&self, key: &str) -> String {
        format!("{}otm:fence:{{{key}}}", self.prefix)
    }

    fn error(&self, doing: &str, e: &RedisError) -> Error {
        command_error(&self.redact, doing, e)
    }
}

/// The notification channel under `prefix` for database `db`. Redis delivers a `PUBLISH` to
/// subscribers of every database, so fleets kept apart by database number need the number here.
fn channel(prefix: &str, db: i64) -> String {
    format!("{prefix}otm:notify:{db}")
}

/// A TTL in whole milliseconds for `PX`/`PEXPIRE`: rounded up (Redis refuses 0) and capped.
fn ttl_ms(ttl: Duration) -> u64 {
    let ms = ttl.as_micros().div_ceil(1000).max(1);
    u64::try_from(ms).unwrap_or(u64::MAX).min(MAX_TTL_MS)
}

#[async_trait]
impl Coordinator for RedisCoordinator {
    async fn endpoint(&self, tenant: &TenantId) -> Result<Option<Endpoint>> {
        let key = self.endpoint_key(tenant);
        let raw: Option<Vec<u8>> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(|e| self.error("reading a cached endpoint", &e))?;
        let Some(raw) = raw else { return Ok(None) };
        match serde_json::from_slice(&raw) {
            Ok(endpoint) => Ok(Some(endpoint)),
            Err(e) => {
                // A cache miss is always safe: the registry decides. Drop the entry so the next
                // wake writes a fresh one. Only where it broke is logged: serde's message can
                // quote values, and the entry holds the shim token.
                tracing::warn!(
                    %tenant,
                    category = ?e.classify(),
                    line = e.line(),
                    column = e.column(),
                    "ignoring a cached endpoint that does not decode"
                );
                let _ = redis::cmd("DEL")
                    .arg(&key)
                    .query_async::<()>(&mut self.conn.clone())
                    .await;
                Ok(None)
            }
        }
    }

    async fn set_endpoint(
        &self,
        tenant: &TenantId,
        endpoint: &Endpoint,
        ttl: Duration,
    ) -> Result<()> {
        if ttl.is_zero() {
            // An entry that lapses at once is no entry; Redis refuses `PX 0`.
            return self.clear_endpoint(tenant).await;
        }
        let json = serde_json::to_vec(endpoint).map_err(|e| Error::generic(BACKEND, e))?;
        redis::cmd("SET")
            .arg(self.endpoint_key(tenant))
            .arg(json)
            .arg("PX")
            .arg(ttl_ms(ttl))
            .query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(|e| self.error("caching an endpoint", &e))
    }

    async fn clear_endpoint(&self, tenant: &TenantId) -> Result<()> {
        redis::cmd("DEL")
            .arg(self.endpoint_key(tenant))
            .query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(|e| self.error("clearing a cached endpoint", &e))
    }

    async fn acquire(&self, key: &str, ttl: Duration) -> Result<Option<Lease>> {
        let owner = otm_core::id::random_hex(16);
        let fence: Option<u64> = ACQUIRE
            .key(self.lock_key(key))
            .key(self.fence_key(key))
            .arg(&owner)
            .arg(ttl_ms(ttl))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| self.error(&format!("taking the lock `{key}`"), &e))?;
        Ok(fence.map(|fence| Lease {
            key: key.to_owned(),
            owner,
            fence,
        }))
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool> {
        RENEW
            .key(self.lock_key(&lease.key))
            .arg(&lease.owner)
            .arg(ttl_ms(ttl))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| self.error(&format!("renewing the lock `{}`", lease.key), &e))
    }

    async fn release(&self, lease: &Lease) -> Result<bool> {
        RELEASE
            .key(self.lock_key(&lease.key))
            .arg(&lease.owner)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| self.error(&format!("releasing the lock `{}`", lease.key), &e))
    }

    async fn publish(&self, notification: Notification) -> Result<()> {
        let json = serde_json::to_vec(&notification).map_err(|e| Error::generic(BACKEND, e))?;
        redis::cmd("PUBLISH")
            .arg(&self.channel)
            .arg(json)
            .query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(|e| self.error("publishing a notification", &e))?;
        // Wait until the notification is in our own subscribers' queues, so one subscribed after
        // this returns does not see it. Best effort: a lost pub/sub connection does not fail
        // the publish, which Redis has already taken.
        self.listener.echo().await;
        Ok(())
    }

    fn subscribe(&self) -> BoxStream<'static, Notification> {
        BroadcastStream::new(self.notify.subscribe())
            .filter_map(|n| async move {
                match n {
                    Ok(n) => Some(n),
                    // A slow subscriber lost some; sweepers make up for them.
                    Err(BroadcastStreamRecvError::Lagged(skipped)) => {
                        tracing::debug!(skipped, "a notification subscriber fell behind");
                        None
                    }
                }
            })
            .boxed()
    }
}

// =============================================================================================
// Notifications

/// The background task that keeps one pub/sub connection subscribed and feeds the broadcast.
struct Listener {
    /// Echo requests: answered once everything Redis sent before the request was forwarded.
    echoes: mpsc::UnboundedSender<oneshot::Sender<()>>,
    /// True while the pub/sub connection is subscribed.
    connected: Arc<AtomicBool>,
    task: tokio::task::AbortHandle,
}

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Listener")
            .field("connected", &self.connected.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Listener {
    /// Subscribes to `channel` (failing if Redis cannot be reached) and starts the task.
    async fn start(
        client: &redis::Client,
        channel: String,
        notify: broadcast::Sender<Notification>,
        redact: Arc<Redactor>,
    ) -> Result<Self> {
        let first = subscribe(client, &channel, &redact).await?;
        let (echoes, echo_rx) = mpsc::unbounded_channel();
        let connected = Arc::new(AtomicBool::new(true));
        let task = tokio::spawn(listen(ListenTask {
            client: client.clone(),
            channel,
            notify,
            redact,
            echoes: echo_rx,
            connected: connected.clone(),
            first: Some(first),
        }))
        .abort_handle();
        Ok(Listener {
            echoes,
            connected,
            task,
        })
    }

    /// Waits (briefly) until everything published before this call was forwarded.
    async fn echo(&self) {
        if !self.connected.load(Ordering::Acquire) {
            return;
        }
        let (done, wait) = oneshot::channel();
        if self.echoes.send(done).is_ok() {
            let _ = tokio::time::timeout(ECHO_WAIT, wait).await;
        }
    }
}

/// A fresh pub/sub connection subscribed to `channel`.
async fn subscribe(
    client: &redis::Client,
    channel: &str,
    redact: &Redactor,
) -> Result<(PubSubSink, PubSubStream)> {
    let attempt = async {
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(channel).await?;
        Ok::<_, RedisError>(pubsub.split())
    };
    match tokio::time::timeout(CONNECT_TIMEOUT + RESPONSE_TIMEOUT, attempt).await {
        Ok(Ok(split)) => Ok(split),
        Ok(Err(e)) => Err(connect_error(redact, &e)),
        Err(_) => Err(Error::unavailable(
            BACKEND,
            "subscribing to notifications timed out; check that Redis runs and is reachable",
        )),
    }
}

struct ListenTask {
    client: redis::Client,
    channel: String,
    notify: broadcast::Sender<Notification>,
    redact: Arc<Redactor>,
    echoes: mpsc::UnboundedReceiver<oneshot::Sender<()>>,
    connected: Arc<AtomicBool>,
    first: Option<(PubSubSink, PubSubStream)>,
}

/// Forwards notifications until the coordinator is dropped, resubscribing after a lost
/// connection with backoff.
async fn listen(mut t: ListenTask) {
    // Resubscriptions that failed in a row.
    let mut failures = 0;
    loop {
        let (mut sink, mut messages) = match t.first.take() {
            Some(first) => first,
            None => match subscribe(&t.client, &t.channel, &t.redact).await {
                Ok(split) => {
                    tracing::info!("redis coordinator: notifications resubscribed");
                    failures = 0;
                    split
                }
                Err(e) => {
                    failures += 1;
                    let wait = RESUBSCRIBE.delay(failures);
                    tracing::warn!(error = %e, retry_in = ?wait, "redis coordinator: cannot resubscribe to notifications");
                    // Answer echo requests at once meanwhile: nothing will come back.
                    let sleep = tokio::time::sleep(wait);
                    tokio::pin!(sleep);
                    loop {
                        tokio::select! {
                            _ = &mut sleep => break,
                            echo = t.echoes.recv() => match echo {
                                Some(done) => drop(done.send(())),
                                None => return,
                            },
                        }
                    }
                    continue;
                }
            },
        };
        t.connected.store(true, Ordering::Release);
        let mut health =
            tokio::time::interval_at(tokio::time::Instant::now() + HEALTH_EVERY, HEALTH_EVERY);
        health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let lost = loop {
            tokio::select! {
                msg = messages.next() => match msg {
                    Some(msg) => forward(&t.notify, &msg),
                    None => break "the connection closed",
                },
                echo = t.echoes.recv() => {
                    let Some(done) = echo else { return };
                    // One ping answers every echo request queued so far.
                    let mut waiting = vec![done];
                    while let Ok(done) = t.echoes.try_recv() {
                        waiting.push(done);
                    }
                    let alive = ping(&mut sink).await;
                    // Redis answers the ping after every message it queued for this connection
                    // before it, and the connection's reader hands those over in order: they
                    // are ready now.
                    while let Some(Some(msg)) = messages.next().now_or_never() {
                        forward(&t.notify, &msg);
                    }
                    for done in waiting {
                        let _ = done.send(());
                    }
                    if !alive {
                        break "a ping went unanswered";
                    }
                }
                _ = health.tick() => {
                    if !ping(&mut sink).await {
                        break "a ping went unanswered";
                    }
                }
            }
        };
        t.connected.store(false, Ordering::Release);
        tracing::warn!(
            reason = lost,
            "redis coordinator: notification connection lost; resubscribing"
        );
    }
}

async fn ping(sink: &mut PubSubSink) -> bool {
    matches!(
        tokio::time::timeout(PING_TIMEOUT, sink.ping::<redis::Value>()).await,
        Ok(Ok(_))
    )
}

fn forward(notify: &broadcast::Sender<Notification>, msg: &redis::Msg) {
    match serde_json::from_slice::<Notification>(msg.get_payload_bytes()) {
        // No subscriber is not an error: notifications are best effort.
        Ok(n) => drop(notify.send(n)),
        // Perhaps from a newer version with a new kind; nothing here would act on it.
        Err(e) => tracing::debug!(error = %e, "ignoring a notification this version does not know"),
    }
}

// =============================================================================================
// Errors

/// True for errors that say Redis cannot be reached or cannot serve right now.
fn is_unavailable(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
        || matches!(
            e.kind(),
            ErrorKind::Io
                | ErrorKind::AuthenticationFailed
                | ErrorKind::Server(
                    ServerErrorKind::BusyLoading
                        | ServerErrorKind::TryAgain
                        | ServerErrorKind::ClusterDown
                        | ServerErrorKind::MasterDown
                        | ServerErrorKind::ReadOnly
                )
        )
}

/// Any failure to connect is [`Error::Unavailable`]: the fix is outside this process.
fn connect_error(redact: &Redactor, e: &RedisError) -> Error {
    Error::unavailable(
        BACKEND,
        format!(
            "cannot connect to Redis ({}); check that it runs, is reachable, and that the \
             coordinator URL (not shown here) has the right host and password",
            redact.apply(&e.to_string())
        ),
    )
}

fn command_error(redact: &Redactor, doing: &str, e: &RedisError) -> Error {
    let detail = redact.apply(&e.to_string());
    if is_unavailable(e) {
        Error::unavailable(
            BACKEND,
            format!("{doing} failed ({detail}); Redis is down or unreachable, retry later"),
        )
    } else {
        Error::generic(BACKEND, format!("{doing} failed: {detail}"))
    }
}

/// Removes the URL and its credentials from text that goes into errors and logs. The Redis
/// client's messages should not carry them; this makes sure.
#[derive(Default)]
struct Redactor {
    secrets: Vec<String>,
}

impl Redactor {
    fn for_url(url: &str) -> Self {
        let mut secrets = vec![url.to_owned(), url.trim().to_owned()];
        if let Some((_, rest)) = url.split_once("://") {
            let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
            if let Some((userinfo, _)) = authority.rsplit_once('@') {
                secrets.push(userinfo.to_owned());
                if let Some((_, password)) = userinfo.split_once(':') {
                    secrets.push(password.to_owned());
                }
            }
        }
        // Also a password given as a query parameter (`?password=…`).
        if let Some((_, query)) = url.split_once('?') {
            for pair in query.split('&') {
                if let Some((k, v)) = pair.split_once('=')
                    && matches!(k, "pass" | "password")
                {
                    secrets.push(v.to_owned());
                }
            }
        }
        secrets.retain(|s| !s.is_empty());
        // The longest first, so a password inside the URL does not leave the rest behind.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        Redactor { secrets }
    }

    fn apply(&self, text: &str) -> String {
        let mut text = text.to_owned();
        for s in &self.secrets {
            if text.contains(s.as_str()) {
                text = text.replace(s.as_str(), "***");
            }
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_round_up_to_whole_milliseconds() {
        assert_eq!(ttl_ms(Duration::from_micros(1)), 1);
        assert_eq!(ttl_ms(Duration::from_micros(1500)), 2);
        assert_eq!(ttl_ms(Duration::from_secs(30)), 30_000);
        assert_eq!(ttl_ms(Duration::MAX), MAX_TTL_MS);
    }

    #[test]
    fn the_redactor_hides_the_url_and_its_password() {
        let r = Redactor::for_url("redis://otm:hunter2@cache:6379/0?password=s3cret");
        let out = r.apply(
            "x redis://otm:hunter2@cache:6379/0?password=s3cret y otm:hunter2 hunter2 s3cret",
        );
        assert!(
            !out.contains("hunter2") && !out.contains("s3cret") && !out.contains("cache:6379"),
            "{out}"
        );
        assert_eq!(
            Redactor::for_url("redis://cache:6379").apply("refused"),
            "refused"
        );
    }

    #[tokio::test]
    async fn an_unreachable_redis_is_unavailable_and_the_password_stays_hidden() {
        // Port 1 on the loopback address refuses connections at once.
        let err = RedisCoordinator::connect("redis://otm:hunter2@127.0.0.1:1/0")
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::Unavailable {
                    backend: "redis",
                    ..
                }
            ),
            "{err:?}"
        );
        let msg = format!("{err} {err:?}");
        assert!(
            !msg.contains("hunter2") && !msg.contains("127.0.0.1:1"),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn bad_urls_are_invalid_input_without_the_url() {
        for url in ["redis://:hunter2@", "rediss://:hunter2@"] {
            let err = RedisCoordinator::connect(url).await.unwrap_err();
            assert!(matches!(err, Error::InvalidInput { .. }), "{url}: {err:?}");
            assert!(!err.to_string().contains("hunter2"), "{err}");
        }
    }

    #[tokio::test]
    async fn rediss_urls_connect_over_tls() {
        // Port 1 refuses at once: the TLS client is built, the connection fails without the URL.
        let err = RedisCoordinator::connect("rediss://:hunter2@127.0.0.1:1")
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::Unavailable { .. }),
            "rediss:// is supported: {err:?}"
        );
        assert!(!format!("{err} {err:?}").contains("hunter2"), "{err}");
        // A plain Redis does not speak TLS: the handshake fails, nothing is sent in clear.
        if let Some(plain) = std::env::var("OTM_TEST_REDIS_URL")
            .ok()
            .and_then(|u| u.strip_prefix("redis://").map(str::to_owned))
        {
            let err = RedisCoordinator::connect(&format!("rediss://{plain}"))
                .await
                .unwrap_err();
            assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
        }
    }
}
