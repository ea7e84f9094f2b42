//! The client-visible error: status code, machine-readable code, human message.
//!
//! Every failure a handler can meet becomes exactly one `ApiError`, rendered as
//! `{"error": CODE, "message": text, "detail": text}` (`detail` repeats the message for
//! clients of the Python relay, which read that key). Internal failures never carry their
//! internal details to the client; they are logged instead.

use crate::shard::ShardError;
use crate::store::StoreError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
    /// Seconds for a `Retry-After` header (503s the client should retry).
    pub retry_after: Option<u32>,
    /// Further fixed headers the error's status calls for (426's `Sec-WebSocket-Version`).
    pub headers: &'static [(&'static str, &'static str)],
}

impl ApiError {
    /// An error with a status and code of its own (protocol-specific outcomes).
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
            headers: &[],
        }
    }
    pub fn invalid_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "INVALID_REQUEST", message)
    }
    pub fn invalid_topic(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "INVALID_TOPIC", message)
    }
    pub fn invalid_cursor(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "INVALID_CURSOR", message)
    }
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(404, "NOT_FOUND", message)
    }
    pub fn method_not_allowed(message: impl Into<String>) -> ApiError {
        ApiError::new(405, "METHOD_NOT_ALLOWED", message)
    }
    pub fn payload_too_large(message: impl Into<String>) -> ApiError {
        ApiError::new(413, "PAYLOAD_TOO_LARGE", message)
    }
    pub fn unsupported_media_type(message: impl Into<String>) -> ApiError {
        ApiError::new(415, "UNSUPPORTED_MEDIA_TYPE", message)
    }
    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError {
            retry_after: Some(1),
            ..ApiError::new(503, "SERVICE_UNAVAILABLE", message)
        }
    }
    pub fn internal() -> ApiError {
        ApiError::new(500, "INTERNAL_ERROR", "internal error")
    }
}

impl From<crate::topic::InvalidTopic> for ApiError {
    fn from(e: crate::topic::InvalidTopic) -> ApiError {
        ApiError::invalid_topic(e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::Unavailable(cause) | StoreError::Rejected(cause) => {
                // The cause may name hosts or keys: log it, tell the client only to retry.
                tracing::warn!(%cause, "storage operation failed");
                ApiError::unavailable("storage is unavailable; retry shortly")
            }
            // Not logged per publish: a burst of new keys at the bound would flood the log.
            StoreError::TooManyKeys => ApiError::unavailable(
                "too many idempotency keys are inside their window (idempotency.max_keys); \
                 retry shortly",
            ),
        }
    }
}

impl From<ShardError> for ApiError {
    fn from(e: ShardError) -> ApiError {
        match e {
            ShardError::ShardGone(_) => ApiError::unavailable("the relay is shutting down"),
            ShardError::Store(e) => e.into(),
        }
    }
}
