//! Per-bot rate limits of the Bot API proxy, as Telegram applies them: about 30 messages a
//! second per bot, one a second per chat, 20 a minute per group chat; and a bot that Telegram
//! answered with 429 waits the `retry_after` it was given.
//!
//! A call is not failed when it is over a limit: it gets the next free slot (in order of
//! arrival, so one chat's messages keep their order) and waits for it. Only a call whose slot
//! is further away than [`BotLimits::max_wait`] is answered at once with Telegram's own 429 and
//! a `retry_after`. Slots are reserved under one lock and the waiting happens outside it.
//!
//! State lives in this process's memory: with several routers, each applies the limits to the
//! calls it proxies (agents of one tenant call one egress listener).

use otm_core::TenantId;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The limits applied to every bot.
#[derive(Clone, Copy, Debug)]
pub struct BotLimits {
    /// Least time between two messages of one bot (1/30 s).
    pub per_bot: Duration,
    /// Least time between two messages to one chat.
    pub per_chat: Duration,
    /// Messages to one group chat in any minute.
    pub group_per_minute: usize,
    /// The longest a call waits for its slot before it is refused.
    pub max_wait: Duration,
}

impl BotLimits {
    /// The limits the settings ask for; 0 turns a limit off.
    pub fn from_settings(s: &crate::config::Settings) -> Self {
        BotLimits {
            per_bot: match s.bot_messages_per_second {
                0 => Duration::ZERO,
                n => Duration::from_micros(1_000_000 / u64::from(n)),
            },
            per_chat: Duration::from_millis(s.bot_chat_interval_ms),
            group_per_minute: match s.bot_group_messages_per_minute {
                0 => usize::MAX,
                n => n as usize,
            },
            ..Default::default()
        }
    }
}

impl Default for BotLimits {
    fn default() -> Self {
        BotLimits {
            per_bot: Duration::from_micros(1_000_000 / 30),
            per_chat: Duration::from_secs(1),
            group_per_minute: 20,
            max_wait: Duration::from_secs(30),
        }
    }
}

/// What a call has to do.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    /// Wait until then, then go.
    At(Instant),
    /// Refused: the next slot is more than `max_wait` away; try again after this long.
    Refused { retry_after: Duration },
}

#[derive(Debug, Default)]
struct Bot {
    next_message: Option<Instant>,
    /// Set from an upstream 429: nothing of this bot goes out before.
    blocked_until: Option<Instant>,
    chats: HashMap<String, Chat>,
    /// The size past which `chats` is next pruned: twice what the last pruning kept, so that a
    /// bot writing to many chats a minute prunes now and then, not at every message.
    prune_above: usize,
}

/// Chats a bot keeps before quiet ones are forgotten.
const MIN_PRUNE_ABOVE: usize = 64;

#[derive(Debug, Default)]
struct Chat {
    next: Option<Instant>,
    /// Slots given to messages to this group in the last minute (and ahead).
    group_slots: VecDeque<Instant>,
}

/// The limiter: one per process.
#[derive(Debug, Default)]
pub struct BotLimiter {
    limits: BotLimits,
    bots: Mutex<HashMap<TenantId, Bot>>,
}

/// True for methods Telegram counts as messages: `send*` (but not `sendChatAction`, which only
/// shows "typing"), `forwardMessage(s)` and `copyMessage(s)`. Case-insensitive, as the Bot API.
pub fn is_message(method: &str) -> bool {
    let m = method.to_ascii_lowercase();
    (m.starts_with("send") && m != "sendchataction")
        || matches!(
            m.as_str(),
            "forwardmessage" | "forwardmessages" | "copymessage" | "copymessages"
        )
}

/// True for a group or channel chat id: a negative number (`-100…` for supergroups and
/// channels) or an `@username`.
pub fn is_group(chat: &str) -> bool {
    chat.starts_with('-') || chat.starts_with('@')
}

impl BotLimiter {
    pub fn new(limits: BotLimits) -> Self {
        BotLimiter {
            limits,
            bots: Mutex::new(HashMap::new()),
        }
    }

    pub fn limits(&self) -> BotLimits {
        self.limits
    }

