//! The generation loop shared by commands: prefill the prompt, then sample and feed back one
//! token at a time until an end-of-generation token or the token limit.

use air_model::{Logits, Model};
use air_sampling::Sampler;
use air_tokenizer::{StreamDecoder, Tokenizer};
use anyhow::Result;
use serde::Serialize;
use std::time::Instant;

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model produced an end-of-generation token.
    Eos,
    /// The token limit was reached.
    Length,
}

/// Speed figures of one generation.
#[derive(Debug, Clone, Serialize)]
pub struct Timings {
    pub prompt_ms: f64,
    pub decode_ms: f64,
    pub time_to_first_token_ms: f64,
    pub prompt_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
}

/// The result of one generation.
#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    pub prompt_tokens: Vec<u32>,
    /// Generated ids; an end-of-generation token that stopped it is not included.
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    pub timings: Timings,
}

/// Generates up to `max_tokens` after `prompt`, calling `on_text` with each complete piece of text.
/// The KV cache is sized for exactly what this run can use.
pub fn generate(
    model: &Model,
    tokenizer: &Tokenizer,
    prompt: Vec<u32>,
    max_tokens: usize,
    sampler: &mut Sampler,
    mut on_text: impl FnMut(&str),
) -> Result<Generation> {
    let mut cache = model.new_cache(prompt.len() + max_tokens)?;
    let started = Instant::now();
    let mut logits = model.forward(&prompt, &mut cache, Logits::Last)?;
    let prompt_time = started.elapsed();
    let mut history = prompt.clone();
    let mut tokens = Vec::new();
    let mut text = String::new();
    let mut decoder = StreamDecoder::new();
    let mut finish_reason = FinishReason::Length;
    let mut first_token_at = None;
    let mut decode_passes = 0usize;
    let decode_started = Instant::now();
    while tokens.len() < max_tokens {
        let token = sampler.sample(&logits, &history);
        first_token_at.get_or_insert_with(|| started.elapsed());
        if tokenizer.is_end_of_generation(token) {
            finish_reason = FinishReason::Eos;
            break;
        }
        tokens.push(token);
        history.push(token);
        let piece = decoder.push(tokenizer, token);
        on_text(&piece);
        text.push_str(&piece);
        if tokens.len() == max_tokens {
            break;
        }
        logits = model.forward(&[token], &mut cache, Logits::Last)?;
        decode_passes += 1;
    }
    let rest = decoder.flush();
    on_text(&rest);
    text.push_str(&rest);
    let decode_time = decode_started.elapsed();
    let per_s = |n: usize, secs: f64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
    Ok(Generation {
        timings: Timings {
            prompt_ms: prompt_time.as_secs_f64() * 1e3,
            decode_ms: decode_time.as_secs_f64() * 1e3,
            time_to_first_token_ms: first_token_at.unwrap_or(prompt_time).as_secs_f64() * 1e3,
            prompt_tokens_per_s: per_s(prompt.len(), prompt_time.as_secs_f64()),
            decode_tokens_per_s: per_s(decode_passes, decode_time.as_secs_f64()),
        },
        prompt_tokens: prompt,
        tokens,
        text,
        finish_reason,
    })
}
