//! Per-tenant model budgets: requests per minute, and tokens per UTC day as the provider counts
//! them in the `usage` of its answers (streamed answers included).
//!
//! A request over either budget is answered 429 before anything goes upstream. Tokens are known
//! only once an answer is complete, so the request that crosses the day's budget is served and
//! the next one is refused.
//!
//! The counts live in this process's memory: they start again at zero when the server restarts,
//! and with several routers each counts the calls it proxies.

use otm_core::TenantId;
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const MINUTE: Duration = Duration::from_secs(60);

/// A tenant's budgets in force; `None` is no limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Budget {
    pub requests_per_minute: Option<u32>,
    pub tokens_per_day: Option<u64>,
}

pub use otm_core::admin_api::BudgetView;

/// Why a request was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Over {
    RequestsPerMinute { retry_after: Duration },
    TokensPerDay { retry_after: Duration },
}

impl Over {
    pub fn label(&self) -> &'static str {
        match self {
            Over::RequestsPerMinute { .. } => "budget_requests_per_minute",
            Over::TokensPerDay { .. } => "budget_tokens_per_day",
        }
    }

    pub fn retry_after(&self) -> Duration {
        match self {
            Over::RequestsPerMinute { retry_after } | Over::TokensPerDay { retry_after } => {
                *retry_after
            }
        }
    }
}

#[derive(Debug, Default)]
struct Usage {
    requests: VecDeque<Instant>,
    /// UTC day (days since the epoch) the token count is for.
    day: i64,
    tokens: u64,
}

impl Usage {
    fn roll(&mut self, now: Instant, day: i64) {
        while self.requests.front().is_some_and(|t| *t + MINUTE <= now) {
            self.requests.pop_front();
        }
        if self.day != day {
            self.day = day;
            self.tokens = 0;
        }
    }
}

/// The budgets of every tenant: one per process.
#[derive(Debug, Default)]
pub struct ModelBudgets {
    tenants: Mutex<HashMap<TenantId, Usage>>,
}

/// Today's UTC day number and the time left in it.
pub fn utc_day(now_ms: i64) -> (i64, Duration) {
    let day_ms = 86_400_000;
    let day = now_ms.div_euclid(day_ms);
    let left = day_ms - now_ms.rem_euclid(day_ms);
    (day, Duration::from_millis(left as u64))
}

impl ModelBudgets {
    /// Counts one request of `tenant`, or refuses it when it is over `budget`.
    pub fn admit(
        &self,
        tenant: &TenantId,
        budget: Budget,
        now: Instant,
        now_ms: i64,
    ) -> Result<(), Over> {
        let (day, day_left) = utc_day(now_ms);
        let mut all = self.tenants.lock().unwrap_or_else(|p| p.into_inner());
        let u = all.entry(tenant.clone()).or_default();
        u.roll(now, day);
        if let Some(max) = budget.tokens_per_day
            && u.tokens >= max
        {
            return Err(Over::TokensPerDay {
                retry_after: day_left,
            });
        }
        if let Some(max) = budget.requests_per_minute
            && u.requests.len() >= max as usize
        {
            let oldest = u.requests[u.requests.len() - max as usize];
            return Err(Over::RequestsPerMinute {
                retry_after: (oldest + MINUTE).saturating_duration_since(now),
            });
        }
        u.requests.push_back(now);
        // Keep no more than the budget needs.
        while u.requests.len() > budget.requests_per_minute.unwrap_or(0).max(1000) as usize {
            u.requests.pop_front();
        }
        Ok(())
    }

    /// Adds the tokens one answer used.
    pub fn record_tokens(&self, tenant: &TenantId, tokens: u64, now: Instant, now_ms: i64) {
        let (day, _) = utc_day(now_ms);
        let mut all = self.tenants.lock().unwrap_or_else(|p| p.into_inner());
        let u = all.entry(tenant.clone()).or_default();
        u.roll(now, day);
        u.tokens = u.tokens.saturating_add(tokens);
    }

    /// What `tenant` used, beside `budget`.
    pub fn view(&self, tenant: &TenantId, budget: Budget, now: Instant, now_ms: i64) -> BudgetView {
        let (day, _) = utc_day(now_ms);
        let mut all = self.tenants.lock().unwrap_or_else(|p| p.into_inner());
        let (requests, tokens) = match all.get_mut(tenant) {
            Some(u) => {
                u.roll(now, day);
                (u.requests.len() as u32, u.tokens)
            }
            None => (0, 0),
        };
        BudgetView {
            requests_per_minute: budget.requests_per_minute,
            tokens_per_day: budget.tokens_per_day,
            requests_last_minute: requests,
            tokens_today: tokens,
        }
    }

    /// Forgets a tenant (it was deleted).
    pub fn forget(&self, tenant: &TenantId) {
        self.tenants
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(tenant);
    }
}

