//! Black-box tests: the reference agent served in-process on port 0, talking to the fake
//! Telegram Bot API from `otm-testkit`.

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use otm_reference_agent::{Config, Error, ReferenceAgent, STATE_FILE_NAME};
use otm_testkit::{FakeTelegram, SentMessage, text_update};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const TOKEN: &str = "4242:surrogate-token-do-not-log";
const SECRET: &str = "webhook-secret-do-not-log";
const WAIT: Duration = Duration::from_secs(10);

/// One agent running in-process.
struct Agent {
    base: String,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), Error>>,
    http: reqwest::Client,
}

fn config(root: &str, state_dir: &Path) -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        state_dir: state_dir.to_owned(),
        bot_api_root: root.to_owned(),
        bot_token: TOKEN.to_owned(),
        webhook_secret: SECRET.to_owned(),
        probes: false,
        allowed: otm_reference_agent::config::Allowed::Anyone,
    }
}

impl Agent {
    async fn start(root: &str, state_dir: &Path) -> Agent {
        Self::start_with(config(root, state_dir)).await
    }

    async fn start_with(config: Config) -> Agent {
        let agent = ReferenceAgent::bind(config).await.unwrap();
        let base = format!("http://{}", agent.local_addr());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(agent.run(async {
            let _ = stopped.await;
        }));
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        Agent {
            base,
            stop,
            task,
            http,
        }
    }

    /// Delivers `update` with the right secret; returns the status.
    async fn deliver(&self, update: &Value) -> u16 {
        self.deliver_with(update, Some(SECRET)).await
    }

    async fn deliver_with(&self, update: &Value, secret: Option<&str>) -> u16 {
        let mut request = self
            .http
            .post(format!("{}/webhook", self.base))
            .json(update);
        if let Some(secret) = secret {
            request = request.header("X-Telegram-Bot-Api-Secret-Token", secret);
        }
        request.send().await.unwrap().status().as_u16()
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("agent stops in time")
            .unwrap()
            .expect("agent stops cleanly");
    }
}

async fn fake() -> FakeTelegram {
    let fake = FakeTelegram::start().await;
    fake.add_bot(TOKEN);
    fake
}

fn msg(chat_id: i64, text: &str) -> SentMessage {
    SentMessage {
        chat_id,
        text: text.to_owned(),
    }
}

#[tokio::test]
async fn healthz_answers_ok() {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&fake.url(), dir.path()).await;
    let response = agent
        .http
        .get(format!("{}/healthz", agent.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "ok");
    agent.stop().await;
}

#[tokio::test]
async fn numbers_text_messages_per_chat() {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&fake.url(), dir.path()).await;

    assert_eq!(agent.deliver(&text_update(1, 100, "hello")).await, 200);
    assert_eq!(agent.deliver(&text_update(2, 100, "again")).await, 200);
    assert_eq!(agent.deliver(&text_update(3, 200, "hi")).await, 200);
    assert_eq!(agent.deliver(&text_update(4, 100, "third")).await, 200);

    assert_eq!(
        fake.sent_messages(TOKEN),
        [
            msg(100, "#1: hello"),
            msg(100, "#2: again"),
            msg(200, "#1: hi"),
            msg(100, "#3: third")
        ]
    );
    let sends: Vec<_> = fake
        .calls()
        .into_iter()
        .filter(|c| c.method == "sendMessage")
        .collect();
    assert_eq!(
        sends[0].params,
        json!({"chat_id": 100, "text": "#1: hello"})
    );
    agent.stop().await;
}

#[tokio::test]
async fn only_allowed_users_are_answered() {
    use otm_reference_agent::config::Allowed;
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&fake.url(), dir.path());
    cfg.allowed = Allowed::parse(Some("100, 300")).unwrap();
    let agent = Agent::start_with(cfg).await;
    assert_eq!(agent.deliver(&text_update(1, 200, "stranger")).await, 200);
    assert_eq!(agent.deliver(&text_update(2, 100, "owner")).await, 200);
    assert_eq!(
        fake.sent_messages(TOKEN),
        [msg(100, "#1: owner")],
        "a user who is not allowed is acknowledged, neither counted nor answered"
    );
    agent.stop().await;

    assert_eq!(Allowed::parse(None).unwrap(), Allowed::Anyone);
    assert_eq!(Allowed::parse(Some("*")).unwrap(), Allowed::Anyone);
    assert_eq!(Allowed::parse(Some("")).unwrap(), Allowed::Users(vec![]));
    assert!(
        !Allowed::parse(Some("")).unwrap().allows(100),
        "empty: nobody"
    );
    assert!(Allowed::parse(Some("bob")).is_err());
}

