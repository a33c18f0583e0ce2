//! Secrets at rest: the server's key file, an AEAD for tenants' secrets, derived shim tokens and
//! signed endpoint-cache entries, and the two wrappers that apply them to any backend:
//! [`SealedRegistry`] and [`SignedCoordinator`].
//!
//! # The key file
//! A text file, mode 0600, one key a line: `<id> <base64 of 32 bytes>`. The id `mac` is the
//! signing key: shim tokens are derived from it (HMAC-SHA256 of the instance id) and endpoint
//! cache entries are signed with it; it is never rotated by otm, because running instances hold
//! tokens derived from it. Every other line is an encryption key; the last one listed encrypts
//! new values, and every one listed decrypts. Lines starting with `#` are comments.
//!
//! # The ciphertext
//! `v1:<key id>:<base64 of nonce || ciphertext || tag>`: ChaCha20-Poly1305 (aws-lc-rs, the
//! cryptography rustls already uses here), a random 96-bit nonce per value, and associated data
//! naming the tenant and the field, so a value moved to another tenant or another field does not
//! decrypt. A stored value without the `v1:` prefix is a plaintext from before encryption: it is
//! still read, and written back encrypted by the next write or by [`rotate`].

use async_trait::async_trait;
use aws_lc_rs::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::hmac;
use futures::stream::BoxStream;
use otm_core::instance::Endpoint;
use otm_core::{
    Appended, Coordinator, DeadLetters, Error, FailOutcome, FleetSettings, Inbox, InboxItem,
    InboxView, InstanceId, InstanceRecord, InstanceStore, Lease, Notification, Registry, Result,
    Secret, Tenant, TenantId, TenantStatus, TenantStore,
};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// The prefix of every value this module encrypts.
const FORMAT: &str = "v1";
/// The id of the signing key in the key file.
const MAC_ID: &str = "mac";
/// What a registry stores in place of a derived shim token.
pub const DERIVED_SHIM_TOKEN: &str = "derived";
const KEY_LEN: usize = 32;

/// Why a stored secret could not be read. Never carries the value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum SealError {
    /// The value names a key that is not in the key file.
    #[error(
        "it was encrypted with key `{key}`, which is not in the secret key file; restore that key's line \
         (keys are retired only after `otm secrets rotate` has re-encrypted every value)"
    )]
    UnknownKey { key: String },
    /// Decryption failed: another key under the same id, another tenant or field, or tampering.
    #[error(
        "it does not decrypt under key `{key}`: the key file holds a different key under that id, or the \
         value was altered or copied from another tenant"
    )]
    Refused { key: String },
    /// Not a value this module wrote.
    #[error("it is not in the `v1:<key id>:<base64>` form ({reason})")]
    Malformed { reason: &'static str },
}

/// A problem with the key file; the message names the file and what to do.
#[derive(Debug, thiserror::Error)]
#[error("secret key file {path}: {message}")]
pub struct KeyFileError {
    pub path: String,
    pub message: String,
}

#[derive(Clone)]
struct Keys {
    mac: [u8; KEY_LEN],
    /// Encryption keys, oldest first; the last one encrypts.
    enc: Vec<(String, [u8; KEY_LEN])>,
}

impl Keys {
    fn active(&self) -> &(String, [u8; KEY_LEN]) {
        self.enc
            .last()
            .expect("a key set always has an encryption key")
    }

    fn render(&self) -> String {
        let mut out = String::from(
            "# otm secret keys: `<id> <base64 of 32 bytes>`. `mac` derives shim tokens and signs cache\n\
             # entries; the other keys encrypt tenants' secrets: the last one encrypts, all decrypt.\n",
        );
        out.push_str(&format!(
            "{MAC_ID} {}\n",
            otm_core::base64::encode(&self.mac)
        ));
        for (id, k) in &self.enc {
            out.push_str(&format!("{id} {}\n", otm_core::base64::encode(k)));
        }
        out
    }

    fn parse(text: &str) -> std::result::Result<Keys, String> {
        let mut mac = None;
        let mut enc: Vec<(String, [u8; KEY_LEN])> = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (id, b64) = line
                .split_once(char::is_whitespace)
                .ok_or_else(|| format!("line {}: expected `<id> <base64 key>`", n + 1))?;
            let b64 = b64.trim();
            if !valid_key_id(id) {
                return Err(format!(
                    "line {}: key id `{}` must be 1 to 32 of a-z, 0-9, - and _",
                    n + 1,
                    id.chars().take(40).collect::<String>()
                ));
            }
            let key: [u8; KEY_LEN] = otm_core::base64::decode(b64)
                .and_then(|k| k.try_into().ok())
                .ok_or_else(|| {
                    format!(
                        "line {}: key `{id}` is not the base64 of 32 bytes (make one with `otm secrets keygen`)",
                        n + 1
                    )
                })?;
            if id == MAC_ID {
                if mac.replace(key).is_some() {
                    return Err(format!("line {}: a second `{MAC_ID}` key", n + 1));
                }
            } else if enc.iter().any(|(i, _)| i == id) {
                return Err(format!("line {}: key id `{id}` is listed twice", n + 1));
            } else {
                enc.push((id.to_owned(), key));
            }
        }
        let mac = mac.ok_or_else(|| {
            format!(
                "no `{MAC_ID}` key (the signing key); `otm secrets keygen` writes a complete file"
            )
        })?;
        if enc.is_empty() {
            return Err(
                "no encryption key (a line `<id> <base64 key>` besides `mac`); `otm secrets keygen` writes a complete file"
                    .into(),
            );
        }
        Ok(Keys { mac, enc })
    }
}

