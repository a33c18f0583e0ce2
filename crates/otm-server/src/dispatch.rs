//! Dispatchers: one task per tenant with pending updates drains its inbox in order, one update at
//! a time, waking the tenant as needed (the head of the inbox is read several updates at a
//! time). An update leaves the inbox only after the agent acknowledged it; failures retry with
//! backoff and end in the dead-letter list.

use crate::app::App;
use crate::lease::HeldLease;
use otm_core::{Backoff, DeliveryFailure, DeliveryOutcome, FailOutcome, InboxItem, TenantId};
use otm_shim::ShimClient;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// A dispatcher with nothing to do ends after this long.
const IDLE_EXIT: Duration = Duration::from_secs(10);
/// Longest pause between attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Pauses between delivery attempts of one update: 100 ms, 200 ms, 400 ms … up to five seconds.
const RETRY: Backoff = Backoff::new(Duration::from_millis(100), MAX_BACKOFF);
/// Pauses while the inbox cannot be read: 500 ms, doubling up to five seconds.
const READ_RETRY: Backoff = Backoff::new(Duration::from_millis(500), MAX_BACKOFF).with_jitter(0.2);
/// Pending updates a dispatcher reads at once: one registry read for up to this many deliveries
/// while a backlog drains. Only the dispatcher (holding the tenant's lease) changes pending
/// updates, so what it read stays true until it delivers them; after anything but a clean
/// delivery it reads the head again.
const READ_AHEAD: usize = 32;
/// While a backlog drains, the tenant's last activity is written at most this often (the idle
/// sweep counts in seconds, and a tenant with updates waiting is busy anyway); the last
/// delivery of a burst is always written.
const TOUCH_EVERY: Duration = Duration::from_secs(1);

/// The tenant's last activity as this dispatcher owes it to the registry.
#[derive(Default)]
struct Activity {
    written: Option<Instant>,
    owed: bool,
}

impl Activity {
    /// An update was delivered: written now, or owed when it was written a moment ago.
    async fn delivered(&mut self, app: &App, tenant: &TenantId) {
        if self.written.is_some_and(|w| w.elapsed() < TOUCH_EVERY) {
            self.owed = true;
        } else {
            self.write(app, tenant).await;
        }
    }

    /// Writes what is owed (the inbox ran dry, or the dispatcher stops).
    async fn settle(&mut self, app: &App, tenant: &TenantId) {
        if self.owed {
            self.write(app, tenant).await;
        }
    }

    async fn write(&mut self, app: &App, tenant: &TenantId) {
        let _ = app
            .registry()
            .touch_tenant(tenant, app.clock().now_ms())
            .await;
        self.written = Some(Instant::now());
        self.owed = false;
    }
}

/// Tells the tenant's dispatcher there is work, starting one if none runs.
pub fn kick(app: &Arc<App>, tenant: &TenantId) {
    let Some(notify) = app.register_dispatcher(tenant) else {
        return;
    };
    let (a, tenant) = (app.clone(), tenant.clone());
    app.spawn(async move {
        run(&a, &tenant, notify).await;
    });
}

