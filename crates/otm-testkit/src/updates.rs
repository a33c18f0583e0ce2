//! Builders for Telegram updates as the Bot API delivers them to a webhook.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

/// A private-chat text message update, shaped like the ones Telegram sends.
///
/// The sender is the chat's own user (in a private chat the chat id is the user id); the
/// `message_id` is the `update_id`. A text starting with `/` carries a `bot_command` entity for its
/// first word, as Telegram adds one.
pub fn text_update(update_id: i64, chat_id: i64, text: &str) -> Value {
    let username = format!("user{}", chat_id.unsigned_abs());
    let mut message = json!({
        "message_id": update_id,
        "from": {
            "id": chat_id,
            "is_bot": false,
            "first_name": "Test",
            "username": username,
            "language_code": "en",
        },
        "chat": {
            "id": chat_id,
            "first_name": "Test",
            "username": username,
            "type": "private",
        },
        "date": unix_now(),
        "text": text,
    });
    if text.starts_with('/') {
        let command = text.split_whitespace().next().unwrap_or(text);
        // Telegram measures entities in UTF-16 code units.
        let length = command.encode_utf16().count();
        message["entities"] = json!([{ "offset": 0, "length": length, "type": "bot_command" }]);
    }
    json!({ "update_id": update_id, "message": message })
}

/// Seconds since the Unix epoch, as Telegram's `date` fields carry them.
pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_update_has_the_fields_an_agent_reads() {
        let update = text_update(7, 42, "hello");
        assert_eq!(update["update_id"], 7);
        assert_eq!(update["message"]["message_id"], 7);
        assert_eq!(update["message"]["chat"]["id"], 42);
        assert_eq!(update["message"]["chat"]["type"], "private");
        assert_eq!(update["message"]["from"]["id"], 42);
        assert_eq!(update["message"]["from"]["is_bot"], false);
        assert_eq!(update["message"]["text"], "hello");
        assert!(update["message"]["date"].as_i64().unwrap() > 1_600_000_000);
        assert!(update["message"].get("entities").is_none());
    }

    #[test]
    fn commands_carry_a_bot_command_entity() {
        let update = text_update(1, 5, "/start now");
        assert_eq!(
            update["message"]["entities"],
            json!([{ "offset": 0, "length": 6, "type": "bot_command" }])
        );
    }
}