fn valid_key_id(id: &str) -> bool {
    (1..=32).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

fn random_key() -> [u8; KEY_LEN] {
    let mut k = [0u8; KEY_LEN];
    aws_lc_rs::rand::fill(&mut k).expect("the system's random number generator");
    k
}

/// A fresh key id: `k` and eight random hex digits.
fn new_key_id() -> String {
    format!("k{}", otm_core::id::random_hex(4))
}

/// A complete, fresh key file's text (`otm secrets keygen`).
pub fn generate_key_file() -> String {
    Keys {
        mac: random_key(),
        enc: vec![(new_key_id(), random_key())],
    }
    .render()
}

/// The server's keys: loaded from the key file, or generated into it on first start. Cheap to
/// share; rotation swaps the set in place.
pub struct SecretKeys {
    keys: RwLock<Keys>,
    path: Option<PathBuf>,
}

impl std::fmt::Debug for SecretKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretKeys")
            .field("path", &self.path)
            .field("keys", &self.key_ids())
            .finish()
    }
}

impl SecretKeys {
    /// Reads the key file at `path`; when it does not exist and `create` is set, writes a new one
    /// (mode 0600). A file that exists but does not parse is an error, never overwritten.
    pub fn load_or_create(path: &Path, create: bool) -> std::result::Result<Self, KeyFileError> {
        let err = |message: String| KeyFileError {
            path: path.display().to_string(),
            message,
        };
        let keys = match std::fs::read_to_string(path) {
            Ok(text) => Keys::parse(&text).map_err(err)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
                let keys = Keys::parse(&generate_key_file()).map_err(err)?;
                write_private(path, &keys.render(), true)
                    .map_err(|e| err(format!("cannot create it: {e}")))?;
                keys
            }
            Err(e) => return Err(err(format!("cannot read it: {e}"))),
        };
        Ok(SecretKeys {
            keys: RwLock::new(keys),
            path: Some(path.to_owned()),
        })
    }

    /// Keys parsed from a key file's text, kept in memory only (tests, tools).
    pub fn from_text(text: &str) -> std::result::Result<Self, String> {
        Ok(SecretKeys {
            keys: RwLock::new(Keys::parse(text)?),
            path: None,
        })
    }

    /// A fresh set in memory only.
    pub fn ephemeral() -> Self {
        Self::from_text(&generate_key_file()).expect("a generated key file parses")
    }

    /// The key file, if the keys came from one.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The encryption keys' ids, oldest first; the last one encrypts.
    pub fn key_ids(&self) -> Vec<String> {
        self.read().enc.iter().map(|(id, _)| id.clone()).collect()
    }

    /// The id of the key that encrypts new values.
    pub fn active_key_id(&self) -> String {
        self.read().active().0.clone()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Keys> {
        self.keys.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Keys> {
        self.keys.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Encrypts `value`, bound to `tenant` and `field`.
    pub fn seal(&self, tenant: &TenantId, field: &str, value: &str) -> String {
        let keys = self.read();
        let (id, key) = keys.active();
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).expect("the system's random number generator");
        let mut data = value.as_bytes().to_vec();
        aead_key(key)
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(associated_data(tenant, field)),
                &mut data,
            )
            .expect("sealing fits in memory");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        format!("{FORMAT}:{id}:{}", otm_core::base64::encode(&out))
    }

    /// Decrypts what [`SecretKeys::seal`] wrote for the same tenant and field; a value without
    /// the `v1:` prefix is a plaintext from before encryption and comes back as it is.
    pub fn open(
        &self,
        tenant: &TenantId,
        field: &str,
        stored: &str,
    ) -> std::result::Result<String, SealError> {
        let Some(rest) = stored.strip_prefix("v1:") else {
            return Ok(stored.to_owned());
        };
        let (id, b64) = rest.split_once(':').ok_or(SealError::Malformed {
            reason: "no key id",
        })?;
        let raw = otm_core::base64::decode(b64).ok_or(SealError::Malformed {
            reason: "not base64",
        })?;
        if raw.len() < NONCE_LEN + CHACHA20_POLY1305.tag_len() {
            return Err(SealError::Malformed {
                reason: "too short",
            });
        }
        let key = self.key(id).or_else(|| {
            // Another replica may have added a key to a shared key file.
            self.reload();
            self.key(id)
        });
        let Some(key) = key else {
            return Err(SealError::UnknownKey { key: printable(id) });
        };
        let (nonce, ct) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::Malformed {
            reason: "bad nonce",
        })?;
        let mut data = ct.to_vec();
        let plain = aead_key(&key)
            .open_in_place(nonce, Aad::from(associated_data(tenant, field)), &mut data)
            .map_err(|_| SealError::Refused { key: printable(id) })?;
        String::from_utf8(plain.to_vec()).map_err(|_| SealError::Malformed {
            reason: "not UTF-8",
        })
    }

    /// The key id a stored value was encrypted with; `None` for a plaintext.
    pub fn key_id_of(stored: &str) -> Option<&str> {
        stored
            .strip_prefix("v1:")?
            .split_once(':')
            .map(|(id, _)| id)
    }

    fn key(&self, id: &str) -> Option<[u8; KEY_LEN]> {
        self.read()
            .enc
            .iter()
            .find(|(i, _)| i == id)
            .map(|(_, k)| *k)
    }

    /// Re-reads the key file (when there is one and it parses); keeps the keys in memory
    /// otherwise.
    pub fn reload(&self) {
        let Some(path) = &self.path else { return };
        match std::fs::read_to_string(path).map(|t| Keys::parse(&t)) {
            Ok(Ok(keys)) => {
                let mut current = self.write();
                // A key only this process knows (a rotation under way) stays.
                let mut merged = keys.clone();
                for (id, k) in &current.enc {
                    if !merged.enc.iter().any(|(i, _)| i == id) {
                        merged.enc.insert(0, (id.clone(), *k));
                    }
                }
                if merged.mac == current.mac {
                    *current = merged;
                } else {
                    tracing::warn!(file = %path.display(), "the secret key file's `mac` key changed; keeping the one loaded at start");
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(file = %path.display(), error = %e, "the secret key file does not parse; keeping the keys in memory")
            }
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot re-read the secret key file")
            }
        }
    }

    /// Adds a fresh key that encrypts from now on (the older ones still decrypt), written to the
    /// key file first. Returns its id.
    pub fn add_key(&self) -> std::result::Result<String, KeyFileError> {
        let mut keys = self.write();
        let mut next = keys.clone();
        let id = new_key_id();
        next.enc.push((id.clone(), random_key()));
        self.persist(&next)?;
        *keys = next;
        Ok(id)
    }

    /// Drops every encryption key but the active one, from memory and the key file. Returns the
    /// ids dropped.
    pub fn retire_old_keys(&self) -> std::result::Result<Vec<String>, KeyFileError> {
        let mut keys = self.write();
        let mut next = keys.clone();
        let active = next.enc.pop().expect("an active key");
        let retired = next.enc.iter().map(|(id, _)| id.clone()).collect();
        next.enc = vec![active];
        self.persist(&next)?;
        *keys = next;
        Ok(retired)
    }

    fn persist(&self, keys: &Keys) -> std::result::Result<(), KeyFileError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        write_private(path, &keys.render(), false).map_err(|e| KeyFileError {
            path: path.display().to_string(),
            message: format!(
                "cannot write it: {e} (a key file otm cannot write is managed by its operator: add a key line \
                 there, restart, then run `otm secrets rotate --no-new-key`)"
            ),
        })
    }

    /// The token an instance's shim accepts: HMAC-SHA256 of its id under the signing key, hex.
    pub fn shim_token(&self, instance: &InstanceId) -> Secret {
        let mut data = b"otm shim token v1\0".to_vec();
        data.extend_from_slice(instance.as_str().as_bytes());
        Secret::new(hex::encode(self.mac(&data)))
    }

    /// The signature of a cached endpoint: binds the tenant, the instance and the address.
    pub fn endpoint_signature(&self, tenant: &TenantId, endpoint: &Endpoint) -> String {
        let data = format!(
            "otm endpoint v1\0{tenant}\0{}\0{}",
            endpoint.instance, endpoint.address
        );
        hex::encode(self.mac(data.as_bytes()))
    }

    /// Checks [`SecretKeys::endpoint_signature`] in constant time.
    pub fn endpoint_signature_matches(&self, tenant: &TenantId, endpoint: &Endpoint) -> bool {
        let Some(sig) = &endpoint.signature else {
            return false;
        };
        let Ok(sig) = hex::decode(sig) else {
            return false;
        };
        let data = format!(
            "otm endpoint v1\0{tenant}\0{}\0{}",
            endpoint.instance, endpoint.address
        );
        let key = hmac::Key::new(hmac::HMAC_SHA256, &self.read().mac);
        hmac::verify(&key, data.as_bytes(), &sig).is_ok()
    }

    fn mac(&self, data: &[u8]) -> Vec<u8> {
        let key = hmac::Key::new(hmac::HMAC_SHA256, &self.read().mac);
        hmac::sign(&key, data).as_ref().to_vec()
    }
}

