//! [`Secret`]: a string that never prints.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A secret value: a bot token, a webhook secret, an instance token. `Debug` and `Display` print
/// `***`; the value is reached only through [`Secret::expose`], so a log line or an error message
/// cannot carry it by accident. It serializes as the plain string, for storage only: API answers
/// use view types that leave secrets out.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// A fresh random secret: 32 bytes from the OS, hex-encoded.
    pub fn random() -> Self {
        Secret(crate::id::random_hex(32))
    }

    /// The value itself. Call only where the value must leave the process.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Compares in constant time.
    pub fn matches(&self, candidate: &str) -> bool {
        use subtle::ConstantTimeEq;
        self.0.as_bytes().ct_eq(candidate.as_bytes()).into()
    }

    /// A stable lookup key for the value (hex SHA-256), safe to store and index.
    pub fn digest(&self) -> String {
        digest(&self.0)
    }
}

/// Hex SHA-256 of a string, used to index secrets without storing them.
pub fn digest(value: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(value.as_bytes()))
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_prints_its_value() {
        let s = Secret::new("123:abc");
        assert!(!format!("{s:?} {s}").contains("123:abc"));
        assert!(s.matches("123:abc"));
        assert!(!s.matches("123:abd"));
        assert!(!s.matches("123:ab"));
    }
}
