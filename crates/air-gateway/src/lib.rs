//! The OpenAI-compatible HTTP gateway: `/v1/chat/completions`, `/v1/completions`,
//! `/v1/models`, `/tokenize` and `/detokenize`, health probes and Prometheus metrics, over an
//! [`air_engine::Engine`]. Errors come in OpenAI's JSON
//! shape ([`ApiError`]); streaming answers are Server-Sent Events, and a client that goes away
//! mid-stream cancels its request in the engine.

mod completion;
mod error;
mod metrics;
mod openai;
mod tokens;

use air_engine::Engine;
use air_tokenizer::{ChatTemplate, Tokenizer};
use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use subtle::ConstantTimeEq;

pub use error::ApiError;
pub use metrics::Metrics;

/// A model as the API serves it.
pub struct ServedModel {
    /// Its id in requests (`model`), as the engine knows it.
    pub name: String,
    pub tokenizer: Arc<Tokenizer>,
    /// `None`: the chat endpoint refuses requests for it.
    pub template: Option<ChatTemplate>,
    pub context_length: usize,
}

/// What the handlers share.
pub struct Gateway {
    pub engine: Engine,
    pub models: Vec<ServedModel>,
    /// Accepted bearer tokens; empty: no authentication.
    pub api_keys: Vec<String>,
    /// When the server started (the models' `created`).
    pub started: u64,
    pub metrics: Metrics,
}

impl Gateway {
    pub fn new(engine: Engine, models: Vec<ServedModel>, api_keys: Vec<String>) -> Self {
        Self { engine, models, api_keys, started: unix_now(), metrics: Metrics::default() }
    }

    fn model(&self, name: &str) -> Result<&ServedModel, ApiError> {
        self.models.iter().find(|m| m.name == name).ok_or_else(|| ApiError {
            status: axum::http::StatusCode::NOT_FOUND,
            message: format!("the model {name:?} does not exist"),
            param: Some("model"),
            code: Some("model_not_found"),
        })
    }
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The API's routes; `/health`, `/ready`, `/metrics` and `/version` stay open when API keys
/// are set.
pub fn router(gateway: Arc<Gateway>) -> Router {
    let api = Router::new()
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route("/v1/chat/completions", post(completion::chat))
        .route("/v1/completions", post(completion::text))
        .route("/tokenize", post(tokens::tokenize))
        .route("/detokenize", post(tokens::detokenize))
        .route_layer(middleware::from_fn_with_state(gateway.clone(), authenticate));
    Router::new()
        .route("/health", get(|| async { axum::Json(json!({ "status": "ok" })) }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics::scrape))
        .route("/version", get(|| async { axum::Json(json!({ "version": env!("CARGO_PKG_VERSION") })) }))
        .merge(api)
        .fallback(|| async {
            ApiError {
                status: axum::http::StatusCode::NOT_FOUND,
                message: "no such route".into(),
                param: None,
                code: None,
            }
        })
        .layer(middleware::from_fn_with_state(gateway.clone(), metrics::count_requests))
        .with_state(gateway)
}

/// Checks `Authorization: Bearer KEY` against the keys, in constant time per key.
async fn authenticate(State(g): State<Arc<Gateway>>, request: Request, next: Next) -> Response {
    if g.api_keys.is_empty() {
        return next.run(request).await;
    }
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let known = g.api_keys.iter().fold(false, |found, key| found | bool::from(key.as_bytes().ct_eq(given.as_bytes())));
    if known {
        next.run(request).await
    } else {
        ApiError {
            status: axum::http::StatusCode::UNAUTHORIZED,
            message: "missing or invalid API key (send Authorization: Bearer KEY)".into(),
            param: None,
            code: Some("invalid_api_key"),
        }
        .into_response()
    }
}

async fn ready(State(g): State<Arc<Gateway>>) -> Response {
    match g.engine.stats(None).await {
        Ok(_) => axum::Json(json!({ "status": "ready", "models": g.models.len() })).into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

fn model_object(g: &Gateway, m: &ServedModel) -> Value {
    json!({ "id": m.name, "object": "model", "created": g.started, "owned_by": "air",
            "max_model_len": m.context_length })
}

async fn list_models(State(g): State<Arc<Gateway>>) -> impl IntoResponse {
    let data: Vec<Value> = g.models.iter().map(|m| model_object(&g, m)).collect();
    axum::Json(json!({ "object": "list", "data": data }))
}

async fn get_model(State(g): State<Arc<Gateway>>, Path(id): Path<String>) -> Result<impl IntoResponse, ApiError> {
    Ok(axum::Json(model_object(&g, g.model(&id)?)))
}
