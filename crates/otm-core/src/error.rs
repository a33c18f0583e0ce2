//! The error every backend trait returns.

use std::fmt;

/// Result with otm's core [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong at a backend boundary. Callers match on the variant; the message says what to
/// do about it. No variant ever carries a secret.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The named thing does not exist.
    #[error("{what} not found")]
    NotFound { what: String },
    /// The named thing exists already.
    #[error("{what} already exists")]
    AlreadyExists { what: String },
    /// A concurrent writer won, or a fencing number was stale.
    #[error("conflict: {message}")]
    Conflict { message: String },
    /// The input was rejected before anything was written.
    #[error("invalid input: {message}")]
    InvalidInput { message: String },
    /// The backend could not be reached or is shutting down; retrying later may work.
    #[error("{backend} unavailable: {message}")]
    Unavailable {
        backend: &'static str,
        message: String,
    },
    /// The configuration names a backend that this build does not include.
    #[error(
        "{kind} backend `{backend}` is not in this build (rebuild with the cargo feature `{feature}`)"
    )]
    NotInBuild {
        kind: &'static str,
        backend: String,
        feature: &'static str,
    },
    /// Stored data failed a check (checksum, format).
    #[error("corrupt data in {what}: {message}")]
    Corrupt { what: String, message: String },
    /// Anything else, with the backend that raised it.
    #[error("{backend}: {source}")]
    Generic {
        backend: &'static str,
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
}

impl Error {
    /// Wraps any error as [`Error::Generic`].
    pub fn generic(
        backend: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Error::Generic {
            backend,
            source: source.into(),
        }
    }

    /// Builds [`Error::NotFound`].
    pub fn not_found(what: impl fmt::Display) -> Self {
        Error::NotFound {
            what: what.to_string(),
        }
    }

    /// Builds [`Error::Conflict`].
    pub fn conflict(message: impl fmt::Display) -> Self {
        Error::Conflict {
            message: message.to_string(),
        }
    }

    /// Builds [`Error::InvalidInput`].
    pub fn invalid(message: impl fmt::Display) -> Self {
        Error::InvalidInput {
            message: message.to_string(),
        }
    }

    /// Builds [`Error::Unavailable`].
    pub fn unavailable(backend: &'static str, message: impl fmt::Display) -> Self {
        Error::Unavailable {
            backend,
            message: message.to_string(),
        }
    }

    /// True for [`Error::NotFound`].
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::NotFound { .. })
    }
}
