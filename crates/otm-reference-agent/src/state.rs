//! The reference agent's durable state: one JSON file, [`STATE_FILE_NAME`], in its state
//! directory.
//!
//! It holds per-chat message counts, the most recent [`SEEN_CAPACITY`] update ids, and the
//! pending replies: replies decided (numbered) but not yet confirmed sent. The server records a
//! new update and its pending reply durably *before* calling `sendMessage`, and drops the pending
//! entry after the call succeeds. So a redelivered update never gets a second number and a crash
//! never loses one; a crash between a successful send and the confirmation can only repeat the
//! same reply text.
//!
//! Writes are durable: a temporary file is written and fsynced, renamed over the state file, and
//! the directory is fsynced. A crash leaves either the old file or the new one.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::Error;

/// The state file's name inside the state directory.
pub const STATE_FILE_NAME: &str = "reference-agent.json";

/// How many recent update ids are remembered for deduplication.
pub const SEEN_CAPACITY: usize = 10_000;

/// The format version written into the file.
const VERSION: u32 = 1;

/// A reply decided for an update and not yet confirmed sent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingReply {
    pub chat_id: i64,
    pub text: String,
}

/// What the state knows about an update id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seen {
    /// Never seen (or seen so long ago that it was forgotten).
    New,
    /// Seen, and its reply is not confirmed sent yet.
    Pending(PendingReply),
    /// Seen and answered.
    Done,
}

/// Per-chat data.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Chat {
    /// Text messages this chat has sent, the current one included.
    count: u64,
}

/// The content of the state file.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct State {
    #[serde(default)]
    version: u32,
    #[serde(default)]
    chats: BTreeMap<i64, Chat>,
    /// Recently seen update ids, oldest first.
    #[serde(default)]
    seen: VecDeque<i64>,
    /// Pending replies by update id.
    #[serde(default)]
    pending: BTreeMap<i64, PendingReply>,
    /// Index of `seen`, rebuilt on load.
    #[serde(skip)]
    seen_index: HashSet<i64>,
}

impl State {
    /// What the state knows about `update_id`.
    pub fn lookup(&self, update_id: i64) -> Seen {
        if let Some(reply) = self.pending.get(&update_id) {
            Seen::Pending(reply.clone())
        } else if self.seen_index.contains(&update_id) {
            Seen::Done
        } else {
            Seen::New
        }
    }

    /// Records a new text message: counts it for its chat, remembers the update id and returns
    /// the reply, which stays pending until [`State::confirm`].
    pub fn record(&mut self, update_id: i64, chat_id: i64, text: &str) -> PendingReply {
        let chat = self.chats.entry(chat_id).or_default();
        chat.count += 1;
        let reply = PendingReply {
            chat_id,
            text: format!("#{}: {text}", chat.count),
        };
        if self.seen_index.insert(update_id) {
            self.seen.push_back(update_id);
            while self.seen.len() > SEEN_CAPACITY {
                if let Some(old) = self.seen.pop_front() {
                    self.seen_index.remove(&old);
                }
            }
        }
        self.pending.insert(update_id, reply.clone());
        reply
    }

    /// Marks the reply to `update_id` as sent.
    pub fn confirm(&mut self, update_id: i64) {
        self.pending.remove(&update_id);
    }

    /// How many text messages `chat_id` has sent.
    pub fn count(&self, chat_id: i64) -> u64 {
        self.chats.get(&chat_id).map_or(0, |c| c.count)
    }

    /// Replies not yet confirmed sent, by update id.
    pub fn pending(&self) -> &BTreeMap<i64, PendingReply> {
        &self.pending
    }

    fn from_json(bytes: &[u8]) -> serde_json::Result<State> {
        let mut state: State = serde_json::from_slice(bytes)?;
        state.seen_index = state.seen.iter().copied().collect();
        Ok(state)
    }
}

/// The state and the file it lives in.
#[derive(Debug)]
pub struct StateFile {
    dir: PathBuf,
    state: State,
}