fn aead_key(key: &[u8; KEY_LEN]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, key).expect("a 32-byte key"))
}

fn associated_data(tenant: &TenantId, field: &str) -> Vec<u8> {
    format!("otm secret v1\0{tenant}\0{field}").into_bytes()
}

/// A key id from a stored value, safe to put in a message.
fn printable(id: &str) -> String {
    id.chars()
        .take(32)
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect()
}

/// Writes `text` to `path` with mode 0600: through a temporary file and a rename, so a crash
/// leaves the old file or the new one; `create_new` refuses to replace an existing file.
fn write_private(path: &Path, text: &str, create_new: bool) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    drop(f);
    let done = if create_new {
        // Two starts racing: the first file wins and the second start reads it.
        std::fs::hard_link(&tmp, path).and_then(|()| std::fs::remove_file(&tmp))
    } else {
        std::fs::rename(&tmp, path)
    };
    if done.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    done
}

/// The two sealed fields of a tenant.
const BOT_TOKEN: &str = "bot_token";
const WEBHOOK_SECRET: &str = "webhook_secret";
/// A tenant's own model provider key, kept with its limits.
const MODEL_API_KEY: &str = "model_api_key";

/// A [`Registry`](otm_core::Registry) that encrypts tenants' bot tokens and webhook secrets before they reach the
/// backend, decrypts them on the way back, and stores no shim token (it is derived from the
/// instance id). Wraps any backend, so every registry stores ciphertext.
#[derive(Debug)]
pub struct SealedRegistry {
    inner: Arc<dyn Registry>,
    keys: Arc<SecretKeys>,
}