    /// Reserves the slot of one call of `bot`: a message (to `chat` when known) or, with
    /// `message` false, any other call, which only waits out a 429.
    pub fn admit(
        &self,
        bot: &TenantId,
        message: bool,
        chat: Option<&str>,
        now: Instant,
    ) -> Admission {
        let l = self.limits;
        let mut bots = self.bots.lock().unwrap_or_else(|p| p.into_inner());
        let b = bots.entry(bot.clone()).or_default();
        let mut slot = now;
        if let Some(until) = b.blocked_until {
            slot = slot.max(until);
        }
        if !message {
            return self.decide(slot, now);
        }
        if let Some(next) = b.next_message {
            slot = slot.max(next);
        }
        let minute = Duration::from_secs(60);
        // Forget chats that have been quiet for a minute, so the map stays within twice the
        // chats of the last minute.
        if b.chats.len() > b.prune_above.max(MIN_PRUNE_ABOVE) {
            b.chats.retain(|_, c| {
                c.next.is_some_and(|n| n + minute > now)
                    || c.group_slots.back().is_some_and(|s| *s + minute > now)
            });
            b.prune_above = b.chats.len().saturating_mul(2);
        }
        if let Some(chat) = chat {
            let c = b.chats.entry(chat.to_owned()).or_default();
            while c.group_slots.front().is_some_and(|s| *s + minute <= now) {
                c.group_slots.pop_front();
            }
            if let Some(next) = c.next {
                slot = slot.max(next);
            }
            if is_group(chat) && c.group_slots.len() >= l.group_per_minute {
                let nth = c.group_slots[c.group_slots.len() - l.group_per_minute];
                slot = slot.max(nth + minute);
            }
        }
        if let Admission::Refused { retry_after } = self.decide(slot, now) {
            return Admission::Refused { retry_after };
        }
        b.next_message = Some(slot + l.per_bot);
        if let Some(chat) = chat {
            let c = b.chats.entry(chat.to_owned()).or_default();
            c.next = Some(slot + l.per_chat);
            if is_group(chat) {
                c.group_slots.push_back(slot);
            }
        }
        Admission::At(slot)
    }

    fn decide(&self, slot: Instant, now: Instant) -> Admission {
        let wait = slot.saturating_duration_since(now);
        if wait > self.limits.max_wait {
            // Telegram gives whole seconds.
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            Admission::Refused {
                retry_after: Duration::from_secs(secs.max(1)),
            }
        } else {
            Admission::At(slot)
        }
    }

    /// Telegram answered a call of `bot` with 429 and `retry_after`: nothing of it goes out
    /// before then.
    pub fn blocked(&self, bot: &TenantId, retry_after: Duration, now: Instant) {
        let mut bots = self.bots.lock().unwrap_or_else(|p| p.into_inner());
        let b = bots.entry(bot.clone()).or_default();
        let until = now + retry_after;
        b.blocked_until = Some(b.blocked_until.map_or(until, |u| u.max(until)));
    }

    /// Forgets a bot (its tenant was deleted).
    pub fn forget(&self, bot: &TenantId) {
        self.bots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(bot);
    }
}

/// The `chat_id` of a call: from a JSON or form body, else from the query string.
pub fn chat_id(content_type: Option<&str>, body: &[u8], query: Option<&str>) -> Option<String> {
    let ct = content_type.unwrap_or_default().to_ascii_lowercase();
    let from_body = if ct.starts_with("application/json") || body.first() == Some(&b'{') {
        serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| match v.get("chat_id")? {
                serde_json::Value::Number(n) => Some(n.to_string()),
                serde_json::Value::String(s) => Some(s.trim().to_owned()),
                _ => None,
            })
    } else if ct.starts_with("application/x-www-form-urlencoded") {
        form_value(body, "chat_id")
    } else {
        None
    };
    from_body
        .or_else(|| query.and_then(|q| form_value(q.as_bytes(), "chat_id")))
        .filter(|c| !c.is_empty() && c.len() <= 64)
}

/// The value of `key` in `application/x-www-form-urlencoded` data.
fn form_value(data: &[u8], key: &str) -> Option<String> {
    data.split(|b| *b == b'&').find_map(|pair| {
        let (k, v) = match pair.iter().position(|b| *b == b'=') {
            Some(i) => (&pair[..i], &pair[i + 1..]),
            None => (pair, &pair[..0]),
        };
        (decode_form(k) == key).then(|| decode_form(v))
    })
}

