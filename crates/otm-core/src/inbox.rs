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
    /// Why the last attempt failed, as [`DeliveryFailure::record`] wrote it; read it with
    /// [`InboxItem::failure`].
    pub last_error: Option<String>,
}

impl InboxItem {
    /// The kind of the last failure and its text; no kind for a text recorded without one.
    pub fn failure(&self) -> (Option<DeliveryFailure>, Option<&str>) {
        match self.last_error.as_deref() {
            None => (None, None),
            Some(text) => {
                let (kind, text) = DeliveryFailure::parse(text);
                (kind, Some(text))
            }
        }
    }
}

/// Why one delivery attempt failed. Kept in the inbox with the failure's text and counted in
/// `otm_delivery_failures_total{kind}` under its snake_case name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum DeliveryFailure {
    /// The tenant could not be woken.
    WakeFailed,
    /// The agent (or its shim, on its behalf) answered without acknowledging the update.
    AgentRefused,
    /// The shim could not be reached or broke off the call.
    ShimUnreachable,
    /// The shim did not answer within the delivery timeout.
    Timeout,
}

impl DeliveryFailure {
    pub const ALL: [DeliveryFailure; 4] = [
        DeliveryFailure::WakeFailed,
        DeliveryFailure::AgentRefused,
        DeliveryFailure::ShimUnreachable,
        DeliveryFailure::Timeout,
    ];

    /// The snake_case name used in answers and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryFailure::WakeFailed => "wake_failed",
            DeliveryFailure::AgentRefused => "agent_refused",
            DeliveryFailure::ShimUnreachable => "shim_unreachable",
            DeliveryFailure::Timeout => "timeout",
        }
    }

    /// The text stored as an update's last error: the kind's name, `: `, the message. Stored
    /// this way the kind needs no column of its own in any registry.
    pub fn record(self, message: &str) -> String {
        format!("{}: {message}", self.as_str())
    }

    /// Splits a stored last error into its kind and message; a text without a known kind (one
    /// recorded before kinds were) is returned whole.
    pub fn parse(stored: &str) -> (Option<Self>, &str) {
        Self::ALL
            .into_iter()
            .find_map(|k| {
                stored
                    .strip_prefix(k.as_str())
                    .and_then(|rest| rest.strip_prefix(": "))
                    .map(|rest| (Some(k), rest))
            })
            .unwrap_or((None, stored))
    }
}

impl std::fmt::Display for DeliveryFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What became of one delivery, as `otm_deliveries_total{outcome}` counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeliveryOutcome {
    /// The agent acknowledged it; it left the inbox.
    Acked,
    /// It failed and stays at the head of the inbox for another attempt.
    Failed,
    /// It failed for the last time and moved to the dead-letter list.
    DeadLettered,
    /// The dispatcher lost its lease during the attempt.
    FencedOut,
}

impl DeliveryOutcome {
    /// The snake_case name used as the metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryOutcome::Acked => "acked",
            DeliveryOutcome::Failed => "failed",
            DeliveryOutcome::DeadLettered => "dead_lettered",
            DeliveryOutcome::FencedOut => "fenced_out",
        }
    }
}

/// The answer to a failed delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailOutcome {
    /// Stays at the head of the inbox; this many attempts failed so far.
    Retry { attempts: u32 },
    /// Moved to the dead-letter list; the next update is now at the head.
    DeadLettered,
}

/// Which dead letters an operator retries or drops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeadLetters {
    /// The dead letter with this sequence number.
    One(i64),
    /// Every dead letter of the tenant.
    All,
}

/// A tenant's inbox as the admin API shows it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct InboxView {
    pub pending: Vec<InboxItem>,
    pub dead: Vec<InboxItem>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_kinds_round_trip_through_the_stored_text() {
        for k in DeliveryFailure::ALL {
            let stored = k.record("it broke: twice");
            assert_eq!(
                DeliveryFailure::parse(&stored),
                (Some(k), "it broke: twice")
            );
            assert_eq!(
                serde_json::to_value(k).unwrap(),
                serde_json::json!(k.as_str())
            );
        }
        assert_eq!(
            DeliveryFailure::parse("wake failed: no room"),
            (None, "wake failed: no room")
        );
        assert_eq!(DeliveryFailure::parse("timeout"), (None, "timeout"));
    }
}