impl SealedRegistry {
    pub fn new(inner: Arc<dyn Registry>, keys: Arc<SecretKeys>) -> Self {
        SealedRegistry { inner, keys }
    }

    /// The backend underneath, which sees only ciphertext.
    pub fn inner(&self) -> &Arc<dyn Registry> {
        &self.inner
    }

    fn seal_tenant(&self, t: &Tenant) -> Tenant {
        let mut sealed = t.clone();
        sealed.bot_token = t
            .bot_token
            .as_ref()
            .map(|s| Secret::new(self.keys.seal(&t.id, BOT_TOKEN, s.expose())));
        sealed.webhook_secret = Secret::new(self.keys.seal(
            &t.id,
            WEBHOOK_SECRET,
            t.webhook_secret.expose(),
        ));
        sealed.limits.model_api_key = t
            .limits
            .model_api_key
            .as_ref()
            .map(|s| Secret::new(self.keys.seal(&t.id, MODEL_API_KEY, s.expose())));
        sealed
    }

    fn open_tenant(&self, mut t: Tenant) -> Result<Tenant> {
        let fail = |field: &str, e: SealError| Error::Corrupt {
            what: format!("the {} of tenant {}", field.replace('_', " "), t.id),
            message: format!("{e}"),
        };
        if let Some(b) = &t.bot_token {
            let plain = self
                .keys
                .open(&t.id, BOT_TOKEN, b.expose())
                .map_err(|e| fail(BOT_TOKEN, e))?;
            t.bot_token = Some(Secret::new(plain));
        }
        let plain = self
            .keys
            .open(&t.id, WEBHOOK_SECRET, t.webhook_secret.expose())
            .map_err(|e| fail(WEBHOOK_SECRET, e))?;
        t.webhook_secret = Secret::new(plain);
        if let Some(k) = &t.limits.model_api_key {
            let plain = self
                .keys
                .open(&t.id, MODEL_API_KEY, k.expose())
                .map_err(|e| fail(MODEL_API_KEY, e))?;
            t.limits.model_api_key = Some(Secret::new(plain));
        }
        Ok(t)
    }

    fn store_instance(&self, i: &InstanceRecord) -> InstanceRecord {
        let mut stored = i.clone();
        if i.shim_token == self.keys.shim_token(&i.id) {
            stored.shim_token = Secret::new(DERIVED_SHIM_TOKEN);
        }
        stored
    }

    fn load_instance(&self, mut i: InstanceRecord) -> InstanceRecord {
        if i.shim_token.expose() == DERIVED_SHIM_TOKEN || i.shim_token.expose().is_empty() {
            i.shim_token = self.keys.shim_token(&i.id);
        }
        i
    }