/// The tokens an answer (or one streamed event) reports: `usage.total_tokens`, else the sum of
/// its input and output counts (`prompt_tokens` + `completion_tokens`, or `input_tokens` +
/// `output_tokens`); for the Responses API's events, the `usage` of their `response`.
pub fn usage_tokens(v: &serde_json::Value) -> Option<u64> {
    let usage = v
        .get("usage")
        .filter(|u| u.is_object())
        .or_else(|| v.get("response").and_then(|r| r.get("usage")))
        .filter(|u| u.is_object())?;
    if let Some(total) = usage.get("total_tokens").and_then(|t| t.as_u64()) {
        return Some(total);
    }
    let n = |k: &str| usage.get(k).and_then(|t| t.as_u64()).unwrap_or(0);
    Some(n("prompt_tokens") + n("completion_tokens") + n("input_tokens") + n("output_tokens"))
}

/// Reads the `usage` out of a server-sent event stream as it passes: fed the stream's bytes in
/// whatever pieces they come, it keeps at most one line (capped) and sums what `data:` lines
/// report.
#[derive(Debug, Default)]
pub struct SseUsage {
    line: Vec<u8>,
    overlong: bool,
    pub tokens: u64,
}

/// Longest `data:` line looked at; longer ones (no usage chunk is that long) are skipped.
const MAX_LINE: usize = 1 << 20;

impl SseUsage {
    pub fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' {
                if !self.overlong {
                    self.line_done();
                }
                self.line.clear();
                self.overlong = false;
            } else if self.line.len() < MAX_LINE {
                self.line.push(b);
            } else {
                self.overlong = true;
            }
        }
    }

    fn line_done(&mut self) {
        let line = self.line.strip_suffix(b"\r").unwrap_or(&self.line);
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        // Cheap test first: most chunks carry no usage.
        if !data.windows(7).any(|w| w == b"\"usage\"") {
            return;
        }
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data.trim_ascii())
            && let Some(t) = usage_tokens(&v)
        {
            self.tokens = self.tokens.saturating_add(t);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn t(s: &str) -> TenantId {
        TenantId::parse(s).unwrap()
    }

    #[test]
    fn requests_per_minute_refuses_then_recovers() {
        let b = ModelBudgets::default();
        let budget = Budget {
            requests_per_minute: Some(2),
            tokens_per_day: None,
        };
        let now = Instant::now();
        assert!(b.admit(&t("a"), budget, now, 0).is_ok());
        assert!(b.admit(&t("a"), budget, now, 0).is_ok());
        let over = b.admit(&t("a"), budget, now, 0).unwrap_err();
        assert_eq!(over.label(), "budget_requests_per_minute");
        assert!(over.retry_after() <= MINUTE);
        // Another tenant has its own budget.
        assert!(b.admit(&t("b"), budget, now, 0).is_ok());
        assert!(b.admit(&t("a"), budget, now + MINUTE, 0).is_ok());
    }

    #[test]
    fn tokens_per_day_count_until_midnight_utc() {
        let b = ModelBudgets::default();
        let budget = Budget {
            requests_per_minute: None,
            tokens_per_day: Some(30),
        };
        let now = Instant::now();
        let noon = 86_400_000 * 20_000 + 43_200_000;
        assert!(b.admit(&t("a"), budget, now, noon).is_ok());
        b.record_tokens(&t("a"), 18, now, noon);
        assert!(b.admit(&t("a"), budget, now, noon).is_ok());
        b.record_tokens(&t("a"), 18, now, noon);
        let over = b.admit(&t("a"), budget, now, noon).unwrap_err();
        assert_eq!(over.retry_after(), Duration::from_secs(12 * 3600));
        assert_eq!(b.view(&t("a"), budget, now, noon).tokens_today, 36);
        let tomorrow = noon + 86_400_000;
        assert!(b.admit(&t("a"), budget, now, tomorrow).is_ok());
        assert_eq!(b.view(&t("a"), budget, now, tomorrow).tokens_today, 0);
    }

    #[test]
    fn usage_is_read_from_answers_and_streams() {
        assert_eq!(
            usage_tokens(
                &json!({"usage": {"prompt_tokens": 10, "completion_tokens": 8, "total_tokens": 18}})
            ),
            Some(18)
        );
        assert_eq!(
            usage_tokens(
                &json!({"type": "response.completed", "response": {"usage": {"input_tokens": 3, "output_tokens": 4}}})
            ),
            Some(7)
        );
        assert_eq!(usage_tokens(&json!({"usage": null})), None);
        let stream = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n\
                      data: {\"choices\":[],\"usage\":{\"total_tokens\":18}}\r\n\r\n\
                      data: [DONE]\n\n";
        let mut u = SseUsage::default();
        for piece in stream.as_bytes().chunks(7) {
            u.feed(piece);
        }
        assert_eq!(u.tokens, 18);
    }
}
