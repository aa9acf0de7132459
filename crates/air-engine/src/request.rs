//! What a front end submits and what it gets back.

use air_sampling::SamplingParams;
use std::time::Duration;

/// One generation request, already tokenized.
#[derive(Debug, Clone)]
pub struct Request {
    /// The model to run, by name; `None`: the engine's first model.
    pub model: Option<String>,
    /// Prompt token ids (special tokens such as BOS included as the model wants them).
    pub prompt: Vec<u32>,
    /// Most tokens to generate (also bounded by the model's context).
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Strings that end the generation; they are not part of the text returned.
    pub stop: Vec<String>,
    /// Alternatives per token to report with their log-probabilities (`Some(0)`: only the
    /// chosen token's); `None`: no log-probabilities.
    pub logprobs: Option<usize>,
    /// Keep generating past end-of-generation tokens (benchmarks).
    pub ignore_eos: bool,
}

impl Request {
    /// A request for `prompt` with llama.cpp's default sampling.
    pub fn new(prompt: Vec<u32>, max_tokens: usize) -> Self {
        Self {
            model: None,
            prompt,
            max_tokens,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            logprobs: None,
            ignore_eos: false,
        }
    }
}

/// A token's log-probability under the model, and the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub logprob: f32,
    /// (token id, log-probability), most likely first.
    pub top: Vec<(u32, f32)>,
}

/// Why a generation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop string appeared.
    Stop,
    /// `max_tokens` or the end of the context was reached.
    Length,
    /// The model produced an end-of-generation token.
    Eos,
    /// The client went away (its event stream was dropped).
    Cancelled,
    /// The engine failed; the message says why.
    Error(String),
}

impl FinishReason {
    /// The name front ends report: `stop`, `length`, `eos`, `cancelled` or `error`.
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Eos => "eos",
            FinishReason::Cancelled => "cancelled",
            FinishReason::Error(_) => "error",
        }
    }
}

/// Token counts of a finished request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens whose keys and values came from the prefix cache.
    pub cached_tokens: usize,
}

/// Times of a finished request, from its submission.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RequestTimings {
    /// Until the first generated token.
    pub time_to_first_token: Duration,
    /// Until the end.
    pub total: Duration,
    /// Times the request lost its KV blocks to others and was computed again.
    pub preemptions: usize,
}

/// What a request's stream yields.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A generated token and the text it completes (possibly empty: a partial UTF-8 character,
    /// or text held back while it may begin a stop string).
    Token { id: u32, text: String, logprobs: Option<TokenLogprobs> },
    /// The end: always the last event.
    Finished { reason: FinishReason, usage: Usage, timings: RequestTimings, text_tail: String },
}

/// Why a request was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error("the model {0:?} is not loaded")]
    UnknownModel(String),
    #[error("the server is overloaded: {waiting} requests are waiting; retry later")]
    Overloaded { waiting: usize },
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("the prompt has {prompt} tokens, which does not fit the context of {context} tokens")]
    PromptTooLong { prompt: usize, context: usize },
    #[error("token id {id} is outside the vocabulary ({vocab} tokens)")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("the request needs up to {needed} tokens of KV cache, more than the whole cache ({capacity} tokens)")]
    KvTooSmall { needed: usize, capacity: usize },
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("the engine has stopped")]
    Stopped,
}