#[tokio::test]
async fn a_redelivered_update_is_answered_once() {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&fake.url(), dir.path()).await;

    let update = text_update(10, 7, "once");
    assert_eq!(agent.deliver(&update).await, 200);
    assert_eq!(agent.deliver(&update).await, 200);
    assert_eq!(agent.deliver(&update).await, 200);
    assert_eq!(agent.deliver(&text_update(11, 7, "next")).await, 200);

    assert_eq!(
        fake.sent_messages(TOKEN),
        [msg(7, "#1: once"), msg(7, "#2: next")]
    );
    agent.stop().await;
}

#[tokio::test]
async fn a_wrong_or_missing_secret_is_refused_and_counts_nothing() {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&fake.url(), dir.path()).await;

    let update = text_update(1, 5, "hello");
    assert_eq!(agent.deliver_with(&update, None).await, 401);
    assert_eq!(agent.deliver_with(&update, Some("wrong")).await, 401);
    assert_eq!(agent.deliver_with(&update, Some("")).await, 401);
    assert!(fake.calls().is_empty());

    // The refused deliveries left no trace: the same update is new.
    assert_eq!(agent.deliver(&update).await, 200);
    assert_eq!(fake.sent_messages(TOKEN), [msg(5, "#1: hello")]);
    agent.stop().await;
}

#[tokio::test]
async fn other_updates_are_acknowledged_and_ignored() {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&fake.url(), dir.path()).await;

    let mut sticker = text_update(1, 5, "");
    sticker["message"].as_object_mut().unwrap().remove("text");
    sticker["message"]["sticker"] = json!({"file_id": "abc"});
    let edited = json!({"update_id": 2, "edited_message": text_update(2, 5, "x")["message"]});
    let callback = json!({"update_id": 3, "callback_query": {"id": "q", "data": "d"}});
    for update in [sticker, edited, callback] {
        assert_eq!(agent.deliver(&update).await, 200, "{update}");
    }
    assert!(fake.calls().is_empty());

    assert_eq!(agent.deliver(&text_update(4, 5, "text")).await, 200);
    assert_eq!(fake.sent_messages(TOKEN), [msg(5, "#1: text")]);
    agent.stop().await;
}

#[tokio::test]
async fn a_body_that_is_no_update_is_a_bad_request() {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&fake.url(), dir.path()).await;
    assert_eq!(
        agent.deliver(&json!({"message": {"text": "no id"}})).await,
        400
    );
    let response = agent
        .http
        .post(format!("{}/webhook", agent.base))
        .header("X-Telegram-Bot-Api-Secret-Token", SECRET)
        .body("not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert!(fake.calls().is_empty());
    agent.stop().await;
}

#[tokio::test]
async fn state_survives_a_restart() {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();

    let agent = Agent::start(&fake.url(), dir.path()).await;
    assert_eq!(agent.deliver(&text_update(1, 100, "a")).await, 200);
    assert_eq!(agent.deliver(&text_update(2, 100, "b")).await, 200);
    agent.stop().await;
    assert!(dir.path().join(STATE_FILE_NAME).is_file());

    let agent = Agent::start(&fake.url(), dir.path()).await;
    // An update delivered before the restart is still known...
    assert_eq!(agent.deliver(&text_update(2, 100, "b")).await, 200);
    // ...and the count continues.
    assert_eq!(agent.deliver(&text_update(3, 100, "c")).await, 200);
    agent.stop().await;

    assert_eq!(
        fake.sent_messages(TOKEN),
        [msg(100, "#1: a"), msg(100, "#2: b"), msg(100, "#3: c")]
    );
}

#[tokio::test]
async fn a_failed_send_is_retried_with_the_same_number() {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&fake.url(), dir.path()).await;

    fake.fail_next_send(2);
    let update = text_update(1, 9, "hello");
    assert_eq!(agent.deliver(&update).await, 502);
    assert_eq!(agent.deliver(&update).await, 502);
    assert!(fake.sent_messages(TOKEN).is_empty());
    assert_eq!(agent.deliver(&update).await, 200);
    assert_eq!(agent.deliver(&update).await, 200);
    assert_eq!(agent.deliver(&text_update(2, 9, "next")).await, 200);

    assert_eq!(
        fake.sent_messages(TOKEN),
        [msg(9, "#1: hello"), msg(9, "#2: next")]
    );
    // Three attempts for the first reply, one for the second; none for the duplicate.
    let texts: Vec<Value> = fake
        .calls()
        .into_iter()
        .filter(|c| c.method == "sendMessage")
        .map(|c| c.params["text"].clone())
        .collect();
    assert_eq!(
        texts,
        [
            json!("#1: hello"),
            json!("#1: hello"),
            json!("#1: hello"),
            json!("#2: next")
        ]
    );
    agent.stop().await;
}