#[tracing::instrument(name = "dispatch", skip_all, fields(%tenant))]
async fn run(app: &Arc<App>, tenant: &TenantId, notify: Arc<Notify>) {
    // At most one dispatcher per tenant across all replicas: the one holding this lease.
    let key = format!("dispatch:{tenant}");
    let lease =
        match HeldLease::try_acquire(app.coordinator(), &key, crate::lease::ttl(app.settings()))
            .await
        {
            Ok(Some(l)) => l,
            Ok(None) => {
                // Another replica dispatches; the sweeper looks again later.
                app.dispatcher_ended(tenant);
                return;
            }
            Err(e) => {
                tracing::warn!(%tenant, error = %e, "cannot take the dispatcher lease");
                app.dispatcher_ended(tenant);
                return;
            }
        };
    // Claim the inbox with this lease's fence: a dispatcher whose lease lapsed can no longer
    // acknowledge or fail anything once this one started.
    if let Err(e) = app.registry().inbox_claim(tenant, lease.fence()).await {
        tracing::warn!(%tenant, error = %e, "cannot claim the inbox");
        app.dispatcher_ended(tenant);
        lease.release().await;
        return;
    }
    let mut read_failures = 0u32;
    let mut activity = Activity::default();
    let mut ahead = std::collections::VecDeque::with_capacity(READ_AHEAD);
    loop {
        if app.shutdown().is_cancelled() || lease.lost().is_cancelled() {
            break;
        }
        if ahead.is_empty() {
            match app.registry().inbox_head(tenant, READ_AHEAD).await {
                Ok(items) => {
                    read_failures = 0;
                    ahead.extend(items);
                }
                Err(e) => {
                    tracing::warn!(%tenant, error = %e, "cannot read the inbox");
                    read_failures += 1;
                    tokio::time::sleep(READ_RETRY.delay(read_failures)).await;
                    continue;
                }
            }
        }
        match ahead.pop_front() {
            Some(item) => {
                // A lease that could not be renewed ends the attempt at once: another replica may
                // be delivering the same update by now.
                let step = tokio::select! {
                    step = deliver_one(app, tenant, item, lease.fence(), &mut activity) => step,
                    _ = lease.lost().cancelled() => Step::Stop,
                };
                match step {
                    Step::Delivered => {}
                    Step::ReadAgain => ahead.clear(),
                    Step::Stop => {
                        app.metrics().delivery(DeliveryOutcome::FencedOut);
                        tracing::warn!(%tenant, "this dispatcher lost its lease; it stops");
                        break;
                    }
                }
            }
            None => {
                activity.settle(app, tenant).await;
                tokio::select! {
                    _ = notify.notified() => continue,
                    _ = app.shutdown().cancelled() => break,
                    _ = lease.lost().cancelled() => break,
                    _ = tokio::time::sleep(IDLE_EXIT) => {}
                }
                // Leave; a kick that raced with this sees no dispatcher and starts a new one.
                app.dispatcher_ended(tenant);
                lease.release().await;
                if matches!(app.registry().inbox_next(tenant).await, Ok(Some(_))) {
                    kick(app, tenant);
                }
                return;
            }
        }
    }
    activity.settle(app, tenant).await;
    app.dispatcher_ended(tenant);
    lease.release().await;
}

/// Starts (or nudges) the dispatchers of the tenants [`App::request_delivery`] names.
pub async fn run_delivery_requests(app: Arc<App>) {
    let Some(mut requests) = app.take_delivery_requests() else {
        return;
    };
    loop {
        tokio::select! {
            _ = app.shutdown().cancelled() => return,
            t = requests.recv() => match t {
                Some(tenant) => kick(&app, &tenant),
                None => return,
            },
        }
    }
}

/// Kicks local dispatchers when another replica stored an update (best effort; the sweeper
/// covers lost notifications).
pub async fn run_notifications(app: Arc<App>) {
    let mut notes = app.coordinator().subscribe();
    loop {
        tokio::select! {
            _ = app.shutdown().cancelled() => return,
            n = futures::StreamExt::next(&mut notes) => match n {
                Some(otm_core::Notification::InboxHasWork { tenant }) => kick(&app, &tenant),
                Some(otm_core::Notification::TenantChanged { tenant }) => {
                    app.webhook_secrets().forget(&tenant);
                    app.surrogates().forget_tenant(&tenant);
                }
                Some(_) => {}
                None => return,
            },
        }
    }
}

/// What the dispatcher does after one delivery.
enum Step {
    /// The update was delivered and acknowledged: on to the next one read.
    Delivered,
    /// It was not (it waits, it failed, it is gone): the head of the inbox is read again.
    ReadAgain,
    /// Its fence is stale: another dispatcher owns the inbox.
    Stop,
}