fn decode_form(s: &[u8]) -> String {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < s.len() => {
                let h = std::str::from_utf8(&s[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match h {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t() -> TenantId {
        TenantId::parse("t").unwrap()
    }

    #[test]
    fn one_chat_gets_a_message_a_second_in_order() {
        let l = BotLimiter::new(BotLimits::default());
        let now = Instant::now();
        let slots: Vec<_> = (0..3)
            .map(|_| match l.admit(&t(), true, Some("42"), now) {
                Admission::At(s) => s,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(slots[0], now);
        assert_eq!(slots[1], now + Duration::from_secs(1));
        assert_eq!(slots[2], now + Duration::from_secs(2));
        // Another chat is only held by the bot's own pace.
        assert_eq!(
            l.admit(&t(), true, Some("43"), now),
            Admission::At(now + Duration::from_secs(2) + BotLimits::default().per_bot)
        );
        // Calls that are not messages do not wait.
        assert_eq!(l.admit(&t(), false, None, now), Admission::At(now));
    }

    fn chats(l: &BotLimiter) -> usize {
        l.bots
            .lock()
            .unwrap()
            .get(&t())
            .map_or(0, |b| b.chats.len())
    }

    /// Quiet chats are forgotten once the map outgrows twice what the last pruning kept; a bot
    /// busy in a thousand chats does not scan them all at every message.
    #[test]
    fn quiet_chats_are_forgotten_now_and_then() {
        let l = BotLimiter::new(BotLimits {
            per_bot: Duration::ZERO,
            ..Default::default()
        });
        let now = Instant::now();
        for chat in 0..1000 {
            assert_eq!(
                l.admit(&t(), true, Some(&chat.to_string()), now),
                Admission::At(now)
            );
        }
        assert_eq!(chats(&l), 1000, "every chat of the last minute is kept");
        let prune_above = l.bots.lock().unwrap()[&t()].prune_above;
        assert!(
            (1000..2000).contains(&prune_above),
            "pruned a few times on the way, not at every message: {prune_above}"
        );
        // A minute later, new chats: the quiet ones go at the next pruning.
        let later = now + Duration::from_secs(61);
        for chat in 1000..1100 {
            l.admit(&t(), true, Some(&chat.to_string()), later);
        }
        assert!(chats(&l) <= 100, "{} chats kept", chats(&l));
        assert_eq!(
            l.admit(&t(), true, Some("1099"), later),
            Admission::At(later + Duration::from_secs(1)),
            "a recent chat is still paced"
        );
    }

    #[test]
    fn a_bot_sends_at_most_thirty_a_second() {
        let l = BotLimiter::new(BotLimits::default());
        let now = Instant::now();
        let mut last = now;
        for i in 0..61 {
            match l.admit(&t(), true, Some(&i.to_string()), now) {
                Admission::At(s) => last = s,
                other => panic!("{other:?}"),
            }
        }
        assert!(
            last >= now + Duration::from_millis(1990),
            "{:?}",
            last - now
        );
    }

    #[test]
    fn groups_get_twenty_a_minute_and_a_far_slot_is_refused() {
        let l = BotLimiter::new(BotLimits::default());
        let now = Instant::now();
        for _ in 0..20 {
            assert!(matches!(
                l.admit(&t(), true, Some("-100123"), now),
                Admission::At(_)
            ));
        }
        // The 21st would have to wait for the first one's minute to pass: beyond max_wait.
        match l.admit(&t(), true, Some("-100123"), now) {
            Admission::Refused { retry_after } => {
                assert!(retry_after >= Duration::from_secs(31), "{retry_after:?}")
            }
            other => panic!("{other:?}"),
        }
        // A minute later there is room again.
        let later = now + Duration::from_secs(61);
        assert!(matches!(
            l.admit(&t(), true, Some("-100123"), later),
            Admission::At(_)
        ));
    }

    #[test]
    fn retry_after_holds_every_call_of_the_bot() {
        let l = BotLimiter::new(BotLimits::default());
        let now = Instant::now();
        l.blocked(&t(), Duration::from_secs(5), now);
        assert_eq!(
            l.admit(&t(), false, None, now),
            Admission::At(now + Duration::from_secs(5))
        );
        assert_eq!(
            l.admit(&t(), true, Some("1"), now),
            Admission::At(now + Duration::from_secs(5))
        );
        l.blocked(&t(), Duration::from_secs(100), now);
        assert_eq!(
            l.admit(&t(), false, None, now),
            Admission::Refused {
                retry_after: Duration::from_secs(100)
            }
        );
        // Another bot is not held.
        let other = TenantId::parse("u").unwrap();
        assert_eq!(l.admit(&other, true, Some("1"), now), Admission::At(now));
    }

    #[test]
    fn chat_ids_come_from_json_form_or_query() {
        assert_eq!(
            chat_id(
                Some("application/json"),
                br#"{"chat_id": -42, "text": "x"}"#,
                None
            ),
            Some("-42".into())
        );
        assert_eq!(
            chat_id(
                Some("application/json; charset=utf-8"),
                br#"{"chat_id": "@chan"}"#,
                None
            ),
            Some("@chan".into())
        );
        assert_eq!(
            chat_id(
                Some("application/x-www-form-urlencoded"),
                b"text=a%20b&chat_id=%2D7",
                None
            ),
            Some("-7".into())
        );
        assert_eq!(
            chat_id(None, b"", Some("chat_id=9&text=x")),
            Some("9".into())
        );
        assert_eq!(chat_id(None, b"", None), None);
        assert!(is_message("sendMessage") && is_message("SENDPHOTO") && is_message("copyMessage"));
        assert!(!is_message("sendChatAction") && !is_message("getMe"));
    }
}