#[tokio::test]
async fn a_pending_reply_survives_a_restart() {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();

    let agent = Agent::start(&fake.url(), dir.path()).await;
    fake.fail_next_send(1);
    let update = text_update(1, 9, "hello");
    assert_eq!(agent.deliver(&update).await, 502);
    agent.stop().await;

    let state: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join(STATE_FILE_NAME)).unwrap()).unwrap();
    assert_eq!(
        state["pending"]["1"],
        json!({"chat_id": 9, "text": "#1: hello"})
    );

    let agent = Agent::start(&fake.url(), dir.path()).await;
    assert_eq!(agent.deliver(&update).await, 200);
    assert_eq!(agent.deliver(&text_update(2, 9, "next")).await, 200);
    agent.stop().await;

    assert_eq!(
        fake.sent_messages(TOKEN),
        [msg(9, "#1: hello"), msg(9, "#2: next")]
    );
    let state: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join(STATE_FILE_NAME)).unwrap()).unwrap();
    assert_eq!(state["pending"], json!({}));
}

#[tokio::test]
async fn concurrent_deliveries_get_distinct_numbers() {
    let fake = fake().await;
    fake.set_send_delay(Duration::from_millis(5));
    let dir = tempfile::tempdir().unwrap();
    let agent = Arc::new(Agent::start(&fake.url(), dir.path()).await);

    let deliveries: Vec<_> = (1..=20)
        .map(|id| {
            let agent = agent.clone();
            tokio::spawn(async move { agent.deliver(&text_update(id, 3, "x")).await })
        })
        .collect();
    for delivery in deliveries {
        assert_eq!(delivery.await.unwrap(), 200);
    }
    let mut texts: Vec<String> = fake
        .sent_messages(TOKEN)
        .into_iter()
        .map(|m| m.text)
        .collect();
    texts.sort_by_key(|t| t[1..t.find(':').unwrap()].parse::<u32>().unwrap());
    let expected: Vec<String> = (1..=20).map(|n| format!("#{n}: x")).collect();
    assert_eq!(texts, expected);
    Arc::into_inner(agent).unwrap().stop().await;
}

#[tokio::test]
async fn a_corrupt_state_file_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(STATE_FILE_NAME), b"{\"chats\": 7}").unwrap();
    let err = ReferenceAgent::bind(config("http://127.0.0.1:9", dir.path()))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::StateCorrupt { .. }), "{err}");
    assert!(err.to_string().contains(STATE_FILE_NAME), "{err}");
}

/// A log sink shared with the test.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// The default (current-thread) test runtime polls the agent's tasks on this thread, so the
// thread-local subscriber sees all of their logs.
#[tokio::test]
async fn no_log_line_contains_the_token_or_the_secret() {
    let logs = Logs::default();
    let sink = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&fake.url(), dir.path()).await;
    assert_eq!(agent.deliver(&text_update(1, 1, "ok")).await, 200);
    assert_eq!(
        agent
            .deliver_with(&text_update(2, 1, "x"), Some("wrong"))
            .await,
        401
    );
    fake.fail_next_send(1);
    assert_eq!(agent.deliver(&text_update(3, 1, "refused")).await, 502);
    agent.stop().await;

    // An unreachable Bot API: transport errors carry the URL unless it is stripped.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let root = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let agent = Agent::start(&root, dir.path()).await;
    assert_eq!(agent.deliver(&text_update(4, 1, "unreachable")).await, 502);
    agent.stop().await;

    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("sendMessage failed"),
        "the failures were logged:\n{logs}"
    );
    assert!(
        logs.contains("secret token"),
        "the refusal was logged:\n{logs}"
    );
    assert!(
        !logs.contains("surrogate-token-do-not-log"),
        "token in logs:\n{logs}"
    );
    assert!(
        !logs.contains("webhook-secret-do-not-log"),
        "secret in logs:\n{logs}"
    );
}
