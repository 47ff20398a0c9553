//! The JSON error body of every HTTP rejection: `{"error": CODE, "message": "..."}`.
//! Internal details are logged, never sent.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An HTTP error with a contract code.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into(), retry_after: None }
    }
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }
    /// A broker failure: logged with its detail, answered 503 `unavailable` without it (the
    /// detail may name internal addresses).
    pub fn broker(e: crier_core::BrokerError) -> ApiError {
        tracing::warn!(error = %e, "broker call failed");
        ApiError::unavailable("the message broker is unavailable; retry later")
    }
    /// A publish whose outcome the broker did not confirm: 504 `outcome_unknown` (it may have
    /// been published; a retry with the same idempotency key is safe). Other broker errors as
    /// [`ApiError::broker`].
    pub fn publish(e: crier_core::BrokerError) -> ApiError {
        match e {
            crier_core::BrokerError::OutcomeUnknown(why) => {
                tracing::warn!(error = %why, "publish: outcome unknown");
                ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "outcome_unknown",
                    "the broker did not confirm the publish; it may have been published: retry with the same idempotency_key",
                )
            }
            e => ApiError::broker(e),
        }
    }
    pub fn with_retry_after(mut self, secs: u64) -> ApiError {
        self.retry_after = Some(secs);
        self
    }
}

/// What an [`ApiError`] answered, left in the response's extensions for the refusal log.
#[derive(Debug, Clone)]
pub struct Refused {
    pub code: &'static str,
    pub message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(json!({"error": self.code, "message": &self.message}))).into_response();
        resp.extensions_mut().insert(Refused { code: self.code, message: self.message });
        if let Some(s) = self.retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if self.status == StatusCode::PAYLOAD_TOO_LARGE {
            // The rest of the body is not read: the connection cannot be reused, so say so
            // (clients with a connection pool would otherwise send the next request into it).
            resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

/// The contract code and a default message for an HTTP status crier did not answer with an
/// [`ApiError`] itself (axum's 405, a body limit's 413, …).
pub fn code_for_status(status: StatusCode) -> (&'static str, &'static str) {
    match status {
        StatusCode::UNAUTHORIZED => ("unauthorized", "authentication required"),
        StatusCode::FORBIDDEN => ("forbidden", "forbidden"),
        StatusCode::NOT_FOUND => ("not_found", "no such endpoint"),
        StatusCode::METHOD_NOT_ALLOWED => {
            ("method_not_allowed", "this path does not take that method; the Allow header lists the ones it takes")
        }
        StatusCode::PAYLOAD_TOO_LARGE => ("message_too_large", "the request body is too large"),
        StatusCode::TOO_MANY_REQUESTS => ("rate_limited", "too many requests"),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => ("bad_request", "the request head is too large"),
        s if s.is_server_error() && s != StatusCode::INTERNAL_SERVER_ERROR => {
            ("unavailable", "unavailable; retry later")
        }
        StatusCode::INTERNAL_SERVER_ERROR => ("internal", "internal error"),
        _ => ("bad_request", "bad request"),
    }
}