    /// True when a tenant's stored secrets are all encrypted under the active key.
    fn current(&self, raw: &Tenant) -> bool {
        let active = self.keys.active_key_id();
        let under_active = |s: &Secret| SecretKeys::key_id_of(s.expose()) == Some(active.as_str());
        raw.bot_token.as_ref().is_none_or(under_active)
            && under_active(&raw.webhook_secret)
            && raw.limits.model_api_key.as_ref().is_none_or(under_active)
    }
}

/// What [`rotate`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Rotation {
    /// The key that encrypts every secret now.
    pub key_id: String,
    /// Whether that key was made by this rotation.
    pub new_key: bool,
    /// Tenants whose secrets were re-encrypted.
    pub reencrypted: u64,
    /// Tenants already under that key.
    pub unchanged: u64,
    /// Tenants whose secrets could not be read (named in the messages); while any is left, no
    /// key is retired.
    pub failed: Vec<String>,
    /// Keys dropped from the key file after every secret was re-encrypted.
    pub retired: Vec<String>,
}

/// Re-encrypts every tenant's secrets under the newest key: first a fresh key is added when
/// `new_key` (written to the key file before any value uses it), then each tenant is read and
/// written back, then, when every tenant succeeded and `retire` is set, the older keys are
/// dropped from the key file. A tenant that cannot be read is reported and left as it is.
pub async fn rotate(registry: &SealedRegistry, new_key: bool, retire: bool) -> Result<Rotation> {
    let invalid = |e: KeyFileError| Error::invalid(e.to_string());
    let mut out = Rotation::default();
    if new_key {
        out.key_id = registry.keys.add_key().map_err(invalid)?;
        out.new_key = true;
    } else {
        out.key_id = registry.keys.active_key_id();
    }
    for raw in registry.inner.list_tenants().await? {
        if registry.current(&raw) {
            out.unchanged += 1;
            continue;
        }
        let id = raw.id.clone();
        let result = match registry.open_tenant(raw) {
            // Only the secrets change; re-read so that settings written meanwhile stay.
            Ok(_) => match registry.get_tenant(&id).await {
                Ok(Some(fresh)) => registry.update_tenant(&fresh).await,
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => out.reencrypted += 1,
            Err(e) if e.is_not_found() => {}
            Err(e) => {
                tracing::error!(tenant = %id, error = %e, "cannot re-encrypt a tenant's secrets");
                out.failed.push(e.to_string());
            }
        }
    }
    if retire && out.failed.is_empty() {
        out.retired = registry.keys.retire_old_keys().map_err(invalid)?;
    }
    Ok(out)
}

impl SealedRegistry {
    /// See [`rotate`].
    pub async fn rotate(&self, new_key: bool, retire: bool) -> Result<Rotation> {
        rotate(self, new_key, retire).await
    }

    /// The keys.
    pub fn keys(&self) -> &Arc<SecretKeys> {
        &self.keys
    }
}

#[async_trait]
impl TenantStore for SealedRegistry {
    async fn create_tenant(&self, tenant: &Tenant) -> Result<()> {
        self.inner.create_tenant(&self.seal_tenant(tenant)).await
    }
    async fn get_tenant(&self, id: &TenantId) -> Result<Option<Tenant>> {
        self.inner
            .get_tenant(id)
            .await?
            .map(|t| self.open_tenant(t))
            .transpose()
    }
    async fn list_tenants(&self) -> Result<Vec<Tenant>> {
        self.inner
            .list_tenants()
            .await?
            .into_iter()
            .map(|t| self.open_tenant(t))
            .collect()
    }
    async fn update_tenant(&self, tenant: &Tenant) -> Result<()> {
        self.inner.update_tenant(&self.seal_tenant(tenant)).await
    }
    async fn delete_tenant(&self, id: &TenantId) -> Result<bool> {
        self.inner.delete_tenant(id).await
    }
    async fn set_tenant_status(
        &self,
        id: &TenantId,
        status: TenantStatus,
        fence: Option<u64>,
    ) -> Result<()> {
        self.inner.set_tenant_status(id, status, fence).await
    }
    async fn touch_tenant(&self, id: &TenantId, at_ms: i64) -> Result<()> {
        self.inner.touch_tenant(id, at_ms).await
    }
    async fn idle_due(&self, now_ms: i64, limit: usize) -> Result<Vec<TenantId>> {
        self.inner.idle_due(now_ms, limit).await
    }
    async fn freeze_due(&self, now_ms: i64, limit: usize) -> Result<Vec<TenantId>> {
        self.inner.freeze_due(now_ms, limit).await
    }
    async fn frozen_tenants(&self) -> Result<Vec<(TenantId, i64)>> {
        self.inner.frozen_tenants().await
    }
}

#[async_trait]
impl InstanceStore for SealedRegistry {
    async fn put_instance(&self, instance: &InstanceRecord, fence: Option<u64>) -> Result<()> {
        self.inner
            .put_instance(&self.store_instance(instance), fence)
            .await
    }
    async fn get_instance(&self, id: &InstanceId) -> Result<Option<InstanceRecord>> {
        Ok(self
            .inner
            .get_instance(id)
            .await?
            .map(|i| self.load_instance(i)))
    }
    async fn instance_of(&self, tenant: &TenantId) -> Result<Option<InstanceRecord>> {
        Ok(self
            .inner
            .instance_of(tenant)
            .await?
            .map(|i| self.load_instance(i)))
    }
    async fn instance_by_surrogate(&self, digest: &str) -> Result<Option<InstanceRecord>> {
        Ok(self
            .inner
            .instance_by_surrogate(digest)
            .await?
            .map(|i| self.load_instance(i)))
    }
    async fn list_instances(&self) -> Result<Vec<InstanceRecord>> {
        Ok(self
            .inner
            .list_instances()
            .await?
            .into_iter()
            .map(|i| self.load_instance(i))
            .collect())
    }
    async fn delete_instance(&self, id: &InstanceId) -> Result<bool> {
        self.inner.delete_instance(id).await
    }
    async fn claim_warm_instance(&self, tenant: &TenantId) -> Result<Option<InstanceRecord>> {
        Ok(self
            .inner
            .claim_warm_instance(tenant)
            .await?
            .map(|i| self.load_instance(i)))
    }
    async fn get_settings(&self) -> Result<FleetSettings> {
        self.inner.get_settings().await
    }
    async fn put_settings(&self, settings: &FleetSettings) -> Result<()> {
        self.inner.put_settings(settings).await
    }
}

#[async_trait]
impl Inbox for SealedRegistry {
    async fn inbox_append(
        &self,
        tenant: &TenantId,
        update_id: i64,
        payload: &[u8],
    ) -> Result<Appended> {
        self.inner.inbox_append(tenant, update_id, payload).await
    }
    async fn inbox_next(&self, tenant: &TenantId) -> Result<Option<InboxItem>> {
        self.inner.inbox_next(tenant).await
    }
    async fn inbox_head(&self, tenant: &TenantId, limit: usize) -> Result<Vec<InboxItem>> {
        self.inner.inbox_head(tenant, limit).await
    }
    async fn inbox_ack(&self, tenant: &TenantId, seq: i64, fence: Option<u64>) -> Result<()> {
        self.inner.inbox_ack(tenant, seq, fence).await
    }
    async fn inbox_fail(
        &self,
        tenant: &TenantId,
        seq: i64,
        error: &str,
        max_attempts: u32,
        fence: Option<u64>,
    ) -> Result<FailOutcome> {
        self.inner
            .inbox_fail(tenant, seq, error, max_attempts, fence)
            .await
    }
    async fn inbox_claim(&self, tenant: &TenantId, fence: u64) -> Result<()> {
        self.inner.inbox_claim(tenant, fence).await
    }
    async fn inbox_retry(&self, tenant: &TenantId, which: DeadLetters) -> Result<Vec<i64>> {
        self.inner.inbox_retry(tenant, which).await
    }
    async fn inbox_drop(&self, tenant: &TenantId, which: DeadLetters) -> Result<Vec<i64>> {
        self.inner.inbox_drop(tenant, which).await
    }
    async fn inbox_view(
        &self,
        tenant: &TenantId,
        after: Option<i64>,
        limit: usize,
    ) -> Result<InboxView> {
        self.inner.inbox_view(tenant, after, limit).await
    }
    async fn inbox_depth(&self, tenant: &TenantId) -> Result<u64> {
        self.inner.inbox_depth(tenant).await
    }
    async fn inbox_pending_tenants(&self) -> Result<Vec<TenantId>> {
        self.inner.inbox_pending_tenants().await
    }
    async fn inbox_prune(&self, before_ms: i64) -> Result<u64> {
        self.inner.inbox_prune(before_ms).await
    }
    async fn purge_freed(&self) -> Result<()> {
        self.inner.purge_freed().await
    }
}

#[async_trait]
impl otm_core::AdminStore for SealedRegistry {
    async fn audit_append(&self, entry: &otm_core::AuditEntry) -> Result<()> {
        self.inner.audit_append(entry).await
    }
    async fn audit_list(
        &self,
        limit: usize,
        before: Option<i64>,
    ) -> Result<Vec<otm_core::AuditEntry>> {
        self.inner.audit_list(limit, before).await
    }
    async fn token_create(&self, token: &otm_core::AdminToken) -> Result<()> {
        self.inner.token_create(token).await
    }
    async fn token_by_digest(&self, digest: &str) -> Result<Option<otm_core::AdminToken>> {
        self.inner.token_by_digest(digest).await
    }
    async fn token_list(&self) -> Result<Vec<otm_core::AdminToken>> {
        self.inner.token_list().await
    }
    async fn token_revoke(&self, name: &str) -> Result<bool> {
        self.inner.token_revoke(name).await
    }
}

/// A [`Coordinator`] whose endpoint cache holds no shim token and trusts no entry it did not
/// sign: entries are signed with the server's key over tenant, instance and address before they
/// are cached, and an entry whose signature does not match (forged, or copied from another
/// tenant) is dropped and reported as a miss, so the registry decides. The shim token of a
/// verified entry is derived from its instance id.
#[derive(Debug)]
pub struct SignedCoordinator {
    inner: Arc<dyn Coordinator>,
    keys: Arc<SecretKeys>,
}

impl SignedCoordinator {
    pub fn new(inner: Arc<dyn Coordinator>, keys: Arc<SecretKeys>) -> Self {
        SignedCoordinator { inner, keys }
    }
}

#[async_trait]
impl Coordinator for SignedCoordinator {
    async fn endpoint(&self, tenant: &TenantId) -> Result<Option<Endpoint>> {
        let Some(mut ep) = self.inner.endpoint(tenant).await? else {
            return Ok(None);
        };
        if !self.keys.endpoint_signature_matches(tenant, &ep) {
            tracing::warn!(%tenant, instance = %ep.instance, "dropping a cached endpoint whose signature does not match (forged or copied)");
            let _ = self.inner.clear_endpoint(tenant).await;
            return Ok(None);
        }
        ep.shim_token = self.keys.shim_token(&ep.instance);
        Ok(Some(ep))
    }
    async fn set_endpoint(
        &self,
        tenant: &TenantId,
        endpoint: &Endpoint,
        ttl: Duration,
    ) -> Result<()> {
        if endpoint.shim_token != self.keys.shim_token(&endpoint.instance) {
            // An instance from before derived tokens: its token cannot be rebuilt from the cache,
            // so it is not cached; every wake finds it in the registry.
            return self.inner.clear_endpoint(tenant).await;
        }
        let mut signed = endpoint.clone();
        signed.shim_token = Secret::new("");
        signed.signature = Some(self.keys.endpoint_signature(tenant, endpoint));
        self.inner.set_endpoint(tenant, &signed, ttl).await
    }
    async fn clear_endpoint(&self, tenant: &TenantId) -> Result<()> {
        self.inner.clear_endpoint(tenant).await
    }
    async fn acquire(&self, key: &str, ttl: Duration) -> Result<Option<Lease>> {
        self.inner.acquire(key, ttl).await
    }
    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool> {
        self.inner.renew(lease, ttl).await
    }
    async fn release(&self, lease: &Lease) -> Result<bool> {
        self.inner.release(lease).await
    }
    async fn publish(&self, notification: Notification) -> Result<()> {
        self.inner.publish(notification).await
    }
    fn subscribe(&self) -> BoxStream<'static, Notification> {
        self.inner.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(id: &str) -> TenantId {
        TenantId::parse(id).unwrap()
    }

    #[test]
    fn seals_and_opens_bound_to_tenant_and_field() {
        let keys = SecretKeys::ephemeral();
        let sealed = keys.seal(&t("alice"), BOT_TOKEN, "123:secret-token");
        assert!(sealed.starts_with(&format!("v1:{}:", keys.active_key_id())));
        assert!(!sealed.contains("secret-token"));
        assert_eq!(
            keys.open(&t("alice"), BOT_TOKEN, &sealed).unwrap(),
            "123:secret-token"
        );
        // A fresh nonce every time.
        assert_ne!(
            sealed,
            keys.seal(&t("alice"), BOT_TOKEN, "123:secret-token")
        );
        // Another tenant or another field: refused, with a message that names the key only.
        for (tenant, field) in [("bob", BOT_TOKEN), ("alice", WEBHOOK_SECRET)] {
            let err = keys.open(&t(tenant), field, &sealed).unwrap_err();
            assert!(matches!(err, SealError::Refused { .. }), "{err}");
            assert!(!err.to_string().contains("secret-token"));
        }
    }

    #[test]
    fn wrong_key_tampering_and_garbage_are_refused_clearly() {
        let keys = SecretKeys::ephemeral();
        let sealed = keys.seal(&t("alice"), BOT_TOKEN, "123:abc");
        // The same key id with other key bytes.
        let id = keys.active_key_id();
        let other = SecretKeys::from_text(&format!(
            "mac {}\n{id} {}\n",
            otm_core::base64::encode(&[1; 32]),
            otm_core::base64::encode(&[2; 32])
        ))
        .unwrap();
        let err = other.open(&t("alice"), BOT_TOKEN, &sealed).unwrap_err();
        assert!(matches!(err, SealError::Refused { .. }), "{err}");
        assert!(err.to_string().contains("different key"), "{err}");
        // A key that is not there at all.
        let err = SecretKeys::ephemeral()
            .open(&t("alice"), BOT_TOKEN, &sealed)
            .unwrap_err();
        assert_eq!(err, SealError::UnknownKey { key: id.clone() });
        assert!(err.to_string().contains("not in the secret key file"));
        // One flipped bit anywhere in nonce, ciphertext or tag.
        let prefix = format!("v1:{id}:");
        let raw = otm_core::base64::decode(sealed.strip_prefix(&prefix).unwrap()).unwrap();
        for i in 0..raw.len() {
            let mut bad = raw.clone();
            bad[i] ^= 1;
            let tampered = format!("{prefix}{}", otm_core::base64::encode(&bad));
            assert!(matches!(
                keys.open(&t("alice"), BOT_TOKEN, &tampered),
                Err(SealError::Refused { .. })
            ));
        }
        for garbage in ["v1:", "v1:k1", "v1:k1:!!!", "v1:k1:AAAA"] {
            assert!(
                matches!(
                    keys.open(&t("alice"), BOT_TOKEN, garbage),
                    Err(SealError::Malformed { .. } | SealError::UnknownKey { .. })
                ),
                "{garbage}"
            );
        }
        // A plaintext from before encryption reads as it is.
        assert_eq!(
            keys.open(&t("alice"), BOT_TOKEN, "123:plain").unwrap(),
            "123:plain"
        );
    }

    #[test]
    fn key_files_parse_strictly_and_never_print_keys() {
        let text = generate_key_file();
        let keys = SecretKeys::from_text(&text).unwrap();
        assert_eq!(keys.key_ids().len(), 1);
        assert!(
            !format!("{keys:?}").contains(text.lines().nth(2).unwrap().split(' ').nth(1).unwrap())
        );
        for (bad, says) in [
            ("", "no `mac` key"),
            ("mac AAAA\n", "not the base64 of 32 bytes"),
            (
                &format!("mac {}\n", otm_core::base64::encode(&[0; 32])),
                "no encryption key",
            ),
            ("Bad:Id AAAA\n", "key id"),
        ] {
            let err = SecretKeys::from_text(bad).unwrap_err();
            assert!(err.contains(says), "{bad:?}: {err}");
        }
    }

    #[test]
    fn key_file_is_created_private_and_rotation_keeps_old_keys_readable() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret.key");
        let err = SecretKeys::load_or_create(&path, false).unwrap_err();
        assert!(err.to_string().contains("cannot read"), "{err}");
        let keys = SecretKeys::load_or_create(&path, true).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let old = keys.seal(&t("a"), BOT_TOKEN, "1:x");
        let token = keys.shim_token(&InstanceId::new("i-000000000001"));
        let new_id = keys.add_key().unwrap();
        assert_eq!(keys.active_key_id(), new_id);
        // Read back from the file: both keys, the old value still opens.
        let again = SecretKeys::load_or_create(&path, false).unwrap();
        assert_eq!(again.key_ids().len(), 2);
        assert_eq!(again.open(&t("a"), BOT_TOKEN, &old).unwrap(), "1:x");
        assert_eq!(again.shim_token(&InstanceId::new("i-000000000001")), token);
        let retired = keys.retire_old_keys().unwrap();
        assert_eq!(retired.len(), 1);
        let after = SecretKeys::load_or_create(&path, false).unwrap();
        assert_eq!(after.key_ids(), vec![new_id]);
        assert!(matches!(
            after.open(&t("a"), BOT_TOKEN, &old),
            Err(SealError::UnknownKey { .. })
        ));
        // A corrupt file is an error, not replaced.
        std::fs::write(&path, "nonsense").unwrap();
        assert!(SecretKeys::load_or_create(&path, true).is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "nonsense");
    }

    #[test]
    fn endpoint_signatures_bind_tenant_instance_and_address() {
        let keys = SecretKeys::ephemeral();
        let mut ep = Endpoint {
            instance: InstanceId::new("i-000000000001"),
            address: "unix:/run/a.sock".into(),
            shim_token: Secret::new(""),
            signature: None,
        };
        assert!(!keys.endpoint_signature_matches(&t("a"), &ep));
        ep.signature = Some(keys.endpoint_signature(&t("a"), &ep));
        assert!(keys.endpoint_signature_matches(&t("a"), &ep));
        assert!(!keys.endpoint_signature_matches(&t("b"), &ep));
        let mut moved = ep.clone();
        moved.address = "http://203.0.113.9:80".into();
        assert!(!keys.endpoint_signature_matches(&t("a"), &moved));
        assert!(!SecretKeys::ephemeral().endpoint_signature_matches(&t("a"), &ep));
    }
}
