//! `POST /tokenize` and `POST /detokenize` (vLLM's shapes): a prompt or chat messages to the
//! model's token ids, and ids back to text.

use crate::completion::{chat_prompt, parse};
use crate::openai::Message;
use crate::{ApiError, Gateway, ServedModel};
use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;

#[derive(Deserialize)]
pub struct TokenizeRequest {
    /// Default: the first served model.
    model: Option<String>,
    prompt: Option<String>,
    messages: Option<Vec<Message>>,
    /// For `prompt`: add BOS/EOS as the model's file says.
    #[serde(default = "yes")]
    add_special_tokens: bool,
}

#[derive(Deserialize)]
pub struct DetokenizeRequest {
    model: Option<String>,
    tokens: Vec<u32>,
}

fn yes() -> bool {
    true
}

fn served<'a>(g: &'a Gateway, model: &Option<String>) -> Result<&'a ServedModel, ApiError> {
    match model {
        Some(name) => g.model(name),
        None => g.models.first().ok_or_else(|| ApiError::invalid("no model is served", Some("model"))),
    }
}

pub async fn tokenize(
    State(g): State<Arc<Gateway>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let r: TokenizeRequest = parse(body)?;
    let model = served(&g, &r.model)?;
    let tokens = match (&r.prompt, &r.messages) {
        (Some(text), None) => model
            .tokenizer
            .encode(text, r.add_special_tokens)
            .map_err(|e| ApiError::invalid(e.to_string(), Some("prompt")))?,
        (None, Some(messages)) => chat_prompt(model, messages)?,
        _ => return Err(ApiError::invalid("give either prompt or messages", Some("prompt"))),
    };
    Ok(Json(json!({ "count": tokens.len(), "max_model_len": model.context_length, "tokens": tokens })))
}

pub async fn detokenize(
    State(g): State<Arc<Gateway>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let r: DetokenizeRequest = parse(body)?;
    let model = served(&g, &r.model)?;
    let vocab = model.tokenizer.vocab_size();
    if let Some(id) = r.tokens.iter().find(|&&id| id as usize >= vocab) {
        return Err(ApiError::invalid(
            format!("token id {id} is outside the vocabulary ({vocab} tokens)"),
            Some("tokens"),
        ));
    }
    Ok(Json(json!({ "prompt": model.tokenizer.decode(&r.tokens) })))
}
