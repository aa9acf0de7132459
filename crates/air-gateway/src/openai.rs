//! The request bodies of the OpenAI API that Air honours, and their translation into engine
//! requests. Unknown fields are ignored; values out of range are refused.

use crate::error::ApiError;
use air_sampling::SamplingParams;
use serde::Deserialize;

/// Most alternatives per token a request may ask for (OpenAI's limit).
const MAX_TOP_LOGPROBS: usize = 20;
/// Most choices per request.
const MAX_CHOICES: usize = 16;

/// `stop`: one string or several.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Fields shared by chat and text completions.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Common {
    pub model: String,
    pub max_tokens: Option<usize>,
    pub max_completion_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
    pub n: Option<usize>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    /// vLLM's and llama-server's extension: generate until `max_tokens` even past an end token.
    #[serde(default)]
    pub ignore_eos: bool,
}

impl Common {
    /// Sampling as asked, with vLLM's defaults for what is not (temperature 1, no truncation).
    pub fn sampling(&self, choice: usize) -> Result<SamplingParams, ApiError> {
        let top_k = match self.top_k {
            None | Some(-1) | Some(0) => 0,
            Some(k) if k > 0 => k as usize,
            Some(_) => return Err(ApiError::invalid("top_k must be -1 (off) or a positive integer", Some("top_k"))),
        };
        for (name, value, range) in [
            ("frequency_penalty", self.frequency_penalty, -2.0..=2.0),
            ("presence_penalty", self.presence_penalty, -2.0..=2.0),
            ("temperature", self.temperature, 0.0..=2.0),
        ] {
            if value.is_some_and(|v| !range.contains(&v)) {
                let message = format!("{name} must be in [{}, {}]", range.start(), range.end());
                return Err(ApiError::invalid(message, Some(name)));
            }
        }
        let params = SamplingParams {
            temperature: self.temperature.unwrap_or(1.0),
            top_k,
            top_p: self.top_p.unwrap_or(1.0),
            min_p: self.min_p.unwrap_or(0.0),
            repeat_penalty: self.repetition_penalty.unwrap_or(1.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            // A seeded request with n choices gives each its own, reproducible, draw.
            seed: self.seed.map(|s| s.wrapping_add(choice as u64)),
            ..SamplingParams::default()
        };
        params.validate().map_err(|e| ApiError::invalid(e.to_string(), Some(e.name)))?;
        Ok(params)
    }

    /// The stop strings.
    pub fn stops(&self) -> Vec<String> {
        match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        }
    }

    /// Choices asked for.
    pub fn choices(&self) -> Result<usize, ApiError> {
        match self.n.unwrap_or(1) {
            n @ 1..=MAX_CHOICES => Ok(n),
            _ => Err(ApiError::invalid(format!("n must be between 1 and {MAX_CHOICES}"), Some("n"))),
        }
    }

    /// The token limit asked for, if any.
    pub fn max_tokens(&self) -> Result<Option<usize>, ApiError> {
        match self.max_completion_tokens.or(self.max_tokens) {
            Some(0) => Err(ApiError::invalid("max_tokens must be at least 1", Some("max_tokens"))),
            other => Ok(other),
        }
    }

    pub fn include_usage(&self) -> bool {
        self.stream && self.stream_options.as_ref().is_some_and(|o| o.include_usage)
    }
}

/// Checks a top-logprobs count.
pub fn top_logprobs(n: usize) -> Result<usize, ApiError> {
    if n > MAX_TOP_LOGPROBS {
        return Err(ApiError::invalid(
            format!("top_logprobs must be at most {MAX_TOP_LOGPROBS}"),
            Some("top_logprobs"),
        ));
    }
    Ok(n)
}

/// A chat message's content: text, or parts of which the text ones count.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: Option<Content>,
}

impl Message {
    pub fn text(&self) -> Result<String, ApiError> {
        match &self.content {
            None => Ok(String::new()),
            Some(Content::Text(t)) => Ok(t.clone()),
            Some(Content::Parts(parts)) => parts
                .iter()
                .map(|p| match (p.kind.as_str(), &p.text) {
                    ("text", Some(t)) => Ok(t.as_str()),
                    (kind, _) => Err(ApiError::invalid(
                        format!("content parts of type {kind:?} are not supported (text only)"),
                        Some("messages"),
                    )),
                })
                .collect(),
        }
    }
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<usize>,
    #[serde(flatten)]
    pub common: Common,
}

/// A completion prompt: text or token ids.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
    Batch(Vec<String>),
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub prompt: Prompt,
    pub logprobs: Option<usize>,
    #[serde(default)]
    pub echo: bool,
    #[serde(flatten)]
    pub common: Common,
}