// At debug level: one span per update (the dispatcher's own span names the tenant, and what is
// logged below names the update).
#[tracing::instrument(name = "delivery", level = "debug", skip_all, fields(update_id = item.update_id, seq = item.seq, instance = tracing::field::Empty))]
async fn deliver_one(
    app: &Arc<App>,
    tenant: &TenantId,
    item: InboxItem,
    fence: u64,
    activity: &mut Activity,
) -> Step {
    let started = Instant::now();
    let result = attempt(app, tenant, &item).await;
    app.metrics()
        .delivery_seconds
        .observe(started.elapsed().as_secs_f64());
    match result {
        Ok(()) => {
            // The agent has the update: record that until the registry takes it (or the inbox
            // is another dispatcher's), so that a passing registry failure does not deliver the
            // update a second time.
            let mut attempt = 0;
            loop {
                match app
                    .registry()
                    .inbox_ack(tenant, item.seq, Some(fence))
                    .await
                {
                    Ok(()) => {
                        app.metrics().delivery(DeliveryOutcome::Acked);
                        break;
                    }
                    Err(otm_core::Error::Conflict { message }) => {
                        tracing::warn!(%tenant, update_id = item.update_id, %message, "acknowledgement refused");
                        return Step::Stop;
                    }
                    // The tenant was deleted meanwhile: nothing is left to acknowledge.
                    Err(otm_core::Error::NotFound { what }) => {
                        tracing::warn!(%tenant, update_id = item.update_id, %what, "a delivered update is gone from the inbox");
                        return Step::ReadAgain;
                    }
                    Err(e) => {
                        tracing::error!(%tenant, update_id = item.update_id, error = %e, "could not remove a delivered update; trying again");
                        tokio::select! {
                            _ = tokio::time::sleep(RETRY.delay(attempt)) => {}
                            // Left pending: delivered again after the restart.
                            _ = app.shutdown().cancelled() => return Step::ReadAgain,
                        }
                        attempt += 1;
                    }
                }
            }
            activity.delivered(app, tenant).await;
            return Step::Delivered;
        }
        Err(Failure::Held(message)) => {
            // Admission control: the update waits in the inbox without using up an attempt.
            tracing::info!(%tenant, update_id = item.update_id, %message, "delivery waits for room in the fleet");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Err(Failure::Failed(kind, message)) => {
            tracing::warn!(%tenant, update_id = item.update_id, attempt = item.attempts + 1, %kind, %message, "delivery failed");
            app.metrics().delivery_failure(kind);
            let max = app.settings().max_delivery_attempts;
            match app
                .registry()
                .inbox_fail(tenant, item.seq, &kind.record(&message), max, Some(fence))
                .await
            {
                // A stale fence, or the update is no longer pending: another dispatcher (or an
                // operator) has it. Stop; the sweeper starts a dispatcher again if work is left.
                Err(otm_core::Error::Conflict { message }) => {
                    tracing::warn!(%tenant, update_id = item.update_id, %message, "failure record refused");
                    return Step::Stop;
                }
                Ok(FailOutcome::DeadLettered) => {
                    app.metrics().delivery(DeliveryOutcome::DeadLettered);
                    tracing::error!(%tenant, update_id = item.update_id, "update moved to the dead-letter list");
                }
                Ok(FailOutcome::Retry { attempts }) => {
                    app.metrics().delivery(DeliveryOutcome::Failed);
                    tokio::time::sleep(RETRY.delay(attempts)).await;
                }
                Err(e) => {
                    tracing::error!(%tenant, error = %e, "could not record a failed delivery");
                    tokio::time::sleep(MAX_BACKOFF).await;
                }
            }
        }
    }
    Step::ReadAgain
}

/// Why a delivery did not go through.
enum Failure {
    /// A real failure: counts as an attempt, and its kind is kept in the inbox.
    Failed(DeliveryFailure, String),
    /// Held back by admission control: no attempt was made.
    Held(String),
}

/// How long the shim may take to deliver one update.
const DELIVER_TIMEOUT: Duration = Duration::from_secs(60);

/// One delivery attempt: wake if needed, deliver through the shim, check the acknowledgement.
async fn attempt(app: &Arc<App>, tenant: &TenantId, item: &InboxItem) -> Result<(), Failure> {
    let chat = chat_of(&item.payload);
    let woken = app.wake(tenant, chat).await.map_err(|e| match e {
        otm_core::Error::Unavailable {
            backend: crate::wake::ADMISSION,
            message,
        } => Failure::Held(message),
        e => Failure::Failed(DeliveryFailure::WakeFailed, format!("wake failed: {e}")),
    })?;
    tracing::Span::current().record("instance", tracing::field::display(&woken.instance));
    let shim = ShimClient::new(
        woken.endpoint.address.clone(),
        woken.endpoint.shim_token.clone(),
    );
    // The timeout is kept here (the client's own is a little longer) so that running out of
    // time is told apart from an unreachable shim.
    let delivered = tokio::time::timeout(
        DELIVER_TIMEOUT,
        shim.deliver(
            bytes::Bytes::from(item.payload.clone()),
            DELIVER_TIMEOUT + Duration::from_secs(1),
        ),
    )
    .await;
    let (kind, message) = match delivered {
        Ok(Ok(r)) if r.acknowledged => return Ok(()),
        Ok(Ok(r)) => {
            let message = r
                .detail
                .unwrap_or_else(|| format!("agent answered {}", r.status));
            return Err(Failure::Failed(DeliveryFailure::AgentRefused, message));
        }
        Ok(Err(e)) => (DeliveryFailure::ShimUnreachable, e.to_string()),
        Err(_) => (
            DeliveryFailure::Timeout,
            format!(
                "the shim did not answer a delivery within {} s",
                DELIVER_TIMEOUT.as_secs()
            ),
        ),
    };
    // The instance may be gone; forget the endpoint so the next attempt looks again.
    let _ = app.coordinator().clear_endpoint(tenant).await;
    Err(Failure::Failed(kind, message))
}

/// The chat an update came from, wherever the update type keeps it; read without building the
/// update (the rest of it is skipped, not kept).
fn chat_of(payload: &[u8]) -> Option<i64> {
    #[derive(serde::Deserialize)]
    struct Chat {
        id: i64,
    }
    #[derive(serde::Deserialize)]
    struct Message {
        chat: Option<Chat>,
    }
    #[derive(serde::Deserialize)]
    struct Callback {
        message: Option<Message>,
    }
    #[derive(serde::Deserialize)]
    struct Update {
        message: Option<Message>,
        edited_message: Option<Message>,
        channel_post: Option<Message>,
        callback_query: Option<Callback>,
    }
    let u: Update = serde_json::from_slice(payload).ok()?;
    let chat = |m: Option<Message>| m.and_then(|m| m.chat).map(|c| c.id);
    chat(u.message)
        .or_else(|| chat(u.edited_message))
        .or_else(|| chat(u.channel_post))
        .or_else(|| chat(u.callback_query.and_then(|c| c.message)))
}

/// How often delivered updates past the dedupe window are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(30);

/// Kicks every tenant with pending updates; runs every few seconds so no wake-up is lost. Also
/// the inbox's housekeeping: pruning past the dedupe window, scrubbing the registry's files.
pub async fn run_sweeper(app: Arc<App>) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_prune: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = app.shutdown().cancelled() => return,
            _ = tick.tick() => {}
        }
        // Delivered updates: their ids are forgotten after the dedupe window (their payloads
        // went at ack), and what acks and deletes freed is scrubbed from the registry's files.
        if last_prune.is_none_or(|t| t.elapsed() >= PRUNE_EVERY) {
            last_prune = Some(Instant::now());
            let window_ms = i64::try_from(app.settings().dedupe_window_s.saturating_mul(1000))
                .unwrap_or(i64::MAX);
            match app
                .registry()
                .inbox_prune(app.clock().now_ms().saturating_sub(window_ms))
                .await
            {
                Ok(0) => {}
                Ok(n) => tracing::debug!(
                    pruned = n,
                    "forgot delivered updates past the dedupe window"
                ),
                Err(e) => tracing::warn!(error = %e, "inbox prune failed"),
            }
        }
        if let Err(e) = app.registry().purge_freed().await {
            tracing::warn!(error = %e, "could not scrub the registry's files");
        }
        match app.registry().inbox_pending_tenants().await {
            Ok(tenants) => {
                let mut pending = 0i64;
                let mut oldest: Option<i64> = None;
                for t in &tenants {
                    pending += app.registry().inbox_depth(t).await.unwrap_or(0) as i64;
                    if let Ok(Some(head)) = app.registry().inbox_next(t).await {
                        oldest = Some(
                            oldest.map_or(head.accepted_at_ms, |o| o.min(head.accepted_at_ms)),
                        );
                    }
                    kick(&app, t);
                }
                app.metrics().inbox_pending.set(pending);
                let age = oldest.map_or(0.0, |o| (app.clock().now_ms() - o).max(0) as f64 / 1000.0);
                app.metrics().inbox_oldest_age_seconds.set(age);
            }
            Err(e) => tracing::warn!(error = %e, "inbox sweep failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chat_is_found_wherever_the_update_type_keeps_it() {
        let chat = |s: &str| chat_of(s.as_bytes());
        assert_eq!(
            chat(r#"{"update_id":1,"message":{"chat":{"id":7},"text":"hi"}}"#),
            Some(7)
        );
        assert_eq!(
            chat(r#"{"update_id":1,"edited_message":{"chat":{"id":-8}}}"#),
            Some(-8)
        );
        assert_eq!(
            chat(r#"{"update_id":1,"channel_post":{"chat":{"id":9}}}"#),
            Some(9)
        );
        assert_eq!(
            chat(r#"{"update_id":1,"callback_query":{"id":"x","message":{"chat":{"id":10}}}}"#),
            Some(10)
        );
        assert_eq!(chat(r#"{"update_id":1,"poll":{"id":"p"}}"#), None);
        assert_eq!(
            chat(r#"{"update_id":1,"message":{"text":"no chat"}}"#),
            None
        );
        assert_eq!(chat("not json"), None);
    }

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(RETRY.delay(1), Duration::from_millis(100));
        assert_eq!(RETRY.delay(2), Duration::from_millis(200));
        assert_eq!(RETRY.delay(4), Duration::from_millis(800));
        assert_eq!(RETRY.delay(30), MAX_BACKOFF);
    }
}
