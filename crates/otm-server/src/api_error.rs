//! [`ApiError`]: how the admin API and the web console answer a failure: an HTTP status and
//! `{"error": {"code", "message"}}` ([`otm_core::admin_api::ErrorBody`]) with a stable code.
//! A leaf module: the admin API and the console both use it, neither through the other.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use otm_core::Error;
use otm_core::admin_api::{ErrorBody, ErrorCode};

/// An API error: HTTP status, a stable code, and a message that says what to do.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorCode::InvalidRequest, message)
    }
    pub(crate) fn not_found(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            format!("{what} not found"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(ErrorBody::new(self.code, self.message))).into_response()
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let (status, code) = match &e {
            Error::NotFound { .. } => (StatusCode::NOT_FOUND, ErrorCode::NotFound),
            Error::AlreadyExists { .. } => (StatusCode::CONFLICT, ErrorCode::AlreadyExists),
            Error::Conflict { .. } => (StatusCode::CONFLICT, ErrorCode::Conflict),
            Error::InvalidInput { .. } => (StatusCode::BAD_REQUEST, ErrorCode::InvalidRequest),
            Error::Unavailable { .. } => (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable),
            Error::Corrupt { .. } => (StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Corrupt),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal),
        };
        ApiError::new(status, code, e.to_string())
    }
}

pub(crate) type ApiResult<T> = Result<T, ApiError>;