impl StateFile {
    /// Opens the state in `dir`, creating the directory when missing. A missing file is an empty
    /// state; an unreadable or malformed one is an error (it is never overwritten silently).
    pub async fn open(dir: &Path) -> Result<StateFile, Error> {
        let dir = dir.to_owned();
        blocking(move || {
            fs::create_dir_all(&dir).map_err(|source| Error::StateIo {
                path: dir.clone(),
                source,
            })?;
            let path = dir.join(STATE_FILE_NAME);
            let state = match fs::read(&path) {
                Ok(bytes) => State::from_json(&bytes).map_err(|source| Error::StateCorrupt {
                    path: path.clone(),
                    source,
                })?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => State::default(),
                Err(source) => return Err(Error::StateIo { path, source }),
            };
            Ok(StateFile { dir, state })
        })
        .await
    }

    /// The path of the state file.
    pub fn path(&self) -> PathBuf {
        self.dir.join(STATE_FILE_NAME)
    }

    /// The state as last loaded or changed (not necessarily saved).
    pub fn state(&self) -> &State {
        &self.state
    }

    /// The state, for changing it; [`StateFile::save`] makes the change durable.
    pub fn state_mut(&mut self) -> &mut State {
        &mut self.state
    }

    /// Writes the state durably.
    pub async fn save(&mut self) -> Result<(), Error> {
        self.state.version = VERSION;
        let bytes = serde_json::to_vec(&self.state).expect("the state serializes to JSON");
        let dir = self.dir.clone();
        blocking(move || {
            write_durably(&dir, STATE_FILE_NAME, &bytes).map_err(|source| Error::StateIo {
                path: dir.join(STATE_FILE_NAME),
                source,
            })
        })
        .await
    }
}

/// Writes `dir/name` so that a crash leaves either the old content or the new one.
fn write_durably(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    fs::rename(&tmp, dir.join(name))?;
    // Make the rename itself durable.
    File::open(dir)?.sync_all()
}

/// Runs file work off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_chat_starting_at_one() {
        let mut state = State::default();
        assert_eq!(state.record(1, 10, "hello").text, "#1: hello");
        assert_eq!(state.record(2, 10, "again").text, "#2: again");
        assert_eq!(state.record(3, 20, "hi").text, "#1: hi");
        assert_eq!(state.count(10), 2);
        assert_eq!(state.count(20), 1);
        assert_eq!(state.count(30), 0);
    }

    #[test]
    fn an_update_is_pending_until_confirmed_then_done() {
        let mut state = State::default();
        assert_eq!(state.lookup(5), Seen::New);
        let reply = state.record(5, 1, "x");
        assert_eq!(state.lookup(5), Seen::Pending(reply));
        state.confirm(5);
        assert_eq!(state.lookup(5), Seen::Done);
        assert!(state.pending().is_empty());
    }

    #[test]
    fn only_the_most_recent_update_ids_are_remembered() {
        let mut state = State::default();
        for id in 0..=i64::try_from(SEEN_CAPACITY).unwrap() {
            state.record(id, 1, "x");
            state.confirm(id);
        }
        assert_eq!(state.seen.len(), SEEN_CAPACITY);
        assert_eq!(state.lookup(0), Seen::New);
        assert_eq!(state.lookup(1), Seen::Done);
        assert_eq!(
            state.lookup(i64::try_from(SEEN_CAPACITY).unwrap()),
            Seen::Done
        );
    }

    #[tokio::test]
    async fn saved_state_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let mut file = StateFile::open(dir.path()).await.unwrap();
        file.state_mut().record(1, 10, "a");
        file.state_mut().confirm(1);
        let pending = file.state_mut().record(2, 10, "b");
        file.save().await.unwrap();

        let reopened = StateFile::open(dir.path()).await.unwrap();
        assert_eq!(reopened.state().count(10), 2);
        assert_eq!(reopened.state().lookup(1), Seen::Done);
        assert_eq!(reopened.state().lookup(2), Seen::Pending(pending));
        // Only the state file is left behind, no temporary file.
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, [STATE_FILE_NAME]);
    }

    #[tokio::test]
    async fn a_missing_directory_is_created_and_a_corrupt_file_refused() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b");
        let file = StateFile::open(&nested).await.unwrap();
        assert_eq!(file.state().count(1), 0);
        assert!(nested.is_dir());

        fs::write(nested.join(STATE_FILE_NAME), b"{not json").unwrap();
        let err = StateFile::open(&nested).await.unwrap_err();
        assert!(matches!(err, Error::StateCorrupt { .. }), "{err}");
    }
}
