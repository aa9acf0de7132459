//! Errors in OpenAI's JSON shape: `{"error": {"message", "type", "param", "code"}}`.

use air_engine::EngineError;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An error answer of the API.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// 400: a request the API cannot take.
    pub fn invalid(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, message: message.into(), param, code: None }
    }

    fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::NOT_FOUND => "invalid_request_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let (status, param, code) = match &e {
            EngineError::UnknownModel(_) => (StatusCode::NOT_FOUND, Some("model"), Some("model_not_found")),
            EngineError::Overloaded { .. } => (StatusCode::TOO_MANY_REQUESTS, None, Some("overloaded")),
            EngineError::PromptTooLong { .. } | EngineError::KvTooSmall { .. } => {
                (StatusCode::BAD_REQUEST, Some("messages"), Some("context_length_exceeded"))
            }
            EngineError::Stopped => (StatusCode::SERVICE_UNAVAILABLE, None, None),
            _ => (StatusCode::BAD_REQUEST, None, None),
        };
        Self { status, message: e.to_string(), param, code }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": {
            "message": self.message, "type": self.kind(), "param": self.param, "code": self.code,
        }});
        let mut response = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}
