//! Identifiers: tenant ids (DNS labels), instance ids, snapshot ids, and random tokens.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A tenant id: a DNS label, `^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TenantId(String);

impl TenantId {
    /// Validates and wraps an id.
    pub fn parse(id: &str) -> Result<Self, crate::Error> {
        if is_dns_label(id) {
            Ok(TenantId(id.to_owned()))
        } else {
            Err(crate::Error::invalid(format!(
                "tenant id `{}` is not a DNS label: use 1 to 63 of a-z, 0-9 and '-', starting and ending with a letter or digit",
                id.chars().take(80).collect::<String>()
            )))
        }
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// True when `s` is a DNS label as RFC 1123 allows (lower case only).
pub fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    let ok = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    !b.is_empty()
        && b.len() <= 63
        && ok(&b[0])
        && ok(&b[b.len() - 1])
        && b.iter().all(|c| ok(c) || *c == b'-')
}

impl TryFrom<String> for TenantId {
    type Error = crate::Error;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        TenantId::parse(&s)
    }
}

impl From<TenantId> for String {
    fn from(t: TenantId) -> String {
        t.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An instance id, `i-` and 12 hex digits; also a valid DNS label, so it names a pod as is.
///
/// Deserialising validates the shape, so an id read from anywhere (a record on disk, an answer)
/// can be joined to a path: it never holds `/` or `..`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct InstanceId(String);

impl TryFrom<String> for InstanceId {
    type Error = crate::Error;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        InstanceId::parse(&s)
    }
}

impl From<InstanceId> for String {
    fn from(i: InstanceId) -> String {
        i.0
    }
}

impl InstanceId {
    /// A fresh random id.
    pub fn random() -> Self {
        InstanceId(format!("i-{}", random_hex(6)))
    }

    /// Wraps an existing id (from a store otm wrote). Ids from anywhere an instance could have
    /// written go through [`InstanceId::parse`].
    pub fn new(id: impl Into<String>) -> Self {
        InstanceId(id.into())
    }

    /// Checks the shape: `i-` and 12 lower-case hex digits.
    pub fn parse(id: &str) -> Result<Self, crate::Error> {
        let ok = id.len() == 14
            && id.starts_with("i-")
            && id[2..]
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if ok {
            Ok(InstanceId(id.to_owned()))
        } else {
            Err(crate::Error::invalid(format!(
                "`{}` is not an instance id (i- and 12 hex digits)",
                id.escape_debug()
            )))
        }
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A snapshot id: creation time in milliseconds, zero-padded so ids sort by age, and a random
/// suffix so two writers never pick the same key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SnapshotId(String);

impl SnapshotId {
    /// A fresh id for a snapshot taken now.
    pub fn new_now() -> Self {
        SnapshotId(format!("{:015}-{}", crate::time::now_ms(), random_hex(4)))
    }

    /// Wraps an existing id after checking it is safe as an object key segment.
    pub fn parse(s: &str) -> Result<Self, crate::Error> {
        if !s.is_empty()
            && s.len() <= 64
            && s.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
        {
            Ok(SnapshotId(s.to_owned()))
        } else {
            Err(crate::Error::invalid(format!("`{s}` is not a snapshot id")))
        }
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `n` random bytes from the OS, hex-encoded.
pub fn random_hex(n: usize) -> String {
    let mut buf = vec![0u8; n];
    getrandom::fill(&mut buf).expect("the OS random source failed");
    hex::encode(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_ids_are_dns_labels() {
        for ok in ["a", "alice", "a-1", "0", &"x".repeat(63)] {
            assert!(TenantId::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "A",
            "a_b",
            "a.b",
            "ä",
            &"x".repeat(64),
            "../x",
        ] {
            assert!(TenantId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn instance_ids_are_labels_too() {
        assert!(is_dns_label(InstanceId::random().as_str()));
        let id = InstanceId::random();
        assert_eq!(InstanceId::parse(id.as_str()).unwrap(), id);
        for bad in [
            "../canary-dir",
            "i-../../etc",
            "i-0123456789AB",
            "i-0123456789abc",
            "",
            "i-0123456789a/",
        ] {
            assert!(InstanceId::parse(bad).is_err(), "{bad}");
            assert!(
                serde_json::from_value::<InstanceId>(serde_json::json!(bad)).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn snapshot_ids_sort_by_time() {
        let a = SnapshotId::new_now();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = SnapshotId::new_now();
        assert!(a < b);
        assert!(SnapshotId::parse(a.as_str()).is_ok());
        assert!(SnapshotId::parse("../etc").is_err());
    }
}
