//! The inbox: accepted updates waiting for delivery, per tenant, in arrival order.

use crate::TenantId;
use serde::{Deserialize, Serialize};

/// The answer to an append.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Appended {
    /// Stored durably under this sequence number.
    Stored { seq: i64 },
    /// This `(tenant, update_id)` was accepted before; nothing was written.
    Duplicate,
}

/// One accepted update.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InboxItem {
    pub tenant: TenantId,
    /// Arrival order within the tenant's inbox.
    pub seq: i64,
    pub update_id: i64,
    /// The update as Telegram sent it (a JSON object).
    pub payload: Vec<u8>,
    /// Failed delivery attempts so far.
    pub attempts: u32,
    pub accepted_at_ms: i64,
    pub last_error: Option<String>,
}

/// The answer to a failed delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailOutcome {
    /// Stays at the head of the inbox; this many attempts failed so far.
    Retry { attempts: u32 },
    /// Moved to the dead-letter list; the next update is now at the head.
    DeadLettered,
}

/// A tenant's inbox as the admin API shows it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct InboxView {
    pub pending: Vec<InboxItem>,
    pub dead: Vec<InboxItem>,
}
