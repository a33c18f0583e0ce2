//! The audit trail of admin writes and the named admin tokens, as the registry keeps them.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::Result;
use std::sync::atomic::{AtomicI64, Ordering};

/// One admin write (or failed sign-in): who, what, when, and how it ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Orders the trail: `at_ms * 1_000_000` plus a random part, so replicas need no counter;
    /// within one process ids only grow, so entries of the same millisecond keep their order.
    pub id: i64,
    pub at_ms: i64,
    /// The token's name (`admin` for the bootstrap token), or `unknown` for a token that did not
    /// authenticate; never the token itself.
    pub who: String,
    pub method: String,
    /// The route as the API names it (`/v1/tenants/{id}/wake`).
    pub route: String,
    pub tenant: Option<String>,
    /// The HTTP status of the answer.
    pub status: u16,
}

impl AuditEntry {
    /// A new entry at `at_ms` with a fresh id.
    pub fn new(
        at_ms: i64,
        who: &str,
        method: &str,
        route: &str,
        tenant: Option<&str>,
        status: u16,
    ) -> Self {
        let mut r = [0u8; 4];
        getrandom::fill(&mut r).expect("the system's random number generator");
        let random = i64::from(u32::from_le_bytes(r) % 1_000_000);
        AuditEntry {
            id: at_ms
                .max(0)
                .saturating_mul(1_000_000)
                .saturating_add(random),
            at_ms,
            who: who.to_owned(),
            method: method.to_owned(),
            route: route.to_owned(),
            tenant: tenant.map(str::to_owned),
            status,
        }
    }
}

/// A named admin token, stored as the SHA-256 of the token ([`crate::secret::digest`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminToken {
    pub name: String,
    pub digest: String,
    pub read_only: bool,
    pub created_at_ms: i64,
}

/// The audit trail and the named admin tokens.
///
/// Contract, for every backend:
/// - Writes are durable and atomic when they return `Ok`.
/// - [`AdminStore::audit_list`] is newest first (by id), only ids below `before` when given.
/// - [`AdminStore::token_create`] is [`crate::Error::AlreadyExists`] when the name is taken;
///   [`AdminStore::token_by_digest`] is a strongly consistent read, so a revoked token is
///   refused by every replica as soon as [`AdminStore::token_revoke`] returned.
/// - [`AdminStore::token_list`] is ordered by name.
#[async_trait]
pub trait AdminStore: Send + Sync + std::fmt::Debug + 'static {
    /// Appends one entry to the audit trail.
    async fn audit_append(&self, entry: &AuditEntry) -> Result<()>;
    /// At most `limit` entries, newest first, with ids below `before`.
    async fn audit_list(&self, limit: usize, before: Option<i64>) -> Result<Vec<AuditEntry>>;
    /// Stores a new named token.
    async fn token_create(&self, token: &AdminToken) -> Result<()>;
    /// The token whose digest this is.
    async fn token_by_digest(&self, digest: &str) -> Result<Option<AdminToken>>;
    /// Every named token, by name.
    async fn token_list(&self) -> Result<Vec<AdminToken>>;
    /// Deletes a token; false if there was none of that name.
    async fn token_revoke(&self, name: &str) -> Result<bool>;
}
